//! `moat serve` and `moat certs`: argument wiring around `moat-server`.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::time::Duration;

use moat_server::rotation::{RotationOptions, RotationPolicy};
use moat_server::server::{ServeOptions, Server, TlsSource};

use crate::load_config;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Least severe level logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    /// Includes whole objects: they can hold Secrets.
    Trace,
}

/// Arguments of `moat serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (YAML or JSON), reloaded when it changes. Default: the embedded one.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address for reviews (HTTPS).
    #[arg(long, default_value = "0.0.0.0:8443", value_name = "HOST:PORT")]
    addr: SocketAddr,
    /// Address for Prometheus metrics (plain HTTP, GET /metrics).
    #[arg(long, default_value = "0.0.0.0:9090", value_name = "HOST:PORT")]
    metrics_addr: SocketAddr,
    /// Serving certificate chain (PEM), reloaded when it changes.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "self_signed",
        requires = "tls_key",
        conflicts_with = "self_signed"
    )]
    tls_cert: Option<PathBuf>,
    /// Serving key (PEM), reloaded when it changes.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Make a CA and a certificate for localhost/127.0.0.1 in memory (for local use).
    #[arg(long, requires = "ca_out")]
    self_signed: bool,
    /// With --self-signed: where to write the CA bundle (PEM) before becoming ready.
    #[arg(long, value_name = "PATH", requires = "self_signed")]
    ca_out: Option<PathBuf>,
    /// Keep the CA and serving certificate in the Secret --tls-secret (in this pod's namespace)
    /// and renew them, instead of cert-manager: one replica at a time (by a Lease) writes the
    /// Secret and the webhook configurations' caBundle; every replica serves the Secret's
    /// volume through --tls-cert/--tls-key. See docs/server.md, "Certificate lifecycle".
    #[arg(
        long,
        requires_all = ["tls_cert", "tls_secret", "pod_name", "cert_dns"],
        conflicts_with = "self_signed"
    )]
    rotate_certs: bool,
    /// With --rotate-certs: the TLS Secret the Deployment mounts.
    #[arg(long, value_name = "NAME", requires = "rotate_certs")]
    tls_secret: Option<String>,
    /// With --rotate-certs: this replica's name in the Lease (the pod's name).
    #[arg(long, value_name = "NAME", requires = "rotate_certs")]
    pod_name: Option<String>,
    /// With --rotate-certs: a DNS name (or IP address) of the serving certificate; repeat.
    #[arg(long = "cert-dns", value_name = "NAME", requires = "rotate_certs")]
    cert_dns: Vec<String>,
    /// With --rotate-certs: name of both webhook configurations whose caBundle is kept.
    #[arg(
        long,
        default_value = "moat",
        value_name = "NAME",
        requires = "rotate_certs"
    )]
    webhook_configuration: String,
    /// With --rotate-certs: seconds given to a new trust bundle or Secret to reach every API
    /// server and replica (kubelet Secret-volume sync) before the next step of a CA rotation.
    #[arg(
        long,
        default_value_t = moat_server::rotation::DEFAULT_PROPAGATION_DELAY.as_secs(),
        value_name = "SECONDS",
        requires = "rotate_certs"
    )]
    cert_propagation_delay_secs: u64,
    /// With --rotate-certs: lifetime of each CA, in seconds (renewed when a third remains).
    #[arg(long, default_value_t = moat_server::rotation::DEFAULT_CA_LIFETIME.as_secs(), value_name = "SECONDS", requires = "rotate_certs")]
    ca_lifetime_secs: u64,
    /// With --rotate-certs: lifetime of each serving certificate, in seconds.
    #[arg(long, default_value_t = moat_server::rotation::DEFAULT_SERVING_LIFETIME.as_secs(), value_name = "SECONDS", requires = "rotate_certs")]
    serving_lifetime_secs: u64,
    /// With --rotate-certs: how often the controller looks at the Secret, in seconds.
    #[arg(long, default_value_t = moat_server::rotation::DEFAULT_CHECK_INTERVAL.as_secs(), value_name = "SECONDS", requires = "rotate_certs")]
    cert_check_interval_secs: u64,
    /// With --rotate-certs: how long the rotation Lease lasts unrenewed, in seconds.
    #[arg(long, default_value_t = moat_server::rotation::DEFAULT_LEASE_DURATION.as_secs(), value_name = "SECONDS", requires = "rotate_certs")]
    lease_duration_secs: u64,
    /// After SIGTERM: seconds the server keeps answering, not ready, so endpoints and API
    /// servers stop sending it reviews before it stops listening.
    #[arg(long, default_value_t = moat_server::limits::SHUTDOWN_DRAIN.as_secs(), value_name = "SECONDS")]
    shutdown_drain_secs: u64,
    /// Kubeconfig for the namespace cache and certificate rotation. Default: in-cluster, else
    /// KUBECONFIG or ~/.kube/config.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// CA bundle (PEM) that signs the API server's client certificate for webhooks: reviews then
    /// need that certificate; clients without one get health endpoints only (the kubelet's
    /// probes), and one signed by another CA fails the handshake. Read at start.
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level.
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    log_level: LogLevel,
}

