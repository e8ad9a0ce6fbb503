//! Replays every fuzz seed (including past crashes saved under `fuzz/seeds/`) through the same
//! checks as the fuzz targets, so a fixed crash stays fixed without running the fuzzer.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::path::PathBuf;

use moat_core::config::Config;
use moat_core::image::{ImageRef, RegistryPrefix};
use moat_core::policy::{Operation, Request, Stage, decide};

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

#[test]
fn image_reference_seeds_round_trip() {
    for (path, bytes) in seeds("image_ref") {
        let Ok(s) = std::str::from_utf8(&bytes) else {
            continue;
        };
        if let Ok(r) = s.parse::<ImageRef>() {
            let again: ImageRef = r
                .to_string()
                .parse()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(r, again, "{}", path.display());
        }
        if let Ok(p) = s.parse::<RegistryPrefix>() {
            assert_eq!(
                p.to_string().parse::<RegistryPrefix>().unwrap(),
                p,
                "{}",
                path.display()
            );
        }
    }
}

#[test]
fn config_seeds_load_or_fail_cleanly() {
    for (path, bytes) in seeds("config") {
        let Ok(s) = std::str::from_utf8(&bytes) else {
            continue;
        };
        if let Ok(c) = Config::from_yaml(s) {
            let again = Config::from_yaml(&serde_yaml::to_string(&c).unwrap()).unwrap();
            assert_eq!(c, again, "{}", path.display());
        }
    }
}

#[test]
fn decide_seeds_answer_without_panicking() {
    let config = Config::embedded_default();
    for (path, bytes) in seeds("decide") {
        let Ok(object) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        for stage in [Stage::Mutate, Stage::Validate] {
            let req = Request {
                operation: Operation::Create,
                stage,
                object: &object,
                old_object: Some(&object),
                namespace: "fuzz",
                namespace_labels: None,
                dry_run: false,
                placement_seed: "fuzz",
            };
            if let Ok(d) = decide(&config, &req) {
                d.patched(&object)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
    }
}
