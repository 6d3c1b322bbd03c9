//! SIGHUP on the real binary re-reads the config: backends, limits and certificates change
//! for new sessions, open sessions are untouched, restart-only changes are reported, and a
//! config that fails validation is refused while the running one stays.

mod common;

use common::process::*;
use common::*;

use std::net::SocketAddr;
use std::path::Path;

use tokio::net::TcpStream;

fn imaps_config(certs: &Certs, backend: SocketAddr, port: u16, admin: SocketAddr, extra: &str) -> String {
    let text = config_text(certs, &[Listener::new("imaps", "imap", "implicit", backend)], extra);
    format!("{}\n[admin]\nlisten = \"{admin}\"\n", with_ports(&text, &[port]))
}

async fn greeted(addr: SocketAddr, certs: &Certs) -> Conn<TlsClient> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut c = Conn::new(tls_handshake(tcp, certs).await.expect("TLS handshake"));
    let greeting = c.line().await;
    assert!(greeting.starts_with("* OK"), "{greeting:?}");
    c
}

async fn reload(run: &Running, config: &Path, text: &str, outcome: &str, times: usize) {
    std::fs::write(config, text).unwrap();
    run.signal("HUP");
    assert!(run.log_shows(outcome, times).await, "no {outcome:?} after SIGHUP: {}", run.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_backends_and_limits_to_new_sessions_and_refuses_a_bad_config() {
    let a = Backend::start(Script::Imap).await;
    let b = Backend::start(Script::Imap).await;
    let certs = certs();
    let (port, admin) = (free_port(), local(free_port()));
    let addr = local(port);
    let config = certs.dir.path().join("mailtls.toml");
    std::fs::write(&config, imaps_config(&certs, a.addr, port, admin, "")).unwrap();
    let mut run = Running::mailtls(&config, &[]);
    run.wait_accepting(addr).await;

    // An open session on backend A, in the relay.
    let mut open = greeted(addr, &certs).await;
    open.send("a LOGIN echo x\r\n").await;
    assert!(open.line().await.starts_with("a OK"));
    assert_eq!(a.connections(), 1);

    // New backend, a limit of one per address, and a new listen address (restart only).
    let moved = free_port();
    let text = imaps_config(&certs, b.addr, moved, admin, "[limits]\nmax_connections_per_address = 1\n");
    reload(&run, &config, &text, "configuration reloaded", 1).await;
    assert!(run.log().contains("a new listen address needs a restart"), "{}", run.log());

    // The open session is untouched; the new limit applies to the next one.
    open.send("still here\r\n").await;
    assert_eq!(open.line().await, "still here\r\n");
    let mut refused = greeted_or_refused(addr, &certs).await;
    assert!(refused.starts_with("* BYE [UNAVAILABLE] Too many connections"), "{refused:?}");
    drop(open);
    // Once it is gone, a new session goes to backend B, still on the old address.
    refused = String::new();
    for _ in 0..100 {
        refused = greeted_or_refused(addr, &certs).await;
        if refused.starts_with("* OK") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(refused.starts_with("* OK"), "{refused:?}");
    assert_eq!((a.connections(), b.connections()), (1, 1));
    assert!(TcpStream::connect(local(moved)).await.is_err(), "the new listen address was bound");

    // Bad configs: a syntax error, an unknown key, a missing certificate. Each is refused.
    let bad = [
        text.replace("[limits]", "[limits"),
        text.replace("max_connections_per_address", "max_conections_per_address"),
        text.replace(&certs.cert.display().to_string(), "/nonexistent/cert.pem"),
    ];
    for (i, broken) in bad.iter().enumerate() {
        reload(&run, &config, broken, "configuration reload refused", i + 1).await;
    }
    assert!(run.log().contains("max_conections_per_address"), "{}", run.log());
    // Still backend B, still serving.
    let _c = greeted(addr, &certs).await;
    assert_eq!(b.connections(), 2);
    let m = http_get(admin, "/metrics").1;
    assert_eq!(sample(&m, "mailtls_config_reloads_total{outcome=\"ok\"}"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mailtls_config_reloads_total{outcome=\"failed\"}"), Some(3.0), "{m}");
}

/// The first line after a handshake: a greeting or a refusal.
async fn greeted_or_refused(addr: SocketAddr, certs: &Certs) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut c = Conn::new(tls_handshake(tcp, certs).await.expect("TLS handshake"));
    c.line().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_new_certificate_serves_it_to_new_handshakes() {
    let backend = Backend::start(Script::Imap).await;
    let old = certs();
    let new = certs_for(&["localhost", "renewed.test"]);
    let (port, admin) = (free_port(), local(free_port()));
    let addr = local(port);
    let config = old.dir.path().join("mailtls.toml");
    let text = imaps_config(&old, backend.addr, port, admin, "");
    std::fs::write(&config, &text).unwrap();
    let mut run = Running::mailtls(&config, &[]);
    run.wait_accepting(addr).await;
    let _before = greeted(addr, &old).await;

    let renewed = text
        .replace(&old.cert.display().to_string(), &new.cert.display().to_string())
        .replace(&old.key.display().to_string(), &new.key.display().to_string());
    reload(&run, &config, &renewed, "configuration reloaded", 1).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert!(tls_handshake(tcp, &old).await.is_err(), "the old certificate is still served");
    let _after = greeted(addr, &new).await;
}
