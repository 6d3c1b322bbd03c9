//! Loading one certificate entry from PEM files into a rustls `CertifiedKey`, checked so
//! that a broken pair is reported with the file and the reason and never used.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{CertificateConfig, Origin};

/// Why a certificate entry could not be used; names the config key, its line and the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{origin}: cannot read {file}: {reason}")]
    Unreadable { origin: Origin, file: String, reason: String },
    #[error("{origin}: {file} holds no PEM certificate")]
    NoCertificate { origin: Origin, file: String },
    #[error("{origin}: {file} holds no usable private key: {reason}")]
    BadKey { origin: Origin, file: String, reason: String },
    #[error("{origin}: the key in {key_file} does not match the certificate in {cert_file}")]
    Mismatch { origin: Origin, key_file: String, cert_file: String },
    #[error("{origin}: cannot create a self-signed certificate: {reason}")]
    SelfSigned { origin: Origin, reason: String },
    #[error("{origin}: the certificate in {file} cannot be parsed: {reason}")]
    BadCertificate { origin: Origin, file: String, reason: String },
    #[error("{origin}: the certificate in {file} expired on {not_after}")]
    Expired { origin: Origin, file: String, not_after: String },
    #[error("{origin}: the certificate in {file} names no host (no DNS name in subjectAltName or CN)")]
    NoNames { origin: Origin, file: String },
    #[error("{origin}: cannot read OCSP response {file}: {reason}")]
    Ocsp { origin: Origin, file: String, reason: String },
}

/// A certificate entry ready to serve, with the facts read from its leaf.
#[derive(Debug)]
pub struct LoadedCert {
    pub certified: Arc<CertifiedKey>,
    /// DNS names from subjectAltName (or the CN when there is none), lower case;
    /// wildcards keep their `*.` prefix.
    pub names: Vec<String>,
    /// The leaf's notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// The leaf's notAfter as a date, e.g. "2027-02-27".
    pub not_after_date: String,
    /// "RSA-2048", "ECDSA-256", "Ed25519", ...
    pub key_type: String,
    /// The certificate file, for logs.
    pub source: String,
}

impl LoadedCert {
    /// Whole days until the leaf expires (negative once it has).
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// What the leaf certificate says about itself.
struct LeafFacts {
    names: Vec<String>,
    not_after: i64,
    not_after_date: String,
    key_type: String,
}

fn leaf_facts(der: &[u8], origin: &Origin, file: &Path) -> Result<LeafFacts, LoadError> {
    let bad = |reason: String| LoadError::BadCertificate {
        origin: origin.clone(),
        file: file.display().to_string(),
        reason,
    };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(bad(format!("subjectAltName: {e}"))),
    };
    if names.is_empty() {
        // Only without SAN does a client look at the CN (RFC 6125 6.4.4).
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(|s| s.to_ascii_lowercase()),
        );
    }
    let not_after = cert.validity().not_after;
    let key_type = match cert.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA-{}", rsa.key_size()),
        Ok(PublicKey::EC(point)) => format!("ECDSA-{}", point.key_size()),
        Ok(PublicKey::Unknown(_))
            if cert.public_key().algorithm.algorithm.to_id_string() == "1.3.101.112" =>
        {
            "Ed25519".to_owned()
        }
        _ => cert.public_key().algorithm.algorithm.to_id_string(),
    };
    Ok(LeafFacts {
        names,
        not_after: not_after.timestamp(),
        not_after_date: not_after.to_datetime().date().to_string(),
        key_type,
    })
}

/// Reads, parses and checks one `[[tls.certificates]]` entry: the chain parses, the key
/// matches the leaf, the leaf names a host and has not expired, the OCSP file is readable.
pub fn load_entry(entry: &CertificateConfig, provider: &CryptoProvider) -> Result<LoadedCert, LoadError> {
    let chain = read_chain(&entry.cert, &entry.cert_origin)?;
    let facts = leaf_facts(&chain[0], &entry.cert_origin, &entry.cert)?;
    if facts.names.is_empty() {
        return Err(LoadError::NoNames {
            origin: entry.cert_origin.clone(),
            file: entry.cert.display().to_string(),
        });
    }
    if facts.not_after < now() {
        return Err(LoadError::Expired {
            origin: entry.cert_origin.clone(),
            file: entry.cert.display().to_string(),
            not_after: facts.not_after_date,
        });
    }
    let key = read_key(&entry.key, &entry.key_origin)?;
    let signing_key = provider.key_provider.load_private_key(key).map_err(|e| LoadError::BadKey {
        origin: entry.key_origin.clone(),
        file: entry.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| LoadError::Mismatch {
        origin: entry.key_origin.clone(),
        key_file: entry.key.display().to_string(),
        cert_file: entry.cert.display().to_string(),
    })?;
    if let (Some(file), Some(origin)) = (&entry.ocsp, &entry.ocsp_origin) {
        certified.ocsp = Some(read_ocsp(file, origin)?);
    }
    Ok(LoadedCert {
        certified: Arc::new(certified),
        names: facts.names,
        not_after: facts.not_after,
        not_after_date: facts.not_after_date,
        key_type: facts.key_type,
        source: entry.cert.display().to_string(),
    })
}

/// An OCSP response is stapled as given (DER, as `openssl ocsp -respout` writes it); an
/// empty file is refused, since stapling nothing would make strict clients fail.
fn read_ocsp(path: &Path, origin: &Origin) -> Result<Vec<u8>, LoadError> {
    let fail =
        |reason: String| LoadError::Ocsp { origin: origin.clone(), file: path.display().to_string(), reason };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    // An OCSPResponse is a DER SEQUENCE.
    if bytes.first() != Some(&0x30) {
        return Err(fail("not a DER OCSP response".to_owned()));
    }
    Ok(bytes)
}

fn read_chain(path: &Path, origin: &Origin) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let unreadable = |reason: String| LoadError::Unreadable {
        origin: origin.clone(),
        file: path.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(e.to_string()))?;
    if chain.is_empty() {
        return Err(LoadError::NoCertificate { origin: origin.clone(), file: path.display().to_string() });
    }
    Ok(chain)
}

fn read_key(path: &Path, origin: &Origin) -> Result<PrivateKeyDer<'static>, LoadError> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(LoadError::Unreadable {
            origin: origin.clone(),
            file: path.display().to_string(),
            reason: e.to_string(),
        });
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| LoadError::BadKey {
        origin: origin.clone(),
        file: path.display().to_string(),
        reason: e.to_string(),
    })
}
