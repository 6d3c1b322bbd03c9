//! A backend that is down, as the real binary reports it: the capability probe logs the
//! outage once (not every 5 s), backs off, counts each failure in a metric and logs the
//! return with how long it lasted; a session that could not reach its backend names the
//! backend it tried in its connection line.

mod common;

use common::process::*;
use common::*;

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// Waits up to `within` until `cond` holds on the log.
async fn log_until(run: &Running, within: Duration, cond: impl Fn(&str) -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond(&run.log()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cond(&run.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_backend_is_logged_once_backed_off_counted_and_its_return_logged() {
    let certs = certs();
    let down = Backend::unreachable().await;
    let listeners = [Listener::new("mx", "smtp", "starttls", down).opportunistic()];
    let (port, admin) = (free_port(), local(free_port()));
    let text = with_ports(&config_text(&certs, &listeners, ""), &[port]);
    let config = certs.dir.path().join("mailtls.toml");
    std::fs::write(&config, format!("{text}\n[admin]\nlisten = \"{admin}\"\n")).unwrap();
    let mut run = Running::mailtls(&config, &[]);
    run.wait_accepting(local(port)).await;
    let started = Instant::now();

    // Probes at 0 s and 5 s fail; the next is due at 15 s. Look at 7 s.
    assert!(run.log_shows("backend down", 1).await, "{}", run.log());
    let failures = "mailtls_capability_probe_failures_total{listener=\"mx\"}";
    scrape_until(admin, failures, 2.0).await;
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(started.elapsed())).await;
    let log = run.log();
    assert_eq!(log.matches("backend down").count(), 1, "{log}");
    assert_eq!(log.matches("capability probe failed").count(), 1, "logged at every retry: {log}");
    assert_eq!(sample(&http_get(admin, "/metrics").1, failures), Some(2.0), "backed off too little");

    // The backend comes up; the 15 s retry finds it and says how long it was gone.
    let backend = Backend::start_at(Script::SmtpNoAuth, down).await;
    let back = log_until(&run, Duration::from_secs(20), |l| l.contains("backend up again")).await;
    assert!(back, "the return was not logged: {}", run.log());
    let log = run.log();
    let line = log.lines().find(|l| l.contains("backend up again")).unwrap_or_default();
    assert!(line.contains("failed_probes=2"), "{line}");
    assert!(line.contains("after 1") && line.contains(" s down"), "{line}");
    assert!(backend.connections() >= 1);
    assert_eq!(sample(&http_get(admin, "/metrics").1, failures), Some(2.0));
    run.signal("TERM");
    run.exit_within(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_backend_is_down_logs_the_backend_it_tried() {
    let certs = certs();
    let down = Backend::unreachable().await;
    let port = free_port();
    let text =
        with_ports(&config_text(&certs, &[Listener::new("imaps", "imap", "implicit", down)], ""), &[port]);
    let config = certs.dir.path().join("mailtls.toml");
    std::fs::write(&config, text).unwrap();
    let mut run = Running::mailtls(&config, &[]);
    run.wait_accepting(local(port)).await;
    let tcp = TcpStream::connect(local(port)).await.unwrap();
    let mut c = Conn::new(tls_handshake(tcp, &certs).await.expect("TLS handshake"));
    let bye = c.line().await;
    assert!(bye.starts_with("* BYE"), "{bye:?}");
    let named = format!("backend=\"{down}\"");
    // The line of this TLS session (not of the readiness check's bare connect).
    let ours = |line: &&str| line.contains("connection closed") && line.contains("tls_version=\"TLSv1");
    let logged = log_until(&run, Duration::from_secs(5), |l| l.lines().any(|line| ours(&line))).await;
    assert!(logged, "no connection line: {}", run.log());
    let log = run.log();
    let line = log.lines().find(ours).unwrap_or_default();
    assert!(line.contains(&named), "the connection line does not name {down}: {line}");
    run.signal("TERM");
    run.exit_within(Duration::from_secs(10)).await;
}
