//! Session-ticket keys shared by a fleet (`[tls] ticket_keys = "PATH"`): the key file, read
//! and checked whole, and the rustls ticketer that seals tickets with the first key.
//!
//! The file is HAProxy's `tls-ticket-keys` format, so a fleet can keep its key file and its
//! rotation tooling: one base64 key per line, 48 bytes (HAProxy's AES-128 keys) or 80 bytes
//! (AES-256) once decoded, laid out as HAProxy lays them out: a 16-byte key name, then the
//! AES key, then the HMAC key. Blank lines and lines starting with `#` are skipped. Make a
//! key with `openssl rand 80 | openssl base64 -A; echo`.
//!
//! How mailtls uses a key (decided here, documented in docs/scale-out.md):
//! - The key name travels in clear at the start of every ticket and says which key opens it.
//! - The AEAD key is derived from the rest of the line (AES and HMAC parts together, 32 or
//!   64 bytes of secret) with HKDF-SHA256, and seals with AES-256-GCM under a random nonce;
//!   the key name is the additional authenticated data. A ticket is
//!   `name (16) | nonce (12) | sealed session state | tag (16)`.
//! - mailtls tickets are therefore not HAProxy tickets (HAProxy uses AES-CBC + HMAC): sharing
//!   a file with HAProxy shares keys, not sessions.
//! - The FIRST key seals new tickets; every key in the file opens them. HAProxy seals with the
//!   penultimate line instead: put the line HAProxy would seal with first.
//! - A ticket whose key is gone (or that fails to open) is no ticket: a full handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::{digest, hkdf};
use base64::Engine as _;

use crate::metrics::Metrics;

/// Length of the clear key name at the start of a ticket (HAProxy's and RFC 5077's).
pub const NAME_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// Decoded lengths of a key line: HAProxy's AES-128 and AES-256 layouts.
const KEY_LENS: [usize; 2] = [48, 80];
/// The lifetime hint sent with each ticket (rustls' own default). Keys, not this hint,
/// bound how long a ticket really works: rotate the file.
const LIFETIME_SECS: u32 = 6 * 60 * 60;
/// HKDF domain separation: a line used elsewhere (HAProxy) yields a different key here.
const HKDF_SALT: &[u8] = b"mailtls session ticket key v1";
const HKDF_INFO: &[u8] = b"aes-256-gcm";

/// Why a ticket key file was refused; each message names the file, and the line where
/// there is one.
#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    #[error("cannot read ticket key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error(
        "{path}: no keys (one base64 key per line; make one with `openssl rand 80 | openssl base64 -A`)"
    )]
    Empty { path: PathBuf },
}

/// One key: its public name and the sealing key derived from its secret part.
struct TicketKey {
    name: [u8; NAME_LEN],
    aead: RandomizedNonceKey,
}

/// The keys of one file, in file order: the first seals, all open.
pub struct KeySet {
    keys: Vec<TicketKey>,
    /// SHA-256 of the decoded lines, to tell a rewrite with the same keys from a rotation.
    fingerprint: Vec<u8>,
}

impl KeySet {
    /// The key names in hex, file order (for logs: names are public, key bytes never shown).
    pub fn names(&self) -> Vec<String> {
        self.keys.iter().map(|k| hex(&k.name)).collect()
    }

