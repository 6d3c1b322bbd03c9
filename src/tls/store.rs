//! The live set of certificates, swapped atomically on reload: new handshakes see the
//! new set, handshakes in flight and open sessions keep what they had.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The certificates served, in config order; the first is the default.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<Vec<Arc<CertifiedKey>>>,
}

impl CertStore {
    /// A store serving `certs`; the caller guarantees it is not empty.
    pub fn new(certs: Vec<Arc<CertifiedKey>>) -> Self {
        CertStore { current: ArcSwap::from_pointee(certs) }
    }

    /// Replaces the whole set at once; callers validate every entry first, so a broken
    /// file never replaces a working certificate.
    pub fn replace(&self, certs: Vec<Arc<CertifiedKey>>) {
        if !certs.is_empty() {
            self.current.store(Arc::new(certs));
        }
    }

    fn default_cert(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().first().cloned()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.default_cert()
    }
}
