//! A deadline that covers the response body, not only its head.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use steadfast_core::{BoxError, saturating_add};
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

use crate::client::Timeout;
use crate::error::Elapsed;
use crate::future::ResponseFuture;
use crate::layer::TimeoutLayer;

/// A [`TimeoutLayer`] whose deadline also bounds the response **body**: a call never hangs,
/// even when the upstream sends its head at once and then trickles the body.
///
/// Made with [`BodyTimeoutLayer::new`] or
/// [`TimeoutBuilder::covering_body`](crate::TimeoutBuilder::covering_body). The head is timed
/// exactly as by the [`TimeoutLayer`]; the body then gets what is left of the same deadline (as a gRPC deadline
/// covers the whole call, and as reqwest's `timeout` runs until the body has been read). A body
/// frame that would arrive past the deadline ends the body with an [`Elapsed`] error instead.
/// The deadline bounds waiting for the upstream, not the caller's own pace: frames already
/// at hand are passed on however late the caller reads them, and a caller that starts
/// reading after the deadline gets what the transport hands over within
/// [`LATE_READ_GRACE`] (once per body, from its first wait past the deadline: hyper's HTTP/1
/// body passes data on frame by frame, each after a `Pending`: a few hundred KiB fit on an
/// idle machine, less under load). A wait that began before the deadline ends at the
/// deadline. The deadline runs from the call; when the head answered at its first
/// poll with no deadline known yet, from that poll (as a lazy [`TimeoutLayer`] counts).
///
/// Optionally, [`idle`](crate::BodyTimeoutBuilder::idle) also bounds the wait for each next
/// frame. For long-lived streams (server-sent events, gRPC server streaming) turn the body
/// deadline off with [`whole_call(false)`](crate::BodyTimeoutBuilder::whole_call): the head stays bounded, the body is not. The
/// deadline propagated downstream is the same either way.
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, StreamBody};
/// use steadfast_timeout::BodyTimeoutLayer;
/// use steadfast_timeout::error::Elapsed;
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// // An upstream that answers its head at once, then sends one byte a second, forever.
/// let trickle = service_fn(|_req: http::Request<()>| async {
///     let frames = futures_util::stream::unfold((), |()| async {
///         tokio::time::sleep(Duration::from_secs(1)).await;
///         Some((Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"x"))), ()))
///     });
///     Ok::<_, std::convert::Infallible>(http::Response::new(StreamBody::new(frames)))
/// });
/// let client = BodyTimeoutLayer::new(Duration::from_millis(2500)).layer(trickle);
/// let res = client.oneshot(http::Request::new(())).await.unwrap();
/// let err = res.into_body().collect().await.unwrap_err();
/// assert_eq!(err.downcast_ref::<Elapsed>().unwrap().limit(), Duration::from_millis(2500));
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct BodyTimeoutLayer {
    pub(crate) head: TimeoutLayer,
    pub(crate) whole_call: bool,
    pub(crate) idle: Option<Duration>,
}

impl BodyTimeoutLayer {
    /// A body-covering timeout of `limit` with the other settings at their defaults (see
    /// [`BodyTimeoutBuilder`](crate::BodyTimeoutBuilder)).
    pub const fn new(limit: Duration) -> Self {
        Self {
            head: TimeoutLayer::new(limit),
            whole_call: true,
            idle: None,
        }
    }

    /// A builder with the defaults ([`DEFAULT_TIMEOUT`](crate::DEFAULT_TIMEOUT), the body
    /// covered, no idle limit); the same as `TimeoutLayer::builder().covering_body()`.
    pub fn builder() -> crate::BodyTimeoutBuilder {
        TimeoutLayer::builder().covering_body()
    }

    /// The head's timeout layer.
    pub const fn head(&self) -> &TimeoutLayer {
        &self.head
    }
}

impl<S> Layer<S> for BodyTimeoutLayer {
    type Service = BodyTimeout<S>;

    fn layer(&self, inner: S) -> BodyTimeout<S> {
        BodyTimeout {
            inner: self.head.layer(inner),
            whole_call: self.whole_call,
            idle: self.idle,
        }
    }
}

/// The service of a [`BodyTimeoutLayer`]: a [`Timeout`] whose responses carry a
/// [`TimeoutBody`].
#[derive(Clone, Debug)]
pub struct BodyTimeout<S> {
    inner: Timeout<S>,
    whole_call: bool,
    idle: Option<Duration>,
}

impl BodyTimeout<()> {
    /// A layer whose deadline of `limit` covers the body, with the defaults.
    pub const fn layer(limit: Duration) -> BodyTimeoutLayer {
        BodyTimeoutLayer::new(limit)
    }
}

impl<S> BodyTimeout<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for BodyTimeout<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<TimeoutBody<ResB>>;
    type Error = BoxError;
    type Future = BodyTimeoutFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        BodyTimeoutFuture {
            inner: self.inner.call(req),
            whole_call: self.whole_call,
            idle: self.idle,
        }
    }
}

pin_project! {
    /// The response future of [`BodyTimeout`].
    pub struct BodyTimeoutFuture<F> {
        #[pin]
        inner: ResponseFuture<F>,
        whole_call: bool,
        idle: Option<Duration>,
    }
}

