//! A real, scriptable, fault-injecting upstream for testing resilient clients.
//!
//! [`FaultServer`] listens on `127.0.0.1` (ephemeral port) and speaks HTTP/1.1 and HTTP/2
//! (prior knowledge). What it does with each request comes from a script: a [`Fault`] per
//! request in order, or per time window. It records every request it receives — method,
//! path, headers, body length and a hash of the body — so tests can assert how many attempts
//! reached it and that replayed bodies were identical.
//!
//! ```
//! use steadfast_testkit::{Fault, FaultServer};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let server = FaultServer::start().await;
//! server.script([Fault::status(503), Fault::status(503)]); // then the default: 200
//! // ... point a client at server.addr() ...
//! assert_eq!(server.hits(), 0);
//! # }
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::hash::{DefaultHasher, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// What the server does with one request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status, these headers and body.
    Respond {
        /// The status.
        status: StatusCode,
        /// Extra headers (e.g. `Retry-After`).
        headers: Vec<(HeaderName, HeaderValue)>,
        /// The body.
        body: Bytes,
    },
    /// Wait, then do the inner fault.
    Delay(Duration, Box<Fault>),
    /// Accept the request and never answer.
    Hang,
    /// Close the connection without a response.
    Close,
    /// Send a 200 head and part of the body, then reset the connection.
    ResetMidBody,
    /// Send a 200 with `chunks` chunks of `chunk` bytes, `interval` apart.
    SlowBody {
        /// Chunks to send.
        chunks: usize,
        /// Bytes per chunk.
        chunk: usize,
        /// Pause between chunks.
        interval: Duration,
    },
}

