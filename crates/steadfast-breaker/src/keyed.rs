//! Per-key breakers: a bounded, sharded map with idle eviction.

use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{
    AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
    Ordering::SeqCst,
};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use indexmap::IndexMap;
use indexmap::map::RawEntryApiV1;
use indexmap::map::raw_entry_v1::RawEntryMut;
use steadfast_core::__private::thread_number;
use steadfast_core::key::{KeyHashing, UpstreamKey as BreakerKey};
use tokio::time::Instant;

use crate::breaker::{Breaker, Stripe};
use crate::handle::BreakerHandle;
use crate::layer::Initial;
use crate::state::{BreakerState, Listener, Meta, Policy, Transition};
use tokio::sync::broadcast;

const SHARDS: usize = 16;

/// How many entries one insertion into a full shard looks at, at most, for one to evict: the
/// cost of a new key stays O(1) however large the map.
const PROBES: usize = 32;

/// One key's breaker, as the map keeps it.
pub(crate) struct Entry<K, C> {
    /// The map's own copy of the key, made once (see [`UpstreamKey::to_kept`](steadfast_core::key::UpstreamKey::to_kept)).
    key: K,
    /// The breaker's first stripe, which holds the stripes of the other threads that call it
    /// (see [`Stripe::for_thread`]); together they say when it was last used.
    stripe: Arc<Stripe<C>>,
}

/// A service's memo of the last key it looked up and the stripe of that key's breaker that
/// its thread counts on: the next call to the same key through the same instance, on the same
/// thread, takes its breaker from here, without hashing the key, taking the shard's lock or
/// looking at the thread's [`Recent`] keys. Valid while no entry
/// has left the map since the memo was taken (the map's eviction count is what it was then),
/// so a memo never uses a breaker the map has let go of. It holds the breaker weakly: an
/// instance idle after its last call does not keep an evicted breaker (and its subscribers'
/// stream) alive.
pub(crate) struct Memo<K, C> {
    key: K,
    stripe: Weak<Stripe<C>>,
    evictions: u64,
    /// The thread whose stripe `stripe` is (a service may move between threads).
    thread: usize,
}

impl<K: Clone, C> Clone for Memo<K, C> {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            stripe: self.stripe.clone(),
            evictions: self.evictions,
            thread: self.thread,
        }
    }
}

/// An entry a lookup found, with the map's eviction count when it was found.
type Found<K, C> = (Arc<Entry<K, C>>, u64);

/// How many keys each thread remembers, of all keyed maps together.
const RECENT: usize = 4;

/// A key a thread looked up in a map: the map (its [`KeyedMap::id`]), that map's eviction
/// count when the key's entry was found, and a [`Kept`] of that map's types (a copy of the
/// key and its breaker). Valid while the map's eviction count is unchanged: no entry has left
/// the map since, so it is never a breaker the map has let go of. The breaker is held
/// weakly: a thread's memory never keeps one alive, so its subscribers hear it end when the
/// map lets go of it (or the map is dropped), whatever the thread called last. The key's copy
/// stays until the slot is taken by another key or the thread ends.
struct Recent {
    map: u64,
    evictions: u64,
    kept: Box<dyn Any>,
}

/// What a thread keeps of a key it looked up: the key and the stripe its calls count on.
struct Kept<K, C> {
    key: K,
    stripe: Weak<Stripe<C>>,
}

thread_local! {
    /// The keys this thread looked up in a map last (a slot is filled by each lookup in
    /// turn, a stale slot of the same map first; a hit changes nothing), and the slot the
    /// next one takes. Beside each service's own [`Memo`], which misses in two common
    /// shapes: a server clones the service it is given for every request (each clone starts
    /// from an original that never calls), and a balancer calls a different endpoint's key
    /// on consecutive calls.
    static RECENTS: RefCell<([Option<Recent>; RECENT], usize)> =
        const { RefCell::new(([const { None }; RECENT], 0)) };
}

