//! Every bound the server enforces, named with its unit and its reason, and the memory limit
//! `moat install` writes, derived from them.
//!
//! What a client can make the process hold, and what bounds it:
//!
//! | what | bound |
//! |---|---|
//! | descriptors, TLS and HTTP state | [`MAX_CONNECTIONS`] (the quietest displaced at the cap), [`MAX_CONNECTIONS_PER_SOURCE`] |
//! | time | [`TLS_HANDSHAKE_TIMEOUT`], [`HEADER_READ_TIMEOUT`], [`BODY_READ_TIMEOUT`], [`CONNECTION_IDLE_TIMEOUT`] |
//! | streams and tasks | [`MAX_STREAMS_PER_CONNECTION`]; every request charged [`REQUEST_OVERHEAD_BYTES`] |
//! | buffered bytes | [`REQUEST_BUDGET_BYTES`] for all requests (the oldest reader displaced at the cap), [`MAX_READERS_PER_SOURCE`], [`MAX_BODY_LEN_BYTES`], HTTP/2 windows |
//! | decision slots | [`MAX_CONCURRENT_REQUESTS`], [`MAX_REQUESTS_PER_SOURCE`], taken once the body arrived |
//! | CPU on the async workers | [`INLINE_DECISION_MAX_BODY_BYTES`], [`MAX_BLOCKING_DECISIONS`] |
//! | log lines | [`REFUSAL_SUMMARY_INTERVAL`] |
//! | the metrics port | [`METRICS_LIMITS`] |
//! | registry calls (`images.trust`) | [`REGISTRY_BUDGET`]; bodies, cache and calls in flight in `moat_registry::limits` |

use std::time::Duration;

use moat_listen::budget::BudgetLimits;
use moat_listen::conn::ConnectionLimits;
use moat_listen::plain::PlainLimits;
use moat_listen::slots::SlotLimits;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Largest request body. An AdmissionReview carries `object` and, on UPDATE, `oldObject`, each
/// at most etcd's default 1.5 MiB request limit, plus JSON framing.
pub const MAX_BODY_LEN_BYTES: usize = 4 * MIB;

/// How much of a body over [`MAX_BODY_LEN_BYTES`] is read and thrown away so the client gets the
/// 413 answer (over HTTP/2, answering mid-body resets the stream); beyond it the stream is reset.
/// Discarded bytes are not held, so they are not charged to the budget.
pub const MAX_DISCARDED_BODY_LEN_BYTES: usize = 16 * MIB;

/// Bytes all requests may hold at once: their overheads and their bodies, from the first body
/// byte until the answer is sent. Room for 7 bodies of [`MAX_BODY_LEN_BYTES`] at once, or
/// thousands of typical 5–10 KiB pods; the API server sends a body at once, so when tenants fill
/// the budget with slow bodies, the oldest of theirs is displaced for it.
pub const REQUEST_BUDGET_BYTES: usize = 32 * MIB;

/// What a request is charged before its first body byte: its headers (at most
/// [`MAX_HEADER_BYTES`]), its task and its HTTP/2 stream state. Charging it makes body-less
/// streams cost budget too: at most `REQUEST_BUDGET_BYTES / REQUEST_OVERHEAD_BYTES` (2,048)
/// requests are open at once however many connections carry them.
pub const REQUEST_OVERHEAD_BYTES: usize = 16 * KIB;

/// Requests from one source address reading their body at once. The API server's reviews
/// spend well under a millisecond reading; a tenant opening body-less streams gets this many.
pub const MAX_READERS_PER_SOURCE: usize = 64;

/// Largest request head (request line and headers) kept for a request: an AdmissionReview's
/// headers are a few hundred bytes. HTTP/1.1's buffer and HTTP/2's header list both.
pub const MAX_HEADER_BYTES: usize = 16 * KIB;

/// Concurrent HTTP/2 streams per connection. The API server multiplexes its reviews on few
/// connections and opens another when a connection's streams are taken; hyper's default (200)
/// let three connections take every request slot.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// HTTP/2 flow-control window per stream and per connection: how many body bytes a client may
/// send before moat reads them. moat reads bodies as they arrive (charging the budget), so the
/// windows bound only what is in flight on the socket.
pub const H2_STREAM_WINDOW_BYTES: u32 = 256 * KIB as u32;
/// See [`H2_STREAM_WINDOW_BYTES`].
pub const H2_CONNECTION_WINDOW_BYTES: u32 = MIB as u32;

