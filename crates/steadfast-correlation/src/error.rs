//! The errors of this crate.

use std::error::Error;
use std::fmt;

use http::HeaderName;

/// A correlation builder was given a setting that cannot work; the message says what to
/// change.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidCorrelationConfig {
    /// The header (or fallback) is one the protocol or another layer owns.
    ReservedHeader(HeaderName),
    /// The fallback header is the main header itself.
    FallbackIsHeader(HeaderName),
}

impl fmt::Display for InvalidCorrelationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ReservedHeader(h) => write!(
                f,
                "`{h}` belongs to the protocol, the caller's credentials, another layer \
                 (a deadline, an idempotency key, a retry hint), gRPC or the trace, and an \
                 id written there would corrupt it: choose a header of your own \
                 (default `x-correlation-id`)"
            ),
            Self::FallbackIsHeader(h) => write!(
                f,
                "the fallback header `{h}` is the main header: choose another fallback \
                 (default `x-request-id`) or `None`"
            ),
        }
    }
}

impl Error for InvalidCorrelationConfig {}

/// A string that is not a valid correlation id: 1-128 bytes of `[A-Za-z0-9._:-]` (the
/// default rule, so that it passes every hop's validation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidCorrelationId {
    pub(crate) len: usize,
}

impl fmt::Display for InvalidCorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the value itself: it may be an attacker's log-injection payload.
        write!(
            f,
            "not a valid correlation id ({} bytes): use 1-128 bytes of letters, digits and . _ : -",
            self.len
        )
    }
}

impl Error for InvalidCorrelationId {}
