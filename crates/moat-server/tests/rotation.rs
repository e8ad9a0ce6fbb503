//! Certificate rotation without cert-manager, against a test double of the Kubernetes API
//! (Secrets, Leases, webhook configurations: get, create, replace and JSON patch, with
//! `resourceVersion` checks) and a clock the test moves.
//!
//! The acceptance: a client that trusts only the `caBundle` it reads from a webhook
//! configuration at each request keeps getting reviews answered through CA rotations and
//! serving certificate renewals, while the server's TLS files follow the Secret the way the
//! kubelet's Secret volume does (late).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_core::config::Config;
use moat_server::certs;
use moat_server::rotation::{Action, Clock, RotationOptions, RotationPolicy, Rotator};
use moat_server::server::{ServeOptions, Server, TlsSource};
use prometheus_client::registry::Registry;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};

const NS: &str = "moat-system";
const SECRET: &str = "moat-tls";
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn secret_path() -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{SECRET}")
}
fn webhook_path(kind: &str) -> String {
    format!("/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/moat")
}

/// The API double: objects by path, one resourceVersion counter.
#[derive(Default)]
struct FakeApi {
    objects: Mutex<BTreeMap<String, Value>>,
    version: AtomicU64,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

impl FakeApi {
    fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    fn put(&self, path: &str, mut object: Value) -> Value {
        let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects
            .lock()
            .unwrap()
            .insert(path.to_owned(), object.clone());
        object
    }

    /// A collection: the objects stored under `path`, filtered by a `key=value` selector.
    fn list(&self, path: &str, selector: Option<(&str, &str)>) -> Option<Value> {
        let prefix = format!("{path}/");
        let objects = self.objects.lock().unwrap();
        let items: Vec<Value> = objects
            .iter()
            .filter(|(p, _)| p.starts_with(&prefix) && !p[prefix.len()..].contains('/'))
            .map(|(_, o)| o.clone())
            .filter(|o| selector.is_none_or(|(k, v)| o["metadata"]["labels"][k] == v))
            .collect();
        if items.is_empty() && !path.ends_with("/leases") {
            return None;
        }
        Some(
            json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
        )
    }

    fn serve(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let stored = self.get(path);
        match method {
            "GET" => match stored {
                Some(o) => (200, o),
                None => {
                    let selector = query
                        .split('&')
                        .find_map(|q| q.strip_prefix("labelSelector="))
                        .map(|s| s.replace("%3D", "=").replace("%2F", "/"));
                    let selector = selector.as_deref().and_then(|s| s.split_once('='));
                    match self.list(path, selector) {
                        Some(list) => (200, list),
                        None => status(404, "NotFound", "not found"),
                    }
                }
            },
            "POST" => {
                let object: Value = serde_json::from_slice(body).unwrap();
                let name = object["metadata"]["name"].as_str().unwrap();
                let path = format!("{path}/{name}");
                if self.get(&path).is_some() {
                    return status(409, "AlreadyExists", "already exists");
                }
                (201, self.put(&path, object))
            }
            "PUT" => {
                let object: Value = serde_json::from_slice(body).unwrap();
                let Some(stored) = stored else {
                    return status(404, "NotFound", "not found");
                };
                if object["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified");
                }
                (200, self.put(path, object))
            }
            "PATCH" => {
                assert_eq!(content_type, "application/json-patch+json");
                let Some(mut object) = stored else {
                    return status(404, "NotFound", "not found");
                };
                let patch: json_patch::Patch = serde_json::from_slice(body).unwrap();
                if let Err(e) = json_patch::patch(&mut object, &patch) {
                    return status(422, "Invalid", &e.to_string());
                }
                (200, self.put(path, object))
            }
            other => panic!("unexpected {other} {path}"),
        }
    }
}

async fn start_api(api: Arc<FakeApi>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let api = api.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let api = api.clone();
                    async move {
                        let method = req.method().as_str().to_owned();
                        let path = req
                            .uri()
                            .path_and_query()
                            .map_or_else(|| req.uri().path().to_owned(), ToString::to_string);
                        let content_type = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let (code, value) = api.serve(&method, &path, &content_type, &body);
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(code)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(value.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// The clock the controllers and the client's certificate checks read.
#[derive(Debug)]
struct TestClock(Mutex<SystemTime>);

impl TestClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

impl rustls::time_provider::TimeProvider for TestClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(
            self.now().duration_since(SystemTime::UNIX_EPOCH).ok()?,
        ))
    }
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text.as_bytes())
}

fn unb64(value: &Value) -> String {
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap())
            .unwrap(),
    )
    .unwrap()
}

fn pems(bundle: &str) -> Vec<String> {
    CertificateDer::pem_slice_iter(bundle.as_bytes())
        .map(|c| {
            let der = c.unwrap();
            base64::engine::general_purpose::STANDARD.encode(der.as_ref())
        })
        .collect()
}

