//! Registry authentication: the `WWW-Authenticate` challenge a registry answers 401 with, and
//! the credentials moat may answer it with (a mounted `kubernetes.io/dockerconfigjson` Secret,
//! read again when it changes).
//!
//! The protocol (distribution's token authentication): a request without credentials gets
//! `401` and `WWW-Authenticate: Bearer realm="https://auth.example/token",service="reg",
//! scope="repository:shop/api:pull"`; the client asks the realm for a token (`GET
//! realm?service=…&scope=…`, with HTTP Basic credentials when it has some, anonymously
//! otherwise), gets `{"token": "…", "expires_in": 300}` and repeats the request with
//! `Authorization: Bearer <token>`. A registry may instead answer `WWW-Authenticate: Basic
//! realm="…"` and take the Basic credentials on every request.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use moat_core::image::canonical_registry;

use crate::limits::MAX_CREDENTIALS_FILE_BYTES;

/// What a registry asks for in its `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP Basic credentials on every request.
    Basic,
    /// A token from `realm`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses the first challenge of a `WWW-Authenticate` value (`scheme param="v", …`).
    /// `None` for a scheme moat does not speak or a Bearer challenge without a realm.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        let params = auth_params(rest);
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        if scheme.eq_ignore_ascii_case("basic") {
            Some(Self::Basic)
        } else if scheme.eq_ignore_ascii_case("bearer") {
            Some(Self::Bearer {
                realm: get("realm")?,
                service: get("service"),
                scope: get("scope"),
            })
        } else {
            None
        }
    }
}

/// `key=value` and `key="quoted \" value"` pairs, comma separated (RFC 9110 auth-param).
fn auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            return out;
        }
        if chars.next() != Some('=') {
            continue;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_owned(), value.trim().to_owned()));
    }
}

/// A user name and password for one registry. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    username: String,
    password: String,
}

impl Login {
    /// `Basic <base64(user:password)>`, the value of an `Authorization` header.
    pub fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            BASE64.encode(format!("{}:{}", self.username, self.password))
        )
    }
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Login({}, <redacted>)", self.username)
    }
}

/// The logins of a `.dockerconfigjson`, by registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DockerConfig {
    logins: HashMap<String, Login>,
}

impl fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hosts: Vec<&String> = self.logins.keys().collect();
        hosts.sort();
        write!(f, "DockerConfig({hosts:?})")
    }
}

#[derive(serde::Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Why a credentials file cannot be used. Never quotes the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} is larger than {MAX_CREDENTIALS_FILE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("{path} is not a .dockerconfigjson document (line {line}, column {column})")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
    },
    #[error("{path}: the login for '{registry}' is not base64 of user:password")]
    BadAuth { path: String, registry: String },
}

impl DockerConfig {
    /// Reads a `.dockerconfigjson` document: `{"auths": {"<registry>": {"auth":
    /// "<base64 user:password>"}}}` (or `username` and `password`). Keys may carry a scheme and
    /// a path (`https://index.docker.io/v1/`), as `docker login` writes them.
    ///
    /// # Errors
    /// A [`CredentialsError`] naming `path` and what is wrong, never a secret.
    pub fn parse(path: &str, json: &[u8]) -> Result<Self, CredentialsError> {
        let file: DockerConfigFile =
            serde_json::from_slice(json).map_err(|e| CredentialsError::Syntax {
                path: path.to_owned(),
                line: e.line(),
                column: e.column(),
            })?;
        let mut logins = HashMap::new();
        for (key, entry) in file.auths {
            let registry = normalise_registry_key(&key);
            let bad = || CredentialsError::BadAuth {
                path: path.to_owned(),
                registry: registry.clone(),
            };
            let login = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = BASE64.decode(auth.trim()).map_err(|_| bad())?;
                    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
                    let (u, p) = decoded.split_once(':').ok_or_else(bad)?;
                    Login {
                        username: u.to_owned(),
                        password: p.to_owned(),
                    }
                }
                (_, Some(username), Some(password)) => Login { username, password },
                _ => continue,
            };
            logins.insert(registry, login);
        }
        Ok(Self { logins })
    }

    /// The login for a registry as image references name it (`docker.io`, `reg:5000`).
    pub fn login(&self, registry: &str) -> Option<&Login> {
        self.logins.get(registry)
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `https://Reg:443/` → `reg`: the registry's
/// canonical name, as image references are looked up by it.
fn normalise_registry_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    canonical_registry(key.split('/').next().unwrap_or(key))
}

/// What identifies a version of the file: a Secret volume replaces it by renaming a new
/// directory into place, which changes the inode; an edit in place changes the time or size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// A `.dockerconfigjson` file on disk, read again when it changes (checked on every registry
/// lookup that misses the cache: one `stat`). A file that stops parsing keeps the last good
/// logins in use and is logged once per change.
#[derive(Debug)]
pub struct Credentials {
    path: PathBuf,
    state: Mutex<CredentialState>,
}

