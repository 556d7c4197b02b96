//! Run: `cargo run --example tonic --features tonic`
//!
//! A tonic server with the standard server stack and a tonic client `Channel` wrapped by the
//! standard client stack, using tonic-health's generated service (no protoc needed). The
//! client call carries a correlation id and a deadline; the server answers
//! DEADLINE_EXCEEDED itself when the deadline passes.

use std::net::SocketAddr;
use std::time::Duration;

use steadfast::correlation::CorrelationId;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::Layer;

async fn server() -> SocketAddr {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local addr");
    let incoming = futures_util::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(async move {
        let _reporter = _reporter;
        let _ = tonic::transport::Server::builder()
            .layer(
                steadfast::server::grpc()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("valid"),
            )
            .add_service(health)
            .serve_with_incoming(incoming)
            .await;
    });
    addr
}

async fn check(
    addr: SocketAddr,
) -> Result<(i32, String), Box<dyn std::error::Error + Send + Sync>> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let stack = steadfast::client::grpc().build()?.layer(channel);
    let mut client = HealthClient::new(stack);
    let id = CorrelationId::parse("tonic-example").expect("valid id");
    let res = id
        .scope(client.check(HealthCheckRequest {
            service: String::new(),
        }))
        .await?;
    let echoed = res
        .metadata()
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok((res.into_inner().status, echoed))
}

#[tokio::main]
async fn main() {
    let addr = server().await;
    match check(addr).await {
        Ok((status, id)) => {
            println!("health status {status} (1 = SERVING), correlation id echoed: {id}")
        }
        Err(e) => {
            eprintln!("call failed: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn client_and_server_stacks_talk() {
        let addr = server().await;
        let (status, id) = check(addr).await.unwrap();
        assert_eq!(status, 1);
        assert_eq!(id, "tonic-example");
    }
}
