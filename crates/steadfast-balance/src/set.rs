//! The endpoint set: a snapshot read without locks, ejection accounting, and the periodic
//! outlier evaluation.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use steadfast_core::__private::rand;
use tokio::time::Instant;

use crate::endpoint::{Endpoint, Tally};
use crate::layer::{Config, Pick};

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    ConsecutiveFailures,
    SuccessRate,
    FailurePercentage,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ConsecutiveFailures => "consecutive_failures",
            Self::SuccessRate => "success_rate",
            Self::FailurePercentage => "failure_percentage",
        }
    }
}

/// What every clone of a balancer shares.
pub(crate) struct Shared<C> {
    pub(crate) endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    pub(crate) config: Config,
    pub(crate) classifier: C,
    ejected: AtomicUsize,
    next_eval: AtomicU64,
    epoch: Instant,
    rng: Option<AtomicU64>,
    rr: AtomicUsize,
    /// The `Host` value for the service name callers use, made once (callers of one balancer
    /// name one service): a header value costs an allocation to make, none to clone.
    service_host: arc_swap::ArcSwapOption<(Authority, http::HeaderValue)>,
    /// Dropped with the set: tells discovery tasks following it that it is gone.
    gone: tokio::sync::watch::Sender<()>,
}

impl<C> std::fmt::Debug for Shared<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("endpoints", &self.endpoints.load().len())
            .field("ejected", &self.ejected.load(Relaxed))
            .finish_non_exhaustive()
    }
}

