//! Loom models of the state machine's atomic transitions.
//!
//! Loom runs each model once for every interleaving of the atomic operations that the
//! threads make (within a preemption bound where one is set), and lets each load see any
//! value the memory orderings allow, so an assertion here holds for all of them, not only for
//! the ones a stress test happens to hit.
//!
//! Run them, in release mode, with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p steadfast-breaker --lib --release loom_model
//! ```
//!
//! Only these tests work in that build: the other unit tests touch loom atomics outside a
//! loom model, which panics.
//!
//! Loom needs every execution of a model to make the same choices when the scheduler makes
//! the same choices, so no branch may depend on real time. Each model's breaker has its clock
//! base a year in the future: `Shared::now` then reads zero for the whole model, an open time
//! of zero has always passed, an open time of an hour never has, and a HalfOpen verdict
//! deadline, which always lies after zero, is never reached.

use std::time::Duration;

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use loom::thread;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::*;
use crate::window::CountWindow;

const HOUR: Duration = Duration::from_secs(3600);

fn policy(consecutive: u32, probes: u32, open_time: Duration) -> Policy {
    Policy {
        consecutive: Some(consecutive),
        window: None,
        min_calls: 1,
        failure_rate: None,
        slow: None,
        open_time,
        max_open_time: open_time.max(HOUR),
        open_time_fn: crate::state::OpenTime::Exponential { factor: 2.0 },
        max_half_open_wait: None,
        auto_half_open: false,
        jitter_percent: 0,
        probes,
        seed: 0,
    }
}

/// A breaker whose clock reads zero for as long as the model runs.
fn frozen(policy: Policy) -> Shared {
    let mut shared = Shared::new(std::sync::Arc::new(policy), Meta::default());
    shared.base = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    assert_eq!(shared.now(), 0);
    shared
}

/// A call admitted as a normal call (the breaker must be Closed).
fn pass(shared: &Shared) -> Permit {
    let permit = shared.admit().expect("a closed breaker admits");
    assert!(matches!(permit, Permit::Pass(_)), "{permit:?}");
    permit
}

/// Two threads report a failure for calls admitted with `permit`, at the same time.
fn fail_twice_at_once(shared: &Arc<Shared>, permit: Permit) {
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let shared = shared.clone();
            thread::spawn(move || shared.on_outcome(permit, true, false, None))
        })
        .collect();
    for c in calls {
        c.join().unwrap();
    }
}

/// A call admitted as a probe (the breaker must be due for one).
fn probe(shared: &Shared) -> Permit {
    let permit = shared.admit().expect("a probe is due");
    assert!(matches!(permit, Permit::Probe(_)), "{permit:?}");
    permit
}

/// A breaker tripped by one failure with an open time of zero: Open (generation 1), and the
/// next `admit` moves it to HalfOpen.
fn open_and_due(probes: u32) -> Shared {
    let shared = frozen(policy(1, probes, Duration::ZERO));
    shared.on_outcome(pass(&shared), true, false, None);
    assert_eq!(
        (shared.state(), shared.generation()),
        (BreakerState::Open, 1)
    );
    shared
}

/// Probes taken in the current HalfOpen generation.
fn taken(shared: &Shared) -> u16 {
    let (g, taken, _) = unpack(shared.cold.half.load(SeqCst));
    if g == shared.generation() as u32 {
        taken
    } else {
        0
    }
}

/// Every transition announced so far, as (from, to, generation).
fn announced(rx: &mut broadcast::Receiver<Transition>) -> Vec<(BreakerState, BreakerState, u64)> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .map(|t| (t.from, t.to, t.generation))
        .collect()
}

/// One call that asks for admission; if it gets a probe, it holds it (counted in `out`) and
/// then drops it without a verdict. Returns whether it got a probe.
fn probe_and_drop(shared: &Shared, out: &AtomicUsize, probes: u32) -> bool {
    match shared.admit() {
        Ok(Permit::Probe(w)) => {
            let holding = out.fetch_add(1, SeqCst) + 1;
            assert!(
                holding <= probes as usize,
                "{holding} probes out at once, {probes} allowed"
            );
            out.fetch_sub(1, SeqCst);
            shared.return_probe(w);
            true
        }
        Ok(pass @ Permit::Pass(_)) => panic!("a HalfOpen breaker admitted {pass:?}"),
        Err(_) => false,
    }
}

