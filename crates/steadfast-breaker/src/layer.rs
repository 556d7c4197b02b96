use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use steadfast_core::DefaultClassifier;
use tower_layer::Layer;

use crate::breaker::{Breaker, STRIPES};
use crate::error::InvalidBreakerConfig;
use crate::handle::BreakerHandle;
use crate::handle::KeyedTransitions;
use crate::keyed::KeyedMap;
use crate::service::{CircuitBreaker, KeyedCircuitBreaker};
use crate::state::{BreakerState, DEFAULT_NAME, Meta, OpenTime, Policy, WindowKind};
use crate::{BreakerKey, ByAuthority, ExtractKey};

/// The largest count window: one byte per slot, so at most 1 MiB per breaker.
const MAX_COUNT_WINDOW: u32 = 1 << 20;

/// The shortest open time: an open time of zero would half-open at once and never fail fast
/// (resilience4j's floor is 1 ms too).
const MIN_OPEN_TIME: Duration = Duration::from_millis(1);

/// Builds a breaker layer; start with [`CircuitBreakerLayer::builder`].
///
/// Defaults (the seed's breaker, resilience4j's half-open): trip after **5 consecutive
/// failures**; stay open **30 s**, doubling on each consecutive trip up to **5 min**, minus up
/// to 10 % jitter; admit **1** half-open probe. Rate windows and slow-call detection are off
/// until configured. Failures are what [`DefaultClassifier`] says: 5xx, transport errors and
/// timeouts, gRPC UNAVAILABLE / DEADLINE_EXCEEDED / INTERNAL / UNKNOWN / DATA_LOSS; 4xx is the
/// caller's fault and counts as success.
#[derive(Clone, Debug)]
#[must_use]
pub struct CircuitBreakerBuilder<C = DefaultClassifier> {
    policy: Policy,
    classifier: C,
    backpressure: bool,
    max_keys: usize,
    idle: Duration,
    name: Arc<str>,
    initial: Initial,
}

/// The state a breaker starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Initial {
    Closed,
    OpenFor(Duration),
    ForcedOpen,
    Disabled,
    MetricsOnly,
    /// Asked for a state that is not one to start in (refused when built).
    Refused(BreakerState),
}

impl Initial {
    /// Puts a new breaker in this state.
    pub(crate) fn apply(self, shared: &crate::state::Shared) {
        match self {
            Initial::Closed | Initial::Refused(_) => {}
            Initial::OpenFor(d) => shared.force_with(BreakerState::Open, d),
            Initial::ForcedOpen => shared.force(BreakerState::ForcedOpen),
            Initial::Disabled => shared.force(BreakerState::Disabled),
            Initial::MetricsOnly => shared.force(BreakerState::MetricsOnly),
        }
    }
}

impl Default for CircuitBreakerBuilder {
    fn default() -> Self {
        Self {
            policy: Policy {
                consecutive: Some(5),
                window: None,
                min_calls: 10,
                failure_rate: None,
                slow: None,
                open_time: Duration::from_secs(30),
                max_open_time: Duration::from_secs(300),
                open_time_fn: OpenTime::Exponential { factor: 2.0 },
                max_half_open_wait: None,
                auto_half_open: false,
                jitter_percent: 10,
                probes: 1,
                seed: steadfast_core::__private::rand::random_seed(0),
            },
            classifier: DefaultClassifier::new(),
            backpressure: false,
            max_keys: 10_000,
            idle: Duration::from_secs(600),
            name: Arc::from(DEFAULT_NAME),
            initial: Initial::Closed,
        }
    }
}

impl<C> CircuitBreakerBuilder<C> {
    /// Trip after this many consecutive failures (`None`: no consecutive rule).
    pub fn consecutive_failures(mut self, n: Option<u32>) -> Self {
        self.policy.consecutive = n;
        self
    }

