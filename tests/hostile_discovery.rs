//! Hostile tests of service discovery (Consul and DNS), the endpoint set, outlier ejection and
//! balancing under membership churn, written against the documentation only
//! (`crates/steadfast-balance` crate docs, README, docs/*.md).
//!
//! Real components throughout: upstreams are axum servers on loopback (ephemeral ports), the
//! Consul agent is a fake axum server answering `/v1/health/service/<name>` with Consul's JSON,
//! `X-Consul-Index` and blocking queries (`index` / `wait`), and the DNS server is a tokio
//! `UdpSocket` (plus a TCP listener on the same port) answering hand-built packets. Every wait
//! is bounded by a guard: a hang fails, it never blocks. No timing assertions: request counts
//! over a span are compared with bounds tens of times looser than the documented schedule.

mod support;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use steadfast::balance::error::NoEndpoint;
use steadfast::balance::{BalanceBuilder, BalanceLayer, Consul, Dns, Pick};
use steadfast::common::BoxError;
use tower::{Layer, ServiceExt};

/// Every wait is bounded by this (wall or paused time): a hang is a failure.
const GUARD: Duration = Duration::from_secs(30);

async fn guard<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("hang: {what} did not finish within {GUARD:?}"),
    }
}

/// Polls `f` every 10 ms until it holds or `GUARD` runs out; returns whether it held.
async fn until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + GUARD;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

fn is_no_endpoint(err: &BoxError) -> Option<NoEndpoint> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
    while let Some(e) = cause {
        if let Some(n) = e.downcast_ref::<NoEndpoint>() {
            return Some(*n);
        }
        cause = e.source();
    }
    None
}

// ---------------------------------------------------------------------------------------
// Upstreams: axum servers that log every request (method, x-seq) and answer with their
// address in `x-who`.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ok,
    Status(u16),
    /// Logged on arrival, answered 200 once the gate opens.
    Gated,
}

struct UpInner {
    who: String,
    mode: Mutex<Mode>,
    hits: Mutex<Vec<(Method, Option<u64>)>>,
    gate: tokio::sync::watch::Sender<bool>,
}

#[derive(Clone)]
struct Up {
    addr: SocketAddr,
    inner: Arc<UpInner>,
}

impl Up {
    async fn bind(addr: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        Self::serve(listener)
    }

    fn serve(listener: tokio::net::TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(UpInner {
            who: addr.to_string(),
            mode: Mutex::new(Mode::Ok),
            hits: Mutex::new(Vec::new()),
            gate: tokio::sync::watch::channel(false).0,
        });
        let app = Router::new().fallback(up_handler).with_state(inner.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, inner }
    }

    async fn start() -> Self {
        Self::bind("127.0.0.1:0".parse().unwrap()).await
    }

    fn auth(&self) -> String {
        self.addr.to_string()
    }

    fn set(&self, m: Mode) {
        *self.inner.mode.lock().unwrap() = m;
    }

    fn hits(&self) -> usize {
        self.inner.hits.lock().unwrap().len()
    }

    fn seqs(&self) -> Vec<u64> {
        self.inner
            .hits
            .lock()
            .unwrap()
            .iter()
            .filter_map(|h| h.1)
            .collect()
    }

    fn open(&self) {
        self.inner.gate.send_replace(true);
    }
}

async fn up_handler(State(s): State<Arc<UpInner>>, req: Request<Body>) -> Response<Body> {
    let seq = req
        .headers()
        .get("x-seq")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let method = req.method().clone();
    let _ = axum::body::to_bytes(req.into_body(), usize::MAX).await;
    s.hits.lock().unwrap().push((method, seq));
    let mode = *s.mode.lock().unwrap();
    let b = Response::builder().header("x-who", s.who.as_str());
    match mode {
        Mode::Ok => b.status(200).body(Body::from("ok")).unwrap(),
        Mode::Status(c) => b.status(c).body(Body::from("fail")).unwrap(),
        Mode::Gated => {
            let mut rx = s.gate.subscribe();
            let _ = rx.wait_for(|open| *open).await;
            b.status(200).body(Body::from("ok")).unwrap()
        }
    }
}

// ---------------------------------------------------------------------------------------
// A fake Consul agent.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Reply {
    /// The catalog, as Consul answers it (blocking when `index` is at or past the current one).
    Catalog,
    /// Exactly this answer, at once.
    Raw {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Accept the request and never answer.
    Hang,
    /// A 200 head with an index, then `[` and a body that never ends (stalls).
    StallBody,
    /// A 200 head with an index, then a body of `mb` megabytes (a runaway proxy).
    HugeBody { mb: usize },
}

#[derive(Clone, Debug)]
struct CReq {
    path: String,
    query: Vec<(String, String)>,
    token: Option<String>,
}

impl CReq {
    fn param(&self, k: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
    }
}

struct CState {
    index: tokio::sync::watch::Sender<u64>,
    body: Mutex<String>,
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Reply>,
    /// Replaces the `X-Consul-Index` header of catalog answers: `None`: the index; `Some(v)`:
    /// one header per value (empty: no header).
    index_header: Mutex<Option<Vec<String>>>,
    log: Mutex<Vec<CReq>>,
}

#[derive(Clone)]
struct FakeConsul {
    addr: SocketAddr,
    st: Arc<CState>,
}

impl FakeConsul {
    async fn start() -> Self {
        let st = Arc::new(CState {
            index: tokio::sync::watch::channel(1).0,
            body: Mutex::new("[]".into()),
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(Reply::Catalog),
            index_header: Mutex::new(None),
            log: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .fallback(consul_handler)
            .with_state(st.clone());
        let addr = support::serve_axum(app).await;
        Self { addr, st }
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the service's passing instances and moves the index on.
    fn set(&self, entries: &[String]) {
        *self.st.body.lock().unwrap() = format!("[{}]", entries.join(","));
        self.st.index.send_modify(|i| *i += 1);
    }

    /// A restarted agent: the catalog at a given (possibly lower) index.
    fn set_at(&self, index: u64, entries: &[String]) {
        *self.st.body.lock().unwrap() = format!("[{}]", entries.join(","));
        self.st.index.send_replace(index);
    }

    fn index(&self) -> u64 {
        *self.st.index.borrow()
    }

    fn push(&self, r: Reply) {
        self.st.script.lock().unwrap().push_back(r);
    }

    fn default(&self, r: Reply) {
        *self.st.default.lock().unwrap() = r;
    }

    fn index_header(&self, v: Option<Vec<String>>) {
        *self.st.index_header.lock().unwrap() = v;
    }

    fn requests(&self) -> Vec<CReq> {
        self.st.log.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.st.log.lock().unwrap().len()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match h.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(kv), String::new()),
        })
        .collect()
}

/// Consul's duration syntax.
fn parse_wait(s: &str) -> Option<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

async fn consul_handler(State(st): State<Arc<CState>>, req: Request<Body>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = parse_query(req.uri().query());
    let token = req
        .headers()
        .get("x-consul-token")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let creq = CReq {
        path: path.clone(),
        query,
        token,
    };
    st.log.lock().unwrap().push(creq.clone());
    if !path.starts_with("/v1/health/service/") {
        return Response::builder().status(404).body(Body::empty()).unwrap();
    }
    let reply = st
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| st.default.lock().unwrap().clone());
    match reply {
        Reply::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::StallBody => {
            use futures_util::StreamExt;
            let s = futures_util::stream::once(async {
                Ok::<_, std::io::Error>(Bytes::from_static(b"["))
            })
            .chain(futures_util::stream::pending());
            Response::builder()
                .status(200)
                .header("x-consul-index", (*st.index.borrow() + 1).to_string())
                .body(Body::from_stream(s))
                .unwrap()
        }
        Reply::HugeBody { mb } => {
            use futures_util::StreamExt;
            let chunk = Bytes::from(
                format!("{},", entry_raw("10.0.0.1", "10.0.0.1", Some("8080"), 1))
                    .repeat(1 + (1 << 20) / 2000),
            );
            let head = futures_util::stream::once(async {
                Ok::<_, std::io::Error>(Bytes::from_static(b"["))
            });
            let s = head.chain(futures_util::stream::iter(
                (0..mb).map(move |_| Ok(chunk.clone())),
            ));
            Response::builder()
                .status(200)
                .header("x-consul-index", (*st.index.borrow() + 1).to_string())
                .body(Body::from_stream(s))
                .unwrap()
        }
        Reply::Raw {
            status,
            headers,
            body,
        } => {
            let mut b = Response::builder()
                .status(status)
                .header("content-type", "application/json");
            for (k, v) in headers {
                b = b.header(k, v);
            }
            b.body(Body::from(body)).unwrap()
        }
        Reply::Catalog => {
            if let Some(n) = creq.param("index").and_then(|i| i.parse::<u64>().ok()) {
                let wait = creq
                    .param("wait")
                    .and_then(parse_wait)
                    .unwrap_or(Duration::from_secs(300))
                    .min(Duration::from_secs(600));
                let mut rx = st.index.subscribe();
                let _ = tokio::time::timeout(wait, rx.wait_for(|cur| *cur > n)).await;
            }
            let index = *st.index.borrow();
            let body = st.body.lock().unwrap().clone();
            let mut b = Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .header("x-consul-knownleader", "true")
                .header("x-consul-lastcontact", "0");
            match st.index_header.lock().unwrap().clone() {
                None => b = b.header("x-consul-index", index.to_string()),
                Some(vs) => {
                    for v in vs {
                        b = b.header("x-consul-index", v);
                    }
                }
            }
            b.body(Body::from(body)).unwrap()
        }
    }
}

/// One entry of `/v1/health/service/<name>` as Consul sends it (fields from Consul's API docs).
/// `port` is the raw JSON token of `Service.Port` (`None`: no `Port` field).
fn entry_raw(node_addr: &str, svc_addr: &str, port: Option<&str>, id: usize) -> String {
    let port_field = port.map(|p| format!("\"Port\": {p},")).unwrap_or_default();
    format!(
        r#"{{
  "Node": {{"ID": "40e4a748-2192-161a-0510-9bf59fe950b{id_mod}", "Node": "node-{id}", "Address": "{node_addr}", "Datacenter": "dc1",
    "TaggedAddresses": {{"lan": "{node_addr}", "wan": "{node_addr}"}}, "Meta": {{"instance_type": "t2.medium"}},
    "CreateIndex": 5, "ModifyIndex": 7}},
  "Service": {{"ID": "orders-{id}", "Service": "orders", "Tags": ["primary", "v2"], "Address": "{svc_addr}",
    "TaggedAddresses": {{"lan_ipv4": {{"Address": "{svc_addr}", "Port": 1}}}},
    "Meta": {{"version": "4.0"}}, {port_field} "Weights": {{"Passing": 10, "Warning": 1}},
    "EnableTagOverride": false, "Proxy": {{"Mode": "", "MeshGateway": {{}}, "Expose": {{}}}},
    "Connect": {{}}, "PeerName": "", "Namespace": "default", "Partition": "default",
    "CreateIndex": 8, "ModifyIndex": 9}},
  "Checks": [
    {{"Node": "node-{id}", "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
      "Notes": "", "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "",
      "ServiceTags": [], "Type": "", "Interval": "", "Timeout": "", "ExposedPort": 0,
      "Definition": {{}}, "Namespace": "default", "CreateIndex": 5, "ModifyIndex": 5}},
    {{"Node": "node-{id}", "CheckID": "service:orders-{id}", "Name": "Service 'orders' check",
      "Status": "passing", "Notes": "", "Output": "HTTP GET http://{svc_addr}/health: 200 OK Output: ok",
      "ServiceID": "orders-{id}", "ServiceName": "orders", "ServiceTags": ["primary", "v2"],
      "Type": "http", "Interval": "10s", "Timeout": "1s", "ExposedPort": 0, "Definition": {{}},
      "Namespace": "default", "CreateIndex": 8, "ModifyIndex": 9}}
  ]
}}"#,
        id_mod = id % 10,
    )
}

