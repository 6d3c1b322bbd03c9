//! POP3 on "pop3" (STLS, port-110 role) and "pop3s" (implicit TLS, port-995 role): the
//! dialogue before TLS, STLS command injection, the negotiation after TLS and the relay.

mod common;

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use common::*;
use mailtls::metrics::Metrics;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

const GO_AHEAD: &str = "+OK Begin TLS negotiation\r\n";
const QUIET: Duration = Duration::from_millis(300);

async fn pop3_proxy(backend: &Backend) -> Proxy {
    Proxy::start(&[Listener::new("pop3", "pop3", "starttls", backend.addr)]).await
}

async fn pop3s_proxy(backend: &Backend) -> Proxy {
    Proxy::start(&[Listener::new("pop3s", "pop3", "implicit", backend.addr)]).await
}

/// A plaintext connection to "pop3" whose greeting has been read and checked.
async fn greeted(proxy: &Proxy) -> Conn<TcpStream> {
    let mut c = proxy.tcp("pop3").await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("+OK "), "{greeting:?}");
    c
}

/// STLS, the go-ahead, and the handshake on a greeted connection.
async fn upgraded(proxy: &Proxy) -> Conn<TlsClient> {
    let mut c = greeted(proxy).await;
    c.send("STLS\r\n").await;
    assert_eq!(c.line().await, GO_AHEAD);
    c.upgrade(&proxy.certs).await
}

/// A dot-terminated POP3 list, status line first.
async fn pop3_list<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Conn<S>) -> Vec<String> {
    c.lines_until(|l| l == ".\r\n").await
}

/// One line read byte by byte, so that nothing behind it (a TLS alert, the ServerHello) is
/// consumed from the socket. Empty on EOF or after PATIENCE.
async fn raw_line(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while let Ok(Ok(1)) = tokio::time::timeout(PATIENCE, tcp.read(&mut byte)).await {
        out.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn raw_send(tcp: &mut TcpStream, bytes: &[u8]) {
    tcp.write_all(bytes).await.expect("write to proxy");
    tcp.flush().await.expect("flush to proxy");
}

/// Sends `writes` on "pop3" right after the greeting without reading in between (the
/// first holds STLS), then takes the go-ahead and attempts TLS. Checks that the result is
/// injection-safe: either the handshake fails and the backend is never contacted, or the
/// session is quiet and the client's own first command (`USER u`) gets the first and only
/// reply. In both cases `injected` never reaches the backend. True when TLS came up.
async fn assert_stls_injection_safe(
    proxy: &Proxy,
    backend: &Backend,
    writes: &[&[u8]],
    injected: &str,
) -> bool {
    let mut tcp = TcpStream::connect(proxy.addr("pop3")).await.unwrap();
    let greeting = raw_line(&mut tcp).await;
    assert!(greeting.starts_with("+OK "), "{greeting:?}");
    for w in writes {
        raw_send(&mut tcp, w).await;
    }
    let go_ahead = raw_line(&mut tcp).await;
    assert_eq!(go_ahead, GO_AHEAD, "writes {writes:?}");
    assert_eq!(backend.connections(), 0, "backend contacted before the handshake");
    // Before our ClientHello the proxy may send nothing but a TLS alert (its rustls
    // rejecting the plaintext): never a POP3 reply to the injected command.
    let mut peeked = [0u8; 64];
    if let Ok(Ok(n)) = tokio::time::timeout(QUIET, tcp.peek(&mut peeked)).await {
        assert!(
            n == 0 || peeked[0] == 0x15,
            "plaintext after the go-ahead ({writes:?}): {:?}",
            String::from_utf8_lossy(&peeked[..n])
        );
    }
    let upgraded = match tls_handshake(tcp, &proxy.certs).await {
        Err(_) => {
            // The plaintext was fed to rustls and failed the handshake; give a wrongly
            // started backend session the chance to show up before checking.
            tokio::time::sleep(QUIET).await;
            assert_eq!(backend.connections(), 0, "backend contacted although TLS failed");
            false
        }
        Ok(tls) => {
            let mut t = Conn::new(tls);
            assert_eq!(t.silent_for(QUIET).await, None, "unsolicited data after TLS ({writes:?})");
            t.send("USER u\r\n").await;
            assert_eq!(t.line().await, "+OK\r\n", "first reply after TLS must answer USER");
            assert_eq!(t.silent_for(QUIET).await, None, "a second reply arrived ({writes:?})");
            assert_eq!(backend.connections(), 1);
            assert_eq!(backend.seen(0).text(), "USER u\r\n");
            true
        }
    };
    let all = backend.all_text();
    assert!(!all.contains(injected), "injected {injected:?} reached the backend: {all:?}");
    upgraded
}

// ---- injection -------------------------------------------------------------------------

// matrix #5
#[tokio::test]
async fn stls_with_capa_in_the_same_write_is_injection_safe() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let upgraded = assert_stls_injection_safe(&proxy, &backend, &[b"STLS\r\nCAPA\r\n"], "CAPA").await;
    assert!(!upgraded, "plaintext behind STLS must fail the handshake");
    assert_eq!(Metrics::get(&proxy.metrics.starttls_injection_attempts), 1);
    proxy.stop().await;
}

// matrix #5 (credentials as the injected command)
#[tokio::test]
async fn stls_with_user_pass_in_the_same_write_never_reaches_backend() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    assert_stls_injection_safe(&proxy, &backend, &[b"STLS\r\nUSER evil\r\nPASS evil\r\n"], "evil").await;
    assert_eq!(Metrics::get(&proxy.metrics.starttls_injection_attempts), 1);
    proxy.stop().await;
}

