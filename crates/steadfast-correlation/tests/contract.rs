//! Layer contracts: precedence, validation, echo, extension, span, spawn.

use std::sync::{Arc, Mutex};

use http::{HeaderValue, Request, Response};
use steadfast_correlation::{
    CorrelationId, MakeCorrelationId, PropagateCorrelationIdLayer, SetCorrelationIdLayer, UuidV7,
    is_valid_default,
};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

type Seen = Arc<Mutex<Vec<(Option<String>, Option<String>, Option<String>)>>>;

/// A server stack whose handler records (header, extension, ambient) ids.
fn server(
    layer: SetCorrelationIdLayer<
        impl MakeCorrelationId + Clone,
        impl steadfast_correlation::ValidateId + Clone,
    >,
) -> (
    impl Service<
        Request<()>,
        Response = Response<
            steadfast_correlation::CorrelatedBody<http_body_util::Empty<bytes::Bytes>>,
        >,
        Error = std::convert::Infallible,
    > + Clone,
    Seen,
) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |req: Request<()>| {
            let s = s.clone();
            async move {
                let header = req
                    .headers()
                    .get("x-correlation-id")
                    .map(|v| v.to_str().unwrap().to_owned());
                let ext = req
                    .extensions()
                    .get::<CorrelationId>()
                    .map(|i| i.to_string());
                let ambient = CorrelationId::current().map(|i| i.to_string());
                s.lock().unwrap().push((header, ext, ambient));
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                    bytes::Bytes,
                >::new()))
            }
        }));
    (svc, seen)
}

fn req_with(headers: &[(&'static str, &[u8])]) -> Request<()> {
    let mut req = Request::new(());
    for (k, v) in headers {
        req.headers_mut()
            .append(*k, HeaderValue::from_bytes(v).unwrap());
    }
    req
}

#[tokio::test]
async fn precedence_header_then_request_id_then_traceparent_then_generated() {
    let tp: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    type Case = (Vec<(&'static str, &'static [u8])>, Option<&'static str>);
    let cases: Vec<Case> = vec![
        (
            vec![
                ("x-correlation-id", b"main"),
                ("x-request-id", b"fallback"),
                ("traceparent", tp),
            ],
            Some("main"),
        ),
        (
            vec![
                ("x-correlation-id", b"bad id"),
                ("x-request-id", b"fallback"),
            ],
            Some("fallback"),
        ),
        (
            vec![("x-request-id", b"fallback"), ("traceparent", tp)],
            Some("fallback"),
        ),
        (
            vec![("traceparent", tp)],
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        ),
        (
            vec![
                ("x-correlation-id", b"\xff\xfe"),
                ("traceparent", b"garbage"),
            ],
            None,
        ),
        (vec![], None),
    ];
    for (headers, expected) in cases {
        let (svc, seen) = server(
            SetCorrelationIdLayer::builder()
                .from_traceparent(true)
                .build()
                .unwrap(),
        );
        let res = svc.oneshot(req_with(&headers)).await.unwrap();
        let echoed = res.headers()["x-correlation-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let (header, ext, ambient) = seen.lock().unwrap()[0].clone();
        match expected {
            Some(id) => assert_eq!(echoed, id),
            None => {
                assert_eq!(echoed.len(), 36, "generated UUIDv7");
                assert!(is_valid_default(echoed.as_bytes()));
            }
        }
        assert_eq!(
            header.as_deref(),
            Some(echoed.as_str()),
            "handler reads the id that counts"
        );
        assert_eq!(ext.as_deref(), Some(echoed.as_str()));
        assert_eq!(ambient.as_deref(), Some(echoed.as_str()));
    }
}

#[tokio::test]
async fn traceparent_is_off_by_default() {
    let (svc, _) = server(SetCorrelationIdLayer::new());
    let res = svc
        .oneshot(req_with(&[(
            "traceparent",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]))
        .await
        .unwrap();
    assert_ne!(
        res.headers()["x-correlation-id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
}

#[tokio::test]
async fn hostile_ids_are_replaced_and_never_echoed() {
    let hostile: Vec<Vec<u8>> = vec![
        vec![b'a'; 129],
        b"".to_vec(),
        b"a b".to_vec(),
        b"\"q\"".to_vec(),
        b"\x80\xff".to_vec(),
        b"x%0D%0Ainjected: 1".to_vec(),
        b"a\tb".to_vec(),
        b"<script>alert(1)</script>".to_vec(),
    ];
    for raw in hostile {
        let (svc, seen) = server(
            SetCorrelationIdLayer::builder()
                .fallback(None)
                .build()
                .unwrap(),
        );
        let res = svc
            .oneshot(req_with(&[("x-correlation-id", &raw)]))
            .await
            .unwrap();
        let echoed = res.headers()["x-correlation-id"].as_bytes().to_vec();
        assert_ne!(echoed, raw);
        assert_eq!(echoed.len(), 36);
        assert_eq!(
            seen.lock().unwrap()[0].2.as_deref().map(str::as_bytes),
            Some(&echoed[..])
        );
    }
}

#[tokio::test]
async fn custom_rule_and_header_name() {
    let layer = SetCorrelationIdLayer::builder()
        .header(http::HeaderName::from_static("x-trace"))
        .validate(|id: &[u8]| id.starts_with(b"ok-"))
        .make_id(|| CorrelationId::parse("made").unwrap())
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(
                http_body_util::Empty::<bytes::Bytes>::new(),
            ))
        }));
    let res = svc
        .clone()
        .oneshot(req_with(&[("x-trace", b"ok-1")]))
        .await
        .unwrap();
    assert_eq!(res.headers()["x-trace"], "ok-1");
    let res = svc
        .clone()
        .oneshot(req_with(&[("x-trace", b"nope")]))
        .await
        .unwrap();
    assert_eq!(res.headers()["x-trace"], "made");
    // A rule that would admit non-visible bytes is still held to visible ASCII.
    let lax = SetCorrelationIdLayer::builder()
        .validate(|_: &[u8]| true)
        .fallback(None)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(lax)
        .service(service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(
                http_body_util::Empty::<bytes::Bytes>::new(),
            ))
        }));
    let res = svc
        .oneshot(req_with(&[("x-correlation-id", b"a b")]))
        .await
        .unwrap();
    assert_ne!(res.headers()["x-correlation-id"], "a b");
}

