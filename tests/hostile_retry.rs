//! Hostile pass on the retry layer after its speed work (the early verdict for a success or
//! the caller's own error, the spare copy of the service below that later attempts are
//! cloned from, readiness before every attempt): non-idempotent requests, whole delivery of
//! retried requests over real sockets, stops, the spare's behaviour under shared and
//! per-instance state, and concurrency on a multi-thread runtime.

mod support;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use steadfast::common::BoxError;
use steadfast::retry::{Backoff, Jitter, RetryLayer};
use steadfast_testkit::{Fault, FaultServer};
use tower::{Layer, Service, ServiceExt};

/// A hang fails the test instead of blocking it (paused time: costs nothing).
const GUARD: Duration = Duration::from_secs(600);

async fn guarded<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: hung for {GUARD:?}"),
    }
}

/// One call of `svc` once ready, under the guard; its response.
async fn call_ready<S>(what: &str, svc: &mut S, req: Request<Full<Bytes>>) -> S::Response
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    guarded(what, async {
        ServiceExt::<Request<Full<Bytes>>>::ready(svc)
            .await
            .unwrap()
            .call(req)
            .await
            .unwrap()
    })
    .await
}

fn quick_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(10), Duration::from_millis(50)).jitter(Jitter::None)
}

// ---------------------------------------------------------------------------------------
// A capturing upstream: a raw hyper HTTP/1 server that records every request whole.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    uri: String,
    /// Every header field, values of one name in order.
    headers: BTreeMap<String, Vec<Vec<u8>>>,
    body: Vec<u8>,
    /// The body was read to its end without error.
    complete: bool,
}

#[derive(Clone, Copy, Debug)]
enum Reply {
    /// Read the whole body, then answer this status.
    After(u16),
    /// Answer this status at once, reading nothing of the body.
    Early(u16),
}

type Plan = Arc<dyn Fn(usize, &http::request::Parts) -> Reply + Send + Sync>;

struct Capture {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Capture {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn header_map(h: &http::HeaderMap) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut out: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for name in h.keys() {
        out.insert(
            name.as_str().to_owned(),
            h.get_all(name)
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect(),
        );
    }
    out
}

async fn capture(plan: Plan) -> Capture {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let n = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (s, n, plan) = (s.clone(), n.clone(), plan.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (s, n, plan) = (s.clone(), n.clone(), plan.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let nth = n.fetch_add(1, SeqCst);
                        let reply = plan(nth, &parts);
                        let mut rec = Seen {
                            method: parts.method.clone(),
                            uri: parts.uri.to_string(),
                            headers: header_map(&parts.headers),
                            body: Vec::new(),
                            complete: false,
                        };
                        let status = match reply {
                            Reply::Early(code) => {
                                drop(body);
                                code
                            }
                            Reply::After(code) => {
                                match body.collect().await {
                                    Ok(b) => {
                                        rec.body = b.to_bytes().to_vec();
                                        rec.complete = true;
                                    }
                                    Err(_) => rec.complete = false,
                                }
                                code
                            }
                        };
                        s.lock().unwrap().push(rec);
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(format!("attempt {nth}"))))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Capture { addr, seen }
}

/// A streamed, non-`Clone` body: `chunks` sent one by one by a task, a short wait apart.
fn trickled(
    chunks: Vec<Bytes>,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        for c in chunks {
            tokio::time::sleep(Duration::from_millis(3)).await;
            if tx.send(c).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|c| (Ok::<_, std::io::Error>(Frame::data(c)), rx))
    });
    StreamBody::new(stream)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn chunked(data: &[u8], sizes: &[usize]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut k = 0;
    while at < data.len() {
        let n = sizes[k % sizes.len()].min(data.len() - at);
        out.push(Bytes::copy_from_slice(&data[at..at + n]));
        at += n;
        k += 1;
    }
    out
}

/// An extension the caller puts on its request.
#[derive(Clone, Debug, PartialEq)]
struct Marker(u64);

/// Below the retry layer: records the caller's extension each attempt carries.
#[derive(Clone)]
struct Recorder<S> {
    inner: S,
    marks: Arc<Mutex<Vec<Option<Marker>>>>,
}

