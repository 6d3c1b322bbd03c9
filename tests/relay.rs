//! The relay engines over real loopback sockets: 64 MiB each way, checked byte for byte,
//! with half-close in both orders; the fallbacks to copy under forced failures; and the
//! engine of each session visible in the log line and the counters, end to end.

mod common;

use common::*;

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use mailtls::config::RelayMode;
use mailtls::metrics::Metrics;
use mailtls::protocol::smtp_guard::SmtpGuard;
use mailtls::protocol::BareNewline;
use mailtls::relay::{self, Cipher, Ending, Engine, Engines, Faults, KtlsSupport, Pending, Report, Suite};
use mailtls::tls::prefixed::Prefixed;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1 << 20;
const BULK: usize = 64 * MIB;
const IDLE: Duration = Duration::from_secs(60);
/// However slow the build, a bulk exchange must end within this.
const BULK_PATIENCE: Duration = Duration::from_secs(120);

/// Length of the pattern's period: prime, so no read or write size lines up with it and
/// a dropped, repeated or reordered chunk shows up as a mismatch.
const PERIOD: usize = 1_048_573;

/// Pseudo-random bytes (xorshift64*), computed once; the stream with seed `s` is this
/// block repeated, starting at offset `s * 7919`.
fn block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut out = Vec::with_capacity(PERIOD + 8);
        while out.len() < PERIOD {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(PERIOD);
        out
    })
}

/// The `len` bytes of stream `seed` starting at `offset`, in at most two slices.
fn expected(seed: u64, offset: usize, len: usize) -> (&'static [u8], &'static [u8]) {
    let b = block();
    let start = (offset + seed as usize * 7919) % PERIOD;
    let first = len.min(PERIOD - start);
    (&b[start..start + first], &b[..len - first])
}

async fn send_and_close<S: AsyncWrite + Unpin>(s: &mut S, seed: u64, len: usize) {
    let mut sent = 0;
    while sent < len {
        let (a, _) = expected(seed, sent, (len - sent).min(256 * 1024));
        s.write_all(a).await.expect("send");
        sent += a.len();
    }
    s.flush().await.expect("flush");
    s.shutdown().await.expect("half-close");
}

/// Reads to end of stream and checks it is exactly `len` bytes of stream `seed`.
async fn receive_and_check<S: AsyncRead + Unpin>(s: &mut S, seed: u64, len: usize) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let n = s.read(&mut buf).await.expect("receive");
        if n == 0 {
            break;
        }
        assert!(got + n <= len, "more bytes than were sent");
        let (a, b) = expected(seed, got, n);
        assert!(buf[..a.len()] == *a && buf[a.len()..n] == *b, "corrupted bytes near offset {got}");
        got += n;
    }
    assert_eq!(got, len, "stream ended early");
}

/// Which side half-closes first.
#[derive(Clone, Copy, Debug)]
enum First {
    Client,
    Backend,
}

/// Sends `BULK` bytes from the first side and closes its write side; the other side reads
/// all of it and sees end of stream while its own write side is still open, then sends
/// `BULK` bytes back and closes. Both directions are checked byte for byte.
async fn exchange<C, B>(client: &mut C, backend: &mut B, first: First)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let run = async {
        match first {
            First::Client => {
                tokio::join!(send_and_close(client, 1, BULK), receive_and_check(backend, 1, BULK));
                tokio::join!(send_and_close(backend, 2, BULK), receive_and_check(client, 2, BULK));
            }
            First::Backend => {
                tokio::join!(send_and_close(backend, 3, BULK), receive_and_check(client, 3, BULK));
                tokio::join!(send_and_close(client, 4, BULK), receive_and_check(backend, 4, BULK));
            }
        }
    };
    tokio::time::timeout(BULK_PATIENCE, run).await.expect("bulk exchange finished in time");
}

fn engines(mode: RelayMode, faults: Faults) -> Engines {
    Engines::detect(mode, IDLE, Arc::new(Metrics::default())).with_faults(faults)
}

