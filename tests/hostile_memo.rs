//! Hostile tests of the per-key breaker's memo: a `KeyedCircuitBreaker` remembers the last key it
//! looked up and that key's breaker, not used once any entry leaves the map (and each thread the
//! last keys it looked up, `tests/hostile_tls_memo.rs`). Every test here checks, through the public
//! API only, that a call uses the breaker the map holds for its key at that time
//! (`layer.handle(&key)`), that failures still trip, that a breaker the map does not keep is never
//! reused, that `subscribe_all`, `keys` and `len` stay right, and that idle eviction still sees
//! keys reached only through the memo.
//!
//! Paused tokio time where time matters; real loopback sockets (ephemeral ports) for the hyper and
//! client-preset tests, on a multi-thread runtime, with no timing assertions (one generous timeout
//! is a hang guard only). Every loop is bounded.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use steadfast::breaker::error::BreakerOpen;
use steadfast::breaker::{
    BreakerState, ByAuthority, CircuitBreakerBuilder, CircuitBreakerLayer, ExtractKey,
};
use steadfast::common::BoxError;
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt, service_fn};

type Key = Option<Authority>;

fn builder() -> CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .open_time(Duration::from_secs(30))
        .jitter_percent(0)
        .seed(1)
}

fn auth(s: &str) -> Key {
    Some(s.parse().unwrap())
}

/// The request for `host` (`""`: a request without an authority).
fn req(host: &str) -> Request<()> {
    let uri = if host.is_empty() {
        "/".to_owned()
    } else {
        format!("http://{host}/")
    };
    Request::get(uri).body(()).unwrap()
}

/// The key the per-authority layer finds for `host`.
fn key_of(host: &str) -> Key {
    let r = req(host);
    ByAuthority.extract(r.uri(), r.headers())
}

/// An upstream answering 503 for hosts starting with "down" (any case), else 200; counts
/// the calls it gets.
fn upstream(
    hits: Arc<AtomicUsize>,
) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send
{
    service_fn(move |r: Request<()>| {
        hits.fetch_add(1, Ordering::SeqCst);
        let down = r
            .uri()
            .host()
            .is_some_and(|h| h.to_ascii_lowercase().starts_with("down"));
        let status = if down { 503 } else { 200 };
        async move { Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap()) }
    })
}

/// One call to `host`: `Ok(status)`, or `Err(true)` when the breaker refused it.
async fn call<S, B>(svc: &mut S, host: &str) -> Result<u16, bool>
where
    S: Service<Request<()>, Response = Response<B>, Error = BoxError>,
{
    match svc.ready().await.unwrap().call(req(host)).await {
        Ok(res) => Ok(res.status().as_u16()),
        Err(e) => Err(e.downcast_ref::<BreakerOpen>().is_some()),
    }
}

type Layer16 = steadfast::breaker::KeyedCircuitBreakerLayer<
    steadfast::common::DefaultClassifier,
    ByAuthority,
    Key,
>;

/// A layer with one breaker per shard (any new key landing in a key's shard pushes it out)
/// that opens on the first failure, and a count of the upstream's calls.
fn one_per_shard() -> (Layer16, Arc<AtomicUsize>) {
    let layer = builder()
        .consecutive_failures(Some(1))
        .max_keys(16)
        .build_per_authority()
        .unwrap();
    (layer, Arc::new(AtomicUsize::new(0)))
}

/// Calls new keys through `flood` until the map no longer holds `key`.
async fn evict<S, B>(layer: &Layer16, flood: &mut S, key: &Key, n: &mut u64)
where
    S: Service<Request<()>, Response = Response<B>, Error = BoxError>,
{
    let mut i = 0;
    while layer.keys().contains(key) {
        assert!(i < 10_000, "never evicted");
        assert_eq!(call(flood, &format!("flood{n}")).await, Ok(200));
        i += 1;
        *n += 1;
    }
}

fn decisions(m: &steadfast::breaker::Metrics) -> u64 {
    m.calls + m.rejected
}

