//! Whose the files are: the user a container's process runs as, so a non-root workload can read
//! its own 0600 key.
//!
//! The OCI spec the runtime runs (`process.user` in the bundle's `config.json`) says it for
//! every runtime. containerd 1.7's NRI messages carry no user, and in a sandbox the PID the
//! runtime reports is the sandbox's (root, or gVisor's 65534), so the PID's owner is only a
//! fallback for runc, where the process is the container's own.

use std::path::{Path, PathBuf};

/// Longest `config.json` read: a spec is a few KiB; this bounds what a broken file costs.
const MAX_SPEC_LEN_BYTES: u64 = 4 << 20;

/// Why a container's user could not be read from its spec.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OwnerError {
    /// The spec could not be read.
    #[error("cannot read the container's OCI spec {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The spec is larger than [`MAX_SPEC_LEN_BYTES`].
    #[error("the container's OCI spec {0} is larger than 4 MiB")]
    TooLarge(PathBuf),
    /// The spec has no numeric `process.user`.
    #[error("the container's OCI spec {path} has no process.user uid/gid: {reason}")]
    NoUser { path: PathBuf, reason: String },
}

#[derive(serde::Deserialize)]
struct Spec {
    process: Process,
}

#[derive(serde::Deserialize)]
struct Process {
    user: User,
}

#[derive(serde::Deserialize)]
struct User {
    uid: u32,
    gid: u32,
}

/// The `(uid, gid)` of the container `container_id` from its bundle under `bundle_dir`
/// (`<bundle_dir>/<container_id>/config.json`).
///
/// # Errors
/// [`OwnerError`] when the spec cannot be read or has no user.
pub fn from_bundle(bundle_dir: &Path, container_id: &str) -> Result<(u32, u32), OwnerError> {
    let spec: Spec = read_spec(bundle_dir, container_id)?;
    Ok((spec.process.user.uid, spec.process.user.gid))
}

#[derive(serde::Deserialize)]
struct MountsSpec {
    #[serde(default)]
    mounts: Vec<SpecMount>,
}

#[derive(serde::Deserialize)]
struct SpecMount {
    destination: PathBuf,
    #[serde(default)]
    source: Option<PathBuf>,
}

/// Whether the spec the runtime runs for `container_id` mounts `source` at `destination`: an
/// identity directory reaches a container only through the mount its CreateContainer added,
/// which a container created while no agent answered does not have.
///
/// # Errors
/// [`OwnerError`] when the spec cannot be read (the runtime has not made the bundle yet).
pub fn mounts(
    bundle_dir: &Path,
    container_id: &str,
    source: &Path,
    destination: &Path,
) -> Result<bool, OwnerError> {
    let spec: MountsSpec = read_spec(bundle_dir, container_id)?;
    Ok(spec
        .mounts
        .iter()
        .any(|m| m.destination == destination && m.source.as_deref() == Some(source)))
}

fn read_spec<T: serde::de::DeserializeOwned>(
    bundle_dir: &Path,
    container_id: &str,
) -> Result<T, OwnerError> {
    // Container ids reach here only after `ArtifactRoot` accepted them as directory names.
    let path = bundle_dir.join(container_id).join("config.json");
    let read = |source| OwnerError::Read {
        path: path.clone(),
        source,
    };
    let len = std::fs::metadata(&path).map_err(read)?.len();
    if len > MAX_SPEC_LEN_BYTES {
        return Err(OwnerError::TooLarge(path));
    }
    let text = std::fs::read(&path).map_err(read)?;
    serde_json::from_slice(&text).map_err(|e| OwnerError::NoUser {
        path: path.clone(),
        reason: e.to_string(),
    })
}

/// The effective uid and gid of the host process `pid`, from `/proc/<pid>/status`.
#[must_use]
pub fn from_process(pid: u32) -> Option<(u32, u32)> {
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("Uid:")?, field("Gid:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(name: &str, spec: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moat-owner-{name}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("c1")).unwrap();
        std::fs::write(dir.join("c1/config.json"), spec).unwrap();
        dir
    }

    #[test]
    fn tells_whether_the_spec_mounts_an_identity_directory() {
        let dir = bundle(
            "mounts",
            r#"{"process":{"user":{"uid":0,"gid":0}},"mounts":[{"destination":"/proc","type":"proc","source":"proc"},{"destination":"/run/spiffe","type":"bind","source":"/var/lib/moat/c1/0","options":["rbind","ro"]}]}"#,
        );
        let (src, dst) = (Path::new("/var/lib/moat/c1/0"), Path::new("/run/spiffe"));
        assert!(mounts(&dir, "c1", src, dst).unwrap());
        assert!(!mounts(&dir, "c1", Path::new("/var/lib/moat/c1/1"), dst).unwrap());
        assert!(!mounts(&dir, "c1", src, Path::new("/run/other")).unwrap());
        assert!(mounts(&dir, "c2", src, dst).is_err(), "no bundle yet");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reads_the_user_of_the_spec_the_runtime_runs() {
        let dir = bundle(
            "ok",
            r#"{"ociVersion":"1.1.0","process":{"user":{"uid":1000,"gid":3000,"additionalGids":[3000]},"args":["sh"]},"root":{"path":"rootfs"}}"#,
        );
        assert_eq!(from_bundle(&dir, "c1").unwrap(), (1000, 3000));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_or_userless_spec_is_an_error_naming_the_file() {
        let dir = bundle("nouser", r#"{"process":{"args":["sh"]}}"#);
        let e = from_bundle(&dir, "c1").unwrap_err();
        assert!(matches!(e, OwnerError::NoUser { .. }), "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");
        let e = from_bundle(&dir, "c2").unwrap_err();
        assert!(matches!(e, OwnerError::Read { .. }), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reads_the_owner_of_a_live_process() {
        let me = from_process(std::process::id()).unwrap();
        let meta = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
        assert_eq!(me.0, meta);
        assert_eq!(from_process(0), None);
    }
}
