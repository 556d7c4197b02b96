//! The timeout layer over real loopback sockets: axum, tonic, and deadline propagation
//! across hops. Paused tokio time throughout.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::{Router, extract::State, http::HeaderMap, routing::get};
use steadfast::common::{BoxError, Deadline};
use steadfast::timeout::error::Elapsed;
use steadfast::timeout::{SetDeadlineLayer, TimeoutLayer};
use support::{get as get_req, http_client, serve_axum};
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};

#[tokio::test(start_paused = true)]
async fn axum_slow_handler_gets_504_fast_one_is_untouched() {
    let app = Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            }),
        )
        .route("/fast", get(|| async { "fast" }))
        .layer(SetDeadlineLayer::new(Duration::from_secs(2)));
    let addr = serve_axum(app).await;
    let client = http_client();

    let res = client.request(get_req(addr, "/fast")).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "fast");

    let start = Instant::now();
    let res = client.request(get_req(addr, "/slow")).await.unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(start.elapsed().as_secs(), 2);
}

#[tokio::test(start_paused = true)]
async fn tonic_client_sees_deadline_exceeded_from_slow_server() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // A deliberately slow server: every call waits 60 s before reaching the service.
    let slow = tower::util::MapFutureLayer::new(|fut| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        fut.await
    });
    // Records the deadline the service is called with (ambient, set by the server timeout).
    let seen: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let record = {
        let seen = seen.clone();
        tower::util::MapRequestLayer::new(move |req: http::Request<tonic::body::Body>| {
            let d = Deadline::current().expect("ambient deadline");
            seen.lock().unwrap().push(d.remaining());
            req
        })
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(SetDeadlineLayer::new(Duration::from_secs(1)))
            .layer(record)
            .layer(slow)
            .add_service(health)
            .serve_with_incoming(support::incoming(listener)),
    );

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let start = Instant::now();
    let status = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(start.elapsed().as_secs(), 1);

    // A client budget smaller than the server's own limit wins: grpc-timeout from tonic.
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let status = client.check(req).await.unwrap_err();
    // Both ends fire at the same instant: tonic's own client timer reports CANCELLED, our
    // server DEADLINE_EXCEEDED; either way the server honoured the smaller budget.
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen[0],
        Duration::from_secs(1),
        "own limit without an inbound budget"
    );
    assert!(
        seen[1] <= Duration::from_millis(300),
        "inbound grpc-timeout wins: {:?}",
        seen[1]
    );
}

/// When B's call to C ended, and how.
type CallEnd = (Instant, Result<(), Elapsed>);

#[derive(Clone, Default)]
struct Seen {
    budget_at_b: Arc<Mutex<Option<String>>>,
    c_call: Arc<Mutex<Option<CallEnd>>>,
}

