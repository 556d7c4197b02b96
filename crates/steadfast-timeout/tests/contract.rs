//! Layer contracts with tower-test mocks and paused time.

use std::time::Duration;

use http::{Request, Response};
use steadfast_core::{BoxError, Deadline, GrpcCode};
use steadfast_timeout::error::Elapsed;
use steadfast_timeout::{RequestTimeout, SetDeadlineLayer, TimeoutLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

type Req = Request<()>;
type Res = Response<()>;

fn elapsed(err: BoxError) -> Elapsed {
    *err.downcast_ref::<Elapsed>().expect("an Elapsed error")
}

#[tokio::test(start_paused = true)]
async fn fast_inner_is_untouched_and_gets_no_header() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<Req, Res, _>(TimeoutLayer::new(Duration::from_secs(1)));
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(Request::new(()));
    let (req, send) = handle.next_request().await.unwrap();
    assert!(
        req.headers().is_empty(),
        "nothing to propagate without a deadline"
    );
    assert!(req.extensions().get::<Deadline>().is_none());
    send.send_response(Response::new(()));
    fut.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn slow_inner_fails_with_elapsed_at_the_limit() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<Req, Res, _>(TimeoutLayer::new(Duration::from_secs(1)));
    assert!(svc.poll_ready().is_ready());
    let start = Instant::now();
    let fut = svc.call(Request::new(()));
    let (_req, _send) = handle.next_request().await.unwrap();
    let e = elapsed(fut.await.unwrap_err());
    assert_eq!(e.limit(), Duration::from_secs(1));
    assert!(!e.is_inherited());
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn request_override_only_shortens() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<Req, Res, _>(TimeoutLayer::new(Duration::from_secs(1)));
    for (asked, fired) in [
        (Duration::from_millis(200), Duration::from_millis(200)),
        (Duration::from_secs(9), Duration::from_secs(1)),
    ] {
        assert!(svc.poll_ready().is_ready());
        let mut req = Request::new(());
        req.extensions_mut().insert(RequestTimeout(asked));
        let start = Instant::now();
        let fut = svc.call(req);
        let (_req, _send) = handle.next_request().await.unwrap();
        assert_eq!(elapsed(fut.await.unwrap_err()).limit(), fired);
        assert_eq!(start.elapsed(), fired);
    }
}

#[tokio::test(start_paused = true)]
async fn inherited_deadline_is_propagated_and_enforced() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<Req, Res, _>(TimeoutLayer::new(Duration::from_secs(5)));
    let deadline = Deadline::after(Duration::from_millis(1500));
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(svc.poll_ready().is_ready());
    let fut = deadline.sync_scope(|| svc.call(Request::new(())));
    let (req, _send) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()["x-request-timeout-ms"], "1000");
    assert!(
        req.extensions().get::<Deadline>().is_none(),
        "the layers below learn the deadline as the ambient one, not from an extension"
    );
    let e = elapsed(fut.await.unwrap_err());
    assert!(e.is_inherited());
    assert_eq!(e.limit(), Duration::from_millis(1000));
    assert!(deadline.is_expired());
}

/// What the layers below see while they are called, for each way of sharing the deadline:
/// the ambient deadline and the header on the wire.
#[tokio::test(start_paused = true)]
async fn the_layers_below_learn_the_deadline_while_they_are_called() {
    let seen = |req: Request<()>| {
        let header = req
            .headers()
            .get("x-request-timeout-ms")
            .map(|v| v.to_str().unwrap().to_owned());
        std::future::ready(Ok::<_, std::convert::Infallible>((
            header,
            Deadline::current().map(Deadline::remaining),
        )))
    };
    let ten = Duration::from_secs(10);
    let cases = [
        (TimeoutLayer::builder().limit(ten), None, None),
        (
            TimeoutLayer::builder().limit(ten).propagate_own(true),
            Some("10000"),
            Some(ten),
        ),
        (
            TimeoutLayer::builder().limit(ten).share_own(true),
            None,
            Some(ten),
        ),
        (
            TimeoutLayer::builder()
                .limit(ten)
                .propagate_own(true)
                .share_own(true),
            None,
            Some(ten),
        ),
        (
            TimeoutLayer::builder()
                .limit(ten)
                .share_own(true)
                .propagate_own(true),
            Some("10000"),
            Some(ten),
        ),
        (
            TimeoutLayer::builder()
                .limit(ten)
                .share_own(true)
                .share_own(false),
            None,
            None,
        ),
    ];
    for (i, (builder, header, deadline)) in cases.into_iter().enumerate() {
        let svc = builder.build().unwrap().layer(tower::service_fn(seen));
        let (h, d) = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(h.as_deref(), header, "case {i}");
        assert_eq!(d, deadline, "case {i}");
    }
    // An inherited deadline shorter than the limit: shared as it is, written unless the
    // layer only shares.
    let outer = Deadline::after(Duration::from_secs(3));
    for (builder, header) in [
        (TimeoutLayer::builder().limit(ten), Some("3000")),
        (TimeoutLayer::builder().limit(ten).share_own(true), None),
    ] {
        let mut svc = builder.build().unwrap().layer(tower::service_fn(seen));
        let fut = outer.sync_scope(|| svc.call(Request::new(())));
        let (h, d) = fut.await.unwrap();
        assert_eq!(h.as_deref(), header);
        assert_eq!(d, Some(Duration::from_secs(3)));
    }
}

