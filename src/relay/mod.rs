//! The bulk phase: once negotiation is over nothing needs parsing, and bytes move both
//! ways opaquely until either side closes, with half-close propagated.
//!
//! One seam, several engines: today the user-space `copy`; the zero-copy engines (splice,
//! kernel TLS) plug in here and are chosen per connection.

mod copy;

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// Which engine moved a session's bytes; logged per connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Copy,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Copy => "copy",
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
}

/// What a finished relay reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub engine: Engine,
    pub totals: Totals,
    pub ending: Ending,
}

/// Relays between `client` and `backend` until both directions are closed, either fails,
/// or nothing moves for `idle`. `to_backend` / `to_client` are bytes the negotiation phase
/// had already read and must be delivered first.
pub async fn relay<C, B>(client: C, backend: B, to_backend: &[u8], to_client: &[u8], idle: Duration) -> Report
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    copy::relay(client, backend, to_backend, to_client, idle).await
}
