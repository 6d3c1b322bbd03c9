//! The listeners (bound with socket2 or inherited from systemd) with their limited accept
//! loops, and the server's life: config reload, notifications, graceful bounded stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Health};
use crate::config::{self, Config, ConfigError, ListenerConfig, Origin, TlsMode};
use crate::inbound::{self, Ends};
use crate::limits::{Limiter, ListenerSlot};
use crate::metrics::{Limit, Metrics};
use crate::probe;
use crate::protocol::{self, Farewell, Protocol, Settings};
use crate::relay;
use crate::routes::{self, RouteTable, RoutesError};
use crate::session::{self, ListenerContext, Shutdown};
use crate::systemd::{self, Inherited, SystemdError};
use crate::tls::{self, Certificates};

/// Pending connections the kernel may queue per listening socket.
const BACKLOG: i32 = 1024;
/// Refusals in progress at once; past this a refused connection is just closed, so a
/// flood cannot turn the refusals themselves into the load the limits exist to prevent.
const MAX_REFUSALS: usize = 64;
/// Longest a refusal may take (handshake included on implicit-TLS listeners).
const REFUSAL_DEADLINE: Duration = Duration::from_secs(3);
/// How often the systemd STATUS line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    #[error("listener {listener:?}: cannot listen on {addr}: {source}")]
    Bind { listener: String, addr: SocketAddr, source: std::io::Error },
    #[error("listener {listener:?}: cannot use the socket systemd passed: {source}")]
    Inherited { listener: String, source: std::io::Error },
    #[error(
        "systemd passed sockets named {names:?} but no listener has that name \
         (FileDescriptorName= must match a [[listeners]] name, or \"admin\")"
    )]
    Unclaimed { names: Vec<String> },
    #[error("admin.listen: cannot listen on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("{origin}: {source}")]
    Routes { origin: Origin, source: Box<RoutesError> },
}

/// Why a reload was refused; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{origin}: {source}")]
    Routes { origin: Origin, source: Box<RoutesError> },
    #[error("reading the routes files was interrupted: {0}")]
    Interrupted(String),
}

/// Requests from the outside world (signals) to the running server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Re-read the config file: certificates, backends, limits (SIGHUP, systemd reload).
    Reload,
    /// Stop accepting, drain, exit (SIGTERM / SIGINT).
    Stop,
}

/// One configured listener: its sockets and the context new sessions get, swapped whole
/// by a reload while sessions already open keep the one they started with.
struct Listener {
    /// The listener as started: its socket role (addresses, protocol, TLS mode) is fixed.
    config: ListenerConfig,
    current: Arc<ArcSwap<ListenerContext>>,
    sockets: Vec<TcpListener>,
    /// Wakes the capability probe when a reload changed the backend.
    reprobe: Arc<Notify>,
    /// The routes of a routed listener, reloaded in place when the file changes.
    routes: Option<Arc<RouteTable>>,
}

/// What every accept loop shares.
struct Shared {
    limiter: Arc<Limiter>,
    refusals: Arc<Semaphore>,
}

/// What the systemd STATUS line is made of.
struct Status {
    listeners: Vec<String>,
    certificates: Arc<Certificates>,
    limiter: Arc<Limiter>,
    last_reload_error: Mutex<Option<String>>,
}

/// A server with every listener bound and every certificate loaded, not yet accepting.
pub struct Server {
    config: Config,
    certificates: Arc<Certificates>,
    resumption: tls::Resumption,
    /// The relay engines, probed once at start-up; `relay` changes need a restart.
    engines: relay::Engines,
    metrics: Arc<Metrics>,
    limiter: Arc<Limiter>,
    listeners: Vec<Listener>,
    admin: Option<TcpListener>,
    health: Arc<Health>,
}

