//! The SMTP half of the backend matrix: Exim and OpenSMTPD, each in a container of its own
//! made from Debian's packages on the one runtime base, mailtls on the host in front of it.
//!
//! Debian's MTAs conflict with each other and with the host's Postfix, hence the
//! containers. Each runs with `--network host` on high 127.0.0.1 ports, its config, log and
//! mailbox in a host directory mounted at /data, so a test reads the backend's own log and
//! mailbox as files. [`Site`] stops mailtls and removes the container when dropped (logs
//! first, if the test is failing).

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::mailservers::{
    read_lossy, run, smtp_ehlo, spawn_mailtls, strip_ansi, wait_for_port, write_certificates, Output,
    CLIENT_TIMEOUT, STARTUP,
};
use super::podman::{Container, DerivedImage};

/// Exim 4.96 with PROXY support: the light daemon (Debian's default) has none.
pub static EXIM_IMAGE: DerivedImage =
    DerivedImage::new("localhost/mailtls-test-exim:bookworm-1", &["exim4-daemon-heavy"], &MAKING_EXIM);
/// OpenSMTPD 6.8, Debian 12's.
pub static OPENSMTPD_IMAGE: DerivedImage =
    DerivedImage::new("localhost/mailtls-test-opensmtpd:bookworm-1", &["opensmtpd"], &MAKING_OPENSMTPD);

static MAKING_EXIM: Mutex<()> = Mutex::new(());
static MAKING_OPENSMTPD: Mutex<()> = Mutex::new(());

/// The address real clients bind to: not mailtls's own 127.0.0.1, so the backend's log
/// shows whether the PROXY header carried the client.
pub const CLIENT_IP: &str = "127.0.0.2";

/// `n` free 127.0.0.1 ports, all held while choosing so none repeats.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// A backend container and the mailtls in front of it. Fields drop in order: mailtls
/// first, then the container, the directory last.
pub struct Site {
    mailtls: Option<Child>,
    container: Option<Container>,
    /// The backend's log, relative to the data directory.
    log: &'static str,
    pub dir: tempfile::TempDir,
}

