//! BreakerState shared across clones and tasks, Send/Sync, metrics and state names. Paused time.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use steadfast_breaker::{BreakerState, CircuitBreakerLayer};
use steadfast_core::{BoxError, DefaultClassifier};
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt, service_fn};

use common::*;

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
    assert_eq!(h.state(), BreakerState::Open);
    let mut other = layer.clone().layer(up.svc());
    assert!(is_open(&call(&mut other).await));
    // A separately built layer is a separate breaker (one per route).
    let mut separate = builder().build().unwrap().layer(up.svc());
    assert_eq!(call(&mut separate).await.unwrap(), 503);
}

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
        assert_eq!(h.state(), BreakerState::Open, "round {round}");
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
            BreakerState::Closed,
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
        steadfast_breaker::future::ResponseFuture<
            std::future::Ready<Result<Response<()>, BoxError>>,
            DefaultClassifier,
        >,
    >();
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
    assert_eq!(m.state, BreakerState::Open);
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
fn state_names_are_stable() {
    let names: Vec<_> = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
        BreakerState::Disabled,
        BreakerState::ForcedOpen,
        BreakerState::MetricsOnly,
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
