//! The host directories that hold each container's SVID files, and how they are written.
//!
//! Each identity entry of a container gets `<root>/<container id>/<entry index>/`, bind-mounted
//! read-only at the entry's `cert_dir`. The files in it change together: every version is written
//! into a fresh hidden directory (certificates 0644, key 0600 owned by the container's user) and
//! published by renaming one symlink, `..data`, over the previous one; the names the workload
//! opens (`svid.pem`, …) are symlinks through `..data`. A reader therefore never sees a new
//! certificate with an old key, and never a partly written file: the same scheme the kubelet
//! uses for Secret volumes.
//!
//! Nothing is fsynced. The rename is what makes a version appear whole to readers; durability
//! would only matter across a node crash, after which every container starts again under a new
//! id (its old directory is removed as stale at Synchronize). A sync per file would hold
//! containerd's node-wide NRI lock for milliseconds on every container start.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The name of the symlink that points at the current version.
const DATA_LINK: &str = "..data";
/// Longest container id accepted as a directory name.
const MAX_CONTAINER_ID_LEN_BYTES: usize = 128;

/// Where files could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilesError {
    #[error("container id '{0}' cannot name a directory")]
    BadContainerId(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One version of an entry's files.
#[derive(Debug)]
pub struct Artifacts<'a> {
    /// `(file name, contents)` of the certificate chain.
    pub svid: (&'a str, &'a [u8]),
    /// `(file name, contents)` of the private key.
    pub key: (&'a str, &'a [u8]),
    /// `(file name, contents)` of the trust bundle.
    pub bundle: (&'a str, &'a [u8]),
    /// Owner for the files (the container process's uid and gid), so a non-root workload can
    /// read its 0600 key. `None` leaves them owned by the agent.
    pub owner: Option<(u32, u32)>,
}

/// The root of all per-container directories on the host.
#[derive(Debug, Clone)]
pub struct ArtifactRoot {
    root: PathBuf,
}

impl ArtifactRoot {
    /// Uses (and creates, 0711) `root`.
    ///
    /// # Errors
    /// [`FilesError::Io`] when it cannot be created.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, FilesError> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&root)
            .map_err(at(&root))?;
        Ok(Self { root })
    }

    /// The root directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn container_dir(&self, container_id: &str) -> Result<PathBuf, FilesError> {
        let ok = !container_id.is_empty()
            && container_id.len() <= MAX_CONTAINER_ID_LEN_BYTES
            && !container_id.starts_with('.')
            && container_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            return Err(FilesError::BadContainerId(container_id.to_owned()));
        }
        Ok(self.root.join(container_id))
    }

    /// The directory of entry `index` of a container (not created).
    ///
    /// # Errors
    /// [`FilesError::BadContainerId`] for an id that cannot be a directory name.
    pub fn entry_dir(&self, container_id: &str, index: usize) -> Result<PathBuf, FilesError> {
        Ok(self.container_dir(container_id)?.join(index.to_string()))
    }

    /// Creates (0755: the workload must enter it) the directory of entry `index`.
    ///
    /// # Errors
    /// [`FilesError`] when the id is unusable or the directory cannot be created.
    pub fn create_entry_dir(
        &self,
        container_id: &str,
        index: usize,
    ) -> Result<PathBuf, FilesError> {
        let dir = self.entry_dir(container_id, index)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(at(&dir))?;
        Ok(dir)
    }

    /// Removes everything of a container. Missing is fine.
    ///
    /// # Errors
    /// [`FilesError`] when something is left behind.
    pub fn remove_container(&self, container_id: &str) -> Result<(), FilesError> {
        let dir = self.container_dir(container_id)?;
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// The container ids that have a directory.
    ///
    /// # Errors
    /// [`FilesError::Io`] when the root cannot be read.
    pub fn containers(&self) -> Result<Vec<String>, FilesError> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(at(&self.root))? {
            let entry = entry.map_err(at(&self.root))?;
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                ids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(ids)
    }
}

/// Whether some version of an entry's files has been published in `dir`.
#[must_use]
pub fn is_published(dir: &Path) -> bool {
    fs::symlink_metadata(dir.join(DATA_LINK)).is_ok()
}

static VERSION: AtomicU64 = AtomicU64::new(0);

/// Publishes a new version of an entry's files in `dir` (see the module documentation).
///
/// # Errors
/// [`FilesError::Io`] naming the path; the previous version stays published.
pub fn publish(dir: &Path, artifacts: &Artifacts<'_>) -> Result<(), FilesError> {
    let version = format!(
        "..{}.{}",
        std::process::id(),
        VERSION.fetch_add(1, Ordering::Relaxed)
    );
    let version_dir = dir.join(&version);
    let result = write_version(&version_dir, artifacts).and_then(|()| {
        let previous = fs::read_link(dir.join(DATA_LINK)).ok();
        replace_symlink(dir, DATA_LINK, Path::new(&version))?;
        for (name, _) in [artifacts.svid, artifacts.key, artifacts.bundle] {
            let target = Path::new(DATA_LINK).join(name);
            if fs::read_link(dir.join(name)).ok().as_deref() != Some(&target) {
                replace_symlink(dir, name, &target)?;
            }
        }
        if let Some(previous) = previous.filter(|p| p != Path::new(&version)) {
            let old = dir.join(previous);
            // Only the versions this scheme made are removed.
            if old
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".."))
            {
                fs::remove_dir_all(&old).map_err(at(&old))?;
            }
        }
        Ok(())
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&version_dir);
    }
    result
}

