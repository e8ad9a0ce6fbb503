//! The engine: runs the policies in their declared order and applies, the same way for every
//! caller (mutating and validating webhooks, ImageReview, offline review), the exemptions, each
//! policy's enforcement (enforce or audit), the validate stage and the patch. Pure: no I/O, no
//! clock, no randomness.
//!
//! Each policy is a unit in [`crate::policy`] with a check step, which records reasons, and (for
//! the policies that change pods) a mutate step over [`PodFields`], the owned, typed copy of the
//! only fields moat may change. The patch is computed from that copy's before and after.

use crate::config::{Config, Enforcement, EnforcementModes};
use crate::decision::{
    Change, Decision, Denial, Exemption, ExemptionReason, Operation, Policy, Request, Stage,
};
use crate::fields::PodFields;
use crate::policy::{identity, images, isolation, runtime};
use crate::subject::{Kind, Template};
use crate::trust::ImageVerdicts;

/// Everything a policy reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context<'a> {
    pub(crate) config: &'a Config,
    pub(crate) req: &'a Request<'a>,
    pub(crate) template: &'a Template,
    /// The pod before an UPDATE.
    pub(crate) old: Option<&'a Template>,
    /// The registries' verdicts on the images (`images.trust`), when the caller resolved them.
    pub(crate) images: Option<&'a ImageVerdicts>,
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

/// What the policies found, before enforcement is applied.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    denials: Vec<Denial>,
    warnings: Vec<String>,
    exemptions: Vec<Exemption>,
    changes: Vec<Change>,
}

impl Findings {
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

/// The enforcement of one policy.
pub fn enforcement(modes: &EnforcementModes, policy: Policy) -> Enforcement {
    match policy {
        Policy::Images => modes.images,
        Policy::RuntimeClass => modes.runtime_class,
        Policy::Isolation => modes.isolation,
        // A stamp the node agent trusts must always be right; it denies nothing on CREATE.
        Policy::Identity => Enforcement::Enforce,
    }
}

/// Decides on one object.
///
/// The policies run in this order: images (check), isolation (check: the pod's class and its
/// placement), runtimeClass (check, reading the class's runtime), identity (check), then the
/// mutations of runtimeClass, isolation and identity. Mutations of a policy in audit mode go to
/// a copy that is thrown away and are reported as warnings.
pub fn decide(config: &Config, req: &Request<'_>) -> Decision {
    decide_with_images(config, req, None)
}

/// [`decide`] with what the registries said about the images [`images_to_resolve`] named, when
/// `images.trust` is configured and the caller resolved them (the server does; offline review
/// does not, and the decision says so in a warning): a refused image is denied with the
/// registry's reason, one not checked is denied, and a pod's images are pinned to the digests
/// that were verified.
pub fn decide_with_images(
    config: &Config,
    req: &Request<'_>,
    images: Option<&ImageVerdicts>,
) -> Decision {
    let Some(template) = req.object else {
        return Decision::untouched(None, ExemptionReason::UnsupportedKind);
    };
    let kind = template.kind;
    if matches!(req.operation, Operation::Delete | Operation::Connect) {
        return Decision::untouched(Some(kind), ExemptionReason::Operation);
    }
    if namespace_exempt(config, req.namespace) {
        return Decision::untouched(Some(kind), ExemptionReason::Namespace);
    }
    // Only pods are updated in place; a workload's template change rolls out new pods, which
    // are reviewed as new, and a workload UPDATE that leaves the template alone (labels, scale,
    // the garbage collector's finalizers) is not decided at all.
    let old = match (kind, req.operation) {
        (Kind::Pod, Operation::Update) => req.old_object,
        (_, Operation::Update) if req.old_object.is_some_and(|old| old == template) => {
            return Decision::untouched(Some(kind), ExemptionReason::UnchangedTemplate);
        }
        _ => None,
    };
    let ctx = Context {
        config,
        req,
        template,
        old,
        images,
    };

    let mut found = Findings::default();
    if config.images.trust.is_some() && images.is_none() {
        found.warnings.push(
            "images.trust is configured but this review called no registry: digests and signatures were not checked".to_owned(),
        );
    }
    let pins = images::check(&ctx, &mut found);
    let placement = isolation::check(&ctx, &mut found);
    let runtime = runtime::check(
        &ctx,
        placement.as_ref().and_then(|p| p.runtime()),
        &mut found,
    );
    let stamp = identity::check(&ctx, &mut found);

    let modes = &config.enforcement;
    let mut pod = template.fields.clone();
    // An audited policy's mutations go to a copy made only when needed (the admission hot path).
    let mut shadow: Option<PodFields> = None;
    if !pins.is_empty() {
        let pod = target(modes, Policy::Images, template, &mut pod, &mut shadow);
        images::mutate(pins, pod, &mut found);
    }
    if let Some(r) = &runtime {
        let pod = target(modes, Policy::RuntimeClass, template, &mut pod, &mut shadow);
        runtime::mutate(&ctx, r, pod, &mut found);
    }
    if let Some(p) = &placement {
        let pod = target(modes, Policy::Isolation, template, &mut pod, &mut shadow);
        isolation::mutate(&ctx, p, pod, &mut found);
    }
    if let Some(s) = stamp {
        identity::mutate(&ctx, s, &mut pod, &mut found);
    }

    let mut decision = enforce(modes, Some(kind), found);
    // Workload templates are decided, not patched: their pods are patched when created.
    let patched = kind == Kind::Pod;
    if req.stage == Stage::Validate && patched {
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
    if decision.allowed() && req.stage == Stage::Mutate && patched {
        decision.patch = template.fields.patch_to(&pod, template.has_metadata);
    }
    decision
}

/// The image references a review of `req` must have resolved at their registries before
/// [`decide`] (when `images.trust` is configured; empty otherwise, and for requests [`decide`]
/// does not look into: deletions, exempt namespaces, workload updates that leave the template
/// alone). Each reference once; images an UPDATE leaves alone are not decided again. The caller
/// asks only about references that parse.
pub fn images_to_resolve<'a>(config: &Config, req: &Request<'a>) -> Vec<&'a str> {
    let Some(template) = req.object else {
        return Vec::new();
    };
    if config.images.trust.is_none()
        || matches!(req.operation, Operation::Delete | Operation::Connect)
        || namespace_exempt(config, req.namespace)
    {
        return Vec::new();
    }
    let old = match (template.kind, req.operation) {
        (Kind::Pod, Operation::Update) => req.old_object,
        (_, Operation::Update) if req.old_object.is_some_and(|old| old == template) => {
            return Vec::new();
        }
        _ => None,
    };
    images::to_resolve(template, old)
}

