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
use crate::future::{BreakerBody, Guard, classified, report_error};
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

impl AnsweringBreaker<(), steadfast_core::DefaultClassifier> {
    /// An answering layer over a breaker of its own, with the defaults. To share a breaker
    /// with a client stack or keep its handle, use [`CircuitBreakerLayer::answering`].
    pub fn layer() -> AnsweringBreakerLayer<steadfast_core::DefaultClassifier> {
        CircuitBreakerLayer::new().answering()
    }
}

impl<S, C> AnsweringBreaker<S, C> {
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
        let state = match stripe.admit() {
            Ok(permit) => AnswerState::Called {
                inner: self.inner.call(req),
                guard: Some(Guard::new(stripe.clone(), permit)),
            },
            Err(open) => AnswerState::Open {
                open,
                grpc: is_grpc_content_type(req.headers()),
            },
        };
        AnsweringFuture { state }
    }
}

pin_project! {
    /// The response future of [`AnsweringBreaker`]: the inner error type is kept as it is
    /// (classified by reference, never boxed).
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
            inner: F,
            guard: Option<Guard<C>>,
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
            AnswerProj::Called { inner, guard } => {
                let out = ready!(inner.poll(cx));
                let guard = guard.take().expect("polled after completion");
                Poll::Ready(match out {
                    Ok(res) => Ok(classified(res, guard).map(ResponseBody::inner)),
                    Err(e) => {
                        report_error(&e, guard);
                        Err(e)
                    }
                })
            }
        }
    }
}
