//! Hostile tests of the telemetry `docs/observability.md` promises: metrics (through a local
//! recorder on a paused current-thread runtime) and tracing events/spans (through a capturing
//! subscriber), driven over real loopback sockets with the presets.
#![cfg(feature = "metrics")]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use steadfast_testkit::{Fault, FaultServer};
use tower::{Layer, Service, ServiceExt};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

// ------------------------------------------------------------------------------------------
// Metrics capture
// ------------------------------------------------------------------------------------------

/// Value per `name{labels}`: counters summed, gauges last value, histograms the count of
/// observations (values kept apart).
#[derive(Clone, Default)]
struct Metrics {
    vals: Arc<Mutex<BTreeMap<String, f64>>>,
    hist: Arc<Mutex<BTreeMap<String, Vec<f64>>>>,
}

impl Metrics {
    fn get(&self, k: &str) -> f64 {
        self.vals.lock().unwrap().get(k).copied().unwrap_or(0.0)
    }
    fn opt(&self, k: &str) -> Option<f64> {
        self.vals.lock().unwrap().get(k).copied()
    }
    fn all(&self) -> BTreeMap<String, f64> {
        self.vals.lock().unwrap().clone()
    }
    fn keys_with(&self, prefix: &str) -> Vec<String> {
        self.vals
            .lock()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }
}

struct H {
    key: String,
    m: Metrics,
}

impl CounterFn for H {
    fn increment(&self, v: u64) {
        *self
            .m
            .vals
            .lock()
            .unwrap()
            .entry(self.key.clone())
            .or_default() += v as f64;
    }
    fn absolute(&self, v: u64) {
        self.m
            .vals
            .lock()
            .unwrap()
            .insert(self.key.clone(), v as f64);
    }
}
impl GaugeFn for H {
    fn increment(&self, v: f64) {
        *self
            .m
            .vals
            .lock()
            .unwrap()
            .entry(self.key.clone())
            .or_default() += v;
    }
    fn decrement(&self, v: f64) {
        GaugeFn::increment(self, -v);
    }
    fn set(&self, v: f64) {
        self.m.vals.lock().unwrap().insert(self.key.clone(), v);
    }
}
impl HistogramFn for H {
    fn record(&self, v: f64) {
        *self
            .m
            .vals
            .lock()
            .unwrap()
            .entry(self.key.clone())
            .or_default() += 1.0;
        self.m
            .hist
            .lock()
            .unwrap()
            .entry(self.key.clone())
            .or_default()
            .push(v);
    }
}

struct Rec(Metrics);
impl Rec {
    fn h(&self, key: &Key) -> Arc<H> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        Arc::new(H {
            key: format!("{}{{{}}}", key.name(), labels.join(",")),
            m: self.0.clone(),
        })
    }
}
impl Recorder for Rec {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.h(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.h(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.h(key))
    }
}

// ------------------------------------------------------------------------------------------
// Tracing capture
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct Ev {
    target: String,
    level: String,
    /// The `message` field, else the callsite name.
    msg: String,
    /// The callsite name (`name:` of the event macro).
    name: String,
    fields: BTreeMap<String, String>,
    /// Names of the spans around it, innermost first.
    scope: Vec<String>,
}

#[derive(Clone, Debug, Default)]
struct Sp {
    name: String,
    target: String,
    fields: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Cap {
    events: Arc<Mutex<Vec<Ev>>>,
    spans: Arc<Mutex<Vec<(tracing::span::Id, Sp)>>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);
impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().to_owned(), format!("{v:?}"));
    }
    fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
        self.0.insert(f.name().to_owned(), v.to_owned());
    }
}

impl<S> tracing_subscriber::Layer<S> for Cap
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        let mut sp = Sp {
            name: attrs.metadata().name().to_owned(),
            target: attrs.metadata().target().to_owned(),
            ..Sp::default()
        };
        attrs.record(&mut Fields(&mut sp.fields));
        self.spans.lock().unwrap().push((id.clone(), sp));
    }
    fn on_record(&self, id: &tracing::span::Id, v: &tracing::span::Record<'_>, _: Context<'_, S>) {
        let mut all = self.spans.lock().unwrap();
        if let Some((_, sp)) = all.iter_mut().rev().find(|(i, _)| i == id) {
            v.record(&mut Fields(&mut sp.fields));
        }
    }
    fn on_event(&self, e: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        e.record(&mut Fields(&mut fields));
        let msg = fields
            .remove("message")
            .unwrap_or_else(|| e.metadata().name().to_owned());
        let scope = ctx
            .event_scope(e)
            .map(|s| s.map(|sp| sp.name().to_owned()).collect())
            .unwrap_or_default();
        self.events.lock().unwrap().push(Ev {
            target: e.metadata().target().to_owned(),
            level: e.metadata().level().to_string(),
            msg,
            name: e.metadata().name().to_owned(),
            fields,
            scope,
        });
    }
}

impl Cap {
    fn events(&self, msg: &str) -> Vec<Ev> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| (e.msg == msg || e.name == msg) && e.target.starts_with("steadfast"))
            .cloned()
            .collect()
    }
    fn all_events(&self) -> Vec<Ev> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.target.starts_with("steadfast"))
            .cloned()
            .collect()
    }
    fn spans(&self, name: &str) -> Vec<Sp> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.name == name)
            .map(|(_, s)| s.clone())
            .collect()
    }
    /// Every string any steadfast span or event carries (names, fields), for leak checks.
    fn all_text(&self) -> String {
        let mut out = String::new();
        for e in self
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.target.starts_with("steadfast"))
        {
            out += &format!("{} {} {:?}\n", e.target, e.msg, e.fields);
        }
        for (_, s) in self.spans.lock().unwrap().iter() {
            out += &format!("{} {} {:?}\n", s.target, s.name, s.fields);
        }
        out
    }
}

/// Runs `f` on a paused current-thread runtime with the recorder and the subscriber installed,
/// bounded by a generous guard.
fn run<F: Future<Output = ()>>(f: impl FnOnce(Cap) -> F) -> (Metrics, Cap) {
    run_with(Metrics::default(), f)
}

fn run_with<F: Future<Output = ()>>(m: Metrics, f: impl FnOnce(Cap) -> F) -> (Metrics, Cap) {
    let cap = Cap::default();
    let rec = Rec(m.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let _g = tracing::subscriber::set_default(tracing_subscriber::registry().with(cap.clone()));
    let c2 = cap.clone();
    metrics::with_local_recorder(&rec, || {
        rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(3600), f(c2))
                .await
                .expect("test hung (guard timeout)")
        })
    });
    (m, cap)
}

