//! Per-key breakers: a bounded, sharded map with idle eviction.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use http::HeaderMap;
use http::Uri;
use http::uri::Authority;
use tokio::time::Instant;

use crate::breaker::{Breaker, Stripe};
use crate::handle::BreakerHandle;
use crate::state::Policy;

/// Picks the breaker a request belongs to.
///
/// Implemented by [`ByAuthority`] (the default for per-key breakers) and by closures
/// `Fn(&Uri, &HeaderMap) -> Key`.
pub trait ExtractKey<Key> {
    /// The key of a request with this URI and headers.
    fn extract(&self, uri: &Uri, headers: &HeaderMap) -> Key;
}

impl<F, Key> ExtractKey<Key> for F
where
    F: Fn(&Uri, &HeaderMap) -> Key,
{
    fn extract(&self, uri: &Uri, headers: &HeaderMap) -> Key {
        self(uri, headers)
    }
}

/// One breaker per upstream authority (`host:port` of the request URI); requests without an
/// authority share one breaker.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByAuthority;

impl ExtractKey<Option<Authority>> for ByAuthority {
    fn extract(&self, uri: &Uri, _: &HeaderMap) -> Option<Authority> {
        uri.authority().cloned()
    }
}

const SHARDS: usize = 16;

struct Entry<C> {
    stripe: Arc<Stripe<C>>,
    breaker: Arc<Breaker<C>>,
    /// Seconds since the map's base when last used.
    last_used: AtomicU64,
}

#[repr(align(128))]
struct Shard<K, C>(RwLock<HashMap<K, Entry<C>>>);

/// The shared map of one keyed layer.
pub(crate) struct KeyedMap<K, C> {
    shards: Box<[Shard<K, C>]>,
    hasher: RandomState,
    policy: Policy,
    classifier: Arc<C>,
    per_shard: usize,
    idle: Duration,
    base: Instant,
}

impl<K, C> fmt::Debug for KeyedMap<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedMap")
            .field("per_shard", &self.per_shard)
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, C> KeyedMap<K, C> {
    pub(crate) fn new(policy: Policy, classifier: Arc<C>, max_keys: usize, idle: Duration) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Shard(RwLock::new(HashMap::new())))
                .collect(),
            hasher: RandomState::new(),
            policy,
            classifier,
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            idle,
            base: Instant::now(),
        }
    }

    fn shard(&self, key: &K) -> &Shard<K, C> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    fn now_secs(&self) -> u64 {
        self.base.elapsed().as_secs()
    }

    /// The stripe of `key`'s breaker, creating the breaker on first use.
    pub(crate) fn stripe(&self, key: K) -> Arc<Stripe<C>> {
        let shard = self.shard(&key);
        let now = self.now_secs();
        {
            let map = shard.0.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = map.get(&key) {
                // Mostly a read: the word is written at most once a second.
                if e.last_used.load(Relaxed) != now {
                    e.last_used.store(now, Relaxed);
                }
                return e.stripe.clone();
            }
        }
        let mut map = shard.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get(&key) {
            return e.stripe.clone();
        }
        if map.len() >= self.per_shard {
            self.evict(&mut map, now);
        }
        let breaker = Arc::new(Breaker::new(self.policy, self.classifier.clone(), 0));
        let stripe = breaker.stripes[0].clone();
        map.insert(
            key,
            Entry {
                stripe: stripe.clone(),
                breaker,
                last_used: AtomicU64::new(now),
            },
        );
        stripe
    }

    /// Makes room in a full shard: drop every entry idle longer than the idle time; if none
    /// is, drop the least recently used one. O(shard size), only when a new key arrives at a
    /// full shard.
    fn evict(&self, map: &mut HashMap<K, Entry<C>>, now: u64) {
        let idle = self.idle.as_secs();
        map.retain(|_, e| now.saturating_sub(e.last_used.load(Relaxed)) < idle);
        if map.len() >= self.per_shard {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, e)| e.last_used.load(Relaxed))
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        tracing::debug!(target: "steadfast::breaker", kept = map.len(), "evicted idle per-key breakers");
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    pub(crate) fn handle(&self, key: &K) -> Option<BreakerHandle<C>> {
        let map = self
            .shard(key)
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(key).map(|e| BreakerHandle {
            breaker: e.breaker.clone(),
        })
    }
}
