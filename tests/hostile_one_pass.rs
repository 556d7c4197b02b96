//! Hostile tests of the one-pass header reading of the server layers (correlation and
//! deadline) and of the retry policy's early "done", through real loopback sockets.
//!
//! Requests are written by hand on a raw TCP stream, so the tests control header order,
//! duplicates, the case of names and how many distinct names a request carries. Every
//! scenario is sent with enough padding headers to put the request on both sides of
//! `steadfast_core::header::FEW_NAMES` (16 distinct names: one pass at or below, hashed
//! lookups above) and once with 90 names; what the handler sees and what the response
//! echoes must be the same every time, and what the docs promise.
//!
//! No wall-clock sleeps and no timing assertions: the deadline is read in buckets of 100 s
//! of budgets 1,000 s apart (a server limit of 100,000 s), and expiry is tested only with
//! budgets of zero (a deadline already passed, answered at once).

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::{Router, routing::any};
use bytes::Bytes;
use http::{HeaderName, Request};
use http_body_util::Full;
use steadfast::common::header::FEW_NAMES;
use steadfast::common::{Class, Deadline};
use steadfast::correlation::{CorrelationId, TraceContext};
use steadfast::retry::{Backoff, Jitter, RetryLayer};
use steadfast::server::ServerBuilder;
use steadfast_testkit::{Fault, FaultServer};
use support::serve_axum;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Layer, ServiceExt};

// ---------------------------------------------------------------------------------------
// The server under test and what its handler sees.
// ---------------------------------------------------------------------------------------

/// The headers whose fields the handler reports, in this order.
const READ: [&str; 7] = [
    "x-correlation-id",
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-request-timeout-ms",
    "grpc-timeout",
    "x-envoy-expected-rq-timeout-ms",
];

/// Distinct header names the request carried when it reached the stack.
#[derive(Clone, Copy)]
struct EdgeNames(usize);

/// What the handler saw.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    /// Every field of the headers in [`READ`], in order, as `name: value`.
    fields: Vec<String>,
    /// `CorrelationId::current()`.
    current: Option<String>,
    /// The `CorrelationId` request extension.
    ext: Option<String>,
    /// `TraceContext::current()`: trace id, parent id, flags, state.
    trace: Option<(String, String, u8, Option<String>)>,
    /// `Deadline::current()`'s remaining time in hundreds of seconds, rounded.
    deadline: Option<u64>,
    /// Whether the `Deadline` request extension is the ambient deadline.
    deadline_ext_same: bool,
}

/// What one request produced.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Obs {
    status: u16,
    /// Every `x-correlation-id` field of the response.
    echo: Vec<String>,
    /// `None` when the handler did not run.
    seen: Option<Seen>,
}

/// Names counted at the edge and at the handler (not part of `Obs`: they vary with padding).
#[derive(Clone, Copy, Debug)]
struct Counts {
    edge: usize,
    handler: usize,
}

type Slot = Arc<Mutex<Option<(Seen, Counts)>>>;

async fn handler(State(slot): State<Slot>, req: Request<Body>) -> &'static str {
    let fields = READ
        .iter()
        .flat_map(|n| {
            req.headers()
                .get_all(*n)
                .iter()
                .map(|v| format!("{n}: {}", String::from_utf8_lossy(v.as_bytes())))
                .collect::<Vec<_>>()
        })
        .collect();
    let ambient = Deadline::current();
    let seen = Seen {
        fields,
        current: CorrelationId::current().map(|i| i.as_str().to_owned()),
        ext: req
            .extensions()
            .get::<CorrelationId>()
            .map(|i| i.as_str().to_owned()),
        trace: TraceContext::current().map(|t| {
            (
                t.trace_id(),
                t.parent_id(),
                t.flags(),
                t.state()
                    .map(|s| String::from_utf8_lossy(s.as_bytes()).into_owned()),
            )
        }),
        deadline: ambient.map(|d| (d.remaining().as_secs() + 50) / 100),
        deadline_ext_same: req.extensions().get::<Deadline>().copied() == ambient,
    };
    let counts = Counts {
        edge: req.extensions().get::<EdgeNames>().expect("edge layer").0,
        handler: req.headers().keys_len(),
    };
    *slot.lock().unwrap() = Some((seen, counts));
    "ok"
}

struct Server {
    addr: std::net::SocketAddr,
    slot: Slot,
    /// Distinct names of the last request as it reached the stack.
    edge: Arc<Mutex<Option<usize>>>,
}

