//! A lock-free circuit breaker for tower, with true sliding windows and per-host breakers.
//!
//! - [`CircuitBreakerLayer`]: one breaker shared by every service made from the layer value.
//!   Closed, Open, HalfOpen, plus Disabled, ForcedOpen and MetricsOnly by hand
//!   ([`BreakerHandle`]).
//! - Trip policies: consecutive failures (default 5, the seed's), failure rate over a true
//!   count window (the last N calls) or a time window (a ring of buckets), slow-call rate;
//!   they combine. O(1) per call, atomics only.
//! - Open time 30 s, growing with jitter on consecutive trips, capped; a `Retry-After` or
//!   `grpc-retry-pushback-ms` on the failure that trips it can raise it.
//! - Half-open admits exactly N probes (default 1); a dropped probe gives its permit back.
//! - [`KeyedCircuitBreakerLayer`]: one breaker per upstream authority (or any key), bounded,
//!   with idle eviction.
//! - What a failure is comes from [`steadfast_core::Classify`]: gRPC responses whose status
//!   arrives in trailers are judged at end of stream ([`BreakerBody`]). An answer the upstream
//!   marked as shed ([`Class::overloaded`](steadfast_core::Class::overloaded): busy, not
//!   broken) counts neither as a failure nor as a success; a probe so answered hands its
//!   permit to the next call.
//!
//! # Pinned semantics
//!
//! 1. Open → HalfOpen at `now >= opened_at + open_time`.
//! 2. N successful probes close; any probe failure re-opens with the next, longer open time.
//! 3. A probe that never reports returns its permit when dropped; a HalfOpen breaker with no
//!    verdict within the open time re-opens.
//! 4. Every transition bumps a generation; outcomes of calls admitted under an earlier
//!    generation never decide the current state.
//!
//! The state machine's atomics are checked with [loom](https://docs.rs/loom) models over
//! every interleaving (`src/state/loom_model.rs`; run in CI): at most N probes, no lost
//! permit, one trip per generation, the open time announced is the one in force, stale
//! outcomes have no effect, window totals never wrap.
//!
//! # Performance
//!
//! The closed path takes no lock and allocates nothing, and threads sharing one breaker do
//! not contend on a shared counter while calls succeed: two threads on one breaker run at
//! twice the calls per second of one (the README's benchmark tables).
//!
//! # Answering instead of failing
//!
//! On a server, [`CircuitBreakerLayer::answering`] answers `503` + `Retry-After` (HTTP) or a
//! trailers-only `UNAVAILABLE` (gRPC) and keeps the inner error type. Gateways that call
//! through a client stack turn [`BreakerOpen`](error::BreakerOpen) into the same answers with
//! [`BreakerOpen::to_http_response`](error::BreakerOpen::to_http_response) / [`BreakerOpen::to_grpc_response`](error::BreakerOpen::to_grpc_response).

mod answer;
mod breaker;
pub mod error;
pub mod future;
mod handle;
mod keyed;
mod layer;
mod service;
mod state;
mod sync;
mod window;

pub use answer::{AnsweringBreaker, AnsweringBreakerLayer};
pub use future::BreakerBody;
pub use handle::{BreakerHandle, KeyedTransitions, Metrics, Transitions, WindowRate};
pub use layer::{CircuitBreakerBuilder, CircuitBreakerLayer, KeyedCircuitBreakerLayer};
pub use service::{CircuitBreaker, KeyedCircuitBreaker};
pub use state::{BreakerState, FailureSummary, OpenTime, Transition, TransitionReason};
pub use steadfast_core::key::{ByAuthority, ExtractKey, UpstreamKey as BreakerKey};
pub use window::WindowCounts;

/// Describes this crate's metrics to the installed recorder (help text and unit, which
/// exporters such as Prometheus's print): call it once after installing the recorder.
///
/// ```
/// steadfast_breaker::describe_metrics(); // without a recorder: nothing happens
/// ```
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "steadfast_breaker_transitions_total",
        Unit::Count,
        "Breaker state changes (labels breaker, upstream, from, to)."
    );
    describe_counter!(
        "steadfast_breaker_rejected_total",
        Unit::Count,
        "Calls a breaker failed fast without calling its upstream."
    );
    describe_gauge!(
        "steadfast_breaker_state",
        Unit::Count,
        "1 for the state a breaker is in, 0 for the states it left (label state)."
    );
    describe_histogram!(
        "steadfast_breaker_call_duration_seconds",
        Unit::Seconds,
        "Duration of each call a breaker let through, by outcome (success or failure as the breaker classifies it, or shed: an answer the upstream marked as shed, counted neither way)."
    );
}
