//! Spans through real loopback sockets: one span per attempt under the caller's span, with
//! OpenTelemetry's attribute names.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use steadfast_testkit::{Fault, FaultServer};
use tower::{Layer, ServiceExt};
use tracing::Instrument;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A span as the subscriber saw it: its name, its parent's name, and its fields (as recorded
/// when it was made and later).
#[derive(Clone, Debug, Default)]
struct Seen {
    name: String,
    parent: Option<String>,
    fields: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(tracing::span::Id, Seen)>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").replace('"', ""),
        );
    }
}

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut seen = Seen {
            name: attrs.metadata().name().to_owned(),
            parent: ctx
                .span(id)
                .and_then(|s| s.parent())
                .map(|p| p.name().to_owned()),
            ..Seen::default()
        };
        attrs.record(&mut Fields(&mut seen.fields));
        self.0.lock().unwrap().push((id.clone(), seen));
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: Context<'_, S>,
    ) {
        let mut all = self.0.lock().unwrap();
        if let Some((_, seen)) = all.iter_mut().find(|(i, _)| i == id) {
            values.record(&mut Fields(&mut seen.fields));
        }
    }
}

impl Capture {
    fn named(&self, name: &str) -> Vec<Seen> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.name == name)
            .map(|(_, s)| s.clone())
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn each_attempt_is_a_span_under_the_callers_span_with_otel_attribute_names() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let upstream = FaultServer::start().await;
    upstream.script([Fault::status(503), Fault::status(502)]);
    let client = steadfast::client::http()
        .build()
        .unwrap()
        .layer(support::transport::<Full<Bytes>>());
    let req = http::Request::get(upstream.url("/orders/7"))
        .body(Full::default())
        .unwrap();
    let res = client
        .oneshot(req)
        .instrument(tracing::info_span!("checkout"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let attempts = capture.named("attempt");
    assert_eq!(attempts.len(), 3, "{attempts:#?}");
    let port = upstream.addr().port().to_string();
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a.parent.as_deref(), Some("checkout"), "{a:#?}");
        let f = &a.fields;
        assert_eq!(f["http.request.method"], "GET");
        assert_eq!(f["otel.name"], "GET");
        assert_eq!(f["otel.kind"], "client");
        assert_eq!(f["server.address"], "127.0.0.1");
        assert_eq!(f["server.port"], port);
        assert!(f["url.full"].ends_with("/orders/7"), "{f:?}");
        // Set on resends only.
        assert_eq!(
            f.get("http.request.resend_count").map(String::as_str),
            [None, Some("1"), Some("2")][i],
            "{f:?}"
        );
    }
    let statuses: Vec<_> = attempts
        .iter()
        .map(|a| a.fields["http.response.status_code"].as_str())
        .collect();
    assert_eq!(statuses, ["503", "502", "200"]);
    let errors: Vec<_> = attempts
        .iter()
        .map(|a| a.fields.get("error.type").map(String::as_str))
        .collect();
    assert_eq!(errors, [Some("503"), Some("502"), None]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_connection_names_its_error_type() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    // A port nothing listens on: bind one, note it, close it.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let client = steadfast::client::http()
        .build()
        .unwrap()
        .layer(support::transport::<Full<Bytes>>());
    let req = http::Request::get(format!("http://{addr}/"))
        .body(Full::default())
        .unwrap();
    client.oneshot(req).await.unwrap_err();
    let attempts = capture.named("attempt");
    assert!(!attempts.is_empty());
    assert_eq!(
        attempts[0].fields.get("error.type").map(String::as_str),
        Some("connect"),
        "{attempts:#?}"
    );
}

/// `steadfast::spawn` carries the request's whole context into the task: its span (so log
/// lines and attempt spans stay under it), correlation id, trace context and deadline.
#[tokio::test(start_paused = true)]
async fn spawned_work_keeps_the_span_the_id_the_trace_and_the_deadline() {
    use steadfast::common::Deadline;
    use steadfast::correlation::{CorrelationId, TraceContext};

    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let trace =
        TraceContext::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    let deadline = Deadline::after(std::time::Duration::from_secs(3));
    let id = CorrelationId::parse("order-7").unwrap();
    let request = async {
        steadfast::spawn(async {
            tracing::info_span!("inside").in_scope(|| ());
            (
                CorrelationId::current().map(|id| id.to_string()),
                TraceContext::current().map(|t| t.trace_id()),
                Deadline::current(),
            )
        })
        .await
        .unwrap()
    };
    let seen = deadline
        .scope(id.scope(trace.scope(request)))
        .instrument(tracing::info_span!("request"))
        .await;
    assert_eq!(
        seen,
        (
            Some("order-7".to_owned()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned()),
            Some(deadline)
        )
    );
    let inside = capture.named("inside");
    assert_eq!(inside[0].parent.as_deref(), Some("request"));
}
