//! Serving certificate, reloaded when its files change: every TLS handshake asks the store for the
//! current key, so a rotated Secret takes effect on the next connection without a restart, and
//! connections already open keep the key they started with. A bad new file is rejected and the
//! old key kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// ALPN protocols offered: HTTP/2 first, as the API server prefers it.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: String },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("certificate and key do not form a usable pair: {0}")]
    Key(rustls::Error),
}

/// Inode, modification time and length of both files: a change in any means "reload". The inode
/// catches a rename over the file (how Secret volumes and atomic writers replace files) even
/// within the file system's timestamp granularity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp([(u64, Option<SystemTime>, u64); 2]);

pub(crate) fn file_stamp(p: &Path) -> (u64, Option<SystemTime>, u64) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or((0, None, 0), |m| (m.ino(), m.modified().ok(), m.len()))
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    Stamp([file_stamp(cert), file_stamp(key)])
}

/// The current certificate and key, and where they come from.
#[derive(Debug)]
pub struct CertStore {
    /// `None` until a first pair arrives ([`CertStore::awaiting_files`]): handshakes fail.
    current: RwLock<Option<Arc<CertifiedKey>>>,
    files: Option<(PathBuf, PathBuf)>,
    stamp: Mutex<Option<Stamp>>,
}

fn certified_key(
    cert_pem: &[u8],
    cert_name: &str,
    key_pem: &[u8],
    key_name: &str,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_name.to_owned(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_name.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        path: key_name.to_owned(),
        message: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(TlsError::Key)
}

fn pem_pair(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    certified_key(
        cert_pem.as_bytes(),
        "certificate",
        key_pem.as_bytes(),
        "key",
    )
}

fn load_files(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    certified_key(
        &read(cert)?,
        &cert.display().to_string(),
        &read(key)?,
        &key.display().to_string(),
    )
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl CertStore {
    /// A store for material held in memory (`--self-signed`); never reloaded.
    ///
    /// # Errors
    /// [`TlsError`] when the PEM does not parse or the key does not match.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = pem_pair(cert_pem, key_pem)?;
        Ok(Self {
            current: RwLock::new(Some(Arc::new(key))),
            files: None,
            stamp: Mutex::new(None),
        })
    }

    /// A store loaded from PEM files, reloaded by [`CertStore::reload_if_changed`].
    ///
    /// # Errors
    /// [`TlsError`] naming the file at fault.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let before = stamp(cert, key);
        let loaded = load_files(cert, key)?;
        Ok(Self {
            current: RwLock::new(Some(Arc::new(loaded))),
            files: Some((cert.to_owned(), key.to_owned())),
            stamp: Mutex::new(Some(before)),
        })
    }

    /// A store for files that may not exist yet: the Secret volume of a first install, before
    /// moat created the Secret (the volume is optional) and the kubelet synced it. Until the
    /// files or [`CertStore::fill_if_empty`] bring a pair, handshakes fail.
    ///
    /// # Errors
    /// [`TlsError`] when both files exist and do not load.
    pub fn awaiting_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        if cert.exists() && key.exists() {
            return Self::from_files(cert, key);
        }
        Ok(Self {
            current: RwLock::new(None),
            files: Some((cert.to_owned(), key.to_owned())),
            stamp: Mutex::new(Some(stamp(cert, key))),
        })
    }

    /// Whether a pair is loaded.
    pub fn is_empty(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
    }

    /// Serves `cert_pem`/`key_pem` if nothing is loaded yet (read from the Secret through the
    /// API while the kubelet has not synced the volume); the files take over when they change.
    /// `Ok(true)` when the pair was taken.
    ///
    /// # Errors
    /// [`TlsError`] when the PEM does not parse or the key does not match.
    pub fn fill_if_empty(&self, cert_pem: &str, key_pem: &str) -> Result<bool, TlsError> {
        let key = pem_pair(cert_pem, key_pem)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.is_some() {
            return Ok(false);
        }
        *current = Some(Arc::new(key));
        Ok(true)
    }

    /// The certificate served now (the chain's leaf), as PEM.
    pub fn leaf_pem(&self) -> Option<String> {
        use base64::Engine as _;
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        let der = current.cert.first()?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).ok()?);
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        Some(pem)
    }

    /// Reloads the files if either changed since the last load. `Ok(true)`: a new key is in use.
    /// On error the old key stays in use; the same change is not retried until the files change
    /// again.
    ///
    /// # Errors
    /// [`TlsError`] naming the file at fault.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let Some((cert, key)) = &self.files else {
            return Ok(false);
        };
        let now = stamp(cert, key);
        {
            let mut last = self
                .stamp
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.as_ref() == Some(&now) {
                return Ok(false);
            }
            *last = Some(now);
        }
        let loaded = load_files(cert, key)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(loaded));
        Ok(true)
    }

    /// A rustls server configuration that asks this store for the key on every handshake.
    pub fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        self.server_config_with_clients(None)
    }

    /// The same, also asking clients for a certificate signed by `client_roots` when given. A
    /// client that presents none still connects (the kubelet's probes do not have one); the
    /// server then serves it health endpoints only. A client that presents a certificate the
    /// roots did not sign fails the handshake.
    pub fn server_config_with_clients(
        self: &Arc<Self>,
        client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> rustls::ServerConfig {
        let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable_versions());
        let mut config = match client_verifier {
            Some(v) => builder.with_client_cert_verifier(v),
            None => builder.with_no_client_auth(),
        }
        .with_cert_resolver(self.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        config
    }
}

