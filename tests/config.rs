//! No configuration value, however absurd, panics: random configurations of every builder
//! and preset either build or return a typed error, and whatever builds is then driven
//! through a failing upstream without panicking — the client preset through a real hyper
//! client against a real server answering 503 (with and without `Retry-After`), the layers
//! alone through an in-process upstream that fails. Paused time, so thirty-year waits pass
//! at once; every call is bounded.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use proptest::prelude::*;
use steadfast::breaker::{CircuitBreakerBuilder, CircuitBreakerLayer};
use steadfast::retry::{Backoff, BudgetConfig, Jitter, RetryBuilder, RetryLayer};
use steadfast::timeout::TimeoutLayer;
use steadfast_testkit::{Fault, FaultServer};
use tower::{Layer, ServiceExt, service_fn};

/// Durations a hostile or careless caller writes: zero, one tick, ordinary values, thirty
/// years, `Duration::MAX`, and anything in between.
fn duration() -> BoxedStrategy<Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_millis(1)),
        Just(Duration::from_millis(100)),
        Just(Duration::from_secs(1)),
        Just(Duration::from_secs(30)),
        Just(Duration::from_secs(86_400 * 365 * 100)),
        Just(Duration::from_secs(u64::MAX / 4)),
        Just(Duration::MAX),
        (0u64..20_000).prop_map(Duration::from_millis),
    ]
    .boxed()
}

fn count() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(2),
        Just(5),
        Just(40),
        Just(65_535),
        Just(65_536),
        Just(1 << 20),
        Just(u32::MAX),
        0u32..200,
    ]
}

/// Attempts for configurations that are driven: large enough to retry, small enough that a
/// budget-less policy with zero backoff still ends.
fn attempts() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(1), Just(2), Just(3), Just(5)]
}

fn ratio() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(-1.0),
        Just(0.0),
        Just(0.1),
        Just(1.0),
        Just(1000.0),
        Just(1e12),
        Just(f64::NAN),
        Just(f64::INFINITY),
    ]
}

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
        Just(Jitter::None),
    ]
}

/// A setting left at its default most of the time, so that a fair share of the random
/// configurations is valid and gets driven, and any setting can still be absurd.
fn maybe<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Option<T>> {
    prop_oneof![5 => Just(None), 1 => s.prop_map(Some)].boxed()
}

#[derive(Clone, Debug)]
struct RetryCfg {
    attempts: Option<u32>,
    backoff: Option<(Duration, Duration, Jitter)>,
    max_hint: Option<Duration>,
    replay_cap: Option<usize>,
    budget: Option<Option<(f64, u32, Duration)>>,
}

fn retry_cfg() -> BoxedStrategy<RetryCfg> {
    (
        maybe(attempts()),
        maybe((duration(), duration(), jitter())),
        maybe(duration()),
        maybe(prop_oneof![
            Just(0usize),
            Just(1),
            Just(65_536),
            Just(usize::MAX)
        ]),
        maybe(prop::option::of((ratio(), count(), duration()))),
    )
        .prop_map(
            |(attempts, backoff, max_hint, replay_cap, budget)| RetryCfg {
                attempts,
                backoff,
                max_hint,
                replay_cap,
                budget,
            },
        )
        .boxed()
}

fn apply_retry(mut p: RetryBuilder, c: &RetryCfg) -> RetryBuilder {
    p = p.seed(3);
    if let Some(n) = c.attempts {
        p = p.max_attempts(n);
    }
    if let Some((base, cap, jitter)) = c.backoff {
        p = p.backoff(Backoff::new(base, cap).jitter(jitter));
    }
    if let Some(d) = c.max_hint {
        p = p.max_server_delay(d);
    }
    if let Some(n) = c.replay_cap {
        p = p.replay_cap(n);
    }
    if let Some(b) = c.budget {
        p = p.budget(b.map(|(ratio, min_per_sec, window)| BudgetConfig {
            ratio,
            min_per_sec,
            window,
        }));
    }
    p
}

#[derive(Clone, Debug)]
struct BreakerCfg {
    consecutive: Option<Option<u32>>,
    window: Option<(bool, u32, Duration)>,
    failure_rate: Option<u8>,
    slow: Option<(Duration, u8)>,
    min_calls: Option<u32>,
    open: Option<Duration>,
    max_open: Option<Duration>,
    jitter: Option<u8>,
    probes: Option<u32>,
    max_keys: Option<usize>,
    idle: Option<Duration>,
}

