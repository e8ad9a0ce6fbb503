//! Replays the identity agent's fuzz seeds (including past crashes saved under `fuzz/seeds/`)
//! through the fuzz targets' own checks, so a fixed crash stays fixed without the fuzzer.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

#[path = "../../../fuzz/identity_checks.rs"]
mod identity_checks;

#[path = "../../../fuzz/replay.rs"]
mod replay;

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    replay::replay(&root, target, check);
}

#[test]
fn annotation_seeds_parse_or_fail_cleanly() {
    replay("identity_annotation", identity_checks::annotation);
}

#[test]
fn der_seeds_split_back_into_their_input() {
    replay("identity_der", identity_checks::der);
}

#[test]
fn the_der_seed_has_the_spiffe_id_it_was_made_with() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds/identity_der/two-concatenated-roots.der");
    let bytes = std::fs::read(path).unwrap();
    let certs = moat_identity::spiffe::split_certificates(&bytes).unwrap();
    assert_eq!(certs.len(), 2);
    assert_eq!(
        moat_identity::spiffe::uri_sans(certs[0]).unwrap(),
        ["spiffe://example.org/web"]
    );
    assert!(
        moat_identity::spiffe::uri_sans(certs[1])
            .unwrap()
            .is_empty()
    );
}
