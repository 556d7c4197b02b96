//! The overload experiment (issue 23), on paused time with seeded arrivals: an upstream with
//! `WORKERS` workers, each call taking `SERVICE` of work, that queues what it cannot start (and
//! works through the queue even for callers that gave up, as a server does). Offered load is
//! twice its capacity for `OVERLOAD`, then half its capacity for `CALM`; every call has a
//! `TIMEOUT` deadline. Beside no limit: a fixed limit at the upstream's capacity, our adaptive
//! limits, and tower-resilience's adaptive limiter, which waits for a permit in `poll_ready`
//! instead of refusing: under a sustained overload its queue holds every caller until its
//! deadline, as the upstream's own queue does with no limit.
//!
//! Goodput counts calls answered within their deadline during the overload (after its first
//! second), as a share of the upstream's capacity. Recovery is the time after the overload
//! ends until every call is answered within twice the unloaded p99.
//!
//! Run: `cargo test --release --test overload -- --nocapture` (prints the table).

#![cfg(feature = "limit")]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use steadfast::limit::{ConcurrencyLimitLayer, Gradient2};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const WORKERS: usize = 10;
const SERVICE: Duration = Duration::from_millis(10);
/// Calls per second the upstream can serve.
const CAPACITY: f64 = WORKERS as f64 / 0.010;
const OVERLOAD: Duration = Duration::from_secs(10);
const CALM: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(1);

/// The upstream: `WORKERS` at once, the rest queued in arrival order.
#[derive(Clone)]
struct Upstream {
    workers: Arc<Semaphore>,
}

impl Upstream {
    fn new() -> Self {
        Self {
            workers: Arc::new(Semaphore::new(WORKERS)),
        }
    }
}

