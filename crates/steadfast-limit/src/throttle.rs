//! Client-side adaptive throttling (the SRE book, "Handling Overload"): a client that sees its
//! upstream refuse more and more of its calls refuses a share of them itself, so an overloaded
//! upstream sees its load fall before it recovers, instead of spending its capacity on
//! refusals.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use steadfast_core::__private::rand;
use steadfast_core::BoxError;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{InvalidLimitConfig, Throttled};
use crate::future::overload_status;

/// Buckets the window is cut into: it slides by a twentieth of its length.
const BUCKETS: u64 = 20;

/// Client-side adaptive throttling; see [`ThrottleBuilder`] for the rule and its settings.
///
/// Every service this layer makes shares one window of counts.
///
/// ```
/// use steadfast_limit::ThrottleLayer;
///
/// let throttle = ThrottleLayer::new();
/// assert_eq!(throttle.rejection_probability(), 0.0); // nothing refused yet
/// ```
#[derive(Clone)]
pub struct ThrottleLayer {
    shared: Arc<Window>,
}

impl fmt::Debug for ThrottleLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (requests, accepts) = self.shared.totals();
        f.debug_struct("ThrottleLayer")
            .field("requests", &requests)
            .field("accepts", &accepts)
            .finish_non_exhaustive()
    }
}

impl Default for ThrottleLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ThrottleLayer {
    /// The SRE book's defaults: K = 2 over a 2-minute window, with at most 80 % of calls
    /// refused locally (Envoy's admission control caps it the same way) and no refusal before
    /// the window holds 10 requests.
    pub fn new() -> Self {
        ThrottleBuilder::default()
            .build()
            .expect("the defaults are valid")
    }

    /// Every setting.
    pub fn builder() -> ThrottleBuilder {
        ThrottleBuilder::default()
    }

    /// The probability that the next call is refused locally, from the window's counts now.
    pub fn rejection_probability(&self) -> f64 {
        self.shared.advance(self.shared.epoch(Instant::now()));
        self.shared.probability()
    }

    /// The window's counts: requests (refused locally or not) and accepts.
    pub fn counts(&self) -> (u64, u64) {
        self.shared.advance(self.shared.epoch(Instant::now()));
        let (r, a) = self.shared.totals();
        (u64::from(r), u64::from(a))
    }
}

