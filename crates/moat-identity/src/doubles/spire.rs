//! A SPIRE agent's Delegated Identity API: real X.509 SVIDs with a `spiffe://` URI SAN, signed by
//! a test CA, issued to PIDs the test has registered (by PID, or by the container id in the
//! process's cgroup path, as SPIRE's Kubernetes workload attestor reads it), and to selector
//! requests as SPIRE matches them: every registration entry whose selectors are a subset of the
//! request's. It records each request, can rotate, add a second root, refuse the caller
//! (PermissionDenied) or stall.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::lock;
use crate::proto::delegated::delegated_identity_server::{
    DelegatedIdentity, DelegatedIdentityServer,
};
use crate::proto::delegated::{
    SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest,
    SubscribeToX509sviDsResponse, X509svidWithKey,
};
use crate::proto::spire_types::{Spiffeid as WireId, X509svid};

/// How the double answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Issue SVIDs to registered workloads.
    Serve,
    /// PermissionDenied, as for a caller missing from `authorized_delegates` (also sent on open
    /// streams at the next change).
    Deny,
    /// Accept subscriptions and never answer.
    Stall,
}

/// The double's errors (certificate generation, socket binding).
#[derive(Debug, thiserror::Error)]
pub enum DoubleError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

fn new_ca(trust_domain: &str, n: usize) -> Result<Ca, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{trust_domain} test root {n}"));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    let der = params.self_signed(&key)?.der().to_vec();
    Ok(Ca { params, key, der })
}

struct State {
    trust_domain: String,
    /// Signing root first; older roots stay in the bundle.
    roots: Vec<Ca>,
    /// `pid:<n>` or `container:<id>` → SPIFFE ID.
    registrations: HashMap<String, String>,
    /// Registration entries by selectors (`type:value`), in registration order.
    entries: Vec<(BTreeSet<String>, String)>,
    /// Every `SubscribeToX509SVIDs` request, in arrival order.
    requests: Vec<SvidRequest>,
    mode: Mode,
}

/// A `SubscribeToX509SVIDs` request as the double received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvidRequest {
    /// By PID.
    Pid(i32),
    /// By selectors, each `type:value`, sorted.
    Selectors(Vec<String>),
}

