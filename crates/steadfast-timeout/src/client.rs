use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::Request;
use steadfast_core::{BoxError, Deadline, saturating_add};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::error::Elapsed;
use crate::future::ResponseFuture;
use crate::layer::{Own, TimeoutLayer};
use crate::propagate;

/// A per-request limit shorter than the layer's, set as a request extension.
///
/// Only ever shortens: the effective limit is the smaller of this and the layer's.
///
/// ```
/// use std::time::Duration;
/// use steadfast_timeout::RequestTimeout;
///
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(RequestTimeout(Duration::from_millis(250)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestTimeout(pub Duration);

/// The client-side timeout service; see [`TimeoutLayer`].
///
/// # When the limit starts
///
/// Without a deadline to honour, the limit counts from the first poll at which the call has to
/// wait: a future left unpolled after `call` is not timed until it is polled, and a call made
/// outside any runtime may be polled inside one. With a deadline (inherited, or
/// [`propagate_own`](crate::TimeoutBuilder::propagate_own)), the limit counts from `call`.
///
/// # Clone
///
/// Clones share nothing but configuration. A pending readiness wait (with
/// [`cover_ready`](crate::TimeoutBuilder::cover_ready)) belongs to the instance and is not
/// cloned.
// A call whose inner future answers on its first poll never touches the clock or the timer
// wheel: the `Sleep` is built at the first `Pending` (see `ResponseFuture::lazy`).
pub struct Timeout<S> {
    inner: S,
    /// Shared by clones (a retry layer clones the service below it for every call).
    config: Arc<Config>,
    ready_wait: Option<ReadyWait>,
    ready_expired: bool,
}

/// A readiness wait under way (with [`cover_ready`](crate::TimeoutBuilder::cover_ready)): its
/// timer, how long it is, and the waker of the task that waits.
struct ReadyWait {
    sleep: Pin<Box<Sleep>>,
    limit: Duration,
    waker: Waker,
}

impl ReadyWait {
    /// Whether this wait was abandoned (its caller cancelled) and a poll at `now` from `cx`
    /// starts a new one: polled from another task, or not polled until a whole limit past
    /// its end (its own timer would have woken a caller still waiting at its end).
    fn abandoned(&self, now: Instant, cx: &Context<'_>) -> bool {
        !self.waker.will_wake(cx.waker())
            || now.saturating_duration_since(self.sleep.deadline()) > self.limit
    }
}

impl Timeout<()> {
    /// A layer with limit `limit`.
    pub const fn layer(limit: Duration) -> TimeoutLayer {
        TimeoutLayer::new(limit)
    }
}

impl<S> Timeout<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, config: TimeoutLayer) -> Self {
        Self {
            inner,
            config: Arc::new(Config {
                own: propagate::Encoded::new(config.limit),
                layer: config,
            }),
            ready_wait: None,
            ready_expired: false,
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

impl<S: Clone> Clone for Timeout<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
            ready_wait: None,
            ready_expired: false,
        }
    }
}

/// A layer's settings, with its own limit as header values made once: written whenever the
/// limit is the layer's own (most calls), they cost a reference count, not an allocation and
/// an encoding.
#[derive(Debug)]
struct Config {
    layer: TimeoutLayer,
    own: propagate::Encoded,
}

impl<S: fmt::Debug> fmt::Debug for Timeout<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timeout")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("ready_expired", &self.ready_expired)
            .finish()
    }
}

impl<S, B> Service<Request<B>> for Timeout<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.ready_expired {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(r) => {
                if self.ready_wait.is_some() {
                    self.ready_wait = None;
                }
                Poll::Ready(r.map_err(Into::into))
            }
            Poll::Pending if !self.config.layer.cover_ready => Poll::Pending,
            Poll::Pending => self.poll_ready_wait(cx),
        }
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        if self.ready_expired {
            return self.ready_elapsed();
        }
        let own = match req.extensions().get::<RequestTimeout>() {
            Some(o) => o.0.min(self.config.layer.limit),
            None => self.config.layer.limit,
        };
        // A budget the caller wrote on the request (tonic's `Request::set_timeout` writes
        // `grpc-timeout`) is a deadline for the whole call, retries included. Read where no
        // steadfast client layer above is calling with a deadline in hand: below one, the
        // header is the one that layer wrote, and the deadline it entered is exact.
        let carried = if Deadline::call_now().is_none() {
            steadfast_core::header::carried_budget(req.headers(), &self.config.layer.header)
        } else {
            None
        };
        match Deadline::for_request(&req) {
            // The common case reads the request and hands it on untouched (no copy of it
            // to edit), and leaves the clock and the timer to the first `Pending`.
            // A zero limit takes the slow path, which refuses it before sending (as every
            // deadline already passed is refused), whether or not the call would pend.
            None if carried.is_none()
                && self.config.layer.own == Own::Unshared
                && !own.is_zero() =>
            {
                ResponseFuture::lazy(self.inner.call(req), own)
            }
            inherited => self.call_with_deadline(req, own, inherited, carried),
        }
    }
}

