//! What turns moat's typed configuration into Kubernetes objects: typed configuration in, typed
//! objects out, no I/O. Today the [`backstop`]: ValidatingAdmissionPolicies the API server
//! evaluates itself, compiled from the same [`moat_core::config::Config`] the webhook decides
//! with, so moat's rules hold even while moat cannot answer.

pub mod backstop;
pub mod cel;