#[tokio::test(start_paused = true)]
async fn an_inherited_deadline_equal_to_the_own_limit_counts_as_own() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<Req, Res, _>(TimeoutLayer::new(Duration::from_secs(2)));
    let deadline = Deadline::after(Duration::from_secs(2));
    assert!(svc.poll_ready().is_ready());
    let fut = deadline.sync_scope(|| svc.call(Request::new(())));
    let (_req, _send) = handle.next_request().await.unwrap();
    let e = elapsed(fut.await.unwrap_err());
    assert!(!e.is_inherited(), "ties go to the layer's own limit");
    assert_eq!(e.limit(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn grpc_requests_get_grpc_timeout() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<Req, Res, _>(TimeoutLayer::new(Duration::from_secs(5)));
    let deadline = Deadline::after(Duration::from_secs(2));
    assert!(svc.poll_ready().is_ready());
    let req = Request::builder()
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let fut = deadline.sync_scope(|| svc.call(req));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()["grpc-timeout"], "2000000u");
    assert!(req.headers().get("x-request-timeout-ms").is_none());
    send.send_response(Response::new(()));
    fut.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn own_limit_propagates_when_asked() {
    let (mut svc, mut handle) = mock::spawn_layer::<Req, Res, _>(
        TimeoutLayer::builder()
            .limit(Duration::from_secs(3))
            .propagate_own(true)
            .build()
            .unwrap(),
    );
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(Request::new(()));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()["x-request-timeout-ms"], "3000");
    send.send_response(Response::new(()));
    fut.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn spent_budget_fails_at_once_without_sending() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<Req, Res, _>(TimeoutLayer::new(Duration::from_secs(5)));
    let mut req = Request::new(());
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_millis(10)));
    tokio::time::advance(Duration::from_millis(10)).await;
    assert!(svc.poll_ready().is_ready());
    let start = Instant::now();
    let e = elapsed(svc.call(req).await.unwrap_err());
    assert!(e.is_inherited());
    assert_eq!(start.elapsed(), Duration::ZERO);
    drop(svc);
    assert!(handle.next_request().await.is_none(), "nothing was sent");
}