impl<S, B> Service<Request<B>> for Recorder<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }
    fn call(&mut self, req: Request<B>) -> S::Future {
        self.marks
            .lock()
            .unwrap()
            .push(req.extensions().get::<Marker>().cloned());
        self.inner.call(req)
    }
}

fn without(
    mut h: BTreeMap<String, Vec<Vec<u8>>>,
    names: &[&str],
) -> BTreeMap<String, Vec<Vec<u8>>> {
    for n in names {
        h.remove(*n);
    }
    h
}

// ---------------------------------------------------------------------------------------
// Promise 2: a retried request is delivered whole.
// ---------------------------------------------------------------------------------------

/// A PATCH with an idempotency key, duplicate header fields, a query, an extension and a
/// streamed body under the cap: the retry carries all of it, identically, over real sockets.
#[tokio::test(start_paused = true)]
async fn a_retried_request_carries_the_whole_head_extensions_and_body() {
    let server = capture(Arc::new(|nth, _| {
        Reply::After(if nth == 0 { 503 } else { 200 })
    }))
    .await;
    let data = pattern(40_000, 7);
    let marks = Arc::default();
    let svc = RetryLayer::builder()
        .backoff(quick_backoff())
        .build()
        .unwrap()
        .layer(Recorder {
            inner: support::transport(),
            marks: Arc::clone(&marks),
        });
    let mut req = Request::patch(server.url("/orders/7?x=1&y=%20z"))
        .header("idempotency-key", "key-1")
        .header("x-dup", "first")
        .header("x-dup", "second")
        .header("x-dup", "first")
        .header("content-type", "application/octet-stream")
        .body(trickled(chunked(&data, &[1, 4093, 17, 8192, 3000])))
        .unwrap();
    req.extensions_mut().insert(Marker(42));
    let res = guarded("call", svc.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "one retry");
    for s in &seen {
        assert_eq!(s.method, Method::PATCH);
        assert_eq!(s.uri, "/orders/7?x=1&y=%20z");
        assert!(s.complete);
        assert_eq!(s.body.len(), data.len(), "no truncation, no duplication");
        assert!(s.body == data, "same bytes");
        assert_eq!(
            s.headers["x-dup"],
            vec![b"first".to_vec(), b"second".to_vec(), b"first".to_vec()]
        );
        assert_eq!(s.headers["idempotency-key"], vec![b"key-1".to_vec()]);
    }
    assert_eq!(
        // Framing is hyper's choice: the first attempt's stream went chunked, the retry's
        // replay (whole by then) with a content-length.
        without(
            seen[0].headers.clone(),
            &["x-retry-attempt", "content-length", "transfer-encoding"]
        ),
        without(
            seen[1].headers.clone(),
            &["x-retry-attempt", "content-length", "transfer-encoding"]
        ),
    );
    assert_eq!(*marks.lock().unwrap(), vec![Some(Marker(42)); 2]);
}

/// The upstream answers 503 before reading any of a streamed body (the first attempt's
/// connection is left mid-body); the retry must still send the body whole: what was recorded,
/// then the rest of the caller's stream.
#[tokio::test(start_paused = true)]
async fn a_body_answered_early_is_sent_whole_on_the_retry() {
    for (len, sizes) in [
        (30_000usize, &[2048usize][..]),
        (65_536, &[1000, 24, 7000][..]),
        (1, &[1][..]),
    ] {
        let server = capture(Arc::new(|nth, _| {
            if nth == 0 {
                Reply::Early(503)
            } else {
                Reply::After(200)
            }
        }))
        .await;
        let data = pattern(len, len as u8);
        let svc = RetryLayer::builder()
            .backoff(quick_backoff())
            .build()
            .unwrap()
            .layer(support::transport());
        let req = Request::put(server.url("/blob"))
            .body(trickled(chunked(&data, sizes)))
            .unwrap();
        let res = guarded("call", svc.oneshot(req)).await.unwrap();
        let seen = server.seen();
        // Any attempt that the upstream read to its end carried exactly the caller's bytes.
        for s in seen.iter().filter(|s| s.complete) {
            assert_eq!(s.body.len(), len, "len {len}: whole");
            assert!(s.body == data, "len {len}: same bytes");
        }
        assert_eq!(res.status(), 200, "len {len}: the retry got through");
        assert_eq!(seen.len(), 2, "len {len}");
    }
}

