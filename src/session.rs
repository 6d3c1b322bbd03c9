//! One client connection from accept to close, as a fixed sequence of phases:
//! pre-TLS dialogue (STARTTLS listeners) -> handshake -> backend -> negotiation -> relay.
//!
//! The session knows no command names: the protocol state machines decide what bytes
//! mean, the session moves them, enforces time, and writes one log line at the end.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::backend::{self, BackendError, Peer};
use crate::config::{ProxyProtocol, ProxyTlvs, Timeouts, TlsMode};
use crate::inbound::Ends;
use crate::metrics::{Handshake, Metrics};
use crate::protocol::{
    self, ClientGuard, Destination, Entry, Farewell, Finding, Negotiation, Next, PreTlsStep, Protocol,
    Settings, Step,
};
use crate::relay::{self, ClientFilter, ClientLeg, Ending, Engine, Verdict};
use crate::routes::{RouteTable, Routes, Rule};
use crate::tls::prefixed::Prefixed;
use crate::tls::TlsFacts;

/// The first byte of a TLS handshake record; anything else behind STARTTLS is plaintext.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Read granularity while lines are being examined.
const READ_CHUNK: usize = 4096;

/// Everything a session needs to know about the listener that accepted it.
pub struct ListenerContext {
    pub name: String,
    pub protocol: Protocol,
    pub tls_mode: TlsMode,
    pub proxy_protocol: ProxyProtocol,
    /// The TLVs of this listener's v2 headers.
    pub proxy_tlvs: ProxyTlvs,
    /// The backend of an unrouted listener; empty on a routed one, where `routes` chooses.
    pub backend: String,
    /// The map of a routed listener (`routes = "PATH"`): per user on IMAP/POP3, per
    /// recipient on SMTP.
    pub routes: Option<Arc<RouteTable>>,
    pub settings: Settings,
    /// What was last learned from the backend (SMTP EHLO extensions on opportunistic
    /// listeners; the default backend's capabilities on routed ones); shared with the
    /// contexts that replace this one on reload, so nothing is learned twice.
    pub backend_extensions: Arc<Mutex<Arc<[String]>>>,
    pub acceptor: TlsAcceptor,
    pub timeouts: Timeouts,
    pub metrics: Arc<Metrics>,
    /// This listener's own bound on open connections.
    pub max_connections: Option<u32>,
    /// Sources that must open with an inbound PROXY header.
    pub accept_proxy_protocol: Vec<ipnet::IpNet>,
    /// The relay engines this process may use (probed once at start-up).
    pub engines: relay::Engines,
}

impl ListenerContext {
    /// The backend for a client that identified itself as `user` (routed listeners; the
    /// map in service at this moment decides), or the listener's one backend. With the rule
    /// that chose it, for logs and metrics.
    pub fn choose_backend(&self, user: Option<&str>) -> (String, Option<Rule>) {
        match &self.routes {
            Some(routes) => {
                let (backend, rule) = decide(&routes.current(), user);
                (backend, Some(rule))
            }
            None => (self.backend.clone(), None),
        }
    }

    /// The map a routed SMTP transaction keeps to its end, whatever reloads land meanwhile.
    fn transaction_map(&self) -> Option<Arc<Routes>> {
        self.routes.as_ref().map(|routes| routes.current())
    }

    fn session_settings(&self) -> Settings {
        let mut settings = self.settings.clone();
        if let Ok(ext) = self.backend_extensions.lock() {
            settings.backend_extensions = ext.clone();
        }
        settings
    }
}

/// The one routing decision of all three protocols: the backend for `key` (an IMAP/POP3
/// login name, an SMTP recipient; `None`: nobody named yet) and the rule that chose it.
pub fn decide(map: &Routes, key: Option<&str>) -> (String, Rule) {
    match key {
        Some(key) => {
            let (backend, rule) = map.route(key);
            (backend.to_owned(), rule)
        }
        None => (map.default.clone(), Rule::Default),
    }
}

/// The two stages of stopping: `graceful` ends sessions still in their dialogue (with the
/// protocol's farewell) and lets relays run; `hard` ends everything at the drain deadline.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    pub graceful: CancellationToken,
    pub hard: CancellationToken,
}

