use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use steadfast_core::DefaultClassifier;
use tower_layer::Layer;

use super::latency::Learnt;
use super::service::Hedge;
use crate::budget::{Budget, BudgetConfig};
use crate::error::InvalidHedgeConfig;
use crate::replay::DEFAULT_REPLAY_CAP;

/// When a hedge is sent.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum HedgeDelay {
    /// A fixed delay after the attempt before it was sent.
    Fixed(Duration),
    /// The given percentile (above 0, at most 1) of recent attempts' latencies, learnt over
    /// a window (see [`HedgeBuilder::window`] and [`HedgeBuilder::min_samples`]): `0.95`
    /// sends a hedge for a call that is slower than 95 % of recent ones.
    Percentile(f64),
}

/// Where the delay comes from, as the futures read it.
pub(crate) enum Delay {
    Fixed(Duration),
    /// Boxed: its histograms take about 5 KiB, which a fixed delay need not carry.
    Learnt(Box<Learnt>),
}

impl Delay {
    /// The delay now, if one is known.
    #[inline]
    pub(crate) fn get(&self) -> Option<Duration> {
        match self {
            Self::Fixed(d) => Some(*d),
            Self::Learnt(l) => l.delay(),
        }
    }

    #[inline]
    pub(crate) fn learnt(&self) -> Option<&Learnt> {
        match self {
            Self::Fixed(_) => None,
            Self::Learnt(l) => Some(l),
        }
    }
}

pub(crate) struct Config<C> {
    pub(crate) max_attempts: u32,
    pub(crate) delay: Delay,
    pub(crate) classifier: C,
    pub(crate) replay_cap: usize,
    pub(crate) non_idempotent: bool,
    /// Caps hedges at a share of the calls (`max_extra_load`).
    pub(crate) extra: Budget,
    /// A retry layer's budget the hedges also spend from.
    pub(crate) retry_budget: Option<Arc<Budget>>,
    pub(crate) max_hint: Duration,
    pub(crate) name: Arc<str>,
    pub(crate) attempt_header: Option<http::HeaderName>,
    pub(crate) wall_clock: fn() -> SystemTime,
}

/// Configures a [`HedgeLayer`].
///
/// Defaults — Finagle's backup requests and gRPC A6's hedging policy:
///
/// | setting | default |
/// |---|---|
/// | attempts | 2 in total (the call and one hedge); at most 5, as gRPC A6 allows |
/// | delay | the percentile `1 − max_extra_load` (the 95th) of recent attempts' latencies |
/// | learning | a 10 s window; no hedge until a window holds 100 latencies |
/// | extra load | hedges ≤ 5 % of calls (a budget of their own: `0.05` of a token per call, over 10 s) |
/// | methods | idempotent ones (GET HEAD OPTIONS TRACE PUT DELETE) or a request with `Idempotency-Key` |
/// | answers that send the next hedge at once | retryable ones (from [`DefaultClassifier`]: 429, 502, 503, 504, transport errors, gRPC UNAVAILABLE) |
/// | server hints | `Retry-After` and `grpc-retry-pushback-ms` delay the next hedge, up to 300 s; a longer one or a pushback that says stop ends hedging |
/// | replay | bodies up to 64 KiB |
#[must_use]
pub struct HedgeBuilder<C = DefaultClassifier> {
    max_attempts: u32,
    delay: Option<HedgeDelay>,
    min_samples: u32,
    window: Duration,
    classifier: C,
    replay_cap: usize,
    non_idempotent: bool,
    max_extra_load: f64,
    retry_budget: Option<Arc<Budget>>,
    max_hint: Duration,
    name: Arc<str>,
    attempt_header: Option<http::HeaderName>,
    wall_clock: fn() -> SystemTime,
}

impl<C> fmt::Debug for HedgeBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeBuilder")
            .field("max_attempts", &self.max_attempts)
            .field("delay", &self.delay)
            .field("max_extra_load", &self.max_extra_load)
            .finish_non_exhaustive()
    }
}

impl Default for HedgeBuilder {
    fn default() -> Self {
        Self {
            max_attempts: 2,
            delay: None,
            min_samples: 100,
            window: Duration::from_secs(10),
            classifier: DefaultClassifier::new(),
            replay_cap: DEFAULT_REPLAY_CAP,
            non_idempotent: false,
            max_extra_load: 0.05,
            retry_budget: None,
            max_hint: Duration::from_secs(300),
            name: Arc::from("default"),
            attempt_header: Some(crate::header::ATTEMPT_HEADER),
            wall_clock: SystemTime::now,
        }
    }
}

