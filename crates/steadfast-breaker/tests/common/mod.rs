//! Helpers shared by the breaker contract tests.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use steadfast_breaker::error::BreakerOpen;
use steadfast_breaker::{BreakerHandle, CircuitBreakerBuilder, CircuitBreakerLayer};
use steadfast_core::{BoxError, DefaultClassifier};
use tower::{Layer, Service, ServiceExt, service_fn};

/// An upstream whose next status is set by the test; counts the calls it receives.
#[derive(Clone, Default)]
pub struct Upstream {
    pub status: Arc<AtomicU16>,
    pub hits: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn new() -> Self {
        let u = Self::default();
        u.status.store(200, Ordering::SeqCst);
        u
    }
    pub fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    pub fn svc(
        &self,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + use<> {
        let this = self.clone();
        service_fn(move |_req: Request<()>| {
            let this = this.clone();
            async move {
                this.hits.fetch_add(1, Ordering::SeqCst);
                let s = this.status.load(Ordering::SeqCst);
                Ok::<_, Infallible>(Response::builder().status(s).body(()).unwrap())
            }
        })
    }
}

pub fn builder() -> CircuitBreakerBuilder {
    CircuitBreakerLayer::builder()
        .open_time(Duration::from_secs(30))
        .jitter_percent(0)
        .seed(1)
}

pub async fn call<S>(svc: &mut S) -> Result<u16, BoxError>
where
    S: Service<Request<()>, Error = BoxError>,
    S::Response: StatusOf,
{
    let res = svc.ready().await?.call(Request::new(())).await?;
    Ok(res.status_u16())
}

pub trait StatusOf {
    fn status_u16(&self) -> u16;
}
impl<B> StatusOf for Response<B> {
    fn status_u16(&self) -> u16 {
        self.status().as_u16()
    }
}

pub fn is_open(r: &Result<u16, BoxError>) -> bool {
    matches!(r, Err(e) if e.downcast_ref::<BreakerOpen>().is_some())
}

#[allow(clippy::type_complexity)] // one helper's return tuple, spelled once
pub fn setup(
    b: CircuitBreakerBuilder,
) -> (
    Upstream,
    BreakerHandle<DefaultClassifier>,
    impl Service<
        Request<()>,
        Response = Response<steadfast_breaker::BreakerBody<(), DefaultClassifier>>,
        Error = BoxError,
    > + Clone,
) {
    let up = Upstream::new();
    let layer = b.build().unwrap();
    let handle = layer.handle();
    let svc = layer.layer(up.svc());
    (up, handle, svc)
}