/// Unique ids for the maps, so that an entry this thread remembers from a map that is gone is
/// never taken for one of a map made later (at the same address, perhaps).
static MAP_IDS: AtomicU64 = AtomicU64::new(0);

/// One shard: its breakers in insertion order (so a slot can be reached by index) and the
/// hand of the eviction clock. An entry is the map's key (holding the breaker's key; found
/// by hash and [`BreakerKey::same`], never by the map's own `Hash`), so the key is kept once.
struct Slots<K, C> {
    map: IndexMap<Arc<Entry<K, C>>, (), KeyHashing>,
    hand: usize,
}

#[repr(align(128))]
struct Shard<K, C>(RwLock<Slots<K, C>>);

/// The shared map of one keyed layer.
pub(crate) struct KeyedMap<K, C> {
    shards: Box<[Shard<K, C>]>,
    /// This map's id among all maps of the process (see [`Recent`]).
    id: u64,
    /// The layer's name.
    name: Arc<str>,
    /// The state each new breaker starts in.
    initial: Initial,
    /// Every key's transitions (`subscribe_all`); sent to only while someone listens.
    all: broadcast::Sender<(K, Transition)>,
    /// Whether someone has subscribed to every key's transitions.
    listening: AtomicBool,
    hasher: KeyHashing,
    policy: Arc<Policy>,
    classifier: Arc<C>,
    per_shard: usize,
    idle: Duration,
    base: Instant,
    /// How many entries have left the map (raised under the shard's write lock, after the
    /// removal): a breaker a memo or a thread remembered before an eviction is not used
    /// after it.
    evictions: AtomicU64,
}

impl<K, C> fmt::Debug for KeyedMap<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedMap")
            .field("per_shard", &self.per_shard)
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

/// What the eviction clock makes of one entry.
enum Verdict {
    /// Closed and unused for the idle time: evict now.
    Evict,
    /// Closed but used recently: evict only if nothing better turns up (the oldest, by
    /// seconds since last used).
    Candidate(u64),
    /// Open or half-open and used within the idle time, or put in a state by hand (forced
    /// open, disabled, metrics only): kept, so a flood of new keys cannot reset a breaker
    /// that is protecting its callers, nor undo what an operator did.
    Keep,
}

