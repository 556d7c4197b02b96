//! Run: `cargo run --release --example demo --features metrics` (the layers' counters feed the
//! gateway's `/metrics`, so the example needs them on).
//!
//! The seed scenario in one process, on loopback, in about 15 seconds:
//!
//! ```text
//!                      ┌──────── users        (down from 2 s to 5 s, then back)
//!   load driver ──▶ gateway ──── orders ×2 ──┬── inventory (every 7th call stalls past the attempt timeout)
//!   (burst + spike)  │  rate limit 100 r/s,  └── payments  (bursts of 503 + Retry-After)
//!                    │  burst 200 (payments 20)
//!                    └── /health, /metrics (Prometheus text)
//! ```
//!
//! Every hop runs the standard server stack; every outgoing call goes through the standard
//! client stack (correlation id, total timeout, retry with budget, per-host breaker,
//! attempt timeout). Handlers contain no resilience code: the correlation id and the
//! remaining deadline travel on their own.
//!
//! At the end it prints a table per upstream, the breaker timeline, one request's
//! correlation id as it appears in the log line of every hop, and the gateway's metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use steadfast::breaker::error::BreakerOpen;
use steadfast::client::{HttpClient, HttpClientLayer};
use steadfast::retry::{Backoff, ReplayBody};
use steadfast::timeout::error::Elapsed;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

/// The knobs of one run: `full()` is the README's demo, `small()` the scaled-down test.
#[derive(Clone, Debug)]
struct Scenario {
    load: Duration,
    rps: u64,
    spike: usize,
    attempt: Duration,
    total: Duration,
    open_time: Duration,
    users_down: (Duration, Duration),
    payments_bursts: Vec<(Duration, Duration)>,
    inventory_stall_every: u64,
    inventory_stall: Duration,
}

impl Scenario {
    fn full() -> Self {
        Self {
            load: Duration::from_secs(10),
            rps: 60,
            spike: 260,
            attempt: Duration::from_millis(300),
            total: Duration::from_millis(1500),
            open_time: Duration::from_secs(2),
            users_down: (Duration::from_secs(2), Duration::from_secs(5)),
            payments_bursts: vec![
                (Duration::from_millis(3000), Duration::from_millis(3600)),
                (Duration::from_millis(7000), Duration::from_millis(7500)),
            ],
            inventory_stall_every: 7,
            inventory_stall: Duration::from_millis(500),
        }
    }

    #[cfg(test)]
    fn small() -> Self {
        Self {
            load: Duration::from_secs(3),
            rps: 20,
            spike: 40,
            users_down: (Duration::from_millis(500), Duration::from_millis(1500)),
            payments_bursts: vec![(Duration::from_millis(800), Duration::from_millis(1200))],
            open_time: Duration::from_millis(500),
            ..Self::full()
        }
    }

    fn client(&self) -> HttpClientLayer {
        steadfast::client::http()
            .attempt_timeout(self.attempt)
            .total_timeout(self.total)
            .retry(|r| {
                r.backoff(Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_millis(500),
                ))
            })
            .breaker(|b| {
                b.open_time(self.open_time)
                    .max_open_time(self.open_time * 4)
            })
            .build()
            .expect("a valid client stack")
    }
}

// ---------------------------------------------------------------------------------------
// What the run observed: a tracing layer reads the layers' own events (no hooks needed).
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Upstream {
    requests: u64,
    ok: u64,
    retries: u64,
    budget_denials: u64,
    timeouts: u64,
    rejected: u64,
    transitions: Vec<(Duration, String, String)>,
    latencies: Vec<Duration>,
}

#[derive(Default)]
struct Observed {
    upstreams: BTreeMap<String, Upstream>,
    /// (time, hop, correlation id, what)
    hops: Vec<(Duration, String, String, String)>,
}

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn observed() -> &'static Mutex<Observed> {
    static OBSERVED: OnceLock<Mutex<Observed>> = OnceLock::new();
    OBSERVED.get_or_init(Default::default)
}