impl Server {
    /// Loads certificates and binds every listener; must run inside the tokio runtime.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        Server::bind_with(config, Inherited::none())
    }

    /// Like [`Server::bind`], adopting systemd's sockets for the listeners they are named
    /// after; the others bind their `listen` addresses.
    pub fn bind_with(config: Config, mut inherited: Inherited) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let certificates = Arc::new(Certificates::load(&config, metrics.clone())?);
        let resumption = tls::Resumption::new(&config.tls, metrics.clone())?;
        let acceptor = TlsAcceptor::from(tls::server_config(&config, certificates.store(), &resumption)?);
        let engines = relay::Engines::detect(config.relay, config.timeouts.idle, metrics.clone());
        tracing::info!("{}", engines.describe());
        let mut listeners = Vec::new();
        for lc in &config.listeners {
            let extensions = Arc::new(Mutex::new(Arc::from(Vec::new())));
            let routes = match &lc.routes {
                None => None,
                Some(r) => Some(Arc::new(RouteTable::load(&r.path, metrics.clone()).map_err(|source| {
                    StartError::Routes { origin: r.origin.clone(), source: Box::new(source) }
                })?)),
            };
            let ctx = listener_context(
                &config,
                lc,
                acceptor.clone(),
                metrics.clone(),
                extensions,
                routes.clone(),
                engines.clone(),
            );
            let sockets = sockets_for(lc, inherited.take(&lc.name))?;
            listeners.push(Listener {
                config: lc.clone(),
                current: Arc::new(ArcSwap::from_pointee(ctx)),
                sockets,
                reprobe: Arc::new(Notify::new()),
                routes,
            });
        }
        let admin = admin_socket(&config, inherited.take(systemd::ADMIN_SOCKET_NAME))?;
        let unclaimed = inherited.names();
        if !unclaimed.is_empty() {
            return Err(StartError::Unclaimed { names: unclaimed });
        }
        let limiter = Limiter::new(config.limits);
        let health = Arc::new(Health::default());
        Ok(Server { config, certificates, resumption, engines, metrics, limiter, listeners, admin, health })
    }

    /// The addresses actually bound (useful with port 0), per listener name.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .flat_map(|l| {
                l.sockets.iter().filter_map(|s| s.local_addr().ok()).map(|a| (l.config.name.clone(), a))
            })
            .collect()
    }

    /// The admin endpoint's address, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Reloads certificates when their directories change, unless `tls.watch = false`.
    fn watch_certificates(&self) -> Option<crate::watch::Watch> {
        if !self.config.tls.watch {
            return None;
        }
        let certificates = self.certificates.clone();
        let on_change = move || {
            certificates.reload("file change");
        };
        match crate::watch::spawn(&self.certificates.files(), "certificate", on_change) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("certificate files are not watched (reload with SIGHUP): {e}");
                None
            }
        }
    }

    /// Reloads the shared ticket key file when its directory changes, unless
    /// `tls.watch = false` (SIGHUP always works).
    fn watch_ticket_keys(&self) -> Option<crate::watch::Watch> {
        let ticketer = self.resumption.shared_ticketer()?;
        if !self.config.tls.watch {
            return None;
        }
        let files = vec![ticketer.path.clone()];
        let on_change = move || {
            ticketer.reload("file change");
        };
        match crate::watch::spawn(&files, "ticket key", on_change) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("the ticket key file is not watched (reload with SIGHUP): {e}");
                None
            }
        }
    }

    /// Reloads every routes file when a directory holding one changes (each map all or
    /// nothing; a bad one is refused and the map in service stays).
    fn watch_routes(&self) -> Option<crate::watch::Watch> {
        let tables: Vec<Arc<RouteTable>> = self.listeners.iter().filter_map(|l| l.routes.clone()).collect();
        if tables.is_empty() {
            return None;
        }
        let files: Vec<PathBuf> = tables.iter().map(|t| t.path.clone()).collect();
        let runtime = tokio::runtime::Handle::current();
        let on_change = move || {
            let tables = tables.clone();
            // A million-address map takes a while to read: never on the runtime's threads,
            // where sessions are served.
            runtime.spawn_blocking(move || {
                for table in &tables {
                    table.reload("file change");
                }
            });
        };
        match crate::watch::spawn(&files, "routes", on_change) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("routes files are not watched (reload with SIGHUP): {e}");
                None
            }
        }
    }

    /// Accepts until told to stop, then drains open sessions for at most the drain time.
    pub async fn run(mut self, mut control: tokio::sync::mpsc::Receiver<Control>) {
        let stop = Shutdown::default();
        let sessions = TaskTracker::new();
        let mut watch = self.watch_certificates();
        let mut route_watch = self.watch_routes();
        let mut ticket_watch = self.watch_ticket_keys();
        let loops = self.start_listeners(&stop, &sessions);
        // Serving from here on (the accept loops run); said before the admin endpoint starts,
        // or a health check could be answered "not serving" by a process that is.
        self.health.set_serving(true);
        if let Some(socket) = self.admin.take() {
            tokio::spawn(admin::serve(
                socket,
                self.metrics.clone(),
                self.health.clone(),
                stop.graceful.clone(),
            ));
        }
        let status = Arc::new(Status {
            listeners: self.listeners.iter().map(|l| l.config.name.clone()).collect(),
            certificates: self.certificates.clone(),
            limiter: self.limiter.clone(),
            last_reload_error: Mutex::new(None),
        });
        spawn_status_and_watchdog(status.clone(), stop.graceful.clone());
        systemd::ready(&status.line());
        while let Some(request) = control.recv().await {
            match request {
                Control::Reload => {
                    systemd::reloading();
                    if self.reload_config(&status).await {
                        // The certificate and routes files may live elsewhere now.
                        drop(watch.take());
                        watch = self.watch_certificates();
                        drop(route_watch.take());
                        route_watch = self.watch_routes();
                        drop(ticket_watch.take());
                        ticket_watch = self.watch_ticket_keys();
                    }
                    systemd::ready(&status.line());
                }
                Control::Stop => break,
            }
        }
        self.health.set_serving(false);
        if !self.config.timeouts.health_grace.is_zero() {
            // Still accepting (and answering /healthz with 503) until balancers have noticed;
            // a second stop request (an impatient Ctrl-C) ends the grace.
            tracing::info!(grace = ?self.config.timeouts.health_grace, "stopping: health check says not serving");
            tokio::select! {
                () = tokio::time::sleep(self.config.timeouts.health_grace) => {}
                Some(Control::Stop) = control.recv() => tracing::info!("second stop request: grace ended"),
            }
        }
        let open = sessions.len();
        systemd::stopping(&format!("stopping: draining {open} sessions"));
        tracing::info!(open, drain = ?self.config.timeouts.drain, "stopping: no new connections");
        drop(watch);
        drop(route_watch);
        drop(ticket_watch);
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

    fn start_listeners(
        &mut self,
        stop: &Shutdown,
        sessions: &TaskTracker,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let shared = Arc::new(Shared {
            limiter: self.limiter.clone(),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
        });
        let mut loops = Vec::new();
        for l in &mut self.listeners {
            // Every listener gets one: a reload may turn routing (or opportunistic SMTP) on.
            tokio::spawn(probe::run(l.current.clone(), l.reprobe.clone(), stop.clone()));
            for socket in std::mem::take(&mut l.sockets) {
                if let Ok(addr) = socket.local_addr() {
                    tracing::info!(listener = %l.config.name, %addr, protocol = l.config.protocol.name(), "listening");
                }
                let (current, shared, stop) = (l.current.clone(), shared.clone(), stop.clone());
                loops.push(tokio::spawn(accept_loop(socket, current, shared, stop, sessions.clone())));
            }
        }
        loops
    }

    /// Re-reads the config file and applies what can change for new sessions. Returns
    /// whether the new config was taken.
    async fn reload_config(&mut self, status: &Status) -> bool {
        match self.try_reload().await {
            Ok(()) => {
                self.metrics.config_reload(true);
                set_reload_error(status, None);
                true
            }
            Err(e) => {
                self.metrics.config_reload(false);
                tracing::error!("configuration reload refused, the running configuration stays: {e}");
                set_reload_error(status, Some(format!("last reload refused: {e}")));
                false
            }
        }
    }

    /// Everything is loaded and checked before anything is swapped: a reload applies
    /// whole or not at all.
    async fn try_reload(&mut self) -> Result<(), ReloadError> {
        let new = config::load(&self.config.path)?;
        let certs = tls::load_certificates(&new, tls::SelfSigned::Create)
            .inspect_err(|_| self.certificates.refused())?;
        let resumption = self.resumption.for_config(&new.tls, self.metrics.clone())?;
        let ticket_keys = reread_ticket_keys(&new, &resumption)?;
        let acceptor = TlsAcceptor::from(tls::server_config(&new, self.certificates.store(), &resumption)?);
        let wanted: Vec<WantedMap> = self
            .listeners
            .iter()
            .filter_map(|l| {
                let lc = new.listeners.iter().find(|n| n.name == l.config.name)?;
                let r = lc.routes.clone()?;
                let same = l.routes.clone().filter(|t| t.path == r.path);
                Some((lc.name.clone(), r, same))
            })
            .collect();
        let mut maps = load_route_maps(wanted).await.inspect_err(|_| self.metrics.route_reload(false))?;
        for change in restart_needed(&self.config, &new) {
            tracing::warn!("configuration reload: {change} needs a restart; ignored until then");
        }
        self.certificates.adopt(&new, certs);
        self.resumption = resumption;
        if let Some((ticketer, keys)) = ticket_keys {
            ticketer.adopt(keys, "SIGHUP");
        }
        self.limiter.set_limits(new.limits);
        for l in &mut self.listeners {
            let Some(lc) = new.listeners.iter().find(|n| n.name == l.config.name) else { continue };
            let map = maps.iter().position(|(name, ..)| *name == l.config.name).map(|i| maps.swap_remove(i));
            l.routes = match (map, l.routes.take()) {
                (None, _) => None,
                // The same file: the table in service takes the new map, watchers and all.
                (Some((_, path, map)), Some(table)) if table.path == path => {
                    table.adopt(map, "SIGHUP");
                    Some(table)
                }
                (Some((_, path, map)), _) => {
                    Some(Arc::new(RouteTable::with(&path, map, self.metrics.clone())))
                }
            };
            let old = l.current.load();
            let effective = ListenerConfig {
                listen: l.config.listen.clone(),
                protocol: l.config.protocol,
                tls: l.config.tls,
                require_tls: l.config.require_tls,
                ..lc.clone()
            };
            let ctx = listener_context(
                &new,
                &effective,
                acceptor.clone(),
                self.metrics.clone(),
                old.backend_extensions.clone(),
                l.routes.clone(),
                self.engines.clone(),
            );
            if ctx.choose_backend(None).0 != old.choose_backend(None).0
                || ctx.routes.is_some() != old.routes.is_some()
            {
                l.reprobe.notify_one();
            }
            l.current.store(Arc::new(ctx));
        }
        tracing::info!(config = %new.path.display(), "configuration reloaded: new sessions use it");
        self.config = new;
        Ok(())
    }
}