impl<C> HedgeBuilder<C> {
    /// Attempts in total, the first included (2 = the call and one hedge; 1 turns hedging
    /// off; more than 5 is an error, as gRPC A6 caps attempts at 5). An attempt an endpoint
    /// refused before sending it (a balancer's `Rerouted`) is sent again at once and does not
    /// count, as gRPC A6's transparent retries do not; a call is rerouted 64 times at most.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// When a hedge is sent (default: [`HedgeDelay::Percentile`] of `1 − max_extra_load`, at
    /// least the median).
    /// Each further hedge waits as long again after the one before it.
    pub fn delay(mut self, delay: HedgeDelay) -> Self {
        self.delay = Some(delay);
        self
    }

    /// The latencies a window must hold before a learnt delay is taken from it (default 100):
    /// until the first window has them, no call is hedged.
    pub fn min_samples(mut self, n: u32) -> Self {
        self.min_samples = n;
        self
    }

    /// How long a learning window lasts (default 10 s): the delay in force is learnt from the
    /// last full window.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The most hedges sent, as a share of calls (default 0.05: at most about 5 % more
    /// requests, Finagle's `maxExtraLoad`), counted over the last 10 s with no floor: a
    /// layer starts with nothing to spend and earns a hedge every `1 / share` calls.
    pub fn max_extra_load(mut self, share: f64) -> Self {
        self.max_extra_load = share;
        self
    }

    /// A retry budget the hedges spend from as well (see [`RetryLayer::budget`](crate::RetryLayer::budget)):
    /// a hedge is sent only when both its own share and that budget allow it. The retry layer
    /// that owns the budget counts the requests; this layer does not deposit into it.
    pub fn retry_budget(mut self, budget: Option<Arc<Budget>>) -> Self {
        self.retry_budget = budget;
        self
    }

    /// Hedge requests whose method is not idempotent (off: only with an `Idempotency-Key`).
    /// A hedge sends the request twice by design: opt in only when the upstream is safe to
    /// call twice (gRPC services whose methods you know are idempotent, as A6's hedging policy
    /// assumes of a service it is configured for).
    pub fn hedge_non_idempotent(mut self, on: bool) -> Self {
        self.non_idempotent = on;
        self
    }

    /// The longest server hint honoured before the next hedge (default 300 s); a longer one
    /// ends hedging for the call.
    pub fn max_server_delay(mut self, d: Duration) -> Self {
        self.max_hint = d;
        self
    }

    /// The most request-body bytes recorded so a hedge can send the body too (default
    /// 64 KiB). A body known to be larger (its size says so, or an attempt read past the cap)
    /// is not hedged. A body of unknown size that no attempt has read yet may be: whichever
    /// attempt reads it first sends it whole, and one left behind fails with
    /// [`ReplayLost`](crate::error::ReplayLost) rather than send it cut (that outcome never
    /// replaces the upstream's answer).
    pub fn replay_cap(mut self, bytes: usize) -> Self {
        self.replay_cap = bytes;
        self
    }

    /// The header every hedge carries with its attempt number (default `x-retry-attempt`);
    /// `None` writes none. gRPC hedges carry `grpc-previous-rpc-attempts` either way (A6).
    pub fn attempt_header(mut self, name: Option<http::HeaderName>) -> Self {
        self.attempt_header = name;
        self
    }

    /// The wall clock a `Retry-After` HTTP date is compared with (default `SystemTime::now`).
    pub fn wall_clock(mut self, now: fn() -> SystemTime) -> Self {
        self.wall_clock = now;
        self
    }

