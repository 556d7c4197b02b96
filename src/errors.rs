//! What an error of the stack means to the caller upstream of you, as an HTTP response or a
//! gRPC status, so a gateway or handler does not downcast `BoxError` by hand.
//!
//! | the error (anywhere in its `source()` chain) | [`Failure`] | HTTP | gRPC |
//! |---|---|---|---|
//! | a timeout (`Elapsed`: the call's, an inherited deadline's, the body's; anything marked [`TimedOut`]) | `Timeout` | 504 | `DEADLINE_EXCEEDED` |
//! | an open breaker (`BreakerOpen`, also inside the balancer's `Rerouted`) | `BreakerOpen` | 503 + `Retry-After` (whole seconds, rounded up; none for a breaker forced open by hand, which has no schedule) | `UNAVAILABLE` + `grpc-retry-pushback-ms` |
//! | no endpoint (`NoEndpoint`: the service has none, or every one is ejected) | `NoEndpoint` | 503 | `UNAVAILABLE` |
//! | any other refusal by local policy ([`PolicyRejected`]: a limit, a throttle) | `Rejected` | 503 + `x-envoy-overloaded` | `UNAVAILABLE` + `x-envoy-overloaded` |
//! | anything else: connect errors, resets, protocol errors | `Upstream` | 502 | `UNAVAILABLE` |
//!
//! This is what an error means to *your* caller when you answer with it. The `tonic::Status`
//! that `client::grpc()` itself returns keeps tonic's code for tonic's transport errors (a
//! stream the server reset with `INTERNAL_ERROR` is `INTERNAL`, as the gRPC HTTP/2 mapping
//! says; see `steadfast::grpc_status`, feature `tonic`).
//!
//! A `Rejected` answer is marked as shed ([`OVERLOADED`]): the call was refused
//! for load before it went anywhere, so your callers' breakers do not count it as a failure
//! of yours (their balancers still avoid you for a while, and their limits still learn).
//!
//! The response bodies and gRPC messages are fixed short texts: an error's own text can name
//! internal addresses, and the caller upstream of you should not see them. Log the error
//! itself.
//!
//! ```
//! use steadfast::errors::{Failure, http_response};
//!
//! let err: steadfast::common::BoxError =
//!     Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
//! assert_eq!(Failure::of(&*err), Failure::Upstream);
//! let res = http_response::<()>(&*err);
//! assert_eq!(res.status(), 502);
//! ```

use std::error::Error;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use steadfast_core::header::{GRPC_RETRY_PUSHBACK_MS, Pushback, encode_pushback};
use steadfast_core::{GrpcCode, OVERLOADED, PolicyRejected, ResponseBody, TimedOut};

/// What went wrong, in the terms a caller upstream of you needs; see the [module
/// docs](self) for the mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// A time limit ran out.
    Timeout,
    /// A breaker failed the call fast; when its next probe is due, if known.
    BreakerOpen {
        /// How long until the breaker lets a probe through.
        retry_after: Option<Duration>,
    },
    /// No endpoint of the service could take the call.
    NoEndpoint,
    /// A layer refused the call by local policy.
    Rejected,
    /// The upstream could not be reached, or broke off.
    Upstream,
}

/// How many links of a `source()` chain are followed.
const MAX_CHAIN: usize = 32;

