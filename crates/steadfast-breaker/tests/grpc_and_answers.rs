//! gRPC statuses in trailers, the answering breaker's 503 / UNAVAILABLE, and shed answers. Paused time.

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

/// An upstream that answers the status in `answers`, marked as shed (`x-envoy-overloaded`)
/// when its flag is set.
fn answering(
    answers: std::sync::Arc<std::sync::Mutex<(u16, bool)>>,
) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone {
    service_fn(move |_req: Request<()>| {
        let (status, shed) = *answers.lock().unwrap();
        async move {
            let mut res = Response::builder().status(status);
            if shed {
                res = res.header("x-envoy-overloaded", "true");
            }
            Ok::<_, Infallible>(res.body(()).unwrap())
        }
    })
}

/// A shed answer (503 + `x-envoy-overloaded`) counts neither way: any number of them in a
/// row opens nothing, and they do not dilute a failure rate as successes would. Unmarked,
/// the same answer is a failure; and a classifier told not to honour the marker counts it
/// by its status.
#[tokio::test(start_paused = true)]
async fn shed_answers_count_neither_as_failures_nor_as_successes() {
    use std::sync::{Arc, Mutex};
    let answers = Arc::new(Mutex::new((503, true)));

    let layer = builder().consecutive_failures(Some(1)).build().unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(answering(answers.clone()));
    for _ in 0..100 {
        assert_eq!(call(&mut svc).await.unwrap(), 503);
    }
    assert_eq!(h.state(), BreakerState::Closed, "shed: no failure");
    *answers.lock().unwrap() = (503, false);
    assert_eq!(call(&mut svc).await.unwrap(), 503);
    assert_eq!(h.state(), BreakerState::Open, "unmarked: a failure");

    // A failure rate over a count window: 3 failures among 100 shed answers is still 3 of 3
    // counted calls, not 3 of 103.
    *answers.lock().unwrap() = (503, true);
    let layer = builder()
        .consecutive_failures(None)
        .count_window(10)
        .failure_rate(50)
        .min_calls(3)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(answering(answers.clone()));
    for i in 0..103 {
        *answers.lock().unwrap() = if i % 40 == 0 {
            (500, false)
        } else {
            (503, true)
        };
        let _ = call(&mut svc).await;
    }
    assert_eq!(h.state(), BreakerState::Open, "3 failures of 3 counted");

    *answers.lock().unwrap() = (503, true);
    let strict = builder()
        .consecutive_failures(Some(1))
        .classifier(steadfast_core::DefaultClassifier::new().honour_overloaded(false))
        .build()
        .unwrap();
    let h = strict.handle();
    let mut svc = strict.layer(answering(answers));
    assert_eq!(call(&mut svc).await.unwrap(), 503);
    assert_eq!(h.state(), BreakerState::Open, "marker not honoured");
}

/// A half-open breaker's probe that is shed learns nothing: the breaker stays half-open and
/// the probe's permit goes to the next call, whose success closes it.
#[tokio::test(start_paused = true)]
async fn a_shed_probe_gives_its_permit_to_the_next_call() {
    use std::sync::{Arc, Mutex};
    let answers = Arc::new(Mutex::new((500, false)));
    let layer = builder()
        .consecutive_failures(Some(1))
        .half_open_probes(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(answering(answers.clone()));
    let _ = call(&mut svc).await;
    assert_eq!(h.state(), BreakerState::Open);
    advance(Duration::from_secs(30)).await;
    *answers.lock().unwrap() = (503, true);
    for _ in 0..5 {
        assert_eq!(call(&mut svc).await.unwrap(), 503, "each a probe, shed");
        assert_eq!(h.state(), BreakerState::HalfOpen);
    }
    *answers.lock().unwrap() = (200, false);
    assert_eq!(call(&mut svc).await.unwrap(), 200);
    assert_eq!(h.state(), BreakerState::Closed);
}

/// Shed probes over a longer time than the probes' verdict wait do not make the next probe
/// count as timed out: each shed answer gives the probes a fresh wait (the upstream answered
/// promptly; it is busy, not hanging). A probe that really hangs still re-opens the breaker
/// once that wait has passed.
#[tokio::test(start_paused = true)]
async fn shed_probes_renew_the_verdict_wait_and_a_hanging_probe_still_times_out() {
    use std::sync::{Arc, Mutex};
    // (status, shed, hang)
    let mode = Arc::new(Mutex::new((500u16, false, false)));
    let m = mode.clone();
    let svc = service_fn(move |_req: Request<()>| {
        let (status, shed, hang) = *m.lock().unwrap();
        async move {
            if hang {
                std::future::pending::<()>().await;
            }
            let mut res = Response::builder().status(status);
            if shed {
                res = res.header("x-envoy-overloaded", "true");
            }
            Ok::<_, Infallible>(res.body(()).unwrap())
        }
    });
    let layer = builder()
        .consecutive_failures(Some(1))
        .half_open_probes(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(svc);
    let _ = call(&mut svc).await;
    assert_eq!(h.state(), BreakerState::Open);
    advance(Duration::from_secs(30)).await;
    // Shed probes for 50 s: longer than the 30 s the probes have for a verdict.
    *mode.lock().unwrap() = (503, true, false);
    for _ in 0..5 {
        assert_eq!(call(&mut svc).await.unwrap(), 503);
        advance(Duration::from_secs(10)).await;
    }
    assert_eq!(h.state(), BreakerState::HalfOpen);
    // One probe now hangs; a call meanwhile is refused, and the breaker stays half-open.
    *mode.lock().unwrap() = (503, true, true);
    let mut hung = svc.clone();
    let probe = tokio::spawn(async move { call(&mut hung).await });
    tokio::task::yield_now().await;
    assert!(is_open(&call(&mut svc).await), "the probe's permit is out");
    assert_eq!(
        h.state(),
        BreakerState::HalfOpen,
        "a probe taken a moment ago has not timed out"
    );
    // Past the renewed wait the hanging probe counts as timed out: re-open.
    advance(Duration::from_secs(31)).await;
    assert!(is_open(&call(&mut svc).await));
    assert_eq!(h.state(), BreakerState::Open);
    probe.abort();
}
