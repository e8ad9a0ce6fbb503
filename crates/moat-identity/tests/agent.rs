//! The agent driven through its real NRI socket by the runtime double (containerd's side of the
//! protocol), fetching SVIDs from the SPIRE double over a real Unix socket.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use moat_identity::agent::{Agent, AgentConfig};
use moat_identity::annotations::Defaults;
use moat_identity::attest::SandboxConfig;
use moat_identity::defaults;
use moat_identity::doubles::runtime::{PluginConn, RuntimeDouble, Style};
use moat_identity::doubles::spire::{Mode, SpireDouble, SvidRequest};
use moat_identity::metrics::Metrics;
use moat_identity::plugin::{self, PluginError, PluginOptions};
use moat_identity::proto::nri::{Container, ContainerState, PodSandbox};
use moat_identity::spiffe::{check_chain, split_certificates, uri_sans};
use moat_identity::ttrpc::CallError;
use prometheus_client::registry::Registry;

/// Removes a test's directory when the test ends.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Harness {
    _guard: DirGuard,
    dir: PathBuf,
    spire: SpireDouble,
    runtime: RuntimeDouble,
    conn: PluginConn,
    agent: Agent,
    registry: Registry,
    plugin: tokio::task::JoinHandle<Result<(), PluginError>>,
}

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moat-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn new_agent(dir: &Path, spire: &Path, registry: &mut Registry) -> Agent {
    new_agent_with(dir, spire, registry, SandboxConfig::default())
}

fn new_agent_with(
    dir: &Path,
    spire: &Path,
    registry: &mut Registry,
    sandbox: SandboxConfig,
) -> Agent {
    let config = AgentConfig {
        defaults: Defaults {
            spire_agent_address: spire.to_owned(),
            ..Defaults::default()
        },
        artifact_root: dir.join("artifacts"),
        svid_wait: defaults::SVID_WAIT,
        runtime_request_timeout: defaults::RUNTIME_REQUEST_TIMEOUT,
        sandbox,
        bundle_dir: dir.join("bundles"),
    };
    Agent::new(config, Metrics::register(registry)).unwrap()
}

async fn connect(
    agent: &Agent,
    runtime: &RuntimeDouble,
    socket: &Path,
) -> (PluginConn, tokio::task::JoinHandle<Result<(), PluginError>>) {
    let options = PluginOptions {
        socket: socket.to_owned(),
        name: defaults::PLUGIN_NAME.into(),
        index: "10".parse().unwrap(),
    };
    let task = tokio::spawn(plugin::run(agent.clone(), options, std::future::pending()));
    let conn = runtime.accept().await.unwrap();
    conn.configure().await.unwrap();
    (conn, task)
}

async fn harness(name: &str) -> Harness {
    harness_with(name, SandboxConfig::default()).await
}

async fn harness_with(name: &str, sandbox: SandboxConfig) -> Harness {
    let dir = test_dir(name);
    let spire = SpireDouble::start(&dir.join("spire.sock"), "example.org").unwrap();
    let runtime = RuntimeDouble::bind(&dir.join("nri.sock")).unwrap();
    let mut registry = Registry::default();
    let agent = new_agent_with(&dir, spire.socket(), &mut registry, sandbox);
    let (conn, plugin) = connect(&agent, &runtime, &dir.join("nri.sock")).await;
    conn.synchronize(vec![], vec![]).await.unwrap();
    Harness {
        _guard: DirGuard(dir.clone()),
        dir,
        spire,
        runtime,
        conn,
        agent,
        registry,
        plugin,
    }
}

/// A real process to stand for the container's (its PID is what SPIRE attests).
struct Workload(Child);

