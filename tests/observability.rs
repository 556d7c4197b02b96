//! Every layer variant reports the metrics and events `docs/observability.md` lists: one
//! admission path for the plain, per-key and answering breakers (the answering one used to
//! skip `steadfast_breaker_rejected_total`), the retry's counters, the timeout's three sides.
#![cfg(feature = "metrics")]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use steadfast::breaker::CircuitBreakerLayer;
use steadfast::retry::{Backoff, Jitter, RetryLayer};
use steadfast::timeout::{SetDeadlineLayer, TimeoutLayer};
use tower::{Layer, Service, ServiceExt, service_fn};

/// Counts per metric name and label set, e.g. `steadfast_breaker_rejected_total{}`.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<BTreeMap<String, f64>>>);

impl Seen {
    fn get(&self, name: &str) -> f64 {
        self.0.lock().unwrap().get(name).copied().unwrap_or(0.0)
    }
    fn take(&self) -> BTreeMap<String, f64> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

struct Handle {
    key: String,
    seen: Seen,
}

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        *self
            .seen
            .0
            .lock()
            .unwrap()
            .entry(self.key.clone())
            .or_default() += value as f64;
    }
    fn absolute(&self, _: u64) {}
}

impl HistogramFn for Handle {
    fn record(&self, _: f64) {
        *self
            .seen
            .0
            .lock()
            .unwrap()
            .entry(self.key.clone())
            .or_default() += 1.0;
    }
}

/// A gauge keeps its last value.
impl GaugeFn for Handle {
    fn increment(&self, value: f64) {
        *self
            .seen
            .0
            .lock()
            .unwrap()
            .entry(self.key.clone())
            .or_default() += value;
    }
    fn decrement(&self, value: f64) {
        GaugeFn::increment(self, -value);
    }
    fn set(&self, value: f64) {
        self.seen.0.lock().unwrap().insert(self.key.clone(), value);
    }
}

struct Rec(Seen);

impl Rec {
    /// Notes a description as `describe:<kind>:<name>:<unit>`; its help must say something.
    fn described(&self, kind: &str, name: KeyName, unit: Option<Unit>, help: SharedString) {
        assert!(help.len() > 20, "{}: {help}", name.as_str());
        let unit = unit.map_or("none", |u| u.as_str());
        self.0
            .0
            .lock()
            .unwrap()
            .insert(format!("describe:{kind}:{}:{unit}", name.as_str()), 1.0);
    }

    fn handle(&self, key: &Key) -> Arc<Handle> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        Arc::new(Handle {
            key: format!("{}{{{}}}", key.name(), labels.join(",")),
            seen: self.0.clone(),
        })
    }
}

impl Recorder for Rec {
    fn describe_counter(&self, name: KeyName, unit: Option<Unit>, help: SharedString) {
        self.described("counter", name, unit, help);
    }
    fn describe_gauge(&self, name: KeyName, unit: Option<Unit>, help: SharedString) {
        self.described("gauge", name, unit, help);
    }
    fn describe_histogram(&self, name: KeyName, unit: Option<Unit>, help: SharedString) {
        self.described("histogram", name, unit, help);
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.handle(key))
    }
}

/// Runs `f` on a paused current-thread runtime with the recorder installed.
fn recorded<F: Future<Output = ()>>(f: impl FnOnce() -> F) -> Seen {
    let seen = Seen::default();
    let rec = Rec(seen.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&rec, || rt.block_on(f()));
    seen
}

fn status(code: u16) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .body(Full::default())
        .unwrap()
}

fn failing()
-> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone {
    service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(status(503)) })
}

fn get() -> Request<()> {
    Request::get("http://upstream.test/").body(()).unwrap()
}

