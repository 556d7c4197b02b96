//! Hostile tests of the balanced client preset (`client::http().balance(..)`): per-endpoint
//! breakers below the balancer (each a per-key breaker that remembers its last key: with a
//! balancer above, consecutive calls alternate keys), retries to other endpoints, endpoint
//! churn, manual breaker states, a small `max_keys`, and concurrency. Real servers on
//! loopback (ephemeral ports). Paused time where timing matters; every call has a guard
//! timeout (a hang fails instead of blocking); every loop is bounded; no timing asserts.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use bytes::Bytes;
use http::uri::Authority;
use http::{Method, Request, Response};
use http_body_util::Full;
use steadfast::balance::{HostHeader, Pick};
use steadfast::breaker::BreakerState;
use steadfast::client::HttpClientLayer;
use steadfast::common::BoxError;
use tower::{Layer, Service, ServiceExt};

// ---------------------------------------------------------------------------------------
// An upstream whose behaviour is chosen per `Host` (or for all with "*"), logging every
// request it receives (host, method, the caller's x-seq).
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ok,
    Status(u16),
    /// A status with `Retry-After: secs`.
    RetryAfter(u16, u32),
    Hang,
    /// 200 after this many milliseconds.
    Slow(u64),
    /// Host "flap": Ok, 503, Hang in turns of `n` requests.
    Flap(usize),
}

#[derive(Clone, Debug)]
struct Hit {
    host: String,
    method: Method,
    seq: Option<u64>,
}

struct UpState {
    port: u16,
    modes: Mutex<HashMap<String, Mode>>,
    log: Mutex<Vec<Hit>>,
    flap: AtomicUsize,
}

#[derive(Clone)]
struct Upstream {
    addr: SocketAddr,
    state: Arc<UpState>,
}

impl Upstream {
    async fn start_on(ip: &str) -> Self {
        let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpState {
            port: addr.port(),
            modes: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            flap: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(handler).with_state(state.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state }
    }

    async fn start() -> Self {
        Self::start_on("127.0.0.1").await
    }

    fn authority(&self) -> String {
        self.addr.to_string()
    }

    fn set(&self, host: &str, mode: Mode) {
        self.state
            .modes
            .lock()
            .unwrap()
            .insert(host.to_owned(), mode);
    }

    fn hits(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }

    fn log(&self) -> Vec<Hit> {
        self.state.log.lock().unwrap().clone()
    }

    fn hits_for_host(&self, host: &str) -> usize {
        self.log().iter().filter(|h| h.host == host).count()
    }
}

async fn handler(State(s): State<Arc<UpState>>, req: Request<Body>) -> Response<Body> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let seq = req
        .headers()
        .get("x-seq")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let method = req.method().clone();
    let _ = axum::body::to_bytes(req.into_body(), usize::MAX).await;
    s.log.lock().unwrap().push(Hit {
        host: host.clone(),
        method,
        seq,
    });
    let mode = {
        let m = s.modes.lock().unwrap();
        m.get(&host)
            .or_else(|| m.get("*"))
            .copied()
            .unwrap_or(Mode::Ok)
    };
    let mode = match mode {
        Mode::Flap(n) => match (s.flap.fetch_add(1, SeqCst) / n) % 3 {
            0 => Mode::Ok,
            1 => Mode::Status(503),
            _ => Mode::Hang,
        },
        m => m,
    };
    let mut b = Response::builder()
        .header("x-port", s.port.to_string())
        .header("x-host", host.as_str());
    if let Some(seq) = seq {
        b = b.header("x-seq", seq.to_string());
    }
    match mode {
        Mode::Ok | Mode::Flap(_) => b.status(200).body(Body::from("ok")).unwrap(),
        Mode::Status(c) => b.status(c).body(Body::from("fail")).unwrap(),
        Mode::RetryAfter(c, secs) => b
            .status(c)
            .header("retry-after", secs.to_string())
            .body(Body::from("later"))
            .unwrap(),
        Mode::Slow(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            b.status(200).body(Body::from("ok")).unwrap()
        }
        Mode::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

/// An address on which nothing listens.
async fn refusing() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}

fn key(a: &str) -> Option<Authority> {
    Some(a.parse().unwrap())
}

fn req(method: Method, seq: u64) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("http://orders/orders/7")
        .header("x-seq", seq.to_string())
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap()
}

