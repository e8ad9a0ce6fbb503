//! Capacity for isolated pods: what an existing autoscaler needs so that nodes of each class
//! appear when its pods arrive and go away when idle. moat talks to no cloud; it prints
//! objects (`moat install --karpenter`, warm pools) and a report (`moat review --capacity`).
//!
//! The node pools follow from the placement the policy core writes
//! (`moat_core::policy::isolation`), so a pool's nodes are exactly the nodes a class's pods
//! may use:
//! - every isolated pod requires `nodes.labelKey` = its class (or the fixed `labelValue`) and
//!   tolerates `nodes.taintKey` = its class (or the fixed `taintValue`); a pool carries that
//!   label (or lets the pod choose its value, `Exists`) and that taint;
//! - class and pod modes also require `nodes.topologyKey` to exist and keep classes (or pods)
//!   apart by anti-affinity on it: with Karpenter that is `kubernetes.io/hostname`, which
//!   Karpenter gives every new node a value of its own for;
//! - dedicatedNode mode pins each pod to `dedicatedNodeLabel` = its id: the pool lets each pod
//!   choose the value (`Exists`), so each id gets a node of its own.
//!
//! The mode is each class's own (`classes[].mode`), so each pool follows the modes of the
//! classes it serves: the id requirement where one is in dedicatedNode mode, and consolidation
//! of underused nodes only where every class shares nodes (class mode): moving a pod of a node
//! of its own (pod, dedicatedNode) to a cheaper node saves nothing and restarts it.
//!
//! See `docs/capacity.md`.

pub mod buffer;
pub mod karpenter;
pub mod report;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PodTemplate, Taint};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use moat_core::config::{ClassMode, ClassPattern, ClassSpec, Config};
use moat_core::decision::{Operation, Request, Stage};
use moat_core::engine;
use moat_core::image::ImageRef;
use moat_core::names::ClassName;
use moat_core::resources::IdleAfter;
use moat_core::subject::Template;
use serde_json::{Value, json};

use self::karpenter::{
    ConsolidationPolicy, Disruption, NodeClaimTemplate, NodeClaimTemplateSpec, NodeClassReference,
    NodePool, NodePoolSpec, NodeSelectorRequirementWithMinValues, TemplateMetadata,
};

/// The label every node has a value of its own for, set by the kubelet; Karpenter models each
/// node it is about to launch as a hostname of its own, so anti-affinity on it gives new nodes.
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// Name prefix of a class's own pool.
const CLASS_POOL_PREFIX: &str = "moat-class-";
/// The one pool of every class when label and taint are fixed.
const SHARED_POOL: &str = "moat-shared";
/// The pool of the class names `*` covers.
const OTHER_CLASSES_POOL: &str = "moat-other-classes";
/// Namespace prefix of a class's warm placeholders.
pub const WARM_NAMESPACE_PREFIX: &str = "moat-warm-";
/// The PriorityClass of classic placeholders.
pub const WARM_PRIORITY_CLASS: &str = "moat-warm";
/// Its value: below every real pod (0 by default), so the scheduler preempts placeholders for
/// them, and not below the Cluster Autoscaler's default expendable cutoff (-10), under which it
/// would not add nodes for placeholders at all.
pub const WARM_PRIORITY: i32 = -1;
/// Requests of a placeholder whose class sets no `warmRequests`: enough to be counted, small
/// enough to fit any node. In pod mode anti-affinity alone gives each placeholder a node.
const DEFAULT_WARM_REQUESTS: [(&str, &str); 2] = [("cpu", "10m"), ("memory", "16Mi")];
/// An unprivileged uid/gid for the pause container.
const PAUSE_USER: i64 = 65535;

