//! A gateway-shaped benchmark (issue 22): a gateway on one tokio thread proxies GETs to an
//! upstream, with no middleware, with `server::http()` in front, with `client::http()` behind,
//! with both, with the floor behind (the client's wire work alone, hand-written:
//! `steadfast_bench::Floor`) and with floors on both sides (`ServerFloor` in front too); 32
//! keep-alive connections drive each, taking turns in short slices. It reports requests per
//! second and the gateway thread's CPU time per proxied request (read from
//! `/proc/self/task/<tid>/schedstat`, nanoseconds on the CPU), each as the median over the
//! rounds, with the per-round ratio (or difference) to the bare gateway.
//!
//! A second section rejects instead: gateways that answer every request with a 429, by a bare
//! handler, by a GCRA rate limit (`governor`, as the demo's gateway limits) that times the
//! rejection with its own clock, and by the same limiter with a clock made per rejection (as
//! tower_governor 0.8 does), each with nothing or `server::http()` in front.
//!
//! Run: `cargo run --release -p steadfast-bench --bin gateway [proxy|rejections]` (both
//! sections unless one is named).

#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // wall time is the measurement

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tower::{Layer, Service};

const CONNECTIONS: usize = 32;
const SLICE: Duration = Duration::from_millis(200);
const ROUNDS: usize = 30;

async fn hello(_req: http::Request<Incoming>) -> Result<http::Response<Full<Bytes>>, Infallible> {
    Ok(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// Serves over HTTP/1 on a listener already bound, each connection with the service `make`
/// returns for its peer's address.
async fn serve_with<S, B>(listener: tokio::net::TcpListener, make: impl Fn(SocketAddr) -> S)
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + 'static,
    S::Future: 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(make(peer));
        tokio::task::spawn_local(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A clone of `svc` for every connection.
fn clones<S: Clone>(svc: S) -> impl Fn(SocketAddr) -> S {
    move |_| svc.clone()
}

/// This thread's id, from `/proc/thread-self` (`<pid>/task/<tid>`).
fn thread_id() -> String {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    link.file_name()
        .expect("a tid")
        .to_string_lossy()
        .into_owned()
}

/// Nanoseconds thread `tid` has spent on a CPU.
fn cpu_ns(tid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What a gateway runs in front of its proxy (server side) and behind it (client side).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layers {
    /// Nothing: plain hyper.
    None,
    /// Our preset (`server::http()` in front, `client::http()` behind).
    Ours,
    /// The wire work of our preset alone, hand-written (`steadfast_bench::ServerFloor` in
    /// front, `steadfast_bench::Floor` behind).
    Floor,
}

/// Which layers a gateway runs.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stacks {
    server: Layers,
    client: Layers,
}

/// Starts a gateway on a thread of its own (a current-thread runtime) that runs `serve` on its
/// listener. Returns its address and thread id.
fn gateway<F>(
    name: String,
    serve: impl FnOnce(tokio::net::TcpListener) -> F + Send + 'static,
) -> (SocketAddr, String)
where
    F: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    // Named so that a profile tells the gateways apart (`perf report --sort comm,sym`).
    let thread = std::thread::Builder::new().name(name);
    thread
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                tx.send((listener.local_addr().expect("addr"), thread_id()))
                    .expect("report");
                serve(listener).await;
            });
        })
        .expect("gateway thread");
    rx.recv().expect("gateway started")
}

/// A gateway proxying to `upstream`, with our server stack in front and/or our client stack
/// behind.
fn proxying(upstream: SocketAddr, stacks: Stacks, name: String) -> (SocketAddr, String) {
    gateway(name, move |listener| async move {
        let uri = format!("http://{upstream}/");
        let bare_client =
            || -> Client<_, Full<Bytes>> { Client::builder(TokioExecutor::new()).build_http() };
        let our_client = || {
            steadfast::client::http()
                .build()
                .expect("valid")
                .hyper_client::<Full<Bytes>>()
        };
        let server = steadfast::server::http().build().expect("valid");
        macro_rules! front {
            ($proxy:expr) => {
                match stacks.server {
                    Layers::None => serve_with(listener, clones($proxy)).await,
                    Layers::Ours => serve_with(listener, clones(server.layer($proxy))).await,
                    Layers::Floor => {
                        serve_with(listener, clones(steadfast_bench::ServerFloor::new($proxy)))
                            .await
                    }
                }
            };
        }
        match stacks.client {
            Layers::None => front!(steadfast_bench::proxy!(bare_client(), uri)),
            Layers::Ours => front!(steadfast_bench::proxy!(our_client(), uri)),
            Layers::Floor => front!(steadfast_bench::proxy!(
                steadfast_bench::Floor::new(bare_client()),
                uri
            )),
        }
    })
}

