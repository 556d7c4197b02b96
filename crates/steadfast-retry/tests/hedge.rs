//! Hedging contracts on paused time: when a hedge is sent and when not, which answer wins,
//! cancellation, the extra-load cap, the deadline, server hints, bodies read by two attempts
//! at once, the learnt delay.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use steadfast_core::{BoxError, Deadline, PolicyRejected};
use steadfast_retry::error::InvalidHedgeConfig;
use steadfast_retry::{BudgetConfig, HedgeBuilder, HedgeDelay, HedgeLayer, ReplayBody, RetryLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

/// A status and the headers that go with it.
type Answer = (u16, Vec<(&'static str, &'static str)>);

/// One planned answer: after how long, with what status and headers (or an error).
#[derive(Clone)]
struct Plan {
    after: Duration,
    outcome: Result<Answer, &'static str>,
}

fn ok(ms: u64) -> Plan {
    status(ms, 200)
}

fn status(ms: u64, code: u16) -> Plan {
    Plan {
        after: Duration::from_millis(ms),
        outcome: Ok((code, vec![])),
    }
}

#[derive(Default)]
struct Log {
    /// Per attempt: when it arrived, its headers, its whole body.
    requests: Vec<(Instant, HeaderMap, Bytes)>,
    /// Attempts whose future was dropped before it answered.
    cancelled: u32,
}

type Shared = Arc<Mutex<Log>>;

/// Sets `cancelled` when dropped before `done`.
struct DropFlag(Shared, bool);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.lock().unwrap().cancelled += 1;
        }
    }
}

/// An upstream that answers attempt `i` (in arrival order) by `plans[i]` (the last repeats),
/// reading the whole body first and logging every request.
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
        async move {
            let mut flag = DropFlag(log.clone(), false);
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await?.to_bytes();
            log.lock()
                .unwrap()
                .requests
                .push((Instant::now(), parts.headers, bytes));
            let plan = &plans[(i as usize).min(plans.len() - 1)];
            tokio::time::sleep(plan.after).await;
            flag.1 = true;
            match &plan.outcome {
                Ok((code, headers)) => {
                    let mut b = Response::builder().status(*code);
                    for (k, v) in headers {
                        b = b.header(*k, *v);
                    }
                    Ok(b.body(i).unwrap())
                }
                Err("reset") => Err(BoxError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))),
                Err(_) => Err(BoxError::from(Rejected)),
            }
        }
    });
    (svc, log)
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

/// A fixed 20 ms delay and room for every hedge.
fn fixed() -> HedgeBuilder {
    HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(20)))
        .max_extra_load(1.0)
}

fn get() -> Request<Full<Bytes>> {
    Request::new(Full::new(Bytes::from_static(b"payload")))
}

