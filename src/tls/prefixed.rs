//! A stream that yields some already-read bytes before the socket's own. After STARTTLS,
//! whatever the client sent behind the command is fed to rustls this way: a pipelining
//! client's ClientHello then just works, and injected plaintext fails the handshake.
//!
//! It also follows the TLS record framing of what it hands up, so the relay can tell
//! whether rustls holds part of a record before it takes the records over (kernel TLS or
//! its own record layer), and carries the connection's own key log (tls/secrets.rs), whose
//! TLS 1.3 traffic secrets the relay takes with the records.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::secrets::{SecretLog, TrafficSecrets};
use std::sync::Arc;

#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: BytesMut,
    inner: S,
    first: Option<u8>,
    records: Records,
    secrets: Option<Arc<SecretLog>>,
}

/// Where the bytes handed up so far stand in the TLS record framing (5-byte header with
/// a 16-bit length, then the body). Costs one step per record, not per byte.
#[derive(Debug, Default)]
struct Records {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl Records {
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == 5 {
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header_len = 0;
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

impl<S> Prefixed<S> {
    pub fn new(inner: S, prefix: BytesMut) -> Self {
        Prefixed { first: prefix.first().copied(), prefix, inner, records: Records::default(), secrets: None }
    }

    /// The stream with the key log its connection's config writes to (tls/secrets.rs).
    pub fn keeping_secrets(mut self, log: Arc<SecretLog>) -> Self {
        self.secrets = Some(log);
        self
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Prefix bytes not yet handed up.
    pub fn unread_prefix(&self) -> usize {
        self.prefix.len()
    }

    /// Whether everything handed up so far ends exactly at a TLS record boundary, i.e. the
    /// reader (rustls) holds no partial record.
    pub fn at_record_boundary(&self) -> bool {
        self.records.at_boundary()
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The TLS 1.3 traffic secrets this connection's key log kept (taken: asked once).
    /// `None` for TLS 1.2, or for a stream accepted without a key log of its own.
    pub fn take_traffic_secrets(&self) -> Option<TrafficSecrets> {
        self.secrets.as_ref()?.take()
    }

    /// The first byte this stream yielded (prefix or socket), if any: after a failed
    /// handshake it tells injected plaintext (not 0x16) from a broken ClientHello.
    pub fn first_byte(&self) -> Option<u8> {
        self.first
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            let this = &mut *self;
            this.records.advance(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let fresh = &buf.filled()[before..];
        if self.first.is_none() && !fresh.is_empty() {
            self.first = Some(fresh[0]);
        }
        let this = &mut *self;
        this.records.advance(fresh);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn prefix_comes_first() {
        let inner: &[u8] = b" world";
        let mut s = Prefixed::new(inner, BytesMut::from(&b"hello"[..]));
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn record_framing_is_followed_across_reads() {
        let mut r = Records::default();
        assert!(r.at_boundary());
        // A 3-byte record split inside its header, then a whole empty record.
        r.advance(&[0x17, 0x03]);
        assert!(!r.at_boundary());
        r.advance(&[0x03, 0x00, 0x03, b'a']);
        assert!(!r.at_boundary());
        r.advance(&[b'b', b'c', 0x17, 0x03, 0x03, 0x00, 0x00]);
        assert!(r.at_boundary());
    }
}
