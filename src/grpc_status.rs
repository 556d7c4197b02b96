//! The stack's errors as the gRPC statuses tonic reports.
//!
//! tonic turns a client service's error into a `tonic::Status` by looking for a `Status` (or
//! one of its own transport errors) in it; anything else becomes `UNKNOWN`. Our layers fail
//! with typed errors tonic does not know, so the gRPC client stack ends in
//! [`GrpcStatusErrors`], which hands tonic the status each error means, from the call and
//! from the response body alike:
//!
//! | error (anywhere in the source chain) | status |
//! |---|---|
//! | [`Elapsed`] (a timeout, the call's or an inherited deadline, or the body's) | `DEADLINE_EXCEEDED` |
//! | `tonic::TimeoutExpired` (the `Channel`'s own timer, armed from the `grpc-timeout` the stack propagates: the same deadline, firing first) | `DEADLINE_EXCEEDED` (tonic alone says `CANCELLED`) |
//! | [`BreakerOpen`] (an open breaker, failing fast) | `UNAVAILABLE`, with `grpc-retry-pushback-ms` when the next probe time is known |
//! | anything else | passed on: tonic maps its own transport errors (a stream the server resets gets the code the gRPC HTTP/2 mapping gives its reset: `INTERNAL_ERROR` → `INTERNAL`, `REFUSED_STREAM` → `UNAVAILABLE`, `CANCEL` → `CANCELLED`) |

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use http_body::{Body, Frame, SizeHint};
use steadfast_breaker::error::BreakerOpen;
use steadfast_core::BoxError;
use steadfast_core::header::{Pushback, encode_pushback};
use steadfast_timeout::error::Elapsed;
use tower_service::Service;

/// The outermost service of the gRPC client stack: errors become the `tonic::Status` they
/// mean (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct GrpcStatusErrors<S> {
    inner: S,
}

/// Layers [`GrpcStatusErrors`] onto a service: for a stack of your own in front of a tonic
/// `Channel`, outermost.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcStatusErrorsLayer;

impl<S> tower_layer::Layer<S> for GrpcStatusErrorsLayer {
    type Service = GrpcStatusErrors<S>;

    fn layer(&self, inner: S) -> GrpcStatusErrors<S> {
        GrpcStatusErrors::new(inner)
    }
}

impl GrpcStatusErrors<()> {
    /// The layer.
    pub fn layer() -> GrpcStatusErrorsLayer {
        GrpcStatusErrorsLayer
    }
}

impl<S> GrpcStatusErrors<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The status an error of the stack means, or the error unchanged.
fn to_status(e: BoxError) -> BoxError {
    let mut cause: Option<&(dyn Error + 'static)> = Some(&*e);
    while let Some(err) = cause {
        if let Some(elapsed) = err.downcast_ref::<Elapsed>() {
            return Box::new(tonic::Status::deadline_exceeded(elapsed.to_string()));
        }
        if err.is::<tonic::TimeoutExpired>() {
            return Box::new(tonic::Status::deadline_exceeded("deadline exceeded"));
        }
        if let Some(open) = err.downcast_ref::<BreakerOpen>() {
            let mut status = tonic::Status::unavailable(open.to_string());
            if let Some(d) = open.retry_after() {
                let value = encode_pushback(Pushback::After(d));
                if let Ok(value) = value.to_str().unwrap_or_default().parse() {
                    status
                        .metadata_mut()
                        .insert("grpc-retry-pushback-ms", value);
                }
            }
            return Box::new(status);
        }
        cause = err.source();
    }
    e
}

impl<S, R, B> Service<R> for GrpcStatusErrors<S>
where
    S: Service<R, Response = Response<B>, Error = BoxError>,
{
    type Response = Response<GrpcStatusBody<B>>;
    type Error = BoxError;
    type Future = GrpcStatusFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(to_status)
    }

    fn call(&mut self, req: R) -> Self::Future {
        GrpcStatusFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`GrpcStatusErrors`].
    pub struct GrpcStatusFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F> fmt::Debug for GrpcStatusFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcStatusFuture").finish_non_exhaustive()
    }
}

impl<F, B> Future for GrpcStatusFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<GrpcStatusBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = ready!(self.project().inner.poll(cx)).map_err(to_status)?;
        Poll::Ready(Ok(res.map(|inner| GrpcStatusBody { inner })))
    }
}

pin_project_lite::pin_project! {
    /// A response body whose errors are the statuses they mean (a deadline that ends a
    /// streamed body is `DEADLINE_EXCEEDED`, not `UNKNOWN`).
    pub struct GrpcStatusBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B> fmt::Debug for GrpcStatusBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcStatusBody").finish_non_exhaustive()
    }
}

impl<B> Body for GrpcStatusBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        self.project()
            .inner
            .poll_frame(cx)
            .map(|f| f.map(|f| f.map_err(|e| to_status(e.into()))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn code(e: BoxError) -> tonic::Code {
        tonic::Status::from_error(to_status(e)).code()
    }

    #[test]
    fn each_error_is_the_status_it_means() {
        assert_eq!(
            code(Elapsed::new(Duration::from_secs(1), false).into()),
            tonic::Code::DeadlineExceeded
        );
        let open = BreakerOpen::new(Some(Duration::from_millis(1500)));
        let status = tonic::Status::from_error(to_status(open.into()));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "1500"
        );
        assert_eq!(
            code(std::io::Error::other("boom").into()),
            tonic::Code::Unknown,
            "other errors pass through to tonic's own mapping"
        );
    }
}
