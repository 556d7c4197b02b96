//! The response futures of this crate's services.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use steadfast_core::{BoxError, saturating_add};
use tokio::time::{Instant, Sleep};

use crate::error::Elapsed;

pub use crate::body::BodyTimeoutFuture;
pub use crate::server::SetDeadlineFuture;

pin_project! {
    /// The response future of [`Timeout`](crate::Timeout).
    // The timer is armed lazily: a call whose inner future answers on its first poll never
    // touches the clock or the timer wheel.
    pub struct ResponseFuture<F> {
        // `None`: the call failed before it was sent (its deadline had already passed).
        #[pin]
        inner: Option<F>,
        // Built at the first `Pending` (so a call made outside a runtime may still be polled
        // inside one).
        #[pin]
        sleep: Option<Sleep>,
        // `None`: start counting at the first `Pending` (no inherited deadline).
        at: Option<Instant>,
        limit: Duration,
        inherited: bool,
    }
}

impl<F> ResponseFuture<F> {
    /// Timed from the first `Pending`, where the `Sleep` is built.
    #[inline]
    pub(crate) fn lazy(inner: F, limit: Duration) -> Self {
        Self::running(inner, None, limit, false)
    }

    /// Due by `at`.
    #[inline]
    pub(crate) fn at(inner: F, at: Instant, limit: Duration, inherited: bool) -> Self {
        Self::running(inner, Some(at), limit, inherited)
    }

    #[inline]
    fn running(inner: F, at: Option<Instant>, limit: Duration, inherited: bool) -> Self {
        Self {
            inner: Some(inner),
            sleep: None,
            at,
            limit,
            inherited,
        }
    }

    pub(crate) fn elapsed(elapsed: Elapsed) -> Self {
        Self {
            inner: None,
            sleep: None,
            at: None,
            limit: elapsed.limit(),
            inherited: elapsed.is_inherited(),
        }
    }

    /// The instant the call is due, when known: an inherited or propagated deadline, or the
    /// timer once armed. `None` for a lazy call that answered before it had to wait.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.at.or_else(|| self.sleep.as_ref().map(Sleep::deadline))
    }

    /// The limit in force.
    pub(crate) fn limit(&self) -> Duration {
        self.limit
    }

    /// Whether the limit comes from an inherited deadline.
    pub(crate) fn inherited(&self) -> bool {
        self.inherited
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    /// Kept small so callers inline it: the response goes straight through, and the timer
    /// (armed at the first `Pending`) lives out of line.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(elapsed(*this.limit, *this.inherited)));
        };
        if let Poll::Ready(r) = inner.poll(cx) {
            return Poll::Ready(r.map_err(Into::into));
        }
        poll_timer(this.sleep, this.at, *this.limit, *this.inherited, cx).map(Err)
    }
}

/// The error of a call whose limit fired, or that failed before it was sent (its deadline
/// had already passed).
#[cold]
fn elapsed(limit: Duration, inherited: bool) -> BoxError {
    Elapsed::new(limit, inherited).into()
}

/// The timer side of [`ResponseFuture::poll`]: arms the `Sleep` at the first `Pending` and
/// says whether the limit has fired.
///
/// Every timeout arms a timer of its own, even one nested in another timeout due earlier: a
/// timer below cannot be relied on to wake this task, since whatever sits between may drop
/// the call below, move it to another task or poll it with another waker, and then wait on
/// something with no timer at all.
#[inline(never)]
fn poll_timer(
    mut sleep: Pin<&mut Option<Sleep>>,
    at: &mut Option<Instant>,
    limit: Duration,
    inherited: bool,
    cx: &mut Context<'_>,
) -> Poll<BoxError> {
    if sleep.is_none() {
        // A lazy call starts counting at its first `Pending`.
        let due = *at.get_or_insert_with(|| saturating_add(Instant::now(), limit));
        sleep.set(Some(tokio::time::sleep_until(due)));
    }
    if sleep
        .as_pin_mut()
        .expect("armed above")
        .poll(cx)
        .is_pending()
    {
        return Poll::Pending;
    }
    #[cfg(feature = "metrics")]
    metrics::counter!("steadfast_timeout_elapsed_total", "side" => "client").increment(1);
    tracing::debug!(
        target: "steadfast::timeout",
        limit_ms = limit.as_millis() as u64,
        inherited,
        "elapsed"
    );
    Poll::Ready(elapsed(limit, inherited))
}
