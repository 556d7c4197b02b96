//! Response futures, and the body that holds a call's permit until it ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use steadfast_core::{BoxError, GrpcCode, is_grpc_content_type};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::error::LimitExceeded;
use crate::limiter::{Limiter, Permit, Slot};

pin_project! {
    /// The response body of a limited call: holds the call's permit until the body ends (its
    /// last frame, or an error) or is dropped, whichever comes first. Size hints and
    /// end-of-stream are the inner body's.
    pub struct LimitBody<B> {
        #[pin]
        inner: B,
        permit: Option<Permit>,
        // What the head said: the upstream signalled overload.
        dropped: bool,
        // A gRPC response whose status comes in the trailers (until they bring one).
        grpc: bool,
    }

    impl<B> PinnedDrop for LimitBody<B> {
        // A body dropped before its end: the head arrived, so the upstream answered. An HTTP
        // answer is a sample timed to the drop (a lower bound of the call's time, with the
        // head's overload verdict), and so is a gRPC answer whose head already said overload
        // (trailers can only add to that); one whose status was still to come teaches nothing.
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(permit) = this.permit.take() {
                if *this.grpc && !*this.dropped {
                    drop(permit);
                } else {
                    permit.finish(*this.dropped);
                }
            }
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for LimitBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitBody")
            .field("inner", &self.inner)
            .field("holds_permit", &self.permit.is_some())
            .finish()
    }
}

impl<B> LimitBody<B> {
    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Whether the body still holds its call's permit.
    pub fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }
}

impl<B: Body> LimitBody<B> {
    /// Wraps a response's body: a body already at its end gives the permit back at once.
    #[inline]
    pub(crate) fn wrap(res: Response<B>, permit: Permit) -> Response<Self> {
        let at_end = res.body().is_end_stream();
        if !permit.samples() {
            // A fixed limit learns nothing from the answer: no need to read the head.
            let permit = (!at_end).then_some(permit);
            return res.map(|inner| LimitBody {
                inner,
                permit,
                dropped: false,
                grpc: false,
            });
        }
        let dropped = overload_status(res.status(), res.headers());
        let grpc =
            is_grpc_content_type(res.headers()) && GrpcCode::from_map(res.headers()).is_none();
        let permit = if at_end {
            finish_at_end(permit, grpc, dropped);
            None
        } else {
            Some(permit)
        };
        res.map(|inner| LimitBody {
            inner,
            permit,
            dropped,
            grpc,
        })
    }
}

/// A body seen to its end: a sample, unless it is a gRPC answer that never carried a status
/// (a broken answer teaches nothing), with an overload verdict (a head that said overload
/// still does).
fn finish_at_end(permit: Permit, grpc_without_status: bool, dropped: bool) {
    if grpc_without_status && !dropped {
        drop(permit);
    } else {
        permit.finish(dropped);
    }
}

/// Whether a response head signals overload: 429, 503, 504, or a gRPC status (in the head) of
/// `RESOURCE_EXHAUSTED`, `UNAVAILABLE` or `DEADLINE_EXCEEDED`.
pub(crate) fn overload_status(status: StatusCode, headers: &HeaderMap) -> bool {
    matches!(status.as_u16(), 429 | 503 | 504)
        || GrpcCode::from_map(headers).is_some_and(overload_code)
}

fn overload_code(code: GrpcCode) -> bool {
    matches!(
        code,
        GrpcCode::ResourceExhausted | GrpcCode::Unavailable | GrpcCode::DeadlineExceeded
    )
}

