//! The SPIRE agent's Delegated Identity API, on its admin socket.
//!
//! One [`SpireAgent`] per socket: a lazily connected gRPC channel that every subscription shares
//! (one HTTP/2 stream each), and one `SubscribeToX509Bundles` stream whose latest answer every
//! container's writer reads, so a thousand containers cost one bundle stream, not a thousand.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::attest::Workload;
use crate::backoff::Backoff;
use crate::proto::delegated::delegated_identity_client::DelegatedIdentityClient;
// prost's case conversion spells the "X509SVIDs" messages this way.
pub use crate::proto::delegated::SubscribeToX509sviDsResponse as SvidsResponse;
use crate::proto::delegated::{
    SubscribeToX509BundlesRequest, SubscribeToX509sviDsRequest as SvidsRequest,
};
use crate::proto::spire_types::Selector as WireSelector;
use crate::spiffe::{ChainError, SpiffeId, check_chain, pem, split_certificates};

/// Initial size (and growth step) of a stream's encode and decode buffers. tonic's default,
/// 8 KiB, is allocated per call: with one SVID stream per container that alone was 8 MiB at
/// 1,000 containers. An SVID answer (chain and key) is 1 to 3 KiB; a larger one grows the
/// buffer in steps of this size.
pub const CODEC_BUFFER_BYTES: usize = 1024;

/// prost's codec with [`CODEC_BUFFER_BYTES`] buffers (used by the generated client and server).
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(small_buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(small_buffers())
    }
}

fn small_buffers() -> tonic::codec::BufferSettings {
    // The yield threshold only batches a server's ready messages: tonic's default.
    tonic::codec::BufferSettings::new(CODEC_BUFFER_BYTES, 32 * 1024)
}

/// How long connecting to the admin socket may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// First and longest pause before re-opening a broken bundle stream.
const BUNDLE_RETRY_FIRST: Duration = Duration::from_millis(100);
const BUNDLE_RETRY_MAX: Duration = Duration::from_secs(5);

/// Trust bundles by trust domain ID (`spiffe://example.org`), each a list of DER certificates.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Bundles {
    /// CA certificates (DER) per trust domain ID.
    pub by_trust_domain: HashMap<String, Vec<Vec<u8>>>,
}

/// An X.509 SVID as moat writes it.
#[derive(Clone, PartialEq, Eq)]
pub struct Svid {
    /// The SPIFFE ID, read from the leaf certificate.
    pub id: SpiffeId,
    /// Leaf first, DER.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key: Vec<u8>,
    /// Seconds since the Unix epoch.
    pub expires_at: i64,
}

impl Svid {
    /// The certificate chain as PEM, leaf first.
    #[must_use]
    pub fn chain_pem(&self) -> String {
        pem("CERTIFICATE", &self.chain)
    }

