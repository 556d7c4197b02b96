//! Hostile tests of `HedgeLayer`: every promise of its public docs attacked through real
//! behaviour, on paused time (the multi-thread test excepted) with mock upstreams.
//!
//! Tests that fail document a broken promise; tests that pass are kept as regression tests.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use steadfast_core::{BoxError, Class, Deadline, Delivery, PolicyRejected};
use steadfast_retry::error::InvalidHedgeConfig;
use steadfast_retry::{
    Budget, BudgetConfig, HedgeBuilder, HedgeDelay, HedgeLayer, ReplayBody, RetryLayer,
};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

// ---------------------------------------------------------------------------------------
// A scriptable upstream
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Out {
    Status(u16, Vec<(&'static str, &'static str)>),
    /// A transport error (retryable, maybe sent).
    Reset,
    /// A breaker's refusal (PolicyRejected in the source chain).
    Policy,
    /// An error a custom classifier calls final.
    Fatal,
    /// Refused before anything was sent (a balancer's rerouting marker in the chain).
    NotSent,
}

#[derive(Clone, Debug)]
struct Plan {
    after: Duration,
    out: Out,
}

fn ok(ms: u64) -> Plan {
    status(ms, 200)
}

fn status(ms: u64, code: u16) -> Plan {
    Plan {
        after: Duration::from_millis(ms),
        out: Out::Status(code, vec![]),
    }
}

fn hinted(ms: u64, code: u16, headers: Vec<(&'static str, &'static str)>) -> Plan {
    Plan {
        after: Duration::from_millis(ms),
        out: Out::Status(code, headers),
    }
}

fn err(ms: u64, out: Out) -> Plan {
    Plan {
        after: Duration::from_millis(ms),
        out,
    }
}

#[derive(Debug)]
struct Seen {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default, Debug)]
struct Log {
    /// `call()` invocations: the request reached the upstream (whatever its body did).
    calls: u32,
    /// Requests whose body was read whole.
    requests: Vec<Seen>,
    /// Attempts whose body failed to read (never "delivered").
    body_errors: Vec<String>,
    /// Attempts dropped before they answered.
    cancelled: u32,
}

type Shared = Arc<Mutex<Log>>;

struct DropFlag(Shared, bool);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.lock().unwrap().cancelled += 1;
        }
    }
}

#[derive(Debug)]
struct Rejected;
impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("breaker open")
    }
}
impl std::error::Error for Rejected {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&PolicyRejected::INSTANCE)
    }
}

#[derive(Debug)]
struct Refused;
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("endpoint refused; another can take it")
    }
}
impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&steadfast_core::NotSent::INSTANCE)
    }
}

#[derive(Debug)]
struct FatalError;
impl std::fmt::Display for FatalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fatal")
    }
}
impl std::error::Error for FatalError {}

/// Attempt `i` (arrival order) follows `plans[i]` (the last repeats). Reads the whole body
/// first, as a transport does; a body that fails to read fails the attempt with its error.
fn upstream<B>(
    plans: Vec<Plan>,
) -> (
    impl Service<Request<ReplayBody<B>>, Response = Response<u32>, Error = BoxError, Future: Send>
    + Clone
    + Send
    + 'static,
    Shared,
)
where
    B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static,
{
    let log: Shared = Arc::default();
    let n = Arc::new(AtomicU32::new(0));
    let plans = Arc::new(plans);
    let l = log.clone();
    let svc = service_fn(move |req: Request<ReplayBody<B>>| {
        let (log, n, plans) = (l.clone(), n.clone(), plans.clone());
        let i = n.fetch_add(1, Ordering::SeqCst);
        log.lock().unwrap().calls += 1;
        async move {
            let mut flag = DropFlag(log.clone(), false);
            let (parts, body) = req.into_parts();
            let bytes = match body.collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    flag.1 = true;
                    log.lock().unwrap().body_errors.push(e.to_string());
                    return Err(e);
                }
            };
            log.lock().unwrap().requests.push(Seen {
                at: Instant::now(),
                headers: parts.headers,
                body: bytes,
            });
            let plan = &plans[(i as usize).min(plans.len() - 1)];
            tokio::time::sleep(plan.after).await;
            flag.1 = true;
            match &plan.out {
                Out::Status(code, headers) => {
                    let mut b = Response::builder().status(*code);
                    for (k, v) in headers {
                        b = b.header(*k, *v);
                    }
                    Ok(b.body(i).unwrap())
                }
                Out::Reset => Err(BoxError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))),
                Out::Policy => Err(BoxError::from(Rejected)),
                Out::Fatal => Err(BoxError::from(FatalError)),
                Out::NotSent => Err(BoxError::from(Refused)),
            }
        }
    });
    (svc, log)
}

fn fixed() -> HedgeBuilder {
    HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(20)))
        .max_extra_load(1.0)
}

fn get() -> Request<Full<Bytes>> {
    Request::new(Full::new(Bytes::from_static(b"payload")))
}

fn post() -> Request<Full<Bytes>> {
    Request::post("/")
        .body(Full::new(Bytes::from_static(b"charge me once")))
        .unwrap()
}

/// Earns the share of extra load (it starts empty) with two quick calls (plans 0 and 1).
async fn earn<S, B>(svc: &S)
where
    S: Service<Request<B>, Response = Response<u32>, Error = BoxError> + Clone,
    B: Default,
{
    for _ in 0..2 {
        let _ = svc.clone().oneshot(Request::new(B::default())).await;
    }
}

/// Earns the share for `n - 1` hedges at least (plans 0..n quick).
async fn earn_n<S, B>(svc: &S, n: usize)
where
    S: Service<Request<B>, Response = Response<u32>, Error = BoxError> + Clone,
    B: Default,
{
    for _ in 0..n {
        let _ = svc.clone().oneshot(Request::new(B::default())).await;
    }
}

/// `n` quick plans, then `rest`.
fn after_quick(n: usize, rest: Vec<Plan>) -> Vec<Plan> {
    let mut v = vec![ok(0); n];
    v.extend(rest);
    v
}

/// A budget holding exactly `tokens`, that neither refills nor (over a test) decays much.
fn budget(tokens: u32) -> Arc<Budget> {
    let b = Arc::new(Budget::new(BudgetConfig {
        ratio: 1.0,
        min_per_sec: 0,
        window: Duration::from_secs(1_000_000),
    }));
    for _ in 0..tokens {
        b.deposit();
    }
    b
}

/// Polls `fut` once.
async fn poll_once<F: std::future::Future + ?Sized>(mut fut: Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 0.01
}

// ---------------------------------------------------------------------------------------
// A. Requests that must not be sent twice
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn post_without_key_answered_503_reaches_the_upstream_once() {
    let (up, log) = upstream(vec![ok(0), ok(0), status(5, 503), ok(0)]);
    let svc = fixed().max_attempts(5).build().unwrap().layer(up);
    earn(&svc).await;
    let res = svc.oneshot(post()).await.unwrap();
    assert_eq!(res.status(), 503, "the answer as it is");
    assert_eq!(
        log.lock().unwrap().calls,
        3,
        "the POST reached the upstream once"
    );
}

#[tokio::test(start_paused = true)]
async fn post_without_key_reset_reaches_the_upstream_once() {
    let (up, log) = upstream(vec![ok(0), ok(0), err(5, Out::Reset), ok(0)]);
    let svc = fixed().max_attempts(5).build().unwrap().layer(up);
    earn(&svc).await;
    svc.oneshot(post()).await.unwrap_err();
    assert_eq!(log.lock().unwrap().calls, 3);
}

#[tokio::test(start_paused = true)]
async fn post_without_key_reset_immediately_reaches_the_upstream_once() {
    // The reset comes before the hedge timer could fire, on the very first poll.
    let (up, log) = upstream(vec![ok(0), ok(0), err(0, Out::Reset), ok(0)]);
    let svc = HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::ZERO))
        .max_extra_load(1.0)
        .max_attempts(5)
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    svc.oneshot(post()).await.unwrap_err();
    assert_eq!(log.lock().unwrap().calls, 3);
}

#[tokio::test(start_paused = true)]
async fn slow_non_idempotent_methods_are_never_hedged() {
    let methods = [
        Method::POST,
        Method::PATCH,
        Method::CONNECT,
        Method::from_bytes(b"get").unwrap(), // not GET: methods are case-sensitive
        Method::from_bytes(b"PURGE").unwrap(),
    ];
    for m in methods {
        let (up, log) = upstream(vec![ok(0), ok(0), status(100, 503), ok(0)]);
        let svc = fixed().max_attempts(5).build().unwrap().layer(up);
        earn(&svc).await;
        let req = Request::builder()
            .method(m.clone())
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(log.lock().unwrap().calls, 3, "{m} sent once");
    }
}

#[tokio::test(start_paused = true)]
async fn idempotent_methods_and_keyed_posts_are_hedged() {
    for m in [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ] {
        let (up, _log) = upstream(vec![ok(0), ok(0), ok(100), ok(5)]);
        let svc = fixed().build().unwrap().layer(up);
        earn(&svc).await;
        let req = Request::builder()
            .method(m.clone())
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(*res.body(), 3, "{m}: the hedge answered");
    }
    let (up, log) = upstream(vec![ok(0), ok(0), status(5, 503), ok(5)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let req = Request::post("/")
        .header("Idempotency-Key", "abc")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
    assert_eq!(log.lock().unwrap().calls, 4);
}

// ---------------------------------------------------------------------------------------
// B. Bodies: the replay cap, bodies that grow, lie or fail
// ---------------------------------------------------------------------------------------

/// A streamed body, not `Clone`: chunks as the test sends them, or an error.
struct Streamed {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, &'static str>>,
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|c| {
            c.map(|r| match r {
                Ok(b) => Ok(Frame::data(b)),
                Err(e) => Err(BoxError::from(e)),
            })
        })
    }
}

