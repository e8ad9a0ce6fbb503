//! The memory requests hold, as one budget: requests reading their body (per source) and the
//! bytes every request holds (in all).
//!
//! A request is charged a fixed overhead when its headers arrive (its task, its headers, its
//! stream's state) and every body byte as it arrives, and keeps its charge until its answer is
//! sent. While its body is still arriving it is a *reader*, and readers are what an attacker
//! holds cheaply: headers sent, a large `content-length`, the body trickled or never sent. So
//! when a charge does not fit, the reader that started longest ago is displaced (its read ends
//! at once with [`Reason::requestDisplaced`]) until it does. A client that sends its body in one
//! go, as the API server does, is a reader for well under a millisecond and is never the oldest:
//! to displace it an attacker would have to push the whole budget through the socket in that
//! time. Requests whose body has arrived are never displaced; the decision slots
//! ([`crate::slots`]) bound those.
//!
//! The budget releases a displaced reader's bytes at once, before its task drops its buffer, so
//! memory can exceed the budget by one body for the moment that takes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::lock;
use crate::refusals::Reason;

/// The bounds of one listener's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimits {
    /// Bytes all requests may hold at once, overheads and bodies.
    pub total_bytes: usize,
    /// What a request is charged before its first body byte.
    pub request_overhead_bytes: usize,
    /// Requests from one source reading their body at once.
    pub readers_per_source: usize,
}

/// The budget of one listener's requests.
#[derive(Debug)]
pub struct RequestBudget {
    limits: BudgetLimits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes charged, readers and finished requests alike.
    used: usize,
    readers: HashMap<u64, Reader>,
    readers_by_source: HashMap<IpAddr, usize>,
    next_id: u64,
}

#[derive(Debug)]
struct Reader {
    source: IpAddr,
    bytes: usize,
    signal: Arc<Signal>,
}

#[derive(Debug, Default)]
struct Signal {
    displaced: AtomicBool,
    notify: Notify,
}

impl State {
    /// Makes room for `n` more bytes by displacing the oldest readers other than `keep`.
    fn make_room(&mut self, total: usize, n: usize, keep: Option<u64>) -> Result<(), Reason> {
        if self.used + n <= total {
            return Ok(());
        }
        let displaceable: usize = self
            .readers
            .iter()
            .filter(|(id, _)| Some(**id) != keep)
            .map(|(_, r)| r.bytes)
            .sum();
        if self.used.saturating_sub(displaceable) + n > total {
            return Err(Reason::budgetFull);
        }
        while self.used + n > total {
            // Ids grow with time: the smallest is the reader that started longest ago.
            let Some(oldest) = self
                .readers
                .keys()
                .copied()
                .filter(|id| Some(*id) != keep)
                .min()
            else {
                return Err(Reason::budgetFull);
            };
            self.displace(oldest);
        }
        Ok(())
    }

    fn displace(&mut self, id: u64) {
        if let Some(reader) = self.remove_reader(id) {
            self.used = self.used.saturating_sub(reader.bytes);
            reader.signal.displaced.store(true, Ordering::Relaxed);
            reader.signal.notify.notify_one();
        }
    }

    fn remove_reader(&mut self, id: u64) -> Option<Reader> {
        let reader = self.readers.remove(&id)?;
        if let Some(n) = self.readers_by_source.get_mut(&reader.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.readers_by_source.remove(&reader.source);
            }
        }
        Some(reader)
    }
}

impl RequestBudget {
    /// An empty budget with `limits`.
    pub fn new(limits: BudgetLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    /// The budget's bounds.
    pub fn limits(&self) -> BudgetLimits {
        self.limits
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        lock(&self.state).used
    }

    /// Requests reading their body now.
    pub fn readers(&self) -> usize {
        lock(&self.state).readers.len()
    }

    /// Charges a new request from `source` its overhead; it is a reader until
    /// [`Ticket::finish_reading`].
    ///
    /// # Errors
    /// [`Reason::requestPerSource`] when the source has its share of readers;
    /// [`Reason::budgetFull`] when displacing every other reader would not make room.
    pub fn begin(self: &Arc<Self>, source: IpAddr) -> Result<Ticket, Reason> {
        let mut s = lock(&self.state);
        if s.readers_by_source.get(&source).copied().unwrap_or(0) >= self.limits.readers_per_source
        {
            return Err(Reason::requestPerSource);
        }
        let overhead = self.limits.request_overhead_bytes;
        s.make_room(self.limits.total_bytes, overhead, None)?;
        s.next_id += 1;
        let id = s.next_id;
        let signal = Arc::new(Signal::default());
        s.used += overhead;
        s.readers.insert(
            id,
            Reader {
                source,
                bytes: overhead,
                signal: signal.clone(),
            },
        );
        *s.readers_by_source.entry(source).or_default() += 1;
        Ok(Ticket {
            budget: self.clone(),
            id,
            signal,
            held: None,
        })
    }
}

/// One request's charge; released when dropped.
#[derive(Debug)]
pub struct Ticket {
    budget: Arc<RequestBudget>,
    id: u64,
    signal: Arc<Signal>,
    /// The bytes held once the body arrived (`None` while reading).
    held: Option<usize>,
}

impl Ticket {
    /// Charges `n` more body bytes, displacing older readers if needed.
    ///
    /// # Errors
    /// [`Reason::requestDisplaced`] if this request was displaced; [`Reason::budgetFull`] if
    /// there is no room even after displacing every other reader.
    pub fn charge(&mut self, n: usize) -> Result<(), Reason> {
        let limits = self.budget.limits;
        let mut s = lock(&self.budget.state);
        match self.held {
            Some(ref mut held) => {
                // Nothing charges a request once its body has arrived today; if something did,
                // the charge would be held like the body's, never displaced.
                s.used += n;
                *held += n;
                return Ok(());
            }
            None if !s.readers.contains_key(&self.id) => return Err(Reason::requestDisplaced),
            None => {}
        }
        s.make_room(limits.total_bytes, n, Some(self.id))?;
        s.used += n;
        if let Some(reader) = s.readers.get_mut(&self.id) {
            reader.bytes += n;
        }
        Ok(())
    }

