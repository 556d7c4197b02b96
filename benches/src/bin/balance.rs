//! A service of three instances over loopback HTTP/1: one healthy, one answering 503 to every
//! other request, one adding 200 ms to every answer. The same load (32 concurrent callers for
//! a few seconds, every call retried as the default retry layer allows) through each way of
//! choosing an instance, and once against the healthy instance alone for reference:
//!
//! - round-robin (our balancer with its failure penalty and ejection turned off),
//! - tower's power-of-two-choices balancer over `PeakEwma`, behind the `Buffer` it needs to be
//!   shared,
//! - our balancer with its defaults, alone and inside the whole client preset.
//!
//! Run: `cargo run --release -p steadfast-bench --bin balance`.

#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // wall time is the measurement

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use steadfast::balance::{BalanceLayer, Pick};
use steadfast::retry::{ReplayBody, RetryLayer};
use steadfast_bench::Fixed;
use tower::{BoxError, Layer, Service, ServiceExt};

const CALLERS: usize = 32;
const RUN: Duration = Duration::from_secs(8);

type Transport = Client<HttpConnector, ReplayBody<Full<Bytes>>>;

/// Serves on 127.0.0.1: `fail_every_other` answers 503 to every other request, `delay` is
/// added to every answer.
async fn instance(fail_every_other: bool, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let n = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let n = n.clone();
            let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
                let n = n.clone();
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let fail = fail_every_other && n.fetch_add(1, Ordering::Relaxed) % 2 == 0;
                    let mut res = http::Response::new(Full::new(Bytes::from_static(b"ok")));
                    if fail {
                        *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    Ok::<_, Infallible>(res)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

struct Outcome {
    calls: usize,
    ok: usize,
    p50: Duration,
    p99: Duration,
}

/// `CALLERS` callers through `client` for `RUN`.
async fn drive<S, B>(client: S) -> Outcome
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let (stop, client) = (stop.clone(), client.clone());
        tasks.spawn(async move {
            let mut seen = Vec::with_capacity(4096);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let req = http::Request::get("http://orders/items/7")
                    .body(Full::default())
                    .expect("request");
                let out = client
                    .clone()
                    .oneshot(req)
                    .await
                    .map_err(Into::<BoxError>::into);
                if std::env::var_os("BALANCE_DEBUG").is_some() {
                    match &out {
                        Ok(r) if r.status() != 200 => eprintln!("status {}", r.status()),
                        Err(e) => eprintln!("error {e}"),
                        _ => {}
                    }
                }
                let ok = matches!(out, Ok(r) if r.status() == 200);
                seen.push((t.elapsed(), ok));
            }
            seen
        });
    }
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    while let Some(Ok(v)) = tasks.join_next().await {
        all.extend(v);
    }
    let ok = all.iter().filter(|(_, ok)| *ok).count();
    let mut lat: Vec<Duration> = all.iter().map(|(d, _)| *d).collect();
    lat.sort();
    let at = |q: usize| lat.get(lat.len() * q / 100).copied().unwrap_or_default();
    Outcome {
        calls: all.len(),
        ok,
        p50: at(50),
        p99: at(99),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    use tower::balance::p2c::Balance as TowerBalance;
    use tower::discover::ServiceList;
    use tower::load::{CompleteOnResponse, PeakEwma};

    let healthy = instance(false, Duration::ZERO).await;
    let flaky = instance(true, Duration::ZERO).await;
    let slow = instance(false, Duration::from_millis(200)).await;
    let endpoints: Vec<String> = [healthy, flaky, slow]
        .iter()
        .map(ToString::to_string)
        .collect();
    let transport = || -> Transport { Client::builder(TokioExecutor::new()).build_http() };

    let mut rows: Vec<(&str, Outcome)> = Vec::new();
    let alone = drive(RetryLayer::new().layer(Fixed(transport(), healthy))).await;
    rows.push(("the healthy instance alone (reference)", alone));

    let round_robin = BalanceLayer::builder()
        .endpoints(&endpoints)
        .pick(Pick::RoundRobin)
        .failure_penalty(Duration::ZERO)
        .consecutive_failures(None)
        .success_rate(None)
        .failure_percentage(None)
        .build()
        .expect("valid");
    let rr = drive(RetryLayer::new().layer(round_robin.layer(transport()))).await;
    rows.push(("round-robin + retry", rr));

    let tower_p2c = {
        let list: Vec<_> = [healthy, flaky, slow]
            .iter()
            .map(|a| {
                PeakEwma::new(
                    Fixed(transport(), *a),
                    Duration::from_millis(30),
                    10e9,
                    CompleteOnResponse::default(),
                )
            })
            .collect();
        tower::buffer::Buffer::new(
            TowerBalance::new(ServiceList::new::<http::Request<ReplayBody<Full<Bytes>>>>(
                list,
            )),
            1024,
        )
    };
    let tp = drive(RetryLayer::new().layer(tower_p2c)).await;
    rows.push(("tower p2c + PeakEwma (behind a Buffer) + retry", tp));

    let ours = BalanceLayer::builder()
        .endpoints(&endpoints)
        .build()
        .expect("valid");
    let st = drive(RetryLayer::new().layer(ours.layer(transport()))).await;
    rows.push(("steadfast BalanceLayer + retry", st));

    let preset = steadfast::client::http()
        .balance(|b| b.endpoints(&endpoints))
        .build()
        .expect("valid");
    let pr = drive(preset.layer(transport())).await;
    rows.push(("steadfast::client::http().balance(..)", pr));

    // Envoy's and A50's defaults judge failure rates only from 5 hosts up: for 3 instances, a
    // user turns the failure-percentage rule on for 3, and evaluates every second.
    let small = BalanceLayer::builder()
        .endpoints(&endpoints)
        .interval(Duration::from_secs(1))
        .failure_percentage(Some(
            steadfast::balance::FailurePercentage::default()
                .minimum_hosts(3)
                .threshold(30)
                .request_volume(20),
        ))
        .max_ejection_percent(34)
        .build()
        .expect("valid");
    let sm = drive(RetryLayer::new().layer(small.layer(transport()))).await;
    if std::env::var_os("BALANCE_DEBUG").is_some() {
        eprintln!("{healthy} {flaky} {slow}: {:?}", small.handle().list());
    }
    rows.push(("steadfast BalanceLayer + retry, tuned for 3 instances", sm));

    // The cost of the stack itself: three healthy instances, a bare hyper-util client taking
    // them in turn, beside the balanced client preset.
    let healthy3 = [
        instance(false, Duration::ZERO).await,
        instance(false, Duration::ZERO).await,
        instance(false, Duration::ZERO).await,
    ];
    let plain: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let bare = RoundRobin(plain, healthy3, Arc::default());
    let bare_run = drive(bare).await;
    let all3: Vec<String> = healthy3.iter().map(ToString::to_string).collect();
    let balanced = steadfast::client::http()
        .balance(|b| b.endpoints(&all3))
        .build()
        .expect("valid");
    let balanced_run = drive(balanced.layer(transport())).await;
    let secs = RUN.as_secs_f64();
    let per_sec = |o: &Outcome| o.calls as f64 / secs;

    let reference = rows[0].1.p99;
    println!("| contender | calls | success | p50 | p99 | p99 × healthy alone |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, o) in &rows {
        println!(
            "| {name} | {} | {:.2} % | {} | {} | {:.2} |",
            o.calls,
            100.0 * o.ok as f64 / o.calls.max(1) as f64,
            ms(o.p50),
            ms(o.p99),
            o.p99.as_secs_f64() / reference.as_secs_f64().max(1e-9),
        );
    }
    println!();
    println!(
        "Three healthy instances: the client stack against a bare client taking them in turn."
    );
    println!();
    println!("| client | calls/s | × bare | p50 | p99 |");
    println!("|---|---:|---:|---:|---:|");
    for (name, o) in [
        ("hyper-util client, round-robin by hand", &bare_run),
        ("steadfast::client::http().balance(..)", &balanced_run),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {} | {} |",
            per_sec(o),
            per_sec(o) / per_sec(&bare_run),
            ms(o.p50),
            ms(o.p99),
        );
    }
}

/// Takes the addresses in turn, with no other logic: the bare baseline.
#[derive(Clone)]
struct RoundRobin<S>(S, [SocketAddr; 3], Arc<AtomicU64>);

impl<S, B> Service<http::Request<B>> for RoundRobin<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        let i = self.2.fetch_add(1, Ordering::Relaxed) as usize % 3;
        *req.uri_mut() = format!("http://{}/", self.1[i]).parse().expect("uri");
        self.0.call(req)
    }
}
