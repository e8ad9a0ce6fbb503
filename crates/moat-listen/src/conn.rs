//! Open connections: a cap per source address and in all, displacement at the total cap, and
//! an idle watchdog.
//!
//! At the per-source cap a new connection is refused: one address (a tenant pod) cannot hold
//! more than its share. At the total cap, reached from many addresses, refusing would lock out
//! the API server, so the new connection is admitted and the open connection that is the
//! cheapest to lose is closed instead: one that is deciding nothing, unauthenticated before
//! authenticated (when a client CA is configured), and among those the one that has been quiet
//! longest. A connection with a decision in progress is never displaced; only if every
//! connection has one is the new connection refused.
//!
//! The accept loop never waits: [`ConnectionTable::admit`] answers at once.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lock;
use crate::refusals::{ListenerRefusals, Reason};

/// The bounds of one listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections from one source address.
    pub per_source: usize,
    /// Open connections in all.
    pub total: usize,
    /// A connection on which no byte moved for this long is closed.
    pub idle_timeout: Duration,
}

/// Open connections of one listener.
#[derive(Debug)]
pub struct ConnectionTable {
    limits: ConnectionLimits,
    origin: Instant,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// A slab: `free` lists the vacant indices.
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    open: usize,
    by_source: HashMap<IpAddr, usize>,
    generation: u64,
}

#[derive(Debug)]
struct Entry {
    source: IpAddr,
    generation: u64,
    shared: Arc<Shared>,
}

/// What a connection's I/O, its requests and the table share.
#[derive(Debug)]
struct Shared {
    origin: Instant,
    /// Milliseconds after `origin` at which a byte last moved.
    last_ms: AtomicU64,
    /// Requests on this connection with a decision in progress.
    deciding: AtomicUsize,
    authenticated: AtomicBool,
    displaced: AtomicBool,
    displace: Notify,
}

impl Shared {
    fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }
}

/// What [`ConnectionTable::admit`] did to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// There was room.
    Room,
    /// Another connection was closed to make room.
    Displaced,
}

impl ConnectionTable {
    /// An empty table with `limits`.
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            origin: Instant::now(),
            table: Mutex::new(Table::default()),
        })
    }

    /// The table's bounds.
    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// A place for a connection from `source`, released when the handle drops.
    ///
    /// # Errors
    /// [`Reason::connectionPerSource`] when the source holds its share;
    /// [`Reason::connectionTotal`] when the table is full and no connection may be displaced.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<(Connection, Admission), Reason> {
        let mut t = lock(&self.table);
        if t.by_source.get(&source).copied().unwrap_or(0) >= self.limits.per_source {
            return Err(Reason::connectionPerSource);
        }
        let mut admission = Admission::Room;
        if t.open >= self.limits.total {
            let victim = t
                .entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| Some((i, e.as_ref()?)))
                .filter(|(_, e)| e.shared.deciding.load(Ordering::Relaxed) == 0)
                .min_by_key(|(_, e)| {
                    (
                        e.shared.authenticated.load(Ordering::Relaxed),
                        e.shared.last_ms.load(Ordering::Relaxed),
                    )
                })
                .map(|(i, _)| i);
            let Some(victim) = victim else {
                return Err(Reason::connectionTotal);
            };
            if let Some(entry) = t.remove(victim) {
                entry.shared.displaced.store(true, Ordering::Relaxed);
                entry.shared.displace.notify_one();
            }
            admission = Admission::Displaced;
        }
        t.generation += 1;
        let generation = t.generation;
        let shared = Arc::new(Shared {
            origin: self.origin,
            last_ms: AtomicU64::new(0),
            deciding: AtomicUsize::new(0),
            authenticated: AtomicBool::new(false),
            displaced: AtomicBool::new(false),
            displace: Notify::new(),
        });
        shared.touch();
        let entry = Entry {
            source,
            generation,
            shared: shared.clone(),
        };
        let index = match t.free.pop() {
            Some(i) => {
                t.entries[i] = Some(entry);
                i
            }
            None => {
                t.entries.push(Some(entry));
                t.entries.len() - 1
            }
        };
        t.open += 1;
        *t.by_source.entry(source).or_default() += 1;
        drop(t);
        Ok((
            Connection {
                table: self.clone(),
                index,
                generation,
                source,
                shared,
            },
            admission,
        ))
    }

    /// [`Self::admit`], with the refusal or the displacement counted on `refusals`.
    pub fn admit_counted(
        self: &Arc<Self>,
        source: IpAddr,
        refusals: &ListenerRefusals,
    ) -> Option<Connection> {
        match self.admit(source) {
            Ok((connection, Admission::Room)) => Some(connection),
            Ok((connection, Admission::Displaced)) => {
                refusals.note(Reason::connectionDisplaced);
                Some(connection)
            }
            Err(reason) => {
                refusals.note(reason);
                None
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.table).open
    }
}

