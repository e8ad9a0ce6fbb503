//! Per-container identity requests, read from pod annotations.
//!
//! `identity.noderesource.dev/container.<name>` configures container `<name>`;
//! `identity.noderesource.dev/pod` configures every container of the pod that has no key of its
//! own. The value is a YAML (or JSON) list of entries, one per SVID directory:
//!
//! ```yaml
//! - spire_agent_address: /run/spire/admin/admin.sock   # optional: the agent's default
//!   cert_dir: /var/run/secrets/spiffe.io                # optional: the agent's default
//!   svid_file_name: svid.pem                            # optional
//!   svid_key_file_name: svid_key.pem                    # optional
//!   svid_bundle_file_name: bundle.pem                   # optional
//!   spiffe_id: spiffe://example.org/ns/shop/sa/web      # optional: refuse any other ID
//!   fail_open: false                                    # optional: start without an SVID
//! ```
//!
//! An empty list opts a container out of a pod-wide key. Unknown keys, relative or traversing
//! paths, file names with a `/`, and SPIRE sockets the operator did not allow are errors: the
//! container's creation fails with the message, and nothing else is affected.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::defaults::{
    CERT_DIR, SPIRE_ADMIN_SOCKET, SVID_BUNDLE_FILE_NAME, SVID_FILE_NAME, SVID_KEY_FILE_NAME,
};
use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Prefix of the per-container key; the container's name follows.
pub const CONTAINER_KEY_PREFIX: &str = "identity.noderesource.dev/container.";
/// The pod-wide key.
pub const POD_KEY: &str = "identity.noderesource.dev/pod";
/// Longest annotation value read, in bytes.
pub const MAX_ANNOTATION_LEN_BYTES: usize = 16 * 1024;
/// Most entries (SVID directories) one container may ask for.
pub const MAX_ENTRIES_PER_CONTAINER: usize = 4;
/// Longest file name accepted, in bytes (Linux's NAME_MAX).
const MAX_FILE_NAME_LEN_BYTES: usize = 255;

/// What the operator set on the agent: defaults for omitted fields and the SPIRE sockets an
/// annotation may name.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Used when an entry names no `spire_agent_address`; always allowed.
    pub spire_agent_address: PathBuf,
    /// Further sockets entries may name.
    pub allowed_spire_agent_addresses: BTreeSet<PathBuf>,
    /// Used when an entry names no `cert_dir`.
    pub cert_dir: PathBuf,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            spire_agent_address: PathBuf::from(SPIRE_ADMIN_SOCKET),
            allowed_spire_agent_addresses: BTreeSet::new(),
            cert_dir: PathBuf::from(CERT_DIR),
        }
    }
}

/// One validated request: which SPIRE agent, where in the container, under which names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityEntry {
    /// The SPIRE agent's admin socket (absolute, allowed by the operator).
    pub spire_agent_address: PathBuf,
    /// Where the read-only directory appears in the container (absolute, not `/`).
    pub cert_dir: PathBuf,
    /// Certificate chain file name.
    pub svid_file_name: String,
    /// Private key file name.
    pub svid_key_file_name: String,
    /// Trust bundle file name.
    pub svid_bundle_file_name: String,
    /// The SPIFFE ID the SVID must carry, if the annotation names one.
    pub spiffe_id: Option<SpiffeId>,
    /// Start the container without an SVID when none arrives in time.
    pub fail_open: bool,
}

