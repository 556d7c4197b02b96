//! Real calls for a profiler: one thread runs a hyper server and makes `<calls>` GETs to it,
//! one after another, through a bare hyper-util client or through `client::http()` over the
//! same client, with the id and a deadline ambient as inside a handler. Under callgrind or
//! dhat the difference between the two runs, divided by the calls, is what our client stack
//! costs on the real path (real bodies, an armed timer per layer, the pool), which the
//! in-process rows do not see.
//!
//! `stack-edge` calls through the stack with no ambient id or deadline (as at an edge: the
//! stack makes an id for every call); `floor` through `steadfast_bench::Floor` (the wire work
//! alone); `+replay` … `+id` through the preset's layers built up one at a time. The
//! `server-bare`, `server-stack` and `server-floor` modes measure the other side: a bare
//! client calling a server whose handler waits twice, without middleware, with
//! `server::http()`, and with `steadfast_bench::ServerFloor`.
//!
//! `gateway-bare`, `gateway-stack` and `gateway-floor` put a gateway between the client and
//! the server (the seed's shape): a bare client calls a gateway whose handler proxies each
//! GET to the server through a hyper-util client and answers with the upstream's body; the
//! gateway runs no layers, `server::http()` in front and `client::http()` behind, or the
//! floors on both sides (`ServerFloor`, `Floor`). The difference to `gateway-bare` is what
//! our two stacks cost per proxied request.
//!
//! Run: `valgrind --tool=callgrind target/release/calls <mode> <calls>` (or
//! `--tool=dhat`), both modes with the same `<calls>`, then divide the difference of the
//! totals by `<calls>`. One thread and sequential calls keep the count the same from run to
//! run.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use steadfast::common::Deadline;
use steadfast::correlation::CorrelationId;
use steadfast::retry::ReplayBody;
use tower::{Layer, Service, ServiceExt};

