//! The container image, built here from the Containerfile and run as a sidecar: in a podman
//! pod beside a real Dovecot container, read-only, every capability dropped, reached from the
//! host by real IMAP and POP3 clients through the pod's published ports.
//!
//! `#[ignore]` like the interop tests: tests/run.sh runs them as root. Without root or podman
//! they print SKIPPED (and fail under CI=true). The podman commands are docs/install.md's
//! ("Container sidecar"), with config/mailtls.pod.toml as the config.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::mailservers::{dovecot_home, read_lossy, run, CLIENT_TIMEOUT, PASSWORD, USER};
use common::podman::*;
use common::process::{free_port, BIN};
use common::{certs_for, tls_handshake, Certs, Conn};
use tokio::net::TcpStream;

const IMAGE: &str = "localhost/mailtls:test";
/// The pod's Dovecot, as config/mailtls.pod.toml expects it.
const DOVECOT_IMAP: u16 = 11143;
const DOVECOT_POP3: u16 = 11110;
/// The page whose "Container sidecar" section holds the `podman run` below.
const INSTALL_DOC: &str = "docs/install.md";
/// The start of docs/install.md's `podman run` of mailtls; its options follow.
const DOC_RUN: &str = "podman run -d --pod mail --name mailtls ";
/// `podman stop -t`: above the config's timeouts.drain (30 s).
const STOP_TIMEOUT: &str = "40";
const MESSAGE: &str = "From: bob@mail.test\r\nTo: alice@mail.test\r\nSubject: through the sidecar\r\n\r\nHello from the pod.\r\n";

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The image, built once per test run from the binary the tests built (docs/install.md builds
/// it from target/release/mailtls; the Containerfile is the same either way).
fn mailtls_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let base = RUNTIME_BASE.ensure();
        let prebuilt = Path::new(BIN)
            .strip_prefix(crate_root())
            .expect("the mailtls binary inside the crate (the build context); unset CARGO_TARGET_DIR");
        let containerfile = crate_root().join("Containerfile");
        let started = Instant::now();
        podman_ok(&[
            "build",
            "--format",
            "docker",
            "--build-arg",
            &format!("RUNTIME_IMAGE={base}"),
            "--build-arg",
            "BINARY=prebuilt",
            "--build-arg",
            &format!("PREBUILT={}", prebuilt.display()),
            "-t",
            IMAGE,
            "-f",
            &containerfile.display().to_string(),
            &crate_root().display().to_string(),
        ]);
        let size = podman_ok(&["image", "inspect", "--format", "{{.Size}}", IMAGE]);
        say(&format!("built {IMAGE} in {:.1?}: {} bytes", started.elapsed(), size.trim()));
    });
    IMAGE
}

/// The host ports published for mailtls's four listeners.
struct Ports {
    imaps: u16,
    imap: u16,
    pop3s: u16,
    pop3: u16,
}

/// A pod with Dovecot and mailtls. Fields drop in order: mailtls, Dovecot, the pod, the dir.
struct Sidecar {
    mailtls: Container,
    dovecot: Container,
    _pod: Pod,
    ports: Ports,
    certs: Certs,
    dir: tempfile::TempDir,
}

impl Sidecar {
    fn start(config: &str) -> Sidecar {
        // Both images at once: on a fresh machine each base takes a debootstrap.
        let (image, dovecot_image) = std::thread::scope(|s| {
            let dovecot = s.spawn(|| SYSTEMD_BASE.ensure());
            (mailtls_image(), dovecot.join().expect("the Dovecot image"))
        });
        let dir = tempfile::Builder::new().prefix("mailtls-sidecar-").tempdir_in("/tmp").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let certs = certs_for(&["mail.example.org", "localhost", "127.0.0.1"]);
        write_letsencrypt(dir.path(), &certs, 1);
        dovecot_home(&dir.path().join("dovecot"), "/srv/dovecot", DOVECOT_IMAP, DOVECOT_POP3, MESSAGE);
        let config_path = dir.path().join("mailtls.toml");
        fs::write(&config_path, config).unwrap();
        fs::set_permissions(&config_path, fs::Permissions::from_mode(0o644)).unwrap();

        let ports = Ports { imaps: free_port(), imap: free_port(), pop3s: free_port(), pop3: free_port() };
        let pod = Pod::create(
            "pod",
            &[(ports.imaps, 10993), (ports.imap, 10143), (ports.pop3s, 10995), (ports.pop3, 10110)],
        );
        let dovecot_home = format!("{}:/srv/dovecot", dir.path().join("dovecot").display());
        let dovecot = Container::start(
            "dovecot",
            &[
                "--pod",
                &pod.name,
                "-v",
                &dovecot_home,
                dovecot_image,
                "dovecot",
                "-F",
                "-c",
                "/srv/dovecot/dovecot.conf",
            ],
        );
        let log = dir.path().join("dovecot/dovecot.log");
        wait_for(
            "Dovecot starts",
            Duration::from_secs(60),
            || read_lossy(&log).contains("starting up").then_some(()),
            || dovecot.logs(),
        );

        let started = Instant::now();
        let mailtls = run_mailtls(&pod, dir.path(), image);
        let to_healthy = wait_for(
            "podman healthcheck run says healthy",
            Duration::from_secs(60),
            || podman(&["healthcheck", "run", &mailtls.name]).success().then(|| started.elapsed()),
            || mailtls.logs(),
        );
        say(&format!("figure: mailtls container from podman run to healthy in {to_healthy:.2?}"));
        Sidecar { mailtls, dovecot, _pod: pod, ports, certs, dir }
    }