/// A running double.
pub struct SpireDouble {
    state: Arc<Mutex<State>>,
    changes: watch::Sender<u64>,
    open_svid_streams: Arc<AtomicUsize>,
    issuing: Arc<Issuing>,
    socket: PathBuf,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for SpireDouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpireDouble")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Drop for SpireDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl SpireDouble {
    /// Serves on a new Unix socket at `socket` for trust domain `trust_domain`.
    ///
    /// # Errors
    /// [`DoubleError`] when the CA cannot be made or the socket bound.
    pub fn start(socket: &Path, trust_domain: &str) -> Result<Self, DoubleError> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let state = Arc::new(Mutex::new(State {
            trust_domain: trust_domain.to_owned(),
            roots: vec![new_ca(trust_domain, 0)?],
            registrations: HashMap::new(),
            entries: Vec::new(),
            requests: Vec::new(),
            mode: Mode::Serve,
        }));
        let (changes, _) = watch::channel(0);
        let open_svid_streams = Arc::new(AtomicUsize::new(0));
        let issuing = Arc::new(Issuing::default());
        let service = Service {
            state: state.clone(),
            changes: changes.clone(),
            open: open_svid_streams.clone(),
            issuing: issuing.clone(),
        };
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(DelegatedIdentityServer::new(service))
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "SPIRE double stopped");
            }
        });
        Ok(Self {
            state,
            changes,
            open_svid_streams,
            issuing,
            socket: socket.to_owned(),
            server,
        })
    }

    /// The socket path.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Issues `spiffe_id` to the process `pid`.
    pub fn register_pid(&self, pid: u32, spiffe_id: &str) {
        lock(&self.state)
            .registrations
            .insert(format!("pid:{pid}"), spiffe_id.to_owned());
        self.changed();
    }

    /// Issues `spiffe_id` to any process whose cgroup path ends in `container_id`.
    pub fn register_container(&self, container_id: &str, spiffe_id: &str) {
        lock(&self.state)
            .registrations
            .insert(format!("container:{container_id}"), spiffe_id.to_owned());
        self.changed();
    }

    /// A registration entry: `spiffe_id` for any workload whose selectors (each `type:value`,
    /// e.g. `k8s:ns:shop`) include all of `selectors`.
    pub fn register_selectors(&self, selectors: &[&str], spiffe_id: &str) {
        let set = selectors.iter().map(|s| (*s).to_owned()).collect();
        lock(&self.state).entries.push((set, spiffe_id.to_owned()));
        self.changed();
    }

    /// Every `SubscribeToX509SVIDs` request so far.
    #[must_use]
    pub fn requests(&self) -> Vec<SvidRequest> {
        lock(&self.state).requests.clone()
    }

    /// Sends every open stream a freshly signed SVID.
    pub fn rotate(&self) {
        self.changed();
    }

    /// Starts signing with a new root; the bundle then holds both (as during a CA rotation).
    ///
    /// # Errors
    /// [`DoubleError::Cert`] when the root cannot be made.
    pub fn add_root(&self) -> Result<(), DoubleError> {
        {
            let mut state = lock(&self.state);
            let n = state.roots.len();
            let ca = new_ca(&state.trust_domain.clone(), n)?;
            state.roots.insert(0, ca);
        }
        self.changed();
        Ok(())
    }

    /// Changes how the double answers (open streams see it at the next change).
    pub fn set_mode(&self, mode: Mode) {
        lock(&self.state).mode = mode;
        self.changed();
    }

    /// The roots' DER, signing root first.
    #[must_use]
    pub fn roots_der(&self) -> Vec<Vec<u8>> {
        lock(&self.state)
            .roots
            .iter()
            .map(|ca| ca.der.clone())
            .collect()
    }

    /// SVIDs issued so far, and the mean time the double spent making one (key generation and
    /// signing): SPIRE's share of a container start, for benchmarks.
    #[must_use]
    pub fn issued(&self) -> (u64, std::time::Duration) {
        let n = self.issuing.count.load(Ordering::Relaxed);
        let nanos = self.issuing.nanos.load(Ordering::Relaxed);
        (
            n,
            std::time::Duration::from_nanos(nanos.checked_div(n).unwrap_or(0)),
        )
    }

    /// How many SVID streams are open now.
    #[must_use]
    pub fn open_svid_streams(&self) -> usize {
        self.open_svid_streams.load(Ordering::SeqCst)
    }
}

#[derive(Default)]
struct Issuing {
    count: AtomicU64,
    nanos: AtomicU64,
}

#[derive(Clone)]
struct Service {
    state: Arc<Mutex<State>>,
    changes: watch::Sender<u64>,
    open: Arc<AtomicUsize>,
    issuing: Arc<Issuing>,
}

