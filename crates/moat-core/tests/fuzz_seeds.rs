//! Replays every fuzz seed (including past crashes saved under `fuzz/seeds/`) through the fuzz
//! targets' own checks, so a fixed crash stays fixed without running the fuzzer.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

#[path = "../../../fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
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

#[test]
fn image_reference_seeds_round_trip() {
    replay("image_ref", checks::image_ref);
}

#[test]
fn config_seeds_load_or_fail_cleanly() {
    replay("config", checks::config);
}

#[test]
fn decide_seeds_answer_and_their_patches_apply() {
    replay("decide", checks::decide_json);
}