    fn dovecot_log(&self) -> String {
        read_lossy(&self.dir.path().join("dovecot/dovecot.log"))
    }

    /// mailtls's stdout: its JSON log lines.
    fn mailtls_stdout(&self) -> String {
        podman(&["logs", &self.mailtls.name]).stdout
    }

    fn why(&self) -> String {
        format!(
            "----- mailtls -----\n{}\n----- dovecot -----\n{}{}",
            self.mailtls.logs(),
            self.dovecot.logs(),
            self.dovecot_log()
        )
    }
}

/// docs/install.md's `podman run` of the sidecar (read-only root, no capability, no
/// privilege gain, config and certificates mounted read-only, a stop timeout above the
/// drain time), taken from the page with this test's pod, config and certificate directory.
fn run_mailtls(pod: &Pod, dir: &Path, image: &str) -> Container {
    let doc = fs::read_to_string(crate_root().join(INSTALL_DOC)).unwrap();
    let section = doc.split_once("\n## Container sidecar\n").expect("docs/install.md's sidecar section").1;
    let at = section.find(DOC_RUN).expect("docs/install.md's podman run of mailtls");
    let mut command = String::new();
    for line in section[at..].lines() {
        command.push_str(line.trim_end_matches('\\'));
        command.push(' ');
        if !line.ends_with('\\') {
            break;
        }
    }
    let config = format!("{}:", dir.join("mailtls.toml").display());
    let certs = format!("{}:", dir.join("letsencrypt").display());
    let args: Vec<String> = command[DOC_RUN.len()..]
        .split_whitespace()
        .map(|a| match a {
            "localhost/mailtls:test" => image.to_owned(),
            a => {
                a.replacen("./config/mailtls.pod.toml:", &config, 1).replacen("/etc/letsencrypt:", &certs, 1)
            }
        })
        .collect();
    assert!(
        args.iter().any(|a| a == "--read-only") && args.iter().any(|a| a == "--cap-drop=ALL"),
        "{args:?}"
    );
    let mut all = vec!["--pod", pod.name.as_str()];
    all.extend(args.iter().map(String::as_str));
    Container::start("mailtls", &all)
}

/// A certbot-style tree: live/NAME/{fullchain,privkey}.pem linking to archive/NAME/*N.pem.
/// The key is readable by the container's user (65532) through its group, not by others.
fn write_letsencrypt(dir: &Path, certs: &Certs, n: u32) {
    let archive = dir.join("letsencrypt/archive/mail.example.org");
    let live = dir.join("letsencrypt/live/mail.example.org");
    for d in [&archive, &live] {
        fs::create_dir_all(d).unwrap();
    }
    let fullchain = archive.join(format!("fullchain{n}.pem"));
    let privkey = archive.join(format!("privkey{n}.pem"));
    fs::copy(&certs.cert, &fullchain).unwrap();
    fs::copy(&certs.key, &privkey).unwrap();
    fs::set_permissions(&fullchain, fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&privkey, Some(0), Some(65532)).unwrap();
    fs::set_permissions(&privkey, fs::Permissions::from_mode(0o640)).unwrap();
    // As certbot renews: each link removed and made anew, the certificate first, so for a
    // moment the new certificate and the old key are both in place.
    for (link, target) in
        [("fullchain.pem", format!("fullchain{n}.pem")), ("privkey.pem", format!("privkey{n}.pem"))]
    {
        let link = live.join(link);
        let _ = fs::remove_file(&link);
        symlink(Path::new("../../archive/mail.example.org").join(target), &link).unwrap();
    }
}