/// Why the capacity objects cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CapacityError {
    /// A pool has no node class to launch from.
    #[error(
        "NodePool '{pool}' needs a node class: give --node-class GROUP/KIND/NAME (or {class}=GROUP/KIND/NAME for this class); moat never guesses cloud settings"
    )]
    NoNodeClass { pool: String, class: String },
    /// `--node-class` does not parse.
    #[error(
        "--node-class '{0}': expected [CLASS=]GROUP/KIND/NAME, e.g. karpenter.k8s.aws/EC2NodeClass/isolated"
    )]
    NodeClassForm(String),
    /// `--node-class` names a class with no pool of its own.
    #[error("--node-class names class '{0}', which has no NodePool of its own")]
    NodeClassUnused(String),
    /// `*` covers class names whose taint value is not known in advance.
    #[error(
        "class '*' covers class names not known in advance, and each class's taint value is its name, which a NodePool cannot leave open: set isolation.nodes.taintValue (one fixed taint), or declare each class by name"
    )]
    WildcardNeedsFixedTaint,
    /// Classes that share one pool disagree on a pool-wide setting.
    #[error(
        "classes share NodePool '{pool}' (isolation.nodes.labelValue and taintValue are fixed) but set different '{field}'; give them the same value"
    )]
    SharedPoolDisagrees { pool: String, field: &'static str },
    /// A label Karpenter will not set.
    #[error(
        "'{key}' ({field}) is in a label domain Karpenter refuses (kubernetes.io, k8s.io, karpenter.sh); use a key under node-restriction.kubernetes.io/"
    )]
    RestrictedLabel { key: String, field: &'static str },
    /// A topology key Karpenter gives no per-node value.
    #[error(
        "isolation.nodes.topologyKey '{0}': Karpenter gives each new node its own kubernetes.io/hostname, but no value per node of another label, so moat's anti-affinity could not tell its new nodes apart; use kubernetes.io/hostname with Karpenter"
    )]
    TopologyKey(String),
    /// Warm capacity without an image to run.
    #[error(
        "class '{0}' sets warmNodes: give --pause-image, a pause image pinned by digest (REPOSITORY@sha256:…) from a registry your nodes can pull from"
    )]
    NoPauseImage(String),
    /// The pause image is not pinned.
    #[error("--pause-image '{0}': {1}")]
    PauseImage(String, String),
    /// moat itself would refuse a placeholder.
    #[error(
        "class '{class}': moat would refuse its warm placeholders in namespace '{namespace}' ({message}); allow that namespace to use the class (add it to the class's namespaces)"
    )]
    PlaceholderDenied {
        class: String,
        namespace: String,
        message: String,
    },
    /// An object does not convert to its Kubernetes type.
    #[error("{0}")]
    Object(String),
}

/// How warm capacity is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmForm {
    /// A PodTemplate and a CapacityBuffer per class: the autoscaler simulates the placeholders
    /// (Cluster Autoscaler, Karpenter with CapacityBuffer support). Nothing runs on warm nodes.
    CapacityBuffer,
    /// A Deployment of placeholder pods per class with a negative-priority PriorityClass: real
    /// pods preempt them, and the autoscaler adds a node for each displaced one. For
    /// autoscalers without CapacityBuffer.
    Placeholders,
}

/// What capacity objects `moat install` prints (its `--karpenter`, `--node-class`,
/// `--warm-form`, `--capacity-buffer-version` and `--pause-image`).
#[derive(Debug, Clone)]
pub struct CapacityOptions {
    /// Also Karpenter v1 NodePools for the isolated nodes of each class.
    pub karpenter: bool,
    /// The Karpenter node class the pools launch from, as GROUP/KIND/NAME; CLASS=GROUP/KIND/NAME
    /// for one class's own pool.
    pub node_classes: Vec<String>,
    /// How warm capacity (classes with warmNodes) is kept.
    pub warm_form: WarmForm,
    /// The CapacityBuffer API version the autoscaler serves.
    pub capacity_buffer_version: buffer::Version,
    /// The image warm placeholders run, pinned by digest (needed when a class sets warmNodes).
    pub pause_image: Option<String>,
}

impl Default for CapacityOptions {
    fn default() -> Self {
        Self {
            karpenter: false,
            node_classes: Vec::new(),
            warm_form: WarmForm::CapacityBuffer,
            capacity_buffer_version: buffer::Version::V1beta1,
            pause_image: None,
        }
    }
}

/// Which classes' pods a pool's nodes take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolClasses {
    /// Exactly these classes.
    Named(Vec<ClassName>),
    /// Every class name but these (the `*` entry).
    AllBut(Vec<ClassName>),
}

impl PoolClasses {
    /// Whether pods of `class` may get nodes from this pool.
    pub fn covers(&self, class: &ClassName) -> bool {
        match self {
            Self::Named(names) => names.contains(class),
            Self::AllBut(names) => !names.contains(class),
        }
    }
}

