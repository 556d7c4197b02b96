//! Balancer contracts on paused time, over an in-process upstream that answers per endpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use steadfast_balance::error::NoEndpoint;
use steadfast_balance::{
    BalanceBuilder, BalanceLayer, FailurePercentage, HostHeader, Pick, SuccessRate,
};
use steadfast_core::{BoxError, PolicyRejected};
use tower::{Layer, Service, ServiceExt, service_fn};

/// What each endpoint answers: a status per call, from a function of the call's number.
type Script = Arc<Mutex<HashMap<String, Box<dyn FnMut(u64) -> u16 + Send>>>>;

#[derive(Clone, Default)]
struct Upstream {
    script: Script,
    calls: Arc<Mutex<HashMap<String, u64>>>,
    hosts: Arc<Mutex<Vec<Option<String>>>>,
    /// Endpoints whose error answers say they shed the call (`x-envoy-overloaded`).
    shedding: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    fn answer(&self, endpoint: &str, f: impl FnMut(u64) -> u16 + Send + 'static) {
        self.script
            .lock()
            .unwrap()
            .insert(endpoint.to_owned(), Box::new(f));
    }

    fn calls(&self, endpoint: &str) -> u64 {
        self.calls
            .lock()
            .unwrap()
            .get(endpoint)
            .copied()
            .unwrap_or(0)
    }

    fn service(
        &self,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future: Send> + Clone + Send
    {
        let up = self.clone();
        service_fn(move |req: Request<()>| {
            let up = up.clone();
            async move {
                let to = req.uri().authority().unwrap().to_string();
                up.hosts.lock().unwrap().push(
                    req.headers()
                        .get("host")
                        .map(|h| h.to_str().unwrap().to_owned()),
                );
                let n = {
                    let mut calls = up.calls.lock().unwrap();
                    let c = calls.entry(to.clone()).or_default();
                    *c += 1;
                    *c
                };
                let status = match up.script.lock().unwrap().get_mut(&to) {
                    Some(f) => f(n),
                    None => 200,
                };
                let mut res = Response::builder().status(status);
                if status >= 400 && up.shedding.lock().unwrap().contains(&to) {
                    res = res.header("x-envoy-overloaded", "true");
                }
                Ok::<_, BoxError>(res.body(()).unwrap())
            }
        })
    }
}

fn endpoints(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("10.0.0.{i}:80")).collect()
}

fn builder(n: usize) -> BalanceBuilder {
    BalanceLayer::builder().endpoints(endpoints(n)).seed(11)
}

fn get() -> Request<()> {
    Request::get("http://orders/items").body(()).unwrap()
}

async fn send<S>(svc: &mut S) -> Result<Response<()>, BoxError>
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError>,
{
    svc.ready().await?.call(get()).await
}

#[tokio::test(start_paused = true)]
async fn each_call_goes_to_one_endpoint_with_the_service_name_as_host() {
    let up = Upstream::default();
    let mut svc = builder(3).build().unwrap().layer(up.service());
    for _ in 0..300 {
        assert_eq!(send(&mut svc).await.unwrap().status(), 200);
    }
    let total: u64 = endpoints(3).iter().map(|e| up.calls(e)).sum();
    assert_eq!(total, 300);
    for e in endpoints(3) {
        assert!(up.calls(&e) > 30, "{e} got {}", up.calls(&e));
    }
    assert!(
        up.hosts
            .lock()
            .unwrap()
            .iter()
            .all(|h| h.as_deref() == Some("orders"))
    );
}

#[tokio::test(start_paused = true)]
async fn the_host_header_can_name_the_endpoint_and_a_callers_host_is_kept() {
    let up = Upstream::default();
    let mut svc = builder(1)
        .host_header(HostHeader::Endpoint)
        .build()
        .unwrap()
        .layer(up.service());
    send(&mut svc).await.unwrap();
    let mut own = get();
    own.headers_mut().insert("host", "mine".parse().unwrap());
    let mut svc2 = builder(1).build().unwrap().layer(up.service());
    svc2.ready().await.unwrap().call(own).await.unwrap();
    let hosts = up.hosts.lock().unwrap().clone();
    assert_eq!(hosts, [None, Some("mine".to_owned())]);
}