/// Why an annotation was refused. Each names the annotation key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnnotationError {
    #[error("annotation {key}: longer than {MAX_ANNOTATION_LEN_BYTES} bytes")]
    TooLong { key: String },
    #[error("annotation {key}: not a list of identity entries: {reason}")]
    Syntax { key: String, reason: String },
    #[error("annotation {key}: more than {MAX_ENTRIES_PER_CONTAINER} entries")]
    TooManyEntries { key: String },
    #[error(
        "annotation {key}, entry {index}: {field} '{value}' must be an absolute path without '.' or '..'"
    )]
    NotAbsolute {
        key: String,
        index: usize,
        field: &'static str,
        value: String,
    },
    #[error("annotation {key}, entry {index}: cert_dir must not be '/'")]
    RootCertDir { key: String, index: usize },
    #[error(
        "annotation {key}, entry {index}: {field} '{value}' must be a plain file name (no '/', not '.' or '..', at most {MAX_FILE_NAME_LEN_BYTES} bytes)"
    )]
    BadFileName {
        key: String,
        index: usize,
        field: &'static str,
        value: String,
    },
    #[error(
        "annotation {key}, entry {index}: svid_file_name, svid_key_file_name and svid_bundle_file_name must differ"
    )]
    SameFileName { key: String, index: usize },
    #[error(
        "annotation {key}, entry {index}: SPIRE agent socket '{value}' is not one this node's agent may use (allowed: {allowed})"
    )]
    SocketNotAllowed {
        key: String,
        index: usize,
        value: String,
        allowed: String,
    },
    #[error("annotation {key}, entry {index}: spiffe_id: {source}")]
    SpiffeId {
        key: String,
        index: usize,
        source: SpiffeIdError,
    },
    #[error("annotation {key}: two entries use cert_dir '{value}'")]
    DuplicateCertDir { key: String, value: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    spire_agent_address: Option<String>,
    cert_dir: Option<String>,
    svid_file_name: Option<String>,
    svid_key_file_name: Option<String>,
    svid_bundle_file_name: Option<String>,
    spiffe_id: Option<String>,
    #[serde(default)]
    fail_open: bool,
}

/// The identity entries for container `container` of a pod with `annotations`: `Ok(None)` when
/// neither key is present, `Ok(Some(vec![]))` for an explicit opt-out.
///
/// # Errors
/// [`AnnotationError`] naming the key, the entry and the field.
pub fn entries_for(
    annotations: &HashMap<String, String>,
    container: &str,
    defaults: &Defaults,
) -> Result<Option<Vec<IdentityEntry>>, AnnotationError> {
    let own_key = format!("{CONTAINER_KEY_PREFIX}{container}");
    let (key, value) = match annotations.get(&own_key) {
        Some(value) => (own_key, value),
        None => match annotations.get(POD_KEY) {
            Some(value) => (POD_KEY.to_owned(), value),
            None => return Ok(None),
        },
    };
    parse(&key, value, defaults).map(Some)
}

