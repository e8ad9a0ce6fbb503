//! Table tests of the combined decision: every row of DESIGN.md's tables and every isolation
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]
//! hole it lists, through the public `decide` entry point.

use std::collections::BTreeMap;

use moat_core::config::Config;
use moat_core::decision::{Decision, ExemptionReason, Operation, Request, Requester, Stage};
use moat_core::engine::decide;
use moat_core::subject::Template;
use serde_json::{Value, json};

const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A configuration with every policy off but the ones a test names.
fn config(yaml: &str) -> Config {
    Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}"))
}

const CLASS_MODE: &str = "isolation: {mode: class, classes: [{name: '*', namespaces: ['*']}]}";

fn pod(spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "t"}, "spec": spec})
}

fn labelled(class: &str, spec: Value) -> Value {
    let mut p = pod(spec);
    p["metadata"]["labels"] = json!({"moat.dev/class": class});
    p
}

fn app(image: &str) -> Value {
    json!({"containers": [{"name": "app", "image": image}]})
}

struct Call<'a> {
    /// `request.userInfo.username`; `None` offline.
    user: Option<&'a str>,
    op: Operation,
    stage: Stage,
    ns: &'a str,
    labels: Option<BTreeMap<String, String>>,
    old: Option<Value>,
    dry_run: bool,
}

impl Default for Call<'_> {
    fn default() -> Self {
        Self {
            user: None,
            op: Operation::Create,
            stage: Stage::Mutate,
            ns: "t",
            labels: None,
            old: None,
            dry_run: false,
        }
    }
}

/// A decision and the object after its patch.
struct Checked {
    d: Decision,
    object: Value,
}

impl std::ops::Deref for Checked {
    type Target = Decision;
    fn deref(&self) -> &Decision {
        &self.d
    }
}

fn read(object: &Value) -> Option<Template> {
    Template::from_value(object).unwrap_or_else(|e| panic!("{e}"))
}

fn run(c: &Config, object: &Value, call: Call<'_>) -> Checked {
    let (template, old) = (read(object), call.old.as_ref().and_then(read));
    let req = Request {
        operation: call.op,
        stage: call.stage,
        object: template.as_ref(),
        old_object: old.as_ref(),
        namespace: call.ns,
        namespace_labels: call.labels.as_ref(),
        dry_run: call.dry_run,
        requester: call.user.map(|username| Requester { username }),
        placement_seed: "uid-1",
    };
    let d = decide(c, &req);
    let patched = d.patched(object).expect("the patch applies to its input");
    Checked { d, object: patched }
}

