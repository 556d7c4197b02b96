//! The standard client stack.
//!
//! ```text
//! PropagateCorrelationId   the ambient id (or a new one) on every outgoing request
//!   Timeout (total)     10 s, or less if the inbound deadline says so; propagated downstream;
//!                       covers the response body too (opt out for long-lived streams)
//!     Retry             3 attempts, 429/502/503/504 + connect errors + UNAVAILABLE, budgeted
//!       CircuitBreaker  one per upstream authority: 5 consecutive failures, open 30 s
//!         Timeout       5 s per attempt (the seed's client timeout)
//!           transport   hyper-util client, or a tonic Channel (gRPC preset)
//! ```
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use steadfast::retry::ReplayBody;
//! use tower::Layer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let transport: Client<_, ReplayBody<Full<Bytes>>> =
//!     Client::builder(TokioExecutor::new()).build_http();
//! let stack = steadfast::client::http().build().unwrap();
//! let client = stack.layer(transport); // a tower Service<http::Request<Full<Bytes>>>
//! # let _ = client;
//! # }
//! ```

use std::time::Duration;

use http::uri::Authority;
use steadfast_balance::{Balance, BalanceBuilder, BalanceLayer};
use steadfast_breaker::{
    ByAuthority, CircuitBreakerBuilder, CircuitBreakerLayer, KeyedCircuitBreaker,
    KeyedCircuitBreakerLayer,
};
use steadfast_core::DefaultClassifier;
use steadfast_correlation::{
    DefaultRule, PropagateCorrelationId, PropagateCorrelationIdLayer, UuidV7,
};
use steadfast_retry::{Retry, RetryBuilder, RetryLayer};
use steadfast_timeout::{BodyTimeout, BodyTimeoutLayer, Timeout, TimeoutLayer};
use tower_layer::Layer;

use crate::preset::InvalidPresetConfig;

/// The seed's client timeout, per attempt.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole call, retries included.
pub const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the standard HTTP client stack with its defaults.
pub fn http() -> ClientBuilder {
    ClientBuilder {
        total: DEFAULT_TOTAL_TIMEOUT,
        attempt: DEFAULT_ATTEMPT_TIMEOUT,
        retry: RetryLayer::builder(),
        breaker: CircuitBreakerLayer::builder(),
        balance: None,
        covers_body: true,
        body_idle: None,
        deadline_header: None,
        classifier: DefaultClassifier::new(),
    }
}

/// Configures the standard client stack; see the [module docs](self).
///
/// `C` is what counts as a failure, for retry, breaker and balancer alike
/// ([`DefaultClassifier`] unless [`classifier`](Self::classifier) replaces it).
#[must_use]
#[derive(Debug)]
pub struct ClientBuilder<C = DefaultClassifier> {
    total: Duration,
    attempt: Duration,
    retry: RetryBuilder<C>,
    breaker: CircuitBreakerBuilder<C>,
    balance: Option<BalanceBuilder<C>>,
    covers_body: bool,
    body_idle: Option<Duration>,
    deadline_header: Option<http::HeaderName>,
    classifier: C,
}

