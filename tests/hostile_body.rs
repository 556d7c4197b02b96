//! Hostile pass on the server layers' response-body scope: `SetCorrelationIdLayer` answers a
//! `CorrelatedBody` (the request's id, trace context and `correlation` span are ambient while
//! each frame is produced) and `SetDeadlineLayer` a `ResponseBody<DeadlineBody>` (the deadline
//! the caller sent is ambient while each frame is produced; the layer's own limit is not, and
//! the body is not cut). Every test goes through real sockets on 127.0.0.1: axum / hyper
//! servers, tonic servers, hyper-util and tonic clients, and the client preset for the calls
//! the bodies make. Each test says the promise it checks.
//!
//! Tests over HTTP/2, or over several connections at once, run on a real-time multi-thread
//! runtime with every wait guarded by a timeout; the paused-time tests use one fresh HTTP/1
//! connection per request (hyper over paused time stalls otherwise, with or without steadfast).
#![cfg(feature = "tonic")]
#![allow(clippy::type_complexity)]

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body as AxumBody;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use steadfast::common::{BoxError, Deadline};
use steadfast::correlation::{CorrelationId, SetCorrelationIdLayer, TraceContext};
use steadfast::timeout::SetDeadlineLayer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

/// Bounds every wait: a hang fails the test instead of stalling the run.
const GUARD: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Transport helpers
// ---------------------------------------------------------------------------------------

/// Serves a tower service over hyper (HTTP/1, and HTTP/2 with prior knowledge) on
/// 127.0.0.1; counts the connections accepted.
async fn serve<S, B>(svc: S) -> (SocketAddr, Arc<AtomicUsize>)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                continue;
            };
            n.fetch_add(1, Ordering::SeqCst);
            let svc = svc.clone();
            tokio::spawn(async move {
                let hsvc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    svc.clone().oneshot(req)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(io), hsvc)
                .await;
            });
        }
    });
    (addr, accepted)
}

/// Serves an axum router (through `serve`).
async fn serve_app(app: axum::Router) -> (SocketAddr, Arc<AtomicUsize>) {
    serve(app).await
}

/// A hyper-util client that speaks HTTP/2 only (prior knowledge): one connection, many
/// streams multiplexed on it.
fn h2_client() -> support::HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// The calls a recorder saw: the `tag` query parameter and the request's headers.
type Recorded = Arc<Mutex<Vec<(String, HeaderMap)>>>;

/// An upstream that records every call (its `?tag=` or `x-tag` header, and its headers) and
/// answers 200 "ok", or, to a gRPC call, one `HealthCheckResponse { SERVING }` and OK.
async fn recorder() -> (SocketAddr, Recorded) {
    let rec: Recorded = Arc::default();
    let r = rec.clone();
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let r = r.clone();
        async move {
            let tag = param(req.uri(), "tag")
                .or_else(|| req.headers().get("x-tag").and_then(|v| v.to_str().ok()))
                .unwrap_or("")
                .to_owned();
            r.lock().unwrap().push((tag, req.headers().clone()));
            let grpc = req
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            let _ = req.into_body().collect().await;
            if grpc {
                let mut t = HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                    Ok(Frame::data(Bytes::from_static(&[
                        0, 0, 0, 0, 2, 0x08, 0x01,
                    ]))),
                    Ok(Frame::trailers(t)),
                ];
                let res = Response::builder()
                    .header("content-type", "application/grpc")
                    .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                        frames,
                    ))))
                    .unwrap();
                return Ok::<_, Infallible>(res);
            }
            Ok(Response::new(BodyExt::boxed(Full::new(
                Bytes::from_static(b"ok"),
            ))))
        }
    });
    let (addr, _) = serve(svc).await;
    (addr, rec)
}

/// The `grpc-timeout` of a recorded call, in milliseconds (rounded down).
fn grpc_budget(h: &HeaderMap) -> Option<u64> {
    let v = h.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => n * 3_600_000,
        "M" => n * 60_000,
        "S" => n * 1000,
        "m" => n,
        "u" => n / 1000,
        "n" => n / 1_000_000,
        _ => return None,
    })
}

/// The calls recorded with exactly this tag.
fn tagged(rec: &Recorded, tag: &str) -> Vec<HeaderMap> {
    rec.lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t == tag)
        .map(|(_, h)| h.clone())
        .collect()
}

/// Every recorded call whose tag starts with `prefix`.
fn prefixed(rec: &Recorded, prefix: &str) -> Vec<(String, HeaderMap)> {
    rec.lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.starts_with(prefix))
        .cloned()
        .collect()
}

/// All `x-correlation-id` fields of a recorded call.
fn ids(h: &HeaderMap) -> Vec<String> {
    h.get_all("x-correlation-id")
        .iter()
        .map(|v| v.to_str().unwrap_or("<bad>").to_owned())
        .collect()
}

/// The `x-request-timeout-ms` budget of a recorded call.
fn budget(h: &HeaderMap) -> Option<u64> {
    h.get("x-request-timeout-ms")?.to_str().ok()?.parse().ok()
}

fn param<'a>(uri: &'a http::Uri, key: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The client preset over a plain hyper-util transport, as a service would build it.
type Client = steadfast::client::HttpClient<steadfast::client::HyperTransport<Full<Bytes>>>;

fn client() -> Client {
    steadfast::client::http()
        .build()
        .unwrap()
        .hyper_client::<Full<Bytes>>()
}

/// What a body needs to make calls: the client preset and the recorder's address.
#[derive(Clone)]
struct Ctx {
    client: Client,
    up: SocketAddr,
}

/// One call through the client preset, tagged; the status, or `err` (the call failed).
async fn call(ctx: &Ctx, tag: &str) -> String {
    let req = Request::get(format!("http://{}/?tag={tag}", ctx.up))
        .body(Full::default())
        .unwrap();
    match ctx.client.clone().oneshot(req).await {
        Ok(res) => {
            let s = res.status().as_u16();
            let _ = res.into_body().collect().await;
            s.to_string()
        }
        Err(_) => "err".to_owned(),
    }
}

/// The ambient id, or `-`.
fn ambient() -> String {
    CorrelationId::current().map_or_else(|| "-".to_owned(), |i| i.to_string())
}

/// The ambient deadline's remaining milliseconds, or `-`.
fn ambient_deadline() -> String {
    Deadline::current().map_or_else(|| "-".to_owned(), |d| d.remaining().as_millis().to_string())
}

/// A streamed body of `n` frames (`usize::MAX`: endless, one frame every 5 ms). Frame `i`
/// calls the recorder with tag `{who}-{i}` through the client preset and reports
/// `{who} {ambient id before the call} {ambient id after it} {status}` on a line. `who` is
/// what the handler read from the request: a frame that reports another id, or a call that
/// carries one, crossed requests.
fn feed(ctx: Ctx, who: String, n: usize) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    futures_util::stream::unfold(0usize, move |i| {
        let ctx = ctx.clone();
        let who = who.clone();
        async move {
            if i >= n {
                return None;
            }
            if n == usize::MAX {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Interleave with the other requests' frames.
            for _ in 0..(i % 4) {
                tokio::task::yield_now().await;
            }
            let before = ambient();
            let status = call(&ctx, &format!("{who}-{i}")).await;
            let after = ambient();
            Some((
                Ok(Bytes::from(format!("{who} {before} {after} {status}\n"))),
                i + 1,
            ))
        }
    })
}

/// An axum app behind the server preset: `GET /feed?who=..&n=..` answers `feed`, after the
/// handler returned; `GET /sse?who=..&n=..` the same as axum `Sse` events.
fn feed_app(ctx: Ctx, server: steadfast::server::ServerBuilder) -> axum::Router {
    use axum::routing::get;
    let c1 = ctx.clone();
    let c2 = ctx;
    axum::Router::new()
        .route(
            "/feed",
            get(move |uri: http::Uri| {
                let ctx = c1.clone();
                async move {
                    let who = param(&uri, "who").unwrap().to_owned();
                    let n = param(&uri, "n").map_or(usize::MAX, |n| n.parse().unwrap());
                    AxumBody::from_stream(feed(ctx, who, n))
                }
            }),
        )
        .route(
            "/sse",
            get(move |uri: http::Uri| {
                let ctx = c2.clone();
                async move {
                    use axum::response::sse::{Event, Sse};
                    let who = param(&uri, "who").unwrap().to_owned();
                    let n: usize = param(&uri, "n").unwrap().parse().unwrap();
                    let events = feed(ctx, who, n).map(|line| {
                        let Ok(line) = line;
                        let text = String::from_utf8(line.to_vec()).unwrap();
                        Ok::<_, Infallible>(Event::default().data(text.trim_end()))
                    });
                    Sse::new(events)
                }
            }),
        )
        .layer(server.build().unwrap())
}

