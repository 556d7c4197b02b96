//! Per-layer overhead beside a bare service and the peers, in one run.
//!
//! Run: `cargo bench -p steadfast-bench --bench layers`, then
//! `cargo run -p steadfast-bench --bin report` for the markdown table.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use steadfast_bench::{Bare, CountingAlloc, PendingOnce, Recorder};
use tower::Layer;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn timeout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut rec = Recorder::new(c, "timeout");

    rec.bench("bare", Bare);
    rec.bench(
        "tower",
        tower::timeout::TimeoutLayer::new(Duration::from_secs(5)).layer(Bare),
    );
    rec.bench(
        "tower-http",
        tower_http::timeout::TimeoutLayer::with_status_code(
            http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(5),
        )
        .layer(Bare),
    );
    rec.bench(
        "steadfast",
        steadfast::timeout::TimeoutLayer::new(Duration::from_secs(5)).layer(Bare),
    );
    rec.bench(
        "steadfast-server",
        steadfast::timeout::ServerTimeoutLayer::new(Duration::from_secs(5)).layer(Bare),
    );
}

fn timeout_armed(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut rec = Recorder::new(c, "timeout-armed");
    rec.bench("bare", PendingOnce);
    rec.bench(
        "tower",
        tower::timeout::TimeoutLayer::new(Duration::from_secs(5)).layer(PendingOnce),
    );
    rec.bench(
        "tower-http",
        tower_http::timeout::TimeoutLayer::with_status_code(
            http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(5),
        )
        .layer(PendingOnce),
    );
    rec.bench(
        "steadfast",
        steadfast::timeout::TimeoutLayer::new(Duration::from_secs(5)).layer(PendingOnce),
    );
}

fn with_id() -> http::Request<()> {
    let mut req = http::Request::new(());
    req.headers_mut().insert(
        "x-correlation-id",
        http::HeaderValue::from_static("0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60"),
    );
    req
}

fn correlation(c: &mut Criterion) {
    use steadfast::correlation::{ClientCorrelationIdLayer, CorrelationId, CorrelationIdLayer};
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

    let header = http::HeaderName::from_static("x-correlation-id");
    let tower_http_pair = |svc: Bare| {
        tower::ServiceBuilder::new()
            .layer(SetRequestIdLayer::new(header.clone(), MakeRequestUuid))
            .layer(PropagateRequestIdLayer::new(header.clone()))
            .service(svc)
    };
    for (group, make_req) in [
        (
            "correlation-server-inbound-id",
            with_id as fn() -> http::Request<()>,
        ),
        ("correlation-server-no-id", || http::Request::new(())),
    ] {
        let mut rec = Recorder::new(c, group);
        rec.bench_req("bare", Bare, make_req);
        rec.bench_req("tower-http", tower_http_pair(Bare), make_req);
        rec.bench_req("steadfast", CorrelationIdLayer::new().layer(Bare), make_req);
        rec.bench_req(
            "steadfast-no-extension",
            CorrelationIdLayer::new().extension(false).layer(Bare),
            make_req,
        );
    }

    // Client side: the id is ambient (as inside a handler); both contenders run inside the
    // same task-local scope, so the scope's own cost cancels out.
    let mut rec = Recorder::new(c, "correlation-client-ambient");
    let id = CorrelationId::parse("0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60").unwrap();
    rec.bench_req("bare", InScope(id.clone(), Bare), || http::Request::new(()));
    rec.bench_req(
        "steadfast",
        InScope(id.clone(), ClientCorrelationIdLayer::new().layer(Bare)),
        || http::Request::new(()),
    );
}

/// Calls the inner service inside a correlation-id scope.
#[derive(Clone, Debug)]
struct InScope<S>(steadfast::correlation::CorrelationId, S);

impl<S: tower::Service<http::Request<()>>> tower::Service<http::Request<()>> for InScope<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.1.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<()>) -> S::Future {
        let inner = &mut self.1;
        self.0.clone().sync_scope(|| inner.call(req))
    }
}

criterion_group!(benches, timeout, timeout_armed, correlation);
criterion_main!(benches);
