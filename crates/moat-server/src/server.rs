//! `moat serve`: TLS (HTTP/2 and HTTP/1.1 by ALPN) around [`crate::router`], a plain-HTTP
//! metrics port, file reloads, connection limits and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use moat_core::config::Config;
use moat_listen::conn::ConnectionTable;
use moat_listen::refusals::Reason;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::admission::Client;
use crate::certs;
use crate::limits::{
    H2_CONNECTION_WINDOW_BYTES, H2_STREAM_WINDOW_BYTES, HEADER_READ_TIMEOUT, MAX_HEADER_BYTES,
    MAX_STREAMS_PER_CONNECTION, METRICS_LIMITS, RELOAD_INTERVAL, SHUTDOWN_GRACE,
    TLS_HANDSHAKE_TIMEOUT, connection_limits,
};
use crate::metrics::Metrics;
use crate::namespaces::{self, NamespaceCache};
use crate::rotation::{RotationError, RotationOptions, Rotator, SystemClock};
use crate::tls::{CertStore, TlsError};
use crate::{AppState, metrics_router, router};

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// PEM files, reloaded when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// A CA and a certificate for `localhost`/`127.0.0.1` made in memory; the CA bundle (PEM) is
    /// written to `ca_out` before the server becomes ready. For local use.
    SelfSigned { ca_out: PathBuf },
}

/// Everything `moat serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub config: Config,
    /// The file `config` came from, watched for changes; `None` for the embedded default.
    pub config_path: Option<PathBuf>,
    pub tls: TlsSource,
    /// Kubeconfig for the namespace cache; `None`: in-cluster, else `KUBECONFIG` or
    /// `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Connections idle this long are closed ([`CONNECTION_IDLE_TIMEOUT`] in production).
    pub idle_timeout: Duration,
    /// Keep the CA and serving certificate in a Secret and renew them (`--rotate-certs`); the
    /// server still serves [`TlsSource::Files`], the Secret's volume.
    pub rotation: Option<RotationOptions>,
    /// CA bundle (PEM) that signs the API server's client certificate: reviews then need one.
    pub client_ca: Option<PathBuf>,
    /// How long the server keeps accepting after the shutdown signal, not ready
    /// ([`crate::limits::SHUTDOWN_DRAIN`] in production).
    pub drain: Duration,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate rotation: {0}")]
    Rotation(#[from] RotationError),
    #[error("accepting connections: {0}")]
    Accept(std::io::Error),
    #[error("images.trust: {0}")]
    ImageTrust(String),
}

/// A bound, not yet running server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    metrics_listener: TcpListener,
    state: Arc<AppState>,
    registry: Arc<Registry>,
    certs: Arc<CertStore>,
    config_path: Option<PathBuf>,
    idle_timeout: Duration,
    rotator: Option<Rotator>,
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    drain: Duration,
}

