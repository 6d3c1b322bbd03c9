//! SMTP through a real proxy on three listener roles: "submission" (587: STARTTLS,
//! require_tls), "mx" (25: STARTTLS, opportunistic) and "submissions" (465: implicit TLS),
//! each in front of its own scripted backend, so every assertion about what a backend
//! received (or never received) is about one role only.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::backend::Seen;
use common::*;
use mailtls::metrics::Metrics;
use mailtls::protocol::smtp_guard::first_bare_newline;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Short enough to keep tests quick, long enough for loopback delivery.
const QUIET: Duration = Duration::from_millis(300);

const PP2_TYPE_SSL: u8 = 0x20;
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const MUST_STARTTLS: &str = "530 5.7.0 Must issue a STARTTLS command first\r\n";

/// The three SMTP roles, each in its own proxy with its own recording backend.
///
/// One proxy per role keeps metrics and backend recordings per role; the three side by
/// side in one proxy are covered by `three_smtp_listeners_on_ephemeral_ports_start_in_one_proxy`.
struct Rig {
    proxies: Vec<Proxy>,
    /// Behind "submission" (587).
    sub: Backend,
    /// Behind "mx" (25); also receives the proxy's EHLO probes.
    mx: Backend,
    /// Behind "submissions" (465).
    smtps: Backend,
}

fn roles(sub: &Backend, mx: &Backend, smtps: &Backend) -> [Listener; 3] {
    [
        Listener::new("submission", "smtp", "starttls", sub.addr),
        Listener::new("mx", "smtp", "starttls", mx.addr).opportunistic(),
        Listener::new("submissions", "smtp", "implicit", smtps.addr),
    ]
}

async fn rig() -> Rig {
    rig_with("").await
}

async fn rig_with(extra: &str) -> Rig {
    let sub = Backend::start(Script::Smtp).await;
    let mx = Backend::start(Script::Smtp).await;
    let smtps = Backend::start(Script::Smtp).await;
    let mut proxies = Vec::new();
    for listener in roles(&sub, &mx, &smtps) {
        proxies.push(Proxy::start_with(&[listener], extra).await);
    }
    Rig { proxies, sub, mx, smtps }
}

impl Rig {
    /// The proxy that runs `listener`.
    fn p(&self, listener: &str) -> &Proxy {
        self.proxies.iter().find(|p| p.addrs.iter().any(|(n, _)| n == listener)).expect("listener exists")
    }

    async fn stop(self) {
        for proxy in self.proxies {
            proxy.stop().await;
        }
    }
}

/// Connections that carried a client session (PROXY v2 command PROXY), leaving out the
/// probe's own connections (command LOCAL).
fn sessions(backend: &Backend) -> Vec<Seen> {
    (0..backend.connections())
        .map(|i| backend.seen(i))
        .filter(|s| s.header.starts_with(V2_SIGNATURE) && s.header.get(12) == Some(&0x21))
        .collect()
}

/// Everything client sessions delivered to a backend (probe connections left out).
fn session_text(backend: &Backend) -> String {
    sessions(backend).iter().map(Seen::text).collect()
}

fn parse_v2(header: &[u8]) -> ppp::v2::Header<'_> {
    assert!(header.starts_with(V2_SIGNATURE), "not a PROXY v2 header: {header:?}");
    ppp::v2::Header::try_from(header).expect("well-formed PROXY v2 header")
}

/// The value of PP2_TYPE_SSL, if the header has one.
fn ssl_tlv(header: &[u8]) -> Option<Vec<u8>> {
    parse_v2(header)
        .tlvs()
        .map(|t| t.expect("well-formed TLV"))
        .find(|t| t.kind == PP2_TYPE_SSL)
        .map(|t| t.value.to_vec())
}

/// Asserts the header names `client` as the source and `proxy` as the destination.
fn assert_real_addresses(header: &[u8], client: SocketAddr, proxy: SocketAddr) {
    assert_eq!(parse_v2(header).addresses, ppp::v2::Addresses::from((client, proxy)));
}

fn has_line(reply: &[String], needle: &str) -> bool {
    reply.iter().any(|l| l.to_ascii_uppercase().contains(needle))
}

/// Greeting and `EHLO t` on a STARTTLS listener, then STARTTLS and the handshake.
async fn upgraded(proxy: &Proxy, listener: &str) -> Conn<TlsClient> {
    let mut c = proxy.tcp(listener).await;
    assert_eq!(c.line().await, "220 mx.test ESMTP\r\n");
    c.send("EHLO t\r\n").await;
    c.smtp_reply().await;
    c.send("STARTTLS\r\n").await;
    assert_eq!(c.line().await, "220 2.0.0 Ready to start TLS\r\n");
    c.upgrade(&proxy.certs).await
}

