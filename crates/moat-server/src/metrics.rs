//! Prometheus instruments, registered into a registry the caller owns. Label values are fixed
//! sets (endpoint, operation, decision, policy, reason, result), never error strings.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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

    /// Counts a reload attempt.
    pub fn reloaded(family: &Family<ResultLabels, Counter>, ok: bool) {
        family
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }
}
