//! Exponential backoff with jitter, one random stream per request.

use std::time::Duration;

/// How a computed backoff is randomised (see Brooker, "Exponential Backoff And Jitter").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Uniform in `[0, exp]`: the least total work under contention (default).
    #[default]
    Full,
    /// `exp / 2` plus uniform in `[0, exp / 2]`.
    Equal,
    /// Uniform in `[base, 3 × previous]`, capped (AWS's "decorrelated jitter").
    Decorrelated,
    /// Exactly `exp` (for tests and the seed's fixed schedule).
    None,
}

/// Exponential backoff: the `n`-th retry waits about `min(cap, base × 2^(n-1))`.
///
/// Defaults: base 100 ms, cap 10 s (the seed's cap), [`Jitter::Full`].
///
/// ```
/// use std::time::Duration;
/// use steadfast_retry::{Backoff, Jitter};
///
/// // The seed's schedule: min(1000 · 2^(n-1), 10000) ms.
/// let seed = Backoff::new(Duration::from_secs(1), Duration::from_secs(10)).jitter(Jitter::None);
/// let delays: Vec<_> = (1..=5).map(|n| seed.exponential(n).as_millis()).collect();
/// assert_eq!(delays, [1000, 2000, 4000, 8000, 10000]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    /// Exponential from `base`, capped at `cap`, with full jitter.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            jitter: Jitter::Full,
        }
    }

    /// Sets the jitter mode.
    #[must_use]
    pub const fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The base delay.
    pub const fn base(&self) -> Duration {
        self.base
    }

    /// The cap.
    pub const fn cap(&self) -> Duration {
        self.cap
    }

    /// The exponential value for retry `n` (1-based), before jitter.
    pub fn exponential(&self, n: u32) -> Duration {
        let shift = n.saturating_sub(1).min(31);
        self.base.saturating_mul(1 << shift).min(self.cap)
    }

    /// The longest `retries` waits can add up to, jitter included: each exponential wait at
    /// its largest, or for [`Jitter::Decorrelated`] each up to three times the one before
    /// (from three times the base), capped (saturating; O(1) once the delay stops growing, so
    /// `u32::MAX` retries cost nothing).
    ///
    /// ```
    /// use std::time::Duration;
    /// use steadfast_retry::{Backoff, Jitter};
    ///
    /// let b = Backoff::new(Duration::from_millis(100), Duration::from_millis(300));
    /// // 100 + 200 + 300 + 300
    /// assert_eq!(b.worst_case_total(4), Duration::from_millis(900));
    /// // Decorrelated jitter can wait up to three times the last wait: 300 + 300 + ...
    /// let d = Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
    ///     .jitter(Jitter::Decorrelated);
    /// assert_eq!(d.worst_case_total(2), Duration::from_millis(300 + 900));
    /// // Saturates instead of overflowing.
    /// let huge = Backoff::new(Duration::from_secs(u64::MAX / 2), Duration::MAX);
    /// assert_eq!(huge.worst_case_total(u32::MAX), Duration::MAX);
    /// ```
    pub fn worst_case_total(&self, retries: u32) -> Duration {
        let mut total = Duration::ZERO;
        let mut previous = self.base;
        for n in 1..=retries {
            let delay = match self.jitter {
                Jitter::Decorrelated => {
                    previous = previous.max(self.base).saturating_mul(3).min(self.cap);
                    previous
                }
                _ => self.exponential(n),
            };
            if delay == self.cap || n > 31 {
                // Every remaining wait is this one.
                return total.saturating_add(delay.saturating_mul(retries - n + 1));
            }
            total = total.saturating_add(delay);
        }
        total
    }

    /// The delay before retry `n` (1-based); `previous` is the last delay (for
    /// [`Jitter::Decorrelated`]).
    pub(crate) fn delay(&self, n: u32, previous: Duration, rng: &mut Rng) -> Duration {
        let exp = self.exponential(n);
        match self.jitter {
            Jitter::None => exp,
            Jitter::Full => exp.mul_f64(rng.unit()),
            Jitter::Equal => exp / 2 + (exp / 2).mul_f64(rng.unit()),
            Jitter::Decorrelated => {
                let lo = self.base.min(self.cap);
                let hi = previous.max(self.base).saturating_mul(3).min(self.cap);
                if hi <= lo {
                    lo
                } else {
                    lo + (hi - lo).mul_f64(rng.unit())
                }
            }
        }
    }
}

