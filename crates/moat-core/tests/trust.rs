//! The registry's verdicts in the decision (`images.trust`): a refusal denies with the
//! registry's reason, a pod is pinned to the verified digest, a workload template is verified
//! but not rewritten, the reinvoked and validating calls see the pin as final, and offline
//! review says that it checked nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use moat_core::config::Config;
use moat_core::decision::{Decision, Operation, Request, Stage};
use moat_core::engine::{decide_with_images, images_to_resolve, review_images_verified};
use moat_core::subject::Template;
use moat_core::trust::{ImageVerdict, ImageVerdicts};
use serde_json::{Value, json};

const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const TRUST: &str = "images: {trust: {unmatched: pin}}";

fn config(yaml: &str) -> Config {
    Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn pod(images: &[&str], volume: Option<&str>) -> Value {
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
        .collect();
    let mut spec =
        json!({"containers": containers, "initContainers": [{"name": "init", "image": images[0]}]});
    if let Some(v) = volume {
        spec["volumes"] = json!([{"name": "data", "image": {"reference": v}}]);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "t"}, "spec": spec})
}

fn deployment(image: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "t"},
           "spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}})
}

fn admitted(raw: &str) -> (String, ImageVerdict) {
    let pinned = if raw.contains('@') {
        raw.to_owned()
    } else {
        format!("{raw}@{SHA}")
    };
    (raw.to_owned(), ImageVerdict::Admitted { pinned })
}

fn decide_with(
    c: &Config,
    object: &Value,
    stage: Stage,
    verdicts: Option<&ImageVerdicts>,
) -> (Decision, Value) {
    let template = Template::from_value(object).unwrap().unwrap();
    let req = Request {
        operation: Operation::Create,
        stage,
        object: Some(&template),
        old_object: None,
        namespace: "t",
        namespace_labels: None,
        dry_run: false,
        requester: None,
        placement_seed: "uid",
    };
    let d = decide_with_images(c, &req, verdicts);
    let patched = d.patched(object).unwrap();
    (d, patched)
}

#[test]
fn every_image_a_pod_pulls_is_pinned_to_the_verified_digest() {
    let c = config(TRUST);
    let object = pod(
        &["r.example/a:1", "r.example/b:2"],
        Some("r.example/data:3"),
    );
    let verdicts: ImageVerdicts = ["r.example/a:1", "r.example/b:2", "r.example/data:3"]
        .into_iter()
        .map(admitted)
        .collect();
    let (d, patched) = decide_with(&c, &object, Stage::Mutate, Some(&verdicts));
    assert!(d.allowed(), "{}", d.message());
    let spec = &patched["spec"];
    assert_eq!(
        spec["containers"][0]["image"],
        format!("r.example/a:1@{SHA}")
    );
    assert_eq!(
        spec["containers"][1]["image"],
        format!("r.example/b:2@{SHA}")
    );
    assert_eq!(
        spec["initContainers"][0]["image"],
        format!("r.example/a:1@{SHA}")
    );
    assert_eq!(
        spec["volumes"][0]["image"]["reference"],
        format!("r.example/data:3@{SHA}")
    );
    assert_eq!(d.changes.len(), 4);
}

#[test]
fn the_reinvoked_call_and_the_validating_call_find_nothing_to_change() {
    let c = config(TRUST);
    let object = pod(&["r.example/a:1"], None);
    let verdicts: ImageVerdicts = [admitted("r.example/a:1")].into_iter().collect();
    let (_, patched) = decide_with(&c, &object, Stage::Mutate, Some(&verdicts));
    // What the server resolves for the pinned pod: the references themselves.
    let template = Template::from_value(&patched).unwrap().unwrap();
    let again: ImageVerdicts = images_to_resolve(
        &c,
        &Request::offline_create(Some(&template), "t", None, "uid"),
    )
    .into_iter()
    .map(admitted)
    .collect();
    assert_eq!(again.len(), 1);
    for stage in [Stage::Mutate, Stage::Validate] {
        let (d, after) = decide_with(&c, &patched, stage, Some(&again));
        assert!(d.allowed(), "{}", d.message());
        assert!(d.patch.0.is_empty(), "{:?}", d.patch);
        assert_eq!(after, patched);
    }
}

#[test]
fn an_image_left_unpinned_by_a_later_webhook_is_denied_at_validation() {
    let c = config(TRUST);
    let object = pod(&["r.example/a:1"], None);
    let verdicts: ImageVerdicts = [admitted("r.example/a:1")].into_iter().collect();
    let (d, _) = decide_with(&c, &object, Stage::Validate, Some(&verdicts));
    assert!(!d.allowed());
    assert!(
        d.message().contains("moat's mutation is missing"),
        "{}",
        d.message()
    );
    assert!(
        d.message().contains(&format!("r.example/a:1@{SHA}")),
        "{}",
        d.message()
    );
}

#[test]
fn a_refused_image_is_denied_with_the_registrys_reason() {
    let c = config(TRUST);
    let object = pod(&["r.example/a:1", "r.example/b:1"], None);
    let verdicts: ImageVerdicts = [
        admitted("r.example/a:1"),
        (
            "r.example/b:1".to_owned(),
            ImageVerdict::Refused("registry r.example is unreachable: connection refused".into()),
        ),
    ]
    .into_iter()
    .collect();
    let (d, patched) = decide_with(&c, &object, Stage::Mutate, Some(&verdicts));
    assert_eq!(
        d.message(),
        "container 'c1' (spec.containers[1]): image 'r.example/b:1': registry r.example is unreachable: connection refused"
    );
    assert_eq!(patched, object, "a denied pod is not patched");
}