/// One node pool, independent of the autoscaler: what its nodes carry and when they go.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub classes: PoolClasses,
    /// The class whose own pool this is (for `--node-class CLASS=`).
    pub own_class: Option<ClassName>,
    /// Labels every node of the pool carries.
    pub labels: BTreeMap<String, String>,
    /// Requirements whose value each pod chooses (`Exists`, `NotIn`).
    pub requirements: Vec<NodeSelectorRequirementWithMinValues>,
    /// The taint every node of the pool carries.
    pub taint: Taint,
    pub idle_after: IdleAfter,
    pub limits: BTreeMap<String, String>,
    /// Which nodes the autoscaler may remove: empty ones only, or also underused ones whose
    /// pods fit elsewhere (only where every class of the pool is in class mode).
    pub consolidation: ConsolidationPolicy,
}

/// The consolidation right for pools serving classes of `modes`: class mode packs a class's
/// pods, so an underused node's pods may move to its other nodes; a node per pod (pod and
/// dedicatedNode modes) is never underused in a way moving its one pod would fix.
fn consolidation(modes: &[ClassMode]) -> ConsolidationPolicy {
    if modes.iter().all(|m| *m == ClassMode::Class) {
        ConsolidationPolicy::WhenEmptyOrUnderutilized
    } else {
        ConsolidationPolicy::WhenEmpty
    }
}

/// The pools the configuration's placement needs, one per class where label or taint names
/// the class, one shared where both are fixed (classes kept apart by anti-affinity), and one for
/// the names `*` covers where only the taint is fixed. Empty when isolation is off.
///
/// # Errors
/// A layout no autoscaler pool can express ([`CapacityError::WildcardNeedsFixedTaint`],
/// [`CapacityError::SharedPoolDisagrees`]).
pub fn pools(config: &Config) -> Result<Vec<Pool>, CapacityError> {
    let iso = &config.isolation;
    if !iso.is_on() {
        return Ok(Vec::new());
    }
    let nodes = &iso.nodes;
    let label_key = nodes.label_key.to_string();
    let named: Vec<(&ClassSpec, &ClassName)> = iso
        .classes
        .iter()
        .filter_map(|c| match &c.name {
            ClassPattern::Name(n) => Some((c, n)),
            ClassPattern::Any => None,
        })
        .collect();
    let any = iso.classes.iter().find(|c| c.name == ClassPattern::Any);
    let mode = |spec: &ClassSpec| iso.mode_of(spec).unwrap_or(ClassMode::Class);
    // Requirements whose value each pod chooses, for pools serving classes of these modes.
    let chosen = |modes: &[ClassMode]| {
        if modes.contains(&ClassMode::DedicatedNode) {
            vec![requirement(
                iso.dedicated_node_label.as_str(),
                "Exists",
                None,
            )]
        } else {
            Vec::new()
        }
    };
    let taint = |value: &str| Taint {
        key: nodes.taint_key.to_string(),
        value: Some(value.to_owned()),
        effect: nodes.taint_effect.as_str().to_owned(),
        time_added: None,
    };
    let class_pool = |spec: &ClassSpec, class: &ClassName| Pool {
        name: format!("{CLASS_POOL_PREFIX}{class}"),
        classes: PoolClasses::Named(vec![class.clone()]),
        own_class: Some(class.clone()),
        labels: BTreeMap::from([(
            label_key.clone(),
            nodes
                .label_value
                .as_ref()
                .map_or_else(|| class.to_string(), ToString::to_string),
        )]),
        requirements: chosen(&[mode(spec)]),
        taint: taint(
            nodes
                .taint_value
                .as_ref()
                .map_or(class.as_str(), |v| v.as_str()),
        ),
        idle_after: spec.idle_after(),
        limits: limits(spec),
        consolidation: consolidation(&[mode(spec)]),
    };
    let mut out: Vec<Pool> = Vec::new();
    match (&nodes.label_value, &nodes.taint_value) {
        (Some(label), Some(taint_value)) => {
            let specs: Vec<&ClassSpec> = iso.classes.iter().collect();
            let (idle_after, limits) = agreed(SHARED_POOL, &specs)?;
            let modes: Vec<ClassMode> = specs.iter().map(|s| mode(s)).collect();
            let classes = if any.is_some() {
                PoolClasses::AllBut(Vec::new())
            } else {
                PoolClasses::Named(named.iter().map(|(_, n)| (*n).clone()).collect())
            };
            out.push(Pool {
                name: SHARED_POOL.to_owned(),
                classes,
                own_class: None,
                labels: BTreeMap::from([(label_key.clone(), label.to_string())]),
                requirements: chosen(&modes),
                taint: taint(taint_value.as_str()),
                idle_after,
                limits,
                consolidation: consolidation(&modes),
            });
        }
        (None, Some(taint_value)) => {
            out.extend(named.iter().map(|(spec, class)| class_pool(spec, class)));
            if let Some(spec) = any {
                let taken: Vec<ClassName> = named.iter().map(|(_, n)| (*n).clone()).collect();
                // Each pod asks for its class by node affinity; the pool lets it choose any value
                // but the named classes', which have pools (and limits) of their own.
                let class_requirement = if taken.is_empty() {
                    requirement(&label_key, "Exists", None)
                } else {
                    requirement(
                        &label_key,
                        "NotIn",
                        Some(taken.iter().map(ToString::to_string).collect()),
                    )
                };
                let mut requirements = vec![class_requirement];
                requirements.extend(chosen(&[mode(spec)]));
                out.push(Pool {
                    name: OTHER_CLASSES_POOL.to_owned(),
                    classes: PoolClasses::AllBut(taken),
                    own_class: None,
                    labels: BTreeMap::new(),
                    requirements,
                    taint: taint(taint_value.as_str()),
                    idle_after: spec.idle_after(),
                    limits: limits(spec),
                    consolidation: consolidation(&[mode(spec)]),
                });
            }
        }
        (_, None) => {
            if any.is_some() {
                return Err(CapacityError::WildcardNeedsFixedTaint);
            }
            out.extend(named.iter().map(|(spec, class)| class_pool(spec, class)));
        }
    }
    Ok(out)
}

