//! `moat review --capacity`: how many nodes of which class the pods of a set of manifests need
//! in the mode of their class, and in each other mode, so an operator sees the cost of pod mode
//! before giving it to a class.
//!
//! Every object is decided as `moat review` decides it; a workload counts as its replicas
//! (`replicas`, a Job's `parallelism`), each decided as the pod its template makes. A pod is
//! isolated in class C when moat gives it C's toleration and class label. Node counts per class:
//! pod and dedicatedNode modes need one node per pod; class mode packs a class's pods onto
//! shared nodes, at least the sum of their requests over one node's allocatable (`--node-cpu`,
//! `--node-memory`) and at least one; warm nodes come on top.

use std::collections::BTreeMap;

use moat_core::config::{ClassMode, Config, IsolationMode};
use moat_core::decision::Request;
use moat_core::engine;
use moat_core::resources::Quantity;
use moat_core::subject::{Kind, Template, type_of};
use serde::Serialize;
use serde_json::{Value, json};

/// The label the API server gives every namespace, its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// One document of the input, as the caller read and parsed it.
#[derive(Debug)]
pub struct Document<'a> {
    /// The file it came from, as the caller names it in messages.
    pub file: &'a str,
    /// Its position in the file, from 1.
    pub number: usize,
    /// Its objects, or why it could not be parsed.
    pub objects: Result<Vec<Value>, String>,
}

/// One node's allocatable resources, for class mode's packing estimate.
#[derive(Debug, Clone, Default)]
pub struct NodeSize {
    pub cpu: Option<Quantity>,
    pub memory: Option<Quantity>,
}

/// The pods of one class and the nodes they need per mode.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClassCapacity {
    pub class: String,
    /// The class's placement mode (its own, else the global one).
    pub mode: ClassMode,
    pub pods: u64,
    /// Sum of the pods' CPU requests, in millicores.
    pub cpu_millis: u128,
    /// Sum of the pods' memory requests, in bytes.
    pub memory_bytes: u128,
    pub nodes: NodesPerMode,
    /// Nodes the class needs in its own mode: `nodes` of that mode (`None`: class mode with no
    /// node size given, at least one).
    pub needed: Option<u64>,
    /// Idle nodes kept for the class (`warmNodes`) on top.
    pub warm_nodes: u32,
}

impl ClassCapacity {
    /// A class with no pods counted yet.
    pub fn new(class: String, mode: ClassMode) -> Self {
        Self {
            class,
            mode,
            pods: 0,
            cpu_millis: 0,
            memory_bytes: 0,
            nodes: NodesPerMode::default(),
            needed: None,
            warm_nodes: 0,
        }
    }
}

/// Nodes one class needs in each mode.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodesPerMode {
    /// At least this many; exact only up to bin packing. `None` when no node size was given
    /// (then: at least one).
    pub class: Option<u64>,
    pub pod: u64,
    pub dedicated_node: u64,
}

/// The whole report.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CapacityReport {
    /// The configuration's global mode: `off`, or the mode of classes that declare none.
    pub mode: String,
    pub classes: Vec<ClassCapacity>,
    /// Pods moat admits without isolation (any node).
    pub unisolated_pods: u64,
    /// Objects moat would refuse (not counted).
    pub denied_objects: u64,
    /// DaemonSets: a pod on every node, exempt from isolation.
    pub daemon_sets: u64,
    /// Documents that could not be read.
    pub errors: u64,
}