/// The container id in a process's cgroup path (its last component), as the Kubernetes
/// workload attestor finds it.
fn container_of(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .filter_map(|l| l.rsplit('/').next())
        .find(|last| last.len() == 64 && last.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
}

impl Service {
    /// One answer for `request`, as the current state says.
    fn answer(&self, request: &SvidRequest) -> Result<SubscribeToX509sviDsResponse, Status> {
        let state = lock(&self.state);
        match state.mode {
            Mode::Deny => return Err(Status::permission_denied("no identity issued")),
            Mode::Serve | Mode::Stall => {}
        }
        let ids: Vec<String> = match request {
            SvidRequest::Pid(pid) => {
                let pid = *pid;
                state
                    .registrations
                    .get(&format!("pid:{pid}"))
                    .or_else(|| {
                        container_of(pid)
                            .and_then(|c| state.registrations.get(&format!("container:{c}")))
                    })
                    .cloned()
                    .into_iter()
                    .collect()
            }
            SvidRequest::Selectors(selectors) => {
                let have: BTreeSet<&str> = selectors.iter().map(String::as_str).collect();
                state
                    .entries
                    .iter()
                    .filter(|(want, _)| want.iter().all(|w| have.contains(w.as_str())))
                    .map(|(_, id)| id.clone())
                    .collect()
            }
        };
        // None: not attested (yet), an answer with no SVID, as the real agent sends.
        let mut answer = SubscribeToX509sviDsResponse::default();
        for id in &ids {
            answer.x509_svids.push(self.issue(&state, id)?);
        }
        Ok(answer)
    }

    fn issue(&self, state: &State, id: &str) -> Result<X509svidWithKey, Status> {
        let issue = || -> Result<(Vec<u8>, Vec<u8>, i64), rcgen::Error> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::URI(id.try_into()?)];
            params.not_after = rcgen::date_time_ymd(2030, 1, 1);
            let ca = &state.roots[0];
            let issuer = Issuer::new(ca.params.clone(), &ca.key);
            let cert = params.signed_by(&key, &issuer)?;
            // 2030-01-01T00:00:00Z, the certificate's notAfter.
            Ok((cert.der().to_vec(), key.serialize_der(), 1_893_456_000))
        };
        let started = std::time::Instant::now();
        let (cert, key, expires_at) = issue().map_err(|e| Status::internal(e.to_string()))?;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.issuing.count.fetch_add(1, Ordering::Relaxed);
        self.issuing.nanos.fetch_add(nanos, Ordering::Relaxed);
        let (trust_domain, path) = id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.find('/').map(|i| rest.split_at(i)))
            .map(|(td, path)| (td.to_owned(), path.to_owned()))
            .unwrap_or_default();
        Ok(X509svidWithKey {
            x509_svid: Some(X509svid {
                cert_chain: vec![cert],
                id: Some(WireId { trust_domain, path }),
                expires_at,
                hint: String::new(),
            }),
            x509_svid_key: key,
        })
    }

    fn bundle(&self) -> SubscribeToX509BundlesResponse {
        let state = lock(&self.state);
        let der: Vec<u8> = state.roots.iter().flat_map(|ca| ca.der.clone()).collect();
        SubscribeToX509BundlesResponse {
            ca_certificates: [(format!("spiffe://{}", state.trust_domain), der)].into(),
        }
    }
}

type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Counts an open stream until dropped.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl DelegatedIdentity for Service {
    type SubscribeToX509SVIDsStream = Answers<SubscribeToX509sviDsResponse>;
    type SubscribeToX509BundlesStream = Answers<SubscribeToX509BundlesResponse>;

    async fn subscribe_to_x509svi_ds(
        &self,
        request: Request<SubscribeToX509sviDsRequest>,
    ) -> Result<Response<Self::SubscribeToX509SVIDsStream>, Status> {
        let request = request.into_inner();
        let request = match (request.pid, request.selectors.is_empty()) {
            (pid, true) if pid > 0 => SvidRequest::Pid(pid),
            (0, false) => {
                let mut s: Vec<String> = request
                    .selectors
                    .iter()
                    .map(|s| format!("{}:{}", s.r#type, s.value))
                    .collect();
                s.sort();
                SvidRequest::Selectors(s)
            }
            _ => {
                return Err(Status::invalid_argument(
                    "a PID or selectors are required, not both",
                ));
            }
        };
        lock(&self.state).requests.push(request.clone());
        if lock(&self.state).mode == Mode::Deny {
            return Err(Status::permission_denied(
                "caller not configured as an authorized delegate",
            ));
        }
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        let mut changes = self.changes.subscribe();
        self.open.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard(self.open.clone());
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                changes.mark_unchanged();
                if lock(&service.state).mode != Mode::Stall {
                    let answer = service.answer(&request);
                    let denied = answer.is_err();
                    if tx.send(answer).await.is_err() || denied {
                        return;
                    }
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn subscribe_to_x509_bundles(
        &self,
        _request: Request<SubscribeToX509BundlesRequest>,
    ) -> Result<Response<Self::SubscribeToX509BundlesStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        let mut changes = self.changes.subscribe();
        tokio::spawn(async move {
            loop {
                changes.mark_unchanged();
                if tx.send(Ok(service.bundle())).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
