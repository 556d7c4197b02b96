//! Hostile tests of the concurrency limit through real transport: axum servers on 127.0.0.1
//! ephemeral ports and hyper-util clients (HTTP/1 and HTTP/2).

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{any, get};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use steadfast::common::PolicyRejected;
use steadfast::limit::error::LimitExceeded;
use steadfast::limit::{Aimd, ConcurrencyLimitLayer};
use support::{HttpClient, eventually, get as get_req, http_client, serve_axum};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Counts handlers running at once and the highest count seen.
#[derive(Clone, Default)]
struct Gauge {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    hits: Arc<AtomicUsize>,
}

impl Gauge {
    fn enter(&self) -> GaugeGuard {
        self.hits.fetch_add(1, Ordering::SeqCst);
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        GaugeGuard(self.now.clone())
    }
}

struct GaugeGuard(Arc<AtomicUsize>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn gauged_app(gauge: Gauge) -> Router {
    Router::new().route(
        "/",
        get(move || {
            let gauge = gauge.clone();
            async move {
                let _g = gauge.enter();
                tokio::time::sleep(Duration::from_millis(2)).await;
                "ok"
            }
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// The limit is never exceeded, and every permit and place comes back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_through_a_waiting_client_limit_never_exceed_it() {
    let gauge = Gauge::default();
    let addr = serve_axum(gauged_app(gauge.clone())).await;
    for client in [http_client(), h2_client()] {
        gauge.max.store(0, Ordering::SeqCst);
        let limit = ConcurrencyLimitLayer::builder()
            .max(8)
            .wait_up_to(Duration::from_secs(60))
            .build()
            .unwrap();
        let svc = limit.layer(client);
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let res = svc.oneshot(get_req(addr, "/")).await?;
                let status = res.status();
                res.into_body().collect().await?;
                Ok::<_, steadfast::common::BoxError>(status)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 200);
        }
        assert!(
            gauge.max.load(Ordering::SeqCst) <= 8,
            "{}",
            gauge.max.load(Ordering::SeqCst)
        );
        assert_eq!((limit.in_flight(), limit.waiting()), (0, 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_against_an_answering_server_limit_never_exceed_it() {
    let gauge = Gauge::default();
    for wait in [None, Some(Duration::from_millis(50))] {
        gauge.max.store(0, Ordering::SeqCst);
        let mut b = ConcurrencyLimitLayer::builder().max(5);
        if let Some(w) = wait {
            b = b.wait_up_to(w);
        }
        let limit = b.build().unwrap();
        let addr = serve_axum(gauged_app(gauge.clone()).layer(limit.answering())).await;
        let client = http_client();
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let res = client.request(get_req(addr, "/")).await.unwrap();
                let status = res.status();
                let retry_after = res.headers().get("retry-after").cloned();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                (status, retry_after, body)
            }));
        }
        for t in tasks {
            let (status, retry_after, body) = t.await.unwrap();
            match status.as_u16() {
                200 => assert_eq!(&body[..], b"ok"),
                503 => {
                    assert_eq!(retry_after.unwrap(), "1");
                    assert_eq!(&body[..], b"overloaded\n");
                }
                s => panic!("unexpected {s}"),
            }
        }
        assert!(
            gauge.max.load(Ordering::SeqCst) <= 5,
            "{}",
            gauge.max.load(Ordering::SeqCst)
        );
        assert!(eventually(|| limit.in_flight() == 0 && limit.waiting() == 0).await);
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting.

/// Two calls made (and so queued) while the limit of 2 is reached, then awaited together once
/// both in-flight calls have ended: both must be sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_made_while_full_and_joined_after_two_releases_are_both_sent() {
    let gauge = Gauge::default();
    let gate = Arc::new(Semaphore::new(0));
    let (g, gt) = (gauge.clone(), gate.clone());
    let app = Router::new().route(
        "/",
        get(move || {
            let (g, gt) = (g.clone(), gt.clone());
            async move {
                let _g = g.enter();
                gt.acquire().await.unwrap().forget();
                "ok"
            }
        }),
    );
    let addr = serve_axum(app).await;
    let limit = ConcurrencyLimitLayer::builder()
        .max(2)
        .wait_up_to(Duration::from_secs(3))
        .build()
        .unwrap();
    let mut svc = limit.layer(http_client());
    let x = tokio::spawn(svc.clone().oneshot(get_req(addr, "/")));
    let y = tokio::spawn(svc.clone().oneshot(get_req(addr, "/")));
    assert!(eventually(|| gauge.hits.load(Ordering::SeqCst) == 2).await);
    let a = svc.ready().await.unwrap().call(get_req(addr, "/"));
    let b = svc.ready().await.unwrap().call(get_req(addr, "/"));
    assert_eq!(limit.waiting(), 2);
    gate.add_permits(2);
    for t in [x, y] {
        let res = t.await.unwrap().unwrap();
        res.into_body().collect().await.unwrap();
    }
    // The two freed permits went straight to the two waiters, in call order.
    assert_eq!((limit.in_flight(), limit.waiting()), (2, 0));
    let (b_tx, mut b_rx) = tokio::sync::oneshot::channel();
    let joined = tokio::spawn(futures_util::future::join(a, async move {
        let r = b.await;
        let _ = b_tx.send(r.as_ref().map(|_| ()).map_err(ToString::to_string));
        r
    }));
    let mut sent = false;
    for _ in 0..1000 {
        if gauge.hits.load(Ordering::SeqCst) == 4 {
            sent = true;
            break;
        }
        if let Ok(r) = b_rx.try_recv() {
            panic!(
                "the second joined call ended without being sent: {r:?} \
                 (in_flight {} of limit {}, server saw {} requests)",
                limit.in_flight(),
                limit.limit(),
                gauge.hits.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(sent);
    gate.add_permits(2);
    let (ra, rb) = joined.await.unwrap();
    ra.unwrap().into_body().collect().await.unwrap();
    rb.unwrap().into_body().collect().await.unwrap();
    assert_eq!((limit.in_flight(), limit.waiting()), (0, 0));
}

/// Cancellation at every point of a real call: waiting, sent, head read, body half read,
/// under `timeout` and by aborting the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_real_calls_anywhere_gives_everything_back() {
    let (slot_tx, mut slot_rx) = tokio::sync::mpsc::channel::<tokio::sync::mpsc::Sender<Bytes>>(8);
    let gate = Arc::new(Semaphore::new(0));
    let gt = gate.clone();
    let app = Router::new()
        .route(
            "/stream",
            get(move || {
                let slot_tx = slot_tx.clone();
                async move {
                    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
                    slot_tx.send(tx).await.unwrap();
                    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
                        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
                    }))
                }
            }),
        )
        .route(
            "/slow",
            get(move || {
                let gt = gt.clone();
                async move {
                    let _ = gt.acquire().await;
                    "slow"
                }
            }),
        );
    let server_limit = ConcurrencyLimitLayer::new(64);
    let addr = serve_axum(app.layer(server_limit.answering())).await;
    for client in [http_client(), h2_client()] {
        let limit = ConcurrencyLimitLayer::builder()
            .max(1)
            .wait_up_to(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut svc = limit.layer(client);

        // Sent, under a timeout shorter than the server.
        let out = tokio::time::timeout(
            Duration::from_millis(50),
            svc.ready().await.unwrap().call(get_req(addr, "/slow")),
        )
        .await;
        assert!(out.is_err());
        assert_eq!(limit.in_flight(), 0, "sent, timed out");

        // Sent and aborted; a waiter aborted behind it.
        let t1 = tokio::spawn(svc.clone().oneshot(get_req(addr, "/slow")));
        assert!(eventually(|| limit.in_flight() == 1).await);
        let t2 = tokio::spawn(svc.clone().oneshot(get_req(addr, "/slow")));
        assert!(eventually(|| limit.waiting() == 1).await);
        t2.abort();
        let _ = t2.await;
        assert_eq!(limit.waiting(), 0, "waiter aborted");
        t1.abort();
        let _ = t1.await;
        assert_eq!(limit.in_flight(), 0, "sent, aborted");

        // Head read, body dropped unread; body half read then dropped.
        for frames_read in [0, 1] {
            let res = svc
                .ready()
                .await
                .unwrap()
                .call(get_req(addr, "/stream"))
                .await
                .unwrap();
            let tx = slot_rx.recv().await.unwrap();
            let mut body = res.into_body();
            if frames_read == 1 {
                tx.send(Bytes::from_static(b"one")).await.unwrap();
                body.frame().await.unwrap().unwrap();
            }
            assert_eq!(limit.in_flight(), 1);
            drop(body);
            assert_eq!(
                limit.in_flight(),
                0,
                "body dropped after {frames_read} frames"
            );
            drop(tx);
        }
        assert_eq!((limit.in_flight(), limit.waiting()), (0, 0));
    }
    gate.add_permits(100);
    assert!(
        eventually(|| server_limit.in_flight() == 0).await,
        "server permits: {}",
        server_limit.in_flight()
    );
}

// ---------------------------------------------------------------------------------------------
// Bodies at their end at the head, bodies that break, HEAD / 204 / 304, HTTP/2.

fn ends_app() -> Router {
    let never = || Body::from_stream(futures_util::stream::pending::<Result<Bytes, Infallible>>());
    Router::new()
        .route("/head", get(move || async move { never() }))
        .route(
            "/204",
            get(move || async move { (StatusCode::NO_CONTENT, never()) }),
        )
        .route(
            "/304",
            get(move || async move { (StatusCode::NOT_MODIFIED, never()) }),
        )
        .route("/empty", get(|| async { "" }))
        .route(
            "/broken",
            get(|| async {
                Body::from_stream(futures_util::stream::iter([
                    Ok(Bytes::from_static(b"part")),
                    Err(std::io::Error::other("disk on fire")),
                ]))
            }),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_304_empty_and_broken_bodies_give_server_and_client_permits_back() {
    let server_limit = ConcurrencyLimitLayer::new(100);
    let addr = serve_axum(ends_app().layer(server_limit.answering())).await;
    for (proto, client) in [("h1", http_client()), ("h2", h2_client())] {
        let limit = ConcurrencyLimitLayer::new(4);
        let mut svc = limit.layer(client);
        for (method, path) in [
            (http::Method::HEAD, "/head"),
            (http::Method::GET, "/204"),
            (http::Method::GET, "/304"),
            (http::Method::GET, "/empty"),
        ] {
            let req = Request::builder()
                .method(method.clone())
                .uri(format!("http://{addr}{path}"))
                .body(Full::default())
                .unwrap();
            let res = svc.ready().await.unwrap().call(req).await.unwrap();
            if proto == "h2" && matches!(path, "/204" | "/304") {
                // hyper's HTTP/2 server sends the head of a 204/304 without END_STREAM when the
                // handler's body is not at its end, so the client's body is not at its end
                // either: the permit is held until that body is dropped (the transport's
                // doing, not the limit's).
                assert!(res.body().holds_permit());
                drop(res);
                assert_eq!(limit.in_flight(), 0, "{proto} {method} {path}: dropped");
                assert!(eventually(|| server_limit.in_flight() == 0).await);
                continue;
            }
            assert!(
                !res.body().holds_permit(),
                "{proto} {method} {path}: the body is at its end at the head ({})",
                res.status()
            );
            assert_eq!(limit.in_flight(), 0, "{proto} {method} {path}");
            let _ = res.into_body().collect().await;
            assert!(
                eventually(|| server_limit.in_flight() == 0).await,
                "{proto} {method} {path}: the server still holds {} permits",
                server_limit.in_flight()
            );
        }
        // A body that breaks mid-way at the server.
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(get_req(addr, "/broken"))
            .await;
        if let Ok(res) = res {
            let _ = res.into_body().collect().await; // an error, or a cut-short body
        } // else: hyper failed the call before the head (the body broke before it was sent)
        assert_eq!(limit.in_flight(), 0, "{proto} broken body, client");
        assert!(
            eventually(|| server_limit.in_flight() == 0).await,
            "{proto} broken body: the server still holds {} permits",
            server_limit.in_flight()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC over real HTTP/2.

fn grpc_app() -> Router {
    Router::new()
        .route(
            "/trailers-only",
            any(|| async {
                Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "8")
                    .body(Body::empty())
                    .unwrap()
            }),
        )
        .route(
            "/trailers",
            any(|| async {
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", "14".parse().unwrap());
                let frames = futures_util::stream::iter([
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
                    Ok(Frame::trailers(t)),
                ]);
                Response::builder()
                    .header("content-type", "application/grpc")
                    .body(Body::new(StreamBody::new(frames)))
                    .unwrap()
            }),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_overload_in_the_head_or_the_trailers_over_h2_shrinks_the_limit() {
    let addr = serve_axum(grpc_app()).await;
    let limit = ConcurrencyLimitLayer::builder()
        .aimd(Aimd {
            initial: 10,
            min: 2,
            max: 20,
            ..Aimd::default()
        })
        .sample_window(Duration::ZERO, 1)
        .build()
        .unwrap();
    let mut svc = limit.layer(h2_client());
    let grpc = |path: &str| {
        Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::default())
            .unwrap()
    };
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(grpc("/trailers-only"))
        .await
        .unwrap();
    assert_eq!(res.headers()["grpc-status"], "8");
    assert_eq!(limit.in_flight(), 0, "trailers-only: back with the head");
    assert_eq!(
        limit.limit(),
        9,
        "RESOURCE_EXHAUSTED in the head is overload"
    );
    drop(res);
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(grpc("/trailers"))
        .await
        .unwrap();
    assert_eq!(limit.in_flight(), 1);
    let collected = res.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
    assert_eq!(limit.in_flight(), 0);
    assert_eq!(limit.limit(), 8, "UNAVAILABLE in the trailers is overload");
}

// ---------------------------------------------------------------------------------------------
// answering() in axum.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answering_keeps_infallible_and_sheds_with_503_or_grpc_8_revealing_nothing() {
    fn infallible<S: Service<Request<Body>, Error = Infallible>>(_: &S) {}
    let limit = ConcurrencyLimitLayer::builder()
        .max(1)
        .name("internal-db-pool-7")
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let gt = gate.clone();
    let router: Router = Router::new().route(
        "/",
        any(move || {
            let gt = gt.clone();
            async move {
                gt.acquire().await.unwrap().forget();
                "ok"
            }
        }),
    );
    infallible(&limit.answering().layer(router.clone()));
    let addr = serve_axum(router.layer(limit.answering())).await;
    let h1 = http_client();
    let held = tokio::spawn(h1.request(get_req(addr, "/")));
    assert!(eventually(|| limit.in_flight() == 1).await);

    let res = h1.request(get_req(addr, "/")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    let headers = format!("{:?}", res.headers());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    for secret in ["internal", "concurrency", "limit of", "pool"] {
        assert!(
            !text.contains(secret) && !headers.contains(secret),
            "{text} {headers}"
        );
    }

    for (client, ct) in [
        (h2_client(), "application/grpc"),
        (h2_client(), "application/grpc+proto"),
        (h1.clone(), "application/grpc; charset=utf-8"),
    ] {
        let req = Request::post(format!("http://{addr}/"))
            .header("content-type", ct)
            .body(Full::default())
            .unwrap();
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), 200, "{ct}");
        assert_eq!(res.headers()["grpc-status"], "8", "{ct}");
        assert_eq!(res.headers()["content-type"], "application/grpc", "{ct}");
        let msg = res
            .headers()
            .get("grpc-message")
            .map(|v| v.to_str().unwrap().to_owned());
        assert!(!msg.unwrap_or_default().contains("internal"));
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty(), "{ct}: trailers-only");
    }
    gate.add_permits(1);
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
    assert!(eventually(|| limit.in_flight() == 0).await);
}

// ---------------------------------------------------------------------------------------------
// Retry above the limit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steadfast_retry_above_the_limit_does_not_retry_a_refusal() {
    let gauge = Gauge::default();
    let gate = Arc::new(Semaphore::new(0));
    let (g, gt) = (gauge.clone(), gate.clone());
    let app = Router::new().route(
        "/",
        get(move || {
            let (g, gt) = (g.clone(), gt.clone());
            async move {
                let _g = g.enter();
                gt.acquire().await.unwrap().forget();
                "ok"
            }
        }),
    );
    let addr = serve_axum(app).await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    for wait in [None, Some(Duration::from_millis(30))] {
        attempts.store(0, Ordering::SeqCst);
        let mut b = ConcurrencyLimitLayer::builder().max(1);
        if let Some(w) = wait {
            b = b.wait_up_to(w);
        }
        let limit = b.build().unwrap();
        let counted = counted.clone();
        let stack = steadfast::retry::RetryLayer::new().layer(
            tower::util::MapRequestLayer::new(move |r| {
                counted.fetch_add(1, Ordering::SeqCst);
                r
            })
            .layer(limit.layer(support::transport::<Full<Bytes>>())),
        );
        let hits_before = gauge.hits.load(Ordering::SeqCst);
        let held = tokio::spawn(stack.clone().oneshot(get_req(addr, "/")));
        assert!(eventually(|| gauge.hits.load(Ordering::SeqCst) == hits_before + 1).await);
        let err = stack.clone().oneshot(get_req(addr, "/")).await.unwrap_err();
        assert!(PolicyRejected::is_in(&*err), "{err}");
        let mut e: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
        let mut found = false;
        while let Some(x) = e {
            found |= x.is::<LimitExceeded>();
            e = x.source();
        }
        assert!(found, "LimitExceeded in the chain: {err}");
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            2,
            "{wait:?}: the refusal was retried"
        );
        assert_eq!(gauge.hits.load(Ordering::SeqCst), hits_before + 1);
        gate.add_permits(1);
        held.await
            .unwrap()
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!((limit.in_flight(), limit.waiting()), (0, 0));
    }
}

// ---------------------------------------------------------------------------------------------
// Transport failures and a server-side waiter whose client gives up.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_and_a_client_that_gives_up_on_a_server_waiter_give_back() {
    // A port nobody listens on.
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let limit = ConcurrencyLimitLayer::new(1);
    let mut svc = limit.layer(http_client());
    for _ in 0..3 {
        let r = svc.ready().await.unwrap().call(get_req(dead, "/")).await;
        assert!(r.is_err());
        assert_eq!(limit.in_flight(), 0);
    }

    let server = ConcurrencyLimitLayer::builder()
        .max(1)
        .wait_up_to(Duration::from_secs(600))
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let gt = gate.clone();
    let app = Router::new().route(
        "/",
        get(move || {
            let gt = gt.clone();
            async move {
                gt.acquire().await.unwrap().forget();
                "ok"
            }
        }),
    );
    let addr = serve_axum(app.layer(server.answering())).await;
    let client = h2_client();
    let held = tokio::spawn(client.request(get_req(addr, "/")));
    assert!(eventually(|| server.in_flight() == 1).await);
    let gives_up = tokio::spawn(client.request(get_req(addr, "/")));
    assert!(eventually(|| server.waiting() == 1).await);
    gives_up.abort();
    let _ = gives_up.await;
    assert!(
        eventually(|| server.waiting() == 0).await,
        "the server still counts a waiter whose client reset the stream"
    );
    gate.add_permits(1);
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
    assert!(eventually(|| server.in_flight() == 0).await);
}
