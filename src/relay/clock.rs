//! The idle clock shared by both directions of a relay: the time of the last byte read on
//! either side, so one silent direction does not end a session the other keeps busy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Clone)]
pub(super) struct Clock {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Clock {
    pub(super) fn new() -> Self {
        Clock { start: Instant::now(), last_ms: Arc::new(AtomicU64::new(0)) }
    }

    pub(super) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has been read for `idle`.
    pub(super) async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}
