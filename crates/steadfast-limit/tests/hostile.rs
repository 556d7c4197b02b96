//! Hostile tests of the limit's promises, against tower-test mocks on paused time.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use steadfast_core::{BoxError, Deadline, PolicyRejected, TimedOut};
use steadfast_limit::error::{InvalidLimitConfig, LimitExceeded};
use steadfast_limit::{Aimd, ConcurrencyLimitLayer, Gradient2, Vegas};
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

type Req = Request<u32>;

fn req(n: u32) -> Req {
    Request::new(n)
}

fn refusal(e: &BoxError) -> LimitExceeded {
    *e.downcast_ref::<LimitExceeded>()
        .unwrap_or_else(|| panic!("not a LimitExceeded: {e}"))
}

fn waiting_layer(max: u32, wait: Duration) -> ConcurrencyLimitLayer {
    ConcurrencyLimitLayer::builder()
        .max(max)
        .wait_up_to(wait)
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Hand-polled futures (as in contract.rs).

struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct Spawned<F> {
    fut: Pin<Box<F>>,
    woken: Arc<Flag>,
}

fn spawn<F: Future>(fut: F) -> Spawned<F> {
    Spawned {
        fut: Box::pin(fut),
        woken: Arc::new(Flag(AtomicBool::new(false))),
    }
}

impl<F: Future> Spawned<F> {
    fn poll(&mut self) -> Poll<F::Output> {
        self.woken.0.store(false, Ordering::SeqCst);
        let waker = Waker::from(self.woken.clone());
        self.fut.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile bodies.

/// Scripted frames, with `is_end_stream` and `size_hint` answered from a script too.
struct Scripted {
    frames: VecDeque<Result<Frame<Bytes>, std::io::Error>>,
    /// `is_end_stream()` answers, one per call to it (the last repeats).
    ends: VecDeque<bool>,
}

impl Body for Scripted {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.frames.pop_front())
    }

    fn is_end_stream(&self) -> bool {
        // Interior answers vary with the number of frames left, not with calls.
        let left = self.frames.len();
        let i = self.ends.len().saturating_sub(1).min(left);
        self.ends
            .get(self.ends.len() - 1 - i)
            .copied()
            .unwrap_or(false)
    }

    fn size_hint(&self) -> SizeHint {
        // A size hint that lies: larger than what is left, changing as frames go.
        SizeHint::with_exact(self.frames.len() as u64 * 1000)
    }
}

fn data(s: &'static str) -> Result<Frame<Bytes>, std::io::Error> {
    Ok(Frame::data(Bytes::from_static(s.as_bytes())))
}

fn trailers(pairs: &[(&'static str, &'static str)]) -> Result<Frame<Bytes>, std::io::Error> {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.insert(*k, HeaderValue::from_static(v));
    }
    Ok(Frame::trailers(map))
}

// ---------------------------------------------------------------------------------------------
// Waiting: lost wakeups and order.

/// Two permits come free while two calls wait whose futures have not been polled yet (made by
/// `call`, to be polled by a task that has not run, or by a `join_all` not yet reached). The
/// first waiter takes one; the second must take the other.
#[tokio::test(start_paused = true)]
async fn two_releases_before_waiters_are_polled_do_not_strand_a_waiter() {
    let layer = waiting_layer(2, Duration::from_secs(10));
    let (mock, mut handle) = mock::pair::<Req, Response<Empty<Bytes>>>();
    let mut svc = layer.layer(mock);
    let x = svc.ready().await.unwrap().call(req(0));
    let y = svc.ready().await.unwrap().call(req(1));
    let _sent = (handle.next_request().await, handle.next_request().await);
    let mut a = spawn(svc.ready().await.unwrap().call(req(2)));
    let mut b = spawn(svc.ready().await.unwrap().call(req(3)));
    assert_eq!((layer.in_flight(), layer.waiting()), (2, 2));
    drop((x, y)); // both in-flight calls cancelled: two permits free
    // Each freed permit went straight to a waiter, in call order.
    assert_eq!((layer.in_flight(), layer.waiting()), (2, 0));
    assert!(a.poll().is_pending());
    assert!(b.poll().is_pending());
    // `a` was sent and is still in flight; one permit of two is free for `b`.
    let (r, _a_answer) = handle.next_request().await.unwrap();
    assert_eq!(*r.body(), 2);
    advance(Duration::from_secs(11)).await;
    match b.poll() {
        Poll::Ready(Err(e)) => panic!(
            "b was refused ({}) after waiting its whole bound with a permit free the whole \
             time: in_flight {} of limit {}, waiting {}",
            refusal(&e),
            layer.in_flight(),
            layer.limit(),
            layer.waiting()
        ),
        _ => {
            let (r, _) = handle.next_request().await.unwrap();
            assert_eq!(*r.body(), 3);
        }
    }
}

