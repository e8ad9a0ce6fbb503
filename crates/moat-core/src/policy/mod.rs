//! The decision for one object: every policy runs, all denials are reported together, and all
//! mutations become one JSON Patch. Pure: no I/O, no clock, no randomness.
//!
//! The same function serves both webhook stages. At [`Stage::Mutate`] the patch is returned; at
//! [`Stage::Validate`] (the final object, after every mutating webhook ran) a change moat would
//! still need is a denial, so a later webhook cannot undo moat's work unnoticed.

mod images;
mod isolation;
mod runtime;

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::config::{Config, Enforcement};
use crate::subject::{Kind, MalformedObject, Template};

/// The admission operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
    Connect,
}

/// Which webhook asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Mutating webhook (and offline review): return the patch.
    Mutate,
    /// Validating webhook: deny if the final object still needs a change.
    Validate,
}

/// The input of a decision.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub operation: Operation,
    pub stage: Stage,
    /// The object as sent (`request.object`).
    pub object: &'a Value,
    /// The object before the update (`request.oldObject`), on UPDATE.
    pub old_object: Option<&'a Value>,
    /// The request's namespace (a Pod on CREATE may not carry one itself).
    pub namespace: &'a str,
    /// The namespace's labels, when known. Unknown labels count as none.
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
    pub dry_run: bool,
    /// Stable per-object input that names a dedicated node (dedicatedNode mode).
    pub placement_seed: &'a str,
}

/// A policy, for messages and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    Images,
    RuntimeClass,
    Isolation,
}

impl Policy {
    /// Stable lower-case name (metric label value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Images => "images",
            Self::RuntimeClass => "runtimeClass",
            Self::Isolation => "isolation",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a policy did not apply. Each is logged and counted by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExemptionReason {
    /// The namespace is in `exemptions.namespaces` (every policy skipped).
    Namespace,
    /// A DaemonSet's pod: it must run on every node.
    DaemonSet,
    /// The operator's ignore annotation is set on the pod.
    IgnoreAnnotation,
    /// The pod pins its own placement and `exemptions.pinnedPods` is on.
    PinnedPlacement,
    /// A dry-run request and `exemptions.dryRun` is on.
    DryRun,
    /// Not a kind moat reviews.
    UnsupportedKind,
    /// An operation moat does not review (DELETE, CONNECT).
    Operation,
}

impl ExemptionReason {
    /// Stable name (metric label value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Namespace => "namespace",
            Self::DaemonSet => "daemonSet",
            Self::IgnoreAnnotation => "ignoreAnnotation",
            Self::PinnedPlacement => "pinnedPlacement",
            Self::DryRun => "dryRun",
            Self::UnsupportedKind => "unsupportedKind",
            Self::Operation => "operation",
        }
    }
}

/// One "no", with a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub policy: Policy,
    pub message: String,
}

/// A policy that did not apply, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exemption {
    /// `None` when every policy was skipped.
    pub policy: Option<Policy>,
    pub reason: ExemptionReason,
}

/// One change moat makes, described for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub policy: Policy,
    pub description: String,
}

/// The outcome for one object.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub kind: Option<Kind>,
    pub denials: Vec<Denial>,
    /// Denials of policies in audit mode: not enforced, reported as warnings and counted.
    pub audited: Vec<Denial>,
    pub warnings: Vec<String>,
    pub exemptions: Vec<Exemption>,
    /// What the patch does, in words (empty at the validate stage).
    pub changes: Vec<Change>,
    /// RFC 6902 patch to apply to the input object (empty when denied, at the validate stage,
    /// and for workloads).
    pub patch: json_patch::Patch,
}

impl Decision {
    /// Whether the object is admitted.
    pub fn allowed(&self) -> bool {
        self.denials.is_empty()
    }

    /// All denial messages in one line, `; `-separated (empty when allowed).
    pub fn message(&self) -> String {
        let msgs: Vec<&str> = self.denials.iter().map(|d| d.message.as_str()).collect();
        msgs.join("; ")
    }

    /// The input object with the patch applied.
    ///
    /// # Errors
    /// Only if `original` is not the object this decision was made on.
    pub fn patched(&self, original: &Value) -> Result<Value, json_patch::PatchError> {
        let mut object = original.clone();
        json_patch::patch(&mut object, &self.patch)?;
        Ok(object)
    }