    /// The PKCS#8 private key as PEM.
    #[must_use]
    pub fn key_pem(&self) -> String {
        pem("PRIVATE KEY", &[&self.key])
    }
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why an answer from the SPIRE agent could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    #[error("the SPIRE agent issued {got:?}, not the expected {expected}")]
    NotIssued { expected: String, got: Vec<String> },
    #[error("the SVID has no private key")]
    EmptyKey,
    #[error("the SVID's certificate chain: {0}")]
    Chain(#[from] ChainError),
    #[error("the SVID is labelled {label} but its certificate says {cert}")]
    IdMismatch { label: String, cert: String },
}

/// Picks the SVID moat writes from an answer: the one with the expected ID if one is expected,
/// else the first. `Ok(None)` when the answer carries none (the agent cannot attest the PID yet).
///
/// # Errors
/// [`SvidError`] when the SVID is not the expected one or its certificate disagrees with it.
pub fn select_svid(
    response: &SvidsResponse,
    expected: Option<&SpiffeId>,
) -> Result<Option<Svid>, SvidError> {
    let mut seen = Vec::new();
    for with_key in &response.x509_svids {
        let Some(svid) = &with_key.x509_svid else {
            continue;
        };
        let id = check_chain(&svid.cert_chain)?;
        if let Some(label) = &svid.id {
            let label = format!("spiffe://{}{}", label.trust_domain, label.path);
            if label != id.as_str() {
                return Err(SvidError::IdMismatch {
                    label,
                    cert: id.to_string(),
                });
            }
        }
        if expected.is_some_and(|want| *want != id) {
            seen.push(id.to_string());
            continue;
        }
        if with_key.x509_svid_key.is_empty() {
            return Err(SvidError::EmptyKey);
        }
        return Ok(Some(Svid {
            id,
            chain: svid.cert_chain.clone(),
            key: with_key.x509_svid_key.clone(),
            expires_at: svid.expires_at,
        }));
    }
    match expected {
        Some(want) if !seen.is_empty() => Err(SvidError::NotIssued {
            expected: want.to_string(),
            got: seen,
        }),
        _ => Ok(None),
    }
}

/// One SPIRE agent admin socket.
#[derive(Debug)]
pub struct SpireAgent {
    client: DelegatedIdentityClient<Channel>,
    bundles: watch::Receiver<Option<Arc<Bundles>>>,
    bundle_task: tokio::task::JoinHandle<()>,
    /// Cuts the bundle follower's pause short: a container waiting for its first SVID should
    /// not also wait out a backoff that began while the SPIRE agent was down.
    retry_now: Arc<tokio::sync::Notify>,
}

impl Drop for SpireAgent {
    fn drop(&mut self) {
        self.bundle_task.abort();
    }
}

impl SpireAgent {
    /// A client for the agent at `socket` (connected on first use, reconnected after loss), and
    /// a task that follows its bundles. `on_bundle_error` is called each time the bundle
    /// stream fails (for metrics).
    #[must_use]
    pub fn connect(
        socket: &Path,
        on_bundle_error: impl Fn(&tonic::Status) + Send + 'static,
    ) -> Self {
        let path = socket.to_owned();
        // The URI is never dialled: the connector below opens the Unix socket.
        let channel = Endpoint::from_static("http://spire-agent.invalid")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }));
        let client = DelegatedIdentityClient::new(channel);
        let (tx, bundles) = watch::channel(None);
        let retry_now = Arc::new(tokio::sync::Notify::new());
        let bundle_task = tokio::spawn(follow_bundles(
            client.clone(),
            tx,
            retry_now.clone(),
            on_bundle_error,
        ));
        Self {
            client,
            bundles,
            bundle_task,
            retry_now,
        }
    }

    /// The latest bundles, and changes to them.
    #[must_use]
    pub fn bundles(&self) -> watch::Receiver<Option<Arc<Bundles>>> {
        self.bundles.clone()
    }

    /// Opens `SubscribeToX509SVIDs` for a workload: by PID, or by selectors (the API takes one
    /// or the other, never both).
    ///
    /// # Errors
    /// The gRPC status: unreachable agent, PermissionDenied, ….
    pub async fn subscribe(
        &self,
        workload: &Workload,
    ) -> Result<tonic::Streaming<SvidsResponse>, tonic::Status> {
        if self.bundles.borrow().is_none() {
            self.retry_now.notify_one();
        }
        let request = match workload {
            Workload::Pid(pid) => SvidsRequest {
                selectors: Vec::new(),
                pid: *pid,
            },
            Workload::Selectors(selectors) => SvidsRequest {
                selectors: selectors
                    .iter()
                    .map(|s| WireSelector {
                        r#type: s.kind.clone(),
                        value: s.value.clone(),
                    })
                    .collect(),
                pid: 0,
            },
        };
        Ok(self
            .client
            .clone()
            .subscribe_to_x509svi_ds(request)
            .await?
            .into_inner())
    }
}

async fn follow_bundles(
    mut client: DelegatedIdentityClient<Channel>,
    tx: watch::Sender<Option<Arc<Bundles>>>,
    retry_now: Arc<tokio::sync::Notify>,
    on_error: impl Fn(&tonic::Status),
) {
    let mut backoff = Backoff::new(BUNDLE_RETRY_FIRST, BUNDLE_RETRY_MAX);
    loop {
        let status = match client
            .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
            .await
        {
            Err(status) => status,
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(answer)) => {
                            backoff.reset();
                            let mut bundles = Bundles::default();
                            for (td, der) in answer.ca_certificates {
                                match split_certificates(&der) {
                                    Ok(certs) => {
                                        let certs = certs.into_iter().map(<[u8]>::to_vec).collect();
                                        bundles.by_trust_domain.insert(td, certs);
                                    }
                                    Err(e) => {
                                        tracing::warn!(trust_domain = %td, error = %e, "unreadable bundle skipped");
                                    }
                                }
                            }
                            tx.send_replace(Some(Arc::new(bundles)));
                        }
                        Ok(None) => break tonic::Status::unavailable("bundle stream ended"),
                        Err(status) => break status,
                    }
                }
            }
        };
        on_error(&status);
        tracing::warn!(code = ?status.code(), message = status.message(), "SPIRE bundle stream broken; reopening");
        tokio::select! {
            () = tokio::time::sleep(backoff.next_pause()) => {}
            () = retry_now.notified() => {}
        }
    }
}
