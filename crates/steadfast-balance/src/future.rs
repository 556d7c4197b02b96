//! The response future of [`Balance`](crate::Balance).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use steadfast_core::{BoxError, Class, Classify, PolicyRejected, ResponseClass};

use crate::endpoint::Endpoint;
use crate::error::{NoEndpoint, Rerouted};
use crate::set::{Reason, Shared};

/// What an outcome tells the balancer about its endpoint.
#[derive(Clone, Copy)]
enum Verdict {
    Success,
    Failure,
    /// The endpoint shed the call ([`Class::overloaded`]).
    Shed,
}

impl Verdict {
    #[inline]
    fn of(class: Class) -> Self {
        if class.is_failure() {
            Self::Failure
        } else if class.is_overload() {
            Self::Shed
        } else {
            Self::Success
        }
    }
}

/// One call's hold on its endpoint: counts it in flight until the outcome (or the drop).
pub(crate) struct Guard<C> {
    shared: Arc<Shared<C>>,
    endpoint: Arc<Endpoint>,
    started: u64,
    done: bool,
}

impl<C> Guard<C> {
    pub(crate) fn new(shared: Arc<Shared<C>>, endpoint: Arc<Endpoint>, started: u64) -> Self {
        Self {
            shared,
            endpoint,
            started,
            done: false,
        }
    }

    /// Reports the outcome: the latency (unless the call never left this process), a
    /// failure's penalty, and, for the outlier rules, success or failure. A shed answer
    /// (the endpoint said it is overloaded) gets the penalty, so the next calls go elsewhere
    /// for a while, but counts neither way for the outlier rules: a busy endpoint is not a
    /// broken one, and ejecting it would pile its load onto the others.
    fn report(mut self, verdict: Verdict, sent: bool) {
        self.done = true;
        let shared = &*self.shared;
        let ep = &*self.endpoint;
        ep.finish();
        let now = shared.now();
        if sent {
            let rtt = now.saturating_sub(self.started) as f64;
            ep.observe(rtt, now, shared.config.decay.as_secs_f64() * 1e9);
        }
        let failure = match verdict {
            Verdict::Success => false,
            Verdict::Failure => true,
            Verdict::Shed => {
                ep.failed(now);
                return;
            }
        };
        if failure {
            ep.failed(now);
        }
        ep.count(!failure);
        if failure {
            let n = ep.consecutive.fetch_add(1, Relaxed).saturating_add(1);
            if shared
                .config
                .consecutive_failures
                .is_some_and(|max| n >= max)
            {
                shared.eject(ep, now, Reason::ConsecutiveFailures);
            }
        } else if ep.consecutive.load(Relaxed) != 0 {
            ep.consecutive.store(0, Relaxed);
        }
    }
}

impl<C> Guard<C> {
    /// The endpoint's own breaker (or a limit below) refused the call, before anything was
    /// sent: no call for that endpoint for the failure penalty (2 s) while another can take
    /// it, then the next call there asks again. The refusal is no verdict on the endpoint
    /// (its breaker already judged it) and does not eject it: the breaker alone decides when
    /// it takes calls again (its open time, its probes, or a hand closing it). Returns
    /// whether another endpoint is in service to take the call.
    fn refused(mut self) -> (Arc<Endpoint>, bool) {
        self.done = true;
        let shared = &*self.shared;
        let ep = &self.endpoint;
        ep.finish();
        let now = shared.now();
        ep.refuse_until(
            now.saturating_add(crate::set::nanos(shared.config.failure_penalty))
                .max(1),
        );
        let other = shared
            .endpoints
            .load()
            .iter()
            .any(|e| !Arc::ptr_eq(e, ep) && shared.in_service(e, now));
        (ep.clone(), other)
    }
}

impl<C> Drop for Guard<C> {
    fn drop(&mut self) {
        if !self.done {
            // The caller gave up before an outcome: no verdict on the endpoint.
            self.endpoint.finish();
        }
    }
}

pin_project! {
    /// The response future of [`Balance`](crate::Balance).
    pub struct ResponseFuture<F, C> {
        #[pin]
        inner: Option<F>,
        guard: Option<Guard<C>>,
        failed: Option<NoEndpoint>,
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn passthrough(inner: F) -> Self {
        Self {
            inner: Some(inner),
            guard: None,
            failed: None,
        }
    }

    pub(crate) fn called(inner: F, guard: Guard<C>) -> Self {
        Self {
            inner: Some(inner),
            guard: Some(guard),
            failed: None,
        }
    }

    pub(crate) fn failed(err: NoEndpoint) -> Self {
        Self {
            inner: None,
            guard: None,
            failed: Some(err),
        }
    }
}

impl<F, C, B, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    C: Classify<Response<B>>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            let err = this.failed.take().expect("polled after completion");
            return Poll::Ready(Err(err.into()));
        };
        let out = ready!(inner.poll(cx)).map_err(Into::into);
        let Some(guard) = this.guard.take() else {
            return Poll::Ready(out);
        };
        let verdict = match &out {
            Ok(res) => match guard.shared.classifier.classify_response(res) {
                ResponseClass::Ready(class) => Verdict::of(class),
                // A gRPC status still to come in the trailers: judged by its head.
                ResponseClass::Deferred(_) => Verdict::Success,
            },
            // The endpoint's own breaker refused: nothing was sent. Hand the call back for
            // another endpoint when there is one.
            Err(e) if PolicyRejected::is_in(&**e) => {
                let (ep, other) = guard.refused();
                return Poll::Ready(match out {
                    Err(e) if other => Err(Rerouted::new(ep.authority.clone(), e).into()),
                    out => out,
                });
            }
            Err(e) => Verdict::of(guard.shared.classifier.classify_error(&**e)),
        };
        guard.report(verdict, true);
        Poll::Ready(out)
    }
}
