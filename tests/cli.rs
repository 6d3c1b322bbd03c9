//! The real `mailtls` binary: `--check` answers (OK, or an error naming key and line),
//! and graceful stop on SIGTERM / SIGINT with a bounded drain.

mod common;

use common::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_mailtls");

/// What one run of the binary printed and how it ended.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn show(&self) -> String {
        format!("exit {:?}\nstdout: {}\nstderr: {}", self.code, self.stdout, self.stderr)
    }
}

fn run_check_in(dir: &Path, config: &Path) -> Outcome {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("--check")
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run mailtls --check");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes `text` as a config file in `dir` and runs `--check` on it.
fn check_text(dir: &Path, text: &str) -> (PathBuf, Outcome) {
    let path = dir.join("mailtls.toml");
    std::fs::write(&path, text).unwrap();
    let outcome = run_check_in(dir, &path);
    (path, outcome)
}

/// 1-based line of the `nth` (0-based) line that starts with `prefix`.
fn line_starting(text: &str, prefix: &str, nth: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with(prefix))
        .nth(nth)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("no line #{nth} starting with {prefix:?} in\n{text}"))
}

fn backend_addr() -> SocketAddr {
    "127.0.0.1:11143".parse().unwrap()
}

/// A valid one-listener config for `certs`.
fn valid_config(certs: &Certs) -> String {
    config_text(certs, &[Listener::new("imaps", "imap", "implicit", backend_addr())], "")
}

/// A refused config: exit status non-zero (and not a crash), no OK, no panic, and the
/// message names `key` at `line` of `path`.
fn assert_refused(path: &Path, outcome: &Outcome, line: usize, key: &str) {
    let show = outcome.show();
    assert!(outcome.code.is_some_and(|c| c != 0), "expected a failing exit: {show}");
    assert!(!outcome.stderr.contains("panicked"), "{show}");
    assert!(!outcome.stdout.contains("OK"), "{show}");
    let located = format!("{}:{line}:", path.display());
    assert!(outcome.stderr.contains(&located), "message does not point at line {line} ({located}): {show}");
    assert!(outcome.stderr.contains(key), "message does not name {key}: {show}");
}

#[test]
fn check_accepts_valid_config_and_prints_ok() {
    let certs = certs();
    let (path, outcome) = check_text(certs.dir.path(), &valid_config(&certs));
    assert_eq!(outcome.code, Some(0), "{}", outcome.show());
    assert!(outcome.stdout.contains("OK (1 listener, 1 certificate)\n"), "{}", outcome.show());
    assert!(outcome.stdout.contains(&path.display().to_string()), "{}", outcome.show());
    assert!(!outcome.stderr.contains("panicked"), "{}", outcome.show());
}

#[test]
fn check_names_unknown_key_and_its_line() {
    let certs = certs();
    let text = valid_config(&certs)
        .replace("proxy_protocol = \"v2\"\n", "proxy_protocol = \"v2\"\nproxy_protcol = \"v1\"\n");
    let line = line_starting(&text, "proxy_protcol", 0);
    let (path, outcome) = check_text(certs.dir.path(), &text);
    assert_refused(&path, &outcome, line, "proxy_protcol");
}

#[test]
fn check_names_bad_listen_address_and_its_line() {
    let certs = certs();
    let text = valid_config(&certs).replace("listen = [\"127.0.0.1:0\"]", "listen = [\"127.0.0.1\"]");
    let line = line_starting(&text, "listen = ", 0);
    let (path, outcome) = check_text(certs.dir.path(), &text);
    assert_refused(&path, &outcome, line, "listeners[0].listen[0]");
}

#[test]
fn check_names_missing_certificate_file_and_its_line() {
    let certs = certs();
    let missing = certs.dir.path().join("no-such-cert.pem");
    let text = valid_config(&certs).replace(
        &format!("{:?}", certs.cert.display().to_string()),
        &format!("{:?}", missing.display().to_string()),
    );
    assert!(text.contains("no-such-cert.pem"));
    let line = line_starting(&text, "cert = ", 0);
    let (path, outcome) = check_text(certs.dir.path(), &text);
    assert_refused(&path, &outcome, line, "tls.certificates[0].cert");
    assert!(outcome.stderr.contains("no-such-cert.pem"), "the file itself is named: {}", outcome.show());
}

