//! The breaker's shared state machine: atomics only.
//!
//! One 64-bit word holds the state tag (3 bits) and a generation number (the rest); every
//! transition bumps the generation with a compare-and-swap, so an outcome admitted under an
//! earlier generation can never decide the current state (pinned semantics 4). Half-open
//! probes live in a second word keyed by the generation's low 32 bits.

use crate::sync::{
    AtomicU32, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::error::BreakerOpen;
use crate::window::{CountWindow, TimeWindow, WindowCounts};

/// A breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls pass; outcomes are counted.
    Closed,
    /// Calls fail fast with [`BreakerOpen`] until the open time has passed.
    Open,
    /// A limited number of probes pass; their verdict closes or re-opens the breaker.
    HalfOpen,
    /// Set by hand: every call passes, nothing is counted towards a trip.
    Disabled,
    /// Set by hand: every call fails fast.
    ForcedOpen,
    /// Set by hand: every call passes, outcomes are recorded in metrics, never a trip.
    MetricsOnly,
}

impl State {
    /// A stable lower-case name (`closed`, `open`, `half_open`, `disabled`, `forced_open`,
    /// `metrics_only`) for logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::Disabled => "disabled",
            State::ForcedOpen => "forced_open",
            State::MetricsOnly => "metrics_only",
        }
    }
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const DISABLED: u64 = 3;
const FORCED_OPEN: u64 = 4;
const METRICS_ONLY: u64 = 5;
const TAG: u64 = 0b111;

fn tag_of(s: State) -> u64 {
    match s {
        State::Closed => CLOSED,
        State::Open => OPEN,
        State::HalfOpen => HALF_OPEN,
        State::Disabled => DISABLED,
        State::ForcedOpen => FORCED_OPEN,
        State::MetricsOnly => METRICS_ONLY,
    }
}

fn state_of(word: u64) -> State {
    match word & TAG {
        CLOSED => State::Closed,
        OPEN => State::Open,
        HALF_OPEN => State::HalfOpen,
        DISABLED => State::Disabled,
        FORCED_OPEN => State::ForcedOpen,
        _ => State::MetricsOnly,
    }
}

fn next(word: u64, to: u64) -> u64 {
    ((word >> 3).wrapping_add(1) << 3) | to
}

/// A state change, as seen by subscribers and the `steadfast::breaker` tracing target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
    /// When (tokio time).
    pub at: Instant,
    /// The generation entered (increases by one per transition).
    pub generation: u64,
    /// For `to == Open`: how long until a probe is allowed.
    pub open_for: Option<Duration>,
}

/// How rates are measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WindowKind {
    Count { size: u32 },
    Time { width: Duration, buckets: u32 },
}

/// The trip and recovery policy (validated by the builder).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    pub(crate) consecutive: Option<u32>,
    pub(crate) window: Option<WindowKind>,
    pub(crate) min_calls: u32,
    pub(crate) failure_rate: Option<u8>,
    pub(crate) slow: Option<(Duration, u8)>,
    pub(crate) open_time: Duration,
    pub(crate) max_open_time: Duration,
    pub(crate) jitter_percent: u8,
    pub(crate) probes: u32,
    pub(crate) seed: u64,
}

#[derive(Debug)]
enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded<T>(T);

/// The state shared by every service and handle of one breaker.
#[derive(Debug)]
pub(crate) struct Shared {
    word: Padded<AtomicU64>,
    consecutive: Padded<AtomicU32>,
    /// Half-open probes: generation low 32 bits | taken (16) | successes (16).
    half: AtomicU64,
    /// Nanoseconds since `base` when an Open breaker admits a probe.
    open_until: AtomicU64,
    /// Nanoseconds since `base` of the last trip.
    opened_at: AtomicU64,
    /// Nanoseconds since `base` by which a HalfOpen breaker must reach a verdict.
    verdict_by: AtomicU64,
    /// Consecutive trips since the last close (open time grows with it).
    trips: AtomicU32,
    rng: AtomicU64,
    window: Option<Window>,
    pub(crate) policy: Policy,
    base: Instant,
    events: broadcast::Sender<Transition>,
}

/// A call's admission ticket: the state word it was admitted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Permit {
    Pass(u64),
    Probe(u64),
}