/// Arguments of `moat certs`.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// DNS names (or IP addresses) the serving certificate is for, e.g. moat.moat-system.svc.
    #[arg(long = "dns", required = true, value_name = "NAME")]
    names: Vec<String>,
    /// Directory for ca.crt, ca.key, tls.crt and tls.key (keys 0600).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

pub(crate) fn init_logging(format: LogFormat, level: LogLevel) {
    let level = match level {
        LogLevel::Error => tracing::Level::ERROR,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Trace => tracing::Level::TRACE,
    };
    // Colour only for a person at a terminal, never into a file, pipe or log collector.
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second initialisation (tests calling run twice) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

/// Runs the admission server until SIGTERM or SIGINT.
pub fn run_serve(args: ServeArgs) -> Result<u8, String> {
    let ServeArgs {
        config,
        addr,
        metrics_addr,
        tls_cert,
        tls_key,
        self_signed,
        ca_out,
        kubeconfig,
        client_ca,
        rotate_certs,
        tls_secret,
        pod_name,
        cert_dns,
        webhook_configuration,
        cert_propagation_delay_secs,
        ca_lifetime_secs,
        serving_lifetime_secs,
        cert_check_interval_secs,
        lease_duration_secs,
        shutdown_drain_secs,
        log_format,
        log_level,
    } = args;
    init_logging(log_format, log_level);
    let tls = match (tls_cert, tls_key, self_signed, ca_out) {
        (Some(cert), Some(key), false, None) => TlsSource::Files { cert, key },
        (None, None, true, Some(ca_out)) => TlsSource::SelfSigned { ca_out },
        _ => {
            return Err("give --tls-cert and --tls-key, or --self-signed with --ca-out".to_owned());
        }
    };
    let rotation = match (rotate_certs, tls_secret, pod_name) {
        (false, _, _) => None,
        (true, Some(secret), Some(identity)) => Some(RotationOptions {
            namespace: None,
            lease: moat_server::rotation::lease_name(&secret),
            secret,
            webhook_configuration,
            identity,
            dns_names: cert_dns,
            policy: RotationPolicy {
                ca_lifetime: Duration::from_secs(ca_lifetime_secs),
                serving_lifetime: Duration::from_secs(serving_lifetime_secs),
                propagation_delay: Duration::from_secs(cert_propagation_delay_secs),
                lease_duration: Duration::from_secs(lease_duration_secs),
                check_interval: Duration::from_secs(cert_check_interval_secs),
            },
        }),
        (true, _, _) => {
            return Err("--rotate-certs needs --tls-secret and --pod-name".to_owned());
        }
    };
    if let Some(r) = &rotation {
        r.policy.validate().map_err(|e| e.to_string())?;
        if r.policy.propagation_delay < moat_server::rotation::KUBELET_SECRET_SYNC {
            tracing::warn!(
                propagation_delay_secs = r.policy.propagation_delay.as_secs(),
                kubelet_sync_secs = moat_server::rotation::KUBELET_SECRET_SYNC.as_secs(),
                "the propagation delay is shorter than the kubelet's Secret-volume sync: a replica may still serve a certificate from a CA that has left the trust bundle; use this only for tests"
            );
        }
    }
    let loaded = load_config(config.as_ref())?;
    for warning in loaded.warnings() {
        tracing::warn!(%warning, "configuration weakens isolation");
    }
    let options = ServeOptions {
        addr,
        metrics_addr,
        config: loaded,
        config_path: config,
        tls,
        kubeconfig,
        idle_timeout: moat_server::limits::CONNECTION_IDLE_TIMEOUT,
        rotation,
        client_ca,
        drain: Duration::from_secs(shutdown_drain_secs),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let served = runtime.block_on(async {
        let server = Server::bind(options).await?;
        server.run(shutdown_signal()).await
    });
    match served {
        Ok(()) => Ok(0),
        // The arguments were fine; the server could not run (a port in use, TLS files that do
        // not load, no API access): a runtime failure, not a usage error.
        Err(e) => {
            tracing::error!(error = %e, "the server stopped");
            eprintln!("moat: {e}");
            Ok(crate::EXIT_FAILED)
        }
    }
}

/// Completes on SIGTERM (what the kubelet sends) or SIGINT.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for signals; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// Writes a CA and a serving certificate.
pub fn run_certs(args: CertsArgs, stdout: &mut dyn std::io::Write) -> Result<u8, String> {
    let CertsArgs { names, out } = args;
    let generated = moat_server::certs::generate(&names).map_err(|e| e.to_string())?;
    moat_server::certs::write_dir(&out, &generated).map_err(|e| e.to_string())?;
    writeln!(
        stdout,
        "wrote {}/{{ca.crt,ca.key,tls.crt,tls.key}} for {}",
        out.display(),
        names.join(", ")
    )
    .map_err(|e| format!("writing output: {e}"))?;
    Ok(0)
}
