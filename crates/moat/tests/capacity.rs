//! `moat install --karpenter` and warm pools, per mode: NodePools round-trip through their
//! typed v1 structures and take exactly the pods of their class (as moat's engine places them,
//! by a model of Karpenter's documented rules); warm placeholders pass moat's own policies.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

mod support;

use std::path::PathBuf;
use std::process::Command;

use moat_core::config::Config;
use moat_core::decision::{Operation, Request, Stage};
use moat_core::engine::decide;
use moat_core::subject::Template;
use moat_objects::capacity::karpenter::NodePool;
use serde::Deserialize;
use serde_json::{Value, json};

const NODE_CLASS: &str = "example.dev/ExampleNodeClass/isolated";
/// A pause image pinned by digest; no registry is named (the operator's nodes choose theirs).
const PAUSE: &str = "pause@sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn config_file(name: &str, yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moat-capacity-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn install(config: &PathBuf, args: &[&str]) -> (i32, Vec<Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["install", "--cert-manager", "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let docs = serde_yaml_ng::Deserializer::from_str(&stdout)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect();
    (
        out.status.code().unwrap(),
        docs,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// `pod` as moat's mutating webhook leaves it in `namespace`.
fn admit(config: &Config, pod: &Value, namespace: &str, seed: &str) -> Value {
    let template = Template::from_value(pod).unwrap().unwrap();
    let req = Request::offline_create(Some(&template), namespace, None, seed);
    let d = decide(config, &req);
    assert!(d.allowed(), "{}", d.message());
    d.patched(pod).unwrap()
}

fn tenant_pod(class: Option<&str>, namespace: &str) -> Value {
    let labels = class.map_or_else(|| json!({}), |c| json!({"moat.dev/class": c}));
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "app:1.0"}]},
    })
}

/// Every layout of each mode: a pool per class, one shared pool, a pool per named class with
/// one for the rest.
const LAYOUTS: &[(&str, &str)] = &[
    ("per-class", ""),
    (
        "shared",
        "nodes: {labelValue: isolated, taintValue: isolated}",
    ),
    ("fixed-taint", "nodes: {taintValue: isolated}"),
];

/// The modes of the test: each for every class, and `mixed`: gold in pod mode, lead in
/// dedicatedNode mode, the rest (`*`) in the global class mode.
const MODES: &[&str] = &["class", "pod", "dedicatedNode", "mixed"];

fn mode_config(mode: &str, nodes: &str, wildcard: bool) -> String {
    let other = if wildcard {
        ", {name: '*', namespaces: [lab]}"
    } else {
        ""
    };
    let (global, gold, lead) = match mode {
        "mixed" => ("class", "mode: pod, ", "mode: dedicatedNode, "),
        _ => (mode, "", ""),
    };
    format!(
        "isolation:\n  mode: {global}\n  {nodes}\n  classes: [{{name: gold, {gold}namespaces: [bank], idleAfter: 10m, limits: {{cpu: 32}}}}, {{name: lead, {lead}namespaces: [shop]}}{other}]\n"
    )
}

/// The consolidation a pool should have: underused nodes only where every class it serves
/// shares nodes (class mode).
fn consolidation_of(mode: &str, pool: &str) -> &'static str {
    let shares = matches!((mode, pool), ("class", _) | ("mixed", "moat-other-classes"));
    if shares {
        "WhenEmptyOrUnderutilized"
    } else {
        "WhenEmpty"
    }
}