/// How a session ended, for the log line.
#[derive(Debug)]
enum Outcome {
    Relayed(Ending),
    /// The protocol closed it (QUIT/LOGOUT, a bound exceeded, a refused greeting).
    Closed,
    ClientGone,
    BackendClosed,
    HandshakeFailed(String),
    HandshakeTimeout,
    IdleTimeout,
    BackendUnavailable(String),
    ShuttingDown,
    Io(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Relayed(Ending::Closed) => f.write_str("relayed"),
            Outcome::Relayed(Ending::Idle) => f.write_str("relay idle timeout"),
            Outcome::Relayed(Ending::Failed) => f.write_str("relay failed"),
            Outcome::Relayed(Ending::Refused) => f.write_str("client input refused"),
            Outcome::Closed => f.write_str("closed by protocol"),
            Outcome::ClientGone => f.write_str("client closed"),
            Outcome::BackendClosed => f.write_str("backend closed"),
            Outcome::HandshakeFailed(e) => write!(f, "handshake failed: {e}"),
            Outcome::HandshakeTimeout => f.write_str("handshake timeout"),
            Outcome::IdleTimeout => f.write_str("idle timeout"),
            Outcome::BackendUnavailable(e) => write!(f, "backend unavailable: {e}"),
            Outcome::ShuttingDown => f.write_str("shutting down"),
            Outcome::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

impl From<std::io::Error> for Outcome {
    fn from(e: std::io::Error) -> Self {
        Outcome::Io(e.to_string())
    }
}

/// The facts gathered along the way, logged once when the connection ends.
struct Record {
    client: SocketAddr,
    started: Instant,
    tls: Option<TlsFacts>,
    engine: Option<Engine>,
    /// The backend last connected (routed listeners choose it per login).
    backend: Option<String>,
    /// mailtls's own end of that connection: what a backend that takes no PROXY header
    /// logs as its peer (Courier's `port=[N]`), so its lines can be joined to this one.
    backend_source: Option<SocketAddr>,
    /// The user a routed session was routed for (never any credential).
    user: Option<String>,
    /// The filter the relay passed the client's bytes through (SMTP: the smuggling guard).
    inspected: Option<&'static str>,
    /// A guard's finding was logged already: one warning per session is enough.
    finding_logged: bool,
    to_backend: u64,
    to_client: u64,
}

/// Serves one accepted connection to its end and logs it. `ends` are the client's real
/// addresses: the socket's, or those of a trusted inbound PROXY header.
pub async fn serve(stream: TcpStream, ends: Ends, ctx: Arc<ListenerContext>, stop: Shutdown) {
    let _ = stream.set_nodelay(true);
    let mut record = Record {
        client: ends.client,
        started: Instant::now(),
        tls: None,
        engine: None,
        backend: None,
        backend_source: None,
        user: None,
        inspected: None,
        finding_logged: false,
        to_backend: 0,
        to_client: 0,
    };
    let outcome = tokio::select! {
        outcome = run(stream, ends.local, &ctx, &mut record, &stop) => outcome,
        () = stop.hard.cancelled() => Outcome::ShuttingDown,
    };
    ctx.metrics.relayed(&ctx.name, record.to_backend, record.to_client);
    log_end(&ctx, &record, &outcome);
}

fn log_end(ctx: &ListenerContext, r: &Record, outcome: &Outcome) {
    let tls = r.tls.as_ref();
    tracing::info!(
        listener = %ctx.name,
        client = %r.client,
        sni = tls.and_then(|t| t.sni.as_deref()).unwrap_or("-"),
        tls_version = tls.map_or("none", |t| t.version),
        cipher = tls.map_or("none", |t| t.cipher.as_str()),
        engine = %r.engine.map_or("none".to_owned(), |e| e.to_string()),
        inspected = r.inspected.unwrap_or("-"),
        backend = r.backend.as_deref().unwrap_or("-"),
        backend_source = %r.backend_source.map_or("-".to_owned(), |a| a.to_string()),
        user = r.user.as_deref().unwrap_or("-"),
        bytes_in = r.to_backend,
        bytes_out = r.to_client,
        duration_ms = r.started.elapsed().as_millis() as u64,
        outcome = %outcome,
        "connection closed"
    );
}

async fn run(
    mut stream: TcpStream,
    local: SocketAddr,
    ctx: &ListenerContext,
    record: &mut Record,
    stop: &Shutdown,
) -> Outcome {
    let mut settings = ctx.session_settings();
    // XCLIENT (SMTP) names the client to the backend from inside the negotiation.
    settings.client = Some(record.client);
    let prefix = match ctx.tls_mode {
        TlsMode::Implicit => BytesMut::new(),
        TlsMode::Starttls => {
            match Box::pin(pre_tls(&mut stream, ctx, &settings, record.client, stop)).await {
                Ok(PreTlsEnd::StartTls(leftover)) => leftover,
                Ok(PreTlsEnd::Plaintext { replay, buffered }) => {
                    let peer = Peer { client: record.client, local, tls: None };
                    let entry = match ctx.routes {
                        Some(_) => Entry::Routed { greet: false, helo: Some(replay) },
                        None => Entry::Plaintext { replay },
                    };
                    return Box::pin(after_handshake(
                        stream, buffered, peer, entry, ctx, &settings, record, stop,
                    ))
                    .await;
                }
                Err(outcome) => return outcome,
            }
        }
    };
    let entry = match (ctx.tls_mode, &ctx.routes) {
        // No backend until the client says who it is; on implicit TLS mailtls greets.
        (mode, Some(_)) => Entry::Routed { greet: mode == TlsMode::Implicit, helo: None },
        (TlsMode::Implicit, None) => Entry::Implicit,
        (TlsMode::Starttls, None) => Entry::AfterStartTls,
    };
    // Boxed phases: see server::connection; only the live phase's state is allocated.
    let tls = match Box::pin(handshake(stream, prefix, ctx, record.client)).await {
        Ok(tls) => tls,
        Err(outcome) => {
            let counted = if matches!(outcome, Outcome::HandshakeTimeout) {
                Handshake::Timeout
            } else {
                Handshake::Failed
            };
            ctx.metrics.handshake(&ctx.name, counted);
            return outcome;
        }
    };
    let facts = TlsFacts::of(tls.get_ref().1);
    ctx.metrics.handshake(&ctx.name, Handshake::Ok(facts.version));
    record.tls = Some(facts.clone());
    let peer = Peer { client: record.client, local, tls: Some(facts) };
    Box::pin(after_handshake(tls, BytesMut::new(), peer, entry, ctx, &settings, record, stop)).await
}

// ---- phase 1: the dialogue before TLS --------------------------------------------------

enum PreTlsEnd {
    /// Bytes read behind the STARTTLS command: the first bytes of the handshake.
    StartTls(BytesMut),
    /// Opportunistic SMTP went on in plaintext; `buffered` starts with the MAIL command.
    Plaintext { replay: Vec<u8>, buffered: BytesMut },
}

async fn pre_tls(
    stream: &mut TcpStream,
    ctx: &ListenerContext,
    settings: &Settings,
    client: SocketAddr,
    stop: &Shutdown,
) -> Result<PreTlsEnd, Outcome> {
    let mut dialogue = protocol::pre_tls(ctx.protocol, settings);
    stream.write_all(&dialogue.greeting()).await?;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    // The clock restarts when a command completes, not when a byte arrives: a client that
    // drips bytes (slowloris) gets no more time for a line than one that sends nothing.
    let mut deadline = Instant::now() + ctx.timeouts.pre_auth_idle;
    loop {
        loop {
            let refused_before = dialogue.refused_logins();
            let Some(step) = dialogue.on_client(&mut buf) else { break };
            if dialogue.refused_logins() > refused_before {
                ctx.metrics.plaintext_login_refused(&ctx.name);
            }
            deadline = Instant::now() + ctx.timeouts.pre_auth_idle;
            match step {
                PreTlsStep::Reply(reply) => stream.write_all(&reply).await?,
                PreTlsStep::StartTls(reply) => {
                    stream.write_all(&reply).await?;
                    note_starttls(ctx, &buf, client);
                    return Ok(PreTlsEnd::StartTls(buf));
                }
                PreTlsStep::Close(reply) => {
                    stream.write_all(&reply).await?;
                    let _ = stream.shutdown().await;
                    return Err(Outcome::Closed);
                }
                PreTlsStep::Plaintext { replay } => {
                    return Ok(PreTlsEnd::Plaintext { replay, buffered: buf })
                }
            }
        }
        let read = tokio::select! {
            read = read_some(stream, &mut buf, settings.max_line) => read?,
            () = tokio::time::sleep_until(deadline) => {
                return Err(say_farewell(stream, ctx.protocol, Farewell::Timeout, Outcome::IdleTimeout).await);
            }
            () = stop.graceful.cancelled() => {
                return Err(say_farewell(stream, ctx.protocol, Farewell::ShuttingDown, Outcome::ShuttingDown).await);
            }
        };
        if read == 0 {
            return Err(Outcome::ClientGone);
        }
    }
}

/// Counts the upgrade, and logs and counts plaintext found behind the STARTTLS command.
fn note_starttls(ctx: &ListenerContext, behind: &[u8], client: SocketAddr) {
    ctx.metrics.starttls_upgrade(&ctx.name);
    if behind.first().is_some_and(|&b| b != TLS_HANDSHAKE_RECORD) {
        ctx.metrics.injection_attempt(&ctx.name);
        tracing::warn!(
            listener = %ctx.name,
            client = %client,
            bytes = behind.len(),
            "STARTTLS command injection attempt: plaintext followed the STARTTLS command; \
             it is fed to the TLS handshake, never executed"
        );
    }
}

/// Reads what is available, refusing to grow the buffer past what the protocol's own
/// bounds could need (the state machine reports an overlong line well before).
async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    bound: usize,
) -> std::io::Result<usize> {
    if buf.len() > bound + READ_CHUNK {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "peer outran the line bound"));
    }
    buf.reserve(READ_CHUNK);
    stream.read_buf(buf).await
}

