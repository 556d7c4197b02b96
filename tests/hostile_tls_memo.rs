//! Hostile tests of the per-key breaker's per-thread memory: each thread
//! remembers its last four keys (of all keyed maps together), weakly, beside each service's
//! own memo. Public API only. Paused tokio time where time matters; loopback sockets with
//! ephemeral ports for the transport test (real time there, no timing assertions, one
//! generous timeout as a hang guard). Every loop is bounded.

mod support;

use std::cell::RefCell;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::uri::Authority;
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::Full;
use steadfast::breaker::error::BreakerOpen;
use steadfast::breaker::{
    BreakerKey, BreakerState, ByAuthority, CircuitBreakerBuilder, CircuitBreakerLayer, ExtractKey,
};
use steadfast::common::BoxError;
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt, service_fn};

type Key = Option<Authority>;

fn builder() -> CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .open_time(Duration::from_secs(30))
        .max_open_time(Duration::from_secs(30))
        .jitter_percent(0)
        .seed(1)
}

fn req(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/")).body(()).unwrap()
}

fn key_of(host: &str) -> Key {
    let r = req(host);
    ByAuthority.extract(r.uri(), r.headers())
}

/// 503 for hosts (or first path segments) starting with "down", else 200.
fn upstream()
-> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send
{
    service_fn(move |r: Request<()>| {
        let host = r.uri().host().unwrap_or("").to_ascii_lowercase();
        let down = host.starts_with("down") || r.uri().path().starts_with("/down");
        let status = if down { 503 } else { 200 };
        async move { Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap()) }
    })
}

async fn call<S, B>(svc: &mut S, r: Request<()>) -> Result<u16, bool>
where
    S: Service<Request<()>, Response = Response<B>, Error = BoxError>,
{
    match svc.ready().await.unwrap().call(r).await {
        Ok(res) => Ok(res.status().as_u16()),
        Err(e) => Err(e.downcast_ref::<BreakerOpen>().is_some()),
    }
}

/// One call, polled once to completion (the upstream answers at once): usable where no
/// executor runs (thread-local destructors, a key's own code).
fn call_now<S, B>(svc: &S, r: Request<()>) -> Result<u16, bool>
where
    S: Service<Request<()>, Response = Response<B>, Error = BoxError> + Clone,
{
    let mut s = svc.clone();
    match s
        .call(r)
        .now_or_never()
        .expect("the upstream answers at once")
    {
        Ok(res) => Ok(res.status().as_u16()),
        Err(e) => Err(e.downcast_ref::<BreakerOpen>().is_some()),
    }
}

fn path_req(p: &str) -> Request<()> {
    Request::get(format!("http://x/{p}")).body(()).unwrap()
}

// ---------------------------------------------------------------------------------------
// A hostile key: its `same`, `clone` and `drop` can call into another keyed breaker on the
// same thread or panic; every copy holds a token, so live copies can be counted.
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Hooks {
    on_same: bool,
    on_clone: bool,
    on_drop: bool,
    panic_same: bool,
    panic_clone: bool,
    /// Only this key's drops fire the hook, when set.
    drop_only: Option<u32>,
    depth: u32,
    fired: u32,
    action: Option<Rc<dyn Fn()>>,
}

thread_local! {
    static HOOKS: RefCell<Hooks> = RefCell::new(Hooks::default());
}

fn fire(which: fn(&Hooks) -> bool) {
    let action = HOOKS
        .try_with(|h| {
            let mut h = h.try_borrow_mut().ok()?;
            if !which(&h) || h.depth > 0 {
                return None;
            }
            h.fired += 1;
            let action = h.action.clone()?;
            h.depth += 1;
            Some(action)
        })
        .ok()
        .flatten();
    // Only the call that went a level deeper comes back up (a nested call skipped at depth
    // 1 must not reopen the hook while the outer action still runs).
    if let Some(a) = action {
        a();
        let _ = HOOKS.try_with(|h| {
            if let Ok(mut h) = h.try_borrow_mut() {
                h.depth = h.depth.saturating_sub(1);
            }
        });
    }
}

fn hooks(f: impl FnOnce(&mut Hooks)) {
    HOOKS.with_borrow_mut(f);
}

#[derive(Debug)]
struct HKey {
    id: u32,
    token: Arc<()>,
}

impl Hash for HKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}
impl PartialEq for HKey {
    fn eq(&self, o: &Self) -> bool {
        self.id == o.id
    }
}
impl Eq for HKey {}

impl Clone for HKey {
    fn clone(&self) -> Self {
        fire(|h| h.on_clone);
        if HOOKS.try_with(|h| h.borrow().panic_clone).unwrap_or(false) {
            panic!("hostile clone");
        }
        HKey {
            id: self.id,
            token: self.token.clone(),
        }
    }
}

impl Drop for HKey {
    fn drop(&mut self) {
        let id = self.id;
        let mine = HOOKS
            .try_with(|h| {
                h.try_borrow()
                    .is_ok_and(|h| h.drop_only.is_none_or(|d| d == id))
            })
            .unwrap_or(false);
        if mine {
            fire(|h| h.on_drop);
        }
    }
}

impl BreakerKey for HKey {
    fn name(&self) -> String {
        format!("h{}", self.id)
    }
    fn same(&self, o: &Self) -> bool {
        fire(|h| h.on_same);
        if HOOKS.try_with(|h| h.borrow().panic_same).unwrap_or(false) {
            panic!("hostile same");
        }
        self.id == o.id
    }
}

