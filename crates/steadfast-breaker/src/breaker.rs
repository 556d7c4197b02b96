//! One breaker: shared state plus per-thread stripes for metrics and references.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use once_cell::race::OnceBox;

use steadfast_core::__private::thread_number;

use crate::error::BreakerOpen;
use crate::state::{Meta, Permit, Policy, Shared};

/// How many threads get a stripe of their own in a breaker (standalone or per key); the
/// threads after them share as many more, spread by thread number.
pub(crate) const STRIPES: usize = 8;

/// A per-key breaker's stripes, one per [`slot`]: one for each thread number below
/// [`STRIPES`], then [`STRIPES`] that later threads share. The slot of the thread that made
/// the breaker stays empty: that thread counts on the first stripe.
type Locals<C> = [OnceLock<Arc<Stripe<C>>>; 2 * STRIPES];

/// A stripe that belongs to no slot (`Stripe::owner`): a standalone breaker's shared ones.
const NO_OWNER: u8 = u8::MAX;
const _: () = assert!(2 * STRIPES < NO_OWNER as usize);

/// The per-key stripe slot of thread number `t`: its own below [`STRIPES`], else one of
/// [`STRIPES`] more that later threads share by thread number.
#[inline]
pub(crate) fn slot(t: usize) -> usize {
    if t < STRIPES {
        t
    } else {
        STRIPES + (t - STRIPES) % STRIPES
    }
}

/// The lowest 32 bits of a count of seconds (ages are taken on them, wrapping).
#[inline]
fn low_bits(secs: u64) -> u32 {
    secs as u32
}

/// Whether second `a` is after second `b`, both the lowest 32 bits of a count (wrapping:
/// within 2^31 seconds, 68 years).
#[inline]
fn is_ahead(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d <= u32::MAX / 2
}

/// Per-thread slice of a breaker: what a call writes on the happy path lives here, on a cache
/// line no other thread writes, so two workers sharing one breaker do not contend.
///
/// A response future holds an `Arc<Stripe<C>>` (its thread's stripe), so the reference count
/// it touches is also per thread.
///
/// An *exclusive* stripe belongs to one thread for the life of the process (thread numbers
/// are never reused), so the admission counters (`calls`, `rejected`) are bumped there with a
/// plain load and store instead of a locked read-modify-write. Outcome counters (`failures`,
/// `slow`) are written by whichever thread completes the call, so they always use
/// `fetch_add`.
#[repr(align(64))]
#[derive(Debug)]
pub(crate) struct Stripe<C> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) classifier: Arc<C>,
    pub(crate) calls: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) slow: AtomicU64,
    pub(crate) rejected: AtomicU64,
    /// Whose calls count here: below [`STRIPES`], the one thread of that number (the stripe
    /// is exclusive to it); from [`STRIPES`] to `2 * STRIPES`, the later threads of that
    /// [`slot`]; [`NO_OWNER`], any thread (a standalone breaker's shared stripes).
    owner: u8,
    /// Whether calls must be timed (slow-call policy or time window): read here, on the
    /// line the call already touches, instead of from the shared policy.
    pub(crate) timed: bool,
    /// Whether the policy itself needs the durations (slow calls, a rate window); when only
    /// the `metrics` feature's histogram does, a success that changes nothing is still
    /// settled inline.
    pub(crate) policy_timed: bool,
    /// For a breaker of a per-key map: when last used, in seconds since the map's base, the
    /// lowest 32 bits (for idle eviction; see [`age`](Self::age)). Here, not in the map's
    /// entry, so that a call can take all it needs from the stripe alone (see the map's
    /// per-thread memory).
    last_used: AtomicU32,
    /// For a per-key breaker's first stripe: the stripes of the other threads that called it,
    /// each made at that thread's first call (see [`for_thread`](Self::for_thread)). One
    /// word, so that with the 32-bit `last_used` a stripe stays one cache line.
    locals: OnceBox<Locals<C>>,
}

