use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use steadfast_core::header::FEW_NAMES;
use tower_service::Service;
use tracing::Span;

use crate::generate::MakeCorrelationId;
use crate::id::{CorrelationId, WithCorrelationId};
use crate::layer::SetCorrelationIdLayer;
use crate::traceparent::{TRACEPARENT, TRACESTATE, TraceContext, Traced, trace_id};
use crate::validate::ValidateId;

/// The server-side service; see [`SetCorrelationIdLayer`].
///
/// # Clone
///
/// Clones share only configuration (one `Arc`: hosts clone the service for every request).
#[derive(Clone, Debug)]
pub struct SetCorrelationId<S, M, V> {
    inner: S,
    config: Arc<SetCorrelationIdLayer<M, V>>,
}

impl SetCorrelationId<(), crate::UuidV7, crate::DefaultRule> {
    /// A layer with the defaults.
    pub fn layer() -> SetCorrelationIdLayer {
        SetCorrelationIdLayer::new()
    }
}

impl<S, M, V> SetCorrelationId<S, M, V> {
    /// Wraps `inner`.
    pub fn new(inner: S, config: SetCorrelationIdLayer<M, V>) -> Self {
        Self {
            inner,
            config: Arc::new(config),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// How many fields of a header a request carries.
#[derive(Clone, Copy)]
enum Fields<'a> {
    Absent,
    One(&'a HeaderValue),
    Many,
}

impl<'a> Fields<'a> {
    /// One lookup.
    fn of(headers: &'a HeaderMap, name: &HeaderName) -> Self {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) => Fields::Absent,
            (Some(v), None) => Fields::One(v),
            (Some(_), Some(_)) => Fields::Many,
        }
    }

    fn add(&mut self, value: &'a HeaderValue) {
        *self = match self {
            Fields::Absent => Fields::One(value),
            Fields::One(_) | Fields::Many => Fields::Many,
        };
    }

    /// Absent, or one field that `valid` accepts.
    fn clean(self, valid: impl Fn(&HeaderValue) -> bool) -> bool {
        match self {
            Fields::Absent => true,
            Fields::One(v) => valid(v),
            Fields::Many => false,
        }
    }
}

/// The fields of every header the layer reads.
struct Seen<'a> {
    id: Fields<'a>,
    fallback: Fields<'a>,
    traceparent: Fields<'a>,
    tracestate: Fields<'a>,
}

/// Where the accepted id came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Header,
    Fallback,
    Traceparent,
    Generated,
}

/// What to change in the request's headers, decided from what it carries.
struct Plan {
    id: CorrelationId,
    source: Source,
    remove_fallback: bool,
    /// Remove `traceparent` and `tracestate`.
    remove_trace: bool,
    /// Remove `tracestate` alone.
    remove_state: bool,
    /// Write this `tracestate` (several fields joined into one).
    write_state: Option<HeaderValue>,
    trace: Option<TraceContext>,
}

impl<M: MakeCorrelationId, V: ValidateId> SetCorrelationIdLayer<M, V> {
    fn accept(&self, v: &HeaderValue) -> bool {
        self.validate.accepts(v.as_bytes())
    }