impl<S> Layer<S> for ThrottleLayer {
    type Service = Throttle<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Throttle {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The settings of a [`ThrottleLayer`].
///
/// The rule (the SRE book's): over the window, `requests` counts the calls made through the
/// layer (refused locally or not) and `accepts` the calls the upstream accepted, that is
/// answered without signalling overload (anything but `429`, `503`, `504`, a gRPC
/// `RESOURCE_EXHAUSTED`, `UNAVAILABLE` or `DEADLINE_EXCEEDED` in the head, or an error). A call
/// that a layer below refused ([`PolicyRejected`](steadfast_core::PolicyRejected): an open
/// breaker, a full limit) or that was dropped before its answer counts nowhere. A call is
/// refused locally
/// with probability `max(0, (requests − K × accepts) / (requests + 1))`, at most
/// `max_rejection`, and never while the window holds fewer than `min_requests`.
///
/// ```
/// use std::time::Duration;
/// use steadfast_limit::ThrottleLayer;
///
/// let throttle = ThrottleLayer::builder()
///     .k(1.5)
///     .window(Duration::from_secs(60))
///     .max_rejection(0.9)
///     .seed(7)
///     .build()?;
/// # drop(throttle);
/// # Ok::<_, steadfast_limit::error::InvalidLimitConfig>(())
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct ThrottleBuilder {
    k: f64,
    window: Duration,
    max_rejection: f64,
    min_requests: u32,
    seed: Option<u64>,
}

impl Default for ThrottleBuilder {
    fn default() -> Self {
        Self {
            k: 2.0,
            window: Duration::from_secs(120),
            max_rejection: 0.8,
            min_requests: 10,
            seed: None,
        }
    }
}

impl ThrottleBuilder {
    /// K, the multiplier of accepts (≥ 1; the SRE book suggests 2: lower throttles sooner,
    /// higher lets more calls through to an upstream that refuses them).
    pub fn k(mut self, k: f64) -> Self {
        self.k = k;
        self
    }

    /// How far back the counts reach (at least 1 s).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The highest share of calls refused locally, in [0, 1] (1: the formula uncapped).
    pub fn max_rejection(mut self, max: f64) -> Self {
        self.max_rejection = max;
        self
    }

    /// Requests the window must hold before any call is refused.
    pub fn min_requests(mut self, n: u32) -> Self {
        self.min_requests = n;
        self
    }

    /// Seeds the random draws (each layer otherwise has a random seed).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Validates and builds the layer.
    ///
    /// # Errors
    ///
    /// [`InvalidLimitConfig::Factor`] for K below 1 or not finite, or a `max_rejection` outside
    /// [0, 1]; [`InvalidLimitConfig::Zero`] for a window under 1 s.
    pub fn build(self) -> Result<ThrottleLayer, InvalidLimitConfig> {
        if !(self.k >= 1.0 && self.k.is_finite()) {
            return Err(InvalidLimitConfig::Factor {
                name: "k",
                value: self.k,
            });
        }
        if !(0.0..=1.0).contains(&self.max_rejection) {
            return Err(InvalidLimitConfig::Factor {
                name: "max_rejection",
                value: self.max_rejection,
            });
        }
        if self.window < Duration::from_secs(1) {
            return Err(InvalidLimitConfig::Zero("window (at least 1 s)"));
        }
        let bucket = (self.window.as_nanos() / u128::from(BUCKETS)).min(u128::from(u64::MAX));
        Ok(ThrottleLayer {
            shared: Arc::new(Window {
                buckets: (0..BUCKETS)
                    .map(|_| Bucket {
                        epoch: AtomicU64::new(u64::MAX),
                        counts: AtomicU64::new(0),
                    })
                    .collect(),
                totals: AtomicU64::new(0),
                current: AtomicU64::new(0),
                bucket_nanos: (bucket as u64).max(1),
                base: Instant::now(),
                k: self.k,
                max_rejection: self.max_rejection,
                min_requests: self.min_requests,
                rng: AtomicU64::new(self.seed.unwrap_or_else(|| rand::random_seed(23))),
            }),
        })
    }
}

/// One slice of the window: requests (high half) and accepts (low half) counted in it, and
/// which slice of time it holds.
struct Bucket {
    epoch: AtomicU64,
    counts: AtomicU64,
}

/// The sliding window of counts every service of one layer shares.
struct Window {
    buckets: Box<[Bucket]>,
    /// The live buckets' counts summed (requests high, accepts low).
    totals: AtomicU64,
    /// The newest epoch any call has seen.
    current: AtomicU64,
    bucket_nanos: u64,
    base: Instant,
    k: f64,
    max_rejection: f64,
    min_requests: u32,
    rng: AtomicU64,
}

const ONE_REQUEST: u64 = 1 << 32;

impl Window {
    fn totals(&self) -> (u32, u32) {
        let t = self.totals.load(Acquire);
        ((t >> 32) as u32, t as u32)
    }

    fn epoch(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.base).as_nanos();
        (nanos / u128::from(self.bucket_nanos)).min(u128::from(u64::MAX - 1)) as u64
    }

    /// Moves the window to `epoch` if it is newer: buckets that fell out are emptied and their
    /// counts taken out of the totals. Done once per slice, by whichever call sees it first.
    fn advance(&self, epoch: u64) {
        let seen = self.current.load(Acquire);
        if epoch <= seen
            || self
                .current
                .compare_exchange(seen, epoch, AcqRel, Acquire)
                .is_err()
        {
            return;
        }
        for b in self.buckets.iter() {
            let e = b.epoch.load(Acquire);
            if e != u64::MAX
                && e.saturating_add(BUCKETS) <= epoch
                && b.epoch
                    .compare_exchange(e, u64::MAX, AcqRel, Acquire)
                    .is_ok()
            {
                let old = b.counts.swap(0, AcqRel);
                self.totals.fetch_sub(old, AcqRel);
            }
        }
    }

    /// Counts a request (and an accept) at `now`.
    fn record(&self, now: Instant, accepted: bool) {
        let epoch = self.epoch(now);
        self.advance(epoch);
        let b = &self.buckets[(epoch % BUCKETS) as usize];
        let e = b.epoch.load(Acquire);
        if e != epoch {
            // A late call whose slice already fell out of the window counts nowhere.
            if e != u64::MAX && e > epoch {
                return;
            }
            if b.epoch.compare_exchange(e, epoch, AcqRel, Acquire).is_ok() {
                let old = b.counts.swap(0, AcqRel);
                self.totals.fetch_sub(old, AcqRel);
            }
        }
        let delta = ONE_REQUEST + u64::from(accepted);
        b.counts.fetch_add(delta, AcqRel);
        self.totals.fetch_add(delta, AcqRel);
    }

    fn probability(&self) -> f64 {
        let (requests, accepts) = self.totals();
        if requests < self.min_requests {
            return 0.0;
        }
        let (r, a) = (f64::from(requests), f64::from(accepts));
        ((r - self.k * a) / (r + 1.0)).clamp(0.0, self.max_rejection)
    }

    /// Whether this call is refused locally (counted as a request either way when refused).
    fn refuses(&self, now: Instant) -> Option<f64> {
        self.advance(self.epoch(now));
        let p = self.probability();
        if p <= 0.0 {
            return None;
        }
        let draw = rand::unit(rand::next(self.rng.fetch_add(rand::STEP, Relaxed)));
        if draw >= p {
            return None;
        }
        self.record(now, false);
        Some(p)
    }
}

/// The service of [`ThrottleLayer`].
///
/// # Clone
///
/// Clones share the window of counts.
pub struct Throttle<S> {
    inner: S,
    shared: Arc<Window>,
}

impl<S: Clone> Clone for Throttle<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Throttle<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Throttle<()> {
    /// A layer with the defaults (see [`ThrottleLayer::new`]).
    pub fn layer() -> ThrottleLayer {
        ThrottleLayer::new()
    }
}

impl<S> Throttle<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResB> Service<Request<B>> for Throttle<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ThrottleFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let now = steadfast_core::Deadline::call_now().unwrap_or_else(Instant::now);
        if let Some(p) = self.shared.refuses(now) {
            tracing::debug!(target: "steadfast::limit", probability = p, "throttled locally");
            #[cfg(feature = "metrics")]
            metrics::counter!("steadfast_limit_throttled_total").increment(1);
            return ThrottleFuture {
                state: ThrottleState::Refused {
                    refusal: Some(Throttled::new(p)),
                },
            };
        }
        ThrottleFuture {
            state: ThrottleState::Called {
                fut: self.inner.call(req),
                shared: Some(self.shared.clone()),
            },
        }
    }
}