/// A layer keyed by `HKey` (the first path segment's number, "down…" segments are id 1000+).
macro_rules! hkey_layer {
    ($b:expr, $token:expr) => {{
        let token: Arc<()> = $token.clone();
        $b.build_per_key(move |u: &Uri, _: &HeaderMap| {
            let seg = u.path().trim_start_matches('/');
            let id = match seg.strip_prefix("down") {
                Some(n) => 1000 + n.parse::<u32>().unwrap_or(0),
                None => seg.parse::<u32>().unwrap_or(0),
            };
            HKey {
                id,
                token: token.clone(),
            }
        })
        .unwrap()
    }};
}

fn hk(id: u32, token: &Arc<()>) -> HKey {
    HKey {
        id,
        token: token.clone(),
    }
}

/// A String-keyed layer (the path).
macro_rules! path_layer {
    ($b:expr) => {
        $b.build_per_key(|u: &Uri, _: &HeaderMap| u.path().to_owned())
            .unwrap()
    };
}

// ---------------------------------------------------------------------------------------
// Promise 1: every call uses the map's breaker for its key.
// ---------------------------------------------------------------------------------------

/// Two layers of the same types, six keys in turn (more than a thread remembers), a fresh
/// clone per call: every call counts on its own layer's breaker; a trip in one layer is not
/// seen by the other.
#[tokio::test(start_paused = true)]
async fn p1_six_keys_in_turn_two_same_typed_layers_clone_per_call() {
    let a = builder()
        .consecutive_failures(Some(2))
        .build_per_authority()
        .unwrap();
    let b = builder()
        .consecutive_failures(Some(2))
        .build_per_authority()
        .unwrap();
    let (sa, sb) = (a.layer(upstream()), b.layer(upstream()));
    let hosts = ["h0:1", "h1:1", "H2:1", "h3:1", "h4:1", "h5:1"];
    for round in 0..5 {
        for h in hosts {
            assert_eq!(call(&mut sa.clone(), req(h)).await, Ok(200), "{round} {h}");
            assert_eq!(call(&mut sb.clone(), req(h)).await, Ok(200), "{round} {h}");
        }
    }
    for h in hosts {
        assert_eq!(a.handle(&key_of(h)).metrics().calls, 5, "a {h}");
        assert_eq!(b.handle(&key_of(h)).metrics().calls, 5, "b {h}");
    }
    // Trip "down:1" in a only.
    assert_eq!(call(&mut sa.clone(), req("down:1")).await, Ok(503));
    assert_eq!(call(&mut sb.clone(), req("h0:1")).await, Ok(200));
    assert_eq!(call(&mut sa.clone(), req("DOWN:1")).await, Ok(503));
    assert_eq!(a.handle(&key_of("down:1")).state(), BreakerState::Open);
    for _ in 0..3 {
        assert_eq!(call(&mut sa.clone(), req("down:1")).await, Err(true));
        assert_eq!(call(&mut sb.clone(), req("down:1")).await, Ok(503));
        assert_eq!(call(&mut sb.clone(), req("h1:1")).await, Ok(200));
        b.handle(&key_of("down:1")).close();
    }
    assert_eq!(b.handle(&key_of("down:1")).metrics().calls, 3);
}

/// Maps of different key types interleaved on one thread (authority, String, HKey, u64),
/// each with more than four keys, a fresh clone per call; a manual state in one map is
/// obeyed there and nowhere else.
#[tokio::test(start_paused = true)]
async fn p1_maps_of_different_key_types_interleaved() {
    let token = Arc::new(());
    let auth_l = builder().build_per_authority().unwrap();
    let path_l = path_layer!(builder());
    let h_l = hkey_layer!(builder(), token);
    let port_l = builder()
        .build_per_key(|u: &Uri, _: &HeaderMap| u64::from(u.port_u16().unwrap_or(0)))
        .unwrap();
    let (s1, s2, s3, s4) = (
        auth_l.layer(upstream()),
        path_l.layer(upstream()),
        h_l.layer(upstream()),
        port_l.layer(upstream()),
    );
    for round in 0..4 {
        for i in 0..6u32 {
            let r = || {
                Request::get(format!("http://k{i}:{}/{i}", 10 + i))
                    .body(())
                    .unwrap()
            };
            assert_eq!(call(&mut s1.clone(), r()).await, Ok(200), "{round}");
            assert_eq!(call(&mut s2.clone(), r()).await, Ok(200), "{round}");
            assert_eq!(call(&mut s3.clone(), r()).await, Ok(200), "{round}");
            assert_eq!(call(&mut s4.clone(), r()).await, Ok(200), "{round}");
        }
    }
    for i in 0..6u32 {
        assert_eq!(
            auth_l
                .handle(&key_of(&format!("k{i}:{}", 10 + i)))
                .metrics()
                .calls,
            4
        );
        assert_eq!(path_l.handle(&format!("/{i}")).metrics().calls, 4);
        assert_eq!(h_l.handle(&hk(i, &token)).metrics().calls, 4);
        assert_eq!(port_l.handle(&u64::from(10 + i)).metrics().calls, 4);
    }
    // Forced open in the String map for "/3": only that map refuses.
    path_l.handle(&"/3".to_owned()).force_open();
    let r = || Request::get("http://k3:13/3").body(()).unwrap();
    assert_eq!(call(&mut s2.clone(), r()).await, Err(true));
    assert_eq!(call(&mut s1.clone(), r()).await, Ok(200));
    assert_eq!(call(&mut s3.clone(), r()).await, Ok(200));
    assert_eq!(call(&mut s4.clone(), r()).await, Ok(200));
    assert_eq!(call(&mut s2.clone(), r()).await, Err(true));
    assert_eq!(path_l.handle(&"/3".to_owned()).metrics().rejected, 2);
}

