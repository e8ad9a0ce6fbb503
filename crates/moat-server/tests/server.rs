//! The admission server over real TLS sockets: a real client that trusts the CA moat wrote,
//! HTTP/1.1 and HTTP/2, AdmissionReview and ImageReview fixtures shaped like the API server's,
//! bad input beside a good client, certificate and configuration reloads, graceful shutdown.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_core::config::Config;
use moat_server::limits;
use moat_server::server::{ServeOptions, Server, TlsSource};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Clone, Copy, Debug)]
enum Proto {
    H1,
    H2,
}

struct Harness {
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    ca: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    dir: PathBuf,
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moat-server-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name),
    )
    .unwrap()
}

async fn start(
    name: &str,
    config: Config,
    config_path: Option<PathBuf>,
    tls: Option<(TlsSource, PathBuf)>,
) -> Harness {
    start_with(
        name,
        config,
        config_path,
        tls,
        limits::CONNECTION_IDLE_TIMEOUT,
        None,
    )
    .await
}

async fn start_with(
    name: &str,
    config: Config,
    config_path: Option<PathBuf>,
    tls: Option<(TlsSource, PathBuf)>,
    idle_timeout: Duration,
    client_ca: Option<PathBuf>,
) -> Harness {
    start_draining(
        name,
        config,
        config_path,
        tls,
        idle_timeout,
        client_ca,
        Duration::ZERO,
    )
    .await
}

async fn start_draining(
    name: &str,
    config: Config,
    config_path: Option<PathBuf>,
    tls: Option<(TlsSource, PathBuf)>,
    idle_timeout: Duration,
    client_ca: Option<PathBuf>,
    drain: Duration,
) -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = temp_dir(name);
    let (tls, ca) = tls.unwrap_or_else(|| {
        let ca = dir.join("ca.pem");
        (TlsSource::SelfSigned { ca_out: ca.clone() }, ca)
    });
    let options = ServeOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        config,
        config_path,
        tls,
        kubeconfig: None,
        idle_timeout,
        rotation: None,
        client_ca,
        drain,
    };
    let server = Server::bind(options).await.unwrap();
    let (addr, metrics_addr) = (server.local_addr().unwrap(), server.metrics_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Harness {
        addr,
        metrics_addr,
        ca,
        stop: Some(stop),
        task: Some(task),
        dir,
    }
}

