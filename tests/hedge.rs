//! Hedged requests over real loopback sockets (hyper-util client, `FaultServer` upstreams),
//! on paused time: a slow instance's calls are answered by a hedge to another instance, each
//! hedge goes to an endpoint its call's other attempts did not use, and a streamed body that
//! is not `Clone` reaches both attempts whole.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use http_body_util::Full;
use steadfast::balance::{BalanceLayer, Pick};
use steadfast::retry::{HedgeDelay, HedgeLayer};
use steadfast_testkit::{Fault, FaultServer};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

fn hedge(delay_ms: u64) -> HedgeLayer {
    HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(delay_ms)))
        .max_extra_load(1.0)
        .build()
        .unwrap()
}

fn order(call: usize) -> Request<Full<Bytes>> {
    Request::get("http://orders/orders/7")
        .header("x-call", call.to_string())
        .body(Full::default())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn each_hedge_goes_to_an_endpoint_its_call_did_not_use() {
    // Both instances are slow: every call is hedged. Round-robin alone would send the hedges
    // of concurrent calls to their own first endpoint half the time.
    let (a, b) = (FaultServer::start().await, FaultServer::start().await);
    for s in [&a, &b] {
        s.set_default(Fault::status(200).after(Duration::from_millis(200)));
    }
    let balance = BalanceLayer::builder()
        .endpoints([a.addr().to_string(), b.addr().to_string()])
        .pick(Pick::RoundRobin)
        .seed(23)
        .build()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(hedge(50))
        .layer(balance)
        .service(support::transport::<Full<Bytes>>());
    // Earn the share of extra load hedges need (it starts empty).
    for s in [&a, &b] {
        s.set_default(Fault::status(200));
    }
    for i in 0..4 {
        client.clone().oneshot(order(1000 + i)).await.unwrap();
    }
    for s in [&a, &b] {
        s.set_default(Fault::status(200).after(Duration::from_millis(200)));
    }
    let calls: Vec<_> = (0..4)
        .map(|i| tokio::spawn(client.clone().oneshot(order(i))))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), 200);
    }
    let on = |s: &FaultServer, call: usize| {
        s.received()
            .iter()
            .filter(|r| r.headers["x-call"] == call.to_string().as_str())
            .count()
    };
    for call in 0..4 {
        assert_eq!(
            (on(&a, call), on(&b, call)),
            (1, 1),
            "call {call}: one attempt on each instance"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_instance_is_hedged_around() {
    let (slow, fast) = (FaultServer::start().await, FaultServer::start().await);
    slow.set_default(Fault::status(200).after(Duration::from_secs(1)));
    let balance = BalanceLayer::builder()
        .endpoints([slow.addr().to_string(), fast.addr().to_string()])
        .pick(Pick::RoundRobin)
        .seed(5)
        .build()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(
            HedgeLayer::builder()
                .delay(HedgeDelay::Fixed(Duration::from_millis(50)))
                .build()
                .unwrap(),
        )
        .layer(balance)
        .service(support::transport::<Full<Bytes>>());
    // 100 calls a second, half of them starting on the slow instance.
    let calls = 400;
    let mut tasks = Vec::new();
    for i in 0..calls {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            assert_eq!(c.oneshot(order(i)).await.unwrap().status(), 200);
            t.elapsed()
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut rescued = 0;
    for t in tasks {
        let took = t.await.unwrap();
        if took < Duration::from_secs(1) && took >= Duration::from_millis(50) {
            rescued += 1;
        }
    }
    // The default 5 % share of extra load pays for one hedge every 20 calls (less what its
    // 10 s decay takes); every hedge answers a slow call in about 50 ms.
    let hedges = slow.hits() + fast.hits() - calls;
    assert!(hedges >= 10 && hedges * 20 <= calls, "{hedges} hedges");
    assert_eq!(rescued, hedges, "each hedge rescued a slow call");
}

/// A body that yields its chunks as the test sends them: not `Clone`, not known up front.
struct Streamed(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test(start_paused = true)]
async fn a_streamed_put_reaches_both_attempts_whole() {
    let (slow, fast) = (FaultServer::start().await, FaultServer::start().await);
    fast.set_default(Fault::status(201));
    let balance = BalanceLayer::builder()
        .endpoints([slow.addr().to_string(), fast.addr().to_string()])
        .pick(Pick::RoundRobin)
        .seed(1)
        .build()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(hedge(100))
        .layer(balance)
        .service(support::transport::<Streamed>());
    // Earn the share, and leave the round-robin pointing at the slow instance.
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(tx);
        let req = Request::put("http://orders/o").body(Streamed(rx)).unwrap();
        client.clone().oneshot(req).await.unwrap();
    }
    // Now the slow instance never answers: the hedge's answer is the only one (a timed answer
    // could come first if the paused clock jumps while the hedge's bytes are in flight).
    slow.set_default(Fault::Hang);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let req = Request::put("http://orders/o").body(Streamed(rx)).unwrap();
    let call = tokio::spawn(client.oneshot(req));
    let chunk = Bytes::from(vec![7u8; 4096]);
    let mut whole = Vec::new();
    for i in 0..8 {
        tx.send(chunk.clone()).await.unwrap();
        whole.extend_from_slice(&chunk);
        // The hedge starts after 100 ms, half way through the body.
        if i == 3 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    drop(tx);
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 201, "the fast instance's answer");
    let hash = steadfast_testkit::hash_body(&whole);
    for s in [&slow, &fast] {
        let last = s.received().pop().expect("each instance got an attempt");
        assert!(last.body_complete, "whole body on {}", s.addr());
        assert_eq!((last.body_len, last.body_hash), (whole.len(), hash));
    }
}