impl<F> fmt::Debug for BodyTimeoutFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyTimeoutFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for BodyTimeoutFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<TimeoutBody<B>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let res = ready!(this.inner.as_mut().poll(cx))?;
        let head = this.inner.as_ref().get_ref();
        let total = this.whole_call.then(|| Total {
            // Known when the call had a deadline or its timer was armed; else the head came
            // at its first poll, where a lazy timeout starts counting too.
            at: head
                .due()
                .unwrap_or_else(|| saturating_add(Instant::now(), head.limit())),
            limit: head.limit(),
            inherited: head.inherited(),
        });
        let clock = Clock {
            total,
            idle: *this.idle,
            idle_at: None,
            waiting: false,
            late_until: None,
        };
        Poll::Ready(Ok(res.map(|body| TimeoutBody {
            inner: body,
            sleep: None,
            clock,
            elapsed: false,
        })))
    }
}

/// The call's deadline as the body sees it.
#[derive(Clone, Copy, Debug)]
struct Total {
    at: Instant,
    limit: Duration,
    inherited: bool,
}

/// How long a body that starts waiting after the call's deadline has passed still waits:
/// long enough for the transport to hand over what it already received (hyper's HTTP/1
/// connection task passes a body on frame by frame, each after a `Pending`), far too short
/// to be time given to the upstream. One window per body, from its first late wait.
pub const LATE_READ_GRACE: Duration = Duration::from_millis(10);

/// When a body's wait ends.
#[derive(Debug)]
struct Clock {
    total: Option<Total>,
    idle: Option<Duration>,
    /// The end of the current idle period, set at the first wait after a frame.
    idle_at: Option<Instant>,
    /// Inside a wait (no frame since the last `Pending`).
    waiting: bool,
    /// The end of the late-read grace, once a wait began past the deadline.
    late_until: Option<Instant>,
}

pin_project! {
    /// A response body bounded by its call's deadline (and optionally an idle limit between
    /// frames); see [`BodyTimeoutLayer`]. The timer is armed only when the body has to wait,
    /// and boxed then, so the body is `Unpin` whenever the inner body is (as hyper's is), and
    /// `BodyExt::frame` works on it directly.
    pub struct TimeoutBody<B> {
        #[pin]
        inner: B,
        sleep: Option<Pin<Box<Sleep>>>,
        clock: Clock,
        // The body ended with `Elapsed`: nothing follows.
        elapsed: bool,
    }
}

impl<B> TimeoutBody<B> {
    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B> fmt::Debug for TimeoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutBody")
            .field("elapsed", &self.elapsed)
            .finish_non_exhaustive()
    }
}

impl<B> Body for TimeoutBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.project();
        if *this.elapsed {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            // The next wait starts a new idle period.
            this.clock.idle_at = None;
            this.clock.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.clock.total.is_none() && this.clock.idle.is_none() {
            return Poll::Pending;
        }
        let e = ready!(wait(this.sleep, this.clock, cx));
        *this.elapsed = true;
        Poll::Ready(Some(Err(e.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.elapsed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.elapsed {
            return SizeHint::with_exact(0);
        }
        // The body may end early with an error, never with more data than the inner has.
        self.inner.size_hint()
    }
}

/// The body is waiting on the upstream: arm (or move) the timer to the earlier of the
/// call's deadline and the end of the idle period, and say which fired.
#[inline(never)]
fn wait(
    sleep: &mut Option<Pin<Box<Sleep>>>,
    clock: &mut Clock,
    cx: &mut Context<'_>,
) -> Poll<Elapsed> {
    let now = Instant::now();
    let new_wait = !std::mem::replace(&mut clock.waiting, true);
    let mut due: Option<(Instant, Elapsed)> = None;
    if let Some(t) = clock.total {
        let mut at = t.at;
        if at <= now {
            // Past the deadline. A wait that began here (a caller reading late) gets one
            // short window, per body, for what the transport already holds; a wait that
            // began before the deadline and ran into it ends now.
            if new_wait && clock.late_until.is_none() {
                clock.late_until = Some(saturating_add(now, LATE_READ_GRACE));
            }
            if let Some(late) = clock.late_until {
                at = late;
            }
        }
        due = Some((at, Elapsed::new(t.limit, t.inherited)));
    }
    if let Some(limit) = clock.idle {
        let at = *clock
            .idle_at
            .get_or_insert_with(|| saturating_add(now, limit));
        if due.is_none_or(|(d, _)| at < d) {
            due = Some((at, Elapsed::idle(limit)));
        }
    }
    let Some((at, elapsed)) = due else {
        return Poll::Pending;
    };
    let timer = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
    if timer.deadline() != at {
        timer.as_mut().reset(at);
    }
    ready!(timer.as_mut().poll(cx));
    #[cfg(feature = "metrics")]
    metrics::counter!("steadfast_timeout_elapsed_total", "side" => "client_body").increment(1);
    tracing::debug!(
        target: "steadfast::timeout",
        limit_ms = elapsed.limit().as_millis() as u64,
        idle = elapsed.is_idle(),
        "response body elapsed"
    );
    Poll::Ready(elapsed)
}
