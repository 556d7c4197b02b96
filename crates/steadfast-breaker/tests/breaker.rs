//! Breaker contracts: the transition table, pinned semantics, windows, probes, per-key
//! breakers, backpressure. Paused time, jitter 0.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use steadfast_breaker::{
    BreakerHandle, BreakerOpen, CircuitBreakerBuilder, CircuitBreakerLayer, State,
};
use steadfast_core::{BoxError, DefaultClassifier};
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt, service_fn};

/// An upstream whose next status is set by the test; counts the calls it receives.
#[derive(Clone, Default)]
struct Upstream {
    status: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
}

impl Upstream {
    fn new() -> Self {
        let u = Self::default();
        u.status.store(200, Ordering::SeqCst);
        u
    }
    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    fn svc(
        &self,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + use<> {
        let this = self.clone();
        service_fn(move |_req: Request<()>| {
            let this = this.clone();
            async move {
                this.hits.fetch_add(1, Ordering::SeqCst);
                let s = this.status.load(Ordering::SeqCst);
                Ok::<_, Infallible>(Response::builder().status(s).body(()).unwrap())
            }
        })
    }
}

fn builder() -> CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .open_time(Duration::from_secs(30))
        .jitter_percent(0)
        .seed(1)
}

async fn call<S>(svc: &mut S) -> Result<u16, BoxError>
where
    S: Service<Request<()>, Error = BoxError>,
    S::Response: StatusOf,
{
    let res = svc.ready().await?.call(Request::new(())).await?;
    Ok(res.status_u16())
}

trait StatusOf {
    fn status_u16(&self) -> u16;
}
impl<B> StatusOf for Response<B> {
    fn status_u16(&self) -> u16 {
        self.status().as_u16()
    }
}

fn is_open(r: &Result<u16, BoxError>) -> bool {
    matches!(r, Err(e) if e.downcast_ref::<BreakerOpen>().is_some())
}

#[allow(clippy::type_complexity)] // one helper's return tuple, spelled once
fn setup(
    b: CircuitBreakerBuilder,
) -> (
    Upstream,
    BreakerHandle<DefaultClassifier>,
    impl Service<
        Request<()>,
        Response = Response<steadfast_breaker::BreakerBody<(), DefaultClassifier>>,
        Error = BoxError,
    > + Clone,
) {
    let up = Upstream::new();
    let layer = b.build().unwrap();
    let handle = layer.handle();
    let svc = layer.layer(up.svc());
    (up, handle, svc)
}

// ---- the transition table ----

#[tokio::test(start_paused = true)]
async fn closed_to_open_after_five_consecutive_failures_seed_default() {
    let (up, h, mut svc) = setup(builder());
    up.set(503);
    for i in 0..5 {
        assert_eq!(h.state(), State::Closed, "still closed before failure {i}");
        assert_eq!(call(&mut svc).await.unwrap(), 503);
    }
    assert_eq!(h.state(), State::Open);
    let hits = up.hits();
    let r = call(&mut svc).await;
    assert!(is_open(&r));
    assert_eq!(up.hits(), hits, "no traffic while open");
}

