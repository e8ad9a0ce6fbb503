//! ttrpc, the runtime's lightweight RPC protocol, over one connection of NRI's multiplexer.
//!
//! Each message is a 10-byte header (u32 big-endian payload length, u32 big-endian stream id, u8
//! type, u8 flags) and a protobuf `Request` or `Response`. Clients use odd stream ids. One
//! [`Peer`] both serves incoming requests and makes outgoing calls, so the runtime double in
//! tests is built from the same code as the plugin. What runs on it is typed: `build.rs`
//! generates, from NRI's service definitions, a `Method` enum, a `Server` trait, a `serve`
//! function and a `Client` per service (`proto::nri::plugin_ttrpc`, `runtime_ttrpc`), so no
//! code outside the generated module matches method names.
//!
//! # Why not the `ttrpc` crate
//!
//! Weighed against this module (about 250 lines of framing beside 250 of tests):
//! - ttrpc-rust serves and dials whole sockets; NRI puts two ttrpc connections on one socket.
//!   Using it means a Unix socket pair per multiplexed connection and a task pumping bytes
//!   between each pair and the multiplexer: two more copies of every message, four more file
//!   descriptors and tasks per plugin, on a path that holds containerd's node-wide NRI lock.
//! - It generates its messages with `rust-protobuf`, while the SPIRE client (tonic) needs
//!   `prost`: two protobuf runtimes and two code generators for one small agent. It is not in
//!   the lock file; with its own dependencies (`protobuf`, its codegen, `nix`, …) it would add
//!   a few dozen crates to a build that runs on two cores.
//! - What it would replace is small: unary calls only (NRI has no streaming RPCs), no
//!   metadata, one timeout per call.
//!
//! So the framing stays here, covered by wire-format tests written the way the Go
//! implementation puts bytes on the socket, and the typed dispatch comes from generated code.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::{Mutex, Semaphore, oneshot};
use tokio::task::JoinHandle;

use crate::lock;
use crate::proto::ttrpc::{Request, Response, Status};

/// Largest message accepted or sent (ttrpc's own limit).
pub const MAX_MESSAGE_LEN_BYTES: usize = 4 * 1024 * 1024;

/// Requests handled at once on one connection; more are answered `RESOURCE_EXHAUSTED`.
/// containerd sends one at a time, so this only bounds a misbehaving peer.
pub const MAX_CONCURRENT_REQUESTS: usize = 64;

const HEADER_LEN_BYTES: usize = 10;
const TYPE_REQUEST: u8 = 1;
const TYPE_RESPONSE: u8 = 2;

/// gRPC status codes used on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Code {
    Ok = 0,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

/// An error status returned by a handler or received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcStatus {
    /// gRPC status code.
    pub code: i32,
    /// Human-readable message; the runtime shows it in the container's creation error.
    pub message: String,
}

impl RpcStatus {
    /// A status with the given code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code: code as i32,
            message: message.into(),
        }
    }
}

impl fmt::Display for RpcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "status {}: {}", self.code, self.message)
    }
}

/// Why an outgoing call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The peer answered with an error status.
    #[error("{0}")]
    Status(RpcStatus),
    /// No answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection closed before the answer.
    #[error("connection closed")]
    Closed,
    /// Writing the request failed.
    #[error("sending: {0}")]
    Io(#[from] io::Error),
    /// The answer did not decode.
    #[error("decoding the answer: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// What a handler returns: the encoded response message, or a status.
pub type HandlerResult = Result<Vec<u8>, RpcStatus>;

/// Decodes a request's payload.
///
/// # Errors
/// INVALID_ARGUMENT when the payload is not an `M`.
pub fn decode<M: Message + Default>(payload: &[u8]) -> Result<M, RpcStatus> {
    M::decode(payload)
        .map_err(|e| RpcStatus::new(Code::InvalidArgument, format!("undecodable request: {e}")))
}

/// A boxed handler future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;

/// Serves incoming requests.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request. `service` is the full protobuf service name.
    fn handle(&self, service: &str, method: &str, payload: Vec<u8>) -> HandlerFuture;
}

