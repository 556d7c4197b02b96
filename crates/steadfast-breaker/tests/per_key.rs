//! Per-key breakers: isolation, bounded memory, eviction, floods. Paused time.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use steadfast_breaker::BreakerState;
use steadfast_breaker::error::BreakerOpen;
use tokio::time::advance;
use tower::{Layer, Service, ServiceExt, service_fn};

use common::*;

/// One call to each of `n` authorities `{prefix}{i}`, each answered.
async fn call_each<S, B>(svc: &mut S, prefix: &str, n: usize)
where
    S: Service<Request<()>, Response = Response<B>, Error = steadfast_core::BoxError>,
{
    for i in 0..n {
        let req = Request::get(format!("http://{prefix}{i}/"))
            .body(())
            .unwrap();
        svc.ready().await.unwrap().call(req).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn per_authority_breakers_are_isolated_and_bounded() {
    let layer = builder()
        .consecutive_failures(Some(1))
        .max_keys(1000)
        .build_per_authority()
        .unwrap();
    let svc_fn = service_fn(|req: Request<()>| async move {
        let status = if req.uri().host() == Some("down") {
            503
        } else {
            200
        };
        Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap())
    });
    let mut svc = layer.layer(svc_fn);
    let get = |host: &str| Request::get(format!("http://{host}/")).body(()).unwrap();
    svc.ready().await.unwrap().call(get("down")).await.unwrap();
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(get("down"))
        .await
        .unwrap_err();
    assert!(e.downcast_ref::<BreakerOpen>().is_some());
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(get("up"))
            .await
            .unwrap()
            .status(),
        200,
        "other hosts unaffected"
    );
    let down: http::uri::Authority = "down".parse().unwrap();
    assert_eq!(layer.handle(&Some(down)).state(), BreakerState::Open);

    call_each(&mut svc, "h", 100_000).await;
    assert!(layer.len() <= 1000 + 16, "memory bounded: {}", layer.len());
}

#[tokio::test(start_paused = true)]
async fn idle_per_key_breakers_are_evicted_and_recently_used_ones_kept() {
    let layer = builder()
        .max_keys(1600)
        .idle_eviction(Duration::from_secs(600))
        .build_per_authority()
        .unwrap();
    let mut svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(()))
    }));
    let get = |host: &str| Request::get(format!("http://{host}/")).body(()).unwrap();
    call_each(&mut svc, "old", 1600).await;
    svc.ready().await.unwrap().call(get("hot")).await.unwrap();
    advance(Duration::from_secs(650)).await;
    svc.ready().await.unwrap().call(get("hot")).await.unwrap(); // used again: not idle
    advance(Duration::from_secs(50)).await;
    call_each(&mut svc, "new", 400).await;
    let hot: http::uri::Authority = "hot".parse().unwrap();
    assert!(
        layer.keys().contains(&Some(hot)),
        "recently used breakers stay"
    );
    assert!(layer.len() <= 1600, "room was made, never past max_keys");
    for i in 0..400 {
        let new: http::uri::Authority = format!("new{i}").parse().unwrap();
        assert!(layer.keys().contains(&Some(new)), "new{i} was kept");
    }
}

/// A flood of new authorities cannot reset an open breaker by pushing it out of the map:
/// breakers that are not Closed are kept while in use (within the idle time), and every
/// insertion stays O(1) (a bounded number of entries looked at).
#[tokio::test(start_paused = true)]
async fn a_flood_of_new_keys_does_not_evict_an_open_breaker() {
    let layer = builder()
        .consecutive_failures(Some(1))
        .max_keys(32)
        .build_per_authority()
        .unwrap();
    let mut svc = layer.layer(service_fn(|req: Request<()>| async move {
        let status = if req.uri().host() == Some("down") {
            503
        } else {
            200
        };
        Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap())
    }));
    let get = |host: &str| Request::get(format!("http://{host}/")).body(()).unwrap();
    svc.ready().await.unwrap().call(get("down")).await.unwrap();
    let down: http::uri::Authority = "down".parse().unwrap();
    assert_eq!(
        layer.handle(&Some(down.clone())).state(),
        BreakerState::Open
    );
    call_each(&mut svc, "flood", 10_000).await;
    assert!(layer.len() <= 32, "bounded: {}", layer.len());
    assert_eq!(
        layer.handle(&Some(down.clone())).state(),
        BreakerState::Open,
        "still open after 10 000 new keys"
    );
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(get("down"))
        .await
        .unwrap_err();
    assert!(
        e.downcast_ref::<BreakerOpen>().is_some(),
        "callers still fail fast"
    );

    // Protection lasts while the breaker is in use: one idle past the idle time (10 min by
    // default) makes room like any other.
    advance(Duration::from_secs(601)).await;
    // Enough new keys that every shard (keys are spread by a per-process random hash) gets
    // many: the one holding "down" makes room at least twice.
    call_each(&mut svc, "later", 2_000).await;
    assert!(
        !layer.keys().contains(&Some(down)),
        "an idle open breaker is evictable"
    );

    // A breaker an operator forced open stays, however long it is left unused.
    svc.ready().await.unwrap().call(get("kept")).await.unwrap();
    let kept: http::uri::Authority = "kept".parse().unwrap();
    layer.handle(&Some(kept.clone())).force_open();
    advance(Duration::from_secs(3600)).await;
    call_each(&mut svc, "much-later", 2_000).await;
    assert_eq!(
        layer.handle(&Some(kept)).state(),
        BreakerState::ForcedOpen,
        "a forced state is never evicted"
    );
}