/// A count window smaller than the minimum number of calls: the minimum is lowered to the
/// window's size (resilience4j's rule), so 5 failures in a 5-call window trip. Before, 30
/// failures of 30 calls left the breaker closed.
#[tokio::test(start_paused = true)]
async fn a_count_window_smaller_than_min_calls_still_trips() {
    let (up, h, mut svc) = setup(
        builder()
            .consecutive_failures(None)
            .count_window(5)
            .failure_rate(50),
    );
    up.set(503);
    for i in 0..5 {
        assert_eq!(h.state(), State::Closed, "closed before failure {i}");
        assert_eq!(call(&mut svc).await.unwrap(), 503);
    }
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_consecutive_count_and_4xx_is_success() {
    let (up, h, mut svc) = setup(builder());
    for _ in 0..3 {
        up.set(500);
        for _ in 0..4 {
            call(&mut svc).await.unwrap();
        }
        up.set(404);
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn open_to_half_open_exactly_at_open_time_then_close_on_success() {
    let (up, h, mut svc) = setup(builder());
    up.set(503);
    for _ in 0..5 {
        call(&mut svc).await.unwrap();
    }
    let Err(e) = call(&mut svc).await else {
        panic!()
    };
    assert_eq!(
        e.downcast_ref::<BreakerOpen>().unwrap().retry_after(),
        Some(Duration::from_secs(30))
    );
    advance(Duration::from_secs(30) - Duration::from_nanos(1)).await;
    assert!(is_open(&call(&mut svc).await), "not a nanosecond early");
    advance(Duration::from_nanos(1)).await;
    up.set(200);
    assert_eq!(call(&mut svc).await.unwrap(), 200, "the probe");
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn probe_failure_reopens_with_a_longer_open_time_reset_on_close() {
    let (up, h, mut svc) = setup(builder().max_open_time(Duration::from_secs(100)));
    up.set(503);
    for _ in 0..5 {
        call(&mut svc).await.unwrap();
    }
    let mut expected = [30u64, 60, 100, 100].into_iter();
    let mut open_for = expected.next().unwrap();
    for next in expected {
        advance(Duration::from_secs(open_for)).await;
        assert_eq!(call(&mut svc).await.unwrap(), 503, "probe fails");
        assert_eq!(h.state(), State::Open);
        let Err(e) = call(&mut svc).await else {
            panic!()
        };
        assert_eq!(
            e.downcast_ref::<BreakerOpen>().unwrap().retry_after(),
            Some(Duration::from_secs(next))
        );
        open_for = next;
    }
    advance(Duration::from_secs(open_for)).await;
    up.set(200);
    call(&mut svc).await.unwrap();
    assert_eq!(h.state(), State::Closed);
    up.set(503);
    for _ in 0..5 {
        call(&mut svc).await.unwrap();
    }
    let Err(e) = call(&mut svc).await else {
        panic!()
    };
    assert_eq!(
        e.downcast_ref::<BreakerOpen>().unwrap().retry_after(),
        Some(Duration::from_secs(30)),
        "reset on close"
    );
}

#[tokio::test(start_paused = true)]
async fn illegal_transitions_do_not_happen() {
    // Closed never goes to HalfOpen by time, nor Open by successes.
    let (up, h, mut svc) = setup(builder());
    advance(Duration::from_secs(3600)).await;
    for _ in 0..100 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.state(), State::Closed);
    // Open never closes without a probe, whatever late successes arrive.
    up.set(503);
    for _ in 0..5 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.state(), State::Open);
    advance(Duration::from_secs(29)).await;
    assert_eq!(h.state(), State::Open);
    // Disabled / MetricsOnly never trip; ForcedOpen never half-opens.
    for (set, expect) in [
        (
            BreakerHandle::disable as fn(&BreakerHandle<DefaultClassifier>),
            State::Disabled,
        ),
        (BreakerHandle::metrics_only, State::MetricsOnly),
    ] {
        set(&h);
        up.set(503);
        for _ in 0..50 {
            assert_eq!(
                call(&mut svc).await.unwrap(),
                503,
                "{expect:?} lets calls through"
            );
        }
        assert_eq!(h.state(), expect);
    }
    h.force_open();
    let hits = up.hits();
    advance(Duration::from_secs(3600)).await;
    for _ in 0..5 {
        let r = call(&mut svc).await;
        let Err(e) = r else { panic!() };
        assert_eq!(e.downcast_ref::<BreakerOpen>().unwrap().retry_after(), None);
    }
    assert_eq!(h.state(), State::ForcedOpen);
    assert_eq!(up.hits(), hits);
    h.close();
    up.set(200);
    assert_eq!(call(&mut svc).await.unwrap(), 200);
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn every_transition_is_published() {
    let (up, h, mut svc) = setup(builder());
    let mut sub = h.subscribe();
    up.set(503);
    for _ in 0..5 {
        call(&mut svc).await.unwrap();
    }
    advance(Duration::from_secs(30)).await;
    up.set(200);
    call(&mut svc).await.unwrap();
    h.force_open();
    h.disable();
    h.metrics_only();
    h.close();
    let mut seen = Vec::new();
    while let Some(t) = sub.try_recv() {
        seen.push((t.from, t.to));
    }
    use State::*;
    assert_eq!(
        seen,
        vec![
            (Closed, Open),
            (Open, HalfOpen),
            (HalfOpen, Closed),
            (Closed, ForcedOpen),
            (ForcedOpen, Disabled),
            (Disabled, MetricsOnly),
            (MetricsOnly, Closed)
        ]
    );
}

// ---- pinned semantics ----

#[tokio::test(start_paused = true)]
async fn outcomes_from_an_earlier_generation_never_decide() {
    // A slow call admitted while Closed finishes after the breaker opened and re-closed.
    let gate = Arc::new(tokio::sync::Notify::new());
    let fail_slow = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let layer = builder().consecutive_failures(Some(1)).build().unwrap();
    let h = layer.handle();
    let (g, f) = (gate.clone(), fail_slow.clone());
    let mut svc = layer.layer(service_fn(move |req: Request<()>| {
        let (g, f) = (g.clone(), f.clone());
        async move {
            if req.uri().path() == "/slow" {
                g.notified().await;
            }
            let status = if f.load(Ordering::SeqCst) { 500 } else { 200 };
            Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap())
        }
    }));
    let slow = svc
        .ready()
        .await
        .unwrap()
        .call(Request::get("/slow").body(()).unwrap());
    let slow = tokio::spawn(slow);
    tokio::task::yield_now().await;
    // Trip with another call, let it half-open, probe it closed: generation moved twice.
    call(&mut svc).await.unwrap();
    assert_eq!(h.state(), State::Open);
    advance(Duration::from_secs(30)).await;
    fail_slow.store(false, Ordering::SeqCst);
    call(&mut svc).await.unwrap();
    assert_eq!(h.state(), State::Closed);
    // Now the old call fails: it was admitted two generations ago and must not trip.
    fail_slow.store(true, Ordering::SeqCst);
    gate.notify_one();
    assert_eq!(slow.await.unwrap().unwrap().status(), 500);
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_n_probes_and_dropped_probes_return_permits() {
    let layer = builder().half_open_probes(2).build().unwrap();
    let h = layer.handle();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let mut svc = layer.layer(service_fn(move |req: Request<()>| {
        let g = g.clone();
        async move {
            if req.uri().path() == "/fail" {
                return Ok::<_, Infallible>(Response::builder().status(503).body(()).unwrap());
            }
            g.acquire().await.unwrap().forget();
            Ok(Response::new(()))
        }
    }));
    for _ in 0..5 {
        svc.ready()
            .await
            .unwrap()
            .call(Request::get("/fail").body(()).unwrap())
            .await
            .unwrap();
    }
    advance(Duration::from_secs(30)).await;
    let p1 = tokio::spawn(svc.ready().await.unwrap().call(Request::new(())));
    let p2 = svc.ready().await.unwrap().call(Request::new(()));
    assert!(is_open(&call(&mut svc).await), "a third probe is refused");
    drop(p2); // cancelled: its permit comes back
    let p3 = tokio::spawn(svc.ready().await.unwrap().call(Request::new(())));
    assert!(is_open(&call(&mut svc).await));
    gate.add_permits(1);
    let first = tokio::select! {
        r = p1 => r,
        r = p3 => r,
    };
    first.unwrap().unwrap();
    assert_eq!(h.state(), State::HalfOpen, "one success of two");
    gate.add_permits(1);
    while h.state() != State::Closed {
        tokio::task::yield_now().await;
    }
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_without_a_verdict_reopens_after_the_open_time() {
    let layer = builder().build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(service_fn(|req: Request<()>| async move {
        if req.uri().path() == "/hang" {
            std::future::pending::<()>().await;
        }
        Ok::<_, Infallible>(Response::builder().status(503).body(()).unwrap())
    }));
    for _ in 0..5 {
        call(&mut svc).await.unwrap();
    }
    advance(Duration::from_secs(30)).await;
    let _hung = tokio::spawn(
        svc.ready()
            .await
            .unwrap()
            .call(Request::get("/hang").body(()).unwrap()),
    );
    tokio::task::yield_now().await;
    assert_eq!(h.state(), State::HalfOpen);
    advance(Duration::from_secs(29)).await;
    assert!(is_open(&call(&mut svc).await));
    assert_eq!(h.state(), State::HalfOpen);
    advance(Duration::from_secs(1)).await;
    assert!(is_open(&call(&mut svc).await));
    assert_eq!(
        h.state(),
        State::Open,
        "no verdict within the open time: re-open"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_on_the_tripping_failure_raises_the_open_time() {
    let layer = builder().consecutive_failures(Some(1)).build().unwrap();
    let mut svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(503)
                .header("retry-after", "120")
                .body(())
                .unwrap(),
        )
    }));
    call(&mut svc).await.unwrap();
    let Err(e) = call(&mut svc).await else {
        panic!()
    };
    assert_eq!(
        e.downcast_ref::<BreakerOpen>().unwrap().retry_after(),
        Some(Duration::from_secs(120))
    );
}

// ---- windows ----

#[tokio::test(start_paused = true)]
async fn regression_window_100_threshold_50_opens_within_50_failures_after_1000_successes() {
    let (up, h, mut svc) = setup(
        builder()
            .consecutive_failures(None)
            .count_window(100)
            .failure_rate(50),
    );
    for _ in 0..1000 {
        call(&mut svc).await.unwrap();
    }
    up.set(500);
    let mut failures = 0;
    while h.state() == State::Closed {
        call(&mut svc).await.unwrap();
        failures += 1;
        assert!(failures <= 50, "peers need 1000 here");
    }
    assert_eq!(failures, 50);
}

#[tokio::test(start_paused = true)]
async fn min_calls_gates_the_rate() {
    let (up, h, mut svc) = setup(
        builder()
            .consecutive_failures(None)
            .count_window(100)
            .failure_rate(50)
            .min_calls(20),
    );
    up.set(500);
    for _ in 0..19 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.state(), State::Closed);
    call(&mut svc).await.unwrap();
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_failures() {
    let (up, h, mut svc) = setup(
        builder()
            .consecutive_failures(None)
            .time_window(Duration::from_secs(1), 10)
            .failure_rate(50)
            .min_calls(10),
    );
    up.set(500);
    for _ in 0..9 {
        call(&mut svc).await.unwrap();
    }
    advance(Duration::from_secs(10)).await;
    up.set(200);
    for _ in 0..9 {
        call(&mut svc).await.unwrap();
    }
    up.set(500);
    call(&mut svc).await.unwrap();
    assert_eq!(
        h.state(),
        State::Closed,
        "the old failures left the window: 1 of 10 failed"
    );
    assert_eq!(h.metrics().window.unwrap().calls, 10);
}

#[tokio::test(start_paused = true)]
async fn slow_call_rate_trips() {
    let layer = builder()
        .consecutive_failures(None)
        .count_window(10)
        .min_calls(10)
        .slow_calls(Duration::from_secs(1), 50)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(service_fn(|_req: Request<()>| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok::<_, Infallible>(Response::new(()))
    }));
    for _ in 0..10 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.state(), State::Open);
    assert_eq!(h.metrics().slow, 10);
}

