//! Rate windows: count and time windows, minimum calls, slow calls. Paused time, jitter 0.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use steadfast_breaker::BreakerState;
use tokio::time::advance;
use tower::{Layer, service_fn};

use common::*;

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
        assert_eq!(h.state(), BreakerState::Closed, "closed before failure {i}");
        assert_eq!(call(&mut svc).await.unwrap(), 503);
    }
    assert_eq!(h.state(), BreakerState::Open);
}

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
    while h.state() == BreakerState::Closed {
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
    assert_eq!(h.state(), BreakerState::Closed);
    call(&mut svc).await.unwrap();
    assert_eq!(h.state(), BreakerState::Open);
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
        BreakerState::Closed,
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
    assert_eq!(h.state(), BreakerState::Open);
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
    assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
}