/// How a rejecting gateway answers: every request is over its client's rate.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rejecter {
    /// A handler that answers 429 with `Retry-After: 1`, no limiter.
    Bare,
    /// A GCRA limiter (`governor`) keyed by the client's address, the rejection timed with the
    /// limiter's own clock: the demo's gateway.
    OwnClock,
    /// The same limiter, the rejection timed with a clock made for it, as tower_governor 0.8
    /// does (`DefaultClock::default().now()`).
    NewClock,
}

/// A gateway that rejects every request (one request per hour and address is allowed, and the
/// warm-up spends it), with our server stack in front or nothing.
fn rejecting(rejecter: Rejecter, front: Layers, name: String) -> (SocketAddr, String) {
    use governor::clock::{Clock, DefaultClock};
    use governor::{Quota, RateLimiter};

    gateway(name, move |listener| async move {
        let limiter = Arc::new(RateLimiter::keyed(
            Quota::with_period(Duration::from_secs(3600))
                .expect("period")
                .allow_burst(std::num::NonZeroU32::MIN),
        ));
        let body = || Full::new(Bytes::from_static(b"too many requests\n"));
        let make = move |peer: SocketAddr| {
            let limiter = limiter.clone();
            tower::service_fn(move |_req: http::Request<Incoming>| {
                let over = match rejecter {
                    Rejecter::Bare => Err(Duration::from_secs(1)),
                    Rejecter::OwnClock => limiter
                        .check_key(&peer.ip())
                        .map_err(|not_until| not_until.wait_time_from(limiter.clock().now())),
                    Rejecter::NewClock => limiter.check_key(&peer.ip()).map_err(|not_until| {
                        not_until.wait_time_from(DefaultClock::default().now())
                    }),
                };
                let res = match over {
                    Ok(()) => http::Response::new(Full::new(Bytes::from_static(b"ok"))),
                    Err(wait) => steadfast_bench::too_many_requests(wait, body()),
                };
                std::future::ready(Ok::<_, Infallible>(res))
            })
        };
        match front {
            Layers::Ours => {
                let server = steadfast::server::http().build().expect("valid");
                serve_with(listener, move |peer| server.layer(make(peer))).await
            }
            _ => serve_with(listener, make).await,
        }
    })
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

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

/// One slice through one gateway: (requests per second, CPU ns per request on its thread).
async fn slice(senders: &mut Vec<Sender>, tid: &str) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for mut send in senders.drain(..) {
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get("/")
                    .header("host", "gateway")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                if send.ready().await.is_err() {
                    break;
                }
                let Ok(res) = send.send_request(req).await else {
                    break;
                };
                let _ = res.into_body().collect().await;
                n += 1;
            }
            (send, n)
        });
    }
    let (cpu0, start) = (cpu_ns(tid), Instant::now());
    tokio::time::sleep(SLICE).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    while let Some(Ok((send, n))) = tasks.join_next().await {
        senders.push(send);
        total += n;
    }
    let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_ns(tid) - cpu0);
    (total as f64 / secs, cpu as f64 / total.max(1) as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs every gateway in `gateways` for `ROUNDS` rounds, one slice each, taking turns, and
/// prints their table against the first. `cost` names the last column.
async fn compare(gateways: Vec<(&str, (SocketAddr, String))>, cost: &str) {
    let mut conns = Vec::new();
    for (_, (addr, _)) in &gateways {
        conns.push(connect(*addr).await);
    }
    for (c, (_, (_, tid))) in conns.iter_mut().zip(&gateways) {
        slice(c, tid).await; // warm-up
    }
    let n = gateways.len();
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); n];
    for round in 0..ROUNDS {
        for k in 0..n {
            let i = (round + k) % n;
            results[i].push(slice(&mut conns[i], &gateways[i].1.1).await);
        }
    }
    println!("| gateway | req/s | × first | CPU per request | {cost} |");
    println!("|---|---:|---:|---:|---:|");
    for (i, (name, _)) in gateways.iter().enumerate() {
        let r = &results[i];
        let rps = median(r.iter().map(|x| x.0).collect());
        let cpu = median(r.iter().map(|x| x.1).collect());
        let ratio = median(r.iter().zip(&results[0]).map(|(o, b)| o.0 / b.0).collect());
        let extra = median(r.iter().zip(&results[0]).map(|(o, b)| o.1 - b.1).collect());
        let cpu_ratio = median(r.iter().zip(&results[0]).map(|(o, b)| o.1 / b.1).collect());
        let extra = if i == 0 {
            String::new()
        } else {
            format!("{:+.2} µs ({cpu_ratio:.2} ×)", extra / 1000.0)
        };
        println!(
            "| {name} | {rps:.0} | {ratio:.2} | {:.2} µs | {extra} |",
            cpu / 1000.0
        );
    }
    println!();
}

