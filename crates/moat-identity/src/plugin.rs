//! The plugin's side of the NRI socket: connect, register, answer the runtime's calls, and end
//! when the runtime goes away (the agent's supervisor restarts it, and Synchronize rebuilds its
//! state).
//!
//! This is the edge between the wire and the agent: calls arrive typed through the generated
//! `plugin_ttrpc::Server` trait, NRI's messages become the agent's own types ([`Pod`],
//! [`ContainerInfo`]), and an [`AgentError`] becomes the ttrpc status the runtime shows.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use crate::agent::{
    Agent, AgentError, BIND_MOUNT_OPTIONS, ContainerInfo, IdentityMount, Pod, TimeoutSource,
};
use crate::metrics::{Call, CallLabels, CallOnlyLabels, Failure};
use crate::mux;
use crate::proto::nri::{
    ConfigureRequest, ConfigureResponse, Container, ContainerAdjustment, ContainerState,
    CreateContainerRequest, CreateContainerResponse, Empty, Event, Mount, PodSandbox,
    RegisterPluginRequest, RemoveContainerRequest, RemoveContainerResponse, StartContainerRequest,
    StartContainerResponse, StateChangeEvent, StopContainerRequest, StopContainerResponse,
    SynchronizeRequest, SynchronizeResponse,
};
use crate::proto::nri::{plugin_ttrpc, runtime_ttrpc};
use crate::ttrpc::{self, Code, Handler, HandlerFuture, NoService, Peer, RpcStatus};
use crate::{AbortOnDrop, lock};

/// How long registration may take.
pub const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(5);

/// A runtime's NRI request timeout as containerd's configuration writes it: `2s`, `1500ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTimeout(Duration);

/// A request timeout that is not a positive whole number of `ms` or `s`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a request timeout is a positive whole number of ms or s (as containerd writes it: 2s, 1500ms), not '{0}'"
)]
pub struct RequestTimeoutError(String);

impl std::str::FromStr for RequestTimeout {
    type Err = RequestTimeoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RequestTimeoutError(s.to_owned());
        let (digits, millis_per_unit) = if let Some(d) = s.strip_suffix("ms") {
            (d, 1)
        } else if let Some(d) = s.strip_suffix('s') {
            (d, 1000)
        } else {
            return Err(err());
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        let millis = n
            .checked_mul(millis_per_unit)
            .filter(|m| *m > 0)
            .ok_or_else(err)?;
        Ok(Self(Duration::from_millis(millis)))
    }
}

impl RequestTimeout {
    /// The timeout.
    #[must_use]
    pub fn duration(self) -> Duration {
        self.0
    }
}

/// A plugin index: two digits; the runtime calls plugins in ascending order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginIndex(String);

/// A plugin index that is not two digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a plugin index is two digits (00-99), not '{0}'")]
pub struct PluginIndexError(String);

impl std::str::FromStr for PluginIndex {
    type Err = PluginIndexError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Self(s.to_owned()))
        } else {
            Err(PluginIndexError(s.to_owned()))
        }
    }
}

impl std::fmt::Display for PluginIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where and as what to register.
#[derive(Debug, Clone)]
pub struct PluginOptions {
    /// The runtime's NRI socket.
    pub socket: PathBuf,
    /// The plugin's name.
    pub name: String,
    /// The plugin's index.
    pub index: PluginIndex,
}

/// Why the plugin stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    #[error("connecting to the NRI socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registering with the runtime: {0}")]
    Register(ttrpc::CallError),
    #[error("the runtime closed the NRI connection")]
    Closed,
    /// The runtime closed the connection while a call was unanswered: containerd closes a
    /// plugin that misses its NRI request deadline, and then starts the container without it.
    #[error(
        "the runtime closed the NRI connection while {call:?} had been unanswered for {waited:?}: \
         the runtime's NRI request deadline passed (the agent answers within {deadline:?}, {origin}); \
         set --runtime-request-timeout to containerd's plugin_request_timeout"
    )]
    RuntimeDeadline {
        call: Call,
        waited: Duration,
        deadline: Duration,
        origin: TimeoutSource,
    },
    #[error("the NRI connection broke: {0}")]
    Broken(std::io::Error),
}