impl Default for Streamed {
    fn default() -> Self {
        let (_, rx) = tokio::sync::mpsc::channel(1);
        Self { rx }
    }
}

fn streamed(chunks: &[&'static [u8]]) -> Streamed {
    let (tx, rx) = tokio::sync::mpsc::channel(chunks.len().max(1));
    for c in chunks {
        tx.try_send(Ok(Bytes::from_static(c))).unwrap();
    }
    Streamed { rx }
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_exactly_at_the_cap_is_hedged_whole() {
    let (up, log) = upstream::<Streamed>(vec![ok(0), ok(0), ok(1000), ok(5)]);
    let svc = fixed().replay_cap(16).build().unwrap().layer(up);
    earn(&svc).await;
    let req = Request::put("/")
        .body(streamed(&[b"01234567", b"89abcdef"]))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(*res.body(), 3, "hedged");
    let log = log.lock().unwrap();
    for r in &log.requests[2..] {
        assert_eq!(r.body, "0123456789abcdef");
    }
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_one_past_the_cap_is_not_hedged_and_never_sent_cut() {
    let (up, log) = upstream::<Streamed>(vec![ok(0), ok(0), ok(1000), ok(5)]);
    let svc = fixed().replay_cap(16).build().unwrap().layer(up);
    earn(&svc).await;
    let req = Request::put("/")
        .body(streamed(&[b"01234567", b"89abcdefg"]))
        .unwrap();
    let t = Instant::now();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!((*res.body(), t.elapsed()), (2, Duration::from_millis(1000)));
    let log = log.lock().unwrap();
    assert_eq!(log.calls, 3, "no hedge");
    assert!(log.body_errors.is_empty(), "{:?}", log.body_errors);
}

#[tokio::test(start_paused = true)]
async fn a_full_body_over_the_cap_is_not_hedged_and_one_at_the_cap_is() {
    let (up, log) = upstream::<Full<Bytes>>(vec![ok(0), ok(0), ok(1000), ok(5)]);
    let svc = fixed().replay_cap(16).build().unwrap().layer(up);
    earn(&svc).await;
    let req = Request::put("/")
        .body(Full::new(Bytes::from_static(b"0123456789abcdefg")))
        .unwrap();
    svc.clone().oneshot(req).await.unwrap();
    assert_eq!(
        log.lock().unwrap().calls,
        3,
        "17 bytes over a 16-byte cap: no hedge"
    );

    let (up, log) = upstream::<Full<Bytes>>(vec![ok(0), ok(0), ok(1000), ok(5)]);
    let svc = fixed().replay_cap(16).build().unwrap().layer(up);
    earn(&svc).await;
    let req = Request::put("/")
        .body(Full::new(Bytes::from_static(b"0123456789abcdef")))
        .unwrap();
    assert_eq!(*svc.oneshot(req).await.unwrap().body(), 3);
    assert_eq!(log.lock().unwrap().requests[3].body, "0123456789abcdef");
}

#[tokio::test(start_paused = true)]
async fn a_zero_cap_still_hedges_an_empty_body_and_never_a_non_empty_one() {
    let (up, log) = upstream::<Streamed>(vec![ok(0), ok(0), ok(1000), ok(5)]);
    let svc = fixed().replay_cap(0).build().unwrap().layer(up);
    earn(&svc).await;
    let res = svc
        .clone()
        .oneshot(Request::new(streamed(&[b"x"])))
        .await
        .unwrap();
    assert_eq!(*res.body(), 2);
    assert_eq!(log.lock().unwrap().calls, 3);
}

/// The body grows past the cap after the hedge was sent (it replayed the first 8 bytes and
/// waits beside the first attempt). One attempt reads on; the one behind it must fail rather
/// than send a body with a hole — and that local failure must not beat the healthy attempt.
#[tokio::test(start_paused = true)]
async fn a_body_growing_past_the_cap_mid_hedge_sends_no_hole_and_the_whole_attempt_answers() {
    let (up, log) = upstream::<Streamed>(vec![ok(0), ok(0), ok(100), ok(5)]);
    let svc = fixed().replay_cap(16).build().unwrap().layer(up);
    earn(&svc).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let call = tokio::spawn(svc.oneshot(Request::put("/").body(Streamed { rx }).unwrap()));
    tx.send(Ok(Bytes::from_static(b"01234567"))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await; // the hedge went at 20 ms
    assert_eq!(log.lock().unwrap().calls, 4, "the hedge was sent");
    tx.send(Ok(Bytes::from_static(b"89abcdefg"))).await.unwrap();
    drop(tx);
    let res = call.await.unwrap();
    let log = log.lock().unwrap();
    for r in &log.requests[2..] {
        assert_eq!(
            r.body, "0123456789abcdefg",
            "a body with a hole was delivered"
        );
    }
    let res = res.expect("the attempt that had the whole body answers, not the one that lost it");
    assert_eq!(res.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_that_fails_mid_way_never_yields_success() {
    let (up, log) = upstream::<Streamed>(vec![ok(0), ok(0), ok(100), ok(5)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let call = tokio::spawn(svc.oneshot(Request::put("/").body(Streamed { rx }).unwrap()));
    tx.send(Ok(Bytes::from_static(b"01234567"))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    tx.send(Err("disk on fire")).await.unwrap();
    drop(tx);
    let res = call.await.unwrap();
    assert!(
        res.is_err(),
        "the caller's body failed: no attempt can succeed"
    );
    let log = log.lock().unwrap();
    assert_eq!(
        log.requests.len(),
        2,
        "no attempt got a whole body: {:?}",
        log.requests
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_that_failed_before_the_hedge_is_not_replayed() {
    // The first attempt sees the caller's body fail and answers with that error (retryable
    // by default): no hedge may be sent with the part that was read.
    let (up, log) = upstream::<Streamed>(vec![ok(0), ok(0), ok(5)]);
    let svc = fixed().max_attempts(5).build().unwrap().layer(up);
    earn(&svc).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Ok(Bytes::from_static(b"01234567"))).await.unwrap();
    tx.send(Err("gone")).await.unwrap();
    drop(tx);
    svc.oneshot(Request::put("/").body(Streamed { rx }).unwrap())
        .await
        .unwrap_err();
    let log = log.lock().unwrap();
    assert_eq!(log.calls, 3, "no hedge after the body failed");
}

/// A body whose size hint says "exactly N more" truthfully at the start, then stays stuck
/// at the total (over-reporting) as it is read.
#[derive(Default)]
struct StaleHint {
    inner: Streamed,
    total: u64,
}

impl Body for StaleHint {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.total)
    }
}

#[tokio::test(start_paused = true)]
async fn a_hedge_body_size_hint_never_promises_less_than_it_sends() {
    // What a transport reads before it sends: the hint (content-length) and is_end_stream.
    let hints: Arc<Mutex<Vec<(SizeHint, bool, usize)>>> = Arc::default();
    let h2 = hints.clone();
    let n = Arc::new(AtomicU32::new(0));
    let up = service_fn(move |req: Request<ReplayBody<Streamed>>| {
        let (h2, i) = (h2.clone(), n.fetch_add(1, Ordering::SeqCst));
        async move {
            let body = req.into_body();
            let (hint, end) = (body.size_hint(), body.is_end_stream());
            let len = body.collect().await?.to_bytes().len();
            h2.lock().unwrap().push((hint, end, len));
            tokio::time::sleep(Duration::from_millis(if i == 2 { 1000 } else { 5 })).await;
            Ok::<_, BoxError>(Response::new(i))
        }
    });
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    // The whole body is read by the first attempt before the hedge goes.
    let req = Request::put("/")
        .body(streamed(&[b"01234567", b"89abcdef"]))
        .unwrap();
    assert_eq!(*svc.oneshot(req).await.unwrap().body(), 3);
    let hints = hints.lock().unwrap();
    for (hint, end, len) in &hints[2..] {
        assert_eq!(*len, 16);
        assert!(!end, "is_end_stream before a byte was sent");
        assert!(
            hint.lower() <= 16 && hint.upper().is_none_or(|u| u >= 16),
            "{hint:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// C. Readiness, cancellation and budget tokens
// ---------------------------------------------------------------------------------------

const OPEN: u8 = 0;
const PENDING: u8 = 1;
const FAILING: u8 = 2;

#[derive(Default)]
struct Gate {
    mode: AtomicU8,
    /// `call` on a clone that had not answered `poll_ready` with `Ready(Ok)`.
    unready_calls: AtomicU32,
    pending_polls: AtomicU32,
}

/// Wraps a service: its clones are ready, never ready, or fail `poll_ready`, as the gate
/// says; every clone must be polled ready before it is called.
struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
    ready: bool,
}

impl<S: Clone> Clone for Gated<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            gate: self.gate.clone(),
            ready: false,
        }
    }
}

impl<S, R> Service<R> for Gated<S>
where
    S: Service<R, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.gate.mode.load(Ordering::SeqCst) {
            OPEN => {
                let r = self.inner.poll_ready(cx);
                if matches!(r, Poll::Ready(Ok(()))) {
                    self.ready = true;
                }
                r
            }
            PENDING => {
                self.gate.pending_polls.fetch_add(1, Ordering::SeqCst);
                Poll::Pending
            }
            _ => Poll::Ready(Err("endpoint gone".into())),
        }
    }
    fn call(&mut self, req: R) -> S::Future {
        if !self.ready {
            self.gate.unready_calls.fetch_add(1, Ordering::SeqCst);
        }
        self.ready = false;
        self.inner.call(req)
    }
}

fn gated<S>(inner: S) -> (Gated<S>, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    (
        Gated {
            inner,
            gate: gate.clone(),
            ready: false,
        },
        gate,
    )
}

#[tokio::test(start_paused = true)]
async fn every_attempt_is_polled_ready_before_it_is_called() {
    let (up, log) = upstream(vec![
        ok(0),
        ok(0),
        ok(1000),
        ok(1000),
        status(5, 503),
        ok(5),
    ]);
    let (up, gate) = gated(up);
    let svc = fixed().max_attempts(5).build().unwrap().layer(up);
    earn(&svc).await;
    svc.oneshot(get()).await.unwrap();
    assert!(log.lock().unwrap().calls >= 5);
    assert_eq!(gate.unready_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_whose_service_is_never_ready_does_not_hold_back_the_answer_nor_spend_tokens() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(100), ok(5)]);
    let (up, gate) = gated(up);
    let tokens = budget(3);
    let svc = fixed()
        .retry_budget(Some(tokens.clone()))
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    let before = tokens.balance();
    let mut call = Box::pin(svc.oneshot(get()));
    // Poll once so the first attempt goes, then shut the gate for the hedge.
    assert!(poll_once(call.as_mut()).await.is_pending());
    gate.mode.store(PENDING, Ordering::SeqCst);
    let t = Instant::now();
    let res = call.await.unwrap();
    assert_eq!((*res.body(), t.elapsed()), (2, Duration::from_millis(100)));
    assert!(
        gate.pending_polls.load(Ordering::SeqCst) > 0,
        "a hedge was wanted"
    );
    assert_eq!(log.lock().unwrap().calls, 3);
    assert!(
        close(tokens.balance(), before),
        "a hedge never sent spent a token: {before} -> {}",
        tokens.balance()
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_while_the_hedge_service_is_not_ready_gives_the_token_back() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000)]);
    let (up, gate) = gated(up);
    let tokens = budget(3);
    let svc = fixed()
        .retry_budget(Some(tokens.clone()))
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    let before = tokens.balance();
    let mut call = Box::pin(svc.oneshot(get()));
    assert!(poll_once(call.as_mut()).await.is_pending());
    gate.mode.store(PENDING, Ordering::SeqCst);
    let r = tokio::time::timeout(Duration::from_millis(50), call).await;
    assert!(r.is_err(), "still waiting");
    assert!(
        gate.pending_polls.load(Ordering::SeqCst) > 0,
        "the hedge was waiting to be sent"
    );
    let log = log.lock().unwrap();
    assert_eq!((log.calls, log.cancelled), (3, 1));
    assert!(
        close(tokens.balance(), before),
        "token leaked: {before} -> {}",
        tokens.balance()
    );
}

#[tokio::test(start_paused = true)]
async fn a_hedge_whose_service_fails_to_be_ready_leaves_the_first_attempt_to_answer() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(100), ok(5)]);
    let (up, gate) = gated(up);
    let tokens = budget(3);
    let svc = fixed()
        .retry_budget(Some(tokens.clone()))
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    let before = tokens.balance();
    let mut call = Box::pin(svc.oneshot(get()));
    assert!(poll_once(call.as_mut()).await.is_pending());
    gate.mode.store(FAILING, Ordering::SeqCst);
    let t = Instant::now();
    let res = call
        .await
        .expect("the running attempt's answer, not the hedge's readiness error");
    assert_eq!((*res.body(), t.elapsed()), (2, Duration::from_millis(100)));
    assert_eq!(log.lock().unwrap().calls, 3);
    assert!(
        close(tokens.balance(), before),
        "{before} -> {}",
        tokens.balance()
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_during_a_server_hint_wait_gives_the_token_back() {
    let (up, log) = upstream(vec![
        ok(0),
        ok(0),
        hinted(5, 503, vec![("retry-after", "2")]),
        ok(5),
    ]);
    let tokens = budget(3);
    let svc = fixed()
        .retry_budget(Some(tokens.clone()))
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    let before = tokens.balance();
    let r = tokio::time::timeout(Duration::from_millis(1000), svc.oneshot(get())).await;
    assert!(r.is_err());
    assert_eq!(log.lock().unwrap().calls, 3);
    assert!(
        close(tokens.balance(), before),
        "a hedge never sent kept its token: {before} -> {}",
        tokens.balance()
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_after_a_retryable_answer_cancels_the_rest() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000), status(0, 503), ok(1000)]);
    let svc = fixed().max_attempts(3).build().unwrap().layer(up);
    earn(&svc).await;
    let r = tokio::time::timeout(Duration::from_millis(60), svc.oneshot(get())).await;
    assert!(r.is_err());
    // The hedge answered 503 at 20 ms: the third went at once; both running are dropped.
    let log = log.lock().unwrap();
    assert_eq!((log.calls, log.cancelled), (5, 2));
}

