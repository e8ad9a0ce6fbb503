//! The runtime side of an NRI socket, as containerd runs it: it listens, accepts a plugin,
//! serves `Runtime.RegisterPlugin` on connection 2, and calls the plugin's `Plugin` service on
//! connection 1 with containerd's request timeout. Calls can use containerd 1.7's `StateChange`
//! form or the newer dedicated calls.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::DuplexStream;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::mux;
use crate::proto::nri::{
    ConfigureRequest, ConfigureResponse, Container, CreateContainerRequest,
    CreateContainerResponse, Empty, Event, PodSandbox, RegisterPluginRequest,
    RemoveContainerRequest, StartContainerRequest, StateChangeEvent, StopContainerRequest,
    SynchronizeRequest, SynchronizeResponse, plugin_ttrpc, runtime_ttrpc,
};
use crate::ttrpc::{CallError, Handler, HandlerFuture, NoService, Peer, RpcStatus};

/// containerd's default NRI request timeout.
pub const REQUEST_TIMEOUT: Duration = crate::defaults::RUNTIME_REQUEST_TIMEOUT;

/// How lifecycle events reach the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// containerd 1.7 (NRI 0.6): StartContainer and RemoveContainer as `StateChange`.
    StateChange,
    /// Newer NRI: a call per event.
    Dedicated,
}

/// A listening runtime double.
#[derive(Debug)]
pub struct RuntimeDouble {
    listener: UnixListener,
}

#[derive(Clone)]
struct Registrar(mpsc::Sender<RegisterPluginRequest>);

impl runtime_ttrpc::Server for Registrar {
    async fn register_plugin(&self, request: RegisterPluginRequest) -> Result<Empty, RpcStatus> {
        let _ = self.0.send(request).await;
        Ok(Empty {})
    }
}

impl Handler for Registrar {
    fn handle(&self, service: &str, method: &str, payload: Vec<u8>) -> HandlerFuture {
        let this = self.clone();
        let method = runtime_ttrpc::Method::route(service, method);
        Box::pin(async move { runtime_ttrpc::serve(&this, method?, &payload).await })
    }
}

/// A plugin connected to the double.
#[derive(Debug)]
pub struct PluginConn {
    plugin: plugin_ttrpc::Client<DuplexStream>,
    /// What the plugin registered as.
    pub registration: RegisterPluginRequest,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The request timeout calls use.
    pub timeout: Duration,
}

impl RuntimeDouble {
    /// Listens at `socket`.
    ///
    /// # Errors
    /// The bind error.
    pub fn bind(socket: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(socket);
        Ok(Self {
            listener: UnixListener::bind(socket)?,
        })
    }

    /// Accepts the next plugin and waits for it to register.
    ///
    /// # Errors
    /// An I/O error, or the plugin closing before it registered.
    pub async fn accept(&self) -> std::io::Result<PluginConn> {
        let (stream, _) = self.listener.accept().await?;
        let conns = mux::split(stream);
        let (tx, mut rx) = mpsc::channel(1);
        let (_runtime_side, _) = Peer::start(conns.runtime_service, Arc::new(Registrar(tx)));
        let (plugin, _) = Peer::start(conns.plugin_service, Arc::new(NoService));
        let registration = rx
            .recv()
            .await
            .ok_or_else(|| std::io::Error::other("the plugin closed before registering"))?;
        Ok(PluginConn {
            plugin: plugin_ttrpc::Client::new(plugin),
            registration,
            done: conns.done,
            timeout: REQUEST_TIMEOUT,
        })
    }
}

impl PluginConn {
    /// Configure, telling the plugin the request timeout.
    ///
    /// # Errors
    /// [`CallError`].
    pub async fn configure(&self) -> Result<ConfigureResponse, CallError> {
        self.configure_reporting(Some(self.timeout)).await
    }

    /// Configure, reporting `timeout` as the request timeout; `None` reports none, as
    /// containerd 1.7 does (whatever its `plugin_request_timeout`).
    ///
    /// # Errors
    /// [`CallError`].
    pub async fn configure_reporting(
        &self,
        timeout: Option<Duration>,
    ) -> Result<ConfigureResponse, CallError> {
        let request = ConfigureRequest {
            runtime_name: "runtime-double".into(),
            runtime_version: "1.7".into(),
            registration_timeout: 5000,
            request_timeout: timeout
                .map_or(0, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX)),
            ..Default::default()
        };
        self.plugin.configure(&request, self.timeout).await
    }

    /// Synchronize with the given pods and containers (one chunk).
    ///
    /// # Errors
    /// [`CallError`].
    pub async fn synchronize(
        &self,
        pods: Vec<PodSandbox>,
        containers: Vec<Container>,
    ) -> Result<SynchronizeResponse, CallError> {
        let request = SynchronizeRequest {
            pods,
            containers,
            more: false,
        };
        self.plugin.synchronize(&request, self.timeout).await
    }

    /// CreateContainer.
    ///
    /// # Errors
    /// [`CallError`], including the plugin's refusal.
    pub async fn create_container(
        &self,
        pod: &PodSandbox,
        container: &Container,
    ) -> Result<CreateContainerResponse, CallError> {
        let request = CreateContainerRequest {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
        };
        self.plugin.create_container(&request, self.timeout).await
    }

    /// StartContainer, in the given style.
    ///
    /// # Errors
    /// [`CallError`], including the plugin's refusal.
    pub async fn start_container(
        &self,
        pod: &PodSandbox,
        container: &Container,
        style: Style,
    ) -> Result<(), CallError> {
        self.event(Event::StartContainer, pod, container, style)
            .await
    }

    /// StopContainer.
    ///
    /// # Errors
    /// [`CallError`].
    pub async fn stop_container(
        &self,
        pod: &PodSandbox,
        container: &Container,
    ) -> Result<(), CallError> {
        let request = StopContainerRequest {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
        };
        self.plugin
            .stop_container(&request, self.timeout)
            .await
            .map(drop)
    }

    /// RemoveContainer, in the given style.
    ///
    /// # Errors
    /// [`CallError`].
    pub async fn remove_container(
        &self,
        pod: &PodSandbox,
        container: &Container,
        style: Style,
    ) -> Result<(), CallError> {
        self.event(Event::RemoveContainer, pod, container, style)
            .await
    }

    /// An event NRI 0.6 sends as `StateChange` and newer versions as a call of its own.
    async fn event(
        &self,
        event: Event,
        pod: &PodSandbox,
        container: &Container,
        style: Style,
    ) -> Result<(), CallError> {
        if style == Style::StateChange {
            return self.state_change(event, pod, container).await;
        }
        let (pod, container) = (Some(pod.clone()), Some(container.clone()));
        if event == Event::StartContainer {
            let request = StartContainerRequest { pod, container };
            self.plugin
                .start_container(&request, self.timeout)
                .await
                .map(drop)
        } else {
            let request = RemoveContainerRequest { pod, container };
            self.plugin
                .remove_container(&request, self.timeout)
                .await
                .map(drop)
        }
    }

    async fn state_change(
        &self,
        event: Event,
        pod: &PodSandbox,
        container: &Container,
    ) -> Result<(), CallError> {
        let request = StateChangeEvent {
            event: event as i32,
            pod: Some(pod.clone()),
            container: Some(container.clone()),
        };
        self.plugin
            .state_change(&request, self.timeout)
            .await
            .map(drop)
    }

    /// Closes the socket, as a runtime that goes away.
    pub fn close(self) {
        self.done.abort();
    }
}
