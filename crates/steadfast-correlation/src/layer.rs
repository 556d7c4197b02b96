use http::HeaderName;
use tower_layer::Layer;

use crate::client::PropagateCorrelationId;
use crate::error::InvalidCorrelationConfig;
use crate::generate::{MakeCorrelationId, UuidV7};
use crate::server::SetCorrelationId;
use crate::validate::{DefaultRule, ValidateId};

/// The default correlation header (the seed's `correlationId`).
pub const X_CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
/// The fallback header read on the server side.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Server side: accept a valid inbound id or generate one, and make it visible everywhere.
///
/// Per request, in order of precedence: a valid `x-correlation-id` (name configurable), else
/// a valid `x-request-id`, else (when [enabled](SetCorrelationIdBuilder::from_traceparent)) the trace-id of a
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
/// - a `correlation_id` field on a `correlation` tracing span around the handler,
/// - echoed on the response header, unless the handler set that header itself (its value
///   wins).
///
/// # Example
///
/// ```
/// use axum::{Router, routing::get};
/// use steadfast_correlation::{CorrelationId, SetCorrelationIdLayer};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let app = Router::new()
///     .route("/", get(|| async { CorrelationId::current().unwrap().to_string() }))
///     .layer(SetCorrelationIdLayer::new());
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
pub struct SetCorrelationIdLayer<M = UuidV7, V = DefaultRule> {
    pub(crate) header: HeaderName,
    pub(crate) fallback: Option<HeaderName>,
    pub(crate) traceparent: bool,
    pub(crate) trace_context: bool,
    pub(crate) extension: bool,
    /// `None`: on exactly when the echo is off.
    pub(crate) response_extension: Option<bool>,
    pub(crate) echo: bool,
    pub(crate) make: M,
    pub(crate) validate: V,
}

impl Default for SetCorrelationIdLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl SetCorrelationIdLayer {
    /// The defaults: `x-correlation-id`, falling back to `x-request-id`, UUIDv7 generation,
    /// the default validation rule, extension and echo on, `traceparent` off.
    pub fn new() -> Self {
        Self {
            header: X_CORRELATION_ID,
            fallback: Some(X_REQUEST_ID),
            traceparent: false,
            trace_context: true,
            extension: true,
            response_extension: None,
            echo: true,
            make: UuidV7::new(),
            validate: DefaultRule,
        }
    }
}

impl<M, V> SetCorrelationIdLayer<M, V> {
    /// The header the id is read from, written to and echoed on.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// The header read when the main one is missing or invalid, if any.
    pub fn fallback(&self) -> Option<&HeaderName> {
        self.fallback.as_ref()
    }
}

impl SetCorrelationIdLayer {
    /// A builder with the defaults (see [`new`](Self::new)).
    pub fn builder() -> SetCorrelationIdBuilder {
        SetCorrelationIdBuilder { layer: Self::new() }
    }
}

/// Configures a [`SetCorrelationIdLayer`].
///
/// ```
/// use steadfast_correlation::SetCorrelationIdLayer;
///
/// let layer = SetCorrelationIdLayer::builder()
///     .header(http::HeaderName::from_static("x-trace"))
///     .fallback(None)
///     .from_traceparent(true)
///     .build()
///     .unwrap();
/// # let _ = layer;
/// // A header that carries the message itself is refused.
/// let err = SetCorrelationIdLayer::builder()
///     .header(http::header::CONTENT_LENGTH)
///     .build()
///     .unwrap_err();
/// assert!(err.to_string().contains("content-length"));
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct SetCorrelationIdBuilder<M = UuidV7, V = DefaultRule> {
    layer: SetCorrelationIdLayer<M, V>,
}

impl<M, V> SetCorrelationIdBuilder<M, V> {
    /// The header to read, write and echo (default `x-correlation-id`).
    pub fn header(mut self, name: HeaderName) -> Self {
        self.layer.header = name;
        self
    }

    /// The header read when the main one is missing or invalid (default `x-request-id`);
    /// `None` disables the fallback.
    pub fn fallback(mut self, name: Option<HeaderName>) -> Self {
        self.layer.fallback = name;
        self
    }

    /// Also derive the id from a valid W3C `traceparent`'s trace-id (off by default).
    pub fn from_traceparent(mut self, on: bool) -> Self {
        self.layer.traceparent = on;
        self
    }

    /// Whether a valid W3C trace context (`traceparent`, `tracestate`) of the request is
    /// made ambient for its handler, so that calls through a
    /// [`PropagateCorrelationIdLayer`](crate::PropagateCorrelationIdLayer) carry it on
    /// (default on; see [`TraceContext`](crate::TraceContext)). An invalid or repeated
    /// `traceparent` is removed from the request with its `tracestate`, an invalid
    /// `tracestate` alone, so a handler that forwards headers forwards nothing refused.
    pub fn trace_context(mut self, on: bool) -> Self {
        self.layer.trace_context = on;
        self
    }