#[tokio::test(start_paused = true)]
async fn a_refusing_share_takes_nothing_from_the_retry_budget() {
    // The share is empty (nothing earned): a hedge is refused. The retry budget must not
    // pay for a hedge that was never sent.
    let (up, log) = upstream(vec![ok(1000)]);
    let tokens = budget(3);
    let svc = HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(20)))
        .max_extra_load(0.01)
        .retry_budget(Some(tokens.clone()))
        .build()
        .unwrap()
        .layer(up);
    let before = tokens.balance();
    svc.oneshot(get()).await.unwrap();
    assert_eq!(log.lock().unwrap().calls, 1);
    assert!(
        close(tokens.balance(), before),
        "{before} -> {}",
        tokens.balance()
    );
}

#[tokio::test(start_paused = true)]
async fn a_hedge_spends_exactly_one_retry_token() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000), ok(5)]);
    let tokens = budget(3);
    let svc = fixed()
        .retry_budget(Some(tokens.clone()))
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    let before = tokens.balance();
    svc.oneshot(get()).await.unwrap();
    assert_eq!(log.lock().unwrap().calls, 4);
    assert!(
        close(tokens.balance(), before - 1.0),
        "{before} -> {}",
        tokens.balance()
    );
}

// ---------------------------------------------------------------------------------------
// D. The deadline
// ---------------------------------------------------------------------------------------

fn with_deadline(mut req: Request<Full<Bytes>>, ms: u64) -> Request<Full<Bytes>> {
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_millis(ms)));
    req
}

