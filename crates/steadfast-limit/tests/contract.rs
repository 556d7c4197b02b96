//! The layer's contract, against tower-test mocks on paused time.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use steadfast_core::{Deadline, PolicyRejected};
use steadfast_limit::error::LimitExceeded;
use steadfast_limit::{Aimd, ConcurrencyLimitLayer, LimitBody};
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

type Req = Request<()>;

fn req() -> Req {
    Request::new(())
}

/// A body of several chunks that says it is at its end only after the last.
#[derive(Debug)]
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum())
    }
}

fn chunks(n: usize) -> Chunks {
    Chunks((0..n).map(|_| Bytes::from_static(b"ab")).collect())
}

fn refusal(e: &steadfast_core::BoxError) -> LimitExceeded {
    *e.downcast_ref::<LimitExceeded>()
        .unwrap_or_else(|| panic!("not a LimitExceeded: {e}"))
}

#[tokio::test(start_paused = true)]
async fn a_fixed_limit_refuses_the_call_over_it_at_once_without_sending_it() {
    let layer = ConcurrencyLimitLayer::new(2);
    let (mock, mut handle) = mock::pair::<Req, Response<Full<Bytes>>>();
    let mut svc = layer.layer(mock);
    let a = svc.ready().await.unwrap().call(req());
    let b = svc.ready().await.unwrap().call(req());
    let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    let refused = refusal(&err);
    assert_eq!((refused.limit(), refused.waited()), (2, Duration::ZERO));
    assert!(
        PolicyRejected::is_in(&*err),
        "retry layers must not retry it"
    );
    assert_eq!(layer.in_flight(), 2);
    // Only the two admitted calls reached the inner service.
    for _ in 0..2 {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(Full::new(Bytes::from_static(b"x"))));
    }
    assert!(handle.poll_request().is_pending());
    drop((a.await.unwrap(), b.await.unwrap()));
    assert_eq!(layer.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_permit_is_held_until_the_body_ends_not_when_the_head_arrives() {
    let layer = ConcurrencyLimitLayer::new(1);
    let (mock, mut handle) = mock::pair::<Req, Response<Chunks>>();
    let mut svc = layer.layer(mock);
    let call = svc.ready().await.unwrap().call(req());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(chunks(3)));
    let mut res = call.await.unwrap();
    assert_eq!(layer.in_flight(), 1, "head arrived, body unread");
    assert!(res.body().holds_permit());
    // Size hints and end-of-stream are the inner body's at every step.
    assert_eq!(res.body().size_hint().exact(), Some(6));
    res.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(res.body().size_hint().exact(), Some(4));
    assert!(!res.body().is_end_stream());
    assert_eq!(layer.in_flight(), 1, "body half read");
    let over = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    refusal(&over);
    res.body_mut().frame().await.unwrap().unwrap();
    res.body_mut().frame().await.unwrap().unwrap();
    assert!(res.body().is_end_stream());
    assert_eq!(layer.in_flight(), 0, "the last frame gives it back");
    assert!(res.body_mut().frame().await.is_none());
    assert_eq!(layer.in_flight(), 0, "and only once");
}

#[tokio::test(start_paused = true)]
async fn a_body_already_at_its_end_gives_the_permit_back_with_the_head() {
    let layer = ConcurrencyLimitLayer::new(1);
    let (mock, mut handle) = mock::pair::<Req, Response<Empty<Bytes>>>();
    let mut svc = layer.layer(mock);
    let call = svc.ready().await.unwrap().call(req());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(Empty::new()));
    let res = call.await.unwrap();
    assert!(!res.body().holds_permit());
    assert_eq!(layer.in_flight(), 0);
    drop(res);
    assert_eq!(layer.in_flight(), 0, "not given back twice");
}

