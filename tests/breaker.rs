//! The circuit breaker over real loopback sockets: an upstream goes down and comes back.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::{Router, extract::State as AxState, routing::get};
use steadfast::breaker::{BreakerState, CircuitBreakerLayer, error::BreakerOpen};
use support::{get as get_req, http_client, serve_axum};
use tower::{ServiceBuilder, ServiceExt};

#[derive(Clone, Default)]
struct Upstream {
    down: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
}

async fn handler(AxState(up): AxState<Upstream>) -> (http::StatusCode, &'static str) {
    up.hits.fetch_add(1, Ordering::SeqCst);
    if up.down.load(Ordering::SeqCst) {
        (http::StatusCode::SERVICE_UNAVAILABLE, "down")
    } else {
        (http::StatusCode::OK, "up")
    }
}

#[tokio::test(start_paused = true)]
async fn upstream_down_then_back_opens_rejects_probes_and_closes() {
    let up = Upstream::default();
    let addr = serve_axum(
        Router::new()
            .route("/", get(handler))
            .with_state(up.clone()),
    )
    .await;

    let breaker = CircuitBreakerLayer::builder()
        .open_time(Duration::from_secs(30))
        .jitter_percent(0)
        .build_per_authority()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(breaker.clone())
        .service(http_client());
    let key = Some(format!("{addr}").parse::<http::uri::Authority>().unwrap());

    // Healthy.
    let res = client.clone().oneshot(get_req(addr, "/")).await.unwrap();
    assert_eq!(res.status(), 200);

    // Down: the breaker opens after its threshold (5 consecutive failures).
    up.down.store(true, Ordering::SeqCst);
    for _ in 0..5 {
        let res = client.clone().oneshot(get_req(addr, "/")).await.unwrap();
        assert_eq!(res.status(), 503);
    }
    let handle = breaker.handle(&key);
    assert_eq!(handle.state(), BreakerState::Open);

    // Open: rejected without network traffic.
    let hits = up.hits.load(Ordering::SeqCst);
    for _ in 0..20 {
        let err = client
            .clone()
            .oneshot(get_req(addr, "/"))
            .await
            .unwrap_err();
        assert!(err.downcast_ref::<BreakerOpen>().is_some());
    }
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        hits,
        "no request reached the upstream"
    );

    // Still down at the first probe: re-opens for longer.
    tokio::time::advance(Duration::from_secs(30)).await;
    let res = client.clone().oneshot(get_req(addr, "/")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(handle.state(), BreakerState::Open);
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        hits + 1,
        "exactly one probe"
    );

    // Back: the next probe (after the doubled open time) closes it.
    up.down.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(
        client.clone().oneshot(get_req(addr, "/")).await.is_err(),
        "still open at 59 s"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    let res = client.clone().oneshot(get_req(addr, "/")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(handle.state(), BreakerState::Closed);
    for _ in 0..10 {
        assert_eq!(
            client
                .clone()
                .oneshot(get_req(addr, "/"))
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let m = handle.metrics();
    assert_eq!(m.rejected, 21);
    assert_eq!(m.failures, 6);
}

#[tokio::test(start_paused = true)]
async fn connection_refused_counts_as_failure() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(Some(2))
        .build()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(breaker.clone())
        .service(http_client());
    for _ in 0..2 {
        let err = client
            .clone()
            .oneshot(get_req(addr, "/"))
            .await
            .unwrap_err();
        assert!(err.downcast_ref::<BreakerOpen>().is_none());
    }
    assert_eq!(breaker.handle().state(), BreakerState::Open);
}
