//! The real binary admitting connections: limit refusals in each protocol's words (plaintext
//! on STARTTLS listeners, inside TLS on implicit ones) and counted; inbound PROXY headers
//! from trusted sources (v1, v2, malformed, missing) and never from others.

mod common;

use common::process::*;
use common::*;

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::TcpStream;

/// Starts the binary with `listeners` on fixed ports, an admin endpoint, and `edit`
/// applied to the config text.
async fn start(
    certs: &Certs,
    listeners: &[Listener],
    edit: impl FnOnce(String) -> String,
) -> (Running, Vec<SocketAddr>, SocketAddr) {
    let ports: Vec<u16> = listeners.iter().map(|_| free_port()).collect();
    let admin = local(free_port());
    let text = with_ports(&config_text(certs, listeners, ""), &ports);
    let text = edit(format!("{text}\n[admin]\nlisten = \"{admin}\"\n"));
    let path: PathBuf = certs.dir.path().join("mailtls.toml");
    std::fs::write(&path, text).unwrap();
    let mut run = Running::mailtls(&path, &[]);
    let addrs: Vec<SocketAddr> = ports.iter().map(|&p| local(p)).collect();
    run.wait_accepting(admin).await;
    (run, addrs, admin)
}

async fn tcp(addr: SocketAddr) -> Conn<TcpStream> {
    Conn::new(TcpStream::connect(addr).await.unwrap())
}

