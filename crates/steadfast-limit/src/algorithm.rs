//! How an adaptive limit moves: plain functions of the current estimate and one sample, apart
//! from the futures that gather the samples (so tests drive them without a service).

use std::time::Duration;

/// One finished call, as an adaptive limit sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sample {
    /// From admission to the end of the response body.
    pub(crate) rtt: Duration,
    /// Calls in flight when this one was admitted, itself included.
    pub(crate) in_flight: u32,
    /// The upstream signalled overload: 429, 503, 504, gRPC `RESOURCE_EXHAUSTED` or
    /// `UNAVAILABLE`, or the call timed out.
    pub(crate) dropped: bool,
}

/// Additive increase, multiplicative decrease (Netflix concurrency-limits' `AIMDLimit`, TCP's
/// congestion rule): one more permit after a call that found the limit at least half used,
/// `backoff` times the limit after a drop or a call slower than `slow`.
///
/// ```
/// use std::time::Duration;
/// use steadfast_limit::Aimd;
///
/// let aimd = Aimd { initial: 20, min: 2, max: 200, backoff: 0.9, slow: Duration::from_secs(5) };
/// assert_eq!(aimd, Aimd::default());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Aimd {
    /// The limit before any sample.
    pub initial: u32,
    /// The floor.
    pub min: u32,
    /// The ceiling.
    pub max: u32,
    /// The factor applied on a drop, in (0, 1).
    pub backoff: f64,
    /// A call slower than this counts as a drop (Netflix's default: 5 s).
    pub slow: Duration,
}

impl Default for Aimd {
    fn default() -> Self {
        Self {
            initial: 20,
            min: 2,
            max: 200,
            backoff: 0.9,
            slow: Duration::from_secs(5),
        }
    }
}

/// A limit that follows the ratio of long-term to recent latency (Netflix concurrency-limits'
/// `Gradient2Limit`): while recent calls are no slower than `tolerance` times the long-term
/// average, the limit grows by `queue` per sample; as they slow down it shrinks, by at most
/// half per sample, smoothed. A drop also shrinks it by `backoff` (Netflix's version reads
/// latency only, and an upstream that sheds load answers fast: its refusals would look like
/// good latency and grow the limit).
///
/// ```
/// use steadfast_limit::Gradient2;
///
/// let g = Gradient2::default();
/// assert_eq!((g.initial, g.min, g.max, g.queue), (20, 2, 200, 4));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gradient2 {
    /// The limit before any sample.
    pub initial: u32,
    /// The floor.
    pub min: u32,
    /// The ceiling.
    pub max: u32,
    /// How much slower than the long-term average recent calls may be before the limit
    /// shrinks (≥ 1).
    pub tolerance: f64,
    /// The weight of a new estimate, in (0, 1].
    pub smoothing: f64,
    /// Samples the long-term average spans (an exponential average over this many).
    pub long_window: u32,
    /// Permits added above what the latency gradient allows: the queue the upstream may build.
    pub queue: u32,
    /// The factor applied on a drop, in (0, 1).
    pub backoff: f64,
}

impl Default for Gradient2 {
    fn default() -> Self {
        Self {
            initial: 20,
            min: 2,
            max: 200,
            tolerance: 1.5,
            smoothing: 0.2,
            long_window: 600,
            queue: 4,
            backoff: 0.9,
        }
    }
}

/// A limit that estimates the upstream's queue from the lowest latency seen (Netflix
/// concurrency-limits' `VegasLimit`, after TCP Vegas): queue = limit × (1 − lowest / recent).
/// A short queue grows the limit, a long one shrinks it, each by a step that grows with the
/// logarithm of the limit; a drop shrinks it too.
///
/// ```
/// use steadfast_limit::Vegas;
///
/// let v = Vegas::default();
/// assert_eq!((v.initial, v.min, v.max), (20, 2, 200));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Vegas {
    /// The limit before any sample.
    pub initial: u32,
    /// The floor.
    pub min: u32,
    /// The ceiling.
    pub max: u32,
    /// The lowest latency is forgotten and measured again after this many samples times the
    /// limit (Netflix's probe multiplier), so a move to a slower network is learnt.
    pub probe_every: u32,
}

impl Default for Vegas {
    fn default() -> Self {
        Self {
            initial: 20,
            min: 2,
            max: 200,
            probe_every: 30,
        }
    }
}