#[test]
fn every_breaker_variant_counts_transitions_and_rejections() {
    let layer = || {
        CircuitBreakerLayer::builder()
            .consecutive_failures(Some(1))
            .build()
            .unwrap()
    };
    // Plain.
    let seen = recorded(|| async {
        let mut svc = layer().layer(failing());
        let _ = svc.ready().await.unwrap().call(get()).await;
        let e = svc.ready().await.unwrap().call(get()).await.unwrap_err();
        assert!(e.is::<steadfast::breaker::error::BreakerOpen>());
    });
    let plain = "breaker=default,upstream=default";
    assert_eq!(
        seen.get(&format!(
            "steadfast_breaker_transitions_total{{{plain},from=closed,to=open,reason=consecutive_failures}}"
        )),
        1.0
    );
    assert_eq!(
        seen.get(&format!("steadfast_breaker_rejected_total{{{plain}}}")),
        1.0,
        "plain"
    );
    // One call reached the upstream and failed; the rejected one is not a call.
    assert_eq!(
        seen.get(&format!(
            "steadfast_breaker_call_duration_seconds{{{plain},outcome=failure}}"
        )),
        1.0
    );
    assert_eq!(
        seen.get(&format!(
            "steadfast_breaker_call_duration_seconds{{{plain},outcome=success}}"
        )),
        0.0
    );
    // The state gauge: one series per state, 1 for the one in force.
    assert_eq!(
        seen.get(&format!("steadfast_breaker_state{{{plain},state=open}}")),
        1.0
    );
    assert_eq!(
        seen.0
            .lock()
            .unwrap()
            .get(&format!("steadfast_breaker_state{{{plain},state=closed}}")),
        Some(&0.0),
        "set to 1 when made, to 0 when left"
    );

    // Per key.
    let seen = recorded(|| async {
        let keyed = CircuitBreakerLayer::builder()
            .name("gateway")
            .consecutive_failures(Some(1))
            .build_per_authority()
            .unwrap();
        let mut svc = keyed.layer(failing());
        let _ = svc.ready().await.unwrap().call(get()).await;
        let e = svc.ready().await.unwrap().call(get()).await.unwrap_err();
        assert!(e.is::<steadfast::breaker::error::BreakerOpen>());
    });
    let keyed = "breaker=gateway,upstream=upstream.test";
    assert_eq!(
        seen.get(&format!(
            "steadfast_breaker_transitions_total{{{keyed},from=closed,to=open,reason=consecutive_failures}}"
        )),
        1.0,
        "{:#?}",
        seen.take()
    );
    assert_eq!(
        seen.get(&format!("steadfast_breaker_rejected_total{{{keyed}}}")),
        1.0,
        "per key"
    );
    assert_eq!(
        seen.get(&format!("steadfast_breaker_state{{{keyed},state=open}}")),
        1.0
    );

    // Answering: the rejection is a 503 response, and it is counted all the same.
    let seen = recorded(|| async {
        let mut svc = layer().answering().layer(failing());
        let _ = svc.ready().await.unwrap().call(get()).await;
        let res = svc.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(res.status(), 503);
        assert!(
            res.headers().contains_key("retry-after"),
            "answered by the breaker"
        );
    });
    assert_eq!(
        seen.get(&format!(
            "steadfast_breaker_transitions_total{{{plain},from=closed,to=open,reason=consecutive_failures}}"
        )),
        1.0
    );
    assert_eq!(
        seen.get(&format!("steadfast_breaker_rejected_total{{{plain}}}")),
        1.0,
        "answering"
    );
}

/// Shed answers (`x-envoy-overloaded`) are timed under their own outcome, and move nothing.
#[test]
fn a_breaker_times_shed_answers_under_their_own_outcome() {
    let seen = recorded(|| async {
        let mut svc = CircuitBreakerLayer::builder()
            .consecutive_failures(Some(1))
            .build()
            .unwrap()
            .layer(service_fn(|_req: Request<()>| async {
                let mut res = status(503);
                res.headers_mut()
                    .insert("x-envoy-overloaded", "true".parse().unwrap());
                Ok::<_, Infallible>(res)
            }));
        for _ in 0..3 {
            let res = svc.ready().await.unwrap().call(get()).await.unwrap();
            assert_eq!(res.status(), 503);
        }
    });
    let plain = "breaker=default,upstream=default";
    for (outcome, n) in [("shed", 3.0), ("failure", 0.0), ("success", 0.0)] {
        assert_eq!(
            seen.get(&format!(
                "steadfast_breaker_call_duration_seconds{{{plain},outcome={outcome}}}"
            )),
            n,
            "{outcome}"
        );
    }
    assert_eq!(
        seen.get(&format!(
            "steadfast_breaker_transitions_total{{{plain},from=closed,to=open,reason=consecutive_failures}}"
        )),
        0.0
    );
}

