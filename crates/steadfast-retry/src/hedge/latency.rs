//! The learnt hedging delay: a percentile of recent attempt latencies.
//!
//! Latencies go into a log-linear histogram of atomic counters (four buckets per power of two
//! from 1 µs, so a bucket is at most a quarter of its value wide), striped by thread so that
//! threads recording at once do not share a cache line. Two histograms take turns: one fills
//! during the current window while the delay is read from the one that filled during the
//! window before (the rotating histogram tower's hedge and Finagle's backup requests use).
//! Until a window has seen `min_samples` latencies, there is no delay and no hedge.
//!
//! The delay is computed once per window (and, while none is known yet, every `min_samples`
//! latencies of the first window), so a call reads one atomic word for it.

use std::sync::atomic::{
    AtomicU32, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};
use std::time::Duration;

use steadfast_core::__private::thread_number;
use tokio::time::Instant;

/// Buckets per power of two.
const SUB_BITS: u32 = 2;
const SUB: usize = 1 << SUB_BITS;
/// Latencies below 2^MIN_EXP ns (about 1 µs) share the first bucket.
const MIN_EXP: u32 = 10;
/// Powers of two covered: 1 µs to about 73 minutes; longer ones share the last bucket.
const OCTAVES: usize = 32;
/// One bucket for everything under 1 µs, then `SUB` per power of two.
const BUCKETS: usize = 1 + OCTAVES * SUB;
const STRIPES: usize = 4;
/// "No delay learnt yet".
const UNKNOWN: u64 = u64::MAX;

#[repr(align(128))]
struct Stripe([AtomicU32; BUCKETS]);

impl Default for Stripe {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU32::new(0)))
    }
}

#[derive(Default)]
struct Histogram([Stripe; STRIPES]);

impl Histogram {
    fn clear(&self) {
        for stripe in &self.0 {
            for c in &stripe.0 {
                c.store(0, Relaxed);
            }
        }
    }

    /// The counts per bucket, summed over the stripes, and their total.
    fn counts(&self) -> ([u64; BUCKETS], u64) {
        let mut counts = [0u64; BUCKETS];
        let mut total = 0;
        for stripe in &self.0 {
            for (sum, c) in counts.iter_mut().zip(&stripe.0) {
                let n = u64::from(c.load(Relaxed));
                *sum += n;
                total += n;
            }
        }
        (counts, total)
    }
}

/// The bucket of a latency of `nanos`.
fn bucket(nanos: u64) -> usize {
    if nanos < 1 << MIN_EXP {
        return 0;
    }
    let exp = 63 - nanos.leading_zeros();
    let sub = (nanos >> (exp - SUB_BITS)) as usize & (SUB - 1);
    (1 + ((exp - MIN_EXP) as usize) * SUB + sub).min(BUCKETS - 1)
}

/// The largest latency bucket `i` holds (exclusive), in nanoseconds: the delay a percentile
/// falling in it gives, so a hedge waits at least as long as the percentile asked for.
fn upper(i: usize) -> u64 {
    if i == 0 {
        return 1 << MIN_EXP;
    }
    let exp = ((i - 1) / SUB) as u32 + MIN_EXP;
    let sub = ((i - 1) % SUB) as u64;
    (SUB as u64 + sub + 1) << (exp - SUB_BITS)
}

/// A percentile of recent latencies, learnt over rotating windows; shared by every clone of
/// a hedge layer's services.
pub(crate) struct Learnt {
    histograms: [Histogram; 2],
    /// The window being filled (its number since `base`); the histogram it fills is
    /// `histograms[window % 2]`.
    window: AtomicU64,
    /// The delay in nanoseconds, or [`UNKNOWN`].
    delay: AtomicU64,
    /// Latencies recorded while no delay is known (to learn one before the first window
    /// ends).
    early: AtomicU32,
    percentile: f64,
    min_samples: u32,
    window_nanos: u64,
    base: Instant,
}

impl Learnt {
    pub(crate) fn new(percentile: f64, min_samples: u32, window: Duration) -> Self {
        Self {
            histograms: Default::default(),
            window: AtomicU64::new(0),
            delay: AtomicU64::new(UNKNOWN),
            early: AtomicU32::new(0),
            percentile,
            min_samples: min_samples.max(1),
            window_nanos: window.as_nanos().clamp(1, u128::from(u64::MAX)) as u64,
            base: Instant::now(),
        }
    }

