//! Model-based test: random sequences of outcomes and time advances, checked against a small
//! reference model of the windows and the state machine (paused time, jitter 0).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response};
use proptest::prelude::*;
use steadfast_breaker::error::BreakerOpen;
use steadfast_breaker::{BreakerState, CircuitBreakerLayer};
use tower::{Layer, Service, ServiceExt, service_fn};

#[derive(Clone, Copy, Debug)]
enum Op {
    Call { fail: bool },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<bool>().prop_map(|fail| Op::Call { fail }),
        1 => (0u64..40_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

#[derive(Debug)]
struct Model {
    consecutive_limit: Option<u32>,
    window: Option<(usize, u32, u8)>, // size, min calls, rate
    base: u64,
    max: u64,
    state: BreakerState,
    consecutive: u32,
    outcomes: VecDeque<bool>,
    open_until: u64,
    trips: u32,
    now: u64,
}

impl Model {
    fn open_ms(&self) -> u64 {
        (self.base << self.trips.min(20)).min(self.max)
    }

    fn trip(&mut self) {
        self.open_until = self.now + self.open_ms();
        self.trips += 1;
        self.state = BreakerState::Open;
    }

    /// Returns whether the call was admitted.
    fn call(&mut self, fail: bool) -> bool {
        match self.state {
            BreakerState::Open if self.now < self.open_until => false,
            BreakerState::Open | BreakerState::HalfOpen => {
                // Sequential calls: the probe's verdict is immediate.
                if fail {
                    self.trip();
                } else {
                    self.state = BreakerState::Closed;
                    self.consecutive = 0;
                    self.outcomes.clear();
                    self.trips = 0;
                }
                true
            }
            _ => {
                let mut trip = false;
                if let Some(k) = self.consecutive_limit {
                    if fail {
                        self.consecutive += 1;
                        trip |= self.consecutive >= k;
                    } else {
                        self.consecutive = 0;
                    }
                }
                if let Some((size, min, rate)) = self.window {
                    self.outcomes.push_back(fail);
                    if self.outcomes.len() > size {
                        self.outcomes.pop_front();
                    }
                    let calls = self.outcomes.len() as u64;
                    let failures = self.outcomes.iter().filter(|f| **f).count() as u64;
                    trip |= calls >= u64::from(min) && failures * 100 >= u64::from(rate) * calls;
                }
                if trip {
                    self.trip();
                }
                true
            }
        }
    }
}

fn run(
    consecutive: Option<u32>,
    window: Option<(u32, u32, u8)>,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut b = CircuitBreakerLayer::builder()
            .consecutive_failures(consecutive)
            .open_time(Duration::from_secs(10))
            .max_open_time(Duration::from_secs(60))
            .jitter_percent(0);
        if let Some((size, min, rate)) = window {
            b = b.count_window(size).min_calls(min).failure_rate(rate);
        }
        let layer = b.build().unwrap();
        let handle = layer.handle();
        let fail = Arc::new(AtomicBool::new(false));
        let f = fail.clone();
        let mut svc = layer.layer(service_fn(move |_req: Request<()>| {
            let status = if f.load(Ordering::SeqCst) { 500 } else { 200 };
            async move { Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap()) }
        }));
        let mut model = Model {
            consecutive_limit: consecutive,
            // The documented clamp: a minimum above a count window's size is the size.
            window: window.map(|(s, m, r)| (s as usize, m.min(s), r)),
            base: 10_000,
            max: 60_000,
            state: BreakerState::Closed,
            consecutive: 0,
            outcomes: VecDeque::new(),
            open_until: 0,
            trips: 0,
            now: 0,
        };
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Advance { ms } => {
                    tokio::time::advance(Duration::from_millis(ms)).await;
                    model.now += ms;
                }
                Op::Call { fail: f } => {
                    fail.store(f, Ordering::SeqCst);
                    let expected = model.call(f);
                    let r = svc.ready().await.unwrap().call(Request::new(())).await;
                    let admitted = match r {
                        Ok(_) => true,
                        Err(e) => {
                            let open = e
                                .downcast_ref::<BreakerOpen>()
                                .expect("only rejections fail");
                            let left = open.retry_after().unwrap();
                            prop_assert_eq!(
                                left,
                                Duration::from_millis(model.open_until - model.now),
                                "op {}",
                                i
                            );
                            false
                        }
                    };
                    prop_assert_eq!(admitted, expected, "op {}: {:?}", i, op);
                }
            }
            // The breaker half-opens lazily on the next admission, as the model does; the
            // handle reports the state in force (an Open breaker past its open time would
            // admit a probe: HalfOpen).
            let in_force = match model.state {
                BreakerState::Open if model.now >= model.open_until => BreakerState::HalfOpen,
                s => s,
            };
            prop_assert_eq!(handle.state(), in_force, "op {}: {:?}", i, op);
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn consecutive_policy_matches_model(k in 1u32..6, ops in proptest::collection::vec(op(), 1..120)) {
        run(Some(k), None, ops)?;
    }

    #[test]
    fn window_policy_matches_model(size in 1u32..20, min in 1u32..10, rate in 1u8..=100, ops in proptest::collection::vec(op(), 1..160)) {
        run(None, Some((size, min, rate)), ops)?;
    }

    #[test]
    fn combined_policies_match_model(k in 1u32..6, size in 1u32..20, rate in 1u8..=100, ops in proptest::collection::vec(op(), 1..160)) {
        run(Some(k), Some((size, 1, rate)), ops)?;
    }
}
