//! The response futures of the breaker services, and the body that reports a streamed outcome.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use steadfast_core::header::{Pushback, server_hint};
use steadfast_core::{BoxError, Class, Classify, Delivery, GrpcClassifier, ResponseClass};
use tokio::time::Instant;

use crate::breaker::Stripe;
use crate::error::BreakerOpen;

pub use crate::answer::AnsweringFuture;
#[cfg(feature = "metrics")]
use crate::state::Outcome;
use crate::state::{FailureSummary, Permit, nanos};

pin_project! {
    /// The breaker's response body: the inner body, plus (for a gRPC response whose status
    /// comes in trailers) the duty to report that status at end of stream.
    ///
    /// Data frames pass through untouched and are never buffered. The trailers frame is read
    /// for `grpc-status`; a stream that ends without one counts as UNKNOWN, a body error as a
    /// failure. A body dropped before its end reports nothing (and a probe's permit goes
    /// back). For every other response the verdict was reported with the head, and the
    /// wrapper adds one word: the deferred duty is boxed, so plain HTTP responses stay small
    /// (an allocation per streamed gRPC response instead of 40 bytes on every response).
    pub struct BreakerBody<B, C> {
        #[pin]
        inner: B,
        deferred: Option<Box<Deferred<C>>>,
    }
}

/// A gRPC verdict still to come: who to tell, and how to read the trailers.
struct Deferred<C> {
    guard: Guard<C>,
    grpc: GrpcClassifier,
}

impl<B, C> BreakerBody<B, C> {
    #[inline]
    fn reported(inner: B) -> Self {
        Self {
            inner,
            deferred: None,
        }
    }

    fn deferred(inner: B, guard: Guard<C>, grpc: GrpcClassifier) -> Self {
        Self {
            inner,
            deferred: Some(Box::new(Deferred { guard, grpc })),
        }
    }
}

impl<B: fmt::Debug, C> fmt::Debug for BreakerBody<B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerBody")
            .field("inner", &self.inner)
            .field("deferred", &self.deferred.is_some())
            .finish()
    }
}

