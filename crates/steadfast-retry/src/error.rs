use std::error::Error;
use std::fmt;

/// An invalid retry configuration, reported when the layer is built.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidRetryConfig {
    /// `max_attempts` was 0 (1 means "no retry").
    ZeroAttempts,
    /// The backoff cap is below its base.
    BackoffCapBelowBase,
    /// The budget ratio is negative or not a number.
    BudgetRatio,
}

impl fmt::Display for InvalidRetryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroAttempts => f.write_str("max_attempts must be at least 1 (1 = no retry)"),
            Self::BackoffCapBelowBase => f.write_str("backoff cap must be >= its base delay"),
            Self::BudgetRatio => f.write_str("budget ratio must be a non-negative number"),
        }
    }
}

impl Error for InvalidRetryConfig {}
