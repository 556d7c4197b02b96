use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use steadfast_core::__private::Tried;
use steadfast_core::{BoxError, Classify, Deadline};
use tower_service::Service;

use crate::future::{Ctx, ResponseFuture, attempt_span};
use crate::layer::Config;
use crate::policy::History;
use crate::replay::ReplayBody;

/// The retry service; see [`RetryLayer`](crate::RetryLayer).
///
/// The first attempt of a call goes through the service below that `poll_ready` made ready.
/// Later attempts go through a clone of a copy of it kept since the first call (the service
/// below is cloned only for a call that is retried, not for every call).
///
/// # Clone
///
/// Clones share the layer's budget and configuration, and the copy of the service below that
/// later attempts are cloned from (made at the first call that may need one); a clone changed
/// through [`get_mut`](Self::get_mut) makes a copy of its own at its next call.
pub struct Retry<S, C> {
    inner: S,
    shared: Arc<Shared<S, C>>,
}

/// What a retry service and its clones and response futures share.
pub(crate) type Shared<S, C> = SharedWith<S, Config<C>>;

/// What a retry or hedge service and its clones and response futures share: the layer's
/// settings (`Cfg`) and the spare copy of the service below.
pub(crate) struct SharedWith<S, Cfg> {
    pub(crate) config: Arc<Cfg>,
    pub(crate) spare: Spare<S>,
}

impl<S, Cfg> SharedWith<S, Cfg> {
    /// Lets the next call keep a new spare: the service below may be about to change
    /// (`get_mut`), and clones and calls in flight keep the spare they share.
    pub(crate) fn forget_spare(shared: &mut Arc<Self>) {
        match Arc::get_mut(shared) {
            Some(only) => only.spare = Spare::new(),
            None => {
                *shared = Arc::new(Self {
                    config: shared.config.clone(),
                    spare: Spare::new(),
                });
            }
        }
    }
}

/// A copy of the service below, made at the first call that may need another attempt: later
/// attempts (retries, hedges) are sent through a clone of it. Locked only to clone it.
pub(crate) struct Spare<S>(OnceLock<Mutex<S>>);

impl<S> Spare<S> {
    pub(crate) const fn new() -> Self {
        Self(OnceLock::new())
    }
}

impl<S: Clone> Spare<S> {
    /// Keeps a copy of `service` unless one is kept already (once per layered service).
    #[inline]
    pub(crate) fn keep(&self, service: &S) {
        if self.0.get().is_none() {
            let _ = self.0.set(Mutex::new(service.clone()));
        }
    }

    /// A service for a later attempt (to be made ready before it is called).
    pub(crate) fn get(&self) -> Option<S> {
        let spare = self.0.get()?;
        Some(spare.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

impl Retry<(), steadfast_core::DefaultClassifier> {
    /// A layer with the defaults (see [`RetryBuilder`](crate::RetryBuilder)).
    pub fn layer() -> crate::RetryLayer {
        crate::RetryLayer::new()
    }
}

impl<S, C> Retry<S, C> {
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

    /// The inner service, mutably. Later calls of this service retry through the service as
    /// changed here (clones made before keep retrying through theirs).
    pub fn get_mut(&mut self) -> &mut S {
        Shared::forget_spare(&mut self.shared);
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C> Clone for Retry<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
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
        let config = &*self.shared.config;
        if let Some(budget) = &config.budget {
            budget.deposit();
        }
        let deadline = call_deadline(&req);
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
        self.shared.spare.keep(&self.inner);
        let mut history = History::new(deadline);
        let fut = {
            let _attempt = span.enter();
            if Tried::current().is_some() {
                // Inside a hedge's scope: a balancer below records into the hedge's set,
                // which this call's retries then avoid too.
                let fut = self.inner.call(Request::from_parts(parts, body));
                history.keep_tried(Tried::current().unwrap_or_default());
                fut
            } else {
                let mut tried = Tried::default();
                let entered = tried.enter();
                // The request built in the call's argument: no copy of it on the way.
                let fut = self.inner.call(Request::from_parts(parts, body));
                entered.leave(&mut tried);
                history.keep_tried(tried);
                fut
            }
        };
        ResponseFuture::retrying(
            fut,
            Ctx {
                service: None,
                parts: head,
                body: retry_body,
                next_body: None,
                shared: self.shared.clone(),
                history,
                reserved: false,
                next_is_reroute: false,
            },
            span,
        )
    }
}

/// The deadline of a call that may be sent more than once: the one it inherits and, where no
/// steadfast client layer above calls with a deadline in hand, a budget its caller wrote on
/// the request (tonic's `Request::set_timeout` writes `grpc-timeout`), which ends the whole
/// call, not each attempt. Below such a layer the header is that layer's, and the ambient
/// deadline is exact.
pub(crate) fn call_deadline<B>(req: &Request<B>) -> Option<Deadline> {
    use steadfast_core::header::{TIMEOUT_MS, carried_budget};
    let inherited = Deadline::for_request(req);
    if Deadline::call_now().is_some() {
        return inherited;
    }
    let asked = carried_budget(req.headers(), &TIMEOUT_MS)
        .flatten()
        .map(Deadline::after);
    Deadline::earliest(inherited, asked)
}
