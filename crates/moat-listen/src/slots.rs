//! Decisions in progress: a request takes a slot only once its body has arrived, at most
//! `per_source` from one address and `total` in all, waiting up to `queue_timeout` for one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::lock;
use crate::refusals::Reason;

/// The bounds of one listener's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    /// Decisions at once, in all.
    pub total: usize,
    /// Decisions at once for one source address.
    pub per_source: usize,
    /// Time a request waits for a slot before it is refused.
    pub queue_timeout: Duration,
}

/// The decision slots of one listener.
#[derive(Debug)]
pub struct Slots {
    limits: SlotLimits,
    semaphore: Semaphore,
    by_source: Mutex<HashMap<IpAddr, usize>>,
}

impl Slots {
    /// Free slots for `limits`.
    pub fn new(limits: SlotLimits) -> Self {
        Self {
            limits,
            semaphore: Semaphore::new(limits.total),
            by_source: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for a request from `source`.
    ///
    /// # Errors
    /// [`Reason::slotPerSource`] at once when the source holds its share;
    /// [`Reason::slotTimeout`] when no slot came free within the queue timeout.
    pub async fn take(&self, source: IpAddr) -> Result<Slot<'_>, Reason> {
        {
            let mut by_source = lock(&self.by_source);
            let mine = by_source.entry(source).or_default();
            if *mine >= self.limits.per_source {
                return Err(Reason::slotPerSource);
            }
            *mine += 1;
        }
        let share = Share {
            slots: self,
            source,
        };
        match tokio::time::timeout(self.limits.queue_timeout, self.semaphore.acquire()).await {
            Ok(Ok(permit)) => Ok(Slot {
                _permit: permit,
                _share: share,
            }),
            _ => Err(Reason::slotTimeout),
        }
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }
}

#[derive(Debug)]
struct Share<'a> {
    slots: &'a Slots,
    source: IpAddr,
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        let mut by_source = lock(&self.slots.by_source);
        if let Some(n) = by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// A decision slot, released when dropped.
#[derive(Debug)]
pub struct Slot<'a> {
    _permit: SemaphorePermit<'a>,
    _share: Share<'a>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_source_never_takes_every_slot() {
        let slots = Slots::new(SlotLimits {
            total: 3,
            per_source: 2,
            queue_timeout: Duration::from_secs(2),
        });
        let tenant: IpAddr = "10.0.0.7".parse().unwrap();
        let _a = slots.take(tenant).await.unwrap();
        let _b = slots.take(tenant).await.unwrap();
        assert_eq!(slots.take(tenant).await.unwrap_err(), Reason::slotPerSource);
        let apiserver: IpAddr = "10.0.0.1".parse().unwrap();
        let c = slots.take(apiserver).await.unwrap();
        assert_eq!(
            slots.take(apiserver).await.unwrap_err(),
            Reason::slotTimeout,
            "the total is still bounded"
        );
        drop(c);
        assert!(slots.take(apiserver).await.is_ok());
    }
}