/// A map dropped and a new one made, again and again on one thread (its allocation may be
/// reused): the new map never answers with the old one's breaker.
#[tokio::test(start_paused = true)]
async fn p1_map_dropped_and_remade_never_answers_with_the_old_breaker() {
    let mut old = Vec::new();
    for round in 0..50 {
        let l = builder()
            .consecutive_failures(Some(1))
            .build_per_authority()
            .unwrap();
        let s = l.layer(upstream());
        for _ in 0..(round % 3 + 1) {
            assert_eq!(call(&mut s.clone(), req("k:1")).await, Ok(200), "{round}");
        }
        assert_eq!(
            l.handle(&key_of("k:1")).metrics().calls,
            (round % 3 + 1) as u64
        );
        if round % 2 == 0 {
            // Leave it forced open: a new map's key must start closed.
            l.handle(&key_of("k:1")).force_open();
        }
        old.push(l.handle(&key_of("k:1")));
        drop((s, l));
    }
    for (i, h) in old.iter().enumerate() {
        assert_eq!(
            h.metrics().calls,
            (i % 3 + 1) as u64,
            "old breaker {i} touched later"
        );
    }
}

/// The thread remembers a key; the map evicts it through handles only (nothing replaces
/// the thread's slot), re-creates it through a handle and puts it in every manual state:
/// each fresh clone's call obeys the map's current breaker.
#[tokio::test(start_paused = true)]
async fn p1_stale_thread_slot_after_evictions_by_handles() {
    let layer = builder()
        .consecutive_failures(Some(1))
        .max_keys(16)
        .build_per_authority()
        .unwrap();
    let s = layer.layer(upstream());
    let k = key_of("orders:1");
    assert_eq!(call(&mut s.clone(), req("orders:1")).await, Ok(200));
    let first = layer.handle(&k);
    let mut n = 0u32;
    let mut evict = |layer: &steadfast::breaker::KeyedCircuitBreakerLayer<_, _, Key>| {
        let mut i = 0;
        while layer.keys().contains(&k) {
            assert!(i < 10_000, "never evicted");
            let _ = layer.handle(&key_of(&format!("flood{n}:1"))).state();
            n += 1;
            i += 1;
        }
    };
    for state in ["forced", "disabled", "metrics", "closed"] {
        evict(&layer);
        let h = layer.handle(&k);
        match state {
            "forced" => h.force_open(),
            "disabled" => h.disable(),
            "metrics" => h.metrics_only(),
            _ => {}
        }
        let before = h.metrics();
        let got = call(&mut s.clone(), req("ORDERS:1")).await;
        let after = h.metrics();
        match state {
            "forced" => assert_eq!(got, Err(true), "{state}"),
            _ => assert_eq!(got, Ok(200), "{state}"),
        }
        assert_eq!(
            after.calls + after.rejected,
            before.calls + before.rejected + 1,
            "{state}: the call was not counted on the map's breaker"
        );
        h.close();
    }
    assert_eq!(
        first.metrics().calls,
        1,
        "the first breaker got later calls"
    );
}

/// Equal keys of different case, through fresh clones, with other keys in between.
#[tokio::test(start_paused = true)]
async fn p1_case_variants_through_thread_slots() {
    let layer = builder()
        .consecutive_failures(Some(3))
        .build_per_authority()
        .unwrap();
    let s = layer.layer(upstream());
    let variants = ["Down.Orders:8", "DOWN.ORDERS:8", "down.orders:8"];
    for (i, v) in variants.iter().enumerate() {
        assert_eq!(call(&mut s.clone(), req(v)).await, Ok(503));
        for o in ["a:1", "b:1", "c:1", "d:1", "e:1"].iter().take(i + 2) {
            assert_eq!(call(&mut s.clone(), req(o)).await, Ok(200));
        }
    }
    let h = layer.handle(&key_of("dOwN.oRdErS:8"));
    assert_eq!(h.state(), BreakerState::Open);
    for v in variants {
        assert_eq!(call(&mut s.clone(), req(v)).await, Err(true));
    }
    assert_eq!(layer.len(), 5);
}