/// Waiters are served in the order they came (`call`), whatever order their tasks first run.
#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_call_order_even_when_polled_out_of_order() {
    let layer = waiting_layer(1, Duration::from_secs(10));
    let (mock, mut handle) = mock::pair::<Req, Response<Empty<Bytes>>>();
    let mut svc = layer.layer(mock);
    let held = svc.ready().await.unwrap().call(req(0));
    let mut a = spawn(svc.ready().await.unwrap().call(req(1)));
    let mut b = spawn(svc.ready().await.unwrap().call(req(2)));
    let mut c = spawn(svc.ready().await.unwrap().call(req(3)));
    // `a` and `c` run first; `b`'s task has not run yet.
    assert!(a.poll().is_pending() && c.poll().is_pending());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(Empty::new()));
    drop(held.await.unwrap());
    assert!(a.poll().is_pending());
    let (r, send) = handle.next_request().await.unwrap();
    assert_eq!(*r.body(), 1);
    send.send_response(Response::new(Empty::new()));
    assert!(a.poll().is_ready());
    // The permit `a` gave back belongs to `b`, which came before `c`.
    assert!(b.poll().is_pending() && c.poll().is_pending());
    let (r, _) = handle.next_request().await.unwrap();
    assert_eq!(
        *r.body(),
        2,
        "b (called second) must go before c (called third)"
    );
}

