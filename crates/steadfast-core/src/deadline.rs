//! The ambient deadline: set by a server, read by every outgoing call made while handling it.
//!
//! A [`Deadline`] is an absolute point in tokio time. The server side of the timeout layer makes
//! it *ambient* for the handler with [`Deadline::scope`] (a tokio task-local) and also puts it in
//! the request's extensions. Client-side layers look it up with [`Deadline::for_request`]: the
//! earlier of the request's own extension (a caller may set one) and the ambient one. A client
//! timeout passes its deadline to the layers below it the same way, as the ambient deadline
//! while it calls them (a retry layer keeps it for its later attempts), not as an extension.
//! Task-locals do not cross `tokio::spawn`; wrap spawned work in [`Deadline::propagate`].

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::Instant;

tokio::task_local! {
    static CURRENT: Option<Deadline>;
}

std::thread_local! {
    /// The deadline of the `Service::call` being made on this thread (see
    /// [`Deadline::enter`]): set and restored around a synchronous call, so it costs a
    /// thread-local write, not a task-local scope that the call's future must be returned
    /// through.
    static CALL: Cell<Option<Deadline>> = const { Cell::new(None) };
    /// The instant the layer that entered the call's deadline read, for the layers below it
    /// in the same synchronous call (see [`Deadline::enter_at`]).
    static CALL_NOW: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// A point in (tokio) time by which a call must finish.
///
/// ```
/// use std::time::Duration;
/// use steadfast_core::Deadline;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let d = Deadline::after(Duration::from_secs(2));
/// assert_eq!(Deadline::current(), None);
/// let seen = d.scope(async { Deadline::current() }).await;
/// assert_eq!(seen, Some(d));
/// tokio::time::advance(Duration::from_millis(500)).await;
/// assert_eq!(d.remaining(), Duration::from_millis(1500));
/// # }
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline {
    at: Instant,
}

impl fmt::Debug for Deadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deadline")
            .field("remaining", &self.remaining())
            .finish()
    }
}

/// About thirty years: what "no deadline" saturates to (as tokio does).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `at + d`, never panicking: durations past about thirty years (`Duration::MAX` included,
/// the natural "no limit") count as thirty years, as tokio's own timers do. Every instant
/// the library computes from a configured or received duration goes through here.
///
/// ```
/// use std::time::Duration;
/// use steadfast_core::saturating_add;
/// use tokio::time::Instant;
///
/// let now = Instant::now();
/// assert!(saturating_add(now, Duration::MAX) > now); // no "overflow when adding duration"
/// assert_eq!(saturating_add(now, Duration::from_secs(1)), now + Duration::from_secs(1));
/// ```
#[inline]
pub fn saturating_add(at: Instant, d: Duration) -> Instant {
    match at.checked_add(d.min(FAR_FUTURE)) {
        Some(later) => later,
        // Only an instant itself near the end of the platform's range gets here.
        None => at,
    }
}

impl Deadline {
    /// A deadline at `at`.
    pub const fn at(at: Instant) -> Self {
        Self { at }
    }

    /// A deadline `d` from now; absurdly long durations saturate to about thirty years.
    #[inline]
    pub fn after(d: Duration) -> Self {
        Self::after_from(Instant::now(), d)
    }

    /// A deadline `d` after `now` (saves a clock read when the caller has one).
    #[inline]
    pub fn after_from(now: Instant, d: Duration) -> Self {
        Self {
            at: saturating_add(now, d),
        }
    }

    /// The instant.
    #[inline]
    pub const fn instant(self) -> Instant {
        self.at
    }