/// A real server: axum (hyper) on 127.0.0.1, the stack `builder` makes, and outside it a
/// layer that records how many distinct names the request carried when it arrived.
async fn server(builder: ServerBuilder) -> Server {
    let slot: Slot = Arc::default();
    let edge_seen: Arc<Mutex<Option<usize>>> = Arc::default();
    let e = edge_seen.clone();
    let stack = builder
        .timeout(Duration::from_secs(100_000))
        .build()
        .unwrap();
    let edge = tower::util::MapRequestLayer::new(move |mut req: Request<Body>| {
        let n = req.headers().keys_len();
        *e.lock().unwrap() = Some(n);
        req.extensions_mut().insert(EdgeNames(n));
        req
    });
    let app = Router::new()
        .route("/", any(handler))
        .with_state(slot.clone())
        .layer(stack)
        .layer(edge);
    Server {
        addr: serve_axum(app).await,
        slot,
        edge: edge_seen,
    }
}

async fn default_server() -> Server {
    server(steadfast::server::http()).await
}

// ---------------------------------------------------------------------------------------
// The raw client.
// ---------------------------------------------------------------------------------------

type Head<'a> = (&'a str, &'a [u8]);

/// Sends `GET /` with `host` first, then `headers` with `pads` padding headers inserted
/// before index `pad_at`, then `connection: close`; reads the whole answer.
async fn send(s: &Server, headers: &[Head<'_>], pads: usize, pad_at: usize) -> (Obs, Counts) {
    let mut req = b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n".to_vec();
    let mut line = |name: &str, value: &[u8]| {
        req.extend_from_slice(name.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
    };
    for (i, (n, v)) in headers.iter().enumerate() {
        if i == pad_at {
            for p in 0..pads {
                line(&format!("x-pad-{p}"), b"p");
            }
        }
        line(n, v);
    }
    if pad_at >= headers.len() {
        for p in 0..pads {
            line(&format!("x-pad-{p}"), b"p");
        }
    }
    req.extend_from_slice(b"connection: close\r\n\r\n");
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(&req).await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap()[9..12].parse().unwrap();
    let echo = lines
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-correlation-id"))
        .map(|(_, v)| v.trim().to_owned())
        .collect();
    let taken = s.slot.lock().unwrap().take();
    let edge = s
        .edge
        .lock()
        .unwrap()
        .take()
        .expect("the request reached the stack");
    let (seen, counts) = match taken {
        Some((seen, counts)) => {
            assert_eq!(counts.edge, edge);
            (Some(seen), counts)
        }
        None => (None, Counts { edge, handler: 0 }),
    };
    (Obs { status, echo, seen }, counts)
}

/// A generated id is a UUIDv7: replaced by `<generated>` (after checking it is one) so that
/// observations compare; an id that is one of the values sent is kept.
fn normalise(mut obs: Obs, headers: &[Head<'_>]) -> Obs {
    let sent: BTreeSet<String> = headers
        .iter()
        .flat_map(|(_, v)| {
            let v = String::from_utf8_lossy(v).into_owned();
            // A traceparent's trace id can be the id too.
            let trace = v.get(3..35).map(str::to_owned);
            std::iter::once(v).chain(trace)
        })
        .collect();
    let Some(seen) = obs.seen.as_mut() else {
        // The handler did not run: the echo is the only witness.
        for e in &mut obs.echo {
            if !sent.contains(e) {
                assert_uuid_v7(e);
                *e = "<generated>".into();
            }
        }
        return obs;
    };
    let current = seen.current.clone().expect("an id is always ambient");
    assert_eq!(
        seen.ext.as_deref(),
        Some(current.as_str()),
        "extension = ambient id"
    );
    if !sent.contains(&current) {
        assert_uuid_v7(&current);
        let swap = |s: &mut String| {
            if s.contains(&current) {
                *s = s.replace(&current, "<generated>");
            }
        };
        seen.fields.iter_mut().for_each(swap);
        obs.echo.iter_mut().for_each(swap);
        seen.current = Some("<generated>".into());
        seen.ext = Some("<generated>".into());
    }
    obs
}

fn assert_uuid_v7(id: &str) {
    let b = id.as_bytes();
    assert!(
        b.len() == 36 && b[8] == b'-' && b[14] == b'7',
        "not a generated UUIDv7: {id:?}"
    );
}

/// Sends `headers` padded to 13..=20 distinct names (so both 16 and 17, one pass and
/// lookups, are crossed at the edge) and to 90 names; asserts every observation is the same
/// and returns it. `pad_at`: where the padding goes (between duplicates, say).
async fn across(s: &Server, headers: &[Head<'_>], pad_at: usize) -> Obs {
    let mut names: BTreeSet<String> = headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    names.insert("host".into());
    names.insert("connection".into());
    let base = names.len();
    assert!(base <= 13, "scenario too large for the threshold sweep");
    let mut first: Option<(Obs, usize)> = None;
    let mut edges = BTreeSet::new();
    let mut handlers = BTreeSet::new();
    for total in (13..=20).chain([90]) {
        let (obs, counts) = send(s, headers, total - base, pad_at).await;
        assert_eq!(counts.edge, total, "distinct names at the edge");
        edges.insert(counts.edge);
        if obs.seen.is_some() {
            handlers.insert(counts.handler);
        }
        let obs = normalise(obs, headers);
        match &first {
            None => first = Some((obs, total)),
            Some((f, at)) => assert_eq!(
                &obs, f,
                "{total} distinct names disagrees with {at}: {headers:?}"
            ),
        }
    }
    assert!(
        edges.contains(&FEW_NAMES) && edges.contains(&(FEW_NAMES + 1)),
        "the sweep crossed the threshold at the edge: {edges:?}"
    );
    if !handlers.is_empty() {
        assert!(
            handlers.contains(&FEW_NAMES) && handlers.contains(&(FEW_NAMES + 1)),
            "the sweep crossed the threshold behind the correlation layer: {handlers:?}"
        );
    }
    first.unwrap().0
}

/// What the docs say the handler should see, for a request that reaches it.
fn ok(
    fields: &[&str],
    id: &str,
    trace: Option<(&str, &str, u8, Option<&str>)>,
    deadline: u64,
) -> Obs {
    Obs {
        status: 200,
        echo: vec![id.to_owned()],
        seen: Some(Seen {
            fields: fields.iter().map(|f| f.to_string()).collect(),
            current: Some(id.into()),
            ext: Some(id.into()),
            trace: trace.map(|(t, p, f, s)| (t.into(), p.into(), f, s.map(str::to_owned))),
            deadline: Some(deadline),
            deadline_ext_same: true,
        }),
    }
}

/// No inbound budget: the server's own limit, 100,000 s.
const OWN: u64 = 1000;
const TP: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TP_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TP_PARENT: &str = "00f067aa0ba902b7";
const TP2: &[u8] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
const GEN: &str = "<generated>";

// ---------------------------------------------------------------------------------------
// Correlation id.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_single_valid_id_is_kept_echoed_and_ambient() {
    let s = default_server().await;
    let h: &[Head] = &[("X-Correlation-ID", b"order-17")];
    let obs = across(&s, h, 0).await;
    assert_eq!(
        obs,
        ok(&["x-correlation-id: order-17"], "order-17", None, OWN)
    );
}

#[tokio::test]
async fn an_id_sent_twice_split_around_other_headers_is_replaced() {
    // The same valid value twice, the names differing in case, padding between them.
    let s = default_server().await;
    let h: &[Head] = &[
        ("x-correlation-id", b"order-17"),
        ("X-Correlation-Id", b"order-17"),
    ];
    let obs = across(&s, h, 1).await;
    assert_eq!(obs, ok(&["x-correlation-id: <generated>"], GEN, None, OWN));
    // A valid and an invalid copy: the valid one does not get through either.
    let h: &[Head] = &[
        ("x-correlation-id", b"ok-1"),
        ("x-correlation-id", b"bad id"),
    ];
    let obs = across(&s, h, 1).await;
    assert_eq!(obs, ok(&["x-correlation-id: <generated>"], GEN, None, OWN));
}

#[tokio::test]
async fn an_empty_or_hostile_id_is_replaced_and_never_echoed() {
    let s = default_server().await;
    for bad in [&b""[..], b"bad id", b"a\"b", b"caf\xc3\xa9", &[b'a'; 129]] {
        let h: &[Head] = &[("x-correlation-id", bad)];
        let obs = across(&s, h, 0).await;
        assert_eq!(
            obs,
            ok(&["x-correlation-id: <generated>"], GEN, None, OWN),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn a_valid_fallback_counts_when_the_primary_is_invalid() {
    let s = default_server().await;
    // "an `x-request-id` ... that is sent twice or is invalid is removed (a valid single
    // one is kept, even when the id came from elsewhere)".
    let h: &[Head] = &[("x-correlation-id", b"bad id"), ("X-Request-Id", b"req-9")];
    let obs = across(&s, h, 1).await;
    assert_eq!(
        obs,
        ok(
            &["x-correlation-id: req-9", "x-request-id: req-9"],
            "req-9",
            None,
            OWN
        )
    );
    // Primary empty, fallback valid.
    let h: &[Head] = &[("x-request-id", b"req-9"), ("x-correlation-id", b"")];
    let obs = across(&s, h, 1).await;
    assert_eq!(
        obs,
        ok(
            &["x-correlation-id: req-9", "x-request-id: req-9"],
            "req-9",
            None,
            OWN
        )
    );
    // Primary sent twice, fallback valid: the fallback.
    let h: &[Head] = &[
        ("x-correlation-id", b"a-1"),
        ("x-request-id", b"req-9"),
        ("x-correlation-id", b"a-2"),
    ];
    let obs = across(&s, h, 2).await;
    assert_eq!(
        obs,
        ok(
            &["x-correlation-id: req-9", "x-request-id: req-9"],
            "req-9",
            None,
            OWN
        )
    );
}

#[tokio::test]
async fn an_ambiguous_or_invalid_fallback_is_removed() {
    let s = default_server().await;
    // Valid primary, fallback twice (case differs): the primary counts, the fallback goes.
    let h: &[Head] = &[
        ("x-request-id", b"req-9"),
        ("x-correlation-id", b"order-17"),
        ("X-REQUEST-ID", b"req-9"),
    ];
    let obs = across(&s, h, 2).await;
    assert_eq!(
        obs,
        ok(&["x-correlation-id: order-17"], "order-17", None, OWN)
    );
    // Valid primary, invalid fallback.
    let h: &[Head] = &[("x-correlation-id", b"order-17"), ("x-request-id", b"")];
    let obs = across(&s, h, 1).await;
    assert_eq!(
        obs,
        ok(&["x-correlation-id: order-17"], "order-17", None, OWN)
    );
    // Valid primary, valid single fallback: both kept.
    let h: &[Head] = &[
        ("x-request-id", b"req-9"),
        ("x-correlation-id", b"order-17"),
    ];
    let obs = across(&s, h, 1).await;
    assert_eq!(
        obs,
        ok(
            &["x-correlation-id: order-17", "x-request-id: req-9"],
            "order-17",
            None,
            OWN
        )
    );
    // No primary, fallback twice: generated, fallback removed.
    let h: &[Head] = &[("x-request-id", b"req-9"), ("x-request-id", b"req-10")];
    let obs = across(&s, h, 1).await;
    assert_eq!(obs, ok(&["x-correlation-id: <generated>"], GEN, None, OWN));
}

// ---------------------------------------------------------------------------------------
// Trace context.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_valid_traceparent_and_tracestate_are_kept_and_ambient() {
    let s = default_server().await;
    let h: &[Head] = &[
        ("x-correlation-id", b"order-17"),
        ("TraceParent", TP),
        ("tracestate", b"congo=t61rcWkgMzE"),
    ];
    let obs = across(&s, h, 1).await;
    let tp = format!("traceparent: {}", std::str::from_utf8(TP).unwrap());
    assert_eq!(
        obs,
        ok(
            &[
                "x-correlation-id: order-17",
                &tp,
                "tracestate: congo=t61rcWkgMzE"
            ],
            "order-17",
            Some((TP_ID, TP_PARENT, 1, Some("congo=t61rcWkgMzE"))),
            OWN
        )
    );
}

#[tokio::test]
async fn a_traceparent_sent_twice_goes_with_its_tracestate() {
    let s = default_server().await;
    for second in [TP, TP2] {
        let h: &[Head] = &[
            ("x-correlation-id", b"order-17"),
            ("traceparent", TP),
            ("tracestate", b"congo=t61rcWkgMzE"),
            ("Traceparent", second),
        ];
        let obs = across(&s, h, 2).await;
        assert_eq!(
            obs,
            ok(&["x-correlation-id: order-17"], "order-17", None, OWN)
        );
    }
}

#[tokio::test]
async fn an_invalid_traceparent_goes_with_its_tracestate() {
    let s = default_server().await;
    for bad in [
        &b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"[..],
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        b"",
    ] {
        let h: &[Head] = &[
            ("x-correlation-id", b"order-17"),
            ("traceparent", bad),
            ("tracestate", b"congo=t61rcWkgMzE"),
        ];
        let obs = across(&s, h, 1).await;
        assert_eq!(
            obs,
            ok(&["x-correlation-id: order-17"], "order-17", None, OWN),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn a_tracestate_without_a_traceparent_is_removed() {
    let s = default_server().await;
    let h: &[Head] = &[
        ("tracestate", b"congo=t61rcWkgMzE"),
        ("x-correlation-id", b"order-17"),
        ("tracestate", b"rojo=00f067aa0ba902b7"),
    ];
    let obs = across(&s, h, 1).await;
    assert_eq!(
        obs,
        ok(&["x-correlation-id: order-17"], "order-17", None, OWN)
    );
}

#[tokio::test]
async fn several_tracestate_fields_are_joined_into_one() {
    let s = default_server().await;
    let h: &[Head] = &[
        ("tracestate", b"congo=t61rcWkgMzE"),
        ("x-correlation-id", b"order-17"),
        ("traceparent", TP),
        ("TRACESTATE", b"rojo=00f067aa0ba902b7"),
    ];
    let obs = across(&s, h, 2).await;
    let tp = format!("traceparent: {}", std::str::from_utf8(TP).unwrap());
    let joined = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    assert_eq!(
        obs,
        ok(
            &[
                "x-correlation-id: order-17",
                &tp,
                &format!("tracestate: {joined}")
            ],
            "order-17",
            Some((TP_ID, TP_PARENT, 1, Some(joined))),
            OWN
        )
    );
}

#[tokio::test]
async fn one_invalid_tracestate_field_drops_the_state_and_keeps_the_parent() {
    let s = default_server().await;
    let tp = format!("traceparent: {}", std::str::from_utf8(TP).unwrap());
    for (a, b) in [
        (&b"congo=t61rcWkgMzE"[..], &b"not a state"[..]),
        (b"Bad=1", b"rojo=00f067aa0ba902b7"),
        (b"congo=1", b"congo=2"), // the same key twice across fields
    ] {
        let h: &[Head] = &[
            ("tracestate", a),
            ("traceparent", TP),
            ("x-correlation-id", b"order-17"),
            ("tracestate", b),
        ];
        let obs = across(&s, h, 2).await;
        assert_eq!(
            obs,
            ok(
                &["x-correlation-id: order-17", &tp],
                "order-17",
                Some((TP_ID, TP_PARENT, 1, None)),
                OWN
            ),
            "{a:?} {b:?}"
        );
    }
    // A single invalid field: the state alone goes.
    let h: &[Head] = &[
        ("traceparent", TP),
        ("x-correlation-id", b"order-17"),
        ("tracestate", b"=x"),
    ];
    let obs = across(&s, h, 1).await;
    assert_eq!(
        obs,
        ok(
            &["x-correlation-id: order-17", &tp],
            "order-17",
            Some((TP_ID, TP_PARENT, 1, None)),
            OWN
        )
    );
}

#[tokio::test]
async fn the_id_from_a_traceparent_when_enabled() {
    let s = server(steadfast::server::http().correlation(|c| c.from_traceparent(true))).await;
    let tp = format!("traceparent: {}", std::str::from_utf8(TP).unwrap());
    // Invalid primary, no fallback, valid traceparent: its trace id.
    let h: &[Head] = &[("x-correlation-id", b"bad id"), ("traceparent", TP)];
    let obs = across(&s, h, 1).await;
    assert_eq!(
        obs,
        ok(
            &[&format!("x-correlation-id: {TP_ID}"), &tp],
            TP_ID,
            Some((TP_ID, TP_PARENT, 1, None)),
            OWN
        )
    );
    // A valid fallback comes before the traceparent.
    let h: &[Head] = &[("traceparent", TP), ("x-request-id", b"req-9")];
    let obs = across(&s, h, 1).await;
    assert_eq!(
        obs,
        ok(
            &["x-correlation-id: req-9", "x-request-id: req-9", &tp],
            "req-9",
            Some((TP_ID, TP_PARENT, 1, None)),
            OWN
        )
    );
    // A traceparent sent twice gives no id and is removed with its tracestate.
    let h: &[Head] = &[
        ("traceparent", TP),
        ("tracestate", b"congo=t61rcWkgMzE"),
        ("traceparent", TP),
    ];
    let obs = across(&s, h, 2).await;
    assert_eq!(obs, ok(&["x-correlation-id: <generated>"], GEN, None, OWN));
}

#[tokio::test]
async fn trace_context_off_leaves_trace_headers_alone() {
    // With trace context off and from_traceparent off, the layer reads no trace header: a
    // repeated traceparent and an orphan tracestate pass through untouched.
    let s = server(steadfast::server::http().correlation(|c| c.trace_context(false))).await;
    let h: &[Head] = &[
        ("traceparent", TP),
        ("x-correlation-id", b"order-17"),
        ("traceparent", TP2),
        ("tracestate", b"not a state"),
    ];
    let obs = across(&s, h, 2).await;
    let tp = format!("traceparent: {}", std::str::from_utf8(TP).unwrap());
    let tp2 = format!("traceparent: {}", std::str::from_utf8(TP2).unwrap());
    assert_eq!(
        obs,
        ok(
            &[
                "x-correlation-id: order-17",
                &tp,
                &tp2,
                "tracestate: not a state"
            ],
            "order-17",
            None,
            OWN
        )
    );
}

#[tokio::test]
async fn a_custom_header_without_fallback() {
    let s = server(steadfast::server::http().correlation(|c| {
        c.header(HeaderName::from_static("x-trace-key"))
            .fallback(None)
    }))
    .await;
    // x-request-id is no longer read (nor cleaned); x-correlation-id is a plain header.
    let h: &[Head] = &[
        ("x-request-id", b"req-9"),
        ("X-Trace-Key", b"key-1"),
        ("x-request-id", b"bad id"),
        ("x-correlation-id", b"other"),
    ];
    let (obs, _) = send(&s, h, 0, 0).await;
    assert_eq!(obs.status, 200);
    let mut last = None;
    for pads in [10, 11, 12, 13, 86] {
        let (obs, c) = send(&s, h, pads, 2).await;
        let seen = obs.seen.unwrap();
        assert_eq!(c.edge, pads + 5);
        assert_eq!(seen.current.as_deref(), Some("key-1"));
        assert_eq!(
            seen.fields,
            [
                "x-correlation-id: other",
                "x-request-id: req-9",
                "x-request-id: bad id"
            ]
        );
        assert!(obs.echo.is_empty(), "the echo is on x-trace-key");
        if let Some(l) = &last {
            assert_eq!(l, &seen);
        }
        last = Some(seen);
    }
}

// ---------------------------------------------------------------------------------------
// Deadline.
// ---------------------------------------------------------------------------------------

/// A deadline scenario: the given headers with a valid id first (so the correlation layer
/// changes nothing and both layers count the same names).
fn with_id<'a>(h: &[Head<'a>]) -> Vec<Head<'a>> {
    let mut v = vec![("x-correlation-id", &b"order-17"[..])];
    v.extend_from_slice(h);
    v
}

/// The handler's fields for these deadline headers (sent lower-case in `fields`).
fn dl(fields: &[&str]) -> Vec<String> {
    std::iter::once("x-correlation-id: order-17".to_owned())
        .chain(fields.iter().map(|f| f.to_string()))
        .collect()
}

async fn deadline_of(s: &Server, h: &[Head<'_>], pad_at: usize) -> Obs {
    across(s, &with_id(h), pad_at).await
}

fn budget(obs: &Obs) -> u64 {
    assert_eq!(obs.status, 200, "{obs:?}");
    assert_eq!(obs.echo, ["order-17"]);
    let seen = obs.seen.as_ref().unwrap();
    assert!(
        seen.deadline_ext_same,
        "extension and ambient deadline agree"
    );
    seen.deadline.unwrap()
}

fn expired(obs: &Obs) {
    assert_eq!(obs.status, 504, "{obs:?}");
    assert!(obs.seen.is_none(), "the handler must not run");
    assert_eq!(obs.echo, ["order-17"], "the 504 still echoes the id");
}

#[tokio::test]
async fn a_repeated_ms_header_counts_by_its_shortest_valid_value() {
    let s = default_server().await;
    let obs = deadline_of(
        &s,
        &[
            ("x-request-timeout-ms", b"3000000"),
            ("x-request-timeout-ms", b"abc"),
            ("X-Request-Timeout-Ms", b"2000000"),
            ("x-request-timeout-ms", b"-1"),
        ],
        2,
    )
    .await;
    assert_eq!(budget(&obs), 20);
    assert_eq!(
        obs.seen.unwrap().fields,
        dl(&[
            "x-request-timeout-ms: 3000000",
            "x-request-timeout-ms: abc",
            "x-request-timeout-ms: 2000000",
            "x-request-timeout-ms: -1"
        ])
    );
    // A zero among them, split from the others: the deadline has passed.
    let obs = deadline_of(
        &s,
        &[
            ("x-request-timeout-ms", b"3000000"),
            ("x-request-timeout-ms", b"0"),
        ],
        2,
    )
    .await;
    expired(&obs);
    // Only invalid values: the server's own limit.
    let obs = deadline_of(
        &s,
        &[
            ("x-request-timeout-ms", b"12345678901"),
            ("x-request-timeout-ms", b""),
        ],
        2,
    )
    .await;
    assert_eq!(budget(&obs), OWN);
}

#[tokio::test]
async fn a_valid_grpc_timeout_wins_over_the_ms_header() {
    let s = default_server().await;
    // Longer, but valid: it wins.
    let obs = deadline_of(
        &s,
        &[
            ("x-request-timeout-ms", b"1000000"),
            ("grpc-timeout", b"3000S"),
        ],
        2,
    )
    .await;
    assert_eq!(budget(&obs), 30);
    // An ms header of zero does not count beside a valid grpc-timeout.
    let obs = deadline_of(
        &s,
        &[("grpc-timeout", b"1000S"), ("x-request-timeout-ms", b"0")],
        1,
    )
    .await;
    assert_eq!(budget(&obs), 10);
    // A grpc-timeout of zero has passed, whatever the ms header says.
    let obs = deadline_of(
        &s,
        &[
            ("x-request-timeout-ms", b"2000000"),
            ("GRPC-Timeout", b"0S"),
        ],
        2,
    )
    .await;
    expired(&obs);
    // Invalid grpc-timeouts only: the ms header counts.
    let obs = deadline_of(
        &s,
        &[
            ("grpc-timeout", b"5s"),
            ("x-request-timeout-ms", b"2000000"),
            ("grpc-timeout", b"123456789S"),
        ],
        1,
    )
    .await;
    assert_eq!(budget(&obs), 20);
}

#[tokio::test]
async fn a_repeated_grpc_timeout_counts_by_its_shortest_valid_value() {
    let s = default_server().await;
    let obs = deadline_of(
        &s,
        &[
            ("grpc-timeout", b"x"),
            ("grpc-timeout", b"4000S"),
            ("x-request-timeout-ms", b"1000000"),
            ("Grpc-Timeout", b"123456789S"),
            ("grpc-timeout", b"50M"), // 3000 s
        ],
        3,
    )
    .await;
    assert_eq!(budget(&obs), 30);
    let obs = deadline_of(
        &s,
        &[("grpc-timeout", b"4000S"), ("grpc-timeout", b"0m")],
        1,
    )
    .await;
    expired(&obs);
}

#[tokio::test]
async fn a_custom_deadline_header_replaces_the_default_one() {
    let s = server(steadfast::server::http().deadline(|d| {
        d.deadline_header(HeaderName::from_static("x-envoy-expected-rq-timeout-ms"))
    }))
    .await;
    // The default header is not read: its zero does not expire the request.
    let obs = deadline_of(
        &s,
        &[
            ("x-request-timeout-ms", b"0"),
            ("x-envoy-expected-rq-timeout-ms", b"3000000"),
            ("X-Envoy-Expected-Rq-Timeout-Ms", b"2000000"),
        ],
        2,
    )
    .await;
    assert_eq!(budget(&obs), 20);
    let obs = deadline_of(
        &s,
        &[
            ("x-envoy-expected-rq-timeout-ms", b"3000000"),
            ("grpc-timeout", b"1000S"),
        ],
        1,
    )
    .await;
    assert_eq!(budget(&obs), 10);
}

#[tokio::test]
async fn an_untrusted_budget_is_ignored_and_stripped() {
    let s = server(steadfast::server::http().deadline(|d| d.trust_inbound(false))).await;
    let obs = deadline_of(
        &s,
        &[
            ("grpc-timeout", b"0S"),
            ("x-request-timeout-ms", b"0"),
            ("grpc-timeout", b"1S"),
        ],
        2,
    )
    .await;
    assert_eq!(budget(&obs), OWN);
    assert_eq!(obs.seen.unwrap().fields, dl(&[]));
}

#[tokio::test]
async fn names_the_correlation_layer_removes_move_the_deadline_layer_across_the_threshold() {
    // The correlation layer removes a repeated fallback and a repeated traceparent with its
    // tracestate before the deadline layer counts names: 17-19 at the edge are 14-16 there.
    let s = default_server().await;
    let h: &[Head] = &[
        ("x-request-id", b"req-1"),
        ("grpc-timeout", b"4000S"),
        ("traceparent", TP),
        ("x-correlation-id", b"order-17"),
        ("x-request-timeout-ms", b"0"),
        ("tracestate", b"congo=1"),
        ("grpc-timeout", b"3000S"),
        ("x-request-id", b"req-2"),
        ("traceparent", TP2),
    ];
    let obs = across(&s, h, 4).await;
    assert_eq!(
        obs,
        ok(
            &[
                "x-correlation-id: order-17",
                "x-request-timeout-ms: 0",
                "grpc-timeout: 4000S",
                "grpc-timeout: 3000S",
            ],
            "order-17",
            None,
            30
        )
    );
}

#[tokio::test]
async fn everything_at_once_with_ninety_names() {
    // Every kind of trouble in one request, and the sweep up to 90 names.
    let s = default_server().await;
    let h: &[Head] = &[
        ("tracestate", b"congo=t61rcWkgMzE"),
        ("x-correlation-id", b"bad id"),
        ("x-request-timeout-ms", b"3000000"),
        ("traceparent", TP),
        ("x-request-id", b"req-9"),
        ("grpc-timeout", b"nope"),
        ("TraceState", b"rojo=00f067aa0ba902b7"),
        ("x-request-timeout-ms", b"2000000"),
    ];
    let obs = across(&s, h, 4).await;
    let tp = format!("traceparent: {}", std::str::from_utf8(TP).unwrap());
    let joined = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    assert_eq!(
        obs,
        ok(
            &[
                "x-correlation-id: req-9",
                "x-request-id: req-9",
                &tp,
                &format!("tracestate: {joined}"),
                "x-request-timeout-ms: 3000000",
                "x-request-timeout-ms: 2000000",
                "grpc-timeout: nope",
            ],
            "req-9",
            Some((TP_ID, TP_PARENT, 1, Some(joined))),
            20
        )
    );
}

// ---------------------------------------------------------------------------------------
// Retry: the early "done".
// ---------------------------------------------------------------------------------------

fn fast() -> Backoff {
    Backoff::new(Duration::from_millis(1), Duration::from_millis(1)).jitter(Jitter::None)
}

fn req(method: http::Method, server: &FaultServer) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(server.url("/"))
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn a_success_or_a_client_error_is_never_retried_and_the_predicate_not_asked() {
    for code in [200u16, 201, 204, 304, 400, 404, 409] {
        for method in [http::Method::GET, http::Method::POST] {
            let server = FaultServer::start().await;
            server.set_default(Fault::status(code));
            let asked = Arc::new(AtomicUsize::new(0));
            let a = asked.clone();
            let layer = RetryLayer::builder()
                .backoff(fast())
                .predicate(move |_, _: &Class| {
                    a.fetch_add(1, Ordering::SeqCst);
                    Some(true)
                })
                .build()
                .unwrap();
            let svc = layer.layer(support::transport::<Full<Bytes>>());
            let res = svc.oneshot(req(method.clone(), &server)).await.unwrap();
            assert_eq!(res.status(), code);
            assert_eq!(server.hits(), 1, "{method} {code}: sent once");
            assert_eq!(
                asked.load(Ordering::SeqCst),
                0,
                "{method} {code}: not asked"
            );
        }
    }
}

#[tokio::test]
async fn a_503_on_get_is_retried_and_on_post_is_not() {
    let server = FaultServer::start().await;
    server.script([Fault::status(503), Fault::status(503)]);
    let svc = RetryLayer::builder()
        .backoff(fast())
        .build()
        .unwrap()
        .layer(support::transport::<Full<Bytes>>());
    let res = svc.oneshot(req(http::Method::GET, &server)).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = server.received();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].headers["x-retry-attempt"], "3");

    let server = FaultServer::start().await;
    server.set_default(Fault::status(503));
    let svc = RetryLayer::builder()
        .backoff(fast())
        .build()
        .unwrap()
        .layer(support::transport::<Full<Bytes>>());
    let res = svc.oneshot(req(http::Method::POST, &server)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(server.hits(), 1, "a POST is not idempotent");
}

#[tokio::test]
async fn a_429_is_retryable_though_not_a_failure() {
    // "HTTP 429 | no (caller's side) | yes": the early "done" must not catch it.
    let server = FaultServer::start().await;
    server.script([Fault::status(429)]);
    let svc = RetryLayer::builder()
        .backoff(fast())
        .build()
        .unwrap()
        .layer(support::transport::<Full<Bytes>>());
    let res = svc.oneshot(req(http::Method::GET, &server)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(server.hits(), 2);
    // A POST's 429, with a predicate that says retry.
    let server = FaultServer::start().await;
    server.script([Fault::status(429)]);
    let svc = RetryLayer::builder()
        .backoff(fast())
        .predicate(|_, _: &Class| Some(true))
        .build()
        .unwrap()
        .layer(support::transport::<Full<Bytes>>());
    let res = svc.oneshot(req(http::Method::POST, &server)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn a_predicate_that_retries_a_500_is_honoured() {
    // Default rules: a 500 is a failure but not retryable.
    let server = FaultServer::start().await;
    server.script([Fault::status(500)]);
    let svc = RetryLayer::builder()
        .backoff(fast())
        .build()
        .unwrap()
        .layer(support::transport::<Full<Bytes>>());
    let res = svc.oneshot(req(http::Method::GET, &server)).await.unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(server.hits(), 1);
    // The predicate widens it, even for a POST.
    for method in [http::Method::GET, http::Method::POST] {
        let server = FaultServer::start().await;
        server.script([Fault::status(500)]);
        let asked = Arc::new(AtomicUsize::new(0));
        let a = asked.clone();
        let svc = RetryLayer::builder()
            .backoff(fast())
            .predicate(move |_, class: &Class| {
                a.fetch_add(1, Ordering::SeqCst);
                assert!(class.is_failure());
                Some(true)
            })
            .build()
            .unwrap()
            .layer(support::transport::<Full<Bytes>>());
        let res = svc.oneshot(req(method.clone(), &server)).await.unwrap();
        assert_eq!(res.status(), 200, "{method}");
        assert_eq!(server.hits(), 2, "{method}");
        assert_eq!(
            asked.load(Ordering::SeqCst),
            1,
            "{method}: asked about the 500 only"
        );
    }
}

#[tokio::test]
async fn the_client_stack_never_repeats_a_404_or_a_200() {
    for code in [200u16, 404] {
        let server = FaultServer::start().await;
        server.set_default(Fault::status(code));
        let client = steadfast::client::http()
            .build()
            .unwrap()
            .hyper_client::<Full<Bytes>>();
        let res = client
            .oneshot(req(http::Method::GET, &server))
            .await
            .unwrap();
        assert_eq!(res.status(), code);
        assert_eq!(server.hits(), 1, "{code}");
    }
}
