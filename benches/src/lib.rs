//! Support for the steadfast benchmarks: a counting global allocator, a bare baseline
//! service, and a recorder that pairs criterion's timing with allocations per call.
//!
//! Each benchmark binary installs [`CountingAlloc`] as its `#[global_allocator]`. The
//! `report` binary then reads criterion's estimates and the recorded allocation counts and
//! prints one markdown table.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::{Future, Ready};
use std::hint::black_box;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use criterion::Criterion;
use tower::Service;

/// The system allocator, counting every allocation.
#[derive(Debug)]
pub struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to `System` unchanged; only adds a relaxed counter increment.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Total allocations so far, all threads (counts only where [`CountingAlloc`] is installed).
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Runs `f` `n` times (after one warm-up run) and returns the mean allocations per run.
pub fn allocations_per_call(n: u64, mut f: impl FnMut()) -> f64 {
    f();
    let before = allocations();
    for _ in 0..n {
        f();
    }
    (allocations() - before) as f64 / n as f64
}

/// The baseline: an HTTP service that answers at once and is always ready.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bare;

impl Service<http::Request<()>> for Bare {
    type Response = http::Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<()>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(())))
    }
}

/// One call: `poll_ready`, `call`, and one poll of the response future, which must be ready
/// (every contender in the in-process benchmarks wraps a service that answers at once).
///
/// # Panics
///
/// If the contender is not ready, does not answer at once, or answers with an error.
pub fn call_once<S>(svc: &mut S)
where
    S: Service<http::Request<()>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready(), "contender not ready");
    let fut = std::pin::pin!(svc.call(http::Request::new(())));
    match fut.poll(&mut cx) {
        Poll::Ready(r) => {
            black_box(r.expect("contender answers"));
        }
        Poll::Pending => panic!("contender did not answer at once"),
    }
}

/// Benchmarks contenders of one group and records their allocations per call.
#[allow(missing_debug_implementations)] // criterion's `Criterion` is not `Debug`
pub struct Recorder<'c> {
    c: &'c mut Criterion,
    group: &'static str,
}

impl<'c> Recorder<'c> {
    /// A recorder for criterion group `group`.
    pub fn new(c: &'c mut Criterion, group: &'static str) -> Self {
        Self { c, group }
    }

    /// Benchmarks `svc` with [`call_once`] under the name `contender`.
    pub fn bench<S>(&mut self, contender: &str, mut svc: S)
    where
        S: Service<http::Request<()>>,
        S::Error: std::fmt::Debug,
    {
        self.c
            .bench_function(&format!("{}/{}", self.group, contender), |b| {
                b.iter(|| call_once(&mut svc))
            });
        let allocs = allocations_per_call(10_000, || call_once(&mut svc));
        record_allocs(self.group, contender, allocs);
    }
}

/// Where criterion writes its results.
pub fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("bench package sits in the workspace")
                .join("target")
        });
    target.join("criterion")
}

/// Appends one allocation figure to `criterion/steadfast-allocs.tsv`.
pub fn record_allocs(group: &str, contender: &str, allocs: f64) {
    let dir = criterion_dir();
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("steadfast-allocs.tsv"))
    {
        let _ = writeln!(f, "{group}\t{contender}\t{allocs}");
    }
}