/// A GET with an id (and optional extra headers).
fn get_with(
    addr: SocketAddr,
    path: &str,
    id: &str,
    extra: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut r = support::get(addr, path);
    r.headers_mut()
        .insert("x-correlation-id", id.parse().unwrap());
    for (k, v) in extra {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

/// Sends `req` and reads the whole answer; every wait guarded.
async fn fetch(client: &support::HttpClient, req: Request<Full<Bytes>>) -> (Response<()>, String) {
    let res = tokio::time::timeout(GUARD, client.request(req))
        .await
        .expect("the head in time")
        .expect("a head");
    let (parts, body) = res.into_parts();
    let body = tokio::time::timeout(GUARD, body.collect())
        .await
        .expect("the body in time")
        .expect("the body");
    (
        Response::from_parts(parts, ()),
        String::from_utf8(body.to_bytes().to_vec()).unwrap(),
    )
}

/// Checks a `feed` answer and the recorded calls of request `who` (`n` frames): every frame
/// saw `who` ambient before and after its call, every call carried `who` and only it.
fn check_feed(rec: &Recorded, who: &str, n: usize, text: &str, failures: &mut Vec<String>) {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.strip_prefix("data: ").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .collect();
    if lines.len() != n {
        failures.push(format!("{who}: {} frames, want {n}: {text:?}", lines.len()));
    }
    for l in &lines {
        if *l != format!("{who} {who} {who} 200") {
            failures.push(format!("{who}: frame {l:?}"));
        }
    }
    for i in 0..n {
        let got = tagged(rec, &format!("{who}-{i}"));
        if got.len() != 1 || ids(&got[0]) != [who] {
            failures.push(format!(
                "{who}-{i}: calls {:?}",
                got.iter().map(ids).collect::<Vec<_>>()
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1. The id on every call a streamed body makes, never another request's.
// ---------------------------------------------------------------------------------------

/// Promise: while each frame of a streamed body is produced (long after the handler
/// returned), the request's id is ambient and every call made through the client preset
/// carries it, and only it. Eight clients, each sending three requests one after another on
/// its own kept-alive HTTP/1 connection, all at once; `Body::from_stream` and axum `Sse`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_streams_each_carry_their_own_id_on_every_frame_s_call() {
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    let (app, accepted) = serve_app(feed_app(ctx, steadfast::server::http())).await;
    let mut tasks = Vec::new();
    for c in 0..8 {
        tasks.push(tokio::spawn(async move {
            let client = support::http_client();
            let mut out = Vec::new();
            for r in 0..3 {
                let route = if (c + r) % 2 == 0 { "feed" } else { "sse" };
                let who = format!("h1-{c}-{r}");
                let req = get_with(app, &format!("/{route}?who={who}&n=12"), &who, &[]);
                let (res, text) = fetch(&client, req).await;
                assert_eq!(res.headers()["x-correlation-id"], who.as_str());
                out.push((who, text));
            }
            out
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        for (who, text) in tokio::time::timeout(GUARD, t).await.unwrap().unwrap() {
            check_feed(&rec, &who, 12, &text, &mut failures);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Keep-alive held: fewer connections than requests (each client reused its own).
    assert!(
        accepted.load(Ordering::SeqCst) < 24,
        "no connection was reused"
    );
}

/// Promise: the same over HTTP/2, with sixteen streamed answers multiplexed on ONE
/// connection and their frames interleaved: each frame's calls carry that stream's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_multiplexed_streams_on_one_connection_never_swap_ids() {
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    let (app, accepted) = serve_app(feed_app(ctx, steadfast::server::http())).await;
    let client = h2_client();
    // One request first, so the other sixteen share its connection.
    let (_, text) = fetch(&client, get_with(app, "/feed?who=warm&n=1", "warm", &[])).await;
    let mut failures = Vec::new();
    check_feed(&rec, "warm", 1, &text, &mut failures);
    let mut tasks = Vec::new();
    for k in 0..16 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let route = if k % 2 == 0 { "feed" } else { "sse" };
            let who = format!("h2-{k}");
            let req = get_with(app, &format!("/{route}?who={who}&n=10"), &who, &[]);
            let (res, text) = fetch(&client, req).await;
            assert_eq!(res.version(), http::Version::HTTP_2);
            (who, text)
        }));
    }
    for t in tasks {
        let (who, text) = tokio::time::timeout(GUARD, t).await.unwrap().unwrap();
        check_feed(&rec, &who, 10, &text, &mut failures);
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the streams shared one connection"
    );
}

/// Promise: HTTP/1 pipelining. Two requests sent in one write on one connection (hyper may
/// call the second request's handler while the first answer's body is still streaming, in
/// the same connection task): each body's calls carry its own request's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_http1_requests_keep_their_bodies_ids_apart() {
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    let (app, _) = serve_app(feed_app(ctx, steadfast::server::http())).await;
    let mut s = tokio::net::TcpStream::connect(app).await.unwrap();
    let wire = "GET /feed?who=pipe-a&n=8 HTTP/1.1\r\nhost: x\r\nx-correlation-id: pipe-a\r\n\r\n\
                GET /feed?who=pipe-b&n=8 HTTP/1.1\r\nhost: x\r\nx-correlation-id: pipe-b\r\n\r\n\
                GET /feed?who=pipe-c&n=8 HTTP/1.1\r\nhost: x\r\nx-correlation-id: pipe-c\r\nconnection: close\r\n\r\n";
    s.write_all(wire.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(GUARD, s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    let mut failures = Vec::new();
    for who in ["pipe-a", "pipe-b", "pipe-c"] {
        // Frames arrive chunk-encoded: count the report lines of this request.
        let want = format!("{who} {who} {who} 200");
        let frames = text.matches(&want).count();
        if frames != 8 {
            failures.push(format!("{who}: {frames} good frames of 8"));
        }
        for i in 0..8 {
            let got = tagged(&rec, &format!("{who}-{i}"));
            if got.len() != 1 || ids(&got[0]) != [who] {
                failures.push(format!(
                    "{who}-{i}: {:?}",
                    got.iter().map(ids).collect::<Vec<_>>()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{text}");
}

// ---------------------------------------------------------------------------------------
// 2. Nothing of a request's scope outlives its frames on the connection's task.
// ---------------------------------------------------------------------------------------

/// What a handler outside every steadfast layer sees: the id, the deadline and the trace
/// context ambient, at the handler and at each of its body's frames.
fn bare_report() -> String {
    format!(
        "{} {} {}",
        ambient(),
        ambient_deadline(),
        TraceContext::current().map_or("-".to_owned(), |t| t.trace_id().to_owned())
    )
}

/// A service that answers `/bare` outside every layer (reporting what is ambient) and
/// everything else through the layered app; both on the same connections.
fn mixed(
    app: axum::Router,
) -> impl Service<
    Request<Incoming>,
    Response = Response<AxumBody>,
    Error = Infallible,
    Future = Pin<
        Box<dyn std::future::Future<Output = Result<Response<AxumBody>, Infallible>> + Send>,
    >,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        let fut: Pin<Box<dyn std::future::Future<Output = _> + Send>> = Box::pin(async move {
            if req.uri().path() == "/bare" {
                let head = bare_report();
                let frames = futures_util::stream::iter(0..3).then(|_| async {
                    tokio::task::yield_now().await;
                    Ok::<_, Infallible>(Bytes::from(format!("{}\n", bare_report())))
                });
                let first = futures_util::stream::once(async move {
                    Ok::<_, Infallible>(Bytes::from(format!("{head}\n")))
                });
                Ok(Response::new(AxumBody::from_stream(first.chain(frames))))
            } else {
                app.oneshot(req).await
            }
        });
        fut
    })
}

/// Promise: the scope is entered around each frame and left after it. On ONE HTTP/1
/// connection (one task polls every body on it), a streamed answer with an id, a caller's
/// deadline and a trace context, then a request outside every layer: that handler and its
/// frames see no id, no deadline, no trace context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_a_streamed_answer_s_scope_stays_on_the_connection_task() {
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    let (app, accepted) = serve(mixed(feed_app(ctx, steadfast::server::http()))).await;
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(app).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut failures = Vec::new();
    for round in 0..3 {
        let who = format!("leak-{round}");
        let req = get_with(
            app,
            &format!("/feed?who={who}&n=4"),
            &who,
            &[
                ("x-request-timeout-ms", "20000"),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ],
        );
        tokio::time::timeout(GUARD, sender.ready())
            .await
            .unwrap()
            .unwrap();
        let res = tokio::time::timeout(GUARD, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        let body = tokio::time::timeout(GUARD, res.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        check_feed(
            &rec,
            &who,
            4,
            &String::from_utf8_lossy(&body),
            &mut failures,
        );
        for i in 0..4 {
            for h in tagged(&rec, &format!("{who}-{i}")) {
                let tp = h.get("traceparent").map(|v| v.to_str().unwrap().to_owned());
                if !tp
                    .as_deref()
                    .is_some_and(|t| t.starts_with("00-0af7651916cd43dd8448eb211c80319c-"))
                {
                    failures.push(format!("{who}-{i}: traceparent {tp:?}"));
                }
                if budget(&h).is_none_or(|b| b > 20_000) {
                    failures.push(format!("{who}-{i}: budget {:?}", budget(&h)));
                }
            }
        }
        tokio::time::timeout(GUARD, sender.ready())
            .await
            .unwrap()
            .unwrap();
        let res = tokio::time::timeout(GUARD, sender.send_request(support::get(app, "/bare")))
            .await
            .unwrap()
            .unwrap();
        let body = tokio::time::timeout(GUARD, res.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if text != "- - -\n- - -\n- - -\n- - -\n" {
            failures.push(format!("round {round}: the bare request saw {text:?}"));
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection throughout"
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// 3. The deadline in the body: the caller's, never the server's own limit.
// ---------------------------------------------------------------------------------------

/// A body of `n` frames: frame `i` first waits `gap` (paused time), then reports the
/// ambient deadline's remaining ms and calls the recorder with tag `{who}-{i}`, reporting
/// the outcome and how long (logical time) the call took.
fn paced(
    ctx: Ctx,
    who: String,
    n: usize,
    gap: Duration,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    futures_util::stream::unfold(0usize, move |i| {
        let ctx = ctx.clone();
        let who = who.clone();
        async move {
            if i >= n {
                return None;
            }
            tokio::time::sleep(gap).await;
            let left = ambient_deadline();
            let t0 = Instant::now();
            let status = call(&ctx, &format!("{who}-{i}")).await;
            let took = t0.elapsed().as_millis();
            Some((
                Ok(Bytes::from(format!("{i} {left} {status} {took}\n"))),
                i + 1,
            ))
        }
    })
}

fn paced_app(ctx: Ctx, server: steadfast::server::ServerBuilder) -> axum::Router {
    use axum::routing::get;
    let handled = Arc::new(AtomicUsize::new(0));
    axum::Router::new()
        .route(
            "/paced",
            get(move |uri: http::Uri| {
                let ctx = ctx.clone();
                let handled = handled.clone();
                async move {
                    handled.fetch_add(1, Ordering::SeqCst);
                    let who = param(&uri, "who").unwrap().to_owned();
                    let n: usize = param(&uri, "n").unwrap().parse().unwrap();
                    let gap = Duration::from_millis(param(&uri, "gap").unwrap().parse().unwrap());
                    AxumBody::from_stream(paced(ctx, who, n, gap))
                }
            }),
        )
        .layer(server.build().unwrap())
}

/// One frame line of `paced`: (index, ambient remaining ms or None, status, took ms).
fn parse_paced(text: &str) -> Vec<(usize, Option<u64>, String, u64)> {
    text.lines()
        .map(|l| {
            let p: Vec<&str> = l.split(' ').collect();
            (
                p[0].parse().unwrap(),
                p[1].parse().ok(),
                p[2].to_owned(),
                p[3].parse().unwrap(),
            )
        })
        .collect()
}

/// Promise: a caller that sent `x-request-timeout-ms: 3000` (or `grpc-timeout: 3S`): each
/// frame of the streamed answer sees what remains of those 3 s, and each call the body makes
/// is told at most that (never the client's own 10 s), shrinking frame by frame.
#[tokio::test(start_paused = true)]
async fn body_calls_get_at_most_what_remains_of_the_caller_s_deadline() {
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    let (app, _) = serve_app(paced_app(ctx, steadfast::server::http())).await;
    let mut failures = Vec::new();
    for (who, header, value) in [
        ("ms", "x-request-timeout-ms", "3000"),
        ("grpc", "grpc-timeout", "3S"),
    ] {
        let req = get_with(
            app,
            &format!("/paced?who={who}&n=4&gap=500"),
            who,
            &[(header, value)],
        );
        let (res, text) = fetch(&support::http_client(), req).await;
        assert_eq!(res.status(), 200);
        let frames = parse_paced(&text);
        assert_eq!(frames.len(), 4, "{text}");
        let mut last = u64::MAX;
        for (i, left, status, _) in frames {
            let cap = 3000 - 500 * (i as u64 + 1);
            if left.is_none_or(|l| l > cap) || status != "200" {
                failures.push(format!(
                    "{who} frame {i}: ambient {left:?} (want <= {cap}), {status}"
                ));
            }
            let got = tagged(&rec, &format!("{who}-{i}"));
            let b = got.first().and_then(budget);
            if got.len() != 1 || !b.is_some_and(|b| b <= cap && b <= last) {
                failures.push(format!(
                    "{who}-{i}: budget {b:?}, want <= {cap} and <= {last}"
                ));
            }
            last = b.unwrap_or(0);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise: without a deadline from the caller, the server's own limit (1 s here) bounds the
/// handler's answer only: a body whose frames come 2 s, 4 s, 6 s after the request sees no
/// deadline, and its calls succeed with the client's own budget (10 s), not a spent one.
#[tokio::test(start_paused = true)]
async fn the_server_s_own_limit_never_reaches_the_body() {
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    let server = steadfast::server::http().timeout(Duration::from_secs(1));
    let (app, _) = serve_app(paced_app(ctx, server)).await;
    let req = get_with(app, "/paced?who=own&n=3&gap=2000", "own", &[]);
    let (res, text) = fetch(&support::http_client(), req).await;
    assert_eq!(res.status(), 200);
    let mut failures = Vec::new();
    let frames = parse_paced(&text);
    assert_eq!(frames.len(), 3, "{text}");
    for (i, left, status, _) in frames {
        if left.is_some() || status != "200" {
            failures.push(format!("frame {i}: ambient {left:?}, call {status}"));
        }
        let b = tagged(&rec, &format!("own-{i}")).first().and_then(budget);
        if b.is_none_or(|b| b <= 1000) {
            failures.push(format!("own-{i}: budget {b:?}, want the client's own"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise: a frame produced after the caller's deadline passed: the calls it makes fail at
/// once (nothing is sent, nothing waits for the 5 s attempt timeout), and the body still
/// ends: nothing hangs. The stream is not cut at the deadline: every frame arrives.
#[tokio::test(start_paused = true)]
async fn calls_from_a_frame_past_the_caller_s_deadline_fail_at_once_and_nothing_hangs() {
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    let (app, _) = serve_app(paced_app(ctx, steadfast::server::http())).await;
    let req = get_with(
        app,
        "/paced?who=late&n=4&gap=400",
        "late",
        &[("x-request-timeout-ms", "1000")],
    );
    let (res, text) = fetch(&support::http_client(), req).await;
    assert_eq!(res.status(), 200);
    let frames = parse_paced(&text);
    assert_eq!(
        frames.len(),
        4,
        "the body is not cut at the deadline: {text}"
    );
    let mut failures = Vec::new();
    for (i, left, status, took) in frames {
        let tag = format!("late-{i}");
        let sent = tagged(&rec, &tag).len();
        match i {
            // 400 ms and 800 ms in: within the caller's second.
            0 | 1 => {
                if status != "200" || sent != 1 {
                    failures.push(format!("{tag}: {status}, sent {sent}"));
                }
            }
            // 1200 ms and 1600 ms in: spent.
            _ => {
                if left != Some(0) || status != "err" || sent != 0 || took >= 1000 {
                    failures.push(format!(
                        "{tag}: ambient {left:?}, {status}, sent {sent}, took {took} ms"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise: absurd or hostile inbound budgets never panic, never lengthen a call beyond the
/// client's own total, and a malformed one is ignored (the body then has no deadline); a
/// repeated header counts by its shortest value; a zero budget is answered at once (504,
/// the id still echoed, the handler never run); an edge that does not trust inbound budgets
/// gives the body none.
#[tokio::test(start_paused = true)]
async fn hostile_inbound_budgets_in_the_body() {
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    let (app, _) = serve_app(paced_app(ctx.clone(), steadfast::server::http())).await;
    let (edge, _) = serve_app(paced_app(
        ctx,
        steadfast::server::http().deadline(|d| d.trust_inbound(false)),
    ))
    .await;
    let mut failures = Vec::new();
    // (name, headers, server, ambient in the body expected, max budget of the body's call)
    let cases: Vec<(&str, Vec<(&str, &str)>, SocketAddr, bool, u64)> = vec![
        (
            "huge-grpc",
            vec![("grpc-timeout", "99999999H")],
            app,
            true,
            10_000,
        ),
        (
            "huge-ms",
            vec![("x-request-timeout-ms", "99999999")],
            app,
            true,
            10_000,
        ),
        (
            "overlong-ms",
            vec![("x-request-timeout-ms", "18446744073709551615")],
            app,
            false,
            10_000,
        ),
        ("bad-unit", vec![("grpc-timeout", "5X")], app, false, 10_000),
        (
            "negative",
            vec![("x-request-timeout-ms", "-5")],
            app,
            false,
            10_000,
        ),
        (
            "fraction",
            vec![("x-request-timeout-ms", "1.5")],
            app,
            false,
            10_000,
        ),
        (
            "empty",
            vec![("x-request-timeout-ms", "")],
            app,
            false,
            10_000,
        ),
        (
            "repeated",
            vec![
                ("x-request-timeout-ms", "5000"),
                ("x-request-timeout-ms", "700"),
            ],
            app,
            true,
            700,
        ),
        (
            "untrusted",
            vec![("x-request-timeout-ms", "700")],
            edge,
            false,
            10_000,
        ),
    ];
    for (name, headers, server, ambient_expected, max) in cases {
        let req = get_with(
            server,
            &format!("/paced?who={name}&n=2&gap=100"),
            name,
            &headers,
        );
        let (res, text) = fetch(&support::http_client(), req).await;
        if res.status() != 200 {
            failures.push(format!("{name}: {}", res.status()));
            continue;
        }
        for (i, left, status, _) in parse_paced(&text) {
            if left.is_some() != ambient_expected || status != "200" {
                failures.push(format!("{name} frame {i}: ambient {left:?}, {status}"));
            }
            let b = tagged(&rec, &format!("{name}-{i}"))
                .first()
                .and_then(budget);
            if !b.is_some_and(|b| b <= max && b > 0) {
                failures.push(format!("{name}-{i}: budget {b:?}, want 1..={max}"));
            }
        }
    }
    // A zero budget: answered at once, the handler never run, the body the layer's own.
    for (name, h, v) in [
        ("zero-ms", "x-request-timeout-ms", "0"),
        ("zero-grpc", "grpc-timeout", "0S"),
    ] {
        let req = get_with(
            app,
            &format!("/paced?who={name}&n=2&gap=100"),
            name,
            &[(h, v)],
        );
        let (res, text) = fetch(&support::http_client(), req).await;
        if res.status() != 504
            || res.headers().get("x-correlation-id").map(|v| v.as_bytes()) != Some(name.as_bytes())
            || text != "deadline exceeded\n"
            || res.headers().get("content-length").map(|v| v.as_bytes()) != Some(b"18")
            || !prefixed(&rec, name).is_empty()
        {
            failures.push(format!("{name}: {:?} {text:?}", res.headers()));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise (README, "axum"): the server's own limit bounds the handler's answer only, so a
/// stream the body produces may outlive it; work the handler hands to another task with
/// `steadfast::spawn` / `steadfast::propagate` carries the handler's deadline, the limit
/// included (that work belongs to the handler); work meant to outlive the answer carries the
/// id alone (`CorrelationId::propagate`) or is started from the body. No deadline from the
/// caller, the server's limit at 1 s:
/// - `/spawned`: a producer spawned with `steadfast::spawn` feeds the body through a channel;
///   it calls at 0.8 s (in time), 1.6 s and 2.4 s (past the handler's deadline: refused at
///   once, nothing sent);
/// - `/spawned-id`: the same producer spawned with `CorrelationId::propagate`: every call is
///   sent, with the request's id;
/// - `/propagated`: a stream whose future is wrapped in `steadfast::propagate` in the handler
///   calls at 1.5 s: past the handler's deadline, refused;
/// - `/in-body`: the same stream, unwrapped: it runs in the body's scope, and its call at
///   1.5 s is sent with the request's id.
#[tokio::test(start_paused = true)]
async fn work_set_up_in_the_handler_carries_the_handler_s_deadline_unless_it_carries_the_id_alone()
{
    use axum::routing::get;
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    // A producer feeding the body through a channel, calling at 0.8 s, 1.6 s and 2.4 s.
    async fn producer(
        ctx: Ctx,
        route: &'static str,
        tx: tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>,
    ) {
        for i in 0..3 {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let left = ambient_deadline();
            let status = call(&ctx, &format!("{route}-{i}")).await;
            let line = format!("{i} {left} {status} 0\n");
            if tx.send(Ok(Bytes::from(line))).await.is_err() {
                return;
            }
        }
    }
    fn channel_body(rx: tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>) -> AxumBody {
        AxumBody::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }
    async fn one_call(ctx: Ctx, tag: &'static str) -> Result<Bytes, Infallible> {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let left = ambient_deadline();
        let status = call(&ctx, tag).await;
        Ok(Bytes::from(format!("0 {left} {status} 0\n")))
    }
    let (c1, c2, c3, c4) = (ctx.clone(), ctx.clone(), ctx.clone(), ctx);
    let app = axum::Router::new()
        .route(
            "/spawned",
            get(move || {
                let ctx = c1.clone();
                async move {
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    steadfast::spawn(producer(ctx, "spawned", tx));
                    channel_body(rx)
                }
            }),
        )
        .route(
            "/spawned-id",
            get(move || {
                let ctx = c2.clone();
                async move {
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    tokio::spawn(CorrelationId::propagate(producer(ctx, "spawned-id", tx)));
                    channel_body(rx)
                }
            }),
        )
        .route(
            "/propagated",
            get(move || {
                let ctx = c3.clone();
                async move {
                    AxumBody::from_stream(futures_util::stream::once(steadfast::propagate(
                        one_call(ctx, "propagated-0"),
                    )))
                }
            }),
        )
        .route(
            "/in-body",
            get(move || {
                let ctx = c4.clone();
                async move {
                    AxumBody::from_stream(futures_util::stream::once(one_call(ctx, "in-body-0")))
                }
            }),
        )
        .layer(
            steadfast::server::http()
                .timeout(Duration::from_secs(1))
                .build()
                .unwrap(),
        );
    let (app, _) = serve_app(app).await;
    let mut failures = Vec::new();
    // (route, frames, which calls are sent)
    for (route, n, sent_ok) in [
        ("spawned", 3, &[true, false, false][..]),
        ("spawned-id", 3, &[true, true, true][..]),
        ("propagated", 1, &[false][..]),
        ("in-body", 1, &[true][..]),
    ] {
        let (res, text) = fetch(
            &support::http_client(),
            get_with(app, &format!("/{route}"), route, &[]),
        )
        .await;
        assert_eq!(res.status(), 200);
        let frames = parse_paced(&text);
        assert_eq!(frames.len(), n, "{text}");
        for (i, left, status, _) in frames {
            let sent = tagged(&rec, &format!("{route}-{i}"));
            let want = sent_ok[i];
            let ok = if want {
                status == "200"
                    && sent.len() == 1
                    && sent[0].get("x-correlation-id").map(|v| v.as_bytes())
                        == Some(route.as_bytes())
            } else {
                status != "200" && sent.is_empty()
            };
            if !ok {
                failures.push(format!(
                    "{route}-{i}: want sent {want}; ambient deadline {left:?} ms left, call {status}, sent {}",
                    sent.len()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise: `steadfast::spawn` called while a frame is produced carries the frame's scope:
/// the spawned call has the request's id and at most what remains of the caller's deadline
/// (six requests multiplexed on one HTTP/2 connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_spawned_from_a_frame_keeps_the_request_s_id_and_the_caller_s_deadline() {
    use axum::routing::get;
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    let app = axum::Router::new()
        .route(
            "/spawn-frame",
            get(move |uri: http::Uri| {
                let ctx = ctx.clone();
                async move {
                    let who = param(&uri, "who").unwrap().to_owned();
                    let s = futures_util::stream::unfold(0usize, move |i| {
                        let (ctx, who) = (ctx.clone(), who.clone());
                        async move {
                            if i == 5 {
                                return None;
                            }
                            let tag = format!("{who}-{i}");
                            let (seen, status) = steadfast::spawn(async move {
                                tokio::task::yield_now().await;
                                let seen = ambient();
                                (seen, call(&ctx, &tag).await)
                            })
                            .await
                            .unwrap();
                            let line = format!("{who} {seen} {} {status}\n", ambient());
                            Some((Ok::<_, Infallible>(Bytes::from(line)), i + 1))
                        }
                    });
                    AxumBody::from_stream(s)
                }
            }),
        )
        .layer(steadfast::server::http().build().unwrap());
    let (app, _) = serve_app(app).await;
    let client = h2_client();
    let mut tasks = Vec::new();
    for k in 0..6 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let who = format!("sf-{k}");
            let req = get_with(
                app,
                &format!("/spawn-frame?who={who}"),
                &who,
                &[("x-request-timeout-ms", "7000")],
            );
            (who.clone(), fetch(&client, req).await.1)
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        let (who, text) = tokio::time::timeout(GUARD, t).await.unwrap().unwrap();
        check_feed(&rec, &who, 5, &text, &mut failures);
        for i in 0..5 {
            for h in tagged(&rec, &format!("{who}-{i}")) {
                if budget(&h).is_none_or(|b| b > 7000) {
                    failures.push(format!("{who}-{i}: budget {:?}", budget(&h)));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise: the scope is left even when a frame panics (the guards unwind): on one thread
/// (current-thread runtime), after a streamed answer with an id, a caller's deadline and a
/// trace context panics mid-body, a request outside every layer on a new connection sees no
/// id, no deadline, no trace context. (The panic's message in the output is expected.)
#[tokio::test]
async fn a_frame_that_panics_leaves_nothing_ambient_on_the_thread() {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/boom",
            get(|| async {
                let s = futures_util::stream::unfold(0, |i| async move {
                    tokio::task::yield_now().await;
                    if i == 1 {
                        panic!("hostile_body: a frame panics (expected)");
                    }
                    Some((Ok::<_, Infallible>(Bytes::from("first\n")), i + 1))
                });
                AxumBody::from_stream(s)
            }),
        )
        .layer(steadfast::server::http().build().unwrap());
    let (addr, _) = serve(mixed(app)).await;
    for h2 in [false, true] {
        let client = if h2 {
            h2_client()
        } else {
            support::http_client()
        };
        let req = get_with(
            addr,
            "/boom",
            "boom",
            &[
                ("x-request-timeout-ms", "20000"),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ],
        );
        if let Ok(res) = tokio::time::timeout(GUARD, client.request(req))
            .await
            .unwrap()
        {
            let r = tokio::time::timeout(GUARD, res.into_body().collect())
                .await
                .unwrap();
            assert!(r.is_err(), "h2={h2}: the panicked body ended cleanly");
        }
        let (_, text) = fetch(&support::http_client(), support::get(addr, "/bare")).await;
        assert_eq!(text, "- - -\n- - -\n- - -\n- - -\n", "h2={h2}");
    }
}

// ---------------------------------------------------------------------------------------
// 4. Frames, size hints, end of stream, trailers and errors pass through unchanged.
// ---------------------------------------------------------------------------------------

/// A body that reports a scripted size hint (changing after its first frame) and
/// `is_end_stream`, and counts how often it is polled.
struct Scripted {
    frames: Vec<Bytes>,
    hint_before: SizeHint,
    hint_after: SizeHint,
    end_at_start: bool,
    started: bool,
    polls: Arc<AtomicUsize>,
}

impl HttpBody for Scripted {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.started = true;
        if self.frames.is_empty() {
            return Poll::Ready(None);
        }
        let f = self.frames.remove(0);
        Poll::Ready(Some(Ok(Frame::data(f))))
    }

    fn is_end_stream(&self) -> bool {
        (self.end_at_start && !self.started) || (self.started && self.frames.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        if self.started {
            self.hint_after
        } else {
            self.hint_before
        }
    }
}

fn hint(lower: u64, upper: Option<u64>) -> SizeHint {
    let mut h = SizeHint::new();
    h.set_lower(lower);
    if let Some(u) = upper {
        h.set_upper(u);
    }
    h
}

/// A hyper service answering a `Scripted` body chosen by path; counts polls per path.
#[derive(Clone)]
struct ScriptedSvc {
    polls: Arc<Mutex<BTreeMap<String, Arc<AtomicUsize>>>>,
}

impl ScriptedSvc {
    fn body(&self, path: &str) -> Scripted {
        let polls = self
            .polls
            .lock()
            .unwrap()
            .entry(path.to_owned())
            .or_default()
            .clone();
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let (frames, hint_before, hint_after, end_at_start) = match path {
            "/exact" => (
                vec![b("hello")],
                SizeHint::with_exact(5),
                SizeHint::with_exact(0),
                false,
            ),
            "/empty" => (
                vec![],
                SizeHint::with_exact(0),
                SizeHint::with_exact(0),
                true,
            ),
            // Exact 7 at the head, then the hint changes: the head says 7.
            "/changing" => (
                vec![b("abc"), b("defg")],
                SizeHint::with_exact(7),
                SizeHint::with_exact(4),
                false,
            ),
            // A range: no length in the head, chunked (HTTP/1).
            "/range" => (
                vec![b("ab"), b("cd")],
                hint(2, Some(10)),
                hint(0, Some(8)),
                false,
            ),
            "/unknown" => (
                vec![b("xyz")],
                SizeHint::default(),
                SizeHint::default(),
                false,
            ),
            other => panic!("no such path {other}"),
        };
        Scripted {
            frames,
            hint_before,
            hint_after,
            end_at_start,
            started: false,
            polls,
        }
    }
}

impl<B> Service<Request<B>> for ScriptedSvc {
    type Response = Response<Scripted>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Scripted>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        std::future::ready(Ok(Response::new(self.body(req.uri().path()))))
    }
}

/// What a client sees of an answer: status, content-length, transfer-encoding, body.
async fn observe(
    addr: SocketAddr,
    path: &str,
    h2: bool,
) -> (u16, Option<String>, Option<String>, String) {
    let client = if h2 {
        h2_client()
    } else {
        support::http_client()
    };
    let (res, text) = fetch(&client, get_with(addr, path, "size", &[])).await;
    let h = |n: &str| res.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
    (
        res.status().as_u16(),
        h("content-length"),
        h("transfer-encoding"),
        text,
    )
}

/// Promise: frames, size hints and end of stream pass through unchanged. The same scripted
/// bodies served bare and behind the server preset (and behind the two layers one by one):
/// the same head (`content-length` from an exact hint, chunked for a range or unknown, a
/// hint that changes after the head kept as the head saw it), the same bytes, and the body
/// polled exactly as often.
#[tokio::test(start_paused = true)]
async fn size_hints_and_end_of_stream_pass_through_the_server_layers() {
    let paths = ["/exact", "/empty", "/changing", "/range", "/unknown"];
    let bare = ScriptedSvc {
        polls: Arc::default(),
    };
    let preset = ScriptedSvc {
        polls: Arc::default(),
    };
    let corr = ScriptedSvc {
        polls: Arc::default(),
    };
    let dl = ScriptedSvc {
        polls: Arc::default(),
    };
    let (bare_addr, _) = serve(bare.clone()).await;
    let (preset_addr, _) = serve(
        steadfast::server::http()
            .build()
            .unwrap()
            .layer(preset.clone()),
    )
    .await;
    let (corr_addr, _) = serve(SetCorrelationIdLayer::new().layer(corr.clone())).await;
    let (dl_addr, _) =
        serve(SetDeadlineLayer::new(Duration::from_secs(30)).layer(dl.clone())).await;
    let mut failures = Vec::new();
    for h2 in [false, true] {
        for path in paths {
            let want = observe(bare_addr, path, h2).await;
            for (name, addr) in [
                ("preset", preset_addr),
                ("correlation", corr_addr),
                ("deadline", dl_addr),
            ] {
                let got = observe(addr, path, h2).await;
                if got != want {
                    failures.push(format!("{name} {path} h2={h2}: {got:?}, bare {want:?}"));
                }
            }
        }
    }
    // Polled as often behind the layers as bare.
    let counts = |s: &ScriptedSvc| {
        s.polls
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::SeqCst)))
            .collect::<BTreeMap<_, _>>()
    };
    let want = counts(&bare);
    for (name, s) in [
        ("preset", &preset),
        ("correlation", &corr),
        ("deadline", &dl),
    ] {
        if counts(s) != want {
            failures.push(format!("{name}: polls {:?}, bare {want:?}", counts(s)));
        }
    }
    // The head a client sees for the exact body over HTTP/1.
    assert_eq!(
        observe(preset_addr, "/exact", false).await,
        (200, Some("5".into()), None, "hello".into())
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise: trailers frames pass through intact (HTTP/2, and HTTP/1 to a client that sent
/// `te: trailers`): data then trailers, the same behind the preset as bare; and a body error
/// mid-stream reaches the client as an error after the same data, behind the preset as bare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_and_body_errors_pass_through_the_server_preset() {
    use axum::routing::get;
    // The error waits until the client has read the data before it (else hyper's client may
    // see the reset before the head, bare or not).
    let route = |read: Arc<tokio::sync::Notify>| {
        axum::Router::new()
            .route(
                "/trailers",
                get(|| async {
                    let mut t = HeaderMap::new();
                    t.insert("x-checksum", "abc123".parse().unwrap());
                    t.insert("grpc-status", "0".parse().unwrap());
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                        Ok(Frame::data(Bytes::from_static(b"one "))),
                        Ok(Frame::data(Bytes::from_static(b"two"))),
                        Ok(Frame::trailers(t)),
                    ];
                    AxumBody::new(StreamBody::new(futures_util::stream::iter(frames)))
                }),
            )
            .route(
                "/error",
                get(move || {
                    let read = read.clone();
                    async move {
                        let s = futures_util::stream::unfold(0, move |i| {
                            let read = read.clone();
                            async move {
                                let item: Result<Bytes, BoxError> = match i {
                                    0 => Ok(Bytes::from_static(b"before")),
                                    1 => {
                                        read.notified().await;
                                        Err("boom".into())
                                    }
                                    2 => Ok(Bytes::from_static(b"after")),
                                    _ => return None,
                                };
                                Some((item, i + 1))
                            }
                        });
                        AxumBody::from_stream(s)
                    }
                }),
            )
    };
    let read = Arc::new(tokio::sync::Notify::new());
    let (bare, _) = serve_app(route(read.clone())).await;
    let (layered, _) =
        serve_app(route(read.clone()).layer(steadfast::server::http().build().unwrap())).await;
    for h2 in [true, false] {
        let client = if h2 {
            h2_client()
        } else {
            support::http_client()
        };
        let mut seen = Vec::new();
        for addr in [bare, layered] {
            // Trailers (HTTP/1 sends them to a client that accepts them).
            let req = get_with(addr, "/trailers", "tr", &[("te", "trailers")]);
            let res = tokio::time::timeout(GUARD, client.request(req))
                .await
                .unwrap()
                .unwrap();
            let head = (
                res.headers().get("content-length").cloned(),
                res.headers().get("transfer-encoding").cloned(),
            );
            let collected = tokio::time::timeout(GUARD, res.into_body().collect())
                .await
                .unwrap()
                .unwrap();
            let trailers = collected.trailers().cloned();
            let data = collected.to_bytes();
            // Error mid-stream: the data before it, then an error.
            let res =
                tokio::time::timeout(GUARD, client.request(get_with(addr, "/error", "er", &[])))
                    .await
                    .unwrap()
                    .unwrap();
            let mut body = res.into_body();
            let mut got = Vec::new();
            let mut errored = false;
            while let Some(f) = tokio::time::timeout(GUARD, body.frame()).await.unwrap() {
                match f {
                    Ok(f) => {
                        if let Ok(d) = f.into_data() {
                            got.extend_from_slice(&d);
                            read.notify_one();
                        }
                    }
                    Err(_) => {
                        errored = true;
                        break;
                    }
                }
            }
            seen.push((head, data, trailers, got, errored));
        }
        let (bare, layered) = (&seen[0], &seen[1]);
        assert_eq!(layered, bare, "h2={h2}");
        assert_eq!(layered.1, "one two", "h2={h2}");
        if h2 {
            let t = layered.2.as_ref().expect("trailers");
            assert_eq!(t["x-checksum"], "abc123");
            assert_eq!(t["grpc-status"], "0");
        }
        assert_eq!(layered.3, b"before", "h2={h2}");
        assert!(layered.4, "h2={h2}: the error reached the client");
    }
}

// ---------------------------------------------------------------------------------------
// 5. A body dropped mid-stream (the client went away).
// ---------------------------------------------------------------------------------------

/// Records, when dropped, what was ambient then.
struct OnDrop {
    seen: Arc<Mutex<Option<String>>>,
}

impl Drop for OnDrop {
    fn drop(&mut self) {
        *self.seen.lock().unwrap() = Some(format!("{} {}", ambient(), ambient_deadline()));
    }
}

/// An app whose `/endless?who=..` streams `feed` forever, holding an `OnDrop` guard.
fn endless_app(ctx: Ctx, dropped: Arc<Mutex<Option<String>>>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/endless",
            get(move |uri: http::Uri| {
                let ctx = ctx.clone();
                let dropped = dropped.clone();
                async move {
                    let who = param(&uri, "who").unwrap().to_owned();
                    let guard = OnDrop { seen: dropped };
                    let s = feed(ctx, who, usize::MAX).map(move |item| {
                        let _keep = &guard;
                        item
                    });
                    AxumBody::from_stream(s)
                }
            }),
        )
        .route("/ping", axum::routing::get(|| async { ambient() }))
        .layer(steadfast::server::http().build().unwrap())
}

/// Promise: a client that goes away mid-stream (HTTP/1 and HTTP/2): the body is dropped (not
/// kept streaming forever), nothing panics, the server keeps serving, and later requests get
/// their own ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_stream_drops_the_body_and_the_server_keeps_serving() {
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    for h2 in [false, true] {
        let dropped: Arc<Mutex<Option<String>>> = Arc::default();
        let (app, _) = serve_app(endless_app(ctx.clone(), dropped.clone())).await;
        let client = if h2 {
            h2_client()
        } else {
            support::http_client()
        };
        let who = format!("gone-{h2}");
        let res = tokio::time::timeout(
            GUARD,
            client.request(get_with(
                app,
                &format!("/endless?who={who}"),
                &who,
                &[("x-request-timeout-ms", "30000")],
            )),
        )
        .await
        .unwrap()
        .unwrap();
        let mut body = res.into_body();
        let mut got = 0;
        while got < 3 {
            let f = tokio::time::timeout(GUARD, body.frame()).await.unwrap();
            if f.unwrap().unwrap().is_data() {
                got += 1;
            }
        }
        drop(body);
        drop(client);
        assert!(
            support::eventually(|| dropped.lock().unwrap().is_some()).await,
            "h2={h2}: the server never dropped the abandoned body"
        );
        let calls = prefixed(&rec, &format!("{who}-"));
        assert!(calls.len() >= 3, "h2={h2}");
        for (tag, h) in &calls {
            assert_eq!(ids(h), [who.as_str()], "{tag}");
        }
        // The server still serves, with fresh scopes.
        let (res, text) = fetch(
            &support::http_client(),
            get_with(app, "/ping", "after", &[]),
        )
        .await;
        assert_eq!(res.status(), 200);
        assert_eq!(text, "after");
    }
}

/// Promise (by analogy with the handler's own cancellation, which both layers scope: "what
/// the handler logs while it is cancelled still belongs to the request", "a cancelled
/// handler's drop glue still sees its deadline"): a streamed body dropped mid-stream because
/// its client went away runs its drop glue (a guard that logs, releases a lease, spawns a
/// clean-up call with `steadfast::spawn`) with the request's id and the caller's deadline
/// ambient, as its frames did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_body_s_drop_glue_runs_in_the_request_s_scope() {
    let (up, _rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    let dropped: Arc<Mutex<Option<String>>> = Arc::default();
    let (app, _) = serve_app(endless_app(ctx, dropped.clone())).await;
    let client = support::http_client();
    let res = tokio::time::timeout(
        GUARD,
        client.request(get_with(
            app,
            "/endless?who=cancel",
            "cancel",
            &[("x-request-timeout-ms", "30000")],
        )),
    )
    .await
    .unwrap()
    .unwrap();
    let mut body = res.into_body();
    let _ = tokio::time::timeout(GUARD, body.frame()).await.unwrap();
    drop(body);
    drop(client);
    assert!(support::eventually(|| dropped.lock().unwrap().is_some()).await);
    let seen = dropped.lock().unwrap().clone().unwrap();
    let (id, deadline) = seen.split_once(' ').unwrap();
    assert_eq!(
        (id, deadline != "-"),
        ("cancel", true),
        "ambient in the body's drop glue: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 6. Nested and neighbouring layers.
// ---------------------------------------------------------------------------------------

/// A response-body wrapper of our own (as a compression or metrics layer would be): polls
/// the inner body, re-chunking each data frame in two.
#[derive(Clone)]
struct Rechunk;

impl<S> Layer<S> for Rechunk {
    type Service = RechunkSvc<S>;
    fn layer(&self, inner: S) -> RechunkSvc<S> {
        RechunkSvc(inner)
    }
}

#[derive(Clone)]
struct RechunkSvc<S>(S);

impl<S, Req, B> Service<Req> for RechunkSvc<S>
where
    S: Service<Req, Response = Response<B>>,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<AxumBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<AxumBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|b| {
                let s = b.into_data_stream().flat_map(|item| {
                    let parts: Vec<Result<Bytes, BoxError>> = match item {
                        Ok(d) if d.len() > 1 => {
                            let mut d = d;
                            let tail = d.split_off(d.len() / 2);
                            vec![Ok(d), Ok(tail)]
                        }
                        Ok(d) => vec![Ok(d)],
                        Err(e) => vec![Err(e.into())],
                    };
                    futures_util::stream::iter(parts)
                });
                AxumBody::from_stream(s)
            }))
        })
    }
}

/// Promise: the layers compose with each other and with their neighbours, and the scopes
/// hold in every order: two correlation layers; the deadline layer outside the correlation
/// layer; a body wrapper outside and inside the preset; the answering limit (a local shed
/// answer passes through `CorrelatedBody` with its id echoed and its length) and the
/// answering breaker inside the preset. Every body's calls carry the request's id once, and
/// a budget no larger than the caller's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_and_neighbouring_layers_keep_the_body_s_scope() {
    use axum::routing::get;
    let (up, rec) = recorder().await;
    let ctx = Ctx {
        client: client(),
        up,
    };
    let routes = |ctx: Ctx| {
        axum::Router::new().route(
            "/feed",
            get(move |uri: http::Uri| {
                let ctx = ctx.clone();
                async move {
                    let who = param(&uri, "who").unwrap().to_owned();
                    let n: usize = param(&uri, "n").unwrap().parse().unwrap();
                    AxumBody::from_stream(feed(ctx, who, n))
                }
            }),
        )
    };
    let limit = steadfast::limit::ConcurrencyLimitLayer::new(1);
    let breaker = steadfast::breaker::CircuitBreakerLayer::new();
    let apps: Vec<(&str, axum::Router)> = vec![
        (
            "two-correlation",
            routes(ctx.clone())
                .layer(SetCorrelationIdLayer::new())
                .layer(SetCorrelationIdLayer::new()),
        ),
        (
            "deadline-outside",
            routes(ctx.clone()).layer(
                ServiceBuilder::new()
                    .layer(SetDeadlineLayer::new(Duration::from_secs(30)))
                    .layer(SetCorrelationIdLayer::new()),
            ),
        ),
        (
            "rechunk-outside",
            routes(ctx.clone())
                .layer(steadfast::server::http().build().unwrap())
                .layer(Rechunk),
        ),
        (
            "rechunk-inside",
            routes(ctx.clone())
                .layer(Rechunk)
                .layer(steadfast::server::http().build().unwrap()),
        ),
        (
            "breaker-inside",
            routes(ctx.clone())
                .layer(breaker.answering())
                .layer(steadfast::server::http().build().unwrap()),
        ),
        (
            "limit-inside",
            routes(ctx.clone())
                .layer(limit.answering())
                .layer(steadfast::server::http().build().unwrap()),
        ),
    ];
    let mut failures = Vec::new();
    for (name, app) in apps {
        let (addr, _) = serve_app(app).await;
        let who = format!("nest-{name}");
        let req = get_with(
            addr,
            &format!("/feed?who={who}&n=5"),
            &who,
            &[("x-request-timeout-ms", "9000")],
        );
        let (res, text) = fetch(&support::http_client(), req).await;
        if res.headers().get_all("x-correlation-id").iter().count() != 1
            || res.headers()["x-correlation-id"] != who.as_str()
        {
            failures.push(format!(
                "{name}: echoed {:?}",
                res.headers().get_all("x-correlation-id")
            ));
        }
        // A re-chunked body splits the report lines across frames: check the joined text.
        check_feed(&rec, &who, 5, &text, &mut failures);
        for i in 0..5 {
            for h in tagged(&rec, &format!("{who}-{i}")) {
                if budget(&h).is_none_or(|b| b > 9000) {
                    failures.push(format!("{who}-{i}: budget {:?}", budget(&h)));
                }
            }
        }
    }
    // The limit holds its one permit while a streamed body runs: a second request is shed
    // with the limit's local answer, which passes through the preset's body intact.
    let (addr, _) = serve_app(
        routes(ctx.clone())
            .layer(limit.answering())
            .layer(steadfast::server::http().build().unwrap()),
    )
    .await;
    let client = support::http_client();
    let res = tokio::time::timeout(
        GUARD,
        client.request(get_with(addr, "/feed?who=holder&n=1000000", "holder", &[])),
    )
    .await
    .unwrap()
    .unwrap();
    let mut holder = res.into_body();
    let _ = tokio::time::timeout(GUARD, holder.frame()).await.unwrap();
    let (res, text) = fetch(
        &support::http_client(),
        get_with(addr, "/feed?who=shed&n=1", "shed", &[]),
    )
    .await;
    let cl: Option<usize> = res
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    if res.status() != 503
        || res.headers().get("x-correlation-id").map(|v| v.as_bytes()) != Some(&b"shed"[..])
        || cl != Some(text.len())
    {
        failures.push(format!(
            "shed: {} {:?} {text:?}",
            res.status(),
            res.headers()
        ));
    }
    drop(holder);
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// 7. tonic: a server-streaming RPC whose stream makes calls.
// ---------------------------------------------------------------------------------------

/// A health service whose `Watch` stream makes one HTTP call through the client preset per
/// message. The request's `service` field says `who;n;mode`: `ok` ends with OK, `abort` ends
/// with ABORTED and metadata, `late` waits for the ambient deadline to pass before its
/// second message. Each message's status: SERVING (1) if the call got 200 and the ambient id
/// was `who`, NOT_SERVING (2) if the call failed, SERVICE_UNKNOWN (3) if the ambient id was
/// wrong or (mode `late`) there was no deadline to wait for.
struct Streamer {
    ctx: Ctx,
    /// The gRPC client preset to the recorder, for mode `grpc`.
    grpc: GrpcUp,
}

type GrpcUp = HealthClient<steadfast::client::GrpcClient<tonic::transport::Channel>>;

/// One gRPC call through the gRPC client preset, tagged; `200` for OK, else `err`.
async fn grpc_call(up: &GrpcUp, tag: &str) -> String {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.metadata_mut().insert("x-tag", tag.parse().unwrap());
    match up.clone().check(req).await {
        Ok(_) => "200".to_owned(),
        Err(_) => "err".to_owned(),
    }
}

#[tonic::async_trait]
impl Health for Streamer {
    async fn check(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(HealthCheckResponse { status: 1 }))
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send + 'static>>;

    async fn watch(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let spec = req.into_inner().service;
        let mut p = spec.split(';');
        let who = p.next().unwrap().to_owned();
        let n: usize = p.next().unwrap().parse().unwrap();
        let mode = p.next().unwrap().to_owned();
        let ctx = self.ctx.clone();
        let grpc = self.grpc.clone();
        let s = futures_util::stream::unfold(0usize, move |i| {
            let (ctx, who, mode, grpc) = (ctx.clone(), who.clone(), mode.clone(), grpc.clone());
            async move {
                if i > n {
                    return None;
                }
                if i == n {
                    if mode == "abort" {
                        let mut md = tonic::metadata::MetadataMap::new();
                        md.insert("x-end", who.parse().unwrap());
                        let st = tonic::Status::with_metadata(
                            tonic::Code::Aborted,
                            format!("done {who} 100% \u{e9}"),
                            md,
                        );
                        return Some((Err(st), i + 1));
                    }
                    return None;
                }
                for _ in 0..(i % 3) {
                    tokio::task::yield_now().await;
                }
                let mut unknown = false;
                if mode == "late" && i == 1 {
                    match Deadline::current() {
                        Some(d) => tokio::time::sleep_until(d.instant()).await,
                        None => unknown = true,
                    }
                }
                let before = ambient();
                let status = if mode == "grpc" {
                    grpc_call(&grpc, &format!("{who}-{i}")).await
                } else {
                    call(&ctx, &format!("{who}-{i}")).await
                };
                let after = ambient();
                let code = if unknown || before != who || after != who {
                    3
                } else if status == "200" {
                    1
                } else {
                    2
                };
                Some((Ok(HealthCheckResponse { status: code }), i + 1))
            }
        });
        Ok(tonic::Response::new(Box::pin(s)))
    }
}

async fn tonic_server(ctx: Ctx) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = tonic::transport::Channel::from_shared(format!("http://{}", ctx.up))
        .unwrap()
        .connect_lazy();
    let grpc = HealthClient::new(steadfast::client::grpc().build().unwrap().layer(up));
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(steadfast::server::grpc().build().unwrap())
            .add_service(HealthServer::new(Streamer { ctx, grpc }))
            .serve_with_incoming(support::incoming(listener)),
    );
    addr
}

async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Opens a Watch and reads it to its end: the statuses and the final status.
async fn watch(
    ch: tonic::transport::Channel,
    who: &str,
    n: usize,
    mode: &str,
    timeout: Duration,
) -> (Vec<i32>, tonic::Status, Option<String>) {
    let mut client = HealthClient::new(ch);
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: format!("{who};{n};{mode}"),
    });
    req.metadata_mut()
        .insert("x-correlation-id", who.parse().unwrap());
    req.set_timeout(timeout);
    let res = tokio::time::timeout(GUARD, client.watch(req))
        .await
        .unwrap()
        .expect("the stream opens");
    let echoed = res
        .metadata()
        .get("x-correlation-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut stream = res.into_inner();
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(GUARD, stream.message()).await.unwrap() {
            Ok(Some(m)) => got.push(m.status),
            Ok(None) => return (got, tonic::Status::ok(""), echoed),
            Err(st) => return (got, st, echoed),
        }
    }
}

/// Promise: a tonic server-streaming RPC behind the gRPC server preset whose stream makes
/// calls: each message's calls carry the RPC's id (six RPCs multiplexed on one channel) and
/// at most what remains of the caller's `grpc-timeout`; the final status and its trailers
/// (code, percent-encoded message, custom metadata) arrive intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_server_streams_carry_the_rpc_s_id_and_deadline_and_their_trailers() {
    let (up, rec) = recorder().await;
    let addr = tonic_server(Ctx {
        client: client(),
        up,
    })
    .await;
    let ch = channel(addr).await;
    let mut tasks = Vec::new();
    for k in 0..6 {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            let who = format!("rpc-{k}");
            let mode = if k % 2 == 0 { "ok" } else { "abort" };
            let r = watch(ch, &who, 6, mode, Duration::from_secs(20)).await;
            (who, mode, r)
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        let (who, mode, (statuses, end, echoed)) =
            tokio::time::timeout(GUARD, t).await.unwrap().unwrap();
        if statuses != [1; 6] {
            failures.push(format!("{who}: statuses {statuses:?}"));
        }
        if echoed.as_deref() != Some(&*who) {
            failures.push(format!("{who}: echoed {echoed:?}"));
        }
        match mode {
            "ok" => {
                if end.code() != tonic::Code::Ok {
                    failures.push(format!("{who}: ended {end:?}"));
                }
            }
            _ => {
                let md = end
                    .metadata()
                    .get("x-end")
                    .map(|v| v.to_str().unwrap().to_owned());
                if end.code() != tonic::Code::Aborted
                    || end.message() != format!("done {who} 100% \u{e9}")
                    || md.as_deref() != Some(&*who)
                {
                    failures.push(format!("{who}: ended {end:?}"));
                }
            }
        }
        for i in 0..6 {
            let got = tagged(&rec, &format!("{who}-{i}"));
            if got.len() != 1
                || ids(&got[0]) != [who.as_str()]
                || budget(&got[0]).is_none_or(|b| b > 20_000)
            {
                failures.push(format!(
                    "{who}-{i}: {:?}",
                    got.iter().map(|h| (ids(h), budget(h))).collect::<Vec<_>>()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise: a message of a tonic stream produced after the caller's `grpc-timeout` passed
/// (the stream is not cut at it): its call fails at once and is never sent; the stream still
/// ends normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_stream_past_the_caller_s_deadline_fails_its_calls_at_once() {
    let (up, rec) = recorder().await;
    let addr = tonic_server(Ctx {
        client: client(),
        up,
    })
    .await;
    let (statuses, end, _) = watch(
        channel(addr).await,
        "rpc-late",
        3,
        "late",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(end.code(), tonic::Code::Ok, "{end:?}");
    // Message 0 within the deadline, 1 and 2 after it.
    assert_eq!(statuses, [1, 2, 2]);
    assert_eq!(tagged(&rec, "rpc-late-0").len(), 1);
    assert!(
        tagged(&rec, "rpc-late-1").is_empty(),
        "a spent call was sent"
    );
    assert!(
        tagged(&rec, "rpc-late-2").is_empty(),
        "a spent call was sent"
    );
}

/// Promise: the gRPC client preset reads the ambient id and deadline when a call is made: a
/// tonic stream whose messages make gRPC calls (four RPCs multiplexed on one channel) sends
/// each with the RPC's id and a `grpc-timeout` no larger than the caller's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_stream_s_grpc_calls_carry_the_rpc_s_id_and_deadline() {
    let (up, rec) = recorder().await;
    let addr = tonic_server(Ctx {
        client: client(),
        up,
    })
    .await;
    let ch = channel(addr).await;
    let mut tasks = Vec::new();
    for k in 0..4 {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            let who = format!("grpc-{k}");
            let r = watch(ch, &who, 5, "grpc", Duration::from_secs(8)).await;
            (who, r)
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        let (who, (statuses, end, _)) = tokio::time::timeout(GUARD, t).await.unwrap().unwrap();
        if statuses != [1; 5] || end.code() != tonic::Code::Ok {
            failures.push(format!("{who}: {statuses:?} {end:?}"));
        }
        for i in 0..5 {
            let got = tagged(&rec, &format!("{who}-{i}"));
            if got.len() != 1
                || ids(&got[0]) != [who.as_str()]
                || grpc_budget(&got[0]).is_none_or(|b| b > 8000)
            {
                failures.push(format!(
                    "{who}-{i}: {:?}",
                    got.iter()
                        .map(|h| (ids(h), h.get("grpc-timeout").cloned()))
                        .collect::<Vec<_>>()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// 8. The request's span while frames are produced, and its end.
// ---------------------------------------------------------------------------------------

/// What the subscriber saw: for each `frame` event, the `correlation_id` of the innermost
/// `correlation` span it sat in (or None); every `correlation` span made and closed.
#[derive(Clone, Default)]
struct Spans {
    /// Live span id → its correlation_id (for `correlation` spans).
    live: Arc<Mutex<BTreeMap<u64, String>>>,
    opened: Arc<Mutex<Vec<String>>>,
    closed: Arc<Mutex<Vec<String>>>,
    /// (the event's `who` field, the correlation span's id around it).
    events: Arc<Mutex<Vec<(String, Option<String>)>>>,
}

#[derive(Default)]
struct Grab(BTreeMap<String, String>);

impl tracing::field::Visit for Grab {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").replace('"', ""),
        );
    }
}

impl<S> tracing_subscriber::Layer<S> for Spans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() == "correlation" {
            let mut g = Grab::default();
            attrs.record(&mut g);
            let cid = g.0.remove("correlation_id").unwrap_or_default();
            self.live.lock().unwrap().insert(id.into_u64(), cid.clone());
            self.opened.lock().unwrap().push(cid);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut g = Grab::default();
        event.record(&mut g);
        let Some(who) = g.0.remove("who") else {
            return;
        };
        let around = ctx.event_scope(event).and_then(|scope| {
            scope
                .into_iter()
                .find(|s| s.name() == "correlation")
                .and_then(|s| self.live.lock().unwrap().get(&s.id().into_u64()).cloned())
        });
        self.events.lock().unwrap().push((who, around));
    }

    fn on_close(&self, id: tracing::span::Id, _: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(cid) = self.live.lock().unwrap().remove(&id.into_u64()) {
            self.closed.lock().unwrap().push(cid);
        }
    }
}

/// Promise: with a subscriber, what a body logs while producing its frames sits in the
/// request's `correlation` span (with the request's id), never another request's; what a
/// request outside the layers logs on the same connection sits in none; the span closes once
/// the body has ended, and once a body is dropped mid-stream (no span kept open after the
/// response). One thread (current-thread runtime, thread-local subscriber), real sockets.
#[tokio::test]
async fn frames_log_in_the_request_s_span_and_the_span_closes_with_the_body() {
    use axum::routing::get;
    let spans = Spans::default();
    let _guard = tracing::subscriber::set_default(tracing_subscriber::layer::SubscriberExt::with(
        tracing_subscriber::registry(),
        spans.clone(),
    ));
    let logged = |who: String, n: usize| {
        futures_util::stream::unfold(0usize, move |i| {
            let who = who.clone();
            async move {
                if i >= n {
                    return None;
                }
                if n == usize::MAX {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tokio::task::yield_now().await;
                tracing::info!(target: "hostile", who = %who, frame = i, "frame");
                Some((Ok::<_, Infallible>(Bytes::from(format!("{i}\n"))), i + 1))
            }
        })
    };
    let app = axum::Router::new()
        .route(
            "/log",
            get(move |uri: http::Uri| async move {
                let who = param(&uri, "who").unwrap().to_owned();
                let n = param(&uri, "n").map_or(usize::MAX, |n| n.parse().unwrap());
                AxumBody::from_stream(logged(who, n))
            }),
        )
        .layer(steadfast::server::http().build().unwrap());
    let bare = tower::service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        async move {
            if req.uri().path() == "/bare" {
                let s = futures_util::stream::iter(0..3).then(|i| async move {
                    tokio::task::yield_now().await;
                    tracing::info!(target: "hostile", who = "bare", frame = i, "frame");
                    Ok::<_, Infallible>(Bytes::from("x"))
                });
                Ok::<_, Infallible>(Response::new(AxumBody::from_stream(s)))
            } else {
                app.oneshot(req).await
            }
        }
    });
    let (addr, _) = serve(bare).await;
    // Interleaved streams on one HTTP/2 connection, then a bare request; then HTTP/1.
    for h2 in [true, false] {
        let client = if h2 {
            h2_client()
        } else {
            support::http_client()
        };
        let mut reqs = Vec::new();
        for k in 0..4 {
            let who = format!("span-{h2}-{k}");
            let client = client.clone();
            reqs.push(async move {
                let req = get_with(addr, &format!("/log?who={who}&n=6"), &who, &[]);
                fetch(&client, req).await
            });
        }
        for (res, text) in futures_util::future::join_all(reqs).await {
            assert_eq!(res.status(), 200);
            assert_eq!(text.lines().count(), 6);
        }
        let (_, text) = fetch(&client, get_with(addr, "/bare", "ignored", &[])).await;
        assert_eq!(text, "xxx");
    }
    // Abandoned mid-stream.
    let client = support::http_client();
    let res = tokio::time::timeout(
        GUARD,
        client.request(get_with(addr, "/log?who=span-gone", "span-gone", &[])),
    )
    .await
    .unwrap()
    .unwrap();
    let mut body = res.into_body();
    let _ = tokio::time::timeout(GUARD, body.frame()).await.unwrap();
    drop(body);
    drop(client);

    let mut failures = Vec::new();
    for (who, around) in spans.events.lock().unwrap().iter() {
        let want = (who != "bare").then(|| who.clone());
        if *around != want {
            failures.push(format!(
                "an event of {who} sat in the correlation span of {around:?}"
            ));
        }
    }
    let frames = |who: &str| {
        spans
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|(w, _)| w == who)
            .count()
    };
    for h2 in [true, false] {
        for k in 0..4 {
            let who = format!("span-{h2}-{k}");
            if frames(&who) != 6 {
                failures.push(format!("{who}: {} frame events", frames(&who)));
            }
        }
    }
    let all_closed = support::eventually(|| {
        let opened = spans.opened.lock().unwrap().clone();
        let closed = spans.closed.lock().unwrap().clone();
        opened.iter().all(|o| closed.contains(o))
    })
    .await;
    if !all_closed {
        let opened = spans.opened.lock().unwrap().clone();
        let closed = spans.closed.lock().unwrap().clone();
        failures.push(format!(
            "spans left open: {:?}",
            opened
                .iter()
                .filter(|o| !closed.contains(o))
                .collect::<Vec<_>>()
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise: frames, size hints and end of stream pass through unchanged, frame by frame (an
/// in-memory call to the server preset, no transport: the transport only reads the hint at
/// the head): before and after every frame, `CorrelatedBody<ResponseBody<DeadlineBody<_>>>`
/// reports the inner body's exact size hint and `is_end_stream`, and yields its frames.
#[tokio::test(start_paused = true)]
async fn the_wrappers_follow_the_inner_body_s_hint_frame_by_frame() {
    let svc = ScriptedSvc {
        polls: Arc::default(),
    };
    let layered = steadfast::server::http()
        .build()
        .unwrap()
        .layer(svc.clone());
    for path in ["/exact", "/empty", "/changing", "/range", "/unknown"] {
        let mut plain = svc.body(path);
        let req = Request::get(format!("http://x{path}"))
            .header("x-request-timeout-ms", "5000")
            .body(())
            .unwrap();
        let res = layered.clone().oneshot(req).await.unwrap();
        let mut body = res.into_body();
        loop {
            let (a, b) = (plain.size_hint(), body.size_hint());
            assert_eq!(
                (a.lower(), a.upper(), plain.is_end_stream()),
                (b.lower(), b.upper(), body.is_end_stream()),
                "{path}"
            );
            let fa = plain.frame().await.map(|f| f.unwrap().into_data().unwrap());
            let fb = body.frame().await.map(|f| f.unwrap().into_data().unwrap());
            assert_eq!(fa, fb, "{path}");
            if fa.is_none() {
                break;
            }
        }
    }
}
