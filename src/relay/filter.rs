//! The one hook the relay offers a protocol: a filter over the client-to-backend bytes,
//! applied by every engine (copy, splice, ktls), so no engine can bypass what it enforces.
//!
//! The relay knows nothing of what a filter looks for. It hands each read to the filter,
//! writes what the filter says, and on a [`Verdict::Refuse`] writes the filter's reply to
//! the client and closes both connections. The backend-to-client direction is never
//! filtered, so the kernel engines keep splicing it.

/// What a filter decided about one piece of client input.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward the input exactly as it is; `out` was left untouched (the common case,
    /// which costs the relay no copy).
    Clean,
    /// Forward `out` instead of the input.
    Changed,
    /// Forward `out` (what came before the offending octet, possibly nothing), then write
    /// this reply to the client and close both connections.
    Refuse(Vec<u8>),
}

/// A streaming, I/O-free transformer of the client-to-backend byte stream.
pub trait ClientFilter: Send {
    /// Examines the next `input` bytes of the client stream; may append to `out`.
    fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> Verdict;
    /// The client closed its side: appends anything still held back (a filter may keep a
    /// trailing octet until it knows what follows). Never [`Verdict::Clean`] with bytes held.
    fn finish(&mut self, out: &mut Vec<u8>) -> Verdict;
    /// A short name for the per-connection log line (`inspected=...`).
    fn name(&self) -> &'static str;
}