/// "Slower than the threshold" is strict: a call of exactly the threshold is not slow (as
/// resilience4j), one a millisecond longer is.
#[tokio::test(start_paused = true)]
async fn a_call_of_exactly_the_threshold_is_not_slow() {
    for (takes, slow) in [
        (Duration::from_secs(1), 0),
        (Duration::from_millis(1001), 1),
    ] {
        let layer = builder()
            .count_window(10)
            .slow_calls(Duration::from_secs(1), 50)
            .build()
            .unwrap();
        let h = layer.handle();
        let mut svc = layer.layer(service_fn(move |_req: Request<()>| async move {
            tokio::time::sleep(takes).await;
            Ok::<_, Infallible>(Response::new(()))
        }));
        call(&mut svc).await.unwrap();
        assert_eq!(h.metrics().slow, slow, "a call of {takes:?}");
    }
}

/// Reset "from any state" includes Closed: the consecutive count and the window are cleared,
/// and subscribers see it.
#[tokio::test(start_paused = true)]
async fn resetting_a_closed_breaker_clears_its_counts_and_says_so() {
    let (up, h, mut svc) = setup(builder().count_window(10).min_calls(5).failure_rate(50));
    let mut sub = h.subscribe();
    up.set(503);
    for _ in 0..4 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.state(), State::Closed);
    assert_eq!(h.metrics().window.unwrap().calls, 4);
    h.close();
    let t = sub.try_recv().expect("the reset is announced");
    assert_eq!((t.from, t.to), (State::Closed, State::Closed));
    assert_eq!(
        h.metrics().window.unwrap().calls,
        0,
        "the window is cleared"
    );
    assert_eq!(h.metrics().consecutive_failures, 0);
    // Four failures before the reset no longer count: one more does not trip.
    call(&mut svc).await.unwrap();
    assert_eq!(
        h.state(),
        State::Closed,
        "the consecutive count was cleared"
    );
    for _ in 0..4 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.state(), State::Open, "five fresh failures trip");
}

