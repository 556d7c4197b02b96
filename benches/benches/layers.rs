//! Every layer and both stacks beside a bare service and the peers, in one run.
//!
//! Run: `bash benches/run.sh` (all of it, with the report), or
//! `cargo bench -p steadfast-bench --bench layers` then
//! `cargo run -p steadfast-bench --bin report` for the markdown table.

use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{Empty, Full};
use steadfast::breaker::CircuitBreakerLayer;
use steadfast::correlation::{CorrelationId, PropagateCorrelationIdLayer, SetCorrelationIdLayer};
use steadfast::retry::{Backoff, RetryLayer};
use steadfast_bench::peers::{
    FailEveryOther, Failing, Failsafe, TowerPolicy, fs_breaker, tr_breaker_layer,
};
use steadfast_bench::{
    Bare, ClonePerCall, CountingAlloc, PendingOnce, Recorder, allocations_per_call, record_allocs,
};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceBuilder};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const FIVE_S: Duration = Duration::from_secs(5);
const THIRTY_S: Duration = Duration::from_secs(30);
const AN_HOUR: Duration = Duration::from_secs(3600);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime")
}

fn empty() -> http::Request<()> {
    http::Request::new(())
}

/// A request to one upstream (for per-key layers).
fn to_upstream() -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.uri_mut() = http::Uri::from_static("http://orders:8080/orders/17");
    req
}

fn empty_body() -> http::Request<Empty<Bytes>> {
    http::Request::new(Empty::new())
}

/// A POST with a 1 KiB body whole in memory (cheap to clone).
fn full_body() -> http::Request<Full<Bytes>> {
    static KIB: [u8; 1024] = [b'x'; 1024];
    let mut req = http::Request::new(Full::new(Bytes::from_static(&KIB)));
    *req.method_mut() = http::Method::PUT;
    req
}

fn with_id() -> http::Request<()> {
    let mut req = http::Request::new(());
    req.headers_mut().insert(
        "x-correlation-id",
        http::HeaderValue::from_static("0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60"),
    );
    req
}