#[test]
fn check_names_key_that_does_not_match_certificate() {
    let a = certs();
    let b = certs();
    let text = valid_config(&a).replace(
        &format!("{:?}", a.key.display().to_string()),
        &format!("{:?}", b.key.display().to_string()),
    );
    assert!(text.contains(&b.key.display().to_string()));
    let line = line_starting(&text, "key = ", 0);
    let (path, outcome) = check_text(a.dir.path(), &text);
    assert_refused(&path, &outcome, line, "tls.certificates[0].key");
}

#[test]
fn check_refuses_duplicate_listener_names() {
    let certs = certs();
    let text = config_text(
        &certs,
        &[
            Listener::new("imaps", "imap", "implicit", backend_addr()),
            Listener::new("imaps", "imap", "starttls", backend_addr()),
        ],
        "",
    );
    // Distinct addresses, so only the name is wrong.
    let text =
        text.replacen("127.0.0.1:0", "127.0.0.1:10993", 1).replacen("127.0.0.1:0", "127.0.0.1:10143", 1);
    let line = line_starting(&text, "name = \"imaps\"", 1);
    let (path, outcome) = check_text(certs.dir.path(), &text);
    assert_refused(&path, &outcome, line, "listeners[1].name");
}

#[test]
fn check_refuses_plaintext_imap_listener() {
    let certs = certs();
    let text =
        config_text(&certs, &[Listener::new("imap", "imap", "starttls", backend_addr()).opportunistic()], "");
    let line = line_starting(&text, "require_tls = false", 0);
    let (path, outcome) = check_text(certs.dir.path(), &text);
    assert_refused(&path, &outcome, line, "listeners[0].require_tls");
}

#[test]
fn check_of_missing_config_file_fails_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let outcome = run_check_in(dir.path(), &path);
    assert!(outcome.code.is_some_and(|c| c != 0), "{}", outcome.show());
    assert!(outcome.stderr.contains("absent.toml"), "{}", outcome.show());
    assert!(!outcome.stderr.contains("panicked"), "{}", outcome.show());
}

/// The binary's message names each cause once: the library's errors end with their
/// source's text already, so printing the chain after it would say it twice.
#[test]
fn a_failed_run_names_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let outcome = run_check_in(dir.path(), &path);
    assert_eq!(
        outcome.stderr,
        format!(
            "mailtls: cannot read config file {}: No such file or directory (os error 2)\n",
            path.display()
        ),
        "{}",
        outcome.show()
    );

    let certs = certs();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = valid_config(&certs).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let config = certs.dir.path().join("mailtls.toml");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .current_dir(certs.dir.path())
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .expect("run mailtls");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let said = format!("listener \"imaps\": cannot listen on 127.0.0.1:{port}: Address already in use");
    assert!(stderr.contains(&said), "{stderr}");
    assert_eq!(stderr.matches("Address already in use").count(), 1, "the cause twice: {stderr}");
}