    /// Measure rates over the last `size` calls (a true count window), 1 to 1 048 576.
    /// [`min_calls`](Self::min_calls) larger than `size` is lowered to `size`, as resilience4j
    /// does: the window never holds more than `size` calls.
    pub fn count_window(mut self, size: u32) -> Self {
        self.policy.window = Some(WindowKind::Count { size });
        self
    }

    /// The slow-call threshold when the slow-call rule is on: what a preset checks against its
    /// attempt timeout.
    pub fn slow_call_threshold(&self) -> Option<Duration> {
        self.policy.slow.map(|s| s.0)
    }

    /// The whole time window (bucket width × buckets, saturating) when one is set: what a
    /// preset checks against its attempt timeout.
    pub fn time_window_len(&self) -> Option<Duration> {
        match self.policy.window {
            Some(WindowKind::Time { width, buckets }) => Some(width.saturating_mul(buckets)),
            _ => None,
        }
    }

    /// Measure rates over `buckets` time buckets of `width` each (window = width × buckets).
    pub fn time_window(mut self, width: Duration, buckets: u32) -> Self {
        self.policy.window = Some(WindowKind::Time { width, buckets });
        self
    }

    /// Trip when at least `percent` of the window's calls failed (needs a window: without one,
    /// `build` says so).
    pub fn failure_rate(mut self, percent: u8) -> Self {
        self.policy.failure_rate = Some(percent);
        self
    }

    /// Calls slower than `threshold` (a non-zero duration) are slow; trip when at least
    /// `percent` of the window's calls were slow (needs a window: without one, `build` says so).
    pub fn slow_calls(mut self, threshold: Duration, percent: u8) -> Self {
        self.policy.slow = Some((threshold, percent));
        self
    }

    /// Rates are judged only once the window holds this many calls (default 10, at least 1;
    /// at most the size of a count window, to which a larger value is lowered).
    pub fn min_calls(mut self, n: u32) -> Self {
        self.policy.min_calls = n;
        self
    }

    /// How long the breaker stays open after its first trip (default 30 s, at least 1 ms).
    pub fn open_time(mut self, d: Duration) -> Self {
        self.policy.open_time = d;
        self
    }

    /// The cap of the growing open time (default 5 min).
    pub fn max_open_time(mut self, d: Duration) -> Self {
        self.policy.max_open_time = d;
        self
    }

    /// Up to this percentage is taken off each open time at random (default 10; 0 for exact
    /// times in tests; values over 100 count as 100).
    pub fn jitter_percent(mut self, p: u8) -> Self {
        self.policy.jitter_percent = p.min(100);
        self
    }

    /// Seeds the jitter's random stream.
    pub fn seed(mut self, seed: u64) -> Self {
        self.policy.seed = seed;
        self
    }

    /// How many probes a half-open breaker admits; that many successes close it (default 1).
    pub fn half_open_probes(mut self, n: u32) -> Self {
        self.policy.probes = n;
        self
    }

    /// Opt-in backpressure: instead of failing calls fast, `poll_ready` stays `Pending` while
    /// the breaker is open and wakes when a probe may be admitted. For load balancers that
    /// route around services that are not ready. Single-breaker layers only: the per-key
    /// builds refuse it (readiness comes before the request, so before its key).
    pub fn backpressure(mut self, on: bool) -> Self {
        self.backpressure = on;
        self
    }

    /// Per-key layers keep at most this many breakers (default 10 000; rounded up to a
    /// multiple of 16, the number of shards). A new key in a full shard makes room for
    /// itself by evicting one breaker, looking at no more than 32 (so each new key costs
    /// O(1), however large the map): the first one idle for the
    /// [idle time](Self::idle_eviction), else the least recently used Closed one it saw.
    /// An open or half-open breaker used within the idle time is never evicted, so a flood of
    /// new keys cannot reset a breaker that is protecting its callers; nor is one put in a
    /// state by hand (forced open, disabled, metrics only). If everything it looked at is
    /// such a breaker, the new key's call gets a breaker of its own that is not kept (it
    /// cannot trip; each such call pays for a new breaker). An idle per-key breaker costs about
    /// 480 bytes of heap, 590 resident, its name included (`cargo run --release -p steadfast-bench --bin keyed`).
    /// A key that several threads call gets a stripe of its counters for each (as a
    /// standalone breaker has), so their calls do not write one cache line: 128 bytes per
    /// thread besides the one that made it, and a 256-byte table for them; at most 2,176
    /// bytes more per key (threads past the first eight share eight stripes).
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// Per-key breakers unused for this long are the first evicted when room is needed, and
    /// open ones lose their protection from eviction (default 10 min; measured in whole
    /// seconds).
    pub fn idle_eviction(mut self, d: Duration) -> Self {
        self.idle = d;
        self
    }

