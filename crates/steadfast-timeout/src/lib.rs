//! Timeouts that never hang a call and carry the deadline across hops.
//!
//! - [`TimeoutLayer`] (client side): fails a call that outlives its limit with a typed
//!   [`Elapsed`](error::Elapsed); takes the smallest of its own limit, a [`RequestTimeout`] extension, an
//!   inherited [`Deadline`] and a budget the caller wrote on the request (tonic's
//!   `Request::set_timeout`), the last two for the whole call; writes the remaining budget downstream as `grpc-timeout` (gRPC) or
//!   `x-request-timeout-ms` (HTTP); fails at once, sending nothing, when the budget is spent.
//! - [`SetDeadlineLayer`] (server side): reads the inbound budget, takes the smaller of it and
//!   its own limit, makes the deadline ambient for the handler, and on expiry *answers* —
//!   HTTP `504` or gRPC trailers-only `DEADLINE_EXCEEDED` — instead of erroring, so axum and
//!   tonic need no `HandleErrorLayer`. The deadline the caller sent stays ambient while the
//!   response body is produced ([`DeadlineBody`]); the layer's own limit bounds the handler's
//!   answer only.
//!
//! A handler behind a [`SetDeadlineLayer`] that calls another service through a client stack
//! with a [`TimeoutLayer`] propagates the remaining deadline with no code of its own:
//!
//! ```text
//!   caller ──grpc-timeout: 2S──▶ [SetDeadline] handler ──▶ [Timeout] ──x-request-timeout-ms: 1730──▶ next hop
//!                                    Deadline::current() = now + 2 s
//! ```
//!
//! Spawned work does not inherit task-locals: wrap it in
//! [`Deadline::propagate`](steadfast_core::Deadline::propagate).
//!
//! # Example: one hop, end to end
//!
//! ```
//! use std::time::Duration;
//! use steadfast_core::Deadline;
//! use steadfast_timeout::{SetDeadlineLayer, TimeoutLayer};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! // The downstream service reports the budget it was given.
//! let downstream = service_fn(|req: http::Request<()>| async move {
//!     let budget = req.headers()["x-request-timeout-ms"].to_str().unwrap().to_owned();
//!     Ok::<_, std::convert::Infallible>(http::Response::new(budget))
//! });
//! let client = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_secs(5)))
//!     .service(downstream);
//!
//! // A server whose handler calls downstream, with no deadline code of its own.
//! let server = ServiceBuilder::new()
//!     .layer(SetDeadlineLayer::new(Duration::from_secs(30)))
//!     .service(service_fn(move |_req: http::Request<()>| {
//!         let client = client.clone();
//!         async move {
//!             tokio::time::sleep(Duration::from_millis(250)).await; // some work first
//!             let res = client.oneshot(http::Request::new(())).await?;
//!             Ok::<_, steadfast_core::BoxError>(http::Response::new(res.into_body()))
//!         }
//!     }));
//!
//! let req = http::Request::builder().header("grpc-timeout", "2S").body(()).unwrap();
//! let res = server.oneshot(req).await.unwrap();
//! // 2 s inbound, 250 ms spent: the next hop is told 1750 ms.
//! let body = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
//! assert_eq!(body, "1750");
//! # }
//! ```
//!
//! # Response bodies
//!
//! [`TimeoutLayer`] bounds the time until the response *head*, as tower's does. A client's
//! total timeout should bound the body too, or a call whose upstream sends its head and then
//! trickles the body hangs for as long as the upstream likes:
//! [`BodyTimeoutLayer`] (or [`TimeoutBuilder::covering_body`]) is one, whose responses carry a
//! [`TimeoutBody`] that ends with [`Elapsed`](error::Elapsed) when its next frame would arrive past the call's
//! deadline, and optionally when the upstream goes idle between frames. The standard client
//! stack's total timeout is one (with a documented opt-out for long-lived streams).
//!
//! On the server side, bound a streaming response body with tower-http's
//! `tower_http::timeout::ResponseBodyTimeoutLayer` placed inside the server timeout.
//!
//! # Bad input
//!
//! Malformed `grpc-timeout` / `x-request-timeout-ms` values (9+ digits, unknown unit, empty,
//! signs, non-ASCII, huge) are ignored in favour of the server's own limit. A zero budget
//! (`0S`, `0`) is a deadline that has already passed: the server answers at once.

mod body;
mod client;
pub mod error;
pub mod future;
mod layer;
mod propagate;
mod server;

pub use body::{BodyTimeout, BodyTimeoutLayer, LATE_READ_GRACE, TimeoutBody};
pub use client::{RequestTimeout, Timeout};
pub use layer::{
    BodyTimeoutBuilder, DEFAULT_TIMEOUT, SetDeadlineBuilder, SetDeadlineLayer, TimeoutBuilder,
    TimeoutLayer,
};
pub use server::{DeadlineBody, SetDeadline};
pub use steadfast_core::Deadline;

/// Describes this crate's metrics to the installed recorder (help text and unit, which
/// exporters such as Prometheus's print): call it once after installing the recorder.
///
/// ```
/// steadfast_timeout::describe_metrics(); // without a recorder: nothing happens
/// ```
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    metrics::describe_counter!(
        "steadfast_timeout_elapsed_total",
        metrics::Unit::Count,
        "Timeouts that fired, by side: client (head), client_body, server."
    );
}