/// A passing instance at `addr` (the node elsewhere).
fn inst(addr: SocketAddr) -> String {
    entry_raw(
        "10.200.0.1",
        &addr.ip().to_string(),
        Some(&addr.port().to_string()),
        addr.port() as usize,
    )
}

fn consul(fake: &FakeConsul) -> Consul {
    Consul::new(&fake.base(), "orders")
        .unwrap()
        .wait(Duration::from_secs(2))
}

fn listed<C>(h: &steadfast::balance::EndpointsHandle<C>) -> HashSet<String> {
    h.list().iter().map(|e| e.authority.to_string()).collect()
}

fn set_of<const N: usize>(a: [&str; N]) -> HashSet<String> {
    a.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------
// A balancer straight over a hyper-util client (one attempt per call), and the full stack.
// ---------------------------------------------------------------------------------------

type Bal = steadfast::balance::Balance<support::HttpClient>;

fn balancer(f: impl FnOnce(BalanceBuilder) -> BalanceBuilder) -> (BalanceLayer, Bal) {
    let layer = f(BalanceLayer::builder().seed(7)).build().unwrap();
    let svc = layer.layer(support::http_client());
    (layer, svc)
}

fn get_req() -> Request<Full<Bytes>> {
    Request::get("http://orders/x")
        .body(Full::default())
        .unwrap()
}

/// One GET: (status, x-who) or the error.
async fn call(svc: &Bal) -> Result<(u16, String), BoxError> {
    let res = guard("a balanced call", svc.clone().oneshot(get_req())).await?;
    let who = res
        .headers()
        .get("x-who")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let status = res.status().as_u16();
    let _ = res.into_body().collect().await;
    Ok((status, who))
}

type Stack = steadfast::client::HttpClient<support::Transport<Full<Bytes>>>;

fn stack() -> (steadfast::client::HttpClientLayer, Stack) {
    let layer = steadfast::client::http()
        .attempt_timeout(Duration::from_secs(10))
        .total_timeout(Duration::from_secs(25))
        .balance(|b| b.seed(11))
        .build()
        .unwrap();
    let client = layer.layer(support::transport::<Full<Bytes>>());
    (layer, client)
}

fn post(seq: u64) -> Request<Full<Bytes>> {
    Request::post("http://orders/orders")
        .header("x-seq", seq.to_string())
        .body(Full::new(Bytes::from_static(b"{\"order\":1}")))
        .unwrap()
}

/// A POST through the stack: (status, x-who) or the error.
async fn post_call(client: &Stack, seq: u64) -> Result<(u16, String), BoxError> {
    let res = guard(
        "a POST through the stack",
        client.clone().oneshot(post(seq)),
    )
    .await?;
    let who = res
        .headers()
        .get("x-who")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let status = res.status().as_u16();
    let _ = res.into_body().collect().await;
    Ok((status, who))
}

// =======================================================================================
// Consul
// =======================================================================================

/// Baseline: the passing instances become the set; a change answers the blocked query; the
/// queries ask for `passing` and block on the index; the token travels as a header only.
#[tokio::test(start_paused = true)]
async fn consul_follows_passing_instances_with_blocking_queries() {
    let (a, b) = (Up::start().await, Up::start().await);
    let fake = FakeConsul::start().await;
    fake.set(&[inst(a.addr)]);
    let (layer, svc) = balancer(|b| b);
    let follower = layer.handle().follow_consul(
        consul(&fake)
            .wait(Duration::from_secs(20))
            .token("s3cr3t-token")
            .unwrap(),
    );
    let h = layer.handle();
    assert!(
        until(|| listed(&h) == set_of([&a.auth()])).await,
        "set never became [a]: {:?}",
        listed(&h)
    );
    for _ in 0..10 {
        assert_eq!(call(&svc).await.unwrap(), (200, a.auth()));
    }
    fake.set(&[inst(a.addr), inst(b.addr)]);
    assert!(
        until(|| listed(&h) == set_of([&a.auth(), &b.auth()])).await,
        "a change must reach the balancer as soon as Consul knows it: {:?}",
        listed(&h)
    );
    let reqs = fake.requests();
    assert!(
        reqs.iter().all(|r| r.path == "/v1/health/service/orders"),
        "{reqs:?}"
    );
    assert!(
        reqs.iter().all(|r| r.param("passing").is_some()),
        "every query asks for ?passing: {reqs:?}"
    );
    assert!(
        reqs.iter()
            .skip(1)
            .any(|r| r.param("index").is_some() && r.param("wait").is_some()),
        "followed with blocking queries (index and wait): {reqs:?}"
    );
    assert!(
        reqs.iter()
            .all(|r| r.token.as_deref() == Some("s3cr3t-token")),
        "token as X-Consul-Token: {reqs:?}"
    );
    assert!(
        reqs.iter().all(|r| r
            .query
            .iter()
            .all(|(k, v)| !k.contains("s3cr3t") && !v.contains("s3cr3t"))),
        "the token is never put in the URL (it would be logged): {reqs:?}"
    );
    follower.abort();
}

/// "An answer with no passing instance empties the set (calls then fail fast with
/// NoEndpoint)"; a passing instance brings calls back.
#[tokio::test(start_paused = true)]
async fn consul_empty_answer_fails_fast_then_recovers() {
    let a = Up::start().await;
    let fake = FakeConsul::start().await;
    fake.set(&[inst(a.addr)]);
    let (layer, svc) = balancer(|b| b);
    let follower = layer.handle().follow_consul(consul(&fake));
    let h = layer.handle();
    assert!(until(|| listed(&h).len() == 1).await);
    fake.set(&[]);
    assert!(
        until(|| listed(&h).is_empty()).await,
        "an empty answer empties the set"
    );
    let before = a.hits();
    for _ in 0..20 {
        let err = call(&svc)
            .await
            .expect_err("no endpoint: the call must fail");
        let ne = is_no_endpoint(&err).unwrap_or_else(|| panic!("expected NoEndpoint, got {err}"));
        assert!(ne.is_empty_set(), "is_empty_set after an empty answer");
    }
    assert_eq!(a.hits(), before, "NoEndpoint: nothing was sent");
    fake.set(&[inst(a.addr)]);
    assert!(until(|| listed(&h).len() == 1).await);
    assert_eq!(call(&svc).await.unwrap().0, 200);
    follower.abort();
}

/// A 200 whose body is not Consul's JSON (truncated, an object, `null`, binary) is not an answer
/// with no passing instance: "While Consul cannot be reached or answers an error, the set
/// stays as it is". The follower must also survive and follow the next real answer.
#[tokio::test(start_paused = true)]
async fn consul_malformed_answers_keep_the_set() {
    let (a, b) = (Up::start().await, Up::start().await);
    let fake = FakeConsul::start().await;
    fake.set(&[inst(a.addr)]);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer.handle().follow_consul(consul(&fake));
    assert!(until(|| listed(&h) == set_of([&a.auth()])).await);
    let idx = fake.index();
    let bad = |body: &str, i: u64| Reply::Raw {
        status: 200,
        headers: vec![("x-consul-index", (idx + i).to_string())],
        body: body.to_owned(),
    };
    let n0 = fake.count();
    fake.push(bad(
        "[{\"Node\": {\"Address\": \"10.0.0.1\"}, \"Service\": {\"Add",
        1,
    ));
    fake.push(bad("{\"not\": \"a list\"}", 2));
    fake.push(bad("\u{0}\u{1}\u{2}garbage", 3));
    fake.push(bad("", 4));
    // Wake the blocked query so the script is consumed.
    fake.set(&[inst(a.addr)]);
    assert!(
        until(|| fake.count() >= n0 + 5).await,
        "the follower stopped asking after a malformed answer ({} queries)",
        fake.count()
    );
    // Whatever the malformed answers did, after each of them the set must have stayed [a]:
    // sample now (the last was malformed and backoff follows).
    let now = listed(&h);
    assert_eq!(
        now,
        set_of([&a.auth()]),
        "consul.rs: \"While Consul cannot be reached or answers an error, the set stays as it is\" — a malformed answer changed the set"
    );
    fake.set(&[inst(b.addr)]);
    assert!(
        until(|| listed(&h) == set_of([&b.auth()])).await,
        "the follower must follow real answers again: {:?}",
        listed(&h)
    );
    follower.abort();
}

/// Errors (500, 429, 503): "the set stays as it is and the query is retried with a growing
/// backoff (1 s to 30 s, jittered)". Counted over 10 minutes of paused time: a growing backoff
/// capped at 30 s makes at most ~25 queries (even if the jitter halved every delay: ~45); a
/// flood makes hundreds.
#[tokio::test(start_paused = true)]
async fn consul_errors_back_off_and_keep_the_set() {
    let fake = FakeConsul::start().await;
    let (layer, _svc) = balancer(|b| b.endpoints(["127.0.0.1:1"]));
    let h = layer.handle();
    let statuses = [500u16, 429, 503, 500];
    let mut i = 0;
    fake.default(Reply::Raw {
        status: 500,
        headers: vec![("x-consul-index", "99".into())],
        body: "rpc error: No cluster leader".into(),
    });
    for s in statuses {
        fake.push(Reply::Raw {
            status: s,
            headers: vec![("retry-after", "0".into())],
            body: "[]".into(),
        });
        i += 1;
    }
    let _ = i;
    let follower = layer.handle().follow_consul(consul(&fake));
    tokio::time::sleep(Duration::from_secs(600)).await;
    let n = fake.count();
    assert_eq!(
        listed(&h),
        set_of(["127.0.0.1:1"]),
        "errors leave the set as it is"
    );
    assert!(
        n >= 5,
        "the query must be retried while Consul errs (only {n} queries in 10 min)"
    );
    assert!(
        n <= 60,
        "consul.rs: \"retried with a growing backoff (1 s to 30 s, jittered)\": {n} queries in 10 minutes of errors"
    );
    assert!(!follower.is_finished(), "the follower must not give up");
    // Consul is back: the next retry (at most ~30 s away) picks the instances up.
    let a = Up::start().await;
    fake.set(&[inst(a.addr)]);
    fake.default(Reply::Catalog);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        listed(&h),
        set_of([&a.auth()]),
        "after the backoff, a good answer replaces the set"
    );
    follower.abort();
}