impl<B: Body> Body for LimitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if this.permit.is_some() {
            match &frame {
                None => {
                    if let Some(p) = this.permit.take() {
                        finish_at_end(p, *this.grpc, *this.dropped);
                    }
                }
                Some(Ok(f)) => {
                    let trailers = f.trailers_ref();
                    if let (Some(t), true) = (trailers, *this.grpc) {
                        if let Some(code) = GrpcCode::from_map(t) {
                            *this.dropped |= overload_code(code);
                            *this.grpc = false; // the status came
                        }
                    }
                    if trailers.is_some() || this.inner.is_end_stream() {
                        if let Some(p) = this.permit.take() {
                            finish_at_end(p, *this.grpc, *this.dropped);
                        }
                    }
                }
                // A broken body: the permit goes back, and the call teaches an adaptive limit
                // nothing.
                Some(Err(_)) => drop(this.permit.take()),
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

pin_project! {
    /// A call that waits for a permit: the service it made ready, its request, and the wait.
    struct Wait<S, Req> {
        service: Option<S>,
        req: Option<Req>,
        #[pin]
        sleep: Sleep,
        since: Instant,
        // Its place in the queue until it gets a permit or gives up.
        queued: Option<Queued>,
    }
}

/// A waiter's place in the queue; dropping it leaves the queue (a permit handed to it
/// meanwhile goes on to the next waiter).
struct Queued {
    limiter: Arc<Limiter>,
    slot: Arc<Slot>,
}

impl Queued {
    /// Leaves the queue, with the permit handed over meanwhile, if any (leaving twice is
    /// harmless: the second time finds neither).
    fn leave(&self) -> Option<Permit> {
        self.limiter.leave(&self.slot)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        drop(self.leave());
    }
}

pin_project! {
    /// The admission shared by the client and the answering service: the inner call with its
    /// permit, a wait for one, or a refusal.
    #[project = AdmissionProj]
    pub(crate) enum Admission<S, Req, F> {
        Called {
            #[pin]
            fut: F,
            permit: Option<Permit>,
        },
        Waiting {
            // Boxed: most calls never wait, and every call's future carries the largest state.
            wait: Pin<Box<Wait<S, Req>>>,
            limiter: Arc<Limiter>,
        },
        Refused {
            refusal: LimitExceeded,
        },
        Done,
    }
}

/// What an admission ends with: the inner outcome and the call's permit, or a refusal.
pub(crate) type Admitted<T, E> = Result<(Result<T, E>, Permit), LimitExceeded>;

impl<S, Req, F> Admission<S, Req, F> {
    pub(crate) fn called(fut: F, permit: Permit) -> Self {
        Admission::Called {
            fut,
            permit: Some(permit),
        }
    }

    pub(crate) fn refused(refusal: LimitExceeded) -> Self {
        Admission::Refused { refusal }
    }

    /// A call that waits up to `until` for a permit, queued in `slot`.
    pub(crate) fn waiting(
        service: S,
        req: Req,
        limiter: Arc<Limiter>,
        slot: Arc<Slot>,
        until: Instant,
    ) -> Self {
        let now = Instant::now();
        Admission::Waiting {
            wait: Box::pin(Wait {
                service: Some(service),
                req: Some(req),
                sleep: tokio::time::sleep_until(until),
                since: now,
                queued: Some(Queued {
                    limiter: limiter.clone(),
                    slot,
                }),
            }),
            limiter,
        }
    }
}

impl<S, Req, F, T, E> Admission<S, Req, F>
where
    S: Service<Req, Future = F>,
    F: Future<Output = Result<T, E>>,
{
    pub(crate) fn poll_admitted(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Admitted<T, E>> {
        loop {
            match self.as_mut().project() {
                AdmissionProj::Called { fut, permit } => {
                    let out = ready!(fut.poll(cx));
                    let permit = permit.take().expect("polled after completion");
                    self.set(Admission::Done);
                    return Poll::Ready(Ok((out, permit)));
                }
                AdmissionProj::Refused { refusal } => {
                    let refusal = *refusal;
                    self.set(Admission::Done);
                    return Poll::Ready(Err(refusal));
                }
                AdmissionProj::Waiting { wait, limiter } => {
                    let limiter = limiter.clone();
                    let w = wait.as_mut().project();
                    let queued = w.queued.as_ref().expect("queued until admitted or refused");
                    let mut admitted = queued.slot.poll_permit(cx.waker());
                    if admitted.is_none() && w.sleep.poll(cx).is_ready() {
                        // Out of time; a permit handed over at the last moment is still used.
                        admitted = w.queued.take().and_then(|q| q.leave());
                        if admitted.is_none() {
                            let refusal = LimitExceeded::new(limiter.limit(), w.since.elapsed());
                            tracing::debug!(target: "steadfast::limit", limit = %limiter.name, waited = ?refusal.waited(), "no permit within the wait; refused");
                            #[cfg(feature = "metrics")]
                            crate::record_rejected(&limiter.name);
                            self.set(Admission::refused(refusal));
                            continue;
                        }
                    }
                    match admitted {
                        Some(permit) => {
                            // Handed over: it has left the queue already.
                            drop(w.queued.take());
                            let mut service = w.service.take().expect("waits once");
                            let req = w.req.take().expect("waits once");
                            // The service was made ready for this call before it waited.
                            let fut = service.call(req);
                            self.set(Admission::called(fut, permit));
                        }
                        None => return Poll::Pending,
                    }
                }
                AdmissionProj::Done => panic!("limited call polled after completion"),
            }
        }
    }
}

pin_project! {
    /// The response future of [`ConcurrencyLimit`](crate::ConcurrencyLimit).
    pub struct ResponseFuture<S, Req, F> {
        #[pin]
        admission: Admission<S, Req, F>,
    }
}

impl<S, Req, F> ResponseFuture<S, Req, F> {
    pub(crate) fn new(admission: Admission<S, Req, F>) -> Self {
        Self { admission }
    }
}

impl<S, Req, F> fmt::Debug for ResponseFuture<S, Req, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, Req, F, ResB, E> Future for ResponseFuture<S, Req, F>
where
    S: Service<Req, Future = F>,
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
    ResB: Body,
{
    type Output = Result<Response<LimitBody<ResB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(self.project().admission.poll_admitted(cx)) {
            Ok((Ok(res), permit)) => Ok(LimitBody::wrap(res, permit)),
            Ok((Err(e), permit)) => {
                let e: BoxError = e.into();
                finish_on_error(permit, &*e);
                Err(e)
            }
            Err(refusal) => Err(Box::new(refusal)),
        })
    }
}

/// An error instead of a response: a timeout teaches an adaptive limit that the upstream is
/// overloaded; any other error teaches it nothing.
pub(crate) fn finish_on_error(permit: Permit, err: &(dyn std::error::Error + 'static)) {
    if steadfast_core::TimedOut::is_in(err) {
        permit.finish(true);
    } else {
        drop(permit);
    }
}
pub use crate::answer::AnsweringFuture;
