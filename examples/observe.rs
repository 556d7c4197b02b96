//! Run: `cargo run --example observe --features metrics`
//!
//! What the layers tell you about one upstream: a client stack named `checkout` calls a
//! payments server on 127.0.0.1 that answers 503, until its breaker opens. The example
//! subscribes to every breaker of the stack before the first call, prints the `tracing`
//! events and the spans of each attempt as they happen, the transition the subscription
//! hears, and the Prometheus lines of the `checkout` stack's metrics.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Full;
use tower::ServiceExt;
use tracing::Instrument;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    print!("{}", observe().await);
}

/// Runs the scenario and returns what it printed.
async fn observe() -> String {
    let out = Printer::default();
    let _subscriber =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(out.clone()));
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder");
    steadfast::describe_metrics();

    // The upstream: a payments service that is down.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let payments = listener.local_addr().expect("address");
    let app = Router::new().route("/charge", get(|| async { StatusCode::SERVICE_UNAVAILABLE }));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let stack = steadfast::client::http()
        .name("checkout")
        .retry(|r| r.max_attempts(2))
        .breaker(|b| b.consecutive_failures(Some(4)))
        .build()
        .expect("a valid stack");
    // Watch every breaker of the stack, those made later included, before any call.
    let mut transitions = stack.breakers().subscribe_all();
    let handle = stack
        .breakers()
        .handle_for_uri(&format!("http://{payments}/").parse().expect("uri"));
    out.line(format!(
        "breaker {} → {}: {:?} before the first call",
        handle.name(),
        handle.upstream(),
        handle.state()
    ));

    let client = stack.hyper_client::<Full<Bytes>>();
    for call in 1..=3 {
        let req = http::Request::get(format!("http://{payments}/charge"))
            .body(Full::default())
            .expect("request");
        let outcome = client
            .clone()
            .oneshot(req)
            .instrument(tracing::info_span!("checkout_call", call))
            .await;
        out.line(match outcome {
            Ok(res) => format!("call {call}: answered {}", res.status()),
            Err(e) => format!(
                "call {call}: failed fast: {e} (answered upstream as {})",
                steadfast::errors::http_response::<Full<Bytes>>(&*e).status()
            ),
        });
    }
    while let Some((key, t)) = transitions.try_recv() {
        out.line(format!(
            "subscribe_all: {key:?} ({} → {}) {:?} → {:?}, open for {:?}",
            t.breaker, t.upstream, t.from, t.to, t.open_for
        ));
    }
    out.line(format!("breaker state now: {:?}", handle.state()));
    out.line("metrics of the checkout stack (Prometheus text):".to_owned());
    for line in metrics.render().lines() {
        if line.contains("checkout") || line.starts_with("# HELP steadfast_breaker") {
            out.line(format!("  {line}"));
        }
    }
    out.text()
}

/// Prints events and spans as one line each: what a log pipeline would receive.
#[derive(Clone, Default)]
struct Printer(Arc<Mutex<String>>);

impl Printer {
    fn line(&self, line: String) {
        let mut text = self.0.lock().expect("printer");
        text.push_str(&line);
        text.push('\n');
    }

    fn text(&self) -> String {
        self.0.lock().expect("printer").clone()
    }
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl<S> tracing_subscriber::Layer<S> for Printer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        if !event.metadata().target().starts_with("steadfast") {
            return;
        }
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let scope: Vec<String> = ctx
            .event_scope(event)
            .map(|s| s.from_root().map(|span| span.name().to_owned()).collect())
            .unwrap_or_default();
        self.line(format!(
            "event {} [{}]{}",
            event.metadata().target(),
            scope.join(" > "),
            fields.0
        ));
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        if span.name() != "attempt" {
            return;
        }
        let fields = span
            .extensions()
            .get::<Fields>()
            .map(|f| f.0.clone())
            .unwrap_or_default();
        let parent = span.parent().map(|p| p.name()).unwrap_or("-");
        self.line(format!("span attempt (under {parent}){fields}"));
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Fields(String::new());
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(fields);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The example's output holds everything it promises, checked on every CI run.
    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_for_one_named_upstream_and_says_so_everywhere() {
        let text = super::observe().await;
        println!("{text}");
        assert!(
            text.contains("breaker checkout → 127.0.0.1:"),
            "named before the first call"
        );
        assert!(text.contains("Closed before the first call"));
        assert!(text.contains("span attempt (under checkout_call)"));
        assert!(text.contains("http.response.status_code=503"));
        assert!(text.contains("http.request.resend_count=1"));
        assert!(text.contains("event steadfast::breaker"));
        assert!(text.contains("failed fast"));
        assert!(text.contains("answered upstream as 503 Service Unavailable"));
        assert!(text.contains("subscribe_all: Some(127.0.0.1:"));
        assert!(text.contains("Closed → Open"));
        assert!(text.contains("breaker state now: Open"));
        assert!(text.contains("steadfast_breaker_rejected_total{breaker=\"checkout\""));
        assert!(text.contains("steadfast_breaker_state{breaker=\"checkout\""));
        assert!(text.contains("# HELP steadfast_breaker_state"));
    }
}
