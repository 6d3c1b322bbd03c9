//! IMAP through mailtls, on a STARTTLS listener ("imap", port 143's role) and an implicit-TLS
//! listener ("imaps", port 993's role), against the recording backend: the STARTTLS
//! command-injection class, the plaintext dialogue, the negotiation after TLS, and bounds.

mod common;

use common::*;

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use mailtls::metrics::Metrics;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const GREETING: &str = "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] mx.test ready\r\n";
/// The backend's greeting as a 993 client must see it: STARTTLS filtered out.
const IMAPS_GREETING: &str =
    "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE AUTH=PLAIN] Dovecot ready.\r\n";
/// The backend's CAPABILITY reply as a client inside TLS must see it.
const TLS_CAPABILITY: &str = "* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN IDLE\r\n";
const PRIVACY: &str = "NO [PRIVACYREQUIRED] Plaintext authentication is disabled, use STARTTLS first\r\n";
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);
/// Short handshake timeout so failure paths end promptly whatever happens.
const TIMEOUTS: &str = "[timeouts]\nhandshake = 2\ndrain = 1\n";

/// A proxy with one IMAP listener, "imap" (STARTTLS) or "imaps" (implicit TLS), in front of
/// `backend`. (One proxy per listener: see `starttls_and_implicit_listeners_share_one_proxy`.)
async fn proxy_for(backend: &Backend, name: &'static str) -> Proxy {
    let tls = if name == "imap" { "starttls" } else { "implicit" };
    Proxy::start_with(&[Listener::new(name, "imap", tls, backend.addr)], TIMEOUTS).await
}

/// The recording backend and a proxy with the STARTTLS listener "imap".
async fn start() -> (Backend, Proxy) {
    let backend = Backend::start(Script::Imap).await;
    let proxy = proxy_for(&backend, "imap").await;
    (backend, proxy)
}

/// The recording backend and a proxy with the implicit-TLS listener "imaps".
async fn start_imaps() -> (Backend, Proxy) {
    let backend = Backend::start(Script::Imap).await;
    let proxy = proxy_for(&backend, "imaps").await;
    (backend, proxy)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads one line a byte at a time, so that nothing behind it is consumed. None at EOF.
async fn raw_line(stream: &mut TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut byte)).await {
            Ok(Ok(1)) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    return Some(String::from_utf8_lossy(&line).into_owned());
                }
            }
            Ok(Ok(_)) | Ok(Err(_)) => return None,
            Err(_) => panic!("no line within {PATIENCE:?}; partial: {:?}", String::from_utf8_lossy(&line)),
        }
    }
}

