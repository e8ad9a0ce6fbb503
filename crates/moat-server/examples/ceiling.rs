//! The load benchmark's references, on the same TLS and HTTP stack as `moat serve` (rustls,
//! hyper, HTTP/1.1 and HTTP/2), answering `allowed: true` with no policy:
//!
//! - `floor`: the least any correct webhook can do: read the body, find `request.uid` by a byte
//!   scan, answer a fixed allow;
//! - `generic` (the default): parse the body into `serde_json::Value` first, as a webhook
//!   written with a generic JSON tree would.
//!
//! moat's figures are reported as ratios to both, measured in the same run.
//!
//! `cargo run --release -p moat-server --example ceiling -- ADDR CA_OUT [floor|generic]`
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
    let floor = args.next().as_deref() == Some("floor");
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
            let service = service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    let bytes = if floor {
                        floor_answer(&body)
                    } else {
                        generic_answer(&body)
                    };
                    Ok::<_, hyper::Error>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(bytes))
                            .unwrap(),
                    )
                },
            );
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn generic_answer(body: &[u8]) -> Bytes {
    let review: Value = serde_json::from_slice(body).unwrap_or_default();
    let answer = json!({
        "apiVersion": review["apiVersion"],
        "kind": "AdmissionReview",
        "response": {"uid": review["request"]["uid"], "allowed": true},
    });
    Bytes::from(serde_json::to_vec(&answer).unwrap())
}

/// The first `"uid":"…"` of the body (the request's own precedes the object's in what the API
/// server sends), spliced into a fixed answer.
fn floor_answer(body: &[u8]) -> Bytes {
    const KEY: &[u8] = b"\"uid\":\"";
    let uid = body
        .windows(KEY.len())
        .position(|w| w == KEY)
        .map(|i| &body[i + KEY.len()..])
        .and_then(|rest| rest.iter().position(|&b| b == b'"').map(|end| &rest[..end]))
        .unwrap_or_default();
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":""#,
    );
    out.extend_from_slice(uid);
    out.extend_from_slice(br#"","allowed":true}}"#);
    Bytes::from(out)
}
