//! moat's container image on a real containerd 1.7: the archive `scripts/build-image.sh` builds
//! is imported as an operator would on a node (`ctr -n k8s.io images import`), then the image
//! `moat install` deploys runs through the CRI API, as the kubelet would run it, with the
//! Deployment's arguments, certificate and configuration, and answers reviews over TLS from
//! inside the container. `scripts/test.sh` builds the image, starts the test containerd
//! (`scripts/start-test-containerd.sh`) and runs this ignored test with
//! `MOAT_E2E_CONTAINERD_DIR` and `MOAT_E2E_IMAGE_ARCHIVE` set; without them it fails.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// The namespace `moat install` is run for: it names the serving certificate
/// (`moat.<ns>.svc`), which the test's client checks as the API server would.
const NAMESPACE: &str = "moat-e2e-image";
/// moat install's runAsUser, which the image's own `User` must match.
const RUN_AS_ID: u32 = 65532;

fn env_path(name: &str, what: &str) -> PathBuf {
    std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "{name} names {what} (scripts/test.sh sets it and runs this test with --ignored)"
            )
        })
}

/// `moat install`'s objects, from the binary under test.
fn install() -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        // Static certificates: no API server here for moat to create its Secret in.
        .args(["install", "--namespace", NAMESPACE, "--static-certs"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml_ng::Deserializer::from_slice(&out.stdout)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in moat install's output"))
}

async fn cri(socket: &Path) -> RuntimeServiceClient<Channel> {
    let path = socket.to_owned();
    let channel = Endpoint::from_static("http://containerd.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .unwrap();
    RuntimeServiceClient::new(channel)
}

/// A port on 127.0.0.1 that nothing listens on now (the container binds it next; host
/// network, and fixed ports could clash with whatever else runs on this machine).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `files` into a new directory laid out as a Secret or ConfigMap volume presents them
/// (directory 0755, files 0644: the volume's defaultMode), for a bind mount.
fn volume(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    dir.to_owned()
}

/// The Deployment's arguments with the two listen addresses moved to free loopback ports.
fn args_with_addrs(args: &[Value], review: SocketAddr, metrics: SocketAddr) -> Vec<String> {
    let mut out: Vec<String> = args
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    for (flag, addr) in [("--addr", review), ("--metrics-addr", metrics)] {
        let i = out
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("the Deployment passes no {flag}"));
        out[i + 1] = addr.to_string();
    }
    out
}

/// A TLS client that trusts only the webhook configuration's caBundle and checks the Service
/// name, as the API server does.
struct Client {
    connector: TlsConnector,
    addr: SocketAddr,
    server_name: ServerName<'static>,
}

impl Client {
    fn new(ca_bundle_b64: &str, addr: SocketAddr) -> Self {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(ca_bundle_b64)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            connector: TlsConnector::from(Arc::new(config)),
            addr,
            server_name: ServerName::try_from(format!("moat.{NAMESPACE}.svc")).unwrap(),
        }
    }

    /// One request over HTTP/1.1 on a new connection; an error if the server cannot be reached.
    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("moat.{NAMESPACE}.svc"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Ok((status, bytes.to_vec()))
    }

    async fn review(&self, fixture: &str) -> Value {
        let body = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../moat-server/tests/data")
                .join(fixture),
        )
        .unwrap();
        let (status, bytes) = self
            .send(http::Method::POST, "/mutate", body)
            .await
            .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        serde_json::from_slice(&bytes).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the test containerd: run by scripts/test.sh"]
async fn the_image_moat_install_deploys_answers_reviews_from_a_real_containerd() {
    // Run without its containerd or the image, the test fails: it never passes without having run.
    let dir = env_path(
        "MOAT_E2E_CONTAINERD_DIR",
        "the directory of a running test containerd",
    );
    let archive = env_path(
        "MOAT_E2E_IMAGE_ARCHIVE",
        "the archive scripts/build-image.sh wrote",
    );
    let socket = dir.join("containerd.sock");
    assert!(socket.exists(), "no containerd.sock in {}", dir.display());
    assert!(archive.is_file(), "no image archive {}", archive.display());
    let work = dir.join(format!("e2e-image-{}", std::process::id()));
    std::fs::create_dir_all(work.join("logs")).unwrap();

    // What moat install deploys: its image, arguments, certificate, configuration, caBundle.
    let docs = install();
    let deployment = find(&docs, "Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let image = container["image"].as_str().unwrap();
    assert_eq!(image, moat::install::DEFAULT_IMAGE);
    let secret_data = &find(&docs, "Secret")["data"];
    let secret = |key: &str| {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(secret_data[key].as_str().unwrap())
            .unwrap();
        String::from_utf8(bytes).unwrap()
    };
    let config = &find(&docs, "ConfigMap")["data"];
    let ca_bundle =
        find(&docs, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .unwrap();

    // Imported as the docs tell an operator to, with nothing to pull: the archive names itself.
    let import = Command::new("ctr")
        .arg("--address")
        .arg(&socket)
        .args(["-n", "k8s.io", "images", "import"])
        .arg(&archive)
        .output()
        .expect("running ctr");
    assert!(
        import.status.success(),
        "ctr images import: {}",
        String::from_utf8_lossy(&import.stderr)
    );

    let tls = volume(
        &work.join("tls"),
        &[
            ("tls.crt", secret("tls.crt").as_str()),
            ("tls.key", secret("tls.key").as_str()),
        ],
    );
    let config_dir = volume(
        &work.join("config"),
        &[("config.yaml", config["config.yaml"].as_str().unwrap())],
    );
    let review_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let args = args_with_addrs(
        container["args"].as_array().unwrap(),
        review_addr,
        metrics_addr,
    );

    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "moat".into(),
            uid: format!("uid-image-{}", std::process::id()),
            namespace: NAMESPACE.into(),
            attempt: 0,
        }),
        log_directory: work.join("logs").display().to_string(),
        // Host network: no CNI here.
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mount = |host: &Path, container: &str| Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly: true,
        ..Default::default()
    };
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "moat".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        // No command: the image's Entrypoint runs. No user: the image's User applies.
        args,
        mounts: vec![
            mount(&tls, "/etc/moat/tls"),
            mount(&config_dir, "/etc/moat/config"),
        ],
        log_path: "moat.log".into(),
        linux: Some(LinuxContainerConfig {
            // The Deployment's container securityContext.
            security_context: Some(LinuxContainerSecurityContext {
                readonly_rootfs: true,
                no_new_privs: true,
                capabilities: Some(Capability {
                    drop_capabilities: vec!["ALL".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    let mut client = cri(&socket).await;
    let pod_id = client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let id = client
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(config),
            sandbox_config: Some(sandbox),
        })
        .await
        .unwrap_or_else(|e| panic!("creating the container from {image}: {}", e.message()))
        .into_inner()
        .container_id;
    client
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();

    // Ready, as the readiness probe asks: over TLS, the Service name checked.
    let https = Client::new(ca_bundle, review_addr);
    let log = work.join("logs/moat.log");
    let start = Instant::now();
    loop {
        if let Ok((200, _)) = https.send(http::Method::GET, "/readyz", Vec::new()).await {
            break;
        }
        let status = client
            .container_status(ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert!(
            status.state == ContainerState::ContainerRunning as i32
                && start.elapsed() < Duration::from_secs(20),
            "moat never became ready (state {}, exit {}): {}",
            status.state,
            status.exit_code,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Reviews answered from inside the container: one allowed and mutated, one denied.
    let review = https.review("pod-create-isolated.json").await;
    let response = &review["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true, "{review}");
    assert_eq!(response["patchType"], "JSONPatch", "{review}");
    let review = https.review("pod-create-untagged.json").await;
    let response = &review["response"];
    assert_eq!(response["allowed"], false, "{review}");
    assert!(
        response["status"]["message"]
            .as_str()
            .unwrap()
            .contains("image 'nginx' has no tag"),
        "{review}"
    );

    // The process runs as the image's user, moat install's runAsUser, not root.
    let verbose = client
        .container_status(ContainerStatusRequest {
            container_id: id.clone(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: Value = serde_json::from_str(&verbose.info["info"]).unwrap();
    let pid = info["pid"].as_u64().unwrap();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        let line = proc_status
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
        line[key.len()..]
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    assert_eq!(ids("Uid:"), vec![RUN_AS_ID; 4]);
    assert_eq!(ids("Gid:"), vec![RUN_AS_ID; 4]);

    // No shell in the image: there is nothing to exec into.
    for shell in ["/bin/sh", "sh"] {
        let exec = client
            .exec_sync(ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec![shell.into(), "-c".into(), "true".into()],
                timeout: 10,
            })
            .await;
        assert!(
            exec.as_ref().map_or(true, |r| r.get_ref().exit_code != 0),
            "{shell} ran in the image: {exec:?}"
        );
    }

    // SIGTERM, as the kubelet stops a pod: moat exits 0.
    client
        .stop_container(StopContainerRequest {
            container_id: id.clone(),
            timeout: 10,
        })
        .await
        .unwrap();
    let status = client
        .container_status(ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(
        status.exit_code,
        0,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    client
        .remove_container(RemoveContainerRequest { container_id: id })
        .await
        .unwrap();
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .unwrap();
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id,
        })
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&work);
}