/// An agent that accepts the query and never answers (a wedged agent, a dead proxy, a
/// dropped connection without RST) must not stop discovery forever: "While Consul cannot be
/// reached ... the query is retried". Paused time: 30 minutes against `wait(10 s)`.
#[tokio::test(start_paused = true)]
async fn consul_hung_agent_is_abandoned_and_retried() {
    let fake = FakeConsul::start().await;
    let a = Up::start().await;
    fake.set(&[inst(a.addr)]);
    fake.push(Reply::Hang);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer
        .handle()
        .follow_consul(consul(&fake).wait(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_secs(1800)).await;
    let n = fake.count();
    assert!(
        n >= 2 && listed(&h) == set_of([&a.auth()]),
        "consul.rs: \"While Consul cannot be reached or answers an error, the set stays as it is and the query is retried\": \
         after one query that never got an answer, {n} queries in 30 minutes (wait 10 s) and the set is {:?}",
        listed(&h)
    );
    follower.abort();
}

/// A slow agent (answers 10 s after the query, within the wait) is a normal blocking answer.
#[tokio::test(start_paused = true)]
async fn consul_index_going_backwards_starts_over() {
    let fake = FakeConsul::start().await;
    let (a, b, c) = (Up::start().await, Up::start().await, Up::start().await);
    fake.set_at(100, &[inst(a.addr)]);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer
        .handle()
        .follow_consul(consul(&fake).wait(Duration::from_secs(60)));
    assert!(until(|| listed(&h) == set_of([&a.auth()])).await);
    // Let the follower block at index 100.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = fake.count();
    // The agent restarts: its index is 3 now, with b.
    fake.set_at(3, &[inst(b.addr)]);
    // The query blocked on 100 runs out its wait (Consul blocks while its index <= 100) and
    // gets index 3: the follower must start over instead of blocking on 100 again.
    tokio::time::sleep(Duration::from_secs(90)).await;
    assert_eq!(
        listed(&h),
        set_of([&b.auth()]),
        "the restarted agent's answer is the set"
    );
    let after: Vec<CReq> = fake.requests()[before..].to_vec();
    assert!(
        after.iter().skip(1).all(|r| r
            .param("index")
            .is_none_or(|i| i.parse::<u64>().unwrap_or(0) < 100)),
        "consul.rs: \"An index that goes backwards (a Consul restart) starts over\": queries after the restart {:?}",
        after
            .iter()
            .map(|r| r.param("index").map(str::to_owned))
            .collect::<Vec<_>>()
    );
    // And it follows the restarted agent's changes promptly (index 4 < 100).
    fake.set_at(4, &[inst(c.addr)]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        listed(&h),
        set_of([&c.auth()]),
        "after a restart, a change (index 3 -> 4) must reach the balancer as soon as Consul knows it"
    );
    follower.abort();
}

/// Counts the queries a follower makes in ~2 s of wall time against an agent that answers
/// every query at once with `index_header` as its `X-Consul-Index` (a buggy agent or proxy).
async fn queries_against_index_header(
    index_header: Option<Vec<String>>,
) -> (usize, HashSet<String>, bool) {
    let fake = FakeConsul::start().await;
    let a = Up::start().await;
    fake.set(&[inst(a.addr)]);
    fake.index_header(index_header);
    let (layer, _svc) = balancer(|b| b);
    let follower = layer.handle().follow_consul(consul(&fake));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = fake.count();
    let set = listed(&layer.handle());
    let finished = follower.is_finished();
    follower.abort();
    (n, set, finished)
}

/// Consul documents: "Sanity check index is greater than zero ... it causes blocking queries
/// to return immediately and so any reactive code will be in a tight loop ... reset the index
/// to 1". The follower says it follows Consul's protocol "as Consul's documentation asks".
/// With a blocking wait of 2 s, a follower makes at most a few queries in 2 s; a tight loop
/// makes hundreds.
#[tokio::test(start_paused = true)]
async fn consul_index_zero_does_not_flood_the_agent() {
    let (n, set, finished) = queries_against_index_header(Some(vec!["0".into()])).await;
    assert!(!finished, "the follower must not die");
    assert_eq!(
        set.len(),
        1,
        "the answer's instances are still taken: {set:?}"
    );
    assert!(
        n <= 30,
        "consul.rs: \"followed with blocking queries ... An index that goes backwards (a Consul restart) starts over, as Consul's documentation asks\": \
         an agent answering X-Consul-Index: 0 got {n} queries in 2 s (a tight loop)"
    );
}

#[tokio::test(start_paused = true)]
async fn consul_missing_index_header_does_not_flood_the_agent() {
    let (n, _set, finished) = queries_against_index_header(Some(vec![])).await;
    assert!(!finished, "the follower must not die");
    assert!(
        n <= 30,
        "consul.rs: \"followed with blocking queries (index and wait)\" / \"retried with a growing backoff\": an answer without X-Consul-Index got {n} queries in 2 s"
    );
}

#[tokio::test(start_paused = true)]
async fn consul_non_numeric_index_does_not_flood_the_agent() {
    let (n, _set, finished) = queries_against_index_header(Some(vec!["abc".into()])).await;
    assert!(!finished, "the follower must not die");
    assert!(n <= 30, "X-Consul-Index: abc got {n} queries in 2 s");
    let (n, _set, finished) =
        queries_against_index_header(Some(vec!["99999999999999999999999".into()])).await;
    assert!(!finished, "the follower must not die");
    assert!(n <= 30, "X-Consul-Index past u64 got {n} queries in 2 s");
    let (n, _set, finished) = queries_against_index_header(Some(vec!["-5".into()])).await;
    assert!(!finished, "the follower must not die");
    assert!(n <= 30, "X-Consul-Index: -5 got {n} queries in 2 s");
}

#[tokio::test(start_paused = true)]
async fn consul_duplicated_index_header_does_not_flood_the_agent() {
    let (n, _set, finished) =
        queries_against_index_header(Some(vec!["7".into(), "3".into()])).await;
    assert!(!finished, "the follower must not die");
    assert!(n <= 30, "two X-Consul-Index headers got {n} queries in 2 s");
}

/// Consul answers every query at once with the same index (a caching proxy that ignores
/// `index`): the follower must not spin either.
#[tokio::test(start_paused = true)]
async fn consul_agent_ignoring_blocking_does_not_flood() {
    let fake = FakeConsul::start().await;
    let a = Up::start().await;
    fake.set(&[inst(a.addr)]);
    fake.default(Reply::Raw {
        status: 200,
        headers: vec![("x-consul-index", "42".into())],
        body: format!("[{}]", inst(a.addr)),
    });
    let (layer, _svc) = balancer(|b| b);
    let follower = layer.handle().follow_consul(consul(&fake));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = fake.count();
    follower.abort();
    assert_eq!(listed(&layer.handle()), set_of([&a.auth()]));
    assert!(
        n <= 30,
        "an agent that answers index 42 at once every time got {n} queries in 2 s"
    );
}

/// `Service.Port` out of u16's range must be skipped, never wrapped onto another port
/// ("entries that do not make an address are skipped"; the handle "skips an authority that is
/// not an endpoint (no port, port 0 ...)").
#[tokio::test(start_paused = true)]
async fn consul_port_out_of_range_is_skipped_not_wrapped() {
    let victim = Up::start().await; // must never be called
    let good = Up::start().await;
    let fake = FakeConsul::start().await;
    let wrapped = (victim.addr.port() as u32 + 65536).to_string();
    let neg = (victim.addr.port() as i64 - 65536).to_string();
    fake.set(&[
        inst(good.addr),
        entry_raw("10.200.0.1", "127.0.0.1", Some(&wrapped), 1),
        entry_raw("10.200.0.1", "127.0.0.1", Some(&neg), 2),
        entry_raw(
            "10.200.0.1",
            "127.0.0.1",
            Some(&format!("{}.0", victim.addr.port())),
            3,
        ),
        entry_raw(
            "10.200.0.1",
            "127.0.0.1",
            Some(&format!("{}.9", victim.addr.port())),
            4,
        ),
    ]);
    let (layer, svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer.handle().follow_consul(consul(&fake));
    assert!(
        until(|| !listed(&h).is_empty()).await,
        "nothing was taken from the answer"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let set = listed(&h);
    for _ in 0..20 {
        let _ = call(&svc).await;
    }
    assert!(
        !set.contains(&victim.auth()) && victim.hits() == 0,
        "consul.rs: \"entries that do not make an address are skipped\": Port {wrapped} / {neg} / {}.9 became {} (set {set:?}, {} calls reached it)",
        victim.addr.port(),
        victim.auth(),
        victim.hits()
    );
    assert!(set.contains(&good.auth()), "{set:?}");
    follower.abort();
}

/// Port 0, a missing Port, a string Port, userinfo, an address with a port or a path: skipped.
/// Port 65535 is a port. Service.Address empty: the node's address. A host name is kept.
/// An instance listed twice is one endpoint.
#[tokio::test(start_paused = true)]
async fn consul_entry_shapes_make_the_documented_endpoints() {
    let good = Up::start().await;
    let node_up = Up::bind("127.0.0.2:0".parse().unwrap()).await;
    let fake = FakeConsul::start().await;
    fake.set(&[
        inst(good.addr),
        inst(good.addr), // duplicate instance
        entry_raw("10.200.0.1", "127.0.0.1", Some("0"), 1),
        entry_raw("10.200.0.1", "127.0.0.1", None, 2),
        entry_raw("10.200.0.1", "127.0.0.1", Some("\"8080\""), 3),
        entry_raw("10.200.0.1", "user@127.0.0.1", Some("8081"), 4),
        entry_raw("10.200.0.1", "127.0.0.1/evil", Some("8083"), 6),
        entry_raw("10.200.0.1", "127.0.0.1", Some("65535"), 7),
        entry_raw("127.0.0.2", "", Some(&node_up.addr.port().to_string()), 8),
        entry_raw("10.200.0.1", "localhost", Some("8084"), 9),
    ]);
    let (layer, svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer.handle().follow_consul(consul(&fake));
    assert!(
        until(|| !listed(&h).is_empty()).await,
        "nothing was taken from the answer"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let expected = set_of([
        &good.auth(),
        "127.0.0.1:65535",
        &node_up.auth(),
        "localhost:8084",
    ]);
    let list: Vec<String> = h.list().iter().map(|e| e.authority.to_string()).collect();
    assert_eq!(
        list.len(),
        list.iter().collect::<HashSet<_>>().len(),
        "an instance listed twice must be one endpoint: {list:?}"
    );
    assert_eq!(
        listed(&h),
        expected,
        "consul.rs: \"Service.Address (or the node's address when the service has none) and Service.Port of every entry; entries that do not make an address are skipped\""
    );
    // The node-address instance is really called.
    h.set([node_up.auth().parse().unwrap()]);
    assert_eq!(call(&svc).await.unwrap(), (200, node_up.auth()));
    follower.abort();
}

/// An address that carries a port (`"Address": "127.0.0.1:9"`) does not make an address with
/// `Service.Port`: "entries that do not make an address are skipped". It must not become a
/// bracketed non-address that every call to fails.
#[tokio::test(start_paused = true)]
async fn consul_address_with_a_port_is_skipped() {
    let good = Up::start().await;
    let fake = FakeConsul::start().await;
    fake.set(&[
        inst(good.addr),
        entry_raw("10.200.0.1", "127.0.0.1:9", Some("8082"), 5),
        entry_raw("10.200.0.1", "orders-3.internal:9", Some("8083"), 6),
    ]);
    let (layer, svc) = balancer(|b| b.pick(Pick::RoundRobin).failure_penalty(Duration::ZERO));
    let h = layer.handle();
    let follower = layer.handle().follow_consul(consul(&fake));
    assert!(
        until(|| !listed(&h).is_empty()).await,
        "nothing was taken from the answer"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let set = listed(&h);
    let mut errors = Vec::new();
    for _ in 0..6 {
        if let Err(e) = call(&svc).await {
            errors.push(e.to_string());
        }
    }
    follower.abort();
    assert_eq!(
        set,
        set_of([&good.auth()]),
        "consul.rs: \"entries that do not make an address are skipped\": Address \"127.0.0.1:9\" / \"orders-3.internal:9\" became endpoints; {} of 6 round-robin calls failed: {errors:?}",
        errors.len()
    );
}

/// A 200 whose body stalls after its first byte (a proxy that hangs mid-answer) must not stop
/// discovery: "While Consul cannot be reached ... the query is retried". Paused time.
#[tokio::test(start_paused = true)]
async fn consul_stalled_body_is_abandoned_and_retried() {
    let fake = FakeConsul::start().await;
    let a = Up::start().await;
    fake.set(&[inst(a.addr)]);
    fake.push(Reply::StallBody);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer
        .handle()
        .follow_consul(consul(&fake).wait(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_secs(1800)).await;
    let n = fake.count();
    follower.abort();
    assert!(
        n >= 2 && listed(&h) == set_of([&a.auth()]),
        "consul.rs: \"While Consul cannot be reached or answers an error, the set stays as it is and the query is retried\": \
         after an answer whose body stalled, {n} queries in 30 minutes (wait 10 s) and the set is {:?}",
        listed(&h)
    );
}

/// An answer far past any size a health answer has (200 MB, a runaway proxy): not read
/// without bound; the set stays; the follower goes on.
#[tokio::test(start_paused = true)]
async fn consul_runaway_body_is_cut_and_the_set_stays() {
    let fake = FakeConsul::start().await;
    let (a, b) = (Up::start().await, Up::start().await);
    fake.set(&[inst(a.addr)]);
    let (layer, _svc) = balancer(|bb| bb);
    let h = layer.handle();
    let follower = layer.handle().follow_consul(consul(&fake));
    assert!(until(|| listed(&h) == set_of([&a.auth()])).await);
    let n0 = fake.count();
    fake.push(Reply::HugeBody { mb: 200 });
    fake.set(&[inst(a.addr)]); // wake the blocked query; the next one gets the huge body
    assert!(
        until(|| fake.count() >= n0 + 2).await,
        "the query after the huge body"
    );
    assert_eq!(
        listed(&h),
        set_of([&a.auth()]),
        "the set stays after a runaway answer"
    );
    fake.set(&[inst(b.addr)]);
    let ok = until(|| listed(&h) == set_of([&b.auth()])).await;
    follower.abort();
    assert!(
        ok,
        "the follower follows again after a runaway answer: {:?}",
        listed(&h)
    );
}

/// `EndpointsHandle::set`: "when the smaller set allows fewer ejected endpoints, the ones
/// ejected longest ago return". 20 endpoints, 10 % cap (2): a then b ejected; the set shrinks
/// to 10 (cap 1): a returns, b stays ejected.
#[tokio::test(start_paused = true)]
async fn shrinking_set_returns_the_longest_ejected() {
    let (port, ups) = loop {
        let l1 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l1.local_addr().unwrap().port();
        let mut ls = vec![l1];
        for i in 2..=20 {
            match tokio::net::TcpListener::bind((format!("127.0.0.{i}").as_str(), port)).await {
                Ok(l) => ls.push(l),
                Err(_) => break,
            }
        }
        if ls.len() == 20 {
            break (port, ls.into_iter().map(Up::serve).collect::<Vec<_>>());
        }
    };
    let (a, b) = (ups[0].clone(), ups[1].clone());
    let (layer, svc) = balancer(|bb| {
        bb.endpoints(ups.iter().map(Up::auth))
            .pick(Pick::RoundRobin)
            .failure_penalty(Duration::ZERO)
            .consecutive_failures(Some(2))
            .success_rate(None)
            .failure_percentage(None)
            .max_ejection_percent(10)
            .ejection_time(Duration::from_secs(3600), Duration::from_secs(7200))
    });
    let h = layer.handle();
    for u in [&a, &b] {
        u.set(Mode::Status(503));
        let mut n = 0;
        while !is_ejected(&h, &u.auth()) && n < 200 {
            let _ = call(&svc).await;
            n += 1;
        }
        assert!(is_ejected(&h, &u.auth()), "{} ejected", u.auth());
        u.set(Mode::Ok);
    }
    assert_eq!(h.ejected(), 2);
    h.set(ups[..10].iter().map(|u| u.auth().parse().unwrap()));
    assert_eq!(h.list().len(), 10);
    assert!(
        !is_ejected(&h, &a.auth()) && is_ejected(&h, &b.auth()),
        "handle.rs set: \"when the smaller set allows fewer ejected endpoints, the ones ejected longest ago return\": a (ejected first) ejected={}, b ejected={} (port {port})",
        is_ejected(&h, &a.auth()),
        is_ejected(&h, &b.auth())
    );
}

/// The token is "never logged": every tracing event while Consul fails and answers, with the
/// token set, is captured; none may carry it.
#[test]
fn consul_token_is_never_logged() {
    use tracing_subscriber::layer::SubscriberExt;
    struct Capture(Arc<Mutex<Vec<String>>>);
    struct V<'a>(&'a mut String);
    impl tracing::field::Visit for V<'_> {
        fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
            self.0.push_str(&format!(" {}={:?}", f.name(), v));
        }
    }
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            let mut s = format!("{} {}", e.metadata().target(), e.metadata().name());
            e.record(&mut V(&mut s));
            self.0.lock().unwrap().push(s);
        }
        fn on_new_span(
            &self,
            a: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let mut s = format!("span {}", a.metadata().name());
            a.record(&mut V(&mut s));
            self.0.lock().unwrap().push(s);
        }
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let sub = tracing_subscriber::registry().with(Capture(events.clone()));
    let _g = tracing::subscriber::set_default(sub);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let fake = FakeConsul::start().await;
        let a = Up::start().await;
        fake.set(&[inst(a.addr)]);
        fake.push(Reply::Raw {
            status: 500,
            headers: vec![],
            body: "boom".into(),
        });
        fake.push(Reply::Raw {
            status: 200,
            headers: vec![("x-consul-index", "5".into())],
            body: "[{".into(),
        });
        fake.push(Reply::Raw {
            status: 403,
            headers: vec![],
            body: "ACL not found".into(),
        });
        let (layer, _svc) = balancer(|b| b);
        let follower = layer
            .handle()
            .follow_consul(consul(&fake).token("TOPSECRET-4242").unwrap());
        tokio::time::sleep(Duration::from_secs(300)).await;
        follower.abort();
        // An agent that is gone: connection refused.
        let gone = Consul::new("http://127.0.0.1:1", "orders")
            .unwrap()
            .token("TOPSECRET-4242")
            .unwrap();
        let follower = layer.handle().follow_consul(gone);
        tokio::time::sleep(Duration::from_secs(120)).await;
        follower.abort();
    });
    let ev = events.lock().unwrap().clone();
    assert!(
        ev.iter().any(|e| e.contains("consul")),
        "the failures were logged: {ev:?}"
    );
    let leaks: Vec<&String> = ev.iter().filter(|e| e.contains("TOPSECRET")).collect();
    assert!(
        leaks.is_empty(),
        "consul.rs: \"An ACL token, sent as X-Consul-Token (never logged)\": {leaks:?}"
    );
}

/// One entry that is not an instance object (null, a number, a string, `{}`, `Service: null`)
/// is skipped; it does not make the whole answer unusable.
#[tokio::test(start_paused = true)]
async fn consul_odd_entries_are_skipped_not_fatal() {
    let (a, good) = (Up::start().await, Up::start().await);
    let fake = FakeConsul::start().await;
    fake.set(&[inst(a.addr)]);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer.handle().follow_consul(consul(&fake));
    assert!(until(|| listed(&h) == set_of([&a.auth()])).await);
    fake.set(&[
        "null".into(),
        "5".into(),
        "\"x\"".into(),
        "{}".into(),
        "{\"Service\": null, \"Node\": null}".into(),
        "{\"Service\": {\"Address\": 7, \"Port\": 8080}, \"Node\": {\"Address\": [1]}}".into(),
        inst(good.addr),
    ]);
    let ok = until(|| listed(&h) == set_of([&good.auth()])).await;
    follower.abort();
    assert!(
        ok,
        "consul.rs: \"entries that do not make an address are skipped\": with odd entries around one good one, the set is {:?}",
        listed(&h)
    );
}

/// A name server that never answers: "A failed resolution (a timeout ...) leaves the set as
/// it is and is tried again"; the follower stays alive.
#[tokio::test(start_paused = true)]
async fn dns_silent_server_keeps_the_set() {
    let dns = FakeDns::start().await;
    dns.set_addrs("orders.test", &["127.0.0.1"], 1);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = h.follow_dns(dns_a(&dns, "orders.test", 8080));
    assert!(until(|| listed(&h) == set_of(["127.0.0.1:8080"])).await);
    dns.mode(DnsMode::Silent);
    let q0 = dns.queries();
    assert!(
        until(|| dns.queries() >= q0 + 3).await,
        "asked again while silent"
    );
    assert_eq!(listed(&h), set_of(["127.0.0.1:8080"]));
    dns.mode(DnsMode::Normal);
    dns.set_addrs("orders.test", &["127.0.0.2"], 1);
    let ok = until(|| listed(&h) == set_of(["127.0.0.2:8080"])).await;
    assert!(!follower.is_finished());
    follower.abort();
    assert!(
        ok,
        "follows again once the server answers: {:?}",
        listed(&h)
    );
}

/// An IPv6 service address (Consul sends `"Address": "::1"`) must become `[::1]:port` and be
/// called.
#[tokio::test(start_paused = true)]
async fn consul_ipv6_service_address_is_an_endpoint() {
    let v6 = Up::bind("[::1]:0".parse().unwrap()).await;
    let fake = FakeConsul::start().await;
    fake.set(&[entry_raw(
        "10.200.0.1",
        "::1",
        Some(&v6.addr.port().to_string()),
        1,
    )]);
    let (layer, svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer.handle().follow_consul(consul(&fake));
    let ok = until(|| !listed(&h).is_empty()).await;
    assert!(
        ok,
        "consul.rs: \"Service.Address ... and Service.Port of every entry\": an IPv6 address (::1) made no endpoint"
    );
    assert_eq!(listed(&h), set_of([&format!("[::1]:{}", v6.addr.port())]));
    assert_eq!(call(&svc).await.unwrap().0, 200);
    assert_eq!(v6.hits(), 1);
    follower.abort();
}

/// "a service with thousands of instances fits": 3,000 instances as Consul sends them.
#[tokio::test(start_paused = true)]
async fn consul_thousands_of_instances_fit() {
    let fake = FakeConsul::start().await;
    let entries: Vec<String> = (0..3000)
        .map(|i| {
            let ip = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
            entry_raw(&ip, &ip, Some("8080"), i)
        })
        .collect();
    fake.set(&entries);
    let size = fake.st.body.lock().unwrap().len();
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer.handle().follow_consul(consul(&fake));
    let ok = until(|| h.list().len() == 3000).await;
    assert!(
        ok,
        "consul.rs: \"The largest health answer read (a service with thousands of instances fits)\": 3,000 instances ({size} bytes of JSON) gave {} endpoints",
        h.list().len()
    );
    follower.abort();
}

/// A tag or datacenter with characters that mean something in a URL must reach Consul as
/// the value given (percent-encoded), not inject parameters or break the query.
#[tokio::test(start_paused = true)]
async fn consul_tag_and_datacenter_are_encoded() {
    let fake = FakeConsul::start().await;
    let a = Up::start().await;
    fake.set(&[inst(a.addr)]);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let tag = "v2 canary&passing=false#x";
    let dc = "dc1&tag=evil";
    let follower = layer
        .handle()
        .follow_consul(consul(&fake).tag(tag).datacenter(dc));
    let got_query = until(|| fake.count() >= 1).await;
    let reqs = fake.requests();
    follower.abort();
    assert!(
        got_query,
        "consul.rs: `tag(\"{tag}\")`: no query reached the agent at all (set {:?})",
        listed(&h)
    );
    let r = &reqs[0];
    let tags: Vec<&str> = r
        .query
        .iter()
        .filter(|(k, _)| k == "tag")
        .map(|(_, v)| v.as_str())
        .collect();
    let dcs: Vec<&str> = r
        .query
        .iter()
        .filter(|(k, _)| k == "dc")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        tags,
        [tag],
        "consul.rs: \"Only instances with this tag\": the agent saw {:?}",
        r.query
    );
    assert_eq!(
        dcs,
        [dc],
        "consul.rs: \"Ask about this datacenter\": the agent saw {:?}",
        r.query
    );
    assert!(
        r.query
            .iter()
            .filter(|(k, _)| k == "passing")
            .all(|(_, v)| v.is_empty() || v == "true" || v == "1"),
        "the tag injected a passing parameter: {:?}",
        r.query
    );
}

/// Tokens that are not header values are refused when configured.
#[test]
fn consul_bad_tokens_are_refused() {
    for bad in ["a\nb", "a\rb", "tok\u{0}", "tok\u{7f}"] {
        let r = Consul::new("http://127.0.0.1:8500", "orders")
            .unwrap()
            .token(bad);
        assert!(
            r.is_err(),
            "consul.rs: \"InvalidBalanceConfig::Consul for a token that is not a valid header value\": {bad:?} accepted"
        );
    }
    assert!(
        Consul::new("http://127.0.0.1:8500", "orders")
            .unwrap()
            .token("ok-token")
            .is_ok()
    );
    for base in [
        "127.0.0.1:8500",
        "https://127.0.0.1:8500",
        "http://",
        "ftp://x",
        "",
    ] {
        assert!(
            Consul::new(base, "orders").is_err(),
            "base {base:?} accepted"
        );
    }
    for svc in ["", "a/b", "a?b", "a b", "../x", "a#b", "a%2fb"] {
        assert!(
            Consul::new("http://127.0.0.1:8500", svc).is_err(),
            "service {svc:?} accepted"
        );
    }
}

/// README: "No configuration value panics, however absurd (`Duration::MAX` is "no limit")".
/// A follower with `wait(Duration::MAX)` must follow, not die.
#[tokio::test(start_paused = true)]
async fn consul_wait_duration_max_does_not_panic() {
    let fake = FakeConsul::start().await;
    let (a, b) = (Up::start().await, Up::start().await);
    fake.set(&[inst(a.addr)]);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer
        .handle()
        .follow_consul(consul(&fake).wait(Duration::MAX));
    let ok = until(|| listed(&h) == set_of([&a.auth()])).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        ok && !follower.is_finished(),
        "README: \"No configuration value panics, however absurd (Duration::MAX is \\\"no limit\\\")\": with wait(Duration::MAX) the follower {} and the set is {:?}",
        if follower.is_finished() {
            "ended (panicked?)"
        } else {
            "runs"
        },
        listed(&h)
    );
    fake.set(&[inst(b.addr)]);
    assert!(
        until(|| listed(&h) == set_of([&b.auth()])).await,
        "changes followed with wait(MAX)"
    );
    follower.abort();
}