/// Zero is a deadline already passed, whether or not the inner service would answer at once;
/// `Duration::MAX` is "no limit" and never panics.
#[tokio::test(start_paused = true)]
async fn zero_never_sends_and_max_never_panics() {
    for propagate in [false, true] {
        let (mut svc, mut handle) = mock::spawn_layer::<Req, Res, _>(
            TimeoutLayer::builder()
                .limit(Duration::ZERO)
                .propagate_own(propagate)
                .build()
                .unwrap(),
        );
        assert!(svc.poll_ready().is_ready());
        let e = elapsed(svc.call(Request::new(())).await.unwrap_err());
        assert_eq!(e.limit(), Duration::ZERO);
        drop(svc);
        assert!(handle.next_request().await.is_none(), "nothing was sent");
    }
    for propagate in [false, true] {
        let (mut svc, mut handle) = mock::spawn_layer::<Req, Res, _>(
            TimeoutLayer::builder()
                .limit(Duration::MAX)
                .propagate_own(propagate)
                .build()
                .unwrap(),
        );
        assert!(svc.poll_ready().is_ready());
        let fut = svc.call(Request::new(()));
        let (_req, send) = handle.next_request().await.unwrap();
        tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
        send.send_response(Response::new(()));
        fut.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn cover_ready_bounds_the_readiness_wait_without_erroring_poll_ready() {
    let (svc, mut handle) = mock::pair::<Req, Res>();
    let mut svc = TimeoutLayer::builder()
        .limit(Duration::from_secs(1))
        .cover_ready(true)
        .build()
        .unwrap()
        .layer_svc(svc);
    handle.allow(0);
    let start = Instant::now();
    // poll_ready resolves Ok (never a policy error) once the wait runs out...
    svc.ready().await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    // ...and the call fails without reaching the inner service.
    let e = elapsed(svc.call(Request::new(())).await.unwrap_err());
    assert_eq!(e.limit(), Duration::from_secs(1));
    handle.allow(1);
    svc.ready().await.unwrap();
    let fut = svc.call(Request::new(()));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(()));
    fut.await.unwrap();
}

/// A readiness wait its caller abandoned is not charged to the next caller when that one
/// comes from another task, or more than a whole limit after the old wait would have ended;
/// a caller from the same task within that time continues the old wait (the service cannot
/// tell), and its call fails at once.
#[tokio::test(start_paused = true)]
async fn an_abandoned_readiness_wait_is_not_charged_to_a_later_or_other_caller() {
    /// A covered service whose inner one is not ready, after a wait abandoned at 100 ms and
    /// `pause` more.
    async fn after_an_abandoned_wait(
        pause: Duration,
    ) -> (
        steadfast_timeout::Timeout<mock::Mock<Req, Res>>,
        mock::Handle<Req, Res>,
    ) {
        let (svc, mut handle) = mock::pair::<Req, Res>();
        let mut svc = TimeoutLayer::builder()
            .limit(Duration::from_secs(1))
            .cover_ready(true)
            .build()
            .unwrap()
            .layer_svc(svc);
        handle.allow(0);
        let abandoned = tokio::time::timeout(Duration::from_millis(100), svc.ready()).await;
        assert!(abandoned.is_err(), "not ready");
        tokio::time::sleep(pause).await;
        (svc, handle)
    }

    // A new wait 1.5 s later from another task: its own 1 s, ready after 500 ms.
    let (mut svc, mut handle) = after_an_abandoned_wait(Duration::from_millis(1500)).await;
    let start = Instant::now();
    let other = tokio::spawn(async move {
        svc.ready().await.unwrap();
        (start.elapsed(), svc)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    handle.allow(1);
    let (waited, mut svc) = other.await.unwrap();
    assert_eq!(waited, Duration::from_millis(500), "a wait of its own");
    let fut = svc.call(Request::new(()));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(()));
    fut.await.unwrap();

    // Same task: 1.5 s later (within a limit of the old wait's end) it continues the old wait,
    // which has run out; 2.5 s later it starts a new one.
    for (pause, fails) in [(1500, true), (2500, false)] {
        let (mut svc, mut handle) = after_an_abandoned_wait(Duration::from_millis(pause)).await;
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            handle.allow(1);
            handle
        });
        svc.ready().await.unwrap();
        let fut = svc.call(Request::new(()));
        if fails {
            let e = elapsed(fut.await.unwrap_err());
            assert_eq!(e.limit(), Duration::from_secs(1));
            opener.await.unwrap();
        } else {
            let mut handle = opener.await.unwrap();
            let (_req, send) = handle.next_request().await.unwrap();
            send.send_response(Response::new(()));
            fut.await.unwrap();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn without_cover_ready_the_wait_is_unbounded() {
    let (svc, mut handle) = mock::pair::<Req, Res>();
    let mut svc = TimeoutLayer::new(Duration::from_secs(1)).layer_svc(svc);
    handle.allow(0);
    let waited = tokio::time::timeout(Duration::from_secs(60), svc.ready()).await;
    assert!(waited.is_err(), "still pending after 60 s");
}

trait LayerSvc {
    fn layer_svc<S>(self, s: S) -> steadfast_timeout::Timeout<S>;
}

impl LayerSvc for TimeoutLayer {
    fn layer_svc<S>(self, s: S) -> steadfast_timeout::Timeout<S> {
        tower::Layer::layer(&self, s)
    }
}

// ---- server side ----

#[tokio::test(start_paused = true)]
async fn server_makes_the_smaller_deadline_ambient() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<Req, Res, _>(SetDeadlineLayer::new(Duration::from_secs(5)));
    assert!(svc.poll_ready().is_ready());
    let req = Request::builder()
        .header("grpc-timeout", "1S")
        .body(())
        .unwrap();
    let fut = svc.call(req);
    let (req, send) = handle.next_request().await.unwrap();
    let d = *req.extensions().get::<Deadline>().unwrap();
    assert_eq!(d.remaining(), Duration::from_secs(1));
    send.send_response(Response::new(()));
    let res = fut.await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn server_answers_504_for_http_and_deadline_exceeded_for_grpc() {
    for grpc in [false, true] {
        let (mut svc, mut handle) =
            mock::spawn_layer::<Req, Res, _>(SetDeadlineLayer::new(Duration::from_secs(2)));
        assert!(svc.poll_ready().is_ready());
        let mut b = Request::builder();
        if grpc {
            b = b.header("content-type", "application/grpc");
        }
        let start = Instant::now();
        let fut = svc.call(b.body(()).unwrap());
        let (_req, _send) = handle.next_request().await.unwrap();
        let res = fut.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        if grpc {
            assert_eq!(res.status(), 200);
            assert_eq!(
                GrpcCode::from_map(res.headers()),
                Some(GrpcCode::DeadlineExceeded)
            );
            assert!(res.headers().contains_key("grpc-message"));
        } else {
            assert_eq!(res.status(), 504);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn server_status_is_configurable() {
    let (mut svc, mut handle) = mock::spawn_layer::<Req, Res, _>(
        SetDeadlineLayer::builder()
            .limit(Duration::from_secs(1))
            .status(http::StatusCode::SERVICE_UNAVAILABLE)
            .build()
            .unwrap(),
    );
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(Request::new(()));
    let (_req, _send) = handle.next_request().await.unwrap();
    assert_eq!(fut.await.unwrap().status(), 503);
}

#[tokio::test(start_paused = true)]
async fn malformed_inbound_budgets_fall_back_to_own_limit() {
    let bad: &[&[u8]] = &[
        b"123456789S",
        b"1s",
        b"1x",
        b"",
        b"-1S",
        b"+1S",
        b" 1S",
        b"99999999999999999999n",
        b"1.5S",
        b"\xc3\xa9S",
    ];
    for raw in bad {
        for name in ["grpc-timeout", "x-request-timeout-ms"] {
            let (mut svc, mut handle) =
                mock::spawn_layer::<Req, Res, _>(SetDeadlineLayer::new(Duration::from_secs(3)));
            assert!(svc.poll_ready().is_ready());
            let mut req = Request::new(());
            req.headers_mut()
                .insert(name, http::HeaderValue::from_bytes(raw).unwrap());
            let start = Instant::now();
            let fut = svc.call(req);
            let (req, _send) = handle.next_request().await.unwrap();
            assert_eq!(
                req.extensions().get::<Deadline>().unwrap().remaining(),
                Duration::from_secs(3),
                "{name}: {raw:?}"
            );
            assert_eq!(fut.await.unwrap().status(), 504);
            assert_eq!(start.elapsed(), Duration::from_secs(3), "{name}: {raw:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn zero_inbound_budget_answers_at_once_without_calling_inner() {
    for zero in ["0S", "0m", "0n", "0H"] {
        let (mut svc, mut handle) =
            mock::spawn_layer::<Req, Res, _>(SetDeadlineLayer::new(Duration::from_secs(3)));
        assert!(svc.poll_ready().is_ready());
        let req = Request::builder()
            .header("content-type", "application/grpc")
            .header("grpc-timeout", zero)
            .body(())
            .unwrap();
        let res = svc.call(req).await.unwrap();
        assert_eq!(
            GrpcCode::from_map(res.headers()),
            Some(GrpcCode::DeadlineExceeded),
            "{zero}"
        );
        drop(svc);
        assert!(
            handle.next_request().await.is_none(),
            "{zero}: inner never called"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn spawned_work_inherits_with_propagate() {
    let svc = tower::ServiceBuilder::new()
        .layer(SetDeadlineLayer::new(Duration::from_secs(4)))
        .service(tower::service_fn(|_req: Req| async {
            let inner = tokio::spawn(Deadline::propagate(async { Deadline::current() }))
                .await
                .unwrap();
            let lost = tokio::spawn(async { Deadline::current() }).await.unwrap();
            assert!(
                lost.is_none(),
                "task-locals do not cross spawn by themselves"
            );
            let d = inner.expect("propagated");
            let mut res = Response::new(());
            res.extensions_mut().insert(d);
            Ok::<_, std::convert::Infallible>(res)
        }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(
        res.extensions().get::<Deadline>().unwrap().remaining(),
        Duration::from_secs(4)
    );
}

/// The deadline is ambient in the handler's `call`, while its future runs, and while a
/// cancelled handler is dropped (its drop glue may still log or call out).
#[tokio::test(start_paused = true)]
async fn deadline_is_ambient_in_call_in_poll_and_in_drop() {
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<(&'static str, Option<Deadline>)>>>;
    struct Handler(Seen);
    impl Drop for Handler {
        fn drop(&mut self) {
            self.0.lock().unwrap().push(("drop", Deadline::current()));
        }
    }
    impl std::future::Future for Handler {
        type Output = Result<Res, std::convert::Infallible>;
        fn poll(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Self::Output> {
            self.0.lock().unwrap().push(("poll", Deadline::current()));
            std::task::Poll::Pending
        }
    }

    let seen: Seen = Arc::default();
    let s = seen.clone();
    let mut svc = tower::ServiceBuilder::new()
        .layer(SetDeadlineLayer::new(Duration::from_secs(3)))
        .service(tower::service_fn(move |_req: Req| {
            s.lock().unwrap().push(("call", Deadline::current()));
            Handler(s.clone())
        }));
    let mut fut = Box::pin(svc.ready().await.unwrap().call(Request::new(())));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    drop(fut);
    assert_eq!(Deadline::current(), None, "nothing leaks out of the scope");
    let seen = seen.lock().unwrap();
    let stages: Vec<_> = seen.iter().map(|(stage, _)| *stage).collect();
    assert_eq!(stages, ["call", "poll", "drop"]);
    for (stage, d) in seen.iter() {
        let d = d.unwrap_or_else(|| panic!("no deadline in {stage}"));
        assert_eq!(d.remaining(), Duration::from_secs(3), "{stage}");
    }
}

#[tokio::test(start_paused = true)]
async fn axum_router_keeps_infallible_and_answers() {
    use axum::{Router, routing::get};
    fn assert_infallible<
        S: Service<Request<axum::body::Body>, Error = std::convert::Infallible>,
    >(
        _: &S,
    ) {
    }
    let app = Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            }),
        )
        .route("/fast", get(|| async { "ok" }))
        .layer(SetDeadlineLayer::new(Duration::from_secs(1)));
    assert_infallible(&app);
    let get = |p: &str| Request::get(p).body(axum::body::Body::empty()).unwrap();
    let res = app.clone().oneshot(get("/fast")).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "ok");
    let res = app.oneshot(get("/slow")).await.unwrap();
    assert_eq!(res.status(), 504);
}

#[test]
fn services_and_futures_are_send_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<steadfast_timeout::Timeout<tower::util::BoxCloneSyncService<Req, Res, BoxError>>>();
    send_sync::<steadfast_timeout::SetDeadline<tower::util::BoxCloneSyncService<Req, Res, BoxError>>>(
    );
    send::<steadfast_timeout::future::ResponseFuture<std::future::Ready<Result<Res, BoxError>>>>();
    send::<steadfast_timeout::future::SetDeadlineFuture<std::future::Ready<Result<Res, BoxError>>>>(
    );
}

/// A call made outside any runtime (the future is built in sync code, then run) needs no
/// timer until its first `Pending`, so it may be polled in a runtime made afterwards: with
/// the layer's own limit, and with a deadline written downstream.
#[test]
fn a_call_made_outside_a_runtime_is_timed_where_it_is_polled() {
    for propagate in [false, true] {
        let mut svc = TimeoutLayer::builder()
            .limit(Duration::from_secs(2))
            .propagate_own(propagate)
            .build()
            .unwrap()
            .layer(tower::service_fn(|_: Req| {
                std::future::pending::<Result<Res, BoxError>>()
            }));
        let fut = svc.call(Request::new(()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let e = elapsed(rt.block_on(fut).unwrap_err());
        assert!(e.limit() <= Duration::from_secs(2), "propagate {propagate}");
    }
}

/// Inside a task, call after call (some waiting, some answered at once): the limits, the
/// errors and the deadline written downstream are the same every time.
#[tokio::test(start_paused = true)]
async fn in_a_task_calls_are_timed_alike_wherever_the_timer_is_built() {
    tokio::spawn(async {
        let (mut svc, mut handle) = mock::spawn_layer::<Req, Res, _>(
            TimeoutLayer::builder()
                .limit(Duration::from_secs(1))
                .propagate_own(true)
                .build()
                .unwrap(),
        );
        for round in 0..3 {
            assert!(svc.poll_ready().is_ready());
            let start = Instant::now();
            let fut = svc.call(Request::new(()));
            let (req, _send) = handle.next_request().await.unwrap();
            assert_eq!(
                req.headers()["x-request-timeout-ms"],
                "1000",
                "round {round}"
            );
            let e = elapsed(fut.await.unwrap_err());
            assert_eq!(e.limit(), Duration::from_secs(1));
            assert_eq!(start.elapsed(), Duration::from_secs(1), "round {round}");
        }
        assert!(svc.poll_ready().is_ready());
        let fut = svc.call(Request::new(()));
        let (_req, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        fut.await.unwrap();
    })
    .await
    .unwrap();
}

// ---- the body deadline ----

mod body {
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body::{Body, Frame};
    use http_body_util::{BodyExt, StreamBody};
    use steadfast_timeout::TimeoutLayer;
    use steadfast_timeout::error::Elapsed;
    use tokio::time::Instant;
    use tower::{Layer, ServiceExt, service_fn};

    /// A body that sends a byte after each of `gaps`, then ends.
    fn gaps(gaps: Vec<u64>) -> impl Body<Data = Bytes, Error = Infallible> + Unpin {
        let frames = futures_util::stream::unfold(gaps.into_iter(), |mut it| async move {
            let ms = it.next()?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Some((Ok(Frame::data(Bytes::from_static(b"x"))), it))
        });
        StreamBody::new(Box::pin(frames))
    }

    /// Reads to the end: bytes, the `Elapsed` that ended it (if one did), and when.
    async fn drain<B>(mut body: B) -> (usize, Option<Elapsed>, Duration)
    where
        B: Body<Data = Bytes, Error = steadfast_core::BoxError> + Unpin,
    {
        let start = Instant::now();
        let mut n = 0;
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => n += f.into_data().unwrap().len(),
                Err(e) => {
                    let e = *e.downcast_ref::<Elapsed>().unwrap();
                    assert!(body.is_end_stream(), "ended");
                    assert!(body.frame().await.is_none(), "nothing after the error");
                    return (n, Some(e), start.elapsed());
                }
            }
        }
        (n, None, start.elapsed())
    }

    /// The head waited 300 ms of a 1 s deadline: the body gets the 700 ms left, not 1 s more.
    #[tokio::test(start_paused = true)]
    async fn the_body_gets_what_is_left_of_the_call_s_deadline() {
        let svc = service_fn(|_req: http::Request<()>| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, Infallible>(http::Response::new(gaps(vec![100, 100, 10_000])))
        });
        let client = TimeoutLayer::builder()
            .limit(Duration::from_secs(1))
            .covering_body()
            .build()
            .unwrap()
            .layer(svc);
        let res = client.oneshot(http::Request::new(())).await.unwrap();
        let (n, e, took) = drain(res.into_body()).await;
        assert_eq!(n, 2);
        assert_eq!(e.unwrap().limit(), Duration::from_secs(1));
        assert_eq!(took, Duration::from_millis(700));
    }

    /// A head that answered at its first poll armed no timer: the body counts the limit from
    /// that answer (not from its own first wait), and frames already there pass.
    #[tokio::test(start_paused = true)]
    async fn a_head_at_once_counts_from_its_answer() {
        let svc = service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(gaps(vec![0, 0, 600, 600])))
        });
        let client = TimeoutLayer::builder()
            .limit(Duration::from_secs(1))
            .covering_body()
            .build()
            .unwrap()
            .layer(svc);
        let res = client.oneshot(http::Request::new(())).await.unwrap();
        let (n, e, took) = drain(res.into_body()).await;
        assert_eq!(n, 3);
        assert!(e.is_some());
        assert_eq!(took, Duration::from_secs(1));
    }

    /// The report's case: a lazy head answered at once and frames keep coming 110 ms apart:
    /// the body ends at the deadline, not after the fifty frames (5.5 s).
    #[tokio::test(start_paused = true)]
    async fn a_head_at_once_does_not_give_the_body_a_fresh_limit() {
        let svc = service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(gaps(vec![110; 50])))
        });
        let client = TimeoutLayer::builder()
            .limit(Duration::from_millis(500))
            .covering_body()
            .build()
            .unwrap()
            .layer(svc);
        let start = Instant::now();
        let res = client.oneshot(http::Request::new(())).await.unwrap();
        let (n, e, _) = drain(res.into_body()).await;
        assert!(e.is_some());
        assert_eq!(n, 4, "frames at 110-440 ms only");
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }

    /// A body whose frames are all at hand but each handed over after a `Pending` (as
    /// hyper's HTTP/1 body does): read after the deadline, it is delivered whole; a body that
    /// has nothing more ends within the grace.
    #[tokio::test(start_paused = true)]
    async fn a_late_reader_gets_what_was_already_received() {
        struct HandOver(usize, bool);
        impl Body for HandOver {
            type Data = Bytes;
            type Error = Infallible;
            fn poll_frame(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
                if self.0 == 0 {
                    return std::task::Poll::Ready(None);
                }
                self.1 = !self.1;
                if self.1 {
                    cx.waker().wake_by_ref();
                    return std::task::Poll::Pending;
                }
                self.0 -= 1;
                std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
            }
        }
        let svc = service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(HandOver(20, false)))
        });
        let client = TimeoutLayer::builder()
            .limit(Duration::from_millis(300))
            .covering_body()
            .build()
            .unwrap()
            .layer(svc);
        let res = client.oneshot(http::Request::new(())).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (n, e, _) = drain(res.into_body()).await;
        assert_eq!(
            (n, e),
            (20, None),
            "delivered whole, 1.7 s after the deadline"
        );

        // Nothing at hand: the late reader waits the grace, no more.
        let svc = service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(gaps(vec![0, 60_000])))
        });
        let client = TimeoutLayer::builder()
            .limit(Duration::from_millis(300))
            .covering_body()
            .build()
            .unwrap()
            .layer(svc);
        let res = client.oneshot(http::Request::new(())).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (n, e, took) = drain(res.into_body()).await;
        assert_eq!(n, 1);
        assert!(e.is_some());
        assert_eq!(took, steadfast_timeout::LATE_READ_GRACE);
    }

    /// Idle limit: reset by every frame; fires on the first gap longer than it. Off with
    /// `whole_call(false)`, the total no longer bounds the body.
    #[tokio::test(start_paused = true)]
    async fn the_idle_limit_is_between_frames() {
        let svc = service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(gaps(vec![400, 400, 400, 400, 600])))
        });
        let client = TimeoutLayer::builder()
            .limit(Duration::from_secs(1))
            .covering_body()
            .whole_call(false)
            .idle(Some(Duration::from_millis(500)))
            .build()
            .unwrap()
            .layer(svc);
        let res = client.oneshot(http::Request::new(())).await.unwrap();
        let (n, e, took) = drain(res.into_body()).await;
        assert_eq!(n, 4, "four gaps under the idle limit, past the 1 s total");
        let e = e.unwrap();
        assert!(e.is_idle());
        assert_eq!(e.to_string(), "response body idle for 500ms");
        assert_eq!(took, Duration::from_millis(2100));
    }

    /// `Duration::MAX` for both limits never panics and never cuts a body; an idle limit of
    /// zero is refused when built (it would end every body at its first wait).
    #[tokio::test(start_paused = true)]
    async fn absurd_limits_never_panic() {
        let zero = TimeoutLayer::builder()
            .covering_body()
            .idle(Some(Duration::ZERO))
            .build()
            .unwrap_err();
        assert_eq!(
            zero,
            steadfast_timeout::error::InvalidTimeoutConfig::ZeroIdle
        );
        assert!(zero.to_string().contains("None to turn the idle limit off"));
        let svc = service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(gaps(vec![1_000_000, 5])))
        });
        let client = TimeoutLayer::builder()
            .limit(Duration::MAX)
            .covering_body()
            .idle(Some(Duration::MAX))
            .build()
            .unwrap()
            .layer(svc);
        let res = client.oneshot(http::Request::new(())).await.unwrap();
        let (n, e, _) = drain(res.into_body()).await;
        assert_eq!((n, e), (2, None));
    }

    /// The body error is a plain `BoxError` holding `Elapsed`, and `collect` surfaces it.
    #[tokio::test(start_paused = true)]
    async fn collect_surfaces_the_error() {
        let svc = service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(gaps(vec![5_000])))
        });
        let client = TimeoutLayer::builder()
            .limit(Duration::from_secs(1))
            .covering_body()
            .build()
            .unwrap()
            .layer(svc);
        let res = client.oneshot(http::Request::new(())).await.unwrap();
        let err = res.into_body().collect().await.unwrap_err();
        assert!(err.is::<Elapsed>());
    }
}

