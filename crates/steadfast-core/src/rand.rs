//! The workspace's one seedable random source: SplitMix64 (Steele, Lea and Flood), small,
//! fast and good enough for jitter and ids' random bits. Every layer that draws random numbers
//! (retry backoff, breaker open-time jitter, correlation id generation) uses it, so a seed
//! means the same thing everywhere.
//!
//! ```
//! use steadfast_core::__private::rand::Rng;
//!
//! let (mut a, mut b) = (Rng::seeded(7), Rng::seeded(7));
//! assert_eq!(a.next_u64(), b.next_u64()); // same seed, same stream
//! assert!((0.0..1.0).contains(&a.unit()));
//! ```

use std::hash::{BuildHasher, Hasher};

/// The amount a SplitMix64 state advances per draw (the golden ratio in 64 bits).
pub const STEP: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output for a state that has already advanced.
#[inline]
const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The draw that follows a state `before`: for a stream shared by threads through an atomic,
/// `next(state.fetch_add(STEP))` gives every caller its own draw of one sequence.
#[inline]
pub const fn next(before: u64) -> u64 {
    mix(before.wrapping_add(STEP))
}

/// A stream of random numbers from a seed (not shared: each owner has its own).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A stream from `seed`.
    pub const fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let r = next(self.0);
        self.0 = self.0.wrapping_add(STEP);
        r
    }

    /// Uniform in `[0, 1)`.
    #[inline]
    pub fn unit(&mut self) -> f64 {
        unit(self.next_u64())
    }
}

/// 64 random bits as a uniform `f64` in `[0, 1)` (the top 53 bits).
#[inline]
pub fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// A seed nobody chose: from the standard library's per-process random hash keys, varied by
/// `salt` so two layers built at once do not share a stream.
pub fn random_seed(salt: u8) -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(salt);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference SplitMix64 stream for seed 0 (the published test vector).
    #[test]
    fn it_is_splitmix64() {
        let mut r = Rng::seeded(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(next(0), 0xe220_a839_7b1d_cdaf, "the shared form agrees");
    }

    #[test]
    fn units_are_in_range() {
        assert_eq!(unit(0), 0.0);
        assert!(unit(u64::MAX) < 1.0);
    }
}