    fn seal(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.keys.first()?;
        let mut sealed = plain.to_vec();
        let nonce = key.aead.seal_in_place_append_tag(Aad::from(key.name), &mut sealed).ok()?;
        let mut ticket = Vec::with_capacity(NAME_LEN + NONCE_LEN + sealed.len());
        ticket.extend_from_slice(&key.name);
        ticket.extend_from_slice(nonce.as_ref());
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    /// `ticket` comes from the client: every length is checked before use.
    fn open(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < NAME_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = self.keys.iter().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key.aead.open_in_place(nonce, Aad::from(key.name), &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

/// Reads and checks the key file at `path`.
pub fn load(path: &Path) -> Result<KeySet, TicketKeyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| TicketKeyError::Read { path: path.to_owned(), source })?;
    parse(path, &text)
}

/// Parses key file text; `path` is used in messages.
pub fn parse(path: &Path, text: &str) -> Result<KeySet, TicketKeyError> {
    let mut keys = Vec::new();
    let mut fingerprint = digest::Context::new(&digest::SHA256);
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |message: String| TicketKeyError::Line { path: path.to_owned(), line: line_no, message };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(line)
            .map_err(|e| bad(format!("not a base64 key: {e}")))?;
        if !KEY_LENS.contains(&raw.len()) {
            return Err(bad(format!(
                "a key is 48 or 80 bytes once decoded (HAProxy's tls-ticket-keys layout), this one is {}",
                raw.len()
            )));
        }
        let key = derive(&raw).ok_or_else(|| bad("cannot derive a ticket key".to_owned()))?;
        if keys.iter().any(|k: &TicketKey| k.name == key.name) {
            return Err(bad(format!("key name {} is already used by an earlier line", hex(&key.name))));
        }
        fingerprint.update(&raw);
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(TicketKeyError::Empty { path: path.to_owned() });
    }
    Ok(KeySet { keys, fingerprint: fingerprint.finish().as_ref().to_vec() })
}

/// Splits a decoded line into its name and secret, and derives the AEAD key from the secret.
fn derive(raw: &[u8]) -> Option<TicketKey> {
    let (name, secret) = raw.split_at(NAME_LEN);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(secret);
    let okm = prk.expand(&[HKDF_INFO], hkdf::HKDF_SHA256).ok()?;
    let mut key = [0u8; 32];
    okm.fill(&mut key).ok()?;
    let aead = RandomizedNonceKey::new(&AES_256_GCM, &key).ok()?;
    Some(TicketKey { name: name.try_into().ok()?, aead })
}

/// Whoever reads the keys can decrypt every session whose ticket they sealed: say so when
/// the file is open to everyone (a warning, not a refusal: a Secret volume may be 0644).
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(ticket_keys = %path.display(), "the ticket key file is readable by every user: chmod 600 it");
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The ticketer every listener's rustls config shares: the key set in service, replaced
/// whole when the file changes (watcher, SIGHUP) and only by a set that loaded in full.
pub struct SharedTicketer {
    pub path: PathBuf,
    keys: ArcSwap<KeySet>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for SharedTicketer {
    // Names only: the key material must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTicketer").field("path", &self.path).field("keys", &self.names()).finish()
    }
}

impl SharedTicketer {
    /// Loads the file at `path`; the caller decides what a failure means (start: fatal).
    pub fn load(path: &Path, metrics: Arc<Metrics>) -> Result<SharedTicketer, TicketKeyError> {
        let keys = load(path)?;
        log_keys(path, &keys, "loaded");
        metrics.set_ticket_keys(keys.keys.len());
        Ok(SharedTicketer { path: path.to_owned(), keys: ArcSwap::from_pointee(keys), metrics })
    }

    /// The names of the keys in service, sealing key first.
    pub fn names(&self) -> Vec<String> {
        self.keys.load().names()
    }

    /// Reads the file again and takes the new set only if all of it is valid; otherwise the
    /// set in service stays. Returns whether the file's keys are now in service.
    pub fn reload(&self, trigger: &str) -> bool {
        match load(&self.path) {
            Ok(keys) => {
                self.adopt(keys, trigger);
                true
            }
            Err(e) => {
                self.refused();
                tracing::error!(trigger, "ticket key reload refused, the keys in service stay: {e}");
                false
            }
        }
    }

    /// Puts a checked set in service (a no-op, not counted, when the keys are unchanged).
    pub fn adopt(&self, keys: KeySet, trigger: &str) {
        if self.keys.load().fingerprint == keys.fingerprint {
            tracing::debug!(trigger, ticket_keys = %self.path.display(), "ticket keys unchanged");
            return;
        }
        log_keys(&self.path, &keys, "reloaded");
        self.metrics.set_ticket_keys(keys.keys.len());
        self.keys.store(Arc::new(keys));
        self.metrics.ticket_key_reload(true);
    }

    /// Counts a key file that failed to load.
    pub fn refused(&self) {
        self.metrics.ticket_key_reload(false);
    }
}

impl rustls::server::ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.keys.load().seal(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.keys.load().open(cipher)
    }
}