/// Relays a cleartext client leg with `engines` and checks both directions both ways round.
async fn plain_session(engines: &Engines, first: First) -> Report {
    let (mut client_app, client_side) = tcp_pair().await;
    let (backend_side, mut backend_app) = tcp_pair().await;
    let engines = engines.clone();
    let relay = tokio::spawn(async move {
        let mut engine = None;
        relay::run(client_side, backend_side, Pending::default(), &engines, "test", &mut engine).await
    });
    exchange(&mut client_app, &mut backend_app, first).await;
    relay.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_relays_64_mib_each_way_with_half_close_both_orders() {
    let copy = engines(RelayMode::Copy, Faults::default());
    for first in [First::Client, First::Backend] {
        let report = plain_session(&copy, first).await;
        assert_eq!(report.engine, Engine::Copy);
        assert_eq!(report.ending, Ending::Closed, "{first:?}");
        assert_eq!(report.totals.client_to_backend, BULK as u64);
        assert_eq!(report.totals.backend_to_client, BULK as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_relays_64_mib_each_way_with_half_close_both_orders() {
    let auto = engines(RelayMode::Auto, Faults::default());
    for first in [First::Client, First::Backend] {
        let report = plain_session(&auto, first).await;
        assert_eq!(report.engine, Engine::Splice, "two cleartext TCP legs take splice");
        assert_eq!(report.ending, Ending::Closed, "{first:?}");
        assert_eq!(report.totals.client_to_backend, BULK as u64);
        assert_eq!(report.totals.backend_to_client, BULK as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_falls_back_to_copy_when_pipes_cannot_be_had() {
    let no_pipes = engines(RelayMode::Auto, Faults { no_pipes: true, ..Faults::default() });
    let report = plain_session(&no_pipes, First::Client).await;
    assert_eq!(report.engine, Engine::Copy);
    assert_eq!(report.ending, Ending::Closed);
    assert_eq!(report.totals.client_to_backend, BULK as u64);
}

// ---- TLS client legs -----------------------------------------------------------------

struct TlsPeers {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

/// The suites the kernel's TLS ULP can take, as rustls names them (ECDSA certificate, so
/// the TLS 1.2 ones are ECDHE-ECDSA), with the kernel's view of each.
fn kernel_suites() -> Vec<(rustls::SupportedCipherSuite, Suite)> {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let suite = |tls13, cipher| Suite { tls13, cipher };
    vec![
        (cs::TLS13_AES_128_GCM_SHA256, suite(true, Cipher::Aes128Gcm)),
        (cs::TLS13_AES_256_GCM_SHA384, suite(true, Cipher::Aes256Gcm)),
        (cs::TLS13_CHACHA20_POLY1305_SHA256, suite(true, Cipher::Chacha20Poly1305)),
        (cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, suite(false, Cipher::Aes128Gcm)),
        (cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, suite(false, Cipher::Aes256Gcm)),
        (cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, suite(false, Cipher::Chacha20Poly1305)),
    ]
}

/// A server and a client that can only agree on `suite` (the default: TLS 1.3 with
/// AES-128-GCM, what most mail clients negotiate).
fn tls_peers() -> TlsPeers {
    tls_peers_with(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256)
}

fn tls_peers_with(suite: rustls::SupportedCipherSuite) -> TlsPeers {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![suite];
    let provider = Arc::new(provider);
    let version = if suite.version().version == rustls::ProtocolVersion::TLSv1_3 {
        &rustls::version::TLS13
    } else {
        &rustls::version::TLS12
    };
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .unwrap();
    // As mailtls's own config does: the ktls engine and the copy engine's record layer need
    // the keys, and the record layer the TLS 1.3 traffic secrets for KeyUpdates (from a key
    // log per connection: secrets::accept).
    server.enable_secret_extraction = true;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsPeers {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
    }
}

/// A handshaken TLS pair: the client application's end, and the proxy's end exactly as a
/// session holds it (rustls over `Prefixed<TcpStream>`).
async fn tls_pair(
    peers: &TlsPeers,
) -> (tokio_rustls::client::TlsStream<TcpStream>, tokio_rustls::server::TlsStream<Prefixed<TcpStream>>) {
    let (client_tcp, server_tcp) = tcp_pair().await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let (client, server) = tokio::join!(
        peers.connector.connect(name, client_tcp),
        mailtls::tls::secrets::accept(&peers.acceptor, server_tcp, BytesMut::new())
    );
    (client.unwrap(), server.unwrap())
}

/// What a TLS session through the relay reports, and the upper-layer protocol its client
/// socket carried at the end ("tls" when the kernel did the TLS, "" otherwise).
struct TlsRun {
    report: Report,
    ulp: String,
}

/// A TLS session through `relay::run`; `early` is sent by the client and left inside
/// rustls (decrypted, unread) before the relay starts, as a pipelining client would.
async fn tls_session(engines: &Engines, first: First, early: &[u8]) -> TlsRun {
    tls_session_with(engines, &tls_peers(), first, early).await
}

async fn tls_session_with(engines: &Engines, peers: &TlsPeers, first: First, early: &[u8]) -> TlsRun {
    let (mut client_app, mut running, watch) = started_tls_session(engines, peers, early).await;
    exchange(&mut client_app, &mut running.backend_app, first).await;
    let report = running.relay.await.unwrap();
    TlsRun { report, ulp: relay::socket_ulp(watch.as_fd()).unwrap() }
}

/// A relay under way: the backend application's end and the relay task.
struct Running {
    backend_app: TcpStream,
    relay: tokio::task::JoinHandle<Report>,
}

/// Handshakes, leaves `early` inside rustls, starts `relay::run` and waits until the early
/// bytes reached the backend: by then the engine is chosen and, for ktls, the keys are in
/// the kernel. Also returns a duplicate of the proxy's client socket, so its ULP can be
/// read after the relay has let go of it.
async fn started_tls_session(
    engines: &Engines,
    peers: &TlsPeers,
    early: &[u8],
) -> (tokio_rustls::client::TlsStream<TcpStream>, Running, OwnedFd) {
    let (mut client_app, mut proxy_side) = tls_pair(peers).await;
    let (backend_side, mut backend_app) = tcp_pair().await;
    let watch = proxy_side.get_ref().0.get_ref().as_fd().try_clone_to_owned().unwrap();
    if !early.is_empty() {
        client_app.write_all(early).await.unwrap();
        client_app.flush().await.unwrap();
        // Read one byte, as the negotiation phase would read up to a line end: the rest
        // of the record stays decrypted inside rustls and must still reach the backend.
        let mut one = [0u8; 1];
        proxy_side.read_exact(&mut one).await.unwrap();
        assert_eq!(one[0], early[0]);
    }
    let engines = engines.clone();
    let relay = tokio::spawn(async move {
        let mut engine = None;
        relay::run(proxy_side, backend_side, Pending::default(), &engines, "test", &mut engine).await
    });
    if early.len() > 1 {
        let mut got = vec![0u8; early.len() - 1];
        backend_app.read_exact(&mut got).await.unwrap();
        assert_eq!(got, &early[1..], "bytes rustls had already decrypted were forwarded first");
    }
    (client_app, Running { backend_app, relay }, watch)
}

/// Says plainly that the kernel-TLS path could not run. Written to the process's stderr
/// directly: libtest hides `eprintln!` of passing tests, and this must show in CI output.
fn say_skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: the ktls engine could not run on this machine: {why}");
}

fn ktls_available(engines: &Engines) -> Option<&str> {
    match engines.ktls() {
        KtlsSupport::Available(_) => None,
        KtlsSupport::Unavailable(why) => Some(why),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_leg_relays_64_mib_each_way_with_copy_engine() {
    let copy = engines(RelayMode::Copy, Faults::default());
    for first in [First::Client, First::Backend] {
        let run = tls_session(&copy, first, b"").await;
        assert_eq!(run.report.engine, Engine::Copy);
        assert_eq!(run.report.ending, Ending::Closed, "{first:?}");
        assert_eq!(run.report.totals.client_to_backend, BULK as u64);
        assert_eq!(run.report.totals.backend_to_client, BULK as u64);
        assert_eq!(run.ulp, "", "copy leaves the TLS to rustls");
    }
}

/// The copy engine's fallback, records left to rustls (the keys could not leave it): the
/// same 64 MiB each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_leg_relays_64_mib_each_way_with_records_left_to_rustls() {
    let copy = engines(RelayMode::Copy, Faults { rustls_records: true, ..Faults::default() });
    for first in [First::Client, First::Backend] {
        let run = tls_session(&copy, first, b"a1 NOOP\r\n").await;
        assert_eq!(run.report.engine, Engine::Copy);
        assert_eq!(run.report.ending, Ending::Closed, "{first:?}");
        assert_eq!(run.report.totals.client_to_backend, (BULK + 8) as u64);
        assert_eq!(run.report.totals.backend_to_client, BULK as u64);
    }
}

/// Every suite mailtls negotiates (TLS 1.3 and 1.2; AES-128-GCM, AES-256-GCM,
/// ChaCha20-Poly1305) through the copy engine's own record layer: 64 MiB each way, with
/// bytes rustls had already decrypted forwarded first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_relays_every_suite_with_its_own_record_layer() {
    let copy = engines(RelayMode::Copy, Faults::default());
    for (suite, _) in kernel_suites() {
        let what = format!("{:?}", suite.suite());
        eprintln!("suite {what}");
        let run = tls_session_with(&copy, &tls_peers_with(suite), First::Backend, b"a1 NOOP\r\n").await;
        assert_eq!(run.report.engine, Engine::Copy, "{what}");
        assert_eq!(run.report.ending, Ending::Closed, "{what}");
        assert_eq!(run.report.totals.client_to_backend, (BULK + 8) as u64, "{what}");
        assert_eq!(run.report.totals.backend_to_client, BULK as u64, "{what}");
    }
}

/// A TLS 1.3 client's KeyUpdate (rustls's asks for the server's too) during the relay, for
/// each TLS 1.3 suite (SHA-256 and SHA-384 key schedules): followed both ways, with the
/// records sealed and opened by the relay itself and with them left to rustls alike, then
/// 64 MiB each way under the new keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_follows_client_key_updates_both_ways() {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let suites =
        [cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_CHACHA20_POLY1305_SHA256];
    for (suite, rustls_records) in suites.into_iter().flat_map(|s| [(s, false), (s, true)]) {
        eprintln!("suite {:?}, rustls_records={rustls_records}", suite.suite());
        let copy = engines(RelayMode::Copy, Faults { rustls_records, ..Faults::default() });
        let (mut client_app, mut running, _watch) =
            started_tls_session(&copy, &tls_peers_with(suite), b"a1 NOOP\r\n").await;
        for round in 0..3 {
            client_app.get_mut().1.refresh_traffic_keys().unwrap();
            let line = format!("a{round} after a key update\r\n");
            client_app.write_all(line.as_bytes()).await.unwrap();
            client_app.flush().await.unwrap();
            let mut got = vec![0u8; line.len()];
            running.backend_app.read_exact(&mut got).await.unwrap();
            assert_eq!(got, line.as_bytes(), "rustls_records={rustls_records}");
            let reply = format!("a{round} OK under the new keys\r\n");
            running.backend_app.write_all(reply.as_bytes()).await.unwrap();
            let mut got = vec![0u8; reply.len()];
            let read = tokio::time::timeout(BULK_PATIENCE, client_app.read_exact(&mut got)).await;
            read.expect("reply in time").expect("reply readable under the server's new key");
            assert_eq!(got, reply.as_bytes(), "rustls_records={rustls_records}");
        }
        exchange(&mut client_app, &mut running.backend_app, First::Client).await;
        let report = running.relay.await.unwrap();
        assert_eq!(report.ending, Ending::Closed, "rustls_records={rustls_records}");
    }
}

/// A forged record (valid framing, wrong tag) on the copy engine's own record layer: the
/// session ends as failed, nothing of it reaches the backend, and the client is told with
/// a bad_record_mac alert, as rustls would tell it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_record_ends_the_session_with_bad_record_mac() {
    let copy = engines(RelayMode::Copy, Faults::default());
    let (mut client_app, mut running, _watch) =
        started_tls_session(&copy, &tls_peers(), b"a1 NOOP\r\n").await;
    let mut forged = vec![23, 3, 3, 0, 40];
    forged.extend([0x5au8; 40]);
    client_app.get_mut().0.write_all(&forged).await.unwrap();
    let report = tokio::time::timeout(BULK_PATIENCE, &mut running.relay).await.expect("relay ended").unwrap();
    assert_eq!(report.ending, Ending::Failed);
    assert_eq!(report.totals.client_to_backend, 8, "only the early bytes reached the backend");
    let mut rest = Vec::new();
    let _ = running.backend_app.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{rest:?}");
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(BULK_PATIENCE, client_app.read(&mut buf)).await.expect("client told");
    let err = end.expect_err("the session ended with an error");
    assert!(err.to_string().contains("BadRecordMac"), "{err}");
}

/// Checks a session that kernel TLS carried: the engine says so, the client socket has
/// the "tls" ULP (so the kernel, not rustls, did the record layer), and each direction
/// ended with close_notify (the exchange's reads would fail on a bare EOF from rustls).
fn assert_kernel_carried(run: &TlsRun, what: &str, to_backend: usize) {
    assert_eq!(run.report.engine, Engine::Ktls, "{what}");
    assert_eq!(run.ulp, "tls", "{what}: the proxy's client socket carries the kernel's TLS ULP");
    assert_eq!(run.report.ending, Ending::Closed, "{what}");
    assert_eq!(run.report.totals.client_to_backend, to_backend as u64, "{what}");
    assert_eq!(run.report.totals.backend_to_client, BULK as u64, "{what}");
    // A plain line the ktls-qemu.sh script looks for: proof that the path really ran.
    println!("ktls proof: {what}: engine=ktls, TCP_ULP=tls, 64 MiB each way, close_notify both ways");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ktls_relays_64_mib_each_way_where_the_kernel_has_tls() {
    let auto = engines(RelayMode::Auto, Faults::default());
    if let Some(why) = ktls_available(&auto) {
        say_skipped(why);
        return;
    }
    let early = b"a1 NOOP\r\n";
    for first in [First::Client, First::Backend] {
        let run = tls_session(&auto, first, early).await;
        let what = format!("TLS1.3 AES-128-GCM, {first:?} half-closes first");
        assert_kernel_carried(&run, &what, BULK + early.len() - 1);
    }
}

/// Every suite the kernel could take, TLS 1.3 and 1.2: the ones the probe found go
/// through the kernel, the others fall back to copy with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ktls_relays_every_suite_the_kernel_takes() {
    let auto = engines(RelayMode::Auto, Faults::default());
    let offered = match auto.ktls() {
        KtlsSupport::Available(suites) => suites.clone(),
        KtlsSupport::Unavailable(why) => {
            say_skipped(why);
            return;
        }
    };
    let early = b"a1 NOOP\r\n";
    for (i, (rustls_suite, suite)) in kernel_suites().into_iter().enumerate() {
        let first = if i % 2 == 0 { First::Backend } else { First::Client };
        let run = tls_session_with(&auto, &tls_peers_with(rustls_suite), first, early).await;
        let what = format!("{suite}, {first:?} half-closes first");
        if offered.contains(&suite) {
            assert_kernel_carried(&run, &what, BULK + early.len() - 1);
        } else {
            println!("{what}: the kernel's TLS ULP has no such cipher; relayed by copy");
            assert_eq!(run.report.engine, Engine::Copy, "{what}");
            assert_eq!(run.report.ending, Ending::Closed, "{what}");
        }
    }
}

/// A TLS 1.3 KeyUpdate after the switch: the kernel decrypts it as a handshake record and
/// cannot take the client's next key, so the session must end, reported as failed, and
/// nothing sent under the new key may reach the backend as if it were plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ktls_ends_the_session_on_a_key_update() {
    let auto = engines(RelayMode::Auto, Faults::default());
    if let Some(why) = ktls_available(&auto) {
        say_skipped(why);
        return;
    }
    let early = b"a1 NOOP\r\n";
    let (mut client_app, mut running, watch) = started_tls_session(&auto, &tls_peers(), early).await;
    // Through the kernel before the KeyUpdate: delivered.
    client_app.write_all(b"before\r\n").await.unwrap();
    client_app.flush().await.unwrap();
    let mut got = [0u8; 8];
    running.backend_app.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"before\r\n");
    client_app.get_mut().1.refresh_traffic_keys().unwrap();
    client_app.write_all(b"after the key update\r\n").await.unwrap();
    client_app.flush().await.unwrap();
    let report = tokio::time::timeout(BULK_PATIENCE, &mut running.relay).await.expect("relay ended").unwrap();
    assert_eq!(report.engine, Engine::Ktls);
    assert_eq!(relay::socket_ulp(watch.as_fd()).unwrap(), "tls");
    // The duplicate would keep the socket open: the client must see the relay's close.
    drop(watch);
    assert_eq!(report.ending, Ending::Failed, "a KeyUpdate the kernel cannot follow ends the session");
    assert_eq!(report.totals.client_to_backend, (early.len() - 1 + 8) as u64);
    // The backend sees its leg closed, with nothing after "before".
    let mut rest = Vec::new();
    let _ = running.backend_app.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "nothing after the KeyUpdate reached the backend: {rest:?}");
    // And the client is told why, with a fatal alert, not left with a bare TCP close.
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(BULK_PATIENCE, client_app.read(&mut buf)).await.expect("client told");
    let err = end.expect_err("the session ended with an error");
    assert!(err.to_string().contains("InternalError"), "{err}");
    println!("ktls proof: TLS1.3 KeyUpdate after the switch ends the session ({:?})", report.ending);
}

/// Set-up failure before the keys leave rustls (no pipes) must fall back to copy with
/// nothing lost, including plaintext rustls had already decrypted. Runs on any kernel:
/// ktls is assumed available so the set-up path really starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ktls_falls_back_to_copy_when_set_up_fails() {
    let failing = engines(RelayMode::Auto, Faults { no_pipes: true, assume_ktls: true, ..Faults::default() });
    let run = tls_session(&failing, First::Client, b"a1 NOOP\r\n").await;
    assert_eq!(run.report.engine, Engine::Copy);
    assert_eq!(run.ulp, "", "the ULP goes on only after pipes were had");
    assert_eq!(run.report.ending, Ending::Closed);
    assert_eq!(run.report.totals.client_to_backend, (BULK + 8) as u64);
}

/// Where the kernel has no TLS ULP, the real setsockopt fails and the session still
/// completes with copy; where it has one, the same call succeeds and ktls serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ktls_ulp_refusal_falls_back_to_copy() {
    let probed = engines(RelayMode::Auto, Faults::default());
    let (expected, ulp) = match ktls_available(&probed) {
        Some(why) => {
            eprintln!("the kernel refuses the TLS ULP here ({why}): checking the fallback to copy");
            (Engine::Copy, "")
        }
        None => {
            eprintln!("the kernel has the TLS ULP here: the forced attempt succeeds with ktls");
            (Engine::Ktls, "tls")
        }
    };
    let assumed = engines(RelayMode::Auto, Faults { assume_ktls: true, ..Faults::default() });
    let run = tls_session(&assumed, First::Backend, b"a1 NOOP\r\n").await;
    assert_eq!(run.report.engine, expected);
    assert_eq!(run.ulp, ulp);
    assert_eq!(run.report.ending, Ending::Closed);
}

