//! Sliding failure-rate windows, O(1) per call and lock-free.
//!
//! - [`CountWindow`]: the true last N calls, a ring of N one-byte slots. Recording a call
//!   swaps its slot and adjusts three counters by the difference, so the counters always
//!   describe exactly the last N outcomes (not a cumulative tally reset on state changes).
//! - [`TimeWindow`]: a ring of fixed-width buckets, each stamped with the bucket number it
//!   holds; a stale bucket is reset when reused. Aggregating reads every bucket, a fixed
//!   constant (at most 64) per call.
//!
//! Updates from concurrent calls use atomics only; a rate read concurrently with updates may
//! be off by the calls in flight, never by more.

use crate::sync::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const EMPTY: u8 = 0;
const SUCCESS: u8 = 1;
const FAILURE: u8 = 1 << 1;
const SLOW: u8 = 1 << 2;

/// Counts in a window. 64-bit: a time window of wide buckets on a busy service can see more
/// than 2^32 calls, and a count that wrapped would trip (or un-trip) a breaker on a rate
/// that never happened.
///
/// The handle's snapshot ([`BreakerHandle::metrics`](crate::BreakerHandle::metrics)) fills
/// every field, as resilience4j reports a window: calls, failures, slow calls split into
/// slow successes and slow failures, and the calls' total duration. The counts a call sees
/// when it decides a trip carry only calls, failures and slow calls (the others are 0 there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WindowCounts {
    /// Calls recorded in the window.
    pub calls: u64,
    /// Failures among them.
    pub failures: u64,
    /// Slow calls among them.
    pub slow: u64,
    /// Slow calls that also failed.
    pub slow_failures: u64,
    /// The calls' durations added up (each timed from admission to verdict; in a count
    /// window one call counts for at most about 71 minutes).
    pub total_duration: Duration,
}

impl WindowCounts {
    /// Slow calls that succeeded.
    pub fn slow_successes(&self) -> u64 {
        self.slow.saturating_sub(self.slow_failures)
    }

    /// The average call duration, `None` for an empty window.
    pub fn average_duration(&self) -> Option<Duration> {
        u32::try_from(self.calls)
            .ok()
            .filter(|n| *n > 0)
            .map(|n| self.total_duration / n)
            .or_else(|| {
                (self.calls > 0).then(|| {
                    Duration::from_secs_f64(self.total_duration.as_secs_f64() / self.calls as f64)
                })
            })
    }

    /// Failure rate in percent (0 when empty).
    pub fn failure_rate(&self) -> f64 {
        rate(self.failures, self.calls)
    }

    /// Slow-call rate in percent (0 when empty).
    pub fn slow_rate(&self) -> f64 {
        rate(self.slow, self.calls)
    }
}

fn rate(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

fn encode(failure: bool, slow: bool) -> u8 {
    SUCCESS | if failure { FAILURE } else { 0 } | if slow { SLOW } else { 0 }
}

/// The last `N` calls.
#[derive(Debug)]
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    /// Each slot's call duration in microseconds (saturating at about 71 minutes).
    durations: Box<[AtomicU32]>,
    next: AtomicU64,
    calls: AtomicU32,
    failures: AtomicU32,
    slow: AtomicU32,
}

impl CountWindow {
    pub(crate) fn new(size: u32) -> Self {
        Self {
            slots: (0..size).map(|_| AtomicU8::new(EMPTY)).collect(),
            durations: (0..size).map(|_| AtomicU32::new(0)).collect(),
            next: AtomicU64::new(0),
            calls: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            slow: AtomicU32::new(0),
        }
    }

    #[cfg(test)]
    pub(crate) fn record(&self, failure: bool, slow: bool) -> WindowCounts {
        self.record_timed(failure, slow, None)
    }

    /// Records a call, with its duration when it was timed.
    pub(crate) fn record_timed(
        &self,
        failure: bool,
        slow: bool,
        micros: Option<u64>,
    ) -> WindowCounts {
        let i = (self.next.fetch_add(1, Relaxed) % self.slots.len() as u64) as usize;
        let new = encode(failure, slow);
        if let Some(us) = micros {
            self.durations[i].store(u32::try_from(us).unwrap_or(u32::MAX), Relaxed);
        }
        let old = self.slots[i].swap(new, Relaxed);
        // At most 2^20 slots: these 32-bit counters cannot overflow.
        let calls = if old == EMPTY {
            self.calls.fetch_add(1, Relaxed) + 1
        } else {
            self.calls.load(Relaxed)
        };
        let failures = adjust(&self.failures, old & FAILURE != 0, failure);
        let slow = adjust(&self.slow, old & SLOW != 0, slow);
        WindowCounts {
            calls: calls.into(),
            failures: failures.into(),
            slow: slow.into(),
            ..WindowCounts::default()
        }
    }