// matrix #8
#[tokio::test]
async fn stls_then_user_in_a_second_quick_write_is_injection_safe() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    for _ in 0..5 {
        assert_stls_injection_safe(&proxy, &backend, &[b"STLS\r\n", b"USER evil\r\n"], "evil").await;
    }
    assert_eq!(backend.connections(), 0);
    // Counted whether the second write arrived with the command or after the go-ahead.
    let counter = &proxy.metrics.starttls_injection_attempts;
    assert!(eventually(|| Metrics::get(counter) == 5).await, "counted {}", Metrics::get(counter));
    proxy.stop().await;
}

// matrix #9 (POP3 variants: case, bare LF, trailing blank)
#[tokio::test]
async fn stls_case_and_framing_variants_with_injection_are_safe() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let variants: [&[u8]; 6] = [
        b"stls\r\nUSER evil\r\n",
        b"Stls\r\nCAPA\r\nUSER evil\r\n",
        b"STLS\nUSER evil\n",
        b"stls\nUSER evil\r\n",
        b"STLS \r\nUSER evil\r\n",
        b"STLS\r\nUSER evil\r\n\r\n",
    ];
    for v in variants {
        let upgraded = assert_stls_injection_safe(&proxy, &backend, &[v], "evil").await;
        assert!(!upgraded, "plaintext behind {v:?} must fail the handshake");
    }
    assert_eq!(Metrics::get(&proxy.metrics.starttls_injection_attempts), variants.len() as u64);
    proxy.stop().await;
}

// matrix #9 (the same variants without injection must upgrade normally)
#[tokio::test]
async fn stls_in_lower_case_bare_lf_and_trailing_blank_starts_tls() {
    for v in [&b"stls\r\n"[..], b"STLS\n", b"sTlS\n", b"STLS \r\n"] {
        let backend = Backend::start(Script::Pop3).await;
        let proxy = pop3_proxy(&backend).await;
        assert!(assert_stls_injection_safe(&proxy, &backend, &[v], "evil").await, "{v:?} must start TLS");
        assert_eq!(Metrics::get(&proxy.metrics.starttls_injection_attempts), 0, "{v:?}");
        proxy.stop().await;
    }
}

/// A client stream that puts `STLS\r\n` in front of its first write (so STLS and the
/// ClientHello go out in one segment) and strips the go-ahead line from the first read.
struct PipelinedStls {
    inner: TcpStream,
    pending: Vec<u8>,
    prefixed: bool,
    go_ahead: Vec<u8>,
}

