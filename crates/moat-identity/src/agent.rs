//! What the agent does on each runtime event. This is the domain: pods, containers, annotations,
//! SVID followers and files, with its own [`AgentError`]. It knows nothing of NRI's protobuf
//! messages or ttrpc's status codes: [`crate::plugin`] converts both at the edge.
//!
//! - CreateContainer: read the container's identity entries from the pod's annotations, make a
//!   host directory per entry, and add a read-only bind mount of it at the entry's `cert_dir`.
//!   A bad annotation fails this container's creation with the reason.
//! - StartContainer: the container's process exists (runc has created it and it waits to exec
//!   the workload), so its PID can be attested; a sandboxed container is named by selectors
//!   instead ([`crate::attest`]). Subscribe to its SVIDs, write the first one (owned by the
//!   container's user, [`crate::owner`]), and answer; the container's command runs only after
//!   the answer. With no SVID within the wait, answer with an error (the start fails) unless the
//!   entry chose `fail_open`; the wait ends [`ANSWER_MARGIN`] before the runtime's NRI request
//!   deadline, because a runtime that times a plugin out drops it and starts the container
//!   anyway. The stream stays open: rotations and bundle changes replace the files while the
//!   container runs.
//! - StopContainer: close the streams (the PID may be reused). RemoveContainer: delete the files.
//! - Synchronize (after the agent or the runtime restarts): rebuild the same state from the
//!   runtime's list, re-subscribe running containers, remove directories nobody owns.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::annotations::{AnnotationError, Defaults, IdentityEntry, entries_for};
use crate::attest::{SandboxConfig, Workload};
use crate::backoff::Backoff;
use crate::files::{ArtifactRoot, Artifacts, FilesError, publish};
use crate::lock;
use crate::metrics::{Failure, Metrics};
use crate::owner;
use crate::spiffe::pem;
use crate::spire::{Bundles, SpireAgent, Svid, select_svid};

/// Kept free between the SVID wait and the runtime's request timeout, to write files and answer:
/// a plugin that misses the timeout is disconnected and the container starts without it.
pub const ANSWER_MARGIN: Duration = Duration::from_millis(300);
/// The wait for a first SVID in a namespace where one recently went unissued. containerd calls
/// NRI plugins one request at a time, so every container start on the node queues behind a
/// StartContainer that waits: a tenant annotating pods for an identity nobody registered would
/// otherwise hold the whole node for the full wait per pod. An SVID the SPIRE agent has cached
/// (every registered one, minted ahead) arrives in about a millisecond.
pub const SUSPECT_WAIT: Duration = Duration::from_millis(25);
/// How long a namespace keeps the short wait after its last unissued identity.
pub const SUSPECT_FOR: Duration = Duration::from_secs(60);
/// Namespaces remembered at once; the oldest are forgotten first.
const SUSPECTS_MAX: usize = 4096;
/// First and longest pause before re-subscribing after a broken SVID stream.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Options of the read-only bind mount that puts an entry's directory at its `cert_dir`.
pub const BIND_MOUNT_OPTIONS: [&str; 5] = ["rbind", "ro", "nosuid", "nodev", "noexec"];

/// The facts of a pod the agent reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pod {
    /// The runtime's sandbox id.
    pub id: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes name.
    pub name: String,
    /// Kubernetes UID.
    pub uid: String,
    /// The pod's labels (the tenant's, except the isolation class moat vets).
    pub labels: HashMap<String, String>,
    /// The pod's annotations, where identity entries are requested (the tenant's, except the
    /// service account moat stamps).
    pub annotations: HashMap<String, String>,
    /// The runtime handler the pod runs under (`runc`, `runsc`, `kata-qemu`, …; empty: the
    /// runtime's default).
    pub runtime_handler: String,
    /// The sandbox's process on the host, when the runtime says (0: not said).
    pub pid: u32,
}

/// The facts of a container the agent reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// The runtime's container id.
    pub id: String,
    /// The sandbox id of its pod.
    pub pod_id: String,
    /// The container's name in the pod.
    pub name: String,
    /// Its process on the host, once it exists (0: none).
    pub pid: u32,
    /// Whether it runs (Synchronize re-follows running containers only).
    pub running: bool,
}

