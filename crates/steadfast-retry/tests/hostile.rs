//! Regressions from a hostile pass over the retry controls (gRPC throttling, proportional
//! jitter, the backoff bound, reroutes); each test that asserts a fix first failed.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use steadfast_core::{BoxError, NotSent};
use steadfast_retry::{Backoff, Jitter, ReplayBody, RetryLayer, ThrottleConfig};
use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

// ---------------------------------------------------------------------------------------
// A response body with data and trailers (a normal unary gRPC response).
#[derive(Default)]
struct Frames(VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn grpc_ok() -> Response<Frames> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    Response::builder()
        .header("content-type", "application/grpc")
        .body(Frames(VecDeque::from([
            Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
            Frame::trailers(trailers),
        ])))
        .unwrap()
}

fn grpc_unavailable() -> Response<Frames> {
    Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", "14")
        .body(Frames::default())
        .unwrap()
}

fn grpc_req() -> Request<Full<Bytes>> {
    Request::post("http://up/pkg.Svc/Method")
        .header("content-type", "application/grpc")
        .body(Full::default())
        .unwrap()
}

/// gRPC A6 throttling: "every success refills by token_ratio". A normal unary gRPC success
/// (status in the trailers) never refills the bucket, so once failures drained it, retries
/// stay off for good although every call now succeeds.
#[tokio::test(start_paused = true)]
async fn grpc_throttling_is_refilled_by_unary_successes() {
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = fail.clone();
    let upstream = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        let failing = f.load(Ordering::SeqCst);
        async move {
            Ok::<_, BoxError>(if failing {
                grpc_unavailable()
            } else {
                grpc_ok()
            })
        }
    });
    let layer = RetryLayer::builder()
        .budget(None)
        .retry_grpc_statuses(true)
        .max_attempts(2)
        .backoff(Backoff::constant(Duration::from_millis(1)).jitter(Jitter::None))
        .grpc_throttling(Some(ThrottleConfig {
            max_tokens: 10,
            token_ratio: 0.1,
        }))
        .build()
        .unwrap();
    let svc = layer.layer(upstream);
    for _ in 0..3 {
        let _ = svc.clone().oneshot(grpc_req()).await.unwrap();
    }
    assert_eq!(
        layer.throttle_tokens(),
        Some(5.0),
        "5 failed attempts (the 3rd call is not retried: 5 of 10 left)"
    );
    fail.store(false, Ordering::SeqCst);
    for _ in 0..100 {
        let res = svc.clone().oneshot(grpc_req()).await.unwrap();
        let _ = res.into_body().collect().await.unwrap(); // read to the trailers
    }
    assert_eq!(
        layer.throttle_tokens(),
        Some(10.0),
        "100 successes x 0.1 should have refilled the bucket"
    );
}

// For contrast: HTTP successes do refill.
#[tokio::test(start_paused = true)]
async fn http_successes_refill_the_throttle() {
    let upstream = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| async move {
        Ok::<_, BoxError>(Response::new(()))
    });
    let layer = RetryLayer::builder()
        .budget(None)
        .grpc_throttling(Some(ThrottleConfig {
            max_tokens: 10,
            token_ratio: 0.1,
        }))
        .build()
        .unwrap();
    let svc = layer.layer(upstream);
    // Drain through a failing GET first.
    let failing = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| async move {
        Ok::<_, BoxError>(Response::builder().status(503).body(()).unwrap())
    });
    let bad = layer.layer(failing);
    let _ = bad
        .oneshot(Request::get("http://up/").body(Full::default()).unwrap())
        .await;
    let drained = layer.throttle_tokens().unwrap();
    assert!(drained < 10.0);
    for _ in 0..100 {
        let _ = svc
            .clone()
            .oneshot(Request::get("http://up/").body(Full::default()).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(layer.throttle_tokens(), Some(10.0));
}

// ---------------------------------------------------------------------------------------
// A rerouted attempt (nothing sent, "free of the budget") still costs an A6 throttle token.
#[derive(Debug)]
struct Elsewhere;
impl std::fmt::Display for Elsewhere {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("rerouted")
    }
}
impl std::error::Error for Elsewhere {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&NotSent::INSTANCE)
    }
}

