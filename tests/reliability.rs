//! The reliability suite: the standard client stack against a fault-injecting upstream over
//! real loopback sockets, on paused time. Bounded in count and (virtual) time.
//!
//! 1. amplification at 100 % and at 5 % failure
//! 2. recovery after an outage, no call outliving the total timeout
//! 3. no duplicated POST across every fault type
//! 4. a hanging upstream: every call returns by the total timeout, nothing leaks
//! 5. resets and slow bodies: replay stays byte-identical, or no retry happens
//! 6. deadlines across three hops (see also `tests/timeout.rs`)

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use steadfast::breaker::error::BreakerOpen;
use steadfast::client::{HttpClient, HttpClientLayer};
use steadfast::timeout::error::Elapsed;
use steadfast_testkit::{Fault, FaultServer, hash_body};
use support::{Transport, get_from as get, transport};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

fn stack() -> HttpClientLayer {
    steadfast::client::http()
        .attempt_timeout(Duration::from_secs(1))
        .total_timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

fn client(layer: &HttpClientLayer) -> HttpClient<Transport<Full<Bytes>>> {
    layer.layer(transport())
}

// ---- 1. amplification ----

#[tokio::test(start_paused = true)]
async fn amplification_at_total_failure_is_bounded() {
    let server = FaultServer::start().await;
    server.set_default(Fault::status(503));
    // Retry alone (the breaker would stop the storm by itself; here the budget must): 10
    // waves of 100 concurrent requests.
    let retry = steadfast::retry::RetryLayer::new();
    let http = transport::<Full<Bytes>>();
    let start = Instant::now();
    for _ in 0..10 {
        let mut wave = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let svc = retry.layer(http.clone());
            let req = get(&server);
            wave.spawn(async move { svc.oneshot(req).await.unwrap().status() });
        }
        wave.join_all().await;
    }
    let hits = server.hits() as f64;
    let floor = 100.0 + 10.0 * start.elapsed().as_secs_f64();
    assert!(
        hits <= 1.1 * 1000.0 + floor,
        "{hits} attempts for 1000 requests (floor {floor})"
    );

    // The whole stack: the breaker opens and the storm stops even sooner.
    let server = FaultServer::start().await;
    server.set_default(Fault::status(503));
    let layer = stack();
    let svc = client(&layer);
    for _ in 0..1000 {
        let _ = svc.clone().oneshot(get(&server)).await;
    }
    assert!(
        server.hits() < 100,
        "the breaker cut it to {}",
        server.hits()
    );
}

#[tokio::test(start_paused = true)]
async fn at_five_percent_failure_success_matches_unbudgeted_retry() {
    async fn success_rate(budgeted: bool) -> f64 {
        let server = FaultServer::start().await;
        // Every 20th request the upstream sees fails: 5 %.
        let faults = (0..3000).map(|i| {
            if i % 20 == 7 {
                Fault::status(503)
            } else {
                Fault::status(200)
            }
        });
        server.script(faults);
        let policy = steadfast::retry::RetryLayer::builder().seed(5);
        let policy = if budgeted {
            policy
        } else {
            policy.budget(None)
        };
        let retry = policy.build().unwrap();
        let http = transport::<Full<Bytes>>();
        let mut ok = 0;
        for _ in 0..1000 {
            let res = retry
                .layer(http.clone())
                .oneshot(get(&server))
                .await
                .unwrap();
            ok += u32::from(res.status() == 200);
        }
        f64::from(ok) / 10.0
    }
    let with_budget = success_rate(true).await;
    let without = success_rate(false).await;
    assert!(
        (without - with_budget).abs() <= 1.0,
        "{with_budget}% vs {without}%"
    );
    assert!(with_budget >= 99.0);
}

// ---- 2. recovery ----