// ---- readiness ----

#[tokio::test(start_paused = true)]
async fn open_breaker_decides_before_polling_inner_and_never_errors_poll_ready() {
    let layer = builder().consecutive_failures(Some(1)).build().unwrap();
    let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let mut svc = layer.layer(mock);
    handle.allow(1);
    let fut = svc.ready().await.unwrap().call(Request::new(()));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(Response::builder().status(500).body(()).unwrap());
    fut.await.unwrap();
    // The inner service has no capacity left; if the breaker polled it, it would be Pending.
    handle.allow(0);
    let ready = tokio::time::timeout(Duration::from_secs(1), svc.ready()).await;
    assert!(ready.is_ok(), "ready at once: the call will fail fast");
    assert!(
        ready.unwrap().is_ok(),
        "poll_ready never errors for policy reasons"
    );
    assert!(is_open(
        &svc.call(Request::new(()))
            .await
            .map(|r| r.status().as_u16())
    ));
}

#[tokio::test(start_paused = true)]
async fn backpressure_keeps_poll_ready_pending_until_a_probe_is_allowed() {
    let (up, h, _) = setup(builder());
    drop(up);
    let layer = builder()
        .backpressure(true)
        .consecutive_failures(Some(1))
        .build()
        .unwrap();
    let h2 = layer.handle();
    let up = Upstream::new();
    let mut svc = layer.layer(up.svc());
    up.set(503);
    call(&mut svc).await.unwrap();
    assert_eq!(h2.state(), State::Open);
    let start = tokio::time::Instant::now();
    svc.ready().await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(30),
        "woken by the timer when a probe is allowed"
    );
    up.set(200);
    assert_eq!(svc.call(Request::new(())).await.unwrap().status(), 200);
    assert_eq!(h2.state(), State::Closed);
    let _ = h;
}

// ---- sharing ----

#[tokio::test(start_paused = true)]
async fn state_is_shared_by_every_service_from_one_layer() {
    let up = Upstream::new();
    let layer = builder().build().unwrap();
    let h = layer.handle();
    up.set(503);
    for _ in 0..5 {
        // A fresh service each time, as hyper and axum make them.
        let mut svc = layer.layer(up.svc());
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.state(), State::Open);
    let mut other = layer.clone().layer(up.svc());
    assert!(is_open(&call(&mut other).await));
    // A separately built layer is a separate breaker (one per route).
    let mut separate = builder().build().unwrap().layer(up.svc());
    assert_eq!(call(&mut separate).await.unwrap(), 503);
}

#[tokio::test(start_paused = true)]
async fn per_authority_breakers_are_isolated_and_bounded() {
    let layer = builder()
        .consecutive_failures(Some(1))
        .max_keys(1000)
        .build_per_authority()
        .unwrap();
    let svc_fn = service_fn(|req: Request<()>| async move {
        let status = if req.uri().host() == Some("down") {
            503
        } else {
            200
        };
        Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap())
    });
    let mut svc = layer.layer(svc_fn);
    let get = |host: &str| Request::get(format!("http://{host}/")).body(()).unwrap();
    svc.ready().await.unwrap().call(get("down")).await.unwrap();
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(get("down"))
        .await
        .unwrap_err();
    assert!(e.downcast_ref::<BreakerOpen>().is_some());
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(get("up"))
            .await
            .unwrap()
            .status(),
        200,
        "other hosts unaffected"
    );
    let down: http::uri::Authority = "down".parse().unwrap();
    assert_eq!(layer.handle(&Some(down)).unwrap().state(), State::Open);

    for i in 0..100_000 {
        svc.ready()
            .await
            .unwrap()
            .call(get(&format!("h{i}")))
            .await
            .unwrap();
    }
    assert!(layer.len() <= 1000 + 16, "memory bounded: {}", layer.len());
}

/// A gRPC response streamed as one data frame, then trailers with `grpc-status: status`.
fn grpc_streamed(
    status: &'static str,
) -> Response<impl http_body::Body<Data = bytes::Bytes, Error = Infallible> + use<>> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", status.parse().unwrap());
    let frames = vec![
        Ok(http_body::Frame::data(bytes::Bytes::from_static(b"msg"))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    Response::builder()
        .header("content-type", "application/grpc")
        .body(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn grpc_status_in_trailers_is_judged_at_end_of_stream() {
    use http_body_util::BodyExt;
    let layer = builder().consecutive_failures(Some(1)).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(grpc_streamed("14"))
    }));
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(h.state(), State::Closed, "verdict not known from the head");
    let _ = res.into_body().collect().await.unwrap();
    assert_eq!(h.state(), State::Open, "UNAVAILABLE in the trailers");
}

