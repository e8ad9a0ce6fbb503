//! Call slots shared fairly by namespaces: a registry's calls in flight are bounded, and when
//! they are all taken the next free slot goes to the namespaces waiting in turn (round robin),
//! not to whoever asked first. One namespace that queues thousands of lookups then delays
//! another namespace's lookup by one call, not by its whole queue; and no namespace holds more
//! than its share of the slots at once, so one whose calls hang (a registry it runs itself)
//! leaves the others theirs.
//!
//! A waiter that gives up (its review's deadline passed) leaves the queue when its future is
//! dropped; a slot handed to it in that instant is passed on, never lost.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

/// Slots for one registry (or for all of them together).
#[derive(Debug)]
pub struct FairSlots {
    state: Mutex<State>,
    /// Slots in all.
    capacity: usize,
    /// Slots one namespace may hold at once.
    per_namespace: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Slots taken, all namespaces.
    taken: usize,
    /// Per namespace with a slot or a waiter: slots held and waiters in order.
    namespaces: HashMap<Arc<str>, Namespace>,
    /// Namespaces with waiters, in the order they are served next.
    turn: VecDeque<Arc<str>>,
}

#[derive(Debug, Default)]
struct Namespace {
    held: usize,
    waiters: VecDeque<oneshot::Sender<()>>,
}

/// A slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<FairSlots>,
    namespace: Arc<str>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(&self.namespace);
    }
}

impl FairSlots {
    /// `capacity` slots, at most `per_namespace` of them held by one namespace (at least one).
    pub fn new(capacity: usize, per_namespace: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            capacity: capacity.max(1),
            per_namespace: per_namespace.clamp(1, capacity.max(1)),
        })
    }

    /// A slot for `namespace`, when its turn comes. Cancel-safe: dropping the future leaves the
    /// queue.
    pub async fn acquire(self: &Arc<Self>, namespace: &str) -> Slot {
        let namespace: Arc<str> = namespace.into();
        let rx = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let free = state.taken < self.capacity;
            let entry = state.namespaces.entry(namespace.clone()).or_default();
            if free && entry.waiters.is_empty() && entry.held < self.per_namespace {
                entry.held += 1;
                state.taken += 1;
                return self.slot(namespace);
            }
            let (tx, rx) = oneshot::channel();
            let first = entry.waiters.is_empty();
            entry.waiters.push_back(tx);
            if first {
                state.turn.push_back(namespace.clone());
            }
            rx
        };
        let mut waiter = Waiter {
            rx: Some(rx),
            slots: self,
            namespace: namespace.clone(),
        };
        // The sender is dropped only after a hand-over or with the whole state: an error means
        // no slot was handed over, and then there is none to wait for.
        let granted = match waiter.rx.as_mut() {
            Some(rx) => rx.await.is_ok(),
            None => false,
        };
        waiter.rx = None;
        if !granted {
            // Not reachable while `self` lives; served as a fresh request rather than a panic.
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.namespaces.entry(namespace.clone()).or_default().held += 1;
            state.taken += 1;
        }
        self.slot(namespace)
    }

    fn slot(self: &Arc<Self>, namespace: Arc<str>) -> Slot {
        Slot {
            slots: self.clone(),
            namespace,
        }
    }

    /// Slots taken and callers waiting now.
    pub fn load(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let waiting = state.namespaces.values().map(|n| n.waiters.len()).sum();
        (state.taken, waiting)
    }

    fn release(&self, namespace: &Arc<str>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.taken = state.taken.saturating_sub(1);
        if let Some(n) = state.namespaces.get_mut(namespace) {
            n.held = n.held.saturating_sub(1);
        }
        self.hand_over(&mut state);
        state
            .namespaces
            .retain(|_, n| n.held > 0 || !n.waiters.is_empty());
    }

    /// Gives free slots to waiters, one namespace at a time in turn, skipping namespaces at
    /// their share.
    fn hand_over(&self, state: &mut State) {
        let mut skipped = 0;
        while state.taken < self.capacity && skipped < state.turn.len() {
            let Some(name) = state.turn.pop_front() else {
                return;
            };
            let Some(n) = state.namespaces.get_mut(&name) else {
                continue;
            };
            if n.held >= self.per_namespace {
                state.turn.push_back(name);
                skipped += 1;
                continue;
            }
            let mut granted = false;
            while let Some(tx) = n.waiters.pop_front() {
                if tx.send(()).is_ok() {
                    granted = true;
                    break;
                }
            }
            if granted {
                n.held += 1;
                state.taken += 1;
                skipped = 0;
            }
            if !n.waiters.is_empty() {
                state.turn.push_back(name);
            }
        }
    }

    /// A waiter gave up: takes it out of the queue, or passes on the slot it was just handed.
    fn abandon(&self, namespace: &Arc<str>, mut rx: oneshot::Receiver<()>) {
        rx.close();
        let handed = rx.try_recv().is_ok();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = state.namespaces.get_mut(namespace) {
            n.waiters.retain(|tx| !tx.is_closed());
            if handed {
                n.held = n.held.saturating_sub(1);
            }
        }
        if handed {
            state.taken = state.taken.saturating_sub(1);
            self.hand_over(&mut state);
        }
        let State {
            namespaces, turn, ..
        } = &mut *state;
        turn.retain(|name| namespaces.get(name).is_some_and(|n| !n.waiters.is_empty()));
        namespaces.retain(|_, n| n.held > 0 || !n.waiters.is_empty());
    }
}