impl Service<Request<()>> for Upstream {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        let workers = self.workers.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The work goes on whether or not the caller still waits for it.
        tokio::spawn(async move {
            let _worker = workers.acquire_owned().await.expect("open");
            tokio::time::sleep(SERVICE).await;
            let _ = tx.send(());
        });
        Box::pin(async move {
            let _ = rx.await;
            Ok(Response::new(Empty::new()))
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Ok,
    Refused,
    TimedOut,
}

struct Record {
    arrival: Duration,
    outcome: Outcome,
    latency: Duration,
}

/// Exponential inter-arrival times from a seeded xorshift.
struct Arrivals(u64);

impl Arrivals {
    fn next(&mut self, rate: f64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let u = ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        Duration::from_secs_f64(-u.ln() / rate)
    }
}

/// Offers the load to `svc` and records every call.
async fn run<S>(svc: S, phases: &[(Duration, f64)]) -> Vec<Record>
where
    S: Service<Request<()>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
{
    let records = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut arrivals = Arrivals(0x9E37_79B9_7F4A_7C15);
    let mut at = Duration::ZERO;
    let mut phase_end = Duration::ZERO;
    let mut tasks = Vec::new();
    for &(length, rate) in phases {
        phase_end += length;
        loop {
            at += arrivals.next(rate);
            if at >= phase_end {
                at = phase_end;
                break;
            }
            tokio::time::sleep_until(start + at).await;
            let svc = svc.clone();
            let records = records.clone();
            let arrival = at;
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let out = tokio::time::timeout(TIMEOUT, svc.oneshot(Request::new(()))).await;
                let outcome = match out {
                    Ok(Ok(_)) => Outcome::Ok,
                    Ok(Err(_)) => Outcome::Refused,
                    Err(_) => Outcome::TimedOut,
                };
                records.lock().unwrap().push(Record {
                    arrival,
                    outcome,
                    latency: sent.elapsed(),
                });
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(records).ok().unwrap().into_inner().unwrap()
}

fn p99(mut v: Vec<Duration>) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[derive(Debug)]
struct Figures {
    goodput: f64,
    p99: Duration,
    recovery: Duration,
    refused: usize,
}

fn figures(records: &[Record], unloaded_p99: Duration) -> Figures {
    let in_overload = |r: &&Record| r.arrival >= Duration::from_secs(1) && r.arrival < OVERLOAD;
    let good: Vec<_> = records
        .iter()
        .filter(in_overload)
        .filter(|r| r.outcome == Outcome::Ok)
        .map(|r| r.latency)
        .collect();
    let seconds = (OVERLOAD - Duration::from_secs(1)).as_secs_f64();
    let goodput = good.len() as f64 / seconds / CAPACITY;
    // The last call after the overload that failed or was slow marks the end of recovery.
    let recovery = records
        .iter()
        .filter(|r| r.arrival >= OVERLOAD)
        .filter(|r| r.outcome != Outcome::Ok || r.latency > unloaded_p99 * 2)
        .map(|r| r.arrival - OVERLOAD)
        .max()
        .unwrap_or(Duration::ZERO);
    Figures {
        goodput,
        p99: p99(good),
        recovery,
        refused: records
            .iter()
            .filter(in_overload)
            .filter(|r| r.outcome == Outcome::Refused)
            .count(),
    }
}

const PHASES: [(Duration, f64); 2] = [(OVERLOAD, 2.0 * CAPACITY), (CALM, 0.5 * CAPACITY)];

#[tokio::test(start_paused = true)]
async fn adaptive_and_fixed_limits_hold_goodput_through_an_overload_and_recover_first() {
    let unloaded = run(Upstream::new(), &[(Duration::from_secs(5), 0.5 * CAPACITY)]).await;
    let unloaded_p99 = p99(unloaded.iter().map(|r| r.latency).collect());

    let mut rows: Vec<(&str, Figures)> = Vec::new();
    let none = run(Upstream::new(), &PHASES).await;
    rows.push(("no limit", figures(&none, unloaded_p99)));

    let fixed = ConcurrencyLimitLayer::new(WORKERS as u32);
    let records = run(fixed.layer(Upstream::new()), &PHASES).await;
    rows.push(("steadfast fixed (10)", figures(&records, unloaded_p99)));

    // The builder's default: Vegas.
    let adaptive = ConcurrencyLimitLayer::builder().build().unwrap();
    let records = run(adaptive.layer(Upstream::new()), &PHASES).await;
    rows.push(("steadfast Vegas (default)", figures(&records, unloaded_p99)));

    let gradient = ConcurrencyLimitLayer::builder()
        .gradient2(Gradient2::default())
        .build()
        .unwrap();
    let records = run(gradient.layer(Upstream::new()), &PHASES).await;
    rows.push(("steadfast Gradient2", figures(&records, unloaded_p99)));

    let aimd = ConcurrencyLimitLayer::builder()
        .aimd(steadfast::limit::Aimd::default())
        .build()
        .unwrap();
    let records = run(aimd.layer(Upstream::new()), &PHASES).await;
    rows.push(("steadfast AIMD", figures(&records, unloaded_p99)));

    use tower_resilience::adaptive::{AdaptiveLimiterLayer, Aimd as TrAimd, Vegas as TrVegas};
    let tr_aimd = AdaptiveLimiterLayer::new(
        TrAimd::builder()
            .initial_limit(20)
            .min_limit(2)
            .max_limit(200)
            .build()
            .unwrap(),
    );
    let records = run(tr_aimd.layer(Upstream::new()), &PHASES).await;
    rows.push(("tower-resilience AIMD", figures(&records, unloaded_p99)));
    let tr_vegas = AdaptiveLimiterLayer::new(
        TrVegas::builder()
            .initial_limit(20)
            .min_limit(2)
            .max_limit(200)
            .build()
            .unwrap(),
    );
    let records = run(tr_vegas.layer(Upstream::new()), &PHASES).await;
    rows.push(("tower-resilience Vegas", figures(&records, unloaded_p99)));

    println!(
        "\nupstream: {WORKERS} workers × {SERVICE:?} ({CAPACITY} calls/s); offered 2× for {OVERLOAD:?}, then 0.5× for {CALM:?}; deadline {TIMEOUT:?}; unloaded p99 {unloaded_p99:?}\n"
    );
    println!(
        "| limit | goodput (share of capacity) | p99 of answered calls | refused | recovery |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, f) in &rows {
        let p99 = if f.goodput == 0.0 {
            "—".to_owned()
        } else {
            format!("{:.1} ms", f.p99.as_secs_f64() * 1e3)
        };
        println!(
            "| {name} | {:.1} % | {p99} | {} | {:.2} s |",
            f.goodput * 100.0,
            f.refused,
            f.recovery.as_secs_f64()
        );
    }

    let none = &rows[0].1;
    assert_eq!(
        none.goodput, 0.0,
        "no limit: every call waits behind the queue past its deadline"
    );
    for (name, f) in &rows[1..5] {
        assert!(f.goodput > none.goodput, "{name}: {f:?} vs {none:?}");
        assert!(f.recovery <= none.recovery, "{name}: {f:?} vs {none:?}");
    }
    // The default adaptive limit meets the goal: goodput ≥ 90 % of capacity, p99 within twice
    // the unloaded p99, and the fastest recovery of all.
    let ours = &rows[2].1;
    assert!(ours.goodput >= 0.9, "{ours:?}");
    assert!(
        ours.p99 <= unloaded_p99 * 2,
        "{ours:?} vs unloaded p99 {unloaded_p99:?}"
    );
    for (name, f) in &rows {
        assert!(
            ours.recovery <= f.recovery,
            "{name} recovered first: {f:?} vs {ours:?}"
        );
    }
}