/// A read-only bind mount of an entry's host directory (options [`BIND_MOUNT_OPTIONS`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityMount {
    /// The host directory.
    pub source: PathBuf,
    /// Where it appears in the container (the entry's `cert_dir`).
    pub destination: PathBuf,
}

/// Why the agent refused a container: the runtime fails its creation or start with the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The container's identity annotation is malformed or not allowed.
    #[error("moat identity: {0}")]
    Annotation(#[from] AnnotationError),
    /// A host directory for the container's files could not be made.
    #[error("moat identity: cannot prepare the identity directory: {0}")]
    Directory(#[source] FilesError),
    /// The container was created while no agent answered: its spec has no identity mount, so
    /// files written now would never reach it. Refused; the kubelet creates it again, through
    /// the agent.
    #[error(
        "moat identity: container {container} was created while the identity agent was not answering, so it has no identity mount; it is refused and will be created again with one"
    )]
    NotMounted {
        /// `namespace/pod/container`.
        container: String,
    },
    /// Entries that do not fail open got no SVID within the wait.
    #[error("moat identity: container {container}: {}", join(missing))]
    NoSvid {
        /// `namespace/pod/container`.
        container: String,
        /// One per entry without its SVID.
        missing: Vec<MissingSvid>,
    },
}

/// An entry whose SVID did not arrive in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no SVID for cert_dir {} from the SPIRE agent at {}: {reason}",
    cert_dir.display(),
    spire_agent_address.display()
)]
pub struct MissingSvid {
    /// The entry's `cert_dir`.
    pub cert_dir: PathBuf,
    /// The SPIRE agent asked.
    pub spire_agent_address: PathBuf,
    /// What went wrong, with the last thing SPIRE said.
    pub reason: String,
}

fn join(missing: &[MissingSvid]) -> String {
    missing
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Defaults for annotation fields and the SPIRE sockets annotations may name.
    pub defaults: Defaults,
    /// Host directory under which each container's files live.
    pub artifact_root: PathBuf,
    /// Longest wait for a container's first SVID (capped below the runtime's request timeout).
    pub svid_wait: Duration,
    /// The runtime's NRI request timeout, as the operator configured it (containerd's
    /// `plugin_request_timeout`). Used when the runtime does not report one; when it does, the
    /// shorter of the two.
    pub runtime_request_timeout: Duration,
    /// Which pods are sandboxed, and the facts their containers are named by.
    pub sandbox: SandboxConfig,
    /// Where the runtime keeps container bundles (`<dir>/<id>/config.json`).
    pub bundle_dir: PathBuf,
}

/// Where the request timeout the agent works with came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutSource {
    /// The runtime reported it in Configure.
    Reported,
    /// The runtime reported none: the configured `--runtime-request-timeout`.
    Assumed,
}

impl std::fmt::Display for TimeoutSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Reported => "reported by the runtime",
            Self::Assumed => "from --runtime-request-timeout; the runtime reported none",
        })
    }
}

/// The agent's state, shared by every call.
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    defaults: Defaults,
    root: ArtifactRoot,
    svid_wait: Duration,
    metrics: Metrics,
    configured_timeout: Duration,
    request_timeout: Mutex<(Duration, TimeoutSource)>,
    sandbox: SandboxConfig,
    bundle_dir: PathBuf,
    spire: Mutex<HashMap<PathBuf, Arc<SpireAgent>>>,
    containers: Mutex<HashMap<String, Tracked>>,
    /// Namespaces where an identity recently went unissued, with when it last did.
    suspects: Mutex<HashMap<String, Instant>>,
}

/// A container with identity entries.
#[derive(Debug)]
struct Tracked {
    /// `namespace/pod/container`, for messages.
    label: String,
    entries: Vec<(IdentityEntry, PathBuf)>,
    streams: Vec<JoinHandle<()>>,
    /// Whether its CreateContainer went through this agent (so its spec has the mounts).
    mounted: bool,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.stop_streams();
    }
}

impl Tracked {
    fn stop_streams(&mut self) {
        for stream in self.streams.drain(..) {
            stream.abort();
        }
    }
}

fn label(pod: &Pod, container: &ContainerInfo) -> String {
    format!("{}/{}/{}", pod.namespace, pod.name, container.name)
}

/// The outcome of waiting for one entry's first SVID.
type FirstResult = Result<(), (Failure, String)>;