/// A caller waiting for a slot; dropped before the slot arrives, it leaves the queue.
struct Waiter<'a> {
    rx: Option<oneshot::Receiver<()>>,
    slots: &'a Arc<FairSlots>,
    namespace: Arc<str>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            self.slots.abandon(&self.namespace, rx);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::time::Duration;

    /// Lets every spawned task run until it blocks.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn free_slots_are_taken_at_once_up_to_the_capacity() {
        let slots = FairSlots::new(2, 2);
        let a = slots.acquire("a").await;
        let _b = slots.acquire("b").await;
        assert_eq!(slots.load(), (2, 0));
        let third = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire("c").await }
        });
        settle().await;
        assert_eq!(slots.load(), (2, 1));
        drop(a);
        let _c = third.await.unwrap();
        assert_eq!(slots.load(), (2, 0));
    }

    #[tokio::test]
    async fn a_waiting_namespace_is_served_before_the_rest_of_a_long_queue() {
        let slots = FairSlots::new(1, 1);
        let first = slots.acquire("flood").await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let spawn = |ns: &'static str| {
            let (slots, order) = (slots.clone(), order.clone());
            tokio::spawn(async move {
                let slot = slots.acquire(ns).await;
                order.lock().unwrap().push(ns);
                settle().await;
                drop(slot);
            })
        };
        for _ in 0..20 {
            tasks.push(spawn("flood"));
        }
        settle().await;
        tasks.push(spawn("quiet"));
        settle().await;
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap();
        let at = order.iter().position(|n| *n == "quiet").unwrap();
        // FIFO would have served it 21st; in turn, it is second.
        assert!(at <= 1, "served at {at}: {order:?}");
    }

    #[tokio::test]
    async fn one_namespace_holds_no_more_than_its_share() {
        let slots = FairSlots::new(4, 2);
        let _a1 = slots.acquire("a").await;
        let _a2 = slots.acquire("a").await;
        let a3 = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire("a").await }
        });
        settle().await;
        // Slots are free, but a has its share: b gets one at once.
        assert_eq!(slots.load(), (2, 1));
        let b = tokio::time::timeout(Duration::from_secs(5), slots.acquire("b")).await;
        assert!(b.is_ok());
        a3.abort();
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_loses_no_slot() {
        let slots = FairSlots::new(1, 1);
        let held = slots.acquire("a").await;
        let quitter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire("b").await }
        });
        let patient = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire("c").await }
        });
        settle().await;
        quitter.abort();
        let _ = quitter.await;
        drop(held);
        let slot = tokio::time::timeout(Duration::from_secs(5), patient)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(slots.load(), (1, 0));
        drop(slot);
        assert_eq!(slots.load(), (0, 0));
        assert!(slots.state.lock().unwrap().namespaces.is_empty());
    }

    #[tokio::test]
    async fn many_cancelled_waiters_leave_nothing_behind() {
        let slots = FairSlots::new(2, 1);
        let held = slots.acquire("x").await;
        let mut tasks = Vec::new();
        for i in 0..100 {
            let slots = slots.clone();
            let ns = format!("ns{}", i % 7);
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire(&ns).await;
                std::future::pending::<()>().await;
            }));
        }
        settle().await;
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        drop(held);
        assert_eq!(slots.load(), (0, 0));
        let state = slots.state.lock().unwrap();
        assert!(state.namespaces.is_empty() && state.turn.is_empty());
    }
}