    /// Replaces what counts as a failure.
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerBuilder<C2> {
        CircuitBreakerBuilder {
            policy: self.policy,
            classifier,
            backpressure: self.backpressure,
            max_keys: self.max_keys,
            idle: self.idle,
            name: self.name,
            initial: self.initial,
        }
    }

    /// How the open time grows with consecutive trips (default
    /// `OpenTime::Exponential { factor: 2.0 }`: `open_time`, then twice that, and so on up to
    /// `max_open_time`). `OpenTime::Constant` keeps `open_time`; `OpenTime::Custom(f)` takes
    /// `f(trips)`, capped. Jitter and server hints apply afterwards.
    ///
    /// ```
    /// use std::time::Duration;
    /// use steadfast_breaker::{CircuitBreakerLayer, OpenTime};
    ///
    /// fn steps(trips: u32) -> Duration {
    ///     Duration::from_secs(match trips { 1 => 5, 2 => 30, _ => 120 })
    /// }
    /// let layer = CircuitBreakerLayer::builder()
    ///     .open_time_growth(OpenTime::Custom(steps))
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// assert!(CircuitBreakerLayer::builder()
    ///     .open_time_growth(OpenTime::Exponential { factor: 0.5 })
    ///     .build()
    ///     .is_err());
    /// ```
    pub fn open_time_growth(mut self, growth: OpenTime) -> Self {
        self.policy.open_time_fn = growth;
        self
    }

    /// How long half-open probes may go without a verdict before the breaker re-opens
    /// (resilience4j's `maxWaitDurationInHalfOpenState`; default `None`: the open time that
    /// preceded). The check happens when a call arrives.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = steadfast_breaker::CircuitBreakerLayer::builder()
    ///     .max_half_open_wait(Some(Duration::from_secs(5)))
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// ```
    pub fn max_half_open_wait(mut self, wait: Option<Duration>) -> Self {
        self.policy.max_half_open_wait = wait;
        self
    }

    /// Half-open on a timer when the open time ends (default off: an open breaker half-opens
    /// when the next call arrives, and `handle.state()` reports `HalfOpen` in between). For
    /// dashboards and subscribers that watch state without traffic. Cost: one tokio timer
    /// task per trip (none without a tokio runtime, where the breaker falls back to the
    /// next call).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// use steadfast_breaker::{BreakerState, CircuitBreakerLayer, TransitionReason};
    ///
    /// let layer = CircuitBreakerLayer::builder().auto_half_open(true).build().unwrap();
    /// let handle = layer.handle();
    /// let mut events = handle.subscribe();
    /// handle.open_for(Duration::from_secs(1));
    /// tokio::time::sleep(Duration::from_secs(1)).await;
    /// tokio::task::yield_now().await;
    /// let t = std::iter::from_fn(|| events.try_recv()).last().unwrap();
    /// assert_eq!((t.to, t.reason), (BreakerState::HalfOpen, TransitionReason::OpenTimeElapsed));
    /// # }
    /// ```
    pub fn auto_half_open(mut self, on: bool) -> Self {
        self.policy.auto_half_open = on;
        self
    }

