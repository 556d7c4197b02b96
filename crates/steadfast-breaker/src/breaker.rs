//! One breaker: shared state plus per-thread stripes for metrics and references.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use steadfast_core::__private::thread_number;

use crate::error::BreakerOpen;
use crate::state::{Meta, Permit, Policy, Shared};

/// How many threads get a stripe of their own in a standalone breaker; the threads after
/// them share as many more, spread by thread number.
pub(crate) const STRIPES: usize = 8;

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
    exclusive: bool,
    /// Whether calls must be timed (slow-call policy or time window): read here, on the
    /// line the call already touches, instead of from the shared policy.
    pub(crate) timed: bool,
    /// Whether the policy itself needs the durations (slow calls, a rate window); when only
    /// the `metrics` feature's histogram does, a success that changes nothing is still
    /// settled inline.
    pub(crate) policy_timed: bool,
    /// For a breaker of a per-key map: seconds since the map's base when last used (for idle
    /// eviction). Here, not in the map's entry, so that a call can take all it needs from the
    /// stripe alone (see the map's per-thread memory).
    pub(crate) last_used: AtomicU64,
}

impl<C> Stripe<C> {
    /// Marks a per-key breaker used at `now` (mostly a read: the word is written at most once
    /// a second).
    #[inline]
    pub(crate) fn touch(&self, now: u64) {
        if self.last_used.load(Relaxed) != now {
            self.last_used.store(now, Relaxed);
        }
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
    /// the thread that [`Breaker::stripe`] picked this stripe for.
    #[inline]
    pub(crate) fn count(&self, counter: &AtomicU64) {
        if self.exclusive {
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
        let timed = shared.needs_clock();
        let policy_timed = shared.policy_needs_clock();
        let stripes = (0..exclusive + exclusive.max(1))
            .map(|i| {
                Arc::new(Stripe {
                    shared: shared.clone(),
                    classifier: classifier.clone(),
                    calls: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    slow: AtomicU64::new(0),
                    rejected: AtomicU64::new(0),
                    exclusive: i < exclusive,
                    timed,
                    policy_timed,
                    last_used: AtomicU64::new(0),
                })
            })
            .collect();
        Self {
            shared,
            stripes,
            exclusive,
        }
    }

    /// The breaker a per-key map keeps as one shared stripe (a handle's view of it).
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

    /// Sums the striped counters.
    pub(crate) fn totals(&self) -> [u64; 4] {
        let mut t = [0; 4];
        for s in self.stripes.iter() {
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
        assert!(breaker.stripes[..2].iter().all(|s| s.exclusive));
        assert!(breaker.stripes[2..].iter().all(|s| !s.exclusive));
    }
}
