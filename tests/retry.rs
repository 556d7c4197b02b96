//! The retry layer alone over real loopback sockets against the fault-injecting upstream (the
//! whole client stack under faults is `tests/reliability.rs`).

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::TokioExecutor;
use steadfast::retry::{ReplayBody, RetryLayer};
use steadfast_testkit::{Fault, FaultServer, hash_body};
use support::{get_from as get, transport as client};
use tower::{Layer, ServiceExt};

#[tokio::test(start_paused = true)]
async fn flaky_upstream_succeeds_on_the_third_attempt() {
    let server = FaultServer::start().await;
    server.script([Fault::status(503), Fault::status(503)]);
    let svc = RetryLayer::new().layer(client::<Full<Bytes>>());
    let res = svc.oneshot(get(&server)).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = server.received();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].headers["x-retry-attempt"], "3");
}

#[tokio::test(start_paused = true)]
async fn a_streamed_10_kib_body_arrives_byte_identical_on_every_attempt() {
    let server = FaultServer::start().await;
    server.script([Fault::status(503), Fault::status(502)]);
    let chunks: Vec<Bytes> = (0..10u8)
        .map(|i| Bytes::from(vec![b'a' + i; 1024]))
        .collect();
    let whole: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    // A body that is not Clone: a one-shot stream of frames.
    let stream = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, std::io::Error>(Frame::data(c))),
    );
    let req = Request::put(server.url("/upload"))
        .body(StreamBody::new(stream))
        .unwrap();
    let svc = RetryLayer::new().layer(client());
    assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
    let seen = server.received();
    assert_eq!(seen.len(), 3);
    for r in &seen {
        assert_eq!(r.body_len, 10 * 1024);
        assert_eq!(
            r.body_hash,
            hash_body(&whole),
            "identical bytes on every attempt"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_1_mib_body_over_the_cap_gets_exactly_one_attempt() {
    let server = FaultServer::start().await;
    server.set_default(Fault::status(503));
    let one_mib = Bytes::from(vec![9u8; 1024 * 1024]);
    let stream = futures_util::stream::iter(
        one_mib
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(Frame::data(Bytes::copy_from_slice(c))))
            .collect::<Vec<_>>(),
    );
    let req = Request::put(server.url("/big"))
        .body(StreamBody::new(stream))
        .unwrap();
    let svc = RetryLayer::new().layer(client());
    assert_eq!(svc.oneshot(req).await.unwrap().status(), 503);
    let seen = server.received();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].body_len,
        1024 * 1024,
        "the first attempt was sent whole"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_2_is_honoured() {
    let server = FaultServer::start().await;
    server.script([Fault::status_with(503, "retry-after", "2")]);
    let svc = RetryLayer::new().layer(client::<Full<Bytes>>());
    assert_eq!(svc.oneshot(get(&server)).await.unwrap().status(), 200);
    let seen = server.received();
    assert_eq!(seen.len(), 2);
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_secs(2) && gap < Duration::from_millis(2100),
        "{gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn tonic_client_retries_unavailable_with_its_body_replayed() {
    use std::sync::{Arc, Mutex};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The first two calls are refused with a trailers-only UNAVAILABLE; every request body is
    // recorded.
    let bodies: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let b = bodies.clone();
    let flaky = tower::layer::layer_fn(move |inner: tonic::service::Routes| {
        let b = b.clone();
        tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let (b, mut inner) = (b.clone(), inner.clone());
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect().await.unwrap().to_bytes();
                let n = {
                    let mut v = b.lock().unwrap();
                    v.push(bytes.clone());
                    v.len()
                };
                if n <= 2 {
                    let res = steadfast::common::grpc_response::<tonic::body::Body>(
                        steadfast::common::GrpcCode::Unavailable,
                        "warming up",
                    );
                    let (p, _) = res.into_parts();
                    return Ok::<_, std::convert::Infallible>(http::Response::from_parts(
                        p,
                        tonic::body::Body::empty(),
                    ));
                }
                let req =
                    http::Request::from_parts(parts, tonic::body::Body::new(Full::new(bytes)));
                tower::Service::call(&mut inner, req).await
            }
        })
    });
    let incoming = futures_util::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    let routes = tonic::service::Routes::new(health);
    tokio::spawn(async move {
        let svc = flaky.layer(routes);
        let mut incoming = std::pin::pin!(incoming);
        use futures_util::StreamExt;
        while let Some(Ok(stream)) = incoming.next().await {
            let svc = svc.clone();
            tokio::spawn(async move {
                let svc = hyper_util::service::TowerToHyperService::new(svc);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // tonic's Channel takes tonic bodies: adapt the replayable body (one box per attempt).
    let adapted =
        tower::util::MapRequestLayer::new(|req: http::Request<ReplayBody<tonic::body::Body>>| {
            req.map(tonic::body::Body::new)
        })
        .layer(channel);
    let stack = RetryLayer::builder()
        .retry_non_idempotent(true) // a health check is safe to repeat
        .build()
        .unwrap()
        .layer(adapted);
    let mut client = HealthClient::new(stack);
    let res = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(res.into_inner().status, 1, "SERVING");
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 3);
    assert!(
        bodies.iter().all(|b| *b == bodies[0] && !b.is_empty()),
        "the same message every attempt"
    );
}

#[tokio::test(start_paused = true)]
async fn the_attempt_header_can_be_renamed_or_left_out() {
    let server = FaultServer::start().await;
    server.script([Fault::status(503), Fault::status(503)]);
    let renamed = RetryLayer::builder()
        .attempt_header(Some(http::HeaderName::from_static("x-attempt")))
        .build()
        .unwrap();
    let res = renamed
        .layer(client::<Full<Bytes>>())
        .oneshot(get(&server))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = server.received();
    assert_eq!(seen[2].headers["x-attempt"], "3");
    assert!(!seen[2].headers.contains_key("x-retry-attempt"));

    let server = FaultServer::start().await;
    server.script([Fault::status(503)]);
    let quiet = RetryLayer::builder().attempt_header(None).build().unwrap();
    quiet
        .layer(client::<Full<Bytes>>())
        .oneshot(get(&server))
        .await
        .unwrap();
    let seen = server.received();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|r| !r.headers.contains_key("x-retry-attempt"))
    );
}

/// A budget the caller wrote on the request (`x-request-timeout-ms`, as tonic's
/// `Request::set_timeout` writes `grpc-timeout`) ends the whole call, retries included, when
/// no total timeout stands above the retry: the attempts after the first are told what is
/// left of it, and none starts once it has passed. (The retry read only a deadline it was
/// given, so each attempt below took the caller's budget afresh: three attempts of 600 ms.)
#[tokio::test(start_paused = true)]
async fn a_budget_the_caller_wrote_ends_the_whole_call_without_a_total_timeout() {
    use steadfast::timeout::TimeoutLayer;
    let server = FaultServer::start().await;
    server.set_default(Fault::status(503).after(Duration::from_millis(600)));
    let svc = RetryLayer::new().layer(TimeoutLayer::new(Duration::from_secs(5)).layer(client()));
    let mut req = get(&server);
    req.headers_mut()
        .insert("x-request-timeout-ms", "1000".parse().unwrap());
    let started = tokio::time::Instant::now();
    let out = svc.oneshot(req).await;
    assert!(
        started.elapsed() <= Duration::from_millis(1000),
        "the call outlived its budget: {:?}",
        started.elapsed()
    );
    assert!(out.is_err(), "the second attempt is cut at the budget");
    let seen = server.received();
    assert_eq!(seen.len(), 2, "no attempt starts past the budget");
    assert_eq!(seen[0].headers["x-request-timeout-ms"], "1000");
    let told: u64 = seen[1].headers["x-request-timeout-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        told < 400,
        "the second attempt is told what is left: {told} ms"
    );
}