/// EHLO on "mx" once the probe has taught the proxy the backend's extensions (it runs at
/// start; a session takes the list current when it is accepted, so retry until it shows).
async fn mx_after_probe(proxy: &Proxy, ehlo: &str) -> (Conn<TcpStream>, Vec<String>) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut c = proxy.tcp("mx").await;
        assert_eq!(c.line().await, "220 mx.test ESMTP\r\n");
        c.send(format!("{ehlo}\r\n")).await;
        let reply = c.smtp_reply().await;
        if has_line(&reply, "SIZE") || tokio::time::Instant::now() > deadline {
            return (c, reply);
        }
        drop(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The client's real handshake after a STARTTLS go-ahead that had plaintext behind it:
/// either it fails (the plaintext went to rustls), or it succeeds and nothing arrives
/// before the client's first TLS command, which gets exactly one reply.
/// Returns true when the handshake failed.
async fn real_tls_after_injection(mut c: Conn<TcpStream>, proxy: &Proxy) -> bool {
    // The proxy may fail the handshake on the injected bytes before the client has sent
    // its ClientHello: then a TLS alert (or the close) is already on its way.
    if let Some(early) = c.silent_for(Duration::from_millis(100)).await {
        assert!(
            early.starts_with('\u{15}') || early == "<EOF>" || early.starts_with("<error"),
            "plaintext after the STARTTLS go-ahead: {early:?}"
        );
        assert!(c.closed_within(PATIENCE).await, "the session stayed open after a failed handshake");
        assert!(Metrics::get(&proxy.metrics.handshakes_failed) > 0);
        return true;
    }
    let failed_before = Metrics::get(&proxy.metrics.handshakes_failed);
    match c.try_upgrade(&proxy.certs).await {
        Err(_) => {
            assert!(
                eventually(|| Metrics::get(&proxy.metrics.handshakes_failed) > failed_before).await,
                "the proxy did not record the failed handshake"
            );
            true
        }
        Ok(mut t) => {
            if let Some(early) = t.silent_for(QUIET).await {
                assert!(!early.contains("250"), "a reply arrived before any TLS command: {early:?}");
                return false;
            }
            t.send("NOOP\r\n").await;
            let first = t.smtp_reply().await;
            assert!(first.last().unwrap().starts_with("250 "), "{first:?}");
            assert_eq!(t.silent_for(QUIET).await, None, "more than one reply to one NOOP");
            false
        }
    }
}

fn assert_never_injected(backend: &Backend) {
    let all = backend.all_text();
    assert!(!all.to_ascii_lowercase().contains("inj"), "injected command reached the backend: {all:?}");
}

// ---------------------------------------------------------------------------------------
// Injection

// matrix #1
#[tokio::test]
async fn injected_ehlo_after_starttls_in_one_write_never_reaches_backend_587() {
    let rig = rig().await;
    let injections_before = Metrics::get(&rig.p("submission").metrics.starttls_injection_attempts);
    let mut c = rig.p("submission").tcp("submission").await;
    c.line().await;
    c.send("EHLO t\r\n").await;
    c.smtp_reply().await;
    c.send("STARTTLS\r\nEHLO inj\r\n").await;
    assert_eq!(c.line().await, "220 2.0.0 Ready to start TLS\r\n");
    real_tls_after_injection(c, rig.p("submission")).await;
    assert!(
        eventually(
            || Metrics::get(&rig.p("submission").metrics.starttls_injection_attempts) > injections_before
        )
        .await,
        "the injection attempt was not counted"
    );
    assert_never_injected(&rig.sub);
    rig.stop().await;
}

// matrix #2
#[tokio::test]
async fn injected_ehlo_after_starttls_in_one_write_never_reaches_backend_mx() {
    let rig = rig().await;
    let injections_before = Metrics::get(&rig.p("mx").metrics.starttls_injection_attempts);
    let (mut c, _) = mx_after_probe(rig.p("mx"), "EHLO t").await;
    c.send("STARTTLS\r\nEHLO inj\r\n").await;
    assert_eq!(c.line().await, "220 2.0.0 Ready to start TLS\r\n");
    real_tls_after_injection(c, rig.p("mx")).await;
    assert!(
        eventually(|| Metrics::get(&rig.p("mx").metrics.starttls_injection_attempts) > injections_before)
            .await,
        "the injection attempt was not counted"
    );
    assert_never_injected(&rig.mx);
    assert!(sessions(&rig.mx).iter().all(|s| !s.text().contains("EHLO")), "{:?}", session_text(&rig.mx));
    rig.stop().await;
}

// matrix #8
#[tokio::test]
async fn injected_ehlo_in_second_quick_write_before_220_never_reaches_backend() {
    let rig = rig().await;
    for listener in ["submission", "mx"] {
        let mut c = rig.p(listener).tcp(listener).await;
        c.stream.set_nodelay(true).unwrap();
        c.line().await;
        c.send("EHLO t\r\n").await;
        c.smtp_reply().await;
        c.send("STARTTLS\r\n").await;
        c.send("EHLO inj\r\n").await;
        assert_eq!(c.line().await, "220 2.0.0 Ready to start TLS\r\n", "{listener}");
        real_tls_after_injection(c, rig.p(listener)).await;
    }
    assert_never_injected(&rig.sub);
    assert_never_injected(&rig.mx);
    rig.stop().await;
}

// matrix #6
#[tokio::test]
async fn injected_auth_and_mail_transaction_after_starttls_never_reach_backend() {
    let rig = rig().await;
    let mut c = rig.p("submission").tcp("submission").await;
    c.line().await;
    c.send("STARTTLS\r\nAUTH PLAIN AGluagBpbmpzZWNyZXQ=\r\nMAIL FROM:<inj@x>\r\nRCPT TO:<inj@x>\r\nDATA\r\n")
        .await;
    assert_eq!(c.line().await, "220 2.0.0 Ready to start TLS\r\n");
    real_tls_after_injection(c, rig.p("submission")).await;
    assert_never_injected(&rig.sub);
    let all = rig.sub.all_text();
    for word in ["AUTH", "MAIL", "RCPT", "DATA"] {
        assert!(!all.contains(word), "{word} reached the backend: {all:?}");
    }
    rig.stop().await;
}

// matrix #9
#[tokio::test]
async fn injection_case_and_bare_lf_variants_never_reach_backend() {
    let rig = rig().await;
    for (listener, bytes) in [
        ("submission", "starttls\r\nehlo inj\r\n"),
        ("submission", "STARTTLS\nEHLO inj\n"),
        ("submission", "sTaRtTlS\nehlo inj\r\n"),
        ("submission", "STARTTLS \r\nEHLO inj\r\n"),
        ("mx", "starttls\nehlo inj\n"),
    ] {
        let mut c = rig.p(listener).tcp(listener).await;
        c.line().await;
        c.send("ehlo t\n").await;
        c.smtp_reply().await;
        c.send(bytes).await;
        let go = c.line().await;
        assert!(go.starts_with("220 "), "{bytes:?}: {go:?}");
        real_tls_after_injection(c, rig.p(listener)).await;
    }
    assert_never_injected(&rig.sub);
    assert_never_injected(&rig.mx);
    rig.stop().await;
}

// matrix #11
#[tokio::test]
async fn pipelined_ehlo_and_starttls_both_answered_and_tls_works() {
    let rig = rig().await;
    let injections_before = Metrics::get(&rig.p("submission").metrics.starttls_injection_attempts);
    let mut c = rig.p("submission").tcp("submission").await;
    c.line().await;
    c.send("EHLO t\r\nSTARTTLS\r\n").await;
    let ehlo = c.smtp_reply().await;
    assert!(ehlo.last().unwrap().starts_with("250 "), "{ehlo:?}");
    assert_eq!(c.line().await, "220 2.0.0 Ready to start TLS\r\n");
    let mut t = c.upgrade(&rig.p("submission").certs).await;
    t.send("EHLO after\r\n").await;
    let ehlo = t.smtp_reply().await;
    assert!(has_line(&ehlo, "AUTH PLAIN"), "{ehlo:?}");
    assert_eq!(
        Metrics::get(&rig.p("submission").metrics.starttls_injection_attempts),
        injections_before,
        "a well-behaved pipelining client was counted as an injection"
    );
    assert_eq!(rig.sub.seen(0).text(), "EHLO after\r\n");
    rig.stop().await;
}

// ---------------------------------------------------------------------------------------
// Before TLS

// matrix #13
#[tokio::test]
async fn submission_ehlo_before_tls_offers_starttls_only() {
    let rig = rig().await;
    let mut c = rig.p("submission").tcp("submission").await;
    assert_eq!(c.line().await, "220 mx.test ESMTP\r\n");
    c.send("EHLO t\r\n").await;
    let ehlo = c.smtp_reply().await;
    assert_eq!(ehlo.first().unwrap(), "250-mx.test\r\n");
    assert!(has_line(&ehlo, "STARTTLS"), "{ehlo:?}");
    assert!(!has_line(&ehlo, "AUTH"), "{ehlo:?}");
    assert!(!has_line(&ehlo, "PIPELINING"), "{ehlo:?}");
    assert_eq!(rig.sub.connections(), 0);
    rig.stop().await;
}

// matrix #14
#[tokio::test]
async fn submission_auth_before_tls_is_530_and_backend_not_contacted() {
    let rig = rig().await;
    let mut c = rig.p("submission").tcp("submission").await;
    c.line().await;
    c.send("EHLO t\r\n").await;
    c.smtp_reply().await;
    c.send("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n").await;
    assert_eq!(c.line().await, MUST_STARTTLS);
    // Without an initial response: still 530, never 334, and the response that a
    // careless client sends next is just a bad command.
    c.send("AUTH LOGIN\r\n").await;
    assert_eq!(c.line().await, MUST_STARTTLS);
    c.send("YWxpY2U=\r\n").await;
    assert!(c.line().await.starts_with("500 "));
    c.send("NOOP\r\n").await;
    assert!(c.line().await.starts_with("250 "));
    assert_eq!(rig.sub.connections(), 0);
    rig.stop().await;
}

// matrix #15
#[tokio::test]
async fn submission_mail_before_tls_is_530_noop_250_quit_221() {
    let rig = rig().await;
    let mut c = rig.p("submission").tcp("submission").await;
    c.line().await;
    c.send("EHLO t\r\n").await;
    c.smtp_reply().await;
    c.send("MAIL FROM:<a@b>\r\n").await;
    assert_eq!(c.line().await, MUST_STARTTLS);
    c.send("RCPT TO:<a@b>\r\n").await;
    assert_eq!(c.line().await, MUST_STARTTLS);
    c.send("NOOP\r\n").await;
    assert!(c.line().await.starts_with("250 "));
    c.send("QUIT\r\n").await;
    assert!(c.line().await.starts_with("221 "));
    assert!(c.closed_within(PATIENCE).await, "QUIT did not close the connection");
    assert_eq!(rig.sub.connections(), 0);
    rig.stop().await;
}

// matrix #14: credentials sent before TLS never reach the backend, even once TLS is up.
#[tokio::test]
async fn credentials_sent_before_starttls_never_reach_backend() {
    let rig = rig().await;
    let mut c = rig.p("submission").tcp("submission").await;
    c.line().await;
    c.send("EHLO t\r\n").await;
    c.smtp_reply().await;
    // base64("\0credmarker\0credsecret")
    c.send("AUTH PLAIN AGNyZWRtYXJrZXIAY3JlZHNlY3JldA==\r\n").await;
    assert_eq!(c.line().await, MUST_STARTTLS);
    tokio::time::sleep(QUIET).await;
    assert_eq!(rig.sub.connections(), 0, "backend contacted before TLS");
    c.send("STARTTLS\r\n").await;
    assert!(c.line().await.starts_with("220 "));
    assert_eq!(rig.sub.connections(), 0, "backend contacted before the handshake");
    let mut t = c.upgrade(&rig.p("submission").certs).await;
    t.send("EHLO t\r\n").await;
    t.smtp_reply().await;
    t.send("NOOP\r\n").await;
    assert!(t.line().await.starts_with("250 "));
    assert_eq!(rig.sub.connections(), 1);
    let seen = rig.sub.seen(0).text();
    assert_eq!(seen, "EHLO t\r\nNOOP\r\n");
    assert!(!seen.contains("AGNyZWRtYXJrZXIAY3JlZHNlY3JldA"));
    rig.stop().await;
}

// matrix #16
#[tokio::test]
async fn mx_auth_before_tls_is_5xx_never_334_and_mail_is_accepted() {
    let rig = rig().await;
    let mut c = rig.p("mx").tcp("mx").await;
    c.line().await;
    c.send("EHLO t\r\n").await;
    let ehlo = c.smtp_reply().await;
    assert!(!has_line(&ehlo, "AUTH"), "{ehlo:?}");
    c.send("AUTH LOGIN\r\n").await;
    let auth = c.line().await;
    assert!(auth.starts_with('5'), "{auth:?}");
    c.send("dXNlcm1hcmtlcg==\r\n").await;
    assert!(c.line().await.starts_with('5'));
    c.send("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n").await;
    assert!(c.line().await.starts_with('5'));
    tokio::time::sleep(QUIET).await;
    assert!(sessions(&rig.mx).is_empty(), "backend contacted by AUTH: {:?}", session_text(&rig.mx));
    c.send("MAIL FROM:<a@b>\r\n").await;
    assert!(c.line().await.starts_with("250 "), "MAIL refused on the plaintext MX path");
    let s = sessions(&rig.mx);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].text(), "EHLO t\r\nMAIL FROM:<a@b>\r\n", "AUTH reached the backend");
    assert!(!rig.mx.all_text().contains("dXNlcm1hcmtlcg"));
    rig.stop().await;
}

