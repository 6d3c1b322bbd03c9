//! Reliability under load, faults and hostile input (issue 7).
//!
//! Sizes are reduced for CI; `MAILTLS_RELIABILITY_SCALE=full` runs the full ones
//! (benches/reliability.sh does, against the release binary). Each test prints its figures
//! as `RELIABILITY <name>: ...` lines on stderr (visible with `--nocapture`) and appends them
//! to the file named by `MAILTLS_RELIABILITY_REPORT` when set.
//!
//! Every loop is bounded in count and time, all traffic stays on 127.0.0.x, and the
//! deadlines are generous limits for a slow shared machine, not performance claims. The
//! tests take one lock each, so that no two of them compete for the machine's two cores.

mod common;

use common::process::{free_port, http_get, local, sample, Running};
use common::roles::*;
use common::*;

use std::io::{BufRead, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

// ---- scale, figures, serialisation, panics ---------------------------------------------

fn full() -> bool {
    std::env::var("MAILTLS_RELIABILITY_SCALE").is_ok_and(|v| v == "full")
}

/// `ci` normally, `full` under MAILTLS_RELIABILITY_SCALE=full.
fn size(ci: usize, full_size: usize) -> usize {
    if full() {
        full_size
    } else {
        ci
    }
}

/// Prints one line of figures and appends it to MAILTLS_RELIABILITY_REPORT, if set.
fn report(name: &str, figures: &str) {
    let line = format!("RELIABILITY {name}: {figures}");
    eprintln!("{line}");
    if let Ok(path) = std::env::var("MAILTLS_RELIABILITY_REPORT") {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// A tokio mutex (not tied to one runtime): each test has its own runtime.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One reliability test at a time: each would otherwise measure the others' load.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

static PANICS: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();

/// Counts every panic in this process from now on (a panicking session task of the
/// in-process proxy is otherwise swallowed by tokio); returns the count so far.
fn panics_so_far() -> usize {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
    PANICS.load(Ordering::SeqCst)
}

fn assert_no_new_panics(before: usize) {
    let now = PANICS.load(Ordering::SeqCst);
    assert_eq!(now, before, "{} panic(s) in the proxy or the test's tasks (see stderr)", now - before);
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (children inherit it);
/// returns the limit now in force.
fn raise_fd_limit() -> u64 {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
    rlimit::increase_nofile_limit(hard).expect("raise RLIMIT_NOFILE")
}

/// Deterministic pseudo-random numbers (xorshift64*), different per seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

// ---- helpers: proxies, sessions, metrics -------------------------------------------------

/// Every port role in one proxy: the seven listeners and their scripted backends (the MX
/// backend offers no AUTH, so a plaintext port-25 session is relayed opaquely).
struct AllRoles {
    proxy: Proxy,
    smtp: Backend,
    mx: Backend,
    imap: Backend,
    pop3: Backend,
}

const LISTED_ROLES: [Role; 7] =
    [Role::Submissions, Role::Submission, Role::MxStarttls, Role::Imaps, Role::Imap, Role::Pop3s, Role::Pop3];
const ALL_ROLES: [Role; 8] = [
    Role::Submissions,
    Role::Submission,
    Role::MxStarttls,
    Role::MxPlaintext,
    Role::Imaps,
    Role::Imap,
    Role::Pop3s,
    Role::Pop3,
];

async fn all_roles(extra: &str) -> AllRoles {
    let smtp = Backend::start(Script::Smtp).await;
    let mx = Backend::start(Script::SmtpNoAuth).await;
    let imap = Backend::start(Script::Imap).await;
    let pop3 = Backend::start(Script::Pop3).await;
    let listeners: Vec<Listener> = LISTED_ROLES
        .iter()
        .map(|&role| {
            let backend = match role {
                Role::Submissions | Role::Submission => &smtp,
                Role::MxStarttls | Role::MxPlaintext => &mx,
                Role::Imaps | Role::Imap => &imap,
                Role::Pop3s | Role::Pop3 => &pop3,
            };
            role.listener(backend)
        })
        .collect();
    let proxy = Proxy::start_with(&listeners, extra).await;
    AllRoles { proxy, smtp, mx, imap, pop3 }
}

impl AllRoles {
    fn backend(&self, role: Role) -> &Backend {
        match role {
            Role::Submissions | Role::Submission => &self.smtp,
            Role::MxStarttls | Role::MxPlaintext => &self.mx,
            Role::Imaps | Role::Imap => &self.imap,
            Role::Pop3s | Role::Pop3 => &self.pop3,
        }
    }
}

/// The value of a metric series of the in-process proxy (0 when absent).
fn metric(proxy: &Proxy, series: &str) -> f64 {
    sample(&proxy.metrics.render(), series).unwrap_or(0.0)
}

fn open_series(listener: &str) -> String {
    format!("mailtls_connections_open{{listener=\"{listener}\"}}")
}

/// Waits (at most `within`) until the open-connection gauge of `listener` is `value`.
async fn gauge_returns_to(proxy: &Proxy, listener: &str, value: f64, within: Duration) {
    let series = open_series(listener);
    let deadline = Instant::now() + within;
    loop {
        let now = metric(proxy, &series);
        if now == value {
            return;
        }
        assert!(Instant::now() < deadline, "{series} is {now}, not back to {value} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `data` and expects exactly it back within `within`.
async fn ping(stream: &mut Stream, data: &[u8], within: Duration) -> Result<(), String> {
    let exchange = async {
        stream.write_all(data).await.map_err(|e| format!("write: {e}"))?;
        stream.flush().await.map_err(|e| format!("flush: {e}"))?;
        let mut got = vec![0u8; data.len()];
        stream.read_exact(&mut got).await.map_err(|e| format!("read: {e}"))?;
        if got != data {
            return Err("echo differs".to_owned());
        }
        Ok(())
    };
    tokio::time::timeout(within, exchange).await.unwrap_or_else(|_| Err(format!("no echo within {within:?}")))
}

/// Echo sessions that must survive a fault aimed at others.
struct Bystanders {
    streams: Vec<Stream>,
    rounds: u64,
}

impl Bystanders {
    async fn open(proxy: &Proxy, role: Role, n: usize) -> Bystanders {
        let mut streams = Vec::new();
        for _ in 0..n {
            streams.push(open_echo(proxy, role).await);
        }
        let mut b = Bystanders { streams, rounds: 0 };
        b.check("before the fault").await;
        b
    }

    async fn check(&mut self, when: &str) {
        self.rounds += 1;
        for (i, s) in self.streams.iter_mut().enumerate() {
            let data = payload(4096, self.rounds * 1000 + i as u64);
            if let Err(e) = ping(s, &data, Duration::from_secs(20)).await {
                panic!("bystander session {i} failed {when}: {e}");
            }
        }
    }
}

/// The first flight of a real TLS ClientHello for "localhost".
fn client_hello(certs: &Certs) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(client_config(certs), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// A TCP connection from `source` (any 127.0.0.x) to `target`.
async fn connect_from(source: Ipv4Addr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket.connect(target).await
}

/// Ends a TCP connection with a reset (SO_LINGER 0, then close).
fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// Reads and discards until the peer closes (EOF or reset): true, or false when `within`
/// passes first.
async fn peer_closes<S: AsyncRead + Unpin>(stream: &mut S, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// The binary under test: MAILTLS_BIN (the script's release build) or cargo's own.
fn mailtls_bin() -> PathBuf {
    std::env::var_os("MAILTLS_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(common::process::BIN))
}

fn spawn_mailtls(config: &std::path::Path) -> Running {
    let mut cmd = Command::new(mailtls_bin());
    cmd.arg("--config").arg(config).env("RUST_LOG", "warn");
    Running::spawn(cmd, config.parent().unwrap())
}

/// (VmRSS in KiB, utime+stime in clock ticks, open descriptors) of process `pid`.
fn proc_figures(pid: u32) -> (u64, u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let cpu = ticks(11) + ticks(12);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (rss, cpu, fds)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

// ---- a scripted backend in a process of its own -----------------------------------------

/// The idle-load test's backend runs in a child process (this test binary, re-executed to
/// run only this helper), so that the test process holds the client sockets and the child
/// the backend ones: at 10,000 sessions each side needs 10,000 descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "a helper process for idle_tls_imap_sessions_held_open_stay_responsive, not a test"]
async fn helper_backend_process() {
    if std::env::var("MAILTLS_RELIABILITY_HELPER").is_err() {
        return; // run by --include-ignored: nothing to serve
    }
    raise_fd_limit();
    let backend = Backend::start(Script::Imap).await;
    println!("helper backend listening on {}", backend.addr);
    let _ = std::io::stdout().flush();
    // Serve until the parent closes our stdin (or 20 minutes at most).
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    });
    let _ = tokio::time::timeout(Duration::from_secs(20 * 60), stdin_closed).await;
}

struct HelperBackend {
    child: std::process::Child,
    addr: SocketAddr,
}

impl HelperBackend {
    fn start() -> HelperBackend {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new(exe)
            .args(["helper_backend_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("MAILTLS_RELIABILITY_HELPER", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the helper backend process");
        let stdout = child.stdout.take().expect("helper stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest prints "test helper_backend_process ... " on the same line first.
                if let Some((_, addr)) = line.split_once("helper backend listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).expect("the helper backend started");
        HelperBackend { child, addr: addr.parse().expect("helper address") }
    }
}

impl Drop for HelperBackend {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- 1. load: many idle logged-in TLS IMAP sessions ----------------------------------------

/// Descriptors the proxy needs beyond two per session: stdio, listeners, epoll, eventfds,
/// the certificate watcher, the admin socket, with room to spare.
const PROXY_OWN_FDS: u64 = 32;

async fn open_idle_session(addr: SocketAddr, certs: &Certs) -> Result<Conn<TlsClient>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let tls = tls_handshake(tcp, certs).await.map_err(|e| format!("handshake: {e}"))?;
    let mut c = Conn::new(tls);
    let patience = Duration::from_secs(30);
    match c.try_line(patience).await {
        Some(l) if l.starts_with("* OK") => {}
        other => return Err(format!("greeting: {other:?}")),
    }
    c.send("a LOGIN idle x\r\n").await;
    match c.try_line(patience).await {
        Some(l) if l.starts_with("a OK") => Ok(c),
        other => Err(format!("login: {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_imap_sessions_held_open_stay_responsive() {
    let _serial = serial().await;
    let fd_limit = raise_fd_limit();
    let wanted = size(1000, 10_000);
    // Two descriptors per session in the proxy (client and backend sockets): the binding
    // constraint, since the clients (here) and the backend (a child) have their own.
    let fits = (fd_limit.saturating_sub(PROXY_OWN_FDS) / 2) as usize;
    let sessions = wanted.min(fits);
    let backend = HelperBackend::start();

    let certs = certs();
    let (port, admin) = (free_port(), free_port());
    let text = config_text(&certs, &[Listener::new("imaps", "imap", "implicit", backend.addr)], "")
        .replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1)
        + &format!(
            "\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[limits]\nmax_connections = {}\nmax_connections_per_address = {}\n",
            sessions + 100,
            sessions + 100
        );
    let config = certs.dir.path().join("mailtls.toml");
    std::fs::write(&config, &text).unwrap();
    let mut proxy = spawn_mailtls(&config);
    let addr = local(port);
    proxy.wait_accepting(addr).await;
    let pid = proxy.child.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_before, _, fds_before) = proc_figures(pid);

    // Open them, at most 32 handshakes at a time.
    let started = Instant::now();
    let certs = Arc::new(certs);
    let gate = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let (gate, certs) = (gate.clone(), certs.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            open_idle_session(addr, &certs).await
        }));
    }
    let mut held = Vec::with_capacity(sessions);
    let mut failures = Vec::new();
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(600), t).await {
            Ok(Ok(Ok(c))) => held.push(c),
            Ok(Ok(Err(e))) => failures.push(e),
            Ok(Err(e)) => failures.push(format!("task: {e}")),
            Err(_) => failures.push("not open within 10 minutes".to_owned()),
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    assert!(
        failures.is_empty(),
        "{} of {sessions} sessions failed to open: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // Held idle: memory and CPU of the proxy process.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_held, cpu_start, fds_held) = proc_figures(pid);
    let window = Duration::from_secs(size(5, 30) as u64);
    tokio::time::sleep(window).await;
    let (rss_end, cpu_end, _) = proc_figures(pid);
    let ticks = clock_ticks_per_second();
    let idle_cpu_percent = (cpu_end - cpu_start) as f64 / ticks / window.as_secs_f64() * 100.0;
    let (_, metrics) = http_get(local(admin), "/metrics");
    let gauge = sample(&metrics, "mailtls_connections_open{listener=\"imaps\"}").unwrap_or(-1.0);
    assert_eq!(gauge, sessions as f64, "the proxy's open-connection gauge");

    // All responsive: a NOOP on a random sample of 100 gets its reply.
    let mut rng = Rng::new(7);
    let sample_size = 100.min(held.len());
    let mut slowest = Duration::ZERO;
    for k in 0..sample_size {
        let i = rng.below(held.len());
        let c = &mut held[i];
        let t0 = Instant::now();
        c.send(format!("n{k} NOOP\r\n")).await;
        let reply = c.try_line(Duration::from_secs(30)).await;
        slowest = slowest.max(t0.elapsed());
        assert!(
            reply.as_deref().is_some_and(|r| r.starts_with(&format!("n{k} OK"))),
            "session {i} did not answer NOOP: {reply:?}"
        );
    }

    let per_session_kib = (rss_end.max(rss_held) as f64 - rss_before as f64) / sessions as f64;
    report(
        "load",
        &format!(
            "sessions={sessions} wanted={wanted} fd_limit={fd_limit} proxy_fds_before={fds_before} \
             proxy_fds_held={fds_held} open_seconds={open_secs:.1} rss_kib_before={rss_before} \
             rss_kib_held={rss_held} rss_kib_after_idle={rss_end} rss_kib_per_session={per_session_kib:.1} \
             idle_cpu_percent={idle_cpu_percent:.2} idle_window_s={} noop_sample={sample_size} \
             noop_slowest_ms={:.1}",
            window.as_secs(),
            slowest.as_secs_f64() * 1000.0
        ),
    );

    drop(held);
    proxy.signal("TERM");
    let status = proxy.exit_within(Duration::from_secs(30)).await.expect("mailtls exits after SIGTERM");
    assert!(status.success(), "exit status {status}: {}", proxy.log());
    assert!(!proxy.log().contains("panicked"), "{}", proxy.log());
}

// ---- 2. integrity soak: every role, checksums end to end ----------------------------------

/// One soak session: log in as echo, `len` bytes each way, compared by checksum against
/// what was sent. Returns the checksum of the payload for the backend-side check.
async fn soak_session(proxy: Arc<Proxy>, role: Role, len: usize, seed: u64) -> Result<u64, String> {
    let stream = open_echo(&proxy, role).await;
    let data = Arc::new(payload(len, seed));
    let sent = fnv1a(&data);
    let got = echo_round_trip(stream, data.clone()).await;
    let echoed = fnv1a(&got);
    if got.len() != len || echoed != sent {
        return Err(format!(
            "{role:?} seed {seed}: {} bytes back, fnv {echoed:016x}, sent fnv {sent:016x}",
            got.len()
        ));
    }
    Ok(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_every_role_moves_bytes_both_ways_intact() {
    let _serial = serial().await;
    let panics = panics_so_far();
    let per_role = size(20, 125);
    let len = MIB;
    let concurrency = size(40, 64);
    let roles = all_roles("[timeouts]\ndrain = 1\nidle = 120\n").await;
    let proxy = Arc::new(roles.proxy);
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for i in 0..per_role {
        for (r, &role) in ALL_ROLES.iter().enumerate() {
            let seed = (i * ALL_ROLES.len() + r) as u64 + 1;
            let (proxy, gate) = (proxy.clone(), gate.clone());
            tasks.push((
                role,
                seed,
                tokio::spawn(async move {
                    let _permit = gate.acquire_owned().await.expect("semaphore");
                    soak_session(proxy, role, len, seed).await
                }),
            ));
        }
    }
    let sessions = tasks.len();
    let mut sums = Vec::new();
    let mut failures = Vec::new();
    for (role, seed, t) in tasks {
        match tokio::time::timeout(Duration::from_secs(600), t).await {
            Ok(Ok(Ok(sum))) => sums.push(sum),
            Ok(Ok(Err(e))) => failures.push(e),
            Ok(Err(e)) => failures.push(format!("{role:?} seed {seed}: {e}")),
            Err(_) => failures.push(format!("{role:?} seed {seed}: not done within 10 minutes")),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert!(
        failures.is_empty(),
        "{} of {sessions} sessions lost or altered bytes: {failures:#?}",
        failures.len()
    );

    // The other direction, checked where it ended: every payload arrived whole at a backend.
    let mut at_backends = std::collections::HashSet::new();
    for backend in [&roles.smtp, &roles.mx, &roles.imap, &roles.pop3] {
        for i in 0..backend.connections() {
            let data = backend.seen(i).data;
            if data.len() >= len {
                at_backends.insert(fnv1a(&data[data.len() - len..]));
            }
        }
    }
    let missing = sums.iter().filter(|s| !at_backends.contains(s)).count();
    assert_eq!(missing, 0, "{missing} payloads did not arrive intact at the backend");
    let proxy = Arc::try_unwrap(proxy).ok().expect("sessions are done");
    for role in LISTED_ROLES {
        gauge_returns_to(&proxy, role.name(), 0.0, Duration::from_secs(20)).await;
    }
    let total = sessions as f64 * len as f64 * 2.0 / MIB as f64;
    let engines: Vec<String> = ["copy", "splice", "ktls"]
        .iter()
        .map(|engine| {
            let n: f64 = LISTED_ROLES
                .iter()
                .map(|r| {
                    let series = format!(
                        "mailtls_sessions_by_engine_total{{listener=\"{}\",engine=\"{engine}\"}}",
                        r.name()
                    );
                    metric(&proxy, &series)
                })
                .sum();
            format!("{engine}={n}")
        })
        .collect();
    report(
        "soak",
        &format!(
            "sessions={sessions} roles={} per_role={per_role} bytes_each_way={len} concurrency={concurrency} \
             total_mib={total:.0} lost_or_altered=0 seconds={secs:.1} engines: {}",
            ALL_ROLES.len(),
            engines.join(" ")
        ),
    );
    proxy.stop().await;
    assert_no_new_panics(panics);
}

// ---- 3. faults -------------------------------------------------------------------------

/// Short timeouts, and an address limit above the sizes here: every client is 127.0.0.1,
/// and the default (100) would turn the full-size runs away for another reason.
const FAULT_TIMEOUTS: &str = "[timeouts]\nhandshake = 2\npre_auth_idle = 3\nbackend_connect = 1\ndrain = 1\n\
                              [limits]\nmax_connections_per_address = 5000\n";

/// IMAP's words for a backend that cannot serve (not those of a limit).
const BACKEND_UNAVAILABLE: &str = "* BYE [UNAVAILABLE] Backend server unavailable";

/// A proxy with a healthy "imaps" listener (for bystanders) and `target` beside it.
async fn with_bystander_listener(target: Listener, extra: &str) -> (Backend, Proxy) {
    let good = Backend::start(Script::Imap).await;
    let proxy =
        Proxy::start_with(&[Listener::new("imaps", "imap", "implicit", good.addr), target], extra).await;
    (good, proxy)
}

/// `n` TLS clients at once on `listener`; each must get `farewell` (and then the close)
/// within `within` of connecting.
async fn all_told(
    proxy: &Proxy,
    listener: &str,
    n: usize,
    farewell: &'static str,
    within: Duration,
) -> Duration {
    let addr = proxy.addr(listener);
    let certs = proxy.certs.clone();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let certs = certs.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let mut c = Conn::new(tls_handshake(tcp, &certs).await.map_err(|e| e.to_string())?);
                let line = c.try_line(within).await;
                if !line.as_deref().is_some_and(|l| l.starts_with(farewell)) {
                    return Err(format!("got {line:?}, not {farewell:?}"));
                }
                if !c.closed_within(within).await {
                    return Err("not closed after the farewell".to_owned());
                }
                Ok::<_, String>(t0.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let took = t.await.expect("client task").unwrap_or_else(|e| panic!("{listener}: {e}"));
        slowest = slowest.max(took);
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_backend_refuses_connections() {
    let _serial = serial().await;
    let panics = panics_so_far();
    let target = Listener::new("refusing", "imap", "implicit", Backend::unreachable().await);
    let (_good, proxy) = with_bystander_listener(target, FAULT_TIMEOUTS).await;
    let mut bystanders = Bystanders::open(&proxy, Role::Imaps, 10).await;
    let n = size(50, 500);
    let slowest = all_told(&proxy, "refusing", n, BACKEND_UNAVAILABLE, Duration::from_secs(10)).await;
    bystanders.check("after the backend refused").await;
    gauge_returns_to(&proxy, "refusing", 0.0, Duration::from_secs(10)).await;
    let failures = metric(&proxy, "mailtls_backend_failures_total{listener=\"refusing\"}");
    assert_eq!(failures, n as f64, "backend failures counted");
    report(
        "fault backend_refuses",
        &format!("sessions={n} told_unavailable={n} slowest_ms={} bystanders=10 ok", slowest.as_millis()),
    );
    proxy.stop().await;
    assert_no_new_panics(panics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_backend_accepts_but_never_greets() {
    let _serial = serial().await;
    let panics = panics_so_far();
    let silent = Backend::start(Script::Silent).await;
    let target = Listener::new("silent", "imap", "implicit", silent.addr);
    let (_good, proxy) = with_bystander_listener(target, FAULT_TIMEOUTS).await;
    let mut bystanders = Bystanders::open(&proxy, Role::Imaps, 10).await;
    let n = size(50, 500);
    // backend_connect = 1 s: each is told within that plus a generous margin.
    let slowest = all_told(&proxy, "silent", n, BACKEND_UNAVAILABLE, Duration::from_secs(15)).await;
    bystanders.check("after the silent backend").await;
    gauge_returns_to(&proxy, "silent", 0.0, Duration::from_secs(10)).await;
    // At most one attempt per session (under load some connects time out before the
    // backend's accept loop sees them).
    assert!(silent.connections() <= n, "{} backend connections for {n} sessions", silent.connections());
    report(
        "fault backend_never_greets",
        &format!(
            "sessions={n} backend_connect_s=1 told_unavailable={n} slowest_ms={} bystanders=10 ok",
            slowest.as_millis()
        ),
    );
    proxy.stop().await;
    assert_no_new_panics(panics);
}

/// An IMAP backend (no PROXY header expected) that logs anyone in, echoes, and resets the
/// connection (SO_LINGER 0, close) once it has echoed `after` bytes.
async fn resetting_backend(after: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let resets = Arc::new(AtomicUsize::new(0));
    let count = resets.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut c = Conn::new(stream);
                c.send("* OK [CAPABILITY IMAP4rev1] ready\r\n").await;
                let Some(login) = c.try_line(Duration::from_secs(30)).await else { return };
                let tag = login.split(' ').next().unwrap_or("a").to_owned();
                c.send(format!("{tag} OK logged in\r\n")).await;
                let mut stream = c.into_inner();
                let mut buf = vec![0u8; 16 * 1024];
                let mut echoed = 0;
                while echoed < after {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            echoed += n;
                        }
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                reset(stream);
            });
        }
    });
    (addr, resets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_backend_resets_mid_transfer_closes_the_client_promptly() {
    let _serial = serial().await;
    let panics = panics_so_far();
    let (addr, resets) = resetting_backend(64 * 1024).await;
    let target = Listener::new("resetting", "imap", "implicit", addr).proxy("none");
    let (_good, proxy) = with_bystander_listener(target, FAULT_TIMEOUTS).await;
    let mut bystanders = Bystanders::open(&proxy, Role::Imaps, 10).await;
    let n = size(20, 200);
    let proxy_addr = proxy.addr("resetting");
    let certs = proxy.certs.clone();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let certs = certs.clone();
            tokio::spawn(async move {
                let tcp = TcpStream::connect(proxy_addr).await.expect("connect");
                let mut c = Conn::new(tls_handshake(tcp, &certs).await.expect("handshake"));
                assert!(c.line().await.starts_with("* OK"));
                c.send("a LOGIN x y\r\n").await;
                assert!(c.line().await.starts_with("a OK"));
                let (mut rx, mut tx) = tokio::io::split(c.into_inner());
                // Keep sending (far more than the backend echoes before its reset) ...
                let writer = tokio::spawn(async move {
                    let data = payload(MIB, i as u64);
                    for chunk in data.chunks(8192) {
                        if tx.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                });
                // ... and the connection must close soon after the backend's reset.
                let t0 = Instant::now();
                let closed = peer_closes(&mut rx, Duration::from_secs(15)).await;
                writer.abort();
                (closed, t0.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for (i, t) in tasks.into_iter().enumerate() {
        let (closed, took) = t.await.expect("client task");
        assert!(closed, "client {i} still open 15 s after its backend reset mid-transfer");
        slowest = slowest.max(took);
    }
    assert_eq!(resets.load(Ordering::SeqCst), n, "every backend connection was reset");
    bystanders.check("after the backend resets").await;
    gauge_returns_to(&proxy, "resetting", 0.0, Duration::from_secs(10)).await;
    report(
        "fault backend_resets_mid_transfer",
        &format!(
            "sessions={n} reset_after_bytes=65536 clients_closed={n} slowest_close_ms={} bystanders=10 ok",
            slowest.as_millis()
        ),
    );
    proxy.stop().await;
    assert_no_new_panics(panics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_clients_reset_mid_handshake_and_mid_transfer() {
    let _serial = serial().await;
    let panics = panics_so_far();
    let backend = Backend::start(Script::Imap).await;
    // Default timeouts: the resets are the fault here, not a slow backend under the load.
    let proxy = Proxy::start_with(
        &[Listener::new("imaps", "imap", "implicit", backend.addr)],
        "[timeouts]\ndrain = 1\n[limits]\nmax_connections_per_address = 5000\n",
    )
    .await;
    let bystander_count = 10;
    let mut bystanders = Bystanders::open(&proxy, Role::Imaps, bystander_count).await;
    let hello = client_hello(&proxy.certs);
    let n = size(50, 500);
    let addr = proxy.addr("imaps");

    // Mid-handshake: half a ClientHello, then a reset.
    for _ in 0..n {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&hello[..hello.len() / 2]).await.unwrap();
        reset(tcp);
    }
    // Mid-transfer: logged in as echo, 256 KiB sent (the echo left unread), then a reset.
    let mut transfers = Vec::new();
    let gate = Arc::new(Semaphore::new(32));
    for i in 0..n {
        let (certs, gate) = (proxy.certs.clone(), gate.clone());
        transfers.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut c = Conn::new(tls_handshake(tcp, &certs).await.expect("handshake"));
            assert!(c.line().await.starts_with("* OK"));
            c.send("a LOGIN echo x\r\n").await;
            assert!(c.line().await.starts_with("a OK"));
            let data = payload(256 * 1024, 77 + i as u64);
            let _ = tokio::time::timeout(Duration::from_secs(2), c.stream.write_all(&data)).await;
            let (tcp, _) = c.stream.into_inner();
            reset(tcp);
        }));
    }
    for t in transfers {
        t.await.expect("client task");
    }
    bystanders.check("after clients reset").await;
    // Every reset session is gone: only the bystanders remain open.
    gauge_returns_to(&proxy, "imaps", bystander_count as f64, Duration::from_secs(15)).await;
    let failed = metric(
        &proxy,
        "mailtls_tls_handshakes_total{listener=\"imaps\",outcome=\"failed\",version=\"none\"}",
    );
    assert_eq!(failed, n as f64, "each reset handshake counted as failed");
    // And the proxy still takes new sessions.
    let mut fresh = open_echo(&proxy, Role::Imaps).await;
    ping(&mut fresh, b"after the resets\r\n", Duration::from_secs(10)).await.expect("a new session works");
    report(
        "fault clients_reset",
        &format!("mid_handshake={n} mid_transfer={n} open_gauge_back_to_bystanders={bystander_count} handshake_failures_counted={failed} new_session ok"),
    );
    drop(bystanders);
    drop(fresh);
    proxy.stop().await;
    assert_no_new_panics(panics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_certificate_turns_to_garbage_under_load() {
    let _serial = serial().await;
    let panics = panics_so_far();
    let backend = Backend::start(Script::Imap).await;
    let proxy = Arc::new(
        Proxy::start_with(&[Listener::new("imaps", "imap", "implicit", backend.addr)], FAULT_TIMEOUTS).await,
    );
    let mut bystanders = Bystanders::open(&proxy, Role::Imaps, 10).await;

    // Load: new sessions one after another, each checking the certificate it was shown.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let expected = proxy.certs.der.clone();
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            let (proxy, stop, expected) = (proxy.clone(), stop.clone(), expected.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0usize, Vec::new());
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let tcp = TcpStream::connect(proxy.addr("imaps")).await.expect("connect");
                    match tls_handshake(tcp, &proxy.certs).await {
                        Ok(tls) => {
                            let shown = tls.get_ref().1.peer_certificates().and_then(|c| c.first().cloned());
                            if shown.as_ref() != Some(&expected) {
                                failed.push("a different certificate was shown".to_owned());
                            }
                            let mut c = Conn::new(tls);
                            match c.try_line(Duration::from_secs(10)).await {
                                Some(l) if l.starts_with("* OK") => ok += 1,
                                other => failed.push(format!("greeting {other:?}")),
                            }
                        }
                        Err(e) => failed.push(format!("handshake: {e}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let failed_series = "mailtls_certificate_reloads_total{outcome=\"failed\"}";
    let before = metric(&proxy, failed_series);
    // Garbage, then a PEM cut off mid-way (a half-written renewal).
    let good_pem = std::fs::read(&proxy.certs.cert).unwrap();
    let garbage: Vec<u8> = payload(3000, 99);
    for (round, bad) in [garbage, good_pem[..good_pem.len() / 2].to_vec()].into_iter().enumerate() {
        std::fs::write(&proxy.certs.cert, &bad).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while metric(&proxy, failed_series) < before + 1.0 + round as f64 {
            assert!(Instant::now() < deadline, "reload failure {} not counted within 20 s", round + 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bystanders.check("after the certificate turned to garbage").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut failed) = (0, Vec::new());
    for l in loaders {
        let (k, f) = l.await.expect("loader");
        ok += k;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} new sessions failed while the certificate file was garbage: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 0, "no new session was tried");
    let counted = metric(&proxy, failed_series) - before;
    report(
        "fault certificate_garbage",
        &format!("new_sessions_during={ok} failed=0 old_certificate_shown=all reload_failures_counted={counted} bystanders=10 ok"),
    );
    drop(bystanders);
    Arc::try_unwrap(proxy).ok().expect("loaders done").stop().await;
    assert_no_new_panics(panics);
}

// ---- SIGTERM under load (the real binary) ------------------------------------------------

/// The text of message `j` of client `i`, as sent after DATA (dot-stuffing never needed:
/// no line starts with a dot).
fn message(i: usize, j: usize) -> String {
    let mut text = format!("Message-Id: <m-{i}-{j}@test>\r\nSubject: soak {i}/{j}\r\n\r\n");
    let body = payload(6 * 1024, (i * 1000 + j) as u64 + 5);
    for chunk in body.chunks(38) {
        for b in chunk {
            text.push_str(&format!("{b:02x}"));
        }
        text.push_str("\r\n");
    }
    text
}

/// The messages a backend connection received: Message-Id -> text after DATA, for each
/// transaction whose final "." arrived.
fn messages_received(data: &[u8]) -> std::collections::HashMap<String, String> {
    let text = String::from_utf8_lossy(data);
    let mut out = std::collections::HashMap::new();
    let mut rest: &str = &text;
    while let Some(start) = rest.find("DATA\r\n") {
        rest = &rest[start + 6..];
        let Some(end) = rest.find("\r\n.\r\n") else { break };
        let body = &rest[..end + 2];
        if let Some(id) = body.strip_prefix("Message-Id: <").and_then(|b| b.split_once('>')).map(|(id, _)| id)
        {
            out.insert(id.to_owned(), body.to_owned());
        }
        rest = &rest[end + 5..];
    }
    out
}

async fn smtp_logged_in(addr: SocketAddr, certs: &Certs) -> Result<Conn<TlsClient>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut c = Conn::new(tls_handshake(tcp, certs).await.map_err(|e| format!("handshake: {e}"))?);
    let expect = |got: Option<String>, code: &str| match got {
        Some(l) if l.starts_with(code) => Ok(()),
        other => Err(format!("wanted {code}, got {other:?}")),
    };
    let patience = Duration::from_secs(20);
    expect(c.try_line(patience).await, "220 ")?;
    c.send("EHLO client.test\r\n").await;
    loop {
        match c.try_line(patience).await {
            Some(l) if l.starts_with("250-") => {}
            other => {
                expect(other, "250 ")?;
                break;
            }
        }
    }
    c.send("AUTH PLAIN AGFsaWNlAHg=\r\n").await;
    expect(c.try_line(patience).await, "235 ")?;
    Ok(c)
}

/// One mail transaction; Ok once the client has seen the final 250.
async fn send_mail(c: &mut Conn<TlsClient>, i: usize, j: usize) -> Result<(), String> {
    let patience = Duration::from_secs(20);
    for (command, code) in
        [(format!("MAIL FROM:<c{i}@test>\r\n"), "250 "), ("RCPT TO:<r@test>\r\n".to_owned(), "250 ")]
    {
        c.stream.write_all(command.as_bytes()).await.map_err(|e| e.to_string())?;
        match c.try_line(patience).await {
            Some(l) if l.starts_with(code) => {}
            other => return Err(format!("{}: {other:?}", command.trim())),
        }
    }
    c.stream.write_all(b"DATA\r\n").await.map_err(|e| e.to_string())?;
    match c.try_line(patience).await {
        Some(l) if l.starts_with("354 ") => {}
        other => return Err(format!("DATA: {other:?}")),
    }
    c.stream.write_all(message(i, j).as_bytes()).await.map_err(|e| e.to_string())?;
    c.stream.write_all(b".\r\n").await.map_err(|e| e.to_string())?;
    c.stream.flush().await.map_err(|e| e.to_string())?;
    match c.try_line(patience).await {
        Some(l) if l.starts_with("250 ") => Ok(()),
        other => Err(format!("end of data: {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_refuses_new_drains_open_and_loses_no_acknowledged_mail() {
    let _serial = serial().await;
    let backend = Backend::start(Script::Smtp).await;
    let certs = Arc::new(certs());
    let port = free_port();
    let drain = Duration::from_secs(8);
    let text = config_text(
        &certs,
        &[Listener::new("submissions", "smtp", "implicit", backend.addr)],
        &format!("[timeouts]\ndrain = {}\n[limits]\nmax_connections_per_address = 5000\n", drain.as_secs()),
    )
    .replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1);
    let config = certs.dir.path().join("mailtls.toml");
    std::fs::write(&config, &text).unwrap();
    let mut proxy = spawn_mailtls(&config);
    let addr = local(port);
    proxy.wait_accepting(addr).await;

    let clients = size(20, 100);
    let per_client = 20;
    let acked = Arc::new(Mutex::new(Vec::<(usize, usize, Instant)>::new()));
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (certs, acked) = (certs.clone(), acked.clone());
            tokio::spawn(async move {
                let mut c = smtp_logged_in(addr, &certs).await?;
                for j in 0..per_client {
                    send_mail(&mut c, i, j).await.map_err(|e| format!("client {i} message {j}: {e}"))?;
                    acked.lock().unwrap().push((i, j, Instant::now()));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                c.send("QUIT\r\n").await;
                Ok::<_, String>(())
            })
        })
        .collect();
    // One session that stays open and silent: the drain must end it.
    let mut lingering = smtp_logged_in(addr, &certs).await.expect("lingering session");

    // SIGTERM once every client has delivered a message or two.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < clients * 2 {
        assert!(Instant::now() < deadline, "the clients did not get going within 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.signal("TERM");
    let signalled = Instant::now();

    // New connections are refused ...
    let refused_after = loop {
        if TcpStream::connect(addr).await.is_err() {
            break signalled.elapsed();
        }
        assert!(signalled.elapsed() < Duration::from_secs(3), "still accepting 3 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // ... while the open sessions finish their work inside the drain time.
    let mut errors = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.expect("client task") {
            errors.push(e);
        }
    }
    let finished = signalled.elapsed();
    assert!(errors.is_empty(), "sessions cut during the drain: {errors:?}");
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), clients * per_client);
    let after_signal = acked.iter().filter(|(_, _, t)| *t > signalled).count();
    // The silent session is closed when the drain time is over, then the process exits 0.
    assert!(
        lingering.closed_within(drain + Duration::from_secs(10)).await,
        "the lingering session outlived the drain"
    );
    let status = proxy.exit_within(Duration::from_secs(15)).await.expect("mailtls exits after the drain");
    let exited = signalled.elapsed();
    assert!(status.success(), "exit status {status}: {}", proxy.log());
    assert!(!proxy.log().contains("panicked"), "{}", proxy.log());

    // Every message whose 250 a client saw is complete at the backend.
    let mut received = std::collections::HashMap::new();
    for k in 0..backend.connections() {
        received.extend(messages_received(&backend.seen(k).data));
    }
    let mut incomplete = Vec::new();
    for &(i, j, _) in &acked {
        if received.get(&format!("m-{i}-{j}@test")) != Some(&message(i, j)) {
            incomplete.push((i, j));
        }
    }
    assert!(incomplete.is_empty(), "acknowledged but not complete at the backend: {incomplete:?}");
    report(
        "fault sigterm",
        &format!(
            "clients={clients} acknowledged={} acknowledged_after_signal={after_signal} complete_at_backend={} \
             new_connections_refused_after_ms={} open_sessions_finished_after_ms={} drain_s={} exit_after_ms={} exit_status=0",
            acked.len(),
            acked.len(),
            refused_after.as_millis(),
            finished.as_millis(),
            drain.as_secs(),
            exited.as_millis()
        ),
    );
}

// ---- 4. hostile input -------------------------------------------------------------------

/// What a slowloris client drips, and where.
#[derive(Clone, Copy, Debug)]
enum Drip {
    /// An endless command line before STARTTLS (IMAP 143).
    PreTlsLine,
    /// A ClientHello, byte by byte, on an implicit-TLS port (993).
    HelloImplicit,
    /// A ClientHello, byte by byte, after the STARTTLS go-ahead (143).
    HelloAfterStartTls,
    /// An endless LOGIN line inside TLS, before authentication (993).
    LoginInsideTls,
}

/// Sends one byte of `bytes` (cycled) every `every` until the proxy closes; the time it
/// held the connection, or an error past `limit`.
async fn drip<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    every: Duration,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    for &b in bytes.iter().cycle() {
        if stream.write_all(&[b]).await.is_err() || stream.flush().await.is_err() {
            return Ok(started.elapsed());
        }
        let next = tokio::time::Instant::now() + every;
        loop {
            match tokio::time::timeout_at(next, stream.read(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(started.elapsed()),
                Ok(Ok(_)) => {} // a greeting or farewell
            }
        }
        if started.elapsed() > limit {
            return Err(format!("still open after {limit:?}"));
        }
    }
    Err("empty drip".to_owned())
}

async fn slowloris(
    kind: Drip,
    source: Ipv4Addr,
    imap: SocketAddr,
    imaps: SocketAddr,
    certs: Arc<Certs>,
    hello: Arc<Vec<u8>>,
) -> Result<Duration, String> {
    let every = Duration::from_millis(900);
    let limit = Duration::from_secs(30);
    let io = |e: std::io::Error| e.to_string();
    match kind {
        Drip::PreTlsLine => {
            let mut tcp = connect_from(source, imap).await.map_err(io)?;
            drip(&mut tcp, b"a NOOP xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", every, limit).await
        }
        Drip::HelloImplicit => {
            let mut tcp = connect_from(source, imaps).await.map_err(io)?;
            drip(&mut tcp, &hello, every, limit).await
        }
        Drip::HelloAfterStartTls => {
            let mut c = Conn::new(connect_from(source, imap).await.map_err(io)?);
            c.try_line(Duration::from_secs(20)).await.ok_or("no greeting")?;
            c.send("a STARTTLS\r\n").await;
            c.try_line(Duration::from_secs(20)).await.ok_or("no go-ahead")?;
            let mut tcp = c.into_inner();
            drip(&mut tcp, &hello, every, limit).await
        }
        Drip::LoginInsideTls => {
            let tcp = connect_from(source, imaps).await.map_err(io)?;
            let mut c = Conn::new(tls_handshake(tcp, &certs).await.map_err(io)?);
            c.try_line(Duration::from_secs(20)).await.ok_or("no greeting")?;
            let mut tls = c.into_inner();
            drip(&mut tls, b"a LOGIN xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", every, limit)
                .await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_closed_by_timeouts_while_ordinary_clients_are_served() {
    let _serial = serial().await;
    let panics = panics_so_far();
    raise_fd_limit();
    let backend = Backend::start(Script::Imap).await;
    let proxy = Arc::new(
        Proxy::start_with(
            &[
                Listener::new("imap", "imap", "starttls", backend.addr),
                Listener::new("imaps", "imap", "implicit", backend.addr),
            ],
            "[timeouts]\nhandshake = 2\npre_auth_idle = 2\ndrain = 1\n",
        )
        .await,
    );
    let attackers = size(200, 800);
    let hello = Arc::new(client_hello(&proxy.certs));
    let (imap, imaps) = (proxy.addr("imap"), proxy.addr("imaps"));
    let kinds = [Drip::PreTlsLine, Drip::HelloImplicit, Drip::HelloAfterStartTls, Drip::LoginInsideTls];
    let attack: Vec<_> = (0..attackers)
        .map(|i| {
            let kind = kinds[i % kinds.len()];
            // 40 source addresses, so the per-address limit (100) is not what stops them.
            let source = Ipv4Addr::new(127, 0, 0, 2 + (i % 40) as u8);
            let (certs, hello) = (proxy.certs.clone(), hello.clone());
            tokio::spawn(async move { (kind, slowloris(kind, source, imap, imaps, certs, hello).await) })
        })
        .collect();

    // Ordinary clients, two at a time, while the attack lasts: log in, echo, leave.
    let attack_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ordinary: Vec<_> = (0..2)
        .map(|k| {
            let (proxy, over) = (proxy.clone(), attack_over.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0usize, Vec::new());
                let mut round = 0u64;
                let deadline = Instant::now() + Duration::from_secs(120);
                while !over.load(Ordering::SeqCst) && Instant::now() < deadline {
                    round += 1;
                    let role = if (round + k) % 2 == 0 { Role::Imaps } else { Role::Imap };
                    let session = async {
                        let mut s = open_echo(&proxy, role).await;
                        ping(&mut s, &payload(4096, round), Duration::from_secs(20)).await
                    };
                    match tokio::time::timeout(Duration::from_secs(30), session).await {
                        Ok(Ok(())) => ok += 1,
                        Ok(Err(e)) => failed.push(e),
                        Err(_) => failed.push("no session within 30 s".to_owned()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();

    let mut held = Vec::new();
    let mut errors = Vec::new();
    for t in attack {
        let (kind, result) = t.await.expect("attacker task");
        match result {
            Ok(d) => held.push(d),
            Err(e) => errors.push(format!("{kind:?}: {e}")),
        }
    }
    attack_over.store(true, Ordering::SeqCst);
    let (mut ok, mut failed) = (0, Vec::new());
    for t in ordinary {
        let (k, f) = t.await.expect("ordinary client task");
        ok += k;
        failed.extend(f);
    }
    assert!(errors.is_empty(), "slowloris connections not closed by the timeouts: {errors:?}");
    assert!(failed.is_empty(), "ordinary sessions failed during the attack: {failed:?}");
    assert!(ok > 0, "no ordinary session ran during the attack");
    held.sort();
    let max = held.last().copied().unwrap_or_default();
    let median = held[held.len() / 2];
    gauge_returns_to(&proxy, "imap", 0.0, Duration::from_secs(10)).await;
    gauge_returns_to(&proxy, "imaps", 0.0, Duration::from_secs(10)).await;
    report(
        "hostile slowloris",
        &format!(
            "attackers={attackers} kinds=4 (pre-TLS line, ClientHello on 993, ClientHello after STARTTLS, LOGIN inside TLS) \
             byte_every_ms=900 handshake_s=2 pre_auth_idle_s=2 all_closed=yes held_median_ms={} held_max_ms={} \
             ordinary_sessions_ok={ok} ordinary_failed=0",
            median.as_millis(),
            max.as_millis()
        ),
    );
    Arc::try_unwrap(proxy).ok().expect("clients done").stop().await;
    assert_no_new_panics(panics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limits_hold_under_a_flood() {
    let _serial = serial().await;
    let panics = panics_so_far();
    let backend = Backend::start(Script::Imap).await;
    let proxy = Proxy::start_with(
        &[
            Listener::new("imap", "imap", "starttls", backend.addr),
            Listener::new("imaps", "imap", "implicit", backend.addr),
        ],
        "[limits]\nmax_connections_per_address = 10\n",
    )
    .await;
    let flooder = Ipv4Addr::new(127, 0, 0, 60);
    let (imap, imaps) = (proxy.addr("imap"), proxy.addr("imaps"));
    // Ten held from one address, on both listeners ...
    let mut held = Vec::new();
    for i in 0..10 {
        let mut c = Conn::new(connect_from(flooder, imap).await.unwrap());
        let greeting = c.try_line(Duration::from_secs(10)).await;
        assert!(greeting.as_deref().is_some_and(|g| g.starts_with("* OK")), "connection {i}: {greeting:?}");
        held.push(c);
    }
    // ... then a flood from it: every one refused in IMAP's words, plaintext or inside TLS.
    let flood = size(100, 1000);
    let mut refused = 0;
    for i in 0..flood {
        let tcp = connect_from(flooder, if i % 2 == 0 { imap } else { imaps }).await.unwrap();
        let line = if i % 2 == 0 {
            Conn::new(tcp).try_line(Duration::from_secs(10)).await
        } else {
            match tls_handshake(tcp, &proxy.certs).await {
                Ok(tls) => Conn::new(tls).try_line(Duration::from_secs(10)).await,
                Err(e) => Some(format!("handshake: {e}")),
            }
        };
        assert!(
            line.as_deref().is_some_and(|l| l.starts_with("* BYE [UNAVAILABLE] Too many connections")),
            "flood connection {i}: {line:?}"
        );
        refused += 1;
    }
    // Others are served meanwhile: another address, and an ordinary echo session.
    let mut other = Conn::new(connect_from(Ipv4Addr::new(127, 0, 0, 61), imap).await.unwrap());
    assert!(other.line().await.starts_with("* OK"));
    let mut s = open_echo(&proxy, Role::Imaps).await;
    ping(&mut s, b"served\r\n", Duration::from_secs(10)).await.expect("an ordinary session");
    // A freed slot is usable again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Conn::new(connect_from(flooder, imap).await.unwrap());
        if c.try_line(Duration::from_secs(10)).await.is_some_and(|l| l.starts_with("* OK")) {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counted = metric(&proxy, "mailtls_connections_refused_total{listener=\"imap\",limit=\"address\"}")
        + metric(&proxy, "mailtls_connections_refused_total{listener=\"imaps\",limit=\"address\"}");
    assert!(counted >= flood as f64, "refusals counted: {counted}");
    report(
        "hostile per_address_limit",
        &format!("limit=10 flood={flood} refused={refused} other_addresses_served=yes freed_slot_reused=yes"),
    );
    drop((held, other, s));
    proxy.stop().await;
    assert_no_new_panics(panics);
}

/// Protocol words that steer the state machines somewhere interesting.
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"STARTTLS",
    b"STLS",
    b"a LOGIN echo x",
    b"AUTH PLAIN",
    b"AUTHENTICATE PLAIN",
    b"{99999}",
    b"{4294967296}",
    b"{5+}",
    b"{0}",
    b"EHLO x",
    b"HELO x",
    b"MAIL FROM:<a@b>",
    b"RCPT TO:<a@b>",
    b"DATA",
    b"\r\n.\r\n",
    b"BDAT 100 LAST",
    b"USER echo",
    b"PASS x",
    b"CAPA",
    b"a CAPABILITY",
    b"XCLIENT ADDR=1.2.3.4",
    b"NOOP",
    b"QUIT",
    b"* OK",
    b"+ ",
    b"\x16\x03\x01\x02\x00",
    b"\0",
];

fn hostile_bytes(rng: &mut Rng, max: usize) -> Vec<u8> {
    let len = 1 + rng.below(max);
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        match rng.below(4) {
            0 => out.extend_from_slice(TOKENS[rng.below(TOKENS.len())]),
            1 => out.extend(std::iter::repeat_n(b'A', rng.below(600))),
            _ => out.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        }
    }
    out
}

/// Where the random bytes go in.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// The first bytes on the connection (before STARTTLS, or instead of a ClientHello).
    Plain,
    /// Inside TLS, before authentication.
    AfterTls,
    /// After login, in the relay (echo backend: the bytes must come back unchanged).
    AfterLogin,
}

/// A session of `role` brought to `phase` (greetings read).
async fn reach(proxy: &Proxy, role: Role, phase: Phase) -> Stream {
    match phase {
        Phase::Plain => Box::new(TcpStream::connect(proxy.addr(role.name())).await.expect("connect")),
        Phase::AfterLogin => open_echo(proxy, role).await,
        Phase::AfterTls => match role {
            Role::Submissions | Role::Imaps | Role::Pop3s => {
                let mut c = proxy.tls(role.name()).await;
                c.line().await;
                Box::new(c.into_inner())
            }
            _ => {
                let mut c = proxy.tcp(role.name()).await;
                let (command, go) = match role {
                    Role::Imap => ("a STARTTLS\r\n", "a OK"),
                    Role::Pop3 => ("STLS\r\n", "+OK"),
                    _ => ("STARTTLS\r\n", "220 "),
                };
                if role == Role::Pop3 || role == Role::Imap {
                    c.line().await;
                } else {
                    c.smtp_reply().await;
                }
                c.send(command).await;
                assert!(c.line().await.starts_with(go));
                Box::new(c.upgrade(&proxy.certs).await.into_inner())
            }
        },
    }
}

/// Random bytes into one session: they never crash or hang the proxy. Before login the
/// session must end by itself (a refusal, a bound, a timeout); after login the relay must
/// return them unchanged.
async fn hostile_session(
    proxy: Arc<Proxy>,
    role: Role,
    phase: Phase,
    seed: u64,
    max: usize,
) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let bytes = hostile_bytes(&mut rng, max);
    let stream = reach(&proxy, role, phase).await;
    let (mut rx, mut tx) = tokio::io::split(stream);
    let sent = bytes.clone();
    let cuts: Vec<usize> = (0..4).map(|_| rng.below(bytes.len() + 1)).collect();
    let writer = tokio::spawn(async move {
        let mut cuts = cuts;
        cuts.push(0);
        cuts.push(sent.len());
        cuts.sort();
        for w in cuts.windows(2) {
            if tx.write_all(&sent[w[0]..w[1]]).await.is_err() || tx.flush().await.is_err() {
                return tx;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx
    });
    let outcome = match phase {
        Phase::AfterLogin => {
            // SMTP: what the smuggling guard makes of them. When it refused, the session
            // ends with its reply, and the echo of what had passed may be cut short.
            let (want, refusal) = echoed(role, &bytes);
            if let Some(reply) = refusal {
                let mut got = Vec::new();
                let read = tokio::time::timeout(Duration::from_secs(30), rx.read_to_end(&mut got)).await;
                let ended_right =
                    got.strip_suffix(reply.as_slice()).is_some_and(|echo| want.starts_with(echo));
                return match read {
                    Ok(_) if ended_right => Ok(()),
                    _ => Err(format!(
                        "{role:?} seed {seed}: the guard's refusal did not end the session cleanly"
                    )),
                };
            }
            let mut got = vec![0u8; want.len()];
            match tokio::time::timeout(Duration::from_secs(30), rx.read_exact(&mut got)).await {
                Ok(Ok(_)) if got == want => Ok(()),
                Ok(Ok(_)) => {
                    Err(format!("{role:?} seed {seed}: the relay altered {} random bytes", bytes.len()))
                }
                Ok(Err(e)) => Err(format!("{role:?} seed {seed}: relay read: {e}")),
                Err(_) => Err(format!("{role:?} seed {seed}: no echo within 30 s")),
            }
        }
        // handshake = 2, pre_auth_idle = 2, idle = 3: the proxy ends it well within 20 s.
        _ => {
            if peer_closes(&mut rx, Duration::from_secs(20)).await {
                Ok(())
            } else {
                Err(format!(
                    "{role:?} {phase:?} seed {seed}: still open 20 s after {} random bytes",
                    bytes.len()
                ))
            }
        }
    };
    let tx = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .map_err(|_| format!("{role:?} {phase:?} seed {seed}: writing never finished"))?
        .expect("writer task");
    drop(rx.unsplit(tx));
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_every_role_and_phase_never_crash_or_hang_the_proxy() {
    let _serial = serial().await;
    let panics = panics_so_far();
    raise_fd_limit();
    let roles = all_roles(
        "[timeouts]\nhandshake = 2\npre_auth_idle = 2\nidle = 3\ndrain = 1\n[limits]\nmax_connections_per_address = 5000\n",
    )
    .await;
    let proxy = Arc::new(roles.proxy);
    let per_case = size(6, 60);
    let max = size(16 * 1024, 64 * 1024);
    let mut cases = Vec::new();
    for phase in [Phase::Plain, Phase::AfterTls, Phase::AfterLogin] {
        let roles: &[Role] = match phase {
            Phase::AfterLogin => &ALL_ROLES,
            _ => &LISTED_ROLES,
        };
        for &role in roles {
            for k in 0..per_case {
                cases.push((role, phase, (cases.len() * 7919 + k) as u64));
            }
        }
    }
    let total = cases.len();
    let gate = Arc::new(Semaphore::new(64));
    let tasks: Vec<_> = cases
        .into_iter()
        .map(|(role, phase, seed)| {
            let (proxy, gate) = (proxy.clone(), gate.clone());
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.expect("semaphore");
                hostile_session(proxy, role, phase, seed, max).await
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(300), t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.push(e),
            Ok(Err(e)) => failures.push(format!("task: {e}")),
            Err(_) => failures.push("a hostile session outlived 5 minutes".to_owned()),
        }
    }
    assert!(failures.is_empty(), "{} of {total} hostile sessions: {failures:#?}", failures.len());
    // The proxy is unharmed: every role serves a normal session, and nothing stays open.
    for role in ALL_ROLES {
        let mut s = open_echo(&proxy, role).await;
        ping(&mut s, b"still serving\r\n", Duration::from_secs(10))
            .await
            .expect("a normal session afterwards");
    }
    for role in LISTED_ROLES {
        gauge_returns_to(&proxy, role.name(), 0.0, Duration::from_secs(20)).await;
    }
    report(
        "hostile random_bytes",
        &format!("sessions={total} roles=7 (+ port 25 plaintext after MAIL) phases=3 (first bytes, inside TLS before login, after login) max_bytes={max} crashed=0 hung=0 altered=0"),
    );
    Arc::try_unwrap(proxy).ok().expect("sessions done").stop().await;
    assert_no_new_panics(panics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_lines_and_literals_end_only_their_session() {
    let _serial = serial().await;
    let panics = panics_so_far();
    let roles = all_roles("[timeouts]\nhandshake = 2\npre_auth_idle = 3\ndrain = 1\n").await;
    let proxy = &roles.proxy;
    let mut bystanders = Bystanders::open(proxy, Role::Imaps, 5).await;
    let marker = "Q".repeat(64);
    let huge = |n: usize| format!("{marker}{}", "Q".repeat(n));
    let mut cases = 0;

    // Before TLS: 100,000 bytes without a line end on each STARTTLS port.
    for role in [Role::Submission, Role::MxStarttls, Role::Imap, Role::Pop3] {
        let mut c = proxy.tcp(role.name()).await;
        let _ =
            tokio::time::timeout(Duration::from_secs(10), c.stream.write_all(huge(100_000).as_bytes())).await;
        assert!(
            c.closed_within(Duration::from_secs(15)).await,
            "{role:?}: an endless pre-TLS line did not end the session"
        );
        cases += 1;
    }
    // Inside TLS, before login: a line over limits.max_line (16384).
    for (role, prefix) in [(Role::Submissions, "EHLO "), (Role::Imaps, "a LOGIN "), (Role::Pop3s, "USER ")] {
        let mut c = Conn::new(reach(proxy, role, Phase::AfterTls).await);
        let line = format!("{prefix}{}\r\n", huge(20_000));
        let _ = tokio::time::timeout(Duration::from_secs(10), c.stream.write_all(line.as_bytes())).await;
        assert!(
            c.closed_within(Duration::from_secs(15)).await,
            "{role:?}: an overlong line did not end the session"
        );
        cases += 1;
    }
    // IMAP literals over limits.max_literal (65536), and absurd ones: refused, never invited.
    for literal in
        ["{4294967296}", "{18446744073709551616}", "{70000}", "{70000+}", "{99999999999999999999999}"]
    {
        let mut c = Conn::new(reach(proxy, Role::Imaps, Phase::AfterTls).await);
        c.send(format!("a LOGIN {literal}\r\n")).await;
        let reply = c.try_line(Duration::from_secs(10)).await;
        assert!(
            reply.as_deref().is_none_or(|r| !r.starts_with('+')),
            "a literal {literal} over the bound was invited: {reply:?}"
        );
        if literal.ends_with("+}") {
            let _ =
                tokio::time::timeout(Duration::from_secs(10), c.stream.write_all(huge(70_000).as_bytes()))
                    .await;
        }
        assert!(
            c.closed_within(Duration::from_secs(15)).await || reply.is_some(),
            "literal {literal}: no answer, no close"
        );
        cases += 1;
    }
    // The largest literal allowed still passes (a positive control for the bound).
    let mut c = Conn::new(reach(proxy, Role::Imaps, Phase::AfterTls).await);
    c.send(format!("a LOGIN {{65536+}}\r\n{} x\r\n", "L".repeat(65536))).await;
    let reply = c.try_line(Duration::from_secs(10)).await;
    assert!(reply.as_deref().is_some_and(|r| r.starts_with("a OK")), "a 65536-byte literal: {reply:?}");

    // Nothing of the oversized lines reached a backend, and the others were untouched.
    for role in [Role::Submissions, Role::MxStarttls, Role::Imaps, Role::Pop3s] {
        assert!(
            !roles.backend(role).all_text().contains(&marker),
            "{role:?}: part of an oversized line reached the backend"
        );
    }
    bystanders.check("after the oversized input").await;
    report("hostile oversized", &format!("cases={cases} (100,000-byte pre-TLS lines on 4 ports, 20,000-byte lines inside TLS on 3, 5 literals over 65,536) sessions_ended=all reached_backend=0 bystanders ok; a 65,536-byte literal passes"));
    drop(bystanders);
    roles.proxy.stop().await;
    assert_no_new_panics(panics);
}
