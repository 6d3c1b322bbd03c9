//! Test harness: a real mailtls (in-process) on ephemeral ports with a generated
//! certificate, scripted backends that record every byte they receive, and a real TLS
//! client (rustls) to drive it.
#![allow(dead_code)]

pub mod backend;
pub mod busy;
pub mod mailbox_matrix;
pub mod mailservers;
pub mod mta;
pub mod openssl;
pub mod podman;
pub mod process;
pub mod roles;
pub mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mailtls::metrics::Metrics;
use mailtls::server::{Control, Server};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub use backend::{Backend, Script};

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// A generated certificate for "localhost" and "mail.test", written as PEM files.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

pub fn certs() -> Certs {
    certs_for(&["localhost", "mail.test"])
}

pub fn certs_for(names: &[&str]) -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Certs { der: cert.der().clone(), cert: cert_path, key: key_path, dir }
}

/// One listener of the proxy under test.
#[derive(Clone, Debug)]
pub struct Listener {
    pub name: &'static str,
    pub protocol: &'static str,
    pub tls: &'static str,
    pub require_tls: bool,
    pub backend: SocketAddr,
    pub proxy_protocol: &'static str,
}

impl Listener {
    pub fn new(name: &'static str, protocol: &'static str, tls: &'static str, backend: SocketAddr) -> Self {
        Listener { name, protocol, tls, require_tls: true, backend, proxy_protocol: "v2" }
    }
    pub fn opportunistic(mut self) -> Self {
        self.require_tls = false;
        self
    }
    pub fn proxy(mut self, version: &'static str) -> Self {
        self.proxy_protocol = version;
        self
    }
}

/// The config text for `listeners`, each on 127.0.0.1 port 0; `extra` is appended.
pub fn config_text(certs: &Certs, listeners: &[Listener], extra: &str) -> String {
    let mut text = format!(
        "hostname = \"mx.test\"\n[tls]\nmin_version = \"1.2\"\n[[tls.certificates]]\ncert = {:?}\nkey = {:?}\n",
        certs.cert.display().to_string(),
        certs.key.display().to_string()
    );
    for l in listeners {
        text.push_str(&format!(
            "[[listeners]]\nname = \"{}\"\nprotocol = \"{}\"\ntls = \"{}\"\nrequire_tls = {}\nlisten = [\"127.0.0.1:0\"]\nbackend = \"{}\"\nproxy_protocol = \"{}\"\n",
            l.name, l.protocol, l.tls, l.require_tls, l.backend, l.proxy_protocol
        ));
    }
    text.push_str(extra);
    if !extra.contains("[timeouts]") {
        // Tests stop the proxy with sessions open; they need not wait the default 30 s.
        text.push_str("\n[timeouts]\ndrain = 1\n");
    }
    text
}

/// A running proxy.
pub struct Proxy {
    pub addrs: Vec<(String, SocketAddr)>,
    pub metrics: Arc<Metrics>,
    pub control: mpsc::Sender<Control>,
    pub task: tokio::task::JoinHandle<()>,
    pub certs: Arc<Certs>,
}

impl Proxy {
    /// The config file the proxy was started from (re-read on Control::Reload).
    pub fn config_path(&self) -> std::path::PathBuf {
        self.certs.dir.path().join("mailtls.toml")
    }
}

impl Proxy {
    pub async fn start(listeners: &[Listener]) -> Proxy {
        Proxy::start_with(listeners, "").await
    }

    pub async fn start_with(listeners: &[Listener], extra: &str) -> Proxy {
        Proxy::start_edited(listeners, extra, |text| text).await
    }

    /// Like `start_with`, with the config text passed through `edit` first (for keys the
    /// `Listener` builder does not know).
    pub async fn start_edited(
        listeners: &[Listener],
        extra: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Proxy {
        let certs = Arc::new(certs());
        let text = edit(config_text(&certs, listeners, extra));
        // Written out too, so that a reload (Control::Reload, as SIGHUP sends) can re-read it.
        let path = certs.dir.path().join("mailtls.toml");
        std::fs::write(&path, &text).expect("write test config");
        let config = mailtls::config::parse(&path, &text).expect("test config");
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let server = Server::bind(config).expect("proxy starts");
        let addrs = server.local_addrs();
        let metrics = server.metrics();
        let (control, rx) = mpsc::channel(4);
        let task = tokio::spawn(server.run(rx));
        Proxy { addrs, metrics, control, task, certs }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a).expect("listener exists")
    }