#[test]
fn an_image_the_server_did_not_check_is_denied() {
    let c = config(TRUST);
    let object = pod(&["r.example/a:1"], None);
    let (d, _) = decide_with(&c, &object, Stage::Mutate, Some(&ImageVerdicts::new()));
    assert!(
        d.message().contains("was not checked at its registry"),
        "{}",
        d.message()
    );
}

#[test]
fn a_workload_template_is_verified_but_not_rewritten() {
    let c = config(TRUST);
    let object = deployment("r.example/a:1");
    let verdicts: ImageVerdicts = [admitted("r.example/a:1")].into_iter().collect();
    let (d, patched) = decide_with(&c, &object, Stage::Mutate, Some(&verdicts));
    assert!(d.allowed());
    assert_eq!(patched, object);
    let refused: ImageVerdicts = [(
        "r.example/a:1".to_owned(),
        ImageVerdict::Refused("is not signed".into()),
    )]
    .into_iter()
    .collect();
    let (d, _) = decide_with(&c, &object, Stage::Mutate, Some(&refused));
    assert!(d.message().contains("is not signed"), "{}", d.message());
}

#[test]
fn offline_review_checks_no_registry_and_says_so() {
    let c = config(TRUST);
    let object = pod(&["r.example/a:1"], None);
    let (d, patched) = decide_with(&c, &object, Stage::Mutate, None);
    assert!(d.allowed());
    assert_eq!(patched, object);
    assert!(
        d.warnings.iter().any(|w| w.contains("called no registry")),
        "{:?}",
        d.warnings
    );
}

#[test]
fn audit_mode_describes_the_pin_and_the_refusal_without_applying_them() {
    let c = config(&format!("{TRUST}\nenforcement: {{images: audit}}"));
    let object = pod(&["r.example/a:1", "r.example/b:1"], None);
    let verdicts: ImageVerdicts = [
        admitted("r.example/a:1"),
        (
            "r.example/b:1".to_owned(),
            ImageVerdict::Refused("is not signed".into()),
        ),
    ]
    .into_iter()
    .collect();
    let (d, patched) = decide_with(&c, &object, Stage::Mutate, Some(&verdicts));
    assert!(d.allowed());
    assert_eq!(patched, object);
    assert!(
        d.warnings.iter().any(|w| w.contains("would pin")),
        "{:?}",
        d.warnings
    );
    assert!(
        d.warnings.iter().any(|w| w.contains("is not signed")),
        "{:?}",
        d.warnings
    );
}

#[test]
fn the_references_of_non_exempt_requests_are_named_each_once() {
    let c = config(&format!(
        "{TRUST}\nexemptions: {{namespaces: [kube-system]}}"
    ));
    let object = pod(&["r.example/a:1", "Not A Ref", "r.example/a:1"], None);
    let template = Template::from_value(&object).unwrap().unwrap();
    let req = Request::offline_create(Some(&template), "t", None, "uid");
    // The server parses them and asks the registry only about those that parse.
    assert_eq!(
        images_to_resolve(&c, &req),
        vec!["r.example/a:1", "Not A Ref"]
    );
    let exempt = Request::offline_create(Some(&template), "kube-system", None, "uid");
    assert!(images_to_resolve(&c, &exempt).is_empty());
    assert!(
        images_to_resolve(&config(""), &req).is_empty(),
        "no trust: no registry"
    );
}

#[test]
fn image_review_denies_refused_and_unchecked_images() {
    let c = config(TRUST);
    let verdicts: ImageVerdicts = [
        admitted("r.example/a:1"),
        (
            "r.example/b:1".to_owned(),
            ImageVerdict::Refused("is not signed".into()),
        ),
    ]
    .into_iter()
    .collect();
    let d = review_images_verified(&c, "t", ["r.example/a:1"], Some(&verdicts));
    assert!(d.allowed());
    let d = review_images_verified(
        &c,
        "t",
        ["r.example/a:1", "r.example/b:1", "r.example/c:1"],
        Some(&verdicts),
    );
    assert_eq!(
        d.message(),
        "spec.containers[1]: image 'r.example/b:1': is not signed; spec.containers[2]: image 'r.example/c:1' was not checked at its registry"
    );
}

/// The decision judges a reference as the server parsed it to ask the registry (it does not
/// parse it again): with the parse attached, the registry rule reads that parse, and without it
/// the decision parses the reference itself, to the same verdict.
#[test]
fn the_decision_reads_the_servers_parse_of_a_reference() {
    let c = config("images: {allowedRegistries: [r.example], trust: {unmatched: pin}}");
    let object = pod(&["r.example/a:1"], None);
    let (raw, verdict) = admitted("r.example/a:1");
    let with_parse = |parsed: &str| {
        let mut v = ImageVerdicts::new();
        v.insert(raw.clone(), verdict.clone(), Some(parsed.parse().unwrap()));
        v
    };
    let same = with_parse("r.example/a:1");
    let (d, _) = decide_with(&c, &object, Stage::Mutate, Some(&same));
    assert!(d.allowed(), "{}", d.message());
    let parsed_alone: ImageVerdicts = [(raw.clone(), verdict.clone())].into_iter().collect();
    let (alone, _) = decide_with(&c, &object, Stage::Mutate, Some(&parsed_alone));
    assert_eq!(alone.allowed(), d.allowed());
    // A parse of another registry's reference, attached: the rule reads it, so it is denied.
    let other = with_parse("elsewhere.example/a:1");
    let (d, _) = decide_with(&c, &object, Stage::Mutate, Some(&other));
    assert!(
        d.message().contains("not an allowed registry"),
        "{}",
        d.message()
    );
}
