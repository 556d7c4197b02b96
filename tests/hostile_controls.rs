//! Regressions from a hostile pass over issue 21's controls through the facade and the presets.

use std::str::FromStr;
use std::time::Duration;

use steadfast::breaker::BreakerState;
use steadfast::common::GrpcCode;
use steadfast::correlation::{CorrelationId, SetCorrelationIdLayer};
use steadfast::retry::{Backoff, Jitter};
use tower::{ServiceBuilder, ServiceExt, service_fn};

/// The preset checks backoffs against the total with `worst_case_total`; with proportional
/// jitter and a huge backoff it panics instead of returning `BackoffsExceedTotal`.
#[test]
fn preset_with_a_huge_proportional_backoff_is_an_error_not_a_panic() {
    let r = std::panic::catch_unwind(|| {
        steadfast::client::http()
            .retry(|r| {
                r.backoff(
                    Backoff::new(Duration::MAX, Duration::MAX).jitter(Jitter::Proportional(20)),
                )
            })
            .total_timeout(Duration::from_secs(10))
            .build()
            .is_err()
    });
    assert_eq!(r.ok(), Some(true), "build panicked");
}

/// The preset's breakers are per authority: `initial_state` / `start_open_for` given through
/// `.breaker(..)` are silently dropped.
#[tokio::test(start_paused = true)]
async fn preset_breakers_start_in_the_initial_state() {
    let stack = steadfast::client::http()
        .breaker(|b| b.initial_state(BreakerState::ForcedOpen))
        .build()
        .unwrap();
    let key = Some("orders:8080".parse().unwrap());
    assert_eq!(
        stack.breakers().handle(&key).state(),
        BreakerState::ForcedOpen
    );
}

#[test]
fn grpc_code_from_str() {
    let ok = |s: &str| GrpcCode::from_str(s).ok();
    assert_eq!(ok("unavailable"), Some(GrpcCode::Unavailable));
    assert_eq!(ok("UnAvAiLaBlE"), Some(GrpcCode::Unavailable));
    assert_eq!(ok(" 14 "), Some(GrpcCode::Unavailable));
    assert_eq!(ok("17"), None);
    assert_eq!(ok("-1"), None);
    assert_eq!(ok("99999999999"), None);
    assert_eq!(ok("1 4"), None);
    assert_eq!(ok(""), None);
    // Lenient forms (reported, not asserted as bugs):
    eprintln!(
        "+14 -> {:?}; -0 -> {:?}; 0014 -> {:?}; NBSP14 -> {:?}; 'deadline exceeded' -> {:?}",
        ok("+14"),
        ok("-0"),
        ok("0014"),
        ok("\u{a0}14"),
        ok("deadline exceeded")
    );
    assert!(GrpcCode::try_from(16).is_ok());
    assert!(GrpcCode::try_from(17).is_err());
    assert!(GrpcCode::try_from(i32::MIN).is_err());
}

#[test]
fn correlation_id_boundaries() {
    assert!(CorrelationId::from_str(&"a".repeat(128)).is_ok());
    assert!(CorrelationId::from_str(&"a".repeat(129)).is_err());
    assert!(CorrelationId::from_str("é").is_err());
    assert!(CorrelationId::from_str("a\u{7f}").is_err());
    assert!(CorrelationId::from_str("a\tb").is_err());
    assert!(CorrelationId::try_from(String::new()).is_err());
    let e = CorrelationId::from_str("evil\r\nX: y")
        .unwrap_err()
        .to_string();
    assert!(!e.contains("evil"), "{e}");
    assert_eq!(
        CorrelationId::from_uuid(u128::MAX).as_str(),
        "ffffffff-ffff-ffff-ffff-ffffffffffff"
    );
    assert_eq!(
        CorrelationId::from_uuid_bytes([0; 16]).as_str(),
        "00000000-0000-0000-0000-000000000000"
    );
    let mut b = [0u8; 16];
    b[0] = 0x12;
    b[15] = 0x34;
    assert_eq!(
        CorrelationId::from_uuid_bytes(b).as_str(),
        "12000000-0000-0000-0000-000000000034"
    );
}

/// With the echo off the response still carries the id as an extension; when the handler
/// set its own id header, the header (kept: "a value the handler set on its own response
/// wins") and the extension disagree.
#[tokio::test]
async fn response_extension_with_echo_off_and_with_a_handler_header() {
    let svc = ServiceBuilder::new()
        .layer(
            SetCorrelationIdLayer::builder()
                .echo(false)
                .build()
                .unwrap(),
        )
        .service(service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        }));
    let req = http::Request::builder()
        .header("x-correlation-id", "order-7")
        .body(())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert!(res.headers().get("x-correlation-id").is_none());
    assert_eq!(
        res.extensions().get::<CorrelationId>().unwrap().as_str(),
        "order-7"
    );

    let svc = ServiceBuilder::new()
        .layer(SetCorrelationIdLayer::new())
        .service(service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header("x-correlation-id", "handler-1")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap(),
            )
        }));
    let req = http::Request::builder()
        .header("x-correlation-id", "order-7")
        .body(())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    eprintln!(
        "header {:?} vs extension {:?}",
        res.headers().get("x-correlation-id"),
        res.extensions().get::<CorrelationId>()
    );

    // A handler error: no response, nothing to carry.
    let svc = ServiceBuilder::new()
        .layer(SetCorrelationIdLayer::new())
        .service(service_fn(|_req: http::Request<()>| async {
            Err::<http::Response<http_body_util::Empty<bytes::Bytes>>, _>(std::io::Error::other(
                "boom",
            ))
        }));
    assert!(svc.oneshot(http::Request::new(())).await.is_err());
}