/// `follow_consul`: "Dropping the returned handle alone does not stop it" (it detaches, as a
/// tokio `JoinHandle` does), and "following also stops once the balancer is gone". The
/// handle dropped: changes still followed; then the balancer dropped: no more queries.
#[tokio::test(start_paused = true)]
async fn consul_a_detached_follower_follows_until_the_balancer_is_gone() {
    let fake = FakeConsul::start().await;
    let (a, b) = (Up::start().await, Up::start().await);
    fake.set(&[inst(a.addr)]);
    let (layer, svc) = balancer(|b| b);
    let h = layer.handle();
    drop(layer.handle().follow_consul(consul(&fake)));
    assert!(until(|| listed(&h) == set_of([&a.auth()])).await);
    fake.set(&[inst(b.addr)]);
    assert!(
        until(|| listed(&h) == set_of([&b.auth()])).await,
        "a detached follower still follows: {:?}",
        listed(&h)
    );
    drop((layer, svc, h));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = fake.count();
    fake.set(&[inst(a.addr)]);
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        fake.count(),
        n,
        "the follower of a dropped balancer asked Consul again"
    );
}

/// `EndpointsHandle::follow`: a detached follower keeps applying changes while the balancer
/// lives, and stops (dropping the stream) once it is gone.
#[tokio::test(start_paused = true)]
async fn follow_stream_a_detached_follower_stops_with_the_balancer() {
    use steadfast::balance::Change;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Change, String>>();
    let changes =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let (layer, svc) = balancer(|b| b);
    let h = layer.handle();
    drop(h.follow(changes));
    tx.send(Ok(Change::Insert("127.0.0.1:8080".parse().unwrap())))
        .unwrap();
    assert!(until(|| listed(&h) == set_of(["127.0.0.1:8080"])).await);
    drop((layer, svc, h));
    assert!(
        until(|| tx.is_closed()).await,
        "handle.rs follow: \"following also stops once the balancer is gone\": the stream is still held"
    );
}

