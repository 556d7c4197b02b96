//! Helpers for the tests of nested timeouts (`hostile_timers.rs`,
//! `hostile_nested_timeouts.rs`): boxed services and calls, a request, an answer.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use steadfast::common::BoxError;
use steadfast::timeout::error::Elapsed;
use tower::util::BoxCloneService;

pub type Body = Full<Bytes>;
/// A boxed service between two timeouts.
pub type Mid = BoxCloneService<Request<Body>, Response<Body>, BoxError>;
/// A call boxed as a `dyn Future + Send`.
pub type BoxCall = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

pub fn req() -> Request<Body> {
    Request::get("http://upstream.test/")
        .body(Body::default())
        .unwrap()
}

pub fn ok() -> Response<Body> {
    Response::new(Body::default())
}

/// The limit of the timeout that ended a call, if a timeout did.
pub fn limit_of(e: &BoxError) -> Option<Duration> {
    e.downcast_ref::<Elapsed>().map(Elapsed::limit)
}

/// Polls `f` exactly once, in the current task.
pub async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
}
