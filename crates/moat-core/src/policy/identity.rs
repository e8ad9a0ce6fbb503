//! Identity facts for the node agent: moat stamps each pod with its service account in an
//! annotation (`identity.serviceAccountAnnotation`), because the node agent learns a pod's
//! annotations from the runtime but not its spec. The annotation is worth trusting only because
//! moat owns it: it is set from `spec.serviceAccountName` at creation (whatever the pod wrote
//! there), the validating webhook refuses a final pod where the two differ, and an UPDATE may not
//! change it. The service account itself is immutable on a pod and checked by the API server
//! (it must exist in the pod's namespace).

use crate::decision::Policy;
use crate::engine::{Context, Findings};
use crate::fields::PodFields;

/// The service account a pod runs as when it names none.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// What the annotation must say: `Some((key, service account))` when the stamp is on.
pub(crate) fn check<'a>(ctx: &Context<'a>, out: &mut Findings) -> Option<(&'a str, &'a str)> {
    let key = ctx
        .config
        .identity
        .service_account_annotation
        .as_ref()?
        .as_str();
    if let Some(old) = ctx.old {
        let (before, after) = (old.annotation(key), ctx.template.annotation(key));
        if before != after {
            out.deny(
                Policy::Identity,
                format!(
                    "metadata.annotations['{key}']: set by moat from the pod's service account; it cannot change on a running pod"
                ),
            );
        }
        return None;
    }
    let account = ctx
        .template
        .spec
        .service_account_name
        .as_deref()
        .filter(|a| !a.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
    Some((key, account))
}

/// Sets the annotation (over whatever the pod wrote there).
pub(crate) fn mutate(
    ctx: &Context<'_>,
    (key, account): (&str, &str),
    pod: &mut PodFields,
    out: &mut Findings,
) {
    let annotations = pod.annotations_mut();
    if annotations.get(key).map(String::as_str) != Some(account) {
        annotations.insert(key.to_owned(), account.to_owned());
        out.changed(
            Policy::Identity,
            format!(
                "set annotation {key}={account} (the {}pod's service account, for the node identity agent)",
                if ctx.template.kind == crate::subject::Kind::Pod { "" } else { "template's " }
            ),
        );
    }
}