fn requirement(
    key: &str,
    operator: &str,
    values: Option<Vec<String>>,
) -> NodeSelectorRequirementWithMinValues {
    NodeSelectorRequirementWithMinValues {
        key: key.to_owned(),
        operator: operator.to_owned(),
        values,
        min_values: None,
    }
}

fn limits(spec: &ClassSpec) -> BTreeMap<String, String> {
    spec.limits
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The one idle time and limits of classes sharing a pool: those that set them must agree.
fn agreed(
    pool: &str,
    specs: &[&ClassSpec],
) -> Result<(IdleAfter, BTreeMap<String, String>), CapacityError> {
    let disagree = |field| CapacityError::SharedPoolDisagrees {
        pool: pool.to_owned(),
        field,
    };
    let mut idle = None;
    for s in specs.iter().filter_map(|s| s.idle_after) {
        if idle.replace(s).is_some_and(|i| i != s) {
            return Err(disagree("idleAfter"));
        }
    }
    let mut lims: Option<BTreeMap<String, String>> = None;
    for s in specs.iter().filter(|s| !s.limits.is_empty()) {
        let l = limits(s);
        if lims.replace(l.clone()).is_some_and(|prev| prev != l) {
            return Err(disagree("limits"));
        }
    }
    let idle = idle.unwrap_or(moat_core::config::DEFAULT_IDLE_AFTER);
    Ok((idle, lims.unwrap_or_default()))
}

/// A `--node-class` value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeClassArg {
    class: Option<String>,
    reference: NodeClassReference,
}

