use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use steadfast_core::__private::Tried;
use steadfast_core::{BoxError, Classify, Deadline, saturating_add};
use tokio::time::Instant;
use tower_service::Service;

use super::future::{HedgeFuture, Race};
use super::layer::Config;
use crate::header::IDEMPOTENCY_KEY;
use crate::policy::idempotent;
use crate::replay::ReplayBody;
use crate::service::Spare;

/// The hedging service; see [`HedgeLayer`](crate::HedgeLayer).
///
/// A call's first attempt goes through the service below that `poll_ready` made ready; its
/// hedges go through clones of a copy of it kept since the first call that could be hedged.
///
/// # Clone
///
/// Clones share the layer's learnt delay, extra-load share and configuration, and the copy
/// of the service below that hedges are cloned from; a clone changed through
/// [`get_mut`](Self::get_mut) makes a copy of its own at its next call.
pub struct Hedge<S, C> {
    inner: S,
    shared: Arc<Shared<S, C>>,
}

/// What a hedge service and its clones and response futures share.
pub(crate) type Shared<S, C> = crate::service::SharedWith<S, Config<C>>;

impl<S, C> Hedge<S, C> {
    pub(crate) fn new(inner: S, config: Arc<Config<C>>) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared {
                config,
                spare: Spare::new(),
            }),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably. Later calls of this service hedge through the service as
    /// changed here (clones made before keep hedging through theirs).
    pub fn get_mut(&mut self) -> &mut S {
        Shared::forget_spare(&mut self.shared);
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C> Clone for Hedge<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Hedge<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResB, C> Service<Request<B>> for Hedge<S, C>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + 'static,
    C: Classify<Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = HedgeFuture<S::Future, S, B, C, Response<ResB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let config = &*self.shared.config;
        config.extra.deposit();
        let may_repeat = config.max_attempts > 1
            && (idempotent(req.method())
                || config.non_idempotent
                || req.headers().contains_key(IDEMPOTENCY_KEY));
        if !may_repeat {
            let (parts, body) = req.into_parts();
            let body = ReplayBody::new(body, config.replay_cap);
            return HedgeFuture::once(self.inner.call(Request::from_parts(parts, body)));
        }
        let deadline = crate::service::call_deadline(&req);
        let (parts, body) = req.into_parts();
        let body = ReplayBody::new(body, config.replay_cap);
        let Some(spare_body) = body.replay() else {
            return HedgeFuture::once(self.inner.call(Request::from_parts(parts, body)));
        };
        let started = Deadline::call_now().unwrap_or_else(Instant::now);
        let head = parts.clone();
        self.shared.spare.keep(&self.inner);
        let mut tried = Tried::default();
        let fut = tried.scope(|| self.inner.call(Request::from_parts(parts, body)));
        let next_at = config
            .delay
            .get()
            .map(|d| saturating_add(started, d))
            .filter(|at| deadline.is_none_or(|d| *at < d.instant()));
        HedgeFuture::racing(
            fut,
            Race::new(
                self.shared.clone(),
                head,
                spare_body,
                started,
                next_at,
                tried,
                deadline,
            ),
        )
    }
}