#[tokio::test]
async fn echo_and_extension_can_be_switched_off() {
    let (svc, seen) = server(
        SetCorrelationIdLayer::builder()
            .echo(false)
            .extension(false)
            .build()
            .unwrap(),
    );
    let res = svc
        .oneshot(req_with(&[("x-correlation-id", b"abc")]))
        .await
        .unwrap();
    assert!(res.headers().get("x-correlation-id").is_none());
    let (_, ext, ambient) = seen.lock().unwrap()[0].clone();
    assert_eq!(ext, None);
    assert_eq!(ambient.as_deref(), Some("abc"));
}

/// A client that reports the header it would send.
fn client<M: MakeCorrelationId + Clone>(
    layer: PropagateCorrelationIdLayer<M>,
) -> impl Service<Request<()>, Response = Option<String>, Error = std::convert::Infallible> + Clone
{
    ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|req: Request<()>| async move {
            Ok::<_, std::convert::Infallible>(
                req.headers()
                    .get("x-correlation-id")
                    .map(|v| v.to_str().unwrap().to_owned()),
            )
        }))
}

#[tokio::test]
async fn client_precedence_extension_header_ambient_generated() {
    let ambient = CorrelationId::parse("ambient").unwrap();
    let c = client(
        PropagateCorrelationIdLayer::builder()
            .make_id(|| CorrelationId::parse("fresh").unwrap())
            .build()
            .unwrap(),
    );

    let mut req = req_with(&[("x-correlation-id", b"set-by-caller")]);
    req.extensions_mut()
        .insert(CorrelationId::parse("ext").unwrap());
    let sent = ambient.clone().scope(c.clone().oneshot(req)).await.unwrap();
    assert_eq!(sent.as_deref(), Some("ext"));

    let req = req_with(&[("x-correlation-id", b"set-by-caller")]);
    let sent = ambient.clone().scope(c.clone().oneshot(req)).await.unwrap();
    assert_eq!(sent.as_deref(), Some("set-by-caller"));

    let req = req_with(&[("x-correlation-id", b"bad value")]);
    let sent = ambient.clone().scope(c.clone().oneshot(req)).await.unwrap();
    assert_eq!(sent.as_deref(), Some("ambient"));

    let sent = c.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(sent.as_deref(), Some("fresh"));

    let quiet = client(
        PropagateCorrelationIdLayer::builder()
            .generate(false)
            .build()
            .unwrap(),
    );
    let sent = quiet.clone().oneshot(Request::new(())).await.unwrap();
    assert_eq!(sent, None);
    let sent = quiet
        .oneshot(req_with(&[("x-correlation-id", b"bad value")]))
        .await
        .unwrap();
    assert_eq!(sent, None, "garbage is not forwarded");
}

