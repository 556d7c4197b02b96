//! Ready-made client and server stacks with defaults a team could ship.

use std::fmt;
use std::time::Duration;

use steadfast_balance::error::InvalidBalanceConfig;
use steadfast_breaker::error::InvalidBreakerConfig;
use steadfast_correlation::error::InvalidCorrelationConfig;
use steadfast_retry::error::InvalidRetryConfig;
use steadfast_timeout::error::InvalidTimeoutConfig;

/// A preset whose settings do not fit together; the message says what to change.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum InvalidPresetConfig {
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
    /// A slow-call threshold the attempt timeout cuts off first: no call could ever count
    /// as slow.
    SlowCallsUnreachable {
        /// The breaker's slow-call threshold.
        threshold: std::time::Duration,
        /// The per-attempt timeout.
        attempt: std::time::Duration,
    },
    /// Two layers of the stack would write their values into one header (a deadline into
    /// the correlation id's header, an attempt number into the deadline's).
    HeaderClash {
        /// The header.
        header: http::HeaderName,
        /// What one layer writes there.
        first: &'static str,
        /// What the other layer writes there.
        second: &'static str,
    },
    /// A timeout of zero.
    ZeroTimeout,
    /// The retry policy is invalid.
    Retry(InvalidRetryConfig),
    /// The breaker policy is invalid.
    Breaker(InvalidBreakerConfig),
    /// A timeout setting is invalid (a zero body idle limit).
    Timeout(InvalidTimeoutConfig),
    /// A correlation setting is invalid (a header the protocol owns).
    Correlation(InvalidCorrelationConfig),
    /// A balancer setting is invalid (an endpoint that is not `host:port`, ...).
    Balance(InvalidBalanceConfig),
}

impl fmt::Display for InvalidPresetConfig {
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
            Self::SlowCallsUnreachable { threshold, attempt } => write!(
                f,
                "the breaker's slow-call threshold ({threshold:?}) is not below the attempt timeout ({attempt:?}), so no call could count as slow: lower the threshold or raise attempt_timeout"
            ),
            Self::HeaderClash {
                header,
                first,
                second,
            } => write!(
                f,
                "header {header} would carry both the {first} and the {second}: give one of them another header"
            ),
            Self::ZeroTimeout => f.write_str(
                "timeouts must be longer than zero: give attempt_timeout and total_timeout (or the server timeout) a positive value",
            ),
            Self::Retry(e) => write!(f, "retry: {e}"),
            Self::Breaker(e) => write!(f, "breaker: {e}"),
            Self::Timeout(e) => write!(f, "timeout: {e}"),
            Self::Correlation(e) => write!(f, "correlation: {e}"),
            Self::Balance(e) => write!(f, "balance: {e}"),
        }
    }
}

impl std::error::Error for InvalidPresetConfig {
    /// The layer's own error, for the variants that wrap one.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Retry(e) => Some(e),
            Self::Breaker(e) => Some(e),
            Self::Timeout(e) => Some(e),
            Self::Correlation(e) => Some(e),
            Self::Balance(e) => Some(e),
            _ => None,
        }
    }
}

impl From<InvalidRetryConfig> for InvalidPresetConfig {
    fn from(e: InvalidRetryConfig) -> Self {
        Self::Retry(e)
    }
}

impl From<InvalidBreakerConfig> for InvalidPresetConfig {
    fn from(e: InvalidBreakerConfig) -> Self {
        Self::Breaker(e)
    }
}

impl From<InvalidTimeoutConfig> for InvalidPresetConfig {
    fn from(e: InvalidTimeoutConfig) -> Self {
        Self::Timeout(e)
    }
}

impl From<InvalidCorrelationConfig> for InvalidPresetConfig {
    fn from(e: InvalidCorrelationConfig) -> Self {
        Self::Correlation(e)
    }
}

impl From<InvalidBalanceConfig> for InvalidPresetConfig {
    fn from(e: InvalidBalanceConfig) -> Self {
        Self::Balance(e)
    }
}

/// Refuses two layers of one stack writing into one header: `headers` lists what each layer
/// writes and where.
pub(crate) fn check_clashes(
    headers: &[(Option<&http::HeaderName>, &'static str)],
) -> Result<(), InvalidPresetConfig> {
    for (i, (a, first)) in headers.iter().enumerate() {
        for (b, second) in &headers[i + 1..] {
            if let (Some(a), Some(b)) = (a, b) {
                if a == b {
                    return Err(InvalidPresetConfig::HeaderClash {
                        header: (*a).clone(),
                        first,
                        second,
                    });
                }
            }
        }
    }
    Ok(())
}