    /// Whether to insert the [`CorrelationId`](crate::CorrelationId) request extension
    /// (default on; off saves the extension map's allocations when only the ambient id is
    /// used).
    pub fn extension(mut self, on: bool) -> Self {
        self.layer.extension = on;
        self
    }

    /// Whether the response carries the id as a [`CorrelationId`](crate::CorrelationId)
    /// extension, so outer layers and middleware that only see the response can read it.
    /// By default it does exactly when the [`echo`](Self::echo) is off: an echoed response
    /// already carries the id, in its header, and the extension costs up to three
    /// allocations per response (a response seldom has an extension map yet). The extension
    /// is the request's id; a handler that sets its own id header on the response keeps that
    /// header.
    ///
    /// ```
    /// use steadfast_correlation::{CorrelationId, SetCorrelationIdLayer};
    /// use tower::{ServiceBuilder, ServiceExt, service_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = SetCorrelationIdLayer::builder().response_extension(true).build().unwrap();
    /// let svc = ServiceBuilder::new()
    ///     .layer(layer)
    ///     .service(service_fn(|_req: http::Request<()>| async {
    ///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    ///     }));
    /// let req = http::Request::builder().header("x-correlation-id", "order-7").body(()).unwrap();
    /// let res = svc.oneshot(req).await.unwrap();
    /// assert_eq!(res.extensions().get::<CorrelationId>().unwrap().as_str(), "order-7");
    /// assert_eq!(res.headers()["x-correlation-id"], "order-7"); // echoed too
    /// # }
    /// ```
    pub fn response_extension(mut self, on: bool) -> Self {
        self.layer.response_extension = Some(on);
        self
    }

    /// Whether to echo the id on the response (default on).
    pub fn echo(mut self, on: bool) -> Self {
        self.layer.echo = on;
        self
    }

    /// Replaces the id generator.
    pub fn make_id<M2: MakeCorrelationId>(self, make: M2) -> SetCorrelationIdBuilder<M2, V> {
        let l = self.layer;
        SetCorrelationIdBuilder {
            layer: SetCorrelationIdLayer {
                header: l.header,
                fallback: l.fallback,
                traceparent: l.traceparent,
                trace_context: l.trace_context,
                extension: l.extension,
                response_extension: l.response_extension,
                echo: l.echo,
                make,
                validate: l.validate,
            },
        }
    }

    /// Replaces the validation rule. Whatever the rule, only visible ASCII is ever accepted.
    pub fn validate<V2: ValidateId>(self, validate: V2) -> SetCorrelationIdBuilder<M, V2> {
        let l = self.layer;
        SetCorrelationIdBuilder {
            layer: SetCorrelationIdLayer {
                header: l.header,
                fallback: l.fallback,
                traceparent: l.traceparent,
                trace_context: l.trace_context,
                extension: l.extension,
                response_extension: l.response_extension,
                echo: l.echo,
                make: l.make,
                validate,
            },
        }
    }

    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// [`InvalidCorrelationConfig`] when the header or the fallback is one the protocol, the
    /// caller's credentials or another layer owns (framing, connection, `content-*`,
    /// credentials, deadline, idempotency and retry headers, `grpc-*`, trace context), or
    /// when the fallback is the header itself.
    pub fn build(self) -> Result<SetCorrelationIdLayer<M, V>, InvalidCorrelationConfig> {
        check_header(&self.layer.header)?;
        if let Some(f) = &self.layer.fallback {
            check_header(f)?;
            if *f == self.layer.header {
                return Err(InvalidCorrelationConfig::FallbackIsHeader(f.clone()));
            }
        }
        Ok(self.layer)
    }
}

/// Refuses a header whose value the protocol, the caller's credentials or another layer
/// owns: writing an id there would corrupt the message (`content-length`), the connection
/// (`connection`), a credential (`cookie`), a deadline or retry hint another hop acts on
/// (`x-request-timeout-ms`, `idempotency-key`, `retry-after`), gRPC (`grpc-*`) or the trace
/// (`traceparent`).
fn check_header(name: &HeaderName) -> Result<(), InvalidCorrelationConfig> {
    if steadfast_core::header::reserved(name) {
        return Err(InvalidCorrelationConfig::ReservedHeader(name.clone()));
    }
    Ok(())
}

impl<S, M: Clone, V: Clone> Layer<S> for SetCorrelationIdLayer<M, V> {
    type Service = SetCorrelationId<S, M, V>;

    fn layer(&self, inner: S) -> Self::Service {
        SetCorrelationId::new(inner, self.clone())
    }
}