impl<C> Stripe<C> {
    /// A stripe of `shared`'s breaker, its counts at zero, for `owner` (see
    /// [`owner`](Self::owner); `None`: any thread), last used `now` (seconds since a per-key
    /// map's base).
    fn new(shared: Arc<Shared>, classifier: Arc<C>, owner: Option<usize>, now: u64) -> Self {
        let owner = owner.and_then(|t| u8::try_from(t).ok()).unwrap_or(NO_OWNER);
        debug_assert!(owner == NO_OWNER || usize::from(owner) < 2 * STRIPES);
        Self {
            timed: shared.needs_clock(),
            policy_timed: shared.policy_needs_clock(),
            shared,
            classifier,
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            owner,
            last_used: AtomicU32::new(low_bits(now)),
            locals: OnceBox::new(),
        }
    }

    /// Whether one thread alone counts admissions here (plain stores, see [`count`](Self::count)).
    #[inline]
    fn exclusive(&self) -> bool {
        usize::from(self.owner) < STRIPES
    }

    /// Marks a per-key breaker used at `now`, seconds since its map's base (mostly a read:
    /// the word is written at most once a second). The stamp only moves forward (wrapping,
    /// as [`age`](Self::age) reads it): a caller that read its clock before another thread
    /// stored a later second does not put it back, which would make a breaker in use look
    /// idle for as long as that caller was held up.
    #[inline]
    pub(crate) fn touch(&self, now: u64) {
        let now = low_bits(now);
        let mut old = self.last_used.load(Relaxed);
        while is_ahead(now, old) {
            match self
                .last_used
                .compare_exchange_weak(old, now, Relaxed, Relaxed)
            {
                Ok(_) => return,
                Err(seen) => old = seen,
            }
        }
    }

    /// How long ago, at `now` (seconds since the map's base), a per-key breaker was last
    /// used by any thread: its first stripe and its threads' stripes each say when they were.
    ///
    /// Taken on the lowest 32 bits of both, wrapping, so it is exact for any age under 2^31
    /// seconds (68 years) however long the process has run. A stamp ahead of `now` (another
    /// thread touched it after `now` was read) is used now: age 0.
    pub(crate) fn age(&self, now: u64) -> u64 {
        let now = low_bits(now);
        let since = |s: &Stripe<C>| {
            let last = s.last_used.load(Relaxed);
            if is_ahead(last, now) {
                0
            } else {
                now.wrapping_sub(last)
            }
        };
        u64::from(self.others().map(|s| since(s)).fold(since(self), u32::min))
    }

    /// The threads' stripes made from this one (a per-key breaker's first stripe).
    fn others(&self) -> impl Iterator<Item = &Arc<Stripe<C>>> {
        self.locals
            .get()
            .into_iter()
            .flat_map(|l| l.iter().filter_map(OnceLock::get))
    }

    /// The stripe thread number `t`'s calls count on, for a per-key breaker whose first
    /// stripe this is; made now (last used `now`) at the first call that needs it. One per
    /// [`slot`]: each of the first [`STRIPES`] threads has one of its own (exclusive), later
    /// threads share [`STRIPES`] more by thread number, as a standalone breaker's threads
    /// do. The first stripe is the one of the slot of the thread that made the breaker.
    ///
    /// So a key that only the thread that made it calls has one stripe, whatever that
    /// thread's number; at most `2 * STRIPES - 1` more, and their table, are made for a key
    /// many threads call.
    pub(crate) fn for_thread(self: &Arc<Self>, t: usize, now: u64) -> Arc<Stripe<C>> {
        let i = slot(t);
        if usize::from(self.owner) == i {
            return self.clone();
        }
        let locals = self
            .locals
            .get_or_init(|| Box::new([const { OnceLock::new() }; 2 * STRIPES]));
        locals[i]
            .get_or_init(|| {
                Arc::new(Stripe::new(
                    self.shared.clone(),
                    self.classifier.clone(),
                    Some(i),
                    now,
                ))
            })
            .clone()
    }

    /// The one admission path of every breaker variant (plain, per-key, answering): asks the
    /// state machine, and counts the decision (and reports a rejection) on this stripe.
    #[inline]
    pub(crate) fn admit(&self) -> Result<Permit, BreakerOpen> {
        match self.shared.admit() {
            Ok(permit) => {
                self.count(&self.calls);
                Ok(permit)
            }
            Err(open) => Err(self.rejected(open)),
        }
    }

    #[cold]
    fn rejected(&self, open: BreakerOpen) -> BreakerOpen {
        self.count(&self.rejected);
        #[cfg(feature = "metrics")]
        self.shared
            .meta
            .rejected
            .get_or_init(|| {
                let meta = &self.shared.meta;
                metrics::counter!(
                    "steadfast_breaker_rejected_total",
                    "breaker" => metrics::SharedString::from(meta.breaker.clone()),
                    "upstream" => metrics::SharedString::from(meta.upstream.clone())
                )
            })
            .increment(1);
        open
    }

