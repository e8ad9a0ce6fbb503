//! The agent's own plain-HTTP endpoint: `GET /metrics` (OpenMetrics text from the registry the
//! agent's instruments are in) and `GET /healthz` (the liveness probe). Nothing else: the
//! webhook's server is not involved, so the node agent does not depend on it. Served through
//! `moat_listen::plain`, with the review port's kind of bounds ([`METRICS_LIMITS`]): an agent
//! knocked over by a flood of scrapes would be an unregistered NRI plugin, and containerd then
//! starts annotated containers without identity.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use moat_listen::conn::ConnectionLimits;
use moat_listen::plain::PlainLimits;
use moat_listen::refusals::Refusals;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The content type of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `/metrics` and `/healthz` over `registry`.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/metrics", get(move || metrics(registry.clone())))
        .route("/healthz", get(|| async { "ok" }))
}

async fn metrics(registry: Arc<Registry>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics").into_response()
        }
    }
}

/// The metrics port's bounds: a scraper and the kubelet's liveness probe need a connection or
/// two each; nothing sends a body. Well inside the DaemonSet's memory limit (32 connections of a
/// few KiB each).
pub const METRICS_LIMITS: PlainLimits = PlainLimits {
    connections: ConnectionLimits {
        per_source: 4,
        total: 32,
        idle_timeout: Duration::from_secs(10),
    },
    header_timeout: Duration::from_secs(5),
    max_header_bytes: 8 * 1024,
};

/// Refusals are counted at once and logged as one summary line per interval at most.
pub const REFUSAL_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Serves [`router`] on `listener` within [`METRICS_LIMITS`] until the task is dropped; its
/// refusals are counted in `registry` as `moat_identity_refusals_total`.
///
/// # Errors
/// The I/O error that stopped the server.
pub async fn serve(listener: TcpListener, mut registry: Registry) -> std::io::Result<()> {
    let refusals = Refusals::register(
        registry.sub_registry_with_prefix("moat_identity"),
        REFUSAL_SUMMARY_INTERVAL,
    );
    // Held for as long as the server runs: it stops only when the task is dropped.
    let (_stop, stop) = tokio::sync::watch::channel(false);
    moat_listen::plain::serve(
        listener,
        router(Arc::new(registry)),
        METRICS_LIMITS,
        refusals.listener("metrics"),
        stop,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    async fn get(registry: Registry, path: &str) -> (StatusCode, Option<String>, String) {
        let response = router(Arc::new(registry))
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn metrics_are_the_agents_instruments_as_openmetrics() {
        let mut registry = Registry::default();
        let m = crate::metrics::Metrics::register(&mut registry);
        m.svids_issued.inc();
        let (status, content_type, body) = get(registry, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(
            body.contains("moat_identity_svids_issued_total 1"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn healthz_answers_ok_and_nothing_else_is_served() {
        let (status, _, body) = get(Registry::default(), "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
        let (status, _, _) = get(Registry::default(), "/admission").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn serves_over_a_real_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Registry::default()));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
        server.abort();
    }

    #[tokio::test]
    async fn the_port_is_bounded_like_the_webhooks_a_flood_gets_its_share_and_a_summary() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Registry::default()));
        let connect_from = |source: &'static str| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))
                .unwrap();
            socket.connect(addr).await.unwrap()
        };
        // Unfinished requests from one address: its share is held, the rest closed at once.
        let mut held = Vec::new();
        for _ in 0..METRICS_LIMITS.connections.per_source + 3 {
            let mut c = connect_from("127.0.5.1").await;
            let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
            held.push(c);
        }
        let mut closed_at_once = 0;
        for c in &mut held {
            let mut buf = [0u8; 1];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await
            {
                closed_at_once += 1;
            }
        }
        assert_eq!(closed_at_once, 3);
        // The kubelet's probe from another address is answered meanwhile, and the refusals
        // are counted.
        let mut probe = connect_from("127.0.5.2").await;
        probe
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        probe.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.contains(
                "moat_identity_refusals_total{listener=\"metrics\",reason=\"connectionPerSource\"} 3"
            ),
            "{answer}"
        );
        server.abort();
    }
}