#[test]
fn the_retry_counts_attempts_waits_and_why_it_gave_up() {
    let seen = recorded(|| async {
        let retry = RetryLayer::builder()
            .name("checkout")
            .backoff(
                Backoff::new(Duration::from_millis(100), Duration::from_secs(1))
                    .jitter(Jitter::None),
            )
            .build()
            .unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let up = service_fn(
            move |_req: Request<steadfast::retry::ReplayBody<Full<Bytes>>>| {
                let first = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                async move {
                    let mut res = status(503);
                    if first {
                        // The server asks for a 1 s wait: a wait like any backoff.
                        res.headers_mut()
                            .insert("retry-after", http::HeaderValue::from_static("1"));
                    }
                    Ok::<_, Infallible>(res)
                }
            },
        );
        let req = Request::get("http://upstream.test/")
            .body(Full::<Bytes>::default())
            .unwrap();
        let res = retry.layer(up).oneshot(req).await.unwrap();
        assert_eq!(res.status(), 503);
    });
    let all = seen.take();
    assert_eq!(
        all.get("steadfast_retry_attempts_total{retry=checkout}"),
        Some(&2.0),
        "{all:?}"
    );
    for source in ["server_hint", "backoff"] {
        assert_eq!(
            all.get(&format!(
                "steadfast_retry_backoff_seconds{{retry=checkout,source={source}}}"
            )),
            Some(&1.0),
            "{all:?}"
        );
    }
    assert_eq!(
        all.get("steadfast_retry_gave_up_total{retry=checkout,reason=attempts_exhausted}"),
        Some(&1.0),
        "{all:?}"
    );
    // The budget starts with its floor's worth for one window (10/s × 10 s); two retries
    // took a token each.
    let tokens = all["steadfast_retry_budget_tokens{retry=checkout}"];
    assert!((97.0..99.0).contains(&tokens), "{tokens}");
}

#[test]
fn every_timeout_side_counts_what_fired() {
    let seen = recorded(|| async {
        // Client, head.
        let slow = service_fn(|_req: Request<()>| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        });
        let e = TimeoutLayer::new(Duration::from_secs(1))
            .layer(slow)
            .oneshot(get())
            .await
            .unwrap_err();
        assert!(e.is::<steadfast::timeout::error::Elapsed>());
        // Client, body.
        let trickle = service_fn(|_req: Request<()>| async {
            let frames = futures_util::stream::once(async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"x")))
            });
            Ok::<_, Infallible>(Response::new(StreamBody::new(Box::pin(frames))))
        });
        let res = TimeoutLayer::builder()
            .limit(Duration::from_secs(1))
            .covering_body()
            .build()
            .unwrap()
            .layer(trickle)
            .oneshot(get())
            .await
            .unwrap();
        assert!(res.into_body().collect().await.is_err());
        // Server.
        let handler = service_fn(|_req: Request<()>| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        });
        let res = SetDeadlineLayer::new(Duration::from_secs(1))
            .layer(handler)
            .oneshot(get())
            .await
            .unwrap();
        assert_eq!(res.status(), 504);
    });
    let all = seen.take();
    for side in ["client", "client_body", "server"] {
        assert_eq!(
            all.get(&format!("steadfast_timeout_elapsed_total{{side={side}}}")),
            Some(&1.0),
            "{side}: {all:?}"
        );
    }
}

#[test]
fn the_balancer_counts_ejections_and_reports_each_endpoints_load_per_interval() {
    use steadfast::balance::BalanceLayer;

    let seen = recorded(|| async {
        let bad = "10.0.0.1:80";
        let up = service_fn(move |req: Request<()>| async move {
            let to = req.uri().authority().unwrap().to_string();
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok::<_, Infallible>(status(if to == bad { 503 } else { 200 }))
        });
        let mut svc = BalanceLayer::builder()
            .endpoints([bad, "10.0.0.2:80"])
            .seed(5)
            .build()
            .unwrap()
            .layer(up);
        // Beyond one interval (10 s): the gauges are set when the next one starts.
        for _ in 0..6000 {
            svc.ready().await.unwrap().call(get()).await.unwrap();
        }
    });
    let all = seen.take();
    let ejected = |ep: &str| {
        all.get(&format!(
            "steadfast_balance_endpoint_ejected{{endpoint={ep}}}"
        ))
    };
    assert_eq!(ejected("10.0.0.1:80"), Some(&1.0), "{all:#?}");
    assert_eq!(ejected("10.0.0.2:80"), Some(&0.0), "{all:#?}");
    assert_eq!(
        all.get(
            "steadfast_balance_ejections_total{endpoint=10.0.0.1:80,reason=consecutive_failures}"
        ),
        Some(&1.0),
        "{all:#?}"
    );
    let latency = all["steadfast_balance_endpoint_latency_seconds{endpoint=10.0.0.2:80}"];
    assert!((0.0019..0.0301).contains(&latency), "{latency}");
    assert_eq!(
        all.get("steadfast_balance_endpoint_in_flight{endpoint=10.0.0.2:80}"),
        Some(&0.0)
    );
}

