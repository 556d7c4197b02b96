//! The breaker's shared state machine: atomics only.
//!
//! One 64-bit word holds the state tag (3 bits) and a generation number (the rest); every
//! transition bumps the generation with a compare-and-swap, so an outcome admitted under an
//! earlier generation can never decide the current state (pinned semantics 4). Half-open
//! probes live in a second word keyed by the generation's low 32 bits.
//!
//! Everything else a generation owns is stamped with it too, so a thread that loses a race
//! (or stalls across transitions) cannot write into a later generation: the consecutive
//! failure count carries the generation's low 32 bits, and the schedule (when an Open breaker
//! admits a probe, how long it was open for, when a HalfOpen breaker must have a verdict) is
//! written only by the thread whose compare-and-swap entered the generation, as a [`stamp`]
//! that readers check against the generation they saw.

use crate::sync::{
    AtomicU8, AtomicU32, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed},
};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use steadfast_core::__private::rand;

use crate::error::BreakerOpen;
use crate::window::{CountWindow, TimeWindow, WindowCounts};

/// A breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
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

impl BreakerState {
    /// A stable lower-case name (`closed`, `open`, `half_open`, `disabled`, `forced_open`,
    /// `metrics_only`) for logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Disabled => "disabled",
            BreakerState::ForcedOpen => "forced_open",
            BreakerState::MetricsOnly => "metrics_only",
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

fn tag_of(s: BreakerState) -> u64 {
    match s {
        BreakerState::Closed => CLOSED,
        BreakerState::Open => OPEN,
        BreakerState::HalfOpen => HALF_OPEN,
        BreakerState::Disabled => DISABLED,
        BreakerState::ForcedOpen => FORCED_OPEN,
        BreakerState::MetricsOnly => METRICS_ONLY,
    }
}

/// The state of a state word.
pub(crate) fn state_of(word: u64) -> BreakerState {
    match word & TAG {
        CLOSED => BreakerState::Closed,
        OPEN => BreakerState::Open,
        HALF_OPEN => BreakerState::HalfOpen,
        DISABLED => BreakerState::Disabled,
        FORCED_OPEN => BreakerState::ForcedOpen,
        _ => BreakerState::MetricsOnly,
    }
}

fn next(word: u64, to: u64) -> u64 {
    ((word >> 3).wrapping_add(1) << 3) | to
}

/// A state change, as seen by subscribers and the `steadfast::breaker` tracing target.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transition {
    /// The name of the layer the breaker belongs to, given to
    /// [`CircuitBreakerBuilder::name`](crate::CircuitBreakerBuilder::name) (`"default"`
    /// otherwise): it tells apart two callers' breakers for one upstream.
    pub breaker: Arc<str>,
    /// What the breaker guards: the key's [`BreakerKey::name`](crate::BreakerKey::name) for
    /// a per-key breaker (the upstream's `host:port` for per-authority breakers), the layer's
    /// name for a plain one.
    pub upstream: Arc<str>,
    /// The state left.
    pub from: BreakerState,
    /// The state entered.
    pub to: BreakerState,
    /// When (tokio time).
    pub at: Instant,
    /// The generation entered (increases by one per transition).
    pub generation: u64,
    /// For `to == Open`: how long until a probe is allowed.
    pub open_for: Option<Duration>,
    /// Why.
    pub reason: TransitionReason,
    /// For `to == Open`: whether the open time is the one a server asked for (its
    /// `Retry-After` or `grpc-retry-pushback-ms` on the failure that tripped the breaker,
    /// longer than the policy's), rather than the policy's.
    pub open_for_from_hint: bool,
}

/// Why a breaker changed state: carried by [`Transition`]s, `tracing` events (`reason`),
/// the transitions metric's `reason` label, the handle
/// ([`BreakerHandle::trip_reason`](crate::BreakerHandle::trip_reason)) and every
/// rejection ([`BreakerOpen::reason`](crate::error::BreakerOpen::reason)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransitionReason {
    /// Tripped: the consecutive-failure threshold was reached.
    ConsecutiveFailures,
    /// Tripped: the window's failure rate reached its threshold.
    FailureRate,
    /// Tripped: the window's slow-call rate reached its threshold.
    SlowCallRate,
    /// Re-opened: a half-open probe failed.
    ProbeFailed,
    /// Re-opened: the half-open probes gave no verdict within the allowed wait.
    ProbeTimedOut,
    /// Half-opened: the open time passed (on the next call, or on the timer of
    /// [`auto_half_open`](crate::CircuitBreakerBuilder::auto_half_open)).
    OpenTimeElapsed,
    /// Closed: the half-open probes succeeded.
    ProbesSucceeded,
    /// Set by hand through a handle, or the configured initial state.
    Manual,
}

impl TransitionReason {
    /// A stable snake_case name, as events and metrics carry it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ConsecutiveFailures => "consecutive_failures",
            Self::FailureRate => "failure_rate",
            Self::SlowCallRate => "slow_call_rate",
            Self::ProbeFailed => "probe_failed",
            Self::ProbeTimedOut => "probe_timed_out",
            Self::OpenTimeElapsed => "open_time_elapsed",
            Self::ProbesSucceeded => "probes_succeeded",
            Self::Manual => "manual",
        }
    }

    const ALL: [TransitionReason; 8] = [
        Self::ConsecutiveFailures,
        Self::FailureRate,
        Self::SlowCallRate,
        Self::ProbeFailed,
        Self::ProbeTimedOut,
        Self::OpenTimeElapsed,
        Self::ProbesSucceeded,
        Self::Manual,
    ];

    fn code(self) -> u8 {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0) as u8 + 1
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }
}

impl std::fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last failure a breaker counted, in brief: what a rejection reports as the cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureSummary {
    /// A response with this HTTP status.
    Status(u16),
    /// A gRPC status that arrived in the trailers.
    Grpc(steadfast_core::GrpcCode),
    /// An error, by [`error_type`](steadfast_core::error_type) (`timeout`, `connect`, ...).
    Error(&'static str),
}

impl std::fmt::Display for FailureSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(s) => write!(f, "HTTP {s}"),
            Self::Grpc(c) => write!(f, "gRPC {c}"),
            Self::Error(e) => f.write_str(e),
        }
    }
}

