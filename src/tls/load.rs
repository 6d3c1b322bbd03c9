//! Loading one certificate entry from PEM files into a rustls `CertifiedKey`, checked so
//! that a broken pair is reported with the file and the reason and never used.

use std::path::Path;
use std::sync::Arc;

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
}

/// Reads, parses and checks one `[[tls.certificates]]` entry.
pub fn load_entry(
    entry: &CertificateConfig,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, LoadError> {
    let chain = read_chain(&entry.cert, &entry.cert_origin)?;
    let key = read_key(&entry.key, &entry.key_origin)?;
    let signing_key = provider.key_provider.load_private_key(key).map_err(|e| LoadError::BadKey {
        origin: entry.key_origin.clone(),
        file: entry.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| LoadError::Mismatch {
        origin: entry.key_origin.clone(),
        key_file: entry.key.display().to_string(),
        cert_file: entry.cert.display().to_string(),
    })?;
    Ok(Arc::new(certified))
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

/// For trials only (`self_signed = true`): when neither file exists, write a self-signed
/// ECDSA P-256 pair for `names`. Returns whether it created one, so the caller can warn.
pub fn create_self_signed_if_missing(entry: &CertificateConfig, names: &[String]) -> Result<bool, LoadError> {
    if !entry.self_signed || entry.cert.exists() || entry.key.exists() {
        return Ok(false);
    }
    let fail = |reason: String| LoadError::SelfSigned { origin: entry.cert_origin.clone(), reason };
    let key_pair = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| fail(e.to_string()))?;
    if let Some(first) = names.first() {
        params.distinguished_name.push(rcgen::DnType::CommonName, first.as_str());
    }
    let cert = params.self_signed(&key_pair).map_err(|e| fail(e.to_string()))?;
    for dir in [entry.cert.parent(), entry.key.parent()].into_iter().flatten() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    }
    write_private(&entry.key, key_pair.serialize_pem().as_bytes()).map_err(|e| fail(e.to_string()))?;
    std::fs::write(&entry.cert, cert.pem()).map_err(|e| fail(e.to_string()))?;
    Ok(true)
}

/// A private key is created readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}
