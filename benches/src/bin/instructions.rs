//! Instructions per call, counted by callgrind: a second view beside criterion's times that
//! a noisy neighbour cannot move (the same build gives the same count, run after run).
//!
//! Run: `bash benches/instructions.sh` (installs valgrind if missing, prints a markdown table).
//! By hand: `valgrind --tool=callgrind --toggle-collect='instructions::measured*'
//! target/release/instructions <case> <contender> <calls>`, then divide the summary by
//! `<calls>`. Instructions are not time (a stall costs cycles, not instructions), so read
//! these beside the criterion table, not instead of it.

use std::time::Duration;

use steadfast_bench::peers::{Failsafe, fs_breaker, tr_breaker_layer};
use steadfast_bench::{Bare, PendingOnce, call_with};
use tower::{Layer, Service, ServiceBuilder};

const FIVE_S: Duration = Duration::from_secs(5);
const THIRTY_S: Duration = Duration::from_secs(30);

/// Every case and its contenders, in table order.
const CASES: &[(&str, &[&str])] = &[
    ("timeout", &["bare", "tower", "steadfast"]),
    ("timeout-armed", &["bare", "tower", "steadfast"]),
    (
        "breaker",
        &["bare", "failsafe", "tower-resilience", "steadfast"],
    ),
    ("server-stack", &["bare", "tower-http", "steadfast"]),
];

fn plain() -> http::Request<()> {
    http::Request::new(())
}

fn with_id() -> http::Request<()> {
    let mut req = http::Request::new(());
    req.headers_mut().insert(
        http::HeaderName::from_static("x-correlation-id"),
        http::HeaderValue::from_static("0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60"),
    );
    req
}

/// The calls callgrind counts (its name is what `--toggle-collect` matches).
#[inline(never)]
fn measured<S>(svc: &mut S, make: fn() -> http::Request<()>, calls: u64)
where
    S: Service<http::Request<()>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..calls {
        call_with(svc, make());
    }
}

/// Warms caches and lazily built state outside the counted region.
#[inline(never)]
fn warm_up<S>(svc: &mut S, make: fn() -> http::Request<()>)
where
    S: Service<http::Request<()>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..1000 {
        call_with(svc, make());
    }
}

fn run<S>(mut svc: S, make: fn() -> http::Request<()>, calls: u64)
where
    S: Service<http::Request<()>>,
    S::Error: std::fmt::Debug,
{
    warm_up(&mut svc, make);
    measured(&mut svc, make, calls);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 2 && args[1] == "--list" {
        for (case, contenders) in CASES {
            println!("{case} {}", contenders.join(" "));
        }
        return;
    }
    let [_, case, contender, calls] = &args[..] else {
        eprintln!("usage: instructions <case> <contender> <calls> | --list");
        std::process::exit(2);
    };
    let Ok(calls) = calls.parse::<u64>() else {
        eprintln!("<calls> must be a number, not {calls:?}");
        std::process::exit(2);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    match (case.as_str(), contender.as_str()) {
        ("timeout" | "breaker", "bare") => run(Bare, plain, calls),
        ("timeout", "tower") => run(
            tower::timeout::TimeoutLayer::new(FIVE_S).layer(Bare),
            plain,
            calls,
        ),
        ("timeout", "steadfast") => run(
            steadfast::timeout::TimeoutLayer::new(FIVE_S).layer(Bare),
            plain,
            calls,
        ),
        ("timeout-armed", "bare") => run(PendingOnce, plain, calls),
        ("timeout-armed", "tower") => run(
            tower::timeout::TimeoutLayer::new(FIVE_S).layer(PendingOnce),
            plain,
            calls,
        ),
        ("timeout-armed", "steadfast") => run(
            steadfast::timeout::TimeoutLayer::new(FIVE_S).layer(PendingOnce),
            plain,
            calls,
        ),
        ("breaker", "failsafe") => run(Failsafe::new(Bare, fs_breaker(THIRTY_S)), plain, calls),
        ("breaker", "tower-resilience") => {
            run(tr_breaker_layer(THIRTY_S).layer(Bare), plain, calls)
        }
        ("breaker", "steadfast") => run(
            steadfast::breaker::CircuitBreakerLayer::new().layer(Bare),
            plain,
            calls,
        ),
        ("server-stack", "bare") => run(Bare, with_id, calls),
        ("server-stack", "tower-http") => {
            use tower_http::request_id::{
                MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer,
            };
            let header = http::HeaderName::from_static("x-correlation-id");
            let svc = ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(header.clone(), MakeRequestUuid))
                .layer(PropagateRequestIdLayer::new(header))
                .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                    http::StatusCode::GATEWAY_TIMEOUT,
                    THIRTY_S,
                ))
                .service(Bare);
            run(svc, with_id, calls);
        }
        ("server-stack", "steadfast") => run(
            steadfast::server::http()
                .build()
                .expect("valid")
                .layer(Bare),
            with_id,
            calls,
        ),
        _ => {
            eprintln!("unknown case/contender {case}/{contender}; see --list");
            std::process::exit(2);
        }
    }
}
