//! The server layer finds the headers it reads in one pass over a request with few header
//! names and by lookups past that: both ways must read and clean a request alike, whatever
//! mix of repeated, invalid and missing id and trace headers it carries.

use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use proptest::prelude::*;
use steadfast_correlation::{CorrelationId, SetCorrelationIdLayer, TraceContext};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

const ID: &str = "x-correlation-id";
const FALLBACK: &str = "x-request-id";
const PARENT: &str = "traceparent";
const STATE: &str = "tracestate";

/// Values for each header read: valid ones, invalid ones, and ones only one rule rejects.
fn value(name: &'static str) -> impl Strategy<Value = &'static [u8]> {
    let pool: &'static [&'static [u8]] = match name {
        ID | FALLBACK => &[
            b"order-17",
            b"0191d5b0-7c1e-7d3a-9f00-2b1c3d4e5f60",
            b"bad id",
            b"",
        ],
        PARENT => &[
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"garbage",
        ],
        _ => &[
            b"congo=t61rcWkgMzE",
            b"rojo=00f067aa0ba902b7",
            b"not a state",
            b"",
        ],
    };
    proptest::sample::select(pool)
}

/// Up to three fields of one header.
fn fields(name: &'static str) -> impl Strategy<Value = Vec<(&'static str, &'static [u8])>> {
    proptest::collection::vec(value(name).prop_map(move |v| (name, v)), 0..=3)
}

/// What the handler saw: the headers read (every field, in order), the ambient id, and the
/// ambient trace context.
type Seen = (
    Vec<(String, Vec<u8>)>,
    Option<String>,
    Option<(String, String, Option<Vec<u8>>)>,
);

async fn through(
    layer: SetCorrelationIdLayer<
        impl steadfast_correlation::MakeCorrelationId + Clone + Send + Sync + 'static,
    >,
    headers: &[(&'static str, &'static [u8])],
    padding: usize,
) -> Seen {
    let out: Arc<Mutex<Option<Seen>>> = Arc::default();
    let o = out.clone();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |req: Request<()>| {
            let o = o.clone();
            async move {
                let read: Vec<_> = [ID, FALLBACK, PARENT, STATE]
                    .iter()
                    .flat_map(|n| {
                        req.headers()
                            .get_all(*n)
                            .iter()
                            .map(|v| (n.to_string(), v.as_bytes().to_vec()))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let id = CorrelationId::current().map(|i| i.to_string());
                let trace = TraceContext::current().map(|t| {
                    (
                        t.trace_id(),
                        t.parent_id(),
                        t.state().map(|s| s.as_bytes().to_vec()),
                    )
                });
                *o.lock().unwrap() = Some((read, id, trace));
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                    bytes::Bytes,
                >::new()))
            }
        }));
    let mut map = HeaderMap::new();
    for i in 0..padding {
        let name = HeaderName::from_bytes(format!("x-pad-{i}").as_bytes()).unwrap();
        map.insert(name, HeaderValue::from_static("p"));
    }
    for (k, v) in headers {
        map.append(*k, HeaderValue::from_bytes(v).unwrap());
    }
    let mut req = Request::new(());
    *req.headers_mut() = map;
    svc.ready().await.unwrap().call(req).await.unwrap();
    // A binding: the guard must drop before `out` does.
    let seen = out.lock().unwrap().take();
    seen.expect("the handler ran")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn one_pass_and_lookups_agree(
        id in fields(ID),
        fallback in fields(FALLBACK),
        parent in fields(PARENT),
        state in fields(STATE),
        order in any::<proptest::sample::Index>(),
        from_traceparent in any::<bool>(),
        trace_context in any::<bool>(),
    ) {
        let mut headers: Vec<_> = id.into_iter().chain(fallback).chain(parent).chain(state).collect();
        // Any order of arrival (fields of one header keep theirs: rotation only).
        let at = if headers.is_empty() { 0 } else { order.index(headers.len()) };
        headers.rotate_left(at);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let layer = || {
            SetCorrelationIdLayer::builder()
                .from_traceparent(from_traceparent)
                .trace_context(trace_context)
                .make_id(|| CorrelationId::try_from("generated").unwrap())
                .build()
                .unwrap()
        };
        // Few names: one pass. Twenty more: one lookup per header.
        let few = rt.block_on(through(layer(), &headers, 0));
        let many = rt.block_on(through(layer(), &headers, 20));
        prop_assert_eq!(few, many);
    }
}
