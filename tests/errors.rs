//! Every error the client stack produces through real sockets, turned into the HTTP response
//! and the gRPC status it means (`steadfast::errors`), and served by a real axum handler.

mod support;

use std::time::Duration;

use axum::{Router, routing::get};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use steadfast::common::BoxError;
use steadfast::errors::{Failure, StackError, grpc_response, grpc_status, http_response};
use steadfast_testkit::{Fault, FaultServer};
use tower::{Layer, ServiceExt};

fn client() -> steadfast::client::HttpClientLayer {
    steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .retry(|r| r.max_attempts(1))
        .breaker(|b| b.consecutive_failures(Some(1)).jitter_percent(0))
        .build()
        .unwrap()
}

async fn call(stack: &steadfast::client::HttpClientLayer, url: &str) -> BoxError {
    let req = http::Request::get(url)
        .body(Full::<Bytes>::default())
        .unwrap();
    stack
        .layer(support::transport::<Full<Bytes>>())
        .oneshot(req)
        .await
        .map(|res| res.status())
        .expect_err("the call fails")
}

/// A port nothing listens on.
fn closed_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(start_paused = true)]
async fn each_failure_of_the_stack_is_the_answer_it_means() {
    let server = FaultServer::start().await;
    let stack = client();

    // A hanging upstream: the attempt times out.
    server.script([Fault::status(200).after(Duration::from_secs(60))]);
    let timeout = call(&stack, &server.url("/")).await;
    assert_eq!(Failure::of(&*timeout), Failure::Timeout);

    // The breaker tripped on that failure: the next call is refused, 30 s to the probe.
    let open = call(&stack, &server.url("/")).await;
    assert_eq!(
        Failure::of(&*open),
        Failure::BreakerOpen {
            retry_after: Some(Duration::from_secs(30))
        }
    );

    // Nothing listens: a transport error.
    let refused = call(&stack, &format!("http://{}/", closed_port())).await;
    assert_eq!(Failure::of(&*refused), Failure::Upstream);

    // A balanced stack whose service has no endpoint.
    let empty = steadfast::client::http()
        .balance(|b| b.endpoints(Vec::<String>::new()))
        .build()
        .unwrap();
    let none = call(&empty, "http://orders/").await;
    assert_eq!(Failure::of(&*none), Failure::NoEndpoint);

    // Any other refusal by policy.
    #[derive(Debug)]
    struct Shed;
    impl std::fmt::Display for Shed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("shed at 10.1.2.3")
        }
    }
    impl std::error::Error for Shed {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&steadfast::common::PolicyRejected::INSTANCE)
        }
    }
    let shed: BoxError = Box::new(Shed);

    // Only a refusal for load says it was shed (`x-envoy-overloaded`): an open breaker, a
    // missing endpoint, a timeout or a broken upstream are failures the caller should count.
    let expect = [
        (&timeout, 504, None, "4", None, false),
        (&open, 503, Some("30"), "14", Some("30000"), false),
        (&refused, 502, None, "14", None, false),
        (&none, 503, None, "14", None, false),
        (&shed, 503, None, "14", None, true),
    ];
    for (err, status, retry_after, grpc, pushback, marked) in expect {
        let res = http_response::<Full<Bytes>>(&**err);
        assert_eq!(res.status(), status, "{err}");
        assert_eq!(
            res.headers().get("x-envoy-overloaded").is_some(),
            marked,
            "{err}"
        );
        assert_eq!(
            grpc_response::<()>(&**err)
                .headers()
                .get("x-envoy-overloaded")
                .is_some(),
            marked,
            "{err}"
        );
        assert_eq!(
            grpc_status(&**err)
                .metadata()
                .get("x-envoy-overloaded")
                .is_some(),
            marked,
            "{err}"
        );
        assert_eq!(
            res.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            retry_after,
            "{err}"
        );
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert!(
            !String::from_utf8_lossy(&body).contains("10.1.2.3")
                && !String::from_utf8_lossy(&body).contains("127.0.0.1"),
            "the error's own text stays inside: {body:?}"
        );

        let g = grpc_response::<()>(&**err);
        assert_eq!(g.status(), 200);
        assert_eq!(g.headers()["grpc-status"], grpc, "{err}");
        assert_eq!(
            g.headers()
                .get("grpc-retry-pushback-ms")
                .map(|v| v.to_str().unwrap()),
            pushback
        );
        let s = grpc_status(&**err);
        assert_eq!(s.code() as i32, grpc.parse::<i32>().unwrap(), "{err}");
        assert_eq!(
            s.metadata()
                .get("grpc-retry-pushback-ms")
                .map(|v| v.to_str().unwrap()),
            pushback
        );
    }
}

/// A gateway handler that returns the stack's error with `?`: the caller gets 502 / 503 +
/// Retry-After / 504 through a real axum server.
#[tokio::test(start_paused = true)]
async fn an_axum_handler_answers_with_the_stacks_error() {
    let upstream = FaultServer::start().await;
    upstream.set_default(Fault::status(200).after(Duration::from_secs(60)));
    let stack = client();
    let client = stack.layer(support::transport::<Full<Bytes>>());
    let target = upstream.url("/");
    let app = Router::new().route(
        "/",
        get(move || {
            let (client, target) = (client.clone(), target.clone());
            async move {
                let req = http::Request::get(target).body(Full::<Bytes>::default())?;
                let res = client.oneshot(req).await?;
                Ok::<_, StackError>(res.status().to_string())
            }
        }),
    );
    let gateway = support::serve_axum(app).await;
    let plain = support::http_client();
    let first = plain.request(support::get(gateway, "/")).await.unwrap();
    assert_eq!(first.status(), 504);
    let second = plain.request(support::get(gateway, "/")).await.unwrap();
    assert_eq!(second.status(), 503);
    assert_eq!(second.headers()["retry-after"], "30");
}

/// A balanced call refused by an endpoint's breaker, with no retry left to take it elsewhere,
/// reaches the caller as the balancer's `Rerouted`: it means what the refusal means (503 and
/// Retry-After), not a bad gateway.
#[tokio::test(start_paused = true)]
async fn a_refusal_no_retry_could_reroute_is_an_open_breaker() {
    let (a, b) = (FaultServer::start().await, FaultServer::start().await);
    a.set_default(Fault::status(503));
    b.set_default(Fault::status(503));
    let stack = steadfast::client::http()
        .retry(|r| r.max_attempts(1))
        .breaker(|b| b.consecutive_failures(Some(1)).jitter_percent(0))
        .balance(|bal| {
            bal.endpoints([a.addr().to_string(), b.addr().to_string()])
                .seed(3)
        })
        .build()
        .unwrap();
    let client = stack.hyper_client::<Full<Bytes>>();
    let mut rerouted = None;
    for _ in 0..20 {
        let req = http::Request::get("http://orders/")
            .body(Full::<Bytes>::default())
            .unwrap();
        if let Err(e) = client.clone().oneshot(req).await {
            if e.is::<steadfast::balance::error::Rerouted>() {
                rerouted = Some(e);
                break;
            }
        }
    }
    let err = rerouted.expect("a refusal surfaced as Rerouted");
    assert!(
        matches!(Failure::of(&*err), Failure::BreakerOpen { .. }),
        "{err}"
    );
    let res = http_response::<Full<Bytes>>(&*err);
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
}
