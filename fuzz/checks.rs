//! The properties the fuzz targets check, shared with the seed-replay test
//! (`crates/moat-core/tests/fuzz_seeds.rs`) so both check exactly the same thing.

use moat_core::config::Config;
use moat_core::decision::{Operation, Request, Stage};
use moat_core::engine::decide;
use moat_core::image::{ImageRef, RegistryPrefix};
use moat_core::subject::Template;

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
        let yaml = serde_yaml_ng::to_string(&c)
            .unwrap_or_else(|e| panic!("config does not serialise: {e}"));
        let again = Config::from_yaml(&yaml)
            .unwrap_or_else(|e| panic!("serialised config does not load: {e}\n{yaml}"));
        assert_eq!(c, again);
    }
}

/// The whole decision on arbitrary JSON, as a CREATE and as an UPDATE of itself, at both stages:
/// an answer, and a patch that applies. Both readers (from a JSON tree and from bytes) agree
/// wherever both read the object.
pub(crate) fn decide_json(data: &[u8]) {
    let Ok(object) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(template) = Template::from_value(&object) else {
        return;
    };
    if let (Some(a), Ok(Some(b))) = (&template, Template::from_json(data)) {
        assert_eq!(a, &b, "the two readers disagree");
    }
    let config = Config::embedded_default();
    for operation in [Operation::Create, Operation::Update] {
        for stage in [Stage::Mutate, Stage::Validate] {
            let req = Request {
                operation,
                stage,
                object: template.as_ref(),
                old_object: template.as_ref(),
                namespace: "fuzz",
                namespace_labels: None,
                dry_run: false,
                requester: None,
                placement_seed: "fuzz",
            };
            decide(&config, &req)
                .patched(&object)
                .unwrap_or_else(|e| panic!("patch does not apply: {e}"));
        }
    }
}