impl Table {
    fn remove(&mut self, index: usize) -> Option<Entry> {
        let entry = self.entries.get_mut(index)?.take()?;
        self.free.push(index);
        self.open = self.open.saturating_sub(1);
        if let Some(n) = self.by_source.get_mut(&entry.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_source.remove(&entry.source);
            }
        }
        Some(entry)
    }
}

/// One admitted connection's place in its table; leaves the table when dropped.
#[derive(Debug)]
pub struct Connection {
    table: Arc<ConnectionTable>,
    index: usize,
    generation: u64,
    source: IpAddr,
    shared: Arc<Shared>,
}

impl Connection {
    /// The connection's source address.
    pub fn source(&self) -> IpAddr {
        self.source
    }

    /// A handle its requests use to mark decisions in progress.
    pub fn activity(&self) -> Activity {
        Activity(self.shared.clone())
    }

    /// Marks the connection as authenticated (a client certificate the server trusts): it is
    /// displaced only after every unauthenticated one.
    pub fn set_authenticated(&self) {
        self.shared.authenticated.store(true, Ordering::Relaxed);
    }

    /// Wraps the connection's I/O so every byte read or written counts as activity.
    pub fn track<T>(&self, io: T) -> Tracked<T> {
        Tracked {
            inner: io,
            shared: self.shared.clone(),
        }
    }

