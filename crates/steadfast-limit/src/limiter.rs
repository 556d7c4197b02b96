//! The permit accounting every service made from one layer shares.
//!
//! Permits live in two places: a global count of the permits granted (at most the limit), and
//! per-thread stripes (each on its own cache line) that hold a budget of granted permits and
//! count the calls using them. A call takes a permit from its thread's stripe with one
//! compare-and-swap on a line no other thread writes; only when the stripe's budget is used up
//! does it take a batch from the global count, and only when that is exhausted does it reclaim
//! the idle budgets of other stripes. So two threads calling through one limit do not write a
//! shared cache line on every call, and the limit still holds exactly: the calls in flight
//! never outnumber the permits granted, which never outnumber the limit.
//!
//! Waiters (when the layer waits) join a queue in call order and are counted in the global
//! word. While anyone waits, new arrivals queue behind them, and a call that ends hands its
//! permit straight to the first waiter (it never goes back to a pool where a later caller could
//! take it first): first come, first served, by the order of the calls. A release and a waiter
//! joining meet on the stripe word (read-modify-writes on both sides), so either the joining
//! waiter reclaims the freed permit and hands it to the head of the queue, or the release sees
//! the waiter and does; the loom models in `loom_model.rs` check this. The queue has a lock,
//! taken only by calls that wait and by releases while calls wait.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use steadfast_core::__private::thread_number;
use tokio::time::Instant;

use crate::algorithm::{Sample, Windowed};
use crate::sync::AtomicU32;
use crate::sync::AtomicU64;
use crate::sync::Mutex;
use crate::sync::Ordering::{AcqRel, Acquire, Relaxed};

/// Stripes per limit: threads are spread over them by thread number. (Two in the loom models:
/// each stripe's word is one more atomic for loom to interleave.)
const STRIPES: usize = if cfg!(all(test, loom)) { 2 } else { 8 };

/// One waiter in the global word (its high half); the low half counts the permits granted.
const WAITER: u64 = 1 << 32;
/// One permit of budget in a stripe's word (its high half); the low half counts calls in use.
const BUDGET: u64 = 1 << 32;

fn low(word: u64) -> u32 {
    word as u32
}

fn high(word: u64) -> u32 {
    (word >> 32) as u32
}

/// How many permits a stripe takes from the global count at once, and keeps idle at most
/// (twice that): a small share of the limit, so idle budgets never starve other threads for
/// long.
fn batch(limit: u32) -> u32 {
    (limit / (4 * STRIPES as u32)).clamp(1, 32)
}

/// What every stripe and service of one limit shares.
pub(crate) struct Shared {
    /// Permits granted to stripes (low half) and calls waiting (high half).
    state: AtomicU64,
    limit: AtomicU32,
    /// Calls waiting for a permit, in call order.
    queue: Mutex<VecDeque<Arc<Slot>>>,
    /// The adaptive rule's state; `None` for a fixed limit. A sample that finds it busy
    /// (another thread is updating it) is skipped rather than waited for.
    estimator: Option<std::sync::Mutex<Windowed>>,
    /// How long a call may wait for a permit; `None`: it is refused at once.
    pub(crate) wait: Option<Duration>,
    pub(crate) name: Arc<str>,
}

/// One thread's share: its budget of granted permits (high half) and the calls using them
/// (low half). Aligned so that no two stripes share a cache line.
#[repr(align(128))]
pub(crate) struct Stripe {
    word: AtomicU64,
    shared: Arc<Shared>,
}

/// The shared state of one limit.
pub(crate) struct Limiter {
    pub(crate) shared: Arc<Shared>,
    stripes: Box<[Arc<Stripe>]>,
}

impl std::ops::Deref for Limiter {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("name", &self.name)
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn limit(&self) -> u32 {
        self.limit.load(Relaxed)
    }

    pub(crate) fn waiting(&self) -> u32 {
        high(self.state.load(Acquire))
    }

    /// Grants up to `want` permits (at least one) from the global count; `None` when none is
    /// left, or (for a new arrival) when others wait.
    fn grant(&self, want: u32, waiting: bool) -> Option<u32> {
        let mut s = self.state.load(Acquire);
        loop {
            let left = self.limit().saturating_sub(low(s));
            if left == 0 || (!waiting && high(s) != 0) {
                return None;
            }
            let k = want.min(left);
            match self
                .state
                .compare_exchange_weak(s, s + u64::from(k), AcqRel, Acquire)
            {
                Ok(_) => return Some(k),
                Err(now) => s = now,
            }
        }
    }

