//! The process's listeners: binding (socket2), one accept loop each, and the life of the
//! whole server: certificate reload on demand, graceful stop with a bounded drain.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::backend;
use crate::config::{Config, ListenerConfig};
use crate::metrics::Metrics;
use crate::protocol::smtp::{Probe, ProbeStep, PROBE_QUIT};
use crate::protocol::{Protocol, Settings};
use crate::relay;
use crate::session::{self, ListenerContext, Shutdown};
use crate::tls::{self, Certificates};

/// How often an opportunistic SMTP listener re-learns its backend's EHLO extensions.
const PROBE_EVERY: Duration = Duration::from_secs(60);
/// How soon to retry a probe that failed (backend down at start-up, say).
const PROBE_RETRY: Duration = Duration::from_secs(5);
/// Pending connections the kernel may queue per listening socket.
const BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("listener {listener:?}: cannot listen on {addr}: {source}")]
    Bind { listener: String, addr: SocketAddr, source: std::io::Error },
}

/// Requests from the outside world (signals) to the running server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Reload certificates (SIGHUP).
    Reload,
    /// Stop accepting, drain, exit (SIGTERM / SIGINT).
    Stop,
}

/// A server with every listener bound and every certificate loaded, not yet accepting.
pub struct Server {
    config: Config,
    certificates: Arc<Certificates>,
    metrics: Arc<Metrics>,
    listeners: Vec<(Arc<ListenerContext>, Vec<TcpListener>)>,
}

impl Server {
    /// Loads certificates and binds every listener; must run inside the tokio runtime.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::default());
        let certificates = Arc::new(Certificates::load(&config, metrics.clone())?);
        let acceptor = TlsAcceptor::from(tls::server_config(&config, certificates.store())?);
        let engines = relay::Engines::detect(config.relay, config.timeouts.idle, metrics.clone());
        tracing::info!("{}", engines.describe());
        let mut listeners = Vec::new();
        for lc in &config.listeners {
            let ctx = Arc::new(listener_context(&config, lc, acceptor.clone(), engines.clone()));
            let sockets = lc
                .listen
                .iter()
                .map(|&addr| {
                    bind_socket(addr).map_err(|source| StartError::Bind {
                        listener: lc.name.clone(),
                        addr,
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            listeners.push((ctx, sockets));
        }
        Ok(Server { config, certificates, metrics, listeners })
    }

    /// The addresses actually bound (useful with port 0), per listener name.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .flat_map(|(ctx, socks)| {
                socks.iter().filter_map(|s| s.local_addr().ok()).map(|a| (ctx.name.clone(), a))
            })
            .collect()
    }

    /// Reloads certificates when their directories change, unless `tls.watch = false`.
    fn watch_certificates(&self) -> Option<tls::watch::Watch> {
        if !self.config.tls.watch {
            return None;
        }
        let certificates = self.certificates.clone();
        let on_change = move || {
            certificates.reload("file change");
        };
        match tls::watch::spawn(&self.certificates.directories(), on_change) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("certificate files are not watched (reload with SIGHUP): {e}");
                None
            }
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Accepts until told to stop, then drains open sessions for at most the drain time.
    pub async fn run(self, mut control: tokio::sync::mpsc::Receiver<Control>) {
        let stop = Shutdown::default();
        let sessions = TaskTracker::new();
        let _watch = self.watch_certificates();
        let mut loops = Vec::new();
        for (ctx, sockets) in self.listeners {
            if ctx.protocol == Protocol::Smtp && !ctx.settings.require_tls {
                tokio::spawn(probe_loop(ctx.clone(), self.config.hostname.clone(), stop.clone()));
            }
            for socket in sockets {
                if let Ok(addr) = socket.local_addr() {
                    tracing::info!(listener = %ctx.name, %addr, protocol = ctx.protocol.name(), "listening");
                }
                loops.push(tokio::spawn(accept_loop(socket, ctx.clone(), stop.clone(), sessions.clone())));
            }
        }
        while let Some(request) = control.recv().await {
            match request {
                Control::Reload => {
                    self.certificates.reload("SIGHUP");
                }
                Control::Stop => break,
            }
        }
        tracing::info!(open = sessions.len(), drain = ?self.config.timeouts.drain, "stopping: no new connections");
        stop.graceful.cancel();
        for l in loops {
            let _ = l.await;
        }
        sessions.close();
        if tokio::time::timeout(self.config.timeouts.drain, sessions.wait()).await.is_err() {
            tracing::warn!(open = sessions.len(), "drain time over: closing the remaining sessions");
            stop.hard.cancel();
            sessions.wait().await;
        }
        tracing::info!("stopped");
    }
}

