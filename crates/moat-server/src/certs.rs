//! A CA and a serving certificate for the webhook (`moat certs`, `moat serve --self-signed`).
//! Private keys are written with mode 0600, atomically (a temporary file, then a rename).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Validity of generated certificates, in days. A year: long enough for a lab, short enough to
/// be rotated; production clusters use cert-manager (`moat install --cert-manager`).
pub const CERT_VALIDITY_DAYS: i64 = 365;

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("no DNS name or IP address to certify")]
    NoNames,
    #[error("'{0}' is not a valid DNS name")]
    InvalidName(String),
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// PEM-encoded material.
#[derive(Clone)]
pub struct Generated {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Generated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys never reach a log.
        f.debug_struct("Generated")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams) {
    let now = std::time::SystemTime::now();
    let days = std::time::Duration::from_secs(86_400 * CERT_VALIDITY_DAYS.unsigned_abs());
    params.not_before = (now - std::time::Duration::from_secs(300)).into();
    params.not_after = (now + days).into();
}

/// A DNS name: dot-separated labels of letters, digits and inner hyphens, optionally starting
/// with a `*.` wildcard.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    name.len() <= 253
        && name.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// A new CA, and a serving certificate it signs for `names` (DNS names or IP addresses).
///
/// # Errors
/// [`CertError::NoNames`], [`CertError::InvalidName`], or a generation failure.
pub fn generate(names: &[String]) -> Result<Generated, CertError> {
    if names.is_empty() {
        return Err(CertError::NoNames);
    }
    let mut sans = Vec::new();
    for name in names {
        if let Ok(ip) = name.parse::<IpAddr>() {
            sans.push(SanType::IpAddress(ip));
        } else {
            if !is_dns_name(name) {
                return Err(CertError::InvalidName(name.clone()));
            }
            let dns = name
                .clone()
                .try_into()
                .map_err(|_| CertError::InvalidName(name.clone()))?;
            sans.push(SanType::DnsName(dns));
        }
    }

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "moat webhook CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = sans;
    leaf.distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut leaf);
    let issuer = Issuer::new(ca, &ca_key);
    let cert = leaf.signed_by(&key, &issuer)?;

    Ok(Generated {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes `ca.crt`, `ca.key`, `tls.crt` and `tls.key` into `dir` (created if missing).
/// Certificates are 0644, keys 0600; each file appears whole or not at all.
///
/// # Errors
/// [`CertError::Write`] naming the file.
pub fn write_dir(dir: &Path, g: &Generated) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    write_atomic(&dir.join("ca.crt"), g.ca_cert_pem.as_bytes(), 0o644)?;
    write_atomic(&dir.join("ca.key"), g.ca_key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join("tls.crt"), g.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&dir.join("tls.key"), g.key_pem.as_bytes(), 0o600)?;
    Ok(())
}

/// Writes `bytes` to a temporary file beside `path` created with `mode` (so a key is never
/// readable by others, not even briefly), syncs it, and renames it over `path`.
///
/// # Errors
/// [`CertError::Write`] naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.display().to_string(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_keys_0600_and_certs_0644() {
        let dir = std::env::temp_dir().join(format!("moat-certs-{}", std::process::id()));
        let g = generate(&["moat.moat-system.svc".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        write_dir(&dir, &g).unwrap();
        for (file, mode) in [
            ("ca.crt", 0o644),
            ("ca.key", 0o600),
            ("tls.crt", 0o644),
            ("tls.key", 0o600),
        ] {
            let meta = std::fs::metadata(dir.join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
        }
        // Rewriting replaces whole files and leaves no temporary behind.
        write_dir(&dir, &g).unwrap();
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_empty_and_invalid_names() {
        assert!(matches!(generate(&[]), Err(CertError::NoNames)));
        assert!(matches!(
            generate(&["bad name".to_owned()]),
            Err(CertError::InvalidName(_))
        ));
    }

    #[test]
    fn debug_output_hides_keys() {
        let g = generate(&["localhost".to_owned()]).unwrap();
        assert!(!format!("{g:?}").contains("PRIVATE KEY"));
    }
}
