//! The `Authorization` values got from registries (bearer tokens, Basic headers), reused until
//! they expire. A tenant's registry chooses its tokens (under `unmatched: pin` any registry may
//! be one), so the store is bounded in entries and in bytes ([`MAX_TOKENS`],
//! [`MAX_TOKEN_STORE_BYTES`]): expired entries go first, then those that expire soonest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::limits::{MAX_TOKEN_STORE_BYTES, MAX_TOKENS, TOKEN_ENTRY_OVERHEAD_BYTES};

/// `(registry, scope, credentials generation)`: what an `Authorization` value is good for.
pub(crate) type AuthKey = (String, String, u64);

#[derive(Debug, Default)]
pub(crate) struct TokenStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<AuthKey, Stored>,
    bytes: usize,
}

#[derive(Debug)]
struct Stored {
    value: Arc<str>,
    expires: Instant,
    bytes: usize,
}

fn cost(key: &AuthKey, value: &str) -> usize {
    key.0.len() + key.1.len() + value.len() + TOKEN_ENTRY_OVERHEAD_BYTES
}

impl TokenStore {
    /// The value for `key`, unless it expired at `now`.
    pub(crate) fn get(&self, key: &AuthKey, now: Instant) -> Option<Arc<str>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .map
            .get(key)
            .filter(|s| s.expires > now)
            .map(|s| s.value.clone())
    }

    /// Keeps `value` for `key` for `ttl`. Values got with older credentials go (they are of no
    /// more use); then expired ones; then, while a bound is exceeded, those that expire first.
    pub(crate) fn insert(&self, key: AuthKey, value: Arc<str>, ttl: Duration, now: Instant) {
        let bytes = cost(&key, &value);
        if ttl.is_zero() || bytes > MAX_TOKEN_STORE_BYTES {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let generation = key.2;
        let Inner { map, bytes: held } = &mut *inner;
        map.retain(|k, s| {
            let keep = k.2 == generation && s.expires > now && *k != key;
            if !keep {
                *held -= s.bytes;
            }
            keep
        });
        if map.len() >= MAX_TOKENS || *held + bytes > MAX_TOKEN_STORE_BYTES {
            let mut by_expiry: Vec<(Instant, AuthKey)> =
                map.iter().map(|(k, s)| (s.expires, k.clone())).collect();
            by_expiry.sort_unstable_by_key(|(expires, _)| *expires);
            for (_, k) in by_expiry {
                if map.len() < MAX_TOKENS && *held + bytes <= MAX_TOKEN_STORE_BYTES {
                    break;
                }
                if let Some(s) = map.remove(&k) {
                    *held -= s.bytes;
                }
            }
        }
        *held += bytes;
        map.insert(
            key,
            Stored {
                value,
                expires: now + ttl,
                bytes,
            },
        );
    }

    /// Forgets `key`'s value (the registry refused it).
    pub(crate) fn remove(&self, key: &AuthKey) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = inner.map.remove(key) {
            inner.bytes -= s.bytes;
        }
    }

    /// Entries and bytes held now.
    #[cfg(test)]
    fn size(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (inner.map.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_TOKEN_BYTES;

    const MINUTE: Duration = Duration::from_secs(60);

    fn key(i: usize) -> AuthKey {
        ("reg.example".to_owned(), format!("repository:r{i}:pull"), 0)
    }

    #[test]
    fn a_value_is_reused_until_it_expires() {
        let store = TokenStore::default();
        let t0 = Instant::now();
        store.insert(key(0), "Bearer a".into(), MINUTE, t0);
        assert_eq!(store.get(&key(0), t0).as_deref(), Some("Bearer a"));
        assert_eq!(store.get(&key(0), t0 + MINUTE), None);
    }

    #[test]
    fn the_largest_tokens_fill_no_more_than_the_byte_budget() {
        let store = TokenStore::default();
        let t0 = Instant::now();
        let token: Arc<str> = "t".repeat(MAX_TOKEN_BYTES).into();
        for i in 0..10 * MAX_TOKENS {
            store.insert(key(i), token.clone(), MINUTE, t0);
            let (entries, bytes) = store.size();
            assert!(entries <= MAX_TOKENS && bytes <= MAX_TOKEN_STORE_BYTES);
        }
        // The newest is kept.
        assert!(store.get(&key(10 * MAX_TOKENS - 1), t0).is_some());
    }

    #[test]
    fn small_tokens_fill_no_more_than_the_entry_bound() {
        let store = TokenStore::default();
        let t0 = Instant::now();
        for i in 0..3 * MAX_TOKENS {
            store.insert(key(i), "Bearer x".into(), MINUTE, t0);
        }
        assert_eq!(store.size().0, MAX_TOKENS);
    }

    #[test]
    fn expired_values_and_older_credentials_are_dropped_first() {
        let store = TokenStore::default();
        let t0 = Instant::now();
        store.insert(key(0), "short".into(), Duration::from_secs(1), t0);
        store.insert(key(1), "long".into(), MINUTE, t0);
        store.insert(key(2), "later".into(), MINUTE, t0 + Duration::from_secs(2));
        assert_eq!(store.size().0, 2);
        let mut newer = key(3);
        newer.2 = 1;
        store.insert(newer.clone(), "new login".into(), MINUTE, t0);
        assert_eq!(store.size().0, 1);
        assert!(store.get(&newer, t0).is_some());
        store.remove(&newer);
        assert_eq!(store.size(), (0, 0));
    }
}
