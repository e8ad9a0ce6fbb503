//! Isolation: pods of class X run only on nodes of class X (class mode), each on a node of its
//! own (pod mode), or on a dedicated node the provisioner creates (dedicatedNode mode). The mode
//! is the class's own (`classes[].mode`, else the global `isolation.mode`), so one cluster may
//! mix them; `off` is global.
//!
//! What keeps the invariant ("a node that runs an isolated pod of class X never runs, at the
//! same time, a pod of another class or an unisolated tenant pod"):
//! - isolated nodes carry a restricted label and a taint; an isolated pod gets a required node
//!   affinity (or nodeSelector) for its class's label and a toleration for its class's taint;
//! - only pods moat isolates may tolerate the taint ([`guard_tolerations`]), and non-exempt pods
//!   may not bind themselves with `spec.nodeName` (which skips the scheduler and its taints);
//! - class mode adds a required anti-affinity, across all namespaces, against pods that carry
//!   the class label with another value (`Exists` and `NotIn [X]` in one term: "another class");
//!   pod mode against every pod that carries the class label. The scheduler applies a running
//!   pod's required anti-affinity to every newcomer too, so these terms also keep pods of a
//!   dedicatedNode class (which write none) off their nodes where modes mix in one pool;
//! - dedicatedNode mode pins each pod to a node id bound to its namespace and class, so no pod
//!   of another class or namespace can ask for its node;
//! - a DaemonSet in a namespace the operator forces into a class is refused, and so are the pods
//!   its controller creates there: it makes a pod for every untainted node, which moat pins to
//!   class nodes, so none would run;
//! - the class comes from an operator-controlled source or is checked against the class's
//!   namespace binding, and cannot change on UPDATE;
//! - every change is added to the pod's own tolerations and affinity, never replacing them, and
//!   only when missing, so reinvocation yields an empty patch.

use std::collections::HashSet;

use k8s_openapi::api::core::v1::{
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PodAffinityTerm,
    PodAntiAffinity, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use crate::config::{ClassMode, ClassSpec, IsolationPolicy};
use crate::decision::{ExemptionReason, Policy};
use crate::dedicated::DedicatedNodeId;
use crate::engine::{Context, Findings};
use crate::fields::PodFields;
use crate::names::{ClassName, RuntimeClassName};
use crate::subject::Kind;

/// The scheduler a pod gets when it names none.
const DEFAULT_SCHEDULER: &str = "default-scheduler";
const TRUE: &str = "true";

/// Where a pod's class came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The namespace's class label: set by the operator, so no binding check is needed.
    NamespaceLabel,
    /// The pod's own label: checked against the class's namespace binding.
    PodLabel,
    /// `isolation.defaultClass` for a namespace in `isolateNamespaces`.
    NamespaceDefault,
}

/// The isolation a pod gets, decided by [`check`].
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    class: ClassName,
    /// The class's placement mode.
    mode: ClassMode,
    /// The class's RuntimeClass.
    runtime: Option<RuntimeClassName>,
    /// How the pod is placed; `None` when the pod's own placement was refused (nothing to add).
    target: Option<Target>,
}

#[derive(Debug, Clone)]
enum Target {
    /// Class and pod modes: node affinity and anti-affinity.
    Affinity,
    /// dedicatedNode mode: pinned by nodeSelector to this node id.
    Dedicated(String),
}

impl Placement {
    /// The class's RuntimeClass, with the class name for messages.
    pub(crate) fn runtime(&self) -> Option<(&str, &RuntimeClassName)> {
        self.runtime.as_ref().map(|r| (self.class.as_str(), r))
    }
}

