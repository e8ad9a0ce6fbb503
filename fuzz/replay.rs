//! Replays every seed of a fuzz target through its check: shared by the seed-replay tests of
//! each crate that has fuzz targets.

use std::path::{Path, PathBuf};

/// Runs `check` on every file in `fuzz/seeds/<target>/` below `root` (the repository), failing
/// with the seed's name.
pub(crate) fn replay(root: &Path, target: &str, check: fn(&[u8])) {
    let dir = root.join("fuzz/seeds").join(target);
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    for path in seeds {
        let bytes = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| check(&bytes)).is_err() {
            panic!("seed {} fails its check", path.display());
        }
    }
}