/// A handler that answers every request `UNIMPLEMENTED` (for the side that only calls).
#[derive(Debug)]
pub struct NoService;

impl Handler for NoService {
    fn handle(&self, service: &str, method: &str, _payload: Vec<u8>) -> HandlerFuture {
        let status = RpcStatus::new(Code::Unimplemented, format!("{service}/{method}"));
        Box::pin(async move { Err(status) })
    }
}

type Pending = Arc<std::sync::Mutex<HashMap<u32, oneshot::Sender<Response>>>>;

/// One ttrpc connection: serves a [`Handler`] and makes calls.
pub struct Peer<S> {
    writer: Arc<Mutex<WriteHalf<S>>>,
    pending: Pending,
    next_stream: AtomicU32,
}

impl<S> fmt::Debug for Peer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer").finish_non_exhaustive()
    }
}

impl<S> Peer<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    /// Starts serving `handler` on `io`. The returned task ends when the connection closes
    /// (`Ok`) or breaks; outstanding calls then fail with [`CallError::Closed`].
    pub fn start(io: S, handler: Arc<dyn Handler>) -> (Arc<Self>, JoinHandle<io::Result<()>>) {
        let (mut reader, writer) = tokio::io::split(io);
        let peer = Arc::new(Self {
            writer: Arc::new(Mutex::new(writer)),
            pending: Arc::default(),
            next_stream: AtomicU32::new(1),
        });
        let writer = peer.writer.clone();
        let pending = peer.pending.clone();
        let task = tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
            let result = loop {
                let (stream, kind, payload) = match read_message(&mut reader).await {
                    Ok(Some(message)) => message,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                };
                match kind {
                    TYPE_REQUEST => {
                        let writer = writer.clone();
                        let handler = handler.clone();
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            let status =
                                RpcStatus::new(Code::ResourceExhausted, "too many requests");
                            send_response(&writer, stream, Err(status)).await?;
                            continue;
                        };
                        tokio::spawn(async move {
                            let result = match Request::decode(payload.as_slice()) {
                                Ok(request) => {
                                    handler
                                        .handle(&request.service, &request.method, request.payload)
                                        .await
                                }
                                Err(e) => Err(RpcStatus::new(
                                    Code::InvalidArgument,
                                    format!("undecodable request: {e}"),
                                )),
                            };
                            if let Err(e) = send_response(&writer, stream, result).await {
                                tracing::debug!(error = %e, "could not send a ttrpc response");
                            }
                            drop(permit);
                        });
                    }
                    TYPE_RESPONSE => {
                        let waiter = lock(&pending).remove(&stream);
                        match (waiter, Response::decode(payload.as_slice())) {
                            (Some(waiter), Ok(response)) => {
                                let _ = waiter.send(response);
                            }
                            (None, _) => tracing::debug!(stream, "answer to no call dropped"),
                            (Some(_), Err(e)) => {
                                tracing::warn!(stream, error = %e, "undecodable ttrpc response");
                            }
                        }
                    }
                    // Streaming data frames belong to calls moat never makes.
                    other => tracing::debug!(kind = other, "ttrpc message of another type dropped"),
                }
            };
            // Every waiting call learns the connection is gone.
            lock(&pending).clear();
            result
        });
        (peer, task)
    }

    /// Calls `service`/`method` with `request` and decodes the answer.
    ///
    /// # Errors
    /// [`CallError`]: an error status, no answer within `timeout`, or a closed connection.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        service: &str,
        method: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let stream = self.next_stream.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(stream, tx);
        let envelope = Request {
            service: service.to_owned(),
            method: method.to_owned(),
            payload: request.encode_to_vec(),
            timeout_nano: i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX),
            metadata: Vec::new(),
        };
        let sent = write_message(
            &self.writer,
            stream,
            TYPE_REQUEST,
            &envelope.encode_to_vec(),
        )
        .await;
        if let Err(e) = sent {
            lock(&self.pending).remove(&stream);
            return Err(e.into());
        }
        let response = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(response)) => response,
            Ok(Err(_)) => return Err(CallError::Closed),
            Err(_) => {
                lock(&self.pending).remove(&stream);
                return Err(CallError::Timeout(timeout));
            }
        };
        match response.status {
            Some(Status { code, message }) if code != Code::Ok as i32 => {
                Err(CallError::Status(RpcStatus { code, message }))
            }
            _ => Ok(Resp::decode(response.payload.as_slice())?),
        }
    }
}