fn create(c: &Config, object: &Value) -> Checked {
    run(c, object, Call::default())
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

fn assert_denied(d: &Decision, needle: &str) {
    assert!(
        !d.allowed(),
        "expected a denial containing {needle:?}, got allowed"
    );
    assert!(
        d.message().contains(needle),
        "expected {needle:?} in {:?}",
        d.message()
    );
}

fn assert_allowed(d: &Decision) {
    assert!(d.allowed(), "expected allowed, got: {}", d.message());
}

// ---------------------------------------------------------------------------------------------
// Images

#[test]
fn image_rule_table() {
    let c = Config::default();
    let cases: &[(&str, &str, Option<&str>)] = &[
        (
            "untagged official image is denied",
            "busybox",
            Some("image 'busybox' has no tag"),
        ),
        (
            "latest is denied",
            "busybox:latest",
            Some("uses the mutable tag 'latest'"),
        ),
        (
            "a registry port is not a tag",
            "localhost:5000/redis",
            Some("has no tag"),
        ),
        (
            "tagged image with registry port is allowed",
            "host:5000/img:1.0",
            None,
        ),
        ("digest pins an untagged image", &format!("img@{SHA}"), None),
        (
            "digest pins a latest image",
            &format!("img:latest@{SHA}"),
            None,
        ),
        (
            "upper-case repository is a denial, not an error",
            "Docker.io/Library/Busybox:1",
            Some("must be lower case"),
        ),
        (
            "malformed reference names the container",
            "a//b:1",
            Some("container 'app' (spec.containers[0]): image 'a//b:1' is not a valid reference"),
        ),
        (
            "empty image is denied",
            "",
            Some("container 'app' (spec.containers[0]) has no image"),
        ),
    ];
    for (name, image, want) in cases {
        let d = create(&c, &pod(app(image)));
        match want {
            Some(needle) => {
                assert!(!d.allowed(), "{name}: allowed");
                assert!(d.message().contains(needle), "{name}: {}", d.message());
            }
            None => assert!(d.allowed(), "{name}: {}", d.message()),
        }
    }
}

#[test]
fn every_container_kind_is_checked_and_all_denials_reported() {
    let c = Config::default();
    let p = pod(json!({
        "initContainers": [{"name": "init", "image": "busybox:latest"}],
        "containers": [{"name": "app", "image": "nginx:1.27"}, {"name": "side", "image": "envoy"}],
        "ephemeralContainers": [{"name": "debug", "image": "busybox"}],
    }));
    let d = create(&c, &p);
    assert_eq!(d.denials.len(), 3, "{}", d.message());
    assert_denied(&d, "container 'init' (spec.initContainers[0])");
    assert_denied(&d, "container 'side' (spec.containers[1])");
    assert_denied(&d, "container 'debug' (spec.ephemeralContainers[0])");
}

/// A pod of a thousand bad containers is denied for each (all counted), and its message names
/// the first `MESSAGE_DENIALS` and how many more: readable, and bounded in size.
#[test]
fn a_message_names_the_first_denials_and_counts_the_rest() {
    use moat_core::decision::MESSAGE_DENIALS;
    let containers: Vec<Value> = (0..1000)
        .map(|i| json!({"name": format!("c{i}"), "image": format!("r.io/i{i}:latest")}))
        .collect();
    let d = create(&Config::default(), &pod(json!({"containers": containers})));
    assert_eq!(d.denials.len(), 1000);
    let message = d.message();
    assert_eq!(
        message.matches("uses the mutable tag").count(),
        MESSAGE_DENIALS
    );
    assert!(
        message.contains("container 'c31' (spec.containers[31])"),
        "{message}"
    );
    assert!(!message.contains("'c32'"), "{message}");
    assert!(
        message.ends_with(&format!("; and {} more", 1000 - MESSAGE_DENIALS)),
        "{message}"
    );
    let few = pod(json!({"containers": [{"name": "a", "image": "x:latest"}]}));
    assert!(!create(&Config::default(), &few).message().contains("more"));
}

#[test]
fn allowed_registries_and_required_digests() {
    let c = config(
        "images: {allowedRegistries: [ghcr.io/acme, 'localhost:5000'], requireDigest: true}",
    );
    assert_denied(
        &create(&c, &pod(app(&format!("ghcr.io/evil/x@{SHA}")))),
        "not an allowed registry (ghcr.io/acme, localhost:5000)",
    );
    assert_denied(
        &create(&c, &pod(app("ghcr.io/acme/x:1.0"))),
        "must be pinned by digest",
    );
    assert_allowed(&create(&c, &pod(app(&format!("ghcr.io/acme/x@{SHA}")))));
    assert_allowed(&create(&c, &pod(app(&format!("localhost:5000/x@{SHA}")))));
}

#[test]
fn update_judges_only_changed_images() {
    let c = Config::default();
    let old = pod(
        json!({"containers": [{"name": "app", "image": "legacy"}, {"name": "b", "image": "x:1"}]}),
    );
    let same = old.clone();
    assert_allowed(&run(
        &c,
        &same,
        Call {
            op: Operation::Update,
            old: Some(old.clone()),
            ..Call::default()
        },
    ));
    let changed = pod(
        json!({"containers": [{"name": "app", "image": "legacy"}, {"name": "b", "image": "x:latest"}]}),
    );
    let d = run(
        &c,
        &changed,
        Call {
            op: Operation::Update,
            old: Some(old),
            ..Call::default()
        },
    );
    assert_eq!(d.denials.len(), 1, "{}", d.message());
    assert_denied(&d, "container 'b'");
}

// ---------------------------------------------------------------------------------------------
// RuntimeClass, through the whole decision

#[test]
fn runtime_class_rewrites_and_denials() {
    let with_fallback = config("runtimeClass: {reservedRuntimes: [runc], fallbackRuntime: gvisor}");
    let d = create(
        &with_fallback,
        &pod(json!({"runtimeClassName": "runc", "containers": [{"name": "a", "image": "x:1"}]})),
    );
    assert_allowed(&d);
    assert_eq!(d.object["spec"]["runtimeClassName"], "gvisor");
    assert_eq!(
        serde_json::to_value(&d.patch).unwrap(),
        json!([{"op": "replace", "path": "/spec/runtimeClassName", "value": "gvisor"}])
    );

    let d = create(&with_fallback, &pod(app("x:1")));
    assert_eq!(
        serde_json::to_value(&d.patch).unwrap(),
        json!([{"op": "add", "path": "/spec/runtimeClassName", "value": "gvisor"}])
    );

    let no_fallback =
        config("runtimeClass: {reservedRuntimes: [runc], defaultRuntimeReserved: true}");
    assert_denied(
        &create(
            &no_fallback,
            &pod(
                json!({"runtimeClassName": "runc", "containers": [{"name": "a", "image": "x:1"}]}),
            ),
        ),
        "spec.runtimeClassName: runtime 'runc' is reserved",
    );
    assert_denied(
        &create(&no_fallback, &pod(app("x:1"))),
        "usage of the default runtime is reserved",
    );
    let kata =
        pod(json!({"runtimeClassName": "kata", "containers": [{"name": "a", "image": "x:1"}]}));
    let d = create(&no_fallback, &kata);
    assert_allowed(&d);
    assert!(d.patch.0.is_empty());
}

#[test]
fn runtime_is_not_decided_again_on_update() {
    let c = config("runtimeClass: {reservedRuntimes: [runc], defaultRuntimeReserved: true}");
    let old = pod(app("x:1"));
    let d = run(
        &c,
        &old,
        Call {
            op: Operation::Update,
            old: Some(old.clone()),
            ..Call::default()
        },
    );
    assert_allowed(&d);
}

#[test]
fn class_runtime_is_set_and_enforced() {
    let c = config(
        "runtimeClass: {reservedRuntimes: [runc], fallbackRuntime: gvisor}\n\
         isolation: {mode: class, classes: [{name: vm, namespaces: ['*'], runtimeClassName: kata}]}",
    );
    let d = create(&c, &labelled("vm", app("x:1")));
    assert_allowed(&d);
    assert_eq!(d.object["spec"]["runtimeClassName"], "kata");
    let asks_gvisor = labelled(
        "vm",
        json!({"runtimeClassName": "gvisor", "containers": [{"name": "a", "image": "x:1"}]}),
    );
    assert_denied(
        &create(&c, &asks_gvisor),
        "isolation class 'vm' runs with RuntimeClass 'kata', but the pod asks for 'gvisor'",
    );
}

// ---------------------------------------------------------------------------------------------
// Isolation: the invariant and the earlier webhook's holes

fn anti_affinity(d: &Checked) -> &Value {
    &d.object["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
}

#[test]
fn class_mode_repels_other_classes_in_all_namespaces() {
    let d = create(&config(CLASS_MODE), &labelled("gold", app("x:1")));
    assert_allowed(&d);
    let term = &anti_affinity(&d)[0];
    assert_eq!(
        term["labelSelector"]["matchExpressions"],
        json!([{"key": "moat.dev/class", "operator": "Exists"}, {"key": "moat.dev/class", "operator": "NotIn", "values": ["gold"]}])
    );
    assert_eq!(
        term["namespaceSelector"],
        json!({}),
        "the term must see pods of every namespace"
    );
    assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
    let required = &d.object["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(
        required["nodeSelectorTerms"],
        json!([{"matchExpressions": [
            {"key": "node-restriction.kubernetes.io/moat-class", "operator": "In", "values": ["gold"]},
            {"key": "kubernetes.io/hostname", "operator": "Exists"},
        ]}])
    );
    assert_eq!(
        d.object["spec"]["tolerations"],
        json!([{"key": "moat.dev/isolated", "operator": "Equal", "value": "gold", "effect": "NoSchedule"}])
    );
}

#[test]
fn pod_mode_repels_every_other_isolated_pod() {
    let c = config("isolation: {mode: pod, classes: [{name: '*', namespaces: ['*']}]}");
    let d = create(&c, &labelled("gold", app("x:1")));
    assert_eq!(
        anti_affinity(&d)[0]["labelSelector"]["matchExpressions"],
        json!([{"key": "moat.dev/class", "operator": "Exists"}])
    );
    assert_eq!(anti_affinity(&d)[0]["namespaceSelector"], json!({}));
}

#[test]
fn unisolated_pods_may_not_tolerate_the_isolation_taint() {
    let c = config(CLASS_MODE);
    let cases: &[(&str, Value, bool)] = &[
        (
            "exact toleration",
            json!({"key": "moat.dev/isolated", "value": "gold", "effect": "NoSchedule"}),
            true,
        ),
        (
            "key with Exists",
            json!({"key": "moat.dev/isolated", "operator": "Exists"}),
            true,
        ),
        ("blanket Exists", json!({"operator": "Exists"}), true),
        (
            "blanket Exists for NoSchedule",
            json!({"operator": "Exists", "effect": "NoSchedule"}),
            true,
        ),
        (
            "other effect",
            json!({"key": "moat.dev/isolated", "operator": "Exists", "effect": "NoExecute"}),
            false,
        ),
        (
            "other key",
            json!({"key": "example.com/gpu", "operator": "Exists"}),
            false,
        ),
    ];
    for (name, toleration, denied) in cases {
        let p = pod(
            json!({"tolerations": [toleration], "containers": [{"name": "a", "image": "x:1"}]}),
        );
        let d = create(&c, &p);
        assert_eq!(!d.allowed(), *denied, "{name}: {}", d.message());
        if *denied {
            assert!(
                d.message()
                    .contains("spec.tolerations[0]: tolerates moat's isolation taint"),
                "{name}"
            );
        }
    }
}

#[test]
fn fixed_taint_value_guards_only_that_value() {
    let c = config(
        "isolation: {mode: class, nodes: {taintKey: ipp, taintValue: 'true'}, classes: [{name: '*', namespaces: ['*']}]}",
    );
    let p = |value: &str| {
        pod(
            json!({"tolerations": [{"key": "ipp", "value": value}], "containers": [{"name": "a", "image": "x:1"}]}),
        )
    };
    assert_denied(
        &create(&c, &p("true")),
        "tolerates moat's isolation taint 'ipp'",
    );
    assert_allowed(&create(&c, &p("false")));
}

#[test]
fn classes_are_bound_to_namespaces_by_the_operator() {
    let c = config(
        "isolation: {mode: class, classes: [\
           {name: bank, namespaces: ['bank-*']},\
           {name: lab, namespaceSelector: {matchLabels: {tier: lab}}}]}",
    );
    assert_allowed(&run(
        &c,
        &labelled("bank", app("x:1")),
        Call {
            ns: "bank-prod",
            ..Call::default()
        },
    ));
    assert_denied(
        &run(
            &c,
            &labelled("bank", app("x:1")),
            Call {
                ns: "intruder",
                ..Call::default()
            },
        ),
        "namespace 'intruder' may not use isolation class 'bank'",
    );
    assert_allowed(&run(
        &c,
        &labelled("lab", app("x:1")),
        Call {
            ns: "x",
            labels: labels(&[("tier", "lab")]),
            ..Call::default()
        },
    ));
    assert_denied(
        &run(
            &c,
            &labelled("lab", app("x:1")),
            Call {
                ns: "x",
                ..Call::default()
            },
        ),
        "namespace 'x' is not known to moat yet",
    );
    assert_denied(
        &create(&c, &labelled("nope", app("x:1"))),
        "isolation class 'nope' is not declared",
    );
    assert_denied(
        &create(&c, &labelled("Not_Valid", app("x:1"))),
        "metadata.labels['moat.dev/class']: 'Not_Valid' is not a valid isolation class name",
    );
}

#[test]
fn namespace_class_label_decides_the_class() {
    let c = config(
        "isolation: {mode: class, namespaceClassLabel: moat.dev/class, classes: [{name: gold, namespaces: [nobody]}]}",
    );
    let ns = || labels(&[("moat.dev/class", "gold")]);
    // Unlabelled pod: the namespace's class, and the label is added so others' anti-affinity sees it.
    let d = run(
        &c,
        &pod(app("x:1")),
        Call {
            labels: ns(),
            ..Call::default()
        },
    );
    assert_allowed(&d);
    assert_eq!(d.object["metadata"]["labels"]["moat.dev/class"], "gold");
    // A pod cannot choose another class than its namespace's.
    assert_denied(
        &run(
            &c,
            &labelled("silver", app("x:1")),
            Call {
                labels: ns(),
                ..Call::default()
            },
        ),
        "the pod asks for isolation class 'silver', but namespace 't' is bound to class 'gold'",
    );
}

#[test]
fn isolate_namespaces_isolates_unlabelled_pods() {
    let c = config(
        "isolation: {mode: class, isolateNamespaces: ['tenant-*'], defaultClass: shared, classes: [{name: shared, namespaces: ['tenant-*']}]}",
    );
    let d = run(
        &c,
        &pod(app("x:1")),
        Call {
            ns: "tenant-a",
            ..Call::default()
        },
    );
    assert_allowed(&d);
    assert_eq!(d.object["metadata"]["labels"]["moat.dev/class"], "shared");
    assert!(!anti_affinity(&d).is_null());
    let d = run(
        &c,
        &pod(app("x:1")),
        Call {
            ns: "other",
            ..Call::default()
        },
    );
    assert!(d.patch.0.is_empty());
}

#[test]
fn class_label_cannot_change_on_update() {
    let c = config(CLASS_MODE);
    let old = labelled("gold", app("x:1"));
    let cases: &[(&str, Value, Option<&str>)] = &[
        ("unchanged", labelled("gold", app("x:1")), None),
        (
            "changed",
            labelled("silver", app("x:1")),
            Some("cannot change (was 'gold', now 'silver')"),
        ),
        (
            "removed",
            pod(app("x:1")),
            Some("cannot change (was 'gold', now unset)"),
        ),
    ];
    for (name, new, want) in cases {
        let d = run(
            &c,
            new,
            Call {
                op: Operation::Update,
                old: Some(old.clone()),
                ..Call::default()
            },
        );
        match want {
            Some(needle) => assert!(d.message().contains(needle), "{name}: {}", d.message()),
            None => assert!(d.allowed(), "{name}: {}", d.message()),
        }
        assert!(d.patch.0.is_empty(), "{name}: no mutation on update");
    }
    let unlabelled = pod(app("x:1"));
    assert_denied(
        &run(
            &c,
            &labelled("gold", app("x:1")),
            Call {
                op: Operation::Update,
                old: Some(unlabelled),
                ..Call::default()
            },
        ),
        "was unset, now 'gold'",
    );
}

#[test]
fn tolerations_added_on_update_are_guarded() {
    let c = config(CLASS_MODE);
    let old = pod(app("x:1"));
    let new = pod(
        json!({"tolerations": [{"operator": "Exists"}], "containers": [{"name": "app", "image": "x:1"}]}),
    );
    assert_denied(
        &run(
            &c,
            &new,
            Call {
                op: Operation::Update,
                old: Some(old),
                ..Call::default()
            },
        ),
        "tolerates moat's isolation taint",
    );
}

#[test]
fn patches_add_to_the_pods_own_placement() {
    let c = config(CLASS_MODE);
    let own = labelled(
        "gold",
        json!({
            "tolerations": [{"key": "example.com/gpu", "operator": "Exists"}],
            "affinity": {
                "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
                ]}},
                "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "zone"}
                ]},
            },
            "containers": [{"name": "a", "image": "x:1"}],
        }),
    );
    let d = create(&c, &own);
    assert_allowed(&d);
    for op in &d.patch.0 {
        let op = serde_json::to_value(op).unwrap();
        assert_eq!(op["op"], "add", "moat only adds: {op}");
    }
    let spec = &d.object["spec"];
    assert_eq!(spec["tolerations"][0]["key"], "example.com/gpu");
    assert_eq!(spec["tolerations"].as_array().unwrap().len(), 2);
    let terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .as_array()
        .unwrap();
    assert_eq!(
        terms.len(),
        2,
        "terms are ORed: each one gets the class requirement"
    );
    for term in terms {
        assert!(
            term["matchExpressions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["key"] == "node-restriction.kubernetes.io/moat-class")
        );
    }
    assert_eq!(terms[0]["matchExpressions"][0]["key"], "zone");
    assert_eq!(terms[1]["matchFields"][0]["key"], "metadata.name");
    let anti = anti_affinity(&d).as_array().unwrap();
    assert_eq!(anti.len(), 2);
    assert_eq!(anti[0]["topologyKey"], "zone");
}