/// A client's view: TLS trusting exactly `bundle` at the test clock's time, one review.
async fn review(
    addr: std::net::SocketAddr,
    bundle: &str,
    clock: &Arc<TestClock>,
    body: &Bytes,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_details(
        Arc::new(rustls::crypto::ring::default_provider()),
        clock.clone(),
    )
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/validate")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let code = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let answer: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if code != 200 || answer["response"]["allowed"].as_bool().is_none() {
        return Err(format!("{code}: {answer}"));
    }
    Ok(())
}

/// The serving certificate the server presents now (DER, base64), whatever signed it.
async fn presented(addr: std::net::SocketAddr) -> String {
    #[derive(Debug)]
    struct AnyCert;
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    base64::engine::general_purpose::STANDARD.encode(cert.as_ref())
}

/// The kubelet's part: the Secret's serving pair into the files the server watches, then the
/// server's reload awaited, so simulated time never outruns the real reload loop.
async fn project(dir: &Path, data: &Value, addr: std::net::SocketAddr) {
    let (cert, key) = (unb64(&data["tls.crt"]), unb64(&data["tls.key"]));
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    if std::fs::read_to_string(&cert_file).ok().as_deref() == Some(cert.as_str()) {
        return;
    }
    certs::write_atomic(&key_file, key.as_bytes(), 0o600).unwrap();
    certs::write_atomic(&cert_file, cert.as_bytes(), 0o644).unwrap();
    let wanted = pems(&cert).remove(0);
    for _ in 0..100 {
        if presented(addr).await == wanted {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the server did not reload the projected certificate");
}

fn bundle_of(api: &FakeApi, kind: &str) -> String {
    let config = api.get(&webhook_path(kind)).unwrap();
    let bundles: Vec<String> = config["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| unb64(&w["clientConfig"]["caBundle"]))
        .collect();
    assert!(
        bundles.windows(2).all(|w| w[0] == w[1]),
        "every webhook of a configuration carries the same bundle"
    );
    bundles[0].clone()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moat-rotation-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What `moat install --rotate-certs` creates: the Secret (with ca.key) and both webhook
/// configurations trusting its CA (the validating one with two webhooks).
fn seed(api: &FakeApi, ca: &certs::Authority, cert: &str, key: &str) {
    api.put(
        &secret_path(),
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": {"name": SECRET, "namespace": NS},
               "data": {"tls.crt": b64(cert), "tls.key": b64(key),
                        "ca.crt": b64(&ca.cert_pem), "ca.key": b64(&ca.key_pem)}}),
    );
    for (kind, kind_name, hooks) in [
        (
            "mutating",
            "MutatingWebhookConfiguration",
            ["mutate.moat.dev"].as_slice(),
        ),
        (
            "validating",
            "ValidatingWebhookConfiguration",
            ["validate.moat.dev", "validate-more.moat.dev"].as_slice(),
        ),
    ] {
        let webhooks: Vec<Value> = hooks
            .iter()
            .map(|name| json!({"name": name, "clientConfig": {"service": {"name": "moat", "namespace": NS, "path": "/validate", "port": 443}, "caBundle": b64(&ca.cert_pem)}, "sideEffects": "None", "admissionReviewVersions": ["v1"]}))
            .collect();
        api.put(
            &webhook_path(kind),
            json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind_name,
                   "metadata": {"name": "moat"}, "webhooks": webhooks}),
        );
    }
}

fn write_kubeconfig(dir: &Path, url: &str) -> PathBuf {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: '{url}'}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u, namespace: {NS}}}}}]\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    kubeconfig
}

/// A server on TLS files, with its certificate controller when `rotation` is given.
struct Running {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), moat_server::server::ServeError>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn serve(
    cert: PathBuf,
    key: PathBuf,
    kubeconfig: Option<PathBuf>,
    rotation: Option<RotationOptions>,
) -> Running {
    let server = Server::bind(ServeOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        config: Config::embedded_default(),
        config_path: None,
        tls: TlsSource::Files { cert, key },
        kubeconfig,
        idle_timeout: moat_server::limits::CONNECTION_IDLE_TIMEOUT,
        rotation,
        client_ca: None,
        drain: Duration::ZERO,
    })
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

/// The controller's options for replica `identity`.
fn rotation_options(
    identity: &str,
    dns_names: Vec<String>,
    policy: RotationPolicy,
) -> RotationOptions {
    RotationOptions {
        namespace: None,
        secret: SECRET.to_owned(),
        lease: moat_server::rotation::lease_name(SECRET),
        webhook_configuration: "moat".to_owned(),
        identity: identity.to_owned(),
        dns_names,
        policy,
    }
}

/// The review every client in these tests sends.
fn review_body() -> Bytes {
    Bytes::from(
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pod-create-isolated.json"),
        )
        .unwrap(),
    )
}

