//! Every bound the server enforces, named with its unit.

use std::time::Duration;

/// Largest request body. An AdmissionReview carries `object` and, on UPDATE, `oldObject`, each
/// at most etcd's default 1.5 MiB request limit, plus JSON framing.
pub const MAX_BODY_LEN_BYTES: usize = 4 * 1024 * 1024;

/// How much of a body over [`MAX_BODY_LEN_BYTES`] is read and thrown away so the client gets the
/// 413 answer (over HTTP/2, answering mid-body resets the stream); beyond it the stream is reset.
pub const MAX_DISCARDED_BODY_LEN_BYTES: usize = 16 * 1024 * 1024;

/// Time a client has to send its request headers (HTTP/1.1) after connecting or between
/// requests on a kept-alive connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a client has to send the whole body once the headers arrived.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bodies larger than this are read and decided on the blocking pool, so a large pod cannot hold
/// an async worker that other reviews need. A typical pod is 5–10 KiB.
pub const INLINE_DECISION_MAX_BODY_BYTES: usize = 64 * 1024;

/// Large decisions run at once on the blocking pool; more wait their turn without holding a
/// worker.
pub const MAX_BLOCKING_DECISIONS: usize = 2;

/// The API server's timeout for a call to moat's webhooks, as `moat install` writes it
/// (`timeoutSeconds`): longer than the longest moat takes to answer anything, including a
/// refusal ([`QUEUE_TIMEOUT`] waiting for a slot plus [`BODY_READ_TIMEOUT`] for a slow body), so
/// the API server always sees moat's answer, never its own timeout; well below its 30 s maximum.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests decided at once; more wait for a slot, up to [`QUEUE_TIMEOUT`].
pub const MAX_CONCURRENT_REQUESTS: usize = 512;

/// Time a request may wait for a slot before it is answered 503.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// Open connections at once; more are closed as they are accepted (the accept loop never waits).
pub const MAX_CONNECTIONS: usize = 4096;

/// Open connections from one source address. The API server needs a handful (HTTP/2 multiplexes
/// reviews); a tenant pod that floods the port from its one address gets no more than this.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 128;

/// A connection on which no byte moved for this long is closed, whatever its state (TLS
/// handshake, HTTP version detection, between requests, an idle HTTP/2 connection). The API
/// server reconnects when it needs to.
pub const CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// How often the TLS and configuration files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Time in-flight requests get to finish after SIGTERM (below the pod's default 30 s
/// `terminationGracePeriodSeconds`).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);