    /// Start open for `d` (then half-open as after a trip): for example until a first
    /// health check, or to ramp a new upstream in. At least 1 ms, as an open time. Per-key
    /// breakers start so too, each when its key is first seen.
    ///
    /// ```
    /// use std::time::Duration;
    /// use steadfast_breaker::{BreakerState, CircuitBreakerLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let warming = CircuitBreakerLayer::builder().start_open_for(Duration::from_secs(2)).build().unwrap();
    /// assert_eq!(warming.handle().state(), BreakerState::Open);
    /// // Open until a health check closes it by hand.
    /// let gated = CircuitBreakerLayer::builder().initial_state(BreakerState::ForcedOpen).build().unwrap();
    /// assert_eq!(gated.handle().state(), BreakerState::ForcedOpen);
    /// gated.handle().close();
    /// # }
    /// ```
    pub fn start_open_for(mut self, d: Duration) -> Self {
        self.initial = Initial::OpenFor(d);
        self
    }

    /// Start in a state set by hand: `ForcedOpen` (until a handle closes it), `Disabled`,
    /// `MetricsOnly`, or `Closed` (the default). `Open` and `HalfOpen` are not states to
    /// start in by hand (building refuses them): use [`start_open_for`](Self::start_open_for).
    /// Per-key breakers start in it too, each when its key is first seen.
    pub fn initial_state(mut self, state: BreakerState) -> Self {
        self.initial = match state {
            BreakerState::ForcedOpen => Initial::ForcedOpen,
            BreakerState::Disabled => Initial::Disabled,
            BreakerState::MetricsOnly => Initial::MetricsOnly,
            BreakerState::Closed => Initial::Closed,
            other => Initial::Refused(other),
        };
        self
    }

