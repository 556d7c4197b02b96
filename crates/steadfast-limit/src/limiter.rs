//! The permit accounting every service made from one layer shares.
//!
//! One word holds the calls in flight (low half) and the calls waiting for a permit (high
//! half); admission is a compare-and-swap that never passes the limit, a release one
//! subtraction that also tells whether anyone waits. Waiters park on a [`Notify`]. Because
//! both counts live in one word, a release and a waiter registering are ordered one way or the
//! other: either the waiter then sees the freed permit, or the release sees the waiter and
//! wakes it (the loom model in `loom_model.rs` checks this; two separate words would need
//! sequentially consistent fences on both sides). While anyone waits, new arrivals queue behind them instead of
//! taking a freed permit first, and a waiter that found others waiting looks for a permit only
//! once woken: releases wake waiters in the order they started waiting, so waiters are served
//! first come, first served, and a bounded wait is not starved by callers that came later.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::algorithm::{Sample, Windowed};
use crate::sync::AtomicU32;
use crate::sync::AtomicU64;
use crate::sync::Ordering::{AcqRel, Acquire, Relaxed};

/// One waiter in the state word.
const WAITER: u64 = 1 << 32;

fn in_flight(state: u64) -> u32 {
    state as u32
}

fn waiters(state: u64) -> u32 {
    (state >> 32) as u32
}

/// The shared state of one limit.
pub(crate) struct Limiter {
    /// Calls in flight (low 32 bits) and calls waiting (high 32 bits).
    state: AtomicU64,
    limit: AtomicU32,
    pub(crate) notify: Arc<Notify>,
    /// The adaptive rule's state; `None` for a fixed limit. A sample that finds it busy (another
    /// thread is updating it) is skipped rather than waited for.
    estimator: Option<Mutex<Windowed>>,
    /// How long a call may wait for a permit; `None`: it is refused at once.
    pub(crate) wait: Option<Duration>,
    pub(crate) name: Arc<str>,
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

impl Limiter {
    pub(crate) fn new(
        limit: u32,
        estimator: Option<Windowed>,
        wait: Option<Duration>,
        name: Arc<str>,
    ) -> Self {
        Self {
            state: AtomicU64::new(0),
            limit: AtomicU32::new(limit),
            notify: Arc::new(Notify::new()),
            estimator: estimator.map(Mutex::new),
            wait,
            name,
        }
    }

    pub(crate) fn limit(&self) -> u32 {
        self.limit.load(Relaxed)
    }

    pub(crate) fn in_flight(&self) -> u32 {
        in_flight(self.state.load(Acquire))
    }

    pub(crate) fn waiting(&self) -> u32 {
        waiters(self.state.load(Acquire))
    }

    pub(crate) fn is_adaptive(&self) -> bool {
        self.estimator.is_some()
    }

    /// Takes a permit for a new arrival: none while others wait (they come first). Returns the
    /// calls in flight with this one.
    #[inline]
    pub(crate) fn try_acquire(&self) -> Option<u32> {
        self.acquire(false)
    }

    /// Takes a permit for a registered waiter.
    pub(crate) fn take(&self) -> Option<u32> {
        self.acquire(true)
    }

    #[inline]
    fn acquire(&self, waiting: bool) -> Option<u32> {
        let mut s = self.state.load(Relaxed);
        loop {
            if (!waiting && waiters(s) != 0) || in_flight(s) >= self.limit.load(Relaxed) {
                return None;
            }
            match self.state.compare_exchange_weak(s, s + 1, AcqRel, Relaxed) {
                Ok(_) => return Some(in_flight(s) + 1),
                Err(now) => s = now,
            }
        }
    }

    /// Counts a waiter in: from now on releases wake waiters, and new arrivals queue. Returns
    /// whether it is first in line (nobody else waited): only such a waiter looks for a
    /// permit before it is woken; the others wait their turn.
    pub(crate) fn register(&self) -> bool {
        waiters(self.state.fetch_add(WAITER, AcqRel)) == 0
    }

    /// Counts a waiter out (it got a permit, gave up, or was dropped).
    pub(crate) fn deregister(&self) {
        self.state.fetch_sub(WAITER, AcqRel);
    }

    /// Gives a permit back, and wakes a waiter if there is one (then returns `true`).
    #[inline]
    pub(crate) fn release(&self) -> bool {
        let before = self.state.fetch_sub(1, AcqRel);
        if waiters(before) != 0 {
            self.notify.notify_one();
            return true;
        }
        false
    }

    /// Feeds an adaptive limit one sample, taken at `now`.
    pub(crate) fn sample(&self, sample: Sample, now: Instant) {
        let Some(estimator) = &self.estimator else {
            return;
        };
        // A busy estimator means another thread is updating it with its own sample: skip this
        // one rather than wait on a lock in a call's path.
        let Ok(mut e) = estimator.try_lock() else {
            return;
        };
        let before = self.limit.load(Relaxed);
        let Some(after) = e.add(sample, now) else {
            return;
        };
        drop(e);
        if after != before {
            self.limit.store(after, Relaxed);
            tracing::trace!(target: "steadfast::limit", limit = %self.name, before, after, "limit moved");
            if after > before && self.waiting() != 0 {
                // More room: every waiter tries again (those that find none wait again).
                self.notify.notify_waiters();
            }
        }
    }
}

/// A permit: the right for one call to be in flight. Given back when dropped, with a sample for
/// an adaptive limit when the call's end was seen ([`finish`](Self::finish)).
pub(crate) struct Permit {
    limiter: Arc<Limiter>,
    /// When the call was admitted (adaptive limits only) and how many were then in flight.
    start: Option<(Instant, u32)>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("limit", &self.limiter.name)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// Wraps a permit already taken (`in_flight` as `try_acquire` or `take` returned it).
    #[inline]
    pub(crate) fn new(limiter: Arc<Limiter>, in_flight: u32) -> Self {
        let start = limiter.is_adaptive().then(|| {
            let now = steadfast_core::Deadline::call_now().unwrap_or_else(Instant::now);
            (now, in_flight)
        });
        Self { limiter, start }
    }

    /// The call ended as seen: feeds the sample (adaptive limits), then gives the permit back.
    pub(crate) fn finish(mut self, dropped: bool) {
        if let Some((start, in_flight)) = self.start.take() {
            let now = Instant::now();
            let rtt = now.saturating_duration_since(start);
            self.limiter.sample(
                Sample {
                    rtt,
                    lowest: rtt,
                    in_flight,
                    dropped,
                },
                now,
            );
        }
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        let _woke = self.limiter.release();
    }
}