/// The timeouts around `inner`, every call made from inside a tokio task.
fn timeout_in_task<S>(c: &mut Criterion, group: &'static str, inner: S, rt: &Runtime)
where
    S: Service<http::Request<()>, Response = http::Response<()>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<tower::BoxError> + std::fmt::Debug,
{
    let mut rec = Recorder::new(c, group);
    rec.bench_in_task("bare", inner.clone(), rt);
    rec.bench_in_task(
        "tower",
        tower::timeout::Timeout::new(inner.clone(), FIVE_S),
        rt,
    );
    rec.bench_in_task(
        "steadfast",
        steadfast::timeout::TimeoutLayer::new(FIVE_S).layer(inner),
        rt,
    );
}

fn timeout(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut rec = Recorder::new(c, "timeout");
    rec.bench("bare", Bare);
    rec.bench(
        "tower",
        tower::timeout::TimeoutLayer::new(FIVE_S).layer(Bare),
    );
    rec.bench(
        "tower-http",
        tower_http::timeout::TimeoutLayer::with_status_code(
            http::StatusCode::REQUEST_TIMEOUT,
            FIVE_S,
        )
        .layer(Bare),
    );
    rec.bench(
        "tower-resilience",
        tower_resilience::timelimiter::TimeLimiterLayer::builder()
            .timeout_duration(FIVE_S)
            .build()
            .layer(Bare),
    );
    rec.bench(
        "steadfast",
        steadfast::timeout::TimeoutLayer::new(FIVE_S).layer(Bare),
    );
    rec.bench(
        "steadfast-server",
        steadfast::timeout::SetDeadlineLayer::new(FIVE_S).layer(Bare),
    );
    drop(rec);

    let mut rec = Recorder::new(c, "timeout-armed");
    rec.bench("bare", PendingOnce);
    rec.bench(
        "tower",
        tower::timeout::TimeoutLayer::new(FIVE_S).layer(PendingOnce),
    );
    rec.bench(
        "tower-http",
        tower_http::timeout::TimeoutLayer::with_status_code(
            http::StatusCode::REQUEST_TIMEOUT,
            FIVE_S,
        )
        .layer(PendingOnce),
    );
    rec.bench(
        "tower-resilience",
        tower_resilience::timelimiter::TimeLimiterLayer::builder()
            .timeout_duration(FIVE_S)
            .build()
            .layer(PendingOnce),
    );
    rec.bench(
        "steadfast",
        steadfast::timeout::TimeoutLayer::new(FIVE_S).layer(PendingOnce),
    );
    drop(rec);

    timeout_in_task(c, "timeout-task", Bare, &rt);
    timeout_in_task(c, "timeout-armed-task", PendingOnce, &rt);

    let mut rec = Recorder::new(c, "timeout-2t");
    let h = rt.handle();
    rec.bench_two_threads("bare", Bare, h, empty);
    rec.bench_two_threads(
        "tower",
        tower::timeout::TimeoutLayer::new(FIVE_S).layer(Bare),
        h,
        empty,
    );
    rec.bench_two_threads(
        "steadfast",
        steadfast::timeout::TimeoutLayer::new(FIVE_S).layer(Bare),
        h,
        empty,
    );
}

fn retry(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut rec = Recorder::new(c, "retry");
    rec.bench_req("bare", Bare, empty_body);
    rec.bench_req(
        "tower",
        tower::retry::RetryLayer::new(TowerPolicy::new(true)).layer(Bare),
        empty_body,
    );
    rec.bench_req(
        "tower-resilience",
        tower_resilience::retry::RetryLayer::<
            http::Request<Empty<Bytes>>,
            http::Response<()>,
            std::convert::Infallible,
        >::builder()
        .max_attempts(3)
        .build()
        .layer(Bare),
        empty_body,
    );
    rec.bench_req("steadfast", RetryLayer::new().layer(Bare), empty_body);
    drop(rec);

    // The same with a body that is cheap to clone: tower clones the request, we take the
    // whole-body fast path of the replay body.
    let mut rec = Recorder::new(c, "retry-full-body");
    rec.bench_req("bare", Bare, full_body);
    rec.bench_req(
        "tower",
        tower::retry::RetryLayer::new(TowerPolicy::new(true)).layer(Bare),
        full_body,
    );
    rec.bench_req("steadfast", RetryLayer::new().layer(Bare), full_body);
    drop(rec);

    // One retry per request at zero delay; budgets off so every request retries. Driven by
    // `block_on` because tower-resilience sleeps even for a zero backoff (a timer turn).
    let mut rec = Recorder::new(c, "retry-one-retry");
    let blocking = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rec.bench_blocking(
        "tower",
        tower::retry::RetryLayer::new(TowerPolicy::new(false)).layer(FailEveryOther::default()),
        &blocking,
        empty_body,
    );
    rec.bench_blocking(
        "tower-resilience",
        tower_resilience::retry::RetryLayer::<
            http::Request<Empty<Bytes>>,
            http::Response<()>,
            steadfast_bench::peers::Boom,
        >::builder()
        .max_attempts(3)
        .fixed_backoff(Duration::ZERO)
        .build()
        .layer(FailEveryOther::default()),
        &blocking,
        empty_body,
    );
    rec.bench_blocking(
        "steadfast",
        RetryLayer::builder()
            .backoff(Backoff::new(Duration::ZERO, Duration::ZERO))
            .budget(None)
            .build()
            .expect("valid")
            .layer(FailEveryOther::default()),
        &blocking,
        empty_body,
    );
    drop(rec);

    let mut rec = Recorder::new(c, "retry-2t");
    let h = rt.handle();
    rec.bench_two_threads("bare", Bare, h, empty_body);
    rec.bench_two_threads(
        "tower",
        tower::retry::RetryLayer::new(TowerPolicy::new(true)).layer(Bare),
        h,
        empty_body,
    );
    rec.bench_two_threads("steadfast", RetryLayer::new().layer(Bare), h, empty_body);
}

fn breaker(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut rec = Recorder::new(c, "breaker");
    rec.bench("bare", Bare);
    rec.bench("tower-resilience", tr_breaker_layer(THIRTY_S).layer(Bare));
    rec.bench("failsafe", Failsafe::new(Bare, fs_breaker(THIRTY_S)));
    rec.bench("steadfast", CircuitBreakerLayer::new().layer(Bare));
    rec.bench(
        "steadfast-count-window",
        CircuitBreakerLayer::builder()
            .consecutive_failures(None)
            .count_window(100)
            .failure_rate(50)
            .build()
            .expect("valid")
            .layer(Bare),
    );
    rec.bench(
        "steadfast-per-authority",
        CircuitBreakerLayer::builder()
            .build_per_authority()
            .expect("valid")
            .layer(Bare),
    );
    drop(rec);

    let mut rec = Recorder::new(c, "breaker-2t");
    let h = rt.handle();
    rec.bench_two_threads("bare", Bare, h, empty);
    rec.bench_two_threads(
        "tower-resilience",
        tr_breaker_layer(THIRTY_S).layer(Bare),
        h,
        empty,
    );
    rec.bench_two_threads(
        "failsafe",
        Failsafe::new(Bare, fs_breaker(THIRTY_S)),
        h,
        empty,
    );
    rec.bench_two_threads(
        "steadfast",
        CircuitBreakerLayer::new().layer(Bare),
        h,
        empty,
    );
    rec.bench_two_threads(
        "steadfast-count-window",
        CircuitBreakerLayer::builder()
            .consecutive_failures(None)
            .count_window(100)
            .failure_rate(50)
            .build()
            .expect("valid")
            .layer(Bare),
        h,
        empty,
    );
    // One upstream, each thread through its own clone (its memo of the key holds), and
    // through a fresh clone per call, as a server's handler does (each clone starts with the
    // memo of an original that never calls).
    let per_authority = || {
        CircuitBreakerLayer::builder()
            .build_per_authority()
            .expect("valid")
            .layer(Bare)
    };
    rec.bench_two_threads("bare-clone-per-call", ClonePerCall(Bare), h, to_upstream);
    rec.bench_two_threads(
        "steadfast-per-authority-to-upstream",
        per_authority(),
        h,
        to_upstream,
    );
    rec.bench_two_threads(
        "steadfast-per-authority-to-upstream-clone-per-call",
        ClonePerCall(per_authority()),
        h,
        to_upstream,
    );
    drop(rec);

    // Fast-fail while open. Each peer is tripped by calls through a twin sharing its state.
    let mut rec = Recorder::new(c, "breaker-open");
    let (tr_layer, tr_handle) = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .consecutive_failures(5)
        .wait_duration_in_open(AN_HOUR)
        .build_with_handle()
        .expect("valid");
    let mut tripper = tr_layer.layer(Failing);
    for _ in 0..5 {
        let _ = steadfast_bench::try_call(&mut tripper, empty());
    }
    assert!(tr_handle.is_open());
    rec.bench_err("tower-resilience", tr_layer.layer(Bare), empty);
    let fs = fs_breaker(AN_HOUR);
    let mut tripper = Failsafe::new(Failing, fs.clone());
    for _ in 0..5 {
        let _ = steadfast_bench::try_call(&mut tripper, empty());
    }
    rec.bench_err("failsafe", Failsafe::new(Bare, fs), empty);
    let ours = CircuitBreakerLayer::new();
    ours.handle().force_open();
    rec.bench_err("steadfast", ours.layer(Bare), empty);
}

fn correlation(c: &mut Criterion) {
    use steadfast_bench::BareBody;
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

    let header = http::HeaderName::from_static("x-correlation-id");
    let tower_http_pair = |svc: BareBody| {
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::new(header.clone(), MakeRequestUuid))
            .layer(PropagateRequestIdLayer::new(header.clone()))
            .service(svc)
    };
    for (group, make_req) in [
        (
            "correlation-server-inbound-id",
            with_id as fn() -> http::Request<()>,
        ),
        ("correlation-server-no-id", empty),
    ] {
        let mut rec = Recorder::new(c, group);
        rec.bench_req("bare", BareBody, make_req);
        rec.bench_req("tower-http", tower_http_pair(BareBody), make_req);
        rec.bench_req(
            "steadfast",
            SetCorrelationIdLayer::new().layer(BareBody),
            make_req,
        );
        rec.bench_req(
            "steadfast-no-extension",
            SetCorrelationIdLayer::builder()
                .extension(false)
                .build()
                .unwrap()
                .layer(BareBody),
            make_req,
        );
        rec.bench_req(
            "floor",
            steadfast_bench::ServerFloor::new(BareBody),
            make_req,
        );
        rec.bench_req(
            "floor-with-contract",
            steadfast_bench::ServerContractFloor::new(BareBody),
            make_req,
        );
    }

    // Client side with the id ambient (as inside a handler); both run inside the same scope.
    let mut rec = Recorder::new(c, "correlation-client-ambient");
    let id = CorrelationId::parse("0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60").expect("valid");
    // Both run inside one scope, as a handler's calls are made inside the scope the server
    // layer set for its request (a scope per call would return each future through a closure).
    id.sync_scope(|| {
        rec.bench_req("bare", BareBody, with_id);
        rec.bench_req(
            "steadfast",
            PropagateCorrelationIdLayer::new().layer(BareBody),
            with_id,
        );
    });
}

