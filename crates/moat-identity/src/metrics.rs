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
    /// the agent was not answering (it is then stopped: `evictions`).
    started_without_svid,
    /// A container created while the agent was not answering (no identity mount) was refused
    /// at its start.
    not_mounted,
    /// No SVID within the short wait given to a namespace where an identity recently went
    /// unissued (the full wait would hold every container start on the node).
    held_short,
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

/// Every [`Failure`], in the order the persisted file lists them.
pub const FAILURES: [Failure; 12] = [
    Failure::annotation,
    Failure::timeout,
    Failure::permission_denied,
    Failure::spire_unavailable,
    Failure::svid_invalid,
    Failure::write,
    Failure::no_pid,
    Failure::owner_unknown,
    Failure::runtime_deadline,
    Failure::started_without_svid,
    Failure::not_mounted,
    Failure::held_short,
];

impl Failure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::annotation => "annotation",
            Self::timeout => "timeout",
            Self::permission_denied => "permission_denied",
            Self::spire_unavailable => "spire_unavailable",
            Self::svid_invalid => "svid_invalid",
            Self::write => "write",
            Self::no_pid => "no_pid",
            Self::owner_unknown => "owner_unknown",
            Self::runtime_deadline => "runtime_deadline",
            Self::started_without_svid => "started_without_svid",
            Self::not_mounted => "not_mounted",
            Self::held_short => "held_short",
        }
    }
}

/// The agent's instruments.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub svids_issued: Counter,
    pub rotations: Counter,
    pub failures: Family<FailureLabels, Counter>,
    pub fail_open_starts: Counter,
    /// Annotated containers stopped because they ran without their SVID.
    pub evictions: Counter,
    pub svid_wait: Histogram,
    pub containers_tracked: Gauge,
    pub calls: Family<CallLabels, Counter>,
    pub call_duration: Family<CallOnlyLabels, Histogram>,
    /// Where failure counts are kept across restarts ([`Metrics::persist_failures`]).
    failures_file: std::sync::Arc<std::sync::OnceLock<std::path::PathBuf>>,
}

impl Metrics {
    /// Registers every instrument under `moat_identity_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            svids_issued: Counter::default(),
            rotations: Counter::default(),
            failures: Family::default(),
            fail_open_starts: Counter::default(),
            evictions: Counter::default(),
            // 1 ms to ~4 s.
            svid_wait: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
            containers_tracked: Gauge::default(),
            calls: Family::default(),
            call_duration: Family::new_with_constructor(|| {
                // 50 µs to ~3 s.
                Histogram::new(exponential_buckets(0.000_05, 3.0, 11))
            }),
            failures_file: std::sync::Arc::default(),
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
            "evictions",
            "Annotated containers stopped because they started without their SVID while the agent was not answering (the kubelet starts them again through the agent)",
            m.evictions.clone(),
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

    /// Counts one failure, and writes the counts to the persisted file if there is one.
    pub fn fail(&self, reason: Failure) {
        self.failures.get_or_create(&FailureLabels { reason }).inc();
        if let Some(path) = self.failures_file.get()
            && let Err(e) = write_atomic(path, self.failure_counts().as_bytes())
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot persist failure counts");
        }
    }

    /// The failure counts as `reason count` lines (the persisted form).
    pub fn failure_counts(&self) -> String {
        let mut out = String::new();
        for reason in FAILURES {
            let n = self.failures.get_or_create(&FailureLabels { reason }).get();
            if n > 0 {
                out.push_str(&format!("{} {n}\n", reason.as_str()));
            }
        }
        out
    }

    /// Keeps failure counts in `path` across restarts: counts already there (from an agent
    /// that exited, for example because the runtime hung up on a call past its deadline, before
    /// any scrape saw the count) are added now, and every later failure rewrites the file. On
    /// tmpfs (the artifact directory) they last until the node reboots.
    pub fn persist_failures(&self, path: std::path::PathBuf) {
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines() {
                let Some((reason, n)) = line.split_once(' ') else {
                    continue;
                };
                let (Some(reason), Ok(n)) = (
                    FAILURES.iter().find(|f| f.as_str() == reason),
                    n.parse::<u64>(),
                ) else {
                    continue;
                };
                self.failures
                    .get_or_create(&FailureLabels { reason: *reason })
                    .inc_by(n);
            }
        }
        let _ = self.failures_file.set(path);
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename: a reader sees the old counts
/// or the new ones, never half.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn failure_counts_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("moat-failures-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("failures");
        let first = Metrics::register(&mut Registry::default());
        first.persist_failures(path.clone());
        first.fail(Failure::runtime_deadline);
        first.fail(Failure::timeout);
        first.fail(Failure::timeout);
        // The agent exits; the next one starts from the counts on disk.
        let mut registry = Registry::default();
        let second = Metrics::register(&mut registry);
        second.persist_failures(path.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("moat_identity_failures_total{reason=\"runtime_deadline\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("moat_identity_failures_total{reason=\"timeout\"} 2"),
            "{text}"
        );
        second.fail(Failure::timeout);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("timeout 3")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
