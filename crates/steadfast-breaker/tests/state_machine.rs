//! The transition table and the pinned semantics: trips, half-open probes, generations,
//! open times, resets. Paused time, jitter 0.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Request, Response};
use steadfast_breaker::error::BreakerOpen;
use steadfast_breaker::{BreakerHandle, BreakerState, CircuitBreakerLayer};
use steadfast_core::{BoxError, DefaultClassifier};
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt, service_fn};

use common::*;

#[tokio::test(start_paused = true)]
async fn closed_to_open_after_five_consecutive_failures_seed_default() {
    let (up, h, mut svc) = setup(builder());
    up.set(503);
    for i in 0..5 {
        assert_eq!(
            h.state(),
            BreakerState::Closed,
            "still closed before failure {i}"
        );
        assert_eq!(call(&mut svc).await.unwrap(), 503);
    }
    assert_eq!(h.state(), BreakerState::Open);
    let hits = up.hits();
    let r = call(&mut svc).await;
    assert!(is_open(&r));
    assert_eq!(up.hits(), hits, "no traffic while open");
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
    assert_eq!(h.state(), BreakerState::Closed);
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
    assert_eq!(h.state(), BreakerState::Closed);
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
        assert_eq!(h.state(), BreakerState::Open);
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
    assert_eq!(h.state(), BreakerState::Closed);
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
    assert_eq!(h.state(), BreakerState::Closed);
    // Open never closes without a probe, whatever late successes arrive.
    up.set(503);
    for _ in 0..5 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.state(), BreakerState::Open);
    advance(Duration::from_secs(29)).await;
    assert_eq!(h.state(), BreakerState::Open);
    // Disabled / MetricsOnly never trip; ForcedOpen never half-opens.
    for (set, expect) in [
        (
            BreakerHandle::disable as fn(&BreakerHandle<DefaultClassifier>),
            BreakerState::Disabled,
        ),
        (BreakerHandle::metrics_only, BreakerState::MetricsOnly),
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
    assert_eq!(h.state(), BreakerState::ForcedOpen);
    assert_eq!(up.hits(), hits);
    h.close();
    up.set(200);
    assert_eq!(call(&mut svc).await.unwrap(), 200);
    assert_eq!(h.state(), BreakerState::Closed);
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
    use BreakerState::*;
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
    assert_eq!(h.state(), BreakerState::Open);
    advance(Duration::from_secs(30)).await;
    fail_slow.store(false, Ordering::SeqCst);
    call(&mut svc).await.unwrap();
    assert_eq!(h.state(), BreakerState::Closed);
    // Now the old call fails: it was admitted two generations ago and must not trip.
    fail_slow.store(true, Ordering::SeqCst);
    gate.notify_one();
    assert_eq!(slow.await.unwrap().unwrap().status(), 500);
    assert_eq!(h.state(), BreakerState::Closed);
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
    assert_eq!(h.state(), BreakerState::HalfOpen, "one success of two");
    gate.add_permits(1);
    while h.state() != BreakerState::Closed {
        tokio::task::yield_now().await;
    }
    assert_eq!(h.state(), BreakerState::Closed);
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
    assert_eq!(h.state(), BreakerState::HalfOpen);
    advance(Duration::from_secs(29)).await;
    assert!(is_open(&call(&mut svc).await));
    assert_eq!(h.state(), BreakerState::HalfOpen);
    advance(Duration::from_secs(1)).await;
    assert!(is_open(&call(&mut svc).await));
    assert_eq!(
        h.state(),
        BreakerState::Open,
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
    assert_eq!(h.state(), BreakerState::Open);
    advance(Duration::from_secs(30)).await;
    refuse.store(true, Ordering::SeqCst);
    assert!(call(&mut svc).await.is_err());
    assert_eq!(
        h.state(),
        BreakerState::HalfOpen,
        "no verdict: neither closed nor re-opened"
    );
    // The permit came back: the next call is admitted as a probe again.
    let e = call(&mut svc).await.unwrap_err();
    assert!(
        e.downcast_ref::<BreakerOpen>().is_none(),
        "admitted, refused by the inner policy"
    );
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
    assert_eq!(h.state(), BreakerState::Closed);
    assert_eq!(h.metrics().window.unwrap().calls, 4);
    h.close();
    let t = sub.try_recv().expect("the reset is announced");
    assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Closed));
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
        BreakerState::Closed,
        "the consecutive count was cleared"
    );
    for _ in 0..4 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(h.state(), BreakerState::Open, "five fresh failures trip");
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
