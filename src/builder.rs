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
    /// Adds a client-side [`TimeoutLayer`](crate::timeout::TimeoutLayer) of `limit`.
    #[cfg(feature = "timeout")]
    fn client_timeout(
        self,
        limit: Duration,
    ) -> ServiceBuilder<Stack<crate::timeout::TimeoutLayer, L>>;

    /// Adds a [`ServerTimeoutLayer`](crate::timeout::ServerTimeoutLayer) of at most `limit`.
    #[cfg(feature = "timeout")]
    fn server_timeout(
        self,
        limit: Duration,
    ) -> ServiceBuilder<Stack<crate::timeout::ServerTimeoutLayer, L>>;

    /// Adds a server-side [`CorrelationIdLayer`](crate::correlation::CorrelationIdLayer) with
    /// its defaults.
    #[cfg(feature = "correlation")]
    fn correlation_id(self) -> ServiceBuilder<Stack<crate::correlation::CorrelationIdLayer, L>>;

    /// Adds a [`ClientCorrelationIdLayer`](crate::correlation::ClientCorrelationIdLayer) with
    /// its defaults.
    #[cfg(feature = "correlation")]
    fn client_correlation_id(
        self,
    ) -> ServiceBuilder<Stack<crate::correlation::ClientCorrelationIdLayer, L>>;

    /// Adds a clone of `breaker`: services built from it share its state with every other
    /// service made from the same layer value.
    #[cfg(feature = "breaker")]
    fn circuit_breaker<C>(
        self,
        breaker: &crate::breaker::CircuitBreakerLayer<C>,
    ) -> ServiceBuilder<Stack<crate::breaker::CircuitBreakerLayer<C>, L>>;

    /// Adds a clone of `retry` (its budget is shared with every other service made from the
    /// same layer value). Named so it does not collide with tower's own `retry`.
    #[cfg(feature = "retry")]
    fn with_retry<C>(
        self,
        retry: &crate::retry::RetryLayer<C>,
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
    fn server_timeout(
        self,
        limit: Duration,
    ) -> ServiceBuilder<Stack<crate::timeout::ServerTimeoutLayer, L>> {
        self.layer(crate::timeout::ServerTimeoutLayer::new(limit))
    }

    #[cfg(feature = "correlation")]
    fn correlation_id(self) -> ServiceBuilder<Stack<crate::correlation::CorrelationIdLayer, L>> {
        self.layer(crate::correlation::CorrelationIdLayer::new())
    }

    #[cfg(feature = "correlation")]
    fn client_correlation_id(
        self,
    ) -> ServiceBuilder<Stack<crate::correlation::ClientCorrelationIdLayer, L>> {
        self.layer(crate::correlation::ClientCorrelationIdLayer::new())
    }

    #[cfg(feature = "breaker")]
    fn circuit_breaker<C>(
        self,
        breaker: &crate::breaker::CircuitBreakerLayer<C>,
    ) -> ServiceBuilder<Stack<crate::breaker::CircuitBreakerLayer<C>, L>> {
        self.layer(breaker.clone())
    }

    #[cfg(feature = "retry")]
    fn with_retry<C>(
        self,
        retry: &crate::retry::RetryLayer<C>,
    ) -> ServiceBuilder<Stack<crate::retry::RetryLayer<C>, L>> {
        self.layer(retry.clone())
    }
}
