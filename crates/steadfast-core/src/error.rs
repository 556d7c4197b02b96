//! Transport error classification and the "rejected by policy" marker.

use std::error::Error;
use std::fmt;
use std::io;

use crate::classify::Class;

/// The error type at every steadfast boundary, as in tower.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// How far a request got before its call ended.
///
/// This decides whether a non-idempotent request may be retried: only when it
/// [certainly was not sent](Delivery::NotSent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Delivery {
    /// The request certainly never reached the server: connection refused, DNS failure, connect
    /// timeout, or a local policy (breaker) rejected it.
    NotSent,
    /// The request may have reached the server, but no complete response came back.
    MaybeSent,
    /// A response head arrived.
    Answered,
}

/// Classifies an error returned instead of a response by walking its [`Error::source`] chain.
///
/// - [`PolicyRejected`] anywhere in the chain: not a failure, not retryable, not sent.
/// - hyper-util's legacy client connect errors (`is_connect()`: refused, DNS, connect
///   timeout) and `io::ErrorKind::ConnectionRefused`: a retryable failure, [`Delivery::NotSent`].
/// - Anything else (reset, closed mid-response, timeouts): a retryable failure,
///   [`Delivery::MaybeSent`] — retrying it is only safe for idempotent requests.
///
/// ```
/// use steadfast_core::{Delivery, classify_transport_error};
///
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// assert_eq!(classify_transport_error(&refused).delivery(), Delivery::NotSent);
/// let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
/// assert_eq!(classify_transport_error(&reset).delivery(), Delivery::MaybeSent);
/// ```
pub fn classify_transport_error(err: &(dyn Error + 'static)) -> Class {
    if PolicyRejected::is_in(err) {
        return Class::new(false, false, Delivery::NotSent);
    }
    let delivery = if certainly_not_sent(err) {
        Delivery::NotSent
    } else {
        Delivery::MaybeSent
    };
    Class::new(true, true, delivery)
}

/// A short, low-cardinality name for what went wrong, for OpenTelemetry's `error.type` and
/// for logs: the first of these found along the `source()` chain, else `"_OTHER"` (the
/// convention's fallback).
///
/// | found | name |
/// |---|---|
/// | [`PolicyRejected`] (a layer refused the call: open breaker, shed load) | `policy_rejected` |
/// | [`NotSent`] (refused by one endpoint, worth sending elsewhere) | `not_sent` |
/// | hyper-util's connect error | `connect` |
/// | an `io::Error` | its kind: `connection_refused`, `connection_reset`, `timed_out`, … |
/// | [`TimedOut`] (a timeout layer's error) or tokio's `Elapsed` | `timeout` |
///
/// ```
/// use steadfast_core::error_type;
///
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// assert_eq!(error_type(&refused), "connection_refused");
/// assert_eq!(error_type(&std::fmt::Error), "_OTHER");
/// ```
pub fn error_type(err: &(dyn Error + 'static)) -> &'static str {
    for e in chain(err) {
        if e.is::<PolicyRejected>() {
            return "policy_rejected";
        }
        if e.is::<NotSent>() {
            return "not_sent";
        }
        #[cfg(feature = "hyper-util")]
        if let Some(e) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            if e.is_connect() {
                return "connect";
            }
        }
        if let Some(e) = e.downcast_ref::<io::Error>() {
            return io_kind(e.kind());
        }
        if e.is::<TimedOut>() || e.is::<tokio::time::error::Elapsed>() {
            return "timeout";
        }
    }
    "_OTHER"
}

fn io_kind(kind: io::ErrorKind) -> &'static str {
    use io::ErrorKind::*;
    match kind {
        ConnectionRefused => "connection_refused",
        ConnectionReset => "connection_reset",
        ConnectionAborted => "connection_aborted",
        NotConnected => "not_connected",
        AddrInUse => "addr_in_use",
        AddrNotAvailable => "addr_not_available",
        BrokenPipe => "broken_pipe",
        TimedOut => "timed_out",
        UnexpectedEof => "unexpected_eof",
        Interrupted => "interrupted",
        _ => "io",
    }
}

/// How many links of a `source()` chain are followed before giving up (a cyclic or absurdly
/// deep chain must not hang a classifier).
const MAX_CHAIN: usize = 32;

fn chain<'a>(err: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |e: &&'a (dyn Error + 'static)| (*e).source()).take(MAX_CHAIN)
}

/// Whether the error chain proves the request never left this process.
pub(crate) fn certainly_not_sent(err: &(dyn Error + 'static)) -> bool {
    chain(err).any(|e| {
        #[cfg(feature = "hyper-util")]
        if let Some(e) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            if e.is_connect() {
                return true;
            }
        }
        if let Some(e) = e.downcast_ref::<io::Error>() {
            return matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::AddrNotAvailable
            );
        }
        e.is::<PolicyRejected>() || e.is::<NotSent>()
    })
}

/// Marks an error as "certainly not sent, and worth sending elsewhere": put it in an error's
/// `source()` chain. Unlike [`PolicyRejected`], a retry layer retries such an error (for any
/// method, since nothing reached a server), and it counts as a failure.
///
/// The balancer uses it for a call that an endpoint's own breaker refused while other
/// endpoints can take it: the retry goes to one of them.
///
/// ```
/// use std::error::Error;
/// use steadfast_core::{Delivery, NotSent, classify_transport_error};
///
/// #[derive(Debug)]
/// struct Elsewhere;
/// impl std::fmt::Display for Elsewhere {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("try elsewhere") }
/// }
/// impl Error for Elsewhere {
///     fn source(&self) -> Option<&(dyn Error + 'static)> { Some(&NotSent::INSTANCE) }
/// }
/// let class = classify_transport_error(&Elsewhere);
/// assert!(class.is_retryable() && class.is_failure());
/// assert_eq!(class.delivery(), Delivery::NotSent);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotSent {
    _p: (),
}

