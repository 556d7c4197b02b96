//! How an adaptive limit moves: plain functions of the current estimate and one sample, apart
//! from the futures that gather the samples (so tests drive them without a service).

use std::time::Duration;

/// One finished call, as an adaptive limit sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sample {
    /// From admission to the end of the response body.
    pub(crate) rtt: Duration,
    /// The fastest call in the sample (a window's; a single call's own `rtt`).
    pub(crate) lowest: Duration,
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

/// A limit that estimates the upstream's queue from its latency without a queue (Netflix
/// concurrency-limits' `VegasLimit`, after TCP Vegas): queue = limit × (1 − unloaded /
/// recent). A queue under `alpha` × log10(limit) grows the limit, one over `beta` ×
/// log10(limit) shrinks it, each by a step that grows with the logarithm of the limit; a drop
/// shrinks it too.
///
/// The latency without a queue is measured as Envoy's adaptive concurrency does: for the
/// first update, and then every `probe_every` updates, the limit is held at `min` and the
/// fastest call of that update is the unloaded latency; calls over `min` meanwhile are refused
/// (or wait), about 100 ms every 30 s with the defaults. (Netflix's version keeps the lowest
/// latency ever seen, which an upstream that is busy from the start never shows: its queue then
/// looks like its speed.)
///
/// ```
/// use steadfast_limit::Vegas;
///
/// let v = Vegas::default();
/// assert_eq!((v.initial, v.min, v.max, v.alpha, v.beta), (20, 2, 200, 3.0, 6.0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Vegas {
    /// The limit before any sample.
    pub initial: u32,
    /// The floor.
    pub min: u32,
    /// The ceiling.
    pub max: u32,
    /// Updates between two measurements of the unloaded latency (each holds the limit at
    /// `min` for one update). With the default sample window of 100 ms, 300 is about every
    /// 30 s (Envoy: 60 s).
    pub probe_every: u32,
    /// The queue (in units of log10(limit)) under which the limit grows (Netflix: 3).
    pub alpha: f64,
    /// The queue (in units of log10(limit)) over which the limit shrinks (Netflix: 6).
    pub beta: f64,
}

