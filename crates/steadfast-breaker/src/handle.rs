use std::fmt;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::breaker::Breaker;
use std::time::Duration;

use crate::state::{BreakerState, FailureSummary, Transition, TransitionReason};
use crate::window::WindowCounts;

/// Observe and control one breaker.
///
/// Cheap to clone; every clone and every service made from the same layer value see the same
/// breaker.
///
/// ```
/// use steadfast_breaker::{CircuitBreakerLayer, BreakerState};
///
/// let layer = CircuitBreakerLayer::new();
/// let handle = layer.handle();
/// assert_eq!(handle.state(), BreakerState::Closed);
/// handle.force_open();
/// assert_eq!(handle.state(), BreakerState::ForcedOpen);
/// handle.close();
/// assert_eq!(handle.metrics().rejected, 0);
/// ```
pub struct BreakerHandle<C> {
    pub(crate) breaker: Arc<Breaker<C>>,
}

impl<C> Clone for BreakerHandle<C> {
    fn clone(&self) -> Self {
        Self {
            breaker: self.breaker.clone(),
        }
    }
}

impl<C> fmt::Debug for BreakerHandle<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerHandle")
            .field("state", &self.state())
            .finish()
    }
}

/// A snapshot of a breaker's counters.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Metrics {
    /// The current state.
    pub state: BreakerState,
    /// The current generation (one per transition).
    pub generation: u64,
    /// Calls admitted since creation.
    pub calls: u64,
    /// Admitted calls that failed.
    pub failures: u64,
    /// Admitted calls slower than the slow-call threshold.
    pub slow: u64,
    /// Calls rejected without reaching the inner service.
    pub rejected: u64,
    /// Failures in a row in the current generation (what the consecutive-failure rule
    /// compares with its threshold).
    pub consecutive_failures: u32,
    /// The sliding window's counts, when a rate window is configured.
    pub window: Option<WindowCounts>,
    /// The calls a window needs before its rates count (`min_calls`).
    pub min_calls: u32,
}

/// A window's rate as resilience4j reports it: a percentage only once the window holds the
/// calls its rules need.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WindowRate {
    /// No rate window is configured.
    NoWindow,
    /// Fewer calls than `min_calls` so far: no rate yet (not 0 %).
    NotEnoughCalls {
        /// Calls in the window.
        calls: u64,
        /// Calls needed.
        needed: u32,
    },
    /// The rate, in percent.
    Percent(f64),
}

impl Metrics {
    /// Failure rate over the sliding window (percent), when one is configured, whatever the
    /// number of calls (0 for an empty window); see [`failure_rate`](Self::failure_rate).
    pub fn window_failure_rate(&self) -> Option<f64> {
        self.window.map(|w| w.failure_rate())
    }

    /// The window's failure rate, or why there is none yet.
    ///
    /// ```
    /// use steadfast_breaker::{CircuitBreakerLayer, WindowRate};
    ///
    /// let layer = CircuitBreakerLayer::builder().count_window(20).min_calls(10).failure_rate(50).build().unwrap();
    /// assert_eq!(
    ///     layer.handle().metrics().failure_rate(),
    ///     WindowRate::NotEnoughCalls { calls: 0, needed: 10 }
    /// );
    /// ```
    pub fn failure_rate(&self) -> WindowRate {
        self.rate(WindowCounts::failure_rate)
    }

    /// The window's slow-call rate, or why there is none yet.
    pub fn slow_call_rate(&self) -> WindowRate {
        self.rate(WindowCounts::slow_rate)
    }

    fn rate(&self, of: fn(&WindowCounts) -> f64) -> WindowRate {
        match self.window {
            None => WindowRate::NoWindow,
            Some(w) if w.calls < u64::from(self.min_calls.max(1)) => WindowRate::NotEnoughCalls {
                calls: w.calls,
                needed: self.min_calls.max(1),
            },
            Some(w) => WindowRate::Percent(of(&w)),
        }
    }
}

impl<C> BreakerHandle<C> {
    /// The state in force now. An Open breaker whose open time has passed reports
    /// `HalfOpen`: the next call is a probe, though the breaker moves (and announces the
    /// transition) only when that call arrives. No timer runs for an open breaker.
    pub fn state(&self) -> BreakerState {
        self.breaker.shared.state_in_force()
    }

    /// The name of the layer the breaker belongs to (`"default"` unless named).
    pub fn name(&self) -> &str {
        &self.breaker.shared.meta.breaker
    }

