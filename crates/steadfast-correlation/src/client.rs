use std::task::{Context, Poll};

use http::Request;
use steadfast_core::header::single;
use tower_service::Service;

use crate::generate::MakeCorrelationId;
use crate::id::CorrelationId;
use crate::layer::PropagateCorrelationIdLayer;
use crate::traceparent::{TRACEPARENT, TraceContext};
use crate::validate::ValidateId;

/// The client-side service; see [`PropagateCorrelationIdLayer`].
///
/// # Clone
///
/// Clones share only configuration.
#[derive(Clone, Debug)]
pub struct PropagateCorrelationId<S, M, V> {
    inner: S,
    config: PropagateCorrelationIdLayer<M, V>,
}

impl PropagateCorrelationId<(), crate::UuidV7, crate::DefaultRule> {
    /// A layer with the defaults.
    pub fn layer() -> PropagateCorrelationIdLayer {
        PropagateCorrelationIdLayer::new()
    }
}

impl<S, M, V> PropagateCorrelationId<S, M, V> {
    /// Wraps `inner`.
    pub fn new(inner: S, config: PropagateCorrelationIdLayer<M, V>) -> Self {
        Self { inner, config }
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

impl<S, M, V, B> Service<Request<B>> for PropagateCorrelationId<S, M, V>
where
    S: Service<Request<B>>,
    M: MakeCorrelationId,
    V: ValidateId,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let header = &self.config.header;
        let id = if let Some(id) = req.extensions().get::<CorrelationId>() {
            Some(id.header_value().clone())
        } else if single(req.headers(), header)
            .is_some_and(|v| self.config.validate.accepts(v.as_bytes()))
        {
            None // the caller set one valid id on purpose: keep it
        } else if let Some(id) = CorrelationId::current() {
            Some(id.into())
        } else if self.config.generate {
            Some(self.config.make.make_id().into())
        } else {
            req.headers_mut().remove(header);
            None
        };
        if let Some(v) = id {
            req.headers_mut().insert(header.clone(), v);
        }
        if self.config.trace_context && !req.headers().contains_key(TRACEPARENT) {
            if let Some(trace) = TraceContext::current() {
                trace.inject(req.headers_mut());
            }
        }
        self.inner.call(req)
    }
}
