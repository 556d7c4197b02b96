//! Hostile tests of the *shed* classification (`x-envoy-overloaded` on an error answer, HTTP or
//! trailers-only gRPC: `Class::overloaded`, not a failure) through real transport: hyper/axum
//! and tonic servers on 127.0.0.1 with ephemeral ports, the `client::http()` / `client::grpc()`
//! presets and single layers over hyper-util clients. Paused tokio time wherever sockets allow;
//! every wait is bounded (a hang is a failure, not a stuck run); no timing is asserted except
//! gaps on the paused clock, which are exact.
//!
//! Each test names the promise it checks. A failing test is a finding (see the report).
#![cfg(all(feature = "tonic", feature = "metrics"))]

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use steadfast::balance::{BalanceLayer, Pick};
use steadfast::breaker::{BreakerState, CircuitBreakerLayer};
use steadfast::common::{BoxError, DefaultClassifier};
use steadfast::limit::ConcurrencyLimitLayer;
use steadfast::limit::error::{LimitExceeded, Throttled};
use steadfast::retry::{HedgeDelay, HedgeLayer, RetryLayer, ThrottleConfig};
use steadfast_testkit::{Fault, FaultServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const MARK: &str = "x-envoy-overloaded";

// ---------------------------------------------------------------------------------------------
// Helpers.

type Body = BoxBody<Bytes, Infallible>;

fn full(b: &'static [u8]) -> Body {
    Full::new(Bytes::from_static(b)).boxed()
}

/// Bounds a whole test: on paused time a hang auto-advances to this and fails.
async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(3600), f)
        .await
        .expect("hung: no outcome within an hour of (paused) time")
}

/// Waits (1 ms steps of paused time, at most 2 s) until `f` holds.
async fn until(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..2000 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    f()
}

/// A status with extra headers (several with one name allowed), empty body.
fn answer(code: u16, headers: &[(&'static str, &'static str)]) -> Fault {
    Fault::Respond {
        status: StatusCode::from_u16(code).unwrap(),
        headers: headers
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect(),
        body: Bytes::new(),
    }
}

fn shed503() -> Fault {
    answer(503, &[(MARK, "true")])
}

fn req(method: Method, url: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .body(Full::default())
        .unwrap()
}

fn get(url: &str) -> Request<Full<Bytes>> {
    req(Method::GET, url)
}

/// Sends `r` through `svc` and reads the whole body (a gRPC verdict arrives at its end).
async fn call<S, B>(svc: &S, r: Request<Full<Bytes>>) -> Result<(u16, HeaderMap), BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let res = svc.clone().oneshot(r).await.map_err(Into::into)?;
    let (parts, body) = res.into_parts();
    body.collect().await.map_err(Into::into)?;
    Ok((parts.status.as_u16(), parts.headers))
}

fn is_open(e: &BoxError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&**e);
    while let Some(x) = cur {
        if x.is::<steadfast::breaker::error::BreakerOpen>() {
            return true;
        }
        cur = x.source();
    }
    false
}

fn transport() -> support::Transport<Full<Bytes>> {
    support::transport::<Full<Bytes>>()
}

/// An HTTP/2 (prior knowledge) transport that dials a fresh hyper-util client per request:
/// on paused time a pooled hyper-util HTTP/2 connection stalls its second request (a test
/// artifact, seen with a bare hyper-util client too; real time is fine), so none is reused.
#[derive(Clone, Copy)]
struct FreshH2;

impl<B> Service<Request<B>> for FreshH2
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<hyper::body::Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, r: Request<B>) -> Self::Future {
        let client: Client<_, B> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        Box::pin(async move { client.request(r).await })
    }
}

fn h2_transport() -> FreshH2 {
    FreshH2
}