    /// Names the layer in its events and metrics (the `hedge` label; default `"default"`).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Replaces what counts as an answer worth waiting past: an outcome the classifier calls
    /// retryable sends the next hedge at once (A6's non-fatal codes); any other answer wins.
    pub fn classifier<C2>(self, classifier: C2) -> HedgeBuilder<C2> {
        HedgeBuilder {
            max_attempts: self.max_attempts,
            delay: self.delay,
            min_samples: self.min_samples,
            window: self.window,
            classifier,
            replay_cap: self.replay_cap,
            non_idempotent: self.non_idempotent,
            max_extra_load: self.max_extra_load,
            retry_budget: self.retry_budget,
            max_hint: self.max_hint,
            name: self.name,
            attempt_header: self.attempt_header,
            wall_clock: self.wall_clock,
        }
    }

    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// [`InvalidHedgeConfig`] for zero or more than 5 attempts, a percentile outside
    /// (0, 1], a share of extra load outside (0, 1], zero `min_samples`, a window under
    /// 10 ms, an empty name or an attempt header another party owns.
    pub fn build(self) -> Result<HedgeLayer<C>, InvalidHedgeConfig> {
        if self.max_attempts == 0 || self.max_attempts > crate::policy::GRPC_MAX_ATTEMPTS {
            return Err(InvalidHedgeConfig::Attempts);
        }
        if !(self.max_extra_load > 0.0 && self.max_extra_load <= 1.0) {
            return Err(InvalidHedgeConfig::ExtraLoad);
        }
        if self.name.is_empty() {
            return Err(InvalidHedgeConfig::EmptyName);
        }
        if let Some(name) = crate::header::taken(self.attempt_header.as_ref()) {
            return Err(InvalidHedgeConfig::ReservedHeader(name.clone()));
        }
        let delay = match self
            .delay
            .unwrap_or(HedgeDelay::Percentile((1.0 - self.max_extra_load).max(0.5)))
        {
            HedgeDelay::Fixed(d) => Delay::Fixed(d),
            HedgeDelay::Percentile(p) => {
                if !(p > 0.0 && p <= 1.0) {
                    return Err(InvalidHedgeConfig::Percentile);
                }
                if self.min_samples == 0 {
                    return Err(InvalidHedgeConfig::MinSamples);
                }
                if self.window < crate::budget::TICK {
                    return Err(InvalidHedgeConfig::Window);
                }
                Delay::Learnt(Box::new(Learnt::new(p, self.min_samples, self.window)))
            }
        };
        Ok(HedgeLayer {
            config: Arc::new(Config {
                max_attempts: self.max_attempts,
                delay,
                classifier: self.classifier,
                replay_cap: self.replay_cap,
                non_idempotent: self.non_idempotent,
                extra: Budget::new(BudgetConfig {
                    ratio: self.max_extra_load,
                    min_per_sec: 0,
                    window: Duration::from_secs(10),
                }),
                retry_budget: self.retry_budget,
                max_hint: self.max_hint,
                name: self.name,
                attempt_header: self.attempt_header,
                wall_clock: self.wall_clock,
            }),
        })
    }
}

