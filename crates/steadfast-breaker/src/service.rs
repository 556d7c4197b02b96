use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use steadfast_core::{BoxError, Classify};
use tokio::time::Sleep;
use tower_service::Service;

use crate::breaker::{Breaker, Stripe};
use crate::future::{BreakerBody, Guard, ResponseFuture};
use crate::keyed::{KeyedMap, Memo};
use crate::state::BreakerState;
use crate::{BreakerKey, ExtractKey};

/// Admits or rejects one call on `stripe`'s breaker and calls `inner` when admitted (the
/// stripe is cloned only for an admitted call, and only if borrowed).
#[inline]
fn admit_and_call<S, B, C>(
    stripe: Cow<'_, Arc<Stripe<C>>>,
    inner: &mut S,
    req: Request<B>,
) -> ResponseFuture<S::Future, C>
where
    S: Service<Request<B>>,
{
    match stripe.admit() {
        Ok(permit) => {
            let guard = Guard::new(stripe.into_owned(), permit);
            ResponseFuture::called(inner.call(req), guard)
        }
        Err(open) => ResponseFuture::rejected(open),
    }
}

/// A circuit breaker in front of `S`; see [`CircuitBreakerLayer`](crate::CircuitBreakerLayer).
///
/// # Clone
///
/// Clones share the breaker (state, windows, metrics). A pending backpressure timer belongs
/// to the instance and is not cloned.
pub struct CircuitBreaker<S, C> {
    inner: S,
    breaker: Arc<Breaker<C>>,
    backpressure: bool,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl CircuitBreaker<(), steadfast_core::DefaultClassifier> {
    /// A layer with the defaults (see [`CircuitBreakerBuilder`](crate::CircuitBreakerBuilder)).
    pub fn layer() -> crate::CircuitBreakerLayer {
        crate::CircuitBreakerLayer::new()
    }
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn new(inner: S, breaker: Arc<Breaker<C>>, backpressure: bool) -> Self {
        Self {
            inner,
            breaker,
            backpressure,
            sleep: None,
        }
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

impl<S: Clone, C> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.breaker.clone(), self.backpressure)
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("state", &self.breaker.shared.state())
            .field("backpressure", &self.backpressure)
            .finish()
    }
}

/// How often a backpressured `poll_ready` re-checks a breaker that gives no schedule
/// (forced open, or half-open with every probe out).
const RECHECK: Duration = Duration::from_millis(100);

impl<S, C> CircuitBreaker<S, C> {
    /// Admission first (pinned: the breaker decides before it polls the inner service).
    /// `Some(wait)`: the breaker would reject now.
    fn would_reject(&self) -> Option<Duration> {
        let shared = &self.breaker.shared;
        match shared.state() {
            BreakerState::ForcedOpen => Some(RECHECK),
            BreakerState::Open => shared.wait_hint().filter(|d| !d.is_zero()),
            _ => None,
        }
    }

    /// `poll_ready` while the breaker may reject. `true`: the call will fail fast (no
    /// backpressure). With backpressure, waits on a timer until a call would be admitted,
    /// then `false`.
    #[cold]
    fn poll_rejecting(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        while let Some(wait) = self.would_reject() {
            if !self.backpressure {
                return Poll::Ready(true);
            }
            let deadline = steadfast_core::saturating_add(tokio::time::Instant::now(), wait);
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            match sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => self.sleep = None,
            }
        }
        Poll::Ready(false)
    }
}

impl<S, B, ResB, C> Service<Request<B>> for CircuitBreaker<S, C>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    C: Classify<Response<ResB>>,
{
    type Response = Response<BreakerBody<ResB, C>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.breaker.shared.may_reject() && ready!(self.poll_rejecting(cx)) {
            // The call will fail fast; do not reserve inner capacity it won't use.
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        admit_and_call(Cow::Borrowed(self.breaker.stripe()), &mut self.inner, req)
    }
}

/// Per-key circuit breakers in front of `S`; see
/// [`KeyedCircuitBreakerLayer`](crate::KeyedCircuitBreakerLayer).
///
/// Admission is per request (the key comes from it), so it happens in `call`; `poll_ready`
/// polls the inner service directly.
///
/// # Clone
///
/// Clones share the map of breakers. Calls skip the map's lookup (and its lock) for a key
/// looked up lately: each instance remembers the last key it looked up and that key's
/// breaker (a clone starts with the memo of the instance it was cloned from), and each
/// thread the last few, of every per-key layer together, whichever instance called. The
/// thread's memory serves the services a server clones for every request (each starts from
/// an original that never calls) and a balancer below that calls a different endpoint each
/// time. Both hold the breaker weakly and a copy of the key: an evicted breaker goes (and its
/// subscribers' stream ends) whatever was called last; the copies of up to four keys stay
/// with a thread until it looks up others or ends.
pub struct KeyedCircuitBreaker<S, C, K, Key> {
    inner: S,
    map: Arc<KeyedMap<Key, C>>,
    extract: K,
    last: Option<Memo<Key, C>>,
}

impl
    KeyedCircuitBreaker<
        (),
        steadfast_core::DefaultClassifier,
        crate::ByAuthority,
        Option<http::uri::Authority>,
    >
{
    /// A layer of one breaker per upstream authority, with the defaults (see
    /// [`CircuitBreakerBuilder::build_per_authority`](crate::CircuitBreakerBuilder::build_per_authority)).
    pub fn layer() -> crate::KeyedCircuitBreakerLayer<
        steadfast_core::DefaultClassifier,
        crate::ByAuthority,
        Option<http::uri::Authority>,
    > {
        crate::CircuitBreakerLayer::builder()
            .build_per_authority()
            .expect("the defaults are valid")
    }
}

impl<S, C, K, Key> KeyedCircuitBreaker<S, C, K, Key> {
    pub(crate) fn new(inner: S, map: Arc<KeyedMap<Key, C>>, extract: K) -> Self {
        Self {
            inner,
            map,
            extract,
            last: None,
        }
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

impl<S: Clone, C, K: Clone, Key: Clone> Clone for KeyedCircuitBreaker<S, C, K, Key> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            map: self.map.clone(),
            extract: self.extract.clone(),
            last: self.last.clone(),
        }
    }
}

impl<S: fmt::Debug, C, K, Key> fmt::Debug for KeyedCircuitBreaker<S, C, K, Key> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreaker")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResB, C, K, Key> Service<Request<B>> for KeyedCircuitBreaker<S, C, K, Key>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    C: Classify<Response<ResB>> + 'static,
    K: ExtractKey<Key>,
    Key: BreakerKey,
{
    type Response = Response<BreakerBody<ResB, C>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let key = self.extract.extract(req.uri(), req.headers());
        let stripe = self.map.stripe_memo(key, &mut self.last);
        admit_and_call(Cow::Owned(stripe), &mut self.inner, req)
    }
}
