//! Hostile tests of `HedgeLayer` in real stacks: over loopback sockets (hyper-util client,
//! `FaultServer` upstreams) and under the steadfast timeout and balance layers, on paused
//! time.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use steadfast::balance::{BalanceLayer, Pick};
use steadfast::retry::{HedgeDelay, HedgeLayer, ReplayBody};
use steadfast_testkit::{Fault, FaultServer};
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};

fn hedge(delay_ms: u64) -> HedgeLayer {
    HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(delay_ms)))
        .max_extra_load(1.0)
        .build()
        .unwrap()
}

/// A body that yields its chunks as the test sends them: not `Clone`, size unknown.
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

fn empty_streamed() -> Streamed {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(tx);
    Streamed(rx)
}

fn transport<B>(
    http2: bool,
) -> Client<hyper_util::client::legacy::connect::HttpConnector, ReplayBody<B>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http()
}

/// The slow instance takes 5 s, the fast one answers 201 at once; round-robin starts on the
/// slow one after two quick PUTs that earn the share of extra load.
async fn slow_and_fast(
    cap: Option<usize>,
    http2: bool,
) -> (
    FaultServer,
    FaultServer,
    impl tower::Service<
        Request<Streamed>,
        Response = Response<hyper::body::Incoming>,
        Error = steadfast::common::BoxError,
        Future: Send,
    > + Clone
    + Send,
) {
    let (slow, fast) = (FaultServer::start().await, FaultServer::start().await);
    let balance = BalanceLayer::builder()
        .endpoints([slow.addr().to_string(), fast.addr().to_string()])
        .pick(Pick::RoundRobin)
        .seed(1)
        .build()
        .unwrap();
    let mut h = HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(100)))
        .max_extra_load(1.0);
    if let Some(cap) = cap {
        h = h.replay_cap(cap);
    }
    let client = ServiceBuilder::new()
        .layer(h.build().unwrap())
        .layer(balance)
        .service(transport::<Streamed>(http2));
    for _ in 0..2 {
        let req = Request::put("http://orders/o")
            .body(empty_streamed())
            .unwrap();
        client.clone().oneshot(req).await.unwrap();
    }
    slow.set_default(Fault::status(200).after(Duration::from_secs(5)));
    fast.set_default(Fault::status(201));
    (slow, fast, client)
}