#[test]
fn karpenter_pools_launch_nodes_for_their_class_only() {
    for mode in MODES {
        for (layout, nodes) in LAYOUTS {
            // A '*' class needs a fixed taint: only those layouts may declare one.
            let wildcard = !nodes.is_empty();
            let yaml = mode_config(mode, nodes, wildcard);
            let config = Config::from_yaml(&yaml).unwrap();
            let path = config_file(&format!("{mode}-{layout}"), &yaml);
            let (code, docs, err) = install(&path, &["--karpenter", "--node-class", NODE_CLASS]);
            assert_eq!(code, 0, "{mode}/{layout}: {err}");
            let pools: Vec<NodePool> = of_kind(&docs, "NodePool")
                .into_iter()
                .map(|v| {
                    let pool: NodePool = serde_json::from_value(v.clone()).unwrap();
                    assert_eq!(&serde_json::to_value(&pool).unwrap(), v, "round trip");
                    pool
                })
                .collect();
            assert!(!pools.is_empty(), "{mode}/{layout}");
            for pool in &pools {
                let spec = &pool.spec;
                assert_eq!(pool.api_version, "karpenter.sh/v1");
                assert_eq!(spec.template.spec.node_class_ref.kind, "ExampleNodeClass");
                let disruption = spec.disruption.as_ref().unwrap();
                let name = pool.metadata.name.as_deref().unwrap();
                assert_eq!(
                    serde_json::to_value(disruption.consolidation_policy).unwrap(),
                    consolidation_of(mode, name),
                    "{mode}/{layout}: {name}"
                );
                if name == "moat-class-gold" {
                    assert_eq!(disruption.consolidate_after, "10m");
                    assert_eq!(spec.limits.as_ref().unwrap()["cpu"], "32");
                }
            }

            let mut classes = vec![("gold", "bank"), ("lead", "shop")];
            if wildcard {
                classes.push(("zinc", "lab"));
            }
            for (i, (class, ns)) in classes.iter().enumerate() {
                let pod = admit(
                    &config,
                    &tenant_pod(Some(class), ns),
                    ns,
                    &format!("uid-{i}"),
                );
                let launched: Vec<(&str, support::Node)> = pools
                    .iter()
                    .filter_map(|p| {
                        support::launch(p, &pod, "new-node")
                            .map(|n| (p.metadata.name.as_deref().unwrap(), n))
                    })
                    .collect();
                assert_eq!(
                    launched.len(),
                    1,
                    "{mode}/{layout}: exactly one pool for a {class} pod, got {:?}",
                    launched.iter().map(|l| l.0).collect::<Vec<_>>()
                );
                let (_, node) = &launched[0];
                assert!(support::node_fits(&pod, node), "{mode}/{layout}: {class}");
                // The node says which class it serves (or the shared value).
                let want = if layout == &"shared" {
                    "isolated"
                } else {
                    class
                };
                assert_eq!(
                    node.labels["node-restriction.kubernetes.io/moat-class"], want,
                    "{mode}/{layout}"
                );
                let dedicated = *mode == "dedicatedNode" || (*mode == "mixed" && *class == "lead");
                let id = pod["spec"]["nodeSelector"]["node-restriction.kubernetes.io/moat-node"]
                    .as_str();
                assert_eq!(id.is_some(), dedicated, "{mode}/{layout}: {class}");
                if let Some(id) = id {
                    assert_eq!(node.labels["node-restriction.kubernetes.io/moat-node"], id);
                }
                // No pool launches a node for a pod of another class with this pod's node.
                for (other, other_ns) in classes.iter().filter(|(c, _)| c != class) {
                    let other_pod = admit(
                        &config,
                        &tenant_pod(Some(other), other_ns),
                        other_ns,
                        "uid-x",
                    );
                    assert!(
                        !support::node_fits(&other_pod, node)
                            || !support::anti_affinity_allows(&other_pod, &[&pod]),
                        "{mode}/{layout}: a {other} pod may join a {class} pod's node"
                    );
                }
            }
            // Pods moat does not isolate get no isolated node.
            let plain = admit(&config, &tenant_pod(None, "shop"), "shop", "uid-p");
            assert!(
                pools
                    .iter()
                    .all(|p| support::launch(p, &plain, "n").is_none()),
                "{mode}/{layout}"
            );
        }
    }
}

#[test]
fn install_refuses_pools_it_cannot_make() {
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "isolation: {mode: pod, classes: [{name: '*', namespaces: ['*']}]}",
            &["--karpenter", "--node-class", NODE_CLASS],
            "class '*' covers class names not known in advance",
        ),
        (
            "isolation: {mode: pod, classes: [{name: a, namespaces: ['*']}]}",
            &["--karpenter"],
            "needs a node class",
        ),
        (
            "isolation: {mode: pod, classes: [{name: a, namespaces: ['*'], warmNodes: 1}]}",
            &[],
            "give --pause-image",
        ),
        (
            "isolation: {mode: pod, classes: [{name: a, namespaces: [x], warmNodes: 1}]}",
            &["--pause-image", PAUSE],
            "moat would refuse its warm placeholders in namespace 'moat-warm-a'",
        ),
        (
            "isolation: {mode: pod, classes: [{name: a, namespaces: ['*'], warmNodes: 1}]}\nexemptions: {namespaces: ['moat-*']}",
            &["--pause-image", PAUSE],
            "it would be exempt (namespace)",
        ),
    ];
    for (i, (yaml, args, want)) in cases.iter().enumerate() {
        let (code, docs, err) = install(&config_file(&format!("refused-{i}"), yaml), args);
        assert_eq!(code, 2, "{yaml}");
        assert!(docs.is_empty(), "nothing printed on error");
        assert!(err.contains(want), "{yaml}: {err}");
    }
    let (code, _, err) = install(
        &config_file("no-karpenter", "{}"),
        &["--node-class", NODE_CLASS],
    );
    assert_eq!(code, 2, "--node-class needs --karpenter");
    assert!(err.contains("--karpenter"), "{err}");
}