/// Connects, registers, and serves `agent` until the runtime goes away (an error: the caller
/// exits so its supervisor restarts it) or `shutdown` completes (`Ok`).
///
/// # Errors
/// [`PluginError`]: the socket cannot be reached, registration fails, or the connection ends.
pub async fn run(
    agent: Agent,
    options: PluginOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PluginError> {
    let PluginOptions {
        socket,
        name,
        index,
    } = options;
    let stream = UnixStream::connect(&socket)
        .await
        .map_err(|source| PluginError::Connect {
            path: socket.clone(),
            source,
        })?;
    let conns = mux::split(stream);
    let dispatch = Dispatch::new(agent.clone());
    let in_flight = dispatch.in_flight.clone();
    let (_server, served) = Peer::start(conns.plugin_service, Arc::new(dispatch));
    let (client, client_task) = Peer::start(conns.runtime_service, Arc::new(NoService));
    let runtime = runtime_ttrpc::Client::new(client);
    // However run() ends (returned or dropped), the connection closes with it.
    let _guard = AbortOnDrop(vec![served.abort_handle(), client_task.abort_handle()]);
    let register = RegisterPluginRequest {
        plugin_name: name.clone(),
        plugin_idx: index.to_string(),
        nri_version: String::new(),
    };
    let registered = runtime.register_plugin(&register, REGISTRATION_TIMEOUT);
    let mut done = conns.done;
    let _done_guard = AbortOnDrop(vec![done.abort_handle()]);
    tokio::select! {
        result = registered => drop(result.map_err(PluginError::Register)?),
        result = &mut done => return Err(ended(result)),
    }
    tracing::info!(socket = %socket.display(), plugin = %name, index = %index, "registered with the runtime");
    tokio::select! {
        result = &mut done => {
            // A call still unanswered when the runtime hangs up: its deadline passed.
            if let Some((call, since)) = in_flight.oldest() {
                let (deadline, origin) = agent.request_timeout();
                agent.metrics().fail(Failure::runtime_deadline);
                return Err(PluginError::RuntimeDeadline { call, waited: since.elapsed(), deadline, origin });
            }
            Err(ended(result))
        }
        () = shutdown => Ok(()),
    }
}

/// The calls being answered now, with when each arrived.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    next: std::sync::atomic::AtomicU64,
    calls: std::sync::Mutex<std::collections::HashMap<u64, (Call, Instant)>>,
}

impl InFlight {
    fn begin(&self, call: Call) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.calls).insert(id, (call, Instant::now()));
        id
    }

    fn end(&self, id: u64) {
        lock(&self.calls).remove(&id);
    }

    fn oldest(&self) -> Option<(Call, Instant)> {
        lock(&self.calls).values().min_by_key(|(_, t)| *t).copied()
    }
}

fn ended(result: Result<std::io::Result<()>, tokio::task::JoinError>) -> PluginError {
    match result {
        Ok(Ok(())) => PluginError::Closed,
        Ok(Err(e)) => PluginError::Broken(e),
        Err(e) => PluginError::Broken(std::io::Error::other(e)),
    }
}

/// The events the agent subscribes to: bit `e - 1` for each event `e`.
#[must_use]
pub fn event_mask() -> i32 {
    [
        Event::CreateContainer,
        Event::StartContainer,
        Event::StopContainer,
        Event::RemoveContainer,
    ]
    .iter()
    .fold(0, |mask, e| mask | 1 << (*e as i32 - 1))
}