/// Every waiter polled at once (no unpolled window), random arrivals, releases and
/// cancellations: after each step settles, nobody waits while a permit is free.
#[tokio::test(start_paused = true)]
async fn random_waiters_with_cancellations_never_wait_while_a_permit_is_free() {
    let layer = waiting_layer(3, Duration::from_secs(3600));
    let (svc_tx, mut svc_rx) = tokio::sync::mpsc::unbounded_channel();
    let inner = tower::service_fn(move |_req: Req| {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        svc_tx.send(tx).unwrap();
        async move {
            let _ = rx.await;
            Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
        }
    });
    let svc = layer.layer(inner);
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut answers: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    for step in 0..400 {
        match next() % 4 {
            0 | 1 => {
                let s = svc.clone();
                tasks.push(tokio::spawn(async move {
                    if let Ok(res) = s.oneshot(req(step)).await {
                        drop(res.into_body().collect().await);
                    }
                }));
            }
            2 => {
                if !answers.is_empty() {
                    let i = (next() as usize) % answers.len();
                    let _ = answers.swap_remove(i).send(());
                }
            }
            _ => {
                if !tasks.is_empty() {
                    let i = (next() as usize) % tasks.len();
                    tasks.swap_remove(i).abort();
                }
            }
        }
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        while let Ok(tx) = svc_rx.try_recv() {
            answers.push(tx);
        }
        tasks.retain(|t| !t.is_finished());
        assert!(
            layer.waiting() == 0 || layer.in_flight() >= layer.limit(),
            "step {step}: {} waiting while only {} of {} permits are taken",
            layer.waiting(),
            layer.in_flight(),
            layer.limit()
        );
        assert!(
            layer.in_flight() <= layer.limit(),
            "step {step}: over the limit"
        );
    }
    for t in &tasks {
        t.abort();
    }
    drop(answers);
    for t in tasks {
        let _ = t.await;
    }
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// Cancellation at every await point.

#[tokio::test(start_paused = true)]
async fn cancellation_at_every_await_point_gives_permits_and_places_back() {
    let layer = waiting_layer(1, Duration::from_secs(10));
    let (mock, mut handle) = mock::pair::<Req, Response<Scripted>>();
    let mut svc = layer.layer(mock);

    // A waiter dropped before it was ever polled.
    let held = svc.ready().await.unwrap().call(req(0));
    let w = svc.ready().await.unwrap().call(req(1));
    assert_eq!(layer.waiting(), 1);
    drop(w);
    assert_eq!(layer.waiting(), 0, "unpolled waiter dropped");

    // A waiter dropped after one poll.
    let mut w = spawn(svc.ready().await.unwrap().call(req(2)));
    assert!(w.poll().is_pending());
    drop(w);
    assert_eq!(layer.waiting(), 0);

    // A waiter woken by the release, dropped before it ran; the next arrival gets in.
    let mut w = spawn(svc.ready().await.unwrap().call(req(3)));
    assert!(w.poll().is_pending());
    drop(held);
    assert!(w.woken.0.load(Ordering::SeqCst));
    drop(w);
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
    let (r, _) = handle.next_request().await.unwrap();
    assert_eq!(*r.body(), 0);

    // A waiter under tokio::time::timeout shorter than its wait.
    let held = svc.ready().await.unwrap().call(req(4));
    let out = tokio::time::timeout(
        Duration::from_millis(5),
        svc.ready().await.unwrap().call(req(5)),
    )
    .await;
    assert!(out.is_err());
    assert_eq!((layer.in_flight(), layer.waiting()), (1, 0));
    drop(held);
    let _ = handle.next_request().await.unwrap();

    // The inner call pending, under a timeout.
    let out = tokio::time::timeout(
        Duration::from_millis(5),
        svc.ready().await.unwrap().call(req(6)),
    )
    .await;
    assert!(out.is_err());
    assert_eq!(layer.in_flight(), 0, "inner call cancelled by timeout");
    let _ = handle.next_request().await.unwrap();

    // A spawned call aborted while the inner call is pending.
    let s = svc.clone();
    let t = tokio::spawn(s.oneshot(req(7)));
    let _ = handle.next_request().await.unwrap();
    assert_eq!(layer.in_flight(), 1);
    t.abort();
    let _ = t.await;
    assert_eq!(layer.in_flight(), 0, "aborted task");

    // After the head, before the body: response dropped.
    let call = svc.ready().await.unwrap().call(req(8));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(Scripted {
        frames: [data("a"), data("b")].into(),
        ends: [false].into(),
    }));
    let res = call.await.unwrap();
    assert_eq!(layer.in_flight(), 1);
    drop(res);
    assert_eq!(layer.in_flight(), 0, "head read, body dropped");

    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// Bodies.

#[tokio::test(start_paused = true)]
async fn hostile_bodies_give_the_permit_back_exactly_once() {
    let layer = ConcurrencyLimitLayer::new(2);
    let (mock, mut handle) = mock::pair::<Req, Response<Scripted>>();
    let mut svc = layer.layer(mock);
    macro_rules! one {
        ($body:expr) => {
            (svc.ready().await.unwrap().call(req(0)), $body)
        };
    }

    // An error mid-way.
    let (call, body) = one!(Scripted {
        frames: [data("a"), Err(std::io::Error::other("boom")), data("after")].into(),
        ends: [false].into(),
    });
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(body));
    let mut res = call.await.unwrap();
    res.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(layer.in_flight(), 1);
    assert!(res.body_mut().frame().await.unwrap().is_err());
    assert_eq!(layer.in_flight(), 0, "error ends the body");
    // Polling on past the error (the inner body goes on) releases nothing more.
    let _ = res.body_mut().frame().await;
    let _ = res.body_mut().frame().await;
    drop(res);
    assert_eq!(layer.in_flight(), 0);

    // A body that says it is at its end at the head, then yields frames anyway.
    let (call, body) = one!(Scripted {
        frames: [data("a"), data("b"), trailers(&[("x", "y")])].into(),
        ends: [true].into(),
    });
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(body));
    let mut res = call.await.unwrap();
    assert!(!res.body().holds_permit());
    assert_eq!(layer.in_flight(), 0);
    while let Some(f) = res.body_mut().frame().await {
        f.unwrap();
    }
    drop(res);
    assert_eq!(
        layer.in_flight(),
        0,
        "no double release (would wrap the count)"
    );

    // A body whose end flips true then false: released when it first says end.
    let (call, body) = one!(Scripted {
        // ends indexed by frames left: 3 left -> false, 2 -> true, 1 -> false, 0 -> true
        frames: [data("a"), data("b"), data("c")].into(),
        ends: [false, true, false, true].into(),
    });
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(body));
    let mut res = call.await.unwrap();
    let hint = res.body().size_hint().exact();
    assert_eq!(hint, Some(3000), "size hint is the inner's");
    while let Some(f) = res.body_mut().frame().await {
        f.unwrap();
        assert_eq!(
            res.body().size_hint().exact(),
            res.body().get_ref().size_hint().exact()
        );
        assert_eq!(
            res.body().is_end_stream(),
            res.body().get_ref().is_end_stream()
        );
    }
    assert_eq!(layer.in_flight(), 0);
    drop(res);
    assert_eq!(layer.in_flight(), 0);

    // Trailers-only body (the first frame is trailers), then more frames.
    let (call, body) = one!(Scripted {
        frames: [trailers(&[("grpc-status", "0")]), data("late")].into(),
        ends: [false].into(),
    });
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(body));
    let mut res = call.await.unwrap();
    assert_eq!(layer.in_flight(), 1);
    res.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(layer.in_flight(), 0, "trailers end the body");
    let _ = res.body_mut().frame().await;
    let _ = res.body_mut().frame().await;
    drop(res);
    assert_eq!((layer.in_flight(), layer.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn overload_in_grpc_trailers_and_timeouts_shrink_an_adaptive_limit() {
    let layer = ConcurrencyLimitLayer::builder()
        .aimd(Aimd {
            initial: 10,
            min: 2,
            max: 20,
            ..Aimd::default()
        })
        .sample_window(Duration::ZERO, 1)
        .build()
        .unwrap();
    let (mock, mut handle) = mock::pair::<Req, Response<Scripted>>();
    let mut svc = layer.layer(mock);
    // gRPC UNAVAILABLE in the trailers.
    let call = svc.ready().await.unwrap().call(req(0));
    let (_, send) = handle.next_request().await.unwrap();
    let mut res = Response::new(Scripted {
        frames: [data("x"), trailers(&[("grpc-status", "14")])].into(),
        ends: [false].into(),
    });
    res.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/grpc+proto"),
    );
    send.send_response(res);
    let res = call.await.unwrap();
    drop(res.into_body().collect().await.unwrap());
    assert_eq!(layer.limit(), 9, "UNAVAILABLE in trailers is overload");
    // A timeout error.
    let call = svc.ready().await.unwrap().call(req(1));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(TimedOut::INSTANCE);
    assert!(call.await.is_err());
    assert_eq!(layer.limit(), 8, "a timeout is overload");
    // Another error teaches nothing.
    let call = svc.ready().await.unwrap().call(req(2));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::other("reset"));
    assert!(call.await.is_err());
    assert_eq!(layer.limit(), 8);
    assert_eq!(layer.in_flight(), 0);
}