/// Builds the report over `documents`, `namespaces` holding the labels of each namespace known
/// (from flags and from the input's Namespace objects) and `default_namespace` the namespace of
/// objects that name none. Returns the report and, in input order, one message per document
/// that could not be counted (`FILE: document N: why`).
pub fn report<'a>(
    config: &Config,
    documents: impl IntoIterator<Item = Document<'a>>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    default_namespace: &str,
    node: &NodeSize,
) -> (CapacityReport, Vec<String>) {
    let iso = &config.isolation;
    // With isolation off, count as class mode would: the classes are declared all the same.
    let mut deciding = config.clone();
    if iso.mode == IsolationMode::Off {
        deciding.isolation.mode = IsolationMode::Class;
    }
    let mut errors = Vec::new();
    let mut report = CapacityReport {
        mode: mode_name(iso.mode).to_owned(),
        ..CapacityReport::default()
    };
    let mut classes: BTreeMap<String, ClassCapacity> = BTreeMap::new();
    for Document {
        file,
        number,
        objects,
    } in documents
    {
        let objects = match objects {
            Ok(o) => o,
            Err(e) => {
                report.errors += 1;
                errors.push(format!("{file}: document {number}: {e}"));
                continue;
            }
        };
        for object in objects {
            let Some(kind) = type_of(&object) else {
                continue;
            };
            let namespace = metadata_str(&object, "namespace")
                .unwrap_or(default_namespace)
                .to_owned();
            let labels = namespaces.get(&namespace).map(|known| {
                let mut l = known.clone();
                l.insert(NAMESPACE_NAME_LABEL.to_owned(), namespace.clone());
                l
            });
            // A DaemonSet runs a pod on every node, exempt from isolation, unless moat refuses
            // it (in a namespace forced into a class its pods could never run).
            if kind == Kind::DaemonSet {
                if admitted(&deciding, &object, &namespace, labels.as_ref()) {
                    report.daemon_sets += 1;
                } else {
                    report.denied_objects += 1;
                }
                continue;
            }
            let Some(pod) = pod_of(&object, kind, &namespace) else {
                report.errors += 1;
                errors.push(format!("{file}: document {number}: no pod template"));
                continue;
            };
            let count = replicas(&object, kind);
            match placed(&deciding, &pod, &namespace, labels.as_ref()) {
                Placed::Denied => report.denied_objects += 1,
                Placed::Unisolated => report.unisolated_pods += count,
                Placed::Class(class, pod) => {
                    let c = classes.entry(class.clone()).or_insert_with(|| {
                        let mode = class_mode(&deciding, &class);
                        ClassCapacity::new(class, mode)
                    });
                    let (cpu, memory) = requests(&pod);
                    c.pods += count;
                    c.cpu_millis += cpu * u128::from(count);
                    // Memory quantities are bytes; `milli` is thousandths of a byte.
                    c.memory_bytes += memory.div_ceil(1000) * u128::from(count);
                }
            }
        }
    }
    let placing = &deciding.isolation;
    for c in classes.values_mut() {
        c.nodes = NodesPerMode {
            class: class_mode_nodes(c, node),
            pod: c.pods,
            dedicated_node: c.pods,
        };
        c.warm_nodes = c
            .class
            .parse()
            .ok()
            .and_then(|n| placing.class_spec(&n))
            .map_or(0, |s| s.warm_nodes);
        c.needed = match c.mode {
            ClassMode::Class => c.nodes.class,
            ClassMode::Pod => Some(c.nodes.pod),
            ClassMode::DedicatedNode => Some(c.nodes.dedicated_node),
        };
    }
    report.classes = classes.into_values().collect();
    (report, errors)
}

/// The placement mode of a class moat placed pods in (so declared, and isolation on for the
/// deciding configuration): its own, else the global one.
fn class_mode(config: &Config, class: &str) -> ClassMode {
    let iso = &config.isolation;
    class
        .parse()
        .ok()
        .and_then(|n| iso.class_spec(&n))
        .and_then(|s| iso.mode_of(s))
        // Unreachable for a class moat placed a pod in; class mode counts at least one node.
        .unwrap_or(ClassMode::Class)
}

fn mode_name(mode: IsolationMode) -> &'static str {
    match mode {
        IsolationMode::Off => "off",
        IsolationMode::Class => "class",
        IsolationMode::Pod => "pod",
        IsolationMode::DedicatedNode => "dedicatedNode",
    }
}

/// Class mode: the larger of the CPU and memory packing bounds, and at least one node.
fn class_mode_nodes(c: &ClassCapacity, node: &NodeSize) -> Option<u64> {
    if node.cpu.is_none() && node.memory.is_none() {
        return None;
    }
    let bound = |need: u128, size: Option<&Quantity>, unit: u128| {
        size.map_or(0, |s| need.div_ceil(s.milli().div_ceil(unit).max(1)))
    };
    let n = bound(c.cpu_millis, node.cpu.as_ref(), 1)
        .max(bound(c.memory_bytes, node.memory.as_ref(), 1000))
        .max(u128::from(c.pods > 0));
    Some(u64::try_from(n).unwrap_or(u64::MAX))
}

fn metadata_str<'v>(object: &'v Value, key: &str) -> Option<&'v str> {
    object.get("metadata")?.get(key)?.as_str()
}

/// The pod a workload's template makes (a Pod is itself).
fn pod_of(object: &Value, kind: Kind, namespace: &str) -> Option<Value> {
    if kind == Kind::Pod {
        return Some(object.clone());
    }
    let template = object.pointer(kind.template_pointer())?;
    let mut metadata = template
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    metadata["namespace"] = json!(namespace);
    if metadata.get("name").is_none() {
        metadata["name"] = json!(metadata_str(object, "name").unwrap_or_default());
    }
    Some(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": metadata,
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    }))
}

