//! Why a registry lookup failed: each a denial naming the registry, never a server error.
//!
//! What a denial says is written for the tenant, who may name any host under `unmatched: pin`
//! and read the answer: it says what kind of failure it was ("unreachable", "certificate not
//! trusted"), never the connection error or the peer's certificate names, which would make
//! moat a probe of the network it sits in. The detail goes to the log ([`RegistryError::detail`])
//! and the reason to the metrics.

use prometheus_client::encoding::EncodeLabelValue;

/// A failed registry call. The message names what failed and why, never a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// No connection (refused, no route, name not found, TLS refused, the connection broke).
    /// `detail` is for the log only.
    #[error("registry {registry} is unreachable")]
    Unreachable { registry: String, detail: String },
    /// The registry's TLS certificate does not verify with the trusted roots. `detail` is for
    /// the log only.
    #[error("registry {registry}'s certificate is not trusted")]
    Untrusted { registry: String, detail: String },
    /// The deadline passed first.
    #[error("registry {registry} did not answer within {budget_ms} ms")]
    Timeout { registry: String, budget_ms: u128 },
    /// An HTTP status moat cannot use.
    #[error("registry {registry} answered HTTP {status} for {what}")]
    Status {
        registry: String,
        status: u16,
        what: String,
    },
    /// The tag or manifest does not exist.
    #[error("registry {registry} has no {what}")]
    NotFound { registry: String, what: String },
    /// Credentials missing or refused.
    #[error("registry {registry} refused access to {what}: {reason}")]
    Auth {
        registry: String,
        what: String,
        reason: String,
    },
    /// A body larger than moat reads.
    #[error("registry {registry} sent more than {limit} bytes for {what}")]
    TooLarge {
        registry: String,
        what: String,
        limit: usize,
    },
    /// A body or header that is not what the protocol says.
    #[error("registry {registry} sent an unusable answer for {what}: {reason}")]
    Garbage {
        registry: String,
        what: String,
        reason: String,
    },
}

/// [`RegistryError`]'s kind, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types, reason = "metric label values")]
pub enum FailureReason {
    unreachable,
    certificate,
    timeout,
    status,
    not_found,
    auth,
    too_large,
    garbage,
    /// Not asked: the namespace already had as many lookups waiting on registries as it may.
    namespace_busy,
    /// Not asked: every namespace together had as many lookups waiting as moat holds.
    busy,
}

impl RegistryError {
    /// The kind, for metrics.
    pub fn reason(&self) -> FailureReason {
        match self {
            Self::Unreachable { .. } => FailureReason::unreachable,
            Self::Untrusted { .. } => FailureReason::certificate,
            Self::Timeout { .. } => FailureReason::timeout,
            Self::Status { .. } => FailureReason::status,
            Self::NotFound { .. } => FailureReason::not_found,
            Self::Auth { .. } => FailureReason::auth,
            Self::TooLarge { .. } => FailureReason::too_large,
            Self::Garbage { .. } => FailureReason::garbage,
        }
    }

    /// What the log says beside the denial: the cause the denial leaves out, when there is one.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Unreachable { detail, .. } | Self::Untrusted { detail, .. } => Some(detail),
            _ => None,
        }
    }

    /// Whether a lookup that failed so may be answered again from the cache for a short while
    /// ([`crate::limits::FAILURE_TTL`]): what the registry said or did, not a refusal of
    /// moat's credentials (which a credentials reload may fix at once) nor moat's own deadline.
    pub fn is_cacheable(&self) -> bool {
        !matches!(self, Self::Auth { .. } | Self::Timeout { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_never_quotes_the_connection_error() {
        let cases = [
            RegistryError::Unreachable {
                registry: "10.0.0.7:6443".into(),
                detail: "Connection refused (os error 111)".into(),
            },
            RegistryError::Untrusted {
                registry: "10.0.0.7:6443".into(),
                detail: "invalid peer certificate: NotValidForName: kubernetes.default.svc".into(),
            },
        ];
        for e in cases {
            let shown = e.to_string();
            let detail = e.detail().unwrap();
            assert!(!shown.contains(detail), "{shown}");
            assert!(
                !shown.contains("kubernetes") && !shown.contains("refused"),
                "{shown}"
            );
        }
    }
}
