//! One cache for every endpoint: entries with an expiry, bounded in number and in bytes (the
//! oldest inserted goes first), each charged to the namespace whose lookup made it, which may
//! fill only a share of the bounds; and [`Flights`], which makes concurrent lookups of one key
//! share one registry call.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::limits::CACHE_ENTRY_OVERHEAD_BYTES;

/// A map with an expiry per entry and bounds on entries and bytes. Eviction is first in, first
/// out: cheap, and an entry evicted while still in use costs one registry call to get back.
/// Each entry has an owner (the namespace whose lookup made it); an owner at its share of
/// either bound replaces its own oldest entries, so no one owner can flush the others'.
#[derive(Debug)]
pub struct BoundedCache<V> {
    inner: Mutex<Inner<V>>,
    max_entries: usize,
    max_bytes: usize,
    share_entries: usize,
    share_bytes: usize,
}

#[derive(Debug)]
struct Inner<V> {
    map: HashMap<Arc<str>, Entry<V>>,
    /// Insertion order; an item whose sequence number no longer matches its entry is stale.
    order: VecDeque<(u64, Arc<str>)>,
    owners: HashMap<Arc<str>, Owner>,
    bytes: usize,
    next_seq: u64,
}

#[derive(Debug, Default)]
struct Owner {
    entries: usize,
    bytes: usize,
    /// This owner's insertion order, stale items as in [`Inner::order`].
    order: VecDeque<(u64, Arc<str>)>,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    expires: Instant,
    bytes: usize,
    seq: u64,
    owner: Arc<str>,
}

impl<V> Inner<V> {
    fn remove(&mut self, key: &str) {
        let Some(e) = self.map.remove(key) else {
            return;
        };
        self.bytes -= e.bytes;
        if let Some(o) = self.owners.get_mut(&e.owner) {
            o.entries -= 1;
            o.bytes -= e.bytes;
            if o.entries == 0 {
                self.owners.remove(&e.owner);
            }
        }
    }

    fn is_live(&self, seq: u64, key: &str) -> bool {
        self.map.get(key).is_some_and(|e| e.seq == seq)
    }
}

impl<V: Clone> BoundedCache<V> {
    /// An empty cache holding at most `max_entries` entries and `max_bytes` bytes, one owner at
    /// most a `1/share_divisor` of each.
    pub fn new(max_entries: usize, max_bytes: usize, share_divisor: usize) -> Self {
        let share_divisor = share_divisor.max(1);
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
                owners: HashMap::new(),
                bytes: 0,
                next_seq: 0,
            }),
            max_entries,
            max_bytes,
            share_entries: (max_entries / share_divisor).max(1),
            share_bytes: max_bytes / share_divisor,
        }
    }

    /// The value under `key`, unless it expired at `now`.
    pub fn get(&self, key: &str, now: Instant) -> Option<V> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match inner.map.get(key) {
            Some(e) if e.expires > now => Some(e.value.clone()),
            Some(_) => {
                inner.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `value` under `key` for `ttl` from `now`, charged to `owner`; `value_bytes` is
    /// what the value holds. A zero `ttl`, or an entry larger than an owner's share, is not
    /// kept.
    pub fn insert(
        &self,
        key: &str,
        value: V,
        value_bytes: usize,
        ttl: Duration,
        now: Instant,
        owner: &str,
    ) {
        let bytes = key.len() + value_bytes + CACHE_ENTRY_OVERHEAD_BYTES;
        if ttl.is_zero() || bytes > self.share_bytes || self.max_entries == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.remove(key);
        let key: Arc<str> = key.into();
        let owner: Arc<str> = match inner.owners.get_key_value(owner) {
            Some((o, _)) => o.clone(),
            None => owner.into(),
        };
        // The owner's own oldest entries make room within its share.
        while let Some(o) = inner.owners.get_mut(&owner) {
            if o.entries < self.share_entries && o.bytes + bytes <= self.share_bytes {
                break;
            }
            let Some((old_seq, old_key)) = o.order.pop_front() else {
                break;
            };
            if inner.is_live(old_seq, &old_key) {
                inner.remove(&old_key);
            }
        }
        inner.order.push_back((seq, key.clone()));
        let o = inner.owners.entry(owner.clone()).or_default();
        o.entries += 1;
        o.bytes += bytes;
        o.order.push_back((seq, key.clone()));
        inner.map.insert(
            key,
            Entry {
                value,
                expires: now + ttl,
                bytes,
                seq,
                owner,
            },
        );
        inner.bytes += bytes;
        while inner.map.len() > self.max_entries || inner.bytes > self.max_bytes {
            let Some((seq, key)) = inner.order.pop_front() else {
                break;
            };
            if inner.is_live(seq, &key) {
                inner.remove(&key);
            }
        }
        // Replaced, expired and evicted keys leave stale items in the orders; drop them when
        // they outnumber the live ones.
        let Inner {
            map, order, owners, ..
        } = &mut *inner;
        if order.len() > 2 * map.len() + 64 {
            order.retain(|(seq, key)| map.get(key).is_some_and(|e| e.seq == *seq));
        }
        for o in owners.values_mut() {
            if o.order.len() > 2 * o.entries + 16 {
                o.order
                    .retain(|(seq, key)| map.get(key).is_some_and(|e| e.seq == *seq));
            }
        }
    }

    /// Entries and bytes held now.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (inner.map.len(), inner.bytes)
    }

    /// Entries and bytes charged to `owner` now.
    pub fn owned_by(&self, owner: &str) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .owners
            .get(owner)
            .map_or((0, 0), |o| (o.entries, o.bytes))
    }
}

