//! Property tests over generated pods: the patch applies, reinvocation changes nothing, the
//! validating stage accepts moat's own output, and no two pods that the invariant keeps apart
//! can be placed on one node by a model of the scheduler's filters.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::collections::BTreeMap;

use moat_core::config::Config;
use moat_core::decision::{Decision, Operation, Request, Requester, Stage};
use moat_core::engine::decide;
use moat_core::subject::Template;
use proptest::prelude::*;
use serde_json::{Value, json};

const CLASSES: &[&str] = &["gold", "silver", "untrusted"];
const NAMESPACES: &[&str] = &["team-a", "team-b"];

fn config(mode: &str, shared_pool: bool) -> Config {
    let nodes = if shared_pool {
        "nodes: {labelKey: ipp, labelValue: 'true', taintKey: ipp, taintValue: 'true'},"
    } else {
        ""
    };
    Config::from_yaml(&format!(
        "runtimeClass: {{reservedRuntimes: [runc], fallbackRuntime: gvisor}}\n\
         isolation: {{mode: {mode}, {nodes} classes: [{{name: '*', namespaces: ['*']}}]}}"
    ))
    .unwrap()
}

const MODES: &[&str] = &["class", "pod", "dedicatedNode"];

/// A mixed-mode configuration: each named class in its own mode or (None) the global one, and
/// `*` (any other class name) in the global mode.
fn mixed_config(global: &str, modes: &[Option<&str>], shared_pool: bool) -> Config {
    let nodes = if shared_pool {
        "nodes: {labelKey: ipp, labelValue: 'true', taintKey: ipp, taintValue: 'true'},"
    } else {
        ""
    };
    let classes: Vec<String> = CLASSES
        .iter()
        .zip(modes)
        .map(|(class, mode)| {
            let mode = mode.map_or(String::new(), |m| format!("mode: {m}, "));
            format!("{{name: {class}, {mode}namespaces: ['*']}}")
        })
        .collect();
    Config::from_yaml(&format!(
        "runtimeClass: {{reservedRuntimes: [runc], fallbackRuntime: gvisor}}\n\
         isolation: {{mode: {global}, {nodes} classes: [{}, {{name: '*', namespaces: ['*']}}]}}",
        classes.join(", ")
    ))
    .unwrap()
}

/// The mode the generated configuration gives `class`, worked out from the generator's own
/// choices rather than by moat's code, so a change there that ignores a class's mode fails.
fn mode_of<'m>(global: &'m str, modes: &[Option<&'m str>], class: &str) -> &'m str {
    CLASSES
        .iter()
        .position(|c| *c == class)
        .and_then(|i| modes[i])
        .unwrap_or(global)
}

fn toleration() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({"key": "example.com/gpu", "operator": "Exists"})),
        Just(
            json!({"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"})
        ),
        Just(
            json!({"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300})
        ),
        // Attempts to reach isolated nodes: these must be denied for unisolated pods.
        Just(json!({"operator": "Exists"})),
        Just(json!({"key": "moat.dev/isolated", "operator": "Exists"})),
        Just(json!({"key": "ipp", "operator": "Equal", "value": "true"})),
    ]
}

fn node_term() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]})),
        Just(json!({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]})),
        Just(json!({"matchExpressions": [{"key": "zone", "operator": "Exists"}]})),
        Just(
            json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["plain-a", "gold-a", "silver-b"]}]})
        ),
    ]
}

fn anti_term() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "zone"})),
        Just(
            json!({"labelSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}, "topologyKey": "kubernetes.io/hostname"})
        ),
    ]
}