/// Checks the map: `len` and `keys` agree, no key twice, never past `cap`.
fn check_map<C, K>(layer: &steadfast::breaker::KeyedCircuitBreakerLayer<C, K, Key>, cap: usize) {
    let keys = layer.keys();
    assert_eq!(keys.len(), layer.len());
    assert!(keys.len() <= cap, "{} keys > {cap}", keys.len());
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            assert_ne!(a, b, "a key held twice");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Promise 1: a call uses the map's breaker for its key.
// ---------------------------------------------------------------------------------------

/// Eviction by a full shard, re-creation through a handle, then every manual state; clones
/// made before and after each eviction.
#[tokio::test(start_paused = true)]
async fn memo_follows_the_map_through_eviction_recreation_and_manual_states() {
    let (layer, hits) = one_per_shard();
    let mut svc = layer.layer(upstream(hits.clone()));
    let mut flood = layer.layer(upstream(hits.clone()));
    let orders = auth("orders");
    assert_eq!(call(&mut svc, "orders").await, Ok(200));
    assert_eq!(call(&mut svc, "orders").await, Ok(200));
    let first = layer.handle(&orders);
    assert_eq!(first.metrics().calls, 2);
    let mut before = svc.clone();

    let mut n = 0;
    evict(&layer, &mut flood, &orders, &mut n).await;
    let after = svc.clone();

    // Re-created by a handle and forced open: every instance refuses.
    let h = layer.handle(&orders);
    h.force_open();
    assert!(layer.keys().contains(&orders));
    for s in [&mut svc, &mut before, &mut after.clone()] {
        assert_eq!(call(s, "orders").await, Err(true));
    }
    assert_eq!(h.metrics().rejected, 3);
    assert_eq!(
        first.metrics().calls + first.metrics().rejected,
        2,
        "old breaker untouched"
    );

    // Closed: calls reach the upstream and count on the map's breaker.
    h.close();
    assert_eq!(call(&mut svc, "orders").await, Ok(200));
    assert_eq!(call(&mut before, "orders").await, Ok(200));
    assert_eq!(h.metrics().calls, 2);

    // Disabled: kept whatever the flood; calls still counted there.
    h.disable();
    for i in 0..2_000 {
        assert_eq!(call(&mut flood, &format!("more{i}")).await, Ok(200));
    }
    assert!(layer.keys().contains(&orders), "a disabled breaker is kept");
    assert_eq!(call(&mut svc, "orders").await, Ok(200));
    assert_eq!(h.metrics().calls, 3);

    // Metrics only, then closed and evicted again: the next call makes a new breaker.
    h.metrics_only();
    assert_eq!(call(&mut before, "orders").await, Ok(200));
    assert_eq!(h.metrics().calls, 4);
    h.close();
    evict(&layer, &mut flood, &orders, &mut n).await;
    assert_eq!(call(&mut svc, "orders").await, Ok(200));
    let h2 = layer.handle(&orders);
    assert_eq!(h2.metrics().calls, 1, "the call made a fresh breaker");
    assert_eq!(h.metrics().calls, 4, "not the evicted one");

    // A failing key trips its (new) breaker, reached through the memo on the next call.
    let down = auth("down");
    assert_eq!(call(&mut svc, "down").await, Ok(503));
    assert_eq!(call(&mut svc, "down").await, Err(true));
    assert_eq!(layer.handle(&down).state(), BreakerState::Open);
    check_map(&layer, 16);
}

/// Idle eviction (paused time): the breaker a service remembers goes idle, is evicted, and
/// a forced-open one made through a handle takes its place.
#[tokio::test(start_paused = true)]
async fn memo_follows_the_map_after_idle_eviction() {
    let layer = builder()
        .max_keys(32)
        .idle_eviction(Duration::from_secs(60))
        .build_per_authority()
        .unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let mut svc = layer.layer(upstream(hits.clone()));
    let mut other = layer.layer(upstream(hits.clone()));
    let k = auth("idle:81");
    assert_eq!(call(&mut svc, "idle:81").await, Ok(200));
    assert_eq!(call(&mut svc, "idle:81").await, Ok(200));
    advance(Duration::from_secs(61)).await;
    let mut i = 0;
    while layer.keys().contains(&k) {
        assert!(i < 10_000);
        assert_eq!(call(&mut other, &format!("n{i}")).await, Ok(200));
        i += 1;
    }
    layer.handle(&k).force_open();
    let clone = svc.clone();
    assert_eq!(call(&mut svc, "IDLE:81").await, Err(true));
    assert_eq!(call(&mut clone.clone(), "idle:81").await, Err(true));
    assert_eq!(
        call(&mut svc, "idle").await,
        Ok(200),
        "no port: another key"
    );
}

/// Keys that are one key (ASCII case, userinfo) share one breaker through the memo; keys
/// that are not (a port, no authority) never get it.
#[tokio::test(start_paused = true)]
async fn case_userinfo_port_and_no_authority_through_the_memo() {
    let layer = builder()
        .consecutive_failures(Some(2))
        .build_per_authority()
        .unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let mut svc = layer.layer(upstream(hits.clone()));
    for host in ["orders", "ORDERS", "u:pw@orders", "Orders", "x@ORDERS"] {
        assert_eq!(call(&mut svc, host).await, Ok(200));
    }
    let h = layer.handle(&auth("orders"));
    assert_eq!(h.metrics().calls, 5);
    h.force_open();
    for host in ["orders", "u:pw@OrDeRs", "ORDERS"] {
        assert_eq!(call(&mut svc, host).await, Err(true), "{host}");
    }
    for host in [
        "orders:80",
        "",
        "orders:8080",
        "",
        "orders.",
        "u:pw@orders:80",
    ] {
        assert_eq!(call(&mut svc, host).await, Ok(200), "{host}");
    }
    assert_eq!(call(&mut svc, "ORDERS").await, Err(true));
    // No authority: one shared key, tripped through the memo, never the "orders" breaker.
    let none = layer.handle(&None);
    assert_eq!(none.metrics().calls, 2);
    none.force_open();
    assert_eq!(call(&mut svc, "").await, Err(true));
    assert_eq!(call(&mut svc, "orders:80").await, Ok(200));
    h.close();
    assert_eq!(call(&mut svc, "orders").await, Ok(200));
    assert_eq!(call(&mut svc, "").await, Err(true));
    let mut keys: Vec<String> = layer.keys().iter().map(|k| format!("{k:?}")).collect();
    keys.sort();
    assert_eq!(
        layer.len(),
        5,
        "orders, orders:80, orders:8080, orders., none: {keys:?}"
    );
}

/// A model-based run: random calls, floods, time steps, handle operations, clones and new
/// services, with a small map (one breaker per shard) and failing keys that trip and fill
/// shards with breakers the map must keep. After each call:
/// - a key the map held before the call: the call's decision is counted on that breaker
///   (the one `handle` returns), and a forced-open one refuses it;
/// - a key the map did not hold and does not keep: the call reached the upstream (a fresh
///   breaker, never a remembered one);
/// - a key the map did not hold and now keeps: a breaker with exactly this call.
#[tokio::test(start_paused = true)]
async fn model_every_call_uses_the_maps_breaker() {
    const HOSTS: [&str; 13] = [
        "a",
        "A",
        "u:p@a",
        "a:8080",
        "A:8080",
        "b",
        "down1",
        "DOWN1",
        "x:y@down1",
        "down2",
        "c",
        "",
        "down3:9",
    ];
    for seed in 1..=24u64 {
        let max_keys = if seed % 2 == 0 { 16 } else { 32 };
        let layer = builder()
            .consecutive_failures(Some(1))
            .max_keys(max_keys)
            .idle_eviction(Duration::from_secs(60))
            .build_per_authority()
            .unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut svcs = vec![layer.layer(upstream(hits.clone()))];
        let mut flood = layer.layer(upstream(hits.clone()));
        let mut fresh = 0u64;
        for step in 0..500 {
            match next(20) {
                0..=11 => {
                    let s = next(svcs.len() as u64) as usize;
                    let host = HOSTS[next(HOSTS.len() as u64) as usize];
                    let key = key_of(host);
                    let held = layer.keys().contains(&key);
                    let before = held.then(|| {
                        let h = layer.handle(&key);
                        let m = h.metrics();
                        (h, m)
                    });
                    let hits0 = hits.load(Ordering::SeqCst);
                    let got = call(&mut svcs[s], host).await;
                    let reached = hits.load(Ordering::SeqCst) > hits0;
                    assert_eq!(reached, got.is_ok(), "seed {seed} step {step}");
                    let ctx = format!("seed {seed} step {step} host {host:?} svc {s}: {got:?}");
                    match before {
                        Some((h, m0)) => {
                            let m1 = h.metrics();
                            assert_eq!(
                                decisions(&m1),
                                decisions(&m0) + 1,
                                "{ctx}: the call did not use the map's breaker ({:?} -> {:?})",
                                m0,
                                m1
                            );
                            if m0.state == BreakerState::ForcedOpen {
                                assert_eq!(got, Err(true), "{ctx}");
                            }
                            if matches!(
                                m0.state,
                                BreakerState::Disabled | BreakerState::MetricsOnly
                            ) {
                                assert!(got.is_ok(), "{ctx}");
                            }
                            assert!(layer.keys().contains(&key), "{ctx}: a held key left");
                        }
                        None => {
                            assert!(got.is_ok(), "{ctx}: a fresh breaker refused");
                            if layer.keys().contains(&key) {
                                let m = layer.handle(&key).metrics();
                                assert_eq!(decisions(&m), 1, "{ctx}: {m:?}");
                            }
                        }
                    }
                }
                12..=13 => {
                    for _ in 0..next(40) {
                        fresh += 1;
                        assert_eq!(call(&mut flood, &format!("f{fresh}")).await, Ok(200));
                    }
                }
                14 => advance(Duration::from_secs(next(90))).await,
                15..=16 => {
                    let h = layer.handle(&key_of(HOSTS[next(HOSTS.len() as u64) as usize]));
                    match next(6) {
                        0 => h.force_open(),
                        1 => h.disable(),
                        2 => h.metrics_only(),
                        3 => h.reset(),
                        _ => h.close(),
                    }
                }
                17 => {
                    let s = next(svcs.len() as u64) as usize;
                    let c = svcs[s].clone();
                    if svcs.len() < 8 {
                        svcs.push(c);
                    } else {
                        svcs[next(8) as usize] = c;
                    }
                }
                18 => {
                    let c = layer.layer(upstream(hits.clone()));
                    if svcs.len() < 8 {
                        svcs.push(c);
                    } else {
                        svcs[next(8) as usize] = c;
                    }
                }
                _ => {
                    if svcs.len() > 1 {
                        svcs.swap_remove(next(svcs.len() as u64) as usize);
                    }
                }
            }
            check_map(&layer, max_keys);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Promise 2: failures still trip, through one instance, clones and separate services.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn consecutive_failures_trip_across_clones_and_separate_services() {
    let layer = builder()
        .consecutive_failures(Some(3))
        .build_per_authority()
        .unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let mut a = layer.layer(upstream(hits.clone()));
    assert_eq!(call(&mut a, "up").await, Ok(200));
    let mut b = a.clone();
    let mut c = layer.layer(upstream(hits.clone()));
    // Each instance remembers "down" after its first call; interleave other keys so memos
    // switch back and forth.
    assert_eq!(call(&mut a, "down").await, Ok(503));
    assert_eq!(call(&mut b, "up").await, Ok(200));
    assert_eq!(call(&mut b, "down").await, Ok(503));
    assert_eq!(
        call(&mut a, "down").await,
        Ok(503),
        "a success in between resets nothing"
    );
    assert_eq!(layer.handle(&auth("down")).state(), BreakerState::Open);
    let mut a2 = a.clone();
    for s in [&mut a, &mut b, &mut c, &mut a2] {
        assert_eq!(call(s, "down").await, Err(true));
        assert_eq!(call(s, "up").await, Ok(200));
        assert_eq!(call(s, "down").await, Err(true));
    }
    assert_eq!(layer.handle(&auth("up")).state(), BreakerState::Closed);

    // A single instance whose memo is hit on every call trips too.
    let mut d = layer.layer(upstream(hits.clone()));
    for _ in 0..3 {
        assert_eq!(call(&mut d, "down-solo").await, Ok(503));
    }
    assert_eq!(call(&mut d, "down-solo").await, Err(true));
}

#[tokio::test(start_paused = true)]
async fn a_count_window_trips_through_memo_hits() {
    let layer = builder()
        .consecutive_failures(None)
        .count_window(10)
        .failure_rate(50)
        .min_calls(6)
        .build_per_authority()
        .unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let mut svcs: Vec<_> = (0..3)
        .map(|_| layer.layer(upstream(hits.clone())))
        .collect();
    svcs.push(svcs[0].clone());
    // Six failures of "down", each from a service that also talks to "ok" in between.
    for i in 0..6 {
        let s = &mut svcs[i % 4];
        assert_eq!(call(s, "down").await, Ok(503), "call {i}");
        assert_eq!(call(s, "ok").await, Ok(200));
        if layer.handle(&auth("down")).state() == BreakerState::Open {
            break;
        }
    }
    assert_eq!(layer.handle(&auth("down")).state(), BreakerState::Open);
    for s in &mut svcs {
        assert_eq!(call(s, "down").await, Err(true));
    }
}

// ---------------------------------------------------------------------------------------
// Promise 3: a breaker the map does not keep is never reused.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn unkept_breakers_are_not_reused_by_memo_or_clones() {
    let (layer, hits) = one_per_shard();
    let mut svc = layer.layer(upstream(hits.clone()));
    // A remembered kept key first, then the shards fill with forced-open breakers.
    assert_eq!(call(&mut svc, "kept").await, Ok(200));
    let mut i = 0;
    while layer.len() < 16 || layer.keys().contains(&auth("kept")) {
        assert!(i < 100_000, "shards never filled");
        layer.handle(&auth(&format!("forced{i}"))).force_open();
        i += 1;
    }
    for round in 0..5 {
        for host in ["down-new", "DOWN-NEW", "u:p@down-new"] {
            let mut c = svc.clone();
            assert_eq!(call(&mut svc, host).await, Ok(503), "round {round} {host}");
            assert_eq!(
                call(&mut c, host).await,
                Ok(503),
                "round {round} clone {host}"
            );
        }
        // The remembered key was evicted: its call is a fresh, unkept breaker too.
        assert_eq!(call(&mut svc, "kept").await, Ok(200));
    }
    assert!(!layer.keys().contains(&auth("down-new")));
    // A handle of an unkept key is a breaker of its own: forcing it open does not reach calls.
    layer.handle(&auth("down-new")).force_open();
    assert_eq!(call(&mut svc, "down-new").await, Ok(503));
    check_map(&layer, 16);
}

// ---------------------------------------------------------------------------------------
// Promise 4: subscribe_all hears keys reached through the memo.
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn subscribe_all_hears_transitions_reached_through_the_memo() {
    let layer = builder()
        .consecutive_failures(Some(2))
        .max_keys(64) // 4 per shard: down-b is kept even if it shares down-a's shard
        .build_per_authority()
        .unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let mut svc = layer.layer(upstream(hits.clone()));
    // Remembered before anyone subscribes.
    assert_eq!(call(&mut svc, "down-a").await, Ok(503));
    let mut all = layer.subscribe_all();
    assert_eq!(call(&mut svc, "down-a").await, Ok(503)); // memo hit: trips
    let (k, t) = all.try_recv().expect("a transition of a remembered key");
    assert_eq!((k, t.to), (auth("down-a"), BreakerState::Open));

    // Made after the subscription, tripped through the memo.
    assert_eq!(call(&mut svc, "down-b").await, Ok(503));
    assert_eq!(call(&mut svc, "DOWN-B").await, Ok(503));
    let (k, t) = all.try_recv().expect("a transition of a new key");
    assert_eq!((k, t.to), (auth("down-b"), BreakerState::Open));

    // Evicted (idle, open) and re-made: the new breaker is heard as well.
    advance(Duration::from_secs(601)).await;
    let mut other = layer.layer(upstream(hits.clone()));
    let mut i = 0;
    while layer.keys().contains(&auth("down-b")) {
        assert!(i < 10_000);
        assert_eq!(call(&mut other, &format!("f{i}")).await, Ok(200));
        i += 1;
    }
    assert_eq!(call(&mut svc, "down-b").await, Ok(503));
    assert_eq!(call(&mut svc, "down-b").await, Ok(503));
    let mut seen = false;
    while let Some((k, t)) = all.try_recv() {
        if k == auth("down-b") && t.to == BreakerState::Open {
            seen = true;
        }
    }
    assert!(seen, "the re-made breaker's trip was heard");
    check_map(&layer, 64);
}

// ---------------------------------------------------------------------------------------
// Promise 5: idle eviction for keys reached only through the memo.
// ---------------------------------------------------------------------------------------

/// An open breaker is kept while it is used within the idle time and evictable once idle:
/// with one breaker per shard the outcome does not depend on which keys share a shard.
#[tokio::test(start_paused = true)]
async fn memo_hits_keep_a_hot_key_and_a_cold_one_becomes_evictable() {
    let layer = builder()
        .consecutive_failures(Some(1))
        .open_time(Duration::from_secs(3600))
        .max_open_time(Duration::from_secs(3600))
        .idle_eviction(Duration::from_secs(600))
        .max_keys(16)
        .build_per_authority()
        .unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let mut svc = layer.layer(upstream(hits.clone()));
    let hot = auth("down-hot");
    assert_eq!(call(&mut svc, "down-hot").await, Ok(503)); // made and remembered; trips
    // Only memo hits from here (no entry leaves the map while nothing else is called).
    for _ in 0..10 {
        advance(Duration::from_secs(300)).await;
        assert_eq!(call(&mut svc, "down-hot").await, Err(true));
    }
    // 3,000 s after it was made, used just now: a flood cannot push it out.
    let mut other = layer.layer(upstream(hits.clone()));
    for i in 0..2_000 {
        assert_eq!(call(&mut other, &format!("f{i}")).await, Ok(200));
    }
    assert!(layer.keys().contains(&hot), "a hot key was evicted as idle");
    assert_eq!(layer.handle(&hot).state(), BreakerState::Open);
    assert_eq!(call(&mut svc, "down-hot").await, Err(true));

    // It stops being called: idle, so evictable.
    advance(Duration::from_secs(601)).await;
    for i in 0..2_000 {
        assert_eq!(call(&mut other, &format!("g{i}")).await, Ok(200));
    }
    assert!(!layer.keys().contains(&hot), "a cold key was never evicted");
    // The remembering service does not carry on with the dropped, open breaker.
    assert_eq!(call(&mut svc, "down-hot").await, Ok(503));
    check_map(&layer, 16);
}

/// The same with closed breakers: an idle Closed breaker is evicted before a recently used
/// one, so a key whose only recent use was a memo hit must not go before idle ones. Shards
/// of 100 full of idle keys, and fewer new keys than that per shard: the hot key is never
/// the victim when memo hits refresh it (whatever the shards' layout); when they did not,
/// the clock would reach it in about half the shards, so several maps (each seeded anew)
/// catch that.
#[tokio::test(start_paused = true)]
async fn memo_hits_keep_a_closed_hot_key_ahead_of_idle_ones() {
    for round in 0..6 {
        let layer = builder()
            .max_keys(1600)
            .idle_eviction(Duration::from_secs(600))
            .build_per_authority()
            .unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let mut other = layer.layer(upstream(hits.clone()));
        let mut hot_svc = layer.layer(upstream(hits.clone()));
        for i in 0..1600 {
            assert_eq!(call(&mut other, &format!("old{i}")).await, Ok(200));
        }
        let hot = auth("hot");
        assert_eq!(call(&mut hot_svc, "hot").await, Ok(200)); // may evict: memo stale
        assert_eq!(call(&mut hot_svc, "hot").await, Ok(200)); // remembered, valid from here
        advance(Duration::from_secs(650)).await;
        assert_eq!(call(&mut hot_svc, "hot").await, Ok(200)); // memo hit only
        advance(Duration::from_secs(50)).await;
        for i in 0..1000 {
            assert_eq!(call(&mut other, &format!("new{i}")).await, Ok(200));
        }
        assert!(
            layer.keys().contains(&hot),
            "round {round}: a key used 50 s ago (through the memo) was evicted before idle ones"
        );
        assert_eq!(layer.handle(&hot).metrics().calls, 3, "round {round}");
        check_map(&layer, 1600);
    }
}

// ---------------------------------------------------------------------------------------
// Promise 6: threads, a multi-thread runtime and a real hyper server.
// ---------------------------------------------------------------------------------------

async fn by_host(headers: HeaderMap) -> StatusCode {
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if host.to_ascii_lowercase().starts_with("localhost") {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn call_full<S, B>(svc: &mut S, uri: &str) -> Result<u16, bool>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = BoxError>,
{
    let r = Request::get(uri).body(Full::default()).unwrap();
    match svc.ready().await.unwrap().call(r).await {
        Ok(res) => Ok(res.status().as_u16()),
        Err(e) => Err(e.downcast_ref::<BreakerOpen>().is_some()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_clones_and_churn_against_a_real_server() {
    let addr = support::serve_axum(Router::new().route("/", get(by_host))).await;
    let port = addr.port();
    let layer = builder()
        .consecutive_failures(Some(3))
        .open_time(Duration::from_secs(3600))
        .max_open_time(Duration::from_secs(3600))
        .max_keys(32)
        .build_per_authority()
        .unwrap();
    let stack = layer.layer(support::http_client());
    let good = format!("http://127.0.0.1:{port}/");
    let bad = format!("http://localhost:{port}/");
    let forced = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));

    // Churn from OS threads: new keys through a service of the same layer (no network) and
    // through handles, so entries keep leaving the map.
    let churn: Vec<_> = (0..2)
        .map(|t| {
            let layer = layer.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut svc = layer.layer(upstream(Arc::new(AtomicUsize::new(0))));
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) && i < 2_000_000 {
                        assert_eq!(call(&mut svc, &format!("t{t}-{i}")).await, Ok(200));
                        if i % 7 == 0 {
                            let _ = layer.handle(&auth(&format!("h{t}-{i}"))).state();
                        }
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                        i += 1;
                    }
                });
            })
        })
        .collect();

    let work = async {
        let mut tasks = Vec::new();
        let (midway, mut reached) = tokio::sync::mpsc::channel::<()>(8);
        for w in 0..6 {
            let mut svc = stack.clone();
            let (good, bad, forced) = (good.clone(), bad.clone(), forced.clone());
            let midway = midway.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..300 {
                    if i == 100 {
                        let _ = midway.try_send(());
                    }
                    if w % 2 == 0 && i % 50 == 0 {
                        svc = svc.clone(); // clones made mid-run carry the memo
                    }
                    assert_eq!(call_full(&mut svc, &good).await, Ok(200), "w{w} i{i}");
                    assert_eq!(call_full(&mut svc, &good).await, Ok(200), "w{w} i{i}");
                    let was_forced = forced.load(Ordering::SeqCst);
                    let got = call_full(&mut svc, &bad).await;
                    if was_forced {
                        assert_eq!(got, Err(true), "w{w} i{i}: a forced-open key let a call by");
                    } else {
                        assert!(got == Ok(503) || got == Err(true), "w{w} i{i}: {got:?}");
                    }
                }
            }));
        }
        // Force the failing key's breaker open part-way through: from then on no call to
        // it may pass, whatever memos the workers hold (a forced breaker is never evicted).
        drop(midway);
        reached
            .recv()
            .await
            .expect("a worker got a third of the way");
        let h = layer.handle(&auth(&format!("localhost:{port}")));
        h.force_open();
        assert!(layer.keys().contains(&auth(&format!("localhost:{port}"))));
        forced.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(300), work)
        .await
        .expect("hang guard: workers did not finish");
    stop.store(true, Ordering::SeqCst);
    for c in churn {
        c.join().unwrap();
    }
    assert!(layer.len() <= 32, "bounded: {}", layer.len());
    assert_eq!(
        layer.handle(&auth(&format!("localhost:{port}"))).state(),
        BreakerState::ForcedOpen
    );
    assert_ne!(
        layer.handle(&auth(&format!("127.0.0.1:{port}"))).state(),
        BreakerState::Open
    );
}

