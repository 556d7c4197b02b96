//! Hostile pass on the server side and the gRPC paths: the server preset's deadline and
//! correlation id over real hyper / tonic transports, the gRPC client preset against a
//! scripted gRPC server, and the answering limit / breaker.
#![cfg(feature = "tonic")]
#![allow(clippy::type_complexity)]

mod support;

use support::serve;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use steadfast::common::{BoxError, Deadline};
use steadfast::correlation::CorrelationId;
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::{Layer, ServiceExt};

const GUARD: Duration = Duration::from_secs(600);

type RespBody = BoxBody<Bytes, BoxError>;

// ---------------------------------------------------------------------------------------
// Transport helpers
// ---------------------------------------------------------------------------------------

fn grpc_frame() -> Bytes {
    // HealthCheckResponse { status: SERVING }
    Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x01])
}

fn trailers(code: i32) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", code.to_string().parse().unwrap());
    t
}

fn grpc_head() -> http::response::Builder {
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
}

/// What the scripted gRPC server answers.
#[derive(Clone, Debug)]
enum Reply {
    /// Trailers-only status with these pushback values.
    Status(i32, Vec<&'static str>),
    /// Head, `n` messages, then trailers with `code`.
    MsgsThen(usize, i32),
    /// Head, `n` messages, then the stream stays open.
    MsgsThenHang(usize),
    /// Head, `n` messages, then the body errors (the stream is reset).
    MsgsThenReset(usize),
    /// Never answers.
    Hang,
}

#[derive(Clone, Debug)]
struct Hit {
    at: Instant,
    headers: HeaderMap,
}

type Hits = Arc<Mutex<Vec<Hit>>>;

fn body_of(frames: Vec<Result<Frame<Bytes>, BoxError>>, hang: bool) -> RespBody {
    let s = futures_util::stream::iter(frames);
    if hang {
        BodyExt::boxed(StreamBody::new(futures_util::StreamExt::chain(
            s,
            futures_util::stream::pending(),
        )))
    } else {
        BodyExt::boxed(StreamBody::new(s))
    }
}

fn reply_to(r: Reply) -> Option<Response<RespBody>> {
    Some(match r {
        Reply::Status(code, pushback) => {
            let mut b = grpc_head().header("grpc-status", code.to_string());
            for p in pushback {
                b = b.header("grpc-retry-pushback-ms", p);
            }
            b.body(body_of(vec![], false)).unwrap()
        }
        Reply::MsgsThen(n, code) => {
            let mut f: Vec<Result<Frame<Bytes>, BoxError>> =
                (0..n).map(|_| Ok(Frame::data(grpc_frame()))).collect();
            f.push(Ok(Frame::trailers(trailers(code))));
            grpc_head().body(body_of(f, false)).unwrap()
        }
        Reply::MsgsThenHang(n) => {
            let f = (0..n).map(|_| Ok(Frame::data(grpc_frame()))).collect();
            grpc_head().body(body_of(f, true)).unwrap()
        }
        Reply::MsgsThenReset(n) => {
            let mut f: Vec<Result<Frame<Bytes>, BoxError>> =
                (0..n).map(|_| Ok(Frame::data(grpc_frame()))).collect();
            f.push(Err("boom".into()));
            grpc_head().body(body_of(f, false)).unwrap()
        }
        Reply::Hang => return None,
    })
}

/// A scripted gRPC upstream: call `n` (0-based) gets `script(n)`. Records every request.
async fn fake_grpc(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> (SocketAddr, Hits) {
    let hits: Hits = Arc::default();
    let h = hits.clone();
    let script = Arc::new(script);
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let hits = h.clone();
        let script = script.clone();
        async move {
            let n = {
                let mut v = hits.lock().unwrap();
                v.push(Hit {
                    at: Instant::now(),
                    headers: req.headers().clone(),
                });
                v.len() - 1
            };
            // Drain the request body so the stream is complete.
            let _ = req.into_body().collect().await;
            match reply_to(script(n)) {
                Some(r) => Ok::<_, Infallible>(r),
                None => {
                    std::future::pending::<()>().await;
                    unreachable!()
                }
            }
        }
    });
    (serve(svc).await, hits)
}

async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn check() -> HealthCheckRequest {
    HealthCheckRequest {
        service: String::new(),
    }
}

fn grpc_client(
    addr_channel: tonic::transport::Channel,
    b: steadfast::client::GrpcClientBuilder,
) -> (
    HealthClient<steadfast::client::GrpcClient<tonic::transport::Channel>>,
    steadfast::client::GrpcClientLayer,
) {
    let layer = b.build().unwrap();
    (HealthClient::new(layer.layer(addr_channel)), layer)
}

/// A raw HTTP/2 gRPC call (hyper, no tonic: tonic's Channel enforces `grpc-timeout` itself
/// on the client side). Returns the grpc-status (head or trailers) and the response headers.
async fn raw_grpc(addr: SocketAddr, headers: &[(&str, &str)]) -> (Option<i32>, HeaderMap) {
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    raw_grpc_with(&client, addr, headers).await
}

async fn raw_grpc_with(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> (Option<i32>, HeaderMap) {
    let mut req = Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    for (n, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            http::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
        );
    }
    let res = client.request(req).await.unwrap();
    let head = res.headers().clone();
    if let Some(v) = head.get("grpc-status") {
        return (v.to_str().ok().and_then(|s| s.parse().ok()), head);
    }
    let collected = res.into_body().collect().await;
    let code = collected.ok().and_then(|c| {
        c.trailers()
            .and_then(|t| t.get("grpc-status").cloned())
            .and_then(|v| v.to_str().ok().and_then(|s| s.parse().ok()))
    });
    (code, head)
}

/// Parses a grpc-timeout value (as sent by the stack) into a duration.
fn parse_grpc_timeout(v: &str) -> Duration {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().unwrap();
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("bad unit {v}"),
    }
}