    /// Counts one admission decision in `counter` (`calls` or `rejected`); only called on
    /// the thread that [`Breaker::stripe`], [`Breaker::keyed`] or
    /// [`for_thread`](Self::for_thread) picked this stripe for.
    #[inline]
    pub(crate) fn count(&self, counter: &AtomicU64) {
        debug_assert!(
            !self.exclusive() || usize::from(self.owner) == thread_number(),
            "an exclusive stripe counted on by another thread"
        );
        if self.exclusive() {
            counter.store(counter.load(Relaxed).wrapping_add(1), Relaxed);
        } else {
            counter.fetch_add(1, Relaxed);
        }
    }
}

/// A breaker: its shared state and its stripes.
#[derive(Debug)]
pub(crate) struct Breaker<C> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) stripes: Box<[Arc<Stripe<C>>]>,
    /// How many of `stripes` (the first ones) are exclusive.
    exclusive: usize,
}

impl<C> Breaker<C> {
    /// A breaker whose first `exclusive` threads get a stripe each; later threads share
    /// `exclusive.max(1)` more stripes, picked by thread number (with `exclusive = 0`, one
    /// shared stripe is all there is).
    pub(crate) fn new(
        policy: Arc<Policy>,
        classifier: Arc<C>,
        exclusive: usize,
        meta: Meta,
    ) -> Self {
        let shared = Self::new_shared(policy, meta);
        let stripes = (0..exclusive + exclusive.max(1))
            .map(|i| {
                let owner = (i < exclusive).then_some(i);
                Arc::new(Stripe::new(shared.clone(), classifier.clone(), owner, 0))
            })
            .collect();
        Self {
            shared,
            stripes,
            exclusive,
        }
    }

    /// A breaker's state machine.
    fn new_shared(policy: Arc<Policy>, meta: Meta) -> Arc<Shared> {
        let shared = Arc::new_cyclic(|me| {
            let mut meta = meta;
            meta.me = me.clone();
            Shared::new(policy, meta)
        });
        #[cfg(feature = "metrics")]
        crate::state::record_state(
            &shared.meta,
            crate::BreakerState::Closed,
            crate::BreakerState::Closed,
        );
        shared
    }

    /// A per-key breaker, made by the calling thread at `now` (seconds since the map's base):
    /// its first stripe, the one of that thread's [`slot`] (exclusive to it if it is one of
    /// the first [`STRIPES`]; other threads get stripes of theirs, see
    /// [`Stripe::for_thread`]).
    pub(crate) fn keyed(
        policy: Arc<Policy>,
        classifier: Arc<C>,
        meta: Meta,
        now: u64,
    ) -> Arc<Stripe<C>> {
        Arc::new(Stripe::new(
            Self::new_shared(policy, meta),
            classifier,
            Some(slot(thread_number())),
            now,
        ))
    }

    /// A handle's view of a per-key breaker, from its first stripe: its state and its totals
    /// (every thread's stripe), never [`stripe`](Self::stripe), which would give every
    /// thread the first stripe (exclusive to the thread that made the breaker).
    pub(crate) fn of_stripe(stripe: Arc<Stripe<C>>) -> Self {
        Self {
            shared: stripe.shared.clone(),
            stripes: Box::new([stripe]),
            exclusive: 0,
        }
    }

    /// This thread's stripe.
    #[inline]
    pub(crate) fn stripe(&self) -> &Arc<Stripe<C>> {
        let exclusive = self.exclusive;
        let i = thread_number();
        if i < exclusive {
            &self.stripes[i]
        } else {
            // Shared stripes; consecutive thread numbers land on different ones.
            &self.stripes[exclusive + (i - exclusive) % (self.stripes.len() - exclusive)]
        }
    }

