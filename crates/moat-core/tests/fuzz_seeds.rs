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

#[path = "../../../fuzz/replay.rs"]
mod replay;

fn replay(target: &str, check: fn(&[u8])) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    replay::replay(&root, target, check);
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