/// A listener's routes file to read for a reload, with the table in service when it is the
/// same file (whose watcher reloads must not run at the same time).
type WantedMap = (String, config::RoutesConfig, Option<Arc<RouteTable>>);

/// Reads the routes files of a reload on a blocking thread (a million-address map takes a
/// while; sessions go on being served meanwhile), never while a watcher reload of the same
/// table runs, so each map has at most one new copy beside it. All of them or an error.
async fn load_route_maps(
    wanted: Vec<WantedMap>,
) -> Result<Vec<(String, std::path::PathBuf, routes::Routes)>, ReloadError> {
    let loaded = tokio::task::spawn_blocking(move || {
        let mut maps = Vec::new();
        for (name, r, table) in wanted {
            let map = match &table {
                Some(t) => t.load_exclusive(),
                None => routes::load(&r.path),
            };
            let map = map.map_err(|source| ReloadError::Routes {
                origin: r.origin.clone(),
                source: Box::new(source),
            })?;
            maps.push((name, r.path, map));
        }
        Ok(maps)
    })
    .await;
    loaded.unwrap_or_else(|e| Err(ReloadError::Interrupted(e.to_string())))
}

/// The shared ticket key file read again (SIGHUP is how a rotation is applied where the
/// watcher is off), checked before anything is swapped; a bad file refuses the reload.
fn reread_ticket_keys(
    new: &Config,
    resumption: &tls::Resumption,
) -> Result<Option<(Arc<tls::SharedTicketer>, tls::tickets::KeySet)>, ReloadError> {
    let (Some(ticketer), Some(k)) = (resumption.shared_ticketer(), &new.tls.ticket_keys) else {
        return Ok(None);
    };
    match tls::tickets::load(&ticketer.path) {
        Ok(keys) => Ok(Some((ticketer, keys))),
        Err(source) => {
            ticketer.refused();
            Err(tls::TlsError::TicketKeys { origin: k.origin.clone(), source }.into())
        }
    }
}

