//! The live set of certificates and the choice among them for each handshake: by SNI
//! (exact names, then `*.` wildcards), then by the signature schemes the client offers.
//!
//! The set is swapped atomically on reload: new handshakes see the new set, handshakes in
//! flight and open sessions keep what they had.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use super::load::LoadedCert;

/// The certificates served, in config order; the first is the default.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<Vec<Arc<LoadedCert>>>,
}

impl CertStore {
    /// A store serving `certs`; the caller guarantees it is not empty.
    pub fn new(certs: Vec<LoadedCert>) -> Self {
        CertStore { current: ArcSwap::from_pointee(certs.into_iter().map(Arc::new).collect()) }
    }

    /// Replaces the whole set at once; callers validate every entry first, so a broken
    /// file never replaces a working certificate.
    pub fn replace(&self, certs: Vec<LoadedCert>) {
        if !certs.is_empty() {
            self.current.store(Arc::new(certs.into_iter().map(Arc::new).collect()));
        }
    }

    /// The set served now.
    pub fn current(&self) -> Arc<Vec<Arc<LoadedCert>>> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.load();
        choose(&set, hello.server_name(), hello.signature_schemes()).map(|c| c.certified.clone())
    }
}

/// The certificate for a client that asked for `sni` and can verify `schemes`.
///
/// Candidates are the entries naming `sni` exactly; failing that, those whose wildcard
/// covers it; failing that (or without SNI), the default: the first entry and any other
/// entry for the same names (an RSA twin of an ECDSA default, say). Among candidates the
/// first whose key can sign with an offered scheme wins, so an RSA-only client gets the
/// RSA chain and everyone else the config's preferred one.
pub fn choose<'a>(
    set: &'a [Arc<LoadedCert>],
    sni: Option<&str>,
    schemes: &[SignatureScheme],
) -> Option<&'a Arc<LoadedCert>> {
    let sni = sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase());
    let mut candidates: Vec<&Arc<LoadedCert>> = Vec::new();
    if let Some(name) = &sni {
        candidates = set.iter().filter(|c| c.names.iter().any(|n| n == name)).collect();
        if candidates.is_empty() {
            candidates = set.iter().filter(|c| c.names.iter().any(|n| wildcard_covers(n, name))).collect();
        }
    }
    if candidates.is_empty() {
        let default = set.first()?;
        candidates = set.iter().filter(|c| c.names == default.names).collect();
    }
    candidates
        .iter()
        .find(|c| c.certified.key.choose_scheme(schemes).is_some())
        .or_else(|| candidates.first())
        .copied()
}

/// `*.example.org` covers `mail.example.org`, not `example.org` nor `a.b.example.org`
/// (RFC 6125 6.4.3: the wildcard stands for exactly one label).
fn wildcard_covers(pattern: &str, name: &str) -> bool {
    match (pattern.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((label, rest))) => !label.is_empty() && rest == suffix,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(wildcard_covers("*.example.org", "mail.example.org"));
        assert!(!wildcard_covers("*.example.org", "example.org"));
        assert!(!wildcard_covers("*.example.org", "a.b.example.org"));
        assert!(!wildcard_covers("mail.example.org", "mail.example.org"));
    }
}