/// The last problem a follower met, reported if the wait runs out.
type LastError = Arc<Mutex<String>>;

/// One entry, the receiver of its first outcome, and its last problem.
type FirstWait = (IdentityEntry, oneshot::Receiver<FirstResult>, LastError);

impl Agent {
    /// An agent writing under `config.artifact_root` (created if missing).
    ///
    /// # Errors
    /// [`FilesError`] when the artifact root cannot be created.
    pub fn new(config: AgentConfig, metrics: Metrics) -> Result<Self, FilesError> {
        let AgentConfig {
            defaults,
            artifact_root,
            svid_wait,
            runtime_request_timeout,
            sandbox,
            bundle_dir,
        } = config;
        Ok(Self {
            inner: Arc::new(Inner {
                defaults,
                root: ArtifactRoot::new(artifact_root)?,
                svid_wait,
                metrics,
                configured_timeout: runtime_request_timeout,
                request_timeout: Mutex::new((runtime_request_timeout, TimeoutSource::Assumed)),
                sandbox,
                bundle_dir,
                spire: Mutex::default(),
                containers: Mutex::default(),
                suspects: Mutex::default(),
            }),
        })
    }

    /// The agent's instruments.
    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// How many containers the agent follows.
    #[must_use]
    pub fn tracked(&self) -> usize {
        lock(&self.inner.containers).len()
    }

    /// How long StartContainer waits for a first SVID, given the runtime's request timeout.
    #[must_use]
    pub fn effective_wait(&self) -> Duration {
        let (timeout, _) = *lock(&self.inner.request_timeout);
        self.inner
            .svid_wait
            .min(timeout.saturating_sub(ANSWER_MARGIN))
    }

    /// The runtime's NRI request deadline the agent answers within, and where it came from.
    #[must_use]
    pub fn request_timeout(&self) -> (Duration, TimeoutSource) {
        *lock(&self.inner.request_timeout)
    }

    /// Configure: the runtime's request timeout, when it says (containerd 1.7 does not: then
    /// the configured one, with a loud warning, since a shorter real one would let a slow
    /// SVID's container start without it).
    pub fn configure(&self, reported: Option<Duration>) -> (Duration, TimeoutSource) {
        let configured = self.inner.configured_timeout;
        let chosen = match reported.filter(|t| !t.is_zero()) {
            Some(reported) => {
                if reported < configured {
                    tracing::warn!(
                        reported_ms = reported.as_millis(),
                        configured_ms = configured.as_millis(),
                        "the runtime's NRI request timeout is shorter than --runtime-request-timeout: answering within the runtime's"
                    );
                }
                (reported.min(configured), TimeoutSource::Reported)
            }
            None => {
                tracing::warn!(
                    assumed_ms = configured.as_millis(),
                    "THE RUNTIME REPORTED NO NRI REQUEST TIMEOUT (containerd 1.7 does not). The agent \
                     assumes --runtime-request-timeout; it must equal containerd's \
                     plugin_request_timeout. If containerd's is shorter, a slow SPIRE makes \
                     containerd drop this plugin and start annotated containers WITHOUT identity."
                );
                (configured, TimeoutSource::Assumed)
            }
        };
        *lock(&self.inner.request_timeout) = chosen;
        let wait = self.effective_wait();
        if wait < self.inner.svid_wait {
            tracing::warn!(
                runtime_timeout_ms = chosen.0.as_millis(),
                wait_ms = wait.as_millis(),
                "SVID wait capped below the runtime's request timeout"
            );
        }
        chosen
    }