/// Our UUIDv7 generator against the `uuid` crate's `now_v7` (both ordered by creation), each
/// ending as the header value a correlation id is.
fn uuid_v7(c: &mut Criterion) {
    use steadfast::correlation::{MakeCorrelationId, UuidV7};

    let mut g = c.benchmark_group("uuid-v7");
    let ours = UuidV7::new();
    g.bench_function("steadfast", |b| {
        b.iter(|| std::hint::black_box(ours.make_id()));
    });
    g.bench_function("uuid-now_v7", |b| {
        b.iter(|| {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let s = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf);
            std::hint::black_box(http::HeaderValue::from_str(s).expect("hex and dashes"))
        });
    });
    g.finish();
}

/// One balanced call over `n` endpoints (pick, authority rewrite, load and outcome
/// bookkeeping) beside tower's power-of-two-choices balancer over `PeakEwma`-wrapped
/// services (tower's needs its endpoints as services, and a `Buffer` to be shared).
fn balance(c: &mut Criterion) {
    use steadfast::balance::BalanceLayer;
    use tower::balance::p2c::Balance as TowerBalance;
    use tower::discover::ServiceList;
    use tower::load::{CompleteOnResponse, PeakEwma};

    fn to_orders() -> http::Request<()> {
        http::Request::get("http://orders/items/7")
            .body(())
            .expect("request")
    }
    let rt = runtime();
    let _guard = rt.enter();
    for (group, group_2t, n) in [
        ("balance-3", None, 3),
        ("balance-100", None, 100),
        ("balance-1000", Some("balance-1000-2t"), 1000),
    ] {
        let endpoints: Vec<String> = (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250 + 1))
            .collect();
        let tower_p2c = || {
            let list: Vec<_> = (0..n)
                .map(|_| {
                    PeakEwma::new(
                        Bare,
                        Duration::from_millis(30),
                        10e9,
                        CompleteOnResponse::default(),
                    )
                })
                .collect();
            TowerBalance::new(ServiceList::new::<http::Request<()>>(list))
        };
        let ours = BalanceLayer::builder()
            .endpoints(&endpoints)
            .build()
            .expect("valid");
        {
            let mut rec = Recorder::new(c, group);
            rec.bench_req("bare", Bare, to_orders);
            rec.bench_req("tower-p2c", tower_p2c(), to_orders);
            rec.bench_req("steadfast", ours.layer(Bare), to_orders);
        }
        if let Some(group_2t) = group_2t {
            let mut rec = Recorder::new(c, group_2t);
            rec.bench_two_threads("bare", Bare, rt.handle(), to_orders);
            rec.bench_two_threads(
                "tower-p2c+buffer",
                tower::buffer::Buffer::new(tower_p2c(), 1024),
                rt.handle(),
                to_orders,
            );
            rec.bench_two_threads("steadfast", ours.layer(Bare), rt.handle(), to_orders);
        }
    }
}

