//! Isolation: pods of class X run only on nodes of class X (class mode), each on a node of its
//! own (pod mode), or on a dedicated node the provisioner creates (dedicatedNode mode).
//!
//! What keeps the invariant ("a node that runs an isolated pod of class X never runs, at the
//! same time, a pod of another class or an unisolated tenant pod"):
//! - isolated nodes carry a restricted label and a taint; an isolated pod gets a required node
//!   affinity (or nodeSelector) for its class's label and a toleration for its class's taint;
//! - only pods moat isolates may tolerate the taint ([`guard_tolerations`]), and non-exempt pods
//!   may not bind themselves with `spec.nodeName` (which skips the scheduler and its taints);
//! - class mode adds a required anti-affinity, across all namespaces, against pods that carry
//!   the class label with another value (`Exists` and `NotIn [X]` in one term: "another class");
//!   pod mode against every pod that carries the class label;
//! - the class comes from an operator-controlled source or is checked against the class's
//!   namespace binding, and cannot change on UPDATE;
//! - every change is added to the pod's own tolerations and affinity, never replacing them, and
//!   only when missing, so reinvocation yields an empty patch.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PodAffinityTerm,
    PodAntiAffinity, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use crate::config::{IsolationMode, IsolationPolicy};
use crate::decision::{ExemptionReason, Policy};
use crate::engine::{Context, Findings};
use crate::fields::PodFields;
use crate::names::{ClassName, RuntimeClassName};

const HOSTNAME_TOPOLOGY_KEY: &str = "kubernetes.io/hostname";
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
    if iso.mode == IsolationMode::Off {
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
        let old_tolerations = old.fields.tolerations.as_deref().unwrap_or_default();
        let added = ctx
            .template
            .fields
            .tolerations
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, t)| !old_tolerations.contains(t));
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

    let class = class_of(ctx, out);
    let exemption = if ctx.template.is_daemonset_pod() {
        Some(ExemptionReason::DaemonSet)
    } else if ctx
        .config
        .exemptions
        .ignore_annotation
        .as_ref()
        .is_some_and(|a| ctx.template.annotation(a.as_str()) == Some(TRUE))
    {
        Some(ExemptionReason::IgnoreAnnotation)
    } else if ctx.config.exemptions.pinned_pods && pins_itself(iso, ctx) {
        Some(ExemptionReason::PinnedPlacement)
    } else if ctx.config.exemptions.dry_run && ctx.req.dry_run {
        Some(ExemptionReason::DryRun)
    } else {
        None
    };
    if let Some(reason) = exemption {
        out.exempt(Policy::Isolation, reason);
    }
    let class = match (class, exemption) {
        (Some(Some((class, source))), None) => (class, source),
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
    let (class, source) = class;
    let Some(class_spec) = iso.class_spec(&class) else {
        out.deny(
            Policy::Isolation,
            format!("isolation class '{class}' is not declared"),
        );
        return None;
    };
    if source != Source::NamespaceLabel {
        let ns = ctx.req.namespace;
        let empty = BTreeMap::new();
        let labels = ctx.req.namespace_labels.unwrap_or(&empty);
        let bound = class_spec.namespaces.iter().any(|p| p.matches(ns))
            || class_spec
                .namespace_selector
                .as_ref()
                .is_some_and(|s| s.matches(labels));
        if !bound {
            out.deny(
                Policy::Isolation,
                format!("namespace '{ns}' may not use isolation class '{class}'"),
            );
            return None;
        }
    }
    let target = target(ctx, &class, out);
    Some(Placement {
        runtime: class_spec.runtime_class_name.clone(),
        class,
        target,
    })
}

/// Checks the pod's own use of moat's node keys and chooses its target.
fn target(ctx: &Context<'_>, class: &ClassName, out: &mut Findings) -> Option<Target> {
    let iso = &ctx.config.isolation;
    let class = class.as_str();
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
    if iso.mode != IsolationMode::DedicatedNode {
        return Some(Target::Affinity);
    }
    match dedicated_node(ctx, class) {
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
    let ours =
        |k: &str| k == iso.nodes.label_key.as_str() || k == iso.dedicated_node_label.as_str();
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
                out.changed(Policy::Isolation, format!("add nodeSelector {k}={v}"));
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
    let mut added = false;
    for term in terms.iter_mut() {
        added |= push_unique(
            term.match_expressions.get_or_insert_with(Vec::new),
            requirement.clone(),
        );
    }
    if added {
        out.changed(
            Policy::Isolation,
            format!("require node label {label_key} in [{node_value}]"),
        );
    }

    let exists = LabelSelectorRequirement {
        key: class_key.to_owned(),
        operator: "Exists".to_owned(),
        values: None,
    };
    let (selector, description) = match iso.mode {
        IsolationMode::Pod => (
            vec![exists],
            "keep every other isolated pod off this pod's node".to_owned(),
        ),
        _ => (
            vec![
                exists,
                LabelSelectorRequirement {
                    key: class_key.to_owned(),
                    operator: "NotIn".to_owned(),
                    values: Some(vec![class.to_owned()]),
                },
            ],
            format!("keep pods of every class but '{class}' off this pod's node"),
        ),
    };
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_expressions: Some(selector),
            match_labels: None,
        }),
        // Empty: pods of every namespace, not only the pod's own.
        namespace_selector: Some(LabelSelector::default()),
        topology_key: HOSTNAME_TOPOLOGY_KEY.to_owned(),
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

/// The dedicated node a pod is pinned to: the one already chosen (reinvocation, validation), or
/// `<class>-<10 hex>` derived from the namespace and the request's placement seed.
fn dedicated_node(ctx: &Context<'_>, class: &str) -> Result<String, String> {
    let key = ctx.config.isolation.dedicated_node_label.as_str();
    if let Some(existing) = ctx.template.node_selector(key) {
        let ok = existing
            .strip_prefix(class)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|h| {
                h.len() == 10
                    && h.bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            });
        return if ok {
            Ok(existing.to_owned())
        } else {
            Err(format!(
                "spec.nodeSelector['{key}']: '{existing}' is not a dedicated node of class '{class}'; moat sets this key"
            ))
        };
    }
    let hash = fnv1a64(format!("{}/{}", ctx.req.namespace, ctx.req.placement_seed).as_bytes());
    Ok(format!("{class}-{:010x}", hash & 0xff_ffff_ffff))
}

/// FNV-1a, 64 bits: stable across releases and platforms (the id outlives a moat version).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn quoted(v: Option<&str>) -> String {
    v.map_or_else(|| "unset".to_owned(), |v| format!("'{v}'"))
}