fn listener_context(
    config: &Config,
    lc: &ListenerConfig,
    acceptor: TlsAcceptor,
    engines: relay::Engines,
) -> ListenerContext {
    let settings = Settings {
        hostname: config.hostname.clone(),
        require_tls: lc.require_tls,
        max_pre_tls_line: match lc.protocol {
            // RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
            Protocol::Smtp => 512,
            Protocol::Imap => 1024,
            Protocol::Pop3 => 512,
        },
        max_line: config.limits.max_line,
        max_pre_tls_commands: config.limits.max_pre_tls_commands,
        max_errors: config.limits.max_errors,
        max_literal: config.limits.max_literal,
        backend_extensions: Arc::from(Vec::new()),
    };
    ListenerContext {
        name: lc.name.clone(),
        protocol: lc.protocol,
        tls_mode: lc.tls,
        proxy_protocol: lc.proxy_protocol,
        backend: lc.backend.clone(),
        settings,
        backend_extensions: Mutex::new(Arc::from(Vec::new())),
        acceptor,
        timeouts: config.timeouts,
        metrics: engines.metrics(),
        engines,
    }
}

/// Binds with SO_REUSEADDR (restarts must not wait out TIME_WAIT) and IPV6_V6ONLY on v6
/// addresses, so "0.0.0.0:993" and "[::]:993" can both be listed.
fn bind_socket(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(socket: TcpListener, ctx: Arc<ListenerContext>, stop: Shutdown, sessions: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            () = stop.graceful.cancelled() => return,
        };
        match accepted {
            Ok((stream, client)) => {
                Metrics::add(&ctx.metrics.connections_accepted);
                sessions.spawn(session::serve(stream, client, ctx.clone(), stop.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::error!(listener = %ctx.name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Keeps an opportunistic listener's view of the backend's EHLO extensions current, so the
/// pre-TLS EHLO reply shows what the backend really offers rather than a static list.
async fn probe_loop(ctx: Arc<ListenerContext>, hostname: String, stop: Shutdown) {
    loop {
        let wait = match probe_once(&ctx, &hostname).await {
            Ok(extensions) => {
                tracing::debug!(listener = %ctx.name, ?extensions, "learned backend EHLO extensions");
                if let Ok(mut current) = ctx.backend_extensions.lock() {
                    *current = Arc::from(extensions);
                }
                PROBE_EVERY
            }
            Err(reason) => {
                tracing::warn!(listener = %ctx.name, backend = %ctx.backend, "EHLO probe failed: {reason}");
                PROBE_RETRY
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.graceful.cancelled() => return,
        }
    }
}

async fn probe_once(ctx: &ListenerContext, hostname: &str) -> Result<Vec<String>, String> {
    let header = backend::local_header(ctx.proxy_protocol);
    let timeout = ctx.timeouts.backend_connect;
    let mut stream =
        backend::connect(&ctx.backend, header.as_deref(), timeout).await.map_err(|e| e.to_string())?;
    let mut probe = Probe::new(hostname);
    let mut buf = BytesMut::with_capacity(4096);
    let exchange = async {
        loop {
            while let Some(step) = probe.on_backend(&mut buf) {
                match step {
                    ProbeStep::Send(bytes) => stream.write_all(&bytes).await.map_err(|e| e.to_string())?,
                    ProbeStep::Done(extensions) => {
                        let _ = stream.write_all(PROBE_QUIT).await;
                        return Ok(extensions);
                    }
                    ProbeStep::Failed(reason) => return Err(reason),
                }
            }
            if buf.len() > 64 * 1024 {
                return Err("EHLO reply too large".to_owned());
            }
            buf.reserve(4096);
            match stream.read_buf(&mut buf).await {
                Ok(0) => return Err("backend closed the connection".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| "no EHLO reply in time".to_owned())?
}