/// Hedged requests: when a call is slow, a second attempt races it and the first acceptable
/// answer wins.
///
/// Wraps a service of `Request<ReplayBody<B>>` (the body recorded so a hedge can send it too)
/// and exposes a service of `Request<B>`, as [`RetryLayer`](crate::RetryLayer) does.
///
/// For a call that may be sent twice (an idempotent method, an `Idempotency-Key`, or
/// [`hedge_non_idempotent`](HedgeBuilder::hedge_non_idempotent)), once its attempt has taken
/// longer than the delay, the next attempt is sent while it runs (at most `max_attempts` in
/// all, each a delay after the one before). The first answer that is not retryable wins and the
/// other attempts are dropped (cancelled). A retryable answer (a 503, a reset, gRPC
/// UNAVAILABLE) is not returned while another attempt runs: it sends the next hedge at once,
/// as gRPC A6 has a non-fatal status do, or after the server's `Retry-After` /
/// `grpc-retry-pushback-ms`; if every attempt answers so, the caller gets the last answer.
///
/// A hedge is sent only when:
/// - a delay is known (a fixed one, or a learnt one with its samples): until then no call is
///   hedged, not even after a retryable answer (an attempt an endpoint refused before sending
///   anything, a balancer's `Rerouted`, is still sent to another at once: it adds no load);
/// - the share of extra load allows it (`max_extra_load`, and a shared retry budget if
///   given); a hedge that is refused ends hedging for the call, as a server's stop or an
///   over-long hint does, whatever answers come later;
/// - the call's deadline has not passed (a hedge whose time would come at or after the
///   deadline is never sent, and a call waiting for a hedge's service to be ready gives up at
///   the deadline with the answer it has). The deadline is the one the layer knows: a
///   [`Deadline`](steadfast_core::Deadline) request extension, or the ambient one (a server's,
///   or a total timeout's above it built with `share_own(true)` or `propagate_own(true)`);
/// - the body could be recorded (within the replay cap);
/// - no layer below refused the call by policy (an open breaker): that refusal is returned
///   as it is.
///
/// A learnt delay is a percentile of the latencies of the attempts of calls that may be
/// hedged, from the call's send to its answer; an attempt dropped because another won counts
/// with the time it had run. Until a window holds `min_samples` of them, calls are not hedged.
///
/// Under a [`BalanceLayer`](https://docs.rs/steadfast-balance), each hedge goes to an endpoint
/// the call's other attempts did not use, when one is in service.
///
/// When every attempt gives a retryable answer, the caller gets the last answer the upstream
/// gave; an outcome made in this process (a layer below refused the attempt, or it lost its
/// body) is returned only when the upstream gave none.
///
/// Hedges and retries: gRPC A6 gives a call one or the other. This layer alone hedges and
/// sends the next hedge on a retryable answer. Stacked under a retry layer, each of the retry
/// layer's attempts is hedged; give the hedge that layer's budget
/// ([`retry_budget`](HedgeBuilder::retry_budget)) so both spend from one pool. The attempt
/// headers (`x-retry-attempt`, gRPC's `grpc-previous-rpc-attempts`) of a hedge count on from
/// what its request arrived with, so within one retry attempt they rise; across the two
/// layers they are not a single count (the retry layer does not see its attempts' hedges).
///
/// # Clone
///
/// The learnt delay, the extra-load share and the configuration are shared by every service
/// this layer value makes.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use steadfast_retry::{HedgeDelay, HedgeLayer, ReplayBody};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
/// let seen = calls.clone();
/// // The first attempt hangs for a second; the hedge answers in 5 ms.
/// let upstream = service_fn(move |_req: http::Request<ReplayBody<String>>| {
///     let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
///     async move {
///         let took = if n == 0 { 1000 } else { 5 };
///         tokio::time::sleep(Duration::from_millis(took)).await;
///         Ok::<_, std::convert::Infallible>(http::Response::new(n))
///     }
/// });
/// let layer = HedgeLayer::builder()
///     .delay(HedgeDelay::Fixed(Duration::from_millis(20)))
///     .max_extra_load(1.0)
///     .build()
///     .unwrap();
/// let svc = ServiceBuilder::new().layer(layer).service(upstream);
/// # // The extra-load share starts empty: one call earns it.
/// # svc.clone().oneshot(http::Request::new(String::new())).await.unwrap();
/// # calls.store(0, std::sync::atomic::Ordering::SeqCst);
/// let started = tokio::time::Instant::now();
/// let res = svc.oneshot(http::Request::new(String::from("body"))).await.unwrap();
/// assert_eq!(*res.body(), 1); // the hedge's answer
/// assert_eq!(started.elapsed(), Duration::from_millis(25));
/// # }
/// ```
pub struct HedgeLayer<C = DefaultClassifier> {
    pub(crate) config: Arc<Config<C>>,
}

impl<C> Clone for HedgeLayer<C> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
        }
    }
}

impl<C> fmt::Debug for HedgeLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeLayer")
            .field("name", &self.config.name)
            .field("max_attempts", &self.config.max_attempts)
            .field("delay", &self.config.delay.get())
            .finish_non_exhaustive()
    }
}

impl Default for HedgeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl HedgeLayer {
    /// A layer with the defaults (see [`HedgeBuilder`]).
    pub fn new() -> Self {
        HedgeBuilder::default()
            .build()
            .expect("the defaults are valid")
    }

    /// A builder with the defaults.
    pub fn builder() -> HedgeBuilder {
        HedgeBuilder::default()
    }
}

impl<C> HedgeLayer<C> {
    /// The delay a call would be hedged after now (`None` while a learnt delay has too few
    /// samples).
    ///
    /// ```
    /// use std::time::Duration;
    /// use steadfast_retry::{HedgeDelay, HedgeLayer};
    ///
    /// let fixed = HedgeLayer::builder().delay(HedgeDelay::Fixed(Duration::from_millis(50))).build().unwrap();
    /// assert_eq!(fixed.current_delay(), Some(Duration::from_millis(50)));
    /// assert_eq!(HedgeLayer::new().current_delay(), None); // nothing learnt yet
    /// ```
    pub fn current_delay(&self) -> Option<Duration> {
        self.config.delay.get()
    }

    /// The layer's name (see [`HedgeBuilder::name`]).
    pub fn name(&self) -> &str {
        &self.config.name
    }
}

impl<S, C> Layer<S> for HedgeLayer<C> {
    type Service = Hedge<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Hedge::new(inner, self.config.clone())
    }
}
