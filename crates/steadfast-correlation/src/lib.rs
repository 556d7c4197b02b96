//! One correlation id from the edge through every hop, safe against hostile input.
//!
//! - [`SetCorrelationIdLayer`] (server side) accepts a valid inbound `x-correlation-id` (or
//!   `x-request-id`, or optionally a `traceparent` trace-id) or generates a time-ordered
//!   UUIDv7, and makes it visible to the handler — request extension, ambient
//!   [`CorrelationId::current`], a `correlation_id` field on a `correlation` tracing span — and on
//!   the response.
//! - [`PropagateCorrelationIdLayer`] (client side) stamps the id on outgoing requests: from the
//!   request's extension, else the ambient id, else a new one.
//!
//! Together they carry one id across hops with no code in the handler:
//!
//! ```text
//!   x-correlation-id: abc ─▶ [SetCorrelationIdLayer] handler ─▶ [PropagateCorrelationIdLayer] ─▶ x-correlation-id: abc
//!                              CorrelationId::current() == "abc", span field correlation_id=abc
//! ```
//!
//! Spawned work does not inherit task-locals: wrap it in [`CorrelationId::propagate`]. A
//! streamed response body does not need it: the server layer makes the id (with its trace
//! context and span) ambient while each frame of the body is produced too
//! ([`CorrelatedBody`]), after the handler has returned.
//!
//! # Hostile input
//!
//! Inbound ids must be 1-128 bytes of `[A-Za-z0-9._:-]` by default ([`is_valid_default`],
//! configurable through [`ValidateId`], never beyond visible ASCII). Anything else — overlong,
//! empty, spaces, quotes, bytes `0x80`-`0xFF`, percent-encoded CR/LF, control characters — is
//! replaced by a generated id, never echoed, never logged.
//!
//! # Example
//!
//! ```
//! use axum::{Router, routing::get};
//! use steadfast_correlation::{PropagateCorrelationIdLayer, SetCorrelationIdLayer};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // A downstream service that reports the id it received.
//! let downstream = ServiceBuilder::new()
//!     .layer(PropagateCorrelationIdLayer::new())
//!     .service(service_fn(|req: http::Request<()>| async move {
//!         Ok::<_, std::convert::Infallible>(req.headers()["x-correlation-id"].to_str().unwrap().to_owned())
//!     }));
//! // The handler calls downstream with no id code of its own.
//! let app = Router::new()
//!     .route("/", get(move || {
//!         let downstream = downstream.clone();
//!         async move { downstream.oneshot(http::Request::new(())).await.unwrap() }
//!     }))
//!     .layer(SetCorrelationIdLayer::new());
//! let req = http::Request::get("/").header("x-correlation-id", "abc").body(axum::body::Body::empty()).unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-correlation-id"], "abc");
//! let body = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
//! assert_eq!(body, "abc");
//! # }
//! ```

mod client;
pub mod error;
pub mod future;
mod generate;
mod id;
mod layer;
mod server;
mod traceparent;
mod validate;

pub use client::PropagateCorrelationId;
pub use generate::{MakeCorrelationId, UuidV7};
pub use id::{CorrelationId, Propagated, WithCorrelationId};
pub use layer::{
    PropagateCorrelationIdBuilder, PropagateCorrelationIdLayer, SetCorrelationIdBuilder,
    SetCorrelationIdLayer, X_CORRELATION_ID, X_REQUEST_ID,
};
pub use server::{CorrelatedBody, SetCorrelationId};
pub use traceparent::{TRACEPARENT, TRACESTATE, TraceContext, Traced, trace_id};
pub use validate::{DefaultRule, MAX_LEN, ValidateId, is_valid_default};
