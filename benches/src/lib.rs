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

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use tower::Service;

pub mod peers;

/// The system allocator, counting every allocation.
///
/// The counts are kept per thread, in stripes a cache line apart, and summed when read: a
/// shared counter would make every allocation on two threads fight over one cache line, and
/// the `-2t` rows would price the harness's counter rather than the contender.
#[derive(Debug)]
pub struct CountingAlloc;

/// One thread's counts (threads beyond [`STRIPES`] share stripes: still exact, since the
/// counters are atomic).
#[repr(align(128))]
struct Counts {
    allocations: AtomicU64,
    live_bytes: std::sync::atomic::AtomicI64,
}

const STRIPES: usize = 16;

static COUNTS: [Counts; STRIPES] = [const {
    Counts {
        allocations: AtomicU64::new(0),
        live_bytes: std::sync::atomic::AtomicI64::new(0),
    }
}; STRIPES];

/// Hands each thread the next stripe.
static NEXT_STRIPE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    // Const-initialised, no destructor: safe to reach from inside the allocator.
    static STRIPE: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// This thread's counts.
#[inline]
fn counts() -> &'static Counts {
    let i = STRIPE
        .try_with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES);
            }
            s.get()
        })
        // A thread being torn down: any stripe counts as well.
        .unwrap_or(0);
    &COUNTS[i]
}

#[inline]
fn count(allocations: u64, bytes: i64) {
    let c = counts();
    c.allocations.fetch_add(allocations, Ordering::Relaxed);
    c.live_bytes.fetch_add(bytes, Ordering::Relaxed);
}

// SAFETY: forwards every call to `System` unchanged; only adds relaxed counter updates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(1, layout.size() as i64);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(0, -(layout.size() as i64));
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(1, layout.size() as i64);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(1, new_size as i64 - layout.size() as i64);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Total allocations so far, all threads (counts only where [`CountingAlloc`] is installed).
pub fn allocations() -> u64 {
    COUNTS
        .iter()
        .map(|c| c.allocations.load(Ordering::Relaxed))
        .sum()
}

/// Bytes allocated and not yet freed, all threads (requested sizes, without the allocator's
/// own rounding; counts only where [`CountingAlloc`] is installed).
pub fn live_bytes() -> i64 {
    COUNTS
        .iter()
        .map(|c| c.live_bytes.load(Ordering::Relaxed))
        .sum()
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

impl<R> Service<http::Request<R>> for Bare {
    type Response = http::Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<R>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(())))
    }
}

/// Calls a fresh clone of the service it holds for every request, as a server does with the
/// service it is given (hyper-util's `TowerToHyperService`, axum's router): each call starts
/// from the state of the original, which itself never calls.
#[derive(Clone, Debug, Default)]
pub struct ClonePerCall<S>(pub S);

impl<S, R> Service<R> for ClonePerCall<S>
where
    S: Service<R> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tower::util::Oneshot<S, R>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: R) -> Self::Future {
        tower::ServiceExt::oneshot(self.0.clone(), req)
    }
}

/// The baseline for layers that wrap response bodies: answers at once with an empty body.
#[derive(Clone, Copy, Debug, Default)]
pub struct BareBody;

impl<R> Service<http::Request<R>> for BareBody {
    type Response = http::Response<http_body_util::Empty<bytes::Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<R>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(http_body_util::Empty::new())))
    }
}

/// The baseline that makes a timer arm: its future is `Pending` once (waking itself), then
/// ready.
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingOnce;

/// The future of [`PendingOnce`].
#[derive(Debug)]
pub struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = Result<http::Response<()>, Infallible>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.0 {
            Poll::Ready(Ok(http::Response::new(())))
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

impl<R> Service<http::Request<R>> for PendingOnce {
    type Response = http::Response<()>;
    type Error = Infallible;
    type Future = YieldOnce;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<R>) -> Self::Future {
        YieldOnce(false)
    }
}

/// One call: `poll_ready`, `call`, and polls of the response future until it is ready (the
/// contenders wrap services that answer at once or after one `Pending`, so no runtime is
/// needed to drive them).
///
/// # Panics
///
/// If the contender is not ready, does not answer within a few polls, or answers with an
/// error.
pub fn call_once<S>(svc: &mut S)
where
    S: Service<http::Request<()>>,
    S::Error: std::fmt::Debug,
{
    call_with(svc, http::Request::new(()));
}