async fn guard<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(600), f)
        .await
        .expect("call hung")
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

type Client = steadfast::client::HttpClient<support::Transport<Full<Bytes>>>;

fn client(b: steadfast::client::ClientBuilder) -> (steadfast::client::HttpClientLayer, Client) {
    let layer = b.build().unwrap();
    let c = layer.layer(support::transport::<Full<Bytes>>());
    (layer, c)
}

fn closed_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// ------------------------------------------------------------------------------------------
// Retry counts
// ------------------------------------------------------------------------------------------

/// 2 × 503 then 200, through two clones of one client: attempts_total counts retries sent
/// (attempts after the first), one `retry.attempt` per retry scheduled, one span per attempt.
#[test]
fn retries_then_success_are_counted_once_across_clones() {
    let (m, cap) = run(|_| async {
        let up = FaultServer::start().await;
        let (_l, c) = client(steadfast::client::http().name("orders"));
        for _ in 0..2 {
            up.script([Fault::status(503), Fault::status(503)]);
            let res = guard(c.clone().oneshot(get(&up.url("/x")))).await.unwrap();
            assert_eq!(res.status(), 200);
        }
        assert_eq!(up.hits(), 6);
    });
    let all = m.all();
    assert_eq!(
        m.get("steadfast_retry_attempts_total{retry=orders}"),
        4.0,
        "{all:#?}"
    );
    assert_eq!(
        m.get("steadfast_retry_backoff_seconds{retry=orders,source=backoff}"),
        4.0,
        "{all:#?}"
    );
    assert!(
        m.keys_with("steadfast_retry_gave_up_total").is_empty(),
        "{all:#?}"
    );
    let attempts = cap.events("retry.attempt");
    assert_eq!(attempts.len(), 4, "{attempts:#?}");
    for (i, e) in attempts.iter().enumerate() {
        assert_eq!(e.target, "steadfast::retry");
        assert_eq!(e.level, "DEBUG");
        assert_eq!(e.fields["retry"], "orders", "{e:?}");
        assert_eq!(e.fields["attempt"], ["2", "3"][i % 2], "{e:?}");
        assert_eq!(e.fields["status"], "503", "{e:?}");
        assert_eq!(e.fields["error"], "false", "{e:?}");
        assert!(e.fields.contains_key("delay_ms"), "{e:?}");
        assert!(e.fields.contains_key("budget_left"), "{e:?}");
    }
    let spans = cap.spans("attempt");
    assert_eq!(spans.len(), 6);
    let resend: Vec<_> = spans
        .iter()
        .map(|s| s.fields.get("http.request.resend_count").cloned())
        .collect();
    let one = [None, Some("1".to_owned()), Some("2".to_owned())];
    assert_eq!(resend, [one.clone(), one].concat());
    // The breaker timed each call it let through: 4 failures, 2 successes.
    let port_prefix = "steadfast_breaker_call_duration_seconds{breaker=orders,upstream=127.0.0.1:";
    let durs = m.keys_with(port_prefix);
    let fail: f64 = durs
        .iter()
        .filter(|k| k.ends_with("outcome=failure}"))
        .map(|k| m.get(k))
        .sum();
    let ok: f64 = durs
        .iter()
        .filter(|k| k.ends_with("outcome=success}"))
        .map(|k| m.get(k))
        .sum();
    assert_eq!((fail, ok), (4.0, 2.0), "{all:#?}");
}

/// Always 503: two retries, then `attempts_exhausted`, with `attempt` = the last one.
#[test]
fn attempts_exhausted_is_counted_once_with_the_last_attempt() {
    let (m, cap) = run(|_| async {
        let up = FaultServer::start().await;
        up.set_default(Fault::status(503));
        let (_l, c) = client(steadfast::client::http().name("ex"));
        let res = guard(c.oneshot(get(&up.url("/")))).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(up.hits(), 3);
    });
    let all = m.all();
    assert_eq!(
        m.get("steadfast_retry_attempts_total{retry=ex}"),
        2.0,
        "{all:#?}"
    );
    assert_eq!(
        m.get("steadfast_retry_gave_up_total{retry=ex,reason=attempts_exhausted}"),
        1.0,
        "{all:#?}"
    );
    let g = cap.events("retry.gave_up");
    assert_eq!(g.len(), 1, "{g:#?}");
    assert_eq!(g[0].fields["reason"], "attempts_exhausted");
    assert_eq!(g[0].fields["attempt"], "3");
    assert_eq!(g[0].fields["retry"], "ex");
    assert_eq!(g[0].target, "steadfast::retry");
    assert_eq!(g[0].level, "DEBUG");
    let spans = cap.spans("attempt");
    let codes: Vec<_> = spans
        .iter()
        .map(|s| {
            (
                s.fields.get("http.response.status_code").cloned(),
                s.fields.get("error.type").cloned(),
            )
        })
        .collect();
    assert_eq!(
        codes,
        vec![(Some("503".to_owned()), Some("503".to_owned())); 3]
    );
}

/// A POST that got a 503 is not retried: `not_idempotent`, no retry counted.
#[test]
fn not_idempotent_gives_up_without_counting_a_retry() {
    let (m, cap) = run(|_| async {
        let up = FaultServer::start().await;
        up.set_default(Fault::status(503));
        let (_l, c) = client(steadfast::client::http().name("np"));
        let req = Request::post(up.url("/")).body(Full::from("x")).unwrap();
        let res = guard(c.oneshot(req)).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(up.hits(), 1);
    });
    let all = m.all();
    assert_eq!(
        m.opt("steadfast_retry_attempts_total{retry=np}")
            .unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        m.get("steadfast_retry_gave_up_total{retry=np,reason=not_idempotent}"),
        1.0,
        "{all:#?}"
    );
    let g = cap.events("retry.gave_up");
    assert_eq!(g.len(), 1, "{g:#?}");
    assert_eq!(g[0].fields["reason"], "not_idempotent");
    assert_eq!(g[0].fields["attempt"], "1");
}