impl Harness {
    fn connector(&self, proto: Proto) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![match proto {
            Proto::H1 => b"http/1.1".to_vec(),
            Proto::H2 => b"h2".to_vec(),
        }];
        TlsConnector::from(Arc::new(config))
    }

    /// Sends one request on a new connection; returns status, body and the server's leaf
    /// certificate.
    async fn send_raw(
        &self,
        proto: Proto,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (u16, Value, Vec<u8>) {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let tls = self
            .connector(proto)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let request = http::Request::post(format!("https://localhost{path}"))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = match proto {
            Proto::H1 => {
                assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                sender.send_request(request).await.unwrap()
            }
            Proto::H2 => {
                assert_eq!(
                    alpn.as_deref(),
                    Some(&b"h2"[..]),
                    "the server offers HTTP/2"
                );
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                sender.send_request(request).await.unwrap()
            }
        };
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value, leaf)
    }

    async fn send(&self, proto: Proto, path: &str, body: Vec<u8>) -> (u16, Value) {
        let (status, value, _) = self.send_raw(proto, path, "application/json", body).await;
        (status, value)
    }

    async fn metrics(&self) -> String {
        let tcp = TcpStream::connect(self.metrics_addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("/metrics")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = sender.send_request(req).await.unwrap();
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task.take().unwrap())
            .await
            .unwrap()
            .unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP connection from a given loopback address (127.0.0.0/8 is all this machine's), so tests
/// can tell an attacker's connections from a good client's.
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

fn decoded_patch(review: &Value) -> Value {
    let b64 = review["response"]["patch"].as_str().expect("a patch");
    serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

fn default_config() -> Config {
    Config::embedded_default()
}

#[tokio::test]
async fn mutates_over_http1_and_http2() {
    let h = start("mutate", default_config(), None, None).await;
    for proto in [Proto::H1, Proto::H2] {
        let (status, review) = h
            .send(proto, "/mutate", fixture("pod-create-isolated.json"))
            .await;
        assert_eq!(status, 200, "{proto:?}: {review}");
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        let response = &review["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = decoded_patch(&review);
        let ops = patch.as_array().unwrap();
        assert!(
            ops.iter()
                .any(|op| op["path"] == "/spec/runtimeClassName" && op["value"] == "gvisor"),
            "{patch}"
        );
        assert!(
            ops.iter().any(|op| op["path"] == "/spec/tolerations/2"),
            "appended after the pod's own two: {patch}"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn denials_are_200_with_status_code_and_every_reason() {
    let h = start("deny", default_config(), None, None).await;
    let (status, review) = h
        .send(Proto::H2, "/mutate", fixture("pod-create-untagged.json"))
        .await;
    assert_eq!(status, 200);
    let response = &review["response"];
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 403);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("container 'checkout' (spec.containers[0]): image 'nginx' has no tag"),
        "{message}"
    );
    assert!(
        message.contains(
            "container 'init' (spec.initContainers[0]): image 'busybox:latest' uses the mutable tag"
        ),
        "{message}"
    );
    assert!(response.get("patch").is_none());

    let (_, review) = h
        .send(
            Proto::H1,
            "/mutate",
            fixture("deployment-create-untagged.json"),
        )
        .await;
    assert_eq!(
        review["response"]["allowed"], false,
        "a bad Deployment is refused at once"
    );
    assert!(
        review["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.template.spec.containers[0]")
    );

    let (_, review) = h
        .send(
            Proto::H1,
            "/mutate",
            fixture("pod-update-class-change.json"),
        )
        .await;
    assert_eq!(review["response"]["allowed"], false);
    assert!(
        review["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot change (was 'untrusted', now 'other')")
    );
    h.stop().await;
}

#[tokio::test]
async fn answers_v1beta1_in_v1beta1_and_handles_dry_run() {
    let h = start("versions", default_config(), None, None).await;
    let (_, review) = h
        .send(Proto::H1, "/mutate", fixture("pod-create-v1beta1.json"))
        .await;
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1beta1");
    assert_eq!(review["response"]["allowed"], true);
    let (_, review) = h
        .send(Proto::H1, "/mutate", fixture("pod-create-dryrun.json"))
        .await;
    assert_eq!(review["response"]["allowed"], true);
    assert!(
        review["response"]["patch"].is_string(),
        "dry-run gets the real answer by default"
    );
    h.stop().await;
}

#[tokio::test]
async fn validate_rechecks_the_final_object() {
    let h = start("validate", default_config(), None, None).await;
    let (_, review) = h
        .send(Proto::H2, "/validate", fixture("pod-create-isolated.json"))
        .await;
    assert_eq!(
        review["response"]["allowed"], false,
        "an isolated pod that skipped /mutate is refused"
    );
    assert!(
        review["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("moat's mutation is missing")
    );

    let (_, mutated) = h
        .send(Proto::H2, "/mutate", fixture("pod-create-isolated.json"))
        .await;
    let mut request: Value = serde_json::from_slice(&fixture("pod-create-isolated.json")).unwrap();
    let patch: json_patch::Patch = serde_json::from_value(decoded_patch(&mutated)).unwrap();
    json_patch::patch(&mut request["request"]["object"], &patch).unwrap();
    let (_, review) = h
        .send(
            Proto::H2,
            "/validate",
            serde_json::to_vec(&request).unwrap(),
        )
        .await;
    assert_eq!(review["response"]["allowed"], true, "{review}");
    assert!(
        review["response"].get("patch").is_none(),
        "/validate never patches"
    );
    h.stop().await;
}

#[tokio::test]
async fn image_review_applies_the_image_rule() {
    let h = start("imagereview", default_config(), None, None).await;
    let (status, review) = h
        .send(
            Proto::H1,
            "/imagereview",
            fixture("imagereview-allowed.json"),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(review["apiVersion"], "imagepolicy.k8s.io/v1alpha1");
    assert_eq!(review["status"]["allowed"], true);
    let (_, review) = h
        .send(
            Proto::H2,
            "/imagereview",
            fixture("imagereview-denied.json"),
        )
        .await;
    assert_eq!(review["status"]["allowed"], false);
    assert_eq!(
        review["status"]["reason"],
        "spec.containers[1]: image 'busybox' has no tag, which means 'latest'; pin a version tag or a digest"
    );
    h.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_while_a_good_client_keeps_working() {
    let h = Arc::new(start("bad-input", default_config(), None, None).await);
    let good = {
        let h = h.clone();
        tokio::spawn(async move {
            let mut answered = 0;
            let until = Instant::now() + limits::BODY_READ_TIMEOUT + Duration::from_secs(1);
            while Instant::now() < until {
                let (status, review) = h
                    .send(Proto::H2, "/mutate", fixture("pod-create-isolated.json"))
                    .await;
                assert_eq!(status, 200);
                assert_eq!(review["response"]["allowed"], true);
                answered += 1;
            }
            answered
        })
    };
    let review = |v: Value| serde_json::to_vec(&v).unwrap();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            "application/json",
            b"{\"apiVersion\": ".to_vec(),
            400,
            "not a valid AdmissionReview",
        ),
        (
            "wrong content type",
            "text/plain",
            fixture("pod-create-isolated.json"),
            415,
            "content type must be application/json",
        ),
        (
            "wrong kind",
            "application/json",
            review(json!({"apiVersion": "admission.k8s.io/v1", "kind": "Pod", "request": null})),
            400,
            "kind must be 'AdmissionReview'",
        ),
        (
            "no request",
            "application/json",
            review(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"})),
            400,
            "the review has no request",
        ),
        (
            "unknown apiVersion",
            "application/json",
            review(
                json!({"apiVersion": "admission.k8s.io/v2", "kind": "AdmissionReview", "request": null}),
            ),
            400,
            "apiVersion 'admission.k8s.io/v2' is not supported",
        ),
        (
            "oversized body",
            "application/json",
            vec![b' '; limits::MAX_BODY_LEN_BYTES + 1],
            413,
            "larger than",
        ),
        (
            "not JSON at all",
            "application/json",
            vec![0xff, 0xfe, 0x00],
            400,
            "not a valid AdmissionReview",
        ),
        (
            "object of the wrong shape",
            "application/json",
            review(
                json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
                "uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE", "userInfo": {}, "object": {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": "nope"}}}}),
            ),
            400,
            "not a valid AdmissionReview",
        ),
    ];
    for (name, content_type, body, want_status, want_message) in cases {
        for proto in [Proto::H1, Proto::H2] {
            let (status, body, _) = h
                .send_raw(proto, "/mutate", content_type, body.clone())
                .await;
            assert_eq!(status, want_status, "{name} over {proto:?}: {body}");
            assert_eq!(
                body["error"]["code"], want_status,
                "{name}: JSON error shape: {body}"
            );
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains(want_message),
                "{name}: {body}"
            );
        }
    }

    // A body that never finishes is cut off at BODY_READ_TIMEOUT with 408.
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let mut tls = h
        .connector(Proto::H1)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"apiV").await.unwrap();
    let started = Instant::now();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut response),
    )
    .await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() >= limits::BODY_READ_TIMEOUT - Duration::from_millis(500));

    assert!(good.await.unwrap() > 0);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(
            "moat_admission_requests_total{endpoint=\"mutate\",operation=\"\",decision=\"invalid\"}"
        ),
        "{metrics}"
    );
    Arc::into_inner(h).unwrap().stop().await;
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_cut_off() {
    let h = start("slowloris", default_config(), None, None).await;
    // A flood of TCP connections that never start TLS: each is closed at TLS_HANDSHAKE_TIMEOUT,
    // and a good client is served meanwhile.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(connect_from("127.0.0.2", h.addr).await);
    }
    let (status, _) = h
        .send(Proto::H1, "/mutate", fixture("pod-create-isolated.json"))
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(limits::TLS_HANDSHAKE_TIMEOUT + Duration::from_secs(1)).await;
    let mut closed = 0;
    for mut c in idle {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(
            Duration::from_millis(100),
            tokio::io::AsyncReadExt::read(&mut c, &mut buf),
        )
        .await
        {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 100,
        "idle connections are closed after the handshake timeout"
    );

    // Headers that never finish (slowloris) are cut off at HEADER_READ_TIMEOUT.
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let mut tls = h
        .connector(Proto::H1)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"POST /mutate HTTP/1.1\r\nhost: loc")
        .await
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut rest),
    )
    .await;
    let waited = started.elapsed();
    assert!(
        waited >= limits::HEADER_READ_TIMEOUT - Duration::from_millis(500)
            && waited < Duration::from_secs(14),
        "{waited:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn health_readiness_and_unknown_paths() {
    let h = start("health", default_config(), None, None).await;
    let get = |path: &'static str| {
        let h = &h;
        async move {
            let tcp = TcpStream::connect(h.addr).await.unwrap();
            let tls = h
                .connector(Proto::H1)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap();
            sender.send_request(req).await.unwrap().status().as_u16()
        }
    };
    assert_eq!(get("/healthz").await, 200);
    assert_eq!(get("/readyz").await, 200);
    assert_eq!(get("/nope").await, 404);
    assert_eq!(get("/mutate").await, 405, "reviews are POST only");
    h.stop().await;
}