fn policy() -> RotationPolicy {
    RotationPolicy {
        ca_lifetime: 60 * DAY,
        serving_lifetime: 15 * DAY,
        propagation_delay: DAY,
        lease_duration: 2 * HOUR,
        check_interval: HOUR / 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_only_the_published_bundle_never_fails_through_ca_rotations() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = temp_dir("acceptance");
    let policy = policy();
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let clock = Arc::new(TestClock(Mutex::new(SystemTime::now())));

    let ca = certs::new_ca(clock.now(), policy.ca_lifetime).unwrap();
    let (cert, key) = certs::issue(&ca, &names, clock.now(), policy.serving_lifetime).unwrap();
    let api = Arc::new(FakeApi::default());
    seed(&api, &ca, &cert, &key);
    let url = start_api(api.clone()).await;
    let kubeconfig = write_kubeconfig(&dir, &url);
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let rotator = |identity: &str, registry: &mut Registry| {
        Rotator::new(
            client.clone(),
            rotation_options(identity, names.clone(), policy.clone()),
            clock.clone(),
            registry,
        )
        .unwrap()
    };
    let (mut first_registry, mut second_registry) = (Registry::default(), Registry::default());
    let first = rotator("moat-a", &mut first_registry);
    let second = rotator("moat-b", &mut second_registry);

    // The server, serving the "Secret volume".
    certs::write_atomic(&dir.join("tls.crt"), cert.as_bytes(), 0o644).unwrap();
    certs::write_atomic(&dir.join("tls.key"), key.as_bytes(), 0o600).unwrap();
    let server = serve(dir.join("tls.crt"), dir.join("tls.key"), None, None).await;
    let addr = server.addr;
    let body = review_body();

    // A client in the background, in real time, reading the published bundle per request.
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let reviews = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let background = {
        let (api, clock, body, failures, reviews, done) = (
            api.clone(),
            clock.clone(),
            body.clone(),
            failures.clone(),
            reviews.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            while !done.load(Ordering::SeqCst) {
                n += 1;
                let kind = if n.is_multiple_of(2) {
                    "mutating"
                } else {
                    "validating"
                };
                let bundle = bundle_of(&api, kind);
                match review(addr, &bundle, &clock, &body).await {
                    Ok(()) => {
                        reviews.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("background: {e}")),
                }
            }
        })
    };

    // 100 simulated days in 6-hour steps. The kubelet projects the Secret one step late and an
    // API server's view of the bundle is one step old: both lag less than the propagation delay.
    let step = 6 * HOUR;
    let start = clock.now();
    let mut actions: BTreeMap<&str, Vec<Action>> = BTreeMap::new();
    let mut projected_secret = api.get(&secret_path()).unwrap()["data"].clone();
    let mut stale_bundle = bundle_of(&api, "validating");
    // When each CA (base64 DER) first appeared in both configurations' bundles.
    let mut trusted_since: BTreeMap<String, SystemTime> = BTreeMap::new();
    for ca in pems(&ca.cert_pem) {
        trusted_since.insert(ca, clock.now());
    }
    let mut serving_changes = 0;
    let mut ca_changes = 0;
    let mut last_tls = unb64(&projected_secret["tls.crt"]);
    let mut last_ca = unb64(&projected_secret["ca.crt"]);
    let mut max_bundle = 1;
    let failover_at = start + 70 * DAY;
    while clock.now() < start + 100 * DAY {
        clock.advance(step);
        let now = clock.now();
        // Replica a's pod goes away at day 70; b takes over once the Lease lapses.
        if now < failover_at {
            actions
                .entry("moat-a")
                .or_default()
                .extend(first.check().await.unwrap());
        }
        actions
            .entry("moat-b")
            .or_default()
            .extend(second.check().await.unwrap());

        let (mutating, validating) = (bundle_of(&api, "mutating"), bundle_of(&api, "validating"));
        assert_eq!(mutating, validating, "both configurations carry one bundle");
        max_bundle = max_bundle.max(pems(&validating).len());
        for ca in pems(&validating) {
            trusted_since.entry(ca).or_insert(now);
        }
        let secret = api.get(&secret_path()).unwrap();
        let (tls, signer) = (
            unb64(&secret["data"]["tls.crt"]),
            unb64(&secret["data"]["ca.crt"]),
        );
        if tls != last_tls {
            serving_changes += 1;
            // The invariant: a serving certificate enters the Secret only once its CA has been
            // in both bundles for the propagation delay.
            assert!(
                certs::signed_by(&tls, &signer),
                "tls.crt is signed by ca.crt"
            );
            let since = trusted_since[&pems(&signer)[0]];
            assert!(
                now.duration_since(since).unwrap() >= policy.propagation_delay,
                "a serving certificate from a CA trusted only {:?}",
                now.duration_since(since).unwrap()
            );
            last_tls = tls;
        }
        if signer != last_ca {
            ca_changes += 1;
            last_ca = signer;
        }

        // Through the stale view and the current one, a review each, before and after the
        // kubelet's late projection.
        for bundle in [&stale_bundle, &validating] {
            if let Err(e) = review(addr, bundle, &clock, &body).await {
                failures.lock().unwrap().push(format!(
                    "day {}: {e}",
                    (now.duration_since(start).unwrap().as_secs() / 86_400)
                ));
            }
        }
        project(&dir, &projected_secret, addr).await;
        for bundle in [&stale_bundle, &validating] {
            if let Err(e) = review(addr, bundle, &clock, &body).await {
                failures.lock().unwrap().push(format!(
                    "day {}: {e}",
                    (now.duration_since(start).unwrap().as_secs() / 86_400)
                ));
            }
        }
        projected_secret = secret["data"].clone();
        stale_bundle = validating;
    }
    done.store(true, Ordering::SeqCst);
    background.await.unwrap();

    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed reviews: {failures:#?}");
    assert!(
        reviews.load(Ordering::SeqCst) > 100,
        "the background client kept reviewing"
    );
    let count = |who: &str, action: Action| {
        actions
            .get(who)
            .map_or(0, |a| a.iter().filter(|x| **x == action).count())
    };
    let all = |action| count("moat-a", action) + count("moat-b", action);
    // CA lifetime 60 days, rotated with a third left: at about day 40 and day 80.
    assert_eq!(all(Action::CaPromoted), 2, "{actions:?}");
    assert_eq!(ca_changes, 2);
    assert_eq!(all(Action::PreviousCaRemoved), 2);
    assert_eq!(all(Action::CaStaged), 2);
    assert!(
        all(Action::ServingRenewed) >= 4,
        "serving certificates renewed from the same CA: {actions:?}"
    );
    assert_eq!(
        serving_changes,
        all(Action::ServingRenewed) + all(Action::CaPromoted)
    );
    assert_eq!(max_bundle, 2, "old and new CA overlap, never more");
    assert_eq!(
        pems(&bundle_of(&api, "mutating")).len(),
        1,
        "the old CA left"
    );
    // One writer at a time: b followed while a held the Lease, then took over.
    assert!(count("moat-b", Action::Follower) > 0);
    assert!(count("moat-a", Action::CaPromoted) >= 1);
    assert!(
        count("moat-b", Action::CaPromoted) >= 1,
        "b finished the second rotation"
    );
    let lease = api
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{SECRET}-rotation"
        ))
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "moat-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    // A stopping holder gives the Lease up: the other replica takes over at its next check, not
    // a Lease duration later (the clock does not move here).
    assert!(
        !first.release().await.unwrap(),
        "a follower has nothing to release"
    );
    assert!(second.release().await.unwrap());
    assert!(
        !first.check().await.unwrap().contains(&Action::Follower),
        "a released Lease is taken at once"
    );
    let lease = api
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{SECRET}-rotation"
        ))
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "moat-a");
    // Each replica counts the steps it took.
    for (registry, who) in [(&first_registry, "moat-a"), (&second_registry, "moat-b")] {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        let line = format!(
            "moat_cert_rotation_actions_total{{action=\"ca_promoted\"}} {}",
            count(who, Action::CaPromoted)
        );
        assert!(text.contains(&line), "{who}: {text}");
        assert!(!text.contains("follower"), "{text}");
    }
    // Nothing but TLS material in the Secret's volume: ca.key is the price of rotation, and the
    // only key besides the serving key.
    let secret = api.get(&secret_path()).unwrap();
    let mut keys: Vec<&str> = secret["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["ca.crt", "ca.key", "tls.crt", "tls.key"]);

    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_the_controller_when_rotation_is_on() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = temp_dir("wiring");
    let names = vec!["localhost".to_owned()];
    // A Secret from an install without rotation: no ca.key, so a CA rotation starts at once.
    let g = certs::generate(&names).unwrap();
    let ca = certs::Authority {
        cert_pem: g.ca_cert_pem.clone(),
        key_pem: g.ca_key_pem.clone(),
    };
    let api = Arc::new(FakeApi::default());
    seed(&api, &ca, &g.cert_pem, &g.key_pem);
    let mut secret = api.get(&secret_path()).unwrap();
    secret["data"].as_object_mut().unwrap().remove("ca.key");
    api.put(&secret_path(), secret);
    let url = start_api(api.clone()).await;
    certs::write_dir(&dir, &g).unwrap();
    let server = serve(
        dir.join("tls.crt"),
        dir.join("tls.key"),
        Some(write_kubeconfig(&dir, &url)),
        Some(rotation_options(
            "moat-7f9c",
            names,
            RotationPolicy::default(),
        )),
    )
    .await;
    // The first check runs at start: the Lease is taken and the new CA published beside the old.
    let mut published = false;
    for _ in 0..100 {
        if pems(&bundle_of(&api, "validating")).len() == 2
            && pems(&bundle_of(&api, "mutating")).len() == 2
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(published, "the staged CA reached both bundles");
    let lease = api
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{SECRET}-rotation"
        ))
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "moat-7f9c");
    let secret = api.get(&secret_path()).unwrap();
    assert!(secret["data"].get("next-ca.key").is_some());
    assert_eq!(
        unb64(&secret["data"]["tls.crt"]),
        g.cert_pem,
        "no serving certificate from the new CA before the propagation delay"
    );
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A replica that still serves a certificate from the old CA (its kubelet has not synced the
/// Secret) keeps the old CA in the trust bundle past the propagation delay, until its report
/// shows the new one: the CA is retired when every replica has moved, not on a timer alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_ca_leaves_the_bundle_only_when_every_replica_serves_the_new_one() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = temp_dir("replicas");
    let policy = policy();
    let names = vec!["localhost".to_owned()];
    let clock = Arc::new(TestClock(Mutex::new(SystemTime::now())));
    // A CA already due for rotation.
    let ca = certs::new_ca(clock.now() - 45 * DAY, policy.ca_lifetime).unwrap();
    let (cert, key) = certs::issue(&ca, &names, clock.now(), policy.serving_lifetime).unwrap();
    let api = Arc::new(FakeApi::default());
    seed(&api, &ca, &cert, &key);
    let url = start_api(api.clone()).await;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(write_kubeconfig(&dir, &url)).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    // Each replica serves the files its kubelet projected.
    let replica = |who: &str| {
        let files = dir.join(who);
        std::fs::create_dir_all(&files).unwrap();
        certs::write_atomic(&files.join("tls.crt"), cert.as_bytes(), 0o644).unwrap();
        certs::write_atomic(&files.join("tls.key"), key.as_bytes(), 0o600).unwrap();
        let store = Arc::new(
            moat_server::tls::CertStore::from_files(&files.join("tls.crt"), &files.join("tls.key"))
                .unwrap(),
        );
        let rotator = Rotator::new(
            client.clone(),
            rotation_options(who, names.clone(), policy.clone()),
            clock.clone(),
            &mut Registry::default(),
        )
        .unwrap()
        .with_served(store.clone());
        (rotator, store, files)
    };
    let (leader, leader_store, leader_files) = replica("moat-a");
    let (lagging, lagging_store, lagging_files) = replica("moat-b");
    let sync = |files: &Path, store: &moat_server::tls::CertStore| {
        let secret = api.get(&secret_path()).unwrap();
        for name in ["tls.crt", "tls.key"] {
            certs::write_atomic(
                &files.join(name),
                unb64(&secret["data"][name]).as_bytes(),
                0o600,
            )
            .unwrap();
        }
        store.reload_if_changed().unwrap();
    };
    let mut removed_at = None;
    let start = clock.now();
    for step in 0..40 {
        // Reports renew at every check, well within their Lease (the steps here are longer).
        lagging.check().await.unwrap();
        leader.check().await.unwrap();
        // The leader's kubelet keeps up; the other's catches up only after five days.
        sync(&leader_files, &leader_store);
        if clock.now() >= start + 5 * DAY {
            sync(&lagging_files, &lagging_store);
        }
        let bundle = pems(&bundle_of(&api, "mutating"));
        if removed_at.is_none() && bundle.len() == 1 && step > 0 {
            let secret = api.get(&secret_path()).unwrap();
            if secret["data"].get("previous-ca.crt").is_none()
                && secret["data"].get("next-ca.crt").is_none()
                && unb64(&secret["data"]["ca.crt"]) != ca.cert_pem
            {
                removed_at = Some(clock.now());
            }
        }
        clock.advance(6 * HOUR);
    }
    let removed_at = removed_at.expect("the old CA was retired in the end");
    // Promotion comes a delay after staging, retirement a delay after that at the earliest
    // (about two days in): held back here until the lagging replica moved, on day five.
    assert!(
        removed_at >= start + 5 * DAY,
        "retired at {:?} after the start, while a replica still served the old CA",
        removed_at.duration_since(start).unwrap()
    );
    let reports = api
        .list(
            &format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"),
            Some((
                moat_server::rotation::SERVING_REPORT_LABEL,
                &moat_server::rotation::lease_name(SECRET),
            )),
        )
        .unwrap();
    assert_eq!(
        reports["items"].as_array().unwrap().len(),
        2,
        "one report per replica"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

const LAST_APPLIED: &str = moat_server::rotation::LAST_APPLIED;

/// `kubectl apply` (client-side) as it reaches the API: a three-way merge of the configuration
/// the last apply recorded (its annotation), the manifest and the live object. Webhooks merge by
/// name (their `patchMergeKey`); a field the last apply set and this manifest omits is deleted;
/// a Secret's `stringData` is stored as `data`, as the API server does.
fn kubectl_apply(api: &FakeApi, path: &str, manifest: &Value) {
    let mut live = api.get(path).unwrap_or_else(|| json!({}));
    let original: Option<Value> = live["metadata"]["annotations"][LAST_APPLIED]
        .as_str()
        .map(|s| serde_json::from_str(s).unwrap());
    three_way(&mut live, original.as_ref(), manifest);
    if let Some(Value::Object(text)) = live.as_object_mut().and_then(|o| o.remove("stringData")) {
        for (k, v) in text {
            live["data"][k] = json!(b64(v.as_str().unwrap()));
        }
    }
    live["metadata"]["annotations"][LAST_APPLIED] = json!(manifest.to_string());
    api.put(path, live);
}

fn three_way(live: &mut Value, original: Option<&Value>, manifest: &Value) {
    let Value::Object(wanted) = manifest else {
        *live = manifest.clone();
        return;
    };
    if !live.is_object() {
        *live = json!({});
    }
    if let (Some(Value::Object(before)), Some(object)) = (original, live.as_object_mut()) {
        for key in before.keys().filter(|k| !wanted.contains_key(*k)) {
            object.remove(key);
        }
    }
    for (key, value) in wanted {
        let before = original.and_then(|o| o.get(key));
        match value {
            Value::Object(_) => three_way(&mut live[key], before, value),
            Value::Array(items) if key == "webhooks" => {
                let current = live[key].as_array().cloned().unwrap_or_default();
                let named = |list: Option<&Value>, name: &Value| {
                    list.and_then(Value::as_array)
                        .and_then(|l| l.iter().find(|w| w["name"] == *name).cloned())
                };
                let mut merged = Vec::new();
                for item in items {
                    let mut entry = named(live.get(key), &item["name"]).unwrap_or(json!({}));
                    three_way(&mut entry, named(before, &item["name"]).as_ref(), item);
                    merged.push(entry);
                }
                // Items nobody applied stay; items the last apply set and this omits go.
                merged.extend(current.into_iter().filter(|w| {
                    !items.iter().any(|i| i["name"] == w["name"])
                        && named(before, &w["name"]).is_none()
                }));
                live[key] = Value::Array(merged);
            }
            _ => live[key] = value.clone(),
        }
    }
}

/// The webhook configurations as an install's output writes them, with `caBundle` when the
/// output carries one (the previous release's did; this one's does not).
fn webhook_manifests(ca_bundle: Option<&str>) -> Vec<(String, Value)> {
    [
        ("mutating", "MutatingWebhookConfiguration", vec!["mutate.moat.dev"]),
        (
            "validating",
            "ValidatingWebhookConfiguration",
            vec!["validate.moat.dev", "validate-more.moat.dev"],
        ),
    ]
    .into_iter()
    .map(|(kind, kind_name, hooks)| {
        let webhooks: Vec<Value> = hooks
            .iter()
            .map(|name| {
                let mut client = json!({"service": {"name": "moat", "namespace": NS, "path": "/validate", "port": 443}});
                if let Some(ca) = ca_bundle {
                    client["caBundle"] = json!(b64(ca));
                }
                json!({"name": name, "clientConfig": client, "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Fail"})
            })
            .collect();
        (
            webhook_path(kind),
            json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind_name,
                   "metadata": {"name": "moat", "labels": {"app.kubernetes.io/name": "moat"}}, "webhooks": webhooks}),
        )
    })
    .collect()
}