/// `gateway [proxy|rejections]`: both sections unless one is named.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let only = std::env::args().nth(1);
    let run = |section: &str| only.as_deref().is_none_or(|o| o == section);
    if run("proxy") {
        proxy_section().await;
    }
    if run("rejections") {
        rejections_section().await;
    }
}

/// Rate-limit rejections (issue 22): every request is over its client's rate; the limiter's
/// rejection against a handler that answers 429 and nothing else, behind the same front.
async fn rejections_section() {
    use Rejecter::{Bare, NewClock, OwnClock};
    let gateways = [
        (
            "a handler answering 429, nothing in front",
            (Bare, Layers::None),
        ),
        (
            "governor, its own clock (the demo's gateway)",
            (OwnClock, Layers::None),
        ),
        (
            "governor, a clock made per rejection (tower_governor 0.8)",
            (NewClock, Layers::None),
        ),
        (
            "a handler answering 429, server::http() in front",
            (Bare, Layers::Ours),
        ),
        (
            "governor, its own clock, server::http() in front",
            (OwnClock, Layers::Ours),
        ),
    ];
    println!(
        "Gateway on one thread rejecting every request (429, the client over its rate): {CONNECTIONS} keep-alive connections from one address, {ROUNDS} rounds of one {SLICE:?} slice each; medians, ratios and differences within a round."
    );
    println!();
    let started = gateways
        .iter()
        .enumerate()
        .map(|(i, (name, (rejecter, front)))| {
            (*name, rejecting(*rejecter, *front, format!("rl-{i}")))
        })
        .collect::<Vec<_>>();
    let (without, with) = started.split_at(3);
    compare(without.to_vec(), "CPU over the bare 429").await;
    compare(with.to_vec(), "CPU over the bare 429").await;
}

async fn proxy_section() {
    let upstream_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = upstream_listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = upstream_listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        TokioIo::new(stream),
                        TowerToHyperService::new(tower::service_fn(hello)),
                    )
                    .await;
            });
        }
    });
    use Layers::{Floor, None as Plain, Ours};
    let variants = [
        ("no middleware", (Plain, Plain)),
        ("server::http() only", (Ours, Plain)),
        ("client::http() only", (Plain, Ours)),
        ("server::http() + client::http()", (Ours, Ours)),
        (
            "floor behind: the client's wire work alone (an id and a deadline header, the head kept, a timer)",
            (Plain, Floor),
        ),
        (
            "floors both sides: also the server's (the id read, validated and echoed, the deadline header read)",
            (Floor, Floor),
        ),
    ]
    .map(|(name, (server, client))| (name, Stacks { server, client }));
    println!(
        "Gateway on one thread proxying GETs: {CONNECTIONS} keep-alive connections, {ROUNDS} rounds of one {SLICE:?} slice each; medians, ratios and differences within a round."
    );
    println!();
    let started = variants
        .iter()
        .enumerate()
        .map(|(i, (name, stacks))| (*name, proxying(upstream, *stacks, format!("gw-{i}"))))
        .collect();
    compare(started, "our layers' CPU per request").await;
}