// matrix #24
#[tokio::test]
async fn starttls_with_argument_is_501_and_session_continues() {
    let rig = rig().await;
    for listener in ["submission", "mx"] {
        let mut c = rig.p(listener).tcp(listener).await;
        c.line().await;
        c.send("EHLO t\r\n").await;
        c.smtp_reply().await;
        c.send("STARTTLS x\r\n").await;
        let reply = c.line().await;
        assert!(reply.starts_with("501 "), "{listener}: {reply:?}");
        c.send("NOOP\r\n").await;
        assert!(c.line().await.starts_with("250 "), "{listener}");
        c.send("STARTTLS\r\n").await;
        assert!(c.line().await.starts_with("220 "), "{listener}");
        let mut t = c.upgrade(&rig.p(listener).certs).await;
        t.send("NOOP\r\n").await;
        assert!(t.line().await.starts_with("250 "), "{listener}");
    }
    rig.stop().await;
}

// matrix #34
#[tokio::test]
async fn ten_thousand_bytes_without_crlf_close_without_backend() {
    let rig = rig().await;
    let mut c = rig.p("submission").tcp("submission").await;
    c.line().await;
    c.send(vec![b'x'; 10_000]).await;
    // An error reply if it makes it before the close, never anything positive.
    if let Some(reply) = c.try_line(PATIENCE).await {
        assert!(reply.starts_with('5') || reply.starts_with('4'), "{reply:?}");
    }
    assert!(c.closed_within(PATIENCE).await, "overlong line did not end the session");
    assert_eq!(rig.sub.connections(), 0);
    rig.stop().await;
}

// matrix #35
#[tokio::test]
async fn overlong_line_ending_in_starttls_is_never_split_before_tls() {
    let rig = rig().await;
    for l in [512usize, 1000, 2048, 4096, 8192] {
        for listener in ["submission", "mx"] {
            let mut c = rig.p(listener).tcp(listener).await;
            c.line().await;
            let mut line = b"NOOP ".to_vec();
            line.extend(std::iter::repeat_n(b'A', l - 5));
            line.extend_from_slice(b"STARTTLS\r\n");
            c.send(&line).await;
            let rest = c.rest().await;
            assert!(!rest.contains("220"), "L = {l} on {listener}: {rest:?}");
            assert!(!rest.contains("250"), "L = {l} on {listener}: {rest:?}");
        }
    }
    assert_eq!(rig.sub.connections(), 0);
    assert!(sessions(&rig.mx).is_empty());
    rig.stop().await;
}