#[test]
fn mutation_is_idempotent_under_reinvocation() {
    for mode in ["class", "pod", "dedicatedNode"] {
        let c = config(&format!(
            "runtimeClass: {{reservedRuntimes: [runc], fallbackRuntime: gvisor}}\n\
             isolation: {{mode: {mode}, classes: [{{name: '*', namespaces: ['*']}}]}}"
        ));
        let first = create(&c, &labelled("gold", app("x:1")));
        assert_allowed(&first);
        assert!(!first.patch.0.is_empty(), "{mode}");
        let second = create(&c, &first.object);
        assert_allowed(&second);
        assert!(second.patch.0.is_empty(), "{mode}: {:?}", second.patch);
        // The validating webhook accepts moat's own output...
        assert_allowed(&run(
            &c,
            &first.object,
            Call {
                stage: Stage::Validate,
                ..Call::default()
            },
        ));
    }
}

#[test]
fn validate_stage_denies_when_a_later_webhook_undid_moat() {
    let c = config(CLASS_MODE);
    let first = create(&c, &labelled("gold", app("x:1")));
    let mut undone = first.object.clone();
    undone["spec"]["tolerations"] = json!([]);
    let d = run(
        &c,
        &undone,
        Call {
            stage: Stage::Validate,
            ..Call::default()
        },
    );
    assert_denied(&d, "moat's mutation is missing from the final object");
    assert_denied(&d, "add toleration moat.dev/isolated=gold:NoSchedule");
    assert!(d.patch.0.is_empty());
    // ...and a pod that never went through the mutating webhook.
    assert_denied(
        &run(
            &c,
            &labelled("gold", app("x:1")),
            Call {
                stage: Stage::Validate,
                ..Call::default()
            },
        ),
        "is missing",
    );
}