impl AsyncWrite for PipelinedStls {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.prefixed && this.pending.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if !this.prefixed {
            this.prefixed = true;
            this.pending = [&b"STLS\r\n"[..], buf].concat();
        }
        while !this.pending.is_empty() {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &this.pending))?;
            this.pending.drain(..n);
        }
        // The first call reports the caller's whole buffer written once the prefix is out.
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for PipelinedStls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.go_ahead.last() != Some(&b'\n') {
            let mut byte = [0u8; 1];
            let mut one = ReadBuf::new(&mut byte);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut one))?;
            if one.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.go_ahead.push(byte[0]);
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

// matrix #10 (POP3 analogue): bytes behind STLS are the first bytes of the handshake
#[tokio::test]
async fn stls_and_client_hello_in_one_write_handshake_and_first_reply_answers_user() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let mut tcp = TcpStream::connect(proxy.addr("pop3")).await.unwrap();
    assert!(raw_line(&mut tcp).await.starts_with("+OK "));
    let stream = PipelinedStls { inner: tcp, pending: Vec::new(), prefixed: false, go_ahead: Vec::new() };
    let connector = tokio_rustls::TlsConnector::from(client_config(&proxy.certs));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(PATIENCE, connector.connect(name, stream))
        .await
        .expect("handshake in time")
        .expect("STLS with a pipelined ClientHello must handshake");
    assert_eq!(tls.get_ref().0.go_ahead, GO_AHEAD.as_bytes());
    let mut t = Conn::new(tls);
    assert_eq!(t.silent_for(QUIET).await, None, "nothing unsolicited after TLS");
    t.send("USER u\r\n").await;
    assert_eq!(t.line().await, "+OK\r\n");
    assert_eq!(backend.seen(0).text(), "USER u\r\n");
    assert_eq!(Metrics::get(&proxy.metrics.starttls_injection_attempts), 0, "a ClientHello is no injection");
    proxy.stop().await;
}

// ---- before TLS --------------------------------------------------------------------------

// matrix #21
#[tokio::test]
async fn capa_before_tls_lists_stls_and_no_user_or_sasl() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let mut c = greeted(&proxy).await;
    c.send("CAPA\r\n").await;
    let capa = pop3_list(&mut c).await;
    assert!(capa[0].starts_with("+OK"), "{capa:?}");
    let keywords: Vec<String> =
        capa[1..].iter().map(|l| l.split_whitespace().next().unwrap_or("").to_ascii_uppercase()).collect();
    assert!(keywords.iter().any(|k| k == "STLS"), "{capa:?}");
    assert!(!keywords.iter().any(|k| k == "USER" || k == "SASL"), "{capa:?}");
    let text = capa.concat().to_ascii_uppercase();
    assert!(!text.contains("PLAIN") && !text.contains("LOGIN"), "{capa:?}");
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

// matrix #22
#[tokio::test]
async fn login_commands_before_tls_get_err_auth_and_never_a_continuation() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let mut c = proxy.tcp("pop3").await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("+OK "), "{greeting:?}");
    assert!(!greeting.contains('<') && !greeting.contains('>'), "APOP timestamp in {greeting:?}");
    for command in [
        "USER alice\r\n",
        "PASS secret\r\n",
        "AUTH PLAIN\r\n",
        "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
        "APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n",
    ] {
        c.send(command).await;
        let reply = c.line().await;
        assert!(reply.starts_with("-ERR [AUTH] "), "{command:?} -> {reply:?}");
        assert_eq!(c.silent_for(Duration::from_millis(100)).await, None, "a second reply to {command:?}");
    }
    // The session is still alive and speaking POP3.
    c.send("CAPA\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

// matrix #24
#[tokio::test]
async fn stls_with_an_argument_is_refused_and_session_continues() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let mut c = greeted(&proxy).await;
    c.send("STLS x\r\n").await;
    let reply = c.line().await;
    assert!(reply.starts_with("-ERR"), "{reply:?}");
    assert_eq!(c.silent_for(QUIET).await, None, "no TLS may start after a refused STLS");
    // A plain STLS still works afterwards.
    c.send("STLS\r\n").await;
    assert_eq!(c.line().await, GO_AHEAD);
    let mut t = c.upgrade(&proxy.certs).await;
    t.send("USER u\r\n").await;
    assert_eq!(t.line().await, "+OK\r\n");
    assert_eq!(backend.seen(0).text(), "USER u\r\n");
    proxy.stop().await;
}

