//! The IMAP/POP3 backend matrix: a mail server that cannot share the host with Dovecot
//! (Cyrus, Courier) in a container of its own, the mailtls binary on the host in front of it
//! with every IMAP and POP3 role, and real clients (imaplib, poplib) in front of mailtls.
//!
//! The servers take no PROXY header: every mailtls listener here has `proxy_protocol =
//! "none"`, the `-xclient` ones also `xclient = true` (IMAP ID, POP3 XCLIENT), and the
//! `-routed` ones a routes map whose default is the server (so mailtls probes it). Each
//! server runs with `--network host` on 127.0.0.1 ports chosen at run time and logs through
//! an rsyslogd of its own to /var/log/all.log, which is what the cells assert from: which
//! logins happened, what address they name, and that a refused attempt never got there.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::mailservers::{
    read_lossy, run, strip_ansi, wait_for_port, write_certificates, SmtpLines, CLIENT_TIMEOUT,
};
use super::podman::{say, wait_for, Container, DerivedImage};
use super::process::Running;

/// The address the clients bind to: not mailtls's own 127.0.0.1, so a backend log that
/// names 127.0.0.2 learned it from mailtls, and one that names 127.0.0.1 names mailtls.
pub const CLIENT_IP: &str = "127.0.0.2";
/// The mailbox every cell logs in to (a sasldb user on Cyrus, a system user on Courier).
pub const USER: &str = "alice";
pub const PASSWORD: &str = "secret";
/// The Message-ID of the message each server's mailbox holds from the start.
pub const FIRST_MESSAGE: &str = "<first@mailbox.test>";

/// A message with this Message-ID, as the container scripts deliver it (LF line ends: both
/// servers' delivery tools take a Unix file).
pub fn message(message_id: &str) -> String {
    format!(
        "From: bob@mailbox.test\nTo: {USER}@mailbox.test\nSubject: matrix {message_id}\n\
         Message-ID: {message_id}\n\nmarker {message_id}\n"
    )
}

/// A mail server's container. Its script gets the ports as `$1 $2 ...`, sets the server
/// up, starts rsyslogd and the daemons, prints `READY` and stays.
pub struct Server {
    pub container: Container,
    label: &'static str,
    marks: AtomicUsize,
}

/// Where the servers' rsyslogd writes everything.
const SYSLOG: &str = "/var/log/all.log";

/// The rsyslogd every server script starts before its daemons: one file, every facility
/// (the daemons' own lines, PAM's, `logger`'s marks).
pub const START_SYSLOG: &str =
    "printf 'module(load=\"imuxsock\")\\n*.* /var/log/all.log\\n' > /etc/rsyslog.conf\n\
     rsyslogd\n\
     for i in $(seq 100); do [ -S /dev/log ] && break; sleep 0.1; done\n";

impl Server {
    pub fn start(label: &'static str, image: &DerivedImage, script: &str, ports: &[u16]) -> Server {
        let tag = image.ensure();
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut args = vec!["--network", "host", tag, "sh", "-c", script, "sh"];
        args.extend(ports.iter().map(String::as_str));
        let server = Server { container: Container::start(label, &args), label, marks: AtomicUsize::new(0) };
        wait_for(
            &format!("{label} set up"),
            Duration::from_secs(60),
            || {
                let logs = server.container.logs();
                // A set-up step that failed (`set -e`) ends the script: say so at once.
                assert!(
                    logs.contains("READY\n") || server.container.inspect("{{.State.Status}}") != "exited",
                    "{label}'s script failed:\n{logs}\n{}",
                    server.syslog()
                );
                logs.contains("READY\n").then_some(())
            },
            || format!("{}\n{}", server.container.logs(), server.syslog()),
        );
        server
    }

    /// Everything the container's syslog holds so far.
    pub fn syslog(&self) -> String {
        self.container.exec(&format!("cat {SYSLOG}")).stdout
    }

    /// What the server logged while `action` ran. A `logger` line written after it is
    /// waited for, so every line a daemon sent before that is in (one socket, in order).
    /// A line a daemon writes after its client is gone (a session's last words) may fall
    /// into the next call's part instead: assertions look for lines written mid-session.
    pub fn logged_during<T>(&self, action: impl FnOnce() -> T) -> (T, String) {
        let before = self.syslog().len();
        let out = action();
        let mark = format!("mailtls-test mark {}", self.marks.fetch_add(1, Ordering::Relaxed));
        self.container.exec_ok(&format!("logger -t mailtls-test '{mark}'"));
        let log = wait_for(
            &format!("{} logs the mark", self.label),
            Duration::from_secs(30),
            || {
                let log = self.syslog();
                let end = log.find(&mark)?;
                Some(log.get(before..end).unwrap_or_default().to_owned())
            },
            || self.syslog(),
        );
        (out, log)
    }
}

