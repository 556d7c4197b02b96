//! Concurrency limits for [tower](https://docs.rs/tower): at most N calls in flight, where N is
//! fixed or follows the upstream's latency and overload signals, and a call over the limit is
//! refused at once or waits a bounded time.
//!
//! - [`ConcurrencyLimitLayer::new`]`(max)`: a fixed limit that refuses the next call at once
//!   with [`LimitExceeded`](error::LimitExceeded) (tower's `ConcurrencyLimit` only waits).
//! - [`ConcurrencyLimitLayer::builder`]: an adaptive limit — [`Vegas`] (the default),
//!   [`Gradient2`] or [`Aimd`], after Netflix's concurrency-limits — with a floor and a ceiling,
//!   and [`wait_up_to`](ConcurrencyLimitBuilder::wait_up_to) for a bounded, first-come
//!   first-served wait that never outlives the call's [`Deadline`](steadfast_core::Deadline).
//! - [`per_authority`](ConcurrencyLimitBuilder::per_authority) /
//!   [`per_key`](ConcurrencyLimitBuilder::per_key): one such limit per upstream (or any key of
//!   the request), in a bounded map ([`KeyedConcurrencyLimitLayer`]), so that one slow
//!   upstream fills its own limit and not the others'.
//! - [`ConcurrencyLimitLayer::answering`]: the same limit in front of a server, answering `503`
//!   with `Retry-After` or gRPC `RESOURCE_EXHAUSTED` instead of failing (load shedding), with
//!   the inner service's error type kept (axum's `Infallible`). Its answers, and the
//!   throttle's, carry `x-envoy-overloaded` ([`OVERLOADED`](steadfast_core::OVERLOADED)):
//!   the request was shed, not processed, so callers' breakers count them neither way.
//! - [`ThrottleLayer`]: client-side adaptive throttling (the SRE book's): a client whose
//!   upstream refuses more and more of its calls refuses a share of them itself, with
//!   [`Throttled`](error::Throttled), so the upstream sees its load fall before it recovers.
//!
//! # What a call holds
//!
//! A call holds its permit from admission until its response body ends (its last frame, or an
//! error), or until whatever holds it is dropped: the response future, the body, or a call
//! still waiting. A response whose body is already at its end at the head gives the permit back
//! with the head. Every way a call ends gives its permit back exactly once.
//!
//! # What an adaptive limit learns
//!
//! Each call that ends as seen is one sample: its time from admission to the end of the body,
//! the calls in flight when it was admitted, and whether the upstream signalled overload — a
//! `429`, `503` or `504`, a gRPC `RESOURCE_EXHAUSTED`, `UNAVAILABLE` or `DEADLINE_EXCEEDED`
//! (in the head or the trailers), or a timeout error. A response body dropped before its end
//! is a sample too, timed to the drop, with its head's verdict (the caller that reads only the
//! status still teaches the limit; a gRPC answer whose status was still to come in the trailers
//! does not). Other errors, broken bodies and calls dropped before their head teach it
//! nothing. An ordinary sample that arrives while another thread updates the
//! estimate is skipped rather than waited for; a drop never is.
//!
//! # Where it sits
//!
//! In a client stack, the limit goes below retry and the balancer and above the breaker (one
//! limit per upstream), so that a refused call is a local, immediate failure that the retry
//! layer does not retry (its source is [`PolicyRejected`](steadfast_core::PolicyRejected)) and
//! the breaker never counts. The throttle goes above retry (under the total timeout): it judges
//! calls, not attempts, and its refusals are not retried either. The breaker, below, stops
//! calls to an upstream that fails outright; the throttle, above, thins calls to one that
//! refuses part of them (an overloaded upstream answering `503` or `429`), which a breaker's
//! failure-rate threshold may never reach; and a call the breaker or the limit refused counts
//! nowhere in the throttle's window. The retry budget bounds the retries the throttle lets
//! through.
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use steadfast_limit::{ConcurrencyLimitLayer, error::LimitExceeded};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let limit = ConcurrencyLimitLayer::new(1);
//! let mut svc = ServiceBuilder::new().layer(limit.clone()).service(service_fn(
//!     |_req: http::Request<String>| async {
//!         tokio::time::sleep(Duration::from_millis(10)).await;
//!         Ok::<_, Infallible>(http::Response::new(String::from("done")))
//!     },
//! ));
//! let first = svc.ready().await.unwrap().call(http::Request::new(String::new()));
//! let second = svc.ready().await.unwrap().call(http::Request::new(String::new()));
//! let err = second.await.unwrap_err();
//! assert_eq!(err.downcast_ref::<LimitExceeded>().unwrap().limit(), 1);
//! let res = first.await.unwrap();
//! assert_eq!(limit.in_flight(), 1, "held until the body ends");
//! drop(res);
//! assert_eq!(limit.in_flight(), 0);
//! # }
//! ```
//!
//! # Bad input
//!
//! A limit, floor or ceiling of zero, bounds that do not hold the initial limit, and factors
//! out of range are refused by [`build`](ConcurrencyLimitBuilder::build) with
//! [`InvalidLimitConfig`](error::InvalidLimitConfig). A wait of `Duration::MAX` is a wait
//! bounded only by the call's deadline; `Duration::ZERO` refuses at once. Samples of any
//! duration keep an adaptive limit within its bounds.

mod algorithm;
mod answer;
pub mod error;
pub mod future;
mod keyed;
mod layer;
mod limiter;
#[cfg(all(test, loom))]
mod loom_model;
mod service;
mod sync;
mod throttle;

pub use algorithm::{Aimd, Gradient2, Vegas};
pub use answer::{AnsweringLimit, AnsweringLimitLayer};
pub use future::LimitBody;
pub use keyed::{KeyedConcurrencyLimit, KeyedConcurrencyLimitBuilder, KeyedConcurrencyLimitLayer};
pub use layer::{ConcurrencyLimitBuilder, ConcurrencyLimitLayer};
pub use service::ConcurrencyLimit;
pub use throttle::{Throttle, ThrottleBuilder, ThrottleLayer};

#[cfg(feature = "metrics")]
fn record_rejected(name: &str) {
    metrics::counter!("steadfast_limit_rejected_total", "limit" => name.to_owned()).increment(1);
}

/// Describes this crate's metrics (help text and unit) to the installed recorder (feature
/// `metrics`): `steadfast_limit_rejected_total`, `steadfast_limit_current` and
/// `steadfast_limit_throttled_total`.
///
/// ```
/// steadfast_limit::describe_metrics(); // without a recorder: nothing happens
/// ```
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    metrics::describe_counter!(
        "steadfast_limit_rejected_total",
        metrics::Unit::Count,
        "Calls a concurrency limit refused (at once, or after waiting), by limit name."
    );
    metrics::describe_gauge!(
        "steadfast_limit_current",
        metrics::Unit::Count,
        "The limit in force, set when an adaptive limit moves, by limit name."
    );
    metrics::describe_counter!(
        "steadfast_limit_throttled_total",
        metrics::Unit::Count,
        "Calls the client-side throttle refused locally."
    );
}