// ---------------------------------------------------------------------------------------------
// Waits and deadlines.

#[tokio::test(start_paused = true)]
async fn duration_max_waits_are_bounded_by_ambient_and_request_deadlines() {
    let layer = waiting_layer(1, Duration::MAX);
    let (mock, _handle) = mock::pair::<Req, Response<Empty<Bytes>>>();
    let mut svc = layer.layer(mock);
    let _held = svc.ready().await.unwrap().call(req(0));

    // An ambient deadline (async scope) nearer than the wait.
    let start = Instant::now();
    let s = svc.clone();
    let err = Deadline::after(Duration::from_millis(40))
        .scope(async move { s.oneshot(req(1)).await })
        .await
        .unwrap_err();
    assert!(refusal(&err).waited() <= Duration::from_millis(40));
    assert_eq!(start.elapsed(), Duration::from_millis(40));
    assert!(PolicyRejected::is_in(&*err));

    // A request deadline already passed, and one exactly now.
    for d in [Duration::ZERO, Duration::from_millis(1)] {
        let mut r = req(2);
        r.extensions_mut().insert(Deadline::at(Instant::now() - d));
        let start = Instant::now();
        let err = svc.ready().await.unwrap().call(r).await.unwrap_err();
        assert_eq!(refusal(&err).waited(), Duration::ZERO);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
    // A deadline far beyond: Duration::MAX does not overflow.
    let mut r = req(3);
    r.extensions_mut()
        .insert(Deadline::after(Duration::from_secs(86_400 * 365 * 30)));
    let mut w = spawn(svc.ready().await.unwrap().call(r));
    assert!(w.poll().is_pending());
    assert_eq!(layer.waiting(), 1);
    drop(w);
    assert_eq!((layer.in_flight(), layer.waiting()), (1, 0));
}

// ---------------------------------------------------------------------------------------------
// Adaptive limits.

/// The builder's default Vegas measures the unloaded latency at its floor first: calls over
/// `min` during the first update are refused.
#[tokio::test(start_paused = true)]
async fn vegas_holds_the_first_update_at_its_floor() {
    let layer = ConcurrencyLimitLayer::builder().build().unwrap(); // Vegas::default()
    let (mock, _handle) = mock::pair::<Req, Response<Empty<Bytes>>>();
    let mut svc = layer.layer(mock);
    let _a = svc.ready().await.unwrap().call(req(0));
    let _b = svc.ready().await.unwrap().call(req(1));
    let mut third = spawn(svc.ready().await.unwrap().call(req(2)));
    assert!(
        matches!(third.poll(), Poll::Ready(Err(_))),
        "a third call during the first (probing) update must be refused (Vegas min = 2), \
         but the limit in force is {} and {} calls are in flight",
        layer.limit(),
        layer.in_flight()
    );
}

#[tokio::test(start_paused = true)]
async fn adaptive_limits_stay_within_bounds_whatever_the_samples() {
    let rules: Vec<(&str, ConcurrencyLimitLayer, u32, u32)> = vec![
        (
            "aimd",
            ConcurrencyLimitLayer::builder()
                .aimd(Aimd {
                    initial: 3,
                    min: 2,
                    max: 5,
                    backoff: 0.01,
                    slow: Duration::ZERO,
                })
                .sample_window(Duration::ZERO, 1)
                .build()
                .unwrap(),
            2,
            5,
        ),
        (
            "gradient2",
            ConcurrencyLimitLayer::builder()
                .gradient2(Gradient2 {
                    initial: 3,
                    min: 2,
                    max: 5,
                    queue: u32::MAX,
                    smoothing: 1.0,
                    long_window: 1,
                    ..Gradient2::default()
                })
                .sample_window(Duration::ZERO, 1)
                .build()
                .unwrap(),
            2,
            5,
        ),
        (
            "vegas",
            ConcurrencyLimitLayer::builder()
                .vegas(Vegas {
                    initial: 3,
                    min: 2,
                    max: 5,
                    probe_every: 1,
                    alpha: 1e300,
                    beta: 1e308,
                })
                .sample_window(Duration::ZERO, 0)
                .build()
                .unwrap(),
            2,
            5,
        ),
        (
            "vegas-default",
            ConcurrencyLimitLayer::builder()
                .sample_window(Duration::ZERO, 1)
                .build()
                .unwrap(),
            2,
            200,
        ),
    ];
    for (name, layer, min, max) in rules {
        let (mock, mut handle) = mock::pair::<Req, Response<Empty<Bytes>>>();
        let mut svc = layer.layer(mock);
        for i in 0..60u32 {
            // Fill to the limit, then answer in a pattern: zero latency, a decade, 503s,
            // timeouts.
            let mut calls = Vec::new();
            while calls.len() < layer.limit() as usize {
                calls.push(svc.ready().await.unwrap().call(req(i)));
            }
            let n = calls.len();
            match i % 4 {
                0 => {}
                1 => advance(Duration::from_secs(86_400 * 3650)).await,
                _ => advance(Duration::from_nanos(1)).await,
            }
            for _ in 0..n {
                let (_, send) = handle.next_request().await.unwrap();
                match i % 4 {
                    2 => {
                        let mut r = Response::new(Empty::new());
                        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        send.send_response(r);
                    }
                    3 => send.send_error(TimedOut::INSTANCE),
                    _ => send.send_response(Response::new(Empty::new())),
                }
            }
            for c in calls {
                drop(c.await);
                let l = layer.limit();
                assert!(
                    (min..=max).contains(&l),
                    "{name}: limit {l} out of [{min}, {max}]"
                );
            }
            assert_eq!(layer.in_flight(), 0, "{name}");
        }
    }
}

#[test]
fn bad_configs_are_refused_and_never_panic() {
    let b = ConcurrencyLimitLayer::builder;
    let bad_floats = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 0.0];
    for v in bad_floats {
        let r = std::panic::catch_unwind(|| {
            b().aimd(Aimd {
                backoff: v,
                ..Aimd::default()
            })
            .build()
        });
        assert!(
            matches!(r, Ok(Err(InvalidLimitConfig::Factor { .. }))),
            "aimd backoff {v}"
        );
        for g in [
            Gradient2 {
                backoff: v,
                ..Gradient2::default()
            },
            Gradient2 {
                smoothing: v,
                ..Gradient2::default()
            },
            Gradient2 {
                tolerance: if v == 0.0 { 0.5 } else { v },
                ..Gradient2::default()
            },
        ] {
            let r = std::panic::catch_unwind(|| b().gradient2(g).build());
            assert!(
                matches!(r, Ok(Err(InvalidLimitConfig::Factor { .. }))),
                "{g:?}"
            );
        }
    }
    for (initial, min, max) in [
        (0, 1, 2),
        (1, 0, 2),
        (1, 1, 0),
        (5, 6, 4),
        (3, 4, 10),
        (11, 4, 10),
    ] {
        assert!(
            b().aimd(Aimd {
                initial,
                min,
                max,
                ..Aimd::default()
            })
            .build()
            .is_err()
        );
        assert!(
            b().gradient2(Gradient2 {
                initial,
                min,
                max,
                ..Gradient2::default()
            })
            .build()
            .is_err()
        );
        assert!(
            b().vegas(Vegas {
                initial,
                min,
                max,
                ..Vegas::default()
            })
            .build()
            .is_err()
        );
    }
    assert!(
        b().gradient2(Gradient2 {
            long_window: 0,
            ..Gradient2::default()
        })
        .build()
        .is_err()
    );
    assert!(
        b().vegas(Vegas {
            probe_every: 0,
            ..Vegas::default()
        })
        .build()
        .is_err()
    );
    // Extreme but valid settings build.
    assert!(b().max(u32::MAX).build().is_ok());
    assert!(
        b().aimd(Aimd {
            initial: u32::MAX,
            min: 1,
            max: u32::MAX,
            ..Aimd::default()
        })
        .build()
        .is_ok()
    );
}

