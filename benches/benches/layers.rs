//! Per-layer overhead beside a bare service and the peers, in one run.
//!
//! Run: `cargo bench -p steadfast-bench --bench layers`, then
//! `cargo run -p steadfast-bench --bin report` for the markdown table.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use steadfast_bench::{Bare, CountingAlloc, Recorder, call_once};
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
    let _ = call_once::<Bare>;
}

criterion_group!(benches, timeout);
criterion_main!(benches);