fn write_version(version_dir: &Path, a: &Artifacts<'_>) -> Result<(), FilesError> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(version_dir)
        .map_err(at(version_dir))?;
    for ((name, bytes), mode) in [(a.svid, 0o644), (a.key, 0o600), (a.bundle, 0o644)] {
        let path = version_dir.join(name);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(at(&path))?;
        file.write_all(bytes).map_err(at(&path))?;
        if let Some((uid, gid)) = a.owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(at(&path))?;
        }
    }
    Ok(())
}

fn replace_symlink(dir: &Path, name: &str, target: &Path) -> Result<(), FilesError> {
    let tmp = dir.join(format!("..tmp-{name}"));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(at(&tmp))?;
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(at(&path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn temp_root(name: &str) -> ArtifactRoot {
        let dir = std::env::temp_dir().join(format!("moat-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        ArtifactRoot::new(dir).unwrap()
    }

    fn artifacts<'a>(cert: &'a [u8], key: &'a [u8]) -> Artifacts<'a> {
        Artifacts {
            svid: ("svid.pem", cert),
            key: ("svid_key.pem", key),
            bundle: ("bundle.pem", b"bundle"),
            owner: None,
        }
    }

    #[test]
    fn writes_key_0600_and_certificates_0644_through_the_data_link() {
        let root = temp_root("modes");
        let dir = root.create_entry_dir("abc123", 0).unwrap();
        publish(&dir, &artifacts(b"cert-1", b"key-1")).unwrap();
        for (name, mode, body) in [
            ("svid.pem", 0o644, "cert-1"),
            ("svid_key.pem", 0o600, "key-1"),
            ("bundle.pem", 0o644, "bundle"),
        ] {
            let path = dir.join(name);
            assert_eq!(fs::read_to_string(&path).unwrap(), body);
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                mode,
                "{name}"
            );
            assert_eq!(
                fs::read_link(&path).unwrap(),
                Path::new(DATA_LINK).join(name),
                "a relative link, valid inside the container too"
            );
        }
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o755
        );
        fs::remove_dir_all(root.path()).unwrap();
    }

    #[test]
    fn a_new_version_replaces_every_file_and_leaves_no_old_version_behind() {
        let root = temp_root("rotate");
        let dir = root.create_entry_dir("abc", 1).unwrap();
        publish(&dir, &artifacts(b"cert-1", b"key-1")).unwrap();
        let first = fs::read_link(dir.join(DATA_LINK)).unwrap();
        // A reader holding the old version keeps it whole until it reopens.
        let mut held = fs::File::open(dir.join("svid.pem")).unwrap();
        publish(&dir, &artifacts(b"cert-2", b"key-2")).unwrap();
        assert_eq!(fs::read_to_string(dir.join("svid.pem")).unwrap(), "cert-2");
        assert_eq!(
            fs::read_to_string(dir.join("svid_key.pem")).unwrap(),
            "key-2"
        );
        let mut old = String::new();
        io::Read::read_to_string(&mut held, &mut old).unwrap();
        assert_eq!(old, "cert-1");
        assert!(!dir.join(&first).exists());
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("..") || n == DATA_LINK)
            .collect();
        names.sort();
        assert_eq!(names, ["..data", "bundle.pem", "svid.pem", "svid_key.pem"]);
        let hidden = fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("..")
            })
            .count();
        assert_eq!(hidden, 2, "..data and the one current version");
        fs::remove_dir_all(root.path()).unwrap();
    }

    #[test]
    fn owner_is_applied_to_every_file() {
        let root = temp_root("owner");
        let dir = root.create_entry_dir("abc", 0).unwrap();
        let me = fs::metadata(root.path()).unwrap();
        // As root (as the agent runs, and the test suite here), hand the files to another
        // user, so the test fails if the chown is not made; otherwise our own ids.
        let owner = if me.uid() == 0 {
            (65534, 65534)
        } else {
            (me.uid(), me.gid())
        };
        let mut a = artifacts(b"c", b"k");
        a.owner = Some(owner);
        publish(&dir, &a).unwrap();
        for name in ["svid.pem", "svid_key.pem", "bundle.pem"] {
            let meta = fs::metadata(dir.join(name)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), owner, "{name}");
        }
        // Without an owner, the files stay the agent's.
        publish(&dir, &artifacts(b"c", b"k")).unwrap();
        assert_eq!(
            fs::metadata(dir.join("svid_key.pem")).unwrap().uid(),
            me.uid()
        );
        fs::remove_dir_all(root.path()).unwrap();
    }

    #[test]
    fn container_ids_cannot_escape_the_root() {
        let root = temp_root("ids");
        for bad in ["", "..", "../x", "a/b", ".hidden", &"a".repeat(200)] {
            assert!(
                matches!(root.entry_dir(bad, 0), Err(FilesError::BadContainerId(_))),
                "{bad}"
            );
        }
        root.create_entry_dir("c1", 0).unwrap();
        root.create_entry_dir("c2", 0).unwrap();
        let mut ids = root.containers().unwrap();
        ids.sort();
        assert_eq!(ids, ["c1", "c2"]);
        root.remove_container("c1").unwrap();
        root.remove_container("c1").unwrap();
        assert_eq!(root.containers().unwrap(), ["c2"]);
        fs::remove_dir_all(root.path()).unwrap();
    }
}