// matrix #35 (after TLS, at the negotiation bound)
#[tokio::test]
async fn overlong_line_ending_in_starttls_is_never_split_after_tls() {
    let rig = rig_with("[limits]\nmax_line = 2048\n").await;
    for l in [512usize, 1000, 2048, 4096, 8192] {
        let mut t = upgraded(rig.p("submission"), "submission").await;
        let mut line = b"NOOP ".to_vec();
        line.extend(std::iter::repeat_n(b'A', l - 5));
        line.extend_from_slice(b"STARTTLS\r\n");
        t.send(&line).await;
        if l + 10 <= 2048 {
            // Within the bound: one NOOP, answered by the backend, forwarded whole.
            assert!(t.line().await.starts_with("250 "), "L = {l}");
        } else {
            let rest = t.rest().await;
            assert!(
                !rest.contains("220") && !rest.contains("250") && !rest.contains("503"),
                "L = {l}: {rest:?}"
            );
        }
    }
    let all = rig.sub.all_text();
    assert!(all.lines().all(|l| !l.starts_with("STARTTLS") && !l.starts_with("AAAA")), "a line was split");
    assert_eq!(all.matches("NOOP ").count(), 2, "only the lines within the bound are forwarded");
    rig.stop().await;
}

// matrix #42
#[tokio::test]
async fn proxy_line_from_client_is_a_bad_command_and_backend_sees_real_address() {
    let rig = rig().await;
    let mut c = rig.p("submission").tcp("submission").await;
    let client = c.stream.local_addr().unwrap();
    c.line().await;
    c.send("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n").await;
    let reply = c.line().await;
    assert!(reply.starts_with("500 ") || reply.starts_with("502 "), "{reply:?}");
    c.send("EHLO t\r\n").await;
    c.smtp_reply().await;
    c.send("STARTTLS\r\n").await;
    assert!(c.line().await.starts_with("220 "));
    let mut t = c.upgrade(&rig.p("submission").certs).await;
    t.send("NOOP\r\n").await;
    assert!(t.line().await.starts_with("250 "));
    let seen = rig.sub.seen(0);
    assert_real_addresses(&seen.header, client, rig.p("submission").addr("submission"));
    assert!(!seen.text().contains("PROXY") && !seen.text().contains("1.2.3.4"), "{:?}", seen.text());
    rig.stop().await;
}

// ---------------------------------------------------------------------------------------
// After TLS

// matrix #25, #47
#[tokio::test]
async fn after_starttls_nothing_unsolicited_and_ehlo_has_auth_not_starttls() {
    let rig = rig().await;
    let mut t = upgraded(rig.p("submission"), "submission").await;
    assert!(eventually(|| rig.sub.connections() == 1).await, "backend not connected after TLS");
    assert_eq!(t.silent_for(QUIET).await, None, "the backend greeting leaked to the client");
    t.send("EHLO t\r\n").await;
    let ehlo = t.smtp_reply().await;
    assert!(ehlo.last().unwrap().starts_with("250 "), "{ehlo:?}");
    // The scripted backend advertises STARTTLS itself (row 47).
    assert!(backend::SMTP_EHLO.contains("STARTTLS"));
    assert!(!has_line(&ehlo, "STARTTLS"), "{ehlo:?}");
    assert!(has_line(&ehlo, "AUTH PLAIN LOGIN"), "{ehlo:?}");
    assert!(has_line(&ehlo, "SIZE 10240000"), "{ehlo:?}");
    rig.stop().await;
}

// matrix #47
#[tokio::test]
async fn backend_starttls_never_shown_after_tls_on_any_role() {
    let rig = rig().await;
    let mut implicit = rig.p("submissions").tls("submissions").await;
    implicit.smtp_reply().await;
    let mut mx = upgraded(rig.p("mx"), "mx").await;
    let mut sub = upgraded(rig.p("submission"), "submission").await;
    for (name, ehlo) in [("submissions", &mut implicit), ("mx", &mut mx), ("submission", &mut sub)] {
        for command in ["EHLO t\r\n", "ehlo again\n"] {
            ehlo.send(command).await;
            let reply = ehlo.smtp_reply().await;
            assert!(reply.last().unwrap().starts_with("250 "), "{name}: {reply:?}");
            assert!(!has_line(&reply, "STARTTLS"), "{name}: {reply:?}");
            assert!(has_line(&reply, "PIPELINING"), "{name}: {reply:?}");
        }
    }
    rig.stop().await;
}

// matrix #26
#[tokio::test]
async fn backend_sees_header_then_post_tls_ehlo_never_pre_tls_marker() {
    let rig = rig().await;
    let mut c = rig.p("submission").tcp("submission").await;
    let client = c.stream.local_addr().unwrap();
    c.line().await;
    c.send("EHLO pre-marker\r\n").await;
    c.smtp_reply().await;
    c.send("STARTTLS\r\n").await;
    assert!(c.line().await.starts_with("220 "));
    let mut t = c.upgrade(&rig.p("submission").certs).await;
    t.send("EHLO post\r\n").await;
    t.smtp_reply().await;
    assert_eq!(rig.sub.connections(), 1);
    let seen = rig.sub.seen(0);
    assert_eq!(seen.text(), "EHLO post\r\n");
    assert!(!rig.sub.all_text().contains("pre-marker"));
    assert_real_addresses(&seen.header, client, rig.p("submission").addr("submission"));
    let ssl = ssl_tlv(&seen.header).expect("PP2_TYPE_SSL after STARTTLS");
    assert_eq!(ssl[0] & 0x01, 0x01, "PP2_CLIENT_SSL not set");
    rig.stop().await;
}

// matrix #30 (587)
#[tokio::test]
async fn second_starttls_after_starttls_is_refused_locally() {
    let rig = rig().await;
    let mut t = upgraded(rig.p("submission"), "submission").await;
    t.send("EHLO t\r\n").await;
    t.smtp_reply().await;
    for command in ["STARTTLS\r\n", "starttls\n"] {
        t.send(command).await;
        let reply = t.line().await;
        assert!(reply.starts_with('5'), "{reply:?}");
    }
    t.send("NOOP\r\n").await;
    assert!(t.line().await.starts_with("250 "), "session did not continue");
    assert_eq!(rig.sub.seen(0).text(), "EHLO t\r\nNOOP\r\n", "STARTTLS was forwarded");
    rig.stop().await;
}

