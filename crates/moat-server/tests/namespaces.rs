//! The namespace cache against a test double of the Kubernetes API's list and watch protocol
//! (metadata-only `PartialObjectMetadataList`, then a chunked stream of watch events), with the
//! production code path: `Server::bind` finds the API through a kubeconfig (`--kubeconfig`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_core::config::Config;
use moat_server::server::{ServeOptions, Server, TlsSource};
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The API double: namespaces with labels, a resourceVersion, and open watches to feed.
#[derive(Default)]
struct FakeApi {
    namespaces: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    watchers: Mutex<Vec<mpsc::UnboundedSender<Bytes>>>,
    lists: AtomicUsize,
    watches: AtomicUsize,
    version: AtomicUsize,
    list_delay: Mutex<Duration>,
}

fn partial(name: &str, labels: &BTreeMap<String, String>, rv: usize) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {"name": name, "labels": labels, "resourceVersion": rv.to_string(), "uid": format!("uid-{name}")},
    })
}

impl FakeApi {
    fn set(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let rv = self.version.fetch_add(1, Ordering::SeqCst) + 100;
        let existed = self
            .namespaces
            .lock()
            .unwrap()
            .insert(name.to_owned(), labels.clone())
            .is_some();
        let event = json!({"type": if existed { "MODIFIED" } else { "ADDED" }, "object": partial(name, &labels, rv)});
        let line = Bytes::from(format!("{event}\n"));
        self.watchers
            .lock()
            .unwrap()
            .retain(|w| w.send(line.clone()).is_ok());
    }

    async fn handle(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<BoxBody<Bytes, Infallible>>, Infallible> {
        let query = req.uri().query().unwrap_or_default().to_owned();
        assert_eq!(
            req.uri().path(),
            "/api/v1/namespaces",
            "moat only reads namespaces"
        );
        let accept = req
            .headers()
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            accept.contains("as=PartialObjectMetadata"),
            "metadata-only requests: {accept}"
        );
        if query.contains("watch=true") {
            self.watches.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            self.watchers.lock().unwrap().push(tx);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
            });
            let body = BoxBody::new(StreamBody::new(stream));
            return Ok(hyper::Response::builder()
                .header("content-type", "application/json")
                .body(body)
                .unwrap());
        }
        self.lists.fetch_add(1, Ordering::SeqCst);
        let delay = *self.list_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let rv = self.version.load(Ordering::SeqCst) + 100;
        let items: Vec<Value> = self
            .namespaces
            .lock()
            .unwrap()
            .iter()
            .map(|(n, l)| partial(n, l, rv))
            .collect();
        let list = json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        });
        let body = Full::new(Bytes::from(list.to_string()))
            .map_err(|e| match e {})
            .boxed();
        Ok(hyper::Response::builder()
            .header("content-type", "application/json")
            .body(body)
            .unwrap())
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
                let service = service_fn(move |req| api.clone().handle(req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

async fn request(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn pod_review(namespace: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": format!("uid-{namespace}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE",
            "userInfo": {"username": "alice"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": namespace, "labels": {"moat.dev/class": "gold"}},
                "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]},
            },
            "dryRun": false,
        },
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classes_bound_by_namespace_labels_follow_the_watched_cache() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = Arc::new(FakeApi::default());
    api.set("bank", &[("tier", "gold")]);
    api.set("lab", &[]);
    *api.list_delay.lock().unwrap() = Duration::from_millis(1500);
    let url = start_api(api.clone()).await;

    let dir = std::env::temp_dir().join(format!("moat-ns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: '{url}'}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
    .unwrap();

    let config = Config::from_yaml("isolation: {mode: class, classes: [{name: gold, namespaceSelector: {matchLabels: {tier: gold}}}]}").unwrap();
    let ca = dir.join("ca.pem");
    let server = Server::bind(ServeOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        config,
        config_path: None,
        tls: TlsSource::SelfSigned { ca_out: ca.clone() },
        kubeconfig: Some(kubeconfig.clone()),
        idle_timeout: moat_server::limits::CONNECTION_IDLE_TIMEOUT,
        rotation: None,
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

    // Not ready until the first list arrives.
    let (status, body) = request(addr, &ca, "GET", "/readyz", Vec::new()).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("namespace cache")
    );
    let mut ready = false;
    for _ in 0..100 {
        if request(addr, &ca, "GET", "/readyz", Vec::new()).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "ready once the cache synced");

    let (_, review) = request(addr, &ca, "POST", "/mutate", pod_review("bank")).await;
    assert_eq!(review["response"]["allowed"], true, "{review}");
    let (_, review) = request(addr, &ca, "POST", "/mutate", pod_review("lab")).await;
    assert_eq!(review["response"]["allowed"], false);
    assert!(
        review["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("namespace 'lab' may not use isolation class 'gold'")
    );

    // The operator labels `lab`: the watch delivers it, no review asks the API.
    api.set("lab", &[("tier", "gold")]);
    let mut allowed = false;
    for _ in 0..100 {
        let (_, review) = request(addr, &ca, "POST", "/mutate", pod_review("lab")).await;
        if review["response"]["allowed"] == true {
            allowed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(allowed, "the label change reached the cache");
    assert_eq!(api.lists.load(Ordering::SeqCst), 1, "one list");
    assert_eq!(
        api.watches.load(Ordering::SeqCst),
        1,
        "one watch, however many reviews"
    );

    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
