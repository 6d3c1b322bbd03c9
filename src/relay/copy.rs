//! The user-space relay engine: a bidirectional copy that holds a buffer only while bytes
//! are in flight, propagates half-close, and ends on an idle deadline.
//!
//! Thousands of IMAP IDLE sessions sit silent for hours, so an idle direction owns no
//! buffer at all: each read borrows one from a per-thread pool and gives it back as soon
//! as its bytes are written (or the read finds nothing). A client filter, when given, sees
//! every client-to-backend read before it is written.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::clock::Clock;
use super::filter::{ClientFilter, Verdict};
use super::{Ending, Engine, Pending, Report, Totals};

/// 64 KiB per read: several TLS records per rustls call and a quarter as many syscalls
/// as 16 KiB on cleartext legs. Affordable because idle sessions hold none.
pub(super) const BUFFER: usize = 64 * 1024;
/// A direction whose last read filled its buffer is moving bulk (a big FETCH, an APPEND,
/// a message submitted): it reads this much at a time until a read finds less than
/// [`BUFFER`]. A quarter as many reads, writes and ACKs per byte again: on loopback the
/// server->client relay cost 13% less CPU per GiB than with 64 KiB (benches/RESULTS.md).
/// Only a busy direction holds one, and only while its bytes are in flight.
pub(super) const BULK_BUFFER: usize = 256 * 1024;
/// Buffers kept per thread for reuse; beyond that they are freed, so a burst of busy
/// sessions does not pin memory for ever.
const POOL_KEEP: usize = 16;
const BULK_POOL_KEEP: usize = 4;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static BULK_POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A read buffer of [`BUFFER`] bytes, or of [`BULK_BUFFER`] when `bulk`.
pub(super) fn take_buffer(bulk: bool) -> Box<[u8]> {
    let (pool, size) = if bulk { (&BULK_POOL, BULK_BUFFER) } else { (&POOL, BUFFER) };
    pool.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; size].into_boxed_slice())
}

pub(super) fn give_buffer(buf: Box<[u8]>) {
    let (pool, keep) = match buf.len() {
        BUFFER => (&POOL, POOL_KEEP),
        BULK_BUFFER => (&BULK_POOL, BULK_POOL_KEEP),
        _ => return,
    };
    pool.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < keep {
            pool.push(buf);
        }
    });
}

/// Whether the next read should take a bulk buffer, after one of `n` bytes into `size`:
/// a full buffer says more is waiting; less than a small buffer holds says it is not.
fn still_bulk(bulk: bool, n: usize, size: usize) -> bool {
    if n == size {
        true
    } else {
        bulk && n >= BUFFER
    }
}

/// The bytes a direction has read and not yet written.
enum Flight {
    Idle,
    /// A pooled read buffer holding `..end`.
    Pooled {
        buf: Box<[u8]>,
        end: usize,
    },
    /// Bytes owned outright: pending bytes from the negotiation, or a filter's output.
    Owned(Vec<u8>),
}

impl Flight {
    fn bytes(&self) -> &[u8] {
        match self {
            Flight::Idle => &[],
            Flight::Pooled { buf, end } => &buf[..*end],
            Flight::Owned(bytes) => bytes,
        }
    }

    /// Frees what is held: a pooled buffer goes back to the pool.
    fn clear(&mut self) {
        if let Flight::Pooled { buf, .. } = std::mem::replace(self, Flight::Idle) {
            give_buffer(buf);
        }
    }
}

/// One direction of the copy.
struct Direction<'f> {
    /// In flight: `flight.bytes()[pos..]`. `Idle` while nothing is.
    flight: Flight,
    pos: usize,
    read_done: bool,
    /// The last reads filled their buffers: the next one takes a [`BULK_BUFFER`].
    bulk: bool,
    need_flush: bool,
    done: bool,
    /// Bytes read from the source (pending bytes included), for the log line.
    moved: u64,
    /// Client to backend only: what every byte read must pass before it is written.
    filter: Option<&'f mut dyn ClientFilter>,
    /// The filter refused the input: this reply goes to the client once what the filter
    /// let through has been written, and the relay ends.
    refusal: Option<Vec<u8>>,
}

