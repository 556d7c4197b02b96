//! Generating ids: time-ordered UUIDv7 by default.

use std::cell::Cell;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use steadfast_core::__private::rand;

use crate::id::CorrelationId;

/// Makes new correlation ids. Implemented for closures `Fn() -> CorrelationId`.
pub trait MakeCorrelationId {
    /// A fresh id.
    fn make_id(&self) -> CorrelationId;
}

impl<F: Fn() -> CorrelationId> MakeCorrelationId for F {
    fn make_id(&self) -> CorrelationId {
        self()
    }
}

/// Time-ordered UUIDv7 ids (RFC 9562): 48 bits of Unix milliseconds, a 12-bit sequence, then
/// 62 random bits.
///
/// Ids sort by creation, also within one millisecond and across threads: every id made in the
/// process is greater than every id made before it (the `uuid` crate's `Uuid::now_v7` gives
/// the same guarantee). The sequence counts ids within a millisecond (RFC 9562 §6.2, method 1);
/// past 4096 in one millisecond, or when the wall clock steps back, the timestamp runs ahead of
/// the clock until the clock catches up, as the RFC allows. The ordering costs one
/// compare-and-swap on a process-wide counter, no lock.
///
/// Each id costs one allocation: the final header value. The default draws randomness from a
/// per-thread generator seeded by the process's random hash keys (no locks, no syscalls);
/// [`UuidV7::seeded`] gives a reproducible sequence of random bits for tests.
///
/// ```
/// use steadfast_correlation::{MakeCorrelationId, UuidV7};
///
/// let id = UuidV7::new().make_id();
/// let s = id.as_str();
/// assert_eq!(s.len(), 36);
/// assert_eq!(&s[14..15], "7"); // version
/// assert!(matches!(&s[19..20], "8" | "9" | "a" | "b")); // RFC 9562 variant
///
/// let (first, second) = (UuidV7::new().make_id(), UuidV7::new().make_id());
/// assert!(first.as_str() < second.as_str()); // ordered by creation
///
/// let a = UuidV7::seeded(42);
/// let b = UuidV7::seeded(42);
/// assert_eq!(&a.make_id().as_str()[19..], &b.make_id().as_str()[19..]); // same random bits
/// ```
#[derive(Clone, Debug, Default)]
pub struct UuidV7 {
    seeded: Option<Arc<AtomicU64>>,
}

impl UuidV7 {
    /// The default generator.
    pub fn new() -> Self {
        Self { seeded: None }
    }

    /// A generator whose random bits follow `seed` (shared by its clones).
    pub fn seeded(seed: u64) -> Self {
        Self {
            seeded: Some(Arc::new(AtomicU64::new(seed))),
        }
    }

    fn next_random(&self) -> u64 {
        match &self.seeded {
            Some(state) => rand::next(state.fetch_add(rand::STEP, Ordering::Relaxed)),
            None => THREAD_RNG.with(|s| {
                let before = s.get();
                s.set(before.wrapping_add(rand::STEP));
                rand::next(before)
            }),
        }
    }
}

thread_local! {
    static THREAD_RNG: Cell<u64> = Cell::new(rand::random_seed(2));
}

/// The last timestamp and sequence handed out in this process, as `ms << 12 | sequence`.
static LAST: AtomicU64 = AtomicU64::new(0);

