use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::HOST;
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Response};
use steadfast_core::__private::Tried;
use steadfast_core::{BoxError, Classify, DefaultClassifier};
use tower_service::Service;

use crate::error::NoEndpoint;
use crate::future::{Guard, ResponseFuture};
use crate::layer::{BalanceLayer, HostHeader};
use crate::pick::{endpoint_id, pick};
use crate::set::Shared;

/// The balancing service; see [`BalanceLayer`].
///
/// # Clone
///
/// Clones share the endpoint set, load estimates and ejections.
pub struct Balance<S, C = DefaultClassifier> {
    inner: S,
    shared: Option<Arc<Shared<C>>>,
}

impl Balance<(), DefaultClassifier> {
    /// A layer that balances over `endpoints` with the defaults.
    pub fn layer(endpoints: impl IntoIterator<Item = http::uri::Authority>) -> BalanceLayer {
        BalanceLayer::new(endpoints)
    }
}

impl<S, C> Balance<S, C> {
    pub(crate) fn new(inner: S, shared: Option<Arc<Shared<C>>>) -> Self {
        Self { inner, shared }
    }

    /// Chooses the endpoint the next call would go to and, with `take`, takes a reference to
    /// it as a call does (dropped at once): true when there is one. What the benchmarks
    /// measure as "the pick".
    pub(crate) fn choose(&self, take: bool) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        let now = shared.now();
        shared.maybe_evaluate(now);
        let list = shared.endpoints.load();
        match pick(shared, &list, now, None) {
            Some(i) if take => {
                std::hint::black_box(list[i].clone()).authority.port_u16() != Some(0)
            }
            found => found.is_some(),
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

impl<S: Clone, C> Clone for Balance<S, C> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.shared.clone())
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Balance<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, B, ResB, C> Service<Request<B>> for Balance<S, C>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    C: Classify<Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(shared) = &self.shared else {
            return ResponseFuture::passthrough(self.inner.call(req));
        };
        if req.method() == http::Method::CONNECT {
            // A tunnel names its own target: not balanced.
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let now = shared.now();
        shared.maybe_evaluate(now);
        // Another attempt of this call in flight (a hedge above) went to these: go elsewhere.
        let tried = Tried::current();
        let endpoint = {
            let list = shared.endpoints.load();
            match pick(shared, &list, now, tried.as_ref()) {
                Some(i) => {
                    if tried.is_some() {
                        Tried::record(endpoint_id(&list[i]));
                    }
                    list[i].clone()
                }
                None => return ResponseFuture::failed(NoEndpoint::new(list.is_empty())),
            }
        };
        if shared.config.host == HostHeader::Service && !req.headers().contains_key(HOST) {
            if let Some(v) = req.uri().authority().and_then(|a| shared.host_value(a)) {
                req.headers_mut().insert(HOST, v);
            }
        }
        let parts = std::mem::take(req.uri_mut()).into_parts();
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(parts.scheme.unwrap_or(Scheme::HTTP));
        uri.authority = Some(endpoint.authority.clone());
        uri.path_and_query = Some(
            parts
                .path_and_query
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        *req.uri_mut() = Uri::from_parts(uri).expect("scheme, authority and path make a URI");
        endpoint.start();
        let guard = Guard::new(shared.clone(), endpoint, now);
        ResponseFuture::called(self.inner.call(req), guard)
    }
}
