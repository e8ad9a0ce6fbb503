//! A plain-HTTP listener for metrics and health endpoints, with the same bounds as the review
//! port: connections per source and in all (with displacement), a header timeout, an idle
//! timeout, a small header buffer, HTTP/1.1 only (scrapers and probes need nothing else).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::conn::{ConnectionLimits, ConnectionTable};
use crate::refusals::ListenerRefusals;

/// The bounds of a plain-HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlainLimits {
    /// Connections per source, in all, and their idle timeout.
    pub connections: ConnectionLimits,
    /// Time a client has to send its request headers.
    pub header_timeout: Duration,
    /// Largest buffer hyper keeps for a connection's request headers (at least 8 KiB).
    pub max_header_bytes: usize,
}

/// Serves `app` on `listener` within `limits` until `stop` turns true.
///
/// # Errors
/// Never today: accept errors (out of descriptors and the like) are logged and retried after a
/// pause, as the review port does.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: PlainLimits,
    refusals: Arc<ListenerRefusals>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    let table = ConnectionTable::new(limits.connections);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8 * 1024));
    let summaries = tokio::spawn(refusals.clone().summarise_until(stop.clone()));
    loop {
        let (tcp, peer) = tokio::select! {
            () = crate::stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(listener = refusals.name(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(connection) = table.admit_counted(peer.ip(), &refusals) else {
            continue;
        };
        let (app, http, refusals) = (app.clone(), http.clone(), refusals.clone());
        tokio::spawn(async move {
            let io = TokioIo::new(connection.track(tcp));
            let conn = http.serve_connection(io, TowerToHyperService::new(app));
            tokio::select! {
                _ = conn => {}
                reason = connection.closing() => refusals.note(reason),
            }
        });
    }
    summaries.abort();
    Ok(())
}
