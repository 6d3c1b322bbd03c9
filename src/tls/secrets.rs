//! The TLS 1.3 application traffic secrets of each handshake, kept from the handshake until
//! the relay takes them over with the record layer, so it can follow a client's KeyUpdate.
//!
//! rustls hands out a session's keys (`dangerous_extract_secrets`), not the secrets they
//! come from, and a KeyUpdate needs the secret (RFC 8446 7.2). Its one outlet for them is
//! the key log, called during the handshake with the ClientHello's random: this log keeps
//! only the two application secrets, keyed by that random, which [`crate::tls::prefixed`]
//! reads off the ClientHello. Entries leave when the relay takes them or the connection
//! ends (the stream's drop), so at most the handshakes and negotiations in progress hold one.
//! A random can be replayed by another connection; the relay uses the secrets it takes
//! only if they give its session's own keys (relay/record.rs), so the worst a replay can
//! do is leave a session unable to follow a KeyUpdate, which then ends it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::crypto::tls13::OkmBlock;
use rustls::KeyLog;

/// A ClientHello's random.
pub type ClientRandom = [u8; 32];

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

fn table() -> &'static Mutex<HashMap<ClientRandom, Partial>> {
    static TABLE: OnceLock<Mutex<HashMap<ClientRandom, Partial>>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The key log mailtls's rustls config uses: it logs nothing anywhere, it only keeps the
/// TLS 1.3 application secrets for [`take`].
#[derive(Debug, Default)]
pub struct SecretLog;

impl SecretLog {
    pub fn shared() -> Arc<SecretLog> {
        Arc::new(SecretLog)
    }
}

impl KeyLog for SecretLog {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let Ok(random) = ClientRandom::try_from(client_random) else { return };
        let Ok(mut table) = table().lock() else { return };
        let entry = table.entry(random).or_default();
        match label {
            CLIENT => entry.client = Some(OkmBlock::new(secret)),
            SERVER => entry.server = Some(OkmBlock::new(secret)),
            _ => {}
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == CLIENT || label == SERVER
    }
}

/// Takes the secrets logged for the handshake that began with `random`, if both are there.
pub fn take(random: &ClientRandom) -> Option<TrafficSecrets> {
    let partial = table().lock().ok()?.remove(random)?;
    Some(TrafficSecrets { client: partial.client?, server: partial.server? })
}

/// Drops whatever was logged for `random` (the connection ended first).
pub fn forget(random: &ClientRandom) {
    if let Ok(mut table) = table().lock() {
        table.remove(random);
    }
}