    /// The body arrived: the request keeps its charge but can no longer be displaced.
    pub fn finish_reading(&mut self) {
        if self.held.is_some() {
            return;
        }
        let mut s = lock(&self.budget.state);
        self.held = Some(s.remove_reader(self.id).map_or(0, |r| r.bytes));
    }

    /// Completes when this request is displaced while reading.
    pub async fn displaced(&self) {
        if self.signal.displaced.load(Ordering::Relaxed) {
            return;
        }
        self.signal.notify.notified().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = lock(&self.budget.state);
        let bytes = match self.held {
            Some(held) => held,
            // Displaced readers were released when displaced.
            None => s.remove_reader(self.id).map_or(0, |r| r.bytes),
        };
        s.used = s.used.saturating_sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn budget(total: usize, per_source: usize) -> Arc<RequestBudget> {
        RequestBudget::new(BudgetLimits {
            total_bytes: total,
            request_overhead_bytes: 10,
            readers_per_source: per_source,
        })
    }

    #[test]
    fn charges_overhead_and_body_and_releases_on_drop() {
        let b = budget(1000, 4);
        let mut t = b.begin(ip("127.0.0.2")).unwrap();
        t.charge(90).unwrap();
        assert_eq!(b.used(), 100);
        t.finish_reading();
        assert_eq!((b.used(), b.readers()), (100, 0));
        drop(t);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_source_gets_its_share_of_readers_only() {
        let b = budget(1000, 2);
        let _a = b.begin(ip("127.0.0.2")).unwrap();
        let mut a2 = b.begin(ip("127.0.0.2")).unwrap();
        assert_eq!(
            b.begin(ip("127.0.0.2")).unwrap_err(),
            Reason::requestPerSource
        );
        assert!(b.begin(ip("127.0.0.3")).is_ok());
        a2.finish_reading();
        assert!(
            b.begin(ip("127.0.0.2")).is_ok(),
            "a finished body frees the share"
        );
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_reader_is_displaced_for_a_new_request() {
        let b = budget(100, 10);
        let mut old = b.begin(ip("127.0.0.2")).unwrap();
        old.charge(60).unwrap();
        let mut newer = b.begin(ip("127.0.0.2")).unwrap();
        newer.charge(10).unwrap();
        // 90 used; the API server's 40 bytes need the oldest reader gone.
        let mut good = b.begin(ip("127.0.0.9")).unwrap();
        good.charge(30).unwrap();
        old.displaced().await;
        assert_eq!(old.charge(1).unwrap_err(), Reason::requestDisplaced);
        assert_eq!(b.used(), 60);
        newer.charge(1).unwrap();
        drop(old);
        assert_eq!(b.used(), 61, "a displaced reader's bytes are released once");
    }

    #[test]
    fn finished_requests_are_never_displaced_and_a_charge_that_cannot_fit_is_refused() {
        let b = budget(100, 10);
        let mut done = b.begin(ip("127.0.0.2")).unwrap();
        done.charge(80).unwrap();
        done.finish_reading();
        let mut reader = b.begin(ip("127.0.0.3")).unwrap();
        assert_eq!(reader.charge(20).unwrap_err(), Reason::budgetFull);
        assert_eq!(b.used(), 100, "the refused charge displaced no one");
        // A new request's overhead displaces the reader, never the finished request.
        let _new = b.begin(ip("127.0.0.4")).unwrap();
        assert_eq!(reader.charge(1).unwrap_err(), Reason::requestDisplaced);
        assert_eq!(b.used(), 100);
    }
}