/// The seedable random stream jitter draws from (the workspace's one source, from
/// `steadfast-core`). Each request that retries gets its own.
pub(crate) use steadfast_core::__private::rand::Rng;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_delay_lies_within_its_bounds(
            base_ms in 1u64..5_000,
            cap_ms in 1u64..60_000,
            n in 1u32..40,
            prev_ms in 0u64..60_000,
            seed in any::<u64>(),
        ) {
            let (base, cap, prev) = (Duration::from_millis(base_ms), Duration::from_millis(cap_ms), Duration::from_millis(prev_ms));
            let mut rng = super::Rng::seeded(seed);
            let exp = Backoff::new(base, cap).exponential(n);
            prop_assert!(exp <= cap);
            prop_assert_eq!(exp, base.saturating_mul(1 << (n - 1).min(31)).min(cap));
            let full = Backoff::new(base, cap).jitter(Jitter::Full).delay(n, prev, &mut rng);
            prop_assert!(full <= exp);
            let equal = Backoff::new(base, cap).jitter(Jitter::Equal).delay(n, prev, &mut rng);
            prop_assert!(equal >= exp / 2 && equal <= exp);
            let none = Backoff::new(base, cap).jitter(Jitter::None).delay(n, prev, &mut rng);
            prop_assert_eq!(none, exp);
            let dec = Backoff::new(base, cap).jitter(Jitter::Decorrelated).delay(n, prev, &mut rng);
            prop_assert!(dec <= cap);
            prop_assert!(dec >= base.min(cap));
            prop_assert!(dec <= prev.max(base).saturating_mul(3).max(base.min(cap)));
        }
    }

    proptest! {
        /// What the waits of one call add up to never exceeds `worst_case_total`, whatever
        /// the jitter (decorrelated jitter may wait three times its last wait: a hostile
        /// pass found the bound ignoring that).
        #[test]
        fn the_waits_of_a_call_never_exceed_the_worst_case(
            base_ms in 0u64..5_000,
            extra_ms in 0u64..60_000,
            retries in 1u32..12,
            jitter in prop_oneof![Just(Jitter::None), Just(Jitter::Full), Just(Jitter::Equal), Just(Jitter::Decorrelated)],
            seed in any::<u64>(),
        ) {
            let base = Duration::from_millis(base_ms);
            let b = Backoff::new(base, base + Duration::from_millis(extra_ms)).jitter(jitter);
            let mut rng = super::Rng::seeded(seed);
            let (mut total, mut prev) = (Duration::ZERO, Duration::ZERO);
            for n in 1..=retries {
                let d = b.delay(n, prev, &mut rng);
                total += d;
                prev = d;
            }
            prop_assert!(total <= b.worst_case_total(retries), "{total:?} > {:?}", b.worst_case_total(retries));
        }
    }

    /// SplitMix64's published outputs for seed 0.
    #[test]
    fn rng_is_splitmix64() {
        let mut r = super::Rng::seeded(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(r.next_u64(), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn decorrelated_jitter_varies_and_grows_from_the_previous_delay() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
            .jitter(Jitter::Decorrelated);
        let mut rng = super::Rng::seeded(3);
        let delays: Vec<_> = (0..20)
            .map(|_| b.delay(1, Duration::from_secs(1), &mut rng))
            .collect();
        assert!(
            delays.iter().any(|d| *d > Duration::from_millis(500)),
            "spreads up to 3 × previous"
        );
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 10, "random, not constant");
        // With no room above the base (cap == base), it is exactly the base.
        let flat = Backoff::new(Duration::from_millis(100), Duration::from_millis(100))
            .jitter(Jitter::Decorrelated);
        assert_eq!(
            flat.delay(1, Duration::ZERO, &mut rng),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn streams_differ_by_seed_and_repeat_with_it() {
        let b = Backoff::default();
        let run = |seed| {
            let mut r = super::Rng::seeded(seed);
            (1..=3)
                .map(|n| b.delay(n, Duration::ZERO, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