    /// A plain TCP connection to a listener.
    pub async fn tcp(&self, name: &str) -> Conn<TcpStream> {
        Conn::new(TcpStream::connect(self.addr(name)).await.expect("connect to proxy"))
    }

    /// A TLS connection to an implicit-TLS listener.
    pub async fn tls(&self, name: &str) -> Conn<TlsClient> {
        let tcp = TcpStream::connect(self.addr(name)).await.expect("connect to proxy");
        Conn::new(tls_handshake(tcp, &self.certs).await.expect("TLS handshake"))
    }

    pub async fn stop(self) {
        let _ = self.control.send(Control::Stop).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

pub type TlsClient = tokio_rustls::client::TlsStream<TcpStream>;

pub fn client_config(certs: &Certs) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

pub async fn tls_handshake(tcp: TcpStream, certs: &Certs) -> std::io::Result<TlsClient> {
    tls_handshake_sni(tcp, certs, "localhost").await
}

pub async fn tls_handshake_sni(tcp: TcpStream, certs: &Certs, sni: &str) -> std::io::Result<TlsClient> {
    let connector = tokio_rustls::TlsConnector::from(client_config(certs));
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("handshake timed out")))
}

/// A client connection that reads by lines, with a deadline on every read.
pub struct Conn<S> {
    pub stream: S,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S) -> Self {
        Conn { stream, buf: BytesMut::new() }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).await.expect("write to proxy");
        self.stream.flush().await.expect("flush to proxy");
    }

    /// The next line, terminator included; panics after PATIENCE or at EOF.
    pub async fn line(&mut self) -> String {
        match self.try_line(PATIENCE).await {
            Some(l) => l,
            None => panic!("no line within {PATIENCE:?}; buffered: {:?}", String::from_utf8_lossy(&self.buf)),
        }
    }

    /// The next line, or None on timeout / EOF / error.
    pub async fn try_line(&mut self, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(lf) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(lf + 1);
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            self.buf.reserve(4096);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Lines up to and including the first for which `last` is true.
    pub async fn lines_until(&mut self, last: impl Fn(&str) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.line().await;
            let done = last(&l);
            out.push(l);
            if done {
                return out;
            }
        }
    }

    /// A whole SMTP reply (multi-line included).
    pub async fn smtp_reply(&mut self) -> Vec<String> {
        self.lines_until(|l| l.len() < 4 || l.as_bytes()[3] != b'-').await
    }

    /// Asserts nothing arrives for `quiet`, and returns what did arrive if something did.
    pub async fn silent_for(&mut self, quiet: Duration) -> Option<String> {
        if !self.buf.is_empty() {
            return Some(String::from_utf8_lossy(&self.buf).into_owned());
        }
        self.buf.reserve(4096);
        match tokio::time::timeout(quiet, self.stream.read_buf(&mut self.buf)).await {
            Err(_) => None,
            Ok(Ok(0)) => Some("<EOF>".to_owned()),
            Ok(Err(e)) => Some(format!("<error {e}>")),
            Ok(Ok(_)) => Some(String::from_utf8_lossy(&self.buf).into_owned()),
        }
    }

    /// True when the peer closes (EOF or reset) within `within`, discarding data.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.buf.clear();
            self.buf.reserve(4096);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Everything until EOF (or PATIENCE), as text.
    pub async fn rest(&mut self) -> String {
        let mut out = std::mem::take(&mut self.buf).to_vec();
        let _ = tokio::time::timeout(PATIENCE, self.stream.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The stream, for a TLS upgrade; nothing may be left unread.
    pub fn into_inner(self) -> S {
        assert!(self.buf.is_empty(), "unread bytes before TLS: {:?}", String::from_utf8_lossy(&self.buf));
        self.stream
    }
}

impl Conn<TcpStream> {
    /// Upgrades after the proxy's go-ahead to STARTTLS.
    pub async fn upgrade(self, certs: &Certs) -> Conn<TlsClient> {
        let tcp = self.into_inner();
        Conn::new(tls_handshake(tcp, certs).await.expect("TLS handshake after STARTTLS"))
    }

    /// Tries to upgrade; the handshake's error if it fails.
    pub async fn try_upgrade(self, certs: &Certs) -> std::io::Result<Conn<TlsClient>> {
        let tcp = self.into_inner();
        tls_handshake(tcp, certs).await.map(Conn::new)
    }
}

/// Waits until `cond` holds, checking every 20 ms, for at most PATIENCE.
pub async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// A connected loopback TCP pair with Nagle off: the two ends of one connection.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}