#[tokio::test(start_paused = true)]
async fn round_robin_takes_each_endpoint_in_turn() {
    let up = Upstream::default();
    let mut svc = builder(3)
        .pick(Pick::RoundRobin)
        .build()
        .unwrap()
        .layer(up.service());
    for _ in 0..30 {
        send(&mut svc).await.unwrap();
    }
    for e in endpoints(3) {
        assert_eq!(up.calls(&e), 10);
    }
}

/// After a failure, the endpoint loses every choice against one that has not failed: the
/// next calls (a retry among them) go elsewhere, with either pick.
#[tokio::test(start_paused = true)]
async fn a_failed_endpoint_loses_the_next_choices() {
    for (n, pick) in [2, 3, 5]
        .into_iter()
        .flat_map(|n| [(n, Pick::PowerOfTwoChoices), (n, Pick::RoundRobin)])
    {
        let up = Upstream::default();
        let bad = "10.0.0.1:80";
        up.answer(bad, |_| 503);
        let mut svc = builder(n)
            .consecutive_failures(None)
            .pick(pick)
            .build()
            .unwrap()
            .layer(up.service());
        // Until the bad endpoint has been tried once.
        while up.calls(bad) == 0 {
            send(&mut svc).await.unwrap();
        }
        for _ in 0..200 {
            assert_eq!(
                send(&mut svc).await.unwrap().status(),
                200,
                "n = {n}, {pick:?}"
            );
        }
        assert_eq!(up.calls(bad), 1, "n = {n}, {pick:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_handle_reports_each_endpoints_latency_estimate_and_calls_in_flight() {
    let slow = "10.0.0.1:80";
    let up = service_fn(move |req: Request<()>| async move {
        let to = req.uri().authority().unwrap().to_string();
        let ms = if to == slow { 40 } else { 1 };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, BoxError>(Response::new(()))
    });
    let layer = builder(2).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(up);
    let latency = |who: &str| {
        handle
            .list()
            .into_iter()
            .find(|e| e.authority.as_str() == who)
            .unwrap()
            .latency
    };
    let default = latency(slow);
    let mut calls = 0;
    // Until each has answered once (the slow one's estimate then jumps to its peak).
    while latency(slow) == default || latency("10.0.0.2:80") == default {
        send(&mut svc).await.unwrap();
        calls += 1;
        assert!(calls < 100, "both endpoints answered within 100 calls");
    }
    // A sample above the estimate replaces it at once (the peak); one below is blended in
    // over the decay time (10 s).
    let (s, f) = (latency(slow), latency("10.0.0.2:80"));
    assert!(s >= Duration::from_millis(39), "slow: {s:?}");
    assert!(f < s, "fast {f:?}, slow {s:?}");
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        send(&mut svc).await.unwrap();
    }
    let f = latency("10.0.0.2:80");
    assert!(f <= Duration::from_millis(3), "fast after 30 s: {f:?}");
    let pending = svc.call(get());
    tokio::pin!(pending);
    assert!(futures_poll_once(pending.as_mut()).await.is_none());
    let busy: u32 = handle.list().iter().map(|e| e.in_flight).sum();
    assert_eq!(busy, 1, "the call in flight is counted");
    pending.await.unwrap();
    assert!(handle.list().iter().all(|e| e.in_flight == 0));
}

/// Polls `fut` once.
async fn futures_poll_once<F: std::future::Future + Unpin>(fut: F) -> Option<F::Output> {
    let mut fut = fut;
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// The penalty fades within seconds: an endpoint that failed once competes again.
#[tokio::test(start_paused = true)]
async fn a_failed_endpoint_competes_again_once_its_penalty_fades() {
    let flaky = "10.0.0.1:80";
    let failed_once = Arc::new(Mutex::new(false));
    let calls = Arc::new(Mutex::new(0u32));
    let (f, c) = (failed_once.clone(), calls.clone());
    // Both endpoints answer in 1 ms; the flaky one fails its first call.
    let up = service_fn(move |req: Request<()>| {
        let (f, c) = (f.clone(), c.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let mut status = 200;
            if req.uri().authority().unwrap().as_str() == flaky {
                *c.lock().unwrap() += 1;
                if !std::mem::replace(&mut *f.lock().unwrap(), true) {
                    status = 503;
                }
            }
            Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
        }
    });
    let mut svc = builder(2).build().unwrap().layer(up);
    while !*failed_once.lock().unwrap() {
        send(&mut svc).await.unwrap();
    }
    // Right after the failure, it loses the choices.
    for _ in 0..20 {
        send(&mut svc).await.unwrap();
    }
    assert_eq!(*calls.lock().unwrap(), 1);
    // Seconds later it competes again.
    tokio::time::advance(Duration::from_secs(30)).await;
    for _ in 0..200 {
        send(&mut svc).await.unwrap();
    }
    let got = *calls.lock().unwrap() - 1;
    assert!(got > 20, "it got {got} of 200");
}

/// An endpoint that joins a set of fast endpoints takes calls at once (it starts at their
/// mean estimate; a fixed slower start starved it: a hostile pass through Consul found it).
#[tokio::test(start_paused = true)]
async fn an_endpoint_that_joins_a_fast_set_takes_calls_at_once() {
    let fast = service_fn(|req: Request<()>| async move {
        tokio::time::sleep(Duration::from_micros(200)).await;
        Ok::<_, BoxError>(
            Response::builder()
                .header("to", req.uri().authority().unwrap().as_str())
                .body(())
                .unwrap(),
        )
    });
    let layer = builder(2).build().unwrap();
    let mut svc = layer.layer(fast);
    for _ in 0..100 {
        svc.ready().await.unwrap().call(get()).await.unwrap();
    }
    layer.handle().insert("10.0.0.9:80".parse().unwrap());
    let mut new = 0;
    for _ in 0..300 {
        let res = svc.ready().await.unwrap().call(get()).await.unwrap();
        new += usize::from(res.headers()["to"] == "10.0.0.9:80");
    }
    assert!(new > 30, "the new endpoint got {new} of 300");
}

#[tokio::test(start_paused = true)]
async fn five_failures_in_a_row_eject_for_30_s_then_60_s() {
    let up = Upstream::default();
    let bad = "10.0.0.1:80";
    up.answer(bad, |_| 503);
    let layer = builder(2)
        .failure_penalty(Duration::ZERO)
        .pick(Pick::RoundRobin)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(up.service());
    for _ in 0..10 {
        send(&mut svc).await.unwrap();
    }
    assert_eq!(up.calls(bad), 5);
    assert_eq!(handle.ejected(), 1);
    // 29.9 s later still ejected; at 30 s it takes calls again.
    tokio::time::advance(Duration::from_millis(29_900)).await;
    for _ in 0..10 {
        send(&mut svc).await.unwrap();
    }
    assert_eq!(up.calls(bad), 5);
    tokio::time::advance(Duration::from_millis(100)).await;
    for _ in 0..10 {
        send(&mut svc).await.unwrap();
    }
    assert_eq!(
        up.calls(bad),
        10,
        "returned, and ejected again after 5 more"
    );
    assert_eq!(handle.ejected(), 1);
    // The second ejection lasts 60 s.
    tokio::time::advance(Duration::from_millis(59_900)).await;
    send(&mut svc).await.unwrap();
    send(&mut svc).await.unwrap();
    assert_eq!(up.calls(bad), 10);
    tokio::time::advance(Duration::from_millis(100)).await;
    for _ in 0..4 {
        send(&mut svc).await.unwrap();
    }
    assert_eq!(up.calls(bad), 12);
}

#[tokio::test(start_paused = true)]
async fn the_ejection_time_is_capped_and_decays_while_healthy() {
    let up = Upstream::default();
    let bad = "10.0.0.1:80";
    let failing = Arc::new(Mutex::new(true));
    let f = failing.clone();
    up.answer(bad, move |_| if *f.lock().unwrap() { 503 } else { 200 });
    let layer = builder(2)
        .failure_penalty(Duration::ZERO)
        .pick(Pick::RoundRobin)
        .ejection_time(Duration::from_secs(30), Duration::from_secs(70))
        .interval(Duration::from_secs(10))
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(up.service());
    // Three ejections: 30 s, 60 s, then 70 s (capped).
    for (k, wait) in [(1, 30), (2, 60), (3, 70)] {
        while handle.list()[0].ejections < k {
            send(&mut svc).await.unwrap();
        }
        let before = up.calls(bad);
        tokio::time::advance(Duration::from_secs(wait) - Duration::from_millis(1)).await;
        send(&mut svc).await.unwrap();
        send(&mut svc).await.unwrap();
        assert_eq!(up.calls(bad), before, "ejection {k} lasts {wait} s");
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    // Healthy now: each interval in service with successes and no failure takes one off the
    // multiplier; an interval without calls to it does not.
    *failing.lock().unwrap() = false;
    tokio::time::advance(Duration::from_secs(10)).await;
    send(&mut svc).await.unwrap();
    let idle = handle.list()[0].ejections;
    for _ in 0..3 {
        for _ in 0..4 {
            send(&mut svc).await.unwrap();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
    }
    send(&mut svc).await.unwrap();
    assert_eq!(handle.list()[0].ejections, 0, "from {idle}");
}

#[tokio::test(start_paused = true)]
async fn the_success_rate_rule_ejects_the_outlier_after_an_interval() {
    let up = Upstream::default();
    let bad = "10.0.0.3:80";
    up.answer(bad, |n| if n % 2 == 0 { 503 } else { 200 });
    let layer = builder(5)
        .failure_penalty(Duration::ZERO)
        .consecutive_failures(None)
        .failure_percentage(None)
        .success_rate(Some(SuccessRate::default().request_volume(20)))
        .max_ejection_percent(20)
        .pick(Pick::RoundRobin)
        .build()
        .unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(up.service());
    for _ in 0..200 {
        send(&mut svc).await.unwrap();
    }
    assert_eq!(handle.ejected(), 0, "not before the interval ends");
    tokio::time::advance(Duration::from_secs(10)).await;
    send(&mut svc).await.unwrap();
    let ejected: Vec<String> = handle
        .list()
        .into_iter()
        .filter(|e| e.ejected)
        .map(|e| e.authority.to_string())
        .collect();
    assert_eq!(ejected, [bad]);
}

#[tokio::test(start_paused = true)]
async fn the_failure_percentage_rule_ejects_above_its_threshold_only() {
    for (fail_one_in, ejected) in [(1, true), (2, false)] {
        let up = Upstream::default();
        let bad = "10.0.0.2:80";
        up.answer(bad, move |n| if n % fail_one_in == 0 { 503 } else { 200 });
        let layer = builder(3)
            .failure_penalty(Duration::ZERO)
            .consecutive_failures(None)
            .success_rate(None)
            .failure_percentage(Some(
                FailurePercentage::default()
                    .minimum_hosts(3)
                    .request_volume(10),
            ))
            .pick(Pick::RoundRobin)
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut svc = layer.layer(up.service());
        for _ in 0..60 {
            send(&mut svc).await.unwrap();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        send(&mut svc).await.unwrap();
        assert_eq!(handle.ejected() == 1, ejected, "fails 1 in {fail_one_in}");
    }
}

/// An endpoint that sheds (503 + `x-envoy-overloaded`) is busy, not broken: its next calls go
/// elsewhere for the failure penalty, as after a failure, but no outlier rule counts the
/// answer, so it is never ejected for shedding. The same answers unmarked eject it.
#[tokio::test(start_paused = true)]
async fn a_shedding_endpoint_is_avoided_for_the_penalty_and_never_ejected() {
    for (marked, pick) in [
        (true, Pick::PowerOfTwoChoices),
        (true, Pick::RoundRobin),
        (false, Pick::PowerOfTwoChoices),
    ] {
        let up = Upstream::default();
        let busy = "10.0.0.1:80";
        up.answer(busy, |_| 503);
        if marked {
            up.shedding.lock().unwrap().push(busy.to_owned());
        }
        let layer = builder(3)
            .consecutive_failures(Some(1))
            .failure_percentage(Some(
                FailurePercentage::default()
                    .minimum_hosts(3)
                    .request_volume(2),
            ))
            .success_rate(Some(SuccessRate::default().request_volume(2)))
            .max_ejection_percent(100)
            .pick(pick)
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut svc = layer.layer(up.service());
        for round in 0..5u64 {
            let before = up.calls(busy);
            for _ in 0..100 {
                let _ = send(&mut svc).await;
            }
            if marked {
                assert_eq!(handle.ejected(), 0, "round {round}");
                assert!(
                    up.calls(busy) - before <= 1,
                    "one call per penalty, round {round}: {}",
                    up.calls(busy) - before
                );
            } else {
                assert_eq!(handle.ejected(), 1, "round {round}");
            }
            tokio::time::advance(Duration::from_millis(2_100)).await;
        }
        if marked {
            assert!(up.calls(busy) >= 5, "asked again after each penalty");
            // The intervals ended on the way: still in service.
            assert!(handle.list().iter().all(|e| !e.ejected));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn with_every_endpoint_failing_one_stays_in_service_or_the_call_fails_fast() {
    for fail_fast in [false, true] {
        let up = Upstream::default();
        for e in endpoints(4) {
            up.answer(&e, |_| 503);
        }
        let layer = builder(4)
            .max_ejection_percent(100)
            .fail_fast(fail_fast)
            .build()
            .unwrap();
        let handle = layer.handle();
        let mut svc = layer.layer(up.service());
        for _ in 0..100 {
            let _ = send(&mut svc).await;
            assert!(handle.ejected() <= 3, "never all");
        }
        assert_eq!(handle.ejected(), 3);
        // The one left in service still takes calls.
        assert_eq!(send(&mut svc).await.unwrap().status(), 503);
    }
}

#[tokio::test(start_paused = true)]
async fn an_empty_set_fails_fast_with_a_policy_rejection() {
    let up = Upstream::default();
    let layer = BalanceLayer::builder().build().unwrap();
    let mut svc = layer.layer(up.service());
    let err = send(&mut svc).await.unwrap_err();
    let e = err.downcast_ref::<NoEndpoint>().unwrap();
    assert!(e.is_empty_set());
    assert!(PolicyRejected::is_in(&*err));
    // An endpoint joins while the service runs.
    layer.handle().insert("10.0.0.9:80".parse().unwrap());
    assert_eq!(send(&mut svc).await.unwrap().status(), 200);
    assert_eq!(up.calls("10.0.0.9:80"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_removed_endpoint_drains_its_calls_in_flight() {
    let slow = service_fn(|req: Request<()>| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, BoxError>(
            Response::builder()
                .header("to", req.uri().authority().unwrap().as_str())
                .body(())
                .unwrap(),
        )
    });
    let layer = builder(1).build().unwrap();
    let svc = layer.layer(slow);
    let in_flight = tokio::spawn(svc.clone().oneshot(get()));
    tokio::task::yield_now().await;
    assert_eq!(layer.handle().list()[0].in_flight, 1);
    layer.handle().set(["10.0.0.2:80".parse().unwrap()]);
    let res = in_flight.await.unwrap().unwrap();
    assert_eq!(
        res.headers()["to"],
        "10.0.0.1:80",
        "finished where it started"
    );
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.headers()["to"], "10.0.0.2:80");
}

#[test]
fn bad_settings_are_refused_with_what_to_change() {
    let cases: Vec<(BalanceBuilder, &str)> = vec![
        (
            BalanceLayer::builder().endpoints(["http://a:80"]),
            "host:port",
        ),
        (BalanceLayer::builder().endpoints(["a"]), "host:port"),
        (BalanceLayer::builder().endpoints(["u@a:80"]), "host:port"),
        (BalanceLayer::builder().interval(Duration::ZERO), "interval"),
        (
            BalanceLayer::builder().ejection_time(Duration::from_secs(30), Duration::from_secs(1)),
            "raise max",
        ),
        (BalanceLayer::builder().max_ejection_percent(101), "0-100"),
        (
            BalanceLayer::builder().consecutive_failures(Some(0)),
            "at least 1",
        ),
        (
            BalanceLayer::builder()
                .failure_percentage(Some(FailurePercentage::default().threshold(150))),
            "0-100",
        ),
        (
            BalanceLayer::builder().success_rate(Some(SuccessRate::default().minimum_hosts(0))),
            "at least 1",
        ),
    ];
    for (b, says) in cases {
        let e = b.build().unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
    }
}

#[test]
fn services_futures_and_layers_are_send() {
    fn send<T: Send>(_: &T) {}
    fn send_sync<T: Send + Sync>(_: &T) {}
    let up = Upstream::default();
    let svc = builder(2).build().unwrap().layer(up.service());
    send(&svc.clone().oneshot(get()));
    let layer = builder(2).build().unwrap();
    send_sync(&layer);
    send_sync(&layer.handle());
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn allowed(n: usize, percent: u8) -> usize {
        if n < 2 {
            0
        } else {
            (n * usize::from(percent) / 100).max(1).min(n - 1)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever fails and whenever time moves, no more than the allowed share of the
        /// endpoints is ejected at once, never all, and the count the handle reports is the
        /// endpoints marked ejected.
        #[test]
        fn never_more_than_the_allowed_share_is_ejected(
            n in 1usize..10,
            percent in 0u8..=100,
            fail_every in proptest::collection::vec(1u64..4, 10),
            steps in proptest::collection::vec((0u32..40, 0u64..45_000), 1..12),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let up = Upstream::default();
                for (i, e) in endpoints(n).iter().enumerate() {
                    let every = fail_every[i];
                    up.answer(e, move |k| if k % every == 0 { 503 } else { 200 });
                }
                let layer = builder(n)
                    .max_ejection_percent(percent)
                    .consecutive_failures(Some(2))
                    .failure_percentage(Some(
                        FailurePercentage::default().minimum_hosts(1).request_volume(1).threshold(30),
                    ))
                    .success_rate(Some(SuccessRate::default().minimum_hosts(1).request_volume(1)))
                    .interval(Duration::from_secs(1))
                    .build()
                    .unwrap();
                let handle = layer.handle();
                let mut svc = layer.layer(up.service());
                for (calls, wait_ms) in steps {
                    for _ in 0..calls {
                        let _ = send(&mut svc).await;
                        let list = handle.list();
                        let marked = list.iter().filter(|e| e.ejected).count();
                        prop_assert!(marked <= allowed(n, percent), "{marked} of {n} at {percent} %");
                        prop_assert!(n == 0 || marked < n);
                        prop_assert_eq!(marked, handle.ejected());
                    }
                    tokio::time::advance(Duration::from_millis(wait_ms)).await;
                }
                Ok(())
            })?;
        }
    }
}

/// A call an endpoint's own breaker refuses comes back as `Rerouted` (not sent, retryable)
/// while another endpoint can take it; with none, the refusal itself. The endpoint is not
/// ejected: it gets no call for the failure penalty, then the next call asks its breaker
/// again, so an endpoint whose breaker closes (by its probes or by hand) takes calls again
/// within the penalty.
#[tokio::test(start_paused = true)]
async fn a_refusal_by_an_endpoints_breaker_is_rerouted_and_avoided_for_the_penalty() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use steadfast_balance::error::Rerouted;
    #[derive(Debug)]
    struct Open;
    impl std::fmt::Display for Open {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("circuit open")
        }
    }
    impl std::error::Error for Open {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&PolicyRejected::INSTANCE)
        }
    }
    let open = Arc::new(AtomicBool::new(true));
    let served = Arc::new(Mutex::new(Vec::<String>::new()));
    let (is_open, log) = (open.clone(), served.clone());
    let refusing = service_fn(move |req: Request<()>| {
        let to = req.uri().authority().unwrap().to_string();
        let refuse = to == "10.0.0.1:80" && is_open.load(SeqCst);
        if !refuse {
            log.lock().unwrap().push(to);
        }
        async move {
            if refuse {
                Err::<Response<()>, BoxError>(Box::new(Open))
            } else {
                Ok(Response::new(()))
            }
        }
    });
    let layer = builder(2).pick(Pick::RoundRobin).build().unwrap();
    let mut svc = layer.layer(refusing.clone());
    let mut rerouted = 0;
    for _ in 0..10 {
        if let Err(e) = send(&mut svc).await {
            let r = e.downcast_ref::<Rerouted>().expect("rerouted");
            assert_eq!(r.endpoint().as_str(), "10.0.0.1:80");
            assert!(
                !PolicyRejected::is_in(&*e),
                "a retry layer may send it again"
            );
            let class = steadfast_core::classify_transport_error(&*e);
            assert!(class.is_retryable());
            assert_eq!(class.delivery(), steadfast_core::Delivery::NotSent);
            rerouted += 1;
        }
    }
    assert_eq!(rerouted, 1, "then avoided for the penalty");
    let status = layer.handle().list();
    assert_eq!(layer.handle().ejected(), 0, "a refusal does not eject");
    assert!(status[0].refusing && !status[1].refusing, "{status:?}");
    // Past the penalty, the next call there asks the breaker again: still open.
    tokio::time::sleep(Duration::from_millis(2001)).await;
    let mut again = 0;
    for _ in 0..10 {
        again += u32::from(send(&mut svc).await.is_err());
    }
    assert_eq!(again, 1, "one refusal per penalty");
    // The breaker closes (a hand closing it, say): calls reach the endpoint within the
    // penalty, not after an ejection time.
    open.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(2001)).await;
    served.lock().unwrap().clear();
    for _ in 0..10 {
        send(&mut svc).await.expect("both in service");
    }
    let to_first = served
        .lock()
        .unwrap()
        .iter()
        .filter(|a| *a == "10.0.0.1:80")
        .count();
    assert_eq!(to_first, 5, "round-robin over both again");
    assert!(!layer.handle().list()[0].refusing);
    // Alone, the refusal is the breaker's own, which is final.
    open.store(true, SeqCst);
    let alone = builder(1).build().unwrap();
    let err = send(&mut alone.layer(refusing)).await.unwrap_err();
    assert!(PolicyRejected::is_in(&*err));
}

/// Refusing endpoints get no calls while another endpoint can take them (they would refuse
/// those too), whatever the ejection cap: two of three refuse, none is ejected, and each
/// refuses one call per failure penalty (2 s), not every other call.
#[tokio::test(start_paused = true)]
async fn endpoints_whose_breakers_refuse_get_one_call_per_penalty() {
    #[derive(Debug)]
    struct Open;
    impl std::fmt::Display for Open {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("circuit open")
        }
    }
    impl std::error::Error for Open {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&PolicyRejected::INSTANCE)
        }
    }
    let refused = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let seen = refused.clone();
    let up = service_fn(move |req: Request<()>| {
        let seen = seen.clone();
        async move {
            let to = req.uri().authority().unwrap().to_string();
            // A busy healthy endpoint: the refusing ones look idle and cheap.
            if to == "10.0.0.3:80" {
                tokio::time::sleep(Duration::from_millis(5)).await;
                return Ok(Response::new(()));
            }
            *seen.lock().unwrap().entry(to).or_default() += 1;
            Err::<Response<()>, BoxError>(Box::new(Open))
        }
    });
    for pick in [Pick::PowerOfTwoChoices, Pick::RoundRobin] {
        refused.lock().unwrap().clear();
        let layer = builder(3).pick(pick).build().unwrap();
        let mut svc = layer.layer(up.clone());
        let start = tokio::time::Instant::now();
        let mut failed = 0;
        while start.elapsed() < Duration::from_millis(1900) {
            failed += u32::from(send(&mut svc).await.is_err());
        }
        assert_eq!(layer.handle().ejected(), 0, "refusals do not eject");
        let by_endpoint = refused.lock().unwrap().clone();
        assert!(
            by_endpoint.values().all(|&n| n == 1) && failed == 2,
            "{pick:?}: one refusal each within the penalty, {by_endpoint:?}, {failed} failed"
        );
    }
}

