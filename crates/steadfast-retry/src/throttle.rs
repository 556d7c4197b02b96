//! gRPC A6's retry throttling: a token bucket shared by the calls of one layer.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

/// gRPC A6's `retryThrottling` settings; see
/// [`RetryBuilder::grpc_throttling`](crate::RetryBuilder::grpc_throttling).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ThrottleConfig {
    /// The bucket's size (A6: 1-1000). It starts full.
    pub max_tokens: u32,
    /// What each success puts back (A6: > 0, three decimals).
    pub token_ratio: f64,
}

/// The bucket, in thousandths of a token.
#[derive(Debug)]
pub(crate) struct Throttle {
    milli: AtomicU64,
    max: u64,
    ratio: u64,
}

impl Throttle {
    pub(crate) fn new(c: ThrottleConfig) -> Self {
        let max = u64::from(c.max_tokens) * 1000;
        Self {
            milli: AtomicU64::new(max),
            max,
            ratio: (c.token_ratio * 1000.0).round() as u64,
        }
    }

    /// An attempt failed (a status the policy would retry, or a transport error).
    pub(crate) fn failed(&self) {
        let _ = self
            .milli
            .fetch_update(Relaxed, Relaxed, |t| Some(t.saturating_sub(1000)));
    }

    /// An attempt succeeded.
    pub(crate) fn succeeded(&self) {
        let (max, ratio) = (self.max, self.ratio);
        let _ = self.milli.fetch_update(Relaxed, Relaxed, |t| {
            (t < max).then(|| t.saturating_add(ratio).min(max))
        });
    }

    /// Whether a retry may be sent: more than half the tokens are left.
    pub(crate) fn allows(&self) -> bool {
        self.milli.load(Relaxed) > self.max / 2
    }

    pub(crate) fn tokens(&self) -> f64 {
        self.milli.load(Relaxed) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A6's arithmetic: 10 tokens; each failure takes 1, each success gives 0.1; retries
    /// stop once 5 or fewer are left.
    #[test]
    fn follows_a6() {
        let t = Throttle::new(ThrottleConfig {
            max_tokens: 10,
            token_ratio: 0.1,
        });
        for left in (6..10).rev() {
            t.failed();
            assert_eq!(t.tokens(), f64::from(left));
            assert!(t.allows());
        }
        t.failed();
        assert_eq!(t.tokens(), 5.0);
        assert!(!t.allows(), "5 of 10 is not more than half");
        for _ in 0..10 {
            t.failed();
        }
        assert_eq!(t.tokens(), 0.0, "never below zero");
        for _ in 0..51 {
            t.succeeded();
        }
        assert!((t.tokens() - 5.1).abs() < 1e-9);
        assert!(t.allows());
        for _ in 0..1000 {
            t.succeeded();
        }
        assert_eq!(t.tokens(), 10.0, "never above the size");
    }
}