    fn untouched(kind: Option<Kind>, reason: ExemptionReason) -> Self {
        Self {
            kind,
            denials: Vec::new(),
            audited: Vec::new(),
            warnings: Vec::new(),
            exemptions: vec![Exemption {
                policy: None,
                reason,
            }],
            changes: Vec::new(),
            patch: json_patch::Patch(Vec::new()),
        }
    }
}

/// What each policy contributes, gathered before the patch is computed.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    denials: Vec<Denial>,
    warnings: Vec<String>,
    exemptions: Vec<Exemption>,
    changes: Vec<Change>,
}

impl Outcome {
    pub(crate) fn deny(&mut self, policy: Policy, message: String) {
        self.denials.push(Denial { policy, message });
    }
    pub(crate) fn exempt(&mut self, policy: Policy, reason: ExemptionReason) {
        self.exemptions.push(Exemption {
            policy: Some(policy),
            reason,
        });
    }
    pub(crate) fn changed(&mut self, policy: Policy, description: String) {
        self.changes.push(Change {
            policy,
            description,
        });
    }
}

/// Decides on one object.
///
/// # Errors
/// [`MalformedObject`] when a reviewed kind's pod template is missing or does not parse.
/// Callers turn it into a denial (webhook) or a parse error (offline review).
pub fn decide(config: &Config, req: &Request<'_>) -> Result<Decision, MalformedObject> {
    let kind = type_of(req.object);
    let Some(kind) = kind else {
        return Ok(Decision::untouched(None, ExemptionReason::UnsupportedKind));
    };
    if matches!(req.operation, Operation::Delete | Operation::Connect) {
        return Ok(Decision::untouched(Some(kind), ExemptionReason::Operation));
    }
    if config
        .exemptions
        .namespaces
        .iter()
        .any(|p| p.matches(req.namespace))
    {
        return Ok(Decision::untouched(Some(kind), ExemptionReason::Namespace));
    }
    let template = Template::read(kind, req.object)?;
    // Only pods are updated in place; a workload's template change rolls out new pods, which
    // are reviewed as new.
    let old = match (kind, req.operation, req.old_object) {
        (Kind::Pod, Operation::Update, Some(old)) => Some(Template::read(kind, old)?),
        _ => None,
    };

    let mut out = Outcome::default();
    // Policies mutate a copy of only the fields they may change, and the patch is the diff of
    // that copy: cloning and diffing the whole object would cost more than the decision.
    let before = scratch(req.object.pointer(kind.template_pointer()));
    let mut object = before.clone();
    let ctx = Context {
        config,
        req,
        template: &template,
        old: old.as_ref(),
    };

    // An audited policy's mutations go to a copy that is thrown away (made only when needed:
    // this is the admission hot path).
    let enforced = config.enforcement;
    let audits_mutations =
        enforced.runtime_class == Enforcement::Audit || enforced.isolation == Enforcement::Audit;
    let mut shadow = if audits_mutations {
        before.clone()
    } else {
        Value::Null
    };
    images::check(&ctx, &mut out);
    let placement = isolation::decide(&ctx, &mut out);
    runtime::apply(
        &ctx,
        placement.as_ref().and_then(|p| p.runtime.as_ref()),
        &mut out,
        if enforced.runtime_class == Enforcement::Audit {
            &mut shadow
        } else {
            &mut object
        },
    );
    if let Some(p) = &placement {
        let target = if enforced.isolation == Enforcement::Audit {
            &mut shadow
        } else {
            &mut object
        };
        isolation::apply(&ctx, p, &mut out, target);
    }

    let mut decision = Decision {
        kind: Some(kind),
        denials: Vec::new(),
        audited: Vec::new(),
        warnings: out.warnings,
        exemptions: out.exemptions,
        changes: Vec::new(),
        patch: json_patch::Patch(Vec::new()),
    };
    for denial in out.denials {
        if enforced.of(denial.policy) == Enforcement::Audit {
            decision
                .warnings
                .push(format!("audit: moat would deny: {}", denial.message));
            decision.audited.push(denial);
        } else {
            decision.denials.push(denial);
        }
    }
    for change in out.changes {
        if enforced.of(change.policy) == Enforcement::Audit {
            decision
                .warnings
                .push(format!("audit: moat would {}", change.description));
        } else {
            decision.changes.push(change);
        }
    }
    // Workload templates are decided, not patched: their pods are patched when created.
    let patched = kind == Kind::Pod;
    if req.stage == Stage::Validate && patched && !decision.changes.is_empty() {
        for change in std::mem::take(&mut decision.changes) {
            decision.denials.push(Denial {
                policy: change.policy,
                message: format!(
                    "moat's mutation is missing from the final object (was moat's mutating webhook skipped, or did a later webhook undo it?): {}",
                    change.description
                ),
            });
        }
    }
    // The patch is only ever returned for an allowed pod at the mutate stage; elsewhere the diff
    // would be computed to be thrown away.
    if decision.allowed() && req.stage == Stage::Mutate && patched {
        decision.patch = json_patch::diff(&before, &object);
    }
    Ok(decision)
}

