//! Hostile pass on the four fixes of f897fee through real hyper / tonic transports on
//! 127.0.0.1: a caller-written budget as a whole-call deadline, a repeated deadline header
//! leaving as one value, superseded request bodies, pushback with leading zeros.
#![allow(clippy::type_complexity)]

mod support;

use support::serve;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use steadfast::common::{BoxError, Deadline};
use steadfast::retry::{Backoff, HedgeDelay, HedgeLayer, RetryLayer};
use steadfast::timeout::TimeoutLayer;
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};

const GUARD: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------
// A recording upstream.
// ---------------------------------------------------------------------------------------

type Outcome = Result<(Vec<u8>, Option<HeaderMap>), String>;

#[derive(Clone, Debug)]
struct Hit {
    at: Instant,
    headers: HeaderMap,
    body: Arc<Mutex<Option<Outcome>>>,
}

impl Hit {
    fn outcome(&self) -> Option<Outcome> {
        self.body.lock().unwrap().clone()
    }
}

type Hits = Arc<Mutex<Vec<Hit>>>;

struct Plan {
    delay: Duration,
    read_first: bool,
    /// A pause after each body frame read.
    slow: Duration,
    reply: Response<Full<Bytes>>,
}

fn plan(status: u16, delay: Duration) -> Plan {
    Plan {
        delay,
        read_first: true,
        slow: Duration::ZERO,
        reply: Response::builder()
            .status(status)
            .body(Full::default())
            .unwrap(),
    }
}

fn early(status: u16) -> Plan {
    Plan {
        read_first: false,
        ..plan(status, Duration::ZERO)
    }
}

async fn read_all(mut b: Incoming, slow: Duration) -> Outcome {
    let mut data = Vec::new();
    let mut tr = None;
    while let Some(f) = b.frame().await {
        let f = f.map_err(|e| format!("{e:?}"))?;
        match f.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    tr = Some(t);
                }
            }
        }
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
    }
    Ok((data, tr))
}

async fn recorder(script: impl Fn(usize) -> Plan + Send + Sync + 'static) -> (SocketAddr, Hits) {
    let hits: Hits = Arc::default();
    let h = hits.clone();
    let script = Arc::new(script);
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let hits = h.clone();
        let script = script.clone();
        async move {
            let body = Arc::new(Mutex::new(None));
            let n = {
                let mut v = hits.lock().unwrap();
                v.push(Hit {
                    at: Instant::now(),
                    headers: req.headers().clone(),
                    body: body.clone(),
                });
                v.len() - 1
            };
            let plan = script(n);
            let incoming = req.into_body();
            let slow = plan.slow;
            let read = async move {
                let r = read_all(incoming, slow).await;
                *body.lock().unwrap() = Some(r);
            };
            if plan.read_first {
                read.await;
            } else {
                tokio::spawn(read);
            }
            tokio::time::sleep(plan.delay).await;
            Ok::<_, Infallible>(plan.reply)
        }
    });
    (serve(svc).await, hits)
}

fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Every deadline value the upstream was told (either header, every repeat).
fn told_all(h: &Hit, ms_header: &str) -> Vec<(String, Option<Duration>)> {
    let mut v = Vec::new();
    for x in h.headers.get_all("grpc-timeout") {
        let s = x.to_str().unwrap_or("?").to_owned();
        v.push((format!("grpc-timeout: {s}"), parse_grpc_timeout(&s)));
    }
    for x in h.headers.get_all(ms_header) {
        let s = x.to_str().unwrap_or("?").to_owned();
        v.push((
            format!("{ms_header}: {s}"),
            s.parse::<u64>().ok().map(Duration::from_millis),
        ));
    }
    v
}

fn get_req(addr: SocketAddr, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(format!("http://{addr}/"));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Full::default()).unwrap()
}

/// Checks each hit told no more than what is left of `budget` counted from `t0`, and none
/// sent after it.
fn check_told(
    hits: &[Hit],
    t0: Instant,
    budget: Duration,
    ms_header: &str,
    failures: &mut Vec<String>,
) {
    for (i, h) in hits.iter().enumerate() {
        let at = h.at - t0;
        if at >= budget {
            failures.push(format!(
                "attempt {i} sent at {at:?}, past the caller's {budget:?}"
            ));
        }
        let left = budget.saturating_sub(at);
        for (what, d) in told_all(h, ms_header) {
            if d.is_none_or(|d| d > left + Duration::from_millis(1)) {
                failures.push(format!(
                    "attempt {i} at {at:?}: told `{what}`, {left:?} left of the caller's {budget:?}"
                ));
            }
        }
    }
}

fn hedge(delay_ms: u64) -> HedgeLayer {
    HedgeLayer::builder()
        .delay(HedgeDelay::Fixed(Duration::from_millis(delay_ms)))
        .max_extra_load(1.0)
        .build()
        .unwrap()
}