/// A PUT whose body is over the replay cap: `body_not_replayable`.
#[test]
fn body_over_replay_cap_gives_up_as_not_replayable() {
    let (m, cap) = run(|_| async {
        let up = FaultServer::start().await;
        up.set_default(Fault::status(503));
        let (_l, c) = client(
            steadfast::client::http()
                .name("rb")
                .retry(|r| r.replay_cap(16)),
        );
        let req = Request::put(up.url("/"))
            .body(Full::from(vec![b'x'; 1000]))
            .unwrap();
        let res = guard(c.oneshot(req)).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(up.hits(), 1);
    });
    let all = m.all();
    assert_eq!(
        m.get("steadfast_retry_gave_up_total{retry=rb,reason=body_not_replayable}"),
        1.0,
        "{all:#?}"
    );
    assert_eq!(
        cap.events("retry.gave_up")[0].fields["reason"],
        "body_not_replayable"
    );
}

/// A Retry-After longer than `max_server_delay`: `server_hint_over_cap`.
#[test]
fn server_hint_over_cap_is_the_reason() {
    let (m, cap) = run(|_| async {
        let up = FaultServer::start().await;
        up.set_default(Fault::status_with(503, "retry-after", "60"));
        let (_l, c) = client(
            steadfast::client::http()
                .name("hc")
                .retry(|r| r.max_server_delay(Duration::from_secs(2))),
        );
        let res = guard(c.oneshot(get(&up.url("/")))).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(up.hits(), 1);
    });
    let all = m.all();
    assert_eq!(
        m.get("steadfast_retry_gave_up_total{retry=hc,reason=server_hint_over_cap}"),
        1.0,
        "{all:#?}"
    );
    assert_eq!(
        cap.events("retry.gave_up")[0].fields["reason"],
        "server_hint_over_cap"
    );
}

/// A Retry-After that fits the cap but not the call's remaining time: `deadline`.
#[test]
fn server_hint_past_the_deadline_gives_up_as_deadline() {
    let (m, cap) = run(|_| async {
        let up = FaultServer::start().await;
        up.set_default(Fault::status_with(503, "retry-after", "20"));
        let (_l, c) = client(steadfast::client::http().name("dl"));
        let res = guard(c.oneshot(get(&up.url("/")))).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(up.hits(), 1);
    });
    let all = m.all();
    assert_eq!(
        m.get("steadfast_retry_gave_up_total{retry=dl,reason=deadline}"),
        1.0,
        "{all:#?}"
    );
    assert_eq!(cap.events("retry.gave_up")[0].fields["reason"], "deadline");
    // No wait was observed: none was taken.
    assert_eq!(
        m.get("steadfast_retry_backoff_seconds{retry=dl,source=server_hint}"),
        0.0,
        "{all:#?}"
    );
}

/// A service below the retry that is not ready again before the deadline. Through the
/// preset, whose total timeout owns the deadline, the call ends as a timeout and no retry is
/// counted (none was sent); through a retry layer under a deadline nothing above enforces,
/// the retry gives up with `not_ready_by_deadline` (observability.md).
#[test]
fn not_ready_by_deadline_is_the_reason() {
    use std::task::{Context as TCx, Poll};
    #[derive(Clone)]
    struct Gate<S> {
        inner: S,
        calls: Arc<std::sync::atomic::AtomicUsize>,
    }
    impl<S, R> Service<R> for Gate<S>
    where
        S: Service<R>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;
        fn poll_ready(&mut self, cx: &mut TCx<'_>) -> Poll<Result<(), S::Error>> {
            if self.calls.load(std::sync::atomic::Ordering::SeqCst) >= 1 {
                return Poll::Pending; // never ready again
            }
            self.inner.poll_ready(cx)
        }
        fn call(&mut self, r: R) -> S::Future {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.call(r)
        }
    }
    let (m, cap) = run(|_| async {
        let up = FaultServer::start().await;
        up.set_default(Fault::status(503));
        // The preset (total 10 s) over a transport that is never ready after its first call.
        let svc = steadfast::client::http()
            .name("nr")
            .build()
            .unwrap()
            .layer(Gate {
                inner: support::transport::<Full<Bytes>>(),
                calls: Default::default(),
            });
        let err = guard(svc.oneshot(get(&up.url("/")))).await.unwrap_err();
        assert!(
            err.downcast_ref::<steadfast::timeout::error::Elapsed>()
                .is_some(),
            "{err}"
        );
        // A retry layer alone, under a deadline of the caller's.
        let alone = steadfast::retry::RetryLayer::builder()
            .name("nr2")
            .build()
            .unwrap()
            .layer(Gate {
                inner: support::transport::<Full<Bytes>>(),
                calls: Default::default(),
            });
        let call = steadfast::common::Deadline::after(Duration::from_secs(2)).scope(ServiceExt::<
            Request<Full<Bytes>>,
        >::oneshot(
            alone,
            get(&up.url("/")),
        ));
        let err = guard(call).await.unwrap_err();
        assert!(
            err.downcast_ref::<steadfast::retry::error::NotReadyByDeadline>()
                .is_some(),
            "{err}"
        );
    });
    let all = m.all();
    assert_eq!(
        m.get("steadfast_timeout_elapsed_total{side=client}"),
        1.0,
        "{all:#?}"
    );
    for retry in ["nr", "nr2"] {
        assert_eq!(
            m.get(&format!("steadfast_retry_attempts_total{{retry={retry}}}")),
            0.0,
            "{retry}: no retry was sent: {all:#?}"
        );
    }
    let g = cap.events("retry.gave_up");
    assert_eq!(g.len(), 1, "events {g:#?} metrics {all:#?}");
    assert_eq!(g[0].fields["reason"], "not_ready_by_deadline", "{g:#?}");
    assert_eq!(g[0].fields["retry"], "nr2", "{g:#?}");
    assert_eq!(
        m.get("steadfast_retry_gave_up_total{retry=nr2,reason=not_ready_by_deadline}"),
        1.0,
        "{all:#?}"
    );
}