/// The pod as the agent sees it (moved, not copied, out of the request).
fn pod(p: Option<PodSandbox>) -> Pod {
    let PodSandbox {
        id,
        name,
        uid,
        namespace,
        labels,
        annotations,
        runtime_handler,
        pid,
    } = p.unwrap_or_default();
    Pod {
        id,
        namespace,
        name,
        uid,
        labels,
        annotations,
        runtime_handler,
        pid,
    }
}

/// The container as the agent sees it.
fn container(c: Option<Container>) -> ContainerInfo {
    let c = c.unwrap_or_default();
    ContainerInfo {
        running: c.state == ContainerState::ContainerRunning as i32,
        id: c.id,
        pod_id: c.pod_sandbox_id,
        name: c.name,
        pid: c.pid,
    }
}

fn mount(m: IdentityMount) -> Mount {
    Mount {
        destination: m.destination.display().to_string(),
        r#type: "bind".to_owned(),
        source: m.source.display().to_string(),
        options: BIND_MOUNT_OPTIONS.map(str::to_owned).to_vec(),
    }
}

/// The status the runtime shows for an agent's refusal (its message ends up in the container's
/// creation or start error).
fn status(error: &AgentError) -> RpcStatus {
    let code = match error {
        AgentError::Annotation(_) => Code::InvalidArgument,
        AgentError::Directory(_) => Code::Internal,
        AgentError::NoSvid { .. } | AgentError::NotMounted { .. } => Code::FailedPrecondition,
    };
    RpcStatus::new(code, error.to_string())
}

/// Decodes the runtime's calls, converts them for the agent, and its answers back.
#[derive(Debug, Clone)]
pub struct Dispatch {
    agent: Agent,
    /// Synchronize chunks received so far (`more` set): the agent sees the whole list at once.
    sync_pending: Arc<std::sync::Mutex<SynchronizeRequest>>,
    in_flight: Arc<InFlight>,
}

impl Dispatch {
    /// Dispatches to `agent`.
    #[must_use]
    pub fn new(agent: Agent) -> Self {
        Self {
            agent,
            sync_pending: Arc::default(),
            in_flight: Arc::default(),
        }
    }

    fn configure_agent(&self, request: &ConfigureRequest) -> ConfigureResponse {
        let timeout = u64::try_from(request.request_timeout)
            .ok()
            .map(Duration::from_millis);
        let (deadline, source) = self.agent.configure(timeout);
        tracing::info!(
            runtime = %request.runtime_name,
            version = %request.runtime_version,
            reported_request_timeout_ms = request.request_timeout,
            answer_within_ms = deadline.as_millis(),
            timeout_source = %source,
            "configured by the runtime"
        );
        ConfigureResponse {
            events: event_mask(),
            request_timeout: 0,
        }
    }

    fn synchronize_agent(&self, request: SynchronizeRequest) -> SynchronizeResponse {
        let whole = {
            let mut pending = lock(&self.sync_pending);
            pending.pods.extend(request.pods);
            pending.containers.extend(request.containers);
            if request.more {
                return SynchronizeResponse {
                    update: Vec::new(),
                    more: true,
                };
            }
            std::mem::take(&mut *pending)
        };
        let pods: Vec<Pod> = whole.pods.into_iter().map(|p| pod(Some(p))).collect();
        let containers: Vec<ContainerInfo> = whole
            .containers
            .into_iter()
            .map(|c| container(Some(c)))
            .collect();
        self.agent.synchronize(&pods, &containers);
        SynchronizeResponse {
            update: Vec::new(),
            more: false,
        }
    }

    fn create_container_agent(
        &self,
        request: CreateContainerRequest,
    ) -> Result<CreateContainerResponse, RpcStatus> {
        let mounts = self
            .agent
            .create_container(&pod(request.pod), &container(request.container))
            .map_err(|e| status(&e))?;
        if mounts.is_empty() {
            return Ok(CreateContainerResponse::default());
        }
        Ok(CreateContainerResponse {
            adjust: Some(ContainerAdjustment {
                annotations: std::collections::HashMap::new(),
                mounts: mounts.into_iter().map(mount).collect(),
            }),
            update: Vec::new(),
        })
    }

