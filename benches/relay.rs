//! Relay engine benchmark: each engine between real loopback TCP sockets, measured by
//! criterion as bytes per second, then as CPU seconds per GiB relayed.
//!
//! The CPU figure is the process's utime + stime (from /proc/self/stat) while one stream
//! of N MiB crosses the relay, minus the same stream sent straight from socket to socket
//! without a relay: what remains is the relay's own cost. One thread runs everything, so
//! nothing is hidden on another core.
//!
//! The `+guard` paths carry SMTP message data (64-octet CRLF lines after a DATA line)
//! through the SMTP smuggling guard, as every SMTP session after negotiation does: copy,
//! and splice with its client-to-backend direction read, scanned and written in user space.
//!
//! Run: [RELAY_BENCH_MIB=N] cargo bench --bench relay   (N MiB for the CPU figure, default 1024)

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{Criterion, Throughput};
use mailtls::config::RelayMode;
use mailtls::metrics::Metrics;
use mailtls::protocol::smtp_guard::SmtpGuard;
use mailtls::protocol::BareNewline;
use mailtls::relay::{self, ClientFilter, ClientLeg, Engine, Engines, KtlsSupport, Pending};
use mailtls::tls::secrets;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const CHUNK: usize = 256 * 1024;
const IDLE: Duration = Duration::from_secs(60);
/// Bytes per criterion iteration.
const PER_ITER: usize = 16 << 20;

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

/// What sits between the load generator and the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// No relay: the baseline that is subtracted.
    Direct,
    PlainCopy,
    PlainSplice,
    /// A TLS client leg (TLS 1.3, AES-128-GCM) through the engine `auto` picks here.
    Tls,
    /// The same three with SMTP message data through the smuggling guard.
    PlainCopyGuarded,
    PlainSpliceGuarded,
    TlsGuarded,
}

impl Path {
    fn guarded(self) -> bool {
        matches!(self, Path::PlainCopyGuarded | Path::PlainSpliceGuarded | Path::TlsGuarded)
    }
}

/// What the load generator sends, CHUNK octets repeated: opaque bytes, or for the guarded
/// paths SMTP message data: a DATA line, then 64-octet CRLF lines (every chunk starts with
/// the DATA line again, which inside a body is just text).
fn payload(path: Path) -> Vec<u8> {
    if !path.guarded() {
        return vec![0x5au8; CHUNK];
    }
    let mut data = Vec::with_capacity(CHUNK);
    data.extend_from_slice(b"DATA");
    data.resize(62, b' ');
    data.extend_from_slice(b"\r\n");
    while data.len() < CHUNK {
        data.extend_from_slice(&[b'x'; 62]);
        data.extend_from_slice(b"\r\n");
    }
    data
}

struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

fn tls() -> Tls {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
    let provider = Arc::new(provider);
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .unwrap();
    server.enable_secret_extraction = true;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
    }
}

async fn pump<W: AsyncWrite + Unpin, R: AsyncRead + Unpin>(
    mut from: W,
    mut to: R,
    total: usize,
    buf: Vec<u8>,
) {
    let writer = async move {
        let mut sent = 0;
        while sent < total {
            from.write_all(&buf).await.unwrap();
            sent += CHUNK;
        }
        from.shutdown().await.unwrap();
        from
    };
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        loop {
            let n = to.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        assert_eq!(got, total);
        to
    };
    let (_from, _to) = tokio::join!(writer, reader);
}

/// One relay, through the SMTP guard when `guarded`.
async fn relayed<C: ClientLeg>(
    client: C,
    backend: TcpStream,
    engines: Engines,
    guarded: bool,
) -> relay::Report {
    let mut engine = None;
    let mut guard = SmtpGuard::new(BareNewline::Normalize, false);
    let filter = guarded.then_some(&mut guard as &mut dyn ClientFilter);
    relay::run_filtered(client, backend, Pending::default(), &engines, "bench", &mut engine, filter).await
}

/// Sends `total` bytes client -> backend through `path`; returns the engine used.
async fn transfer(path: Path, total: usize, tls: &Tls) -> Option<Engine> {
    let (client, client_side) = pair().await;
    let data = payload(path);
    if path == Path::Direct {
        pump(client, client_side, total, data).await;
        return None;
    }
    let (backend_side, backend) = pair().await;
    let copy = matches!(path, Path::PlainCopy | Path::PlainCopyGuarded);
    let mode = if copy { RelayMode::Copy } else { RelayMode::Auto };
    let engines = Engines::detect(mode, IDLE, Arc::new(Metrics::default()));
    let guarded = path.guarded();
    if matches!(path, Path::Tls | Path::TlsGuarded) {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(
            tls.connector.connect(name, client),
            // As a session accepts: with the connection's own key log, so the copy engine's
            // record layer takes the keys over exactly as in the product.
            secrets::accept(&tls.acceptor, client_side, BytesMut::new())
        );
        let server = server.unwrap();
        let relay = tokio::spawn(relayed(server, backend_side, engines, guarded));
        let mut client = client.unwrap();
        pump(&mut client, backend, total, data).await;
        drop(client);
        return relay.await.ok().map(|r| r.engine);
    }
    let relay = tokio::spawn(relayed(client_side, backend_side, engines, guarded));
    pump(client, backend, total, data).await;
    relay.await.ok().map(|r| r.engine)
}