const WARM: &str = "runtimeClass: {reservedRuntimes: [runc], fallbackRuntime: gvisor}\nimages: {requireDigest: true}\nisolation:\n  mode: MODE\n  namespaceClassLabel: tenancy\n  classes: [{name: gold, namespaces: [bank], warmNodes: 3, warmRequests: {cpu: '3', memory: 12Gi}}, {name: lead, namespaces: [shop]}]\n";

/// The pod a workload template (or PodTemplate) makes in `namespace`.
fn pod_from(template: &Value, namespace: &str) -> Value {
    let mut metadata = template["metadata"].clone();
    metadata["name"] = json!("placeholder-x");
    metadata["namespace"] = json!(namespace);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
}

/// Decides `object` in the warm namespace as the API server would send it.
fn decide_in(
    config: &Config,
    object: &Value,
    namespace: &Value,
    stage: Stage,
) -> moat_core::decision::Decision {
    let name = namespace["metadata"]["name"].as_str().unwrap();
    let mut labels: std::collections::BTreeMap<String, String> =
        serde_json::from_value(namespace["metadata"]["labels"].clone()).unwrap();
    labels.insert("kubernetes.io/metadata.name".to_owned(), name.to_owned());
    let template = Template::from_value(object).unwrap().unwrap();
    let req = Request {
        operation: Operation::Create,
        stage,
        object: Some(&template),
        old_object: None,
        namespace: name,
        namespace_labels: Some(&labels),
        dry_run: false,
        requester: None,
        placement_seed: "uid-warm",
    };
    decide(config, &req)
}

#[test]
fn warm_placeholders_pass_moats_own_policies() {
    for mode in ["class", "pod"] {
        let yaml = WARM.replace("MODE", mode);
        let config = Config::from_yaml(&yaml).unwrap();
        let path = config_file(&format!("warm-{mode}"), &yaml);

        let (code, buffer_docs, err) = install(&path, &["--pause-image", PAUSE]);
        assert_eq!(code, 0, "{err}");
        let namespace = of_kind(&buffer_docs, "Namespace")
            .into_iter()
            .find(|n| n["metadata"]["name"] == "moat-warm-gold")
            .unwrap()
            .clone();
        assert_eq!(
            namespace["metadata"]["labels"]["tenancy"], "gold",
            "the operator's class label binds the warm namespace"
        );
        let buffers = of_kind(&buffer_docs, "CapacityBuffer");
        assert_eq!(buffers.len(), 1, "only classes with warmNodes");
        let buffer: moat_objects::capacity::buffer::CapacityBuffer =
            serde_json::from_value(buffers[0].clone()).unwrap();
        assert_eq!(buffer.api_version, "autoscaling.x-k8s.io/v1beta1");
        assert_eq!(buffer.spec.replicas, Some(3));
        let template_name = &buffer.spec.pod_template_ref.as_ref().unwrap().name;
        let pod_template = of_kind(&buffer_docs, "PodTemplate")[0];
        assert_eq!(&pod_template["metadata"]["name"], template_name);
        assert_eq!(
            pod_template["metadata"]["namespace"],
            buffers[0]["metadata"]["namespace"]
        );

        let (code, classic_docs, err) = install(
            &path,
            &["--pause-image", PAUSE, "--warm-form", "placeholders"],
        );
        assert_eq!(code, 0, "{err}");
        assert!(of_kind(&classic_docs, "CapacityBuffer").is_empty());
        let priority = of_kind(&classic_docs, "PriorityClass")[0];
        let value = priority["value"].as_i64().unwrap();
        assert!(
            (-10..0).contains(&value),
            "below real pods, not expendable to the Cluster Autoscaler: {value}"
        );
        assert_eq!(priority["preemptionPolicy"], "Never");
        let deployment = of_kind(&classic_docs, "Deployment")
            .into_iter()
            .find(|d| d["metadata"]["namespace"] == "moat-warm-gold")
            .unwrap();
        assert_eq!(deployment["spec"]["replicas"], 3);
        assert_eq!(
            deployment["spec"]["template"]["spec"]["priorityClassName"],
            priority["metadata"]["name"]
        );

        // The validating webhook admits the Deployment; the pods it and the buffer make are
        // admitted unchanged by the mutating webhook and pass the validating one.
        let d = decide_in(&config, deployment, &namespace, Stage::Validate);
        assert!(d.allowed(), "{mode}: {}", d.message());
        for template in [&deployment["spec"]["template"], &pod_template["template"]] {
            let pod = pod_from(template, "moat-warm-gold");
            let mutate = decide_in(&config, &pod, &namespace, Stage::Mutate);
            assert!(mutate.allowed(), "{mode}: {}", mutate.message());
            assert!(
                mutate.patch.0.is_empty(),
                "{mode}: moat would still change its own placeholder: {:?}",
                mutate.changes
            );
            let validate = decide_in(&config, &pod, &namespace, Stage::Validate);
            assert!(validate.allowed(), "{mode}: {}", validate.message());
            // Placed as a gold pod: gold's toleration, and gold nodes only.
            assert!(support::tolerates(
                &pod,
                "moat.dev/isolated",
                "gold",
                "NoSchedule"
            ));
            let gold = support::Node {
                labels: [
                    ("node-restriction.kubernetes.io/moat-class", "gold"),
                    (support::HOSTNAME, "n"),
                ]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
                taints: vec![(
                    "moat.dev/isolated".to_owned(),
                    "gold".to_owned(),
                    "NoSchedule".to_owned(),
                )],
            };
            let mut lead = gold.clone();
            lead.labels.insert(
                "node-restriction.kubernetes.io/moat-class".to_owned(),
                "lead".to_owned(),
            );
            lead.taints[0].1 = "lead".to_owned();
            assert!(support::node_fits(&pod, &gold) && !support::node_fits(&pod, &lead));
            assert_eq!(pod["spec"]["runtimeClassName"], "gvisor");
        }
        // Both forms keep the same placeholder, but for its priority.
        let mut classic = deployment["spec"]["template"].clone();
        classic["spec"]
            .as_object_mut()
            .unwrap()
            .remove("priorityClassName");
        assert_eq!(classic, pod_template["template"]);
    }
}

