//! What turns moat's typed configuration into Kubernetes objects: typed configuration in, typed
//! objects out, no I/O. [`install`]: every manifest `moat install` prints. [`capacity`]: node
//! pools, Karpenter NodePools, warm pools and the capacity report's counts. [`backstop`]:
//! ValidatingAdmissionPolicies the API server evaluates itself, compiled from the same
//! [`moat_core::config::Config`] the webhook decides with, so moat's rules hold even while moat
//! cannot answer.
//!
//! The caller (the `moat` command) parses arguments into plain option structs, reads and writes
//! files, generates keys and prints; this crate returns objects, file contents and warnings.
//!
//! No dependency on `moat-server`: what the manifests take from the server (webhook timeout,
//! termination grace, memory limit, whether it watches namespaces, the rotation Lease's name)
//! comes in through [`install::ServerFacts`], filled by the caller from `moat_server`'s own
//! constants, and the serving certificate through [`install::Tls`]. Depending on the server for
//! a few numbers would pull its runtime, HTTP and TLS stacks into a crate that does no I/O.
//! Likewise the identity agent's fixed paths and port come from `moat_identity::defaults`
//! through [`install::IdentityAgentOptions`].

pub mod backstop;
pub mod capacity;
pub mod cel;
pub mod install;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Converts `v` through `T` and back; refuses it if anything changed (an unknown or misspelt
/// field, a wrong type).
///
/// # Errors
/// The object's `kind` and what did not convert.
pub fn typed<T: DeserializeOwned + Serialize>(v: Value) -> Result<Value, String> {
    let kind = v["kind"].as_str().unwrap_or_default().to_owned();
    let t: T = serde_json::from_value(v.clone()).map_err(|e| format!("{kind}: {e}"))?;
    let back = serde_json::to_value(&t).map_err(|e| format!("{kind}: {e}"))?;
    if back != v {
        return Err(format!(
            "{kind}: object does not round-trip through its Kubernetes type"
        ));
    }
    Ok(back)
}
