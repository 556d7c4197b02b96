use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use std::time::SystemTime;

use http::request::Parts;
use steadfast_core::{Class, DefaultClassifier};
use tower_layer::Layer;

use crate::backoff::Backoff;
use crate::budget::{Budget, BudgetConfig};
use crate::error::InvalidRetryConfig;
use crate::replay::DEFAULT_REPLAY_CAP;
use crate::service::Retry;
use crate::throttle::ThrottleConfig;

/// A caller's say on one outcome, in place of the method and status rules (a trait like
/// [`Classify`](steadfast_core::Classify), so a policy can be a type of its own; any
/// `Fn(&Parts, &Class) -> Option<bool>` is one).
///
/// - `Some(true)`: retry, whatever the method, an outcome that is a failure or retryable
///   (a 500, a POST's 503, a reset), if attempts, budget, body and deadline allow. A success
///   or the caller's own error (2xx, 3xx, 4xx other than 429) is never repeated, so "POSTs
///   are safe to retry here" cannot send a created order twice.
/// - `Some(false)`: never retry (reported as `reason = "predicate"`).
/// - `None`: the default rules.
///
/// It is asked only about outcomes that are failures or retryable: a success or the caller's
/// own error is final without asking it (its answer could not change that). An answer the
/// upstream marked as shed is judged by its status here too: read
/// [`Class::is_failed_attempt`](steadfast_core::Class::is_failed_attempt) for "the attempt
/// failed" (a shed `500` is one), [`Class::is_failure`](steadfast_core::Class::is_failure) for
/// "the upstream's health suffers" (a shed answer never does), and
/// [`Class::is_overload`](steadfast_core::Class::is_overload) to treat shed answers apart (as
/// Envoy does, which never retries them).
///
/// ```
/// use steadfast_retry::RetryLayer;
///
/// use http::request::Parts;
/// use steadfast_core::Class;
/// use steadfast_retry::RetryPredicate;
///
/// // Never retry calls to /payments, whatever the method.
/// let layer = RetryLayer::builder()
///     .predicate(|req, _| req.uri.path().starts_with("/payments").then_some(false))
///     .build()
///     .unwrap();
/// # let _ = layer;
///
/// // The same rule as a type, for a policy that carries state.
/// struct NoRetryUnder(&'static str);
/// impl RetryPredicate for NoRetryUnder {
///     fn retry(&self, req: &Parts, _: &Class) -> Option<bool> {
///         req.uri.path().starts_with(self.0).then_some(false)
///     }
/// }
/// let layer = RetryLayer::builder().retry_predicate(NoRetryUnder("/payments")).build().unwrap();
/// # let _ = layer;
/// ```
pub trait RetryPredicate: Send + Sync + 'static {
    /// Whether to retry `request` after an outcome classified as `class`.
    fn retry(&self, request: &Parts, class: &Class) -> Option<bool>;
}

impl<F> RetryPredicate for F
where
    F: Fn(&Parts, &Class) -> Option<bool> + Send + Sync + 'static,
{
    fn retry(&self, request: &Parts, class: &Class) -> Option<bool> {
        self(request, class)
    }
}

pub(crate) struct Config<C> {
    pub(crate) max_attempts: u32,
    pub(crate) classifier: C,
    pub(crate) backoff: Backoff,
    pub(crate) max_hint: Duration,
    pub(crate) replay_cap: usize,
    pub(crate) retry_non_idempotent: bool,
    pub(crate) grpc_statuses: bool,
    pub(crate) predicate: Option<Box<dyn RetryPredicate>>,
    pub(crate) budget: Option<Arc<Budget>>,
    pub(crate) seed: u64,
    pub(crate) streams: AtomicU64,
    /// Labels the layer's events and metrics.
    pub(crate) name: Arc<str>,
    /// Written on every retry with the attempt's number (`None`: not written).
    pub(crate) attempt_header: Option<http::HeaderName>,
    /// The wall clock `Retry-After` dates are read against.
    pub(crate) wall_clock: fn() -> SystemTime,
    /// gRPC A6's retry throttling, when configured.
    pub(crate) throttle: Option<crate::throttle::Throttle>,
}