thread_local! {
    static THREAD_RNG: Cell<u64> = Cell::new(rand::random_seed(3));
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<C> Shared<C> {
    pub(crate) fn new(config: Config, classifier: C, endpoints: Vec<Authority>) -> Self {
        let epoch = Instant::now();
        let interval = nanos(config.interval);
        let rng = config.seed.map(AtomicU64::new);
        let initial = config.default_rtt.as_nanos() as f64;
        let list = dedup(endpoints)
            .into_iter()
            .map(|a| Arc::new(Endpoint::new(a, initial, 0)))
            .collect();
        Self {
            endpoints: ArcSwap::from_pointee(list),
            config,
            classifier,
            ejected: AtomicUsize::new(0),
            next_eval: AtomicU64::new(interval),
            epoch,
            rng,
            rr: AtomicUsize::new(0),
            service_host: arc_swap::ArcSwapOption::empty(),
            gone: tokio::sync::watch::Sender::new(()),
        }
    }

    /// Ends (with an error) once the set is dropped.
    pub(crate) fn gone(&self) -> tokio::sync::watch::Receiver<()> {
        self.gone.subscribe()
    }

    /// The `Host` header value for `service`: its host and port, never its userinfo.
    #[inline]
    pub(crate) fn host_value(&self, service: &Authority) -> Option<http::HeaderValue> {
        if let Some(cached) = &*self.service_host.load() {
            if cached.0 == *service {
                return Some(cached.1.clone());
            }
        }
        let host = match service.port_u16() {
            Some(port) => format!("{}:{port}", service.host()),
            None => service.host().to_owned(),
        };
        let v = http::HeaderValue::from_str(&host).ok()?;
        self.service_host
            .store(Some(Arc::new((service.clone(), v.clone()))));
        Some(v)
    }

    /// Nanoseconds since the set was made.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    #[inline]
    pub(crate) fn random(&self) -> u64 {
        match &self.rng {
            Some(state) => rand::next(state.fetch_add(rand::STEP, Relaxed)),
            None => THREAD_RNG.with(|s| {
                let before = s.get();
                s.set(before.wrapping_add(rand::STEP));
                rand::next(before)
            }),
        }
    }

    /// A random index below `n` (`n > 0`): the high half of a 128-bit product, which costs a
    /// multiplication where `%` costs a division.
    #[inline]
    pub(crate) fn below(&self, n: usize) -> usize {
        ((u128::from(self.random()) * n as u128) >> 64) as usize
    }

    pub(crate) fn next_round_robin(&self) -> usize {
        self.rr.fetch_add(1, Relaxed)
    }

    /// Whether `ep` may take calls now: in service, or its ejection has run out (then it is
    /// returned to service here, once).
    #[inline]
    pub(crate) fn available(&self, ep: &Endpoint, now: u64) -> bool {
        let until = ep.ejected_until.load(Acquire);
        until == 0 || (now >= until && self.readmit(ep, until))
    }

    /// Whether `ep` should take a call now: available, and its breaker not refusing.
    #[inline]
    pub(crate) fn in_service(&self, ep: &Endpoint, now: u64) -> bool {
        self.available(ep, now) && !ep.refusing(now)
    }

    /// Returns an endpoint whose ejection ran out; true when it is in service afterwards.
    fn readmit(&self, ep: &Endpoint, until: u64) -> bool {
        if ep
            .ejected_until
            .compare_exchange(until, 0, AcqRel, Acquire)
            .is_ok()
        {
            self.ejected.fetch_sub(1, Relaxed);
            ep.consecutive.store(0, Relaxed);
            tracing::event!(
                name: "balance.returned",
                target: "steadfast::balance",
                tracing::Level::INFO,
                endpoint = %ep.authority,
            );
            #[cfg(feature = "metrics")]
            metrics::counter!("steadfast_balance_returned_total", "endpoint" => ep.authority.to_string())
                .increment(1);
        }
        ep.ejected_until.load(Acquire) == 0
    }

    /// How many endpoints of `n` may be ejected at once: the configured share, at least one
    /// when there are two or more, and never all.
    pub(crate) fn max_ejected(&self, n: usize) -> usize {
        if n < 2 {
            return 0;
        }
        let share = n * usize::from(self.config.max_ejection_percent) / 100;
        share.max(1).min(n - 1)
    }

    /// Ejects `ep` unless it already is, or the cap on ejected endpoints is reached. The time
    /// out grows with each ejection: `base × n`, capped.
    pub(crate) fn eject(&self, ep: &Endpoint, now: u64, reason: Reason) -> bool {
        if ep.is_ejected() || ep.removed.load(Relaxed) {
            return false;
        }
        let n = self.endpoints.load().len();
        let max = self.max_ejected(n);
        let mut current = self.ejected.load(Relaxed);
        loop {
            if current >= max {
                return false;
            }
            match self
                .ejected
                .compare_exchange_weak(current, current + 1, AcqRel, Relaxed)
            {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        let times = ep.ejections.fetch_add(1, Relaxed).saturating_add(1);
        let base = self.config.ejection_base;
        let time = base
            .saturating_mul(times)
            .min(self.config.ejection_max.max(base));
        let until = now.saturating_add(nanos(time)).max(1);
        if ep
            .ejected_until
            .compare_exchange(0, until, AcqRel, Acquire)
            .is_err()
        {
            // Another thread ejected it first: give the slot back.
            self.ejected.fetch_sub(1, Relaxed);
            return false;
        }
        tracing::event!(
            name: "balance.ejected",
            target: "steadfast::balance",
            tracing::Level::WARN,
            endpoint = %ep.authority,
            reason = reason.as_str(),
            ejection_ms = time.as_millis() as u64,
            ejections = times,
        );
        #[cfg(feature = "metrics")]
        metrics::counter!(
            "steadfast_balance_ejections_total",
            "endpoint" => ep.authority.to_string(),
            "reason" => reason.as_str()
        )
        .increment(1);
        true
    }

    /// Runs the interval's outlier rules when the interval has passed (one caller wins).
    #[inline]
    pub(crate) fn maybe_evaluate(&self, now: u64) {
        let due = self.next_eval.load(Relaxed);
        if now < due {
            return;
        }
        let next = now.saturating_add(nanos(self.config.interval));
        if self
            .next_eval
            .compare_exchange(due, next, Relaxed, Relaxed)
            .is_ok()
        {
            self.evaluate(now);
        }
    }

    #[cold]
    fn evaluate(&self, now: u64) {
        let list = self.endpoints.load();
        let tallies: Vec<(&Arc<Endpoint>, Tally)> = list
            .iter()
            .map(|ep| {
                // Returns endpoints whose time is up; an interval in service with successes and
                // no failure lowers the multiplier (an endpoint kept from calls, or still
                // failing, keeps it: its next ejection is longer).
                let tally = ep.take_tally();
                if self.available(ep, now) && tally.successes > 0 && tally.failures == 0 {
                    let _ = ep
                        .ejections
                        .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
                }
                (ep, tally)
            })
            .collect();
        #[cfg(feature = "metrics")]
        self.record_load(&list, now);
        let in_service: Vec<&(&Arc<Endpoint>, Tally)> =
            tallies.iter().filter(|(ep, _)| !ep.is_ejected()).collect();
        if let Some(rule) = &self.config.success_rate {
            let eligible: Vec<_> = in_service
                .iter()
                .filter(|(_, t)| t.total() >= u64::from(rule.request_volume))
                .collect();
            if eligible.len() >= rule.minimum_hosts && !eligible.is_empty() {
                let rates: Vec<f64> = eligible
                    .iter()
                    .map(|(_, t)| f64::from(t.successes) / t.total() as f64)
                    .collect();
                let mean = rates.iter().sum::<f64>() / rates.len() as f64;
                let var =
                    rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64;
                let threshold = mean - rule.stdev_factor * var.sqrt();
                for ((ep, _), rate) in eligible.iter().zip(rates) {
                    if rate < threshold {
                        self.eject(ep, now, Reason::SuccessRate);
                    }
                }
            }
        }
        if let Some(rule) = &self.config.failure_percentage {
            let eligible: Vec<_> = in_service
                .iter()
                .filter(|(_, t)| t.total() >= u64::from(rule.request_volume))
                .collect();
            if eligible.len() >= rule.minimum_hosts {
                for (ep, t) in eligible {
                    let failed = 100.0 * f64::from(t.failures) / t.total() as f64;
                    if failed > f64::from(rule.threshold) {
                        self.eject(ep, now, Reason::FailurePercentage);
                    }
                }
            }
        }
    }

    /// Each endpoint's load and state as gauges, once per interval (nothing per call).
    #[cfg(feature = "metrics")]
    fn record_load(&self, list: &[Arc<Endpoint>], now: u64) {
        let decay = self.config.decay.as_secs_f64() * 1e9;
        for ep in list {
            let endpoint = ep.authority.to_string();
            metrics::gauge!("steadfast_balance_endpoint_in_flight", "endpoint" => endpoint.clone())
                .set(f64::from(ep.in_flight()));
            metrics::gauge!("steadfast_balance_endpoint_latency_seconds", "endpoint" => endpoint.clone())
                .set(ep.estimate(now, decay) / 1e9);
            metrics::gauge!("steadfast_balance_endpoint_ejected", "endpoint" => endpoint)
                .set(if ep.is_ejected() { 1.0 } else { 0.0 });
        }
    }

    /// Replaces the set. Endpoints that stay keep their state; removed ones drain: calls in
    /// flight finish and report into state nobody reads, and new calls no longer pick them.
    pub(crate) fn replace(&self, authorities: Vec<Authority>) {
        let now = self.now();
        let decay = self.config.decay.as_nanos() as f64;
        let authorities = dedup(authorities);
        let before = self.endpoints.load_full();
        self.endpoints.rcu(|current| {
            // A new endpoint starts at the mean estimate of the others, so it competes at once
            // (starting it at a default slower than a fast set would starve it); the default
            // only when it is the first.
            let initial = if current.is_empty() {
                self.config.default_rtt.as_nanos() as f64
            } else {
                current
                    .iter()
                    .map(|ep| ep.estimate(now, decay))
                    .sum::<f64>()
                    / current.len() as f64
            };
            let known: HashMap<&Authority, &Arc<Endpoint>> =
                current.iter().map(|ep| (&ep.authority, ep)).collect();
            authorities
                .iter()
                .map(|a| match known.get(a) {
                    Some(ep) => Arc::clone(ep),
                    None => Arc::new(Endpoint::new(a.clone(), initial, now)),
                })
                .collect::<Vec<_>>()
        });
        let list = self.endpoints.load();
        let kept: HashSet<*const Endpoint> = list.iter().map(Arc::as_ptr).collect();
        for ep in before.iter() {
            if !kept.contains(&Arc::as_ptr(ep)) {
                ep.removed.store(true, Relaxed);
            }
        }
        // A smaller set allows fewer ejected endpoints: the ones ejected longest ago return.
        let mut ejected: Vec<&Arc<Endpoint>> = list.iter().filter(|ep| ep.is_ejected()).collect();
        let max = self.max_ejected(list.len());
        if ejected.len() > max {
            ejected.sort_by_key(|ep| ep.ejected_until.load(Relaxed));
            let extra = ejected.len() - max;
            for ep in ejected.drain(..extra) {
                ep.ejected_until.store(0, Relaxed);
            }
        }
        self.ejected.store(ejected.len(), Relaxed);
    }

    pub(crate) fn pick_kind(&self) -> Pick {
        self.config.pick
    }
}

/// The endpoints that can be called, each once, in order.
fn dedup(mut v: Vec<Authority>) -> Vec<Authority> {
    let mut seen = HashSet::with_capacity(v.len());
    v.retain(|a| {
        if !crate::layer::valid_endpoint(a) {
            tracing::warn!(target: "steadfast::balance", endpoint = %a, "not an endpoint (host:port, no userinfo, port not 0); skipped");
            return false;
        }
        seen.insert(a.clone())
    });
    v
}
