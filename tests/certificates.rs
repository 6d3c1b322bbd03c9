//! Certificates end to end: choice by SNI and by signature scheme, hot reload in the
//! layouts renewal tools really produce (rename-over, certbot, Kubernetes), refusal of
//! broken renewals, SIGHUP, OCSP stapling, resumption, and the `--check` report.
//!
//! Every certificate is generated here: a test CA (ECDSA P-256) and leaves it signs.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::openssl::s_client;
use common::{Backend, Conn, Script};
use mailtls::metrics::Metrics;
use mailtls::server::{Control, Server};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

// ---- PKI -----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alg {
    Ecdsa,
    Rsa,
}

/// A test CA, written to `ca.pem` / `ca.key` in `dir`.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    pem_path: PathBuf,
    key_path: PathBuf,
}

/// A leaf certificate and its key, as PEM, with the facts a test checks.
#[derive(Clone)]
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    /// Upper-case hex, as OpenSSL's index.txt spells it.
    serial_hex: String,
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

impl Ca {
    fn new(dir: &Path) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "mailtls test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let pem_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        std::fs::write(&pem_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Ca { cert, key, pem_path, key_path }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    fn leaf(&self, names: &[&str], alg: Alg) -> Leaf {
        self.leaf_with(names, alg, |_| {})
    }

    /// A leaf for `names`, with `adjust` applied to its parameters (validity, say).
    fn leaf_with(
        &self,
        names: &[&str],
        alg: Alg,
        adjust: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> Leaf {
        let key = match alg {
            Alg::Ecdsa => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
            Alg::Rsa => rsa_key(),
        };
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        // A serial we know (for the OCSP index), unique, positive and without leading zeros.
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let mut serial = vec![0x42];
        serial.extend_from_slice(&nanos.to_be_bytes());
        serial.extend_from_slice(&n.to_be_bytes());
        let serial_hex = serial.iter().map(|b| format!("{b:02X}")).collect::<String>();
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        adjust(&mut params);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone(), serial_hex }
    }
}

/// An RSA 2048 key: rcgen generates it with aws-lc-rs; openssl is the fallback.
fn rsa_key() -> rcgen::KeyPair {
    if let Ok(k) = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256) {
        return k;
    }
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
        .output()
        .expect("openssl genpkey");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    rcgen::KeyPair::from_pem(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

/// Unix seconds, for validity dates relative to now.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

// ---- files ---------------------------------------------------------------------------

fn write(path: &Path, contents: impl AsRef<[u8]>) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, contents).unwrap();
}

