use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use http::header::{Entry, HeaderValue};
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
/// Clones share only configuration (one `Arc`).
#[derive(Clone, Debug)]
pub struct PropagateCorrelationId<S, M, V> {
    inner: S,
    config: Arc<PropagateCorrelationIdLayer<M, V>>,
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

    #[inline]
    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let config = &self.config;
        let id = req
            .extensions()
            .get::<CorrelationId>()
            .map(|id| id.header_value().clone());
        // One lookup of the header for every case: keep one valid id the caller set on
        // purpose, else write the id that applies (or remove what was there).
        match req.headers_mut().entry(&config.header) {
            Entry::Occupied(mut e) => {
                let keep = id.is_none() && {
                    let mut values = e.iter();
                    let first = values.next();
                    values.next().is_none()
                        && first.is_some_and(|v| config.validate.accepts(v.as_bytes()))
                };
                if !keep {
                    match id.or_else(|| ambient_or_new(config)) {
                        Some(v) => {
                            e.insert(v);
                        }
                        None => {
                            e.remove_entry_mult();
                        }
                    }
                }
            }
            Entry::Vacant(e) => {
                if let Some(v) = id.or_else(|| ambient_or_new(config)) {
                    e.insert(v);
                }
            }
        }
        if config.trace_context {
            if let Some(trace) = TraceContext::current() {
                if !req.headers().contains_key(TRACEPARENT) {
                    trace.inject(req.headers_mut());
                }
            }
        }
        self.inner.call(req)
    }
}

/// The ambient id, else a new one when the layer generates ids.
fn ambient_or_new<M: MakeCorrelationId, V>(
    config: &PropagateCorrelationIdLayer<M, V>,
) -> Option<HeaderValue> {
    match CorrelationId::current() {
        Some(id) => Some(id.into()),
        None if config.generate => Some(config.make.make_id().into()),
        None => None,
    }
}
