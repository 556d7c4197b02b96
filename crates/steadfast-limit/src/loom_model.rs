//! Loom model of the permit accounting: run with
//! `RUSTFLAGS="--cfg loom" cargo test -p steadfast-limit --lib --release loom_model`.

use std::sync::Arc;

use loom::thread;

use crate::limiter::Limiter;

fn limiter(limit: u32) -> Arc<Limiter> {
    Arc::new(Limiter::new(limit, None, None, Arc::from("model")))
}

/// Two callers race for one permit, each giving it back: never two in flight, none left.
#[test]
fn loom_model_two_callers_never_exceed_the_limit() {
    loom::model(|| {
        let l = limiter(1);
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                thread::spawn(move || {
                    if l.try_acquire().is_some() {
                        assert!(l.in_flight() <= 1);
                        l.release();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(l.in_flight(), 0);
    });
}

/// A release and a waiter registering at the same time: either the waiter takes the freed
/// permit, or the release sees the waiter and wakes it. Never both missed (a lost wakeup
/// would leave the waiter parked until its bound with a permit free).
#[test]
fn loom_model_a_release_never_misses_a_waiter() {
    loom::model(|| {
        let l = limiter(1);
        assert!(l.try_acquire().is_some());
        let releaser = {
            let l = l.clone();
            thread::spawn(move || l.release())
        };
        assert!(l.register(), "first in line");
        let took = l.take().is_some();
        let woke = releaser.join().unwrap();
        assert!(took || woke, "lost wakeup");
        l.deregister();
        if took {
            l.release();
        }
        assert_eq!(l.in_flight(), 0);
        assert_eq!(l.waiting(), 0);
    });
}

/// A new arrival never takes a permit ahead of a registered waiter.
#[test]
fn loom_model_arrivals_queue_behind_waiters() {
    loom::model(|| {
        let l = limiter(1);
        assert!(l.register());
        let arrival = {
            let l = l.clone();
            thread::spawn(move || l.try_acquire().is_some())
        };
        let waiter_took = l.take().is_some();
        let arrival_took = arrival.join().unwrap();
        assert!(waiter_took && !arrival_took);
        l.deregister();
    });
}