fn breaker_cfg() -> BoxedStrategy<BreakerCfg> {
    (
        (
            maybe(prop::option::of(count())),
            maybe((
                any::<bool>(),
                prop_oneof![Just(0u32), Just(1), Just(5), Just(64), Just(65), Just(100)],
                duration(),
            )),
            maybe(any::<u8>()),
            maybe((duration(), any::<u8>())),
            maybe(count()),
        ),
        (
            maybe(duration()),
            maybe(duration()),
            maybe(any::<u8>()),
            maybe(count()),
            maybe(prop_oneof![
                Just(0usize),
                Just(1),
                Just(16),
                Just(usize::MAX)
            ]),
            maybe(duration()),
        ),
    )
        .prop_map(
            |(
                (consecutive, window, failure_rate, slow, min_calls),
                (open, max_open, jitter, probes, max_keys, idle),
            )| BreakerCfg {
                consecutive,
                window,
                failure_rate,
                slow,
                min_calls,
                open,
                max_open,
                jitter,
                probes,
                max_keys,
                idle,
            },
        )
        .boxed()
}

fn apply_breaker(mut b: CircuitBreakerBuilder, c: &BreakerCfg) -> CircuitBreakerBuilder {
    b = b.seed(5);
    if let Some(n) = c.consecutive {
        b = b.consecutive_failures(n);
    }
    match c.window {
        Some((true, size, _)) => b = b.count_window(size),
        Some((false, buckets, width)) => b = b.time_window(width, buckets),
        None => {}
    }
    if let Some(r) = c.failure_rate {
        b = b.failure_rate(r);
    }
    if let Some((t, r)) = c.slow {
        b = b.slow_calls(t, r);
    }
    if let Some(n) = c.min_calls {
        b = b.min_calls(n);
    }
    if let Some(d) = c.open {
        b = b.open_time(d);
    }
    if let Some(d) = c.max_open {
        b = b.max_open_time(d);
    }
    if let Some(p) = c.jitter {
        b = b.jitter_percent(p);
    }
    if let Some(n) = c.probes {
        b = b.half_open_probes(n);
    }
    if let Some(n) = c.max_keys {
        b = b.max_keys(n);
    }
    if let Some(d) = c.idle {
        b = b.idle_eviction(d);
    }
    b
}

fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// An in-process upstream that always fails with 503 and `Retry-After: 1`.
fn failing<B>() -> impl tower::Service<
    Request<B>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|_req: Request<B>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(503)
                .header("retry-after", "1")
                .body(Full::default())
                .unwrap(),
        )
    })
}

fn put() -> Request<Full<Bytes>> {
    Request::put("http://upstream.test/x")
        .body(Full::new(Bytes::from_static(b"body")))
        .unwrap()
}

/// Bounds a driven call in virtual time (a hundred years of it): the point is that nothing
/// panics, not what the call returns.
async fn bounded<F: Future>(f: F) {
    let _ = tokio::time::timeout(Duration::from_secs(86_400 * 365 * 100), f).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn retry_policies_build_or_refuse_and_never_panic(c in retry_cfg()) {
        let Ok(layer) = apply_retry(RetryLayer::builder(), &c).build() else {
            return Ok(());
        };
        paused().block_on(async {
            for _ in 0..3 {
                bounded(layer.layer(failing()).oneshot(put())).await;
            }
        });
    }

    #[test]
    fn breakers_build_or_refuse_and_never_panic(c in breaker_cfg()) {
        let b = apply_breaker(CircuitBreakerLayer::builder(), &c);
        let single = b.clone().build();
        let keyed = b.build_per_authority();
        prop_assert_eq!(single.is_ok(), keyed.is_ok(), "both shapes accept the same settings");
        let (Ok(single), Ok(keyed)) = (single, keyed) else {
            return Ok(());
        };
        paused().block_on(async {
            for i in 0..12u64 {
                bounded(single.layer(failing()).oneshot(put())).await;
                bounded(keyed.layer(failing()).oneshot(put())).await;
                tokio::time::advance(Duration::from_millis(i * 997)).await;
            }
        });
    }

    #[test]
    fn timeouts_never_panic(limit in duration(), cover in any::<bool>(), own in any::<bool>()) {
        let layer = TimeoutLayer::builder().limit(limit).cover_ready(cover).propagate_own(own).build().unwrap();
        paused().block_on(async {
            bounded(layer.layer(failing()).oneshot(put())).await;
            let slow = service_fn(|_req: Request<Full<Bytes>>| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok::<_, Infallible>(Response::new(()))
            });
            bounded(layer.layer(slow).oneshot(put())).await;
        });
    }

    #[test]
    fn server_presets_build_or_refuse_and_never_panic(limit in duration(), inbound in duration()) {
        let Ok(layer) = steadfast::server::http().timeout(limit).build() else {
            prop_assert!(limit.is_zero(), "only a zero timeout is refused");
            return Ok(());
        };
        paused().block_on(async {
            let handler = service_fn(|_req: Request<Full<Bytes>>| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
            });
            let mut req = put();
            req.headers_mut().insert(
                "x-request-timeout-ms",
                inbound.as_millis().min(u128::from(u64::MAX)).to_string().parse().unwrap(),
            );
            bounded(layer.layer(handler).oneshot(req)).await;
        });
    }
}