/// Lookups in flight, by key: the first caller runs the lookup, callers that arrive meanwhile
/// wait for its result instead of calling the registry again. If the caller running it gives
/// up (its review's deadline passed), a waiting caller takes over.
#[derive(Debug)]
pub struct Flights<V> {
    map: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<V>>>>,
}

impl<V> Default for Flights<V> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<V: Clone> Flights<V> {
    /// The result of `lookup` for `key`, run once for all concurrent callers. `lookup` should
    /// look in the cache first: a caller may arrive just after the previous flight landed.
    pub async fn run<F, Fut>(&self, key: &str, lookup: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.to_owned())
            .or_default()
            .clone();
        let value = cell.get_or_init(lookup).await.clone();
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(key);
        }
        value
    }

    /// Lookups in flight now.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no lookup is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn an_entry_lives_until_it_expires() {
        let c = BoundedCache::new(10, 10_000, 1);
        let t0 = Instant::now();
        c.insert("a", 1, 8, S, t0, "ns");
        assert_eq!(c.get("a", t0), Some(1));
        assert_eq!(c.get("a", t0 + S), None);
        assert_eq!(c.size(), (0, 0));
    }

    #[test]
    fn a_zero_ttl_keeps_nothing() {
        let c = BoundedCache::new(10, 10_000, 1);
        let t0 = Instant::now();
        c.insert("a", 1, 8, Duration::ZERO, t0, "ns");
        assert_eq!(c.get("a", t0), None);
    }

    #[test]
    fn the_oldest_entry_goes_first_at_the_entry_bound() {
        let c = BoundedCache::new(2, 10_000, 1);
        let t0 = Instant::now();
        c.insert("a", 1, 8, S, t0, "ns");
        c.insert("b", 2, 8, S, t0, "ns");
        c.insert("c", 3, 8, S, t0, "ns");
        assert_eq!(c.get("a", t0), None);
        assert_eq!(c.get("b", t0), Some(2));
        assert_eq!(c.get("c", t0), Some(3));
    }

    #[test]
    fn the_byte_bound_holds_whatever_the_entries_weigh() {
        let entry = 1 + 100 + CACHE_ENTRY_OVERHEAD_BYTES;
        let c = BoundedCache::new(1000, 3 * entry, 1);
        let t0 = Instant::now();
        for (i, k) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            c.insert(k, i, 100, S, t0, "ns");
            assert!(c.size().1 <= 3 * entry);
        }
        assert_eq!(c.size(), (3, 3 * entry));
        assert_eq!(c.get("b", t0), None);
        assert_eq!(c.get("e", t0), Some(4));
        // Larger than the whole budget: not kept, nothing evicted for it.
        c.insert("huge", 9, 10 * entry, S, t0, "ns");
        assert_eq!(c.get("huge", t0), None);
        assert_eq!(c.size().0, 3);
    }

    #[test]
    fn replacing_a_key_does_not_count_it_twice() {
        let c = BoundedCache::new(2, 10_000, 1);
        let t0 = Instant::now();
        for v in 0..100 {
            c.insert("a", v, 8, S, t0, "ns");
        }
        c.insert("b", 1, 8, S, t0, "ns");
        assert_eq!(c.get("a", t0), Some(99));
        assert_eq!(c.size().0, 2);
    }

    #[test]
    fn one_owner_cannot_flush_the_others_entries() {
        // 80 entries, an eighth (10) per owner.
        let c = BoundedCache::new(80, 1_000_000, 8);
        let t0 = Instant::now();
        for i in 0..10 {
            c.insert(&format!("quiet{i}"), i, 8, S, t0, "quiet");
        }
        for i in 0..10_000 {
            c.insert(&format!("flood{i}"), i, 8, S, t0, "flood");
            assert!(c.owned_by("flood").0 <= 10);
        }
        for i in 0..10 {
            assert_eq!(c.get(&format!("quiet{i}"), t0), Some(i), "quiet{i}");
        }
        assert_eq!(c.owned_by("quiet").0, 10);
        // The flood keeps its newest.
        assert_eq!(c.get("flood9999", t0), Some(9999));
        assert_eq!(c.get("flood0", t0), None);
    }

    #[test]
    fn an_owner_share_bounds_bytes_too() {
        let entry = 2 + 1000 + CACHE_ENTRY_OVERHEAD_BYTES;
        let c = BoundedCache::new(1000, 8 * 4 * entry, 8);
        let t0 = Instant::now();
        for i in 0..100 {
            c.insert(&format!("{i:02}"), i, 1000, S, t0, "flood");
            assert!(c.owned_by("flood").1 <= 4 * entry);
        }
        assert_eq!(c.owned_by("flood"), (4, 4 * entry));
        // Entries leave their owner's account when they expire, are replaced or evicted.
        assert_eq!(c.get("99", t0 + S), None);
        assert_eq!(c.owned_by("flood").0, 3);
    }

    #[tokio::test]
    async fn concurrent_lookups_of_one_key_make_one_call() {
        let flights = Arc::new(Flights::<u32>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (flights, calls, gate) = (flights.clone(), calls.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run("k", || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        7
                    })
                    .await
            }));
        }
        // Let every task join the flight, then let the one lookup finish.
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_hands_the_lookup_to_a_waiting_one() {
        let flights = Arc::new(Flights::<u32>::default());
        let first = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run("k", std::future::pending::<u32>).await })
        };
        while flights.is_empty() {
            tokio::task::yield_now().await;
        }
        let second = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run("k", || async { 5 }).await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        first.abort();
        assert_eq!(second.await.unwrap(), 5);
    }
}