/// Span fields the demo cares about, stored on each span.
#[derive(Default)]
struct Fields {
    upstream: Option<String>,
    correlation_id: Option<String>,
    hop: Option<String>,
    what: Option<String>,
    name: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        let slot = match field.name() {
            "upstream" => &mut self.upstream,
            "hop" => &mut self.hop,
            "what" => &mut self.what,
            "from" => &mut self.from,
            "to" => &mut self.to,
            _ => return,
        };
        *slot = Some(value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "correlation_id" => self.correlation_id = Some(format!("{value:?}")),
            "message" => self.name = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

struct Observer;

impl<S> tracing_subscriber::Layer<S> for Observer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(f);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let (mut upstream, mut correlation) = (None, None);
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                if let Some(sf) = span.extensions().get::<Fields>() {
                    upstream = upstream.or_else(|| sf.upstream.clone());
                    correlation = correlation.or_else(|| sf.correlation_id.clone());
                }
            }
        }
        let t = start().elapsed();
        let meta = event.metadata();
        let mut o = observed().lock().unwrap();
        if let Some(hop) = f.hop {
            o.hops.push((
                t,
                hop,
                correlation.unwrap_or_default(),
                f.what.unwrap_or_default(),
            ));
            return;
        }
        let Some(up) = upstream else { return };
        let u = o.upstreams.entry(up).or_default();
        match (meta.target(), meta.name()) {
            (_, "retry.attempt") => u.retries += 1,
            (_, "retry.budget_exhausted") => u.budget_denials += 1,
            ("steadfast::timeout", _) if f.name.as_deref() == Some("elapsed") => u.timeouts += 1,
            ("steadfast::breaker", _) if f.to.is_some() => {
                u.transitions
                    .push((t, f.from.unwrap_or_default(), f.to.unwrap_or_default()));
            }
            _ => {}
        }
    }
}

fn record_call(upstream: &str, latency: Duration, status: Option<StatusCode>, rejected: bool) {
    let mut o = observed().lock().unwrap();
    let u = o.upstreams.entry(upstream.to_owned()).or_default();
    u.requests += 1;
    u.latencies.push(latency);
    if status.is_some_and(|s| s.is_success()) {
        u.ok += 1;
    }
    if rejected {
        u.rejected += 1;
    }
}

// ---------------------------------------------------------------------------------------
// The services.
// ---------------------------------------------------------------------------------------

type Transport = Client<HttpConnector, ReplayBody<Body>>;
type Stack = HttpClient<Transport>;

fn transport() -> Transport {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    addr
}

fn log_hop(hop: &str, what: &str) {
    tracing::info!(hop, what, "handled");
}

