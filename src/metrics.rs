//! Counters of what happened, shared by every session. Kept as plain atomics so the hot
//! path pays one relaxed add; exposition (Prometheus) reads them.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_accepted: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub starttls_upgrades: AtomicU64,
    /// Plaintext bytes found behind a STARTTLS command (the command-injection class).
    pub starttls_injection_attempts: AtomicU64,
    pub backend_failures: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