#[tokio::test(start_paused = true)]
async fn no_hedge_after_a_retryable_answer_at_or_past_the_deadline() {
    for at in [20, 25] {
        let (up, log) = upstream(vec![ok(0), ok(0), status(at, 503), ok(5)]);
        let svc = fixed().max_attempts(3).build().unwrap().layer(up);
        earn(&svc).await;
        let res = svc.oneshot(with_deadline(get(), 20)).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(
            log.lock().unwrap().calls,
            3,
            "a 503 at {at} ms, deadline 20 ms"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_hint_reaching_past_the_deadline_returns_the_answer_at_once() {
    let (up, log) = upstream(vec![
        ok(0),
        ok(0),
        hinted(5, 503, vec![("retry-after", "2")]),
        ok(5),
    ]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let res = svc.oneshot(with_deadline(get(), 1000)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(log.lock().unwrap().calls, 3);
    assert_eq!(
        t.elapsed(),
        Duration::from_millis(5),
        "no waiting for a hedge that cannot go"
    );
}

#[tokio::test(start_paused = true)]
async fn a_later_hedge_due_at_the_deadline_is_not_sent() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000)]);
    let svc = fixed().max_attempts(3).build().unwrap().layer(up);
    earn(&svc).await;
    let _ = svc.clone().oneshot(with_deadline(get(), 40)).await;
    assert_eq!(log.lock().unwrap().calls, 2 + 2, "at 0 and 20; not at 40");
    let _ = svc.oneshot(with_deadline(get(), 41)).await;
    assert_eq!(log.lock().unwrap().calls, 4 + 3);
}

#[tokio::test(start_paused = true)]
async fn an_ambient_deadline_is_respected_like_an_extension() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let d = Deadline::after(Duration::from_millis(20));
    let _ = d.scope(svc.oneshot(get())).await;
    assert_eq!(
        log.lock().unwrap().calls,
        3,
        "the hedge's time is the ambient deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_or_huge_deadline_neither_panics_nor_hedges_wrongly() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000), ok(1000), ok(5)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let mut req = get();
    req.extensions_mut().insert(Deadline::at(Instant::now()));
    let _ = svc.clone().oneshot(req).await;
    assert_eq!(log.lock().unwrap().calls, 3);
    let mut req = get();
    req.extensions_mut().insert(Deadline::after(Duration::MAX));
    assert_eq!(*svc.oneshot(req).await.unwrap().body(), 4);
}

// ---------------------------------------------------------------------------------------
// E. Server hints
// ---------------------------------------------------------------------------------------

/// First attempt answers 503 with `headers` after 5 ms; returns when the hedge went (from
/// the call's start) and how many attempts reached the upstream.
async fn next_hedge_after(
    headers: Vec<(&'static str, &'static str)>,
) -> (Option<Duration>, u32, u16) {
    let (up, log) = upstream(vec![ok(0), ok(0), hinted(5, 503, headers), ok(5)]);
    let svc = fixed()
        .max_server_delay(Duration::from_secs(10))
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let code = svc.oneshot(get()).await.unwrap().status().as_u16();
    let log = log.lock().unwrap();
    (log.requests.get(3).map(|r| r.at - t), log.calls, code)
}

#[tokio::test(start_paused = true)]
async fn retry_after_zero_sends_the_next_hedge_at_once() {
    assert_eq!(
        next_hedge_after(vec![("retry-after", "0")]).await,
        (Some(Duration::from_millis(5)), 4, 200)
    );
}

#[tokio::test(start_paused = true)]
async fn duplicate_retry_after_fields_the_longest_wins() {
    assert_eq!(
        next_hedge_after(vec![("retry-after", "1"), ("retry-after", "3")]).await,
        (Some(Duration::from_millis(3005)), 4, 200)
    );
    assert_eq!(
        next_hedge_after(vec![("retry-after", "3"), ("retry-after", "1")]).await,
        (Some(Duration::from_millis(3005)), 4, 200)
    );
}

#[tokio::test(start_paused = true)]
async fn garbage_retry_after_is_ignored() {
    for v in ["soon", "-5", "1.5", "", "Mon, 99 Foo 2024 99:99:99 GMT"] {
        let (at, calls, _) = next_hedge_after(vec![("retry-after", v)]).await;
        assert_eq!(calls, 4, "retry-after {v:?}");
        assert!(
            at.unwrap() <= Duration::from_secs(10),
            "retry-after {v:?}: {at:?}"
        );
    }
    // A delta too large for any integer is "very long" (RFC 9111 § 1.2.2): over the cap.
    assert_eq!(
        next_hedge_after(vec![("retry-after", "99999999999999999999999")]).await,
        (None, 3, 503)
    );
}

#[tokio::test(start_paused = true)]
async fn pushback_that_says_stop_ends_hedging_and_a_valid_one_delays() {
    for v in ["-1", "abc", "1.5", " 5"] {
        assert_eq!(
            next_hedge_after(vec![("grpc-retry-pushback-ms", v)]).await,
            (None, 3, 503),
            "pushback {v:?}"
        );
    }
    assert_eq!(
        next_hedge_after(vec![("grpc-retry-pushback-ms", "150")]).await,
        (Some(Duration::from_millis(155)), 4, 200)
    );
    // A stop in any field stops.
    assert_eq!(
        next_hedge_after(vec![
            ("grpc-retry-pushback-ms", "10"),
            ("grpc-retry-pushback-ms", "-1")
        ])
        .await,
        (None, 3, 503)
    );
}

#[tokio::test(start_paused = true)]
async fn a_hint_over_the_cap_ends_hedging_at_once() {
    let t = Instant::now();
    let (at, calls, code) = next_hedge_after(vec![("retry-after", "11")]).await;
    assert_eq!((at, calls, code), (None, 3, 503));
    assert!(t.elapsed() < Duration::from_millis(10), "{:?}", t.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_huge_hint_with_no_cap_does_not_panic() {
    let (up, _log) = upstream(vec![
        ok(0),
        ok(0),
        hinted(5, 503, vec![("retry-after", "18446744073709551615")]),
        hinted(
            5,
            503,
            vec![("grpc-retry-pushback-ms", "18446744073709551615")],
        ),
        ok(5),
    ]);
    let svc = fixed()
        .max_attempts(3)
        .max_server_delay(Duration::MAX)
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    let _ = tokio::time::timeout(Duration::from_secs(3600), svc.oneshot(get())).await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_from_a_hedge_does_not_cut_short_the_attempt_still_running() {
    let (up, log) = upstream(vec![
        ok(0),
        ok(0),
        ok(100),
        hinted(5, 503, vec![("grpc-retry-pushback-ms", "-1")]),
        ok(5),
    ]);
    let svc = fixed().max_attempts(3).build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(
        (res.status().as_u16(), *res.body(), t.elapsed()),
        (200, 2, Duration::from_millis(100))
    );
    assert_eq!(log.lock().unwrap().calls, 4);
}

#[tokio::test(start_paused = true)]
async fn a_hinted_retryable_hedge_answer_waits_for_the_running_attempt() {
    let (up, log) = upstream(vec![
        ok(0),
        ok(0),
        ok(100),
        hinted(5, 503, vec![("retry-after", "2")]),
        ok(5),
    ]);
    let svc = fixed().max_attempts(3).build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(
        (res.status().as_u16(), t.elapsed()),
        (200, Duration::from_millis(100))
    );
    assert_eq!(
        log.lock().unwrap().calls,
        4,
        "the third waits 2 s; the first answers first"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retryable_hedge_answer_is_not_returned_while_the_first_runs() {
    let (up, _) = upstream(vec![ok(0), ok(0), ok(100), status(5, 503)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(
        (res.status().as_u16(), t.elapsed()),
        (200, Duration::from_millis(100))
    );
}

#[tokio::test(start_paused = true)]
async fn when_every_attempt_is_retryable_the_caller_gets_the_last_to_arrive() {
    // Attempts at 0 (503 at 100 ms), 20 (502 at 25 ms; the third goes at once), 25 (504 at
    // 35 ms). The last answer is the first attempt's.
    let (up, log) = upstream(vec![
        ok(0),
        ok(0),
        status(100, 503),
        status(5, 502),
        status(10, 504),
    ]);
    let svc = fixed().max_attempts(3).build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(
        (res.status().as_u16(), *res.body(), t.elapsed()),
        (503, 2, Duration::from_millis(100))
    );
    assert_eq!(log.lock().unwrap().calls, 5);
}

#[tokio::test(start_paused = true)]
async fn five_attempts_at_most_even_when_every_answer_is_retryable_at_once() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(0), ok(0), ok(0), status(0, 503)]);
    let svc = fixed().max_attempts(5).build().unwrap().layer(up);
    for _ in 0..5 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(log.lock().unwrap().calls, 5 + 5);
}

#[tokio::test(start_paused = true)]
async fn one_attempt_turns_hedging_off_and_returns_retryable_answers() {
    let (up, log) = upstream(vec![ok(0), ok(0), status(1000, 503)]);
    let svc = fixed().max_attempts(1).build().unwrap().layer(up);
    earn(&svc).await;
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 503);
    assert_eq!(log.lock().unwrap().calls, 3);
}

#[tokio::test(start_paused = true)]
async fn a_final_error_from_the_hedge_wins_and_cancels_the_first() {
    let classify = |o: Result<&Response<u32>, &(dyn std::error::Error + 'static)>| match o {
        Ok(r) if r.status() == 503 => Class::new(true, true, Delivery::Answered),
        Ok(_) => Class::SUCCESS,
        Err(e) if e.is::<FatalError>() => Class::new(true, false, Delivery::MaybeSent),
        Err(_) => Class::new(true, true, Delivery::MaybeSent),
    };
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000), err(5, Out::Fatal)]);
    let svc = fixed().classifier(classify).build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let e = svc.oneshot(get()).await.unwrap_err();
    assert!(e.is::<FatalError>(), "{e}");
    assert_eq!(t.elapsed(), Duration::from_millis(25));
    assert_eq!(log.lock().unwrap().cancelled, 1);
}

// ---------------------------------------------------------------------------------------
// F. Policy refusals
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_policy_refusal_of_the_hedge_does_not_throw_away_the_running_attempt() {
    // The hedge went to a (say) open breaker: the call's first attempt is healthy.
    let (up, log) = upstream(vec![ok(0), ok(0), ok(100), err(0, Out::Policy), ok(5)]);
    let svc = fixed().max_attempts(3).build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let res = svc.oneshot(get()).await;
    let calls = log.lock().unwrap().calls;
    assert_eq!(calls, 4, "no hedge after a refusal");
    let res = res.expect("the running attempt's answer");
    assert_eq!((*res.body(), t.elapsed()), (2, Duration::from_millis(100)));
}

#[tokio::test(start_paused = true)]
async fn a_policy_refusal_wrapped_deep_is_returned_as_it_is() {
    #[derive(Debug)]
    struct Wrap(BoxError);
    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl std::error::Error for Wrap {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }
    let n = Arc::new(AtomicU32::new(0));
    let n2 = n.clone();
    let up = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            if i < 2 {
                return Ok(Response::new(i));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            Err::<Response<u32>, BoxError>(Box::new(Wrap(Box::new(Wrap(Box::new(Rejected))))))
        }
    });
    let svc = fixed().max_attempts(5).build().unwrap().layer(up);
    earn(&svc).await;
    let e = svc.oneshot(get()).await.unwrap_err();
    assert!(PolicyRejected::is_in(&*e));
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

// ---------------------------------------------------------------------------------------
// G. gRPC
// ---------------------------------------------------------------------------------------

