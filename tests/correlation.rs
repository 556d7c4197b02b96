//! Correlation ids over real loopback sockets: axum → hyper client → axum, tonic → tonic,
//! hostile input, and 1000 concurrent requests.

mod support;

use std::sync::{Arc, Mutex};

use axum::{Router, extract::State, http::HeaderMap, routing::get};
use steadfast::correlation::{CorrelationId, PropagateCorrelationIdLayer, SetCorrelationIdLayer};
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
            .layer(SetCorrelationIdLayer::new()),
    )
    .await;
    // A's handler calls B through a client stack; it has no correlation code.
    let client = ServiceBuilder::new()
        .layer(PropagateCorrelationIdLayer::new())
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
            .layer(SetCorrelationIdLayer::new()),
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
            .layer(SetCorrelationIdLayer::new())
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
        .layer(PropagateCorrelationIdLayer::new())
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

/// A gateway that forwards every inbound header upstream, behind the server layer and in
/// front of the client layer. A valid id beside a hostile one must not carry the hostile one
/// across the hop: after the server layer the handler sees exactly one id header, and the
/// upstream receives exactly one. Duplicated `x-request-id` and `traceparent` fields are
/// ambiguous: neither copy is taken as the id, and neither reaches the handler.
#[tokio::test]
async fn duplicate_id_headers_never_cross_a_hop() {
    let upstream = steadfast_testkit::FaultServer::start().await;
    let url = upstream.url("/orders");
    let seen_by_handler: Arc<Mutex<Option<HeaderMap>>> = Arc::default();
    let seen = seen_by_handler.clone();
    let client = ServiceBuilder::new()
        .layer(PropagateCorrelationIdLayer::new())
        .service(http_client());
    let gateway = serve_axum(
        Router::new()
            .route(
                "/orders",
                get(move |headers: HeaderMap| {
                    let client = client.clone();
                    let url = url.clone();
                    *seen.lock().unwrap() = Some(headers.clone());
                    async move {
                        let mut out = http::Request::get(url)
                            .body(http_body_util::Full::default())
                            .unwrap();
                        for (name, value) in &headers {
                            if name != http::header::HOST {
                                out.headers_mut().append(name, value.clone());
                            }
                        }
                        client.oneshot(out).await.unwrap().status()
                    }
                }),
            )
            .layer(
                SetCorrelationIdLayer::builder()
                    .from_traceparent(true)
                    .build()
                    .unwrap(),
            ),
    )
    .await;

    let mut req = get_req(gateway, "/orders");
    let h = req.headers_mut();
    h.append("x-correlation-id", "good-1".parse().unwrap());
    h.append("x-correlation-id", "EVIL PAYLOAD <script>".parse().unwrap());
    h.append("x-request-id", "req-1".parse().unwrap());
    h.append("x-request-id", "EVIL-2 <x>".parse().unwrap());
    h.append(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .unwrap(),
    );
    h.append(
        "traceparent",
        "00-11111111111111111111111111111111-2222222222222222-01"
            .parse()
            .unwrap(),
    );
    let res = http_client().request(req).await.unwrap();
    assert_eq!(res.status(), 200);

    let echoed: Vec<_> = res.headers().get_all("x-correlation-id").iter().collect();
    assert_eq!(echoed.len(), 1, "one id on the response");
    let id = echoed[0].to_str().unwrap().to_owned();
    assert!(
        !["good-1", "req-1", "0af7651916cd43dd8448eb211c80319c"].contains(&id.as_str()),
        "an ambiguous header is not an id: {id}"
    );

    let handler = seen_by_handler.lock().unwrap().take().unwrap();
    let ids: Vec<_> = handler.get_all("x-correlation-id").iter().collect();
    assert_eq!(
        ids,
        vec![id.as_str()],
        "the handler sees exactly the accepted id"
    );
    assert!(
        !handler.contains_key("x-request-id"),
        "ambiguous copies removed"
    );
    assert!(
        !handler.contains_key("traceparent"),
        "ambiguous copies removed"
    );

    let received = upstream.received();
    assert_eq!(received.len(), 1);
    let sent: Vec<_> = received[0]
        .headers
        .get_all("x-correlation-id")
        .iter()
        .collect();
    assert_eq!(sent, vec![id.as_str()], "exactly one id crosses the hop");
    let all = format!("{:?}", received[0].headers);
    assert!(
        !all.contains("EVIL"),
        "no hostile value reaches the upstream: {all}"
    );
}