/// Calls `uri` through a client stack inside an `upstream` span; maps the typed errors to
/// the answers a gateway gives.
async fn call(stack: Stack, upstream: &str, req: http::Request<Body>) -> Response {
    let began = Instant::now();
    let span = tracing::info_span!("upstream_call", upstream);
    let out = stack.oneshot(req).instrument(span).await;
    let latency = began.elapsed();
    match out {
        Ok(res) => {
            record_call(upstream, latency, Some(res.status()), false);
            let (parts, body) = res.into_parts();
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            if let Some(open) = e.downcast_ref::<BreakerOpen>() {
                record_call(upstream, latency, None, true);
                return open.to_http_response::<Body>().map(Body::new);
            }
            record_call(upstream, latency, None, false);
            if e.downcast_ref::<Elapsed>().is_some() {
                return (StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n").into_response();
            }
            (StatusCode::BAD_GATEWAY, format!("upstream error: {e}\n")).into_response()
        }
    }
}

fn in_window(t: Duration, w: (Duration, Duration)) -> bool {
    t >= w.0 && t < w.1
}

fn users(scen: Arc<Scenario>) -> Router {
    Router::new()
        .route(
            "/users/{id}",
            get(move |Path(id): Path<u64>| {
                let scen = scen.clone();
                async move {
                    if in_window(start().elapsed(), scen.users_down) {
                        log_hop("users", "down: 503");
                        return (StatusCode::SERVICE_UNAVAILABLE, "down\n").into_response();
                    }
                    log_hop("users", "200");
                    format!("user {id}\n").into_response()
                }
            }),
        )
        .layer(steadfast::server::http().build().expect("server stack"))
}

fn inventory(scen: Arc<Scenario>) -> Router {
    let hits = Arc::new(AtomicU64::new(0));
    Router::new()
        .route(
            "/items/{id}",
            get(move |Path(id): Path<u64>| {
                let (scen, hits) = (scen.clone(), hits.clone());
                async move {
                    let n = hits.fetch_add(1, Ordering::Relaxed);
                    if n % scen.inventory_stall_every == scen.inventory_stall_every - 1 {
                        log_hop("inventory", "stalling past the attempt timeout");
                        tokio::time::sleep(scen.inventory_stall).await;
                    }
                    log_hop("inventory", "200");
                    format!("item {id}: 3 in stock\n")
                }
            }),
        )
        .layer(steadfast::server::http().build().expect("server stack"))
}

fn payments(scen: Arc<Scenario>) -> Router {
    Router::new()
        .route(
            "/charge",
            post(move || {
                let scen = scen.clone();
                async move {
                    let t = start().elapsed();
                    if scen.payments_bursts.iter().any(|w| in_window(t, *w)) {
                        log_hop("payments", "burst: 503 Retry-After 1");
                        let mut res = (StatusCode::SERVICE_UNAVAILABLE, "busy\n").into_response();
                        res.headers_mut()
                            .insert("retry-after", HeaderValue::from_static("1"));
                        return res;
                    }
                    log_hop("payments", "charged");
                    "charged\n".into_response()
                }
            }),
        )
        .layer(steadfast::server::http().build().expect("server stack"))
}

#[derive(Clone)]
struct Orders {
    name: &'static str,
    client: Arc<HttpClientLayer>,
    transport: Transport,
    inventory: SocketAddr,
    payments: SocketAddr,
}

async fn place_order(State(o): State<Orders>, Path(id): Path<u64>) -> Response {
    // No id or deadline code: both travel with the client stack.
    log_hop(o.name, "placing order");
    let stack = o.client.layer(o.transport.clone());
    let item = http::Request::get(format!("http://{}/items/{id}", o.inventory))
        .body(Body::empty())
        .expect("request");
    let inv = call(stack.clone(), "inventory", item).await;
    if !inv.status().is_success() {
        log_hop(o.name, "inventory failed");
        return (StatusCode::BAD_GATEWAY, "inventory unavailable\n").into_response();
    }
    let charge = http::Request::post(format!("http://{}/charge", o.payments))
        .header("idempotency-key", format!("order-{id}"))
        .body(Body::from(format!("{{\"order\":{id}}}")))
        .expect("request");
    let pay = call(stack, "payments", charge).await;
    if !pay.status().is_success() {
        log_hop(o.name, "payment failed");
        return (StatusCode::BAD_GATEWAY, "payment unavailable\n").into_response();
    }
    log_hop(o.name, "order placed");
    format!("order {id} placed by {}\n", o.name).into_response()
}

#[derive(Clone)]
struct Gateway {
    client: Arc<HttpClientLayer>,
    transport: Transport,
    users: SocketAddr,
    orders: [SocketAddr; 2],
    inventory: SocketAddr,
    payments: SocketAddr,
    next: Arc<AtomicUsize>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

async fn proxy(
    State(gw): State<Gateway>,
    Path((service, rest)): Path<(String, String)>,
    req: Request,
) -> Response {
    forward(gw, &service, rest, req).await
}

async fn proxy_payments(
    State(gw): State<Gateway>,
    Path(rest): Path<String>,
    req: Request,
) -> Response {
    forward(gw, "payments", rest, req).await
}

/// Routes `/api/v1/<service>/<rest>` to `<upstream>/<rest>` through the client stack.
async fn forward(gw: Gateway, service: &str, rest: String, req: Request) -> Response {
    let (name, addr) = match service {
        "users" => ("users".to_owned(), gw.users),
        "orders" => {
            // Round-robin across the two instances.
            let i = gw.next.fetch_add(1, Ordering::Relaxed) % 2;
            (format!("orders-{}", i + 1), gw.orders[i])
        }
        "inventory" => ("inventory".to_owned(), gw.inventory),
        "payments" => ("payments".to_owned(), gw.payments),
        _ => return (StatusCode::NOT_FOUND, "no such service\n").into_response(),
    };
    log_hop("gateway", &format!("-> {name} /{rest}"));
    let (parts, body) = req.into_parts();
    let mut out = http::Request::builder()
        .method(parts.method)
        .uri(format!("http://{addr}/{rest}"))
        .body(body)
        .expect("request");
    for (k, v) in &parts.headers {
        if k != http::header::HOST {
            out.headers_mut().append(k, v.clone());
        }
    }
    call(gw.client.layer(gw.transport.clone()), &name, out).await
}

/// A per-client-address rate limit (GCRA, from tower_governor): one request per `per_ms`
/// milliseconds, bursts of `burst`; over it, 429 with `Retry-After`.
macro_rules! limiter {
    ($per_ms:expr, $burst:expr) => {
        tower_governor::GovernorLayer::new(
            tower_governor::governor::GovernorConfigBuilder::default()
                .per_millisecond($per_ms)
                .burst_size($burst)
                .finish()
                .expect("a valid rate limit"),
        )
    };
}

fn gateway(gw: Gateway) -> Router {
    // The seed's nginx: 100 r/s per client address, burst 200; payments burst 20.
    let api = Router::new()
        .route("/api/v1/{service}/{*rest}", any(proxy))
        .layer(limiter!(10, 200));
    let payments = Router::new()
        .route("/api/v1/payments/{*rest}", any(proxy_payments))
        .layer(limiter!(10, 20));
    let ops = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(gw): State<Gateway>| async move { gw.metrics.render() }),
        );
    Router::new()
        .merge(payments)
        .merge(api)
        .merge(ops)
        .with_state(gw)
        .layer(
            steadfast::server::http()
                .timeout(Duration::from_secs(3))
                .build()
                .expect("server stack"),
        )
}

