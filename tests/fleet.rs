//! A fleet behind a real load balancer: HAProxy (Debian's package) in TCP mode with
//! `send-proxy-v2` and an HTTP health check on `/healthz`, in front of two mailtls binaries
//! that accept its PROXY header and share one ticket key file, a real Dovecot behind them.
//!
//! Each test proves one claim of docs/scale-out.md: the client's address and its TLS reach
//! Dovecot through both layers and logins spread over both replicas; a session resumes on
//! the other replica, through a key rotation, and not once its key is dropped; a SIGTERMed
//! replica drains while the health check moves new logins to the other, none failing.
//! Root and the packages of tests/run.sh are needed, so these are #[ignore]d like interop.

#[allow(unused_imports)]
mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::mailservers::{self, run, Dovecot, CLIENT_TIMEOUT, PASSWORD, USER};
use common::openssl::s_client;
use common::process::{http_get, sample};

/// Where the clients connect from: not 127.0.0.1, so Dovecot's log proves the address it
/// shows came through HAProxy's header and then mailtls's.
const CLIENT_IP: &str = "127.0.0.2";
/// How long a replica keeps accepting after SIGTERM while /healthz says 503: several of
/// HAProxy's check intervals below (200 ms, two failures to mark a server down).
const HEALTH_GRACE_SECS: u64 = 3;
const ACCEPTED: &str = "mailtls_connections_accepted_total{listener=\"imaps\"}";