/// Over the cap and answered early after the first attempt read some of it: no retry may
/// send a body with a hole; whatever the upstream reads to its end is the caller's body.
#[tokio::test(start_paused = true)]
async fn a_body_over_the_cap_is_never_retried_with_a_hole() {
    let server = capture(Arc::new(|nth, _| {
        if nth == 0 {
            Reply::Early(503)
        } else {
            Reply::After(200)
        }
    }))
    .await;
    let data = pattern(200_000, 3);
    let svc = RetryLayer::builder()
        .backoff(quick_backoff())
        .replay_cap(1024)
        .build()
        .unwrap()
        .layer(support::transport());
    let req = Request::put(server.url("/big"))
        .body(trickled(chunked(&data, &[4096])))
        .unwrap();
    let _ = guarded("call", svc.oneshot(req)).await;
    for s in server.seen().iter().filter(|s| s.complete) {
        assert!(s.body == data, "a complete body is the caller's body");
    }
}

/// The same through the client preset (correlation id, deadline header, breaker, attempt
/// timeout): the retry's head differs from the first only in the attempt number and the
/// remaining budget.
#[tokio::test(start_paused = true)]
async fn through_the_preset_a_retry_is_the_same_request() {
    let server = capture(Arc::new(|nth, _| {
        Reply::After(if nth == 0 { 502 } else { 200 })
    }))
    .await;
    let data = pattern(10_000, 9);
    let marks = Arc::default();
    let client = steadfast::client::http()
        .retry(|r| r.backoff(quick_backoff()))
        .build()
        .unwrap()
        .layer(Recorder {
            inner: support::transport(),
            marks: Arc::clone(&marks),
        });
    let mut req = Request::delete(server.url("/a/b?c=d"))
        .header("x-dup", "1")
        .header("x-dup", "2")
        .header("authorization", "Bearer t")
        .body(trickled(chunked(&data, &[999])))
        .unwrap();
    req.extensions_mut().insert(Marker(7));
    let res = guarded("call", client.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let strip = &[
        "x-retry-attempt",
        "x-request-timeout-ms",
        "content-length",
        "transfer-encoding",
    ];
    assert_eq!(
        without(seen[0].headers.clone(), strip),
        without(seen[1].headers.clone(), strip)
    );
    for s in &seen {
        assert_eq!(s.method, Method::DELETE);
        assert_eq!(s.uri, "/a/b?c=d");
        assert!(s.complete && s.body == data);
    }
    assert_eq!(*marks.lock().unwrap(), vec![Some(Marker(7)); 2]);
}

// ---------------------------------------------------------------------------------------
// Promise 1: a non-idempotent request is never sent twice unless provably not sent.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_post_that_may_have_arrived_is_sent_once_through_the_preset() {
    for (fault, what) in [
        (Fault::Close, "closed without answer"),
        (Fault::Hang, "hung past the attempt timeout"),
        (Fault::status(503), "503"),
        (Fault::status(429), "429"),
        (Fault::ResetMidBody, "reset mid response"),
        (
            Fault::status_with(503, "retry-after", "0"),
            "503 retry-after 0",
        ),
    ] {
        for method in [
            Method::POST,
            Method::PATCH,
            Method::from_bytes(b"PURGE").unwrap(),
        ] {
            let server = FaultServer::start().await;
            server.script([fault.clone()]);
            let client = steadfast::client::http()
                .attempt_timeout(Duration::from_secs(1))
                .total_timeout(Duration::from_secs(5))
                .retry(|r| r.backoff(quick_backoff()))
                .build()
                .unwrap()
                .layer(support::transport::<Full<Bytes>>());
            let req = Request::builder()
                .method(method.clone())
                .uri(server.url("/pay"))
                .body(Full::new(Bytes::from_static(b"charge 10")))
                .unwrap();
            let _ = guarded(what, async {
                if let Ok(res) = client.oneshot(req).await {
                    let _ = res.into_body().collect().await;
                }
            })
            .await;
            assert_eq!(server.hits(), 1, "{method} {what}: sent once");
        }
    }
}

