//! What a client can make a moat process hold, bounded in one place.
//!
//! Every listener moat and its node agent open (the review port, the metrics ports, the
//! agent's metrics port) is served through this crate, so a client meets the same bounds
//! everywhere:
//!
//! - [`conn`]: open connections per source address and in all. At the total cap a new
//!   connection displaces the one that has been quiet longest and is deciding nothing
//!   (unauthenticated before authenticated), so a flood of idle or half-open connections from any
//!   number of addresses never locks out a working client. Connections on which no byte moved
//!   for a while are closed whatever their protocol state.
//! - [`budget`]: requests reading their body, per source, and the bytes all requests hold in
//!   memory, as one budget. A body is charged as it arrives; at the cap the request that has been
//!   reading longest is displaced, because a client that sends its body at once (the API server)
//!   is never the oldest reader.
//! - [`slots`]: decisions in progress, per source and in all, taken only once a body arrived.
//! - [`refusals`]: every refusal counted in an injected registry and logged as a periodic
//!   summary, never a line per refusal.
//! - [`plain`]: a plain-HTTP listener (metrics, health) with all of the above.
//!
//! The bounds themselves are values the caller passes ([`conn::ConnectionLimits`],
//! [`budget::BudgetLimits`], ...): each process keeps its own, with units and reasons, in its
//! `limits` module.

pub mod budget;
pub mod conn;
pub mod plain;
pub mod refusals;
pub mod slots;

/// Locks `m`, ignoring poisoning: every critical section here leaves its data consistent.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Completes once `stop` holds `true` (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
