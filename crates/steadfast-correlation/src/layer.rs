use http::HeaderName;
use tower_layer::Layer;

use crate::client::ClientCorrelationId;
use crate::generate::{MakeCorrelationId, UuidV7};
use crate::server::CorrelationIdService;
use crate::validate::{DefaultRule, ValidateId};

/// The default correlation header (the seed's `correlationId`).
pub const X_CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
/// The fallback header read on the server side.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Server side: accept a valid inbound id or generate one, and make it visible everywhere.
///
/// Per request, in order of precedence: a valid `x-correlation-id` (name configurable), else
/// a valid `x-request-id`, else (when [enabled](Self::from_traceparent)) the trace-id of a
/// valid W3C `traceparent`, else a freshly [generated](crate::UuidV7) id. Rejected inbound
/// values are replaced and never echoed or logged. A header sent twice (two fields, valid or
/// not, equal or not) is ambiguous and counts as invalid: a payload cannot ride beside a
/// valid id.
///
/// The accepted id is then:
/// - set as the request's only `x-correlation-id` header (so the handler, and anything that
///   forwards the inbound headers, sees the id that counts and nothing else); an
///   `x-request-id` and, when read, a `traceparent` that is sent twice or is invalid is
///   removed (a valid single one is kept, even when the id came from elsewhere),
/// - a [`CorrelationId`](crate::CorrelationId) request extension (can be switched off),
/// - ambient for the handler: [`CorrelationId::current`](crate::CorrelationId::current),
///   which outgoing client stacks read,
/// - a `correlation_id` field on a `request` tracing span around the handler,
/// - echoed on the response header, unless the handler set that header itself (its value
///   wins).
///
/// # Example
///
/// ```
/// use axum::{Router, routing::get};
/// use steadfast_correlation::{CorrelationId, CorrelationIdLayer};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let app = Router::new()
///     .route("/", get(|| async { CorrelationId::current().unwrap().to_string() }))
///     .layer(CorrelationIdLayer::new());
/// let req = http::Request::get("/")
///     .header("x-correlation-id", "order-7")
///     .body(axum::body::Body::empty())
///     .unwrap();
/// let res = app.oneshot(req).await.unwrap();
/// assert_eq!(res.headers()["x-correlation-id"], "order-7");
/// # }
/// ```
///
/// # Clone
///
/// Configuration only; generators made with [`UuidV7::seeded`] share their sequence.
#[derive(Clone, Debug)]
pub struct CorrelationIdLayer<M = UuidV7, V = DefaultRule> {
    pub(crate) header: HeaderName,
    pub(crate) fallback: Option<HeaderName>,
    pub(crate) traceparent: bool,
    pub(crate) extension: bool,
    pub(crate) echo: bool,
    pub(crate) make: M,
    pub(crate) validate: V,
}

impl Default for CorrelationIdLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CorrelationIdLayer {
    /// The defaults: `x-correlation-id`, falling back to `x-request-id`, UUIDv7 generation,
    /// the default validation rule, extension and echo on, `traceparent` off.
    pub fn new() -> Self {
        Self {
            header: X_CORRELATION_ID,
            fallback: Some(X_REQUEST_ID),
            traceparent: false,
            extension: true,
            echo: true,
            make: UuidV7::new(),
            validate: DefaultRule,
        }
    }
}

impl<M, V> CorrelationIdLayer<M, V> {
    /// The header to read, write and echo (default `x-correlation-id`).
    #[must_use]
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// The header read when the main one is missing or invalid (default `x-request-id`);
    /// `None` disables the fallback.
    #[must_use]
    pub fn fallback(mut self, name: Option<HeaderName>) -> Self {
        self.fallback = name;
        self
    }

    /// Also derive the id from a valid W3C `traceparent`'s trace-id (off by default).
    #[must_use]
    pub fn from_traceparent(mut self, on: bool) -> Self {
        self.traceparent = on;
        self
    }

    /// Whether to insert the [`CorrelationId`](crate::CorrelationId) request extension
    /// (default on; off saves the extension map's allocations when only the ambient id is
    /// used).
    #[must_use]
    pub fn extension(mut self, on: bool) -> Self {
        self.extension = on;
        self
    }

