//! End-to-end HTTP/1 benchmark over loopback: a hyper server with no middleware, with our
//! server stack, and with the nearest peer stack (tower-http's request-id pair and timeout);
//! then a bare client beside our client stack calling a bare server. Same connections and
//! duration for each; the client stack also beside the nearest peer stack (tower's retry and
//! timeouts, tower-resilience's breaker, tower-http's request-id pair) over the same client.
//! Each table ends with a floor row: the stack's wire work alone, hand-written
//! (`steadfast_bench::Floor`, `ServerFloor`): a floor for any stack that sends and honours
//! the same headers and can send a call again. The server's table also has the floor with
//! the correlation layer's contract (`ServerContractFloor`: the id as a request extension and
//! ambient in the handler).
//!
//! A shared machine's speed drifts by more than the differences measured, so the contenders
//! take turns in short slices (rotating their order every round), each ratio is taken within
//! its round, and the tables give the median over the rounds. Every contender's connections
//! are opened once, before the first slice, and kept for the whole run: no slice pays for
//! handshakes. A second bare server runs as a control: its ratio to the first would be 1.00
//! on a quiet machine, so how far it strays is the resolution of the run.
//!
//! Run: `cargo run --release -p steadfast-bench --bin e2e` (`E2E_DEBUG=1` also prints every
//! round's ratio, sorted, to stderr).

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
use steadfast_bench::peers::{TowerPolicy, tr_breaker_layer};
use steadfast_bench::{Fixed, Floor, ServerContractFloor, ServerFloor};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const CONNECTIONS: usize = 32;
/// One contender's turn.
const SLICE: Duration = Duration::from_millis(200);
const ROUNDS: usize = 60;

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

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Opens `CONNECTIONS` keep-alive connections to `addr`.
async fn connect(addr: SocketAddr) -> Vec<Sender> {
    let mut senders = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        senders.push(send);
    }
    senders
}

/// One slice: every connection in `senders` sends back-to-back GETs for `SLICE`.
async fn load(senders: &mut Vec<Sender>) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for mut send in senders.drain(..) {
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(16_384);
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
            (send, lat)
        });
    }
    let (secs, done) = slice(&stop, tasks).await;
    let mut all = Vec::new();
    for (send, lat) in done {
        senders.push(send);
        all.extend(lat);
    }
    figures(secs, all)
}

/// One slice: `CONNECTIONS` concurrent callers through `client` for `SLICE` (the client's
/// pool keeps its connections from one slice to the next).
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
            let mut lat = Vec::with_capacity(16_384);
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
    let (secs, done) = slice(&stop, tasks).await;
    figures(secs, done.into_iter().flatten().collect())
}

/// Lets `tasks` run for `SLICE`, stops them, and returns the seconds it took until the last
/// one finished, with what each returned.
async fn slice<T: 'static>(stop: &AtomicBool, mut tasks: tokio::task::JoinSet<T>) -> (f64, Vec<T>) {
    let start = Instant::now();
    tokio::time::sleep(SLICE).await;
    stop.store(true, Ordering::Relaxed);
    let mut done = Vec::with_capacity(tasks.len());
    while let Some(Ok(t)) = tasks.join_next().await {
        done.push(t);
    }
    (start.elapsed().as_secs_f64(), done)
}