impl Failure {
    /// What `err` means.
    pub fn of(err: &(dyn Error + 'static)) -> Failure {
        let mut rejected = false;
        let chain = std::iter::successors(Some(err), |e: &&(dyn Error + 'static)| (*e).source())
            .take(MAX_CHAIN);
        for e in chain {
            #[cfg(feature = "breaker")]
            if let Some(open) = e.downcast_ref::<steadfast_breaker::error::BreakerOpen>() {
                return Failure::BreakerOpen {
                    retry_after: open.retry_after(),
                };
            }
            #[cfg(feature = "balance")]
            if e.is::<steadfast_balance::error::NoEndpoint>() {
                return Failure::NoEndpoint;
            }
            // An endpoint's breaker refused and no retry took the call elsewhere: what the
            // refusal means.
            #[cfg(feature = "balance")]
            if let Some(r) = e.downcast_ref::<steadfast_balance::error::Rerouted>() {
                return Failure::of(r.refusal());
            }
            if e.is::<TimedOut>() || e.is::<tokio::time::error::Elapsed>() {
                return Failure::Timeout;
            }
            #[cfg(feature = "tonic")]
            if e.is::<tonic::TimeoutExpired>() {
                return Failure::Timeout;
            }
            rejected |= e.is::<PolicyRejected>();
        }
        if rejected {
            Failure::Rejected
        } else {
            Failure::Upstream
        }
    }

    /// The HTTP status it answers with: 504, 503 or 502.
    pub fn status(self) -> StatusCode {
        match self {
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::BreakerOpen { .. } | Failure::NoEndpoint | Failure::Rejected => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Failure::Upstream => StatusCode::BAD_GATEWAY,
        }
    }

    /// The gRPC status code it answers with: `DEADLINE_EXCEEDED` or `UNAVAILABLE`.
    pub fn grpc_code(self) -> GrpcCode {
        match self {
            Failure::Timeout => GrpcCode::DeadlineExceeded,
            _ => GrpcCode::Unavailable,
        }
    }

    /// The fixed text the answer carries.
    pub fn message(self) -> &'static str {
        match self {
            Failure::Timeout => "upstream timed out",
            Failure::BreakerOpen { .. } => "upstream unavailable (circuit open)",
            Failure::NoEndpoint => "no upstream endpoint available",
            Failure::Rejected => "rejected by local policy",
            Failure::Upstream => "bad gateway",
        }
    }

    fn retry_after(self) -> Option<Duration> {
        match self {
            Failure::BreakerOpen { retry_after } => retry_after,
            _ => None,
        }
    }
}

/// The HTTP response `err` means: its status, `Retry-After` for an open breaker, and a short
/// plain-text body.
///
/// ```
/// use steadfast::errors::http_response;
/// use steadfast::timeout::error::Elapsed;
/// # fn elapsed() -> steadfast::common::BoxError {
/// #     let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
/// #     rt.block_on(async {
/// #         let svc = steadfast::timeout::TimeoutLayer::new(std::time::Duration::from_millis(1))
/// #             .layer(tower::service_fn(|_: http::Request<()>| async {
/// #                 tokio::time::sleep(std::time::Duration::from_secs(1)).await;
/// #                 Ok::<_, std::convert::Infallible>(http::Response::new(()))
/// #             }));
/// #         tower::ServiceExt::oneshot(svc, http::Request::new(())).await.unwrap_err()
/// #     })
/// # }
/// # use tower::Layer;
/// let err = elapsed();
/// assert!(err.is::<Elapsed>());
/// assert_eq!(http_response::<()>(&*err).status(), 504);
/// ```
pub fn http_response<B>(err: &(dyn Error + 'static)) -> Response<ResponseBody<B>> {
    let failure = Failure::of(err);
    let mut res = steadfast_core::http_response(failure.status(), failure.message());
    if let Some(after) = failure.retry_after() {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        res.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    if failure == Failure::Rejected {
        res.headers_mut().insert(OVERLOADED, SHED);
    }
    res
}

/// The shed marker's value.
const SHED: HeaderValue = HeaderValue::from_static("true");

/// The gRPC answer `err` means: a trailers-only response with its status, and
/// `grpc-retry-pushback-ms` for an open breaker.
///
/// ```
/// use steadfast::errors::grpc_response;
///
/// let err = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
/// let res = grpc_response::<()>(&err);
/// assert_eq!(res.headers()["grpc-status"], "14"); // UNAVAILABLE
/// ```
pub fn grpc_response<B>(err: &(dyn Error + 'static)) -> Response<ResponseBody<B>> {
    let failure = Failure::of(err);
    let mut res = steadfast_core::grpc_response(failure.grpc_code(), failure.message());
    if let Some(after) = failure.retry_after() {
        res.headers_mut().insert(
            GRPC_RETRY_PUSHBACK_MS,
            encode_pushback(Pushback::After(after)),
        );
    }
    if failure == Failure::Rejected {
        res.headers_mut().insert(OVERLOADED, SHED);
    }
    res
}

/// The `tonic::Status` `err` means, with `grpc-retry-pushback-ms` for an open breaker.
///
/// ```
/// let err = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// assert_eq!(steadfast::errors::grpc_status(&err).code(), tonic::Code::Unavailable);
/// ```
#[cfg(feature = "tonic")]
pub fn grpc_status(err: &(dyn Error + 'static)) -> tonic::Status {
    let failure = Failure::of(err);
    let mut status = tonic::Status::new(
        tonic::Code::from_i32(failure.grpc_code().as_i32()),
        failure.message(),
    );
    if let Some(after) = failure.retry_after() {
        if let Ok(v) = encode_pushback(Pushback::After(after))
            .to_str()
            .unwrap_or_default()
            .parse()
        {
            status.metadata_mut().insert("grpc-retry-pushback-ms", v);
        }
    }
    if failure == Failure::Rejected {
        status.metadata_mut().insert(
            "x-envoy-overloaded",
            tonic::metadata::MetadataValue::from_static("true"),
        );
    }
    status
}

/// An error of the stack as an axum response: return it from a handler (`?` converts any
/// error) and the caller gets what [`http_response`] says.
///
/// ```
/// use axum::{Router, routing::get};
/// use steadfast::errors::StackError;
///
/// async fn proxy() -> Result<String, StackError> {
///     let err = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
///     Err(err)?
/// }
/// let app: Router = Router::new().route("/", get(proxy));
/// # let _ = app;
/// ```
#[cfg(feature = "axum")]
#[derive(Debug)]
pub struct StackError(pub steadfast_core::BoxError);

#[cfg(feature = "axum")]
impl<E: Into<steadfast_core::BoxError>> From<E> for StackError {
    fn from(e: E) -> Self {
        StackError(e.into())
    }
}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for StackError {
    fn into_response(self) -> axum_core::response::Response {
        http_response::<axum_core::body::Body>(&*self.0).map(axum_core::body::Body::new)
    }
}