fn grpc(ct: &'static str) -> Request<Full<Bytes>> {
    Request::post("/pkg.Svc/Method")
        .header("content-type", ct)
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn grpc_previous_attempts_counts_every_attempt_before() {
    for ct in ["application/grpc", "application/grpc+proto"] {
        let (up, log) = upstream(after_quick(8, vec![ok(1000)]));
        let svc = fixed()
            .max_attempts(4)
            .hedge_non_idempotent(true)
            .build()
            .unwrap()
            .layer(up);
        earn_n(&svc, 8).await;
        let _ = tokio::time::timeout(Duration::from_millis(70), svc.oneshot(grpc(ct))).await;
        let log = log.lock().unwrap();
        let seen: Vec<_> = log.requests[8..]
            .iter()
            .map(|r| {
                r.headers
                    .get("grpc-previous-rpc-attempts")
                    .map(|v| v.to_str().unwrap().to_owned())
            })
            .collect();
        assert_eq!(
            seen,
            [None, Some("1".into()), Some("2".into()), Some("3".into())],
            "{ct}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn grpc_unavailable_sends_the_next_hedge_at_once_but_a_non_idempotent_grpc_call_is_not_hedged()
 {
    let unavailable = hinted(
        5,
        200,
        vec![("content-type", "application/grpc"), ("grpc-status", "14")],
    );
    let (up, log) = upstream(vec![ok(0), ok(0), unavailable.clone(), ok(5)]);
    let svc = fixed()
        .hedge_non_idempotent(true)
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let res = svc.oneshot(grpc("application/grpc")).await.unwrap();
    assert_eq!((*res.body(), t.elapsed()), (3, Duration::from_millis(10)));
    assert_eq!(log.lock().unwrap().calls, 4);

    // Without the opt-in, a gRPC call (POST) is not hedged, even on UNAVAILABLE.
    let (up, log) = upstream(vec![ok(0), ok(0), unavailable, ok(5)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    svc.oneshot(grpc("application/grpc")).await.unwrap();
    assert_eq!(log.lock().unwrap().calls, 3);
}

#[tokio::test(start_paused = true)]
async fn attempt_header_counts_up_and_the_first_attempt_carries_none() {
    let (up, log) = upstream(after_quick(8, vec![ok(1000)]));
    let svc = fixed().max_attempts(5).build().unwrap().layer(up);
    earn_n(&svc, 8).await;
    let _ = tokio::time::timeout(Duration::from_millis(90), svc.oneshot(get())).await;
    let log = log.lock().unwrap();
    let seen: Vec<_> = log.requests[8..]
        .iter()
        .map(|r| {
            r.headers
                .get("x-retry-attempt")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        seen,
        [
            None,
            Some("2".into()),
            Some("3".into()),
            Some("4".into()),
            Some("5".into())
        ]
    );
    let times: Vec<_> = log.requests[8..].iter().map(|r| r.at).collect();
    for w in times.windows(2) {
        assert_eq!(
            w[1] - w[0],
            Duration::from_millis(20),
            "each a delay after the one before"
        );
    }
}

// ---------------------------------------------------------------------------------------
// H. The share of extra load
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_share_caps_hedges_sent_after_retryable_answers_too() {
    // Every first attempt answers 503 at once: each call would send hedges at once.
    let n = Arc::new(AtomicU32::new(0));
    let firsts = Arc::new(AtomicU32::new(0));
    let (n2, f2) = (n.clone(), firsts.clone());
    let up = service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
        n2.fetch_add(1, Ordering::SeqCst);
        let first = !req.headers().contains_key("x-retry-attempt");
        if first {
            f2.fetch_add(1, Ordering::SeqCst);
        }
        async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let code = if first { 503 } else { 200 };
            Ok::<_, BoxError>(Response::builder().status(code).body(0u32).unwrap())
        }
    });
    let svc = HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(20)))
        .max_attempts(5)
        .build()
        .unwrap()
        .layer(up);
    let calls = 1000;
    for _ in 0..calls {
        let _ = svc.clone().oneshot(get()).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = n.load(Ordering::SeqCst);
    assert_eq!(firsts.load(Ordering::SeqCst), calls);
    let extra = f64::from(sent) / f64::from(calls) - 1.0;
    assert!(extra <= 0.05 + 1e-9, "extra load {extra}");
}

#[tokio::test(start_paused = true)]
async fn a_share_of_one_with_five_attempts_still_caps_extra_load_at_one() {
    let n = Arc::new(AtomicU32::new(0));
    let n2 = n.clone();
    let up = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        n2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, BoxError>(Response::new(0u32))
        }
    });
    let svc = fixed().max_attempts(5).build().unwrap().layer(up);
    let calls = 300;
    let mut tasks = Vec::new();
    for _ in 0..calls {
        tasks.push(tokio::spawn(svc.clone().oneshot(get())));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let extra = f64::from(n.load(Ordering::SeqCst)) / f64::from(calls) - 1.0;
    assert!(extra <= 1.0 + 1e-9, "extra load {extra}");
}

#[test]
fn many_threads_sharing_one_layer_stay_within_the_share_and_the_budget() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let sent = Arc::new(AtomicUsize::new(0));
        let s2 = sent.clone();
        // Every attempt takes a few scheduler turns: a zero delay hedges each call at once,
        // if the share and the budget allow.
        let up = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            s2.fetch_add(1, Ordering::SeqCst);
            async move {
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                Ok::<_, Infallible>(Response::new(0u32))
            }
        });
        let tokens = budget(40);
        let layer = HedgeLayer::builder()
            .delay(HedgeDelay::Fixed(Duration::ZERO))
            .max_extra_load(0.05)
            .max_attempts(5)
            .retry_budget(Some(tokens.clone()))
            .build()
            .unwrap();
        let svc = layer.layer(up);
        let (tasks, per) = (8, 500);
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let svc = svc.clone();
            handles.push(tokio::spawn(async move {
                for _ in 0..per {
                    svc.clone().oneshot(get()).await.unwrap();
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        let calls = tasks * per;
        let hedges = sent.load(Ordering::SeqCst) - calls;
        assert!(
            hedges as f64 <= calls as f64 * 0.05 + 1.0,
            "{hedges} hedges for {calls} calls"
        );
        assert!(hedges <= 40, "{hedges} hedges from a budget of 40");
        let left = tokens.balance();
        assert!(left >= -0.001, "the budget went negative: {left}");
        assert!(
            close(left, 40.0 - hedges as f64) || left > 40.0 - hedges as f64 - 0.01,
            "{left}"
        );
    });
}

// ---------------------------------------------------------------------------------------
// I. The learnt delay
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_learnt_delay_ignores_calls_that_may_not_be_hedged() {
    let up = service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
        let ms = if req.method() == Method::POST {
            1000
        } else {
            10
        };
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(Response::new(0u32))
        }
    });
    let layer = HedgeLayer::builder()
        .delay(HedgeDelay::Percentile(0.5))
        .min_samples(10)
        .window(Duration::from_secs(10))
        .build()
        .unwrap();
    let svc = layer.layer(up);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let req = if i % 2 == 0 { post() } else { get() };
        tasks.push(tokio::spawn(svc.clone().oneshot(req)));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    svc.clone().oneshot(get()).await.unwrap();
    let d = layer.current_delay().expect("a window's worth of GETs");
    assert!(
        d < Duration::from_millis(20),
        "POST latencies leaked into the delay: {d:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_learnt_delay_with_zero_or_huge_latencies_does_not_panic() {
    for ms in [0u64, 1_000_000_000_000] {
        let up = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| async move {
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Ok::<_, BoxError>(Response::new(0u32))
        });
        let layer = HedgeLayer::builder()
            .delay(HedgeDelay::Percentile(0.99))
            .min_samples(3)
            .window(Duration::from_millis(10))
            .build()
            .unwrap();
        let svc = layer.layer(up);
        for _ in 0..8 {
            let _ = tokio::time::timeout(
                Duration::from_secs(86_400 * 365 * 100),
                svc.clone().oneshot(get()),
            )
            .await;
        }
        let _ = layer.current_delay();
    }
}

#[tokio::test(start_paused = true)]
async fn a_window_of_duration_max_does_not_panic() {
    let (up, _log) = upstream(vec![ok(1)]);
    let layer = HedgeLayer::builder()
        .delay(HedgeDelay::Percentile(0.5))
        .min_samples(1)
        .window(Duration::MAX)
        .build()
        .unwrap();
    let svc = layer.layer(up);
    for _ in 0..5 {
        svc.clone().oneshot(get()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(86_400)).await;
    }
    let _ = layer.current_delay();
}

#[tokio::test(start_paused = true)]
async fn extreme_valid_percentiles_do_not_panic() {
    for p in [f64::MIN_POSITIVE, 1e-300, 0.5, 1.0] {
        let (up, _log) = upstream(vec![ok(1), ok(3), ok(50), ok(2)]);
        let layer = HedgeLayer::builder()
            .delay(HedgeDelay::Percentile(p))
            .min_samples(2)
            .window(Duration::from_millis(10))
            .max_extra_load(1.0)
            .build()
            .unwrap();
        let svc = layer.layer(up);
        rounds_of_concurrent_calls(&svc, 4).await;
        let d = layer.current_delay();
        assert!(d.is_some(), "p {p}");
    }
}