    /// Hands permits from the global count to the waiters at the head of the queue, while
    /// both last; new permits are counted on `stripe`.
    fn dispatch(&self, stripe: &Arc<Stripe>) {
        let mut wake = Vec::new();
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            while !q.is_empty() {
                if self.grant(1, true).is_none() {
                    break;
                }
                stripe.word.fetch_add(BUDGET + 1, AcqRel);
                let permit = Permit {
                    stripe: stripe.clone(),
                    start: None,
                };
                let head = q.pop_front().expect("not empty");
                self.state.fetch_sub(WAITER, AcqRel);
                wake.extend(head.give(permit));
            }
        }
        for w in wake {
            w.wake();
        }
    }

    /// Hands a finishing call's permit (counted on `stripe`) straight to the head of the
    /// queue; `false` when nobody waits any more.
    fn hand_off(&self, stripe: &Arc<Stripe>) -> bool {
        let waker = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let Some(head) = q.pop_front() else {
                return false;
            };
            self.state.fetch_sub(WAITER, AcqRel);
            head.give(Permit {
                stripe: stripe.clone(),
                start: None,
            })
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Gives `n` granted permits back to the global count.
    fn ungrant(&self, n: u32) {
        if n != 0 {
            self.state.fetch_sub(u64::from(n), AcqRel);
        }
    }
}

impl Stripe {
    /// Takes a permit from this stripe's budget.
    #[inline]
    fn admit(&self) -> bool {
        let mut w = self.word.load(Relaxed);
        loop {
            if low(w) >= high(w) {
                return false;
            }
            match self.word.compare_exchange_weak(w, w + 1, AcqRel, Relaxed) {
                Ok(_) => return true,
                Err(now) => w = now,
            }
        }
    }

    /// Hands the stripe's idle budget, beyond `keep`, back to the global count; returns how
    /// much. Reads the word with a read-modify-write, so that a release just before is seen.
    fn reclaim(&self, keep: u32) -> u32 {
        let mut w = self.word.fetch_add(0, AcqRel);
        loop {
            let idle = high(w) - low(w);
            if idle <= keep {
                return 0;
            }
            let give = idle - keep;
            match self
                .word
                .compare_exchange_weak(w, w - u64::from(give) * BUDGET, AcqRel, Acquire)
            {
                Ok(_) => {
                    self.shared.ungrant(give);
                    return give;
                }
                Err(now) => w = now,
            }
        }
    }

    /// Gives a permit back (to the first waiter, if any wait and the limit allows).
    #[inline]
    fn release(self: &Arc<Self>) {
        let w = self.word.fetch_sub(1, AcqRel) - 1;
        let s = self.shared.state.load(Acquire);
        let limit = self.shared.limit();
        let idle = high(w) - low(w);
        if high(s) == 0 && idle <= 2 * batch(limit) && low(s) <= limit {
            return;
        }
        self.release_slow(s);
    }

    #[inline(never)]
    fn release_slow(self: &Arc<Self>, s: u64) {
        if high(s) != 0 || low(s) > self.shared.limit() {
            // Someone waits, or the limit came down: no idle budget here.
            self.reclaim(0);
        } else {
            self.reclaim(batch(self.shared.limit()));
        }
        if high(s) != 0 {
            self.shared.dispatch(self);
        }
    }
}

/// A call waiting for a permit: where a release hands it one.
#[derive(Default)]
pub(crate) struct Slot {
    inner: Mutex<SlotInner>,
}

#[derive(Default)]
struct SlotInner {
    permit: Option<Permit>,
    waker: Option<Waker>,
}

impl Slot {
    /// The permit handed to this waiter, if any; otherwise `waker` is kept to be woken by the
    /// hand-over.
    pub(crate) fn poll_permit(&self, waker: &Waker) -> Option<Permit> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = inner.permit.take() {
            return Some(p);
        }
        match &inner.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => inner.waker = Some(waker.clone()),
        }
        None
    }

    /// Hands `permit` over; returns the waker to wake (after every lock is released).
    fn give(&self, permit: Permit) -> Option<Waker> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.permit = Some(permit);
        inner.waker.take()
    }

    fn take(&self) -> Option<Permit> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .permit
            .take()
    }
}