#[tokio::test]
async fn span_carries_the_id() {
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::Registry;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<(String, String)>>>);
    struct Visitor<'a>(&'a mut Option<String>);
    impl tracing::field::Visit for Visitor<'_> {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "correlation_id" {
                *self.0 = Some(format!("{value:?}"));
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
            let mut v = None;
            attrs.record(&mut Visitor(&mut v));
            if let Some(v) = v {
                self.0
                    .lock()
                    .unwrap()
                    .push((attrs.metadata().name().to_owned(), v));
            }
        }
    }
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(Registry::default().with(capture.clone()));
    let (svc, _) = server(SetCorrelationIdLayer::new());
    svc.oneshot(req_with(&[("x-correlation-id", b"span-me")]))
        .await
        .unwrap();
    assert_eq!(
        *capture.0.lock().unwrap(),
        vec![("correlation".to_owned(), "span-me".to_owned())]
    );
}

#[test]
fn a_cancelled_handler_logs_inside_the_request_span() {
    use std::future::Future;
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::{LookupSpan, Registry};

    /// For every event, the name of the span it happened in.
    #[derive(Clone, Default)]
    struct SpanOfEvents(Arc<Mutex<Vec<Option<String>>>>);
    impl<S> tracing_subscriber::Layer<S> for SpanOfEvents
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        fn on_event(&self, _: &tracing::Event<'_>, ctx: Context<'_, S>) {
            let span = ctx.lookup_current().map(|s| s.name().to_owned());
            self.0.lock().unwrap().push(span);
        }
    }
    struct LogOnDrop;
    impl Drop for LogOnDrop {
        fn drop(&mut self) {
            tracing::info!("handler cancelled");
        }
    }

    let seen = SpanOfEvents::default();
    let _guard = tracing::subscriber::set_default(Registry::default().with(seen.clone()));
    let svc = tower::Layer::layer(
        &SetCorrelationIdLayer::new(),
        service_fn(|_: Request<()>| async {
            let _log = LogOnDrop;
            std::future::pending::<
                Result<Response<http_body_util::Empty<bytes::Bytes>>, std::convert::Infallible>,
            >()
            .await
        }),
    );
    let mut fut = Box::pin(svc.oneshot(req_with(&[("x-correlation-id", b"gone")])));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    drop(fut); // the client went away
    assert_eq!(
        *seen.0.lock().unwrap(),
        vec![Some("correlation".to_owned())]
    );
}

#[tokio::test]
async fn generated_ids_are_time_ordered_uuid_v7() {
    let g = UuidV7::seeded(1);
    let a = g.make_id();
    let b = g.make_id();
    assert_ne!(a, b);
    assert!(a.as_str()[..13] <= b.as_str()[..13]);
}

#[test]
fn services_are_send_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    let (svc, _) = server(SetCorrelationIdLayer::new());
    send_sync(&svc);
    send_sync(&client(PropagateCorrelationIdLayer::new()));
}