#[tokio::test(start_paused = true)]
async fn deadline_propagates_across_hops_and_cuts_the_innermost_call() {
    // C: accepts and never answers.
    let c = serve_axum(Router::new().route(
        "/c",
        get(|| async {
            std::future::pending::<()>().await;
            ""
        }),
    ))
    .await;

    let seen = Seen::default();

    // B: records the budget it was given, then calls C through a client stack.
    async fn b_handler(
        State((seen, c)): State<(Seen, std::net::SocketAddr)>,
        headers: HeaderMap,
    ) -> &'static str {
        *seen.budget_at_b.lock().unwrap() = headers
            .get("x-request-timeout-ms")
            .map(|v| v.to_str().unwrap().to_owned());
        let client = ServiceBuilder::new()
            .layer(TimeoutLayer::new(Duration::from_secs(10)))
            .service(http_client());
        let r = client.oneshot(get_req(c, "/c")).await;
        let outcome = match r {
            Ok(_) => panic!("C never answers"),
            Err(e) => Err(*e
                .downcast_ref::<Elapsed>()
                .expect("cut by the timeout layer")),
        };
        *seen.c_call.lock().unwrap() = Some((Instant::now(), outcome));
        "b done"
    }
    let b = serve_axum(
        Router::new()
            .route("/b", get(b_handler))
            .with_state((seen.clone(), c))
            .layer(SetDeadlineLayer::new(Duration::from_secs(30))),
    )
    .await;

    // A: calls B through a client stack; no deadline code in the handler.
    let a = serve_axum(
        Router::new()
            .route(
                "/a",
                get(move || async move {
                    assert!(Deadline::current().is_some(), "A's deadline is ambient");
                    let client = ServiceBuilder::new()
                        .layer(TimeoutLayer::new(Duration::from_secs(10)))
                        .service(http_client());
                    match client.oneshot(get_req(b, "/b")).await {
                        Ok(res) => res.status().to_string(),
                        Err(e) => format!("error: {e}"),
                    }
                }),
            )
            .layer(SetDeadlineLayer::new(Duration::from_secs(30))),
    )
    .await;

    let start = Instant::now();
    let mut req = get_req(a, "/a");
    req.headers_mut()
        .insert("x-request-timeout-ms", "2000".parse().unwrap());
    let res: Result<_, BoxError> = http_client().request(req).await.map_err(Into::into);
    let res = res.unwrap();
    assert!(
        start.elapsed() <= Duration::from_secs(2),
        "the edge's deadline holds: {:?}",
        start.elapsed()
    );
    assert!(res.status() == 200 || res.status() == 504);

    let budget: u64 = seen
        .budget_at_b
        .lock()
        .unwrap()
        .clone()
        .expect("B got a budget")
        .parse()
        .unwrap();
    assert!(budget <= 2000 && budget > 1500, "B was told {budget} ms");
    let (ended, outcome) = seen.c_call.lock().unwrap().expect("B's call to C ended");
    let e = outcome.unwrap_err();
    assert!(
        e.is_inherited(),
        "cut by the inherited deadline, not B's own 10 s"
    );
    assert!(ended - start <= Duration::from_secs(2));
    assert!(ended - start >= Duration::from_millis(1900));
}

// ---- the total deadline covers the response body ----

mod body {
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use steadfast::retry::ReplayBody;
    use steadfast::timeout::error::Elapsed;
    use steadfast_testkit::{Fault, FaultServer};
    use tokio::time::Instant;
    use tower::{Layer, ServiceExt};

    fn transport(
        http2: bool,
    ) -> Client<hyper_util::client::legacy::connect::HttpConnector, ReplayBody<Full<Bytes>>> {
        Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build_http()
    }

