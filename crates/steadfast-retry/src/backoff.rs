//! Backoff schedules (exponential, linear, constant, your own) with jitter, one random
//! stream per request.

use std::time::Duration;

/// How a computed backoff is randomised (see Brooker, "Exponential Backoff And Jitter").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Uniform in `[0, d]`: the least total work under contention (default; gRPC A6's
    /// `random(0, min(initialBackoff × multiplier^(n-1), maxBackoff))`).
    #[default]
    Full,
    /// `d / 2` plus uniform in `[0, d / 2]`.
    Equal,
    /// Uniform in `[base, 3 × previous]`, capped (AWS's "decorrelated jitter"); replaces the
    /// schedule.
    Decorrelated,
    /// Uniform in `[d × (1 − p), d × (1 + p)]` for `p` percent (0-100), capped: gRPC's
    /// connection backoff jitter (±20 %) and resilience4j's `randomizationFactor` (0.5 =
    /// 50 %).
    ///
    /// ```
    /// use std::time::Duration;
    /// use steadfast_retry::{Backoff, Jitter};
    ///
    /// // gRPC's connection backoff: 1 s × 1.6^(n-1) up to 120 s, ±20 %.
    /// let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(120))
    ///     .multiplier(1.6)
    ///     .jitter(Jitter::Proportional(20));
    /// // Three waits are at most (1 + 1.6 + 2.56) s × 1.2.
    /// assert!(b.worst_case_total(3) <= Duration::from_millis(6_192));
    /// ```
    Proportional(u8),
    /// Exactly `d` (for tests and the seed's fixed schedule).
    None,
}

/// A user-given schedule: the wait before retry `n` (1-based), before jitter and the cap.
pub type CustomSchedule = fn(u32) -> Duration;

/// What the wait before retry `n` is, before jitter.
#[derive(Clone, Copy, Debug)]
enum Schedule {
    /// `base × multiplier^(n-1)`, the multiplier in thousandths.
    Exponential { multiplier_milli: u32 },
    /// `base + step × (n-1)`.
    Linear { step: Duration },
    /// A function of `n`.
    Custom(CustomSchedule),
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Self::Exponential {
                    multiplier_milli: a,
                },
                Self::Exponential {
                    multiplier_milli: b,
                },
            ) => a == b,
            (Self::Linear { step: a }, Self::Linear { step: b }) => a == b,
            // The same function, by address.
            (Self::Custom(a), Self::Custom(b)) => *a as usize == *b as usize,
            _ => false,
        }
    }
}

impl Eq for Schedule {}