fn retry(n: u32) -> RetryLayer {
    RetryLayer::builder()
        .max_attempts(n)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .budget(None)
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// 1. A caller-written budget is a deadline for the whole call.
// ---------------------------------------------------------------------------------------

/// Promise (crates/steadfast-timeout/src/layer.rs, TimeoutLayer): the limit is the smallest
/// of ... "a budget the caller wrote on the request ... The last two are deadlines for the
/// whole call: a retry below sends no attempt past them, and each attempt is told what is
/// left." README Semantics: "A budget the caller wrote on an outgoing request ... is a
/// deadline for the whole call, retries included". Stack: Hedge(300 ms) -> Timeout(5 s) ->
/// hyper. The caller writes `x-request-timeout-ms: 1000`; the upstream hangs.
/// Expect: the call ends by 1 s; the hedged attempt (sent at 300 ms) is told <= 700 ms.
#[tokio::test(start_paused = true)]
async fn hedge_above_a_timeout_keeps_the_caller_budget_for_the_hedged_attempt() {
    let (up, hits) = recorder(|n| {
        if n < 4 {
            plan(200, Duration::ZERO)
        } else {
            plan(200, GUARD)
        }
    })
    .await;
    let svc = ServiceBuilder::new()
        .layer(hedge(300))
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .service(support::transport::<Full<Bytes>>());
    for _ in 0..4 {
        svc.clone().oneshot(get_req(up, &[])).await.unwrap();
    }
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        GUARD,
        svc.oneshot(get_req(up, &[("x-request-timeout-ms", "1000")])),
    )
    .await
    .unwrap();
    let took = t0.elapsed();
    let hits: Vec<Hit> = hits.lock().unwrap()[4..].to_vec();
    let mut failures = Vec::new();
    check_told(
        &hits,
        t0,
        Duration::from_secs(1),
        "x-request-timeout-ms",
        &mut failures,
    );
    if took > Duration::from_millis(1001) {
        failures.push(format!(
            "call ended after {took:?} ({} attempts): {:?}",
            hits.len(),
            r.map(|r| r.status())
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise: as above (TimeoutLayer docs; README Semantics), and the commit's "It is read
/// only where no steadfast client layer above is calling with a deadline in hand". Inside
/// a server handler an ambient 30 s deadline holds (here `Deadline::scope`, as the server
/// layer sets it). Stack: Hedge(300 ms) -> Timeout(5 s) -> hyper; the caller writes
/// `x-request-timeout-ms: 1000`, the upstream hangs.
/// Expect: the call ends by 1 s (the caller's 1 s is smaller than 30 s and 5 s).
#[tokio::test(start_paused = true)]
async fn hedge_under_an_ambient_deadline_keeps_the_caller_budget() {
    let (up, hits) = recorder(|n| {
        if n < 4 {
            plan(200, Duration::ZERO)
        } else {
            plan(200, GUARD)
        }
    })
    .await;
    let svc = ServiceBuilder::new()
        .layer(hedge(300))
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .service(support::transport::<Full<Bytes>>());
    for _ in 0..4 {
        svc.clone().oneshot(get_req(up, &[])).await.unwrap();
    }
    let t0 = Instant::now();
    let call = svc.oneshot(get_req(up, &[("x-request-timeout-ms", "1000")]));
    let r = tokio::time::timeout(GUARD, Deadline::after(Duration::from_secs(30)).scope(call))
        .await
        .unwrap();
    let took = t0.elapsed();
    let hits: Vec<Hit> = hits.lock().unwrap()[4..].to_vec();
    let mut failures = Vec::new();
    check_told(
        &hits,
        t0,
        Duration::from_secs(1),
        "x-request-timeout-ms",
        &mut failures,
    );
    if took > Duration::from_millis(1001) {
        failures.push(format!(
            "call ended after {took:?} ({} attempts): {:?}",
            hits.len(),
            r.map(|r| r.status())
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise (README Semantics; commit: the budget "is now a deadline for the whole call,
/// retries included ... in the Retry layer"). Stack: Retry(3) -> hyper, no timeout at
/// all. Upstream: 400 ms then 503. Caller writes `x-request-timeout-ms: 1000`.
/// Expect: no attempt sent past 1 s and no attempt told more than what is left.
#[tokio::test(start_paused = true)]
async fn retry_alone_tells_each_attempt_no_more_than_is_left() {
    let (up, hits) = recorder(|_| plan(503, Duration::from_millis(400))).await;
    let svc = retry(3).layer(support::transport::<Full<Bytes>>());
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        GUARD,
        svc.oneshot(get_req(up, &[("x-request-timeout-ms", "1000")])),
    )
    .await
    .unwrap();
    let hits = hits.lock().unwrap().clone();
    let mut failures = Vec::new();
    check_told(
        &hits,
        t0,
        Duration::from_secs(1),
        "x-request-timeout-ms",
        &mut failures,
    );
    assert!(
        failures.is_empty(),
        "{failures:#?} (result {:?}, took {:?})",
        r.map(|r| r.status()),
        t0.elapsed()
    );
}

/// Promise (TimeoutLayer docs): "a budget the caller wrote on the request (`grpc-timeout`
/// ... or the deadline header ...)" is a deadline for the whole call; the deadline header
/// is configurable (`TimeoutBuilder::deadline_header`), and a retry reads a renamed one
/// only through a timeout above it ("A retry with no timeout above it reads `grpc-timeout`
/// and `x-request-timeout-ms`"). Stack: Timeout(10 s, header `x-deadline`) -> Retry(3) ->
/// Timeout(5 s, header `x-deadline`) -> hyper. Upstream: 600 ms then 503. Caller writes
/// `x-deadline: 1000`.
/// Expect: the call ends by 1 s; attempts told no more than what is left. (Found failing
/// without the total timeout above: the retry cannot know the renamed header.)
#[tokio::test(start_paused = true)]
async fn retry_over_a_timeout_with_a_custom_deadline_header_keeps_one_deadline() {
    let (up, hits) = recorder(|_| plan(503, Duration::from_millis(600))).await;
    let timeout = |limit| {
        TimeoutLayer::builder()
            .limit(limit)
            .deadline_header(http::HeaderName::from_static("x-deadline"))
            .build()
            .unwrap()
    };
    let svc = timeout(Duration::from_secs(10)).layer(
        retry(3).layer(timeout(Duration::from_secs(5)).layer(support::transport::<Full<Bytes>>())),
    );
    let t0 = Instant::now();
    let r = tokio::time::timeout(GUARD, svc.oneshot(get_req(up, &[("x-deadline", "1000")])))
        .await
        .unwrap();
    let took = t0.elapsed();
    let hits = hits.lock().unwrap().clone();
    let mut failures = Vec::new();
    check_told(
        &hits,
        t0,
        Duration::from_secs(1),
        "x-deadline",
        &mut failures,
    );
    if took > Duration::from_millis(1001) {
        failures.push(format!(
            "call ended after {took:?} ({} attempts): {:?}",
            hits.len(),
            r.map(|r| r.status())
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise (TimeoutLayer docs): "a retry below sends no attempt past them, and each attempt
/// is told what is left". Stacks: Retry -> Timeout(5 s) -> hyper and Timeout(10 s) -> Retry
/// -> hyper. Upstream 600 ms then 503; caller `x-request-timeout-ms: 1000`.
/// Expect: ends by 1 s, each attempt told no more than is left.
#[tokio::test(start_paused = true)]
async fn retry_and_timeout_in_both_orders_keep_the_caller_budget() {
    let mut failures = Vec::new();
    for order in ["retry>timeout", "timeout>retry"] {
        let (up, hits) = recorder(|_| plan(503, Duration::from_millis(600))).await;
        let t0 = Instant::now();
        let req = get_req(up, &[("x-request-timeout-ms", "1000")]);
        let r = if order == "retry>timeout" {
            let svc = retry(3).layer(
                TimeoutLayer::new(Duration::from_secs(5))
                    .layer(support::transport::<Full<Bytes>>()),
            );
            tokio::time::timeout(GUARD, svc.oneshot(req)).await.unwrap()
        } else {
            let svc = TimeoutLayer::new(Duration::from_secs(10))
                .layer(retry(3).layer(support::transport::<Full<Bytes>>()));
            tokio::time::timeout(GUARD, svc.oneshot(req)).await.unwrap()
        };
        let took = t0.elapsed();
        let hits = hits.lock().unwrap().clone();
        let mut f = Vec::new();
        check_told(
            &hits,
            t0,
            Duration::from_secs(1),
            "x-request-timeout-ms",
            &mut f,
        );
        if took > Duration::from_millis(1001) {
            f.push(format!(
                "call ended after {took:?} ({} attempts)",
                hits.len()
            ));
        }
        for x in f {
            failures.push(format!(
                "{order}: {x} (result {:?})",
                r.as_ref().map(|r| r.status()).map_err(|e| e.to_string())
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise (README "The stacks": total timeout "10 s, or less if ... a budget the caller
/// wrote on the request ... says so: one deadline for every attempt; written downstream as
/// one grpc-timeout / x-request-timeout-ms"). client::http() over hyper:
/// (a) caller 1000 ms, upstream 600 ms then 503: ends by 1 s, attempts told <= what's left;
/// (b) caller 99000 ms (larger than the 10 s total), upstream hangs: ends by 10 s, never
/// told more than 10 s (nothing lengthened).
#[tokio::test(start_paused = true)]
async fn the_http_preset_honours_a_smaller_caller_budget_and_never_a_larger_one() {
    let mut failures = Vec::new();
    for (asked, delay, status, budget) in [
        (
            "1000",
            Duration::from_millis(600),
            503,
            Duration::from_secs(1),
        ),
        ("99000", GUARD, 200, Duration::from_secs(10)),
    ] {
        let (up, hits) = recorder(move |_| plan(status, delay)).await;
        let svc = steadfast::client::http()
            .build()
            .unwrap()
            .hyper_client::<Full<Bytes>>();
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            GUARD,
            svc.oneshot(get_req(up, &[("x-request-timeout-ms", asked)])),
        )
        .await
        .unwrap();
        let took = t0.elapsed();
        let hits = hits.lock().unwrap().clone();
        let mut f = Vec::new();
        check_told(&hits, t0, budget, "x-request-timeout-ms", &mut f);
        if took > budget + Duration::from_millis(1) {
            f.push(format!(
                "call ended after {took:?} ({} attempts)",
                hits.len()
            ));
        }
        match &r {
            Err(e) => {
                let el =
                    std::iter::successors(Some(&**e as &(dyn std::error::Error + 'static)), |e| {
                        e.source()
                    })
                    .find_map(|e| e.downcast_ref::<steadfast::timeout::error::Elapsed>());
                if asked == "1000" && status == 503 {
                    // 503 answers: the final outcome may be the 503 or a timeout.
                } else if el.is_none() {
                    f.push(format!("error is not an Elapsed: {e}"));
                }
            }
            Ok(resp) if asked == "99000" => f.push(format!("hung upstream answered {resp:?}")),
            Ok(_) => {}
        }
        for x in f {
            failures.push(format!("caller {asked} ms: {x}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise (README Semantics): "A budget the caller wrote on an outgoing request
/// (`grpc-timeout` ... or `x-request-timeout-ms`) is a deadline for the whole call"; "a
/// budget only ever shrinks". An HTTP request through client::http() carries both
/// `grpc-timeout: 99S` and `x-request-timeout-ms: 300`; the upstream hangs.
/// Expect: the call ends by 300 ms (both are budgets the caller wrote; the smaller must
/// not be lengthened by the other).
#[tokio::test(start_paused = true)]
async fn both_caller_headers_the_smaller_budget_counts() {
    let (up, hits) = recorder(|_| plan(200, GUARD)).await;
    let svc = steadfast::client::http()
        .build()
        .unwrap()
        .hyper_client::<Full<Bytes>>();
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        GUARD,
        svc.oneshot(get_req(
            up,
            &[("grpc-timeout", "99S"), ("x-request-timeout-ms", "300")],
        )),
    )
    .await
    .unwrap();
    let took = t0.elapsed();
    let n = hits.lock().unwrap().len();
    assert!(
        took <= Duration::from_millis(301),
        "call ended after {took:?} ({n} attempts), caller asked 300 ms: {:?}",
        r.map(|r| r.status()).map_err(|e| e.to_string())
    );
}

/// Promise (README Semantics): "A `grpc-timeout` of zero is a deadline already passed;
/// malformed ones are ignored"; TimeoutLayer docs: "A deadline that has already passed
/// fails the call at once without sending anything"; "No configuration value panics,
/// however absurd". Through client::http(): zero budgets send nothing and fail with an
/// inherited `Elapsed`; malformed / huge ones are ignored or capped (call succeeds, told
/// <= 10 s, exactly one value of each header).
#[tokio::test(start_paused = true)]
async fn zero_malformed_and_huge_caller_budgets() {
    let mut failures = Vec::new();
    let cases: Vec<(Vec<(&str, &str)>, bool)> = vec![
        (vec![("x-request-timeout-ms", "0")], true),
        (vec![("grpc-timeout", "0m")], true),
        (vec![("grpc-timeout", "0n"), ("grpc-timeout", "5S")], true),
        (vec![("grpc-timeout", "99999999H")], false),
        (vec![("grpc-timeout", "100000000H")], false),
        (
            vec![("x-request-timeout-ms", "18446744073709551615")],
            false,
        ),
        (
            vec![("x-request-timeout-ms", "99999999999999999999999")],
            false,
        ),
        (vec![("x-request-timeout-ms", "-5")], false),
        (vec![("x-request-timeout-ms", " 5")], false),
        (vec![("grpc-timeout", "5")], false),
        (vec![("grpc-timeout", "1x")], false),
        (
            vec![
                ("x-request-timeout-ms", "abc"),
                ("x-request-timeout-ms", "99999999999"),
            ],
            false,
        ),
    ];
    for (headers, zero) in cases {
        let (up, hits) = recorder(|_| plan(200, Duration::ZERO)).await;
        let svc = steadfast::client::http()
            .build()
            .unwrap()
            .hyper_client::<Full<Bytes>>();
        let t0 = Instant::now();
        let r = tokio::time::timeout(GUARD, svc.oneshot(get_req(up, &headers)))
            .await
            .unwrap();
        let hits = hits.lock().unwrap().clone();
        if zero {
            let inherited = r.as_ref().err().and_then(|e| {
                std::iter::successors(Some(&**e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .find_map(|e| e.downcast_ref::<steadfast::timeout::error::Elapsed>())
                .map(|e| e.is_inherited())
            });
            if !hits.is_empty() || inherited != Some(true) || t0.elapsed() > Duration::ZERO {
                failures.push(format!(
                    "{headers:?}: {} sent, Elapsed inherited {inherited:?}, {:?}",
                    hits.len(),
                    r.map(|r| r.status()).map_err(|e| e.to_string())
                ));
            }
        } else {
            if !r.as_ref().is_ok_and(|r| r.status() == 200) {
                failures.push(format!(
                    "{headers:?}: {:?}",
                    r.map(|r| r.status()).map_err(|e| e.to_string())
                ));
                continue;
            }
            let h = &hits[0];
            let ms = h.headers.get_all("x-request-timeout-ms").iter().count();
            let g = h.headers.get_all("grpc-timeout").iter().count();
            let mut f = Vec::new();
            check_told(
                &hits,
                t0,
                Duration::from_secs(10),
                "x-request-timeout-ms",
                &mut f,
            );
            if ms != 1 || g > 1 || !f.is_empty() {
                failures.push(format!(
                    "{headers:?}: upstream got {:?} {f:?}",
                    told_all(h, "x-request-timeout-ms")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise (README "The stacks": the server preset makes the deadline ambient for the
/// handler; README Semantics: a budget the caller wrote on an outgoing request is a
/// deadline for the whole call "as an inbound one is"). A server::http() handler (inbound
/// `x-request-timeout-ms`) calls a hanging upstream through client::http() with its own
/// `x-request-timeout-ms`. Expect: the handler's call ends by the smaller of the inbound
/// budget and the one it wrote (inbound 30 s / written 300 ms -> 300 ms; inbound 500 ms /
/// written 99 s -> 500 ms), and the upstream is told no more.
#[tokio::test(start_paused = true)]
async fn inside_a_server_handler_the_smaller_of_inbound_and_written_counts() {
    let mut failures = Vec::new();
    for (inbound, written, want) in [("30000", "300", 300u64), ("500", "99000", 500)] {
        let (up, hits) = recorder(|_| plan(200, GUARD)).await;
        let client = steadfast::client::http()
            .build()
            .unwrap()
            .hyper_client::<Full<Bytes>>();
        let took = Arc::new(Mutex::new(None));
        let tk = took.clone();
        let handler = tower::service_fn(move |_req: Request<Incoming>| {
            let client = client.clone();
            let tk = tk.clone();
            async move {
                let t0 = Instant::now();
                let r = client
                    .oneshot(get_req(up, &[("x-request-timeout-ms", written)]))
                    .await;
                *tk.lock().unwrap() = Some((t0, t0.elapsed(), r.is_ok()));
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
            }
        });
        let app = steadfast::server::http().build().unwrap().layer(handler);
        let addr = serve(app).await;
        let r = tokio::time::timeout(
            GUARD,
            support::http_client().request(get_req(addr, &[("x-request-timeout-ms", inbound)])),
        )
        .await
        .unwrap();
        // Let the handler finish (it may be cut by the server's own answer).
        tokio::time::sleep(Duration::from_secs(60)).await;
        let got = *took.lock().unwrap();
        let hits = hits.lock().unwrap().clone();
        let want = Duration::from_millis(want);
        match got {
            Some((t0, d, _)) => {
                let mut f = Vec::new();
                check_told(&hits, t0, want, "x-request-timeout-ms", &mut f);
                if d > want + Duration::from_millis(1) {
                    f.push(format!("handler's call took {d:?}"));
                }
                for x in f {
                    failures.push(format!("inbound {inbound}, written {written}: {x}"));
                }
            }
            None => failures.push(format!(
                "inbound {inbound}, written {written}: handler's call never finished (outer {:?}, {} hits: {:?})",
                r.map(|r| r.status()).map_err(|e| e.to_string()),
                hits.len(),
                hits.first().map(|h| told_all(h, "x-request-timeout-ms"))
            )),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise (README "The stacks" / Semantics): the caller's budget is "one deadline for
/// every attempt"; a balancer below the retry reroutes refused attempts. Stack: Retry(3) ->
/// Timeout(5 s) -> Balance([refused, up]) -> hyper; caller `x-request-timeout-ms: 1000`;
/// `up` answers 600 ms then 503.
/// Expect: ends by 1 s, no attempt sent past it or told more than is left.
#[tokio::test(start_paused = true)]
async fn a_balanced_stack_keeps_the_caller_budget_across_reroutes() {
    let (up, hits) = recorder(|_| plan(503, Duration::from_millis(600))).await;
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let balance = steadfast::balance::BalanceLayer::builder()
        .endpoints([refused.to_string(), up.to_string()])
        .pick(steadfast::balance::Pick::RoundRobin)
        .seed(3)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(retry(3))
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .layer(balance)
        .service(support::transport::<Full<Bytes>>());
    let t0 = Instant::now();
    let req = Request::get("http://svc/")
        .header("x-request-timeout-ms", "1000")
        .body(Full::default())
        .unwrap();
    let r = tokio::time::timeout(GUARD, svc.oneshot(req)).await.unwrap();
    let took = t0.elapsed();
    let hits = hits.lock().unwrap().clone();
    let mut failures = Vec::new();
    check_told(
        &hits,
        t0,
        Duration::from_secs(1),
        "x-request-timeout-ms",
        &mut failures,
    );
    if took > Duration::from_millis(1001) {
        failures.push(format!(
            "call ended after {took:?} ({} attempts): {:?}",
            hits.len(),
            r.map(|r| r.status()).map_err(|e| e.to_string())
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// 2. A repeated deadline header leaves as one value.
// ---------------------------------------------------------------------------------------

/// Promise (README Semantics): "of several, the shortest valid one counts, and a request
/// leaves a client stack with one"; "The stacks": "written downstream as one grpc-timeout /
/// x-request-timeout-ms". client::http(), HTTP and gRPC content types, callers repeating
/// either header with valid / invalid / duplicate values.
/// Expect: the upstream sees at most one value of each deadline header, none more than
/// 10 s nor more than the caller's smallest valid value.
#[tokio::test(start_paused = true)]
async fn a_repeated_deadline_header_leaves_the_http_preset_as_one_value() {
    let mut failures = Vec::new();
    let cases: Vec<(Option<&str>, Vec<(&str, &str)>, Duration)> = vec![
        (None, vec![("grpc-timeout", "99S")], Duration::from_secs(10)),
        (
            None,
            vec![("grpc-timeout", "99S"), ("grpc-timeout", "1S")],
            Duration::from_secs(1),
        ),
        (
            None,
            vec![
                ("x-request-timeout-ms", "99000"),
                ("x-request-timeout-ms", "700"),
            ],
            Duration::from_millis(700),
        ),
        (
            None,
            vec![
                ("x-request-timeout-ms", "x"),
                ("x-request-timeout-ms", "700"),
                ("x-request-timeout-ms", "700"),
            ],
            Duration::from_millis(700),
        ),
        (
            Some("application/grpc"),
            vec![
                ("x-request-timeout-ms", "99000"),
                ("x-request-timeout-ms", "700"),
            ],
            Duration::from_secs(10),
        ),
        (
            Some("application/grpc"),
            vec![
                ("grpc-timeout", "garbage"),
                ("grpc-timeout", "99S"),
                ("grpc-timeout", "1S"),
            ],
            Duration::from_secs(1),
        ),
        (
            Some("application/grpc+proto"),
            vec![("grpc-timeout", "1S"), ("grpc-timeout", "1S")],
            Duration::from_secs(1),
        ),
        (
            Some("application/grpc"),
            vec![
                ("grpc-timeout", "99999999H"),
                ("grpc-timeout", "100000000H"),
            ],
            Duration::from_secs(10),
        ),
    ];
    for (ct, headers, budget) in cases {
        let (up, hits) = recorder(|_| plan(200, Duration::ZERO)).await;
        let svc = steadfast::client::http()
            .build()
            .unwrap()
            .hyper_client::<Full<Bytes>>();
        let mut req = get_req(up, &headers);
        if let Some(ct) = ct {
            req.headers_mut()
                .insert("content-type", ct.parse().unwrap());
        }
        let t0 = Instant::now();
        let r = tokio::time::timeout(GUARD, svc.oneshot(req)).await.unwrap();
        let hits = hits.lock().unwrap().clone();
        let Some(h) = hits.first() else {
            failures.push(format!(
                "{ct:?} {headers:?}: nothing sent: {:?}",
                r.map(|r| r.status()).map_err(|e| e.to_string())
            ));
            continue;
        };
        let mut f = Vec::new();
        check_told(&hits[..1], t0, budget, "x-request-timeout-ms", &mut f);
        for name in ["grpc-timeout", "x-request-timeout-ms"] {
            let n = h.headers.get_all(name).iter().count();
            if n > 1 {
                f.push(format!("{n} values of {name}"));
            }
        }
        if !f.is_empty() {
            failures.push(format!(
                "{ct:?} caller {headers:?}: upstream got {:?}: {f:?}",
                told_all(h, "x-request-timeout-ms")
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise: client::http().deadline_header(name) ("The deadline header an HTTP request's
/// budget is written to"); README: a request leaves the stack with one deadline value, the
/// caller's budget is a deadline for the whole call. Caller repeats `x-deadline` (99000,
/// 500); the upstream hangs.
/// Expect: one `x-deadline` value <= 500 upstream, the call ends by 500 ms.
#[tokio::test(start_paused = true)]
async fn a_custom_deadline_header_repeated_by_the_caller() {
    let (up, hits) = recorder(|_| plan(200, GUARD)).await;
    let svc = steadfast::client::http()
        .deadline_header(http::HeaderName::from_static("x-deadline"))
        .build()
        .unwrap()
        .hyper_client::<Full<Bytes>>();
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        GUARD,
        svc.oneshot(get_req(
            up,
            &[("x-deadline", "99000"), ("x-deadline", "500")],
        )),
    )
    .await
    .unwrap();
    let took = t0.elapsed();
    let hits = hits.lock().unwrap().clone();
    let mut failures = Vec::new();
    check_told(
        &hits,
        t0,
        Duration::from_millis(500),
        "x-deadline",
        &mut failures,
    );
    for h in &hits {
        if h.headers.get_all("x-deadline").iter().count() != 1 {
            failures.push(format!("upstream got {:?}", told_all(h, "x-deadline")));
        }
    }
    if took > Duration::from_millis(501) {
        failures.push(format!(
            "call ended after {took:?}: {:?}",
            r.map(|r| r.status()).map_err(|e| e.to_string())
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// 3. Superseded request bodies.
// ---------------------------------------------------------------------------------------

struct Chan(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>);

impl http_body::Body for Chan {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx)
    }
}

#[derive(Clone, Copy, Debug)]
struct BodyCase {
    h2: bool,
    cap: usize,
    chunks: usize,
    chunk: usize,
    trailers: bool,
    /// The caller's body fails after this many chunks.
    fail_after: Option<usize>,
    attempts: u32,
    /// Hits answered 503 early (before reading) ...
    early_503s: usize,
    /// ... the rest read first (slowly, this much per frame) then 200.
    slow: Duration,
}

fn whole(c: &BodyCase) -> Vec<u8> {
    (0..c.chunks)
        .flat_map(|i| std::iter::repeat_n((i % 251) as u8, c.chunk))
        .collect()
}

async fn run_body_case(c: BodyCase) -> (Result<u16, String>, Vec<Hit>) {
    let early_503s = c.early_503s;
    let slow = c.slow;
    let (up, hits) = recorder(move |n| {
        if n < early_503s {
            early(503)
        } else {
            Plan {
                slow,
                ..plan(200, Duration::ZERO)
            }
        }
    })
    .await;
    let mut b = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    if c.h2 {
        b.http2_only(true);
    }
    let transport: support::Transport<Chan> = b.build_http();
    let svc = RetryLayer::builder()
        .max_attempts(c.attempts)
        .backoff(Backoff::constant(Duration::from_millis(20)))
        .replay_cap(c.cap)
        .budget(None)
        .build()
        .unwrap()
        .layer(transport);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut req = Request::put(format!("http://{up}/"))
        .body(Chan(rx))
        .unwrap();
    if c.trailers {
        // HTTP/1: hyper sends chunked trailers only when the request announces them.
        req.headers_mut()
            .insert("trailer", "x-sum".parse().unwrap());
        req.headers_mut().insert("te", "trailers".parse().unwrap());
    }
    let call = tokio::spawn(svc.oneshot(req));
    let data = whole(&c);
    tokio::spawn(async move {
        for (i, ch) in data.chunks(c.chunk).enumerate() {
            if c.fail_after == Some(i) {
                let _ = tx.send(Err("caller body broke".into())).await;
                return;
            }
            if tx
                .send(Ok(Frame::data(Bytes::copy_from_slice(ch))))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if c.trailers {
            let mut t = HeaderMap::new();
            t.insert("x-sum", "42".parse().unwrap());
            let _ = tx.send(Ok(Frame::trailers(t))).await;
        }
    });
    let r = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("call hung")
        .unwrap()
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"));
    // Let the server finish reading what it will.
    let h = hits.clone();
    support::eventually(|| h.lock().unwrap().iter().all(|x| x.outcome().is_some())).await;
    let hits = hits.lock().unwrap().clone();
    (r, hits)
}

/// Judges a body case: no hit saw a completed body other than the whole one (with its
/// trailers); a caller body that broke completes nowhere; a call whose every retry could be
/// sent whole succeeds.
fn judge(c: &BodyCase, r: &Result<u16, String>, hits: &[Hit], must_succeed: bool) -> Vec<String> {
    let want = whole(c);
    let mut f = Vec::new();
    for (i, h) in hits.iter().enumerate() {
        match h.outcome() {
            Some(Ok((got, tr))) => {
                if c.fail_after.is_some() {
                    f.push(format!(
                        "hit {i}: completed {} bytes of a caller body that broke",
                        got.len()
                    ));
                } else if got != want {
                    f.push(format!("hit {i}: completed body of {} bytes, want {} (truncated/garbled delivered as complete)", got.len(), want.len()));
                } else if c.trailers && tr.as_ref().and_then(|t| t.get("x-sum")).is_none() {
                    f.push(format!("hit {i}: whole data but trailers {tr:?}"));
                }
            }
            Some(Err(_)) => {}
            None => f.push(format!("hit {i}: server never finished reading")),
        }
    }
    if must_succeed && r.as_ref().ok() != Some(&200) {
        f.push(format!(
            "call should succeed: {r:?} after {} hits",
            hits.len()
        ));
    }
    if c.fail_after.is_some() && r.as_ref().ok() == Some(&200) {
        f.push("a broken caller body got 200".into());
    }
    f
}

/// Promise (README Semantics): "Once a retry is decided, the answered attempt before it
/// stops sending its request body (its stream is reset, never ended early)"; replay_cap
/// docs (crates/steadfast-retry/src/layer.rs): "from then on the answered attempt reads no
/// more of it (its stream is reset), and the retry reads on from where it stopped".
/// Streamed PUT bodies under the cap over HTTP/1 and HTTP/2; the server answers 503 early
/// (still reading) N times, then reads whole (fast or slowly) and answers 200; with
/// trailers; with 4 early answers of 5 attempts.
/// Expect: the call succeeds, no hit ever completes a truncated body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_bodies_under_the_cap_are_never_truncated_and_retries_succeed() {
    let base = BodyCase {
        h2: false,
        cap: 64 * 1024,
        chunks: 8,
        chunk: 4096,
        trailers: false,
        fail_after: None,
        attempts: 3,
        early_503s: 2,
        slow: Duration::ZERO,
    };
    let cases = [
        base,
        BodyCase { h2: true, ..base },
        BodyCase {
            h2: true,
            trailers: true,
            ..base
        },
        BodyCase {
            h2: false,
            trailers: true,
            ..base
        },
        BodyCase {
            h2: true,
            attempts: 5,
            early_503s: 4,
            ..base
        },
        BodyCase {
            h2: false,
            attempts: 5,
            early_503s: 4,
            ..base
        },
        BodyCase {
            h2: true,
            slow: Duration::from_millis(3),
            ..base
        },
        BodyCase {
            h2: true,
            chunks: 64,
            chunk: 1024,
            cap: 64 * 1024,
            ..base
        },
    ];
    let mut failures = Vec::new();
    for c in cases {
        let (r, hits) = run_body_case(c).await;
        for x in judge(&c, &r, &hits, true) {
            failures.push(format!("{c:?}: {x}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise: as above, and replay_cap: "A body still being streamed is judged by what was
/// read of it when the retry is decided". Bodies over the cap (cap 8 KiB, body 32 KiB),
/// HTTP/1 and HTTP/2, early 503 then a whole read; and a caller body that fails mid-way.
/// Expect: never a truncated body delivered as complete; a broken caller body completes
/// nowhere and the call does not succeed; an over-cap call either succeeds whole or
/// returns the 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_bodies_over_the_cap_and_broken_caller_bodies() {
    let base = BodyCase {
        h2: true,
        cap: 8 * 1024,
        chunks: 8,
        chunk: 4096,
        trailers: false,
        fail_after: None,
        attempts: 3,
        early_503s: 1,
        slow: Duration::ZERO,
    };
    let cases = [
        base,
        BodyCase { h2: false, ..base },
        BodyCase {
            cap: 64 * 1024,
            fail_after: Some(3),
            ..base
        },
        BodyCase {
            h2: false,
            cap: 64 * 1024,
            fail_after: Some(3),
            ..base
        },
        BodyCase {
            cap: 64 * 1024,
            fail_after: Some(6),
            early_503s: 2,
            ..base
        },
    ];
    let mut failures = Vec::new();
    for c in cases {
        let (r, hits) = run_body_case(c).await;
        let mut f = judge(&c, &r, &hits, false);
        if c.fail_after.is_none() && !matches!(r, Ok(200) | Ok(503)) {
            f.push(format!("over-cap call ended {r:?}"));
        }
        for x in f {
            failures.push(format!("{c:?}: {x}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise (commit brief / CHANGELOG): hedging is not affected by supersede — concurrent
/// attempts both read the body. Hedge(100 ms) -> hyper HTTP/2; the first attempt reads the
/// streamed body slowly and answers late; the hedge reads it and answers 200.
/// Expect: both attempts receive the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_still_sends_the_whole_body_to_both_attempts() {
    let (up, hits) = recorder(|n| match n {
        0..=3 => plan(200, Duration::ZERO),
        // The first attempt reads as the body comes and answers late; the hedge reads it
        // too and answers 200 ms after the end of the body (both have it whole by then).
        4 => plan(200, Duration::from_secs(2)),
        _ => plan(200, Duration::from_millis(200)),
    })
    .await;
    let mut b = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    b.http2_only(true);
    let transport: support::Transport<Chan> = b.build_http();
    let svc = ServiceBuilder::new().layer(hedge(100)).service(transport);
    for _ in 0..4 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(tx);
        svc.clone()
            .oneshot(
                Request::put(format!("http://{up}/"))
                    .body(Chan(rx))
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let call = tokio::spawn(
        svc.oneshot(
            Request::put(format!("http://{up}/"))
                .body(Chan(rx))
                .unwrap(),
        ),
    );
    let mut want = Vec::new();
    for i in 0..10u8 {
        let ch = vec![i; 2048];
        want.extend_from_slice(&ch);
        tx.send(Ok(Frame::data(Bytes::from(ch)))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    drop(tx);
    let r = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .unwrap()
        .unwrap();
    let h = hits.clone();
    support::eventually(|| h.lock().unwrap().iter().all(|x| x.outcome().is_some())).await;
    let hits = hits.lock().unwrap()[4..].to_vec();
    let mut failures = Vec::new();
    if hits.len() < 2 {
        failures.push(format!("only {} attempts", hits.len()));
    }
    for (i, h) in hits.iter().enumerate() {
        match h.outcome() {
            Some(Ok((got, _))) if got == want => {}
            o => failures.push(format!(
                "attempt {i}: {:?}",
                o.map(|o| o.map(|(g, _)| g.len()))
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{failures:#?} ({:?})",
        r.map(|r| r.status()).map_err(|e| e.to_string())
    );
}

// ---------------------------------------------------------------------------------------
// 4. Pushback with leading zeros (through tonic).
// ---------------------------------------------------------------------------------------

/// Promise (README Semantics): "a pushback with leading zeros is the integer it spells";
/// crates/steadfast-core/src/header/pushback.rs: "the rest must still be a 32-bit
/// integer's digits"; a pushback longer than the cap (300 s) "returns the last outcome at
/// once". client::grpc() (total 700 ms) over a tonic Channel to an upstream answering
/// trailers-only UNAVAILABLE with the given pushback.
/// Expect: the hit count and gaps the integer spells; Stop cases: 1 hit at once.
#[cfg(feature = "tonic")]
#[tokio::test(start_paused = true)]
async fn pushback_leading_zero_boundaries_through_tonic() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let zeros = |n: usize, tail: &str| format!("{}{tail}", "0".repeat(n));
    let cases: Vec<(String, usize, Option<Duration>)> = vec![
        (zeros(4000, "300"), 3, Some(Duration::from_millis(300))),
        (zeros(4000, ""), 3, Some(Duration::ZERO)),
        ("0".into(), 3, Some(Duration::ZERO)),
        (zeros(30, "1"), 3, Some(Duration::from_millis(1))),
        (zeros(20, "2147483648"), 1, None),
        (zeros(20, "2147483647"), 1, None),
        (zeros(3, "300001"), 1, None),
        (zeros(3, "300000"), 1, None), // 300 s is past the 700 ms deadline
        (zeros(20, "99999999999"), 1, None),
        ("-0".into(), 1, None),
        ("-00".into(), 1, None),
        ("0-0".into(), 1, None),
        ("+0".into(), 1, None),
        ("00 5".into(), 1, None),
        ("005 ".into(), 1, None),
        (" 005".into(), 1, None),
        ("\t0".into(), 1, None),
        ("0\t".into(), 1, None),
        ("0x0".into(), 1, None),
        ("00.5".into(), 1, None),
    ];
    let mut failures = Vec::new();
    for (pb, want_n, gap) in cases {
        let pbv = pb.clone();
        let (up, hits) = recorder(move |_| Plan {
            reply: Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .header("grpc-status", "14")
                .header("grpc-retry-pushback-ms", pbv.as_str())
                .body(Full::default())
                .unwrap(),
            ..plan(200, Duration::ZERO)
        })
        .await;
        let ch = tonic::transport::Channel::from_shared(format!("http://{up}"))
            .unwrap()
            .connect_lazy();
        let stack = steadfast::client::grpc()
            .with(|c| {
                c.total_timeout(Duration::from_millis(700))
                    .attempt_timeout(Duration::from_millis(700))
            })
            .build()
            .unwrap();
        let mut c = HealthClient::new(stack.layer(ch));
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            GUARD,
            c.check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
        .unwrap();
        let took = t0.elapsed();
        let hits = hits.lock().unwrap().clone();
        let gaps: Vec<Duration> = hits.windows(2).map(|w| w[1].at - w[0].at).collect();
        let ok = hits.len() == want_n
            && r.as_ref().err().map(|s| s.code()) == Some(tonic::Code::Unavailable)
            && match gap {
                None => took < Duration::from_millis(5),
                Some(g) => gaps
                    .iter()
                    .all(|x| *x >= g && *x <= g + Duration::from_millis(2)),
            };
        if !ok {
            let shown = if pb.len() > 40 {
                format!("{}…({} chars)", &pb[pb.len() - 20..], pb.len())
            } else {
                format!("{pb:?}")
            };
            failures.push(format!(
                "pushback {shown}: {} hits (want {want_n}), gaps {gaps:?}, took {took:?}, {:?}",
                hits.len(),
                r.map(|_| ())
                    .map_err(|s| (s.code(), s.message().to_owned()))
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Promise (README Semantics): "of several, the shortest valid one counts, and a request
/// leaves a client stack with one"; "The stacks": the total timeout is "written downstream
/// as one grpc-timeout / x-request-timeout-ms". The upstream is a steadfast server
/// (server::http()), which reads `grpc-timeout` first. An HTTP (non-gRPC) request carries a
/// caller's `grpc-timeout: 99S` through client::http() (10 s total).
/// Expect: the upstream handler's ambient deadline is no later than 10 s.
#[tokio::test(start_paused = true)]
async fn a_steadfast_upstream_is_never_given_more_than_the_stack_budget() {
    let seen = Arc::new(Mutex::new(None));
    let s2 = seen.clone();
    let handler = tower::service_fn(move |_req: Request<Incoming>| {
        let s2 = s2.clone();
        async move {
            *s2.lock().unwrap() = Some(Deadline::current().map(|d| d.remaining()));
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }
    });
    let up = serve(steadfast::server::http().build().unwrap().layer(handler)).await;
    let svc = steadfast::client::http()
        .build()
        .unwrap()
        .hyper_client::<Full<Bytes>>();
    let r = tokio::time::timeout(GUARD, svc.oneshot(get_req(up, &[("grpc-timeout", "99S")])))
        .await
        .unwrap();
    let seen = *seen.lock().unwrap();
    assert!(
        seen.flatten().is_some_and(|d| d <= Duration::from_secs(10)),
        "upstream handler's deadline: {seen:?} (stack total 10 s): {:?}",
        r.map(|r| r.status()).map_err(|e| e.to_string())
    );
}
