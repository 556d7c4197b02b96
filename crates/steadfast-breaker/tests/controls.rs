//! The controls resilience4j and Polly users reach for: why a breaker moved, manual control
//! with recovery, the open-time growth, the half-open wait, the timer. Paused time.

mod common;

use std::future::Future;
use std::time::Duration;

use steadfast_breaker::error::BreakerOpen;
use steadfast_breaker::{BreakerState, FailureSummary, OpenTime, TransitionReason};
use tokio::time::advance;

use common::*;

fn open_error(r: &Result<u16, steadfast_core::BoxError>) -> BreakerOpen {
    *r.as_ref()
        .unwrap_err()
        .downcast_ref::<BreakerOpen>()
        .expect("a rejection")
}

/// Every transition says why, and a rejection says what opened the breaker and the last
/// failure it counted.
#[tokio::test(start_paused = true)]
async fn every_transition_and_rejection_says_why() {
    let (up, handle, mut svc) = setup(
        builder()
            .consecutive_failures(Some(2))
            .open_time(Duration::from_secs(10)),
    );
    let mut events = handle.subscribe();
    up.set(503);
    call(&mut svc).await.unwrap();
    call(&mut svc).await.unwrap();
    let t = events.try_recv().unwrap();
    assert_eq!(
        (t.to, t.reason),
        (BreakerState::Open, TransitionReason::ConsecutiveFailures)
    );
    assert_eq!(
        handle.trip_reason(),
        Some(TransitionReason::ConsecutiveFailures)
    );
    assert_eq!(handle.last_failure(), Some(FailureSummary::Status(503)));
    let refused = open_error(&call(&mut svc).await);
    assert_eq!(
        refused.reason(),
        Some(TransitionReason::ConsecutiveFailures)
    );
    assert_eq!(refused.last_failure(), Some(FailureSummary::Status(503)));
    assert!(
        refused
            .to_string()
            .contains("opened by consecutive_failures; last failure: HTTP 503"),
        "{refused}"
    );

    // The probe fails: re-opened, and why.
    advance(Duration::from_secs(10)).await;
    call(&mut svc).await.unwrap();
    let reasons: Vec<_> = std::iter::from_fn(|| events.try_recv())
        .map(|t| (t.to, t.reason))
        .collect();
    assert_eq!(
        reasons,
        [
            (BreakerState::HalfOpen, TransitionReason::OpenTimeElapsed),
            (BreakerState::Open, TransitionReason::ProbeFailed)
        ]
    );
    // The probe succeeds.
    advance(Duration::from_secs(20)).await;
    up.set(200);
    call(&mut svc).await.unwrap();
    let last = std::iter::from_fn(|| events.try_recv()).last().unwrap();
    assert_eq!(
        (last.to, last.reason),
        (BreakerState::Closed, TransitionReason::ProbesSucceeded)
    );

    // A rate window says which rate.
    let (up, handle, mut svc) = setup(
        builder()
            .consecutive_failures(None)
            .count_window(10)
            .min_calls(4)
            .failure_rate(50),
    );
    up.set(500);
    for _ in 0..4 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(handle.trip_reason(), Some(TransitionReason::FailureRate));
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_rate_trip_says_so() {
    use std::convert::Infallible;
    use tower::Layer;
    let layer = builder()
        .consecutive_failures(None)
        .count_window(10)
        .min_calls(3)
        .slow_calls(Duration::from_millis(100), 50)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(tower::service_fn(|_req: http::Request<()>| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, Infallible>(http::Response::new(()))
    }));
    for _ in 0..3 {
        call(&mut svc).await.unwrap();
    }
    assert_eq!(handle.state(), BreakerState::Open);
    assert_eq!(handle.trip_reason(), Some(TransitionReason::SlowCallRate));
}