impl Workload {
    fn spawn() -> Self {
        Self(Command::new("sleep").arg("60").spawn().unwrap())
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pod(annotations: &[(&str, &str)]) -> PodSandbox {
    PodSandbox {
        id: "pod-1".into(),
        name: "web".into(),
        uid: "uid-1".into(),
        namespace: "shop".into(),
        annotations: annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

fn container(id: &str, name: &str, pid: u32) -> Container {
    Container {
        id: id.into(),
        pod_sandbox_id: "pod-1".into(),
        name: name.into(),
        pid,
        state: ContainerState::ContainerCreated as i32,
        ..Default::default()
    }
}

const WEB: &str = "identity.noderesource.dev/container.web";

fn spiffe_id_of(pem: &str) -> String {
    let leaf = pem::parse(pem).unwrap();
    uri_sans(leaf.contents()).unwrap().remove(0)
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn der_blocks(text: &str, tag: &str) -> Vec<Vec<u8>> {
    pem::parse_many(text)
        .unwrap()
        .into_iter()
        .map(|block| {
            assert_eq!(block.tag(), tag);
            block.into_contents()
        })
        .collect()
}

/// Reads the three files of an entry's directory and checks them against each other: the chain
/// holds together and its leaf carries `id`, the private key is the leaf's, and a root of the
/// bundle signed the chain's last certificate.
fn assert_svid(dir: &Path, id: &str) {
    let chain = der_blocks(&read(dir, "svid.pem"), "CERTIFICATE");
    assert_eq!(check_chain(&chain).unwrap().as_str(), id);
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let key = rcgen::KeyPair::from_pem(&read(dir, "svid_key.pem")).unwrap();
    assert_eq!(
        key.public_key_raw(),
        leaf.public_key().subject_public_key.data.as_ref(),
        "the key file holds the leaf's key"
    );
    let (_, last) = x509_parser::parse_x509_certificate(chain.last().unwrap()).unwrap();
    let roots = der_blocks(&read(dir, "bundle.pem"), "CERTIFICATE");
    assert!(
        roots.iter().any(|root| {
            let (_, root) = x509_parser::parse_x509_certificate(root).unwrap();
            last.verify_signature(Some(root.public_key())).is_ok()
        }),
        "a root of the bundle signed the SVID"
    );
}

fn pem_blocks(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metrics_text(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[tokio::test]
async fn an_annotated_container_gets_its_svid_before_it_starts_and_rotations_reach_it() {
    let h = harness("happy").await;
    let workload = Workload::spawn();
    h.spire
        .register_pid(workload.pid(), "spiffe://example.org/ns/shop/sa/web");
    let pod = pod(&[(
        WEB,
        "[{cert_dir: /run/spiffe, spiffe_id: 'spiffe://example.org/ns/shop/sa/web'}]",
    )]);
    let ctr = container("c1", "web", workload.pid());

    let created = h.conn.create_container(&pod, &ctr).await.unwrap();
    let mounts = created.adjust.unwrap().mounts;
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].destination, "/run/spiffe");
    assert_eq!(mounts[0].r#type, "bind");
    assert!(mounts[0].options.contains(&"ro".to_owned()));
    let dir = PathBuf::from(&mounts[0].source);
    assert!(dir.starts_with(h.dir.join("artifacts")));

    h.conn
        .start_container(&pod, &ctr, Style::StateChange)
        .await
        .unwrap();
    // On disk when StartContainer returns: before the workload's first instruction.
    assert_svid(&dir, "spiffe://example.org/ns/shop/sa/web");
    let svid = std::fs::read_to_string(dir.join("svid.pem")).unwrap();
    assert_eq!(spiffe_id_of(&svid), "spiffe://example.org/ns/shop/sa/web");
    let key = std::fs::read_to_string(dir.join("svid_key.pem")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    let bundle = std::fs::read_to_string(dir.join("bundle.pem")).unwrap();
    assert_eq!(pem_blocks(&bundle), 1);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("svid_key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Rotation: a new SVID replaces the files while the container runs.
    h.spire.rotate();
    eventually("rotated SVID on disk", || {
        std::fs::read_to_string(dir.join("svid.pem")).unwrap() != svid
    })
    .await;
    assert_ne!(
        std::fs::read_to_string(dir.join("svid_key.pem")).unwrap(),
        key
    );
    assert_svid(&dir, "spiffe://example.org/ns/shop/sa/web");

    // A CA rotation: both roots in the bundle.
    h.spire.add_root().unwrap();
    eventually("two roots in the bundle", || {
        pem_blocks(&std::fs::read_to_string(dir.join("bundle.pem")).unwrap()) == 2
    })
    .await;

    let text = metrics_text(&h.registry);
    assert!(
        text.contains("moat_identity_svids_issued_total 1"),
        "{text}"
    );
    assert!(
        text.contains("moat_identity_containers_tracked 1"),
        "{text}"
    );
    assert!(
        !text.contains("moat_identity_svid_rotations_total 0"),
        "{text}"
    );

    // Stop closes the stream; remove deletes the files.
    assert_eq!(h.spire.open_svid_streams(), 1);
    h.conn.stop_container(&pod, &ctr).await.unwrap();
    eventually("stream closed", || h.spire.open_svid_streams() == 0).await;
    assert!(dir.join("svid.pem").exists(), "files stay until removal");
    // A stopped container is no longer followed, and the gauge says so before its removal.
    assert!(
        metrics_text(&h.registry).contains("moat_identity_containers_tracked 0"),
        "{}",
        metrics_text(&h.registry)
    );
    h.conn
        .remove_container(&pod, &ctr, Style::StateChange)
        .await
        .unwrap();
    assert!(!dir.exists());
    assert_eq!(h.agent.tracked(), 0);
}

#[tokio::test]
async fn newer_runtimes_dedicated_calls_work_too() {
    let h = harness("dedicated").await;
    let workload = Workload::spawn();
    h.spire
        .register_pid(workload.pid(), "spiffe://example.org/web");
    let pod = pod(&[("identity.noderesource.dev/pod", "[{}]")]);
    let ctr = container("c1", "anything", workload.pid());
    let created = h.conn.create_container(&pod, &ctr).await.unwrap();
    let dir = PathBuf::from(&created.adjust.unwrap().mounts[0].source);
    h.conn
        .start_container(&pod, &ctr, Style::Dedicated)
        .await
        .unwrap();
    assert_svid(&dir, "spiffe://example.org/web");
    h.conn
        .remove_container(&pod, &ctr, Style::Dedicated)
        .await
        .unwrap();
    assert!(!dir.exists());
}

#[tokio::test]
async fn a_container_without_the_annotation_is_left_alone() {
    let h = harness("plain").await;
    let pod = pod(&[("other", "x")]);
    let ctr = container("c1", "web", 1);
    let created = h.conn.create_container(&pod, &ctr).await.unwrap();
    assert!(created.adjust.is_none());
    h.conn
        .start_container(&pod, &ctr, Style::StateChange)
        .await
        .unwrap();
    assert_eq!(h.spire.open_svid_streams(), 0);
    assert_eq!(h.agent.tracked(), 0);
    assert_eq!(
        std::fs::read_dir(h.dir.join("artifacts")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn a_bad_annotation_fails_only_its_own_container() {
    let h = harness("bad").await;
    let workload = Workload::spawn();
    h.spire
        .register_pid(workload.pid(), "spiffe://example.org/web");
    let pod = pod(&[
        (WEB, "[{cert_dir: ../../etc}]"),
        ("identity.noderesource.dev/container.side", "[{}]"),
    ]);
    let err = h
        .conn
        .create_container(&pod, &container("c1", "web", 0))
        .await
        .unwrap_err();
    let CallError::Status(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code, 3, "INVALID_ARGUMENT");
    assert!(
        status.message.contains("annotation identity.noderesource.dev/container.web, entry 0: cert_dir '../../etc' must be an absolute path"),
        "{}",
        status.message
    );
    // The agent is still answering, and the pod's other container gets its identity.
    let side = container("c2", "side", workload.pid());
    let created = h.conn.create_container(&pod, &side).await.unwrap();
    h.conn
        .start_container(&pod, &side, Style::StateChange)
        .await
        .unwrap();
    assert_svid(
        Path::new(&created.adjust.unwrap().mounts[0].source),
        "spiffe://example.org/web",
    );
    assert!(
        metrics_text(&h.registry).contains("moat_identity_failures_total{reason=\"annotation\"} 1")
    );
    assert!(!h.plugin.is_finished(), "the agent keeps serving");
}

/// Container `web` of a pod whose annotation for it is `annotation`, created through the
/// runtime; SPIRE issues `issue` to its process when given.
struct Web {
    workload: Workload,
    pod: PodSandbox,
    ctr: Container,
    /// The host directory mounted at the entry's `cert_dir`.
    dir: PathBuf,
}

impl Web {
    async fn create(h: &Harness, annotation: &str, issue: Option<&str>) -> Self {
        let workload = Workload::spawn();
        if let Some(id) = issue {
            h.spire.register_pid(workload.pid(), id);
        }
        let pod = pod(&[(WEB, annotation)]);
        let ctr = container("c1", "web", workload.pid());
        let created = h.conn.create_container(&pod, &ctr).await.unwrap();
        let dir = PathBuf::from(&created.adjust.unwrap().mounts[0].source);
        Self {
            workload,
            pod,
            ctr,
            dir,
        }
    }

    async fn start(&self, h: &Harness) -> Result<(), CallError> {
        h.conn
            .start_container(&self.pod, &self.ctr, Style::StateChange)
            .await
    }

    fn svid(&self) -> String {
        std::fs::read_to_string(self.dir.join("svid.pem")).unwrap()
    }
}

#[tokio::test]
async fn no_svid_in_time_fails_the_start_before_the_runtime_timeout() {
    let h = harness("stall").await;
    h.spire.set_mode(Mode::Stall);
    let web = Web::create(&h, "[{}]", None).await;
    let err = web.start(&h).await.unwrap_err();
    // An answer, not a runtime-side timeout (which would start the container without us).
    let CallError::Status(status) = err else {
        panic!("expected an error status, got {err}")
    };
    assert_eq!(status.code, 9, "FAILED_PRECONDITION");
    assert!(status.message.contains("no SVID"), "{}", status.message);
    assert!(h.agent.effective_wait() <= h.conn.timeout - moat_identity::agent::ANSWER_MARGIN);
    assert!(
        metrics_text(&h.registry).contains("moat_identity_failures_total{reason=\"timeout\"} 1")
    );
}

#[tokio::test]
async fn fail_open_starts_without_an_svid_and_is_counted_then_catches_up() {
    let h = harness("failopen").await;
    // Not attested: the double answers with no SVID.
    let web = Web::create(&h, "[{fail_open: true}]", None).await;
    web.start(&h).await.unwrap();
    assert!(!web.dir.join("svid.pem").exists());
    assert!(metrics_text(&h.registry).contains("moat_identity_fail_open_starts_total 1"));
    // The stream stays open: once SPIRE attests the PID, the files appear.
    h.spire
        .register_pid(web.workload.pid(), "spiffe://example.org/late");
    eventually("late SVID", || web.dir.join("svid.pem").exists()).await;
    assert_svid(&web.dir, "spiffe://example.org/late");
}

#[tokio::test]
async fn an_unattested_pid_gets_its_svid_when_spire_catches_up_within_the_wait() {
    let h = harness("late").await;
    let web = Web::create(&h, "[{}]", None).await;
    let register = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.spire
            .register_pid(web.workload.pid(), "spiffe://example.org/web");
    };
    let (started, ()) = tokio::join!(web.start(&h), register);
    started.unwrap();
    assert_svid(&web.dir, "spiffe://example.org/web");
}

#[tokio::test]
async fn permission_denied_fails_the_start_at_once_with_spires_reason() {
    let h = harness("denied").await;
    h.spire.set_mode(Mode::Deny);
    let web = Web::create(&h, "[{}]", None).await;
    let err = web.start(&h).await.unwrap_err();
    // SPIRE's own reason, not a timeout: waiting cannot fix a caller that is not authorized.
    assert!(err.to_string().contains("authorized delegate"), "{err}");
    assert!(!err.to_string().contains("none within"), "{err}");
    assert!(metrics_text(&h.registry).contains("reason=\"permission_denied\""));
}

#[tokio::test]
async fn an_svid_with_another_spiffe_id_is_refused() {
    let h = harness("mismatch").await;
    let web = Web::create(
        &h,
        "[{spiffe_id: 'spiffe://example.org/web'}]",
        Some("spiffe://example.org/someone-else"),
    )
    .await;
    let err = web.start(&h).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("not the expected spiffe://example.org/web"),
        "{err}"
    );
    assert!(!web.dir.join("svid.pem").exists());
}

#[tokio::test]
async fn a_broken_stream_keeps_the_files_and_recovers() {
    let h = harness("recover").await;
    let web = Web::create(&h, "[{}]", Some("spiffe://example.org/web")).await;
    web.start(&h).await.unwrap();
    assert_svid(&web.dir, "spiffe://example.org/web");
    let first = web.svid();
    // PermissionDenied on an open stream: the files stay, the failure is counted.
    h.spire.set_mode(Mode::Deny);
    eventually("denial counted", || {
        metrics_text(&h.registry).contains("reason=\"permission_denied\"")
    })
    .await;
    assert_eq!(web.svid(), first);
    // And when SPIRE serves again, the agent re-subscribes on its own.
    h.spire.set_mode(Mode::Serve);
    eventually("re-subscribed with a new SVID", || web.svid() != first).await;
    assert_svid(&web.dir, "spiffe://example.org/web");
}

#[tokio::test]
async fn after_a_restart_synchronize_rebuilds_state_without_duplicate_streams() {
    let mut h = harness("restart").await;
    let mut web = Web::create(&h, "[{}]", Some("spiffe://example.org/web")).await;
    web.start(&h).await.unwrap();
    assert_svid(&web.dir, "spiffe://example.org/web");
    // A directory for a container the runtime no longer has.
    let stale = h.dir.join("artifacts/gone/0");
    std::fs::create_dir_all(&stale).unwrap();

    // The agent process dies: its streams end with it.
    h.plugin.abort();
    let _ = (&mut h.plugin).await;
    h.agent.shutdown();
    eventually("old stream closed", || h.spire.open_svid_streams() == 0).await;

    // A new agent over the same directories.
    let mut registry = Registry::default();
    let agent = new_agent(&h.dir, h.spire.socket(), &mut registry);
    let (conn, plugin) = connect(&agent, &h.runtime, &h.dir.join("nri.sock")).await;
    web.ctr.state = ContainerState::ContainerRunning as i32;
    conn.synchronize(vec![web.pod.clone()], vec![web.ctr.clone()])
        .await
        .unwrap();
    assert_eq!(agent.tracked(), 1);
    assert!(!stale.exists(), "stale directory removed");
    eventually("one stream again", || h.spire.open_svid_streams() == 1).await;
    // A second Synchronize (the runtime restarting) adds nothing.
    conn.synchronize(vec![web.pod.clone()], vec![web.ctr.clone()])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.spire.open_svid_streams(), 1);
    // Rotations reach the files again.
    let before = web.svid();
    h.spire.rotate();
    eventually("rotation after restart", || web.svid() != before).await;
    assert_svid(&web.dir, "spiffe://example.org/web");
    h.agent = agent;
    h.conn = conn;
    h.plugin = plugin;
}

#[tokio::test]
async fn the_plugin_ends_with_an_error_when_the_runtime_goes_away() {
    let h = harness("gone").await;
    let Harness { conn, plugin, .. } = h;
    conn.close();
    let result = tokio::time::timeout(Duration::from_secs(5), plugin)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(result, Err(PluginError::Closed)), "{result:?}");
}

#[tokio::test]
async fn the_plugin_registers_with_its_name_and_index() {
    let h = harness("register").await;
    assert_eq!(h.conn.registration.plugin_name, "moat-identity");
    assert_eq!(h.conn.registration.plugin_idx, "10");
}

#[test]
fn roots_split_the_way_spire_sends_them() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = test_dir("roots");
        let spire = SpireDouble::start(&dir.join("s.sock"), "example.org").unwrap();
        spire.add_root().unwrap();
        let joined: Vec<u8> = spire.roots_der().concat();
        assert_eq!(split_certificates(&joined).unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

// Sandboxed pods: every container reports the sandbox's PID (gVisor) or the VM's (Kata), so the
// agent names each container to SPIRE by selectors, and the files belong to the user in the
// container's OCI spec.

const CLASS: &str = "moat.dev/class";

/// A pod running under `handler` whose sandbox process is `pid` (0: not reported), with a class,
/// a stamped service account, a tenant label, and identity for every container.
fn sandboxed_pod(handler: &str, pid: u32) -> PodSandbox {
    let mut p = pod(&[
        ("identity.noderesource.dev/pod", "[{cert_dir: /run/spiffe}]"),
        ("moat.dev/service-account", "web"),
    ]);
    p.runtime_handler = handler.into();
    p.pid = pid;
    p.labels = [
        (CLASS.to_owned(), "gold".to_owned()),
        ("team".to_owned(), "payments".to_owned()),
    ]
    .into();
    p
}

/// Writes the OCI spec the runtime would run for `id`, with its user.
fn write_spec(h: &Harness, id: &str, uid: u32, gid: u32) {
    let dir = h.dir.join("bundles").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = format!(
        r#"{{"ociVersion":"1.1.0","process":{{"user":{{"uid":{uid},"gid":{gid}}},"args":["/bin/app"],"cwd":"/"}}}}"#
    );
    std::fs::write(dir.join("config.json"), spec).unwrap();
}

/// The uid/gid pairs the test can hand files to: others when root (so a missing chown fails the
/// test), its own otherwise.
fn users() -> [(u32, u32); 2] {
    let me = std::fs::metadata("/proc/self").unwrap();
    use std::os::unix::fs::MetadataExt;
    if me.uid() == 0 {
        [(0, 0), (1000, 1000)]
    } else {
        [(me.uid(), me.gid()), (me.uid(), me.gid())]
    }
}

fn owner(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.uid(), m.gid())
}

/// Registers, per container name, an entry that needs the pod's class and handler.
fn register_per_container(h: &Harness, handler: &str, names: &[&str]) {
    for name in names {
        h.spire.register_selectors(
            &[
                "k8s:ns:shop",
                "k8s:sa:web",
                &format!("k8s:container-name:{name}"),
                &format!("k8s:pod-label:{CLASS}:gold"),
                &format!("moat:runtime-handler:{handler}"),
            ],
            &format!("spiffe://example.org/gold/{handler}/{name}"),
        );
    }
}

async fn create_and_start(h: &Harness, pod: &PodSandbox, ctr: &Container, style: Style) -> PathBuf {
    let created = h.conn.create_container(pod, ctr).await.unwrap();
    let dir = PathBuf::from(&created.adjust.unwrap().mounts[0].source);
    h.conn.start_container(pod, ctr, style).await.unwrap();
    dir
}

#[tokio::test]
async fn gvisor_containers_of_one_pod_get_their_own_identities_by_selectors_owned_by_their_users() {
    let h = harness("gvisor").await;
    // runsc: both containers report the sandbox's PID, which is also the pod's.
    let sandbox_pid = 4242;
    let pod = sandboxed_pod("runsc", sandbox_pid);
    register_per_container(&h, "runsc", &["app", "side"]);
    // A tenant's own label must never be a selector: an entry that needs it never matches.
    h.spire.register_selectors(
        &["k8s:ns:shop", "k8s:pod-label:team:payments"],
        "spiffe://example.org/by-tenant-label",
    );
    let [root, user] = users();
    let app = container("g-app", "app", sandbox_pid);
    let side = container("g-side", "side", sandbox_pid);
    write_spec(&h, &app.id, root.0, root.1);
    write_spec(&h, &side.id, user.0, user.1);

    let app_dir = create_and_start(&h, &pod, &app, Style::StateChange).await;
    let side_dir = create_and_start(&h, &pod, &side, Style::StateChange).await;
    assert_svid(&app_dir, "spiffe://example.org/gold/runsc/app");
    assert_svid(&side_dir, "spiffe://example.org/gold/runsc/side");
    for dir in [&app_dir, &side_dir] {
        let ids = spiffe_id_of(&read(dir, "svid.pem"));
        assert_ne!(ids, "spiffe://example.org/by-tenant-label");
    }
    assert_eq!(owner(&app_dir.join("svid_key.pem")), root);
    assert_eq!(owner(&side_dir.join("svid_key.pem")), user);

    // SPIRE was asked by selectors only, with the class and the handler; never for the PID.
    let requests = h.spire.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    for (request, name) in requests.iter().zip(["app", "side"]) {
        let SvidRequest::Selectors(s) = request else {
            panic!("a PID request for a sandboxed container: {request:?}")
        };
        assert_eq!(
            s,
            &[
                format!("k8s:container-name:{name}"),
                "k8s:ns:shop".to_owned(),
                format!("k8s:pod-label:{CLASS}:gold"),
                "k8s:pod-name:web".to_owned(),
                "k8s:pod-uid:uid-1".to_owned(),
                "k8s:sa:web".to_owned(),
                "moat:runtime-handler:runsc".to_owned(),
            ]
        );
    }

    // Rotation reaches both.
    let before = read(&side_dir, "svid.pem");
    h.spire.rotate();
    eventually("rotated SVID", || read(&side_dir, "svid.pem") != before).await;
    assert_svid(&side_dir, "spiffe://example.org/gold/runsc/side");
    assert_eq!(owner(&side_dir.join("svid_key.pem")), user);
}

/// The forgery the issue showed end to end: under a configuration whose keys are not moat's
/// defaults (the shipped ipp-compatible one polices `ipp-class` and stamps nothing), a tenant
/// writes `moat.dev/service-account` and `moat.dev/class` itself. The agent reads the same
/// configuration as the webhook, so neither reaches SPIRE and the forged identity is not issued.
#[tokio::test]
async fn under_a_non_default_configuration_keys_a_tenant_writes_name_nothing() {
    let config = moat_core::config::Config::from_yaml(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/ipp-compatible.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let sandbox = SandboxConfig::from_moat(&config, SandboxConfig::default().handlers);
    let h = harness_with("forged", sandbox).await;
    let mut pod = sandboxed_pod("runsc", 4242);
    pod.annotations
        .insert("moat.dev/service-account".into(), "payments".into());
    h.spire.register_selectors(
        &["k8s:ns:shop", "k8s:sa:payments"],
        "spiffe://example.org/ns/shop/sa/payments",
    );
    h.spire.register_selectors(
        &["k8s:ns:shop", &format!("k8s:pod-label:{CLASS}:gold")],
        "spiffe://example.org/gold",
    );
    let app = container("f-app", "app", 4242);
    let [root, _] = users();
    write_spec(&h, &app.id, root.0, root.1);
    h.conn.create_container(&pod, &app).await.unwrap();
    let started = h.conn.start_container(&pod, &app, Style::StateChange).await;
    assert!(
        started.is_err(),
        "no identity, so the container does not start"
    );
    let requests = h.spire.requests();
    assert!(!requests.is_empty());
    for request in requests {
        let SvidRequest::Selectors(s) = request else {
            panic!("a PID request for a sandboxed container: {request:?}")
        };
        assert!(
            !s.iter()
                .any(|s| s.starts_with("k8s:sa:") || s.contains("moat.dev/class")),
            "a key the configuration does not police reached SPIRE: {s:?}"
        );
    }
}

#[tokio::test]
async fn kata_shaped_events_name_containers_by_selectors_and_survive_a_restart() {
    let mut h = harness("kata").await;
    // Kata: the PID is the VM's (the same for every container), and the pod's is not reported.
    let vm_pid = 777;
    let pod = sandboxed_pod("kata-qemu", 0);
    register_per_container(&h, "kata-qemu", &["app", "side"]);
    let [_, user] = users();
    let mut app = container("k-app", "app", vm_pid);
    let mut side = container("k-side", "side", vm_pid);
    write_spec(&h, &app.id, user.0, user.1);
    write_spec(&h, &side.id, user.0, user.1);
    // Newer NRI's dedicated calls, as a Kata node on containerd 2 sends them.
    let app_dir = create_and_start(&h, &pod, &app, Style::Dedicated).await;
    let side_dir = create_and_start(&h, &pod, &side, Style::Dedicated).await;
    assert_svid(&app_dir, "spiffe://example.org/gold/kata-qemu/app");
    assert_svid(&side_dir, "spiffe://example.org/gold/kata-qemu/side");
    assert_eq!(owner(&app_dir.join("svid_key.pem")), user);
    assert!(
        h.spire
            .requests()
            .iter()
            .all(|r| matches!(r, SvidRequest::Selectors(s) if s.contains(&"moat:runtime-handler:kata-qemu".to_owned())))
    );

    // The agent restarts; Synchronize lists the running containers (a Kata runtime may report no
    // PID at all), and they are followed again by selectors.
    h.plugin.abort();
    h.agent.shutdown();
    let mut registry = Registry::default();
    let agent = new_agent(&h.dir, h.spire.socket(), &mut registry);
    let (conn, plugin) = connect(&agent, &h.runtime, &h.dir.join("nri.sock")).await;
    for c in [&mut app, &mut side] {
        c.state = ContainerState::ContainerRunning as i32;
        c.pid = 0;
    }
    conn.synchronize(vec![pod.clone()], vec![app.clone(), side.clone()])
        .await
        .unwrap();
    assert_eq!(agent.tracked(), 2);
    let before = read(&app_dir, "svid.pem");
    h.spire.rotate();
    eventually("rotation after the restart", || {
        read(&app_dir, "svid.pem") != before
    })
    .await;
    assert_svid(&app_dir, "spiffe://example.org/gold/kata-qemu/app");
    assert!(
        !h.spire
            .requests()
            .iter()
            .any(|r| matches!(r, SvidRequest::Pid(_)))
    );
    assert!(
        !metrics_text(&registry).contains("started_without_svid"),
        "both had their files before they ran"
    );
    h.conn = conn;
    h.plugin = plugin;
}

#[tokio::test]
async fn an_unlisted_handler_that_reports_the_sandbox_pid_is_treated_as_a_sandbox() {
    let h = harness("sandboxpid").await;
    let pod = sandboxed_pod("gvisor-custom", 55);
    register_per_container(&h, "gvisor-custom", &["app"]);
    let app = container("u-app", "app", 55);
    let [_, user] = users();
    write_spec(&h, &app.id, user.0, user.1);
    let dir = create_and_start(&h, &pod, &app, Style::StateChange).await;
    assert_svid(&dir, "spiffe://example.org/gold/gvisor-custom/app");
    assert!(matches!(
        &h.spire.requests()[..],
        [SvidRequest::Selectors(_)]
    ));
}

#[tokio::test]
async fn a_sandboxed_container_whose_user_is_unknown_does_not_start() {
    let h = harness("nospec").await;
    let pod = sandboxed_pod("runsc", 9);
    register_per_container(&h, "runsc", &["app"]);
    let app = container("n-app", "app", 9);
    h.conn.create_container(&pod, &app).await.unwrap();
    let err = h
        .conn
        .start_container(&pod, &app, Style::StateChange)
        .await
        .unwrap_err();
    let CallError::Status(status) = err else {
        panic!("expected an error status, got {err}")
    };
    assert!(
        status.message.contains("cannot tell whose the files are")
            && status.message.contains("config.json"),
        "{}",
        status.message
    );
    assert!(
        h.spire.requests().is_empty(),
        "no SVID is fetched for nobody"
    );
}

#[tokio::test]
async fn without_a_reported_timeout_the_configured_one_bounds_the_wait_and_is_named() {
    let dir = test_dir("assumed");
    let _guard = DirGuard(dir.clone());
    let spire = SpireDouble::start(&dir.join("spire.sock"), "example.org").unwrap();
    spire.set_mode(Mode::Stall);
    let runtime = RuntimeDouble::bind(&dir.join("nri.sock")).unwrap();
    let mut registry = Registry::default();
    // containerd configured with plugin_request_timeout = "1s", and the agent told so.
    let config = AgentConfig {
        defaults: Defaults {
            spire_agent_address: spire.socket().to_owned(),
            ..Defaults::default()
        },
        artifact_root: dir.join("artifacts"),
        svid_wait: defaults::SVID_WAIT,
        runtime_request_timeout: Duration::from_secs(1),
        sandbox: SandboxConfig::default(),
        bundle_dir: dir.join("bundles"),
    };
    let agent = Agent::new(config, Metrics::register(&mut registry)).unwrap();
    let options = PluginOptions {
        socket: dir.join("nri.sock"),
        name: defaults::PLUGIN_NAME.into(),
        index: "10".parse().unwrap(),
    };
    let _plugin = tokio::spawn(plugin::run(agent.clone(), options, std::future::pending()));
    let mut conn = runtime.accept().await.unwrap();
    conn.timeout = Duration::from_secs(1);
    // As containerd 1.7: no timeout in Configure.
    conn.configure_reporting(None).await.unwrap();
    conn.synchronize(vec![], vec![]).await.unwrap();
    assert_eq!(
        agent.effective_wait(),
        Duration::from_secs(1) - moat_identity::agent::ANSWER_MARGIN
    );
    let workload = Workload::spawn();
    let pod = pod(&[(WEB, "[{}]")]);
    let ctr = container("c1", "web", workload.pid());
    conn.create_container(&pod, &ctr).await.unwrap();
    let err = conn
        .start_container(&pod, &ctr, Style::StateChange)
        .await
        .unwrap_err();
    // An answer inside containerd's second, not its timeout.
    let CallError::Status(status) = err else {
        panic!("expected an error status, got {err}")
    };
    assert!(
        status
            .message
            .contains("before the runtime's NRI request deadline of 1s (from --runtime-request-timeout; the runtime reported none)"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn a_missed_runtime_deadline_is_named_and_the_unprotected_start_is_found_at_synchronize() {
    let mut h = harness("deadline").await;
    // The agent assumes 2 s, but this runtime's real deadline is 300 ms and it says nothing.
    h.conn.configure_reporting(None).await.unwrap();
    h.conn.timeout = Duration::from_millis(300);
    h.spire.set_mode(Mode::Stall);
    let web = Web::create(&h, "[{}]", None).await;
    let err = web.start(&h).await.unwrap_err();
    assert!(matches!(err, CallError::Timeout(_)), "{err}");
    // As containerd does after a timeout: it drops the plugin (and starts the container).
    let Harness { conn, plugin, .. } = h;
    conn.close();
    let result = tokio::time::timeout(Duration::from_secs(5), plugin)
        .await
        .unwrap()
        .unwrap();
    let Err(error @ PluginError::RuntimeDeadline { .. }) = result else {
        panic!("expected the runtime deadline to be named, got {result:?}")
    };
    let text = error.to_string();
    assert!(
        text.contains("runtime's NRI request deadline passed")
            && text.contains("--runtime-request-timeout"),
        "{text}"
    );
    assert!(metrics_text(&h.registry).contains("reason=\"runtime_deadline\"} 1"));

    // The agent's supervisor restarts it; containerd lists the container as running: it ran
    // without its files, which is said and counted.
    h.agent.shutdown();
    let mut registry = Registry::default();
    let agent = new_agent(&h.dir, h.spire.socket(), &mut registry);
    let (conn, plugin) = connect(&agent, &h.runtime, &h.dir.join("nri.sock")).await;
    let mut running = web.ctr.clone();
    running.state = ContainerState::ContainerRunning as i32;
    conn.synchronize(vec![web.pod.clone()], vec![running])
        .await
        .unwrap();
    assert!(
        metrics_text(&registry).contains("reason=\"started_without_svid\"} 1"),
        "{}",
        metrics_text(&registry)
    );
    h.conn = conn;
    h.plugin = plugin;
}

/// A tenant annotating pods for an identity nobody registered: after the first full wait in its
/// namespace, later starts there wait only [`SUSPECT_WAIT`], so the node (whose runtime calls
/// the agent one request at a time) is not held; other namespaces keep the full wait.
#[tokio::test]
async fn an_unissued_identity_shortens_later_waits_in_its_namespace_only() {
    use moat_identity::agent::SUSPECT_WAIT;
    let h = harness("suspect").await;
    let start = |namespace: &'static str, id: &'static str| {
        let h = &h;
        async move {
            let workload = Workload::spawn();
            let mut pod = pod(&[(WEB, "[{}]")]);
            pod.namespace = namespace.into();
            pod.id = format!("pod-{id}");
            let mut ctr = container(id, "web", workload.pid());
            ctr.pod_sandbox_id = pod.id.clone();
            h.conn.create_container(&pod, &ctr).await.unwrap();
            let err = h
                .conn
                .start_container(&pod, &ctr, Style::StateChange)
                .await
                .unwrap_err();
            let CallError::Status(status) = err else {
                panic!("expected an error status, got {err}")
            };
            assert_eq!(status.code, 9, "FAILED_PRECONDITION");
            status.message
        }
    };
    let first = start("evil", "c1").await;
    assert!(!first.contains("went unissued"), "{first}");
    let text = metrics_text(&h.registry);
    assert!(
        text.contains("moat_identity_failures_total{reason=\"timeout\"} 1"),
        "{text}"
    );
    for id in ["c2", "c3"] {
        let later = start("evil", id).await;
        assert!(
            later.contains("went unissued") && later.contains(&format!("{SUSPECT_WAIT:?}")),
            "{later}"
        );
    }
    let text = metrics_text(&h.registry);
    assert!(
        text.contains("moat_identity_failures_total{reason=\"held_short\"} 2"),
        "{text}"
    );
    // Another namespace is not held to the short wait.
    let other = start("bank", "c4").await;
    assert!(!other.contains("went unissued"), "{other}");
    assert!(
        metrics_text(&h.registry).contains("moat_identity_failures_total{reason=\"timeout\"} 2")
    );
}

/// While no agent answered, one annotated container started (no files: found running at
/// Synchronize, it is stopped, never given an SVID nobody would read) and another was created
/// (no mount: its start is refused until it is created again through the agent).
#[tokio::test]
async fn synchronize_stops_what_started_without_identity_and_refuses_what_was_created_without_it() {
    let h = harness("window").await;
    let running = Workload::spawn();
    h.spire
        .register_pid(running.pid(), "spiffe://example.org/web");
    let pod = pod(&[(WEB, "[{}]")]);
    let mut started = container("c1", "web", running.pid());
    started.state = ContainerState::ContainerRunning as i32;
    let created_workload = Workload::spawn();
    h.spire
        .register_pid(created_workload.pid(), "spiffe://example.org/web");
    let created = container("c2", "web", created_workload.pid());
    h.conn
        .synchronize(vec![pod.clone()], vec![started.clone(), created.clone()])
        .await
        .unwrap();
    let text = metrics_text(&h.registry);
    assert!(
        text.contains("moat_identity_failures_total{reason=\"started_without_svid\"} 1"),
        "{text}"
    );
    // The double's process is not in a container's cgroup: the agent refuses to signal it (the
    // real containerd test shows the stop), and never follows it.
    assert!(text.contains("moat_identity_evictions_total 0"), "{text}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.spire.open_svid_streams(), 0, "nothing minted for it");
    assert!(!h.dir.join("artifacts/c1").exists());

    // Created without the agent: no mount in its spec, so its start is refused.
    let spec = |mounts: &str| {
        let bundle = h.dir.join("bundles/c2");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            format!(r#"{{"process":{{"user":{{"uid":0,"gid":0}}}},"mounts":[{mounts}]}}"#),
        )
        .unwrap();
    };
    spec(r#"{"destination":"/proc","type":"proc","source":"proc"}"#);
    let err = h
        .conn
        .start_container(&pod, &created, Style::StateChange)
        .await
        .unwrap_err();
    let CallError::Status(status) = err else {
        panic!("expected an error status, got {err}")
    };
    assert_eq!(status.code, 9, "FAILED_PRECONDITION");
    assert!(
        status.message.contains("no identity mount"),
        "{}",
        status.message
    );
    assert!(
        metrics_text(&h.registry)
            .contains("moat_identity_failures_total{reason=\"not_mounted\"} 1")
    );
    // A spec that has the mount (an agent created it before restarting) starts.
    let dir = h.dir.join("artifacts/c2/0");
    spec(&format!(
        r#"{{"destination":"{}","type":"bind","source":"{}"}}"#,
        defaults::CERT_DIR,
        dir.display()
    ));
    h.conn
        .start_container(&pod, &created, Style::StateChange)
        .await
        .unwrap();
    assert_svid(&dir, "spiffe://example.org/web");
}