/// [`call_once`] with a given request.
///
/// # Panics
///
/// As [`call_once`].
pub fn call_with<S, R>(svc: &mut S, req: http::Request<R>)
where
    S: Service<http::Request<R>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready(), "contender not ready");
    let mut fut = std::pin::pin!(svc.call(req));
    for _ in 0..4 {
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            black_box(r.expect("contender answers"));
            return;
        }
    }
    panic!("contender did not answer");
}

/// Like [`call_with`], but keeps polling while the contender is `Pending` (a contended lock
/// in a peer parks its future; with a no-op waker, polling again is how it makes progress).
///
/// # Panics
///
/// If the contender answers with an error or never answers.
pub fn call_spinning<S, R>(svc: &mut S, req: http::Request<R>)
where
    S: Service<http::Request<R>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut spins = 0u64;
    loop {
        match svc.poll_ready(&mut cx) {
            Poll::Ready(r) => {
                r.expect("contender ready");
                break;
            }
            Poll::Pending => {
                spins += 1;
                assert!(spins < 100_000_000, "contender never became ready");
                std::thread::yield_now();
            }
        }
    }
    let mut fut = std::pin::pin!(svc.call(req));
    loop {
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            black_box(r.expect("contender answers"));
            return;
        }
        spins += 1;
        assert!(spins < 100_000_000, "contender never answered");
        std::thread::yield_now();
    }
}

/// One call whose outcome may be an error (for trippers and open breakers); polls until
/// ready like [`call_with`].
///
/// # Panics
///
/// If the contender is not ready or does not answer within a few polls.
pub fn try_call<S, R>(svc: &mut S, req: http::Request<R>) -> Result<S::Response, S::Error>
where
    S: Service<http::Request<R>>,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(e)) => return Err(e),
        Poll::Pending => panic!("contender not ready"),
    }
    let mut fut = std::pin::pin!(svc.call(req));
    for _ in 0..4 {
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            return r;
        }
    }
    panic!("contender did not answer");
}

/// Benchmarks contenders of one group and records their allocations per call.
#[allow(missing_debug_implementations)] // criterion's `BenchmarkGroup` is not `Debug`
pub struct Recorder<'c> {
    group: BenchmarkGroup<'c, WallTime>,
    name: &'static str,
}

impl<'c> Recorder<'c> {
    /// A recorder for criterion group `name`.
    pub fn new(c: &'c mut Criterion, name: &'static str) -> Self {
        Self {
            group: c.benchmark_group(name),
            name,
        }
    }

    /// Benchmarks `svc` with [`call_once`] under the name `contender`.
    pub fn bench<S>(&mut self, contender: &str, svc: S)
    where
        S: Service<http::Request<()>>,
        S::Error: std::fmt::Debug,
    {
        self.bench_req(contender, svc, || http::Request::new(()));
    }

    /// Benchmarks `svc` on requests made by `make_req` (made inside the timed loop, so
    /// compare contenders that use the same maker).
    pub fn bench_req<S, R>(
        &mut self,
        contender: &str,
        mut svc: S,
        mut make_req: impl FnMut() -> http::Request<R>,
    ) where
        S: Service<http::Request<R>>,
        S::Error: std::fmt::Debug,
    {
        self.group
            .bench_function(contender, |b| b.iter(|| call_with(&mut svc, make_req())));
        let allocs = allocations_per_call(10_000, || call_with(&mut svc, make_req()));
        record_allocs(self.name, contender, allocs);
    }

    /// Benchmarks `svc` driven to completion by `rt.block_on` (for contenders that need a
    /// timer turn even for a zero delay); every contender of such a group must use it.
    pub fn bench_blocking<S, R>(
        &mut self,
        contender: &str,
        mut svc: S,
        rt: &tokio::runtime::Runtime,
        mut make_req: impl FnMut() -> http::Request<R>,
    ) where
        S: Service<http::Request<R>>,
        S::Error: std::fmt::Debug,
    {
        let once = |svc: &mut S, req| {
            rt.block_on(async {
                std::future::poll_fn(|cx| svc.poll_ready(cx))
                    .await
                    .expect("ready");
                black_box(svc.call(req).await.expect("contender answers"));
            })
        };
        self.group
            .bench_function(contender, |b| b.iter(|| once(&mut svc, make_req())));
        let allocs = allocations_per_call(2_000, || once(&mut svc, make_req()));
        record_allocs(self.name, contender, allocs);
    }

