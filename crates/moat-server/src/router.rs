//! The HTTP surface: admission endpoints (each bounded by the request budget and slots), health and readiness beside
//! them; and the metrics endpoint, served on its own port.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::registry::Registry;

use crate::admission;
use crate::codec::error_body;
use crate::state::AppState;

/// An HTTP error answer of moat's JSON shape.
pub fn error_response(status: StatusCode, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        error_body(status, message),
    )
        .into_response()
}

/// The HTTP surface: admission endpoints (bounded by the request budget, the decision slots and
/// the body timeout, see [`crate::admission`]),
/// health and readiness beside them.
pub fn router(state: Arc<AppState>) -> Router {
    let reviews = Router::new()
        .route("/mutate", post(admission::mutate))
        .route("/validate", post(admission::validate))
        .route("/imagereview", post(admission::imagereview));
    Router::new()
        .merge(reviews)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "no such endpoint".to_owned()) })
        .with_state(state)
}

/// What a client without a certificate gets when reviews need one: health and readiness only.
pub fn health_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            error_response(
                StatusCode::FORBIDDEN,
                "a client certificate signed by the configured client CA is required".to_owned(),
            )
        })
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.not_ready() {
        None => "ok".into_response(),
        Some(why) => error_response(StatusCode::SERVICE_UNAVAILABLE, why.to_owned()),
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
                            header::CONTENT_TYPE,
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
