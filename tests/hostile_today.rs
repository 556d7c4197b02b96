//! Hostile pass on today's two changes:
//!
//! 1. Balancer refusals: a call refused by an endpoint's own breaker no longer ejects the
//!    endpoint; it gets no call for the failure penalty while another can take one, then the
//!    next call asks its breaker again (`steadfast-balance` crate docs, `error::Rerouted`,
//!    `EndpointStatus::refusing`).
//! 2. Retry readiness bounded by the deadline (`steadfast-retry` `error::NotReadyByDeadline`,
//!    `RetryLayer` docs).
//!
//! Real servers on 127.0.0.1 (ephemeral ports), paused time, seeded RNGs, every wait under
//! a guard timeout, no wall-clock timing asserts (virtual-time ones only).

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use bytes::Bytes;
use http::uri::Authority;
use http::{Method, Request, Response};
use http_body_util::Full;
use steadfast::balance::{BalanceBuilder, Pick};
use steadfast::breaker::BreakerState;
use steadfast::breaker::error::BreakerOpen;
use steadfast::client::HttpClientLayer;
use steadfast::common::{BoxError, Deadline, TimedOut};
use steadfast::retry::error::NotReadyByDeadline;
use steadfast::retry::{Backoff, BudgetConfig, Jitter, RetryLayer};
use steadfast::timeout::error::Elapsed;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

/// A hang fails the test instead of blocking it (paused time: costs nothing).
const GUARD: Duration = Duration::from_secs(900);

async fn guarded<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: hung for {GUARD:?}"),
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut c = e.source();
    while let Some(x) = c {
        s.push_str(" <- ");
        s.push_str(&x.to_string());
        c = x.source();
    }
    s
}

fn find<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(t) = x.downcast_ref::<T>() {
            return Some(t);
        }
        cur = x.source();
    }
    None
}

/// A tiny seeded RNG (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// =======================================================================================
// Part 1: balancer refusals, over the balanced client preset and real axum upstreams.
// =======================================================================================

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ok,
    Status(u16),
    /// 200 after this many milliseconds.
    Slow(u64),
}

struct UpState {
    mode: Mutex<Mode>,
    /// (method, x-seq) of every request received.
    log: Mutex<Vec<(Method, Option<u64>)>>,
}

#[derive(Clone)]
struct Upstream {
    addr: SocketAddr,
    state: Arc<UpState>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpState {
            mode: Mutex::new(Mode::Ok),
            log: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(handler).with_state(state.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state }
    }
    fn authority(&self) -> String {
        self.addr.to_string()
    }
    fn key(&self) -> Option<Authority> {
        Some(self.authority().parse().unwrap())
    }
    fn set(&self, m: Mode) {
        *self.state.mode.lock().unwrap() = m;
    }
    fn hits(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }
    fn seqs(&self) -> Vec<(Method, Option<u64>)> {
        self.state.log.lock().unwrap().clone()
    }
}

async fn handler(State(s): State<Arc<UpState>>, req: Request<Body>) -> Response<Body> {
    let seq = req
        .headers()
        .get("x-seq")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let method = req.method().clone();
    let _ = axum::body::to_bytes(req.into_body(), usize::MAX).await;
    s.log.lock().unwrap().push((method, seq));
    let mode = *s.mode.lock().unwrap();
    match mode {
        Mode::Ok => Response::builder()
            .status(200)
            .body(Body::from("ok"))
            .unwrap(),
        Mode::Slow(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::builder()
                .status(200)
                .body(Body::from("ok"))
                .unwrap()
        }
        Mode::Status(c) => Response::builder()
            .status(c)
            .body(Body::from("fail"))
            .unwrap(),
    }
}

async fn upstreams(n: usize) -> Vec<Upstream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Upstream::start().await);
    }
    v
}

type Client = steadfast::client::HttpClient<support::Transport<Full<Bytes>>>;

fn stack_with(
    ups: &[Upstream],
    seed: u64,
    f: impl FnOnce(BalanceBuilder) -> BalanceBuilder,
) -> HttpClientLayer {
    let eps: Vec<String> = ups.iter().map(Upstream::authority).collect();
    steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .balance(|b| f(b.endpoints(&eps).seed(seed)))
        .build()
        .unwrap()
}

fn req(method: Method, seq: u64) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("http://orders/orders/7")
        .header("x-seq", seq.to_string())
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap()
}

async fn call(svc: &mut Client, r: Request<Full<Bytes>>) -> Result<u16, String> {
    guarded("balanced call", async {
        let svc = svc.ready().await.map_err(|e| chain(&*e))?;
        let res = svc.call(r).await.map_err(|e: BoxError| chain(&*e))?;
        Ok(res.status().as_u16())
    })
    .await
}

async fn call_err(svc: &mut Client, r: Request<Full<Bytes>>) -> Result<u16, BoxError> {
    guarded("balanced call", async {
        let svc = svc.ready().await?;
        let res = svc.call(r).await?;
        Ok(res.status().as_u16())
    })
    .await
}

/// Every POST x-seq seen by the upstreams at most once.
fn assert_no_duplicate_post(ups: &[Upstream], what: &str) {
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for u in ups {
        for (m, s) in u.seqs() {
            if m == Method::POST {
                if let Some(s) = s {
                    *seen.entry(s).or_default() += 1;
                }
            }
        }
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.is_empty(),
        "{what}: POSTs sent more than once: {dups:?}"
    );
}

fn rejected(layer: &HttpClientLayer, u: &Upstream) -> u64 {
    layer.breakers().handle(&u.key()).metrics().rejected
}

/// Promise: no call lost while a healthy endpoint is in service (any number of open
/// breakers, 1..N-1 of N, N up to 20), and a POST is never sent twice.
#[tokio::test(start_paused = true)]
async fn b1_no_call_lost_with_k_of_n_breakers_forced_open() {
    let all = upstreams(20).await;
    let mut seq = 0u64;
    let mut lost: Vec<String> = Vec::new();
    for &n in &[2usize, 3, 5, 10, 20] {
        for k in [1, n / 2, n - 1] {
            if k == 0 || k >= n {
                continue;
            }
            for pick in [Pick::PowerOfTwoChoices, Pick::RoundRobin] {
                let ups = &all[..n];
                let layer = stack_with(ups, 7 + n as u64 * 31 + k as u64, |b| b.pick(pick));
                let mut rng = Rng(0x9e37_79b9 ^ (n as u64) << 8 ^ k as u64);
                // k distinct endpoints forced open, chosen by the seeded RNG.
                let mut idx: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    idx.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let open: Vec<usize> = idx[..k].to_vec();
                for &i in &open {
                    layer.breakers().handle(&ups[i].key()).force_open();
                }
                let before: Vec<usize> = ups.iter().map(Upstream::hits).collect();
                let mut svc: Client = layer.layer(support::transport());
                let mut lost_here = 0;
                let mut first = None;
                for c in 0..120u32 {
                    seq += 1;
                    let m = if c % 2 == 0 {
                        Method::POST
                    } else {
                        Method::GET
                    };
                    let r = call(&mut svc, req(m.clone(), seq)).await;
                    if r != Ok(200) {
                        lost_here += 1;
                        first.get_or_insert((c, r));
                    }
                    if c % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(150)).await;
                    }
                }
                for &i in &open {
                    assert_eq!(
                        ups[i].hits(),
                        before[i],
                        "n={n} k={k}: a forced-open endpoint got a call"
                    );
                }
                let st = layer.endpoints().list();
                assert!(
                    st.iter().all(|e| !e.ejected),
                    "n={n} k={k} pick={pick:?}: refusals ejected an endpoint: {st:?}"
                );
                if lost_here > 0 {
                    lost.push(format!(
                        "n={n} k={k} {pick:?}: {lost_here}/120 lost, first {first:?}"
                    ));
                }
            }
        }
    }
    assert_no_duplicate_post(&all, "b1");
    assert!(lost.is_empty(), "calls lost:\n{}", lost.join("\n"));
}