#[test]
fn capacity_buffer_version_is_the_operators_choice() {
    let path = config_file("buffer-version", &WARM.replace("MODE", "pod"));
    let (code, docs, err) = install(
        &path,
        &[
            "--pause-image",
            PAUSE,
            "--capacity-buffer-version",
            "v1alpha1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        of_kind(&docs, "CapacityBuffer")[0]["apiVersion"],
        "autoscaling.x-k8s.io/v1alpha1"
    );
}

#[test]
fn review_capacity_counts_nodes_per_class_and_mode() {
    // gold in pod mode of its own, lead in the global class mode.
    let config = config_file(
        "report",
        "isolation: {mode: class, classes: [{name: gold, mode: pod, namespaces: [bank], warmNodes: 1}, {name: lead, namespaces: [shop]}]}",
    );
    let manifests = config_file(
        "report-manifests",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api, namespace: bank}\nspec:\n  replicas: 3\n  template:\n    metadata: {labels: {moat.dev/class: gold}}\n    spec: {containers: [{name: a, image: 'app:1', resources: {requests: {cpu: 1500m, memory: 1Gi}}}]}\n---\napiVersion: batch/v1\nkind: Job\nmetadata: {name: j, namespace: shop}\nspec:\n  parallelism: 2\n  template:\n    metadata: {labels: {moat.dev/class: lead}}\n    spec: {containers: [{name: a, image: 'app:1'}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: plain, namespace: shop}\nspec: {containers: [{name: a, image: 'app:1'}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: shop}\nspec: {containers: [{name: a, image: app}]}\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([
            "review",
            "--capacity",
            "--node-cpu",
            "2",
            "-o",
            "json",
            "--config",
        ])
        .arg(&config)
        .arg(&manifests)
        .output()
        .unwrap();
    // As `moat review`: 1 when any object is denied (here the untagged image).
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "class");
    let gold = &report["classes"][0];
    assert_eq!(gold["class"], "gold");
    assert_eq!(gold["pods"], 3);
    assert_eq!(gold["cpuMillis"], 4500);
    assert_eq!(
        gold["nodes"],
        json!({"class": 3, "pod": 3, "dedicatedNode": 3})
    );
    assert_eq!(gold["warmNodes"], 1);
    assert_eq!(gold["mode"], "pod");
    assert_eq!(gold["needed"], 3, "a node per pod");
    let lead = &report["classes"][1];
    assert_eq!(lead["pods"], 2);
    assert_eq!(lead["nodes"]["class"], 1, "no requests: at least one node");
    assert_eq!(lead["mode"], "class");
    assert_eq!(lead["needed"], 1);
    assert_eq!(report["unisolatedPods"], 1);
    assert_eq!(report["deniedObjects"], 1, "the untagged image");

    let text = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["review", "--capacity", "--config"])
        .arg(&config)
        .arg(&manifests)
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("CLASS  MODE   NODES  PODS"), "{text}");
    assert!(
        text.contains("classes without a mode of their own: class mode"),
        "{text}"
    );
    let row = |class: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{class} ")))
            .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>())
    };
    assert_eq!(row("gold"), Some(vec!["gold", "pod", "3", "3"]), "{text}");
    assert_eq!(
        row("lead"),
        Some(vec!["lead", "class", "≥1", "2"]),
        "{text}"
    );
    assert!(
        text.contains("5 isolated pods need ≥4 nodes in their classes' modes, and 1 warm"),
        "{text}"
    );
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// The README's mixed-mode walk-through: review, capacity report and Karpenter pools from
/// `examples/mixed-modes.yaml`.
#[test]
fn the_mixed_modes_example_works_end_to_end() {
    let config = repo("examples/mixed-modes.yaml");
    let workloads = repo("examples/mixed-modes-workloads.yaml");
    let moat = || Command::new(env!("CARGO_BIN_EXE_moat"));

    let check = moat()
        .args(["config", "check"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        check.stderr.is_empty(),
        "no warnings: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Every workload is admitted in its class's mode; the DaemonSet is refused with a reason.
    let review = moat()
        .args(["review", "-o", "json", "--config"])
        .arg(&config)
        .arg(&workloads)
        .output()
        .unwrap();
    assert_eq!(review.status.code(), Some(1));
    let text = String::from_utf8(review.stdout).unwrap();
    for want in [
        "keep every other isolated pod off this pod's node (class 'ci' is in pod mode)",
        "keep pods of every class but 'payments' off this pod's node (class mode)",
        "keep pods of every class but 'search' off this pod's node (class mode)",
        "(class 'batch' is in dedicatedNode mode)",
        "namespace 'ci-runners' runs every pod in isolation class 'ci' (pod mode), so a DaemonSet's pods could never run there",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }

    let report = moat()
        .args([
            "review",
            "--capacity",
            "--node-cpu",
            "4",
            "--node-memory",
            "16Gi",
            "-o",
            "json",
            "--config",
        ])
        .arg(&config)
        .arg(&workloads)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    let rows: Vec<(String, String, Value, u64)> = report["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["class"].as_str().unwrap().to_owned(),
                c["mode"].as_str().unwrap().to_owned(),
                c["needed"].clone(),
                c["warmNodes"].as_u64().unwrap(),
            )
        })
        .collect();
    let row = |class: &str, mode: &str, needed: u64, warm: u64| {
        (class.to_owned(), mode.to_owned(), json!(needed), warm)
    };
    assert_eq!(
        rows,
        vec![
            row("batch", "dedicatedNode", 2, 0),
            row("ci", "pod", 4, 2),
            row("payments", "class", 2, 0),
            row("search", "class", 1, 0),
        ]
    );
    assert_eq!(report["deniedObjects"], 1, "the DaemonSet");

    let (code, docs, err) = install(
        &config,
        &[
            "--karpenter",
            "--node-class",
            NODE_CLASS,
            "--pause-image",
            PAUSE,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let pools: Vec<(String, Value, bool)> = of_kind(&docs, "NodePool")
        .into_iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                p["spec"]["disruption"]["consolidationPolicy"].clone(),
                p["spec"]["template"]["spec"]["requirements"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["key"] == "node-restriction.kubernetes.io/moat-node"),
            )
        })
        .collect();
    let pool = |name: &str, policy: &str, id: bool| (name.to_owned(), json!(policy), id);
    assert_eq!(
        pools,
        vec![
            pool("moat-class-ci", "WhenEmpty", false),
            pool("moat-class-payments", "WhenEmptyOrUnderutilized", false),
            pool("moat-class-search", "WhenEmptyOrUnderutilized", false),
            pool("moat-class-batch", "WhenEmpty", true),
        ]
    );
    let buffers = of_kind(&docs, "CapacityBuffer");
    assert_eq!(buffers.len(), 1, "warm nodes for ci only");
    assert_eq!(buffers[0]["spec"]["replicas"], 2);
}
