//! Per-key limits: each key's calls count against its own limit, permits held until the
//! body ends, a bounded map that drops idle limits to make room and shares an overflow limit
//! when every kept one is busy, and many threads never exceeding any key's limit.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::uri::Authority;
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use steadfast_limit::error::LimitExceeded;
use steadfast_limit::{Aimd, ConcurrencyLimitLayer};
use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt, service_fn};

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

fn key(a: &'static str) -> Option<Authority> {
    Some(Authority::from_static(a))
}

/// The releases of held calls, in arrival order.
type Gates = Arc<Mutex<Vec<oneshot::Sender<()>>>>;

/// An upstream whose calls hang until released.
fn held() -> (
    impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static,
    Gates,
) {
    let gates: Gates = Arc::default();
    let g = gates.clone();
    let svc = service_fn(move |_req: Request<()>| {
        let (tx, rx) = oneshot::channel();
        g.lock().unwrap().push(tx);
        async move {
            let _ = rx.await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
        }
    });
    (svc, gates)
}

#[tokio::test(start_paused = true)]
async fn each_authority_has_a_limit_of_its_own() {
    let layer = ConcurrencyLimitLayer::builder()
        .max(2)
        .per_authority()
        .build()
        .unwrap();
    let (up, _gates) = held();
    let mut svc = layer.layer(up);
    let mut running = Vec::new();
    for uri in ["http://a.test/1", "http://a.test/2", "http://b.test/1"] {
        running.push(tokio::spawn(svc.ready().await.unwrap().call(get(uri))));
    }
    tokio::task::yield_now().await;
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(get("http://A.TEST/3"))
        .await
        .unwrap_err();
    assert_eq!(err.downcast_ref::<LimitExceeded>().unwrap().limit(), 2);
    assert_eq!(
        layer.in_flight(&key("a.test")),
        2,
        "the same authority, any case"
    );
    assert_eq!(layer.in_flight(&key("b.test")), 1);
    assert_eq!(layer.in_flight(&key("c.test")), 0);
    assert_eq!(layer.limit(&key("c.test")), None);
    let mut keys: Vec<_> = layer
        .keys()
        .into_iter()
        .flatten()
        .map(|a| a.to_string())
        .collect();
    keys.sort();
    assert_eq!(keys, ["a.test", "b.test"]);
    // b has room.
    let _b2 = tokio::spawn(svc.ready().await.unwrap().call(get("http://b.test/2")));
    tokio::task::yield_now().await;
    assert_eq!(layer.in_flight(&key("b.test")), 2);
    drop(running);
}

#[tokio::test(start_paused = true)]
async fn a_keys_permit_is_held_until_its_body_ends() {
    let layer = ConcurrencyLimitLayer::builder()
        .max(1)
        .per_authority()
        .build()
        .unwrap();
    let (up, gates) = held();
    let mut svc = layer.layer(up);
    let call = tokio::spawn(svc.ready().await.unwrap().call(get("http://a.test/")));
    tokio::task::yield_now().await;
    let _ = gates.lock().unwrap().remove(0).send(());
    let res = call.await.unwrap().unwrap();
    assert_eq!(
        layer.in_flight(&key("a.test")),
        1,
        "the body has not been read"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "done");
    assert_eq!(layer.in_flight(&key("a.test")), 0);
}

#[tokio::test(start_paused = true)]
async fn busy_keys_keep_their_own_limits_and_idle_ones_make_room() {
    // 16 shards of one key each while idle.
    let layer = ConcurrencyLimitLayer::builder()
        .max(1)
        .per_key(|uri: &Uri, _: &HeaderMap| uri.path().to_owned())
        .max_keys(16)
        .build()
        .unwrap();
    let (up, gates) = held();
    let mut svc = layer.layer(up);
    // 200 keys, one call each, all held: each keeps a limit of its own (none is refused), and
    // a second call to any of them is refused.
    let mut running = Vec::new();
    for i in 0..200 {
        let fut = svc
            .ready()
            .await
            .unwrap()
            .call(get(&format!("http://x/{i}")));
        let mut fut = Box::pin(fut);
        assert!(fut.as_mut().now_or_never().is_none(), "key {i}");
        running.push(fut);
    }
    assert_eq!(layer.keys().len(), 200);
    let again = svc.ready().await.unwrap().call(get("http://x/7")).await;
    assert!(again.unwrap_err().is::<LimitExceeded>());
    // Once the calls end, new keys make the idle limits go: the map is back within its bound.
    for g in gates.lock().unwrap().drain(..) {
        let _ = g.send(());
    }
    for f in running {
        drop(f.await.unwrap());
    }
    for i in 200..800 {
        let fut = svc
            .ready()
            .await
            .unwrap()
            .call(get(&format!("http://x/{i}")));
        let mut fut = Box::pin(fut);
        assert!(fut.as_mut().now_or_never().is_none(), "key {i}");
        drop(fut);
    }
    assert!(layer.keys().len() <= 16, "{} keys kept", layer.keys().len());
}

#[tokio::test(start_paused = true)]
async fn an_adaptive_limit_moves_for_its_key_only() {
    let layer = ConcurrencyLimitLayer::builder()
        .aimd(Aimd {
            initial: 10,
            ..Aimd::default()
        })
        .sample_window(Duration::ZERO, 1)
        .per_authority()
        .build()
        .unwrap();
    let up = service_fn(|req: Request<()>| async move {
        let status = if req.uri().host() == Some("sick.test") {
            503
        } else {
            200
        };
        Ok::<_, Infallible>(
            Response::builder()
                .status(status)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    });
    let svc = layer.layer(up);
    for _ in 0..3 {
        svc.clone().oneshot(get("http://sick.test/")).await.unwrap();
        svc.clone().oneshot(get("http://well.test/")).await.unwrap();
    }
    assert!(layer.limit(&key("sick.test")).unwrap() < 10);
    assert!(layer.limit(&key("well.test")).unwrap() >= 10);
}

#[test]
fn many_threads_never_exceed_any_keys_limit() {
    let layer = ConcurrencyLimitLayer::builder()
        .max(3)
        .per_authority()
        .build()
        .unwrap();
    let holding: Arc<[AtomicU32; 4]> = Arc::new(Default::default());
    let most: Arc<[AtomicU32; 4]> = Arc::new(Default::default());
    let (h, m) = (holding.clone(), most.clone());
    let up = service_fn(move |req: Request<()>| {
        let i = usize::from(req.uri().host().unwrap().as_bytes()[0] - b'a');
        let now = h[i].fetch_add(1, SeqCst) + 1;
        m[i].fetch_max(now, SeqCst);
        let h = h.clone();
        async move {
            tokio::task::yield_now().await;
            h[i].fetch_sub(1, SeqCst);
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let svc = layer.layer(up);
    let admitted = Arc::new(AtomicU32::new(0));
    rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let (svc, admitted) = (svc.clone(), admitted.clone());
                tokio::spawn(async move {
                    for n in 0..2000 {
                        let host = ["a", "b", "c", "d"][(t + n) % 4];
                        let uri = format!("http://{host}.test/");
                        if let Ok(res) = svc.clone().oneshot(get(&uri)).await {
                            admitted.fetch_add(1, SeqCst);
                            drop(res);
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    for (i, m) in most.iter().enumerate() {
        assert!(m.load(SeqCst) <= 3, "key {i}: {} at once", m.load(SeqCst));
    }
    assert!(admitted.load(SeqCst) > 0);
    for host in ["a.test", "b.test", "c.test", "d.test"] {
        assert_eq!(
            layer.in_flight(&Some(Authority::from_static(host))),
            0,
            "{host}"
        );
    }
}