// ---------------------------------------------------------------------------------------
// 1. The gRPC server preset's inbound deadline, every unit and hostile form, over tonic.
// ---------------------------------------------------------------------------------------

type Seen = Arc<Mutex<Vec<(Option<Duration>, Option<String>)>>>;

/// A server preset over a handler that records what is ambient at its first poll, then
/// hangs forever.
async fn hanging_grpc_server(limit: Duration) -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let handler = tower::service_fn(move |_req: Request<Incoming>| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push((
                Deadline::current().map(|d| d.remaining()),
                CorrelationId::current().map(|i| i.to_string()),
            ));
            std::future::pending::<Result<Response<RespBody>, Infallible>>().await
        }
    });
    let svc = steadfast::server::grpc()
        .timeout(limit)
        .build()
        .unwrap()
        .layer(handler);
    (serve(svc).await, seen)
}

#[tokio::test(start_paused = true)]
async fn grpc_timeout_inbound_every_unit_and_hostile_form_never_widens_the_limit() {
    let (addr, seen) = hanging_grpc_server(Duration::from_secs(3)).await;
    let ms = Duration::from_millis;
    let long = format!("{}S", "9".repeat(4000));
    let cases: Vec<(Vec<&str>, Duration)> = vec![
        (vec![], ms(3000)),
        (vec!["1H"], ms(3000)),
        (vec!["1M"], ms(3000)),
        (vec!["2S"], ms(2000)),
        (vec!["1500m"], ms(1500)),
        (vec!["1500000u"], ms(1500)),
        (vec!["1500000000n"], ms(3000)), // 10 digits: malformed
        (vec!["15000000u"], ms(3000)),   // 15 s, min with 3 s
        (vec!["99999999n"], ms(100)),    // 99.999999 ms
        (vec!["0n"], ms(0)),
        (vec!["0S"], ms(0)),
        (vec!["0H"], ms(0)),
        (vec!["00000001S"], ms(1000)),
        (vec!["99999999H"], ms(3000)),
        (vec!["123456789m"], ms(3000)), // 9 digits: malformed
        (vec!["000000001S"], ms(3000)), // 9 digits: malformed
        (vec!["1"], ms(3000)),
        (vec!["S"], ms(3000)),
        (vec!["1s"], ms(3000)),
        (vec!["1X"], ms(3000)),
        (vec!["-1S"], ms(3000)),
        (vec!["+1S"], ms(3000)),
        (vec![" 1S"], ms(3000)),
        (vec!["1S "], ms(3000)),
        (vec!["1 S"], ms(3000)),
        (vec!["1.5S"], ms(3000)),
        (vec!["0x10S"], ms(3000)),
        (vec![""], ms(3000)),
        (vec![long.as_str()], ms(3000)),
        (vec!["5S", "1S"], ms(1000)),
        (vec!["1S", "5S"], ms(1000)),
        (vec!["abc", "1S"], ms(1000)),
        (vec!["1S", "abc"], ms(1000)),
        (vec!["0n", "5S"], ms(0)),
        (vec!["99999999H", "2S"], ms(2000)),
        (vec!["1S,2S"], ms(3000)),
    ];
    let mut failures = Vec::new();
    for (values, want) in &cases {
        let before = seen.lock().unwrap().len();
        let hs: Vec<(&str, &str)> = values.iter().map(|v| ("grpc-timeout", *v)).collect();
        let start = Instant::now();
        let out = tokio::time::timeout(GUARD, raw_grpc(addr, &hs)).await;
        let took = start.elapsed();
        match out {
            Err(_) => failures.push(format!("{values:?}: hung")),
            Ok((code, _)) => {
                // tokio's timer has millisecond granularity.
                let late_ok = took >= *want && took <= *want + ms(1);
                if code != Some(4) || !late_ok {
                    failures.push(format!(
                        "{values:?}: {code:?} after {took:?}, want DEADLINE_EXCEEDED (4) after {want:?}"
                    ));
                }
            }
        }
        let s = seen.lock().unwrap();
        if s.len() > before {
            let told = s[before].0;
            if told != Some(*want) && *want != ms(100) {
                failures.push(format!("{values:?}: handler told {told:?}, want {want:?}"));
            }
        } else if !want.is_zero() {
            failures.push(format!("{values:?}: handler never ran"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// 2. A handler's outgoing gRPC calls: cut at the inbound deadline, told no more than left.
// ---------------------------------------------------------------------------------------

/// A server preset whose handler waits 250 ms, then calls `upstream` through the gRPC client
/// preset and answers with the status it got (trailers-only).
async fn relay_server(upstream: SocketAddr) -> SocketAddr {
    let (mut client, _layer) = grpc_client(channel(upstream).await, steadfast::client::grpc());
    let _ = &mut client;
    let handler = tower::service_fn(move |_req: Request<Incoming>| {
        let mut client = client.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let code = match client.check(check()).await {
                Ok(_) => 0,
                Err(st) => st.code() as i32,
            };
            Ok::<_, Infallible>(reply_to(Reply::Status(code, vec![])).unwrap())
        }
    });
    serve(steadfast::server::grpc().build().unwrap().layer(handler)).await
}

#[tokio::test(start_paused = true)]
async fn outgoing_grpc_retries_are_told_only_what_is_left_of_the_inbound_deadline() {
    let (up, hits) = fake_grpc(|_| Reply::Status(14, vec!["400"])).await;
    let addr = relay_server(up).await;
    let t0 = Instant::now();
    let (code, _) = tokio::time::timeout(GUARD, raw_grpc(addr, &[("grpc-timeout", "2S")]))
        .await
        .expect("not hung");
    let took = t0.elapsed();
    let hits = hits.lock().unwrap().clone();
    let mut failures = Vec::new();
    for (i, h) in hits.iter().enumerate() {
        let left = Duration::from_secs(2).saturating_sub(h.at - t0);
        match h.headers.get("grpc-timeout") {
            None => failures.push(format!("attempt {i}: no grpc-timeout")),
            Some(v) => {
                let told = parse_grpc_timeout(v.to_str().unwrap());
                if told > left {
                    failures.push(format!(
                        "attempt {i} at {:?}: told {told:?}, only {left:?} left",
                        h.at - t0
                    ));
                }
            }
        }
        if h.at - t0 >= Duration::from_secs(2) {
            failures.push(format!(
                "attempt {i} sent at {:?}, past the deadline",
                h.at - t0
            ));
        }
    }
    assert!(
        hits.len() >= 2,
        "the UNAVAILABLE was retried: {}",
        hits.len()
    );
    assert!(took <= Duration::from_secs(2), "answered after {took:?}");
    assert!(matches!(code, Some(14) | Some(4)), "{code:?}");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(start_paused = true)]
async fn an_outgoing_grpc_call_is_cut_at_the_inbound_deadline() {
    let (up, hits) = fake_grpc(|_| Reply::Hang).await;
    let addr = relay_server(up).await;
    for (value, want) in [("2S", 2000u64), ("1500m", 1500), ("700000u", 700)] {
        let before = hits.lock().unwrap().len();
        let t0 = Instant::now();
        let (code, _) = tokio::time::timeout(GUARD, raw_grpc(addr, &[("grpc-timeout", value)]))
            .await
            .expect("not hung");
        assert_eq!(code, Some(4), "{value}");
        assert_eq!(t0.elapsed(), Duration::from_millis(want), "{value}");
        let h = hits.lock().unwrap()[before].clone();
        let told = parse_grpc_timeout(h.headers["grpc-timeout"].to_str().unwrap());
        assert!(
            told <= Duration::from_millis(want - 250),
            "{value}: upstream told {told:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. Drop glue of a cancelled handler still sees the deadline (and the id).
// ---------------------------------------------------------------------------------------

struct Guard(Arc<Mutex<Vec<(bool, Option<String>)>>>);
impl Drop for Guard {
    fn drop(&mut self) {
        self.0.lock().unwrap().push((
            Deadline::current().is_some(),
            CorrelationId::current().map(|i| i.to_string()),
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_handler_s_drop_glue_sees_its_deadline() {
    let drops: Arc<Mutex<Vec<(bool, Option<String>)>>> = Arc::default();
    let d = drops.clone();
    let handler = tower::service_fn(move |_req: Request<Incoming>| {
        let d = d.clone();
        async move {
            let _g = Guard(d);
            std::future::pending::<Result<Response<RespBody>, Infallible>>().await
        }
    });
    let addr = serve(
        steadfast::server::http()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
            .layer(handler),
    )
    .await;
    // a) the server's deadline ends the handler.
    let mut r = support::get(addr, "/");
    r.headers_mut()
        .insert("x-correlation-id", "drop-1".parse().unwrap());
    r.headers_mut()
        .insert("x-request-timeout-ms", "300".parse().unwrap());
    let res = tokio::time::timeout(GUARD, support::http_client().request(r))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 504);
    // b) the caller goes away (connection closed) before the deadline.
    let mut r = support::get(addr, "/");
    r.headers_mut()
        .insert("x-correlation-id", "drop-2".parse().unwrap());
    let client = support::http_client();
    let _ = tokio::time::timeout(Duration::from_millis(200), client.request(r)).await;
    drop(client);
    for _ in 0..100 {
        if drops.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drops = drops.lock().unwrap().clone();
    assert_eq!(
        drops,
        vec![(true, Some("drop-1".into())), (true, Some("drop-2".into()))]
    );
}

/// The handler's own outgoing call (client::grpc over a tonic Channel) at the inbound deadline:
/// what status does the *handler* get? The stack's errors should reach tonic as the statuses
/// they mean: a timeout is DEADLINE_EXCEEDED (README, "The stacks"). The handler answers
/// before the server's own deadline by giving its call a shorter total timeout.
#[tokio::test(start_paused = true)]
async fn the_handler_s_grpc_call_cut_by_a_deadline_reports_deadline_exceeded() {
    let (up, _hits) = fake_grpc(|_| Reply::Hang).await;
    let mut failures = Vec::new();
    for total in [
        Duration::from_millis(700),
        Duration::from_secs(1),
        Duration::from_millis(1500),
    ] {
        let (client, _l) = grpc_client(
            channel(up).await,
            steadfast::client::grpc().with(|c| c.attempt_timeout(total).total_timeout(total)),
        );
        let mut c = client.clone();
        let t0 = Instant::now();
        let st = tokio::time::timeout(GUARD, c.check(check()))
            .await
            .unwrap()
            .unwrap_err();
        if st.code() != tonic::Code::DeadlineExceeded || t0.elapsed() != total {
            failures.push(format!("total {total:?}: {st:?} after {:?}", t0.elapsed()));
        }
        // Inherited: a Deadline scope (as the server preset makes) shorter than the total.
        let mut c = client.clone();
        let t0 = Instant::now();
        let st = tokio::time::timeout(
            GUARD,
            Deadline::after(total / 2).scope(async move { c.check(check()).await }),
        )
        .await
        .unwrap()
        .unwrap_err();
        if st.code() != tonic::Code::DeadlineExceeded || t0.elapsed() != total / 2 {
            failures.push(format!(
                "inherited {:?}: {st:?} after {:?}",
                total / 2,
                t0.elapsed()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// 4. The correlation id in every outgoing call of a handler, and never in another's.
// ---------------------------------------------------------------------------------------

type Recorded = Arc<Mutex<Vec<(String, Option<String>, Option<String>)>>>; // (tag, id, budget)

/// An HTTP upstream recording `?tag=` with the id and the deadline header it got.
async fn recorder() -> (SocketAddr, Recorded) {
    let rec: Recorded = Arc::default();
    let r = rec.clone();
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let r = r.clone();
        async move {
            let tag = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("tag="))
                .unwrap_or("")
                .to_owned();
            let h = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
            let n_ids = req.headers().get_all("x-correlation-id").iter().count();
            let mut id = h("x-correlation-id");
            if n_ids != 1 {
                id = Some(format!("<{n_ids} ids>"));
            }
            r.lock().unwrap().push((tag, id, h("x-request-timeout-ms")));
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    (serve(svc).await, rec)
}

type Client = steadfast::client::HttpClient<steadfast::client::HyperTransport<Full<Bytes>>>;

async fn call(client: Client, up: SocketAddr, tag: String) -> u16 {
    let req = Request::get(format!("http://{up}/?tag={tag}"))
        .body(Full::default())
        .unwrap();
    let res = client.oneshot(req).await.expect("upstream call");
    let s = res.status().as_u16();
    let _ = res.into_body().collect().await;
    s
}

fn lookup(rec: &Recorded, tag: &str) -> Vec<(Option<String>, Option<String>)> {
    rec.lock()
        .unwrap()
        .iter()
        .filter(|(t, _, _)| t == tag)
        .map(|(_, i, b)| (i.clone(), b.clone()))
        .collect()
}

async fn spawning_app(up: SocketAddr) -> SocketAddr {
    use axum::routing::get;
    let client: Client = steadfast::client::http()
        .build()
        .unwrap()
        .hyper_client::<Full<Bytes>>();
    let c = client.clone();
    let c2 = client.clone();
    let c3 = client.clone();
    let c4 = client.clone();
    let c5 = client.clone();
    let c6 = client.clone();
    let c7 = client.clone();
    let c8 = client.clone();
    let app = axum::Router::new()
        .route(
            "/direct",
            get(move || {
                let c = c.clone();
                async move { call(c, up, "direct".into()).await.to_string() }
            }),
        )
        .route(
            "/correlation-propagate",
            get(move || {
                let c = c2.clone();
                async move {
                    tokio::spawn(CorrelationId::propagate(call(
                        c,
                        up,
                        "correlation-propagate".into(),
                    )))
                    .await
                    .unwrap()
                    .to_string()
                }
            }),
        )
        .route(
            "/steadfast-spawn",
            get(move || {
                let c = c3.clone();
                async move {
                    steadfast::spawn(call(c, up, "steadfast-spawn".into()))
                        .await
                        .unwrap()
                        .to_string()
                }
            }),
        )
        .route(
            "/bare-spawn",
            get(move || {
                let c = c4.clone();
                async move {
                    tokio::spawn(call(c, up, "bare-spawn".into()))
                        .await
                        .unwrap()
                        .to_string()
                }
            }),
        )
        .route(
            "/blocking",
            get(move || {
                let c = c5.clone();
                async move {
                    let fut = steadfast::propagate(call(c, up, "blocking".into()));
                    let handle = tokio::runtime::Handle::current();
                    tokio::task::spawn_blocking(move || handle.block_on(fut))
                        .await
                        .unwrap()
                        .to_string()
                }
            }),
        )
        .route(
            "/joinset",
            get(move || {
                let c = c6.clone();
                async move {
                    let mut set = tokio::task::JoinSet::new();
                    for i in 0..3 {
                        set.spawn(steadfast::propagate(call(
                            c.clone(),
                            up,
                            format!("joinset-{i}"),
                        )));
                    }
                    let mut n = 0;
                    while let Some(r) = set.join_next().await {
                        r.unwrap();
                        n += 1;
                    }
                    n.to_string()
                }
            }),
        )
        .route(
            "/stream",
            get(move || {
                let c = c7.clone();
                async move {
                    // The body makes the call when it is polled, after the handler returned.
                    let s = futures_util::stream::once(async move {
                        let code = call(c, up, "stream".into()).await;
                        Ok::<_, Infallible>(Bytes::from(code.to_string()))
                    });
                    axum::body::Body::from_stream(s)
                }
            }),
        )
        .route(
            "/stream-propagated",
            get(move || {
                let c = c8.clone();
                async move {
                    // The documented tool, applied where the future is made (in the handler).
                    let s = futures_util::stream::once(steadfast::propagate(async move {
                        let code = call(c, up, "stream-propagated".into()).await;
                        Ok::<_, Infallible>(Bytes::from(code.to_string()))
                    }));
                    axum::body::Body::from_stream(s)
                }
            }),
        )
        .layer(steadfast::server::http().build().unwrap());
    serve(app).await
}

#[tokio::test(start_paused = true)]
async fn the_id_reaches_calls_in_spawned_blocking_joinset_and_streamed_work() {
    let (up, rec) = recorder().await;
    let app = spawning_app(up).await;
    for route in [
        "direct",
        "correlation-propagate",
        "steadfast-spawn",
        "bare-spawn",
        "blocking",
        "joinset",
        "stream",
        "stream-propagated",
    ] {
        // A fresh connection each: a second request on a kept-alive HTTP/1 connection whose
        // body makes a client call hangs here with or without steadfast (hyper + paused time).
        let client = support::http_client();
        let mut r = support::get(app, &format!("/{route}"));
        r.headers_mut()
            .insert("x-correlation-id", format!("id-{route}").parse().unwrap());
        r.headers_mut()
            .insert("x-request-timeout-ms", "5000".parse().unwrap());
        let res = tokio::time::timeout(GUARD, client.request(r))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(res.status(), 200, "{route}");
        let body = tokio::time::timeout(GUARD, res.into_body().collect()).await;
        assert!(matches!(body, Ok(Ok(_))), "{route}: body not read");
    }
    let mut failures = Vec::new();
    let want = |route: &str| Some(format!("id-{route}"));
    for (tag, route, deadline_too) in [
        ("direct", "direct", true),
        ("correlation-propagate", "correlation-propagate", false),
        ("steadfast-spawn", "steadfast-spawn", true),
        ("blocking", "blocking", true),
        ("joinset-0", "joinset", true),
        ("joinset-1", "joinset", true),
        ("joinset-2", "joinset", true),
        ("stream", "stream", true),
        ("stream-propagated", "stream-propagated", true),
    ] {
        let got = lookup(&rec, tag);
        if got.len() != 1 || got[0].0 != want(route) {
            failures.push(format!("{tag}: {got:?}, want id {:?}", want(route)));
            continue;
        }
        if deadline_too {
            let b: Option<u64> = got[0].1.as_deref().and_then(|v| v.parse().ok());
            if !matches!(b, Some(b) if b <= 5000) {
                failures.push(format!(
                    "{tag}: deadline header {:?}, want <= 5000",
                    got[0].1
                ));
            }
        }
    }
    // Documented: a bare tokio::spawn loses the id: a fresh one, never the request's.
    let bare = lookup(&rec, "bare-spawn");
    if bare.len() != 1 || bare[0].0 == want("bare-spawn") || bare[0].0.is_none() {
        failures.push(format!("bare-spawn: {bare:?}"));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A streaming response body whose frames are produced (and whose calls are made) after the
/// handler returned. The server layers scope the body as well as the handler: the body's
/// calls carry the request's id, and what remains of the deadline the caller sent, with or
/// without `steadfast::propagate`.
#[tokio::test(start_paused = true)]
async fn a_streaming_body_s_calls_carry_the_request_id_and_the_callers_deadline() {
    let (up, rec) = recorder().await;
    let app = spawning_app(up).await;
    for (path, tag) in [
        ("/stream-propagated", "stream-propagated"),
        ("/stream", "stream"),
    ] {
        let mut r = support::get(app, path);
        r.headers_mut()
            .insert("x-correlation-id", "id-stream".parse().unwrap());
        r.headers_mut()
            .insert("x-request-timeout-ms", "3000".parse().unwrap());
        let res = tokio::time::timeout(GUARD, support::http_client().request(r))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(res.headers()["x-correlation-id"], "id-stream");
        let body = tokio::time::timeout(GUARD, res.into_body().collect())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(body.to_bytes(), "200");
        let got = lookup(&rec, tag);
        assert_eq!(got.len(), 1, "{path}: {got:?}");
        assert_eq!(
            got[0].0.as_deref(),
            Some("id-stream"),
            "{path}: the call made by the body: {got:?}"
        );
        let budget: Option<u64> = got[0].1.as_deref().and_then(|v| v.parse().ok());
        assert!(
            matches!(budget, Some(b) if b <= 3000),
            "{path}: the caller's 3 s, not the client's own 5 s: {got:?}"
        );
    }
}

/// A handler that reads the tag from the request, waits `delay_ms` (so requests interleave),
/// calls the recorder twice with that tag, with a wait between.
async fn tag_app(up: SocketAddr) -> SocketAddr {
    use axum::routing::get;
    let client: Client = steadfast::client::http()
        .build()
        .unwrap()
        .hyper_client::<Full<Bytes>>();
    let app = axum::Router::new().route(
        "/t",
        get(move |headers: HeaderMap| {
            let c = client.clone();
            async move {
                let tag = headers["x-tag"].to_str().unwrap().to_owned();
                let delay: u64 = headers["x-delay"].to_str().unwrap().parse().unwrap();
                for _ in 0..delay {
                    tokio::task::yield_now().await;
                }
                call(c.clone(), up, format!("{tag}-a")).await;
                for _ in 0..delay {
                    tokio::task::yield_now().await;
                }
                call(c, up, format!("{tag}-b")).await;
                CorrelationId::current()
                    .map(|i| i.to_string())
                    .unwrap_or_default()
            }
        }),
    );
    let app = app.layer(steadfast::server::http().build().unwrap());
    serve(app).await
}

fn check_tags(rec: &Recorded, n: usize, id_of: impl Fn(usize) -> String) -> Vec<String> {
    let mut failures = Vec::new();
    for i in 0..n {
        for half in ["a", "b"] {
            let got = lookup(rec, &format!("{i}-{half}"));
            if got.len() != 1 || got[0].0.as_deref() != Some(&*id_of(i)) {
                failures.push(format!("{i}-{half}: {got:?}, want {}", id_of(i)));
            }
        }
    }
    failures
}

// Real time (no sleeps; yields interleave the handlers): with paused time, HTTP/2 over
// loopback hangs here with or without steadfast's layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_multiplexed_requests_never_share_ids() {
    let (up, rec) = recorder().await;
    let app = tag_app(up).await;
    let n: usize = 40;
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let h2 = h2.clone();
        set.spawn(async move {
            let mut r = support::get(app, "/t");
            r.headers_mut()
                .insert("x-correlation-id", format!("m-{i}").parse().unwrap());
            r.headers_mut()
                .insert("x-tag", i.to_string().parse().unwrap());
            r.headers_mut()
                .insert("x-delay", ((i * 7919) % 50).to_string().parse().unwrap());
            let res = h2.request(r).await.unwrap();
            let echoed = res.headers()["x-correlation-id"]
                .to_str()
                .unwrap()
                .to_owned();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (i, echoed, body)
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = tokio::time::timeout(GUARD, set.join_next()).await.unwrap() {
        let (i, echoed, body) = r.unwrap();
        if echoed != format!("m-{i}") || body != format!("m-{i}").as_bytes() {
            failures.push(format!("{i}: echoed {echoed}, handler saw {body:?}"));
        }
    }
    failures.extend(check_tags(&rec, n, |i| format!("m-{i}")));
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(start_paused = true)]
async fn http1_pipelined_requests_never_share_ids() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, rec) = recorder().await;
    let app = tag_app(up).await;
    let mut conn = tokio::net::TcpStream::connect(app).await.unwrap();
    let mut wire = String::new();
    let n = 6;
    for i in 0..n {
        let close = if i == n - 1 {
            "connection: close\r\n"
        } else {
            ""
        };
        wire.push_str(&format!(
            "GET /t HTTP/1.1\r\nhost: x\r\nx-correlation-id: p-{i}\r\nx-tag: {i}\r\nx-delay: {}\r\n{close}\r\n",
            (n - i) * 10
        ));
    }
    // One write: every request is in the server's buffer before the first is answered.
    conn.write_all(wire.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(GUARD, conn.read_to_end(&mut out))
        .await
        .expect("not hung")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    let mut failures = check_tags(&rec, n, |i| format!("p-{i}"));
    for i in 0..n {
        if !text.contains(&format!("x-correlation-id: p-{i}\r\n")) {
            failures.push(format!("response {i} not echoed"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{text}");
}

/// Many concurrent gRPC calls over one tonic Channel (HTTP/2 multiplexing) into the gRPC
/// server preset, whose handler calls an HTTP upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_multiplexed_calls_never_share_ids() {
    let (up, rec) = recorder().await;
    let client: Client = steadfast::client::http()
        .build()
        .unwrap()
        .hyper_client::<Full<Bytes>>();
    let handler = tower::service_fn(move |req: Request<Incoming>| {
        let c = client.clone();
        async move {
            let tag = req.headers()["x-tag"].to_str().unwrap().to_owned();
            let delay: u64 = tag.parse::<u64>().unwrap() * 7919 % 40;
            for _ in 0..delay {
                tokio::task::yield_now().await;
            }
            call(c.clone(), up, format!("{tag}-a")).await;
            tokio::task::yield_now().await;
            call(c, up, format!("{tag}-b")).await;
            Ok::<_, Infallible>(reply_to(Reply::MsgsThen(1, 0)).unwrap())
        }
    });
    let addr = serve(steadfast::server::grpc().build().unwrap().layer(handler)).await;
    let ch = channel(addr).await;
    let n = 30;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut hc = HealthClient::new(ch.clone());
        set.spawn(async move {
            let mut req = tonic::Request::new(check());
            req.metadata_mut()
                .insert("x-correlation-id", format!("g-{i}").parse().unwrap());
            req.metadata_mut()
                .insert("x-tag", i.to_string().parse().unwrap());
            let res = hc.check(req).await.unwrap();
            (
                i,
                res.metadata()
                    .get("x-correlation-id")
                    .map(|v| v.to_str().unwrap().to_owned()),
            )
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = tokio::time::timeout(GUARD, set.join_next()).await.unwrap() {
        let (i, echoed) = r.unwrap();
        if echoed.as_deref() != Some(&*format!("g-{i}")) {
            failures.push(format!("{i}: echoed {echoed:?}"));
        }
    }
    failures.extend(check_tags(&rec, n, |i| format!("g-{i}")));
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// 5. The gRPC client preset against a scripted gRPC server.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn only_unavailable_is_retried_among_all_grpc_codes() {
    let mut failures = Vec::new();
    for code in 1..=16 {
        let (up, hits) = fake_grpc(move |_| Reply::Status(code, vec![])).await;
        let (mut c, _l) = grpc_client(channel(up).await, steadfast::client::grpc());
        let st = tokio::time::timeout(GUARD, c.check(check()))
            .await
            .unwrap()
            .unwrap_err();
        let n = hits.lock().unwrap().len();
        let want = if code == 14 { 3 } else { 1 };
        if n != want || st.code() as i32 != code {
            failures.push(format!("code {code}: {n} attempts, status {:?}", st.code()));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(start_paused = true)]
async fn grpc_pushback_negative_huge_duplicated() {
    let ms = Duration::from_millis;
    // (pushback values, attempts wanted, gap between attempts wanted)
    let cases: Vec<(Vec<&'static str>, usize, Option<Duration>)> = vec![
        (vec!["-1"], 1, None),
        (vec!["-100000"], 1, None),
        (vec!["99999999999999999999999"], 1, None),
        (vec!["18446744073709551615"], 1, None),
        (vec!["300001"], 1, None),
        (vec!["20000"], 1, None), // past the 10 s total
        (vec!["500"], 3, Some(ms(500))),
        (vec!["0"], 3, Some(ms(0))),
        (vec!["100", "700"], 3, Some(ms(700))),
        (vec!["700", "100"], 3, Some(ms(700))),
    ];
    let mut failures = Vec::new();
    for (pb, want_n, gap) in cases {
        let p2 = pb.clone();
        let (up, hits) = fake_grpc(move |_| Reply::Status(14, p2.clone())).await;
        let (mut c, _l) = grpc_client(channel(up).await, steadfast::client::grpc());
        let t0 = Instant::now();
        let st = tokio::time::timeout(GUARD, c.check(check()))
            .await
            .unwrap()
            .unwrap_err();
        let took = t0.elapsed();
        let hits = hits.lock().unwrap().clone();
        let gaps: Vec<Duration> = hits.windows(2).map(|w| w[1].at - w[0].at).collect();
        let ok = hits.len() == want_n
            && st.code() == tonic::Code::Unavailable
            && match gap {
                None => took == Duration::ZERO,
                Some(g) => gaps.iter().all(|x| *x == g),
            };
        if !ok {
            failures.push(format!(
                "{pb:?}: {} attempts, gaps {gaps:?}, {:?} after {took:?}",
                hits.len(),
                st.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_response_whose_head_arrived_is_never_retried() {
    let mut failures = Vec::new();
    // Unary: head, then trailers UNAVAILABLE (0 or 1 messages).
    for msgs in [0, 1] {
        let (up, hits) = fake_grpc(move |_| Reply::MsgsThen(msgs, 14)).await;
        let (mut c, _l) = grpc_client(channel(up).await, steadfast::client::grpc());
        let r = tokio::time::timeout(GUARD, c.check(check())).await.unwrap();
        let n = hits.lock().unwrap().len();
        if n != 1 || r.as_ref().map_err(|s| s.code()).err() != Some(tonic::Code::Unavailable) {
            failures.push(format!(
                "unary, {msgs} msgs then UNAVAILABLE: {n} attempts, {r:?}"
            ));
        }
    }
    // Streaming: two messages delivered, then UNAVAILABLE.
    let (up, hits) = fake_grpc(|_| Reply::MsgsThen(2, 14)).await;
    let (mut c, _l) = grpc_client(channel(up).await, steadfast::client::grpc());
    let mut stream = tokio::time::timeout(GUARD, c.watch(check()))
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    let mut got = 0;
    let end = loop {
        match tokio::time::timeout(GUARD, stream.message()).await.unwrap() {
            Ok(Some(_)) => got += 1,
            Ok(None) => break None,
            Err(st) => break Some(st.code()),
        }
    };
    let n = hits.lock().unwrap().len();
    if n != 1 || got != 2 || end != Some(tonic::Code::Unavailable) {
        failures.push(format!("stream: {n} attempts, {got} msgs, end {end:?}"));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(start_paused = true)]
async fn the_breaker_judges_trailers_only_and_trailer_statuses() {
    let mut failures = Vec::new();
    for (name, reply) in [
        ("trailers-only INTERNAL", Reply::Status(13, vec![])),
        ("trailers-only UNKNOWN", Reply::Status(2, vec![])),
        ("trailers-only DATA_LOSS", Reply::Status(15, vec![])),
        ("1 msg then INTERNAL", Reply::MsgsThen(1, 13)),
        ("0 msgs then DEADLINE_EXCEEDED", Reply::MsgsThen(0, 4)),
    ] {
        let r2 = reply.clone();
        let (up, hits) = fake_grpc(move |_| r2.clone()).await;
        let (mut c, _l) = grpc_client(channel(up).await, steadfast::client::grpc());
        let mut last = None;
        for _ in 0..7 {
            let r = tokio::time::timeout(GUARD, c.check(check())).await.unwrap();
            last = Some(r);
        }
        let n = hits.lock().unwrap().len();
        let last = last.unwrap();
        let refused = matches!(&last, Err(s) if s.code() == tonic::Code::Unavailable);
        let pushback = last.as_ref().err().and_then(|s| {
            s.metadata()
                .get("grpc-retry-pushback-ms")
                .map(|v| v.to_str().unwrap().to_owned())
        });
        if n != 5 || !refused || pushback.is_none() {
            failures.push(format!(
                "{name}: {n} reached the server (want 5), last {:?}, pushback {pushback:?}",
                last.map(|_| ()).map_err(|s| s.code())
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Through `client::grpc()` a stream the server resets keeps tonic's code, the gRPC HTTP/2
/// mapping's (`INTERNAL_ERROR` → `INTERNAL`: src/grpc_status.rs); `steadfast::errors` maps
/// an error of the stack for your own caller (a connection reset → `UNAVAILABLE`).
#[tokio::test(start_paused = true)]
async fn stack_errors_arrive_as_their_documented_grpc_status() {
    let mut failures = Vec::new();
    // Connect refused: UNAVAILABLE.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let ch = tonic::transport::Channel::from_shared(format!("http://{dead}"))
        .unwrap()
        .connect_lazy();
    let (mut c, _l) = grpc_client(ch, steadfast::client::grpc());
    let st = tokio::time::timeout(GUARD, c.check(check()))
        .await
        .unwrap()
        .unwrap_err();
    if st.code() != tonic::Code::Unavailable {
        failures.push(format!("connect refused: {st:?}"));
    }
    // A stream reset with INTERNAL_ERROR (unary and streaming): INTERNAL, tonic's mapping.
    let (up, _) = fake_grpc(|_| Reply::MsgsThenReset(0)).await;
    let (mut c, _l) = grpc_client(channel(up).await, steadfast::client::grpc());
    let st = tokio::time::timeout(GUARD, c.check(check()))
        .await
        .unwrap()
        .unwrap_err();
    if st.code() != tonic::Code::Internal {
        failures.push(format!("reset in a unary body: {st:?}"));
    }
    let (up, _) = fake_grpc(|_| Reply::MsgsThenReset(1)).await;
    let (mut c, _l) = grpc_client(channel(up).await, steadfast::client::grpc());
    match tokio::time::timeout(GUARD, c.watch(check())).await.unwrap() {
        Err(st) => {
            if st.code() != tonic::Code::Internal {
                failures.push(format!("reset stream (at the head): {st:?}"));
            }
        }
        Ok(s) => {
            let mut s = s.into_inner();
            let _ = s.message().await;
            let end = tokio::time::timeout(GUARD, s.message()).await.unwrap();
            if end.as_ref().err().map(|s| s.code()) != Some(tonic::Code::Internal) {
                failures.push(format!("reset in a stream after a message: {end:?}"));
            }
        }
    }
    // A stream that stalls after a message: DEADLINE_EXCEEDED at the total deadline.
    let (up, _) = fake_grpc(|_| Reply::MsgsThenHang(1)).await;
    let (mut c, _l) = grpc_client(
        channel(up).await,
        steadfast::client::grpc().with(|c| {
            c.attempt_timeout(Duration::from_secs(1))
                .total_timeout(Duration::from_secs(2))
        }),
    );
    let t0 = Instant::now();
    let mut s = tokio::time::timeout(GUARD, c.watch(check()))
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    let _ = s.message().await;
    let end = tokio::time::timeout(GUARD, s.message()).await.unwrap();
    if end.as_ref().err().map(|s| s.code()) != Some(tonic::Code::DeadlineExceeded)
        || t0.elapsed() != Duration::from_secs(2)
    {
        failures.push(format!("stalled stream: {end:?} after {:?}", t0.elapsed()));
    }
    // The errors module directly, for every failure kind.
    let e: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    if steadfast::errors::grpc_status(&*e).code() != tonic::Code::Unavailable {
        failures.push("errors::grpc_status(reset)".into());
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// 6. Answering limit and breaker on a server.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_answering_limit_sheds_with_503_retry_after_or_resource_exhausted() {
    use steadfast::limit::ConcurrencyLimitLayer;
    let arrived = Arc::new(AtomicUsize::new(0));
    let a = arrived.clone();
    let hang = tower::service_fn(move |_req: Request<Incoming>| {
        a.fetch_add(1, Ordering::SeqCst);
        async move { std::future::pending::<Result<Response<RespBody>, Infallible>>().await }
    });
    let svc = ConcurrencyLimitLayer::new(1).answering().layer(hang);
    let addr = serve(svc).await;
    // Take the one permit.
    tokio::spawn(raw_grpc(addr, &[]));
    for _ in 0..50 {
        if arrived.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(arrived.load(Ordering::SeqCst), 1);
    // gRPC: RESOURCE_EXHAUSTED, trailers-only, at once.
    let t0 = Instant::now();
    let (code, _) = tokio::time::timeout(GUARD, raw_grpc(addr, &[]))
        .await
        .unwrap();
    assert_eq!((code, t0.elapsed()), (Some(8), Duration::ZERO));
    // HTTP: 503 + Retry-After.
    let res = tokio::time::timeout(
        GUARD,
        support::http_client().request(support::get(addr, "/")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(res.status(), 503);
    let ra = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    assert!(
        matches!(ra.as_deref().and_then(|v| v.parse::<u64>().ok()), Some(n) if n >= 1),
        "{ra:?}"
    );
    // Through the gRPC client preset: RESOURCE_EXHAUSTED is not retried.
    let (mut c, _l) = grpc_client(channel(addr).await, steadfast::client::grpc());
    let st = tokio::time::timeout(GUARD, c.check(check()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        arrived.load(Ordering::SeqCst),
        1,
        "shed calls never reach the handler"
    );
}

#[tokio::test(start_paused = true)]
async fn the_answering_breaker_answers_unavailable_with_pushback_and_the_client_honours_it() {
    let arrived = Arc::new(AtomicUsize::new(0));
    let a = arrived.clone();
    let failing = tower::service_fn(move |_req: Request<Incoming>| {
        a.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, Infallible>(reply_to(Reply::Status(13, vec![])).unwrap()) }
    });
    let breaker = steadfast::breaker::CircuitBreakerLayer::builder()
        .consecutive_failures(Some(5))
        .open_time(Duration::from_secs(30))
        .build()
        .unwrap();
    let svc = breaker.answering().layer(failing);
    let addr = serve(svc).await;
    for _ in 0..5 {
        let (code, _) = tokio::time::timeout(GUARD, raw_grpc(addr, &[]))
            .await
            .unwrap();
        assert_eq!(code, Some(13));
    }
    let (code, head) = tokio::time::timeout(GUARD, raw_grpc(addr, &[]))
        .await
        .unwrap();
    assert_eq!(code, Some(14), "open: UNAVAILABLE");
    let pb: Option<u64> = head
        .get("grpc-retry-pushback-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    assert!(
        matches!(pb, Some(p) if p > 0 && p <= 33_000),
        "pushback {pb:?}"
    );
    let res = tokio::time::timeout(
        GUARD,
        support::http_client().request(support::get(addr, "/")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(arrived.load(Ordering::SeqCst), 5);
    // The gRPC client preset honours the pushback (past its 10 s deadline): no retry.
    let (mut c, _l) = grpc_client(channel(addr).await, steadfast::client::grpc());
    let t0 = Instant::now();
    let st = tokio::time::timeout(GUARD, c.check(check()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unavailable);
    assert_eq!(t0.elapsed(), Duration::ZERO, "returned at once");
    assert_eq!(arrived.load(Ordering::SeqCst), 5);
}

// ---------------------------------------------------------------------------------------
// 7. Zero and MAX settings.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn zero_and_max_settings_on_the_server_and_the_grpc_client() {
    assert!(
        steadfast::server::http()
            .timeout(Duration::ZERO)
            .build()
            .is_err()
    );
    assert!(
        steadfast::client::grpc()
            .with(|c| c.total_timeout(Duration::ZERO))
            .build()
            .is_err()
    );
    assert!(
        steadfast::client::grpc()
            .with(|c| c.attempt_timeout(Duration::ZERO))
            .build()
            .is_err()
    );
    // MAX server limit: an inbound budget still applies; none means "no limit", not a panic.
    let (addr, seen) = hanging_grpc_server(Duration::MAX).await;
    let t0 = Instant::now();
    let (code, _) = tokio::time::timeout(GUARD, raw_grpc(addr, &[("grpc-timeout", "1S")]))
        .await
        .unwrap();
    assert_eq!((code, t0.elapsed()), (Some(4), Duration::from_secs(1)));
    let fut = raw_grpc(addr, &[("grpc-timeout", "99999999H")]);
    assert!(
        tokio::time::timeout(Duration::from_secs(3600), fut)
            .await
            .is_err(),
        "no answer within an hour"
    );
    let s = seen.lock().unwrap().clone();
    assert_eq!(s[0].0, Some(Duration::from_secs(1)));
    assert!(
        s[1].0.is_some_and(|d| d
            >= Duration::from_secs(99_999_999 * 3600).min(Duration::from_secs(30 * 365 * 86400))),
        "{:?}",
        s[1]
    );
    // MAX client timeouts: a call succeeds and the upstream is told a sane budget.
    let (up, hits) = fake_grpc(|_| Reply::MsgsThen(1, 0)).await;
    let (mut c, _l) = grpc_client(
        channel(up).await,
        steadfast::client::grpc().with(|c| {
            c.attempt_timeout(Duration::MAX)
                .total_timeout(Duration::MAX)
        }),
    );
    tokio::time::timeout(GUARD, c.check(check()))
        .await
        .unwrap()
        .unwrap();
    let h = hits.lock().unwrap()[0].headers.clone();
    if let Some(v) = h.get("grpc-timeout") {
        let v = v.to_str().unwrap();
        assert!(
            v.len() <= 9 && v[..v.len() - 1].len() <= 8,
            "grpc-timeout {v}"
        );
    }
}