/// Every metric `docs/observability.md` lists is described (help text, and seconds as the
/// unit of every `_seconds` metric), and nothing else is.
#[test]
fn every_documented_metric_is_described_with_its_kind_and_unit() {
    let seen = recorded(|| async { steadfast::describe_metrics() });
    let described: BTreeMap<String, (String, String)> = seen
        .take()
        .into_keys()
        .filter_map(|k| {
            let mut parts = k.strip_prefix("describe:")?.split(':');
            let (kind, name, unit) = (parts.next()?, parts.next()?, parts.next()?);
            Some((name.to_owned(), (kind.to_owned(), unit.to_owned())))
        })
        .collect();
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/observability.md"
    ))
    .unwrap();
    let documented: BTreeMap<String, String> = docs
        .lines()
        .filter_map(|line| {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let name = cells
                .next()?
                .strip_prefix("`steadfast_")?
                .strip_suffix('`')?;
            let kind = cells.next()?.split([',', ' ', ':']).next()?.to_owned();
            Some((format!("steadfast_{name}"), kind))
        })
        .collect();
    assert_eq!(
        described.keys().collect::<Vec<_>>(),
        documented.keys().collect::<Vec<_>>()
    );
    for (name, (kind, unit)) in &described {
        assert_eq!(kind, &documented[name], "{name}");
        let want = if name.ends_with("_seconds") {
            "seconds"
        } else {
            "count"
        };
        assert_eq!(unit, want, "{name}");
    }
}

/// A concurrency limit counts its refusals by name and reports an adaptive limit's moves; the
/// throttle counts its local refusals.
#[test]
fn limits_and_the_throttle_count_their_refusals() {
    use std::time::Duration;
    use steadfast::limit::{Aimd, ConcurrencyLimitLayer, ThrottleLayer};
    let seen = recorded(|| async {
        let fixed = ConcurrencyLimitLayer::builder()
            .max(1)
            .name("orders")
            .build()
            .unwrap();
        let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<Full<Bytes>>>();
        let mut svc = fixed.layer(mock);
        let held = svc.ready().await.unwrap().call(get());
        for _ in 0..2 {
            assert!(svc.ready().await.unwrap().call(get()).await.is_err());
        }
        drop(held);
        drop(handle.next_request().await);

        let adaptive = ConcurrencyLimitLayer::builder()
            .aimd(Aimd {
                initial: 10,
                ..Aimd::default()
            })
            .sample_window(Duration::ZERO, 1)
            .name("users")
            .build()
            .unwrap();
        adaptive.layer(failing()).oneshot(get()).await.unwrap();

        let throttle = ThrottleLayer::builder()
            .min_requests(1)
            .max_rejection(1.0)
            .seed(3)
            .build()
            .unwrap();
        let svc = throttle.layer(failing());
        for _ in 0..20 {
            let _ = svc.clone().oneshot(get()).await;
        }
    });
    let all = seen.take();
    assert_eq!(
        all.get("steadfast_limit_rejected_total{limit=orders}"),
        Some(&2.0),
        "{all:?}"
    );
    assert_eq!(
        all.get("steadfast_limit_current{limit=users}"),
        Some(&9.0),
        "10 × 0.9 after a 503: {all:?}"
    );
    assert!(
        all.get("steadfast_limit_throttled_total{}")
            .is_some_and(|n| *n >= 10.0),
        "{all:?}"
    );
}

/// A hedge layer counts the hedges it sent, the calls a hedge answered, and the hedges its
/// share of extra load refused.
#[test]
fn the_hedge_counts_what_it_sent_won_and_was_refused() {
    use std::time::Duration;
    use steadfast::retry::{HedgeDelay, HedgeLayer, ReplayBody};
    let seen = recorded(|| async {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let slow_first = tower::service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            // Attempts alternate: a second, then 5 ms.
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                let took = if n % 2 == 1 { 5 } else { 1000 };
                tokio::time::sleep(Duration::from_millis(took)).await;
                Ok::<_, std::convert::Infallible>(status(200))
            }
        });
        let layer = HedgeLayer::builder()
            .delay(HedgeDelay::Fixed(Duration::from_millis(20)))
            .max_extra_load(0.5)
            .name("orders")
            .build()
            .unwrap();
        let svc = layer.layer(slow_first);
        // Half a hedge per call: the first call's hedge is refused (half a token), the second
        // call is fast, the third's hedge is paid for and answers.
        for _ in 0..3 {
            let req = Request::get("/").body(Full::<Bytes>::default()).unwrap();
            svc.clone().oneshot(req).await.unwrap();
        }
    });
    let all = seen.take();
    for name in ["sent", "won"] {
        assert_eq!(
            all.get(&format!("steadfast_hedge_{name}_total{{hedge=orders}}")),
            Some(&1.0),
            "{name}: {all:?}"
        );
    }
    assert!(
        all.get("steadfast_hedge_budget_exhausted_total{hedge=orders}")
            .is_some_and(|n| *n >= 1.0),
        "{all:?}"
    );
}
