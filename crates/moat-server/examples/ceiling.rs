//! The load benchmark's ceiling: the same TLS and HTTP stack as `moat serve` (rustls, hyper,
//! HTTP/1.1 and HTTP/2), a body parsed as JSON, the uid echoed with `allowed: true`, and no
//! policy. moat's figures are reported as ratios to this.
//!
//! `cargo run --release -p moat-server --example ceiling -- ADDR CA_OUT`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark fixture, not product code"
)]

use std::sync::Arc;

/// The same allocator as the `moat` binary, so the ratio measures moat's work, not malloc's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use moat_server::certs;
use moat_server::tls::CertStore;
use serde_json::{Value, json};

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18444".to_owned());
    let ca_out = args
        .next()
        .unwrap_or_else(|| "/tmp/ceiling-ca.pem".to_owned());
    let g = certs::generate(&["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    std::fs::write(&ca_out, &g.ca_cert_pem).unwrap();
    let store = Arc::new(CertStore::from_pem(&g.cert_pem, &g.key_pem).unwrap());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(store.server_config()));
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    eprintln!("ceiling listening on {addr}");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let body = req.into_body().collect().await?.to_bytes();
                let review: Value = serde_json::from_slice(&body).unwrap_or_default();
                let answer = json!({
                    "apiVersion": review["apiVersion"],
                    "kind": "AdmissionReview",
                    "response": {"uid": review["request"]["uid"], "allowed": true},
                });
                let bytes = Bytes::from(serde_json::to_vec(&answer).unwrap());
                Ok::<_, hyper::Error>(
                    hyper::Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(bytes))
                        .unwrap(),
                )
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
