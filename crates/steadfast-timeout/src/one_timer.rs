//! One timer for a task's nested timeouts.
//!
//! A client stack nests its timeouts: the server's deadline around the handler, the
//! handler's call under the total timeout, each attempt under its own. Each of them needs its
//! task woken by its due instant once the call below it waits, and a timer costs a
//! registration in tokio's wheel and its removal: about as much as the rest of the stack's
//! bookkeeping for a call. So a timeout polled *inside* an enclosing timeout's poll, in the
//! same task, asks the enclosing one to wake the task by its due instant instead of arming a
//! timer of its own; the enclosing one, which has a timer anyway (or asks the one around it
//! in turn), arms it for the earliest instant asked. When that timer fires, the instant it
//! fired for is handed down in the next poll, and each timeout below whose due instant is no
//! later has run out.
//!
//! The direction matters. An enclosing timeout never relies on a timer below it: it always
//! has its own (or one above it, through the same protocol), and a timeout below only makes
//! it fire earlier. Whatever sits between may drop the call below (the enclosing timer then
//! fires once for nothing), poll it with another waker (it is refused: it arms its own timer)
//! or move it to another task (polled there, outside any enclosing poll, it arms its own
//! timer; until then nothing in that task waits on it). An offer is only good for the poll in
//! progress: a timeout asks again at every poll it waits, and an enclosing timeout aims its
//! timer at what was asked in its latest poll.

use std::cell::Cell;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

thread_local! {
    /// The offer of the timeout whose poll is in progress on this thread, if any (three
    /// cells rather than one: each poll touches only what it needs).
    static OFFER: Cells = const {
        Cells {
            waker: Cell::new(WakerId::NONE),
            fired: Cell::new(None),
            asked: Cell::new(None),
        }
    };
}

struct Cells {
    /// The waker the enclosing timeout was polled with: only a timeout polled with the same
    /// one is woken by its timer.
    waker: Cell<WakerId>,
    /// The instant its timer last fired for, when that happened since its previous poll:
    /// every timeout below due by then has run out.
    fired: Cell<Option<Instant>>,
    /// The earliest instant a timeout below asked to be woken by, during this poll.
    asked: Cell<Option<Instant>>,
}

/// A waker's identity: its data and vtable addresses (what [`Waker::will_wake`] compares). Two
/// wakers with the same identity wake the same task; a different identity (another task, a
/// combinator's own waker, a no-op waker) is never taken for ours.
#[derive(Clone, Copy, PartialEq, Eq)]
struct WakerId(usize, usize);

impl WakerId {
    const NONE: Self = Self(0, 0);

    #[inline]
    fn of(waker: &Waker) -> Self {
        Self(
            waker.data() as usize,
            std::ptr::from_ref(waker.vtable()) as usize,
        )
    }
}

/// What an enclosing timeout offered when a timeout was polled.
#[derive(Clone, Copy)]
pub(crate) struct Offer {
    waker: WakerId,
    fired: Option<Instant>,
    asked: Option<Instant>,
}

impl Offer {
    /// Whether this offer stands for the poll `cx` belongs to (an enclosing timeout polled
    /// with the same waker).
    #[inline]
    pub(crate) fn covers(&self, cx: &Context<'_>) -> bool {
        self.waker != WakerId::NONE && self.waker == WakerId::of(cx.waker())
    }

    /// Whether `due` has passed, as far as the enclosing timer knows (call with an offer that
    /// [`covers`](Self::covers) the poll).
    #[inline]
    pub(crate) fn has_passed(&self, due: Instant) -> bool {
        self.fired.is_some_and(|fired| due <= fired)
    }
}

/// The offer of a timeout, in force while its inner future is polled; restores the enclosing
/// one when dropped (also when the poll unwinds).
pub(crate) struct Scope {
    parent: Offer,
}

impl Scope {
    /// Offers this timeout's timer to the timeouts polled until the scope ends. `own_fired`:
    /// the instant this timeout's own timer fired for, if it did since the last poll; without
    /// a timer of its own, it hands down what the enclosing offer says fired.
    #[inline]
    pub(crate) fn enter(cx: &Context<'_>, own_fired: Option<Instant>) -> Self {
        let waker = WakerId::of(cx.waker());
        OFFER.with(|o| {
            let parent_waker = o.waker.replace(waker);
            let parent_fired = o.fired.get();
            let fired = match own_fired {
                Some(f) => Some(f),
                None if parent_waker == waker => parent_fired,
                None => None,
            };
            o.fired.set(fired);
            Self {
                parent: Offer {
                    waker: parent_waker,
                    fired: parent_fired,
                    asked: o.asked.replace(None),
                },
            }
        })
    }