/// Abort stops following: no more queries, the set stays.
#[tokio::test(start_paused = true)]
async fn consul_abort_stops_following() {
    let fake = FakeConsul::start().await;
    let (a, b) = (Up::start().await, Up::start().await);
    fake.set(&[inst(a.addr)]);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer.handle().follow_consul(consul(&fake));
    assert!(until(|| listed(&h) == set_of([&a.auth()])).await);
    follower.abort();
    let _ = guard("the aborted follower", follower).await;
    let n = fake.count();
    fake.set(&[inst(b.addr)]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(listed(&h), set_of([&a.auth()]));
    assert_eq!(fake.count(), n, "no query after abort");
}

/// Every balancer value dropped while the follower runs: nothing reads the set any more. Not
/// a documented promise (reported as an observation): does the task end, or does it query
/// the agent forever?
#[tokio::test(start_paused = true)]
async fn consul_follower_ends_when_the_balancer_is_dropped() {
    let fake = FakeConsul::start().await;
    let a = Up::start().await;
    fake.set(&[inst(a.addr)]);
    let (layer, svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = layer
        .handle()
        .follow_consul(consul(&fake).wait(Duration::from_secs(1)));
    assert!(until(|| listed(&h).len() == 1).await);
    drop((layer, svc, h));
    let ended = until(|| follower.is_finished()).await;
    let n = fake.count();
    follower.abort();
    assert!(
        ended,
        "(undocumented) the Consul follower of a dropped balancer keeps querying the agent: {n} queries, still running after {GUARD:?}"
    );
}

/// "A change never fails a call in flight: an endpoint that leaves drains": 64 POSTs in
/// flight to a, Consul drops a; every POST completes at a, once, and new calls go to b.
#[tokio::test(start_paused = true)]
async fn consul_removed_endpoint_drains_64_posts_in_flight() {
    let fake = FakeConsul::start().await;
    let (a, b) = (Up::start().await, Up::start().await);
    a.set(Mode::Gated);
    fake.set(&[inst(a.addr)]);
    let (layer, client) = stack();
    let h = layer.endpoints();
    let follower = h.follow_consul(consul(&fake));
    assert!(until(|| listed(&h) == set_of([&a.auth()])).await);
    let mut calls = Vec::new();
    for seq in 0..64u64 {
        let c = client.clone();
        calls.push(tokio::spawn(async move { post_call(&c, seq).await }));
    }
    assert!(
        until(|| a.hits() == 64).await,
        "64 POSTs reach a ({} did)",
        a.hits()
    );
    fake.set(&[inst(b.addr)]);
    assert!(until(|| listed(&h) == set_of([&b.auth()])).await);
    a.open();
    let mut ok = 0;
    for c in calls {
        match guard("a draining POST", c).await.unwrap() {
            Ok((200, who)) if who == a.auth() => ok += 1,
            other => panic!(
                "handle.rs: \"A change never fails a call in flight: an endpoint that leaves drains\": {other:?}"
            ),
        }
    }
    assert_eq!(ok, 64);
    let mut seqs = a.seqs();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..64).collect::<Vec<_>>(),
        "each POST sent exactly once"
    );
    assert_eq!(b.hits(), 0);
    assert_eq!(post_call(&client, 1000).await.unwrap(), (200, b.auth()));
    follower.abort();
}

