//! Shared helpers for the loopback integration tests: real servers on 127.0.0.1 with
//! ephemeral ports, and a real hyper-util client.
#![allow(dead_code, unreachable_pub)]

pub mod stripes;
pub mod timers;

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Serves an axum router on 127.0.0.1 with an ephemeral port.
pub async fn serve_axum(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// Serves a tower service over hyper (HTTP/1 and HTTP/2 prior knowledge) on 127.0.0.1.
pub async fn serve<S, B>(svc: S) -> SocketAddr
where
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<steadfast::common::BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<steadfast::common::BoxError>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (io, _) = listener.accept().await.unwrap();
            let svc = svc.clone();
            tokio::spawn(async move {
                let hsvc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        tower::ServiceExt::oneshot(svc.clone(), req)
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(io), hsvc)
                .await;
            });
        }
    });
    addr
}

/// A plain hyper-util HTTP client (HTTP/1 and HTTP/2 prior knowledge off).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A hyper-util client for a stack whose retry layer hands it replayable bodies.
pub type Transport<B> = Client<HttpConnector, steadfast::retry::ReplayBody<B>>;

pub fn transport<B>() -> Transport<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new()).build_http()
}

/// A GET request to the fault server's `/`.
pub fn get_from(server: &steadfast_testkit::FaultServer) -> http::Request<Full<Bytes>> {
    http::Request::get(server.url("/"))
        .body(Full::default())
        .unwrap()
}

/// A GET request to `addr` + `path`.
pub fn get(addr: SocketAddr, path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap()
}

/// Accepted connections of `listener` as a stream, for tonic's `serve_with_incoming`.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    })
}

/// Waits until `f` holds, polling every 10 ms for at most about 10 s (real-time tests over
/// real sockets on a multi-thread runtime); returns whether it did. Asserts no timing.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if f() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    f()
}