/// The error names `FailureSummary::Error` can hold, by index (one word of state).
const ERROR_NAMES: [&str; 16] = [
    "_OTHER",
    "policy_rejected",
    "not_sent",
    "connect",
    "timeout",
    "connection_refused",
    "connection_reset",
    "connection_aborted",
    "not_connected",
    "addr_in_use",
    "addr_not_available",
    "broken_pipe",
    "timed_out",
    "unexpected_eof",
    "interrupted",
    "io",
];

impl FailureSummary {
    /// One word: 1-999 an HTTP status, 1000 + code a gRPC status, 2000 + index an error name.
    pub(crate) fn encode(self) -> u32 {
        match self {
            Self::Status(s) => u32::from(s.min(999)),
            Self::Grpc(c) => 1000 + c.as_i32() as u32,
            Self::Error(e) => 2000 + ERROR_NAMES.iter().position(|n| *n == e).unwrap_or(0) as u32,
        }
    }

    pub(crate) fn decode(word: u32) -> Option<Self> {
        match word {
            0 => None,
            1..=999 => Some(Self::Status(word as u16)),
            1000..=1999 => Some(Self::Grpc(steadfast_core::GrpcCode::from_i32(
                word as i32 - 1000,
            ))),
            _ => Some(Self::Error(
                ERROR_NAMES
                    .get((word - 2000) as usize)
                    .copied()
                    .unwrap_or("_OTHER"),
            )),
        }
    }
}

/// How long a breaker stays open, as a function of its trips in a row.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum OpenTime {
    /// `open_time × factor^(trips − 1)`, at most `max_open_time` (the default: factor 2).
    Exponential {
        /// The growth per consecutive trip (at least 1).
        factor: f64,
    },
    /// Always `open_time`.
    Constant,
    /// `f(trips)` (1 for the first trip), at most `max_open_time`.
    Custom(fn(u32) -> Duration),
}

impl PartialEq for OpenTime {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exponential { factor: a }, Self::Exponential { factor: b }) => a == b,
            (Self::Constant, Self::Constant) => true,
            // The same function, by address.
            (Self::Custom(a), Self::Custom(b)) => *a as usize == *b as usize,
            _ => false,
        }
    }
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
    pub(crate) open_time_fn: OpenTime,
    /// How long half-open probes may go without a verdict before the breaker re-opens
    /// (`None`: the open time in force).
    pub(crate) max_half_open_wait: Option<Duration>,
    /// Half-open on a timer when the open time ends, without waiting for a call.
    pub(crate) auto_half_open: bool,
    pub(crate) jitter_percent: u8,
    pub(crate) probes: u32,
    pub(crate) seed: u64,
}

#[derive(Debug)]
enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

/// The state shared by every service and handle of one breaker, about 120 bytes. What every
/// call reads (the state word, the policy, the window's address, the clock's base) comes
/// first; what failures and transitions write (the consecutive count, probes, schedule
/// stamps) starts 64 bytes later, so on 64-byte cache lines the state word never shares a
/// line with it and a burst of failures does not evict the word every admission reads. The struct is not
/// cache-line *aligned* (an aligned allocation costs the allocator up to a line more, and
/// per-key breakers pay for this once per key); the distance is what keeps them apart. Rate
/// windows, written on every call, live in their own allocation; the policy is shared by
/// every breaker of a layer.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Shared {
    // ---- read by every call ----
    word: AtomicU64,
    pub(crate) policy: Arc<Policy>,
    window: Option<Box<Window>>,
    base: Instant,
    /// Its name and listeners: read by transitions and rejections only.
    pub(crate) meta: Box<Meta>,
    /// Keeps `cold` 64 bytes from `word`.
    _gap: [u8; GAP],
    // ---- written by failures and transitions ----
    cold: Cold,
}

/// The bytes between the fields every call reads and `cold`, so that `cold` starts 64 bytes
/// after `word` (the fields before it are all 8-byte multiples, laid out in order).
const GAP: usize = 64usize.saturating_sub(
    std::mem::size_of::<AtomicU64>()
        + std::mem::size_of::<Arc<Policy>>()
        + std::mem::size_of::<Option<Box<Window>>>()
        + std::mem::size_of::<Instant>()
        + std::mem::size_of::<Box<Meta>>(),
);

/// What a per-key layer hears about every one of its breakers' transitions.
pub(crate) type Listener = Box<dyn Fn(&Transition) + Send + Sync>;

/// A breaker's name and who hears about its transitions, behind one pointer: the fields
/// every call reads stay on one cache line.
pub(crate) struct Meta {
    /// The layer's name.
    pub(crate) breaker: Arc<str>,
    /// The key's name (per-key), or the layer's.
    pub(crate) upstream: Arc<str>,
    /// Who watches its transitions, made at the first subscription: an unwatched breaker
    /// (most per-key breakers) pays one word.
    watch: std::sync::OnceLock<Box<Watch>>,
    /// The rejection counter with this breaker's label, registered at the first rejection
    /// (a rejection then costs no label allocation or recorder lookup).
    #[cfg(feature = "metrics")]
    pub(crate) rejected: std::sync::OnceLock<metrics::Counter>,
    /// The breaker itself, for the timer of `auto_half_open` (set once it is in its `Arc`).
    pub(crate) me: std::sync::Weak<Shared>,
    /// The call duration histograms (success, failure, shed), each registered at its first
    /// outcome.
    #[cfg(feature = "metrics")]
    durations: [std::sync::OnceLock<metrics::Histogram>; 3],
    /// A per-key breaker that its map evicted or never kept: its state is no upstream's any
    /// more, and the state gauge is left to the breaker the map keeps for that key.
    #[cfg(feature = "metrics")]
    untracked: std::sync::atomic::AtomicBool,
}