/// A failed run says why in one write(2) to stderr: written piece by piece, the message
/// would be torn apart by any other process appending to the same log file.
#[test]
fn a_failed_run_writes_its_error_in_one_piece() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("absent.toml");
    let trace = dir.path().join("strace.txt");
    let traced = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=write,writev", "-e", "signal=none", "-o"])
        .arg(&trace)
        .arg(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--check")
        .stdin(Stdio::null())
        .output();
    let out = match traced {
        Ok(out) if trace.exists() => out,
        Ok(out) => {
            println!(
                "SKIPPED: strace could not trace mailtls here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return;
        }
        Err(e) => {
            println!("SKIPPED: strace is not installed ({e}); tests/run.sh installs it as root");
            return;
        }
    };
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let calls = std::fs::read_to_string(&trace).unwrap();
    let to_stderr: Vec<&str> =
        calls.lines().filter(|l| l.contains("write(2,") || l.contains("writev(2,")).collect();
    assert_eq!(to_stderr.len(), 1, "the error went out in {} writes:\n{calls}", to_stderr.len());
    assert!(to_stderr[0].contains("mailtls: "), "{}", to_stderr[0]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.toml"));
}

/// `--check` writes nothing: a `self_signed = true` pair that start-up would create is
/// not created by the check.
#[test]
fn check_creates_no_self_signed_files() {
    let certs = certs();
    let (cert, key) = (certs.dir.path().join("trial-cert.pem"), certs.dir.path().join("trial-key.pem"));
    let text = valid_config(&certs)
        .replace(
            &format!("{:?}", certs.cert.display().to_string()),
            &format!("{:?}", cert.display().to_string()),
        )
        .replace(
            &format!("{:?}", certs.key.display().to_string()),
            &format!("{:?}", key.display().to_string()),
        )
        .replace("[[listeners]]", "self_signed = true\n[[listeners]]");
    let (_, outcome) = check_text(certs.dir.path(), &text);
    assert_eq!(outcome.code, Some(0), "{}", outcome.show());
    assert!(!cert.exists() && !key.exists(), "--check wrote certificate files");
}

/// The README's run command (its first line: `cargo run --release -- --config FILE`), from
/// the crate root, with `--check`: the config it names must pass.
#[test]
fn readme_check_command_on_example_config_exits_zero() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let run = readme
        .lines()
        .find(|l| l.starts_with("cargo run --release -- --config "))
        .expect("the README's run command");
    let config = run.split_whitespace().nth(5).expect("the run command names a config");
    assert_eq!(config, "config/mailtls.example.toml", "{run}");
    let outcome = run_check_in(root, Path::new(config));
    assert_eq!(outcome.code, Some(0), "{}", outcome.show());
    assert!(outcome.stdout.contains("OK"), "{}", outcome.show());
}

// ---- signals ----------------------------------------------------------------------------

/// The binary running in the background; killed if the test ends before it does.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port that was free a moment ago (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn accepts(addr: SocketAddr) -> bool {
    matches!(tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await, Ok(Ok(_)))
}

const DRAIN: Duration = Duration::from_secs(2);