#[tokio::test(start_paused = true)]
async fn keyed_layers_report_their_size_and_poll_the_inner_service() {
    let layer = builder().build_per_authority().unwrap();
    assert!(layer.is_empty());
    let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let mut svc = layer.layer(mock);
    handle.allow(0);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), svc.ready())
            .await
            .is_err(),
        "not ready while the inner is not"
    );
    handle.allow(2);
    for host in ["a", "b"] {
        let fut = svc
            .ready()
            .await
            .unwrap()
            .call(Request::get(format!("http://{host}/")).body(()).unwrap());
        let (_r, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        fut.await.unwrap();
    }
    assert_eq!(layer.len(), 2);
    assert!(!layer.is_empty());
}

/// Every per-key breaker is named by its key: transitions say which upstream and which
/// layer, a handle made before the first call is the one calls use, `keys` lists them and
/// `subscribe_all` hears every key, later ones included.
#[tokio::test(start_paused = true)]
async fn per_key_breakers_are_named_listed_and_watched_before_the_first_call() {
    let layer = builder()
        .name("gateway")
        .consecutive_failures(Some(1))
        .build_per_authority()
        .unwrap();
    let mut all = layer.subscribe_all();
    let down: http::uri::Authority = "down:8080".parse().unwrap();
    // Before any call: the handle exists, and subscribing to it works.
    let handle = layer.handle_for_uri(&"http://down:8080/x".parse().unwrap());
    assert_eq!((handle.name(), handle.upstream()), ("gateway", "down:8080"));
    let mut one = handle.subscribe();
    assert_eq!(layer.keys(), [Some(down.clone())]);

    let mut svc = layer.layer(service_fn(|req: Request<()>| async move {
        let status = if req.uri().host() == Some("down") {
            503
        } else {
            200
        };
        Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap())
    }));
    let get = |host: &str| Request::get(format!("http://{host}/")).body(()).unwrap();
    svc.ready()
        .await
        .unwrap()
        .call(get("down:8080"))
        .await
        .unwrap();
    svc.ready()
        .await
        .unwrap()
        .call(get("up:8080"))
        .await
        .unwrap();

    let t = one
        .try_recv()
        .expect("the early handle's breaker is the one calls used");
    assert_eq!((&*t.breaker, &*t.upstream), ("gateway", "down:8080"));
    assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
    let (key, t) = all.try_recv().expect("heard through subscribe_all");
    assert_eq!((key, t.to), (Some(down.clone()), BreakerState::Open));
    assert!(
        all.try_recv().is_none(),
        "the healthy upstream did not move"
    );
    let mut keys = layer.keys();
    keys.sort_by_key(|k| k.as_ref().map(|a| a.to_string()));
    assert_eq!(keys, [Some(down), Some("up:8080".parse().unwrap())]);
    let none = layer.handle(&None);
    assert_eq!(none.upstream(), "none", "requests without an authority");
}

/// `state()` reports the state in force: Open during the open time, HalfOpen once a call
/// would be a probe (the move itself, and its event, wait for that call).
#[tokio::test(start_paused = true)]
async fn the_handle_reports_half_open_once_the_open_time_has_passed() {
    let layer = builder()
        .consecutive_failures(Some(1))
        .open_time(Duration::from_secs(10))
        .jitter_percent(0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut events = handle.subscribe();
    let mut svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::builder().status(503).body(()).unwrap())
    }));
    svc.ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(events.try_recv().map(|t| t.to), Some(BreakerState::Open));
    advance(Duration::from_millis(9_999)).await;
    assert_eq!(handle.state(), BreakerState::Open);
    assert_eq!(handle.metrics().state, BreakerState::Open);
    advance(Duration::from_millis(1)).await;
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    assert_eq!(handle.metrics().state, BreakerState::HalfOpen);
    assert!(
        events.try_recv().is_none(),
        "no transition until a call arrives"
    );
    svc.ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    let moves: Vec<_> = std::iter::from_fn(|| events.try_recv())
        .map(|t| t.to)
        .collect();
    assert_eq!(
        moves,
        [BreakerState::HalfOpen, BreakerState::Open],
        "probe failed"
    );
    assert_eq!(handle.state(), BreakerState::Open);
}