/// After a failure the endpoint loses every choice against one that did not fail, even when
/// that one is much slower or busier.
#[tokio::test(start_paused = true)]
async fn a_failed_endpoint_loses_even_to_slow_endpoints() {
    let up = service_fn(|req: Request<()>| async move {
        let fast_and_failing = req.uri().authority().unwrap().as_str() == "10.0.0.1:80";
        if !fast_and_failing {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let status = if fast_and_failing { 503 } else { 200 };
        Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
    });
    let layer = builder(3).consecutive_failures(None).build().unwrap();
    let svc = layer.layer(up);
    // Warm the estimates, then make the fast endpoint fail once.
    let mut failed = false;
    for _ in 0..20 {
        let res = svc.clone().oneshot(get()).await.unwrap();
        failed |= res.status() == 503;
        if failed {
            break;
        }
    }
    assert!(failed);
    for _ in 0..20 {
        let res = tokio::time::timeout(Duration::from_millis(1), svc.clone().oneshot(get())).await;
        assert!(
            res.is_err(),
            "went to the slow ones, not back to the one that just failed"
        );
    }
}

/// A smaller set allows fewer ejected endpoints: the ones ejected longest ago return, and
/// never all are ejected.
#[tokio::test(start_paused = true)]
async fn shrinking_the_set_keeps_the_ejection_cap() {
    let up = Upstream::default();
    for e in endpoints(20) {
        up.answer(&e, |_| 503);
    }
    let layer = builder(20).max_ejection_percent(10).build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(up.service());
    for _ in 0..400 {
        let _ = send(&mut svc).await;
    }
    assert_eq!(handle.ejected(), 2);
    let ejected: Vec<_> = handle
        .list()
        .into_iter()
        .filter(|e| e.ejected)
        .map(|e| e.authority)
        .collect();
    handle.set(
        ejected
            .clone()
            .into_iter()
            .chain(["10.0.0.99:80".parse().unwrap()]),
    );
    assert_eq!(handle.ejected(), 1, "3 endpoints allow 1");
    handle.set(ejected);
    assert_eq!(handle.ejected(), 1, "2 endpoints allow 1, never both");
}

/// The status says what is in force: an ejection whose time ran out has ended, with no call.
#[tokio::test(start_paused = true)]
async fn the_status_reports_an_ended_ejection_without_a_call() {
    let up = Upstream::default();
    up.answer("10.0.0.1:80", |_| 503);
    let layer = builder(2)
        .failure_penalty(Duration::ZERO)
        .pick(Pick::RoundRobin)
        .build()
        .unwrap();
    let mut svc = layer.layer(up.service());
    for _ in 0..10 {
        let _ = send(&mut svc).await;
    }
    assert_eq!(layer.handle().ejected(), 1);
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(layer.handle().ejected(), 0);
}

/// Authorities that are not endpoints are skipped by the handle as the builder refuses them;
/// `Host` never carries the caller's userinfo.
#[tokio::test(start_paused = true)]
async fn the_handle_skips_what_the_builder_refuses_and_host_drops_userinfo() {
    let up = Upstream::default();
    let layer = builder(1).build().unwrap();
    let h = layer.handle();
    for bad in ["nohost-port", "user:pw@b:2", "b:0"] {
        h.insert(bad.parse().unwrap());
    }
    assert_eq!(h.list().len(), 1);
    let mut svc = layer.layer(up.service());
    let req = Request::get("http://user:secret@orders:8080/x")
        .body(())
        .unwrap();
    svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(
        up.hosts
            .lock()
            .unwrap()
            .last()
            .cloned()
            .flatten()
            .as_deref(),
        Some("orders:8080")
    );
    assert!(BalanceLayer::builder().endpoints(["a:0"]).build().is_err());
}

/// A failing endpoint drawn beside a slow one does not hand it the call: candidates are drawn
/// among endpoints that have not failed lately (the three-instance benchmark found the slow
/// one taking every such pair).
#[tokio::test(start_paused = true)]
async fn a_failing_endpoint_does_not_hand_its_pairs_to_a_slow_one() {
    let slow_calls = Arc::new(Mutex::new(0u32));
    let s = slow_calls.clone();
    let up = service_fn(move |req: Request<()>| {
        let s = s.clone();
        async move {
            let status = match req.uri().authority().unwrap().as_str() {
                "10.0.0.1:80" => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    200
                }
                "10.0.0.2:80" => 503,
                _ => {
                    *s.lock().unwrap() += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    200
                }
            };
            Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
        }
    });
    let layer = builder(3).consecutive_failures(None).build().unwrap();
    let svc = layer.layer(up);
    // Let every endpoint be measured once, then count.
    for _ in 0..30 {
        let _ = svc.clone().oneshot(get()).await;
    }
    let before = *slow_calls.lock().unwrap();
    for _ in 0..300 {
        let _ = svc.clone().oneshot(get()).await;
    }
    let slow = *slow_calls.lock().unwrap() - before;
    assert!(slow <= 3, "the slow endpoint took {slow} of 300 calls");
}
