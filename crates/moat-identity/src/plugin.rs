//! The plugin's side of the NRI socket: connect, register, answer the runtime's calls, and end
//! when the runtime goes away (the agent's supervisor restarts it, and Synchronize rebuilds its
//! state).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::net::UnixStream;

use crate::AbortOnDrop;
use crate::agent::Agent;
use crate::metrics::{Call, CallLabels, CallOnlyLabels};
use crate::mux;
use crate::proto::nri::{
    ConfigureRequest, CreateContainerRequest, Empty, Event, RegisterPluginRequest,
    RemoveContainerRequest, RemoveContainerResponse, StartContainerRequest, StartContainerResponse,
    StateChangeEvent, StopContainerRequest, StopContainerResponse, SynchronizeRequest,
};
use crate::ttrpc::{self, Code, Handler, HandlerFuture, NoService, Peer, RpcStatus};

/// The runtime's service (the plugin calls it).
pub const RUNTIME_SERVICE: &str = "nri.pkg.api.v1alpha1.Runtime";
/// The plugin's service (the runtime calls it).
pub const PLUGIN_SERVICE: &str = "nri.pkg.api.v1alpha1.Plugin";
/// How long registration may take.
pub const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(5);

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
    let (_server, served) = Peer::start(conns.plugin_service, Arc::new(Dispatch { agent }));
    let (client, client_task) = Peer::start(conns.runtime_service, Arc::new(NoService));
    // However run() ends (returned or dropped), the connection closes with it.
    let _guard = AbortOnDrop(vec![served.abort_handle(), client_task.abort_handle()]);
    let register = RegisterPluginRequest {
        plugin_name: name.clone(),
        plugin_idx: index.to_string(),
        nri_version: String::new(),
    };
    let registered = client.call::<_, Empty>(
        RUNTIME_SERVICE,
        "RegisterPlugin",
        &register,
        REGISTRATION_TIMEOUT,
    );
    let mut done = conns.done;
    let _done_guard = AbortOnDrop(vec![done.abort_handle()]);
    tokio::select! {
        result = registered => drop(result.map_err(PluginError::Register)?),
        result = &mut done => return Err(ended(result)),
    }
    tracing::info!(socket = %socket.display(), plugin = %name, index = %index, "registered with the runtime");
    tokio::select! {
        result = &mut done => Err(ended(result)),
        () = shutdown => Ok(()),
    }
}

fn ended(result: Result<std::io::Result<()>, tokio::task::JoinError>) -> PluginError {
    match result {
        Ok(Ok(())) => PluginError::Closed,
        Ok(Err(e)) => PluginError::Broken(e),
        Err(e) => PluginError::Broken(std::io::Error::other(e)),
    }
}

/// Decodes the runtime's calls and hands them to the agent.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// The agent that answers.
    pub agent: Agent,
}

fn decode<M: Message + Default>(payload: &[u8]) -> Result<M, RpcStatus> {
    M::decode(payload)
        .map_err(|e| RpcStatus::new(Code::InvalidArgument, format!("undecodable request: {e}")))
}

impl Handler for Dispatch {
    fn handle(&self, service: &str, method: &str, payload: Vec<u8>) -> HandlerFuture {
        if service != PLUGIN_SERVICE {
            let status = RpcStatus::new(Code::Unimplemented, format!("{service} is not served"));
            return Box::pin(async move { Err(status) });
        }
        let agent = self.agent.clone();
        let method = method.to_owned();
        Box::pin(async move {
            let started = Instant::now();
            let (call, result) = dispatch(&agent, &method, &payload).await;
            let metrics = agent.metrics();
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
        })
    }
}

async fn dispatch(agent: &Agent, method: &str, payload: &[u8]) -> (Call, ttrpc::HandlerResult) {
    match method {
        "Configure" => (
            Call::configure,
            decode::<ConfigureRequest>(payload).map(|r| agent.configure(&r).encode_to_vec()),
        ),
        "Synchronize" => (
            Call::synchronize,
            decode::<SynchronizeRequest>(payload).map(|r| agent.synchronize(r).encode_to_vec()),
        ),
        "CreateContainer" => (
            Call::create_container,
            match decode::<CreateContainerRequest>(payload) {
                Ok(r) => {
                    let (pod, container) =
                        (r.pod.unwrap_or_default(), r.container.unwrap_or_default());
                    agent
                        .create_container(&pod, &container)
                        .map(|a| a.encode_to_vec())
                }
                Err(e) => Err(e),
            },
        ),
        "StartContainer" => (
            Call::start_container,
            match decode::<StartContainerRequest>(payload) {
                Ok(r) => {
                    let (pod, container) =
                        (r.pod.unwrap_or_default(), r.container.unwrap_or_default());
                    agent
                        .start_container(&pod, &container)
                        .await
                        .map(|()| StartContainerResponse {}.encode_to_vec())
                }
                Err(e) => Err(e),
            },
        ),
        "StopContainer" => (
            Call::stop_container,
            decode::<StopContainerRequest>(payload).map(|r| {
                agent.stop_container(&r.container.unwrap_or_default());
                StopContainerResponse::default().encode_to_vec()
            }),
        ),
        "RemoveContainer" => (
            Call::remove_container,
            decode::<RemoveContainerRequest>(payload).map(|r| {
                agent.remove_container(&r.container.unwrap_or_default());
                RemoveContainerResponse {}.encode_to_vec()
            }),
        ),
        // containerd 1.7 (NRI before the dedicated calls) sends the other events here.
        "StateChange" => match decode::<StateChangeEvent>(payload) {
            Err(e) => (Call::other, Err(e)),
            Ok(event) => {
                let pod = event.pod.unwrap_or_default();
                let container = event.container.unwrap_or_default();
                match Event::try_from(event.event) {
                    Ok(Event::StartContainer) => (
                        Call::start_container,
                        agent
                            .start_container(&pod, &container)
                            .await
                            .map(|()| Empty {}.encode_to_vec()),
                    ),
                    Ok(Event::StopContainer) => {
                        agent.stop_container(&container);
                        (Call::stop_container, Ok(Empty {}.encode_to_vec()))
                    }
                    Ok(Event::RemoveContainer) => {
                        agent.remove_container(&container);
                        (Call::remove_container, Ok(Empty {}.encode_to_vec()))
                    }
                    _ => (Call::other, Ok(Empty {}.encode_to_vec())),
                }
            }
        },
        "Shutdown" => {
            tracing::info!("the runtime is shutting down");
            (Call::other, Ok(Empty {}.encode_to_vec()))
        }
        other => (
            Call::other,
            Err(RpcStatus::new(
                Code::Unimplemented,
                format!("{PLUGIN_SERVICE}/{other}"),
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_index_is_two_digits() {
        assert_eq!("07".parse::<PluginIndex>().unwrap().to_string(), "07");
        for bad in ["7", "007", "ab", "", "1a"] {
            assert!(bad.parse::<PluginIndex>().is_err(), "{bad}");
        }
    }
}