    /// Synchronize: rebuild state from every pod and container the runtime has.
    pub fn synchronize(&self, pods: &[Pod], containers: &[ContainerInfo]) {
        let pods: HashMap<&str, &Pod> = pods.iter().map(|p| (p.id.as_str(), p)).collect();
        let mut live = HashSet::new();
        for container in containers {
            live.insert(container.id.clone());
            let Some(pod) = pods.get(container.pod_id.as_str()) else {
                continue;
            };
            let entries = match entries_for(&pod.annotations, &container.name, &self.inner.defaults)
            {
                Ok(Some(entries)) if !entries.is_empty() => entries,
                Ok(_) => continue,
                Err(e) => {
                    // Created by an agent with other settings, or before one existed: it runs
                    // already and cannot be failed now.
                    tracing::warn!(container = %label(pod, container), error = %e, "running container has an unusable identity annotation");
                    continue;
                }
            };
            if lock(&self.inner.containers).contains_key(&container.id) {
                continue;
            }
            if container.running && self.started_without_identity(container, &entries) {
                // Never followed: an SVID written now would reach nobody.
                self.evict(pod, container);
                continue;
            }
            // A container not running yet may have been created while no agent answered: its
            // start is checked against its spec's mounts.
            match self.track(pod, container, entries, container.running) {
                Ok(_) => {
                    if container.running {
                        // No one waits: the container already runs with the files it has.
                        drop(self.subscribe(pod, container));
                    }
                }
                Err(e) => {
                    tracing::warn!(container = %label(pod, container), error = %e, "cannot restore identity state")
                }
            }
        }
        match self.inner.root.containers() {
            Ok(on_disk) => {
                for id in on_disk.into_iter().filter(|id| !live.contains(id)) {
                    if let Err(e) = self.inner.root.remove_container(&id) {
                        tracing::warn!(container_id = %id, error = %e, "cannot remove stale identity files");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list identity directories"),
        }
        self.update_gauge();
        tracing::info!(
            containers = containers.len(),
            tracked = self.tracked(),
            "synchronized"
        );
    }

    /// CreateContainer: a read-only bind mount per identity entry (none for a container
    /// without entries). The directories exist before this returns.
    ///
    /// # Errors
    /// [`AgentError::Annotation`] for a bad annotation, [`AgentError::Directory`] when a
    /// directory cannot be made: the container's creation fails with the message.
    pub fn create_container(
        &self,
        pod: &Pod,
        container: &ContainerInfo,
    ) -> Result<Vec<IdentityMount>, AgentError> {
        let entries = match entries_for(&pod.annotations, &container.name, &self.inner.defaults) {
            Ok(Some(entries)) if !entries.is_empty() => entries,
            Ok(_) => return Ok(Vec::new()),
            Err(e) => {
                self.inner.metrics.fail(Failure::annotation);
                tracing::warn!(container = %label(pod, container), error = %e, "identity annotation refused");
                return Err(e.into());
            }
        };
        match self.track(pod, container, entries, true) {
            Ok(tracked) => {
                self.update_gauge();
                let mounts: Vec<IdentityMount> = tracked
                    .into_iter()
                    .map(|(entry, dir)| IdentityMount {
                        source: dir,
                        destination: entry.cert_dir,
                    })
                    .collect();
                tracing::info!(container = %label(pod, container), container_id = %container.id, entries = mounts.len(), "identity directories mounted");
                Ok(mounts)
            }
            Err(e) => {
                self.inner.metrics.fail(Failure::write);
                tracing::error!(container = %label(pod, container), error = %e, "cannot prepare identity directories");
                Err(AgentError::Directory(e))
            }
        }
    }

    /// StartContainer: the first SVID on disk before the container's command runs.
    ///
    /// # Errors
    /// [`AgentError::NoSvid`] when an entry that does not fail open got no SVID in time: the
    /// container's start fails with the reason.
    pub async fn start_container(
        &self,
        pod: &Pod,
        container: &ContainerInfo,
    ) -> Result<(), AgentError> {
        let started = Instant::now();
        self.check_mounted(pod, container)?;
        let Some(firsts) = self.subscribe(pod, container) else {
            return Ok(());
        };
        let held = self.suspect(&pod.namespace);
        let wait = if held {
            self.effective_wait().min(SUSPECT_WAIT)
        } else {
            self.effective_wait()
        };
        let (deadline_of_runtime, source) = self.request_timeout();
        let deadline = tokio::time::Instant::now() + wait;
        let metrics = &self.inner.metrics;
        let mut missing = Vec::new();
        // The followers run concurrently; waiting on each in turn against one deadline waits
        // no longer than the slowest.
        for (entry, first, last_error) in firsts {
            let outcome = match tokio::time::timeout_at(deadline, first).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err((Failure::spire_unavailable, "the stream ended".to_owned())),
                Err(_) => {
                    let last = lock(&last_error).clone();
                    let reason = if last.is_empty() {
                        "no answer".to_owned()
                    } else {
                        last
                    };
                    if held {
                        Err((
                            Failure::held_short,
                            format!(
                                "none within {wait:?}: an identity in namespace {} went unissued in the last {SUSPECT_FOR:?}, \
                                 so starts there wait {wait:?}, not to hold every container start on the node; \
                                 the kubelet retries ({reason})",
                                pod.namespace
                            ),
                        ))
                    } else {
                        Err((
                            Failure::timeout,
                            format!(
                                "none within {wait:?}, which ends {ANSWER_MARGIN:?} before the runtime's NRI \
                                 request deadline of {deadline_of_runtime:?} ({source}) ({reason})"
                            ),
                        ))
                    }
                }
            };
            let Err((reason, message)) = outcome else {
                metrics.svids_issued.inc();
                metrics.svid_wait.observe(started.elapsed().as_secs_f64());
                continue;
            };
            metrics.fail(reason);
            if matches!(reason, Failure::timeout | Failure::held_short) {
                self.unissued(&pod.namespace);
            }
            let entry_missing = MissingSvid {
                cert_dir: entry.cert_dir,
                spire_agent_address: entry.spire_agent_address,
                reason: message,
            };
            if entry.fail_open {
                metrics.fail_open_starts.inc();
                tracing::warn!(container = %label(pod, container), message = %entry_missing, "starting without an SVID (fail_open)");
            } else {
                missing.push(entry_missing);
            }
        }
        if missing.is_empty() {
            tracing::info!(container = %label(pod, container), pid = container.pid, sandboxed = self.inner.sandbox.sandboxed(pod, container).is_some(), elapsed_ms = started.elapsed().as_millis(), "identity ready");
            return Ok(());
        }
        // The container will not run: nothing to follow.
        if let Some(tracked) = lock(&self.inner.containers).get_mut(&container.id) {
            tracked.stop_streams();
        }
        let error = AgentError::NoSvid {
            container: label(pod, container),
            missing,
        };
        tracing::warn!(error = %error, "container start refused");
        Err(error)
    }

    /// Whether `namespace` had an identity go unissued within [`SUSPECT_FOR`].
    fn suspect(&self, namespace: &str) -> bool {
        lock(&self.inner.suspects)
            .get(namespace)
            .is_some_and(|at| at.elapsed() < SUSPECT_FOR)
    }

    /// Records that an identity in `namespace` went unissued now; bounded in namespaces.
    fn unissued(&self, namespace: &str) {
        let mut suspects = lock(&self.inner.suspects);
        if suspects.len() >= SUSPECTS_MAX && !suspects.contains_key(namespace) {
            suspects.retain(|_, at| at.elapsed() < SUSPECT_FOR);
            if suspects.len() >= SUSPECTS_MAX
                && let Some(oldest) = suspects
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(ns, _)| ns.clone())
            {
                suspects.remove(&oldest);
            }
        }
        suspects.insert(namespace.to_owned(), Instant::now());
    }

    /// Stops following every container (the agent is exiting); files stay for the next agent.
    pub fn shutdown(&self) {
        tracing::info!(
            tracked = self.tracked(),
            following = self.following(),
            failures = %self.inner.metrics.failure_counts().replace('\n', " ").trim(),
            "identity agent stopping: streams closed, files left for the runtime to remove"
        );
        let containers = std::mem::take(&mut *lock(&self.inner.containers));
        drop(containers);
        lock(&self.inner.spire).clear();
        self.update_gauge();
    }

    /// StopContainer: close the container's streams; its files stay until removal.
    pub fn stop_container(&self, container_id: &str) {
        if let Some(tracked) = lock(&self.inner.containers).get_mut(container_id) {
            tracked.stop_streams();
        }
        self.update_gauge();
    }

    /// Containers whose SVIDs are being followed now (started, not stopped).
    #[must_use]
    pub fn following(&self) -> usize {
        lock(&self.inner.containers)
            .values()
            .filter(|t| !t.streams.is_empty())
            .count()
    }

    /// RemoveContainer: forget the container and delete its files.
    pub fn remove_container(&self, container_id: &str) {
        let removed = lock(&self.inner.containers).remove(container_id);
        // Also when untracked: a directory may be left from before a restart.
        if let Err(e) = self.inner.root.remove_container(container_id) {
            tracing::warn!(container_id = %container_id, error = %e, "cannot remove identity files");
        }
        drop(removed);
        self.update_gauge();
    }

    fn update_gauge(&self) {
        let n = i64::try_from(self.following()).unwrap_or(i64::MAX);
        self.inner.metrics.containers_tracked.set(n);
    }

    /// Makes the container's directories and follows it; returns its entries with them.
    fn track(
        &self,
        pod: &Pod,
        container: &ContainerInfo,
        entries: Vec<IdentityEntry>,
        mounted: bool,
    ) -> Result<Vec<(IdentityEntry, PathBuf)>, FilesError> {
        let mut with_dirs = Vec::with_capacity(entries.len());
        for (index, entry) in entries.into_iter().enumerate() {
            let dir = self.inner.root.create_entry_dir(&container.id, index)?;
            with_dirs.push((entry, dir));
        }
        // A repeated create replaces (and stops) what was there.
        lock(&self.inner.containers).insert(
            container.id.clone(),
            Tracked {
                label: label(pod, container),
                entries: with_dirs.clone(),
                streams: Vec::new(),
                mounted,
            },
        );
        Ok(with_dirs)
    }

    fn spire_agent(&self, socket: &Path) -> Arc<SpireAgent> {
        let mut agents = lock(&self.inner.spire);
        if let Some(agent) = agents.get(socket) {
            return agent.clone();
        }
        let metrics = self.inner.metrics.clone();
        let agent = Arc::new(SpireAgent::connect(socket, move |status| {
            metrics.fail(classify(status));
        }));
        agents.insert(socket.to_owned(), agent.clone());
        agent
    }

    /// Whose the files are: the user in the container's OCI spec; for runc, failing that, its
    /// process's. A sandboxed container's PID is the sandbox's, never its user: no spec, no
    /// owner (the error says why).
    fn owner(&self, pod: &Pod, container: &ContainerInfo) -> Result<Option<(u32, u32)>, String> {
        match owner::from_bundle(&self.inner.bundle_dir, &container.id) {
            Ok(owner) => Ok(Some(owner)),
            Err(e) if self.inner.sandbox.sandboxed(pod, container).is_some() => Err(e.to_string()),
            Err(e) => {
                tracing::debug!(container = %label(pod, container), error = %e, "no OCI spec; the owner is the PID's");
                Ok(owner::from_process(container.pid))
            }
        }
    }

    /// Whether a running container found at Synchronize started without the files of an entry
    /// that does not fail open: it started while no agent answered (a restart, a rollout, a node
    /// boot, a missed runtime deadline), or with a directory nobody mounted.
    fn started_without_identity(
        &self,
        container: &ContainerInfo,
        entries: &[IdentityEntry],
    ) -> bool {
        entries.iter().enumerate().any(|(index, entry)| {
            !entry.fail_open
                && !self
                    .inner
                    .root
                    .entry_dir(&container.id, index)
                    .is_ok_and(|dir| crate::files::is_published(&dir))
        })
    }

    /// Stops a container that runs without its identity, so the kubelet starts it again (or its
    /// controller replaces the pod) through this agent; counted and logged either way.
    fn evict(&self, pod: &Pod, container: &ContainerInfo) {
        let metrics = &self.inner.metrics;
        metrics.fail(Failure::started_without_svid);
        // A sandboxed container's process is the sandbox's: stopping it stops the pod.
        let owners = [container.id.as_str(), pod.id.as_str()];
        let owners = if self.inner.sandbox.sandboxed(pod, container).is_some() {
            &owners[..]
        } else {
            &owners[..1]
        };
        match crate::evict::kill(container.pid, owners) {
            Ok(()) => {
                metrics.evictions.inc();
                tracing::warn!(
                    container = %label(pod, container),
                    container_id = %container.id,
                    pid = container.pid,
                    "stopped an annotated container that started WITHOUT its SVID while the agent was not answering; the kubelet starts it again with its identity"
                );
            }
            Err(e) => tracing::error!(
                container = %label(pod, container),
                container_id = %container.id,
                error = %e,
                "an annotated container runs WITHOUT its SVID (it started while the agent was not answering) and could not be stopped: stop it by hand"
            ),
        }
    }

    /// Refuses the start of a container whose spec lacks its identity mounts (created while no
    /// agent answered), before anything is minted for it.
    fn check_mounted(&self, pod: &Pod, container: &ContainerInfo) -> Result<(), AgentError> {
        let entries = {
            let containers = lock(&self.inner.containers);
            match containers.get(&container.id) {
                Some(tracked) if !tracked.mounted => tracked.entries.clone(),
                _ => return Ok(()),
            }
        };
        let all_mounted = entries.iter().all(|(entry, dir)| {
            owner::mounts(&self.inner.bundle_dir, &container.id, dir, &entry.cert_dir)
                .unwrap_or(false)
        });
        if all_mounted {
            if let Some(tracked) = lock(&self.inner.containers).get_mut(&container.id) {
                tracked.mounted = true;
            }
            return Ok(());
        }
        self.inner.metrics.fail(Failure::not_mounted);
        let error = AgentError::NotMounted {
            container: label(pod, container),
        };
        tracing::warn!(error = %error, "container start refused");
        Err(error)
    }

    /// Starts following every entry of a tracked container, replacing streams it had. Returns,
    /// per entry, a receiver of the first SVID's outcome; `None` for an untracked container.
    fn subscribe(&self, pod: &Pod, container: &ContainerInfo) -> Option<Vec<FirstWait>> {
        let container_id = container.id.as_str();
        let entries: Vec<(IdentityEntry, PathBuf)> = {
            let containers = lock(&self.inner.containers);
            containers.get(container_id)?.entries.clone()
        };
        let workload = self.inner.sandbox.workload(pod, container).map(Arc::new);
        let owner = self.owner(pod, container);
        let mut firsts = Vec::with_capacity(entries.len());
        let mut streams = Vec::with_capacity(entries.len());
        for (entry, dir) in entries {
            let (tx, rx) = oneshot::channel();
            let last_error = LastError::default();
            match (&workload, &owner) {
                (None, _) => {
                    let _ = tx.send(Err((
                        Failure::no_pid,
                        "the runtime gave no PID for the container".to_owned(),
                    )));
                }
                (Some(_), Err(reason)) => {
                    let _ = tx.send(Err((
                        Failure::owner_unknown,
                        format!("cannot tell whose the files are: {reason}"),
                    )));
                }
                (Some(workload), Ok(owner)) => {
                    let follower = Follower {
                        spire: self.spire_agent(&entry.spire_agent_address),
                        entry: entry.clone(),
                        dir,
                        workload: workload.clone(),
                        owner: *owner,
                        metrics: self.inner.metrics.clone(),
                        last_error: last_error.clone(),
                    };
                    streams.push(tokio::spawn(follower.run(tx)));
                }
            }
            firsts.push((entry, rx, last_error));
        }
        {
            let mut containers = lock(&self.inner.containers);
            match containers.get_mut(container_id) {
                Some(tracked) => {
                    tracked.stop_streams();
                    tracing::debug!(container = %tracked.label, streams = streams.len(), "following SVIDs");
                    tracked.streams = streams;
                }
                // Removed meanwhile: nothing to follow.
                None => streams.iter().for_each(JoinHandle::abort),
            }
        }
        self.update_gauge();
        Some(firsts)
    }
}

fn classify(status: &tonic::Status) -> Failure {
    match status.code() {
        tonic::Code::PermissionDenied => Failure::permission_denied,
        _ => Failure::spire_unavailable,
    }
}

/// Follows one entry's SVIDs and bundles, publishing each new version.
struct Follower {
    spire: Arc<SpireAgent>,
    entry: IdentityEntry,
    dir: PathBuf,
    workload: Arc<Workload>,
    owner: Option<(u32, u32)>,
    metrics: Metrics,
    last_error: LastError,
}

/// What was last written, to skip repeats: fingerprints, not copies (a thousand followers each
/// holding a second copy of their SVID and bundle cost megabytes).
#[derive(Default)]
struct Published {
    svid: Option<u64>,
    bundle: Option<u64>,
}

fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for part in parts {
        part.hash(&mut h);
    }
    h.finish()
}