/// The next `ms << 12 | sequence`: the clock's millisecond with sequence 0 when the clock has
/// moved past every stamp given out, else one more than the last stamp.
fn next_stamp(counter: &AtomicU64, ms: u64) -> u64 {
    let now = (ms & ((1 << 48) - 1)) << 12;
    let mut last = counter.load(Ordering::Relaxed);
    loop {
        let next = if now > last {
            now
        } else {
            // Wraps only after the 48-bit millisecond field is spent (year 10889).
            last.wrapping_add(1) & ((1 << 60) - 1)
        };
        match counter.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

impl UuidV7 {
    fn make_at(&self, counter: &AtomicU64, ms: u64) -> CorrelationId {
        let stamp = next_stamp(counter, ms);
        let hi = ((stamp >> 12) << 16) | 0x7000 | (stamp & 0x0fff);
        let lo = (self.next_random() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        CorrelationId::from_validated(uuid_header(((hi as u128) << 64) | lo as u128))
    }
}

impl MakeCorrelationId for UuidV7 {
    fn make_id(&self) -> CorrelationId {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.make_at(&LAST, ms)
    }
}

/// The canonical text of a UUID as a header value.
pub(crate) fn uuid_header(v: u128) -> HeaderValue {
    HeaderValue::from_bytes(&format_uuid(v)).expect("hex digits and dashes are a valid header")
}

fn format_uuid(v: u128) -> [u8; 36] {
    // 8-4-4-4-12 hex digits: the four 32-bit words, eight digits each, split at the dashes.
    let [a, b, c, d] = [
        (v >> 96) as u32,
        (v >> 64) as u32,
        (v >> 32) as u32,
        v as u32,
    ]
    .map(hex8);
    let mut out = [b'-'; 36];
    out[0..8].copy_from_slice(&a);
    out[9..13].copy_from_slice(&b[..4]);
    out[14..18].copy_from_slice(&b[4..]);
    out[19..23].copy_from_slice(&c[..4]);
    out[24..28].copy_from_slice(&c[4..]);
    out[28..36].copy_from_slice(&d);
    out
}

/// The eight lower-case hex digits of `x`, most significant first, without a table or a
/// branch: the nibbles are spread one to a byte, then each gets `'0'`, plus 39 more for
/// the ten to fifteen (`'a'` is `'0' + 10 + 39`).
fn hex8(x: u32) -> [u8; 8] {
    let x = u64::from(x);
    let n = ((x & 0xffff_0000) << 16) | (x & 0xffff);
    let n = ((n & 0x0000_ff00_0000_ff00) << 8) | (n & 0x0000_00ff_0000_00ff);
    let n = ((n & 0x00f0_00f0_00f0_00f0) << 4) | (n & 0x000f_000f_000f_000f);
    // 1 in each byte whose nibble is 10 or more (no byte carries into the next).
    let letters = ((n + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (n + 0x3030_3030_3030_3030 + letters * 39).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::is_valid_default;
    use std::collections::HashSet;

    #[test]
    fn format_is_canonical() {
        let s = format_uuid(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(&s, b"01234567-89ab-cdef-0011-223344556677");
        let s = format_uuid(0xfedc_ba98_7654_3210_ffff_0000_a5a5_5a5a);
        assert_eq!(&s, b"fedcba98-7654-3210-ffff-0000a5a55a5a");
    }

    proptest::proptest! {
        /// The word-at-a-time formatting against the plain one.
        #[test]
        fn format_matches_the_plain_formatting(v in proptest::prelude::any::<u128>()) {
            let plain = format!("{v:032x}");
            let expected = format!(
                "{}-{}-{}-{}-{}",
                &plain[..8],
                &plain[8..12],
                &plain[12..16],
                &plain[16..20],
                &plain[20..]
            );
            proptest::prop_assert_eq!(&format_uuid(v)[..], expected.as_bytes());
        }
    }

    #[test]
    fn ids_are_valid_unique_and_time_ordered() {
        let g = UuidV7::seeded(7);
        let ids: Vec<_> = (0..10_000).map(|_| g.make_id()).collect();
        let set: HashSet<_> = ids.iter().map(|i| i.as_str().to_owned()).collect();
        assert_eq!(set.len(), ids.len());
        for id in &ids {
            assert!(is_valid_default(id.as_bytes()));
        }
        // Every id sorts after the one made before it, within a millisecond too.
        assert!(ids.windows(2).all(|w| w[0].as_str() < w[1].as_str()));
    }

    #[test]
    fn ids_keep_their_order_when_the_clock_steps_back_or_a_millisecond_overflows() {
        let g = UuidV7::seeded(1);
        let c = AtomicU64::new(0);
        let ms = 1_764_979_200_000;
        let mut ids = vec![g.make_at(&c, ms)];
        ids.extend((0..5000).map(|_| g.make_at(&c, ms))); // > 4096 in one millisecond
        ids.push(g.make_at(&c, ms - 60_000)); // the clock steps back a minute
        ids.push(g.make_at(&c, ms + 10)); // and then forward again
        assert!(ids.windows(2).all(|w| w[0].as_str() < w[1].as_str()));
        // The clock caught up: the last id carries its millisecond, sequence 0.
        let last = ids.last().unwrap().as_str().replace('-', "");
        let hi = u64::from_str_radix(&last[..16], 16).unwrap();
        assert_eq!(hi >> 16, ms + 10);
        assert_eq!(hi & 0x0fff, 0);
    }

    #[test]
    fn ids_made_on_many_threads_are_unique_and_each_thread_sees_them_rise() {
        let per_thread: Vec<Vec<String>> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    let g = UuidV7::new();
                    (0..5000).map(|_| g.make_id().as_str().to_owned()).collect()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let mut all = HashSet::new();
        for ids in &per_thread {
            assert!(ids.windows(2).all(|w| w[0] < w[1]));
            all.extend(ids.iter().cloned());
        }
        assert_eq!(all.len(), 4 * 5000);
    }

    #[test]
    fn threads_get_distinct_streams() {
        let a = std::thread::spawn(|| UuidV7::new().next_random())
            .join()
            .unwrap();
        let b = std::thread::spawn(|| UuidV7::new().next_random())
            .join()
            .unwrap();
        assert_ne!(a, b);
    }
}
