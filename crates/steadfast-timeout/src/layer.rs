use std::time::Duration;

use http::{HeaderName, StatusCode};
use steadfast_core::header::{TIMEOUT_MS, owned_by_steadfast, reserved};
use tower_layer::Layer;

use crate::body::BodyTimeoutLayer;
use crate::client::Timeout;
use crate::error::InvalidTimeoutConfig;
use crate::server::SetDeadline;

/// The seed's client timeout: 5 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Client-side timeout: fails a call that takes longer than its limit with
/// [`Elapsed`](crate::error::Elapsed), and carries the remaining deadline downstream.
///
/// The limit applied to a request is the smallest of: the layer's limit, a
/// [`RequestTimeout`](crate::RequestTimeout) extension, the time left of an inherited
/// [`Deadline`](steadfast_core::Deadline) (a request extension or the ambient one a
/// [`SetDeadlineLayer`] set for the handler), and a budget the caller wrote on the request
/// (`grpc-timeout`, as tonic's `Request::set_timeout` writes it, or the deadline header;
/// the shorter of the two when both are sent). The last two are deadlines for the whole call:
/// a retry or hedge below sends no attempt past them, and each attempt is told what is left,
/// as one value of each budget header the request carries. A deadline that has already passed
/// fails the call at once without sending anything. (The outermost steadfast timeout of a call
/// reads the caller's header; below it, the header is the one it wrote. A retry or hedge with
/// no timeout above it reads `grpc-timeout` and `x-request-timeout-ms` itself: a deadline
/// header renamed with [`deadline_header`](TimeoutBuilder::deadline_header) needs a timeout
/// with the same name above the retry, as the presets have, to count for the whole call.)
///
/// When a deadline is inherited (or [`propagate_own`](TimeoutBuilder::propagate_own) is on), the
/// remaining budget is written onto the request: `grpc-timeout` for gRPC requests,
/// `x-request-timeout-ms` otherwise, and the layers below learn the deadline as the ambient
/// [`Deadline`](steadfast_core::Deadline) while the call is made (retry reads it, and keeps
/// it for its later attempts). See [`share_own`](TimeoutBuilder::share_own) for a total
/// timeout that leaves the writing to an inner one.
///
/// # On a server (axum, tonic)
///
/// This layer fails with [`Elapsed`](crate::error::Elapsed), so its service's error is a
/// `BoxError`. An axum `Router` needs `Infallible` (`Router::layer` with this layer fails
/// with "the trait `From<BoxError>` is not implemented for `Infallible`"): on a server use
/// [`SetDeadlineLayer`], which answers `504` / `DEADLINE_EXCEEDED` itself and keeps the
/// inner error type.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use steadfast_timeout::TimeoutLayer;
/// use steadfast_timeout::error::Elapsed;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(TimeoutLayer::new(Duration::from_secs(1)))
///     .service(service_fn(|_req: http::Request<()>| async {
///         tokio::time::sleep(Duration::from_secs(10)).await;
///         Ok::<_, std::convert::Infallible>(http::Response::new(()))
///     }));
/// let err = svc.oneshot(http::Request::new(())).await.unwrap_err();
/// assert_eq!(err.downcast_ref::<Elapsed>().unwrap().limit(), Duration::from_secs(1));
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    pub(crate) limit: Duration,
    pub(crate) cover_ready: bool,
    pub(crate) own: Own,
    /// The header an HTTP request's remaining budget is written to.
    pub(crate) header: HeaderName,
}

impl Default for TimeoutLayer {
    fn default() -> Self {
        Self::new(DEFAULT_TIMEOUT)
    }
}

impl TimeoutLayer {
    /// A timeout of `limit` for each call, with the other settings at their defaults (see
    /// [`TimeoutBuilder`]).
    pub const fn new(limit: Duration) -> Self {
        Self {
            limit,
            cover_ready: false,
            own: Own::Unshared,
            header: TIMEOUT_MS,
        }
    }

    /// A builder with the defaults: [`DEFAULT_TIMEOUT`], readiness not covered, own limit
    /// not propagated.
    pub const fn builder() -> TimeoutBuilder {
        TimeoutBuilder {
            layer: Self::new(DEFAULT_TIMEOUT),
        }
    }

    /// The configured limit.
    pub const fn limit(&self) -> Duration {
        self.limit
    }

    /// The header an HTTP request's remaining budget is written to.
    pub const fn deadline_header(&self) -> &HeaderName {
        &self.header
    }
}