impl<'f> Direction<'f> {
    fn new(pending: Vec<u8>, filter: Option<&'f mut dyn ClientFilter>) -> Self {
        let moved = pending.len() as u64;
        let mut direction = Direction {
            flight: Flight::Idle,
            pos: 0,
            read_done: false,
            bulk: false,
            need_flush: false,
            done: false,
            moved,
            filter,
            refusal: None,
        };
        if !pending.is_empty() {
            // Pending client bytes are client bytes: they pass the filter like any others.
            direction.flight = match direction.pass(&pending) {
                None => Flight::Owned(pending),
                Some(out) => Flight::Owned(out),
            };
        }
        direction
    }

    /// Runs `input` through the filter; `None`: it passes unchanged, else what to write
    /// instead. A refusal is remembered for after the write.
    fn pass(&mut self, input: &[u8]) -> Option<Vec<u8>> {
        let filter = self.filter.as_deref_mut()?;
        let mut out = Vec::new();
        let verdict = filter.filter(input, &mut out);
        self.judged(verdict, out)
    }

    /// End of input: what the filter still held back, if anything.
    fn pass_end(&mut self) -> Option<Vec<u8>> {
        let filter = self.filter.take()?;
        let mut out = Vec::new();
        let verdict = filter.finish(&mut out);
        self.judged(verdict, out)
    }

    fn judged(&mut self, verdict: Verdict, out: Vec<u8>) -> Option<Vec<u8>> {
        match verdict {
            Verdict::Clean => None,
            Verdict::Changed => Some(out),
            Verdict::Refuse(reply) => {
                self.refusal = Some(reply);
                Some(out)
            }
        }
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
            let in_flight = &self.flight.bytes()[self.pos..];
            if !in_flight.is_empty() {
                let n = ready!(Pin::new(&mut *dst).poll_write(cx, in_flight))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.need_flush = true;
                continue;
            }
            // All written: a pooled buffer goes back to the pool before the next read.
            self.flight.clear();
            self.pos = 0;
            if self.refusal.is_some() {
                ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if self.read_done {
                if let Some(rest) = self.pass_end() {
                    self.flight = Flight::Owned(rest);
                    continue;
                }
                ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut buf = take_buffer(self.bulk);
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
                // rustls's word for a TCP close without close_notify, which is how most mail
                // clients end (imaplib, poplib...): the mail protocols frame their own data,
                // so a truncation gains an attacker nothing, and the session simply ended.
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    give_buffer(buf);
                    self.read_done = true;
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
                        self.bulk = still_bulk(self.bulk, n, buf.len());
                        self.moved += n as u64;
                        clock.touch();
                        self.flight = match self.pass(&buf[..n]) {
                            None => Flight::Pooled { buf, end: n },
                            Some(out) => {
                                give_buffer(buf);
                                Flight::Owned(out)
                            }
                        };
                    }
                }
            }
        }
    }

    /// Its source has ended and every byte has been written: only the half-close is left.
    fn closing(&self) -> bool {
        self.read_done && self.flight.bytes()[self.pos..].is_empty()
    }

    /// Returns the buffer, if one is still held, to the pool.
    fn release(&mut self) {
        self.flight.clear();
    }
}

pub(super) async fn relay<C, B>(
    mut client: C,
    mut backend: B,
    pending: Pending,
    idle: Duration,
    filter: Option<&mut dyn ClientFilter>,
) -> Report
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Clock::new();
    let mut up = Direction::new(pending.to_backend, filter);
    let mut down = Direction::new(pending.to_client, None);
    let copy = poll_fn(|cx| {
        if !up.done {
            if let Poll::Ready(Err(e)) = up.poll(cx, &mut client, &mut backend, &clock) {
                return Poll::Ready(Ending::after_error(&e, down.done || up.closing()));
            }
        }
        if up.refusal.is_some() && up.done {
            // Nothing more moves either way: the refusal ends the relay.
            return Poll::Ready(Ending::Closed);
        }
        if !down.done {
            if let Poll::Ready(Err(e)) = down.poll(cx, &mut backend, &mut client, &clock) {
                return Poll::Ready(Ending::after_error(&e, up.done || down.closing()));
            }
        }
        if up.done && down.done {
            Poll::Ready(Ending::Closed)
        } else {
            Poll::Pending
        }
    });
    let mut ending = tokio::select! {
        ending = copy => ending,
        () = clock.idle_for(idle) => Ending::Idle,
    };
    if let Some(reply) = up.refusal.take() {
        refuse(&mut client, &mut backend, &reply).await;
        ending = Ending::Refused;
    }
    up.release();
    down.release();
    Report {
        engine: Engine::Copy,
        totals: Totals { client_to_backend: up.moved, backend_to_client: down.moved },
        ending,
    }
}

