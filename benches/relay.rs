//! Relay benchmark: bytes through mailtls's relay engine between real loopback TCP
//! sockets, reported as throughput and as the process's CPU seconds per GiB relayed
//! (utime + stime from /proc/self/stat), which is what a shared machine measures fairly.
//!
//! Run: cargo bench --bench relay [-- MiB]   (default 1024 MiB per direction)

use std::time::{Duration, Instant};

use mailtls::relay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 64 * 1024;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')' + state.
    (ticks(11) + ticks(12)) / 100.0
}

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

async fn one_direction(mib: usize) -> (Duration, f64) {
    let (mut client, client_side) = pair().await;
    let (backend_side, mut backend) = pair().await;
    let relay = tokio::spawn(async move {
        relay::relay(client_side, backend_side, b"", b"", Duration::from_secs(60)).await
    });
    let total = mib * 1024 * 1024;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let buf = vec![0x5au8; CHUNK];
        let mut sent = 0;
        while sent < total {
            client.write_all(&buf).await.unwrap();
            sent += CHUNK;
        }
        client.shutdown().await.unwrap();
        client
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    loop {
        let n = backend.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    let elapsed = start.elapsed();
    let cpu = cpu_seconds() - cpu0;
    assert_eq!(got, total);
    drop(backend);
    let _ = writer.await;
    let _ = relay.await;
    (elapsed, cpu)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a quick smoke test.
    let benching = std::env::args().any(|a| a == "--bench");
    let mib: usize =
        std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(if benching { 1024 } else { 8 });
    // One worker thread: the figure is the relay's cost, comparable with one-worker peers.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (elapsed, cpu) = rt.block_on(one_direction(mib));
    let gib = mib as f64 / 1024.0;
    println!(
        "relay copy engine, plain TCP both legs, one direction: {mib} MiB in {:.2} s = {:.0} MiB/s; \
         process CPU {:.2} s = {:.2} CPU s/GiB (includes the load generator's own socket work)",
        elapsed.as_secs_f64(),
        mib as f64 / elapsed.as_secs_f64(),
        cpu,
        cpu / gib
    );
}