#[tokio::test]
async fn credentials_typed_before_tls_never_reach_backend() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let mut c = greeted(&proxy).await;
    for command in ["USER alice\r\n", "PASS hunter2\r\n", "AUTH PLAIN AGFsaWNlAGh1bnRlcjI=\r\n"] {
        c.send(command).await;
        assert!(c.line().await.starts_with("-ERR [AUTH]"));
    }
    c.send("STLS\r\n").await;
    assert_eq!(c.line().await, GO_AHEAD);
    assert_eq!(backend.connections(), 0, "backend contacted before the handshake");
    let mut t = c.upgrade(&proxy.certs).await;
    t.send("USER bob\r\n").await;
    assert_eq!(t.line().await, "+OK\r\n");
    t.send("PASS pw\r\n").await;
    assert!(t.line().await.starts_with("+OK Logged in"));
    t.send("STAT\r\n").await;
    assert_eq!(t.line().await, "+OK 0 0\r\n");
    assert_eq!(backend.connections(), 1);
    let seen = backend.seen(0).text();
    assert_eq!(seen, "USER bob\r\nPASS pw\r\nSTAT\r\n");
    for secret in ["alice", "hunter2", "AGFsaWNlAGh1bnRlcjI="] {
        assert!(!backend.all_text().contains(secret), "{secret} reached the backend");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn too_many_errors_before_tls_close_the_session() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = Proxy::start_with(
        &[Listener::new("pop3", "pop3", "starttls", backend.addr)],
        "[limits]\nmax_errors = 3\n",
    )
    .await;
    let mut c = greeted(&proxy).await;
    for command in ["BOGUS\r\n", "USER a\r\n", "NOOP\r\n"] {
        c.send(command).await;
        let reply = c.line().await;
        assert!(reply.starts_with("-ERR"), "{command:?} -> {reply:?}");
        assert_ne!(reply, "-ERR Too many errors\r\n", "closed too early at {command:?}");
    }
    c.send("BOGUS\r\n").await;
    assert_eq!(c.line().await, "-ERR Too many errors\r\n");
    assert!(c.closed_within(PATIENCE).await, "session not closed after too many errors");
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn quit_before_tls_says_ok_closes_and_never_contacts_backend() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let mut c = greeted(&proxy).await;
    c.send("QUIT\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    assert!(c.closed_within(PATIENCE).await, "not closed after QUIT");
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

// matrix #35
#[tokio::test]
async fn overlong_line_ending_in_stls_never_gets_ok() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    for total in [512usize, 1000, 2048, 4096, 8192] {
        let mut line = b"NOOP ".to_vec();
        line.resize(total, b'A');
        line.extend_from_slice(b"STLS\r\n");
        let mut c = greeted(&proxy).await;
        c.send(&line).await;
        let mut replies = Vec::new();
        while let Some(l) = c.try_line(PATIENCE).await {
            replies.push(l);
        }
        assert!(!replies.iter().any(|l| l.starts_with("+OK")), "L = {total}: {replies:?}");
        assert!(c.closed_within(PATIENCE).await, "L = {total}: not closed");
    }
    assert_eq!(backend.connections(), 0);
    assert_eq!(Metrics::get(&proxy.metrics.starttls_upgrades), 0);
    proxy.stop().await;
}

// ---- after TLS ---------------------------------------------------------------------------

// matrix #28
#[tokio::test]
async fn capa_after_stls_has_user_and_sasl_plain_but_no_stls() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let mut t = upgraded(&proxy).await;
    assert_eq!(t.silent_for(QUIET).await, None, "the backend greeting must be swallowed");
    t.send("CAPA\r\n").await;
    let capa = pop3_list(&mut t).await;
    assert!(capa[0].starts_with("+OK"), "{capa:?}");
    assert!(!capa.iter().any(|l| l.to_ascii_uppercase().starts_with("STLS")), "{capa:?}");
    assert!(capa.contains(&"USER\r\n".to_owned()), "{capa:?}");
    assert!(capa.iter().any(|l| l.starts_with("SASL") && l.contains("PLAIN")), "{capa:?}");
    assert!(capa.contains(&"UIDL\r\n".to_owned()), "other capabilities are kept: {capa:?}");
    t.send("USER u\r\n").await;
    assert_eq!(t.line().await, "+OK\r\n");
    assert_eq!(backend.seen(0).text(), "CAPA\r\nUSER u\r\n");
    proxy.stop().await;
}