/// A verifier of client certificates signed by the CAs in `path` (PEM), for authenticating the
/// API server's calls; clients without a certificate are let through to be told apart later.
///
/// # Errors
/// [`TlsError`] when the file does not read or holds no usable CA certificate.
pub fn client_verifier(
    path: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let name = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: name.clone(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| TlsError::Pem {
            path: name.clone(),
            message: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: name.clone(),
            message: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate { path: name });
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| TlsError::Pem {
        path: name,
        message: e.to_string(),
    })
}

#[expect(
    clippy::panic,
    reason = "ring's provider supports the safe default versions by construction"
)]
fn unreachable_versions() -> rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier> {
    panic!("the ring provider rejected the default TLS versions")
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{generate, write_atomic};

    #[test]
    fn reloads_on_change_and_keeps_the_old_key_on_a_bad_file() {
        let dir = std::env::temp_dir().join(format!("moat-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let first = generate(&["localhost".to_owned()]).unwrap();
        write_atomic(&cert, first.cert_pem.as_bytes(), 0o644).unwrap();
        write_atomic(&key, first.key_pem.as_bytes(), 0o600).unwrap();
        let store = CertStore::from_files(&cert, &key).unwrap();
        let fingerprint =
            |s: &CertStore| s.current.read().unwrap().as_ref().unwrap().cert[0].to_vec();
        let original = fingerprint(&store);
        assert!(
            !store.reload_if_changed().unwrap(),
            "unchanged files are not reloaded"
        );

        // A certificate whose key does not match: rejected, the old pair stays.
        let second = generate(&["localhost".to_owned()]).unwrap();
        write_atomic(&cert, second.cert_pem.as_bytes(), 0o644).unwrap();
        assert!(matches!(store.reload_if_changed(), Err(TlsError::Key(_))));
        assert_eq!(fingerprint(&store), original);

        write_atomic(&key, second.key_pem.as_bytes(), 0o600).unwrap();
        assert!(store.reload_if_changed().unwrap());
        assert_ne!(fingerprint(&store), original);

        write_atomic(&cert, b"not pem", 0o644).unwrap();
        assert!(matches!(
            store.reload_if_changed(),
            Err(TlsError::NoCertificate { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_awaiting_its_files_serves_nothing_until_a_pair_arrives() {
        let dir = std::env::temp_dir().join(format!("moat-tls-await-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let store = CertStore::awaiting_files(&cert, &key).unwrap();
        assert!(store.is_empty() && store.leaf_pem().is_none());
        assert!(!store.reload_if_changed().unwrap(), "still no files");

        // The pair read through the API fills the gap once; a second pair does not replace it.
        let api = generate(&["localhost".to_owned()]).unwrap();
        assert!(store.fill_if_empty(&api.cert_pem, &api.key_pem).unwrap());
        let other = generate(&["localhost".to_owned()]).unwrap();
        assert!(
            !store
                .fill_if_empty(&other.cert_pem, &other.key_pem)
                .unwrap()
        );
        assert!(store.fill_if_empty(&api.cert_pem, &other.key_pem).is_err());
        let served = store.leaf_pem().unwrap();

        // Then the kubelet writes the volume: the files take over.
        write_atomic(&cert, other.cert_pem.as_bytes(), 0o644).unwrap();
        write_atomic(&key, other.key_pem.as_bytes(), 0o600).unwrap();
        assert!(store.reload_if_changed().unwrap());
        assert_ne!(store.leaf_pem().unwrap(), served);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_files_name_the_path() {
        let e = CertStore::from_files(
            Path::new("/nonexistent/tls.crt"),
            Path::new("/nonexistent/tls.key"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tls.crt"), "{e}");
    }
}