/// How many pods an object runs at once.
fn replicas(object: &Value, kind: Kind) -> u64 {
    let field = match kind {
        Kind::Pod => return 1,
        Kind::Job => "/spec/parallelism",
        Kind::CronJob => "/spec/jobTemplate/spec/parallelism",
        _ => "/spec/replicas",
    };
    object.pointer(field).and_then(Value::as_u64).unwrap_or(1)
}

/// Whether moat admits `object` itself (a workload, as its webhook decides the template).
fn admitted(
    config: &Config,
    object: &Value,
    namespace: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let Ok(Some(template)) = Template::from_value(object) else {
        return false;
    };
    let req = Request::offline_create(Some(&template), namespace, labels, namespace);
    engine::decide(config, &req).allowed()
}

enum Placed {
    Denied,
    Unisolated,
    Class(String, Value),
}

fn placed(
    config: &Config,
    pod: &Value,
    namespace: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> Placed {
    let Ok(Some(template)) = Template::from_value(pod) else {
        return Placed::Denied;
    };
    let req = Request::offline_create(Some(&template), namespace, labels, namespace);
    let decision = engine::decide(config, &req);
    if !decision.allowed() {
        return Placed::Denied;
    }
    let Ok(pod) = decision.patched(pod) else {
        return Placed::Denied;
    };
    let iso = &config.isolation;
    let tolerates = pod
        .pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .is_some_and(|ts| {
            ts.iter()
                .any(|t| t.get("key").and_then(Value::as_str) == Some(iso.nodes.taint_key.as_str()))
        });
    let class = pod
        .pointer("/metadata/labels")
        .and_then(|l| l.get(iso.pod_class_label.as_str()))
        .and_then(Value::as_str)
        .map(str::to_owned);
    match class {
        Some(class) if tolerates => Placed::Class(class, pod),
        _ => Placed::Unisolated,
    }
}

/// A pod's effective CPU (millicores) and memory (thousandths of a byte) requests: the sum over
/// its containers, or its largest init container if larger, as the scheduler counts them.
fn requests(pod: &Value) -> (u128, u128) {
    let of = |c: &Value, resource: &str| {
        c.pointer(&format!("/resources/requests/{resource}"))
            .and_then(|q| match q {
                Value::String(s) => s.parse::<Quantity>().ok(),
                Value::Number(n) => n.to_string().parse::<Quantity>().ok(),
                _ => None,
            })
            .map_or(0, |q| q.milli())
    };
    let list = |field: &str| {
        pod.pointer(&format!("/spec/{field}"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let (containers, inits) = (list("containers"), list("initContainers"));
    let total = |r: &str| {
        let sum: u128 = containers.iter().map(|c| of(c, r)).sum();
        let init = inits.iter().map(|c| of(c, r)).max().unwrap_or(0);
        sum.max(init)
    };
    (total("cpu"), total("memory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Option<Quantity> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn class_mode_packs_by_the_tighter_resource() {
        let c = ClassCapacity {
            pods: 5,
            cpu_millis: 5000,
            memory_bytes: 3 << 30,
            ..ClassCapacity::new("c".to_owned(), ClassMode::Class)
        };
        let node = |cpu: &str, memory: &str| NodeSize {
            cpu: q(cpu),
            memory: q(memory),
        };
        assert_eq!(class_mode_nodes(&c, &node("2", "16Gi")), Some(3));
        assert_eq!(class_mode_nodes(&c, &node("8", "1Gi")), Some(3));
        assert_eq!(class_mode_nodes(&c, &node("8", "16Gi")), Some(1));
        assert_eq!(class_mode_nodes(&c, &NodeSize::default()), None);
        let no_requests = ClassCapacity {
            pods: 2,
            ..ClassCapacity::new("c".to_owned(), ClassMode::Class)
        };
        assert_eq!(class_mode_nodes(&no_requests, &node("2", "2Gi")), Some(1));
    }

    #[test]
    fn effective_requests_count_init_containers_as_the_scheduler_does() {
        let pod = json!({"spec": {
            "containers": [
                {"resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}},
                {"resources": {"requests": {"cpu": 1}}},
            ],
            "initContainers": [{"resources": {"requests": {"cpu": "2", "memory": "32Mi"}}}],
        }});
        assert_eq!(requests(&pod), (2000, (64u128 << 20) * 1000));
    }

    #[test]
    fn workloads_count_their_replicas() {
        let deployment =
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"replicas": 3}});
        assert_eq!(replicas(&deployment, Kind::Deployment), 3);
        let job = json!({"apiVersion": "batch/v1", "kind": "Job", "spec": {}});
        assert_eq!(replicas(&job, Kind::Job), 1);
    }
}