    async fn start_container_agent(
        &self,
        pod_sandbox: Option<PodSandbox>,
        ctr: Option<Container>,
    ) -> Result<(), RpcStatus> {
        self.agent
            .start_container(&pod(pod_sandbox), &container(ctr))
            .await
            .map_err(|e| status(&e))
    }
}

impl Dispatch {
    /// Runs one call, counting it and its duration under `call`.
    async fn counted<T>(
        &self,
        call: Call,
        answer: impl Future<Output = Result<T, RpcStatus>>,
    ) -> Result<T, RpcStatus> {
        let started = Instant::now();
        let id = self.in_flight.begin(call);
        let result = answer.await;
        self.in_flight.end(id);
        let metrics = self.agent.metrics();
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics
            .calls
            .get_or_create(&CallLabels {
                call,
                result: outcome,
            })
            .inc();
        metrics
            .call_duration
            .get_or_create(&CallOnlyLabels { call })
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

impl Handler for Dispatch {
    fn handle(&self, service: &str, method: &str, payload: Vec<u8>) -> HandlerFuture {
        let this = self.clone();
        let method = plugin_ttrpc::Method::route(service, method);
        Box::pin(async move {
            match method {
                Ok(method) => plugin_ttrpc::serve(&this, method, &payload).await,
                Err(status) => this.counted(Call::other, async { Err(status) }).await,
            }
        })
    }
}

/// The runtime's calls, typed by the generated service code; each is counted under its call.
impl plugin_ttrpc::Server for Dispatch {
    async fn configure(&self, request: ConfigureRequest) -> Result<ConfigureResponse, RpcStatus> {
        self.counted(Call::configure, async {
            Ok(self.configure_agent(&request))
        })
        .await
    }

    async fn synchronize(
        &self,
        request: SynchronizeRequest,
    ) -> Result<SynchronizeResponse, RpcStatus> {
        self.counted(Call::synchronize, async {
            Ok(self.synchronize_agent(request))
        })
        .await
    }

    async fn shutdown(&self, _: Empty) -> Result<Empty, RpcStatus> {
        tracing::info!("the runtime is shutting down");
        self.counted(Call::other, async { Ok(Empty {}) }).await
    }

    async fn create_container(
        &self,
        request: CreateContainerRequest,
    ) -> Result<CreateContainerResponse, RpcStatus> {
        self.counted(Call::create_container, async {
            self.create_container_agent(request)
        })
        .await
    }

    async fn start_container(
        &self,
        request: StartContainerRequest,
    ) -> Result<StartContainerResponse, RpcStatus> {
        self.counted(Call::start_container, async {
            self.start_container_agent(request.pod, request.container)
                .await
                .map(|()| StartContainerResponse {})
        })
        .await
    }

    async fn stop_container(
        &self,
        request: StopContainerRequest,
    ) -> Result<StopContainerResponse, RpcStatus> {
        self.counted(Call::stop_container, async {
            self.agent.stop_container(&container(request.container).id);
            Ok(StopContainerResponse::default())
        })
        .await
    }

    async fn remove_container(
        &self,
        request: RemoveContainerRequest,
    ) -> Result<RemoveContainerResponse, RpcStatus> {
        self.counted(Call::remove_container, async {
            self.agent
                .remove_container(&container(request.container).id);
            Ok(RemoveContainerResponse {})
        })
        .await
    }

    /// containerd 1.7 (NRI before the dedicated calls) sends the other events here.
    async fn state_change(&self, event: StateChangeEvent) -> Result<Empty, RpcStatus> {
        let StateChangeEvent {
            event,
            pod,
            container: ctr,
        } = event;
        match Event::try_from(event) {
            Ok(Event::StartContainer) => {
                self.counted(Call::start_container, async {
                    self.start_container_agent(pod, ctr)
                        .await
                        .map(|()| Empty {})
                })
                .await
            }
            Ok(Event::StopContainer) => {
                self.counted(Call::stop_container, async {
                    self.agent.stop_container(&container(ctr).id);
                    Ok(Empty {})
                })
                .await
            }
            Ok(Event::RemoveContainer) => {
                self.counted(Call::remove_container, async {
                    self.agent.remove_container(&container(ctr).id);
                    Ok(Empty {})
                })
                .await
            }
            _ => self.counted(Call::other, async { Ok(Empty {}) }).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribes_to_exactly_the_events_it_handles() {
        // CREATE_CONTAINER=4, START_CONTAINER=6, STOP_CONTAINER=10, REMOVE_CONTAINER=11.
        assert_eq!(event_mask(), (1 << 3) | (1 << 5) | (1 << 9) | (1 << 10));
    }

    #[test]
    fn calls_route_by_the_generated_method_table_and_nothing_else() {
        use plugin_ttrpc::{Method, SERVICE};
        assert_eq!(SERVICE, "nri.pkg.api.v1alpha1.Plugin");
        for method in Method::ALL {
            assert_eq!(Method::route(SERVICE, method.name()), Ok(method));
        }
        assert_eq!(
            Method::route(SERVICE, "StartContainer"),
            Ok(Method::StartContainer)
        );
        for (service, method) in [
            (SERVICE, "UpdateContainer"),
            (SERVICE, "startcontainer"),
            (runtime_ttrpc::SERVICE, "StartContainer"),
        ] {
            let status = Method::route(service, method).unwrap_err();
            assert_eq!(status.code, Code::Unimplemented as i32);
            assert_eq!(status.message, format!("{service}/{method}"));
        }
    }

    #[test]
    fn each_refusal_becomes_the_status_the_runtime_expects() {
        let annotation = crate::annotations::parse(
            "k",
            "[{cert_dir: x}]",
            &crate::annotations::Defaults::default(),
        )
        .unwrap_err();
        let directory = crate::files::ArtifactRoot::new("/proc/moat-cannot-exist")
            .map(drop)
            .unwrap_err();
        let cases = [
            (AgentError::Annotation(annotation), Code::InvalidArgument),
            (AgentError::Directory(directory), Code::Internal),
            (
                AgentError::NoSvid {
                    container: "ns/pod/web".into(),
                    missing: Vec::new(),
                },
                Code::FailedPrecondition,
            ),
        ];
        for (error, code) in cases {
            let s = status(&error);
            assert_eq!(s.code, code as i32, "{error}");
            assert_eq!(s.message, error.to_string());
            assert!(s.message.starts_with("moat identity: "), "{}", s.message);
        }
    }

    #[test]
    fn a_running_container_and_its_pod_convert_without_losing_what_the_agent_reads() {
        let c = container(Some(Container {
            id: "c1".into(),
            pod_sandbox_id: "p1".into(),
            name: "web".into(),
            pid: 42,
            state: ContainerState::ContainerRunning as i32,
            ..Default::default()
        }));
        assert_eq!(
            c,
            ContainerInfo {
                id: "c1".into(),
                pod_id: "p1".into(),
                name: "web".into(),
                pid: 42,
                running: true,
            }
        );
        assert!(!container(None).running);
        let p = pod(Some(PodSandbox {
            id: "p1".into(),
            name: "shop".into(),
            namespace: "ns".into(),
            annotations: [("a".to_owned(), "b".to_owned())].into(),
            ..Default::default()
        }));
        assert_eq!(
            (p.id.as_str(), p.namespace.as_str(), p.name.as_str()),
            ("p1", "ns", "shop")
        );
        assert_eq!(p.annotations["a"], "b");
    }

    #[test]
    fn plugin_index_is_two_digits() {
        assert_eq!("07".parse::<PluginIndex>().unwrap().to_string(), "07");
        for bad in ["7", "007", "ab", "", "1a"] {
            assert!(bad.parse::<PluginIndex>().is_err(), "{bad}");
        }
    }
}