fn runtime() -> Runtime {
    // One thread: the figure is the relay's cost, comparable with one-worker peers.
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn throughput(c: &mut Criterion, rt: &Runtime, tls: &Tls) {
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Bytes(PER_ITER as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    for (name, path) in [
        ("direct (no relay)", Path::Direct),
        ("plain/copy", Path::PlainCopy),
        ("plain/splice", Path::PlainSplice),
        ("tls/auto", Path::Tls),
        ("plain/splice+guard", Path::PlainSpliceGuarded),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                rt.block_on(transfer(path, PER_ITER * iters as usize, tls));
                start.elapsed()
            })
        });
    }
    group.finish();
}

fn cpu_per_gib(rt: &Runtime, tls: &Tls, mib: usize) {
    let total = mib << 20;
    let gib = mib as f64 / 1024.0;
    let measure = |path| {
        let cpu0 = cpu_seconds();
        let start = Instant::now();
        let engine = rt.block_on(transfer(path, total, tls));
        (cpu_seconds() - cpu0, start.elapsed(), engine)
    };
    let (base, base_time, _) = measure(Path::Direct);
    println!("\nCPU per GiB, one stream of {mib} MiB client -> backend, one thread");
    println!(
        "  direct socket->socket (baseline, subtracted below): {:.3} CPU s/GiB, {:.0} MiB/s",
        base / gib,
        mib as f64 / base_time.as_secs_f64()
    );
    let mut figures = Vec::new();
    for (name, path) in [
        ("plain/copy", Path::PlainCopy),
        ("plain/splice", Path::PlainSplice),
        ("tls", Path::Tls),
        ("plain/copy+guard", Path::PlainCopyGuarded),
        ("plain/splice+guard", Path::PlainSpliceGuarded),
        ("tls+guard", Path::TlsGuarded),
    ] {
        let (cpu, time, engine) = measure(path);
        let own = (cpu - base).max(0.0) / gib;
        figures.push((name, own));
        println!(
            "  {name:<18} engine {:<6} {:.3} CPU s/GiB relay's own ({:.3} total), {:.0} MiB/s",
            engine.map_or("-".to_owned(), |e| e.to_string()),
            own,
            cpu / gib,
            mib as f64 / time.as_secs_f64()
        );
    }
    if let (Some(copy), Some(splice)) = (figures.first(), figures.get(1)) {
        if splice.1 > 0.0 {
            println!("  splice is {:.2}x cheaper in CPU than copy for cleartext legs", copy.1 / splice.1);
        }
    }
    guard_alone(mib);
    let probe = Engines::detect(RelayMode::Auto, IDLE, Arc::new(Metrics::default()));
    if let KtlsSupport::Unavailable(why) = probe.ktls() {
        println!("  ktls: NOT MEASURED, the engine could not run on this machine: {why}");
    }
}

/// The guard's own cost, without sockets: `mib` MiB of the guarded paths' message data fed
/// to it in 64 KiB reads (the copy engine's), as CPU seconds per GiB. Less disturbed by a
/// busy machine than the socket figures, and what the `+guard` paths add.
fn guard_alone(mib: usize) {
    let data = payload(Path::PlainCopyGuarded);
    let mut guard = SmtpGuard::new(BareNewline::Normalize, false);
    let mut out = Vec::new();
    let rounds = (mib << 20) / data.len();
    let cpu0 = cpu_seconds();
    let mut changed = 0usize;
    for _ in 0..rounds {
        for read in data.chunks(64 * 1024) {
            out.clear();
            if guard.filter(std::hint::black_box(read), &mut out) != relay::Verdict::Clean {
                changed += 1;
            }
        }
    }
    let gib = (rounds * data.len()) as f64 / (1u64 << 30) as f64;
    println!(
        "  guard alone (no sockets, 64 KiB reads): {:.3} CPU s/GiB, {changed} reads changed",
        (cpu_seconds() - cpu0) / gib
    );
}

fn main() {
    let mib = std::env::var("RELAY_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = runtime();
    let tls = tls();
    let mut c = Criterion::default().configure_from_args();
    throughput(&mut c, &rt, &tls);
    c.final_summary();
    // `cargo test --all-targets` runs this binary without `--bench` (criterion's test mode,
    // every benchmark once): the GiB-sized CPU measurement is for `cargo bench` only.
    if std::env::args().any(|a| a == "--bench") {
        cpu_per_gib(&rt, &tls, mib);
    }
}