impl Shared {
    pub(crate) fn new(policy: Policy) -> Self {
        let window = policy.window.map(|w| match w {
            WindowKind::Count { size } => Window::Count(CountWindow::new(size)),
            WindowKind::Time { width, buckets } => Window::Time(TimeWindow::new(width, buckets)),
        });
        Self {
            word: Padded(AtomicU64::new(CLOSED)),
            consecutive: Padded(AtomicU32::new(0)),
            half: AtomicU64::new(0),
            open_until: AtomicU64::new(0),
            opened_at: AtomicU64::new(0),
            verdict_by: AtomicU64::new(0),
            trips: AtomicU32::new(0),
            rng: AtomicU64::new(policy.seed),
            window,
            policy,
            base: Instant::now(),
            events: broadcast::channel(64).0,
        }
    }

    /// Nanoseconds since the breaker was made, plus one (so a reading is never zero).
    pub(crate) fn clock(&self) -> u64 {
        self.now().saturating_add(1)
    }

    fn now(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64
    }

    pub(crate) fn state(&self) -> State {
        state_of(self.word.0.load(Acquire))
    }

    pub(crate) fn generation(&self) -> u64 {
        self.word.0.load(Acquire) >> 3
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.events.subscribe()
    }

    /// Whether the breaker needs per-call timing (slow calls or a time window).
    pub(crate) fn needs_clock(&self) -> bool {
        self.policy.slow.is_some() || matches!(self.window, Some(Window::Time(_)))
    }

    pub(crate) fn slow_threshold(&self) -> Option<Duration> {
        self.policy.slow.map(|s| s.0)
    }

    /// How long until an Open breaker would admit a probe (zero if it would now); `None` when
    /// the state admits calls or never will by itself.
    pub(crate) fn wait_hint(&self) -> Option<Duration> {
        let w = self.word.0.load(Acquire);
        match w & TAG {
            OPEN => {
                let (now, until) = (self.now(), self.open_until.load(Acquire));
                Some(Duration::from_nanos(until.saturating_sub(now)))
            }
            _ => None,
        }
    }

    /// Decides admission. Never blocks; never allocates.
    #[inline]
    pub(crate) fn admit(&self) -> Result<Permit, BreakerOpen> {
        let w = self.word.0.load(Acquire);
        match w & TAG {
            CLOSED | DISABLED | METRICS_ONLY => Ok(Permit::Pass(w)),
            FORCED_OPEN => Err(BreakerOpen::new(None)),
            OPEN => {
                let now = self.now();
                let until = self.open_until.load(Acquire);
                if now < until {
                    return Err(BreakerOpen::new(Some(Duration::from_nanos(until - now))));
                }
                // Pinned semantics 1: Open -> HalfOpen at now >= opened_at + open_time.
                let half = next(w, HALF_OPEN);
                let open_for = until.saturating_sub(self.opened_at.load(Relaxed));
                self.verdict_by
                    .store(now.saturating_add(open_for.max(1)), Release);
                if self.cas(w, half, None) {
                    return self.take_probe(half, now);
                }
                self.admit()
            }
            _ => self.take_probe(w, self.now()),
        }
    }

    fn take_probe(&self, w: u64, now: u64) -> Result<Permit, BreakerOpen> {
        let gen32 = (w >> 3) as u32;
        let mut h = self.half.load(Acquire);
        loop {
            let (g, taken, succ) = unpack(h);
            let (taken, succ) = if g == gen32 { (taken, succ) } else { (0, 0) };
            if u32::from(taken) >= self.policy.probes {
                // No verdict within the open time: re-open (pinned semantics 3).
                if now >= self.verdict_by.load(Acquire) {
                    self.trip(w, None);
                }
                let retry = self.verdict_by.load(Acquire).saturating_sub(now);
                return Err(BreakerOpen::new(Some(Duration::from_nanos(retry.max(1)))));
            }
            match self
                .half
                .compare_exchange_weak(h, pack(gen32, taken + 1, succ), AcqRel, Acquire)
            {
                Ok(_) => return Ok(Permit::Probe(w)),
                Err(actual) => h = actual,
            }
        }
    }