    /// Reads the whole body: the bytes that arrived and how it ended.
    async fn drain<B>(mut body: B) -> (usize, Option<Elapsed>)
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: Into<steadfast::common::BoxError>,
    {
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.into_data().map_or(0, |d| d.len()),
                Err(e) => {
                    let e: steadfast::common::BoxError = e.into();
                    return (n, Some(*e.downcast_ref::<Elapsed>().expect("an Elapsed")));
                }
            }
        }
        (n, None)
    }

    /// The report's case: total timeout 1 s, the upstream sends its head at once and then one
    /// byte per second for 120 s. The body ends with `Elapsed` at the deadline, HTTP/1 and 2.
    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_ends_at_the_total_deadline() {
        for http2 in [false, true] {
            let server = FaultServer::start().await;
            server.set_default(Fault::SlowBody {
                chunks: 120,
                chunk: 1,
                interval: Duration::from_secs(1),
            });
            let stack = steadfast::client::http()
                .attempt_timeout(Duration::from_millis(1500))
                .total_timeout(Duration::from_millis(2500))
                .build()
                .unwrap();
            let start = Instant::now();
            let req = http::Request::get(server.url("/"))
                .body(Full::default())
                .unwrap();
            let res = stack.layer(transport(http2)).oneshot(req).await.unwrap();
            assert_eq!(res.status(), 200);
            let (bytes, end) = drain(res.into_body()).await;
            let e = end.expect("the body is cut at the deadline");
            assert_eq!(e.limit(), Duration::from_millis(2500));
            assert!(!e.is_idle());
            assert!(bytes < 120, "http2={http2}: {bytes} bytes");
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "http2={http2}: the call outlived its deadline: {:?}",
                start.elapsed()
            );
        }
    }

    /// A caller that reads the body after the deadline, when the upstream finished sending
    /// long before, gets the whole body over HTTP/1.1 (hyper passes it on frame by frame,
    /// each after a `Pending`) and HTTP/2 alike.
    #[tokio::test(start_paused = true)]
    async fn a_body_already_received_is_delivered_to_a_late_reader() {
        for http2 in [false, true] {
            let server = FaultServer::start().await;
            // Fifty 10-byte chunks, sent at once (each its own frame on the wire).
            server.set_default(Fault::SlowBody {
                chunks: 50,
                chunk: 10,
                interval: Duration::ZERO,
            });
            let stack = steadfast::client::http()
                .attempt_timeout(Duration::from_millis(300))
                .total_timeout(Duration::from_millis(400))
                .build()
                .unwrap();
            let req = http::Request::get(server.url("/"))
                .body(Full::default())
                .unwrap();
            let res = stack.layer(transport(http2)).oneshot(req).await.unwrap();
            // The upstream is done at once; the caller comes back at 600 ms.
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert_eq!(drain(res.into_body()).await, (500, None), "http2={http2}");
        }
    }

    /// The opt-out for long-lived streams: the body runs past the total timeout; an idle
    /// limit still ends a stream that goes quiet.
    #[tokio::test(start_paused = true)]
    async fn long_lived_streams_opt_out_and_an_idle_limit_still_applies() {
        let server = FaultServer::start().await;
        server.set_default(Fault::SlowBody {
            chunks: 5,
            chunk: 10,
            interval: Duration::from_secs(1),
        });
        let streaming = steadfast::client::http()
            .attempt_timeout(Duration::from_millis(1500))
            .total_timeout(Duration::from_millis(2500))
            .total_covers_body(false)
            .build()
            .unwrap();
        let req = http::Request::get(server.url("/"))
            .body(Full::default())
            .unwrap();
        let res = streaming
            .layer(transport(false))
            .oneshot(req)
            .await
            .unwrap();
        assert_eq!(
            drain(res.into_body()).await,
            (50, None),
            "the whole stream, past 2.5 s"
        );

        let idle = steadfast::client::http()
            .total_covers_body(false)
            .body_idle_timeout(Some(Duration::from_millis(400)))
            .build()
            .unwrap();
        let req = http::Request::get(server.url("/"))
            .body(Full::default())
            .unwrap();
        let res = idle.layer(transport(true)).oneshot(req).await.unwrap();
        let (bytes, end) = drain(res.into_body()).await;
        let e = end.expect("the idle limit fires");
        assert!(e.is_idle());
        assert_eq!(e.limit(), Duration::from_millis(400));
        assert_eq!(bytes, 0);
    }

    /// The deadline propagated downstream (the smaller of the total and the attempt timeout)
    /// is the same with or without the body covered.
    #[tokio::test(start_paused = true)]
    async fn the_propagated_deadline_is_unchanged() {
        let server = FaultServer::start().await;
        for covers in [true, false] {
            let stack = steadfast::client::http()
                .total_timeout(Duration::from_secs(7))
                .total_covers_body(covers)
                .build()
                .unwrap();
            let req = http::Request::get(server.url("/"))
                .body(Full::default())
                .unwrap();
            let res = stack.layer(transport(false)).oneshot(req).await.unwrap();
            drain(res.into_body()).await;
        }
        let received = server.received();
        assert_eq!(received.len(), 2);
        for r in received {
            assert_eq!(r.headers["x-request-timeout-ms"], "5000");
        }
    }
}

