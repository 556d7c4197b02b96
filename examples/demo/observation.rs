//! What the run observed: a tracing layer reads the layers' own events (no hooks needed).

#[allow(unused_imports)]
use super::*;

/// One caller's calls to one upstream (`gateway → users`).
#[derive(Default)]
pub(crate) struct Upstream {
    pub(crate) requests: u64,
    pub(crate) ok: u64,
    pub(crate) retries: u64,
    /// Attempts an endpoint's breaker refused, sent at once to another endpoint.
    pub(crate) rerouted: u64,
    pub(crate) budget_denials: u64,
    /// When each retry was denied.
    pub(crate) denied_at: Vec<Duration>,
    pub(crate) timeouts: u64,
    pub(crate) rejected: u64,
    /// (time, endpoint, what): the balancer's ejections and returns.
    pub(crate) ejections: Vec<(Duration, String, String)>,
    pub(crate) latencies: Vec<Duration>,
}

#[derive(Default)]
pub(crate) struct Observed {
    /// By `caller → upstream`.
    pub(crate) upstreams: BTreeMap<String, Upstream>,
    /// Each breaker's transitions (time, from, to), by `caller → upstream instance`: a
    /// caller's stack has one breaker per upstream address.
    pub(crate) breakers: BTreeMap<String, Vec<(Duration, String, String)>>,
    /// (time, hop, correlation id, what)
    pub(crate) hops: Vec<(Duration, String, String, String)>,
    /// Instance names by address.
    pub(crate) names: BTreeMap<String, String>,
}

pub(crate) fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

pub(crate) fn observed() -> &'static Mutex<Observed> {
    static OBSERVED: OnceLock<Mutex<Observed>> = OnceLock::new();
    OBSERVED.get_or_init(Default::default)
}

/// Span fields the demo cares about, stored on each span.
#[derive(Default)]
pub(crate) struct Fields {
    pub(crate) upstream: Option<String>,
    pub(crate) caller: Option<String>,
    pub(crate) breaker: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) hop: Option<String>,
    pub(crate) what: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) from: Option<String>,
    pub(crate) to: Option<String>,
    pub(crate) endpoint: Option<String>,
    pub(crate) reason: Option<String>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        let slot = match field.name() {
            "upstream" => &mut self.upstream,
            "caller" => &mut self.caller,
            "breaker" => &mut self.breaker,
            "hop" => &mut self.hop,
            "what" => &mut self.what,
            "from" => &mut self.from,
            "to" => &mut self.to,
            "reason" => &mut self.reason,
            _ => return,
        };
        *slot = Some(value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "correlation_id" => self.correlation_id = Some(format!("{value:?}")),
            "message" => self.name = Some(format!("{value:?}")),
            "endpoint" => self.endpoint = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

pub(crate) struct Observer;

impl<S> tracing_subscriber::Layer<S> for Observer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(f);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let (mut upstream, mut caller, mut correlation) = (None, None, None);
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                if let Some(sf) = span.extensions().get::<Fields>() {
                    upstream = upstream.or_else(|| sf.upstream.clone());
                    caller = caller.or_else(|| sf.caller.clone());
                    correlation = correlation.or_else(|| sf.correlation_id.clone());
                }
            }
        }
        let t = start().elapsed();
        let meta = event.metadata();
        let mut o = observed().lock().unwrap();
        if let Some(hop) = f.hop {
            o.hops.push((
                t,
                hop,
                correlation.unwrap_or_default(),
                f.what.unwrap_or_default(),
            ));
            return;
        }
        if meta.target() == "steadfast::breaker" && f.to.is_some() {
            // The breaker names itself: the stack's name (the caller) and its key (the
            // upstream's address).
            let address = f.upstream.unwrap_or_default();
            let instance = o.names.get(&address).cloned().unwrap_or(address);
            let key = format!("{} → {instance}", f.breaker.unwrap_or_default());
            o.breakers.entry(key).or_default().push((
                t,
                f.from.unwrap_or_default(),
                f.to.unwrap_or_default(),
            ));
            return;
        }
        let key = |up: String| format!("{} → {up}", caller.clone().unwrap_or_default());
        if meta.target() == "steadfast::balance" {
            if let Some(endpoint) = f.endpoint {
                let name = o.names.get(&endpoint).cloned().unwrap_or(endpoint);
                let what = match (meta.name(), f.reason) {
                    ("balance.ejected", Some(reason)) => format!("ejected ({reason})"),
                    ("balance.returned", _) => "returned".to_owned(),
                    _ => return,
                };
                let up = key(upstream.unwrap_or_else(|| "orders".to_owned()));
                o.upstreams
                    .entry(up)
                    .or_default()
                    .ejections
                    .push((t, name, what));
            }
            return;
        }
        let Some(up) = upstream else { return };
        let u = o.upstreams.entry(key(up)).or_default();
        match (meta.target(), meta.name()) {
            (_, "retry.attempt") => u.retries += 1,
            (_, "retry.rerouted") => u.rerouted += 1,
            (_, "retry.budget_exhausted") => {
                u.budget_denials += 1;
                u.denied_at.push(t);
            }
            ("steadfast::timeout", _) if f.name.as_deref() == Some("elapsed") => u.timeouts += 1,
            _ => {}
        }
    }
}

pub(crate) fn record_call(
    caller: &str,
    upstream: &str,
    latency: Duration,
    status: Option<StatusCode>,
    rejected: bool,
) {
    let mut o = observed().lock().unwrap();
    let u = o
        .upstreams
        .entry(format!("{caller} → {upstream}"))
        .or_default();
    u.requests += 1;
    u.latencies.push(latency);
    if status.is_some_and(|s| s.is_success()) {
        u.ok += 1;
    }
    if rejected {
        u.rejected += 1;
    }
}