/// Earns the extra-load share one hedge costs (it starts empty) with two quick calls.
async fn earn<S>(svc: &S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<u32>, Error = BoxError> + Clone,
{
    for _ in 0..2 {
        let _ = svc.clone().oneshot(Request::new(Full::default())).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_is_hedged_and_the_hedge_wins_and_the_first_is_cancelled() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000), ok(5)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(*res.body(), 3, "the hedge's answer");
    assert_eq!(t.elapsed(), Duration::from_millis(25));
    let log = log.lock().unwrap();
    assert_eq!(log.requests.len(), 4);
    assert_eq!(log.cancelled, 1, "the first attempt was dropped");
    let (sent, headers, body) = &log.requests[3];
    assert_eq!(*sent - t, Duration::from_millis(20));
    assert_eq!(headers["x-retry-attempt"], "2");
    assert_eq!(body, "payload");
}

#[tokio::test(start_paused = true)]
async fn a_call_faster_than_the_delay_is_not_hedged() {
    let (up, log) = upstream(vec![ok(19)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    for _ in 0..10 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    assert_eq!(log.lock().unwrap().requests.len(), 12);
}

#[tokio::test(start_paused = true)]
async fn the_first_attempt_wins_when_it_answers_first() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(30), ok(100)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!((*res.body(), t.elapsed()), (2, Duration::from_millis(30)));
    assert_eq!(log.lock().unwrap().cancelled, 1, "the hedge was dropped");
}

#[tokio::test(start_paused = true)]
async fn requests_that_must_not_be_sent_twice_are_not_hedged() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(100)]);
    let svc = fixed().build().unwrap().layer(up.clone());
    earn(&svc).await;
    let post = Request::post("/")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    svc.clone().oneshot(post).await.unwrap();
    assert_eq!(log.lock().unwrap().requests.len(), 3, "a POST is sent once");

    // With an Idempotency-Key, or when the caller opted in, it may be hedged.
    let keyed = Request::post("/")
        .header("idempotency-key", "k1")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    svc.clone().oneshot(keyed).await.unwrap();
    assert_eq!(log.lock().unwrap().requests.len(), 5);
    let _ = up;
    let (up, log) = upstream(vec![ok(0), ok(0), ok(100)]);
    let opted = fixed()
        .hedge_non_idempotent(true)
        .build()
        .unwrap()
        .layer(up);
    earn(&opted).await;
    let post = Request::post("/")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    opted.oneshot(post).await.unwrap();
    assert_eq!(log.lock().unwrap().requests.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_retryable_answer_sends_the_next_hedge_at_once_and_the_last_is_returned_when_all_fail() {
    // A6: a non-fatal status does not end the call while a hedge may still be sent.
    let (up, log) = upstream(vec![ok(0), ok(0), status(5, 503), ok(5)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    let res = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(
        (res.status().as_u16(), t.elapsed()),
        (200, Duration::from_millis(10))
    );
    assert_eq!(
        log.lock().unwrap().requests[3].0 - t,
        Duration::from_millis(5)
    );

    let (up, log) = upstream(vec![ok(0), ok(0), status(5, 503), status(7, 502)]);
    let svc = fixed().max_attempts(2).build().unwrap().layer(up);
    earn(&svc).await;
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(
        (res.status().as_u16(), *res.body()),
        (502, 3),
        "the last answer"
    );
    assert_eq!(
        log.lock().unwrap().requests.len(),
        4,
        "two attempts, no more"
    );
}

#[tokio::test(start_paused = true)]
async fn a_final_answer_from_a_hedge_wins_even_when_it_is_an_error() {
    let (up, _) = upstream(vec![ok(0), ok(0), ok(1000), status(5, 500)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 500);
}

#[tokio::test(start_paused = true)]
async fn a_server_hint_delays_the_next_hedge_and_a_stop_ends_hedging() {
    let hinted = |v| Plan {
        after: Duration::from_millis(5),
        outcome: Ok((503, vec![("retry-after", v)])),
    };
    let (up, log) = upstream(vec![ok(0), ok(0), hinted("2"), ok(5)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let t = Instant::now();
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 200);
    assert_eq!(
        log.lock().unwrap().requests[3].0 - t,
        Duration::from_millis(2005)
    );

    let stop = Plan {
        after: Duration::from_millis(5),
        outcome: Ok((503, vec![("grpc-retry-pushback-ms", "-1")])),
    };
    let (up, log) = upstream(vec![ok(0), ok(0), stop]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 503);
    assert_eq!(log.lock().unwrap().requests.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_policy_refusal_below_is_returned_without_a_hedge() {
    let refused = Plan {
        after: Duration::ZERO,
        outcome: Err("breaker"),
    };
    let (up, log) = upstream(vec![ok(0), ok(0), refused]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    let err = svc.oneshot(get()).await.unwrap_err();
    assert!(PolicyRejected::is_in(&*err));
    assert_eq!(log.lock().unwrap().requests.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn hedges_stay_within_the_share_of_extra_load() {
    // Every other call is slow: each would be hedged if the share allowed it.
    let (up, log) = {
        let n = Arc::new(AtomicU32::new(0));
        let log: Shared = Arc::default();
        let (n2, l2) = (n.clone(), log.clone());
        let svc = service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            let i = n2.fetch_add(1, Ordering::SeqCst);
            l2.lock()
                .unwrap()
                .requests
                .push((Instant::now(), HeaderMap::new(), Bytes::new()));
            async move {
                tokio::time::sleep(Duration::from_millis(if i % 2 == 0 { 100 } else { 1 })).await;
                Ok::<_, Infallible>(Response::new(i))
            }
        });
        (svc, log)
    };
    let svc = HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(20)))
        .build()
        .unwrap()
        .layer(up);
    let calls = 1000;
    let mut tasks = Vec::new();
    for _ in 0..calls {
        tasks.push(tokio::spawn(svc.clone().oneshot(get())));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let sent = log.lock().unwrap().requests.len() as f64;
    let extra = sent / f64::from(calls) - 1.0;
    // 5 % of calls, less what the 10 s decay takes: never more.
    assert!(extra > 0.02 && extra <= 0.05, "extra load {extra}");
}

#[tokio::test(start_paused = true)]
async fn no_hedge_is_sent_at_or_past_the_deadline() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000)]);
    let svc = fixed().build().unwrap().layer(up);
    earn(&svc).await;
    // 20 ms left: the hedge's time would be the deadline itself.
    let mut req = get();
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_millis(20)));
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(*res.body(), 2);
    assert_eq!(log.lock().unwrap().requests.len(), 3);
    // 21 ms left: it goes.
    let mut req = get();
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_millis(21)));
    let _ = svc.oneshot(req).await;
    assert_eq!(log.lock().unwrap().requests.len(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_shared_retry_budget_that_is_spent_stops_hedges() {
    let retry = RetryLayer::builder()
        .budget(Some(BudgetConfig {
            ratio: 0.001,
            min_per_sec: 1,
            window: Duration::from_secs(1),
        }))
        .build()
        .unwrap();
    let budget = retry.budget().unwrap();
    while budget.withdraw() {}
    let (up, log) = upstream(vec![ok(0), ok(0), ok(100)]);
    let svc = fixed()
        .retry_budget(Some(budget.clone()))
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    svc.oneshot(get()).await.unwrap();
    assert_eq!(log.lock().unwrap().requests.len(), 3, "no token, no hedge");
    assert!(budget.balance() < 1.0);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_cancels_every_attempt() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000)]);
    let svc = fixed().max_attempts(3).build().unwrap().layer(up);
    earn(&svc).await;
    let call = svc.oneshot(get());
    let _ = tokio::time::timeout(Duration::from_millis(50), call).await;
    let log = log.lock().unwrap();
    assert_eq!(
        log.requests.len(),
        2 + 3,
        "the call and two hedges, 20 ms apart"
    );
    assert_eq!(log.cancelled, 3);
}