fn parse_node_class(s: &str) -> Result<NodeClassArg, CapacityError> {
    let err = || CapacityError::NodeClassForm(s.to_owned());
    let (class, rest) = match s.split_once('=') {
        Some((c, r)) => (
            Some(c.parse::<ClassName>().map_err(|_| err())?.to_string()),
            r,
        ),
        None => (None, s),
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let [group, kind, name] = parts[..] else {
        return Err(err());
    };
    if group.is_empty() || kind.is_empty() || name.is_empty() {
        return Err(err());
    }
    Ok(NodeClassArg {
        class,
        reference: NodeClassReference {
            group: group.to_owned(),
            kind: kind.to_owned(),
            name: name.to_owned(),
        },
    })
}

/// Karpenter v1 NodePools for the configuration's pools.
///
/// # Errors
/// A pool without a node class, a class-specific `--node-class` for a class with no pool of its
/// own, labels or a topology key Karpenter cannot serve, or a layout of [`pools`].
pub fn node_pools(
    config: &Config,
    node_classes: &[String],
) -> Result<Vec<NodePool>, CapacityError> {
    let iso = &config.isolation;
    for (key, field) in [
        (&iso.nodes.label_key, "isolation.nodes.labelKey"),
        (&iso.dedicated_node_label, "isolation.dedicatedNodeLabel"),
    ] {
        if !karpenter::allows_label(key.as_str()) {
            return Err(CapacityError::RestrictedLabel {
                key: key.to_string(),
                field,
            });
        }
    }
    if (iso.uses(ClassMode::Class) || iso.uses(ClassMode::Pod))
        && iso.nodes.topology_key.as_str() != HOSTNAME_LABEL
    {
        return Err(CapacityError::TopologyKey(
            iso.nodes.topology_key.to_string(),
        ));
    }
    let args = node_classes
        .iter()
        .map(|s| parse_node_class(s))
        .collect::<Result<Vec<_>, _>>()?;
    let default = args.iter().rev().find(|a| a.class.is_none());
    let pools = pools(config)?;
    for a in &args {
        if let Some(c) = &a.class
            && !pools
                .iter()
                .any(|p| p.own_class.as_ref().is_some_and(|o| o.as_str() == c))
        {
            return Err(CapacityError::NodeClassUnused(c.clone()));
        }
    }
    pools
        .into_iter()
        .map(|pool| {
            let own = pool.own_class.as_ref().map(ToString::to_string);
            let reference = args
                .iter()
                .rev()
                .find(|a| a.class.is_some() && a.class == own)
                .or(default)
                .map(|a| a.reference.clone())
                .ok_or_else(|| CapacityError::NoNodeClass {
                    pool: pool.name.clone(),
                    class: own.clone().unwrap_or_else(|| "CLASS".to_owned()),
                })?;
            Ok(node_pool(pool, reference))
        })
        .collect()
}

fn node_pool(pool: Pool, node_class_ref: NodeClassReference) -> NodePool {
    let Pool {
        name,
        labels,
        requirements,
        taint,
        idle_after,
        limits,
        consolidation,
        ..
    } = pool;
    NodePool {
        api_version: karpenter::API_VERSION.to_owned(),
        kind: karpenter::KIND.to_owned(),
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(object_labels("capacity")),
            ..ObjectMeta::default()
        },
        spec: NodePoolSpec {
            template: NodeClaimTemplate {
                metadata: (!labels.is_empty()).then_some(TemplateMetadata {
                    labels: Some(labels),
                    annotations: None,
                }),
                spec: NodeClaimTemplateSpec {
                    requirements,
                    node_class_ref,
                    taints: Some(vec![taint]),
                    startup_taints: None,
                    expire_after: None,
                    termination_grace_period: None,
                },
            },
            disruption: Some(Disruption {
                consolidation_policy: Some(consolidation),
                consolidate_after: idle_after.to_string(),
                budgets: None,
            }),
            limits: (!limits.is_empty()).then_some(limits),
            weight: None,
        },
    }
}

fn object_labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "moat".to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
    ])
}

/// The warm pool of one class: its namespace and the placeholder pod moat itself admits there.
#[derive(Debug, Clone)]
pub struct WarmClass {
    pub class: ClassName,
    pub nodes: u32,
    pub namespace: Value,
    /// The placeholder as moat's mutating webhook leaves it (placement, runtime added).
    pub pod: Value,
}

/// The namespace of a class's warm placeholders.
pub fn warm_namespace(class: &ClassName) -> String {
    format!("{WARM_NAMESPACE_PREFIX}{class}")
}

/// The warm placeholder of every class with `warmNodes`, each decided by moat's own engine in
/// its namespace exactly as the admission webhook would: mutated, then re-checked at the
/// validate stage.
///
/// # Errors
/// No or an unpinned pause image; a placeholder moat itself would refuse.
pub fn warm_classes(
    config: &Config,
    pause_image: Option<&str>,
    priority_class: Option<&str>,
) -> Result<Vec<WarmClass>, CapacityError> {
    let iso = &config.isolation;
    let mut out = Vec::new();
    for spec in iso.classes.iter().filter(|c| c.warm_nodes > 0) {
        let ClassPattern::Name(class) = &spec.name else {
            continue; // refused by Config::validate
        };
        let image = pause_image.ok_or_else(|| CapacityError::NoPauseImage(class.to_string()))?;
        let parsed: ImageRef = image
            .parse()
            .map_err(|e| CapacityError::PauseImage(image.to_owned(), format!("{e}")))?;
        if parsed.digest().is_none() {
            return Err(CapacityError::PauseImage(
                image.to_owned(),
                "not pinned by digest (@sha256:…)".to_owned(),
            ));
        }
        let namespace = warm_namespace(class);
        let mut ns_labels = BTreeMap::from([
            (
                "pod-security.kubernetes.io/enforce".to_owned(),
                "restricted".to_owned(),
            ),
            ("app.kubernetes.io/name".to_owned(), "moat".to_owned()),
            (
                "app.kubernetes.io/component".to_owned(),
                "warm-capacity".to_owned(),
            ),
        ]);
        if let Some(key) = &iso.namespace_class_label {
            ns_labels.insert(key.to_string(), class.to_string());
        }
        let ns_object = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace, "labels": ns_labels},
        });
        let requests: BTreeMap<String, String> = if spec.warm_requests.is_empty() {
            DEFAULT_WARM_REQUESTS
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        } else {
            spec.warm_requests
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": format!("moat-warm-{class}"),
                "namespace": namespace,
                "labels": warm_labels(config, class),
            },
            "spec": {
                "automountServiceAccountToken": false,
                "enableServiceLinks": false,
                "terminationGracePeriodSeconds": 0,
                "securityContext": {
                    "runAsNonRoot": true, "runAsUser": PAUSE_USER, "runAsGroup": PAUSE_USER,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [{
                    "name": "pause",
                    "image": image,
                    "resources": {"requests": requests},
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }],
            },
        });
        if let Some(p) = priority_class {
            pod["spec"]["priorityClassName"] = json!(p);
        }
        let mut labels = ns_labels;
        labels.insert("kubernetes.io/metadata.name".to_owned(), namespace.clone());
        let pod = admitted(config, class, &namespace, &labels, &pod)?;
        out.push(WarmClass {
            class: class.clone(),
            nodes: spec.warm_nodes,
            namespace: ns_object,
            pod,
        });
    }
    Ok(out)
}

