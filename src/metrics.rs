//! Counters of what happened, shared by every session. Kept as plain atomics so the hot
//! path pays one relaxed add; exposition (Prometheus) reads them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::relay::Engine;
use crate::tls::LoadedCert;

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_accepted: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub starttls_upgrades: AtomicU64,
    /// Plaintext bytes found behind a STARTTLS command (the command-injection class).
    pub starttls_injection_attempts: AtomicU64,
    pub backend_failures: AtomicU64,
    pub cert_reloads_ok: AtomicU64,
    pub cert_reloads_failed: AtomicU64,
    /// Sessions that reached the bulk phase, by the relay engine that served them.
    pub relay_copy: AtomicU64,
    pub relay_splice: AtomicU64,
    pub relay_ktls: AtomicU64,
    /// notAfter (Unix seconds) of each certificate in service, by file.
    pub cert_not_after: Mutex<Vec<(String, i64)>>,
}

impl Metrics {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn relay_sessions(&self, engine: Engine) -> &AtomicU64 {
        match engine {
            Engine::Copy => &self.relay_copy,
            Engine::Splice => &self.relay_splice,
            Engine::Ktls => &self.relay_ktls,
        }
    }

    pub fn count_engine(&self, engine: Engine) {
        Metrics::add(self.relay_sessions(engine));
    }

    pub fn set_certificates(&self, certs: &[LoadedCert]) {
        if let Ok(mut slot) = self.cert_not_after.lock() {
            *slot = certs.iter().map(|c| (c.source.clone(), c.not_after)).collect();
        }
    }
}
