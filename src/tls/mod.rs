//! TLS for the client side: the rustls server configuration (aws-lc-rs, TLS 1.2/1.3 only)
//! over a reloadable certificate store, and the facts of a finished handshake.

pub mod load;
pub mod prefixed;
pub mod secrets;
pub mod store;
pub mod tickets;
pub mod trial;

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use rustls::crypto::CryptoProvider;
use rustls::{ServerConfig, ServerConnection};

use crate::config::{Config, Origin, TlsConfig, TlsVersion};
use crate::metrics::Metrics;
pub use load::{LoadError, LoadedCert};
pub use store::CertStore;
pub use tickets::SharedTicketer;

/// The crypto provider mailtls uses everywhere: aws-lc-rs, chosen explicitly so no other
/// provider that a dependency might enable is ever picked by accident.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Errors building the TLS side.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{origin}: {source}")]
    TicketKeys { origin: Origin, source: tickets::TicketKeyError },
}

/// Whether loading may create the self-signed trial pairs a config asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfSigned {
    /// Starting up: create missing pairs where `self_signed = true`.
    Create,
    /// `--check`: write nothing; a pair that would be created is skipped.
    DryRun,
}

/// Loads every configured certificate (creating or renewing self-signed trial pairs only
/// where the config asks), failing on the first entry that cannot be used.
pub fn load_certificates(config: &Config, self_signed: SelfSigned) -> Result<Vec<LoadedCert>, TlsError> {
    let provider = provider();
    let mut names = vec![config.hostname.clone(), "localhost".to_owned()];
    names.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    let mut out = Vec::with_capacity(config.tls.certificates.len());
    for entry in &config.tls.certificates {
        if self_signed == SelfSigned::DryRun {
            // What a start would write is left to the start; the rest is checked.
            if trial::need(entry) != trial::Need::Nothing {
                continue;
            }
        } else {
            log_trial_change(entry, &trial::ensure(entry, &names)?);
        }
        let cert = load::load_entry(entry, &provider)?;
        if entry.self_signed && trial::is_trial(&entry.cert) {
            tracing::warn!(
                cert = %entry.cert.display(),
                not_after = %cert.not_after_date,
                "serving a SELF-SIGNED trial certificate (self_signed = true); for trials only"
            );
        }
        out.push(cert);
    }
    Ok(out)
}

fn log_trial_change(entry: &crate::config::CertificateConfig, done: &trial::Done) {
    let (cert, key) = (entry.cert.display(), entry.key.display());
    match done {
        trial::Done::Nothing => {}
        trial::Done::Created => tracing::warn!(
            %cert, %key, valid_days = trial::VALIDITY_DAYS,
            "created a SELF-SIGNED certificate because the config says self_signed = true; for trials only"
        ),
        trial::Done::Renewed { old_not_after } => tracing::warn!(
            %cert, %key, %old_not_after, valid_days = trial::VALIDITY_DAYS,
            "renewed the SELF-SIGNED trial certificate (self_signed = true) before it expires; for trials only"
        ),
    }
}

/// The certificates in service and how they are renewed: by the directory watcher and on
/// demand (SIGHUP), always all-or-nothing.
pub struct Certificates {
    /// The config whose `[tls]` entries are in service; replaced by a config reload.
    config: ArcSwap<Config>,
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
}

impl Certificates {
    /// Loads every configured certificate; fails on the first one that cannot be used.
    pub fn load(config: &Config, metrics: Arc<Metrics>) -> Result<Certificates, TlsError> {
        let certs = load_certificates(config, SelfSigned::Create)?;
        for cert in &certs {
            log_loaded(cert, "loaded");
        }
        metrics.set_certificates(&certs);
        let config = ArcSwap::from_pointee(config.clone());
        Ok(Certificates { config, store: Arc::new(CertStore::new(certs)), metrics })
    }

    pub fn store(&self) -> Arc<CertStore> {
        self.store.clone()
    }

    /// Every configured file (certificates, keys, OCSP responses), for the watcher.
    pub fn files(&self) -> Vec<PathBuf> {
        let config = self.config.load();
        config
            .tls
            .certificates
            .iter()
            .flat_map(|c| [Some(c.cert.clone()), Some(c.key.clone()), c.ocsp.clone()].into_iter().flatten())
            .collect()
    }

