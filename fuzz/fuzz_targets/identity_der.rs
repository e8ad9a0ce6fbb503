//! Fuzz target: see `identity_checks::der`.
#![no_main]

#[path = "../identity_checks.rs"]
#[allow(dead_code, reason = "each target uses one of the checks")]
mod identity_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| identity_checks::der(data));