async fn kube_client(dir: &Path, url: &str) -> kube::Client {
    kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(write_kubeconfig(dir, url)).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap()
}

fn no_key_in_any_annotation(api: &FakeApi) {
    for (path, object) in api.objects.lock().unwrap().iter() {
        let notes = object["metadata"]["annotations"].to_string();
        assert!(
            !notes.contains("PRIVATE KEY") && !notes.contains("tls.key"),
            "{path} keeps a key in an annotation: {notes}"
        );
        if let Some(record) = object["metadata"]["annotations"][LAST_APPLIED].as_str() {
            assert!(!record.contains("caBundle"), "{path}: {record}");
        }
    }
}

/// A first install of this release's output: no Secret, no caBundle. The server creates its
/// Secret, publishes the bundle and serves the pair read through the API before its (optional)
/// Secret volume has anything in it; applying the output again changes nothing moat keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_install_bootstraps_its_secret_and_serves_before_the_volume_syncs() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = temp_dir("bootstrap");
    let api = Arc::new(FakeApi::default());
    for (path, manifest) in webhook_manifests(None) {
        kubectl_apply(&api, &path, &manifest);
    }
    let url = start_api(api.clone()).await;
    let volume = dir.join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let server = serve(
        volume.join("tls.crt"),
        volume.join("tls.key"),
        Some(write_kubeconfig(&dir, &url)),
        Some(rotation_options(
            "moat-0",
            vec!["localhost".to_owned()],
            RotationPolicy::default(),
        )),
    )
    .await;
    let addr = server.addr;
    let published = |kind: &str| {
        api.get(&webhook_path(kind)).unwrap()["webhooks"][0]["clientConfig"]["caBundle"].is_string()
    };
    for _ in 0..200 {
        if published("mutating") && published("validating") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let bundle = bundle_of(&api, "validating");
    assert_eq!(bundle, bundle_of(&api, "mutating"));
    assert_eq!(pems(&bundle).len(), 1);

    let secret = api.get(&secret_path()).expect("moat created its Secret");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "moat"
    );
    let mut keys: Vec<&String> = secret["data"].as_object().unwrap().keys().collect();
    keys.sort_unstable();
    assert_eq!(keys, ["ca.crt", "ca.key", "tls.crt", "tls.key"]);
    assert!(
        certs::signed_by(&unb64(&secret["data"]["tls.crt"]), &bundle),
        "the bundle trusts the serving certificate at once: nothing was trusted before"
    );

    // Served with nothing in the volume yet: the pair came through the API.
    assert!(!volume.join("tls.crt").exists());
    let clock = Arc::new(TestClock(Mutex::new(SystemTime::now())));
    let body = review_body();
    review(addr, &bundle, &clock, &body).await.unwrap();

    // GitOps: the same output, applied again and again.
    for _ in 0..3 {
        for (path, manifest) in webhook_manifests(None) {
            kubectl_apply(&api, &path, &manifest);
        }
        assert_eq!(bundle_of(&api, "validating"), bundle);
        assert_eq!(bundle_of(&api, "mutating"), bundle);
        review(addr, &bundle_of(&api, "mutating"), &clock, &body)
            .await
            .unwrap();
    }
    assert_eq!(
        api.get(&secret_path()).unwrap()["data"],
        secret["data"],
        "the Secret is moat's alone"
    );
    no_key_in_any_annotation(&api);
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The previous release's output carried the Secret (with its keys) and the caBundle, and
/// kubectl recorded both. After the documented one-time step (dropping kubectl's record from
/// the two webhook configurations), this release's output is applied, moat's controller takes
/// over the Secret, and the output is re-applied every week through a year of rotations: a
/// client that trusts only the published bundle never fails a review.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_and_a_year_of_weekly_reapplies_fail_no_review() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = temp_dir("upgrade");
    let policy = policy();
    let names = vec!["localhost".to_owned()];
    let clock = Arc::new(TestClock(Mutex::new(SystemTime::now())));
    let api = Arc::new(FakeApi::default());

    // The previous release, applied with kubectl.
    let g = certs::generate(&names).unwrap();
    kubectl_apply(
        &api,
        &secret_path(),
        &json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": SECRET, "namespace": NS},
                "stringData": {"tls.crt": g.cert_pem, "tls.key": g.key_pem, "ca.crt": g.ca_cert_pem}}),
    );
    for (path, manifest) in webhook_manifests(Some(&g.ca_cert_pem)) {
        kubectl_apply(&api, &path, &manifest);
    }
    certs::write_dir(&dir, &g).unwrap();
    let url = start_api(api.clone()).await;
    let client = kube_client(&dir, &url).await;
    let server = serve(dir.join("tls.crt"), dir.join("tls.key"), None, None).await;
    let addr = server.addr;
    let body = review_body();
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let reviewed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let background = {
        let (api, clock, body, failures, reviewed, done) = (
            api.clone(),
            clock.clone(),
            body.clone(),
            failures.clone(),
            reviewed.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                for kind in ["mutating", "validating"] {
                    let config = api.get(&webhook_path(kind)).unwrap();
                    let Some(bundle) = config["webhooks"][0]["clientConfig"]["caBundle"].as_str()
                    else {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{kind}: no caBundle"));
                        continue;
                    };
                    match review(addr, &unb64(&json!(bundle)), &clock, &body).await {
                        Ok(()) => {
                            reviewed.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failures.lock().unwrap().push(format!("{kind}: {e}")),
                    }
                }
            }
        })
    };

    // The one-time step (README, "Upgrading"): kubectl's record of the bundle goes, so the new
    // output (without it) does not delete it.
    for kind in ["mutating", "validating"] {
        let mut config = api.get(&webhook_path(kind)).unwrap();
        config["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(LAST_APPLIED);
        api.put(&webhook_path(kind), config);
    }
    let before = bundle_of(&api, "mutating");
    for (path, manifest) in webhook_manifests(None) {
        kubectl_apply(&api, &path, &manifest);
    }
    assert_eq!(bundle_of(&api, "mutating"), before);
    assert_eq!(bundle_of(&api, "validating"), before);

    // The new release's replica takes the Secret over: kubectl's copy of its keys goes first.
    let store = Arc::new(
        moat_server::tls::CertStore::from_files(&dir.join("tls.crt"), &dir.join("tls.key"))
            .unwrap(),
    );
    let rotator = Rotator::new(
        client,
        rotation_options("moat-new", names.clone(), policy.clone()),
        clock.clone(),
        &mut Registry::default(),
    )
    .unwrap()
    .with_served(store);
    let first = rotator.check().await.unwrap();
    assert!(first.contains(&Action::ApplyRecordCleaned), "{first:?}");
    no_key_in_any_annotation(&api);

    // A year in 12-hour steps; the kubelet projects the Secret one step late; the output is
    // applied again every week.
    let start = clock.now();
    let mut projected = api.get(&secret_path()).unwrap()["data"].clone();
    let mut cas = std::collections::BTreeSet::new();
    let mut step = 0u32;
    while clock.now() < start + 365 * DAY {
        clock.advance(12 * HOUR);
        step += 1;
        rotator.check().await.unwrap();
        if step.is_multiple_of(14) {
            let bundle = bundle_of(&api, "validating");
            for (path, manifest) in webhook_manifests(None) {
                kubectl_apply(&api, &path, &manifest);
            }
            assert_eq!(
                bundle_of(&api, "validating"),
                bundle,
                "an apply moved the bundle"
            );
            assert_eq!(
                bundle_of(&api, "mutating"),
                bundle,
                "an apply moved the bundle"
            );
        }
        let secret = api.get(&secret_path()).unwrap();
        cas.insert(unb64(&secret["data"]["ca.crt"]));
        project(&dir, &projected, addr).await;
        projected = secret["data"].clone();
    }
    done.store(true, Ordering::SeqCst);
    background.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed reviews: {failures:#?}");
    assert!(
        reviewed.load(Ordering::SeqCst) > 100,
        "the client kept reviewing"
    );
    assert!(
        cas.len() >= 8,
        "a CA rotation about every 40 days: {}",
        cas.len()
    );
    no_key_in_any_annotation(&api);
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The one-time step skipped: when the new release's moat runs before its output is applied
/// (the image upgraded first, or a GitOps tool that rolls the Deployment before the webhook
/// configurations), it drops the bundle from kubectl's record and the apply keeps it. When the
/// output comes first, kubectl deletes the bundle it recorded; moat restores it at its next
/// check, and later applies (recorded without a bundle) never delete it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_upgrade_step_costs_at_most_one_check_and_never_recurs() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let names = vec!["localhost".to_owned()];
    for moat_first in [true, false] {
        let dir = temp_dir(&format!("skipped-{moat_first}"));
        let api = Arc::new(FakeApi::default());
        let g = certs::generate(&names).unwrap();
        let ca = certs::Authority {
            cert_pem: g.ca_cert_pem.clone(),
            key_pem: g.ca_key_pem.clone(),
        };
        seed(&api, &ca, &g.cert_pem, &g.key_pem);
        for (path, manifest) in webhook_manifests(Some(&g.ca_cert_pem)) {
            kubectl_apply(&api, &path, &manifest);
        }
        let url = start_api(api.clone()).await;
        let rotator = Rotator::new(
            kube_client(&dir, &url).await,
            rotation_options("moat-0", names.clone(), policy()),
            Arc::new(TestClock(Mutex::new(SystemTime::now()))),
            &mut Registry::default(),
        )
        .unwrap();
        let apply_new = || {
            for (path, manifest) in webhook_manifests(None) {
                kubectl_apply(&api, &path, &manifest);
            }
        };
        let trusted = |kind: &str| {
            api.get(&webhook_path(kind)).unwrap()["webhooks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| {
                    w["clientConfig"]["caBundle"].is_string()
                        && certs::signed_by(&g.cert_pem, &unb64(&w["clientConfig"]["caBundle"]))
                })
        };
        if moat_first {
            let actions = rotator.check().await.unwrap();
            assert!(actions.contains(&Action::BundlePatched), "{actions:?}");
            no_key_in_any_annotation(&api);
            apply_new();
            assert!(trusted("mutating") && trusted("validating"), "moat_first");
        } else {
            apply_new();
            assert!(
                !trusted("mutating"),
                "kubectl deleted what its record held (the model, and the reason for the step)"
            );
            let actions = rotator.check().await.unwrap();
            assert!(actions.contains(&Action::BundlePatched), "{actions:?}");
            assert!(trusted("mutating") && trusted("validating"));
        }
        for _ in 0..2 {
            apply_new();
            assert!(trusted("mutating") && trusted("validating"), "{moat_first}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
