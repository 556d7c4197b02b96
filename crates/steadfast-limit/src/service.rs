//! The limited service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use steadfast_core::{BoxError, Deadline, saturating_add};
use tokio::time::Instant;
use tower_service::Service;

use crate::error::LimitExceeded;
use crate::future::{Admission, ResponseFuture};
use crate::layer::ConcurrencyLimitLayer;
use crate::limiter::Limiter;

/// A service that lets at most the limit's number of calls be in flight, counting a call from
/// its admission to the end (or drop) of its response body; see the [crate docs](crate).
///
/// A call over the limit fails with [`LimitExceeded`] (at once, or after waiting when the
/// layer waits), without reaching the inner service. `poll_ready` is the inner service's:
/// the limit never makes it fail or wait.
///
/// # Clone
///
/// Clones share the limit (its permits, waiters and adaptive estimate) with every service made
/// from the same layer.
pub struct ConcurrencyLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl ConcurrencyLimit<()> {
    /// A layer with a fixed limit of `max` that refuses at once (see
    /// [`ConcurrencyLimitLayer::new`]).
    ///
    /// ```
    /// use steadfast_limit::ConcurrencyLimit;
    /// use tower::{ServiceBuilder, service_fn};
    ///
    /// let svc = ServiceBuilder::new()
    ///     .layer(ConcurrencyLimit::layer(16))
    ///     .service(service_fn(|_req: http::Request<String>| async {
    ///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    ///     }));
    /// # drop(svc);
    /// ```
    pub fn layer(max: u32) -> ConcurrencyLimitLayer {
        ConcurrencyLimitLayer::new(max)
    }
}

impl<S> ConcurrencyLimit<S> {
    pub(crate) fn new(inner: S, limiter: Arc<Limiter>) -> Self {
        Self { inner, limiter }
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

    /// Admits `req` now, or has it wait, or refuses it.
    #[inline]
    pub(crate) fn admit<B>(&mut self, req: Request<B>) -> Admission<S, Request<B>, S::Future>
    where
        S: Service<Request<B>> + Clone,
    {
        if let Some(permit) = self.limiter.try_acquire() {
            return Admission::called(self.inner.call(req), permit);
        }
        refuse_or_wait(&mut self.inner, &self.limiter, req)
    }
}

/// A call that found no permit free: refused at once, or waiting (when the limit waits and the
/// call's deadline leaves time).
#[inline(never)]
pub(crate) fn refuse_or_wait<S, B>(
    inner: &mut S,
    limiter: &Arc<Limiter>,
    req: Request<B>,
) -> Admission<S, Request<B>, S::Future>
where
    S: Service<Request<B>> + Clone,
{
    {
        let refused = || {
            tracing::debug!(target: "steadfast::limit", limit = %limiter.name, in_flight = limiter.in_flight(), "limit reached; refused");
            #[cfg(feature = "metrics")]
            crate::record_rejected(&limiter.name);
            Admission::refused(LimitExceeded::new(limiter.limit(), Duration::ZERO))
        };
        let Some(wait) = limiter.wait else {
            return refused();
        };
        let now = Instant::now();
        let mut until = saturating_add(now, wait);
        if let Some(deadline) = Deadline::for_request(&req) {
            until = until.min(deadline.instant());
        }
        if until <= now {
            return refused();
        }
        let slot = limiter.enqueue();
        // The service made ready for this call goes with it; a clone stays for the next.
        let clone = inner.clone();
        let ready = std::mem::replace(inner, clone);
        Admission::waiting(ready, req, limiter.clone(), slot, until)
    }
}

impl<S: Clone> Clone for ConcurrencyLimit<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for ConcurrencyLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .finish()
    }
}

impl<S, B, ResB> Service<Request<B>> for ConcurrencyLimit<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ResB: Body,
{
    type Response = Response<crate::LimitBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request<B>, S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture::new(self.admit(req))
    }
}
