//! moat's node identity agent: a containerd NRI plugin that gives every annotated container its
//! SPIFFE X.509 SVID, on disk before the container's first instruction runs, with no sidecar.
//!
//! The data path, in module order: [`mux`] splits the NRI socket into its two connections,
//! [`ttrpc`] carries calls over them, [`plugin`] registers with the runtime and converts its
//! calls (typed by code generated from NRI's service definitions, see [`proto`]) for
//! [`agent`], which reads [`annotations`], mounts a per-container directory, and on
//! StartContainer asks the SPIRE agent ([`spire`]) for the SVID of the container's PID and
//! publishes it with [`files`]. [`metrics`] counts what happens and [`metrics_server`] serves
//! it; [`defaults`] holds every default path and port.

pub mod agent;
pub mod annotations;
pub mod attest;
mod backoff;
pub mod defaults;
#[cfg(feature = "doubles")]
pub mod doubles;
pub mod evict;
pub mod files;
pub mod metrics;
pub mod metrics_server;
pub mod mux;
pub mod owner;
pub mod plugin;
pub mod proto;
pub mod spiffe;
pub mod spire;
pub mod ttrpc;

/// Locks `m`, ignoring poisoning: every critical section in this crate leaves its data
/// consistent, and a panic elsewhere must not stop the agent from answering the runtime.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Aborts its tasks when dropped, so helpers end with whatever owns them.
pub(crate) struct AbortOnDrop(pub(crate) Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
