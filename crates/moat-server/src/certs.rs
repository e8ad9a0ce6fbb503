//! A CA and a serving certificate for the webhook (`moat certs`, `moat serve --self-signed`).
//! Private keys are written with mode 0600, atomically (a temporary file, then a rename).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Validity of generated certificates, in days. A year: long enough for a lab, short enough to
/// be rotated; clusters renew them with cert-manager (`moat install --cert-manager`) or moat's
/// own rotation (`moat install --rotate-certs`, [`crate::rotation`]).
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
    #[error("not a usable PEM certificate: {0}")]
    Parse(String),
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

/// How far back a new certificate's `notBefore` is set, for clocks a little behind ours.
const BACKDATE: Duration = Duration::from_secs(300);

fn validity(params: &mut CertificateParams, now: SystemTime, not_after: SystemTime) {
    params.not_before = (now - BACKDATE).into();
    params.not_after = not_after.into();
}

fn year() -> Duration {
    Duration::from_secs(86_400 * CERT_VALIDITY_DAYS.unsigned_abs())
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

/// A new CA, and a serving certificate it signs for `names` (DNS names or IP addresses), both
/// valid for [`CERT_VALIDITY_DAYS`].
///
/// # Errors
/// [`CertError::NoNames`], [`CertError::InvalidName`], or a generation failure.
pub fn generate(names: &[String]) -> Result<Generated, CertError> {
    let now = SystemTime::now();
    let sans = subject_alt_names(names)?;
    let ca = new_ca(now, year())?;
    let (cert_pem, key_pem) = sign(&ca, names, sans, now, year())?;
    Ok(Generated {
        ca_cert_pem: ca.cert_pem,
        ca_key_pem: ca.key_pem,
        cert_pem,
        key_pem,
    })
}

/// Checks that `names` can be certified: at least one, each a DNS name or an IP address.
///
/// # Errors
/// [`CertError::NoNames`] or [`CertError::InvalidName`].
pub fn check_names(names: &[String]) -> Result<(), CertError> {
    subject_alt_names(names).map(drop)
}

fn subject_alt_names(names: &[String]) -> Result<Vec<SanType>, CertError> {
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
    Ok(sans)
}

/// A CA certificate and its key (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Authority {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A new self-signed CA valid from `now` for `lifetime`. Its common name carries the issue time,
/// so two CAs trusted side by side during a rotation have different subjects.
///
/// # Errors
/// A generation failure.
pub fn new_ca(now: SystemTime, lifetime: Duration) -> Result<Authority, CertError> {
    let key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let issued = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    ca.distinguished_name
        .push(DnType::CommonName, format!("moat webhook CA {issued}"));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca, now, now + lifetime);
    let cert = ca.self_signed(&key)?;
    Ok(Authority {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A serving certificate and key (PEM) for `names`, signed by `ca`, valid from `now` for
/// `lifetime` but never past the CA's own expiry.
///
/// # Errors
/// [`CertError::NoNames`], [`CertError::InvalidName`], [`CertError::Parse`] when `ca` does not
/// parse, or a generation failure.
pub fn issue(
    ca: &Authority,
    names: &[String],
    now: SystemTime,
    lifetime: Duration,
) -> Result<(String, String), CertError> {
    let sans = subject_alt_names(names)?;
    sign(ca, names, sans, now, lifetime)
}

fn sign(
    ca: &Authority,
    names: &[String],
    sans: Vec<SanType>,
    now: SystemTime,
    lifetime: Duration,
) -> Result<(String, String), CertError> {
    let ca_not_after = Validity::of(&ca.cert_pem)?.not_after;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, KeyPair::from_pem(&ca.key_pem)?)?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = sans;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("moat", String::as_str),
    );
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut leaf, now, (now + lifetime).min(ca_not_after));
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The validity period of a PEM certificate (the first in the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Reads the validity of the first certificate in `pem`.
    ///
    /// # Errors
    /// [`CertError::Parse`] when `pem` holds no parsable certificate.
    pub fn of(pem: &str) -> Result<Self, CertError> {
        with_certificate(pem, |cert| {
            let at = |t: x509_parser::time::ASN1Time| {
                let secs = t.timestamp();
                std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or_default())
            };
            Ok(Self {
                not_before: at(cert.validity().not_before),
                not_after: at(cert.validity().not_after),
            })
        })
    }

    /// Whether less than a third of the lifetime remains at `now` (or the certificate is not
    /// valid yet): the point at which moat replaces it, leaving two thirds of the lifetime for
    /// the replacement to reach every reader.
    pub fn due_for_renewal(&self, now: SystemTime) -> bool {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        match self.not_after.duration_since(now) {
            Ok(remaining) => remaining < lifetime / 3 || now < self.not_before,
            Err(_) => true,
        }
    }
}

/// Whether the first certificate in `leaf_pem` carries a valid signature of the first
/// certificate in `ca_pem`. Unparsable input is "no".
pub fn signed_by(leaf_pem: &str, ca_pem: &str) -> bool {
    with_certificate(ca_pem, |ca| {
        with_certificate(leaf_pem, |leaf| {
            Ok(leaf.issuer() == ca.subject()
                && leaf.verify_signature(Some(ca.public_key())).is_ok())
        })
    })
    .unwrap_or(false)
}

fn with_certificate<T>(
    pem: &str,
    f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> Result<T, CertError>,
) -> Result<T, CertError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    f(&cert)
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
