//! The TLS 1.3 application traffic secrets of one connection, kept from its handshake until
//! the relay takes them over with the record layer, so it can follow a client's KeyUpdate.
//!
//! rustls hands out a session's keys (`dangerous_extract_secrets`), not the secrets they
//! come from, and a KeyUpdate needs the secret (RFC 8446 7.2). Its one outlet for them is
//! the config's key log. So each connection is accepted with a copy of the listener's
//! config whose key log is the connection's own [`SecretLog`] ([`accept`]): no table
//! shared between connections, no lookup by ClientHello random (which any client chooses
//! and may replay), nothing that outlives the connection. The copy and the log go when the
//! relay takes the records (or the connection ends); the secrets are zeroed on drop
//! (`OkmBlock`) and never written anywhere.

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rustls::crypto::tls13::OkmBlock;
use rustls::KeyLog;
use tokio::io::{AsyncRead, AsyncWrite};

use super::prefixed::Prefixed;

const CLIENT: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER: &str = "SERVER_TRAFFIC_SECRET_0";

/// The application traffic secrets of one TLS 1.3 session (zeroed on drop by `OkmBlock`).
pub struct TrafficSecrets {
    pub client: OkmBlock,
    pub server: OkmBlock,
}

#[derive(Default)]
struct Partial {
    client: Option<OkmBlock>,
    server: Option<OkmBlock>,
}

/// One connection's key log: it logs nothing anywhere, it only keeps that connection's
/// TLS 1.3 application secrets for [`SecretLog::take`].
#[derive(Default)]
pub struct SecretLog(Mutex<Partial>);

impl std::fmt::Debug for SecretLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretLog")
    }
}

impl SecretLog {
    /// Takes the secrets logged for this connection's handshake, if both are there.
    pub fn take(&self) -> Option<TrafficSecrets> {
        let partial = std::mem::take(&mut *self.0.lock().ok()?);
        Some(TrafficSecrets { client: partial.client?, server: partial.server? })
    }
}

impl KeyLog for SecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let Ok(mut partial) = self.0.lock() else { return };
        match label {
            CLIENT => partial.client = Some(OkmBlock::new(secret)),
            SERVER => partial.server = Some(OkmBlock::new(secret)),
            _ => {}
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == CLIENT || label == SERVER
    }
}

/// A copy of `shared` whose key log is a fresh [`SecretLog`] of one connection's own.
/// (A config copy is a few hundred bytes of Arcs and small vectors; it lives as long as the
/// connection's rustls state, i.e. until the relay takes the records.)
pub fn for_connection(shared: &Arc<rustls::ServerConfig>) -> (Arc<rustls::ServerConfig>, Arc<SecretLog>) {
    let log = Arc::new(SecretLog::default());
    let mut config = (**shared).clone();
    config.key_log = log.clone();
    (Arc::new(config), log)
}

/// Accepts a TLS connection on `stream` (after `prefix`, see [`Prefixed`]) with `shared`'s
/// config and a key log of the connection's own, which the stream then carries for the
/// relay ([`Prefixed::take_traffic_secrets`]).
pub fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &tokio_rustls::TlsAcceptor,
    stream: S,
    prefix: BytesMut,
) -> tokio_rustls::Accept<Prefixed<S>> {
    let (config, log) = for_connection(shared.config());
    tokio_rustls::TlsAcceptor::from(config).accept(Prefixed::new(stream, prefix).keeping_secrets(log))
}
