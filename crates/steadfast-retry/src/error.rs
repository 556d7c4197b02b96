//! The errors of this crate.

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
    /// The budget ratio is negative, over 1000 or not a finite number.
    BudgetRatio,
    /// The budget deposits nothing (ratio 0) and has no floor (`min_per_sec` 0): no retry
    /// could ever be paid for.
    BudgetNeverPays,
    /// The budget's window is shorter than its 10 ms tick.
    BudgetWindow,
    /// An empty layer name.
    EmptyName,
    /// An attempt header whose value the protocol, a credential or another layer owns.
    ReservedHeader(http::HeaderName),
    /// A gRPC retry throttle outside what A6 allows; the text says which setting.
    Throttle(&'static str),
}

impl fmt::Display for InvalidRetryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroAttempts => f.write_str("max_attempts must be at least 1 (1 = no retry)"),
            Self::BackoffCapBelowBase => f.write_str(
                "backoff cap must be >= its base delay: raise the cap or lower the base",
            ),
            Self::BudgetRatio => {
                f.write_str("budget ratio must be a finite number from 0 to 1000 (0.1 = 10 %)")
            }
            Self::BudgetNeverPays => f.write_str(
                "budget ratio and min_per_sec are both 0, so no retry could ever be paid for: \
                 raise one, or turn the budget off with budget(None)",
            ),
            Self::BudgetWindow => {
                f.write_str("budget window must be at least 10 ms (its tick): raise the window")
            }
            Self::ReservedHeader(name) => write!(
                f,
                "attempt_header {name} is owned by the protocol, a credential or another layer: pick another name (or None)"
            ),
            Self::Throttle(what) => write!(f, "grpc_throttling: {what}"),
            Self::EmptyName => f.write_str(
                "retry layer name must not be empty (it labels the layer's events and metrics)",
            ),
        }
    }
}

impl Error for InvalidRetryConfig {}

/// An invalid hedging configuration, reported when the layer is built.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidHedgeConfig {
    /// `max_attempts` was 0 or more than 5 (gRPC A6's cap).
    Attempts,
    /// The percentile was not above 0 and at most 1.
    Percentile,
    /// The share of extra load was not above 0 and at most 1.
    ExtraLoad,
    /// `min_samples` was 0.
    MinSamples,
    /// The learning window was shorter than 10 ms.
    Window,
    /// An empty layer name.
    EmptyName,
    /// An attempt header whose value the protocol, a credential or another layer owns.
    ReservedHeader(http::HeaderName),
}

impl fmt::Display for InvalidHedgeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Attempts => f.write_str(
                "hedge max_attempts must be 1 to 5 (1 = no hedge; gRPC A6 caps attempts at 5)",
            ),
            Self::Percentile => {
                f.write_str("hedge percentile must be above 0 and at most 1 (0.95 = the 95th)")
            }
            Self::ExtraLoad => f.write_str(
                "max_extra_load must be above 0 and at most 1 (0.05 = hedges add at most 5 %)",
            ),
            Self::MinSamples => f.write_str("hedge min_samples must be at least 1"),
            Self::Window => f.write_str("hedge learning window must be at least 10 ms"),
            Self::EmptyName => f.write_str(
                "hedge layer name must not be empty (it labels the layer's events and metrics)",
            ),
            Self::ReservedHeader(name) => write!(
                f,
                "attempt_header {name} is owned by the protocol, a credential or another layer: pick another name (or None)"
            ),
        }
    }
}

impl Error for InvalidHedgeConfig {}

pub use crate::replay::ReplayLost;

/// A retry was decided, but the service below was still not ready to take it when the
/// call's deadline came: nothing more was sent, and the earlier attempt's outcome is gone
/// (it was released for the retry). Its [`source`](Error::source) is
/// [`TimedOut`](steadfast_core::TimedOut), so it classifies as a timeout.
///
/// Only a call with a deadline (an ambient [`Deadline`](steadfast_core::Deadline)) can end
/// this way; without one, a retry waits for the service below as long as it takes. A
/// timeout above that owns the deadline (the client stack's total) ends the call first, with
/// its own error: this one is for a deadline nothing above enforces, such as one a caller
/// set with [`Deadline::scope`](steadfast_core::Deadline::scope).
///
/// ```
/// use steadfast_core::TimedOut;
/// use steadfast_retry::error::NotReadyByDeadline;
///
/// # fn check(err: &(dyn std::error::Error + 'static)) {
/// if let Some(e) = err.downcast_ref::<NotReadyByDeadline>() {
///     assert!(TimedOut::is_in(e));
///     println!("attempt {} was never sent", e.attempt());
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotReadyByDeadline {
    attempt: u32,
}

impl NotReadyByDeadline {
    pub(crate) fn new(attempt: u32) -> Self {
        Self { attempt }
    }

    /// The number of the attempt that was never sent (2 for the first retry).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

impl fmt::Display for NotReadyByDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the call's deadline passed while the service below was not ready for attempt {}",
            self.attempt
        )
    }
}

impl Error for NotReadyByDeadline {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&steadfast_core::TimedOut::INSTANCE)
    }
}
