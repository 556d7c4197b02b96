//! Choosing an endpoint for one call.

use std::sync::Arc;

use crate::endpoint::Endpoint;
use crate::layer::Pick;
use crate::set::Shared;

/// Samples drawn before falling back to a scan (each draw finds an endpoint in service with
/// probability at least one half, since at most half can be ejected by default).
const DRAWS: usize = 4;

/// The endpoint for the next call, or `None` when the set is empty (or, with `fail_fast`,
/// when no endpoint is in service).
#[inline]
pub(crate) fn pick<C>(shared: &Shared<C>, now: u64) -> Option<Arc<Endpoint>> {
    let list = shared.endpoints.load();
    let n = list.len();
    match n {
        0 => return None,
        1 => return usable(shared, &list[0], now),
        _ => {}
    }
    match shared.pick_kind() {
        Pick::PowerOfTwoChoices => {
            let decay = shared.config.decay.as_nanos() as f64;
            let penalty = shared.config.failure_penalty.as_nanos() as f64;
            for _ in 0..DRAWS {
                let r = shared.random();
                let i = (r % n as u64) as usize;
                let mut j = ((r >> 32) % (n as u64 - 1)) as usize;
                if j >= i {
                    j += 1;
                }
                let (a, b) = (&list[i], &list[j]);
                match (shared.available(a, now), shared.available(b, now)) {
                    (true, true) => {
                        return Some(
                            if b.cost(now, decay, penalty) < a.cost(now, decay, penalty) {
                                b.clone()
                            } else {
                                a.clone()
                            },
                        );
                    }
                    (true, false) => return Some(a.clone()),
                    (false, true) => return Some(b.clone()),
                    (false, false) => {}
                }
            }
        }
        Pick::RoundRobin => {
            let start = shared.next_round_robin();
            for k in 0..n.min(DRAWS) {
                let ep = &list[(start + k) % n];
                if shared.available(ep, now) {
                    return Some(ep.clone());
                }
            }
        }
    }
    scan(shared, &list, now)
}

fn usable<C>(shared: &Shared<C>, ep: &Arc<Endpoint>, now: u64) -> Option<Arc<Endpoint>> {
    if shared.available(ep, now) || !shared.config.fail_fast {
        Some(ep.clone())
    } else {
        None
    }
}

/// Every draw met ejected endpoints: the first in service from a random start, or, when
/// none is (the cap keeps one in service, but the set may have changed), any endpoint unless
/// the balancer fails fast.
#[cold]
fn scan<C>(shared: &Shared<C>, list: &[Arc<Endpoint>], now: u64) -> Option<Arc<Endpoint>> {
    let n = list.len();
    let start = (shared.random() % n as u64) as usize;
    for k in 0..n {
        let ep = &list[(start + k) % n];
        if shared.available(ep, now) {
            return Some(ep.clone());
        }
    }
    if shared.config.fail_fast {
        None
    } else {
        Some(list[start].clone())
    }
}