fn log_keys(path: &Path, keys: &KeySet, what: &str) {
    warn_if_readable_by_others(path);
    let names = keys.names();
    tracing::info!(
        ticket_keys = %path.display(),
        sealing = %names.first().map(String::as_str).unwrap_or(""),
        names = %names.join(","),
        "session ticket keys {what}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn line(name: u8, secret: u8, len: usize) -> String {
        let mut raw = vec![name; NAME_LEN];
        raw.resize(len, secret);
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    fn set(text: &str) -> KeySet {
        parse(Path::new("/etc/mailtls/ticket.keys"), text).expect("valid key file")
    }

    fn error_of(text: &str) -> String {
        match parse(Path::new("/etc/mailtls/ticket.keys"), text) {
            Ok(s) => panic!("should have been refused, got keys {:?}", s.names()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_first_key_seals_and_every_key_opens() {
        let (a, b) = (line(1, 7, 80), line(2, 8, 48));
        let old_first = set(&format!("{a}\n{b}\n"));
        let new_first = set(&format!("# rotated\n{b}\n\n{a}\n"));
        let ticket = old_first.seal(b"session state").unwrap();
        assert_eq!(&ticket[..NAME_LEN], &[1; NAME_LEN]);
        assert_eq!(new_first.open(&ticket).as_deref(), Some(&b"session state"[..]));
        assert_eq!(&new_first.seal(b"x").unwrap()[..NAME_LEN], &[2; NAME_LEN]);
        assert_eq!(new_first.names()[0], "02".repeat(NAME_LEN));
    }

    #[test]
    fn a_dropped_or_changed_key_opens_nothing() {
        let ticket = set(&line(1, 7, 80)).seal(b"state").unwrap();
        assert_eq!(set(&line(2, 7, 80)).open(&ticket), None, "key dropped");
        assert_eq!(set(&line(1, 9, 80)).open(&ticket), None, "same name, other secret");
        let keys = set(&line(1, 7, 80));
        for cut in [0, 10, NAME_LEN, NAME_LEN + NONCE_LEN, ticket.len() - 1] {
            assert_eq!(keys.open(&ticket[..cut]), None, "truncated at {cut}");
        }
        let mut flipped = ticket.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(keys.open(&flipped), None);
    }

    #[test]
    fn the_same_line_makes_a_different_key_than_haproxys() {
        // The AEAD key is derived, never the raw AES part: sealed under the raw AES part,
        // a ticket must not open.
        let raw_aes = RandomizedNonceKey::new(&AES_256_GCM, &[7u8; 32]).unwrap();
        let mut sealed = b"state".to_vec();
        let nonce = raw_aes.seal_in_place_append_tag(Aad::from([1u8; NAME_LEN]), &mut sealed).unwrap();
        let ticket = [&[1u8; NAME_LEN][..], nonce.as_ref(), &sealed].concat();
        assert_eq!(set(&line(1, 7, 80)).open(&ticket), None);
    }

    #[test]
    fn errors_name_file_and_line() {
        let good = line(1, 7, 80);
        let e = error_of(&format!("{good}\nnot base64!\n"));
        assert!(e.starts_with("/etc/mailtls/ticket.keys:2: not a base64 key"), "{e}");
        let e = error_of(&format!("# c\n{good}\n{}\n", line(2, 7, 64)));
        assert!(e.starts_with("/etc/mailtls/ticket.keys:3: a key is 48 or 80 bytes"), "{e}");
        assert!(e.ends_with("this one is 64"), "{e}");
        let e = error_of(&format!("{good}\n{}\n", line(1, 9, 48)));
        assert!(e.starts_with("/etc/mailtls/ticket.keys:2: key name 0101"), "{e}");
        let e = error_of("# only a comment\n\n");
        assert!(e.starts_with("/etc/mailtls/ticket.keys: no keys"), "{e}");
    }

    #[test]
    fn a_reload_keeps_the_last_good_keys_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ticket.keys");
        std::fs::write(&path, line(1, 7, 80)).unwrap();
        let metrics = Arc::new(Metrics::new());
        let t = SharedTicketer::load(&path, metrics.clone()).unwrap();
        let ticket = t.encrypt(b"state").unwrap();
        std::fs::write(&path, format!("{}\n{}\nbroken\n", line(2, 7, 80), line(1, 7, 80))).unwrap();
        assert!(!t.reload("test"));
        assert_eq!(t.names(), vec!["01".repeat(NAME_LEN)]);
        std::fs::write(&path, format!("{}\n{}\n", line(2, 7, 80), line(1, 7, 80))).unwrap();
        assert!(t.reload("test"));
        assert!(t.reload("test"), "an unchanged file is taken, not counted again");
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"state"[..]));
        assert_eq!(&t.encrypt(b"x").unwrap()[..NAME_LEN], &[2; NAME_LEN]);
        assert_eq!(
            (Metrics::get(&metrics.ticket_key_reloads_ok), Metrics::get(&metrics.ticket_key_reloads_failed)),
            (1, 1)
        );
        assert!(!format!("{t:?}").contains("07070707"), "Debug shows names only");
    }
}