/// Which rule an adaptive limit follows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Rule {
    Aimd(Aimd),
    Gradient2(Gradient2),
    Vegas(Vegas),
}

impl Rule {
    pub(crate) fn bounds(&self) -> (u32, u32, u32) {
        match self {
            Rule::Aimd(a) => (a.initial, a.min, a.max),
            Rule::Gradient2(g) => (g.initial, g.min, g.max),
            Rule::Vegas(v) => (v.initial, v.min, v.max),
        }
    }
}

/// An adaptive limit's state between samples.
#[derive(Clone, Debug)]
pub(crate) struct Estimator {
    rule: Rule,
    /// The estimate, fractional (the limit in force is its integer part, at least `min`).
    limit: f64,
    /// Gradient2: the long-term latency average in seconds, and the samples it holds so far.
    long_rtt: f64,
    long_count: u32,
    /// Vegas: the lowest latency seen, in seconds, and samples until it is measured again.
    lowest: f64,
    until_probe: u64,
}

impl Estimator {
    pub(crate) fn new(rule: Rule) -> Self {
        let (initial, _, _) = rule.bounds();
        let mut e = Self {
            rule,
            limit: f64::from(initial),
            long_rtt: 0.0,
            long_count: 0,
            lowest: f64::INFINITY,
            until_probe: 0,
        };
        e.until_probe = e.probe_interval();
        e
    }

    /// The limit in force.
    pub(crate) fn limit(&self) -> u32 {
        let (_, min, max) = self.rule.bounds();
        // `as` saturates (and NaN gives 0): the clamp keeps it within the configured bounds.
        (self.limit.floor() as u32).clamp(min, max)
    }

    fn probe_interval(&self) -> u64 {
        match self.rule {
            Rule::Vegas(v) => u64::from(v.probe_every).saturating_mul(u64::from(self.limit())),
            _ => 0,
        }
    }