/// Writes `contents` to a temporary name beside `path` and renames it over `path`, as
/// careful tools do: readers see the old file or the new one, never half of one.
fn rename_over(path: &Path, contents: impl AsRef<[u8]>) {
    let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().unwrap().to_string_lossy()));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Points the symlink `link` at `target` atomically (a new link under a temporary name,
/// renamed over the old one), as certbot and the Kubernetes atomic writer do.
fn repoint(link: &Path, target: &Path) {
    let tmp = link.with_file_name(format!("{}_tmp", link.file_name().unwrap().to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// Writes `leaf` as `cert.pem` / `key.pem` in `dir`.
fn install(dir: &Path, leaf: &Leaf, stem: &str) {
    write(&dir.join(format!("{stem}.pem")), &leaf.cert_pem);
    write(&dir.join(format!("{stem}.key")), &leaf.key_pem);
}

/// A `[[tls.certificates]]` entry for files relative to the config's directory.
fn entry(cert: &str, key: &str) -> String {
    format!("[[tls.certificates]]\ncert = {cert:?}\nkey = {key:?}\n")
}

/// The whole config: `tls` is the text of the [tls] table and its certificate entries.
fn config_text(tls: &str, listen: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "hostname = \"mx.test\"\n{tls}\n[[listeners]]\nname = \"imaps\"\nprotocol = \"imap\"\ntls = \"implicit\"\n\
         listen = [\"{listen}\"]\nbackend = \"{backend}\"\nproxy_protocol = \"v2\"\n\n[timeouts]\ndrain = 1\n"
    )
}

// ---- the proxy -----------------------------------------------------------------------

/// A mailtls in-process, on an implicit IMAP listener before a scripted Dovecot.
struct TestProxy {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    control: mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<()>,
    _backend: Backend,
}

impl TestProxy {
    /// Starts with the config `tls` (the [tls] table) written as `dir/mailtls.toml`.
    async fn start(dir: &Path, tls: &str) -> TestProxy {
        let backend = Backend::start(Script::Imap).await;
        let path = dir.join("mailtls.toml");
        let text = config_text(tls, "127.0.0.1:0".parse().unwrap(), backend.addr);
        write(&path, &text);
        let config = mailtls::config::parse(&path, &text).expect("test config");
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let server = Server::bind(config).expect("proxy starts");
        let addr = server.local_addrs()[0].1;
        let metrics = server.metrics();
        let (control, rx) = mpsc::channel(4);
        let task = tokio::spawn(server.run(rx));
        TestProxy { addr, metrics, control, task, _backend: backend }
    }

    fn failed_reloads(&self) -> u64 {
        Metrics::get(&self.metrics.cert_reloads_failed)
    }

    async fn stop(self) {
        let _ = self.control.send(Control::Stop).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

// ---- clients -------------------------------------------------------------------------

type TlsClient = tokio_rustls::client::TlsStream<TcpStream>;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A client that trusts the test CA only.
fn trusting(ca: &Ca) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Accepts any certificate (the signatures are still checked): for names no leaf covers.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn accept_any() -> Arc<rustls::ClientConfig> {
    let p = provider();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(p)))
            .with_no_client_auth(),
    )
}

/// A TLS connection; `sni` None connects by IP address, for which rustls sends no SNI.
async fn connect(addr: SocketAddr, sni: Option<&str>, config: Arc<rustls::ClientConfig>) -> TlsClient {
    let name = match sni {
        Some(s) => ServerName::try_from(s.to_owned()).unwrap(),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = TcpStream::connect(addr).await.expect("connect to proxy");
    tokio::time::timeout(Duration::from_secs(5), tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("TLS handshake")
}

/// The leaf a fresh handshake is served.
async fn served(
    addr: SocketAddr,
    sni: Option<&str>,
    config: Arc<rustls::ClientConfig>,
) -> CertificateDer<'static> {
    let tls = connect(addr, sni, config).await;
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone().into_owned()
}

/// The leaf served for mail.example.org, whatever it is.
async fn served_now(addr: SocketAddr) -> CertificateDer<'static> {
    served(addr, Some("mail.example.org"), accept_any()).await
}

/// Polls new handshakes every 100 ms until `want` is served; fails after 2.5 s. Returns
/// how long the change took.
async fn await_leaf(addr: SocketAddr, want: &Leaf) -> Duration {
    await_leaf_within(addr, want, Duration::from_millis(2500)).await
}

/// Polls new handshakes every 100 ms until `want` is served; fails after `limit`.
async fn await_leaf_within(addr: SocketAddr, want: &Leaf, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if served_now(addr).await == want.der {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "the new certificate was not served within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts `want` stays served for `period`, checking every 100 ms.
async fn keeps_leaf(addr: SocketAddr, want: &Leaf, period: Duration) {
    let start = Instant::now();
    while start.elapsed() < period {
        assert!(
            served_now(addr).await == want.der,
            "another certificate was served after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A session logged in as "echo", relaying through to the backend.
async fn echo_session(addr: SocketAddr) -> Conn<TlsClient> {
    let mut c = Conn::new(connect(addr, Some("mail.example.org"), accept_any()).await);
    assert!(c.line().await.starts_with("* OK"));
    c.send("a LOGIN echo secret\r\n").await;
    assert!(c.line().await.starts_with("a OK"));
    c.send("before the swap\r\n").await;
    assert_eq!(c.line().await, "before the swap\r\n");
    c
}

async fn still_relays(c: &mut Conn<TlsClient>) {
    c.send("after the swap\r\n").await;
    assert_eq!(c.line().await, "after the swap\r\n");
}

// ---- SNI -----------------------------------------------------------------------------

/// The three leaves of the SNI tests, first (the default) mail.example.org.
struct SniSetup {
    _dir: tempfile::TempDir,
    ca: Ca,
    mail: Leaf,
    wild: Leaf,
    imap: Leaf,
    proxy: TestProxy,
}

async fn sni_setup() -> SniSetup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let mail = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
    let wild = ca.leaf(&["*.example.org"], Alg::Rsa);
    let imap = ca.leaf(&["imap.example.com"], Alg::Ecdsa);
    install(dir.path(), &mail, "mail");
    install(dir.path(), &wild, "wild");
    install(dir.path(), &imap, "imap");
    let tls = format!(
        "[tls]\n{}{}{}",
        entry("mail.pem", "mail.key"),
        entry("wild.pem", "wild.key"),
        entry("imap.pem", "imap.key")
    );
    let proxy = TestProxy::start(dir.path(), &tls).await;
    SniSetup { _dir: dir, ca, mail, wild, imap, proxy }
}

#[tokio::test]
async fn sni_exact_name_gets_its_own_certificate() {
    let s = sni_setup().await;
    let client = trusting(&s.ca);
    assert!(served(s.proxy.addr, Some("mail.example.org"), client.clone()).await == s.mail.der);
    assert!(served(s.proxy.addr, Some("imap.example.com"), client.clone()).await == s.imap.der);
    // Case does not matter.
    assert!(served(s.proxy.addr, Some("IMAP.Example.COM"), client).await == s.imap.der);
    s.proxy.stop().await;
}

#[tokio::test]
async fn sni_wildcard_covers_exactly_one_label() {
    let s = sni_setup().await;
    // x.example.org is covered by *.example.org (and verifies against the CA).
    assert!(served(s.proxy.addr, Some("x.example.org"), trusting(&s.ca)).await == s.wild.der);
    // a.b.example.org is not: the default (first entry) is served.
    let got = served(s.proxy.addr, Some("a.b.example.org"), accept_any()).await;
    assert!(got == s.mail.der, "a.b.example.org must get the default, not the wildcard");
    assert!(got != s.wild.der);
    // The exact name beats the wildcard that also covers it.
    assert!(served(s.proxy.addr, Some("mail.example.org"), trusting(&s.ca)).await == s.mail.der);
    s.proxy.stop().await;
}

#[tokio::test]
async fn sni_unknown_name_and_no_sni_get_the_first_certificate() {
    let s = sni_setup().await;
    assert!(served(s.proxy.addr, Some("unknown.example.net"), accept_any()).await == s.mail.der);
    // ServerName::IpAddress: rustls sends no SNI extension at all.
    assert!(served(s.proxy.addr, None, accept_any()).await == s.mail.der);
    s.proxy.stop().await;
}

// ---- RSA and ECDSA for one name ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_and_ecdsa_for_one_name_follow_client_signature_algorithms() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let ecdsa = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
    let rsa = ca.leaf(&["mail.example.org"], Alg::Rsa);
    install(dir.path(), &ecdsa, "ecdsa");
    install(dir.path(), &rsa, "rsa");
    let tls = format!("[tls]\n{}{}", entry("ecdsa.pem", "ecdsa.key"), entry("rsa.pem", "rsa.key"));
    let proxy = TestProxy::start(dir.path(), &tls).await;
    let ca_file = ca.pem_path.display().to_string();
    let run = |version: &'static str, sigalgs: &'static str| {
        let ca_file = ca_file.clone();
        let addr = proxy.addr;
        async move {
            let out = s_client(
                addr,
                &[version, "-servername", "mail.example.org", "-sigalgs", sigalgs, "-CAfile", &ca_file],
            )
            .await;
            (version, sigalgs, out)
        }
    };
    let results = futures_join(vec![
        Box::pin(run("-tls1_3", "RSA-PSS+SHA256:RSA+SHA256")),
        Box::pin(run("-tls1_2", "RSA-PSS+SHA256:RSA+SHA256")),
        Box::pin(run("-tls1_3", "ECDSA+SHA256")),
        Box::pin(run("-tls1_2", "ECDSA+SHA256")),
    ])
    .await;
    for (version, sigalgs, out) in results {
        assert!(out.contains("Verify return code: 0 (ok)"), "{version} {sigalgs}: {out}");
        if sigalgs.starts_with("RSA") {
            assert!(out.contains("Server public key is 2048 bit"), "{version} {sigalgs}: {out}");
            assert!(out.contains("Peer signature type: RSA"), "{version} {sigalgs}: {out}");
        } else {
            assert!(out.contains("Server public key is 256 bit"), "{version} {sigalgs}: {out}");
            assert!(out.contains("Peer signature type: ECDSA"), "{version} {sigalgs}: {out}");
        }
    }
    // And rustls clients, which accept both, get the first (ECDSA) entry.
    assert!(served(proxy.addr, Some("mail.example.org"), trusting(&ca)).await == ecdsa.der);
    proxy.stop().await;
}

type BoxFut<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Runs the futures concurrently (each s_client holds ~0.5 s) and returns their outputs.
async fn futures_join<T: Send + 'static>(futs: Vec<BoxFut<T>>) -> Vec<T> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

// ---- hot reload ----------------------------------------------------------------------

/// A proxy serving `old` from certs/mail.{pem,key}, and the `new` leaf a renewal brings.
struct Renewal {
    _dir: tempfile::TempDir,
    certs: PathBuf,
    old: Leaf,
    new: Leaf,
    proxy: TestProxy,
}

impl Renewal {
    /// Starts the proxy on `old`, with `before_start` run once the files are in place;
    /// `settings` opens the [tls] table.
    async fn start(settings: &str, before_start: impl FnOnce(&Path)) -> Renewal {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path());
        let old = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
        let new = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
        let certs = dir.path().join("certs");
        install(&certs, &old, "mail");
        before_start(&certs);
        let tls = format!("[tls]\n{settings}{}", entry("certs/mail.pem", "certs/mail.key"));
        let proxy = TestProxy::start(dir.path(), &tls).await;
        // Served once: the proxy (and its watcher) is running.
        assert!(served_now(proxy.addr).await == old.der);
        Renewal { _dir: dir, certs, old, new, proxy }
    }

    /// Renames the new pair over the old files.
    fn land(&self) {
        rename_over(&self.certs.join("mail.pem"), &self.new.cert_pem);
        rename_over(&self.certs.join("mail.key"), &self.new.key_pem);
    }
}

#[tokio::test]
async fn reload_on_rename_over_keeps_open_sessions() {
    let renewal = Renewal::start("", |_| {}).await;
    let proxy = &renewal.proxy;
    let mut session = echo_session(proxy.addr).await;
    renewal.land();
    let took = await_leaf(proxy.addr, &renewal.new).await;
    eprintln!("rename-over reload took {took:?}");
    still_relays(&mut session).await;
    assert_eq!(proxy.failed_reloads(), 0);
    assert!(renewal.old.der != renewal.new.der);
    renewal.proxy.stop().await;
}

/// A log written every 100 ms beside the certificate must neither hold back nor stand in
/// for the reload of a renewal (the watcher used to wait for the whole directory to go
/// quiet, which it never did). 5 s is the test's patience; the watcher's own bound (2 s)
/// is unit-tested in src/watch.rs on a paused clock.
#[tokio::test]
async fn reload_lands_while_a_file_beside_the_certificate_is_rewritten_every_100ms() {
    let mut busy = None;
    let renewal = Renewal::start("", |certs| {
        busy = Some(common::busy::BusyNeighbour::start(&certs.join("renewal.log")))
    })
    .await;
    renewal.land();
    let took = await_leaf_within(renewal.proxy.addr, &renewal.new, Duration::from_secs(5)).await;
    let writes = busy.map_or(0, |b| b.stop());
    eprintln!("reload beside a busy file took {took:?} ({writes} neighbour writes)");
    assert_eq!(Metrics::get(&renewal.proxy.metrics.cert_reloads_ok), 1);
    assert_eq!(renewal.proxy.failed_reloads(), 0);
    renewal.proxy.stop().await;
}

#[tokio::test]
async fn reload_on_certbot_symlink_swap_keeps_open_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let old = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
    let new = ca.leaf(&["mail.example.org"], Alg::Rsa);
    let archive = dir.path().join("letsencrypt/archive/mail.example.org");
    let live = dir.path().join("letsencrypt/live/mail.example.org");
    write(&archive.join("fullchain1.pem"), &old.cert_pem);
    write(&archive.join("privkey1.pem"), &old.key_pem);
    std::fs::create_dir_all(&live).unwrap();
    let rel = Path::new("../../archive/mail.example.org");
    std::os::unix::fs::symlink(rel.join("fullchain1.pem"), live.join("fullchain.pem")).unwrap();
    std::os::unix::fs::symlink(rel.join("privkey1.pem"), live.join("privkey.pem")).unwrap();
    let tls = format!(
        "[tls]\n{}",
        entry(
            "letsencrypt/live/mail.example.org/fullchain.pem",
            "letsencrypt/live/mail.example.org/privkey.pem"
        )
    );
    let proxy = TestProxy::start(dir.path(), &tls).await;
    assert!(served_now(proxy.addr).await == old.der);
    let mut session = echo_session(proxy.addr).await;
    // certbot renew: new archive files, then each live symlink re-pointed atomically.
    write(&archive.join("fullchain2.pem"), &new.cert_pem);
    write(&archive.join("privkey2.pem"), &new.key_pem);
    repoint(&live.join("fullchain.pem"), &rel.join("fullchain2.pem"));
    repoint(&live.join("privkey.pem"), &rel.join("privkey2.pem"));
    let took = await_leaf(proxy.addr, &new).await;
    eprintln!("certbot reload took {took:?}");
    still_relays(&mut session).await;
    assert_eq!(proxy.failed_reloads(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn reload_on_kubernetes_data_link_swap_keeps_open_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let old = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
    let new = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
    let secret = dir.path().join("secret");
    let first = "..2026_11_29_10_00_00.111";
    write(&secret.join(first).join("tls.crt"), &old.cert_pem);
    write(&secret.join(first).join("tls.key"), &old.key_pem);
    std::os::unix::fs::symlink(first, secret.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", secret.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", secret.join("tls.key")).unwrap();
    let proxy =
        TestProxy::start(dir.path(), &format!("[tls]\n{}", entry("secret/tls.crt", "secret/tls.key"))).await;
    assert!(served_now(proxy.addr).await == old.der);
    let mut session = echo_session(proxy.addr).await;
    // The kubelet's atomic writer: a new timestamped dir, ..data_tmp -> it, renamed over
    // ..data, then the old dir removed.
    let second = "..2026_11_29_11_00_00.222";
    write(&secret.join(second).join("tls.crt"), &new.cert_pem);
    write(&secret.join(second).join("tls.key"), &new.key_pem);
    repoint(&secret.join("..data"), Path::new(second));
    // Seen through the directory watch alone: the old files are still there.
    let took = await_leaf(proxy.addr, &new).await;
    eprintln!("kubernetes reload took {took:?}");
    std::fs::remove_dir_all(secret.join(first)).unwrap();
    assert!(served_now(proxy.addr).await == new.der);
    still_relays(&mut session).await;
    assert_eq!(proxy.failed_reloads(), 0);
    proxy.stop().await;
}

// ---- refusals ------------------------------------------------------------------------

/// Serves `old` from certs/mail.{pem,key}, lets `spoil` rename something over the files,
/// then checks the old leaf stays for 1.5 s and the refusal is counted.
async fn refused_reload_keeps_old(spoil: impl FnOnce(&Ca, &Path)) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let old = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
    let certs = dir.path().join("certs");
    install(&certs, &old, "mail");
    let proxy =
        TestProxy::start(dir.path(), &format!("[tls]\n{}", entry("certs/mail.pem", "certs/mail.key"))).await;
    assert!(served_now(proxy.addr).await == old.der);
    let mut session = echo_session(proxy.addr).await;
    let failed_before = proxy.failed_reloads();
    spoil(&ca, &certs);
    keeps_leaf(proxy.addr, &old, Duration::from_millis(1500)).await;
    assert!(
        proxy.failed_reloads() > failed_before,
        "the refused reload is not counted in cert_reloads_failed"
    );
    assert_eq!(Metrics::get(&proxy.metrics.cert_reloads_ok), 0);
    still_relays(&mut session).await;
    proxy.stop().await;
}

#[tokio::test]
async fn reload_refuses_garbage_certificate_file() {
    refused_reload_keeps_old(|_, certs| {
        rename_over(&certs.join("mail.pem"), "this is not a certificate\n");
    })
    .await;
}

#[tokio::test]
async fn reload_refuses_key_that_does_not_match() {
    refused_reload_keeps_old(|ca, certs| {
        let other = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
        rename_over(&certs.join("mail.key"), &other.key_pem);
    })
    .await;
}

#[tokio::test]
async fn reload_refuses_expired_leaf() {
    refused_reload_keeps_old(|ca, certs| {
        let expired = ca.leaf_with(&["mail.example.org"], Alg::Ecdsa, |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        });
        rename_over(&certs.join("mail.pem"), &expired.cert_pem);
        rename_over(&certs.join("mail.key"), &expired.key_pem);
    })
    .await;
}

// ---- SIGHUP --------------------------------------------------------------------------

#[tokio::test]
async fn without_watch_files_wait_for_reload_request() {
    let renewal = Renewal::start("watch = false\n", |_| {}).await;
    let (proxy, old, new) = (&renewal.proxy, &renewal.old, &renewal.new);
    let mut session = echo_session(proxy.addr).await;
    renewal.land();
    // Well past the watcher's debounce: nothing changes by itself.
    keeps_leaf(proxy.addr, old, Duration::from_millis(1000)).await;
    proxy.control.send(Control::Reload).await.unwrap();
    await_leaf(proxy.addr, new).await;
    still_relays(&mut session).await;
    assert_eq!(Metrics::get(&proxy.metrics.cert_reloads_ok), 1);
    renewal.proxy.stop().await;
}

/// A port free right now on 127.0.0.1.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_to_the_binary_reloads_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let old = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
    let new = ca.leaf(&["mail.example.org"], Alg::Rsa);
    install(dir.path(), &old, "mail");
    let backend = Backend::start(Script::Imap).await;
    let listen = free_port();
    let tls = format!("[tls]\nwatch = false\n{}", entry("mail.pem", "mail.key"));
    let path = dir.path().join("mailtls.toml");
    write(&path, config_text(&tls, listen, backend.addr));
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_mailtls"))
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mailtls starts"),
    );
    // Up when a handshake completes.
    let start = Instant::now();
    loop {
        if let Ok(tcp) = TcpStream::connect(listen).await {
            let name = ServerName::try_from("mail.example.org").unwrap();
            if let Ok(tls) = tokio_rustls::TlsConnector::from(accept_any()).connect(name, tcp).await {
                assert!(tls.get_ref().1.peer_certificates().unwrap()[0] == old.der);
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(5), "mailtls did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut session = echo_session(listen).await;
    rename_over(&dir.path().join("mail.pem"), &new.cert_pem);
    rename_over(&dir.path().join("mail.key"), &new.key_pem);
    keeps_leaf(listen, &old, Duration::from_millis(600)).await;
    let status = Command::new("kill").arg("-HUP").arg(child.0.id().to_string()).status().unwrap();
    assert!(status.success());
    await_leaf(listen, &new).await;
    still_relays(&mut session).await;
    drop(child);
}

// ---- OCSP ----------------------------------------------------------------------------

fn openssl(args: &[&str], cwd: &Path) {
    let out = Command::new("openssl").args(args).current_dir(cwd).output().expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocsp_response_is_stapled() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d);
    let leaf = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
    install(d, &leaf, "mail");
    let ca_pem = ca.pem_path.display().to_string();
    let ca_key = ca.key_path.display().to_string();
    openssl(&["ocsp", "-issuer", &ca_pem, "-cert", "mail.pem", "-reqout", "req.der", "-no_nonce"], d);
    write(
        &d.join("index.txt"),
        format!("V\t991231235959Z\t\t{}\tunknown\t/CN=mail.example.org\n", leaf.serial_hex),
    );
    openssl(
        &[
            "ocsp",
            "-index",
            "index.txt",
            "-CA",
            &ca_pem,
            "-rsigner",
            &ca_pem,
            "-rkey",
            &ca_key,
            "-reqin",
            "req.der",
            "-respout",
            "resp.der",
            "-ndays",
            "7",
        ],
        d,
    );
    let tls = format!("[tls]\n{}ocsp = \"resp.der\"\n", entry("mail.pem", "mail.key"));
    let proxy = TestProxy::start(d, &tls).await;
    for version in ["-tls1_3", "-tls1_2"] {
        let out = s_client(
            proxy.addr,
            &[version, "-servername", "mail.example.org", "-status", "-CAfile", &ca_pem],
        )
        .await;
        assert!(out.contains("OCSP Response Status: successful"), "{version}: {out}");
        assert!(out.contains("Cert Status: good"), "{version}: {out}");
    }
    proxy.stop().await;
}

// ---- resumption ----------------------------------------------------------------------

/// A full handshake saving the session to `file`, then (when the client got a session to
/// save) one offering it back. Returns both outputs; the second is empty when there was
/// nothing to offer. `between` runs in between (a certificate reload, say).
async fn resume(
    addr: SocketAddr,
    version: &str,
    file: PathBuf,
    between: impl std::future::Future<Output = ()>,
) -> (String, String) {
    let sess = file.display().to_string();
    let args = [version, "-servername", "mail.example.org"];
    let first = s_client(addr, &[&args[..], &["-sess_out", &sess]].concat()).await;
    assert!(first.contains("New, TLSv1."), "{first}");
    between.await;
    if !file.exists() {
        return (first, String::new());
    }
    let second = s_client(addr, &[&args[..], &["-sess_in", &sess]].concat()).await;
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_with_tls13_tickets_and_tls12() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    install(dir.path(), &ca.leaf(&["mail.example.org"], Alg::Ecdsa), "mail");
    let proxy = TestProxy::start(dir.path(), &format!("[tls]\n{}", entry("mail.pem", "mail.key"))).await;
    let (t13, t12) = tokio::join!(
        resume(proxy.addr, "-tls1_3", dir.path().join("s13.pem"), async {}),
        resume(proxy.addr, "-tls1_2", dir.path().join("s12.pem"), async {}),
    );
    assert!(t13.0.contains("New Session Ticket"), "{}", t13.0);
    assert!(t13.1.contains("Reused, TLSv1.3"), "{}", t13.1);
    assert!(t12.1.contains("Reused, TLSv1.2"), "{}", t12.1);
    assert!(!t12.0.contains("Session-ID: \n") || t12.0.contains("TLS session ticket:"), "{}", t12.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_tickets_resume_without_session_cache() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    install(dir.path(), &ca.leaf(&["mail.example.org"], Alg::Ecdsa), "mail");
    let tls = format!("[tls]\nsession_cache = 0\n{}", entry("mail.pem", "mail.key"));
    let proxy = TestProxy::start(dir.path(), &tls).await;
    let (t13, t12) = tokio::join!(
        resume(proxy.addr, "-tls1_3", dir.path().join("s13.pem"), async {}),
        resume(proxy.addr, "-tls1_2", dir.path().join("s12.pem"), async {}),
    );
    assert!(t13.1.contains("Reused, TLSv1.3"), "{}", t13.1);
    assert!(t12.0.contains("TLS session ticket:"), "{}", t12.0);
    assert!(t12.1.contains("Reused, TLSv1.2"), "{}", t12.1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_session_resumes_across_certificate_reload() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    install(dir.path(), &ca.leaf(&["mail.example.org"], Alg::Ecdsa), "mail");
    let new = ca.leaf(&["mail.example.org"], Alg::Ecdsa);
    let tls = format!("[tls]\nwatch = false\n{}", entry("mail.pem", "mail.key"));
    let proxy = TestProxy::start(dir.path(), &tls).await;
    let (_, second) = resume(proxy.addr, "-tls1_3", dir.path().join("s13.pem"), async {
        rename_over(&dir.path().join("mail.pem"), &new.cert_pem);
        rename_over(&dir.path().join("mail.key"), &new.key_pem);
        proxy.control.send(Control::Reload).await.unwrap();
        await_leaf(proxy.addr, &new).await;
    })
    .await;
    assert!(second.contains("Reused, TLSv1.3"), "{second}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_resumption_without_tickets_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    install(dir.path(), &ca.leaf(&["mail.example.org"], Alg::Ecdsa), "mail");
    let tls = format!("[tls]\nsession_tickets = false\nsession_cache = 0\n{}", entry("mail.pem", "mail.key"));
    let proxy = TestProxy::start(dir.path(), &tls).await;
    let (t13, t12) = tokio::join!(
        resume(proxy.addr, "-tls1_3", dir.path().join("s13.pem"), async {}),
        resume(proxy.addr, "-tls1_2", dir.path().join("s12.pem"), async {}),
    );
    // TLS 1.3: no ticket at all, so the client has no session to offer (or, if it had
    // one, it would not be taken).
    assert!(!t13.0.contains("New Session Ticket"), "{}", t13.0);
    assert!(!t13.1.contains("Reused"), "{}", t13.1);
    // TLS 1.2: neither a session ID nor a ticket, so nothing to resume either.
    assert!(t12.0.contains("Session-ID: \n"), "{}", t12.0);
    assert!(!t12.0.contains("TLS session ticket:"), "{}", t12.0);
    assert!(!t12.1.contains("Reused"), "{}", t12.1);
    proxy.stop().await;
}

// ---- --check -------------------------------------------------------------------------

#[test]
fn check_reports_certificates_and_warns_before_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let soon = ca.leaf_with(&["mail.example.org", "imap.example.org"], Alg::Ecdsa, |p| {
        p.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(unix_now() + 5 * 86_400);
    });
    let later = ca.leaf_with(&["*.example.com"], Alg::Rsa, |p| {
        p.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(unix_now() + 90 * 86_400 + 3600);
    });
    install(dir.path(), &soon, "soon");
    install(dir.path(), &later, "later");
    let tls = format!("[tls]\n{}{}", entry("soon.pem", "soon.key"), entry("later.pem", "later.key"));
    let path = dir.path().join("mailtls.toml");
    write(&path, config_text(&tls, "127.0.0.1:9993".parse().unwrap(), "127.0.0.1:143".parse().unwrap()));
    let out = Command::new(env!("CARGO_BIN_EXE_mailtls"))
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let line = |file: &str| {
        stdout
            .lines()
            .find(|l| l.contains(file))
            .unwrap_or_else(|| panic!("no line for {file}: {stdout}"))
            .to_owned()
    };
    let soon_line = line("soon.pem");
    assert!(soon_line.contains("mail.example.org") && soon_line.contains("imap.example.org"), "{soon_line}");
    assert!(soon_line.contains("ECDSA-256"), "{soon_line}");
    assert!(soon_line.contains("(4 days)") || soon_line.contains("(5 days)"), "{soon_line}");
    assert!(soon_line.contains("WARNING"), "{soon_line}");
    let later_line = line("later.pem");
    assert!(later_line.contains("*.example.com"), "{later_line}");
    assert!(later_line.contains("RSA-2048"), "{later_line}");
    assert!(later_line.contains("(90 days)"), "{later_line}");
    assert!(!later_line.contains("WARNING"), "{later_line}");
}

/// SIGHUP as soon as the listener accepts TCP: a reload, never the default action of the
/// signal (death). Repeated for ~4 s, since it is a race with start-up.
#[test]
fn sighup_right_after_start_does_not_kill_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    install(dir.path(), &ca.leaf(&["mail.example.org"], Alg::Ecdsa), "mail");
    let listen = free_port();
    let path = dir.path().join("mailtls.toml");
    let tls = format!("[tls]\n{}", entry("mail.pem", "mail.key"));
    write(&path, config_text(&tls, listen, "127.0.0.1:1".parse().unwrap()));
    let start = Instant::now();
    let mut runs = 0;
    while start.elapsed() < Duration::from_secs(4) {
        runs += 1;
        let mut child = Child(
            Command::new(env!("CARGO_BIN_EXE_mailtls"))
                .arg("--config")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("mailtls starts"),
        );
        let up = Instant::now();
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(up.elapsed() < Duration::from_secs(5), "mailtls did not come up");
        }
        let status = Command::new("kill").arg("-HUP").arg(child.0.id().to_string()).status().unwrap();
        assert!(status.success());
        std::thread::sleep(Duration::from_millis(100));
        let exited = child.0.try_wait().unwrap();
        assert!(exited.is_none(), "run {runs}: SIGHUP after the port was open killed mailtls: {exited:?}");
    }
}

/// A client that offers ALPN "imap" and accepts any certificate.
fn alpn_client() -> Arc<rustls::ClientConfig> {
    let mut config = (*accept_any()).clone();
    config.alpn_protocols = vec![b"imap".to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn policy_knobs_decide_suite_group_and_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    install(dir.path(), &ca.leaf(&["mail.example.org"], Alg::Ecdsa), "mail");

    // Defaults: the post-quantum hybrid first, no ALPN even when the client offers one.
    let proxy = TestProxy::start(dir.path(), &format!("[tls]\n{}", entry("mail.pem", "mail.key"))).await;
    let tls = connect(proxy.addr, Some("mail.example.org"), alpn_client()).await;
    let conn = tls.get_ref().1;
    let group = conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()));
    assert_eq!(group.as_deref(), Some("X25519MLKEM768"));
    assert_eq!(conn.alpn_protocol(), None, "ALPN is off by default");
    proxy.stop().await;

    // Narrowed: only the suite and the group configured are negotiated; ALPN when asked.
    let tls_table = format!(
        "[tls]\ncipher_suites = [\"TLS_CHACHA20_POLY1305_SHA256\"]\nkx_groups = [\"secp384r1\"]\nalpn = [\"imap\"]\n{}",
        entry("mail.pem", "mail.key")
    );
    let proxy = TestProxy::start(dir.path(), &tls_table).await;
    let tls = connect(proxy.addr, Some("mail.example.org"), alpn_client()).await;
    let conn = tls.get_ref().1;
    let suite = conn.negotiated_cipher_suite().and_then(|s| s.suite().as_str());
    assert_eq!(suite, Some("TLS13_CHACHA20_POLY1305_SHA256"));
    let group = conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()));
    assert_eq!(group.as_deref(), Some("secp384r1"));
    assert_eq!(conn.alpn_protocol(), Some(&b"imap"[..]));
    proxy.stop().await;
}