/// A key whose `same`, `clone` and `drop` call into another keyed breaker on this thread
/// (re-entrancy into the thread's memory while it is borrowed): no panic, and every call of
/// both maps counts on its map's breaker.
#[tokio::test(start_paused = true)]
async fn p1_p4_reentrant_key_code_calls_another_keyed_breaker() {
    let token = Arc::new(());
    let side = path_layer!(builder());
    let side_svc = side.layer(upstream());
    let outer = hkey_layer!(builder().consecutive_failures(Some(2)), token);
    let so = outer.layer(upstream());
    let side_calls = Rc::new(std::cell::Cell::new(0u64));
    {
        let side_svc = side_svc.clone();
        let side_calls = side_calls.clone();
        hooks(move |h| {
            h.on_same = true;
            h.on_clone = true;
            h.on_drop = true;
            h.action = Some(Rc::new(move || {
                let i = side_calls.get();
                side_calls.set(i + 1);
                // Different side keys in turn: the side map's entries churn the thread's
                // slots from inside the outer map's search.
                assert_eq!(
                    call_now(&side_svc, path_req(&format!("s{}", i % 6))),
                    Ok(200)
                );
            }));
        });
    }
    let mut outer_expected = std::collections::HashMap::new();
    for round in 0..6u32 {
        for id in 0..6u32 {
            assert_eq!(
                call(&mut so.clone(), path_req(&id.to_string())).await,
                Ok(200)
            );
            *outer_expected.entry(id).or_insert(0u64) += 1;
            if round % 2 == 1 {
                let mut same_instance = so.clone();
                assert_eq!(
                    call(&mut same_instance, path_req(&id.to_string())).await,
                    Ok(200)
                );
                assert_eq!(
                    call(&mut same_instance, path_req(&id.to_string())).await,
                    Ok(200)
                );
                *outer_expected.entry(id).or_insert(0) += 2;
            }
        }
    }
    // Trip through the hostile map.
    assert_eq!(call(&mut so.clone(), path_req("down1")).await, Ok(503));
    assert_eq!(call(&mut so.clone(), path_req("down1")).await, Ok(503));
    assert_eq!(call(&mut so.clone(), path_req("down1")).await, Err(true));
    let fired = HOOKS.with_borrow(|h| h.fired);
    hooks(|h| *h = Hooks::default());
    assert!(fired > 0 && side_calls.get() > 0, "the hooks never ran");
    for (id, n) in outer_expected {
        assert_eq!(
            outer.handle(&hk(id, &token)).metrics().calls,
            n,
            "outer {id}"
        );
    }
    let side_total: u64 = (0..6)
        .map(|i| side.handle(&format!("/s{i}")).metrics().calls)
        .sum();
    assert_eq!(
        side_total,
        side_calls.get(),
        "side calls counted on side breakers"
    );
    assert_eq!(outer.handle(&hk(1001, &token)).state(), BreakerState::Open);
}

/// `same` and `clone` that panic part-way (under the map's lock, inside the thread's memory):
/// the panic reaches the caller, and afterwards every call still uses the map's breaker.
#[tokio::test(start_paused = true)]
async fn p1_p4_panicking_key_code_leaves_everything_usable() {
    let token = Arc::new(());
    let layer = hkey_layer!(builder().consecutive_failures(Some(1)), token);
    let s = layer.layer(upstream());
    for id in 0..5u32 {
        assert_eq!(
            call(&mut s.clone(), path_req(&id.to_string())).await,
            Ok(200)
        );
    }
    for (which, id) in [("same", 2u32), ("same", 9), ("clone", 10), ("clone", 11)] {
        hooks(|h| {
            h.panic_same = which == "same";
            h.panic_clone = which == "clone";
        });
        let mut svc = s.clone();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            // The key's code panics inside `call`, before any future exists.
            drop(svc.call(path_req(&id.to_string())));
        }));
        hooks(|h| *h = Hooks::default());
        assert!(r.is_err(), "{which} {id}: expected the key's panic");
    }
    // Everything still works and counts on the map's breaker.
    for id in [0u32, 2, 3, 9, 10, 11, 4] {
        let h = layer.handle(&hk(id, &token));
        let before = h.metrics().calls;
        assert_eq!(
            call(&mut s.clone(), path_req(&id.to_string())).await,
            Ok(200),
            "{id}"
        );
        assert_eq!(h.metrics().calls, before + 1, "{id}");
    }
    assert_eq!(call(&mut s.clone(), path_req("down0")).await, Ok(503));
    assert_eq!(call(&mut s.clone(), path_req("down0")).await, Err(true));
}

/// Calls cancelled at every point: before the first poll, while the upstream is pending,
/// and a half-open probe dropped. Breakers are not left stuck and counts stay right.
#[tokio::test(start_paused = true)]
async fn p1_cancelled_calls() {
    let layer = builder()
        .consecutive_failures(Some(1))
        .half_open_probes(1)
        .build_per_authority()
        .unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let pending = service_fn(move |r: Request<()>| {
        let g = g.clone();
        async move {
            if r.uri().path() == "/wait" {
                g.notified().await;
            }
            let down = r.uri().host().unwrap_or("").starts_with("down");
            Ok::<_, Infallible>(
                Response::builder()
                    .status(if down { 503 } else { 200 })
                    .body(())
                    .unwrap(),
            )
        }
    });
    let s = layer.layer(pending);
    let r = |h: &str, p: &str| Request::get(format!("http://{h}{p}")).body(()).unwrap();
    // Dropped before the first poll, and after a pending poll, for keys in turn.
    for i in 0..6 {
        let host = format!("c{}:1", i % 5);
        let mut svc = s.clone();
        drop(svc.call(r(&host, "/")));
        let mut f = Box::pin(s.clone().call(r(&host, "/wait")));
        assert!(f.as_mut().now_or_never().is_none());
        drop(f);
        assert_eq!(call(&mut s.clone(), r(&host, "/")).await, Ok(200));
    }
    // Open, then half-open: the probe is cancelled while pending; the next call is a probe.
    assert_eq!(call(&mut s.clone(), r("down:1", "/")).await, Ok(503));
    assert_eq!(call(&mut s.clone(), r("down:1", "/")).await, Err(true));
    advance(Duration::from_secs(31)).await;
    let h = layer.handle(&key_of("down:1"));
    assert_eq!(h.state(), BreakerState::HalfOpen);
    let mut probe = Box::pin(s.clone().call(r("down:1", "/wait")));
    assert!(probe.as_mut().now_or_never().is_none());
    drop(probe);
    // A half-open breaker whose probe was cancelled admits another (not stuck refusing).
    let next = call(&mut s.clone(), r("down:1", "/")).await;
    assert_eq!(
        next,
        Ok(503),
        "cancelled probe left the breaker refusing: {:?}",
        h.metrics()
    );
    assert_eq!(h.state(), BreakerState::Open);
}