/// Vegas's `alpha` and `beta` are factors too: NaN, infinite or negative ones are not a
/// configuration (and `alpha` over `beta` makes the rule incoherent).
#[test]
fn vegas_factors_out_of_range_are_refused() {
    let b = ConcurrencyLimitLayer::builder;
    for (alpha, beta) in [
        (f64::NAN, 6.0),
        (3.0, f64::NAN),
        (f64::INFINITY, 6.0),
        (3.0, f64::INFINITY),
        (-3.0, 6.0),
        (3.0, -6.0),
        (6.0, 3.0),
    ] {
        let r = b()
            .vegas(Vegas {
                alpha,
                beta,
                ..Vegas::default()
            })
            .build();
        assert!(
            r.is_err(),
            "Vegas {{ alpha: {alpha}, beta: {beta} }} was accepted by build()"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The refusal.

#[tokio::test(start_paused = true)]
async fn the_refusal_is_policy_rejected_and_says_nothing_internal() {
    let layer = ConcurrencyLimitLayer::builder()
        .max(1)
        .name("secret-upstream")
        .build()
        .unwrap();
    let (mock, _handle) = mock::pair::<Req, Response<Empty<Bytes>>>();
    let mut svc = layer.layer(mock);
    let _held = svc.ready().await.unwrap().call(req(0));
    let err = svc.ready().await.unwrap().call(req(1)).await.unwrap_err();
    let r = refusal(&err);
    assert!(PolicyRejected::is_in(&*err));
    assert!(
        std::error::Error::source(&r)
            .unwrap()
            .is::<PolicyRejected>()
    );
    let res = r.to_http_response::<Empty<Bytes>>();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(!String::from_utf8_lossy(&body).contains("secret"));
    let g = r.to_grpc_response::<Empty<Bytes>>();
    assert_eq!(g.status(), 200);
    assert_eq!(g.headers()["grpc-status"], "8");
    assert_eq!(g.headers()["content-type"], "application/grpc");
    assert!(g.body().is_end_stream(), "trailers-only");
}

/// Broken bodies teach an adaptive limit nothing; a body dropped before its end is a sample
/// with its head's verdict (the 503 here: overload); a 429 or 504 in the head is overload.
#[tokio::test(start_paused = true)]
async fn broken_bodies_teach_nothing_dropped_ones_their_head_and_429_504_are_overload() {
    let layer = ConcurrencyLimitLayer::builder()
        .aimd(Aimd {
            initial: 10,
            min: 2,
            max: 20,
            slow: Duration::from_secs(1),
            ..Aimd::default()
        })
        .sample_window(Duration::ZERO, 1)
        .build()
        .unwrap();
    let (mock, mut handle) = mock::pair::<Req, Response<Scripted>>();
    let mut svc = layer.layer(mock);
    for (status, frames, drop_early, expect) in [
        (
            503,
            vec![data("a"), Err(std::io::Error::other("cut"))],
            false,
            10,
        ),
        (503, vec![data("a"), data("b")], true, 9),
        (429, vec![data("a")], false, 8),
        (504, vec![data("a")], false, 7),
    ] {
        let call = svc.ready().await.unwrap().call(req(0));
        let (_, send) = handle.next_request().await.unwrap();
        let mut res = Response::new(Scripted {
            frames: frames.into(),
            ends: [false].into(),
        });
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        send.send_response(res);
        // Slow too (over `slow`): would count as a drop if the call were a sample.
        advance(Duration::from_secs(2)).await;
        let mut res = call.await.unwrap();
        if drop_early {
            res.body_mut().frame().await.unwrap().unwrap();
            drop(res);
        } else {
            while let Some(f) = res.body_mut().frame().await {
                if f.is_err() {
                    break;
                }
            }
        }
        assert_eq!(layer.limit(), expect, "{status} drop_early={drop_early}");
        assert_eq!(layer.in_flight(), 0);
    }
}

/// A caller that reads only the status and drops the body still teaches an adaptive limit
/// (a sample timed to the drop, with the head's verdict), unless the answer is gRPC whose
/// status is still to come in the trailers.
#[tokio::test(start_paused = true)]
async fn status_only_callers_teach_the_limit_and_unfinished_grpc_answers_do_not() {
    let layer = ConcurrencyLimitLayer::builder()
        .aimd(Aimd {
            initial: 10,
            min: 2,
            max: 20,
            slow: Duration::from_secs(1),
            ..Aimd::default()
        })
        .sample_window(Duration::ZERO, 1)
        .build()
        .unwrap();
    let (mock, mut handle) = mock::pair::<Req, Response<Scripted>>();
    let mut svc = layer.layer(mock);
    for (grpc, status, held, expect) in [
        // A 200 held past `slow` before the drop: slow, so a drop (× 0.9).
        (false, 200, Duration::from_secs(2), 9),
        // gRPC without a status yet: nothing learnt, however long it was held.
        (true, 200, Duration::from_secs(2), 9),
        // A 503 dropped at once: overload.
        (false, 503, Duration::ZERO, 8),
    ] {
        let call = svc.ready().await.unwrap().call(req(0));
        let (_, send) = handle.next_request().await.unwrap();
        let mut res = Response::new(Scripted {
            frames: [data("a"), data("b")].into(),
            ends: [false].into(),
        });
        if grpc {
            res.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
        }
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        send.send_response(res);
        let res = call.await.unwrap();
        advance(held).await;
        drop(res);
        assert_eq!(layer.limit(), expect, "grpc={grpc} {status} held={held:?}");
        assert_eq!(layer.in_flight(), 0);
    }
}