#[test]
fn dedicated_node_mode_pins_by_node_selector() {
    let c = config("isolation: {mode: dedicatedNode, classes: [{name: '*', namespaces: ['*']}]}");
    let d = create(&c, &labelled("gold", app("x:1")));
    assert_allowed(&d);
    let selector = &d.object["spec"]["nodeSelector"];
    assert_eq!(
        selector["node-restriction.kubernetes.io/moat-class"],
        "gold"
    );
    let id = selector["node-restriction.kubernetes.io/moat-node"]
        .as_str()
        .unwrap();
    assert!(
        id.starts_with("gold-") && id.len() == "gold-".len() + 22,
        "{id}"
    );
    // The id is the pod's namespace's: a pod of another namespace cannot claim it, one of the
    // same namespace may name it (reinvocation, validation, sharing within a tenant).
    let claim = |ns: &str| {
        let mut p = labelled("gold", app("x:1"));
        p["spec"]["nodeSelector"] = json!({"node-restriction.kubernetes.io/moat-node": id});
        run(
            &c,
            &p,
            Call {
                ns,
                ..Call::default()
            },
        )
    };
    assert_allowed(&claim("t"));
    assert_denied(&claim("other"), "is a dedicated node of another namespace");
    assert!(
        d.object["spec"]["affinity"].is_null(),
        "no affinity in dedicated mode"
    );
    // A node id of another class cannot be chosen by the pod.
    let forged = labelled(
        "gold",
        json!({"nodeSelector": {"node-restriction.kubernetes.io/moat-node": "silver-0123456789"}, "containers": [{"name": "a", "image": "x:1"}]}),
    );
    assert_denied(
        &create(&c, &forged),
        "is not a dedicated node of class 'gold'",
    );
    let other_pool = labelled(
        "gold",
        json!({"nodeSelector": {"node-restriction.kubernetes.io/moat-class": "silver"}, "containers": [{"name": "a", "image": "x:1"}]}),
    );
    assert_denied(
        &create(&c, &other_pool),
        "is not the node label of class 'gold'",
    );
}

#[test]
fn node_name_binding_is_denied_unless_allowed() {
    let p = pod(json!({"nodeName": "n1", "containers": [{"name": "a", "image": "x:1"}]}));
    assert_denied(
        &create(&config(CLASS_MODE), &p),
        "spec.nodeName: binding a pod to a node by name skips the scheduler",
    );
    let c = config(
        "isolation: {mode: class, allowNodeName: true, classes: [{name: '*', namespaces: ['*']}]}",
    );
    assert_allowed(&create(&c, &p));
    assert_allowed(&create(&Config::default(), &p));
}

// ---------------------------------------------------------------------------------------------
// Ignore rules: explicit, reported for logging and counting

fn by_daemonset_controller(c: &Config, pod: &Value, ns: &str) -> Checked {
    run(
        c,
        pod,
        Call {
            user: Some("system:serviceaccount:kube-system:daemon-set-controller"),
            ns,
            labels: labels(&[("kubernetes.io/metadata.name", ns)]),
            ..Call::default()
        },
    )
}

fn daemonset_pod(spec: Value) -> Value {
    let mut p = labelled("gold", spec);
    p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "uid": "u", "controller": true}]);
    p
}