// matrix #29
#[tokio::test]
async fn pop3s_relays_backend_greeting_and_filters_capa() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3s_proxy(&backend).await;
    let mut t = proxy.tls("pop3s").await;
    // The backend's own greeting, APOP timestamp included (the channel is TLS now).
    assert_eq!(t.line().await, "+OK Dovecot ready. <1.2.3@backend.test>\r\n");
    assert!(backend.seen(0).header.starts_with(b"\r\n\r\n\0\r\nQUIT\n"), "PROXY v2 header first");
    t.send("CAPA\r\n").await;
    let capa = pop3_list(&mut t).await;
    assert!(!capa.iter().any(|l| l.to_ascii_uppercase().starts_with("STLS")), "{capa:?}");
    assert!(capa.contains(&"USER\r\n".to_owned()), "{capa:?}");
    t.send("USER u\r\n").await;
    assert_eq!(t.line().await, "+OK\r\n");
    t.send("PASS p\r\n").await;
    assert!(t.line().await.starts_with("+OK Logged in"));
    proxy.stop().await;
}

// matrix #32 (110)
#[tokio::test]
async fn stls_after_stls_is_refused_locally_and_not_forwarded() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let mut t = upgraded(&proxy).await;
    for second in ["STLS\r\n", "stls\r\n"] {
        t.send(second).await;
        let reply = t.line().await;
        assert!(reply.starts_with("-ERR"), "{second:?} -> {reply:?}");
    }
    t.send("USER u\r\n").await;
    assert_eq!(t.line().await, "+OK\r\n", "session continues after the refusal");
    assert_eq!(backend.seen(0).text(), "USER u\r\n");
    assert!(!backend.all_text().to_ascii_uppercase().contains("STLS"));
    proxy.stop().await;
}

// matrix #32 (995)
#[tokio::test]
async fn stls_on_pop3s_is_refused_locally_and_not_forwarded() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3s_proxy(&backend).await;
    let mut t = proxy.tls("pop3s").await;
    assert!(t.line().await.starts_with("+OK"));
    t.send("STLS\r\n").await;
    let reply = t.line().await;
    assert!(reply.starts_with("-ERR"), "{reply:?}");
    t.send("USER u\r\n").await;
    assert_eq!(t.line().await, "+OK\r\n", "session continues after the refusal");
    assert_eq!(backend.seen(0).text(), "USER u\r\n");
    assert!(!backend.all_text().to_ascii_uppercase().contains("STLS"));
    proxy.stop().await;
}

/// Logs in as "echo", then checks bulk bytes both ways through the relay.
async fn echo_login_and_bulk<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut t: Conn<S>,
    backend: &Backend,
) {
    t.send("USER echo\r\n").await;
    assert_eq!(t.line().await, "+OK\r\n");
    t.send("PASS x\r\n").await;
    assert!(t.line().await.starts_with("+OK Logged in"));
    let bulk: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(t.into_inner());
    let sent = bulk.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr.flush().await.unwrap();
        wr
    });
    let mut back = vec![0u8; bulk.len()];
    tokio::time::timeout(PATIENCE, rd.read_exact(&mut back)).await.expect("echo in time").unwrap();
    let _wr = writer.await.unwrap();
    assert!(back == bulk, "echoed bytes differ");
    let seen = backend.seen(0).data;
    assert!(seen.starts_with(b"USER echo\r\nPASS x\r\n"));
    assert!(seen.ends_with(&bulk), "backend did not receive the bulk intact");
}