    /// The window's counts, the ones only a snapshot needs (slow failures, durations) read
    /// from the slots: O(N), never on a call's path.
    pub(crate) fn counts(&self) -> WindowCounts {
        let (mut slow_failures, mut micros) = (0u64, 0u64);
        for (slot, d) in self.slots.iter().zip(self.durations.iter()) {
            let v = slot.load(Relaxed);
            if v == EMPTY {
                continue;
            }
            if v & (FAILURE | SLOW) == FAILURE | SLOW {
                slow_failures += 1;
            }
            micros = micros.saturating_add(u64::from(d.load(Relaxed)));
        }
        WindowCounts {
            calls: self.calls.load(Relaxed).into(),
            failures: non_negative(self.failures.load(Relaxed)).into(),
            slow: non_negative(self.slow.load(Relaxed)).into(),
            slow_failures,
            total_duration: Duration::from_micros(micros),
        }
    }

    pub(crate) fn reset(&self) {
        for s in self.slots.iter() {
            s.store(EMPTY, Relaxed);
        }
        for d in self.durations.iter() {
            d.store(0, Relaxed);
        }
        self.calls.store(0, Relaxed);
        self.failures.store(0, Relaxed);
        self.slow.store(0, Relaxed);
    }
}

/// Moves a counter by (new - old) for one flag and returns its new value.
fn adjust(counter: &AtomicU32, old: bool, new: bool) -> u32 {
    non_negative(match (old, new) {
        (false, true) => counter.fetch_add(1, Relaxed).wrapping_add(1),
        (true, false) => counter.fetch_sub(1, Relaxed).wrapping_sub(1),
        _ => counter.load(Relaxed),
    })
}

/// A counter read while another thread's decrement has landed before its matching
/// increment is briefly below zero (it wrapped); that reads as zero, never as four billion.
fn non_negative(n: u32) -> u32 {
    if n > i32::MAX as u32 { 0 } else { n }
}

#[derive(Debug)]
struct Bucket {
    /// The bucket number (time / width) these counts belong to; `u64::MAX` when unused.
    epoch: AtomicU64,
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
    slow_failures: AtomicU64,
    micros: AtomicU64,
}

/// A ring of fixed-width time buckets.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    width_nanos: u64,
    buckets: Box<[Bucket]>,
}

