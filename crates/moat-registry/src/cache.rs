//! One cache for every endpoint: entries with an expiry, bounded in number and in bytes (the
//! oldest inserted goes first), and [`Flights`], which makes concurrent lookups of one key
//! share one registry call.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::limits::CACHE_ENTRY_OVERHEAD_BYTES;

/// A map with an expiry per entry and bounds on entries and bytes. Eviction is first in, first
/// out: cheap, and an entry evicted while still in use costs one registry call to get back.
#[derive(Debug)]
pub struct BoundedCache<V> {
    inner: Mutex<Inner<V>>,
    max_entries: usize,
    max_bytes: usize,
}

#[derive(Debug)]
struct Inner<V> {
    map: HashMap<String, Entry<V>>,
    /// Insertion order; an item whose sequence number no longer matches its entry is stale.
    order: VecDeque<(u64, String)>,
    bytes: usize,
    next_seq: u64,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    expires: Instant,
    bytes: usize,
    seq: u64,
}

impl<V: Clone> BoundedCache<V> {
    /// An empty cache holding at most `max_entries` entries and `max_bytes` bytes.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                next_seq: 0,
            }),
            max_entries,
            max_bytes,
        }
    }

    /// The value under `key`, unless it expired at `now`.
    pub fn get(&self, key: &str, now: Instant) -> Option<V> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match inner.map.get(key) {
            Some(e) if e.expires > now => Some(e.value.clone()),
            Some(_) => {
                if let Some(e) = inner.map.remove(key) {
                    inner.bytes -= e.bytes;
                }
                None
            }
            None => None,
        }
    }

    /// Keeps `value` under `key` for `ttl` from `now`; `value_bytes` is what the value holds.
    /// A zero `ttl`, or an entry larger than the whole budget, is not kept.
    pub fn insert(&self, key: String, value: V, value_bytes: usize, ttl: Duration, now: Instant) {
        let bytes = key.len() + value_bytes + CACHE_ENTRY_OVERHEAD_BYTES;
        if ttl.is_zero() || bytes > self.max_bytes || self.max_entries == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = inner.next_seq;
        inner.next_seq += 1;
        if let Some(old) = inner.map.remove(&key) {
            inner.bytes -= old.bytes;
        }
        inner.order.push_back((seq, key.clone()));
        inner.map.insert(
            key,
            Entry {
                value,
                expires: now + ttl,
                bytes,
                seq,
            },
        );
        inner.bytes += bytes;
        while inner.map.len() > self.max_entries || inner.bytes > self.max_bytes {
            let Some((seq, key)) = inner.order.pop_front() else {
                break;
            };
            if inner.map.get(&key).is_some_and(|e| e.seq == seq)
                && let Some(e) = inner.map.remove(&key)
            {
                inner.bytes -= e.bytes;
            }
        }
        // Replaced and expired keys leave stale items in the order; drop them when they
        // outnumber the live ones.
        if inner.order.len() > 2 * inner.map.len() + 64 {
            let Inner { map, order, .. } = &mut *inner;
            order.retain(|(seq, key)| map.get(key).is_some_and(|e| e.seq == *seq));
        }
    }

    /// Entries and bytes held now.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (inner.map.len(), inner.bytes)
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
        let c = BoundedCache::new(10, 10_000);
        let t0 = Instant::now();
        c.insert("a".into(), 1, 8, S, t0);
        assert_eq!(c.get("a", t0), Some(1));
        assert_eq!(c.get("a", t0 + S), None);
        assert_eq!(c.size(), (0, 0));
    }

    #[test]
    fn a_zero_ttl_keeps_nothing() {
        let c = BoundedCache::new(10, 10_000);
        let t0 = Instant::now();
        c.insert("a".into(), 1, 8, Duration::ZERO, t0);
        assert_eq!(c.get("a", t0), None);
    }

    #[test]
    fn the_oldest_entry_goes_first_at_the_entry_bound() {
        let c = BoundedCache::new(2, 10_000);
        let t0 = Instant::now();
        c.insert("a".into(), 1, 8, S, t0);
        c.insert("b".into(), 2, 8, S, t0);
        c.insert("c".into(), 3, 8, S, t0);
        assert_eq!(c.get("a", t0), None);
        assert_eq!(c.get("b", t0), Some(2));
        assert_eq!(c.get("c", t0), Some(3));
    }

    #[test]
    fn the_byte_bound_holds_whatever_the_entries_weigh() {
        let entry = 1 + 100 + CACHE_ENTRY_OVERHEAD_BYTES;
        let c = BoundedCache::new(1000, 3 * entry);
        let t0 = Instant::now();
        for (i, k) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            c.insert(k.into(), i, 100, S, t0);
            assert!(c.size().1 <= 3 * entry);
        }
        assert_eq!(c.size(), (3, 3 * entry));
        assert_eq!(c.get("b", t0), None);
        assert_eq!(c.get("e", t0), Some(4));
        // Larger than the whole budget: not kept, nothing evicted for it.
        c.insert("huge".into(), 9, 10 * entry, S, t0);
        assert_eq!(c.get("huge", t0), None);
        assert_eq!(c.size().0, 3);
    }

    #[test]
    fn replacing_a_key_does_not_count_it_twice() {
        let c = BoundedCache::new(2, 10_000);
        let t0 = Instant::now();
        for v in 0..100 {
            c.insert("a".into(), v, 8, S, t0);
        }
        c.insert("b".into(), 1, 8, S, t0);
        assert_eq!(c.get("a", t0), Some(99));
        assert_eq!(c.size().0, 2);
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