/// Serves `f` (HTTP/1 and HTTP/2 prior knowledge) on 127.0.0.1 with an ephemeral port.
async fn serve_fn<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| {
                    let fut = f(r);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// What [`Up`] answers.
const OK: u8 = 0;
const FAIL: u8 = 1;
const SHED: u8 = 2;
const SHED_HELD: u8 = 3;

/// An upstream whose answer can be switched, which counts hits and calls in flight, and whose
/// `SHED_HELD` calls wait for `gate`.
struct Up {
    mode: AtomicU8,
    hits: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    gate: Semaphore,
}

impl Default for Up {
    fn default() -> Self {
        Self {
            mode: AtomicU8::new(OK),
            hits: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            gate: Semaphore::new(0),
        }
    }
}

impl Up {
    fn set(&self, m: u8) {
        self.mode.store(m, Ordering::SeqCst);
    }
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

async fn start_up() -> (Arc<Up>, SocketAddr) {
    let up = Arc::new(Up::default());
    let u = up.clone();
    let addr = serve_fn(move |_r| {
        let u = u.clone();
        async move {
            u.hits.fetch_add(1, Ordering::SeqCst);
            let n = u.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            u.max_in_flight.fetch_max(n, Ordering::SeqCst);
            let mode = u.mode.load(Ordering::SeqCst);
            if mode == SHED_HELD {
                u.gate.acquire().await.unwrap().forget();
            }
            u.in_flight.fetch_sub(1, Ordering::SeqCst);
            match mode {
                OK => Response::new(full(b"ok")),
                FAIL => Response::builder().status(500).body(full(b"")).unwrap(),
                _ => Response::builder()
                    .status(503)
                    .header(MARK, "true")
                    .body(full(b""))
                    .unwrap(),
            }
        }
    })
    .await;
    (up, addr)
}

/// A raw HTTP/1.1 server that answers every request head with `response` verbatim (header
/// names in whatever case it was written); counts requests.
async fn raw_server(response: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        h.fetch_add(1, Ordering::SeqCst);
                        if s.write_all(response).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, hits)
}

fn one_attempt_stack(trip_after: u32) -> steadfast::client::HttpClientLayer {
    steadfast::client::http()
        .retry(|r| r.max_attempts(1))
        .breaker(|b| b.consecutive_failures(Some(trip_after)).jitter_percent(0))
        .build()
        .unwrap()
}

fn breaker_of(
    stack: &steadfast::client::HttpClientLayer,
    addr: SocketAddr,
) -> steadfast::breaker::BreakerHandle<DefaultClassifier> {
    stack
        .breakers()
        .handle_for_uri(&format!("http://{addr}/").parse().unwrap())
}

// ---------------------------------------------------------------------------------------------
// Classification on the wire: which answers are shed.

/// Promise (classify.rs `OVERLOADED`): "Any value counts; only its presence matters" on an
/// error answer (status >= 400): empty, "false", "0", odd text, the header sent twice, on
/// 500/429/504 as on 503 — none of them is a failure, so a breaker that trips on ONE failure
/// stays closed. Control: the same status unmarked trips it.
#[tokio::test(start_paused = true)]
async fn any_marker_value_on_any_error_status_is_shed_not_a_failure() {
    bounded(async {
        let variants: Vec<(&str, Fault)> = vec![
            ("503 true", shed503()),
            ("503 empty", answer(503, &[(MARK, "")])),
            ("503 false", answer(503, &[(MARK, "false")])),
            ("503 zero", answer(503, &[(MARK, "0")])),
            ("503 odd", answer(503, &[(MARK, "  weird value; x=1 ")])),
            ("503 twice", answer(503, &[(MARK, "true"), (MARK, "also")])),
            ("500 true", answer(500, &[(MARK, "true")])),
            ("502 true", answer(502, &[(MARK, "true")])),
            ("504 true", answer(504, &[(MARK, "true")])),
            ("429 true", answer(429, &[(MARK, "true")])),
        ];
        for (name, fault) in variants {
            let server = FaultServer::start().await;
            server.set_default(fault);
            let stack = one_attempt_stack(1);
            let client = stack.layer(transport());
            for i in 0..5 {
                let r = call(&client, get(&server.url("/"))).await;
                assert!(r.is_ok(), "{name}: call {i}: {:?}", r.err());
            }
            assert_eq!(server.hits(), 5, "{name}");
            assert_eq!(
                breaker_of(&stack, server.addr()).state(),
                BreakerState::Closed,
                "{name}: a marked error answer counted as a failure"
            );
        }
        // Control: unmarked, one failure trips it.
        let server = FaultServer::start().await;
        server.set_default(Fault::status(503));
        let stack = one_attempt_stack(1);
        let client = stack.layer(transport());
        call(&client, get(&server.url("/"))).await.unwrap();
        assert_eq!(
            breaker_of(&stack, server.addr()).state(),
            BreakerState::Open
        );
    })
    .await;
}

/// Promise: header names are case-insensitive on the wire; a server that writes
/// `X-Envoy-Overloaded:` (mixed case, empty value) over raw HTTP/1.1 is shed.
#[tokio::test(start_paused = true)]
async fn mixed_case_empty_marker_from_a_raw_http1_server_is_shed() {
    bounded(async {
        let (addr, hits) = raw_server(
            b"HTTP/1.1 503 Service Unavailable\r\nX-Envoy-Overloaded:\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let stack = one_attempt_stack(1);
        let client = stack.layer(transport());
        for _ in 0..5 {
            let (status, headers) = call(&client, get(&format!("http://{addr}/")))
                .await
                .unwrap();
            assert_eq!(status, 503);
            assert!(headers.contains_key(MARK));
        }
        assert_eq!(hits.load(Ordering::SeqCst), 5);
        assert_eq!(breaker_of(&stack, addr).state(), BreakerState::Closed);
    })
    .await;
}

/// Promise (classify.rs): the marker is looked for on error answers only. A half-open probe
/// answered 200 or 302 *with* the marker is a success and closes the breaker; one answered
/// 404 or 500 with it is shed (neither way): the breaker stays half-open and the next call
/// probes (its 200 closes it).
#[tokio::test(start_paused = true)]
async fn marker_on_2xx_3xx_is_ignored_and_on_4xx_5xx_leaves_a_probe_undecided() {
    bounded(async {
        for (code, after) in [
            (200, BreakerState::Closed),
            (204, BreakerState::Closed),
            (302, BreakerState::Closed),
            (404, BreakerState::HalfOpen),
            (500, BreakerState::HalfOpen),
        ] {
            let server = FaultServer::start().await;
            let fault = if code == 302 {
                answer(302, &[(MARK, "true"), ("location", "/elsewhere")])
            } else {
                answer(code, &[(MARK, "true")])
            };
            server.script([fault]);
            let stack = one_attempt_stack(1);
            let handle = breaker_of(&stack, server.addr());
            handle.half_open_now();
            let client = stack.layer(transport());
            let (status, _) = call(&client, get(&server.url("/"))).await.unwrap();
            assert_eq!(status, code);
            assert_eq!(handle.state(), after, "{code} + marker as a probe's answer");
            if after == BreakerState::HalfOpen {
                // The permit was handed on: the next call probes, and its 200 closes.
                let (status, _) = call(&client, get(&server.url("/"))).await.unwrap();
                assert_eq!(status, 200, "{code}: the next call was not let through");
                assert_eq!(handle.state(), BreakerState::Closed, "{code}");
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// gRPC on the wire (HTTP/2).

/// A gRPC answer from a hyper h2 server: `head` headers, then optional data and trailers.
async fn grpc_server(
    status: u16,
    head: &'static [(&'static str, &'static str)],
    data: bool,
    trailers: &'static [(&'static str, &'static str)],
) -> SocketAddr {
    serve_fn(move |_r| async move {
        let mut b = Response::builder()
            .status(status)
            .header("content-type", "application/grpc");
        for (n, v) in head {
            b = b.header(*n, *v);
        }
        let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
        if data {
            frames.push(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))));
        }
        if !trailers.is_empty() {
            let mut t = HeaderMap::new();
            for (n, v) in trailers {
                t.append(HeaderName::from_static(n), HeaderValue::from_static(v));
            }
            frames.push(Ok(Frame::trailers(t)));
        }
        b.body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
            .unwrap()
    })
    .await
}

fn grpc_post(addr: SocketAddr) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap()
}

/// Promise: a trailers-only gRPC answer with a non-OK status and the marker is shed (a
/// breaker that trips at one failure stays closed, for UNAVAILABLE and RESOURCE_EXHAUSTED);
/// a trailers-only OK with the marker is a success (it closes a half-open breaker); a
/// status in trailers after a body is judged by its code alone (documented: the marker there
/// is not honoured), so a streamed UNAVAILABLE trips the breaker even when marked.
#[tokio::test(start_paused = true)]
async fn grpc_trailers_only_marked_is_shed_streamed_marked_is_a_failure() {
    bounded(async {
        // Trailers-only UNAVAILABLE / RESOURCE_EXHAUSTED, marked.
        for code in ["14", "8", "13"] {
            let head: &'static [(&'static str, &'static str)] = match code {
                "14" => &[("grpc-status", "14"), (MARK, "true")],
                "8" => &[("grpc-status", "8"), (MARK, "true")],
                _ => &[("grpc-status", "13"), (MARK, "")],
            };
            let addr = grpc_server(200, head, false, &[]).await;
            let stack = one_attempt_stack(1);
            let client = stack.layer(h2_transport());
            for _ in 0..5 {
                call(&client, grpc_post(addr)).await.unwrap();
            }
            assert_eq!(
                breaker_of(&stack, addr).state(),
                BreakerState::Closed,
                "trailers-only grpc-status {code} + marker counted as a failure"
            );
        }
        // Trailers-only OK with the marker closes a half-open breaker.
        let addr = grpc_server(200, &[("grpc-status", "0"), (MARK, "true")], false, &[]).await;
        let stack = one_attempt_stack(1);
        let handle = breaker_of(&stack, addr);
        handle.half_open_now();
        let client = stack.layer(h2_transport());
        call(&client, grpc_post(addr)).await.unwrap();
        assert_eq!(
            handle.state(),
            BreakerState::Closed,
            "OK + marker is a success"
        );

        // Streamed: body, then trailers with UNAVAILABLE and the marker: a failure.
        let addr = grpc_server(
            200,
            &[(MARK, "true")],
            true,
            &[("grpc-status", "14"), (MARK, "true")],
        )
        .await;
        let stack = one_attempt_stack(1);
        let client = stack.layer(h2_transport());
        let (status, _) = call(&client, grpc_post(addr)).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            breaker_of(&stack, addr).state(),
            BreakerState::Open,
            "documented: a status in trailers after a body is judged by its code alone"
        );
    })
    .await;
}

/// Promise (classify.rs `honour_overloaded`): "an error answer (status 400 or more, or a
/// trailers-only gRPC status other than OK) that carries OVERLOADED is classified as shed".
/// A proxy's 503 for a gRPC request (content-type application/grpc, no grpc-status, the
/// marker set) is an error answer of status 400 or more.
#[tokio::test(start_paused = true)]
async fn grpc_content_type_503_with_marker_and_no_grpc_status_is_shed() {
    bounded(async {
        let addr = grpc_server(503, &[(MARK, "true")], false, &[]).await;
        let stack = one_attempt_stack(1);
        let client = stack.layer(h2_transport());
        for _ in 0..3 {
            let (status, headers) = call(&client, grpc_post(addr)).await.unwrap();
            assert_eq!(status, 503);
            assert!(headers.contains_key(MARK));
        }
        assert_eq!(
            breaker_of(&stack, addr).state(),
            BreakerState::Closed,
            "a marked HTTP 503 with a gRPC content type counted as a failure (trip reason {:?})",
            breaker_of(&stack, addr).trip_reason()
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// tonic: steadfast::errors::grpc_status and the answering limit behind a real tonic server.

mod health {
    use super::*;
    use tonic_health::pb::health_server::Health;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    pub(super) const T_REJECTED: u8 = 1;
    pub(super) const T_UNAVAILABLE: u8 = 2;
    pub(super) const T_HELD: u8 = 3;

    #[derive(Clone)]
    pub(super) struct Answer {
        pub(super) mode: Arc<AtomicU8>,
        pub(super) hits: Arc<AtomicUsize>,
        pub(super) gate: Arc<Semaphore>,
    }

    impl Default for Answer {
        fn default() -> Self {
            Self {
                mode: Arc::default(),
                hits: Arc::default(),
                gate: Arc::new(Semaphore::new(0)),
            }
        }
    }

    #[tonic::async_trait]
    impl Health for Answer {
        async fn check(
            &self,
            _req: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
            self.hits.fetch_add(1, Ordering::SeqCst);
            match self.mode.load(Ordering::SeqCst) {
                T_REJECTED => Err(steadfast::errors::grpc_status(&LimitExceeded::new(
                    1,
                    Duration::ZERO,
                ))),
                T_UNAVAILABLE => Err(tonic::Status::unavailable("down")),
                T_HELD => {
                    self.gate.acquire().await.unwrap().forget();
                    Ok(tonic::Response::new(HealthCheckResponse { status: 1 }))
                }
                _ => Ok(tonic::Response::new(HealthCheckResponse { status: 1 })),
            }
        }

        type WatchStream = Pin<
            Box<dyn futures_util::Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>,
        >;

        async fn watch(
            &self,
            _req: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("watch"))
        }
    }
}

async fn tonic_server(answer: health::Answer, limit: Option<ConcurrencyLimitLayer>) -> String {
    use tonic_health::pb::health_server::HealthServer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = HealthServer::new(answer);
    match limit {
        Some(limit) => {
            tokio::spawn(
                tonic::transport::Server::builder()
                    .layer(limit.answering())
                    .add_service(svc)
                    .serve_with_incoming(support::incoming(listener)),
            );
        }
        None => {
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming(support::incoming(listener)),
            );
        }
    }
    format!("http://{addr}")
}

async fn channel(url: String) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn check() -> tonic_health::pb::HealthCheckRequest {
    tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    }
}

/// Promise (src/errors.rs): a `Rejected` failure answered as `tonic::Status` carries the
/// marker; a tonic server returning it answers trailers-only, so the calling
/// `client::grpc()` stack's breaker counts it neither way (ten in a row leave it closed;
/// ten plain UNAVAILABLEs open it). Retry is decided by the status as before: the shed
/// UNAVAILABLE is retried like the plain one (default `retry_unavailable`).
#[tokio::test(start_paused = true)]
async fn tonic_status_for_a_rejection_is_marked_and_keeps_the_callers_breaker_closed() {
    bounded(async {
        use tonic_health::pb::health_client::HealthClient;
        let answer = health::Answer::default();
        answer.mode.store(health::T_REJECTED, Ordering::SeqCst);
        let url = tonic_server(answer.clone(), None).await;
        let stack = steadfast::client::grpc()
            .retry_unavailable(false)
            .build()
            .unwrap();
        let mut client = HealthClient::new(stack.layer(channel(url.clone()).await));
        for _ in 0..10 {
            let status = client.check(check()).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(
                status.metadata().get(MARK).is_some(),
                "the marker did not reach the caller: {status:?}"
            );
        }
        assert_eq!(answer.hits.load(Ordering::SeqCst), 10);
        assert_eq!(stack.breakers().handle(&None).state(), BreakerState::Closed);

        // Control: plain UNAVAILABLE opens it (5 consecutive failures).
        answer.mode.store(health::T_UNAVAILABLE, Ordering::SeqCst);
        for _ in 0..5 {
            let _ = client.check(check()).await.unwrap_err();
        }
        assert_eq!(stack.breakers().handle(&None).state(), BreakerState::Open);

        // Retry by status: the shed UNAVAILABLE is retried as the plain one is.
        let counted = |mode: u8| {
            let url = url.clone();
            let answer = answer.clone();
            async move {
                answer.mode.store(mode, Ordering::SeqCst);
                let before = answer.hits.load(Ordering::SeqCst);
                let stack = steadfast::client::grpc().build().unwrap();
                let mut client = HealthClient::new(stack.layer(channel(url).await));
                let _ = client.check(check()).await.unwrap_err();
                answer.hits.load(Ordering::SeqCst) - before
            }
        };
        let shed = counted(health::T_REJECTED).await;
        let plain = counted(health::T_UNAVAILABLE).await;
        assert_eq!(
            shed, plain,
            "shed UNAVAILABLE retried {shed} times, plain {plain}"
        );
        assert_eq!(plain, 3);
    })
    .await;
}

/// Promise (steadfast-limit answer.rs/error.rs): the answering limit on a tonic server sheds
/// with a trailers-only RESOURCE_EXHAUSTED marked as shed; the client sees the code and the
/// marker, and the call is not retried (RESOURCE_EXHAUSTED is not retryable).
#[tokio::test(start_paused = true)]
async fn tonic_server_answering_limit_sheds_resource_exhausted_with_the_marker() {
    bounded(async {
        use tonic_health::pb::health_client::HealthClient;
        let answer = health::Answer::default();
        answer.mode.store(health::T_HELD, Ordering::SeqCst);
        let limit = ConcurrencyLimitLayer::new(1);
        let url = tonic_server(answer.clone(), Some(limit.clone())).await;
        let stack = steadfast::client::grpc().build().unwrap();
        let mut held_client = HealthClient::new(stack.layer(channel(url.clone()).await));
        let held = tokio::spawn(async move { held_client.check(check()).await });
        assert!(
            until(|| limit.in_flight() == 1).await,
            "the held call never arrived"
        );
        // Connected only now: on paused time, an HTTP/2 connection that sat idle while the
        // clock auto-advanced stalls its next request (a hyper/h2 artifact, seen with a bare
        // hyper-util client too; the same test passes on real time either way).
        let client = HealthClient::new(stack.layer(channel(url).await));
        for _ in 0..5 {
            let status = client.clone().check(check()).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            assert!(status.metadata().get(MARK).is_some(), "{status:?}");
        }
        assert_eq!(
            answer.hits.load(Ordering::SeqCst),
            1,
            "shed calls reached the handler"
        );
        assert_eq!(stack.breakers().handle(&None).state(), BreakerState::Closed);
        answer.gate.add_permits(1);
        held.await.unwrap().unwrap();
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Retry: POST never sent twice; Retry-After; the budget; gRPC A6 throttling; predicate.

/// Promise (README semantics): a non-idempotent request is never sent twice unless opted in;
/// a shed 503 changes nothing. POSTs through the default stack: one arrival each. With an
/// `Idempotency-Key`, or `retry_non_idempotent(true)`: retried (3 attempts). Also through a
/// balanced stack of shedding endpoints and through a hedge layer.
#[tokio::test(start_paused = true)]
async fn a_post_answered_by_a_shed_503_is_sent_once_unless_opted_in() {
    bounded(async {
        let server = FaultServer::start().await;
        server.set_default(shed503());
        let stack = steadfast::client::http().build().unwrap();
        let client = stack.layer(transport());
        for _ in 0..10 {
            let (s, h) = call(&client, req(Method::POST, &server.url("/orders")))
                .await
                .unwrap();
            assert_eq!((s, h.contains_key(MARK)), (503, true));
        }
        assert_eq!(
            server.hits(),
            10,
            "a POST answered by a shed 503 was sent again"
        );

        // Opted in: Idempotency-Key.
        let server = FaultServer::start().await;
        server.set_default(shed503());
        let stack = steadfast::client::http()
            .retry(|r| r.budget(None))
            .build()
            .unwrap();
        let client = stack.layer(transport());
        let mut keyed = req(Method::POST, &server.url("/orders"));
        keyed
            .headers_mut()
            .insert("idempotency-key", "k-1".parse().unwrap());
        call(&client, keyed).await.unwrap();
        assert_eq!(server.hits(), 3, "Idempotency-Key opts in");

        // Opted in: retry_non_idempotent.
        let server = FaultServer::start().await;
        server.set_default(shed503());
        let stack = steadfast::client::http()
            .retry(|r| r.budget(None).retry_non_idempotent(true))
            .build()
            .unwrap();
        let client = stack.layer(transport());
        call(&client, req(Method::POST, &server.url("/orders")))
            .await
            .unwrap();
        assert_eq!(server.hits(), 3, "retry_non_idempotent opts in");

        // Balanced over three shedding endpoints: still one arrival per POST.
        let eps = [
            FaultServer::start().await,
            FaultServer::start().await,
            FaultServer::start().await,
        ];
        for s in &eps {
            s.set_default(shed503());
        }
        let stack = steadfast::client::http()
            .balance(|b| {
                b.endpoints(eps.iter().map(|s| s.addr().to_string()))
                    .pick(Pick::RoundRobin)
                    .seed(3)
            })
            .build()
            .unwrap();
        let client = stack.layer(transport());
        for _ in 0..30 {
            let (s, _) = call(&client, req(Method::POST, "http://orders/orders"))
                .await
                .unwrap();
            assert_eq!(s, 503);
        }
        let total: usize = eps.iter().map(FaultServer::hits).sum();
        assert_eq!(total, 30, "balanced: a POST was sent twice");

        // A hedge layer does not hedge a POST after a shed answer.
        let (a, b) = (FaultServer::start().await, FaultServer::start().await);
        a.set_default(shed503());
        b.set_default(shed503());
        let balance = BalanceLayer::builder()
            .endpoints([a.addr().to_string(), b.addr().to_string()])
            .pick(Pick::RoundRobin)
            .seed(5)
            .build()
            .unwrap();
        let hedged = ServiceBuilder::new()
            .layer(
                HedgeLayer::builder()
                    .delay(HedgeDelay::Fixed(Duration::from_millis(10)))
                    .max_extra_load(1.0)
                    .build()
                    .unwrap(),
            )
            .layer(balance)
            .service(transport());
        for _ in 0..10 {
            let (s, _) = call(&hedged, req(Method::POST, "http://orders/orders"))
                .await
                .unwrap();
            assert_eq!(s, 503);
        }
        assert_eq!(a.hits() + b.hits(), 10, "hedged: a POST was sent twice");
    })
    .await;
}

/// Promise (limit error.rs + README): the answering limit's shed answer is 503 +
/// `Retry-After: 1` + the marker; the client stack retries a GET by status as before and
/// honours `Retry-After` (each retry at least 1 s after the previous attempt, on the paused
/// clock); the final answer reaches the caller marked, and the caller's breaker stays closed.
#[tokio::test(start_paused = true)]
async fn retry_after_on_the_answering_limits_shed_answer_is_honoured() {
    bounded(async {
        let limit = ConcurrencyLimitLayer::new(1);
        let gate = Arc::new(Semaphore::new(0));
        let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let g = gate.clone();
        let app = axum::Router::new()
            .route(
                "/",
                axum::routing::get(move || {
                    let g = g.clone();
                    async move {
                        g.acquire().await.unwrap().forget();
                        "ok"
                    }
                }),
            )
            .layer(limit.answering())
            .layer(tower::util::MapRequestLayer::new({
                let arrivals = arrivals.clone();
                move |r: Request<axum::body::Body>| {
                    arrivals.lock().unwrap().push(Instant::now());
                    r
                }
            }));
        let addr = support::serve_axum(app).await;
        let stack = steadfast::client::http().build().unwrap();
        let client = stack.layer(transport());
        let c = client.clone();
        let url = format!("http://{addr}/");
        let u = url.clone();
        let held = tokio::spawn(async move { call(&c, get(&u)).await });
        assert!(until(|| limit.in_flight() == 1).await);
        let before = arrivals.lock().unwrap().len();
        let (status, headers) = call(&client, get(&url)).await.unwrap();
        assert_eq!(status, 503);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(headers[MARK], "true");
        let times: Vec<Instant> = arrivals.lock().unwrap()[before..].to_vec();
        assert_eq!(
            times.len(),
            3,
            "a GET shed with 503 is retried (3 attempts)"
        );
        for w in times.windows(2) {
            assert!(
                w[1] - w[0] >= Duration::from_secs(1),
                "Retry-After: 1 not honoured: {:?}",
                w[1] - w[0]
            );
        }
        assert_eq!(breaker_of(&stack, addr).state(), BreakerState::Closed);
        gate.add_permits(1);
        assert_eq!(held.await.unwrap().unwrap().0, 200);
    })
    .await;
}

/// Promise: retry is decided by status as before, the budget included: the same sequence of
/// GETs against an always-shedding upstream and an always-503 upstream sends exactly as many
/// attempts (the budget spends a token per sent retry, shed or not).
#[tokio::test(start_paused = true)]
async fn the_retry_budget_spends_on_shed_503s_as_on_plain_ones() {
    bounded(async {
        let mut hits = Vec::new();
        for fault in [shed503(), Fault::status(503)] {
            let server = FaultServer::start().await;
            server.set_default(fault);
            let layer = RetryLayer::builder().seed(3).build().unwrap();
            let client = layer.layer(transport());
            for _ in 0..200 {
                let (s, _) = call(&client, get(&server.url("/"))).await.unwrap();
                assert_eq!(s, 503);
            }
            hits.push((server.hits(), layer.budget_balance()));
        }
        assert_eq!(hits[0].0, hits[1].0, "attempts (shed, plain): {hits:?}");
        assert!(
            hits[0].0 > 200 && hits[0].0 < 600,
            "the budget bounded retries: {hits:?}"
        );
    })
    .await;
}

/// Promise (README): "a limit or throttle still learns from the 503": steadfast-limit's
/// client-side throttle, seeded, refuses exactly as much in front of an upstream that sheds
/// (marked 503s) as in front of one that answers plain 503s; and refuses some.
#[tokio::test(start_paused = true)]
async fn the_client_side_throttle_learns_from_shed_503s_as_from_plain_ones() {
    bounded(async {
        let mut seen = Vec::new();
        for fault in [shed503(), Fault::status(503)] {
            let server = FaultServer::start().await;
            server.set_default(fault);
            let throttle = steadfast::limit::ThrottleLayer::builder()
                .seed(42)
                .build()
                .unwrap();
            let client = throttle.layer(support::http_client());
            let mut refused = 0;
            for _ in 0..300 {
                match call(&client, get(&server.url("/"))).await {
                    Ok((503, _)) => {}
                    Err(e) if e.is::<Throttled>() => refused += 1,
                    other => panic!("{other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen.push((refused, server.hits(), throttle.counts()));
        }
        assert_eq!(
            seen[0], seen[1],
            "(refused, sent, counts) shed vs plain: {seen:?}"
        );
        assert!(seen[0].0 > 0, "the throttle never refused: {seen:?}");
    })
    .await;
}

/// Promise: retry is decided by status as before — gRPC A6's retry throttling included
/// (`grpc_throttling`: "every failed attempt drains by one" — A6 counts an attempt that
/// failed with a retryable status). A trailers-only UNAVAILABLE that carries the marker must
/// drain the bucket as the same UNAVAILABLE without it does, or a client keeps retrying a
/// server that sheds (the case throttling exists for).
#[tokio::test(start_paused = true)]
async fn grpc_retry_throttling_drains_on_shed_unavailable_as_on_plain() {
    bounded(async {
        let mut seen = Vec::new();
        for marked in [false, true] {
            let head: &'static [(&'static str, &'static str)] = if marked {
                &[("grpc-status", "14"), (MARK, "true")]
            } else {
                &[("grpc-status", "14")]
            };
            let hits = Arc::new(AtomicUsize::new(0));
            let h = hits.clone();
            let addr = serve_fn(move |_r| {
                h.fetch_add(1, Ordering::SeqCst);
                async move {
                    let mut b = Response::builder().header("content-type", "application/grpc");
                    for (n, v) in head {
                        b = b.header(*n, *v);
                    }
                    b.body(full(b"")).unwrap()
                }
            })
            .await;
            let layer = RetryLayer::builder()
                .retry_grpc_statuses(true)
                .budget(None)
                .grpc_throttling(Some(ThrottleConfig {
                    max_tokens: 10,
                    token_ratio: 0.1,
                }))
                .seed(1)
                .build()
                .unwrap();
            let client = layer.layer(h2_transport());
            for _ in 0..10 {
                call(&client, grpc_post(addr)).await.unwrap();
            }
            seen.push((marked, hits.load(Ordering::SeqCst), layer.throttle_tokens()));
        }
        assert_eq!(
            (seen[0].1, seen[0].2),
            (seen[1].1, seen[1].2),
            "(marked, attempts sent, tokens left): {seen:?}"
        );
    })
    .await;
}

/// Promise (retry `RetryPredicate`): "Some(true): retry, whatever the method, an outcome
/// that is a failure or retryable (a 500, ...)"; and retry is decided by status as before.
/// A predicate that retries 500s retries a 500 whether or not it carries the marker.
#[tokio::test(start_paused = true)]
async fn a_predicate_that_retries_500s_retries_a_marked_500_too() {
    bounded(async {
        let mut hits = Vec::new();
        for fault in [Fault::status(500), answer(500, &[(MARK, "true")])] {
            let server = FaultServer::start().await;
            server.set_default(fault);
            let layer = RetryLayer::builder()
                .budget(None)
                .predicate(|_, _| Some(true))
                .build()
                .unwrap();
            let client = layer.layer(transport());
            call(&client, get(&server.url("/"))).await.unwrap();
            hits.push(server.hits());
        }
        assert_eq!(hits, [3, 3], "attempts for (plain 500, marked 500)");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Breaker: half-open under concurrency while the upstream sheds.

fn half_open_stack(probes: u32, wait: Option<Duration>) -> steadfast::client::HttpClientLayer {
    steadfast::client::http()
        .retry(|r| r.max_attempts(1))
        .breaker(|b| {
            b.consecutive_failures(Some(1))
                .open_time(Duration::from_secs(1))
                .jitter_percent(0)
                .half_open_probes(probes)
                .max_half_open_wait(wait)
        })
        .build()
        .unwrap()
}

/// Promise (breaker lib.rs): half-open admits exactly N probes; a shed probe hands its permit
/// to the next call. Waves of 10 concurrent calls against an upstream that holds and then
/// sheds: never more than N at the upstream at once, exactly N admitted per wave, the rest
/// refused; no permit lost (once the upstream answers 200, N calls close the breaker); no hang.
#[tokio::test(start_paused = true)]
async fn half_open_probes_never_exceed_n_and_no_permit_is_lost_under_shedding() {
    bounded(async {
        let (up, addr) = start_up().await;
        let url = format!("http://{addr}/");
        let stack = half_open_stack(2, Some(Duration::from_secs(3600)));
        let handle = breaker_of(&stack, addr);
        let client = stack.layer(transport());
        up.set(FAIL);
        call(&client, get(&url)).await.unwrap();
        assert_eq!(handle.state(), BreakerState::Open);
        up.set(SHED_HELD);
        tokio::time::sleep(Duration::from_secs(2)).await;
        for wave in 0..6 {
            let calls: Vec<_> = (0..10)
                .map(|_| {
                    let c = client.clone();
                    let u = url.clone();
                    tokio::spawn(async move { call(&c, get(&u)).await })
                })
                .collect();
            assert!(
                until(
                    || up.in_flight() == 2 && calls.iter().filter(|c| c.is_finished()).count() == 8
                )
                .await,
                "wave {wave}: in flight {}, finished {}",
                up.in_flight(),
                calls.iter().filter(|c| c.is_finished()).count()
            );
            up.gate.add_permits(2);
            let mut shed = 0;
            let mut refused = 0;
            for c in calls {
                match c.await.unwrap() {
                    Ok((503, h)) if h.contains_key(MARK) => shed += 1,
                    Err(e) if is_open(&e) => refused += 1,
                    other => panic!("wave {wave}: {other:?}"),
                }
            }
            assert_eq!((shed, refused), (2, 8), "wave {wave}");
            assert_eq!(handle.state(), BreakerState::HalfOpen, "wave {wave}");
            assert!(up.max_in_flight.load(Ordering::SeqCst) <= 2, "wave {wave}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        up.set(OK);
        for i in 0..2 {
            let r = call(&client, get(&url)).await;
            assert!(matches!(r, Ok((200, _))), "probe {i} after shedding: {r:?}");
        }
        assert_eq!(handle.state(), BreakerState::Closed, "a permit was lost");
    })
    .await;
}

/// Promise (breaker lib.rs + README): a shed answer counts neither as failure nor success;
/// a shed half-open probe hands its permit to the next call. So an upstream that only sheds
/// must never make a half-open breaker re-open: it stays half-open, and closes at the first
/// 200. Here the upstream sheds promptly for a little longer than the open time (1 s), then
/// one probe is in flight when a second call arrives.
#[tokio::test(start_paused = true)]
async fn an_upstream_that_only_sheds_never_reopens_a_half_open_breaker() {
    bounded(async {
        let (up, addr) = start_up().await;
        let url = format!("http://{addr}/");
        let stack = half_open_stack(1, None);
        let handle = breaker_of(&stack, addr);
        let client = stack.layer(transport());
        up.set(FAIL);
        call(&client, get(&url)).await.unwrap();
        assert_eq!(handle.state(), BreakerState::Open);
        tokio::time::sleep(Duration::from_secs(1)).await;
        up.set(SHED);
        for i in 0..4 {
            let r = call(&client, get(&url)).await;
            assert!(matches!(r, Ok((503, _))), "shed probe {i}: {r:?}");
            assert_eq!(handle.state(), BreakerState::HalfOpen);
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        // 1.6 s after half-opening: one probe in flight, a second call arrives.
        up.set(SHED_HELD);
        let c = client.clone();
        let u = url.clone();
        let probe = tokio::spawn(async move { call(&c, get(&u)).await });
        assert!(until(|| up.in_flight() == 1).await);
        let second = call(&client, get(&url)).await;
        assert!(
            matches!(&second, Err(e) if is_open(e)),
            "one probe only: {second:?}"
        );
        let state = handle.state();
        let reason = handle.trip_reason();
        up.gate.add_permits(1);
        let r = probe.await.unwrap();
        assert!(matches!(r, Ok((503, _))), "{r:?}");
        assert_eq!(
            state,
            BreakerState::HalfOpen,
            "a shedding upstream re-opened the half-open breaker (reason {reason:?})"
        );
        up.set(OK);
        let r = call(&client, get(&url)).await;
        assert!(
            matches!(r, Ok((200, _))),
            "the next call after shedding: {r:?}"
        );
        assert_eq!(handle.state(), BreakerState::Closed);
    })
    .await;
}

/// Promise (README: "counted neither way"): a shed answer is not a success either, so it does
/// not reset the consecutive-failure count: four failures, ten shed answers, one failure trip
/// a breaker of five; four failures and ten shed answers leave it closed.
#[tokio::test(start_paused = true)]
async fn a_shed_answer_neither_resets_nor_adds_to_the_consecutive_failure_count() {
    bounded(async {
        for last_failure in [false, true] {
            let server = FaultServer::start().await;
            let mut script = vec![Fault::status(500); 4];
            script.extend(std::iter::repeat_n(shed503(), 10));
            if last_failure {
                script.push(Fault::status(500));
            }
            let n = script.len();
            server.script(script);
            let stack = one_attempt_stack(5);
            let client = stack.layer(transport());
            for _ in 0..n {
                call(&client, get(&server.url("/"))).await.unwrap();
            }
            let want = if last_failure {
                BreakerState::Open
            } else {
                BreakerState::Closed
            };
            assert_eq!(
                breaker_of(&stack, server.addr()).state(),
                want,
                "last failure {last_failure}"
            );
        }
    })
    .await;
}

/// Promise: the client stack's per-authority breakers count shed answers neither way, for
/// every host: 16 hosts that shed every call (GETs, retried by status) leave all 16 breakers
/// closed; one host turning broken (plain 503) opens its breaker alone.
#[tokio::test(start_paused = true)]
async fn per_authority_breakers_stay_closed_for_many_shedding_hosts() {
    bounded(async {
        let mut hosts = Vec::new();
        for _ in 0..16 {
            let s = FaultServer::start().await;
            s.set_default(shed503());
            hosts.push(s);
        }
        let stack = steadfast::client::http().build().unwrap();
        let client = stack.layer(transport());
        for _ in 0..4 {
            for h in &hosts {
                let (s, hd) = call(&client, get(&h.url("/"))).await.unwrap();
                assert_eq!((s, hd.contains_key(MARK)), (503, true));
            }
        }
        assert_eq!(stack.breakers().len(), 16);
        for h in &hosts {
            assert_eq!(breaker_of(&stack, h.addr()).state(), BreakerState::Closed);
        }
        hosts[7].set_default(Fault::status(503));
        for _ in 0..3 {
            let _ = call(&client, get(&hosts[7].url("/"))).await;
        }
        for (i, h) in hosts.iter().enumerate() {
            let want = if i == 7 {
                BreakerState::Open
            } else {
                BreakerState::Closed
            };
            assert_eq!(breaker_of(&stack, h.addr()).state(), want, "host {i}");
        }
    })
    .await;
}

/// Promise (breaker docs + docs/observability.md): the answering breaker on a server in front
/// of the answering limit sees the limit's shed answers and counts them neither way: it stays
/// closed while the limit sheds every extra call.
#[tokio::test(start_paused = true)]
async fn a_server_breaker_in_front_of_an_answering_limit_stays_closed() {
    bounded(async {
        let limit = ConcurrencyLimitLayer::new(1);
        let breaker = CircuitBreakerLayer::builder()
            .consecutive_failures(Some(1))
            .build()
            .unwrap();
        let gate = Arc::new(Semaphore::new(0));
        let g = gate.clone();
        let app = axum::Router::new()
            .route(
                "/",
                axum::routing::get(move || {
                    let g = g.clone();
                    async move {
                        g.acquire().await.unwrap().forget();
                        "ok"
                    }
                }),
            )
            .layer(limit.answering())
            .layer(breaker.answering());
        let addr = support::serve_axum(app).await;
        let client = support::http_client();
        let c = client.clone();
        let held = tokio::spawn(c.request(support::get(addr, "/")));
        assert!(until(|| limit.in_flight() == 1).await);
        for _ in 0..5 {
            let res = client.request(support::get(addr, "/")).await.unwrap();
            assert_eq!(res.status(), 503);
            assert_eq!(res.headers()[MARK], "true");
        }
        assert_eq!(breaker.handle().state(), BreakerState::Closed);
        gate.add_permits(1);
        assert_eq!(held.await.unwrap().unwrap().status(), 200);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Balancer.

fn balanced(eps: &[&FaultServer], pick: Pick) -> steadfast::client::HttpClientLayer {
    steadfast::client::http()
        .retry(|r| r.max_attempts(1))
        .balance(|b| {
            b.endpoints(eps.iter().map(|s| s.addr().to_string()))
                .pick(pick)
                .seed(11)
        })
        .build()
        .unwrap()
}

/// POSTs `n` calls 100 ms apart through `stack` to the service; every call must complete
/// with an answer, and no endpoint may ever be ejected.
async fn drive(stack: &steadfast::client::HttpClientLayer, n: usize) {
    let client = stack.layer(transport());
    for i in 0..n {
        let r = call(&client, req(Method::POST, "http://orders/x")).await;
        assert!(r.is_ok(), "call {i}: {:?}", r.err());
        let ejected: Vec<_> = stack
            .endpoints()
            .list()
            .into_iter()
            .filter(|e| e.ejected)
            .map(|e| e.authority.to_string())
            .collect();
        assert!(
            ejected.is_empty(),
            "call {i}: ejected for shedding: {ejected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The shortest gap between two calls one endpoint received.
fn min_gap(s: &FaultServer) -> Option<Duration> {
    let at: Vec<Instant> = s.received().iter().map(|r| r.at).collect();
    at.windows(2).map(|w| w[1] - w[0]).min()
}

/// Promise (balance lib.rs, README): "An answer the endpoint marked as shed costs it the next
/// choices for the failure penalty (2 s)" — "for 2 s it loses every choice against an
/// endpoint that has not failed" — "but no outlier rule counts it". With either pick (the
/// docs state the penalty for the balancer as a whole): one of three endpoints always sheds;
/// every call completes, it is never ejected, and no two calls reach it less than 2 s apart
/// (the others are fresh).
#[tokio::test(start_paused = true)]
async fn balancer_a_shedding_endpoint_loses_choices_for_the_penalty_and_is_never_ejected() {
    for pick in [Pick::PowerOfTwoChoices, Pick::RoundRobin] {
        bounded(async {
            let (a, b, c) = (
                FaultServer::start().await,
                FaultServer::start().await,
                FaultServer::start().await,
            );
            a.set_default(shed503());
            let stack = balanced(&[&a, &b, &c], pick);
            drive(&stack, 100).await;
            assert!(a.hits() > 0, "{pick:?}: never tried");
            let gap = min_gap(&a);
            assert!(
                gap.is_none_or(|g| g >= Duration::from_secs(2)),
                "{pick:?}: penalty not honoured: {gap:?} between two calls to the shedding endpoint ({} hits)",
                a.hits()
            );
            assert_eq!(breaker_of(&stack, a.addr()).state(), BreakerState::Closed);
        })
        .await;
    }
}

/// Promise: with one, several or all endpoints shedding, calls still complete (each with an
/// answer, never `NoEndpoint`), GETs retried by status; no endpoint is ejected; each
/// endpoint's breaker stays closed.
#[tokio::test(start_paused = true)]
async fn balancer_with_all_or_one_endpoint_shedding_completes_and_ejects_none() {
    bounded(async {
        for (n, shedding) in [(1usize, 1usize), (3, 2), (3, 3), (5, 5)] {
            let mut eps = Vec::new();
            for i in 0..n {
                let s = FaultServer::start().await;
                if i < shedding {
                    s.set_default(shed503());
                }
                eps.push(s);
            }
            let stack = steadfast::client::http()
                .balance(|b| {
                    b.endpoints(eps.iter().map(|s| s.addr().to_string()))
                        .pick(Pick::RoundRobin)
                        .seed(2)
                })
                .build()
                .unwrap();
            let client = stack.layer(transport());
            for i in 0..60 {
                let r = call(&client, get("http://orders/x")).await;
                let (status, _) = r.unwrap_or_else(|e| panic!("{n}/{shedding}: call {i}: {e}"));
                if shedding < n {
                    assert_eq!(
                        status, 200,
                        "{n}/{shedding}: call {i}: a retry should find a healthy endpoint"
                    );
                } else {
                    assert!(status == 503 || status == 200, "{status}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(stack.endpoints().ejected(), 0, "{n}/{shedding}");
            for s in &eps {
                assert_eq!(
                    breaker_of(&stack, s.addr()).state(),
                    BreakerState::Closed,
                    "{n}/{shedding}"
                );
            }
        }
    })
    .await;
}

/// Promise (balance lib.rs): "no outlier rule counts it": the success-rate and
/// failure-percentage rules (5 endpoints, round-robin, no penalty, over three 10 s intervals
/// with 100 calls per endpoint each) never eject an endpoint that sheds every call. With
/// `honour_overloaded(false)` they do (the same calls are failures then).
#[tokio::test(start_paused = true)]
async fn outlier_rate_rules_never_eject_a_shedding_endpoint() {
    bounded(async {
        for honour in [true, false] {
            let mut eps = Vec::new();
            for _ in 0..5 {
                eps.push(FaultServer::start().await);
            }
            eps[2].set_default(shed503());
            let stack = steadfast::client::http()
                .balance(|b| {
                    b.endpoints(eps.iter().map(|s| s.addr().to_string()))
                        .pick(Pick::RoundRobin)
                        .failure_penalty(Duration::ZERO)
                        .consecutive_failures(None)
                        .seed(8)
                })
                .classifier(DefaultClassifier::new().honour_overloaded(honour))
                .retry(|r| r.max_attempts(1))
                .breaker(|b| b.consecutive_failures(Some(1_000_000)))
                .build()
                .unwrap();
            let client = stack.layer(transport());
            let mut ejected_at = None;
            for i in 0..1500 {
                call(&client, req(Method::POST, "http://orders/x"))
                    .await
                    .unwrap();
                if ejected_at.is_none() && stack.endpoints().list().iter().any(|e| e.ejected) {
                    ejected_at = Some(i);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if honour {
                assert_eq!(
                    ejected_at, None,
                    "a shedding endpoint was ejected by a rate rule"
                );
            } else {
                assert!(
                    ejected_at.is_some(),
                    "strict: the rate rules never ejected it (test too weak)"
                );
            }
        }
    })
    .await;
}

/// Promise (classify.rs, ClientBuilder::classifier): `honour_overloaded(false)` through
/// `ClientBuilder::classifier` turns shed answers back into failures for breaker AND
/// balancer: the shedding endpoint's breaker opens or the endpoint is ejected; with the
/// default classifier neither happens.
#[tokio::test(start_paused = true)]
async fn honour_overloaded_false_through_the_client_builder_counts_shed_answers() {
    bounded(async {
        for honour in [true, false] {
            let (a, b) = (FaultServer::start().await, FaultServer::start().await);
            a.set_default(shed503());
            let stack = steadfast::client::http()
                .balance(|bb| {
                    bb.endpoints([a.addr().to_string(), b.addr().to_string()])
                        .pick(Pick::RoundRobin)
                        .failure_penalty(Duration::ZERO)
                        .seed(4)
                })
                .classifier(DefaultClassifier::new().honour_overloaded(honour))
                .retry(|r| r.max_attempts(1))
                .build()
                .unwrap();
            let client = stack.layer(transport());
            for _ in 0..20 {
                let _ = call(&client, req(Method::POST, "http://orders/x")).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let ejected = stack
                .endpoints()
                .list()
                .iter()
                .any(|e| e.ejected || e.ejections > 0);
            let open = breaker_of(&stack, a.addr()).state() != BreakerState::Closed;
            if honour {
                assert!(
                    !ejected && !open,
                    "honoured: ejected {ejected}, open {open}"
                );
            } else {
                assert!(
                    ejected || open,
                    "strict: shed answers not counted as failures"
                );
                assert!(open, "strict: the endpoint's breaker should open");
            }
        }
        // Plain client stack (no balancer) too.
        let server = FaultServer::start().await;
        server.set_default(shed503());
        let stack = steadfast::client::http()
            .classifier(DefaultClassifier::new().honour_overloaded(false))
            .retry(|r| r.max_attempts(1))
            .build()
            .unwrap();
        let client = stack.layer(transport());
        for _ in 0..5 {
            call(&client, get(&server.url("/"))).await.unwrap();
        }
        assert_eq!(
            breaker_of(&stack, server.addr()).state(),
            BreakerState::Open
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A gateway.

/// Promise (src/errors.rs): a gateway whose client-side limit refuses (`LimitExceeded`,
/// `Failure::Rejected`) answers with `errors::http_response`: 503 + the marker; its downstream
/// caller's breaker (the client stack's) stays closed however many it gets, and its POSTs
/// reach the gateway once each. `Throttled::to_http_response` carries the marker and
/// `Retry-After: 1` too.
#[tokio::test(start_paused = true)]
async fn a_gateway_maps_its_limits_refusal_to_a_marked_503_and_downstream_stays_closed() {
    bounded(async {
        // Upstream: holds every call until the gate opens.
        let gate = Arc::new(Semaphore::new(0));
        let up_hits = Arc::new(AtomicUsize::new(0));
        let (g, h) = (gate.clone(), up_hits.clone());
        let up = support::serve_axum(axum::Router::new().route(
            "/",
            axum::routing::any(move || {
                let (g, h) = (g.clone(), h.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    g.acquire().await.unwrap().forget();
                    "ok"
                }
            }),
        ))
        .await;
        // Gateway: client stack over a client-side limit of 1.
        let limit = ConcurrencyLimitLayer::new(1);
        let gw_stack = steadfast::client::http()
            .retry(|r| r.max_attempts(1))
            .build()
            .unwrap();
        let gw_client = gw_stack.layer(limit.layer(transport()));
        let gw_hits = Arc::new(AtomicUsize::new(0));
        let gh = gw_hits.clone();
        let gw = support::serve_axum(
            axum::Router::new()
                .route(
                    "/",
                    axum::routing::any(move || {
                        let c = gw_client.clone();
                        let gh = gh.clone();
                        async move {
                            gh.fetch_add(1, Ordering::SeqCst);
                            match c.oneshot(get(&format!("http://{up}/"))).await {
                                Ok(res) => {
                                    let (p, b) = res.into_parts();
                                    Response::from_parts(p, axum::body::Body::new(b))
                                }
                                Err(e) => steadfast::errors::http_response::<axum::body::Body>(&*e)
                                    .map(axum::body::Body::new),
                            }
                        }
                    }),
                )
                .route(
                    "/throttled",
                    axum::routing::get(|| async {
                        Throttled::new(0.5)
                            .to_http_response::<axum::body::Body>()
                            .map(axum::body::Body::new)
                    }),
                ),
        )
        .await;
        let down = steadfast::client::http().build().unwrap();
        let client = down.layer(transport());
        let url = format!("http://{gw}/");
        let (c, u) = (client.clone(), url.clone());
        let held = tokio::spawn(async move { call(&c, get(&u)).await });
        assert!(until(|| up_hits.load(Ordering::SeqCst) == 1).await);
        for i in 0..12 {
            let r = if i % 2 == 0 {
                req(Method::POST, &url)
            } else {
                get(&url)
            };
            let before = gw_hits.load(Ordering::SeqCst);
            let (s, h) = call(&client, r).await.unwrap();
            assert_eq!(
                (s, h.get(MARK).map(|v| v.to_str().unwrap().to_owned())),
                (503, Some("true".into())),
                "call {i}"
            );
            let arrived = gw_hits.load(Ordering::SeqCst) - before;
            if i % 2 == 0 {
                assert_eq!(
                    arrived, 1,
                    "call {i}: a POST reached the gateway {arrived} times"
                );
            }
        }
        assert_eq!(
            up_hits.load(Ordering::SeqCst),
            1,
            "refused calls reached the upstream"
        );
        assert_eq!(breaker_of(&down, gw).state(), BreakerState::Closed);
        assert_eq!(breaker_of(&gw_stack, up).state(), BreakerState::Closed);
        // The throttle's answer.
        let (s, h) = call(&client, get(&format!("http://{gw}/throttled")))
            .await
            .unwrap();
        assert_eq!(
            (s, &h[MARK], &h["retry-after"]),
            (
                503,
                &HeaderValue::from_static("true"),
                &HeaderValue::from_static("1")
            )
        );
        assert_eq!(breaker_of(&down, gw).state(), BreakerState::Closed);
        gate.add_permits(1);
        assert_eq!(held.await.unwrap().unwrap().0, 200);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Hedging.

/// Promise (HedgeBuilder docs): a retryable answer sends the next hedge at once, and
/// `Retry-After` delays it; the hedge goes to an endpoint its call has not used. A shed 503
/// with `Retry-After: 1` from one endpoint: the hedge reaches the other endpoint no sooner
/// than 1 s later and answers 200; never more than one attempt per endpoint.
#[tokio::test(start_paused = true)]
async fn a_hedge_after_a_shed_answer_waits_retry_after_and_goes_elsewhere() {
    bounded(async {
        let (a, b) = (FaultServer::start().await, FaultServer::start().await);
        let balance = BalanceLayer::builder()
            .endpoints([a.addr().to_string(), b.addr().to_string()])
            .pick(Pick::RoundRobin)
            .seed(23)
            .build()
            .unwrap();
        let client = ServiceBuilder::new()
            .layer(
                HedgeLayer::builder()
                    .delay(HedgeDelay::Fixed(Duration::from_millis(50)))
                    .max_extra_load(1.0)
                    .build()
                    .unwrap(),
            )
            .layer(balance)
            .service(transport());
        let tagged = |i: usize| {
            let mut r = get("http://orders/x");
            r.headers_mut()
                .insert("x-call", i.to_string().parse().unwrap());
            r
        };
        for i in 0..4 {
            call(&client, tagged(1000 + i)).await.unwrap();
        }
        a.set_default(answer(503, &[(MARK, "true"), ("retry-after", "1")]));
        let mut via_a = 0;
        for i in 0..10 {
            let (s, _) = call(&client, tagged(i)).await.unwrap();
            assert_eq!(s, 200, "call {i}");
            let on = |s: &FaultServer| -> Vec<Instant> {
                s.received()
                    .iter()
                    .filter(|r| r.headers["x-call"] == i.to_string().as_str())
                    .map(|r| r.at)
                    .collect()
            };
            let (ta, tb) = (on(&a), on(&b));
            assert!(ta.len() <= 1 && tb.len() == 1, "call {i}: {ta:?} {tb:?}");
            if let Some(t) = ta.first() {
                via_a += 1;
                assert!(
                    tb[0] - *t >= Duration::from_secs(1),
                    "call {i}: hedge {:?} after the shed answer",
                    tb[0] - *t
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(via_a > 0, "no call started on the shedding endpoint");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Metrics.

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<BTreeMap<String, f64>>>);

impl Seen {
    fn sum(&self, prefix: &str, contains: &str) -> f64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && k.contains(contains))
            .map(|(_, v)| *v)
            .sum()
    }
}

struct MHandle {
    key: String,
    seen: Seen,
}

impl metrics::CounterFn for MHandle {
    fn increment(&self, value: u64) {
        *self
            .seen
            .0
            .lock()
            .unwrap()
            .entry(self.key.clone())
            .or_default() += value as f64;
    }
    fn absolute(&self, _: u64) {}
}

impl metrics::HistogramFn for MHandle {
    fn record(&self, _: f64) {
        *self
            .seen
            .0
            .lock()
            .unwrap()
            .entry(self.key.clone())
            .or_default() += 1.0;
    }
}

impl metrics::GaugeFn for MHandle {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.seen.0.lock().unwrap().insert(self.key.clone(), value);
    }
}

struct Rec(Seen);

impl Rec {
    fn handle(&self, key: &metrics::Key) -> Arc<MHandle> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        Arc::new(MHandle {
            key: format!("{}{{{}}}", key.name(), labels.join(",")),
            seen: self.0.clone(),
        })
    }
}

impl metrics::Recorder for Rec {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(self.handle(key))
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(self.handle(key))
    }
}

fn recorded<F: Future<Output = ()>>(f: impl FnOnce() -> F) -> Seen {
    let seen = Seen::default();
    let rec = Rec(seen.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&rec, || rt.block_on(bounded(f())));
    seen
}

/// Promise (breaker lib.rs, docs/observability.md): through the client stack over real
/// sockets, each shed answer (each attempt of a retried GET, each balanced POST) is timed
/// under `outcome=shed` on `steadfast_breaker_call_duration_seconds`, none under `failure`
/// or `success`; no breaker transition is recorded and the balancer ejects nothing.
#[test]
fn metrics_time_shed_answers_under_outcome_shed_and_record_no_failure_or_transition() {
    let seen = recorded(|| async {
        let server = FaultServer::start().await;
        server.set_default(shed503());
        let stack = steadfast::client::http()
            .name("shedtest")
            .retry(|r| r.max_attempts(2))
            .breaker(|b| b.consecutive_failures(Some(1)))
            .build()
            .unwrap();
        let client = stack.layer(transport());
        for _ in 0..5 {
            let (s, _) = call(&client, get(&server.url("/"))).await.unwrap();
            assert_eq!(s, 503);
        }
        // Balanced: two shedding endpoints.
        let (a, b) = (FaultServer::start().await, FaultServer::start().await);
        a.set_default(shed503());
        b.set_default(shed503());
        let bal = steadfast::client::http()
            .name("shedbal")
            .retry(|r| r.max_attempts(1))
            .balance(|bb| {
                bb.endpoints([a.addr().to_string(), b.addr().to_string()])
                    .pick(Pick::RoundRobin)
                    .seed(9)
            })
            .build()
            .unwrap();
        let bclient = bal.layer(transport());
        for _ in 0..12 {
            call(&bclient, req(Method::POST, "http://orders/x"))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let hist = "steadfast_breaker_call_duration_seconds{breaker=shedtest";
    assert_eq!(
        seen.sum(hist, "outcome=shed"),
        10.0,
        "{:?}",
        seen.0.lock().unwrap()
    );
    assert_eq!(seen.sum(hist, "outcome=failure"), 0.0);
    assert_eq!(seen.sum(hist, "outcome=success"), 0.0);
    let bhist = "steadfast_breaker_call_duration_seconds{breaker=shedbal";
    assert_eq!(seen.sum(bhist, "outcome=shed"), 12.0);
    assert_eq!(seen.sum(bhist, "outcome=failure"), 0.0);
    assert_eq!(seen.sum("steadfast_breaker_transitions_total", ""), 0.0);
    assert_eq!(seen.sum("steadfast_balance_ejections_total", ""), 0.0);
}