    /// The delay to hedge after, when one is known.
    #[inline]
    pub(crate) fn delay(&self) -> Option<Duration> {
        match self.delay.load(Relaxed) {
            UNKNOWN => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    /// Records one attempt's latency, finished (or given up) at `now`.
    #[inline]
    pub(crate) fn record(&self, now: Instant, latency: Duration) {
        // Whole windows since `base`, in 64-bit arithmetic (a 128-bit division costs more
        // than the rest of a record); about 584 years of nanoseconds fit.
        let since = now.saturating_duration_since(self.base);
        let nanos_since = since
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(since.subsec_nanos()));
        let window = nanos_since / self.window_nanos;
        let current = self.window.load(Acquire);
        if window > current {
            self.rotate(current, window);
        }
        let nanos = latency
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(latency.subsec_nanos()));
        let stripe = thread_number() % STRIPES;
        self.histograms[(window % 2) as usize].0[stripe].0[bucket(nanos)].fetch_add(1, Relaxed);
        if self.delay.load(Relaxed) == UNKNOWN {
            let seen = self.early.fetch_add(1, Relaxed).wrapping_add(1);
            if seen % self.min_samples == 0 {
                self.learn(&self.histograms[(window % 2) as usize]);
            }
        }
    }

    /// Moves from window `from` to window `to`: the one caller that wins the move learns the
    /// delay from the window that just ended and empties the histogram the new one fills.
    #[cold]
    fn rotate(&self, from: u64, to: u64) {
        if self
            .window
            .compare_exchange(from, to, AcqRel, Acquire)
            .is_err()
        {
            return;
        }
        // The window that just ended is the last one with calls, however many idle windows
        // came after it (a window that saw too few leaves the delay as it was).
        self.learn(&self.histograms[(from % 2) as usize]);
        self.histograms[(to % 2) as usize].clear();
        if to > from + 1 {
            // The other histogram holds an older window: not the one after `from`.
            self.histograms[((to + 1) % 2) as usize].clear();
        }
    }

    /// Sets the delay from `histogram`, if it holds enough latencies.
    fn learn(&self, histogram: &Histogram) {
        let (counts, total) = histogram.counts();
        if total < u64::from(self.min_samples) {
            return;
        }
        // The smallest latency at least `percentile` of the samples do not exceed.
        let rank = ((self.percentile * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                self.delay.store(upper(i), Release);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_what_their_bounds_say() {
        let mut previous = 0;
        let mut values: Vec<u64> = (0..64).map(|e| 1u64 << e).collect();
        values.extend([0, 3_000, 5_000_000, 999_999_999, u64::MAX]);
        values.extend((0..64).map(|e| (1u64 << e) - 1));
        values.sort_unstable();
        for nanos in values {
            let i = bucket(nanos);
            assert!(i >= previous, "{nanos}");
            previous = i;
            if i < BUCKETS - 1 {
                assert!(nanos < upper(i), "{nanos} < {}", upper(i));
                assert!(i == 0 || nanos >= upper(i - 1), "{nanos}");
            }
        }
        // A bucket is at most a quarter of its values wide.
        let i = bucket(5_000_000);
        assert!(upper(i) - upper(i - 1) <= upper(i) / 4);
    }

    #[tokio::test(start_paused = true)]
    async fn learns_the_percentile_after_min_samples() {
        let l = Learnt::new(0.95, 100, Duration::from_secs(10));
        let now = Instant::now();
        for i in 0..99 {
            let ms = if i % 20 == 0 { 1000 } else { 5 };
            l.record(now, Duration::from_millis(ms));
        }
        assert_eq!(l.delay(), None, "fewer than min_samples");
        l.record(now, Duration::from_millis(5));
        let d = l.delay().unwrap();
        // 5 of 100 took 1 s: the 95th percentile is in the 5 ms bucket.
        assert!(
            d >= Duration::from_millis(5) && d <= Duration::from_micros(6_300),
            "{d:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_window_learns_from_the_last_one() {
        let l = Learnt::new(0.5, 10, Duration::from_secs(1));
        let start = Instant::now();
        for _ in 0..10 {
            l.record(start, Duration::from_millis(5));
        }
        let fast = l.delay().unwrap();
        for _ in 0..10 {
            l.record(
                start + Duration::from_millis(1500),
                Duration::from_millis(80),
            );
        }
        // Still the first window's delay: the second has not ended.
        assert_eq!(l.delay(), Some(fast));
        l.record(
            start + Duration::from_millis(2500),
            Duration::from_millis(80),
        );
        assert!(l.delay().unwrap() >= Duration::from_millis(80));
        // Windows without calls keep the delay.
        l.record(start + Duration::from_secs(60), Duration::from_millis(1));
        assert!(l.delay().unwrap() >= Duration::from_millis(80));
    }
}
