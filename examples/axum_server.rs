//! Run: `cargo run --example axum_server` (then `curl -i localhost:3000/hello`)
//!
//! An axum server with the standard server stack — no `HandleErrorLayer` — and the two ways
//! to place a circuit breaker in front of routes:
//!
//! - `Router::layer(breaker.answering())` on a router: one breaker shared by its routes
//!   (the layer value owns the state; axum applies it per route, but they all share it).
//! - `route_layer` with a layer built *per route*: one breaker per route.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use steadfast::breaker::CircuitBreakerLayer;
use steadfast::common::Deadline;
use steadfast::correlation::CorrelationId;

/// What a handler sees: the id and the remaining deadline, with no code to fetch them.
async fn hello() -> String {
    let id = CorrelationId::current()
        .map(|i| i.to_string())
        .unwrap_or_default();
    let left = Deadline::current()
        .map(|d| d.remaining())
        .unwrap_or_default();
    format!("hello; correlation_id={id}; {} ms left\n", left.as_millis())
}

fn app() -> (Router, CircuitBreakerLayer, CircuitBreakerLayer) {
    let shared = CircuitBreakerLayer::new();
    let per_route = CircuitBreakerLayer::new();
    let shared_routes = Router::new()
        .route("/hello", get(hello))
        .route("/also-shared", get(hello))
        .layer(shared.answering());
    let own = Router::new().route("/own", get(hello).route_layer(per_route.answering()));
    let app = shared_routes.merge(own).layer(
        steadfast::server::http()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("valid"),
    );
    (app, shared, per_route)
}

#[tokio::main]
async fn main() {
    let (app, _, _) = app();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000")
        .await
        .expect("bind 127.0.0.1:3000");
    println!(
        "listening on http://127.0.0.1:3000 (try /hello with -H 'x-correlation-id: abc' -H 'x-request-timeout-ms: 1500')"
    );
    axum::serve(listener, app).await.expect("server");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn handler_sees_id_and_deadline_and_breakers_are_scoped() {
        let (app, shared, per_route) = app();
        let req = http::Request::get("/hello")
            .header("x-correlation-id", "abc")
            .header("x-request-timeout-ms", "1500")
            .body(axum::body::Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.headers()["x-correlation-id"], "abc");
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body, "hello; correlation_id=abc; 1500 ms left\n");
        for path in ["/hello", "/also-shared", "/own"] {
            let req = http::Request::get(path)
                .body(axum::body::Body::empty())
                .unwrap();
            app.clone().oneshot(req).await.unwrap();
        }
        assert_eq!(
            shared.handle().metrics().calls,
            3,
            "/hello twice and /also-shared: one breaker"
        );
        assert_eq!(per_route.handle().metrics().calls, 1, "/own has its own");
    }
}