// matrix #30 (465), #29
#[tokio::test]
async fn implicit_tls_relays_backend_greeting_and_refuses_starttls_locally() {
    let rig = rig().await;
    let mut t = rig.p("submissions").tls("submissions").await;
    assert_eq!(t.smtp_reply().await, vec!["220 backend.test ESMTP Postfix\r\n".to_owned()]);
    t.send("STARTTLS\r\n").await;
    let reply = t.line().await;
    assert!(reply.starts_with('5'), "{reply:?}");
    t.send("EHLO t\r\n").await;
    let ehlo = t.smtp_reply().await;
    assert!(has_line(&ehlo, "AUTH"), "{ehlo:?}");
    assert!(!has_line(&ehlo, "STARTTLS"), "{ehlo:?}");
    t.send("NOOP\r\n").await;
    assert!(t.line().await.starts_with("250 "), "session did not continue");
    let seen = rig.smtps.seen(0);
    assert_eq!(seen.text(), "EHLO t\r\nNOOP\r\n", "STARTTLS was forwarded");
    assert!(ssl_tlv(&seen.header).is_some(), "implicit TLS session without PP2_TYPE_SSL");
    rig.stop().await;
}

// matrix #33
#[tokio::test]
async fn pipelined_auth_with_12000_base64_characters_reaches_backend_intact() {
    let rig = rig().await;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b64: String = (0..12_000).map(|i| char::from(ALPHABET[(i * 7) % 64])).collect();

    // Initial response on the AUTH line, MAIL pipelined behind it in the same write.
    let mut t = upgraded(rig.p("submission"), "submission").await;
    t.send("EHLO t\r\n").await;
    t.smtp_reply().await;
    t.send(format!("AUTH PLAIN {b64}\r\nMAIL FROM:<a@test>\r\n")).await;
    assert!(t.line().await.starts_with("235 "));
    assert!(t.line().await.starts_with("250 "));
    assert_eq!(rig.sub.seen(0).text(), format!("EHLO t\r\nAUTH PLAIN {b64}\r\nMAIL FROM:<a@test>\r\n"));

    // The same as a SASL response after 334.
    let mut t = upgraded(rig.p("submission"), "submission").await;
    t.send("AUTH PLAIN\r\n").await;
    assert!(t.line().await.starts_with("334"));
    t.send(format!("{b64}\r\nMAIL FROM:<a@test>\r\n")).await;
    assert!(t.line().await.starts_with("235 "));
    assert!(t.line().await.starts_with("250 "));
    assert_eq!(rig.sub.seen(1).text(), format!("AUTH PLAIN\r\n{b64}\r\nMAIL FROM:<a@test>\r\n"));
    rig.stop().await;
}

// ---------------------------------------------------------------------------------------
// XCLIENT and the PROXY header

// matrix #46
#[tokio::test]
async fn xclient_never_reaches_backend_and_header_keeps_real_address() {
    let rig = rig().await;

    // Before TLS: an unknown command.
    let mut c = rig.p("submission").tcp("submission").await;
    let client = c.stream.local_addr().unwrap();
    c.line().await;
    c.send("XCLIENT ADDR=6.6.6.6 NAME=spoofed.example\r\n").await;
    assert!(c.line().await.starts_with('5'));
    c.send("EHLO t\r\n").await;
    c.smtp_reply().await;
    c.send("STARTTLS\r\n").await;
    assert!(c.line().await.starts_with("220 "));
    let mut t = c.upgrade(&rig.p("submission").certs).await;
    // After TLS: refused locally, XFORWARD too.
    for command in ["XCLIENT ADDR=6.6.6.6\r\n", "xclient addr=6.6.6.6\r\n", "XFORWARD ADDR=6.6.6.6\r\n"] {
        t.send(command).await;
        let reply = t.line().await;
        assert!(reply.starts_with('5'), "{command:?}: {reply:?}");
    }
    t.send("NOOP\r\n").await;
    assert!(t.line().await.starts_with("250 "));
    let seen = rig.sub.seen(0);
    assert_eq!(seen.text(), "NOOP\r\n");
    assert_real_addresses(&seen.header, client, rig.p("submission").addr("submission"));

    // Implicit TLS.
    let tcp = TcpStream::connect(rig.p("submissions").addr("submissions")).await.unwrap();
    let client = tcp.local_addr().unwrap();
    let mut t = Conn::new(tls_handshake(tcp, &rig.p("submissions").certs).await.unwrap());
    t.smtp_reply().await;
    t.send("XCLIENT ADDR=6.6.6.6\r\n").await;
    assert!(t.line().await.starts_with('5'));
    t.send("NOOP\r\n").await;
    assert!(t.line().await.starts_with("250 "));
    let seen = rig.smtps.seen(0);
    assert_eq!(seen.text(), "NOOP\r\n");
    assert_real_addresses(&seen.header, client, rig.p("submissions").addr("submissions"));

    // Plaintext MX, before MAIL.
    let mut c = rig.p("mx").tcp("mx").await;
    let client = c.stream.local_addr().unwrap();
    c.line().await;
    c.send("EHLO t\r\n").await;
    c.smtp_reply().await;
    c.send("XCLIENT ADDR=6.6.6.6\r\n").await;
    assert!(c.line().await.starts_with('5'));
    c.send("MAIL FROM:<a@b>\r\n").await;
    assert!(c.line().await.starts_with("250 "));
    let s = sessions(&rig.mx);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].text(), "EHLO t\r\nMAIL FROM:<a@b>\r\n");
    assert_real_addresses(&s[0].header, client, rig.p("mx").addr("mx"));

    assert!(!rig.sub.all_text().contains("6.6.6.6"));
    assert!(!rig.smtps.all_text().contains("6.6.6.6"));
    assert!(!rig.mx.all_text().contains("6.6.6.6"));
    rig.stop().await;
}

// ---------------------------------------------------------------------------------------
// Opportunistic MX (port 25)

#[tokio::test]
async fn mx_ehlo_before_tls_shows_probed_backend_extensions_without_auth() {
    let rig = rig().await;
    let (_c, ehlo) = mx_after_probe(rig.p("mx"), "EHLO client.example").await;
    assert_eq!(ehlo.first().unwrap(), "250-mx.test\r\n");
    for extension in
        ["PIPELINING", "SIZE 10240000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS"]
    {
        assert!(ehlo.iter().any(|l| l[4..].trim_end() == extension), "{extension} missing: {ehlo:?}");
    }
    assert!(!has_line(&ehlo, "AUTH"), "{ehlo:?}");
    assert_eq!(ehlo.iter().filter(|l| l.contains("STARTTLS")).count(), 1, "{ehlo:?}");
    assert!(sessions(&rig.mx).is_empty(), "EHLO contacted the backend");
    rig.stop().await;
}