fn set_reload_error(status: &Status, error: Option<String>) {
    if let Ok(mut slot) = status.last_reload_error.lock() {
        *slot = error;
    }
}

/// What differs between `old` and `new` that only a restart can apply.
fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for l in &old.listeners {
        match new.listeners.iter().find(|n| n.name == l.name) {
            None => out.push(format!("removing listener {:?}", l.name)),
            Some(n) => {
                if n.listen != l.listen {
                    out.push(format!("listeners {:?}: a new listen address", l.name));
                }
                if n.protocol != l.protocol || n.tls != l.tls || n.require_tls != l.require_tls {
                    out.push(format!("listeners {:?}: a new protocol, tls or require_tls", l.name));
                }
            }
        }
    }
    for n in &new.listeners {
        if !old.listeners.iter().any(|l| l.name == n.name) {
            out.push(format!("adding listener {:?}", n.name));
        }
    }
    if old.relay != new.relay {
        out.push("a new relay mode".to_owned());
    }
    if old.admin != new.admin {
        out.push("a new admin.listen".to_owned());
    }
    if old.log_format != new.log_format || old.log_level != new.log_level {
        out.push("a new log_format or log_level".to_owned());
    }
    out
}

impl Status {
    /// What an admin wants at a glance in `systemctl status`.
    fn line(&self) -> String {
        let certs = self.certificates.store().current();
        let expiry = certs.iter().min_by_key(|c| c.not_after).map_or_else(String::new, |c| {
            format!(
                "; soonest certificate expiry {} ({} days)",
                c.not_after_date,
                c.days_left(tls::load::now())
            )
        });
        let reload = match self.last_reload_error.lock() {
            Ok(slot) => slot.as_ref().map(|e| format!("; {e}")).unwrap_or_default(),
            Err(_) => String::new(),
        };
        format!(
            "{} listeners ({}); {} connections open{expiry}{reload}",
            self.listeners.len(),
            self.listeners.join(", "),
            self.limiter.open()
        )
    }
}