impl Site {
    /// Writes `files` (name, text) into the data directory, starts `image` running `script`
    /// with that directory at /data, and waits until it listens on `ports`.
    pub fn start(
        label: &str,
        image: &DerivedImage,
        files: &[(&str, String)],
        script: &str,
        ports: &[u16],
        log: &'static str,
    ) -> Site {
        let image = image.ensure();
        let dir = tempfile::Builder::new().prefix("mailtls-mta-").tempdir_in("/tmp").unwrap();
        let data = dir.path().join("data");
        for sub in ["", "log", "mail"] {
            fs::create_dir_all(data.join(sub)).unwrap();
            // The MTAs write as their own users (Debian-exim, alice).
            fs::set_permissions(data.join(sub), fs::Permissions::from_mode(0o777)).unwrap();
        }
        for (name, text) in files {
            fs::write(data.join(name), text).unwrap();
        }
        write_certificates(dir.path());
        // The backend's own TLS client (a sending MTA through mailtls) trusts the same root.
        fs::copy(dir.path().join("ca.pem"), data.join("ca.pem")).unwrap();
        let volume = format!("{}:/data", data.display());
        let container =
            Container::start(label, &["--network", "host", "-v", &volume, image, "sh", "-c", script]);
        let site = Site { mailtls: None, container: Some(container), log, dir };
        for port in ports {
            wait_for_port(*port, label, || site.backend_log());
        }
        site
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The root CA the clients trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The backend's own log (Exim's mainlog, OpenSMTPD's stderr).
    pub fn backend_log(&self) -> String {
        read_lossy(&self.data().join(self.log))
    }

    pub fn mailtls_log(&self) -> String {
        strip_ansi(&read_lossy(&self.dir.path().join("mailtls.log")))
    }

    /// Starts mailtls with `listeners` (TOML `[[listeners]]` tables) and waits until each
    /// of `ports` listens.
    pub fn start_mailtls(&mut self, listeners: &str, ports: &[u16]) {
        let d = self.dir.path().display();
        let config = format!(
            "hostname = \"mx.mail.test\"\n\n[tls]\n[[tls.certificates]]\ncert = \"{d}/chain.pem\"\n\
             key = \"{d}/key.pem\"\n\n[timeouts]\ndrain = 1\n{listeners}"
        );
        self.mailtls = Some(spawn_mailtls(self.dir.path(), &config));
        for port in ports {
            wait_for_port(*port, "mailtls", || self.mailtls_log());
        }
    }

    /// Waits until the opportunistic listener on `port` answers EHLO with what it learned
    /// from the backend (SIZE is the backend's, never mailtls's own); that reply.
    pub fn wait_for_probe(&self, port: u16) -> String {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok(reply) = smtp_ehlo(port) {
                if reply.contains("SIZE") {
                    return reply;
                }
            }
            assert!(Instant::now() < deadline, "no probe on {port}:\n{}", self.mailtls_log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls the backend's log until `done` holds; the log then.
    pub fn wait_for_log(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + STARTUP;
        loop {
            let log = self.backend_log();
            if done(&log) {
                return log;
            }
            assert!(Instant::now() < deadline, "{what}: not in the backend's log:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- mailtls.log -----\n{}", self.mailtls_log());
            eprintln!("----- {} -----\n{}", self.log, self.backend_log());
        }
        if let Some(mut child) = self.mailtls.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.container.take();
    }
}

/// One `[[listeners]]` table of an SMTP listener; `extra` holds further `key = value` lines.
pub fn smtp_listener(name: &str, tls: &str, port: u16, backend: u16, proxy: &str, extra: &str) -> String {
    let opportunistic = if name.starts_with("mx") { "require_tls = false\n" } else { "" };
    format!(
        "\n[[listeners]]\nname = \"{name}\"\nprotocol = \"smtp\"\ntls = \"{tls}\"\n{opportunistic}\
         listen = [\"127.0.0.1:{port}\"]\nbackend = \"127.0.0.1:{backend}\"\nproxy_protocol = \"{proxy}\"\n{extra}"
    )
}

/// swaks through mailtls's `port` from CLIENT_IP, a message whose Subject names `tag`;
/// `args` add TLS, AUTH or pipelining. Must succeed: its transcript.
pub fn swaks(site: &Site, port: u16, tag: &str, args: &[&str]) -> String {
    let out = swaks_run(site, port, tag, args);
    assert!(out.success(), "swaks {tag} ({:?}):\n{}{}", out.status, out.stdout, out.stderr);
    out.stdout
}

/// swaks as [`swaks`], whatever its outcome.
pub fn swaks_run(site: &Site, port: u16, tag: &str, args: &[&str]) -> Output {
    let mut c = Command::new("swaks");
    c.args(["--server", &format!("127.0.0.1:{port}"), "--local-interface", CLIENT_IP]);
    c.args(["--ehlo", "client.example"]);
    for (option, default) in [("--from", "carol@sender.test"), ("--to", "alice@mail.test")] {
        if !args.contains(&option) {
            c.args([option, default]);
        }
    }
    c.args(["--header", &format!("Subject: cell {tag}"), "--body", &format!("marker {tag}\n.a dot line\n")]);
    if args.iter().any(|a| a.starts_with("--tls")) {
        c.args(["--tls-verify", "--tls-sni", "localhost", "--tls-ca-path"]).arg(site.ca());
    }
    c.args(args).stdin(Stdio::null());
    run(&mut c, CLIENT_TIMEOUT)
}

/// A TLS session through mailtls's `port` (`implicit` or `starttls`) with `sni` as the
/// client's SNI, from CLIENT_IP: what the backend answered inside it (tests/interop/sni.py).
pub fn ehlo_with_sni(port: u16, mode: &str, sni: &str) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/sni.py");
    let mut c = Command::new("python3");
    c.arg(script).args([&port.to_string(), mode, sni, CLIENT_IP]).stdin(Stdio::null());
    run(&mut c, CLIENT_TIMEOUT)
}

/// A DNS name of exactly `len` bytes (labels of at most 63), ending in `.example`.
pub fn long_name(len: usize) -> String {
    let body: String = (0..len - ".example".len()).map(|i| if i % 64 == 63 { '.' } else { 'a' }).collect();
    assert!(!body.ends_with('.'), "no name of {len} bytes this way");
    format!("{body}.example")
}