/// A client from `kubeconfig`, or in-cluster / `KUBECONFIG` / `~/.kube/config` without one.
/// A client from `kubeconfig`, or from the environment (in-cluster, then `KUBECONFIG`).
///
/// # Errors
/// [`kube::Error`] when no configuration is found or it does not load.
pub async fn kube_client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client, kube::Error> {
    match kubeconfig {
        None => kube::Client::try_default().await,
        Some(path) => {
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
            let config = kube::Config::from_custom_kubeconfig(
                file,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(kube::Error::InferKubeconfig)?;
            kube::Client::try_from(config)
        }
    }
}

impl Server {
    /// Loads the TLS material, starts the namespace cache when the configuration needs it, and
    /// binds both ports.
    ///
    /// # Errors
    /// [`ServeError`] naming what failed.
    pub async fn bind(options: ServeOptions) -> Result<Self, ServeError> {
        let ServeOptions {
            addr,
            metrics_addr,
            config,
            config_path,
            tls,
            kubeconfig,
            idle_timeout,
            rotation,
            client_ca,
            drain,
        } = options;
        let client_verifier = client_ca
            .as_deref()
            .map(crate::tls::client_verifier)
            .transpose()?;
        let certs = match tls {
            // With rotation, moat creates the Secret itself on a first install: its volume may
            // still be empty, and the controller reads the pair through the API meanwhile.
            TlsSource::Files { cert, key } if rotation.is_some() => {
                CertStore::awaiting_files(&cert, &key)?
            }
            TlsSource::Files { cert, key } => CertStore::from_files(&cert, &key)?,
            TlsSource::SelfSigned { ca_out } => {
                let generated = certs::generate(&[
                    "localhost".to_owned(),
                    "127.0.0.1".to_owned(),
                    "::1".to_owned(),
                ])?;
                certs::write_atomic(&ca_out, generated.ca_cert_pem.as_bytes(), 0o644)?;
                CertStore::from_pem(&generated.cert_pem, &generated.key_pem)?
            }
        };
        let client = if namespaces::needed(&config) || rotation.is_some() {
            Some(kube_client(kubeconfig.as_ref()).await?)
        } else {
            None
        };
        let namespaces = match (&client, namespaces::needed(&config)) {
            (Some(client), true) => Some(NamespaceCache::start(client.clone())),
            _ => None,
        };
        let mut registry = Registry::default();
        let certs = Arc::new(certs);
        let rotator = match (client, rotation) {
            (Some(client), Some(options)) => Some(
                Rotator::new(client, options, Arc::new(SystemClock), &mut registry)?
                    .with_served(certs.clone()),
            ),
            _ => None,
        };
        let state = Arc::new(AppState::new(config, namespaces, &mut registry));
        if let Some(e) = state.image_trust_error() {
            return Err(ServeError::ImageTrust(e.to_owned()));
        }
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })
        };
        Ok(Self {
            listener: bind(addr).await?,
            metrics_listener: bind(metrics_addr).await?,
            state,
            registry: Arc::new(registry),
            certs,
            config_path,
            idle_timeout,
            rotator,
            client_verifier,
            drain,
        })
    }

    /// The address the review port is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The address the metrics port is bound to.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.local_addr().ok()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
    /// (up to [`SHUTDOWN_GRACE`]) and returns.
    ///
    /// # Errors
    /// [`ServeError::Accept`] if the listener fails.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Self {
            listener,
            metrics_listener,
            state,
            registry,
            certs,
            config_path,
            idle_timeout,
            rotator,
            client_verifier,
            drain,
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut shutdown = std::pin::pin!(shutdown);

        let metrics = tokio::spawn(moat_listen::plain::serve(
            metrics_listener,
            metrics_router(registry),
            METRICS_LIMITS,
            state.refusals.listener("metrics"),
            stop_rx.clone(),
        ));
        let review_refusals = state.review_refusals.clone();
        let summaries = tokio::spawn(review_refusals.clone().summarise_until(stop_rx.clone()));
        let reloads = tokio::spawn(reload_loop(
            state.clone(),
            certs.clone(),
            config_path,
            stop_rx.clone(),
        ));

        // Only the Lease holder writes; every replica runs the loop so one takes over when the
        // holder goes away.
        let rotation = rotator.map(|r| tokio::spawn(r.run(stop_rx.clone())));

        // With a client CA, reviews need the API server's certificate; a client without one
        // (the kubelet's probes) is served health endpoints only.
        let clients_authenticated = client_verifier.is_some();
        let acceptor =
            TlsAcceptor::from(Arc::new(certs.server_config_with_clients(client_verifier)));
        let health = crate::router::health_router(state.clone());
        let graceful = GracefulShutdown::new();
        let table = ConnectionTable::new(connection_limits(idle_timeout));
        let app = router(state.clone());
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_HEADER_BYTES.max(8 * 1024));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .initial_stream_window_size(H2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(H2_CONNECTION_WINDOW_BYTES);
        let builder = Arc::new(builder);
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving reviews");
        }

        let mut drained: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown, if drained.is_none() => {
                    state.start_draining();
                    tracing::info!(drain_secs = drain.as_secs_f64(), "shutting down: not ready, still answering while endpoints update");
                    drained = Some(Box::pin(tokio::time::sleep(drain)));
                    continue;
                }
                () = async { if let Some(d) = drained.as_mut() { d.await } }, if drained.is_some() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Answered at once, never queued: the accept loop keeps taking the API server's
            // connections however many tenants hold, displacing the quietest at the cap.
            let Some(connection) = table.admit_counted(peer.ip(), &review_refusals) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, builder, app, health, watcher, refusals) = (
                acceptor.clone(),
                builder.clone(),
                app.clone(),
                health.clone(),
                graceful.watcher(),
                review_refusals.clone(),
            );
            tokio::spawn(async move {
                let tcp = connection.track(tcp);
                let serve = async {
                    let tls =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(_)) | Err(_) => {
                                refusals.note(Reason::handshake);
                                return;
                            }
                        };
                    let anonymous = tls.get_ref().1.peer_certificates().is_none();
                    if clients_authenticated && !anonymous {
                        connection.set_authenticated();
                    }
                    let app = if clients_authenticated && anonymous {
                        health
                    } else {
                        app
                    };
                    let client = Client {
                        source: peer.ip(),
                        activity: Some(connection.activity()),
                    };
                    let app = app.map_request(move |mut request: http::Request<_>| {
                        request.extensions_mut().insert(client.clone());
                        request
                    });
                    let service = TowerToHyperService::new(app);
                    let conn = builder.serve_connection(TokioIo::new(tls), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::trace!(%peer, error = %e, "connection ended with an error");
                    }
                };
                tokio::select! {
                    () = serve => {}
                    reason = connection.closing() => refusals.note(reason),
                }
            });
        }

        tracing::info!(
            open = graceful.count(),
            "shutting down: no new connections, finishing in-flight reviews"
        );
        drop(listener);
        let _ = stop_tx.send(true);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("in-flight reviews did not finish within the grace period");
        }
        let _ = metrics.await;
        let _ = summaries.await;
        reloads.abort();
        if let Some(rotation) = rotation {
            // It releases the Lease on the stop signal; a hung API gets no more than a moment.
            if tokio::time::timeout(Duration::from_secs(3), rotation)
                .await
                .is_err()
            {
                tracing::warn!("the rotation controller did not stop in time");
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

fn modified(path: &PathBuf) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())))
}