/// A POST refused at connect (provably never sent) may be retried; over a balancer of a dead
/// and a live endpoint it reaches the live one exactly once per call, its body (a stream over
/// the replay cap) whole. Real time (a connect refused by the kernel under a paused clock
/// let the 5 s attempt timer fire first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_post_goes_elsewhere_once_and_whole() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let live = capture(Arc::new(|_, _| Reply::After(200))).await;
    let layer = steadfast::client::http()
        .retry(|r| r.backoff(quick_backoff()).replay_cap(1024))
        .balance(|b| {
            b.endpoints([dead.to_string().as_str(), live.addr.to_string().as_str()])
                .seed(5)
        })
        .build()
        .unwrap();
    let client = layer.layer(support::transport());
    let data = pattern(100_000, 1);
    for i in 0..12 {
        let req = Request::post("http://orders/new")
            .body(trickled(chunked(&data, &[8192])))
            .unwrap();
        let res = tokio::time::timeout(Duration::from_secs(60), client.clone().oneshot(req))
            .await
            .expect("no hang");
        let res = res.unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(res.status(), 200, "call {i}");
        assert_eq!(
            live.seen().len(),
            i + 1,
            "call {i}: once at the live endpoint"
        );
    }
    for s in live.seen() {
        assert!(s.complete && s.body == data);
        assert_eq!(s.method, Method::POST);
    }
}

// ---------------------------------------------------------------------------------------
// Promise 3: stops.
// ---------------------------------------------------------------------------------------

/// A success, a redirect or the caller's own error is final even when it carries a hint and
/// the caller's predicate says "retry"; over a real socket.
#[tokio::test(start_paused = true)]
async fn successes_and_client_errors_are_final_whatever_the_predicate() {
    for code in [200u16, 201, 204, 301, 304, 400, 404, 409, 422] {
        let server = FaultServer::start().await;
        server.script([Fault::status_with(code, "retry-after", "1")]);
        server.set_default(Fault::status(200));
        let svc = RetryLayer::builder()
            .predicate(|_, _| Some(true))
            .retry_non_idempotent(true)
            .build()
            .unwrap()
            .layer(support::transport::<Full<Bytes>>());
        let req = Request::get(server.url("/")).body(Full::default()).unwrap();
        let res = guarded("call", svc.oneshot(req)).await.unwrap();
        assert_eq!(res.status(), code);
        assert_eq!(server.hits(), 1, "{code}: never retried");
    }
}

/// The caller's own body failing is not retried (a PUT: idempotent, so only the body's
/// failure stops the retry).
#[tokio::test(start_paused = true)]
async fn a_request_body_that_fails_is_not_retried() {
    let server = capture(Arc::new(|_, _| Reply::After(200))).await;
    let stream = futures_util::stream::iter(vec![
        Ok(Frame::data(Bytes::from_static(b"part"))),
        Err(std::io::Error::other("the caller's body broke")),
    ]);
    let svc = RetryLayer::builder()
        .backoff(quick_backoff())
        .build()
        .unwrap()
        .layer(support::transport());
    let req = Request::put(server.url("/x"))
        .body(StreamBody::new(stream))
        .unwrap();
    let out = guarded("call", svc.oneshot(req)).await;
    assert!(out.is_err(), "{out:?}");
    // Give the server task a chance to record what it saw.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(server.seen().len() <= 1, "{:?}", server.seen().len());
    assert!(server.seen().iter().all(|s| !s.complete));
}

/// Retry-After is honoured between attempts, attempts stop at max_attempts, and a hint past
/// the total deadline returns the last answer rather than a timeout.
#[tokio::test(start_paused = true)]
async fn hints_attempts_and_the_deadline_stop_retries() {
    let server = FaultServer::start().await;
    server.set_default(Fault::status_with(503, "retry-after", "1"));
    let svc = RetryLayer::builder()
        .max_attempts(4)
        .budget(None)
        .build()
        .unwrap()
        .layer(support::transport::<Full<Bytes>>());
    let res = guarded("call", svc.oneshot(support::get_from(&server)))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let seen = server.received();
    assert_eq!(seen.len(), 4);
    for w in seen.windows(2) {
        assert!(w[1].at - w[0].at >= Duration::from_secs(1), "hint honoured");
    }

    let server = FaultServer::start().await;
    server.set_default(Fault::status_with(503, "retry-after", "1"));
    let client = steadfast::client::http()
        .attempt_timeout(Duration::from_millis(500))
        .total_timeout(Duration::from_millis(2500))
        .retry(|r| r.max_attempts(10).budget(None).backoff(quick_backoff()))
        .build()
        .unwrap()
        .layer(support::transport::<Full<Bytes>>());
    let res = guarded("call", client.oneshot(support::get_from(&server)))
        .await
        .expect("the last answer, not a timeout");
    assert_eq!(res.status(), 503);
    assert_eq!(server.hits(), 3, "0 s, 1 s, 2 s; 3 s is past the deadline");
}