/// A multi-thread runtime: tasks migrate between workers; each call through a fresh clone,
/// six keys in turn, one key forced open for the whole run, no eviction: every call counts
/// on its key's breaker, and the forced key lets nothing by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p1_multi_thread_work_stealing_counts_exactly() {
    let layer = builder().build_per_authority().unwrap();
    let s = layer.layer(upstream());
    layer.handle(&key_of("forced:1")).force_open();
    let passed = Arc::new(AtomicUsize::new(0));
    let work = async {
        let mut tasks = Vec::new();
        for t in 0..16 {
            let s = s.clone();
            let passed = passed.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..60 {
                    let host = format!("w{}:1", (t + i) % 6);
                    assert_eq!(call(&mut s.clone(), req(&host)).await, Ok(200));
                    if call(&mut s.clone(), req("FORCED:1")).await != Err(true) {
                        passed.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .expect("hang guard");
    assert_eq!(
        passed.load(Ordering::SeqCst),
        0,
        "a forced-open key let a call by"
    );
    let total: u64 = (0..6)
        .map(|i| layer.handle(&key_of(&format!("w{i}:1"))).metrics().calls)
        .sum();
    assert_eq!(total, 16 * 60);
    assert_eq!(
        layer.handle(&key_of("forced:1")).metrics().rejected,
        16 * 60
    );
}

// ---------------------------------------------------------------------------------------
// Promise 2: nothing is kept alive by a thread's memory.
// ---------------------------------------------------------------------------------------

/// The thread called the key last (through a fresh clone); the map evicts it by handles on
/// this very thread (no call replaces the thread's slot): the breaker's stream ends.
#[tokio::test(start_paused = true)]
async fn p2_evicted_on_the_same_thread_by_handles_the_stream_ends() {
    let layer = builder().max_keys(16).build_per_authority().unwrap();
    let s = layer.layer(upstream());
    let k = key_of("gone:1");
    let mut tr = layer.handle(&k).subscribe();
    for _ in 0..3 {
        assert_eq!(call(&mut s.clone(), req("gone:1")).await, Ok(200));
    }
    let mut i = 0;
    while layer.keys().contains(&k) {
        assert!(i < 10_000);
        let _ = layer.handle(&key_of(&format!("f{i}:1"))).state();
        i += 1;
    }
    let end = tokio::time::timeout(Duration::from_secs(60), tr.recv()).await;
    assert!(matches!(end, Ok(None)), "the stream did not end: {end:?}");
}

/// A service instance that called the key last and then sits idle (a balancer's endpoint
/// stack, a client held in a struct): the map evicts the key; its breaker's stream ends. (The
/// instance's memo held the evicted entry strongly until that instance's next call.)
#[tokio::test(start_paused = true)]
async fn p2_evicted_breaker_stream_ends_though_an_idle_instance_called_it_last() {
    let layer = builder().max_keys(16).build_per_authority().unwrap();
    let mut idle_instance = layer.layer(upstream());
    let k = key_of("gone:1");
    let mut tr = layer.handle(&k).subscribe();
    assert_eq!(call(&mut idle_instance, req("gone:1")).await, Ok(200));
    let mut i = 0;
    while layer.keys().contains(&k) {
        assert!(i < 10_000);
        let _ = layer.handle(&key_of(&format!("f{i}:1"))).state();
        i += 1;
    }
    let end = tokio::time::timeout(Duration::from_secs(60), tr.recv()).await;
    assert!(
        matches!(end, Ok(None)),
        "an evicted breaker is kept alive by an idle instance's memo: {end:?}"
    );
    drop(idle_instance);
}

/// `subscribe_all` ends when the layer and its services are gone, though a handle still
/// holds one of its breakers, the thread called several keys of it last, and other maps go
/// on being called on this thread afterwards. A handle of the gone map still works.
#[tokio::test(start_paused = true)]
async fn p2_subscribe_all_ends_though_a_handle_lives() {
    let layer = builder()
        .consecutive_failures(Some(1))
        .build_per_authority()
        .unwrap();
    let mut all = layer.subscribe_all();
    let s = layer.layer(upstream());
    for h in ["a:1", "b:1", "down:1", "c:1"] {
        let _ = call(&mut s.clone(), req(h)).await;
    }
    let kept = layer.handle(&key_of("down:1"));
    assert_eq!(kept.state(), BreakerState::Open);
    let mut own = kept.subscribe();
    let other = builder().build_per_authority().unwrap();
    let so = other.layer(upstream());
    drop((s, layer));
    assert_eq!(call(&mut so.clone(), req("a:1")).await, Ok(200));
    // Drain what was sent before the layer went.
    let mut n = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), all.recv()).await {
            Ok(Some(_)) => {
                n += 1;
                assert!(n < 100);
            }
            Ok(None) => break,
            Err(_) => panic!("subscribe_all did not end though the layer is gone"),
        }
    }
    kept.close();
    kept.force_open();
    assert_eq!(own.try_recv().map(|t| t.to), Some(BreakerState::Closed));
}