async fn send_response<W: AsyncWrite>(
    writer: &Mutex<WriteHalf<W>>,
    stream: u32,
    result: HandlerResult,
) -> io::Result<()> {
    let response = match result {
        Ok(payload) => Response {
            status: Some(Status {
                code: Code::Ok as i32,
                message: String::new(),
            }),
            payload,
        },
        Err(RpcStatus { code, message }) => Response {
            status: Some(Status { code, message }),
            payload: Vec::new(),
        },
    };
    write_message(writer, stream, TYPE_RESPONSE, &response.encode_to_vec()).await
}

async fn write_message<W: AsyncWrite>(
    writer: &Mutex<WriteHalf<W>>,
    stream: u32,
    kind: u8,
    payload: &[u8],
) -> io::Result<()> {
    if payload.len() > MAX_MESSAGE_LEN_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "ttrpc message of {} bytes exceeds {MAX_MESSAGE_LEN_BYTES}",
                payload.len()
            ),
        ));
    }
    let mut frame = Vec::with_capacity(HEADER_LEN_BYTES + payload.len());
    frame.extend_from_slice(&encode_header(payload.len(), stream, kind));
    frame.extend_from_slice(payload);
    let mut writer = writer.lock().await;
    writer.write_all(&frame).await?;
    writer.flush().await
}

fn encode_header(len: usize, stream: u32, kind: u8) -> [u8; HEADER_LEN_BYTES] {
    let mut header = [0; HEADER_LEN_BYTES];
    // Callers check the length against MAX_MESSAGE_LEN_BYTES first.
    header[..4].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    header[4..8].copy_from_slice(&stream.to_be_bytes());
    header[8] = kind;
    header
}