impl<S> Timeout<S> {
    /// The timer of a readiness wait (`cover_ready`): started at the first `Pending`, or
    /// again when the wait under way was abandoned.
    #[cold]
    fn poll_ready_wait(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let now = Instant::now();
        if self
            .ready_wait
            .as_ref()
            .is_some_and(|w| w.abandoned(now, cx))
        {
            self.ready_wait = None;
        }
        let wait = self.ready_wait.get_or_insert_with(|| {
            let limit = Deadline::current().map_or(self.config.layer.limit, |d| {
                d.remaining().min(self.config.layer.limit)
            });
            ReadyWait {
                sleep: Box::pin(tokio::time::sleep_until(saturating_add(now, limit))),
                limit,
                waker: cx.waker().clone(),
            }
        });
        match wait.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                // Not an error here (that would be final): the next call fails instead.
                self.ready_wait = None;
                self.ready_expired = true;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// The call after a readiness wait that ran out: fails without calling.
    #[cold]
    fn ready_elapsed<F>(&mut self) -> ResponseFuture<F> {
        self.ready_expired = false;
        tracing::debug!(target: "steadfast::timeout", limit_ms = self.config.layer.limit.as_millis() as u64, "ready wait elapsed");
        ResponseFuture::elapsed(Elapsed::new(self.config.layer.limit, false))
    }

    /// A call with a deadline to honour, let the layers below know, and (unless
    /// [`share_own`](crate::TimeoutBuilder::share_own) is set) write on the wire: an
    /// inherited one, the budget the caller wrote on the request (`carried`: `Some` when the
    /// request carries a budget header, valid or not; counted from now), or our own when the
    /// layer shares it.
    #[inline]
    fn call_with_deadline<B>(
        &mut self,
        mut req: Request<B>,
        own: Duration,
        inherited: Option<Deadline>,
        carried: Option<Option<Duration>>,
    ) -> ResponseFuture<S::Future>
    where
        S: Service<Request<B>>,
    {
        // Inside an outer timeout's call, the instant it just read: one clock read per call.
        let now = Deadline::call_now().unwrap_or_else(Instant::now);
        let asked = carried
            .flatten()
            .map(|asked| Deadline::after_from(now, asked));
        let inherited = Deadline::earliest(inherited, asked);
        let (limit, is_inherited) = match inherited {
            Some(d) => {
                let left = d.instant().saturating_duration_since(now);
                if left < own {
                    (left, true)
                } else {
                    (own, false)
                }
            }
            None => (own, false),
        };
        if limit.is_zero() {
            tracing::debug!(target: "steadfast::timeout", inherited = is_inherited, "deadline already passed; not sent");
            return ResponseFuture::elapsed(Elapsed::new(limit, is_inherited));
        }
        let deadline = Deadline::after_from(now, limit);
        if self.config.layer.own != Own::Shared {
            let own = Some(&self.config.own).filter(|_| limit == self.config.layer.limit);
            propagate::write(req.headers_mut(), limit, &self.config.layer.header, own);
        }
        if carried.is_some() {
            // The caller wrote a budget: every budget header leaves as one value, within it
            // (the one for the other protocol too, which `write` leaves alone).
            steadfast_core::header::clamp_budgets(
                req.headers_mut(),
                limit,
                &self.config.layer.header,
            );
        }
        // The layers below (retry, an attempt timeout, the transport) learn the deadline as
        // the ambient one while they are called: no request extension to allocate, and none
        // for a retry layer to copy into every attempt (it keeps the deadline itself).
        let fut = {
            let _entered = deadline.enter_at(now);
            self.inner.call(req)
        };
        ResponseFuture::at(fut, deadline.instant(), limit, is_inherited)
    }
}