    /// Loads the whole set again and swaps it in only if every entry loads; otherwise the
    /// set in service stays. Returns whether the new set was taken.
    pub fn reload(&self, trigger: &str) -> bool {
        match load_certificates(&self.config.load(), SelfSigned::Create) {
            Ok(certs) => {
                if !self.take_if_changed(certs) {
                    tracing::debug!(trigger, "certificates unchanged");
                }
                true
            }
            Err(e) => {
                self.metrics.cert_reload(false);
                tracing::error!(trigger, "certificate reload refused, the certificates in service stay: {e}");
                false
            }
        }
    }

    /// Adopts a reloaded config whose certificates the caller has loaded and checked
    /// (all of them: a config that fails to load never gets here).
    pub fn adopt(&self, config: &Config, certs: Vec<LoadedCert>) {
        self.take_if_changed(certs);
        self.config.store(Arc::new(config.clone()));
    }

    /// Swaps in a checked set, logged and counted as a reload, unless it is the set already
    /// in service (a watcher fires on any change in the directory). Whether it was taken.
    fn take_if_changed(&self, certs: Vec<LoadedCert>) -> bool {
        let current = self.store.current();
        let unchanged = certs.len() == current.len()
            && certs.iter().zip(current.iter()).all(|(new, old)| same_cert(new, old));
        if unchanged {
            return false;
        }
        for cert in &certs {
            log_loaded(cert, "reloaded");
        }
        self.metrics.set_certificates(&certs);
        self.store.replace(certs);
        self.metrics.cert_reload(true);
        true
    }

    /// Counts certificates that failed to load during a config reload.
    pub fn refused(&self) {
        self.metrics.cert_reload(false);
    }
}

fn same_cert(a: &LoadedCert, b: &LoadedCert) -> bool {
    a.certified.cert == b.certified.cert && a.certified.ocsp == b.certified.ocsp
}

fn log_loaded(cert: &LoadedCert, what: &str) {
    let days = cert.days_left(load::now());
    tracing::info!(
        file = %cert.source,
        names = %cert.names.join(","),
        key = %cert.key_type,
        not_after = %cert.not_after_date,
        days_left = days,
        ocsp = cert.certified.ocsp.is_some(),
        "certificate {what}"
    );
    if days < EXPIRY_WARNING_DAYS {
        tracing::warn!(file = %cert.source, not_after = %cert.not_after_date, "certificate expires in {days} days");
    }
}

/// Below this many days to expiry, loading and `--check` warn.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// Session-resumption state: the ticket keys and the TLS 1.2 session cache. Kept apart
/// from the rustls ServerConfig, which a config reload rebuilds, so that clients keep
/// resuming across reloads of certificates and of the config.
#[derive(Clone)]
pub struct Resumption {
    tickets: bool,
    cache_size: usize,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    storage: Arc<dyn rustls::server::StoresServerSessions>,
    /// The fleet's key file (`tls.ticket_keys`), when set; then also `ticketer`.
    shared: Option<Arc<SharedTicketer>>,
}

impl Resumption {
    pub fn new(tls: &TlsConfig, metrics: Arc<Metrics>) -> Result<Resumption, TlsError> {
        let storage: Arc<dyn rustls::server::StoresServerSessions> = if tls.session_cache == 0 {
            Arc::new(rustls::server::NoServerSessionStorage {})
        } else {
            rustls::server::ServerSessionMemoryCache::new(tls.session_cache)
        };
        let shared = match &tls.ticket_keys {
            None => None,
            Some(k) => Some(Arc::new(SharedTicketer::load(&k.path, metrics.clone()).map_err(|source| {
                metrics.ticket_key_reload(false);
                TlsError::TicketKeys { origin: k.origin.clone(), source }
            })?)),
        };
        let ticketer: Option<Arc<dyn rustls::server::ProducesTickets>> = match (&shared, tls.session_tickets)
        {
            (Some(shared), _) => Some(shared.clone()),
            (None, true) => Some(rustls::crypto::aws_lc_rs::Ticketer::new()?),
            (None, false) => None,
        };
        Ok(Resumption {
            tickets: tls.session_tickets,
            cache_size: tls.session_cache,
            ticketer,
            storage,
            shared,
        })
    }

