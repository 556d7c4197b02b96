//! The errors of this crate.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use http::header::{HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use steadfast_core::{GrpcCode, PolicyRejected, ResponseBody, grpc_response, http_response};

use crate::state::{FailureSummary, TransitionReason};

/// The breaker refused the call: the upstream is considered down.
///
/// Returned (boxed, behind [`BoxError`](steadfast_core::BoxError)) without touching the inner
/// service. Its [`source`](Error::source) is [`PolicyRejected`], so retry layers neither retry
/// it nor charge their budget.
///
/// ```
/// use std::time::Duration;
/// use steadfast_breaker::error::BreakerOpen;
/// use steadfast_core::PolicyRejected;
///
/// let e = BreakerOpen::new(Some(Duration::from_secs(3)));
/// assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
/// assert!(PolicyRejected::is_in(&e));
/// let res = e.to_http_response::<()>();
/// assert_eq!(res.status(), 503);
/// assert_eq!(res.headers()["retry-after"], "3");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerOpen {
    retry_after: Option<Duration>,
    reason: Option<TransitionReason>,
    last_failure: Option<FailureSummary>,
}

impl BreakerOpen {
    /// A rejection; `retry_after` is how long until a probe may be admitted (`None` when the
    /// breaker was forced open and has no schedule).
    pub const fn new(retry_after: Option<Duration>) -> Self {
        Self {
            retry_after,
            reason: None,
            last_failure: None,
        }
    }

    /// The same rejection, saying what opened the breaker.
    #[must_use]
    pub const fn with_cause(
        mut self,
        reason: Option<TransitionReason>,
        last_failure: Option<FailureSummary>,
    ) -> Self {
        self.reason = reason;
        self.last_failure = last_failure;
        self
    }

    /// How long until a probe may be admitted.
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Why the breaker is open: the rule that tripped it (or `Manual`).
    pub const fn reason(&self) -> Option<TransitionReason> {
        self.reason
    }

    /// The last failure the breaker counted before refusing, in brief (`HTTP 503`,
    /// `timeout`, ...), so a caller can log why it was refused.
    pub const fn last_failure(&self) -> Option<FailureSummary> {
        self.last_failure
    }

    /// The answer a server or gateway gives for this rejection: `503 Service Unavailable` with
    /// `Retry-After` in whole seconds, rounded up.
    pub fn to_http_response<B>(&self) -> Response<ResponseBody<B>> {
        let mut res = http_response(StatusCode::SERVICE_UNAVAILABLE, "circuit open\n");
        if let Some(d) = self.retry_after {
            let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }

    /// The gRPC answer: a trailers-only `UNAVAILABLE`, with `grpc-retry-pushback-ms` when the
    /// time to the next probe is known.
    pub fn to_grpc_response<B>(&self) -> Response<ResponseBody<B>> {
        let mut res = grpc_response(GrpcCode::Unavailable, "circuit open");
        if let Some(d) = self.retry_after {
            res.headers_mut().insert(
                steadfast_core::header::GRPC_RETRY_PUSHBACK_MS,
                steadfast_core::header::encode_pushback(steadfast_core::header::Pushback::After(d)),
            );
        }
        res
    }
}

impl fmt::Display for BreakerOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(d) => write!(f, "circuit open; next probe in {d:?}")?,
            None => f.write_str("circuit forced open")?,
        }
        match (self.reason, self.last_failure) {
            (Some(r), Some(l)) => write!(f, " (opened by {r}; last failure: {l})"),
            (Some(r), None) => write!(f, " (opened by {r})"),
            (None, Some(l)) => write!(f, " (last failure: {l})"),
            (None, None) => Ok(()),
        }
    }
}

impl Error for BreakerOpen {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&PolicyRejected::INSTANCE)
    }
}

/// An invalid breaker configuration; its message says what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidBreakerConfig {
    /// A threshold, window size, minimum or key count of zero.
    Zero(&'static str),
    /// A count outside what the breaker supports.
    OutOfRange {
        /// The setting.
        what: &'static str,
        /// The accepted values, in words.
        range: &'static str,
        /// The value given.
        got: u64,
    },
    /// A duration too short to mean anything (an open time of zero never fails fast).
    TooShort {
        /// The setting.
        what: &'static str,
        /// The shortest accepted value.
        min: Duration,
        /// The value given.
        got: Duration,
    },
    /// A rate outside `1..=100` percent.
    Rate(&'static str, u8),
    /// `max_open_time` shorter than `open_time`.
    OpenTimes,
    /// A configuration under which the breaker could never trip; the text says why.
    NeverTrips(&'static str),
    /// Backpressure asked of a per-key breaker.
    BackpressurePerKey,
    /// An empty breaker name.
    EmptyName,
    /// An exponential open-time growth whose factor is below 1 or not a number.
    OpenTimeGrowth,
    /// A starting state that is not one to start in by hand (`Open`, `HalfOpen`).
    InitialState(crate::BreakerState),
}

impl fmt::Display for InvalidBreakerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zero(what) => write!(f, "breaker {what} must be at least 1"),
            Self::OutOfRange { what, range, got } => {
                write!(f, "breaker {what} must be {range}, got {got}")
            }
            Self::TooShort { what, min, got } => {
                write!(f, "breaker {what} must be at least {min:?}, got {got:?}")
            }
            Self::Rate(what, v) => write!(f, "breaker {what} must be 1-100 %, got {v}"),
            Self::OpenTimes => f.write_str("breaker max_open_time must be >= open_time"),
            Self::NeverTrips(why) => write!(f, "breaker could never trip: {why}"),
            Self::BackpressurePerKey => f.write_str(
                "breaker backpressure works for a single breaker only (poll_ready comes \
                 before the request and its key): turn it off for per-key breakers",
            ),
            Self::EmptyName => f.write_str(
                "breaker name must not be empty (it labels the breaker's events and metrics)",
            ),
            Self::InitialState(state) => write!(
                f,
                "breaker initial_state {state:?} is not a state to start in: use start_open_for(d) to start open, or ForcedOpen, Disabled, MetricsOnly, Closed"
            ),
            Self::OpenTimeGrowth => f.write_str(
                "breaker open_time_growth: an exponential factor must be a number of at least 1 \
                 (1 keeps the open time constant; use OpenTime::Custom for shrinking times)",
            ),
        }
    }
}

impl Error for InvalidBreakerConfig {}