#[tokio::test(start_paused = true)]
async fn recovery_after_an_outage() {
    let server = FaultServer::start().await;
    // Down (503) for the first 20 s, then healthy.
    server.windows([(Duration::from_secs(20), Fault::status(503))]);
    let layer = stack();
    let svc = client(&layer);
    let key = Some(format!("{}", server.addr()).parse().unwrap());
    let mut rejected_while_open = 0;
    let mut recovered = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        let began = Instant::now();
        let hits_before = server.hits();
        let open_before =
            layer.breakers().handle(&key).state() == steadfast::breaker::BreakerState::Open;
        let out = svc.clone().oneshot(get(&server)).await;
        assert!(
            began.elapsed() <= Duration::from_secs(3),
            "no call outlives the total timeout"
        );
        match out {
            Ok(res) if res.status() == 200 => recovered += 1,
            Ok(_) => {}
            Err(e) if e.downcast_ref::<BreakerOpen>().is_some() => {
                if open_before {
                    assert_eq!(
                        server.hits(),
                        hits_before,
                        "rejected without network traffic"
                    );
                    rejected_while_open += 1;
                }
            }
            Err(e) => panic!("unexpected error {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(rejected_while_open > 10, "the breaker opened and shed load");
    assert!(
        recovered > 100,
        "requests succeed after recovery ({recovered})"
    );
    assert_eq!(
        layer.breakers().handle(&key).state(),
        steadfast::breaker::BreakerState::Closed
    );
}

// ---- 3. no duplicated POST ----

#[tokio::test(start_paused = true)]
async fn a_post_without_idempotency_key_is_never_received_twice() {
    let faults = [
        Fault::status(503),
        Fault::status(502),
        Fault::status(504),
        Fault::status(429),
        Fault::status_with(503, "retry-after", "1"),
        Fault::Hang,
        Fault::Close,
        Fault::ResetMidBody,
        Fault::status(200).after(Duration::from_secs(2)),
        Fault::SlowBody {
            chunks: 10,
            chunk: 10,
            interval: Duration::from_millis(500),
        },
    ];
    for fault in faults {
        let server = FaultServer::start().await;
        server.set_default(fault.clone());
        let svc = client(&stack());
        let req = Request::post(server.url("/orders"))
            .body(Full::new(Bytes::from_static(b"{\"qty\":1}")))
            .unwrap();
        let _ = svc.oneshot(req).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            server.hits(),
            1,
            "{fault:?}: received {} times",
            server.hits()
        );
    }
}

// ---- 4. hang ----

#[tokio::test(start_paused = true)]
async fn a_hanging_upstream_never_hangs_the_caller_and_nothing_leaks() {
    let server = FaultServer::start().await;
    server.set_default(Fault::Hang);
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    {
        let layer = stack();
        let svc = client(&layer);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (svc, req) = (svc.clone(), get(&server));
            calls.spawn(async move {
                let began = Instant::now();
                let err = svc.oneshot(req).await.unwrap_err();
                (
                    began.elapsed(),
                    err.downcast_ref::<Elapsed>().is_some()
                        || err.downcast_ref::<BreakerOpen>().is_some(),
                )
            });
        }
        for (took, typed) in calls.join_all().await {
            assert!(
                took <= Duration::from_secs(3),
                "returned by the total timeout: {took:?}"
            );
            assert!(typed, "a typed timeout or breaker error");
        }
    }
    // Client gone: its connections close, the server's handlers are dropped.
    for _ in 0..100 {
        if server.open_connections() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.open_connections(), 0, "no connection leaks");
    let tasks_after = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(
        tasks_after <= tasks_before,
        "no task leaks: {tasks_before} -> {tasks_after}"
    );
}

// ---- 5. resets and slow bodies ----

#[tokio::test(start_paused = true)]
async fn replay_is_byte_identical_across_resets_and_slow_request_bodies() {
    let server = FaultServer::start().await;
    // The upstream reads the whole body, then hangs up twice before answering.
    server.script([Fault::Close, Fault::Close]);
    let chunks: Vec<Bytes> = (0..8u8).map(|i| Bytes::from(vec![b'0' + i; 512])).collect();
    let whole: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    // A slow, non-Clone request body: one chunk every 100 ms.
    let stream = futures_util::stream::unfold(chunks.into_iter(), |mut it| async move {
        let c = it.next()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(Frame::data(c)), it))
    });
    let req = Request::put(server.url("/doc"))
        .body(StreamBody::new(stream))
        .unwrap();
    let layer = stack();
    let svc = layer.layer(transport());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = server.received();
    assert_eq!(seen.len(), 3);
    for r in &seen {
        assert!(r.body_complete);
        assert_eq!(
            r.body_hash,
            hash_body(&whole),
            "byte-identical on every attempt"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_response_reset_mid_body_is_not_retried() {
    let server = FaultServer::start().await;
    server.script([Fault::ResetMidBody]);
    let svc = client(&stack());
    let res = svc.oneshot(get(&server)).await.unwrap();
    assert_eq!(res.status(), 200, "the head arrived: committed");
    let body = res.into_body().collect().await;
    assert!(
        body.is_err(),
        "the caller sees the reset: {:?}",
        body.map(|b| b.to_bytes())
    );
    assert_eq!(server.hits(), 1, "no retry after the head arrived");
}

#[tokio::test(start_paused = true)]
async fn a_slow_response_body_is_delivered_not_retried() {
    let server = FaultServer::start().await;
    server.set_default(Fault::SlowBody {
        chunks: 5,
        chunk: 100,
        interval: Duration::from_millis(200),
    });
    let svc = client(&stack());
    let res = svc.oneshot(get(&server)).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 500);
    assert_eq!(server.hits(), 1);
}

// ---- 6. deadlines across hops ----

#[tokio::test(start_paused = true)]
async fn the_edge_deadline_reaches_the_transport() {
    use steadfast::common::Deadline;
    let server = FaultServer::start().await;
    server.set_default(Fault::Hang);
    let svc = client(&stack());
    let deadline = Deadline::after(Duration::from_millis(700));
    let began = Instant::now();
    let err = deadline.scope(svc.oneshot(get(&server))).await.unwrap_err();
    let e = err.downcast_ref::<Elapsed>().expect("elapsed");
    assert!(e.is_inherited());
    assert_eq!(began.elapsed(), Duration::from_millis(700));
    let budget: u64 = server.received()[0].headers["x-request-timeout-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(budget <= 700, "the upstream was told {budget} ms");
}