/// Promise: a refused endpoint is not hammered: about one attempt per penalty (2 s) reaches
/// each refusing breaker, not one per call. Sequential calls, one per 50 ms, for 20 s.
async fn hammer(n: usize, k: usize, pick: Pick) -> Vec<u64> {
    let ups = upstreams(n).await;
    let layer = stack_with(&ups, 42, |b| b.pick(pick));
    for u in &ups[..k] {
        layer.breakers().handle(&u.key()).force_open();
    }
    let mut svc: Client = layer.layer(support::transport());
    let mut lost = Vec::new();
    for c in 0..400u64 {
        if call(&mut svc, req(Method::GET, c)).await != Ok(200) {
            lost.push(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = ups[..k].iter().map(|u| rejected(&layer, u)).collect();
    assert!(
        lost.is_empty(),
        "n={n} k={k} {pick:?}: {} of 400 calls lost: {lost:?}; refusals per breaker {r:?}",
        lost.len()
    );
    r
}

#[tokio::test(start_paused = true)]
async fn b2_refusing_breakers_are_asked_about_once_per_penalty_p2c_19_of_20() {
    let r = hammer(20, 19, Pick::PowerOfTwoChoices).await;
    // 20 s / 2 s = 10 penalties: allow twice that, plus slack.
    let worst = *r.iter().max().unwrap();
    assert!(
        worst <= 22,
        "refusals per forced-open breaker over 20 s (400 calls): {r:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn b2_refusing_breakers_are_asked_about_once_per_penalty_p2c_1_of_2() {
    let r = hammer(2, 1, Pick::PowerOfTwoChoices).await;
    assert!(r[0] <= 22, "refusals over 20 s (400 calls): {r:?}");
}

#[tokio::test(start_paused = true)]
async fn b2_refusing_breakers_are_asked_about_once_per_penalty_round_robin_5_of_6() {
    let r = hammer(6, 5, Pick::RoundRobin).await;
    let worst = *r.iter().max().unwrap();
    assert!(
        worst <= 22,
        "refusals per forced-open breaker over 20 s (400 calls): {r:?}"
    );
}

/// The same, with bursts of 64 concurrent calls every 500 ms for 20 s.
#[tokio::test(start_paused = true)]
async fn b3_refusing_breakers_not_hammered_by_concurrent_bursts() {
    let ups = upstreams(4).await;
    let layer = stack_with(&ups, 3, |b| b);
    for u in &ups[..3] {
        layer.breakers().handle(&u.key()).force_open();
    }
    let svc: Client = layer.layer(support::transport());
    let mut seq = 0;
    for _ in 0..40 {
        let mut futs = Vec::new();
        for _ in 0..64 {
            seq += 1;
            let mut s = svc.clone();
            let r = req(Method::POST, seq);
            futs.push(async move { call(&mut s, r).await });
        }
        let out = futures_util::future::join_all(futs).await;
        assert!(
            out.iter().all(|r| *r == Ok(200)),
            "burst lost calls: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r: Vec<u64> = ups[..3].iter().map(|u| rejected(&layer, u)).collect();
    let worst = *r.iter().max().unwrap();
    assert!(
        worst <= 22,
        "refusals per forced-open breaker over 20 s (2560 calls): {r:?}"
    );
    assert_no_duplicate_post(&ups, "b3");
}

/// Promise: `EndpointStatus::{ejected, refusing}` tell the truth: refusing within the
/// penalty after a refusal, not after it; never ejected for refusals; a plain failure
/// (a 503, which the breaker admitted) is not a refusal.
#[tokio::test(start_paused = true)]
async fn b4_endpoint_status_tells_the_truth() {
    let ups = upstreams(3).await;
    // Round-robin: whom the load-aware pick prefers follows latencies a real socket measures
    // on paused time, which vary from run to run; what is tested here does not need it.
    let layer = stack_with(&ups, 11, |b| b.pick(Pick::RoundRobin));
    let (a, b, c) = (&ups[0], &ups[1], &ups[2]);
    let _ = a;
    layer.breakers().handle(&b.key()).force_open();
    let mut svc: Client = layer.layer(support::transport());
    let status = |layer: &HttpClientLayer, u: &Upstream| {
        layer
            .endpoints()
            .list()
            .into_iter()
            .find(|e| e.authority.as_str() == u.authority())
            .unwrap()
    };
    // Call until b has refused once.
    let mut n = 0;
    while rejected(&layer, b) == 0 {
        n += 1;
        assert!(n < 200, "b was never asked");
        assert_eq!(call(&mut svc, req(Method::GET, n)).await, Ok(200));
    }
    let s = status(&layer, b);
    assert!(s.refusing && !s.ejected, "just refused: {s:?}");
    tokio::time::sleep(Duration::from_millis(1900)).await;
    let s = status(&layer, b);
    assert!(s.refusing && !s.ejected, "1.9 s after its refusal: {s:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = status(&layer, b);
    assert!(!s.refusing && !s.ejected, "2.1 s after its refusal: {s:?}");
    // A plain failure is not a refusal.
    c.set(Mode::Status(503));
    let mut m = 0;
    while c.hits() == 0 {
        m += 1;
        assert!(m < 400, "c was never called");
        assert_eq!(call(&mut svc, req(Method::GET, 1000 + m)).await, Ok(200));
    }
    let s = status(&layer, c);
    assert_eq!(
        layer.breakers().handle(&c.key()).metrics().rejected,
        0,
        "c's breaker refused nothing"
    );
    assert!(
        !s.refusing,
        "c answered 503 (its breaker admitted the call): not a refusal: {s:?}"
    );
    // Closing b: it is not refusing and takes calls within the penalty.
    layer.breakers().handle(&b.key()).close();
    c.set(Mode::Ok);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let b_before = b.hits();
    for i in 0..100 {
        assert_eq!(call(&mut svc, req(Method::GET, 5000 + i)).await, Ok(200));
    }
    let s = status(&layer, b);
    assert!(
        b.hits() > b_before && !s.refusing && !s.ejected,
        "closed b: {} calls, {s:?}",
        b.hits() - b_before
    );
}

/// Promise: half-open breakers get their probes and close when the endpoint recovers.
async fn half_open_recovery(probes: u32) {
    let ups = upstreams(3).await;
    let eps: Vec<String> = ups.iter().map(Upstream::authority).collect();
    let layer = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .breaker(|b| {
            b.consecutive_failures(Some(3))
                .open_time(Duration::from_secs(5))
                .jitter_percent(0)
                .half_open_probes(probes)
        })
        // Round-robin, as in b4: the probes reach `a` whatever its latency estimate.
        .balance(|b| b.endpoints(&eps).seed(5).pick(Pick::RoundRobin))
        .build()
        .unwrap();
    let a = &ups[0];
    a.set(Mode::Status(503));
    let mut svc: Client = layer.layer(support::transport());
    let h = layer.breakers().handle(&a.key());
    let mut i = 0u64;
    while h.state() == BreakerState::Closed {
        i += 1;
        assert!(i < 2000, "a's breaker never opened: {:?}", h.metrics());
        assert_eq!(call(&mut svc, req(Method::GET, i)).await, Ok(200));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.set(Mode::Ok);
    let hits_open = a.hits();
    // 60 s of calls, one per 100 ms.
    for j in 0..600u64 {
        assert_eq!(call(&mut svc, req(Method::GET, 10_000 + j)).await, Ok(200));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = layer.endpoints().list();
    assert_eq!(
        h.state(),
        BreakerState::Closed,
        "a recovered but its breaker is still {:?} ({:?}); endpoints {st:?}",
        h.state(),
        h.metrics()
    );
    assert!(
        a.hits() - hits_open >= 1,
        "a took only {} of 600 calls after recovering; {st:?}",
        a.hits() - hits_open
    );
}

/// Half-open under concurrent bursts: probes in flight make the breaker refuse the other
/// calls (each a refusal, a penalty); the endpoint must still recover.
#[tokio::test(start_paused = true)]
async fn b5c_half_open_under_concurrent_bursts_recovers() {
    let ups = upstreams(3).await;
    for u in &ups {
        u.set(Mode::Slow(20));
    }
    let eps: Vec<String> = ups.iter().map(Upstream::authority).collect();
    let layer = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .breaker(|b| {
            b.consecutive_failures(Some(3))
                .open_time(Duration::from_secs(5))
                .jitter_percent(0)
                .half_open_probes(2)
        })
        .balance(|b| b.endpoints(&eps).seed(55))
        .build()
        .unwrap();
    let a = &ups[0];
    a.set(Mode::Status(503));
    let svc: Client = layer.layer(support::transport());
    let h = layer.breakers().handle(&a.key());
    let mut seq = 0u64;
    let burst = |seq: &mut u64| {
        let mut futs = Vec::new();
        for _ in 0..16 {
            *seq += 1;
            let mut s = svc.clone();
            let r = req(Method::GET, *seq);
            futs.push(async move { call(&mut s, r).await });
        }
        futures_util::future::join_all(futs)
    };
    let mut i = 0;
    while h.state() == BreakerState::Closed {
        i += 1;
        assert!(i < 500, "never opened");
        let out = burst(&mut seq).await;
        assert!(out.iter().all(|r| *r == Ok(200)), "{out:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.set(Mode::Slow(20));
    let hits = a.hits();
    for _ in 0..300 {
        let out = burst(&mut seq).await;
        assert!(out.iter().all(|r| *r == Ok(200)), "{out:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.state(), BreakerState::Closed, "{:?}", h.metrics());
    assert!(
        a.hits() - hits > 100,
        "a took {} calls after recovering",
        a.hits() - hits
    );
}

#[tokio::test(start_paused = true)]
async fn b5_half_open_probes_close_the_breaker_one_probe() {
    half_open_recovery(1).await;
}

#[tokio::test(start_paused = true)]
async fn b5_half_open_probes_close_the_breaker_three_probes() {
    half_open_recovery(3).await;
}

/// Promise: real outlier ejection (consecutive failures, `max_ejection_percent`) still works
/// alongside refusals; refusals do not use the cap.
#[tokio::test(start_paused = true)]
async fn b6_outlier_ejection_works_alongside_refusals() {
    let ups = upstreams(10).await;
    let eps: Vec<String> = ups.iter().map(Upstream::authority).collect();
    let layer = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .breaker(|b| b.consecutive_failures(Some(10_000)))
        .balance(|b| b.endpoints(&eps).seed(99))
        .build()
        .unwrap();
    for u in &ups[..3] {
        layer.breakers().handle(&u.key()).force_open();
    }
    let bad = &ups[3];
    let bad2 = &ups[4];
    bad.set(Mode::Status(503));
    let mut svc: Client = layer.layer(support::transport());
    let is_ejected = |layer: &HttpClientLayer, u: &Upstream| {
        layer
            .endpoints()
            .list()
            .into_iter()
            .find(|e| e.authority.as_str() == u.authority())
            .unwrap()
            .ejected
    };
    let mut i = 0u64;
    while !is_ejected(&layer, bad) {
        i += 1;
        assert!(
            i < 400,
            "bad never ejected after {} hits: {:?}",
            bad.hits(),
            layer.endpoints().list()
        );
        assert_eq!(call(&mut svc, req(Method::GET, i)).await, Ok(200));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = layer.endpoints().list();
    assert_eq!(
        st.iter().filter(|e| e.ejected).count(),
        1,
        "only the failing endpoint is ejected: {st:?}"
    );
    // A second outlier while the first is out: the cap (10 % of 10 = 1) holds.
    bad2.set(Mode::Status(503));
    for j in 0..200u64 {
        assert_eq!(call(&mut svc, req(Method::GET, 1000 + j)).await, Ok(200));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let st = layer.endpoints().list();
        assert!(
            st.iter().filter(|e| e.ejected).count() <= 1,
            "cap exceeded: {st:?}"
        );
        assert!(
            st[..3].iter().all(|e| !e.ejected),
            "a refusing endpoint is ejected: {st:?}"
        );
    }
}

/// Promise: force_open / close / reset / disable through handles while 64 concurrent calls
/// run: no call lost (one endpoint is never touched), no POST twice, and afterwards every
/// endpoint takes calls again within the penalty.
#[tokio::test(start_paused = true)]
async fn b7_handles_toggled_under_64_concurrent_calls() {
    b7(None).await;
}

#[tokio::test(start_paused = true)]
async fn b7b_handles_toggled_under_64_concurrent_calls_5ms_upstreams() {
    b7(Some(5)).await;
}

async fn b7(ms: Option<u64>) {
    let ups = upstreams(8).await;
    if let Some(ms) = ms {
        for u in &ups {
            u.set(Mode::Slow(ms));
        }
    }
    let layer = stack_with(&ups, 1234, |b| b);
    let svc: Client = layer.layer(support::transport());
    let stop = Arc::new(AtomicBool::new(false));
    let ctl = {
        let layer = layer.clone();
        let keys: Vec<_> = ups[1..].iter().map(Upstream::key).collect();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = Rng(0xdead_beef);
            let mut ops = 0u64;
            while !stop.load(SeqCst) {
                let h = layer
                    .breakers()
                    .handle(&keys[rng.below(keys.len() as u64) as usize]);
                match rng.below(6) {
                    0 | 1 => h.force_open(),
                    2 => h.close(),
                    3 => h.reset(),
                    4 => h.disable(),
                    _ => h.half_open_now(),
                }
                ops += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            ops
        })
    };
    let lost = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let mut s = svc.clone();
        let lost = lost.clone();
        tasks.push(tokio::spawn(async move {
            for c in 0..40u64 {
                let seq = t * 1000 + c;
                let m = if c % 2 == 0 {
                    Method::POST
                } else {
                    Method::GET
                };
                let r = call(&mut s, req(m, seq)).await;
                if r != Ok(200) {
                    lost.lock().unwrap().push((seq, r));
                }
                tokio::time::sleep(Duration::from_millis(7 + t % 5)).await;
            }
        }));
    }
    for t in tasks {
        guarded("caller task", t).await.unwrap();
    }
    stop.store(true, SeqCst);
    let ops = guarded("controller", ctl).await.unwrap();
    let lost = lost.lock().unwrap().clone();
    assert!(
        lost.is_empty(),
        "{} of 2560 calls lost ({ops} handle operations): first {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_no_duplicate_post(&ups, "b7");
    // Everything closed: every endpoint takes calls within the penalty.
    for u in &ups {
        layer.breakers().handle(&u.key()).close();
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before: Vec<usize> = ups.iter().map(Upstream::hits).collect();
    let mut s = svc.clone();
    for c in 0..400u64 {
        assert_eq!(call(&mut s, req(Method::GET, 900_000 + c)).await, Ok(200));
        // Time passes between calls (the load estimates decay as in real use).
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got: Vec<usize> = ups.iter().zip(&before).map(|(u, b)| u.hits() - b).collect();
    let st = layer.endpoints().list();
    for u in &ups {
        let h = layer.breakers().handle(&u.key());
        eprintln!("b7 {}: {:?} {:?}", u.authority(), h.state(), h.metrics());
    }
    // Zero-latency answers in paused time freeze the load estimates in one order, and P2C
    // then never picks the endpoint a hair slowest (an artifact of the test, not of real
    // use): the check is made with 5 ms upstreams (b7b) only.
    assert!(
        ms.is_none() || got.iter().all(|&g| g > 0),
        "after closing every breaker, calls per endpoint: {got:?}; {st:?}"
    );
}

/// Promise: every breaker open: the call fails fast with the breaker's own refusal, not
/// hang, not loop.
async fn all_open(n: usize, method: Method) {
    let ups = upstreams(n).await;
    let layer = stack_with(&ups, 77, |b| b);
    for u in &ups {
        layer.breakers().handle(&u.key()).force_open();
    }
    let mut svc: Client = layer.layer(support::transport());
    for c in 0..20u64 {
        let r0: u64 = ups.iter().map(|u| rejected(&layer, u)).sum();
        let t0 = Instant::now();
        let r = call_err(&mut svc, req(method.clone(), c)).await;
        let took = t0.elapsed();
        let r1: u64 = ups.iter().map(|u| rejected(&layer, u)).sum();
        match r {
            Ok(s) => panic!("n={n} call {c}: every breaker open, got {s}"),
            Err(e) => {
                assert!(
                    find::<BreakerOpen>(&*e).is_some(),
                    "n={n} call {c}: not the breaker's refusal: {}",
                    chain(&*e)
                );
            }
        }
        assert!(
            took < Duration::from_millis(100),
            "n={n} call {c}: took {took:?} of virtual time"
        );
        assert!(
            r1 - r0 <= n as u64,
            "n={n} call {c}: {} refusals for one call (loop?)",
            r1 - r0
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(ups.iter().all(|u| u.hits() == 0));
}

#[tokio::test(start_paused = true)]
async fn b8_every_breaker_open_fails_fast_with_breaker_refusal_1() {
    all_open(1, Method::GET).await;
}

#[tokio::test(start_paused = true)]
async fn b8_every_breaker_open_fails_fast_with_breaker_refusal_3_post() {
    all_open(3, Method::POST).await;
}

#[tokio::test(start_paused = true)]
async fn b8_every_breaker_open_fails_fast_with_breaker_refusal_9() {
    all_open(9, Method::GET).await;
}

#[tokio::test(start_paused = true)]
async fn b8_every_breaker_open_fails_fast_with_breaker_refusal_10() {
    all_open(10, Method::GET).await;
}

#[tokio::test(start_paused = true)]
async fn b2_refusing_breakers_asked_once_per_penalty_p2c_9_of_10() {
    let r = hammer(10, 9, Pick::PowerOfTwoChoices).await;
    assert!(*r.iter().max().unwrap() <= 22, "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn b2_refusing_breakers_asked_once_per_penalty_round_robin_19_of_20() {
    let r = hammer(20, 19, Pick::RoundRobin).await;
    assert!(*r.iter().max().unwrap() <= 22, "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn b2_refusing_breakers_asked_once_per_penalty_p2c_10_of_20() {
    let r = hammer(20, 10, Pick::PowerOfTwoChoices).await;
    assert!(*r.iter().max().unwrap() <= 22, "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn b8_every_breaker_open_fails_fast_with_breaker_refusal_20() {
    all_open(20, Method::GET).await;
}

/// Promise: an operator closing breakers by hand sees calls reach them within the penalty,
/// 10 of 20, after they had refused many calls.
#[tokio::test(start_paused = true)]
async fn b9_closed_by_hand_within_the_penalty_10_of_20() {
    let ups = upstreams(20).await;
    let layer = stack_with(&ups, 8, |b| b);
    for u in &ups[..10] {
        layer.breakers().handle(&u.key()).force_open();
    }
    let mut svc: Client = layer.layer(support::transport());
    for c in 0..600u64 {
        assert_eq!(call(&mut svc, req(Method::GET, c)).await, Ok(200));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for u in &ups[..10] {
        assert_eq!(u.hits(), 0);
        layer.breakers().handle(&u.key()).close();
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for c in 0..600u64 {
        assert_eq!(call(&mut svc, req(Method::GET, 10_000 + c)).await, Ok(200));
    }
    let got: Vec<usize> = ups[..10].iter().map(Upstream::hits).collect();
    assert!(
        got.iter().all(|&g| g >= 1),
        "closed breakers' calls out of 600: {got:?}; {:?}",
        layer.endpoints().list()
    );
}

/// Promise: "an operator who closes a breaker by hand sees calls reach it within the
/// penalty" — with sequential traffic (one call per 10 ms) and endpoints of equal speed.
async fn closed_by_hand_sequential(ms: Option<u64>, pick: Pick) -> usize {
    let ups = upstreams(3).await;
    for u in &ups {
        if let Some(ms) = ms {
            u.set(Mode::Slow(ms));
        }
    }
    let layer = stack_with(&ups, 4, |b| b.pick(pick));
    let b = &ups[1];
    layer.breakers().handle(&b.key()).force_open();
    let mut svc: Client = layer.layer(support::transport());
    for c in 0..200u64 {
        assert_eq!(call(&mut svc, req(Method::GET, c)).await, Ok(200));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.hits(), 0);
    layer.breakers().handle(&b.key()).close();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for c in 0..400u64 {
        assert_eq!(call(&mut svc, req(Method::GET, 1000 + c)).await, Ok(200));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "closed by hand ({ms:?} ms, {pick:?}): b took {} of 400; {:?}",
        b.hits(),
        layer.endpoints().list()
    );
    b.hits()
}

#[tokio::test(start_paused = true)]
async fn b12_closed_by_hand_takes_sequential_calls_p2c_instant_upstreams() {
    let n = closed_by_hand_sequential(None, Pick::PowerOfTwoChoices).await;
    assert!(
        n > 0,
        "b took no call in 4 s after its breaker was closed by hand"
    );
}

#[tokio::test(start_paused = true)]
async fn b12_closed_by_hand_takes_sequential_calls_p2c_5ms_upstreams() {
    let n = closed_by_hand_sequential(Some(5), Pick::PowerOfTwoChoices).await;
    assert!(
        n > 0,
        "b took no call in 4 s after its breaker was closed by hand"
    );
}

#[tokio::test(start_paused = true)]
async fn b12_closed_by_hand_takes_sequential_calls_round_robin() {
    let n = closed_by_hand_sequential(Some(5), Pick::RoundRobin).await;
    assert!(
        n > 0,
        "b took no call in 4 s after its breaker was closed by hand"
    );
}

/// Penalty off (zero): refusals still lose no call and send no POST twice.
#[tokio::test(start_paused = true)]
async fn b10_zero_penalty_refusals_lose_no_call() {
    let ups = upstreams(5).await;
    let layer = stack_with(&ups, 9, |b| b.failure_penalty(Duration::ZERO));
    for u in &ups[..4] {
        layer.breakers().handle(&u.key()).force_open();
    }
    let mut svc: Client = layer.layer(support::transport());
    for c in 0..200u64 {
        assert_eq!(
            call(&mut svc, req(Method::POST, c)).await,
            Ok(200),
            "call {c}"
        );
    }
    assert_eq!(ups[4].hits(), 200);
    assert_no_duplicate_post(&ups, "b10");
    let st = layer.endpoints().list();
    assert!(st.iter().all(|e| !e.ejected), "{st:?}");
}

/// A breaker opened by real failures (Open, with a schedule) on 4 of 5 endpoints, the
/// fifth healthy: no call lost, POSTs once, and the refused ones are asked about once per
/// penalty while open (30 s default open time).
#[tokio::test(start_paused = true)]
async fn b11_breakers_opened_by_failures_then_refusing() {
    let ups = upstreams(5).await;
    let layer = stack_with(&ups, 21, |b| b.consecutive_failures(None));
    for u in &ups[..4] {
        u.set(Mode::Status(500));
    }
    let mut svc: Client = layer.layer(support::transport());
    let mut seq = 0u64;
    // Until every bad breaker is open (POSTs: a 500 is not retried, so answers may be 500).
    let mut i = 0;
    while ups[..4]
        .iter()
        .any(|u| layer.breakers().handle(&u.key()).state() == BreakerState::Closed)
    {
        i += 1;
        assert!(i < 5000, "breakers never opened");
        seq += 1;
        let _ = call(&mut svc, req(Method::GET, seq)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r0: Vec<u64> = ups[..4].iter().map(|u| rejected(&layer, u)).collect();
    // 20 s of calls, one per 50 ms: all land on the healthy one.
    for _ in 0..400 {
        seq += 1;
        assert_eq!(
            call(&mut svc, req(Method::POST, seq)).await,
            Ok(200),
            "seq {seq}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r1: Vec<u64> = ups[..4].iter().map(|u| rejected(&layer, u)).collect();
    let per: Vec<u64> = r1.iter().zip(&r0).map(|(a, b)| a - b).collect();
    assert!(
        per.iter().all(|&p| p <= 22),
        "refusals per open breaker in 20 s: {per:?}"
    );
    assert_no_duplicate_post(&ups, "b11");
}

// =======================================================================================
// Part 2: retry readiness bounded by the deadline.
// =======================================================================================

/// A service below the retry layer whose readiness the test controls. It keeps only the
/// latest waker (the `poll_ready` contract), answers 503 to the first `fail_first` calls
/// and 200 after, and closes itself after call number `close_after`.
#[derive(Clone)]
struct Gate {
    st: Arc<Mutex<GateSt>>,
}

struct GateSt {
    open: bool,
    ready_err: bool,
    waker: Option<Waker>,
    sent: usize,
    fail_first: usize,
    close_after: Option<usize>,
    polls: usize,
    /// For each call: whether the ambient deadline had passed when it was sent.
    expired_at_send: Vec<Option<bool>>,
}

impl Gate {
    fn new(fail_first: usize, close_after: Option<usize>) -> Self {
        Self {
            st: Arc::new(Mutex::new(GateSt {
                open: true,
                ready_err: false,
                waker: None,
                sent: 0,
                fail_first,
                close_after,
                polls: 0,
                expired_at_send: Vec::new(),
            })),
        }
    }
    fn open(&self) {
        let w = {
            let mut s = self.st.lock().unwrap();
            s.open = true;
            s.waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }
    fn break_readiness(&self) {
        let w = {
            let mut s = self.st.lock().unwrap();
            s.ready_err = true;
            s.waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }
    fn sent(&self) -> usize {
        self.st.lock().unwrap().sent
    }
    fn polls(&self) -> usize {
        self.st.lock().unwrap().polls
    }
}

impl<B> Service<Request<B>> for Gate {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let mut s = self.st.lock().unwrap();
        s.polls += 1;
        if s.ready_err {
            return Poll::Ready(Err("readiness broke".into()));
        }
        if s.open {
            Poll::Ready(Ok(()))
        } else {
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        let mut s = self.st.lock().unwrap();
        s.sent += 1;
        s.expired_at_send
            .push(Deadline::current().map(Deadline::is_expired));
        let n = s.sent;
        if s.close_after == Some(n) {
            s.open = false;
        }
        let status = if n <= s.fail_first { 503 } else { 200 };
        std::future::ready(Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap()))
    }
}

fn budget() -> BudgetConfig {
    // No deposits: the balance sits at its floor (10/s × 10 s = 100) unless spent.
    BudgetConfig {
        ratio: 0.0,
        min_per_sec: 10,
        window: Duration::from_secs(10),
    }
}

fn retry_layer(backoff: Duration) -> RetryLayer {
    RetryLayer::builder()
        .backoff(Backoff::constant(backoff).jitter(Jitter::None))
        .budget(Some(budget()))
        .seed(1)
        .build()
        .unwrap()
}

fn get() -> Request<Full<Bytes>> {
    Request::get("http://upstream.test/x")
        .body(Full::new(Bytes::from_static(b"b")))
        .unwrap()
}

type RetryOut = Result<u16, BoxError>;

fn rget() -> Request<steadfast::retry::ReplayBody<Full<Bytes>>> {
    get().map(|b| steadfast::retry::ReplayBody::new(b, 1024))
}

async fn retry_call<S>(svc: &mut S, r: Request<Full<Bytes>>) -> RetryOut
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>,
{
    let s = svc.ready().await?;
    Ok(s.call(r).await?.status().as_u16())
}

fn expect_nrbd(r: &RetryOut, what: &str) -> u32 {
    match r {
        Ok(s) => panic!("{what}: expected NotReadyByDeadline, got {s}"),
        Err(e) => {
            let n = find::<NotReadyByDeadline>(&**e)
                .unwrap_or_else(|| panic!("{what}: not NotReadyByDeadline: {}", chain(&**e)));
            assert!(
                TimedOut::is_in(&**e),
                "{what}: not a timeout: {}",
                chain(&**e)
            );
            n.attempt()
        }
    }
}

/// The basic promise: the retry waits for readiness until the deadline, then ends with
/// NotReadyByDeadline (attempt 2), unsent, its token given back.
#[tokio::test(start_paused = true)]
async fn r1_not_ready_by_deadline_basic_and_token_given_back() {
    let gate = Gate::new(1, Some(1));
    let layer = retry_layer(Duration::from_millis(10));
    let mut svc = layer.layer(gate.clone());
    let before = layer.budget_balance().unwrap();
    let t0 = Instant::now();
    let r = guarded(
        "r1",
        Deadline::after(Duration::from_secs(1)).scope(retry_call(&mut svc, get())),
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(expect_nrbd(&r, "r1"), 2);
    assert_eq!(gate.sent(), 1, "the retry was sent");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(1050),
        "ended {took:?} after the start (deadline 1 s)"
    );
    let after = layer.budget_balance().unwrap();
    assert!(
        after > before - 0.5,
        "budget: {before} before, {after} after (token not given back?)"
    );
}

/// Deadline == the backoff's end: no retry can be sent before it. The caller gets the
/// last real outcome or NotReadyByDeadline, at the deadline, with nothing more sent.
#[tokio::test(start_paused = true)]
async fn r2_deadline_exactly_at_backoff_end() {
    let gate = Gate::new(1, Some(1));
    let layer = retry_layer(Duration::from_millis(100));
    let mut svc = layer.layer(gate.clone());
    let before = layer.budget_balance().unwrap();
    let t0 = Instant::now();
    let r = guarded(
        "r2",
        Deadline::at(t0 + Duration::from_millis(100)).scope(retry_call(&mut svc, get())),
    )
    .await;
    let took = t0.elapsed();
    eprintln!(
        "r2: {:?} after {took:?}",
        r.as_ref().map_err(|e| chain(&**e))
    );
    assert_eq!(gate.sent(), 1);
    assert!(took <= Duration::from_millis(100), "{took:?}");
    assert!(
        matches!(r, Ok(503)) || find::<NotReadyByDeadline>(&**r.as_ref().unwrap_err()).is_some(),
        "{:?}",
        r.map_err(|e| chain(&*e))
    );
    let after = layer.budget_balance().unwrap();
    assert!(after > before - 0.5, "budget {before} -> {after}");
}

/// Deadline 1 ns after the backoff's end: the retry is decided, the wait ends, the service
/// is not ready: NotReadyByDeadline at the deadline.
#[tokio::test(start_paused = true)]
async fn r2b_deadline_one_nanosecond_after_backoff_end() {
    let gate = Gate::new(1, Some(1));
    let layer = retry_layer(Duration::from_millis(100));
    let mut svc = layer.layer(gate.clone());
    let before = layer.budget_balance().unwrap();
    let t0 = Instant::now();
    let r = guarded(
        "r2b",
        Deadline::at(t0 + Duration::from_nanos(100_000_001)).scope(retry_call(&mut svc, get())),
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(expect_nrbd(&r, "r2b"), 2);
    assert_eq!(gate.sent(), 1);
    assert!(took <= Duration::from_millis(102), "{took:?}");
    let after = layer.budget_balance().unwrap();
    assert!(after > before - 0.5, "budget {before} -> {after}");
}

/// Deadline already passed / zero: no hang, nothing retried, nothing leaked.
#[tokio::test(start_paused = true)]
async fn r3_deadline_already_passed_or_zero() {
    for (i, d) in [
        Deadline::after(Duration::ZERO),
        Deadline::at(Instant::now()),
        Deadline::at(
            Instant::now()
                .checked_sub(Duration::from_secs(1))
                .unwrap_or_else(Instant::now),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let gate = Gate::new(1, Some(1));
        let layer = retry_layer(Duration::from_millis(10));
        let mut svc = layer.layer(gate.clone());
        let before = layer.budget_balance().unwrap();
        let t0 = Instant::now();
        let r = guarded("r3", d.scope(retry_call(&mut svc, get()))).await;
        let took = t0.elapsed();
        eprintln!(
            "r3[{i}]: {:?} after {took:?}",
            r.as_ref().map_err(|e| chain(&**e))
        );
        assert!(gate.sent() <= 1, "[{i}] sent {}", gate.sent());
        assert!(took < Duration::from_millis(10), "[{i}] took {took:?}");
        let after = layer.budget_balance().unwrap();
        assert!(after > before - 0.5, "[{i}] budget {before} -> {after}");
    }
}

/// Duration::MAX-ish deadlines: behave like no deadline (the retry waits for readiness), no
/// overflow panic.
#[tokio::test(start_paused = true)]
async fn r4_deadline_duration_max() {
    for d in [
        Deadline::after(Duration::MAX),
        Deadline::after(Duration::from_secs(u64::MAX / 2)),
    ] {
        let gate = Gate::new(1, Some(1));
        let layer = retry_layer(Duration::from_millis(10));
        let mut svc = layer.layer(gate.clone());
        let g = gate.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            g.open();
        });
        let r = guarded("r4", d.scope(retry_call(&mut svc, get()))).await;
        assert_eq!(r.map_err(|e| chain(&*e)).unwrap(), 200);
        assert_eq!(gate.sent(), 2);
    }
}

/// The service below becomes ready exactly at the deadline: either outcome, but consistent
/// (NotReadyByDeadline => unsent), and no hang.
#[tokio::test(start_paused = true)]
async fn r5_ready_exactly_at_the_deadline() {
    for ms in [10u64, 11, 500] {
        let gate = Gate::new(1, Some(1));
        let layer = retry_layer(Duration::from_millis(10));
        let mut svc = layer.layer(gate.clone());
        let t0 = Instant::now();
        let dl = t0 + Duration::from_millis(ms + 1);
        let g = gate.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(dl).await;
            g.open();
        });
        let before = layer.budget_balance().unwrap();
        let r = guarded("r5", Deadline::at(dl).scope(retry_call(&mut svc, get()))).await;
        let took = t0.elapsed();
        eprintln!(
            "r5[{ms}]: {:?} after {took:?}, sent {}",
            r.as_ref().map_err(|e| chain(&**e)),
            gate.sent()
        );
        match &r {
            Ok(200) => assert_eq!(gate.sent(), 2),
            Ok(s) => panic!("r5[{ms}]: {s}"),
            Err(e) => {
                assert!(
                    find::<NotReadyByDeadline>(&**e).is_some(),
                    "{}",
                    chain(&**e)
                );
                assert_eq!(gate.sent(), 1, "NotReadyByDeadline but the retry was sent");
                let after = layer.budget_balance().unwrap();
                assert!(after > before - 0.5, "budget {before} -> {after}");
            }
        }
        assert!(took <= Duration::from_millis(ms + 1), "{took:?}");
    }
}

/// The service below becomes ready exactly at the deadline: a retry sent then goes out with
/// the deadline already passed (`Deadline::is_expired`: now >= at), which the docs say ends
/// the call with NotReadyByDeadline, the retry unsent.
#[tokio::test(start_paused = true)]
async fn r5b_no_retry_sent_once_the_deadline_has_passed() {
    let gate = Gate::new(1, Some(1));
    let layer = retry_layer(Duration::from_millis(10));
    let mut svc = layer.layer(gate.clone());
    let t0 = Instant::now();
    let dl = t0 + Duration::from_millis(501);
    let g = gate.clone();
    tokio::spawn(async move {
        tokio::time::sleep_until(dl).await;
        g.open();
    });
    let r = guarded("r5b", Deadline::at(dl).scope(retry_call(&mut svc, get()))).await;
    let exp = gate.st.lock().unwrap().expired_at_send.clone();
    assert_eq!(
        exp.get(1).copied().flatten(),
        None.or(if gate.sent() > 1 { Some(false) } else { None }),
        "result {:?} at {:?}; sends saw the deadline expired: {exp:?}",
        r.map_err(|e| chain(&*e)),
        t0.elapsed()
    );
}

/// Readiness errors while waiting for the retry: the call ends (no hang), nothing more sent.
#[tokio::test(start_paused = true)]
async fn r6_readiness_error_during_the_wait() {
    for when in [0u64, 50] {
        let gate = Gate::new(1, Some(1));
        let layer = retry_layer(Duration::from_millis(10));
        let mut svc = layer.layer(gate.clone());
        let g = gate.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(when)).await;
            g.break_readiness();
        });
        let before = layer.budget_balance().unwrap();
        let r = guarded(
            "r6",
            Deadline::after(Duration::from_secs(1)).scope(retry_call(&mut svc, get())),
        )
        .await;
        let after = layer.budget_balance().unwrap();
        eprintln!(
            "r6[{when}]: {:?}; budget {before} -> {after}",
            r.as_ref().map_err(|e| chain(&**e))
        );
        assert_eq!(gate.sent(), 1);
        assert!(r.is_err() || r.as_ref().ok() == Some(&503));
    }
}

/// Cancellation: drop the call mid-wait (during the backoff, during the readiness wait,
/// with and without a deadline): the token is given back, nothing panics or is sent.
#[tokio::test(start_paused = true)]
async fn r7_cancel_mid_wait_gives_the_token_back() {
    for (i, (at, deadline)) in [
        (Duration::from_millis(5), true),
        (Duration::from_millis(50), true),
        (Duration::from_millis(5), false),
        (Duration::from_millis(50), false),
        (Duration::from_millis(10), true), // exactly at the backoff's end
    ]
    .into_iter()
    .enumerate()
    {
        let gate = Gate::new(1, Some(1));
        let layer = retry_layer(Duration::from_millis(10));
        let mut svc = layer.layer(gate.clone());
        let before = layer.budget_balance().unwrap();
        {
            let svc = &mut svc;
            let fut: Pin<Box<dyn Future<Output = RetryOut>>> = if deadline {
                Box::pin(Deadline::after(Duration::from_secs(10)).scope(retry_call(svc, get())))
            } else {
                Box::pin(retry_call(svc, get()))
            };
            let mut fut = fut;
            let r = tokio::time::timeout(at, &mut fut).await;
            assert!(
                r.is_err(),
                "[{i}] finished early: {:?}",
                r.map(|r| r.map_err(|e| chain(&*e)))
            );
            drop(fut);
        }
        gate.open();
        tokio::task::yield_now().await;
        let after = layer.budget_balance().unwrap();
        assert_eq!(gate.sent(), 1, "[{i}]");
        assert!(
            after > before - 0.5,
            "[{i}] cancelled at {at:?} (deadline {deadline}): budget {before} -> {after}"
        );
    }
}

/// Cancelled exactly at the deadline (the caller's own timeout and the deadline fire at the
/// same instant, inside the retry's extra poll): the token is given back, nothing sent.
#[tokio::test(start_paused = true)]
async fn r7b_cancel_exactly_at_the_deadline() {
    for extra_ns in [0u64, 1] {
        let gate = Gate::new(1, Some(1));
        let layer = retry_layer(Duration::from_millis(10));
        let mut svc = layer.layer(gate.clone());
        let before = layer.budget_balance().unwrap();
        let t0 = Instant::now();
        let dl = t0 + Duration::from_millis(100);
        let r = tokio::time::timeout_at(
            dl + Duration::from_nanos(extra_ns),
            Deadline::at(dl).scope(retry_call(&mut svc, get())),
        )
        .await;
        eprintln!(
            "r7b[{extra_ns}]: {:?}",
            r.as_ref().map(|r| r.as_ref().map_err(|e| chain(&**e)))
        );
        gate.open();
        tokio::task::yield_now().await;
        let after = layer.budget_balance().unwrap();
        assert_eq!(gate.sent(), 1);
        assert!(
            after > before - 0.5,
            "[{extra_ns}] budget {before} -> {after}"
        );
    }
}

/// The call moved to another task mid-wait, and polled by different wakers: it still sees
/// the service below become ready (the gate keeps only the latest waker).
#[tokio::test(start_paused = true)]
async fn r8_moved_between_tasks_mid_wait() {
    for deadline in [true, false] {
        let gate = Gate::new(1, Some(1));
        let layer = retry_layer(Duration::from_millis(10));
        let svc = layer.layer(gate.clone());
        let fut = async move {
            let mut svc = svc;
            retry_call(&mut svc, get()).await
        };
        let mut fut: Pin<Box<dyn Future<Output = RetryOut> + Send>> = if deadline {
            Box::pin(Deadline::after(Duration::from_secs(30)).scope(fut))
        } else {
            Box::pin(fut)
        };
        // Task A: poll until in the readiness wait.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut fut)
                .await
                .is_err()
        );
        let polls_a = gate.polls();
        // A stray poll with a no-op waker (a different waker, then dropped).
        let noop = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&noop);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        // Task B takes it over.
        let h = tokio::spawn(fut);
        tokio::time::sleep(Duration::from_millis(100)).await;
        gate.open();
        let r = guarded("r8", h).await.unwrap();
        assert_eq!(
            r.map_err(|e| chain(&*e)).unwrap(),
            200,
            "deadline {deadline}: polls {polls_a} then {}",
            gate.polls()
        );
        assert_eq!(gate.sent(), 2);
    }
}

/// The budget balance before/after many calls that end NotReadyByDeadline: no drain.
#[tokio::test(start_paused = true)]
async fn r13_budget_balance_after_many_not_ready_calls() {
    let layer = retry_layer(Duration::from_millis(10));
    let before = layer.budget_balance().unwrap();
    for i in 0..200u32 {
        let gate = Gate::new(1, Some(1));
        let mut svc = layer.layer(gate.clone());
        let r = guarded(
            "r13",
            Deadline::after(Duration::from_millis(30)).scope(retry_call(&mut svc, get())),
        )
        .await;
        expect_nrbd(&r, &format!("r13 call {i}"));
    }
    let after = layer.budget_balance().unwrap();
    assert!(
        after > before - 1.0,
        "budget {before} before 200 NotReadyByDeadline calls, {after} after"
    );
}

/// Concurrent NotReadyByDeadline calls sharing one gate and budget: every one ends at its
/// deadline, none sent twice, budget whole.
#[tokio::test(start_paused = true)]
async fn r13b_concurrent_not_ready_calls_share_a_gate() {
    let gate = Gate::new(usize::MAX, None);
    let layer = retry_layer(Duration::from_millis(10));
    let svc = layer.layer(gate.clone());
    // Every call's first attempt is sent (gate open), then the gate closes for the retries.
    let before = layer.budget_balance().unwrap();
    let mut futs = Vec::new();
    for i in 0..32u64 {
        let mut s = svc.clone();
        futs.push(
            Deadline::after(Duration::from_millis(200 + i))
                .scope(async move { retry_call(&mut s, get()).await }),
        );
    }
    let g = gate.clone();
    let closer = async move {
        tokio::task::yield_now().await;
        g.st.lock().unwrap().open = false;
    };
    let (out, ()) = guarded(
        "r13b",
        futures_util::future::join(futures_util::future::join_all(futs), closer),
    )
    .await;
    let kinds: Vec<String> = out
        .iter()
        .map(|r| match r {
            Ok(s) => s.to_string(),
            Err(e) => chain(&**e),
        })
        .collect();
    eprintln!("r13b: sent {}, {:?}", gate.sent(), &kinds[..4]);
    assert!(gate.sent() <= 64, "sent {}", gate.sent());
    let after = layer.budget_balance().unwrap();
    let retried = gate.sent().saturating_sub(32) as f64;
    assert!(
        after > before - retried - 1.0,
        "budget {before} -> {after} with {retried} retries sent"
    );
}

// ---------------------------------------------------------------------------------------
// tower's ConcurrencyLimit and Buffer below the retry layer.
// ---------------------------------------------------------------------------------------

/// An upstream function: "/block" waits for the notify, others: first 503 then 200.
#[derive(Clone)]
struct Upfn {
    n: Arc<AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
}

impl<B: Send + 'static> Service<Request<B>> for Upfn {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let block = req.uri().path() == "/block";
        let n = if block {
            0
        } else {
            self.n.fetch_add(1, SeqCst)
        };
        let release = self.release.clone();
        Box::pin(async move {
            if block {
                release.notified().await;
            }
            let status = if !block && n == 0 { 503 } else { 200 };
            Ok(Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(b"x")))
                .unwrap())
        })
    }
}

fn block_req<B: Default>() -> Request<B> {
    Request::get("http://upstream.test/block")
        .body(B::default())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn r9_concurrency_limit_below_ends_at_deadline_and_leaks_no_permit() {
    let up = Upfn {
        n: Arc::new(AtomicUsize::new(0)),
        release: Arc::new(tokio::sync::Notify::new()),
    };
    let limited = tower::limit::ConcurrencyLimit::new(up.clone(), 1);
    let layer = retry_layer(Duration::from_millis(10));
    let mut svc = layer.layer(limited.clone());
    let before = layer.budget_balance().unwrap();
    let t0 = Instant::now();
    let mut fut = Box::pin(Deadline::after(Duration::from_secs(1)).scope(async move {
        let r = retry_call(&mut svc, get()).await;
        (r, svc)
    }));
    // First attempt answers 503 at once; the backoff (10 ms) starts.
    assert!(
        tokio::time::timeout(Duration::from_millis(1), &mut fut)
            .await
            .is_err()
    );
    // A blocker takes the only permit.
    let blocker = tokio::spawn({
        let l = limited.clone();
        async move {
            l.oneshot(block_req::<Full<Bytes>>())
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let (r, mut svc) = guarded("r9", fut).await;
    let took = t0.elapsed();
    assert_eq!(expect_nrbd(&r, "r9"), 2);
    assert!(took < Duration::from_millis(1050), "{took:?}");
    assert_eq!(up.n.load(SeqCst), 1, "the retry was sent");
    let after = layer.budget_balance().unwrap();
    assert!(after > before - 0.5, "budget {before} -> {after}");
    // Release the blocker: the permit comes back; a new call gets it.
    up.release.notify_waiters();
    assert_eq!(guarded("blocker", blocker).await.unwrap().unwrap(), 200);
    let r = guarded("after", retry_call(&mut svc, get())).await;
    assert_eq!(r.map_err(|e| chain(&*e)).unwrap(), 200);
    let r = guarded("other clone", limited.clone().oneshot(get())).await;
    assert_eq!(r.unwrap().status(), 200);
}

/// The permit frees exactly at the deadline.
#[tokio::test(start_paused = true)]
async fn r9b_concurrency_limit_permit_frees_at_the_deadline() {
    let up = Upfn {
        n: Arc::new(AtomicUsize::new(0)),
        release: Arc::new(tokio::sync::Notify::new()),
    };
    let limited = tower::limit::ConcurrencyLimit::new(up.clone(), 1);
    let layer = retry_layer(Duration::from_millis(10));
    let mut svc = layer.layer(limited.clone());
    let t0 = Instant::now();
    let dl = t0 + Duration::from_millis(300);
    let mut fut = Box::pin(Deadline::at(dl).scope(async move {
        let r = retry_call(&mut svc, get()).await;
        (r, svc)
    }));
    assert!(
        tokio::time::timeout(Duration::from_millis(1), &mut fut)
            .await
            .is_err()
    );
    let blocker = tokio::spawn({
        let l = limited.clone();
        async move {
            l.oneshot(block_req::<Full<Bytes>>())
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let rel = up.release.clone();
    tokio::spawn(async move {
        tokio::time::sleep_until(dl).await;
        rel.notify_waiters();
    });
    let (r, mut svc) = guarded("r9b", fut).await;
    eprintln!(
        "r9b: {:?}, sent {}",
        r.as_ref().map_err(|e| chain(&**e)),
        up.n.load(SeqCst)
    );
    match &r {
        Ok(200) => assert_eq!(up.n.load(SeqCst), 2),
        Ok(s) => panic!("{s}"),
        Err(_) => {
            expect_nrbd(&r, "r9b");
            assert_eq!(up.n.load(SeqCst), 1);
        }
    }
    assert_eq!(guarded("blocker", blocker).await.unwrap().unwrap(), 200);
    let r = guarded("after", retry_call(&mut svc, get())).await;
    assert_eq!(r.map_err(|e| chain(&*e)).unwrap(), 200);
}

#[tokio::test(start_paused = true)]
async fn r10_buffer_below_ends_at_deadline_and_recovers() {
    let gate = Gate::new(1, Some(1));
    let buffered = tower::buffer::Buffer::new(gate.clone(), 1);
    let layer = retry_layer(Duration::from_millis(10));
    let mut svc = layer.layer(buffered.clone());
    let before = layer.budget_balance().unwrap();
    let t0 = Instant::now();
    let mut fut = Box::pin(Deadline::after(Duration::from_secs(1)).scope(async move {
        let r = retry_call(&mut svc, get()).await;
        (r, svc)
    }));
    assert!(
        tokio::time::timeout(Duration::from_millis(1), &mut fut)
            .await
            .is_err()
    );
    // The worker now waits for the gate with a blocker in hand; a second fills the slot.
    // (Driven inline: tower's Buffer future trips a higher-ranked `From` check in spawn.)
    let mut b1 = Box::pin(buffered.clone().oneshot(rget()));
    let mut b2 = Box::pin(buffered.clone().oneshot(rget()));
    assert!(
        tokio::time::timeout(Duration::from_millis(1), &mut b1)
            .await
            .is_err()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1), &mut b2)
            .await
            .is_err()
    );
    let (r, mut svc) = guarded("r10", fut).await;
    let took = t0.elapsed();
    eprintln!(
        "r10: {:?} after {took:?}; sent {}",
        r.as_ref().map_err(|e| chain(&**e)),
        gate.sent()
    );
    match &r {
        Err(_) => {
            expect_nrbd(&r, "r10");
            assert!(took < Duration::from_millis(1050), "{took:?}");
        }
        Ok(s) => panic!("r10: {s} (the gate never opened)"),
    }
    let after = layer.budget_balance().unwrap();
    assert!(after > before - 0.5, "budget {before} -> {after}");
    gate.open();
    assert_eq!(guarded("b1", b1).await.unwrap().status(), 200);
    assert_eq!(guarded("b2", b2).await.unwrap().status(), 200);
    let r = guarded("after", retry_call(&mut svc, get())).await;
    assert_eq!(r.map_err(|e| chain(&*e)).unwrap(), 200);
    assert_eq!(gate.sent(), 4);
}

// ---------------------------------------------------------------------------------------
// The hedge layer beside it.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn r14_hedge_above_retry_with_not_ready_below() {
    let gate = Gate::new(1, Some(1));
    let retry = retry_layer(Duration::from_millis(10));
    let hedge = steadfast::retry::HedgeLayer::builder()
        .delay(steadfast::retry::HedgeDelay::Fixed(Duration::from_millis(
            20,
        )))
        .retry_budget(retry.budget())
        .build()
        .unwrap();
    let mut svc = hedge.layer(retry.layer(gate.clone()));
    let before = retry.budget_balance().unwrap();
    let t0 = Instant::now();
    let r = guarded(
        "r14",
        Deadline::after(Duration::from_secs(1)).scope(retry_call(&mut svc, get())),
    )
    .await;
    let took = t0.elapsed();
    eprintln!(
        "r14: {:?} after {took:?}, sent {}",
        r.as_ref().map_err(|e| chain(&**e)),
        gate.sent()
    );
    assert!(took <= Duration::from_millis(1050), "{took:?}");
    assert_eq!(gate.sent(), 1);
    assert!(r.is_err() || r.as_ref().ok() == Some(&503));
    // Hedges spend from the same budget; only the unsent retry's token is in question.
    let after = retry.budget_balance().unwrap();
    eprintln!("r14 budget {before} -> {after}");
}

#[tokio::test(start_paused = true)]
async fn r14b_retry_above_hedge_with_not_ready_below() {
    let gate = Gate::new(1, Some(1));
    let retry = retry_layer(Duration::from_millis(10));
    let hedge = steadfast::retry::HedgeLayer::builder()
        .delay(steadfast::retry::HedgeDelay::Fixed(Duration::from_millis(
            20,
        )))
        .build()
        .unwrap();
    let mut svc = retry.layer(hedge.layer(gate.clone()));
    let before = retry.budget_balance().unwrap();
    let t0 = Instant::now();
    let r = guarded(
        "r14b",
        Deadline::after(Duration::from_secs(1)).scope(retry_call(&mut svc, get())),
    )
    .await;
    let took = t0.elapsed();
    eprintln!(
        "r14b: {:?} after {took:?}, sent {}",
        r.as_ref().map_err(|e| chain(&**e)),
        gate.sent()
    );
    assert!(took <= Duration::from_millis(1050), "{took:?}");
    assert_eq!(gate.sent(), 1);
    let after = retry.budget_balance().unwrap();
    assert!(after > before - 0.5, "budget {before} -> {after}");
}

// ---------------------------------------------------------------------------------------
// The client preset: its total timeout owns the deadline and reports Elapsed.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn r11_preset_total_timeout_reports_its_own_elapsed() {
    let gate = Gate::new(1, Some(1));
    let layer = steadfast::client::http()
        .attempt_timeout(Duration::from_millis(500))
        .total_timeout(Duration::from_secs(1))
        .retry(|r| r.backoff(Backoff::constant(Duration::from_millis(10)).jitter(Jitter::None)))
        .build()
        .unwrap();
    let mut svc = layer.layer(gate.clone());
    let before = layer.retry().budget_balance().unwrap();
    let t0 = Instant::now();
    let r = guarded("r11", async {
        let s = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc).await?;
        s.call(get()).await.map(|r| r.status().as_u16())
    })
    .await;
    let took = t0.elapsed();
    let e = r.expect_err("the gate never opened");
    eprintln!("r11: {} after {took:?}", chain(&*e));
    assert!(
        find::<Elapsed>(&*e).is_some(),
        "not the total's Elapsed: {}",
        chain(&*e)
    );
    assert!(find::<NotReadyByDeadline>(&*e).is_none(), "{}", chain(&*e));
    assert_eq!(gate.sent(), 1);
    assert!(took < Duration::from_millis(1050), "{took:?}");
    let after = layer.retry().budget_balance().unwrap();
    assert!(after > before - 0.5, "budget {before} -> {after}");
}

/// An ambient deadline shorter than the preset's total: the total adopts it ("or less if
/// the inbound deadline says so") and so owns it: its Elapsed, at the ambient deadline.
#[tokio::test(start_paused = true)]
async fn r11b_preset_under_a_shorter_ambient_deadline() {
    let gate = Gate::new(1, Some(1));
    let layer = steadfast::client::http()
        .attempt_timeout(Duration::from_millis(500))
        .total_timeout(Duration::from_secs(5))
        .retry(|r| r.backoff(Backoff::constant(Duration::from_millis(10)).jitter(Jitter::None)))
        .build()
        .unwrap();
    let mut svc = layer.layer(gate.clone());
    let before = layer.retry().budget_balance().unwrap();
    let t0 = Instant::now();
    let r = guarded(
        "r11b",
        Deadline::after(Duration::from_millis(700)).scope(async {
            let s = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc).await?;
            s.call(get()).await.map(|r| r.status().as_u16())
        }),
    )
    .await;
    let took = t0.elapsed();
    let e = r.expect_err("the gate never opened");
    eprintln!("r11b: {} after {took:?}", chain(&*e));
    assert!(TimedOut::is_in(&*e), "{}", chain(&*e));
    assert_eq!(gate.sent(), 1);
    assert!(took <= Duration::from_millis(710), "{took:?}");
    let after = layer.retry().budget_balance().unwrap();
    assert!(after > before - 0.5, "budget {before} -> {after}");
}

/// The balanced preset over real sockets, a ConcurrencyLimit(1) between it and the
/// transport, a blocker holding the permit: the total timeout ends it with Elapsed.
#[tokio::test(start_paused = true)]
async fn r11c_preset_with_waiting_limit_and_real_upstream() {
    let up = Upstream::start().await;
    up.set(Mode::Status(503));
    let layer = steadfast::client::http()
        .attempt_timeout(Duration::from_millis(500))
        .total_timeout(Duration::from_secs(1))
        .retry(|r| r.backoff(Backoff::constant(Duration::from_millis(10)).jitter(Jitter::None)))
        .build()
        .unwrap();
    let limited = tower::limit::ConcurrencyLimit::new(support::transport::<Full<Bytes>>(), 1);
    let mut svc = layer.layer(limited.clone());
    let url = format!("http://{}/x", up.addr);
    let t0 = Instant::now();
    let mut fut = Box::pin(async move {
        let s = svc.ready().await?;
        s.call(Request::get(url).body(Full::default()).unwrap())
            .await
            .map(|r| r.status().as_u16())
    });
    // Let the first attempt finish (real socket: poll in small steps).
    let mut spins = 0;
    while up.hits() == 0 {
        spins += 1;
        assert!(spins < 10_000);
        let _ = tokio::time::timeout(Duration::from_micros(100), &mut fut).await;
        tokio::task::yield_now().await;
    }
    // Hold the permit with a never-answered request of our own (a hang server).
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    let _keep = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            conns.push(s);
        }
    });
    let _blocker = tokio::spawn({
        let l = limited.clone();
        async move {
            let _ = l
                .oneshot(
                    Request::get(format!("http://{hang_addr}/"))
                        .body(steadfast::retry::ReplayBody::new(
                            Full::<Bytes>::default(),
                            1024,
                        ))
                        .unwrap(),
                )
                .await;
        }
    });
    let r = guarded("r11c", fut).await;
    let took = t0.elapsed();
    eprintln!(
        "r11c: {:?} after {took:?}, hits {}",
        r.as_ref().map_err(|e| chain(&**e)),
        up.hits()
    );
    match r {
        Ok(s) => assert_eq!(s, 503, "the first attempt's 503 or a timeout"),
        Err(e) => assert!(TimedOut::is_in(&*e), "{}", chain(&*e)),
    }
    assert!(took < Duration::from_millis(1050), "{took:?}");
}

// ---------------------------------------------------------------------------------------
// gRPC: the grpc preset over a real tonic server, a channel that is not ready for the retry.
// ---------------------------------------------------------------------------------------

#[cfg(feature = "tonic")]
mod grpc {
    use super::*;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    /// Below the stack: the first call gets UNAVAILABLE without reaching the channel; then
    /// the channel is "not ready" until opened.
    #[derive(Clone)]
    struct GrpcGate {
        inner: tonic::transport::Channel,
        gate: Gate,
        hits: Arc<AtomicUsize>,
    }

    type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

    impl Service<http::Request<tonic::body::Body>> for GrpcGate {
        type Response = http::Response<tonic::body::Body>;
        type Error = BoxError;
        type Future = BoxFut<Result<Self::Response, BoxError>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            match Service::<Request<()>>::poll_ready(&mut self.gate, cx) {
                Poll::Ready(Ok(())) => self.inner.poll_ready(cx).map_err(Into::into),
                other => other,
            }
        }
        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            let n = self.hits.fetch_add(1, SeqCst);
            drop(Service::<Request<()>>::call(
                &mut self.gate,
                Request::new(()),
            ));
            if n == 0 {
                let (parts, _) = steadfast::common::grpc_response::<()>(
                    steadfast::common::GrpcCode::Unavailable,
                    "warming up",
                )
                .into_parts();
                return Box::pin(async move {
                    Ok(http::Response::from_parts(
                        parts,
                        tonic::body::Body::empty(),
                    ))
                });
            }
            let fut = self.inner.call(req);
            Box::pin(async move { fut.await.map_err(Into::into) })
        }
    }

    async fn server() -> String {
        let (reporter, health) = tonic_health::server::health_reporter();
        std::mem::forget(reporter);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(support::incoming(listener)),
        );
        format!("http://{addr}")
    }

    fn check() -> HealthCheckRequest {
        HealthCheckRequest {
            service: String::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn r12_grpc_not_ready_retry_ends_at_the_total_timeout() {
        let url = server().await;
        let url2 = url.clone();
        let channel = tonic::transport::Channel::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let gate = Gate::new(0, Some(1));
        let hits = Arc::new(AtomicUsize::new(0));
        let stack = steadfast::client::grpc()
            .with(|c| {
                c.attempt_timeout(Duration::from_millis(500))
                    .total_timeout(Duration::from_secs(1))
            })
            .build()
            .unwrap();
        let gated = GrpcGate {
            inner: channel,
            gate: gate.clone(),
            hits: hits.clone(),
        };
        let mut client = HealthClient::new(stack.layer(gated));
        let t0 = Instant::now();
        let st = guarded("r12", client.check(check())).await.unwrap_err();
        let took = t0.elapsed();
        eprintln!("r12: {st:?} after {took:?}");
        assert_eq!(st.code(), tonic::Code::DeadlineExceeded, "{st:?}");
        assert_eq!(hits.load(SeqCst), 1);
        assert!(took < Duration::from_millis(1050), "{took:?}");
        // Under a shorter ambient deadline, a fresh gate (the first attempt gets UNAVAILABLE).
        gate.open();
        let gate = Gate::new(0, Some(1));
        let hits = Arc::new(AtomicUsize::new(0));
        let gated = GrpcGate {
            inner: tonic::transport::Channel::from_shared(url2.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
            gate: gate.clone(),
            hits: hits.clone(),
        };
        let mut client = HealthClient::new(stack.layer(gated));
        let t0 = Instant::now();
        let st = guarded(
            "r12 scoped",
            Deadline::after(Duration::from_millis(300)).scope(client.check(check())),
        )
        .await
        .unwrap_err();
        let took = t0.elapsed();
        eprintln!("r12 scoped: {st:?} after {took:?}");
        assert_eq!(st.code(), tonic::Code::DeadlineExceeded, "{st:?}");
        assert!(took <= Duration::from_millis(310), "{took:?}");
        // Opened: calls work again.
        gate.open();
        let ok = guarded("r12 open", client.check(check())).await;
        assert!(ok.is_ok(), "{ok:?}");
    }
}

#[allow(dead_code)]
fn _unused(_: Infallible) {}
