//! The properties the fuzz targets check, shared with the seed-replay test
//! (`crates/moat-core/tests/fuzz_seeds.rs`) so both check exactly the same thing.

use moat_core::config::Config;
use moat_core::image::{ImageRef, RegistryPrefix};
use moat_core::policy::{Operation, Request, Stage, decide};

/// Image references: what parses prints to a string that parses to the same value.
pub(crate) fn image_ref(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = s.parse::<ImageRef>() {
        let printed = r.to_string();
        let again: ImageRef = printed
            .parse()
            .unwrap_or_else(|e| panic!("{printed:?} does not parse: {e}"));
        assert_eq!(r, again, "round trip of {s:?} via {printed:?}");
        assert_eq!(again.to_string(), printed);
    }
    if let Ok(p) = s.parse::<RegistryPrefix>() {
        let printed = p.to_string();
        let again: RegistryPrefix = printed
            .parse()
            .unwrap_or_else(|e| panic!("{printed:?} does not parse: {e}"));
        assert_eq!(p, again);
    }
}

/// The configuration loader: a loaded config serialises to a document that loads to the same
/// config.
pub(crate) fn config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Config::from_yaml(s) {
        let yaml =
            serde_yaml::to_string(&c).unwrap_or_else(|e| panic!("config does not serialise: {e}"));
        let again = Config::from_yaml(&yaml)
            .unwrap_or_else(|e| panic!("serialised config does not load: {e}\n{yaml}"));
        assert_eq!(c, again);
    }
}

/// The whole decision on arbitrary JSON: an answer or an error, and the patch applies.
pub(crate) fn decide_json(data: &[u8]) {
    let Ok(object) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
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
            d.patched(&object)
                .unwrap_or_else(|e| panic!("patch does not apply: {e}"));
        }
    }
}