// ---- end to end through the proxy ------------------------------------------------------

/// Everything logged by this test binary (a global subscriber writing to memory).
fn log_buffer() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            // Debug too: the reason a session did not take ktls is logged at debug.
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || LogWriter(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per test binary");
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn closed_lines(log: &Arc<Mutex<Vec<u8>>>, listener: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| l.contains("connection closed") && l.contains(&format!("listener={listener} ")))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_of_each_session_is_logged_and_counted() {
    let log = log_buffer();
    // An MX backend without AUTH: only then is a plaintext session relayed opaquely.
    let smtp = Backend::start(Script::SmtpNoAuth).await;
    let imap = Backend::start(Script::Imap).await;
    let proxy = Proxy::start(&[
        Listener::new("mx", "smtp", "starttls", smtp.addr).opportunistic(),
        Listener::new("imaps", "imap", "implicit", imap.addr),
    ])
    .await;

    // A plaintext MX transaction: both legs cleartext TCP, so splice. A session takes the
    // backend's extensions known when it starts: wait for the start-up probe (SIZE in EHLO)
    // so that the session may relay opaquely.
    let mut probed = None;
    for _ in 0..100 {
        let mut c = proxy.tcp("mx").await;
        assert!(c.smtp_reply().await[0].starts_with("220 "));
        c.send("EHLO client.test\r\n").await;
        if c.smtp_reply().await.iter().any(|l| l.contains("SIZE")) {
            probed = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut c = probed.expect("the EHLO probe never ran");
    c.send("MAIL FROM:<echo@test>\r\n").await;
    assert_eq!(c.line().await, "250 2.1.0 Ok\r\n");
    let mut mx = c.into_inner();
    mx.write_all(b"echoed through splice\r\n").await.unwrap();
    mx.shutdown().await.unwrap();
    let mut back = String::new();
    mx.read_to_string(&mut back).await.unwrap();
    assert_eq!(back, "echoed through splice\r\n");

    // An IMAPS session after login: copy here, ktls where the kernel has it.
    let mut c = proxy.tls("imaps").await;
    assert!(c.line().await.starts_with("* OK"));
    c.send("a LOGIN echo x\r\n").await;
    assert!(c.line().await.starts_with("a OK"));
    let mut imaps = c.into_inner();
    imaps.write_all(b"echoed through the TLS engine\r\n").await.unwrap();
    imaps.flush().await.unwrap();
    // The echo first, the close after it: the echo can only come back through the relay,
    // so the close_notify then reaches a relay that has already chosen its engine. Sent
    // together, both can reach rustls before the switch, and a client that has already
    // closed is (rightly) relayed by copy.
    let mut back = vec![0u8; 31];
    imaps.read_exact(&mut back).await.unwrap();
    assert_eq!(back, b"echoed through the TLS engine\r\n");
    imaps.shutdown().await.unwrap();
    let mut rest = String::new();
    imaps.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "");

    let probe = Engines::detect(RelayMode::Auto, IDLE, Arc::new(Metrics::default()));
    let tls_engine = if ktls_available(&probe).is_none() { "ktls" } else { "copy" };
    let m = proxy.metrics.clone();
    assert!(eventually(|| Metrics::get(&m.relay_splice) == 1).await, "one splice session counted");
    let tls_counter = if tls_engine == "ktls" { &m.relay_ktls } else { &m.relay_copy };
    let why = || {
        let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
        text.lines().filter(|l| l.contains("ktls") || l.contains("imaps")).collect::<Vec<_>>().join("\n")
    };
    assert!(
        eventually(|| Metrics::get(tls_counter) == 1).await,
        "one {tls_engine} session counted:\n{}",
        why()
    );
    // Waiting for the probe may have opened (and dropped) earlier sessions: the relayed
    // one is the last mx line, and it alone reached a relay engine.
    assert!(eventually(|| closed_lines(&log, "mx").iter().any(|l| l.contains("outcome=relayed"))).await);
    assert!(eventually(|| closed_lines(&log, "imaps").len() == 1).await);
    let mx_lines = closed_lines(&log, "mx");
    let relayed: Vec<&String> = mx_lines.iter().filter(|l| !l.contains("engine=none")).collect();
    assert_eq!(relayed.len(), 1, "{mx_lines:?}");
    assert!(relayed[0].contains("engine=splice"), "{}", relayed[0]);
    let imaps_line = &closed_lines(&log, "imaps")[0];
    assert!(imaps_line.contains(&format!("engine={tls_engine}")), "{imaps_line}");
    if tls_engine == "ktls" {
        println!("\nktls proof: end to end through the proxy, the IMAPS session logged engine=ktls");
    }
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(text.contains("relay engines:"), "the start-up line says which engines are in use");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------
// The client filter hook (SMTP smuggling guard, issue 17)

/// Relays one cleartext session through `engines` with an SMTP guard: `pending` and then
/// `sent` from the client (which then closes), a reply from the backend. Returns what the
/// backend received, what the client received, and the report.
async fn guarded_session(
    engines: &Engines,
    policy: BareNewline,
    pending: &[u8],
    sent: &'static [u8],
) -> (Vec<u8>, Vec<u8>, Report) {
    let (mut client_app, client_side) = tcp_pair().await;
    let (backend_side, mut backend_app) = tcp_pair().await;
    let engines = engines.clone();
    let pending = Pending { to_backend: pending.to_vec(), to_client: Vec::new() };
    let relay = tokio::spawn(async move {
        let mut engine = None;
        let mut guard = SmtpGuard::new(policy, false);
        let filter: &mut dyn relay::ClientFilter = &mut guard;
        relay::run_filtered(client_side, backend_side, pending, &engines, "test", &mut engine, Some(filter))
            .await
    });
    client_app.write_all(sent).await.unwrap();
    client_app.shutdown().await.unwrap();
    let mut at_backend = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, backend_app.read_to_end(&mut at_backend)).await;
    let _ = backend_app.write_all(b"250 ok\r\n").await;
    let _ = backend_app.shutdown().await;
    let mut at_client = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, client_app.read_to_end(&mut at_client)).await;
    (at_backend, at_client, relay.await.unwrap())
}

#[tokio::test]
async fn every_engine_passes_pending_and_client_bytes_through_the_filter() {
    for (mode, engine) in [(RelayMode::Copy, Engine::Copy), (RelayMode::Auto, Engine::Splice)] {
        let engines = engines(mode, Faults::default());
        let (at_backend, at_client, report) = guarded_session(
            &engines,
            BareNewline::Normalize,
            b"MAIL FROM:<a@b>\r\nDATA\r\nfirst\n.",
            b"\nMAIL FROM:<ceo@x>\r\n\r\n.\r\n",
        )
        .await;
        let want: &[u8] = b"MAIL FROM:<a@b>\r\nDATA\r\nfirst\r\n..\r\nMAIL FROM:<ceo@x>\r\n\r\n.\r\n";
        assert_eq!(String::from_utf8_lossy(&at_backend), String::from_utf8_lossy(want), "{engine}");
        assert_eq!(at_client, b"250 ok\r\n", "{engine}: the backend's direction is untouched");
        assert_eq!((report.engine, report.ending), (engine, Ending::Closed));
    }
}

#[tokio::test]
async fn a_refusal_reaches_the_client_and_closes_both_sides_on_every_engine() {
    for (mode, engine) in [(RelayMode::Copy, Engine::Copy), (RelayMode::Auto, Engine::Splice)] {
        let engines = engines(mode, Faults::default());
        let (at_backend, at_client, report) = guarded_session(
            &engines,
            BareNewline::Reject,
            b"MAIL FROM:<a@b>\r\n",
            b"DATA\r\nfirst\n.\nMAIL FROM:<ceo@x>\r\n",
        )
        .await;
        assert_eq!(at_backend, b"MAIL FROM:<a@b>\r\nDATA\r\nfirst", "{engine}");
        assert!(String::from_utf8_lossy(&at_client).starts_with("521 5.5.2 "), "{engine}: {at_client:?}");
        assert_eq!((report.engine, report.ending), (engine, Ending::Refused));
    }
}

/// Most mail clients (Python's imaplib and poplib among them) close TCP after LOGOUT or
/// QUIT without a TLS close_notify. The mail protocols frame their own data, so that is an
/// ordinary end of the session: it must be reported as closed (and half-close the backend),
/// not as a failed relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_without_close_notify_ends_the_relay_as_closed() {
    let copy = engines(RelayMode::Copy, Faults::default());
    let (mut client_app, mut running, _watch) = started_tls_session(&copy, &tls_peers(), b"").await;
    client_app.write_all(b"a1 LOGOUT\r\n").await.unwrap();
    client_app.flush().await.unwrap();
    let mut got = [0u8; 11];
    running.backend_app.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"a1 LOGOUT\r\n");
    running.backend_app.write_all(b"* BYE\r\na1 OK\r\n").await.unwrap();
    let mut reply = [0u8; 14];
    client_app.read_exact(&mut reply).await.unwrap();
    // Close the TCP socket under the TLS session: no close_notify is sent.
    let (tcp, _) = client_app.into_inner();
    drop(tcp);
    // The backend sees end of stream from the client side, then closes its own.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(BULK_PATIENCE, running.backend_app.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{rest:?}");
    drop(running.backend_app);
    let report = tokio::time::timeout(BULK_PATIENCE, &mut running.relay).await.expect("relay ended").unwrap();
    assert_eq!(report.ending, Ending::Closed, "a close without close_notify is an ordinary close");
}