/// How long to wait before each retry: a schedule (exponential by default; linear,
/// constant, or a function of your own), then [`Jitter`], and never more than the cap.
///
/// Defaults: exponential ×2 from 100 ms, capped at 10 s (the seed's cap), [`Jitter::Full`].
///
/// ```
/// use std::time::Duration;
/// use steadfast_retry::{Backoff, Jitter};
///
/// // The seed's schedule: min(1000 · 2^(n-1), 10000) ms.
/// let seed = Backoff::new(Duration::from_secs(1), Duration::from_secs(10)).jitter(Jitter::None);
/// let delays: Vec<_> = (1..=5).map(|n| seed.exponential(n).as_millis()).collect();
/// assert_eq!(delays, [1000, 2000, 4000, 8000, 10000]);
///
/// // gRPC A6's policy: initialBackoff 0.1 s, multiplier 1.6, maxBackoff 1 s, full jitter.
/// let grpc = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).multiplier(1.6);
/// assert_eq!(grpc.exponential(3), Duration::from_millis(256));
///
/// // Linear and constant.
/// let linear = Backoff::linear(Duration::from_millis(100), Duration::from_millis(50), Duration::from_secs(1));
/// assert_eq!(linear.exponential(4), Duration::from_millis(250));
/// assert_eq!(Backoff::constant(Duration::from_millis(200)).exponential(7), Duration::from_millis(200));
///
/// // Your own: Fibonacci steps of 100 ms, capped at 2 s.
/// fn fibonacci(n: u32) -> Duration {
///     let (mut a, mut b) = (1u64, 1u64);
///     for _ in 1..n { (a, b) = (b, a + b); }
///     Duration::from_millis(100 * a)
/// }
/// let fib = Backoff::custom(fibonacci, Duration::from_secs(2));
/// assert_eq!(fib.exponential(5), Duration::from_millis(500));
/// assert_eq!(fib.exponential(20), Duration::from_secs(2));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: Jitter,
    schedule: Schedule,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    /// Exponential ×2 from `base`, capped at `cap`, with full jitter.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            jitter: Jitter::Full,
            schedule: Schedule::Exponential {
                multiplier_milli: 2000,
            },
        }
    }

    /// The same wait before every retry (with full jitter unless [`jitter`](Self::jitter)
    /// says otherwise).
    pub const fn constant(delay: Duration) -> Self {
        Self {
            base: delay,
            cap: delay,
            jitter: Jitter::Full,
            schedule: Schedule::Linear {
                step: Duration::ZERO,
            },
        }
    }

    /// `base`, then `step` longer before each further retry, capped at `cap`.
    pub const fn linear(base: Duration, step: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            jitter: Jitter::Full,
            schedule: Schedule::Linear { step },
        }
    }

    /// Your own schedule: `f(n)` before retry `n` (1-based), capped at `cap` and then
    /// jittered. `base()` is `f(1)`.
    pub fn custom(f: CustomSchedule, cap: Duration) -> Self {
        Self {
            base: f(1).min(cap),
            cap,
            jitter: Jitter::Full,
            schedule: Schedule::Custom(f),
        }
    }

    /// For an exponential schedule, the factor between successive waits (default 2; gRPC
    /// A6's `backoffMultiplier`, e.g. 1.6). Kept to three decimals; values that are not
    /// finite or not above zero leave it unchanged. No effect on other schedules.
    #[must_use]
    pub fn multiplier(mut self, factor: f64) -> Self {
        if let Schedule::Exponential { multiplier_milli } = &mut self.schedule {
            if factor.is_finite() && factor > 0.0 {
                *multiplier_milli = (factor * 1000.0).round().clamp(1.0, u32::MAX as f64) as u32;
            }
        }
        self
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

    /// The scheduled wait before retry `n` (1-based), capped, before jitter. (Named for the
    /// default schedule; it follows whichever schedule the backoff has.)
    pub fn exponential(&self, n: u32) -> Duration {
        let n = n.max(1);
        let d = match self.schedule {
            Schedule::Exponential {
                multiplier_milli: 2000,
            } => {
                let shift = (n - 1).min(31);
                self.base.saturating_mul(1 << shift)
            }
            Schedule::Exponential { multiplier_milli } => {
                let factor =
                    (f64::from(multiplier_milli) / 1000.0).powi((n - 1).min(1 << 20) as i32);
                let secs = self.base.as_secs_f64() * factor;
                Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
            }
            Schedule::Linear { step } => self.base.saturating_add(step.saturating_mul(n - 1)),
            Schedule::Custom(f) => f(n),
        };
        d.min(self.cap)
    }

    /// The longest `retries` waits can add up to, jitter included: each scheduled wait at
    /// its largest (for [`Jitter::Proportional`] `p` % more, within the cap), or for
    /// [`Jitter::Decorrelated`] each up to three times the one before (from three times the
    /// base), capped (saturating; O(1) once the delay stops growing for the built-in
    /// schedules, so `u32::MAX` retries cost nothing).
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
        /// Past this many retries every further wait counts as the cap (an upper bound).
        const EXACT: u32 = 64;
        // Schedules that never shrink: once a wait reaches the cap, every later one is it,
        // and a server's hint, which restarts the schedule, only ever makes waits shorter.
        let grows = match self.schedule {
            Schedule::Exponential { multiplier_milli } => multiplier_milli >= 1000,
            Schedule::Linear { .. } => true,
            Schedule::Custom(_) => false,
        } || matches!(self.jitter, Jitter::Decorrelated);
        let mut total = Duration::ZERO;
        let mut longest = Duration::ZERO;
        let mut previous = self.base;
        for n in 1..=retries.min(EXACT) {
            let delay = match self.jitter {
                Jitter::Decorrelated => {
                    previous = previous.max(self.base).saturating_mul(3).min(self.cap);
                    previous
                }
                Jitter::Proportional(p) => {
                    scale(self.exponential(n), 1.0 + proportion(p)).min(self.cap)
                }
                _ => self.exponential(n),
            };
            longest = longest.max(delay);
            if grows && delay == self.cap {
                return total.saturating_add(delay.saturating_mul(retries - n + 1));
            }
            total = total.saturating_add(delay);
        }
        if grows {
            return total.saturating_add(self.cap.saturating_mul(retries.saturating_sub(EXACT)));
        }
        // A schedule that can shrink: a hint restarts it, so any wait can be its longest.
        if retries > EXACT {
            longest = self.cap;
        }
        longest.saturating_mul(retries)
    }

    /// The delay before retry `n` (1-based); `previous` is the last delay (for
    /// [`Jitter::Decorrelated`]).
    pub(crate) fn delay(&self, n: u32, previous: Duration, rng: &mut Rng) -> Duration {
        let d = self.exponential(n);
        match self.jitter {
            Jitter::None => d,
            Jitter::Full => d.mul_f64(rng.unit()),
            Jitter::Equal => d / 2 + (d / 2).mul_f64(rng.unit()),
            Jitter::Proportional(p) => {
                let p = proportion(p);
                scale(d, 1.0 - p + 2.0 * p * rng.unit()).min(self.cap)
            }
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

/// `d × factor`, saturating at `Duration::MAX` (`mul_f64` panics past it).
fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

/// `p` percent as a fraction, at most 1.
fn proportion(p: u8) -> f64 {
    f64::from(p.min(100)) / 100.0
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
            jitter in prop_oneof![Just(Jitter::None), Just(Jitter::Full), Just(Jitter::Equal), Just(Jitter::Decorrelated), (0u8..=120).prop_map(Jitter::Proportional)],
            schedule in 0u8..5,
            multiplier in 0.5f64..4.0,
            seed in any::<u64>(),
        ) {
            let base = Duration::from_millis(base_ms);
            let cap = base + Duration::from_millis(extra_ms);
            fn wobbly(n: u32) -> Duration {
                Duration::from_millis(u64::from(n % 4) * 700 + 50)
            }
            let b = match schedule {
                0 => Backoff::new(base, cap),
                1 => Backoff::new(base, cap).multiplier(multiplier),
                2 => Backoff::linear(base, Duration::from_millis(extra_ms / 3), cap),
                3 => Backoff::constant(base),
                _ => Backoff::custom(wobbly, cap),
            }
            .jitter(jitter);
            let mut rng = super::Rng::seeded(seed);
            let (mut total, mut prev) = (Duration::ZERO, Duration::ZERO);
            for n in 1..=retries {
                let d = b.delay(n, prev, &mut rng);
                total += d;
                prev = d;
            }
            prop_assert!(total <= b.worst_case_total(retries), "{total:?} > {:?}", b.worst_case_total(retries));
            prop_assert!(b.worst_case_total(u32::MAX) >= b.worst_case_total(retries));
        }

        /// Proportional jitter stays within ±p % of the scheduled wait, and within the cap.
        #[test]
        fn proportional_jitter_stays_within_its_band(
            base_ms in 1u64..5_000,
            cap_ms in 1u64..60_000,
            n in 1u32..20,
            p in 0u8..=100,
            seed in any::<u64>(),
        ) {
            let b = Backoff::new(Duration::from_millis(base_ms), Duration::from_millis(cap_ms))
                .jitter(Jitter::Proportional(p));
            let d = b.exponential(n);
            let got = b.delay(n, Duration::ZERO, &mut super::Rng::seeded(seed));
            let f = f64::from(p) / 100.0;
            prop_assert!(got >= d.mul_f64(1.0 - f).saturating_sub(Duration::from_nanos(1)));
            prop_assert!(got <= d.mul_f64(1.0 + f).min(b.cap()) + Duration::from_nanos(1));
        }
    }

    #[test]
    fn schedules_follow_their_formula() {
        let ms = Duration::from_millis;
        let grpc = Backoff::new(ms(100), ms(1000)).multiplier(1.6);
        let waits: Vec<u128> = (1..=6).map(|n| grpc.exponential(n).as_millis()).collect();
        assert_eq!(waits, [100, 160, 256, 409, 655, 1000]);
        let linear = Backoff::linear(ms(100), ms(100), ms(350));
        let waits: Vec<u128> = (1..=5).map(|n| linear.exponential(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 300, 350, 350]);
        assert_eq!(Backoff::constant(ms(250)).worst_case_total(4), ms(1000));
        // Bad multipliers leave the default.
        assert_eq!(
            Backoff::new(ms(100), ms(1000))
                .multiplier(f64::NAN)
                .exponential(2),
            ms(200)
        );
        assert_eq!(
            Backoff::new(ms(100), ms(1000))
                .multiplier(-1.0)
                .exponential(2),
            ms(200)
        );
        // Huge multipliers saturate at the cap.
        assert_eq!(
            Backoff::new(ms(100), ms(1000))
                .multiplier(1e300)
                .exponential(40),
            ms(1000)
        );
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
