//! The headers the retry layer reads and writes.

use http::HeaderName;

/// The header that marks a request safe to repeat whatever its method.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on every attempt after the first: the attempt's number (2, 3, ...).
pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-retry-attempt");
/// Set on gRPC attempts after the first: how many attempts came before (gRPC A6).
pub const GRPC_PREVIOUS_ATTEMPTS: HeaderName =
    HeaderName::from_static("grpc-previous-rpc-attempts");