#[tokio::test]
async fn certificate_files_are_reloaded_without_failing_a_request() {
    let dir = temp_dir("reload-certs-files");
    let (first, second) = (
        moat_server::certs::generate(&["localhost".to_owned()]).unwrap(),
        moat_server::certs::generate(&["localhost".to_owned()]).unwrap(),
    );
    moat_server::certs::write_dir(&dir, &first).unwrap();
    // The client trusts both CAs, as during a CA rotation.
    let ca = dir.join("trusted.pem");
    std::fs::write(&ca, format!("{}{}", first.ca_cert_pem, second.ca_cert_pem)).unwrap();
    let tls = TlsSource::Files {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    let h = Arc::new(start("reload-certs", default_config(), None, Some((tls, ca))).await);
    let (_, _, before) = h
        .send_raw(
            Proto::H2,
            "/mutate",
            "application/json",
            fixture("pod-create-isolated.json"),
        )
        .await;
    let looping = {
        let h = h.clone();
        tokio::spawn(async move {
            let mut leaves = std::collections::BTreeSet::new();
            let until = Instant::now() + limits::RELOAD_INTERVAL * 4;
            while Instant::now() < until {
                let (status, review, leaf) = h
                    .send_raw(
                        Proto::H2,
                        "/mutate",
                        "application/json",
                        fixture("pod-create-isolated.json"),
                    )
                    .await;
                assert_eq!(status, 200);
                assert_eq!(review["response"]["allowed"], true);
                leaves.insert(leaf);
            }
            leaves
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Key first, then certificate: in between, the pair does not match and is refused.
    moat_server::certs::write_atomic(&dir.join("tls.key"), second.key_pem.as_bytes(), 0o600)
        .unwrap();
    moat_server::certs::write_atomic(&dir.join("tls.crt"), second.cert_pem.as_bytes(), 0o644)
        .unwrap();
    let leaves = looping.await.unwrap();
    let (_, _, after) = h
        .send_raw(
            Proto::H1,
            "/mutate",
            "application/json",
            fixture("pod-create-isolated.json"),
        )
        .await;
    assert_ne!(before, after, "the new certificate is served");
    assert!(leaves.contains(&after));
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("moat_tls_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    Arc::into_inner(h).unwrap().stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn configuration_is_reloaded_and_a_bad_file_is_refused() {
    let dir = temp_dir("reload-config");
    let path = dir.join("moat.yaml");
    std::fs::write(&path, "images: {requireDigest: false}\n").unwrap();
    let config = Config::from_yaml(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let h = start("reload-config-server", config, Some(path.clone()), None).await;
    let image_review = fixture("imagereview-allowed.json");
    let (_, review) = h
        .send(Proto::H1, "/imagereview", image_review.clone())
        .await;
    assert_eq!(review["status"]["allowed"], true);

    // A stricter file takes effect…
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&path, "images: {requireDigest: true}\n").unwrap();
    tokio::time::sleep(limits::RELOAD_INTERVAL * 2 + Duration::from_millis(500)).await;
    let (_, review) = h
        .send(Proto::H1, "/imagereview", image_review.clone())
        .await;
    assert_eq!(review["status"]["allowed"], false, "{review}");

    // …and a broken one is refused, keeping the stricter one in force.
    std::fs::write(&path, "images: {requireDigest: maybe}\n").unwrap();
    tokio::time::sleep(limits::RELOAD_INTERVAL * 2 + Duration::from_millis(500)).await;
    let (_, review) = h.send(Proto::H1, "/imagereview", image_review).await;
    assert_eq!(review["status"]["allowed"], false);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("moat_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("moat_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    h.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests() {
    let h = start("shutdown", default_config(), None, None).await;
    // A request whose body is still arriving when shutdown starts is answered, not dropped.
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let mut tls = h
        .connector(Proto::H1)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let body = fixture("pod-create-isolated.json");
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&body[..100]).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = h.addr;
    let stopping = tokio::spawn(h.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    tls.write_all(&body[100..]).await.unwrap();
    let mut response = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut response)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"allowed\":true"));
    stopping.await.unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );
}

#[tokio::test]
async fn after_the_shutdown_signal_the_server_drains_answering_but_not_ready() {
    let drain = Duration::from_secs(2);
    let h = start_draining(
        "drain",
        default_config(),
        None,
        None,
        limits::CONNECTION_IDLE_TIMEOUT,
        None,
        drain,
    )
    .await;
    let h = Arc::new(h);
    let ready = |h: Arc<Harness>| async move {
        let tcp = TcpStream::connect(h.addr).await.unwrap();
        let tls = h
            .connector(Proto::H1)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get("https://localhost/readyz")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender
            .send_request(request)
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ready(h.clone()).await, 200);
    let addr = h.addr;
    let mut h = Arc::into_inner(h).unwrap();
    let _ = h.stop.take().unwrap().send(());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = Arc::new(h);
    // Draining: readiness fails (the endpoints controller takes the replica out), and reviews on
    // new connections, which the Service may still route here, are answered.
    assert_eq!(ready(h.clone()).await, 503);
    let (status, _) = h
        .send(Proto::H2, "/mutate", fixture("pod-create-isolated.json"))
        .await;
    assert_eq!(status, 200);
    let mut h = Arc::into_inner(h).unwrap();
    tokio::time::timeout(Duration::from_secs(30), h.task.take().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new connections after the drain"
    );
}

#[tokio::test]
async fn a_connection_flood_from_tenants_does_not_stop_the_api_servers_reviews() {
    let h = Arc::new(start("flood", default_config(), None, None).await);
    // More idle TCP connections from one source than the server holds in all: all but the
    // source's share are closed at once, and the accept loop never waits for a free slot.
    let mut idle = Vec::new();
    for _ in 0..limits::MAX_CONNECTIONS + 400 {
        if let Ok(c) = tokio::time::timeout(
            Duration::from_millis(200),
            connect_from("127.0.0.2", h.addr),
        )
        .await
        {
            idle.push(c);
        }
    }
    // Connections that finish TLS and then say nothing, and handshakes that trickle in, from
    // other sources.
    let mut quiet = Vec::new();
    for _ in 0..150 {
        let tcp = connect_from("127.0.0.3", h.addr).await;
        if let Ok(tls) = h
            .connector(Proto::H2)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
        {
            quiet.push(tls);
        }
    }
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut tcp = connect_from("127.0.0.4", h.addr).await;
        let _ = tcp.write_all(&[0x16, 0x03, 0x01]).await;
        slow.push(tcp);
    }
    // A request flood from one more source, running all through the good client's reviews.
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut flood = Vec::new();
    for _ in 0..8 {
        let (h, flooding) = (h.clone(), flooding.clone());
        flood.push(tokio::spawn(async move {
            let mut sent = 0u32;
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                let tcp = connect_from("127.0.0.5", h.addr).await;
                let Ok(tls) = h
                    .connector(Proto::H1)
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                else {
                    continue;
                };
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await
                else {
                    continue;
                };
                tokio::spawn(conn);
                for _ in 0..50 {
                    let request = http::Request::post("https://localhost/mutate")
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(fixture("pod-create-isolated.json"))))
                        .unwrap();
                    if sender.send_request(request).await.is_err() {
                        break;
                    }
                    sent += 1;
                }
            }
            sent
        }));
    }

    // The API server's reviews, each on a new connection (the hardest case), keep being answered,
    // well before its webhook timeout.
    let mut slowest = Duration::ZERO;
    for proto in [Proto::H1, Proto::H2].into_iter().cycle().take(60) {
        let started = Instant::now();
        let (status, review) = h
            .send(proto, "/mutate", fixture("pod-create-isolated.json"))
            .await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, 200, "{review}");
        assert_eq!(review["response"]["allowed"], true);
    }
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut flooded = 0;
    for f in flood {
        flooded += f.await.unwrap();
    }
    assert!(flooded > 0, "the flood ran");
    assert!(
        slowest < Duration::from_secs(2),
        "a review took {slowest:?} during the flood"
    );
    let metrics = h.metrics().await;
    assert!(
        metrics
            .contains("moat_refusals_total{listener=\"reviews\",reason=\"connectionPerSource\"}"),
        "{metrics}"
    );
    drop((idle, quiet, slow));
    Arc::try_unwrap(h).ok().unwrap().stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_in_any_state() {
    let idle_timeout = Duration::from_secs(1);
    let h = start_with("idle", default_config(), None, None, idle_timeout, None).await;
    // An HTTP/2 connection that completed its handshake and a review, then went quiet; and an
    // HTTP/1.1 connection that sent nothing after TLS.
    for proto in [Proto::H2, Proto::H1] {
        let tcp = TcpStream::connect(h.addr).await.unwrap();
        let tls = h
            .connector(proto)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let closed = match proto {
            Proto::H2 => {
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                        .await
                        .unwrap();
                let conn = tokio::spawn(conn);
                let request = http::Request::post("https://localhost/mutate")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(fixture("pod-create-isolated.json"))))
                    .unwrap();
                assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
                tokio::time::timeout(idle_timeout * 5, conn).await.is_ok()
            }
            Proto::H1 => {
                let mut tls = tls;
                let mut buf = Vec::new();
                tokio::time::timeout(
                    idle_timeout * 5,
                    tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut buf),
                )
                .await
                .is_ok()
            }
        };
        assert!(closed, "{proto:?}: the idle connection was closed");
    }
    h.stop().await;
}