    /// Finds the headers the layer reads (the layer's builder keeps the four names
    /// distinct: the header and its fallback can be neither each other nor trace context).
    fn seen<'a>(&self, headers: &'a HeaderMap) -> Seen<'a> {
        if headers.keys_len() > FEW_NAMES {
            let read = |on: bool, name: &HeaderName| match on {
                true => Fields::of(headers, name),
                false => Fields::Absent,
            };
            return Seen {
                id: Fields::of(headers, &self.header),
                fallback: self
                    .fallback
                    .as_ref()
                    .map_or(Fields::Absent, |f| Fields::of(headers, f)),
                traceparent: read(self.traceparent || self.trace_context, &TRACEPARENT),
                tracestate: read(self.trace_context, &TRACESTATE),
            };
        }
        let mut seen = Seen {
            id: Fields::Absent,
            fallback: Fields::Absent,
            traceparent: Fields::Absent,
            tracestate: Fields::Absent,
        };
        for (name, value) in headers {
            if *name == self.header {
                seen.id.add(value);
            } else if self.fallback.as_ref() == Some(name) {
                seen.fallback.add(value);
            } else if name == TRACEPARENT {
                seen.traceparent.add(value);
            } else if name == TRACESTATE {
                seen.tracestate.add(value);
            }
        }
        seen
    }

    /// The id for this request, where it came from, and what to clean up. A header with
    /// two or more fields is ambiguous and counts as invalid, as a single invalid value
    /// does: a sender cannot slip a payload past validation beside a valid id.
    ///
    /// The cleaning leaves exactly one id header, with the id that counts, and no copy of a
    /// header the layer reads (`x-request-id`, and `traceparent` when enabled) that is
    /// ambiguous or invalid, so a handler that forwards its inbound headers forwards nothing
    /// the layer refused. Trace context: a `traceparent` that is repeated or invalid goes
    /// with its `tracestate`, an invalid `tracestate` alone, and a `tracestate` without a
    /// `traceparent` too (W3C Trace Context §3.3).
    fn plan(&self, headers: &HeaderMap, seen: &Seen<'_>) -> Plan {
        let mut rejected = false;
        let mut found = None;
        match seen.id {
            Fields::One(v) if self.accept(v) => {
                found = Some((CorrelationId::from_validated(v.clone()), Source::Header));
            }
            Fields::Absent => {}
            Fields::One(_) | Fields::Many => rejected = true,
        }
        let fallback_clean = seen.fallback.clean(|v| self.accept(v));
        if found.is_none() {
            match seen.fallback {
                Fields::One(v) if fallback_clean => {
                    found = Some((CorrelationId::from_validated(v.clone()), Source::Fallback));
                }
                Fields::Absent => {}
                Fields::One(_) | Fields::Many => rejected = true,
            }
        }
        let parent_clean = seen.traceparent.clean(|v| trace_id(v.as_bytes()).is_some());
        if found.is_none() && self.traceparent {
            if let Fields::One(v) = seen.traceparent {
                let from_parent = trace_id(v.as_bytes())
                    .and_then(|t| HeaderValue::from_bytes(t).ok())
                    .filter(|v| self.accept(v));
                if let Some(v) = from_parent {
                    found = Some((CorrelationId::from_validated(v), Source::Traceparent));
                }
            }
        }
        let (id, source) = found.unwrap_or_else(|| {
            if rejected {
                // Never the raw value: it may carry log-injection payloads.
                tracing::debug!(target: "steadfast::correlation", "inbound correlation id rejected; generating one");
            }
            (self.make.make_id(), Source::Generated)
        });
        let state_sent = !matches!(seen.tracestate, Fields::Absent);
        let mut plan = Plan {
            id,
            source,
            remove_fallback: !fallback_clean,
            remove_trace: self.traceparent && !parent_clean,
            remove_state: false,
            write_state: None,
            trace: None,
        };
        if self.trace_context && !plan.remove_trace {
            match seen.traceparent {
                Fields::Absent => plan.remove_state = state_sent,
                Fields::Many => plan.remove_trace = true,
                Fields::One(parent) => {
                    match TraceContext::with_state(parent, headers, state_sent) {
                        None => plan.remove_trace = true,
                        Some(trace) => {
                            match (trace.state(), seen.tracestate) {
                                // The one field sent, valid: left as it is.
                                (Some(_), Fields::One(_)) => {}
                                (Some(joined), _) => plan.write_state = Some(joined.clone()),
                                (None, _) => plan.remove_state = state_sent,
                            }
                            plan.trace = Some(trace);
                        }
                    }
                }
            }
        }
        plan
    }

    /// Carries out `plan`'s changes: a lookup only for a header that changes.
    fn apply(&self, headers: &mut HeaderMap, plan: &Plan) {
        if plan.source != Source::Header {
            headers.insert(self.header.clone(), plan.id.header_value().clone());
        }
        if plan.remove_fallback {
            if let Some(name) = &self.fallback {
                headers.remove(name);
            }
        }
        if plan.remove_trace {
            headers.remove(&TRACEPARENT);
            headers.remove(&TRACESTATE);
        } else if plan.remove_state {
            headers.remove(&TRACESTATE);
        } else if let Some(state) = &plan.write_state {
            headers.insert(TRACESTATE, state.clone());
        }
    }
}

impl<S, M, V, ReqBody, ResBody> Service<Request<ReqBody>> for SetCorrelationId<S, M, V>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    M: MakeCorrelationId,
    V: ValidateId,
    ResBody: Body,
{
    type Response = Response<CorrelatedBody<ResBody>>;
    type Error = S::Error;
    type Future = SetCorrelationIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &*self.config;
        let plan = config.plan(req.headers(), &config.seen(req.headers()));
        config.apply(req.headers_mut(), &plan);
        let Plan { id, trace, .. } = plan;
        if config.extension {
            req.extensions_mut().insert(id.clone());
        }
        let span = tracing::info_span!(target: "steadfast::correlation", "correlation", correlation_id = %id);
        let echo = self.config.echo.then(|| self.config.header.clone());
        let response_extension = self.config.response_extension.unwrap_or(!self.config.echo);
        let inner = {
            let _entered = span.enter();
            TraceContext::sync_scope_opt(trace.clone(), || {
                id.clone().sync_scope(|| self.inner.call(req))
            })
        };
        SetCorrelationIdFuture {
            inner: Some(id.scope(Traced::new(trace.clone(), inner))),
            span,
            trace,
            echo,
            response_extension,
        }
    }
}