/// Labels of a class's placeholders: its class (so other classes' anti-affinity keeps off its
/// nodes, and in pod mode every isolated pod's does) and what tells them apart as moat's.
fn warm_labels(config: &Config, class: &ClassName) -> BTreeMap<String, String> {
    let mut labels = object_labels("warm-capacity");
    labels.insert(
        config.isolation.pod_class_label.to_string(),
        class.to_string(),
    );
    labels
}

/// `pod` after moat's mutating webhook, checked to pass its validating webhook unchanged.
fn admitted(
    config: &Config,
    class: &ClassName,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    pod: &Value,
) -> Result<Value, CapacityError> {
    let denied = |message: String| CapacityError::PlaceholderDenied {
        class: class.to_string(),
        namespace: namespace.to_owned(),
        message,
    };
    let decide = |object: &Value, stage| {
        let template = Template::from_value(object)
            .map_err(|e| CapacityError::Object(e.to_string()))?
            .ok_or_else(|| CapacityError::Object("placeholder is not a Pod".to_owned()))?;
        let req = Request {
            operation: Operation::Create,
            stage,
            object: Some(&template),
            old_object: None,
            namespace,
            namespace_labels: Some(labels),
            dry_run: false,
            requester: None,
            placement_seed: namespace,
        };
        Ok::<_, CapacityError>(engine::decide(config, &req))
    };
    let mutated = decide(pod, Stage::Mutate)?;
    if !mutated.allowed() {
        return Err(denied(mutated.message()));
    }
    // An exempt placeholder would get no placement: it would hold no node of its class.
    if let Some(e) = mutated.exemptions.first() {
        return Err(denied(format!(
            "it would be exempt ({}) and so not placed on its class's nodes",
            e.reason.as_str()
        )));
    }
    let pod = mutated
        .patched(pod)
        .map_err(|e| CapacityError::Object(e.to_string()))?;
    let validated = decide(&pod, Stage::Validate)?;
    if !validated.allowed() {
        return Err(denied(validated.message()));
    }
    Ok(pod)
}

