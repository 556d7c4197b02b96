//! Instructions per call, counted by callgrind: a second view beside criterion's times that
//! a noisy neighbour cannot move (the same build gives the same count, run after run).
//!
//! Run: `bash benches/instructions.sh` (installs valgrind if missing, prints a markdown table).
//! By hand: `valgrind --tool=callgrind --toggle-collect='instructions::measured*'
//! target/release/instructions <case> <contender> <calls>`, then divide the summary by
//! `<calls>`. Instructions are not time (a stall costs cycles, not instructions), so read
//! these beside the criterion table, not instead of it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;

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
        &[
            "bare",
            "failsafe",
            "tower-resilience",
            "steadfast",
            "+bare-to-upstream",
            "+per-authority",
            "+bare-clone-per-call",
            "+per-authority-clone-per-call",
        ],
    ),
    (
        "limit",
        &[
            "bare",
            "tower",
            "steadfast",
            "+vegas",
            "+bare-to-upstream",
            "+per-authority",
        ],
    ),
    ("hedge", &["bare", "tower", "steadfast", "+fixed"]),
    ("hedge-armed", &["bare", "tower", "steadfast", "+fixed"]),
    // `floor`: the hand-written wire work alone (`steadfast_bench::Floor`, `ServerFloor`);
    // `floor-with-contract`: also the correlation layer's extension and ambient id, at their
    // cheapest (`ServerContractFloor`).
    (
        "server-stack",
        &["bare", "tower-http", "steadfast", "floor"],
    ),
    (
        "correlation-server",
        &[
            "bare",
            "tower-http",
            "steadfast",
            "+no-extension",
            "floor",
            "floor-with-contract",
        ],
    ),
    (
        "client-stack",
        &[
            "bare",
            "tower+tower-http+tower-resilience",
            "steadfast",
            "floor",
        ],
    ),
    (
        "client-stack-armed",
        &[
            "bare",
            "tower+tower-http+tower-resilience",
            "steadfast",
            "floor",
        ],
    ),
    // The client stack with a tracing subscriber (a registry: every span is made) and, with
    // the `metrics` feature, a metrics recorder installed for the thread.
    ("client-observed", &["bare", "steadfast"]),
    // The client stack built up one layer at a time, innermost first, with the preset's
    // settings (contenders starting with `+` are steps, not peers).
    (
        "client-layers",
        &["bare", "+timeout", "+breaker", "+retry", "+deadline", "+id"],
    ),
];

fn plain() -> http::Request<()> {
    http::Request::new(())
}

/// The client stack's per-authority breakers, alone.
fn per_authority() -> steadfast::breaker::KeyedCircuitBreakerLayer<
    steadfast::common::DefaultClassifier,
    steadfast::breaker::ByAuthority,
    Option<http::uri::Authority>,
> {
    steadfast::breaker::CircuitBreakerLayer::builder()
        .build_per_authority()
        .expect("valid")
}

fn to_upstream() -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.uri_mut() = http::Uri::from_static("http://orders:8080/orders/17");
    req
}

fn empty_body() -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::new(http_body_util::Empty::new())
}

fn tower_hedge<S>(inner: S) -> tower::hedge::Hedge<S, steadfast_bench::peers::TowerHedgePolicy>
where
    S: Service<http::Request<http_body_util::Empty<bytes::Bytes>>> + Clone,
    S::Error: Into<tower::BoxError>,
{
    // With a learnt delay from the start (100 ms), as ours has one after its first window:
    // without one, tower's hedge arms no timer at all.
    tower::hedge::Hedge::new_with_mock_latencies(
        inner,
        steadfast_bench::peers::TowerHedgePolicy,
        100,
        0.95,
        Duration::from_secs(10),
        &[100; 100],
    )
}

fn fixed_hedge() -> steadfast::retry::HedgeLayer {
    steadfast::retry::HedgeLayer::builder()
        .delay(steadfast::retry::HedgeDelay::Fixed(Duration::from_millis(
            100,
        )))
        .build()
        .expect("valid")
}

fn with_id() -> http::Request<()> {
    let mut req = http::Request::new(());
    req.headers_mut().insert(
        http::HeaderName::from_static("x-correlation-id"),
        http::HeaderValue::from_static("0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60"),
    );
    req
}

/// An outgoing GET as a handler makes it: an absolute URI, no body.
fn outgoing() -> http::Request<Empty<Bytes>> {
    let mut req = http::Request::new(Empty::new());
    *req.uri_mut() = http::Uri::from_static("http://orders:8080/orders/17");
    req
}

/// The calls callgrind counts (its name is what `--toggle-collect` matches).
#[inline(never)]
fn measured<S, R>(svc: &mut S, make: fn() -> http::Request<R>, calls: u64)
where
    S: Service<http::Request<R>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..calls {
        call_with(svc, make());
    }
}

/// Warms caches and lazily built state outside the counted region.
#[inline(never)]
fn warm_up<S, R>(svc: &mut S, make: fn() -> http::Request<R>)
where
    S: Service<http::Request<R>>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..1000 {
        call_with(svc, make());
    }
}

