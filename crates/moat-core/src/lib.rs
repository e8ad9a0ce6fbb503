//! moat's policy core: pure decisions on Pods and workload pod templates.
//!
//! No I/O, no async, no clock: every other part of moat (the admission server, offline review,
//! the installer) calls [`policy::decide`] and nothing else decides.
//!
//! ```
//! use moat_core::config::Config;
//! use moat_core::policy::{decide, Operation, Request, Stage};
//!
//! let config = Config::embedded_default();
//! let pod = serde_json::json!({
//!     "apiVersion": "v1", "kind": "Pod",
//!     "metadata": {"name": "web", "namespace": "shop"},
//!     "spec": {"containers": [{"name": "app", "image": "nginx"}]},
//! });
//! let req = Request {
//!     operation: Operation::Create, stage: Stage::Mutate, object: &pod, old_object: None,
//!     namespace: "shop", namespace_labels: None, dry_run: false, placement_seed: "",
//! };
//! let decision = decide(&config, &req).unwrap();
//! assert!(!decision.allowed());
//! assert!(decision.message().contains("has no tag"));
//! ```

pub mod config;
pub mod image;
pub mod names;
pub mod policy;
pub mod subject;