/// Key floods from several OS threads through fresh clones and two maps: bounded.
#[test]
fn p2_key_floods_stay_bounded() {
    let a = builder().max_keys(64).build_per_authority().unwrap();
    let b = path_layer!(builder().max_keys(32));
    std::thread::scope(|sc| {
        for t in 0..3 {
            let (a, b) = (&a, &b);
            sc.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let (sa, sb) = (a.layer(upstream()), b.layer(upstream()));
                    for i in 0..3000 {
                        assert_eq!(
                            call(&mut sa.clone(), req(&format!("t{t}x{i}:1"))).await,
                            Ok(200)
                        );
                        assert_eq!(
                            call(&mut sb.clone(), path_req(&format!("{t}-{i}"))).await,
                            Ok(200)
                        );
                        if i % 5 == 0 {
                            assert_eq!(call(&mut sa.clone(), req("hot:1")).await, Ok(200));
                        }
                    }
                });
            });
        }
    });
    assert!(a.len() <= 64, "{}", a.len());
    assert!(b.len() <= 32, "{}", b.len());
    assert_eq!(a.keys().len(), a.len());
}

/// The thread's slots keep boxed copies of keys (not breakers): live copies of a key type
/// after its layer and services are gone. Bounded by the four slots, released when the
/// thread calls other keys or exits.
#[test]
fn p2_thread_slots_keep_key_copies_after_the_layer_is_gone() {
    let token = Arc::new(());
    let t2 = token.clone();
    let (after_drop, after_others, after_exit) = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let r = rt.block_on(async {
            let layer = hkey_layer!(builder(), t2);
            let s = layer.layer(upstream());
            for id in 0..6 {
                assert_eq!(
                    call(&mut s.clone(), path_req(&id.to_string())).await,
                    Ok(200)
                );
            }
            drop((s, layer));
            let after_drop = Arc::strong_count(&t2) - 2; // t2 and the test's own
            let other = builder().build_per_authority().unwrap();
            let so = other.layer(upstream());
            for h in ["a:1", "b:1", "c:1", "d:1"] {
                assert_eq!(call(&mut so.clone(), req(h)).await, Ok(200));
            }
            (after_drop, Arc::strong_count(&t2) - 2)
        });
        drop(t2);
        r
    })
    .join()
    .map(|(a, b)| (a, b, Arc::strong_count(&token) - 1))
    .unwrap();
    eprintln!(
        "live key copies: after the layer went {after_drop}, after 4 other keys \
         {after_others}, after the thread's exit {after_exit}"
    );
    assert!(
        after_drop <= 4,
        "more than the thread's slots: {after_drop}"
    );
    assert_eq!(after_others, 0);
    assert_eq!(after_exit, 0);
}

// ---------------------------------------------------------------------------------------
// Promise 3: idle eviction sees keys used only through the thread's memory.
// ---------------------------------------------------------------------------------------

/// Two open breakers (kept while used within the idle time, whatever the flood). The hot
/// one is called only through the thread's slots (a fresh clone per call, no eviction in
/// between, so each call is a slot hit) every 45 s for 15 minutes; the cold one never. Then
/// a flood of new keys: the hot one is kept (it was used within the idle time), the cold one
/// goes (open, but idle). Two breakers per shard, so that both are kept wherever their hashes
/// land.
#[tokio::test(start_paused = true)]
async fn p3_hot_key_through_thread_slots_survives_cold_key_goes() {
    let layer = builder()
        .consecutive_failures(Some(1))
        .open_time(Duration::from_secs(3600))
        .max_open_time(Duration::from_secs(3600))
        .max_keys(32)
        .idle_eviction(Duration::from_secs(60))
        .build_per_authority()
        .unwrap();
    let s = layer.layer(upstream());
    let hot = key_of("downhot:1");
    let cold = key_of("downcold:1");
    assert_eq!(call(&mut s.clone(), req("downcold:1")).await, Ok(503));
    assert_eq!(call(&mut s.clone(), req("downhot:1")).await, Ok(503));
    let hot_h = layer.handle(&hot);
    assert_eq!(hot_h.state(), BreakerState::Open);
    assert_eq!(layer.handle(&cold).state(), BreakerState::Open);
    assert_eq!(
        layer.len(),
        2,
        "no eviction so far (else the slot test is moot)"
    );
    for step in 0..20 {
        advance(Duration::from_secs(45)).await;
        assert_eq!(
            call(&mut s.clone(), req("downhot:1")).await,
            Err(true),
            "{step}"
        );
        assert_eq!(
            layer.len(),
            2,
            "no eviction so far (else the slot test is moot)"
        );
    }
    assert_eq!(
        hot_h.metrics().rejected,
        20,
        "every hot call on the map's breaker"
    );
    let mut i = 0;
    while layer.keys().contains(&cold) {
        assert!(i < 10_000, "an idle open breaker was never evicted");
        let _ = layer.handle(&key_of(&format!("f{i}:1"))).state();
        assert!(
            layer.keys().contains(&hot),
            "flood key {i}: the hot key was evicted"
        );
        i += 1;
    }
    for j in i..i + 2_000 {
        let _ = layer.handle(&key_of(&format!("f{j}:1"))).state();
    }
    assert!(layer.keys().contains(&hot), "the hot key was evicted");
}

