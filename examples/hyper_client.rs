//! Run: `cargo run --example hyper_client -- http://127.0.0.1:3000/hello`
//!
//! A hyper-util client wrapped by the standard client stack. Without an argument it starts
//! a small flaky upstream on 127.0.0.1 (503 twice, then 200) and calls that.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use steadfast::correlation::CorrelationId;
use steadfast::retry::ReplayBody;
use steadfast_testkit::{Fault, FaultServer};
use tower::{Layer, ServiceExt};

async fn fetch(url: &str) -> Result<(u16, String), steadfast::common::BoxError> {
    let transport: Client<_, ReplayBody<Full<Bytes>>> =
        Client::builder(TokioExecutor::new()).build_http();
    let client = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(6))
        .build()?
        .layer(transport);
    let req = http::Request::get(url).body(Full::default())?;
    // Any ambient id is stamped on the request; here we set one for the whole call.
    let id = CorrelationId::parse("hyper-client-example").expect("valid id");
    let res = id.scope(client.oneshot(req)).await?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::main]
async fn main() {
    let arg = std::env::args().nth(1);
    let server;
    let url = match arg {
        Some(url) => url,
        None => {
            server = FaultServer::start().await;
            server.script([Fault::status(503), Fault::status(503)]);
            server.url("/")
        }
    };
    match fetch(&url).await {
        Ok((status, body)) => println!("{status} {body}"),
        Err(e) => {
            eprintln!("request failed: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_through_a_flaky_upstream() {
        let server = FaultServer::start().await;
        server.script([Fault::status(503), Fault::status(503)]);
        let (status, _) = fetch(&server.url("/")).await.unwrap();
        assert_eq!(status, 200);
        let seen = server.received();
        assert_eq!(seen.len(), 3);
        assert!(
            seen.iter()
                .all(|r| r.headers["x-correlation-id"] == "hyper-client-example")
        );
    }
}
