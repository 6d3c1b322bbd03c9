//! Load generator for benches/compare.sh: TLS 1.3 clients (AES-128-GCM, X25519, no
//! resumption, so every handshake is full) speaking just enough IMAP to log in.
//!
//! Modes (one line of results on stdout):
//!   loadgen bulk ADDR CA up|down STREAMS BYTES   BYTES in total, split over STREAMS
//!   loadgen handshakes ADDR CA COUNT CONCURRENCY  handshake + greeting, then close
//!   loadgen idle ADDR CA COUNT                    log COUNT sessions in, print "ready",
//!                                                 hold them until stdin closes
//!   loadgen mail ADDR CA BACKEND COUNT SETUP WINDOW
//!       a mail server's day: log COUNT sessions in, spread over SETUP seconds (so the
//!       handshakes do not come as one storm), print "ready"; at a "go" line on stdin,
//!       make 1% of the sessions active each second for WINDOW seconds, half of them
//!       sending a NOOP (timed to its tagged OK), half receiving an untagged EXISTS that
//!       the backend at BACKEND is told to push (timed from the backend's CLOCK_MONOTONIC
//!       stamp in the line to its arrival); print "window-end", then the latencies; hold
//!       the sessions until stdin closes.

use std::io::{BufRead as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

#[path = "common/stamp.rs"]
mod stamp;
use stamp::{stamp_us, STAMP_WRAP_US};

type Error = Box<dyn std::error::Error + Send + Sync>;
const CHUNK: usize = 256 * 1024;

fn connector(ca: &str) -> Result<TlsConnector, Error> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

async fn connect(addr: &str, tls: &TlsConnector) -> Result<BufReader<TlsStream<TcpStream>>, Error> {
    connect_buffered(addr, tls, 8192).await
}

/// `connect` with a read buffer of `capacity` bytes: thousands of mail sessions need little.
async fn connect_buffered(
    addr: &str,
    tls: &TlsConnector,
    capacity: usize,
) -> Result<BufReader<TlsStream<TcpStream>>, Error> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tls.connect(ServerName::try_from("localhost")?, tcp).await?;
    let mut stream = BufReader::with_capacity(capacity, stream);
    let mut greeting = String::new();
    stream.read_line(&mut greeting).await?;
    if !greeting.starts_with("* OK") {
        return Err(format!("unexpected greeting {greeting:?}").into());
    }
    Ok(stream)
}

async fn login(stream: &mut BufReader<TlsStream<TcpStream>>, user: &str) -> Result<(), Error> {
    stream.get_mut().write_all(format!("a LOGIN {user} x\r\n").as_bytes()).await?;
    stream.get_mut().flush().await?;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Err("closed during login".into());
        }
        if line.starts_with("a OK") {
            return Ok(());
        }
        if line.starts_with("a ") {
            return Err(format!("login refused: {line:?}").into());
        }
    }
}

