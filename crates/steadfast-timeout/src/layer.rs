use std::time::Duration;

use http::StatusCode;
use tower_layer::Layer;

use crate::body::BodyTimeoutLayer;

use crate::server::ServerTimeout;
use crate::service::Timeout;

/// The seed's client timeout: 5 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Client-side timeout: fails a call that takes longer than its limit with
/// [`Elapsed`](crate::Elapsed), and carries the remaining deadline downstream.
///
/// The limit applied to a request is the smallest of: the layer's limit, a
/// [`RequestTimeout`](crate::RequestTimeout) extension, and the time left of an inherited
/// [`Deadline`](steadfast_core::Deadline) (a request extension or the ambient one a
/// [`ServerTimeoutLayer`] set for the handler). An inherited deadline that has already passed
/// fails the call at once without sending anything.
///
/// When a deadline is inherited (or [`propagate_own`](Self::propagate_own) is on), the
/// remaining budget is written onto the request: `grpc-timeout` for gRPC requests,
/// `x-request-timeout-ms` otherwise, and a [`Deadline`](steadfast_core::Deadline) extension is
/// set for inner layers (retry reads it).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use steadfast_timeout::{Elapsed, TimeoutLayer};
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
#[derive(Clone, Copy, Debug)]
pub struct TimeoutLayer {
    pub(crate) limit: Duration,
    pub(crate) cover_ready: bool,
    pub(crate) propagate_own: bool,
}

impl Default for TimeoutLayer {
    fn default() -> Self {
        Self::new(DEFAULT_TIMEOUT)
    }
}

impl TimeoutLayer {
    /// A timeout of `limit` for each call. A limit of zero is a deadline already passed:
    /// every call fails at once with [`Elapsed`](crate::Elapsed) without reaching the inner
    /// service. Limits past about thirty years (`Duration::MAX` included) count as thirty
    /// years, as tokio's timers do.
    pub const fn new(limit: Duration) -> Self {
        Self {
            limit,
            cover_ready: false,
            propagate_own: false,
        }
    }

    /// Also bound the wait in `poll_ready` by the limit (off by default, as in tower).
    ///
    /// `poll_ready` never fails for this: when the wait runs out the service reports ready,
    /// and the next call fails at once with [`Elapsed`](crate::Elapsed) without reaching the
    /// inner service.
    #[must_use]
    pub const fn cover_ready(mut self, on: bool) -> Self {
        self.cover_ready = on;
        self
    }

    /// Write this layer's own limit downstream even when no deadline was inherited (off by
    /// default: it costs a header and an extension per call). Turn it on for the outermost
    /// (total) timeout of a client stack so upstreams learn the caller's budget.
    #[must_use]
    pub const fn propagate_own(mut self, on: bool) -> Self {
        self.propagate_own = on;
        self
    }

    /// The configured limit.
    pub const fn limit(&self) -> Duration {
        self.limit
    }

    /// The same timeout, with its deadline also bounding the response body (see
    /// [`BodyTimeoutLayer`]): what a client's total timeout should be, so a call never hangs
    /// on a trickling body. Needs `http::Response` responses.
    pub const fn covering_body(self) -> BodyTimeoutLayer {
        BodyTimeoutLayer::new(self)
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout::new(inner, *self)
    }
}

/// Server-side timeout: makes the request's deadline ambient for the handler and answers
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
/// use steadfast_timeout::ServerTimeoutLayer;
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let app = Router::new()
///     .route("/slow", get(|| async {
///         tokio::time::sleep(Duration::from_secs(60)).await;
///         "late"
///     }))
///     .layer(ServerTimeoutLayer::new(Duration::from_secs(2)));
/// let req = http::Request::get("/slow").body(axum::body::Body::empty()).unwrap();
/// let res = app.oneshot(req).await.unwrap(); // Router's error stays `Infallible`
/// assert_eq!(res.status(), 504);
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ServerTimeoutLayer {
    pub(crate) limit: Duration,
    pub(crate) status: StatusCode,
}

impl Default for ServerTimeoutLayer {
    fn default() -> Self {
        Self::new(DEFAULT_TIMEOUT)
    }
}

impl ServerTimeoutLayer {
    /// A server timeout of at most `limit` per request.
    pub const fn new(limit: Duration) -> Self {
        Self {
            limit,
            status: StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The HTTP status answered on expiry (default `504 Gateway Timeout`).
    #[must_use]
    pub const fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The configured limit.
    pub const fn limit(&self) -> Duration {
        self.limit
    }
}

impl<S> Layer<S> for ServerTimeoutLayer {
    type Service = ServerTimeout<S>;

    fn layer(&self, inner: S) -> ServerTimeout<S> {
        ServerTimeout::new(inner, *self)
    }
}
