//! Retry storms across hops (issue 23), over real loopback sockets on paused time: a caller →
//! gateway → service → leaf call graph, each hop calling the next through a client stack and
//! answering with what it got. The leaf fails every call (503), then, in a second experiment,
//! is slow instead. Naive stacks (3 attempts per hop, a 2 s timeout per attempt, no budget, no
//! breaker, no deadline propagation) beside the presets at their defaults.
//!
//! Run: `cargo test --release --test storms -- --nocapture` (prints the figures).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use steadfast::common::BoxError;
use steadfast::retry::{Backoff, Jitter, RetryLayer};
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

type Client = BoxCloneSyncService<http::Request<Full<Bytes>>, http::Response<Bytes>, BoxError>;

/// A response with its body read.
async fn buffered<B>(res: http::Response<B>) -> Result<http::Response<Bytes>, BoxError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.map_err(Into::into)?.to_bytes();
    Ok(http::Response::from_parts(parts, bytes))
}

/// The client preset at its defaults.
fn preset() -> Client {
    let stack = steadfast::client::http().build().expect("valid");
    BoxCloneSyncService::new(stack.hyper_client::<Full<Bytes>>().and_then(buffered))
}

/// Three attempts per call on 503 or a timeout (2 s per attempt), no budget, no breaker, no
/// deadline propagation.
fn naive() -> Client {
    let retry = RetryLayer::builder()
        .budget(None)
        .backoff(
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).jitter(Jitter::None),
        )
        .build()
        .expect("valid");
    let transport = support::transport::<Full<Bytes>>();
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(retry)
            .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(2)))
            .service(transport)
            .map_err(Into::<BoxError>::into)
            .and_then(buffered),
    )
}

/// A hop that calls `next` and answers with its status (and `Retry-After`), or with the
/// answer its client's error means.
async fn relay(client: Client, next: String) -> Response {
    let req = http::Request::get(next)
        .body(Full::default())
        .expect("request");
    match client.oneshot(req).await {
        Ok(res) => {
            let mut out = Response::new(Body::from(res.body().clone()));
            *out.status_mut() = res.status();
            if let Some(v) = res.headers().get(http::header::RETRY_AFTER) {
                out.headers_mut()
                    .insert(http::header::RETRY_AFTER, v.clone());
            }
            out
        }
        Err(e) => steadfast::errors::http_response::<Body>(&*e)
            .map(Body::new)
            .into_response(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Leaf {
    Failing,
    Slow,
}

struct Graph {
    gateway: std::net::SocketAddr,
    leaf_calls: Arc<AtomicUsize>,
    /// Leaf calls that began after the caller of the whole graph had given up.
    leaf_late: Arc<AtomicUsize>,
    given_up_at: Arc<std::sync::Mutex<Option<Instant>>>,
}

async fn graph(leaf: Leaf, client: fn() -> Client, with_server_preset: bool) -> Graph {
    let leaf_calls = Arc::new(AtomicUsize::new(0));
    let leaf_late = Arc::new(AtomicUsize::new(0));
    let given_up_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let (calls, late, given_up) = (leaf_calls.clone(), leaf_late.clone(), given_up_at.clone());
    let leaf_app = Router::new().route(
        "/",
        get(move || {
            calls.fetch_add(1, SeqCst);
            if given_up
                .lock()
                .unwrap()
                .is_some_and(|t| Instant::now() >= t)
            {
                late.fetch_add(1, SeqCst);
            }
            async move {
                match leaf {
                    Leaf::Failing => http::StatusCode::SERVICE_UNAVAILABLE.into_response(),
                    Leaf::Slow => {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        "late".into_response()
                    }
                }
            }
        }),
    );
    let leaf_addr = support::serve_axum(leaf_app).await;
    let mut next = format!("http://{leaf_addr}/");
    let mut addr = leaf_addr;
    for _ in 0..2 {
        let c = client();
        let target = next.clone();
        let mut app = Router::new().route("/", get(move || relay(c.clone(), target.clone())));
        if with_server_preset {
            app = app.layer(steadfast::server::http().build().expect("valid"));
        }
        addr = support::serve_axum(app).await;
        next = format!("http://{addr}/");
    }
    Graph {
        gateway: addr,
        leaf_calls,
        leaf_late,
        given_up_at,
    }
}

const CALLS: usize = 200;

/// Leaf calls per call entering the graph, with the leaf failing every call.
async fn failing_amplification(client: fn() -> Client, server_preset: bool) -> f64 {
    let g = graph(Leaf::Failing, client, server_preset).await;
    let entry = client();
    for _ in 0..CALLS {
        let req = http::Request::get(format!("http://{}/", g.gateway))
            .body(Full::default())
            .unwrap();
        let _ = entry.clone().oneshot(req).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    g.leaf_calls.load(SeqCst) as f64 / CALLS as f64
}

#[tokio::test(start_paused = true)]
async fn a_failing_leaf_sees_few_calls_per_call_entering_with_the_defaults() {
    let naive = failing_amplification(naive, false).await;
    let ours = failing_amplification(preset, true).await;
    println!(
        "\nleaf failing 100 %, {CALLS} calls entering 50 ms apart, 3 client hops:\n\
         | stacks | leaf calls per call entering |\n|---|---:|\n\
         | naive (3 attempts per hop, no budget, no breaker) | {naive:.2} |\n\
         | steadfast client preset (defaults) | {ours:.2} |"
    );
    assert!(naive > 20.0, "naive retries multiply per hop: {naive}");
    assert!(ours <= 1.3, "ours: {ours}");
}

/// With the leaf slow, the caller's deadline is 1 s: how many leaf calls begin after it has
/// passed. (Closing a connection also cancels the hops behind it, so the caller here keeps its
/// connection open, as a multiplexed or pooled connection does, and only the deadline says
/// that it has given up.)
async fn slow_late_work(client: fn() -> Client, server_preset: bool) -> (usize, usize) {
    let g = graph(Leaf::Slow, client, server_preset).await;
    let entry = client();
    let mut total_late = 0;
    for _ in 0..10 {
        let req = http::Request::get(format!("http://{}/", g.gateway))
            .body(Full::default())
            .unwrap();
        let start = Instant::now();
        *g.given_up_at.lock().unwrap() = Some(start + Duration::from_secs(1));
        let mut req = req;
        if server_preset {
            req.extensions_mut().insert(steadfast::common::Deadline::at(
                start + Duration::from_secs(1),
            ));
        }
        // Our caller's deadline travels with the request (an extension its client stack reads
        // and sends on); a naive caller has none to send, and gives up all the same.
        let _ = entry.clone().oneshot(req).await;
        // Let whatever the graph still does for this call happen.
        tokio::time::sleep(Duration::from_secs(60)).await;
        total_late += g.leaf_late.swap(0, SeqCst);
        *g.given_up_at.lock().unwrap() = None;
    }
    (g.leaf_calls.load(SeqCst), total_late)
}

#[tokio::test(start_paused = true)]
async fn deadlines_stop_deeper_hops_from_working_for_a_caller_that_gave_up() {
    let (naive_calls, naive_late) = slow_late_work(naive, false).await;
    let (our_calls, our_late) = slow_late_work(preset, true).await;
    println!(
        "\nleaf slow (10 s), 10 calls entering with a 1 s deadline:\n\
         | stacks | leaf calls | begun after the caller gave up |\n|---|---:|---:|\n\
         | naive | {naive_calls} | {naive_late} |\n\
         | steadfast presets | {our_calls} | {our_late} |"
    );
    assert_eq!(our_late, 0, "no hop works for a caller that has given up");
    assert!(naive_late > 0);
}