// ---------------------------------------------------------------------------------------
// Promise 4: the spare service.
// ---------------------------------------------------------------------------------------

/// A scripted in-process service below the retry layer that says which instance took each
/// attempt.
#[derive(Clone)]
struct Tagged {
    tag: u32,
    log: Arc<Mutex<Vec<u32>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
}

impl<B> Service<Request<B>> for Tagged {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<B>) -> Self::Future {
        self.log.lock().unwrap().push(self.tag);
        let code = self.script.lock().unwrap().pop_front().unwrap_or(200);
        std::future::ready(Ok(Response::builder()
            .status(code)
            .body(Full::default())
            .unwrap()))
    }
}

/// The service below is replaced through `get_mut` (e.g. re-pointed at a new upstream, or a
/// `Buffer` whose worker died swapped for a fresh one). Its next call's retry must go
/// through the new service, not a copy of the one the layered service's first call used.
#[tokio::test(start_paused = true)]
async fn a_replaced_service_below_takes_the_retries_too() {
    let log: Arc<Mutex<Vec<u32>>> = Arc::default();
    let script: Arc<Mutex<VecDeque<u16>>> = Arc::default();
    let mut svc = RetryLayer::builder()
        .backoff(quick_backoff())
        .build()
        .unwrap()
        .layer(Tagged {
            tag: 1,
            log: log.clone(),
            script: script.clone(),
        });
    let get = || {
        Request::get("http://x/")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    // One call through the original service (no retry).
    let res = call_ready("call", &mut svc, get()).await;
    assert_eq!(res.status(), 200);
    // The caller replaces the service below.
    svc.get_mut().tag = 2;
    script.lock().unwrap().extend([503, 200]);
    let res = call_ready("call", &mut svc, get()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        *log.lock().unwrap(),
        vec![1, 2, 2],
        "the retry went through the service the first attempt used"
    );
}

/// The realistic form: a transport that signs each request with a credential, rotated
/// through the preset's `get_mut` chain after the stack's first call (the old credential
/// revoked). The next call's first attempt carries the new credential; its retry must too,
/// not the copy of the transport kept since the first call.
#[derive(Clone)]
struct Signing<S> {
    inner: S,
    token: http::HeaderValue,
}

impl<S, B> Service<Request<B>> for Signing<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }
    fn call(&mut self, mut req: Request<B>) -> S::Future {
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, self.token.clone());
        self.inner.call(req)
    }
}

