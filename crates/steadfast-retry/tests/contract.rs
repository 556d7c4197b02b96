//! Retry contracts: idempotency, hints, backoff, deadline, budget, breaker rejections, gRPC
//! commit rules, readiness, replay. Paused time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use steadfast_core::{BoxError, Deadline, PolicyRejected};
use steadfast_retry::error::InvalidRetryConfig;
use steadfast_retry::{Backoff, BudgetConfig, Jitter, ReplayBody, RetryBuilder, RetryLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

type Seen = Arc<Mutex<Vec<(Instant, http::HeaderMap, Bytes)>>>;

/// An upstream that answers from a script (the last entry repeats) and records every request.
fn scripted(
    script: Vec<Result<Response<()>, &'static str>>,
) -> (
    impl Service<
        Request<ReplayBody<Full<Bytes>>>,
        Response = Response<()>,
        Error = BoxError,
        Future: Send,
    > + Clone
    + Send
    + 'static,
    Seen,
) {
    let seen: Seen = Arc::default();
    let n = Arc::new(AtomicUsize::new(0));
    let script = Arc::new(script);
    let s = seen.clone();
    let svc = service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
        let (s, n, script) = (s.clone(), n.clone(), script.clone());
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            s.lock()
                .unwrap()
                .push((Instant::now(), parts.headers, bytes));
            let i = n.fetch_add(1, Ordering::SeqCst).min(script.len() - 1);
            match &script[i] {
                Ok(r) => {
                    let mut b = Response::builder().status(r.status());
                    for (k, v) in r.headers() {
                        b = b.header(k, v);
                    }
                    Ok(b.body(()).unwrap())
                }
                Err("refused") => Err(BoxError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                ))),
                Err("reset") => Err(BoxError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))),
                Err("breaker") => Err(BoxError::from(Rejected)),
                Err("rerouted") => Err(BoxError::from(Elsewhere)),
                Err(other) => panic!("unknown script entry {other}"),
            }
        }
    });
    (svc, seen)
}

#[derive(Debug)]
struct Rejected;
impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("breaker open")
    }
}
impl std::error::Error for Rejected {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&PolicyRejected::INSTANCE)
    }
}

/// What the balancer returns when an endpoint's breaker refused and another can take the
/// call: marked "not sent".
#[derive(Debug)]
struct Elsewhere;
impl std::fmt::Display for Elsewhere {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("refused here, try elsewhere")
    }
}
impl std::error::Error for Elsewhere {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&steadfast_core::NotSent::INSTANCE)
    }
}

fn status(code: u16) -> Result<Response<()>, &'static str> {
    Ok(Response::builder().status(code).body(()).unwrap())
}

fn with_header(code: u16, k: &'static str, v: &'static str) -> Result<Response<()>, &'static str> {
    Ok(Response::builder()
        .status(code)
        .header(k, v)
        .body(())
        .unwrap())
}

fn exact() -> RetryBuilder {
    RetryLayer::builder()
        .backoff(Backoff::default().jitter(Jitter::None))
        .seed(7)
}

/// Sends `request` once through a retry layer built from `builder` over `upstream`.
async fn send<S>(
    builder: RetryBuilder,
    upstream: S,
    request: Request<Full<Bytes>>,
) -> Result<Response<()>, BoxError>
where
    S: Service<Request<ReplayBody<Full<Bytes>>>, Response = Response<()>, Error = BoxError> + Clone,
{
    builder
        .build()
        .unwrap()
        .layer(upstream)
        .oneshot(request)
        .await
}