// matrix #45
#[tokio::test]
async fn mx_plaintext_session_replays_ehlo_and_relays_both_ways_without_ssl_tlv() {
    let rig = rig().await;
    let (mut c, _) = mx_after_probe(rig.p("mx"), "EHLO client.example").await;
    let client = c.stream.local_addr().unwrap();
    c.send("MAIL FROM:<echo@test>\r\n").await;
    assert_eq!(c.line().await, "250 2.1.0 Ok\r\n");
    // The scripted backend offers AUTH, so this session is guarded (commands relayed one
    // at a time, replies parsed), not opaque: the ping is shaped like a reply so that its
    // echo is one, and still crosses mailtls both ways byte for byte.
    c.send("250 ping through the plaintext relay\r\n").await;
    assert_eq!(c.line().await, "250 ping through the plaintext relay\r\n");
    let s = sessions(&rig.mx);
    assert_eq!(s.len(), 1);
    assert_eq!(
        s[0].text(),
        "EHLO client.example\r\nMAIL FROM:<echo@test>\r\n250 ping through the plaintext relay\r\n"
    );
    assert_eq!(ssl_tlv(&s[0].header), None, "plaintext session claims TLS");
    assert_real_addresses(&s[0].header, client, rig.p("mx").addr("mx"));
    rig.stop().await;
}

// matrix #16 (HELO variant of the plaintext path)
#[tokio::test]
async fn mx_plaintext_helo_is_replayed_and_pipelined_transaction_relayed() {
    let rig = rig().await;
    let mut c = rig.p("mx").tcp("mx").await;
    c.line().await;
    c.send("HELO old.example\r\n").await;
    assert_eq!(c.line().await, "250 mx.test\r\n");
    c.send("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n").await;
    assert!(c.line().await.starts_with("250 "));
    assert!(c.line().await.starts_with("250 "));
    assert!(c.line().await.starts_with("354 "));
    c.send("Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n").await;
    assert!(c.line().await.starts_with("250 "));
    assert!(c.line().await.starts_with("221 "));
    let s = sessions(&rig.mx);
    assert_eq!(s.len(), 1);
    assert_eq!(
        s[0].text(),
        "HELO old.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    );
    rig.stop().await;
}

// matrix #16, #46 (after the first MAIL): the design says AUTH is never offered or accepted
// on the plaintext path, and XCLIENT never reaches a backend.
#[tokio::test]
async fn mx_plaintext_session_never_offers_or_passes_auth_after_mail() {
    let rig = rig().await;
    let mut c = rig.p("mx").tcp("mx").await;
    c.line().await;
    c.send("EHLO t\r\n").await;
    c.smtp_reply().await;
    c.send("MAIL FROM:<a@b>\r\n").await;
    assert!(c.line().await.starts_with("250 "));
    c.send("RSET\r\n").await;
    assert!(c.line().await.starts_with("250 "));
    c.send("EHLO again\r\n").await;
    let ehlo = c.smtp_reply().await;
    c.send("AUTH PLAIN AGxhdGVtYXJrZXIAc2VjcmV0\r\n").await;
    let auth = c.line().await;
    c.send("XCLIENT ADDR=6.6.6.6\r\n").await;
    let xclient = c.line().await;
    let seen = session_text(&rig.mx);
    assert!(!has_line(&ehlo, "AUTH"), "AUTH offered in plaintext: {ehlo:?}");
    assert!(auth.starts_with('5'), "plaintext AUTH accepted: {auth:?}");
    assert!(
        !seen.contains("AGxhdGVtYXJrZXIAc2VjcmV0"),
        "credentials reached the backend in plaintext: {seen:?}"
    );
    assert!(xclient.starts_with('5') && !seen.contains("XCLIENT"), "XCLIENT reached the backend: {seen:?}");
    rig.stop().await;
}

// The guarded plaintext session (the backend offers AUTH): a whole transaction with DATA,
// the body streamed unexamined (a line that reads like AUTH, a dot-stuffed line, the end
// marker split across writes), then a second transaction in the same session.
#[tokio::test]
async fn mx_plaintext_guarded_transactions_with_data_arrive_byte_exact() {
    let rig = rig().await;
    let (mut c, _) = mx_after_probe(rig.p("mx"), "EHLO client.example").await;
    c.stream.set_nodelay(true).unwrap();
    let mut expected = String::from("EHLO client.example\r\n");
    for command in ["MAIL FROM:<a@b> SIZE=100\r\n", "RCPT TO:<c@d>\r\n"] {
        c.send(command).await;
        assert_eq!(c.line().await, "250 2.0.0 Ok\r\n", "{command:?}");
        expected.push_str(command);
    }
    c.send("DATA\r\n").await;
    assert!(c.line().await.starts_with("354 "));
    expected.push_str("DATA\r\n");
    let pieces = [
        "Subject: guarded\r\n\r\nfirst line\r\n",
        "AUTH PLAIN eHh4\r\n",
        "..dot-stuffed line\r\nSTARTTLS\r\nlast line\r\n",
        ".",
        "\r",
        "\n",
    ];
    for piece in pieces {
        c.send(piece).await;
        expected.push_str(piece);
        // Separate segments, so the marker really arrives in pieces.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(c.line().await, "250 2.0.0 Ok: queued as TEST\r\n", "the body was interpreted");
    assert_eq!(c.silent_for(QUIET).await, None, "a local reply to a body line");

    // The second transaction, pipelined up to DATA.
    let second = "RSET\r\nMAIL FROM:<e@f>\r\nRCPT TO:<g@h>\r\nDATA\r\n";
    c.send(second).await;
    expected.push_str(second);
    for _ in 0..3 {
        assert_eq!(c.line().await, "250 2.0.0 Ok\r\n");
    }
    assert!(c.line().await.starts_with("354 "));
    let body = "..\r\nsecond body\r\n.\r\n";
    c.send(body).await;
    expected.push_str(body);
    assert_eq!(c.line().await, "250 2.0.0 Ok: queued as TEST\r\n");
    c.send("QUIT\r\n").await;
    expected.push_str("QUIT\r\n");
    assert_eq!(c.line().await, "221 2.0.0 Bye\r\n");

    let s = sessions(&rig.mx);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].text(), expected);
    assert_eq!(ssl_tlv(&s[0].header), None, "plaintext session claims TLS");
    rig.stop().await;
}

// A guarded plaintext session refuses STARTTLS (RFC 3207 454), AUTH and XFORWARD itself and
// never forwards them; the session goes on.
#[tokio::test]
async fn mx_plaintext_guarded_refusals_are_local() {
    let rig = rig().await;
    let (mut c, _) = mx_after_probe(rig.p("mx"), "EHLO t").await;
    c.send("MAIL FROM:<a@b>\r\n").await;
    assert!(c.line().await.starts_with("250 "));
    c.send("STARTTLS\r\n").await;
    assert_eq!(c.line().await, "454 4.7.0 TLS not available now\r\n");
    c.send("AUTH LOGIN\r\nXFORWARD ADDR=6.6.6.6\r\nRCPT TO:<c@d>\r\n").await;
    assert_eq!(c.line().await, MUST_STARTTLS);
    assert!(c.line().await.starts_with("550 "));
    assert!(c.line().await.starts_with("250 "));
    let s = sessions(&rig.mx);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].text(), "EHLO t\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    rig.stop().await;
}