    /// Takes one sample; returns the limit in force after it.
    pub(crate) fn update(&mut self, s: Sample) -> u32 {
        let rtt = s.rtt.as_secs_f64();
        let limit = self.limit;
        let (_, min, max) = self.rule.bounds();
        let next = match self.rule {
            Rule::Aimd(a) => {
                if s.dropped || s.rtt > a.slow {
                    limit * a.backoff
                } else if f64::from(s.in_flight) * 2.0 >= limit {
                    limit + 1.0
                } else {
                    limit
                }
            }
            Rule::Gradient2(g) => {
                if s.dropped {
                    limit * g.backoff
                } else {
                    self.long_count = self.long_count.saturating_add(1);
                    // An exponential average over `long_window` samples; a plain mean while
                    // fewer have arrived, so the first sample is not weighed against zero.
                    let n = f64::from(self.long_count.min(g.long_window.max(1)));
                    self.long_rtt += (rtt - self.long_rtt) / n;
                    // A recent latency far below the long-term one (a slow period ended):
                    // let the long-term average catch up faster.
                    if rtt > 0.0 && self.long_rtt / rtt > 2.0 {
                        self.long_rtt *= 0.95;
                    }
                    if f64::from(s.in_flight) < limit / 2.0 {
                        // Not enough demand to learn anything about the upstream's capacity.
                        limit
                    } else {
                        let gradient = if rtt > 0.0 {
                            (g.tolerance * self.long_rtt / rtt).clamp(0.5, 1.0)
                        } else {
                            1.0
                        };
                        let target = limit * gradient + f64::from(g.queue);
                        limit * (1.0 - g.smoothing) + target * g.smoothing
                    }
                }
            }
            Rule::Vegas(_) => {
                self.until_probe = self.until_probe.saturating_sub(1);
                if self.until_probe == 0 {
                    // Forget the lowest latency: the next sample sets it again.
                    self.lowest = f64::INFINITY;
                    self.until_probe = self.probe_interval().max(1);
                }
                if rtt > 0.0 && rtt < self.lowest {
                    self.lowest = rtt;
                }
                let log = limit.max(1.0).log10().max(1.0);
                if s.dropped {
                    limit - log
                } else if f64::from(s.in_flight) * 2.0 < limit {
                    limit
                } else {
                    let queue = if rtt > 0.0 && self.lowest.is_finite() {
                        (limit * (1.0 - self.lowest / rtt)).ceil()
                    } else {
                        0.0
                    };
                    let (alpha, beta) = (3.0 * log, 6.0 * log);
                    if queue <= log {
                        limit + beta
                    } else if queue < alpha {
                        limit + log
                    } else if queue > beta {
                        limit - log
                    } else {
                        limit
                    }
                }
            }
        };
        self.limit = if next.is_finite() {
            next.clamp(f64::from(min), f64::from(max))
        } else {
            limit
        };
        self.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ok(rtt: Duration, in_flight: u32) -> Sample {
        Sample {
            rtt,
            in_flight,
            dropped: false,
        }
    }

    #[test]
    fn aimd_grows_by_one_when_busy_and_backs_off_on_a_drop() {
        let mut e = Estimator::new(Rule::Aimd(Aimd::default()));
        assert_eq!(e.update(ok(ms(10), 10)), 21);
        assert_eq!(e.update(ok(ms(10), 3)), 21, "half idle: no growth");
        let dropped = Sample {
            dropped: true,
            ..ok(ms(10), 21)
        };
        assert_eq!(e.update(dropped), 18); // 21 × 0.9 = 18.9
        assert_eq!(
            e.update(ok(Duration::from_secs(6), 18)),
            17,
            "slow counts as a drop"
        );
    }

    #[test]
    fn aimd_stays_within_its_bounds() {
        let aimd = Aimd {
            initial: 3,
            min: 2,
            max: 4,
            ..Aimd::default()
        };
        let mut e = Estimator::new(Rule::Aimd(aimd));
        for _ in 0..10 {
            e.update(ok(ms(1), 100));
        }
        assert_eq!(e.limit(), 4);
        for _ in 0..100 {
            e.update(Sample {
                dropped: true,
                ..ok(ms(1), 4)
            });
        }
        assert_eq!(e.limit(), 2);
    }

    #[test]
    fn gradient2_grows_at_steady_latency_and_shrinks_when_it_rises() {
        let mut e = Estimator::new(Rule::Gradient2(Gradient2::default()));
        for _ in 0..50 {
            e.update(ok(ms(10), 200));
        }
        let grown = e.limit();
        assert!(grown > 20, "steady latency, full use: grows ({grown})");
        for _ in 0..20 {
            e.update(ok(ms(100), 200));
        }
        assert!(
            e.limit() < grown / 2,
            "latency ×10: shrinks ({})",
            e.limit()
        );
    }

    #[test]
    fn gradient2_does_not_grow_while_half_idle() {
        let mut e = Estimator::new(Rule::Gradient2(Gradient2::default()));
        for _ in 0..50 {
            e.update(ok(ms(10), 5));
        }
        assert_eq!(e.limit(), 20);
    }

    #[test]
    fn gradient2_shrinks_on_fast_refusals() {
        let mut e = Estimator::new(Rule::Gradient2(Gradient2::default()));
        for _ in 0..10 {
            e.update(Sample {
                dropped: true,
                ..ok(ms(1), 20)
            });
        }
        assert!(e.limit() < 10, "{}", e.limit());
    }

    #[test]
    fn vegas_grows_without_a_queue_and_shrinks_with_one() {
        let mut e = Estimator::new(Rule::Vegas(Vegas::default()));
        for _ in 0..5 {
            e.update(ok(ms(10), 200));
        }
        let grown = e.limit();
        assert!(grown > 20, "{grown}");
        for _ in 0..20 {
            e.update(ok(ms(40), 200));
        }
        assert!(e.limit() < grown, "{} < {grown}", e.limit());
    }

    #[test]
    fn samples_at_the_extremes_keep_the_limit_in_bounds() {
        for rule in [
            Rule::Aimd(Aimd::default()),
            Rule::Gradient2(Gradient2::default()),
            Rule::Vegas(Vegas::default()),
        ] {
            let mut e = Estimator::new(rule);
            for rtt in [Duration::ZERO, Duration::MAX, ms(1), Duration::ZERO] {
                for in_flight in [0, 1, u32::MAX] {
                    for dropped in [false, true] {
                        let l = e.update(Sample {
                            rtt,
                            in_flight,
                            dropped,
                        });
                        assert!((2..=200).contains(&l), "{rule:?}: {l}");
                    }
                }
            }
        }
    }
}