/// A refused connection: each attempt's span says `connect`, each retry event says `error`.
#[test]
fn refused_connections_are_counted_and_typed() {
    let (m, cap) = run(|_| async {
        let addr = closed_port();
        let (_l, c) = client(steadfast::client::http().name("rf"));
        guard(c.oneshot(get(&format!("http://{addr}/"))))
            .await
            .unwrap_err();
    });
    let all = m.all();
    let spans = cap.spans("attempt");
    assert_eq!(spans.len(), 3, "{spans:#?}");
    for s in &spans {
        assert_eq!(
            s.fields.get("error.type").map(String::as_str),
            Some("connect"),
            "{s:?}"
        );
        assert!(!s.fields.contains_key("http.response.status_code"), "{s:?}");
    }
    assert_eq!(
        m.get("steadfast_retry_attempts_total{retry=rf}"),
        2.0,
        "{all:#?}"
    );
    let ev = cap.events("retry.attempt");
    assert_eq!(ev.len(), 2);
    for e in &ev {
        assert_eq!(e.fields["error"], "true", "{e:?}");
        assert!(
            !e.fields.contains_key("status") || e.fields["status"] == "None",
            "{e:?}"
        );
    }
    assert_eq!(
        m.get("steadfast_retry_gave_up_total{retry=rf,reason=attempts_exhausted}"),
        1.0,
        "{all:#?}"
    );
}

/// Budget exhausted: a budget with no floor and no deposits refuses the first retry.
#[test]
fn budget_exhausted_is_counted_and_logged_at_info() {
    let (m, cap) = run(|_| async {
        let up = FaultServer::start().await;
        up.set_default(Fault::status(503));
        let (_l, c) = client(steadfast::client::http().name("bx").retry(|r| {
            r.budget(Some(steadfast::retry::BudgetConfig {
                ratio: 0.0,
                min_per_sec: 1,
                window: Duration::from_secs(1),
            }))
        }));
        let res = guard(c.oneshot(get(&up.url("/")))).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(up.hits(), 2, "one token: one retry");
    });
    let all = m.all();
    assert_eq!(
        m.get("steadfast_retry_budget_exhausted_total{retry=bx}"),
        1.0,
        "{all:#?}"
    );
    assert_eq!(
        m.get("steadfast_retry_attempts_total{retry=bx}"),
        1.0,
        "{all:#?}"
    );
    assert_eq!(
        m.opt("steadfast_retry_budget_tokens{retry=bx}")
            .map(|t| t < 1.0),
        Some(true),
        "{all:#?}"
    );
    let e = cap.events("retry.budget_exhausted");
    assert_eq!(e.len(), 1, "{:#?}", cap.all_events());
    assert_eq!(e[0].level, "INFO");
    assert_eq!(e[0].fields["retry"], "bx", "{e:?}");
    eprintln!(
        "budget_exhausted event: {e:?}; gave_up: {:?}",
        cap.events("retry.gave_up")
    );
}

// ------------------------------------------------------------------------------------------
// Breaker
// ------------------------------------------------------------------------------------------

/// Trip, reject, half-open, close: every transition has one counter increment and one event
/// with the documented fields; the state gauge has exactly one state at 1.
#[test]
fn breaker_lifecycle_metrics_and_events_agree() {
    let port = Arc::new(Mutex::new(0u16));
    let p2 = port.clone();
    let (m, cap) = run(|_| async move {
        let up = FaultServer::start().await;
        *p2.lock().unwrap() = up.addr().port();
        up.set_default(Fault::status(503));
        let (layer, c) = client(steadfast::client::http().name("gw").breaker(|b| {
            b.consecutive_failures(Some(2))
                .open_time(Duration::from_secs(5))
        }));
        // Call 1: two failures open the breaker; the third attempt is refused.
        let _ = guard(c.clone().oneshot(get(&up.url("/")))).await;
        assert_eq!(up.hits(), 2);
        // Call 2: refused at once (every attempt).
        let _ = guard(c.clone().oneshot(get(&up.url("/")))).await;
        assert_eq!(up.hits(), 2);
        // Past the open time, the upstream recovers: probe, then closed.
        up.set_default(Fault::status(200));
        tokio::time::advance(Duration::from_secs(60)).await;
        let res = guard(c.clone().oneshot(get(&up.url("/")))).await.unwrap();
        assert_eq!(res.status(), 200);
        let h = layer
            .breakers()
            .handle_for_uri(&up.url("/").parse().unwrap());
        assert_eq!(h.state(), steadfast::breaker::BreakerState::Closed);
    });
    let port = *port.lock().unwrap();
    let lab = format!("breaker=gw,upstream=127.0.0.1:{port}");
    let all = m.all();
    let t = |from: &str, to: &str, reason: &str| {
        m.get(&format!(
            "steadfast_breaker_transitions_total{{{lab},from={from},to={to},reason={reason}}}"
        ))
    };
    assert_eq!(t("closed", "open", "consecutive_failures"), 1.0, "{all:#?}");
    assert_eq!(t("open", "half_open", "open_time_elapsed"), 1.0, "{all:#?}");
    assert_eq!(
        t("half_open", "closed", "probes_succeeded"),
        1.0,
        "{all:#?}"
    );
    let transitions: f64 = m
        .keys_with("steadfast_breaker_transitions_total")
        .iter()
        .map(|k| m.get(k))
        .sum();
    assert_eq!(transitions, 3.0, "{all:#?}");
    let ev = cap.events("breaker transition");
    assert_eq!(ev.len(), 3, "{ev:#?}");
    for e in &ev {
        assert_eq!(e.target, "steadfast::breaker");
        assert_eq!(e.level, "INFO");
        assert_eq!(e.fields["breaker"], "gw", "{e:?}");
        assert_eq!(e.fields["upstream"], format!("127.0.0.1:{port}"), "{e:?}");
        for f in ["reason", "from", "to", "generation", "open_for_from_hint"] {
            assert!(e.fields.contains_key(f), "{f} missing: {e:?}");
        }
    }
    let ms: u64 = ev[0].fields["open_for_ms"].parse().unwrap();
    assert!((4000..=6000).contains(&ms), "{:?}", ev[0]);
    // Rejections: attempts the breaker refused = attempt spans that never reached the server.
    let spans = cap.spans("attempt");
    let refused = spans.len() as f64 - 3.0;
    assert_eq!(
        m.get(&format!("steadfast_breaker_rejected_total{{{lab}}}")),
        refused,
        "spans {} {all:#?}",
        spans.len()
    );
    assert_eq!(
        m.get(&format!(
            "steadfast_breaker_call_duration_seconds{{{lab},outcome=failure}}"
        )),
        2.0
    );
    assert_eq!(
        m.get(&format!(
            "steadfast_breaker_call_duration_seconds{{{lab},outcome=success}}"
        )),
        1.0
    );
    let states: Vec<(String, f64)> = m
        .keys_with("steadfast_breaker_state")
        .into_iter()
        .map(|k| {
            let v = m.get(&k);
            (k, v)
        })
        .collect();
    let ones: Vec<_> = states.iter().filter(|(_, v)| *v == 1.0).collect();
    assert_eq!(ones.len(), 1, "{states:#?}");
    assert!(ones[0].0.contains("state=closed"), "{states:#?}");
}