fn ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn openssl_key() -> String {
    let out = Command::new("sh").args(["-c", "openssl rand 80 | openssl base64 -A"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// One mailtls process of the fleet.
struct Replica {
    port: u16,
    admin: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn start(dir: &Path, i: usize, port: u16, admin: u16, dovecot: u16) -> Replica {
        let d = dir.display();
        let config = dir.join(format!("mailtls-{i}.toml"));
        fs::write(
            &config,
            format!(
                "hostname = \"mx.mail.test\"\n\n[tls]\nticket_keys = \"{d}/ticket.keys\"\n\
                 [[tls.certificates]]\ncert = \"{d}/chain.pem\"\nkey = \"{d}/key.pem\"\n\n\
                 [timeouts]\ndrain = 20\nhealth_grace = {HEALTH_GRACE_SECS}\n\n\
                 [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
                 [[listeners]]\nname = \"imaps\"\nprotocol = \"imap\"\ntls = \"implicit\"\n\
                 listen = [\"127.0.0.1:{port}\"]\nbackend = \"127.0.0.1:{dovecot}\"\nproxy_protocol = \"v2\"\n\
                 accept_proxy_protocol = [\"127.0.0.1/32\"]\n"
            ),
        )
        .unwrap();
        let log = dir.join(format!("mailtls-{i}.log"));
        let out = File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mailtls"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start the mailtls binary");
        let replica = Replica { port, admin: local(admin), log, child: Some(child) };
        mailservers::wait_for_port(port, "mailtls", || replica.log());
        mailservers::wait_for_port(admin, "mailtls admin", || replica.log());
        replica
    }

    fn log(&self) -> String {
        mailservers::strip_ansi(&mailservers::read_lossy(&self.log))
    }

    fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").1
    }

    fn accepted(&self) -> u64 {
        sample(&self.metrics(), ACCEPTED).unwrap_or(0.0) as u64
    }

    fn terminate(&self) {
        let pid = self.child.as_ref().map(|c| c.id().to_string()).unwrap_or_default();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    }

    /// Waits for the process to end by itself; its exit status.
    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Haproxy {
    child: Child,
    stats: PathBuf,
    log: PathBuf,
}

impl Haproxy {
    fn start(dir: &Path, front: u16, replicas: &[&Replica]) -> Haproxy {
        let stats = dir.join("haproxy.sock");
        let mut cfg = format!(
            "global\n  log stdout format raw local0\n  stats socket {} level admin\n\n\
             defaults\n  mode tcp\n  log global\n  option tcplog\n  timeout connect 2s\n  \
             timeout client 60s\n  timeout server 60s\n\n\
             frontend imaps\n  bind 127.0.0.1:{front}\n  default_backend replicas\n\n\
             backend replicas\n  balance roundrobin\n  option httpchk\n  \
             http-check send meth GET uri /healthz\n  http-check expect status 200\n",
            stats.display()
        );
        for (i, r) in replicas.iter().enumerate() {
            cfg.push_str(&format!(
                "  server r{i} 127.0.0.1:{} send-proxy-v2 check port {} inter 200ms fall 2 rise 2\n",
                r.port,
                r.admin.port()
            ));
        }
        let path = dir.join("haproxy.cfg");
        fs::write(&path, cfg).unwrap();
        let log = dir.join("haproxy.log");
        let out = File::create(&log).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start haproxy (is it installed? run tests/run.sh)");
        let h = Haproxy { child, stats, log };
        mailservers::wait_for_port(front, "haproxy", || mailservers::read_lossy(&h.log));
        h
    }

    /// `show stat` over the stats socket: (server name, status, check status) per server.
    fn servers(&self) -> Vec<(String, String, String)> {
        let Ok(mut s) = UnixStream::connect(&self.stats) else { return Vec::new() };
        s.write_all(b"show stat\n").unwrap();
        let mut csv = String::new();
        s.read_to_string(&mut csv).unwrap();
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next().unwrap_or("").trim_start_matches("# ").split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let (sv, status, check) = (col("svname"), col("status"), col("check_status"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > check && f[sv].starts_with('r'))
            .map(|f| (f[sv].to_owned(), f[status].to_owned(), f[check].to_owned()))
            .collect()
    }

    /// Waits until server `name` has `status` (e.g. "UP", "DOWN"); its check status then.
    fn await_status(&self, name: &str, status: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some((_, _, check)) = self.servers().into_iter().find(|(n, s, _)| n == name && s == status)
            {
                return check;
            }
            assert!(Instant::now() < deadline, "{name} never {status}: {:?}", self.servers());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Dovecot, two replicas sharing a ticket key file, HAProxy in front. Drops the balancer
/// first, then the replicas, then Dovecot, the dir last.
struct Fleet {
    front: u16,
    haproxy: Option<Haproxy>,
    replicas: Vec<Replica>,
    _dovecot: Dovecot,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// `None` (with a SKIPPED line) where HAProxy or Dovecot cannot run.
    fn start() -> Option<Fleet> {
        for tool in ["haproxy", "dovecot", "curl", "openssl"] {
            if Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map_or(true, |o| !o.status.success())
            {
                eprintln!("SKIPPED: {tool} is not installed (tests/run.sh installs it)");
                return None;
            }
        }
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        if uid.as_deref().unwrap_or("") != "0" {
            eprintln!("SKIPPED: the fleet test runs Dovecot from a private directory, which needs root");
            return None;
        }
        let dir = tempfile::Builder::new().prefix("mailtls-fleet-").tempdir_in("/tmp").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        mailservers::write_certificates(dir.path());
        fs::write(dir.path().join("ticket.keys"), format!("{}\n", openssl_key())).unwrap();
        let [imap, pop3, p0, p1, a0, a1, front] = ports::<7>();
        let home = dir.path().join("dovecot");
        fs::create_dir_all(&home).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
        let dovecot = Dovecot::start_for(&home, USER, imap, pop3);
        let replicas =
            vec![Replica::start(dir.path(), 0, p0, a0, imap), Replica::start(dir.path(), 1, p1, a1, imap)];
        let haproxy = Haproxy::start(dir.path(), front, &replicas.iter().collect::<Vec<_>>());
        let fleet = Fleet { front, haproxy: Some(haproxy), replicas, _dovecot: dovecot, dir };
        fleet.haproxy().await_status("r0", "UP");
        fleet.haproxy().await_status("r1", "UP");
        Some(fleet)
    }

    fn haproxy(&self) -> &Haproxy {
        self.haproxy.as_ref().expect("haproxy runs")
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn dovecot_log(&self) -> String {
        mailservers::read_lossy(&self.path().join("dovecot/dovecot.log"))
    }

    /// The accepted-connection count of each replica.
    fn accepted(&self) -> Vec<u64> {
        self.replicas.iter().map(Replica::accepted).collect()
    }

    /// A whole IMAP login through HAProxy with curl, from [`CLIENT_IP`]; whether it worked.
    fn curl_login(&self) -> Result<(), String> {
        let url = format!("imaps://127.0.0.1:{}/", self.front);
        let out = run(
            Command::new("curl")
                .args(["-sS", "--max-time", "20", "--interface", CLIENT_IP, "--cacert"])
                .arg(self.path().join("ca.pem"))
                .args(["--user", &format!("{USER}:{PASSWORD}"), &url])
                .stdin(Stdio::null()),
            CLIENT_TIMEOUT,
        );
        if out.success() && out.stdout.contains("INBOX") {
            Ok(())
        } else {
            Err(format!("curl: {:?} {} {}", out.status, out.stdout, out.stderr))
        }
    }

    /// Which replica `action` reached: the one whose accepted count grew (exactly one must).
    async fn served_by<T>(&self, action: impl std::future::Future<Output = T>) -> (usize, T) {
        let before = self.accepted();
        let out = action.await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let after = self.accepted();
            let grew: Vec<usize> = (0..after.len()).filter(|&i| after[i] > before[i]).collect();
            if grew.len() == 1 && after[grew[0]] == before[grew[0]] + 1 {
                return (grew[0], out);
            }
            assert!(Instant::now() < deadline, "accepted before {before:?}, after {after:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn s_client(&self, args: &[&str]) -> String {
        let ca = self.path().join("ca.pem").display().to_string();
        let base = ["-servername", "localhost", "-CAfile", &ca, "-verify_return_error"];
        s_client(local(self.front), &[&base[..], args].concat()).await
    }

    /// A full handshake saving its session; the replica that made it.
    async fn new_session(&self, version: &str, sess: &Path) -> usize {
        let file = sess.display().to_string();
        let (replica, out) = self.served_by(self.s_client(&[version, "-sess_out", &file])).await;
        assert!(out.contains("New, TLSv1.") && out.contains("Verify return code: 0 (ok)"), "{out}");
        replica
    }

    /// Offers the saved session until a connection lands on replica `on` (round robin: the
    /// next one, as nothing else connects); whether that replica resumed it.
    async fn resumes_on(&self, on: usize, version: &str, sess: &Path) -> bool {
        let file = sess.display().to_string();
        for _ in 0..4 {
            let (replica, out) = self.served_by(self.s_client(&[version, "-sess_in", &file])).await;
            assert!(out.contains("TLSv1."), "{out}");
            if replica == on {
                return out.contains("Reused, TLSv1.");
            }
        }
        panic!("no connection reached replica {on}");
    }

    /// Replaces the key file by rename and waits until every replica reloaded it.
    fn rotate(&self, keys: &[&str], reloads: f64) {
        let tmp = self.path().join("ticket.keys.new");
        fs::write(&tmp, keys.iter().map(|k| format!("{k}\n")).collect::<String>()).unwrap();
        fs::rename(&tmp, self.path().join("ticket.keys")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let series = "mailtls_ticket_key_reloads_total{outcome=\"ok\"}";
        while self.replicas.iter().any(|r| sample(&r.metrics(), series).unwrap_or(0.0) < reloads) {
            assert!(Instant::now() < deadline, "the replicas did not reload the key file");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, r) in self.replicas.iter().enumerate() {
                eprintln!("----- mailtls-{i}.log -----\n{}", r.log());
            }
            eprintln!("----- dovecot.log -----\n{}", self.dovecot_log());
            eprintln!(
                "----- haproxy.log -----\n{}",
                mailservers::read_lossy(&self.path().join("haproxy.log"))
            );
        }
        self.haproxy.take();
        self.replicas.clear();
    }
}

/// An IMAP session held open through HAProxy (openssl s_client as the TLS client).
struct HeldSession {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl HeldSession {
    fn open(fleet: &Fleet) -> HeldSession {
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-crlf", "-connect", &local(fleet.front).to_string()])
            .args(["-servername", "localhost", "-verify_return_error", "-CAfile"])
            .arg(fleet.path().join("ca.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut s = HeldSession { child, stdin, stdout };
        let greeting = s.line();
        assert!(greeting.starts_with("* OK"), "{greeting:?}");
        s
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        line
    }

    /// Sends a tagged command; the tagged reply.
    fn command(&mut self, tag: &str, command: &str) -> String {
        writeln!(self.stdin, "{tag} {command}").unwrap();
        loop {
            let line = self.line();
            if line.is_empty() || line.starts_with(&format!("{tag} ")) {
                return line;
            }
        }
    }
}

impl Drop for HeldSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, haproxy and dovecot: run tests/run.sh"]
async fn through_haproxy_dovecot_sees_the_client_and_its_tls_and_logins_spread() {
    let Some(fleet) = Fleet::start() else { return };
    let mut served = [0, 0];
    for _ in 0..6 {
        let (replica, login) = fleet.served_by(async { fleet.curl_login() }).await;
        login.unwrap();
        served[replica] += 1;
    }
    assert_eq!(served, [3, 3], "round robin over both replicas");
    let log = fleet.dovecot_log();
    let logins: Vec<&str> = log.lines().filter(|l| l.contains("Login: user=<alice@mail.test>")).collect();
    assert_eq!(logins.len(), 6, "{log}");
    for l in &logins {
        assert!(l.contains(&format!("rip={CLIENT_IP},")) && l.contains("secured"), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, haproxy and dovecot: run tests/run.sh"]
async fn a_session_resumes_on_the_other_replica_through_a_rotation_and_not_once_its_key_is_dropped() {
    let Some(fleet) = Fleet::start() else { return };
    let old = fs::read_to_string(fleet.path().join("ticket.keys")).unwrap().trim().to_owned();
    let mut sessions = Vec::new();
    for version in ["-tls1_3", "-tls1_2"] {
        let sess = fleet.path().join(format!("{version}.pem"));
        let first = fleet.new_session(version, &sess).await;
        assert!(fleet.resumes_on(1 - first, version, &sess).await, "{version}: the other replica resumes");
        sessions.push((version, sess, first));
    }
    let new = openssl_key();
    fleet.rotate(&[&new, &old], 1.0);
    for (version, sess, first) in &sessions {
        assert!(fleet.resumes_on(1 - first, version, sess).await, "{version}: old key second resumes");
        assert!(fleet.resumes_on(*first, version, sess).await, "{version}: on both replicas");
    }
    let fresh = fleet.path().join("fresh.pem");
    let first = fleet.new_session("-tls1_3", &fresh).await;
    fleet.rotate(&[&new], 2.0);
    for (version, sess, first) in &sessions {
        assert!(
            !fleet.resumes_on(1 - first, version, sess).await,
            "{version}: old key dropped, full handshake"
        );
    }
    assert!(fleet.resumes_on(1 - first, "-tls1_3", &fresh).await, "the new key's ticket resumes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, haproxy and dovecot: run tests/run.sh"]
async fn a_sigtermed_replica_drains_while_the_health_check_moves_new_logins_to_the_other() {
    let Some(mut fleet) = Fleet::start() else { return };
    // A logged-in session on one replica, kept open across its stop.
    let (stopped, mut held) = fleet.served_by(async { HeldSession::open(&fleet) }).await;
    let login = held.command("a", &format!("LOGIN {USER} {PASSWORD}"));
    assert!(login.starts_with("a OK"), "{login:?}");
    let other = 1 - stopped;
    let name = format!("r{stopped}");
    fleet.replicas[stopped].terminate();
    // Logins go on at once, before HAProxy knows: none may fail.
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut logins = 0;
    while fleet.haproxy().servers().iter().any(|(n, s, _)| *n == name && s != "DOWN") {
        logins += 1;
        if let Err(e) = fleet.curl_login() {
            failures.push(e);
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{name} never went DOWN");
    }
    // Taken out by its /healthz answer (HTTP 503: L7STS) while it still accepts.
    let check = fleet.haproxy().await_status(&name, "DOWN");
    assert_eq!(check, "L7STS", "taken out by the HTTP health check");
    let down_after = started.elapsed();
    assert!(down_after < Duration::from_secs(HEALTH_GRACE_SECS), "DOWN within the grace");
    let before_down = logins;
    let before = fleet.replicas[other].accepted();
    for _ in 0..4 {
        logins += 1;
        if let Err(e) = fleet.curl_login() {
            failures.push(e);
        }
    }
    assert_eq!(fleet.replicas[other].accepted(), before + 4, "new logins went to the other replica");
    // After the grace the stopped replica's ports close; the held session is still served.
    std::thread::sleep(Duration::from_secs(HEALTH_GRACE_SECS));
    assert!(std::net::TcpStream::connect(local(fleet.replicas[stopped].port)).is_err(), "ports closed");
    let noop = held.command("b", "NOOP");
    assert!(noop.starts_with("b OK"), "draining session still served: {noop:?}");
    for _ in 0..2 {
        logins += 1;
        if let Err(e) = fleet.curl_login() {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{} of {logins} logins failed: {failures:?}", failures.len());
    // The figures docs/scale-out.md quotes.
    eprintln!(
        "fleet: {name} DOWN ({check}) {down_after:?} after SIGTERM; {before_down} logins before that, \
         {logins} in all, {} failed",
        failures.len()
    );
    let bye = held.command("c", "LOGOUT");
    assert!(bye.starts_with("c OK"), "{bye:?}");
    let status = fleet.replicas[stopped].wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "drained and exited cleanly: {status:?}");
    let log = fleet.replicas[stopped].log();
    assert!(log.contains("stopping: health check says not serving"), "{log}");
}

/// The grace alone, without a balancer: after SIGTERM /healthz says 503 while the port
/// still accepts, and a second SIGTERM ends the grace (the process then drains and exits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_grace_says_503_while_still_accepting_and_a_second_sigterm_ends_it() {
    use common::process::{free_port, with_ports, Running};
    use common::{certs, config_text, Backend, Listener, Script};
    let certs = certs();
    let backend = Backend::start(Script::Imap).await;
    let (port, admin) = (free_port(), free_port());
    let text = config_text(&certs, &[Listener::new("imaps", "imap", "implicit", backend.addr)], "")
        .replace("drain = 1\n", "drain = 1\nhealth_grace = 600\n");
    let text = format!("{}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n", with_ports(&text, &[port]));
    let path = certs.dir.path().join("mailtls.toml");
    fs::write(&path, text).unwrap();
    let mut run = Running::mailtls(&path, &[]);
    run.wait_accepting(local(port)).await;
    run.wait_accepting(local(admin)).await;
    assert_eq!(http_get(local(admin), "/healthz").0, 200);
    run.signal("TERM");
    assert!(run.log_shows("stopping: health check says not serving", 1).await, "{}", run.log());
    assert_eq!(http_get(local(admin), "/healthz").0, 503, "not serving any more");
    assert!(std::net::TcpStream::connect(local(port)).is_ok(), "yet still accepting");
    assert!(run.exit_within(Duration::from_secs(1)).await.is_none(), "the grace holds");
    run.signal("TERM");
    let status = run.exit_within(Duration::from_secs(20)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {}", run.log());
    assert!(run.log().contains("second stop request: grace ended"), "{}", run.log());
}
