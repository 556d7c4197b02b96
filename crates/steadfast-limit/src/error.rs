//! The errors of this crate.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use http::header::{HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use steadfast_core::{
    GrpcCode, OVERLOADED, PolicyRejected, ResponseBody, grpc_response, http_response,
};

/// The limit refused the call: as many calls as it allows were in flight, and no permit came
/// free within the wait (if the layer waits at all).
///
/// Returned (boxed, behind [`BoxError`](steadfast_core::BoxError)) without touching the inner
/// service: the request was not sent. Its [`source`](Error::source) is [`PolicyRejected`], so
/// steadfast's retry layer neither retries it nor charges its budget.
///
/// ```
/// use std::time::Duration;
/// use steadfast_core::PolicyRejected;
/// use steadfast_limit::error::LimitExceeded;
///
/// let e = LimitExceeded::new(8, Duration::ZERO);
/// assert_eq!(e.limit(), 8);
/// assert!(PolicyRejected::is_in(&e));
/// let res = e.to_http_response::<()>();
/// assert_eq!(res.status(), 503);
/// assert_eq!(res.headers()["retry-after"], "1");
/// assert_eq!(res.headers()["x-envoy-overloaded"], "true"); // shed: no breaker counts it
/// assert_eq!(e.to_grpc_response::<()>().headers()["grpc-status"], "8"); // RESOURCE_EXHAUSTED
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitExceeded {
    limit: u32,
    waited: Duration,
}

impl LimitExceeded {
    /// A refusal under `limit`, after waiting `waited` for a permit.
    pub const fn new(limit: u32, waited: Duration) -> Self {
        Self { limit, waited }
    }

    /// The limit in force when the call was refused.
    pub const fn limit(&self) -> u32 {
        self.limit
    }

    /// How long the call waited for a permit (zero when the layer refuses at once).
    pub const fn waited(&self) -> Duration {
        self.waited
    }

    /// The answer a server gives for this refusal: `503 Service Unavailable` with
    /// `Retry-After: 1` (a permit usually comes free within a second; the header keeps
    /// well-behaved clients from retrying at once) and `x-envoy-overloaded: true`
    /// ([`OVERLOADED`]): the request was shed, not processed, so callers' breakers do not
    /// count it as a failure.
    pub fn to_http_response<B>(&self) -> Response<ResponseBody<B>> {
        shed(http_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded\n",
        ))
    }

    /// The gRPC answer: a trailers-only `RESOURCE_EXHAUSTED` (which gRPC clients do not retry
    /// unless their policy says so), marked as shed ([`OVERLOADED`]) as the HTTP answer is.
    pub fn to_grpc_response<B>(&self) -> Response<ResponseBody<B>> {
        let mut res = grpc_response(GrpcCode::ResourceExhausted, "overloaded");
        res.headers_mut()
            .insert(OVERLOADED, HeaderValue::from_static("true"));
        res
    }
}

impl fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "concurrency limit of {} reached", self.limit)?;
        if !self.waited.is_zero() {
            write!(f, " (waited {:?})", self.waited)?;
        }
        Ok(())
    }
}

impl Error for LimitExceeded {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&PolicyRejected::INSTANCE)
    }
}

/// The throttle refused the call locally: the upstream has refused so many of this client's
/// recent calls that this one was dropped before it was sent, with the probability given.
///
/// Its [`source`](Error::source) is [`PolicyRejected`], so steadfast's retry layer neither
/// retries it nor charges its budget, and a breaker does not count it.
///
/// ```
/// use steadfast_core::PolicyRejected;
/// use steadfast_limit::error::Throttled;
///
/// let e = Throttled::new(0.5);
/// assert_eq!(e.probability(), 0.5);
/// assert!(PolicyRejected::is_in(&e));
/// assert_eq!(e.to_http_response::<()>().status(), 503);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throttled {
    probability: f64,
}

impl Throttled {
    /// A local refusal made with `probability`.
    pub const fn new(probability: f64) -> Self {
        Self { probability }
    }

    /// The probability of refusal in force when the call was refused.
    pub const fn probability(&self) -> f64 {
        self.probability
    }

    /// The answer a gateway gives for this refusal: `503 Service Unavailable` with
    /// `Retry-After: 1` and `x-envoy-overloaded: true` ([`OVERLOADED`]): the request was shed,
    /// so its callers' breakers do not count it as a failure.
    pub fn to_http_response<B>(&self) -> Response<ResponseBody<B>> {
        shed(http_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream overloaded\n",
        ))
    }
}

/// `res` with `Retry-After: 1` and the shed marker.
fn shed<B>(mut res: Response<ResponseBody<B>>) -> Response<ResponseBody<B>> {
    let headers = res.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(OVERLOADED, HeaderValue::from_static("true"));
    res
}

impl fmt::Display for Throttled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "throttled locally: the upstream refuses this client's calls (refusing {:.0} % here)",
            self.probability * 100.0
        )
    }
}

impl Error for Throttled {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&PolicyRejected::INSTANCE)
    }
}

/// An invalid limit configuration; its message says what to change.
///
/// ```
/// use steadfast_limit::{ConcurrencyLimitLayer, error::InvalidLimitConfig};
///
/// let err = ConcurrencyLimitLayer::builder().max(0).build().unwrap_err();
/// assert_eq!(err, InvalidLimitConfig::Zero("max"));
/// assert!(err.to_string().contains("at least 1"));
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum InvalidLimitConfig {
    /// A limit (fixed, initial, floor or ceiling) of zero.
    Zero(&'static str),
    /// An adaptive limit whose floor is above its ceiling, or whose initial limit is outside
    /// them.
    Bounds {
        /// The initial limit.
        initial: u32,
        /// The floor.
        min: u32,
        /// The ceiling.
        max: u32,
    },
    /// A factor outside its range (backoff in (0, 1), smoothing in (0, 1], tolerance ≥ 1,
    /// Vegas's alpha and beta positive and finite with alpha ≤ beta).
    Factor {
        /// The setting.
        name: &'static str,
        /// The value given.
        value: f64,
    },
}

impl fmt::Display for InvalidLimitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zero(what) => write!(f, "concurrency limit: `{what}` must be at least 1"),
            Self::Bounds { initial, min, max } => write!(
                f,
                "concurrency limit: need min ≤ initial ≤ max, got min {min}, initial {initial}, max {max}"
            ),
            Self::Factor { name, value } => write!(
                f,
                "concurrency limit: `{name}` = {value} is out of range (backoff in (0, 1), smoothing in (0, 1], tolerance ≥ 1, alpha and beta positive and finite with alpha ≤ beta)"
            ),
        }
    }
}

impl Error for InvalidLimitConfig {}
