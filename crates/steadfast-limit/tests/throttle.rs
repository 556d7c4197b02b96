//! Client-side adaptive throttling: its contract on paused time with a seeded draw.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use steadfast_core::{BoxError, PolicyRejected};
use steadfast_limit::ThrottleLayer;
use steadfast_limit::error::{InvalidLimitConfig, Throttled};
use tokio::time::advance;
use tower::{Layer, ServiceExt, service_fn};

/// An upstream that answers 503 while `failing` is set, and counts the calls it sees.
fn upstream(
    failing: Arc<AtomicBool>,
    seen: Arc<AtomicU32>,
) -> impl tower::Service<Request<()>, Response = Response<()>, Error = Infallible, Future = impl Send>
+ Clone {
    service_fn(move |_req: Request<()>| {
        let (failing, seen) = (failing.clone(), seen.clone());
        async move {
            seen.fetch_add(1, SeqCst);
            let mut res = Response::new(());
            if failing.load(SeqCst) {
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, Infallible>(res)
        }
    })
}

async fn calls<S>(svc: &S, n: u32) -> (u32, u32)
where
    S: tower::Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone,
{
    let (mut throttled, mut answered) = (0, 0);
    for _ in 0..n {
        match svc.clone().oneshot(Request::new(())).await {
            Ok(_) => answered += 1,
            Err(e) => {
                assert!(e.is::<Throttled>(), "{e}");
                assert!(PolicyRejected::is_in(&*e));
                throttled += 1;
            }
        }
        advance(Duration::from_millis(10)).await;
    }
    (throttled, answered)
}

#[tokio::test(start_paused = true)]
async fn a_healthy_upstream_is_never_throttled() {
    let (failing, seen) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU32::new(0)),
    );
    let throttle = ThrottleLayer::builder().seed(1).build().unwrap();
    let svc = throttle.layer(upstream(failing, seen.clone()));
    assert_eq!(calls(&svc, 1000).await, (0, 1000));
    assert_eq!(throttle.rejection_probability(), 0.0);
    assert_eq!(throttle.counts(), (1000, 1000));
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_refuses_sees_its_load_fall_then_recover() {
    let (failing, seen) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU32::new(0)));
    let throttle = ThrottleLayer::builder().seed(7).build().unwrap();
    let svc = throttle.layer(upstream(failing.clone(), seen.clone()));

    // The upstream refuses everything: the first calls all reach it (fewer than the minimum
    // in the window), then the client refuses up to 80 % itself.
    let (throttled, _) = calls(&svc, 2000).await;
    let p = throttle.rejection_probability();
    assert!((0.79..=0.8).contains(&p), "capped at 80 %: {p}");
    let sent = seen.load(SeqCst);
    assert!(
        sent < 2000 * 30 / 100,
        "the upstream saw {sent} of 2000 calls"
    );
    assert_eq!(throttled + sent, 2000);

    // It recovers. The client's own refusals count as requests, so the probability falls as
    // the refusals leave the window and the calls let through are accepted: with K = 2 and
    // the 80 % cap, p goes 0.8 → 0.6 → 0.2 → 0 over about three windows (SRE book).
    failing.store(false, SeqCst);
    let mut minutes = 0;
    let mut last = p;
    while throttle.rejection_probability() > 0.0 {
        let _ = calls(&svc, 6000).await; // a minute
        minutes += 1;
        let now = throttle.rejection_probability();
        assert!(now <= last + 0.05, "minute {minutes}: {last} → {now}");
        last = now;
        assert!(
            minutes <= 8,
            "still throttling after {minutes} minutes: {now}"
        );
    }
    assert_eq!(calls(&svc, 100).await, (0, 100));
    // A window full of accepts absorbs a short burst of refusals.
    failing.store(true, SeqCst);
    let _ = calls(&svc, 1000).await;
    assert_eq!(throttle.rejection_probability(), 0.0);
    // An idle client forgets everything after one window.
    advance(Duration::from_secs(121)).await;
    let _ = calls(&svc, 1000).await;
    assert!(throttle.rejection_probability() > 0.0);
    advance(Duration::from_secs(121)).await;
    failing.store(false, SeqCst);
    assert_eq!(
        calls(&svc, 100).await,
        (0, 100),
        "the window forgot the refusals"
    );
}

#[tokio::test(start_paused = true)]
async fn refusals_by_layers_below_count_nowhere() {
    let throttle = ThrottleLayer::builder().min_requests(1).build().unwrap();
    let svc = throttle.layer(service_fn(|_req: Request<()>| async {
        Err::<Response<()>, BoxError>(Box::new(Throttled::new(1.0)))
    }));
    for _ in 0..100 {
        assert!(svc.clone().oneshot(Request::new(())).await.is_err());
    }
    assert_eq!(throttle.counts(), (0, 0));
    assert_eq!(throttle.rejection_probability(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn errors_and_overload_answers_are_not_accepts() {
    let throttle = ThrottleLayer::builder().build().unwrap();
    for status in [429, 503, 504, 500, 200, 404] {
        let svc = throttle.layer(service_fn(move |_req: Request<()>| async move {
            let mut res = Response::new(());
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok::<_, Infallible>(res)
        }));
        svc.oneshot(Request::new(())).await.unwrap();
    }
    let grpc = throttle.layer(service_fn(|_req: Request<()>| async {
        let mut res = Response::new(());
        res.headers_mut()
            .insert("grpc-status", "8".parse().unwrap());
        Ok::<_, Infallible>(res)
    }));
    grpc.oneshot(Request::new(())).await.unwrap();
    let broken = throttle.layer(service_fn(|_req: Request<()>| async {
        Err::<Response<()>, _>(std::io::Error::other("reset"))
    }));
    assert!(broken.oneshot(Request::new(())).await.is_err());
    // 500, 200 and 404 are accepted: the upstream served them.
    assert_eq!(throttle.counts(), (8, 3));
}

#[test]
fn bad_settings_are_refused() {
    let b = ThrottleLayer::builder;
    for k in [0.5, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            b().k(k).build().unwrap_err(),
            InvalidLimitConfig::Factor { name: "k", .. }
        ));
    }
    for max in [-0.1, 1.1, f64::NAN] {
        assert!(matches!(
            b().max_rejection(max).build().unwrap_err(),
            InvalidLimitConfig::Factor {
                name: "max_rejection",
                ..
            }
        ));
    }
    assert!(matches!(
        b().window(Duration::from_millis(999)).build().unwrap_err(),
        InvalidLimitConfig::Zero(_)
    ));
    b().window(Duration::MAX)
        .max_rejection(1.0)
        .k(1.0)
        .build()
        .unwrap();
}
