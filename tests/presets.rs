//! The client and server presets: validation, and the stacks end to end over loopback.

mod support;

use std::time::Duration;

use axum::{Router, routing::get};
use bytes::Bytes;
use http_body_util::Full;
use steadfast::InvalidPresetConfig;
use steadfast::correlation::CorrelationId;
use steadfast_testkit::{Fault, FaultServer};
use tower::{Layer, ServiceExt};

#[test]
fn invalid_combinations_are_typed_errors_that_say_what_to_change() {
    let e = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(5))
        .total_timeout(Duration::from_secs(2))
        .build()
        .unwrap_err();
    assert!(matches!(e, InvalidPresetConfig::AttemptExceedsTotal { .. }));
    assert!(
        e.to_string()
            .contains("lower attempt_timeout or raise total_timeout")
    );

    let e = steadfast::client::http()
        .attempt_timeout(Duration::from_millis(100))
        .total_timeout(Duration::from_millis(200))
        .retry(|r| r.max_attempts(5))
        .build()
        .unwrap_err();
    assert!(
        matches!(e, InvalidPresetConfig::BackoffsExceedTotal { .. }),
        "{e}"
    );

    let e = steadfast::client::http()
        .breaker(|b| b.time_window(Duration::from_millis(100), 10))
        .build()
        .unwrap_err();
    assert!(matches!(
        e,
        InvalidPresetConfig::BreakerWindowTooShort { .. }
    ));

    // A slow-call threshold the attempt timeout cuts off first could never fire.
    let e = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .breaker(|b| {
            b.time_window(Duration::from_secs(1), 10)
                .slow_calls(Duration::from_secs(5), 50)
        })
        .build()
        .unwrap_err();
    assert!(
        matches!(e, InvalidPresetConfig::SlowCallsUnreachable { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("lower the threshold"));
    // Decorrelated jitter can wait three times its last wait: the preset counts it.
    let e = steadfast::client::http()
        .attempt_timeout(Duration::from_millis(100))
        .total_timeout(Duration::from_millis(400))
        .retry(|r| {
            r.backoff(
                steadfast::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
                    .jitter(steadfast::retry::Jitter::Decorrelated),
            )
        })
        .build()
        .unwrap_err();
    assert!(
        matches!(e, InvalidPresetConfig::BackoffsExceedTotal { .. }),
        "{e}"
    );
    let e = steadfast::client::http()
        .breaker(|b| b.backpressure(true))
        .build()
        .unwrap_err();
    assert!(matches!(e, InvalidPresetConfig::Breaker(_)), "{e}");

    let e = steadfast::client::http()
        .retry(|r| r.max_attempts(0))
        .build()
        .unwrap_err();
    assert!(matches!(e, InvalidPresetConfig::Retry(_)));
    let e = steadfast::client::http()
        .breaker(|b| b.half_open_probes(0))
        .build()
        .unwrap_err();
    assert!(matches!(e, InvalidPresetConfig::Breaker(_)));
    assert!(
        steadfast::server::http()
            .timeout(Duration::ZERO)
            .build()
            .is_err()
    );
    assert!(steadfast::client::http().build().is_ok());
}

#[tokio::test(start_paused = true)]
async fn client_preset_over_hyper_retries_and_propagates() {
    let upstream = FaultServer::start().await;
    upstream.script([Fault::status(503)]);
    let transport = support::transport::<Full<Bytes>>();
    let client = steadfast::client::http().build().unwrap().layer(transport);
    let id = CorrelationId::parse("preset-1").unwrap();
    let req = http::Request::get(upstream.url("/"))
        .body(Full::default())
        .unwrap();
    let res = id.scope(client.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = upstream.received();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.headers["x-correlation-id"], "preset-1");
        let budget: u64 = r.headers["x-request-timeout-ms"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(budget <= 5000, "per attempt: {budget}");
    }
}

#[tokio::test(start_paused = true)]
async fn server_preset_on_axum_answers_504_and_echoes_ids() {
    let app = Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            }),
        )
        .layer(
            steadfast::server::http()
                .timeout(Duration::from_secs(1))
                .build()
                .unwrap(),
        );
    let addr = support::serve_axum(app).await;
    let mut req = support::get(addr, "/slow");
    req.headers_mut()
        .insert("x-correlation-id", "srv-1".parse().unwrap());
    let res = support::http_client().request(req).await.unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(res.headers()["x-correlation-id"], "srv-1");
}

