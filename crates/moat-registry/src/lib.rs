//! moat's registry client: every image a pod pulls resolved to the digest its registry serves,
//! and its cosign signature verified against the operator's keys, through one cache shared by
//! every endpoint. See `docs/policies.md` ("Image trust") for the behaviour and
//! `docs/server.md` for the figures.
//!
//! Why an in-house client and not `oci-client`/`sigstore`: moat needs four GETs of the
//! distribution API (a manifest by tag, the `sha256-<hex>.sig` manifest, a blob, a token), the
//! two `WWW-Authenticate` schemes, and one signature check per key with `ring`, which the tree
//! already builds. Those crates bring their own HTTP client (reqwest) and, for `sigstore`, a
//! second crypto stack and TUF/OIDC machinery that keyed verification does not use; here the
//! client is the hyper/rustls stack kube already compiles, so this crate adds no dependency
//! to the build, and every bound (body sizes, redirects, tokens, deadline) is moat's own.
//!
//! ```text
//! Resolver::check(images, deadline)
//!   per image, all at once, each within the deadline:
//!     tag → digest     cache ─miss→ flight (one per key) → GET /v2/<repo>/manifests/<tag>
//!     digest → verdict cache ─miss→ flight → GET …/manifests/sha256-<hex>.sig
//!                                           → GET …/blobs/<payload> (per signature, at once)
//!                                           → ring verify per key → claims name this digest
//! ```

pub mod auth;
pub mod cache;
pub mod client;
pub mod cosign;
pub mod digest;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod resolver;
pub mod slots;
mod tokens;

pub use client::SetupError;
pub use digest::Digest;
pub use error::RegistryError;
pub use resolver::{Admitted, Image, Resolver, Verdict};
