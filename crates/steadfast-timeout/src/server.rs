use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use steadfast_core::{
    Deadline, GrpcCode, ResponseBody, grpc_response, http_response, is_grpc_content_type,
};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::layer::SetDeadlineLayer;
use crate::propagate;

const MESSAGE: &str = "deadline exceeded\n";
const GRPC_MESSAGE: &str = "Timeout expired";

/// The server-side deadline service; see [`SetDeadlineLayer`].
///
/// # Clone
///
/// Clones share only configuration (one `Arc`: hosts clone the service for every request);
/// there is no per-instance state.
#[derive(Clone, Debug)]
pub struct SetDeadline<S> {
    inner: S,
    config: Arc<SetDeadlineLayer>,
}

impl SetDeadline<()> {
    /// A layer with limit `limit` and the defaults.
    pub const fn layer(limit: std::time::Duration) -> SetDeadlineLayer {
        SetDeadlineLayer::new(limit)
    }
}

impl<S> SetDeadline<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, config: SetDeadlineLayer) -> Self {
        Self {
            inner,
            config: Arc::new(config),
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SetDeadline<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResponseBody<DeadlineBody<ResBody>>>;
    type Error = S::Error;
    type Future = SetDeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let grpc = is_grpc_content_type(req.headers());
        let inbound = if self.config.trust_inbound {
            propagate::inbound(req.headers(), &self.config.header)
        } else {
            // Every deadline header steadfast reads, the default one too, whatever this layer
            // is set to read: a handler that forwards headers must not pass them on.
            let headers = req.headers_mut();
            headers.remove(&steadfast_core::header::GRPC_TIMEOUT);
            headers.remove(&steadfast_core::header::TIMEOUT_MS);
            headers.remove(&self.config.header);
            None
        };
        let limit = inbound.map_or(self.config.limit, |i| i.min(self.config.limit));
        let now = Instant::now();
        // The caller's own deadline also holds while the response body is produced.
        let caller = inbound.map(|i| Deadline::after_from(now, i));
        // An earlier deadline already on the request (set by an outer layer) also holds.
        let deadline = Deadline::earliest(
            Some(Deadline::after_from(now, limit)),
            req.extensions().get::<Deadline>().copied(),
        )
        .expect("one side is Some");
        let on_expiry = Expiry {
            grpc,
            status: self.config.status,
        };
        // `now` stands for the present: no second clock read for this check.
        if deadline.instant() <= now {
            tracing::debug!(target: "steadfast::timeout", grpc, "inbound deadline already passed");
            return SetDeadlineFuture {
                state: ServerState::Expired { on_expiry },
            };
        }
        req.extensions_mut().insert(deadline);
        let inner = deadline.sync_scope(|| self.inner.call(req));
        SetDeadlineFuture {
            state: ServerState::Running {
                inner: Some(inner),
                sleep: None,
                deadline,
                caller,
                on_expiry,
            },
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Expiry {
    grpc: bool,
    status: StatusCode,
}

impl Expiry {
    fn respond<B>(self) -> Response<ResponseBody<B>> {
        if self.grpc {
            grpc_response(GrpcCode::DeadlineExceeded, GRPC_MESSAGE)
        } else {
            http_response(self.status, MESSAGE)
        }
    }
}

pin_project! {
    /// The response future of [`SetDeadline`].
    ///
    /// The deadline is ambient (`Deadline::current`; set on the thread around each poll, not
    /// a task-local) while the handler's future is polled and while it is dropped. The scope
    /// is entered around each poll here rather than by wrapping the handler in a scoped
    /// future: one future less to move every response through.
    pub struct SetDeadlineFuture<F> {
        #[pin]
        state: ServerState<F>,
    }

    impl<F> PinnedDrop for SetDeadlineFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // A cancelled handler's drop glue still sees its deadline.
            if let ServerStateProj::Running { mut inner, deadline, .. } =
                this.project().state.project()
            {
                deadline.sync_scope(|| inner.set(None));
            }
        }
    }
}

pin_project! {
    #[project = ServerStateProj]
    enum ServerState<F> {
        Running {
            // `None` only while being dropped.
            #[pin]
            inner: Option<F>,
            #[pin]
            sleep: Option<Sleep>,
            deadline: Deadline,
            // The deadline the caller sent, if it sent one.
            caller: Option<Deadline>,
            on_expiry: Expiry,
        },
        Expired {
            on_expiry: Expiry,
        },
    }
}

impl<F> fmt::Debug for SetDeadlineFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetDeadlineFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for SetDeadlineFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<DeadlineBody<B>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            ServerStateProj::Running {
                inner,
                mut sleep,
                deadline,
                caller,
                on_expiry,
            } => {
                let Some(inner) = inner.as_pin_mut() else {
                    unreachable!("the handler's future is only gone while dropped");
                };
                if let Poll::Ready(r) = deadline.sync_scope(|| inner.poll(cx)) {
                    let caller = *caller;
                    return Poll::Ready(r.map(|res| {
                        res.map(|inner| ResponseBody::inner(DeadlineBody::new(inner, caller)))
                    }));
                }
                if sleep.is_none() {
                    // Our own timer, even while the handler waits on a client call with an
                    // earlier one (see the client timeout's `poll_timer`).
                    sleep.set(Some(tokio::time::sleep_until(deadline.instant())));
                }
                ready!(sleep.as_pin_mut().expect("armed above").poll(cx));
                #[cfg(feature = "metrics")]
                metrics::counter!("steadfast_timeout_elapsed_total", "side" => "server")
                    .increment(1);
                tracing::debug!(target: "steadfast::timeout", grpc = on_expiry.grpc, "server deadline exceeded");
                Poll::Ready(Ok(on_expiry.respond()))
            }
            ServerStateProj::Expired { on_expiry } => Poll::Ready(Ok(on_expiry.respond())),
        }
    }
}

pin_project! {
    /// The response body of [`SetDeadline`]. When the caller sent a deadline (`grpc-timeout`,
    /// the deadline header), it is ambient while each frame is produced and while the body
    /// is dropped before its end, so calls a streamed body makes after the handler has
    /// returned get what remains of the caller's time. The layer's own limit is not: it
    /// bounds how long the handler takes to answer, and a stream (an SSE feed) may rightly
    /// outlive it. Frames, end of stream and size hints pass through unchanged; the body is
    /// not cut at the deadline.
    pub struct DeadlineBody<B> {
        // `None` only while being dropped.
        #[pin]
        inner: Option<B>,
        caller: Option<Deadline>,
    }

    impl<B> PinnedDrop for DeadlineBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(deadline) = *this.caller {
                let mut inner = this.inner;
                deadline.sync_scope(|| inner.set(None));
            }
        }
    }
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, caller: Option<Deadline>) -> Self {
        Self {
            inner: Some(inner),
            caller,
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for DeadlineBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineBody")
            .field("inner", &self.inner)
            .field("caller", &self.caller)
            .finish()
    }
}

impl<B: Body> Body for DeadlineBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let Some(mut inner) = this.inner.as_pin_mut() else {
            unreachable!("a DeadlineBody is only empty while dropped");
        };
        let Some(deadline) = *this.caller else {
            return inner.poll_frame(cx);
        };
        let frame = deadline.sync_scope(|| inner.as_mut().poll_frame(cx));
        if matches!(frame, Poll::Ready(None)) || inner.is_end_stream() {
            // Ended: nothing of the body runs any more, its drop included.
            *this.caller = None;
        }
        frame
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