/// Keeps the STATUS line current and, when systemd set WatchdogSec, pings the watchdog.
/// Both run on the runtime, so a wedged runtime stops the pings and systemd restarts us.
fn spawn_status_and_watchdog(status: Arc<Status>, stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(STATUS_EVERY) => systemd::status(&status.line()),
                () = stop.cancelled() => return,
            }
        }
    });
    if let Some(every) = systemd::watchdog_interval() {
        tracing::info!(?every, "systemd watchdog enabled");
        // Pings go on while draining too: the drain is bounded by its own timer.
        tokio::spawn(async move {
            loop {
                systemd::watchdog();
                tokio::time::sleep(every).await;
            }
        });
    }
}

fn listener_context(
    config: &Config,
    lc: &ListenerConfig,
    acceptor: TlsAcceptor,
    metrics: Arc<Metrics>,
    backend_extensions: Arc<Mutex<Arc<[String]>>>,
    routes: Option<Arc<RouteTable>>,
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
        xclient: lc.xclient,
        client: None,
        bare_newline: lc.bare_newline,
    };
    ListenerContext {
        name: lc.name.clone(),
        protocol: lc.protocol,
        tls_mode: lc.tls,
        proxy_protocol: lc.proxy_protocol,
        proxy_tlvs: lc.proxy_tlvs,
        backend: lc.backend.clone().unwrap_or_default(),
        routes,
        settings,
        backend_extensions,
        acceptor,
        timeouts: config.timeouts,
        metrics,
        max_connections: lc.max_connections,
        accept_proxy_protocol: lc.accept_proxy_protocol.clone(),
        engines,
    }
}

