//! The capability probe's schedule: a listener that answers from what its backend offers
//! re-learns it every minute, and while the backend is down retries with a backoff.
//!
//! A backend that is down is logged once when it goes down and once when it is back (with
//! how long it was gone), not at every retry; each failed probe is counted in
//! `mailtls_capability_probe_failures_total`. Retries start at 5 s and double to 60 s, so
//! a backend that comes back is noticed within a minute; a success resets the backoff.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend;
use crate::protocol::{self, ProbeStep, Protocol};
use crate::session::{ListenerContext, Shutdown};

/// How often a listener re-learns what its backend offers (the EHLO extensions of an
/// opportunistic SMTP listener's backend, the capabilities of a routed listener's default).
pub const EVERY: Duration = Duration::from_secs(60);
/// The first retry after a failed probe (backend down at start-up, say); doubled after
/// each further failure up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(5);
pub const MAX_RETRY: Duration = Duration::from_secs(60);

/// Whether the backend answered the last probe, and since when it has not.
#[derive(Debug, Default)]
pub struct Health {
    down: Option<Down>,
}

#[derive(Debug)]
struct Down {
    backend: String,
    since: Instant,
    failures: u32,
}

/// What a probe's outcome changed, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// The first failure after the backend was up (or at start).
    WentDown,
    /// Another failure while down: nothing to say above debug level.
    StillDown { failures: u32 },
    /// The first success after being down.
    CameBack { down_for: Duration, failures: u32 },
    /// A success while up.
    StillUp,
}

impl Health {
    /// Records a failed probe of `backend`; returns what changed and when to try again.
    pub fn failed(&mut self, backend: &str, now: Instant) -> (Change, Duration) {
        match &mut self.down {
            Some(down) if down.backend == backend => {
                down.failures = down.failures.saturating_add(1);
                let failures = down.failures;
                (Change::StillDown { failures }, retry_after(failures))
            }
            // Up until now, or a reload pointed the listener at another backend.
            _ => {
                self.down = Some(Down { backend: backend.to_owned(), since: now, failures: 1 });
                (Change::WentDown, retry_after(1))
            }
        }
    }

    /// Records a successful probe; returns what changed. The next probe is [`EVERY`] away.
    pub fn succeeded(&mut self, now: Instant) -> Change {
        match self.down.take() {
            Some(down) => Change::CameBack { down_for: now - down.since, failures: down.failures },
            None => Change::StillUp,
        }
    }
}

/// The wait after the `failures`-th failure in a row: 5 s, 10 s, 20 s, 40 s, then 60 s.
pub fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

/// Keeps a listener's view of what its backend offers current, so mailtls's own answers show
/// what the backend really has rather than a static list: the EHLO extensions for the
/// pre-TLS EHLO reply of an opportunistic SMTP listener, the default backend's capabilities
/// for a routed IMAP/POP3 listener's answers before login. Other listeners learn nothing
/// and wait for a reload that might change that.
pub async fn run(current: Arc<ArcSwap<ListenerContext>>, reprobe: Arc<Notify>, stop: Shutdown) {
    let mut health = Health::default();
    loop {
        let ctx = current.load_full();
        let learns = match ctx.protocol {
            Protocol::Smtp => !ctx.settings.require_tls || ctx.routes.is_some(),
            Protocol::Imap | Protocol::Pop3 => ctx.routes.is_some(),
        };
        let wait = if learns { Some(learn(&ctx, &mut health).await) } else { None };
        let default_changed = async {
            match &ctx.routes {
                Some(routes) => routes.default_changed.notified().await,
                None => std::future::pending().await,
            }
        };
        let timer = async {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = timer => {}
            () = reprobe.notified() => {}
            () = default_changed => {}
            () = stop.graceful.cancelled() => return,
        }
    }
}

