//! The peers, wrapped as thinly as their APIs allow, with the same policies as ours where
//! they can express them (5 consecutive failures, 30 s open; 3 attempts; 5 s timeout).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::Service;

/// An error every contender treats as a failure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Boom;

impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("boom")
    }
}

impl std::error::Error for Boom {}

/// A service whose every call fails (trips breakers into Open).
#[derive(Clone, Copy, Debug, Default)]
pub struct Failing;

impl<R> Service<http::Request<R>> for Failing {
    type Response = http::Response<()>;
    type Error = Boom;
    type Future = std::future::Ready<Result<http::Response<()>, Boom>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Boom>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<R>) -> Self::Future {
        std::future::ready(Err(Boom))
    }
}

/// Fails every other call (shared across clones): one retry per request.
#[derive(Clone, Debug, Default)]
pub struct FailEveryOther(Arc<std::sync::atomic::AtomicU64>);

impl<R> Service<http::Request<R>> for FailEveryOther {
    type Response = http::Response<()>;
    type Error = Boom;
    type Future = std::future::Ready<Result<http::Response<()>, Boom>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Boom>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<R>) -> Self::Future {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::future::ready(if n % 2 == 0 {
            Err(Boom)
        } else {
            Ok(http::Response::new(()))
        })
    }
}

/// tower's retry policy with its own budget (`TpsBudget`, tower's defaults), 3 attempts.
#[derive(Clone, Debug)]
pub struct TowerPolicy {
    budget: Option<Arc<tower::retry::budget::TpsBudget>>,
    left: usize,
}

impl TowerPolicy {
    /// 3 attempts; `budget` on or off.
    pub fn new(budget: bool) -> Self {
        Self {
            budget: budget.then(|| {
                Arc::new(tower::retry::budget::TpsBudget::new(
                    Duration::from_secs(10),
                    10,
                    0.2,
                ))
            }),
            left: 2,
        }
    }
}

impl<B: Clone, R, E> tower::retry::Policy<http::Request<B>, http::Response<R>, E> for TowerPolicy {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut http::Request<B>,
        result: &mut Result<http::Response<R>, E>,
    ) -> Option<Self::Future> {
        use tower::retry::budget::Budget;
        match result {
            Ok(_) => {
                if let Some(b) = &self.budget {
                    b.deposit();
                }
                None
            }
            Err(_) => {
                if self.left == 0 || self.budget.as_ref().is_some_and(|b| !b.withdraw()) {
                    return None;
                }
                self.left -= 1;
                Some(std::future::ready(()))
            }
        }
    }

    fn clone_request(&mut self, req: &http::Request<B>) -> Option<http::Request<B>> {
        Some(req.clone())
    }
}

/// tower-resilience's circuit breaker layer: 5 consecutive failures, 30 s open.
pub fn tr_breaker_layer(
    open_for: Duration,
) -> tower_resilience::circuitbreaker::CircuitBreakerLayer<
    tower_resilience::circuitbreaker::DefaultClassifier,
> {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .consecutive_failures(5)
        .wait_duration_in_open(open_for)
        .build()
        .expect("valid circuit breaker config")
}

/// failsafe's breaker: 5 consecutive failures, constant 30 s.
pub type FsBreaker = failsafe::StateMachine<
    failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::Constant>,
    (),
>;

/// A failsafe breaker.
pub fn fs_breaker(open_for: Duration) -> FsBreaker {
    let policy =
        failsafe::failure_policy::consecutive_failures(5, failsafe::backoff::constant(open_for));
    failsafe::Config::new().failure_policy(policy).build()
}

/// failsafe's futures API wrapped minimally as a tower service.
#[derive(Clone, Debug)]
pub struct Failsafe<S> {
    inner: S,
    breaker: FsBreaker,
}

impl<S> Failsafe<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, breaker: FsBreaker) -> Self {
        Self { inner, breaker }
    }
}

impl<S, R> Service<http::Request<R>> for Failsafe<S>
where
    S: Service<http::Request<R>>,
{
    type Response = S::Response;
    type Error = failsafe::Error<S::Error>;
    type Future = failsafe::futures::ResponseFuture<
        S::Future,
        failsafe::failure_policy::ConsecutiveFailures<failsafe::backoff::Constant>,
        (),
        failsafe::Any,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(failsafe::Error::Inner)
    }

    fn call(&mut self, req: http::Request<R>) -> Self::Future {
        let fut = self.inner.call(req);
        failsafe::futures::CircuitBreaker::call(&self.breaker, fut)
    }
}

/// tower's hedge policy for any request whose body is `Clone`: every request may be hedged.
#[derive(Clone, Copy, Debug)]
pub struct TowerHedgePolicy;

impl<B: Clone> tower::hedge::Policy<http::Request<B>> for TowerHedgePolicy {
    fn clone_request(&self, req: &http::Request<B>) -> Option<http::Request<B>> {
        Some(req.clone())
    }

    fn can_retry(&self, _req: &http::Request<B>) -> bool {
        true
    }
}
