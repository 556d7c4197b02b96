//! End-to-end HTTP/1 benchmark over loopback: a hyper server with no middleware, with our
//! server stack, and with the nearest peer stack (tower-http's request-id pair and timeout);
//! then a bare client beside our client stack calling a bare server. Same connections and
//! duration for each. A shared machine's speed drifts by more than the differences measured,
//! so every round runs all contenders back to back (rotating their order) and each ratio is
//! taken within its round; the tables give the median over the rounds.
//!
//! Run: `cargo run --release -p steadfast-bench --bin e2e`

#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // wall time is the measurement

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use steadfast::retry::ReplayBody;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const CONNECTIONS: usize = 32;
const DURATION: Duration = Duration::from_millis(1500);
const ROUNDS: usize = 8;

async fn hello(_req: http::Request<Incoming>) -> Result<http::Response<Full<Bytes>>, Infallible> {
    Ok(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// Serves `svc` on 127.0.0.1 over HTTP/1 until the process ends.
async fn serve<S, B>(svc: S) -> SocketAddr
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

struct Figures {
    rps: f64,
    p99: Duration,
}

/// `CONNECTIONS` keep-alive connections sending back-to-back GETs for `DURATION`.
async fn load(addr: SocketAddr) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let stop = stop.clone();
        tasks.spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = stream.set_nodelay(true);
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let mut lat = Vec::with_capacity(100_000);
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get("/")
                    .header("host", "bench")
                    .header("x-correlation-id", "0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let t = Instant::now();
                if send.ready().await.is_err() {
                    break;
                }
                let Ok(res) = send.send_request(req).await else {
                    break;
                };
                let _ = res.into_body().collect().await;
                lat.push(t.elapsed());
            }
            lat
        });
    }
    measure(stop, tasks).await
}

/// `CONNECTIONS` concurrent callers through `client` for `DURATION`.
async fn load_client<S>(client: S) -> Figures
where
    S: Service<http::Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    S::Response: Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (stop, mut client) = (stop.clone(), client.clone());
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let req = http::Request::get("http://bench/")
                    .body(Full::default())
                    .expect("request");
                let _ = client
                    .ready()
                    .await
                    .expect("ready")
                    .call(req)
                    .await
                    .expect("response");
                lat.push(t.elapsed());
            }
            lat
        });
    }
    measure(stop, tasks).await
}

/// Lets `tasks` run for `DURATION`, stops them, and turns their latencies into figures.
async fn measure(stop: Arc<AtomicBool>, mut tasks: tokio::task::JoinSet<Vec<Duration>>) -> Figures {
    let start = Instant::now();
    tokio::time::sleep(DURATION).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    while let Some(Ok(l)) = tasks.join_next().await {
        all.extend(l);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    Figures {
        rps: all.len() as f64 / secs,
        p99: all.get(all.len() * 99 / 100).copied().unwrap_or_default(),
    }
}

/// Median of `values` (not empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// One table row: median req/s and p99 over the rounds, and the median of the per-round
/// ratios to the baseline (`base[i]` ran in the same round as `runs[i]`).
fn row(name: &str, runs: &[Figures], base: &[Figures]) {
    let rps = median(runs.iter().map(|f| f.rps).collect());
    let p99 = median(runs.iter().map(|f| f.p99.as_secs_f64()).collect());
    let rps_ratio = median(runs.iter().zip(base).map(|(f, b)| f.rps / b.rps).collect());
    let p99_ratio = median(
        runs.iter()
            .zip(base)
            .map(|(f, b)| f.p99.as_secs_f64() / b.p99.as_secs_f64())
            .collect(),
    );
    println!(
        "| {name} | {rps:.0} | {rps_ratio:.2} | {:.0} µs | {p99_ratio:.2} |",
        p99 * 1e6
    );
}

/// Routes every request to one fixed address (the bench server), whatever the URI says.
#[derive(Clone)]
struct Fixed<S>(S, SocketAddr);

impl<S, B> Service<http::Request<B>> for Fixed<S>
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
        *req.uri_mut() = format!("http://{}/", self.1).parse().expect("uri");
        self.0.call(req)
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

    let bare = serve(tower::service_fn(hello)).await;
    let ours = serve(
        steadfast::server::http()
            .build()
            .expect("valid")
            .layer(tower::service_fn(hello)),
    )
    .await;
    let header = http::HeaderName::from_static("x-correlation-id");
    let peer = serve(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::new(header.clone(), MakeRequestUuid))
            .layer(PropagateRequestIdLayer::new(header))
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                http::StatusCode::GATEWAY_TIMEOUT,
                Duration::from_secs(30),
            ))
            .service(tower::service_fn(hello)),
    )
    .await;

    // Rotate the order each round so no contender always runs first (or last).
    let targets = [bare, ours, peer];
    let mut results: [Vec<Figures>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for k in 0..3 {
            let i = (round + k) % 3;
            results[i].push(load(targets[i]).await);
        }
    }
    println!(
        "Server stacks: {CONNECTIONS} keep-alive connections, {DURATION:?} per run, {ROUNDS} rounds; medians, ratios within a round."
    );
    println!();
    println!("| server | req/s | × bare | p99 | p99 × bare |");
    println!("|---|---:|---:|---:|---:|");
    row("hyper, no middleware", &results[0], &results[0]);
    row("steadfast::server::http()", &results[1], &results[0]);
    row(
        "tower-http request-id pair + timeout",
        &results[2],
        &results[0],
    );

    let transport: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let stacked_transport: hyper_util::client::legacy::Client<_, ReplayBody<Full<Bytes>>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let stack = steadfast::client::http()
        .build()
        .expect("valid")
        .layer(Fixed(stacked_transport, bare));
    let (mut d, mut e) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            d.push(load_client(Fixed(transport.clone(), bare)).await);
            e.push(load_client(stack.clone()).await);
        } else {
            e.push(load_client(stack.clone()).await);
            d.push(load_client(Fixed(transport.clone(), bare)).await);
        }
    }
    println!();
    println!(
        "Client stacks calling the bare server: {CONNECTIONS} concurrent callers, {ROUNDS} rounds."
    );
    println!();
    println!("| client | req/s | × bare | p99 | p99 × bare |");
    println!("|---|---:|---:|---:|---:|");
    row("hyper-util client", &d, &d);
    row("steadfast::client::http() over it", &e, &d);
}