// ---------------------------------------------------------------------------------------
// Promise 4: no panic in thread-local destruction or thread exit.
// ---------------------------------------------------------------------------------------

struct CallsOnDrop(Box<dyn Fn()>);
impl Drop for CallsOnDrop {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Calls from a thread-local destructor, both before and after the thread's memory is
/// destroyed, and from the drop of keys held in the thread's memory (hostile keys whose
/// `drop` calls another keyed breaker while the thread's memory is being destroyed).
#[test]
fn p4_calls_from_thread_local_destructors_and_thread_exit() {
    thread_local! {
        static EARLY: RefCell<Option<CallsOnDrop>> = const { RefCell::new(None) };
        static LATE: RefCell<Option<CallsOnDrop>> = const { RefCell::new(None) };
    }
    let token = Arc::new(());
    let a = builder()
        .consecutive_failures(Some(1))
        .build_per_authority()
        .unwrap();
    let p = path_layer!(builder());
    let hl = hkey_layer!(builder(), token);
    for order in 0..2 {
        let (a2, p2, hl2, tok) = (a.clone(), p.clone(), hl.clone(), token.clone());
        let joined = std::thread::spawn(move || {
            let _ = tokio::runtime::Handle::try_current(); // tokio's context registered first
            let (sa, sp, sh) = (
                a2.layer(upstream()),
                p2.layer(upstream()),
                hl2.layer(upstream()),
            );
            let make = |tag: &'static str| {
                let (sa, sp, sh, tok) = (sa.clone(), sp.clone(), sh.clone(), tok.clone());
                CallsOnDrop(Box::new(move || {
                    for i in 0..6u32 {
                        assert_eq!(call_now(&sa, req(&format!("{tag}{i}:1"))), Ok(200));
                        assert_eq!(call_now(&sp, path_req(&format!("{tag}{i}"))), Ok(200));
                        assert_eq!(call_now(&sh, path_req(&i.to_string())), Ok(200));
                    }
                    let _ = call_now(&sa, req("down:1"));
                    let _ = tok.clone();
                }))
            };
            // EARLY's destructor is registered before the thread's memory (runs after it is
            // destroyed) in order 0; after it in order 1.
            if order == 0 {
                EARLY.with_borrow_mut(|e| *e = Some(make("early")));
            }
            for i in 0..6u32 {
                assert_eq!(call_now(&sh, path_req(&i.to_string())), Ok(200));
                assert_eq!(call_now(&sa, req(&format!("x{i}:1"))), Ok(200));
            }
            LATE.with_borrow_mut(|e| *e = Some(make("late")));
            // Keys in the thread's memory whose drop calls the authority map.
            let sa2 = sa.clone();
            hooks(move |h| {
                h.on_drop = true;
                h.action = Some(Rc::new(move || {
                    let _ = call_now(&sa2, req("fromdrop:1"));
                }));
            });
            assert_eq!(call_now(&sh, path_req("7")), Ok(200));
            assert_eq!(call_now(&sh, path_req("8")), Ok(200));
        })
        .join();
        assert!(joined.is_ok(), "order {order}: the thread panicked");
    }
    // Everything the destructors called was counted on the maps' breakers.
    assert_eq!(a.handle(&key_of("late0:1")).metrics().calls, 2);
    assert_eq!(a.handle(&key_of("early0:1")).metrics().calls, 1);
    assert_eq!(p.handle(&"/late5".to_owned()).metrics().calls, 2);
    assert_eq!(hl.handle(&hk(7, &token)).metrics().calls, 2);
    assert!(
        a.keys().contains(&key_of("fromdrop:1"))
            && a.handle(&key_of("fromdrop:1")).metrics().calls > 0,
        "the keys' drop hooks never called"
    );
}

// ---------------------------------------------------------------------------------------
// Promise 5: through the real transport.
// ---------------------------------------------------------------------------------------

