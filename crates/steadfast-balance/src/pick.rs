//! Choosing an endpoint for one call.

use std::sync::Arc;

use steadfast_core::__private::Tried;

use crate::endpoint::Endpoint;
use crate::layer::Pick;
use crate::set::Shared;

/// Draws per candidate before falling back to a scan (each draw finds an endpoint in service
/// with probability at least one half whenever at most half are ejected).
const DRAWS: usize = 4;

/// How many endpoints ahead in turn round-robin looks for one that has not failed lately
/// before it takes one that has (or, when none of them is in service, scans the set).
const RING_LOOKAHEAD: usize = 16;

/// The id a call's [`Tried`] knows an endpoint by: its address, stable while the endpoint
/// is in the set.
#[inline]
pub(crate) fn endpoint_id(ep: &Arc<Endpoint>) -> u64 {
    Arc::as_ptr(ep).addr() as u64
}

/// The index in `list` (the set's current snapshot) of the endpoint for the next call, or
/// `None` when the set is empty (or, with `fail_fast`, when no endpoint is in service). It
/// writes nothing the other callers read: taking the endpoint is the caller's step.
///
/// `tried` holds the endpoints other attempts of the same call went to (a hedge's): they
/// lose to any other endpoint in service, and are picked only when no other is.
#[inline]
pub(crate) fn pick<C>(
    shared: &Shared<C>,
    list: &[Arc<Endpoint>],
    now: u64,
    tried: Option<&Tried>,
) -> Option<usize> {
    let n = list.len();
    match n {
        0 => return None,
        1 => return usable(shared, &list[0], now),
        _ => {}
    }
    match shared.pick_kind() {
        Pick::PowerOfTwoChoices => {
            let decay = shared.config.decay.as_secs_f64() * 1e9;
            let window = crate::set::nanos(shared.config.failure_penalty);
            // Two distinct endpoints, drawn at random from those in service that have not
            // failed lately; a draw that meets an ejected or lately failed one draws again
            // (taking the other of such a pair unweighed would hand a slow endpoint every
            // pair it shares with a failing one). When draws keep meeting them, endpoints
            // that failed lately may take part, and lose to any that did not.
            let fresh = |ep: &Arc<Endpoint>| {
                shared.in_service(ep, now) && !ep.failed_lately(now, window) && !avoided(tried, ep)
            };
            let usable = |ep: &Arc<Endpoint>| shared.in_service(ep, now) && !avoided(tried, ep);
            let rank = |ep: &Endpoint| (ep.failed_lately(now, window), ep.cost(now, decay));
            for ok in [&fresh as &dyn Fn(&Arc<Endpoint>) -> bool, &usable] {
                let first = (0..DRAWS).map(|_| shared.below(n)).find(|&i| ok(&list[i]));
                let Some(i) = first else { continue };
                let second = (0..DRAWS)
                    .map(|_| {
                        let j = shared.below(n - 1);
                        if j >= i { j + 1 } else { j }
                    })
                    .find(|&j| ok(&list[j]))
                    .or_else(|| other_in_service(shared, list, i, ok));
                return Some(match second {
                    Some(j) if rank(&list[j]) < rank(&list[i]) => j,
                    _ => i,
                });
            }
        }
        Pick::RoundRobin => {
            // The next in turn that is in service and has not failed lately; when the next
            // few in turn all failed lately, the first of them in service (a failed endpoint
            // loses its turn to one that has not failed, as in a pair above).
            let window = crate::set::nanos(shared.config.failure_penalty);
            let start = shared.next_round_robin();
            let mut lately_failed = None;
            for k in 0..n.min(RING_LOOKAHEAD) {
                let i = (start + k) % n;
                let ep = &list[i];
                if shared.in_service(ep, now) && !avoided(tried, ep) {
                    if !ep.failed_lately(now, window) {
                        return Some(i);
                    }
                    lately_failed.get_or_insert(i);
                }
            }
            if lately_failed.is_some() {
                return lately_failed;
            }
        }
    }
    scan(shared, list, now)
}

/// Whether another attempt of the same call went to `ep`.
#[inline]
fn avoided(tried: Option<&Tried>, ep: &Arc<Endpoint>) -> bool {
    tried.is_some_and(|t| !t.is_empty() && t.contains(endpoint_id(ep)))
}

/// Another endpoint than `i` that `ok` accepts, from a random start (when draws kept meeting
/// ones it refuses).
#[cold]
fn other_in_service<C>(
    shared: &Shared<C>,
    list: &[Arc<Endpoint>],
    i: usize,
    ok: &dyn Fn(&Arc<Endpoint>) -> bool,
) -> Option<usize> {
    let n = list.len();
    let start = shared.below(n);
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&j| j != i && ok(&list[j]))
}

fn usable<C>(shared: &Shared<C>, ep: &Endpoint, now: u64) -> Option<usize> {
    if shared.available(ep, now) || !shared.config.fail_fast {
        Some(0)
    } else {
        None
    }
}

/// Every draw met ejected or refusing endpoints: the first in service from a random start,
/// else the first not ejected (its breaker may refuse; then the caller gets the refusal),
/// or, when none is (the cap keeps one in service, but the set may have changed), any
/// endpoint unless the balancer fails fast.
#[cold]
fn scan<C>(shared: &Shared<C>, list: &[Arc<Endpoint>], now: u64) -> Option<usize> {
    let n = list.len();
    let start = shared.below(n);
    let ring = || (0..n).map(|k| (start + k) % n);
    if let Some(i) = ring().find(|&i| shared.in_service(&list[i], now)) {
        return Some(i);
    }
    if let Some(i) = ring().find(|&i| shared.available(&list[i], now)) {
        return Some(i);
    }
    (!shared.config.fail_fast).then_some(start)
}