    /// Completes when the connection should close: displaced to make room, or quiet for the
    /// idle timeout. Says which.
    pub async fn closing(&self) -> Reason {
        let idle = self.table.limits.idle_timeout;
        let displaced = self.shared.displace.notified();
        tokio::pin!(displaced);
        loop {
            if self.shared.displaced.load(Ordering::Relaxed) {
                return Reason::connectionDisplaced;
            }
            let last = Duration::from_millis(self.shared.last_ms.load(Ordering::Relaxed));
            let since = self.shared.origin.elapsed().saturating_sub(last);
            // A decision in progress is the server's time, not the client's.
            let deciding = self.shared.deciding.load(Ordering::Relaxed) > 0;
            if since >= idle && !deciding {
                return Reason::connectionIdle;
            }
            let wait = if deciding { idle } else { idle - since };
            tokio::select! {
                () = &mut displaced => return Reason::connectionDisplaced,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut t = lock(&self.table.table);
        let ours = t
            .entries
            .get(self.index)
            .and_then(Option::as_ref)
            .is_some_and(|e| e.generation == self.generation);
        if ours {
            t.remove(self.index);
        }
    }
}

/// A connection's activity, as its requests see it.
#[derive(Debug, Clone)]
pub struct Activity(Arc<Shared>);

impl Activity {
    /// Marks a decision in progress until the guard drops: the connection is not displaced and
    /// not closed as idle meanwhile.
    pub fn deciding(&self) -> Deciding {
        self.0.deciding.fetch_add(1, Ordering::Relaxed);
        Deciding(self.0.clone())
    }
}

/// A decision in progress on a connection.
#[derive(Debug)]
pub struct Deciding(Arc<Shared>);

impl Drop for Deciding {
    fn drop(&mut self) {
        self.0.deciding.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// An I/O stream that records activity on every read and write.
#[derive(Debug)]
pub struct Tracked<T> {
    inner: T,
    shared: Arc<Shared>,
}

impl<T> Tracked<T> {
    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.shared.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.shared.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table(per_source: usize, total: usize) -> Arc<ConnectionTable> {
        ConnectionTable::new(ConnectionLimits {
            per_source,
            total,
            idle_timeout: Duration::from_secs(20),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_beyond_a_sources_share_and_releases_on_drop() {
        let t = table(2, 10);
        let a1 = t.admit(ip("127.0.0.2")).unwrap();
        let _a2 = t.admit(ip("127.0.0.2")).unwrap();
        assert_eq!(
            t.admit(ip("127.0.0.2")).unwrap_err(),
            Reason::connectionPerSource
        );
        assert!(t.admit(ip("127.0.0.3")).is_ok());
        drop(a1);
        assert_eq!(t.open(), 1);
        assert!(t.admit(ip("127.0.0.2")).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_total_cap_the_longest_quiet_connection_is_displaced() {
        let t = table(10, 3);
        let (old, _) = t.admit(ip("127.0.0.2")).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let (newer, _) = t.admit(ip("127.0.0.3")).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let (newest, _) = t.admit(ip("127.0.0.4")).unwrap();
        let (_fresh, admission) = t.admit(ip("127.0.0.9")).unwrap();
        assert_eq!(admission, Admission::Displaced);
        assert_eq!(t.open(), 3);
        assert_eq!(old.closing().await, Reason::connectionDisplaced);
        drop(old);
        assert_eq!(
            t.open(),
            3,
            "dropping a displaced connection frees nothing twice"
        );
        drop((newer, newest));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_deciding_is_never_displaced_and_unauthenticated_go_first() {
        let t = table(10, 3);
        let (busy, _) = t.admit(ip("127.0.0.2")).unwrap();
        let _deciding = busy.activity().deciding();
        tokio::time::advance(Duration::from_secs(1)).await;
        let (authed, _) = t.admit(ip("127.0.0.3")).unwrap();
        authed.set_authenticated();
        tokio::time::advance(Duration::from_secs(1)).await;
        let (anon, _) = t.admit(ip("127.0.0.4")).unwrap();
        let (_new, admission) = t.admit(ip("127.0.0.5")).unwrap();
        assert_eq!(admission, Admission::Displaced);
        assert!(anon.shared.displaced.load(Ordering::Relaxed));
        assert!(!busy.shared.displaced.load(Ordering::Relaxed));
        assert!(!authed.shared.displaced.load(Ordering::Relaxed));
        // Next the authenticated one, never the deciding one.
        let (_newer, _) = t.admit(ip("127.0.0.6")).unwrap();
        assert!(!busy.shared.displaced.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_connection_is_deciding_a_new_one_is_refused() {
        let t = table(10, 1);
        let (c, _) = t.admit(ip("127.0.0.2")).unwrap();
        let _d = c.activity().deciding();
        assert_eq!(
            t.admit(ip("127.0.0.3")).unwrap_err(),
            Reason::connectionTotal
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_closes_after_the_idle_timeout_but_not_while_deciding() {
        let t = table(10, 10);
        let (c, _) = t.admit(ip("127.0.0.2")).unwrap();
        let started = Instant::now();
        assert_eq!(c.closing().await, Reason::connectionIdle);
        assert!(started.elapsed() >= Duration::from_secs(20));
        let (d, _) = t.admit(ip("127.0.0.2")).unwrap();
        let deciding = d.activity().deciding();
        let closing = tokio::time::timeout(Duration::from_secs(60), d.closing()).await;
        assert!(closing.is_err(), "not idle while deciding");
        drop(deciding);
        assert_eq!(d.closing().await, Reason::connectionIdle);
    }
}