#[tokio::test(start_paused = true)]
async fn a_rotated_credential_reaches_the_retries_through_the_preset() {
    // The second request the upstream sees (the next call's first attempt) gets a 503.
    let server = capture(Arc::new(|nth, _| {
        Reply::After(if nth == 1 { 503 } else { 200 })
    }))
    .await;
    let mut client = steadfast::client::http()
        .retry(|r| r.backoff(quick_backoff()))
        .build()
        .unwrap()
        .layer(Signing {
            inner: support::transport::<Full<Bytes>>(),
            token: http::HeaderValue::from_static("Bearer old"),
        });
    let get = || {
        Request::get(server.url("/"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let res = call_ready("call 1", &mut client, get()).await;
    assert_eq!(res.status(), 200);
    // Rotate: correlation -> total timeout -> retry -> balance -> breaker -> attempt timeout
    // -> the signing transport.
    client
        .get_mut()
        .get_mut()
        .get_mut()
        .get_mut()
        .get_mut()
        .get_mut()
        .token = http::HeaderValue::from_static("Bearer new");
    let res = call_ready("call 2", &mut client, get()).await;
    assert_eq!(res.status(), 200);
    let tokens: Vec<String> = server
        .seen()
        .iter()
        .map(|s| String::from_utf8(s.headers["authorization"][0].clone()).unwrap())
        .collect();
    assert_eq!(
        tokens,
        ["Bearer old", "Bearer new", "Bearer new"],
        "the retry was signed with the revoked credential"
    );
}

/// Two clones of one retry service whose services below differ (one re-pointed through
/// `get_mut`): each clone's retries go through its own service below.
#[tokio::test(start_paused = true)]
async fn clones_with_different_services_below_keep_their_retries_apart() {
    let log: Arc<Mutex<Vec<u32>>> = Arc::default();
    let script: Arc<Mutex<VecDeque<u16>>> = Arc::default();
    let mut a = RetryLayer::builder()
        .backoff(quick_backoff())
        .build()
        .unwrap()
        .layer(Tagged {
            tag: 1,
            log: log.clone(),
            script: script.clone(),
        });
    let mut b = a.clone();
    b.get_mut().tag = 2;
    let get = || {
        Request::get("http://x/")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let _ = call_ready("a", &mut a, get()).await;
    script.lock().unwrap().extend([503, 200]);
    let res = call_ready("b", &mut b, get()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        *log.lock().unwrap(),
        vec![1, 2, 2],
        "b's retry went to a's service"
    );
}

/// A service below with per-instance readiness (`tower::buffer::Buffer`: a permit taken in
/// `poll_ready`, a panic on a call without one) and a capacity of one: many concurrent calls
/// with retries, every attempt made ready first, never two in flight.
#[tokio::test(start_paused = true)]
async fn a_buffer_below_is_made_ready_before_every_retry() {
    let inflight = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (i2, m2, c2) = (inflight.clone(), max.clone(), calls.clone());
    let inner = tower::service_fn(
        move |req: Request<steadfast::retry::ReplayBody<Full<Bytes>>>| {
            let (i, m, c) = (i2.clone(), m2.clone(), c2.clone());
            async move {
                let n = i.fetch_add(1, SeqCst) + 1;
                m.fetch_max(n, SeqCst);
                let nth = c.fetch_add(1, SeqCst);
                let body = req.into_body().collect().await.unwrap().to_bytes();
                tokio::time::sleep(Duration::from_millis(5)).await;
                i.fetch_sub(1, SeqCst);
                // Two of every three attempts fail.
                let code = if nth % 3 == 2 { 200 } else { 503 };
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(code)
                        .body(Full::new(body))
                        .unwrap(),
                )
            }
        },
    );
    let limited = tower::limit::ConcurrencyLimitLayer::new(1).layer(inner);
    let buffer = tower::buffer::Buffer::new(limited, 1);
    let svc = RetryLayer::builder()
        .backoff(quick_backoff())
        .max_attempts(5)
        .budget(None)
        .build()
        .unwrap()
        .layer(buffer);
    let calls_fut = (0..24u32).map(|i| {
        let svc = svc.clone();
        async move {
            let body = Full::new(Bytes::from(format!("req-{i}")));
            let req = Request::get("http://x/").body(body).unwrap();
            let res = svc.oneshot(req).await.unwrap();
            (
                i,
                res.status(),
                res.into_body().collect().await.unwrap().to_bytes(),
            )
        }
    });
    let all = guarded("calls", futures_util::future::join_all(calls_fut)).await;
    for (i, status, body) in all {
        if status == 200 {
            assert_eq!(
                body,
                format!("req-{i}"),
                "each answer belongs to its request"
            );
        }
    }
    assert_eq!(
        max.load(SeqCst),
        1,
        "never two in flight under a limit of one"
    );
}

/// Per-instance readiness without a queue: a permit taken in `poll_ready`, checked in
/// `call`; clones share the permits (like `tower::limit::ConcurrencyLimit`), a clone holds
/// none.
struct Permits {
    free: Arc<AtomicUsize>,
    held: bool,
    waiters: Arc<Mutex<Vec<std::task::Waker>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    unready_calls: Arc<AtomicUsize>,
}

impl Clone for Permits {
    fn clone(&self) -> Self {
        Self {
            free: self.free.clone(),
            held: false,
            waiters: self.waiters.clone(),
            script: self.script.clone(),
            unready_calls: self.unready_calls.clone(),
        }
    }
}

impl<B: Send + 'static> Service<Request<B>> for Permits {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.held {
            return Poll::Ready(Ok(()));
        }
        let mut w = self.waiters.lock().unwrap();
        let got = self
            .free
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if got {
            self.held = true;
            Poll::Ready(Ok(()))
        } else {
            w.push(cx.waker().clone());
            Poll::Pending
        }
    }
    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !std::mem::replace(&mut self.held, false) {
            self.unready_calls.fetch_add(1, SeqCst);
        }
        let code = self.script.lock().unwrap().pop_front().unwrap_or(200);
        let (free, waiters) = (self.free.clone(), self.waiters.clone());
        Box::pin(async move {
            drop(req);
            tokio::time::sleep(Duration::from_millis(2)).await;
            {
                let mut w = waiters.lock().unwrap();
                free.fetch_add(1, SeqCst);
                for w in w.drain(..) {
                    w.wake();
                }
            }
            Ok(Response::builder()
                .status(code)
                .body(Full::default())
                .unwrap())
        })
    }
}