/// A backend that offers neither AUTH nor XCLIENT/XFORWARD (the scripted one offers AUTH):
/// it strips the PROXY v2 header, answers EHLO and MAIL, then echoes every byte.
async fn backend_without_auth() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut header = [0u8; 16];
                stream.read_exact(&mut header).await?;
                let mut rest = vec![0u8; usize::from(u16::from_be_bytes([header[14], header[15]]))];
                stream.read_exact(&mut rest).await?;
                stream.write_all(b"220 plain.test ESMTP\r\n").await?;
                loop {
                    let mut line = String::new();
                    if tokio::io::AsyncBufReadExt::read_line(&mut stream, &mut line).await? == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    match line.get(..4).map(str::to_ascii_uppercase).as_deref() {
                        Some("EHLO") => {
                            stream.write_all(b"250-plain.test\r\n250-SIZE 1000\r\n250 8BITMIME\r\n").await?
                        }
                        Some("MAIL") => {
                            stream.write_all(b"250 2.1.0 Ok\r\n").await?;
                            let (mut rx, mut tx) = tokio::io::split(stream);
                            tokio::io::copy(&mut rx, &mut tx).await?;
                            return Ok(());
                        }
                        _ => stream.write_all(b"221 2.0.0 Bye\r\n").await?,
                    }
                }
            });
        }
    });
    addr
}

// The other side of the choice: a backend known (from the probe) to offer no AUTH, XCLIENT
// or XFORWARD keeps the plaintext session an opaque relay after the replayed EHLO.
#[tokio::test]
async fn mx_plaintext_relay_stays_opaque_in_front_of_a_backend_without_auth() {
    let proxy =
        Proxy::start(
            &[Listener::new("mx", "smtp", "starttls", backend_without_auth().await).opportunistic()],
        )
        .await;
    let (mut c, ehlo) = mx_after_probe(&proxy, "EHLO t").await;
    assert!(has_line(&ehlo, "SIZE 1000"), "the probe never ran: {ehlo:?}");
    c.send("MAIL FROM:<a@b>\r\n").await;
    assert_eq!(c.line().await, "250 2.1.0 Ok\r\n");
    // Not a reply, not a command: only an opaque relay carries it back and forth.
    c.send("\u{1}opaque bytes \u{7f}\r\n").await;
    assert_eq!(c.line().await, "\u{1}opaque bytes \u{7f}\r\n");
    proxy.stop().await;
}

#[tokio::test]
async fn mx_starttls_works_and_header_has_ssl_tlv() {
    let rig = rig().await;
    let (mut c, _) = mx_after_probe(rig.p("mx"), "EHLO t").await;
    let client = c.stream.local_addr().unwrap();
    c.send("STARTTLS\r\n").await;
    assert_eq!(c.line().await, "220 2.0.0 Ready to start TLS\r\n");
    let mut t = c.upgrade(&rig.p("mx").certs).await;
    assert_eq!(t.silent_for(QUIET).await, None, "the backend greeting leaked to the client");
    t.send("EHLO t\r\n").await;
    let ehlo = t.smtp_reply().await;
    assert!(!has_line(&ehlo, "STARTTLS"), "{ehlo:?}");
    assert!(has_line(&ehlo, "AUTH"), "{ehlo:?}");
    t.send("MAIL FROM:<echo@test>\r\n").await;
    assert!(t.line().await.starts_with("250 "));
    t.send("ping through TLS\r\n").await;
    assert_eq!(t.line().await, "ping through TLS\r\n");
    let s = sessions(&rig.mx);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].text(), "EHLO t\r\nMAIL FROM:<echo@test>\r\nping through TLS\r\n");
    let ssl = ssl_tlv(&s[0].header).expect("PP2_TYPE_SSL after STARTTLS on mx");
    assert_eq!(ssl[0] & 0x01, 0x01, "PP2_CLIENT_SSL not set");
    assert_real_addresses(&s[0].header, client, rig.p("mx").addr("mx"));
    rig.stop().await;
}

// ---------------------------------------------------------------------------------------
// SMTP smuggling (issue 17): every role, every engine

/// The non-standard ends of data of CVE-2023-51764 and its cousins, and the CR forms.
const SMUGGLING: [&str; 6] = ["\n.\r\n", "\r\n.\n", "\n.\n", "\r.\r", "\r.\r\n", "\r\n.\r"];

/// The body of a smuggling attempt: a first message whose text hides `variant` and, behind
/// it, a forged second transaction, then the real end of data.
fn smuggling_body(variant: &str) -> String {
    format!(
        "Subject: first\r\n\r\nfirst{variant}MAIL FROM:<ceo@mail.test>\r\nRCPT TO:<alice@mail.test>\r\n\
         DATA\r\nSubject: forged\r\n\r\nforged\r\n.\r\n"
    )
}

/// Runs one transaction (MAIL already accepted) carrying the smuggling body, and returns
/// every reply that came for it until the line went quiet.
async fn smuggle<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Conn<S>, variant: &str) -> Vec<String> {
    c.send("RCPT TO:<alice@mail.test>\r\n").await;
    assert!(c.line().await.starts_with("250 "));
    c.send("DATA\r\n").await;
    assert!(c.line().await.starts_with("354 "));
    c.send(smuggling_body(variant)).await;
    let mut replies = Vec::new();
    while let Some(line) = c.try_line(QUIET).await {
        replies.push(line);
    }
    replies
}

/// One message reached the backend, with the smuggled text inside it (dot-stuffed), and
/// the backend never saw a bare line ending.
fn assert_normalized(replies: &[String], backend: &Backend, variant: &str) {
    assert_eq!(replies, ["250 2.0.0 Ok: queued as TEST\r\n"], "{variant:?}: one message, not two");
    let s = sessions(backend);
    let data = &s.last().expect("a session").data;
    assert_eq!(first_bare_newline(data), None, "{variant:?}: {:?}", String::from_utf8_lossy(data));
    assert!(String::from_utf8_lossy(data).contains("\r\n..\r\nMAIL FROM:<ceo@mail.test>"), "{variant:?}");
}