impl<C: Clone> ClientBuilder<C> {
    /// Replaces what counts as a failure, for the retry layer, the breakers and the balancer
    /// at once: any [`Classify`](steadfast_core::Classify) (a closure of the response, or
    /// your own type).
    ///
    /// ```
    /// use std::error::Error;
    /// use steadfast::common::{Class, Classify, DefaultClassifier, Delivery, ResponseClass};
    ///
    /// /// Also retries 409 Conflict (the upstream's optimistic lock lost a race).
    /// #[derive(Clone, Debug)]
    /// struct ConflictsRetry(DefaultClassifier);
    ///
    /// impl<B> Classify<http::Response<B>> for ConflictsRetry {
    ///     fn classify_response(&self, res: &http::Response<B>) -> ResponseClass {
    ///         if res.status() == http::StatusCode::CONFLICT {
    ///             return ResponseClass::Ready(Class::new(true, true, Delivery::Answered));
    ///         }
    ///         self.0.classify_response(res)
    ///     }
    ///     fn classify_error(&self, err: &(dyn Error + 'static)) -> Class {
    ///         Classify::<http::Response<B>>::classify_error(&self.0, err)
    ///     }
    /// }
    ///
    /// let stack = steadfast::client::http()
    ///     .classifier(ConflictsRetry(DefaultClassifier::new()))
    ///     .breaker(|b| b.consecutive_failures(Some(3))) // settings keep working after it
    ///     .build()
    ///     .unwrap();
    /// # let _ = stack;
    /// ```
    pub fn classifier<C2: Clone>(self, classifier: C2) -> ClientBuilder<C2> {
        ClientBuilder {
            total: self.total,
            attempt: self.attempt,
            retry: self.retry.classifier(classifier.clone()),
            breaker: self.breaker.classifier(classifier.clone()),
            balance: self.balance.map(|b| b.classifier(classifier.clone())),
            covers_body: self.covers_body,
            body_idle: self.body_idle,
            deadline_header: self.deadline_header,
            classifier,
        }
    }

    /// Names the stack's breakers and retry layer in events and metrics (the `breaker` and
    /// `retry` labels; default `"default"`): two stacks in one process (a gateway's and a
    /// service's, or one per upstream) tell their figures apart.
    ///
    /// ```
    /// let stack = steadfast::client::http().name("gateway").build().unwrap();
    /// assert_eq!(stack.breakers().handle(&None).name(), "gateway");
    /// ```
    pub fn name(mut self, name: &str) -> Self {
        self.retry = self.retry.name(name);
        self.breaker = self.breaker.name(name);
        self
    }

    /// The header the remaining budget is written to on HTTP calls (default
    /// `x-request-timeout-ms`; Envoy reads `x-envoy-expected-rq-timeout-ms`); gRPC calls
    /// carry `grpc-timeout`.
    ///
    /// ```
    /// let stack = steadfast::client::http()
    ///     .deadline_header(http::HeaderName::from_static("x-envoy-expected-rq-timeout-ms"))
    ///     .build()
    ///     .unwrap();
    /// # let _ = stack;
    /// ```
    pub fn deadline_header(mut self, name: http::HeaderName) -> Self {
        self.deadline_header = Some(name);
        self
    }

    /// The budget for the whole call, retries and waits included (default 10 s).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let stack = steadfast::client::http()
    ///     .attempt_timeout(Duration::from_secs(1))
    ///     .total_timeout(Duration::from_secs(3))
    ///     .build();
    /// assert!(stack.is_ok());
    /// // A total shorter than one attempt cannot work: a typed error says what to change.
    /// let err = steadfast::client::http().total_timeout(Duration::from_secs(1)).build();
    /// assert!(err.unwrap_err().to_string().contains("lower attempt_timeout"));
    /// ```
    pub fn total_timeout(mut self, d: Duration) -> Self {
        self.total = d;
        self
    }

    /// Whether the total timeout also bounds the response body (default on: a call never
    /// hangs on an upstream that sends its head and then trickles the body; the body ends
    /// with [`Elapsed`](steadfast_timeout::error::Elapsed) at the deadline). Turn it off for
    /// long-lived streams (server-sent events, gRPC server streaming): the head stays bounded,
    /// the body is not, except by [`body_idle_timeout`](Self::body_idle_timeout). The deadline
    /// propagated downstream is the same either way. See
    /// [`BodyTimeoutLayer`].
    ///
    /// ```
    /// // A client for server-sent events: the head is bounded, the stream is not.
    /// let sse = steadfast::client::http().total_covers_body(false).build().unwrap();
    /// # let _ = sse;
    /// ```
    pub fn total_covers_body(mut self, on: bool) -> Self {
        self.covers_body = on;
        self
    }

