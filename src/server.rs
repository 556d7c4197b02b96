//! The standard server stack.
//!
//! ```text
//! CorrelationId   accept a valid inbound id or generate one; ambient for the handler,
//!                 tracing span field, echoed on the response
//!   Timeout       inbound grpc-timeout / x-request-timeout-ms, min with 30 s; answers 504 or
//!                 DEADLINE_EXCEEDED; the deadline is ambient for the handler
//!     your axum Router or tonic service
//! ```
//!
//! It keeps the inner error type, so `axum::Router::layer` and tonic's `Server::layer`
//! accept it with no `HandleErrorLayer`:
//!
//! ```
//! use axum::{Router, routing::get};
//!
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "ok" }))
//!     .layer(steadfast::server::http().build().unwrap());
//! ```

use std::time::Duration;

use steadfast_correlation::{
    DefaultRule, SetCorrelationId, SetCorrelationIdBuilder, SetCorrelationIdLayer, UuidV7,
};
use steadfast_timeout::{SetDeadline, SetDeadlineBuilder, SetDeadlineLayer};
use tower_layer::Layer;

use crate::preset::InvalidPresetConfig;

/// A server's own limit per request.
pub const DEFAULT_SERVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the standard HTTP server stack.
///
/// ```
/// use axum::{Router, routing::get};
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "ok" }))
///     .layer(steadfast::server::http().build().unwrap());
/// ```
pub fn http() -> ServerBuilder {
    ServerBuilder {
        timeout: DEFAULT_SERVER_TIMEOUT,
        deadline: SetDeadlineLayer::builder(),
        correlation: SetCorrelationIdLayer::builder(),
    }
}

/// The gRPC server stack: the same layers (they recognise gRPC requests by content type and
/// answer with trailers-only statuses).
///
/// ```no_run
/// use tonic_health::server::health_reporter;
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let (_reporter, health) = health_reporter();
/// tonic::transport::Server::builder()
///     .layer(steadfast::server::grpc().build()?)
///     .add_service(health)
///     .serve("127.0.0.1:50051".parse()?)
///     .await?;
/// # Ok(()) }
/// ```
pub fn grpc() -> ServerBuilder {
    http()
}

/// Configures the standard server stack.
#[must_use]
#[derive(Clone, Debug)]
pub struct ServerBuilder {
    timeout: Duration,
    deadline: SetDeadlineBuilder,
    correlation: SetCorrelationIdBuilder,
}

impl ServerBuilder {
    /// The server's own limit per request (default 30 s); an inbound budget can only lower it.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let layer = steadfast::server::http().timeout(Duration::from_secs(5)).build().unwrap();
    /// # let _ = layer;
    /// ```
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Adjusts the deadline layer: the header a caller's budget is read from, whether it is
    /// trusted at all (an edge server facing the internet ignores and strips it), the status
    /// answered on expiry. The limit is [`timeout`](Self::timeout)'s.
    ///
    /// ```
    /// let edge = steadfast::server::http()
    ///     .deadline(|d| d.trust_inbound(false))
    ///     .build()
    ///     .unwrap();
    /// # let _ = edge;
    /// let behind_envoy = steadfast::server::http()
    ///     .deadline(|d| d.deadline_header(http::HeaderName::from_static("x-envoy-expected-rq-timeout-ms")))
    ///     .build()
    ///     .unwrap();
    /// # let _ = behind_envoy;
    /// ```
    pub fn deadline(mut self, f: impl FnOnce(SetDeadlineBuilder) -> SetDeadlineBuilder) -> Self {
        self.deadline = f(self.deadline);
        self
    }

    /// Adjusts the correlation layer.
    ///
    /// ```
    /// let layer = steadfast::server::http()
    ///     .correlation(|c| c.from_traceparent(true).echo(false))
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// ```
    pub fn correlation(
        mut self,
        f: impl FnOnce(SetCorrelationIdBuilder) -> SetCorrelationIdBuilder,
    ) -> Self {
        self.correlation = f(self.correlation);
        self
    }

    /// Builds the stack's layer.
    ///
    /// # Errors
    ///
    /// [`InvalidPresetConfig::ZeroTimeout`] for a zero timeout,
    /// [`InvalidPresetConfig::Correlation`] for a correlation header the protocol owns,
    /// [`InvalidPresetConfig::Timeout`] for a deadline setting that cannot work.
    pub fn build(self) -> Result<ServerLayer, InvalidPresetConfig> {
        if self.timeout.is_zero() {
            return Err(InvalidPresetConfig::ZeroTimeout);
        }
        let correlation = self.correlation.build()?;
        let timeout = self.deadline.limit(self.timeout).build()?;
        crate::preset::check_clashes(&[
            (Some(correlation.header()), "correlation id"),
            (correlation.fallback(), "fallback correlation id"),
            (Some(timeout.deadline_header()), "deadline"),
        ])?;
        Ok(ServerLayer {
            correlation,
            timeout,
        })
    }
}

/// The standard server stack as one layer; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct ServerLayer {
    correlation: SetCorrelationIdLayer,
    timeout: SetDeadlineLayer,
}

/// The service the server stack makes from `S`.
pub type Server<S> = SetCorrelationId<SetDeadline<S>, UuidV7, DefaultRule>;

impl<S> Layer<S> for ServerLayer {
    type Service = Server<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.correlation.layer(self.timeout.layer(inner))
    }
}
