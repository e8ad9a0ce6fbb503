//! The whole decision on arbitrary JSON objects: an answer or a MalformedObject error, never a
//! panic; an allowed decision's patch applies to the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_core::config::Config;
use moat_core::policy::{Operation, Request, Stage, decide};

fuzz_target!(|data: &[u8]| {
    let Ok(object) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let config = Config::embedded_default();
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
            let mut patched = object.clone();
            if json_patch::patch(&mut patched, &d.patch).is_err() {
                panic!("patch does not apply");
            }
        }
    }
});