/// `N` ports free a moment ago, all held while choosing so that none repeats.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> =
        (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// The mailtls listeners every matrix has, all with `proxy_protocol = "none"`: (name,
/// protocol, tls, xclient). A `-routed` name has `routes` (default: the server) instead of
/// `backend`: mailtls answers until the login, from capabilities its probe learned.
pub const ROLES: [(&str, &str, &str, bool); 8] = [
    ("imaps", "imap", "implicit", false),
    ("imap", "imap", "starttls", false),
    ("pop3s", "pop3", "implicit", false),
    ("pop3", "pop3", "starttls", false),
    ("imaps-xclient", "imap", "implicit", true),
    ("pop3s-xclient", "pop3", "implicit", true),
    ("imaps-routed", "imap", "implicit", false),
    ("pop3s-routed", "pop3", "implicit", false),
];

/// The mailtls binary in front of one server: [`ROLES`] on ports of their own.
pub struct FrontDoor {
    running: Running,
    ports: Vec<(&'static str, u16)>,
    backends: (u16, u16),
    pub dir: tempfile::TempDir,
}

impl FrontDoor {
    /// Every role but the routed ones, in front of these IMAP and POP3 ports.
    pub fn start(imap_backend: u16, pop3_backend: u16) -> FrontDoor {
        FrontDoor::with_roles(imap_backend, pop3_backend, false)
    }

    /// Another mailtls, with the routed roles only, in front of the same server: it probes
    /// the server at start and every minute, so it lives for its cells only (the probe's
    /// connections would otherwise show in other cells' part of the server's log).
    pub fn routed(&self) -> FrontDoor {
        FrontDoor::with_roles(self.backends.0, self.backends.1, true)
    }

    fn with_roles(imap_backend: u16, pop3_backend: u16, routed: bool) -> FrontDoor {
        let dir = tempfile::Builder::new().prefix("mailtls-matrix-").tempdir_in("/tmp").unwrap();
        write_certificates(dir.path());
        let d = dir.path().display().to_string();
        let mut config = format!(
            "hostname = \"mx.mail.test\"\n\n[tls]\n[[tls.certificates]]\ncert = \"{d}/chain.pem\"\nkey = \"{d}/key.pem\"\n\n\
             [timeouts]\ndrain = 1\n"
        );
        let mut ports = Vec::new();
        let roles = ROLES.into_iter().filter(|r| r.0.ends_with("-routed") == routed);
        for ((name, protocol, tls, xclient), port) in roles.zip(free_ports::<{ ROLES.len() }>()) {
            let backend = if protocol == "imap" { imap_backend } else { pop3_backend };
            let backend = if name.ends_with("-routed") {
                let routes = format!("routes-{protocol}.toml");
                fs::write(dir.path().join(&routes), format!("default = \"127.0.0.1:{backend}\"\n")).unwrap();
                format!("routes = \"{routes}\"")
            } else {
                format!("backend = \"127.0.0.1:{backend}\"")
            };
            config.push_str(&format!(
                "\n[[listeners]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\ntls = \"{tls}\"\n\
                 listen = [\"127.0.0.1:{port}\"]\n{backend}\nproxy_protocol = \"none\"\nxclient = {xclient}\n"
            ));
            ports.push((name, port));
        }
        let path = dir.path().join("mailtls.toml");
        fs::write(&path, config).unwrap();
        let mut command = Command::new(super::process::BIN);
        command.arg("--config").arg(&path).env("RUST_LOG", "info");
        let backends = (imap_backend, pop3_backend);
        let front = FrontDoor { running: Running::spawn(command, dir.path()), ports, backends, dir };
        for (_, port) in &front.ports {
            wait_for_port(*port, "mailtls", || front.log());
        }
        front
    }

    pub fn port(&self, role: &str) -> u16 {
        self.ports.iter().find(|(n, _)| *n == role).map(|(_, p)| *p).expect("a role of this mailtls")
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn log(&self) -> String {
        strip_ansi(&self.running.log())
    }

    /// mailtls's log line for the session whose backend connection came from `source` (its
    /// `backend_source=`), once the session has ended: a backend without PROXY support logs
    /// that address as its peer, and this line names the real client.
    pub fn session_from(&self, source: &str) -> String {
        let field = format!(" backend_source={source} ");
        wait_for(
            &format!("mailtls logs the session from {source}"),
            Duration::from_secs(10),
            || {
                self.log()
                    .lines()
                    .find(|l| l.contains("connection closed") && l.contains(&field))
                    .map(str::to_owned)
            },
            || self.log(),
        )
    }
}

/// What the client script printed, line by line, when it succeeded.
pub type Session = Vec<String>;

/// tests/interop/mailbox.py on `role`: login and fetch; with `deliver`, also IDLE, during
/// which `deliver` is called (once the client is idling) to put a new message in.
/// The implicit-TLS roles log in with SASL PLAIN (AUTHENTICATE, AUTH), the STARTTLS ones
/// with LOGIN and USER/PASS, so that both ends of mailtls's negotiation meet each server.
pub fn client(front: &FrontDoor, role: &str, deliver: Option<&dyn Fn()>) -> Result<Session, String> {
    let mut mode = Vec::new();
    if deliver.is_some() {
        mode.push("idle");
    }
    if sasl(role) {
        mode.push("sasl");
    }
    mailbox_py(front, role, &mode, deliver)
}

/// Whether [`client`] logs in with SASL on `role`.
pub fn sasl(role: &str) -> bool {
    ROLES.iter().any(|r| r.0 == role && r.2 == "implicit")
}

/// `n` sessions on `role` open at once, none logged in: the greeting each got (or `error
/// ...`). Through mailtls they all come from its one address, as every client does.
pub fn together(front: &FrontDoor, role: &str, n: usize) -> Result<Vec<String>, String> {
    let session = mailbox_py(front, role, &["together", &n.to_string()], None)?;
    Ok(session.iter().filter_map(|l| l.strip_prefix("greeting ")).map(str::to_owned).collect())
}

/// Sessions held open at once by [`many_at_once`]: above Courier's default per-address
/// limits (couriertcpd's MAXPERIP: 20 for imapd, 4 for pop3d), which through mailtls are
/// limits on all clients together.
pub const AT_ONCE: [(&str, usize); 2] = [("imaps", 25), ("pop3s", 6)];

/// The [`AT_ONCE`] cell: every session is greeted by the server, and the server logged
/// no refusal.
pub fn many_at_once(server: &Server, front: &FrontDoor) {
    for (role, n) in AT_ONCE {
        let (greetings, log) = server.logged_during(|| together(front, role, n));
        let greetings = greetings.unwrap_or_else(|e| panic!("{e}\n{log}"));
        let greeted = greetings
            .iter()
            .filter(|g| g.split_once(' ').is_some_and(|(_, g)| g.starts_with("* OK") || g.starts_with("+OK")))
            .count();
        assert_eq!((greetings.len(), greeted), (n, n), "{role}: {greetings:#?}\n{log}");
    }
}

fn mailbox_py(
    front: &FrontDoor,
    role: &str,
    mode: &[&str],
    deliver: Option<&dyn Fn()>,
) -> Result<Session, String> {
    let (_, protocol, tls, _) = ROLES.iter().find(|r| r.0 == role).copied().expect("a role of ROLES");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/mailbox.py");
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut command = Command::new("python3");
    command.arg(script).args([protocol, tls, &front.port(role).to_string()]).arg(front.ca());
    command.args([CLIENT_IP, USER, PASSWORD]).args(mode);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .expect("python3 (tests/run.sh installs it)");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut lines = Vec::new();
    let ended = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if line == "idling" {
                    if let Some(deliver) = deliver {
                        deliver();
                    }
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break true,
            Err(mpsc::RecvTimeoutError::Timeout) => break false,
        }
    };
    if !ended {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let why = || {
        format!(
            "{role}: {status} ({})\n{}\n{}",
            if ended { "ended" } else { "timed out" },
            lines.join("\n"),
            read_lossy(stderr.path())
        )
    };
    if ended && status.success() {
        Ok(lines)
    } else {
        Err(why())
    }
}

/// What the addresses tests/interop/forge.py claims (203.0.113.77, and .78 as the
/// connected one) start with.
pub const FORGED_IP: &str = "203.0.113.7";

/// tests/interop/forge.py on `role`: every way a trusted proxy names its client (IMAP ID
/// fields, XCLIENT, XOIP) tried by the client itself, then a login; what it printed.
pub fn forge(front: &FrontDoor, role: &str) -> Result<String, String> {
    let (_, protocol, tls, _) = ROLES.iter().find(|r| r.0 == role).copied().expect("a role of ROLES");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/forge.py");
    let mut command = Command::new("python3");
    command.arg(script).args([protocol, tls, &front.port(role).to_string()]).arg(front.ca());
    let out = run(command.args([CLIENT_IP, USER, PASSWORD]).stdin(Stdio::null()), CLIENT_TIMEOUT);
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(format!("forge.py {role}: {:?}\n{}\n{}", out.status, out.stdout, out.stderr))
    }
}

/// The line of `session` that starts with `word `, without it.
pub fn said<'a>(session: &'a Session, word: &str) -> Option<&'a str> {
    session.iter().find_map(|l| l.strip_prefix(word)?.strip_prefix(' '))
}