impl Default for Vegas {
    fn default() -> Self {
        Self {
            initial: 20,
            min: 2,
            max: 200,
            probe_every: 300,
            alpha: 3.0,
            beta: 6.0,
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
    /// Vegas: the latency without a queue, in seconds; updates until it is measured again;
    /// whether this update measures it (the limit is held at the floor meanwhile).
    lowest: f64,
    until_probe: u32,
    probing: bool,
}

impl Estimator {
    pub(crate) fn new(rule: Rule) -> Self {
        let (initial, _, _) = rule.bounds();
        Self {
            rule,
            limit: f64::from(initial),
            long_rtt: 0.0,
            long_count: 0,
            lowest: f64::INFINITY,
            until_probe: 0,
            probing: matches!(rule, Rule::Vegas(_)),
        }
    }

    /// The limit in force.
    pub(crate) fn limit(&self) -> u32 {
        let (_, min, max) = self.rule.bounds();
        if self.probing {
            return min;
        }
        // `as` saturates (and NaN gives 0): the clamp keeps it within the configured bounds.
        (self.limit.floor() as u32).clamp(min, max)
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
            Rule::Vegas(v) => {
                let fastest = s.lowest.as_secs_f64();
                if self.probing {
                    // This update ran at the floor: its fastest call met no queue.
                    if fastest > 0.0 && fastest.is_finite() {
                        self.lowest = fastest;
                    }
                    self.probing = false;
                    self.until_probe = v.probe_every;
                    return self.limit();
                }
                self.until_probe = self.until_probe.saturating_sub(1);
                if self.until_probe == 0 {
                    self.probing = true;
                }
                if fastest > 0.0 && fastest < self.lowest {
                    self.lowest = fastest;
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
                    let (alpha, beta) = (v.alpha * log, v.beta * log);
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

/// Samples gathered into windows before the rule sees them (Netflix concurrency-limits'
/// `WindowedLimit`): one update per window, from the window's mean latency, its highest
/// in-flight count, and whether any call in it was dropped. A rule fed every sample of a busy
/// client moves on noise; a window of a hundred calls moves on the trend.
#[derive(Clone, Debug)]
pub(crate) struct Windowed {
    pub(crate) estimator: Estimator,
    min_time: Duration,
    min_samples: u32,
    started: Option<tokio::time::Instant>,
    count: u32,
    rtt_sum: f64,
    lowest: Duration,
    in_flight: u32,
    dropped: bool,
}

impl Windowed {
    pub(crate) fn new(estimator: Estimator, min_time: Duration, min_samples: u32) -> Self {
        Self {
            estimator,
            min_time,
            min_samples: min_samples.max(1),
            started: None,
            count: 0,
            rtt_sum: 0.0,
            lowest: Duration::MAX,
            in_flight: 0,
            dropped: false,
        }
    }

    /// Adds a sample taken at `now`; returns the new limit when it closed a window.
    pub(crate) fn add(&mut self, s: Sample, now: tokio::time::Instant) -> Option<u32> {
        let started = *self.started.get_or_insert(now);
        self.count += 1;
        self.rtt_sum += s.rtt.as_secs_f64();
        self.lowest = self.lowest.min(s.lowest);
        self.in_flight = self.in_flight.max(s.in_flight);
        self.dropped |= s.dropped;
        if self.count < self.min_samples || now.saturating_duration_since(started) < self.min_time {
            return None;
        }
        let mean = self.rtt_sum / f64::from(self.count);
        let window = Sample {
            rtt: Duration::try_from_secs_f64(mean).unwrap_or(Duration::MAX),
            lowest: self.lowest,
            in_flight: self.in_flight,
            dropped: self.dropped,
        };
        self.started = None;
        self.count = 0;
        self.rtt_sum = 0.0;
        self.lowest = Duration::MAX;
        self.in_flight = 0;
        self.dropped = false;
        Some(self.estimator.update(window))
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
            lowest: rtt,
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
    fn vegas_measures_the_unloaded_latency_at_its_floor_first_and_then_now_and_then() {
        let vegas = Vegas {
            probe_every: 3,
            ..Vegas::default()
        };
        let mut e = Estimator::new(Rule::Vegas(vegas));
        assert_eq!(e.limit(), 2, "the first update runs at the floor");
        assert_eq!(e.update(ok(ms(10), 2)), 20, "then the initial limit");
        // Calls take twice the unloaded latency: a queue of 10 at a limit of 20, shrink.
        assert!(e.update(ok(ms(20), 20)) < 20);
        e.update(ok(ms(20), 20));
        assert_eq!(
            e.update(ok(ms(20), 20)),
            2,
            "every third update measures again"
        );
        // The upstream got slower for good: 20 ms is its new unloaded latency.
        let before = e.limit;
        e.update(ok(ms(20), 2));
        assert!(
            e.update(ok(ms(20), 20)) as f64 > before,
            "no queue at 20 ms now: grows"
        );
    }

    #[test]
    fn vegas_grows_without_a_queue_and_shrinks_with_one() {
        let mut e = Estimator::new(Rule::Vegas(Vegas::default()));
        e.update(ok(ms(10), 2));
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
    fn a_window_updates_once_from_its_mean_latency_highest_load_and_any_drop() {
        let start = tokio::time::Instant::now();
        let mut w = Windowed::new(
            Estimator::new(Rule::Aimd(Aimd::default())),
            Duration::from_millis(100),
            3,
        );
        assert_eq!(w.add(ok(ms(10), 15), start), None);
        assert_eq!(
            w.add(ok(ms(10), 1), start + ms(150)),
            None,
            "too few samples"
        );
        let dropped = Sample {
            dropped: true,
            ..ok(ms(10), 1)
        };
        assert_eq!(
            w.add(dropped, start + ms(150)),
            Some(18),
            "one backoff for the window"
        );
        assert_eq!(w.add(ok(ms(10), 18), start + ms(160)), None);
        assert_eq!(w.add(ok(ms(10), 1), start + ms(170)), None);
        assert_eq!(
            w.add(ok(ms(10), 1), start + ms(200)),
            None,
            "the window is 40 ms old"
        );
        assert_eq!(
            w.add(ok(ms(10), 1), start + ms(260)),
            Some(19),
            "busy at its peak"
        );
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
                            lowest: rtt,
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
