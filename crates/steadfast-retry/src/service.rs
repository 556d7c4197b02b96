use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use steadfast_core::{BoxError, Classify, Deadline};
use tower_service::Service;

use crate::future::{Ctx, ResponseFuture, attempt_span};
use crate::layer::Config;
use crate::policy::History;
use crate::replay::ReplayBody;

/// The retry service; see [`RetryLayer`](crate::RetryLayer).
///
/// # Clone
///
/// Clones share the layer's budget and configuration.
pub struct Retry<S, C> {
    inner: S,
    config: Arc<Config<C>>,
}

impl Retry<(), steadfast_core::DefaultClassifier> {
    /// A layer with the defaults (see [`RetryBuilder`](crate::RetryBuilder)).
    pub fn layer() -> crate::RetryLayer {
        crate::RetryLayer::new()
    }
}

impl<S, C> Retry<S, C> {
    pub(crate) fn new(inner: S, config: Arc<Config<C>>) -> Self {
        Self { inner, config }
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

impl<S: Clone, C> Clone for Retry<S, C> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.config.clone())
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Retry<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResB, C> Service<Request<B>> for Retry<S, C>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + 'static,
    C: Classify<Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S, B, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let config = &self.config;
        if let Some(budget) = &config.budget {
            budget.deposit();
        }
        let deadline = Deadline::for_request(&req);
        let (parts, body) = req.into_parts();
        let body = ReplayBody::new(body, config.replay_cap);
        // No copy at all when no retry could happen anyway. (A body over the replay cap is
        // kept too while nothing of it is read: an attempt refused before it read anything
        // hands it on whole.)
        let retry_body = if config.max_attempts > 1 {
            body.replay()
        } else {
            None
        };
        let span = attempt_span(&parts, 0);
        let Some(retry_body) = retry_body else {
            let fut = {
                let _attempt = span.enter();
                self.inner.call(Request::from_parts(parts, body))
            };
            return ResponseFuture::once(fut, span);
        };
        let head = parts.clone();
        // Call the service that was made ready; keep a clone for later attempts.
        let ready = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, ready);
        let fut = {
            let _attempt = span.enter();
            service.call(Request::from_parts(parts, body))
        };
        ResponseFuture::retrying(
            fut,
            Ctx {
                service,
                parts: head,
                body: retry_body,
                next_body: None,
                config: self.config.clone(),
                history: History::new(deadline),
                reserved: false,
            },
            span,
        )
    }
}
