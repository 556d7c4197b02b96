//! A race-free retry budget.
//!
//! Every original request deposits `ratio` of a token; every retry withdraws one whole token.
//! Tokens also trickle in at `min_per_sec` so a quiet service can still retry, and every
//! balance decays with time constant `window`, so the balance tracks *recent* requests: about
//! `ratio × requests in the last window + min_per_sec × window`.
//!
//! The balance and its timestamp share one 64-bit word, updated by compare-and-swap: a
//! withdrawal either takes a whole token that exists or fails, so concurrent retries can never
//! overdraw (no check-then-act). Deposits on the happy path go to per-thread stripes and are
//! swept into the word by the next withdrawal. A stripe holds a running total of deposits and
//! the total already swept: a sweeper claims the difference with one compare-and-swap on
//! "swept", so every deposit is counted exactly once, and the first eight threads, each the
//! only writer of its own stripe's total, deposit with a plain load and store. Deposits wait in
//! their stripe without a timestamp (a clock read per request would cost more than the
//! deposit), so a sweep ages them as if made evenly since the word's last update (read before
//! claiming them, so a racing update cannot make them look fresh): a deposit made windows ago
//! and swept only now is worth almost nothing. The estimate errs both ways for uneven
//! traffic: a burst just before a withdrawal is undervalued (it looks spread over the quiet
//! spell before it), a burst just after the last update overvalued (by at most the factor
//! `window / quiet spell` of its full worth, so it fades as the spell grows). The stamp is 24
//! bits of 10 ms ticks: a word unused for more than half its range (about 23 hours) counts as
//! fully decayed.
//!
//! A token is taken when a retry is decided, before its wait; if the caller gives up during
//! the wait, the token is given back.

use std::sync::atomic::{
    AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};
use std::time::Duration;

use steadfast_core::__private::thread_number;
use tokio::time::Instant;

const MILLI: u64 = 1000;
const BALANCE_BITS: u32 = 40;
const BALANCE_MASK: u64 = (1 << BALANCE_BITS) - 1;
pub(crate) const TICK: Duration = Duration::from_millis(10);
const TICK_MASK: u64 = (1 << (64 - BALANCE_BITS)) - 1;
/// How far (10 ms ticks) another thread's later clock read may put the stored stamp ahead of
/// ours: a race, not a wrap.
const SKEW_TICKS: u64 = 100;
/// Time enough, in ticks, for any balance to decay to nothing (used once the 24-bit stamp has
/// wrapped, after about 23 hours unused).
const FULL_DECAY_TICKS: u64 = TICK_MASK / 2;
/// Threads with a stripe of their own; later threads share as many more.
const OWNED: usize = 8;
/// Milli-tokens a stripe may hold unswept (10 tokens): see [`Budget::deposit`].
const SWEEP_AT: u64 = 10 * MILLI;

#[repr(align(128))]
#[derive(Debug, Default)]
struct Stripe {
    /// Milli-tokens ever deposited here (wrapping).
    deposited: AtomicU64,
    /// The part of `deposited` already moved into the balance.
    swept: AtomicU64,
}

/// The retry budget shared by every service of one [`RetryLayer`](crate::RetryLayer).
#[derive(Debug)]
pub struct Budget {
    /// balance (milli-tokens, low 40 bits) | last update (10 ms ticks since `base`, high 24).
    word: AtomicU64,
    pending: [Stripe; 2 * OWNED],
    deposit_milli: u64,
    floor_milli_per_tick: f64,
    window_ticks: f64,
    base: Instant,
}

/// Budget settings.
///
/// Defaults: retries may add 10 % to recent traffic (`ratio` 0.1), plus 10 retries a second
/// (`min_per_sec`), over a 10 s window — tower's and Finagle's shape, with the SRE book's
/// 10 % ratio. The budget starts full at its floor (`min_per_sec × window`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetConfig {
    /// Tokens deposited per original request (0.1 = retries add at most ~10 %).
    pub ratio: f64,
    /// Tokens added per second regardless of traffic.
    pub min_per_sec: u32,
    /// How far back "recent" reaches.
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.1,
            min_per_sec: 10,
            window: Duration::from_secs(10),
        }
    }
}