impl<C: fmt::Debug> fmt::Debug for Config<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryConfig")
            .field("max_attempts", &self.max_attempts)
            .field("classifier", &self.classifier)
            .field("backoff", &self.backoff)
            .field("max_hint", &self.max_hint)
            .field("replay_cap", &self.replay_cap)
            .field("retry_non_idempotent", &self.retry_non_idempotent)
            .field("grpc_statuses", &self.grpc_statuses)
            .field("predicate", &self.predicate.is_some())
            .field("budget", &self.budget)
            .finish()
    }
}

/// Configures a [`RetryLayer`].
///
/// Defaults — the seed's client, bounded as Envoy, gRPC and Finagle bound it:
///
/// | setting | default |
/// |---|---|
/// | attempts | 3 in total |
/// | retried outcomes | HTTP 429, 502, 503, 504; transport errors; gRPC UNAVAILABLE (from [`DefaultClassifier`]) |
/// | methods | idempotent ones (GET HEAD OPTIONS TRACE PUT DELETE) or a request with `Idempotency-Key`; any request that certainly was not sent |
/// | backoff | exponential from 100 ms, capped at 10 s, full jitter |
/// | server hints | `Retry-After` and `grpc-retry-pushback-ms`, up to 300 s; longer means no retry |
/// | budget | on: retries ≤ 10 % of recent requests + 10/s ([`BudgetConfig`]) |
/// | replay | bodies up to 64 KiB |
#[must_use]
pub struct RetryBuilder<C = DefaultClassifier> {
    max_attempts: u32,
    classifier: C,
    backoff: Backoff,
    max_hint: Duration,
    replay_cap: usize,
    retry_non_idempotent: bool,
    grpc_statuses: bool,
    predicate: Option<Box<dyn RetryPredicate>>,
    budget: Option<BudgetConfig>,
    seed: Option<u64>,
    name: Arc<str>,
    attempt_header: Option<http::HeaderName>,
    wall_clock: fn() -> SystemTime,
    throttle: Option<ThrottleConfig>,
}

impl<C: fmt::Debug> fmt::Debug for RetryBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBuilder")
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl Default for RetryBuilder {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            classifier: DefaultClassifier::new(),
            backoff: Backoff::default(),
            max_hint: Duration::from_secs(300),
            replay_cap: DEFAULT_REPLAY_CAP,
            retry_non_idempotent: false,
            grpc_statuses: false,
            predicate: None,
            budget: Some(BudgetConfig::default()),
            seed: None,
            name: Arc::from("default"),
            attempt_header: Some(crate::header::ATTEMPT_HEADER),
            wall_clock: SystemTime::now,
            throttle: None,
        }
    }
}

impl<C> RetryBuilder<C> {
    /// The longest the backoff waits between attempts can add up to (every retry at its
    /// largest delay, before jitter; server hints not included): what a total timeout around
    /// this layer must leave room for.
    pub fn worst_case_backoff(&self) -> Duration {
        self.backoff
            .worst_case_total(self.max_attempts.saturating_sub(1))
    }

    /// Attempts in total, the first included (1 = no retry; 0 is an error at build time).
    ///
    /// An attempt that an endpoint refused before it left this process (a balancer below
    /// whose endpoint's breaker is open: `Rerouted`, whose source is `NotSent`) is sent again
    /// at once to another endpoint and does not count: it took no attempt from an upstream.
    /// A call is rerouted 64 times at most (a balancer takes an endpoint that refused out of
    /// service for its failure penalty, so a call meets each refusing endpoint once). Each
    /// attempt, rerouted or retried, avoids the endpoints this call's earlier attempts went to
    /// while another is in service.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The backoff between attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The longest server hint (`Retry-After`, pushback) honoured; a longer one means the
    /// caller gets the last outcome now (default 300 s).
    pub fn max_server_delay(mut self, d: Duration) -> Self {
        self.max_hint = d;
        self
    }