/// Open for a while (then recover by itself), until an instant, half-open now, reset.
#[tokio::test(start_paused = true)]
async fn manual_control_opens_for_a_while_half_opens_and_resets() {
    let (up, handle, mut svc) = setup(builder());
    let mut events = handle.subscribe();
    handle.open_for(Duration::from_secs(5));
    let t = events.try_recv().unwrap();
    assert_eq!(
        (t.to, t.reason, t.open_for),
        (
            BreakerState::Open,
            TransitionReason::Manual,
            Some(Duration::from_secs(5))
        )
    );
    let refused = open_error(&call(&mut svc).await);
    assert_eq!(refused.retry_after(), Some(Duration::from_secs(5)));
    assert_eq!(refused.reason(), Some(TransitionReason::Manual));
    assert_eq!(up.hits(), 0);
    advance(Duration::from_secs(5)).await;
    assert_eq!(call(&mut svc).await.unwrap(), 200, "recovered by itself");
    assert_eq!(handle.state(), BreakerState::Closed);

    handle.open_until(tokio::time::Instant::now() + Duration::from_secs(2));
    assert_eq!(handle.state(), BreakerState::Open);
    advance(Duration::from_secs(2)).await;
    assert_eq!(handle.state(), BreakerState::HalfOpen);

    handle.reset();
    assert_eq!(handle.state(), BreakerState::Closed);
    handle.half_open_now();
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    up.set(503);
    call(&mut svc).await.unwrap();
    assert_eq!(handle.state(), BreakerState::Open, "its probe failed");
    handle.open_until(tokio::time::Instant::now());
    assert_eq!(
        handle.state(),
        BreakerState::HalfOpen,
        "an instant past half-opens"
    );
    handle.reset();
    assert_eq!(handle.state(), BreakerState::Closed);
}

/// A breaker can start open (until a health check closes it, or for a while), disabled or
/// in metrics-only mode.
#[tokio::test(start_paused = true)]
async fn a_breaker_starts_in_the_state_it_is_given() {
    let (up, handle, mut svc) = setup(builder().initial_state(BreakerState::ForcedOpen));
    assert!(is_open(&call(&mut svc).await));
    assert_eq!(up.hits(), 0);
    handle.close(); // the health check passed
    assert_eq!(call(&mut svc).await.unwrap(), 200);

    let (_up, handle, mut svc) = setup(builder().start_open_for(Duration::from_secs(3)));
    assert!(is_open(&call(&mut svc).await));
    advance(Duration::from_secs(3)).await;
    assert_eq!(call(&mut svc).await.unwrap(), 200);
    assert_eq!(handle.state(), BreakerState::Closed);

    let (up, handle, mut svc) = setup(
        builder()
            .consecutive_failures(Some(1))
            .initial_state(BreakerState::Disabled),
    );
    up.set(503);
    call(&mut svc).await.unwrap();
    assert_eq!(handle.state(), BreakerState::Disabled);
}

/// The open time follows the growth function of the trips in a row, capped.
#[tokio::test(start_paused = true)]
async fn the_open_time_follows_its_growth_function() {
    fn steps(trips: u32) -> Duration {
        Duration::from_secs(u64::from(trips) * 7)
    }
    for (growth, want) in [
        (OpenTime::Constant, [10, 10, 10, 10]),
        (OpenTime::Exponential { factor: 3.0 }, [10, 30, 60, 60]),
        (OpenTime::Exponential { factor: 2.0 }, [10, 20, 40, 60]),
        (OpenTime::Custom(steps), [7, 14, 21, 28]),
    ] {
        let (up, handle, mut svc) = setup(
            builder()
                .consecutive_failures(Some(1))
                .open_time(Duration::from_secs(10))
                .max_open_time(Duration::from_secs(60))
                .open_time_growth(growth),
        );
        let mut events = handle.subscribe();
        up.set(503);
        let mut got = Vec::new();
        for _ in 0..4 {
            call(&mut svc).await.unwrap(); // trips (or the probe fails)
            let open = std::iter::from_fn(|| events.try_recv())
                .filter(|t| t.to == BreakerState::Open)
                .last()
                .unwrap();
            let d = open.open_for.unwrap();
            got.push(d.as_secs());
            advance(d).await;
        }
        assert_eq!(got, want, "{growth:?}");
    }
}

/// Probes that give no verdict within the configured wait re-open the breaker.
#[tokio::test(start_paused = true)]
async fn unanswered_probes_reopen_after_the_half_open_wait() {
    use std::convert::Infallible;
    use tower::Layer;
    let layer = builder()
        .open_time(Duration::from_secs(30))
        .max_half_open_wait(Some(Duration::from_secs(2)))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(tower::service_fn(|_req: http::Request<()>| async {
        std::future::pending::<Result<http::Response<()>, Infallible>>().await
    }));
    handle.half_open_now();
    let mut events = handle.subscribe();
    let mut probe_svc = svc.clone();
    let mut stuck = Box::pin(call(&mut probe_svc));
    let polled =
        std::future::poll_fn(|cx| std::task::Poll::Ready(stuck.as_mut().poll(cx).is_pending()))
            .await;
    assert!(polled, "the probe hangs");
    // Within the wait, other calls are refused but the breaker stays half-open.
    advance(Duration::from_millis(1999)).await;
    assert!(is_open(&call(&mut svc).await));
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    advance(Duration::from_millis(1)).await;
    assert!(is_open(&call(&mut svc).await));
    let t = events.try_recv().unwrap();
    assert_eq!(
        (t.to, t.reason),
        (BreakerState::Open, TransitionReason::ProbeTimedOut)
    );
    drop(stuck);
}

