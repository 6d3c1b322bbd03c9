//! The trial certificate of `self_signed = true`: an honest, short-lived self-signed pair
//! that mailtls creates where both files are missing and renews as it nears its end.
//!
//! Honest: valid from the moment it is made for [`VALIDITY_DAYS`], like a real one, so
//! clients and scanners see a certificate that expires rather than one valid until 4096.
//! Only pairs mailtls made are ever renewed (they carry [`MARKER`] as their organization,
//! issued by themselves): a certificate someone installed at those paths is left alone.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::load::{now, LoadError};
use crate::config::CertificateConfig;

/// How long a trial certificate is valid.
pub const VALIDITY_DAYS: i64 = 90;
/// A trial certificate with fewer days left than this is replaced when loaded (at start,
/// on SIGHUP, on a reload).
pub const RENEW_WITHIN_DAYS: i64 = 30;
/// The subject organization that marks a certificate as one of mailtls's trials.
pub const MARKER: &str = "mailtls self-signed trial certificate";

/// What the trial pair at an entry's paths needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Nothing: not a trial entry, a pair mailtls did not make, or a trial with time left.
    Nothing,
    /// Neither file exists.
    Create,
    /// A trial pair mailtls made that expires on this date (or did already).
    Renew { not_after: String },
}

/// What [`ensure`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Done {
    Nothing,
    Created,
    Renewed { old_not_after: String },
}

/// Whether the entry's trial pair must be created or renewed now.
pub fn need(entry: &CertificateConfig) -> Need {
    if !entry.self_signed {
        return Need::Nothing;
    }
    if !entry.cert.exists() && !entry.key.exists() {
        return Need::Create;
    }
    match trial_not_after(&entry.cert) {
        Some((not_after, date)) if not_after - now() < RENEW_WITHIN_DAYS * 86_400 => {
            Need::Renew { not_after: date }
        }
        _ => Need::Nothing,
    }
}

/// Creates or renews the entry's trial pair for `names` as [`need`] says.
pub fn ensure(entry: &CertificateConfig, names: &[String]) -> Result<Done, LoadError> {
    match need(entry) {
        Need::Nothing => Ok(Done::Nothing),
        Need::Create => write_pair(entry, names).map(|()| Done::Created),
        Need::Renew { not_after } => {
            write_pair(entry, names).map(|()| Done::Renewed { old_not_after: not_after })
        }
    }
}

/// Whether the certificate file holds one of mailtls's trial certificates (for logs).
pub fn is_trial(cert: &Path) -> bool {
    trial_not_after(cert).is_some()
}

/// The notAfter (Unix seconds, and as a date) of the trial certificate in `path`; `None`
/// when the file does not hold one mailtls made.
fn trial_not_after(path: &Path) -> Option<(i64, String)> {
    let der = CertificateDer::pem_file_iter(path).ok()?.next()?.ok()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    let marked = cert.subject().iter_organization().any(|o| o.as_str() == Ok(MARKER));
    if !marked || cert.subject() != cert.issuer() {
        return None;
    }
    let not_after = cert.validity().not_after;
    Some((not_after.timestamp(), not_after.to_datetime().date().to_string()))
}

/// Writes a fresh ECDSA P-256 pair, each file under a temporary name renamed into place,
/// so a reader never sees half a file.
fn write_pair(entry: &CertificateConfig, names: &[String]) -> Result<(), LoadError> {
    let fail = |reason: String| LoadError::SelfSigned { origin: entry.cert_origin.clone(), reason };
    let key_pair = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| fail(e.to_string()))?;
    if let Some(first) = names.first() {
        params.distinguished_name.push(rcgen::DnType::CommonName, first.as_str());
    }
    params.distinguished_name.push(rcgen::DnType::OrganizationName, MARKER);
    // A minute of slack for clients whose clock is a little behind.
    let start = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    params.not_before = start;
    params.not_after = start + time::Duration::days(VALIDITY_DAYS);
    // No serial given: rcgen derives it from the new public key, so a renewal never
    // repeats its predecessor's.
    let cert = params.self_signed(&key_pair).map_err(|e| fail(e.to_string()))?;
    for dir in [entry.cert.parent(), entry.key.parent()].into_iter().flatten() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    }
    replace(&entry.key, key_pair.serialize_pem().as_bytes(), 0o600)
        .map_err(|e| fail(format!("{}: {e}", entry.key.display())))?;
    replace(&entry.cert, cert.pem().as_bytes(), 0o644)
        .map_err(|e| fail(format!("{}: {e}", entry.cert.display())))
}