/// Requests per second over `secs` and the p99 of `latencies`.
fn figures(secs: f64, mut latencies: Vec<Duration>) -> Figures {
    latencies.sort();
    Figures {
        rps: latencies.len() as f64 / secs,
        p99: latencies
            .get(latencies.len() * 99 / 100)
            .copied()
            .unwrap_or_default(),
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

/// A distribution-free 95 % confidence interval for the median of `values` (not empty): the
/// order statistics at ranks n/2 ∓ 0.98·√n (the binomial's normal approximation). With 60
/// rounds these are the 22nd and 39th smallest.
fn median_ci(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let half = 0.98 * (n as f64).sqrt();
    let lo = ((n as f64 / 2.0 - half).floor() as usize).clamp(1, n);
    let hi = ((n as f64 / 2.0 + half).ceil() as usize + 1).clamp(1, n);
    (values[lo - 1], values[hi - 1])
}

/// One table row: median req/s and p99 over the rounds, and the median of the per-round
/// ratios to the baseline (`base[i]` ran in the same round as `runs[i]`) with its 95 %
/// confidence interval.
fn row(name: &str, runs: &[Figures], base: &[Figures]) {
    let rps = median(runs.iter().map(|f| f.rps).collect());
    let p99 = median(runs.iter().map(|f| f.p99.as_secs_f64()).collect());
    let ratios: Vec<f64> = runs.iter().zip(base).map(|(f, b)| f.rps / b.rps).collect();
    let rps_ratio = median(ratios.clone());
    let (lo, hi) = median_ci(ratios.clone());
    if std::env::var_os("E2E_DEBUG").is_some() {
        let mut r = ratios;
        r.sort_by(f64::total_cmp);
        eprintln!("{name}: {r:.2?}");
    }
    let p99_ratio = median(
        runs.iter()
            .zip(base)
            .map(|(f, b)| f.p99.as_secs_f64() / b.p99.as_secs_f64())
            .collect(),
    );
    println!(
        "| {name} | {rps:.0} | {rps_ratio:.2} | {lo:.2}–{hi:.2} | {:.0} µs | {p99_ratio:.2} |",
        p99 * 1e6
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

    let bare = serve(tower::service_fn(hello)).await;
    // A second bare server: its ratio to the first shows how finely this harness resolves a
    // difference on this machine (it should read 1.00).
    let control = serve(tower::service_fn(hello)).await;
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

    // The server's wire work alone (see `ServerFloor`), and with the correlation layer's
    // request extension and ambient id (see `ServerContractFloor`).
    let floor = serve(ServerFloor::new(tower::service_fn(hello))).await;
    let contract = serve(ServerContractFloor::new(tower::service_fn(hello))).await;

    // Connections are opened once; one unmeasured slice each warms them. Then the order
    // rotates every round so no contender always runs first (or last).
    let mut conns = [
        connect(bare).await,
        connect(control).await,
        connect(ours).await,
        connect(peer).await,
        connect(floor).await,
        connect(contract).await,
    ];
    for c in conns.iter_mut() {
        load(c).await;
    }
    let n = conns.len();
    let mut results: [Vec<Figures>; 6] = Default::default();
    for round in 0..ROUNDS {
        for k in 0..n {
            let i = (round + k) % n;
            results[i].push(load(&mut conns[i]).await);
        }
    }
    println!(
        "Server stacks: {CONNECTIONS} keep-alive connections, {ROUNDS} rounds of one {SLICE:?} slice each; medians, ratios within a round."
    );
    println!();
    println!("| server | req/s | × bare | 95 % CI of × bare | p99 | p99 × bare |");
    println!("|---|---:|---:|---:|---:|---:|");
    row("hyper, no middleware", &results[0], &results[0]);
    row(
        "hyper, no middleware, a second server (A/A control)",
        &results[1],
        &results[0],
    );
    row("steadfast::server::http()", &results[2], &results[0]);
    row(
        "tower-http request-id pair + timeout",
        &results[3],
        &results[0],
    );
    row(
        "floor: the wire work alone, hand-written (the id read, validated and echoed; the deadline header read)",
        &results[4],
        &results[0],
    );
    row(
        "floor with the contract: also the id as a request extension and ambient in the handler",
        &results[5],
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
    let bare_client = Fixed(transport.clone(), bare);
    // The nearest peer stack over the same kind of client, in the same order as ours: request
    // id pair, total timeout, retry with tower's budget, tower-resilience's breaker, attempt
    // timeout.
    let peer_client = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .timeout(Duration::from_secs(10))
        .layer(tower::retry::RetryLayer::new(TowerPolicy::new(true)))
        .layer(tr_breaker_layer(Duration::from_secs(30)))
        .timeout(Duration::from_secs(5))
        .service(Fixed(
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http(),
            bare,
        ));
    // The wire work alone (see `Floor`), over a client of its own.
    let floor_client = Floor::new(Fixed(transport, bare));
    load_client(bare_client.clone()).await;
    load_client(stack.clone()).await;
    load_client(peer_client.clone()).await;
    load_client(floor_client.clone()).await;
    let (mut d, mut e, mut p, mut f) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // The order rotates every round, as for the servers.
        for k in 0..4 {
            match (round + k) % 4 {
                0 => d.push(load_client(bare_client.clone()).await),
                1 => e.push(load_client(stack.clone()).await),
                2 => p.push(load_client(peer_client.clone()).await),
                _ => f.push(load_client(floor_client.clone()).await),
            }
        }
    }
    println!();
    println!(
        "Client stacks calling the bare server: {CONNECTIONS} concurrent callers, {ROUNDS} rounds of one {SLICE:?} slice each."
    );
    println!();
    println!("| client | req/s | × bare | 95 % CI of × bare | p99 | p99 × bare |");
    println!("|---|---:|---:|---:|---:|---:|");
    row("hyper-util client", &d, &d);
    row("steadfast::client::http() over it", &e, &d);
    row(
        "tower retry + timeouts, tower-resilience breaker, tower-http request-id over it",
        &p,
        &d,
    );
    row(
        "floor: the wire work alone, hand-written (an id and a deadline header, the head kept, a timer)",
        &f,
        &d,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_ci_brackets_the_median_by_order_statistics() {
        let v: Vec<f64> = (1..=60).rev().map(f64::from).collect();
        assert_eq!(median(v.clone()), 30.5);
        assert_eq!(median_ci(v), (22.0, 39.0));
        // Too few values for an interval narrower than the whole range.
        assert_eq!(median_ci(vec![3.0, 1.0, 2.0]), (1.0, 3.0));
        assert_eq!(median_ci(vec![5.0]), (5.0, 5.0));
    }
}