/// The listener's inherited sockets if systemd passed any under its name (its `listen`
/// addresses are then systemd's business), else its own bound ones.
fn sockets_for(
    lc: &ListenerConfig,
    inherited: Vec<std::net::TcpListener>,
) -> Result<Vec<TcpListener>, StartError> {
    if !inherited.is_empty() {
        tracing::info!(listener = %lc.name, sockets = inherited.len(), "using sockets passed by systemd");
        return inherited
            .into_iter()
            .map(|s| adopt(s).map_err(|source| StartError::Inherited { listener: lc.name.clone(), source }))
            .collect();
    }
    lc.listen
        .iter()
        .map(|&addr| {
            bind_socket(addr).map_err(|source| StartError::Bind { listener: lc.name.clone(), addr, source })
        })
        .collect()
}

fn admin_socket(
    config: &Config,
    mut inherited: Vec<std::net::TcpListener>,
) -> Result<Option<TcpListener>, StartError> {
    if let Some(socket) = inherited.pop() {
        let listener = systemd::ADMIN_SOCKET_NAME.to_owned();
        return adopt(socket).map(Some).map_err(|source| StartError::Inherited { listener, source });
    }
    let Some(admin) = &config.admin else { return Ok(None) };
    bind_socket(admin.listen).map(Some).map_err(|source| StartError::Admin { addr: admin.listen, source })
}

/// systemd hands sockets over blocking; tokio needs them non-blocking.
fn adopt(socket: std::net::TcpListener) -> std::io::Result<TcpListener> {
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket)
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