#[tokio::test]
async fn after_stls_login_as_echo_then_bulk_is_relayed_both_ways() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let t = upgraded(&proxy).await;
    echo_login_and_bulk(t, &backend).await;
    proxy.stop().await;
}

#[tokio::test]
async fn pop3s_login_as_echo_then_bulk_is_relayed_both_ways() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3s_proxy(&backend).await;
    let mut t = proxy.tls("pop3s").await;
    assert!(t.line().await.starts_with("+OK"));
    echo_login_and_bulk(t, &backend).await;
    proxy.stop().await;
}

/// AUTH PLAIN without an initial response: the backend's `+ ` reaches the client, and the
/// client's SASL line, literally `STLS`, reaches the backend as SASL data.
async fn sasl_line_stls_is_data<S: AsyncRead + AsyncWrite + Unpin>(t: &mut Conn<S>, backend: &Backend) {
    t.send("AUTH PLAIN\r\n").await;
    assert_eq!(t.line().await, "+ \r\n");
    t.send("STLS\r\n").await;
    let reply = t.line().await;
    assert!(reply.starts_with("+OK Logged in"), "SASL data answered as a command: {reply:?}");
    assert_eq!(backend.seen(0).text(), "AUTH PLAIN\r\nSTLS\r\n");
}

#[tokio::test]
async fn after_stls_auth_plain_continuation_is_relayed_and_sasl_line_reaches_backend() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3_proxy(&backend).await;
    let mut t = upgraded(&proxy).await;
    sasl_line_stls_is_data(&mut t, &backend).await;
    proxy.stop().await;
}

#[tokio::test]
async fn pop3s_auth_plain_continuation_is_relayed_and_sasl_line_reaches_backend() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3s_proxy(&backend).await;
    let mut t = proxy.tls("pop3s").await;
    assert!(t.line().await.starts_with("+OK"));
    sasl_line_stls_is_data(&mut t, &backend).await;
    proxy.stop().await;
}

// ---- implicit TLS and plaintext --------------------------------------------------------