/// The installed objects of the warm pools, in the chosen form.
///
/// # Errors
/// As [`warm_classes`], or an object that does not convert to its Kubernetes type.
pub fn warm_objects(
    config: &Config,
    options: &CapacityOptions,
) -> Result<Vec<Value>, CapacityError> {
    let priority = (options.warm_form == WarmForm::Placeholders).then_some(WARM_PRIORITY_CLASS);
    let classes = warm_classes(config, options.pause_image.as_deref(), priority)?;
    let mut out = Vec::new();
    if classes.is_empty() {
        return Ok(out);
    }
    if priority.is_some() {
        out.push(typed::<PriorityClass>(json!({
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": WARM_PRIORITY_CLASS, "labels": object_labels("warm-capacity")},
            "value": WARM_PRIORITY,
            "globalDefault": false,
            // Placeholders never displace anything; real pods displace them.
            "preemptionPolicy": "Never",
            "description": "moat's warm placeholders: preempted by every real pod",
        }))?);
    }
    for w in classes {
        out.push(typed::<Namespace>(w.namespace)?);
        let ns = warm_namespace(&w.class);
        let name = format!("moat-warm-{}", w.class);
        let template =
            json!({"metadata": {"labels": w.pod["metadata"]["labels"]}, "spec": w.pod["spec"]});
        let replicas = i32::try_from(w.nodes).map_err(|e| CapacityError::Object(e.to_string()))?;
        match options.warm_form {
            WarmForm::CapacityBuffer => {
                out.push(typed::<PodTemplate>(json!({
                    "apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": name, "namespace": ns, "labels": object_labels("warm-capacity")},
                    "template": template,
                }))?);
                let buffer = buffer::CapacityBuffer {
                    api_version: options.capacity_buffer_version.api_version().to_owned(),
                    kind: buffer::KIND.to_owned(),
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(ns),
                        labels: Some(object_labels("warm-capacity")),
                        ..ObjectMeta::default()
                    },
                    spec: buffer::CapacityBufferSpec {
                        provisioning_strategy: Some(buffer::ACTIVE_CAPACITY.to_owned()),
                        pod_template_ref: Some(buffer::LocalObjectRef { name }),
                        replicas: Some(replicas),
                        ..buffer::CapacityBufferSpec::default()
                    },
                };
                out.push(to_value(&buffer)?);
            }
            WarmForm::Placeholders => {
                let selector = warm_labels(config, &w.class);
                out.push(typed::<Deployment>(json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": name, "namespace": ns, "labels": object_labels("warm-capacity")},
                    "spec": {
                        "replicas": replicas,
                        "selector": {"matchLabels": selector},
                        "template": template,
                    },
                }))?);
            }
        }
    }
    Ok(out)
}

/// Every capacity object `moat install` prints for these options: NodePools with
/// `--karpenter`, and the warm pools of classes with `warmNodes`.
///
/// # Errors
/// As [`node_pools`] and [`warm_objects`].
pub fn objects(config: &Config, options: &CapacityOptions) -> Result<Vec<Value>, CapacityError> {
    let mut out = Vec::new();
    if options.karpenter {
        for pool in node_pools(config, &options.node_classes)? {
            out.push(to_value(&pool)?);
        }
    }
    out.extend(warm_objects(config, options)?);
    Ok(out)
}

