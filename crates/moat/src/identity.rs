//! `moat identity-agent`: argument wiring around `moat-identity`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use moat_identity::agent::{Agent, AgentConfig};
use moat_identity::annotations::Defaults;
use moat_identity::attest::{HandlerPattern, SandboxConfig};
use moat_identity::defaults;
use moat_identity::metrics::Metrics;
use moat_identity::metrics_server;
use moat_identity::plugin::{self, PluginIndex, PluginOptions, RequestTimeout};
use prometheus_client::registry::Registry;

use crate::serve::{LogFormat, LogLevel, init_logging, shutdown_signal};

/// Exit status when the runtime goes away: the DaemonSet restarts the agent, and Synchronize
/// rebuilds its state.
const EXIT_RUNTIME_LOST: u8 = crate::EXIT_FAILED;

/// Arguments of `moat identity-agent`.
#[derive(Debug, clap::Args)]
pub struct IdentityAgentArgs {
    /// The runtime's NRI socket.
    #[arg(long, default_value = defaults::NRI_SOCKET, value_name = "PATH")]
    nri_socket: PathBuf,
    /// Name to register with the runtime.
    #[arg(long, default_value = defaults::PLUGIN_NAME, value_name = "NAME")]
    plugin_name: String,
    /// Two-digit plugin index (the runtime calls plugins in ascending order).
    #[arg(long, default_value = defaults::PLUGIN_INDEX, value_name = "NN")]
    plugin_index: PluginIndex,
    /// The SPIRE agent's admin socket (Delegated Identity API), used when an annotation names
    /// none.
    #[arg(long, default_value = defaults::SPIRE_ADMIN_SOCKET, value_name = "PATH")]
    spire_admin_socket: PathBuf,
    /// A further SPIRE admin socket annotations may name (repeatable). No other socket is ever
    /// dialled, whatever an annotation says.
    #[arg(long = "allowed-spire-admin-socket", value_name = "PATH")]
    allowed_spire_admin_sockets: Vec<PathBuf>,
    /// Where the files appear in a container when an annotation names no `cert_dir`.
    #[arg(long, default_value = defaults::CERT_DIR, value_name = "PATH")]
    default_cert_dir: PathBuf,
    /// Host directory for the per-container SVID files (bind-mounted read-only into
    /// containers). Keep it on tmpfs (`/run` is on most hosts): private keys then never reach a
    /// disk, and nothing survives a reboot that no container could use.
    #[arg(long, default_value = defaults::ARTIFACT_DIR, value_name = "DIR")]
    artifact_dir: PathBuf,
    /// Longest wait for a container's first SVID, in milliseconds (capped 300 ms below the
    /// runtime's NRI request timeout, so the agent always answers in time).
    #[arg(long, default_value_t = defaults::SVID_WAIT_MS, value_name = "MS")]
    svid_wait_ms: u64,
    /// The runtime's NRI request timeout: set it to containerd's `plugin_request_timeout`
    /// (same syntax: `2s`, `1500ms`). containerd 1.7 does not report it; a runtime that does
    /// and says less wins. The agent answers every call within it, so a container whose SVID
    /// is late fails to start instead of starting without it.
    #[arg(long, default_value = defaults::RUNTIME_REQUEST_TIMEOUT_FLAG, value_name = "DURATION")]
    runtime_request_timeout: RequestTimeout,
    /// A runtime handler whose pods run in a sandbox (repeatable; a trailing `*` matches a
    /// prefix). Their containers are named to SPIRE by selectors, not by the sandbox's PID.
    #[arg(
        long = "sandboxed-runtime-handler",
        value_name = "HANDLER",
        default_values_t = defaults::SANDBOXED_RUNTIME_HANDLERS.map(|h| h.parse::<HandlerPattern>().unwrap_or_else(|e| unreachable!("{e}")))
    )]
    sandboxed_runtime_handlers: Vec<HandlerPattern>,
    /// moat's configuration, the same file `moat serve` decides with (`moat install` mounts the
    /// same ConfigMap content): the agent takes from it every key it trusts, the class label
    /// only when isolation is on and enforced (and only declared classes), the service-account
    /// annotation only when moat stamps it. Default: the embedded configuration (no stamp).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the runtime keeps container bundles: `<dir>/<container id>/config.json` is the OCI
    /// spec whose `process.user` owns the files.
    #[arg(long, default_value = defaults::RUNTIME_BUNDLE_DIR, value_name = "DIR")]
    runtime_bundle_dir: PathBuf,
    /// Address for Prometheus metrics and the liveness probe (plain HTTP: GET /metrics,
    /// GET /healthz).
    #[arg(long, default_value_t = defaults::METRICS_ADDR, value_name = "HOST:PORT")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level.
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    log_level: LogLevel,
}