#[cfg(feature = "tonic")]
#[tokio::test(start_paused = true)]
async fn grpc_presets_with_tonic() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = support::incoming(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(steadfast::server::grpc().build().unwrap())
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stack = steadfast::client::grpc().build().unwrap().layer(channel);
    let mut client = HealthClient::new(stack);
    let id = CorrelationId::parse("grpc-preset").unwrap();
    let res = id
        .scope(client.check(HealthCheckRequest {
            service: String::new(),
        }))
        .await
        .unwrap();
    assert_eq!(
        res.metadata().get("x-correlation-id").unwrap(),
        "grpc-preset"
    );
}

/// Every service names its layer, as tower's do, with no type annotations at the call.
#[tokio::test]
async fn every_service_names_its_layer() {
    use steadfast::breaker::{AnsweringBreaker, CircuitBreaker, KeyedCircuitBreaker};
    use steadfast::correlation::{PropagateCorrelationId, SetCorrelationId};
    use steadfast::retry::Retry;
    use steadfast::timeout::{BodyTimeout, SetDeadline, Timeout};
    use tower::{Layer, ServiceExt, service_fn};

    let ok = || {
        service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        })
    };
    let d = Duration::from_secs(1);
    let req = || http::Request::new(());
    assert_eq!(
        Timeout::layer(d)
            .layer(ok())
            .oneshot(req())
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        BodyTimeout::layer(d)
            .layer(ok())
            .oneshot(req())
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        SetDeadline::layer(d)
            .layer(ok())
            .oneshot(req())
            .await
            .unwrap()
            .status(),
        200
    );
    let res = SetCorrelationId::layer()
        .layer(ok())
        .oneshot(req())
        .await
        .unwrap();
    assert!(res.headers().contains_key("x-correlation-id"));
    let seen = service_fn(|req: http::Request<()>| async move {
        Ok::<_, std::convert::Infallible>(req.headers().contains_key("x-correlation-id"))
    });
    assert!(
        PropagateCorrelationId::layer()
            .layer(seen)
            .oneshot(req())
            .await
            .unwrap()
    );
    assert_eq!(
        CircuitBreaker::layer()
            .layer(ok())
            .oneshot(req())
            .await
            .unwrap()
            .status(),
        200
    );
    let res = KeyedCircuitBreaker::layer()
        .layer(ok())
        .oneshot(req())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = AnsweringBreaker::layer()
        .layer(ok())
        .oneshot(req())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let replayed = service_fn(
        |_req: http::Request<steadfast::retry::ReplayBody<String>>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        },
    );
    let res = Retry::layer()
        .layer(replayed)
        .oneshot(http::Request::new(String::new()))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[test]
fn a_preset_error_hands_over_the_layers_own_error_as_its_source() {
    use std::error::Error;
    let e = steadfast::client::http()
        .retry(|r| r.max_attempts(0))
        .build()
        .unwrap_err();
    let source = e.source().expect("the retry layer's error");
    assert!(source.is::<steadfast::retry::error::InvalidRetryConfig>());
    let e = steadfast::server::http()
        .deadline(|d| d.deadline_header(http::header::AUTHORIZATION))
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("authorization"), "{e}");
    assert!(e.source().is_some());
    let e = steadfast::client::http()
        .total_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(e.source().is_none(), "the preset's own rule");
}

#[test]
fn a_named_client_stack_names_its_breakers_and_retries() {
    let stack = steadfast::client::http().name("gateway").build().unwrap();
    let handle = stack
        .breakers()
        .handle(&Some(http::uri::Authority::from_static("orders:80")));
    assert_eq!((handle.name(), handle.upstream()), ("gateway", "orders:80"));
}

