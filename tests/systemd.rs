//! The real binary under systemd-socket-activate: named inherited sockets serve TLS and
//! STARTTLS, notifications (READY, STATUS, RELOADING with MONOTONIC_USEC, STOPPING) reach
//! NOTIFY_SOCKET, and the unit files in systemd/ pass `systemd-analyze`.

mod common;

use common::process::*;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::net::{TcpStream, UnixDatagram};

/// systemd-socket-activate listening on `ports` with `names`, running mailtls on `config`,
/// with notifications sent to `notify` and a 200 ms watchdog (as WatchdogSec= would set).
fn socket_activate(ports: &[u16], names: &[&str], config: &Path, notify: &Path) -> Running {
    let mut cmd = Command::new("systemd-socket-activate");
    for p in ports {
        cmd.arg("-l").arg(format!("127.0.0.1:{p}"));
    }
    cmd.arg(format!("--fdname={}", names.join(":")))
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.display()))
        .arg("--setenv=WATCHDOG_USEC=200000")
        .arg(BIN)
        .arg("--config")
        .arg(config);
    Running::spawn(cmd, config.parent().unwrap())
}

/// Connects, retrying while systemd-socket-activate is still starting up. Its sockets
/// queue connections in the kernel until mailtls (started by the first one) accepts them.
async fn connect(port: u16) -> TcpStream {
    for _ in 0..200 {
        if let Ok(s) = TcpStream::connect(local(port)).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {port}");
}

/// Notification datagrams until one contains `last`.
async fn notifications_until(socket: &UnixDatagram, last: &str, run: &Running) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let mut buf = vec![0u8; 4096];
        let n = match tokio::time::timeout(PATIENCE, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => panic!("no {last:?} notification; got {out:?}; log: {}", run.log()),
        };
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = message.lines().any(|l| l == last);
        out.push(message);
        if done {
            return out;
        }
    }
}

