//! Hostile tests of nested timeouts and deadlines. A hostile pass found that timeout futures
//! which relied on a timer below them (reported through a thread-local slot) to wake the task
//! could hang: whatever sits between may drop the call below, move it to another task or
//! poll it with another waker, and then wait on something with no timer. Every timeout now
//! arms its own timer; these tests hold it to that.
//!
//! The promise under attack: calls never hang and deadlines hold. Every test runs on paused
//! tokio time, and every call is wrapped in a guard (`GUARD`, paused time) so that a hang
//! fails the test instead of blocking it.

mod support;

use support::timers::{Body, BoxCall, Mid, limit_of, ok, poll_once, req};

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use steadfast::common::{BoxError, Deadline};
use steadfast::retry::{Backoff, HedgeDelay, HedgeLayer, RetryLayer};
use steadfast::timeout::error::Elapsed;
use steadfast::timeout::{SetDeadlineLayer, TimeoutLayer};
use steadfast_testkit::{Fault, FaultServer};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

/// Paused time after which a call still pending counts as hung.
const GUARD: Duration = Duration::from_secs(600);

type NeverFn = fn(Request<Body>) -> std::future::Pending<Result<Response<Body>, BoxError>>;

/// An upstream that never answers.
fn never_answers() -> tower::util::ServiceFn<NeverFn> {
    service_fn((|_req| std::future::pending()) as NeverFn)
}

/// `e` is a timeout's `Elapsed`, and it came by `by` after `start`.
#[track_caller]
fn ended_by_a_limit(e: &BoxError, start: Instant, by: Duration) {
    assert!(limit_of(e).is_some(), "{e}");
    assert!(start.elapsed() <= by, "ended after {:?}", start.elapsed());
}

// ---------------------------------------------------------------------------------------
// Nested limits: longer, equal, shorter, zero, Duration::MAX, one nanosecond.
// ---------------------------------------------------------------------------------------