/// Deadline headers with another name on both sides (Envoy's), and an edge server that
/// ignores (and strips) what its callers claim.
#[tokio::test(start_paused = true)]
async fn the_deadline_header_can_be_renamed_and_an_edge_can_ignore_it() {
    const ENVOY: &str = "x-envoy-expected-rq-timeout-ms";
    /// Reports the budget left in the handler (ms) and the deadline headers it received.
    async fn report(headers: HeaderMap) -> String {
        let left = Deadline::current().unwrap().remaining().as_millis();
        let seen = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        format!(
            "{left} {:?} {:?}",
            seen("x-request-timeout-ms"),
            seen(ENVOY)
        )
    }
    async fn body<B>(res: http::Response<B>) -> String
    where
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let bytes = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }
    let envoy = http::HeaderName::from_static(ENVOY);

    // Behind Envoy: the server reads its header; the default one means nothing to it.
    let inner = serve_axum(
        Router::new().route("/", get(report)).layer(
            steadfast::server::http()
                .deadline(|d| d.deadline_header(envoy.clone()))
                .build()
                .unwrap(),
        ),
    )
    .await;
    let mut req = get_req(inner, "/");
    req.headers_mut()
        .insert(envoy.clone(), "1500".parse().unwrap());
    req.headers_mut()
        .insert("x-request-timeout-ms", "100".parse().unwrap());
    let text = body(http_client().oneshot(req).await.unwrap()).await;
    assert!(text.starts_with("1500 "), "{text}");

    // A client stack writes the renamed header.
    let client = steadfast::client::http()
        .deadline_header(envoy.clone())
        .build()
        .unwrap()
        .layer(support::transport::<http_body_util::Full<bytes::Bytes>>());
    let res = client.oneshot(get_req(inner, "/")).await.unwrap();
    let text = body(res).await;
    let left: u128 = text.split(' ').next().unwrap().parse().unwrap();
    assert!(
        (4_000..=5_000).contains(&left),
        "the 5 s attempt budget: {text}"
    );
    assert!(text.ends_with("None Some(\"5000\")"), "{text}");

    // An edge: a caller's 1 ms is ignored and not passed on; the server's own 30 s holds.
    let edge = serve_axum(
        Router::new().route("/", get(report)).layer(
            steadfast::server::http()
                .deadline(|d| d.trust_inbound(false))
                .build()
                .unwrap(),
        ),
    )
    .await;
    let mut req = get_req(edge, "/");
    req.headers_mut()
        .insert("x-request-timeout-ms", "1".parse().unwrap());
    let text = body(http_client().oneshot(req).await.unwrap()).await;
    assert_eq!(text, "30000 None None");
}

/// The client stack's total timeout ends the call at the total deadline when the retry layer
/// waits on something no timer bounds (here: the transport answers 503, then never becomes
/// ready again).
#[tokio::test(start_paused = true)]
async fn the_total_timeout_bounds_a_retry_waiting_for_readiness() {
    use std::task::{Context, Poll};

    #[derive(Clone, Default)]
    struct ThenStuck(Arc<Mutex<u32>>);
    impl<B> tower::Service<http::Request<B>> for ThenStuck {
        type Response = http::Response<http_body_util::Empty<bytes::Bytes>>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Self::Response, BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            // Ready for the first call only; never woken again.
            if *self.0.lock().unwrap() == 0 {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
        fn call(&mut self, _: http::Request<B>) -> Self::Future {
            *self.0.lock().unwrap() += 1;
            let res = http::Response::builder()
                .status(503)
                .body(http_body_util::Empty::new())
                .unwrap();
            std::future::ready(Ok(res))
        }
    }
    let stack = steadfast::client::http()
        .total_timeout(Duration::from_secs(2))
        .attempt_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(ThenStuck::default());
    let start = Instant::now();
    let req = http::Request::get("http://orders/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    // A guard that fails the test instead of hanging it if nothing ends the call.
    let e = tokio::time::timeout(Duration::from_secs(60), stack.oneshot(req))
        .await
        .expect("ended by the total timeout")
        .unwrap_err();
    let elapsed = e
        .downcast_ref::<Elapsed>()
        .expect("the total timeout's error");
    assert_eq!(elapsed.limit(), Duration::from_secs(2));
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}
