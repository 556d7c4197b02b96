//! Carrying the ambient request context into spawned tasks.

use std::future::Future;

use tracing::Instrument;

/// Wraps `fut` so it keeps the current task's ambient context when spawned: the
/// [`Deadline`](crate::common::Deadline), the current `tracing` span (log lines and the
/// calls' attempt spans stay under the request's span) and, with the `correlation` feature,
/// the `CorrelationId` and the W3C `TraceContext`. Task-locals do not cross `tokio::spawn` on
/// their own: without this, a spawned task's calls get a fresh correlation id, no deadline
/// and no trace, and its log lines lose the request's span.
///
/// In a handler the deadline is the handler's: the caller's, or the server's own limit if it
/// is sooner. Work meant to outlive the answer (a producer that feeds a streamed body after
/// the limit) should carry the id alone, `tokio::spawn(CorrelationId::propagate(fut))`, or
/// be driven by the body's own stream, whose frames are produced in the request's id and the
/// caller's deadline only.
///
/// ```
/// use std::time::Duration;
/// use steadfast::common::Deadline;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let d = Deadline::after(Duration::from_secs(3));
/// let seen = d
///     .scope(async { tokio::spawn(steadfast::propagate(async { Deadline::current() })).await.unwrap() })
///     .await;
/// assert_eq!(seen, Some(d));
/// # }
/// ```
pub fn propagate<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    #[cfg(feature = "correlation")]
    let fut = crate::correlation::TraceContext::propagate(
        crate::correlation::CorrelationId::propagate(fut),
    );
    crate::common::Deadline::propagate(fut).in_current_span()
}

/// `tokio::spawn` of [`propagate`]`(fut)`: the spawned task keeps the request's deadline,
/// span, correlation id and trace context.
///
/// ```
/// use steadfast::correlation::CorrelationId;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let id = CorrelationId::parse("order-7").unwrap();
/// let seen = id
///     .scope(async { steadfast::spawn(async { CorrelationId::current() }).await.unwrap() })
///     .await;
/// assert_eq!(seen.unwrap().as_str(), "order-7");
/// # }
/// ```
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(propagate(fut))
}