/// Resets the connection (SO_LINGER 0): the RST a client's kernel sends when it closes
/// with bytes still unread, as swaks does with mailtls's close_notify after QUIT.
fn reset(tcp: TcpStream) {
    socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO)).unwrap();
    drop(tcp);
}

/// The backend says goodbye and closes; the client reads it all, then resets instead of
/// closing. The conversation was over: the relay must report it closed, not failed.
async fn goodbye_then_reset<C>(
    mut client_app: C,
    into_tcp: impl FnOnce(C) -> TcpStream,
    running: Running,
) -> Report
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let Running { mut backend_app, relay } = running;
    client_app.write_all(b"QUIT\r\n").await.unwrap();
    client_app.flush().await.unwrap();
    let mut got = [0u8; 6];
    backend_app.read_exact(&mut got).await.unwrap();
    backend_app.write_all(b"221 2.0.0 bye\r\n").await.unwrap();
    drop(backend_app);
    // Everything the backend said, then the end of stream (close_notify on TLS).
    let mut reply = Vec::new();
    tokio::time::timeout(BULK_PATIENCE, client_app.read_to_end(&mut reply)).await.unwrap().unwrap();
    assert_eq!(reply, b"221 2.0.0 bye\r\n");
    reset(into_tcp(client_app));
    tokio::time::timeout(BULK_PATIENCE, relay).await.expect("relay ended").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resetting_after_the_backends_goodbye_ends_the_relay_as_closed_on_every_engine() {
    // TLS client leg, the copy engine (and ktls where the kernel has it).
    for mode in [RelayMode::Copy, RelayMode::Auto] {
        let engines = engines(mode, Faults::default());
        let (client_app, running, _watch) = started_tls_session(&engines, &tls_peers(), b"").await;
        let report = goodbye_then_reset(client_app, |c| c.into_inner().0, running).await;
        assert_eq!(report.ending, Ending::Closed, "{mode:?} TLS leg, engine {:?}", report.engine);
    }
    // Cleartext legs: splice in auto mode, copy when asked.
    for mode in [RelayMode::Copy, RelayMode::Auto] {
        let engines = engines(mode, Faults::default());
        let (client_app, client_side) = tcp_pair().await;
        let (backend_side, backend_app) = tcp_pair().await;
        let relay = tokio::spawn(async move {
            let mut engine = None;
            relay::run(client_side, backend_side, Pending::default(), &engines, "test", &mut engine).await
        });
        let report = goodbye_then_reset(client_app, |c| c, Running { backend_app, relay }).await;
        assert_eq!(report.ending, Ending::Closed, "{mode:?} cleartext leg, engine {:?}", report.engine);
    }
}

