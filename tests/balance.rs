//! The seed's gateway scenarios with the balanced client stack: two instances of one service
//! over real loopback sockets, one of them misbehaving, on paused time. nginx, configured as
//! the seed configures it, answers every client in the first three (issue 19's table); the
//! balanced stack must answer at least 99.9 %.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use steadfast::client::HttpClientLayer;
use steadfast_testkit::{Fault, FaultServer};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

const CALLS: usize = 2000;

/// The client stack for the service `orders`, balanced over `endpoints`.
fn stack(endpoints: &[String]) -> HttpClientLayer {
    steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .balance(|b| b.endpoints(endpoints).seed(19))
        .build()
        .unwrap()
}

/// The client stack for the service `orders`, its endpoints from a discovery source.
fn discovered() -> HttpClientLayer {
    steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .balance(|b| b.seed(7))
        .build()
        .unwrap()
}

/// Sends `n` GETs through `layer`, each of which must get a 200.
async fn all_ok(layer: &HttpClientLayer, n: usize) {
    let client = layer.layer(support::transport::<Full<Bytes>>());
    for _ in 0..n {
        let res = client.clone().oneshot(order()).await.unwrap();
        assert_eq!(res.status(), 200);
    }
}

fn order() -> Request<Full<Bytes>> {
    Request::get("http://orders/orders/7")
        .body(Full::default())
        .unwrap()
}

/// Sends `CALLS` GETs one after another; returns how many got a 200.
async fn run(layer: &HttpClientLayer) -> usize {
    let client = layer.layer(support::transport::<Full<Bytes>>());
    let mut ok = 0;
    for _ in 0..CALLS {
        if let Ok(res) = client.clone().oneshot(order()).await {
            ok += usize::from(res.status() == 200);
        }
    }
    ok
}

fn assert_at_least_999_per_mille(ok: usize, what: &str) {
    assert!(
        ok * 1000 >= CALLS * 999,
        "{what}: {ok} of {CALLS} calls succeeded"
    );
}

/// An address on which nothing listens: connections are refused.
async fn refusing() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}

#[tokio::test(start_paused = true)]
async fn one_instance_answering_503_to_half_its_calls() {
    let (good, bad) = (FaultServer::start().await, FaultServer::start().await);
    bad.script((0..CALLS).map(|i| Fault::status(if i % 2 == 0 { 503 } else { 200 })));
    let layer = stack(&[good.addr().to_string(), bad.addr().to_string()]);
    let ok = run(&layer).await;
    assert_at_least_999_per_mille(ok, "503 half the time");
    // The failing instance was tried, and lost its share.
    assert!(
        bad.hits() > 0 && bad.hits() < CALLS / 10,
        "bad saw {}",
        bad.hits()
    );
}

#[tokio::test(start_paused = true)]
async fn one_instance_refusing_connections() {
    let good = FaultServer::start().await;
    let layer = stack(&[good.addr().to_string(), refusing().await]);
    let ok = run(&layer).await;
    assert_at_least_999_per_mille(ok, "refused");
}

#[tokio::test(start_paused = true)]
async fn one_instance_hanging() {
    let (good, bad) = (FaultServer::start().await, FaultServer::start().await);
    bad.set_default(Fault::Hang);
    let layer = stack(&[good.addr().to_string(), bad.addr().to_string()]);
    let ok = run(&layer).await;
    assert_at_least_999_per_mille(ok, "hanging");
    assert!(
        bad.hits() < 20,
        "the hanging instance got {} calls",
        bad.hits()
    );
}

