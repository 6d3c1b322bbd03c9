//! Load generator for benches/compare.sh: TLS 1.3 clients (AES-128-GCM, X25519, no
//! resumption, so every handshake is full) speaking just enough IMAP to log in.
//!
//! Modes (one line of results on stdout):
//!   loadgen bulk ADDR CA up|down STREAMS BYTES   BYTES in total, split over STREAMS
//!   loadgen handshakes ADDR CA COUNT CONCURRENCY  handshake + greeting, then close
//!   loadgen idle ADDR CA COUNT                    log COUNT sessions in, print "ready",
//!                                                 hold them until stdin closes

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

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
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tls.connect(ServerName::try_from("localhost")?, tcp).await?;
    let mut stream = BufReader::new(stream);
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