/// Time a client has to send its request headers (HTTP/1.1) after connecting or between
/// requests on a kept-alive connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a client has to send the whole body once the headers arrived.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bodies larger than this are read and decided on the blocking pool, so a large pod cannot hold
/// an async worker that other reviews need. A typical pod is 5–10 KiB.
pub const INLINE_DECISION_MAX_BODY_BYTES: usize = 64 * KIB;

/// Large decisions run at once on the blocking pool; more wait their turn without holding a
/// worker.
pub const MAX_BLOCKING_DECISIONS: usize = 2;

/// The API server's timeout for a call to moat's webhooks, as `moat install` writes it
/// (`timeoutSeconds`): longer than the longest moat takes to answer anything, including a
/// refusal ([`QUEUE_TIMEOUT`] waiting for a slot plus [`BODY_READ_TIMEOUT`] for a slow body), so
/// the API server always sees moat's answer, never its own timeout; well below its 30 s maximum.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a review's registry lookups (tag → digest, signatures) may take together, all images
/// at once: whatever the registries do, the review is answered within
/// [`BODY_READ_TIMEOUT`] + [`QUEUE_TIMEOUT`] + this + the decision, inside [`WEBHOOK_TIMEOUT`]
/// (checked below), so a registry that is down or slow is a denial that names it, never the API
/// server's timeout and its `failurePolicy`. A cold lookup against a healthy registry is a few
/// round trips (token, manifest, signature manifest, payload): tens of milliseconds.
pub const REGISTRY_BUDGET: Duration = Duration::from_secs(2);

/// Decisions at once, taken once a body has arrived; more wait for a slot, up to
/// [`QUEUE_TIMEOUT`].
pub const MAX_CONCURRENT_REQUESTS: usize = 512;

/// Decisions at once for one source address: a quarter of the slots, so no one source (a
/// tenant pod, or one of several API servers) takes them all.
pub const MAX_REQUESTS_PER_SOURCE: usize = MAX_CONCURRENT_REQUESTS / 4;

/// Time a request may wait for a slot before it is answered 503.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// Open connections at once. At the cap a new connection displaces the quietest open one that
/// is deciding nothing, so the cap bounds memory and descriptors without locking anyone out.
pub const MAX_CONNECTIONS: usize = 1024;

/// Open connections from one source address. The API server needs a handful (HTTP/2 multiplexes
/// reviews); a tenant pod that floods the port from its one address gets no more than this.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 64;

/// A connection on which no byte moved for this long is closed, whatever its state (TLS
/// handshake, HTTP version detection, between requests, an idle HTTP/2 connection). The API
/// server reconnects when it needs to.
pub const CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Refusals are counted at once and logged as one summary line per interval at most.
pub const REFUSAL_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// The metrics port: scrapers (a Prometheus or two) and nothing else need it, so it gets few
/// connections, a short idle timeout and no request bodies.
pub const METRICS_LIMITS: PlainLimits = PlainLimits {
    connections: ConnectionLimits {
        per_source: 4,
        total: 32,
        idle_timeout: Duration::from_secs(10),
    },
    header_timeout: Duration::from_secs(5),
    max_header_bytes: 8 * KIB,
};

/// How often the TLS and configuration files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// After SIGTERM the server keeps accepting for this long while readiness fails, so the
/// endpoints controller and every API server stop sending it reviews before it stops listening
/// (a rolling update or a drain then fails no request).
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// Time in-flight requests get to finish once the server stops accepting.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// The `terminationGracePeriodSeconds` `moat install` writes: drain, grace and a margin for the
/// Lease release.
pub const TERMINATION_GRACE: Duration =
    Duration::from_secs(SHUTDOWN_DRAIN.as_secs() + SHUTDOWN_GRACE.as_secs() + 5);

/// The review port's connection bounds.
pub fn connection_limits(idle_timeout: Duration) -> ConnectionLimits {
    ConnectionLimits {
        per_source: MAX_CONNECTIONS_PER_SOURCE,
        total: MAX_CONNECTIONS,
        idle_timeout,
    }
}

/// The review port's request budget.
pub const BUDGET_LIMITS: BudgetLimits = BudgetLimits {
    total_bytes: REQUEST_BUDGET_BYTES,
    request_overhead_bytes: REQUEST_OVERHEAD_BYTES,
    readers_per_source: MAX_READERS_PER_SOURCE,
};

/// The review port's decision slots.
pub const SLOT_LIMITS: SlotLimits = SlotLimits {
    total: MAX_CONCURRENT_REQUESTS,
    per_source: MAX_REQUESTS_PER_SOURCE,
    queue_timeout: QUEUE_TIMEOUT,
};

