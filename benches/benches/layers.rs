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

criterion_group!(benches, timeout, timeout_armed);
criterion_main!(benches);