/// A gRPC probe's verdict comes with its trailers; a probe whose body is dropped before them
/// reports nothing and hands its permit to the next caller.
#[tokio::test(start_paused = true)]
async fn a_grpc_probe_body_dropped_before_its_trailers_gives_the_permit_back() {
    use http_body_util::BodyExt;
    let layer = builder().consecutive_failures(Some(1)).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(service_fn(|req: Request<()>| async move {
        let status = if req.uri().path() == "/fail" {
            "14"
        } else {
            "0"
        };
        Ok::<_, Infallible>(grpc_streamed(status))
    }));
    let fail = svc
        .ready()
        .await
        .unwrap()
        .call(Request::get("/fail").body(()).unwrap())
        .await
        .unwrap();
    let _ = fail.into_body().collect().await.unwrap();
    assert_eq!(h.state(), State::Open);
    advance(Duration::from_secs(30)).await;

    let probe = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(h.state(), State::HalfOpen);
    let mut body = probe.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data(), "a data frame carries no verdict");
    let refused = svc.ready().await.unwrap().call(Request::new(())).await;
    assert!(
        matches!(&refused, Err(e) if e.downcast_ref::<BreakerOpen>().is_some()),
        "the probe's permit is still out"
    );
    drop(body);
    assert_eq!(h.state(), State::HalfOpen, "no verdict from a dropped body");

    let next = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .expect("the permit came back");
    let _ = next.into_body().collect().await.unwrap();
    assert_eq!(h.state(), State::Closed, "grpc-status 0 in the trailers");
}

// ---- concurrency ----

/// Many tasks racing for probes (interleaved at every await; the atomic protocol itself is
/// stress-tested across OS threads in `state.rs`'s unit tests).
#[tokio::test(start_paused = true)]
async fn many_tasks_never_exceed_n_probes_and_lose_no_permit() {
    let layer = CircuitBreakerLayer::builder()
        .half_open_probes(3)
        .consecutive_failures(Some(1))
        .open_time(Duration::from_secs(1))
        .max_open_time(Duration::from_secs(1))
        .jitter_percent(0)
        .build()
        .unwrap();
    let h = layer.handle();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (inf, g) = (in_flight.clone(), gate.clone());
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let (inf, g) = (inf.clone(), g.clone());
        async move {
            if req.uri().path() == "/fail" {
                return Ok::<_, Infallible>(Response::builder().status(503).body(()).unwrap());
            }
            inf.fetch_add(1, Ordering::SeqCst);
            g.acquire().await.unwrap().forget();
            Ok(Response::new(()))
        }
    }));
    for round in 0..3 {
        // Trip (open time zero: the next admission half-opens at once).
        let mut s = svc.clone();
        let _ = s
            .ready()
            .await
            .unwrap()
            .call(Request::get("/fail").body(()).unwrap())
            .await;
        assert_eq!(h.state(), State::Open, "round {round}");
        advance(Duration::from_secs(1)).await;
        in_flight.store(0, Ordering::SeqCst);
        let rejected = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let mut s = svc.clone();
            let rejected = rejected.clone();
            tasks.spawn(async move {
                if is_open(&call(&mut s).await) {
                    rejected.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        // Every task either got a probe (and now waits at the gate) or was refused.
        while rejected.load(Ordering::SeqCst) + in_flight.load(Ordering::SeqCst) < 64 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            in_flight.load(Ordering::SeqCst),
            3,
            "exactly N probes, round {round}"
        );
        assert_eq!(rejected.load(Ordering::SeqCst), 61);
        gate.add_permits(3);
        tasks.join_all().await;
        assert_eq!(
            h.state(),
            State::Closed,
            "3 successes close; no permit was lost"
        );
    }
}

#[test]
fn services_and_futures_are_send_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<
        steadfast_breaker::CircuitBreaker<
            tower::util::BoxCloneSyncService<Request<()>, Response<()>, BoxError>,
            DefaultClassifier,
        >,
    >();
    send_sync::<CircuitBreakerLayer>();
    send::<
        steadfast_breaker::ResponseFuture<
            std::future::Ready<Result<Response<()>, BoxError>>,
            DefaultClassifier,
        >,
    >();
}

