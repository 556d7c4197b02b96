//! The services: users, inventory, payments, orders and the gateway, each behind the standard
//! server stack, each calling the next through the standard client stack.

#[allow(unused_imports)]
use super::*;

pub(crate) type Transport = Client<HttpConnector, ReplayBody<Body>>;
pub(crate) type Stack = HttpClient<Transport>;

pub(crate) fn transport() -> Transport {
    Client::builder(TokioExecutor::new()).build_http()
}

pub(crate) async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    addr
}

pub(crate) fn log_hop(hop: &str, what: &str) {
    tracing::info!(hop, what, "handled");
}

/// Calls `uri` through a client stack inside an `upstream_call` span; the stack's errors
/// become the answers a gateway gives (`steadfast::errors`: 504 for a timeout, 503 +
/// Retry-After for an open breaker, 502 for a transport error).
pub(crate) async fn call(
    stack: Stack,
    caller: &str,
    upstream: &str,
    req: http::Request<Body>,
) -> Response {
    let began = Instant::now();
    let span = tracing::info_span!("upstream_call", caller, upstream);
    let out = stack.oneshot(req).instrument(span).await;
    let latency = began.elapsed();
    match out {
        Ok(res) => {
            record_call(caller, upstream, latency, Some(res.status()), false);
            let (parts, body) = res.into_parts();
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            let rejected = matches!(Failure::of(&*e), Failure::BreakerOpen { .. });
            record_call(caller, upstream, latency, None, rejected);
            errors::http_response::<Body>(&*e).map(Body::new)
        }
    }
}

pub(crate) fn in_window(t: Duration, w: (Duration, Duration)) -> bool {
    t >= w.0 && t < w.1
}

pub(crate) fn users(scen: Arc<Scenario>) -> Router {
    let hits = Arc::new(AtomicU64::new(0));
    Router::new()
        .route(
            "/users/{id}",
            get(move |Path(id): Path<u64>| {
                let (scen, hits) = (scen.clone(), hits.clone());
                async move {
                    let t = start().elapsed();
                    if in_window(t, scen.users_down) {
                        log_hop("users", "down: 503");
                        return (StatusCode::SERVICE_UNAVAILABLE, "down\n").into_response();
                    }
                    // A brownout: every other call fails. Too few in a row to open the
                    // breaker; the retries it asks for are what the budget exists to cap.
                    if in_window(t, scen.users_brownout)
                        && hits.fetch_add(1, Ordering::Relaxed) % 2 == 0
                    {
                        log_hop("users", "brownout: 503");
                        return (StatusCode::SERVICE_UNAVAILABLE, "brownout\n").into_response();
                    }
                    log_hop("users", "200");
                    format!("user {id}\n").into_response()
                }
            }),
        )
        .layer(steadfast::server::http().build().expect("server stack"))
}

pub(crate) fn inventory(scen: Arc<Scenario>) -> Router {
    let hits = Arc::new(AtomicU64::new(0));
    Router::new()
        .route(
            "/items/{id}",
            get(move |Path(id): Path<u64>| {
                let (scen, hits) = (scen.clone(), hits.clone());
                async move {
                    let n = hits.fetch_add(1, Ordering::Relaxed);
                    if n % scen.inventory_stall_every == scen.inventory_stall_every - 1 {
                        log_hop("inventory", "stalling past the attempt timeout");
                        tokio::time::sleep(scen.inventory_stall).await;
                    }
                    log_hop("inventory", "200");
                    format!("item {id}: 3 in stock\n")
                }
            }),
        )
        .layer(steadfast::server::http().build().expect("server stack"))
}

pub(crate) fn payments(scen: Arc<Scenario>) -> Router {
    Router::new()
        .route(
            "/charge",
            post(move || {
                let scen = scen.clone();
                async move {
                    let t = start().elapsed();
                    if scen.payments_bursts.iter().any(|w| in_window(t, *w)) {
                        log_hop("payments", "burst: 503 Retry-After 1");
                        let mut res = (StatusCode::SERVICE_UNAVAILABLE, "busy\n").into_response();
                        res.headers_mut()
                            .insert("retry-after", HeaderValue::from_static("1"));
                        return res;
                    }
                    log_hop("payments", "charged");
                    "charged\n".into_response()
                }
            }),
        )
        .layer(steadfast::server::http().build().expect("server stack"))
}

#[derive(Clone)]
pub(crate) struct Orders {
    pub(crate) name: &'static str,
    /// Answers 503 to every other order, before doing any work (a bad deploy).
    pub(crate) flaky: Option<Arc<AtomicU64>>,
    pub(crate) client: Arc<HttpClientLayer>,
    pub(crate) transport: Transport,
    pub(crate) inventory: SocketAddr,
    pub(crate) payments: SocketAddr,
}

