//! The user-space relay engine: a bidirectional copy that holds a buffer only while bytes
//! are in flight, propagates half-close, and ends on an idle deadline.
//!
//! Thousands of IMAP IDLE sessions sit silent for hours, so an idle direction owns no
//! buffer at all: each read borrows one from a per-thread pool and gives it back as soon
//! as its bytes are written (or the read finds nothing).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::clock::Clock;
use super::{Ending, Engine, Pending, Report, Totals};

/// 64 KiB per read: several TLS records per rustls call and a quarter as many syscalls
/// as 16 KiB on cleartext legs. Affordable because idle sessions hold none.
pub(super) const BUFFER: usize = 64 * 1024;
/// Buffers kept per thread for reuse; beyond that they are freed, so a burst of busy
/// sessions does not pin memory for ever.
const POOL_KEEP: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; BUFFER].into_boxed_slice())
}

fn give_buffer(buf: Box<[u8]>) {
    if buf.len() != BUFFER {
        return;
    }
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < POOL_KEEP {
            pool.push(buf);
        }
    });
}

/// One direction of the copy.
struct Direction {
    /// Bytes read and not yet written: `buf[pos..end]`. `None` while nothing is in flight.
    buf: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    /// Bytes read from the source (pending bytes included), for the log line.
    moved: u64,
}

impl Direction {
    fn new(pending: Vec<u8>) -> Self {
        let (end, moved) = (pending.len(), pending.len() as u64);
        let buf = (!pending.is_empty()).then(|| pending.into_boxed_slice());
        Direction { buf, pos: 0, end, read_done: false, need_flush: false, done: false, moved }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
        clock: &Clock,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if let Some(buf) = &self.buf {
                if self.pos < self.end {
                    let n = ready!(Pin::new(&mut *dst).poll_write(cx, &buf[self.pos..self.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.pos += n;
                    self.need_flush = true;
                    continue;
                }
                // All written: the buffer goes back to the pool before the next read.
                if let Some(buf) = self.buf.take() {
                    give_buffer(buf);
                }
                self.pos = 0;
                self.end = 0;
            }
            if self.read_done {
                ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut buf = take_buffer();
            let mut read = ReadBuf::new(&mut buf);
            match Pin::new(&mut *src).poll_read(cx, &mut read) {
                Poll::Pending => {
                    give_buffer(buf);
                    // Nothing more to read for now: push out what the writer (rustls
                    // especially) may still hold, then wait.
                    if self.need_flush {
                        ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    give_buffer(buf);
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        give_buffer(buf);
                        self.read_done = true;
                    } else {
                        self.moved += n as u64;
                        clock.touch();
                        self.buf = Some(buf);
                        self.end = n;
                    }
                }
            }
        }
    }

    /// Returns the buffer, if one is still held, to the pool.
    fn release(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_buffer(buf);
        }
    }
}

pub(super) async fn relay<C, B>(mut client: C, mut backend: B, pending: Pending, idle: Duration) -> Report
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Clock::new();
    let mut up = Direction::new(pending.to_backend);
    let mut down = Direction::new(pending.to_client);
    let copy = poll_fn(|cx| {
        let up_state =
            if up.done { Poll::Ready(Ok(())) } else { up.poll(cx, &mut client, &mut backend, &clock) };
        if let Poll::Ready(Err(e)) = up_state {
            return Poll::Ready(Err(e));
        }
        let down_state =
            if down.done { Poll::Ready(Ok(())) } else { down.poll(cx, &mut backend, &mut client, &clock) };
        if let Poll::Ready(Err(e)) = down_state {
            return Poll::Ready(Err(e));
        }
        if up.done && down.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    });
    let ending = tokio::select! {
        result = copy => if result.is_ok() { Ending::Closed } else { Ending::Failed },
        () = clock.idle_for(idle) => Ending::Idle,
    };
    up.release();
    down.release();
    Report {
        engine: Engine::Copy,
        totals: Totals { client_to_backend: up.moved, backend_to_client: down.moved },
        ending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_pending_then_both_ways_and_propagates_half_close() {
        let (client_app, client_side) = duplex(64 * 1024);
        let (backend_side, backend_app) = duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let pending = Pending { to_backend: b"early ".to_vec(), to_client: b"greeting ".to_vec() };
            relay(client_side, backend_side, pending, Duration::from_secs(5)).await
        });
        let (mut c, mut b) = (client_app, backend_app);
        c.write_all(b"from client").await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early from client");
        b.write_all(b"from backend").await.unwrap();
        b.shutdown().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"greeting from backend");
        let report = task.await.unwrap();
        assert_eq!(report.ending, Ending::Closed);
        assert_eq!(report.totals, Totals { client_to_backend: 17, backend_to_client: 21 });
    }

    #[tokio::test(start_paused = true)]
    async fn idle_relay_ends() {
        let (_client_app, client_side) = duplex(1024);
        let (backend_side, _backend_app) = duplex(1024);
        let report = relay(client_side, backend_side, Pending::default(), Duration::from_secs(30)).await;
        assert_eq!(report.ending, Ending::Idle);
    }

    /// The point of the engine: a session with nothing in flight owns no relay buffer.
    #[test]
    fn an_idle_direction_holds_no_buffer() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (_client_app, mut client_side) = duplex(1024);
            let (mut backend_side, _backend_app) = duplex(1024);
            let clock = Clock::new();
            let mut up = Direction::new(Vec::new());
            let polled =
                poll_fn(|cx| Poll::Ready(up.poll(cx, &mut client_side, &mut backend_side, &clock))).await;
            assert!(polled.is_pending());
            assert!(up.buf.is_none(), "an idle direction must not keep a buffer");
            // The buffer it borrowed for the attempt went back to this thread's pool.
            assert!(POOL.with(|p| !p.borrow().is_empty()));
        });
    }
}