/// The image rule alone, for kube-apiserver's ImagePolicyWebhook (`ImageReview`): what is wrong
/// with each image, as `(index, message)`, in order. Empty: all images pass. The caller applies
/// `enforcement.images`.
pub fn review_images<'a>(
    config: &Config,
    images: impl IntoIterator<Item = &'a str>,
) -> Vec<(usize, String)> {
    images
        .into_iter()
        .enumerate()
        .flat_map(|(i, raw)| {
            if raw.is_empty() {
                vec![(i, "has no image".to_owned())]
            } else {
                images::judge(&config.images, raw)
                    .into_iter()
                    .map(|m| (i, m))
                    .collect()
            }
        })
        .collect()
}

/// The kind of an object, from its `apiVersion` and `kind`.
pub fn type_of(object: &Value) -> Option<Kind> {
    let api_version = object.get("apiVersion")?.as_str()?;
    let kind = object.get("kind")?.as_str()?;
    Kind::from_type(api_version, kind)
}

/// Everything a policy reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context<'a> {
    pub(crate) config: &'a Config,
    pub(crate) req: &'a Request<'a>,
    pub(crate) template: &'a Template,
    /// The pod before an UPDATE.
    pub(crate) old: Option<&'a Template>,
}

impl Context<'_> {
    /// Message prefix naming a field of the template: `spec.template.spec.containers[0]`.
    pub(crate) fn field(&self, path: &str) -> String {
        format!("{}{path}", self.template.kind.field_prefix())
    }

    /// Whether this review applies CREATE-time rules (a new pod, or any workload change).
    pub(crate) fn is_new_pod_spec(&self) -> bool {
        self.old.is_none()
    }
}

/// The fields of a pod template that a policy may change, copied: `metadata.labels` and
/// `spec.{runtimeClassName, tolerations, affinity, nodeSelector}`, each only if present, so a diff
/// of the copy is a patch of the template.
fn scratch(template: Option<&Value>) -> Value {
    const SPEC_FIELDS: [&str; 4] = [
        "runtimeClassName",
        "tolerations",
        "affinity",
        "nodeSelector",
    ];
    let mut root = serde_json::Map::new();
    let Some(template) = template else {
        return Value::Object(root);
    };
    match template.get("metadata") {
        Some(Value::Object(meta)) => {
            let mut m = serde_json::Map::new();
            if let Some(labels) = meta.get("labels") {
                m.insert("labels".to_owned(), labels.clone());
            }
            root.insert("metadata".to_owned(), Value::Object(m));
        }
        Some(other) => {
            root.insert("metadata".to_owned(), other.clone());
        }
        None => {}
    }
    if let Some(Value::Object(spec)) = template.get("spec") {
        let mut s = serde_json::Map::new();
        for field in SPEC_FIELDS {
            if let Some(v) = spec.get(field) {
                s.insert(field.to_owned(), v.clone());
            }
        }
        root.insert("spec".to_owned(), Value::Object(s));
    }
    Value::Object(root)
}

/// `value[key]`, made an empty object when absent, null, or not an object.
pub(crate) fn entry<'v>(value: &'v mut Value, key: &str) -> &'v mut Value {
    if !value.is_object() {
        *value = Value::Object(serde_json::Map::new());
    }
    let slot = &mut value[key];
    if !slot.is_object() {
        *slot = Value::Object(serde_json::Map::new());
    }
    slot
}

/// `value[key]`, made an empty array when absent, null, or not an array.
pub(crate) fn array_entry<'v>(value: &'v mut Value, key: &str) -> &'v mut Value {
    if !value.is_object() {
        *value = Value::Object(serde_json::Map::new());
    }
    let slot = &mut value[key];
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    slot
}

/// Appends `item` to an array unless an equal one is there; returns whether it appended.
pub(crate) fn push_unique(array: &mut Value, item: Value) -> bool {
    match array {
        Value::Array(items) if !items.contains(&item) => {
            items.push(item);
            true
        }
        _ => false,
    }
}