impl Limiter {
    pub(crate) fn new(
        limit: u32,
        estimator: Option<Windowed>,
        wait: Option<Duration>,
        name: Arc<str>,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            limit: AtomicU32::new(limit),
            queue: Mutex::new(VecDeque::new()),
            estimator: estimator.map(std::sync::Mutex::new),
            wait,
            name,
        });
        let stripes = (0..STRIPES)
            .map(|_| {
                Arc::new(Stripe {
                    word: AtomicU64::new(0),
                    shared: shared.clone(),
                })
            })
            .collect();
        Self { shared, stripes }
    }

    /// Calls holding a permit, summed over the stripes.
    pub(crate) fn in_flight(&self) -> u32 {
        self.stripes
            .iter()
            .map(|s| low(s.word.load(Acquire)))
            .fold(0, u32::saturating_add)
    }

    /// Nothing holds this limiter but its owner: no permit (each holds a stripe), no waiter
    /// (each holds the limiter). A per-key map may then drop it.
    pub(crate) fn is_idle(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) == 1 && self.stripes.iter().all(|s| Arc::strong_count(s) == 1)
    }

    pub(crate) fn is_adaptive(&self) -> bool {
        self.estimator.is_some()
    }

    #[inline]
    fn stripe(&self) -> &Arc<Stripe> {
        &self.stripes[thread_number() % STRIPES]
    }

    /// A permit for a new arrival: none while others wait (they come first).
    #[inline]
    pub(crate) fn try_acquire(&self) -> Option<Permit> {
        let s = self.state.load(Acquire);
        if high(s) != 0 {
            return None;
        }
        // A stripe's budget is spent only while the permits granted fit the limit (an
        // adaptive limit may have come down below them).
        let stripe = self.stripe();
        if low(s) <= self.limit() && stripe.admit() {
            return Some(self.permit(stripe));
        }
        self.acquire_slow()
    }

    #[inline(never)]
    fn acquire_slow(&self) -> Option<Permit> {
        let stripe = self.stripe();
        let want = batch(self.limit());
        // A refusal must mean the limit's permits are in use. A permit can be in transit for a
        // moment (reclaimed from a stripe, not yet back in the global count, or released into
        // a stripe just after this call looked at it): look again until it shows, or until the
        // calls in use fill the limit. Bounded, as a safety net against a livelock.
        for _ in 0..64 {
            if let Some(k) = self.grant(want, false) {
                // One permit in use, the rest of the batch as the stripe's budget.
                stripe.word.fetch_add(u64::from(k) * BUDGET + 1, AcqRel);
                return Some(self.permit(stripe));
            }
            if self.reclaim_all() > 0 {
                continue;
            }
            if self.waiting() != 0 || self.in_flight() >= self.limit() {
                return None;
            }
            crate::sync::spin();
        }
        None
    }

    /// Permits granted (in use or idle in stripes), and the stripes' budgets summed: equal
    /// whenever no grant is half done.
    #[cfg(test)]
    pub(crate) fn accounts(&self) -> (u32, u32) {
        let budgets = self
            .stripes
            .iter()
            .map(|s| high(s.word.load(Acquire)))
            .sum();
        (low(self.state.load(Acquire)), budgets)
    }

    /// Hands every stripe's idle budget back to the global count; returns how much.
    pub(crate) fn reclaim_all(&self) -> u32 {
        self.stripes.iter().map(|s| s.reclaim(0)).sum()
    }

    fn permit(&self, stripe: &Arc<Stripe>) -> Permit {
        let start = self.is_adaptive().then(|| {
            let now = steadfast_core::Deadline::call_now().unwrap_or_else(Instant::now);
            (now, self.in_flight())
        });
        Permit {
            stripe: stripe.clone(),
            start,
        }
    }

    /// Puts a call in the queue of waiters: from now on new arrivals queue behind it and
    /// releases hand their permits to the queue's head. A permit that came free just before
    /// is reclaimed and handed over at once (to the head, which may be this call).
    pub(crate) fn enqueue(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot::default());
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.push_back(slot.clone());
            self.state.fetch_add(WAITER, AcqRel);
        }
        self.reclaim_all();
        self.shared.dispatch(self.stripe());
        slot
    }

    /// Takes a waiter out of the queue (it gave up or was dropped); returns a permit handed to
    /// it meanwhile, which the caller may use or drop (dropping hands it on).
    pub(crate) fn leave(&self, slot: &Arc<Slot>) -> Option<Permit> {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = q.iter().position(|s| Arc::ptr_eq(s, slot)) {
                q.remove(i);
                self.state.fetch_sub(WAITER, AcqRel);
            }
        }
        slot.take()
    }
}

