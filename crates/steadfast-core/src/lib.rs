//! Shared foundations of the steadfast layers.
//!
//! The four layer crates (`steadfast-retry`, `steadfast-breaker`, `steadfast-timeout`,
//! `steadfast-correlation`) never depend on each other; they meet here:
//!
//! - **Classification** ([`Classify`], [`DefaultClassifier`], [`Class`]): one verdict on every
//!   outcome — HTTP status, gRPC status in headers *and* trailers
//!   ([`GrpcClassifier::classify_frame`]), and transport
//!   errors by how far the request got ([`Delivery`]). Retry and breaker read the same verdict.
//!   An answer a server marks as shed ([`OVERLOADED`]) is no failure ([`Class::overloaded`]).
//! - **The policy-rejection marker** ([`PolicyRejected`]): set by the breaker, honoured by retry.
//! - **Header codecs** ([`header`]): `Retry-After`, `grpc-retry-pushback-ms`, `grpc-timeout`
//!   and the HTTP deadline header, hardened against hostile input.
//! - **The ambient deadline** ([`Deadline`]): set by a server, read by every outgoing call.
//! - **Layer-made responses** ([`ResponseBody`], [`http_response`], [`grpc_response`]): how a
//!   server-side layer answers (504, 503, trailers-only gRPC) without changing the error type.
//!
//! # Example
//!
//! ```
//! use http::Response;
//! use steadfast_core::{Classify, DefaultClassifier, Delivery, ResponseClass};
//!
//! let classifier = DefaultClassifier::new();
//! let res = Response::builder().status(429).body(()).unwrap();
//! let ResponseClass::Ready(class) = classifier.classify_response(&res) else { unreachable!() };
//! // 429 is the caller's problem (not a failure of the upstream) but worth retrying later.
//! assert!(!class.is_failure());
//! assert!(class.is_retryable());
//! assert_eq!(class.delivery(), Delivery::Answered);
//! ```
//!
//! # Feature flags
//!
//! - `hyper-util` (default): recognise hyper-util legacy client connect errors as "certainly
//!   not sent".
//!
//! # Minimum supported Rust version
//!
//! 1.85.

mod classify;
mod deadline;
mod error;
mod grpc;
pub mod header;
pub mod key;
#[path = "rand.rs"]
mod rand_impl;
mod response;
mod thread;
mod tried;

pub use classify::{
    Class, Classify, DefaultClassifier, GrpcClassifier, HttpClassifier, OVERLOADED, ResponseClass,
    StatusSet, is_grpc_content_type,
};
pub use deadline::{Deadline, Entered, WithDeadline, saturating_add};
pub use error::{
    BoxError, Delivery, NotSent, PolicyRejected, TimedOut, classify_transport_error, error_type,
};
pub use grpc::{GRPC_MESSAGE, GRPC_STATUS, GrpcCode, GrpcCodeSet, UnknownGrpcCode};
pub use response::{ResponseBody, grpc_response, http_response};

/// What the steadfast crates share with each other and users do not need: the seedable random
/// source and the thread numbering behind striped counters. Not part of the public API; may
/// change in any release.
#[doc(hidden)]
pub mod __private {
    pub mod rand {
        //! The workspace's one seedable random source.
        pub use crate::rand_impl::*;
    }
    pub use crate::thread::thread_number;
    pub use crate::tried::{Entered, Tried};
}