fn req(method: Method, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("http://up/x")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn retries_503_503_then_succeeds_on_attempt_3_with_attempt_headers() {
    let (up, seen) = scripted(vec![status(503), status(503), status(200)]);
    let svc = exact().build().unwrap().layer(up);
    let start = Instant::now();
    let res = svc.oneshot(req(Method::GET, b"hello")).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    assert!(seen[0].1.get("x-retry-attempt").is_none());
    assert_eq!(seen[1].1["x-retry-attempt"], "2");
    assert_eq!(seen[2].1["x-retry-attempt"], "3");
    assert!(
        seen.iter().all(|s| s.2 == "hello"),
        "body replayed on every attempt"
    );
    // Exponential from 100 ms without jitter: 100 ms, then 200 ms.
    assert_eq!(seen[1].0 - start, Duration::from_millis(100));
    assert_eq!(seen[2].0 - seen[1].0, Duration::from_millis(200));
}

#[tokio::test(start_paused = true)]
async fn three_attempts_at_most_by_default() {
    let (up, seen) = scripted(vec![status(503)]);
    let res = send(exact(), up, req(Method::GET, b"")).await.unwrap();
    assert_eq!(res.status(), 503, "the last real outcome");
    assert_eq!(seen.lock().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_post_without_idempotency_key_is_sent_once() {
    for failure in [status(503), status(502), Err("reset")] {
        let (up, seen) = scripted(vec![failure]);
        let _ = send(exact(), up, req(Method::POST, b"order")).await;
        assert_eq!(seen.lock().unwrap().len(), 1, "never sent twice");
    }
}

#[tokio::test(start_paused = true)]
async fn a_post_with_idempotency_key_or_opt_in_is_retried() {
    let (up, seen) = scripted(vec![status(503), status(200)]);
    let mut r = req(Method::POST, b"order");
    r.headers_mut()
        .insert("idempotency-key", "k-1".parse().unwrap());
    assert_eq!(send(exact(), up, r).await.unwrap().status(), 200);
    assert_eq!(seen.lock().unwrap().len(), 2);

    let (up, seen) = scripted(vec![status(503), status(200)]);
    let builder = exact().retry_non_idempotent(true);
    assert_eq!(
        send(builder, up, req(Method::POST, b"x"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_post_that_certainly_was_not_sent_is_retried() {
    let (up, seen) = scripted(vec![Err("refused"), status(201)]);
    let res = send(exact(), up, req(Method::POST, b"order"))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_capped() {
    let (up, seen) = scripted(vec![with_header(503, "retry-after", "2"), status(200)]);
    let start = Instant::now();
    send(exact(), up, req(Method::GET, b"")).await.unwrap();
    let asked = seen.lock().unwrap()[1].0 - start;
    assert_eq!(
        asked,
        Duration::from_secs(2),
        "waited exactly what the server asked"
    );

    // Longer than the cap: no retry, at once.
    let (up, seen) = scripted(vec![with_header(503, "retry-after", "400"), status(200)]);
    let start = Instant::now();
    let res = send(exact(), up, req(Method::GET, b"")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hint_exactly_at_the_cap_is_honoured_and_applies_to_predicate_retries_too() {
    let (up, seen) = scripted(vec![with_header(503, "retry-after", "2"), status(200)]);
    let builder = exact().max_server_delay(Duration::from_secs(2));
    let start = Instant::now();
    assert_eq!(
        send(builder, up, req(Method::GET, b""))
            .await
            .unwrap()
            .status(),
        200
    );
    let waited = seen.lock().unwrap()[1].0 - start;
    assert_eq!(waited, Duration::from_secs(2));

    // A response retried only because a predicate said so still gets the server's wait.
    let (up, seen) = scripted(vec![with_header(500, "retry-after", "3"), status(200)]);
    let builder = exact().predicate(|_, c| c.is_failure().then_some(true));
    let start = Instant::now();
    send(builder, up, req(Method::GET, b"")).await.unwrap();
    let waited = seen.lock().unwrap()[1].0 - start;
    assert_eq!(waited, Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn the_budget_balance_is_visible_and_ratios_are_validated() {
    assert_eq!(
        RetryLayer::new().budget_balance(),
        Some(100.0),
        "starts full at its floor"
    );
    assert_eq!(
        RetryLayer::builder()
            .budget(None)
            .build()
            .unwrap()
            .budget_balance(),
        None
    );
    for ratio in [-0.1, f64::NAN, f64::INFINITY, 1000.5] {
        let bad = BudgetConfig {
            ratio,
            ..BudgetConfig::default()
        };
        assert_eq!(
            RetryLayer::builder().budget(Some(bad)).build().unwrap_err(),
            InvalidRetryConfig::BudgetRatio
        );
    }
    assert!(
        RetryLayer::builder()
            .budget(Some(BudgetConfig {
                ratio: 0.0,
                ..BudgetConfig::default()
            }))
            .build()
            .is_ok()
    );
    // Configurations that could never retry are refused, saying what to change.
    let never = RetryLayer::builder()
        .budget(Some(BudgetConfig {
            ratio: 0.0,
            min_per_sec: 0,
            window: Duration::from_secs(10),
        }))
        .build()
        .unwrap_err();
    assert_eq!(never, InvalidRetryConfig::BudgetNeverPays);
    assert!(never.to_string().contains("budget(None)"));
    let window = RetryLayer::builder()
        .budget(Some(BudgetConfig {
            window: Duration::ZERO,
            ..BudgetConfig::default()
        }))
        .build()
        .unwrap_err();
    assert_eq!(window, InvalidRetryConfig::BudgetWindow);
}

#[test]
fn configuration_errors_say_what_is_wrong() {
    assert_eq!(
        InvalidRetryConfig::ZeroAttempts.to_string(),
        "max_attempts must be at least 1 (1 = no retry)"
    );
    assert!(
        InvalidRetryConfig::BackoffCapBelowBase
            .to_string()
            .contains("cap")
    );
    assert!(
        InvalidRetryConfig::BudgetRatio
            .to_string()
            .contains("ratio")
    );
}

#[tokio::test(start_paused = true)]
async fn grpc_pushback_replaces_backoff_and_negative_stops() {
    let grpc = |code: &'static str, pushback: &'static str| {
        Ok(Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", code)
            .header("grpc-retry-pushback-ms", pushback)
            .body(())
            .unwrap())
    };
    let (up, seen) = scripted(vec![grpc("14", "750"), grpc("0", "0")]);
    let start = Instant::now();
    let mut r = req(Method::POST, b"\0\0\0\0\0");
    r.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    r.headers_mut()
        .insert("idempotency-key", "rpc-1".parse().unwrap());
    send(exact(), up, r).await.unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen[1].0 - start, Duration::from_millis(750));
        assert_eq!(seen[1].1["grpc-previous-rpc-attempts"], "1");
    }

    let (up, seen) = scripted(vec![grpc("14", "-1"), grpc("0", "0")]);
    send(exact(), up, req(Method::GET, b"")).await.unwrap();
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "negative pushback: do not retry"
    );
}

#[tokio::test(start_paused = true)]
async fn a_streamed_grpc_response_is_committed() {
    // Headers arrived without a status: the status will come in trailers; A6 says committed.
    let (up, seen) = scripted(vec![
        with_header(200, "content-type", "application/grpc"),
        status(200),
    ]);
    send(exact(), up, req(Method::GET, b"")).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_deadline_returns_the_last_outcome_now() {
    let (up, seen) = scripted(vec![status(503)]);
    let deadline = Deadline::after(Duration::from_millis(250));
    let start = Instant::now();
    let res = deadline
        .scope(send(exact(), up, req(Method::GET, b"")))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    // Attempt 1 at 0, attempt 2 at 100 ms; a 200 ms wait would end at 300 ms > 250 ms.
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(start.elapsed(), Duration::from_millis(100));
}

/// A service below that stops being ready once `stalled` is set (and never wakes anyone:
/// only a timer of the caller's can end the wait).
#[derive(Clone)]
struct Stalls<S> {
    inner: S,
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl<S: Service<R>, R> Service<R> for Stalls<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        if self.stalled.load(Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        self.inner.poll_ready(cx)
    }
    fn call(&mut self, req: R) -> S::Future {
        self.stalled.store(true, Ordering::SeqCst);
        self.inner.call(req)
    }
}

/// A retry waits for the service below to become ready only until the call's deadline: then
/// the call ends with `NotReadyByDeadline` (a timeout), the retry unsent and its budget
/// token given back. Without a deadline it waits as long as it takes.
#[tokio::test(start_paused = true)]
async fn a_retry_waits_for_readiness_only_until_the_deadline() {
    use steadfast_retry::error::NotReadyByDeadline;
    let (up, seen) = scripted(vec![status(503)]);
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let layer = exact().build().unwrap();
    let full = layer.budget_balance().unwrap();
    let svc = layer.layer(Stalls {
        inner: up.clone(),
        stalled: stalled.clone(),
    });
    let start = Instant::now();
    let call = Deadline::after(Duration::from_secs(1)).scope(svc.oneshot(req(Method::GET, b"")));
    let err = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("ended by the deadline, not waiting on")
        .unwrap_err();
    let late = err
        .downcast_ref::<NotReadyByDeadline>()
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(late.attempt(), 2);
    assert!(steadfast_core::TimedOut::is_in(&*err));
    assert_eq!(start.elapsed(), Duration::from_secs(1), "at the deadline");
    assert_eq!(seen.lock().unwrap().len(), 1, "the retry was never sent");
    // A retry costs one token; the call's deposit (a tenth) and its ageing are far less.
    let now = layer.budget_balance().unwrap();
    assert!(
        now > full - 0.5,
        "its token given back: {full} before, {now} after"
    );

    // No deadline: the retry waits for the service below, however long.
    stalled.store(false, Ordering::SeqCst);
    let svc = layer.layer(Stalls {
        inner: up,
        stalled: stalled.clone(),
    });
    let waited = tokio::time::timeout(
        Duration::from_secs(3600),
        svc.oneshot(req(Method::GET, b"")),
    )
    .await;
    assert!(waited.is_err(), "still waiting for readiness: {waited:?}");
}

#[tokio::test(start_paused = true)]
async fn breaker_rejections_are_not_retried_and_cost_no_budget() {
    let (up, seen) = scripted(vec![Err("breaker")]);
    let layer = exact()
        .budget(Some(BudgetConfig {
            ratio: 0.0,
            min_per_sec: 1,
            window: Duration::from_secs(10),
        }))
        .build()
        .unwrap();
    let before = layer.budget_balance().unwrap();
    let err = layer
        .clone()
        .layer(up)
        .oneshot(req(Method::GET, b""))
        .await
        .unwrap_err();
    assert!(PolicyRejected::is_in(&*err));
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(layer.budget_balance().unwrap(), before);
}

/// An attempt an endpoint's breaker refused (nothing left the process) goes to another
/// endpoint at once, asks nothing of the budget and does not count against `max_attempts`;
/// a call stops being rerouted after 64 reroutes.
#[tokio::test(start_paused = true)]
async fn a_rerouted_attempt_is_retried_at_once_without_budget() {
    // A budget with nothing in it: every ordinary retry is denied.
    let empty = || {
        exact().budget(Some(BudgetConfig {
            ratio: 0.0,
            min_per_sec: 1,
            window: Duration::from_millis(10),
        }))
    };
    let (up, seen) = scripted(vec![status(503), status(200)]);
    let res = send(empty(), up, req(Method::POST, b"order"))
        .await
        .unwrap();
    assert_eq!(res.status(), 503, "an ordinary retry is denied");
    assert_eq!(seen.lock().unwrap().len(), 1);

    let (up, seen) = scripted(vec![Err("rerouted"), Err("rerouted"), status(200)]);
    let began = Instant::now();
    let res = send(empty(), up, req(Method::POST, b"order"))
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        200,
        "rerouted twice, answered on the third attempt"
    );
    assert_eq!(began.elapsed(), Duration::ZERO, "no backoff");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert!(
            seen.iter().all(|(_, _, body)| body == "order"),
            "the body every time"
        );
    }

    let (up, seen) = scripted(vec![Err("rerouted")]);
    let err = send(empty(), up, req(Method::GET, b"")).await.unwrap_err();
    assert!(steadfast_core::NotSent::is_in(&*err));
    assert_eq!(
        seen.lock().unwrap().len(),
        65,
        "the first attempt and 64 reroutes"
    );

    // The attempts the reroutes replaced are still there for ordinary retries (3 by default).
    let (up, seen) = scripted(vec![
        Err("rerouted"),
        Err("rerouted"),
        status(503),
        status(503),
        status(200),
    ]);
    let res = send(exact(), up, req(Method::GET, b"")).await.unwrap();
    assert_eq!(res.status(), 200, "three attempts after two reroutes");
    assert_eq!(seen.lock().unwrap().len(), 5);
}

#[tokio::test(start_paused = true)]
async fn max_attempts_one_means_no_retry_and_zero_is_an_error() {
    let (up, seen) = scripted(vec![status(503)]);
    send(exact().max_attempts(1), up, req(Method::GET, b""))
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(
        RetryLayer::builder().max_attempts(0).build().unwrap_err(),
        InvalidRetryConfig::ZeroAttempts
    );
    assert_eq!(
        RetryLayer::builder()
            .backoff(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)))
            .build()
            .unwrap_err(),
        InvalidRetryConfig::BackoffCapBelowBase
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_contains_a_retry_storm() {
    let (up, seen) = scripted(vec![status(503)]);
    let layer = exact()
        .backoff(Backoff::new(Duration::ZERO, Duration::ZERO))
        .build()
        .unwrap();
    for _ in 0..1000 {
        layer
            .layer(up.clone())
            .oneshot(req(Method::GET, b""))
            .await
            .unwrap();
    }
    let attempts = seen.lock().unwrap().len();
    // 1000 originals + 10 % + the floor (10/s over a 10 s window = 100 tokens at start).
    assert!(attempts <= 1100 + 100, "attempts {attempts}");
    assert!(attempts > 1000, "some retries were allowed");
}

#[tokio::test(start_paused = true)]
async fn over_the_replay_cap_exactly_one_attempt() {
    let (up, seen) = scripted(vec![status(503), status(200)]);
    let big = Full::new(Bytes::from(vec![7u8; 1024 * 1024]));
    let r = Request::get("http://up/").body(big).unwrap();
    let res = send(exact(), up, r).await.unwrap();
    assert_eq!(res.status(), 503);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].2.len(),
        1024 * 1024,
        "the first attempt was unharmed"
    );
}

#[tokio::test(start_paused = true)]
async fn the_default_cap_is_64_kib() {
    assert_eq!(steadfast_retry::DEFAULT_REPLAY_CAP, 64 * 1024);
    let (up, seen) = scripted(vec![status(503), status(200)]);
    let body = Full::new(Bytes::from(vec![1u8; 60 * 1024]));
    let r = Request::get("http://up/").body(body).unwrap();
    assert_eq!(send(exact(), up, r).await.unwrap().status(), 200);
    assert_eq!(seen.lock().unwrap().len(), 2, "60 KiB is replayed");
}

#[tokio::test(start_paused = true)]
async fn readiness_is_polled_before_every_attempt() {
    let (mock, mut handle) =
        tower_test::mock::pair::<Request<ReplayBody<Full<Bytes>>>, Response<()>>();
    let mut svc = exact().build().unwrap().layer(mock);
    handle.allow(1);
    let fut = tokio::spawn(svc.ready().await.unwrap().call(req(Method::GET, b"")));
    let (_r, send) = handle.next_request().await.unwrap();
    send.send_response(Response::builder().status(503).body(()).unwrap());
    // The retry waits for capacity: nothing arrives until we allow one more.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(1), handle.next_request())
            .await
            .is_err()
    );
    handle.allow(1);
    let (r, send) = handle.next_request().await.unwrap();
    assert_eq!(r.headers()["x-retry-attempt"], "2");
    send.send_response(Response::new(()));
    assert_eq!(fut.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn jitter_streams_are_per_request_and_seedable() {
    async fn delays(seed: u64) -> Vec<Duration> {
        let (up, seen) = scripted(vec![status(503)]);
        let layer = RetryLayer::builder().seed(seed).build().unwrap();
        for _ in 0..4 {
            layer
                .layer(up.clone())
                .oneshot(req(Method::GET, b""))
                .await
                .unwrap();
        }
        let seen = seen.lock().unwrap();
        seen.chunks(3).map(|c| c[1].0 - c[0].0).collect()
    }
    let a = delays(42).await;
    assert_eq!(a, delays(42).await, "same seed, same delays");
    assert_ne!(a, delays(43).await);
    let distinct: std::collections::HashSet<_> = a.iter().collect();
    assert_eq!(distinct.len(), a.len(), "each request draws its own stream");
    assert!(
        a.iter().all(|d| *d <= Duration::from_millis(100)),
        "full jitter under the first exponential"
    );
}

#[tokio::test(start_paused = true)]
async fn custom_predicate_overrides() {
    let (up, seen) = scripted(vec![status(500), status(200)]);
    let builder = exact().predicate(|_parts, class| class.is_failure().then_some(true));
    assert_eq!(
        send(builder, up, req(Method::GET, b""))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "500 is not retryable by default; the predicate said yes"
    );

    let (up, seen) = scripted(vec![status(503), status(200)]);
    let builder = exact().predicate(|parts, _| (parts.uri.path() == "/x").then_some(false));
    send(builder, up, req(Method::GET, b"")).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[test]
fn services_and_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let (up, _) = scripted(vec![status(200)]);
    let svc = RetryLayer::new().layer(up);
    send(&svc);
    let mut svc = svc;
    let fut = svc.call(req(Method::GET, b""));
    send(&fut);
}

/// After a server's hint, the backoff starts again from its base (the hint replaced the
/// schedule), instead of growing from the attempt number.
#[tokio::test(start_paused = true)]
async fn the_backoff_restarts_from_its_base_after_a_server_hint() {
    let (up, seen) = scripted(vec![
        with_header(503, "retry-after", "1"),
        status(503),
        status(503),
        status(200),
    ]);
    send(exact().max_attempts(4), up, req(Method::GET, b""))
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert_eq!(
        gaps,
        vec![
            Duration::from_secs(1),
            Duration::from_millis(100),
            Duration::from_millis(200)
        ]
    );
}

/// Two `Retry-After` fields: the longer wait wins (never sooner than either asked); a
/// garbled one beside a valid one is ignored.
#[tokio::test(start_paused = true)]
async fn of_two_retry_after_fields_the_longer_wins() {
    for (a, b) in [("1", "3"), ("3", "1"), ("soon", "3")] {
        let both = Ok(Response::builder()
            .status(503)
            .header("retry-after", a)
            .header("retry-after", b)
            .body(())
            .unwrap());
        let (up, seen) = scripted(vec![both, status(200)]);
        send(exact(), up, req(Method::GET, b"")).await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen[1].0 - seen[0].0, Duration::from_secs(3), "{a}, {b}");
    }
}

/// A caller that gives up during the backoff has sent no retry: its budget token comes back.
#[tokio::test(start_paused = true)]
async fn a_caller_cancelled_during_the_backoff_spends_no_budget() {
    let (up, seen) = scripted(vec![status(503), status(200)]);
    let layer = exact()
        .budget(Some(BudgetConfig {
            ratio: 0.0,
            min_per_sec: 1,
            window: Duration::from_secs(10),
        }))
        .build()
        .unwrap();
    let before = layer.budget_balance().unwrap();
    let call = layer.layer(up).oneshot(req(Method::GET, b""));
    // The first attempt fails at once; the caller gives up 50 ms into the 100 ms backoff.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), call)
            .await
            .is_err()
    );
    assert_eq!(seen.lock().unwrap().len(), 1, "no retry was sent");
    let after = layer.budget_balance().unwrap();
    assert!(
        (after - before).abs() < 0.01,
        "the token came back: {before} -> {after}"
    );

    // The control: the same call left to finish sends its retry and spends the token.
    let (up, seen) = scripted(vec![status(503), status(200)]);
    let before = layer.budget_balance().unwrap();
    layer
        .layer(up)
        .oneshot(req(Method::GET, b""))
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2);
    let spent = before - layer.budget_balance().unwrap();
    assert!((0.98..1.01).contains(&spent), "one token spent: {spent}");
}

/// A deposit that waited three windows in its stripe no longer pays for a retry: the budget
/// tracks recent requests, as documented. A fresh one does.
#[tokio::test(start_paused = true)]
async fn an_old_deposit_does_not_pay_for_a_retry() {
    let config = BudgetConfig {
        ratio: 1.0,
        min_per_sec: 0,
        window: Duration::from_secs(10),
    };
    let budget = steadfast_retry::Budget::new(config);
    budget.deposit();
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(
        !budget.withdraw(),
        "a token three windows old is spent by decay"
    );

    let budget = steadfast_retry::Budget::new(config);
    budget.deposit();
    tokio::time::advance(Duration::from_millis(10)).await;
    assert!(budget.withdraw(), "a fresh token pays");

    // A day and more unused (the 24-bit stamp wraps at about 46 hours; past half of that a
    // gap used to read as "no time passed"): nothing old pays.
    for hours in [22, 24, 30, 47] {
        let budget = steadfast_retry::Budget::new(BudgetConfig {
            ratio: 0.1,
            ..config
        });
        for _ in 0..1000 {
            budget.deposit();
        }
        assert!(budget.balance() > 99.0, "100 tokens to start with");
        tokio::time::advance(Duration::from_secs(hours * 3600)).await;
        assert!(!budget.withdraw(), "{hours} h later, nothing is left");
    }

    // Steady traffic swept after a long quiet spell: worth about its last window.
    let budget = steadfast_retry::Budget::new(config);
    for _ in 0..600 {
        budget.deposit();
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    let balance = budget.balance();
    assert!(
        (90.0..=110.0).contains(&balance),
        "10 deposits a second over a 10 s window: about 100 tokens, got {balance}"
    );
}

/// `retry_grpc_statuses`: a gRPC POST answered with a retryable gRPC status in the head is
/// retried; the same POST answered with a plain HTTP 503 (a proxy, no `grpc-status`) is not.
#[tokio::test(start_paused = true)]
async fn grpc_statuses_are_retried_whatever_the_method_but_not_a_proxy_s_503() {
    let unavailable = || {
        Ok(Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
            .body(())
            .unwrap())
    };
    let grpc_post = || {
        let mut r = req(Method::POST, b"\0\0\0\0\0");
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        r
    };
    let (up, seen) = scripted(vec![unavailable(), status(200)]);
    send(exact().retry_grpc_statuses(true), up, grpc_post())
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2, "UNAVAILABLE retried");

    let (up, seen) = scripted(vec![status(503), status(200)]);
    let res = send(exact().retry_grpc_statuses(true), up, grpc_post())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "a proxy's 503 on a POST is not"
    );

    let (up, seen) = scripted(vec![unavailable(), status(200)]);
    send(exact(), up, grpc_post()).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1, "off by default");
}

/// gRPC A6: at most 5 attempts for a gRPC call, whatever the policy says; other calls keep
/// the policy's number.
#[tokio::test(start_paused = true)]
async fn a_grpc_call_makes_at_most_five_attempts() {
    for (grpc, want) in [(true, 5), (false, 8)] {
        let (up, seen) = scripted(vec![Err("refused")]);
        let mut request = req(Method::POST, b"msg");
        if grpc {
            request
                .headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
        }
        send(exact().max_attempts(8).budget(None), up, request)
            .await
            .unwrap_err();
        assert_eq!(seen.lock().unwrap().len(), want, "grpc = {grpc}");
    }
}

/// gRPC A6 retry throttling: failures drain the bucket, retries stop at half.
#[tokio::test(start_paused = true)]
async fn grpc_throttling_stops_retries_at_half_the_tokens() {
    use steadfast_retry::ThrottleConfig;
    let (up, seen) = scripted(vec![status(503)]);
    let layer = exact()
        .budget(None)
        .grpc_throttling(Some(ThrottleConfig {
            max_tokens: 10,
            token_ratio: 0.1,
        }))
        .build()
        .unwrap();
    let svc = layer.clone().layer(up);
    let mut per_call = Vec::new();
    for _ in 0..3 {
        let before = seen.lock().unwrap().len();
        let res = svc.clone().oneshot(req(Method::GET, b"")).await.unwrap();
        assert_eq!(res.status(), 503);
        per_call.push(seen.lock().unwrap().len() - before);
    }
    // 10 → 9 → 8 → 7 (3 attempts); 6 → 5, stop (2); 4, stop (1).
    assert_eq!(per_call, [3, 2, 1]);
    assert_eq!(layer.throttle_tokens(), Some(4.0));
    let bad = RetryLayer::builder()
        .grpc_throttling(Some(ThrottleConfig {
            max_tokens: 0,
            token_ratio: 0.1,
        }))
        .build()
        .unwrap_err();
    assert!(bad.to_string().contains("max_tokens"), "{bad}");
}

/// A `Retry-After` date is read against the injected wall clock.
#[tokio::test(start_paused = true)]
async fn a_retry_after_date_is_read_against_the_injected_clock() {
    fn frozen() -> std::time::SystemTime {
        // Sun, 06 Nov 1994 08:49:37 GMT
        std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
    }
    let (up, seen) = scripted(vec![
        with_header(503, "retry-after", "Sun, 06 Nov 1994 08:49:40 GMT"),
        status(200),
    ]);
    let began = Instant::now();
    let res = send(exact().wall_clock(frozen), up, req(Method::GET, b""))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen[1].0 - began,
        Duration::from_secs(3),
        "three seconds after the frozen now"
    );
}

/// The service below is cloned once per layered service (the copy later attempts come
/// from), and then only for calls that are retried, not for every call; every attempt,
/// first or later, goes through a service that was made ready.
#[tokio::test(start_paused = true)]
async fn the_service_below_is_cloned_only_for_calls_that_are_retried() {
    struct Counted<S> {
        inner: S,
        clones: Arc<AtomicUsize>,
        ready: bool,
    }
    impl<S: Clone> Counted<S> {
        fn copy(&self) -> Self {
            self.clones.fetch_add(1, Ordering::SeqCst);
            Self {
                inner: self.inner.clone(),
                clones: self.clones.clone(),
                ready: false,
            }
        }
    }
    impl<S, R> Service<R> for Counted<S>
    where
        S: Service<R>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;
        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), S::Error>> {
            let ready = self.inner.poll_ready(cx);
            self.ready = ready.is_ready();
            ready
        }
        fn call(&mut self, req: R) -> S::Future {
            assert!(self.ready, "called without poll_ready");
            self.ready = false;
            self.inner.call(req)
        }
    }
    let clones = Arc::new(AtomicUsize::new(0));
    // Five successes, then a 503 answered by a 200 on the retry.
    let (upstream, seen) = scripted(vec![
        status(200),
        status(200),
        status(200),
        status(200),
        status(200),
        status(503),
        status(200),
    ]);
    let counted = Counted {
        inner: upstream,
        clones: clones.clone(),
        ready: false,
    };
    let mut svc = exact().build().unwrap().layer(Wrapper(counted));
    for _ in 0..5 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(req(Method::GET, b""))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(
        clones.load(Ordering::SeqCst),
        1,
        "one copy, at the first call"
    );
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(req(Method::GET, b""))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.lock().unwrap().len(), 7);
    assert_eq!(
        clones.load(Ordering::SeqCst),
        2,
        "one more for the retried call"
    );

    /// Clones through `Counted::copy`, so every clone is counted.
    struct Wrapper<S>(Counted<S>);
    impl<S: Clone> Clone for Wrapper<S> {
        fn clone(&self) -> Self {
            Wrapper(self.0.copy())
        }
    }
    impl<S, R> Service<R> for Wrapper<S>
    where
        S: Service<R>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;
        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), S::Error>> {
            self.0.poll_ready(cx)
        }
        fn call(&mut self, req: R) -> S::Future {
            self.0.call(req)
        }
    }
}