    /// Ends the scope: the enclosing offer (for this timeout to ask of) and the earliest
    /// instant asked of this one.
    #[inline]
    pub(crate) fn leave(self) -> (Offer, Option<Instant>) {
        let asked = OFFER.with(|o| o.asked.get());
        (self.parent, asked)
    }
}

impl Drop for Scope {
    #[inline]
    fn drop(&mut self) {
        OFFER.with(|o| {
            o.waker.set(self.parent.waker);
            o.fired.set(self.parent.fired);
            o.asked.set(self.parent.asked);
        });
    }
}

/// Asks the enclosing timeout, whose offer [`covers`](Offer::covers) this poll and is in
/// force again (this timeout's own scope has ended), to wake the task by `due`.
#[inline]
pub(crate) fn ask(due: Instant) {
    OFFER.with(|o| {
        o.asked
            .set(Some(o.asked.get().map_or(due, |asked| asked.min(due))));
    });
}

/// The latest instant a timeout's own timer fired for, kept in `last` (read before the inner
/// future is polled, to be handed down). Kept, not only read off the timer: the timer is
/// aimed elsewhere at the end of a poll in which no timeout below asked (a layer between may
/// skip polling the call below, and poll it next time), and the instant it fired for must
/// still be handed down then. It is in the past, so it never ends a timeout early.
#[inline]
pub(crate) fn fired(sleep: Option<&Sleep>, last: &mut Option<Instant>) -> Option<Instant> {
    if let Some(timer) = sleep.filter(|s| s.is_elapsed()) {
        note_fired(last, timer.deadline());
    }
    *last
}

#[inline]
fn note_fired(last: &mut Option<Instant>, at: Instant) {
    if last.is_none_or(|l| l < at) {
        *last = Some(at);
    }
}

/// What a timeout whose inner future is waiting knows about timers after the inner poll.
pub(crate) struct Wait {
    /// The offer that was in force when this timeout was polled.
    pub(crate) enclosing: Offer,
    /// The earliest instant a timeout below asked to be woken by.
    pub(crate) asked: Option<Instant>,
    /// The latest instant this timeout's own timer fired for (see [`fired`]).
    pub(crate) fired: Option<Instant>,
}