/// The ready hyper-util client: no transport type to spell out.
#[tokio::test(start_paused = true)]
async fn the_ready_hyper_client_calls_through_the_stack() {
    let upstream = FaultServer::start().await;
    upstream.script([Fault::status(503)]);
    let client = steadfast::client::http()
        .build()
        .unwrap()
        .hyper_client::<Full<Bytes>>();
    let req = http::Request::get(upstream.url("/"))
        .body(Full::default())
        .unwrap();
    assert_eq!(client.oneshot(req).await.unwrap().status(), 200);
    assert_eq!(upstream.hits(), 2, "retried once");
}

/// A classifier of the caller's own type drives retry and breaker alike through the preset.
#[tokio::test(start_paused = true)]
async fn a_custom_classifier_drives_the_preset() {
    use std::error::Error;
    use steadfast::common::{Class, Classify, DefaultClassifier, Delivery, ResponseClass};

    #[derive(Clone, Debug)]
    struct ConflictsRetry(DefaultClassifier);
    impl<B> Classify<http::Response<B>> for ConflictsRetry {
        fn classify_response(&self, res: &http::Response<B>) -> ResponseClass {
            if res.status() == http::StatusCode::CONFLICT {
                return ResponseClass::Ready(Class::new(true, true, Delivery::Answered));
            }
            self.0.classify_response(res)
        }
        fn classify_error(&self, err: &(dyn Error + 'static)) -> Class {
            Classify::<http::Response<B>>::classify_error(&self.0, err)
        }
    }

    let upstream = FaultServer::start().await;
    upstream.set_default(Fault::status(409));
    let stack = steadfast::client::http()
        .classifier(ConflictsRetry(DefaultClassifier::new()))
        .breaker(|b| b.consecutive_failures(Some(3)))
        .build()
        .unwrap();
    let client = stack.hyper_client::<Full<Bytes>>();
    let req = || {
        http::Request::get(upstream.url("/"))
            .body(Full::default())
            .unwrap()
    };
    let res = client.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(upstream.hits(), 3, "409 retried: 3 attempts");
    // Three failures in a row: the breaker counted them as failures and opened.
    let err = client.oneshot(req()).await.unwrap_err();
    assert!(err.is::<steadfast::breaker::error::BreakerOpen>(), "{err}");
    assert_eq!(upstream.hits(), 3);
}

/// Two layers of one stack never write into one header (a hostile pass found a deadline
/// written over the correlation id, an attempt number over the deadline).
#[test]
fn layers_of_one_stack_cannot_share_a_header() {
    use http::HeaderName;
    let envoy = HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
    let id = HeaderName::from_static("x-correlation-id");
    let refused = [
        steadfast::client::http()
            .deadline_header(id.clone())
            .build()
            .unwrap_err(),
        steadfast::client::http()
            .deadline_header(envoy.clone())
            .retry(|r| r.attempt_header(Some(envoy.clone())))
            .build()
            .unwrap_err(),
        steadfast::client::http()
            .retry(|r| r.attempt_header(Some(id.clone())))
            .build()
            .unwrap_err(),
        steadfast::server::http()
            .deadline(|d| d.deadline_header(id.clone()))
            .build()
            .unwrap_err(),
        steadfast::server::http()
            .correlation(|c| c.header(HeaderName::from_static("x-trace-id")))
            .deadline(|d| d.deadline_header(HeaderName::from_static("x-trace-id")))
            .build()
            .unwrap_err(),
    ];
    for e in refused {
        let text = e.to_string();
        assert!(
            text.contains("x-correlation-id")
                || text.contains("x-envoy-expected-rq-timeout-ms")
                || text.contains("x-trace-id"),
            "{text}"
        );
    }
    // Distinct names are fine.
    assert!(
        steadfast::client::http()
            .deadline_header(envoy)
            .retry(|r| r.attempt_header(Some(HeaderName::from_static("x-attempt"))))
            .build()
            .is_ok()
    );
}