/// The client layer alone: a request that carries two id fields (one valid) is sent with one.
#[tokio::test]
async fn the_client_layer_sends_exactly_one_id() {
    let upstream = steadfast_testkit::FaultServer::start().await;
    let client = ServiceBuilder::new()
        .layer(PropagateCorrelationIdLayer::new())
        .service(http_client());
    let mut req = http::Request::get(upstream.url("/"))
        .body(http_body_util::Full::default())
        .unwrap();
    req.headers_mut()
        .append("x-correlation-id", "good-1".parse().unwrap());
    req.headers_mut()
        .append("x-correlation-id", "EVIL <script>".parse().unwrap());
    client.oneshot(req).await.unwrap();
    let sent: Vec<_> = upstream.received()[0]
        .headers
        .get_all("x-correlation-id")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(!sent[0].contains("EVIL"));
}

/// A handler that sets its own id on its response keeps it: the layer echoes only onto a
/// response that has none.
#[tokio::test]
async fn a_handler_s_own_response_id_wins() {
    let server = serve_axum(
        Router::new()
            .route(
                "/",
                get(|| async { ([("x-correlation-id", "set-by-handler")], "ok") }),
            )
            .layer(SetCorrelationIdLayer::new()),
    )
    .await;
    let mut req = get_req(server, "/");
    req.headers_mut()
        .insert("x-correlation-id", "inbound-1".parse().unwrap());
    let res = http_client().request(req).await.unwrap();
    let ids: Vec<_> = res.headers().get_all("x-correlation-id").iter().collect();
    assert_eq!(ids, vec!["set-by-handler"]);
}

/// With a valid `x-correlation-id`, the headers the layer reads beside it are still cleaned:
/// duplicated or invalid `x-request-id` and `traceparent` never reach the handler (a valid
/// single one is kept).
#[tokio::test]
async fn beside_a_valid_id_ambiguous_or_invalid_fallbacks_are_removed() {
    let seen: Arc<Mutex<Option<HeaderMap>>> = Arc::default();
    let s = seen.clone();
    let server = serve_axum(
        Router::new()
            .route(
                "/",
                get(move |headers: HeaderMap| {
                    *s.lock().unwrap() = Some(headers);
                    async { "ok" }
                }),
            )
            .layer(
                SetCorrelationIdLayer::builder()
                    .from_traceparent(true)
                    .build()
                    .unwrap(),
            ),
    )
    .await;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    // Extra inbound headers, then whether x-request-id and traceparent reach the handler.
    type Case<'a> = (&'a [(&'static str, &'a str)], bool, bool);
    let cases: [Case; 4] = [
        (
            &[("x-request-id", "r1"), ("x-request-id", "EVIL <x>")],
            false,
            false,
        ),
        (&[("x-request-id", "EVIL <x>")], false, false),
        (&[("traceparent", tp), ("traceparent", tp)], false, false),
        (&[("x-request-id", "r1"), ("traceparent", tp)], true, true),
    ];
    for (extra, keeps_request_id, keeps_traceparent) in cases {
        let mut req = get_req(server, "/");
        req.headers_mut()
            .insert("x-correlation-id", "good-1".parse().unwrap());
        for (k, v) in extra {
            req.headers_mut().append(*k, v.parse().unwrap());
        }
        http_client().request(req).await.unwrap();
        let h = seen.lock().unwrap().take().unwrap();
        let ids: Vec<_> = h.get_all("x-correlation-id").iter().collect();
        assert_eq!(ids, vec!["good-1"], "{extra:?}");
        assert_eq!(
            h.contains_key("x-request-id"),
            keeps_request_id,
            "{extra:?}"
        );
        assert_eq!(
            h.contains_key("traceparent"),
            keeps_traceparent,
            "{extra:?}"
        );
        assert!(!format!("{h:?}").contains("EVIL"), "{extra:?}");
    }
}