async fn say_farewell<S: AsyncWrite + Unpin>(
    stream: &mut S,
    protocol: Protocol,
    why: Farewell,
    outcome: Outcome,
) -> Outcome {
    let _ = stream.write_all(&protocol::farewell(protocol, why)).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
    outcome
}

// ---- phase 2: the TLS handshake ----------------------------------------------------------

async fn handshake(
    stream: TcpStream,
    prefix: BytesMut,
    ctx: &ListenerContext,
    client: SocketAddr,
) -> Result<TlsStream<Prefixed<TcpStream>>, Outcome> {
    let counted = prefix.first().is_some_and(|&b| b != TLS_HANDSHAKE_RECORD);
    let accept = ctx.acceptor.accept(Prefixed::new(stream, prefix)).into_fallible();
    match tokio::time::timeout(ctx.timeouts.handshake, accept).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err((e, io))) => {
            let late_plaintext = io.first_byte().is_some_and(|b| b != TLS_HANDSHAKE_RECORD);
            if ctx.tls_mode == TlsMode::Starttls && late_plaintext && !counted {
                // Plaintext that arrived after the go-ahead (a second segment): the same
                // attack as bytes behind the command, and just as harmless here.
                ctx.metrics.injection_attempt(&ctx.name);
                tracing::warn!(
                    listener = %ctx.name,
                    client = %client,
                    "STARTTLS command injection attempt: plaintext sent after the STARTTLS go-ahead \
                     failed the handshake, never executed"
                );
            }
            Err(Outcome::HandshakeFailed(e.to_string()))
        }
        Err(_) => Err(Outcome::HandshakeTimeout),
    }
}