impl Meta {
    pub(crate) fn new(breaker: Arc<str>, upstream: Arc<str>) -> Self {
        Self {
            breaker,
            upstream,
            watch: std::sync::OnceLock::new(),
            me: std::sync::Weak::new(),
            #[cfg(feature = "metrics")]
            rejected: std::sync::OnceLock::new(),
            #[cfg(feature = "metrics")]
            durations: [const { std::sync::OnceLock::new() }; 3],
            #[cfg(feature = "metrics")]
            untracked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Records one call's duration under its outcome.
    #[cfg(feature = "metrics")]
    pub(crate) fn record_duration(&self, outcome: Outcome, seconds: f64) {
        let (i, outcome) = match outcome {
            Outcome::Success => (0, "success"),
            Outcome::Failure => (1, "failure"),
            Outcome::Shed => (2, "shed"),
        };
        self.durations[i]
            .get_or_init(|| {
                metrics::histogram!(
                    "steadfast_breaker_call_duration_seconds",
                    "breaker" => metrics::SharedString::from(self.breaker.clone()),
                    "upstream" => metrics::SharedString::from(self.upstream.clone()),
                    "outcome" => outcome
                )
            })
            .record(seconds);
    }
}

/// A call's outcome, as the duration histogram labels it.
#[cfg(feature = "metrics")]
#[derive(Clone, Copy)]
pub(crate) enum Outcome {
    Success,
    Failure,
    /// Shed by the upstream: counted neither way.
    Shed,
}

#[cfg(feature = "metrics")]
impl Outcome {
    pub(crate) fn of(failure: bool) -> Self {
        if failure {
            Self::Failure
        } else {
            Self::Success
        }
    }
}

/// A breaker's watchers.
#[derive(Default)]
struct Watch {
    /// Its handles' subscribers (a 64-slot channel).
    events: std::sync::OnceLock<broadcast::Sender<Transition>>,
    /// The per-key layer's listener (its `subscribe_all`).
    listener: std::sync::OnceLock<Listener>,
}

impl Meta {
    fn watch(&self) -> &Watch {
        self.watch.get_or_init(Box::default)
    }

    /// Hands this breaker's transitions to `listener` too (once; later calls do nothing).
    pub(crate) fn listen(&self, listener: impl FnOnce() -> Listener) {
        let _ = self.watch().listener.get_or_init(listener);
    }
}

impl Default for Meta {
    fn default() -> Self {
        let name: Arc<str> = Arc::from(DEFAULT_NAME);
        Self::new(name.clone(), name)
    }
}

/// The name of a breaker nobody named.
pub(crate) const DEFAULT_NAME: &str = "default";

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta")
            .field("breaker", &self.breaker)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// What failures and transitions write in [`Shared`].
#[derive(Debug)]
#[repr(C)]
struct Cold {
    /// Consecutive failures: generation low 32 bits | count (32). A count stamped with an
    /// earlier generation reads as zero.
    consecutive: AtomicU64,
    /// Half-open probes: generation low 32 bits | taken (16) | successes (16).
    half: AtomicU64,
    /// Stamp: microseconds since `base` when an Open breaker admits a probe.
    open_until: AtomicU64,
    /// Stamp: the open time in force, in microseconds.
    open_for: AtomicU64,
    /// Stamp: microseconds since `base` by which a HalfOpen breaker must reach a verdict.
    verdict_by: AtomicU64,
    rng: AtomicU64,
    /// Consecutive trips since the last close (open time grows with it).
    trips: AtomicU32,
    /// Why the breaker last opened ([`TransitionReason`] code; 0: never).
    trip_reason: AtomicU8,
    /// The last failure counted ([`FailureSummary::encode`]; 0: none).
    last_failure: AtomicU32,
}

// The layout the docs above describe (checked where the atomics are the real ones, on the
// 64-bit targets the sizes above assume).
#[cfg(all(not(loom), target_pointer_width = "64"))]
const _: () = {
    assert!(std::mem::offset_of!(Shared, cold) == 64);
    assert!(std::mem::size_of::<Shared>() <= 128);
};

/// A call's admission ticket: the state word it was admitted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Permit {
    Pass(u64),
    Probe(u64),
}

impl Shared {
    pub(crate) fn new(policy: Arc<Policy>, meta: Meta) -> Self {
        let window = policy.window.map(|w| {
            Box::new(match w {
                WindowKind::Count { size } => Window::Count(CountWindow::new(size)),
                WindowKind::Time { width, buckets } => {
                    Window::Time(TimeWindow::new(width, buckets))
                }
            })
        });
        Self {
            word: AtomicU64::new(CLOSED),
            cold: Cold {
                consecutive: AtomicU64::new(0),
                half: AtomicU64::new(0),
                open_until: AtomicU64::new(0),
                open_for: AtomicU64::new(0),
                verdict_by: AtomicU64::new(0),
                rng: AtomicU64::new(policy.seed),
                trips: AtomicU32::new(0),
                trip_reason: AtomicU8::new(0),
                last_failure: AtomicU32::new(0),
            },
            window,
            policy,
            base: Instant::now(),
            meta: Box::new(meta),
            _gap: [0; GAP],
        }
    }

    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.base))
    }

    pub(crate) fn state(&self) -> BreakerState {
        state_of(self.word())
    }

    /// The state in force: an Open breaker whose open time has passed would admit a probe,
    /// so it reads as HalfOpen.
    pub(crate) fn state_in_force(&self) -> BreakerState {
        self.in_force(self.word())
    }

    /// The state in force for the state word `w`.
    pub(crate) fn in_force(&self, w: u64) -> BreakerState {
        match state_of(w) {
            BreakerState::Open if self.open_until(w).is_some_and(|until| self.now() >= until) => {
                BreakerState::HalfOpen
            }
            s => s,
        }
    }

    #[cfg(test)]
    pub(crate) fn generation(&self) -> u64 {
        self.word() >> 3
    }

    /// Whether the breaker may reject a call now (Open or ForcedOpen): one load, for
    /// `poll_ready`'s fast path.
    #[inline]
    pub(crate) fn may_reject(&self) -> bool {
        matches!(self.word.load(Acquire) & TAG, OPEN | FORCED_OPEN)
    }

    /// A success admitted under `admitted` that changes nothing: the breaker is still Closed
    /// in that generation, no rate window records it, and there is no run of failures to
    /// end. Exactly the cases where [`on_outcome`](Self::on_outcome) would write nothing;
    /// checked inline so the common outcome costs two loads.
    #[inline]
    pub(crate) fn success_is_noop(&self, admitted: u64) -> bool {
        admitted & TAG == CLOSED
            && self.window.is_none()
            && self.word.load(Acquire) == admitted
            && (self.policy.consecutive.is_none()
                || self.cold.consecutive.load(Relaxed) == ((admitted >> 3) as u32 as u64) << 32)
    }

    /// The state word: generation above the state tag.
    pub(crate) fn word(&self) -> u64 {
        self.word.load(Acquire)
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.meta
            .watch()
            .events
            .get_or_init(|| broadcast::channel(64).0)
            .subscribe()
    }

    /// Whether the breaker needs per-call timing (slow calls, a rate window, whose snapshot
    /// reports durations, or the call duration histograms of the `metrics` feature).
    pub(crate) fn needs_clock(&self) -> bool {
        cfg!(feature = "metrics") || self.policy_needs_clock()
    }

    /// Whether the policy needs per-call timing (slow calls, or a rate window).
    pub(crate) fn policy_needs_clock(&self) -> bool {
        self.policy.slow.is_some() || self.window.is_some()
    }

    pub(crate) fn slow_threshold(&self) -> Option<Duration> {
        self.policy.slow.map(|s| s.0)
    }

    /// How long until an Open breaker would admit a probe (zero if it would now); `None` when
    /// the state admits calls or never will by itself.
    pub(crate) fn wait_hint(&self) -> Option<Duration> {
        let w = self.word.load(Acquire);
        match w & TAG {
            OPEN => Some(match self.open_until(w) {
                Some(until) => Duration::from_nanos(until.saturating_sub(self.now())),
                None => UNSCHEDULED,
            }),
            _ => None,
        }
    }

    /// When the Open breaker of word `w` admits a probe (nanoseconds since `base`); `None`
    /// while the trip that entered `w`'s generation has not written its schedule yet.
    fn open_until(&self, w: u64) -> Option<u64> {
        unstamp(self.cold.open_until.load(Acquire), w >> 3).map(|us| us.saturating_mul(1000))
    }

    /// The consecutive failures counted in the generation of word `w`.
    pub(crate) fn consecutive_failures(&self, w: u64) -> u32 {
        let c = self.cold.consecutive.load(Acquire);
        if (c >> 32) as u32 == (w >> 3) as u32 {
            c as u32
        } else {
            0
        }
    }

    /// Counts one consecutive failure in the generation of word `w` and returns the count, or
    /// `None` when the counter already belongs to a later generation (a stale outcome).
    fn count_failure(&self, w: u64) -> Option<u32> {
        let gen32 = (w >> 3) as u32;
        let mut c = self.cold.consecutive.load(Acquire);
        loop {
            let tag = (c >> 32) as u32;
            let n = if tag == gen32 {
                c as u32
            } else if newer32(gen32, tag) {
                0 // the first failure of a newer generation
            } else {
                return None;
            };
            let n = n.saturating_add(1);
            match self.cold.consecutive.compare_exchange_weak(
                c,
                (u64::from(gen32) << 32) | u64::from(n),
                AcqRel,
                Acquire,
            ) {
                Ok(_) => return Some(n),
                Err(actual) => c = actual,
            }
        }
    }

    /// A success in the generation of word `w` ends the run of failures. Writes only when
    /// there is something to reset, and never into a later generation.
    fn reset_consecutive(&self, w: u64) {
        let gen32 = (w >> 3) as u32;
        let zero = u64::from(gen32) << 32;
        let c = self.cold.consecutive.load(Relaxed);
        if c == zero {
            return;
        }
        let tag = (c >> 32) as u32;
        if tag == gen32 || newer32(gen32, tag) {
            // A failure racing in wins; either order is a valid history.
            let _ = self
                .cold
                .consecutive
                .compare_exchange(c, zero, AcqRel, Relaxed);
        }
    }

    /// Decides admission. Never blocks; never allocates. A Closed breaker is decided inline;
    /// every other state out of line.
    #[inline]
    pub(crate) fn admit(&self) -> Result<Permit, BreakerOpen> {
        let w = self.word.load(Acquire);
        if w & TAG == CLOSED {
            return Ok(Permit::Pass(w));
        }
        self.admit_in(w)
    }

    /// [`admit`](Self::admit) for state word `w`.
    #[inline(never)]
    fn admit_in(&self, w: u64) -> Result<Permit, BreakerOpen> {
        match w & TAG {
            CLOSED | DISABLED | METRICS_ONLY => Ok(Permit::Pass(w)),
            FORCED_OPEN => Err(self.rejection(None)),
            OPEN => {
                let now = self.now();
                let Some(until) = self.open_until(w) else {
                    // Tripped a moment ago; the schedule is being written.
                    return Err(self.rejection(Some(UNSCHEDULED)));
                };
                if now < until {
                    return Err(self.rejection(Some(Duration::from_nanos(until - now))));
                }
                // Pinned semantics 1: Open -> HalfOpen at now >= opened_at + open_time.
                let half = next(w, HALF_OPEN);
                if self.cas_word(w, half) {
                    // Only the thread that entered HalfOpen sets its verdict deadline.
                    let open_for = unstamp(self.cold.open_for.load(Acquire), w >> 3).unwrap_or(0);
                    self.set_verdict_by(half, now, open_for);
                    self.announce(w, half, None, TransitionReason::OpenTimeElapsed);
                    return self.take_probe(half, now);
                }
                self.admit()
            }
            _ => self.take_probe(w, self.now()),
        }
    }

    fn take_probe(&self, w: u64, now: u64) -> Result<Permit, BreakerOpen> {
        let gen32 = (w >> 3) as u32;
        let mut h = self.cold.half.load(Acquire);
        loop {
            let (g, taken, succ) = unpack(h);
            if g != gen32 && newer32(g, gen32) {
                // The breaker has moved on since `w` was read: decide against the current state.
                return self.admit();
            }
            let (taken, succ) = if g == gen32 { (taken, succ) } else { (0, 0) };
            if u32::from(taken) >= self.policy.probes {
                // No verdict within the open time: re-open (pinned semantics 3). A deadline
                // not written yet (HalfOpen entered a moment ago) has not passed.
                let by = unstamp(self.cold.verdict_by.load(Acquire), w >> 3)
                    .map(|us| us.saturating_mul(1000));
                if by.is_some_and(|by| now >= by) {
                    self.trip(w, None, TransitionReason::ProbeTimedOut);
                }
                let retry = by.map_or(UNSCHEDULED, |by| {
                    Duration::from_nanos(by.saturating_sub(now).max(1))
                });
                return Err(self.rejection(Some(retry)));
            }
            match self.cold.half.compare_exchange_weak(
                h,
                pack(gen32, taken + 1, succ),
                AcqRel,
                Acquire,
            ) {
                Ok(_) => return Ok(Permit::Probe(w)),
                Err(actual) => h = actual,
            }
        }
    }

    /// A probe ended without a verdict (dropped or cancelled): give its permit back.
    pub(crate) fn return_probe(&self, w: u64) {
        let gen32 = (w >> 3) as u32;
        let _ = self.cold.half.fetch_update(AcqRel, Acquire, |h| {
            let (g, taken, succ) = unpack(h);
            (g == gen32 && taken > 0).then(|| pack(g, taken - 1, succ))
        });
    }

    /// A probe was answered without a verdict (the upstream shed it): give its permit back,
    /// and give the probes a fresh verdict deadline. The upstream answered promptly; it is
    /// busy, not hanging, and the probe after this one must not be counted as timed out
    /// because the answers so far were all shed.
    pub(crate) fn return_answered_probe(&self, w: u64) {
        self.return_probe(w);
        let open_for = unstamp(self.cold.open_for.load(Acquire), (w >> 3).wrapping_sub(1));
        if self.policy.max_half_open_wait.is_some() || open_for.is_some() {
            self.set_verdict_by(w, self.now(), open_for.unwrap_or(0));
        }
    }

    /// Records a finished call admitted with `permit` (untimed: the models and tests).
    #[cfg(test)]
    pub(crate) fn on_outcome(
        &self,
        permit: Permit,
        failure: bool,
        slow: bool,
        hint: Option<Duration>,
    ) {
        self.on_timed_outcome(permit, failure, slow, hint, None);
    }

    /// [`on_outcome`](Self::on_outcome), with the call's duration (microseconds) when it
    /// was timed.
    pub(crate) fn on_timed_outcome(
        &self,
        permit: Permit,
        failure: bool,
        slow: bool,
        hint: Option<Duration>,
        micros: Option<u64>,
    ) {
        let w = self.word.load(Acquire);
        match permit {
            Permit::Pass(admitted) => {
                if admitted != w {
                    return; // admitted under an earlier state: no say in this one
                }
                match w & TAG {
                    CLOSED => {
                        let mut trip = None;
                        if let Some(threshold) = self.policy.consecutive {
                            if failure {
                                if self.count_failure(w).is_some_and(|n| n >= threshold) {
                                    trip = Some(TransitionReason::ConsecutiveFailures);
                                }
                            } else {
                                self.reset_consecutive(w);
                            }
                        }
                        if let Some(counts) = self.record_window(failure, slow, micros) {
                            trip = trip.or(self.rates_trip(counts));
                        }
                        if let Some(reason) = trip {
                            self.trip(w, hint, reason);
                        }
                    }
                    METRICS_ONLY => {
                        self.record_window(failure, slow, micros);
                    }
                    _ => {}
                }
            }
            Permit::Probe(admitted) => {
                if admitted != w {
                    return;
                }
                if failure {
                    self.trip(w, hint, TransitionReason::ProbeFailed);
                    return;
                }
                let gen32 = (w >> 3) as u32;
                let updated = self.cold.half.fetch_update(AcqRel, Acquire, |h| {
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

    fn record_window(
        &self,
        failure: bool,
        slow: bool,
        micros: Option<u64>,
    ) -> Option<WindowCounts> {
        match self.window.as_deref() {
            None => None,
            Some(Window::Count(c)) => Some(c.record_timed(failure, slow, micros)),
            Some(Window::Time(t)) => Some(t.record_timed(self.now(), failure, slow, micros)),
        }
    }

    pub(crate) fn window_counts(&self) -> Option<WindowCounts> {
        match self.window.as_deref() {
            None => None,
            Some(Window::Count(c)) => Some(c.counts()),
            Some(Window::Time(t)) => Some(t.counts(self.now())),
        }
    }

    /// Which rate, if any, trips the breaker with these counts.
    fn rates_trip(&self, c: WindowCounts) -> Option<TransitionReason> {
        if c.calls < u64::from(self.policy.min_calls) || c.calls == 0 {
            return None;
        }
        let over = |n: u64, pct: u8| u128::from(n) * 100 >= u128::from(pct) * u128::from(c.calls);
        if self
            .policy
            .failure_rate
            .is_some_and(|p| over(c.failures, p))
        {
            Some(TransitionReason::FailureRate)
        } else if self.policy.slow.is_some_and(|(_, p)| over(c.slow, p)) {
            Some(TransitionReason::SlowCallRate)
        } else {
            None
        }
    }

    /// The open time for the next trip: the [`OpenTime`] function of the trips in a row
    /// (by default `open_time * 2^trips`), capped, minus up to `jitter_percent` at random; a
    /// server hint can only raise it (up to the cap). And whether the hint set it (it was
    /// longer than the policy's).
    fn open_duration_hinted(&self, hint: Option<Duration>) -> (Duration, bool) {
        let p = &self.policy;
        let trips = self.cold.trips.load(Relaxed);
        let grown = match p.open_time_fn {
            OpenTime::Exponential { factor: 2.0 } => p
                .open_time
                .saturating_mul(1u32.checked_shl(trips).unwrap_or(u32::MAX)),
            OpenTime::Exponential { factor } => {
                let secs = p.open_time.as_secs_f64() * factor.powi(trips.min(1 << 20) as i32);
                Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
            }
            OpenTime::Constant => p.open_time,
            // A custom function's zero would never fail fast: the builder's floor applies.
            OpenTime::Custom(f) => f(trips.saturating_add(1)).max(Duration::from_millis(1)),
        }
        .min(p.max_open_time);
        let jittered = if p.jitter_percent == 0 {
            grown
        } else {
            let r = rand::next(self.cold.rng.fetch_add(rand::STEP, Relaxed));
            let frac = rand::unit(r); // [0, 1)
            let factor = 1.0 - f64::from(p.jitter_percent) / 100.0 * frac;
            // `mul_f64` panics when rounding takes a time near `Duration::MAX` past it.
            Duration::try_from_secs_f64(grown.as_secs_f64() * factor)
                .map_or(grown, |d| d.min(grown))
        };
        match hint.map(|h| h.min(p.max_open_time)) {
            Some(h) if h > jittered => (h, true),
            _ => (jittered, false),
        }
    }

    /// Closed or HalfOpen (word `w`) -> Open. Only the thread whose compare-and-swap wins
    /// writes the schedule, so a losing trip (with another hint, or computed after the
    /// winner's trip count) cannot change the open time announced.
    fn trip(&self, w: u64, hint: Option<Duration>, reason: TransitionReason) {
        let (open_for, hinted) = self.open_duration_hinted(hint);
        let open = next(w, OPEN);
        if self.cas_word(w, open) {
            self.cold.trips.fetch_add(1, Relaxed);
            self.cold.trip_reason.store(reason.code(), Relaxed);
            // Schedule first, announce after: no subscriber or recorder code runs while the
            // new generation has no schedule.
            self.schedule(open, open_for);
            self.announce_hinted(w, open, Some(open_for), reason, hinted);
        }
    }

    /// With `auto_half_open`: a timer that half-opens the Open generation `open` after
    /// `open_for`, if it is still in force then (one task per trip; needs a tokio runtime,
    /// without one the breaker half-opens on the next call as usual).
    #[cfg(not(loom))]
    fn half_open_at(&self, open: u64, open_for: Duration) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.meta.me.clone();
        rt.spawn(async move {
            let mut wait = open_for;
            loop {
                // tokio's timers stop at about thirty years: a longer open time takes more
                // than one sleep, and each wake checks the schedule again.
                tokio::time::sleep(wait).await;
                let Some(shared) = me.upgrade() else { return };
                match shared.half_open_if(open) {
                    Some(left) => wait = left,
                    None => return,
                }
            }
        });
    }

    /// Open (word `w`, still in force, its open time passed) -> HalfOpen, without a call.
    /// `Some(time left)` when the open time has not passed yet; `None` when done (moved, or
    /// the breaker has moved on).
    #[cfg(not(loom))]
    fn half_open_if(&self, w: u64) -> Option<Duration> {
        if self.word.load(Acquire) != w {
            return None;
        }
        let now = self.now();
        if let Some(until) = self.open_until(w) {
            if now < until {
                return Some(Duration::from_nanos(until - now));
            }
        }
        let half = next(w, HALF_OPEN);
        if self.cas_word(w, half) {
            let open_for = unstamp(self.cold.open_for.load(Acquire), w >> 3).unwrap_or(0);
            self.set_verdict_by(half, now, open_for);
            self.announce(w, half, None, TransitionReason::OpenTimeElapsed);
        }
        None
    }

    /// A rejection, with why the breaker is open and the last failure it counted.
    #[cold]
    fn rejection(&self, retry_after: Option<Duration>) -> BreakerOpen {
        BreakerOpen::new(retry_after).with_cause(
            TransitionReason::from_code(self.cold.trip_reason.load(Relaxed)),
            FailureSummary::decode(self.cold.last_failure.load(Relaxed)),
        )
    }

    /// Notes the last failure counted (what rejections report as the cause).
    pub(crate) fn note_failure(&self, summary: FailureSummary) {
        self.cold.last_failure.store(summary.encode(), Relaxed);
    }

    /// Why the breaker last opened, if it ever did.
    pub(crate) fn trip_reason(&self) -> Option<TransitionReason> {
        TransitionReason::from_code(self.cold.trip_reason.load(Relaxed))
    }

    /// The last failure counted.
    pub(crate) fn last_failure(&self) -> Option<FailureSummary> {
        FailureSummary::decode(self.cold.last_failure.load(Relaxed))
    }

    /// Sets the verdict deadline of the HalfOpen generation `half` entered at `now`: the
    /// configured wait, or the open time that preceded it (`open_for_us`, microseconds).
    fn set_verdict_by(&self, half: u64, now: u64, open_for_us: u64) {
        let wait = self
            .policy
            .max_half_open_wait
            .map_or(open_for_us.max(1), |d| micros_ceil(nanos(d)).max(1));
        let by = micros_ceil(now).saturating_add(wait);
        publish(&self.cold.verdict_by, stamp(half >> 3, by));
    }

    /// Writes the schedule of the Open generation entered with word `open`.
    fn schedule(&self, open: u64, open_for: Duration) {
        let open_us = micros_ceil(nanos(open_for));
        let until = micros_ceil(self.now()).saturating_add(open_us);
        publish(&self.cold.open_for, stamp(open >> 3, open_us));
        // A reader that sees this stamp also sees `open_for` above (release, in `publish`).
        publish(&self.cold.open_until, stamp(open >> 3, until));
    }

    /// HalfOpen (word `w`) -> Closed. The consecutive count needs no reset: it belongs to the
    /// generation left behind.
    fn close(&self, w: u64) {
        self.reset_window();
        let closed = next(w, CLOSED);
        if self.cas_word(w, closed) {
            self.cold.trips.store(0, Relaxed);
            self.announce(w, closed, None, TransitionReason::ProbesSucceeded);
        }
    }

    fn reset_window(&self) {
        match self.window.as_deref() {
            None => {}
            Some(Window::Count(c)) => c.reset(),
            Some(Window::Time(t)) => t.reset(),
        }
    }

    /// A transition by hand (handle): from any state to `to`. Closing is a reset from any
    /// state, Closed included: the window and the trip count are cleared, a new generation
    /// voids the consecutive count and the outcomes of calls still in flight, and a
    /// Closed -> Closed transition is announced.
    pub(crate) fn force(&self, to: BreakerState) {
        self.force_with(to, self.policy.open_time);
    }

    /// [`force`](Self::force), with the open time for `to == Open` (the breaker half-opens
    /// by itself afterwards) and, for `to == HalfOpen`, a fresh set of probes. Moving to the
    /// state it is in starts it again (a new generation), except for the states set by hand
    /// that have no schedule (forced open, disabled, metrics only).
    pub(crate) fn force_with(&self, to: BreakerState, open_for: Duration) {
        let mut w = self.word.load(Acquire);
        loop {
            if state_of(w) == to
                && matches!(
                    to,
                    BreakerState::ForcedOpen | BreakerState::Disabled | BreakerState::MetricsOnly
                )
            {
                return;
            }
            let to_word = next(w, tag_of(to));
            if self.cas_word(w, to_word) {
                if to == BreakerState::Closed {
                    // After the move: an outcome of the old generation that raced in before
                    // it is cleared too (one that starts now is refused by its generation).
                    // What opened it and what failed last belong to the past too.
                    self.reset_window();
                    self.cold.trips.store(0, Relaxed);
                    self.cold.trip_reason.store(0, Relaxed);
                    self.cold.last_failure.store(0, Relaxed);
                } else if matches!(
                    to,
                    BreakerState::Open | BreakerState::HalfOpen | BreakerState::ForcedOpen
                ) {
                    // A state that refuses calls, set by hand: its refusals say so.
                    self.cold
                        .trip_reason
                        .store(TransitionReason::Manual.code(), Relaxed);
                }
                let announced_open = (to == BreakerState::Open).then(|| {
                    self.schedule(to_word, open_for);
                    open_for
                });
                if to == BreakerState::HalfOpen {
                    // The probes get the open time that preceded (the one in force if the
                    // breaker was open), else the policy's.
                    let preceded = (w & TAG == OPEN)
                        .then(|| unstamp(self.cold.open_for.load(Acquire), w >> 3))
                        .flatten()
                        .unwrap_or_else(|| micros_ceil(nanos(self.policy.open_time)));
                    self.set_verdict_by(to_word, self.now(), preceded);
                }
                self.announce(w, to_word, announced_open, TransitionReason::Manual);
                return;
            }
            w = self.word.load(Acquire);
        }
    }

    /// Moves the state word from `from` to `to`; `true` for the one thread that did.
    fn cas_word(&self, from: u64, to: u64) -> bool {
        self.word
            .compare_exchange(from, to, AcqRel, Acquire)
            .is_ok()
    }

    /// Tells subscribers, tracing and metrics about a transition this thread made.
    fn announce(&self, from: u64, to: u64, open_for: Option<Duration>, reason: TransitionReason) {
        self.announce_hinted(from, to, open_for, reason, false);
    }

    /// [`announce`](Self::announce); `hinted` says a server's hint set the open time.
    fn announce_hinted(
        &self,
        from: u64,
        to: u64,
        open_for: Option<Duration>,
        reason: TransitionReason,
        hinted: bool,
    ) {
        #[cfg(not(loom))]
        if self.policy.auto_half_open && to & TAG == OPEN {
            if let Some(d) = open_for {
                self.half_open_at(to, d);
            }
        }
        let t = Transition {
            breaker: self.meta.breaker.clone(),
            upstream: self.meta.upstream.clone(),
            from: state_of(from),
            to: state_of(to),
            at: Instant::now(),
            generation: to >> 3,
            open_for,
            reason,
            open_for_from_hint: hinted,
        };
        tracing::info!(
            target: "steadfast::breaker",
            breaker = &*t.breaker,
            upstream = &*t.upstream,
            from = t.from.as_str(),
            to = t.to.as_str(),
            generation = t.generation,
            reason = t.reason.as_str(),
            open_for_ms = open_for.map(|d| d.as_millis() as u64),
            open_for_from_hint = hinted,
            "breaker transition"
        );
        #[cfg(feature = "metrics")]
        {
            metrics::counter!(
                "steadfast_breaker_transitions_total",
                "breaker" => metrics::SharedString::from(t.breaker.clone()),
                "upstream" => metrics::SharedString::from(t.upstream.clone()),
                "from" => t.from.as_str(),
                "to" => t.to.as_str(),
                "reason" => t.reason.as_str()
            )
            .increment(1);
            record_state(&self.meta, t.from, t.to);
        }
        if let Some(watch) = self.meta.watch.get() {
            if let Some(listener) = watch.listener.get() {
                listener(&t);
            }
            // No receivers is fine: nobody listens.
            if let Some(events) = watch.events.get() {
                let _ = events.send(t);
            }
        }
    }
}

/// The state gauge, one series per state (1 for the state in force, 0 for the others, the
/// Prometheus way of exporting an enum): the state left goes to 0, the one entered to 1.
#[cfg(feature = "metrics")]
pub(crate) fn record_state(meta: &Meta, from: BreakerState, to: BreakerState) {
    if meta.untracked.load(std::sync::atomic::Ordering::Acquire) {
        return;
    }
    if from != to {
        state_gauge(meta, from).set(0.0);
    }
    state_gauge(meta, to).set(1.0);
}

/// A per-key breaker left its map (evicted) or was never kept: the state it is in reads 0,
/// and its later moves are not recorded (a breaker the map keeps for the key records its
/// own).
#[cfg(feature = "metrics")]
pub(crate) fn record_gone(meta: &Meta, state: BreakerState) {
    meta.untracked
        .store(true, std::sync::atomic::Ordering::Release);
    state_gauge(meta, state).set(0.0);
}

#[cfg(feature = "metrics")]
fn state_gauge(meta: &Meta, state: BreakerState) -> metrics::Gauge {
    metrics::gauge!(
        "steadfast_breaker_state",
        "breaker" => metrics::SharedString::from(meta.breaker.clone()),
        "upstream" => metrics::SharedString::from(meta.upstream.clone()),
        "state" => state.as_str()
    )
}

/// What a rejection says about when to come back while a trip's schedule is being written
/// (a window of a few instructions): soon.
const UNSCHEDULED: Duration = Duration::from_millis(1);

/// Bits of a [`stamp`] that hold the generation (the rest hold microseconds: 570 years).
const STAMP_GEN_BITS: u32 = 10;
const STAMP_TIME_BITS: u32 = 64 - STAMP_GEN_BITS;
const STAMP_TIME_MASK: u64 = (1 << STAMP_TIME_BITS) - 1;

/// A time (microseconds) stamped with the low bits of the generation it belongs to.
fn stamp(generation: u64, micros: u64) -> u64 {
    (generation << STAMP_TIME_BITS) | micros.min(STAMP_TIME_MASK)
}

/// The time of `stamped` if it belongs to `generation` (compared on the low 10 bits: a stale
/// stamp would need a writer stalled across 1024 transitions to pass; [`publish`] never lets
/// one overwrite a newer stamp).
fn unstamp(stamped: u64, generation: u64) -> Option<u64> {
    let mask = (1 << STAMP_GEN_BITS) - 1;
    ((stamped >> STAMP_TIME_BITS) == generation & mask).then_some(stamped & STAMP_TIME_MASK)
}

/// Writes stamp `new` into `slot` unless `slot` already holds a stamp of a newer generation
/// (a writer that stalled after its transition must not overwrite a later one's schedule).
fn publish(slot: &AtomicU64, new: u64) {
    let gen_of = |s: u64| (s >> STAMP_TIME_BITS) as u32;
    let mut cur = slot.load(Acquire);
    loop {
        // Tags are 10 bits: "newer" is up to half the tag range ahead.
        let ahead = gen_of(cur).wrapping_sub(gen_of(new)) & ((1 << STAMP_GEN_BITS) - 1);
        if cur != 0 && ahead != 0 && ahead < (1 << (STAMP_GEN_BITS - 1)) {
            return;
        }
        match slot.compare_exchange_weak(cur, new, AcqRel, Acquire) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

/// Whether 32-bit generation tag `a` is ahead of `b` (wrapping).
fn newer32(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// A duration in nanoseconds, saturating at `u64::MAX` (584 years).
pub(crate) fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// Nanoseconds to microseconds, rounded up (a deadline never comes early).
fn micros_ceil(nanos: u64) -> u64 {
    nanos.div_ceil(1000)
}

fn pack(gen32: u32, taken: u16, succ: u16) -> u64 {
    (u64::from(gen32) << 32) | (u64::from(taken) << 16) | u64::from(succ)
}

fn unpack(h: u64) -> (u32, u16, u16) {
    ((h >> 32) as u32, (h >> 16) as u16, h as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Ordering::Release;
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
            open_time_fn: crate::state::OpenTime::Exponential { factor: 2.0 },
            max_half_open_wait: None,
            auto_half_open: false,
            jitter_percent: 0,
            probes,
            seed: 0,
        }
    }

    /// A schedule written late by a stalled thread never replaces a newer generation's.
    #[test]
    fn a_late_schedule_never_overwrites_a_newer_one() {
        let slot = AtomicU64::new(0);
        publish(&slot, stamp(3, 100));
        assert_eq!(unstamp(slot.load(Acquire), 3), Some(100));
        publish(&slot, stamp(1, 50)); // generation 1's writer wakes up late
        assert_eq!(unstamp(slot.load(Acquire), 3), Some(100));
        publish(&slot, stamp(5, 70));
        assert_eq!(unstamp(slot.load(Acquire), 5), Some(70));
        // Across the 10-bit tag wrap, 1025 is newer than 1023.
        let slot = AtomicU64::new(stamp(1020, 9));
        publish(&slot, stamp(1023, 1));
        assert_eq!(unstamp(slot.load(Acquire), 1023), Some(1));
        publish(&slot, stamp(1025, 2));
        assert_eq!(unstamp(slot.load(Acquire), 1025), Some(2));
        publish(&slot, stamp(1023, 3));
        assert_eq!(unstamp(slot.load(Acquire), 1025), Some(2));
    }

    /// OS threads hammer probe admission and return in one HalfOpen generation: never more
    /// than N probes out at once, and every permit comes back.
    #[test]
    fn probe_permits_under_real_contention() {
        let shared = Arc::new(Shared::new(Arc::new(policy(3)), Meta::default()));
        shared.word.store((7 << 3) | HALF_OPEN, Release);
        shared
            .cold
            .verdict_by
            .store(stamp(7, STAMP_TIME_MASK), Release);
        let out = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (shared, out, max) = (shared.clone(), out.clone(), max.clone());
                std::thread::spawn(move || {
                    let mut admitted = 0;
                    for _ in 0..20_000 {
                        if let Ok(Permit::Probe(w)) =
                            shared.take_probe(shared.word.load(Acquire), 0)
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
        let (_, taken, _) = unpack(shared.cold.half.load(Acquire));
        assert_eq!(taken, 0, "no permit lost");
    }

    /// Concurrent failures in Closed trip exactly once per generation.
    #[test]
    fn concurrent_trips_transition_once() {
        let shared = Arc::new(Shared::new(Arc::new(policy(1)), Meta::default()));
        let mut rx = shared.subscribe();
        let w = shared.word.load(Acquire);
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
        assert_eq!(shared.state(), BreakerState::Open);
        assert_eq!(shared.generation(), 1);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "exactly one transition");
    }
}

#[cfg(all(test, loom))]
mod loom_model;
