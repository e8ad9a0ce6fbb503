//! moat's admission server: the policy core behind HTTPS.
//!
//! [`router`] is the whole HTTP surface and can be driven without a socket; [`server::Server`]
//! adds TLS, limits, reloads and graceful shutdown around it.

pub mod admission;
pub mod certs;
pub mod limits;
pub mod metrics;
pub mod namespaces;
pub mod server;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use moat_core::config::Config;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use crate::admission::error_response;
use crate::limits::{MAX_CONCURRENT_REQUESTS, QUEUE_TIMEOUT, REQUEST_TIMEOUT};
use crate::metrics::Metrics;
use crate::namespaces::NamespaceCache;

/// What every request reads: the current configuration (swapped on reload), the namespace
/// cache, metrics, and the request slots.
#[derive(Debug)]
pub struct AppState {
    config: RwLock<Arc<Config>>,
    namespaces: Option<NamespaceCache>,
    pub metrics: Metrics,
    slots: Semaphore,
    tls_ready: AtomicBool,
}

impl AppState {
    /// State for `config`. `namespaces` must be given when [`namespaces::needed`] says so.
    pub fn new(
        config: Config,
        namespaces: Option<NamespaceCache>,
        registry: &mut Registry,
    ) -> Self {
        Self {
            config: RwLock::new(Arc::new(config)),
            namespaces,
            metrics: Metrics::register(registry),
            slots: Semaphore::new(MAX_CONCURRENT_REQUESTS),
            tls_ready: AtomicBool::new(false),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the configuration. Refused when the new one reads namespace labels and no
    /// namespace cache runs (that needs a restart with API access).
    ///
    /// # Errors
    /// A message saying why the configuration cannot take effect.
    pub fn set_config(&self, config: Config) -> Result<(), String> {
        if namespaces::needed(&config) && self.namespaces.is_none() {
            return Err("the new configuration reads namespace labels, which needs a restart to start the namespace cache".to_owned());
        }
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }

    /// Marks the TLS material as loaded.
    pub fn set_tls_ready(&self) {
        self.tls_ready.store(true, Ordering::Release);
    }

    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces.as_ref()?.labels(namespace)
    }

    /// What keeps the server from being ready, if anything.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.tls_ready.load(Ordering::Acquire) {
            Some("TLS material is not loaded")
        } else if self.namespaces.as_ref().is_some_and(|n| !n.synced()) {
            Some("namespace cache has not synced")
        } else {
            None
        }
    }

    fn in_flight(&self) -> InFlight<'_> {
        self.metrics.in_flight.inc();
        InFlight(self)
    }
}

/// Decrements the in-flight gauge when a review ends, however it ends.
struct InFlight<'a>(&'a AppState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.metrics.in_flight.dec();
    }
}

/// The HTTP surface: admission endpoints behind the request slots and the request timeout,
/// health and readiness beside them.
pub fn router(state: Arc<AppState>) -> Router {
    let reviews = Router::new()
        .route("/mutate", post(admission::mutate))
        .route("/validate", post(admission::validate))
        .route("/imagereview", post(admission::imagereview))
        .route_layer(middleware::from_fn_with_state(state.clone(), limit));
    Router::new()
        .merge(reviews)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "no such endpoint".to_owned()) })
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.not_ready() {
        None => "ok".into_response(),
        Some(why) => error_response(StatusCode::SERVICE_UNAVAILABLE, why.to_owned()),
    }
}

/// Bounds concurrent reviews and the time each may take.
async fn limit(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Ok(Ok(_permit)) = tokio::time::timeout(QUEUE_TIMEOUT, state.slots.acquire()).await else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many reviews in progress".to_owned(),
        );
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "review timed out".to_owned(),
        ),
    }
}

/// The metrics endpoint's router (served on its own plain-HTTP port).
pub fn metrics_router(registry: Arc<Registry>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &registry) {
                    Ok(()) => (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(_) => error_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "could not encode metrics".to_owned(),
                    ),
                }
            }
        }),
    )
}