/// Membership flapping on every Consul answer (with empty answers now and then) while 256
/// POSTs run, 64 at a time: every POST either got a 200 and reached exactly one server
/// exactly once, or failed with NoEndpoint and reached none. No call lost, none sent twice.
#[tokio::test(start_paused = true)]
async fn consul_flapping_membership_loses_and_duplicates_no_post() {
    let fake = FakeConsul::start().await;
    let ups = [Up::start().await, Up::start().await, Up::start().await];
    fake.set(&[inst(ups[0].addr)]);
    let (layer, client) = stack();
    let h = layer.endpoints();
    let follower = h.follow_consul(consul(&fake));
    assert!(until(|| !listed(&h).is_empty()).await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flapper = {
        let (fake, ups, stop) = (fake.clone(), ups.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let sets: [Vec<String>; 5] = [
                    vec![inst(ups[0].addr), inst(ups[1].addr), inst(ups[2].addr)],
                    vec![inst(ups[1].addr)],
                    vec![inst(ups[2].addr), inst(ups[0].addr)],
                    vec![],
                    vec![inst(ups[0].addr)],
                ];
                fake.set(&sets[i % 5]);
                i += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            i
        })
    };
    let mut results = HashMap::new();
    for round in 0..4u64 {
        let mut calls = Vec::new();
        for k in 0..64u64 {
            let seq = round * 64 + k;
            let c = client.clone();
            calls.push(tokio::spawn(async move { (seq, post_call(&c, seq).await) }));
        }
        for c in calls {
            let (seq, r) = guard("a POST under churn", c).await.unwrap();
            results.insert(
                seq,
                r.map_err(|e| (is_no_endpoint(&e).is_some(), e.to_string())),
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let flips = flapper.await.unwrap();
    follower.abort();
    let mut received: HashMap<u64, usize> = HashMap::new();
    for u in &ups {
        for s in u.seqs() {
            *received.entry(s).or_default() += 1;
        }
    }
    let mut problems = Vec::new();
    let (mut oks, mut nones) = (0, 0);
    for (seq, r) in &results {
        let got = received.get(seq).copied().unwrap_or(0);
        match r {
            Ok((200, _)) if got == 1 => oks += 1,
            Err((true, _)) if got == 0 => nones += 1,
            other => problems.push(format!("seq {seq}: {other:?}, received {got} times")),
        }
    }
    assert!(
        problems.is_empty(),
        "handle.rs: \"A change never fails a call in flight\" / no POST sent twice ({flips} flips, {oks} ok, {nones} NoEndpoint): {problems:?}"
    );
}

/// "Endpoints that stay keep their load estimate and ejections": an ejected endpoint that
/// stays in the next Consul answer stays ejected; when Consul removes every endpoint in
/// service, the ejected one returns (never all ejected), and even with `fail_fast` calls go
/// to it.
#[tokio::test(start_paused = true)]
async fn consul_churn_keeps_ejections_and_never_ejects_all() {
    let fake = FakeConsul::start().await;
    let (a, b, c) = (Up::start().await, Up::start().await, Up::start().await);
    a.set(Mode::Status(503));
    fake.set(&[inst(a.addr), inst(b.addr)]);
    let (layer, svc) = balancer(|bb| {
        bb.pick(Pick::RoundRobin)
            .failure_penalty(Duration::ZERO)
            .consecutive_failures(Some(3))
            .ejection_time(Duration::from_secs(3600), Duration::from_secs(7200))
            .fail_fast(true)
    });
    let h = layer.handle();
    let follower = layer.handle().follow_consul(consul(&fake));
    assert!(until(|| listed(&h).len() == 2).await);
    for _ in 0..10 {
        let _ = call(&svc).await;
    }
    let ejected = |h: &steadfast::balance::EndpointsHandle<_>, who: &str| {
        h.list()
            .iter()
            .any(|e| e.authority.as_str() == who && e.ejected)
    };
    assert!(
        ejected(&h, &a.auth()),
        "a failed 3 in a row: ejected ({:?})",
        h.list()
    );
    // Consul answers again with a still there (c joins).
    fake.set(&[inst(a.addr), inst(b.addr), inst(c.addr)]);
    assert!(until(|| listed(&h).len() == 3).await);
    assert!(
        ejected(&h, &a.auth()),
        "handle.rs: \"Endpoints that stay keep their load estimate and ejections\": a new Consul answer that still lists a un-ejected it: {:?}",
        h.list()
    );
    // Consul removes every endpoint in service: only the ejected a is left.
    fake.set(&[inst(a.addr)]);
    assert!(until(|| listed(&h).len() == 1).await);
    let r = call(&svc).await;
    assert!(
        matches!(r, Ok((503, ref who)) if *who == a.auth()),
        "lib.rs: \"at most 10 % of the endpoints ... are ejected at once (... never all)\": with only the ejected endpoint left, fail_fast call gave {r:?} (list {:?})",
        h.list()
    );
    follower.abort();
}

/// `EndpointsHandle::set`: "An endpoint that leaves and later comes back starts afresh, not
/// ejected", while one that stays keeps its ejection.
#[tokio::test(start_paused = true)]
async fn an_endpoint_removed_and_readded_starts_afresh() {
    let (a, b) = (Up::start().await, Up::start().await);
    a.set(Mode::Status(503));
    let (layer, svc) = balancer(|bb| {
        bb.endpoints([a.auth(), b.auth()])
            .pick(Pick::RoundRobin)
            .failure_penalty(Duration::ZERO)
            .consecutive_failures(Some(3))
            .ejection_time(Duration::from_secs(3600), Duration::from_secs(7200))
    });
    let h = layer.handle();
    for _ in 0..10 {
        let _ = call(&svc).await;
    }
    let a_auth: http::uri::Authority = a.auth().parse().unwrap();
    let status = |h: &steadfast::balance::EndpointsHandle<_>| {
        h.list()
            .into_iter()
            .find(|e| e.authority == a_auth)
            .unwrap()
    };
    assert!(status(&h).ejected);
    h.insert("127.0.0.1:1".parse().unwrap());
    assert!(
        status(&h).ejected,
        "an endpoint that stays keeps its ejection"
    );
    h.remove(&a_auth);
    h.insert(a_auth.clone());
    let st = status(&h);
    assert!(!st.ejected && st.ejections == 0, "{st:?}");
}

// =======================================================================================
// Ejection thresholds and recovery, through real sockets
// =======================================================================================

fn is_ejected<C>(h: &steadfast::balance::EndpointsHandle<C>, who: &str) -> bool {
    h.list()
        .iter()
        .any(|e| e.authority.as_str() == who && e.ejected)
}

/// Exactly N consecutive failures eject: N-1 do not, N do, for N in 1, 2, 5.
#[tokio::test(start_paused = true)]
async fn ejection_at_exactly_n_consecutive_failures() {
    for n in [1u32, 2, 5] {
        let (a, b) = (Up::start().await, Up::start().await);
        a.set(Mode::Status(503));
        let (layer, svc) = balancer(|bb| {
            bb.endpoints([a.auth(), b.auth()])
                .pick(Pick::RoundRobin)
                .failure_penalty(Duration::ZERO)
                .consecutive_failures(Some(n))
                .success_rate(None)
                .failure_percentage(None)
                .ejection_time(Duration::from_secs(3600), Duration::from_secs(7200))
        });
        let h = layer.handle();
        let mut calls = 0;
        while a.hits() < (n - 1) as usize && calls < 100 {
            let _ = call(&svc).await;
            calls += 1;
        }
        assert!(
            !is_ejected(&h, &a.auth()),
            "n={n}: ejected after {} failures",
            a.hits()
        );
        while a.hits() < n as usize && calls < 200 {
            let _ = call(&svc).await;
            calls += 1;
        }
        assert_eq!(a.hits(), n as usize);
        assert!(
            is_ejected(&h, &a.auth()),
            "lib.rs: \"consecutive failures (5)\" / consecutive_failures({n}): not ejected after {n} failures in a row: {:?}",
            h.list()
        );
        for _ in 0..20 {
            assert_eq!(
                call(&svc).await.unwrap(),
                (200, b.auth()),
                "n={n}: an ejected endpoint gets no call"
            );
        }
        assert_eq!(a.hits(), n as usize);
    }
}

/// Successes of *another* endpoint do not reset an endpoint's run of failures; its own success
/// does (4 failures, a success, 4 failures: not ejected with N = 5).
#[tokio::test(start_paused = true)]
async fn ejection_run_is_reset_by_own_success_only() {
    let (a, b) = (Up::start().await, Up::start().await);
    a.set(Mode::Status(503));
    let (layer, svc) = balancer(|bb| {
        bb.endpoints([a.auth(), b.auth()])
            .pick(Pick::RoundRobin)
            .failure_penalty(Duration::ZERO)
            .success_rate(None)
            .failure_percentage(None)
            .ejection_time(Duration::from_secs(3600), Duration::from_secs(7200))
    });
    let h = layer.handle();
    let mut guard_n = 0;
    while a.hits() < 4 && guard_n < 100 {
        let _ = call(&svc).await;
        guard_n += 1;
    }
    a.set(Mode::Ok);
    while a.hits() < 5 && guard_n < 200 {
        let _ = call(&svc).await;
        guard_n += 1;
    }
    a.set(Mode::Status(503));
    while a.hits() < 9 && guard_n < 300 {
        let _ = call(&svc).await;
        guard_n += 1;
    }
    assert!(
        !is_ejected(&h, &a.auth()),
        "4 + success + 4 is not 5 in a row"
    );
    while a.hits() < 10 && guard_n < 400 {
        let _ = call(&svc).await;
        guard_n += 1;
    }
    assert!(is_ejected(&h, &a.auth()), "5 in a row eject");
}

/// The only endpoint is never ejected however often it fails, and every call reaches it.
#[tokio::test(start_paused = true)]
async fn the_only_endpoint_is_never_ejected() {
    let a = Up::start().await;
    a.set(Mode::Status(503));
    let (layer, svc) = balancer(|bb| {
        bb.endpoints([a.auth()])
            .consecutive_failures(Some(1))
            .fail_fast(true)
    });
    let h = layer.handle();
    for i in 0..30 {
        let r = call(&svc).await;
        assert!(
            matches!(r, Ok((503, _))),
            "call {i}: {r:?} — \"never all\" are ejected, so the only endpoint takes every call"
        );
    }
    assert_eq!(a.hits(), 30);
    assert!(!is_ejected(&h, &a.auth()));
}

/// Every endpoint failing: at most the cap is ejected (one of three), calls still go
/// somewhere (never NoEndpoint), with and without fail_fast.
#[tokio::test(start_paused = true)]
async fn every_endpoint_failing_still_sends_within_the_cap() {
    for ff in [false, true] {
        let ups = [Up::start().await, Up::start().await, Up::start().await];
        for u in &ups {
            u.set(Mode::Status(503));
        }
        let (layer, svc) = balancer(|bb| {
            bb.endpoints(ups.iter().map(Up::auth))
                .consecutive_failures(Some(2))
                .fail_fast(ff)
                .ejection_time(Duration::from_secs(3600), Duration::from_secs(7200))
        });
        let h = layer.handle();
        for i in 0..90 {
            let r = call(&svc).await;
            assert!(matches!(r, Ok((503, _))), "fail_fast={ff} call {i}: {r:?}");
            assert!(
                h.ejected() <= 1,
                "at most 10 % (at least one) of 3 ejected: {:?}",
                h.list()
            );
        }
        let total: usize = ups.iter().map(Up::hits).sum();
        assert_eq!(total, 90, "every call reached a server");
        assert_eq!(h.ejected(), 1);
    }
}

/// An ejection ends after its time ("shows as ended without a call"), and the next one lasts
/// longer (30 s × ejections so far, here 400 ms × n). Real time; no timing assertion, only
/// the order of events.
#[tokio::test(start_paused = true)]
async fn ejection_ends_after_its_time_and_can_happen_again() {
    let (a, b) = (Up::start().await, Up::start().await);
    a.set(Mode::Status(503));
    let (layer, svc) = balancer(|bb| {
        bb.endpoints([a.auth(), b.auth()])
            .pick(Pick::RoundRobin)
            .failure_penalty(Duration::ZERO)
            .consecutive_failures(Some(2))
            .ejection_time(Duration::from_millis(400), Duration::from_secs(5))
    });
    let h = layer.handle();
    let mut n = 0;
    while !is_ejected(&h, &a.auth()) && n < 50 {
        let _ = call(&svc).await;
        n += 1;
    }
    assert!(is_ejected(&h, &a.auth()));
    let first = h
        .list()
        .into_iter()
        .find(|e| e.authority.as_str() == a.auth())
        .unwrap()
        .ejections;
    assert!(
        until(|| !is_ejected(&h, &a.auth())).await,
        "the ejection ends without a call"
    );
    let hits = a.hits();
    n = 0;
    while !is_ejected(&h, &a.auth()) && n < 50 {
        let _ = call(&svc).await;
        n += 1;
    }
    assert!(a.hits() > hits, "a returned endpoint takes calls again");
    assert!(is_ejected(&h, &a.auth()), "and is ejected again");
    let second = h
        .list()
        .into_iter()
        .find(|e| e.authority.as_str() == a.auth())
        .unwrap()
        .ejections;
    assert!(second > first, "ejections grow: {first} then {second}");
}

/// The facade: `client::http().balance(|b| b)` with no static endpoints, then
/// `endpoints().follow_consul(..)`: the natural way to build a discovered stack must balance.
#[tokio::test(start_paused = true)]
async fn facade_stack_without_static_endpoints_follows_consul() {
    let fake = FakeConsul::start().await;
    let a = Up::start().await;
    fake.set(&[inst(a.addr)]);
    let layer = steadfast::client::http().balance(|b| b).build().unwrap();
    let client = layer.layer(support::transport::<Full<Bytes>>());
    let follower = layer.endpoints().follow_consul(consul(&fake));
    assert!(until(|| layer.endpoints().list().len() == 1).await);
    let r = guard(
        "a call",
        client.clone().oneshot(
            Request::get("http://orders/x")
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await;
    let r = r
        .map(|res| res.status().as_u16())
        .map_err(|e| e.to_string());
    assert_eq!(
        r,
        Ok(200),
        "a stack built with .balance(|b| b) and followed from Consul must call the instances"
    );
    assert_eq!(a.hits(), 1);
    follower.abort();
}

// =======================================================================================
// DNS
// =======================================================================================

#[derive(Clone, Debug, PartialEq)]
enum DnsMode {
    Normal,
    /// Answer every query with this rcode and no records.
    Rcode(u8),
    /// UDP answers carry TC and no records; TCP answers in full.
    TruncateUdp,
    /// Answers carry records owned by this other name (no CNAME).
    OtherName(String),
    /// Answers come from another socket (port) than the one asked.
    WrongSource,
    /// Answers carry another ID.
    WrongId,
    /// No answer at all.
    Silent,
}

type Srv = (u16, u16, u16, String); // priority, weight, port, target

struct DnsState {
    addrs: Mutex<HashMap<String, (Vec<IpAddr>, u32)>>,
    srv: Mutex<HashMap<String, (Vec<Srv>, u32)>>,
    mode: Mutex<DnsMode>,
    queries: Mutex<Vec<(String, u16, bool)>>,
    /// Names answered SERVFAIL whatever the mode.
    failing: Mutex<HashSet<String>>,
}

#[derive(Clone)]
struct FakeDns {
    addr: SocketAddr,
    st: Arc<DnsState>,
}

fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in norm(name).split('.').filter(|l| !l.is_empty()) {
        out.push(l.len() as u8);
        out.extend_from_slice(l.as_bytes());
    }
    out.push(0);
    out
}

/// (id, flags, name, qtype, end of question)
fn parse_dns_query(buf: &[u8]) -> Option<(u16, u16, String, u16, usize)> {
    if buf.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([buf[0], buf[1]]);
    let flags = u16::from_be_bytes([buf[2], buf[3]]);
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *buf.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(buf.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*buf.get(pos)?, *buf.get(pos + 1)?]);
    Some((id, flags, labels.join("."), qtype, pos + 4))
}

impl FakeDns {
    async fn start() -> Self {
        // UDP and TCP on the same port.
        let (udp, tcp) = loop {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let st = Arc::new(DnsState {
            addrs: Mutex::new(HashMap::new()),
            srv: Mutex::new(HashMap::new()),
            mode: Mutex::new(DnsMode::Normal),
            queries: Mutex::new(Vec::new()),
            failing: Mutex::new(HashSet::new()),
        });
        let udp = Arc::new(udp);
        let spoof = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        {
            let st = st.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                        continue;
                    };
                    let mode = st.mode.lock().unwrap().clone();
                    let Some(resp) = st.answer(&buf[..n], false) else {
                        continue;
                    };
                    match mode {
                        DnsMode::Silent => {}
                        DnsMode::WrongSource => {
                            let _ = spoof.send_to(&resp, from).await;
                        }
                        _ => {
                            let _ = udp.send_to(&resp, from).await;
                        }
                    }
                }
            });
        }
        {
            let st = st.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut s, _)) = tcp.accept().await else {
                        continue;
                    };
                    let st = st.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        loop {
                            let mut len = [0u8; 2];
                            if s.read_exact(&mut len).await.is_err() {
                                return;
                            }
                            let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                            if s.read_exact(&mut msg).await.is_err() {
                                return;
                            }
                            let Some(resp) = st.answer(&msg, true) else {
                                return;
                            };
                            if *st.mode.lock().unwrap() == DnsMode::Silent {
                                continue;
                            }
                            let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                            out.extend_from_slice(&resp);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
        Self { addr, st }
    }

    fn set_addrs(&self, name: &str, ips: &[&str], ttl: u32) {
        let ips = ips.iter().map(|i| i.parse().unwrap()).collect();
        self.st.addrs.lock().unwrap().insert(norm(name), (ips, ttl));
    }

    fn set_srv(&self, name: &str, recs: Vec<Srv>, ttl: u32) {
        self.st.srv.lock().unwrap().insert(norm(name), (recs, ttl));
    }

    fn fail(&self, name: &str, on: bool) {
        let mut failing = self.st.failing.lock().unwrap();
        if on {
            failing.insert(norm(name));
        } else {
            failing.remove(&norm(name));
        }
    }

    fn mode(&self, m: DnsMode) {
        *self.st.mode.lock().unwrap() = m;
    }

    fn queries(&self) -> usize {
        self.st.queries.lock().unwrap().len()
    }

    fn tcp_queries(&self) -> usize {
        self.st
            .queries
            .lock()
            .unwrap()
            .iter()
            .filter(|q| q.2)
            .count()
    }
}