impl Budget {
    /// A budget with `config`.
    pub fn new(config: BudgetConfig) -> Self {
        let window_ticks = (config.window.as_secs_f64() / TICK.as_secs_f64()).max(1.0);
        let floor_milli_per_tick =
            f64::from(config.min_per_sec) * MILLI as f64 * TICK.as_secs_f64();
        let start = (floor_milli_per_tick * window_ticks) as u64;
        Self {
            word: AtomicU64::new(start.min(BALANCE_MASK)),
            pending: Default::default(),
            deposit_milli: (config.ratio.clamp(0.0, 1000.0) * MILLI as f64) as u64,
            floor_milli_per_tick,
            window_ticks,
            base: Instant::now(),
        }
    }

    /// Records an original request (happy path: one add on this thread's stripe).
    ///
    /// A stripe holding 10 tokens unswept is swept at once (a clock read and a
    /// compare-and-swap, every hundred requests or so): deposits that waited for a withdrawal
    /// are aged as if made evenly since the last sweep, so without this a long run of
    /// requests that need no retry, then a quiet spell, would be valued as if made during the
    /// spell and pay for a burst of retries (or hedges) far over the ratio.
    #[inline]
    pub fn deposit(&self) {
        if self.deposit_milli == 0 {
            return;
        }
        let n = thread_number();
        let stripe = if n < OWNED {
            &self.pending[n]
        } else {
            &self.pending[OWNED + n % OWNED]
        };
        let total = if n < OWNED {
            // This thread is the only writer of its stripe's total.
            let total = stripe
                .deposited
                .load(Relaxed)
                .wrapping_add(self.deposit_milli);
            stripe.deposited.store(total, Release);
            total
        } else {
            stripe
                .deposited
                .fetch_add(self.deposit_milli, Release)
                .wrapping_add(self.deposit_milli)
        };
        if total.wrapping_sub(stripe.swept.load(Relaxed)) >= SWEEP_AT {
            self.sweep();
        }
    }

    #[cold]
    #[inline(never)]
    fn sweep(&self) {
        self.update(0);
    }

    /// Takes one token for a retry; `false` when the budget is spent.
    pub fn withdraw(&self) -> bool {
        self.update(MILLI)
    }

    /// Gives back a token taken for a retry that was never sent (its caller gave up during
    /// the wait).
    pub(crate) fn refund(&self) {
        let _ = self.word.fetch_update(AcqRel, Acquire, |w| {
            let balance = (w & BALANCE_MASK).saturating_add(MILLI).min(BALANCE_MASK);
            Some((w & !BALANCE_MASK) | balance)
        });
    }

    /// The tokens available now (approximate while deposits are in flight).
    pub fn balance(&self) -> f64 {
        self.update(0);
        (self.word.load(Acquire) & BALANCE_MASK) as f64 / MILLI as f64
    }

    fn now_tick(&self) -> u64 {
        (self.base.elapsed().as_nanos() / TICK.as_nanos()) as u64
    }

