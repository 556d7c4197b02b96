//! Two phases after the main run, each on services of its own:
//!
//! - **Overload**: `catalog` serves a few calls at once and queues the rest. Its callers offer
//!   twice its capacity, then half. One caller has only the client stack; the other adds
//!   client-side throttling above it and an adaptive concurrency limit (Vegas) below it, and
//!   its catalog sheds load past a limit (503 + `Retry-After`).
//! - **Slow replica**: `search` runs three replicas; on any of them one call in fifty pauses
//!   (a GC pause, a cold cache). One caller balances over them; the other also hedges.

#[allow(unused_imports)]
use super::*;

use steadfast::balance::BalanceLayer;
use steadfast::limit::{ConcurrencyLimitLayer, ThrottleLayer};
use steadfast::retry::{HedgeDelay, HedgeLayer};
use steadfast::timeout::TimeoutLayer;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;

/// The knobs of the two phases.
#[derive(Clone, Debug)]
pub(crate) struct Phases {
    /// Calls catalog serves at once, and how long each takes.
    pub(crate) catalog_workers: usize,
    pub(crate) catalog_work: Duration,
    /// The overload's three parts: half catalog's capacity, twice it, half again.
    pub(crate) overload: (Duration, Duration, Duration),
    /// The deadline of every call in both phases.
    pub(crate) deadline: Duration,
    /// The slow-replica phase: its length, rate, and a replica's usual and paused latency.
    pub(crate) search: Duration,
    pub(crate) search_rps: u64,
    pub(crate) search_work: Duration,
    pub(crate) search_pause: Duration,
    pub(crate) pause_every: u64,
}

impl Phases {
    pub(crate) fn full() -> Self {
        Self {
            catalog_workers: 4,
            catalog_work: Duration::from_millis(25),
            overload: (
                Duration::from_secs(1),
                Duration::from_secs(3),
                Duration::from_secs(1),
            ),
            deadline: Duration::from_secs(1),
            search: Duration::from_secs(3),
            search_rps: 100,
            search_work: Duration::from_millis(5),
            search_pause: Duration::from_millis(600),
            pause_every: 25,
        }
    }

    #[cfg(test)]
    pub(crate) fn small() -> Self {
        Self {
            overload: (
                Duration::from_millis(400),
                Duration::from_millis(1200),
                Duration::from_millis(400),
            ),
            search: Duration::from_millis(1500),
            ..Self::full()
        }
    }

    fn capacity(&self) -> f64 {
        self.catalog_workers as f64 / self.catalog_work.as_secs_f64()
    }
}

/// A catalog instance: `workers` calls at once, the rest queued (it works through its queue
/// even for callers that gave up, as a server does); with `shed`, it answers 503 +
/// `Retry-After` past that many calls in flight.
fn catalog(p: &Phases, shed: Option<u32>) -> Router {
    let workers = Arc::new(Semaphore::new(p.catalog_workers));
    let work = p.catalog_work;
    let app = Router::new().route(
        "/items/{id}",
        get(move |Path(id): Path<u64>| {
            let workers = workers.clone();
            async move {
                let _worker = workers.acquire_owned().await.expect("open");
                tokio::time::sleep(work).await;
                format!("item {id}\n")
            }
        }),
    );
    let app = match shed {
        Some(n) => app.layer(ConcurrencyLimitLayer::new(n).answering()),
        None => app,
    };
    app.layer(steadfast::server::http().build().expect("server stack"))
}

/// What one caller saw.
#[derive(Default)]
struct Seen {
    calls: u64,
    ok_in_time: u64,
    refused_locally: u64,
    shed: u64,
    late_or_failed: u64,
    ok_latencies: Vec<Duration>,
    /// Calls answered in time during the overload half, after its first second.
    overload_ok: u64,
}

/// One stretch of load: `rate` calls a second to `url` for `length`, from `offset` after
/// `began`; each call with `deadline`; calls that start in `window` count as the overload's.
#[derive(Clone)]
struct Load {
    url: String,
    rate: f64,
    length: Duration,
    offset: Duration,
    deadline: Duration,
    window: (Duration, Duration),
    began: Instant,
}