    /// Names the layer's breakers in events, metrics (the `breaker` label) and transitions
    /// (default `"default"`). A plain breaker's `upstream` is this name too; a per-key
    /// breaker's `upstream` is its key's [`BreakerKey::name`](crate::BreakerKey::name), so
    /// the name tells apart two callers' breakers for one upstream.
    ///
    /// ```
    /// let layer = steadfast_breaker::CircuitBreakerLayer::builder()
    ///     .name("payments")
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(layer.handle().name(), "payments");
    /// ```
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    fn validated(&self) -> Result<Policy, InvalidBreakerConfig> {
        if self.name.is_empty() {
            return Err(InvalidBreakerConfig::EmptyName);
        }
        match self.initial {
            Initial::Refused(state) => return Err(InvalidBreakerConfig::InitialState(state)),
            Initial::OpenFor(d) if d < MIN_OPEN_TIME => {
                return Err(InvalidBreakerConfig::TooShort {
                    what: "start_open_for",
                    min: MIN_OPEN_TIME,
                    got: d,
                });
            }
            _ => {}
        }
        if let Some(d) = self
            .policy
            .max_half_open_wait
            .filter(|d| *d < MIN_OPEN_TIME)
        {
            return Err(InvalidBreakerConfig::TooShort {
                what: "max_half_open_wait",
                min: MIN_OPEN_TIME,
                got: d,
            });
        }
        if let OpenTime::Exponential { factor } = self.policy.open_time_fn {
            if !(factor.is_finite() && factor >= 1.0) {
                return Err(InvalidBreakerConfig::OpenTimeGrowth);
            }
        }
        let mut p = self.policy;
        if p.consecutive == Some(0) {
            return Err(InvalidBreakerConfig::Zero("consecutive_failures"));
        }
        if p.probes == 0 {
            return Err(InvalidBreakerConfig::Zero("half_open_probes"));
        }
        if p.probes > u32::from(u16::MAX) {
            return Err(InvalidBreakerConfig::OutOfRange {
                what: "half_open_probes",
                range: "1-65535",
                got: p.probes.into(),
            });
        }
        if p.min_calls == 0 {
            return Err(InvalidBreakerConfig::Zero("min_calls"));
        }
        match p.window {
            Some(WindowKind::Count { size: 0 }) => {
                return Err(InvalidBreakerConfig::Zero("count_window"));
            }
            Some(WindowKind::Count { size }) if size > MAX_COUNT_WINDOW => {
                return Err(InvalidBreakerConfig::OutOfRange {
                    what: "count_window",
                    range: "1-1048576 calls",
                    got: size.into(),
                });
            }
            // resilience4j's rule: a count window never holds more calls than its size, so
            // the minimum is at most the size (else the rate rule could never apply).
            Some(WindowKind::Count { size }) => p.min_calls = p.min_calls.min(size),
            Some(WindowKind::Time { buckets, .. }) if buckets == 0 || buckets > 64 => {
                return Err(InvalidBreakerConfig::OutOfRange {
                    what: "time_window buckets",
                    range: "1-64",
                    got: buckets.into(),
                });
            }
            Some(WindowKind::Time { width, .. }) if width.is_zero() => {
                return Err(InvalidBreakerConfig::TooShort {
                    what: "time_window bucket width",
                    min: Duration::from_nanos(1),
                    got: width,
                });
            }
            _ => {}
        }
        for (what, rate) in [
            ("failure_rate", p.failure_rate),
            ("slow_calls rate", p.slow.map(|s| s.1)),
        ] {
            if let Some(r) = rate {
                if r == 0 || r > 100 {
                    return Err(InvalidBreakerConfig::Rate(what, r));
                }
            }
        }
        if let Some((threshold, _)) = p.slow {
            if threshold.is_zero() {
                return Err(InvalidBreakerConfig::TooShort {
                    what: "slow_calls threshold",
                    min: Duration::from_nanos(1),
                    got: threshold,
                });
            }
        }
        if p.window.is_none() {
            if p.failure_rate.is_some() || p.slow.is_some() {
                return Err(InvalidBreakerConfig::NeverTrips(
                    "failure_rate and slow_calls are judged over a window: add count_window or time_window",
                ));
            }
            if p.consecutive.is_none() {
                return Err(InvalidBreakerConfig::NeverTrips(
                    "no consecutive_failures rule and no window: set one of them",
                ));
            }
        }
        if p.window.is_some() && p.failure_rate.is_none() && p.slow.is_none() {
            p.failure_rate = Some(50);
        }
        if p.open_time < MIN_OPEN_TIME {
            return Err(InvalidBreakerConfig::TooShort {
                what: "open_time",
                min: MIN_OPEN_TIME,
                got: p.open_time,
            });
        }
        if p.max_open_time < p.open_time {
            return Err(InvalidBreakerConfig::OpenTimes);
        }
        if self.max_keys == 0 {
            return Err(InvalidBreakerConfig::Zero("max_keys"));
        }
        Ok(p)
    }

    /// One breaker shared by every service this layer makes.
    ///
    /// # Errors
    ///
    /// [`InvalidBreakerConfig`] when a count is zero or out of range, a rate is outside 1-100 %, a
    /// duration is too short, the open times are inverted, or the breaker could never trip.
    pub fn build(self) -> Result<CircuitBreakerLayer<C>, InvalidBreakerConfig> {
        let policy = self.validated()?;
        let breaker = Arc::new(Breaker::new(
            Arc::new(policy),
            Arc::new(self.classifier),
            STRIPES,
            Meta::new(self.name.clone(), self.name),
        ));
        self.initial.apply(&breaker.shared);
        Ok(CircuitBreakerLayer {
            breaker,
            backpressure: self.backpressure,
        })
    }

    /// One breaker per upstream authority of the request URI.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build).
    pub fn build_per_authority(
        self,
    ) -> Result<KeyedCircuitBreakerLayer<C, ByAuthority, Option<Authority>>, InvalidBreakerConfig>
    {
        self.build_per_key(ByAuthority)
    }