#[tokio::test(start_paused = true)]
async fn a_body_read_whole_before_the_hedge_reaches_the_hedge_whole_http1_and_http2() {
    for http2 in [false, true] {
        let (slow, fast, client) = slow_and_fast(None, http2).await;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let chunk = Bytes::from(vec![9u8; 3000]);
        let mut whole = Vec::new();
        for _ in 0..4 {
            tx.send(chunk.clone()).await.unwrap();
            whole.extend_from_slice(&chunk);
        }
        drop(tx);
        let req = Request::put("http://orders/o").body(Streamed(rx)).unwrap();
        let res = client.oneshot(req).await.unwrap();
        // Which attempt answers first depends on how the paused clock jumps while sockets
        // are busy (it may reach the slow instance's 5 s first); whichever does, every body
        // that arrived whole is the whole body, and one did.
        assert!(res.status().is_success(), "http2 {http2}");
        let hash = steadfast_testkit::hash_body(&whole);
        let mut complete = 0;
        for s in [&slow, &fast] {
            for r in s.received().iter().filter(|r| r.body_len > 0) {
                if r.body_complete {
                    complete += 1;
                    assert_eq!(
                        (r.body_len, r.body_hash),
                        (whole.len(), hash),
                        "http2 {http2}: {}",
                        s.addr()
                    );
                }
            }
        }
        assert!(complete >= 1, "http2 {http2}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_growing_past_the_cap_mid_hedge_never_arrives_cut_over_the_wire() {
    for http2 in [false, true] {
        let cap = 16 * 1024;
        let (slow, fast, client) = slow_and_fast(Some(cap), http2).await;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let call = tokio::spawn(
            client.oneshot(Request::put("http://orders/o").body(Streamed(rx)).unwrap()),
        );
        let chunk = Bytes::from(vec![5u8; 10 * 1024]);
        let mut whole = Vec::new();
        tx.send(chunk.clone()).await.unwrap();
        whole.extend_from_slice(&chunk);
        // The hedge goes at 100 ms with 10 KiB recorded, under the cap.
        tokio::time::sleep(Duration::from_millis(150)).await;
        for _ in 0..2 {
            tx.send(chunk.clone()).await.unwrap();
            whole.extend_from_slice(&chunk);
        }
        drop(tx);
        let res = call.await.unwrap();
        let hash = steadfast_testkit::hash_body(&whole);
        let mut complete = 0;
        for s in [&slow, &fast] {
            for r in s.received().iter().skip(1) {
                if r.body_complete {
                    complete += 1;
                    assert_eq!(
                        (r.body_len, r.body_hash),
                        (whole.len(), hash),
                        "http2 {http2}: a body with a hole arrived whole-looking on {}",
                        s.addr()
                    );
                }
            }
        }
        let res = res.expect("the attempt that kept the body answers");
        assert!(res.status().is_success());
        assert!(complete >= 1, "http2 {http2}");
    }
}

fn order(call: usize) -> Request<Full<Bytes>> {
    Request::get("http://orders/orders/7")
        .header("x-call", call.to_string())
        .body(Full::default())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn after_a_503_the_next_hedge_goes_to_the_other_endpoint() {
    let (bad, good) = (FaultServer::start().await, FaultServer::start().await);
    let balance = BalanceLayer::builder()
        .endpoints([bad.addr().to_string(), good.addr().to_string()])
        .pick(Pick::RoundRobin)
        .seed(3)
        .build()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(hedge(1000))
        .layer(balance)
        .service(support::transport::<Full<Bytes>>());
    for i in 0..4 {
        client.clone().oneshot(order(1000 + i)).await.unwrap();
    }
    bad.set_default(Fault::status(503));
    let calls: Vec<_> = (0..8)
        .map(|i| tokio::spawn(client.clone().oneshot(order(i))))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), 200);
    }
    for call in 0..8 {
        let on_bad = bad
            .received()
            .iter()
            .filter(|r| r.headers["x-call"] == call.to_string().as_str())
            .count();
        assert!(
            on_bad <= 1,
            "call {call}: {on_bad} attempts on the failing endpoint"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn three_attempts_go_to_three_endpoints() {
    let servers = [
        FaultServer::start().await,
        FaultServer::start().await,
        FaultServer::start().await,
    ];
    let balance = BalanceLayer::builder()
        .endpoints(servers.iter().map(|s| s.addr().to_string()))
        .pick(Pick::RoundRobin)
        .seed(9)
        .build()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(
            HedgeLayer::builder()
                .delay(HedgeDelay::Fixed(Duration::from_millis(50)))
                .max_extra_load(1.0)
                .max_attempts(3)
                .build()
                .unwrap(),
        )
        .layer(balance)
        .service(support::transport::<Full<Bytes>>());
    for i in 0..6 {
        client.clone().oneshot(order(1000 + i)).await.unwrap();
    }
    for s in &servers {
        s.set_default(Fault::status(200).after(Duration::from_millis(500)));
    }
    let calls: Vec<_> = (0..3)
        .map(|i| tokio::spawn(client.clone().oneshot(order(i))))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), 200);
    }
    for call in 0..3 {
        let per: Vec<_> = servers
            .iter()
            .map(|s| {
                s.received()
                    .iter()
                    .filter(|r| r.headers["x-call"] == call.to_string().as_str())
                    .count()
            })
            .collect();
        assert_eq!(per, [1, 1, 1], "call {call}");
    }
}

/// How many attempts reached an upstream.
type Count = Arc<AtomicU32>;

/// An upstream that counts the attempts reaching it and answers after 1 s.
fn counting() -> (
    impl tower::Service<
        Request<ReplayBody<Full<Bytes>>>,
        Response = Response<()>,
        Error = Infallible,
        Future: Send,
    > + Clone
    + Send,
    Count,
) {
    let n = Arc::new(AtomicU32::new(0));
    let n2 = n.clone();
    let svc = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            if i >= 2 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    (svc, n)
}

/// The README's stack: a total timeout that shares its deadline above the hedge. The hedge is
/// due exactly when the timeout fires: "a hedge whose time would come at or after the deadline
/// is never sent".
#[tokio::test(start_paused = true)]
async fn a_shared_total_timeout_is_the_hedges_deadline() {
    let (up, n) = counting();
    let total = steadfast::timeout::TimeoutLayer::builder()
        .limit(Duration::from_millis(20))
        .share_own(true)
        .build()
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(total)
        .layer(hedge(20))
        .service(up);
    for _ in 0..2 {
        client
            .clone()
            .oneshot(Request::new(Full::default()))
            .await
            .unwrap();
    }
    let r = client.oneshot(Request::new(Full::default())).await;
    assert!(r.is_err(), "timed out");
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_layer_value_shared_by_two_stacks_keeps_one_share() {
    // "The learnt delay, the extra-load share and the configuration are shared by every
    // service this layer value makes."
    let layer = HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(20)))
        .build()
        .unwrap();
    let (a, na) = counting();
    let (b, nb) = counting();
    let (a, b) = (layer.layer(a), layer.clone().layer(b));
    // 40 calls through `a` earn 2 hedges (5 %); `b` must not get its own.
    for _ in 0..2 {
        a.clone()
            .oneshot(Request::new(Full::default()))
            .await
            .unwrap();
        b.clone()
            .oneshot(Request::new(Full::default()))
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..80 {
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                a.oneshot(Request::new(Full::default())).await.unwrap();
            } else {
                b.oneshot(Request::new(Full::default())).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let extra = na.load(Ordering::SeqCst) + nb.load(Ordering::SeqCst) - 84;
    assert!(extra <= 5, "{extra} hedges for 84 calls at 5 %");
}
