//! Refusals: counted in an injected registry, logged as a summary per interval.
//!
//! A client that is refused once per millisecond must not also write a log line per
//! millisecond: each refusal increments a counter (`<prefix>_refusals_total{listener, reason}`)
//! and a per-listener tally, and the tally is logged at most once per
//! [`Refusals::new`]'s interval, as one line naming how many of each reason happened.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

/// Why a client was refused or cut off.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(
    non_camel_case_types,
    reason = "label values are written as Prometheus shows them"
)]
#[non_exhaustive]
pub enum Reason {
    /// A new connection from a source that holds its share.
    connectionPerSource,
    /// A new connection while every connection is deciding something.
    connectionTotal,
    /// An open connection closed to make room for a new one.
    connectionDisplaced,
    /// A connection closed because nothing moved on it for the idle timeout.
    connectionIdle,
    /// A TLS handshake that failed or did not finish in time.
    handshake,
    /// A request from a source that already has its share of requests reading their bodies.
    requestPerSource,
    /// A request whose body was still arriving, cut off to make room in the byte budget.
    requestDisplaced,
    /// A request the byte budget had no room for, even after displacing.
    budgetFull,
    /// A request from a source that already has its share of decisions in progress.
    slotPerSource,
    /// A request that found no decision slot free in time.
    slotTimeout,
    /// A body that did not arrive within the body timeout.
    slowBody,
    /// A body over the size limit.
    bodyTooLarge,
}

/// Every [`Reason`], in the order summaries print them.
pub const REASONS: [Reason; 12] = [
    Reason::connectionPerSource,
    Reason::connectionTotal,
    Reason::connectionDisplaced,
    Reason::connectionIdle,
    Reason::handshake,
    Reason::requestPerSource,
    Reason::requestDisplaced,
    Reason::budgetFull,
    Reason::slotPerSource,
    Reason::slotTimeout,
    Reason::slowBody,
    Reason::bodyTooLarge,
];

impl Reason {
    fn index(self) -> usize {
        REASONS.iter().position(|r| *r == self).unwrap_or(0)
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::connectionPerSource => "connectionPerSource",
            Self::connectionTotal => "connectionTotal",
            Self::connectionDisplaced => "connectionDisplaced",
            Self::connectionIdle => "connectionIdle",
            Self::handshake => "handshake",
            Self::requestPerSource => "requestPerSource",
            Self::requestDisplaced => "requestDisplaced",
            Self::budgetFull => "budgetFull",
            Self::slotPerSource => "slotPerSource",
            Self::slotTimeout => "slotTimeout",
            Self::slowBody => "slowBody",
            Self::bodyTooLarge => "bodyTooLarge",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    listener: &'static str,
    reason: Reason,
}

/// The refusal counter of one process, shared by its listeners.
#[derive(Debug, Clone)]
pub struct Refusals {
    counter: Family<Labels, Counter>,
    interval: Duration,
}

impl Refusals {
    /// Registers `refusals_total` in `registry` (the caller's prefix applies); summaries are
    /// logged at most once per `interval`.
    pub fn register(registry: &mut Registry, interval: Duration) -> Self {
        let counter = Family::<Labels, Counter>::default();
        registry.register(
            "refusals",
            "Clients refused or cut off by a listener's bounds, by listener and reason",
            counter.clone(),
        );
        Self { counter, interval }
    }

    /// The handle one listener counts with; `listener` is its metric label and log field.
    pub fn listener(&self, listener: &'static str) -> Arc<ListenerRefusals> {
        Arc::new(ListenerRefusals {
            listener,
            counter: self.counter.clone(),
            tally: Default::default(),
            origin: Instant::now(),
            interval_ms: self.interval.as_millis() as u64,
            last_summary_ms: AtomicU64::new(0),
        })
    }
}

/// One listener's refusals: counted at once, summarised in the log per interval.
#[derive(Debug)]
pub struct ListenerRefusals {
    listener: &'static str,
    counter: Family<Labels, Counter>,
    tally: [AtomicU64; REASONS.len()],
    origin: Instant,
    interval_ms: u64,
    last_summary_ms: AtomicU64,
}

impl ListenerRefusals {
    /// The listener's name.
    pub fn name(&self) -> &'static str {
        self.listener
    }

    /// Counts one refusal; logs the summary when the interval has passed since the last one.
    pub fn note(&self, reason: Reason) {
        self.counter
            .get_or_create(&Labels {
                listener: self.listener,
                reason,
            })
            .inc();
        self.tally[reason.index()].fetch_add(1, Ordering::Relaxed);
        let now = self.origin.elapsed().as_millis() as u64;
        let last = self.last_summary_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.interval_ms
            && self
                .last_summary_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.log_summary();
        }
    }

    /// What was refused since the last summary, by reason; resets the tally.
    pub fn take_summary(&self) -> Vec<(Reason, u64)> {
        REASONS
            .iter()
            .zip(&self.tally)
            .filter_map(|(r, n)| match n.swap(0, Ordering::Relaxed) {
                0 => None,
                n => Some((*r, n)),
            })
            .collect()
    }

    /// Logs one line with the tally since the last summary, if anything was refused.
    pub fn log_summary(&self) {
        let summary = self.take_summary();
        if summary.is_empty() {
            return;
        }
        let total: u64 = summary.iter().map(|(_, n)| n).sum();
        let by_reason = summary
            .iter()
            .map(|(r, n)| format!("{}={n}", r.as_str()))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::warn!(
            listener = self.listener,
            refused = total,
            by_reason,
            "clients refused by the listener's bounds since the last summary"
        );
    }

    /// Logs the summary every interval until `stop` is dropped or sent.
    pub async fn summarise_until(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.interval_ms.max(1)));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = self.origin.elapsed().as_millis() as u64;
                    self.last_summary_ms.store(now, Ordering::Relaxed);
                    self.log_summary();
                }
                () = crate::stopped(&mut stop) => {
                    self.log_summary();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn refusals_are_counted_by_listener_and_reason_and_tallied_for_the_summary() {
        let mut registry = Registry::default();
        let refusals = Refusals::register(&mut registry, Duration::from_secs(3600));
        let reviews = refusals.listener("reviews");
        let metrics = refusals.listener("metrics");
        for _ in 0..3 {
            reviews.note(Reason::connectionDisplaced);
        }
        metrics.note(Reason::connectionPerSource);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("refusals_total{listener=\"reviews\",reason=\"connectionDisplaced\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("refusals_total{listener=\"metrics\",reason=\"connectionPerSource\"} 1"),
            "{text}"
        );
        // The first refusal logged a summary at once (the interval had passed since the origin
        // only if it is zero); the tally holds what is not yet summarised.
        let left: u64 = reviews.take_summary().iter().map(|(_, n)| n).sum();
        assert!(left <= 3);
        assert!(
            reviews.take_summary().is_empty(),
            "taking the tally resets it"
        );
    }

    #[test]
    fn every_reason_has_its_own_tally_slot() {
        for (i, r) in REASONS.iter().enumerate() {
            assert_eq!(r.index(), i, "{}", r.as_str());
        }
    }
}