    /// Time left, zero once passed.
    pub fn remaining(self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed (`now >= at`).
    pub fn is_expired(self) -> bool {
        Instant::now() >= self.at
    }

    /// The earlier of two optional deadlines.
    #[inline]
    pub fn earliest(a: Option<Deadline>, b: Option<Deadline>) -> Option<Deadline> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, None) => a,
            (None, b) => b,
        }
    }

    /// The ambient deadline: the earlier of the current task's (a server or
    /// [`Deadline::scope`] set it) and the one [entered](Deadline::enter) for the call being
    /// made, if any.
    #[inline]
    pub fn current() -> Option<Deadline> {
        let call = CALL.try_with(Cell::get).ok().flatten();
        Self::earliest(call, CURRENT.try_with(|d| *d).ok().flatten())
    }

    /// Makes this deadline ambient on this thread until the guard is dropped: for the
    /// synchronous part of a call, as the steadfast client layers pass their deadline to the
    /// layers below while they call them (nothing is returned through a closure, unlike
    /// [`sync_scope`](Self::sync_scope), which is built on it). Guards must drop in the
    /// reverse order of their making, and must not be forgotten or held across an `.await`;
    /// hidden from the docs for that reason: use [`sync_scope`](Self::sync_scope) or
    /// [`scope`](Self::scope).
    #[doc(hidden)]
    #[inline]
    pub fn enter(self) -> Entered {
        self.entered(None)
    }

    /// [`enter`](Self::enter), also telling the layers below the instant `now` the caller
    /// just read (see [`call_now`](Self::call_now)), so that they need not read the clock
    /// again in the same synchronous call.
    #[doc(hidden)]
    #[inline]
    pub fn enter_at(self, now: Instant) -> Entered {
        self.entered(Some(now))
    }

    /// The instant read by the layer that entered the deadline of the call being made, if it
    /// gave one: a layer below may count from it instead of reading the clock (it is a
    /// moment earlier than now, so a limit counted from it only ends a moment sooner).
    #[doc(hidden)]
    #[inline]
    pub fn call_now() -> Option<Instant> {
        CALL_NOW.try_with(Cell::get).ok().flatten()
    }

    #[inline]
    fn entered(self, now: Option<Instant>) -> Entered {
        // An inner entry never extends an outer one: the earlier stays.
        let previous = CALL
            .try_with(|c| {
                let previous = c.get();
                c.set(Self::earliest(previous, Some(self)));
                previous
            })
            .ok()
            .flatten();
        let previous_now = CALL_NOW.try_with(|c| c.replace(now)).ok().flatten();
        Entered {
            previous,
            previous_now,
            _not_send: PhantomData,
        }
    }

    /// The deadline that applies to `req`: its [`Deadline`] extension if any, else the
    /// ambient one. When both exist the earlier wins.
    #[inline]
    pub fn for_request<B>(req: &http::Request<B>) -> Option<Deadline> {
        Self::earliest(req.extensions().get::<Deadline>().copied(), Self::current())
    }

    /// Runs `fut` with this deadline ambient (nested scopes see the innermost value; the
    /// timeout layer always scopes the earliest deadline, so an inner scope never extends one).
    pub fn scope<F: Future>(self, fut: F) -> WithDeadline<F> {
        WithDeadline {
            inner: CURRENT.scope(Some(self), fut),
        }
    }

    /// Runs the synchronous `f` with this deadline ambient (for work a service does in `call`);
    /// see [`enter`](Self::enter).
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        let _entered = self.enter();
        f()
    }

    /// Carries the current ambient deadline (if any) into `fut`, typically before
    /// `tokio::spawn`, since task-locals do not cross a spawn.
    ///
    /// ```
    /// use std::time::Duration;
    /// use steadfast_core::Deadline;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let d = Deadline::after(Duration::from_secs(1));
    /// let seen = d
    ///     .scope(async {
    ///         tokio::spawn(Deadline::propagate(async { Deadline::current() })).await.unwrap()
    ///     })
    ///     .await;
    /// assert_eq!(seen, Some(d));
    /// # }
    /// ```
    pub fn propagate<F: Future>(fut: F) -> WithDeadline<F> {
        WithDeadline {
            inner: CURRENT.scope(Self::current(), fut),
        }
    }
}