/// The image references an ImageReview in `namespace` must have resolved before
/// [`review_images_verified`]: each once (the caller asks only about those that parse); none in
/// an exempt namespace or without `images.trust`.
pub fn image_review_to_resolve<'a>(
    config: &Config,
    namespace: &str,
    images: impl IntoIterator<Item = &'a str>,
) -> Vec<&'a str> {
    if config.images.trust.is_none() || namespace_exempt(config, namespace) {
        return Vec::new();
    }
    images::unique(images.into_iter())
}

/// The image rule alone, for kube-apiserver's ImagePolicyWebhook (`ImageReview`), with the same
/// namespace exemptions and enforcement as admission. Denials name `spec.containers[i]`.
pub fn review_images<'a>(
    config: &Config,
    namespace: &str,
    images: impl IntoIterator<Item = &'a str>,
) -> Decision {
    review_images_verified(config, namespace, images, None)
}

/// [`review_images`] with the registries' verdicts on the images (`images.trust`): a refused
/// image is denied, one not checked is denied. ImageReview cannot rewrite, so nothing is pinned.
pub fn review_images_verified<'a>(
    config: &Config,
    namespace: &str,
    images: impl IntoIterator<Item = &'a str>,
    verdicts: Option<&ImageVerdicts>,
) -> Decision {
    if namespace_exempt(config, namespace) {
        return Decision::untouched(None, ExemptionReason::Namespace);
    }
    let mut found = Findings::default();
    for (i, raw) in images.into_iter().enumerate() {
        if raw.is_empty() {
            found.deny(
                Policy::Images,
                format!("spec.containers[{i}]: has no image"),
            );
            continue;
        }
        let (parsed, problems) = images::judge(&config.images, raw, verdicts);
        for problem in problems {
            found.deny(Policy::Images, format!("spec.containers[{i}]: {problem}"));
        }
        if let Some(verdicts) = verdicts.filter(|_| parsed) {
            match verdicts.get(raw) {
                Some(crate::trust::ImageVerdict::Admitted { .. }) => {}
                Some(crate::trust::ImageVerdict::Refused(why)) => found.deny(
                    Policy::Images,
                    format!("spec.containers[{i}]: image '{raw}': {why}"),
                ),
                None => found.deny(
                    Policy::Images,
                    format!("spec.containers[{i}]: image '{raw}' was not checked at its registry"),
                ),
            }
        }
    }
    enforce(&config.enforcement, None, found)
}

/// Where a policy's mutations go: the pod's fields, or the audit copy.
fn target<'a>(
    modes: &EnforcementModes,
    policy: Policy,
    template: &Template,
    pod: &'a mut PodFields,
    shadow: &'a mut Option<PodFields>,
) -> &'a mut PodFields {
    if enforcement(modes, policy) == Enforcement::Audit {
        shadow.get_or_insert_with(|| template.fields.clone())
    } else {
        pod
    }
}

fn namespace_exempt(config: &Config, namespace: &str) -> bool {
    config
        .exemptions
        .namespaces
        .iter()
        .any(|p| p.matches(namespace))
}

/// Sorts findings by enforcement: an audited policy's denials and changes become warnings.
fn enforce(modes: &EnforcementModes, kind: Option<Kind>, found: Findings) -> Decision {
    let mut decision = Decision {
        kind,
        denials: Vec::new(),
        audited: Vec::new(),
        warnings: found.warnings,
        exemptions: found.exemptions,
        changes: Vec::new(),
        patch: json_patch::Patch(Vec::new()),
    };
    for denial in found.denials {
        if enforcement(modes, denial.policy) == Enforcement::Audit {
            decision
                .warnings
                .push(format!("audit: moat would deny: {}", denial.message));
            decision.audited.push(denial);
        } else {
            decision.denials.push(denial);
        }
    }
    for change in found.changes {
        if enforcement(modes, change.policy) == Enforcement::Audit {
            decision
                .warnings
                .push(format!("audit: moat would {}", change.description));
        } else {
            decision.changes.push(change);
        }
    }
    decision
}
