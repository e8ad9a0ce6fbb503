//! The agent's Prometheus instruments, registered into a registry the caller owns. Label values
//! are fixed sets, never error strings.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Why a container did not get (or keep) its SVID.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(
    non_camel_case_types,
    reason = "label values are written as Prometheus shows them"
)]
pub enum Failure {
    /// A malformed or disallowed annotation.
    annotation,
    /// No SVID within the wait.
    timeout,
    /// The SPIRE agent refused the caller (not an authorized delegate) or the PID.
    permission_denied,
    /// The SPIRE agent could not be reached or broke the stream.
    spire_unavailable,
    /// The SVID was not the expected one, or unreadable.
    svid_invalid,
    /// Files could not be written.
    write,
    /// The runtime gave no PID for a started container (and it is not sandboxed).
    no_pid,
    /// A sandboxed container's user could not be read from its OCI spec.
    owner_unknown,
    /// A call was still unanswered when the runtime closed the connection (its NRI request
    /// deadline passed).
    runtime_deadline,
    /// Synchronize found an annotated container running without its files: it started while
    /// the agent was not answering.
    started_without_svid,
}

/// An NRI call the agent answers.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(
    non_camel_case_types,
    reason = "label values are written as Prometheus shows them"
)]
pub enum Call {
    configure,
    synchronize,
    create_container,
    start_container,
    stop_container,
    remove_container,
    other,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub reason: Failure,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub call: Call,
    /// `ok` or `error`.
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallOnlyLabels {
    pub call: Call,
}

/// The agent's instruments.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub svids_issued: Counter,
    pub rotations: Counter,
    pub failures: Family<FailureLabels, Counter>,
    pub fail_open_starts: Counter,
    pub svid_wait: Histogram,
    pub containers_tracked: Gauge,
    pub calls: Family<CallLabels, Counter>,
    pub call_duration: Family<CallOnlyLabels, Histogram>,
}

impl Metrics {
    /// Registers every instrument under `moat_identity_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            svids_issued: Counter::default(),
            rotations: Counter::default(),
            failures: Family::default(),
            fail_open_starts: Counter::default(),
            // 1 ms to ~4 s.
            svid_wait: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
            containers_tracked: Gauge::default(),
            calls: Family::default(),
            call_duration: Family::new_with_constructor(|| {
                // 50 µs to ~3 s.
                Histogram::new(exponential_buckets(0.000_05, 3.0, 11))
            }),
        };
        let r = registry.sub_registry_with_prefix("moat_identity");
        r.register(
            "svids_issued",
            "Containers that received their first SVID",
            m.svids_issued.clone(),
        );
        r.register(
            "svid_rotations",
            "Rotated SVIDs or bundles written for running containers",
            m.rotations.clone(),
        );
        r.register(
            "failures",
            "Containers that did not get or keep an SVID, by reason",
            m.failures.clone(),
        );
        r.register(
            "fail_open_starts",
            "Containers started without an SVID because their annotation chose fail_open",
            m.fail_open_starts.clone(),
        );
        r.register(
            "svid_wait_seconds",
            "Time from StartContainer to the SVID on disk",
            m.svid_wait.clone(),
        );
        r.register(
            "containers_tracked",
            "Containers with identity entries the agent is following",
            m.containers_tracked.clone(),
        );
        r.register(
            "nri_calls",
            "NRI calls answered, by call and result",
            m.calls.clone(),
        );
        r.register(
            "nri_call_duration_seconds",
            "Time to answer an NRI call",
            m.call_duration.clone(),
        );
        m
    }

    /// Counts one failure.
    pub fn fail(&self, reason: Failure) {
        self.failures.get_or_create(&FailureLabels { reason }).inc();
    }
}
