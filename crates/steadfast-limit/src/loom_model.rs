//! Loom models of the permit accounting: run with
//! `RUSTFLAGS="--cfg loom" cargo test -p steadfast-limit --lib --release loom_model`.

use std::sync::Arc;

use loom::thread;

use crate::limiter::Limiter;

fn limiter(limit: u32) -> Arc<Limiter> {
    Arc::new(Limiter::new(limit, None, None, Arc::from("model")))
}

/// Two callers (on stripes of their own) race for one permit, each giving it back: never two
/// in flight, and the permits granted end equal to the budgets held, none in use.
#[test]
fn loom_model_two_callers_never_exceed_the_limit() {
    loom::model(|| {
        let l = limiter(1);
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                thread::spawn(move || {
                    if let Some(p) = l.try_acquire() {
                        assert!(l.in_flight() <= 1);
                        drop(p);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(l.in_flight(), 0);
        let (granted, budgets) = l.accounts();
        assert_eq!(granted, budgets);
        assert!(granted <= 1);
    });
}

/// A caller reclaiming idle budget while another admits from that budget and gives it back:
/// nothing is lost or counted twice.
#[test]
fn loom_model_reclaiming_races_an_admission_on_the_same_stripe() {
    loom::model(|| {
        let l = limiter(2);
        drop(l.try_acquire().expect("a permit"));
        let user = {
            let l = l.clone();
            thread::spawn(move || l.try_acquire().map(drop).is_some())
        };
        l.reclaim_all();
        let _ = user.join().unwrap();
        assert_eq!(l.in_flight(), 0);
        let (granted, budgets) = l.accounts();
        assert_eq!(granted, budgets);
        assert!(granted <= 2);
    });
}

/// A release and a waiter joining the queue at the same time: either the joining waiter
/// reclaims the freed permit and hands it to the queue's head (itself), or the release sees
/// the waiter and hands its permit over. Never both missed (a lost wakeup would leave the
/// waiter parked until its bound with a permit free).
#[test]
fn loom_model_a_release_never_misses_a_waiter() {
    loom::model(|| {
        let l = limiter(1);
        let held = l.try_acquire().expect("a permit");
        let releaser = thread::spawn(move || drop(held));
        let slot = l.enqueue();
        releaser.join().unwrap();
        let permit = l.leave(&slot);
        assert!(permit.is_some(), "lost wakeup");
        assert_eq!(l.waiting(), 0);
        drop(permit);
        assert_eq!(l.in_flight(), 0);
    });
}

/// A new arrival never takes a permit ahead of a waiter: the permit a finishing call gives
/// back goes to the waiter.
#[test]
fn loom_model_arrivals_queue_behind_waiters() {
    loom::model(|| {
        let l = limiter(1);
        let held = l.try_acquire().expect("a permit");
        let slot = l.enqueue();
        let arrival = {
            let l = l.clone();
            thread::spawn(move || l.try_acquire().is_some())
        };
        drop(held);
        let arrival_took = arrival.join().unwrap();
        let waiter = l.leave(&slot);
        assert!(waiter.is_some() && !arrival_took);
    });
}