/// A server deadline answered with a success status would read as success to the caller:
/// refused when built, with a message that says which statuses work.
#[test]
fn a_server_answer_that_is_not_an_error_is_refused_when_built() {
    use steadfast_timeout::error::InvalidTimeoutConfig;
    for code in [200, 204, 302, 399] {
        let status = http::StatusCode::from_u16(code).unwrap();
        let err = SetDeadlineLayer::builder()
            .status(status)
            .build()
            .unwrap_err();
        assert_eq!(err, InvalidTimeoutConfig::StatusNotAnError(status));
        assert!(err.to_string().contains("use a 4xx or 5xx status"), "{err}");
    }
    for code in [400, 503, 504, 599] {
        let status = http::StatusCode::from_u16(code).unwrap();
        assert!(SetDeadlineLayer::builder().status(status).build().is_ok());
    }
}

/// An outer timeout fires on time once the timeout below no longer covers the call: here the
/// inner call times out at 1 s, and the service then waits on something no timer bounds.
#[tokio::test(start_paused = true)]
async fn an_outer_timeout_fires_on_time_after_the_inner_one_stops_covering_it() {
    let inner =
        TimeoutLayer::new(Duration::from_secs(1)).layer(tower::service_fn(|_req: Request<()>| {
            std::future::pending::<Result<Response<()>, BoxError>>()
        }));
    let svc = tower::service_fn(move |req: Request<()>| {
        let mut inner = inner.clone();
        async move {
            let e = inner.call(req).await.unwrap_err();
            assert!(e.downcast_ref::<Elapsed>().is_some());
            // Uncovered from here on: only the outer timer can end the call.
            std::future::pending::<()>().await;
            Ok::<_, BoxError>(Response::new(()))
        }
    });
    for own in [false, true] {
        let outer = TimeoutLayer::builder()
            .limit(Duration::from_secs(3))
            .propagate_own(own)
            .build()
            .unwrap()
            .layer(svc.clone());
        let start = Instant::now();
        // A guard that fails the test instead of hanging it if nothing ends the call.
        let out = tokio::time::timeout(Duration::from_secs(60), outer.oneshot(Request::new(())));
        let e = elapsed(out.await.expect("ended by the outer timeout").unwrap_err());
        assert_eq!(e.limit(), Duration::from_secs(3));
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(3),
            "propagate_own {own}"
        );
    }
}