/// A flood of distinct authorities (the preset behind a proxy that forwards user-chosen hosts):
/// the per-key map stays within max_keys; an open breaker that is evicted and re-created for the
/// same upstream must not leave two states at 1 for one `{breaker, upstream}`.
#[test]
fn evicted_open_breaker_does_not_leave_a_stale_state_gauge() {
    let port = Arc::new(Mutex::new(0u16));
    let p2 = port.clone();
    let stale = Arc::new(Mutex::new((0usize, 0usize)));
    let stale2 = stale.clone();
    let kept_at_end = Arc::new(Mutex::new(false));
    let kept_at_end2 = kept_at_end.clone();
    let mm = Metrics::default();
    let (m, _cap) = run_with(mm.clone(), |_| async move {
        let m2 = mm;
        let up = FaultServer::start().await;
        *p2.lock().unwrap() = up.addr().port();
        up.set_default(Fault::status(503));
        let (layer, c) = client(
            steadfast::client::http()
                .name("fl")
                .retry(|r| r.max_attempts(2))
                .breaker(|b| {
                    b.consecutive_failures(Some(1))
                        .max_keys(16)
                        .idle_eviction(Duration::from_secs(60))
                }),
        );
        let _ = guard(c.clone().oneshot(get(&up.url("/")))).await;
        let h = layer
            .breakers()
            .handle_for_uri(&up.url("/").parse().unwrap());
        assert_eq!(h.state(), steadfast::breaker::BreakerState::Open);
        drop(h);
        tokio::time::advance(Duration::from_secs(120)).await;
        // 400 distinct refused authorities: 127.0.0.N:port (nothing listens on them).
        let closed = closed_port().port();
        for i in 0..400u32 {
            let host = format!("127.0.{}.{}", 1 + i / 250, 2 + i % 250);
            let _ = guard(c.clone().oneshot(get(&format!("http://{host}:{closed}/")))).await;
        }
        assert!(
            layer.breakers().len() <= 16 * 2,
            "{}",
            layer.breakers().len()
        );
        let kept = layer.breakers().len();
        let open_series = m2
            .vals
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, v)| {
                k.starts_with("steadfast_breaker_state{breaker=fl,")
                    && k.ends_with("state=open}")
                    && **v == 1.0
            })
            .count();
        eprintln!("breakers kept {kept}; state=open series at 1: {open_series}");
        *stale2.lock().unwrap() = (kept, open_series);
        let up_key: http::uri::Authority = up.addr().to_string().parse().unwrap();
        let still = layer.breakers().keys().contains(&Some(up_key));
        eprintln!(
            "original key still kept: {still}; keys {}",
            layer.breakers().len()
        );
        // Back to the original upstream, now healthy, once the flood's breakers have gone
        // idle (evictable): the map keeps a new breaker for it.
        tokio::time::advance(Duration::from_secs(120)).await;
        up.set_default(Fault::status(200));
        let res = guard(c.clone().oneshot(get(&up.url("/")))).await.unwrap();
        assert_eq!(res.status(), 200);
        let up_key: http::uri::Authority = up.addr().to_string().parse().unwrap();
        *kept_at_end2.lock().unwrap() = layer.breakers().keys().contains(&Some(up_key));
    });
    let port = *port.lock().unwrap();
    let all = m.all();
    let series = all.keys().filter(|k| k.starts_with("steadfast_")).count();
    eprintln!("distinct steadfast series after 401 authorities: {series}");
    let mine: Vec<_> = all
        .iter()
        .filter(|(k, _)| {
            k.starts_with(&format!(
                "steadfast_breaker_state{{breaker=fl,upstream=127.0.0.1:{port},"
            ))
        })
        .collect();
    let ones: Vec<_> = mine.iter().filter(|(_, v)| **v == 1.0).collect();
    let (kept, open_series) = *stale.lock().unwrap();
    assert!(
        open_series <= kept,
        "{open_series} breakers read open in the state gauge, {kept} breakers exist"
    );
    // One state in force for one upstream while the map keeps its breaker; none when the
    // last call went through a breaker the map did not keep (it is no upstream's).
    assert!(
        *kept_at_end.lock().unwrap(),
        "the flood's idle breakers made room for the original upstream's"
    );
    let expected = usize::from(*kept_at_end.lock().unwrap());
    assert_eq!(
        ones.len(),
        expected,
        "states in force for one upstream: {mine:#?}"
    );
}

// ------------------------------------------------------------------------------------------
// Secrets and hostile bytes
// ------------------------------------------------------------------------------------------

/// URL userinfo, Authorization, x-consul-token, a query token: none may reach a label, an
/// event or a span field; `url.full` follows OTel (no credentials).
#[test]
fn credentials_never_reach_labels_events_or_spans() {
    let port = Arc::new(Mutex::new(0u16));
    let port2 = port.clone();
    let (m, cap) = run(|_| async move {
        let up = FaultServer::start().await;
        up.set_default(Fault::status(503));
        let (_l, c) = client(steadfast::client::http().name("sec"));
        *port2.lock().unwrap() = up.addr().port();
        let url = format!(
            "http://alice:S3CR3TPW@127.0.0.1:{}/p?token=QSECRET&sig=SIGSECRET",
            up.addr().port()
        );
        let req = Request::get(url)
            .header("authorization", "Bearer AUTHSECRET")
            .header("x-consul-token", "CONSULSECRET")
            .body(Full::default())
            .unwrap();
        let _ = guard(c.oneshot(req)).await;
        assert!(up.hits() >= 1);
    });
    let text = cap.all_text();
    let labels = format!("{:?}", m.all());
    for secret in [
        "S3CR3TPW",
        "alice",
        "AUTHSECRET",
        "CONSULSECRET",
        "SIGSECRET",
    ] {
        assert!(!labels.contains(secret), "{secret} in a label: {labels}");
        assert!(!text.contains(secret), "{secret} in telemetry:\n{text}");
    }
    // Userinfo and the convention's signature parameters redacted; other query parameters
    // kept, as OpenTelemetry's `url.full` asks (documented in observability.md).
    let spans = cap.spans("attempt");
    let port = *port.lock().unwrap();
    assert_eq!(
        spans[0].fields.get("url.full").map(String::as_str),
        Some(
            format!("http://REDACTED:REDACTED@127.0.0.1:{port}/p?token=QSECRET&sig=REDACTED")
                .as_str()
        ),
        "{spans:#?}"
    );
}

