//! Ready-made client and server stacks with defaults a team could ship.

use std::fmt;
use std::time::Duration;

use steadfast_breaker::InvalidConfig;
use steadfast_retry::InvalidRetryConfig;

/// A preset whose settings do not fit together; the message says what to change.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum PresetError {
    /// The per-attempt timeout is longer than the total timeout.
    AttemptExceedsTotal {
        /// The per-attempt timeout.
        attempt: Duration,
        /// The total timeout.
        total: Duration,
    },
    /// The backoffs the retry policy may wait exceed the total timeout.
    BackoffsExceedTotal {
        /// The sum of the largest backoffs of every retry.
        backoffs: Duration,
        /// The total timeout.
        total: Duration,
    },
    /// A breaker time window shorter than one attempt can never see a slow call end.
    BreakerWindowTooShort {
        /// The window (bucket width × buckets).
        window: Duration,
        /// The per-attempt timeout.
        attempt: Duration,
    },
    /// A timeout of zero.
    ZeroTimeout,
    /// The retry policy is invalid.
    Retry(InvalidRetryConfig),
    /// The breaker policy is invalid.
    Breaker(InvalidConfig),
}

impl fmt::Display for PresetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AttemptExceedsTotal { attempt, total } => write!(
                f,
                "attempt timeout ({attempt:?}) is longer than the total timeout ({total:?}): lower attempt_timeout or raise total_timeout"
            ),
            Self::BackoffsExceedTotal { backoffs, total } => write!(
                f,
                "the retry backoffs can add up to {backoffs:?}, more than the total timeout ({total:?}): lower the backoff cap or max_attempts, or raise total_timeout"
            ),
            Self::BreakerWindowTooShort { window, attempt } => write!(
                f,
                "the breaker's time window ({window:?}) is shorter than one attempt ({attempt:?}): widen the window so slow calls land in it"
            ),
            Self::ZeroTimeout => f.write_str("timeouts must be longer than zero"),
            Self::Retry(e) => write!(f, "retry: {e}"),
            Self::Breaker(e) => write!(f, "breaker: {e}"),
        }
    }
}

impl std::error::Error for PresetError {}

impl From<InvalidRetryConfig> for PresetError {
    fn from(e: InvalidRetryConfig) -> Self {
        Self::Retry(e)
    }
}

impl From<InvalidConfig> for PresetError {
    fn from(e: InvalidConfig) -> Self {
        Self::Breaker(e)
    }
}