impl<K: BreakerKey, C> KeyedMap<K, C> {
    pub(crate) fn new(
        name: Arc<str>,
        initial: Initial,
        policy: Policy,
        classifier: Arc<C>,
        max_keys: usize,
        idle: Duration,
    ) -> Self {
        let per_shard = max_keys.div_ceil(SHARDS).max(1);
        // One hasher for the shard and the shard's map: a key is hashed once per call. Seeded
        // per map (`KeyHashing`); a sender who crafts colliding keys costs a scan of one
        // bounded shard at most.
        let hasher = KeyHashing::new();
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Shard(RwLock::new(Slots {
                        map: IndexMap::with_hasher(hasher),
                        hand: 0,
                    }))
                })
                .collect(),
            id: MAP_IDS.fetch_add(1, Relaxed),
            name,
            initial,
            all: broadcast::channel(256).0,
            listening: AtomicBool::new(false),
            hasher,
            policy: Arc::new(policy),
            classifier,
            per_shard,
            idle,
            base: Instant::now(),
            evictions: AtomicU64::new(0),
        }
    }

    /// A key's hash and its shard. The shard comes from bits the shard's map does not use
    /// to place entries (it uses the lowest bits for the bucket and the highest seven for
    /// the tag), so the keys of one shard still spread over its buckets.
    fn shard(&self, key: &K) -> (u64, &Shard<K, C>) {
        let mut hasher = self.hasher.build_hasher();
        key.hash_key(&mut hasher);
        let hash = hasher.finish();
        (hash, &self.shards[(hash >> 32) as usize % SHARDS])
    }

    fn now_secs(&self) -> u64 {
        // Inside a timeout's call, the instant it just read (a second's grain is all this
        // needs): no clock read of its own.
        let now = steadfast_core::Deadline::call_now().unwrap_or_else(Instant::now);
        now.saturating_duration_since(self.base).as_secs()
    }

    fn new_stripe(&self, key: &K, now: u64) -> Arc<Stripe<C>> {
        let meta = Meta::new(self.name.clone(), Arc::from(key.name()));
        let stripe = Breaker::keyed(self.policy.clone(), self.classifier.clone(), meta, now);
        self.initial.apply(&stripe.shared);
        stripe
    }

    /// Has `key`'s breaker send its transitions to `subscribe_all`'s channel (made only once
    /// someone subscribed: an unwatched breaker keeps no closure and no key copy). The
    /// breaker holds the channel weakly: subscribers see it end when the map goes, whatever
    /// still holds one of its breakers (a handle, a call in flight).
    fn attach(&self, key: &K, stripe: &Stripe<C>) {
        stripe.shared.meta.listen(|| {
            let all = self.all.downgrade();
            let owned = key.clone();
            Box::new(move |t: &Transition| {
                let Some(all) = all.upgrade() else { return };
                if all.receiver_count() > 0 {
                    let _ = all.send((owned.clone(), t.clone()));
                }
            }) as Listener
        });
    }

    /// The first stripe of `key`'s breaker (a handle's view of it), creating the breaker on
    /// first use.
    pub(crate) fn stripe(&self, key: K) -> Arc<Stripe<C>> {
        self.lookup(key, self.now_secs()).0
    }

    /// The stripe of `key`'s breaker that a call on this thread counts on: from `memo` when it
    /// holds `key`, was filled on this thread, no entry has left the map since and its
    /// breaker is alive; else from this thread's memory on the same terms (re-pointing a
    /// memo of `key` filled on another thread at this thread's stripe); else from the map
    /// (creating the breaker on first use). A breaker found in the map is left in `memo`
    /// and in this thread's memory, when the map keeps it.
    #[inline]
    pub(crate) fn stripe_memo(&self, key: K, memo: &mut Option<Memo<K, C>>) -> Arc<Stripe<C>>
    where
        C: 'static,
    {
        let t = thread_number();
        // The instance called this key last on another thread (it moved): the stripe it
        // remembers is that thread's.
        let mut moved = None;
        if let Some(m) = memo {
            // The count only grows: a load sees every eviction that happened before it.
            if m.key.same(&key) && self.evictions.load(Acquire) == m.evictions {
                if m.thread != t {
                    moved = Some(m);
                } else if let Some(stripe) = m.stripe.upgrade() {
                    stripe.touch(self.now_secs());
                    return stripe;
                }
            }
        }
        if let Some(stripe) = self.recent(&key) {
            if let Some(m) = moved {
                // Its next calls from this thread take this thread's stripe from the memo.
                (m.stripe, m.thread) = (Arc::downgrade(&stripe), t);
            }
            return stripe;
        }
        let now = self.now_secs();
        let (main, found) = self.lookup(key, now);
        let Some((entry, evictions)) = found else {
            *memo = None;
            return main;
        };
        let stripe = main.for_thread(t, now);
        self.remember(&entry.key, &stripe, evictions);
        *memo = Some(Memo {
            key: entry.key.clone(),
            stripe: Arc::downgrade(&stripe),
            evictions,
            thread: t,
        });
        stripe
    }

    /// `key`'s stripe, if this thread remembers it, no entry has left the map since and its
    /// breaker is alive.
    #[inline]
    fn recent(&self, key: &K) -> Option<Arc<Stripe<C>>>
    where
        C: 'static,
    {
        let stripe = RECENTS
            .try_with(|r| {
                // Borrowed mutably only while `remember` fills a slot, where a key's `Clone`
                // (the application's code) may call a per-key layer; then the map answers.
                let r = r.try_borrow().ok()?;
                r.0.iter().flatten().find_map(|slot| {
                    if slot.map != self.id {
                        return None;
                    }
                    let kept = slot.kept.downcast_ref::<Kept<K, C>>()?;
                    if !kept.key.same(key) {
                        return None;
                    }
                    // After the key's `same` (the application's code, which may call this
                    // map): the count only grows, so this load sees every eviction before it.
                    if self.evictions.load(Acquire) != slot.evictions {
                        return None;
                    }
                    kept.stripe.upgrade()
                })
            })
            .ok()
            .flatten()?;
        stripe.touch(self.now_secs());
        Some(stripe)
    }

    /// Has this thread remember `key` and the stripe its calls on this thread count on, found
    /// when the map's eviction count was `evictions`: in a slot of this map's that an
    /// eviction made stale, else in the next slot in turn.
    #[cold]
    fn remember(&self, key: &K, stripe: &Arc<Stripe<C>>, evictions: u64)
    where
        C: 'static,
    {
        // What this replaces is dropped after the borrow ends (a key's drop is the
        // application's code).
        let _replaced = RECENTS.try_with(|r| {
            let mut r = r.try_borrow_mut().ok()?;
            let (slots, next) = &mut *r;
            let stale = slots.iter().position(|s| {
                s.as_ref()
                    .is_some_and(|s| s.map == self.id && s.evictions != evictions)
            });
            let i = stale.unwrap_or_else(|| {
                let i = *next;
                *next = (i + 1) % RECENT;
                i
            });
            let fresh = Kept {
                key: key.clone(),
                stripe: Arc::downgrade(stripe),
            };
            if let Some(slot) = &mut slots[i] {
                if let Some(kept) = slot.kept.downcast_mut::<Kept<K, C>>() {
                    // A slot of the same types: its box is reused (no allocation per miss
                    // when a thread calls more keys in turn than it remembers).
                    let old = std::mem::replace(kept, fresh);
                    (slot.map, slot.evictions) = (self.id, evictions);
                    return Some((Some(old), None));
                }
            }
            let old = slots[i].replace(Recent {
                map: self.id,
                evictions,
                kept: Box::new(fresh),
            });
            Some((None, old))
        });
    }

    /// The first stripe of `key`'s breaker and, when the map keeps it, its entry with the
    /// map's eviction count when it was found; `now` in seconds since the map's base.
    fn lookup(&self, key: K, now: u64) -> (Arc<Stripe<C>>, Option<Found<K, C>>) {
        // Counted under the lock of the entry's shard: no eviction of the entry can happen
        // until the lock is released, so any later one raises the count past what is taken
        // here (evictions from other shards only make it stale sooner).
        let found = |entry: &Arc<Entry<K, C>>| (entry.clone(), self.evictions.load(Acquire));
        let (hash, shard) = self.shard(&key);
        {
            let slots = shard.0.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((e, _)) = slots
                .map
                .raw_entry_v1()
                .from_hash(hash, |e| e.key.same(&key))
            {
                e.stripe.touch(now);
                return (e.stripe.clone(), Some(found(e)));
            }
        }
        // Declared before the lock's guard, so dropped after it: an evicted entry's drop runs
        // its key's (the application's code), which may call this map.
        let mut _evicted = None;
        let mut slots = shard.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some((e, _)) = slots
            .map
            .raw_entry_v1()
            .from_hash(hash, |e| e.key.same(&key))
        {
            e.stripe.touch(now);
            return (e.stripe.clone(), Some(found(e)));
        }
        let stripe = self.new_stripe(&key, now);
        // Under the shard's lock: `subscribe_all` either sees this breaker in the map or has
        // already raised the flag.
        if self.listening.load(SeqCst) {
            self.attach(&key, &stripe);
        }
        if slots.map.len() >= self.per_shard {
            _evicted = self.evict_one(&mut slots, now);
        }
        if slots.map.len() >= self.per_shard {
            // Every breaker this shard looked at is protecting its callers: the new key gets
            // a breaker of its own for this call, not kept (memory stays bounded; see
            // `max_keys`), and not remembered either.
            tracing::debug!(target: "steadfast::breaker", "per-key breakers full of open breakers; not keeping a new key");
            #[cfg(feature = "metrics")]
            crate::state::record_gone(&stripe.shared.meta, stripe.shared.state());
            return (stripe, None);
        }
        let entry = Arc::new(Entry {
            key: key.to_kept(),
            stripe: stripe.clone(),
        });
        // After any eviction this insertion made: good for the next call.
        let kept = found(&entry);
        if let RawEntryMut::Vacant(v) = slots.map.raw_entry_mut_v1().from_hash(hash, |_| false) {
            // Placed by the same hash it is looked up by (`BreakerKey::hash_key`).
            v.insert_hashed_nocheck(hash, entry, ());
        }
        (stripe, Some(kept))
    }

    fn verdict(&self, e: &Entry<K, C>, now: u64) -> Verdict {
        let age = e.stripe.age(now);
        // Durations under a second count as "any age" (the clock here ticks in seconds).
        let idle = age >= self.idle.as_secs();
        match e.stripe.shared.state() {
            // Set by hand through a handle: kept for as long as the layer lives.
            BreakerState::ForcedOpen | BreakerState::Disabled | BreakerState::MetricsOnly => {
                Verdict::Keep
            }
            BreakerState::Open | BreakerState::HalfOpen if !idle => Verdict::Keep,
            _ if idle => Verdict::Evict,
            _ => Verdict::Candidate(age),
        }
    }

    /// Makes room for one entry in a full shard: a CLOCK hand looks at up to [`PROBES`]
    /// entries from where it stopped last time, evicts the first idle one, else the least
    /// recently used Closed one it saw, and hands it back (for the caller to drop once the
    /// shard's lock is released). `None` when everything it saw must be kept.
    fn evict_one(&self, slots: &mut Slots<K, C>, now: u64) -> Option<Arc<Entry<K, C>>> {
        let len = slots.map.len();
        let mut best: Option<(usize, u64)> = None;
        let mut victim = None;
        for _ in 0..PROBES.min(len) {
            if slots.hand >= len {
                slots.hand = 0;
            }
            let i = slots.hand;
            slots.hand += 1;
            let Some((e, _)) = slots.map.get_index(i) else {
                continue;
            };
            match self.verdict(e, now) {
                Verdict::Evict => {
                    victim = Some(i);
                    break;
                }
                Verdict::Candidate(age) => {
                    if best.is_none_or(|(_, b)| age > b) {
                        best = Some((i, age));
                    }
                }
                Verdict::Keep => {}
            }
        }
        let i = victim.or(best.map(|(i, _)| i))?;
        // The last entry moves into the hole: the hand looks at it next.
        #[cfg(feature = "metrics")]
        if let Some((e, _)) = slots.map.get_index(i) {
            // Its state series ends at 0: no breaker of the layer is in that state for this
            // upstream now (a breaker made for it later starts its own at 1).
            let shared = &e.stripe.shared;
            crate::state::record_gone(&shared.meta, shared.state());
        }
        let (removed, ()) = slots.map.swap_remove_index(i)?;
        slots.hand = i;
        // After the removal, under the shard's write lock: every memo and thread's memory of
        // the removed entry took the count under this shard's lock before, a smaller one.
        self.evictions.fetch_add(1, Release);
        Some(removed)
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.read().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    /// The handle of `key`'s breaker, made now if it does not exist yet.
    pub(crate) fn handle(&self, key: &K) -> BreakerHandle<C> {
        BreakerHandle {
            breaker: Arc::new(Breaker::of_stripe(self.stripe(key.clone()))),
        }
    }

    /// The keys that have a breaker now.
    pub(crate) fn keys(&self) -> Vec<K> {
        self.shards
            .iter()
            .flat_map(|s| {
                let slots = s.0.read().unwrap_or_else(PoisonError::into_inner);
                slots.map.keys().map(|e| e.key.clone()).collect::<Vec<_>>()
            })
            .collect()
    }

    pub(crate) fn subscribe_all(&self) -> broadcast::Receiver<(K, Transition)> {
        let rx = self.all.subscribe();
        self.listening.store(true, SeqCst);
        for shard in self.shards.iter() {
            let slots = shard.0.read().unwrap_or_else(PoisonError::into_inner);
            for entry in slots.map.keys() {
                self.attach(&entry.key, &entry.stripe);
            }
        }
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::OpenTime;

    fn map(max_keys: usize) -> KeyedMap<String, ()> {
        let policy = Policy {
            consecutive: Some(5),
            window: None,
            min_calls: 1,
            failure_rate: None,
            slow: None,
            open_time: Duration::from_secs(30),
            max_open_time: Duration::from_secs(30),
            open_time_fn: OpenTime::Exponential { factor: 2.0 },
            max_half_open_wait: None,
            auto_half_open: false,
            jitter_percent: 0,
            probes: 1,
            seed: 0,
        };
        KeyedMap::new(
            Arc::from("test"),
            Initial::Closed,
            policy,
            Arc::new(()),
            max_keys,
            Duration::from_secs(600),
        )
    }

    /// A call's stripe through a fresh instance (no memo of its own), as from a service
    /// cloned per request.
    fn for_call(map: &KeyedMap<String, ()>, key: String) -> Arc<Stripe<()>> {
        map.stripe_memo(key, &mut None)
    }

    /// What this thread remembers of `map`'s entry for `key`: its stripe and the eviction
    /// count it was found at.
    fn remembered(map: &KeyedMap<String, ()>, key: &str) -> Option<(Arc<Stripe<()>>, u64)> {
        RECENTS.with_borrow(|(slots, _)| {
            slots.iter().flatten().find_map(|slot| {
                let kept = slot.kept.downcast_ref::<Kept<String, ()>>()?;
                let stripe = kept.stripe.upgrade()?;
                (slot.map == map.id && kept.key == key).then_some((stripe, slot.evictions))
            })
        })
    }

    /// The entry a lookup leaves with the thread is good for the next call even when the
    /// lookup itself made room by evicting (the count is taken after the eviction, under the
    /// shard's lock), and is not used after any later eviction.
    #[tokio::test(start_paused = true)]
    async fn a_remembered_entry_is_valid_until_the_next_eviction() {
        let map = map(16); // one breaker per shard
        let count = || map.evictions.load(Relaxed);
        let mut i = 0;
        while count() == 0 {
            assert!(i < 10_000, "no shard ever filled");
            for_call(&map, format!("k{i}"));
            i += 1;
        }
        // The key whose insertion evicted: remembered with the count after its eviction.
        let last = format!("k{}", i - 1);
        let (kept, evictions) = remembered(&map, &last).expect("a kept key is remembered");
        assert_eq!(evictions, count(), "taken after the eviction");
        let hit = for_call(&map, last.clone());
        assert!(Arc::ptr_eq(&hit, &kept));

        // Another insertion's eviction makes it stale: the next call looks the key up again,
        // and gets the same breaker if the map still holds it, else a new one.
        while count() == evictions {
            assert!(i < 20_000, "no second eviction");
            for_call(&map, format!("k{i}"));
            i += 1;
        }
        let still = map.keys().contains(&last);
        let again = for_call(&map, last.clone());
        let (_, now_kept) = remembered(&map, &last).expect("looked up and remembered again");
        assert_eq!(now_kept, count(), "looked up again");
        assert_eq!(Arc::ptr_eq(&again, &kept), still);
    }

    /// Two maps of the same types never answer for each other, however their entries sit in
    /// the thread's slots; a map made after another is dropped does not see its entries.
    #[tokio::test(start_paused = true)]
    async fn maps_do_not_share_remembered_entries() {
        let a = map(64);
        let b = map(64);
        let from_a = for_call(&a, "orders".to_owned());
        let from_b = for_call(&b, "orders".to_owned());
        assert!(!Arc::ptr_eq(&from_a, &from_b));
        assert!(Arc::ptr_eq(&for_call(&a, "orders".to_owned()), &from_a));
        assert!(Arc::ptr_eq(&for_call(&b, "orders".to_owned()), &from_b));
        drop(a);
        let c = map(64);
        let from_c = for_call(&c, "orders".to_owned());
        assert!(!Arc::ptr_eq(&from_c, &from_a));
        assert_eq!(c.len(), 1, "made in c's own map");
    }

    /// A thread number below [`STRIPES`](crate::breaker::STRIPES) that counts on a stripe of
    /// its own for `main`'s key, and is not the calling thread.
    fn another_thread(main: &Arc<Stripe<()>>) -> usize {
        let me = thread_number();
        (0..crate::breaker::STRIPES)
            .find(|&t| t != me && !Arc::ptr_eq(&main.for_thread(t, 0), main))
            .expect("at most the maker and this thread are excluded")
    }

    /// A key that only other threads than its breaker's maker call is in use: the eviction
    /// clock reads when each thread's stripe was last used, not only the first stripe's.
    #[tokio::test(start_paused = true)]
    async fn a_key_only_other_threads_call_is_not_idle() {
        let map = map(64);
        let (main, found) = map.lookup("orders".to_owned(), 0);
        let (entry, _) = found.expect("kept");
        let local = main.for_thread(another_thread(&main), 0);
        let idle = map.idle.as_secs();
        assert!(matches!(map.verdict(&entry, idle + 10), Verdict::Evict));
        local.touch(idle + 5);
        assert!(
            matches!(map.verdict(&entry, idle + 10), Verdict::Candidate(5)),
            "used 5 s ago by another thread"
        );
    }

    /// A service's memo filled on one thread (its stripe exclusive to that thread, or shared
    /// by that thread's group of later threads) is not used on another: the call there
    /// counts on a stripe of the calling thread's, and the memo takes that one for the next
    /// calls.
    #[tokio::test(start_paused = true)]
    async fn a_memo_from_another_thread_is_not_counted_on() {
        let map = map(64);
        let key = "orders".to_owned();
        let (main, found) = map.lookup(key.clone(), 0);
        let (_, evictions) = found.expect("kept");
        let me = crate::breaker::slot(thread_number());
        let stripes = crate::breaker::STRIPES;
        let late = (stripes..2 * stripes)
            .find(|&t| crate::breaker::slot(t) != me)
            .expect("eight groups");
        for other in [another_thread(&main), late] {
            memo_from(&map, &key, &main, evictions, other);
        }
    }

    /// [`a_memo_from_another_thread_is_not_counted_on`] for a memo filled on thread `other`.
    fn memo_from(
        map: &KeyedMap<String, ()>,
        key: &str,
        main: &Arc<Stripe<()>>,
        evictions: u64,
        other: usize,
    ) {
        let theirs = main.for_thread(other, 0);
        let mut memo = Some(Memo {
            key: key.to_owned(),
            stripe: Arc::downgrade(&theirs),
            evictions,
            thread: other,
        });
        // Once through the map (the first time), then through this thread's memory.
        for _ in 0..2 {
            let got = map.stripe_memo(key.to_owned(), &mut memo);
            assert!(!Arc::ptr_eq(&got, &theirs));
            assert!(Arc::ptr_eq(&got, &main.for_thread(thread_number(), 0)));
            let m = memo.as_mut().expect("filled");
            assert_eq!(m.thread, thread_number());
            assert!(Arc::ptr_eq(&m.stripe.upgrade().expect("alive"), &got));
            // As if the instance moved again.
            (m.stripe, m.thread) = (Arc::downgrade(&theirs), other);
        }
    }
}