prop_compose! {
    fn pod()(
        class in prop::option::of(prop::sample::select(CLASSES)),
        namespace in prop::sample::select(NAMESPACES),
        app in prop::sample::select(&["web", "db", "batch"][..]),
        tolerations in prop::collection::vec(toleration(), 0..3),
        terms in prop::collection::vec(node_term(), 0..3),
        anti in prop::collection::vec(anti_term(), 0..2),
        selector in prop::option::of(Just(json!({"zone": "a"}))),
        runtime in prop::option::of(prop::sample::select(&["runc", "gvisor", "kata"][..])),
        containers in 1usize..4,
    ) -> (String, Value) {
        let mut labels = json!({"app": app});
        if let Some(c) = class {
            labels["moat.dev/class"] = json!(c);
            labels["ipp-class"] = json!(c);
        }
        let mut spec = json!({
            "containers": (0..containers).map(|i| json!({"name": format!("c{i}"), "image": format!("ghcr.io/acme/app{i}:1.{i}")})).collect::<Vec<_>>(),
        });
        if !tolerations.is_empty() { spec["tolerations"] = json!(tolerations); }
        if !terms.is_empty() {
            spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] = json!(terms);
        }
        if !anti.is_empty() {
            spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = json!(anti);
        }
        if let Some(s) = selector { spec["nodeSelector"] = s; }
        if let Some(r) = runtime { spec["runtimeClassName"] = json!(r); }
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": namespace, "labels": labels}, "spec": spec});
        (namespace.to_owned(), pod)
    }
}

fn decide_on(c: &Config, ns: &str, pod: &Value, stage: Stage) -> Decision {
    decide_on_template(c, ns, &Template::from_value(pod).unwrap().unwrap(), stage)
}

fn decide_on_template(c: &Config, ns: &str, pod: &Template, stage: Stage) -> Decision {
    let req = Request {
        operation: Operation::Create,
        stage,
        object: Some(pod),
        old_object: None,
        namespace: ns,
        namespace_labels: None,
        dry_run: false,
        requester: None,
        placement_seed: "seed",
    };
    decide(c, &req)
}

// -------------------------------------------------------------------------------------------
// A model of the scheduler's filters, written apart from moat's code: node affinity, node
// selector, taints and tolerations, and required pod anti-affinity in both directions.

const TOPOLOGY_KEY: &str = "kubernetes.io/hostname";

struct Node {
    name: String,
    labels: BTreeMap<String, String>,
    taints: Vec<(String, String, String)>,
}

fn nodes(c: &Config) -> Vec<Node> {
    let n = &c.isolation.nodes;
    let mut out = Vec::new();
    for zone in ["a", "b"] {
        out.push(Node {
            name: format!("plain-{zone}"),
            labels: [
                ("zone".into(), zone.into()),
                (TOPOLOGY_KEY.into(), format!("plain-{zone}")),
            ]
            .into(),
            taints: vec![],
        });
        for class in CLASSES {
            let label = n.label_value.as_ref().map_or(*class, |v| v.as_str());
            let taint = n.taint_value.as_ref().map_or(*class, |v| v.as_str());
            let mut labels: BTreeMap<String, String> = [
                ("zone".into(), zone.into()),
                (n.label_key.to_string(), label.into()),
            ]
            .into();
            // Dedicated nodes carry their id; the model gives each pool node every id it could be
            // asked for by checking the class prefix in `selects`.
            labels.insert(
                c.isolation.dedicated_node_label.to_string(),
                format!("{class}-*"),
            );
            let taints = vec![(
                n.taint_key.to_string(),
                taint.into(),
                n.taint_effect.as_str().into(),
            )];
            // A kubelet may remove its own hostname label: the scheduler then ignores
            // anti-affinity on that node.
            out.push(Node {
                name: format!("{class}-{zone}-unlabelled"),
                labels: labels.clone(),
                taints: taints.clone(),
            });
            labels.insert(TOPOLOGY_KEY.into(), format!("{class}-{zone}"));
            out.push(Node {
                name: format!("{class}-{zone}"),
                labels,
                taints,
            });
        }
    }
    out
}

fn expr_matches(e: &Value, get: impl Fn(&str) -> Option<String>) -> bool {
    let got = get(e["key"].as_str().unwrap());
    let values: Vec<&str> = e["values"]
        .as_array()
        .map(|v| v.iter().map(|x| x.as_str().unwrap()).collect())
        .unwrap_or_default();
    match e["operator"].as_str().unwrap() {
        "In" => got.is_some_and(|g| values.contains(&g.as_str())),
        "NotIn" => got.is_none_or(|g| !values.contains(&g.as_str())),
        "Exists" => got.is_some(),
        "DoesNotExist" => got.is_none(),
        other => panic!("operator {other}"),
    }
}

fn label_of(node: &Node, key: &str, want: Option<&str>) -> Option<String> {
    let v = node.labels.get(key)?;
    // The dedicated-node label stands for every id of its class.
    match (v.strip_suffix('*'), want) {
        (Some(prefix), Some(w)) if w.starts_with(prefix) => Some(w.to_owned()),
        (Some(_), _) => Some(v.clone()),
        (None, _) => Some(v.clone()),
    }
}