/// Every byte until EOF, reset, or PATIENCE (then `closed` is false).
async fn raw_rest(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Asserts that bytes the proxy sent on a connection whose handshake failed are TLS records
/// (an alert) or nothing: never a plaintext protocol reply.
fn assert_no_plaintext_reply(heard: &[u8], injected: &[&str]) {
    assert!(
        heard.is_empty() || matches!(heard[0], 0x15 | 0x16),
        "plaintext after the STARTTLS go-ahead: {:?}",
        String::from_utf8_lossy(heard)
    );
    for tag in injected {
        assert!(!contains(heard, tag.as_bytes()), "a reply to {tag:?} reached the client: {heard:?}");
    }
}

/// A transport that records every byte read from the proxy, so a test can inspect what
/// arrived even when the TLS handshake rejected it.
struct Tap<S> {
    inner: S,
    heard: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let new = buf.filled()[before..].to_vec();
            self.heard.lock().unwrap().extend_from_slice(&new);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn client_tls<S: AsyncRead + AsyncWrite + Unpin>(stream: S, proxy: &Proxy) -> io::Result<TlsStream<S>> {
    let connector = tokio_rustls::TlsConnector::from(client_config(&proxy.certs));
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(PATIENCE, connector.connect(name, stream))
        .await
        .unwrap_or_else(|_| Err(io::Error::other("handshake timed out")))
}

/// What became of a STARTTLS attempt with extra bytes around it.
struct Attempt {
    /// Every line received in plaintext after the greeting, the go-ahead last.
    lines: Vec<String>,
    /// The TLS session, or why the handshake failed.
    tls: Result<Conn<TlsStream<Tap<TcpStream>>>, String>,
    /// Every raw byte received after the go-ahead.
    heard: Arc<Mutex<Vec<u8>>>,
}

/// Connects to "imap", reads the greeting, writes `segments` (one write each, without
/// reading in between), reads plaintext lines up to the tagged reply to `tag`'s STARTTLS,
/// then attempts a real TLS handshake on the same socket.
async fn starttls_attempt(proxy: &Proxy, segments: &[&[u8]], tag: &str) -> Attempt {
    let mut tcp = TcpStream::connect(proxy.addr("imap")).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    assert_eq!(raw_line(&mut tcp).await.as_deref(), Some(GREETING));
    for segment in segments {
        tcp.write_all(segment).await.unwrap();
    }
    let mut lines = Vec::new();
    loop {
        let line = raw_line(&mut tcp).await;
        let line = line.unwrap_or_else(|| panic!("closed before the STARTTLS reply; got {lines:?}"));
        let done = line.starts_with(&format!("{tag} "));
        lines.push(line);
        if done {
            break;
        }
    }
    let go_ahead = lines.last().unwrap();
    assert_eq!(go_ahead, &format!("{tag} OK Begin TLS negotiation now\r\n"), "{lines:?}");
    let heard = Arc::new(Mutex::new(Vec::new()));
    let tap = Tap { inner: tcp, heard: heard.clone() };
    let tls = client_tls(tap, proxy).await.map(Conn::new).map_err(|e| e.to_string());
    Attempt { lines, tls, heard }
}

/// The matrix's "injection-safe": either the handshake failed with no plaintext reply, or it
/// succeeded, nothing unsolicited arrives, and the next real command gets exactly one reply.
/// In both cases the injected commands never reach the backend.
async fn assert_injection_safe(
    proxy: &Proxy,
    backend: &Backend,
    segments: &[&[u8]],
    tag: &str,
    injected: &[&str],
) {
    let attempt = starttls_attempt(proxy, segments, tag).await;
    for line in &attempt.lines {
        for inj in injected {
            assert!(!line.starts_with(&format!("{inj} ")), "plaintext reply to {inj:?}: {:?}", attempt.lines);
        }
    }
    match attempt.tls {
        Err(_) => {
            // The handshake failed: whatever the proxy sent after the go-ahead is TLS.
            let heard = attempt.heard.lock().unwrap().clone();
            assert_no_plaintext_reply(&heard, injected);
        }
        Ok(mut t) => {
            assert_eq!(t.silent_for(QUIET).await, None, "unsolicited data after TLS");
            t.send("C NOOP\r\n").await;
            assert_eq!(t.line().await, "C OK NOOP completed\r\n");
            assert_eq!(t.silent_for(QUIET).await, None, "more than one reply to C NOOP");
            assert!(eventually(|| backend.all_text().contains("C NOOP\r\n")).await);
        }
    }
    let seen = backend.all_text();
    for inj in injected {
        assert!(!seen.contains(&format!("{inj} ")), "{inj:?} reached the backend: {seen:?}");
    }
}

/// A plain STARTTLS on "imap" and a TLS session; the backend is not contacted yet.
async fn upgraded(proxy: &Proxy) -> Conn<TlsClient> {
    let mut c = proxy.tcp("imap").await;
    assert_eq!(c.line().await, GREETING);
    c.send("a STARTTLS\r\n").await;
    assert_eq!(c.line().await, "a OK Begin TLS negotiation now\r\n");
    c.upgrade(&proxy.certs).await
}

// ---- injection -------------------------------------------------------------------------

// matrix #3
#[tokio::test]
async fn injected_noop_behind_starttls_never_executes() {
    let (backend, proxy) = start().await;
    assert_injection_safe(&proxy, &backend, &[b"A STARTTLS\r\nQZXKP NOOP\r\n"], "A", &["QZXKP"]).await;
    assert_eq!(Metrics::get(&proxy.metrics.starttls_injection_attempts), 1);
    proxy.stop().await;
}

// matrix #4
#[tokio::test]
async fn injected_noop_with_empty_line_behind_starttls_never_executes() {
    let (backend, proxy) = start().await;
    assert_injection_safe(&proxy, &backend, &[b"A STARTTLS\r\nAB12CD34 NOOP\r\n\r\n"], "A", &["AB12CD34"])
        .await;
    assert_eq!(Metrics::get(&proxy.metrics.starttls_injection_attempts), 1);
    proxy.stop().await;
}

// matrix #7
#[tokio::test]
async fn injected_login_and_append_behind_starttls_never_reach_backend() {
    let (backend, proxy) = start().await;
    let bytes = b"a STARTTLS\r\nb LOGIN evil pw\r\nc APPEND INBOX {500}\r\n";
    assert_injection_safe(&proxy, &backend, &[bytes], "a", &["b", "c"]).await;
    assert!(!backend.all_text().contains("evil"));
    assert_eq!(Metrics::get(&proxy.metrics.starttls_injection_attempts), 1);
    proxy.stop().await;
}

// matrix #8
#[tokio::test]
async fn command_in_second_quick_segment_after_starttls_never_executes() {
    let (backend, proxy) = start().await;
    let segments: [&[u8]; 2] = [b"a STARTTLS\r\n", b"QZXKP CAPABILITY\r\n"];
    assert_injection_safe(&proxy, &backend, &segments, "a", &["QZXKP"]).await;
    let segments: [&[u8]; 2] = [b"a STARTTLS\r\n", b"b LOGIN evil pw\r\n"];
    assert_injection_safe(&proxy, &backend, &segments, "a", &["b"]).await;
    assert!(!backend.all_text().contains("evil"));
    proxy.stop().await;
}

// matrix #9
#[tokio::test]
async fn starttls_case_framing_and_tag_variants_are_injection_safe() {
    let (backend, proxy) = start().await;
    let variants: [(&[u8], &str); 8] = [
        (b"a starttls\r\nQZXKP NOOP\r\n", "a"),
        (b"a StartTls\r\nQZXKP NOOP\r\n", "a"),
        (b"a STARTTLS\nQZXKP NOOP\n", "a"),
        (b"a starttls\nQZXKP NOOP\r\n", "a"),
        (b"a.b]1 STARTTLS\r\nQZXKP NOOP\r\n", "a.b]1"),
        (b"0 STARTTLS\r\nQZXKP NOOP\r\n", "0"),
        (b"x-y_z!#&' starttls\nQZXKP NOOP\n", "x-y_z!#&'"),
        (b"A001 STARTTLS\r\nQZXKP LOGIN evil pw\r\n", "A001"),
    ];
    for (i, (bytes, tag)) in variants.iter().enumerate() {
        assert_injection_safe(&proxy, &backend, &[bytes], tag, &["QZXKP"]).await;
        assert_eq!(Metrics::get(&proxy.metrics.starttls_injection_attempts), i as u64 + 1, "{bytes:?}");
    }
    proxy.stop().await;
}

/// The client side of a pipelined STARTTLS (RFC 9051 6.2.1): the first TLS write goes out
/// as ONE write with the STARTTLS command in front of it; on the read side the plaintext
/// go-ahead line is consumed (and checked) before any byte is handed to TLS.
struct Pipelined<S> {
    inner: S,
    command: Vec<u8>,
    /// The command and the first TLS bytes, as one buffer, while it is being written.
    first_write: Vec<u8>,
    first_write_done: usize,
    absorbed: usize,
    /// What was written in that first write, for the test to inspect.
    sent: Arc<Mutex<Vec<u8>>>,
    go_ahead: Vec<u8>,
    expected: Vec<u8>,
    /// Bytes read behind the go-ahead line (the start of the ServerHello).
    behind: Vec<u8>,
}

impl<S> Pipelined<S> {
    fn new(inner: S, command: &str, expected: &str, sent: Arc<Mutex<Vec<u8>>>) -> Self {
        Pipelined {
            inner,
            command: command.as_bytes().to_vec(),
            first_write: Vec::new(),
            first_write_done: 0,
            absorbed: 0,
            sent,
            go_ahead: Vec::new(),
            expected: expected.as_bytes().to_vec(),
            behind: Vec::new(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Pipelined<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while !this.go_ahead.ends_with(b"\n") {
            let mut chunk = [0u8; 512];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Poll::Ready(Err(io::Error::other("EOF before the STARTTLS go-ahead")))
                }
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    match got.iter().position(|&b| b == b'\n') {
                        Some(lf) => {
                            this.go_ahead.extend_from_slice(&got[..=lf]);
                            this.behind.extend_from_slice(&got[lf + 1..]);
                        }
                        None => this.go_ahead.extend_from_slice(got),
                    }
                }
            }
            if this.go_ahead.ends_with(b"\n") && this.go_ahead != this.expected {
                let line = String::from_utf8_lossy(&this.go_ahead).into_owned();
                return Poll::Ready(Err(io::Error::other(format!("unexpected STARTTLS reply {line:?}"))));
            }
        }
        if !this.behind.is_empty() {
            let n = this.behind.len().min(buf.remaining());
            buf.put_slice(&this.behind[..n]);
            this.behind.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Pipelined<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.command.is_empty() && this.first_write.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if this.first_write.is_empty() {
            this.first_write = std::mem::take(&mut this.command);
            this.first_write.extend_from_slice(buf);
            this.absorbed = buf.len();
            *this.sent.lock().unwrap() = this.first_write.clone();
        }
        while this.first_write_done < this.first_write.len() {
            let rest = &this.first_write[this.first_write_done..];
            match Pin::new(&mut this.inner).poll_write(cx, rest) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(n)) => this.first_write_done += n,
            }
        }
        this.first_write.clear();
        Poll::Ready(Ok(this.absorbed))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// matrix #10
#[tokio::test]
async fn client_hello_in_the_same_write_as_starttls_completes_the_handshake() {
    let (backend, proxy) = start().await;
    let mut c = proxy.tcp("imap").await;
    assert_eq!(c.line().await, GREETING);
    let tcp = c.into_inner();
    tcp.set_nodelay(true).unwrap();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let stream = Pipelined::new(tcp, "a STARTTLS\r\n", "a OK Begin TLS negotiation now\r\n", sent.clone());
    let tls = client_tls(stream, &proxy).await.expect("pipelined STARTTLS + ClientHello handshake");
    // The honest part: the ClientHello really went out right behind the command, in one write.
    let first = sent.lock().unwrap().clone();
    assert!(first.starts_with(b"a STARTTLS\r\n\x16\x03"), "first write: {first:?}");
    assert!(first.len() > 12 + 40, "a whole ClientHello followed the command");
    let mut t = Conn::new(tls);
    assert_eq!(t.silent_for(QUIET).await, None, "unsolicited data after TLS");
    t.send("b CAPABILITY\r\n").await;
    assert_eq!(t.line().await, TLS_CAPABILITY);
    assert_eq!(t.line().await, "b OK Pre-login capabilities listed\r\n");
    assert_eq!(backend.connections(), 1);
    assert_eq!(backend.seen(0).text(), "b CAPABILITY\r\n");
    assert_eq!(Metrics::get(&proxy.metrics.starttls_upgrades), 1);
    assert_eq!(Metrics::get(&proxy.metrics.starttls_injection_attempts), 0, "a ClientHello is no injection");
    proxy.stop().await;
}

// matrix #12
#[tokio::test]
async fn pipelined_capability_then_starttls_both_answered_and_tls_works() {
    let (backend, proxy) = start().await;
    let attempt = starttls_attempt(&proxy, &[b"a CAPABILITY\r\nb STARTTLS\r\n"], "b").await;
    assert_eq!(
        attempt.lines,
        [
            "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n",
            "a OK CAPABILITY completed\r\n",
            "b OK Begin TLS negotiation now\r\n"
        ]
    );
    let mut t = attempt.tls.expect("TLS after pipelined CAPABILITY + STARTTLS");
    assert_eq!(t.silent_for(QUIET).await, None);
    t.send("c NOOP\r\n").await;
    assert_eq!(t.line().await, "c OK NOOP completed\r\n");
    assert_eq!(backend.seen(0).text(), "c NOOP\r\n");
    assert_eq!(Metrics::get(&proxy.metrics.starttls_injection_attempts), 0);
    proxy.stop().await;
}

// ---- before TLS ------------------------------------------------------------------------

// matrix #17
#[tokio::test]
async fn plaintext_greeting_and_capability_offer_starttls_and_logindisabled_only() {
    let (backend, proxy) = start().await;
    let mut c = proxy.tcp("imap").await;
    let greeting = c.line().await;
    assert_eq!(greeting, GREETING);
    assert!(!greeting.contains("PREAUTH") && !greeting.contains("ALERT"));
    c.send("a CAPABILITY\r\n").await;
    let caps = c.line().await;
    assert_eq!(caps, "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n");
    assert!(!caps.contains("AUTH="));
    assert_eq!(c.line().await, "a OK CAPABILITY completed\r\n");
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

// matrix #18
#[tokio::test]
async fn login_before_tls_is_refused_and_backend_not_contacted() {
    let (backend, proxy) = start().await;
    let mut c = proxy.tcp("imap").await;
    assert_eq!(c.line().await, GREETING);
    c.send("a LOGIN alice secret\r\n").await;
    assert_eq!(c.line().await, format!("a {PRIVACY}"));
    c.send("b NOOP\r\n").await;
    assert_eq!(c.line().await, "b OK NOOP completed\r\n");
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

// matrix #19
#[tokio::test]
async fn authenticate_before_tls_never_gets_a_continuation() {
    let (backend, proxy) = start().await;
    let mut c = proxy.tcp("imap").await;
    assert_eq!(c.line().await, GREETING);
    c.send("a AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, format!("a {PRIVACY}"));
    c.send("b AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n").await;
    assert_eq!(c.line().await, format!("b {PRIVACY}"));
    c.send("c NOOP\r\n").await;
    assert_eq!(c.line().await, "c OK NOOP completed\r\n");
    assert_eq!(c.silent_for(QUIET).await, None);
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

// matrix #20
#[tokio::test]
async fn login_literals_before_tls_are_refused_once_and_never_parsed_as_commands() {
    let (backend, proxy) = start().await;
    let mut c = proxy.tcp("imap").await;
    assert_eq!(c.line().await, GREETING);
    c.send("a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n").await;
    assert_eq!(c.line().await, format!("a {PRIVACY}"));
    // Literal bytes that look like a STARTTLS command are data, not a command.
    c.send("b LOGIN {12+}\r\nq STARTTLS\r\n {6+}\r\nsecret\r\n").await;
    assert_eq!(c.line().await, format!("b {PRIVACY}"));
    // A synchronizing literal is refused at once: never a `+`.
    c.send("d LOGIN {5}\r\n").await;
    assert_eq!(c.line().await, format!("d {PRIVACY}"));
    c.send("e NOOP\r\n").await;
    assert_eq!(c.line().await, "e OK NOOP completed\r\n");
    assert_eq!(c.silent_for(QUIET).await, None);
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

// matrix #23
#[tokio::test]
async fn select_before_tls_is_bad_and_not_forwarded() {
    let (backend, proxy) = start().await;
    let mut c = proxy.tcp("imap").await;
    assert_eq!(c.line().await, GREETING);
    c.send("a SELECT INBOX\r\n").await;
    assert_eq!(c.line().await, "a BAD Command not permitted before STARTTLS\r\n");
    c.send("b NOOP\r\n").await;
    assert_eq!(c.line().await, "b OK NOOP completed\r\n");
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

// matrix #24
#[tokio::test]
async fn starttls_with_arguments_is_bad_and_no_tls_starts() {
    let (backend, proxy) = start().await;
    let mut c = proxy.tcp("imap").await;
    assert_eq!(c.line().await, GREETING);
    c.send("a STARTTLS x\r\n").await;
    assert_eq!(c.line().await, "a BAD STARTTLS takes no arguments\r\n");
    c.send("b STARTTLS \r\n").await;
    assert_eq!(c.line().await, "b BAD STARTTLS takes no arguments\r\n");
    // Still plaintext: a command is answered in plaintext, and a proper STARTTLS still works.
    c.send("c NOOP\r\n").await;
    assert_eq!(c.line().await, "c OK NOOP completed\r\n");
    c.send("d STARTTLS\r\n").await;
    assert_eq!(c.line().await, "d OK Begin TLS negotiation now\r\n");
    let mut t = c.upgrade(&proxy.certs).await;
    t.send("e NOOP\r\n").await;
    assert_eq!(t.line().await, "e OK NOOP completed\r\n");
    assert_eq!(backend.seen(0).text(), "e NOOP\r\n");
    assert_eq!(Metrics::get(&proxy.metrics.starttls_upgrades), 1);
    proxy.stop().await;
}

// ---- after TLS -------------------------------------------------------------------------

// matrix #27
#[tokio::test]
async fn after_starttls_greeting_swallowed_capabilities_filtered_and_login_works() {
    let (backend, proxy) = start().await;
    let mut t = upgraded(&proxy).await;
    // The backend is connected (and greets) right after the handshake; nothing reaches us.
    assert!(eventually(|| backend.connections() == 1).await);
    assert_eq!(t.silent_for(QUIET).await, None, "backend greeting replayed");
    t.send("a CAPABILITY\r\n").await;
    let caps = t.line().await;
    assert_eq!(caps, TLS_CAPABILITY);
    assert!(!caps.contains("STARTTLS") && !caps.contains("LOGINDISABLED"));
    assert_eq!(t.line().await, "a OK Pre-login capabilities listed\r\n");
    t.send("b LOGIN alice secret\r\n").await;
    let ok = t.line().await;
    assert_eq!(ok, "b OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n");
    let seen = backend.seen(0);
    assert!(seen.header.starts_with(b"\r\n\r\n\0\r\nQUIT\n"));
    assert_eq!(seen.text(), "a CAPABILITY\r\nb LOGIN alice secret\r\n");
    proxy.stop().await;
}

// Intended behaviour: after a successful LOGIN the session is in the bulk phase, an opaque
// relay. A STARTTLS sent then is no longer intercepted by mailtls; it reaches the backend
// as any other command, and the backend answers it (here: BAD).
#[tokio::test]
async fn starttls_after_login_is_relayed_opaquely_to_backend() {
    let (backend, proxy) = start().await;
    let mut t = upgraded(&proxy).await;
    t.send("a LOGIN alice secret\r\n").await;
    assert!(t.line().await.starts_with("a OK "));
    t.send("b STARTTLS\r\n").await;
    assert_eq!(t.line().await, "b BAD Error in IMAP command\r\n", "the backend's answer, not mailtls's");
    assert_eq!(backend.seen(0).text(), "a LOGIN alice secret\r\nb STARTTLS\r\n");
    proxy.stop().await;
}

#[tokio::test]
async fn login_after_starttls_then_bulk_bytes_are_relayed_both_ways() {
    let (backend, proxy) = start().await;
    let mut t = upgraded(&proxy).await;
    t.send("a LOGIN echo x\r\n").await;
    assert!(t.line().await.starts_with("a OK "));
    let bulk: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(t.into_inner());
    let to_send = bulk.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await.unwrap();
        w.flush().await.unwrap();
        w
    });
    let mut back = vec![0u8; bulk.len()];
    tokio::time::timeout(PATIENCE, r.read_exact(&mut back)).await.expect("echo in time").unwrap();
    assert!(back == bulk, "bulk bytes came back altered");
    let _w = writer.await.unwrap();
    assert_eq!(backend.seen(0).data.len(), "a LOGIN echo x\r\n".len() + bulk.len());
    proxy.stop().await;
}

#[tokio::test]
async fn authenticate_after_tls_relays_continuation_and_sasl_line_verbatim() {
    let (backend, proxy) = start().await;
    let mut t = upgraded(&proxy).await;
    t.send("a AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(t.line().await, "+ \r\n");
    // SASL data that happens to read like a STARTTLS command is data, not a command.
    t.send("a STARTTLS\r\n").await;
    assert_eq!(t.line().await, "a OK Logged in\r\n", "the backend's answer, not a local BAD");
    assert_eq!(backend.seen(0).text(), "a AUTHENTICATE PLAIN\r\na STARTTLS\r\n");
    proxy.stop().await;
}

// matrix #29
#[tokio::test]
async fn implicit_tls_greeting_arrives_without_starttls() {
    let (backend, proxy) = start_imaps().await;
    let mut t = proxy.tls("imaps").await;
    assert_eq!(t.line().await, IMAPS_GREETING);
    t.send("a CAPABILITY\r\n").await;
    assert_eq!(t.line().await, TLS_CAPABILITY);
    assert_eq!(t.line().await, "a OK Pre-login capabilities listed\r\n");
    t.send("b LOGIN alice secret\r\n").await;
    let ok = t.line().await;
    assert_eq!(ok, "b OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n");
    assert_eq!(backend.seen(0).text(), "a CAPABILITY\r\nb LOGIN alice secret\r\n");
    proxy.stop().await;
}

// matrix #31
#[tokio::test]
async fn starttls_inside_tls_is_bad_locally_and_never_forwarded() {
    let (backend, proxy) = start().await;
    let mut t = upgraded(&proxy).await;
    t.send("a STARTTLS\r\n").await;
    assert_eq!(t.line().await, "a BAD TLS is already active\r\n");
    t.send("b NOOP\r\n").await;
    assert_eq!(t.line().await, "b OK NOOP completed\r\n");

    let imaps = proxy_for(&backend, "imaps").await;
    let mut s = imaps.tls("imaps").await;
    assert_eq!(s.line().await, IMAPS_GREETING);
    s.send("c starttls\r\n").await;
    assert_eq!(s.line().await, "c BAD TLS is already active\r\n");
    s.send("d NOOP\r\n").await;
    assert_eq!(s.line().await, "d OK NOOP completed\r\n");

    assert_eq!(backend.connections(), 2);
    assert_eq!(backend.seen(0).text(), "b NOOP\r\n");
    assert_eq!(backend.seen(1).text(), "d NOOP\r\n");
    proxy.stop().await;
    imaps.stop().await;
}

// ---- bounds and hostile bytes ------------------------------------------------------------

// matrix #35
#[tokio::test]
async fn overlong_lines_never_yield_a_starttls_go_ahead() {
    let (backend, proxy) = start().await;
    for l in [512usize, 1000, 2048, 4096, 8192] {
        // The matrix's form, and an IMAP form whose first L bytes end right before a
        // complete tagged STARTTLS (what a proxy that split lines at L would execute).
        let matrix = format!("NOOP {}STARTTLS\r\n", "A".repeat(l - 5));
        let tagged = format!("a NOOP {}b STARTTLS\r\n", "A".repeat(l - 7));
        for payload in [matrix, tagged] {
            let mut c = proxy.tcp("imap").await;
            assert_eq!(c.line().await, GREETING);
            c.send(&payload).await;
            let reply = c.line().await;
            assert!(!reply.contains("Begin TLS") && !reply.starts_with("b "), "L={l}: {reply:?}");
            if reply.starts_with("* BYE") {
                assert!(c.closed_within(PATIENCE).await, "L={l}: open after {reply:?}");
            } else {
                // Answered as one line; the very next reply belongs to the next command.
                assert!(reply.starts_with("NOOP BAD ") || reply.starts_with("a OK "), "L={l}: {reply:?}");
                c.send("z NOOP\r\n").await;
                assert_eq!(c.line().await, "z OK NOOP completed\r\n", "L={l}");
            }
        }
    }
    assert_eq!(Metrics::get(&proxy.metrics.starttls_upgrades), 0);
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

// matrix #36
#[tokio::test]
async fn literal_of_four_gigabytes_is_refused_and_closed() {
    let (backend, proxy) = start().await;
    for line in
        ["a LOGIN {4294967296}\r\n", "a LOGIN {4294967296+}\r\n", "a LOGIN {99999999999999999999}\r\n"]
    {
        let mut c = proxy.tcp("imap").await;
        assert_eq!(c.line().await, GREETING);
        c.send(line).await;
        let reply = c.line().await;
        assert!(reply.starts_with("* BYE") || reply.starts_with("a BAD"), "{line:?}: {reply:?}");
        assert!(!reply.starts_with('+'));
        if reply.starts_with("* BYE") {
            assert!(c.closed_within(PATIENCE).await, "{line:?}");
        }
    }
    // Inside TLS before login the same bound holds, and nothing is forwarded.
    let imaps = proxy_for(&backend, "imaps").await;
    let mut t = imaps.tls("imaps").await;
    assert_eq!(t.line().await, IMAPS_GREETING);
    t.send("a LOGIN {4294967296}\r\n").await;
    let reply = t.line().await;
    assert!(reply.starts_with("* BYE") || reply.starts_with("a BAD"), "{reply:?}");
    assert!(!backend.all_text().contains("4294967296"));
    proxy.stop().await;
    imaps.stop().await;
}

// matrix #37
#[tokio::test]
async fn plaintext_after_the_go_ahead_fails_the_handshake_without_a_reply() {
    let (backend, proxy) = start().await;
    let http: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
    let nuls: &[u8] = &[0u8; 64];
    for garbage in [http, nuls] {
        let mut tcp = TcpStream::connect(proxy.addr("imap")).await.unwrap();
        assert_eq!(raw_line(&mut tcp).await.as_deref(), Some(GREETING));
        tcp.write_all(b"a STARTTLS\r\n").await.unwrap();
        assert_eq!(raw_line(&mut tcp).await.as_deref(), Some("a OK Begin TLS negotiation now\r\n"));
        tcp.write_all(garbage).await.unwrap();
        let (heard, closed) = raw_rest(&mut tcp).await;
        assert!(closed, "still open after {garbage:?}");
        assert_no_plaintext_reply(&heard, &["GET", "HTTP", "a ", "*"]);
    }
    assert_eq!(backend.connections(), 0);
    assert_eq!(Metrics::get(&proxy.metrics.handshakes_failed), 2);
    proxy.stop().await;
}

// matrix #41
#[tokio::test]
async fn plaintext_command_on_implicit_tls_port_gets_no_reply_and_is_closed() {
    let (backend, proxy) = start_imaps().await;
    let mut tcp = TcpStream::connect(proxy.addr("imaps")).await.unwrap();
    tcp.write_all(b"a CAPABILITY\r\n").await.unwrap();
    let (heard, closed) = raw_rest(&mut tcp).await;
    assert!(closed, "implicit TLS port stayed open after plaintext");
    assert_no_plaintext_reply(&heard, &["a ", "*", "CAPABILITY"]);
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

// Not a matrix row: port 143's and 993's roles side by side in one proxy, as in the design's
// example config. Every test listener listens on 127.0.0.1:0 (an ephemeral port), so two
// listeners share that text without sharing a socket.
#[tokio::test]
async fn starttls_and_implicit_listeners_share_one_proxy() {
    let backend = Backend::start(Script::Imap).await;
    let proxy = Proxy::start_with(
        &[
            Listener::new("imap", "imap", "starttls", backend.addr),
            Listener::new("imaps", "imap", "implicit", backend.addr),
        ],
        TIMEOUTS,
    )
    .await;
    let mut t = upgraded(&proxy).await;
    t.send("a NOOP\r\n").await;
    assert_eq!(t.line().await, "a OK NOOP completed\r\n");
    let mut s = proxy.tls("imaps").await;
    assert_eq!(s.line().await, IMAPS_GREETING);
    proxy.stop().await;
}

// matrix #46 (IMAP): an ID naming an originating address never reaches the backend as
// such; the backend gets `ID NIL`, answers it, and the client still gets an ID reply.
#[tokio::test]
async fn id_with_an_originating_address_reaches_the_backend_as_id_nil() {
    let (backend, proxy) = start_imaps().await;
    let mut t = proxy.tls("imaps").await;
    assert_eq!(t.line().await, IMAPS_GREETING);
    t.send("a ID (\"name\" \"evil\" \"x-originating-ip\" \"192.0.2.99\")\r\n").await;
    assert_eq!(t.line().await, "* ID (\"name\" \"Dovecot\")\r\n");
    assert_eq!(t.line().await, "a OK ID completed\r\n");
    t.send("b ID (\"name\" \"Thunderbird\")\r\n").await;
    assert_eq!(t.line().await, "* ID (\"name\" \"Dovecot\")\r\n");
    assert_eq!(t.line().await, "b OK ID completed\r\n");
    assert_eq!(backend.seen(0).text(), "a ID NIL\r\nb ID (\"name\" \"Thunderbird\")\r\n");
    proxy.stop().await;
}

// ---- commands and ID fields by which a trusted proxy names its client (issue 19) ---------

/// Every ID field Dovecot takes from a trusted proxy, one ID each (the escaped one is read
/// by Dovecot as `x-originating-ip`).
const TRUSTED_ID_FIELDS: [&str; 9] = [
    "\"x-originating-ip\" \"203.0.113.77\"",
    "\"x-originating-port\" \"4343\"",
    "\"x-connected-ip\" \"203.0.113.78\"",
    "\"x-connected-port\" \"4344\"",
    "\"x-proxy-ttl\" \"1\"",
    "\"x-session-id\" \"forged\"",
    "\"x-session-ext-id\" \"forged\"",
    "\"x-forward-user\" \"root\"",
    "\"x-originating\\-ip\" \"203.0.113.77\"",
];

#[tokio::test]
async fn client_xclient_and_trusted_id_fields_on_imaps_never_reach_the_backend() {
    let backend = Backend::start(Script::ImapTrusting).await;
    let proxy = proxy_for(&backend, "imaps").await;
    let mut t = proxy.tls("imaps").await;
    assert_eq!(t.line().await, IMAPS_GREETING, "XCLIENT is gone from the greeting's capabilities");
    t.send("a CAPABILITY\r\n").await;
    assert_eq!(t.line().await, TLS_CAPABILITY, "and from CAPABILITY");
    assert_eq!(t.line().await, "a OK Pre-login capabilities listed\r\n");
    t.send("b XCLIENT ADDR=203.0.113.77\r\n").await;
    assert_eq!(t.line().await, "b BAD Command not permitted: only the proxy may name the client\r\n");
    for (i, field) in TRUSTED_ID_FIELDS.iter().enumerate() {
        t.send(format!("i{i} ID (\"name\" \"mutt\" {field})\r\n")).await;
        assert_eq!(t.line().await, "* ID (\"name\" \"Dovecot\")\r\n");
        assert_eq!(t.line().await, format!("i{i} OK ID completed\r\n"));
    }
    let seen = backend.seen(0).text();
    let expected: String = (0..TRUSTED_ID_FIELDS.len()).map(|i| format!("i{i} ID NIL\r\n")).collect();
    assert_eq!(seen, format!("a CAPABILITY\r\n{expected}"));
    proxy.stop().await;
}

#[tokio::test]
async fn trusted_id_fields_after_starttls_reach_the_backend_as_id_nil() {
    let backend = Backend::start(Script::ImapTrusting).await;
    let proxy = proxy_for(&backend, "imap").await;
    let mut t = upgraded(&proxy).await;
    t.send("a ID (\"x-forward-user\" \"root\" \"x-originating-ip\" \"203.0.113.77\")\r\n").await;
    assert_eq!(t.line().await, "* ID (\"name\" \"Dovecot\")\r\n");
    assert_eq!(t.line().await, "a OK ID completed\r\n");
    t.send("b XCLIENT ADDR=203.0.113.77\r\n").await;
    assert!(t.line().await.starts_with("b BAD Command not permitted"));
    assert_eq!(backend.seen(0).text(), "a ID NIL\r\n");
    proxy.stop().await;
}

#[tokio::test]
async fn xclient_setting_names_the_real_client_to_the_imap_backend_with_id() {
    let backend = Backend::start_without_header(Script::Imap).await;
    let listener = Listener::new("imaps", "imap", "implicit", backend.addr).proxy("none");
    let proxy = Proxy::start_edited(&[listener], TIMEOUTS, |text| {
        text.replace("proxy_protocol = \"none\"", "proxy_protocol = \"none\"\nxclient = true")
    })
    .await;
    let tcp = TcpStream::connect(proxy.addr("imaps")).await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let mut t = Conn::new(tls_handshake(tcp, &proxy.certs).await.unwrap());
    assert_eq!(t.line().await, IMAPS_GREETING, "the ID's answer is swallowed, the greeting relayed");
    t.send("a ID (\"x-originating-ip\" \"203.0.113.77\")\r\n").await;
    assert_eq!(t.line().await, "* ID (\"name\" \"Dovecot\")\r\n");
    assert_eq!(t.line().await, "a OK ID completed\r\n");
    let own =
        format!("mailtls ID (\"x-originating-ip\" \"127.0.0.1\" \"x-originating-port\" \"{port}\")\r\n");
    assert_eq!(backend.seen(0).text(), format!("{own}a ID NIL\r\n"));
    proxy.stop().await;
}