/// The guard on every call: a hang fails the test (paused time auto-advances to it).
const GUARD: Duration = Duration::from_secs(600);

type Client = steadfast::client::HttpClient<support::Transport<Full<Bytes>>>;

/// One call: the status and the `x-seq` / `x-port` the server answered with, or the error.
async fn call(
    svc: &mut Client,
    r: Request<Full<Bytes>>,
) -> Result<(u16, Option<u64>, Option<u16>), String> {
    let fut = async {
        let svc = svc.ready().await.map_err(|e| e.to_string())?;
        let res = svc.call(r).await.map_err(|e: BoxError| chain(&*e))?;
        let h = |n: &str| {
            res.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        Ok((
            res.status().as_u16(),
            h("x-seq"),
            h("x-port").map(|p| p as u16),
        ))
    };
    tokio::time::timeout(GUARD, fut).await.expect("a call hung")
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

fn stack_for(endpoints: &[String], seed: u64) -> HttpClientLayer {
    steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .balance(|b| b.endpoints(endpoints).seed(seed))
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Promise 1: per-endpoint breakers are isolated.
// ---------------------------------------------------------------------------------------

async fn isolation(fault: &str) {
    let (g1, g2) = (Upstream::start().await, Upstream::start().await);
    // Healthy endpoints take 5 ms (paused time would make every latency zero): a failing
    // one that answers at once competes on its load, and keeps getting calls.
    g1.set("*", Mode::Slow(5));
    g2.set("*", Mode::Slow(5));
    let bad_up = Upstream::start().await;
    let bad = match fault {
        "503" => {
            bad_up.set("*", Mode::Status(503));
            bad_up.authority()
        }
        "hang" => {
            bad_up.set("*", Mode::Hang);
            bad_up.authority()
        }
        _ => refusing().await,
    };
    let eps = [g1.authority(), g2.authority(), bad.clone()];
    let stack = stack_for(&eps, 3);
    let mut all = stack.breakers().subscribe_all();
    let mut client = stack.layer(support::transport::<Full<Bytes>>());
    let mut failed = Vec::new();
    let mut bad_opened = false;
    const N: u64 = 600;
    for i in 0..N {
        match call(&mut client, req(Method::GET, i)).await {
            Ok((200, Some(s), _)) if s == i => {}
            other => failed.push((i, other)),
        }
        for g in [&g1, &g2] {
            let st = stack.breakers().handle(&key(&g.authority())).state();
            assert_eq!(
                st,
                BreakerState::Closed,
                "{fault}: a healthy endpoint's breaker at {i}"
            );
        }
        while let Some((k, t)) = all.try_recv() {
            assert_eq!(
                k,
                key(&bad),
                "{fault}: only the failing endpoint transitions: {t:?}"
            );
            bad_opened |= t.to == BreakerState::Open;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bad_hits = if fault == "refuse" { 0 } else { bad_up.hits() };
    eprintln!(
        "{fault}: failed {} of {N}, bad hits {bad_hits}, bad breaker opened: {bad_opened}, g1 {} g2 {}",
        failed.len(),
        g1.hits(),
        g2.hits()
    );
    assert!(
        failed.is_empty(),
        "{fault}: {} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // A hanging endpoint's load estimate (a whole attempt timeout) makes the balancer stop
    // choosing it after a call or two: its breaker need not see enough failures to open.
    assert!(
        bad_opened || (fault == "hang" && bad_hits <= 5),
        "{fault}: the failing endpoint's breaker never opened"
    );
    assert!((bad_hits as u64) < N / 10, "{fault}: bad got {bad_hits}");
}

#[tokio::test(start_paused = true)]
async fn p1_an_endpoint_answering_503_trips_only_its_own_breaker() {
    isolation("503").await;
}

#[tokio::test(start_paused = true)]
async fn p1_an_endpoint_refusing_connections_trips_only_its_own_breaker() {
    isolation("refuse").await;
}

#[tokio::test(start_paused = true)]
async fn p1_an_endpoint_hanging_trips_only_its_own_breaker() {
    isolation("hang").await;
}

/// Several endpoints' breakers open at once (forced open here, as an operator or several
/// tripped breakers would leave them) and one healthy endpoint: each refusal is rerouted,
/// but each reroute costs one of the call's attempts.
#[tokio::test(start_paused = true)]
async fn p1_three_open_breakers_of_four_endpoints_lose_no_call() {
    open_breakers_lose_no_call(3, None).await;
}

/// The same with four of five, the healthy endpoint taking 5 ms as real ones do.
#[tokio::test(start_paused = true)]
async fn p1_four_open_breakers_of_five_endpoints_lose_no_call() {
    open_breakers_lose_no_call(4, Some(5)).await;
}

async fn open_breakers_lose_no_call(n: usize, slow: Option<u64>) {
    let good = Upstream::start().await;
    if let Some(ms) = slow {
        good.set("*", Mode::Slow(ms));
    }
    let mut eps = vec![good.authority()];
    let mut forced = Vec::new();
    for _ in 0..n {
        let u = Upstream::start().await;
        eps.push(u.authority());
        forced.push(u);
    }
    let stack = stack_for(&eps, 5);
    for f in &forced {
        stack.breakers().handle(&key(&f.authority())).force_open();
    }
    let mut client = stack.layer(support::transport::<Full<Bytes>>());
    let mut failed = Vec::new();
    for i in 0..400u64 {
        match call(&mut client, req(Method::GET, i)).await {
            Ok((200, _, _)) => {}
            other => failed.push((i, other)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(forced.iter().all(|f| f.hits() == 0));
    assert!(
        failed.is_empty(),
        "{} of 400 calls failed with a healthy endpoint in the set: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
}

// ---------------------------------------------------------------------------------------
// Promise 2: retries go elsewhere; a POST is sent at most once unless never sent.
// ---------------------------------------------------------------------------------------

async fn post_once(fault: &str) {
    let good = Upstream::start().await;
    let bad_up = Upstream::start().await;
    let bad = match fault {
        "503" => {
            bad_up.set("*", Mode::Status(503));
            bad_up.authority()
        }
        "hang" => {
            bad_up.set("*", Mode::Hang);
            bad_up.authority()
        }
        _ => refusing().await,
    };
    let stack = stack_for(&[bad.clone(), good.authority()], 11);
    let mut client = stack.layer(support::transport::<Full<Bytes>>());
    const N: u64 = 200;
    let mut outcomes = Vec::new();
    for i in 0..N {
        outcomes.push(call(&mut client, req(Method::POST, i)).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut per_seq: HashMap<u64, usize> = HashMap::new();
    for h in good.log().into_iter().chain(bad_up.log()) {
        assert_eq!(h.method, Method::POST);
        *per_seq.entry(h.seq.unwrap()).or_default() += 1;
    }
    let twice: Vec<_> = per_seq.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{fault}: POSTs sent twice: {twice:?}");
    if fault == "refuse" {
        let bad_ok: Vec<_> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| !matches!(o, Ok((200, _, _))))
            .collect();
        assert!(
            bad_ok.is_empty(),
            "refused connections are retried: {:?}",
            &bad_ok[..bad_ok.len().min(3)]
        );
        assert_eq!(good.hits() as u64, N);
    }
    for (i, o) in outcomes.iter().enumerate() {
        if let Ok((_, seq, _)) = o {
            assert_eq!(
                *seq,
                Some(i as u64),
                "{fault}: a response to another request"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn p2_a_post_answered_503_is_not_sent_again() {
    post_once("503").await;
}

#[tokio::test(start_paused = true)]
async fn p2_a_post_that_timed_out_is_not_sent_again() {
    post_once("hang").await;
}

#[tokio::test(start_paused = true)]
async fn p2_a_post_whose_connection_was_refused_reaches_the_other_endpoint() {
    post_once("refuse").await;
}

/// A GET that failed on one endpoint is retried on the other, never twice on the failing
/// one (`mode`: what the failing endpoint answers).
async fn get_retries_elsewhere(mode: Mode) -> Vec<(u64, usize)> {
    let good = Upstream::start().await;
    good.set("*", Mode::Slow(5));
    let bad = Upstream::start().await;
    bad.set("*", mode);
    let stack = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(10))
        .balance(|b| b.endpoints([bad.authority(), good.authority()]).seed(13))
        .build()
        .unwrap();
    let mut client = stack.layer(support::transport::<Full<Bytes>>());
    let mut statuses = Vec::new();
    for i in 0..100u64 {
        statuses.push((i, call(&mut client, req(Method::GET, i)).await));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut per_seq: HashMap<u64, usize> = HashMap::new();
    for h in bad.log() {
        *per_seq.entry(h.seq.unwrap()).or_default() += 1;
    }
    let mut twice: Vec<(u64, usize)> = per_seq.into_iter().filter(|(_, n)| *n > 1).collect();
    twice.sort();
    let failed: Vec<_> = statuses
        .iter()
        .filter(|(_, o)| !matches!(o, Ok((200, _, _))))
        .collect();
    eprintln!(
        "{mode:?}: bad hits {}, good hits {}, calls to bad more than once: {twice:?}, failed calls: {:?}",
        bad.hits(),
        good.hits(),
        &failed[..failed.len().min(5)]
    );
    twice
}

#[tokio::test(start_paused = true)]
async fn p2_a_get_answered_503_is_retried_on_the_other_endpoint() {
    let twice = get_retries_elsewhere(Mode::Status(503)).await;
    assert!(
        twice.is_empty(),
        "retried on the endpoint that just failed: {twice:?}"
    );
}

/// The failing endpoint asks for the retry after 3 s (`Retry-After`): longer than the
/// balancer's failure penalty (2 s).
#[tokio::test(start_paused = true)]
async fn p2_a_get_answered_503_with_retry_after_is_retried_on_the_other_endpoint() {
    let twice = get_retries_elsewhere(Mode::RetryAfter(503, 3)).await;
    assert!(
        twice.is_empty(),
        "retried on the endpoint that just failed: {twice:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Promise 3: endpoint set changes while calls run.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn p3_a_removed_endpoint_gets_no_call_started_after_its_removal() {
    let ups = [
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    ];
    let eps: Vec<String> = ups.iter().map(Upstream::authority).collect();
    let stack = stack_for(&eps, 17);
    let client = stack.layer(support::transport::<Full<Bytes>>());
    let seq = Arc::new(AtomicU64::new(0));
    let b = ups[1].clone();
    let b_auth: Authority = b.authority().parse().unwrap();

    // Runs `n` calls in waves of 20 concurrent tasks; returns the outcomes.
    async fn wave(
        client: &Client,
        seq: &Arc<AtomicU64>,
        n: usize,
    ) -> Vec<Result<(u16, Option<u64>, Option<u16>), String>> {
        let mut tasks = Vec::new();
        for _ in 0..n {
            let mut c = client.clone();
            let s = seq.fetch_add(1, SeqCst);
            tasks.push(tokio::spawn(async move {
                let o = call(&mut c, req(Method::GET, s)).await;
                if let Ok((_, got, _)) = &o {
                    assert_eq!(*got, Some(s), "a response to another request");
                }
                o
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("no panic"));
        }
        out
    }

    for round in 0..20 {
        // Calls in flight while B leaves.
        let mut in_flight = Vec::new();
        for _ in 0..20 {
            let mut c = client.clone();
            let s = seq.fetch_add(1, SeqCst);
            in_flight.push(tokio::spawn(async move {
                call(&mut c, req(Method::GET, s)).await
            }));
        }
        tokio::task::yield_now().await;
        let boundary = seq.load(SeqCst);
        stack.endpoints().remove(&b_auth);
        let out = wave(&client, &seq, 40).await;
        let late: Vec<u64> = b
            .log()
            .iter()
            .filter_map(|h| h.seq)
            .filter(|s| *s >= boundary)
            .collect();
        assert!(
            late.is_empty(),
            "round {round}: calls started after B's removal reached B: {late:?}"
        );
        assert!(
            out.iter().all(|o| matches!(o, Ok((200, _, _)))),
            "round {round}: {out:?}"
        );
        for t in in_flight {
            let o = t.await.expect("no panic");
            assert!(
                matches!(o, Ok((200, _, _))),
                "round {round}: in flight: {o:?}"
            );
        }
        // B comes back; some rounds with its breaker forced open first.
        let forced = round % 2 == 1;
        if forced {
            stack.breakers().handle(&Some(b_auth.clone())).force_open();
        }
        let boundary = seq.load(SeqCst);
        stack.endpoints().insert(b_auth.clone());
        let before_state = stack.breakers().handle(&Some(b_auth.clone())).state();
        let out = wave(&client, &seq, 60).await;
        assert!(
            out.iter().all(|o| matches!(o, Ok((200, _, _)))),
            "round {round} re-added: {out:?}"
        );
        let got = b
            .log()
            .iter()
            .filter(|h| h.seq.is_some_and(|s| s >= boundary))
            .count();
        let st = stack.breakers().handle(&Some(b_auth.clone())).state();
        if forced {
            assert_eq!(before_state, BreakerState::ForcedOpen);
            assert_eq!(st, BreakerState::ForcedOpen, "round {round}");
            assert_eq!(
                got, 0,
                "round {round}: a forced-open re-added endpoint got calls"
            );
            stack.breakers().handle(&Some(b_auth.clone())).close();
            // Its refusals' penalty runs out: the next call asks the (closed) breaker.
            tokio::time::sleep(Duration::from_millis(2100)).await;
        } else {
            assert_eq!(st, BreakerState::Closed);
        }
    }
    // After all that, B takes calls again.
    let boundary = seq.load(SeqCst);
    let _ = wave(&client, &seq, 100).await;
    let got = b
        .log()
        .iter()
        .filter(|h| h.seq.is_some_and(|s| s >= boundary))
        .count();
    assert!(
        got > 0,
        "B never took a call again after its breaker was closed"
    );
}

// ---------------------------------------------------------------------------------------
// Promise 4: force_open through a handle beats the memo.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn p4_force_open_stops_the_next_call_of_the_instance_that_just_called_it() {
    let a = Upstream::start().await;
    let stack = stack_for(&[a.authority()], 1);
    let k = key(&a.authority());
    let mut svc = stack.layer(support::transport::<Full<Bytes>>());
    for i in 0..3 {
        assert_eq!(call(&mut svc, req(Method::GET, i)).await.unwrap().0, 200);
    }
    let mut cloned = svc.clone();
    let hits = a.hits();
    stack.breakers().handle(&k).force_open();
    let r = call(&mut svc, req(Method::GET, 10)).await;
    assert!(
        r.is_err(),
        "the remembered breaker let a call through: {r:?}"
    );
    let r = call(&mut cloned, req(Method::GET, 11)).await;
    assert!(
        r.is_err(),
        "a clone's remembered breaker let a call through: {r:?}"
    );
    assert_eq!(a.hits(), hits);
    stack.breakers().handle(&k).close();
    assert_eq!(call(&mut svc, req(Method::GET, 12)).await.unwrap().0, 200);
    assert_eq!(
        call(&mut cloned, req(Method::GET, 13)).await.unwrap().0,
        200
    );
}

#[tokio::test(start_paused = true)]
async fn p4_force_open_with_alternating_endpoints_on_one_instance() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let stack = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .balance(|bb| {
            bb.endpoints([a.authority(), b.authority()])
                .pick(Pick::RoundRobin)
        })
        .build()
        .unwrap();
    let ka = key(&a.authority());
    let mut svc = stack.layer(support::transport::<Full<Bytes>>());
    for cycle in 0..5u64 {
        // Make A the last endpoint this instance called.
        let mut last = None;
        for i in 0..4 {
            last = call(&mut svc, req(Method::GET, cycle * 1000 + i))
                .await
                .unwrap()
                .2;
            if last == Some(a.addr.port()) {
                break;
            }
        }
        assert_eq!(last, Some(a.addr.port()), "cycle {cycle}: A never called");
        let hits = a.hits();
        stack.breakers().handle(&ka).force_open();
        for i in 0..40 {
            let r = call(&mut svc, req(Method::GET, cycle * 1000 + 100 + i)).await;
            assert!(
                matches!(r, Ok((200, _, Some(p))) if p == b.addr.port()),
                "cycle {cycle}: {r:?}"
            );
        }
        assert_eq!(
            a.hits(),
            hits,
            "cycle {cycle}: a forced-open endpoint got calls"
        );
        stack.breakers().handle(&ka).close();
        // After close(), how long until A takes calls again (bounded).
        let mut back_after = None;
        for step in 0..2000u64 {
            let r = call(&mut svc, req(Method::GET, cycle * 1000 + 200 + step)).await;
            assert!(matches!(r, Ok((200, _, _))), "cycle {cycle}: {r:?}");
            if r.unwrap().2 == Some(a.addr.port()) {
                back_after = Some(step);
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!("cycle {cycle}: A back after {back_after:?} half-seconds");
        assert!(
            back_after.is_some(),
            "cycle {cycle}: A never came back after close()"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Promise 5: more endpoints than max_keys.
// ---------------------------------------------------------------------------------------

/// 40 authorities (127.0.0.1..40 on one port) with a breaker map of 16; one authority
/// answers 503. `balance_ejects`: whether the balancer's own ejection is on. Bounded keys,
/// no healthy breaker opened, and with ejection no call lost.
async fn many_endpoints(balance_ejects: bool) {
    let up = Upstream::start_on("0.0.0.0").await;
    let port = up.addr.port();
    let eps: Vec<String> = (1..=40).map(|i| format!("127.0.0.{i}:{port}")).collect();
    let bad = format!("127.0.0.7:{port}");
    up.set(&bad, Mode::Status(503));
    let stack = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .breaker(|b| b.max_keys(16))
        .balance(|b| {
            let b = b
                .endpoints(&eps)
                .pick(Pick::RoundRobin)
                .host_header(HostHeader::Endpoint)
                .seed(23);
            if balance_ejects {
                b
            } else {
                b.consecutive_failures(None)
                    .success_rate(None)
                    .failure_percentage(None)
                    .failure_penalty(Duration::ZERO)
            }
        })
        .build()
        .unwrap();
    let mut all = stack.breakers().subscribe_all();
    let mut svc = stack.layer(support::transport::<Full<Bytes>>());
    let mut opened = Vec::new();
    let mut failed = 0;
    let mut max_len = 0;
    for i in 0..1200u64 {
        let mut c = svc.clone();
        let r = call(
            if i % 5 == 0 { &mut svc } else { &mut c },
            req(Method::GET, i),
        )
        .await;
        if !matches!(r, Ok((200, _, _))) {
            failed += 1;
        }
        let len = stack.breakers().keys().len();
        max_len = max_len.max(len);
        assert!(len <= 16, "{len} breakers kept");
        while let Some((k, t)) = all.try_recv() {
            if t.to == BreakerState::Open {
                opened.push(k);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bad_hits = up.hits_for_host(&bad);
    eprintln!(
        "balancer ejects {balance_ejects}: failed {failed}, bad hits {bad_hits}, opened {:?}, max keys {max_len}",
        opened
            .iter()
            .map(|k| k.as_ref().map(|a| a.to_string()))
            .collect::<Vec<_>>()
    );
    assert!(
        opened.iter().all(|k| *k == key(&bad)),
        "a healthy endpoint's breaker opened: {opened:?}"
    );
    // With fewer breakers than endpoints (one per shard here), the failing endpoint's Closed
    // breaker is evicted by other keys between its calls and never counts enough failures
    // to open: the documented cost of a small `max_keys`. The balancer's own ejection is
    // what protects the caller then.
    if balance_ejects {
        assert!(
            bad_hits <= 40,
            "{bad_hits} of 1200 calls reached the failing endpoint"
        );
        assert_eq!(
            failed, 0,
            "a healthy endpoint was in service for every call"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn p5_forty_endpoints_sixteen_breakers_with_ejection() {
    many_endpoints(true).await;
}

#[tokio::test(start_paused = true)]
async fn p5_forty_endpoints_sixteen_breakers_breaker_alone() {
    many_endpoints(false).await;
}

/// Two names of one server (`127.0.0.1:P` and `localhost:P`): distinct endpoints and
/// breakers; the one answering 503 trips alone.
#[tokio::test(start_paused = true)]
async fn p5_two_names_of_one_server_are_two_breakers() {
    let up = Upstream::start_on("127.0.0.1").await;
    let port = up.addr.port();
    let good = format!("127.0.0.1:{port}");
    let bad = format!("localhost:{port}");
    up.set(&bad, Mode::Status(503));
    let stack = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .breaker(|b| b.max_keys(16))
        .balance(|b| {
            b.endpoints([good.clone(), bad.clone()])
                .host_header(HostHeader::Endpoint)
                .seed(29)
        })
        .build()
        .unwrap();
    let mut svc = stack.layer(support::transport::<Full<Bytes>>());
    let mut failed = Vec::new();
    for i in 0..300u64 {
        let r = call(&mut svc, req(Method::GET, i)).await;
        if !matches!(r, Ok((200, _, _))) {
            failed.push((i, r));
        }
        assert_eq!(
            stack.breakers().handle(&key(&good)).state(),
            BreakerState::Closed
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failed.is_empty(), "{failed:?}");
    assert!(stack.breakers().keys().len() <= 2);
}

// ---------------------------------------------------------------------------------------
// Promise 6: concurrency with a flapping endpoint.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p6_concurrent_calls_with_a_flapping_endpoint() {
    let up = Upstream::start_on("0.0.0.0").await;
    let port = up.addr.port();
    let eps: Vec<String> = (1..=4).map(|i| format!("127.0.0.{i}:{port}")).collect();
    up.set(&eps[1], Mode::Flap(7));
    let stack = steadfast::client::http()
        .attempt_timeout(Duration::from_millis(300))
        .total_timeout(Duration::from_secs(2))
        .breaker(|b| {
            b.consecutive_failures(Some(3))
                .open_time(Duration::from_millis(500))
                .max_open_time(Duration::from_secs(1))
        })
        .balance(|b| {
            b.endpoints(&eps)
                .host_header(HostHeader::Endpoint)
                .ejection_time(Duration::from_millis(300), Duration::from_secs(1))
                .failure_penalty(Duration::from_millis(100))
        })
        .build()
        .unwrap();
    let client = stack.layer(support::transport::<Full<Bytes>>());
    let seq = Arc::new(AtomicU64::new(0));
    let churn = {
        let h = stack.endpoints();
        let e: Authority = eps[2].parse().unwrap();
        let b = stack.breakers().clone();
        let k = key(&eps[3]);
        tokio::spawn(async move {
            for i in 0..400 {
                if i % 2 == 0 {
                    h.remove(&e);
                } else {
                    h.insert(e.clone());
                }
                if i % 50 == 0 {
                    b.handle(&k).force_open();
                } else if i % 50 == 25 {
                    b.handle(&k).close();
                }
                tokio::task::yield_now().await;
            }
            h.insert(e);
            b.handle(&k).close();
        })
    };
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut c = client.clone();
        let seq = seq.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..120 {
                let s = seq.fetch_add(1, SeqCst);
                let m = if (t + i) % 2 == 0 {
                    Method::GET
                } else {
                    Method::POST
                };
                let r = if i % 3 == 0 {
                    call(&mut c.clone(), req(m.clone(), s)).await
                } else {
                    call(&mut c, req(m.clone(), s)).await
                };
                if let Ok((_, got, _)) = &r {
                    assert_eq!(*got, Some(s), "a response to another request");
                }
                outcomes.push((s, m, r));
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.extend(t.await.expect("no panic"));
    }
    churn.await.unwrap();
    assert_eq!(outcomes.len(), 8 * 120, "every call returned");
    let mut post_seqs: HashMap<u64, usize> = HashMap::new();
    let posts: std::collections::HashSet<u64> = outcomes
        .iter()
        .filter(|(_, m, _)| *m == Method::POST)
        .map(|(s, _, _)| *s)
        .collect();
    for h in up.log() {
        if let Some(s) = h.seq.filter(|s| posts.contains(s)) {
            assert_eq!(h.method, Method::POST);
            *post_seqs.entry(s).or_default() += 1;
        }
    }
    let twice: Vec<_> = post_seqs.iter().filter(|(_, n)| **n > 1).collect();
    let ok = outcomes
        .iter()
        .filter(|(_, _, r)| matches!(r, Ok((200, _, _))))
        .count();
    let errs: Vec<&String> = outcomes
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().err())
        .collect();
    eprintln!(
        "ok {ok} of {}; errors {}: {:?}",
        outcomes.len(),
        errs.len(),
        &errs[..errs.len().min(3)]
    );
    assert!(twice.is_empty(), "POSTs sent twice: {twice:?}");
    assert!(
        stack.breakers().keys().len() <= 4,
        "{:?}",
        stack.breakers().keys()
    );
}
