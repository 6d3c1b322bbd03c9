//! The `openssl s_client` command as tests drive it: one connection with stdin held open
//! briefly, its whole output returned for assertions ("Reused, TLSv1.3", certificates...).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `openssl s_client` against `addr` with `args`, holding stdin open ~500 ms (so the
/// greeting and any NewSessionTicket arrive), then closing it. Returns stdout + stderr.
pub async fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let mut all: Vec<String> = vec!["s_client".into(), "-connect".into(), addr.to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("openssl")
            .args(&all)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl s_client");
        std::thread::sleep(Duration::from_millis(500));
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
    .await
    .unwrap()
}