/// curl is what people (and the reproduction) use: it reports a reset stream as an error
/// rather than reading the answer that came before it.
#[tokio::test]
async fn an_oversized_body_gets_the_413_answer_over_http2_too() {
    let h = start("too-large-h2", default_config(), None, None).await;
    let body = h.dir.join("big.json");
    std::fs::write(&body, vec![b' '; limits::MAX_BODY_LEN_BYTES + 1_000_000]).unwrap();
    for proto in ["--http1.1", "--http2"] {
        let mut curl = std::process::Command::new("curl");
        curl.args(["-sS", proto, "--cacert"])
            .arg(&h.ca)
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", body.display()))
            .args(["-o", "-", "-w", "\n%{http_code}"])
            .arg(format!("https://localhost:{}/mutate", h.addr.port()));
        // Off the runtime, which serves the request meanwhile.
        let out = tokio::task::spawn_blocking(move || curl.output())
            .await
            .unwrap()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{proto}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.ends_with("\n413"), "{proto}: {text}");
        assert!(text.contains("body is larger than"), "{proto}: {text}");
    }
    h.stop().await;
}

#[tokio::test]
async fn with_a_client_ca_only_the_api_servers_certificate_gets_reviews() {
    let dir = temp_dir("client-ca-material");
    // The API server's client identity, from a CA of its own.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params =
        rcgen::CertificateParams::new(vec!["kube-apiserver".to_owned()]).unwrap();
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &issuer).unwrap();
    let client_ca = dir.join("client-ca.pem");
    std::fs::write(&client_ca, ca.pem()).unwrap();
    // And a stranger with a self-signed one.
    let stranger_key = rcgen::KeyPair::generate().unwrap();
    let stranger = rcgen::CertificateParams::new(vec!["pod".to_owned()])
        .unwrap()
        .self_signed(&stranger_key)
        .unwrap();

    let h = start_with(
        "client-ca",
        default_config(),
        None,
        None,
        limits::CONNECTION_IDLE_TIMEOUT,
        Some(client_ca),
    )
    .await;
    let connect = |identity: Option<(&rcgen::Certificate, &rcgen::KeyPair)>| {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&h.ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(config))
    };
    let post = |connector: TlsConnector, path: &'static str| {
        let addr = h.addr;
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tls = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            let request = http::Request::post(format!("https://localhost{path}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(fixture("pod-create-isolated.json"))))
                .unwrap();
            let response = sender
                .send_request(request)
                .await
                .map_err(std::io::Error::other)?;
            Ok::<u16, std::io::Error>(response.status().as_u16())
        }
    };
    assert_eq!(
        post(connect(Some((&client, &client_key))), "/mutate")
            .await
            .unwrap(),
        200
    );
    assert_eq!(
        post(connect(None), "/mutate").await.unwrap(),
        403,
        "no certificate, no review"
    );
    // Health still answers a client without a certificate (the kubelet's probes).
    let status = {
        let tcp = TcpStream::connect(h.addr).await.unwrap();
        let tls = connect(None)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("https://localhost/healthz")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(req).await.unwrap().status().as_u16()
    };
    assert_eq!(status, 200);
    // A certificate the client CA did not sign fails the handshake.
    assert!(
        post(connect(Some((&stranger, &stranger_key))), "/mutate")
            .await
            .is_err()
    );
    h.stop().await;
}

