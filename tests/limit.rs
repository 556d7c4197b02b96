//! Concurrency limits over real loopback sockets: a server that sheds load with answers, and a
//! client limit over a hyper-util client, each holding a call's permit until its response
//! body has ended.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::BodyExt;
use steadfast::common::PolicyRejected;
use steadfast::limit::ConcurrencyLimitLayer;
use steadfast::limit::error::LimitExceeded;
use support::{get as get_req, http_client, serve_axum};
use tokio::sync::{Semaphore, mpsc};
use tower::{Layer, Service, ServiceExt};

/// A body streamed from a channel: it ends when the sender is dropped.
fn streamed() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    (tx, Body::from_stream(stream))
}

/// A router whose `/` answers "ok" once `gate` lets it, one permit per call.
fn gated(gate: &Arc<Semaphore>) -> Router {
    let gate = gate.clone();
    Router::new().route(
        "/",
        get(move || {
            let gate = gate.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                "ok"
            }
        }),
    )
}

#[tokio::test]
async fn a_server_over_its_limit_answers_503_and_serves_again_once_bodies_end() {
    let limit = ConcurrencyLimitLayer::new(2);
    let gate = Arc::new(Semaphore::new(0));
    let app = gated(&gate).layer(limit.answering());
    let addr = serve_axum(app).await;
    let client = http_client();

    let a = tokio::spawn(client.request(get_req(addr, "/")));
    let b = tokio::spawn(client.request(get_req(addr, "/")));
    while limit.in_flight() < 2 {
        tokio::task::yield_now().await;
    }
    let shed = client.request(get_req(addr, "/")).await.unwrap();
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers()["retry-after"], "1");
    let text = shed.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"overloaded\n");

    gate.add_permits(2);
    for call in [a, b] {
        let res = call.await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            &res.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
    }
    gate.add_permits(1);
    let again = client.request(get_req(addr, "/")).await.unwrap();
    assert_eq!(again.status(), 200, "permits came back");
}

#[tokio::test]
async fn a_server_holds_the_permit_while_the_response_body_streams() {
    let limit = ConcurrencyLimitLayer::new(1);
    let (tx_slot, mut rx_slot) = mpsc::channel::<mpsc::Sender<Bytes>>(1);
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let tx_slot = tx_slot.clone();
                async move {
                    let (tx, body) = streamed();
                    tx_slot.send(tx).await.unwrap();
                    body
                }
            }),
        )
        .layer(limit.answering());
    let addr = serve_axum(app).await;
    let client = http_client();

    let res = client.request(get_req(addr, "/")).await.unwrap();
    assert_eq!(res.status(), 200);
    let tx = rx_slot.recv().await.unwrap();
    tx.send(Bytes::from_static(b"part one, ")).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"part one, ");
    assert_eq!(limit.in_flight(), 1, "the head went out, the body streams");
    let busy = client.request(get_req(addr, "/")).await.unwrap();
    assert_eq!(busy.status(), 503);

    tx.send(Bytes::from_static(b"part two")).await.unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"part two");
    // The server gives the permit back as hyper finishes sending the body.
    while limit.in_flight() != 0 {
        tokio::task::yield_now().await;
    }
    let free = tokio::spawn(client.request(get_req(addr, "/")));
    let tx = rx_slot.recv().await.unwrap();
    drop(tx);
    assert_eq!(free.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn a_client_limit_refuses_without_sending_while_a_body_is_unread() {
    let hits = Arc::new(AtomicUsize::new(0));
    let (tx_slot, mut rx_slot) = mpsc::channel::<mpsc::Sender<Bytes>>(4);
    let counted = hits.clone();
    let app = Router::new().route(
        "/",
        get(move || {
            let tx_slot = tx_slot.clone();
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let (tx, body) = streamed();
                tx_slot.send(tx).await.unwrap();
                body
            }
        }),
    );
    let addr = serve_axum(app).await;
    let limit = ConcurrencyLimitLayer::new(1);
    let mut client = limit.layer(http_client());

    let res = client
        .ready()
        .await
        .unwrap()
        .call(get_req(addr, "/"))
        .await
        .unwrap();
    let tx = rx_slot.recv().await.unwrap();
    let err = client
        .ready()
        .await
        .unwrap()
        .call(get_req(addr, "/"))
        .await
        .unwrap_err();
    assert_eq!(err.downcast_ref::<LimitExceeded>().unwrap().limit(), 1);
    assert!(PolicyRejected::is_in(&*err));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the refused call was not sent"
    );

    drop(tx);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty());
    assert_eq!(limit.in_flight(), 0);
    let next = tokio::spawn(client.oneshot(get_req(addr, "/")));
    drop(rx_slot.recv().await.unwrap());
    assert_eq!(next.await.unwrap().unwrap().status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// A server that sheds load marks its answers (`x-envoy-overloaded`), and the client stack's
/// breaker counts them neither way: twenty shed answers in a row leave it closed, where five
/// plain 503s from a broken server open it (the seed's 5 failures). Over real sockets, with
/// the server's own answering limit.
#[tokio::test]
async fn shed_answers_do_not_open_the_client_stacks_breaker_but_plain_503s_do() {
    let limit = ConcurrencyLimitLayer::new(1);
    let gate = Arc::new(Semaphore::new(0));
    let app = gated(&gate)
        .route(
            "/broken",
            get(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "down") }),
        )
        .layer(limit.answering());
    let addr = serve_axum(app).await;
    let stack = steadfast::client::http()
        .retry(|r| r.max_attempts(1))
        .build()
        .unwrap();
    let client = stack.layer(support::transport::<http_body_util::Full<Bytes>>());

    // One call holds the server's only permit; the rest are shed.
    let held = tokio::spawn(client.clone().oneshot(get_req(addr, "/")));
    while limit.in_flight() < 1 {
        tokio::task::yield_now().await;
    }
    let breaker = stack
        .breakers()
        .handle_for_uri(&get_req(addr, "/").uri().clone());
    for i in 0..20 {
        let res = client.clone().oneshot(get_req(addr, "/")).await.unwrap();
        assert_eq!(res.status(), 503, "call {i}");
        assert_eq!(res.headers()["x-envoy-overloaded"], "true");
    }
    assert_eq!(
        breaker.state(),
        steadfast::breaker::BreakerState::Closed,
        "shed answers are no failures"
    );
    gate.add_permits(1);
    assert_eq!(held.await.unwrap().unwrap().status(), 200);

    // The same status from a handler that is broken, not busy: five open the breaker.
    for _ in 0..5 {
        let res = client
            .clone()
            .oneshot(get_req(addr, "/broken"))
            .await
            .unwrap();
        assert!(!res.headers().contains_key("x-envoy-overloaded"));
    }
    assert_eq!(breaker.state(), steadfast::breaker::BreakerState::Open);
}