/// The pod's class and placement; denials for everything that keeps it from being placed.
pub(crate) fn check(ctx: &Context<'_>, out: &mut Findings) -> Option<Placement> {
    let iso = &ctx.config.isolation;
    if !iso.is_on() {
        return None;
    }
    let spec = &ctx.template.spec;

    if let Some(old) = ctx.old {
        // A running pod: its placement is fixed; only the class label and new tolerations matter.
        let key = iso.pod_class_label.as_str();
        let (before, after) = (old.label(key), ctx.template.label(key));
        if before != after {
            out.deny(
                Policy::Isolation,
                format!(
                    "metadata.labels['{key}']: the isolation class of a running pod cannot change (was {}, now {})",
                    quoted(before),
                    quoted(after)
                ),
            );
        }
        // Linear in the number of tolerations: the old ones are looked up, not scanned.
        let old_tolerations: HashSet<TolerationKey<'_>> = old
            .fields
            .tolerations
            .iter()
            .flatten()
            .map(TolerationKey::of)
            .collect();
        let added = ctx
            .template
            .fields
            .tolerations
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, t)| !old_tolerations.contains(&TolerationKey::of(t)));
        guard_tolerations(ctx, added, out);
        return None;
    }

    if !iso.allow_node_name && spec.node_name.as_deref().is_some_and(|n| !n.is_empty()) {
        out.deny(
            Policy::Isolation,
            format!(
                "{}: binding a pod to a node by name skips the scheduler and the isolation taints; use a nodeSelector",
                ctx.field("spec.nodeName")
            ),
        );
    }

    check_scheduler(ctx, out);

    let class = class_of(ctx, out);
    // A class the operator forces on the namespace (its class label, isolateNamespaces) cannot
    // be escaped by anything the tenant writes; elsewhere the tenant chose isolation and may opt
    // out where the operator allows it.
    // A pod in a namespace that isolates every pod is forced whatever its own label says: the
    // label moat adds at the mutate stage must not turn into a tenant's opt-out at the validate
    // stage (found by the backstop's equivalence test).
    let forced = matches!(
        class,
        Some(Some((_, Source::NamespaceLabel | Source::NamespaceDefault)))
    ) || iso
        .isolate_namespaces
        .iter()
        .any(|p| p.matches(ctx.req.namespace));
    let exemption = exemption(ctx, forced);
    if let Some(reason) = exemption {
        out.exempt(Policy::Isolation, reason);
    }
    let (class, source) = match (class, exemption) {
        (Some(Some((class, source))), None) => (class, source),
        // Exempt, but still labelled: the label must be one its namespace may use, since other
        // pods' anti-affinity reads it.
        (Some(Some((class, Source::PodLabel))), Some(_)) => {
            if let Some(spec) = iso.class_spec(&class) {
                bound(ctx, &class, spec, out);
            }
            guard_tolerations(
                ctx,
                ctx.template.fields.tolerations.iter().flatten().enumerate(),
                out,
            );
            return None;
        }
        // Not isolated (or the class was refused): such a pod must not reach isolated nodes.
        _ => {
            guard_tolerations(
                ctx,
                ctx.template.fields.tolerations.iter().flatten().enumerate(),
                out,
            );
            return None;
        }
    };
    let Some(class_spec) = iso.class_spec(&class) else {
        out.deny(
            Policy::Isolation,
            format!("isolation class '{class}' is not declared"),
        );
        return None;
    };
    if source != Source::NamespaceLabel && !bound(ctx, &class, class_spec, out) {
        return None;
    }
    let Some(mode) = iso.mode_of(class_spec) else {
        return None; // isolation is off: checked above
    };
    // A DaemonSet's pods are made for nodes without moat's taint, and here moat pins each to
    // the class's nodes: refused with the reason rather than left Pending (its pods too, for a
    // DaemonSet admitted before the namespace was forced or while moat was down).
    if forced && of_daemonset(ctx) {
        out.deny(
            Policy::Isolation,
            format!(
                "namespace '{}' runs every pod in isolation class '{class}' ({} mode), so a DaemonSet's pods could never run there: its controller makes one for each node without moat's taint, and moat pins each to nodes of the class; run node agents in an exempt namespace",
                ctx.req.namespace,
                mode.as_str()
            ),
        );
        return None;
    }
    let target = target(ctx, &class, mode, out);
    Some(Placement {
        runtime: class_spec.runtime_class_name.clone(),
        class,
        mode,
        target,
    })
}