/// The pick alone (clock read, interval check, two draws weighed), on one thread and on two
/// threads sharing one balancer: what a call pays to choose its endpoint.
#[allow(clippy::disallowed_types, clippy::disallowed_methods)] // wall time is the measurement
fn balance_pick(c: &mut Criterion) {
    use steadfast::balance::__private::{pick, pick_and_take};
    use steadfast::balance::BalanceLayer;

    let rt = runtime();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("balance-pick");
    for n in [3, 100, 1000] {
        let endpoints: Vec<String> = (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250 + 1))
            .collect();
        let balance = BalanceLayer::builder()
            .endpoints(&endpoints)
            .build()
            .expect("valid")
            .layer(Bare);
        for (name, f) in [
            ("pick", pick as fn(&_) -> bool),
            ("pick+take", pick_and_take as fn(&_) -> bool),
        ] {
            g.bench_function(format!("{name}/{n}"), |b| {
                b.iter(|| std::hint::black_box(f(&balance)))
            });
            let allocs = allocations_per_call(10_000, || assert!(f(&balance)));
            record_allocs("balance-pick", &format!("{name}/{n}"), allocs);
            g.bench_function(format!("{name}/{n}-2t"), |b| {
                b.iter_custom(|iters| {
                    let barrier = std::sync::Arc::new(std::sync::Barrier::new(3));
                    let threads: Vec<_> = (0..2)
                        .map(|_| {
                            let (balance, barrier, rt) =
                                (balance.clone(), barrier.clone(), rt.handle().clone());
                            std::thread::spawn(move || {
                                let _g = rt.enter();
                                barrier.wait();
                                for _ in 0..iters.div_ceil(2) {
                                    std::hint::black_box(f(&balance));
                                }
                            })
                        })
                        .collect();
                    barrier.wait();
                    let start = std::time::Instant::now();
                    for t in threads {
                        t.join().expect("bench thread");
                    }
                    start.elapsed()
                })
            });
        }
    }
    g.finish();
}