/// A hyper server (which clones the service per request) whose service is a per-key breaker
/// (keyed by the first path segment) over a handler that calls upstreams through the client
/// preset (another per-key map on the same worker threads): one upstream answers 200, one
/// 503, one refuses connections. Breakers per upstream isolate the failures, in both maps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_server_breaker_in_front_client_preset_behind() {
    use axum::routing::get;
    let hits = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    // An upstream answering `status`, its calls counted in `hits[i]`.
    let upstream = |status: http::StatusCode, i: usize| {
        let hits = hits.clone();
        support::serve_axum(axum::Router::new().route(
            "/",
            get(move || {
                hits[i].fetch_add(1, Ordering::SeqCst);
                async move { status }
            }),
        ))
    };
    let good = upstream(http::StatusCode::OK, 0).await;
    let bad = upstream(http::StatusCode::SERVICE_UNAVAILABLE, 1).await;
    let refused = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let stack = steadfast::client::http()
        .retry(|r| r.max_attempts(1))
        .breaker(|b| {
            b.consecutive_failures(Some(3))
                .open_time(Duration::from_secs(3600))
                .max_open_time(Duration::from_secs(3600))
        })
        .build()
        .unwrap();
    let client = stack.hyper_client::<Full<Bytes>>();
    let upstreams = Arc::new([good, bad, refused]);
    let ups = upstreams.clone();
    let handler = service_fn(move |r: Request<hyper::body::Incoming>| {
        let mut c = client.clone();
        let ups = ups.clone();
        async move {
            let i = match r.uri().path().trim_start_matches('/') {
                "good" => 0,
                "bad" => 1,
                _ => 2,
            };
            let out = Request::get(format!("http://{}/", ups[i]))
                .body(Full::default())
                .unwrap();
            let status = match c.ready().await {
                Ok(c) => match c.call(out).await {
                    Ok(res) => res.status(),
                    Err(_) => http::StatusCode::BAD_GATEWAY,
                },
                Err(_) => http::StatusCode::BAD_GATEWAY,
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let front = builder()
        .consecutive_failures(Some(5))
        .open_time(Duration::from_secs(3600))
        .max_open_time(Duration::from_secs(3600))
        .build_per_key(|u: &Uri, _: &HeaderMap| u.path().to_owned())
        .unwrap();
    let front_svc = front.layer(handler);
    // Errors (a refusal) become a 599 the test can see.
    let outer = service_fn(move |r: Request<hyper::body::Incoming>| {
        let mut s = front_svc.clone();
        async move {
            Ok::<_, Infallible>(match s.call(r).await {
                Ok(res) => Response::builder()
                    .status(res.status())
                    .body(Full::<Bytes>::default())
                    .unwrap(),
                Err(_) => Response::builder()
                    .status(599)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            })
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(outer.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                .await;
            });
        }
    });
    let user = support::http_client();
    let work = async {
        let mut seen = std::collections::HashMap::<(&str, u16), usize>::new();
        for i in 0..40 {
            for p in ["good", "bad", "gone"] {
                let r = Request::get(format!("http://{front_addr}/{p}"))
                    .body(Full::default())
                    .unwrap();
                let st = user.request(r).await.unwrap().status().as_u16();
                *seen.entry((p, st)).or_default() += 1;
                if p == "good" {
                    assert_eq!(
                        st, 200,
                        "round {i}: the good upstream was refused or failed"
                    );
                }
            }
        }
        seen
    };
    let seen = tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .expect("hang guard");
    let key = |a: std::net::SocketAddr| Some(Authority::try_from(a.to_string().as_str()).unwrap());
    let b = stack.breakers();
    assert_eq!(
        b.handle(&key(good)).state(),
        BreakerState::Closed,
        "{seen:?}"
    );
    assert_eq!(b.handle(&key(good)).metrics().failures, 0);
    assert_eq!(b.handle(&key(good)).metrics().calls, 40);
    assert_eq!(b.handle(&key(bad)).state(), BreakerState::Open, "{seen:?}");
    assert_eq!(
        b.handle(&key(refused)).state(),
        BreakerState::Open,
        "{seen:?}"
    );
    assert_eq!(
        hits[1].load(Ordering::SeqCst),
        3,
        "calls reached the bad upstream after its trip"
    );
    assert_eq!(hits[0].load(Ordering::SeqCst), 40);
    assert_eq!(
        front.handle(&"/good".to_owned()).state(),
        BreakerState::Closed
    );
    assert_eq!(front.handle(&"/good".to_owned()).metrics().calls, 40);
    assert_eq!(front.handle(&"/bad".to_owned()).state(), BreakerState::Open);
    assert_eq!(
        front.handle(&"/gone".to_owned()).state(),
        BreakerState::Open
    );
    assert_eq!(
        seen.get(&("bad", 599)).copied().unwrap_or(0),
        35,
        "{seen:?}"
    );
}

/// A key's `drop` that calls into its own map. The map evicts the key's entry under the
/// shard's write lock; a drop of the map's copy of the key under that lock, calling the map
/// for a key of the same shard, would wait on the lock its own thread holds (it did, before
/// the evicted entry was dropped after the lock). Run on a thread of its own; a bounded
/// wait reports a hang (the blocked thread is left behind).
#[test]
fn p4_key_drop_calling_the_same_map_during_eviction() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let token = Arc::new(());
        let layer = hkey_layer!(builder().max_keys(16), token);
        let _ = layer.handle(&hk(7, &token)).state(); // the map alone holds the entry
        let (l2, t2) = (layer.clone(), token.clone());
        hooks(move |h| {
            h.drop_only = Some(7);
            h.action = Some(Rc::new(move || {
                // The evicted key's own shard.
                let _ = l2.handle(&hk(7, &t2)).state();
            }));
        });
        // The hook fires for drops of key 7 only, and only while a handle is being made (so
        // the drop it sees is the map's copy, evicted by that handle's new key).
        hooks(|h| h.on_drop = false);
        let fired = || HOOKS.with_borrow(|h| h.fired);
        let mut i = 100;
        rt.block_on(async {
            while fired() == 0 && i < 10_100 {
                let k = hk(i, &token);
                // Arm for the map's drops only: a handle's own temporaries are dropped with
                // the hook off.
                hooks(|h| h.on_drop = true);
                let h = layer.handle(&k);
                hooks(|h| h.on_drop = false);
                drop((h, k));
                i += 1;
            }
        });
        let _ = tx.send(fired());
        drop(rt);
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    assert!(
        got.is_ok(),
        "a key's drop calling the same map deadlocked under the shard's lock"
    );
    assert!(got.is_ok_and(|fired| fired > 0), "key 7 was never evicted");
}