impl TimeWindow {
    pub(crate) fn new(width: Duration, buckets: u32) -> Self {
        Self {
            width_nanos: width.as_nanos().clamp(1, u128::from(u64::MAX)) as u64,
            buckets: (0..buckets)
                .map(|_| Bucket {
                    epoch: AtomicU64::new(u64::MAX),
                    calls: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    slow: AtomicU64::new(0),
                    slow_failures: AtomicU64::new(0),
                    micros: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    #[cfg(test)]
    pub(crate) fn record(&self, now_nanos: u64, failure: bool, slow: bool) -> WindowCounts {
        self.record_timed(now_nanos, failure, slow, None)
    }

    /// Records a call at `now_nanos`, with its duration when it was timed.
    pub(crate) fn record_timed(
        &self,
        now_nanos: u64,
        failure: bool,
        slow: bool,
        micros: Option<u64>,
    ) -> WindowCounts {
        let epoch = now_nanos / self.width_nanos;
        let b = &self.buckets[(epoch % self.buckets.len() as u64) as usize];
        let seen = b.epoch.load(Relaxed);
        if seen != epoch
            && b.epoch
                .compare_exchange(seen, epoch, Relaxed, Relaxed)
                .is_ok()
        {
            // This call claimed a stale bucket: start it from zero.
            b.calls.store(0, Relaxed);
            b.failures.store(0, Relaxed);
            b.slow.store(0, Relaxed);
            b.slow_failures.store(0, Relaxed);
            b.micros.store(0, Relaxed);
        }
        b.calls.fetch_add(1, Relaxed);
        if failure {
            b.failures.fetch_add(1, Relaxed);
        }
        if slow {
            b.slow.fetch_add(1, Relaxed);
            if failure {
                b.slow_failures.fetch_add(1, Relaxed);
            }
        }
        if let Some(us) = micros {
            b.micros.fetch_add(us, Relaxed);
        }
        self.counts(now_nanos)
    }

    pub(crate) fn counts(&self, now_nanos: u64) -> WindowCounts {
        let epoch = now_nanos / self.width_nanos;
        let oldest = epoch.saturating_sub(self.buckets.len() as u64 - 1);
        let mut c = WindowCounts::default();
        let mut micros = 0u64;
        for b in self.buckets.iter() {
            let e = b.epoch.load(Relaxed);
            if e != u64::MAX && e >= oldest && e <= epoch {
                c.calls = c.calls.saturating_add(b.calls.load(Relaxed));
                c.failures = c.failures.saturating_add(b.failures.load(Relaxed));
                c.slow = c.slow.saturating_add(b.slow.load(Relaxed));
                c.slow_failures = c
                    .slow_failures
                    .saturating_add(b.slow_failures.load(Relaxed));
                micros = micros.saturating_add(b.micros.load(Relaxed));
            }
        }
        c.total_duration = Duration::from_micros(micros);
        c
    }

    pub(crate) fn reset(&self) {
        for b in self.buckets.iter() {
            b.epoch.store(u64::MAX, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    /// Past 2^32 calls in one window (wide buckets, a busy service): the counts are exact,
    /// so the rate is the one that happened (a 32-bit sum would have wrapped to a small
    /// number of calls with a failure rate far over 100 %, or panicked in a debug build).
    #[test]
    fn a_time_window_counts_past_two_to_the_32_calls() {
        let w = TimeWindow::new(std::time::Duration::from_secs(3600), 2);
        let hour = 3_600_000_000_000u64;
        w.record(0, true, false);
        w.record(hour, false, false);
        // Five billion calls in each bucket, three of them failures.
        for b in w.buckets.iter() {
            b.calls.store(5_000_000_000, Relaxed);
            b.failures.store(3_000_000_000, Relaxed);
        }
        let c = w.record(hour, false, false);
        assert_eq!(c.calls, 10_000_000_001);
        assert_eq!(c.failures, 6_000_000_000);
        assert!((c.failure_rate() - 60.0).abs() < 1e-6);
    }

    #[test]
    fn windows_add_up_the_durations_of_their_calls() {
        let w = CountWindow::new(3);
        for us in [100, 200, 300, 400] {
            w.record_timed(false, false, Some(us));
        }
        let c = w.counts();
        assert_eq!(
            c.total_duration,
            Duration::from_micros(900),
            "the last three"
        );
        assert_eq!(c.average_duration(), Some(Duration::from_micros(300)));
        let t = TimeWindow::new(Duration::from_secs(1), 2);
        t.record_timed(0, true, true, Some(1_000));
        t.record_timed(0, false, true, Some(3_000));
        let c = t.counts(0);
        assert_eq!((c.slow, c.slow_failures, c.slow_successes()), (2, 1, 1));
        assert_eq!(c.average_duration(), Some(Duration::from_micros(2_000)));
        assert_eq!(WindowCounts::default().average_duration(), None);
    }

    #[test]
    fn count_window_is_the_last_n() {
        let w = CountWindow::new(100);
        for _ in 0..1000 {
            w.record(false, false);
        }
        for i in 1..=50 {
            let c = w.record(true, false);
            assert_eq!(c.calls, 100);
            assert_eq!(c.failures, i);
        }
        assert_eq!(w.counts().failure_rate(), 50.0);
    }

    #[test]
    fn time_window_forgets_old_buckets() {
        let w = TimeWindow::new(Duration::from_secs(1), 10);
        let s = 1_000_000_000;
        for t in 0..10 {
            w.record(t * s, true, false);
        }
        assert_eq!(w.counts(9 * s).failures, 10);
        assert_eq!(w.counts(10 * s).failures, 9, "bucket 0 fell out");
        w.record(10 * s, false, false);
        assert_eq!(
            w.counts(10 * s),
            WindowCounts {
                calls: 10,
                failures: 9,
                ..WindowCounts::default()
            }
        );
        assert_eq!(w.counts(100 * s), WindowCounts::default());
    }

    proptest! {
        /// Against a reference: a plain deque of the last N outcomes.
        #[test]
        fn count_window_matches_reference(size in 1u32..50, ops in proptest::collection::vec((any::<bool>(), any::<bool>()), 0..300)) {
            let w = CountWindow::new(size);
            let mut model: VecDeque<(bool, bool)> = VecDeque::new();
            for (failure, slow) in ops {
                let c = w.record(failure, slow);
                model.push_back((failure, slow));
                if model.len() > size as usize {
                    model.pop_front();
                }
                prop_assert_eq!(c.calls as usize, model.len());
                prop_assert_eq!(c.failures as usize, model.iter().filter(|o| o.0).count());
                prop_assert_eq!(c.slow as usize, model.iter().filter(|o| o.1).count());
                let snapshot = w.counts();
                prop_assert_eq!(snapshot.slow_failures as usize, model.iter().filter(|o| o.0 && o.1).count());
                prop_assert_eq!(snapshot.slow_successes() as usize, model.iter().filter(|o| !o.0 && o.1).count());
            }
        }

        /// Against a reference: every event with its time, filtered by the window.
        #[test]
        fn time_window_matches_reference(buckets in 1u32..12, events in proptest::collection::vec((0u64..5_000, any::<bool>()), 0..200)) {
            let width = 100u64;
            let w = TimeWindow::new(Duration::from_nanos(width), buckets);
            let mut now = 0;
            let mut log: Vec<(u64, bool)> = Vec::new();
            for (dt, failure) in events {
                now += dt % 300;
                let c = w.record(now, failure, false);
                log.push((now, failure));
                let epoch = now / width;
                let oldest = epoch.saturating_sub(u64::from(buckets) - 1);
                let live: Vec<_> = log.iter().filter(|(t, _)| t / width >= oldest).collect();
                prop_assert_eq!(c.calls as usize, live.len());
                prop_assert_eq!(c.failures as usize, live.iter().filter(|e| e.1).count());
            }
        }
    }
}