/// Python's imaplib or poplib, as a mail program, from the host through a published port:
/// logs in and fetches every message.
fn fetch(proto: &str, mode: &str, port: u16, ca: &Path, out: &Path) -> Result<Vec<String>, String> {
    let script = crate_root().join("tests/interop/fetch.py");
    let mut c = Command::new("python3");
    c.arg(script).args([proto, mode, &port.to_string()]).arg(ca).args(["127.0.0.1", USER, PASSWORD]).arg(out);
    let o = run(&mut c, CLIENT_TIMEOUT);
    if !o.success() {
        return Err(format!("{proto} {mode}: {:?} {}{}", o.status, o.stdout, o.stderr));
    }
    let mut messages = Vec::new();
    for entry in fs::read_dir(out).unwrap() {
        messages.push(read_lossy(&entry.unwrap().path()));
    }
    Ok(messages)
}

/// The client addresses in mailtls's per-connection JSON lines.
fn mailtls_clients(stdout: &str) -> BTreeSet<String> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "connection closed")
        .filter_map(|v| v["client"].as_str().and_then(|c| c.rsplit_once(':')).map(|(ip, _)| ip.to_owned()))
        .collect()
}

fn pod_config() -> String {
    fs::read_to_string(crate_root().join("config/mailtls.pod.toml")).unwrap()
}

#[test]
#[ignore = "needs root and podman; run by tests/run.sh"]
fn sidecar_in_a_pod_serves_imap_and_pop3_logins_with_the_clients_address_and_is_healthy() {
    if !can_run("sidecar container tests") {
        return;
    }
    let pod = Sidecar::start(&pod_config());
    let m = &pod.mailtls;
    assert_eq!(m.inspect("{{.State.Health.Status}}"), "healthy", "{}", pod.why());
    assert_eq!(m.inspect("{{.Config.User}}"), "65532:65532");
    assert_eq!(m.inspect("{{.HostConfig.ReadonlyRootfs}}"), "true");
    assert_eq!(m.inspect("{{.Config.StopSignal}}"), "15", "STOPSIGNAL SIGTERM kept (--format docker)");
    let top = podman_ok(&["top", &m.name, "user", "capeff"]);
    assert!(top.lines().nth(1).is_some_and(|l| l.contains("65532") && !l.contains("CHOWN")), "{top}");

    for (proto, mode, port) in [
        ("imap", "implicit", pod.ports.imaps),
        ("imap", "starttls", pod.ports.imap),
        ("pop3", "implicit", pod.ports.pop3s),
        ("pop3", "starttls", pod.ports.pop3),
    ] {
        let out = pod.dir.path().join(format!("fetched-{proto}-{mode}"));
        let messages =
            fetch(proto, mode, port, &pod.certs.cert, &out).unwrap_or_else(|e| panic!("{e}\n{}", pod.why()));
        assert_eq!(messages.len(), 1, "{proto} {mode}");
        assert!(messages[0].contains("Hello from the pod."), "{proto} {mode}: {:?}", messages[0]);
    }

    // Dovecot saw each login as the client's, TLS-secured, through the PROXY v2 header.
    let clients = mailtls_clients(&pod.mailtls_stdout());
    assert!(!clients.is_empty() && !clients.contains("127.0.0.1"), "{clients:?}\n{}", pod.why());
    let log = pod.dovecot_log();
    let logins: Vec<&str> =
        log.lines().filter(|l| l.contains("-login: Info: Login: user=<alice@mail.test>")).collect();
    assert_eq!(logins.len(), 4, "{log}");
    for line in logins {
        let rip = line.split(", ").find_map(|f| f.strip_prefix("rip=")).unwrap_or_default();
        assert!(clients.contains(rip), "Dovecot's rip={rip}, mailtls's clients {clients:?}: {line}");
        assert!(line.contains(", secured,"), "{line}");
    }
    // JSON lines on stdout, nothing else.
    let stdout = pod.mailtls_stdout();
    assert!(stdout.lines().count() > 3, "{stdout}");
    for line in stdout.lines() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "not JSON: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and podman; run by tests/run.sh"]