#[tokio::test(start_paused = true)]
async fn answering_breaker_keeps_axum_infallible_and_answers_503_or_unavailable() {
    use axum::{Router, routing::get};
    fn infallible<S: Service<Request<axum::body::Body>, Error = Infallible>>(_: &S) {}
    let breaker = builder().consecutive_failures(Some(2)).build().unwrap();
    let app = Router::new()
        .route(
            "/",
            get(|| async { (http::StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        )
        .layer(breaker.answering());
    infallible(&app);
    let get = |grpc: bool| {
        let mut b = Request::get("/");
        if grpc {
            b = b.header("content-type", "application/grpc");
        }
        b.body(axum::body::Body::empty()).unwrap()
    };
    for _ in 0..2 {
        assert_eq!(app.clone().oneshot(get(false)).await.unwrap().status(), 500);
    }
    let res = app.clone().oneshot(get(false)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "30");
    let res = app.clone().oneshot(get(true)).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "14");
    assert_eq!(res.headers()["grpc-retry-pushback-ms"], "30000");
    assert_eq!(breaker.handle().metrics().rejected, 2);
}

#[tokio::test(start_paused = true)]
async fn answering_breaker_polls_inner_readiness() {
    #[derive(Clone)]
    struct NeverReady;
    impl Service<Request<()>> for NeverReady {
        type Response = Response<()>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<()>, Infallible>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Pending
        }
        fn call(&mut self, _: Request<()>) -> Self::Future {
            std::future::ready(Ok(Response::new(())))
        }
    }
    let layer = builder().build().unwrap();
    let mut svc = layer.answering().layer(NeverReady);
    let waited = tokio::time::timeout(Duration::from_secs(1), svc.ready()).await;
    assert!(waited.is_err(), "not ready while the inner service is not");
}

#[test]
fn retry_after_rounds_up_to_whole_seconds_and_messages_say_why() {
    let e = BreakerOpen::new(Some(Duration::from_millis(2500)));
    assert_eq!(e.to_http_response::<()>().headers()["retry-after"], "3");
    let e = BreakerOpen::new(Some(Duration::from_secs(3)));
    assert_eq!(e.to_http_response::<()>().headers()["retry-after"], "3");
    assert_eq!(e.to_string(), "circuit open; next probe in 3s");
    assert_eq!(BreakerOpen::new(None).to_string(), "circuit forced open");
    assert!(
        BreakerOpen::new(None)
            .to_http_response::<()>()
            .headers()
            .get("retry-after")
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn metrics_count_calls_failures_and_rejections() {
    let (up, h, mut svc) = setup(builder().consecutive_failures(Some(3)));
    for _ in 0..4 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.metrics().consecutive_failures, 0);
    up.set(500);
    for n in 1..=2 {
        call(&mut svc).await.unwrap();
        assert_eq!(h.metrics().consecutive_failures, n);
    }
    up.set(200);
    call(&mut svc).await.unwrap();
    assert_eq!(
        h.metrics().consecutive_failures,
        0,
        "a success ends the run"
    );
    up.set(500);
    for _ in 0..3 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(
        h.metrics().consecutive_failures,
        0,
        "the run belongs to the generation that tripped"
    );
    for _ in 0..2 {
        assert!(is_open(&call(&mut svc).await));
    }
    let m = h.metrics();
    assert_eq!((m.calls, m.failures, m.rejected), (10, 5, 2));
    assert_eq!(m.state, State::Open);
    // Calls from other threads land on other stripes and are summed.
    let mut handles = Vec::new();
    for _ in 0..3 {
        let h = h.clone();
        handles.push(std::thread::spawn(move || h.metrics().calls));
    }
    for t in handles {
        assert_eq!(t.join().unwrap(), 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_sum_every_thread_stripe() {
    let layer = CircuitBreakerLayer::builder().build().unwrap();
    let h = layer.handle();
    let svc = layer.layer(Upstream::new().svc());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let mut svc = svc.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    for _ in 0..25 {
                        call(&mut svc).await.unwrap();
                    }
                });
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(h.metrics().calls, 100);
}

#[test]
fn configuration_errors_say_what_to_change() {
    use steadfast_breaker::InvalidConfig;
    let e = CircuitBreakerLayer::builder()
        .half_open_probes(0)
        .build()
        .unwrap_err();
    assert_eq!(e, InvalidConfig::Zero("half_open_probes"));
    assert_eq!(e.to_string(), "breaker half_open_probes must be at least 1");
    let e = CircuitBreakerLayer::builder()
        .count_window(10)
        .failure_rate(0)
        .build()
        .unwrap_err();
    assert_eq!(e.to_string(), "breaker failure_rate must be 1-100 %, got 0");
    let e = CircuitBreakerLayer::builder()
        .open_time(Duration::from_secs(60))
        .max_open_time(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert_eq!(e.to_string(), "breaker max_open_time must be >= open_time");
}

#[tokio::test(start_paused = true)]
async fn window_rates_and_async_subscriptions_are_observable() {
    let (up, h, mut svc) = setup(
        builder()
            .consecutive_failures(None)
            .count_window(10)
            .failure_rate(60),
    );
    let mut sub = h.subscribe();
    for i in 0..10 {
        up.set(if i < 3 { 500 } else { 200 });
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.metrics().window_failure_rate(), Some(30.0));
    up.set(500);
    for _ in 0..10 {
        let _ = call(&mut svc).await;
    }
    let t = sub.recv().await.expect("a transition");
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
}

#[tokio::test(start_paused = true)]
async fn a_probe_refused_by_an_inner_policy_gives_its_permit_back_without_a_verdict() {
    #[derive(Debug)]
    struct Refused;
    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("refused")
        }
    }
    impl std::error::Error for Refused {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&steadfast_core::PolicyRejected::INSTANCE)
        }
    }
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = refuse.clone();
    let layer = builder().consecutive_failures(Some(1)).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(service_fn(move |_req: Request<()>| {
        let r = r.clone();
        async move {
            if r.load(Ordering::SeqCst) {
                return Err(BoxError::from(Refused));
            }
            Ok(Response::builder().status(500).body(()).unwrap())
        }
    }));
    call(&mut svc).await.unwrap();
    assert_eq!(h.state(), State::Open);
    advance(Duration::from_secs(30)).await;
    refuse.store(true, Ordering::SeqCst);
    assert!(call(&mut svc).await.is_err());
    assert_eq!(
        h.state(),
        State::HalfOpen,
        "no verdict: neither closed nor re-opened"
    );
    // The permit came back: the next call is admitted as a probe again.
    let e = call(&mut svc).await.unwrap_err();
    assert!(
        e.downcast_ref::<BreakerOpen>().is_none(),
        "admitted, refused by the inner policy"
    );
}