/// What a gateway's rate limit pays to reject a request: a 429 built by a bare handler,
/// beside a GCRA limiter (`governor`) that times the rejection with its own clock, and the
/// same limiter timing it with a clock made for each rejection, as tower_governor 0.8 does
/// (`DefaultClock::default().now()` in its rejection path).
fn rate_limit_rejection(c: &mut Criterion) {
    use governor::clock::{Clock, DefaultClock};
    use governor::{Quota, RateLimiter};
    use std::net::{IpAddr, Ipv4Addr};
    use std::num::NonZeroU32;

    let too_many = |wait| steadfast_bench::too_many_requests(wait, ());
    let limiter = RateLimiter::keyed(
        Quota::with_period(Duration::from_secs(3600))
            .expect("period")
            .allow_burst(NonZeroU32::MIN),
    );
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let _ = limiter.check_key(&peer); // the one request allowed: every later one is over
    let mut g = c.benchmark_group("rate-limit-rejection");
    g.bench_function("bare-429", |b| {
        b.iter(|| std::hint::black_box(too_many(Duration::from_secs(1))))
    });
    g.bench_function("governor-own-clock", |b| {
        b.iter(|| match limiter.check_key(std::hint::black_box(&peer)) {
            Ok(()) => unreachable!("over the rate"),
            Err(not_until) => too_many(not_until.wait_time_from(limiter.clock().now())),
        })
    });
    g.bench_function("governor-new-clock-per-rejection", |b| {
        b.iter(|| match limiter.check_key(std::hint::black_box(&peer)) {
            Ok(()) => unreachable!("over the rate"),
            Err(not_until) => too_many(not_until.wait_time_from(DefaultClock::default().now())),
        })
    });
    g.finish();
}