/// Calls race `admit` on a breaker whose open time has passed: two calls with one probe
/// allowed, three calls with two. One of them moves the breaker to HalfOpen (exactly one
/// transition), never more than N probes are out at once, and once every call has dropped
/// its probe all permits are back.
#[test]
fn half_open_admits_at_most_n_probes() {
    // Three calls with two probes explore every schedule with at most two preemptions (a few
    // seconds); without the bound loom needs minutes.
    for (probes, calls, bound) in [(1, 2, None), (2, 3, Some(2))] {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = bound.or(model.preemption_bound);
        model.check(move || {
            let shared = Arc::new(open_and_due(probes));
            let out = Arc::new(AtomicUsize::new(0));
            let calls: Vec<_> = (0..calls)
                .map(|_| {
                    let (shared, out) = (shared.clone(), out.clone());
                    thread::spawn(move || probe_and_drop(&shared, &out, probes))
                })
                .collect();
            let admitted = calls
                .into_iter()
                .map(|c| c.join().unwrap())
                .filter(|&got| got)
                .count();
            assert!(admitted >= 1, "the first probe is always admitted");
            assert_eq!(
                (shared.state(), shared.generation()),
                (BreakerState::HalfOpen, 2)
            );
            assert_eq!(taken(&shared), 0, "a permit was lost");
            probe(&shared);
        });
    }
}

/// With one probe allowed, two calls that each keep asking until they get a probe both get
/// one: a probe dropped without a verdict hands its permit to the next call. A lost permit
/// would leave one call asking forever, which loom reports as a model that does not end.
#[test]
fn a_dropped_probe_lets_another_call_probe() {
    loom::model(|| {
        let shared = Arc::new(open_and_due(1));
        let out = Arc::new(AtomicUsize::new(0));
        let calls: Vec<_> = (0..2)
            .map(|_| {
                let (shared, out) = (shared.clone(), out.clone());
                thread::spawn(move || {
                    while !probe_and_drop(&shared, &out, 1) {
                        thread::yield_now();
                    }
                })
            })
            .collect();
        for c in calls {
            c.join().unwrap();
        }
        assert_eq!(taken(&shared), 0, "a permit was lost");
        assert_eq!(
            (shared.state(), shared.generation()),
            (BreakerState::HalfOpen, 2)
        );
    });
}

/// Two failures admitted in one Closed generation race to trip the breaker, with a
/// consecutive threshold of one (both call `trip`) and of two (the counter must see both).
/// Exactly one Closed -> Open transition happens and is announced, and the breaker stays
/// Open for its open time.
#[test]
fn concurrent_failures_trip_once() {
    for threshold in [1, 2] {
        loom::model(move || {
            let shared = Arc::new(frozen(policy(threshold, 1, HOUR)));
            let mut rx = shared.subscribe();
            let permit = pass(&shared);
            fail_twice_at_once(&shared, permit);
            assert_eq!(
                (shared.state(), shared.generation()),
                (BreakerState::Open, 1)
            );
            assert_eq!(
                announced(&mut rx),
                [(BreakerState::Closed, BreakerState::Open, 1)]
            );
            assert_eq!(shared.cold.trips.load(SeqCst), 1, "one trip counted");
            assert!(shared.admit().is_err(), "open for an hour");
        });
    }
}

/// A probe's success closes the breaker while two stale outcomes arrive: a failure of a call
/// admitted while the breaker was Closed, before it tripped, and a failure of a probe from
/// an earlier HalfOpen generation. Neither may decide the current state (pinned semantics
/// 4): the probe's success closes the breaker and nothing else happens.
#[test]
fn stale_outcomes_do_not_decide_a_probe_verdict() {
    loom::model(|| {
        let shared = Arc::new(frozen(policy(1, 1, Duration::ZERO)));
        // Admitted while Closed (generation 0); the breaker trips before it reports.
        let closed_call = pass(&shared);
        shared.on_outcome(pass(&shared), true, false, None);
        // Generation 2: HalfOpen, its probe still out when the breaker is forced Open.
        let old_probe = probe(&shared);
        shared.force(BreakerState::Open);
        // Generation 4: HalfOpen with the probe that decides.
        let current = probe(&shared);
        assert_eq!(
            (shared.state(), shared.generation()),
            (BreakerState::HalfOpen, 4)
        );
        let mut rx = shared.subscribe();

        let verdict = {
            let shared = shared.clone();
            thread::spawn(move || shared.on_outcome(current, false, false, None))
        };
        let stale: Vec<_> = [closed_call, old_probe]
            .into_iter()
            .map(|permit| {
                let shared = shared.clone();
                thread::spawn(move || shared.on_outcome(permit, true, false, None))
            })
            .collect();
        verdict.join().unwrap();
        for s in stale {
            s.join().unwrap();
        }
        assert_eq!(
            (shared.state(), shared.generation()),
            (BreakerState::Closed, 5)
        );
        assert_eq!(
            announced(&mut rx),
            [(BreakerState::HalfOpen, BreakerState::Closed, 5)]
        );
        let w = shared.word.load(SeqCst);
        assert_eq!(shared.consecutive_failures(w), 0, "a stale failure counted");
        assert_eq!(shared.cold.trips.load(SeqCst), 0);
    });
}