    /// A probe ended without a verdict (dropped or cancelled): give its permit back.
    pub(crate) fn return_probe(&self, w: u64) {
        let gen32 = (w >> 3) as u32;
        let _ = self.half.fetch_update(AcqRel, Acquire, |h| {
            let (g, taken, succ) = unpack(h);
            (g == gen32 && taken > 0).then(|| pack(g, taken - 1, succ))
        });
    }

    /// Records a finished call admitted with `permit`.
    pub(crate) fn on_outcome(
        &self,
        permit: Permit,
        failure: bool,
        slow: bool,
        hint: Option<Duration>,
    ) {
        let w = self.word.0.load(Acquire);
        match permit {
            Permit::Pass(admitted) => {
                if admitted != w {
                    return; // admitted under an earlier state: no say in this one
                }
                match w & TAG {
                    CLOSED => {
                        let mut trip = false;
                        if let Some(threshold) = self.policy.consecutive {
                            if failure {
                                trip = self.consecutive.0.fetch_add(1, AcqRel) + 1 >= threshold;
                            } else if self.consecutive.0.load(Relaxed) != 0 {
                                // Writes only when there is something to reset.
                                self.consecutive.0.store(0, Relaxed);
                            }
                        }
                        if let Some(counts) = self.record_window(failure, slow) {
                            trip |= self.rates_trip(counts);
                        }
                        if trip {
                            self.trip(w, hint);
                        }
                    }
                    METRICS_ONLY => {
                        self.record_window(failure, slow);
                    }
                    _ => {}
                }
            }
            Permit::Probe(admitted) => {
                if admitted != w {
                    return;
                }
                if failure {
                    self.trip(w, hint);
                    return;
                }
                let gen32 = (w >> 3) as u32;
                let updated = self.half.fetch_update(AcqRel, Acquire, |h| {
                    let (g, taken, succ) = unpack(h);
                    (g == gen32).then(|| pack(g, taken, succ + 1))
                });
                if let Ok(h) = updated {
                    if u32::from(unpack(h).2) + 1 >= self.policy.probes {
                        self.close(w);
                    }
                }
            }
        }
    }

    fn record_window(&self, failure: bool, slow: bool) -> Option<WindowCounts> {
        match &self.window {
            None => None,
            Some(Window::Count(c)) => Some(c.record(failure, slow)),
            Some(Window::Time(t)) => Some(t.record(self.now(), failure, slow)),
        }
    }

    pub(crate) fn window_counts(&self) -> Option<WindowCounts> {
        match &self.window {
            None => None,
            Some(Window::Count(c)) => Some(c.counts()),
            Some(Window::Time(t)) => Some(t.counts(self.now())),
        }
    }

    fn rates_trip(&self, c: WindowCounts) -> bool {
        if c.calls < self.policy.min_calls || c.calls == 0 {
            return false;
        }
        let over = |n: u32, pct: u8| u64::from(n) * 100 >= u64::from(pct) * u64::from(c.calls);
        self.policy
            .failure_rate
            .is_some_and(|p| over(c.failures, p))
            || self.policy.slow.is_some_and(|(_, p)| over(c.slow, p))
    }

    /// The open time for the next trip: `open_time * 2^trips`, capped, minus up to
    /// `jitter_percent` at random; a server hint can only raise it (up to the cap).
    fn open_duration(&self, hint: Option<Duration>) -> Duration {
        let p = &self.policy;
        let trips = self.trips.load(Relaxed).min(20);
        let grown = p.open_time.saturating_mul(1 << trips).min(p.max_open_time);
        let jittered = if p.jitter_percent == 0 {
            grown
        } else {
            let r = splitmix(self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed));
            let frac = (r >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            grown.mul_f64(1.0 - f64::from(p.jitter_percent) / 100.0 * frac)
        };
        match hint {
            Some(h) => jittered.max(h.min(p.max_open_time)),
            None => jittered,
        }
    }

    /// Closed or HalfOpen (word `w`) -> Open.
    fn trip(&self, w: u64, hint: Option<Duration>) {
        let open_for = self.open_duration(hint);
        let now = self.now();
        let until = now.saturating_add(open_for.as_nanos().min(u128::from(u64::MAX)) as u64);
        self.opened_at.store(now, Relaxed);
        self.open_until.store(until, Release);
        if self.cas(w, next(w, OPEN), Some(open_for)) {
            self.trips.fetch_add(1, Relaxed);
        }
    }