    /// Sweeps pending deposits, decays and refills, then takes `cost` milli-tokens if there
    /// are enough (`cost` 0 only refreshes). One CAS loop on one word: race-free.
    fn update(&self, cost: u64) -> bool {
        let now = self.now_tick();
        // The word's last update, read before claiming: every deposit claimed below was made
        // after it (or missed by the sweep that stamped it), so this is the span to age them
        // over, whoever wins the compare-and-swap that follows.
        let since = now.wrapping_sub(self.word.load(Acquire) >> BALANCE_BITS) & TICK_MASK;
        let mut swept = 0u64;
        for s in &self.pending {
            // `swept` first: every value it holds was read from `deposited` by a sweeper, so
            // after this acquire the read of `deposited` below is at least as large. (Read the
            // other way round, another sweeper could move `swept` past our `total` in between,
            // and our compare-and-swap would move it back and claim ~2^64.)
            let before = s.swept.load(Acquire);
            let total = s.deposited.load(Acquire);
            let fresh = total.wrapping_sub(before);
            // Claim what arrived since the last sweep; a racing sweeper that wins claims it
            // instead, never both.
            if fresh != 0
                && fresh <= i64::MAX as u64
                && s.swept
                    .compare_exchange(before, total, AcqRel, Acquire)
                    .is_ok()
            {
                swept = swept.saturating_add(fresh);
            }
        }
        // Deposits that waited in a stripe were made at unknown times over that span: aged
        // as if made evenly over it (the mean of the decay over it), so a deposit from windows
        // ago no longer pays for a retry, and steady traffic swept after a long quiet spell is
        // worth what its last window was.
        let since = if since > TICK_MASK - SKEW_TICKS {
            0 // a racing update stamped a tick just after our clock read
        } else if since > TICK_MASK / 2 {
            FULL_DECAY_TICKS // unused for about a day: the stamp wrapped
        } else {
            since
        };
        let aged = if swept == 0 || since == 0 {
            swept as f64
        } else {
            let since = since as f64;
            swept as f64 * (1.0 - (-since / self.window_ticks).exp()) * self.window_ticks / since
        };
        let mut ok = false;
        let _ = self.word.fetch_update(AcqRel, Acquire, |w| {
            let balance = w & BALANCE_MASK;
            let last = w >> BALANCE_BITS;
            let mut elapsed = now.wrapping_sub(last) & TICK_MASK;
            let mut stamp = now & TICK_MASK;
            if elapsed > TICK_MASK - SKEW_TICKS {
                // Another thread read the clock just after us and stored a later tick first:
                // for us no time has passed (the tick never moves backwards; it wraps forwards).
                elapsed = 0;
                stamp = last;
            } else if elapsed > TICK_MASK / 2 {
                // Not a race: the word sat unused for longer than half the tick's range (about
                // a day), so the stamp wrapped. Whatever it held has long decayed.
                elapsed = FULL_DECAY_TICKS;
            }
            let decayed = if elapsed == 0 {
                balance as f64 + aged
            } else {
                let keep = (-(elapsed as f64) / self.window_ticks).exp();
                // Exact steady state of a constant trickle under the same decay.
                let floor = self.floor_milli_per_tick * self.window_ticks * (1.0 - keep);
                balance as f64 * keep + floor + aged
            };
            let total = (decayed.round() as u64).min(BALANCE_MASK);
            ok = total >= cost;
            let after = if ok { total - cost } else { total };
            Some((stamp << BALANCE_BITS) | after)
        });
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    fn no_floor(ratio: f64) -> Budget {
        Budget::new(BudgetConfig {
            ratio,
            min_per_sec: 0,
            window: Duration::from_secs(10),
        })
    }

    /// Requests that needed no retry, then a quiet spell of six windows: what they earned has
    /// decayed, and a burst after the spell gets about what the decay left (plus the requests
    /// of the burst itself), not what they earned.
    #[tokio::test(start_paused = true)]
    async fn deposits_before_a_quiet_spell_have_decayed_by_its_end() {
        let b = no_floor(0.1);
        for _ in 0..20 {
            for _ in 0..1000 {
                b.deposit();
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        // 2,000 tokens earned over 2 s; after 60 s of a 10 s window, e^-6 of them is about 5
        // (the last 10 tokens unswept may count at up to a sixth of their worth more).
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert!((4..=8).contains(&granted), "{granted}");
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_of_recent_requests() {
        let b = no_floor(0.1);
        assert!(!b.withdraw(), "empty without a floor");
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn old_deposits_decay() {
        let b = no_floor(0.1);
        for _ in 0..1000 {
            b.deposit();
        }
        assert!((b.balance() - 100.0).abs() < 0.01);
        tokio::time::advance(Duration::from_secs(10)).await;
        let left = b.balance();
        assert!(
            (left - 100.0 * (-1f64).exp()).abs() < 0.5,
            "one time constant: {left}"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(b.balance() < 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn decay_is_applied_once_per_elapsed_time() {
        let b = no_floor(0.1);
        for _ in 0..1000 {
            b.deposit();
        }
        // Deposits are swept into the balance (and start decaying) at the next update.
        assert!((b.balance() - 100.0).abs() < 0.01);
        tokio::time::advance(Duration::from_secs(5)).await;
        let first = b.balance();
        let again = b.balance();
        assert_eq!(first, again, "reading twice at one instant decays once");
        tokio::time::advance(Duration::from_secs(5)).await;
        let later = b.balance();
        assert!((later - 100.0 * (-1f64).exp()).abs() < 0.5, "{later}");
    }

    #[tokio::test(start_paused = true)]
    async fn floor_refills_to_its_steady_state() {
        let b = Budget::new(BudgetConfig::default());
        assert!(
            (b.balance() - 100.0).abs() < 0.01,
            "starts full at the floor"
        );
        let taken = (0..1000).filter(|_| b.withdraw()).count();
        assert_eq!(taken, 100);
        tokio::time::advance(Duration::from_secs(1)).await;
        let refilled = b.balance();
        assert!(
            (9.0..=10.0).contains(&refilled),
            "~10/s minus decay: {refilled}"
        );
    }

    /// `depositors` threads deposit one milli-token `each` times while `sweepers` threads
    /// sweep; returns the largest balance any sweeper saw and the final balance.
    fn race(depositors: u64, each: u64, sweepers: usize) -> (u64, u64) {
        let b = Arc::new(Budget::new(BudgetConfig {
            ratio: 0.001, // one milli-token per request
            min_per_sec: 0,
            window: Duration::from_secs(100_000_000), // no decay within the test
        }));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let max_seen = Arc::new(AtomicU64::new(0));
        let sweepers: Vec<_> = (0..sweepers)
            .map(|_| {
                let (b, stop, max_seen) = (b.clone(), stop.clone(), max_seen.clone());
                std::thread::spawn(move || {
                    while !stop.load(Relaxed) {
                        b.update(0);
                        max_seen.fetch_max(b.word.load(Acquire) & BALANCE_MASK, Relaxed);
                    }
                })
            })
            .collect();
        let depositors: Vec<_> = (0..depositors)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..each {
                        b.deposit();
                    }
                })
            })
            .collect();
        for t in depositors {
            t.join().unwrap();
        }
        stop.store(true, Relaxed);
        for t in sweepers {
            t.join().unwrap();
        }
        b.update(0);
        (max_seen.load(Relaxed), b.word.load(Acquire) & BALANCE_MASK)
    }

    /// More threads than owned stripes deposit while another sweeps: every deposit is counted
    /// exactly once.
    #[test]
    fn concurrent_deposits_are_counted_exactly_once() {
        let (_, balance) = race(12, 50_000, 1);
        assert_eq!(balance, 12 * 50_000);
    }

    /// Several sweepers race several depositors (the sweep that once read `deposited` before
    /// `swept` could move `swept` backwards and claim ~2^64 milli-tokens).
    #[test]
    fn racing_sweepers_never_claim_more_than_was_deposited() {
        for _ in 0..5 {
            let (max_seen, balance) = race(4, 20_000, 4);
            assert!(max_seen <= 4 * 20_000, "a sweep over-claimed: {max_seen}");
            assert_eq!(balance, 4 * 20_000);
        }
    }

    /// Many threads withdraw at once: the grants never exceed the tokens that existed.
    #[test]
    fn concurrent_withdrawals_never_overdraw() {
        // A window so long that decay over the test's run rounds away: exactly 500 tokens.
        let b = Arc::new(Budget::new(BudgetConfig {
            ratio: 1.0,
            min_per_sec: 0,
            window: Duration::from_secs(100_000_000),
        }));
        for _ in 0..500 {
            b.deposit();
        }
        let granted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (b, g) = (b.clone(), granted.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        if b.withdraw() {
                            g.fetch_add(1, Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(granted.load(Relaxed), 500);
    }
}