// ---------------------------------------------------------------------------------------
// Promise 7: the full client preset, two authorities on one server.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_preset_keeps_authorities_isolated() {
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let app = Router::new().route(
        "/",
        get(move |h: HeaderMap| {
            count.fetch_add(1, Ordering::SeqCst);
            by_host(h)
        }),
    );
    let addr = support::serve_axum(app).await;
    let port = addr.port();
    let stack = steadfast::client::http()
        .breaker(|b| {
            b.consecutive_failures(Some(4))
                .open_time(Duration::from_secs(3600))
                .max_open_time(Duration::from_secs(3600))
        })
        .build()
        .unwrap();
    let good = format!("http://127.0.0.1:{port}/");
    let bad = format!("http://localhost:{port}/");
    let good_key = auth(&format!("127.0.0.1:{port}"));
    let bad_key = auth(&format!("localhost:{port}"));
    let bad_upper = format!("http://LOCALHOST:{port}/");

    for (name, client) in [
        ("hyper_client", stack.hyper_client::<Full<Bytes>>()),
        ("layer", stack.layer(support::transport::<Full<Bytes>>())),
    ] {
        for h in [&good_key, &bad_key] {
            stack.breakers().handle(h).close();
        }
        let mut c = client.clone();
        let mut opened_at = None;
        for i in 0..20 {
            assert_eq!(call_full(&mut c, &good).await, Ok(200), "{name} {i}");
            let got = call_full(&mut c.clone(), if i % 2 == 0 { &bad } else { &bad_upper }).await;
            assert!(got == Ok(503) || got.is_err(), "{name} {i}: {got:?}");
            if opened_at.is_none()
                && stack.breakers().handle(&bad_key).state() == BreakerState::Open
            {
                opened_at = Some(i);
            }
            assert_eq!(call_full(&mut c, &good).await, Ok(200), "{name} {i}");
        }
        assert!(
            opened_at.is_some(),
            "{name}: the failing authority never tripped"
        );
        assert_eq!(
            stack.breakers().handle(&bad_key).state(),
            BreakerState::Open,
            "{name}"
        );
        let g = stack.breakers().handle(&good_key).metrics();
        assert_eq!(g.state, BreakerState::Closed, "{name}");
        assert_eq!(g.failures, 0, "{name}");
        // Once open, no call to the failing authority reaches the server.
        let before = served.load(Ordering::SeqCst);
        for _ in 0..5 {
            assert!(call_full(&mut c, &bad).await.is_err(), "{name}");
            assert!(
                call_full(&mut c.clone(), &bad_upper).await.is_err(),
                "{name}"
            );
        }
        assert_eq!(served.load(Ordering::SeqCst), before, "{name}");
        assert_eq!(call_full(&mut c, &good).await, Ok(200), "{name}");
        assert_eq!(
            stack.breakers().len(),
            2,
            "{name}: {:?}",
            stack.breakers().keys()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Promise 7: what each thread remembers (a service cloned per request, a balancer's
// endpoints in turn) follows the map too, and keeps nothing alive.
// ---------------------------------------------------------------------------------------

/// A fresh clone per call, as a server makes of the service it is given: every call uses the
/// map's breaker for its key, through trips, evictions and re-creation, with keys in turn.
#[tokio::test(start_paused = true)]
async fn clones_per_call_and_keys_in_turn_use_the_maps_breaker() {
    // Eight breakers per shard: the four keys below are kept wherever their hashes land.
    let layer = builder()
        .consecutive_failures(Some(1))
        .max_keys(128)
        .build_per_authority()
        .unwrap();
    let original = layer.layer(upstream(Arc::new(AtomicUsize::new(0))));
    let fresh = || original.clone();
    // Endpoints in turn, each call through a new clone: all closed, all counted.
    for round in 0..3 {
        for host in ["a:1", "b:1", "c:1"] {
            assert_eq!(
                call(&mut fresh(), host).await,
                Ok(200),
                "round {round} {host}"
            );
        }
    }
    for host in ["a:1", "b:1", "c:1"] {
        assert_eq!(layer.handle(&key_of(host)).metrics().calls, 3, "{host}");
    }
    // A trip through one clone is seen by the next clone's call.
    assert_eq!(call(&mut fresh(), "down:1").await, Ok(503));
    assert_eq!(call(&mut fresh(), "down:1").await, Err(true));
    assert_eq!(call(&mut fresh(), "a:1").await, Ok(200));
    assert_eq!(call(&mut fresh(), "down:1").await, Err(true));
    // Evicted through handles (which leave this thread's memory alone) while a handle keeps
    // the old breaker alive: the thread still remembers `down:1` and its breaker is still
    // there, so only the map's eviction count says it is stale. The next clone's call must
    // use the new breaker (closed), and what it records must be the new breaker's.
    let old = layer.handle(&key_of("down:1"));
    let old_decisions = decisions(&old.metrics());
    advance(Duration::from_secs(601)).await;
    let mut i = 0;
    while layer.keys().contains(&key_of("down:1")) {
        assert!(i < 10_000, "never evicted");
        let _ = layer.handle(&key_of(&format!("flood{i}:1"))).state();
        i += 1;
    }
    assert_eq!(call(&mut fresh(), "down:1").await, Ok(503));
    let made = layer.handle(&key_of("down:1"));
    assert_eq!(
        made.state(),
        BreakerState::Open,
        "the call went to the map's breaker"
    );
    assert_eq!(
        decisions(&old.metrics()),
        old_decisions,
        "not to the evicted one"
    );
    // Forced by hand through a handle: the next clone's call obeys.
    layer.handle(&key_of("a:1")).force_open();
    assert_eq!(call(&mut fresh(), "a:1").await, Err(true));
    check_map(&layer, 128);
}

/// A breaker's own stream and `subscribe_all` end (`None`) once the layer and its services
/// are gone, though this thread's last calls went through those breakers (the thread holds
/// them weakly).
#[tokio::test(start_paused = true)]
async fn streams_end_with_the_layer_though_the_thread_called_it_last() {
    let layer = builder().build_per_authority().unwrap();
    let mut all = layer.subscribe_all();
    let mut own = layer.handle(&key_of("a:1")).subscribe();
    let svc = layer.layer(upstream(Arc::new(AtomicUsize::new(0))));
    for host in ["a:1", "b:1", "a:1"] {
        assert_eq!(call(&mut svc.clone(), host).await, Ok(200));
    }
    drop((svc, layer));
    let end = tokio::time::timeout(Duration::from_secs(60), own.recv()).await;
    assert!(
        matches!(end, Ok(None)),
        "a breaker's stream did not end: {end:?}"
    );
    let end = tokio::time::timeout(Duration::from_secs(60), all.recv()).await;
    assert!(
        matches!(end, Ok(None)),
        "subscribe_all did not end: {end:?}"
    );
}

/// A breaker the map has evicted ends its subscribers' stream once the calls that hold it
/// are done, though this thread called it last (the eviction made by another thread, so that
/// nothing this thread does replaces what it remembers).
#[tokio::test(start_paused = true)]
async fn an_evicted_breaker_ends_though_the_thread_called_it_last() {
    let (layer, hits) = one_per_shard();
    let original = layer.layer(upstream(hits.clone()));
    let key = key_of("gone:1");
    let mut transitions = layer.handle(&key).subscribe();
    assert_eq!(call(&mut original.clone(), "gone:1").await, Ok(200));
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let mut flood = layer.layer(upstream(hits.clone()));
            rt.block_on(evict(&layer, &mut flood, &key, &mut 0));
        });
    });
    let end = tokio::time::timeout(Duration::from_secs(60), transitions.recv()).await;
    assert!(matches!(end, Ok(None)), "the stream did not end: {end:?}");
    // Made again: a new breaker, which the thread's next call uses.
    assert_eq!(call(&mut original.clone(), "gone:1").await, Ok(200));
    assert_eq!(layer.handle(&key).metrics().calls, 1);
}
