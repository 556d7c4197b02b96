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

/// Time-ordered UUIDv7 ids (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.
///
/// Ids sort by creation time at millisecond granularity, so logs and stores index them well.
/// Each id costs one allocation: the final header value. The default draws randomness from a
/// per-thread generator seeded by the process's random hash keys (no locks, no syscalls);
/// [`UuidV7::seeded`] gives a reproducible sequence for tests.
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
/// let a = UuidV7::seeded(42);
/// let b = UuidV7::seeded(42);
/// assert_eq!(&a.make_id().as_str()[14..], &b.make_id().as_str()[14..]); // same random bits
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

impl MakeCorrelationId for UuidV7 {
    fn make_id(&self) -> CorrelationId {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let (r1, r2) = (self.next_random(), self.next_random());
        let hi = (ms << 16) | 0x7000 | (r1 & 0x0fff);
        let lo = (r2 & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        let bytes = format_uuid(((hi as u128) << 64) | lo as u128);
        CorrelationId::from_validated(
            HeaderValue::from_bytes(&bytes).expect("hex digits and dashes are a valid header"),
        )
    }
}

fn format_uuid(v: u128) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut nibble = 0;
    for (i, slot) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        *slot = HEX[((v >> (124 - 4 * nibble)) & 0xf) as usize];
        nibble += 1;
    }
    out
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
        // The 48-bit millisecond prefix never goes backwards.
        let prefixes: Vec<String> = ids.iter().map(|i| i.as_str()[..13].to_owned()).collect();
        assert!(prefixes.windows(2).all(|w| w[0] <= w[1]));
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