fn run<S, R>(mut svc: S, make: fn() -> http::Request<R>, calls: u64)
where
    S: Service<http::Request<R>>,
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
        // One upstream, through one instance, and through a fresh clone per call (as a
        // server does with the service it is given).
        ("breaker", "+bare-to-upstream") => run(Bare, to_upstream, calls),
        ("breaker", "+per-authority") => run(per_authority().layer(Bare), to_upstream, calls),
        ("breaker", "+bare-clone-per-call") => {
            run(steadfast_bench::ClonePerCall(Bare), to_upstream, calls)
        }
        ("breaker", "+per-authority-clone-per-call") => run(
            steadfast_bench::ClonePerCall(per_authority().layer(Bare)),
            to_upstream,
            calls,
        ),
        ("limit", "bare") => run(steadfast_bench::BareBody, plain, calls),
        ("limit", "tower") => run(
            tower::limit::ConcurrencyLimitLayer::new(1000).layer(steadfast_bench::BareBody),
            plain,
            calls,
        ),
        ("limit", "steadfast") => run(
            steadfast::limit::ConcurrencyLimitLayer::new(1000).layer(steadfast_bench::BareBody),
            plain,
            calls,
        ),
        ("limit", "+vegas") => run(
            steadfast::limit::ConcurrencyLimitLayer::builder()
                .build()
                .expect("valid")
                .layer(steadfast_bench::BareBody),
            plain,
            calls,
        ),
        ("hedge", "bare") => run(Bare, empty_body, calls),
        ("hedge-armed", "bare") => run(steadfast_bench::PendingOnce, empty_body, calls),
        ("hedge", "tower") => run(tower_hedge(Bare), empty_body, calls),
        ("hedge-armed", "tower") => {
            run(tower_hedge(steadfast_bench::PendingOnce), empty_body, calls)
        }
        ("hedge", "steadfast") => run(
            steadfast::retry::HedgeLayer::new().layer(Bare),
            empty_body,
            calls,
        ),
        ("hedge-armed", "steadfast") => run(
            steadfast::retry::HedgeLayer::new().layer(steadfast_bench::PendingOnce),
            empty_body,
            calls,
        ),
        ("hedge", "+fixed") => run(fixed_hedge().layer(Bare), empty_body, calls),
        ("hedge-armed", "+fixed") => run(
            fixed_hedge().layer(steadfast_bench::PendingOnce),
            empty_body,
            calls,
        ),
        ("limit", "+bare-to-upstream") => run(steadfast_bench::BareBody, to_upstream, calls),
        ("limit", "+per-authority") => run(
            steadfast::limit::ConcurrencyLimitLayer::builder()
                .max(1000)
                .per_authority()
                .build()
                .expect("valid")
                .layer(steadfast_bench::BareBody),
            to_upstream,
            calls,
        ),
        ("server-stack" | "correlation-server", "bare") => {
            run(steadfast_bench::BareBody, with_id, calls)
        }
        ("server-stack" | "correlation-server", "floor") => {
            run(
                steadfast_bench::ServerFloor::new(steadfast_bench::BareBody),
                with_id,
                calls,
            );
        }
        ("correlation-server", "floor-with-contract") => run(
            steadfast_bench::ServerContractFloor::new(steadfast_bench::BareBody),
            with_id,
            calls,
        ),
        ("correlation-server", "tower-http") => {
            use tower_http::request_id::{
                MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer,
            };
            let header = http::HeaderName::from_static("x-correlation-id");
            let svc = ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(header.clone(), MakeRequestUuid))
                .layer(PropagateRequestIdLayer::new(header))
                .service(steadfast_bench::BareBody);
            run(svc, with_id, calls);
        }
        ("correlation-server", "steadfast") => run(
            steadfast::correlation::SetCorrelationIdLayer::new().layer(steadfast_bench::BareBody),
            with_id,
            calls,
        ),
        ("correlation-server", "+no-extension") => run(
            steadfast::correlation::SetCorrelationIdLayer::builder()
                .extension(false)
                .build()
                .expect("valid")
                .layer(steadfast_bench::BareBody),
            with_id,
            calls,
        ),
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
                .service(steadfast_bench::BareBody);
            run(svc, with_id, calls);
        }
        ("server-stack", "steadfast") => run(
            steadfast::server::http()
                .build()
                .expect("valid")
                .layer(steadfast_bench::BareBody),
            with_id,
            calls,
        ),
        ("client-stack" | "client-stack-armed" | "client-layers", _) => {
            client(case, contender, calls);
        }
        ("client-observed", _) => observed(|| client("client-stack", contender, calls)),
        _ => {
            eprintln!("unknown case/contender {case}/{contender}; see --list");
            std::process::exit(2);
        }
    }
}