    /// Sums the striped counters (a per-key breaker's threads' stripes included).
    pub(crate) fn totals(&self) -> [u64; 4] {
        let mut t = [0; 4];
        for s in self
            .stripes
            .iter()
            .flat_map(|s| std::iter::once(s).chain(s.others()))
        {
            t[0] += s.calls.load(Relaxed);
            t[1] += s.failures.load(Relaxed);
            t[2] += s.slow.load(Relaxed);
            t[3] += s.rejected.load(Relaxed);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Policy;
    use std::time::Duration;

    fn policy() -> Policy {
        Policy {
            consecutive: None,
            window: None,
            min_calls: 1,
            failure_rate: None,
            slow: None,
            open_time: Duration::from_secs(30),
            max_open_time: Duration::from_secs(30),
            open_time_fn: crate::state::OpenTime::Exponential { factor: 2.0 },
            max_half_open_wait: None,
            auto_half_open: false,
            jitter_percent: 0,
            probes: 1,
            seed: 0,
        }
    }

    /// More threads than exclusive stripes, each counting on the stripe it is given: the
    /// totals are exact (exclusive stripes have one writer; the rest share an atomic one).
    #[test]
    fn admission_counts_are_exact_with_more_threads_than_stripes() {
        let breaker = Arc::new(Breaker::new(
            Arc::new(policy()),
            Arc::new(()),
            2,
            Meta::default(),
        ));
        const THREADS: u64 = 6;
        const CALLS: u64 = 20_000;
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                let b = breaker.clone();
                s.spawn(move || {
                    for i in 0..CALLS {
                        let stripe = b.stripe();
                        if i % 4 == 0 {
                            stripe.count(&stripe.rejected);
                        } else {
                            stripe.count(&stripe.calls);
                        }
                    }
                });
            }
        });
        let [calls, _, _, rejected] = breaker.totals();
        assert_eq!(calls + rejected, THREADS * CALLS);
        assert_eq!(rejected, THREADS * CALLS / 4);
        // Four stripes: two of them exclusive, two shared.
        assert_eq!(breaker.stripes.len(), 4);
        assert!(breaker.stripes[..2].iter().all(|s| s.exclusive()));
        assert!(breaker.stripes[2..].iter().all(|s| !s.exclusive()));
    }

    /// A per-key breaker's first stripe, as thread number `t` makes it.
    fn made_by(t: usize) -> Arc<Stripe<()>> {
        let mut stripe = Breaker::keyed(Arc::new(policy()), Arc::new(()), Meta::default(), 0);
        Arc::get_mut(&mut stripe).expect("unique").owner = slot(t) as u8;
        stripe
    }

    /// Counts `n` admissions on `stripe` as its own thread would (a test thread is not it).
    fn count_n(stripe: &Stripe<()>, n: u64) {
        stripe.calls.fetch_add(n, Relaxed);
    }

    /// The thread that makes a per-key breaker counts on its first stripe, whatever its
    /// number; no other stripe is made until another thread calls.
    #[test]
    fn the_maker_of_a_per_key_breaker_counts_on_its_first_stripe() {
        let check = || {
            let t = thread_number();
            let s = Breaker::keyed(Arc::new(policy()), Arc::new(()), Meta::default(), 0);
            assert!(Arc::ptr_eq(&s.for_thread(t, 0), &s), "thread {t}");
            assert_eq!(s.exclusive(), t < STRIPES);
            assert!(s.locals.get().is_none());
            // Counted on by its maker: the debug check in `count` holds.
            s.admit().expect("closed");
            assert_eq!(Breaker::of_stripe(s).totals(), [1, 0, 0, 0]);
            t
        };
        check();
        // Threads until one is numbered past the first stripes' (numbers are never reused).
        let mut late = 0;
        while late < STRIPES {
            late = std::thread::spawn(check).join().expect("no panic");
        }
    }

    /// The thread that made a per-key breaker counts on its first stripe, exclusively; each
    /// of the other first threads gets a stripe of its own, made once and exclusive to it;
    /// later threads share more, by thread number. The handle's totals sum them all.
    #[test]
    fn a_per_key_breaker_gives_each_thread_a_stripe_of_its_own() {
        let main = made_by(3);
        assert!(main.exclusive());
        assert!(Arc::ptr_eq(&main.for_thread(3, 0), &main), "the maker");
        assert!(
            main.locals.get().is_none(),
            "made only when another thread calls"
        );

        let one = main.for_thread(1, 7);
        let five = main.for_thread(5, 9);
        assert!(!Arc::ptr_eq(&one, &main) && !Arc::ptr_eq(&one, &five));
        assert!(Arc::ptr_eq(&main.for_thread(1, 50), &one), "made once");
        assert!(Arc::ptr_eq(&one.shared, &main.shared), "one state machine");
        assert_eq!((one.owner, five.owner), (1, 5));
        assert_eq!(
            (one.last_used.load(Relaxed), five.last_used.load(Relaxed)),
            (7, 9)
        );
        // Later threads: shared stripes, consecutive numbers on different ones.
        let late = main.for_thread(STRIPES, 11);
        let later = main.for_thread(STRIPES + 1, 0);
        assert!(!late.exclusive() && !later.exclusive() && !Arc::ptr_eq(&late, &later));
        assert!(Arc::ptr_eq(&main.for_thread(2 * STRIPES, 0), &late));
        assert!(
            !Arc::ptr_eq(&main.for_thread(255, 0), &main),
            "not the maker's"
        );

        for (stripe, n) in [(&main, 2), (&one, 3), (&five, 4), (&late, 5)] {
            count_n(stripe, n);
        }
        one.failures.fetch_add(1, Relaxed);
        five.slow.fetch_add(2, Relaxed);
        late.failures.fetch_add(3, Relaxed);
        let handle = Breaker::of_stripe(main.clone());
        assert_eq!(handle.totals(), [14, 4, 2, 0]);

        // Last used: the latest of them all.
        main.touch(4);
        assert_eq!(main.age(20), 20 - 11);
        one.touch(60);
        assert_eq!(main.age(70), 10);
        // A stamp ahead of the reader's `now` (another thread touched it since): used now.
        one.touch(71);
        assert_eq!(main.age(70), 0);
        // Past 2^32 seconds since the map's base, ages are still exact, and a stamp ahead
        // across the wrap is still "now".
        let far: u64 = (1 << 32) + 1000;
        five.touch(far - 30);
        assert_eq!(main.age(far), 30);
        late.touch(far);
        assert_eq!(main.age(far), 0);
        assert_eq!(main.age(far + 7), 7);
        // The oldest age that reads right: 2^31 - 1 seconds; past 2^31 the stamp reads as
        // ahead.
        let lone = made_by(0);
        lone.touch(5);
        assert_eq!(lone.age(5 + (1 << 31) - 1), (1 << 31) - 1);
        assert_eq!(lone.age(5 + (1 << 31) + 1), 0);
        // A stamp ahead across the wrap of the low 32 bits.
        let wrap: u64 = 1 << 33;
        let edge = made_by(0);
        edge.touch(wrap - 2);
        edge.touch(wrap + 1);
        assert_eq!(edge.age(wrap - 1), 0);
        assert_eq!(edge.age(wrap + 4), 3);
        // The stamp only moves forward: a caller whose clock read an earlier second (across
        // the wrap too) does not put it back.
        edge.touch(wrap - 1);
        assert_eq!(edge.age(wrap + 4), 3);
        lone.touch(70);
        lone.touch(69);
        assert_eq!(lone.age(80), 10);
    }

    /// A stripe is one cache line: what a call writes on it never shares a line with another
    /// stripe (nor, for a per-key breaker, makes its idle memory grow).
    #[test]
    fn a_stripe_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Stripe<()>>(), 64);
        assert_eq!(std::mem::size_of::<Stripe<String>>(), 64);
    }

    /// A per-key breaker made on a thread past the first [`STRIPES`]: its first stripe is
    /// the one its maker's group of later threads shares; each of the first threads gets one
    /// of its own, the other groups one each.
    #[test]
    fn a_per_key_breaker_made_by_a_late_thread_serves_its_group() {
        let maker = STRIPES + 2;
        let main = made_by(maker);
        assert!(!main.exclusive());
        for t in [maker, maker + STRIPES, maker + 5 * STRIPES] {
            assert!(Arc::ptr_eq(&main.for_thread(t, 0), &main), "thread {t}");
        }
        assert!(main.locals.get().is_none());
        for t in (0..2 * STRIPES)
            .filter(|&t| slot(t) != slot(maker))
            .chain([255])
        {
            let theirs = main.for_thread(t, 0);
            assert!(!Arc::ptr_eq(&theirs, &main), "thread {t}");
            assert_eq!(theirs.exclusive(), t < STRIPES);
            assert_eq!(usize::from(theirs.owner), slot(t));
        }
        assert_eq!(main.others().count(), 2 * STRIPES - 1);
    }
}