/// A plaintext login attempt on a STARTTLS role, before STARTTLS: every answer mailtls gave.
/// IMAP LOGIN and AUTHENTICATE PLAIN (initial response), POP3 USER, PASS and AUTH PLAIN.
pub fn plaintext_login(front: &FrontDoor, role: &str) -> Vec<String> {
    let mut s = SmtpLines::connect(front.port(role), Some(CLIENT_IP)).expect("connect to mailtls");
    let plain = base64_plain();
    let commands: Vec<String> = if role == "imap" {
        vec![format!("a LOGIN {USER} {PASSWORD}"), format!("b AUTHENTICATE PLAIN {plain}"), "c LOGOUT".into()]
    } else {
        vec![format!("USER {USER}"), format!("PASS {PASSWORD}"), format!("AUTH PLAIN {plain}"), "QUIT".into()]
    };
    let mut answers = vec![s.line().expect("greeting")];
    for command in commands {
        s.send(&command).expect("send");
        loop {
            let line = s.line().unwrap_or_else(|e| format!("<{e}>"));
            let untagged = line.starts_with("* ");
            answers.push(line);
            if !untagged {
                break;
            }
        }
    }
    answers
}

/// `\0alice\0secret` in base64, the SASL PLAIN initial response.
fn base64_plain() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = format!("\0{USER}\0{PASSWORD}").into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What a server's test file knows of its server, for the cells every matrix shares.
pub trait Mailbox {
    /// A shell script that puts a message with this Message-ID into alice's INBOX.
    fn deliver_script(&self, message_id: &str) -> String;
    /// The lines of `log` that record a login through the server's `protocol` port.
    fn logins<'a>(&self, log: &'a str, protocol: &str) -> Vec<&'a str>;
    /// Checks the one login of a cell in `log`: what address it names, what can be learned.
    fn check_login(&self, front: &FrontDoor, log: &str, protocol: &str, role: &str);
    /// Whether `log` shows the server's `protocol` port heard from anyone at all.
    fn heard_of(&self, log: &str, protocol: &str) -> bool;
    /// Capabilities an IMAP client must see after TLS besides the server's defaults.
    fn imap_capabilities(&self) -> &'static [&'static str] {
        &[]
    }
}