fn selects(pod: &Value, node: &Node) -> bool {
    let spec = &pod["spec"];
    if let Some(sel) = spec["nodeSelector"].as_object()
        && !sel
            .iter()
            .all(|(k, v)| label_of(node, k, v.as_str()).as_deref() == v.as_str())
    {
        return false;
    }
    if let Some(terms) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"].as_array() {
        let any = terms.iter().any(|t| {
            let exprs = t["matchExpressions"].as_array().is_none_or(|es| es.iter().all(|e| expr_matches(e, |k| label_of(node, k, None))));
            let fields = t["matchFields"].as_array().is_none_or(|fs| {
                fs.iter().all(|f| expr_matches(f, |k| (k == "metadata.name").then(|| node.name.clone())))
            });
            exprs && fields
        });
        if !any {
            return false;
        }
    }
    node.taints.iter().all(|(key, value, effect)| {
        spec["tolerations"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| {
                let op = t["operator"].as_str().unwrap_or("Equal");
                let tkey = t["key"].as_str().unwrap_or("");
                let teffect = t["effect"].as_str().unwrap_or("");
                (teffect.is_empty() || teffect == effect)
                    && ((tkey.is_empty() && op == "Exists") || tkey == key)
                    && (op == "Exists" || t["value"].as_str().unwrap_or("") == value)
            })
    })
}

fn selector_matches(sel: &Value, labels: &Value) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str).map(str::to_owned);
    sel["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| get(k).as_deref() == v.as_str()))
        && sel["matchExpressions"]
            .as_array()
            .is_none_or(|es| es.iter().all(|e| expr_matches(e, get)))
}

/// Whether `a`'s required anti-affinity keeps `b` off a node shared by hostname.
fn repels(a: &Value, b: &Value) -> bool {
    a["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["topologyKey"] == TOPOLOGY_KEY)
        .any(|t| {
            // Without a namespaceSelector a term sees only its own namespace.
            let same_ns = a["metadata"]["namespace"] == b["metadata"]["namespace"];
            let ns_ok = t.get("namespaceSelector").is_some_and(|s| s == &json!({})) || same_ns;
            ns_ok && selector_matches(&t["labelSelector"], &b["metadata"]["labels"])
        })
}

fn class_of(pod: &Value, label: &str) -> Option<String> {
    pod["metadata"]["labels"][label].as_str().map(str::to_owned)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, max_global_rejects: 1_000_000, ..ProptestConfig::default() })]

    #[test]
    fn patch_applies_and_reinvocation_is_a_fixed_point(
        mode in prop::sample::select(&["class", "pod", "dedicatedNode"][..]),
        shared in any::<bool>(),
        (ns, pod) in pod(),
    ) {
        let c = config(mode, shared);
        let d = decide_on(&c, &ns, &pod, Stage::Mutate);
        let patched = d.patched(&pod).unwrap();
        if d.allowed() {
            let again = decide_on(&c, &ns, &patched, Stage::Mutate);
            prop_assert!(again.allowed(), "{}", again.message());
            prop_assert!(again.patch.0.is_empty(), "{:?}", again.patch);
            let validated = decide_on(&c, &ns, &patched, Stage::Validate);
            prop_assert!(validated.allowed(), "{}", validated.message());
        } else {
            prop_assert!(d.patch.0.is_empty());
            prop_assert_eq!(&patched, &pod);
        }
    }

    #[test]
    fn reading_from_bytes_gives_the_same_answer(
        mode in prop::sample::select(&["class", "pod", "dedicatedNode"][..]),
        (ns, mut pod) in pod(),
    ) {
        // Fields no policy reads, as the API server sends them.
        pod["metadata"]["managedFields"] = json!([{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]);
        pod["spec"]["volumes"] = json!([{"name": "v", "emptyDir": {}}]);
        pod["spec"]["containers"][0]["env"] = json!([{"name": "A", "value": "b"}]);
        pod["status"] = json!({"phase": "Pending"});
        let c = config(mode, false);
        let full = decide_on(&c, &ns, &pod, Stage::Mutate);
        let bytes = serde_json::to_vec(&pod).unwrap();
        let lean = decide_on_template(&c, &ns, &Template::from_json(&bytes).unwrap().unwrap(), Stage::Mutate);
        prop_assert_eq!(&full, &lean);
        let patched = lean.patched(&pod).unwrap();
        prop_assert_eq!(patched, full.patched(&pod).unwrap());
    }

    #[test]
    fn isolated_pods_never_share_a_node_with_other_classes_or_unisolated_pods(
        mode in prop::sample::select(&["class", "pod", "dedicatedNode"][..]),
        shared in any::<bool>(),
        (ns_a, a) in pod(),
        (ns_b, b) in pod(),
    ) {
        // In a shared pool, a dedicatedNode pod (no anti-affinity of its own) is kept apart by
        // the other pods' anti-affinity, which the scheduler applies both ways.
        let c = config(mode, shared);
        let label = c.isolation.pod_class_label.to_string();
        let da = decide_on(&c, &ns_a, &a, Stage::Mutate);
        let db = decide_on(&c, &ns_b, &b, Stage::Mutate);
        prop_assume!(da.allowed() && db.allowed());
        let (a, b) = (&da.patched(&a).unwrap(), &db.patched(&b).unwrap());
        let (ca, cb) = (class_of(a, &label), class_of(b, &label));
        prop_assume!(ca.is_some());
        let must_be_apart = match mode {
            "pod" => true,
            _ => ca != cb,
        };
        prop_assume!(must_be_apart);
        for node in nodes(&c) {
            // Required anti-affinity only counts on nodes that carry its topology label.
            let apart = node.labels.contains_key(TOPOLOGY_KEY) && (repels(a, b) || repels(b, a));
            let together = selects(a, &node) && selects(b, &node) && !apart;
            prop_assert!(!together, "{:?} and {:?} can share node {}", ca, cb, node.name);
        }
    }
}

