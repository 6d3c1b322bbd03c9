//! The splice engine: bytes go socket -> pipe -> socket inside the kernel, never through
//! user space. Used for two cleartext legs, and for a kernel-TLS client leg.
//!
//! tokio's readiness contract: only a socket's own EAGAIN may clear its readiness. A
//! splice into a pipe also fails with EAGAIN when the pipe is full, so each direction
//! empties its pipe completely before it reads its socket again; then an EAGAIN from
//! socket -> pipe can only mean "socket empty", and one from pipe -> socket only
//! "socket full". Every call is SPLICE_F_NONBLOCK so no call ever blocks a worker thread.
//!
//! With a client filter (SMTP's smuggling guard) the client-to-backend direction is read,
//! filtered and written in user space instead, one pooled buffer per read (none while
//! idle); the backend-to-client direction is spliced as before. That direction carries
//! only the backend's replies, which nothing needs to examine.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::clock::Clock;
use super::copy::{give_buffer, take_buffer};
use super::filter::{ClientFilter, Verdict};
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

/// The filter refused the client's input; carries its reply out of the joined pumps.
#[derive(Debug, thiserror::Error)]
#[error("the client filter refused the client's input")]
struct Refused(Vec<u8>);

/// Relays until both directions have ended, either fails, or nothing moves for `idle`.
pub(super) async fn relay(
    legs: Legs<'_>,
    pipes: Pipes,
    pending: Pending,
    idle: Duration,
    filter: Option<&mut dyn ClientFilter>,
) -> Report {
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
    // Which direction has finished, so that the other's reset can be told from a failure.
    let finished = AtomicBool::new(false);
    let up_run = async {
        match filter {
            Some(filter) => up.run_filtered(pending.to_backend, filter).await,
            None => up.run(pending.to_backend).await,
        }
        .inspect(|()| finished.store(true, Ordering::Relaxed))
    };
    let down_run =
        async { down.run(pending.to_client).await.inspect(|()| finished.store(true, Ordering::Relaxed)) };
    let both = async { tokio::try_join!(up_run, down_run) };
    let ending = tokio::select! {
        result = both => match result {
            Ok(_) => Ending::Closed,
            Err(e) => match e.get_ref().and_then(|inner| inner.downcast_ref::<Refused>()) {
                Some(Refused(reply)) => {
                    refuse(&legs, reply).await;
                    Ending::Refused
                }
                None => Ending::after_error(&e, finished.load(Ordering::Relaxed)),
            },
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

/// Tells the client why its input was refused and closes both connections.
async fn refuse(legs: &Legs<'_>, reply: &[u8]) {
    let _ = socket2::SockRef::from(legs.backend).shutdown(std::net::Shutdown::Both);
    let _ = write_all(legs.client, reply).await;
    if legs.client_ktls {
        let _ = ktls::send_close_notify(legs.client).await;
    }
    let _ = socket2::SockRef::from(legs.client).shutdown(std::net::Shutdown::Both);
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

    /// The filtered form of [`Pump::run`]: socket -> user space -> filter -> socket.
    async fn run_filtered(self, pending: Vec<u8>, filter: &mut dyn ClientFilter) -> io::Result<()> {
        if !pending.is_empty() {
            self.pass(filter, &pending).await?;
        }
        drop(pending);
        while let Some(buf) = self.read_some().await? {
            let (buf, n) = buf;
            self.moved.fetch_add(n as u64, Ordering::Relaxed);
            self.clock.touch();
            let passed = self.pass(filter, &buf[..n]).await;
            give_buffer(buf);
            passed?;
        }
        let mut out = Vec::new();
        match filter.finish(&mut out) {
            Verdict::Clean => {}
            Verdict::Changed => write_all(self.to, &out).await?,
            Verdict::Refuse(reply) => {
                write_all(self.to, &out).await?;
                return Err(io::Error::other(Refused(reply)));
            }
        }
        socket2::SockRef::from(self.to).shutdown(std::net::Shutdown::Write)
    }

    /// One read into a pooled buffer, taken only once the socket is readable so an idle
    /// session holds none; `None` at the end of the stream.
    async fn read_some(&self) -> io::Result<Option<(Box<[u8]>, usize)>> {
        loop {
            self.from.readable().await?;
            let mut buf = take_buffer(false);
            match self.from.try_read(&mut buf) {
                Ok(0) => {
                    give_buffer(buf);
                    return Ok(None);
                }
                Ok(n) => return Ok(Some((buf, n))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => give_buffer(buf),
                // A kernel-TLS socket refuses a plain read of a non-data record (EIO): read
                // it as a control message, as `fill` does for splice.
                Err(e) if self.from_ktls && e.raw_os_error() == Some(libc::EIO) => {
                    give_buffer(buf);
                    ktls::read_control_record(self.from).await?;
                    return Ok(None);
                }
                Err(e) => {
                    give_buffer(buf);
                    return Err(e);
                }
            }
        }
    }

    /// Writes what the filter lets through of `input`.
    async fn pass(&self, filter: &mut dyn ClientFilter, input: &[u8]) -> io::Result<()> {
        let mut out = Vec::new();
        match filter.filter(input, &mut out) {
            Verdict::Clean => write_all(self.to, input).await,
            Verdict::Changed => write_all(self.to, &out).await,
            Verdict::Refuse(reply) => {
                write_all(self.to, &out).await?;
                Err(io::Error::other(Refused(reply)))
            }
        }
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
            relay(legs, Pipes::new(&Faults::default()).unwrap(), pending, Duration::from_secs(5), None).await
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
        let report = relay(legs, pipes, Pending::default(), Duration::from_secs(30), None).await;
        assert_eq!(report.ending, Ending::Idle);
    }
}
