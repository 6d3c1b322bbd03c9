//! The real `mailtls` binary as a child process: start it (directly or under a wrapper
//! such as systemd-socket-activate), signal it, read its logs, scrape its admin endpoint.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_mailtls");

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// A running child; killed if the test ends before it does.
pub struct Running {
    pub child: Child,
    pub stderr: PathBuf,
    pub stdout: PathBuf,
}

impl Running {
    /// Spawns `cmd` with stdout and stderr captured in files under `dir`.
    pub fn spawn(mut cmd: Command, dir: &Path) -> Running {
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        let stderr = dir.join(format!("stderr-{n}.log"));
        let stdout = dir.join(format!("stdout-{n}.log"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start the process");
        Running { child, stderr, stdout }
    }

    /// `mailtls --config PATH ARGS...`.
    pub fn mailtls(config: &Path, args: &[&str]) -> Running {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(config).args(args);
        Running::spawn(cmd, config.parent().unwrap())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// The exit status, once it exits within `within`.
    pub async fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until stderr contains `needle` `times` times.
    pub async fn log_shows(&self, needle: &str, times: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log().matches(needle).count() >= times {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// Waits until `addr` accepts connections; panics if the process exits first.
    pub async fn wait_accepting(&mut self, addr: SocketAddr) {
        let start = Instant::now();
        loop {
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
            {
                return;
            }
            assert!(self.child.try_wait().unwrap().is_none(), "mailtls exited at start: {}", self.log());
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mailtls never listened on {addr}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
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
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `text` with each "127.0.0.1:0" in turn replaced by the next of `ports`.
pub fn with_ports(text: &str, ports: &[u16]) -> String {
    ports.iter().fold(text.to_owned(), |t, p| t.replacen("127.0.0.1:0", &format!("127.0.0.1:{p}"), 1))
}

/// `text` with `lines` added to the listener named `name`.
pub fn in_listener(text: &str, name: &str, lines: &str) -> String {
    let marker = format!("name = \"{name}\"\n");
    assert!(text.contains(&marker), "no listener {name}");
    text.replacen(&marker, &format!("{marker}{lines}\n"), 1)
}

/// GET `path` from the admin endpoint: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("admin endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

/// The value of the sample `series` (name with labels, exactly as exposed), if present.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Scrapes until `series` reaches `at_least` (metrics are updated as sessions end).
pub async fn scrape_until(admin: SocketAddr, series: &str, at_least: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = http_get(admin, "/metrics");
        if sample(&body, series).is_some_and(|v| v >= at_least) || Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