/// Two listeners whose `listen` addresses mailtls could never bind (TEST-NET-1 is not on
/// this host): only the sockets systemd passes can make them serve.
fn unbindable_config(certs: &Certs, imap: std::net::SocketAddr, smtp: std::net::SocketAddr) -> PathBuf {
    let text = config_text(
        certs,
        &[
            Listener::new("imaps", "imap", "implicit", imap),
            Listener::new("submission", "smtp", "starttls", smtp),
        ],
        "",
    )
    .replacen("127.0.0.1:0", "192.0.2.1:993", 1)
    .replacen("127.0.0.1:0", "192.0.2.1:587", 1);
    let path = certs.dir.path().join("mailtls.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activated_binary_serves_tls_on_named_sockets_and_notifies_systemd() {
    let imap_backend = Backend::start(Script::Imap).await;
    let smtp_backend = Backend::start(Script::Smtp).await;
    let certs = certs();
    let config = unbindable_config(&certs, imap_backend.addr, smtp_backend.addr);
    let notify_path = certs.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let (imaps, submission) = (free_port(), free_port());
    // The order of the names differs from the config's on purpose: matching is by name.
    let mut run = socket_activate(&[submission, imaps], &["submission", "imaps"], &config, &notify_path);

    // Implicit TLS through the inherited "imaps" socket (this connection starts mailtls).
    let mut imap = Conn::new(tls_handshake(connect(imaps).await, &certs).await.expect("TLS on imaps"));
    assert!(imap.line().await.starts_with("* OK"), "{}", run.log());
    imap.send("a LOGIN echo x\r\n").await;
    assert!(imap.line().await.starts_with("a OK"));

    // STARTTLS through the inherited "submission" socket.
    let mut smtp = Conn::new(connect(submission).await);
    assert!(smtp.line().await.starts_with("220 "));
    smtp.send("EHLO client.test\r\n").await;
    assert!(smtp.smtp_reply().await.iter().any(|l| l.contains("STARTTLS")));
    smtp.send("STARTTLS\r\n").await;
    assert!(smtp.line().await.starts_with("220 "));
    let mut smtp = smtp.upgrade(&certs).await;
    smtp.send("EHLO client.test\r\n").await;
    assert!(smtp.smtp_reply().await[0].starts_with("250"));
    assert_eq!(smtp_backend.connections(), 1);
    assert!(run.log().contains("using sockets passed by systemd"), "{}", run.log());

    let ready = notifications_until(&notify, "READY=1", &run).await;
    let status = ready.iter().flat_map(|m| m.lines()).find(|l| l.starts_with("STATUS=")).unwrap_or_default();
    assert!(status.contains("2 listeners (imaps, submission)"), "{ready:?}");
    assert!(status.contains("soonest certificate expiry"), "{ready:?}");

    run.signal("HUP");
    let reload = notifications_until(&notify, "READY=1", &run).await;
    let reloading = reload.iter().find(|m| m.lines().any(|l| l == "RELOADING=1")).expect("RELOADING=1");
    let usec = reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).expect("MONOTONIC_USEC");
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{reloading:?}");

    // Half the watchdog interval apart: several pings within a second.
    tokio::time::sleep(Duration::from_millis(700)).await;
    run.signal("TERM");
    let last = notifications_until(&notify, "STOPPING=1", &run).await;
    let pings =
        ready.iter().chain(&reload).chain(&last).filter(|m| m.lines().any(|l| l == "WATCHDOG=1")).count();
    assert!(pings >= 4, "{pings} watchdog pings: {ready:?} {reload:?} {last:?}");
    drop((imap, smtp));
    let status = run.exit_within(Duration::from_secs(10)).await.expect("mailtls exits");
    assert!(status.success(), "{}", run.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inherited_socket_no_listener_claims_stops_the_start() {
    let certs = certs();
    let backend = Backend::unreachable().await;
    let config = unbindable_config(&certs, backend, backend);
    let notify_path = certs.dir.path().join("notify.sock");
    let (a, b, c) = (free_port(), free_port(), free_port());
    let mut run = socket_activate(&[a, b, c], &["imaps", "submission", "pop3s"], &config, &notify_path);
    drop(connect(a).await);
    let status = run.exit_within(Duration::from_secs(10)).await.expect("mailtls exits");
    assert!(!status.success());
    let log = run.log();
    assert!(log.contains("[\"pop3s\"]") && log.contains("no listener has that name"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The units with ExecStart pointing at the binary just built (verify wants it to exist).
fn units_here(dir: &Path) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap().replace("/usr/local/bin/mailtls", BIN);
        let copy = dir.join(path.file_name().unwrap());
        std::fs::write(&copy, text).unwrap();
        out.push(copy);
    }
    out.sort();
    out
}

#[test]
fn units_pass_systemd_analyze_verify_and_the_security_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let units = units_here(dir.path());
    let out = Command::new("systemd-analyze").arg("verify").args(&units).output().expect("systemd-analyze");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    let service = units.iter().find(|u| u.ends_with("mailtls.service")).unwrap();
    // --threshold is in tenths of the exposure score: fail above 2.0 ("OK" is below 2.0).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(service)
        .output()
        .expect("systemd-analyze security");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exposure above 2.0:\n{report}");
}

#[test]
fn socket_unit_names_match_the_example_configs_listeners() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = std::fs::read_to_string(root.join("config/mailtls.example.toml")).unwrap();
    let service = std::fs::read_to_string(root.join("systemd/mailtls.service")).unwrap();
    let mut sockets = 0;
    for entry in std::fs::read_dir(root.join("systemd")).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(role) = file.strip_prefix("mailtls-").and_then(|f| f.strip_suffix(".socket")) else {
            continue;
        };
        sockets += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("\nFileDescriptorName={role}\n")), "{file}");
        assert!(text.contains("\nService=mailtls.service\n"), "{file}");
        assert!(
            config.contains(&format!("name = \"{role}\"")),
            "{role} is no listener of the example config"
        );
        // Sockets= would make the service start and receive every socket unit, also those of
        // roles the config has no listener for (tests/container_systemd.rs shows the fix).
        assert!(!service.lines().any(|l| l.starts_with("Sockets=")), "mailtls.service has Sockets=");
    }
    assert_eq!(sockets, 7, "one socket unit per port role");
}
