//! One endpoint's live state: its load estimate and its health.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};

use http::uri::Authority;

/// An endpoint of the service, shared by the set and by every call in flight to it (a call
/// that outlives the endpoint's removal reports into state nobody reads any more: removal
/// drains, it never fails a call).
///
/// Aligned to a cache line so that inside its `Arc` the reference count, which every pick
/// writes, sits on another line than the state every pick reads: two threads picking among
/// the same endpoints then share those lines instead of taking them from each other.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct Endpoint {
    pub(crate) authority: Authority,
    in_flight: AtomicU32,
    /// Peak-EWMA latency estimate in nanoseconds (`f64` bits), and when it was last set
    /// (nanoseconds since the set's epoch).
    ewma: AtomicU64,
    stamp: AtomicU64,
    /// When it last failed (nanoseconds since the epoch; 0: not yet).
    failed_at: AtomicU64,
    pub(crate) consecutive: AtomicU32,
    /// This interval's outcomes: successes in the low 32 bits, failures in the high 32.
    interval: AtomicU64,
    /// Nanoseconds since the epoch until which the endpoint is ejected; 0 when in service.
    pub(crate) ejected_until: AtomicU64,
    /// Ejections so far, the multiplier of the next ejection time; decays while healthy.
    pub(crate) ejections: AtomicU32,
    /// Nanoseconds since the epoch until which its own breaker is taken to refuse calls
    /// (0: not refusing).
    refusing_until: AtomicU64,
    pub(crate) removed: AtomicBool,
}

/// One interval's outcomes of an endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) successes: u32,
    pub(crate) failures: u32,
}

impl Tally {
    pub(crate) fn total(self) -> u64 {
        u64::from(self.successes) + u64::from(self.failures)
    }
}

impl Endpoint {
    pub(crate) fn new(authority: Authority, initial_rtt_ns: f64, now: u64) -> Self {
        Self {
            authority,
            in_flight: AtomicU32::new(0),
            ewma: AtomicU64::new(initial_rtt_ns.to_bits()),
            stamp: AtomicU64::new(now),
            failed_at: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            interval: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            refusing_until: AtomicU64::new(0),
            removed: AtomicBool::new(false),
        }
    }

    /// The load a new call would see: the latency estimate, decayed for the time since it was
    /// last set, times the calls in flight plus this one (peak-EWMA, as linkerd and Finagle
    /// weigh endpoints).
    #[inline]
    pub(crate) fn cost(&self, now: u64, decay_ns: f64) -> f64 {
        self.estimate(now, decay_ns) * f64::from(self.in_flight.load(Relaxed) + 1)
    }

    /// Whether it failed within the last `window_ns`.
    #[inline]
    pub(crate) fn failed_lately(&self, now: u64, window_ns: u64) -> bool {
        let at = self.failed_at.load(Relaxed);
        at != 0 && now.saturating_sub(at) < window_ns
    }

    /// The latency estimate now: decayed for the time since it was last set.
    pub(crate) fn estimate(&self, now: u64, decay_ns: f64) -> f64 {
        let ewma = f64::from_bits(self.ewma.load(Relaxed));
        let age = now.saturating_sub(self.stamp.load(Relaxed)) as f64;
        ewma * keep(age / decay_ns)
    }

    /// Its breaker refused a call: no call goes to it until `until` (while another can
    /// take it).
    pub(crate) fn refuse_until(&self, until: u64) {
        self.refusing_until.store(until, Relaxed);
    }

    /// Whether its breaker is taken to refuse calls now.
    #[inline]
    pub(crate) fn refusing(&self, now: u64) -> bool {
        now < self.refusing_until.load(Relaxed)
    }

    pub(crate) fn failed(&self, now: u64) {
        self.failed_at.store(now.max(1), Relaxed);
    }

    #[inline]
    pub(crate) fn start(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    #[inline]
    pub(crate) fn finish(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// Folds a latency sample into the estimate: a sample above the (decayed) estimate
    /// replaces it at once (the peak), a lower one is blended in with weight by its age.
    pub(crate) fn observe(&self, rtt_ns: f64, now: u64, decay_ns: f64) {
        let prev_stamp = self.stamp.swap(now, Relaxed);
        let age = now.saturating_sub(prev_stamp) as f64;
        let keep = keep(age / decay_ns);
        // A lost race between two samples keeps one of them: an estimate, not a ledger.
        let old = f64::from_bits(self.ewma.load(Relaxed));
        let next = if rtt_ns > old {
            rtt_ns
        } else {
            old * keep + rtt_ns * (1.0 - keep)
        };
        self.ewma.store(next.to_bits(), Relaxed);
    }

    pub(crate) fn count(&self, success: bool) {
        self.interval
            .fetch_add(if success { 1 } else { 1 << 32 }, Relaxed);
    }

    /// This interval's outcomes, and a fresh interval.
    pub(crate) fn take_tally(&self) -> Tally {
        let v = self.interval.swap(0, Relaxed);
        Tally {
            successes: v as u32,
            failures: (v >> 32) as u32,
        }
    }

    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_until.load(Relaxed) != 0
    }
}

/// `e^-x` for `x >= 0`: the share of an estimate kept after `x` time constants. Calls come
/// microseconds to milliseconds apart against a time constant of seconds, so `x` is almost
/// always tiny, where two terms of the series are exact to 1e-9 and cost no `exp`.
#[inline]
fn keep(x: f64) -> f64 {
    if x < 1e-3 { 1.0 - x } else { (-x).exp() }
}

#[cfg(test)]
mod tests {
    use super::keep;

    #[test]
    fn keep_is_e_to_the_minus_x() {
        for x in [
            0.0_f64, 1e-9, 1e-6, 5e-4, 0.999e-3, 1e-3, 0.5, 1.0, 10.0, 1e6,
        ] {
            let want: f64 = (-x).exp();
            assert!((keep(x) - want).abs() < 1e-6, "{x}: {} vs {want}", keep(x));
        }
    }
}
