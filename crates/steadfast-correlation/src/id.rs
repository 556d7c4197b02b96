use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderValue;
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;

use crate::validate::is_valid_default;

tokio::task_local! {
    static CURRENT: CorrelationId;
}

/// A validated correlation id.
///
/// Cheap to clone (a reference-counted header value). Inside a handler behind the server
/// [`SetCorrelationIdLayer`](crate::SetCorrelationIdLayer), [`CorrelationId::current`] returns the
/// request's id, and client stacks with a
/// [`PropagateCorrelationIdLayer`](crate::PropagateCorrelationIdLayer) stamp it on outgoing calls.
///
/// # Message metadata
///
/// The id is plain ASCII, usable as broker message metadata:
///
/// ```
/// use steadfast_correlation::CorrelationId;
///
/// struct OrderPlaced { order: u64, correlation_id: String }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let id = CorrelationId::parse("req-42").unwrap();
/// let event = id.clone().scope(async {
///     // Anywhere in the handler: stamp the outgoing event with the ambient id.
///     let correlation_id = CorrelationId::current().map(|id| id.as_str().to_owned()).unwrap_or_default();
///     OrderPlaced { order: 7, correlation_id }
/// }).await;
/// assert_eq!(event.correlation_id, "req-42");
/// assert_eq!(id.as_bytes(), b"req-42"); // e.g. a Kafka / AMQP header value
/// # }
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CorrelationId(HeaderValue);

impl CorrelationId {
    /// Parses `s` with the default rule (1-128 bytes of `[A-Za-z0-9._:-]`); `None` otherwise.
    pub fn parse(s: &str) -> Option<Self> {
        if !is_valid_default(s.as_bytes()) {
            return None;
        }
        HeaderValue::from_str(s).ok().map(Self)
    }

    /// The id for a UUID the application made (a database key, an event id): its canonical
    /// form, 36 lower-case hex digits and hyphens.
    ///
    /// ```
    /// use steadfast_correlation::CorrelationId;
    ///
    /// let id = CorrelationId::from_uuid(0x0192_3c4f_a1b2_7c3d_8e4f_5a6b7c8d9e0f);
    /// assert_eq!(id.as_str(), "01923c4f-a1b2-7c3d-8e4f-5a6b7c8d9e0f");
    /// ```
    pub fn from_uuid(uuid: u128) -> Self {
        Self::from_validated(crate::generate::uuid_header(uuid))
    }

    /// The id for a UUID given as its 16 bytes (big-endian, as UUID crates store them:
    /// `uuid::Uuid::as_bytes`).
    pub fn from_uuid_bytes(bytes: [u8; 16]) -> Self {
        Self::from_uuid(u128::from_be_bytes(bytes))
    }

    /// Wraps a header value the caller has already validated. Used by generators and
    /// validators; the value must be visible ASCII.
    pub(crate) fn from_validated(value: HeaderValue) -> Self {
        Self(value)
    }

    /// The id as text (always ASCII).
    pub fn as_str(&self) -> &str {
        // Validated ids and generated ids are ASCII; `to_str` cannot fail for them.
        self.0.to_str().unwrap_or("")
    }

    /// The id as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The id as a header value (a cheap clone).
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    /// The correlation id of the request being handled, if any.
    pub fn current() -> Option<CorrelationId> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `fut` with this id ambient.
    pub fn scope<F: Future>(self, fut: F) -> WithCorrelationId<F> {
        WithCorrelationId {
            inner: CURRENT.scope(self, fut),
        }
    }

    /// Runs the synchronous `f` with this id ambient.
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }

    /// Carries the current id (if any) into `fut`, typically before `tokio::spawn`, since
    /// task-locals do not cross a spawn.
    ///
    /// ```
    /// use steadfast_correlation::CorrelationId;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let id = CorrelationId::parse("abc").unwrap();
    /// let seen = id.scope(async {
    ///     tokio::spawn(CorrelationId::propagate(async { CorrelationId::current() })).await.unwrap()
    /// }).await;
    /// assert_eq!(seen.unwrap().as_str(), "abc");
    /// # }
    /// ```
    pub fn propagate<F: Future>(fut: F) -> Propagated<F> {
        match Self::current() {
            Some(id) => Propagated {
                inner: Either::WithCorrelationId {
                    inner: CURRENT.scope(id, fut),
                },
            },
            None => Propagated {
                inner: Either::Plain { inner: fut },
            },
        }
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CorrelationId")
            .field(&self.as_str())
            .finish()
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<CorrelationId> for HeaderValue {
    fn from(id: CorrelationId) -> HeaderValue {
        id.0
    }
}

/// Parses with the default rule, with an error that says what is allowed (never the value).
///
/// ```
/// use steadfast_correlation::CorrelationId;
///
/// let id: CorrelationId = "order-7".parse().unwrap();
/// assert_eq!(id.as_str(), "order-7");
/// assert!("bad id\r\n".parse::<CorrelationId>().is_err());
/// assert!(CorrelationId::try_from(String::from("x".repeat(129))).is_err());
/// ```
impl std::str::FromStr for CorrelationId {
    type Err = crate::error::InvalidCorrelationId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or(crate::error::InvalidCorrelationId { len: s.len() })
    }
}