/// Two calls record into a count window of size one that already holds a success, so both
/// replace the same slot. Once they are done the totals describe exactly what the slot
/// holds: one call, and a failure or slow call only if the last writer's call was one.
#[test]
fn count_window_totals_are_exact() {
    loom::model(|| {
        let window = Arc::new(CountWindow::new(1));
        window.record(false, false);
        let calls: Vec<_> = [(true, false), (false, true)]
            .into_iter()
            .map(|(failure, slow)| {
                let window = window.clone();
                thread::spawn(move || window.record(failure, slow))
            })
            .collect();
        for c in calls {
            c.join().unwrap();
        }
        let c = window.counts();
        assert_eq!(c.calls, 1);
        assert!(
            (c.failures, c.slow) == (1, 0) || (c.failures, c.slow) == (0, 1),
            "totals drifted from the window: {c:?}"
        );
    });
}

// Races these models found, now fixed: each failed before its fix (kept as regressions).

/// Two failures race to trip a Closed breaker; the winner announces an open time of an hour.
/// The loser computed its own open time after the winner had counted its trip (so doubled);
/// before the fix it then overwrote `open_until` and the breaker stayed open for two hours,
/// not the one it announced. Now only the winner writes the schedule. With jitter or a server hint on either failure the two values differ too,
/// so a failure without a hint can cut short the open time a hinted failure asked for.
#[test]
fn a_losing_trip_leaves_the_open_time_alone() {
    loom::model(|| {
        let mut p = policy(1, 1, HOUR);
        p.max_open_time = 4 * HOUR;
        let shared = Arc::new(frozen(p));
        let mut rx = shared.subscribe();
        let permit = pass(&shared);
        fail_twice_at_once(&shared, permit);
        let announced = rx.try_recv().expect("one trip").open_for;
        assert_eq!(announced, Some(HOUR));
        let w = shared.word.load(SeqCst);
        let in_force = Duration::from_nanos(shared.open_until(w).expect("scheduled"));
        assert_eq!(
            in_force, HOUR,
            "open time in force differs from the announced one"
        );
    });
}

/// Two calls record into the same slot of a count window. The totals each `record` returns
/// (which decide a trip) may be off by the call in flight, as documented, but a decrement
/// that lands before the matching increment wraps the counter: before the fix a success could
/// then see `failures == u32::MAX` and trip the breaker on a failure rate far above 100 %.
#[test]
fn count_window_totals_are_off_by_the_calls_in_flight_at_most() {
    loom::model(|| {
        let window = Arc::new(CountWindow::new(1));
        window.record(false, false);
        let calls: Vec<_> = [true, false]
            .into_iter()
            .map(|failure| {
                let window = window.clone();
                thread::spawn(move || {
                    let c = window.record(failure, false);
                    assert!(c.failures <= c.calls + 1, "{c:?}");
                })
            })
            .collect();
        for c in calls {
            c.join().unwrap();
        }
    });
}

/// A failure admitted while Closed passes the generation check in `on_outcome`, then waits
/// while another thread trips the breaker, probes and closes it again. Its increment of the
/// consecutive counter landed in the new Closed generation and counted towards the next trip
/// (pinned semantics 4 says it must not); the counter now carries its generation. Only a thread stalled for a whole open time can do
/// this, which a short open time makes possible.
#[test]
fn an_outcome_from_an_earlier_closed_generation_does_not_count() {
    loom::model(|| {
        let shared = Arc::new(frozen(policy(2, 1, Duration::ZERO)));
        let late = pass(&shared);
        shared.on_outcome(pass(&shared), true, false, None);
        let tripping = pass(&shared);
        let cycle = {
            let shared = shared.clone();
            thread::spawn(move || {
                shared.on_outcome(tripping, true, false, None);
                // The other failure may have won the trip and be writing the schedule.
                let p = loop {
                    match shared.admit() {
                        Ok(p) => break p,
                        Err(_) => thread::yield_now(),
                    }
                };
                assert!(matches!(p, Permit::Probe(_)), "{p:?}");
                shared.on_outcome(p, false, false, None);
            })
        };
        let stale = {
            let shared = shared.clone();
            thread::spawn(move || shared.on_outcome(late, true, false, None))
        };
        cycle.join().unwrap();
        stale.join().unwrap();
        assert_eq!(
            (shared.state(), shared.generation()),
            (BreakerState::Closed, 3)
        );
        let w = shared.word.load(SeqCst);
        assert_eq!(shared.consecutive_failures(w), 0, "a stale failure counted");
    });
}