/// The client-side cases: every call is made inside a correlation-id scope, as a handler's is.
fn client(case: &str, contender: &str, calls: u64) {
    use steadfast::correlation::CorrelationId;
    use steadfast_bench::peers::TowerPolicy;

    let id = CorrelationId::parse("0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60").expect("valid");
    macro_rules! peer {
        ($inner:expr) => {
            ServiceBuilder::new()
                .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
                    tower_http::request_id::MakeRequestUuid,
                ))
                .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
                .timeout(FIVE_S)
                .layer(tower::retry::RetryLayer::new(TowerPolicy::new(true)))
                .layer(tr_breaker_layer(THIRTY_S))
                .timeout(FIVE_S)
                .service($inner)
        };
    }
    let ours = || steadfast::client::http().build().expect("valid");
    // The preset's layers, one by one, with its settings.
    let steadfast_bench::PresetLayers {
        attempt,
        breaker,
        retry,
        total,
        id: propagate,
    } = steadfast_bench::PresetLayers::default();
    // The whole run in one correlation scope, as a handler's calls are made inside the
    // scope the server layer set for its request (not a scope per call, which would return
    // each call's future through a closure).
    id.sync_scope(|| match (case, contender) {
        ("client-stack" | "client-layers", "bare") => run(Bare, outgoing, calls),
        ("client-stack-armed", "bare") => run(PendingOnce, outgoing, calls),
        ("client-stack", "tower+tower-http+tower-resilience") => run(peer!(Bare), outgoing, calls),
        ("client-stack-armed", "tower+tower-http+tower-resilience") => {
            run(peer!(PendingOnce), outgoing, calls)
        }
        ("client-stack", "steadfast") => run(ours().layer(Bare), outgoing, calls),
        ("client-stack", "floor") => run(steadfast_bench::Floor::new(Bare), outgoing, calls),
        ("client-stack-armed", "floor") => {
            run(steadfast_bench::Floor::new(PendingOnce), outgoing, calls);
        }
        ("client-stack-armed", "steadfast") => run(ours().layer(PendingOnce), outgoing, calls),
        ("client-layers", "+timeout") => run(attempt.layer(Bare), outgoing, calls),
        ("client-layers", "+breaker") => run(breaker.layer(attempt.layer(Bare)), outgoing, calls),
        ("client-layers", "+retry") => run(
            retry.layer(breaker.layer(attempt.layer(Bare))),
            outgoing,
            calls,
        ),
        ("client-layers", "+deadline") => run(
            total.layer(retry.layer(breaker.layer(attempt.layer(Bare)))),
            outgoing,
            calls,
        ),
        ("client-layers", "+id") => run(
            propagate.layer(total.layer(retry.layer(breaker.layer(attempt.layer(Bare))))),
            outgoing,
            calls,
        ),
        _ => {
            eprintln!("unknown case/contender {case}/{contender}; see --list");
            std::process::exit(2);
        }
    });
}

/// Runs `f` with a tracing subscriber (a registry, which makes every span) and, with the
/// `metrics` feature, a metrics recorder that counts, both for this thread only.
fn observed(f: impl FnOnce()) {
    use tracing_subscriber::layer::SubscriberExt;
    let subscriber =
        tracing_subscriber::registry().with(tracing_subscriber::layer::Identity::new());
    tracing::subscriber::with_default(subscriber, || {
        #[cfg(feature = "metrics")]
        {
            let recorder = counting::Recorder;
            metrics::with_local_recorder(&recorder, f);
        }
        #[cfg(not(feature = "metrics"))]
        f();
    });
}

/// A metrics recorder that keeps every value in an atomic: what any recorder costs at the
/// least (lookups by key, label strings, atomic updates).
#[cfg(feature = "metrics")]
mod counting {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use metrics::{
        Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata,
        SharedString, Unit,
    };

    #[derive(Debug, Default)]
    struct Cell(AtomicU64);

    impl CounterFn for Cell {
        fn increment(&self, value: u64) {
            self.0.fetch_add(value, Ordering::Relaxed);
        }
        fn absolute(&self, value: u64) {
            self.0.fetch_max(value, Ordering::Relaxed);
        }
    }

    impl GaugeFn for Cell {
        fn increment(&self, value: f64) {
            self.0.fetch_add(value as u64, Ordering::Relaxed);
        }
        fn decrement(&self, value: f64) {
            self.0.fetch_sub(value as u64, Ordering::Relaxed);
        }
        fn set(&self, value: f64) {
            self.0.store(value.to_bits(), Ordering::Relaxed);
        }
    }

    impl HistogramFn for Cell {
        fn record(&self, value: f64) {
            self.0.fetch_add(value.to_bits() & 1, Ordering::Relaxed);
        }
    }

    /// Makes a new cell for every registration (as a recorder without a registry would).
    #[derive(Debug)]
    pub(crate) struct Recorder;

    impl metrics::Recorder for Recorder {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            std::hint::black_box(key);
            Counter::from_arc(Arc::new(Cell::default()))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            std::hint::black_box(key);
            Gauge::from_arc(Arc::new(Cell::default()))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            std::hint::black_box(key);
            Histogram::from_arc(Arc::new(Cell::default()))
        }
    }
}