/// A body that yields its chunks one at a time, each after the test lets it through: two
/// attempts read it at once, and both must be woken as it grows.
struct Trickle {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl Body for Trickle {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test(start_paused = true)]
async fn two_attempts_read_one_streamed_body_at_once() {
    let (up, log) = upstream::<Trickle>(vec![ok(0), ok(0), ok(1000), ok(5)]);
    let svc = fixed().build().unwrap().layer(up);
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(tx);
        svc.clone()
            .oneshot(Request::new(Trickle { rx }))
            .await
            .unwrap();
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let call = tokio::spawn(svc.oneshot(Request::new(Trickle { rx })));
    tx.send(Bytes::from_static(b"one ")).await.unwrap();
    // The hedge starts while the body is still being written: it replays "one " and then
    // waits on the caller's body beside the first attempt.
    tokio::time::sleep(Duration::from_millis(30)).await;
    tx.send(Bytes::from_static(b"two")).await.unwrap();
    drop(tx);
    let res = call.await.unwrap().unwrap();
    assert_eq!(*res.body(), 3);
    let log = log.lock().unwrap();
    let bodies: Vec<_> = log.requests[2..].iter().map(|r| r.2.clone()).collect();
    assert_eq!(bodies, ["one two", "one two"]);
}

#[tokio::test(start_paused = true)]
async fn a_learnt_delay_waits_for_samples_then_hedges_the_slowest() {
    // One call in ten takes 100 ms, the rest 10 ms; p80 learnt from 20 samples.
    let n = Arc::new(AtomicU32::new(0));
    let sent = Arc::new(AtomicU32::new(0));
    let (n2, s2) = (n.clone(), sent.clone());
    let up = service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
        s2.fetch_add(1, Ordering::SeqCst);
        let hedge = req.headers().contains_key("x-retry-attempt");
        let i = if hedge {
            1
        } else {
            n2.fetch_add(1, Ordering::SeqCst)
        };
        async move {
            let ms = if i % 10 == 9 { 100 } else { 10 };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, Infallible>(Response::new(i))
        }
    });
    let layer = HedgeLayer::builder()
        .delay(HedgeDelay::Percentile(0.8))
        .min_samples(20)
        .max_extra_load(0.5)
        .build()
        .unwrap();
    let svc = layer.layer(up);
    for _ in 0..19 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    assert_eq!(layer.current_delay(), None);
    assert_eq!(
        sent.load(Ordering::SeqCst),
        19,
        "nothing hedged before the samples"
    );
    svc.clone().oneshot(get()).await.unwrap();
    let d = layer.current_delay().unwrap();
    assert!(
        d >= Duration::from_millis(10) && d < Duration::from_millis(13),
        "{d:?}"
    );
    let before = sent.load(Ordering::SeqCst);
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        svc.clone().oneshot(get()).await.unwrap();
        slowest = slowest.max(t.elapsed());
    }
    // The two slow calls were hedged and answered by their hedges.
    assert_eq!(sent.load(Ordering::SeqCst) - before, 22);
    assert!(slowest < Duration::from_millis(30), "{slowest:?}");
}

