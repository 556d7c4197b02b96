//! The limit as a server-side layer that sheds load with an answer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use steadfast_core::{ResponseBody, is_grpc_content_type};
use tower_layer::Layer;
use tower_service::Service;

use crate::future::{Admission, LimitBody, finish_on_error};
use crate::layer::ConcurrencyLimitLayer;
use crate::service::ConcurrencyLimit;

/// A limit in front of a server's routes that *answers* when reached — `503` with
/// `Retry-After: 1`, or a trailers-only gRPC `RESOURCE_EXHAUSTED` — and keeps the inner
/// service's error type, so `axum::Router::layer` and tonic's `Server::layer` accept it with no
/// `HandleErrorLayer` (load shedding).
///
/// Made by [`ConcurrencyLimitLayer::answering`]; shares that layer's limit.
///
/// ```
/// use axum::{Router, routing::get};
/// use steadfast_limit::ConcurrencyLimitLayer;
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "ok" }))
///     .layer(ConcurrencyLimitLayer::new(256).answering());
/// ```
#[derive(Clone)]
pub struct AnsweringLimitLayer {
    limit: ConcurrencyLimitLayer,
}

impl fmt::Debug for AnsweringLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnsweringLimitLayer")
            .field("limit", &self.limit)
            .finish()
    }
}

impl ConcurrencyLimitLayer {
    /// This limit as a layer that answers `503` / `RESOURCE_EXHAUSTED` when reached instead
    /// of returning [`LimitExceeded`](crate::error::LimitExceeded); see
    /// [`AnsweringLimitLayer`].
    pub fn answering(&self) -> AnsweringLimitLayer {
        AnsweringLimitLayer {
            limit: self.clone(),
        }
    }
}

impl<S> Layer<S> for AnsweringLimitLayer {
    type Service = AnsweringLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AnsweringLimit {
            inner: self.limit.layer(inner),
        }
    }
}

/// The service of [`AnsweringLimitLayer`].
///
/// # Clone
///
/// Clones share the limit.
#[derive(Clone)]
pub struct AnsweringLimit<S> {
    inner: ConcurrencyLimit<S>,
}

impl<S> AnsweringLimit<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }
}

impl<S: fmt::Debug> fmt::Debug for AnsweringLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnsweringLimit")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, B, ResB> Service<Request<B>> for AnsweringLimit<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: std::error::Error + Send + Sync + 'static,
    ResB: Body,
{
    type Response = Response<ResponseBody<LimitBody<ResB>>>;
    type Error = S::Error;
    type Future = AnsweringFuture<S, Request<B>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.get_mut().poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = is_grpc_content_type(req.headers());
        AnsweringFuture {
            admission: self.inner.admit(req),
            grpc,
        }
    }
}

pin_project! {
    /// The response future of [`AnsweringLimit`]: the inner error type is kept as it is.
    pub struct AnsweringFuture<S, Req, F> {
        #[pin]
        admission: Admission<S, Req, F>,
        grpc: bool,
    }
}

impl<S, Req, F> fmt::Debug for AnsweringFuture<S, Req, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnsweringFuture").finish_non_exhaustive()
    }
}

impl<S, Req, F, ResB, E> Future for AnsweringFuture<S, Req, F>
where
    S: Service<Req, Future = F>,
    F: Future<Output = Result<Response<ResB>, E>>,
    E: std::error::Error + Send + Sync + 'static,
    ResB: Body,
{
    type Output = Result<Response<ResponseBody<LimitBody<ResB>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match ready!(this.admission.poll_admitted(cx)) {
            Ok((Ok(res), permit)) => Ok(LimitBody::wrap(res, permit).map(ResponseBody::inner)),
            Ok((Err(e), permit)) => {
                finish_on_error(permit, &e);
                Err(e)
            }
            Err(refusal) => Ok(if *this.grpc {
                refusal.to_grpc_response()
            } else {
                refusal.to_http_response()
            }),
        })
    }
}
