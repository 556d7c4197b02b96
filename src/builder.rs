//! Builder methods for tower's `ServiceBuilder`.

#[cfg(feature = "timeout")]
use std::time::Duration;

use tower::ServiceBuilder;
#[cfg(any(
    feature = "timeout",
    feature = "correlation",
    feature = "breaker",
    feature = "retry"
))]
use tower::layer::util::Stack;

mod sealed {
    pub trait Sealed<L> {}
}

/// Extension methods on [`tower::ServiceBuilder`] that add steadfast layers.
///
/// Sealed: implemented only for `ServiceBuilder`.
///
/// ```
/// use std::time::Duration;
/// use steadfast::ServiceBuilderExt;
/// use tower::{ServiceBuilder, service_fn};
///
/// let client = ServiceBuilder::new()
///     .client_timeout(Duration::from_secs(5))
///     .service(service_fn(|_req: http::Request<()>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(()))
///     }));
/// # let _ = client;
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// Adds a client-side [`TimeoutLayer`](crate::timeout::TimeoutLayer) of `limit` (named
    /// apart from tower's own inherent `timeout`, which would win).
    #[cfg(feature = "timeout")]
    fn client_timeout(
        self,
        limit: Duration,
    ) -> ServiceBuilder<Stack<crate::timeout::TimeoutLayer, L>>;

    /// Adds a [`SetDeadlineLayer`](crate::timeout::SetDeadlineLayer) of at most `limit`.
    #[cfg(feature = "timeout")]
    fn set_deadline(
        self,
        limit: Duration,
    ) -> ServiceBuilder<Stack<crate::timeout::SetDeadlineLayer, L>>;

    /// Adds a server-side [`SetCorrelationIdLayer`](crate::correlation::SetCorrelationIdLayer)
    /// with its defaults.
    #[cfg(feature = "correlation")]
    fn set_correlation_id(
        self,
    ) -> ServiceBuilder<Stack<crate::correlation::SetCorrelationIdLayer, L>>;

    /// Adds a client-side
    /// [`PropagateCorrelationIdLayer`](crate::correlation::PropagateCorrelationIdLayer) with its
    /// defaults.
    #[cfg(feature = "correlation")]
    fn propagate_correlation_id(
        self,
    ) -> ServiceBuilder<Stack<crate::correlation::PropagateCorrelationIdLayer, L>>;

    /// Adds `breaker`. Pass a clone to keep a handle: every service made from the layer or
    /// its clones shares one breaker.
    #[cfg(feature = "breaker")]
    fn circuit_breaker<C>(
        self,
        breaker: crate::breaker::CircuitBreakerLayer<C>,
    ) -> ServiceBuilder<Stack<crate::breaker::CircuitBreakerLayer<C>, L>>;

    /// Adds `retry`; its budget is shared by every service made from the layer or its clones.
    /// Named apart from tower's own inherent `retry`, which would win.
    #[cfg(feature = "retry")]
    fn with_retry<C>(
        self,
        retry: crate::retry::RetryLayer<C>,
    ) -> ServiceBuilder<Stack<crate::retry::RetryLayer<C>, L>>;
}

impl<L> sealed::Sealed<L> for ServiceBuilder<L> {}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "timeout")]
    fn client_timeout(
        self,
        limit: Duration,
    ) -> ServiceBuilder<Stack<crate::timeout::TimeoutLayer, L>> {
        self.layer(crate::timeout::TimeoutLayer::new(limit))
    }

    #[cfg(feature = "timeout")]
    fn set_deadline(
        self,
        limit: Duration,
    ) -> ServiceBuilder<Stack<crate::timeout::SetDeadlineLayer, L>> {
        self.layer(crate::timeout::SetDeadlineLayer::new(limit))
    }

    #[cfg(feature = "correlation")]
    fn set_correlation_id(
        self,
    ) -> ServiceBuilder<Stack<crate::correlation::SetCorrelationIdLayer, L>> {
        self.layer(crate::correlation::SetCorrelationIdLayer::new())
    }

    #[cfg(feature = "correlation")]
    fn propagate_correlation_id(
        self,
    ) -> ServiceBuilder<Stack<crate::correlation::PropagateCorrelationIdLayer, L>> {
        self.layer(crate::correlation::PropagateCorrelationIdLayer::new())
    }

    #[cfg(feature = "breaker")]
    fn circuit_breaker<C>(
        self,
        breaker: crate::breaker::CircuitBreakerLayer<C>,
    ) -> ServiceBuilder<Stack<crate::breaker::CircuitBreakerLayer<C>, L>> {
        self.layer(breaker)
    }

    #[cfg(feature = "retry")]
    fn with_retry<C>(
        self,
        retry: crate::retry::RetryLayer<C>,
    ) -> ServiceBuilder<Stack<crate::retry::RetryLayer<C>, L>> {
        self.layer(retry)
    }
}