/// An HTTP/2 connection from `source`, its driver spawned.
async fn h2_from(h: &Harness, source: &str) -> hyper::client::conn::http2::SendRequest<SlowBody> {
    let tcp = connect_from(source, h.addr).await;
    let tls = h
        .connector(Proto::H2)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// A body that sends `first` and then never ends.
type SlowBody = http_body_util::StreamBody<
    futures_util::stream::Chain<
        futures_util::stream::Iter<
            std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
        >,
        futures_util::stream::Pending<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
    >,
>;

fn slow_review(first: usize, declared: usize) -> http::Request<SlowBody> {
    use futures_util::StreamExt as _;
    let frames = if first == 0 {
        Vec::new()
    } else {
        vec![Ok(hyper::body::Frame::data(Bytes::from(vec![b' '; first])))]
    };
    let body = futures_util::stream::iter(frames).chain(futures_util::stream::pending());
    http::Request::post("https://localhost/mutate")
        .header("content-type", "application/json")
        .header("content-length", declared)
        .body(http_body_util::StreamBody::new(body))
        .unwrap()
}

#[tokio::test]
async fn body_less_streams_from_many_sources_hold_no_decision_slot() {
    let h = start("bodyless", default_config(), None, None).await;
    // More body-less streams than there are decision slots, from several sources, each within
    // its source's share of readers: none of them holds a slot, so the API server's review is
    // decided at once rather than waiting for a slot that never frees.
    let per_source = limits::MAX_READERS_PER_SOURCE;
    let sources = limits::MAX_CONCURRENT_REQUESTS / per_source + 1;
    let mut pending = Vec::new();
    for s in 0..sources {
        let source = format!("127.0.1.{}", s + 1);
        let mut senders = Vec::new();
        for _ in 0..per_source.div_ceil(limits::MAX_STREAMS_PER_CONNECTION as usize) {
            senders.push(h2_from(&h, &source).await);
        }
        let n = senders.len();
        for i in 0..per_source {
            let sender = &mut senders[i % n];
            sender.ready().await.unwrap();
            pending.push(tokio::spawn(sender.send_request(slow_review(0, 1_000_000))));
        }
    }
    assert!(pending.len() > limits::MAX_CONCURRENT_REQUESTS);
    // Let every stream reach the server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for proto in [Proto::H1, Proto::H2] {
        let (status, review) = h
            .send(proto, "/mutate", fixture("pod-create-isolated.json"))
            .await;
        assert_eq!(status, 200, "{review}");
    }
    // One source beyond its share of readers is refused at once.
    let mut extra = h2_from(&h, "127.0.1.1").await;
    let response = tokio::time::timeout(
        Duration::from_secs(3),
        extra.send_request(slow_review(0, 1_000_000)),
    )
    .await
    .expect("refused at once, not held")
    .unwrap();
    assert_eq!(response.status(), 429);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("moat_refusals_total{listener=\"reviews\",reason=\"requestPerSource\"}"),
        "{metrics}"
    );
    for p in pending {
        p.abort();
    }
    h.stop().await;
}