/// The mx listener in front of a backend without AUTH: plaintext MAIL leads to the opaque
/// relay, spliced (or copied with `relay = "copy"`).
async fn mx_plaintext_smuggling(extra: &str, edit: impl Fn(String) -> String + Copy) {
    for variant in SMUGGLING {
        let backend = Backend::start(Script::SmtpNoAuth).await;
        let listener = Listener::new("mx", "smtp", "starttls", backend.addr).opportunistic();
        let proxy = Proxy::start_edited(&[listener], extra, edit).await;
        let (mut c, _) = mx_after_probe(&proxy, "EHLO t").await;
        c.send("MAIL FROM:<legit@sender.test>\r\n").await;
        assert!(c.line().await.starts_with("250 "));
        let replies = smuggle(&mut c, variant).await;
        assert_normalized(&replies, &backend, variant);
        assert!(Metrics::get(&proxy.metrics.smtp_bare_newlines) > 0, "{variant:?}: counted");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn mx_plaintext_splice_path_never_passes_a_smuggled_end_of_data() {
    mx_plaintext_smuggling("", |text| text).await;
}

#[tokio::test]
async fn mx_plaintext_copy_path_never_passes_a_smuggled_end_of_data() {
    mx_plaintext_smuggling("", |text| text.replacen("[tls]", "relay = \"copy\"\n[tls]", 1)).await;
}

#[tokio::test]
async fn mx_plaintext_reject_policy_closes_before_the_bare_newline_reaches_the_backend() {
    for variant in SMUGGLING {
        let backend = Backend::start(Script::SmtpNoAuth).await;
        let listener = Listener::new("mx", "smtp", "starttls", backend.addr).opportunistic();
        let edit = |text: String| common::process::in_listener(&text, "mx", "bare_newline = \"reject\"");
        let proxy = Proxy::start_edited(&[listener], "", edit).await;
        let (mut c, _) = mx_after_probe(&proxy, "EHLO t").await;
        c.send("MAIL FROM:<legit@sender.test>\r\n").await;
        assert!(c.line().await.starts_with("250 "));
        let replies = smuggle(&mut c, variant).await;
        assert_eq!(
            replies,
            ["521 5.5.2 Error: bare <CR> or <LF> in message content; closing\r\n"],
            "{variant:?}"
        );
        assert!(c.closed_within(PATIENCE).await, "{variant:?}: the session ends");
        let data = sessions(&backend).last().expect("a session").text();
        assert!(!data.contains("ceo") && !data.contains("first\n"), "{variant:?}: {data:?}");
        assert!(Metrics::get(&proxy.metrics.smtp_bare_newlines) > 0);
        proxy.stop().await;
    }
}

#[tokio::test]
async fn mx_after_starttls_copy_path_never_passes_a_smuggled_end_of_data() {
    for variant in SMUGGLING {
        let rig = rig().await;
        let (mut c, _) = mx_after_probe(rig.p("mx"), "EHLO t").await;
        c.send("STARTTLS\r\n").await;
        assert_eq!(c.line().await, "220 2.0.0 Ready to start TLS\r\n");
        let mut t = c.upgrade(&rig.p("mx").certs).await;
        t.send("EHLO t\r\n").await;
        t.smtp_reply().await;
        t.send("MAIL FROM:<legit@sender.test>\r\n").await;
        assert!(t.line().await.starts_with("250 "));
        let replies = smuggle(&mut t, variant).await;
        assert_normalized(&replies, &rig.mx, variant);
        rig.stop().await;
    }
}

#[tokio::test]
async fn submission_after_auth_never_passes_a_smuggled_end_of_data() {
    for variant in SMUGGLING {
        let rig = rig().await;
        let mut t = upgraded(rig.p("submission"), "submission").await;
        t.send("EHLO t\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n").await;
        t.smtp_reply().await;
        assert!(t.line().await.starts_with("235 "));
        t.send("MAIL FROM:<alice@mail.test>\r\n").await;
        assert!(t.line().await.starts_with("250 "));
        let replies = smuggle(&mut t, variant).await;
        assert_normalized(&replies, &rig.sub, variant);
        rig.stop().await;
    }
}

#[tokio::test]
async fn implicit_tls_submission_never_passes_a_smuggled_end_of_data() {
    for variant in SMUGGLING {
        let rig = rig().await;
        let mut t = rig.p("submissions").tls("submissions").await;
        assert!(t.line().await.starts_with("220 "));
        t.send("EHLO t\r\n").await;
        t.smtp_reply().await;
        t.send("MAIL FROM:<legit@sender.test>\r\n").await;
        assert!(t.line().await.starts_with("250 "));
        let replies = smuggle(&mut t, variant).await;
        assert_normalized(&replies, &rig.smtps, variant);
        rig.stop().await;
    }
}

/// Ordinary mail is untouched by the guard: dot-stuffing, a ".." line, 8-bit and UTF-8
/// text, a long line, and a pipelined second transaction arrive byte for byte.
#[tokio::test]
async fn mx_plaintext_clean_mail_with_pipelining_arrives_byte_exact() {
    let backend = Backend::start(Script::SmtpNoAuth).await;
    let proxy = Proxy::start(&[Listener::new("mx", "smtp", "starttls", backend.addr).opportunistic()]).await;
    let (mut c, _) = mx_after_probe(&proxy, "EHLO t").await;
    c.send("MAIL FROM:<a@b>\r\n").await;
    assert!(c.line().await.starts_with("250 "));
    let long = "x".repeat(5000);
    let body = format!("..dot\r\n..\r\ncaf\u{e9} \u{20ac}\r\n{long}\r\n.\r\n");
    let transaction = format!(
        "RCPT TO:<c@d>\r\nDATA\r\n{body}MAIL FROM:<j\u{f6}rg@b> SMTPUTF8\r\nRCPT TO:<c@d>\r\nDATA\r\n{body}QUIT\r\n"
    );
    c.send(&transaction).await;
    let mut got = Vec::new();
    for _ in 0..8 {
        got.push(c.line().await);
    }
    assert_eq!(got.iter().filter(|l| l.contains("queued")).count(), 2, "{got:?}");
    let data = sessions(&backend).last().expect("a session").text();
    assert_eq!(data, format!("EHLO t\r\nMAIL FROM:<a@b>\r\n{transaction}"));
    assert_eq!(Metrics::get(&proxy.metrics.smtp_bare_newlines), 0);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------
// Configuration

/// The three roles side by side in one proxy, each on an ephemeral port of 127.0.0.1, as
/// the harness (and any test or container set-up using port 0) writes them.
#[tokio::test]
async fn three_smtp_listeners_on_ephemeral_ports_start_in_one_proxy() {
    let sub = Backend::start(Script::Smtp).await;
    let mx = Backend::start(Script::Smtp).await;
    let smtps = Backend::start(Script::Smtp).await;
    let certs = certs();
    let text = config_text(&certs, &roles(&sub, &mx, &smtps), "");
    let parsed = mailtls::config::parse(&certs.dir.path().join("mailtls.toml"), &text);
    assert!(parsed.is_ok(), "port 0 is not a fixed port and may repeat: {:?}", parsed.err());
    let proxy = Proxy::start(&roles(&sub, &mx, &smtps)).await;
    let ports: Vec<u16> = proxy.addrs.iter().map(|(_, a)| a.port()).collect();
    assert_eq!(ports.len(), 3);
    assert!(
        ports.iter().all(|&p| p != 0) && ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]
    );
    let mut c = proxy.tcp("mx").await;
    assert_eq!(c.line().await, "220 mx.test ESMTP\r\n");
    let mut t = proxy.tls("submissions").await;
    assert!(t.line().await.starts_with("220 backend.test"));
    proxy.stop().await;
}