/// What a client timeout does with its deadline besides timing the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Own {
    /// The default: the layer's own limit stays its own (no clock read until the first
    /// `Pending`); an inherited deadline is shrunk to it and written on the wire.
    Unshared,
    /// The layers below learn the deadline; nothing is written on the wire.
    Shared,
    /// The layers below learn the deadline, and it is written on the wire.
    Written,
}

/// Configures a [`TimeoutLayer`], or with [`covering_body`](Self::covering_body) a
/// [`BodyTimeoutLayer`].
///
/// ```
/// use std::time::Duration;
/// use steadfast_timeout::TimeoutLayer;
///
/// let total = TimeoutLayer::builder()
///     .limit(Duration::from_secs(2))
///     .propagate_own(true)
///     .build()
///     .unwrap();
/// assert_eq!(total.limit(), Duration::from_secs(2));
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct TimeoutBuilder {
    layer: TimeoutLayer,
}

impl TimeoutBuilder {
    /// The limit for each call (default [`DEFAULT_TIMEOUT`]). A limit of zero is a deadline
    /// already passed: every call fails at once with [`Elapsed`](crate::error::Elapsed)
    /// without reaching the inner service. Limits past about thirty years
    /// (`Duration::MAX` included) count as thirty years, as tokio's timers do.
    pub const fn limit(mut self, limit: Duration) -> Self {
        self.layer.limit = limit;
        self
    }

    /// Also bound the wait in `poll_ready` by the limit (off by default, as in tower).
    ///
    /// `poll_ready` never fails for this: when the wait runs out the service reports ready,
    /// and the next call fails at once with [`Elapsed`](crate::error::Elapsed) without
    /// reaching the inner service.
    ///
    /// A wait runs from the first `Pending` until the inner service is ready or the limit
    /// runs out. A caller may abandon it (drop its `ready()` future) without the service
    /// knowing: a later `poll_ready` from another task, or one that comes more than a whole
    /// limit after the abandoned wait would have ended, starts a new wait; one from the same
    /// task within that time continues the old one.
    pub const fn cover_ready(mut self, on: bool) -> Self {
        self.layer.cover_ready = on;
        self
    }

    /// Write this layer's own limit downstream even when no deadline was inherited (off by
    /// default: it costs a clock read and a header per call), and let the layers below learn
    /// it as their deadline. Turn it on for the outermost (total) timeout of a client stack
    /// so upstreams learn the caller's budget. The last of this and
    /// [`share_own`](Self::share_own) wins.
    pub const fn propagate_own(mut self, on: bool) -> Self {
        self.layer.own = if on { Own::Written } else { Own::Unshared };
        self
    }

    /// Let the layers below learn this layer's deadline (inherited or its own), as the
    /// ambient [`Deadline`](steadfast_core::Deadline) while each call is made, but write
    /// nothing on the wire: for a total timeout above a retry layer and a per-attempt
    /// timeout, where the attempt timeout writes what is left of the deadline on every
    /// attempt, so writing it here too would be wasted (off by default). The retry layer
    /// learns when to stop; the attempt timeout shrinks to what is left. The last of this
    /// and [`propagate_own`](Self::propagate_own) wins.
    ///
    /// ```
    /// use std::time::Duration;
    /// use steadfast_core::Deadline;
    /// use steadfast_timeout::TimeoutLayer;
    /// use tower::{Layer, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let total = TimeoutLayer::builder()
    ///     .limit(Duration::from_secs(10))
    ///     .share_own(true)
    ///     .build()
    ///     .unwrap();
    /// let svc = total.layer(service_fn(|req: http::Request<()>| {
    ///     // Read in `call`, which runs inside the deadline's scope.
    ///     let seen = (req.headers().contains_key("x-request-timeout-ms"), Deadline::current());
    ///     std::future::ready(Ok::<_, std::convert::Infallible>(seen))
    /// }));
    /// let (written, deadline) = svc.oneshot(http::Request::new(())).await.unwrap();
    /// assert!(!written); // nothing on the wire
    /// assert_eq!(deadline.unwrap().remaining(), Duration::from_secs(10)); // known below
    /// # }
    /// ```
    pub const fn share_own(mut self, on: bool) -> Self {
        self.layer.own = match (on, self.layer.own) {
            (true, _) => Own::Shared,
            (false, Own::Shared) => Own::Unshared,
            (false, own) => own,
        };
        self
    }