#[tokio::test]
async fn the_byte_budget_displaces_the_oldest_slow_body_for_a_new_request() {
    let h = start("budget", default_config(), None, None).await;
    // Slow bodies just under the size limit, most of each sent, from a few sources: more than
    // the budget holds. Each new one displaces the oldest, which is answered 503 at once.
    let body = limits::MAX_BODY_LEN_BYTES - 100;
    let sent = body - 64 * 1024;
    let count = limits::REQUEST_BUDGET_BYTES / sent + 3;
    let mut slow = Vec::new();
    for i in 0..count {
        let mut sender = h2_from(&h, &format!("127.0.2.{}", i % 4 + 1)).await;
        slow.push(tokio::spawn(async move {
            let response = sender.send_request(slow_review(sent, body)).await;
            drop(sender);
            response
        }));
        // One after the other, so "oldest" is well defined.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The API server's review fits, displacing the oldest slow body if needed.
    let (status, review) = h
        .send(Proto::H2, "/mutate", fixture("pod-create-isolated.json"))
        .await;
    assert_eq!(status, 200, "{review}");
    let mut displaced = 0;
    for s in &mut slow[..3] {
        let response = tokio::time::timeout(Duration::from_secs(3), s)
            .await
            .expect("the oldest are answered at once")
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 503);
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&text).contains("send bodies at once"),
            "{text:?}"
        );
        displaced += 1;
    }
    assert_eq!(displaced, 3);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("moat_refusals_total{listener=\"reviews\",reason=\"requestDisplaced\"} 3"),
        "{metrics}"
    );
    for s in slow.into_iter().skip(3) {
        s.abort();
    }
    h.stop().await;
}