    /// HalfOpen (word `w`) -> Closed.
    fn close(&self, w: u64) {
        self.consecutive.0.store(0, Relaxed);
        self.reset_window();
        if self.cas(w, next(w, CLOSED), None) {
            self.trips.store(0, Relaxed);
        }
    }

    fn reset_window(&self) {
        match &self.window {
            None => {}
            Some(Window::Count(c)) => c.reset(),
            Some(Window::Time(t)) => t.reset(),
        }
    }

    /// A transition by hand (handle): from any state to `to`.
    pub(crate) fn force(&self, to: State) {
        let mut w = self.word.0.load(Acquire);
        loop {
            if state_of(w) == to {
                return;
            }
            if to == State::Closed {
                self.consecutive.0.store(0, Relaxed);
                self.reset_window();
                self.trips.store(0, Relaxed);
            }
            if self.cas(w, next(w, tag_of(to)), None) {
                return;
            }
            w = self.word.0.load(Acquire);
        }
    }

    fn cas(&self, from: u64, to: u64, open_for: Option<Duration>) -> bool {
        if self
            .word
            .0
            .compare_exchange(from, to, AcqRel, Acquire)
            .is_err()
        {
            return false;
        }
        let t = Transition {
            from: state_of(from),
            to: state_of(to),
            at: Instant::now(),
            generation: to >> 3,
            open_for,
        };
        tracing::info!(
            target: "steadfast::breaker",
            from = t.from.as_str(),
            to = t.to.as_str(),
            generation = t.generation,
            open_for_ms = open_for.map(|d| d.as_millis() as u64),
            "breaker transition"
        );
        #[cfg(feature = "metrics")]
        metrics::counter!("steadfast_breaker_transitions_total", "to" => t.to.as_str())
            .increment(1);
        // No receivers is fine: nobody listens.
        let _ = self.events.send(t);
        true
    }
}

fn pack(gen32: u32, taken: u16, succ: u16) -> u64 {
    (u64::from(gen32) << 32) | (u64::from(taken) << 16) | u64::from(succ)
}

fn unpack(h: u64) -> (u32, u16, u16) {
    ((h >> 32) as u32, (h >> 16) as u16, h as u16)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    fn policy(probes: u32) -> Policy {
        Policy {
            consecutive: Some(1),
            window: None,
            min_calls: 1,
            failure_rate: None,
            slow: None,
            open_time: Duration::from_secs(3600),
            max_open_time: Duration::from_secs(3600),
            jitter_percent: 0,
            probes,
            seed: 0,
        }
    }

    /// OS threads hammer probe admission and return in one HalfOpen generation: never more
    /// than N probes out at once, and every permit comes back.
    #[test]
    fn probe_permits_under_real_contention() {
        let shared = Arc::new(Shared::new(policy(3)));
        shared.word.0.store((7 << 3) | HALF_OPEN, Release);
        shared.verdict_by.store(u64::MAX, Release);
        let out = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (shared, out, max) = (shared.clone(), out.clone(), max.clone());
                std::thread::spawn(move || {
                    let mut admitted = 0;
                    for _ in 0..20_000 {
                        if let Ok(Permit::Probe(w)) =
                            shared.take_probe(shared.word.0.load(Acquire), 0)
                        {
                            let n = out.fetch_add(1, AcqRel) + 1;
                            max.fetch_max(n, AcqRel);
                            out.fetch_sub(1, AcqRel);
                            shared.return_probe(w);
                            admitted += 1;
                        }
                    }
                    admitted
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(admitted > 0);
        assert!(
            max.load(Acquire) <= 3,
            "at most N probes out: {}",
            max.load(Acquire)
        );
        let (_, taken, _) = unpack(shared.half.load(Acquire));
        assert_eq!(taken, 0, "no permit lost");
    }

    /// Concurrent failures in Closed trip exactly once per generation.
    #[test]
    fn concurrent_trips_transition_once() {
        let shared = Arc::new(Shared::new(policy(1)));
        let mut rx = shared.subscribe();
        let w = shared.word.0.load(Acquire);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        shared.on_outcome(Permit::Pass(w), true, false, None);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(shared.state(), State::Open);
        assert_eq!(shared.generation(), 1);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "exactly one transition");
    }
}

#[cfg(all(test, loom))]
mod loom_model;