#[tokio::test(start_paused = true)]
async fn a_rerouted_attempt_costs_no_throttle_token() {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let upstream = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        let i = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if i % 2 == 0 {
                Err(BoxError::from(Elsewhere))
            } else {
                Ok(Response::new(()))
            }
        }
    });
    let layer = RetryLayer::builder()
        .grpc_throttling(Some(ThrottleConfig {
            max_tokens: 10,
            token_ratio: 0.1,
        }))
        .build()
        .unwrap();
    let budget_before = layer.budget_balance().unwrap();
    let svc = layer.layer(upstream);
    for _ in 0..5 {
        let res = svc
            .clone()
            .oneshot(Request::get("http://up/").body(Full::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    eprintln!(
        "budget {budget_before} -> {:?}; throttle -> {:?}",
        layer.budget_balance(),
        layer.throttle_tokens()
    );
    assert_eq!(
        layer.throttle_tokens(),
        Some(10.0),
        "5 calls, 5 reroutes that sent nothing, 5 successes"
    );
}

// ---------------------------------------------------------------------------------------
// worst_case_total: saturating, and a bound on the backoff waits of one call.
#[test]
fn worst_case_total_with_proportional_jitter_near_max_saturates() {
    let b = Backoff::new(Duration::MAX, Duration::MAX).jitter(Jitter::Proportional(20));
    let got = std::panic::catch_unwind(|| b.worst_case_total(1));
    assert_eq!(
        got.ok(),
        Some(Duration::MAX),
        "panicked instead of saturating"
    );
}

#[test]
fn worst_case_total_with_proportional_jitter_large_constant() {
    // ~ 9.2e18 s: a third above it overflows.
    let b =
        Backoff::constant(Duration::from_secs(u64::MAX / 2 + 1)).jitter(Jitter::Proportional(100));
    let got = std::panic::catch_unwind(|| b.worst_case_total(3));
    assert!(got.is_ok(), "panicked");
}

/// At run time: a retry with a huge constant backoff and proportional jitter panics in the
/// caller's poll (here under a 1 s timeout so non-panicking draws finish).
#[tokio::test(start_paused = true)]
async fn a_retry_with_a_huge_proportional_backoff_does_not_panic() {
    let upstream = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| async move {
        Ok::<_, BoxError>(Response::builder().status(503).body(()).unwrap())
    });
    let layer = RetryLayer::builder()
        .budget(None)
        .seed(1)
        .backoff(Backoff::constant(Duration::MAX).jitter(Jitter::Proportional(50)))
        .build()
        .unwrap();
    let svc = layer.layer(upstream);
    for i in 0..8 {
        use futures_util::FutureExt;
        let s = svc.clone();
        let r = std::panic::AssertUnwindSafe(tokio::time::timeout(
            Duration::from_secs(1),
            s.oneshot(Request::get("http://up/").body(Full::default()).unwrap()),
        ))
        .catch_unwind()
        .await;
        assert!(r.is_ok(), "call {i} panicked");
    }
}

/// The backoff restarts after a server hint, so a `Retry-After: 0` (or an HTTP date in the
/// past) between failures lets the backoff waits of one call add up to more than
/// `worst_case_backoff()` ("the longest the backoff waits between attempts can add up to").
#[tokio::test(start_paused = true)]
async fn backoff_waits_of_one_call_stay_within_worst_case_backoff() {
    fn frozen() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }
    for hint in [
        "Tue, 14 Nov 2023 22:00:00 GMT", /* before `frozen` */
        "0",
    ] {
        let n = Arc::new(AtomicUsize::new(0));
        let c = n.clone();
        let upstream = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            let i = c.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut b = Response::builder().status(if i < 3 { 503 } else { 200 });
                if i == 1 {
                    b = b.header("retry-after", hint);
                }
                Ok::<_, BoxError>(b.body(()).unwrap())
            }
        });
        // Exponential x0.5 from 1 s: 1 s, 0.5 s, 0.25 s.
        let builder = RetryLayer::builder()
            .budget(None)
            .max_attempts(4)
            .wall_clock(frozen)
            .backoff(
                Backoff::new(Duration::from_secs(1), Duration::from_secs(1))
                    .multiplier(0.5)
                    .jitter(Jitter::None),
            );
        let bound = builder.worst_case_backoff();
        let svc = builder.build().unwrap().layer(upstream);
        let start = Instant::now();
        let res = svc
            .oneshot(Request::get("http://up/").body(Full::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(n.load(Ordering::SeqCst), 4);
        let waited = start.elapsed();
        assert!(
            waited <= bound,
            "hint {hint:?}: waited {waited:?} (all backoff: the hint's wait is 0) > worst_case_backoff {bound:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Holds (regression checks).
#[tokio::test(start_paused = true)]
async fn grpc_calls_make_at_most_five_attempts() {
    for ct in [
        "application/grpc",
        "application/grpc+proto",
        "Application/GRPC;x=y",
    ] {
        let n = Arc::new(AtomicUsize::new(0));
        let c = n.clone();
        let upstream = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            c.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, BoxError>(grpc_unavailable()) }
        });
        let svc = RetryLayer::builder()
            .budget(None)
            .retry_grpc_statuses(true)
            .max_attempts(10)
            .build()
            .unwrap()
            .layer(upstream);
        let req = Request::post("http://up/x")
            .header("content-type", ct)
            .body(Full::default())
            .unwrap();
        let _ = svc.oneshot(req).await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 5, "{ct}");
    }
}