#[tokio::test(start_paused = true)]
async fn idle_per_key_breakers_are_evicted_and_recently_used_ones_kept() {
    let layer = builder()
        .max_keys(1600)
        .idle_eviction(Duration::from_secs(600))
        .build_per_authority()
        .unwrap();
    let mut svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(()))
    }));
    let get = |host: &str| Request::get(format!("http://{host}/")).body(()).unwrap();
    for i in 0..1600 {
        svc.ready()
            .await
            .unwrap()
            .call(get(&format!("old{i}")))
            .await
            .unwrap();
    }
    svc.ready().await.unwrap().call(get("hot")).await.unwrap();
    advance(Duration::from_secs(650)).await;
    svc.ready().await.unwrap().call(get("hot")).await.unwrap(); // used again: not idle
    advance(Duration::from_secs(50)).await;
    for i in 0..400 {
        svc.ready()
            .await
            .unwrap()
            .call(get(&format!("new{i}")))
            .await
            .unwrap();
    }
    let hot: http::uri::Authority = "hot".parse().unwrap();
    assert!(
        layer.handle(&Some(hot)).is_some(),
        "recently used breakers stay"
    );
    assert!(layer.len() <= 1600, "room was made, never past max_keys");
    for i in 0..400 {
        let new: http::uri::Authority = format!("new{i}").parse().unwrap();
        assert!(layer.handle(&Some(new)).is_some(), "new{i} was kept");
    }
}

/// A flood of new authorities cannot reset an open breaker by pushing it out of the map:
/// breakers that are not Closed are kept while in use (within the idle time), and every
/// insertion stays O(1) (a bounded number of entries looked at).
#[tokio::test(start_paused = true)]
async fn a_flood_of_new_keys_does_not_evict_an_open_breaker() {
    let layer = builder()
        .consecutive_failures(Some(1))
        .max_keys(32)
        .build_per_authority()
        .unwrap();
    let mut svc = layer.layer(service_fn(|req: Request<()>| async move {
        let status = if req.uri().host() == Some("down") {
            503
        } else {
            200
        };
        Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap())
    }));
    let get = |host: &str| Request::get(format!("http://{host}/")).body(()).unwrap();
    svc.ready().await.unwrap().call(get("down")).await.unwrap();
    let down: http::uri::Authority = "down".parse().unwrap();
    assert_eq!(
        layer.handle(&Some(down.clone())).unwrap().state(),
        State::Open
    );
    for i in 0..10_000 {
        svc.ready()
            .await
            .unwrap()
            .call(get(&format!("flood{i}")))
            .await
            .unwrap();
    }
    assert!(layer.len() <= 32, "bounded: {}", layer.len());
    assert_eq!(
        layer.handle(&Some(down.clone())).unwrap().state(),
        State::Open,
        "still open after 10 000 new keys"
    );
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(get("down"))
        .await
        .unwrap_err();
    assert!(
        e.downcast_ref::<BreakerOpen>().is_some(),
        "callers still fail fast"
    );

    // Protection lasts while the breaker is in use: one idle past the idle time (10 min by
    // default) makes room like any other.
    advance(Duration::from_secs(601)).await;
    // Enough new keys that every shard (keys are spread by a per-process random hash) gets
    // many: the one holding "down" makes room at least twice.
    for i in 0..2_000 {
        svc.ready()
            .await
            .unwrap()
            .call(get(&format!("later{i}")))
            .await
            .unwrap();
    }
    assert!(
        layer.handle(&Some(down)).is_none(),
        "an idle open breaker is evictable"
    );

    // A breaker an operator forced open stays, however long it is left unused.
    svc.ready().await.unwrap().call(get("kept")).await.unwrap();
    let kept: http::uri::Authority = "kept".parse().unwrap();
    layer.handle(&Some(kept.clone())).unwrap().force_open();
    advance(Duration::from_secs(3600)).await;
    for i in 0..2_000 {
        svc.ready()
            .await
            .unwrap()
            .call(get(&format!("much-later{i}")))
            .await
            .unwrap();
    }
    assert_eq!(
        layer.handle(&Some(kept)).unwrap().state(),
        State::ForcedOpen,
        "a forced state is never evicted"
    );
}

#[tokio::test(start_paused = true)]
async fn a_forced_open_breaker_is_ready_without_polling_its_inner_service() {
    let layer = builder().build().unwrap();
    let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let mut svc = layer.layer(mock);
    handle.allow(0);
    layer.handle().force_open();
    let ready = tokio::time::timeout(Duration::from_secs(1), svc.ready()).await;
    assert!(
        ready.is_ok_and(|r| r.is_ok()),
        "decided before the inner service"
    );
    let e = svc.call(Request::new(())).await.unwrap_err();
    assert_eq!(e.downcast_ref::<BreakerOpen>().unwrap().retry_after(), None);
}

