//! gRPC statuses in trailers, and the answering breaker's 503 / UNAVAILABLE. Paused time.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use steadfast_breaker::BreakerState;
use steadfast_breaker::error::BreakerOpen;
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt, service_fn};

use common::*;

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
    assert_eq!(
        h.state(),
        BreakerState::Closed,
        "verdict not known from the head"
    );
    let _ = res.into_body().collect().await.unwrap();
    assert_eq!(h.state(), BreakerState::Open, "UNAVAILABLE in the trailers");
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
    assert_eq!(h.state(), BreakerState::Open);
    advance(Duration::from_secs(30)).await;

    let probe = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(h.state(), BreakerState::HalfOpen);
    let mut body = probe.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data(), "a data frame carries no verdict");
    let refused = svc.ready().await.unwrap().call(Request::new(())).await;
    assert!(
        matches!(&refused, Err(e) if e.downcast_ref::<BreakerOpen>().is_some()),
        "the probe's permit is still out"
    );
    drop(body);
    assert_eq!(
        h.state(),
        BreakerState::HalfOpen,
        "no verdict from a dropped body"
    );

    let next = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .expect("the permit came back");
    let _ = next.into_body().collect().await.unwrap();
    assert_eq!(
        h.state(),
        BreakerState::Closed,
        "grpc-status 0 in the trailers"
    );
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