/// Waits for the server to notice a closed session (its slots are freed as it ends).
async fn open_drops_to(admin: SocketAddr, listener: &str, value: f64) {
    let series = format!("mailtls_connections_open{{listener=\"{listener}\"}}");
    for _ in 0..100 {
        // An absent series is a listener that never had a connection.
        if sample(&http_get(admin, "/metrics").1, &series).unwrap_or(0.0) == value {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{series} never dropped to {value}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limit_refuses_in_each_protocols_words_before_tls() {
    let smtp = Backend::start(Script::Smtp).await;
    let imap = Backend::start(Script::Imap).await;
    let pop3 = Backend::start(Script::Pop3).await;
    let certs = certs();
    let listeners = [
        Listener::new("submission", "smtp", "starttls", smtp.addr),
        Listener::new("imap", "imap", "starttls", imap.addr),
        Listener::new("pop3", "pop3", "starttls", pop3.addr),
    ];
    let (run, addrs, admin) =
        start(&certs, &listeners, |t| format!("{t}\n[limits]\nmax_connections_per_address = 1\n")).await;
    let cases = [
        ("submission", "220 ", "421 4.7.0 Too many connections"),
        ("imap", "* OK", "* BYE [UNAVAILABLE] Too many connections"),
        ("pop3", "+OK", "-ERR [SYS/TEMP] Too many connections"),
    ];
    for (i, (name, greeting, refusal)) in cases.iter().enumerate() {
        open_drops_to(admin, cases[i.saturating_sub(1)].0, 0.0).await;
        let mut first = tcp(addrs[i]).await;
        assert!(first.line().await.starts_with(greeting), "{name}: {}", run.log());
        let mut second = tcp(addrs[i]).await;
        let said = second.line().await;
        assert!(said.starts_with(refusal), "{name}: {said:?}");
        assert!(second.closed_within(PATIENCE).await, "{name}: refused connection left open");
        drop(first);
    }
    let m = http_get(admin, "/metrics").1;
    for (name, _, _) in cases {
        let series = format!("mailtls_connections_refused_total{{listener=\"{name}\",limit=\"address\"}}");
        assert_eq!(sample(&m, &series), Some(1.0), "{series} in\n{m}");
    }
    assert!(run.log().contains("connection refused: limit reached"), "{}", run.log());
    assert_eq!((smtp.connections(), imap.connections(), pop3.connections()), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_limit_refuses_inside_tls_and_rate_limit_refuses_the_burst() {
    let imap = Backend::start(Script::Imap).await;
    let smtp = Backend::start(Script::Smtp).await;
    let certs = certs();
    let listeners = [
        Listener::new("imaps", "imap", "implicit", imap.addr),
        Listener::new("submission", "smtp", "starttls", smtp.addr),
    ];
    let (_run, addrs, admin) = start(&certs, &listeners, |t| {
        let t = in_listener(&t, "imaps", "max_connections = 1");
        format!("{t}\n[limits]\nmax_new_connections_per_address_per_minute = 3\n")
    })
    .await;

    // Listener bound: the refusal comes inside TLS, after a completed handshake.
    let mut first =
        Conn::new(tls_handshake(TcpStream::connect(addrs[0]).await.unwrap(), &certs).await.unwrap());
    assert!(first.line().await.starts_with("* OK"));
    let tcp_second = TcpStream::connect(addrs[0]).await.unwrap();
    let mut second =
        Conn::new(tls_handshake(tcp_second, &certs).await.expect("handshake before the refusal"));
    assert_eq!(second.line().await, "* BYE [UNAVAILABLE] Too many connections, try again later\r\n");
    assert!(second.closed_within(PATIENCE).await);
    assert_eq!(imap.connections(), 1);

    // Rate: "first" took one of 3 tokens, so two more connections, then a refusal.
    for _ in 0..2 {
        let mut c = tcp(addrs[1]).await;
        assert!(c.line().await.starts_with("220 "));
    }
    let mut burst = tcp(addrs[1]).await;
    assert!(burst.line().await.starts_with("421 4.7.0"));
    let m = http_get(admin, "/metrics").1;
    assert_eq!(
        sample(&m, "mailtls_connections_refused_total{listener=\"imaps\",limit=\"listener\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "mailtls_connections_refused_total{listener=\"submission\",limit=\"rate\"}"),
        Some(1.0)
    );
}

fn v2_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    use ppp::v2::{Addresses, Builder, Command, Protocol, Version};
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, Addresses::from((client, local)))
        .build()
        .unwrap()
}

/// The client address in the PROXY v2 header mailtls sent to the backend.
fn forwarded_client(backend: &Backend, i: usize) -> SocketAddr {
    let seen = backend.seen(i);
    let header = ppp::v2::Header::try_from(seen.header.as_slice()).expect("a v2 header");
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => SocketAddr::from((a.source_address, a.source_port)),
        ppp::v2::Addresses::IPv6(a) => SocketAddr::from((a.source_address, a.source_port)),
        other => panic!("unexpected addresses {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_header_names_the_client_for_logs_limits_and_the_backend() {
    let imap = Backend::start(Script::Imap).await;
    let smtp = Backend::start(Script::Smtp).await;
    let certs = certs();
    let listeners = [
        Listener::new("imaps", "imap", "implicit", imap.addr),
        Listener::new("submission", "smtp", "starttls", smtp.addr),
    ];
    let (run, addrs, admin) = start(&certs, &listeners, |t| {
        let t = in_listener(&t, "imaps", "accept_proxy_protocol = [\"127.0.0.0/8\"]");
        let t = in_listener(&t, "submission", "accept_proxy_protocol = [\"127.0.0.1\"]");
        format!("{t}\n[limits]\nmax_connections_per_address = 1\n")
    })
    .await;

    // v1 from the balancer: TLS follows the header; the backend hears of the real client.
    let mut lb = TcpStream::connect(addrs[0]).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut lb, b"PROXY TCP4 192.0.2.9 198.51.100.1 4242 993\r\n")
        .await
        .unwrap();
    let mut a = Conn::new(tls_handshake(lb, &certs).await.expect("TLS after a v1 header"));
    assert!(a.line().await.starts_with("* OK"));
    assert_eq!(forwarded_client(&imap, 0), "192.0.2.9:4242".parse().unwrap());

    // v2, another client behind the same balancer address: admitted (limits count the
    // header's address, not the balancer's).
    let client_b: SocketAddr = "[2001:db8::5]:5000".parse().unwrap();
    let mut lb = TcpStream::connect(addrs[0]).await.unwrap();
    let header = v2_header(client_b, "[2001:db8::1]:993".parse().unwrap());
    tokio::io::AsyncWriteExt::write_all(&mut lb, &header).await.unwrap();
    let mut b = Conn::new(tls_handshake(lb, &certs).await.expect("TLS after a v2 header"));
    assert!(b.line().await.starts_with("* OK"));
    assert_eq!(forwarded_client(&imap, 1), client_b);

    // The first client again: over its per-address limit.
    let mut lb = TcpStream::connect(addrs[0]).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut lb, b"PROXY TCP4 192.0.2.9 198.51.100.1 4243 993\r\n")
        .await
        .unwrap();
    let mut c = Conn::new(tls_handshake(lb, &certs).await.unwrap());
    assert!(c.line().await.starts_with("* BYE [UNAVAILABLE] Too many connections"));

    // STARTTLS listener: the header comes before mailtls's own greeting.
    let mut s = tcp(addrs[1]).await;
    s.send("PROXY TCP4 203.0.113.7 198.51.100.1 6000 587\r\n").await;
    assert!(s.line().await.starts_with("220 "));
    s.send("STARTTLS\r\n").await;
    assert!(s.line().await.starts_with("220 "));
    let mut s = s.upgrade(&certs).await;
    s.send("EHLO client.test\r\n").await;
    assert!(s.smtp_reply().await[0].starts_with("250"));
    assert_eq!(forwarded_client(&smtp, 0), "203.0.113.7:6000".parse().unwrap());

    // Malformed and missing headers from a trusted source end the connection unanswered.
    let mut bad = tcp(addrs[1]).await;
    bad.send("PROXY TCP4 300.1.1.1 198.51.100.1 1 2\r\n").await;
    assert_eq!(bad.rest().await, "", "a malformed header got an answer");
    let mut missing = tcp(addrs[1]).await;
    missing.send("EHLO client.test\r\n").await;
    assert_eq!(missing.rest().await, "", "a connection without header got an answer");
    assert_eq!(smtp.connections(), 1);

    drop((a, b, s));
    let m = http_get(admin, "/metrics").1;
    assert_eq!(
        sample(&m, "mailtls_proxy_headers_total{listener=\"imaps\",outcome=\"ok\"}"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "mailtls_proxy_headers_total{listener=\"submission\",outcome=\"malformed\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "mailtls_proxy_headers_total{listener=\"submission\",outcome=\"missing\"}"),
        Some(1.0)
    );
    assert!(
        run.log_shows("client=192.0.2.9:4243", 1).await,
        "the refusal names the header's client: {}",
        run.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_from_an_untrusted_source_is_just_a_bad_command_or_a_failed_handshake() {
    let imap = Backend::start(Script::Imap).await;
    let smtp = Backend::start(Script::Smtp).await;
    let certs = certs();
    let listeners = [
        Listener::new("imaps", "imap", "implicit", imap.addr),
        Listener::new("submission", "smtp", "starttls", smtp.addr),
    ];
    let (run, addrs, _) = start(&certs, &listeners, |t| {
        let t = in_listener(&t, "imaps", "accept_proxy_protocol = [\"10.0.0.0/8\"]");
        in_listener(&t, "submission", "accept_proxy_protocol = [\"10.0.0.0/8\", \"192.168.0.0/16\"]")
    })
    .await;

    let mut s = tcp(addrs[1]).await;
    assert!(s.line().await.starts_with("220 "), "greeted at once: no header is awaited");
    s.send("PROXY TCP4 192.0.2.9 198.51.100.1 4242 587\r\n").await;
    let reply = s.line().await;
    assert!(reply.starts_with("500") || reply.starts_with("502"), "{reply:?}");
    s.send("STARTTLS\r\n").await;
    assert!(s.line().await.starts_with("220 "));
    let mut s = s.upgrade(&certs).await;
    s.send("EHLO client.test\r\n").await;
    assert!(s.smtp_reply().await[0].starts_with("250"));
    assert_eq!(forwarded_client(&smtp, 0).ip(), std::net::IpAddr::from([127, 0, 0, 1]));

    let mut lb = TcpStream::connect(addrs[0]).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut lb, b"PROXY TCP4 192.0.2.9 198.51.100.1 4242 993\r\n")
        .await
        .unwrap();
    assert!(tls_handshake(lb, &certs).await.is_err(), "a PROXY line is no ClientHello");
    assert_eq!(imap.connections(), 0);
    assert!(!run.log().contains("192.0.2.9"), "an untrusted header was believed: {}", run.log());
}
