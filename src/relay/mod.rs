//! The bulk phase: once negotiation is over bytes move both ways until either side
//! closes, with half-close propagated; opaquely, or through a session's client filter.
//!
//! One seam, three engines, chosen per connection by [`run`]: `splice` when both legs are
//! cleartext TCP, `ktls` when the client leg's TLS can be handed to the kernel, `copy`
//! (user space) otherwise and whenever a faster engine cannot be set up. Only the
//! modules that talk to the kernel directly may use unsafe code.
//!
//! A session may bring a [`ClientFilter`] (SMTP's smuggling guard): every engine then
//! passes the client-to-backend bytes through it in user space (pending bytes included),
//! while the backend-to-client direction stays as fast as the engine allows (spliced by
//! `splice` and `ktls`).

mod clock;
mod copy;
mod filter;
#[allow(unsafe_code)]
mod ktls;
mod splice;

pub use filter::{ClientFilter, Verdict};

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::config::RelayMode;
use crate::metrics::Metrics;
use crate::tls::prefixed::Prefixed;

pub use ktls::{socket_ulp, Cipher, KtlsSupport, Suite};

/// Which engine moved a session's bytes; logged per connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Engine {
    Copy,
    Splice,
    Ktls,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Copy => "copy",
            Engine::Splice => "splice",
            Engine::Ktls => "ktls",
        })
    }
}

/// Bytes moved by the relay in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// How a relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Both directions reached end-of-stream.
    Closed,
    /// Nothing moved either way for the idle time.
    Idle,
    /// A read or write failed (reset, broken pipe, TLS error).
    Failed,
    /// The client filter refused the client's input: its reply was sent and both
    /// connections closed.
    Refused,
}

impl Ending {
    /// How a relay ended whose direction failed with `e`. A reset or a broken pipe once the
    /// conversation is over (the other direction, or this one up to its half-close, has
    /// finished) is a peer hanging up, not a failure: a client that closes with mailtls's
    /// close_notify still unread makes its kernel answer with RST (swaks after QUIT does).
    pub(crate) fn after_error(e: &io::Error, conversation_over: bool) -> Ending {
        let hang_up = matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe);
        if hang_up && conversation_over {
            Ending::Closed
        } else {
            tracing::debug!("relay failed: {e}");
            Ending::Failed
        }
    }
}

/// What a finished relay reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub engine: Engine,
    pub totals: Totals,
    pub ending: Ending,
}

/// A failure injected on purpose, so tests can walk the fallback paths on any kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Pipe creation fails (as with EMFILE): splice and ktls must fall back to copy.
    pub no_pipes: bool,
    /// Treat kernel TLS as available even where the probe said no, so the set-up is
    /// attempted and its real failure on such a kernel exercises the fallback.
    pub assume_ktls: bool,
}

/// The engines this process may use, decided once at start-up, plus what every relay
/// needs from the configuration.
#[derive(Clone, Debug)]
pub struct Engines {
    mode: RelayMode,
    ktls: KtlsSupport,
    idle: Duration,
    metrics: Arc<Metrics>,
    faults: Faults,
}

impl Engines {
    /// Probes the kernel (in `auto` mode only) and returns the policy.
    pub fn detect(mode: RelayMode, idle: Duration, metrics: Arc<Metrics>) -> Engines {
        let ktls = match mode {
            RelayMode::Auto => ktls::probe(),
            RelayMode::Copy => KtlsSupport::Unavailable("relay = \"copy\" in the config".to_owned()),
        };
        Engines { mode, ktls, idle, metrics, faults: Faults::default() }
    }

    /// Replaces the injected faults (tests).
    pub fn with_faults(mut self, faults: Faults) -> Engines {
        if faults.assume_ktls {
            self.ktls = KtlsSupport::Available(ktls::ALL_SUITES.to_vec());
        }
        self.faults = faults;
        self
    }

