//! moat's admission server: the policy core behind HTTPS.
//!
//! The request path: [`router`] (endpoints, request slots) → [`admission`] (bytes →
//! [`codec`] → [`moat_core::engine`] → [`codec`] → bytes). [`router::router`] is the whole HTTP
//! surface and can be driven without a socket; [`server::Server`] adds TLS, limits, reloads and
//! graceful shutdown around it.

pub mod admission;
pub mod certs;
pub mod codec;
pub mod limits;
pub mod metrics;
pub mod namespaces;
pub mod rotation;
pub mod router;
pub mod server;
pub mod state;
pub mod tls;

pub use router::{metrics_router, router};
pub use state::AppState;