async fn sidecar_serves_a_certificate_renewed_on_the_host_without_a_restart() {
    if !can_run("sidecar container tests") {
        return;
    }
    let pod = Sidecar::start(&pod_config());
    let pid = pod.mailtls.inspect("{{.State.Pid}}");
    let first = TcpStream::connect(("127.0.0.1", pod.ports.imaps)).await.unwrap();
    tls_handshake(first, &pod.certs).await.expect("the first certificate is served");

    let renewed = certs_for(&["mail.example.org", "localhost", "127.0.0.1"]);
    write_letsencrypt(pod.dir.path(), &renewed, 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tcp = TcpStream::connect(("127.0.0.1", pod.ports.imaps)).await.unwrap();
        if tls_handshake(tcp, &renewed).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the renewed certificate is not served\n{}", pod.why());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(pod.mailtls.inspect("{{.State.Pid}}"), pid, "the same process serves it");
    assert_eq!(pod.mailtls.inspect("{{.RestartCount}}"), "0");
    // A session on the new certificate still reaches Dovecot.
    let tcp = TcpStream::connect(("127.0.0.1", pod.ports.imaps)).await.unwrap();
    let mut imap = Conn::new(tls_handshake(tcp, &renewed).await.unwrap());
    assert!(imap.line().await.starts_with("* OK"), "{}", pod.why());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and podman; run by tests/run.sh"]
async fn podman_stop_drains_an_open_session_and_the_container_exits_0() {
    if !can_run("sidecar container tests") {
        return;
    }
    let pod = Sidecar::start(&pod_config());
    let tcp = TcpStream::connect(("127.0.0.1", pod.ports.imaps)).await.unwrap();
    let mut imap = Conn::new(tls_handshake(tcp, &pod.certs).await.unwrap());
    assert!(imap.line().await.starts_with("* OK"), "{}", pod.why());
    imap.send(format!("a LOGIN {USER} {PASSWORD}\r\n")).await;
    let reply = imap.lines_until(|l| l.starts_with("a ")).await;
    assert!(reply.last().is_some_and(|l| l.starts_with("a OK")), "{reply:?}\n{}", pod.why());

    let name = pod.mailtls.name.clone();
    let stop = tokio::task::spawn_blocking(move || podman(&["stop", "-t", STOP_TIMEOUT, &name]));
    let stopping = Instant::now() + Duration::from_secs(30);
    while !pod.mailtls_stdout().contains("stopping: no new connections") {
        assert!(Instant::now() < stopping, "no SIGTERM seen\n{}", pod.why());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Draining: the logged-in session still works after SIGTERM, until it logs out.
    imap.send("b SELECT INBOX\r\n").await;
    let reply = imap.lines_until(|l| l.starts_with("b ")).await;
    assert!(reply.last().is_some_and(|l| l.starts_with("b OK")), "{reply:?}\n{}", pod.why());
    imap.send("c LOGOUT\r\n").await;
    let bye = imap.lines_until(|l| l.starts_with("c ")).await;
    assert!(bye.iter().any(|l| l.starts_with("* BYE")), "{bye:?}");
    // The mail program closes after LOGOUT: the last session is over, nothing is left to drain.
    drop(imap);
    let stopped = stop.await.unwrap();
    assert!(stopped.success(), "podman stop: {}{}", stopped.stdout, stopped.stderr);
    let code = pod.mailtls.exit_code_within(Duration::from_secs(10));
    assert_eq!(code, Some(0), "exit code (137: killed at the stop timeout)\n{}", pod.why());
    let log = pod.mailtls_stdout();
    assert!(log.contains("\"stopped\""), "{}", pod.why());
    assert!(!log.contains("drain time over"), "the session was cut off, not drained\n{log}");
}

#[test]
#[ignore = "needs root and podman; run by tests/run.sh"]
fn a_bad_config_makes_the_container_exit_at_once_naming_key_and_line() {
    if !can_run("sidecar container tests") {
        return;
    }
    let image = mailtls_image();
    let dir = tempfile::Builder::new().prefix("mailtls-badconfig-").tempdir_in("/tmp").unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let certs = certs_for(&["mail.example.org"]);
    write_letsencrypt(dir.path(), &certs, 1);
    // Line 46 of config/mailtls.pod.toml is pop3s's backend.
    let config = pod_config().replacen("backend = \"127.0.0.1:11110\"", "backend = \"127.0.0.1\"", 1);
    let line = config.lines().position(|l| l == "backend = \"127.0.0.1\"").unwrap() + 1;
    fs::write(dir.path().join("mailtls.toml"), config).unwrap();
    fs::set_permissions(dir.path().join("mailtls.toml"), fs::Permissions::from_mode(0o644)).unwrap();
    let pod = Pod::create("badpod", &[]);
    let mailtls = run_mailtls(&pod, dir.path(), image);
    let code = mailtls.exit_code_within(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{}", mailtls.logs());
    let logs = mailtls.logs();
    let expected =
        format!("/etc/mailtls/mailtls.toml:{line}: listeners[2].backend: \"127.0.0.1\" is not host:port");
    assert!(logs.contains(&expected), "wanted {expected:?} in:\n{logs}");
}