#[test]
fn an_empty_breaker_name_is_refused() {
    let err = builder().name("").build().unwrap_err();
    assert!(err.to_string().contains("name must not be empty"), "{err}");
    assert!(builder().name("").build_per_authority().is_err());
}

/// Authorities compare without regard to ASCII case (as `http` says): `DOWN:8080` and
/// `down:8080` are one upstream with one breaker, whichever spelling came first.
#[tokio::test(start_paused = true)]
async fn authorities_that_differ_only_in_case_share_a_breaker() {
    let layer = builder()
        .consecutive_failures(Some(1))
        .build_per_authority()
        .unwrap();
    let mut svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::builder().status(503).body(()).unwrap())
    }));
    let get = |host: &str| Request::get(format!("http://{host}/")).body(()).unwrap();
    svc.ready()
        .await
        .unwrap()
        .call(get("DOWN:8080"))
        .await
        .unwrap();
    for spelling in ["down:8080", "Down:8080", "DOWN:8080"] {
        let e = svc
            .ready()
            .await
            .unwrap()
            .call(get(spelling))
            .await
            .unwrap_err();
        assert!(e.downcast_ref::<BreakerOpen>().is_some(), "{spelling}");
    }
    assert_eq!(layer.len(), 1);
}

/// One GET to `http://{host}/`: `Ok(status)`, or whether the breaker refused it.
async fn get_host<S, B>(svc: &mut S, host: &str) -> Result<u16, bool>
where
    S: Service<Request<()>, Response = Response<B>, Error = steadfast_core::BoxError>,
{
    let req = Request::get(format!("http://{host}/")).body(()).unwrap();
    match svc.ready().await.unwrap().call(req).await {
        Ok(res) => Ok(res.status().as_u16()),
        Err(e) => Err(e.downcast_ref::<BreakerOpen>().is_some()),
    }
}

/// A service remembers the last key it called and that key's breaker (calls in a row to one
/// upstream skip the map). Once the map has evicted that breaker, the memo is not used: the
/// next call takes the breaker the map holds for the key now, here one forced open through
/// a fresh handle, and is refused (a stale memo would let it through a breaker nobody can
/// see any more).
#[tokio::test(start_paused = true)]
async fn a_remembered_breaker_is_dropped_once_the_map_evicts_it() {
    // One breaker per shard: any new key that lands in a key's shard pushes it out.
    let layer = builder().max_keys(16).build_per_authority().unwrap();
    let inner = || service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let mut remembers = layer.layer(inner());
    let orders: http::uri::Authority = "orders".parse().unwrap();
    assert_eq!(get_host(&mut remembers, "orders").await, Ok(200));
    assert_eq!(get_host(&mut remembers, "orders").await, Ok(200));

    let mut other = layer.layer(inner());
    let mut i = 0;
    while layer.keys().contains(&Some(orders.clone())) {
        assert!(i < 10_000, "no new key landed in the shard of `orders`");
        assert_eq!(get_host(&mut other, &format!("flood{i}")).await, Ok(200));
        i += 1;
    }
    layer.handle(&Some(orders.clone())).force_open();
    assert!(layer.keys().contains(&Some(orders)));

    assert_eq!(
        get_host(&mut remembers, "orders").await,
        Err(true),
        "the call used the map's breaker, not the evicted one"
    );
    // A clone of the service carries on with the same breaker.
    assert_eq!(get_host(&mut remembers.clone(), "orders").await, Err(true));
}

/// When the map is full of breakers it must keep, a new key gets a breaker of its own for
/// each call (nothing kept, so nothing for its failures to trip). The service does not
/// remember such a breaker either: three failures in a row on one service still reach the
/// upstream, where a remembered breaker would have opened after two.
#[tokio::test(start_paused = true)]
async fn a_breaker_the_map_does_not_keep_is_not_remembered() {
    let layer = builder()
        .consecutive_failures(Some(2))
        .max_keys(16)
        .build_per_authority()
        .unwrap();
    // Every shard (one breaker each) holds a breaker forced open: kept whatever comes.
    let mut i = 0;
    while layer.len() < 16 {
        assert!(i < 100_000, "shards never filled");
        let key: http::uri::Authority = format!("forced{i}").parse().unwrap();
        layer.handle(&Some(key)).force_open();
        i += 1;
    }
    let mut svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::builder().status(503).body(()).unwrap())
    }));
    for _ in 0..3 {
        assert_eq!(
            get_host(&mut svc, "fresh").await,
            Ok(503),
            "reached the upstream"
        );
    }
    let fresh: http::uri::Authority = "fresh".parse().unwrap();
    assert!(!layer.keys().contains(&Some(fresh)), "not kept");
}
