//! What a decision is about and what it says: the request the engine reads and the
//! [`Decision`] it returns. Plain types, no logic beyond accessors.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::subject::{Kind, Template};

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
    /// The object as sent (`request.object`), read by [`Template::from_value`] or
    /// [`Template::from_json`]; `None`: not a kind moat reviews.
    pub object: Option<&'a Template>,
    /// The object before the update (`request.oldObject`), on UPDATE.
    pub old_object: Option<&'a Template>,
    /// The request's namespace (a Pod on CREATE may not carry one itself).
    pub namespace: &'a str,
    /// The namespace's labels, when known. Unknown labels count as none.
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
    pub dry_run: bool,
    /// Who asks (`request.userInfo`); `None` offline, where no one does.
    pub requester: Option<Requester<'a>>,
    /// Stable per-object input that names a dedicated node (dedicatedNode mode).
    pub placement_seed: &'a str,
}

impl<'a> Request<'a> {
    /// A CREATE at the mutate stage that no one asks for: how `moat review` and the capacity
    /// tools decide objects offline, with no `userInfo` and no dry run.
    pub fn offline_create(
        object: Option<&'a Template>,
        namespace: &'a str,
        namespace_labels: Option<&'a BTreeMap<String, String>>,
        placement_seed: &'a str,
    ) -> Self {
        Self {
            operation: Operation::Create,
            stage: Stage::Mutate,
            object,
            old_object: None,
            namespace,
            namespace_labels,
            dry_run: false,
            requester: None,
            placement_seed,
        }
    }
}

/// Who asks, as the API server authenticated them (`request.userInfo`). Only the API server
/// writes it, so, unlike anything in the object, exemptions may rest on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requester<'a> {
    pub username: &'a str,
}

/// A policy, for messages and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    Images,
    RuntimeClass,
    Isolation,
    /// Identity facts for the node agent (always enforced).
    Identity,
}

impl Policy {
    /// Stable lower-case name (metric label value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Images => "images",
            Self::RuntimeClass => "runtimeClass",
            Self::Isolation => "isolation",
            Self::Identity => "identity",
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
    /// A workload UPDATE that leaves the pod template as it was (labels, scaling, finalizers):
    /// nothing it runs changes, so a policy tightened since cannot freeze it.
    UnchangedTemplate,
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
            Self::UnchangedTemplate => "unchangedTemplate",
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

/// Denials [`Decision::message`] spells out.
pub const MESSAGE_DENIALS: usize = 32;

impl Decision {
    /// Whether the object is admitted.
    pub fn allowed(&self) -> bool {
        self.denials.is_empty()
    }

    /// The denial messages in one line, `; `-separated (empty when allowed): the first
    /// [`MESSAGE_DENIALS`], then how many more. A tenant's pod of thousands of bad containers
    /// gets a message a person can read and an answer of bounded size.
    pub fn message(&self) -> String {
        let msgs: Vec<&str> = self
            .denials
            .iter()
            .take(MESSAGE_DENIALS)
            .map(|d| d.message.as_str())
            .collect();
        let mut message = msgs.join("; ");
        let more = self.denials.len().saturating_sub(MESSAGE_DENIALS);
        if more > 0 {
            message.push_str(&format!("; and {more} more"));
        }
        message
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

    pub(crate) fn untouched(kind: Option<Kind>, reason: ExemptionReason) -> Self {
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