// ---- phases 3-5: backend, negotiation, relay ---------------------------------------------

#[allow(clippy::too_many_arguments)]
async fn after_handshake<C: ClientLeg>(
    mut client: C,
    mut client_buf: BytesMut,
    peer: Peer,
    entry: Entry,
    ctx: &ListenerContext,
    settings: &Settings,
    record: &mut Record,
    stop: &Shutdown,
) -> Outcome {
    // A guarded plaintext SMTP session stays in negotiation for whole mail transactions, so
    // it gets the session's idle time; everyone else must authenticate within the shorter one.
    // So does a routed SMTP session, which never leaves it.
    let silence = match entry {
        Entry::Plaintext { .. } => ctx.timeouts.idle,
        Entry::Routed { .. } if ctx.protocol == Protocol::Smtp => ctx.timeouts.idle,
        _ => ctx.timeouts.pre_auth_idle,
    };
    let mut negotiation = protocol::negotiation(ctx.protocol, settings, entry);
    let mut link = Link {
        client: &mut client,
        backend: None,
        backend_buf: BytesMut::new(),
        record: &mut *record,
        transaction: None,
    };
    let first = match negotiation.opening() {
        // A routed listener: no backend until the client has identified itself.
        Some(opening) => opening,
        None => match Box::pin(open_backend(ctx, &peer, None, negotiation.as_mut())).await {
            Ok(opened) => link.attach(opened),
            Err(e) => {
                note_unavailable(ctx, &peer, None, &e);
                // The connection's log line names the backend tried, not "-".
                link.record.backend = Some(e.0.clone());
                let outcome = Outcome::BackendUnavailable(e.1.to_string());
                return say_farewell(link.client, ctx.protocol, Farewell::BackendUnavailable, outcome).await;
            }
        },
    };
    let next = match link.apply(first).await {
        Ok(next) => next,
        Err(outcome) => return outcome,
    };
    let negotiating =
        link.negotiate(next, negotiation.as_mut(), &mut client_buf, ctx, &peer, settings, silence, stop);
    let next = match Box::pin(negotiating).await {
        Ok(next) => next,
        Err(outcome) => return outcome,
    };
    let Link { backend, backend_buf, .. } = link;
    let backend_name = record.backend.clone().unwrap_or_default();
    let backend = match (next, backend) {
        (Next::Relay, Some(backend)) => backend,
        (Next::Unavailable, _) => {
            // The client already has the protocol's "unavailable" reply (the step said so).
            let reason = format!("backend {backend_name} refused service or broke its protocol");
            ctx.metrics.backend_failure(&ctx.name);
            tracing::warn!(listener = %ctx.name, client = %peer.client, backend = %backend_name, "{reason}");
            let _ = client.shutdown().await;
            return Outcome::BackendUnavailable(reason);
        }
        (Next::Relay, None) => {
            // A state machine that says relay with no backend attached is a bug; end cleanly.
            tracing::error!(listener = %ctx.name, client = %peer.client, "negotiation ended with no backend");
            let _ = client.shutdown().await;
            return Outcome::Closed;
        }
        _ => {
            let _ = client.shutdown().await;
            return Outcome::Closed;
        }
    };
    // The negotiation's state (framers, pending replies) is of no use to a relay that may
    // idle for hours: free it first, keeping only the guard it hands on (a few bytes).
    let guard = negotiation.client_guard();
    drop(negotiation);
    let pending = relay::Pending::from_buffers(client_buf, backend_buf);
    let client_addr = record.client;
    let mut logged = record.finding_logged;
    let mut watched = guard.map(|guard| Watched { guard, ctx, client: client_addr, logged: &mut logged });
    record.inspected = watched.as_ref().map(|w| w.guard.name());
    let filter = watched.as_mut().map(|w| w as &mut dyn ClientFilter);
    let report =
        relay::run_filtered(client, backend, pending, &ctx.engines, &ctx.name, &mut record.engine, filter)
            .await;
    drop(watched);
    record.finding_logged = logged;
    record.to_backend += report.totals.client_to_backend;
    record.to_client += report.totals.backend_to_client;
    Outcome::Relayed(report.ending)
}