    /// The header an HTTP request's remaining budget is written to, in milliseconds (default
    /// `x-request-timeout-ms`; e.g. Envoy's `x-envoy-expected-rq-timeout-ms`, or an in-house
    /// name). gRPC requests always carry `grpc-timeout`. A header that the protocol, a
    /// credential or another layer owns is refused when built.
    ///
    /// ```
    /// use http::HeaderName;
    /// use steadfast_timeout::TimeoutLayer;
    ///
    /// let envoy = TimeoutLayer::builder()
    ///     .deadline_header(HeaderName::from_static("x-envoy-expected-rq-timeout-ms"))
    ///     .build()
    ///     .unwrap();
    /// # let _ = envoy;
    /// assert!(TimeoutLayer::builder().deadline_header(http::header::HOST).build().is_err());
    /// ```
    pub fn deadline_header(mut self, name: HeaderName) -> Self {
        self.layer.header = name;
        self
    }

    /// Let the deadline also bound the response body (see [`BodyTimeoutLayer`]): what a
    /// client's total timeout should be, so a call never hangs on a trickling body. Needs
    /// `http::Response` responses.
    pub fn covering_body(self) -> BodyTimeoutBuilder {
        BodyTimeoutBuilder {
            head: self.layer,
            whole_call: true,
            idle: None,
        }
    }

    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// [`InvalidTimeoutConfig::ReservedHeader`] for a deadline header another party owns;
    /// every limit is valid (see [`limit`](Self::limit)).
    pub fn build(self) -> Result<TimeoutLayer, InvalidTimeoutConfig> {
        check_header(&self.layer.header)?;
        Ok(self.layer)
    }
}

/// Configures a [`BodyTimeoutLayer`]; made by [`TimeoutBuilder::covering_body`].
#[derive(Clone, Debug)]
#[must_use]
pub struct BodyTimeoutBuilder {
    head: TimeoutLayer,
    whole_call: bool,
    idle: Option<Duration>,
}

impl BodyTimeoutBuilder {
    /// Whether the deadline covers the body too (default on). Off: the head is bounded, the
    /// body streams for as long as it streams (for long-lived streams), except for an
    /// [`idle`](Self::idle) limit if one is set.
    pub const fn whole_call(mut self, on: bool) -> Self {
        self.whole_call = on;
        self
    }

    /// Also end the body with [`Elapsed`](crate::error::Elapsed) (its
    /// [`is_idle`](crate::error::Elapsed::is_idle) set) when the upstream sends nothing for
    /// `limit` between two frames (off by default, `None`). Measured from the moment the body
    /// starts waiting.
    pub const fn idle(mut self, limit: Option<Duration>) -> Self {
        self.idle = limit;
        self
    }

    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// [`InvalidTimeoutConfig::ZeroIdle`] for an idle limit of zero, which would end every
    /// body at its first wait (pass `None` to turn the idle limit off).
    pub fn build(self) -> Result<BodyTimeoutLayer, InvalidTimeoutConfig> {
        if let Some(idle) = self.idle {
            if idle.is_zero() {
                return Err(InvalidTimeoutConfig::ZeroIdle);
            }
        }
        Ok(BodyTimeoutLayer {
            head: self.head,
            whole_call: self.whole_call,
            idle: self.idle,
        })
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout::new(inner, self.clone())
    }
}

/// Server-side deadline: makes the request's deadline ambient for the handler and answers
/// `504 Gateway Timeout` (HTTP) or a trailers-only `DEADLINE_EXCEEDED` (gRPC) when it passes.
///
/// The deadline is `now + min(own limit, inbound budget)`, where the inbound budget is a valid
/// `grpc-timeout` or `x-request-timeout-ms` header; malformed headers are ignored. The handler
/// sees it as a [`Deadline`](steadfast_core::Deadline) request extension and as the ambient
/// deadline ([`Deadline::current`](steadfast_core::Deadline::current)), so a client stack it
/// calls inherits it with no handler code. The inner service's error type is kept.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::get};
/// use steadfast_timeout::SetDeadlineLayer;
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let app = Router::new()
///     .route("/slow", get(|| async {
///         tokio::time::sleep(Duration::from_secs(60)).await;
///         "late"
///     }))
///     .layer(SetDeadlineLayer::new(Duration::from_secs(2)));
/// let req = http::Request::get("/slow").body(axum::body::Body::empty()).unwrap();
/// let res = app.oneshot(req).await.unwrap(); // Router's error stays `Infallible`
/// assert_eq!(res.status(), 504);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct SetDeadlineLayer {
    pub(crate) limit: Duration,
    pub(crate) status: StatusCode,
    /// The header an HTTP request's budget is read from.
    pub(crate) header: HeaderName,
    /// Whether the inbound budget counts at all.
    pub(crate) trust_inbound: bool,
}