/// Whether the invariant keeps `a` and `b` (placed by moat) off one node: pods of two classes,
/// an isolated and an unisolated pod, and any two pods of a pod-mode class. Two pods of one
/// dedicatedNode class are kept apart by their ids, which differ per pod (the request's uid);
/// this model names one node per class for every id of it, so it leaves them out.
fn must_be_apart(
    mode_of: impl Fn(&str) -> &'static str,
    label: &str,
    a: &Value,
    b: &Value,
) -> bool {
    let (ca, cb) = (class_of(a, label), class_of(b, label));
    match (&ca, &cb) {
        (Some(x), Some(y)) if x == y => mode_of(x) == "pod",
        (None, None) => false,
        _ => true,
    }
}

/// Asserts that no node of the model takes both pods at once.
fn assert_apart(c: &Config, a: &Value, b: &Value) -> Result<(), TestCaseError> {
    for node in nodes(c) {
        // Required anti-affinity only counts on nodes that carry its topology label.
        let apart = node.labels.contains_key(TOPOLOGY_KEY) && (repels(a, b) || repels(b, a));
        let together = selects(a, &node) && selects(b, &node) && !apart;
        prop_assert!(
            !together,
            "{:?} and {:?} can share node {}",
            a["metadata"]["labels"],
            b["metadata"]["labels"],
            node.name
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, max_global_rejects: 1_000_000, ..ProptestConfig::default() })]

    /// Classes of random modes in one cluster, per-class pools or one shared pool, nodes with
    /// and without the topology label: no two pods the invariant keeps apart fit one node.
    #[test]
    fn mixed_mode_classes_never_share_a_node(
        global in prop::sample::select(MODES),
        modes in prop::collection::vec(prop::option::of(prop::sample::select(MODES)), CLASSES.len()),
        shared in any::<bool>(),
        (ns_a, a) in pod(),
        (ns_b, b) in pod(),
    ) {
        let c = mixed_config(global, &modes, shared);
        let label = c.isolation.pod_class_label.to_string();
        let da = decide_on(&c, &ns_a, &a, Stage::Mutate);
        let db = decide_on(&c, &ns_b, &b, Stage::Mutate);
        prop_assume!(da.allowed() && db.allowed());
        let (a, b) = (&da.patched(&a).unwrap(), &db.patched(&b).unwrap());
        prop_assume!(must_be_apart(|class| mode_of(global, &modes, class), &label, a, b));
        assert_apart(&c, a, b)?;
        // moat's output passes its own validating stage in every mode.
        for (ns, p) in [(&ns_a, a), (&ns_b, b)] {
            let v = decide_on(&c, ns, p, Stage::Validate);
            prop_assert!(v.allowed(), "{}", v.message());
        }
    }
}