proptest! {
    // Each case starts a real server and client: fewer cases, the same ranges.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn client_presets_build_or_refuse_and_never_panic_over_hyper(
        total in maybe(duration()),
        attempt in maybe(duration()),
        r in retry_cfg(),
        b in breaker_cfg(),
        retry_after in any::<bool>(),
    ) {
        let mut preset = steadfast::client::http();
        if let Some(t) = total {
            preset = preset.total_timeout(t);
        }
        if let Some(t) = attempt {
            preset = preset.attempt_timeout(t);
        }
        let built = preset
            .retry(|p| apply_retry(p, &r))
            .breaker(|p| apply_breaker(p, &b))
            .build();
        let Ok(layer) = built else {
            return Ok(());
        };
        paused().block_on(async {
            let server = FaultServer::start().await;
            server.set_default(if retry_after {
                Fault::status_with(503, "retry-after", "1")
            } else {
                Fault::status(503)
            });
            let transport = support::transport::<Full<Bytes>>();
            for _ in 0..4 {
                let req = Request::put(server.url("/orders/1"))
                    .body(Full::new(Bytes::from_static(b"body")))
                    .unwrap();
                bounded(layer.layer(transport.clone()).oneshot(req)).await;
            }
        });
    }
}

/// A policy of u32::MAX attempts with a zero (or one-nanosecond) backoff: the preset checks
/// its backoffs against the total in a handful of steps (it used to loop four billion times,
/// 18 s in release). Counted in steps, not timed: the check's loop is bounded by 32.
#[test]
fn a_preset_with_four_billion_attempts_builds_at_once() {
    for base in [Duration::ZERO, Duration::from_nanos(1)] {
        let built = steadfast::client::http()
            .retry(|r| r.max_attempts(u32::MAX).backoff(Backoff::new(base, base)))
            .build();
        // 4 billion × 1 ns = 4.3 s of waits: under the 10 s default total.
        assert!(built.is_ok(), "{base:?}: {:?}", built.err());
    }
    // 4 billion × 1 µs = 71 min: past the total, a typed error.
    let e = steadfast::client::http()
        .retry(|r| {
            r.max_attempts(u32::MAX).backoff(Backoff::new(
                Duration::from_micros(1),
                Duration::from_micros(1),
            ))
        })
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            steadfast::InvalidPresetConfig::BackoffsExceedTotal { .. }
        ),
        "{e}"
    );
}

/// The report's three panics, pinned.
#[test]
fn the_reported_configurations_do_not_panic() {
    paused().block_on(async {
        let server = FaultServer::start().await;
        server.set_default(Fault::status(503));
        let transport = support::transport::<Full<Bytes>>();
        let get = || support::get_from(&server);
        // total_timeout(Duration::MAX) through the preset.
        let preset = steadfast::client::http()
            .total_timeout(Duration::MAX)
            .build()
            .unwrap();
        let res = preset
            .layer(transport.clone())
            .oneshot(get())
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
        // Backoff::new(MAX, MAX) without jitter: a thirty-year wait, then the next attempt.
        let retry = RetryLayer::builder()
            .backoff(Backoff::new(Duration::MAX, Duration::MAX).jitter(Jitter::None))
            .max_attempts(2)
            .build()
            .unwrap();
        let res = retry.layer(transport.clone()).oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(server.hits(), 3 + 2);
    });
    // A preset whose backoffs overflow any sum: a typed error, not "overflow in iter::sum".
    let e = steadfast::client::http()
        .retry(|p| {
            p.max_attempts(40).backoff(Backoff::new(
                Duration::from_secs(u64::MAX / 4),
                Duration::MAX,
            ))
        })
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            steadfast::InvalidPresetConfig::BackoffsExceedTotal { .. }
        ),
        "{e}"
    );
}