#[tokio::test(start_paused = true)]
async fn grpc_hedges_say_how_many_attempts_came_before() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000), ok(5)]);
    let svc = fixed()
        .hedge_non_idempotent(true)
        .build()
        .unwrap()
        .layer(up);
    earn(&svc).await;
    let req = Request::post("/pkg.Svc/Method")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    svc.oneshot(req).await.unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.requests[3].1["grpc-previous-rpc-attempts"], "1");
    assert!(!log.requests[2].1.contains_key("grpc-previous-rpc-attempts"));
}

#[test]
fn bad_settings_are_refused_at_build_time() {
    let b = HedgeLayer::builder;
    assert_eq!(
        b().max_attempts(0).build().unwrap_err(),
        InvalidHedgeConfig::Attempts
    );
    assert_eq!(
        b().max_attempts(6).build().unwrap_err(),
        InvalidHedgeConfig::Attempts
    );
    for share in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
        assert_eq!(
            b().max_extra_load(share).build().unwrap_err(),
            InvalidHedgeConfig::ExtraLoad
        );
    }
    for p in [0.0, 1.01, f64::NAN] {
        let e = b().delay(HedgeDelay::Percentile(p)).build().unwrap_err();
        assert_eq!(e, InvalidHedgeConfig::Percentile);
    }
    assert_eq!(
        b().min_samples(0).build().unwrap_err(),
        InvalidHedgeConfig::MinSamples
    );
    assert_eq!(
        b().window(Duration::ZERO).build().unwrap_err(),
        InvalidHedgeConfig::Window
    );
    assert_eq!(
        b().name("").build().unwrap_err(),
        InvalidHedgeConfig::EmptyName
    );
    let e = b()
        .attempt_header(Some(http::header::HOST))
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("host"));
    // Extremes that are valid build.
    b().delay(HedgeDelay::Fixed(Duration::MAX)).build().unwrap();
    b().delay(HedgeDelay::Fixed(Duration::ZERO))
        .build()
        .unwrap();
    b().delay(HedgeDelay::Percentile(1.0))
        .window(Duration::MAX)
        .min_samples(u32::MAX)
        .build()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn extreme_delays_neither_panic_nor_hang() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(50)]);
    let never = HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::MAX))
        .max_extra_load(1.0)
        .build()
        .unwrap()
        .layer(up.clone());
    earn(&never).await;
    never.oneshot(get()).await.unwrap();
    assert_eq!(log.lock().unwrap().requests.len(), 3);
    let (up, log) = upstream(vec![ok(0), ok(0), ok(50)]);
    let at_once = HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::ZERO))
        .max_extra_load(1.0)
        .build()
        .unwrap()
        .layer(up);
    earn(&at_once).await;
    let t = Instant::now();
    at_once.oneshot(get()).await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_millis(50));
    assert_eq!(
        log.lock().unwrap().requests.len(),
        4,
        "the hedge went at once"
    );
    let _ = Method::GET;
}

/// Marks every request with its `tag` (a stand-in for a credential or a target the caller
/// changes through `get_mut`).
#[derive(Clone)]
struct Tagged<S> {
    inner: S,
    tag: &'static str,
}

impl<S, B> Service<Request<B>> for Tagged<S>
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
            .insert("x-tag", http::HeaderValue::from_static(self.tag));
        self.inner.call(req)
    }
}

/// The service below changed through `get_mut` after earlier calls: a later call's hedge
/// goes through the changed service too, not the copy the earlier calls kept to hedge from.
#[tokio::test(start_paused = true)]
async fn a_service_changed_through_get_mut_takes_the_hedges_too() {
    let (up, log) = upstream(vec![ok(0), ok(0), ok(1000), ok(5)]);
    let mut svc = fixed().build().unwrap().layer(Tagged {
        inner: up,
        tag: "old",
    });
    earn(&svc).await;
    svc.get_mut().tag = "new";
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(*res.body(), 3, "the hedge's answer");
    let log = log.lock().unwrap();
    let tags: Vec<_> = log.requests.iter().map(|(_, h, _)| &h["x-tag"]).collect();
    assert_eq!(tags, ["old", "old", "new", "new"]);
}