/// The exemption from isolation that applies, if any. Only facts a tenant cannot write decide
/// the DaemonSet exemption: the DaemonSet template itself, or a pod the DaemonSet controller
/// creates (`userInfo`, written by the API server; the pod's `ownerReferences` are written by
/// whoever creates it). In a namespace whose class the operator forces, none of the exemptions a
/// tenant can trigger applies.
fn exemption(ctx: &Context<'_>, forced: bool) -> Option<ExemptionReason> {
    let ex = &ctx.config.exemptions;
    if forced {
        return None;
    }
    if of_daemonset(ctx) {
        Some(ExemptionReason::DaemonSet)
    } else if ex
        .ignore_annotation
        .as_ref()
        .is_some_and(|a| ctx.template.annotation(a.as_str()) == Some(TRUE))
    {
        Some(ExemptionReason::IgnoreAnnotation)
    } else if ex.pinned_pods && pins_itself(&ctx.config.isolation, ctx) {
        Some(ExemptionReason::PinnedPlacement)
    } else if ex.dry_run && ctx.req.dry_run {
        Some(ExemptionReason::DryRun)
    } else {
        None
    }
}

/// Whether the object is a DaemonSet's template or a pod its controller creates, decided only
/// on facts a tenant cannot write: the kind under review, or `userInfo` (written by the API
/// server) together with the pod's controller reference.
fn of_daemonset(ctx: &Context<'_>) -> bool {
    match ctx.template.kind {
        Kind::DaemonSet => true,
        Kind::Pod => {
            ctx.req.requester.is_some_and(|r| {
                ctx.config
                    .exemptions
                    .daemon_set_controllers
                    .iter()
                    .any(|c| c.as_str() == r.username)
            }) && ctx.template.is_daemonset_pod()
        }
        _ => false,
    }
}

/// Whether the pod's namespace may use `class` (recording the denial when not). A namespace
/// whose labels moat has not seen is unknown, not unlabelled: denied, to be retried.
fn bound(ctx: &Context<'_>, class: &ClassName, spec: &ClassSpec, out: &mut Findings) -> bool {
    let ns = ctx.req.namespace;
    if spec.namespaces.iter().any(|p| p.matches(ns)) {
        return true;
    }
    let Some(selector) = &spec.namespace_selector else {
        out.deny(
            Policy::Isolation,
            format!("namespace '{ns}' may not use isolation class '{class}'"),
        );
        return false;
    };
    let Some(labels) = ctx.req.namespace_labels else {
        out.deny(Policy::Isolation, unknown_namespace(ns));
        return false;
    };
    if selector.matches(labels) {
        return true;
    }
    out.deny(
        Policy::Isolation,
        format!("namespace '{ns}' may not use isolation class '{class}'"),
    );
    false
}

fn unknown_namespace(ns: &str) -> String {
    format!(
        "namespace '{ns}' is not known to moat yet, and its labels decide the isolation class; retry in a moment"
    )
}

/// A scheduler other than the allowed ones may ignore the taints that keep pods off isolated
/// nodes.
fn check_scheduler(ctx: &Context<'_>, out: &mut Findings) {
    let name = ctx
        .template
        .spec
        .scheduler_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_SCHEDULER);
    let allowed = &ctx.config.isolation.scheduler_names;
    if !allowed.iter().any(|a| a == name) {
        out.deny(
            Policy::Isolation,
            format!(
                "{}: scheduler '{name}' is not allowed (allowed: {}); another scheduler may ignore the isolation taints",
                ctx.field("spec.schedulerName"),
                allowed.join(", ")
            ),
        );
    }
}

/// A toleration's fields, for set lookups.
#[derive(Hash, PartialEq, Eq)]
struct TolerationKey<'t>([Option<&'t str>; 4], Option<i64>);

