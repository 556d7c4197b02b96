//! Readiness: an open breaker decides before polling its inner service, backpressure mode,
//! forced states. Paused time.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use steadfast_breaker::BreakerState;
use steadfast_breaker::error::BreakerOpen;
use tower::{Layer, Service, ServiceExt};

use common::*;

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
    assert_eq!(h2.state(), BreakerState::Open);
    let start = tokio::time::Instant::now();
    svc.ready().await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(30),
        "woken by the timer when a probe is allowed"
    );
    up.set(200);
    assert_eq!(svc.call(Request::new(())).await.unwrap().status(), 200);
    assert_eq!(h2.state(), BreakerState::Closed);
    let _ = h;
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