/// The guard of `Deadline::enter`: the deadline is ambient on this thread until it drops.
#[doc(hidden)]
#[must_use = "the deadline is ambient only while the guard lives"]
pub struct Entered {
    previous: Option<Deadline>,
    previous_now: Option<Instant>,
    /// Thread-bound: the deadline was set on this thread.
    _not_send: PhantomData<*const ()>,
}

impl Drop for Entered {
    #[inline]
    fn drop(&mut self) {
        let _ = CALL.try_with(|c| c.set(self.previous));
        let _ = CALL_NOW.try_with(|c| c.set(self.previous_now));
    }
}

impl fmt::Debug for Entered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entered").finish_non_exhaustive()
    }
}

pin_project! {
    /// A future running with an ambient [`Deadline`]; see [`Deadline::scope`].
    pub struct WithDeadline<F> {
        #[pin]
        inner: TaskLocalFuture<Option<Deadline>, F>,
    }
}

impl<F> fmt::Debug for WithDeadline<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithDeadline").finish_non_exhaustive()
    }
}

impl<F: Future> Future for WithDeadline<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_entered_deadline_is_ambient_until_its_guard_drops() {
        let near = Deadline::after(Duration::from_secs(1));
        let far = Deadline::after(Duration::from_secs(5));
        assert_eq!(Deadline::current(), None);
        {
            let _outer = far.enter();
            assert_eq!(Deadline::current(), Some(far));
            {
                let _inner = near.enter();
                assert_eq!(Deadline::current(), Some(near));
            }
            assert_eq!(Deadline::current(), Some(far), "restored");
            // An inner entry never extends an outer one, nor a task's.
            let _later = Deadline::after(Duration::from_secs(9)).enter();
            assert_eq!(Deadline::current(), Some(far));
        }
        assert_eq!(Deadline::current(), None);
        let seen = near
            .scope(async {
                let _e = far.enter();
                Deadline::current()
            })
            .await;
        assert_eq!(seen, Some(near), "the task's earlier deadline wins");
        assert_eq!(far.sync_scope(Deadline::current), Some(far));
    }

    #[tokio::test(start_paused = true)]
    async fn the_entering_layers_instant_is_seen_below_it_and_only_there() {
        let d = Deadline::after(Duration::from_secs(1));
        let read = Instant::now();
        assert_eq!(Deadline::call_now(), None);
        {
            let _outer = d.enter_at(read);
            assert_eq!(Deadline::call_now(), Some(read));
            {
                // A retry's later attempt enters without one: the layers below read the clock.
                let _inner = d.enter();
                assert_eq!(Deadline::call_now(), None);
            }
            assert_eq!(Deadline::call_now(), Some(read), "restored");
        }
        assert_eq!(Deadline::call_now(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn extension_and_ambient_take_the_earliest() {
        let outer = Deadline::after(Duration::from_secs(2));
        let own = Deadline::after(Duration::from_secs(1));
        let mut req = http::Request::new(());
        assert_eq!(Deadline::for_request(&req), None);
        req.extensions_mut().insert(own);
        assert_eq!(Deadline::for_request(&req), Some(own));
        let seen = outer.scope(async { Deadline::for_request(&req) }).await;
        assert_eq!(seen, Some(own));
        let later = Deadline::after(Duration::from_secs(5));
        req.extensions_mut().insert(later);
        let seen = outer.scope(async { Deadline::for_request(&req) }).await;
        assert_eq!(seen, Some(outer));
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_and_saturation() {
        let d = Deadline::after(Duration::from_secs(1));
        assert!(!d.is_expired());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(d.is_expired(), "now >= at");
        assert_eq!(d.remaining(), Duration::ZERO);
        let far = Deadline::after(Duration::MAX);
        assert!(far.remaining() >= Duration::from_secs(86_400));
    }

    #[tokio::test(start_paused = true)]
    async fn propagate_without_ambient_is_none() {
        let seen = tokio::spawn(Deadline::propagate(async { Deadline::current() }))
            .await
            .unwrap();
        assert_eq!(seen, None);
    }
}