/// Parses and validates one annotation value.
///
/// # Errors
/// [`AnnotationError`] naming `key`, the entry and the field.
pub fn parse(
    key: &str,
    value: &str,
    defaults: &Defaults,
) -> Result<Vec<IdentityEntry>, AnnotationError> {
    if value.len() > MAX_ANNOTATION_LEN_BYTES {
        return Err(AnnotationError::TooLong {
            key: key.to_owned(),
        });
    }
    moat_core::nesting::check_depth(value).map_err(|e| AnnotationError::Syntax {
        key: key.to_owned(),
        reason: format!("the annotation {e}"),
    })?;
    let raw: Vec<RawEntry> =
        serde_yaml_ng::from_str(value).map_err(|e| AnnotationError::Syntax {
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
    if raw.len() > MAX_ENTRIES_PER_CONTAINER {
        return Err(AnnotationError::TooManyEntries {
            key: key.to_owned(),
        });
    }
    let mut seen_dirs = BTreeSet::new();
    let mut entries = Vec::with_capacity(raw.len());
    for (index, raw) in raw.into_iter().enumerate() {
        let entry = validate(key, index, raw, defaults)?;
        if !seen_dirs.insert(entry.cert_dir.clone()) {
            return Err(AnnotationError::DuplicateCertDir {
                key: key.to_owned(),
                value: entry.cert_dir.display().to_string(),
            });
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn validate(
    key: &str,
    index: usize,
    raw: RawEntry,
    defaults: &Defaults,
) -> Result<IdentityEntry, AnnotationError> {
    let RawEntry {
        spire_agent_address,
        cert_dir,
        svid_file_name,
        svid_key_file_name,
        svid_bundle_file_name,
        spiffe_id,
        fail_open,
    } = raw;
    let absolute = |field: &'static str, value: String| {
        let path = PathBuf::from(&value);
        let clean = path.is_absolute()
            && path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            && !value.contains("/./")
            && !value.ends_with("/.");
        if clean {
            Ok(path)
        } else {
            Err(AnnotationError::NotAbsolute {
                key: key.to_owned(),
                index,
                field,
                value,
            })
        }
    };
    let spire_agent_address = match spire_agent_address {
        None => defaults.spire_agent_address.clone(),
        Some(value) => {
            let value = value.strip_prefix("unix://").unwrap_or(&value).to_owned();
            let path = absolute("spire_agent_address", value)?;
            if path != defaults.spire_agent_address
                && !defaults.allowed_spire_agent_addresses.contains(&path)
            {
                let allowed: Vec<String> = std::iter::once(&defaults.spire_agent_address)
                    .chain(&defaults.allowed_spire_agent_addresses)
                    .map(|p| p.display().to_string())
                    .collect();
                return Err(AnnotationError::SocketNotAllowed {
                    key: key.to_owned(),
                    index,
                    value: path.display().to_string(),
                    allowed: allowed.join(", "),
                });
            }
            path
        }
    };
    let cert_dir = match cert_dir {
        None => defaults.cert_dir.clone(),
        Some(value) => absolute("cert_dir", value)?,
    };
    if cert_dir == Path::new("/") {
        return Err(AnnotationError::RootCertDir {
            key: key.to_owned(),
            index,
        });
    }
    let file_name = |field: &'static str, value: Option<String>, default: &str| {
        let value = value.unwrap_or_else(|| default.to_owned());
        let ok = !value.is_empty()
            && value.len() <= MAX_FILE_NAME_LEN_BYTES
            && value != "."
            && value != ".."
            && !value.contains(['/', '\0']);
        if ok {
            Ok(value)
        } else {
            Err(AnnotationError::BadFileName {
                key: key.to_owned(),
                index,
                field,
                value,
            })
        }
    };
    let svid_file_name = file_name("svid_file_name", svid_file_name, SVID_FILE_NAME)?;
    let svid_key_file_name =
        file_name("svid_key_file_name", svid_key_file_name, SVID_KEY_FILE_NAME)?;
    let svid_bundle_file_name = file_name(
        "svid_bundle_file_name",
        svid_bundle_file_name,
        SVID_BUNDLE_FILE_NAME,
    )?;
    if svid_file_name == svid_key_file_name
        || svid_file_name == svid_bundle_file_name
        || svid_key_file_name == svid_bundle_file_name
    {
        return Err(AnnotationError::SameFileName {
            key: key.to_owned(),
            index,
        });
    }
    let spiffe_id =
        spiffe_id
            .map(|s| s.parse())
            .transpose()
            .map_err(|source| AnnotationError::SpiffeId {
                key: key.to_owned(),
                index,
                source,
            })?;
    Ok(IdentityEntry {
        spire_agent_address,
        cert_dir,
        svid_file_name,
        svid_key_file_name,
        svid_bundle_file_name,
        spiffe_id,
        fail_open,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            allowed_spire_agent_addresses: [PathBuf::from("/run/spire/other.sock")].into(),
            ..Defaults::default()
        }
    }

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_seed_format_parses_with_every_field() {
        let value = "
- spire_agent_address: unix:///run/spire/other.sock
  cert_dir: /certs
  svid_file_name: tls.crt
  svid_key_file_name: tls.key
  svid_bundle_file_name: ca.crt
  spiffe_id: spiffe://example.org/web
  fail_open: true
";
        let entries = parse("k", value, &defaults()).unwrap();
        assert_eq!(
            entries,
            [IdentityEntry {
                spire_agent_address: PathBuf::from("/run/spire/other.sock"),
                cert_dir: PathBuf::from("/certs"),
                svid_file_name: "tls.crt".into(),
                svid_key_file_name: "tls.key".into(),
                svid_bundle_file_name: "ca.crt".into(),
                spiffe_id: Some("spiffe://example.org/web".parse().unwrap()),
                fail_open: true,
            }]
        );
    }

    #[test]
    fn omitted_fields_take_the_agents_defaults() {
        let entries = parse("k", "[{}]", &defaults()).unwrap();
        assert_eq!(
            entries,
            [IdentityEntry {
                spire_agent_address: PathBuf::from("/run/spire/admin/admin.sock"),
                cert_dir: PathBuf::from("/var/run/secrets/spiffe.io"),
                svid_file_name: "svid.pem".into(),
                svid_key_file_name: "svid_key.pem".into(),
                svid_bundle_file_name: "bundle.pem".into(),
                spiffe_id: None,
                fail_open: false,
            }]
        );
    }

    #[test]
    fn the_container_key_wins_over_the_pod_key_and_an_empty_list_opts_out() {
        let a = annotations(&[
            (POD_KEY, "[{cert_dir: /pod}]"),
            (
                "identity.noderesource.dev/container.web",
                "[{cert_dir: /web}]",
            ),
            ("identity.noderesource.dev/container.log", "[]"),
        ]);
        let d = defaults();
        let web = entries_for(&a, "web", &d).unwrap().unwrap();
        assert_eq!(web[0].cert_dir, PathBuf::from("/web"));
        let other = entries_for(&a, "other", &d).unwrap().unwrap();
        assert_eq!(other[0].cert_dir, PathBuf::from("/pod"));
        assert_eq!(entries_for(&a, "log", &d).unwrap(), Some(vec![]));
        assert_eq!(entries_for(&annotations(&[]), "web", &d).unwrap(), None);
    }

    #[test]
    fn deeply_nested_annotations_are_refused_before_parsing() {
        // 8,000 levels fit in the length limit; the parser's work would grow with the square.
        let deep = format!("{}{}", "[".repeat(8000), "]".repeat(8000));
        assert!(deep.len() <= MAX_ANNOTATION_LEN_BYTES);
        let e = parse("k", &deep, &defaults()).unwrap_err();
        assert!(e.to_string().contains("levels deep"), "{e}");
    }

    #[test]
    fn bad_annotations_are_refused_with_the_field_named() {
        let d = defaults();
        let long = format!("[{{cert_dir: /{}}}]", "a".repeat(MAX_ANNOTATION_LEN_BYTES));
        let cases: &[(&str, &str, &str)] = &[
            ("not yaml", "{", "not a list"),
            ("a map, not a list", "cert_dir: /x", "not a list"),
            (
                "unknown field",
                "[{cert_dri: /x}]",
                "unknown field `cert_dri`",
            ),
            (
                "relative cert_dir",
                "[{cert_dir: certs}]",
                "cert_dir 'certs' must be an absolute path",
            ),
            (
                "traversing cert_dir",
                "[{cert_dir: /a/../etc}]",
                "must be an absolute path",
            ),
            (
                "dot cert_dir",
                "[{cert_dir: /a/./b}]",
                "must be an absolute path",
            ),
            ("root cert_dir", "[{cert_dir: /}]", "must not be '/'"),
            (
                "slash in a file name",
                "[{svid_file_name: ../x}]",
                "svid_file_name '../x' must be a plain file name",
            ),
            (
                "dot-dot file name",
                "[{svid_key_file_name: ..}]",
                "svid_key_file_name '..' must be a plain",
            ),
            (
                "empty file name",
                "[{svid_bundle_file_name: ''}]",
                "must be a plain file name",
            ),
            (
                "same file twice",
                "[{svid_file_name: a, svid_key_file_name: a}]",
                "must differ",
            ),
            (
                "socket not allowed",
                "[{spire_agent_address: /var/run/docker.sock}]",
                "is not one this node's agent may use",
            ),
            (
                "relative socket",
                "[{spire_agent_address: admin.sock}]",
                "spire_agent_address 'admin.sock' must be an absolute",
            ),
            (
                "bad spiffe id",
                "[{spiffe_id: 'spiffe://Bad/x'}]",
                "spiffe_id: the trust domain",
            ),
            (
                "two entries, one dir",
                "[{cert_dir: /a}, {cert_dir: /a}]",
                "two entries use cert_dir '/a'",
            ),
            (
                "too many entries",
                "[{cert_dir: /a}, {cert_dir: /b}, {cert_dir: /c}, {cert_dir: /d}, {cert_dir: /e}]",
                "more than 4 entries",
            ),
            ("too long", &long, "longer than"),
        ];
        for (name, value, want) in cases {
            let err = parse("identity.noderesource.dev/container.web", value, &d).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(want), "{name}: {text}");
            assert!(
                text.starts_with("annotation identity.noderesource.dev/container.web"),
                "{name}: {text}"
            );
        }
    }
}