// ---------------------------------------------------------------------------------------
// The run.
// ---------------------------------------------------------------------------------------

struct Report {
    text: String,
    driver_ok: u64,
    driver_total: u64,
    traced_hops: usize,
}

async fn run(scen: Scenario) -> Report {
    let _ = start();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _ = metrics::set_global_recorder(recorder);
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Observer));

    let scen = Arc::new(scen);
    let users = serve(users(scen.clone())).await;
    let inventory = serve(inventory(scen.clone())).await;
    let payments = serve(payments(scen.clone())).await;
    let mut orders = Vec::new();
    for name in ["orders-1", "orders-2"] {
        let o = Orders {
            name,
            client: Arc::new(scen.client()),
            transport: transport(),
            inventory,
            payments,
        };
        let app = Router::new()
            .route("/orders/{id}", post(place_order))
            .with_state(o)
            .layer(steadfast::server::http().build().expect("server stack"));
        orders.push(serve(app).await);
    }
    let gw = serve(gateway(Gateway {
        client: Arc::new(scen.client()),
        transport: transport(),
        users,
        orders: [orders[0], orders[1]],
        inventory,
        payments,
        next: Arc::default(),
        metrics: handle,
    }))
    .await;

    // The load driver: the outside world, a plain client.
    let driver: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let statuses: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
    let traced: Arc<Mutex<Option<String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let total = scen.load.as_millis() as u64 * scen.rps / 1000;
    let tick = Duration::from_micros(1_000_000 / scen.rps);
    let began = Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(began + tick * i as u32).await;
        let burst = if i == total / 2 { scen.spike } else { 1 };
        for j in 0..burst {
            let (driver, statuses, traced) = (driver.clone(), statuses.clone(), traced.clone());
            let n = i * 1000 + j as u64;
            let (method, path) = match (i + j as u64) % 20 {
                0..=4 => ("GET", format!("/api/v1/users/users/{n}")),
                5..=11 => ("POST", format!("/api/v1/orders/orders/{n}")),
                12..=15 => ("GET", format!("/api/v1/inventory/items/{n}")),
                _ => ("POST", "/api/v1/payments/charge".to_owned()),
            };
            tasks.spawn(async move {
                let id = format!("demo-{n}");
                let req = http::Request::builder()
                    .method(method)
                    .uri(format!("http://{gw}{path}"))
                    .header("x-correlation-id", &id)
                    .header("idempotency-key", &id)
                    .body(Body::empty())
                    .expect("request");
                let status = match driver.request(req).await {
                    Ok(res) => res.status().as_u16(),
                    Err(_) => 0,
                };
                *statuses.lock().unwrap().entry(status).or_default() += 1;
                if status == 200 && path.contains("/orders/") {
                    traced.lock().unwrap().get_or_insert(id);
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = began.elapsed();

    // The gateway's own endpoints.
    let health = driver
        .request(
            http::Request::get(format!("http://{gw}/health"))
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    let metrics_text = match driver
        .request(
            http::Request::get(format!("http://{gw}/metrics"))
                .body(Body::empty())
                .expect("request"),
        )
        .await
    {
        Ok(res) => {
            let bytes = http_body_util::BodyExt::collect(res.into_body())
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Err(e) => format!("(metrics unavailable: {e})"),
    };

    render(
        &scen,
        elapsed,
        health,
        &statuses.lock().unwrap(),
        traced.lock().unwrap().clone(),
        &metrics_text,
    )
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn render(
    scen: &Scenario,
    elapsed: Duration,
    health: u16,
    statuses: &BTreeMap<u16, u64>,
    traced: Option<String>,
    metrics_text: &str,
) -> Report {
    let mut o = observed().lock().unwrap();
    let mut out = String::new();
    let driver_total: u64 = statuses.values().sum();
    let driver_ok = statuses.get(&200).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "steadfast demo: {driver_total} requests through the gateway in {:.1} s",
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "  client stack: attempt timeout {:?}, total {:?}, 3 attempts, budget 10 % + 10/s, breaker 5 failures / open {:?}",
        scen.attempt, scen.total, scen.open_time
    );
    let _ = writeln!(out, "  gateway /health: {health}");
    let by_status: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
    let _ = writeln!(
        out,
        "  answers seen by the driver: {}",
        by_status.join(", ")
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| upstream | requests | ok | retries | budget denials | timeouts | rejected (open) | transitions | p50 | p99 |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|");
    for (name, u) in o.upstreams.iter_mut() {
        let transitions: Vec<String> = u
            .transitions
            .iter()
            .map(|(t, from, to)| format!("{from}→{to} @{:.1}s", t.as_secs_f64()))
            .collect();
        let (p50, p99) = (pct(&mut u.latencies, 0.5), pct(&mut u.latencies, 0.99));
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms |",
            u.requests,
            u.ok,
            u.retries,
            u.budget_denials,
            u.timeouts,
            u.rejected,
            if transitions.is_empty() {
                "—".to_owned()
            } else {
                transitions.join(", ")
            },
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0,
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "breaker timeline (one character per 250 ms: . closed, X open, ? half-open)"
    );
    let slots = (elapsed.as_millis() / 250) as usize + 1;
    for (name, u) in o.upstreams.iter() {
        let mut line = String::new();
        let mut state = "closed".to_owned();
        let mut k = 0;
        for s in 0..slots {
            let t = Duration::from_millis(s as u64 * 250);
            while k < u.transitions.len() && u.transitions[k].0 <= t {
                state = u.transitions[k].2.clone();
                k += 1;
            }
            line.push(match state.as_str() {
                "open" => 'X',
                "half_open" => '?',
                _ => '.',
            });
        }
        let _ = writeln!(out, "  {name:<10} {line}");
    }
    let _ = writeln!(out);
    let mut traced_hops = 0;
    if let Some(id) = traced {
        let _ = writeln!(out, "one request, every hop (correlation id {id}):");
        for (t, hop, cid, what) in o.hops.iter().filter(|h| h.2 == id) {
            traced_hops += 1;
            let _ = writeln!(
                out,
                "  {:>7.3}s  {hop:<10} correlation_id={cid}  {what}",
                t.as_secs_f64()
            );
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "gateway /metrics (steadfast_* lines):");
    for line in metrics_text
        .lines()
        .filter(|l| l.starts_with("steadfast_") && !l.contains("_bucket"))
    {
        let _ = writeln!(out, "  {line}");
    }
    Report {
        text: out,
        driver_ok,
        driver_total,
        traced_hops,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let report = run(Scenario::full()).await;
    print!("{}", report.text);
    if report.driver_ok == 0 || report.traced_hops == 0 {
        eprintln!(
            "the demo is broken: {} of {} requests succeeded, {} hops traced",
            report.driver_ok, report.driver_total, report.traced_hops
        );
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo, scaled down and on paused time, so it never rots.
    #[tokio::test(start_paused = true)]
    async fn demo_runs_scaled_down() {
        let report = run(Scenario::small()).await;
        println!("{}", report.text);
        assert!(report.driver_total > 0);
        assert!(report.driver_ok > 0, "some requests succeed");
        // gateway -> orders -> inventory + payments, all under one id.
        assert!(
            report.traced_hops >= 4,
            "one id seen at every hop: {}",
            report.traced_hops
        );
        assert!(report.text.contains("| users |"));
    }
}