async fn hello(_req: http::Request<Incoming>) -> Result<http::Response<Full<Bytes>>, Infallible> {
    Ok(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// A handler that waits twice before it answers (as one that calls an upstream is polled
/// more than once): what a server layer costs per poll shows.
async fn waits(_req: http::Request<Incoming>) -> Result<http::Response<Full<Bytes>>, Infallible> {
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    Ok(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// `calls` GETs through `client`, each body read to its end.
async fn run<S, B>(mut client: S, uri: &str, calls: u64)
where
    S: Service<http::Request<Empty<Bytes>>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    for _ in 0..calls {
        let req = http::Request::get(uri).body(Empty::new()).expect("request");
        let res = client
            .ready()
            .await
            .expect("ready")
            .call(req)
            .await
            .expect("answer");
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.expect("body");
    }
}

/// Which server answers.
#[derive(Clone, Copy)]
enum Server {
    Hello,
    Waits,
    Stack,
    Floor,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(Ok(calls))) = (args.get(1), args.get(2).map(|c| c.parse::<u64>())) else {
        eprintln!(
            "usage: calls <bare|stack|stack-edge|floor|server-bare|server-stack|server-floor|gateway-bare|gateway-stack|gateway-floor|+step> <calls>"
        );
        std::process::exit(2);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(layers) = mode.strip_prefix("gateway-") {
        tokio::task::LocalSet::new().block_on(&rt, gateway(layers, calls));
        return;
    }
    rt.block_on(async {
        let server = match mode.as_str() {
            "server-bare" => Server::Waits,
            "server-stack" => Server::Stack,
            "server-floor" => Server::Floor,
            _ => Server::Hello,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let io = TokioIo::new(tcp);
                let http = hyper::server::conn::http1::Builder::new();
                match server {
                    Server::Hello => {
                        tokio::spawn(http.serve_connection(io, service_fn(hello)));
                    }
                    Server::Waits => {
                        tokio::spawn(http.serve_connection(io, service_fn(waits)));
                    }
                    Server::Stack => {
                        let svc = steadfast::server::http()
                            .build()
                            .expect("valid")
                            .layer(tower::service_fn(waits));
                        tokio::spawn(http.serve_connection(io, TowerToHyperService::new(svc)));
                    }
                    Server::Floor => {
                        let svc = steadfast_bench::ServerFloor::new(tower::service_fn(waits));
                        tokio::spawn(http.serve_connection(io, TowerToHyperService::new(svc)));
                    }
                }
            }
        });
        let uri = format!("http://{addr}/");
        let client: Client<_, ReplayBody<Empty<Bytes>>> =
            Client::builder(TokioExecutor::new()).build_http();
        let id = CorrelationId::parse("0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60").expect("valid");
        let deadline = Deadline::after(Duration::from_secs(30));
        // As inside a handler: the server layers made the id and the deadline ambient.
        let work = async {
            match mode.as_str() {
                "bare" | "server-bare" | "server-stack" | "server-floor" | "stack-edge" => {
                    let bare: Client<_, Empty<Bytes>> =
                        Client::builder(TokioExecutor::new()).build_http();
                    run(bare, &uri, calls).await;
                }
                "stack" => {
                    let stack = steadfast::client::http().build().expect("valid");
                    run(stack.layer(client.clone()), &uri, calls).await;
                }
                // The wire work alone, hand-written: the floor under the stack.
                "floor" => {
                    let bare: Client<_, Empty<Bytes>> =
                        Client::builder(TokioExecutor::new()).build_http();
                    run(steadfast_bench::Floor::new(bare), &uri, calls).await;
                }
                // The preset's layers built up innermost first (as `instructions
                // client-layers` does in process): what each adds on the real path.
                step if step.starts_with('+') => steps(step, client.clone(), &uri, calls).await,
                other => {
                    eprintln!("unknown mode {other:?}: bare or stack");
                    std::process::exit(2);
                }
            }
        };
        if mode == "stack-edge" {
            // As at an edge: no inbound id, no inbound deadline (the stack makes an id).
            let stack = steadfast::client::http().build().expect("valid");
            run(stack.layer(client.clone()), &uri, calls).await;
        } else {
            id.scope(deadline.scope(work)).await;
        }
    });
}

/// The client stack built up one layer at a time, innermost first, with the preset's
/// settings: `+replay` (the replay body the retry layer sends, alone), `+timeout`,
/// `+breaker`, `+retry`, `+deadline`, `+id`.
async fn steps<S>(step: &str, client: S, uri: &str, calls: u64)
where
    S: Service<http::Request<ReplayBody<Empty<Bytes>>>, Response = http::Response<Incoming>>
        + Clone,
    S::Error: Into<steadfast::common::BoxError> + std::fmt::Debug,
{
    let steadfast_bench::PresetLayers {
        attempt,
        breaker,
        retry,
        total,
        id,
    } = steadfast_bench::PresetLayers::default();
    let adapt = tower::util::MapRequestLayer::new(|req: http::Request<Empty<Bytes>>| {
        req.map(|b| ReplayBody::new(b, 0))
    });
    match step {
        // The body type alone: the retry layer's replay body over the same client.
        "+replay" => run(adapt.layer(client), uri, calls).await,
        "+timeout" => run(adapt.layer(attempt.layer(client)), uri, calls).await,
        "+breaker" => {
            run(
                adapt.layer(breaker.layer(attempt.layer(client))),
                uri,
                calls,
            )
            .await
        }
        "+retry" => {
            run(
                retry.layer(breaker.layer(attempt.layer(client))),
                uri,
                calls,
            )
            .await
        }
        "+deadline" => {
            let s = total.layer(retry.layer(breaker.layer(attempt.layer(client))));
            run(s, uri, calls).await;
        }
        "+id" => {
            let s = id.layer(total.layer(retry.layer(breaker.layer(attempt.layer(client)))));
            run(s, uri, calls).await;
        }
        other => {
            eprintln!(
                "unknown step {other:?}: +replay, +timeout, +breaker, +retry, +deadline or +id"
            );
            std::process::exit(2);
        }
    }
}

/// Binds a listener on 127.0.0.1 and serves `svc` on it, one connection task each.
async fn serve<S, B>(svc: S) -> std::net::SocketAddr
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + 'static,
    S::Future: 'static,
    S::Error: Into<steadfast::common::BoxError>,
    B: http_body::Body<Data = Bytes> + 'static,
    B::Error: Into<steadfast::common::BoxError>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::task::spawn_local(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::task::spawn_local(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

/// `calls` GETs from a bare client through a gateway (`layers`: `bare`, `stack` or `floor`)
/// to the server.
async fn gateway(layers: &str, calls: u64) {
    let upstream = serve(tower::service_fn(hello)).await;
    let uri = format!("http://{upstream}/");
    let bare_client =
        || -> Client<_, Full<Bytes>> { Client::builder(TokioExecutor::new()).build_http() };
    let gateway = match layers {
        "bare" => serve(steadfast_bench::proxy!(bare_client(), uri)).await,
        "stack" => {
            let client = steadfast::client::http()
                .build()
                .expect("valid")
                .hyper_client::<Full<Bytes>>();
            let server = steadfast::server::http().build().expect("valid");
            serve(server.layer(steadfast_bench::proxy!(client, uri))).await
        }
        "floor" => {
            let client = steadfast_bench::Floor::new(bare_client());
            serve(steadfast_bench::ServerFloor::new(steadfast_bench::proxy!(
                client, uri
            )))
            .await
        }
        other => {
            eprintln!("unknown gateway {other:?}: gateway-bare, gateway-stack or gateway-floor");
            std::process::exit(2);
        }
    };
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    run(client, &format!("http://{gateway}/"), calls).await;
}