#[test]
fn ignore_rules() {
    let exempt_ns = config(&format!(
        "{CLASS_MODE}\nexemptions: {{namespaces: [kube-system, '*-system']}}"
    ));
    for ns in ["kube-system", "monitoring-system"] {
        let d = run(
            &exempt_ns,
            &labelled("gold", app("busybox")),
            Call {
                ns,
                ..Call::default()
            },
        );
        assert_allowed(&d);
        assert!(d.patch.0.is_empty());
        assert_eq!(d.exemptions[0].reason, ExemptionReason::Namespace);
    }

    let c = config(CLASS_MODE);
    let d = by_daemonset_controller(&c, &daemonset_pod(app("x:1")), "t");
    assert_allowed(&d);
    assert!(d.patch.0.is_empty());
    assert_eq!(d.exemptions[0].reason, ExemptionReason::DaemonSet);
    // The exemption is from isolation, not from the taint guard or the image rule.
    assert_denied(
        &by_daemonset_controller(
            &c,
            &daemonset_pod(
                json!({"tolerations": [{"operator": "Exists"}], "containers": [{"name": "a", "image": "x:1"}]}),
            ),
            "t",
        ),
        "tolerates",
    );
    assert_denied(
        &by_daemonset_controller(&c, &daemonset_pod(app("x")), "t"),
        "has no tag",
    );

    let mut annotated = labelled("gold", app("x:1"));
    annotated["metadata"]["annotations"] = json!({"moat.dev/ignore": "true"});
    let d = create(&c, &annotated);
    assert!(
        !d.patch.0.is_empty(),
        "no ignore annotation unless the operator names one"
    );
    let with_annotation = config(&format!(
        "{CLASS_MODE}\nexemptions: {{ignoreAnnotation: moat.dev/ignore}}"
    ));
    let d = create(&with_annotation, &annotated);
    assert!(d.patch.0.is_empty());
    assert_eq!(d.exemptions[0].reason, ExemptionReason::IgnoreAnnotation);

    let pinned = labelled(
        "gold",
        json!({"nodeSelector": {"disk": "ssd"}, "containers": [{"name": "a", "image": "x:1"}]}),
    );
    let d = create(&c, &pinned);
    assert!(!d.patch.0.is_empty(), "pinned pods are isolated by default");
    assert_eq!(d.object["spec"]["nodeSelector"]["disk"], "ssd");
    let skip_pinned = config(&format!("{CLASS_MODE}\nexemptions: {{pinnedPods: true}}"));
    let d = create(&skip_pinned, &pinned);
    assert!(d.patch.0.is_empty());
    assert_eq!(d.exemptions[0].reason, ExemptionReason::PinnedPlacement);

    let d = run(
        &c,
        &labelled("gold", app("x:1")),
        Call {
            dry_run: true,
            ..Call::default()
        },
    );
    assert!(
        !d.patch.0.is_empty(),
        "dry-run gets the real answer by default"
    );
    let skip_dry = config(&format!("{CLASS_MODE}\nexemptions: {{dryRun: true}}"));
    let d = run(
        &skip_dry,
        &labelled("gold", app("x:1")),
        Call {
            dry_run: true,
            ..Call::default()
        },
    );
    assert!(d.patch.0.is_empty());
    assert_eq!(d.exemptions[0].reason, ExemptionReason::DryRun);
}

// ---------------------------------------------------------------------------------------------
// Kinds

#[test]
fn workload_templates_are_decided_not_patched() {
    let c = config(&format!(
        "runtimeClass: {{reservedRuntimes: [runc], fallbackRuntime: gvisor}}\n{CLASS_MODE}"
    ));
    let tpl = json!({"metadata": {"labels": {"moat.dev/class": "gold"}}, "spec": {"containers": [{"name": "a", "image": "x:1"}]}});
    let cases: &[(&str, &str, Value)] = &[
        ("apps/v1", "Deployment", json!({"template": tpl})),
        ("apps/v1", "StatefulSet", json!({"template": tpl})),
        ("apps/v1", "ReplicaSet", json!({"template": tpl})),
        ("batch/v1", "Job", json!({"template": tpl})),
        (
            "batch/v1",
            "CronJob",
            json!({"jobTemplate": {"spec": {"template": tpl}}}),
        ),
        ("v1", "ReplicationController", json!({"template": tpl})),
    ];
    for (api_version, kind, spec) in cases {
        let obj = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "w"}, "spec": spec});
        let d = create(&c, &obj);
        assert_allowed(&d);
        assert!(d.patch.0.is_empty(), "{kind}");
        assert!(
            d.changes
                .iter()
                .any(|ch| ch.description.contains("toleration")),
            "{kind}: changes listed for pods"
        );
        let mut bad = obj.clone();
        let ptr = if *kind == "CronJob" {
            "/spec/jobTemplate/spec/template/spec/containers/0/image"
        } else {
            "/spec/template/spec/containers/0/image"
        };
        *bad.pointer_mut(ptr).unwrap() = json!("busybox");
        assert_denied(&create(&c, &bad), "has no tag");
        let d = run(
            &c,
            &obj,
            Call {
                stage: Stage::Validate,
                ..Call::default()
            },
        );
        assert_allowed(&d);
    }
}

#[test]
fn other_kinds_and_operations_pass_untouched() {
    let c = config(CLASS_MODE);
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}});
    let d = create(&c, &svc);
    assert_allowed(&d);
    assert_eq!(d.exemptions[0].reason, ExemptionReason::UnsupportedKind);
    let d = run(
        &c,
        &pod(app("busybox")),
        Call {
            op: Operation::Delete,
            ..Call::default()
        },
    );
    assert_allowed(&d);
    assert_eq!(d.exemptions[0].reason, ExemptionReason::Operation);
}

#[test]
fn malformed_templates_are_errors_not_panics() {
    let bad = json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": {"spec": {"containers": 3}}}});
    let e = Template::from_value(&bad).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Deployment 'spec.template.spec' does not parse"),
        "{e}"
    );
}

#[test]
fn embedded_default_refuses_isolates_and_rewrites() {
    let c = Config::embedded_default();
    assert_denied(&create(&c, &pod(app("nginx"))), "has no tag");
    let d = create(
        &c,
        &labelled(
            "untrusted",
            json!({"runtimeClassName": "runc", "containers": [{"name": "a", "image": "nginx:1.27"}]}),
        ),
    );
    assert_allowed(&d);
    assert_eq!(d.object["spec"]["runtimeClassName"], "gvisor");
    assert!(!anti_affinity(&d).is_null());
    let d = run(
        &c,
        &pod(app("busybox")),
        Call {
            ns: "kube-system",
            ..Call::default()
        },
    );
    assert_allowed(&d);
}

#[test]
fn audit_mode_allows_warns_and_changes_nothing() {
    let c = config(&format!(
        "runtimeClass: {{reservedRuntimes: [runc], fallbackRuntime: gvisor}}\n{CLASS_MODE}\n\
         enforcement: {{images: audit, runtimeClass: audit, isolation: audit}}"
    ));
    let d = create(&c, &labelled("gold", app("busybox")));
    assert_allowed(&d);
    assert!(d.patch.0.is_empty(), "{:?}", d.patch);
    assert_eq!(d.audited.len(), 1);
    assert!(
        d.warnings
            .iter()
            .any(|w| w.starts_with("audit: moat would deny:") && w.contains("has no tag")),
        "{:?}",
        d.warnings
    );
    assert!(
        d.warnings
            .iter()
            .any(|w| w == "audit: moat would set spec.runtimeClassName to 'gvisor'"),
        "{:?}",
        d.warnings
    );
    assert!(
        d.warnings
            .iter()
            .any(|w| w.starts_with("audit: moat would add toleration")),
        "{:?}",
        d.warnings
    );
    // Audit of one policy leaves the others enforced.
    let c = config(&format!("{CLASS_MODE}\nenforcement: {{images: audit}}"));
    let d = create(&c, &labelled("gold", app("busybox")));
    assert_allowed(&d);
    assert!(!d.patch.0.is_empty(), "isolation is still enforced");
    let d = create(
        &c,
        &pod(
            json!({"tolerations": [{"operator": "Exists"}], "containers": [{"name": "a", "image": "x"}]}),
        ),
    );
    assert_denied(&d, "tolerates");
    assert!(!d.message().contains("has no tag"));
}

