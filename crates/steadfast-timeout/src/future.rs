use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use steadfast_core::BoxError;
use tokio::time::{Instant, Sleep};

use crate::error::Elapsed;

pin_project! {
    /// The response future of [`Timeout`](crate::Timeout).
    ///
    /// The timer is armed lazily: a call whose inner future answers on its first poll never
    /// touches the clock or the timer wheel. Inside a tokio task whose recent calls did need
    /// their timer, it is built in `call` instead (see [`Timeout`](crate::Timeout#the-timer)).
    pub struct ResponseFuture<F> {
        // `None`: the call failed before it was sent (its deadline had already passed).
        #[pin]
        inner: Option<F>,
        // Built in `call` when the timer is predicted to be needed, else at the first
        // `Pending` (so a call made outside a runtime may still be polled inside one).
        #[pin]
        sleep: Option<Sleep>,
        // `None`: start counting at the first `Pending` (no inherited deadline).
        at: Option<Instant>,
        limit: Duration,
        inherited: bool,
        // The `Sleep` was built in `call` and has not been polled yet.
        unpolled: bool,
    }
}

thread_local! {
    /// Whether the last call on this thread that had to wait for its answer was inside a
    /// tokio task: then the next one builds its `Sleep` in `call`, in place, rather than at
    /// its first `Pending` (which costs a copy of the `Sleep` and a later clock read). Only a
    /// prediction: it never changes what a call does, only where its timer is built.
    static ARMED_IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Whether to build the `Sleep` in `call`: the thread's recent calls needed their timer,
/// and this one is made inside a tokio task (so a runtime, and its timer, is at hand).
#[inline]
fn arm_in_call() -> bool {
    ARMED_IN_TASK.get() && tokio::task::try_id().is_some()
}

impl<F> ResponseFuture<F> {
    /// Timed from the first `Pending`, where the `Sleep` is built (or from now, when it is
    /// built at once: see [`arm_in_call`]).
    #[inline]
    pub(crate) fn lazy(inner: F, limit: Duration) -> Self {
        if arm_in_call() {
            return Self::armed(inner, tokio::time::sleep(limit), None, limit, false);
        }
        Self::running(inner, None, limit, false)
    }

    /// Due by `at`.
    #[inline]
    pub(crate) fn at(inner: F, at: Instant, limit: Duration, inherited: bool) -> Self {
        if arm_in_call() {
            let sleep = tokio::time::sleep_until(at);
            return Self::armed(inner, sleep, Some(at), limit, inherited);
        }
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
            unpolled: false,
        }
    }

    /// With its `Sleep` already built, in place.
    #[inline]
    fn armed(
        inner: F,
        sleep: Sleep,
        at: Option<Instant>,
        limit: Duration,
        inherited: bool,
    ) -> Self {
        Self {
            inner: Some(inner),
            sleep: Some(sleep),
            at,
            limit,
            inherited,
            unpolled: true,
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

    pub(crate) fn elapsed(elapsed: Elapsed) -> Self {
        Self {
            inner: None,
            sleep: None,
            at: None,
            limit: elapsed.limit(),
            inherited: elapsed.is_inherited(),
            unpolled: false,
        }
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
            if *this.unpolled {
                // Built in `call` for nothing: this thread's calls answer at once again.
                ARMED_IN_TASK.set(false);
            }
            return Poll::Ready(r.map_err(Into::into));
        }
        *this.unpolled = false;
        poll_timer(this.sleep, *this.at, *this.limit, *this.inherited, cx).map(Err)
    }
}

/// The error of a call whose limit fired, or that failed before it was sent (its deadline
/// had already passed).
#[cold]
fn elapsed(limit: Duration, inherited: bool) -> BoxError {
    Elapsed::new(limit, inherited).into()
}

/// The timer side of [`ResponseFuture::poll`]: arms the `Sleep` if `call` did not, and says
/// whether the limit has fired.
#[inline(never)]
fn poll_timer(
    mut sleep: Pin<&mut Option<Sleep>>,
    at: Option<Instant>,
    limit: Duration,
    inherited: bool,
    cx: &mut Context<'_>,
) -> Poll<BoxError> {
    let timer = match sleep.as_mut().as_pin_mut() {
        Some(timer) => timer,
        None => {
            ARMED_IN_TASK.set(tokio::task::try_id().is_some());
            sleep.set(Some(match at {
                Some(at) => tokio::time::sleep_until(at),
                None => tokio::time::sleep(limit),
            }));
            sleep.as_pin_mut().expect("armed above")
        }
    };
    ready!(timer.poll(cx));
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

#[cfg(test)]
mod tests {
    use std::future::{pending, ready};

    use super::*;

    const LIMIT: Duration = Duration::from_secs(1);

    fn slow() -> ResponseFuture<std::future::Pending<Result<(), BoxError>>> {
        ResponseFuture::lazy(pending(), LIMIT)
    }

    fn fast() -> ResponseFuture<std::future::Ready<Result<(), BoxError>>> {
        ResponseFuture::lazy(ready(Ok(())), LIMIT)
    }

    async fn fires_at(fut: impl Future<Output = Result<(), BoxError>>, after: Duration) {
        let start = Instant::now();
        let e = fut.await.unwrap_err();
        assert!(e.is::<Elapsed>(), "{e}");
        assert_eq!(start.elapsed(), after);
    }

    /// The `Sleep` is built in `call` only inside a task, and only after a call on this
    /// thread had to wait; a call that then answers at once turns that off again. Either way
    /// the limit is the same.
    #[tokio::test(start_paused = true)]
    async fn the_timer_is_built_in_call_only_in_a_task_after_a_wait() {
        ARMED_IN_TASK.set(false);
        // The test body is not a task: always lazy, and it teaches nothing.
        fires_at(slow(), LIMIT).await;
        assert!(!ARMED_IN_TASK.get());
        assert!(slow().sleep.is_none());

        tokio::spawn(async {
            let first = slow();
            assert!(first.sleep.is_none(), "nothing learnt yet");
            fires_at(first, LIMIT).await;
            assert!(ARMED_IN_TASK.get(), "a wait inside a task is learnt");

            let built = slow();
            assert!(built.sleep.is_some() && built.unpolled);
            fires_at(built, LIMIT).await;

            let at = Instant::now() + Duration::from_millis(300);
            let due = ResponseFuture::at(
                pending::<Result<(), BoxError>>(),
                at,
                Duration::from_millis(300),
                true,
            );
            assert!(due.sleep.is_some());
            let start = Instant::now();
            let e = due.await.unwrap_err();
            let e = e.downcast_ref::<Elapsed>().expect("an Elapsed");
            assert!(e.is_inherited());
            assert_eq!(start.elapsed(), Duration::from_millis(300));

            let answered = fast();
            assert!(answered.sleep.is_some());
            answered.await.unwrap();
            assert!(!ARMED_IN_TASK.get(), "an answer at once is learnt too");
            assert!(fast().sleep.is_none());
        })
        .await
        .unwrap();
    }
}