#[test]
fn every_invalid_setting_is_refused() {
    use steadfast_breaker::InvalidConfig;
    let b = CircuitBreakerLayer::builder;
    assert_eq!(
        b().consecutive_failures(Some(0)).build().unwrap_err(),
        InvalidConfig::Zero("consecutive_failures")
    );
    let e = b().half_open_probes(70_000).build().unwrap_err();
    assert_eq!(
        e.to_string(),
        "breaker half_open_probes must be 1-65535, got 70000",
        "probes must fit the probe word, and the message says so"
    );
    assert!(b().half_open_probes(65_535).build().is_ok());
    assert_eq!(
        b().count_window(0).build().unwrap_err(),
        InvalidConfig::Zero("count_window")
    );
    for (width, buckets) in [
        (Duration::from_secs(1), 0),
        (Duration::from_secs(1), 65),
        (Duration::ZERO, 10),
    ] {
        assert!(
            b().time_window(width, buckets).build().is_err(),
            "{width:?} × {buckets}"
        );
    }
    assert_eq!(
        b().time_window(Duration::from_secs(1), 65)
            .build()
            .unwrap_err()
            .to_string(),
        "breaker time_window buckets must be 1-64, got 65"
    );
    assert!(b().time_window(Duration::from_secs(1), 64).build().is_ok());
    assert_eq!(
        b().count_window(2_000_000).build().unwrap_err().to_string(),
        "breaker count_window must be 1-1048576 calls, got 2000000"
    );
    assert!(b().count_window(1 << 20).build().is_ok());
    assert_eq!(
        b().min_calls(0).build().unwrap_err(),
        InvalidConfig::Zero("min_calls")
    );
    assert_eq!(
        b().open_time(Duration::ZERO)
            .build()
            .unwrap_err()
            .to_string(),
        "breaker open_time must be at least 1ms, got 0ns"
    );
    assert!(b().open_time(Duration::from_millis(1)).build().is_ok());
    assert!(matches!(
        b().count_window(10)
            .slow_calls(Duration::ZERO, 50)
            .build()
            .unwrap_err(),
        InvalidConfig::TooShort {
            what: "slow_calls threshold",
            ..
        }
    ));
    // A rate rule without a window, or no rule at all, could never trip.
    for never in [
        b().failure_rate(50),
        b().slow_calls(Duration::from_secs(1), 50),
        b().consecutive_failures(None),
    ] {
        let e = never.build().unwrap_err();
        assert!(matches!(e, InvalidConfig::NeverTrips(_)), "{e}");
        assert!(e.to_string().starts_with("breaker could never trip: "));
    }
    assert_eq!(
        b().count_window(10).failure_rate(101).build().unwrap_err(),
        InvalidConfig::Rate("failure_rate", 101)
    );
    assert!(b().count_window(10).failure_rate(100).build().is_ok());
    assert_eq!(
        b().count_window(10)
            .slow_calls(Duration::from_secs(1), 0)
            .build()
            .unwrap_err(),
        InvalidConfig::Rate("slow_calls rate", 0)
    );
    assert_eq!(
        b().max_keys(0).build_per_authority().unwrap_err(),
        InvalidConfig::Zero("max_keys")
    );
    assert!(
        b().open_time(Duration::from_secs(5))
            .max_open_time(Duration::from_secs(5))
            .build()
            .is_ok()
    );
}

#[test]
fn state_names_are_stable() {
    let names: Vec<_> = [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::Disabled,
        State::ForcedOpen,
        State::MetricsOnly,
    ]
    .iter()
    .map(|s| s.as_str())
    .collect();
    assert_eq!(
        names,
        [
            "closed",
            "open",
            "half_open",
            "disabled",
            "forced_open",
            "metrics_only"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn keyed_layers_report_their_size_and_poll_the_inner_service() {
    let layer = builder().build_per_authority().unwrap();
    assert!(layer.is_empty());
    let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let mut svc = layer.layer(mock);
    handle.allow(0);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), svc.ready())
            .await
            .is_err(),
        "not ready while the inner is not"
    );
    handle.allow(2);
    for host in ["a", "b"] {
        let fut = svc
            .ready()
            .await
            .unwrap()
            .call(Request::get(format!("http://{host}/")).body(()).unwrap());
        let (_r, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        fut.await.unwrap();
    }
    assert_eq!(layer.len(), 2);
    assert!(!layer.is_empty());
}

#[tokio::test(start_paused = true)]
async fn generations_count_transitions_and_jitter_varies_with_the_seed() {
    let (up, h, mut svc) = setup(builder().consecutive_failures(Some(1)));
    assert_eq!(h.metrics().generation, 0);
    up.set(500);
    call(&mut svc).await.unwrap();
    assert_eq!(h.metrics().generation, 1);
    advance(Duration::from_secs(30)).await;
    call(&mut svc).await.unwrap();
    assert_eq!(h.metrics().generation, 3, "open → half-open → open");

    // With jitter on, open times differ between seeds (and never exceed the cap).
    let mut seen = std::collections::HashSet::new();
    for seed in 0..8 {
        let layer = CircuitBreakerLayer::builder()
            .consecutive_failures(Some(1))
            .jitter_percent(50)
            .seed(seed)
            .build()
            .unwrap();
        let mut s = layer.layer(Upstream::new().svc());
        let up = Upstream::new();
        up.set(500);
        let mut s2 = layer.layer(up.svc());
        call(&mut s2).await.unwrap();
        let Err(e) = call(&mut s).await else { panic!() };
        let left = e
            .downcast_ref::<BreakerOpen>()
            .unwrap()
            .retry_after()
            .unwrap();
        assert!(left <= Duration::from_secs(30) && left >= Duration::from_secs(15));
        seen.insert(left);
    }
    assert!(seen.len() > 4, "seeded jitter spreads open times: {seen:?}");
}