/// Reads one message: `None` at a clean end of stream.
async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> io::Result<Option<(u32, u8, Vec<u8>)>> {
    let mut header = [0; HEADER_LEN_BYTES];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let [l0, l1, l2, l3, s0, s1, s2, s3, kind, _flags] = header;
    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    let stream = u32::from_be_bytes([s0, s1, s2, s3]);
    if len > MAX_MESSAGE_LEN_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("ttrpc message of {len} bytes exceeds {MAX_MESSAGE_LEN_BYTES}"),
        ));
    }
    let mut payload = vec![0; len];
    reader.read_exact(&mut payload).await?;
    Ok(Some((stream, kind, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::nri::{ConfigureRequest, ConfigureResponse, Empty};

    struct Echo;

    impl Handler for Echo {
        fn handle(&self, service: &str, method: &str, payload: Vec<u8>) -> HandlerFuture {
            let answer = match (service, method) {
                ("test.Svc", "Configure") => ConfigureRequest::decode(payload.as_slice())
                    .map(|req| {
                        ConfigureResponse {
                            events: i32::try_from(req.request_timeout).unwrap_or(-1),
                            request_timeout: 0,
                        }
                        .encode_to_vec()
                    })
                    .map_err(|e| RpcStatus::new(Code::InvalidArgument, e.to_string())),
                ("test.Svc", "Slow") => {
                    return Box::pin(async {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        Ok(Vec::new())
                    });
                }
                ("test.Svc", "Fail") => Err(RpcStatus::new(Code::FailedPrecondition, "no")),
                _ => Err(RpcStatus::new(Code::Unimplemented, method.to_owned())),
            };
            Box::pin(async move { answer })
        }
    }

    fn pair() -> (
        Arc<Peer<tokio::io::DuplexStream>>,
        Arc<Peer<tokio::io::DuplexStream>>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (client, _) = Peer::start(a, Arc::new(NoService));
        let (server, _) = Peer::start(b, Arc::new(Echo));
        (client, server)
    }

    #[tokio::test]
    async fn calls_are_answered_and_decoded() {
        let (client, _server) = pair();
        let request = ConfigureRequest {
            request_timeout: 2000,
            ..Default::default()
        };
        let response: ConfigureResponse = client
            .call("test.Svc", "Configure", &request, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(response.events, 2000);
    }

    #[tokio::test]
    async fn error_statuses_reach_the_caller() {
        let (client, _server) = pair();
        let err = client
            .call::<_, Empty>("test.Svc", "Fail", &Empty {}, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CallError::Status(RpcStatus { code: 9, .. })),
            "{err}"
        );
        let err = client
            .call::<_, Empty>("test.Svc", "Nope", &Empty {}, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CallError::Status(RpcStatus { code: 12, .. })),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_slow_answer_times_out_without_blocking_other_calls() {
        let (client, _server) = pair();
        let request = ConfigureRequest::default();
        let slow =
            client.call::<_, Empty>("test.Svc", "Slow", &Empty {}, Duration::from_millis(50));
        let fast = client.call::<_, ConfigureResponse>(
            "test.Svc",
            "Configure",
            &request,
            Duration::from_secs(1),
        );
        let (slow, fast) = tokio::join!(slow, fast);
        assert!(matches!(slow, Err(CallError::Timeout(_))));
        assert!(fast.is_ok());
    }

    #[tokio::test]
    async fn requests_beyond_the_concurrency_bound_are_refused_not_queued() {
        let (client, _server) = pair();
        let slow: Vec<_> = (0..MAX_CONCURRENT_REQUESTS)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    client
                        .call::<_, Empty>("test.Svc", "Slow", &Empty {}, Duration::from_secs(10))
                        .await
                })
            })
            .collect();
        // Every slow call is in its handler before the next one arrives.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let err = client
            .call::<_, Empty>("test.Svc", "Slow", &Empty {}, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CallError::Status(RpcStatus { code: 8, .. })),
            "RESOURCE_EXHAUSTED, got {err}"
        );
        for call in slow {
            call.abort();
        }
    }

    #[tokio::test]
    async fn calls_fail_when_the_connection_closes() {
        let (a, b) = tokio::io::duplex(1024);
        let (client, task) = Peer::start(a, Arc::new(NoService));
        let call = tokio::spawn(async move {
            client
                .call::<_, Empty>("test.Svc", "X", &Empty {}, Duration::from_secs(5))
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(b);
        assert!(matches!(call.await.unwrap(), Err(CallError::Closed)));
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn wire_format_matches_ttrpc() {
        // A request written by hand as a Go ttrpc client would, answered by the server side.
        let (mut raw, b) = tokio::io::duplex(4096);
        let (_server, _) = Peer::start(b, Arc::new(Echo));
        let request = Request {
            service: "test.Svc".into(),
            method: "Fail".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut frame = encode_header(request.len(), 3, TYPE_REQUEST).to_vec();
        frame.extend_from_slice(&request);
        raw.write_all(&frame).await.unwrap();
        let (stream, kind, payload) = read_message(&mut raw).await.unwrap().unwrap();
        assert_eq!((stream, kind), (3, TYPE_RESPONSE));
        let response = Response::decode(payload.as_slice()).unwrap();
        assert_eq!(
            response.status.unwrap().code,
            Code::FailedPrecondition as i32
        );
    }

    #[tokio::test]
    async fn an_oversized_message_breaks_the_connection() {
        let (mut raw, b) = tokio::io::duplex(4096);
        let (_server, task) = Peer::start(b, Arc::new(Echo));
        raw.write_all(&encode_header(MAX_MESSAGE_LEN_BYTES + 1, 1, TYPE_REQUEST))
            .await
            .unwrap();
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