/// Runs the agent until SIGTERM/SIGINT (exit 0) or until the runtime goes away (exit 3).
pub fn run_identity_agent(args: IdentityAgentArgs) -> Result<u8, String> {
    let IdentityAgentArgs {
        nri_socket,
        plugin_name,
        plugin_index,
        spire_admin_socket,
        allowed_spire_admin_sockets,
        default_cert_dir,
        artifact_dir,
        svid_wait_ms,
        runtime_request_timeout,
        sandboxed_runtime_handlers,
        config: config_path,
        runtime_bundle_dir,
        metrics_addr,
        log_format,
        log_level,
    } = args;
    init_logging(log_format, log_level);
    let absolute = |flag: &str, p: &PathBuf| {
        if p.is_absolute() {
            Ok(())
        } else {
            Err(format!("{flag} '{}' must be an absolute path", p.display()))
        }
    };
    absolute("--spire-admin-socket", &spire_admin_socket)?;
    absolute("--default-cert-dir", &default_cert_dir)?;
    for socket in &allowed_spire_admin_sockets {
        absolute("--allowed-spire-admin-socket", socket)?;
    }
    absolute("--runtime-bundle-dir", &runtime_bundle_dir)?;
    let moat_config = crate::load_config(config_path.as_ref())?;
    let sandbox = SandboxConfig::from_moat(&moat_config, sandboxed_runtime_handlers);
    tracing::info!(
        class_label = sandbox.class.as_ref().map(|c| c.label.as_str()),
        service_account_annotation = sandbox.service_account_annotation.as_deref(),
        "selectors for sandboxed pods rest on what moat's configuration polices"
    );
    if plugin_name.is_empty() {
        return Err("--plugin-name must not be empty".to_owned());
    }
    let config = AgentConfig {
        defaults: Defaults {
            spire_agent_address: spire_admin_socket,
            allowed_spire_agent_addresses: allowed_spire_admin_sockets
                .into_iter()
                .collect::<BTreeSet<_>>(),
            cert_dir: default_cert_dir,
        },
        artifact_root: artifact_dir,
        svid_wait: Duration::from_millis(svid_wait_ms),
        runtime_request_timeout: runtime_request_timeout.duration(),
        sandbox,
        bundle_dir: runtime_bundle_dir,
    };
    // One thread: the agent waits on sockets, and its only blocking work is a few small file
    // writes on tmpfs. Each further thread cost the agent its own allocator heap and stack;
    // at 1,000 containers, memory, not CPU, is what a node agent must save.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        // Counts that an exiting agent could not show a scrape (it exits when containerd hangs
        // up on a late call) are shown by the next one.
        metrics.persist_failures(config.artifact_root.join(".failures"));
        let agent = Agent::new(config, metrics).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .map_err(|e| format!("--metrics-addr {metrics_addr}: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = metrics_server::serve(listener, registry).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
        let options = PluginOptions {
            socket: nri_socket,
            name: plugin_name,
            index: plugin_index,
        };
        let result = plugin::run(agent.clone(), options, shutdown_signal()).await;
        agent.shutdown();
        match result {
            Ok(()) => Ok(0),
            Err(e) => {
                tracing::error!(error = %e, "identity agent stopping");
                Ok(EXIT_RUNTIME_LOST)
            }
        }
    })
}