/// One probe, logged and counted; returns how long to wait before the next.
async fn learn(ctx: &ListenerContext, health: &mut Health) -> Duration {
    let (backend, _) = ctx.choose_backend(None);
    match probe_once(ctx, &backend).await {
        Ok(learned) => {
            tracing::debug!(listener = %ctx.name, %backend, ?learned, "learned what the backend offers");
            if let Ok(mut slot) = ctx.backend_extensions.lock() {
                *slot = Arc::from(learned);
            }
            if let Change::CameBack { down_for, failures } = health.succeeded(Instant::now()) {
                tracing::info!(
                    listener = %ctx.name,
                    %backend,
                    down_secs = down_for.as_secs(),
                    failed_probes = failures,
                    "backend up again after {} s down",
                    down_for.as_secs()
                );
            }
            EVERY
        }
        Err(reason) => {
            ctx.metrics.probe_failed(&ctx.name);
            let (change, wait) = health.failed(&backend, Instant::now());
            match change {
                Change::WentDown => tracing::warn!(
                    listener = %ctx.name,
                    %backend,
                    "backend down: capability probe failed: {reason}; retrying from {} s up to every {} s",
                    FIRST_RETRY.as_secs(),
                    MAX_RETRY.as_secs()
                ),
                _ => tracing::debug!(
                    listener = %ctx.name,
                    %backend,
                    next_secs = wait.as_secs(),
                    "capability probe failed again: {reason}"
                ),
            }
            wait
        }
    }
}
async fn probe_once(ctx: &ListenerContext, backend: &str) -> Result<Vec<String>, String> {
    let timeout = ctx.timeouts.backend_connect;
    let mut stream =
        backend::connect_local(backend, ctx.proxy_protocol, timeout).await.map_err(|e| e.to_string())?;
    let mut probe = protocol::probe(ctx.protocol, &ctx.settings);
    let mut buf = BytesMut::with_capacity(4096);
    let exchange = async {
        loop {
            while let Some(step) = probe.on_backend(&mut buf) {
                match step {
                    ProbeStep::Send(bytes) => stream.write_all(&bytes).await.map_err(|e| e.to_string())?,
                    ProbeStep::Done(learned) => {
                        let _ = stream.write_all(probe.quit()).await;
                        return Ok(learned);
                    }
                    ProbeStep::Failed(reason) => return Err(reason),
                }
            }
            if buf.len() > 64 * 1024 {
                return Err("reply too large".to_owned());
            }
            buf.reserve(4096);
            match stream.read_buf(&mut buf).await {
                Ok(0) => return Err("backend closed the connection".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| "no reply in time".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_5_s_to_a_ceiling_of_60_s() {
        let waits: Vec<u64> = (1..=7).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60, 60]);
        assert_eq!(retry_after(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn down_and_up_are_each_reported_once_and_success_resets_the_backoff() {
        let t0 = Instant::now();
        let mut health = Health::default();
        assert_eq!(health.succeeded(t0), Change::StillUp);
        assert_eq!(health.failed("b:25", t0), (Change::WentDown, Duration::from_secs(5)));
        assert_eq!(
            health.failed("b:25", t0 + Duration::from_secs(5)),
            (Change::StillDown { failures: 2 }, Duration::from_secs(10))
        );
        assert_eq!(health.failed("b:25", t0 + Duration::from_secs(15)).1, Duration::from_secs(20));
        let back = health.succeeded(t0 + Duration::from_secs(35));
        assert_eq!(back, Change::CameBack { down_for: Duration::from_secs(35), failures: 3 });
        assert_eq!(health.succeeded(t0 + Duration::from_secs(95)), Change::StillUp);
        // Down again: the backoff starts over.
        assert_eq!(health.failed("b:25", t0 + Duration::from_secs(100)), (Change::WentDown, FIRST_RETRY));
        // A reload to another backend that is down too is news of its own.
        assert_eq!(health.failed("c:25", t0 + Duration::from_secs(105)).0, Change::WentDown);
    }
}
