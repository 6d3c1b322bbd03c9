//! Connection limits: open connections in total, per listener and per client address, and
//! an optional new-connection rate per address. Admission hands out slots freed on drop.
//!
//! Two stages, because the client address is known only after an inbound PROXY header:
//! the listener stage at accept, the address stage once the real client is known.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::{canonical_ip, Limits};
use crate::metrics::Limit;

/// How many admissions between sweeps of idle address entries.
const SWEEP_EVERY: u32 = 1024;

/// Open connections and rate buckets, shared by every listener.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    limits: Limits,
    total: u32,
    per_listener: HashMap<String, u32>,
    per_address: HashMap<IpAddr, Address>,
    since_sweep: u32,
}

/// One client address: its open connections and its rate bucket (tokens = connections it
/// may still open now; refilled continuously at the per-minute rate).
#[derive(Debug)]
struct Address {
    open: u32,
    tokens: f64,
    refilled: Instant,
}

/// Holds a connection's place in the total and listener counts until dropped.
#[derive(Debug)]
pub struct ListenerSlot {
    limiter: Arc<Limiter>,
    listener: String,
}

/// Holds a connection's place in its address's count until dropped.
#[derive(Debug)]
pub struct AddressSlot {
    limiter: Arc<Limiter>,
    address: IpAddr,
}

impl Limiter {
    pub fn new(limits: Limits) -> Arc<Limiter> {
        Arc::new(Limiter {
            state: Mutex::new(State {
                limits,
                total: 0,
                per_listener: HashMap::new(),
                per_address: HashMap::new(),
                since_sweep: 0,
            }),
        })
    }

    /// New bounds (a config reload); connections already open keep their slots.
    pub fn set_limits(&self, limits: Limits) {
        self.lock().limits = limits;
    }

    /// A poisoned lock only means a panic elsewhere while counting; the counts are still
    /// the best we have, so keep using them rather than refusing every connection.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The listener stage: the total bound and the listener's own (`None`: no own bound).
    pub fn admit_listener(self: &Arc<Self>, listener: &str, max: Option<u32>) -> Result<ListenerSlot, Limit> {
        let mut state = self.lock();
        if state.total >= state.limits.max_connections {
            return Err(Limit::Total);
        }
        let open = state.per_listener.get(listener).copied().unwrap_or(0);
        if max.is_some_and(|max| open >= max) {
            return Err(Limit::Listener);
        }
        state.total += 1;
        *state.per_listener.entry(listener.to_owned()).or_insert(0) += 1;
        Ok(ListenerSlot { limiter: self.clone(), listener: listener.to_owned() })
    }

    /// The address stage: concurrent connections, then the rate.
    pub fn admit_address(self: &Arc<Self>, address: IpAddr) -> Result<AddressSlot, Limit> {
        let address = canonical_ip(address);
        let now = Instant::now();
        let mut state = self.lock();
        state.sweep(now);
        let limits = state.limits;
        let rate = limits.max_new_connections_per_address_per_minute;
        let entry = state.per_address.entry(address).or_insert_with(|| Address {
            open: 0,
            tokens: f64::from(rate.unwrap_or(0)),
            refilled: now,
        });
        if entry.open >= limits.max_connections_per_address {
            return Err(Limit::Address);
        }
        if let Some(per_minute) = rate {
            entry.refill(per_minute, now);
            if entry.tokens < 1.0 {
                return Err(Limit::Rate);
            }
            entry.tokens -= 1.0;
        }
        entry.open += 1;
        Ok(AddressSlot { limiter: self.clone(), address })
    }

    /// Connections open now in total (for status lines).
    pub fn open(&self) -> u32 {
        self.lock().total
    }
}

impl State {
    /// Forgets addresses with nothing open whose bucket is full again: they would behave
    /// exactly like a new entry, so keeping them only costs memory.
    fn sweep(&mut self, now: Instant) {
        self.since_sweep += 1;
        if self.since_sweep < SWEEP_EVERY {
            return;
        }
        self.since_sweep = 0;
        let rate = self.limits.max_new_connections_per_address_per_minute;
        self.per_address.retain(|_, a| {
            if a.open > 0 {
                return true;
            }
            match rate {
                Some(per_minute) => {
                    a.refill(per_minute, now);
                    a.tokens < f64::from(per_minute)
                }
                None => false,
            }
        });
    }
}

impl Address {
    fn refill(&mut self, per_minute: u32, now: Instant) {
        let capacity = f64::from(per_minute);
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * capacity / 60.0).min(capacity);
        self.refilled = now;
    }
}

impl Drop for ListenerSlot {
    fn drop(&mut self) {
        let mut state = self.limiter.lock();
        state.total = state.total.saturating_sub(1);
        if let Some(n) = state.per_listener.get_mut(&self.listener) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut state = self.limiter.lock();
        let rate_off = state.limits.max_new_connections_per_address_per_minute.is_none();
        if let Some(a) = state.per_address.get_mut(&self.address) {
            a.open = a.open.saturating_sub(1);
            // Without a rate the entry holds nothing worth keeping once idle.
            if a.open == 0 && rate_off {
                state.per_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: u32, per_address: u32, rate: Option<u32>) -> Limits {
        Limits {
            max_connections: total,
            max_connections_per_address: per_address,
            max_new_connections_per_address_per_minute: rate,
            ..Limits::default()
        }
    }

    #[test]
    fn total_and_listener_bounds_free_on_drop() {
        let l = Limiter::new(limits(2, 10, None));
        let a = l.admit_listener("imaps", Some(1)).unwrap();
        assert_eq!(l.admit_listener("imaps", Some(1)).unwrap_err(), Limit::Listener);
        let b = l.admit_listener("pop3s", None).unwrap();
        assert_eq!(l.admit_listener("pop3s", None).unwrap_err(), Limit::Total);
        drop(a);
        assert!(l.admit_listener("imaps", Some(1)).is_ok());
        drop(b);
        assert_eq!(l.open(), 0);
    }

    #[test]
    fn address_bound_counts_mapped_v4_as_v4() {
        let l = Limiter::new(limits(100, 1, None));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let slot = l.admit_address(v4).unwrap();
        assert_eq!(l.admit_address(mapped).unwrap_err(), Limit::Address);
        assert!(l.admit_address("192.0.2.8".parse().unwrap()).is_ok());
        drop(slot);
        assert!(l.admit_address(mapped).is_ok());
    }

    #[test]
    fn rate_allows_a_burst_then_refuses() {
        let l = Limiter::new(limits(100, 100, Some(3)));
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..3 {
            drop(l.admit_address(ip).unwrap());
        }
        assert_eq!(l.admit_address(ip).unwrap_err(), Limit::Rate);
    }
}