#[test]
fn throttle_validation() {
    let t = |max_tokens, token_ratio| {
        RetryLayer::builder()
            .grpc_throttling(Some(ThrottleConfig {
                max_tokens,
                token_ratio,
            }))
            .build()
            .is_ok()
    };
    assert!(!t(0, 0.1));
    assert!(t(1, 0.1));
    assert!(t(1000, 0.1));
    assert!(!t(1001, 0.1));
    assert!(!t(10, 0.0));
    assert!(!t(10, 0.0001));
    assert!(!t(10, f64::NAN));
    assert!(!t(10, f64::INFINITY));
    assert!(t(10, 0.001));
}

#[tokio::test(start_paused = true)]
async fn retry_after_dates_against_wall_clock() {
    fn frozen() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    for (hint, want_attempts, want_wait) in [
        (
            "Tue, 14 Nov 2023 22:13:30 GMT",
            2,
            Some(Duration::from_secs(10)),
        ), // frozen + 10 s
        ("Fri, 31 Dec 9999 23:59:59 GMT", 1, None), // over the cap
        ("Tue, 14 Nov 2023 22:13:20 GMT", 2, Some(Duration::ZERO)), // now
        ("not a date", 2, None),                    // the backoff
    ] {
        let n = Arc::new(AtomicUsize::new(0));
        let c = n.clone();
        let upstream = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            let i = c.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(if i == 0 { 503 } else { 200 })
                        .header("retry-after", hint)
                        .body(())
                        .unwrap(),
                )
            }
        });
        let svc = RetryLayer::builder()
            .wall_clock(frozen)
            .seed(3)
            .build()
            .unwrap()
            .layer(upstream);
        let start = Instant::now();
        let _ = svc
            .oneshot(Request::get("http://up/").body(Full::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(n.load(Ordering::SeqCst), want_attempts, "{hint}");
        if let Some(w) = want_wait {
            assert_eq!(start.elapsed(), w, "{hint}");
        }
        seen.lock().unwrap().push(start.elapsed());
    }
}