/// Rounds of 4 calls at once, each round in a 10 ms window of its own.
async fn rounds_of_concurrent_calls<S>(svc: &S, rounds: usize)
where
    S: Service<Request<Full<Bytes>>, Response = Response<u32>, Error = BoxError> + Clone,
{
    for _ in 0..rounds {
        let calls = (0..4).map(|_| svc.clone().oneshot(get()));
        for r in futures_util::future::join_all(calls).await {
            r.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(11)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn max_extra_load_of_one_with_the_default_delay_builds_and_works() {
    // The default delay is the percentile 1 − max_extra_load: 0 here, which the builder
    // refuses for a percentile set by hand. The user set no percentile.
    let layer = HedgeLayer::builder()
        .max_extra_load(1.0)
        .min_samples(2)
        .window(Duration::from_millis(10))
        .build()
        .expect("a share of 1 is valid on its own");
    let (up, _log) = upstream(vec![ok(1), ok(3), ok(50), ok(2)]);
    let svc = layer.layer(up);
    rounds_of_concurrent_calls(&svc, 4).await;
    assert!(layer.current_delay().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_tiny_share_does_not_panic_and_never_hedges() {
    let (up, log) = upstream(vec![ok(1000)]);
    let svc = HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(1)))
        .max_extra_load(f64::MIN_POSITIVE)
        .build()
        .unwrap()
        .layer(up);
    for _ in 0..20 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    assert_eq!(log.lock().unwrap().calls, 20);
}

// ---------------------------------------------------------------------------------------
// J. Under a retry layer
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn under_a_retry_layer_a_streamed_body_reaches_every_attempt_whole() {
    // Every attempt is slow and answers 503: retry 3 × hedge 2 = at most 6 attempts.
    let (up, log) = upstream::<ReplayBody<Streamed>>(vec![status(50, 503)]);
    let retry = RetryLayer::builder()
        .max_attempts(3)
        .seed(7)
        .build()
        .unwrap();
    let hedge = fixed().retry_budget(retry.budget()).build().unwrap();
    // Earn the hedge's share first with a separate clone of the same layer.
    let svc = tower::ServiceBuilder::new()
        .layer(retry.clone())
        .layer(hedge.clone())
        .service(up);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let call = tokio::spawn(svc.oneshot(Request::put("/").body(Streamed { rx }).unwrap()));
    for c in [&b"01234567"[..], b"89ab", b"cdef"] {
        tx.send(Ok(Bytes::from_static(c))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(7)).await;
    }
    drop(tx);
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 503);
    let log = log.lock().unwrap();
    assert!(log.calls <= 6, "{} attempts", log.calls);
    assert!(log.body_errors.is_empty(), "{:?}", log.body_errors);
    for r in &log.requests {
        assert_eq!(r.body, "0123456789abcdef");
    }
}

#[tokio::test(start_paused = true)]
async fn under_a_retry_layer_a_post_is_sent_once() {
    let (up, log) = upstream::<ReplayBody<Full<Bytes>>>(vec![ok(0), ok(0), status(100, 503)]);
    let retry = RetryLayer::builder()
        .max_attempts(5)
        .seed(7)
        .build()
        .unwrap();
    let hedge = fixed()
        .max_attempts(5)
        .retry_budget(retry.budget())
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(retry)
        .layer(hedge)
        .service(up);
    for _ in 0..2 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    assert_eq!(svc.oneshot(post()).await.unwrap().status(), 503);
    assert_eq!(log.lock().unwrap().calls, 3);
}

#[tokio::test(start_paused = true)]
async fn under_a_retry_layer_a_body_over_the_cap_is_sent_once_whole() {
    let (up, log) = upstream::<ReplayBody<Streamed>>(vec![status(100, 503)]);
    let retry = RetryLayer::builder()
        .max_attempts(3)
        .seed(7)
        .build()
        .unwrap();
    let hedge = fixed().build().unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(retry)
        .layer(hedge)
        .service(up);
    let big: &'static [u8] = Box::leak(vec![b'z'; 40 * 1024].into_boxed_slice());
    let req = Request::put("/").body(streamed(&[big, big])).unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap().status(), 503);
    let log = log.lock().unwrap();
    assert_eq!(log.calls, 1);
    assert_eq!(log.requests[0].body.len(), 80 * 1024);
}

#[tokio::test(start_paused = true)]
async fn hedge_over_retry_a_streamed_body_reaches_every_attempt_whole() {
    // The other order: each hedge attempt runs its own retries.
    let (up, log) = upstream::<ReplayBody<Streamed>>(vec![ok(0), ok(0), status(30, 503)]);
    let retry = RetryLayer::builder()
        .max_attempts(2)
        .seed(7)
        .build()
        .unwrap();
    let hedge = fixed().build().unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(hedge)
        .layer(retry)
        .service(up);
    earn(&svc).await;
    let req = Request::put("/")
        .body(streamed(&[b"0123", b"4567"]))
        .unwrap();
    let _ = svc.oneshot(req).await.unwrap();
    let log = log.lock().unwrap();
    assert!(log.body_errors.is_empty(), "{:?}", log.body_errors);
    for r in &log.requests[2..] {
        assert_eq!(r.body, "01234567");
    }
    assert!(log.calls - 2 <= 4, "{}", log.calls);
}

// ---------------------------------------------------------------------------------------
// K. Build-time validation
// ---------------------------------------------------------------------------------------

#[test]
fn headers_other_parties_own_are_refused_with_their_name() {
    for name in [
        "content-length",
        "transfer-encoding",
        "grpc-previous-rpc-attempts",
        "grpc-timeout",
        "idempotency-key",
        "retry-after",
        "traceparent",
        "x-request-timeout-ms",
        "x-correlation-id",
        "connection",
        "cookie",
        "authorization",
    ] {
        let e = HedgeLayer::builder()
            .attempt_header(Some(http::HeaderName::from_static(name)))
            .build();
        let e = e.expect_err(name);
        assert!(e.to_string().contains(name), "{name}: {e}");
    }
    HedgeLayer::builder()
        .attempt_header(Some(http::HeaderName::from_static("x-hedge-attempt")))
        .build()
        .unwrap();
    HedgeLayer::builder()
        .attempt_header(Some(http::HeaderName::from_static("x-retry-attempt")))
        .build()
        .unwrap();
    HedgeLayer::builder().attempt_header(None).build().unwrap();
}

#[test]
fn the_window_and_percentile_edges() {
    let b = HedgeLayer::builder;
    assert_eq!(
        b().window(Duration::from_micros(9_999))
            .build()
            .unwrap_err(),
        InvalidHedgeConfig::Window
    );
    b().window(Duration::from_millis(10)).build().unwrap();
    for p in [
        -0.0,
        -1.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1.0 + f64::EPSILON,
    ] {
        assert_eq!(
            b().delay(HedgeDelay::Percentile(p)).build().unwrap_err(),
            InvalidHedgeConfig::Percentile,
            "{p}"
        );
    }
    for share in [f64::MIN_POSITIVE, 1.0] {
        b().max_extra_load(share)
            .delay(HedgeDelay::Fixed(Duration::from_millis(1)))
            .build()
            .unwrap();
    }
    // Zero-ish settings that are documented as valid build.
    b().max_server_delay(Duration::ZERO)
        .replay_cap(0)
        .build()
        .unwrap();
    b().max_attempts(1).build().unwrap();
    b().max_attempts(5).build().unwrap();
    b().name("x").build().unwrap();
}

#[tokio::test(start_paused = true)]
async fn max_server_delay_zero_ends_hedging_on_any_positive_hint() {
    let (up, log) = upstream(vec![
        ok(0),
        ok(0),
        hinted(5, 503, vec![("retry-after", "1")]),
        ok(5),
    ]);
    let svc = fixed()
        .max_server_delay(Duration::ZERO)
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 503);
    assert_eq!(log.lock().unwrap().calls, 3);
}

// ---------------------------------------------------------------------------------------
// L. Second round: what ends hedging must end it; what the caller gets in the end
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_stop_pushback_ends_hedging_for_the_call_even_after_a_later_retryable_answer() {
    // The hedge's server says "stop" at 25 ms; the first attempt answers 503 (no hint) at
    // 100 ms. The docs: "a pushback that says stop ends hedging".
    let (up, log) = upstream(vec![
        ok(0),
        ok(0),
        ok(0),
        status(100, 503),
        hinted(5, 503, vec![("grpc-retry-pushback-ms", "-1")]),
        ok(5),
    ]);
    let svc = fixed().max_attempts(3).build().unwrap().layer(up);
    earn_n(&svc, 3).await;
    let res = svc.oneshot(get()).await.unwrap();
    let calls = log.lock().unwrap().calls;
    assert_eq!(
        calls,
        3 + 2,
        "a third attempt went after the server said stop"
    );
    assert_eq!(res.status(), 503);
}