    /// Also end a response body that receives nothing for `limit` between two frames (off by
    /// default); useful with [`total_covers_body(false)`](Self::total_covers_body).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let stream = steadfast::client::http()
    ///     .total_covers_body(false)
    ///     .body_idle_timeout(Some(Duration::from_secs(30)))
    ///     .build()
    ///     .unwrap();
    /// # let _ = stream;
    /// // Zero would end every body at once: refused.
    /// assert!(steadfast::client::http().body_idle_timeout(Some(Duration::ZERO)).build().is_err());
    /// ```
    pub fn body_idle_timeout(mut self, limit: Option<Duration>) -> Self {
        self.body_idle = limit;
        self
    }

    /// The budget for one attempt (default 5 s).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let stack = steadfast::client::http().attempt_timeout(Duration::from_secs(1)).build();
    /// assert!(stack.is_ok());
    /// ```
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt = d;
        self
    }

    /// Adjusts the retry policy.
    ///
    /// ```
    /// use std::time::Duration;
    /// use steadfast::retry::Backoff;
    ///
    /// let stack = steadfast::client::http()
    ///     .retry(|r| {
    ///         r.max_attempts(2)
    ///             .backoff(Backoff::new(Duration::from_millis(50), Duration::from_secs(1)))
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # let _ = stack;
    /// ```
    pub fn retry(mut self, f: impl FnOnce(RetryBuilder<C>) -> RetryBuilder<C>) -> Self {
        self.retry = f(self.retry);
        self
    }

    /// Adjusts the breaker policy.
    /// A time window shorter than one attempt is refused when built: a slow call could never
    /// land in it.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let stack = steadfast::client::http()
    ///     .breaker(|b| b.consecutive_failures(Some(3)).open_time(Duration::from_secs(10)))
    ///     .build()
    ///     .unwrap();
    /// # let _ = stack;
    /// ```
    pub fn breaker(
        mut self,
        f: impl FnOnce(CircuitBreakerBuilder<C>) -> CircuitBreakerBuilder<C>,
    ) -> Self {
        self.breaker = f(self.breaker);
        self
    }

    /// Builds the stack for a *service* of several endpoints rather than one address: every
    /// attempt goes to one of them (its URI's authority rewritten; `Host` keeps the name the
    /// caller used), chosen by the balancer, which ejects endpoints that fail (see
    /// [`BalanceBuilder`] for its settings and defaults). A retry then goes to an endpoint that
    /// has not just failed and that this call has not tried yet (while one is in service),
    /// and each endpoint has its own breaker. Without this the stack
    /// calls the request's own authority, as before.
    ///
    /// ```
    /// let stack = steadfast::client::http()
    ///     .balance(|b| b.endpoints(["10.0.0.1:8080", "10.0.0.2:8080"]))
    ///     .build()
    ///     .unwrap();
    /// // Endpoints can join and leave while calls run.
    /// stack.endpoints().insert("10.0.0.3:8080".parse().unwrap());
    /// assert_eq!(stack.endpoints().list().len(), 3);
    /// ```
    pub fn balance(mut self, f: impl FnOnce(BalanceBuilder<C>) -> BalanceBuilder<C>) -> Self {
        let builder = match self.balance.take() {
            Some(b) => b,
            None => BalanceLayer::builder().classifier(self.classifier.clone()),
        };
        self.balance = Some(f(builder));
        self
    }

    fn validate(&self) -> Result<(), InvalidPresetConfig> {
        if self.total.is_zero() || self.attempt.is_zero() {
            return Err(InvalidPresetConfig::ZeroTimeout);
        }
        if self.attempt > self.total {
            return Err(InvalidPresetConfig::AttemptExceedsTotal {
                attempt: self.attempt,
                total: self.total,
            });
        }
        let backoffs = self.retry.worst_case_backoff();
        if backoffs >= self.total {
            return Err(InvalidPresetConfig::BackoffsExceedTotal {
                backoffs,
                total: self.total,
            });
        }
        if let Some(threshold) = self.breaker.slow_call_threshold() {
            if threshold >= self.attempt {
                return Err(InvalidPresetConfig::SlowCallsUnreachable {
                    threshold,
                    attempt: self.attempt,
                });
            }
        }
        if let Some(window) = self.breaker.time_window_len() {
            if window < self.attempt {
                return Err(InvalidPresetConfig::BreakerWindowTooShort {
                    window,
                    attempt: self.attempt,
                });
            }
        }
        Ok(())
    }

    /// Validates and builds the stack's layer. Build it once and share it: the retry budget
    /// and the breakers live in it.
    ///
    /// # Errors
    ///
    /// [`InvalidPresetConfig`] when the timeouts, backoffs and breaker window do not fit together,
    /// or a policy is invalid.
    pub fn build(self) -> Result<HttpClientLayer<C>, InvalidPresetConfig> {
        self.validate()?;
        // The total budget reaches the retry layer as the deadline the total timeout sets
        // on each request (one channel: the retry layer has no total of its own).
        let retry = self.retry.build()?;
        let breaker = self.breaker.build_per_authority()?;
        // The total deadline is shared with the layers below, not written: the attempt
        // timeout writes what is left of it on every attempt (once per attempt, and never
        // into the head the retry layer keeps).
        let mut total = TimeoutLayer::builder().limit(self.total).share_own(true);
        let mut attempt = TimeoutLayer::builder().limit(self.attempt);
        if let Some(name) = self.deadline_header {
            total = total.deadline_header(name.clone());
            attempt = attempt.deadline_header(name);
        }
        let attempt = attempt.build()?;
        let total = total
            .covering_body()
            .whole_call(self.covers_body)
            .idle(self.body_idle)
            .build()?;
        let balance = match self.balance {
            Some(b) => b.build()?,
            None => BalanceLayer::disabled(),
        };
        let correlation = PropagateCorrelationIdLayer::new();
        crate::preset::check_clashes(&[
            (Some(correlation.header()), "correlation id"),
            (Some(total.head().deadline_header()), "deadline"),
            (retry.attempt_header(), "retry attempt number"),
        ])?;
        Ok(HttpClientLayer {
            correlation,
            total,
            balance,
            retry,
            breaker,
            attempt,
        })
    }
}