/// Client side: stamp the correlation id on outgoing requests.
///
/// The id comes from, in order: the request's [`CorrelationId`](crate::CorrelationId)
/// extension, a valid header the caller already set, the ambient id of the request being
/// handled ([`CorrelationId::current`](crate::CorrelationId::current)), or a newly generated id
/// ([switchable](PropagateCorrelationIdBuilder::generate)). An invalid header already on the request, or one sent as
/// two or more fields, is replaced, or removed when there is nothing to replace it with: the
/// request leaves with at most one id header.
///
/// Works on any `http::Request` service: a hyper-util client or a tonic `Channel` (gRPC
/// metadata travels as HTTP/2 headers).
///
/// ```
/// use steadfast_correlation::{PropagateCorrelationIdLayer, CorrelationId};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let client = ServiceBuilder::new()
///     .layer(PropagateCorrelationIdLayer::new())
///     .service(service_fn(|req: http::Request<()>| async move {
///         Ok::<_, std::convert::Infallible>(req.headers()["x-correlation-id"].clone())
///     }));
/// let id = CorrelationId::parse("trace-me").unwrap();
/// let sent = id.scope(client.oneshot(http::Request::new(()))).await.unwrap();
/// assert_eq!(sent, "trace-me");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PropagateCorrelationIdLayer<M = UuidV7, V = DefaultRule> {
    pub(crate) header: HeaderName,
    pub(crate) generate: bool,
    pub(crate) trace_context: bool,
    pub(crate) make: M,
    pub(crate) validate: V,
}

impl Default for PropagateCorrelationIdLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl PropagateCorrelationIdLayer {
    /// The defaults: `x-correlation-id`, generate when there is no id, UUIDv7.
    pub fn new() -> Self {
        Self {
            header: X_CORRELATION_ID,
            generate: true,
            trace_context: true,
            make: UuidV7::new(),
            validate: DefaultRule,
        }
    }
}

impl<M, V> PropagateCorrelationIdLayer<M, V> {
    /// The header the id is written to.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }
}

impl PropagateCorrelationIdLayer {
    /// A builder with the defaults (see [`new`](Self::new)).
    pub fn builder() -> PropagateCorrelationIdBuilder {
        PropagateCorrelationIdBuilder { layer: Self::new() }
    }
}

/// Configures a [`PropagateCorrelationIdLayer`].
///
/// ```
/// use steadfast_correlation::PropagateCorrelationIdLayer;
///
/// let layer = PropagateCorrelationIdLayer::builder().generate(false).build().unwrap();
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct PropagateCorrelationIdBuilder<M = UuidV7, V = DefaultRule> {
    layer: PropagateCorrelationIdLayer<M, V>,
}

impl<M, V> PropagateCorrelationIdBuilder<M, V> {
    /// The header to write (default `x-correlation-id`).
    pub fn header(mut self, name: HeaderName) -> Self {
        self.layer.header = name;
        self
    }

    /// Whether calls made while a [`TraceContext`](crate::TraceContext) is ambient carry it
    /// (default on): a `traceparent` with the same trace id and flags and a new span id,
    /// and the `tracestate`. A request that already has a `traceparent` (set by the caller
    /// or an OpenTelemetry propagator) keeps its own.
    pub fn trace_context(mut self, on: bool) -> Self {
        self.layer.trace_context = on;
        self
    }

    /// Whether to generate an id when the request has none and none is ambient (default on).
    pub fn generate(mut self, on: bool) -> Self {
        self.layer.generate = on;
        self
    }

    /// Replaces the id generator.
    pub fn make_id<M2: MakeCorrelationId>(self, make: M2) -> PropagateCorrelationIdBuilder<M2, V> {
        let l = self.layer;
        PropagateCorrelationIdBuilder {
            layer: PropagateCorrelationIdLayer {
                header: l.header,
                generate: l.generate,
                trace_context: l.trace_context,
                make,
                validate: l.validate,
            },
        }
    }

    /// Replaces the rule a caller-set header must pass to be kept.
    pub fn validate<V2: ValidateId>(self, validate: V2) -> PropagateCorrelationIdBuilder<M, V2> {
        let l = self.layer;
        PropagateCorrelationIdBuilder {
            layer: PropagateCorrelationIdLayer {
                header: l.header,
                generate: l.generate,
                trace_context: l.trace_context,
                make: l.make,
                validate,
            },
        }
    }

    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// [`InvalidCorrelationConfig::ReservedHeader`] when the header is one the protocol,
    /// the caller's credentials or another layer owns (framing, connection, `content-*`,
    /// credentials, deadline, idempotency and retry headers, `grpc-*`, trace context).
    pub fn build(self) -> Result<PropagateCorrelationIdLayer<M, V>, InvalidCorrelationConfig> {
        check_header(&self.layer.header)?;
        Ok(self.layer)
    }
}

impl<S, M: Clone, V: Clone> Layer<S> for PropagateCorrelationIdLayer<M, V> {
    type Service = PropagateCorrelationId<S, M, V>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagateCorrelationId::new(inner, self.clone())
    }
}