impl<'t> TolerationKey<'t> {
    fn of(t: &'t Toleration) -> Self {
        Self(
            [
                t.key.as_deref(),
                t.operator.as_deref(),
                t.value.as_deref(),
                t.effect.as_deref(),
            ],
            t.toleration_seconds,
        )
    }
}

/// Checks the pod's own use of moat's node keys and chooses its target.
fn target(
    ctx: &Context<'_>,
    class_name: &ClassName,
    mode: ClassMode,
    out: &mut Findings,
) -> Option<Target> {
    let iso = &ctx.config.isolation;
    let class = class_name.as_str();
    let node_value = iso.nodes.label_value.as_ref().map_or(class, |v| v.as_str());
    let label_key = iso.nodes.label_key.as_str();
    if let Some(v) = ctx.template.node_selector(label_key)
        && v != node_value
    {
        out.deny(
            Policy::Isolation,
            format!("spec.nodeSelector['{label_key}']: '{v}' is not the node label of class '{class}'; moat sets this key"),
        );
        return None;
    }
    if mode != ClassMode::DedicatedNode {
        return Some(Target::Affinity);
    }
    match dedicated_node(ctx, class_name) {
        Ok(id) => Some(Target::Dedicated(id)),
        Err(msg) => {
            out.deny(Policy::Isolation, msg);
            None
        }
    }
}

/// The pod's class: `Some(None)` for an unisolated pod, `None` when a denial was recorded.
fn class_of(ctx: &Context<'_>, out: &mut Findings) -> Option<Option<(ClassName, Source)>> {
    let iso = &ctx.config.isolation;
    let pod_key = iso.pod_class_label.as_str();
    let pod_label = ctx.template.label(pod_key);
    let ns = ctx.req.namespace;
    if iso.namespace_class_label.is_some() && ctx.req.namespace_labels.is_none() {
        out.deny(Policy::Isolation, unknown_namespace(ns));
        return None;
    }
    let ns_label = iso
        .namespace_class_label
        .as_ref()
        .and_then(|k| Some((k, ctx.req.namespace_labels?.get(k.as_str())?)));
    if let Some((key, value)) = ns_label {
        let Ok(class) = value.parse::<ClassName>() else {
            out.deny(
                Policy::Isolation,
                format!(
                    "namespace '{ns}' label '{key}' = '{value}' is not a valid isolation class name"
                ),
            );
            return None;
        };
        if let Some(p) = pod_label
            && p != class.as_str()
        {
            out.deny(
                    Policy::Isolation,
                    format!(
                        "{}: the pod asks for isolation class '{p}', but namespace '{ns}' is bound to class '{class}'",
                        ctx.field(&format!("metadata.labels['{pod_key}']"))
                    ),
                );
            return None;
        }
        return Some(Some((class, Source::NamespaceLabel)));
    }
    if let Some(p) = pod_label {
        return match p.parse::<ClassName>() {
            Ok(class) => Some(Some((class, Source::PodLabel))),
            Err(e) => {
                out.deny(
                    Policy::Isolation,
                    format!(
                        "{}: {e}",
                        ctx.field(&format!("metadata.labels['{pod_key}']"))
                    ),
                );
                None
            }
        };
    }
    if iso.isolate_namespaces.iter().any(|p| p.matches(ns)) {
        return match &iso.default_class {
            Some(class) => Some(Some((class.clone(), Source::NamespaceDefault))),
            None => {
                out.deny(
                    Policy::Isolation,
                    format!(
                        "namespace '{ns}' isolates every pod, but has no '{}' label naming its class",
                        iso.namespace_class_label.as_ref().map_or("", |k| k.as_str())
                    ),
                );
                None
            }
        };
    }
    Some(None)
}