    pub fn mode(&self) -> RelayMode {
        self.mode
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn ktls(&self) -> &KtlsSupport {
        &self.ktls
    }

    /// One line for the start-up log: what will be used, and why not the rest.
    pub fn describe(&self) -> String {
        match (self.mode, &self.ktls) {
            (RelayMode::Copy, _) => "relay engines: copy only (relay = \"copy\")".to_owned(),
            (RelayMode::Auto, KtlsSupport::Available(suites)) => {
                let names: Vec<String> = suites.iter().map(Suite::to_string).collect();
                format!(
                    "relay engines: splice for cleartext legs, ktls for {}, copy otherwise",
                    names.join(", ")
                )
            }
            (RelayMode::Auto, KtlsSupport::Unavailable(why)) => {
                format!(
                    "relay engines: splice for cleartext legs, copy for TLS; kernel TLS unavailable: {why}"
                )
            }
        }
    }
}

/// A client leg the relay can take apart for the kernel engines. Implemented for the two
/// concrete types a session ends up with.
pub trait ClientLeg: AsyncRead + AsyncWrite + Unpin + Send + Sized {
    fn into_leg(self) -> Leg;
}

/// The concrete client connection, as the engines need to see it.
pub enum Leg {
    /// Opportunistic SMTP that never upgraded: cleartext TCP.
    Plain(TcpStream),
    /// TLS terminated by rustls; the inner stream may still hold unread STARTTLS prefix bytes.
    Tls(Box<TlsStream<Prefixed<TcpStream>>>),
}

impl ClientLeg for TcpStream {
    fn into_leg(self) -> Leg {
        Leg::Plain(self)
    }
}

impl ClientLeg for TlsStream<Prefixed<TcpStream>> {
    fn into_leg(self) -> Leg {
        Leg::Tls(Box::new(self))
    }
}

/// Bytes the negotiation phase had already read, to be delivered before anything else.
/// Owned, so the relay can free them once written instead of holding them for hours.
#[derive(Clone, Debug, Default)]
pub struct Pending {
    pub to_backend: Vec<u8>,
    pub to_client: Vec<u8>,
}

impl Pending {
    /// Takes the negotiation phase's read buffers, keeping only their contents: their
    /// spare capacity (4 KiB and more each) is freed now, not at the end of the session.
    pub fn from_buffers(to_backend: BytesMut, to_client: BytesMut) -> Pending {
        Pending { to_backend: to_backend.to_vec(), to_client: to_client.to_vec() }
    }
}

/// Relays a session through the best engine its legs allow. `engine` is set (and counted
/// for `listener`) as soon as the engine is known, so a session cut short still logs and
/// counts which one it was using.
pub async fn run<C: ClientLeg>(
    client: C,
    backend: TcpStream,
    pending: Pending,
    engines: &Engines,
    listener: &str,
    engine: &mut Option<Engine>,
) -> Report {
    run_filtered(client, backend, pending, engines, listener, engine, None).await
}

/// [`run`], with every client-to-backend byte (pending ones first) passed through `filter`.
pub async fn run_filtered<C: ClientLeg>(
    client: C,
    backend: TcpStream,
    pending: Pending,
    engines: &Engines,
    listener: &str,
    engine: &mut Option<Engine>,
    filter: Option<&mut dyn ClientFilter>,
) -> Report {
    let report = match (engines.mode, client.into_leg()) {
        (RelayMode::Copy, Leg::Plain(client)) => {
            announce(engines, listener, engine, Engine::Copy);
            copy::relay(client, backend, pending, engines.idle, filter).await
        }
        (RelayMode::Copy, Leg::Tls(client)) => {
            announce(engines, listener, engine, Engine::Copy);
            copy::relay(*client, backend, pending, engines.idle, filter).await
        }
        (RelayMode::Auto, Leg::Plain(client)) => match splice::Pipes::new(&engines.faults) {
            Ok(pipes) => {
                announce(engines, listener, engine, Engine::Splice);
                let legs = splice::Legs { client: &client, backend: &backend, client_ktls: false };
                splice::relay(legs, pipes, pending, engines.idle, filter).await
            }
            Err(e) => {
                tracing::debug!("splice engine unavailable for this session, using copy: {e}");
                announce(engines, listener, engine, Engine::Copy);
                copy::relay(client, backend, pending, engines.idle, filter).await
            }
        },
        (RelayMode::Auto, Leg::Tls(client)) => {
            ktls::relay(*client, backend, pending, engines, listener, engine, filter).await
        }
    };
    *engine = Some(report.engine);
    report
}

fn announce(engines: &Engines, listener: &str, slot: &mut Option<Engine>, chosen: Engine) {
    *slot = Some(chosen);
    engines.metrics.engine(listener, chosen);
}

/// The user-space engine over any pair of streams: what `run` falls back to, and what
/// tests and benchmarks call directly.
pub async fn relay<C, B>(client: C, backend: B, to_backend: &[u8], to_client: &[u8], idle: Duration) -> Report
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let pending = Pending { to_backend: to_backend.to_vec(), to_client: to_client.to_vec() };
    copy::relay(client, backend, pending, idle, None).await
}

/// [`relay`] with a client filter: for tests and benchmarks of the filtered copy path.
pub async fn relay_filtered<C, B>(
    client: C,
    backend: B,
    pending: Pending,
    idle: Duration,
    filter: &mut dyn ClientFilter,
) -> Report
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    copy::relay(client, backend, pending, idle, Some(filter)).await
}

/// The splice engine over two cleartext TCP sockets, without the copy fallback: for
/// benchmarks and tests that must measure this engine and no other.
pub async fn splice_relay(
    client: &TcpStream,
    backend: &TcpStream,
    pending: Pending,
    idle: Duration,
) -> std::io::Result<Report> {
    splice_relay_filtered(client, backend, pending, idle, None).await
}

/// [`splice_relay`] with an optional client filter (the client-to-backend direction is
/// then read, filtered and written in user space; the other stays spliced).
pub async fn splice_relay_filtered(
    client: &TcpStream,
    backend: &TcpStream,
    pending: Pending,
    idle: Duration,
    filter: Option<&mut dyn ClientFilter>,
) -> std::io::Result<Report> {
    let pipes = splice::Pipes::new(&Faults::default())?;
    let legs = splice::Legs { client, backend, client_ktls: false };
    Ok(splice::relay(legs, pipes, pending, idle, filter).await)
}
