//! One breaker: shared state plus per-thread stripes for metrics and references.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use crate::state::{Policy, Shared};

/// How many stripes a standalone breaker spreads its per-call writes over.
pub(crate) const STRIPES: usize = 8;

/// Per-thread slice of a breaker: what a call writes on the happy path lives here, on a cache
/// line no other thread writes, so two workers sharing one breaker do not contend.
///
/// A response future holds an `Arc<Stripe<C>>` (its thread's stripe), so the reference count
/// it touches is also per thread.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Stripe<C> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) classifier: Arc<C>,
    pub(crate) calls: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) slow: AtomicU64,
    pub(crate) rejected: AtomicU64,
}

/// A breaker: its shared state and its stripes.
#[derive(Debug)]
pub(crate) struct Breaker<C> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) stripes: Box<[Arc<Stripe<C>>]>,
}

impl<C> Breaker<C> {
    pub(crate) fn new(policy: Policy, classifier: Arc<C>, stripes: usize) -> Self {
        let shared = Arc::new(Shared::new(policy));
        let stripes = (0..stripes.max(1))
            .map(|_| {
                Arc::new(Stripe {
                    shared: shared.clone(),
                    classifier: classifier.clone(),
                    calls: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    slow: AtomicU64::new(0),
                    rejected: AtomicU64::new(0),
                })
            })
            .collect();
        Self { shared, stripes }
    }

    /// This thread's stripe.
    pub(crate) fn stripe(&self) -> &Arc<Stripe<C>> {
        &self.stripes[thread_index() % self.stripes.len()]
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

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// A small per-thread number, assigned round-robin on first use.
fn thread_index() -> usize {
    THREAD_INDEX.with(|i| {
        let v = i.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT_THREAD.fetch_add(1, Relaxed);
        i.set(v);
        v
    })
}
