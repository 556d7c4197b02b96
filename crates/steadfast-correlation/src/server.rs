use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use steadfast_core::header::single;
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

/// How many fields of a header a request carries: one lookup says.
enum Fields<'a> {
    Absent,
    One(&'a HeaderValue),
    Many,
}

fn fields<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Fields<'a> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Fields::Absent,
        (Some(v), None) => Fields::One(v),
        (Some(_), Some(_)) => Fields::Many,
    }
}

/// Where the accepted id came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Header,
    Fallback,
    Traceparent,
    Generated,
}

impl<M: MakeCorrelationId, V: ValidateId> SetCorrelationIdLayer<M, V> {
    fn accept(&self, v: &HeaderValue) -> bool {
        self.validate.accepts(v.as_bytes())
    }

    /// The id for this request and where it came from. A header with two or more fields is
    /// ambiguous and counts as invalid, as a single invalid value does: a sender cannot slip
    /// a payload past validation beside a valid id.
    fn pick(&self, headers: &HeaderMap) -> (CorrelationId, Source, Option<bool>) {
        let mut rejected = false;
        match fields(headers, &self.header) {
            Fields::One(v) if self.accept(v) => {
                return (
                    CorrelationId::from_validated(v.clone()),
                    Source::Header,
                    None,
                );
            }
            Fields::Absent => {}
            Fields::One(_) | Fields::Many => rejected = true,
        }
        // What `normalise` needs to know of the fallback header, learnt here with one lookup.
        let mut fallback_clean = None;
        if let Some(name) = &self.fallback {
            match fields(headers, name) {
                Fields::One(v) if self.accept(v) => {
                    let id = CorrelationId::from_validated(v.clone());
                    return (id, Source::Fallback, Some(true));
                }
                Fields::Absent => fallback_clean = Some(true),
                Fields::One(_) | Fields::Many => {
                    rejected = true;
                    fallback_clean = Some(false);
                }
            }
        }
        if self.traceparent {
            if let Some(trace) = single(headers, &TRACEPARENT).and_then(|v| trace_id(v.as_bytes()))
            {
                if let Ok(v) = HeaderValue::from_bytes(trace) {
                    if self.accept(&v) {
                        return (
                            CorrelationId::from_validated(v),
                            Source::Traceparent,
                            fallback_clean,
                        );
                    }
                }
            }
        }
        if rejected {
            // Never the raw value: it may carry log-injection payloads.
            tracing::debug!(target: "steadfast::correlation", "inbound correlation id rejected; generating one");
        }
        (self.make.make_id(), Source::Generated, fallback_clean)
    }

    /// After [`pick`](Self::pick): the request carries exactly one id header, with the id
    /// that counts, and no copy of a header the layer reads (`x-request-id`, and
    /// `traceparent` when enabled) that is ambiguous (two or more fields) or invalid, so a
    /// handler that forwards its inbound headers forwards nothing the layer refused. One
    /// lookup per header read on the common path (a valid id, no fallback sent).
    fn normalise(
        &self,
        headers: &mut HeaderMap,
        id: &CorrelationId,
        source: Source,
        fallback_clean: Option<bool>,
    ) {
        if source != Source::Header {
            headers.insert(self.header.clone(), id.header_value().clone());
        }
        // A header that is also the id's own header holds the id just written: left alone.
        if let Some(name) = self.fallback.as_ref().filter(|n| **n != self.header) {
            let clean =
                fallback_clean.unwrap_or_else(|| self.clean(headers, name, |v| self.accept(v)));
            if !clean {
                headers.remove(name);
            }
        }
        if self.traceparent
            && self.header != TRACEPARENT
            && !self.clean(headers, &TRACEPARENT, |v| trace_id(v.as_bytes()).is_some())
        {
            // Its tracestate belongs to it: refused with it.
            headers.remove(&TRACEPARENT);
            headers.remove(&TRACESTATE);
        }
    }

    /// Whether `name` is absent, or one field that `valid` accepts.
    #[inline]
    fn clean(
        &self,
        headers: &HeaderMap,
        name: &HeaderName,
        valid: impl Fn(&HeaderValue) -> bool,
    ) -> bool {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) => true,
            (Some(v), None) => valid(v),
            (Some(_), Some(_)) => false,
        }
    }
}

impl<S, M, V, ReqBody, ResBody> Service<Request<ReqBody>> for SetCorrelationId<S, M, V>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    M: MakeCorrelationId,
    V: ValidateId,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = SetCorrelationIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let (id, source, fallback_clean) = self.config.pick(req.headers());
        self.config
            .normalise(req.headers_mut(), &id, source, fallback_clean);
        if self.config.extension {
            req.extensions_mut().insert(id.clone());
        }
        let trace = if self.config.trace_context {
            trace_of(req.headers_mut())
        } else {
            None
        };
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
            inner: Some(id.scope(Traced::new(trace, inner))),
            span,
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

/// The request's trace context, and its trace headers cleaned: a `traceparent` that is
/// repeated or invalid goes with its `tracestate`, an invalid `tracestate` alone, and a
/// `tracestate` without a `traceparent` too.
fn trace_of(headers: &mut HeaderMap) -> Option<TraceContext> {
    if !headers.contains_key(TRACEPARENT) {
        // A tracestate without its traceparent means nothing (W3C Trace Context §3.3).
        headers.remove(TRACESTATE);
        return None;
    }
    let Some(trace) = TraceContext::from_headers(headers) else {
        headers.remove(TRACEPARENT);
        headers.remove(TRACESTATE);
        return None;
    };
    match trace.state() {
        Some(state) => {
            headers.insert(TRACESTATE, state.clone());
        }
        None => {
            headers.remove(TRACESTATE);
        }
    }
    Some(trace)
}

impl<F, B, E> Future for SetCorrelationIdFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(mut inner) = this.inner.as_mut().as_pin_mut() else {
            unreachable!("a SetCorrelationIdFuture is only empty while dropped");
        };
        let mut res = {
            let _entered = this.span.enter();
            ready!(inner.as_mut().poll(cx))?
        };
        let echo = this.echo.take();
        if echo.is_some() || *this.response_extension {
            if let Some(id) = inner.take_id() {
                if let Some(name) = echo {
                    // A value the handler set on its own response wins.
                    if let http::header::Entry::Vacant(slot) = res.headers_mut().entry(name) {
                        slot.insert(id.header_value().clone());
                    }
                }
                if *this.response_extension {
                    res.extensions_mut().insert(id);
                }
            }
        }
        Poll::Ready(Ok(res))
    }
}