fn stacks(c: &mut Criterion) {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

    let rt = runtime();
    let _guard = rt.enter();
    let id = CorrelationId::parse("0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60").expect("valid");
    let ours = steadfast::client::http().build().expect("valid");
    // The cheapest peer stack in the same order: request id pair, total timeout, retry with
    // budget, breaker, attempt timeout.
    macro_rules! peer {
        ($inner:expr) => {
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id())
                .timeout(FIVE_S)
                .layer(tower::retry::RetryLayer::new(TowerPolicy::new(true)))
                .layer(tr_breaker_layer(THIRTY_S))
                .timeout(FIVE_S)
                .service($inner)
        };
    }
    // Every contender runs inside one correlation scope (see `correlation`).
    id.clone().sync_scope(|| {
        let mut rec = Recorder::new(c, "client-stack");
        rec.bench_req("bare", Bare, empty_body);
        rec.bench_req("tower+tower-http+tower-resilience", peer!(Bare), empty_body);
        rec.bench_req("steadfast", ours.layer(Bare), empty_body);
        rec.bench_req("floor", steadfast_bench::Floor::new(Bare), empty_body);
        drop(rec);
        let mut rec = Recorder::new(c, "client-stack-armed");
        rec.bench_req("bare", PendingOnce, empty_body);
        rec.bench_req(
            "tower+tower-http+tower-resilience",
            peer!(PendingOnce),
            empty_body,
        );
        rec.bench_req("steadfast", ours.layer(PendingOnce), empty_body);
        rec.bench_req(
            "floor",
            steadfast_bench::Floor::new(PendingOnce),
            empty_body,
        );
        drop(rec);
    });

    // Two threads calling one upstream through one stack (clones of it): what the shared
    // state (per-upstream breaker, budget, reference counts) costs when both use it at once.
    // The request and the ambient id are the single-thread rows', so that the scaling
    // column compares like with like.
    let mut rec = Recorder::new(c, "client-stack-2t");
    let h = rt.handle();
    let ambient = Some(id.clone());
    rec.bench_two_threads_in("bare", Bare, h, empty_body, ambient.clone());
    rec.bench_two_threads_in(
        "tower+tower-http+tower-resilience",
        peer!(Bare),
        h,
        empty_body,
        ambient.clone(),
    );
    rec.bench_two_threads_in(
        "steadfast",
        ours.layer(Bare),
        h,
        empty_body,
        ambient.clone(),
    );
    rec.bench_two_threads_in(
        "floor",
        steadfast_bench::Floor::new(Bare),
        h,
        empty_body,
        ambient.clone(),
    );
    drop(rec);

    // The same with an inner service that answers at its second poll: every layer's timer is
    // registered (under the time driver's one lock, which both threads take) and removed.
    let mut rec = Recorder::new(c, "client-stack-armed-2t");
    rec.bench_two_threads_in("bare", PendingOnce, h, empty_body, ambient.clone());
    rec.bench_two_threads_in(
        "tower+tower-http+tower-resilience",
        peer!(PendingOnce),
        h,
        empty_body,
        ambient.clone(),
    );
    rec.bench_two_threads_in(
        "steadfast",
        ours.layer(PendingOnce),
        h,
        empty_body,
        ambient.clone(),
    );
    rec.bench_two_threads_in(
        "floor",
        steadfast_bench::Floor::new(PendingOnce),
        h,
        empty_body,
        ambient.clone(),
    );
    drop(rec);

    // The same, built up one layer at a time (innermost first, the preset's settings): which
    // layer's shared state two threads fight over.
    {
        let steadfast_bench::PresetLayers {
            attempt,
            breaker,
            retry,
            total,
            id,
        } = steadfast_bench::PresetLayers::default();
        let mut rec = Recorder::new(c, "client-layers-2t");
        let b = || breaker.layer(attempt.layer(Bare));
        rec.bench_two_threads_in(
            "+timeout",
            attempt.layer(Bare),
            h,
            empty_body,
            ambient.clone(),
        );
        rec.bench_two_threads_in("+breaker", b(), h, empty_body, ambient.clone());
        rec.bench_two_threads_in("+retry", retry.layer(b()), h, empty_body, ambient.clone());
        rec.bench_two_threads_in(
            "+deadline",
            total.layer(retry.layer(b())),
            h,
            empty_body,
            ambient.clone(),
        );
        rec.bench_two_threads_in(
            "+id",
            id.layer(total.layer(retry.layer(b()))),
            h,
            empty_body,
            ambient.clone(),
        );
    }

    let mut rec = Recorder::new(c, "server-stack");
    rec.bench_req("bare", steadfast_bench::BareBody, with_id);
    rec.bench_req(
        "tower-http",
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::new(
                http::HeaderName::from_static("x-correlation-id"),
                MakeRequestUuid,
            ))
            .layer(PropagateRequestIdLayer::new(http::HeaderName::from_static(
                "x-correlation-id",
            )))
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                http::StatusCode::GATEWAY_TIMEOUT,
                THIRTY_S,
            ))
            .service(steadfast_bench::BareBody),
        with_id,
    );
    rec.bench_req(
        "steadfast",
        steadfast::server::http()
            .build()
            .expect("valid")
            .layer(steadfast_bench::BareBody),
        with_id,
    );
    rec.bench_req(
        "floor",
        steadfast_bench::ServerFloor::new(steadfast_bench::BareBody),
        with_id,
    );
}