// matrix #41
#[tokio::test]
async fn plaintext_capa_on_pop3s_gets_no_pop3_reply_and_is_closed() {
    let backend = Backend::start(Script::Pop3).await;
    let proxy = pop3s_proxy(&backend).await;
    let mut c = proxy.tcp("pop3s").await;
    c.send("CAPA\r\n").await;
    let got = c.rest().await;
    assert!(!got.contains("+OK") && !got.contains("-ERR") && !got.contains("STLS"), "{got:?}");
    assert!(c.closed_within(PATIENCE).await, "not closed");
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

// ---- commands by which a trusted proxy names its client (issue 19) -----------------------

/// What a client sends to forge its address to a Dovecot that trusts mailtls.
const FORGERIES: [&str; 4] = [
    "XCLIENT ADDR=203.0.113.77 PORT=4343\r\n",
    "xclient addr=203.0.113.77\r\n",
    "XOIP 203.0.113.77\r\n",
    // Dovecot ends a command name at a CR too, and reads this as XCLIENT ADDR=...
    "XCLIENT\rADDR=203.0.113.77\r\n",
];

/// Sends every forgery and expects mailtls's own `-ERR` to each, then a CAPA without XCLIENT
/// (or STLS), then a USER that does reach the backend.
async fn forgeries_are_answered_locally<S: AsyncRead + AsyncWrite + Unpin>(t: &mut Conn<S>) {
    for forgery in FORGERIES {
        t.send(forgery).await;
        let reply = t.line().await;
        assert!(reply.starts_with("-ERR Command not permitted"), "{forgery:?} got {reply:?}");
    }
    t.send("CAPA\r\n").await;
    let capa = pop3_list(t).await;
    assert!(capa.contains(&"TOP\r\n".to_owned()), "{capa:?}");
    assert!(!capa.iter().any(|l| l.contains("XCLIENT") || l.contains("STLS")), "{capa:?}");
    t.send("USER u\r\n").await;
    assert_eq!(t.line().await, "+OK\r\n");
}

fn assert_no_forgery_reached(backend: &Backend) {
    let all = backend.all_text();
    assert!(!all.to_ascii_uppercase().contains("XCLIENT") && !all.contains("XOIP"), "{all:?}");
    assert!(!all.contains("203.0.113.77"), "{all:?}");
}

#[tokio::test]
async fn client_xclient_on_pop3s_is_refused_locally_and_the_greeting_loses_its_xclient_code() {
    let backend = Backend::start(Script::Pop3Trusting).await;
    let proxy = pop3s_proxy(&backend).await;
    let mut t = proxy.tls("pop3s").await;
    assert_eq!(t.line().await, "+OK Dovecot ready. <1.2.3@backend.test>\r\n");
    forgeries_are_answered_locally(&mut t).await;
    assert_no_forgery_reached(&backend);
    assert_eq!(backend.seen(0).text(), "CAPA\r\nUSER u\r\n");
    proxy.stop().await;
}

#[tokio::test]
async fn client_xclient_before_and_after_stls_never_reaches_the_backend() {
    let backend = Backend::start(Script::Pop3Trusting).await;
    let proxy = pop3_proxy(&backend).await;
    let mut c = greeted(&proxy).await;
    c.send(FORGERIES[0]).await;
    let reply = c.line().await;
    assert!(reply.starts_with("-ERR Command not permitted"), "{reply:?}");
    c.send("STLS\r\n").await;
    assert_eq!(c.line().await, GO_AHEAD);
    let mut t = c.upgrade(&proxy.certs).await;
    assert_eq!(t.silent_for(QUIET).await, None, "the backend's greeting is swallowed after STLS");
    forgeries_are_answered_locally(&mut t).await;
    assert_no_forgery_reached(&backend);
    proxy.stop().await;
}

/// A pop3s listener with `proxy_protocol = "none"` and `xclient = true` in front of `backend`.
async fn naming_pop3s_proxy(backend: &Backend) -> Proxy {
    let listener = Listener::new("pop3s", "pop3", "implicit", backend.addr).proxy("none");
    Proxy::start_edited(&[listener], "", |text| {
        text.replace("proxy_protocol = \"none\"", "proxy_protocol = \"none\"\nxclient = true")
    })
    .await
}

#[tokio::test]
async fn xclient_setting_names_the_real_client_to_a_trusting_pop3_backend() {
    let backend = Backend::start_without_header(Script::Pop3Trusting).await;
    let proxy = naming_pop3s_proxy(&backend).await;
    let tcp = TcpStream::connect(proxy.addr("pop3s")).await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let mut t = Conn::new(tls_handshake(tcp, &proxy.certs).await.unwrap());
    assert_eq!(t.line().await, "+OK Dovecot ready. <1.2.3@backend.test>\r\n");
    forgeries_are_answered_locally(&mut t).await;
    let seen = backend.seen(0).text();
    assert_eq!(seen, format!("XCLIENT ADDR=127.0.0.1 PORT={port}\r\nCAPA\r\nUSER u\r\n"));
    proxy.stop().await;
}

// A Dovecot that does not offer XCLIENT does not trust mailtls and would log mailtls's
// address for every client: with xclient = true that is a backend failure, said at once.
#[tokio::test]
async fn xclient_setting_in_front_of_an_untrusting_pop3_backend_is_unavailable() {
    let backend = Backend::start_without_header(Script::Pop3).await;
    let proxy = naming_pop3s_proxy(&backend).await;
    let mut t = proxy.tls("pop3s").await;
    assert_eq!(t.line().await, "-ERR [SYS/TEMP] Backend server unavailable\r\n");
    assert!(t.closed_within(Duration::from_secs(2)).await);
    assert_eq!(backend.all_text(), "", "no XCLIENT to a backend that does not offer it");
    let failures = &proxy.metrics.backend_failures;
    assert!(eventually(|| Metrics::get(failures) == 1).await, "counted {}", Metrics::get(failures));
    proxy.stop().await;
}