async fn accept_loop(
    socket: TcpListener,
    current: Arc<ArcSwap<ListenerContext>>,
    shared: Arc<Shared>,
    stop: Shutdown,
    sessions: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            () = stop.graceful.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let ctx = current.load_full();
                ctx.metrics.accepted(&ctx.name);
                match shared.limiter.admit_listener(&ctx.name, ctx.max_connections) {
                    Ok(slot) => {
                        let (shared, stop) = (shared.clone(), stop.clone());
                        sessions.spawn(connection(stream, peer, ctx, slot, shared, stop));
                    }
                    Err(limit) => refuse_later(stream, peer, ctx, limit, &shared),
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::error!(listener = %current.load().name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Counts a connection as open for exactly as long as this value lives.
struct Open(Arc<ListenerContext>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.metrics.closed(&self.0.name);
    }
}

/// One admitted connection: the inbound PROXY header (trusted sources), the per-address
/// limits against the real client, then the session.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerContext>,
    _slot: ListenerSlot,
    shared: Arc<Shared>,
    stop: Shutdown,
) {
    ctx.metrics.opened(&ctx.name);
    let _open = Open(ctx.clone());
    // Each phase is boxed: a task's future is as large as its largest state, and it is
    // held for the connection's whole life. Boxed, a session idling in the relay for hours
    // holds only the relay's state, not the handshake's or the refusal's.
    let Some(ends) = Box::pin(real_ends(&mut stream, peer, &ctx)).await else { return };
    let _address_slot = match shared.limiter.admit_address(ends.client.ip()) {
        Ok(slot) => slot,
        Err(limit) => {
            ctx.metrics.refused(&ctx.name, limit);
            log_refusal(&ctx, ends.client, limit);
            let _ = tokio::time::timeout(REFUSAL_DEADLINE, Box::pin(refuse(stream, &ctx))).await;
            return;
        }
    };
    Box::pin(session::serve(stream, ends, ctx, stop)).await;
}

/// The client's addresses: from the PROXY header when the source is a trusted balancer
/// (which must send one), else the socket's own. `None`: the header was bad; the
/// connection is over.
async fn real_ends(stream: &mut TcpStream, peer: SocketAddr, ctx: &ListenerContext) -> Option<Ends> {
    let local = stream.local_addr().ok()?;
    let socket_ends = Ends { client: peer, local };
    if !trusts(ctx, peer) {
        return Some(socket_ends);
    }
    match inbound::read_header(stream, ctx.timeouts.handshake).await {
        Ok(ends) => {
            ctx.metrics.proxy_header(&ctx.name, "ok");
            Some(ends.unwrap_or(socket_ends))
        }
        Err(e) => {
            ctx.metrics.proxy_header(&ctx.name, e.outcome());
            tracing::warn!(listener = %ctx.name, source = %peer, "inbound PROXY header refused: {e}");
            None
        }
    }
}

fn trusts(ctx: &ListenerContext, source: SocketAddr) -> bool {
    let source = config::canonical_ip(source.ip());
    ctx.accept_proxy_protocol.iter().any(|net| net.contains(&source))
}

fn log_refusal(ctx: &ListenerContext, client: SocketAddr, limit: Limit) {
    tracing::warn!(listener = %ctx.name, client = %client, limit = limit.name(), "connection refused: limit reached");
}

/// A refusal at the listener stage, off the accept loop and bounded in number.
fn refuse_later(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerContext>,
    limit: Limit,
    shared: &Shared,
) {
    ctx.metrics.refused(&ctx.name, limit);
    log_refusal(&ctx, peer, limit);
    let Ok(permit) = shared.refusals.clone().try_acquire_owned() else {
        return; // Too many refusals in flight: dropping the stream closes it.
    };
    tokio::spawn(async move {
        let mut stream = stream;
        let _ = tokio::time::timeout(REFUSAL_DEADLINE, async {
            if trusts(&ctx, peer) && inbound::read_header(&mut stream, REFUSAL_DEADLINE).await.is_err() {
                return;
            }
            refuse(stream, &ctx).await;
        })
        .await;
        drop(permit);
    });
}

/// Tells the client it was turned away, in its protocol's words. On a STARTTLS listener
/// that is the plaintext greeting slot. On an implicit-TLS listener plaintext would reach
/// a TLS client as garbage, so the handshake is completed (under the refusal deadline)
/// and the refusal sent inside TLS: the user's mail program then shows a readable "too
/// many connections" rather than a TLS error.
async fn refuse(stream: TcpStream, ctx: &ListenerContext) {
    let words = protocol::farewell(ctx.protocol, Farewell::TooManyConnections);
    match ctx.tls_mode {
        TlsMode::Starttls => say_and_close(stream, &words).await,
        TlsMode::Implicit => {
            if let Ok(tls) = ctx.acceptor.accept(stream).await {
                say_and_close(tls, &words).await;
            }
        }
    }
}

async fn say_and_close<S: tokio::io::AsyncWrite + Unpin>(mut stream: S, words: &[u8]) {
    let _ = stream.write_all(words).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}
