//! Safe, budgeted, hint-aware retries for tower that work with real HTTP bodies.
//!
//! - **Safe by default**: only idempotent methods (or requests with an `Idempotency-Key`) are
//!   retried once they may have reached the server; any request that certainly was not sent
//!   (connection refused, DNS failure, connect timeout) may be retried. A non-idempotent
//!   request is never sent twice unless the caller opted in.
//! - **Budgeted by default**: a race-free, shared [`Budget`] keeps retries to about 10 % of
//!   recent traffic plus a small floor, so a failing upstream does not face a retry storm.
//! - **Hint-aware**: `Retry-After` (seconds or HTTP-date) and `grpc-retry-pushback-ms` replace
//!   the backoff, up to a cap; a longer hint, a negative pushback or a wait past the deadline
//!   returns the last outcome at once. After a hint the backoff starts again from its base.
//!   Several fields of one hint header: the longest wait wins, and any pushback that says
//!   stop stops ([`server_hint`](steadfast_core::header::server_hint)).
//! - **A retry costs a budget token only once it is sent**: a caller that gives up during the
//!   backoff gets the token back.
//! - **Bodies that are not `Clone`**: [`ReplayBody`] records what the first attempt sends (up
//!   to 64 KiB) and replays data and trailers identically. Bodies already whole in memory
//!   (`Full<Bytes>`, `String`) skip the recording: each attempt sends a clone of the same
//!   `Bytes`, with no allocation.
//! - **Jitter per request**: exponential backoff with full, equal, decorrelated or no
//!   [`Jitter`]; every request draws from its own seedable random stream.
//! - **Hedged requests** ([`HedgeLayer`]): once a call has taken longer than most (a learnt
//!   percentile, or a fixed delay), a second attempt races it and the first acceptable answer
//!   wins. Capped at a share of the calls (5 %), sharing a retry budget if given, never past
//!   the deadline, only for requests that may be sent twice, with the same replay body (two
//!   attempts read one recording at once); under a balancer each hedge goes to another
//!   endpoint.
//!
//! Where it sits in a client stack:
//!
//! ```text
//! CorrelationId
//!   Timeout (total)        <- the deadline the retry layer respects
//!     Retry                <- this crate
//!       CircuitBreaker     <- an open breaker's rejection is not retried and costs no budget
//!         Timeout (per attempt)
//!           transport
//! ```
//!
//! # Events
//!
//! `tracing` events on target `steadfast::retry`: `retry.attempt` (attempt, delay_ms, status,
//! error, budget_left), `retry.budget_exhausted` (attempt), `retry.gave_up` (attempt, reason:
//! `attempts_exhausted`, `not_idempotent`, `body_not_replayable`, `server_pushback_stop`,
//! `server_hint_over_cap`, `predicate`, `deadline`, `policy_rejected`).
//!
//! On target `steadfast::hedge`: `hedge.sent` (attempt, after_ms), `hedge.won` (attempts),
//! `hedge.stopped` (attempt, reason: `max_extra_load`, `retry_budget`, `deadline`,
//! `policy_rejected`, `body_not_replayable`, `server_pushback_stop`, `server_hint_over_cap`,
//! `service_failed`). Each hedge runs in an `attempt` span like a retry's.

mod backoff;
mod budget;
pub mod error;
pub mod future;
mod header;
mod hedge;
mod layer;
mod policy;
mod replay;
mod service;
mod throttle;

pub use backoff::{Backoff, CustomSchedule, Jitter};
pub use budget::{Budget, BudgetConfig};
pub use header::{ATTEMPT_HEADER, GRPC_PREVIOUS_ATTEMPTS, IDEMPOTENCY_KEY};
pub use hedge::layer::{HedgeBuilder, HedgeDelay, HedgeLayer};
pub use hedge::service::Hedge;
pub use layer::{RetryBuilder, RetryLayer, RetryPredicate};
pub use replay::{DEFAULT_REPLAY_CAP, ReplayBody};
pub use service::Retry;
pub use throttle::ThrottleConfig;

/// Describes this crate's metrics to the installed recorder (help text and unit, which
/// exporters such as Prometheus's print): call it once after installing the recorder.
///
/// ```
/// steadfast_retry::describe_metrics(); // without a recorder: nothing happens
/// ```
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "steadfast_retry_attempts_total",
        Unit::Count,
        "Retries sent: attempts after a call's first, counted when sent (label retry: the layer's name)."
    );
    describe_counter!(
        "steadfast_retry_rerouted_total",
        Unit::Count,
        "Attempts sent again at once because an endpoint refused them before they left (not retries)."
    );
    describe_histogram!(
        "steadfast_retry_backoff_seconds",
        Unit::Seconds,
        "Each wait before a retry, one observation per wait (label source: backoff or server_hint)."
    );
    describe_counter!(
        "steadfast_retry_budget_exhausted_total",
        Unit::Count,
        "Retries the retry budget refused; the caller got the last outcome."
    );
    describe_counter!(
        "steadfast_retry_gave_up_total",
        Unit::Count,
        "Retryable outcomes not retried, by reason."
    );
    describe_counter!(
        "steadfast_hedge_sent_total",
        Unit::Count,
        "Hedges sent: attempts a hedge layer added while an earlier attempt of the call ran or after a retryable answer."
    );
    describe_counter!(
        "steadfast_hedge_won_total",
        Unit::Count,
        "Calls whose answer came from a hedge rather than the first attempt."
    );
    describe_counter!(
        "steadfast_hedge_budget_exhausted_total",
        Unit::Count,
        "Hedges not sent because the share of extra load or the shared retry budget was spent."
    );
    describe_gauge!(
        "steadfast_retry_budget_tokens",
        Unit::Count,
        "Tokens left in the retry budget, set whenever a retry asks the budget."
    );
}