/// The breaker type the client stack uses (one per upstream authority).
pub type AuthorityBreaker<C = DefaultClassifier> =
    KeyedCircuitBreakerLayer<C, ByAuthority, Option<Authority>>;

/// The standard client stack as one layer; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct HttpClientLayer<C = DefaultClassifier> {
    correlation: PropagateCorrelationIdLayer,
    total: BodyTimeoutLayer,
    retry: RetryLayer<C>,
    balance: BalanceLayer<C>,
    breaker: AuthorityBreaker<C>,
    attempt: TimeoutLayer,
}

/// The service the client stack makes from a transport `S`.
pub type HttpClient<S, C = DefaultClassifier> = PropagateCorrelationId<
    BodyTimeout<
        Retry<Balance<KeyedCircuitBreaker<Timeout<S>, C, ByAuthority, Option<Authority>>, C>, C>,
    >,
    UuidV7,
    DefaultRule,
>;

/// The hyper-util transport the HTTP client stack sends through. Its request body is
/// [`ReplayBody<B>`](steadfast_retry::ReplayBody), not `B`: the retry layer wraps the body you
/// send so that it can be sent again. A `Client<_, B>` of your own must be built for
/// `ReplayBody<B>` too (a `Client<_, B>` under the stack fails with a long E0599 that does
/// not name `ReplayBody`).
#[cfg(feature = "hyper-client")]
pub type HyperTransport<B> = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    steadfast_retry::ReplayBody<B>,
>;

/// The HTTP client stack over [`HyperTransport`]: a `tower::Service<http::Request<B>>`.
#[cfg(feature = "hyper-client")]
pub type HyperClient<B> = HttpClient<HyperTransport<B>>;

/// A plain-HTTP hyper-util client for the stack (HTTP/1.1; pooled keep-alive connections).
/// For TLS or HTTP/2, build a `hyper_util::client::legacy::Client` with your connector for
/// body type `ReplayBody<B>` and pass it to `layer`.
#[cfg(feature = "hyper-client")]
pub fn hyper_transport<B>() -> HyperTransport<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<steadfast_core::BoxError>,
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

