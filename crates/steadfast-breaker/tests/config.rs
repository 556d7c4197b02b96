//! Configuration errors: every invalid setting refused, with a message that says what to change.

mod common;

use std::time::Duration;

use steadfast_breaker::CircuitBreakerLayer;

#[test]
fn configuration_errors_say_what_to_change() {
    use steadfast_breaker::error::InvalidBreakerConfig;
    let e = CircuitBreakerLayer::builder()
        .half_open_probes(0)
        .build()
        .unwrap_err();
    assert_eq!(e, InvalidBreakerConfig::Zero("half_open_probes"));
    assert_eq!(e.to_string(), "breaker half_open_probes must be at least 1");
    let e = CircuitBreakerLayer::builder()
        .count_window(10)
        .failure_rate(0)
        .build()
        .unwrap_err();
    assert_eq!(e.to_string(), "breaker failure_rate must be 1-100 %, got 0");
    let e = CircuitBreakerLayer::builder()
        .open_time(Duration::from_secs(60))
        .max_open_time(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert_eq!(e.to_string(), "breaker max_open_time must be >= open_time");
}

#[test]
fn every_invalid_setting_is_refused() {
    use steadfast_breaker::error::InvalidBreakerConfig;
    let b = CircuitBreakerLayer::builder;
    assert_eq!(
        b().consecutive_failures(Some(0)).build().unwrap_err(),
        InvalidBreakerConfig::Zero("consecutive_failures")
    );
    let e = b().half_open_probes(70_000).build().unwrap_err();
    assert_eq!(
        e.to_string(),
        "breaker half_open_probes must be 1-65535, got 70000",
        "probes must fit the probe word, and the message says so"
    );
    assert!(b().half_open_probes(65_535).build().is_ok());
    assert_eq!(
        b().count_window(0).build().unwrap_err(),
        InvalidBreakerConfig::Zero("count_window")
    );
    for (width, buckets) in [
        (Duration::from_secs(1), 0),
        (Duration::from_secs(1), 65),
        (Duration::ZERO, 10),
    ] {
        assert!(
            b().time_window(width, buckets).build().is_err(),
            "{width:?} × {buckets}"
        );
    }
    assert_eq!(
        b().time_window(Duration::from_secs(1), 65)
            .build()
            .unwrap_err()
            .to_string(),
        "breaker time_window buckets must be 1-64, got 65"
    );
    assert!(b().time_window(Duration::from_secs(1), 64).build().is_ok());
    assert_eq!(
        b().count_window(2_000_000).build().unwrap_err().to_string(),
        "breaker count_window must be 1-1048576 calls, got 2000000"
    );
    assert!(b().count_window(1 << 20).build().is_ok());
    assert_eq!(
        b().min_calls(0).build().unwrap_err(),
        InvalidBreakerConfig::Zero("min_calls")
    );
    assert_eq!(
        b().open_time(Duration::ZERO)
            .build()
            .unwrap_err()
            .to_string(),
        "breaker open_time must be at least 1ms, got 0ns"
    );
    assert!(b().open_time(Duration::from_millis(1)).build().is_ok());
    assert!(matches!(
        b().count_window(10)
            .slow_calls(Duration::ZERO, 50)
            .build()
            .unwrap_err(),
        InvalidBreakerConfig::TooShort {
            what: "slow_calls threshold",
            ..
        }
    ));
    // A rate rule without a window, or no rule at all, could never trip.
    for never in [
        b().failure_rate(50),
        b().slow_calls(Duration::from_secs(1), 50),
        b().consecutive_failures(None),
    ] {
        let e = never.build().unwrap_err();
        assert!(matches!(e, InvalidBreakerConfig::NeverTrips(_)), "{e}");
        assert!(e.to_string().starts_with("breaker could never trip: "));
    }
    assert_eq!(
        b().count_window(10).failure_rate(101).build().unwrap_err(),
        InvalidBreakerConfig::Rate("failure_rate", 101)
    );
    assert!(b().count_window(10).failure_rate(100).build().is_ok());
    assert_eq!(
        b().count_window(10)
            .slow_calls(Duration::from_secs(1), 0)
            .build()
            .unwrap_err(),
        InvalidBreakerConfig::Rate("slow_calls rate", 0)
    );
    assert_eq!(
        b().max_keys(0).build_per_authority().unwrap_err(),
        InvalidBreakerConfig::Zero("max_keys")
    );
    assert!(
        b().open_time(Duration::from_secs(5))
            .max_open_time(Duration::from_secs(5))
            .build()
            .is_ok()
    );
}

/// An open time near `Duration::MAX` with the jitter's largest factor used to panic in
/// `Duration::mul_f64` (found by a hostile pass with this seed); now it saturates.
#[tokio::test(start_paused = true)]
async fn an_open_time_of_duration_max_never_panics_whatever_the_jitter_draw() {
    use tower::{Layer, ServiceExt, service_fn};
    for seed in [0u64.wrapping_sub(0x9e37_79b9_7f4a_7c15), 0, 1, u64::MAX] {
        let layer = CircuitBreakerLayer::builder()
            .consecutive_failures(Some(1))
            .open_time(Duration::MAX)
            .max_open_time(Duration::MAX)
            .seed(seed)
            .build()
            .unwrap();
        let failing = service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder().status(500).body(()).unwrap(),
            )
        });
        let res = layer
            .layer(failing)
            .oneshot(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(res.status(), 500);
        assert_eq!(
            layer.handle().state(),
            steadfast_breaker::BreakerState::Open
        );
    }
}

/// Backpressure waits in `poll_ready`, before the request and its key: a per-key build
/// refuses it instead of dropping it silently.
#[test]
fn backpressure_is_refused_for_per_key_breakers() {
    use steadfast_breaker::error::InvalidBreakerConfig;
    let e = CircuitBreakerLayer::builder()
        .backpressure(true)
        .build_per_authority()
        .unwrap_err();
    assert_eq!(e, InvalidBreakerConfig::BackpressurePerKey);
    assert!(e.to_string().contains("turn it off"));
    assert!(
        CircuitBreakerLayer::builder()
            .backpressure(true)
            .build()
            .is_ok()
    );
}