/// Starts the binary with an imaps and a submission listener, opens an echo IMAP session
/// and a pre-TLS SMTP session, sends `signal`, and checks the graceful stop.
async fn graceful_stop_on(signal: &str) {
    let imap_backend = Backend::start(Script::Imap).await;
    let smtp_backend = Backend::start(Script::Smtp).await;
    let certs = certs();
    let (imaps, submission) = (free_port(), free_port());
    let text = config_text(
        &certs,
        &[
            Listener::new("imaps", "imap", "implicit", imap_backend.addr),
            Listener::new("submission", "smtp", "starttls", smtp_backend.addr),
        ],
        &format!("[timeouts]\ndrain = {}\n", DRAIN.as_secs()),
    )
    .replacen("127.0.0.1:0", &format!("127.0.0.1:{imaps}"), 1)
    .replacen("127.0.0.1:0", &format!("127.0.0.1:{submission}"), 1);
    let config = certs.dir.path().join("mailtls.toml");
    std::fs::write(&config, &text).unwrap();
    let log = certs.dir.path().join("stderr.log");
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start mailtls");
    let mut run = Running { child, log };
    let imaps_addr: SocketAddr = format!("127.0.0.1:{imaps}").parse().unwrap();
    let submission_addr: SocketAddr = format!("127.0.0.1:{submission}").parse().unwrap();

    // Up and listening on both ports.
    let up = Instant::now();
    while !(accepts(imaps_addr).await && accepts(submission_addr).await) {
        assert!(run.child.try_wait().unwrap().is_none(), "mailtls exited at start: {}", run.log());
        assert!(up.elapsed() < Duration::from_secs(10), "mailtls never listened: {}", run.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An IMAP session logged in as echo (bulk relay) ...
    let tcp = TcpStream::connect(imaps_addr).await.unwrap();
    let mut imap = Conn::new(tls_handshake(tcp, &certs).await.expect("TLS handshake"));
    assert!(imap.line().await.starts_with("* OK"));
    imap.send("a LOGIN echo x\r\n").await;
    assert!(imap.line().await.starts_with("a OK"));
    imap.send("before the signal\r\n").await;
    assert_eq!(imap.line().await, "before the signal\r\n");
    // ... and an SMTP session still in its pre-TLS dialogue.
    let mut smtp = Conn::new(TcpStream::connect(submission_addr).await.unwrap());
    assert!(smtp.line().await.starts_with("220 "));

    run.signal(signal);
    let signalled = Instant::now();

    // The pre-TLS session is told and closed.
    let reply = smtp.try_line(PATIENCE).await;
    assert!(
        reply.as_deref().is_some_and(|r| r.starts_with("421 4.3.2")),
        "pre-TLS SMTP session after SIG{signal}: {reply:?}; log: {}",
        run.log()
    );
    assert!(smtp.closed_within(Duration::from_secs(1)).await, "pre-TLS SMTP session left open");

    // No new connections, while the process is still draining.
    while accepts(imaps_addr).await || accepts(submission_addr).await {
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "still accepting 1 s after SIG{signal}: {}",
            run.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(run.child.try_wait().unwrap().is_none(), "exited without draining: {}", run.log());

    // The echo session keeps working inside the drain time ...
    imap.send("right after the signal\r\n").await;
    assert_eq!(imap.line().await, "right after the signal\r\n");
    tokio::time::sleep(
        (signalled + DRAIN / 2 + Duration::from_millis(200)).saturating_duration_since(Instant::now()),
    )
    .await;
    imap.send("late in the drain\r\n").await;
    assert_eq!(imap.line().await, "late in the drain\r\n", "echo session cut before the drain time was over");
    // ... and is closed when it is over.
    assert!(
        imap.closed_within(DRAIN + Duration::from_secs(2)).await,
        "echo session still open after the drain: {}",
        run.log()
    );

    // The process exits 0 within drain + 3 s of the signal.
    let status = loop {
        if let Some(status) = run.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < DRAIN + Duration::from_secs(3),
            "mailtls still running {:?} after SIG{signal}: {}",
            signalled.elapsed(),
            run.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "mailtls exited with {status} after SIG{signal}: {}", run.log());
    assert!(!run.log().contains("panicked"), "{}", run.log());
    // Only the echo session ever reached a backend.
    assert_eq!(imap_backend.connections(), 1);
    assert_eq!(smtp_backend.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_says_421_to_pre_tls_and_drains_then_exits_zero() {
    graceful_stop_on("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_accepting_says_421_to_pre_tls_and_drains_then_exits_zero() {
    graceful_stop_on("INT").await;
}

#[test]
fn check_loads_routes_files_relative_to_the_config_and_names_their_errors() {
    let certs = certs();
    let dir = certs.dir.path();
    let placeholder: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let text = config_text(&certs, &[Listener::new("imaps", "imap", "implicit", placeholder)], "")
        .replace(&format!("backend = \"{placeholder}\""), "routes = \"routes.toml\"");
    std::fs::write(
        dir.join("routes.toml"),
        "default = \"127.0.0.1:143\"\n[routes]\n\"@a.example\" = \"h:1\"\n",
    )
    .unwrap();
    let (path, outcome) = check_text(dir, &text);
    assert_eq!(outcome.code, Some(0), "{}", outcome.show());
    assert!(outcome.stdout.contains("default 127.0.0.1:143; 0 addresses, 1 domains"), "{}", outcome.show());

    std::fs::write(
        dir.join("routes.toml"),
        "default = \"127.0.0.1:143\"\n[routes]\n\"a.example\" = \"h:1\"\n",
    )
    .unwrap();
    let outcome = run_check_in(dir, &path);
    assert_eq!(outcome.code, Some(1), "{}", outcome.show());
    let line = line_starting(&text, "routes = ", 0);
    let expected = format!(
        "{}:{line}: listeners[0].routes: {}:3: routes.\"a.example\": a key is a full address",
        path.display(),
        dir.join("routes.toml").display()
    );
    assert!(outcome.stderr.contains(&expected), "{}", outcome.show());

    std::fs::remove_file(dir.join("routes.toml")).unwrap();
    let outcome = run_check_in(dir, &path);
    assert!(
        outcome.code == Some(1) && outcome.stderr.contains("cannot read routes file"),
        "{}",
        outcome.show()
    );
}