/// Every pair of limits ends the call at the earlier one (tokio's timers round up to the
/// millisecond), with or without the outer one sharing its deadline below.
#[tokio::test(start_paused = true)]
async fn nested_limits_end_the_call_at_the_earlier_one() {
    let s = Duration::from_secs;
    let ns = Duration::from_nanos;
    let cases = [
        (s(3), s(1), s(1)),
        (s(1), s(3), s(1)),
        (s(2), s(2), s(2)),
        (s(2), Duration::ZERO, Duration::ZERO),
        (Duration::ZERO, s(2), Duration::ZERO),
        (s(1), Duration::MAX, s(1)),
        (Duration::MAX, s(1), s(1)),
        (s(1), ns(1), ns(1)),
        (ns(1), s(1), ns(1)),
        (ns(2), ns(1), ns(1)),
    ];
    let mut failures = Vec::new();
    for (outer, inner, want) in cases {
        for own in [false, true] {
            let svc = TimeoutLayer::builder()
                .limit(outer)
                .propagate_own(own)
                .build()
                .unwrap()
                .layer(TimeoutLayer::new(inner).layer(never_answers()));
            let start = Instant::now();
            match tokio::time::timeout(GUARD, svc.oneshot(req())).await {
                Err(_) => failures.push(format!("{outer:?} over {inner:?} (own {own}): hung")),
                Ok(Ok(_)) => failures.push(format!("{outer:?} over {inner:?}: answered")),
                Ok(Err(e)) => {
                    let took = start.elapsed();
                    // The timer wheel's resolution is one millisecond.
                    let late = took.saturating_sub(want) > Duration::from_millis(1);
                    if took < want || late || limit_of(&e).is_none() {
                        failures.push(format!(
                            "{outer:?} over {inner:?} (own {own}): ended after {took:?} with {e}, want {want:?}"
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// An inherited deadline already passed fails the call at once without reaching the inner
/// service; one far in the future (or `Duration::MAX` away) leaves the layer's own limit.
#[tokio::test(start_paused = true)]
async fn inherited_deadlines_passed_or_far_away() {
    let reached = Arc::new(AtomicU32::new(0));
    let counted = {
        let reached = reached.clone();
        service_fn(move |_req: Request<Body>| {
            reached.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<Response<Body>, BoxError>>()
        })
    };
    let svc = TimeoutLayer::new(Duration::from_secs(2)).layer(counted);
    tokio::time::advance(Duration::from_secs(5)).await;

    // Passed, as an extension and as the ambient deadline.
    let past = Deadline::at(Instant::now() - Duration::from_secs(1));
    let mut r = req();
    r.extensions_mut().insert(past);
    let e = svc.clone().oneshot(r).await.unwrap_err();
    assert_eq!(limit_of(&e), Some(Duration::ZERO));
    let start = Instant::now();
    let e = tokio::time::timeout(GUARD, past.scope(svc.clone().oneshot(req())))
        .await
        .expect("not hung")
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(Duration::ZERO));
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "nothing sent past a deadline"
    );

    // Exactly now.
    let now = Deadline::at(Instant::now());
    let e = now.scope(svc.clone().oneshot(req())).await.unwrap_err();
    assert_eq!(limit_of(&e), Some(Duration::ZERO));

    // Far away: the layer's own 2 s.
    for far in [
        Deadline::after(Duration::MAX),
        Deadline::after(Duration::from_secs(3600)),
    ] {
        let start = Instant::now();
        let e = tokio::time::timeout(GUARD, far.scope(svc.clone().oneshot(req())))
            .await
            .expect("not hung")
            .unwrap_err();
        assert_eq!(limit_of(&e), Some(Duration::from_secs(2)));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}

// ---------------------------------------------------------------------------------------
// The inner timeout's future dropped, moved or left unpolled while the outer one waits.
// ---------------------------------------------------------------------------------------

/// What a service between the outer and the inner timeout does with the inner call (whose
/// limit, 1 s, is within the outer's 3 s) before it waits on something no timer bounds.
#[derive(Clone, Copy, Debug)]
enum Between {
    /// Awaits the inner call to its `Elapsed` (the commit's own test).
    AwaitsIt,
    /// Polls it once and keeps it, unpolled, while it waits.
    PollsOnceAndKeepsIt,
    /// Polls it once, spawns it and awaits the task.
    SpawnsItAndAwaits,
    /// Races it against an answer already at hand (`select`): the call loses and is
    /// dropped in the poll that polled it.
    LosesASelect,
    /// Bounds it with `tokio::time::timeout` of 200 ms (shorter than the inner 1 s).
    TokioTimeout,
    /// Bounds it with a `tokio::select!` against a 200 ms sleep, call polled first.
    SelectAgainstSleep,
    /// Probes it with `now_or_never` (a no-op waker), then drops it.
    NowOrNever,
    /// Polls it once, then spawns it detached.
    PollsOnceAndSpawnsIt,
    /// Probes it with `now_or_never` through a reference and keeps it: its timer holds a
    /// no-op waker.
    ProbesAndKeepsIt,
}

fn between(kind: Between) -> Mid {
    let inner = TimeoutLayer::new(Duration::from_secs(1)).layer(never_answers());
    BoxCloneService::new(service_fn(move |req: Request<Body>| {
        let mut inner = inner.clone();
        async move {
            // Boxed as a `dyn Future + Send` here, where its type is concrete (an async block
            // holding it otherwise trips rustc's higher-ranked `Send` check).
            let call: BoxCall = Box::pin(inner.call(req));
            match kind {
                Between::AwaitsIt => {
                    let e = call.await.unwrap_err();
                    assert!(limit_of(&e).is_some());
                }
                Between::PollsOnceAndKeepsIt => {
                    let mut call = call;
                    assert!(poll_once(&mut call).await.is_pending());
                    // Kept alive (never polled again) while waiting below.
                    std::future::pending::<()>().await;
                    drop(call);
                }
                Between::SpawnsItAndAwaits => {
                    let mut call = call;
                    assert!(poll_once(&mut call).await.is_pending());
                    let e = tokio::spawn(call).await.unwrap().unwrap_err();
                    assert!(limit_of(&e).is_some());
                }
                Between::LosesASelect => {
                    let at_hand = Box::pin(std::future::ready(()));
                    let _ = futures_util::future::select(call, at_hand).await;
                }
                Between::TokioTimeout => {
                    let r = tokio::time::timeout(Duration::from_millis(200), call).await;
                    assert!(r.is_err(), "cut at 200 ms");
                }
                Between::SelectAgainstSleep => {
                    tokio::select! {
                        biased;
                        _ = call => unreachable!("the upstream never answers"),
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                Between::NowOrNever => {
                    assert!(call.now_or_never().is_none());
                }
                Between::ProbesAndKeepsIt => {
                    let mut call = call;
                    assert!((&mut call).now_or_never().is_none());
                    std::future::pending::<()>().await;
                    drop(call);
                }
                Between::PollsOnceAndSpawnsIt => {
                    let mut call = call;
                    assert!(poll_once(&mut call).await.is_pending());
                    drop(tokio::spawn(call));
                }
            }
            // Nothing below bounds this wait: only the outer deadline can end the call.
            std::future::pending::<()>().await;
            Ok::<_, BoxError>(ok())
        }
    }))
}

/// The outcomes of `kind` under a client timeout of 3 s (not sharing, then sharing its
/// deadline below) and a server deadline of 3 s: a description of each one that did not end
/// at 3 s.
async fn outer_outcomes(kind: Between) -> Vec<String> {
    let mut failures = Vec::new();
    for own in [false, true] {
        let outer = TimeoutLayer::builder()
            .limit(Duration::from_secs(3))
            .propagate_own(own)
            .build()
            .unwrap()
            .layer(between(kind));
        let start = Instant::now();
        match tokio::time::timeout(GUARD, outer.oneshot(req())).await {
            Err(_) => failures.push(format!(
                "{kind:?} under a 3 s TimeoutLayer (propagate_own {own}): still pending after {GUARD:?}"
            )),
            Ok(Ok(_)) => failures.push(format!("{kind:?}: answered")),
            Ok(Err(e)) => {
                if start.elapsed() != Duration::from_secs(3)
                    || limit_of(&e) != Some(Duration::from_secs(3))
                {
                    failures.push(format!(
                        "{kind:?} (propagate_own {own}): ended after {:?} with {e}",
                        start.elapsed()
                    ));
                }
            }
        }
    }
    let server = SetDeadlineLayer::new(Duration::from_secs(3)).layer(between(kind));
    let start = Instant::now();
    match tokio::time::timeout(GUARD, server.oneshot(req())).await {
        Err(_) => failures.push(format!(
            "{kind:?} under a 3 s SetDeadlineLayer: no answer after {GUARD:?}"
        )),
        Ok(Err(e)) => failures.push(format!("{kind:?} under the server deadline: {e}")),
        Ok(Ok(res)) => {
            if res.status() != StatusCode::GATEWAY_TIMEOUT
                || start.elapsed() != Duration::from_secs(3)
            {
                failures.push(format!(
                    "{kind:?} under the server deadline: {} after {:?}",
                    res.status(),
                    start.elapsed()
                ));
            }
        }
    }
    failures
}

/// Controls: the inner call's timer stays with the task until it fires, so the outer one
/// is polled at 1 s and arms its own timer then.
#[tokio::test(start_paused = true)]
async fn the_outer_deadline_holds_while_the_covering_timer_lives() {
    let mut failures = Vec::new();
    for kind in [
        Between::AwaitsIt,
        Between::PollsOnceAndKeepsIt,
        Between::SpawnsItAndAwaits,
    ] {
        failures.extend(outer_outcomes(kind).await);
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// One test per way of leaving the covered call behind (see [`Between`]): the outer
/// deadline must still fire on time.
macro_rules! the_outer_deadline_holds {
    ($($(#[doc = $doc:literal])* $name:ident => $kind:ident;)*) => {$(
        $(#[doc = $doc])*
        #[tokio::test(start_paused = true)]
        async fn $name() {
            let failures = outer_outcomes(Between::$kind).await;
            assert!(failures.is_empty(), "{failures:#?}");
        }
    )*};
}

the_outer_deadline_holds! {
    /// `select` against an answer already at hand: the covered call reports its timer, loses
    /// and is dropped in the same poll; the outer deadline must still fire at 3 s.
    the_outer_deadline_holds_after_the_inner_call_loses_a_select => LosesASelect;
    /// `tokio::time::timeout` shorter than the inner call's own limit: at 200 ms it polls the
    /// call (which reports its 1 s timer), fires, and drops it.
    the_outer_deadline_holds_after_a_tokio_timeout_drops_the_inner_call => TokioTimeout;
    /// `tokio::select!` against a sleep, the call's branch first.
    the_outer_deadline_holds_after_a_select_against_a_sleep => SelectAgainstSleep;
    /// A probe with `now_or_never`: the call is polled with a no-op waker and dropped.
    the_outer_deadline_holds_after_a_now_or_never_probe => NowOrNever;
    /// The covered call is polled once, then moved to a task of its own that nobody awaits: its
    /// timer now wakes that task, not this one.
    the_outer_deadline_holds_after_a_probe_that_keeps_the_inner_call => ProbesAndKeepsIt;
    the_outer_deadline_holds_after_the_inner_call_moves_to_another_task => PollsOnceAndSpawnsIt;
}

// ---------------------------------------------------------------------------------------
// The same over real sockets: the server preset, a handler calling through the client
// preset (hyper-util) to an upstream that never answers.
// ---------------------------------------------------------------------------------------

/// What the handler does with its client call before it waits on a `Notify` nobody
/// notifies.
#[derive(Clone, Copy, Debug)]
enum Handler {
    /// Awaits the client call to its end (the preset's own deadline ends it).
    Awaits,
    /// `tokio::time::timeout(500 ms, call)`.
    TokioTimeout,
    /// A biased `tokio::select!` over the hanging call and a call to a healthy upstream.
    SelectTwoCalls,
}

async fn real_server(kind: Handler) -> (std::net::SocketAddr, FaultServer, FaultServer) {
    let hang = FaultServer::start().await;
    hang.set_default(Fault::Hang);
    let fast = FaultServer::start().await;
    fast.set_default(Fault::status(200).after(Duration::from_millis(100)));
    let client = steadfast::client::http()
        .build()
        .unwrap()
        .hyper_client::<Body>();
    let (hang_url, fast_url) = (hang.url("/"), fast.url("/"));
    let never = Arc::new(tokio::sync::Notify::new());
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || {
                let (client, hang_url, fast_url) =
                    (client.clone(), hang_url.clone(), fast_url.clone());
                let never = never.clone();
                async move {
                    let to_hang = Request::get(hang_url).body(Body::default()).unwrap();
                    match kind {
                        Handler::Awaits => {
                            let e = client.oneshot(to_hang).await.unwrap_err();
                            assert!(limit_of(&e).is_some(), "{e}");
                        }
                        Handler::TokioTimeout => {
                            let r =
                                tokio::time::timeout(Duration::from_millis(500), client.oneshot(to_hang))
                                    .await;
                            assert!(r.is_err());
                        }
                        Handler::SelectTwoCalls => {
                            let to_fast = Request::get(fast_url).body(Body::default()).unwrap();
                            tokio::select! {
                                biased;
                                _ = client.clone().oneshot(to_hang) => unreachable!("never answers"),
                                r = client.clone().oneshot(to_fast) => assert_eq!(r.unwrap().status(), 200),
                            }
                        }
                    }
                    never.notified().await;
                    "unreachable"
                }
            }),
        )
        .layer(
            steadfast::server::http()
                .timeout(Duration::from_secs(3))
                .build()
                .unwrap(),
        );
    (support::serve_axum(app).await, hang, fast)
}

/// Each handler under the server preset (3 s), with no inbound budget and with
/// `x-request-timeout-ms: 2000`: a description of each call not answered 504 on time.
async fn real_outcomes(kind: Handler) -> Vec<String> {
    let (addr, _hang, _fast) = real_server(kind).await;
    let mut failures = Vec::new();
    for (budget, want) in [(None, 3000), (Some("2000"), 2000)] {
        let mut r = support::get(addr, "/");
        if let Some(b) = budget {
            r.headers_mut()
                .insert("x-request-timeout-ms", b.parse().unwrap());
        }
        let start = Instant::now();
        match tokio::time::timeout(GUARD, support::http_client().request(r)).await {
            Err(_) => failures.push(format!(
                "{kind:?}, inbound budget {budget:?}: no answer after {GUARD:?} (want 504 at {want} ms)"
            )),
            Ok(Err(e)) => failures.push(format!("{kind:?}: {e}")),
            Ok(Ok(res)) => {
                let took = start.elapsed();
                if res.status() != 504 || took != Duration::from_millis(want) {
                    failures.push(format!(
                        "{kind:?}, inbound budget {budget:?}: {} after {took:?} (want 504 at {want} ms)",
                        res.status()
                    ));
                }
            }
        }
    }
    failures
}

#[tokio::test(start_paused = true)]
async fn real_server_preset_answers_on_time_after_an_awaited_client_call() {
    let failures = real_outcomes(Handler::Awaits).await;
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(start_paused = true)]
async fn real_server_preset_answers_on_time_after_a_tokio_timeout_around_a_client_call() {
    let failures = real_outcomes(Handler::TokioTimeout).await;
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(start_paused = true)]
async fn real_server_preset_answers_on_time_after_a_select_over_two_client_calls() {
    let failures = real_outcomes(Handler::SelectTwoCalls).await;
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// Client side: library layers between the total and the attempt timeout.
// ---------------------------------------------------------------------------------------

/// Ready for its first call only, never woken again; the first call never answers.
#[derive(Clone, Default)]
struct ThenStuck(Arc<AtomicU32>);

impl<B> Service<Request<B>> for ThenStuck {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::future::Pending<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.0.load(Ordering::SeqCst) == 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::pending()
    }
}

/// The documented client stack order with a `tower::timeout` (a per-try cap) between the
/// retry layer and the steadfast attempt timeout: at 200 ms the tower timeout polls the
/// attempt (which reports its 1 s timer) and fails; the retry layer (no backoff) then waits
/// for a readiness that never comes. The total timeout (3 s) must end the call.
#[tokio::test(start_paused = true)]
async fn the_total_timeout_bounds_a_retry_after_a_tower_timeout_cut_the_attempt() {
    let mut failures = Vec::new();
    for backoff_ms in [0u64, 10] {
        let transport = ThenStuck::default();
        let stack = ServiceBuilder::new()
            .layer(
                TimeoutLayer::builder()
                    .limit(Duration::from_secs(3))
                    .share_own(true)
                    .build()
                    .unwrap(),
            )
            .layer(
                RetryLayer::builder()
                    .backoff(Backoff::constant(Duration::from_millis(backoff_ms)))
                    .budget(None)
                    .build()
                    .unwrap(),
            )
            .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
                200,
            )))
            .layer(TimeoutLayer::new(Duration::from_secs(1)))
            .service(transport.clone());
        let start = Instant::now();
        match tokio::time::timeout(GUARD, stack.oneshot(req())).await {
            Err(_) => failures.push(format!(
                "backoff {backoff_ms} ms: still pending after {GUARD:?} ({} calls sent)",
                transport.0.load(Ordering::SeqCst)
            )),
            Ok(Ok(_)) => failures.push("answered".into()),
            Ok(Err(e)) => {
                if start.elapsed() != Duration::from_secs(3) {
                    failures.push(format!(
                        "backoff {backoff_ms} ms: ended after {:?} with {e}",
                        start.elapsed()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A transport that itself calls through a steadfast timeout (e.g. a cache client with a
/// 500 ms limit) but gives that call only 200 ms (`tokio::time::timeout`), then waits on
/// a slower path with no timer: the client preset's attempt (1 s) and total (3 s) timeouts
/// must still end the call.
#[tokio::test(start_paused = true)]
async fn the_client_preset_bounds_a_transport_that_abandons_a_timed_sub_call() {
    let cache = TimeoutLayer::new(Duration::from_millis(500)).layer(never_answers());
    let transport = service_fn(move |_req: Request<steadfast::retry::ReplayBody<Body>>| {
        let cache = cache.clone();
        async move {
            let fast = tokio::time::timeout(Duration::from_millis(200), cache.oneshot(req())).await;
            assert!(fast.is_err());
            std::future::pending::<()>().await;
            Ok::<_, BoxError>(ok())
        }
    });
    let stack = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .build()
        .unwrap()
        .layer(transport);
    let start = Instant::now();
    let out = tokio::time::timeout(GUARD, stack.oneshot(req())).await;
    let e = match out {
        Err(_) => panic!("the client preset's call is still pending after {GUARD:?}"),
        Ok(r) => r.unwrap_err(),
    };
    ended_by_a_limit(&e, start, Duration::from_secs(3));
}

/// The preset's own test, varied: a retry with a backoff between attempts, then a
/// readiness that never comes.
#[tokio::test(start_paused = true)]
async fn the_client_preset_bounds_a_retry_waiting_for_readiness_after_a_backoff() {
    #[derive(Clone, Default)]
    struct Answers503ThenStuck(Arc<AtomicU32>);
    impl<B> Service<Request<B>> for Answers503ThenStuck {
        type Response = Response<Body>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Response<Body>, BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            if self.0.load(Ordering::SeqCst) < 2 {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
        fn call(&mut self, _: Request<B>) -> Self::Future {
            self.0.fetch_add(1, Ordering::SeqCst);
            let mut res = ok();
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            std::future::ready(Ok(res))
        }
    }
    let stack = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(2))
        .retry(|r| r.backoff(Backoff::constant(Duration::from_millis(100))))
        .build()
        .unwrap()
        .layer(Answers503ThenStuck::default());
    let start = Instant::now();
    let e = tokio::time::timeout(GUARD, stack.oneshot(req()))
        .await
        .expect("ended by the total timeout")
        .unwrap_err();
    assert_eq!(limit_of(&e), Some(Duration::from_secs(2)));
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

/// A hedge layer between the total timeout (1.5 s) and per-attempt timeouts (1 s): the
/// primary never answers, the hedge's service never becomes ready.
#[tokio::test(start_paused = true)]
async fn a_hedge_under_a_total_timeout_ends_by_the_total_deadline() {
    // A fresh transport per round: `ThenStuck` is never ready again, and readiness is not
    // what these timeouts bound (`cover_ready` is off).
    let hedge = HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(200)))
        .max_extra_load(1.0)
        .build()
        .unwrap();
    for _ in 0..3 {
        let stack = ServiceBuilder::new()
            .layer(
                TimeoutLayer::builder()
                    .limit(Duration::from_millis(1500))
                    .share_own(true)
                    .build()
                    .unwrap(),
            )
            .layer(hedge.clone())
            .layer(TimeoutLayer::new(Duration::from_secs(1)))
            .service(ThenStuck::default());
        let start = Instant::now();
        let e = tokio::time::timeout(GUARD, stack.oneshot(req()))
            .await
            .expect("not hung")
            .unwrap_err();
        ended_by_a_limit(&e, start, Duration::from_millis(1500));
    }
    // Hedges that do get sent, to an upstream that never answers.
    let stack =
        ServiceBuilder::new()
            .layer(
                TimeoutLayer::builder()
                    .limit(Duration::from_millis(1500))
                    .share_own(true)
                    .build()
                    .unwrap(),
            )
            .layer(
                HedgeLayer::builder()
                    .delay(HedgeDelay::Fixed(Duration::from_millis(200)))
                    .max_attempts(5)
                    .max_extra_load(1.0)
                    .build()
                    .unwrap(),
            )
            .layer(TimeoutLayer::new(Duration::from_secs(1)))
            .service(never_answers().map_request(
                |r: Request<steadfast::retry::ReplayBody<Body>>| r.map(|_| Body::default()),
            ));
    for _ in 0..3 {
        let start = Instant::now();
        let e = tokio::time::timeout(GUARD, stack.clone().oneshot(req()))
            .await
            .expect("not hung")
            .unwrap_err();
        ended_by_a_limit(&e, start, Duration::from_millis(1500));
    }
}

/// `tower::buffer::Buffer` between the outer and the inner timeout: the inner call is made
/// by the buffer's worker task (which knows no deadline) and polled by the caller.
#[tokio::test(start_paused = true)]
async fn a_buffer_between_the_timeouts_keeps_the_earlier_limit() {
    let s = Duration::from_secs;
    for (outer, inner, want) in [(s(3), s(1), s(1)), (s(1), s(3), s(1)), (s(2), s(2), s(2))] {
        for own in [false, true] {
            for yield_first in [false, true] {
                let buffered =
                    tower::buffer::Buffer::new(TimeoutLayer::new(inner).layer(never_answers()), 8);
                let mut svc = TimeoutLayer::builder()
                    .limit(outer)
                    .propagate_own(own)
                    .build()
                    .unwrap()
                    .layer(buffered);
                let start = Instant::now();
                svc.ready().await.unwrap();
                let fut = svc.call(req());
                if yield_first {
                    // The worker makes the inner call before the caller first polls.
                    tokio::task::yield_now().await;
                    tokio::task::yield_now().await;
                }
                let e = tokio::time::timeout(GUARD, fut)
                    .await
                    .expect("not hung")
                    .unwrap_err();
                assert_eq!(
                    start.elapsed(),
                    want,
                    "{outer:?} / buffer / {inner:?}, own {own}, yield {yield_first}: {e}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Readiness covered by the limit (`cover_ready`), cancelled and reused.
// ---------------------------------------------------------------------------------------

/// A service whose readiness a test opens and closes.
#[derive(Clone, Default)]
struct Gate {
    open: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl Gate {
    fn set(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().unwrap().take() {
            w.wake();
        }
    }
}

impl Service<Request<Body>> for Gate {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.open.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        *self.waker.lock().unwrap() = Some(cx.waker().clone());
        Poll::Pending
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        std::future::ready(Ok(ok()))
    }
}

/// A readiness wait abandoned at 100 ms (its caller cancelled) leaves its timer in the
/// service; the next wait, ten seconds later, must get its own 1 s, not fire at once on the
/// old timer. The gate opens 500 ms into the second wait: the call should succeed.
#[tokio::test(start_paused = true)]
async fn an_abandoned_readiness_wait_does_not_shorten_the_next_one() {
    let gate = Gate::default();
    let mut svc = TimeoutLayer::builder()
        .limit(Duration::from_secs(1))
        .cover_ready(true)
        .build()
        .unwrap()
        .layer(gate.clone());
    let abandoned = tokio::time::timeout(Duration::from_millis(100), svc.ready()).await;
    assert!(abandoned.is_err(), "the gate is closed");
    tokio::time::sleep(Duration::from_secs(10)).await;

    let opener = {
        let gate = gate.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            gate.set(true);
        })
    };
    let start = Instant::now();
    let out = tokio::time::timeout(GUARD, async {
        svc.ready().await?;
        svc.call(req()).await
    })
    .await
    .expect("not hung");
    let waited = start.elapsed();
    opener.await.unwrap();
    match out {
        Ok(res) => {
            assert_eq!(res.status(), 200);
            assert_eq!(waited, Duration::from_millis(500));
        }
        Err(e) => panic!(
            "the second readiness wait failed after {waited:?} (its limit is 1 s, the gate opened at 500 ms): {e}"
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Cancellation at every await, then reuse.
// ---------------------------------------------------------------------------------------

/// Answers hosts starting with `fail` 503 after 100 ms, others 200 after 200 ms.
#[derive(Clone, Default)]
struct Scripted {
    calls: Arc<AtomicU32>,
}

impl<B> Service<Request<B>> for Scripted {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let fail = req.uri().host().is_some_and(|h| h.starts_with("fail"));
        Box::pin(async move {
            if fail {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut res = ok();
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                Ok(res)
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(ok())
            }
        })
    }
}

/// The client preset's call dropped at every 25 ms of a retrying call (attempts, backoffs),
/// then the same service reused: a healthy call answers in exactly 200 ms each time, and a
/// call to a failing host still ends by its total deadline.
#[tokio::test(start_paused = true)]
async fn the_client_preset_survives_cancellation_at_every_point() {
    let stack = steadfast::client::http()
        .attempt_timeout(Duration::from_millis(250))
        .total_timeout(Duration::from_secs(1))
        .retry(|r| r.backoff(Backoff::constant(Duration::from_millis(50))))
        .build()
        .unwrap();
    let svc = stack.layer(Scripted::default());
    for i in 0..48u64 {
        let cut = Duration::from_millis(25 * i);
        let failing = Request::get(format!("http://fail{i}.test/"))
            .body(Body::default())
            .unwrap();
        let start = Instant::now();
        let r = tokio::time::timeout(cut, svc.clone().oneshot(failing)).await;
        if let Ok(done) = r {
            // Not cut: it ended by itself (retries exhausted or the total deadline).
            assert!(start.elapsed() <= Duration::from_secs(1), "cut {cut:?}");
            assert!(done.is_ok() || done.is_err());
        }
        let healthy = Request::get(format!("http://ok{i}.test/"))
            .body(Body::default())
            .unwrap();
        let start = Instant::now();
        let res = tokio::time::timeout(GUARD, svc.clone().oneshot(healthy))
            .await
            .expect("not hung")
            .unwrap_or_else(|e| panic!("after a cut at {cut:?}: {e}"));
        assert_eq!(res.status(), 200);
        let body = res.into_body().collect().await.unwrap();
        assert!(body.to_bytes().is_empty());
        assert_eq!(start.elapsed(), Duration::from_millis(200), "cut {cut:?}");
    }
}

/// The server deadline's future dropped at every 250 ms of a covered client call, then the
/// service reused: each call is answered 504 at its deadline.
#[tokio::test(start_paused = true)]
async fn the_server_deadline_survives_cancellation_and_reuse() {
    let svc = SetDeadlineLayer::new(Duration::from_secs(2)).layer(between(Between::AwaitsIt));
    for i in 0..10u64 {
        let cut = Duration::from_millis(250 * i);
        let _ = tokio::time::timeout(cut, svc.clone().oneshot(req())).await;
        let start = Instant::now();
        let res = tokio::time::timeout(GUARD, svc.clone().oneshot(req()))
            .await
            .expect("not hung")
            .unwrap();
        assert_eq!(res.status(), 504);
        assert_eq!(start.elapsed(), Duration::from_secs(2), "cut {cut:?}");
    }
}

// ---------------------------------------------------------------------------------------
// The server preset's inbound budgets: valid, zero, huge, repeated, malformed.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_server_preset_honours_only_sane_inbound_budgets() {
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(|| async {
                std::future::pending::<()>().await;
                "unreachable"
            }),
        )
        .layer(
            steadfast::server::http()
                .timeout(Duration::from_secs(3))
                .build()
                .unwrap(),
        );
    let ms = Duration::from_millis;
    let cases: &[(&[(&str, &str)], Duration)] = &[
        (&[], ms(3000)),
        (&[("x-request-timeout-ms", "1500")], ms(1500)),
        (&[("x-request-timeout-ms", "0")], ms(0)),
        (&[("x-request-timeout-ms", "99999999999999")], ms(3000)),
        (
            &[("x-request-timeout-ms", "18446744073709551616")],
            ms(3000),
        ),
        (&[("x-request-timeout-ms", "-5")], ms(3000)),
        (&[("x-request-timeout-ms", "1.5")], ms(3000)),
        (&[("x-request-timeout-ms", "")], ms(3000)),
        (&[("x-request-timeout-ms", " 1000")], ms(3000)),
        (
            &[
                ("x-request-timeout-ms", "100000"),
                ("x-request-timeout-ms", "700"),
            ],
            ms(700),
        ),
        (
            &[
                ("x-request-timeout-ms", "abc"),
                ("x-request-timeout-ms", "900"),
            ],
            ms(900),
        ),
        (&[("grpc-timeout", "1S")], ms(1000)),
        (&[("grpc-timeout", "0n")], ms(0)),
        (&[("grpc-timeout", "99999999H")], ms(3000)),
        (&[("grpc-timeout", "123456789S")], ms(3000)),
        (&[("grpc-timeout", "1X")], ms(3000)),
        (
            &[("grpc-timeout", "1S"), ("x-request-timeout-ms", "200")],
            ms(1000),
        ),
    ];
    let mut failures = Vec::new();
    for (headers, want) in cases {
        let mut r = Request::get("/").body(axum::body::Body::empty()).unwrap();
        for (n, v) in *headers {
            r.headers_mut().append(*n, v.parse().unwrap());
        }
        let start = Instant::now();
        match tokio::time::timeout(GUARD, app.clone().oneshot(r)).await {
            Err(_) => failures.push(format!("{headers:?}: hung")),
            Ok(Err(e)) => match e {},
            Ok(Ok(res)) => {
                let took = start.elapsed();
                // A gRPC request is not what this is (no grpc content type): 504 either way.
                if res.status() != 504 || took != *want {
                    failures.push(format!(
                        "{headers:?}: {} after {took:?}, want 504 after {want:?}",
                        res.status()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The server preset over real sockets, with a handler that awaits a client-preset call to
/// an upstream that never answers, then waits on nothing: 504 at the inbound deadline or
/// the server's own, whichever is sooner.
#[tokio::test(start_paused = true)]
async fn the_real_server_preset_handles_inbound_budgets_around_a_client_call() {
    let (addr, _hang, _fast) = real_server(Handler::Awaits).await;
    let mut failures = Vec::new();
    for (headers, want) in [
        (vec![], 3000u64),
        (vec![("x-request-timeout-ms", "1200")], 1200),
        (vec![("x-request-timeout-ms", "0")], 0),
        (vec![("x-request-timeout-ms", "999999999")], 3000),
        (
            vec![
                ("x-request-timeout-ms", "5000"),
                ("x-request-timeout-ms", "800"),
            ],
            800,
        ),
        (vec![("x-request-timeout-ms", "soon")], 3000),
    ] {
        let mut r = support::get(addr, "/");
        for (n, v) in &headers {
            r.headers_mut().append(*n, v.parse().unwrap());
        }
        let start = Instant::now();
        match tokio::time::timeout(GUARD, support::http_client().request(r)).await {
            Err(_) => failures.push(format!("{headers:?}: hung")),
            Ok(Err(e)) => failures.push(format!("{headers:?}: {e}")),
            Ok(Ok(res)) => {
                let took = start.elapsed();
                if res.status() != 504 || took != Duration::from_millis(want) {
                    failures.push(format!(
                        "{headers:?}: {} after {took:?}, want 504 after {want} ms",
                        res.status()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// Response bodies: stalls after the head, trailers that never come, another task reading.
// ---------------------------------------------------------------------------------------

/// Serves a 200 whose body sends `frames` data frames (one byte each) at once, then stalls
/// forever (never the trailers, never the end).
async fn stalling_server(frames: usize) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move {
            let head = futures_util::stream::iter(
                (0..frames).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"x")))),
            );
            let stall = futures_util::stream::once(async {
                std::future::pending::<()>().await;
                Ok::<_, Infallible>(Frame::trailers(http::HeaderMap::new()))
            });
            use futures_util::StreamExt;
            axum::body::Body::new(StreamBody::new(head.chain(stall)))
        }),
    );
    support::serve_axum(app).await
}

async fn drain<B>(mut body: B) -> (usize, Result<(), BoxError>)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut n = 0;
    for _ in 0..10_000 {
        match body.frame().await {
            None => return (n, Ok(())),
            Some(Ok(f)) => n += f.into_data().map_or(0, |d| d.len()),
            Some(Err(e)) => return (n, Err(e.into())),
        }
    }
    panic!("a body of more than 10,000 frames");
}

/// The head comes at once, the body stalls after a few bytes: the total deadline ends the
/// body, read in this task or in a task of its own.
#[tokio::test(start_paused = true)]
async fn a_body_stalling_after_the_head_ends_at_the_total_deadline() {
    let addr = stalling_server(3).await;
    let client = steadfast::client::http()
        .attempt_timeout(Duration::from_millis(500))
        .total_timeout(Duration::from_millis(1500))
        .build()
        .unwrap()
        .hyper_client::<Body>();
    for spawned in [false, true] {
        let start = Instant::now();
        let res = client
            .clone()
            .oneshot(support::get(addr, "/"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body = res.into_body();
        let read = async move {
            if spawned {
                tokio::spawn(drain(body)).await.unwrap()
            } else {
                drain(body).await
            }
        };
        let (n, end) = tokio::time::timeout(GUARD, read).await.expect("not hung");
        let e = end.expect_err("cut at the deadline");
        assert_eq!(limit_of(&e), Some(Duration::from_millis(1500)), "{e}");
        assert_eq!(n, 3);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(1500),
            "spawned {spawned}"
        );
    }
}

/// Body not covered, but an idle limit: the trailers that never come end the body at the
/// idle limit after the last frame.
#[tokio::test(start_paused = true)]
async fn trailers_that_never_come_end_at_the_idle_limit() {
    let addr = stalling_server(2).await;
    let client = steadfast::client::http()
        .attempt_timeout(Duration::from_millis(500))
        .total_timeout(Duration::from_millis(1500))
        .total_covers_body(false)
        .body_idle_timeout(Some(Duration::from_millis(700)))
        .build()
        .unwrap()
        .hyper_client::<Body>();
    let start = Instant::now();
    let res = client.oneshot(support::get(addr, "/")).await.unwrap();
    let (n, end) = tokio::time::timeout(GUARD, drain(res.into_body()))
        .await
        .expect("not hung");
    let e = end.expect_err("cut by the idle limit");
    let el = e.downcast_ref::<Elapsed>().expect("an Elapsed");
    assert!(el.is_idle());
    assert_eq!(n, 2);
    assert_eq!(start.elapsed(), Duration::from_millis(700));
}

/// A body read from under a server deadline (handler reads the client's stalled body, then
/// waits on nothing): the client's total deadline ends the body, the server deadline the
/// request.
#[tokio::test(start_paused = true)]
async fn a_handler_reading_a_stalled_client_body_is_answered_at_the_server_deadline() {
    let addr = stalling_server(1).await;
    let client = steadfast::client::http()
        .attempt_timeout(Duration::from_millis(500))
        .total_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .hyper_client::<Body>();
    let handler = service_fn(move |_req: Request<Body>| {
        let client = client.clone();
        async move {
            let res = client.oneshot(support::get(addr, "/")).await.unwrap();
            let (_, end) = drain(res.into_body()).await;
            assert!(end.is_err());
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(ok())
        }
    });
    let svc = SetDeadlineLayer::new(Duration::from_secs(3)).layer(handler);
    let start = Instant::now();
    let res = tokio::time::timeout(GUARD, svc.oneshot(req()))
        .await
        .expect("not hung")
        .unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}