#[tokio::test(start_paused = true)]
async fn every_way_a_call_ends_gives_the_permit_back_once() {
    let layer = ConcurrencyLimitLayer::new(1);
    let (mock, mut handle) = mock::pair::<Req, Response<Chunks>>();
    let mut svc = layer.layer(mock);

    // The body dropped half read.
    let call = svc.ready().await.unwrap().call(req());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(chunks(2)));
    let mut res = call.await.unwrap();
    res.body_mut().frame().await.unwrap().unwrap();
    drop(res);
    assert_eq!(layer.in_flight(), 0, "body dropped");

    // The response future dropped before the answer.
    let call = svc.ready().await.unwrap().call(req());
    assert_eq!(layer.in_flight(), 1);
    drop(call);
    assert_eq!(layer.in_flight(), 0, "future dropped");
    let _ = handle.next_request().await.unwrap();

    // The inner service failed.
    let call = svc.ready().await.unwrap().call(req());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::other("reset"));
    assert!(call.await.is_err());
    assert_eq!(layer.in_flight(), 0, "inner error");

    // The service dropped while a call is in flight: the call still holds its permit.
    let call = svc.ready().await.unwrap().call(req());
    drop(svc);
    assert_eq!(layer.in_flight(), 1);
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(chunks(0)));
    drop(call.await.unwrap());
    assert_eq!(layer.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_call_is_sent_when_a_permit_comes_free() {
    let layer = ConcurrencyLimitLayer::builder()
        .max(1)
        .wait_up_to(Duration::from_millis(100))
        .build()
        .unwrap();
    let (mock, mut handle) = mock::pair::<Req, Response<Empty<Bytes>>>();
    let mut svc = layer.layer(mock);
    let first = svc.ready().await.unwrap().call(req());
    let mut second = tokio_test_spawn(svc.ready().await.unwrap().call(req()));
    assert!(second.poll().is_pending());
    assert_eq!(layer.waiting(), 1);
    let (_, send) = handle.next_request().await.unwrap();
    assert!(
        handle.poll_request().is_pending(),
        "the second waits, unsent"
    );
    advance(Duration::from_millis(50)).await;
    send.send_response(Response::new(Empty::new()));
    drop(first.await.unwrap());
    assert!(second.is_woken());
    assert!(second.poll().is_pending(), "sent, waiting for its answer");
    assert_eq!((layer.waiting(), layer.in_flight()), (0, 1));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(Empty::new()));
    let Poll::Ready(Ok(_)) = second.poll() else {
        panic!("answered")
    };
    assert_eq!(layer.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_wait_ends_at_its_bound_and_at_the_call_s_deadline() {
    let layer = ConcurrencyLimitLayer::builder()
        .max(1)
        .wait_up_to(Duration::from_millis(100))
        .build()
        .unwrap();
    let (mock, _handle) = mock::pair::<Req, Response<Empty<Bytes>>>();
    let mut svc = layer.layer(mock);
    let _held = svc.ready().await.unwrap().call(req());

    let start = Instant::now();
    let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    assert_eq!(refusal(&err).waited(), Duration::from_millis(100));
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(layer.waiting(), 0);

    // A deadline nearer than the bound ends the wait first (never waits for a caller that
    // has given up).
    let start = Instant::now();
    let fut = Deadline::after(Duration::from_millis(30)).sync_scope(|| svc.call(req()));
    let err = fut.await.unwrap_err();
    refusal(&err);
    assert_eq!(start.elapsed(), Duration::from_millis(30));

    // A deadline already passed: refused at once.
    let mut late = req();
    late.extensions_mut().insert(Deadline::at(Instant::now()));
    let start = Instant::now();
    let err = svc.ready().await.unwrap().call(late).await.unwrap_err();
    assert_eq!(refusal(&err).waited(), Duration::ZERO);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(layer.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn waits_of_zero_and_duration_max_are_safe() {
    let zero = ConcurrencyLimitLayer::builder()
        .max(1)
        .wait_up_to(Duration::ZERO)
        .build()
        .unwrap();
    let (mock, _h) = mock::pair::<Req, Response<Empty<Bytes>>>();
    let mut svc = zero.layer(mock);
    let _held = svc.ready().await.unwrap().call(req());
    let start = Instant::now();
    refusal(&svc.ready().await.unwrap().call(req()).await.unwrap_err());
    assert_eq!(start.elapsed(), Duration::ZERO, "zero: refused at once");

    let forever = ConcurrencyLimitLayer::builder()
        .max(1)
        .wait_up_to(Duration::MAX)
        .build()
        .unwrap();
    let (mock, mut handle) = mock::pair::<Req, Response<Empty<Bytes>>>();
    let mut svc = forever.layer(mock);
    let held = svc.ready().await.unwrap().call(req());
    let mut waiting = tokio_test_spawn(svc.ready().await.unwrap().call(req()));
    assert!(waiting.poll().is_pending());
    advance(Duration::from_secs(86_400 * 365)).await;
    assert!(waiting.poll().is_pending(), "still waiting a year on");
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(Empty::new()));
    drop(held.await.unwrap());
    assert!(waiting.poll().is_pending());
    assert_eq!(forever.in_flight(), 1, "the waiter was admitted");
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_come_first_served_and_arrivals_queue_behind_them() {
    let layer = ConcurrencyLimitLayer::builder()
        .max(1)
        .wait_up_to(Duration::from_secs(10))
        .build()
        .unwrap();
    let (mock, mut handle) = mock::pair::<Request<u32>, Response<Empty<Bytes>>>();
    let mut svc = layer.layer(mock);
    let held = svc.ready().await.unwrap().call(Request::new(0));
    let mut a = tokio_test_spawn(svc.ready().await.unwrap().call(Request::new(1)));
    let mut b = tokio_test_spawn(svc.ready().await.unwrap().call(Request::new(2)));
    assert!(a.poll().is_pending() && b.poll().is_pending());
    let (r, send) = handle.next_request().await.unwrap();
    assert_eq!(*r.body(), 0);
    send.send_response(Response::new(Empty::new()));
    drop(held.await.unwrap());
    // A newcomer while two wait: it waits too, behind them.
    let mut c = tokio_test_spawn(svc.ready().await.unwrap().call(Request::new(3)));
    assert!(c.poll().is_pending());
    assert!(b.poll().is_pending() && a.poll().is_pending());
    let (r, send) = handle.next_request().await.unwrap();
    assert_eq!(*r.body(), 1, "the first waiter goes first");
    assert!(handle.poll_request().is_pending());
    send.send_response(Response::new(Empty::new()));
    assert!(a.poll().is_ready());
    assert!(c.poll().is_pending());
    assert!(b.poll().is_pending());
    let (r, _send) = handle.next_request().await.unwrap();
    assert_eq!(*r.body(), 2, "then the second, not the newcomer");
}

#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_after_it_was_woken_passes_the_permit_on() {
    let layer = ConcurrencyLimitLayer::builder()
        .max(1)
        .wait_up_to(Duration::from_secs(10))
        .build()
        .unwrap();
    let (mock, mut handle) = mock::pair::<Request<u32>, Response<Empty<Bytes>>>();
    let mut svc = layer.layer(mock);
    let held = svc.ready().await.unwrap().call(Request::new(0));
    let mut a = tokio_test_spawn(svc.ready().await.unwrap().call(Request::new(1)));
    let mut b = tokio_test_spawn(svc.ready().await.unwrap().call(Request::new(2)));
    assert!(a.poll().is_pending() && b.poll().is_pending());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(Empty::new()));
    drop(held.await.unwrap());
    assert!(a.is_woken());
    assert_eq!(
        layer.waiting(),
        1,
        "a was handed the permit and left the queue"
    );
    drop(a); // woken, never polled again
    assert_eq!(layer.waiting(), 0, "its permit went on to b");
    assert!(b.is_woken(), "the wake-up went on to the next waiter");
    assert!(b.poll().is_pending());
    let (r, _send) = handle.next_request().await.unwrap();
    assert_eq!(*r.body(), 2);
    assert_eq!((layer.waiting(), layer.in_flight()), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn an_adaptive_limit_backs_off_on_overload_and_grows_when_busy() {
    let aimd = Aimd {
        initial: 10,
        min: 2,
        max: 20,
        ..Aimd::default()
    };
    // A window of one call: the limit moves on every call.
    let layer = ConcurrencyLimitLayer::builder()
        .aimd(aimd)
        .sample_window(Duration::ZERO, 1)
        .build()
        .unwrap();
    let (mock, mut handle) = mock::pair::<Req, Response<Empty<Bytes>>>();
    let mut svc = layer.layer(mock);
    for _ in 0..5 {
        let call = svc.ready().await.unwrap().call(req());
        let (_, send) = handle.next_request().await.unwrap();
        let mut res = Response::new(Empty::new());
        *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        send.send_response(res);
        drop(call.await.unwrap());
    }
    assert_eq!(layer.limit(), 5, "10 × 0.9⁵ = 5.9");
    // Five calls at once, all answered 200: the limit was at least half used each time.
    let mut calls = Vec::new();
    for _ in 0..5 {
        calls.push(svc.ready().await.unwrap().call(req()));
    }
    for _ in 0..5 {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(Empty::new()));
    }
    for c in calls {
        drop(c.await.unwrap());
    }
    assert!(layer.limit() > 5, "grew: {}", layer.limit());
}

#[tokio::test(start_paused = true)]
async fn a_limit_refusal_inside_axum_is_a_503_and_a_grpc_resource_exhausted() {
    use axum::Router;
    use axum::routing::get;

    let layer = ConcurrencyLimitLayer::new(1);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let app: Router = Router::new()
        .route(
            "/",
            get(move || {
                let rx = rx.clone();
                async move {
                    if let Some(rx) = rx.lock().await.take() {
                        let _ = rx.await;
                    }
                    "ok"
                }
            }),
        )
        .layer(layer.answering());
    let slow = tokio::spawn(
        app.clone()
            .oneshot(Request::get("/").body(axum::body::Body::empty()).unwrap()),
    );
    tokio::task::yield_now().await;
    assert_eq!(layer.in_flight(), 1);
    let res = app
        .clone()
        .oneshot(Request::get("/").body(axum::body::Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    let grpc = Request::post("/")
        .header("content-type", "application/grpc")
        .body(axum::body::Body::empty())
        .unwrap();
    let res = app.clone().oneshot(grpc).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "8");
    tx.send(()).unwrap();
    let res = slow.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    assert_eq!(layer.in_flight(), 0);
}

#[test]
fn bad_settings_are_refused_with_a_clear_error() {
    use steadfast_limit::error::InvalidLimitConfig;
    use steadfast_limit::{Gradient2, Vegas};
    let b = ConcurrencyLimitLayer::builder;
    assert_eq!(
        b().max(0).build().unwrap_err(),
        InvalidLimitConfig::Zero("max")
    );
    let inverted = Aimd {
        initial: 5,
        min: 10,
        max: 20,
        ..Aimd::default()
    };
    assert!(matches!(
        b().aimd(inverted).build().unwrap_err(),
        InvalidLimitConfig::Bounds { .. }
    ));
    for backoff in [0.0, 1.0, -1.0, f64::NAN] {
        let e = b()
            .aimd(Aimd {
                backoff,
                ..Aimd::default()
            })
            .build()
            .unwrap_err();
        assert!(
            matches!(
                e,
                InvalidLimitConfig::Factor {
                    name: "backoff",
                    ..
                }
            ),
            "{e}"
        );
    }
    let e = b()
        .gradient2(Gradient2 {
            tolerance: 0.5,
            ..Gradient2::default()
        })
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("tolerance"), "{e}");
    let e = b()
        .vegas(Vegas {
            min: 0,
            ..Vegas::default()
        })
        .build()
        .unwrap_err();
    assert_eq!(e, InvalidLimitConfig::Zero("min"));
    assert_eq!(
        ConcurrencyLimitLayer::new(0).limit(),
        1,
        "new(0) is a limit of 1"
    );
}

#[test]
fn the_body_type_is_the_layer_s() {
    fn is_body<B: Body>() {}
    is_body::<LimitBody<Full<Bytes>>>();
}

/// `tokio_test::task::spawn` without the dependency: polls a future by hand and reports wakes.
fn tokio_test_spawn<F: std::future::Future>(fut: F) -> Spawned<F> {
    Spawned {
        fut: Box::pin(fut),
        woken: std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false))),
    }
}

struct Flag(std::sync::atomic::AtomicBool);

impl std::task::Wake for Flag {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

struct Spawned<F> {
    fut: Pin<Box<F>>,
    woken: std::sync::Arc<Flag>,
}

impl<F: std::future::Future> Spawned<F> {
    fn poll(&mut self) -> Poll<F::Output> {
        self.woken
            .0
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let waker = std::task::Waker::from(self.woken.clone());
        self.fut.as_mut().poll(&mut Context::from_waker(&waker))
    }

    fn is_woken(&self) -> bool {
        self.woken.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}