/// Same, through a per-authority concurrency limit: its label is `<name>/<key>` without userinfo.
#[test]
fn per_key_limit_label_has_no_userinfo() {
    use steadfast::limit::ConcurrencyLimitLayer;
    let port = Arc::new(Mutex::new(0u16));
    let p2 = port.clone();
    let (m, cap) = run(|_| async move {
        let up = FaultServer::start().await;
        *p2.lock().unwrap() = up.addr().port();
        up.set_default(Fault::Hang);
        let lim = ConcurrencyLimitLayer::builder()
            .max(1)
            .name("lim")
            .per_authority()
            .build()
            .unwrap();
        let svc = lim.layer(support::http_client());
        let url = format!("http://bob:LIMSECRET@127.0.0.1:{}/", up.addr().port());
        let held = tokio::spawn(svc.clone().oneshot(get(&url)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..3 {
            assert!(guard(svc.clone().oneshot(get(&url))).await.is_err());
        }
        held.abort();
    });
    let port = *port.lock().unwrap();
    let all = m.all();
    assert_eq!(
        m.get(&format!(
            "steadfast_limit_rejected_total{{limit=lim/127.0.0.1:{port}}}"
        )),
        3.0,
        "{all:#?}"
    );
    assert!(!format!("{all:?}").contains("LIMSECRET"));
    assert!(!cap.all_text().contains("LIMSECRET"), "{}", cap.all_text());
}

// ------------------------------------------------------------------------------------------
// Timeouts
// ------------------------------------------------------------------------------------------

/// Every attempt that timed out is one `elapsed` event and one `side=client` increment, and
/// its span says `timeout`.
#[test]
fn attempt_timeouts_are_counted_once_each() {
    let (m, cap) = run(|_| async {
        let up = FaultServer::start().await;
        up.set_default(Fault::Hang);
        let (_l, c) = client(
            steadfast::client::http()
                .name("to")
                .attempt_timeout(Duration::from_secs(1))
                .total_timeout(Duration::from_secs(10)),
        );
        let e = guard(c.oneshot(get(&up.url("/")))).await.unwrap_err();
        eprintln!("error: {e}");
    });
    let all = m.all();
    let spans = cap.spans("attempt");
    let timed_out = spans
        .iter()
        .filter(|s| s.fields.get("error.type").map(String::as_str) == Some("timeout"))
        .count();
    assert_eq!(timed_out, spans.len(), "{spans:#?}");
    let ev = cap.events("elapsed");
    assert_eq!(ev.len(), spans.len(), "{ev:#?}");
    for e in &ev {
        assert_eq!(e.target, "steadfast::timeout");
        assert_eq!(e.fields["limit_ms"], "1000", "{e:?}");
        assert_eq!(e.fields["inherited"], "false", "{e:?}");
    }
    assert_eq!(
        m.get("steadfast_timeout_elapsed_total{side=client}"),
        spans.len() as f64,
        "{all:#?}"
    );
}

/// The whole call's deadline fires while an attempt hangs: one `elapsed` for the total.
#[test]
fn total_timeout_is_one_elapsed_with_its_own_limit() {
    let (m, cap) = run(|_| async {
        let up = FaultServer::start().await;
        up.set_default(Fault::Hang);
        let (_l, c) = client(
            steadfast::client::http()
                .name("tt")
                .attempt_timeout(Duration::from_secs(2))
                .total_timeout(Duration::from_secs(3))
                .retry(|r| {
                    r.backoff(
                        steadfast::retry::Backoff::new(
                            Duration::from_millis(100),
                            Duration::from_millis(200),
                        )
                        .jitter(steadfast::retry::Jitter::None),
                    )
                }),
        );
        let _ = guard(c.oneshot(get(&up.url("/")))).await.unwrap_err();
    });
    let all = m.all();
    let ev = cap.events("elapsed");
    let limits: Vec<_> = ev.iter().map(|e| e.fields["limit_ms"].clone()).collect();
    eprintln!("elapsed limits {limits:?} {all:#?}");
    assert_eq!(
        m.get("steadfast_timeout_elapsed_total{side=client}"),
        ev.len() as f64,
        "{all:#?}"
    );
    eprintln!("{ev:#?}");
}

// ------------------------------------------------------------------------------------------
// Balancer
// ------------------------------------------------------------------------------------------

/// An endpoint whose breaker is forced open: calls picking it are rerouted. Reroutes are
/// `retry.rerouted` events (same attempt number), breaker rejections of that endpoint, and
/// not retries (`attempts_total`), not ejections (no `balance.ejected`, no `refused` reason).
#[test]
fn reroutes_are_not_retries_nor_ejections() {
    let (m, cap) = run(|_| async {
        let a = FaultServer::start().await;
        let b = FaultServer::start().await;
        let (aa, ba) = (a.addr().to_string(), b.addr().to_string());
        let (layer, c) = client(
            steadfast::client::http()
                .name("rr")
                .balance(|bb| bb.endpoints([aa.clone(), ba.clone()]).seed(11)),
        );
        let ka: http::uri::Authority = aa.parse().unwrap();
        layer.breakers().handle(&Some(ka)).force_open();
        for _ in 0..40 {
            let res = guard(c.clone().oneshot(get("http://svc/x"))).await.unwrap();
            assert_eq!(res.status(), 200);
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert_eq!(a.hits(), 0);
        assert_eq!(b.hits(), 40);
        eprintln!("A = {aa}");
    });
    let all = m.all();
    let rerouted = cap.events("retry.rerouted");
    let rejected: f64 = m
        .keys_with("steadfast_breaker_rejected_total{breaker=rr,")
        .iter()
        .map(|k| m.get(k))
        .sum();
    eprintln!("rerouted {} rejected {rejected}", rerouted.len());
    assert!(
        !rerouted.is_empty(),
        "the forced-open endpoint was never picked? {all:#?}"
    );
    assert_eq!(rerouted.len() as f64, rejected, "{all:#?}");
    for e in &rerouted {
        assert_eq!(e.fields["attempt"], "1", "{e:?}");
        assert_eq!(e.fields["retry"], "rr", "{e:?}");
        assert_eq!(e.level, "DEBUG");
    }
    assert!(cap.events("retry.attempt").is_empty());
    assert!(
        cap.events("balance.ejected").is_empty(),
        "{:#?}",
        cap.events("balance.ejected")
    );
    assert!(
        m.keys_with("steadfast_balance_ejections_total").is_empty(),
        "{all:#?}"
    );
    // Spans: one per attempt; a rerouted attempt is not a resend.
    let spans = cap.spans("attempt");
    let resent: Vec<_> = spans
        .iter()
        .filter(|s| s.fields.contains_key("http.request.resend_count"))
        .collect();
    eprintln!(
        "attempt spans {} (resend_count set on {})",
        spans.len(),
        resent.len()
    );
    for s in &spans {
        eprintln!("  {:?}", s.fields);
    }
    assert!(resent.is_empty(), "{resent:#?}");
    // Every attempt span reached B and was a 200, or it carries an error.type.
    for s in &spans {
        assert!(
            s.fields
                .get("http.response.status_code")
                .map(String::as_str)
                == Some("200")
                || s.fields.contains_key("error.type"),
            "a span with neither status nor error: {s:?}"
        );
    }
    assert_eq!(
        m.opt("steadfast_retry_attempts_total{retry=rr}")
            .unwrap_or(0.0),
        0.0,
        "a reroute is not a retry: {all:#?}"
    );
    assert_eq!(
        m.opt("steadfast_retry_rerouted_total{retry=rr}")
            .unwrap_or(0.0),
        rerouted.len() as f64,
        "every reroute counted once: {all:#?}"
    );
}

/// A failing endpoint is ejected: one WARN `balance.ejected` with the documented fields per
/// ejection, one counter increment, one `balance.returned` when its time runs out.
#[test]
fn ejections_and_returns_are_counted_once() {
    let ep = Arc::new(Mutex::new(String::new()));
    let ep2 = ep.clone();
    let (m, cap) = run(|_| async move {
        let a = FaultServer::start().await;
        let b = FaultServer::start().await;
        a.set_default(Fault::status(503));
        let (aa, ba) = (a.addr().to_string(), b.addr().to_string());
        *ep2.lock().unwrap() = aa.clone();
        let (_layer, c) = client(
            steadfast::client::http()
                .name("ej")
                .breaker(|b| b.consecutive_failures(Some(50)))
                .balance(|bb| {
                    // Round-robin: A takes every other call whatever the latencies a
                    // real socket measures on paused time (which the load-aware pick
                    // follows).
                    bb.endpoints([aa.clone(), ba.clone()])
                        .pick(steadfast::balance::Pick::RoundRobin)
                        .seed(5)
                        .consecutive_failures(Some(3))
                        .ejection_time(Duration::from_secs(30), Duration::from_secs(300))
                }),
        );
        // Calls 3 s apart: past the 2 s failure penalty, so A keeps taking its turn.
        for _ in 0..30 {
            let _ = guard(c.clone().oneshot(get("http://svc/x"))).await.unwrap();
            tokio::time::advance(Duration::from_secs(3)).await;
        }
        tokio::time::advance(Duration::from_secs(400)).await;
        // The ejection ran out: the next calls see it back.
        for _ in 0..10 {
            let _ = guard(c.clone().oneshot(get("http://svc/x"))).await.unwrap();
            tokio::time::advance(Duration::from_millis(100)).await;
        }
    });
    let aa = ep.lock().unwrap().clone();
    let all = m.all();
    let ej = cap.events("balance.ejected");
    assert!(!ej.is_empty(), "{all:#?}");
    for e in &ej {
        assert_eq!(e.level, "WARN");
        assert_eq!(e.target, "steadfast::balance");
        assert_eq!(e.fields["endpoint"], aa, "{e:?}");
        assert_ne!(e.fields["reason"], "refused");
        assert!(
            e.fields.contains_key("ejection_ms") && e.fields.contains_key("ejections"),
            "{e:?}"
        );
    }
    let counted: f64 = m
        .keys_with("steadfast_balance_ejections_total")
        .iter()
        .map(|k| m.get(k))
        .sum();
    assert_eq!(counted, ej.len() as f64, "{all:#?}");
    let ret = cap.events("balance.returned");
    assert_eq!(
        m.get(&format!(
            "steadfast_balance_returned_total{{endpoint={aa}}}"
        )),
        ret.len() as f64,
        "{all:#?}"
    );
    assert!(
        !ret.is_empty(),
        "an ejection whose time ran out: {all:#?} {:#?}",
        cap.all_events()
            .iter()
            .filter(|e| e.target.contains("balance"))
            .collect::<Vec<_>>()
    );
    assert_eq!(ret[0].level, "INFO");
}

// ------------------------------------------------------------------------------------------
// Hedge
// ------------------------------------------------------------------------------------------

/// Over a real transport, through two clones: every hedge sent is counted once, every call a
/// hedge answered once.
#[test]
fn hedges_over_real_sockets_are_counted_once_across_clones() {
    use steadfast::retry::{HedgeDelay, HedgeLayer};
    let (m, _cap) = run(|_| async {
        let up = FaultServer::start().await;
        let svc = HedgeLayer::builder()
            .delay(HedgeDelay::Fixed(Duration::from_millis(50)))
            .max_extra_load(1.0)
            .name("hg")
            .build()
            .unwrap()
            .layer(support::transport::<Full<Bytes>>());
        // A fast call first: the extra-load share is earned by calls.
        let res = guard(svc.clone().oneshot(get(&up.url("/")))).await.unwrap();
        assert_eq!(res.status(), 200);
        for _ in 0..2 {
            // The first attempt takes 2 s, the hedge answers at once.
            up.script([Fault::status(200).after(Duration::from_secs(2))]);
            let res = guard(svc.clone().oneshot(get(&up.url("/")))).await.unwrap();
            assert_eq!(res.status(), 200);
        }
        // A fast call sends no hedge.
        let res = guard(svc.clone().oneshot(get(&up.url("/")))).await.unwrap();
        assert_eq!(res.status(), 200);
        eprintln!("hits {}", up.hits());
    });
    let all = m.all();
    assert_eq!(
        m.get("steadfast_hedge_sent_total{hedge=hg}"),
        2.0,
        "{all:#?}"
    );
    assert_eq!(
        m.get("steadfast_hedge_won_total{hedge=hg}"),
        2.0,
        "{all:#?}"
    );
}

// ------------------------------------------------------------------------------------------
// Correlation: hostile inbound ids
// ------------------------------------------------------------------------------------------

async fn raw_request(addr: std::net::SocketAddr, head: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    let mut out = Vec::new();
    let _ = guard(s.read_to_end(&mut out)).await;
    out
}

async fn app_with_handler_event() -> std::net::SocketAddr {
    use axum::{Router, routing::get};
    let app: Router = Router::new()
        .route(
            "/",
            get(|| async {
                tracing::info!(target: "steadfast::test_handler", "in handler");
                "ok"
            }),
        )
        .layer(steadfast::server::http().build().unwrap());
    support::serve_axum(app).await
}

#[test]
fn hostile_inbound_ids_never_reach_a_span_or_event() {
    let (_m, cap) = run(|_| async {
        let addr = app_with_handler_event().await;
        let hostile: Vec<&[u8]> = vec![
            b"evil\" injected=1",
            b"INJ\tinjected=2",
            b"\xff\xfeINJ3",
            b"x%0D%0Ainjected=4",
            b"injected=5=",
        ];
        for h in hostile {
            let mut req =
                b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-correlation-id: ".to_vec();
            req.extend_from_slice(h);
            req.extend_from_slice(b"\r\nx-request-id: also\"bad injected=6\r\n\r\n");
            let res = raw_request(addr, &req).await;
            assert!(
                res.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&res)
            );
            assert!(!String::from_utf8_lossy(&res).contains("injected"));
        }
    });
    let text = cap.all_text();
    assert!(
        !text.contains("injected") && !text.contains("INJ"),
        "{text}"
    );
    let spans = cap.spans("correlation");
    assert_eq!(spans.len(), 5, "{spans:#?}");
    for s in &spans {
        assert_eq!(s.target, "steadfast::correlation");
        let id = &s.fields["correlation_id"];
        assert_eq!(id.len(), 36, "a generated UUID: {id}");
    }
    let rej = cap.events("inbound correlation id rejected; generating one");
    assert!(rej.len() >= 5, "{:#?}", cap.all_events());
    for e in &rej {
        assert!(e.fields.is_empty(), "no raw value: {e:?}");
    }
    let h = cap.events("in handler");
    assert_eq!(h.len(), 5);
    for e in &h {
        assert_eq!(
            e.scope.first().map(String::as_str),
            Some("correlation"),
            "{e:?}"
        );
    }
}

/// A lenient validator still cannot let bytes past visible ASCII into the span.
#[test]
fn a_lenient_validator_cannot_log_non_visible_bytes() {
    let (_m, cap) = run(|_| async {
        use axum::{Router, routing::get};
        let app: Router = Router::new().route("/", get(|| async { "ok" })).layer(
            steadfast::correlation::SetCorrelationIdLayer::builder()
                .validate(|_: &[u8]| true)
                .build()
                .unwrap(),
        );
        let addr = support::serve_axum(app).await;
        for h in [&b"a\tINJ"[..], b"\x80INJ", b"a INJ"] {
            let mut req =
                b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-correlation-id: ".to_vec();
            req.extend_from_slice(h);
            req.extend_from_slice(b"\r\n\r\n");
            let res = raw_request(addr, &req).await;
            assert!(
                res.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&res)
            );
        }
    });
    let text = cap.all_text();
    assert!(!text.contains("INJ"), "{text}");
}

// ------------------------------------------------------------------------------------------
// Label cardinality: spellings of one authority
// ------------------------------------------------------------------------------------------

/// Case and userinfo variants of one authority are one upstream: one breaker, one label
/// (hosts are case-insensitive; the key has no userinfo). Otherwise a caller choosing the
/// spelling multiplies breakers and series, and each spelling trips on its own.
#[test]
fn spellings_of_one_authority_share_one_breaker_and_label() {
    let port = Arc::new(Mutex::new(0u16));
    let p2 = port.clone();
    let (m, _cap) = run(|_| async move {
        let up = FaultServer::start().await;
        *p2.lock().unwrap() = up.addr().port();
        up.set_default(Fault::status(503));
        let p = up.addr().port();
        let (layer, c) = client(
            steadfast::client::http()
                .name("sp")
                .retry(|r| r.max_attempts(2))
                .breaker(|b| b.consecutive_failures(Some(100))),
        );
        for host in [
            "localhost",
            "LOCALHOST",
            "LocalHost",
            "u:pw@localhost",
            "v:qq@LOCALhost",
        ] {
            let _ = guard(c.clone().oneshot(get(&format!("http://{host}:{p}/")))).await;
        }
        eprintln!("breaker keys: {:?}", layer.breakers().keys());
    });
    let _ = port;
    let all = m.all();
    let labels: std::collections::BTreeSet<String> = all
        .keys()
        .filter_map(|k| k.split("upstream=").nth(1))
        .map(|r| r.split([',', '}']).next().unwrap().to_owned())
        .collect();
    assert_eq!(labels.len(), 1, "{labels:?}");
}

/// `steadfast_retry_attempts_total` counts retries *sent*: a caller that gives up during the
/// backoff (its own timeout, a dropped future) sent no retry.
#[test]
fn a_retry_abandoned_during_its_backoff_is_not_counted_as_sent() {
    let (m, cap) = run(|_| async {
        let up = FaultServer::start().await;
        up.set_default(Fault::status(503));
        let retry = steadfast::retry::RetryLayer::builder()
            .name("ab")
            .backoff(
                steadfast::retry::Backoff::new(Duration::from_secs(5), Duration::from_secs(5))
                    .jitter(steadfast::retry::Jitter::None),
            )
            .build()
            .unwrap();
        let svc = retry.layer(support::transport::<Full<Bytes>>());
        // The caller waits 1 s: the first attempt answers at once, the retry would start at 5 s.
        let out =
            tokio::time::timeout(Duration::from_secs(1), svc.oneshot(get(&up.url("/")))).await;
        assert!(out.is_err(), "the caller gave up");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(up.hits(), 1);
    });
    let all = m.all();
    eprintln!(
        "retry.attempt events: {}",
        cap.events("retry.attempt").len()
    );
    assert_eq!(
        m.opt("steadfast_retry_attempts_total{retry=ab}")
            .unwrap_or(0.0),
        0.0,
        "one attempt was sent, no retry: {all:#?}"
    );
}