/// The protocol's client guard during the relay, watched by the session: whatever it
/// finds is counted, and logged once per session.
struct Watched<'a> {
    guard: Box<dyn ClientGuard>,
    ctx: &'a ListenerContext,
    client: SocketAddr,
    logged: &'a mut bool,
}

impl Watched<'_> {
    fn noted(&mut self, verdict: Verdict) -> Verdict {
        if let Some(finding) = self.guard.take_finding() {
            note_finding(self.ctx, self.client, finding, self.logged);
        }
        verdict
    }
}

impl ClientFilter for Watched<'_> {
    fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> Verdict {
        let verdict = self.guard.filter(input, out);
        self.noted(verdict)
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Verdict {
        let verdict = self.guard.finish(out);
        self.noted(verdict)
    }

    fn name(&self) -> &'static str {
        self.guard.name()
    }
}

/// Counts what a client guard normalized or refused, and warns once per session.
fn note_finding(ctx: &ListenerContext, client: SocketAddr, finding: Finding, logged: &mut bool) {
    ctx.metrics.client_guard(&ctx.name, finding.action.name(), finding.count);
    if !std::mem::replace(logged, true) {
        tracing::warn!(
            listener = %ctx.name,
            client = %client,
            found = finding.what,
            action = finding.action.name(),
            "{}: client input ({}) {} before it reached the backend",
            finding.about,
            finding.what,
            finding.action.name()
        );
    }
}