/// Offers `load` through `svc`, noting what each call came to in `seen`.
async fn offer<S>(svc: S, load: Load, seen: Arc<Mutex<Seen>>)
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Into<steadfast::common::BoxError> + Send,
{
    let Load {
        url,
        rate,
        length,
        offset,
        deadline,
        window: overload_window,
        began,
    } = load;
    let n = (rate * length.as_secs_f64()) as u32;
    let tick = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tokio::time::sleep_until(began + offset + tick * i).await;
        let (svc, seen, url) = (svc.clone(), seen.clone(), format!("{url}/items/{i}"));
        tasks.spawn(async move {
            let t = Instant::now();
            let req = http::Request::get(url)
                .body(Body::empty())
                .expect("request");
            let out = tokio::time::timeout(deadline, svc.oneshot(req)).await;
            let took = t.elapsed();
            let at = t.saturating_duration_since(began);
            let mut s = seen.lock().unwrap();
            s.calls += 1;
            match out {
                Ok(Ok(res)) if res.status() == StatusCode::OK => {
                    s.ok_in_time += 1;
                    s.ok_latencies.push(took);
                    if in_window(at, overload_window) {
                        s.overload_ok += 1;
                    }
                }
                Ok(Ok(res)) if res.status() == StatusCode::SERVICE_UNAVAILABLE => s.shed += 1,
                Ok(Err(e)) => {
                    let e: steadfast::common::BoxError = e.into();
                    if steadfast::common::PolicyRejected::is_in(&*e) {
                        s.refused_locally += 1;
                    } else {
                        s.late_or_failed += 1;
                    }
                }
                _ => s.late_or_failed += 1,
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Boxes a stack's response body, so both callers' services answer the same type.
fn boxed<B>(res: http::Response<B>) -> http::Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<steadfast::common::BoxError>,
{
    res.map(Body::new)
}

pub(crate) async fn overload(p: &Phases) -> String {
    let plain = serve(catalog(p, None)).await;
    let guarded = serve(catalog(p, Some(4 * p.catalog_workers as u32))).await;
    let cap = p.capacity();
    let stack = |name: &str| {
        steadfast::client::http()
            .name(name)
            .attempt_timeout(p.deadline / 2)
            .total_timeout(p.deadline)
            .build()
            .expect("client stack")
    };
    let unprotected = ServiceBuilder::new()
        .map_response(boxed)
        .layer(stack("catalog-caller-a"))
        .service(transport());
    let limit = ConcurrencyLimitLayer::builder()
        .name("catalog")
        .build()
        .expect("limit");
    let watched = limit.clone();
    let protected = ServiceBuilder::new()
        .map_response(boxed)
        .layer(ThrottleLayer::new())
        .layer(stack("catalog-caller-b"))
        .layer(limit)
        .map_response(boxed)
        .service(transport());
    let began = Instant::now();
    let (before, hot, after) = p.overload;
    // The first second of the overload fills queues; goodput counts the rest of it.
    let window = (before + Duration::from_secs(1).min(hot / 2), before + hot);
    let mut rows = Vec::new();
    let runs = [
        ("client stack only", format!("http://{plain}"), true),
        (
            "+ throttle, adaptive limit; catalog sheds past 16",
            format!("http://{guarded}"),
            false,
        ),
    ];
    let mut set = tokio::task::JoinSet::new();
    for (i, (_, url, plain_stack)) in runs.iter().enumerate() {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        rows.push(seen.clone());
        let (url, deadline, plain_stack) = (url.clone(), p.deadline, *plain_stack);
        let (u, pr) = (unprotected.clone(), protected.clone());
        set.spawn(async move {
            let run = |rate, length, offset| {
                let seen = seen.clone();
                let load = Load {
                    url: url.clone(),
                    rate,
                    length,
                    offset,
                    deadline,
                    window,
                    began,
                };
                let (u, pr) = (u.clone(), pr.clone());
                async move {
                    if plain_stack {
                        offer(u, load, seen).await;
                    } else {
                        offer(pr, load, seen).await;
                    }
                }
            };
            tokio::join!(
                run(0.5 * cap, before, Duration::ZERO),
                run(2.0 * cap, hot, before),
                run(0.5 * cap, after, before + hot),
            );
            i
        });
    }
    while set.join_next().await.is_some() {}
    let mut out = String::new();
    let _ = writeln!(
        out,
        "overload: catalog serves {} calls at once × {:?} ({:.0}/s) and queues the rest; each caller offers {:.0}/s for {:.1} s, {:.0}/s for {:.1} s, then {:.0}/s for {:.1} s; every call has a {:?} deadline",
        p.catalog_workers,
        p.catalog_work,
        cap,
        0.5 * cap,
        before.as_secs_f64(),
        2.0 * cap,
        hot.as_secs_f64(),
        0.5 * cap,
        after.as_secs_f64(),
        p.deadline
    );
    let _ = writeln!(
        out,
        "| caller | calls | ok in time | goodput in the overload | p99 of ok calls | refused locally | shed (503) | late or failed |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let counted = (window.1 - window.0).as_secs_f64() * cap;
    for ((name, ..), seen) in runs.iter().zip(&rows) {
        let mut s = seen.lock().unwrap();
        let p99 = pct(&mut s.ok_latencies, 0.99);
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {:.0} % | {:.0} ms | {} | {} | {} |",
            s.calls,
            s.ok_in_time,
            100.0 * s.overload_ok as f64 / counted,
            p99.as_secs_f64() * 1000.0,
            s.refused_locally,
            s.shed,
            s.late_or_failed
        );
    }
    let _ = writeln!(
        out,
        "  With the client stack alone, calls queue at catalog until they time out, then its breaker opens and refuses most of them while catalog works through a queue of calls nobody waits for. The guarded caller's adaptive limit (Vegas, {} at the end) keeps about as many calls in flight as catalog serves, so those it sends are answered in time; it refuses the rest at once, and catalog shed what came before the limit had come down.",
        watched.limit()
    );
    out
}

/// A search replica: `work` per call, and every `every`-th call (counted across replicas, so
/// the pauses land on all of them) takes `pause` instead.
fn search(p: &Phases, calls: Arc<AtomicU64>) -> Router {
    let (work, pause, every) = (p.search_work, p.search_pause, p.pause_every);
    Router::new()
        .route(
            "/items/{id}",
            get(move |Path(id): Path<u64>| {
                let calls = calls.clone();
                async move {
                    let n = calls.fetch_add(1, Ordering::Relaxed);
                    let slow = n % every == every / 2;
                    tokio::time::sleep(if slow { pause } else { work }).await;
                    format!("result {id}\n")
                }
            }),
        )
        .layer(steadfast::server::http().build().expect("server stack"))
}

pub(crate) async fn slow_replica(p: &Phases) -> String {
    let mut sets = Vec::new();
    for _ in 0..2 {
        let calls = Arc::new(AtomicU64::new(0));
        let mut endpoints = Vec::new();
        for _ in 0..3 {
            endpoints.push(serve(search(p, calls.clone())).await.to_string());
        }
        sets.push((endpoints, calls));
    }
    let balance = |endpoints: &[String]| {
        BalanceLayer::builder()
            .endpoints(endpoints)
            .build()
            .expect("balancer")
    };
    // A total timeout that tells the layers below its deadline (the hedge sends none past it).
    let total = || {
        TimeoutLayer::builder()
            .limit(p.deadline)
            .share_own(true)
            .build()
            .expect("timeout")
    };
    let balanced = ServiceBuilder::new()
        .map_response(boxed)
        .layer(total())
        .map_request(|r: http::Request<Body>| r.map(|b| ReplayBody::new(b, 0)))
        .layer(balance(&sets[0].0))
        .service(transport());
    let hedge = HedgeLayer::builder()
        .delay(HedgeDelay::Percentile(0.95))
        .min_samples(50)
        .window(Duration::from_secs(1))
        .name("search")
        .build()
        .expect("hedge");
    let hedged = ServiceBuilder::new()
        .map_response(boxed)
        .layer(total())
        .layer(hedge.clone())
        .layer(balance(&sets[1].0))
        .service(transport());
    let rate = p.search_rps as f64;
    let seen: [Arc<Mutex<Seen>>; 2] = Default::default();
    let began = Instant::now();
    let load = Load {
        url: "http://search".into(),
        rate,
        length: p.search,
        offset: Duration::ZERO,
        deadline: p.deadline,
        window: (Duration::ZERO, Duration::ZERO),
        began,
    };
    tokio::join!(
        offer(balanced, load.clone(), seen[0].clone()),
        offer(hedged, load, seen[1].clone()),
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "slow replica: search runs 3 replicas ({:?} a call; one call in {} pauses {:?}); {:.0} calls/s for {:.1} s",
        p.search_work,
        p.pause_every,
        p.search_pause,
        rate,
        p.search.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| caller | calls | ok | p50 | p99 | max | requests sent to search |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for ((name, (_, calls)), seen) in [
        "balanced (P2C)",
        "balanced + hedge (p95 learnt, at most 5 % more requests)",
    ]
    .iter()
    .zip(&sets)
    .zip(&seen)
    {
        let mut s = seen.lock().unwrap();
        let (p50, p99) = (
            pct(&mut s.ok_latencies, 0.5),
            pct(&mut s.ok_latencies, 0.99),
        );
        let max = s.ok_latencies.iter().max().copied().unwrap_or_default();
        let sent = calls.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} (+{:.1} %) |",
            s.calls,
            s.ok_in_time,
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0,
            sent,
            100.0 * (sent as f64 / s.calls.max(1) as f64 - 1.0)
        );
    }
    let _ = writeln!(
        out,
        "  A call slower than the 95th percentile of recent ones gets a second attempt on another replica; the first answer wins. The hedges are capped at 5 % of calls, and none is sent before 50 latencies were seen."
    );
    out
}