impl<C> HttpClientLayer<C> {
    /// The stack over a new [`hyper_transport`]: a ready client for request body `B`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::ServiceExt;
    ///
    /// # async fn f() -> Result<(), steadfast::common::BoxError> {
    /// let client = steadfast::client::http().build()?.hyper_client::<Full<Bytes>>();
    /// let res = client
    ///     .oneshot(http::Request::get("http://127.0.0.1:3000/").body(Full::default())?)
    ///     .await?;
    /// # let _ = res; Ok(()) }
    /// ```
    #[cfg(feature = "hyper-client")]
    pub fn hyper_client<B>(&self) -> HttpClient<HyperTransport<B>, C>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<steadfast_core::BoxError>,
    {
        self.layer(hyper_transport())
    }

    /// The per-authority breakers (for handles and metrics).
    ///
    /// ```
    /// let stack = steadfast::client::http().build().unwrap();
    /// let authority = http::uri::Authority::from_static("orders:8080");
    /// // A handle works before the first call: watch or set the breaker at once.
    /// let handle = stack.breakers().handle(&Some(authority));
    /// assert_eq!(handle.upstream(), "orders:8080");
    /// assert_eq!(stack.breakers().keys().len(), 1);
    /// ```
    pub fn breakers(&self) -> &AuthorityBreaker<C> {
        &self.breaker
    }

    /// The service's endpoints, to list them, see which are ejected, and add or remove
    /// endpoints while calls run (an empty set that nothing reads when the stack was not
    /// built with [`balance`](ClientBuilder::balance)).
    pub fn endpoints(&self) -> steadfast_balance::EndpointsHandle<C> {
        self.balance.handle()
    }

    /// The retry layer (for its budget balance).
    ///
    /// ```
    /// let stack = steadfast::client::http().build().unwrap();
    /// assert!(stack.retry().budget_balance().unwrap() > 0.0); // the budget starts with its floor
    /// ```
    pub fn retry(&self) -> &RetryLayer<C> {
        &self.retry
    }
}

impl<S, C> Layer<S> for HttpClientLayer<C> {
    type Service = HttpClient<S, C>;

    fn layer(&self, transport: S) -> Self::Service {
        let s = self.attempt.layer(transport);
        let s = self.breaker.layer(s);
        let s = self.balance.layer(s);
        let s = self.retry.layer(s);
        let s = self.total.layer(s);
        self.correlation.layer(s)
    }
}

/// Starts the standard gRPC client stack for a tonic `Channel`: the same layers as
/// [`http()`], with gRPC's retry rules coming from the shared classification: UNAVAILABLE is
/// retried (see [`GrpcClientBuilder::retry_unavailable`]), streamed responses are committed.
///
/// As a gRPC deadline does, the total timeout covers the whole call, response stream
/// included: a server-streaming or bidirectional RPC that should outlive it needs
/// `.with(|c| c.total_covers_body(false))` (and perhaps a
/// [`body_idle_timeout`](ClientBuilder::body_idle_timeout)), or a stack of its own.
///
/// tonic's requests carry only a path (the `Channel` adds its origin below the stack), so
/// the per-authority breaker sees one key for every call: one breaker per layered stack.
/// Layer each upstream's `Channel` with its own `GrpcClientLayer` to keep their breakers
/// apart.
#[cfg(feature = "tonic")]
pub fn grpc() -> GrpcClientBuilder {
    GrpcClientBuilder {
        client: http().retry(|p| p.retry_grpc_statuses(true)),
    }
}

/// Configures the gRPC client stack; see [`grpc`].
#[cfg(feature = "tonic")]
#[must_use]
#[derive(Debug)]
pub struct GrpcClientBuilder {
    client: ClientBuilder,
}