impl Drop for Permits {
    fn drop(&mut self) {
        if self.held {
            let mut w = self.waiters.lock().unwrap();
            self.free.fetch_add(1, SeqCst);
            for w in w.drain(..) {
                w.wake();
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_permit_per_instance_is_taken_before_every_retry_and_never_leaked() {
    let free = Arc::new(AtomicUsize::new(2));
    let script: Arc<Mutex<VecDeque<u16>>> = Arc::default();
    script
        .lock()
        .unwrap()
        .extend(std::iter::repeat_n([503u16, 503, 200], 20).flatten());
    let permits = Permits {
        free: free.clone(),
        held: false,
        waiters: Arc::default(),
        script: script.clone(),
        unready_calls: Arc::default(),
    };
    let unready = permits.unready_calls.clone();
    let svc = RetryLayer::builder()
        .backoff(quick_backoff())
        .budget(None)
        .build()
        .unwrap()
        .layer(permits);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get("http://x/")
                .body(Full::<Bytes>::default())
                .unwrap();
            svc.oneshot(req).await.unwrap().status()
        }));
    }
    for t in tasks {
        let _ = guarded("call", t).await.unwrap();
    }
    assert_eq!(unready.load(SeqCst), 0, "never called without a permit");
    drop(svc);
    assert_eq!(free.load(SeqCst), 2, "every permit back");
}

/// Below the preset: a transport that answers 503 once and then is never ready again
/// (never waking its caller). The call must end by the total deadline, not hang.
#[derive(Clone)]
struct GoesDark {
    calls: Arc<AtomicUsize>,
    dark: Arc<AtomicBool>,
}