impl Fault {
    /// A plain status with an empty body.
    pub fn status(code: u16) -> Self {
        Fault::Respond {
            status: StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// A status with one extra header.
    pub fn status_with(code: u16, name: &'static str, value: &'static str) -> Self {
        Fault::Respond {
            status: StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            headers: vec![(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            )],
            body: Bytes::new(),
        }
    }

    /// This fault after `d`.
    pub fn after(self, d: Duration) -> Self {
        Fault::Delay(d, Box::new(self))
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Received {
    /// The method.
    pub method: Method,
    /// The path.
    pub path: String,
    /// The headers.
    pub headers: HeaderMap,
    /// How many body bytes arrived.
    pub body_len: usize,
    /// A hash of the body bytes (equal bodies, equal hashes).
    pub body_hash: u64,
    /// Whether the whole body arrived (false if the client gave up mid-body).
    pub body_complete: bool,
    /// When (tokio time).
    pub at: Instant,
}

#[derive(Default)]
struct Script {
    queue: VecDeque<Fault>,
    windows: Vec<(Duration, Fault)>,
    default: Option<Fault>,
}

struct State {
    script: Mutex<Script>,
    received: Mutex<Vec<Received>>,
    started: Instant,
    open: std::sync::atomic::AtomicUsize,
}

/// A running fault-injecting server; stops when dropped.
pub struct FaultServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FaultServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Hashes body bytes the way [`Received::body_hash`] does.
pub fn hash_body(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

type Body = BoxBody<Bytes, std::io::Error>;

impl FaultServer {
    /// Starts a server on `127.0.0.1` with an ephemeral port; by default it answers 200.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            script: Mutex::new(Script::default()),
            received: Mutex::new(Vec::new()),
            started: Instant::now(),
            open: std::sync::atomic::AtomicUsize::new(0),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                s.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                conns.spawn(async move {
                    let state = s.clone();
                    let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    state.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        Self { addr, state, task }
    }

    /// The address to send requests to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Faults for the next requests, in order; after them, the default.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.lock_script().queue.extend(faults);
    }

    /// What to do once the script is used up (default: 200).
    pub fn set_default(&self, fault: Fault) {
        self.lock_script().default = Some(fault);
    }

    /// Faults by time: until `until` after the server started, `fault` applies (checked after
    /// the per-request script is used up; the first window that has not ended wins).
    pub fn windows(&self, windows: impl IntoIterator<Item = (Duration, Fault)>) {
        self.lock_script().windows.extend(windows);
    }

    /// How many requests arrived.
    pub fn hits(&self) -> usize {
        self.received().len()
    }

    /// Connections open now (accepted and not yet closed).
    pub fn open_connections(&self) -> usize {
        self.state.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn lock_script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.state
            .script
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn next_fault(state: &State) -> Fault {
    let mut s = state.script.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(f) = s.queue.pop_front() {
        return f;
    }
    let now = state.started.elapsed();
    if let Some((_, f)) = s.windows.iter().find(|(until, _)| now < *until) {
        return f.clone();
    }
    s.default.clone().unwrap_or_else(|| Fault::status(200))
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let (parts, mut body) = req.into_parts();
    let mut bytes = Vec::new();
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    bytes.extend_from_slice(d);
                }
            }
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    state
        .received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Received {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            headers: parts.headers,
            body_len: bytes.len(),
            body_hash: hash_body(&bytes),
            body_complete: complete,
            at: Instant::now(),
        });
    let mut fault = next_fault(&state);
    loop {
        match fault {
            Fault::Delay(d, inner) => {
                tokio::time::sleep(d).await;
                fault = *inner;
            }
            Fault::Hang => {
                std::future::pending::<()>().await;
            }
            Fault::Close => {
                return Err(std::io::Error::other("scripted close"));
            }
            Fault::Respond {
                status,
                headers,
                body,
            } => {
                let mut res = Response::new(full(body));
                *res.status_mut() = status;
                for (k, v) in headers {
                    res.headers_mut().append(k, v);
                }
                return Ok(res);
            }
            Fault::ResetMidBody => {
                // Part of the body, a pause (so the head and that part are flushed), then a
                // failure that makes hyper abort the connection.
                let body = StreamBody::new(futures_util::stream::unfold(0u8, |step| async move {
                    match step {
                        0 => Some((Ok(Frame::data(Bytes::from_static(b"partial"))), 1)),
                        1 => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            Some((Err(std::io::Error::other("scripted reset")), 2))
                        }
                        _ => None,
                    }
                }));
                let mut res = Response::new(BoxBody::new(body));
                res.headers_mut().insert(
                    http::header::CONTENT_LENGTH,
                    HeaderValue::from_static("1000"),
                );
                return Ok(res);
            }
            Fault::SlowBody {
                chunks,
                chunk,
                interval,
            } => {
                let stream = futures_util::stream::unfold(0usize, move |i| async move {
                    if i >= chunks {
                        return None;
                    }
                    tokio::time::sleep(interval).await;
                    Some((Ok(Frame::data(Bytes::from(vec![b'x'; chunk]))), i + 1))
                });
                return Ok(Response::new(BoxBody::new(StreamBody::new(stream))));
            }
        }
    }
}

fn full(b: Bytes) -> Body {
    BoxBody::new(http_body_util::Full::new(b).map_err(|e: Infallible| match e {}))
}

/// One instance a [`ConsulServer`] reports for a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsulInstance {
    /// The service's address (an IP or a host name).
    pub address: String,
    /// The service's port.
    pub port: u16,
    /// Whether its health checks pass.
    pub passing: bool,
}

impl ConsulInstance {
    /// A passing instance at `addr`.
    pub fn passing(addr: SocketAddr) -> Self {
        Self {
            address: addr.ip().to_string(),
            port: addr.port(),
            passing: true,
        }
    }

    /// A failing instance at `addr`.
    pub fn failing(addr: SocketAddr) -> Self {
        Self {
            passing: false,
            ..Self::passing(addr)
        }
    }
}

struct ConsulState {
    catalog: Mutex<(u64, std::collections::BTreeMap<String, Vec<ConsulInstance>>)>,
    changed: tokio::sync::Notify,
    queries: std::sync::atomic::AtomicUsize,
}

/// A small server that answers Consul's health API as Consul documents it, for testing
/// discovery without a Consul agent (none can be installed where these tests run):
/// `GET /v1/health/service/<name>` with `?passing` (only instances whose checks pass) and
/// blocking queries (`?index=<n>&wait=<d>`: the answer waits until the catalog's index moves
/// past `n` or `wait` runs out, default 5 min), answered with the `X-Consul-Index` header.
/// Everything else is a 404.
///
/// ```
/// use steadfast_testkit::{ConsulInstance, ConsulServer};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let consul = ConsulServer::start().await;
/// consul.set("orders", vec![ConsulInstance::passing("127.0.0.1:8081".parse().unwrap())]);
/// assert_eq!(consul.index(), 1);
/// # }
/// ```
pub struct ConsulServer {
    addr: SocketAddr,
    state: Arc<ConsulState>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ConsulServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for ConsulServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConsulServer {
    /// Starts the server on `127.0.0.1` with an ephemeral port and an empty catalog (index 0).
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(ConsulState {
            catalog: Mutex::new((0, std::collections::BTreeMap::new())),
            changed: tokio::sync::Notify::new(),
            queries: std::sync::atomic::AtomicUsize::new(0),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| consul_answer(s.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// The agent's address, for `http://<addr>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces a service's instances and moves the index on: blocked queries answer now.
    pub fn set(&self, service: &str, instances: Vec<ConsulInstance>) {
        {
            let mut c = self
                .state
                .catalog
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            c.0 += 1;
            c.1.insert(service.to_owned(), instances);
        }
        self.state.changed.notify_waiters();
    }

    /// The catalog's index now.
    pub fn index(&self) -> u64 {
        self.state
            .catalog
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// How many health queries arrived.
    pub fn queries(&self) -> usize {
        self.state.queries.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Consul's duration syntax for `wait`: a number and `ms`, `s`, `m` or `h`.
fn consul_wait(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return None,
    })
}

async fn consul_answer(
    state: Arc<ConsulState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let not_found = || {
        let mut r = Response::new(full(Bytes::from_static(b"not found")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    };
    let Some(service) = req.uri().path().strip_prefix("/v1/health/service/") else {
        return Ok(not_found());
    };
    let service = service.to_owned();
    state
        .queries
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let (mut passing, mut index, mut wait) = (false, 0u64, Duration::from_secs(300));
    for pair in req.uri().query().unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "passing" => passing = v != "false",
            "index" => index = v.parse().unwrap_or(0),
            "wait" => wait = consul_wait(v).unwrap_or(wait).min(Duration::from_secs(600)),
            _ => {}
        }
    }
    // A blocking query: wait for the index to move past the caller's, or for `wait`.
    let deadline = Instant::now() + wait;
    loop {
        let notified = state.changed.notified();
        let current = state
            .catalog
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if index == 0 || current > index {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break;
        }
    }
    let (current, instances) = {
        let c = state.catalog.lock().unwrap_or_else(PoisonError::into_inner);
        (c.0, c.1.get(&service).cloned().unwrap_or_default())
    };
    let entries: Vec<String> = instances
        .iter()
        .filter(|i| i.passing || !passing)
        .map(|i| {
            let status = if i.passing { "passing" } else { "critical" };
            format!(
                r#"{{"Node":{{"Node":"node-{port}","Address":"{addr}"}},"Service":{{"ID":"{service}-{port}","Service":"{service}","Address":"{addr}","Port":{port}}},"Checks":[{{"Status":"{status}"}}]}}"#,
                addr = i.address,
                port = i.port,
            )
        })
        .collect();
    let mut res = Response::new(full(Bytes::from(format!("[{}]", entries.join(",")))));
    res.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    res.headers_mut()
        .insert("x-consul-index", HeaderValue::from(current.max(1)));
    Ok(res)
}

/// Records a [`DnsServer`] answers with.
#[derive(Clone, Debug, Default)]
struct Zone {
    /// Name (lower case, no trailing dot) -> addresses and their TTL.
    addresses: std::collections::BTreeMap<String, (Vec<std::net::IpAddr>, u32)>,
    /// Name -> (port, target) pairs and their TTL.
    services: std::collections::BTreeMap<String, (Vec<(u16, String)>, u32)>,
}

/// A small authoritative DNS server on `127.0.0.1` (UDP, ephemeral port) whose records a test
/// changes while clients resolve: A and AAAA records for names, SRV records for services.
/// Unknown names are NXDOMAIN; other record types are answered with no records. Enough of
/// RFC 1035 and RFC 2782 for a stub resolver to use it as its name server.
///
/// ```
/// use steadfast_testkit::DnsServer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let dns = DnsServer::start().await;
/// dns.set_addresses("orders.test", &["10.0.0.1".parse().unwrap()], 5);
/// dns.set_services("_http._tcp.orders.test", &[(8080, "orders-1.test")], 5);
/// assert_eq!(dns.queries(), 0);
/// # }
/// ```
pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    queries: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    /// Starts the server with no records.
    pub async fn start() -> Self {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let addr = socket.local_addr().expect("local addr");
        let zone: Arc<Mutex<Zone>> = Arc::default();
        let queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (z, q) = (zone.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                q.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let zone = z.lock().unwrap_or_else(PoisonError::into_inner).clone();
                if let Some(answer) = dns_answer(&buf[..n], &zone) {
                    let _ = socket.send_to(&answer, from).await;
                }
            }
        });
        Self {
            addr,
            zone,
            queries,
            task,
        }
    }

    /// The address to use as a name server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the A / AAAA records of `name` (an empty list removes the name).
    pub fn set_addresses(&self, name: &str, addresses: &[std::net::IpAddr], ttl: u32) {
        let mut z = self.zone.lock().unwrap_or_else(PoisonError::into_inner);
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        if addresses.is_empty() {
            z.addresses.remove(&key);
        } else {
            z.addresses.insert(key, (addresses.to_vec(), ttl));
        }
    }

    /// Sets the SRV records of `name`: `(port, target)` pairs (an empty list removes it).
    pub fn set_services(&self, name: &str, services: &[(u16, &str)], ttl: u32) {
        let mut z = self.zone.lock().unwrap_or_else(PoisonError::into_inner);
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        if services.is_empty() {
            z.services.remove(&key);
        } else {
            let list = services
                .iter()
                .map(|(p, t)| (*p, t.trim_end_matches('.').to_ascii_lowercase()))
                .collect();
            z.services.insert(key, (list, ttl));
        }
    }

    /// How many queries arrived.
    pub fn queries(&self) -> usize {
        self.queries.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads a name at `pos` (no compression: queries carry none); returns it and the position
/// after it.
fn dns_read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*msg.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(msg.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    Some((labels.join("."), pos))
}

fn dns_write_name(out: &mut Vec<u8>, name: &str) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len().min(63) as u8);
        out.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    out.push(0);
}

/// The answer to one query, or `None` for a message that is not one.
fn dns_answer(query: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let (name, end) = dns_read_name(query, 12)?;
    let qtype = u16::from_be_bytes([*query.get(end)?, *query.get(end + 1)?]);
    let question = query.get(12..end + 4)?;
    let mut records: Vec<(u16, u32, Vec<u8>)> = Vec::new();
    let known = zone.addresses.contains_key(&name) || zone.services.contains_key(&name);
    if let Some((addrs, ttl)) = zone.addresses.get(&name) {
        for a in addrs {
            match (a, qtype) {
                (std::net::IpAddr::V4(v4), 1) => records.push((1, *ttl, v4.octets().to_vec())),
                (std::net::IpAddr::V6(v6), 28) => records.push((28, *ttl, v6.octets().to_vec())),
                _ => {}
            }
        }
    }
    if let (Some((services, ttl)), 33) = (zone.services.get(&name), qtype) {
        for (port, target) in services {
            let mut rdata = vec![0, 10, 0, 10];
            rdata.extend_from_slice(&port.to_be_bytes());
            dns_write_name(&mut rdata, target);
            records.push((33, *ttl, rdata));
        }
    }
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&query[0..2]);
    // QR, AA, RD copied, RA; NXDOMAIN for an unknown name.
    out.push(0x84 | (query[2] & 0x01));
    out.push(0x80 | if known { 0 } else { 3 });
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(records.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for (rtype, ttl, rdata) in records {
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    Some(out)
}