#[test]
fn image_review_applies_the_image_rule_alone() {
    let c = config("images: {allowedRegistries: [ghcr.io]}");
    let d = moat_core::engine::review_images(
        &c,
        "t",
        ["ghcr.io/a/b:1", "busybox", "", "ghcr.io/x:latest"],
    );
    let got: Vec<&str> = d.denials.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(
        got[0].starts_with("spec.containers[1]: ") && got[0].contains("not an allowed registry")
    );
    assert!(got[1].starts_with("spec.containers[1]: ") && got[1].contains("has no tag"));
    assert_eq!(got[2], "spec.containers[2]: has no image");
    assert!(got[3].starts_with("spec.containers[3]: ") && got[3].contains("mutable tag 'latest'"));
}

// ---------------------------------------------------------------------------------------------
// A hostile tenant with the `edit` role (issue: tenant-proof isolation)

#[test]
fn owner_references_a_tenant_writes_do_not_exempt_a_pod() {
    let c = config(CLASS_MODE);
    for user in [None, Some("alice"), Some("system:serviceaccount:t:default")] {
        let d = run(
            &c,
            &daemonset_pod(app("x:1")),
            Call {
                user,
                ..Call::default()
            },
        );
        assert_allowed(&d);
        assert!(d.exemptions.is_empty(), "{user:?}: {:?}", d.exemptions);
        assert!(!d.patch.0.is_empty(), "{user:?}: the pod is isolated");
    }
    // The DaemonSet controller's own pods without a DaemonSet owner are not exempt either.
    let d = by_daemonset_controller(&c, &labelled("gold", app("x:1")), "t");
    assert!(d.exemptions.is_empty());
}

#[test]
fn no_tenant_triggered_exemption_in_a_namespace_whose_class_the_operator_forces() {
    let c = config(
        "isolation: {mode: class, namespaceClassLabel: moat.dev/class, isolateNamespaces: [forced], defaultClass: gold, classes: [{name: '*', namespaces: ['*']}]}\n\
         exemptions: {ignoreAnnotation: moat.dev/ignore, pinnedPods: true, dryRun: true}",
    );
    let mut tricks = daemonset_pod(
        json!({"nodeSelector": {"disk": "ssd"}, "containers": [{"name": "a", "image": "x:1"}]}),
    );
    tricks["metadata"]["annotations"] = json!({"moat.dev/ignore": "true"});
    tricks["metadata"]["labels"] = json!({});
    for (ns, ns_labels) in [
        ("bound", labels(&[("moat.dev/class", "gold")])),
        ("forced", labels(&[])),
    ] {
        for user in [
            Some("system:serviceaccount:kube-system:daemon-set-controller"),
            Some("alice"),
        ] {
            let d = run(
                &c,
                &tricks,
                Call {
                    user,
                    ns,
                    labels: ns_labels.clone(),
                    dry_run: true,
                    ..Call::default()
                },
            );
            assert!(d.exemptions.is_empty(), "{ns} {user:?}: {:?}", d.exemptions);
            if user == Some("system:serviceaccount:kube-system:daemon-set-controller") {
                // A DaemonSet's own pod is refused there, not exempted: it could never run.
                assert_denied(&d, "so a DaemonSet's pods could never run there");
                continue;
            }
            assert_allowed(&d);
            assert_eq!(
                d.object["metadata"]["labels"]["moat.dev/class"], "gold",
                "{ns} {user:?}"
            );
        }
    }
    // Where the tenant chose isolation itself, its opt-outs still work.
    let d = run(
        &c,
        &tricks,
        Call {
            user: Some("alice"),
            ns: "free",
            labels: labels(&[]),
            ..Call::default()
        },
    );
    assert!(!d.exemptions.is_empty());
}

#[test]
fn an_exempt_pod_may_not_carry_a_class_its_namespace_may_not_use() {
    let c = config(
        "isolation: {mode: class, classes: [{name: bank, namespaces: [bank]}]}\nexemptions: {ignoreAnnotation: moat.dev/ignore}",
    );
    let mut pod = labelled("bank", app("x:1"));
    pod["metadata"]["annotations"] = json!({"moat.dev/ignore": "true"});
    assert_denied(
        &create(&c, &pod),
        "namespace 't' may not use isolation class 'bank'",
    );
    let d = run(
        &c,
        &pod,
        Call {
            ns: "bank",
            ..Call::default()
        },
    );
    assert_allowed(&d);
    assert_eq!(d.exemptions[0].reason, ExemptionReason::IgnoreAnnotation);
}

#[test]
fn an_unknown_namespace_is_denied_until_its_labels_are_known() {
    let c = config(
        "isolation: {mode: class, namespaceClassLabel: moat.dev/class, classes: [{name: '*', namespaces: ['*']}]}",
    );
    assert_denied(
        &create(&c, &pod(app("x:1"))),
        "namespace 't' is not known to moat yet",
    );
    let d = run(
        &c,
        &pod(app("x:1")),
        Call {
            labels: labels(&[("moat.dev/class", "gold")]),
            ..Call::default()
        },
    );
    assert_allowed(&d);
    assert_eq!(d.object["metadata"]["labels"]["moat.dev/class"], "gold");
    // Known and without the label: not isolated.
    let d = run(
        &c,
        &pod(app("x:1")),
        Call {
            labels: labels(&[]),
            ..Call::default()
        },
    );
    assert_allowed(&d);
    assert!(d.patch.0.is_empty());
}

#[test]
fn isolated_pods_require_the_topology_label_to_exist() {
    for mode in ["class", "pod"] {
        let c = config(&format!(
            "isolation: {{mode: {mode}, nodes: {{topologyKey: node-restriction.kubernetes.io/moat-host}}, classes: [{{name: '*', namespaces: ['*']}}]}}"
        ));
        let d = create(&c, &labelled("gold", app("x:1")));
        let terms = &d.object["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"];
        for term in terms.as_array().unwrap() {
            assert!(
                term["matchExpressions"].as_array().unwrap().contains(
                    &json!({"key": "node-restriction.kubernetes.io/moat-host", "operator": "Exists"})
                ),
                "{mode}: {term}"
            );
        }
        assert_eq!(
            anti_affinity(&d)[0]["topologyKey"],
            "node-restriction.kubernetes.io/moat-host"
        );
    }
}