/// The cells every matrix has: each role's login and fetch (IMAP with IDLE), a plaintext
/// login before STARTTLS refused and unheard of, many sessions at once. POP3 first: message
/// 1 is then the first message whatever IMAP adds later.
pub fn common_cells(matrix: &mut Matrix, server: &Server, front: &FrontDoor, m: &dyn Mailbox) {
    matrix.cell("pop3s: login and RETR", || retrieve(server, front, "pop3s", m));
    matrix.cell("pop3 (STLS): login and RETR", || retrieve(server, front, "pop3", m));
    matrix.cell("pop3s-routed: AUTH PLAIN replayed, RETR", || {
        retrieve(server, &front.routed(), "pop3s-routed", m)
    });
    matrix.cell("imaps: login, FETCH, IDLE", || fetch_and_idle(server, front, "imaps", m));
    matrix.cell("imap (STARTTLS): login, FETCH, IDLE", || fetch_and_idle(server, front, "imap", m));
    matrix.cell("imaps-routed: AUTHENTICATE PLAIN replayed, FETCH, IDLE", || {
        fetch_and_idle(server, &front.routed(), "imaps-routed", m)
    });
    matrix.cell("imap: plaintext LOGIN before STARTTLS refused", || {
        plaintext_refused(server, front, "imap", m)
    });
    matrix.cell("pop3: plaintext USER/PASS before STLS refused", || {
        plaintext_refused(server, front, "pop3", m)
    });
    matrix.cell("25 IMAP and 6 POP3 sessions at once, all from mailtls's address", || {
        many_at_once(server, front)
    });
}