impl DnsState {
    fn answer(&self, q: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let (id, qflags, name, qtype, qend) = parse_dns_query(q)?;
        self.queries
            .lock()
            .unwrap()
            .push((name.clone(), qtype, tcp));
        let mode = self.mode.lock().unwrap().clone();
        let mut rcode = 0u8;
        let mut tc = false;
        let mut answers: Vec<(Vec<u8>, u16, u32, Vec<u8>)> = Vec::new();
        let owner = match &mode {
            DnsMode::OtherName(o) => encode_name(o),
            _ => vec![0xC0, 0x0C],
        };
        let failing = self.failing.lock().unwrap().contains(&name);
        match &mode {
            _ if failing => rcode = 2,
            DnsMode::Rcode(r) => rcode = *r,
            DnsMode::TruncateUdp if !tcp => tc = true,
            _ => {
                let addrs = self.addrs.lock().unwrap().get(&name).cloned();
                let srv = self.srv.lock().unwrap().get(&name).cloned();
                if addrs.is_none() && srv.is_none() {
                    rcode = 3; // NXDOMAIN
                }
                if let Some((ips, ttl)) = addrs {
                    for ip in ips {
                        match (ip, qtype) {
                            (IpAddr::V4(v4), 1) => {
                                answers.push((owner.clone(), 1, ttl, v4.octets().to_vec()))
                            }
                            (IpAddr::V6(v6), 28) => {
                                answers.push((owner.clone(), 28, ttl, v6.octets().to_vec()))
                            }
                            _ => {}
                        }
                    }
                }
                if let (Some((recs, ttl)), 33) = (srv, qtype) {
                    for (prio, weight, port, target) in recs {
                        let mut rd = Vec::new();
                        rd.extend_from_slice(&prio.to_be_bytes());
                        rd.extend_from_slice(&weight.to_be_bytes());
                        rd.extend_from_slice(&port.to_be_bytes());
                        rd.extend_from_slice(&encode_name(&target));
                        answers.push((owner.clone(), 33, ttl, rd));
                    }
                }
            }
        }
        let rid = if mode == DnsMode::WrongId {
            id.wrapping_add(1)
        } else {
            id
        };
        let mut out = Vec::new();
        out.extend_from_slice(&rid.to_be_bytes());
        let opcode = qflags & 0x7800;
        let rd = qflags & 0x0100;
        let flags: u16 =
            0x8000 | opcode | 0x0400 | if tc { 0x0200 } else { 0 } | rd | 0x0080 | rcode as u16;
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(q.get(12..qend)?);
        for (owner, t, ttl, rdata) in answers {
            out.extend_from_slice(&owner);
            out.extend_from_slice(&t.to_be_bytes());
            out.extend_from_slice(&1u16.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            out.extend_from_slice(&rdata);
        }
        Some(out)
    }
}

fn dns_a(fake: &FakeDns, name: &str, port: u16) -> Dns {
    Dns::addresses(name, port)
        .unwrap()
        .name_servers([fake.addr])
}

/// Three servers on 127.0.0.1-3, one port: the name's A records.
async fn three_on_one_port() -> (Up, Up, Up) {
    loop {
        let l1 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l1.local_addr().unwrap().port();
        let (Ok(l2), Ok(l3)) = (
            tokio::net::TcpListener::bind(("127.0.0.2", port)).await,
            tokio::net::TcpListener::bind(("127.0.0.3", port)).await,
        ) else {
            continue;
        };
        return (Up::serve(l1), Up::serve(l2), Up::serve(l3));
    }
}

/// Baseline: A records followed on their TTL; calls reach them; a record that leaves leaves.
#[tokio::test(start_paused = true)]
async fn dns_a_records_followed() {
    let dns = FakeDns::start().await;
    let (a, b, _c) = three_on_one_port().await;
    let port = a.addr.port();
    dns.set_addrs("orders.test", &["127.0.0.1", "127.0.0.2"], 1);
    let (layer, svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = h.follow_dns(dns_a(&dns, "orders.test", port));
    assert!(
        until(|| listed(&h) == set_of([&a.auth(), &b.auth()])).await,
        "set {:?}",
        listed(&h)
    );
    for _ in 0..10 {
        assert_eq!(call(&svc).await.unwrap().0, 200);
    }
    dns.set_addrs("orders.test", &["127.0.0.2"], 1);
    assert!(
        until(|| listed(&h) == set_of([&b.auth()])).await,
        "set {:?}",
        listed(&h)
    );
    follower.abort();
}

/// "never ... later than the ceiling": an answer with a one-day TTL and a 2 s ceiling; the
/// records change; the set must follow within a few ceilings (guard 30 s).
#[tokio::test(start_paused = true)]
async fn dns_huge_ttl_is_capped_by_the_ceiling() {
    let dns = FakeDns::start().await;
    let (a, b, _c) = three_on_one_port().await;
    let port = a.addr.port();
    dns.set_addrs("orders.test", &["127.0.0.1"], 86_400);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = h.follow_dns(
        dns_a(&dns, "orders.test", port)
            .ttl_bounds(Duration::from_millis(500), Duration::from_secs(2))
            .unwrap(),
    );
    assert!(until(|| listed(&h) == set_of([&a.auth()])).await);
    let q = dns.queries();
    dns.set_addrs("orders.test", &["127.0.0.2"], 86_400);
    let followed = until(|| listed(&h) == set_of([&b.auth()])).await;
    assert!(
        followed,
        "dns.rs: \"resolved again when the shortest TTL of the answer runs out, but never ... later than the ceiling\": with TTL 1 day and a 2 s ceiling, the set is still {:?} after {GUARD:?} ({} queries reached the server since the change)",
        listed(&h),
        dns.queries() - q
    );
    follower.abort();
}

/// TTL 0 with the default floor (1 s): "never sooner than the floor". In 3 s: a few
/// resolutions (each an A and maybe an AAAA query), not a flood.
#[tokio::test(start_paused = true)]
async fn dns_ttl_zero_respects_the_floor() {
    let dns = FakeDns::start().await;
    dns.set_addrs("orders.test", &["127.0.0.1"], 0);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = h.follow_dns(dns_a(&dns, "orders.test", 8080));
    assert!(until(|| !listed(&h).is_empty()).await);
    let q0 = dns.queries();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let q = dns.queries() - q0;
    follower.abort();
    assert!(q >= 1, "re-resolved at least once in 3 s with TTL 0");
    assert!(
        q <= 24,
        "dns.rs: \"never sooner than the floor (default 1 s)\": {q} queries in 3 s with TTL 0"
    );
}

/// NXDOMAIN, SERVFAIL, REFUSED and an empty NOERROR answer leave the set as it is, and
/// failures are retried without flooding ("tried again after the floor, growing to the
/// ceiling").
#[tokio::test(start_paused = true)]
async fn dns_failures_keep_the_set_and_back_off() {
    let dns = FakeDns::start().await;
    dns.set_addrs("orders.test", &["127.0.0.1", "127.0.0.2"], 1);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = h.follow_dns(dns_a(&dns, "orders.test", 8080));
    let want = set_of(["127.0.0.1:8080", "127.0.0.2:8080"]);
    assert!(until(|| listed(&h) == want).await);
    for (what, mode) in [
        ("NXDOMAIN", DnsMode::Rcode(3)),
        ("SERVFAIL", DnsMode::Rcode(2)),
        ("REFUSED", DnsMode::Rcode(5)),
    ] {
        dns.mode(mode);
        let q0 = dns.queries();
        assert!(
            until(|| dns.queries() >= q0 + 2).await,
            "{what}: the name is asked again"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            listed(&h),
            want,
            "dns.rs: \"A failed resolution ... leaves the set as it is\" ({what})"
        );
    }
    let q0 = dns.queries();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let q = dns.queries() - q0;
    assert!(
        q <= 30,
        "failures retried after the floor, growing: {q} queries in 3 s"
    );
    // The name exists with no address: an empty answer.
    dns.mode(DnsMode::Normal);
    dns.set_addrs("orders.test", &[], 1);
    let q0 = dns.queries();
    assert!(until(|| dns.queries() >= q0 + 2).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        listed(&h),
        want,
        "observability.md: \"DNS answer with no address; endpoints stay as they are\""
    );
    dns.set_addrs("orders.test", &["127.0.0.3"], 1);
    assert!(
        until(|| listed(&h) == set_of(["127.0.0.3:8080"])).await,
        "and it follows again: {:?}",
        listed(&h)
    );
    follower.abort();
}

/// "Ask these name servers (UDP, then TCP for long answers)": a truncated UDP answer is asked
/// again over TCP; 60 addresses.
#[tokio::test(start_paused = true)]
async fn dns_truncated_answer_is_asked_again_over_tcp() {
    let dns = FakeDns::start().await;
    let ips: Vec<String> = (1..=60).map(|i| format!("10.0.0.{i}")).collect();
    let ips_ref: Vec<&str> = ips.iter().map(String::as_str).collect();
    dns.set_addrs("orders.test", &ips_ref, 30);
    dns.mode(DnsMode::TruncateUdp);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = h.follow_dns(dns_a(&dns, "orders.test", 8080));
    let ok = until(|| h.list().len() == 60).await;
    follower.abort();
    assert!(
        ok,
        "dns.rs: \"UDP, then TCP for long answers\": {} endpoints, {} TCP queries",
        h.list().len(),
        dns.tcp_queries()
    );
}

/// SRV: "each target's addresses with the record's port", whatever its weight or priority; a
/// record with port 0 makes no endpoint.
#[tokio::test(start_paused = true)]
async fn dns_srv_targets_with_their_ports() {
    let dns = FakeDns::start().await;
    dns.set_srv(
        "_http._tcp.orders.test",
        vec![
            (0, 0, 8081, "a.orders.test".into()),
            (10, 5, 8082, "b.orders.test".into()),
            (0, 100, 0, "c.orders.test".into()),
        ],
        5,
    );
    dns.set_addrs("a.orders.test", &["127.0.0.1"], 5);
    dns.set_addrs("b.orders.test", &["127.0.0.2", "::1"], 5);
    dns.set_addrs("c.orders.test", &["127.0.0.3"], 5);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = h.follow_dns(
        Dns::services("_http._tcp.orders.test")
            .unwrap()
            .name_servers([dns.addr]),
    );
    assert!(until(|| listed(&h).len() >= 2).await, "{:?}", listed(&h));
    tokio::time::sleep(Duration::from_millis(500)).await;
    follower.abort();
    let got = listed(&h);
    assert!(got.contains("127.0.0.1:8081"), "weight 0 target: {got:?}");
    assert!(got.contains("127.0.0.2:8082"), "{got:?}");
    assert!(
        !got.iter().any(|e| e.ends_with(":0")),
        "port 0 is not an endpoint: {got:?}"
    );
}

/// `Dns::services`: "A target whose name has no address is left out; one whose lookup fails
/// fails the whole resolution" (and "a failed resolution leaves the set as it is"): a
/// target's SERVFAIL must not drop that instance while the others stay.
#[tokio::test(start_paused = true)]
async fn dns_srv_target_failing_to_resolve_keeps_the_set() {
    let dns = FakeDns::start().await;
    dns.set_srv(
        "_http._tcp.orders.test",
        vec![
            (0, 1, 8081, "a.orders.test".into()),
            (0, 1, 8082, "b.orders.test".into()),
            (0, 1, 8083, "gone.orders.test".into()),
        ],
        1,
    );
    dns.set_addrs("a.orders.test", &["127.0.0.1"], 1);
    dns.set_addrs("b.orders.test", &["127.0.0.2"], 1);
    let (layer, _svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = h.follow_dns(
        Dns::services("_http._tcp.orders.test")
            .unwrap()
            .name_servers([dns.addr]),
    );
    let both = set_of(["127.0.0.1:8081", "127.0.0.2:8082"]);
    assert!(
        until(|| listed(&h) == both).await,
        "a target with no address is left out: {:?}",
        listed(&h)
    );
    dns.fail("b.orders.test", true);
    let q0 = dns.queries();
    assert!(until(|| dns.queries() >= q0 + 8).await, "asked again");
    assert_eq!(
        listed(&h),
        both,
        "b's lookup failed: the set stays as it was"
    );
    dns.fail("b.orders.test", false);
    dns.set_addrs("b.orders.test", &["127.0.0.3"], 1);
    assert!(
        until(|| listed(&h) == set_of(["127.0.0.1:8081", "127.0.0.3:8082"])).await,
        "followed again once b resolves: {:?}",
        listed(&h)
    );
    follower.abort();
}

/// Records owned by another name than the one asked (no CNAME) are not the name's records:
/// "every A and AAAA record of a name".
#[tokio::test(start_paused = true)]
async fn dns_answer_for_another_name_is_not_taken() {
    let dns = FakeDns::start().await;
    dns.set_addrs("orders.test", &["127.0.0.9"], 1);
    dns.mode(DnsMode::OtherName("evil.test".into()));
    let (layer, _svc) = balancer(|b| b.endpoints(["127.0.0.1:8080"]));
    let h = layer.handle();
    let follower = h.follow_dns(dns_a(&dns, "orders.test", 8080));
    assert!(until(|| dns.queries() >= 3).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    follower.abort();
    assert!(
        !listed(&h).contains("127.0.0.9:8080"),
        "dns.rs: \"every A and AAAA record of a name\": a record owned by evil.test was taken: {:?}",
        listed(&h)
    );
}

/// Answers from another port than the server asked, or with another ID, are spoofed: not
/// taken.
#[tokio::test(start_paused = true)]
async fn dns_spoofed_answers_are_not_taken() {
    for mode in [DnsMode::WrongSource, DnsMode::WrongId] {
        let dns = FakeDns::start().await;
        dns.set_addrs("orders.test", &["127.0.0.9"], 1);
        dns.mode(mode.clone());
        let (layer, _svc) = balancer(|b| b.endpoints(["127.0.0.1:8080"]));
        let h = layer.handle();
        let follower = h.follow_dns(dns_a(&dns, "orders.test", 8080));
        assert!(until(|| dns.queries() >= 2).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        follower.abort();
        assert_eq!(
            listed(&h),
            set_of(["127.0.0.1:8080"]),
            "{mode:?}: a spoofed answer changed the set"
        );
    }
}

/// AAAA records make bracketed endpoints that are called.
#[tokio::test(start_paused = true)]
async fn dns_aaaa_records_are_called() {
    let dns = FakeDns::start().await;
    let v6 = Up::bind("[::1]:0".parse().unwrap()).await;
    dns.set_addrs("orders.test", &["::1"], 5);
    let (layer, svc) = balancer(|b| b);
    let h = layer.handle();
    let follower = h.follow_dns(dns_a(&dns, "orders.test", v6.addr.port()));
    assert!(
        until(|| !listed(&h).is_empty()).await,
        "AAAA only: no endpoint"
    );
    assert_eq!(listed(&h), set_of([&format!("[::1]:{}", v6.addr.port())]));
    assert_eq!(call(&svc).await.unwrap().0, 200);
    follower.abort();
}

/// README: "No configuration value panics ... Duration::MAX is no limit": a ceiling of
/// `Duration::MAX` with a TTL of 2^31-1 s, and a floor of `Duration::MAX`.
#[tokio::test(start_paused = true)]
async fn dns_duration_max_bounds_do_not_panic() {
    for (floor, ceil) in [
        (Duration::from_secs(1), Duration::MAX),
        (Duration::MAX, Duration::MAX),
    ] {
        let dns = FakeDns::start().await;
        dns.set_addrs("orders.test", &["127.0.0.1"], i32::MAX as u32);
        let (layer, _svc) = balancer(|b| b);
        let h = layer.handle();
        let follower = h.follow_dns(
            dns_a(&dns, "orders.test", 8080)
                .ttl_bounds(floor, ceil)
                .unwrap(),
        );
        assert!(until(|| !listed(&h).is_empty()).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !follower.is_finished(),
            "README: \"No configuration value panics, however absurd\": ttl_bounds({floor:?}, {ceil:?}) ended the follower"
        );
        follower.abort();
    }
}

/// `follow_dns`: a detached follower follows while the balancer lives, and stops asking once
/// it is gone.
#[tokio::test(start_paused = true)]
async fn dns_a_detached_follower_follows_until_the_balancer_is_gone() {
    let dns = FakeDns::start().await;
    dns.set_addrs("orders.test", &["127.0.0.1"], 1);
    let (layer, svc) = balancer(|b| b);
    let h = layer.handle();
    drop(h.follow_dns(dns_a(&dns, "orders.test", 8080)));
    assert!(until(|| listed(&h) == set_of(["127.0.0.1:8080"])).await);
    dns.set_addrs("orders.test", &["127.0.0.2"], 1);
    assert!(
        until(|| listed(&h) == set_of(["127.0.0.2:8080"])).await,
        "a detached follower still follows"
    );
    drop((layer, svc, h));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let n = dns.queries();
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        dns.queries(),
        n,
        "the follower of a dropped balancer kept resolving"
    );
}

/// DNS config validation.
#[test]
fn dns_config_refuses_what_cannot_work() {
    assert!(Dns::addresses("orders.test", 0).is_err(), "port 0");
    assert!(Dns::addresses("", 80).is_err(), "empty name");
    assert!(Dns::addresses("a..b", 80).is_err(), "empty label");
    assert!(
        Dns::addresses(&"a".repeat(64), 80).is_err(),
        "label over 63"
    );
    assert!(
        Dns::addresses(&format!("{}.test", "a.".repeat(130)), 80).is_err(),
        "name over 253"
    );
    assert!(Dns::services("_http._tcp.orders.test").is_ok());
    let d = Dns::addresses("orders.test", 80).unwrap();
    assert!(
        d.clone()
            .ttl_bounds(Duration::ZERO, Duration::from_secs(1))
            .is_err()
    );
    assert!(
        d.clone()
            .ttl_bounds(Duration::from_secs(2), Duration::from_secs(1))
            .is_err()
    );
}
