//! moat's node identity agent: a containerd NRI plugin that gives every annotated container its
//! SPIFFE X.509 SVID, on disk before the container's first instruction runs, with no sidecar.
//!
//! The data path, in module order: [`mux`] splits the NRI socket into its two connections,
//! [`ttrpc`] carries calls over them, [`plugin`] registers with the runtime and dispatches its
//! calls to [`agent`], which reads [`annotations`], mounts a per-container directory, and on
//! StartContainer asks the SPIRE agent ([`spire`]) for the SVID of the container's PID and
//! publishes it with [`files`]. [`metrics`] counts what happens.

pub mod agent;
pub mod annotations;
#[cfg(feature = "doubles")]
pub mod doubles;
pub mod files;
pub mod metrics;
pub mod mux;
pub mod plugin;
pub mod proto;
pub mod spiffe;
pub mod spire;
pub mod ttrpc;
