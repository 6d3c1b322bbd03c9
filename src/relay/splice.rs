//! The splice engine: bytes go socket -> pipe -> socket inside the kernel, never through
//! user space. Used for two cleartext legs, and for a kernel-TLS client leg.
//!
//! tokio's readiness contract: only a socket's own EAGAIN may clear its readiness. A
//! splice into a pipe also fails with EAGAIN when the pipe is full, so each direction
//! empties its pipe completely before it reads its socket again; then an EAGAIN from
//! socket -> pipe can only mean "socket empty", and one from pipe -> socket only
//! "socket full". Every call is SPLICE_F_NONBLOCK so no call ever blocks a worker thread.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::clock::Clock;
use super::ktls;
use super::{Ending, Engine, Faults, Pending, Report, Totals};

/// Pipe capacity asked for with F_SETPIPE_SZ (the default pipe-max-size): measured on
/// loopback, 1 MiB cut splice's CPU per GiB by a third against the 64 KiB default, which
/// costs more than copy. Pages are taken only while data sits in the pipe, so an idle
/// session pays for the pipe's bookkeeping, not its capacity.
const PIPE_SIZE: usize = 1024 * 1024;

/// One pipe: (read end, write end, capacity).
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // A refusal (the per-user pipe budget, pipe-max-size) leaves the default size,
        // which works, only with more calls.
        let size = fcntl_setpipe_size(&write, PIPE_SIZE).unwrap_or(64 * 1024);
        Ok(Pipe { read, write, size })
    }
}

/// The two pipes of a session, one per direction.
pub(super) struct Pipes {
    up: Pipe,
    down: Pipe,
}

impl Pipes {
    /// Creates both pipes, or says why not (EMFILE, ENFILE, or an injected fault), in
    /// which case the caller relays with copy instead.
    pub(super) fn new(faults: &Faults) -> io::Result<Pipes> {
        if faults.no_pipes {
            return Err(io::Error::other("pipe creation failed (injected fault)"));
        }
        Ok(Pipes { up: Pipe::new()?, down: Pipe::new()? })
    }
}

/// The two sockets; `client_ktls` says the client socket carries kernel TLS, whose
/// non-data records need handling splice cannot do.
pub(super) struct Legs<'a> {
    pub client: &'a TcpStream,
    pub backend: &'a TcpStream,
    pub client_ktls: bool,
}

/// Relays until both directions have ended, either fails, or nothing moves for `idle`.
pub(super) async fn relay(legs: Legs<'_>, pipes: Pipes, pending: Pending, idle: Duration) -> Report {
    let clock = Clock::new();
    let up_moved = AtomicU64::new(pending.to_backend.len() as u64);
    let down_moved = AtomicU64::new(pending.to_client.len() as u64);
    let up = Pump {
        from: legs.client,
        from_ktls: legs.client_ktls,
        to: legs.backend,
        to_ktls: false,
        pipe: &pipes.up,
        clock: &clock,
        moved: &up_moved,
    };
    let down = Pump {
        from: legs.backend,
        from_ktls: false,
        to: legs.client,
        to_ktls: legs.client_ktls,
        pipe: &pipes.down,
        clock: &clock,
        moved: &down_moved,
    };
    let both = async { tokio::try_join!(up.run(pending.to_backend), down.run(pending.to_client)) };
    let ending = tokio::select! {
        result = both => match result {
            Ok(_) => Ending::Closed,
            Err(e) => {
                tracing::debug!("splice relay failed: {e}");
                Ending::Failed
            }
        },
        () = clock.idle_for(idle) => Ending::Idle,
    };
    let engine = if legs.client_ktls { Engine::Ktls } else { Engine::Splice };
    let totals = Totals {
        client_to_backend: up_moved.load(Ordering::Relaxed),
        backend_to_client: down_moved.load(Ordering::Relaxed),
    };
    Report { engine, totals, ending }
}