pub(crate) async fn place_order(State(o): State<Orders>, Path(id): Path<u64>) -> Response {
    if let Some(n) = &o.flaky {
        if n.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
            log_hop(o.name, "503 (bad deploy)");
            return (StatusCode::SERVICE_UNAVAILABLE, "try another instance\n").into_response();
        }
    }
    // No id or deadline code: both travel with the client stack.
    log_hop(o.name, "placing order");
    let stack = o.client.layer(o.transport.clone());
    let item = http::Request::get(format!("http://{}/items/{id}", o.inventory))
        .body(Body::empty())
        .expect("request");
    let inv = call(stack.clone(), o.name, "inventory", item).await;
    if !inv.status().is_success() {
        log_hop(o.name, "inventory failed");
        return (StatusCode::BAD_GATEWAY, "inventory unavailable\n").into_response();
    }
    let charge = http::Request::post(format!("http://{}/charge", o.payments))
        .header("idempotency-key", format!("order-{id}"))
        .body(Body::from(format!("{{\"order\":{id}}}")))
        .expect("request");
    let pay = call(stack, o.name, "payments", charge).await;
    if !pay.status().is_success() {
        log_hop(o.name, "payment failed");
        return (StatusCode::BAD_GATEWAY, "payment unavailable\n").into_response();
    }
    log_hop(o.name, "order placed");
    format!("order {id} placed by {}\n", o.name).into_response()
}

#[derive(Clone)]
pub(crate) struct Gateway {
    pub(crate) client: Arc<HttpClientLayer>,
    /// The client stack for the orders *service*: balanced over its instances.
    pub(crate) orders: Arc<HttpClientLayer>,
    pub(crate) transport: Transport,
    pub(crate) users: SocketAddr,
    pub(crate) inventory: SocketAddr,
    pub(crate) payments: SocketAddr,
    pub(crate) metrics: metrics_exporter_prometheus::PrometheusHandle,
}

pub(crate) async fn proxy(
    State(gw): State<Gateway>,
    Path((service, rest)): Path<(String, String)>,
    req: Request,
) -> Response {
    forward(gw, &service, rest, req).await
}

pub(crate) async fn proxy_payments(
    State(gw): State<Gateway>,
    Path(rest): Path<String>,
    req: Request,
) -> Response {
    forward(gw, "payments", rest, req).await
}

/// Routes `/api/v1/<service>/<rest>` to `<upstream>/<rest>` through the client stack.
pub(crate) async fn forward(gw: Gateway, service: &str, rest: String, req: Request) -> Response {
    // The orders service is called by name: its client stack balances over the instances.
    let (name, authority, client) = match service {
        "users" => ("users", gw.users.to_string(), &gw.client),
        "orders" => ("orders", "orders".to_owned(), &gw.orders),
        "inventory" => ("inventory", gw.inventory.to_string(), &gw.client),
        "payments" => ("payments", gw.payments.to_string(), &gw.client),
        _ => return (StatusCode::NOT_FOUND, "no such service\n").into_response(),
    };
    log_hop("gateway", &format!("-> {name} /{rest}"));
    let (parts, body) = req.into_parts();
    let mut out = http::Request::builder()
        .method(parts.method)
        .uri(format!("http://{authority}/{rest}"))
        .body(body)
        .expect("request");
    for (k, v) in &parts.headers {
        if k != http::header::HOST {
            out.headers_mut().append(k, v.clone());
        }
    }
    call(client.layer(gw.transport.clone()), "gateway", name, out).await
}

/// A per-client-address rate limit (GCRA, the `governor` crate): one request per `per_ms`
/// milliseconds, bursts of `burst`; over it, 429 with `Retry-After`. The limiter's own clock
/// times the rejection (tower_governor 0.8 makes a new clock for every rejection, which on a
/// VM is a trip to the hypervisor: issue 22 measured it as most of the gateway's CPU under
/// a flood of rejections).
#[derive(Clone)]
pub(crate) struct Limiter(Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>);

impl Limiter {
    pub(crate) fn new(per_ms: u64, burst: u32) -> Self {
        let quota = governor::Quota::with_period(Duration::from_millis(per_ms))
            .expect("a period above zero")
            .allow_burst(std::num::NonZeroU32::new(burst).expect("a burst above zero"));
        Self(Arc::new(governor::RateLimiter::keyed(quota)))
    }
}

/// Answers 429 with `Retry-After` (whole seconds, rounded up) once a client address is over
/// its rate; passes the request on otherwise.
pub(crate) async fn limit(
    State(limiter): State<Limiter>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    use governor::clock::Clock as _;
    match limiter.0.check_key(&peer.ip()) {
        Ok(()) => next.run(req).await,
        Err(not_until) => {
            let wait = not_until.wait_time_from(limiter.0.clock().now());
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut res = (StatusCode::TOO_MANY_REQUESTS, "too many requests\n").into_response();
            res.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            res
        }
    }
}

pub(crate) fn gateway(gw: Gateway) -> Router {
    // The seed's nginx: 100 r/s per client address, burst 200; payments burst 20.
    let api = Router::new()
        .route("/api/v1/{service}/{*rest}", any(proxy))
        .layer(axum::middleware::from_fn_with_state(
            Limiter::new(10, 200),
            limit,
        ));
    let payments = Router::new()
        .route("/api/v1/payments/{*rest}", any(proxy_payments))
        .layer(axum::middleware::from_fn_with_state(
            Limiter::new(10, 20),
            limit,
        ));
    let ops = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(gw): State<Gateway>| async move { gw.metrics.render() }),
        );
    Router::new()
        .merge(payments)
        .merge(api)
        .merge(ops)
        .with_state(gw)
        .layer(
            steadfast::server::http()
                .timeout(Duration::from_secs(3))
                .build()
                .expect("server stack"),
        )
}
