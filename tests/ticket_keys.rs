//! Shared session ticket keys (`[tls] ticket_keys`): two proxies reading one key file resume
//! each other's TLS 1.3 and TLS 1.2 sessions (openssl s_client -sess_out / -sess_in); a
//! rotation keeping the old key second still resumes, dropping it does not, and a bad file
//! is refused, counted, and the keys in service stay.

mod common;

use common::openssl::s_client;
use common::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mailtls::metrics::{Metrics, Tally};
use mailtls::server::Control;

/// One key made the documented way: `openssl rand 80 | openssl base64 -A`.
fn openssl_key() -> String {
    let out = Command::new("sh")
        .args(["-c", "openssl rand 80 | openssl base64 -A"])
        .output()
        .expect("openssl rand | openssl base64");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn have_openssl() -> bool {
    let ok = Command::new("openssl").arg("version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: openssl is not installed");
    }
    ok
}

/// Replaces the key file by rename, as a rotation script (or Kubernetes) would.
fn write_keys(path: &Path, keys: &[&str]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, keys.iter().map(|k| format!("{k}\n")).collect::<String>()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A proxy on one implicit-TLS IMAP listener using the shared key file `keys` (or its own
/// keys when `None`) and the certificate of `certs`.
async fn proxy(backend: SocketAddr, certs: &Certs, keys: Option<&Path>, watch: bool) -> Proxy {
    let mut tls = format!("min_version = \"1.2\"\nwatch = {watch}\n");
    if let Some(k) = keys {
        tls.push_str(&format!("ticket_keys = {:?}\n", k.display().to_string()));
    }
    let (cert, key) = (certs.cert.display().to_string(), certs.key.display().to_string());
    Proxy::start_edited(&[Listener::new("imaps", "imap", "implicit", backend)], "", move |text| {
        // Every replica serves the same certificate, as a fleet does.
        let mut lines: Vec<String> = Vec::new();
        for line in text.lines() {
            if line == "min_version = \"1.2\"" {
                lines.push(tls.trim_end().to_owned());
            } else if line.starts_with("cert = ") {
                lines.push(format!("cert = {cert:?}"));
            } else if line.starts_with("key = ") {
                lines.push(format!("key = {key:?}"));
            } else {
                lines.push(line.to_owned());
            }
        }
        lines.join("\n")
    })
    .await
}

/// A full handshake with `addr` saving the session (a ticket) to `sess`.
async fn new_session(addr: SocketAddr, version: &str, sess: &Path) {
    let file = sess.display().to_string();
    let out = s_client(addr, &["-servername", "localhost", version, "-sess_out", &file]).await;
    assert!(out.contains("New, TLSv1."), "{out}");
    assert!(sess.exists(), "s_client saved no session: {out}");
}

/// Whether `addr` resumed the session saved in `sess`.
async fn resumes(addr: SocketAddr, version: &str, sess: &Path) -> bool {
    let sess = sess.display().to_string();
    let out = s_client(addr, &["-servername", "localhost", version, "-sess_in", &sess]).await;
    assert!(out.contains("TLSv1."), "no handshake: {out}");
    out.contains("Reused, TLSv1.")
}

async fn await_tally(metrics: &Metrics, tally: impl Fn(&Metrics) -> &Tally, want: u64) {
    let deadline = Instant::now() + PATIENCE;
    while Metrics::get(tally(metrics)) < want {
        assert!(
            Instant::now() < deadline,
            "counter stayed at {}, wanted {want}",
            Metrics::get(tally(metrics))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Fleet {
    dir: tempfile::TempDir,
    keys: PathBuf,
    a: Proxy,
    b: Proxy,
    _backend: Backend,
    _certs: Certs,
}

async fn fleet(first_keys: &[&str], watch: bool) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("ticket.keys");
    write_keys(&keys, first_keys);
    let certs = certs();
    let backend = Backend::start(Script::Imap).await;
    let a = proxy(backend.addr, &certs, Some(&keys), watch).await;
    let b = proxy(backend.addr, &certs, Some(&keys), watch).await;
    Fleet { dir, keys, a, b, _backend: backend, _certs: certs }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_from_one_replica_resumes_on_the_other_tls13_and_tls12() {
    if !have_openssl() {
        return;
    }
    let f = fleet(&[&openssl_key(), &openssl_key()], true).await;
    for version in ["-tls1_3", "-tls1_2"] {
        let sess = f.dir.path().join(format!("{version}.pem"));
        new_session(f.a.addr("imaps"), version, &sess).await;
        assert!(resumes(f.b.addr("imaps"), version, &sess).await, "{version}: B resumes A's session");
        assert!(resumes(f.a.addr("imaps"), version, &sess).await, "{version}: A resumes its own");
    }
    f.a.stop().await;
    f.b.stop().await;
}

/// The control for the test above: without a shared file each process seals with keys of
/// its own, so the other replica cannot resume (what the issue measured before the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_shared_keys_the_other_replica_makes_a_full_handshake() {
    if !have_openssl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = certs();
    let backend = Backend::start(Script::Imap).await;
    let a = proxy(backend.addr, &certs, None, true).await;
    let b = proxy(backend.addr, &certs, None, true).await;
    for version in ["-tls1_3", "-tls1_2"] {
        let sess = dir.path().join(format!("{version}.pem"));
        new_session(a.addr("imaps"), version, &sess).await;
        assert!(!resumes(b.addr("imaps"), version, &sess).await, "{version}: B has other keys");
        assert!(resumes(a.addr("imaps"), version, &sess).await, "{version}: A still resumes");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_keeping_the_old_key_second_resumes_and_dropping_it_does_not() {
    if !have_openssl() {
        return;
    }
    let (old, new) = (openssl_key(), openssl_key());
    let f = fleet(&[&old], true).await;
    let (s13, s12) = (f.dir.path().join("s13.pem"), f.dir.path().join("s12.pem"));
    new_session(f.a.addr("imaps"), "-tls1_3", &s13).await;
    new_session(f.a.addr("imaps"), "-tls1_2", &s12).await;

    // Rotation: the new key seals, the old one still opens (picked up by the watcher).
    write_keys(&f.keys, &[&new, &old]);
    await_tally(&f.a.metrics, |m| &m.ticket_key_reloads_ok, 1).await;
    await_tally(&f.b.metrics, |m| &m.ticket_key_reloads_ok, 1).await;
    assert!(resumes(f.b.addr("imaps"), "-tls1_3", &s13).await, "old key second: TLS 1.3 resumes");
    assert!(resumes(f.b.addr("imaps"), "-tls1_2", &s12).await, "old key second: TLS 1.2 resumes");
    let fresh = f.dir.path().join("fresh13.pem");
    new_session(f.b.addr("imaps"), "-tls1_3", &fresh).await;

    // The old key dropped: its tickets are full handshakes; tickets of the new key resume.
    write_keys(&f.keys, &[&new]);
    await_tally(&f.a.metrics, |m| &m.ticket_key_reloads_ok, 2).await;
    await_tally(&f.b.metrics, |m| &m.ticket_key_reloads_ok, 2).await;
    assert!(!resumes(f.a.addr("imaps"), "-tls1_3", &s13).await, "old key dropped: TLS 1.3 full handshake");
    assert!(!resumes(f.b.addr("imaps"), "-tls1_2", &s12).await, "old key dropped: TLS 1.2 full handshake");
    assert!(resumes(f.a.addr("imaps"), "-tls1_3", &fresh).await, "new key's ticket resumes on A");
    f.a.stop().await;
    f.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_file_is_refused_counted_and_the_last_good_keys_stay() {
    if !have_openssl() {
        return;
    }
    let key = openssl_key();
    let f = fleet(&[&key], true).await;
    let sess = f.dir.path().join("s13.pem");
    new_session(f.a.addr("imaps"), "-tls1_3", &sess).await;
    // A new first key and a truncated second line: all or nothing, so nothing.
    write_keys(&f.keys, &[&openssl_key(), &key[..40]]);
    await_tally(&f.a.metrics, |m| &m.ticket_key_reloads_failed, 1).await;
    await_tally(&f.b.metrics, |m| &m.ticket_key_reloads_failed, 1).await;
    assert_eq!(Metrics::get(&f.a.metrics.ticket_key_reloads_ok), 0);
    assert!(resumes(f.b.addr("imaps"), "-tls1_3", &sess).await, "the last good key still opens");
    let metrics = f.a.metrics.render();
    assert!(metrics.contains("mailtls_ticket_key_reloads_total{outcome=\"failed\"} 1"), "{metrics}");
    assert!(metrics.contains("mailtls_ticket_keys 1"), "{metrics}");
    f.a.stop().await;
    f.b.stop().await;
}

/// With the watcher off, SIGHUP (here its in-process equivalent) applies a rotation, and a
/// bad file refuses the reload while the keys in service stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_request_rotates_the_keys_when_the_watcher_is_off() {
    if !have_openssl() {
        return;
    }
    let (old, new) = (openssl_key(), openssl_key());
    let f = fleet(&[&old], false).await;
    let sess = f.dir.path().join("s12.pem");
    new_session(f.a.addr("imaps"), "-tls1_2", &sess).await;
    write_keys(&f.keys, &[&new]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(resumes(f.a.addr("imaps"), "-tls1_2", &sess).await, "no watcher: old keys until asked");
    f.a.control.send(Control::Reload).await.unwrap();
    await_tally(&f.a.metrics, |m| &m.ticket_key_reloads_ok, 1).await;
    assert!(!resumes(f.a.addr("imaps"), "-tls1_2", &sess).await, "reloaded: old key gone");
    std::fs::write(&f.keys, "not base64\n").unwrap();
    f.b.control.send(Control::Reload).await.unwrap();
    await_tally(&f.b.metrics, |m| &m.ticket_key_reloads_failed, 1).await;
    await_tally(&f.b.metrics, |m| &m.config_reloads_failed, 1).await;
    let fresh = f.dir.path().join("fresh.pem");
    new_session(f.b.addr("imaps"), "-tls1_2", &fresh).await;
    assert!(!resumes(f.a.addr("imaps"), "-tls1_2", &fresh).await, "B still seals with the old key");
    f.a.stop().await;
    f.b.stop().await;
}

/// `mailtls --check` reads the key file: a bad line is named by the config key and the key
/// file's own line; a good file's key names are listed, the sealing one first.
#[test]
fn check_names_the_config_key_and_the_bad_line_of_the_key_file() {
    if !have_openssl() {
        return;
    }
    let certs = certs();
    let keys = certs.dir.path().join("ticket.keys");
    let text = config_text(
        &certs,
        &[Listener::new("imaps", "imap", "implicit", "127.0.0.1:11143".parse().unwrap())],
        "",
    )
    .replace("min_version = \"1.2\"\n", "min_version = \"1.2\"\nticket_keys = \"ticket.keys\"\n");
    let config = certs.dir.path().join("mailtls.toml");
    std::fs::write(&config, &text).unwrap();
    let line = text.lines().position(|l| l.starts_with("ticket_keys")).unwrap() + 1;
    let check = || {
        let out = Command::new(env!("CARGO_BIN_EXE_mailtls"))
            .arg("--config")
            .arg(&config)
            .arg("--check")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = openssl_key();
    write_keys(&keys, &[&good, "this is not base64"]);
    let (ok, _, stderr) = check();
    assert!(!ok, "{stderr}");
    let want =
        format!("{}:{line}: tls.ticket_keys: {}:2: not a base64 key", config.display(), keys.display());
    assert!(stderr.contains(&want), "{stderr}");
    write_keys(&keys, &[&good, &openssl_key()]);
    let (ok, stdout, stderr) = check();
    assert!(ok, "{stdout}{stderr}");
    let name = base64::engine::general_purpose::STANDARD.decode(&good).unwrap()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    assert!(stdout.contains(&format!("ticket keys {}: {name}, ", keys.display())), "{stdout}");
    assert!(!stdout.contains(&good[20..40]), "key bytes never shown: {stdout}");
}