#[test]
fn image_volumes_go_through_the_image_rule() {
    let c = config("images: {allowedRegistries: [ghcr.io/acme]}");
    let p = pod(json!({
        "containers": [{"name": "a", "image": "ghcr.io/acme/app:1"}],
        "volumes": [
            {"name": "cfg", "configMap": {"name": "x"}},
            {"name": "models", "image": {"reference": "evil.example/models"}},
            {"name": "ok", "image": {"reference": "ghcr.io/acme/data:2"}},
            {"name": "empty", "image": {}},
        ],
    }));
    let d = create(&c, &p);
    assert_denied(
        &d,
        "image volume 'models' (spec.volumes[1].image.reference): image 'evil.example/models' is from",
    );
    assert_denied(&d, "image 'evil.example/models' has no tag");
    assert_denied(
        &d,
        "image volume 'empty' (spec.volumes[3].image.reference) has no image",
    );
    assert!(!d.message().contains("'ok'"), "{}", d.message());
    // On UPDATE, an image volume the pod already had is not decided again.
    let d = run(
        &Config::default(),
        &p,
        Call {
            op: Operation::Update,
            old: Some(p.clone()),
            ..Call::default()
        },
    );
    assert!(!d.message().contains("models"), "{}", d.message());
}

#[test]
fn workload_updates_that_leave_the_template_alone_are_not_decided() {
    let c = Config::embedded_default();
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "t", "finalizers": ["foregroundDeletion"]},
        "spec": {"replicas": 3, "template": {"metadata": {"labels": {"app": "d"}}, "spec": app("nginx")}}});
    let mut scaled = deployment.clone();
    scaled["spec"]["replicas"] = json!(0);
    scaled["metadata"]["labels"] = json!({"team": "a"});
    scaled["metadata"]["finalizers"] = json!([]);
    let d = run(
        &c,
        &scaled,
        Call {
            op: Operation::Update,
            old: Some(deployment.clone()),
            ..Call::default()
        },
    );
    assert_allowed(&d);
    assert_eq!(d.exemptions[0].reason, ExemptionReason::UnchangedTemplate);
    // A template change is decided as new.
    let mut changed = deployment.clone();
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:latest");
    let d = run(
        &c,
        &changed,
        Call {
            op: Operation::Update,
            old: Some(deployment),
            ..Call::default()
        },
    );
    assert_denied(&d, "mutable tag 'latest'");
}

#[test]
fn only_allowed_schedulers() {
    let c = config(CLASS_MODE);
    assert_denied(
        &create(
            &c,
            &pod(
                json!({"schedulerName": "my-scheduler", "containers": [{"name": "a", "image": "x:1"}]}),
            ),
        ),
        "spec.schedulerName: scheduler 'my-scheduler' is not allowed (allowed: default-scheduler)",
    );
    assert_allowed(&create(
        &c,
        &pod(
            json!({"schedulerName": "default-scheduler", "containers": [{"name": "a", "image": "x:1"}]}),
        ),
    ));
    let more = config(&format!(
        "{}, schedulerNames: [default-scheduler, my-scheduler]}}",
        CLASS_MODE.trim_end_matches('}')
    ));
    assert_allowed(&create(
        &more,
        &pod(
            json!({"schedulerName": "my-scheduler", "containers": [{"name": "a", "image": "x:1"}]}),
        ),
    ));
}

#[test]
fn the_service_account_stamp_is_moats_own() {
    const KEY: &str = "moat.dev/service-account";
    assert!(
        create(&Config::default(), &pod(app("x:1")))
            .patch
            .0
            .is_empty(),
        "off unless configured"
    );
    let c = config("identity: {serviceAccountAnnotation: moat.dev/service-account}");
    let d = create(&c, &pod(app("x:1")));
    assert_eq!(
        d.object["metadata"]["annotations"][KEY], "default",
        "{:?} {:?} {:?}",
        d.patch, d.changes, d.denials
    );
    // Whatever the pod wrote there is replaced by its real service account.
    let mut forged =
        pod(json!({"serviceAccountName": "web", "containers": [{"name": "a", "image": "x:1"}]}));
    forged["metadata"]["annotations"] = json!({KEY: "payments", "other": "kept"});
    let d = create(&c, &forged);
    assert_allowed(&d);
    assert_eq!(d.object["metadata"]["annotations"][KEY], "web");
    assert_eq!(d.object["metadata"]["annotations"]["other"], "kept");
    // The validating webhook refuses a final pod whose stamp is not its service account.
    let validate = |object: &Value| {
        run(
            &c,
            object,
            Call {
                stage: Stage::Validate,
                ..Call::default()
            },
        )
    };
    assert_allowed(&validate(&d.object));
    assert_denied(
        &validate(&forged),
        "set annotation moat.dev/service-account=web",
    );
    // An UPDATE may not change it, nor add it.
    let mut changed = d.object.clone();
    changed["metadata"]["annotations"][KEY] = json!("payments");
    for (old, new) in [(&d.object, &changed), (&pod(app("x:1")), &d.object)] {
        let u = run(
            &c,
            new,
            Call {
                op: Operation::Update,
                old: Some(old.clone()),
                ..Call::default()
            },
        );
        assert_denied(&u, "cannot change on a running pod");
    }
    // A pod without metadata gets it, with the annotation.
    let bare = json!({"apiVersion": "v1", "kind": "Pod", "spec": app("x:1")});
    assert_eq!(
        create(&c, &bare).object["metadata"]["annotations"][KEY],
        "default"
    );
}

// ---------------------------------------------------------------------------------------------
// Isolation modes per class (issue 20).

/// Three classes, one per mode: `shared` takes the global mode, the others their own.
const MIXED_MODES: &str = "isolation: {mode: class, classes: [\
     {name: shared, namespaces: ['*']},\
     {name: ci, mode: pod, namespaces: ['*']},\
     {name: big, mode: dedicatedNode, namespaces: ['*']}]}";

/// The class-label expressions of one anti-affinity term, as (operator, values).
type Term = Vec<(String, Value)>;

/// The class-label expressions of the pod's anti-affinity terms.
fn class_terms(d: &Checked) -> Vec<Term> {
    anti_affinity(d)
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            t["labelSelector"]["matchExpressions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["operator"].as_str().unwrap().to_owned(),
                        e["values"].clone(),
                    )
                })
                .collect()
        })
        .collect()
}