/// Why a backend could not serve a session.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error(transparent)]
    Connect(#[from] BackendError),
    #[error("backend {backend} refused service in its greeting")]
    Refused { backend: String },
    #[error("backend {backend} sent no greeting within {after:?}")]
    Silent { backend: String, after: Duration },
    #[error("reading the greeting of backend {backend}: {source}")]
    Read { backend: String, source: std::io::Error },
    #[error("backend {backend} closed before greeting")]
    Closed { backend: String },
}

/// A backend connected and greeted; `greeting` is the state machine's step for it.
struct Opened {
    backend: String,
    rule: Option<Rule>,
    stream: TcpStream,
    buf: BytesMut,
    greeting: Step,
}

/// Choose the backend (for `user` on a routed listener), connect, send the PROXY header,
/// consume the greeting: one unit, so it can run at whatever point a later phase decides
/// which backend to use.
async fn open_backend(
    ctx: &ListenerContext,
    peer: &Peer,
    user: Option<&str>,
    negotiation: &mut dyn Negotiation,
) -> Result<Opened, (String, OpenError)> {
    let (backend, rule) = ctx.choose_backend(user);
    connect_backend(ctx, peer, backend, rule, negotiation).await
}

/// Connects `backend` (chosen by `rule`), sends the PROXY header, consumes the greeting.
async fn connect_backend(
    ctx: &ListenerContext,
    peer: &Peer,
    backend: String,
    rule: Option<Rule>,
    negotiation: &mut dyn Negotiation,
) -> Result<Opened, (String, OpenError)> {
    let fail = |e: OpenError| (backend.clone(), e);
    let header = backend::proxy_header(ctx.proxy_protocol, ctx.proxy_tlvs, peer);
    let deadline = Instant::now() + ctx.timeouts.backend_connect;
    let mut stream = backend::connect(&backend, header.as_deref(), ctx.timeouts.backend_connect)
        .await
        .map_err(|e| fail(e.into()))?;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if let Some(greeting) = negotiation.on_greeting(&mut buf) {
            // A negative greeting is the backend refusing service, like a refused connect:
            // the caller answers the client with the protocol's "unavailable" reply.
            if greeting.next == Next::Unavailable {
                return Err(fail(OpenError::Refused { backend: backend.clone() }));
            }
            return Ok(Opened { backend, rule, stream, buf, greeting });
        }
        let read =
            tokio::time::timeout_at(deadline, read_some(&mut stream, &mut buf, ctx.settings.max_line)).await;
        match read {
            Err(_) => {
                let after = ctx.timeouts.backend_connect;
                return Err(fail(OpenError::Silent { backend: backend.clone(), after }));
            }
            Ok(Err(source)) => return Err(fail(OpenError::Read { backend: backend.clone(), source })),
            Ok(Ok(0)) => return Err(fail(OpenError::Closed { backend: backend.clone() })),
            Ok(Ok(_)) => {}
        }
    }
}

/// Logs and counts a backend that could not serve, naming the user it was chosen for.
fn note_unavailable(
    ctx: &ListenerContext,
    peer: &Peer,
    user: Option<&str>,
    (backend, e): &(String, OpenError),
) {
    ctx.metrics.backend_failure(&ctx.name);
    tracing::warn!(
        listener = %ctx.name,
        client = %peer.client,
        backend = %backend,
        user = user.unwrap_or("-"),
        "backend unavailable: {e}"
    );
}

