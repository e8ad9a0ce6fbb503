//! RuntimeClass: the decision table of shared/DESIGN.md, then the isolation class's own runtime.
//!
//! | R | result |
//! |---|---|
//! | set and reserved, fallback set | rewrite R to the fallback |
//! | set and reserved, no fallback | deny: runtime 'R' is reserved |
//! | set and not reserved | allow unchanged |
//! | unset, fallback set | set R to the fallback |
//! | unset, no fallback, defaultRuntimeReserved | deny: usage of the default runtime is reserved |
//! | unset, otherwise | allow |
//!
//! An isolation class tied to runtime C sets C on pods that leave R unset, and denies any other
//! final R.

use crate::config::RuntimeClassPolicy;
use crate::decision::Policy;
use crate::engine::{Context, Findings};
use crate::fields::PodFields;
use crate::names::RuntimeClassName;

/// What the table says for R.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict<'a> {
    Allow,
    Set(&'a RuntimeClassName),
    Deny(String),
}

/// The decision table, alone.
pub(crate) fn table<'a>(policy: &'a RuntimeClassPolicy, requested: Option<&str>) -> Verdict<'a> {
    match (requested, &policy.fallback_runtime) {
        (Some(r), fallback) if policy.reserved_runtimes.iter().any(|x| x.as_str() == r) => {
            match fallback {
                Some(f) => Verdict::Set(f),
                None => Verdict::Deny(format!("runtime '{r}' is reserved")),
            }
        }
        (Some(_), _) => Verdict::Allow,
        (None, Some(f)) => Verdict::Set(f),
        (None, None) if policy.default_runtime_reserved => {
            Verdict::Deny("usage of the default runtime is reserved".to_owned())
        }
        (None, None) => Verdict::Allow,
    }
}

/// What the runtimeClass policy will set, decided by [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rewrite {
    to: RuntimeClassName,
    /// The reserved runtime the pod asked for, for the description.
    from: Option<String>,
}

/// Applies the table (and the class's runtime) to a new pod spec; `Some` when
/// `runtimeClassName` must be set.
pub(crate) fn check(
    ctx: &Context<'_>,
    class_runtime: Option<(&str, &RuntimeClassName)>,
    out: &mut Findings,
) -> Option<Rewrite> {
    // runtimeClassName is immutable on a pod: only new pod specs are decided.
    if !ctx.is_new_pod_spec() {
        return None;
    }
    let requested = ctx
        .template
        .fields
        .runtime_class_name
        .as_deref()
        .filter(|r| !r.is_empty());
    let field = ctx.field("spec.runtimeClassName");
    let target = match (requested, class_runtime) {
        // The class chooses for pods that do not.
        (None, Some((_, c))) => Some(c),
        _ => match table(&ctx.config.runtime_class, requested) {
            Verdict::Allow => None,
            Verdict::Set(f) => Some(f),
            Verdict::Deny(msg) => {
                out.deny(Policy::RuntimeClass, format!("{field}: {msg}"));
                return None;
            }
        },
    };
    let effective = target.map(RuntimeClassName::as_str).or(requested);
    if let Some((class, c)) = class_runtime
        && effective != Some(c.as_str())
    {
        out.deny(
            Policy::RuntimeClass,
            format!(
                "{field}: isolation class '{class}' runs with RuntimeClass '{c}', but the pod asks for '{}'",
                requested.unwrap_or_default()
            ),
        );
        return None;
    }
    target
        .filter(|t| requested != Some(t.as_str()))
        .map(|t| Rewrite {
            to: t.clone(),
            from: requested.map(str::to_owned),
        })
}

/// Sets `runtimeClassName`.
pub(crate) fn mutate(ctx: &Context<'_>, r: &Rewrite, pod: &mut PodFields, out: &mut Findings) {
    pod.runtime_class_name = Some(r.to.to_string());
    let field = ctx.field("spec.runtimeClassName");
    let t = &r.to;
    let why = match &r.from {
        Some(from) => format!("set {field} to '{t}' (runtime '{from}' is reserved)"),
        None => format!("set {field} to '{t}'"),
    };
    out.changed(Policy::RuntimeClass, why);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(
        reserved: &[&str],
        fallback: Option<&str>,
        default_reserved: bool,
    ) -> RuntimeClassPolicy {
        RuntimeClassPolicy {
            reserved_runtimes: reserved.iter().map(|r| r.parse().unwrap()).collect(),
            fallback_runtime: fallback.map(|f| f.parse().unwrap()),
            default_runtime_reserved: default_reserved,
        }
    }

    /// Every row of the table, and the cases of the original policy's own test suite.
    #[test]
    fn follows_the_decision_table() {
        struct Case {
            name: &'static str,
            reserved: &'static [&'static str],
            fallback: Option<&'static str>,
            default_reserved: bool,
            requested: Option<&'static str>,
            want: Result<Option<&'static str>, &'static str>,
        }
        let cases = [
            Case {
                name: "reserved with fallback is rewritten",
                reserved: &["runc"],
                fallback: Some("gvisor"),
                default_reserved: false,
                requested: Some("runc"),
                want: Ok(Some("gvisor")),
            },
            Case {
                name: "reserved without fallback is denied",
                reserved: &["runc"],
                fallback: None,
                default_reserved: false,
                requested: Some("runc"),
                want: Err("runtime 'runc' is reserved"),
            },
            Case {
                name: "reserved without fallback is denied even if default reserved",
                reserved: &["runc"],
                fallback: None,
                default_reserved: true,
                requested: Some("runc"),
                want: Err("runtime 'runc' is reserved"),
            },
            Case {
                name: "explicit non-reserved runtime is kept",
                reserved: &["runc"],
                fallback: Some("gvisor"),
                default_reserved: true,
                requested: Some("kata"),
                want: Ok(None),
            },
            Case {
                name: "explicit runtime with no reservations is kept",
                reserved: &[],
                fallback: None,
                default_reserved: false,
                requested: Some("kata"),
                want: Ok(None),
            },
            Case {
                name: "unset with fallback gets the fallback",
                reserved: &["runc"],
                fallback: Some("gvisor"),
                default_reserved: false,
                requested: None,
                want: Ok(Some("gvisor")),
            },
            Case {
                name: "unset with fallback and default reserved gets the fallback",
                reserved: &[],
                fallback: Some("gvisor"),
                default_reserved: true,
                requested: None,
                want: Ok(Some("gvisor")),
            },
            Case {
                name: "unset with default reserved and no fallback is denied",
                reserved: &["runc"],
                fallback: None,
                default_reserved: true,
                requested: None,
                want: Err("usage of the default runtime is reserved"),
            },
            Case {
                name: "unset otherwise is allowed",
                reserved: &["runc"],
                fallback: None,
                default_reserved: false,
                requested: None,
                want: Ok(None),
            },
            Case {
                name: "names match exactly",
                reserved: &["runc"],
                fallback: None,
                default_reserved: false,
                requested: Some("runc-v2"),
                want: Ok(None),
            },
        ];
        for c in cases {
            let p = policy(c.reserved, c.fallback, c.default_reserved);
            let got = match table(&p, c.requested) {
                Verdict::Allow => Ok(None),
                Verdict::Set(r) => Ok(Some(r.as_str())),
                Verdict::Deny(m) => Err(m),
            };
            let want = c.want.map_err(str::to_owned);
            assert_eq!(got, want, "{}", c.name);
        }
    }
}