/// A header the protocol or the trace owns (`traceparent`, `content-length`, `grpc-*`, ...)
/// cannot be the id's header or fallback: writing an id there would corrupt the message or the
/// trace (a hostile pass found a layer whose header was `traceparent` removing its own id).
#[test]
fn a_header_the_protocol_owns_is_refused_when_built() {
    use steadfast_correlation::error::InvalidCorrelationConfig;
    for name in [
        "traceparent",
        "content-length",
        "host",
        "grpc-timeout",
        "connection",
    ] {
        let h = http::HeaderName::from_static(name);
        let err = SetCorrelationIdLayer::builder()
            .header(h.clone())
            .build()
            .unwrap_err();
        assert_eq!(err, InvalidCorrelationConfig::ReservedHeader(h.clone()));
        assert!(
            err.to_string().contains("choose a header of your own"),
            "{err}"
        );
        let err = SetCorrelationIdLayer::builder()
            .fallback(Some(h.clone()))
            .build()
            .unwrap_err();
        assert_eq!(err, InvalidCorrelationConfig::ReservedHeader(h.clone()));
        let err = PropagateCorrelationIdLayer::builder()
            .header(h.clone())
            .build()
            .unwrap_err();
        assert_eq!(err, InvalidCorrelationConfig::ReservedHeader(h));
    }
    let same = SetCorrelationIdLayer::builder()
        .fallback(Some(http::HeaderName::from_static("x-correlation-id")))
        .build()
        .unwrap_err();
    assert!(
        matches!(same, InvalidCorrelationConfig::FallbackIsHeader(_)),
        "{same}"
    );
}

/// The response carries the id as an extension (outer layers read it without the header),
/// generated or accepted, even when echo is off; and it can be switched off.
#[tokio::test]
async fn the_response_carries_the_id_as_an_extension() {
    let handler = service_fn(|_req: Request<()>| async {
        Ok::<_, std::convert::Infallible>(Response::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        ))
    });
    let svc = ServiceBuilder::new()
        .layer(
            SetCorrelationIdLayer::builder()
                .echo(false)
                .build()
                .unwrap(),
        )
        .service(handler);
    let req = Request::builder()
        .header("x-correlation-id", "abc-1")
        .body(())
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(
        res.extensions()
            .get::<CorrelationId>()
            .map(CorrelationId::as_str),
        Some("abc-1")
    );
    assert!(!res.headers().contains_key("x-correlation-id"), "echo off");
    let generated = svc.oneshot(Request::new(())).await.unwrap();
    let id = generated.extensions().get::<CorrelationId>().unwrap();
    assert_eq!(id.as_str().len(), 36, "a generated UUIDv7");

    let off = ServiceBuilder::new()
        .layer(
            SetCorrelationIdLayer::builder()
                .response_extension(false)
                .build()
                .unwrap(),
        )
        .service(handler);
    let res = off.oneshot(Request::new(())).await.unwrap();
    assert!(res.extensions().get::<CorrelationId>().is_none());
    assert!(
        res.headers().contains_key("x-correlation-id"),
        "echo still on"
    );

    // The defaults: echoed, so no extension (it would cost allocations for what the header
    // already says); asked for, both.
    let default = ServiceBuilder::new()
        .layer(SetCorrelationIdLayer::new())
        .service(handler);
    let res = default.oneshot(Request::new(())).await.unwrap();
    assert!(res.headers().contains_key("x-correlation-id"));
    assert!(res.extensions().get::<CorrelationId>().is_none());
    let both = ServiceBuilder::new()
        .layer(
            SetCorrelationIdLayer::builder()
                .response_extension(true)
                .build()
                .unwrap(),
        )
        .service(handler);
    let res = both.oneshot(Request::new(())).await.unwrap();
    let header = res.headers()["x-correlation-id"].to_str().unwrap();
    assert_eq!(
        res.extensions().get::<CorrelationId>().unwrap().as_str(),
        header
    );
}