impl Default for SetDeadlineLayer {
    fn default() -> Self {
        Self::new(DEFAULT_TIMEOUT)
    }
}

impl SetDeadlineLayer {
    /// A server deadline of at most `limit` per request, answered with `504`.
    pub const fn new(limit: Duration) -> Self {
        Self {
            limit,
            status: StatusCode::GATEWAY_TIMEOUT,
            header: TIMEOUT_MS,
            trust_inbound: true,
        }
    }

    /// The header an HTTP request's budget is read from.
    pub const fn deadline_header(&self) -> &HeaderName {
        &self.header
    }

    /// A builder with the defaults: [`DEFAULT_TIMEOUT`], answered with `504`.
    pub const fn builder() -> SetDeadlineBuilder {
        SetDeadlineBuilder {
            layer: Self::new(DEFAULT_TIMEOUT),
        }
    }

    /// The configured limit.
    pub const fn limit(&self) -> Duration {
        self.limit
    }
}

/// Configures a [`SetDeadlineLayer`].
///
/// ```
/// use std::time::Duration;
/// use steadfast_timeout::SetDeadlineLayer;
///
/// let layer = SetDeadlineLayer::builder()
///     .limit(Duration::from_secs(30))
///     .status(http::StatusCode::SERVICE_UNAVAILABLE)
///     .build()
///     .unwrap();
/// assert_eq!(layer.limit(), Duration::from_secs(30));
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct SetDeadlineBuilder {
    layer: SetDeadlineLayer,
}

impl SetDeadlineBuilder {
    /// The longest a request may take, whatever the caller allows (default
    /// [`DEFAULT_TIMEOUT`]).
    pub const fn limit(mut self, limit: Duration) -> Self {
        self.layer.limit = limit;
        self
    }

    /// The HTTP status answered on expiry (default `504 Gateway Timeout`); gRPC calls are
    /// answered `DEADLINE_EXCEEDED` whatever this says.
    pub const fn status(mut self, status: StatusCode) -> Self {
        self.layer.status = status;
        self
    }

    /// The header an HTTP request's budget is read from, in milliseconds (default
    /// `x-request-timeout-ms`); gRPC requests' `grpc-timeout` is read whatever this says.
    pub fn deadline_header(mut self, name: HeaderName) -> Self {
        self.layer.header = name;
        self
    }

    /// Whether a caller's budget (`grpc-timeout`, the deadline header) shortens the
    /// request's deadline (default on). Off for an edge server facing callers it does not
    /// trust: their budget is ignored, and removed from the request so a handler that
    /// forwards headers does not pass it on; the deadline is the layer's limit.
    ///
    /// ```
    /// use std::time::Duration;
    /// use steadfast_timeout::SetDeadlineLayer;
    ///
    /// let edge = SetDeadlineLayer::builder()
    ///     .limit(Duration::from_secs(30))
    ///     .trust_inbound(false)
    ///     .build()
    ///     .unwrap();
    /// # let _ = edge;
    /// ```
    pub const fn trust_inbound(mut self, on: bool) -> Self {
        self.layer.trust_inbound = on;
        self
    }

    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// [`InvalidTimeoutConfig::StatusNotAnError`] for a status outside 400-599: a client
    /// must not read an expired deadline as success;
    /// [`InvalidTimeoutConfig::ReservedHeader`] for a deadline header another party owns.
    pub fn build(self) -> Result<SetDeadlineLayer, InvalidTimeoutConfig> {
        if !(self.layer.status.is_client_error() || self.layer.status.is_server_error()) {
            return Err(InvalidTimeoutConfig::StatusNotAnError(self.layer.status));
        }
        check_header(&self.layer.header)?;
        Ok(self.layer)
    }
}

impl<S> Layer<S> for SetDeadlineLayer {
    type Service = SetDeadline<S>;

    fn layer(&self, inner: S) -> SetDeadline<S> {
        SetDeadline::new(inner, self.clone())
    }
}

/// Refuses a deadline header that the protocol, a credential or another layer owns (the
/// default, `x-request-timeout-ms`, is ours).
fn check_header(name: &HeaderName) -> Result<(), InvalidTimeoutConfig> {
    if *name != TIMEOUT_MS && (reserved(name) || owned_by_steadfast(name)) {
        return Err(InvalidTimeoutConfig::ReservedHeader(name.clone()));
    }
    Ok(())
}
