//! The clock both benchmark examples read to time a backend push through a proxy: the
//! backend writes the stamp into `* T EXISTS`, the load generator subtracts it on arrival.

/// The wrap of the stamp: it stays an IMAP number (below 2^32).
pub const STAMP_WRAP_US: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC in microseconds modulo [`STAMP_WRAP_US`]: one clock for every process
/// on the machine, unlike `Instant`, which cannot cross a process boundary.
pub fn stamp_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusive pointer given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000) % STAMP_WRAP_US
}