    /// The state for `tls`: this very one while the resumption settings are unchanged (so
    /// issued tickets and cached sessions stay valid), a fresh one otherwise.
    pub fn for_config(&self, tls: &TlsConfig, metrics: Arc<Metrics>) -> Result<Resumption, TlsError> {
        let same_keys = self.shared.as_ref().map(|s| &s.path) == tls.ticket_keys.as_ref().map(|k| &k.path);
        if tls.session_tickets == self.tickets && tls.session_cache == self.cache_size && same_keys {
            Ok(self.clone())
        } else {
            Resumption::new(tls, metrics)
        }
    }

    /// The shared ticket keys in service, if `tls.ticket_keys` is set.
    pub fn shared_ticketer(&self) -> Option<Arc<SharedTicketer>> {
        self.shared.clone()
    }
}

/// The rustls server configuration shared by every listener.
pub fn server_config(
    config: &Config,
    store: Arc<CertStore>,
    resumption: &Resumption,
) -> Result<Arc<ServerConfig>, TlsError> {
    let tls = &config.tls;
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(names) = &tls.cipher_suites {
        // In the configured order too: with the server's order deciding, it is the policy.
        provider.cipher_suites = names
            .iter()
            .filter_map(|n| {
                rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
                    .iter()
                    .find(|s| s.suite().as_str() == Some(n.as_str()))
            })
            .copied()
            .collect();
    }
    if let Some(names) = &tls.kx_groups {
        // In the configured order: the first is the server's preference.
        provider.kx_groups = names
            .iter()
            .filter_map(|n| {
                rustls::crypto::aws_lc_rs::ALL_KX_GROUPS
                    .iter()
                    .find(|g| g.name().as_str() == Some(n.as_str()))
            })
            .copied()
            .collect();
    }
    let mut server = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    server.session_storage = resumption.storage.clone();
    if let Some(ticketer) = &resumption.ticketer {
        server.ticketer = ticketer.clone();
    }
    server.alpn_protocols = tls.alpn.clone();
    // The server's order of suites decides, not the client's: every client then gets the
    // strongest suite both support (testssl.sh flags the opposite as "NOT ok"), and the
    // policy an administrator writes in `cipher_suites` means what it says.
    server.ignore_client_order = true;
    // The ktls relay engine hands the session keys to the kernel after negotiation; rustls
    // refuses to give them out unless asked for here. TLS 1.3 tickets are still sent
    // during the handshake (rustls' default), so none is due after the switch.
    server.enable_secret_extraction = true;
    // The copy engine takes the records over from rustls too (relay/record.rs), and needs
    // the TLS 1.3 traffic secrets to follow a client's KeyUpdate: each connection gets a
    // copy of this config with a key log of its own (secrets::accept), none is set here.
    Ok(Arc::new(server))
}

/// What a finished handshake established, for the PROXY header and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFacts {
    /// "TLSv1.2" or "TLSv1.3", as OpenSSL (and so HAProxy and Dovecot) spell it.
    pub version: &'static str,
    /// The IANA name of the cipher suite, e.g. "TLS_AES_128_GCM_SHA256".
    pub cipher: String,
    /// The server name the client asked for, if any.
    pub sni: Option<String>,
}

impl TlsFacts {
    pub fn of(conn: &ServerConnection) -> TlsFacts {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .map(iana_suite_name)
            .unwrap_or_else(|| "unknown".to_owned());
        TlsFacts { version, cipher, sni: conn.server_name().map(str::to_owned) }
    }
}

/// rustls names TLS 1.3 suites "TLS13_…"; the IANA registry (and the PROXY v2 spec's
/// consumers) call them "TLS_…". TLS 1.2 names already match.
fn iana_suite_name(rustls_name: &str) -> String {
    match rustls_name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => rustls_name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_names_are_iana() {
        assert_eq!(iana_suite_name("TLS13_AES_128_GCM_SHA256"), "TLS_AES_128_GCM_SHA256");
        assert_eq!(
            iana_suite_name("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
        );
    }
}