impl<B> Service<Request<B>> for GoesDark {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.dark.load(SeqCst) {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }
    fn call(&mut self, _: Request<B>) -> Self::Future {
        self.calls.fetch_add(1, SeqCst);
        self.dark.store(true, SeqCst);
        std::future::ready(Ok(Response::builder()
            .status(503)
            .body(Full::default())
            .unwrap()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_service_below_unready_forever_ends_the_call_by_the_deadline() {
    let dark = GoesDark {
        calls: Arc::default(),
        dark: Arc::default(),
    };
    let client = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .retry(|r| r.backoff(quick_backoff()))
        .build()
        .unwrap()
        .layer(dark.clone());
    let start = tokio::time::Instant::now();
    let out = guarded(
        "preset over a dark service",
        client.oneshot(
            Request::get("http://x/")
                .body(Full::<Bytes>::default())
                .unwrap(),
        ),
    )
    .await;
    assert!(out.is_err(), "ended by the deadline");
    assert!(
        start.elapsed() <= Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(dark.calls.load(SeqCst), 1);
}

/// A breaker forced open (through its handle) after the first attempt was sent refuses the
/// retry: the upstream sees one request.
#[tokio::test(start_paused = true)]
async fn a_breaker_forced_open_after_the_first_call_refuses_the_retry() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stack = steadfast::client::http()
        .retry(|r| r.backoff(quick_backoff()))
        .build()
        .unwrap();
    let authority: http::uri::Authority = addr.to_string().parse().unwrap();
    let handle = stack.breakers().handle(&Some(authority));
    let hits = Arc::new(AtomicUsize::new(0));
    let (h2, hd) = (hits.clone(), handle.clone());
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let (h, hd) = (h2.clone(), hd.clone());
            async move {
                if h.fetch_add(1, SeqCst) == 0 {
                    hd.force_open();
                }
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = stack.layer(support::transport::<Full<Bytes>>());
    let out = guarded("call", client.clone().oneshot(support::get(addr, "/"))).await;
    if let Ok(res) = &out {
        assert_eq!(res.status(), 503);
    }
    assert_eq!(
        hits.load(SeqCst),
        1,
        "the retry went past a breaker forced open"
    );
    // Closed again: a new call is retried as usual (the spare is not stuck open either).
    handle.close();
    let res = guarded("call 2", client.clone().oneshot(support::get(addr, "/")))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        hits.load(SeqCst),
        4,
        "three attempts with the breaker closed"
    );
}

/// A balancer endpoint removed after the first call (while a call's first attempt is at it)
/// receives no retry.
#[tokio::test(start_paused = true)]
async fn a_removed_endpoint_receives_no_retry() {
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let stack = steadfast::client::http()
        .retry(|r| r.backoff(quick_backoff()).budget(None))
        .balance(|x| {
            x.endpoints([a.to_string().as_str(), b.to_string().as_str()])
                .seed(3)
        })
        .build()
        .unwrap();
    let endpoints = stack.endpoints();
    let (hits_a, hits_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (ha, ep, auth_a) = (
        hits_a.clone(),
        endpoints.clone(),
        a.to_string().parse::<http::uri::Authority>().unwrap(),
    );
    let app_a = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let (ha, ep, auth) = (ha.clone(), ep.clone(), auth_a.clone());
            async move {
                ha.fetch_add(1, SeqCst);
                ep.remove(&auth);
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            }
        }),
    );
    let hb = hits_b.clone();
    let app_b = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let hb = hb.clone();
            async move {
                hb.fetch_add(1, SeqCst);
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move { axum::serve(la, app_a).await.unwrap() });
    tokio::spawn(async move { axum::serve(lb, app_b).await.unwrap() });
    let client = stack.layer(support::transport::<Full<Bytes>>());
    for i in 0..30 {
        let req = Request::get("http://orders/")
            .body(Full::default())
            .unwrap();
        let res = guarded("call", client.clone().oneshot(req)).await.unwrap();
        assert_eq!(res.status(), 200, "call {i}");
    }
    assert!(
        hits_a.load(SeqCst) <= 1,
        "a removed endpoint got {} requests",
        hits_a.load(SeqCst)
    );
}

// ---------------------------------------------------------------------------------------
// Promise 5: concurrency on a multi-thread runtime.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retried_calls_never_mix_up_requests() {
    // The first attempt of each request id gets a 503; a retry is answered with the id and
    // the body it carried.
    let firsts: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
    let f2 = firsts.clone();
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
            let f = f2.clone();
            async move {
                let id = headers["x-id"].to_str().unwrap().to_owned();
                let n = {
                    let mut m = f.lock().unwrap();
                    let e = m.entry(id.clone()).or_insert(0);
                    *e += 1;
                    *e
                };
                if n == 1 {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, Bytes::new())
                } else {
                    let mut out = id.into_bytes();
                    out.push(b'|');
                    out.extend_from_slice(&body);
                    (axum::http::StatusCode::OK, Bytes::from(out))
                }
            }
        }),
    );
    let addr = support::serve_axum(app).await;
    let stack = steadfast::client::http()
        .retry(|r| r.backoff(quick_backoff()).budget(None))
        .build()
        .unwrap();
    // Every call fails once: the breaker would (rightly) open; this test is about retries.
    stack
        .breakers()
        .handle(&Some(addr.to_string().parse().unwrap()))
        .disable();
    let client = stack.layer(support::transport());
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("id-{i}");
            let body = pattern(100 + (i as usize * 997) % 20_000, i as u8);
            let req = Request::post(format!("http://{addr}/echo"))
                .header("x-id", &id)
                .header("idempotency-key", &id)
                .body(trickled(chunked(&body, &[1 + i as usize * 13])))
                .unwrap();
            let res = client.oneshot(req).await.unwrap();
            let status = res.status();
            let got = res.into_body().collect().await.unwrap().to_bytes();
            let mut want = id.into_bytes();
            want.push(b'|');
            want.extend_from_slice(&body);
            (i, status, got == want[..])
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
    .await
    .expect("no deadlock");
    for (i, status, same) in all {
        assert_eq!(status, 200, "call {i}");
        assert!(same, "call {i}: its own id and body");
    }
    assert!(firsts.lock().unwrap().values().all(|&n| n == 2));
}