    /// The most request-body bytes buffered for replay (default 64 KiB); a larger body is
    /// sent once, unless the attempt that held it was refused before it read anything (a
    /// breaker's refusal, a refused connection): then the next attempt takes it over whole.
    /// A body still being streamed is judged by what was read of it when the retry is
    /// decided; from then on the answered attempt reads no more of it (its stream is reset),
    /// and the retry reads on from where it stopped.
    pub fn replay_cap(mut self, bytes: usize) -> Self {
        self.replay_cap = bytes;
        self
    }

    /// Retry requests that may already have reached the server even when their method is not
    /// idempotent (off: only with an `Idempotency-Key`). Opt in only when the upstream
    /// deduplicates.
    pub fn retry_non_idempotent(mut self, on: bool) -> Self {
        self.retry_non_idempotent = on;
        self
    }

    /// Retry a gRPC call whose server answered, in the response head (trailers-only), with a
    /// gRPC status the classifier calls retryable (UNAVAILABLE by default), whatever its
    /// method (off by default; on in the gRPC client preset). An HTTP status without a
    /// `grpc-status` (say a proxy's 503 or 504) is not covered.
    ///
    /// Every unary gRPC call is a `POST`, so the idempotency rule alone would never retry
    /// one. gRPC's retry design (A6) leaves the choice of retryable status codes to the
    /// owner of the retry policy, who knows the service: a server that answers UNAVAILABLE
    /// has, by gRPC's definition of that code, not done the work. Only an answered status is
    /// covered; a transport error after the request may have been sent still needs an
    /// idempotent method or an `Idempotency-Key`, and a streamed response stays committed.
    pub fn retry_grpc_statuses(mut self, on: bool) -> Self {
        self.grpc_statuses = on;
        self
    }

    /// A custom say on request and outcome, as a closure; see [`RetryPredicate`].
    pub fn predicate(
        self,
        f: impl Fn(&Parts, &Class) -> Option<bool> + Send + Sync + 'static,
    ) -> Self {
        self.retry_predicate(f)
    }

    /// A custom say on request and outcome, as a type of its own; see [`RetryPredicate`].
    pub fn retry_predicate(mut self, predicate: impl RetryPredicate) -> Self {
        self.predicate = Some(Box::new(predicate));
        self
    }

    /// The retry budget (`None` turns it off — not recommended: retries then multiply load
    /// exactly when the upstream is failing).
    pub fn budget(mut self, budget: Option<BudgetConfig>) -> Self {
        self.budget = budget;
        self
    }

    /// Seeds the jitter: each request then draws from its own stream derived from `seed`.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Replaces what counts as retryable.
    pub fn classifier<C2>(self, classifier: C2) -> RetryBuilder<C2> {
        RetryBuilder {
            max_attempts: self.max_attempts,
            classifier,
            backoff: self.backoff,
            max_hint: self.max_hint,
            replay_cap: self.replay_cap,
            retry_non_idempotent: self.retry_non_idempotent,
            grpc_statuses: self.grpc_statuses,
            predicate: self.predicate,
            budget: self.budget,
            seed: self.seed,
            name: self.name,
            attempt_header: self.attempt_header,
            wall_clock: self.wall_clock,
            throttle: self.throttle,
        }
    }

    /// The wall clock a `Retry-After` HTTP date is compared with (default
    /// `SystemTime::now`): tests and simulations that pause tokio's clock give one that
    /// follows it.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    ///
    /// fn frozen() -> SystemTime {
    ///     SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    /// }
    /// let layer = steadfast_retry::RetryLayer::builder().wall_clock(frozen).build().unwrap();
    /// # let _ = layer;
    /// ```
    pub fn wall_clock(mut self, now: fn() -> SystemTime) -> Self {
        self.wall_clock = now;
        self
    }