impl Shared {
    /// Feeds an adaptive limit one sample, taken at `now`; returns the limit's move, if any.
    fn sample(&self, sample: Sample, now: Instant) -> std::cmp::Ordering {
        use std::cmp::Ordering::Equal;
        let Some(estimator) = &self.estimator else {
            return Equal;
        };
        // A busy estimator means another thread is updating it with its own sample: skip an
        // ordinary sample rather than wait on a lock in a call's path, but never a drop (the
        // signal that makes a limit come down).
        let mut e = match estimator.try_lock() {
            Ok(e) => e,
            Err(std::sync::TryLockError::WouldBlock) if sample.dropped => {
                estimator.lock().unwrap_or_else(|e| e.into_inner())
            }
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Equal,
        };
        let before = self.limit.load(Relaxed);
        let Some(after) = e.add(sample, now) else {
            return Equal;
        };
        drop(e);
        if after != before {
            self.limit.store(after, Relaxed);
            tracing::trace!(target: "steadfast::limit", limit = %self.name, before, after, "limit moved");
            #[cfg(feature = "metrics")]
            metrics::gauge!("steadfast_limit_current", "limit" => self.name.to_string())
                .set(f64::from(after));
        }
        after.cmp(&before)
    }
}

/// A permit: the right for one call to be in flight. Given back when dropped, with a sample for
/// an adaptive limit when the call's end was seen ([`finish`](Self::finish)).
pub(crate) struct Permit {
    stripe: Arc<Stripe>,
    /// When the call was admitted (adaptive limits only) and how many were then in flight.
    start: Option<(Instant, u32)>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("limit", &self.stripe.shared.name)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// Whether the call's end is a sample (the limit is adaptive).
    #[inline]
    pub(crate) fn samples(&self) -> bool {
        self.start.is_some()
    }

    /// The call ended as seen: feeds the sample (adaptive limits), then gives the permit back.
    pub(crate) fn finish(mut self, dropped: bool) {
        if let Some((start, in_flight)) = self.start.take() {
            let now = Instant::now();
            let rtt = now.saturating_duration_since(start);
            let moved = self.stripe.shared.sample(
                Sample {
                    rtt,
                    lowest: rtt,
                    in_flight,
                    dropped,
                },
                now,
            );
            match moved {
                // The permits over the new limit must not sit idle in stripes.
                std::cmp::Ordering::Less => {
                    self.stripe.reclaim(0);
                }
                // More room: waiters get it first.
                std::cmp::Ordering::Greater => {
                    if self.stripe.shared.waiting() != 0 {
                        self.stripe.shared.dispatch(&self.stripe);
                    }
                }
                std::cmp::Ordering::Equal => {}
            }
        }
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        // While calls wait, the permit goes straight to the first of them, unless the limit
        // came down below the permits granted (then it goes back, and waiters get what the
        // lower limit allows).
        let s = self.stripe.shared.state.load(Acquire);
        if high(s) != 0
            && low(s) <= self.stripe.shared.limit()
            && self.stripe.shared.hand_off(&self.stripe)
        {
            return;
        }
        self.stripe.release();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32 as StdU32, Ordering::SeqCst};

    /// Threads on stripes of their own (and sharing some) hammer a small limit: the calls
    /// holding a permit never outnumber it, and at the end nothing is in use and every
    /// granted permit is some stripe's budget.
    #[test]
    fn striped_permits_never_exceed_the_limit_and_balance_at_the_end() {
        for limit in [1, 3, 64] {
            let l = Arc::new(Limiter::new(limit, None, None, Arc::from("t")));
            let holding = Arc::new(StdU32::new(0));
            let most = Arc::new(StdU32::new(0));
            let threads: Vec<_> = (0..12)
                .map(|_| {
                    let (l, holding, most) = (l.clone(), holding.clone(), most.clone());
                    std::thread::spawn(move || {
                        for _ in 0..20_000 {
                            if let Some(p) = l.try_acquire() {
                                let now = holding.fetch_add(1, SeqCst) + 1;
                                most.fetch_max(now, SeqCst);
                                holding.fetch_sub(1, SeqCst);
                                drop(p);
                            }
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert!(
                most.load(SeqCst) <= limit,
                "limit {limit}: {}",
                most.load(SeqCst)
            );
            assert_eq!(l.in_flight(), 0);
            let (granted, budgets) = l.accounts();
            assert_eq!(granted, budgets);
            assert!(granted <= limit);
            // Idle budgets come back when someone needs them: the whole limit at once.
            let all: Vec<_> = (0..limit).map(|_| l.try_acquire().expect("free")).collect();
            assert_eq!(l.in_flight(), limit);
            assert!(l.try_acquire().is_none());
            drop(all);
        }
    }
}