/// With `auto_half_open`, an open breaker half-opens on a timer, without a call.
#[tokio::test(start_paused = true)]
async fn auto_half_open_moves_without_traffic() {
    let (up, handle, mut svc) = setup(
        builder()
            .consecutive_failures(Some(1))
            .open_time(Duration::from_secs(4))
            .auto_half_open(true),
    );
    let mut events = handle.subscribe();
    up.set(503);
    call(&mut svc).await.unwrap();
    assert_eq!(events.try_recv().unwrap().to, BreakerState::Open);
    advance(Duration::from_millis(3999)).await;
    assert!(events.try_recv().is_none());
    advance(Duration::from_millis(1)).await;
    tokio::task::yield_now().await;
    let t = events.recv().await.unwrap();
    assert_eq!(
        (t.to, t.reason),
        (BreakerState::HalfOpen, TransitionReason::OpenTimeElapsed)
    );
    assert_eq!(up.hits(), 1, "no call was needed");
}

#[test]
fn a_shrinking_exponential_growth_is_refused() {
    for factor in [0.5, f64::NAN, f64::INFINITY, -2.0] {
        let err = builder()
            .open_time_growth(OpenTime::Exponential { factor })
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }
}

/// The window reports what resilience4j reports: calls, failures, slow successes and slow
/// failures, their durations, and "not enough calls yet" instead of a 0 % rate.
#[tokio::test(start_paused = true)]
async fn the_window_reports_slow_successes_failures_and_durations() {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use steadfast_breaker::WindowRate;
    use tower::Layer;

    let layer = builder()
        .consecutive_failures(None)
        .count_window(10)
        .min_calls(4)
        .failure_rate(90)
        .slow_calls(Duration::from_millis(100), 90)
        .build()
        .unwrap();
    let handle = layer.handle();
    let n = Arc::new(AtomicU32::new(0));
    let mut svc = layer.layer(tower::service_fn(move |_req: http::Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            // slow success, slow failure, fast failure
            let (ms, status) = [(200, 200), (300, 503), (10, 503)][i as usize % 3];
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, Infallible>(http::Response::builder().status(status).body(()).unwrap())
        }
    }));
    assert_eq!(
        handle.metrics().failure_rate(),
        WindowRate::NotEnoughCalls {
            calls: 0,
            needed: 4
        }
    );
    for _ in 0..3 {
        call(&mut svc).await.unwrap();
    }
    let m = handle.metrics();
    assert_eq!(
        m.failure_rate(),
        WindowRate::NotEnoughCalls {
            calls: 3,
            needed: 4
        }
    );
    let w = m.window.unwrap();
    assert_eq!((w.calls, w.failures, w.slow), (3, 2, 2));
    assert_eq!((w.slow_successes(), w.slow_failures), (1, 1));
    assert_eq!(w.total_duration, Duration::from_millis(510));
    assert_eq!(w.average_duration(), Some(Duration::from_millis(170)));
    call(&mut svc).await.unwrap();
    assert_eq!(handle.metrics().failure_rate(), WindowRate::Percent(50.0));
    assert_eq!(handle.metrics().slow_call_rate(), WindowRate::Percent(75.0));
    assert_eq!(
        steadfast_breaker::CircuitBreakerLayer::new()
            .handle()
            .metrics()
            .failure_rate(),
        WindowRate::NoWindow
    );
}

/// A trip says whether the server's hint set its open time.
#[tokio::test(start_paused = true)]
async fn a_trip_says_when_the_servers_hint_set_the_open_time() {
    use std::convert::Infallible;
    use tower::Layer;
    for (retry_after, want_secs, hinted) in [(Some("5"), 5, true), (None, 1, false)] {
        let layer = builder()
            .consecutive_failures(Some(1))
            .open_time(Duration::from_secs(1))
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut events = handle.subscribe();
        let mut svc = layer.layer(tower::service_fn(
            move |_req: http::Request<()>| async move {
                let mut res = http::Response::builder().status(503);
                if let Some(v) = retry_after {
                    res = res.header("retry-after", v);
                }
                Ok::<_, Infallible>(res.body(()).unwrap())
            },
        ));
        call(&mut svc).await.unwrap();
        let t = events.try_recv().unwrap();
        assert_eq!(t.reason, TransitionReason::ConsecutiveFailures);
        assert_eq!(t.open_for, Some(Duration::from_secs(want_secs)));
        assert_eq!(t.open_for_from_hint, hinted, "{retry_after:?}");
    }
}