impl TryFrom<&str> for CorrelationId {
    type Error = crate::error::InvalidCorrelationId;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl TryFrom<String> for CorrelationId {
    type Error = crate::error::InvalidCorrelationId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// Takes a header value as the id when it passes the default rule, without copying it (a
/// header value read from a request or a message shares its buffer); the error says what is
/// allowed, never the value.
///
/// ```
/// use http::HeaderValue;
/// use steadfast_correlation::CorrelationId;
///
/// let id = CorrelationId::try_from(HeaderValue::from_static("order-7")).unwrap();
/// assert_eq!(id.as_str(), "order-7");
/// assert!(CorrelationId::try_from(HeaderValue::from_static("two words")).is_err());
/// assert!(CorrelationId::try_from(HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap()).is_err());
/// ```
impl TryFrom<HeaderValue> for CorrelationId {
    type Error = crate::error::InvalidCorrelationId;

    fn try_from(value: HeaderValue) -> Result<Self, Self::Error> {
        if is_valid_default(value.as_bytes()) {
            Ok(Self(value))
        } else {
            Err(crate::error::InvalidCorrelationId { len: value.len() })
        }
    }
}

impl AsRef<str> for CorrelationId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

pin_project! {
    /// A future with an ambient [`CorrelationId`]; see [`CorrelationId::scope`].
    pub struct WithCorrelationId<F> {
        #[pin]
        inner: TaskLocalFuture<CorrelationId, F>,
    }
}

impl<F> fmt::Debug for WithCorrelationId<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithCorrelationId").finish_non_exhaustive()
    }
}

impl<F> WithCorrelationId<F> {
    /// Takes the id back out once the future is done (so it can be moved, not cloned).
    pub(crate) fn take_id(self: Pin<&mut Self>) -> Option<CorrelationId> {
        self.project().inner.take_value()
    }
}

impl<F: Future> Future for WithCorrelationId<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

pin_project! {
    /// A future that carries the spawning task's id, if it had one; see
    /// [`CorrelationId::propagate`].
    pub struct Propagated<F> {
        #[pin]
        inner: Either<F>,
    }
}

pin_project! {
    #[project = EitherProj]
    enum Either<F> {
        WithCorrelationId { #[pin] inner: TaskLocalFuture<CorrelationId, F> },
        Plain { #[pin] inner: F },
    }
}

impl<F> fmt::Debug for Propagated<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Propagated").finish_non_exhaustive()
    }
}

impl<F: Future> Future for Propagated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project().inner.project() {
            EitherProj::WithCorrelationId { inner } => inner.poll(cx),
            EitherProj::Plain { inner } => inner.poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_value_is_taken_whole_when_valid() {
        let shared = bytes::Bytes::from(vec![b'a'; 128]);
        let value = HeaderValue::from_maybe_shared(shared.clone()).expect("a header value");
        let id = CorrelationId::try_from(value).expect("128 bytes of letters");
        // The same buffer: no copy.
        assert_eq!(id.as_bytes().as_ptr(), shared.as_ptr());

        let long = HeaderValue::from_bytes(&[b'a'; 129]).expect("a header value");
        let err = CorrelationId::try_from(long).expect_err("129 bytes");
        assert!(err.to_string().contains("129 bytes"), "{err}");
        for bad in [&b""[..], b"a b", b"a\tb", b"a/b", b"\xff"] {
            let value = HeaderValue::from_bytes(bad).expect("a header value");
            assert!(CorrelationId::try_from(value).is_err(), "{bad:?}");
        }
    }
}