/// Checks the TLS files and the configuration file every [`RELOAD_INTERVAL`]. A file that does
/// not load is logged and counted, and the one in force is kept.
async fn reload_loop(
    state: Arc<AppState>,
    certs: Arc<CertStore>,
    config_path: Option<PathBuf>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut config_stamp = config_path.as_ref().and_then(modified);
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match certs.reload_if_changed() {
            Ok(false) => {}
            Ok(true) => {
                Metrics::reloaded(&state.metrics.tls_reloads, true);
                tracing::info!("TLS certificate reloaded");
            }
            Err(e) => {
                Metrics::reloaded(&state.metrics.tls_reloads, false);
                tracing::error!(error = %e, "TLS reload failed; keeping the certificate in use");
            }
        }
        let Some(path) = &config_path else { continue };
        let now = modified(path);
        if now == config_stamp {
            continue;
        }
        config_stamp = now;
        let loaded = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| Config::from_yaml(&text).map_err(|e| e.to_string()))
            .and_then(|config| state.set_config(config));
        match loaded {
            Ok(()) => {
                Metrics::reloaded(&state.metrics.config_reloads, true);
                tracing::info!(path = %path.display(), "configuration reloaded");
            }
            Err(e) => {
                Metrics::reloaded(&state.metrics.config_reloads, false);
                tracing::error!(path = %path.display(), error = %e, "configuration reload failed; keeping the configuration in force");
            }
        }
    }
}
