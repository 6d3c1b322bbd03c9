//! The real binary's admin endpoint (/metrics moves with real traffic, /healthz and the
//! `--healthcheck` client) and its JSON logs (per-connection fields as JSON fields).

mod common;

use common::process::*;
use common::*;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Writes a config for `listeners` on fixed ports plus an admin endpoint; returns the
/// config path, the listener ports in order and the admin address.
fn write_config(
    certs: &Certs,
    listeners: &[Listener],
    extra: &str,
) -> (PathBuf, Vec<u16>, std::net::SocketAddr) {
    let ports: Vec<u16> = listeners.iter().map(|_| free_port()).collect();
    let admin = local(free_port());
    let text = with_ports(&config_text(certs, listeners, extra), &ports);
    let text = format!("{text}\n[admin]\nlisten = \"{admin}\"\n");
    let path = certs.dir.path().join("mailtls.toml");
    std::fs::write(&path, text).unwrap();
    (path, ports, admin)
}

fn healthcheck(config: &std::path::Path) -> bool {
    Command::new(BIN).arg("--config").arg(config).arg("--healthcheck").status().unwrap().success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_healthz_follows_the_life_of_the_process() {
    let imap_backend = Backend::start(Script::Imap).await;
    let smtp_backend = Backend::start(Script::Smtp).await;
    let down = Backend::unreachable().await;
    let certs = certs();
    let (config, ports, admin) = write_config(
        &certs,
        &[
            Listener::new("imaps", "imap", "implicit", imap_backend.addr),
            Listener::new("submission", "smtp", "starttls", smtp_backend.addr),
            Listener::new("pop3s", "pop3", "implicit", down),
        ],
        "",
    );
    let mut run = Running::mailtls(&config, &[]);
    run.wait_accepting(local(ports[0])).await;
    run.wait_accepting(admin).await;

    assert_eq!(http_get(admin, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(http_get(admin, "/nope").0, 404);
    assert!(healthcheck(&config), "--healthcheck against a serving instance");
    let (_, before) = http_get(admin, "/metrics");
    let accepted_imaps = "mailtls_connections_accepted_total{listener=\"imaps\"}";
    // wait_accepting's probe connection was accepted (and counted) already.
    let probes = sample(&before, accepted_imaps).unwrap_or(0.0);
    // ... and, closed without a ClientHello, counted as a failed handshake.
    let failed = "mailtls_tls_handshakes_total{listener=\"imaps\",outcome=\"failed\",version=\"none\"}";
    let failed_before = sample(&scrape_until(admin, failed, probes).await, failed).unwrap_or(0.0);
    assert_eq!(
        sample(
            &before,
            "mailtls_tls_handshakes_total{listener=\"imaps\",outcome=\"ok\",version=\"TLSv1.3\"}"
        ),
        None
    );

    // One relayed IMAP session, a failed handshake, a refused AUTH, an injection, a backend down.
    traffic::one_of_each(
        &traffic::Roles { imaps: ports[0], submission: ports[1], pop3s_down: ports[2] },
        &certs,
    )
    .await;

    let m = scrape_until(admin, "mailtls_sessions_by_engine_total{listener=\"imaps\",engine=\"copy\"}", 1.0)
        .await;
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&m, series), Some(value), "{series} in\n{m}");
    };
    expect(accepted_imaps, probes + 2.0);
    expect("mailtls_tls_handshakes_total{listener=\"imaps\",outcome=\"ok\",version=\"TLSv1.3\"}", 1.0);
    expect(failed, failed_before + 1.0);
    expect("mailtls_plaintext_logins_refused_total{listener=\"submission\"}", 1.0);
    expect("mailtls_starttls_upgrades_total{listener=\"submission\"}", 1.0);
    expect("mailtls_starttls_injection_attempts_total{listener=\"submission\"}", 1.0);
    expect("mailtls_backend_failures_total{listener=\"pop3s\"}", 1.0);
    expect("mailtls_sessions_by_engine_total{listener=\"imaps\",engine=\"copy\"}", 1.0);
    let to_client =
        sample(&m, "mailtls_bytes_total{listener=\"imaps\",direction=\"to_client\"}").unwrap_or(0.0);
    let to_backend =
        sample(&m, "mailtls_bytes_total{listener=\"imaps\",direction=\"to_backend\"}").unwrap_or(0.0);
    assert!(to_client > 0.0 && to_backend > 0.0, "{m}");
    let not_after = m
        .lines()
        .find(|l| l.starts_with("mailtls_certificate_not_after_seconds{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .expect("a certificate expiry gauge");
    assert!(not_after > 1.7e9, "{m}");
    let m = scrape_until(admin, "mailtls_connections_open{listener=\"imaps\"}", 0.0).await;
    assert!(m.contains("# TYPE mailtls_connections_open gauge"), "{m}");

    run.signal("TERM");
    let status = run.exit_within(Duration::from_secs(10)).await.expect("exits");
    assert!(status.success(), "{}", run.log());
    assert!(!healthcheck(&config), "--healthcheck with nothing running must fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_connection_fields_as_fields_on_the_chosen_stream() {
    let backend = Backend::start(Script::Imap).await;
    let certs = certs();
    let (config, ports, _) =
        write_config(&certs, &[Listener::new("imaps", "imap", "implicit", backend.addr)], "");
    let mut run = Running::mailtls(&config, &["--log-format", "json", "--log-target", "stdout"]);
    run.wait_accepting(local(ports[0])).await;
    let tcp = TcpStream::connect(local(ports[0])).await.unwrap();
    let mut imap = Conn::new(tls_handshake_sni(tcp, &certs, "mail.test").await.unwrap());
    assert!(imap.line().await.starts_with("* OK"));
    imap.send("a LOGIN echo x\r\n").await;
    assert!(imap.line().await.starts_with("a OK"));
    imap.send("hello\r\n").await;
    assert_eq!(imap.line().await, "hello\r\n");
    // A clean close (close_notify, then EOF from the backend) so the outcome is "relayed".
    imap.stream.shutdown().await.unwrap();
    imap.rest().await;
    run.signal("TERM");
    assert!(run.exit_within(Duration::from_secs(10)).await.is_some_and(|s| s.success()), "{}", run.log());

    let stdout = run.stdout();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!run.log().contains("connection closed"), "logs went to stderr: {}", run.log());
    let tls_session = lines
        .iter()
        .find(|l| l["message"] == "connection closed" && l["sni"] == "mail.test")
        .unwrap_or_else(|| panic!("no connection line with SNI in {stdout}"));
    assert_eq!(tls_session["listener"], "imaps");
    assert!(tls_session["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")), "{tls_session}");
    assert!(tls_session["tls_version"].as_str().is_some_and(|v| v.starts_with("TLSv1.")), "{tls_session}");
    assert!(tls_session["cipher"].as_str().is_some_and(|c| c.starts_with("TLS_")), "{tls_session}");
    assert_eq!(tls_session["engine"], "copy");
    // mailtls's own end of the backend connection (tests/interop_courier.rs joins Courier's
    // logins to their clients by it).
    let source = tls_session["backend_source"].as_str().unwrap_or_default();
    assert!(source.starts_with("127.0.0.1:") && source != tls_session["client"], "{tls_session}");
    assert!(tls_session["bytes_in"].as_u64().is_some_and(|b| b > 0), "{tls_session}");
    assert!(tls_session["bytes_out"].as_u64().is_some_and(|b| b > 0), "{tls_session}");
    assert!(tls_session["duration_ms"].is_u64(), "{tls_session}");
    assert_eq!(tls_session["outcome"], "relayed");
    assert_eq!(tls_session["level"], "INFO");
}
