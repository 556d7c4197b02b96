//! The errors of this crate.

use std::error::Error;
use std::fmt;
use std::time::Duration;

/// The call did not finish within its limit.
///
/// Returned (boxed, behind [`BoxError`](steadfast_core::BoxError)) by the client-side
/// [`Timeout`](crate::Timeout). Downcast to inspect which limit fired.
///
/// ```
/// use std::time::Duration;
/// use steadfast_timeout::error::Elapsed;
///
/// let e = Elapsed::new(Duration::from_secs(5), false);
/// assert_eq!(e.to_string(), "request timed out after 5s");
/// let boxed: steadfast_core::BoxError = e.into();
/// assert_eq!(boxed.downcast_ref::<Elapsed>().unwrap().limit(), Duration::from_secs(5));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elapsed {
    limit: Duration,
    inherited: bool,
    idle: bool,
}

impl Elapsed {
    /// An `Elapsed` for `limit`; `inherited` says the limit came from an inherited deadline
    /// (ambient or a [`Deadline`](steadfast_core::Deadline) extension) rather than this layer.
    pub const fn new(limit: Duration, inherited: bool) -> Self {
        Self {
            limit,
            inherited,
            idle: false,
        }
    }

    /// A response body that waited longer than `limit` for its next frame (see
    /// [`BodyTimeoutBuilder::idle`](crate::BodyTimeoutBuilder::idle)).
    pub const fn idle(limit: Duration) -> Self {
        Self {
            limit,
            inherited: false,
            idle: true,
        }
    }

    /// Whether the idle limit between body frames fired, rather than the call's deadline.
    pub const fn is_idle(&self) -> bool {
        self.idle
    }

    /// The limit that fired: the layer's own (or a per-request override), or the time that was
    /// left of an inherited deadline when the call started.
    pub const fn limit(&self) -> Duration {
        self.limit
    }

    /// Whether the limit came from an inherited deadline.
    pub const fn is_inherited(&self) -> bool {
        self.inherited
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.idle {
            write!(f, "response body idle for {:?}", self.limit)
        } else if self.inherited {
            write!(
                f,
                "inherited deadline exceeded ({:?} were left)",
                self.limit
            )
        } else {
            write!(f, "request timed out after {:?}", self.limit)
        }
    }
}

/// Its source is [`TimedOut`](steadfast_core::TimedOut), so code that knows no timeout type
/// can tell a timeout ([`error_type`](steadfast_core::error_type) says `timeout`).
impl Error for Elapsed {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&steadfast_core::TimedOut::INSTANCE)
    }
}

/// A timeout builder was given a setting that cannot work; the message says what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidTimeoutConfig {
    /// An idle limit of zero between body frames.
    ZeroIdle,
    /// A server answer on expiry that is not an error status.
    StatusNotAnError(http::StatusCode),
    /// A deadline header whose value the protocol, a credential or another layer owns.
    ReservedHeader(http::HeaderName),
}

impl fmt::Display for InvalidTimeoutConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroIdle => f.write_str(
                "body idle limit is zero, which would end every body at its first wait: \
                 give a positive limit, or None to turn the idle limit off",
            ),
            Self::StatusNotAnError(s) => write!(
                f,
                "status {s} answered on an expired deadline is not an error: \
                 use a 4xx or 5xx status (default 504)"
            ),
            Self::ReservedHeader(name) => write!(
                f,
                "deadline header {name} is owned by the protocol, a credential or another layer: \
                 pick another name (default x-request-timeout-ms)"
            ),
        }
    }
}

impl Error for InvalidTimeoutConfig {}