#[test]
fn each_class_is_placed_in_its_own_mode() {
    let c = config(MIXED_MODES);
    let exists = ("Exists".to_owned(), Value::Null);
    // (class, anti-affinity terms, pinned to a dedicated id, the change that names the mode)
    let cases: &[(&str, Vec<Term>, bool, &str)] = &[
        (
            "shared",
            vec![vec![
                exists.clone(),
                ("NotIn".to_owned(), json!(["shared"])),
            ]],
            false,
            "keep pods of every class but 'shared' off this pod's node (class mode)",
        ),
        (
            "ci",
            vec![vec![exists.clone()]],
            false,
            "keep every other isolated pod off this pod's node (class 'ci' is in pod mode)",
        ),
        (
            "big",
            vec![],
            true,
            "(class 'big' is in dedicatedNode mode)",
        ),
    ];
    for (class, terms, pinned, change) in cases {
        let d = create(&c, &labelled(class, app("x:1")));
        assert_allowed(&d);
        assert_eq!(&class_terms(&d), terms, "{class}");
        let id =
            d.object["spec"]["nodeSelector"]["node-restriction.kubernetes.io/moat-node"].as_str();
        assert_eq!(id.is_some(), *pinned, "{class}: {id:?}");
        if let Some(id) = id {
            assert!(id.starts_with(&format!("{class}-")), "{id}");
            assert!(
                d.object["spec"]["affinity"].is_null(),
                "{class}: no affinity"
            );
        }
        assert!(
            d.changes.iter().any(|ch| ch.description.contains(change)),
            "{class}: {:?}",
            d.changes
        );
        // Reinvocation adds nothing; the validating webhook accepts the result.
        assert!(create(&c, &d.object).patch.0.is_empty(), "{class}");
        assert_allowed(&run(
            &c,
            &d.object,
            Call {
                stage: Stage::Validate,
                ..Call::default()
            },
        ));
    }
}

#[test]
fn a_class_without_a_mode_takes_the_global_one() {
    for (global, want_pinned, want_terms) in [
        ("class", false, 2),
        ("pod", false, 1),
        ("dedicatedNode", true, 0),
    ] {
        let c = config(&format!(
            "isolation: {{mode: {global}, classes: [{{name: '*', namespaces: ['*']}}, {{name: ci, mode: pod, namespaces: ['*']}}]}}"
        ));
        let d = create(&c, &labelled("gold", app("x:1")));
        assert_allowed(&d);
        let terms = class_terms(&d);
        assert_eq!(terms.first().map_or(0, Vec::len), want_terms, "{global}");
        assert_eq!(
            d.object["spec"]["nodeSelector"]["node-restriction.kubernetes.io/moat-node"]
                .is_string(),
            want_pinned,
            "{global}"
        );
        // `ci` is in pod mode whatever the global mode.
        let ci = create(&c, &labelled("ci", app("x:1")));
        assert_eq!(
            class_terms(&ci),
            vec![vec![("Exists".to_owned(), Value::Null)]],
            "{global}"
        );
    }
    // `off` is global: a class's own mode does not switch isolation on.
    let off = config("isolation: {mode: off, classes: [{name: ci, mode: pod, namespaces: ['*']}]}");
    let d = create(&off, &labelled("ci", app("x:1")));
    assert_allowed(&d);
    assert!(d.patch.0.is_empty(), "{:?}", d.patch);
}

#[test]
fn dedicated_ids_stay_bound_to_namespace_and_class_among_mixed_modes() {
    let c = config(&format!(
        "{}, {{name: huge, mode: dedicatedNode, namespaces: ['*']}}]}}",
        MIXED_MODES.strip_suffix("]}").unwrap()
    ));
    let big = create(&c, &labelled("big", app("x:1")));
    let id = big.object["spec"]["nodeSelector"]["node-restriction.kubernetes.io/moat-node"]
        .as_str()
        .unwrap()
        .to_owned();
    let naming = |class: &str, ns: &str| {
        let mut p = labelled(class, app("x:1"));
        p["spec"]["nodeSelector"] = json!({"node-restriction.kubernetes.io/moat-node": id});
        run(
            &c,
            &p,
            Call {
                ns,
                ..Call::default()
            },
        )
    };
    assert_allowed(&naming("big", "t"));
    assert_denied(
        &naming("big", "other"),
        "is a dedicated node of another namespace",
    );
    assert_denied(
        &naming("huge", "t"),
        "is not a dedicated node of class 'huge'",
    );
    // Pods of the affinity modes keep their own class's node requirement (and anti-affinity), so
    // naming the id cannot bring them next to `big`'s pod.
    for class in ["shared", "ci"] {
        let d = naming(class, "t");
        assert_allowed(&d);
        let term = &d.object["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0];
        assert!(
            term["matchExpressions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["key"] == "node-restriction.kubernetes.io/moat-class"
                    && e["values"] == json!([class])),
            "{class}: {term}"
        );
    }
}

type Labels = BTreeMap<String, String>;

fn daemonset(ns: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": ns},
        "spec": {"selector": {"matchLabels": {"app": "agent"}},
                 "template": {"metadata": {"labels": {"app": "agent"}}, "spec": app("agent:1.0")}}})
}

#[test]
fn a_daemonset_in_a_namespace_forced_into_a_class_is_refused_with_a_reason() {
    for mode in ["class", "pod", "dedicatedNode"] {
        let c = config(&format!(
            "isolation: {{mode: {mode}, namespaceClassLabel: moat.dev/class, isolateNamespaces: [forced], defaultClass: gold, classes: [{{name: gold, namespaces: [forced, free]}}]}}"
        ));
        // (namespace, its labels, refused)
        let cases: &[(&str, Option<Labels>, bool)] = &[
            ("bound", labels(&[("moat.dev/class", "gold")]), true),
            ("forced", labels(&[]), true),
            ("free", labels(&[]), false),
        ];
        for (ns, ns_labels, refused) in cases {
            let d = run(
                &c,
                &daemonset(ns),
                Call {
                    ns,
                    labels: ns_labels.clone(),
                    ..Call::default()
                },
            );
            if *refused {
                assert_denied(
                    &d,
                    &format!(
                        "namespace '{ns}' runs every pod in isolation class 'gold' ({mode} mode), so a DaemonSet's pods could never run there"
                    ),
                );
            } else {
                assert_allowed(&d);
                assert_eq!(d.exemptions[0].reason, ExemptionReason::DaemonSet, "{mode}");
            }
        }
        // A Deployment in the same namespace is fine: its pods go to nodes of the class.
        let mut deployment = daemonset("bound");
        deployment["kind"] = json!("Deployment");
        let d = run(
            &c,
            &deployment,
            Call {
                ns: "bound",
                labels: labels(&[("moat.dev/class", "gold")]),
                ..Call::default()
            },
        );
        assert_allowed(&d);
    }
    // In audit mode the refusal is a warning.
    let audit = config(
        "isolation: {mode: pod, isolateNamespaces: [forced], defaultClass: gold, classes: [{name: gold, namespaces: [forced]}]}\n\
         enforcement: {isolation: audit}",
    );
    let d = run(
        &audit,
        &daemonset("forced"),
        Call {
            ns: "forced",
            ..Call::default()
        },
    );
    assert_allowed(&d);
    assert!(
        d.warnings
            .iter()
            .any(|w| w.contains("a DaemonSet's pods could never run there")),
        "{:?}",
        d.warnings
    );
}