pin_project! {
    /// The response future of [`Throttle`].
    pub struct ThrottleFuture<F> {
        #[pin]
        state: ThrottleState<F>,
    }
}

pin_project! {
    #[project = ThrottleProj]
    enum ThrottleState<F> {
        Called {
            #[pin]
            fut: F,
            shared: Option<Arc<Window>>,
        },
        Refused {
            refusal: Option<Throttled>,
        },
    }
}

impl<F> fmt::Debug for ThrottleFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottleFuture").finish_non_exhaustive()
    }
}

impl<F, ResB, E> Future for ThrottleFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            ThrottleProj::Refused { refusal } => Poll::Ready(Err(Box::new(
                refusal.take().expect("polled after completion"),
            ))),
            ThrottleProj::Called { fut, shared } => {
                let out = ready!(fut.poll(cx)).map_err(Into::into);
                let shared = shared.take().expect("polled after completion");
                let accepted = match &out {
                    Ok(res) => Some(!overload_status(res.status(), res.headers())),
                    // A layer below refused it (an open breaker, a full limit): the upstream
                    // never saw it, so it is neither a request nor a refusal of the upstream's.
                    Err(e) if steadfast_core::PolicyRejected::is_in(&**e) => None,
                    Err(_) => Some(false),
                };
                if let Some(accepted) = accepted {
                    shared.record(Instant::now(), accepted);
                }
                Poll::Ready(out)
            }
        }
    }
}