/// Whether the pod constrains its own placement, beyond moat's own keys.
fn pins_itself(iso: &IsolationPolicy, ctx: &Context<'_>) -> bool {
    let spec = &ctx.template.fields;
    // moat's own keys, the topology key included: moat requires it on every term it adds, so a
    // pod moat placed must not count as pinning itself at the validate stage (found by the
    // backstop's equivalence test).
    let ours = |k: &str| {
        k == iso.nodes.label_key.as_str()
            || k == iso.dedicated_node_label.as_str()
            || k == iso.nodes.topology_key.as_str()
    };
    let selector = spec
        .node_selector
        .as_ref()
        .is_some_and(|s| s.keys().any(|k| !ours(k)));
    let affinity = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_some_and(|r| {
            r.node_selector_terms.iter().any(|t| {
                t.match_fields.as_ref().is_some_and(|f| !f.is_empty())
                    || t.match_expressions.iter().flatten().any(|e| !ours(&e.key))
            })
        });
    selector || affinity
}

/// Denies tolerations that would let a pod onto isolated nodes.
fn guard_tolerations<'t>(
    ctx: &Context<'_>,
    tolerations: impl Iterator<Item = (usize, &'t Toleration)>,
    out: &mut Findings,
) {
    let nodes = &ctx.config.isolation.nodes;
    for (i, t) in tolerations {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == nodes.taint_effect.as_str());
        let exists = t.operator.as_deref() == Some("Exists");
        let key = t.key.as_deref().unwrap_or_default();
        let key_ok = (key.is_empty() && exists) || key == nodes.taint_key.as_str();
        let value_ok = exists
            || nodes
                .taint_value
                .as_ref()
                .is_none_or(|v| t.value.as_deref().unwrap_or_default() == v.as_str());
        if effect_ok && key_ok && value_ok {
            out.deny(
                Policy::Isolation,
                format!(
                    "{}: tolerates moat's isolation taint '{}', which only pods that moat isolates may do",
                    ctx.field(&format!("spec.tolerations[{i}]")),
                    nodes.taint_key
                ),
            );
        }
    }
}