impl Follower {
    async fn run(self, first: oneshot::Sender<FirstResult>) {
        let mut first = Some(first);
        let mut bundles = self.spire.bundles();
        let mut current: Option<Svid> = None;
        let mut published = Published::default();
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        loop {
            // Boxed: the call's state is large and lives only while subscribing; the task keeps
            // only what a waiting stream needs.
            let status = match Box::pin(self.spire.subscribe(&self.workload)).await {
                Err(status) => status,
                Ok(mut stream) => loop {
                    tokio::select! {
                        message = stream.message() => match message {
                            Ok(Some(answer)) => {
                                backoff.reset();
                                match select_svid(&answer, self.entry.spiffe_id.as_ref()) {
                                    // Not attested yet: the agent answers again when it can.
                                    Ok(None) => {
                                        *lock(&self.last_error) = format!(
                                            "the SPIRE agent has issued no SVID for {} yet",
                                            self.workload
                                        );
                                    }
                                    Ok(Some(svid)) => current = Some(svid),
                                    Err(e) => {
                                        self.metrics.fail(Failure::svid_invalid);
                                        tracing::warn!(dir = %self.dir.display(), error = %e, "SVID refused");
                                        if let Some(first) = first.take() {
                                            let _ = first.send(Err((Failure::svid_invalid, e.to_string())));
                                        }
                                        continue;
                                    }
                                }
                            }
                            Ok(None) => break tonic::Status::unavailable("the SPIRE agent ended the stream"),
                            Err(status) => break status,
                        },
                        changed = bundles.changed() => if changed.is_err() {
                            break tonic::Status::unavailable("bundle follower stopped");
                        },
                    }
                    self.publish_if_changed(&current, &bundles, &mut published, &mut first);
                },
            };
            let reason = classify(&status);
            let last_error = format!("{:?}: {}", status.code(), status.message());
            lock(&self.last_error).clone_from(&last_error);
            if first.is_none() {
                // Already serving: keep the files, count, and re-subscribe.
                self.metrics.fail(reason);
                tracing::warn!(dir = %self.dir.display(), error = %last_error, "SVID stream broken; re-subscribing");
            } else if reason == Failure::permission_denied {
                // About the caller, not the container: no point retrying within the wait.
                if let Some(first) = first.take() {
                    let _ = first.send(Err((reason, last_error)));
                }
            }
            tokio::time::sleep(backoff.next_pause()).await;
        }
    }

