//! Prometheus instruments, registered into a registry the caller owns. Label values are fixed
//! sets (endpoint, operation, decision, policy, reason, result), never error strings.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use moat_core::decision::{Decision, Policy};
use std::time::Duration;

/// An endpoint that decides.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(
    non_camel_case_types,
    reason = "label values are written as Prometheus shows them"
)]
pub enum Endpoint {
    mutate,
    validate,
    imagereview,
}

/// What a request came to.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(
    non_camel_case_types,
    reason = "label values are written as Prometheus shows them"
)]
pub enum Outcome {
    /// Allowed (possibly with a patch or audit warnings).
    allowed,
    /// Denied by a policy.
    denied,
    /// Not a valid request: a 4xx answer.
    invalid,
    /// moat could not answer: a 5xx answer.
    error,
}

impl Outcome {
    /// The label value, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::allowed => "allowed",
            Self::denied => "denied",
            Self::invalid => "invalid",
            Self::error => "error",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: Endpoint,
    pub operation: String,
    pub decision: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub endpoint: Endpoint,
    pub policy: &'static str,
    /// `denied` (enforced) or `audited`.
    pub decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExemptionLabels {
    pub policy: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: Endpoint,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// The server's instruments.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub policy_decisions: Family<PolicyLabels, Counter>,
    pub exemptions: Family<ExemptionLabels, Counter>,
    pub duration: Family<EndpointLabels, Histogram>,
    pub in_flight: Gauge,
    pub tls_reloads: Family<ResultLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
}

/// Latency buckets in seconds: a decision takes tens of microseconds, the API server gives up
/// after seconds.
const DURATION_BUCKETS_SECONDS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5,
];

impl Metrics {
    /// Creates the instruments and registers them under `moat_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            policy_decisions: Family::default(),
            exemptions: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS_SECONDS)),
            in_flight: Gauge::default(),
            tls_reloads: Family::default(),
            config_reloads: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("moat");
        r.register(
            "admission_requests",
            "Reviews answered, by endpoint, operation and decision",
            m.requests.clone(),
        );
        r.register(
            "policy_decisions",
            "Denials by policy, enforced (denied) or only reported (audited)",
            m.policy_decisions.clone(),
        );
        r.register(
            "exemptions",
            "Policies skipped, by policy and reason",
            m.exemptions.clone(),
        );
        r.register(
            "admission_request_duration_seconds",
            "Time to answer a review",
            m.duration.clone(),
        );
        r.register(
            "admission_in_flight",
            "Reviews being answered",
            m.in_flight.clone(),
        );
        r.register(
            "tls_reloads",
            "Reloads of the TLS certificate and key",
            m.tls_reloads.clone(),
        );
        r.register(
            "config_reloads",
            "Reloads of the configuration file",
            m.config_reloads.clone(),
        );
        m
    }

    /// Counts an answered review.
    pub fn count(&self, endpoint: Endpoint, operation: &str, decision: Outcome) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint,
                operation: operation.to_owned(),
                decision,
            })
            .inc();
    }

    /// Records how long a review took.
    pub fn observe(&self, endpoint: Endpoint, took: Duration) {
        self.duration
            .get_or_create(&EndpointLabels { endpoint })
            .observe(took.as_secs_f64());
    }

    /// Counts a review in flight until the guard drops, however the review ends.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// Counts each policy's denials (enforced or audited) and each exemption, and logs the
    /// exemptions.
    pub fn record_policies(&self, endpoint: Endpoint, d: &Decision) {
        let policy = |policy: Policy, decision| {
            self.policy_decisions
                .get_or_create(&PolicyLabels {
                    endpoint,
                    policy: policy.as_str(),
                    decision,
                })
                .inc();
        };
        for x in &d.denials {
            policy(x.policy, "denied");
        }
        for x in &d.audited {
            policy(x.policy, "audited");
        }
        for e in &d.exemptions {
            let policy = e.policy.map_or("all", Policy::as_str);
            self.exemptions
                .get_or_create(&ExemptionLabels {
                    policy,
                    reason: e.reason.as_str(),
                })
                .inc();
            tracing::debug!(policy, reason = e.reason.as_str(), "exempt");
        }
    }

    /// Counts a reload attempt.
    pub fn reloaded(family: &Family<ResultLabels, Counter>, ok: bool) {
        family
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }
}

/// Decrements the in-flight gauge when dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
