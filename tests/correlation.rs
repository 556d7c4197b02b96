//! Correlation ids over real loopback sockets: axum → hyper client → axum, tonic → tonic,
//! hostile input, and 1000 concurrent requests.

mod support;

use std::sync::{Arc, Mutex};

use axum::{Router, extract::State, http::HeaderMap, routing::get};
use steadfast::correlation::{ClientCorrelationIdLayer, CorrelationId, CorrelationIdLayer};
use support::{get as get_req, http_client, serve_axum};
use tower::{ServiceBuilder, ServiceExt};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Records every span's `correlation_id` field and every event's fields, as text.
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<String>>>,
    everything: Arc<Mutex<String>>,
}

struct Visitor<'a> {
    id: Option<String>,
    all: &'a mut String,
}

impl tracing::field::Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.all.push_str(&text);
        self.all.push('\n');
        if field.name() == "correlation_id" {
            self.id = Some(text);
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        let mut all = self.everything.lock().unwrap();
        let mut v = Visitor {
            id: None,
            all: &mut all,
        };
        attrs.record(&mut v);
        if let Some(id) = v.id {
            self.spans.lock().unwrap().push(id);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut all = self.everything.lock().unwrap();
        event.record(&mut Visitor {
            id: None,
            all: &mut all,
        });
    }
}

/// B: reports the id it received (header), its ambient id, and echoes.
async fn b_handler(State(seen): State<Arc<Mutex<Vec<String>>>>, headers: HeaderMap) -> String {
    let received = headers["x-correlation-id"].to_str().unwrap().to_owned();
    assert_eq!(CorrelationId::current().unwrap().as_str(), received);
    seen.lock().unwrap().push(received.clone());
    received
}

async fn two_hops() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let b = serve_axum(
        Router::new()
            .route("/b", get(b_handler))
            .with_state(seen.clone())
            .layer(CorrelationIdLayer::new()),
    )
    .await;
    // A's handler calls B through a client stack; it has no correlation code.
    let client = ServiceBuilder::new()
        .layer(ClientCorrelationIdLayer::new())
        .service(http_client());
    let a = serve_axum(
        Router::new()
            .route(
                "/a",
                get(move || {
                    let client = client.clone();
                    async move {
                        let res = client.oneshot(get_req(b, "/b")).await.unwrap();
                        let echoed_by_b = res.headers()["x-correlation-id"]
                            .to_str()
                            .unwrap()
                            .to_owned();
                        let body = http_body_util::BodyExt::collect(res.into_body())
                            .await
                            .unwrap()
                            .to_bytes();
                        assert_eq!(body, echoed_by_b.as_bytes());
                        echoed_by_b
                    }
                }),
            )
            .layer(CorrelationIdLayer::new()),
    )
    .await;
    (a, seen)
}

#[tokio::test]
async fn one_id_flows_edge_to_downstream_with_no_handler_code() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let (a, seen) = two_hops().await;

    let mut req = get_req(a, "/a");
    req.headers_mut()
        .insert("x-correlation-id", "edge-123".parse().unwrap());
    let res = http_client().request(req).await.unwrap();
    assert_eq!(res.headers()["x-correlation-id"], "edge-123", "A echoes");
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "edge-123", "B echoed the same id to A");
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["edge-123".to_owned()],
        "B received it"
    );
    assert_eq!(
        *capture.spans.lock().unwrap(),
        vec!["edge-123".to_owned(), "edge-123".to_owned()],
        "A's span and B's span"
    );
}

#[tokio::test]
async fn invalid_inbound_id_is_replaced_and_the_replacement_travels() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let (a, seen) = two_hops().await;

    let mut req = get_req(a, "/a");
    let hostile = http::HeaderValue::from_bytes(b"EVIL%0D%0Ainjected: yes \xff").unwrap();
    req.headers_mut().insert("x-correlation-id", hostile);
    let res = http_client().request(req).await.unwrap();
    let replaced = res.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!replaced.contains("EVIL"));
    assert_eq!(replaced.len(), 36);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![replaced.clone()],
        "downstream sees the replacement"
    );
    assert!(
        !capture.everything.lock().unwrap().contains("EVIL"),
        "the raw value is never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_never_mix_ids() {
    let (a, seen) = two_hops().await;
    let client = http_client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let client = client.clone();
        tasks.spawn(async move {
            let id = format!("req-{i}");
            let mut req = get_req(a, "/a");
            req.headers_mut()
                .insert("x-correlation-id", id.parse().unwrap());
            let res = client.request(req).await.unwrap();
            assert_eq!(res.headers()["x-correlation-id"], id.as_str());
            let body = http_body_util::BodyExt::collect(res.into_body())
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(body, id.as_bytes(), "B saw this request's own id");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let mut ids = seen.lock().unwrap().clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1000);
}

#[tokio::test]
async fn tonic_hop_carries_the_id_in_metadata() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = {
        let seen = seen.clone();
        tower::util::MapRequestLayer::new(move |req: http::Request<tonic::body::Body>| {
            seen.lock()
                .unwrap()
                .push(CorrelationId::current().unwrap().to_string());
            req
        })
    };
    let incoming = support::incoming(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(CorrelationIdLayer::new())
            .layer(record)
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stack = ServiceBuilder::new()
        .layer(ClientCorrelationIdLayer::new())
        .service(channel);
    let mut client = HealthClient::new(stack);
    let id = CorrelationId::parse("grpc-hop-1").unwrap();
    let res = id
        .scope(client.check(HealthCheckRequest {
            service: String::new(),
        }))
        .await
        .unwrap();
    assert_eq!(
        res.metadata().get("x-correlation-id").unwrap(),
        "grpc-hop-1"
    );
    assert_eq!(*seen.lock().unwrap(), vec!["grpc-hop-1".to_owned()]);
}