#[test]
fn ids_the_application_makes_are_checked_like_inbound_ones() {
    let id = CorrelationId::from_uuid_bytes([0xab; 16]);
    assert_eq!(id.as_str(), "abababab-abab-abab-abab-abababababab");
    assert_eq!(
        CorrelationId::try_from("order-7").unwrap().as_str(),
        "order-7"
    );
    for bad in ["", "has space", "new\nline", "é"] {
        let err = CorrelationId::try_from(bad).unwrap_err();
        assert!(!err.to_string().contains(bad) || bad.is_empty(), "{err}");
    }
    assert!(CorrelationId::try_from("x".repeat(128)).is_ok());
    assert!(CorrelationId::try_from("x".repeat(129)).is_err());
}

/// A header sent twice is not an id the caller set on purpose: every copy is replaced by the
/// one id that applies (or removed when there is none), never forwarded beside it.
#[tokio::test]
async fn client_replaces_a_repeated_header_with_one_id() {
    let all = |layer: PropagateCorrelationIdLayer| {
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|req: Request<()>| async move {
                Ok::<_, std::convert::Infallible>(
                    req.headers()
                        .get_all("x-correlation-id")
                        .iter()
                        .map(|v| v.to_str().unwrap().to_owned())
                        .collect::<Vec<_>>(),
                )
            }))
    };
    let twice = || req_with(&[("x-correlation-id", b"one"), ("x-correlation-id", b"two")]);
    let ambient = CorrelationId::parse("ambient").unwrap();
    let sent = ambient
        .scope(all(PropagateCorrelationIdLayer::new()).oneshot(twice()))
        .await
        .unwrap();
    assert_eq!(sent, ["ambient"]);
    let quiet = PropagateCorrelationIdLayer::builder()
        .generate(false)
        .build()
        .unwrap();
    let sent = all(quiet).oneshot(twice()).await.unwrap();
    assert!(sent.is_empty(), "{sent:?}");
}

/// What a response body saw while each of its frames was produced: the ambient id, the
/// trace id of the ambient trace context, and the name of the current span.
type FrameSeen = Arc<Mutex<Vec<(Option<String>, Option<String>, Option<&'static str>)>>>;

struct FrameProbe {
    seen: FrameSeen,
    left: u32,
}

impl http_body::Body for FrameProbe {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.seen.lock().unwrap().push((
            CorrelationId::current().map(|i| i.to_string()),
            steadfast_correlation::TraceContext::current().map(|t| t.trace_id()),
            tracing::Span::current().metadata().map(|m| m.name()),
        ));
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
            b"x",
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(u64::from(self.left))
    }
}

/// The request's id, trace context and span are ambient while the response body's frames
/// are produced, after the handler returned (a streamed body that makes calls or logs);
/// size hints and end of stream pass through.
#[tokio::test]
async fn the_response_body_is_produced_in_the_requests_scope() {
    use http_body::Body as _;
    use http_body_util::BodyExt;

    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry());
    let seen: FrameSeen = Arc::default();
    let s = seen.clone();
    let svc =
        ServiceBuilder::new()
            .layer(SetCorrelationIdLayer::new())
            .service(service_fn(move |_req: Request<()>| {
                let seen = s.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(Response::new(FrameProbe { seen, left: 2 }))
                }
            }));
    let tp: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let res = svc
        .oneshot(req_with(&[
            ("x-correlation-id", b"body-id"),
            ("traceparent", tp),
        ]))
        .await
        .unwrap();
    let body = res.into_body();
    assert_eq!(body.size_hint().exact(), Some(2));
    assert!(!body.is_end_stream());
    // Read on another task, as a server's connection task reads it.
    let bytes = tokio::spawn(async move { body.collect().await.unwrap().to_bytes() })
        .await
        .unwrap();
    assert_eq!(&bytes[..], b"xx");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for frame in seen {
        assert_eq!(
            frame,
            (
                Some("body-id".to_owned()),
                Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned()),
                Some("correlation")
            )
        );
    }
    assert_eq!(CorrelationId::current(), None, "nothing leaks out");
}