    /// One breaker per key that `extract` finds in each request.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build).
    pub fn build_per_key<K, Key>(
        self,
        extract: K,
    ) -> Result<KeyedCircuitBreakerLayer<C, K, Key>, InvalidBreakerConfig>
    where
        K: ExtractKey<Key>,
        Key: BreakerKey,
    {
        if self.backpressure {
            return Err(InvalidBreakerConfig::BackpressurePerKey);
        }
        let policy = self.validated()?;
        Ok(KeyedCircuitBreakerLayer {
            map: Arc::new(KeyedMap::new(
                self.name,
                self.initial,
                policy,
                Arc::new(self.classifier),
                self.max_keys,
                self.idle,
            )),
            extract,
        })
    }
}

/// A circuit breaker: fails calls fast while an upstream is down.
///
/// ```text
///            5 consecutive failures (or a window's rate)
///   Closed ──────────────────────────────────────────▶ Open ──┐ open time passed
///     ▲                                                ▲      │ (30 s, growing)
///     │ probe succeeded                 probe failed / │      ▼
///     └──────────────────────────── HalfOpen ──────────┘  admits 1 probe
/// ```
///
/// The layer value owns the breaker: every service it makes shares one state, whatever the
/// host clones (hyper clones services per connection; axum applies `Router::layer` per route).
/// For one breaker per route, build one layer per route (`Router::route_layer` with a layer
/// built for that route). For one breaker per upstream, use
/// [`build_per_authority`](CircuitBreakerBuilder::build_per_authority).
///
/// An open breaker fails the call with [`BreakerOpen`](crate::error::BreakerOpen) without touching
/// the inner service; `poll_ready` never fails for policy reasons.
///
/// # On a server (axum, tonic)
///
/// Failing with `BreakerOpen` makes the service's error a `BoxError`, which an axum `Router`
/// refuses ("the trait `From<BoxError>` is not implemented for `Infallible`"). On a server
/// use [`answering()`](Self::answering): an open breaker then answers `503` with
/// `Retry-After` (gRPC: `UNAVAILABLE` with `grpc-retry-pushback-ms`) and the inner error type
/// is kept.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use steadfast_breaker::{CircuitBreakerLayer, BreakerState};
/// use steadfast_breaker::error::BreakerOpen;
/// use tower::{Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let layer = CircuitBreakerLayer::builder()
///     .consecutive_failures(Some(2))
///     .open_time(Duration::from_secs(10))
///     .jitter_percent(0)
///     .build()
///     .unwrap();
/// let handle = layer.handle();
/// let upstream = service_fn(|_req: http::Request<()>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::builder().status(503).body(()).unwrap())
/// });
/// let mut svc = tower::Layer::layer(&layer, upstream);
/// for _ in 0..2 {
///     let res = svc.ready().await.unwrap().call(http::Request::new(())).await.unwrap();
///     assert_eq!(res.status(), 503);
/// }
/// assert_eq!(handle.state(), BreakerState::Open);
/// let err = svc.ready().await.unwrap().call(http::Request::new(())).await.unwrap_err();
/// assert_eq!(err.downcast_ref::<BreakerOpen>().unwrap().retry_after(), Some(Duration::from_secs(10)));
/// # }
/// ```
pub struct CircuitBreakerLayer<C = DefaultClassifier> {
    breaker: Arc<Breaker<C>>,
    backpressure: bool,
}

impl<C> Clone for CircuitBreakerLayer<C> {
    fn clone(&self) -> Self {
        Self {
            breaker: self.breaker.clone(),
            backpressure: self.backpressure,
        }
    }
}

impl<C> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("state", &self.breaker.shared.state())
            .field("backpressure", &self.backpressure)
            .finish()
    }
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CircuitBreakerLayer {
    /// A breaker with the defaults (see [`CircuitBreakerBuilder`]).
    pub fn new() -> Self {
        CircuitBreakerBuilder::default()
            .build()
            .expect("the defaults are valid")
    }

    /// A builder with the defaults.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder::default()
    }
}

impl<C> CircuitBreakerLayer<C> {
    pub(crate) fn shared_breaker(&self) -> Arc<Breaker<C>> {
        self.breaker.clone()
    }