/// A concurrency limit that does not fire (issue 23: ≤ +15 ns over bare, no allocation,
/// scaling ≥ 1.8 on two threads), beside tower's `ConcurrencyLimit` (a semaphore permit taken
/// in `poll_ready`) and tower-resilience's adaptive limiter; and the throttle that does not
/// throttle.
fn limit(c: &mut Criterion) {
    use steadfast::limit::ConcurrencyLimitLayer;
    use steadfast_bench::BareBody;
    let rt = runtime();
    let _guard = rt.enter();
    let adaptive = || ConcurrencyLimitLayer::builder().build().expect("valid");
    let tr_adaptive = || {
        tower_resilience::adaptive::AdaptiveLimiterLayer::new(
            tower_resilience::adaptive::Vegas::builder()
                .initial_limit(1000)
                .max_limit(1000)
                .build()
                .expect("valid"),
        )
    };
    let per_authority = || {
        ConcurrencyLimitLayer::builder()
            .max(1000)
            .per_authority()
            .build()
            .expect("valid")
    };
    let mut rec = Recorder::new(c, "limit");
    rec.bench("bare", BareBody);
    rec.bench(
        "tower",
        tower::limit::ConcurrencyLimitLayer::new(1000).layer(BareBody),
    );
    rec.bench("tower-resilience-vegas", tr_adaptive().layer(BareBody));
    rec.bench(
        "steadfast",
        ConcurrencyLimitLayer::new(1000).layer(BareBody),
    );
    rec.bench("steadfast-vegas", adaptive().layer(BareBody));
    // The same request with a URI to key on, and the bare service beside it.
    rec.bench_req("bare-to-upstream", BareBody, to_upstream);
    rec.bench_req(
        "steadfast-per-authority",
        per_authority().layer(BareBody),
        to_upstream,
    );
    rec.bench(
        "steadfast-throttle",
        steadfast::limit::ThrottleLayer::new().layer(BareBody),
    );
    drop(rec);

    let mut rec = Recorder::new(c, "limit-2t");
    let h = rt.handle();
    rec.bench_two_threads("bare", BareBody, h, empty);
    rec.bench_two_threads(
        "tower",
        tower::limit::ConcurrencyLimitLayer::new(1000).layer(BareBody),
        h,
        empty,
    );
    rec.bench_two_threads(
        "steadfast",
        ConcurrencyLimitLayer::new(1000).layer(BareBody),
        h,
        empty,
    );
    rec.bench_two_threads("steadfast-vegas", adaptive().layer(BareBody), h, empty);
    rec.bench_two_threads(
        "steadfast-per-authority",
        per_authority().layer(BareBody),
        h,
        to_upstream,
    );
    rec.bench_two_threads(
        "steadfast-throttle",
        steadfast::limit::ThrottleLayer::new().layer(BareBody),
        h,
        empty,
    );
}