impl Wait {
    /// Sees that the task is woken by `due` and by what was asked of this timeout: asks the
    /// enclosing timeout when it can, else aims this timeout's own timer (armed here at the
    /// first wait, kept once armed) at the earliest of them. `Ready` once `due` has passed.
    #[inline]
    pub(crate) fn poll(
        self,
        mut sleep: Pin<&mut Option<Sleep>>,
        last_fired: &mut Option<Instant>,
        due: Instant,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        if self.fired.is_some_and(|fired| due <= fired) {
            return Poll::Ready(());
        }
        let target = self.asked.map_or(due, |asked| asked.min(due));
        match sleep.as_mut().as_pin_mut() {
            None => {
                if self.enclosing.covers(cx) {
                    if self.enclosing.has_passed(due) {
                        return Poll::Ready(());
                    }
                    ask(target);
                    return Poll::Pending;
                }
                #[cfg(test)]
                tests::ARMED.with(|n| n.set(n.get() + 1));
                sleep.set(Some(tokio::time::sleep_until(target)));
            }
            Some(timer) => {
                if timer.deadline() != target {
                    timer.reset(target);
                }
            }
        }
        if sleep
            .as_pin_mut()
            .expect("armed above")
            .poll(cx)
            .is_pending()
        {
            return Poll::Pending;
        }
        note_fired(last_fired, target);
        if target < due {
            // Fired for a timeout below, which learns it at the next poll (`Scope::enter`
            // hands the fired instant down).
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Waker;
    use std::time::Duration;

    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;
    use http::{Request, Response, StatusCode};
    use steadfast_core::{BoxError, Deadline};
    use tower::{Layer, Service, ServiceExt, service_fn};

    use crate::error::Elapsed;
    use crate::{SetDeadlineLayer, TimeoutLayer};

    thread_local! {
        /// Timers armed by timeouts on this thread (tests run on a current-thread runtime).
        pub(super) static ARMED: Cell<usize> = const { Cell::new(0) };
    }

    fn armed() -> usize {
        ARMED.with(Cell::get)
    }

    type Call = std::pin::Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>>>>;

    /// An upstream that never answers.
    fn never()
    -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future = Call> + Clone
    {
        service_fn(|_req: Request<()>| -> Call { Box::pin(std::future::pending()) })
    }

    fn limit(e: &BoxError) -> Duration {
        e.downcast_ref::<Elapsed>()
            .expect("an Elapsed error")
            .limit()
    }

    /// A total and an attempt timeout, as the client stack nests them: one timer, and each
    /// fires at its own instant.
    #[tokio::test(start_paused = true)]
    async fn nested_timeouts_arm_one_timer() {
        let attempt = TimeoutLayer::new(Duration::from_secs(1)).layer(never());
        let total = TimeoutLayer::new(Duration::from_secs(3)).layer(attempt);
        ARMED.with(|n| n.set(0));
        let start = tokio::time::Instant::now();
        let e = total.clone().oneshot(Request::new(())).await.unwrap_err();
        assert_eq!(limit(&e), Duration::from_secs(1), "the attempt's limit");
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(armed(), 1, "the total's timer woke the attempt");

        // The other way round: the enclosing limit is the earlier one.
        let attempt = TimeoutLayer::new(Duration::from_secs(5)).layer(never());
        let total = TimeoutLayer::new(Duration::from_secs(2)).layer(attempt);
        ARMED.with(|n| n.set(0));
        let start = tokio::time::Instant::now();
        let e = total.oneshot(Request::new(())).await.unwrap_err();
        assert_eq!(limit(&e), Duration::from_secs(2));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(armed(), 1);
    }

    /// A timeout polled with another waker (here `FuturesUnordered`'s, between the two) is not
    /// woken by the enclosing timer: it arms its own, and both still fire on time.
    #[tokio::test(start_paused = true)]
    async fn a_timeout_polled_with_another_waker_arms_its_own_timer() {
        let attempt = TimeoutLayer::new(Duration::from_secs(1)).layer(never());
        let ended = std::rc::Rc::new(Cell::new(None));
        let seen = ended.clone();
        let between = service_fn(move |req: Request<()>| {
            let (mut attempt, ended) = (attempt.clone(), ended.clone());
            async move {
                let mut set = FuturesUnordered::new();
                set.push(attempt.call(req));
                let r = set.next().await.expect("one call");
                assert_eq!(limit(r.as_ref().unwrap_err()), Duration::from_secs(1));
                ended.set(Some(tokio::time::Instant::now()));
                std::future::pending::<()>().await;
                r
            }
        });
        let total = TimeoutLayer::new(Duration::from_secs(3)).layer(between);
        ARMED.with(|n| n.set(0));
        let start = tokio::time::Instant::now();
        let e = total.oneshot(Request::new(())).await.unwrap_err();
        assert_eq!(
            seen.get(),
            Some(start + Duration::from_secs(1)),
            "the attempt ended on time"
        );
        assert_eq!(limit(&e), Duration::from_secs(3));
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert_eq!(armed(), 2);
    }

    /// An attempt whose inherited deadline passed before its first poll (the handler did other
    /// work first) ends at that first poll's wake, not later.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_passed_before_the_first_poll_ends_the_call_at_once() {
        let attempt = TimeoutLayer::new(Duration::from_secs(5)).layer(never());
        let between = service_fn(move |req: Request<()>| {
            let mut attempt = attempt.clone();
            async move {
                let call = Deadline::after(Duration::from_secs(1)).sync_scope(|| attempt.call(req));
                tokio::time::sleep(Duration::from_secs(2)).await;
                call.await
            }
        });
        let total = TimeoutLayer::new(Duration::from_secs(10)).layer(between);
        let start = tokio::time::Instant::now();
        let e = total.oneshot(Request::new(())).await.unwrap_err();
        assert!(e.downcast_ref::<Elapsed>().unwrap().is_inherited());
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    /// After the call below ended, the enclosing timer moves back to its own deadline: a
    /// handler whose client call timed out and that then waits on something untimed is
    /// answered at the server's deadline.
    #[tokio::test(start_paused = true)]
    async fn the_enclosing_timer_returns_to_its_own_deadline() {
        let upstream = TimeoutLayer::new(Duration::from_secs(1)).layer(never());
        let handler = service_fn(move |req: Request<()>| {
            let upstream = upstream.clone();
            async move {
                assert!(upstream.oneshot(req).await.is_err());
                std::future::pending::<()>().await;
                Ok::<_, BoxError>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
            }
        });
        let server = SetDeadlineLayer::new(Duration::from_secs(3)).layer(handler);
        ARMED.with(|n| n.set(0));
        let start = tokio::time::Instant::now();
        let res = server.oneshot(Request::new(())).await.unwrap();
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert_eq!(armed(), 1);
    }

    /// The server's deadline timer wakes the handler's client calls: one timer per request,
    /// whichever limit comes first (a client call inherits the server's deadline, so it ends
    /// by it and the handler answers).
    #[tokio::test(start_paused = true)]
    async fn a_server_deadline_and_its_handlers_calls_share_one_timer() {
        for (client, status, at) in [
            (1, StatusCode::BAD_GATEWAY, 1),
            (5, StatusCode::BAD_GATEWAY, 3),
        ] {
            let upstream = TimeoutLayer::new(Duration::from_secs(client)).layer(never());
            let handler = service_fn(move |req: Request<()>| {
                let upstream = upstream.clone();
                async move {
                    let status = match upstream.oneshot(req).await {
                        Ok(_) => StatusCode::OK,
                        Err(_) => StatusCode::BAD_GATEWAY,
                    };
                    let mut res = Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                    *res.status_mut() = status;
                    Ok::<_, BoxError>(res)
                }
            });
            let server = SetDeadlineLayer::new(Duration::from_secs(3)).layer(handler);
            ARMED.with(|n| n.set(0));
            let start = tokio::time::Instant::now();
            let res = server.oneshot(Request::new(())).await.unwrap();
            assert_eq!(res.status(), status);
            assert_eq!(start.elapsed(), Duration::from_secs(at));
            assert_eq!(armed(), 1);
        }
    }

    fn current() -> Offer {
        OFFER.with(|o| Offer {
            waker: o.waker.get(),
            fired: o.fired.get(),
            asked: o.asked.get(),
        })
    }

    #[test]
    fn offers_nest_and_are_restored() {
        let waker = Waker::noop();
        let cx = Context::from_waker(waker);
        let t = Instant::now();
        assert!(!current().covers(&cx), "no offer outside a scope");
        let outer = Scope::enter(&cx, Some(t));
        {
            let inner = Scope::enter(&cx, None);
            let current = current();
            assert!(current.covers(&cx));
            assert!(
                current.has_passed(t),
                "the enclosing fired instant is handed down"
            );
            let (parent, asked) = inner.leave();
            assert!(parent.covers(&cx));
            assert_eq!(asked, None);
        }
        ask(t + std::time::Duration::from_secs(2));
        ask(t + std::time::Duration::from_secs(1));
        let (parent, asked) = outer.leave();
        assert!(!parent.covers(&cx));
        assert_eq!(
            asked,
            Some(t + std::time::Duration::from_secs(1)),
            "the earliest ask"
        );
        assert!(!current().covers(&cx), "restored");
    }

    #[test]
    fn another_waker_is_not_covered() {
        let cx = Context::from_waker(Waker::noop());
        let scope = Scope::enter(&cx, Some(Instant::now()));
        let other = std::sync::Arc::new(Nop);
        let other = Waker::from(other);
        let other_cx = Context::from_waker(&other);
        assert!(!current().covers(&other_cx));
        // A scope entered with another waker does not inherit the fired instant.
        let inner = Scope::enter(&other_cx, None);
        assert!(!current().has_passed(Instant::now()));
        drop(inner);
        drop(scope);
    }

    struct Nop;
    impl std::task::Wake for Nop {
        fn wake(self: std::sync::Arc<Self>) {}
    }

    #[test]
    fn an_unwinding_poll_restores_the_enclosing_offer() {
        let cx = Context::from_waker(Waker::noop());
        let r = std::panic::catch_unwind(|| {
            let _scope = Scope::enter(&Context::from_waker(Waker::noop()), None);
            panic!("the inner future panicked");
        });
        assert!(r.is_err());
        assert!(!current().covers(&cx));
    }
}