pin_project! {
    /// The response future of [`SetCorrelationId`].
    pub struct SetCorrelationIdFuture<F> {
        // `None` only while being dropped.
        #[pin]
        inner: Option<WithCorrelationId<Traced<F>>>,
        // Entered around every poll of `inner`, and while it is dropped.
        span: Span,
        // The trace context, for the response body's scope.
        trace: Option<TraceContext>,
        // The header to echo the id on; the id itself comes back out of the scope.
        echo: Option<HeaderName>,
        // Whether the response gets the id as an extension.
        response_extension: bool,
    }

    impl<F> PinnedDrop for SetCorrelationIdFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // What the handler logs while it is cancelled still belongs to the request.
            let mut this = this.project();
            let _entered = this.span.enter();
            this.inner.set(None);
        }
    }
}

impl<F> fmt::Debug for SetCorrelationIdFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetCorrelationIdFuture")
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for SetCorrelationIdFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<CorrelatedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(mut inner) = this.inner.as_mut().as_pin_mut() else {
            unreachable!("a SetCorrelationIdFuture is only empty while dropped");
        };
        let mut res = {
            let _entered = this.span.enter();
            ready!(inner.as_mut().poll(cx))?
        };
        let id = inner.take_id();
        if let Some(id) = &id {
            if let Some(name) = this.echo.take() {
                // A value the handler set on its own response wins.
                if let http::header::Entry::Vacant(slot) = res.headers_mut().entry(name) {
                    slot.insert(id.header_value().clone());
                }
            }
            if *this.response_extension {
                res.extensions_mut().insert(id.clone());
            }
        }
        // The handler is done: the span and the trace context move on to its body.
        let scope = id.map(|id| Scope {
            id,
            trace: this.trace.take(),
            span: std::mem::replace(this.span, Span::none()),
        });
        Poll::Ready(Ok(res.map(|inner| CorrelatedBody::new(inner, scope))))
    }
}

/// What a response body's frames are produced in: the request's id, trace context and span.
struct Scope {
    id: CorrelationId,
    trace: Option<TraceContext>,
    span: Span,
}

pin_project! {
    /// The response body of [`SetCorrelationId`]: the request's id (and its trace context and
    /// `tracing` span) is ambient while each frame is produced, and while the body is dropped
    /// before its end, so work a streamed body does after the handler has returned (a stream
    /// that makes calls, an SSE feed, a drop guard that logs a client's departure) carries the
    /// request's id as the handler's own calls do. The scope, and the span with it, ends with
    /// the body's last frame. Frames, end of stream and size hints pass through unchanged.
    pub struct CorrelatedBody<B> {
        // `None` only while being dropped.
        #[pin]
        inner: Option<B>,
        // Taken once the body has ended: nothing of it runs in the scope after that.
        scope: Option<Scope>,
    }

    impl<B> PinnedDrop for CorrelatedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // A body that ended has run its work (its scope is gone); one dropped part-way
            // (a client gone mid-stream) drops in the scope.
            if let Some(scope) = this.scope.take() {
                let mut inner = this.inner;
                let _entered = scope.span.enter();
                scope.id.sync_scope(|| {
                    TraceContext::sync_scope_opt(scope.trace, || inner.set(None));
                });
            }
        }
    }
}

impl<B: Body> CorrelatedBody<B> {
    fn new(inner: B, scope: Option<Scope>) -> Self {
        // An empty body produces nothing and has nothing to drop in the scope.
        let scope = scope.filter(|_| !inner.is_end_stream());
        Self {
            inner: Some(inner),
            scope,
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for CorrelatedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CorrelatedBody")
            .field("inner", &self.inner)
            .field("id", &self.scope.as_ref().map(|s| &s.id))
            .finish()
    }
}

impl<B: Body> Body for CorrelatedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let Some(mut inner) = this.inner.as_pin_mut() else {
            unreachable!("a CorrelatedBody is only empty while dropped");
        };
        let Some(scope) = this.scope.as_ref() else {
            return inner.poll_frame(cx);
        };
        let frame = {
            let _entered = scope.span.enter();
            scope.id.clone().sync_scope(|| {
                TraceContext::sync_scope_opt(scope.trace.clone(), || inner.as_mut().poll_frame(cx))
            })
        };
        if matches!(frame, Poll::Ready(None)) || inner.is_end_stream() {
            // Ended: nothing of the body runs any more, and the span closes now rather than
            // when the server gets round to dropping the body.
            *this.scope = None;
        }
        frame
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