/// A tenant's tricks for escaping isolation: a DaemonSet owner reference, the operator's ignore
/// annotation, its own node selector, a dry run, and who asks.
#[derive(Debug, Clone)]
struct Tricks {
    owner: bool,
    ignore: bool,
    pinned: bool,
    dry_run: bool,
    by_daemonset_controller: bool,
}

fn tricks() -> impl Strategy<Value = Tricks> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(owner, ignore, pinned, dry_run, by_daemonset_controller)| Tricks {
                owner,
                ignore,
                pinned,
                dry_run,
                by_daemonset_controller,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { max_global_rejects: 100_000, ..ProptestConfig::default() })]

    #[test]
    fn no_tenant_trick_escapes_a_class_the_operator_forces(
        mode in prop::sample::select(&["class", "pod"][..]),
        (ns_a, mut a) in pod(),
        (ns_b, mut b) in pod(),
        ta in tricks(),
        tb in tricks(),
    ) {
        // team-a is bound to gold and team-b to silver by the operator's namespace label; every
        // exemption a tenant could trigger is switched on.
        let c = Config::from_yaml(&format!(
            "isolation: {{mode: {mode}, namespaceClassLabel: moat.dev/class, classes: [{{name: '*'}}]}}\n\
             exemptions: {{ignoreAnnotation: moat.dev/ignore, pinnedPods: true, dryRun: true}}"
        ))
        .unwrap();
        let ns_class = |ns: &str| if ns == "team-a" { "gold" } else { "silver" };
        let decide_with = |ns: &str, pod: &mut Value, t: &Tricks| {
            if t.owner {
                pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "uid": "u", "controller": true}]);
            }
            if t.ignore {
                pod["metadata"]["annotations"] = json!({"moat.dev/ignore": "true"});
            }
            if t.pinned {
                pod["spec"]["nodeSelector"] = json!({"zone": "a"});
            }
            let labels = BTreeMap::from([("moat.dev/class".to_owned(), ns_class(ns).to_owned())]);
            let template = Template::from_value(pod).unwrap().unwrap();
            let d = decide(&c, &Request {
                operation: Operation::Create,
                stage: Stage::Mutate,
                object: Some(&template),
                old_object: None,
                namespace: ns,
                namespace_labels: Some(&labels),
                dry_run: t.dry_run,
                requester: Some(Requester {
                    username: if t.by_daemonset_controller {
                        "system:serviceaccount:kube-system:daemon-set-controller"
                    } else {
                        "alice"
                    },
                }),
                placement_seed: "seed",
            });
            (d.patched(pod).unwrap(), d)
        };
        let (pa, da) = decide_with(&ns_a, &mut a, &ta);
        let (pb, db) = decide_with(&ns_b, &mut b, &tb);
        // A pod its DaemonSet's controller creates in a forced namespace is refused (pinned to
        // the class's nodes, it could never run on the node it was made for), never exempted
        // into running unisolated.
        for (t, d) in [(&ta, &da), (&tb, &db)] {
            if t.owner && t.by_daemonset_controller {
                prop_assert!(!d.allowed(), "{:?}", d.exemptions);
            }
        }
        prop_assume!(da.allowed() && db.allowed());
        prop_assert!(da.exemptions.is_empty() && db.exemptions.is_empty(), "{:?} {:?}", da.exemptions, db.exemptions);
        let label = "moat.dev/class";
        prop_assert_eq!(class_of(&pa, label), Some(ns_class(&ns_a).to_owned()));
        prop_assert_eq!(class_of(&pb, label), Some(ns_class(&ns_b).to_owned()));
        prop_assume!(mode == "pod" || ns_a != ns_b);
        for node in nodes(&c) {
            let apart = node.labels.contains_key(TOPOLOGY_KEY) && (repels(&pa, &pb) || repels(&pb, &pa));
            let together = selects(&pa, &node) && selects(&pb, &node) && !apart;
            prop_assert!(!together, "{} and {} can share node {}", ns_a, ns_b, node.name);
        }
    }
}