/// Tells the client why its input was refused and closes both connections; the backend
/// sees its side end mid-transaction and drops what it was given of it.
async fn refuse<C, B>(client: &mut C, backend: &mut B, reply: &[u8])
where
    C: AsyncWrite + Unpin,
    B: AsyncWrite + Unpin,
{
    let _ = backend.shutdown().await;
    let _ = client.write_all(reply).await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
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
            relay(client_side, backend_side, pending, Duration::from_secs(5), None).await
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
        let report =
            relay(client_side, backend_side, Pending::default(), Duration::from_secs(30), None).await;
        assert_eq!(report.ending, Ending::Idle);
    }

    /// A full buffer says bulk is moving; only a read a small buffer would hold ends it.
    #[test]
    fn bulk_starts_with_a_full_read_and_ends_with_a_small_one() {
        assert!(!still_bulk(false, BUFFER - 1, BUFFER));
        assert!(still_bulk(false, BUFFER, BUFFER));
        assert!(still_bulk(true, BULK_BUFFER, BULK_BUFFER));
        assert!(still_bulk(true, BUFFER, BULK_BUFFER));
        assert!(!still_bulk(true, BUFFER - 1, BULK_BUFFER));
        assert!(!still_bulk(false, 10, BULK_BUFFER));
    }

    /// A direction moving a big message reads it in bulk buffers, and takes small ones
    /// again once the traffic is a conversation's.
    #[test]
    fn a_direction_moving_bulk_reads_in_bulk_buffers_then_drops_back() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (mut src_app, mut src) = duplex(1024 * 1024);
            let (mut dst, mut dst_app) = duplex(1024 * 1024);
            let clock = Clock::new();
            let mut down = Direction::new(Vec::new(), None);
            src_app.write_all(&vec![7u8; 300 * 1024]).await.unwrap();
            let polled = poll_fn(|cx| Poll::Ready(down.poll(cx, &mut src, &mut dst, &clock))).await;
            assert!(polled.is_pending());
            assert!(down.bulk, "300 KiB waiting: the reads after the first full one are bulk reads");
            assert_eq!(down.moved, 300 * 1024);
            assert!(BULK_POOL.with(|p| !p.borrow().is_empty()), "the bulk buffer went back to its pool");
            src_app.write_all(b"a1 OK\r\n").await.unwrap();
            let polled = poll_fn(|cx| Poll::Ready(down.poll(cx, &mut src, &mut dst, &clock))).await;
            assert!(polled.is_pending());
            assert!(!down.bulk, "a short reply: back to small buffers");
            let mut got = vec![0u8; 300 * 1024 + 7];
            dst_app.read_exact(&mut got).await.unwrap();
            assert!(got[..300 * 1024].iter().all(|&b| b == 7));
            assert_eq!(&got[300 * 1024..], b"a1 OK\r\n");
        });
    }

    /// The point of the engine: a session with nothing in flight owns no relay buffer.
    #[test]
    fn an_idle_direction_holds_no_buffer() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (_client_app, mut client_side) = duplex(1024);
            let (mut backend_side, _backend_app) = duplex(1024);
            let clock = Clock::new();
            let mut up = Direction::new(Vec::new(), None);
            let polled =
                poll_fn(|cx| Poll::Ready(up.poll(cx, &mut client_side, &mut backend_side, &clock))).await;
            assert!(polled.is_pending());
            assert!(matches!(up.flight, Flight::Idle), "an idle direction must not keep a buffer");
            // The buffer it borrowed for the attempt went back to this thread's pool.
            assert!(POOL.with(|p| !p.borrow().is_empty()));
        });
    }
}
