//! SMTP for mailtls: the pre-TLS dialogue mailtls speaks itself, the negotiation relay with
//! its EHLO filter and local refusals, and the probe that learns a backend's extensions.
//!
//! One file per part: `pre_tls` (the dialogue before TLS), `negotiation` (after TLS and the
//! plaintext entry), `guarded` (guarded plaintext), `probe`; beside them the pieces they
//! share: `command` (verbs), `reply` (backend reply framing, EHLO filter), `extensions`
//! (which extension a client may see), `xclient`.
//!
//! The opportunistic plaintext path (port 25 without STARTTLS) ends in one of two ways once
//! the replayed EHLO/HELO is answered:
//! - opaque relay, only when the probe showed a backend that offers nothing a plaintext
//!   client must not reach (no AUTH, XCLIENT or XFORWARD): it refuses those itself, and the
//!   relay can stay opaque (splice(2));
//! - otherwise a *guarded* session that never leaves the negotiation: commands are relayed
//!   lock-step, AUTH/STARTTLS/XCLIENT/XFORWARD are answered locally, EHLO replies lose those
//!   extensions, and message content is streamed, never held whole: DATA bodies through
//!   the smuggling guard (`protocol/smtp_guard.rs`), BDAT chunks unexamined, so nothing in a body is
//!   ever taken for a command.
//!
//! Every session that ends in a relay hands the relay the same guard ([`Negotiation::client_guard`]),
//! started in command mode and told whether the backend announced CHUNKING.

mod command;
mod extensions;
mod guarded;
mod negotiation;
mod pre_tls;
mod probe;
mod reply;
mod routed;
mod xclient;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use bytes::BytesMut;

use super::line::{self, Line};
use super::smtp_guard::{BareNewline, SmtpGuard};
use super::trusted_proxy::is_proxy_command;
use super::{
    CapabilityProbe, ClientGuard, Destination, Entry, Farewell, Finding, Negotiation, Next, PreTls,
    PreTlsStep, Protocol, Settings, Step,
};
use command::*;
use extensions::*;
use negotiation::{Pending, Phase};
use reply::*;
use xclient::*;

pub(super) use extensions::bdat_size;
pub use negotiation::SmtpNegotiation;
pub use pre_tls::SmtpPreTls;
pub use probe::{Probe, ProbeStep};
pub use routed::SmtpRouted;

/// Sent by the session to end a probe connection politely once [`ProbeStep::Done`] came.
pub const PROBE_QUIT: &[u8] = b"QUIT\r\n";

const OK: &[u8] = b"250 2.0.0 OK\r\n";
const BYE: &[u8] = b"221 2.0.0 Bye\r\n";
const HELP: &[u8] = b"214 2.0.0 See RFC 5321\r\n";
const READY_FOR_TLS: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
const STARTTLS_WITH_ARGUMENT: &[u8] = b"501 5.5.4 Syntax error (no parameters allowed)\r\n";
const EHLO_WITHOUT_DOMAIN: &[u8] = b"501 5.5.4 Syntax: EHLO hostname\r\n";
const HELO_WITHOUT_DOMAIN: &[u8] = b"501 5.5.4 Syntax: HELO hostname\r\n";
const TLS_FIRST: &[u8] = b"530 5.7.0 Must issue a STARTTLS command first\r\n";
const HELO_FIRST: &[u8] = b"503 5.5.1 Error: send HELO/EHLO first\r\n";
const MAIL_FIRST: &[u8] = b"503 5.5.1 Error: need MAIL command\r\n";
const CANNOT_VRFY: &[u8] = b"252 2.0.0 Cannot VRFY user\r\n";
const NOT_IMPLEMENTED: &[u8] = b"502 5.5.1 Command not implemented\r\n";
const UNRECOGNIZED: &[u8] = b"500 5.5.2 Error: command not recognized\r\n";
const LINE_TOO_LONG: &[u8] = b"500 5.5.2 Error: line too long\r\n";
const TLS_ALREADY_ACTIVE: &[u8] = b"503 5.5.1 Error: TLS already active\r\n";
const NOT_AUTHORIZED: &[u8] = b"550 5.7.0 Error: not authorized\r\n";
/// RFC 3207: STARTTLS is not available at this point (the plaintext session already began).
const TLS_NOT_AVAILABLE: &[u8] = b"454 4.7.0 TLS not available now\r\n";
const BDAT_SYNTAX: &[u8] = b"501 5.5.4 Syntax: BDAT count [LAST]\r\n";

/// The protocol's last words when mailtls ends a session itself.
pub fn farewell(why: Farewell) -> Vec<u8> {
    let text: &[u8] = match why {
        Farewell::BackendUnavailable => b"421 4.3.2 Service not available, closing transmission channel\r\n",
        Farewell::Timeout => b"421 4.4.2 Error: timeout exceeded\r\n",
        Farewell::ShuttingDown => b"421 4.3.2 Server shutting down\r\n",
        Farewell::TooManyConnections => b"421 4.7.0 Too many connections, try again later\r\n",
    };
    text.to_vec()
}