async fn bulk_stream(addr: String, tls: TlsConnector, up: bool, bytes: usize) -> Result<usize, Error> {
    let mut s = connect(&addr, &tls).await?;
    let user = if up { "sink".to_owned() } else { format!("source-{bytes}") };
    login(&mut s, &user).await?;
    let mut buf = vec![0u8; CHUNK];
    if up {
        let data = vec![0x5au8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let k = left.min(CHUNK);
            s.get_mut().write_all(&data[..k]).await?;
            left -= k;
        }
        s.get_mut().shutdown().await?;
        loop {
            match s.read(&mut buf).await {
                Ok(0) => break,
                Ok(_) => {}
                // nginx closes without close_notify; the bytes were all sent by then.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(bytes)
    } else {
        s.get_mut().write_all(b"go\r\n").await?;
        s.get_mut().flush().await?;
        let mut got = 0;
        loop {
            match s.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => got += n,
                // A proxy that closes without close_notify still delivered every byte.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
        }
        if got != bytes {
            return Err(format!("received {got} of {bytes} bytes").into());
        }
        Ok(got)
    }
}

/// What the mail sessions saw during the window, in microseconds.
#[derive(Default)]
struct Replies {
    noop: Vec<u64>,
    push: Vec<u64>,
    /// When each reply slower than [`SLOW_US`] arrived: slow replies that all arrive within
    /// a moment are one stall of some process, not a slow proxy.
    slow: Vec<Instant>,
    closed: usize,
}

/// A reply this slow (100 times a typical one here) is noted with its arrival time.
const SLOW_US: u64 = 50_000;

impl Replies {
    fn note(&mut self, noop: bool, us: u64) {
        if us >= SLOW_US {
            self.slow.push(Instant::now());
        }
        if noop {
            self.noop.push(us);
        } else {
            self.push.push(us);
        }
    }
}

fn replies(stats: &Mutex<Replies>) -> std::sync::MutexGuard<'_, Replies> {
    stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One logged-in mail session: a NOOP when woken, timed to its tagged OK; every pushed
/// `* T EXISTS` timed from the backend's stamp T. Ends when the proxy closes it.
async fn mail_session(mut s: BufReader<TlsStream<TcpStream>>, wake: Arc<Notify>, stats: Arc<Mutex<Replies>>) {
    let mut line = Vec::with_capacity(64);
    let mut sent: Option<Instant> = None;
    let mut seq = 0u32;
    loop {
        tokio::select! {
            () = wake.notified(), if sent.is_none() => {
                seq += 1;
                let t0 = Instant::now();
                let w = s.get_mut();
                if w.write_all(format!("n{seq} NOOP\r\n").as_bytes()).await.is_err() || w.flush().await.is_err() {
                    break;
                }
                sent = Some(t0);
            }
            // read_until keeps a partial line in `line` if the other branch wins.
            r = s.read_until(b'\n', &mut line) => {
                if !matches!(r, Ok(n) if n > 0) {
                    break;
                }
                if !line.ends_with(b"\n") {
                    continue;
                }
                let text = String::from_utf8_lossy(&line);
                if let Some(stamp) = text.strip_prefix("* ").and_then(|t| t.strip_suffix(" EXISTS\r\n")) {
                    if let Ok(stamp) = stamp.parse::<u64>() {
                        let us = (stamp_us() + STAMP_WRAP_US - stamp) % STAMP_WRAP_US;
                        replies(&stats).note(false, us);
                    }
                } else if text.starts_with(&format!("n{seq} ")) {
                    if let Some(t0) = sent.take() {
                        replies(&stats).note(true, t0.elapsed().as_micros() as u64);
                    }
                }
                line.clear();
            }
        }
    }
    replies(&stats).closed += 1;
}

/// The q-quantile of sorted microseconds, in milliseconds (0 when there are none).
fn quantile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// `loadgen mail`: see the module comment.
async fn mail(addr: String, tls: TlsConnector, args: &[String]) -> Result<(), Error> {
    let backend: String = arg(args, 4, "backend address")?;
    let count: usize = arg(args, 5, "count")?;
    let setup = Duration::from_secs_f64(arg(args, 6, "setup seconds")?);
    let window = Duration::from_secs_f64(arg(args, 7, "window seconds")?);

    // The control session goes straight to the backend, never through the proxy.
    let mut control = BufReader::new(TcpStream::connect(&backend).await?);
    let mut reply = String::new();
    control.read_line(&mut reply).await?;
    control.get_mut().write_all(b"c LOGIN control x\r\n").await?;
    reply.clear();
    control.read_line(&mut reply).await?;
    if !reply.starts_with("c OK") {
        return Err(format!("backend control login: {reply:?}").into());
    }

    // Stdin: "go" starts the window; its end releases the sessions.
    let (stdin_tx, mut stdin_rx) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if stdin_tx.send(line).is_err() {
                break;
            }
        }
    });

    let stats = Arc::new(Mutex::new(Replies::default()));
    // At most 64 handshakes in flight: a slow proxy slows the setup instead of piling up.
    let gate = Arc::new(Semaphore::new(64));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<Arc<Notify>, String>>();
    let start = Instant::now();
    for i in 0..count {
        tokio::time::sleep_until((start + setup.mul_f64(i as f64 / count as f64)).into()).await;
        let permit = gate.clone().acquire_owned().await?;
        let (addr, tls, stats, ready_tx) = (addr.clone(), tls.clone(), stats.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let session = async {
                let mut s = connect_buffered(&addr, &tls, 1024).await?;
                login(&mut s, "mail").await?;
                Ok::<_, Error>(s)
            }
            .await;
            drop(permit);
            match session {
                Ok(s) => {
                    let wake = Arc::new(Notify::new());
                    let _ = ready_tx.send(Ok(wake.clone()));
                    mail_session(s, wake, stats).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            }
        });
    }
    drop(ready_tx);
    // One message per session, counted: a logged-in session's task keeps its sender for
    // as long as it runs, so the channel never closes while they are held.
    let (mut wakes, mut failed, mut first_error) = (Vec::with_capacity(count), 0, String::new());
    for _ in 0..count {
        let Some(r) = ready_rx.recv().await else { break };
        match r {
            Ok(w) => wakes.push(w),
            Err(e) => {
                failed += 1;
                if first_error.is_empty() {
                    first_error = e;
                }
            }
        }
    }
    if wakes.is_empty() {
        return Err(format!("no session logged in: {first_error}").into());
    }
    println!(
        "ready sessions={} failed={failed} setup_s={:.1} first_error={first_error:?}",
        wakes.len(),
        start.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
    while stdin_rx.recv().await.as_deref().is_some_and(|l| l.trim() != "go") {}

    // 1% of the sessions each second, evenly spaced, NOOPs and pushes taking turns.
    let rate = (wakes.len() as f64 / 100.0).max(1.0);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let (mut noops, mut pushes) = (0usize, 0usize);
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let t0 = Instant::now();
    // How late the ticks came: this process's own stalls (its core busy with others).
    let mut late_max = Duration::ZERO;
    while t0.elapsed() < window {
        let due = tick.tick().await;
        late_max = late_max.max(due.elapsed());
        if noops <= pushes {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            wakes[(rng % wakes.len() as u64) as usize].notify_one();
            noops += 1;
        } else {
            control.get_mut().write_all(b"push 1\r\n").await?;
            pushes += 1;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    println!("window-end seconds={seconds:.3}");
    let _ = std::io::stdout().flush();
    let mut pushed = 0;
    for _ in 0..pushes {
        reply.clear();
        control.read_line(&mut reply).await?;
        pushed += reply.trim().strip_prefix("pushed ").and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
    }
    // The last replies: until every one is in, at most five seconds.
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(5) {
        let all_in = {
            let r = replies(&stats);
            r.noop.len() >= noops && r.push.len() >= pushed
        };
        if all_in {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut noop, mut push, closed, slow) = {
        let r = replies(&stats);
        let since = |t: &Instant| t.saturating_duration_since(t0).as_secs_f64();
        let slow = (
            r.slow.len(),
            r.slow.iter().map(since).fold(f64::INFINITY, f64::min),
            r.slow.iter().map(since).fold(0.0, f64::max),
        );
        (r.noop.clone(), r.push.clone(), r.closed, slow)
    };
    let (slow_n, slow_first, slow_last) = if slow.0 == 0 { (0, 0.0, 0.0) } else { slow };
    noop.sort_unstable();
    push.sort_unstable();
    let mut all = [noop.as_slice(), push.as_slice()].concat();
    all.sort_unstable();
    println!(
        "sessions={} noops={noops} noop_replies={} pushes={pushed} push_replies={} \
         noop_p50_ms={:.3} noop_p99_ms={:.3} push_p50_ms={:.3} push_p99_ms={:.3} \
         p50_ms={:.3} p99_ms={:.3} max_ms={:.3} closed={closed} slow_replies={slow_n} \
         slow_first_s={slow_first:.3} slow_last_s={slow_last:.3} tick_late_max_ms={:.3}",
        wakes.len(),
        noop.len(),
        push.len(),
        quantile_ms(&noop, 0.5),
        quantile_ms(&noop, 0.99),
        quantile_ms(&push, 0.5),
        quantile_ms(&push, 0.99),
        quantile_ms(&all, 0.5),
        quantile_ms(&all, 0.99),
        quantile_ms(&all, 1.0),
        late_max.as_secs_f64() * 1000.0,
    );
    let _ = std::io::stdout().flush();
    // Hold until stdin closes, at most ten minutes.
    let _ =
        tokio::time::timeout(Duration::from_secs(600), async { while stdin_rx.recv().await.is_some() {} })
            .await;
    Ok(())
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, Error> {
    args.get(i).and_then(|a| a.parse().ok()).ok_or_else(|| format!("argument {i}: {what}").into())
}

async fn run(args: Vec<String>) -> Result<(), Error> {
    let mode: String = arg(&args, 1, "mode")?;
    let addr: String = arg(&args, 2, "address")?;
    let ca: String = arg(&args, 3, "CA file")?;
    let tls = connector(&ca)?;
    match mode.as_str() {
        "bulk" => {
            let up = arg::<String>(&args, 4, "up|down")? == "up";
            let streams: usize = arg(&args, 5, "streams")?;
            let bytes: usize = arg(&args, 6, "bytes")?;
            let start = Instant::now();
            let tasks: Vec<_> = (0..streams)
                .map(|_| tokio::spawn(bulk_stream(addr.clone(), tls.clone(), up, bytes / streams)))
                .collect();
            let mut total = 0;
            for t in tasks {
                total += t.await??;
            }
            let secs = start.elapsed().as_secs_f64();
            println!("bytes={total} seconds={secs:.3} mib_per_s={:.0}", total as f64 / secs / 1048576.0);
        }
        "handshakes" => {
            let count: usize = arg(&args, 4, "count")?;
            let concurrency: usize = arg(&args, 5, "concurrency")?;
            let per = count.div_ceil(concurrency);
            let start = Instant::now();
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (addr, tls) = (addr.clone(), tls.clone());
                    tokio::spawn(async move {
                        let mut latencies = Vec::with_capacity(per);
                        for _ in 0..per {
                            let t0 = Instant::now();
                            let s = connect(&addr, &tls).await?;
                            latencies.push(t0.elapsed());
                            drop(s);
                        }
                        Ok::<_, Error>(latencies)
                    })
                })
                .collect();
            let mut all: Vec<Duration> = Vec::new();
            for t in tasks {
                all.extend(t.await??);
            }
            all.sort();
            let p50 = all.get(all.len() / 2).copied().unwrap_or_default();
            println!(
                "handshakes={} seconds={:.3} greeting_p50_ms={:.3}",
                all.len(),
                start.elapsed().as_secs_f64(),
                p50.as_secs_f64() * 1000.0
            );
        }
        "idle" => {
            let count: usize = arg(&args, 4, "count")?;
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                let mut s = connect(&addr, &tls).await?;
                login(&mut s, "idle").await?;
                held.push(s);
            }
            println!("ready sessions={}", held.len());
            let _ = std::io::stdout().flush();
            // Hold until told to stop (stdin closes), at most ten minutes.
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                let _ = tx.send(());
            });
            let _ = tokio::time::timeout(Duration::from_secs(600), rx).await;
        }
        "mail" => mail(addr, tls, &args).await?,
        other => return Err(format!("unknown mode {other:?}").into()),
    }
    Ok(())
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(std::env::args().collect())) {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}
