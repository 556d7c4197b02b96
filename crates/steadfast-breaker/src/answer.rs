//! The breaker as a server-side (or gateway) layer that answers instead of failing.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use steadfast_core::{Classify, ResponseBody, is_grpc_content_type};
use tower_layer::Layer;
use tower_service::Service;

use crate::breaker::{Breaker, Stripe};
use crate::error::BreakerOpen;
use crate::future::{BreakerBody, Guard, ResponseFuture};
use crate::layer::CircuitBreakerLayer;

/// A breaker in front of a server's routes that *answers* when open — `503` with
/// `Retry-After`, or a trailers-only gRPC `UNAVAILABLE` with `grpc-retry-pushback-ms` — and
/// keeps the inner service's error type, so `axum::Router::layer` and tonic's
/// `Server::layer` accept it with no `HandleErrorLayer`.
///
/// Made by [`CircuitBreakerLayer::answering`]; shares that layer's breaker.
///
/// ```
/// use axum::{Router, routing::get};
/// use steadfast_breaker::CircuitBreakerLayer;
///
/// let breaker = CircuitBreakerLayer::new();
/// let app: Router = Router::new()
///     .route("/", get(|| async { "ok" }))
///     .layer(breaker.answering());
/// ```
pub struct AnsweringBreakerLayer<C> {
    breaker: Arc<Breaker<C>>,
}

impl<C> Clone for AnsweringBreakerLayer<C> {
    fn clone(&self) -> Self {
        Self {
            breaker: self.breaker.clone(),
        }
    }
}

impl<C> fmt::Debug for AnsweringBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnsweringBreakerLayer")
            .finish_non_exhaustive()
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// This breaker as a layer that answers `503` / `UNAVAILABLE` when open instead of
    /// returning [`BreakerOpen`]; see [`AnsweringBreakerLayer`].
    pub fn answering(&self) -> AnsweringBreakerLayer<C> {
        AnsweringBreakerLayer {
            breaker: self.shared_breaker(),
        }
    }
}

impl<S, C> Layer<S> for AnsweringBreakerLayer<C> {
    type Service = AnsweringBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        AnsweringBreaker {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

/// The service of [`AnsweringBreakerLayer`].
///
/// # Clone
///
/// Clones share the breaker.
pub struct AnsweringBreaker<S, C> {
    inner: S,
    breaker: Arc<Breaker<C>>,
}

impl<S: Clone, C> Clone for AnsweringBreaker<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for AnsweringBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnsweringBreaker")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResB, C> Service<Request<B>> for AnsweringBreaker<S, C>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: std::error::Error + Send + Sync + 'static,
    C: Classify<Response<ResB>>,
{
    type Response = Response<ResponseBody<BreakerBody<ResB, C>>>;
    type Error = S::Error;
    type Future = AnsweringFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let stripe: &Arc<Stripe<C>> = self.breaker.stripe();
        match stripe.admit() {
            Ok(permit) => {
                let guard = Guard::new(stripe.clone(), permit);
                AnsweringFuture {
                    state: AnswerState::Called {
                        inner: ResponseFuture::called(
                            Passthrough {
                                inner: self.inner.call(req),
                            },
                            guard,
                        ),
                    },
                }
            }
            Err(open) => AnsweringFuture {
                state: AnswerState::Open {
                    open,
                    grpc: is_grpc_content_type(req.headers()),
                },
            },
        }
    }
}

pin_project! {
    /// The response future of [`AnsweringBreaker`].
    pub struct AnsweringFuture<F, C> {
        #[pin]
        state: AnswerState<F, C>,
    }
}

pin_project! {
    #[project = AnswerProj]
    enum AnswerState<F, C> {
        Called {
            #[pin]
            inner: ResponseFuture<Passthrough<F>, C>,
        },
        Open {
            open: BreakerOpen,
            grpc: bool,
        },
    }
}

impl<F, C> fmt::Debug for AnsweringFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnsweringFuture").finish_non_exhaustive()
    }
}

pin_project! {
    /// Carries the inner error through the classifying future untouched.
    pub(crate) struct Passthrough<F> {
        #[pin]
        inner: F,
    }
}

impl<F> fmt::Debug for Passthrough<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Passthrough").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for Passthrough<F>
where
    F: Future<Output = Result<T, E>>,
    E: std::error::Error + 'static,
{
    type Output = Result<T, Carried<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map_err(Carried)
    }
}

/// An inner error on its way through the breaker's classification.
#[derive(Debug)]
pub(crate) struct Carried<E>(E);

impl<E: fmt::Display> fmt::Display for Carried<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Carried<E> {}

impl<F, C, ResB, E> Future for AnsweringFuture<F, C>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: std::error::Error + Send + Sync + 'static,
    C: Classify<Response<ResB>>,
{
    type Output = Result<Response<ResponseBody<BreakerBody<ResB, C>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            AnswerProj::Open { open, grpc } => Poll::Ready(Ok(if *grpc {
                open.to_grpc_response()
            } else {
                open.to_http_response()
            })),
            AnswerProj::Called { inner } => match ready!(inner.poll(cx)) {
                Ok(res) => Poll::Ready(Ok(res.map(ResponseBody::inner))),
                Err(e) => match e.downcast::<Carried<E>>() {
                    Ok(carried) => Poll::Ready(Err(carried.0)),
                    Err(_) => unreachable!("the breaker's future only returns the inner error"),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carried_errors_read_like_the_inner_error() {
        let e = Carried(std::io::Error::other("inner"));
        assert_eq!(e.to_string(), "inner");
    }
}
