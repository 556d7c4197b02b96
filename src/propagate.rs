//! Carrying the ambient request context into spawned tasks.

use std::future::Future;

/// Wraps `fut` so it keeps the current task's ambient context — the
/// [`Deadline`](crate::common::Deadline) and (with the `correlation` feature) the
/// `CorrelationId` — when spawned. Task-locals do not cross `tokio::spawn` on their own.
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
    let fut = crate::correlation::CorrelationId::propagate(fut);
    crate::common::Deadline::propagate(fut)
}
