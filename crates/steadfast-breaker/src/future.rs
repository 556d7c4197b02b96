use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use http::Response;
use http::header::RETRY_AFTER;
use pin_project_lite::pin_project;
use steadfast_core::header::{GRPC_RETRY_PUSHBACK_MS, Pushback, pushback, retry_after};
use steadfast_core::{
    BoxError, Class, Classify, ClassifyEos, Delivery, GrpcClassifier, OnEos, ResponseClass,
};

use crate::breaker::Stripe;
use crate::error::BreakerOpen;
use crate::state::{Permit, nanos};

/// A response body that reports a streamed gRPC verdict to the breaker at end of stream
/// (pass-through for everything else).
pub type BreakerBody<B, C> = ClassifyEos<B, EosReport<C>>;

/// An admitted call's duty to report its outcome exactly once.
///
/// Kept small (it rides in every response future and, for gRPC, in the response body).
pub(crate) struct Guard<C> {
    stripe: Arc<Stripe<C>>,
    /// `None` once reported.
    permit: Option<Permit>,
    /// When the call started, as [`Shared::clock`](crate::state::Shared::clock) reads it;
    /// zero when the policy needs no timing.
    start: u64,
}

impl<C> Guard<C> {
    #[inline]
    pub(crate) fn new(stripe: Arc<Stripe<C>>, permit: Permit) -> Self {
        let start = if stripe.shared.needs_clock() {
            stripe.shared.clock()
        } else {
            0
        };
        Self {
            stripe,
            permit: Some(permit),
            start,
        }
    }

    /// Reports the outcome. The common case (a success that changes nothing) is decided
    /// inline; everything else goes through [`report_slow`](Self::report_slow).
    #[inline]
    fn report(mut self, class: Option<Class>, hint: Option<Duration>) {
        if let (Some(c), Some(Permit::Pass(w))) = (class, self.permit) {
            if !c.is_failure() && self.start == 0 && self.stripe.shared.success_is_noop(w) {
                self.permit = None;
                return;
            }
        }
        self.report_slow(class, hint);
    }

    fn report_slow(mut self, class: Option<Class>, hint: Option<Duration>) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let shared = &self.stripe.shared;
        match class {
            // No verdict: the call was dropped, or never reached the upstream (another layer's
            // policy refused it). A probe's permit goes back.
            None => self.give_back(permit),
            Some(c) if c.delivery() == Delivery::NotSent && !c.is_failure() => {
                self.give_back(permit);
            }
            Some(c) => {
                let slow = self.start != 0
                    && shared
                        .slow_threshold()
                        .is_some_and(|t| shared.clock().saturating_sub(self.start) >= nanos(t));
                if c.is_failure() {
                    self.stripe.failures.fetch_add(1, Relaxed);
                }
                if slow {
                    self.stripe.slow.fetch_add(1, Relaxed);
                }
                shared.on_outcome(permit, c.is_failure(), slow, hint);
            }
        }
    }

    fn give_back(&self, permit: Permit) {
        if let Permit::Probe(w) = permit {
            self.stripe.shared.return_probe(w);
        }
    }
}

impl<C> Drop for Guard<C> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.give_back(permit);
        }
    }
}

impl<C> fmt::Debug for Guard<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("permit", &self.permit)
            .finish()
    }
}

/// Reports a deferred (end-of-stream) verdict; see [`BreakerBody`].
pub struct EosReport<C>(Option<Guard<C>>);

impl<C> fmt::Debug for EosReport<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EosReport").field(&self.0.is_some()).finish()
    }
}

impl<C> OnEos for EosReport<C> {
    fn on_eos(self, class: Option<Class>) {
        if let Some(g) = self.0 {
            g.report(class, None);
        }
    }
}

pin_project! {
    /// The response future of the breaker services.
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: FutState<F, C>,
    }
}

pin_project! {
    #[project = FutProj]
    enum FutState<F, C> {
        Called {
            #[pin]
            inner: F,
            guard: Option<Guard<C>>,
        },
        Rejected {
            err: BreakerOpen,
        },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(inner: F, guard: Guard<C>) -> Self {
        Self {
            state: FutState::Called {
                inner,
                guard: Some(guard),
            },
        }
    }

    pub(crate) fn rejected(err: BreakerOpen) -> Self {
        Self {
            state: FutState::Rejected { err },
        }
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// A server's hint of how long it wants callers to stay away, read only from failures.
fn hint<B>(res: &Response<B>) -> Option<Duration> {
    let h = res.headers();
    if let Some(v) = h.get(GRPC_RETRY_PUSHBACK_MS) {
        if let Pushback::After(d) = pushback(v) {
            return Some(d);
        }
    }
    h.get(RETRY_AFTER)
        .and_then(|v| retry_after(v, SystemTime::now()))
}

impl<F, C, B, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    C: Classify<Response<B>>,
{
    type Output = Result<Response<BreakerBody<B, C>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            FutProj::Rejected { err } => Poll::Ready(Err((*err).into())),
            FutProj::Called { inner, guard } => {
                let out = ready!(inner.poll(cx));
                let guard = guard.take().expect("polled after completion");
                match out {
                    Ok(res) => {
                        let class = guard.stripe.classifier.classify_response(&res);
                        match class {
                            ResponseClass::Ready(class) => {
                                let h = if class.is_failure() { hint(&res) } else { None };
                                guard.report(Some(class), h);
                                Poll::Ready(Ok(res.map(|b| {
                                    ClassifyEos::new(b, GrpcClassifier::new(), EosReport(None))
                                })))
                            }
                            ResponseClass::Deferred(grpc) => Poll::Ready(Ok(
                                res.map(|b| ClassifyEos::new(b, grpc, EosReport(Some(guard))))
                            )),
                        }
                    }
                    Err(e) => {
                        let e: BoxError = e.into();
                        let class = guard.stripe.classifier.classify_error(&*e);
                        guard.report(Some(class), None);
                        Poll::Ready(Err(e))
                    }
                }
            }
        }
    }
}