fn to_value<T: serde::Serialize>(t: &T) -> Result<Value, CapacityError> {
    serde_json::to_value(t).map_err(|e| CapacityError::Object(e.to_string()))
}

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
    v: Value,
) -> Result<Value, CapacityError> {
    crate::typed::<T>(v).map_err(CapacityError::Object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml).unwrap()
    }

    #[test]
    fn node_class_arguments() {
        let a = parse_node_class("example.dev/ExampleNodeClass/standard").unwrap();
        assert_eq!(a.class, None);
        assert_eq!(a.reference.kind, "ExampleNodeClass");
        let b = parse_node_class("gold=example.dev/ExampleNodeClass/kata").unwrap();
        assert_eq!(b.class.as_deref(), Some("gold"));
        for bad in ["", "a/b", "a/b/c/d", "/b/c", "Gold=a/b/c", "a//c"] {
            assert!(parse_node_class(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pool_layout_follows_label_and_taint() {
        let cases: &[(&str, &[&str])] = &[
            // Label and taint name the class: a pool per class.
            (
                "isolation: {mode: class, classes: [{name: a, namespaces: [x]}, {name: b, namespaces: [y]}]}",
                &["moat-class-a", "moat-class-b"],
            ),
            // Both fixed: one shared pool, classes kept apart by anti-affinity.
            (
                "isolation: {mode: class, nodes: {labelKey: ipp, labelValue: 'true', taintKey: ipp, taintValue: 'true'}, classes: [{name: '*', namespaces: ['*']}]}",
                &["moat-shared"],
            ),
            // Fixed taint: a pool per named class and one for the rest.
            (
                "isolation: {mode: pod, nodes: {taintValue: iso}, classes: [{name: a, namespaces: [x]}, {name: '*', namespaces: [z]}]}",
                &["moat-class-a", "moat-other-classes"],
            ),
        ];
        for (yaml, names) in cases {
            let got: Vec<String> = pools(&config(yaml))
                .unwrap()
                .into_iter()
                .map(|p| p.name)
                .collect();
            assert_eq!(&got, names, "{yaml}");
        }
        assert_eq!(
            pools(&config(
                "isolation: {mode: class, classes: [{name: '*', namespaces: ['*']}]}"
            )),
            Err(CapacityError::WildcardNeedsFixedTaint)
        );
        assert!(matches!(
            pools(&config(
                "isolation: {mode: class, nodes: {labelValue: 'on', taintValue: 'on'}, classes: [{name: a, namespaces: [x], idleAfter: 1m}, {name: b, namespaces: [y], idleAfter: 2m}]}"
            )),
            Err(CapacityError::SharedPoolDisagrees {
                field: "idleAfter",
                ..
            })
        ));
    }

    #[test]
    fn each_pool_follows_the_modes_of_the_classes_it_serves() {
        use ConsolidationPolicy::{WhenEmpty, WhenEmptyOrUnderutilized as Repack};
        let classes = "[{name: shared, namespaces: [a]}, {name: ci, mode: pod, namespaces: [b]}, {name: big, mode: dedicatedNode, namespaces: [c]}, {name: '*', namespaces: [d]}]";
        // (nodes layout, pool name, id requirement, consolidation)
        let cases: &[(&str, &str, bool, ConsolidationPolicy)] = &[
            ("{taintValue: iso}", "moat-class-shared", false, Repack),
            ("{taintValue: iso}", "moat-class-ci", false, WhenEmpty),
            ("{taintValue: iso}", "moat-class-big", true, WhenEmpty),
            ("{taintValue: iso}", "moat-other-classes", false, Repack),
            // One pool for every class: the id requirement for big, and no repacking for ci's
            // and big's nodes.
            (
                "{labelValue: iso, taintValue: iso}",
                "moat-shared",
                true,
                WhenEmpty,
            ),
        ];
        for (nodes, name, id, policy) in cases {
            let c = config(&format!(
                "isolation: {{mode: class, nodes: {nodes}, classes: {classes}}}"
            ));
            let all = pools(&c).unwrap();
            let pool = all
                .iter()
                .find(|p| p.name == *name)
                .unwrap_or_else(|| panic!("{name} in {nodes}"));
            assert_eq!(
                pool.requirements
                    .iter()
                    .any(|r| r.key == "node-restriction.kubernetes.io/moat-node"
                        && r.operator == "Exists"),
                *id,
                "{name}"
            );
            assert_eq!(pool.consolidation, *policy, "{name}");
        }
        // With isolation off there is nothing to provision, whatever the classes declare.
        let off = config(&format!(
            "isolation: {{mode: off, nodes: {{taintValue: iso}}, classes: {classes}}}"
        ));
        assert!(pools(&off).unwrap().is_empty());
    }

    #[test]
    fn other_classes_pool_leaves_named_classes_to_their_own() {
        let p = pools(&config(
            "isolation: {mode: pod, nodes: {taintValue: iso}, classes: [{name: a, namespaces: [x]}, {name: '*', namespaces: [z]}]}",
        ))
        .unwrap();
        let other = &p[1];
        assert_eq!(other.requirements[0].operator, "NotIn");
        assert_eq!(
            other.requirements[0].values.as_deref(),
            Some(&["a".to_owned()][..])
        );
        let a: ClassName = "a".parse().unwrap();
        let b: ClassName = "b".parse().unwrap();
        assert!(!other.classes.covers(&a) && other.classes.covers(&b));
    }

    #[test]
    fn refuses_what_karpenter_cannot_serve() {
        let nc = ["example.dev/ExampleNodeClass/standard".to_owned()];
        let cases: &[(&str, &[String], &str)] = &[
            (
                "isolation: {mode: class, nodes: {labelKey: kubernetes.io/moat}, classes: [{name: a, namespaces: [x]}]}",
                &nc,
                "'kubernetes.io/moat' (isolation.nodes.labelKey) is in a label domain Karpenter refuses",
            ),
            (
                "isolation: {mode: pod, nodes: {topologyKey: node-restriction.kubernetes.io/id}, classes: [{name: a, namespaces: [x]}]}",
                &nc,
                "isolation.nodes.topologyKey 'node-restriction.kubernetes.io/id'",
            ),
            (
                "isolation: {mode: class, classes: [{name: a, namespaces: [x]}]}",
                &[],
                "NodePool 'moat-class-a' needs a node class",
            ),
            (
                "isolation: {mode: class, classes: [{name: a, namespaces: [x]}]}",
                &["b=example.dev/ExampleNodeClass/x".to_owned()],
                "--node-class names class 'b'",
            ),
        ];
        for (yaml, args, want) in cases {
            let got = node_pools(&config(yaml), args).unwrap_err().to_string();
            assert!(got.contains(want), "{yaml}: {got}");
        }
    }
}