/// Login, FETCH of the first message, IDLE until a message delivered meanwhile shows, FETCH
/// of that one; the server logged exactly that login.
fn fetch_and_idle(server: &Server, front: &FrontDoor, role: &str, m: &dyn Mailbox) {
    let new = format!("<idle-{role}@mailbox.test>");
    let deliver = || {
        server.container.exec_ok(&m.deliver_script(&new));
    };
    let (session, log) = server.logged_during(|| client(front, role, Some(&deliver)));
    let session = session.unwrap_or_else(|e| panic!("{e}\n{log}"));
    let capability = said(&session, "capability").expect("capability");
    let has = |name: &str| capability.split(' ').any(|c| c == name);
    for hidden in ["STARTTLS", "LOGINDISABLED"] {
        assert!(!has(hidden), "{hidden} after TLS: {capability}");
    }
    for shown in m.imap_capabilities() {
        assert!(has(shown), "no {shown} after TLS: {capability}");
    }
    assert_eq!(said(&session, "message 1"), Some(FIRST_MESSAGE), "{session:?}");
    let exists = said(&session, "exists").expect("IDLE saw EXISTS");
    assert_eq!(said(&session, &format!("message {exists}")), Some(new.as_str()), "{session:?}");
    m.check_login(front, &log, "imap", role);
}

/// Login and RETR of the first message; the server logged exactly that login.
fn retrieve(server: &Server, front: &FrontDoor, role: &str, m: &dyn Mailbox) {
    let (session, log) = server.logged_during(|| client(front, role, None));
    let session = session.unwrap_or_else(|e| panic!("{e}\n{log}"));
    assert_eq!(said(&session, "message 1"), Some(FIRST_MESSAGE), "{session:?}");
    let capability = said(&session, "capability").expect("capability");
    assert!(!capability.contains("STLS"), "STLS after TLS: {capability}");
    m.check_login(front, &log, "pop3", role);
}

/// A plaintext login on a STARTTLS role before STARTTLS: every attempt refused by mailtls,
/// and the server never heard of the connection.
fn plaintext_refused(server: &Server, front: &FrontDoor, role: &str, m: &dyn Mailbox) {
    let (answers, log) = server.logged_during(|| plaintext_login(front, role));
    let refusals =
        answers.iter().filter(|a| a.contains("NO [PRIVACYREQUIRED]") || a.starts_with("-ERR [AUTH]"));
    let attempts = if role == "imap" { 2 } else { 3 };
    assert_eq!(refusals.count(), attempts, "{answers:?}");
    assert!(!m.heard_of(&log, role), "the server heard of it:\n{log}");
    assert!(m.logins(&log, role).is_empty(), "{log}");
}

/// An `xclient = true` role in front of a server that cannot be told the client (no ID, no
/// XCLIENT): mailtls ends the session with `farewell` before any login, rather than let it
/// run as mailtls.
pub fn xclient_fails_closed(server: &Server, front: &FrontDoor, role: &str, m: &dyn Mailbox, farewell: &str) {
    let protocol = if role.starts_with("imap") { "imap" } else { "pop3" };
    let (session, log) = server.logged_during(|| client(front, role, None));
    let error = session.expect_err("a session with xclient = true");
    assert!(error.contains(farewell), "{error}");
    assert!(m.logins(&log, protocol).is_empty(), "{log}");
}

/// Cells run one after another against the same server and mailtls; a failing cell is
/// recorded and the others still run, so one run shows the whole matrix.
pub struct Matrix {
    name: &'static str,
    results: Vec<(String, Result<(), String>)>,
}

impl Matrix {
    pub fn new(name: &'static str) -> Matrix {
        Matrix { name, results: Vec::new() }
    }

    pub fn cell(&mut self, name: &str, body: impl FnOnce()) {
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(body)).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        });
        say(&format!(
            "{} cell {name}: {} ({:.1?})",
            self.name,
            if outcome.is_ok() { "ok" } else { "FAILED" },
            started.elapsed()
        ));
        self.results.push((name.to_owned(), outcome));
    }

    /// Panics naming every failed cell, after printing `logs` (server and mailtls); prints
    /// them in any case with MAILTLS_TEST_SHOW_LOGS=1 (to see what a server says).
    pub fn finish(self, logs: impl FnOnce() -> String) {
        let show = std::env::var_os("MAILTLS_TEST_SHOW_LOGS").is_some();
        let failed: Vec<String> = self
            .results
            .iter()
            .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("--- cell {name}:\n{e}")))
            .collect();
        if show || !failed.is_empty() {
            let _ = writeln!(std::io::stderr(), "{}", logs());
        }
        if !failed.is_empty() {
            panic!(
                "{}: {} of {} cells failed:\n{}",
                self.name,
                failed.len(),
                self.results.len(),
                failed.join("\n")
            );
        }
    }
}

/// The lines of `log` that contain every one of `words`.
pub fn lines_with<'a>(log: &'a str, words: &[&str]) -> Vec<&'a str> {
    log.lines().filter(|l| words.iter().all(|w| l.contains(w))).collect()
}