/// What the process holds with no client: binary, runtime, TLS configuration, the namespace
/// cache of a few hundred namespaces, allocator slack. Measured idle: 13–15 MiB.
pub const BASELINE_BYTES: usize = 24 * MIB;

/// What one open TLS connection may hold between requests: rustls' record buffers, hyper's read
/// and write buffers, HTTP/2's connection state and HPACK tables. `scripts/flood.sh idle-tls`
/// measured about 15 KiB per idle connection (RSS 13 → 28 MiB with the 1,024 the cap holds);
/// the figure here leaves room for connections that have carried requests and grown their
/// buffers, which no measurement here pins down.
pub const CONNECTION_BYTES: usize = 48 * KIB;

/// A decision's working set per body byte: the body, the typed views read from it and the
/// answer.
pub const DECISION_BYTES_PER_BODY_BYTE: usize = 3;

/// The memory limit `moat install` writes for the server, derived from the bounds above:
/// baseline, every connection's state, the request budget, and the working set of the large
/// decisions running at once on the blocking pool (inline decisions are at most
/// [`INLINE_DECISION_MAX_BODY_BYTES`] each, on a handful of workers: within the baseline), the
/// metrics port's connections; rounded up to a MiB, plus a quarter for the allocator's
/// fragmentation.
pub const fn memory_limit_bytes() -> usize {
    let bounded = BASELINE_BYTES
        + MAX_CONNECTIONS * CONNECTION_BYTES
        + METRICS_LIMITS.connections.total * CONNECTION_BYTES
        + REQUEST_BUDGET_BYTES
        + MAX_BLOCKING_DECISIONS * DECISION_BYTES_PER_BODY_BYTE * MAX_BODY_LEN_BYTES;
    let with_slack = bounded + bounded / 4;
    with_slack.div_ceil(MIB) * MIB
}

/// What `moat install` adds to [`memory_limit_bytes`] when `images.trust` is configured:
/// everything the registry client may hold whatever registries send
/// (`moat_registry::limits::MAX_HELD_BYTES`: its cache, token store, calls in flight with their
/// bodies and buffers, lookups waiting, idle connections), plus a quarter for fragmentation,
/// rounded up to a MiB.
pub const fn registry_memory_bytes() -> usize {
    let held = moat_registry::limits::MAX_HELD_BYTES;
    (held + held / 4).div_ceil(MIB) * MIB
}

// One source never holds every slot, every connection, or the whole budget in readers'
// overhead: checked when the crate compiles.
const _: () = assert!(MAX_REQUESTS_PER_SOURCE < MAX_CONCURRENT_REQUESTS);
const _: () = assert!(MAX_READERS_PER_SOURCE * REQUEST_OVERHEAD_BYTES < REQUEST_BUDGET_BYTES);
const _: () = assert!(MAX_CONNECTIONS_PER_SOURCE < MAX_CONNECTIONS);
// The slowest review with registry calls still answers before the API server gives up, with a
// second to spare for the decision and the network.
const _: () = assert!(
    BODY_READ_TIMEOUT.as_millis() + QUEUE_TIMEOUT.as_millis() + REGISTRY_BUDGET.as_millis() + 1000
        <= WEBHOOK_TIMEOUT.as_millis()
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_limit_covers_every_budget() {
        let limit = memory_limit_bytes();
        assert!(limit >= REQUEST_BUDGET_BYTES + MAX_CONNECTIONS * CONNECTION_BYTES);
        assert_eq!(limit % MIB, 0);
        // What the install writes today; a change to a bound shows here and in docs/server.md.
        assert_eq!(limit / MIB, 162);
    }

    #[test]
    fn image_trust_adds_what_the_registry_client_may_hold_to_the_memory_limit() {
        use moat_registry::limits::MAX_HELD_BYTES;
        // 8 MiB of cache, 1 MiB of tokens, 64 calls of 640 KiB (a 256 KiB body twice, a
        // 64 KiB read buffer, 64 KiB of TLS state), 1,024 waiting lookups of 8 KiB and 64 idle
        // connections of 128 KiB: 65 MiB, and a quarter: 82 MiB.
        assert_eq!(MAX_HELD_BYTES, 65 * MIB);
        assert_eq!(registry_memory_bytes() / MIB, 82);
    }

    #[test]
    fn the_webhook_timeout_covers_the_slowest_answer() {
        assert!(WEBHOOK_TIMEOUT > QUEUE_TIMEOUT + BODY_READ_TIMEOUT);
    }
}
