//! Resilient microservice calls as tower middleware.
//!
//! steadfast gives Rust services calls that survive flaky upstreams without retry storms,
//! fail fast when a dependency is down, never hang, and can be traced across hops by one id.
//! Each concern is a plain tower `Layer` in its own crate, re-exported here behind a feature:
//!
//! | feature | crate | layer |
//! |---|---|---|
//! | `retry` | `steadfast-retry` (`steadfast::retry`) | `RetryLayer` |
//! | `breaker` | `steadfast-breaker` (`steadfast::breaker`) | `CircuitBreakerLayer` |
//! | `timeout` | `steadfast-timeout` (`steadfast::timeout`) | `TimeoutLayer` |
//! | `correlation` | `steadfast-correlation` (`steadfast::correlation`) | `SetCorrelationIdLayer` |
//! | `balance` | `steadfast-balance` (`steadfast::balance`) | `BalanceLayer` |
//! | `consul` | the balancer's Consul source (`steadfast::balance::Consul`) | |
//! | `dns` | the balancer's DNS source (`steadfast::balance::Dns`) | |
//! | `limit` | `steadfast-limit` (`steadfast::limit`) | `ConcurrencyLimitLayer` |
//! | `full` (default) | all of the above, plus the `client` and `server` presets | |
//! | `tonic` | the gRPC client preset (`client::grpc`) for a tonic `Channel`, and `grpc_status` (the stack's errors as tonic statuses) | |
//! | `metrics` | counters and histograms from every layer through the `metrics` facade (see `docs/observability.md`) | |
//!
//! The shared foundation — outcome classification, header codecs, the ambient deadline — is
//! [`common`] (`steadfast-core`), always available (named apart from the built-in `core`
//! crate, which it would shadow).
//!
//! # Stack order
//!
//! A client stack, outermost first:
//!
//! ```text
//! CorrelationId   copy the ambient id onto the outgoing request
//!   Timeout       total budget for the call incl. retries and the response body;
//!                 min(own, inherited deadline)
//!     Throttle    (optional, `limit::ThrottleLayer`) refuse locally a share of calls
//!                 that the upstream keeps refusing
//!       Retry     classify, budget, backoff + full jitter, Retry-After, replay body
//!         Balance (optional) pick an endpoint of a service
//!           ConcurrencyLimit (optional, `limit::ConcurrencyLimitLayer`) at most N
//!                 in flight, fixed or adaptive
//!             Breaker   per upstream authority; fail fast when open
//!               Timeout per attempt
//!                 transport (hyper-util client, tonic Channel)
//! ```
//!
//! The presets (`client::http()`) build the layers without the optional ones; add a throttle
//! or a limit with `ServiceBuilder` around or under a preset's stack.
//!
//! A server stack, outermost first:
//!
//! ```text
//! CorrelationId   accept a valid inbound id or generate one; ambient for the handler
//!   Timeout       inbound grpc-timeout / deadline header, min with own; answers 504 / DEADLINE_EXCEEDED
//!     axum Router | tonic service
//! ```
//!
//! # Example
//!
//! ```
//! use steadfast::common::{Classify, DefaultClassifier, ResponseClass};
//!
//! let res = http::Response::builder().status(503).body(()).unwrap();
//! let ResponseClass::Ready(class) = DefaultClassifier::new().classify_response(&res) else {
//!     unreachable!()
//! };
//! assert!(class.is_failure() && class.is_retryable());
//! ```
//!
//! # Minimum supported Rust version
//!
//! 1.85, checked in CI by clippy's `incompatible_msrv` lint against the declared
//! `rust-version`.

#[doc(inline)]
pub use steadfast_core as common;

#[cfg(feature = "balance")]
#[doc(inline)]
pub use steadfast_balance as balance;
#[cfg(feature = "breaker")]
#[doc(inline)]
pub use steadfast_breaker as breaker;
#[cfg(feature = "correlation")]
#[doc(inline)]
pub use steadfast_correlation as correlation;
#[cfg(feature = "limit")]
#[doc(inline)]
pub use steadfast_limit as limit;
#[cfg(feature = "retry")]
#[doc(inline)]
pub use steadfast_retry as retry;
#[cfg(feature = "timeout")]
#[doc(inline)]
pub use steadfast_timeout as timeout;

/// Describes every metric the enabled layers report (help text and unit) to the installed
/// recorder: call it once after installing the recorder, so an exporter such as
/// Prometheus's prints `# HELP` and unit lines. Lists are in `docs/observability.md`.
///
/// ```
/// steadfast::describe_metrics(); // without a recorder: nothing happens
/// ```
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    #[cfg(feature = "retry")]
    steadfast_retry::describe_metrics();
    #[cfg(feature = "breaker")]
    steadfast_breaker::describe_metrics();
    #[cfg(feature = "timeout")]
    steadfast_timeout::describe_metrics();
    #[cfg(feature = "balance")]
    steadfast_balance::describe_metrics();
    #[cfg(feature = "limit")]
    steadfast_limit::describe_metrics();
}

mod builder;
#[cfg(feature = "full")]
pub mod client;
pub mod errors;
#[cfg(feature = "tonic")]
pub mod grpc_status;
#[cfg(feature = "full")]
mod preset;
mod propagate;
#[cfg(feature = "full")]
pub mod server;

pub use builder::ServiceBuilderExt;
#[cfg(feature = "full")]
pub use preset::InvalidPresetConfig;
pub use propagate::{propagate, spawn};

/// The README's code blocks, compiled and run as doctests.
#[cfg(all(doctest, feature = "tonic"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