impl<B: Body, C> Body for BreakerBody<B, C> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let verdict = match this.deferred {
            Some(d) => d.grpc.classify_frame(frame.as_ref()),
            None => None,
        };
        if let Some(class) = verdict {
            if let Some(d) = this.deferred.take() {
                if class.is_failure() {
                    let code = match &frame {
                        Some(Ok(f)) => f
                            .trailers_ref()
                            .and_then(steadfast_core::GrpcCode::from_map),
                        _ => None,
                    };
                    d.guard.note_failure(match code {
                        Some(code) => FailureSummary::Grpc(code),
                        None => FailureSummary::Error("_OTHER"),
                    });
                }
                d.guard.report(Some(class), None);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An admitted call's duty to report its outcome exactly once.
///
/// Kept small (it rides in every response future and, for gRPC, in the response body): the
/// permit is packed into one word.
pub(crate) struct Guard<C> {
    stripe: Arc<Stripe<C>>,
    /// The permit, packed: the admitting state word, with [`PROBE`] set for a half-open
    /// probe; [`REPORTED`] once reported.
    permit: u64,
    /// When the call started; `None` when nothing needs its duration.
    start: Option<Instant>,
}

/// Marks a packed probe permit. State words never reach it: their generation would need
/// 2^60 transitions.
const PROBE: u64 = 1 << 63;
/// A packed permit already reported (it has the [`PROBE`] bit, so the fast path skips it).
const REPORTED: u64 = u64::MAX;

fn pack(permit: Permit) -> u64 {
    match permit {
        Permit::Pass(w) => w,
        Permit::Probe(w) => w | PROBE,
    }
}

impl<C> Guard<C> {
    #[inline]
    pub(crate) fn new(stripe: Arc<Stripe<C>>, permit: Permit) -> Self {
        // Inside a timeout's call, the instant it just read: no clock read of its own.
        let start = stripe
            .timed
            .then(|| steadfast_core::Deadline::call_now().unwrap_or_else(Instant::now));
        Self {
            stripe,
            permit: pack(permit),
            start,
        }
    }

    /// Notes the failure this call is about to report, if it still counts: admitted in the
    /// breaker's current generation (an outcome voided by a reset or a later transition is
    /// not the last failure counted).
    fn note_failure(&self, summary: FailureSummary) {
        if self.permit == REPORTED {
            return;
        }
        let admitted = self.permit & !PROBE;
        if self.stripe.shared.word() >> 3 == admitted >> 3 {
            self.stripe.shared.note_failure(summary);
        }
    }

    /// Takes the permit (once).
    fn take(&mut self) -> Option<Permit> {
        let p = std::mem::replace(&mut self.permit, REPORTED);
        match p {
            REPORTED => None,
            p if p & PROBE != 0 => Some(Permit::Probe(p & !PROBE)),
            p => Some(Permit::Pass(p)),
        }
    }

    /// Reports the outcome. The common case (a success that changes nothing) is decided
    /// inline; everything else goes through [`report_slow`](Self::report_slow).
    #[inline]
    fn report(mut self, class: Option<Class>, hint: Option<Duration>) {
        if let Some(c) = class {
            if self.report_noop(c) {
                return;
            }
        }
        self.report_slow(class, hint);
    }

    /// Settles the common case in place: a success on a pass permit (not a probe, not
    /// reported) when it would change nothing, unless the policy needs its duration (the
    /// `metrics` feature's histogram gets it here). `false`: report it properly.
    #[inline]
    fn report_noop(&mut self, c: Class) -> bool {
        let w = self.permit;
        if w & PROBE == 0
            && !c.is_failure()
            && !c.is_overload()
            && !self.stripe.policy_timed
            && self.stripe.shared.success_is_noop(w)
        {
            #[cfg(feature = "metrics")]
            if let Some(start) = self.start {
                self.stripe
                    .shared
                    .meta
                    .record_duration(Outcome::Success, start.elapsed().as_secs_f64());
            }
            self.permit = REPORTED;
            return true;
        }
        false
    }

    #[inline(never)]
    fn report_slow(mut self, class: Option<Class>, hint: Option<Duration>) {
        let Some(permit) = self.take() else {
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
            // A shed answer: the upstream is busy, not broken. Counted neither way; a
            // probe's permit goes back, so the next call probes.
            Some(c) if c.is_overload() => {
                #[cfg(feature = "metrics")]
                if let Some(start) = self.start {
                    shared
                        .meta
                        .record_duration(Outcome::Shed, start.elapsed().as_secs_f64());
                }
                if let Permit::Probe(w) = permit {
                    shared.return_answered_probe(w);
                }
            }
            Some(c) => {
                let took = self.start.map(|s| s.elapsed());
                #[cfg(feature = "metrics")]
                if let Some(took) = took {
                    shared
                        .meta
                        .record_duration(Outcome::of(c.is_failure()), took.as_secs_f64());
                }
                let slow =
                    took.is_some_and(|took| shared.slow_threshold().is_some_and(|t| took > t));
                if c.is_failure() {
                    self.stripe.failures.fetch_add(1, Relaxed);
                }
                if slow {
                    self.stripe.slow.fetch_add(1, Relaxed);
                }
                let micros = took.map(|t| nanos(t) / 1000);
                shared.on_timed_outcome(permit, c.is_failure(), slow, hint, micros);
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
        if let Some(permit) = self.take() {
            self.give_back(permit);
        }
    }
}

impl<C> fmt::Debug for Guard<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("reported", &(self.permit == REPORTED))
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// The response future of the breaker services.
    ///
    /// A flat struct rather than an enum of "called" and "rejected": the inner future is
    /// built straight into place (an enum made the compiler copy it twice more per call).
    pub struct ResponseFuture<F, C> {
        #[pin]
        inner: Option<F>,
        // `Ok` until the outcome is reported; `Err` for a rejected call.
        guard: Result<Option<Guard<C>>, BreakerOpen>,
    }
}

impl<F, C> ResponseFuture<F, C> {
    #[inline]
    pub(crate) fn called(inner: F, guard: Guard<C>) -> Self {
        Self {
            inner: Some(inner),
            guard: Ok(Some(guard)),
        }
    }

    pub(crate) fn rejected(err: BreakerOpen) -> Self {
        Self {
            inner: None,
            guard: Err(err),
        }
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// A server's hint of how long it wants callers to stay away, read only from failures (a
/// pushback that says "stop" has no length: no hint).
fn hint<B>(res: &Response<B>) -> Option<Duration> {
    match server_hint(res.headers(), SystemTime::now()) {
        Some(Pushback::After(d)) => Some(d),
        Some(Pushback::Stop) | None => None,
    }
}

impl<F, C, B, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    C: Classify<Response<B>>,
{
    type Output = Result<Response<BreakerBody<B, C>>, BoxError>;

    /// Kept small so callers inline it: a success that changes nothing goes straight
    /// through; every other outcome is settled out of line.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let guard = match this.guard {
            Ok(guard) => guard,
            Err(err) => return Poll::Ready(Err(rejected(*err))),
        };
        let Some(inner) = this.inner.as_pin_mut() else {
            unreachable!("a called future has its inner future");
        };
        let out = ready!(inner.poll(cx));
        let guard = guard.take().expect("polled after completion");
        Poll::Ready(match out {
            Ok(res) => Ok(classified(res, guard)),
            Err(e) => {
                let e = e.into();
                report_error(&*e, guard);
                Err(e)
            }
        })
    }
}

/// Reports a response's outcome and wraps its body. The breaker services share it; a success
/// that changes nothing goes straight through, every other outcome is settled out of line.
#[inline]
pub(crate) fn classified<B, C: Classify<Response<B>>>(
    res: Response<B>,
    mut guard: Guard<C>,
) -> Response<BreakerBody<B, C>> {
    match guard.stripe.classifier.classify_response(&res) {
        ResponseClass::Ready(class) if guard.report_noop(class) => res.map(BreakerBody::reported),
        class => settle(res, guard, class),
    }
}

#[cold]
fn rejected(err: BreakerOpen) -> BoxError {
    err.into()
}

/// Reports a response that is not a no-op success: a failure (with the server's hint), a
/// success that moves a window or closes the breaker, or a gRPC verdict still to come.
#[inline(never)]
fn settle<B, C>(
    res: Response<B>,
    guard: Guard<C>,
    class: ResponseClass,
) -> Response<BreakerBody<B, C>> {
    match class {
        ResponseClass::Ready(class) => {
            let h = if class.is_failure() {
                // A trailers-only gRPC answer: its status is in the head.
                let grpc = steadfast_core::is_grpc_content_type(res.headers())
                    .then(|| steadfast_core::GrpcCode::from_map(res.headers()))
                    .flatten();
                guard.note_failure(match grpc {
                    Some(code) => FailureSummary::Grpc(code),
                    None => FailureSummary::Status(res.status().as_u16()),
                });
                hint(&res)
            } else {
                None
            };
            guard.report(Some(class), h);
            res.map(BreakerBody::reported)
        }
        ResponseClass::Deferred(grpc) => res.map(|b| BreakerBody::deferred(b, guard, grpc)),
    }
}

/// Reports an inner error (the caller keeps it).
#[inline(never)]
pub(crate) fn report_error<C: Classify<Response<B>>, B>(
    e: &(dyn std::error::Error + Send + Sync + 'static),
    guard: Guard<C>,
) {
    let class = guard.stripe.classifier.classify_error(e);
    if class.is_failure() {
        guard.note_failure(FailureSummary::Error(steadfast_core::error_type(e)));
    }
    guard.report(Some(class), None);
}