    /// gRPC A6's retry throttling, in addition to the budget (or instead of it, with
    /// `budget(None)`): a token bucket per layer that every failed attempt drains by one
    /// and every success refills by `token_ratio`, capped at `max_tokens`; retries (and
    /// hedges) are allowed only while more than half the tokens are left. `None` (default)
    /// turns it off.
    ///
    /// ```
    /// use steadfast_retry::{RetryLayer, ThrottleConfig};
    ///
    /// // A6's example: maxTokens 10, tokenRatio 0.1.
    /// let layer = RetryLayer::builder()
    ///     .grpc_throttling(Some(ThrottleConfig { max_tokens: 10, token_ratio: 0.1 }))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(layer.throttle_tokens(), Some(10.0));
    /// ```
    pub fn grpc_throttling(mut self, throttle: Option<ThrottleConfig>) -> Self {
        self.throttle = throttle;
        self
    }

    /// The header every retry carries with its attempt number (default `x-retry-attempt`,
    /// so an upstream can tell a retry from a first attempt); `None` writes none. gRPC's
    /// `grpc-previous-rpc-attempts` is written on gRPC retries either way, as A6 requires.
    ///
    /// ```
    /// let quiet = steadfast_retry::RetryLayer::builder().attempt_header(None).build().unwrap();
    /// # let _ = quiet;
    /// // A header another party owns is refused.
    /// let bad = steadfast_retry::RetryLayer::builder()
    ///     .attempt_header(Some(http::header::CONTENT_LENGTH))
    ///     .build();
    /// assert!(bad.unwrap_err().to_string().contains("content-length"));
    /// ```
    pub fn attempt_header(mut self, name: Option<http::HeaderName>) -> Self {
        self.attempt_header = name;
        self
    }

    /// Names the layer in its events and metrics (the `retry` label; default `"default"`),
    /// so two stacks in one process tell their retries apart.
    ///
    /// ```
    /// let layer = steadfast_retry::RetryLayer::builder().name("checkout").build().unwrap();
    /// assert_eq!(layer.name(), "checkout");
    /// ```
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Builds the layer (and its shared budget).
    ///
    /// # Errors
    ///
    /// [`InvalidRetryConfig`] for zero attempts, a backoff cap below its base, or a budget
    /// that is out of range or could never pay for a retry.
    pub fn build(self) -> Result<RetryLayer<C>, InvalidRetryConfig> {
        if self.max_attempts == 0 {
            return Err(InvalidRetryConfig::ZeroAttempts);
        }
        if self.name.is_empty() {
            return Err(InvalidRetryConfig::EmptyName);
        }
        if let Some(t) = &self.throttle {
            // A6: maxTokens in (0, 1000], tokenRatio > 0 (kept to three decimals).
            if t.max_tokens == 0 || t.max_tokens > 1000 {
                return Err(InvalidRetryConfig::Throttle("max_tokens must be 1-1000"));
            }
            if !(t.token_ratio.is_finite() && t.token_ratio >= 0.001) {
                return Err(InvalidRetryConfig::Throttle(
                    "token_ratio must be a finite number of at least 0.001",
                ));
            }
        }
        if let Some(name) = crate::header::taken(self.attempt_header.as_ref()) {
            return Err(InvalidRetryConfig::ReservedHeader(name.clone()));
        }
        if self.backoff.cap() < self.backoff.base() {
            return Err(InvalidRetryConfig::BackoffCapBelowBase);
        }
        if let Some(b) = &self.budget {
            if !(0.0..=1000.0).contains(&b.ratio) {
                return Err(InvalidRetryConfig::BudgetRatio);
            }
            if b.ratio == 0.0 && b.min_per_sec == 0 {
                return Err(InvalidRetryConfig::BudgetNeverPays);
            }
            if b.window < crate::budget::TICK {
                return Err(InvalidRetryConfig::BudgetWindow);
            }
        }
        let seed = self
            .seed
            .unwrap_or_else(|| steadfast_core::__private::rand::random_seed(1));
        Ok(RetryLayer {
            config: Arc::new(Config {
                max_attempts: self.max_attempts,
                classifier: self.classifier,
                backoff: self.backoff,
                max_hint: self.max_hint,
                replay_cap: self.replay_cap,
                retry_non_idempotent: self.retry_non_idempotent,
                grpc_statuses: self.grpc_statuses,
                predicate: self.predicate,
                budget: self.budget.map(|b| Arc::new(Budget::new(b))),
                seed,
                streams: AtomicU64::new(0),
                name: self.name,
                attempt_header: self.attempt_header,
                wall_clock: self.wall_clock,
                throttle: self.throttle.map(crate::throttle::Throttle::new),
            }),
        })
    }
}