/// The two connections during negotiation; on a routed listener the backend comes and goes
/// with the client's identifications.
struct Link<'a, C> {
    client: &'a mut C,
    backend: Option<TcpStream>,
    backend_buf: BytesMut,
    record: &'a mut Record,
    /// Routed SMTP: the map taken when the transaction's backend was chosen, and that
    /// backend; kept while it is attached, so a reload meanwhile changes nothing for the
    /// transaction's later recipients.
    transaction: Option<(Arc<Routes>, String)>,
}

impl<C: AsyncRead + AsyncWrite + Unpin> Link<'_, C> {
    /// Takes a freshly opened backend; returns the step for its greeting.
    fn attach(&mut self, opened: Opened) -> Step {
        self.record.backend_source = opened.stream.local_addr().ok();
        self.backend = Some(opened.stream);
        self.backend_buf = opened.buf;
        self.record.backend = Some(opened.backend);
        opened.greeting
    }

    /// Drops the backend (a refused routed login): whatever it still says is nobody's.
    fn detach(&mut self) {
        self.backend = None;
        self.backend_buf.clear();
        self.transaction = None;
    }

    /// Writes a step out: backend first, then client (flushed: TLS buffers inside rustls).
    async fn apply(&mut self, step: Step) -> Result<Next, Outcome> {
        if !step.to_backend.is_empty() {
            let Some(backend) = self.backend.as_mut() else {
                return Err(Outcome::Io("a step for the backend with no backend connected".to_owned()));
            };
            backend.write_all(&step.to_backend).await?;
            self.record.to_backend += step.to_backend.len() as u64;
        }
        if !step.to_client.is_empty() {
            self.client.write_all(&step.to_client).await?;
            self.client.flush().await?;
            self.record.to_client += step.to_client.len() as u64;
        }
        Ok(step.next)
    }

    /// Connects the backend chosen for `user` and starts the replay of the identification,
    /// or answers the client that it is unavailable (the session goes on: it may retry).
    async fn route(
        &mut self,
        user: String,
        negotiation: &mut dyn Negotiation,
        ctx: &ListenerContext,
        peer: &Peer,
    ) -> Result<Next, Outcome> {
        // A backend left from an earlier identification may be the wrong one for this user.
        self.detach();
        let step = match Box::pin(open_backend(ctx, peer, Some(&user), negotiation)).await {
            Ok(opened) => {
                if let Some(rule) = opened.rule {
                    ctx.metrics.routed(&ctx.name, rule.name());
                    // A &str field, not %user: the subscriber escapes it, and a user name is
                    // the client's bytes (a literal may hold a line break).
                    tracing::debug!(
                        listener = %ctx.name,
                        client = %peer.client,
                        user = user.as_str(),
                        backend = %opened.backend,
                        rule = rule.name(),
                        "routed"
                    );
                }
                self.attach(opened)
            }
            Err(failure) => {
                note_unavailable(ctx, peer, Some(&user), &failure);
                self.record.backend = Some(failure.0.clone());
                negotiation.on_route_failed()
            }
        };
        self.record.user = Some(user);
        self.apply(step).await
    }

    /// Routes one recipient of an SMTP transaction with the map the transaction took at its
    /// first recipient: connects its backend when none is attached; otherwise the machine
    /// relays the recipient (same backend) or defers it to another transaction.
    async fn recipient(
        &mut self,
        address: String,
        negotiation: &mut dyn Negotiation,
        ctx: &ListenerContext,
        peer: &Peer,
    ) -> Result<Next, Outcome> {
        let Some(map) =
            self.transaction.as_ref().map(|(map, _)| map.clone()).or_else(|| ctx.transaction_map())
        else {
            return Err(Outcome::Io("a recipient to route on a listener without routes".to_owned()));
        };
        let (backend, rule) = decide(&map, Some(&address));
        let current = self.transaction.as_ref().map(|(_, current)| current.clone());
        let step = match (current, self.backend.is_some()) {
            (Some(current), true) if current == backend => {
                ctx.metrics.recipient_routed(&ctx.name, rule.name());
                negotiation.on_recipient(Destination::Current)
            }
            (Some(current), true) => {
                ctx.metrics.recipient_deferred(&ctx.name);
                tracing::debug!(
                    listener = %ctx.name,
                    client = %peer.client,
                    recipient = address.as_str(),
                    backend = %backend,
                    transaction_backend = %current,
                    "recipient deferred to another transaction"
                );
                negotiation.on_recipient(Destination::Other)
            }
            _ => {
                self.backend = None;
                self.backend_buf.clear();
                match Box::pin(connect_backend(ctx, peer, backend.clone(), Some(rule), negotiation)).await {
                    Ok(opened) => {
                        ctx.metrics.recipient_routed(&ctx.name, rule.name());
                        tracing::info!(
                            listener = %ctx.name,
                            client = %peer.client,
                            recipient = address.as_str(),
                            backend = %backend,
                            rule = rule.name(),
                            "transaction routed"
                        );
                        self.transaction = Some((map, backend));
                        self.attach(opened)
                    }
                    Err(failure) => {
                        note_unavailable(ctx, peer, Some(&address), &failure);
                        negotiation.on_route_failed()
                    }
                }
            }
        };
        self.apply(step).await
    }

    /// Feeds both sides' bytes to the state machine until it says relay or close; ends the
    /// session after `silence` without a byte from either side. `next` is what the step
    /// written last said.
    #[allow(clippy::too_many_arguments)]
    async fn negotiate(
        &mut self,
        mut next: Next,
        negotiation: &mut dyn Negotiation,
        client_buf: &mut BytesMut,
        ctx: &ListenerContext,
        peer: &Peer,
        settings: &Settings,
        silence: Duration,
        stop: &Shutdown,
    ) -> Result<Next, Outcome> {
        let bound = settings.max_line + settings.max_literal as usize;
        // As before TLS, only progress (a unit consumed on either side) restarts the clock.
        let mut deadline = Instant::now() + silence;
        loop {
            match next {
                Next::Negotiate => {}
                Next::Detach => self.detach(),
                Next::Route { user } => {
                    next = self.route(user, negotiation, ctx, peer).await?;
                    deadline = Instant::now() + silence;
                    continue;
                }
                Next::Recipient { address } => {
                    next = self.recipient(address, negotiation, ctx, peer).await?;
                    deadline = Instant::now() + silence;
                    continue;
                }
                Next::Relay | Next::Close | Next::Unavailable => return Ok(next),
            }
            let step = match negotiation.on_backend(&mut self.backend_buf) {
                Some(step) => Some(step),
                None => negotiation.on_client(client_buf),
            };
            next = match step {
                Some(step) => {
                    deadline = Instant::now() + silence;
                    if let Some(finding) = negotiation.take_finding() {
                        note_finding(ctx, peer.client, finding, &mut self.record.finding_logged);
                    }
                    self.apply(step).await?
                }
                None => {
                    self.read_either(client_buf, bound, deadline, ctx, stop).await?;
                    Next::Negotiate
                }
            };
        }
    }

    async fn read_either(
        &mut self,
        client_buf: &mut BytesMut,
        bound: usize,
        deadline: Instant,
        ctx: &ListenerContext,
        stop: &Shutdown,
    ) -> Result<(), Outcome> {
        // A full buffer is not read further; the state machine drains it first.
        let client_room = client_buf.len() <= bound;
        let backend_room = self.backend_buf.len() <= bound;
        // No backend (a routed session before its login): only the client can speak.
        let from_backend = async {
            match self.backend.as_mut() {
                Some(backend) => read_some(backend, &mut self.backend_buf, bound).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = read_some(self.client, client_buf, bound), if client_room => match read? {
                0 => Err(Outcome::ClientGone),
                _ => Ok(()),
            },
            read = from_backend, if backend_room => match read? {
                0 => {
                    let _ = self.client.shutdown().await;
                    Err(Outcome::BackendClosed)
                }
                _ => Ok(()),
            },
            () = tokio::time::sleep_until(deadline) => {
                Err(say_farewell(self.client, ctx.protocol, Farewell::Timeout, Outcome::IdleTimeout).await)
            }
            () = stop.graceful.cancelled() => {
                Err(say_farewell(self.client, ctx.protocol, Farewell::ShuttingDown, Outcome::ShuttingDown).await)
            }
        }
    }
}