/// Hedging when it does not fire (issue 23: no dearer than tower's `hedge`): the inner
/// service answers at once, and (`hedge-armed`) on its second poll, which is when a hedge's
/// timer is armed. tower's hedge learns the 95th percentile as ours does by default;
/// tower-resilience's has a fixed delay only.
fn tower_hedge<S>(inner: S) -> tower::hedge::Hedge<S, steadfast_bench::peers::TowerHedgePolicy>
where
    S: Service<http::Request<Empty<Bytes>>> + Clone,
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

fn hedge(c: &mut Criterion) {
    use steadfast::retry::{HedgeDelay, HedgeLayer};
    let rt = runtime();
    let _guard = rt.enter();
    let tr_hedge = || {
        tower_resilience::hedge::HedgeLayer::builder()
            .delay(Duration::from_millis(100))
            .max_hedged_attempts(2)
            .build()
    };
    let fixed = || {
        HedgeLayer::builder()
            .delay(HedgeDelay::Fixed(Duration::from_millis(100)))
            .build()
            .expect("valid")
    };
    let mut rec = Recorder::new(c, "hedge");
    rec.bench_req("bare", Bare, empty_body);
    rec.bench_req("tower", tower_hedge(Bare), empty_body);
    rec.bench_req("tower-resilience", tr_hedge().layer(Bare), empty_body);
    rec.bench_req("steadfast", HedgeLayer::new().layer(Bare), empty_body);
    rec.bench_req("steadfast-fixed", fixed().layer(Bare), empty_body);
    drop(rec);

    let mut rec = Recorder::new(c, "hedge-armed");
    rec.bench_req("bare", PendingOnce, empty_body);
    rec.bench_req("tower", tower_hedge(PendingOnce), empty_body);
    rec.bench_req(
        "tower-resilience",
        tr_hedge().layer(PendingOnce),
        empty_body,
    );
    rec.bench_req(
        "steadfast",
        HedgeLayer::new().layer(PendingOnce),
        empty_body,
    );
    rec.bench_req("steadfast-fixed", fixed().layer(PendingOnce), empty_body);
    drop(rec);

    let mut rec = Recorder::new(c, "hedge-2t");
    let h = rt.handle();
    rec.bench_two_threads("bare", Bare, h, empty_body);
    rec.bench_two_threads("tower-resilience", tr_hedge().layer(Bare), h, empty_body);
    rec.bench_two_threads("steadfast", HedgeLayer::new().layer(Bare), h, empty_body);
    rec.bench_two_threads("steadfast-fixed", fixed().layer(Bare), h, empty_body);
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = timeout, retry, breaker, correlation, uuid_v7, balance, balance_pick, rate_limit_rejection, limit, hedge, stacks
}
criterion_main!(benches);