    /// Observe and control the breaker.
    pub fn handle(&self) -> BreakerHandle<C> {
        BreakerHandle {
            breaker: self.breaker.clone(),
        }
    }
}

impl<S, C> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.breaker.clone(), self.backpressure)
    }
}

/// Per-key circuit breakers (default key: the request's authority), in a bounded map with
/// idle eviction. Built by [`CircuitBreakerBuilder::build_per_authority`] or
/// [`build_per_key`](CircuitBreakerBuilder::build_per_key).
///
/// # Clone
///
/// Clones share the map.
pub struct KeyedCircuitBreakerLayer<C, K, Key> {
    map: Arc<KeyedMap<Key, C>>,
    extract: K,
}

impl<C, K: Clone, Key> Clone for KeyedCircuitBreakerLayer<C, K, Key> {
    fn clone(&self) -> Self {
        Self {
            map: self.map.clone(),
            extract: self.extract.clone(),
        }
    }
}

impl<C, K, Key> fmt::Debug for KeyedCircuitBreakerLayer<C, K, Key> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerLayer")
            .field("map", &self.map)
            .finish_non_exhaustive()
    }
}

impl<C, K, Key: BreakerKey> KeyedCircuitBreakerLayer<C, K, Key> {
    /// The handle of `key`'s breaker, made now if no call has made it yet: subscribe or set
    /// a state before the first call.
    ///
    /// A handle controls the breaker it was taken from. A Closed per-key breaker that goes
    /// unused can be evicted, and a later call to its key makes a new one: take the handle
    /// again before acting on a key that may have been idle (a breaker put in a state by hand
    /// is never evicted, so a state set through a fresh handle holds). When the map is full of
    /// breakers that must be kept (see
    /// [`max_keys`](CircuitBreakerBuilder::max_keys)), the handle is of a breaker the map
    /// does not keep.
    pub fn handle(&self, key: &Key) -> BreakerHandle<C> {
        self.map.handle(key)
    }

    /// The handle of the breaker calls to `uri` use (the key the layer's extractor finds in
    /// it, with no headers), made now if no call has made it yet.
    ///
    /// ```
    /// use steadfast_breaker::CircuitBreakerLayer;
    ///
    /// let layer = CircuitBreakerLayer::builder().build_per_authority().unwrap();
    /// let uri: http::Uri = "http://orders:8080/items".parse().unwrap();
    /// let handle = layer.handle_for_uri(&uri);
    /// assert_eq!(handle.upstream(), "orders:8080");
    /// assert_eq!(layer.keys().len(), 1);
    /// ```
    pub fn handle_for_uri(&self, uri: &http::Uri) -> BreakerHandle<C>
    where
        K: ExtractKey<Key>,
    {
        self.handle(&self.extract.extract(uri, &http::HeaderMap::new()))
    }

    /// The keys that have a breaker now (made by a call or a handle, not evicted yet).
    pub fn keys(&self) -> Vec<Key> {
        self.map.keys()
    }

    /// Subscribes to every key's transitions, breakers made later included: each comes with
    /// its key.
    ///
    /// ```
    /// use steadfast_breaker::{BreakerState, CircuitBreakerLayer};
    ///
    /// let layer = CircuitBreakerLayer::builder().build_per_authority().unwrap();
    /// let mut all = layer.subscribe_all();
    /// let key = Some("orders:8080".parse().unwrap());
    /// layer.handle(&key).force_open();
    /// let (seen, t) = all.try_recv().unwrap();
    /// assert_eq!((seen, t.to), (key, BreakerState::ForcedOpen));
    /// ```
    pub fn subscribe_all(&self) -> KeyedTransitions<Key> {
        KeyedTransitions(self.map.subscribe_all())
    }

    /// How many per-key breakers exist now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no per-key breaker exists yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S, C, K: Clone, Key> Layer<S> for KeyedCircuitBreakerLayer<C, K, Key> {
    type Service = KeyedCircuitBreaker<S, C, K, Key>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreaker::new(inner, self.map.clone(), self.extract.clone())
    }
}