/// One direction: `from` -> pipe -> `to`.
struct Pump<'a> {
    from: &'a TcpStream,
    from_ktls: bool,
    to: &'a TcpStream,
    to_ktls: bool,
    pipe: &'a Pipe,
    clock: &'a Clock,
    moved: &'a AtomicU64,
}

impl Pump<'_> {
    async fn run(self, pending: Vec<u8>) -> io::Result<()> {
        write_all(self.to, &pending).await?;
        drop(pending);
        loop {
            // The pipe is empty here (invariant of the loop).
            let n = self.fill().await?;
            if n == 0 {
                break;
            }
            self.moved.fetch_add(n as u64, Ordering::Relaxed);
            self.clock.touch();
            self.drain(n).await?;
        }
        // End of stream read and every byte passed on: propagate the half-close.
        if self.to_ktls {
            ktls::send_close_notify(self.to).await?;
        }
        socket2::SockRef::from(self.to).shutdown(std::net::Shutdown::Write)
    }

    /// socket -> pipe; 0 means end of stream.
    async fn fill(&self) -> io::Result<usize> {
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        loop {
            self.from.readable().await?;
            let spliced = self.from.try_io(Interest::READABLE, || {
                splice(self.from, None, &self.pipe.write, None, self.pipe.size, flags)
                    .map_err(io::Error::from)
            });
            match spliced {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // A kernel-TLS socket refuses to splice a non-data record (EINVAL): read it
                // as a control message. close_notify is the end of stream; anything else
                // (KeyUpdate) cannot be followed by the kernel and ends the session.
                Err(e) if self.from_ktls && e.raw_os_error() == Some(libc::EINVAL) => {
                    ktls::read_control_record(self.from).await?;
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// pipe -> socket, until the `n` bytes in the pipe are all out.
    async fn drain(&self, mut n: usize) -> io::Result<()> {
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        while n > 0 {
            self.to.writable().await?;
            let spliced = self.to.try_io(Interest::WRITABLE, || {
                splice(&self.pipe.read, None, self.to, None, n, flags).map_err(io::Error::from)
            });
            match spliced {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => n -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Writes bytes the negotiation phase had already read, with the same readiness rules.
async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn pipes_get_the_asked_size_or_a_working_default() {
        let pipes = Pipes::new(&Faults::default()).unwrap();
        assert!(pipes.up.size >= 64 * 1024);
        assert!(Pipes::new(&Faults { no_pipes: true, ..Faults::default() }).is_err());
    }

    #[tokio::test]
    async fn splices_pending_and_both_ways_with_half_close() {
        let (mut c, client_side) = pair().await;
        let (backend_side, mut b) = pair().await;
        let task = tokio::spawn(async move {
            let legs = Legs { client: &client_side, backend: &backend_side, client_ktls: false };
            let pending = Pending { to_backend: b"MAIL ".to_vec(), to_client: b"250 ".to_vec() };
            relay(legs, Pipes::new(&Faults::default()).unwrap(), pending, Duration::from_secs(5)).await
        });
        c.write_all(b"FROM:<a@b>").await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"MAIL FROM:<a@b>");
        b.write_all(b"ok").await.unwrap();
        b.shutdown().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"250 ok");
        let report = task.await.unwrap();
        assert_eq!(report.engine, Engine::Splice);
        assert_eq!(report.ending, Ending::Closed);
        assert_eq!(report.totals, Totals { client_to_backend: 15, backend_to_client: 6 });
    }

    #[tokio::test(start_paused = true)]
    async fn idle_splice_ends() {
        let (_c, client_side) = pair().await;
        let (backend_side, _b) = pair().await;
        let legs = Legs { client: &client_side, backend: &backend_side, client_ktls: false };
        let pipes = Pipes::new(&Faults::default()).unwrap();
        let report = relay(legs, pipes, Pending::default(), Duration::from_secs(30)).await;
        assert_eq!(report.ending, Ending::Idle);
    }
}
