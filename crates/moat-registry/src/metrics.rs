//! The registry client's instruments, registered into a registry the caller owns. The
//! `registry` label is the registry of an image a trust rule names (operator-written, so a
//! bounded set), or `other` for images no rule names: a tenant cannot grow the label set.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::FailureReason;

/// Which cache answered or missed.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(
    non_camel_case_types,
    reason = "label values are written as Prometheus shows them"
)]
pub enum CacheKind {
    /// A whole image (reference as written, under its rule) admitted earlier.
    image,
    /// tag → digest.
    tag,
    /// digest → signature verdict.
    signature,
}

/// What a registry call fetched.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(
    non_camel_case_types,
    reason = "label values are written as Prometheus shows them"
)]
pub enum Call {
    /// A tag's manifest (the digest it names).
    manifest,
    /// The `sha256-<hex>.sig` manifest.
    signatures,
    /// A signature's payload blob.
    payload,
    /// A bearer token.
    token,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: CacheKind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    registry: String,
    call: Call,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabels {
    registry: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    registry: String,
    reason: FailureReason,
}

/// The instruments.
#[derive(Debug, Clone)]
pub struct RegistryMetrics {
    hits: Family<CacheLabels, Counter>,
    misses: Family<CacheLabels, Counter>,
    calls: Family<CallLabels, Counter>,
    latency: Family<CallLabels, Histogram>,
    failures: Family<FailureLabels, Counter>,
    requests: Family<RegistryLabels, Counter>,
    slot_wait: Family<RegistryLabels, Histogram>,
}

impl RegistryMetrics {
    /// Registers the instruments under `moat_image_*` and `moat_registry_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            hits: Family::default(),
            misses: Family::default(),
            calls: Family::default(),
            latency: Family::new_with_constructor(|| {
                // 1 ms to ~4 s: a loopback call to a registry's worst answer within the budget.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.001, 2.0, 13,
                ))
            }),
            failures: Family::default(),
            requests: Family::default(),
            slot_wait: Family::new_with_constructor(|| {
                // 0.1 ms to ~3 s: no wait at all to a whole registry budget.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.0001, 3.0, 10,
                ))
            }),
        };
        let r = registry.sub_registry_with_prefix("moat");
        r.register(
            "image_cache_hits",
            "Image lookups answered from the cache",
            m.hits.clone(),
        );
        r.register(
            "image_cache_misses",
            "Image lookups that called the registry (or joined a call in flight)",
            m.misses.clone(),
        );
        r.register(
            "registry_calls",
            "HTTP calls made to registries, by what they fetched",
            m.calls.clone(),
        );
        r.register(
            "registry_call_duration_seconds",
            "Time of each registry HTTP call, including authentication retries",
            m.latency.clone(),
        );
        r.register(
            "registry_requests",
            "HTTP requests sent to registries (each call's authentication retries, token \
             requests and redirects included)",
            m.requests.clone(),
        );
        r.register(
            "registry_slot_wait_seconds",
            "Time a registry call waited for its registry's call slots and moat's",
            m.slot_wait.clone(),
        );
        r.register(
            "registry_failures",
            "Registry lookups that failed, by reason",
            m.failures.clone(),
        );
        m
    }

    pub(crate) fn hit(&self, cache: CacheKind) {
        self.hits.get_or_create(&CacheLabels { cache }).inc();
    }

    pub(crate) fn miss(&self, cache: CacheKind) {
        self.misses.get_or_create(&CacheLabels { cache }).inc();
    }

    pub(crate) fn call(&self, registry: &str, call: Call, took: Duration) {
        let labels = CallLabels {
            registry: registry.to_owned(),
            call,
        };
        self.calls.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub(crate) fn request(&self, registry: &str) {
        self.requests
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .inc();
    }

    pub(crate) fn slot_wait(&self, registry: &str, waited: Duration) {
        self.slot_wait
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .observe(waited.as_secs_f64());
    }

    /// HTTP requests sent to `registry` so far.
    pub fn requests(&self, registry: &str) -> u64 {
        self.requests
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .get()
    }

    /// Lookups of `registry` that failed for `reason` so far.
    pub fn failures(&self, registry: &str, reason: FailureReason) -> u64 {
        self.failures
            .get_or_create(&FailureLabels {
                registry: registry.to_owned(),
                reason,
            })
            .get()
    }

    pub(crate) fn failure(&self, registry: &str, reason: FailureReason) {
        self.failures
            .get_or_create(&FailureLabels {
                registry: registry.to_owned(),
                reason,
            })
            .inc();
    }

    /// Calls made to `registry` for `call` so far (tests and benchmarks read it).
    pub fn calls(&self, registry: &str, call: Call) -> u64 {
        self.calls
            .get_or_create(&CallLabels {
                registry: registry.to_owned(),
                call,
            })
            .get()
    }

    /// Cache hits so far.
    pub fn hits(&self, cache: CacheKind) -> u64 {
        self.hits.get_or_create(&CacheLabels { cache }).get()
    }

    /// Cache misses so far.
    pub fn misses(&self, cache: CacheKind) -> u64 {
        self.misses.get_or_create(&CacheLabels { cache }).get()
    }
}