/// Writes `bytes` to a new file beside `path` with `mode` and renames it over `path`.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.mailtls-new"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Origin;
    use std::path::PathBuf;

    fn entry(dir: &Path) -> CertificateConfig {
        let origin = |key: &str| Origin { path: PathBuf::from("mailtls.toml"), line: 1, key: key.to_owned() };
        CertificateConfig {
            cert: dir.join("trial-cert.pem"),
            key: dir.join("trial-key.pem"),
            cert_origin: origin("tls.certificates[0].cert"),
            key_origin: origin("tls.certificates[0].key"),
            ocsp: None,
            ocsp_origin: None,
            self_signed: true,
        }
    }

    fn names() -> Vec<String> {
        vec!["mail.test".to_owned(), "localhost".to_owned()]
    }

    /// A self-signed pair at the entry's paths valid for `days` from `from_days` ago,
    /// carrying the trial marker or not.
    fn install(entry: &CertificateConfig, from_days: i64, days: i64, marked: bool) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(names()).unwrap();
        if marked {
            params.distinguished_name.push(rcgen::DnType::OrganizationName, MARKER);
        }
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(from_days);
        params.not_after = params.not_before + time::Duration::days(days);
        std::fs::write(&entry.key, key.serialize_pem()).unwrap();
        std::fs::write(&entry.cert, params.self_signed(&key).unwrap().pem()).unwrap();
    }

    fn validity(path: &Path) -> (i64, i64) {
        let der = CertificateDer::from_pem_file(path).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp())
    }

    #[test]
    fn a_created_trial_is_valid_from_now_for_its_validity_only() {
        let dir = tempfile::tempdir().unwrap();
        let entry = entry(dir.path());
        assert_eq!(ensure(&entry, &names()).unwrap(), Done::Created);
        let (from, until) = validity(&entry.cert);
        let now = now();
        assert!(from <= now && now - from < 300, "notBefore {from}, now {now}");
        assert!(until - from <= (VALIDITY_DAYS + 1) * 86_400, "valid for {} days", (until - from) / 86_400);
        assert!(is_trial(&entry.cert));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&entry.key).unwrap().permissions().mode() & 0o777, 0o600);
        // Fresh: nothing more to do.
        assert_eq!(need(&entry), Need::Nothing);
    }

    #[test]
    fn an_expired_or_expiring_trial_is_renewed() {
        for (from_days, days) in [(100, 90), (80, 90)] {
            let dir = tempfile::tempdir().unwrap();
            let entry = entry(dir.path());
            install(&entry, from_days, days, true);
            let old = validity(&entry.cert);
            assert!(matches!(ensure(&entry, &names()).unwrap(), Done::Renewed { .. }), "{from_days}/{days}");
            let (from, until) = validity(&entry.cert);
            assert!(until > old.1 && until - now() > (VALIDITY_DAYS - 1) * 86_400);
            assert!(from <= now());
            let loaded = super::super::load::load_entry(&entry, &crate::tls::provider());
            assert!(loaded.is_ok(), "the renewed pair does not load: {:?}", loaded.err());
        }
    }

    #[test]
    fn a_trial_with_time_left_and_a_pair_mailtls_did_not_make_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let entry = entry(dir.path());
        install(&entry, 10, 90, true);
        assert_eq!(ensure(&entry, &names()).unwrap(), Done::Nothing);
        // Someone else's self-signed certificate at these paths, expired: not ours to replace.
        install(&entry, 100, 90, false);
        let before = std::fs::read(&entry.cert).unwrap();
        assert_eq!(ensure(&entry, &names()).unwrap(), Done::Nothing);
        assert_eq!(std::fs::read(&entry.cert).unwrap(), before);
        // Nor anything without self_signed = true.
        let mut plain = entry.clone();
        plain.self_signed = false;
        install(&plain, 100, 90, true);
        assert_eq!(need(&plain), Need::Nothing);
    }
}