/// The other side of the rule above: a reset while the backend is still talking is a
/// failed relay, on every engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resetting_mid_conversation_is_a_failed_relay_on_every_engine() {
    for mode in [RelayMode::Copy, RelayMode::Auto] {
        for tls in [true, false] {
            let engines = engines(mode, Faults::default());
            let (client_tcp, mut backend_app, relay) = if tls {
                let (mut client_app, running, _watch) =
                    started_tls_session(&engines, &tls_peers(), b"").await;
                client_app.write_all(b"a1 NOOP\r\n").await.unwrap();
                client_app.flush().await.unwrap();
                (client_app.into_inner().0, running.backend_app, running.relay)
            } else {
                let (mut client_app, client_side) = tcp_pair().await;
                let (backend_side, backend_app) = tcp_pair().await;
                let relay = tokio::spawn(async move {
                    let mut engine = None;
                    relay::run(client_side, backend_side, Pending::default(), &engines, "test", &mut engine)
                        .await
                });
                client_app.write_all(b"a1 NOOP\r\n").await.unwrap();
                (client_app, backend_app, relay)
            };
            let mut got = [0u8; 9];
            backend_app.read_exact(&mut got).await.unwrap();
            reset(client_tcp);
            let report = tokio::time::timeout(BULK_PATIENCE, relay).await.expect("relay ended").unwrap();
            assert_eq!(report.ending, Ending::Failed, "{mode:?} tls={tls}, engine {:?}", report.engine);
            drop(backend_app);
        }
    }
}