/// Covered the whole time: the inner timer (due before the outer deadline) ends the call,
/// and the outer's limit still bounds an inner limit that is longer.
#[tokio::test(start_paused = true)]
async fn nested_timeouts_end_the_call_at_the_earlier_limit() {
    for (outer, inner, fired) in [(3, 1, 1), (1, 3, 1), (2, 2, 2)] {
        let svc = TimeoutLayer::new(Duration::from_secs(outer)).layer(
            TimeoutLayer::new(Duration::from_secs(inner)).layer(tower::service_fn(
                |_req: Request<()>| std::future::pending::<Result<Response<()>, BoxError>>(),
            )),
        );
        let start = Instant::now();
        let e = elapsed(svc.oneshot(Request::new(())).await.unwrap_err());
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(fired),
            "{outer} over {inner}"
        );
        assert_eq!(e.limit(), Duration::from_secs(fired));
    }
}

/// The server deadline answers 504 on time after the handler's client call (due sooner)
/// timed out and the handler waits on something else.
#[tokio::test(start_paused = true)]
async fn the_server_deadline_answers_on_time_after_a_covered_client_call() {
    let client =
        TimeoutLayer::new(Duration::from_secs(1)).layer(tower::service_fn(|_req: Request<()>| {
            std::future::pending::<Result<Response<()>, BoxError>>()
        }));
    let handler = tower::service_fn(move |req: Request<()>| {
        let mut client = client.clone();
        async move {
            assert!(
                client.call(req).await.is_err(),
                "the client call times out at 1 s"
            );
            std::future::pending::<()>().await;
            Ok::<_, std::convert::Infallible>(Response::new(()))
        }
    });
    let svc = SetDeadlineLayer::new(Duration::from_secs(3)).layer(handler);
    let start = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(60), svc.oneshot(Request::new(())));
    let res = out.await.expect("answered by the server deadline").unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}