/// Adds the placement to the pod's fields, each part only when missing (reinvocation adds
/// nothing). For workloads the engine lists the changes but drops the patch: their pods are
/// patched when they are created.
pub(crate) fn mutate(ctx: &Context<'_>, p: &Placement, pod: &mut PodFields, out: &mut Findings) {
    let Some(target) = &p.target else {
        return;
    };
    let iso = &ctx.config.isolation;
    let class = p.class.as_str();
    let node_value = iso.nodes.label_value.as_ref().map_or(class, |v| v.as_str());
    let taint_value = iso.nodes.taint_value.as_ref().map_or(class, |v| v.as_str());
    let label_key = iso.nodes.label_key.as_str();

    let class_key = iso.pod_class_label.as_str();
    let labels = pod.labels_mut();
    if !labels.contains_key(class_key) {
        labels.insert(class_key.to_owned(), class.to_owned());
        out.changed(Policy::Isolation, format!("add label {class_key}={class}"));
    }
    let toleration = Toleration {
        key: Some(iso.nodes.taint_key.as_str().to_owned()),
        operator: Some("Equal".to_owned()),
        value: Some(taint_value.to_owned()),
        effect: Some(iso.nodes.taint_effect.as_str().to_owned()),
        toleration_seconds: None,
    };
    if push_unique(pod.tolerations_mut(), toleration) {
        out.changed(
            Policy::Isolation,
            format!(
                "add toleration {}={taint_value}:{}",
                iso.nodes.taint_key,
                iso.nodes.taint_effect.as_str()
            ),
        );
    }

    if let Target::Dedicated(id) = target {
        let selector = pod.node_selector_mut();
        for (k, v) in [
            (label_key, node_value),
            (iso.dedicated_node_label.as_str(), id.as_str()),
        ] {
            if selector.get(k).map(String::as_str) != Some(v) {
                selector.insert(k.to_owned(), v.to_owned());
                out.changed(
                    Policy::Isolation,
                    format!("add nodeSelector {k}={v} (class '{class}' is in dedicatedNode mode)"),
                );
            }
        }
        return;
    }

    let affinity = pod.affinity_mut();
    let terms = &mut affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default)
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(NodeSelector::default)
        .node_selector_terms;
    if terms.is_empty() {
        terms.push(NodeSelectorTerm::default());
    }
    let requirement = NodeSelectorRequirement {
        key: label_key.to_owned(),
        operator: "In".to_owned(),
        values: Some(vec![node_value.to_owned()]),
    };
    // The scheduler ignores anti-affinity on a node that lacks the topology label, and a
    // kubelet may remove labels outside node-restriction.kubernetes.io/ from its own Node: an
    // isolated pod only goes to nodes that carry it.
    let topology_key = iso.nodes.topology_key.as_str();
    let topology = NodeSelectorRequirement {
        key: topology_key.to_owned(),
        operator: "Exists".to_owned(),
        values: None,
    };
    let (mut added, mut added_topology) = (false, false);
    for term in terms.iter_mut() {
        let expressions = term.match_expressions.get_or_insert_with(Vec::new);
        added |= push_unique(expressions, requirement.clone());
        added_topology |= push_unique(expressions, topology.clone());
    }
    if added {
        out.changed(
            Policy::Isolation,
            format!("require node label {label_key} in [{node_value}]"),
        );
    }
    if added_topology {
        out.changed(
            Policy::Isolation,
            format!("require node label {topology_key} to exist (the anti-affinity's topology)"),
        );
    }

    let exists = LabelSelectorRequirement {
        key: class_key.to_owned(),
        operator: "Exists".to_owned(),
        values: None,
    };
    let (selector, description) = match p.mode {
        ClassMode::Pod => (
            vec![exists],
            format!(
                "keep every other isolated pod off this pod's node (class '{class}' is in pod mode)"
            ),
        ),
        // dedicatedNode placements returned above.
        ClassMode::Class | ClassMode::DedicatedNode => (
            vec![
                exists,
                LabelSelectorRequirement {
                    key: class_key.to_owned(),
                    operator: "NotIn".to_owned(),
                    values: Some(vec![class.to_owned()]),
                },
            ],
            format!("keep pods of every class but '{class}' off this pod's node (class mode)"),
        ),
    };
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_expressions: Some(selector),
            match_labels: None,
        }),
        // Empty: pods of every namespace, not only the pod's own.
        namespace_selector: Some(LabelSelector::default()),
        topology_key: topology_key.to_owned(),
        ..PodAffinityTerm::default()
    };
    let anti = affinity
        .pod_anti_affinity
        .get_or_insert_with(PodAntiAffinity::default)
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(Vec::new);
    if push_unique(anti, term) {
        out.changed(Policy::Isolation, description);
    }
}

/// Appends `item` unless an equal one is there; returns whether it appended.
fn push_unique<T: PartialEq>(items: &mut Vec<T>, item: T) -> bool {
    if items.contains(&item) {
        return false;
    }
    items.push(item);
    true
}

/// The dedicated node a pod is pinned to: the one it names, if bound to its namespace and class
/// (reinvocation, validation, or pods of one namespace sharing a node on purpose), or a new one.
fn dedicated_node(ctx: &Context<'_>, class: &ClassName) -> Result<String, String> {
    let key = ctx.config.isolation.dedicated_node_label.as_str();
    let ns = ctx.req.namespace;
    if let Some(existing) = ctx.template.node_selector(key) {
        return DedicatedNodeId::verify(existing, ns, class)
            .map(|id| id.to_string())
            .map_err(|e| format!("spec.nodeSelector['{key}']: {e}; moat sets this key"));
    }
    Ok(DedicatedNodeId::derive(ns, class, ctx.req.placement_seed).to_string())
}

fn quoted(v: Option<&str>) -> String {
    v.map_or_else(|| "unset".to_owned(), |v| format!("'{v}'"))
}