#[cfg(feature = "tonic")]
impl GrpcClientBuilder {
    /// Adjusts the shared settings (timeouts, retry, breaker).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // A server-streaming RPC that may outlive the total timeout.
    /// let stack = steadfast::client::grpc()
    ///     .with(|c| c.total_covers_body(false).body_idle_timeout(Some(Duration::from_secs(60))))
    ///     .build()
    ///     .unwrap();
    /// # let _ = stack;
    /// ```
    pub fn with(mut self, f: impl FnOnce(ClientBuilder) -> ClientBuilder) -> Self {
        self.client = f(self.client);
        self
    }

    /// Whether a call answered UNAVAILABLE (a trailers-only status: the head carried it, so
    /// nothing was streamed) is retried (default on; the last of this and a
    /// [`with`](Self::with) that sets [`RetryBuilder::retry_grpc_statuses`] wins). Every unary
    /// gRPC call is a `POST`, so the HTTP idempotency rule would never retry one; gRPC's retry
    /// design (A6) makes the retryable status codes the policy owner's choice, and UNAVAILABLE
    /// means the server did not do the work. Turn it off for services whose UNAVAILABLE may
    /// follow side effects.
    /// See [`RetryBuilder::retry_grpc_statuses`].
    ///
    /// ```
    /// let stack = steadfast::client::grpc().retry_unavailable(false).build().unwrap();
    /// # let _ = stack;
    /// ```
    pub fn retry_unavailable(mut self, on: bool) -> Self {
        self.client = self.client.retry(|p| p.retry_grpc_statuses(on));
        self
    }

    /// Validates and builds the layer.
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::build`].
    pub fn build(self) -> Result<GrpcClientLayer, InvalidPresetConfig> {
        Ok(GrpcClientLayer(self.client.build()?))
    }
}

/// The gRPC client stack as one layer, for a tonic `Channel`.
///
/// ```no_run
/// use tonic_health::pb::health_client::HealthClient;
/// use tower::Layer;
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let channel = tonic::transport::Channel::from_static("http://127.0.0.1:50051").connect().await?;
/// let stack = steadfast::client::grpc().build()?.layer(channel);
/// let mut client = HealthClient::new(stack);
/// # Ok(()) }
/// ```
#[cfg(feature = "tonic")]
#[derive(Clone, Debug)]
pub struct GrpcClientLayer(HttpClientLayer);

/// Hands a replayable request body to a tonic `Channel` (which takes only tonic's own body
/// type): one box per attempt.
#[cfg(feature = "tonic")]
#[derive(Clone, Debug)]
pub struct TonicTransport<S>(S);

#[cfg(feature = "tonic")]
impl<S, B> tower_service::Service<http::Request<steadfast_retry::ReplayBody<B>>>
    for TonicTransport<S>
where
    S: tower_service::Service<http::Request<tonic::body::Body>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<steadfast_core::BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<steadfast_retry::ReplayBody<B>>) -> S::Future {
        self.0.call(req.map(tonic::body::Body::new))
    }
}

/// The service the gRPC client stack makes from a tonic `Channel` `S`: the HTTP stack, whose
/// errors reach tonic as the statuses they mean (a timeout is `DEADLINE_EXCEEDED`, an open
/// breaker `UNAVAILABLE`; see [`grpc_status`](crate::grpc_status)).
#[cfg(feature = "tonic")]
pub type GrpcClient<S> = crate::grpc_status::GrpcStatusErrors<HttpClient<TonicTransport<S>>>;

#[cfg(feature = "tonic")]
impl GrpcClientLayer {
    /// The per-authority breakers (one for the whole stack: tonic's requests carry no
    /// authority).
    ///
    /// ```
    /// let stack = steadfast::client::grpc().build().unwrap();
    /// let handle = stack.breakers().handle(&None); // works before the first call
    /// assert_eq!(handle.upstream(), "none");
    /// ```
    pub fn breakers(&self) -> &AuthorityBreaker {
        self.0.breakers()
    }
}

#[cfg(feature = "tonic")]
impl<S> Layer<S> for GrpcClientLayer {
    type Service = GrpcClient<S>;

    fn layer(&self, channel: S) -> Self::Service {
        crate::grpc_status::GrpcStatusErrors::new(self.0.layer(TonicTransport(channel)))
    }
}