/// A body whose every data frame records the ambient deadline when it is produced; its size hint
/// and end of stream are fixed, to check they pass through.
struct Probe {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Option<Deadline>>>>,
    left: u32,
}

impl http_body::Body for Probe {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.seen.lock().unwrap().push(Deadline::current());
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
            b"x",
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(u64::from(self.left))
    }
}

/// The deadline the caller sent is ambient while the response body's frames are produced,
/// even after the handler returned; the layer's own limit is not (it bounds the handler's
/// answer, and a stream may outlive it). Size hints and end of stream pass through.
#[tokio::test(start_paused = true)]
async fn the_callers_deadline_and_only_it_is_ambient_while_the_body_is_produced() {
    use http_body::Body as _;
    use http_body_util::BodyExt;
    for inbound in [Some("3000"), None] {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut svc =
            SetDeadlineLayer::new(Duration::from_secs(1)).layer(tower::service_fn(
                move |_req: Req| {
                    let seen = s.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(Response::new(Probe { seen, left: 2 }))
                    }
                },
            ));
        let mut req = Request::new(());
        if let Some(ms) = inbound {
            req.headers_mut()
                .insert("x-request-timeout-ms", ms.parse().unwrap());
        }
        let start = Instant::now();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        let body = res.into_body();
        assert_eq!(body.size_hint().exact(), Some(2));
        assert!(!body.is_end_stream());
        // Read well past the layer's 1 s limit, within the caller's 3 s.
        tokio::time::advance(Duration::from_secs(2)).await;
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"xx");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        let want = inbound.map(|_| Deadline::after_from(start, Duration::from_secs(3)));
        assert!(seen.iter().all(|d| *d == want), "{inbound:?}: {seen:?}");
    }
}
