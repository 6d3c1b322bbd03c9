//! The user-space relay engine: tokio's bidirectional copy (which propagates half-close)
//! with an idle deadline and byte counts that survive an error.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::{Ending, Engine, Report, Totals};

/// 16 KiB matches the largest TLS record, so one read fills at most one record's worth.
const BUFFER: usize = 16 * 1024;

pub(super) async fn relay<C, B>(
    client: C,
    backend: B,
    to_backend: &[u8],
    to_client: &[u8],
    idle: Duration,
) -> Report
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Clock::new();
    let mut client = Counted::new(client, clock.clone());
    let mut backend = Counted::new(backend, clock.clone());
    let pending = async {
        backend.inner.write_all(to_backend).await?;
        client.inner.write_all(to_client).await
    };
    let ending = match pending.await {
        Err(_) => Ending::Failed,
        Ok(()) => {
            let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut backend, BUFFER, BUFFER);
            tokio::select! {
                result = copy => if result.is_ok() { Ending::Closed } else { Ending::Failed },
                () = clock.idle_for(idle) => Ending::Idle,
            }
        }
    };
    let totals = Totals {
        client_to_backend: client.read + to_backend.len() as u64,
        backend_to_client: backend.read + to_client.len() as u64,
    };
    Report { engine: Engine::Copy, totals, ending }
}

/// The time of the last byte read on either side, shared by both directions.
#[derive(Clone)]
struct Clock {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Clock {
    fn new() -> Self {
        Clock { start: Instant::now(), last_ms: Arc::new(AtomicU64::new(0)) }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has been read for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream that counts what is read from it and marks the clock.
struct Counted<S> {
    inner: S,
    read: u64,
    clock: Clock,
}

impl<S> Counted<S> {
    fn new(inner: S, clock: Clock) -> Self {
        Counted { inner, read: 0, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read += n;
            self.clock.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};

    #[tokio::test]
    async fn relays_pending_then_both_ways_and_propagates_half_close() {
        let (client_app, client_side) = duplex(64 * 1024);
        let (backend_side, backend_app) = duplex(64 * 1024);
        let task = tokio::spawn(async move {
            relay(client_side, backend_side, b"early ", b"greeting ", Duration::from_secs(5)).await
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
        let report = relay(client_side, backend_side, b"", b"", Duration::from_secs(30)).await;
        assert_eq!(report.ending, Ending::Idle);
    }
}