#[tokio::test(start_paused = true)]
async fn a_hint_over_the_cap_ends_hedging_for_the_call_even_after_a_later_retryable_answer() {
    let (up, log) = upstream(vec![
        ok(0),
        ok(0),
        ok(0),
        status(100, 503),
        hinted(5, 503, vec![("retry-after", "3600")]),
        ok(5),
    ]);
    let svc = fixed()
        .max_attempts(3)
        .max_server_delay(Duration::from_secs(60))
        .build()
        .unwrap()
        .layer(up);
    earn_n(&svc, 3).await;
    let res = svc.oneshot(get()).await.unwrap();
    let calls = log.lock().unwrap().calls;
    assert_eq!(calls, 3 + 2, "a third attempt went after an over-cap hint");
    assert_eq!(res.status(), 503);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_the_retry_budget_refused_ends_hedging_for_the_call() {
    // "a hedge that is refused ends hedging for the call".
    let (up, log) = upstream(vec![ok(0), ok(0), status(100, 503), ok(5)]);
    let tokens = budget(0);
    let svc = fixed()
        .max_attempts(3)
        .retry_budget(Some(tokens.clone()))
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    let call = tokio::spawn(svc.oneshot(get()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The refusal came at 20 ms. Other traffic refills the budget meanwhile.
    for _ in 0..5 {
        tokens.deposit();
    }
    let res = call.await.unwrap().unwrap();
    let calls = log.lock().unwrap().calls;
    assert_eq!(calls, 3, "a hedge went after one was refused");
    assert_eq!(res.status(), 503);
}

#[tokio::test(start_paused = true)]
async fn a_policy_refusal_of_a_hedge_ends_hedging_and_the_servers_answer_is_returned() {
    // The hedge is refused by a breaker at 20 ms; the first attempt answers 503 at 100 ms.
    let (up, log) = upstream(vec![
        ok(0),
        ok(0),
        ok(0),
        status(100, 503),
        err(0, Out::Policy),
        err(0, Out::Policy),
    ]);
    let svc = fixed().max_attempts(3).build().unwrap().layer(up);
    earn_n(&svc, 3).await;
    let res = svc.oneshot(get()).await;
    let calls = log.lock().unwrap().calls;
    let got = res
        .as_ref()
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string());
    assert_eq!(
        (calls, got),
        (3 + 2, Ok(503)),
        "(attempts, outcome): no hedge after a refusal; the server's answer, not the refusal"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retryable_answer_is_not_held_past_the_deadline_by_a_hedge_service_never_ready() {
    let (up, log) = upstream(vec![ok(0), ok(0), status(5, 503), ok(5)]);
    let (up, gate) = gated(up);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let mut call = Box::pin(svc.oneshot(with_deadline(get(), 100)));
    assert!(poll_once(call.as_mut()).await.is_pending());
    gate.mode.store(PENDING, Ordering::SeqCst);
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(3600), call).await;
    assert_eq!(log.lock().unwrap().calls, 3);
    let res = res.unwrap_or_else(|_| {
        panic!("still waiting an hour later with a 503 in hand and a 100 ms deadline")
    });
    assert_eq!(res.unwrap().status(), 503);
    assert!(
        t.elapsed() <= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_free_rerouted_attempt_does_not_swallow_tokens_reserved_for_a_hedge() {
    // The hedge is due at 20 ms and reserves its tokens, but its service is not ready. At
    // 30 ms the first attempt is refused before anything was sent (rerouted: the next attempt
    // is free). The free attempt goes; the tokens reserved must come back.
    let (up, log) = upstream(vec![ok(0), ok(0), err(30, Out::NotSent), ok(5)]);
    let (up, gate) = gated(up);
    let tokens = budget(3);
    let svc = fixed()
        .retry_budget(Some(tokens.clone()))
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    let before = tokens.balance();
    let mut call = Box::pin(svc.oneshot(get()));
    assert!(poll_once(call.as_mut()).await.is_pending());
    gate.mode.store(PENDING, Ordering::SeqCst);
    let mut call = tokio::spawn(call);
    tokio::time::sleep(Duration::from_millis(25)).await;
    assert!(
        gate.pending_polls.load(Ordering::SeqCst) > 0,
        "the hedge waits for its service"
    );
    gate.mode.store(OPEN, Ordering::SeqCst);
    let res = (&mut call).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(log.lock().unwrap().calls, 4);
    assert!(
        close(tokens.balance(), before),
        "only a free attempt went out, yet {before} -> {}",
        tokens.balance()
    );
}

#[tokio::test(start_paused = true)]
async fn the_caller_gets_the_servers_answer_not_a_local_replay_lost() {
    // t=0: 8 bytes; the first attempt reads them. t=20: the hedge goes (8 bytes recorded,
    // under the 16-byte cap) but, like a transport still connecting, reads its body late.
    // t=25: 9 more bytes: past the cap, the recording is dropped. t=30: the first attempt's
    // server answers 503. t=70: the hedge finds its body lost. Every server answer was 503.
    let n = Arc::new(AtomicU32::new(0));
    let n2 = n.clone();
    let up = service_fn(move |req: Request<ReplayBody<Streamed>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            if i == 3 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let body = req.into_body().collect().await?.to_bytes();
            if i < 2 {
                return Ok(Response::new(i));
            }
            assert_eq!(body.len(), 17);
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, BoxError>(Response::builder().status(503).body(i).unwrap())
        }
    });
    let svc = fixed().replay_cap(16).build().unwrap().layer(up);
    earn(&svc).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let call = tokio::spawn(svc.oneshot(Request::put("/").body(Streamed { rx }).unwrap()));
    tx.send(Ok(Bytes::from_static(b"01234567"))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(25)).await;
    assert_eq!(n.load(Ordering::SeqCst), 4, "the hedge went");
    tx.send(Ok(Bytes::from_static(b"89abcdefg"))).await.unwrap();
    drop(tx);
    let res = call.await.unwrap();
    let res = res.unwrap_or_else(|e| panic!("the caller got {e:?} instead of the server's 503"));
    assert_eq!(res.status(), 503);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_of_unknown_size_over_the_cap_read_late_goes_whole_to_one_attempt() {
    // "A body of unknown size that no attempt has read yet may be [hedged]: whichever attempt
    // reads it first sends it whole, and one left behind fails with ReplayLost rather than
    // send it cut (that outcome never replaces the upstream's answer)." The first attempt
    // reads its body only at 30 ms (a slow connect); the hedge, sent at 20 ms, reads it all.
    let n = Arc::new(AtomicU32::new(0));
    let lost = Arc::new(AtomicU32::new(0));
    let (n2, l2) = (n.clone(), lost.clone());
    let up = service_fn(move |req: Request<ReplayBody<Streamed>>| {
        let (i, l2) = (n2.fetch_add(1, Ordering::SeqCst), l2.clone());
        async move {
            if i == 2 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            match req.into_body().collect().await {
                Ok(_) => {}
                Err(e) => {
                    l2.fetch_add(1, Ordering::SeqCst);
                    return Err(e);
                }
            }
            tokio::time::sleep(Duration::from_millis(if i == 2 { 100 } else { 5 })).await;
            Ok::<_, BoxError>(Response::new(i))
        }
    });
    let svc = fixed().replay_cap(16).build().unwrap().layer(up);
    earn(&svc).await;
    let req = Request::put("/")
        .body(streamed(&[b"0123456789", b"abcdefghij"]))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        *res.body(),
        3,
        "the hedge, which read the whole body, answered"
    );
    // The first attempt was cancelled when the hedge answered, before it read anything.
    assert_eq!(
        (n.load(Ordering::SeqCst), lost.load(Ordering::SeqCst)),
        (4, 0),
        "no attempt sent a cut body"
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_declared_over_the_cap_is_not_hedged_even_if_read_late() {
    let n = Arc::new(AtomicU32::new(0));
    let n2 = n.clone();
    let up = service_fn(move |req: Request<ReplayBody<StaleHint>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            if i == 2 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            req.into_body().collect().await?;
            tokio::time::sleep(Duration::from_millis(if i == 2 { 100 } else { 5 })).await;
            Ok::<_, BoxError>(Response::new(i))
        }
    });
    let svc = fixed().replay_cap(16).build().unwrap().layer(up);
    earn(&svc).await;
    let req = Request::put("/")
        .body(StaleHint {
            inner: streamed(&[b"0123456789", b"abcdefghij"]),
            total: 20,
        })
        .unwrap();
    assert_eq!(*svc.oneshot(req).await.unwrap().body(), 2);
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn under_a_retry_layer_every_attempt_says_which_it_is() {
    // Retry (3 attempts) over hedge (2): up to 6 attempts of one gRPC call. A6: each carries
    // grpc-previous-rpc-attempts, the number of attempts before it; the attempt header
    // numbers attempts.
    let (up, log) = upstream::<ReplayBody<Full<Bytes>>>(vec![status(30, 503)]);
    let retry = RetryLayer::builder()
        .max_attempts(3)
        .retry_non_idempotent(true)
        .seed(7)
        .build()
        .unwrap();
    let hedge = fixed()
        .hedge_non_idempotent(true)
        .retry_budget(retry.budget())
        .build()
        .unwrap();
    let svc = tower::ServiceBuilder::new()
        .layer(retry)
        .layer(hedge)
        .service(up);
    // One call first: it earns the hedge's share.
    let _ = svc.clone().oneshot(grpc("application/grpc")).await;
    let n_before = log.lock().unwrap().requests.len();
    let _ = svc.oneshot(grpc("application/grpc")).await;
    let log = log.lock().unwrap();
    let seen: Vec<_> = log.requests[n_before..]
        .iter()
        .map(|r| {
            let h = |n: &str| r.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
            (h("x-retry-attempt"), h("grpc-previous-rpc-attempts"))
        })
        .collect();
    // Documented: a hedge's headers count on from what its request arrived with, so within
    // one retry attempt they rise (the retry layer does not see its attempts' hedges, so the
    // two layers' counts are not one count).
    let count = |i: usize, which: usize| {
        let (a, p) = &seen[i];
        let v = if which == 0 { a } else { p };
        v.as_deref().map_or(if which == 0 { 1 } else { 0 }, |v| {
            v.parse::<u32>().unwrap()
        })
    };
    assert_eq!(seen.len(), 6, "{seen:?}");
    for retry in 0..3 {
        let (first, hedge) = (2 * retry, 2 * retry + 1);
        for which in 0..2 {
            assert_eq!(
                count(hedge, which),
                count(first, which) + 1,
                "retry attempt {retry}: {seen:?}"
            );
        }
        assert_eq!(
            count(first, 1),
            retry as u32,
            "the retry layer's own count: {seen:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_learnt_delay_follows_the_last_full_window_even_after_an_idle_one() {
    // "the delay in force is learnt from the last full window". Traffic in bursts, with an
    // idle window between them (a batch job, a cron): the second burst is 20 × slower.
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = slow.clone();
    let up = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        let ms = if s2.load(Ordering::SeqCst) { 200 } else { 10 };
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(Response::new(0u32))
        }
    });
    let layer = HedgeLayer::builder()
        .delay(HedgeDelay::Percentile(0.5))
        .min_samples(10)
        .window(Duration::from_secs(1))
        .build()
        .unwrap();
    let svc = layer.layer(up);
    let burst = |svc: &_| {
        let calls: Vec<_> = (0..20)
            .map(|_| tower::ServiceExt::oneshot(Clone::clone(svc), get()))
            .collect();
        futures_util::future::join_all(calls)
    };
    // Window 0: 20 calls of 10 ms.
    for r in burst(&svc).await {
        r.unwrap();
    }
    let first = layer.current_delay().expect("learnt from the first window");
    assert!(first < Duration::from_millis(20), "{first:?}");
    // Window 2 (window 1 idle): 20 calls of 200 ms.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    slow.store(true, Ordering::SeqCst);
    for r in burst(&svc).await {
        r.unwrap();
    }
    // Window 4 (window 3 idle): the delay in force must come from window 2.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    svc.clone().oneshot(get()).await.unwrap();
    let now = layer.current_delay().unwrap();
    assert!(
        now >= Duration::from_millis(150),
        "the delay is still {now:?}, learnt from window 0; window 2 said ~200 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn the_learnt_delay_follows_the_last_full_window_with_steady_traffic() {
    // The control for the test above: the same bursts with one call in every window.
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = slow.clone();
    let up = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        let ms = if s2.load(Ordering::SeqCst) { 200 } else { 10 };
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(Response::new(0u32))
        }
    });
    let layer = HedgeLayer::builder()
        .delay(HedgeDelay::Percentile(0.5))
        .min_samples(10)
        .window(Duration::from_secs(1))
        .build()
        .unwrap();
    let svc = layer.layer(up);
    let burst = |svc: &_| {
        let calls: Vec<_> = (0..20)
            .map(|_| tower::ServiceExt::oneshot(Clone::clone(svc), get()))
            .collect();
        futures_util::future::join_all(calls)
    };
    for r in burst(&svc).await {
        r.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    svc.clone().oneshot(get()).await.unwrap(); // window 1
    tokio::time::sleep(Duration::from_millis(1000)).await;
    slow.store(true, Ordering::SeqCst);
    for r in burst(&svc).await {
        r.unwrap(); // window 2
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    svc.clone().oneshot(get()).await.unwrap(); // window 3
    let now = layer.current_delay().unwrap();
    assert!(now >= Duration::from_millis(150), "{now:?}");
}

#[tokio::test(start_paused = true)]
async fn the_share_earned_long_ago_is_not_spent_in_a_burst() {
    // "counted over the last 10 s": 20,000 quick calls, a minute of quiet, then 200 slow
    // calls at once. Only what the last 10 s earned (200 × 5 % = 10 hedges) may be spent.
    let n = Arc::new(AtomicU32::new(0));
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (n2, s2) = (n.clone(), slow.clone());
    let up = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        n2.fetch_add(1, Ordering::SeqCst);
        let ms = if s2.load(Ordering::SeqCst) { 500 } else { 0 };
        async move {
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Ok::<_, BoxError>(Response::new(0u32))
        }
    });
    let svc = HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(20)))
        .build()
        .unwrap()
        .layer(up);
    for _ in 0..20_000 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    slow.store(true, Ordering::SeqCst);
    let before = n.load(Ordering::SeqCst);
    let calls: Vec<_> = (0..200).map(|_| svc.clone().oneshot(get())).collect();
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    let hedges = n.load(Ordering::SeqCst) - before - 200;
    assert!(
        hedges <= 10 + 1,
        "{hedges} hedges for 200 calls in the last 10 s"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_date_is_read_against_the_wall_clock() {
    fn frozen() -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }
    // 1_700_000_000 = Tue, 14 Nov 2023 22:13:20 GMT; the hint says 3 s later.
    let (up, log) = upstream(vec![
        ok(0),
        ok(0),
        hinted(
            5,
            503,
            vec![("retry-after", "Tue, 14 Nov 2023 22:13:23 GMT")],
        ),
        ok(5),
    ]);
    let svc = fixed().wall_clock(frozen).build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 200);
    assert_eq!(
        log.lock().unwrap().requests[3].at - t,
        Duration::from_millis(3005)
    );
}