/// W3C trace context through two real hops: A's handler calls B with no tracing code; B sees
/// A's trace id and flags with a new parent id, and the tracestate, or nothing at all when
/// what reached A broke the rules.
#[tokio::test]
async fn trace_context_flows_from_the_inbound_request_to_outgoing_calls() {
    let b = serve_axum(Router::new().route(
        "/b",
        get(|headers: HeaderMap| async move {
            let get = |name: &str| {
                let all: Vec<_> = headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect();
                all.join(" | ")
            };
            format!("{}\n{}", get("traceparent"), get("tracestate"))
        }),
    ))
    .await;
    let client = ServiceBuilder::new()
        .layer(PropagateCorrelationIdLayer::new())
        .service(http_client());
    let a = serve_axum(
        Router::new()
            .route(
                "/a",
                get(move || {
                    let client = client.clone();
                    async move {
                        let res = client.oneshot(get_req(b, "/b")).await.unwrap();
                        let body = http_body_util::BodyExt::collect(res.into_body())
                            .await
                            .unwrap()
                            .to_bytes();
                        String::from_utf8(body.to_vec()).unwrap()
                    }
                }),
            )
            .layer(SetCorrelationIdLayer::new()),
    )
    .await;
    let call = |headers: Vec<(&'static str, &'static str)>| {
        let mut req = get_req(a, "/a");
        for (k, v) in headers {
            req.headers_mut().append(k, v.parse().unwrap());
        }
        async move {
            let res = http_client().oneshot(req).await.unwrap();
            let body = http_body_util::BodyExt::collect(res.into_body())
                .await
                .unwrap()
                .to_bytes();
            let text = String::from_utf8(body.to_vec()).unwrap();
            let (tp, ts) = text.split_once('\n').unwrap();
            (tp.to_owned(), ts.to_owned())
        }
    };
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    let (tp, ts) = call(vec![
        ("traceparent", TP),
        ("tracestate", "rojo=00f067aa0ba902b7"),
        ("tracestate", "congo=t61rcWkgMzE"),
    ])
    .await;
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
    assert_ne!(parts[2], "00f067aa0ba902b7", "A's call is a new span");
    assert_ne!(parts[2], "0000000000000000");
    assert_eq!(parts[3], "01", "flags kept");
    assert_eq!(ts, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");

    // Unsampled stays unsampled; a bad tracestate is dropped, the traceparent still counts.
    let (tp, ts) = call(vec![
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        ),
        ("tracestate", "Bad=Key"),
    ])
    .await;
    assert!(tp.ends_with("-00"), "{tp}");
    assert_eq!(ts, "");

    for bad in [
        vec![("traceparent", TP), ("traceparent", TP)],
        vec![(
            "traceparent",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        )],
        vec![(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        )],
        vec![(
            "traceparent",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
        vec![(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        )],
        vec![],
    ] {
        let sent = format!("{bad:?}");
        let mut with_state = bad;
        with_state.push(("tracestate", "congo=t61rcWkgMzE"));
        assert_eq!(
            call(with_state).await,
            (String::new(), String::new()),
            "nothing of {sent} goes further"
        );
    }
}

/// What reaches the handler of the trace headers the server layer refused: nothing (a
/// hostile pass found a refused traceparent's tracestate, an orphan tracestate, and a valid
/// tracestate over 8 KiB treated wrongly).
#[tokio::test]
async fn refused_trace_headers_never_reach_the_handler_and_long_valid_ones_do() {
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    async fn seen_by_handler(
        server: steadfast::server::ServerBuilder,
        headers: &[(&str, &str)],
    ) -> Vec<String> {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let s = seen.clone();
        let app = Router::new()
            .route(
                "/",
                get(move |h: HeaderMap| {
                    *s.lock().unwrap() = h
                        .get_all("tracestate")
                        .iter()
                        .map(|v| v.to_str().unwrap().to_owned())
                        .collect();
                    async { "ok" }
                }),
            )
            .layer(server.build().unwrap());
        let addr = serve_axum(app).await;
        let mut req = get_req(addr, "/");
        for (k, v) in headers {
            req.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let res = http_client().request(req).await.unwrap();
        assert_eq!(res.status(), 200);
        std::mem::take(&mut *seen.lock().unwrap())
    }
    let twice = [
        ("traceparent", TP),
        ("traceparent", TP),
        ("tracestate", "congo=x"),
    ];
    for server in [
        steadfast::server::http(),
        steadfast::server::http().correlation(|c| c.from_traceparent(true)),
    ] {
        assert!(seen_by_handler(server, &twice).await.is_empty());
    }
    for orphan in ["a=1,a=2", "congo=x"] {
        assert!(
            seen_by_handler(steadfast::server::http(), &[("tracestate", orphan)])
                .await
                .is_empty(),
            "{orphan}"
        );
    }
    // The longest valid tracestate: 32 members of a 256-byte key and a 256-byte value.
    let long: Vec<String> = (0..32)
        .map(|i| format!("k{i:03}{}={}", "x".repeat(252), "v".repeat(256)))
        .collect();
    let long = long.join(",");
    let seen = seen_by_handler(
        steadfast::server::http(),
        &[("traceparent", TP), ("tracestate", &long)],
    )
    .await;
    assert_eq!(seen, [long]);
}