#[tokio::test]
async fn at_the_total_connection_cap_a_new_client_is_served() {
    let h = start("displace", default_config(), None, None).await;
    // Idle connections from many sources, each within its share, fill the total cap.
    let per_source = limits::MAX_CONNECTIONS_PER_SOURCE;
    let mut idle = Vec::new();
    for s in 0..limits::MAX_CONNECTIONS.div_ceil(per_source) {
        for _ in 0..per_source {
            idle.push(connect_from(&format!("127.0.3.{}", s + 1), h.addr).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for proto in [Proto::H1, Proto::H2, Proto::H1] {
        let (status, review) = h
            .send(proto, "/mutate", fixture("pod-create-isolated.json"))
            .await;
        assert_eq!(status, 200, "{review}");
    }
    let metrics = h.metrics().await;
    assert!(
        metrics
            .contains("moat_refusals_total{listener=\"reviews\",reason=\"connectionDisplaced\"}"),
        "{metrics}"
    );
    drop(idle);
    h.stop().await;
}

#[tokio::test]
async fn the_metrics_port_caps_each_source_and_closes_an_unfinished_request() {
    let h = start("metrics-port", default_config(), None, None).await;
    let per_source = limits::METRICS_LIMITS.connections.per_source;
    let mut held = Vec::new();
    for _ in 0..per_source {
        let mut c = connect_from("127.0.4.1", h.metrics_addr).await;
        c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        held.push(c);
    }
    // One more from the same source is closed as it is accepted.
    let mut extra = connect_from("127.0.4.1", h.metrics_addr).await;
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut extra, &mut buf),
    )
    .await
    .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // A scraper from another address is served meanwhile.
    assert!(h.metrics().await.contains("moat_admission_in_flight"));
    // The unfinished requests are closed at the header timeout.
    for mut c in held {
        let mut rest = Vec::new();
        tokio::time::timeout(
            limits::METRICS_LIMITS.header_timeout * 3,
            tokio::io::AsyncReadExt::read_to_end(&mut c, &mut rest),
        )
        .await
        .expect("closed within the header timeout")
        .ok();
    }
    let metrics = h.metrics().await;
    assert!(
        metrics
            .contains("moat_refusals_total{listener=\"metrics\",reason=\"connectionPerSource\"} 1"),
        "{metrics}"
    );
    h.stop().await;
}