    fn publish_if_changed(
        &self,
        current: &Option<Svid>,
        bundles: &watch::Receiver<Option<Arc<Bundles>>>,
        published: &mut Published,
        first: &mut Option<oneshot::Sender<FirstResult>>,
    ) {
        let Some(svid) = current else { return };
        let (bundle_pem, bundle_print) = {
            let bundles = bundles.borrow();
            let Some(bundle) = bundles
                .as_ref()
                .and_then(|b| b.by_trust_domain.get(svid.id.trust_domain_id()))
            else {
                // The SVID is of no use without its trust domain's roots: wait for them.
                *lock(&self.last_error) = format!(
                    "an SVID for {} arrived, but no bundle for its trust domain yet",
                    svid.id
                );
                return;
            };
            let print = fingerprint(bundle.iter().map(Vec::as_slice));
            if published.bundle == Some(print) && published.svid == Some(svid_print(svid)) {
                return;
            }
            (pem("CERTIFICATE", bundle), print)
        };
        let chain_pem = svid.chain_pem();
        let key_pem = svid.key_pem();
        let e = &self.entry;
        let result = publish(
            &self.dir,
            &Artifacts {
                svid: (&e.svid_file_name, chain_pem.as_bytes()),
                key: (&e.svid_key_file_name, key_pem.as_bytes()),
                bundle: (&e.svid_bundle_file_name, bundle_pem.as_bytes()),
                owner: self.owner,
            },
        );
        match result {
            Ok(()) => {
                let rotation = published.svid.is_some();
                published.svid = Some(svid_print(svid));
                published.bundle = Some(bundle_print);
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                } else if rotation {
                    self.metrics.rotations.inc();
                    tracing::info!(dir = %self.dir.display(), id = %svid.id, expires_at = svid.expires_at, "SVID or bundle rotated");
                }
            }
            Err(e) => {
                self.metrics.fail(Failure::write);
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot write SVID files");
                if let Some(first) = first.take() {
                    let _ = first.send(Err((Failure::write, e.to_string())));
                }
            }
        }
    }
}

fn svid_print(svid: &Svid) -> u64 {
    fingerprint(
        svid.chain
            .iter()
            .map(Vec::as_slice)
            .chain([svid.key.as_slice()]),
    )
}