    /// Like [`bench`](Self::bench), but every call is made from inside a tokio task (as a
    /// handler's or a client's calls are), polled by `rt` with coop budgeting off so that a
    /// timer is registered on every call, not just the first 128 of a poll.
    #[allow(clippy::disallowed_types, clippy::disallowed_methods)] // wall time is the measurement
    pub fn bench_in_task<S>(&mut self, contender: &str, svc: S, rt: &tokio::runtime::Runtime)
    where
        S: Service<http::Request<()>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: std::fmt::Debug,
    {
        let run = |iters: u64| {
            let mut svc = svc.clone();
            rt.block_on(rt.spawn(tokio::task::unconstrained(async move {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    call_once(&mut svc);
                }
                start.elapsed()
            })))
            .expect("bench task")
        };
        self.group.bench_function(contender, |b| b.iter_custom(run));
        let mut one = svc.clone();
        let allocs = rt
            .block_on(rt.spawn(tokio::task::unconstrained(async move {
                allocations_per_call(10_000, || call_once(&mut one))
            })))
            .expect("bench task");
        record_allocs(self.name, contender, allocs);
    }

    /// Benchmarks an open breaker's fast failure: every call must fail.
    pub fn bench_err<S, R>(
        &mut self,
        contender: &str,
        mut svc: S,
        mut make_req: impl FnMut() -> http::Request<R>,
    ) where
        S: Service<http::Request<R>>,
    {
        assert!(
            try_call(&mut svc, make_req()).is_err(),
            "{contender} is not open"
        );
        self.group.bench_function(contender, |b| {
            b.iter(|| black_box(try_call(&mut svc, make_req()).is_err()))
        });
        let allocs = allocations_per_call(10_000, || {
            black_box(try_call(&mut svc, make_req()).is_err());
        });
        record_allocs(self.name, contender, allocs);
    }

    /// Benchmarks `svc` shared by two OS threads (each drives its own clone; clones share the
    /// layer's state). The figure is wall time per call of the pair's combined throughput, so
    /// perfect scaling halves the single-thread figure. Each thread enters `rt` for timers.
    pub fn bench_two_threads<S, R>(
        &mut self,
        contender: &str,
        svc: S,
        rt: &tokio::runtime::Handle,
        make_req: fn() -> http::Request<R>,
    ) where
        S: Service<http::Request<R>> + Clone + Send + 'static,
        S::Error: std::fmt::Debug,
        R: 'static,
    {
        self.bench_two_threads_in(contender, svc, rt, make_req, None);
    }

    /// As [`bench_two_threads`](Self::bench_two_threads), each thread's calls made with `id`
    /// ambient (as the single-thread stack rows make theirs), so that the two figures compare.
    #[allow(clippy::disallowed_types, clippy::disallowed_methods)] // wall time is the measurement
    pub fn bench_two_threads_in<S, R>(
        &mut self,
        contender: &str,
        svc: S,
        rt: &tokio::runtime::Handle,
        make_req: fn() -> http::Request<R>,
        id: Option<steadfast::correlation::CorrelationId>,
    ) where
        S: Service<http::Request<R>> + Clone + Send + 'static,
        S::Error: std::fmt::Debug,
        R: 'static,
    {
        fn within<T>(
            id: &Option<steadfast::correlation::CorrelationId>,
            f: impl FnOnce() -> T,
        ) -> T {
            match id {
                Some(id) => id.clone().sync_scope(f),
                None => f(),
            }
        }
        self.group.bench_function(contender, |b| {
            b.iter_custom(|iters| {
                let barrier = std::sync::Arc::new(std::sync::Barrier::new(3));
                let threads: Vec<_> = (0..2)
                    .map(|_| {
                        let (mut svc, rt, barrier, id) =
                            (svc.clone(), rt.clone(), barrier.clone(), id.clone());
                        std::thread::spawn(move || {
                            let _g = rt.enter();
                            within(&id, || {
                                barrier.wait();
                                for _ in 0..iters.div_ceil(2) {
                                    call_spinning(&mut svc, make_req());
                                }
                            })
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
        let mut one = svc.clone();
        // Spinning: a contender behind a `Buffer` answers once its worker task has run.
        let allocs = within(&id, || {
            allocations_per_call(10_000, || call_spinning(&mut one, make_req()))
        });
        record_allocs(self.name, contender, allocs);
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

/// Routes every request to one fixed address, whatever the URI says.
#[derive(Clone, Debug)]
pub struct Fixed<S>(pub S, pub std::net::SocketAddr);

impl<S, B> Service<http::Request<B>> for Fixed<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        *req.uri_mut() = format!("http://{}/", self.1).parse().expect("uri");
        self.0.call(req)
    }
}

/// The floor under a client stack like ours on the real path, hand-written (issue 22): the
/// work every call of `client::http()` must do on the wire, and nothing else. The ambient
/// correlation id (or a generated UUIDv7 outside a handler) and a deadline header written on the request, a copy of its head and body kept
/// (what a retry needs to send it again), a timer around the call. No policy, no state shared
/// between calls, no span, no response body wrapper. What our stack costs over this row is
/// what its guarantees cost beyond their wire work.
#[derive(Clone, Debug)]
pub struct Floor<S> {
    inner: S,
    make: steadfast::correlation::UuidV7,
    deadline: http::HeaderValue,
}

impl<S> Floor<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            make: steadfast::correlation::UuidV7::new(),
            deadline: http::HeaderValue::from_static("10000"),
        }
    }
}

const FLOOR_ID: http::HeaderName = http::HeaderName::from_static("x-correlation-id");
const FLOOR_DEADLINE: http::HeaderName = http::HeaderName::from_static("x-request-timeout-ms");

impl<S, B> Service<http::Request<B>> for Floor<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<tower::BoxError>,
    B: Clone,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = FloorFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        use steadfast::correlation::{CorrelationId, MakeCorrelationId};
        // The ambient id when the call is made inside a handler, else a new one.
        let id = CorrelationId::current().unwrap_or_else(|| self.make.make_id());
        let headers = req.headers_mut();
        headers.insert(FLOOR_ID, id.header_value().clone());
        headers.insert(FLOOR_DEADLINE, self.deadline.clone());
        let (parts, body) = req.into_parts();
        let kept = (parts.clone(), body.clone());
        let call = self.inner.call(http::Request::from_parts(parts, body));
        FloorFuture {
            inner: tokio::time::timeout(std::time::Duration::from_secs(10), call),
            _kept: kept,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Floor`].
    pub struct FloorFuture<F, B> {
        #[pin]
        inner: tokio::time::Timeout<F>,
        _kept: (http::request::Parts, B),
    }
}

impl<F, B, T, E> Future for FloorFuture<F, B>
where
    F: Future<Output = Result<T, E>>,
    E: Into<tower::BoxError>,
{
    type Output = Result<T, tower::BoxError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(out)) => Poll::Ready(out.map_err(Into::into)),
            Poll::Ready(Err(elapsed)) => Poll::Ready(Err(elapsed.into())),
        }
    }
}

/// The floor under a server stack like ours, hand-written (issue 22): the wire work of
/// `server::http()` and nothing else. The inbound id read and validated (or one generated),
/// the deadline header read, the id echoed on the response. No ambient scope, no request
/// extension, no span, no timer (the handlers this measures answer at once, so ours arms none
/// either).
#[derive(Clone, Debug)]
pub struct ServerFloor<S> {
    inner: S,
    make: steadfast::correlation::UuidV7,
}

impl<S> ServerFloor<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            make: steadfast::correlation::UuidV7::new(),
        }
    }
}

impl<S, B, ResB> Service<http::Request<B>> for ServerFloor<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ServerFloorFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use steadfast::correlation::MakeCorrelationId;
        let headers = req.headers();
        let id = match headers.get(FLOOR_ID) {
            Some(v) if steadfast::correlation::is_valid_default(v.as_bytes()) => v.clone(),
            _ => self.make.make_id().header_value().clone(),
        };
        black_box(floor_budget(headers));
        ServerFloorFuture {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

/// [`ServerFloor`] and the cheapest form of what the server's correlation layer promises
/// beyond the wire (issue 22's server target is priced against it): the id is also a request
/// extension, and it is ambient (`CorrelationId::current`, tokio's task-local) while the inner
/// service's `call` and its future run. `http::Extensions` allocates its map, its table and
/// the boxed value on a request that has none, as tower-http's `RequestId` pays too. Not
/// covered, though ours does them: the id ambient while the future is dropped and while the
/// response body is read, and the span.
#[derive(Clone, Debug)]
pub struct ServerContractFloor<S> {
    inner: S,
    make: steadfast::correlation::UuidV7,
}

impl<S> ServerContractFloor<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            make: steadfast::correlation::UuidV7::new(),
        }
    }
}

impl<S, B, ResB> Service<http::Request<B>> for ServerContractFloor<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ServerFloorFuture<steadfast::correlation::WithCorrelationId<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        use steadfast::correlation::{CorrelationId, MakeCorrelationId};
        let headers = req.headers();
        let id = match headers.get(FLOOR_ID).cloned().map(CorrelationId::try_from) {
            Some(Ok(id)) => id,
            _ => self.make.make_id(),
        };
        black_box(floor_budget(headers));
        req.extensions_mut().insert(id.clone());
        let inner = id.clone().sync_scope(|| self.inner.call(req));
        ServerFloorFuture {
            id: Some(id.header_value().clone()),
            inner: id.scope(inner),
        }
    }
}

/// The deadline budget an inbound request carries, in milliseconds (the floors' read).
fn floor_budget(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(FLOOR_DEADLINE)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

pin_project_lite::pin_project! {
    /// The response future of [`ServerFloor`].
    pub struct ServerFloorFuture<F> {
        #[pin]
        inner: F,
        id: Option<http::HeaderValue>,
    }
}

impl<F, ResB, E> Future for ServerFloorFuture<F>
where
    F: Future<Output = Result<http::Response<ResB>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(out) => out?,
        };
        if let Some(id) = this.id.take() {
            res.headers_mut().insert(FLOOR_ID, id);
        }
        Poll::Ready(Ok(res))
    }
}

/// The client preset's layers one by one, with its settings, for the cases that build the
/// stack up a layer at a time (innermost first: `attempt`, `breaker`, `retry`, `total`,
/// `id`).
#[derive(Clone, Debug)]
pub struct PresetLayers {
    /// The attempt timeout (5 s).
    pub attempt: steadfast::timeout::TimeoutLayer,
    /// The per-authority breaker.
    pub breaker: steadfast::breaker::KeyedCircuitBreakerLayer<
        steadfast::common::DefaultClassifier,
        steadfast::breaker::ByAuthority,
        Option<http::uri::Authority>,
    >,
    /// Retry with its defaults.
    pub retry: steadfast::retry::RetryLayer,
    /// The total timeout (10 s), shared with the layers below, covering the body.
    pub total: steadfast::timeout::BodyTimeoutLayer,
    /// The correlation id on outgoing calls.
    pub id: steadfast::correlation::PropagateCorrelationIdLayer,
}

impl Default for PresetLayers {
    fn default() -> Self {
        use steadfast::timeout::TimeoutLayer;
        Self {
            attempt: TimeoutLayer::new(std::time::Duration::from_secs(5)),
            breaker: steadfast::breaker::CircuitBreakerLayer::builder()
                .build_per_authority()
                .expect("valid"),
            retry: steadfast::retry::RetryLayer::new(),
            total: TimeoutLayer::builder()
                .limit(std::time::Duration::from_secs(10))
                .share_own(true)
                .covering_body()
                .build()
                .expect("valid"),
            id: steadfast::correlation::PropagateCorrelationIdLayer::new(),
        }
    }
}

/// The 429 a gateway answers a client over its rate, as the demo's gateway builds it:
/// `Retry-After` in whole seconds, rounded up, at least one, and `body`.
///
/// ```
/// let res = steadfast_bench::too_many_requests(std::time::Duration::from_millis(1_500), ());
/// assert_eq!(res.status(), 429);
/// assert_eq!(res.headers()["retry-after"], "2");
/// ```
pub fn too_many_requests<B>(wait: std::time::Duration, body: B) -> http::Response<B> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut res = http::Response::new(body);
    *res.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
    res.headers_mut()
        .insert(http::header::RETRY_AFTER, secs.max(1).into());
    res
}

/// A gateway's proxy (the `gateway` and `calls` binaries): answers every request with the body
/// of a GET to `$uri` (a `String`) sent through `$client`, cloned for every request as a
/// handler does.
#[macro_export]
macro_rules! proxy {
    ($client:expr, $uri:expr) => {{
        let (client, uri) = ($client, $uri);
        ::tower::service_fn(move |_req: ::http::Request<::hyper::body::Incoming>| {
            let (client, uri) = (client.clone(), ::std::clone::Clone::clone(&uri));
            async move {
                let req = ::http::Request::get(uri)
                    .body(::http_body_util::Full::default())
                    .expect("req");
                let res = ::tower::ServiceExt::oneshot(client, req)
                    .await
                    .expect("upstream");
                let body = ::http_body_util::BodyExt::collect(res.into_body())
                    .await
                    .expect("body")
                    .to_bytes();
                Ok::<_, ::std::convert::Infallible>(::http::Response::new(
                    ::http_body_util::Full::new(body),
                ))
            }
        })
    }};
}