/// Both instances close every connection for 15 s, then come back. The per-endpoint
/// breakers open during the outage; the first success comes at their first probe after the
/// recovery: with breakers that probe every 5 s, within 5 s of it (nginx, probing every
/// `fail_timeout` = 10 s, took 6.5 s), and with the defaults (open 30 s, the seed's) at the
/// first probe, 30 s after the trip. The bounds allow for when in the first second the
/// breakers trip, and for the trickle's 100 ms steps.
#[tokio::test(start_paused = true)]
async fn both_instances_down_15_s_then_back() {
    for (probe_every, latest) in [
        (Some(Duration::from_secs(5)), Duration::from_secs(21)),
        (None, Duration::from_millis(31_500)),
    ] {
        let (a, b) = (FaultServer::start().await, FaultServer::start().await);
        for s in [&a, &b] {
            s.windows([(Duration::from_secs(15), Fault::Close)]);
        }
        let started = Instant::now();
        let endpoints = [a.addr().to_string(), b.addr().to_string()];
        let layer = steadfast::client::http()
            .attempt_timeout(Duration::from_secs(1))
            .total_timeout(Duration::from_secs(3))
            .balance(|b| b.endpoints(&endpoints).seed(19))
            .breaker(|b| match probe_every {
                Some(d) => b.open_time(d).max_open_time(d),
                None => b,
            })
            .build()
            .unwrap();
        let client = layer.layer(support::transport::<Full<Bytes>>());
        let mut first_success = None;
        // One call every 100 ms, as a steady trickle of users would send.
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(res) = client.clone().oneshot(order()).await {
                if res.status() == 200 {
                    first_success = Some(started.elapsed());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let at = first_success.expect("a success within a minute");
        assert!(at >= Duration::from_secs(15), "{at:?}");
        assert!(
            at <= latest,
            "probing every {probe_every:?}: first success {at:?} after a recovery at 15 s"
        );
    }
}

/// Endpoints from Consul's health API (a testkit server that follows its documented protocol:
/// no Consul agent can be installed here): instances join, stop passing their checks, and
/// the agent goes away, while calls run; the set follows, and stays when the agent is gone.
#[tokio::test(start_paused = true)]
async fn endpoints_follow_consul_while_calls_run() {
    use steadfast::balance::Consul;
    use steadfast_testkit::{ConsulInstance, ConsulServer};

    let consul = ConsulServer::start().await;
    let (a, b, c) = (
        FaultServer::start().await,
        FaultServer::start().await,
        FaultServer::start().await,
    );
    consul.set(
        "orders",
        vec![
            ConsulInstance::passing(a.addr()),
            ConsulInstance::passing(b.addr()),
            ConsulInstance::failing(c.addr()),
        ],
    );
    let layer = discovered();
    let source = Consul::new(&format!("http://{}", consul.addr()), "orders")
        .unwrap()
        .wait(Duration::from_secs(30));
    let follower = layer.endpoints().follow_consul(source);
    // Until the first answer arrives, the set is empty.
    while layer.endpoints().list().len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    all_ok(&layer, 100).await;
    assert!(a.hits() > 10 && b.hits() > 10, "{} {}", a.hits(), b.hits());
    assert_eq!(c.hits(), 0, "a failing instance is never called");

    // b stops passing, c starts: the blocked query answers at once.
    consul.set(
        "orders",
        vec![
            ConsulInstance::passing(a.addr()),
            ConsulInstance::failing(b.addr()),
            ConsulInstance::passing(c.addr()),
        ],
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b_before = b.hits();
    all_ok(&layer, 100).await;
    assert_eq!(b.hits(), b_before);
    assert!(c.hits() > 10, "c got {}", c.hits());

    // The agent goes away: the set stays, calls keep working.
    let queries = consul.queries();
    drop(consul);
    tokio::time::sleep(Duration::from_secs(60)).await;
    all_ok(&layer, 50).await;
    assert_eq!(layer.endpoints().list().len(), 2);
    assert!(queries >= 2);
    follower.abort();
}

/// Endpoints from DNS (a small authoritative server on 127.0.0.1 whose records the test
/// changes): SRV records name the instances; one leaves and another joins while calls run,
/// each change seen once the answer's TTL runs out; a name that stops resolving leaves the
/// set as it was.
#[tokio::test(start_paused = true)]
async fn endpoints_follow_dns_srv_records_on_their_ttl() {
    use steadfast::balance::Dns;
    use steadfast_testkit::DnsServer;

    let dns = DnsServer::start().await;
    let (a, b, c) = (
        FaultServer::start().await,
        FaultServer::start().await,
        FaultServer::start().await,
    );
    // Instances that take a millisecond, as real ones do (paused time would make every
    // latency zero, and every load estimate equal).
    for s in [&a, &b, &c] {
        s.set_default(Fault::status(200).after(Duration::from_millis(1)));
    }
    let localhost = ["127.0.0.1".parse().unwrap()];
    for name in ["a.orders.test", "b.orders.test", "c.orders.test"] {
        dns.set_addresses(name, &localhost, 60);
    }
    let srv = "_http._tcp.orders.test";
    dns.set_services(
        srv,
        &[
            (a.addr().port(), "a.orders.test"),
            (b.addr().port(), "b.orders.test"),
        ],
        5,
    );
    let layer = discovered();
    let source = Dns::services(srv)
        .unwrap()
        .name_servers([dns.addr()])
        .ttl_bounds(Duration::from_secs(1), Duration::from_secs(60))
        .unwrap();
    let follower = layer.endpoints().follow_dns(source);
    while layer.endpoints().list().len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    all_ok(&layer, 100).await;
    assert!(a.hits() > 10 && b.hits() > 10, "{} {}", a.hits(), b.hits());

    // b leaves, c joins; seen when the 5 s TTL runs out, not before.
    dns.set_services(
        srv,
        &[
            (a.addr().port(), "a.orders.test"),
            (c.addr().port(), "c.orders.test"),
        ],
        5,
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let b_before = b.hits();
    all_ok(&layer, 100).await;
    assert_eq!(b.hits(), b_before, "b left the records");
    assert!(c.hits() > 10, "c got {}", c.hits());

    // The name stops resolving: the set stays.
    dns.set_services(srv, &[], 5);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(layer.endpoints().list().len(), 2);
    all_ok(&layer, 20).await;
    assert!(dns.queries() >= 3);
    follower.abort();
}

/// A and AAAA records of a name, each with the given port.
#[tokio::test(start_paused = true)]
async fn endpoints_follow_dns_addresses() {
    use steadfast::balance::Dns;
    use steadfast_testkit::DnsServer;

    let dns = DnsServer::start().await;
    dns.set_addresses("orders.test", &["10.0.0.1".parse().unwrap()], 2);
    let layer = steadfast::balance::BalanceLayer::builder().build().unwrap();
    let follower = layer.handle().follow_dns(
        Dns::addresses("orders.test", 8080)
            .unwrap()
            .name_servers([dns.addr()]),
    );
    let names = |l: &steadfast::balance::BalanceLayer| -> Vec<String> {
        l.handle()
            .list()
            .iter()
            .map(|e| e.authority.to_string())
            .collect()
    };
    while names(&layer).is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(names(&layer), ["10.0.0.1:8080"]);
    dns.set_addresses(
        "orders.test",
        &["10.0.0.1".parse().unwrap(), "fd00::2".parse().unwrap()],
        2,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(names(&layer), ["10.0.0.1:8080", "[fd00::2]:8080"]);
    follower.abort();
}

/// One of two instances always answers 503, for five minutes at ten calls a second: its
/// breaker opens and re-opens, the balancer ejects it again and again, and no call is lost to
/// its open breaker (a hostile pass found one in 170 there: the refusal was final).
#[tokio::test(start_paused = true)]
async fn an_instance_whose_breaker_is_open_loses_no_call() {
    let (good, bad) = (FaultServer::start().await, FaultServer::start().await);
    bad.set_default(Fault::status(503));
    let layer = stack(&[good.addr().to_string(), bad.addr().to_string()]);
    let client = layer.layer(support::transport::<Full<Bytes>>());
    let mut failed = Vec::new();
    for i in 0..3000 {
        match client.clone().oneshot(order()).await {
            Ok(res) if res.status() == 200 => {}
            other => failed.push((i, other.map(|r| r.status()).map_err(|e| e.to_string()))),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// An operator closing an instance's breaker by hand sees it take calls again within the
/// balancer's failure penalty (2 s): a refusal by the breaker does not eject the instance
/// (it did, and the instance then stayed out for the ejection time, 30 s and growing).
#[tokio::test(start_paused = true)]
async fn an_instance_whose_breaker_is_closed_by_hand_takes_calls_within_the_penalty() {
    let (a, b) = (FaultServer::start().await, FaultServer::start().await);
    let layer = stack(&[a.addr().to_string(), b.addr().to_string()]);
    let b_key = Some(b.addr().to_string().parse().unwrap());
    layer.breakers().handle(&b_key).force_open();
    all_ok(&layer, 200).await;
    assert_eq!(b.hits(), 0, "a forced-open breaker lets nothing through");
    let status = layer.endpoints().list();
    assert!(
        status.iter().all(|e| !e.ejected) && status.iter().any(|e| e.refusing),
        "refused, not ejected: {status:?}"
    );
    layer.breakers().handle(&b_key).close();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    all_ok(&layer, 200).await;
    assert!(
        b.hits() >= 50,
        "b took {} of 200 calls after its breaker was closed",
        b.hits()
    );
}

/// Consul answering with no passing instance empties the set, as documented: calls then fail
/// at once with `NoEndpoint`, sending nothing; a passing instance brings them back.
#[tokio::test(start_paused = true)]
async fn no_passing_instance_in_consul_empties_the_set() {
    use steadfast::balance::Consul;
    use steadfast::balance::error::NoEndpoint;
    use steadfast_testkit::{ConsulInstance, ConsulServer};

    let consul = ConsulServer::start().await;
    let a = FaultServer::start().await;
    consul.set("orders", vec![ConsulInstance::passing(a.addr())]);
    let layer = discovered();
    let follower = layer.endpoints().follow_consul(
        Consul::new(&format!("http://{}", consul.addr()), "orders")
            .unwrap()
            .wait(Duration::from_secs(30)),
    );
    while layer.endpoints().list().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    all_ok(&layer, 5).await;
    consul.set("orders", vec![ConsulInstance::failing(a.addr())]);
    while !layer.endpoints().list().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hits = a.hits();
    let client = layer.layer(support::transport::<Full<Bytes>>());
    let err = client.clone().oneshot(order()).await.unwrap_err();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
    let mut found = false;
    while let Some(e) = cause {
        found |= e
            .downcast_ref::<NoEndpoint>()
            .is_some_and(NoEndpoint::is_empty_set);
        cause = e.source();
    }
    assert!(found, "{err}");
    assert_eq!(a.hits(), hits, "nothing sent");
    consul.set("orders", vec![ConsulInstance::passing(a.addr())]);
    while layer.endpoints().list().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    all_ok(&layer, 5).await;
    follower.abort();
}

/// A POST whose body is over the replay cap (100 KiB against 64 KiB) reaches the healthy
/// instance whole when the other's breaker refuses it, or when the other refuses the
/// connection: nothing of it was read, so the retry takes it over (a hostile pass found
/// these calls failing with `Rerouted`).
#[tokio::test(start_paused = true)]
async fn a_large_body_refused_before_it_was_read_reaches_another_instance_whole() {
    let healthy = FaultServer::start().await;
    let body: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    let want = steadfast_testkit::hash_body(&body);
    for down in ["breaker", "connection"] {
        let (refusing, forced) = match down {
            "breaker" => {
                let s = FaultServer::start().await;
                (s.addr().to_string(), Some(s))
            }
            _ => (refusing().await, None),
        };
        let layer = steadfast::client::http()
            .balance(|b| {
                b.endpoints([refusing.clone(), healthy.addr().to_string()])
                    .seed(2)
            })
            .build()
            .unwrap();
        if forced.is_some() {
            layer
                .breakers()
                .handle(&Some(refusing.parse().unwrap()))
                .force_open();
        }
        let client = layer.hyper_client::<Full<Bytes>>();
        let before = healthy.received().len();
        for _ in 0..10 {
            let req = Request::post("http://orders/orders")
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap();
            let res = client.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), 200, "{down}");
        }
        let got = &healthy.received()[before..];
        assert_eq!(
            got.len(),
            10,
            "{down}: every call reached the healthy instance once"
        );
        assert!(
            got.iter()
                .all(|r| r.body_complete && r.body_len == body.len() && r.body_hash == want),
            "{down}: every body whole"
        );
        if let Some(s) = forced {
            assert_eq!(s.hits(), 0, "the forced-open instance got nothing");
        }
    }
}