    /// What the breaker guards: its key's name for a per-key breaker, the layer's name for
    /// a plain one.
    pub fn upstream(&self) -> &str {
        &self.breaker.shared.meta.upstream
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> Metrics {
        let [calls, failures, slow, rejected] = self.breaker.totals();
        let shared = &self.breaker.shared;
        let word = shared.word();
        Metrics {
            state: shared.in_force(word),
            generation: word >> 3,
            calls,
            failures,
            slow,
            rejected,
            consecutive_failures: shared.consecutive_failures(word),
            window: shared.window_counts(),
            min_calls: shared.policy.min_calls,
        }
    }

    /// Rejects every call until [`close`](Self::close) or another manual transition.
    pub fn force_open(&self) {
        self.breaker.shared.force(BreakerState::ForcedOpen);
    }

    /// Opens the breaker for `d`, after which it half-opens as after a trip (unlike
    /// [`force_open`](Self::force_open), it recovers by itself). From any state; an open
    /// breaker gets the new open time.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// use steadfast_breaker::{BreakerState, CircuitBreakerLayer};
    ///
    /// let handle = CircuitBreakerLayer::new().handle();
    /// handle.open_for(Duration::from_secs(10)); // a deploy window
    /// assert_eq!(handle.state(), BreakerState::Open);
    /// tokio::time::advance(Duration::from_secs(10)).await;
    /// assert_eq!(handle.state(), BreakerState::HalfOpen);
    /// # }
    /// ```
    pub fn open_for(&self, d: Duration) {
        self.breaker.shared.force_with(BreakerState::Open, d);
    }

    /// Opens the breaker until `until` (tokio time); see [`open_for`](Self::open_for). An
    /// instant already past half-opens it at once.
    pub fn open_until(&self, until: tokio::time::Instant) {
        let d = until.saturating_duration_since(tokio::time::Instant::now());
        if d.is_zero() {
            self.half_open_now();
        } else {
            self.open_for(d);
        }
    }

    /// Half-opens the breaker now, from any state: the next calls are probes (the half-open
    /// probe count and verdict wait apply).
    ///
    /// ```
    /// use steadfast_breaker::{BreakerState, CircuitBreakerLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let handle = CircuitBreakerLayer::new().handle();
    /// handle.force_open();
    /// handle.half_open_now(); // try the upstream again now
    /// assert_eq!(handle.state(), BreakerState::HalfOpen);
    /// # }
    /// ```
    pub fn half_open_now(&self) {
        self.breaker.shared.force(BreakerState::HalfOpen);
    }

    /// Why the breaker last opened (the rule that tripped it, or `Manual`); `None` if it
    /// never did.
    ///
    /// ```
    /// use steadfast_breaker::{CircuitBreakerLayer, TransitionReason};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let handle = CircuitBreakerLayer::new().handle();
    /// assert_eq!(handle.trip_reason(), None);
    /// handle.open_for(std::time::Duration::from_secs(1));
    /// assert_eq!(handle.trip_reason(), Some(TransitionReason::Manual));
    /// # }
    /// ```
    pub fn trip_reason(&self) -> Option<TransitionReason> {
        self.breaker.shared.trip_reason()
    }

    /// The last failure the breaker counted, in brief (`HTTP 503`, `timeout`, ...).
    pub fn last_failure(&self) -> Option<FailureSummary> {
        self.breaker.shared.last_failure()
    }

    /// Closes the breaker and clears its counts (the window, the consecutive count and the
    /// trip count), from any state: a Closed breaker is reset too, and subscribers see a
    /// Closed -> Closed transition. Outcomes of calls still in flight no longer count, and
    /// [`trip_reason`](Self::trip_reason) and [`last_failure`](Self::last_failure) are
    /// forgotten.
    pub fn close(&self) {
        self.breaker.shared.force(BreakerState::Closed);
    }

    /// The same as [`close`](Self::close): back to Closed with every count cleared, from any
    /// state (resilience4j's `reset`).
    pub fn reset(&self) {
        self.close();
    }

    /// Lets every call through and stops counting towards trips.
    pub fn disable(&self) {
        self.breaker.shared.force(BreakerState::Disabled);
    }

    /// Lets every call through but keeps recording window metrics (a dry run).
    pub fn metrics_only(&self) {
        self.breaker.shared.force(BreakerState::MetricsOnly);
    }

    /// Subscribes to state transitions.
    pub fn subscribe(&self) -> Transitions {
        Transitions(self.breaker.shared.subscribe())
    }
}

/// Every key's [`Transition`]s, each with its key; see
/// [`KeyedCircuitBreakerLayer::subscribe_all`](crate::KeyedCircuitBreakerLayer::subscribe_all).
#[derive(Debug)]
pub struct KeyedTransitions<Key>(pub(crate) broadcast::Receiver<(Key, Transition)>);

impl<Key: Clone> KeyedTransitions<Key> {
    /// The next transition of any key; `None` once the layer is gone. A subscriber that falls
    /// more than 256 transitions behind skips the oldest.
    pub async fn recv(&mut self) -> Option<(Key, Transition)> {
        loop {
            match self.0.recv().await {
                Ok(t) => return Some(t),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next transition if one is waiting.
    pub fn try_recv(&mut self) -> Option<(Key, Transition)> {
        loop {
            match self.0.try_recv() {
                Ok(t) => return Some(t),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}

/// A stream of a breaker's [`Transition`]s; see [`BreakerHandle::subscribe`].
#[derive(Debug)]
pub struct Transitions(broadcast::Receiver<Transition>);

impl Transitions {
    /// The next transition; `None` once the breaker is gone. A subscriber that falls more than
    /// 64 transitions behind skips the oldest.
    pub async fn recv(&mut self) -> Option<Transition> {
        loop {
            match self.0.recv().await {
                Ok(t) => return Some(t),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next transition if one is waiting.
    pub fn try_recv(&mut self) -> Option<Transition> {
        loop {
            match self.0.try_recv() {
                Ok(t) => return Some(t),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}