    /// Whether to echo the id on the response (default on).
    #[must_use]
    pub fn echo(mut self, on: bool) -> Self {
        self.echo = on;
        self
    }

    /// Replaces the id generator.
    pub fn make_id<M2: MakeCorrelationId>(self, make: M2) -> CorrelationIdLayer<M2, V> {
        CorrelationIdLayer {
            header: self.header,
            fallback: self.fallback,
            traceparent: self.traceparent,
            extension: self.extension,
            echo: self.echo,
            make,
            validate: self.validate,
        }
    }

    /// Replaces the validation rule. Whatever the rule, only visible ASCII is ever accepted.
    pub fn validate<V2: ValidateId>(self, validate: V2) -> CorrelationIdLayer<M, V2> {
        CorrelationIdLayer {
            header: self.header,
            fallback: self.fallback,
            traceparent: self.traceparent,
            extension: self.extension,
            echo: self.echo,
            make: self.make,
            validate,
        }
    }
}

impl<S, M: Clone, V: Clone> Layer<S> for CorrelationIdLayer<M, V> {
    type Service = CorrelationIdService<S, M, V>;

    fn layer(&self, inner: S) -> Self::Service {
        CorrelationIdService::new(inner, self.clone())
    }
}

/// Client side: stamp the correlation id on outgoing requests.
///
/// The id comes from, in order: the request's [`CorrelationId`](crate::CorrelationId)
/// extension, a valid header the caller already set, the ambient id of the request being
/// handled ([`CorrelationId::current`](crate::CorrelationId::current)), or a newly generated id
/// ([switchable](Self::generate)). An invalid header already on the request, or one sent as
/// two or more fields, is replaced, or removed when there is nothing to replace it with: the
/// request leaves with at most one id header.
///
/// Works on any `http::Request` service: a hyper-util client or a tonic `Channel` (gRPC
/// metadata travels as HTTP/2 headers).
///
/// ```
/// use steadfast_correlation::{ClientCorrelationIdLayer, CorrelationId};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let client = ServiceBuilder::new()
///     .layer(ClientCorrelationIdLayer::new())
///     .service(service_fn(|req: http::Request<()>| async move {
///         Ok::<_, std::convert::Infallible>(req.headers()["x-correlation-id"].clone())
///     }));
/// let id = CorrelationId::parse("trace-me").unwrap();
/// let sent = id.scope(client.oneshot(http::Request::new(()))).await.unwrap();
/// assert_eq!(sent, "trace-me");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ClientCorrelationIdLayer<M = UuidV7, V = DefaultRule> {
    pub(crate) header: HeaderName,
    pub(crate) generate: bool,
    pub(crate) make: M,
    pub(crate) validate: V,
}

impl Default for ClientCorrelationIdLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientCorrelationIdLayer {
    /// The defaults: `x-correlation-id`, generate when there is no id, UUIDv7.
    pub fn new() -> Self {
        Self {
            header: X_CORRELATION_ID,
            generate: true,
            make: UuidV7::new(),
            validate: DefaultRule,
        }
    }
}

impl<M, V> ClientCorrelationIdLayer<M, V> {
    /// The header to write (default `x-correlation-id`).
    #[must_use]
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// Whether to generate an id when the request has none and none is ambient (default on).
    #[must_use]
    pub fn generate(mut self, on: bool) -> Self {
        self.generate = on;
        self
    }

    /// Replaces the id generator.
    pub fn make_id<M2: MakeCorrelationId>(self, make: M2) -> ClientCorrelationIdLayer<M2, V> {
        ClientCorrelationIdLayer {
            header: self.header,
            generate: self.generate,
            make,
            validate: self.validate,
        }
    }

    /// Replaces the rule a caller-set header must pass to be kept.
    pub fn validate<V2: ValidateId>(self, validate: V2) -> ClientCorrelationIdLayer<M, V2> {
        ClientCorrelationIdLayer {
            header: self.header,
            generate: self.generate,
            make: self.make,
            validate,
        }
    }
}

impl<S, M: Clone, V: Clone> Layer<S> for ClientCorrelationIdLayer<M, V> {
    type Service = ClientCorrelationId<S, M, V>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientCorrelationId::new(inner, self.clone())
    }
}
