//! moat's policy core: pure decisions on Pods and workload pod templates.
//!
//! No I/O, no async, no clock: every other part of moat (the admission server, offline review,
//! the installer) calls [`engine::decide`] and nothing else decides. The request path is: read
//! the object into a typed [`subject::Template`] → [`engine::decide`] runs the
//! [`policy`] units → a [`decision::Decision`] with reasons and a patch computed from the typed
//! before and after of [`fields::PodFields`].
//!
//! ```
//! use moat_core::config::Config;
//! use moat_core::decision::{Operation, Request, Stage};
//! use moat_core::engine::decide;
//! use moat_core::subject::Template;
//!
//! let config = Config::embedded_default();
//! let pod = serde_json::json!({
//!     "apiVersion": "v1", "kind": "Pod",
//!     "metadata": {"name": "web", "namespace": "shop"},
//!     "spec": {"containers": [{"name": "app", "image": "nginx"}]},
//! });
//! let template = Template::from_value(&pod).unwrap();
//! let req = Request {
//!     operation: Operation::Create, stage: Stage::Mutate, object: template.as_ref(),
//!     old_object: None, namespace: "shop", namespace_labels: None, dry_run: false,
//!     requester: None,
//!     placement_seed: "",
//! };
//! let decision = decide(&config, &req);
//! assert!(!decision.allowed());
//! assert!(decision.message().contains("has no tag"));
//! ```

pub mod config;
pub mod decision;
pub mod dedicated;
pub mod engine;
pub mod fields;
pub mod image;
pub mod json;
pub mod names;
pub mod nesting;
pub(crate) mod policy;
pub mod resources;
pub mod subject;
pub mod trust;
