//! The response futures of this crate's services.

use std::cell::Cell;
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
        let (polled, below) = polled_with_wake_by(|| inner.poll(cx));
        if let Poll::Ready(r) = polled {
            return Poll::Ready(r.map_err(Into::into));
        }
        poll_timer(this.sleep, this.at, *this.limit, *this.inherited, below, cx).map(Err)
    }
}

std::thread_local! {
    /// While a timeout future polls its inner future: the earliest instant at which a timer
    /// armed below will wake the task (each timeout future that returns `Pending` reports
    /// the timer it relies on here). A timeout whose deadline is not earlier needs no timer
    /// of its own for that poll: the task is woken by then, and every poll checks again. In
    /// the client stack, the total timeout arms no timer while an attempt timeout (due by
    /// the total deadline at the latest) runs below it, only while the retry layer waits.
    static WAKE_BY: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Polls `poll` (a timeout future's inner future) and says by when a timer below it will
/// wake the task, if one reported (what the timeouts below report is theirs to tell us; the
/// slot is restored for an enclosing timeout).
#[inline]
pub(crate) fn polled_with_wake_by<T>(poll: impl FnOnce() -> T) -> (T, Option<Instant>) {
    let enclosing = WAKE_BY.try_with(Cell::take).ok().flatten();
    let polled = poll();
    let below = WAKE_BY.try_with(|w| w.replace(enclosing)).ok().flatten();
    (polled, below)
}

/// Tells an enclosing timeout future that this task will be woken by `at` at the latest.
#[inline]
pub(crate) fn report_wake_by(at: Instant) {
    let _ = WAKE_BY.try_with(|w| w.set(Some(w.get().map_or(at, |e| e.min(at)))));
}

/// The error of a call whose limit fired, or that failed before it was sent (its deadline
/// had already passed).
#[cold]
fn elapsed(limit: Duration, inherited: bool) -> BoxError {
    Elapsed::new(limit, inherited).into()
}

/// The timer side of [`ResponseFuture::poll`]: arms the `Sleep` unless a timer below will
/// wake the task by the deadline anyway (`below`), and says whether the limit has fired.
#[inline(never)]
fn poll_timer(
    mut sleep: Pin<&mut Option<Sleep>>,
    at: &mut Option<Instant>,
    limit: Duration,
    inherited: bool,
    below: Option<Instant>,
    cx: &mut Context<'_>,
) -> Poll<BoxError> {
    let timer = match sleep.as_mut().as_pin_mut() {
        Some(timer) => timer,
        None => {
            // A lazy call starts counting at its first `Pending`.
            let due = *at.get_or_insert_with(|| saturating_add(Instant::now(), limit));
            if let Some(below) = below.filter(|b| *b <= due) {
                report_wake_by(below);
                return Poll::Pending;
            }
            sleep.set(Some(tokio::time::sleep_until(due)));
            sleep.as_pin_mut().expect("armed above")
        }
    };
    let due = timer.deadline();
    if timer.poll(cx).is_pending() {
        report_wake_by(below.map_or(due, |b| b.min(due)));
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