#[derive(Debug)]
struct CredentialState {
    stamp: Option<Stamp>,
    config: Arc<DockerConfig>,
    /// Bumped when the logins change, so tokens got with the old ones are dropped.
    generation: u64,
}

impl Credentials {
    /// The file at `path`; read now, so a file that is wrong at start is an error at start.
    ///
    /// # Errors
    /// The file cannot be read or parsed.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, CredentialsError> {
        let path = path.into();
        let st = stamp(&path).map_err(|e| CredentialsError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let config = read_config(&path)?;
        Ok(Self {
            path,
            state: Mutex::new(CredentialState {
                stamp: Some(st),
                config: Arc::new(config),
                generation: 0,
            }),
        })
    }

    /// The logins in force and their generation, reading the file again if it changed.
    pub fn current(&self) -> (Arc<DockerConfig>, u64) {
        let now = stamp(&self.path).ok();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.is_some() && now != state.stamp {
            state.stamp = now;
            match read_config(&self.path) {
                Ok(config) => {
                    if *state.config != config {
                        state.config = Arc::new(config);
                        state.generation += 1;
                        tracing::info!(path = %self.path.display(), "registry credentials reloaded");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registry credentials unchanged: the new file cannot be used");
                }
            }
        }
        (state.config.clone(), state.generation)
    }
}

fn read_config(path: &Path) -> Result<DockerConfig, CredentialsError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| CredentialsError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_CREDENTIALS_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CredentialsError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    if bytes.len() as u64 > MAX_CREDENTIALS_FILE_BYTES {
        return Err(CredentialsError::TooLarge { path: shown });
    }
    DockerConfig::parse(&shown, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_bearer_challenge_with_quoted_and_escaped_values() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull".into()),
            })
        );
        let c = Challenge::parse(r#"bearer realm="https://a/t\"x", service=plain"#);
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://a/t\"x".into(),
                service: Some("plain".into()),
                scope: None,
            })
        );
    }

    #[test]
    fn reads_a_basic_challenge_and_refuses_unknown_schemes() {
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Negotiate abc"), None);
        assert_eq!(Challenge::parse(r#"Bearer service="x""#), None);
        assert_eq!(Challenge::parse(""), None);
    }

    #[test]
    fn reads_dockerconfigjson_logins_by_normalised_registry() {
        let json = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
            "reg.example:5000": {"username": "u2", "password": "p:2"},
            "https://Other.Example:443/v2/": {"username": "u3", "password": "p3"},
            "empty.example": {}
        }}"#;
        let c = DockerConfig::parse("f", json).unwrap();
        assert_eq!(
            c.login("docker.io").unwrap().basic_header(),
            "Basic dXNlcjpwYXNz"
        );
        assert_eq!(
            c.login("reg.example:5000").unwrap().basic_header(),
            format!("Basic {}", BASE64.encode("u2:p:2"))
        );
        assert!(c.login("other.example").is_some());
        assert!(c.login("empty.example").is_none());
    }

    #[test]
    fn a_malformed_file_names_the_place_not_the_secret() {
        let e =
            DockerConfig::parse("f", br#"{"auths": {"r": {"auth": "bm9jb2xvbg=="}}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "f: the login for 'r' is not base64 of user:password"
        );
        let e = DockerConfig::parse("f", b"{\"auths\": \"hunter2").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn logins_are_not_printed() {
        let c = DockerConfig::parse("f", br#"{"auths": {"r": {"auth": "dXNlcjpwYXNz"}}}"#).unwrap();
        let shown = format!("{c:?} {:?}", c.login("r").unwrap());
        assert!(
            !shown.contains("pass") && !shown.contains("dXNl"),
            "{shown}"
        );
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_last_logins() {
        let dir = std::env::temp_dir().join(format!("moat-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(
            &path,
            br#"{"auths": {"r": {"username": "a", "password": "1"}}}"#,
        )
        .unwrap();
        let creds = Credentials::open(&path).unwrap();
        let (c, g0) = creds.current();
        assert_eq!(c.login("r").unwrap().username, "a");
        // Rename into place, as the kubelet updates a Secret volume.
        let next = dir.join("next.json");
        std::fs::write(
            &next,
            br#"{"auths": {"r": {"username": "b", "password": "2"}}}"#,
        )
        .unwrap();
        std::fs::rename(&next, &path).unwrap();
        let (c, g1) = creds.current();
        assert_eq!(c.login("r").unwrap().username, "b");
        assert!(g1 > g0);
        std::fs::write(&next, b"{not json").unwrap();
        std::fs::rename(&next, &path).unwrap();
        let (c, g2) = creds.current();
        assert_eq!(c.login("r").unwrap().username, "b");
        assert_eq!(g2, g1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
