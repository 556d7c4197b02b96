//! The gRPC client preset with a real tonic client and server over loopback: every error of
//! the stack reaches tonic as the status it means, and UNAVAILABLE is retried although every
//! unary gRPC call is a POST (with an opt-out).
#![cfg(feature = "tonic")]

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::{Layer, Service};

/// In front of the health service: the first `unavailable` calls get a trailers-only
/// UNAVAILABLE, and every call waits `delay` first. Counts the calls that arrive.
#[derive(Clone)]
struct Flaky<S> {
    inner: S,
    unavailable: usize,
    delay: Duration,
    hits: Arc<AtomicUsize>,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<tonic::body::Body>> for Flaky<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFut<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let n = self.hits.fetch_add(1, Ordering::SeqCst);
        let (unavailable, delay) = (n < self.unavailable, self.delay);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            if unavailable {
                let (parts, _) = steadfast::common::grpc_response::<()>(
                    steadfast::common::GrpcCode::Unavailable,
                    "warming up",
                )
                .into_parts();
                return Ok(http::Response::from_parts(
                    parts,
                    tonic::body::Body::empty(),
                ));
            }
            inner.call(req).await
        })
    }
}

/// A health server behind [`Flaky`]; its address and hit counter.
async fn server(unavailable: usize, delay: Duration) -> (String, Arc<AtomicUsize>) {
    let (_reporter, health) = tonic_health::server::health_reporter();
    std::mem::forget(_reporter);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let flaky = tower::layer::layer_fn(move |inner| Flaky {
        inner,
        unavailable,
        delay,
        hits: h.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(flaky)
            .add_service(health)
            .serve_with_incoming(support::incoming(listener)),
    );
    (format!("http://{addr}"), hits)
}

async fn channel(url: String) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn check() -> HealthCheckRequest {
    HealthCheckRequest {
        service: String::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_timeout_of_the_stack_is_deadline_exceeded() {
    let (url, _) = server(0, Duration::from_secs(60)).await;
    let stack = steadfast::client::grpc()
        .with(|c| {
            c.attempt_timeout(Duration::from_secs(1))
                .total_timeout(Duration::from_secs(2))
        })
        .build()
        .unwrap();
    let mut client = HealthClient::new(stack.layer(channel(url).await));
    let status = client.check(check()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_is_unavailable_and_sends_nothing() {
    let (url, hits) = server(0, Duration::ZERO).await;
    let stack = steadfast::client::grpc().build().unwrap();
    let mut client = HealthClient::new(stack.layer(channel(url).await));
    client.check(check()).await.unwrap();
    // The breaker exists now: trip it by hand. tonic's requests carry only a path (the
    // Channel adds its origin below the stack), so a channel's calls share the breaker of
    // "no authority": one channel, one upstream.
    let handle = stack.breakers().handle(&None);
    handle.force_open();
    let status = client.check(check()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "failed fast: nothing sent");
}

#[tokio::test(start_paused = true)]
async fn unavailable_is_retried_by_default_and_the_opt_out_holds() {
    let (url, hits) = server(2, Duration::ZERO).await;
    let stack = steadfast::client::grpc().build().unwrap();
    let mut client = HealthClient::new(stack.layer(channel(url).await));
    client
        .check(check())
        .await
        .expect("the third attempt succeeds");
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    let (url, hits) = server(2, Duration::ZERO).await;
    let stack = steadfast::client::grpc()
        .retry_unavailable(false)
        .build()
        .unwrap();
    let mut client = HealthClient::new(stack.layer(channel(url).await));
    let status = client.check(check()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "no retry once opted out");
}

/// A server-streaming RPC (health `Watch`: one message, then the stream stays open): the
/// stack's total deadline ends the stream with DEADLINE_EXCEEDED, not UNKNOWN; with the body
/// deadline turned off, the stream outlives the total timeout.
#[tokio::test(start_paused = true)]
async fn a_deadline_that_ends_a_stream_is_deadline_exceeded_and_streams_can_opt_out() {
    let (url, _) = server(0, Duration::ZERO).await;
    let stack = steadfast::client::grpc()
        .with(|c| {
            c.attempt_timeout(Duration::from_secs(1))
                .total_timeout(Duration::from_secs(2))
        })
        .build()
        .unwrap();
    let mut client = HealthClient::new(stack.layer(channel(url.clone()).await));
    let mut stream = client.watch(check()).await.unwrap().into_inner();
    stream.message().await.expect("the first message").unwrap();
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");

    let streaming = steadfast::client::grpc()
        .with(|c| {
            c.attempt_timeout(Duration::from_secs(1))
                .total_timeout(Duration::from_secs(2))
                .total_covers_body(false)
        })
        .build()
        .unwrap();
    let mut client = HealthClient::new(streaming.layer(channel(url).await));
    let mut stream = client.watch(check()).await.unwrap().into_inner();
    stream.message().await.expect("the first message").unwrap();
    let next = tokio::time::timeout(Duration::from_secs(60), stream.message()).await;
    assert!(next.is_err(), "still open a minute later: {next:?}");
}