#[tokio::test(start_paused = true)]
async fn without_an_attempt_header_grpc_hedges_still_count_attempts() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000), ok(5)]);
    let svc = fixed()
        .attempt_header(None)
        .hedge_non_idempotent(true)
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    svc.oneshot(grpc("application/grpc")).await.unwrap();
    let log = log.lock().unwrap();
    assert!(!log.requests[3].headers.contains_key("x-retry-attempt"));
    assert_eq!(log.requests[3].headers["grpc-previous-rpc-attempts"], "1");
}

#[tokio::test(start_paused = true)]
async fn three_readers_of_one_trickling_body_are_all_woken_even_after_one_walks_away() {
    // The first attempt reads one chunk, drops its body and answers 503 (an early answer):
    // the next hedge goes at once, another 20 ms later; both wait on the caller's body.
    let bodies: Arc<Mutex<Vec<(u32, Bytes)>>> = Arc::default();
    let (b2, n) = (bodies.clone(), Arc::new(AtomicU32::new(0)));
    let up = service_fn(move |req: Request<ReplayBody<Streamed>>| {
        let (b2, i) = (b2.clone(), n.fetch_add(1, Ordering::SeqCst));
        async move {
            let mut body = req.into_body();
            if i == 2 {
                let _ = body.frame().await;
                drop(body);
                return Ok(Response::builder().status(503).body(i).unwrap());
            }
            let bytes = body.collect().await?.to_bytes();
            b2.lock().unwrap().push((i, bytes));
            let ms = if i == 3 { 50 } else { 5 };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(Response::new(i))
        }
    });
    let svc = fixed().max_attempts(3).build().unwrap().layer(up);
    earn_n(&svc, 2).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let call = tokio::spawn(svc.oneshot(Request::put("/").body(Streamed { rx }).unwrap()));
    tx.send(Ok(Bytes::from_static(b"one "))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    tx.send(Ok(Bytes::from_static(b"two "))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    tx.send(Ok(Bytes::from_static(b"three"))).await.unwrap();
    drop(tx);
    let res = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("a reader was never woken")
        .unwrap()
        .unwrap();
    assert_eq!(*res.body(), 4, "the last hedge answered first");
    let bodies = bodies.lock().unwrap();
    for (i, b) in bodies.iter().filter(|(i, _)| *i >= 2) {
        assert_eq!(b, "one two three", "attempt {i}");
    }
    assert_eq!(bodies.iter().filter(|(i, _)| *i >= 2).count(), 2);
}

#[tokio::test(start_paused = true)]
async fn no_hedge_before_the_learnt_delay_has_its_samples_even_after_a_503() {
    // "Until a window holds `min_samples` of them, calls are not hedged"; `min_samples`:
    // "until the first window has them, no call is hedged".
    let (up, log) = upstream(after_quick(40, vec![status(5, 503), ok(5)]));
    let layer = HedgeLayer::new();
    let svc = layer.clone().layer(up);
    earn_n(&svc, 40).await; // earns 2 hedges (5 % of 40) and 40 of the 100 samples
    assert_eq!(layer.current_delay(), None);
    let res = svc.oneshot(get()).await.unwrap();
    let calls = log.lock().unwrap().calls;
    assert_eq!(
        (calls, res.status().as_u16()),
        (41, 503),
        "a second attempt went before any delay was learnt"
    );
}

#[tokio::test(start_paused = true)]
async fn an_attempt_an_endpoint_refused_unsent_goes_elsewhere_even_before_a_delay_is_learnt() {
    // No delay yet, so no hedge; but an attempt refused before anything was sent (the
    // balancer's `Rerouted`) adds no load: it is sent again at once, not handed to the caller.
    let (up, log) = upstream(after_quick(40, vec![err(5, Out::NotSent), ok(5)]));
    let layer = HedgeLayer::new();
    let svc = layer.clone().layer(up);
    earn_n(&svc, 40).await;
    assert_eq!(layer.current_delay(), None);
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(log.lock().unwrap().calls, 42);
}

#[tokio::test(start_paused = true)]
async fn attempts_refused_unsent_take_nothing_from_max_attempts() {
    // Six attempts in a row refused before anything was sent (six endpoints' breakers open
    // behind a balancer), then an answer: each refusal is sent again at once, and none of
    // them counts against the three attempts a call may make.
    let mut rest: Vec<Plan> = (0..6).map(|_| err(1, Out::NotSent)).collect();
    rest.push(ok(5));
    let (up, log) = upstream(after_quick(40, rest));
    let layer = HedgeLayer::builder().max_attempts(3).build().unwrap();
    let svc = layer.clone().layer(up);
    earn_n(&svc, 40).await;
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 200, "the answer after six refusals");
    assert_eq!(log.lock().unwrap().calls, 47);
}