/// Retries failed calls: safe by default, budgeted, hint-aware, with replayable bodies.
///
/// Wraps a service of `Request<ReplayBody<B>>` (the request body wrapped so it can be sent
/// again) and exposes a service of `Request<B>`.
///
/// Per attempt: the inner service's readiness is polled again (until the call's deadline, if
/// it has one: then the call ends with [`NotReadyByDeadline`](crate::error::NotReadyByDeadline),
/// a timeout, the retry unsent); the outcome is classified
/// ([`DefaultClassifier`]); a rejection by a local policy (an open breaker) is returned at once
/// and costs no budget. A retry needs: attempts left, a retryable outcome, a request that is
/// safe to repeat (idempotent method, `Idempotency-Key`, or certainly not sent), a replayable
/// body, a budget token, and a wait (backoff or server hint) that ends before the deadline.
/// Otherwise the caller gets the last real outcome. Attempts after the first carry
/// `x-retry-attempt` (and `grpc-previous-rpc-attempts` for gRPC).
///
/// # Clone
///
/// The budget and configuration are shared by every service this layer value makes.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use steadfast_retry::{ReplayBody, RetryLayer};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let calls = Arc::new(AtomicUsize::new(0));
/// let c = calls.clone();
/// // 503, 503, then 200.
/// let upstream = service_fn(move |_req: http::Request<ReplayBody<String>>| {
///     let n = c.fetch_add(1, Ordering::SeqCst);
///     async move {
///         let status = if n < 2 { 503 } else { 200 };
///         Ok::<_, std::convert::Infallible>(http::Response::builder().status(status).body(()).unwrap())
///     }
/// });
/// let svc = ServiceBuilder::new().layer(RetryLayer::new()).service(upstream);
/// let res = svc.oneshot(http::Request::new(String::from("not Clone-dependent"))).await.unwrap();
/// assert_eq!(res.status(), 200);
/// assert_eq!(calls.load(Ordering::SeqCst), 3);
/// # }
/// ```
pub struct RetryLayer<C = DefaultClassifier> {
    pub(crate) config: Arc<Config<C>>,
}

impl<C> Clone for RetryLayer<C> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for RetryLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("config", &self.config)
            .finish()
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryLayer {
    /// A layer with the defaults (see [`RetryBuilder`]).
    pub fn new() -> Self {
        RetryBuilder::default()
            .build()
            .expect("the defaults are valid")
    }

    /// A builder with the defaults.
    pub fn builder() -> RetryBuilder {
        RetryBuilder::default()
    }
}

impl<C> RetryLayer<C> {
    /// The header every retry carries with its attempt number, if any.
    pub fn attempt_header(&self) -> Option<&http::HeaderName> {
        self.config.attempt_header.as_ref()
    }

    /// The layer's name (see [`RetryBuilder::name`]).
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Tokens left in the gRPC retry throttle (`None` when it is off).
    pub fn throttle_tokens(&self) -> Option<f64> {
        self.config
            .throttle
            .as_ref()
            .map(crate::throttle::Throttle::tokens)
    }

    /// Tokens left in the shared budget (`None` when the budget is off).
    pub fn budget_balance(&self) -> Option<f64> {
        self.config.budget.as_deref().map(Budget::balance)
    }

    /// The layer's budget (`None` when it is off), to share with a
    /// [`HedgeLayer`](crate::HedgeLayer): its hedges then spend the tokens this layer's
    /// requests deposit, as its retries do.
    ///
    /// ```
    /// use steadfast_retry::{HedgeLayer, RetryLayer};
    ///
    /// let retry = RetryLayer::new();
    /// let hedge = HedgeLayer::builder().retry_budget(retry.budget()).build().unwrap();
    /// # let _ = hedge;
    /// ```
    pub fn budget(&self) -> Option<Arc<Budget>> {
        self.config.budget.clone()
    }
}

impl<S, C> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(inner, self.config.clone())
    }
}