impl NotSent {
    /// The marker value, for `source()` implementations.
    pub const INSTANCE: NotSent = NotSent { _p: () };

    /// Whether `err` or any of its sources is the marker.
    pub fn is_in(err: &(dyn Error + 'static)) -> bool {
        chain(err).any(|e| e.is::<NotSent>())
    }
}

impl fmt::Display for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not sent")
    }
}

impl Error for NotSent {}

/// The marker for "a time limit ran out": a timeout error puts it in its `source()` chain,
/// so code that knows no timeout type (metrics, spans, [`error_type`]) can still tell.
///
/// ```
/// use steadfast_core::{TimedOut, error_type};
///
/// #[derive(Debug)]
/// struct Late;
/// impl std::fmt::Display for Late {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("late") }
/// }
/// impl std::error::Error for Late {
///     fn source(&self) -> Option<&(dyn std::error::Error + 'static)> { Some(&TimedOut::INSTANCE) }
/// }
/// assert_eq!(error_type(&Late), "timeout");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut {
    _p: (),
}

impl TimedOut {
    /// The marker value, for `source()` implementations.
    pub const INSTANCE: TimedOut = TimedOut { _p: () };

    /// Whether `err` or any of its sources is the marker.
    pub fn is_in(err: &(dyn Error + 'static)) -> bool {
        chain(err).any(|e| e.is::<TimedOut>())
    }
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("timed out")
    }
}

impl Error for TimedOut {}

/// The marker for "rejected by local policy, do not retry".
///
/// A layer that refuses a call on purpose (the circuit breaker when open) returns an error whose
/// [`source`](Error::source) chain contains this marker. Classification then says the request
/// was not sent and is not a failure, and retry neither retries it nor charges its budget.
///
/// ```
/// use std::error::Error;
/// use steadfast_core::PolicyRejected;
///
/// #[derive(Debug)]
/// struct Shed;
/// impl std::fmt::Display for Shed {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("shed") }
/// }
/// impl Error for Shed {
///     fn source(&self) -> Option<&(dyn Error + 'static)> { Some(&PolicyRejected::INSTANCE) }
/// }
/// assert!(PolicyRejected::is_in(&Shed));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRejected {
    _p: (),
}

impl PolicyRejected {
    /// The marker value, for `source()` implementations.
    pub const INSTANCE: PolicyRejected = PolicyRejected { _p: () };

    /// Whether `err` or any of its sources is the marker.
    pub fn is_in(err: &(dyn Error + 'static)) -> bool {
        chain(err).any(|e| e.is::<PolicyRejected>())
    }
}

impl fmt::Display for PolicyRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("rejected by local policy")
    }
}

impl Error for PolicyRejected {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrap(Box<dyn Error + 'static>);
    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrap")
        }
    }
    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn io_kinds() {
        let refused = Wrap(Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)));
        let c = classify_transport_error(&refused);
        assert!(c.is_failure() && c.is_retryable());
        assert_eq!(c.delivery(), Delivery::NotSent);
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::TimedOut,
            io::ErrorKind::UnexpectedEof,
        ] {
            let e = Wrap(Box::new(io::Error::from(kind)));
            assert_eq!(
                classify_transport_error(&e).delivery(),
                Delivery::MaybeSent,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn policy_rejection_is_neither_failure_nor_retryable() {
        let e = Wrap(Box::new(PolicyRejected::INSTANCE));
        let c = classify_transport_error(&e);
        assert!(!c.is_failure() && !c.is_retryable());
        assert_eq!(c.delivery(), Delivery::NotSent);
    }

    #[test]
    fn deep_chains_are_bounded() {
        let mut e: Box<dyn Error + 'static> = Box::new(io::Error::other("leaf"));
        for _ in 0..1000 {
            e = Box::new(Wrap(e));
        }
        assert_eq!(
            classify_transport_error(&*e).delivery(),
            Delivery::MaybeSent
        );
    }

    /// A real hyper-util client against a port nobody listens on: "not sent".
    #[cfg(feature = "hyper-util")]
    #[tokio::test]
    async fn hyper_util_connect_refused_is_not_sent() {
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;
        // Bind then drop a listener to get a port that refuses connections.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let client: Client<_, http_body_util::Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let err = client
            .get(format!("http://127.0.0.1:{port}/").parse().unwrap())
            .await
            .unwrap_err();
        assert!(err.is_connect());
        assert_eq!(classify_transport_error(&err).delivery(), Delivery::NotSent);
    }

    /// A real server that accepts and closes the connection without answering: "maybe sent".
    #[cfg(feature = "hyper-util")]
    #[tokio::test]
    async fn hyper_util_closed_before_response_is_maybe_sent() {
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            // Read the request head, then hang up without a response.
            let _ = sock.read(&mut buf).await;
        });
        let client: Client<_, http_body_util::Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new())
                .retry_canceled_requests(false)
                .build_http();
        let err = client
            .get(format!("http://{addr}/").parse().unwrap())
            .await
            .unwrap_err();
        assert!(!err.is_connect());
        assert_eq!(
            classify_transport_error(&err).delivery(),
            Delivery::MaybeSent
        );
    }
}
