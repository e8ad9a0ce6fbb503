//! Why a registry lookup failed: each a denial naming the registry, never a server error.

use prometheus_client::encoding::EncodeLabelValue;

/// A failed registry call. The message names what failed and why, never a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// No connection (refused, no route, name not found, TLS refused).
    #[error("registry {registry} is unreachable: {reason}")]
    Unreachable { registry: String, reason: String },
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
    timeout,
    status,
    not_found,
    auth,
    too_large,
    garbage,
    /// Not asked: the namespace already had as many reviews waiting on registries as it may.
    namespace_busy,
}

impl RegistryError {
    /// The kind, for metrics.
    pub fn reason(&self) -> FailureReason {
        match self {
            Self::Unreachable { .. } => FailureReason::unreachable,
            Self::Timeout { .. } => FailureReason::timeout,
            Self::Status { .. } => FailureReason::status,
            Self::NotFound { .. } => FailureReason::not_found,
            Self::Auth { .. } => FailureReason::auth,
            Self::TooLarge { .. } => FailureReason::too_large,
            Self::Garbage { .. } => FailureReason::garbage,
        }
    }
}