/// A client offering every suite of one TLS version in the reverse of the server's order.
fn reversed_suites_client(version: &'static rustls::SupportedProtocolVersion) -> Arc<rustls::ClientConfig> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.retain(|s| s.version() == version);
    p.cipher_suites.reverse();
    let p = Arc::new(p);
    Arc::new(
        rustls::ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(p)))
            .with_no_client_auth(),
    )
}

/// The server's order of suites decides (testssl.sh: "Has server cipher order? yes"): a
/// client preferring the server's last choice still gets its first, with TLS 1.3 and 1.2,
/// and a configured `cipher_suites` list is the order of preference.
#[tokio::test]
async fn server_cipher_order_beats_the_client_order() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    install(dir.path(), &ca.leaf(&["mail.example.org"], Alg::Ecdsa), "mail");
    let negotiated =
        |tls: &TlsClient| tls.get_ref().1.negotiated_cipher_suite().and_then(|s| s.suite().as_str());

    let proxy = TestProxy::start(dir.path(), &format!("[tls]\n{}", entry("mail.pem", "mail.key"))).await;
    for (version, want) in [
        (&rustls::version::TLS13, "TLS13_AES_256_GCM_SHA384"),
        (&rustls::version::TLS12, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
    ] {
        let tls = connect(proxy.addr, Some("mail.example.org"), reversed_suites_client(version)).await;
        assert_eq!(negotiated(&tls), Some(want), "{version:?}");
    }
    proxy.stop().await;

    let tls_table = format!(
        "[tls]\ncipher_suites = [\"TLS13_CHACHA20_POLY1305_SHA256\", \"TLS13_AES_128_GCM_SHA256\"]\n{}",
        entry("mail.pem", "mail.key")
    );
    let proxy = TestProxy::start(dir.path(), &tls_table).await;
    // The client prefers AES as rustls does by default; the configured order puts ChaCha20 first.
    let tls = connect(proxy.addr, Some("mail.example.org"), accept_any()).await;
    assert_eq!(negotiated(&tls), Some("TLS13_CHACHA20_POLY1305_SHA256"));
    proxy.stop().await;
}

/// `self_signed = true` on a trial pair that expired while mailtls was stopped: the start
/// renews it (a short-lived one, still marked as a trial) instead of refusing to start.
#[tokio::test]
async fn an_expired_trial_certificate_is_renewed_on_start() {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["mx.test".to_owned()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::OrganizationName, mailtls::tls::trial::MARKER);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 4, 1);
    write(&dir.path().join("trial.key"), key.serialize_pem());
    write(&dir.path().join("trial.pem"), params.self_signed(&key).unwrap().pem());
    let tls = format!("[tls]\n{}self_signed = true\n", entry("trial.pem", "trial.key"));
    let proxy = TestProxy::start(dir.path(), &tls).await;
    let served = served(proxy.addr, Some("mx.test"), accept_any()).await;
    let (_, cert) = X509Certificate::from_der(&served).unwrap();
    let (from, until) = (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp());
    let now = unix_now() as i64;
    assert!(from <= now && until > now, "served a certificate valid {from}..{until}");
    assert!(until - from <= 91 * 86_400, "valid for {} days", (until - from) / 86_400);
    assert!(cert.subject().iter_organization().any(|o| o.as_str() == Ok(mailtls::tls::trial::MARKER)));
    proxy.stop().await;
}
