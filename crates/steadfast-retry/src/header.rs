//! The headers the retry layer reads and writes.

use http::HeaderName;

/// The header that marks a request safe to repeat whatever its method.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on every attempt after the first: the attempt's number (2, 3, ...).
pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-retry-attempt");
/// Set on gRPC attempts after the first: how many attempts came before (gRPC A6).
pub const GRPC_PREVIOUS_ATTEMPTS: HeaderName =
    HeaderName::from_static("grpc-previous-rpc-attempts");

/// `name` if another party owns it (the protocol, a credential, another layer), so it cannot
/// be the attempt header (ours, `x-retry-attempt`, can).
pub(crate) fn taken(name: Option<&HeaderName>) -> Option<&HeaderName> {
    name.filter(|n| {
        **n != ATTEMPT_HEADER
            && (steadfast_core::header::reserved(n)
                || steadfast_core::header::owned_by_steadfast(n))
    })
}
