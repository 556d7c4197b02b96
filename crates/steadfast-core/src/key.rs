//! Keys that pick one of several per-key states (breakers, concurrency limits) for a request.
//!
//! A per-key layer finds a request's key with an [`ExtractKey`] (by default [`ByAuthority`]: the
//! request URI's `host:port`) and keeps one state per [`UpstreamKey`], named after the key in
//! events and metrics.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use http::uri::Authority;
use http::{HeaderMap, Uri};

/// Picks the key (the breaker, the limit) a request belongs to.
///
/// Implemented by [`ByAuthority`] (the default for per-key layers) and by closures
/// `Fn(&Uri, &HeaderMap) -> Key`.
pub trait ExtractKey<Key> {
    /// The key of a request with this URI and headers.
    fn extract(&self, uri: &Uri, headers: &HeaderMap) -> Key;
}

impl<F, Key> ExtractKey<Key> for F
where
    F: Fn(&Uri, &HeaderMap) -> Key,
{
    fn extract(&self, uri: &Uri, headers: &HeaderMap) -> Key {
        self(uri, headers)
    }
}

/// A key of per-key layers (breakers, concurrency limits). Its [`name`](Self::name) names the
/// key's state in events and metrics (the `upstream` label) and in a breaker's transitions.
///
/// Implemented for the per-authority key (`Option<Authority>`: its `host:port`, `"none"`
/// for requests without one), `Authority`, strings and integers. A key type of your own
/// implements it in a line:
///
/// ```
/// use steadfast_core::key::UpstreamKey;
///
/// #[derive(Clone, PartialEq, Eq, Hash)]
/// struct Tenant(u32);
///
/// impl UpstreamKey for Tenant {
///     fn name(&self) -> String {
///         format!("tenant-{}", self.0)
///     }
/// }
/// assert_eq!(Tenant(7).name(), "tenant-7");
/// ```
///
/// A layer may run a key's methods (`same`, `hash_key`, `name`, `to_kept`, `Clone`, `Eq`,
/// `Hash`) while it holds the lock of the part of its map the key lives in: they must not
/// call into the same layer, which would wait on that lock for ever.
pub trait UpstreamKey: Hash + Eq + Clone + Send + Sync + 'static {
    /// The name of this key's state (breaker, limit); made once, when the state is.
    fn name(&self) -> String;

    /// Whether two keys are equal, as `==` says; the lookup on every call uses this. The
    /// default is `==`; override it only with something quicker that gives the same answer
    /// (the authority keys compare bytes before they compare without regard to case).
    #[inline]
    fn same(&self, other: &Self) -> bool {
        self == other
    }

    /// Feeds the key to the map's hasher: consistent with [`same`](Self::same) (keys that are
    /// the same hash the same). The default is `Hash`; the authority keys hash their bytes
    /// lowercased in one piece, not a byte at a time as `Authority`'s `Hash` does.
    #[inline]
    fn hash_key<H: Hasher>(&self, state: &mut H) {
        self.hash(state);
    }

    /// The copy the map keeps for as long as the state lives, made once, when the state
    /// is; the default is a clone. Authorities are copied out of the request's URI, so that
    /// an idle state does not keep the whole first URI (path and query included) alive.
    fn to_kept(&self) -> Self {
        self.clone()
    }
}

/// An authority's bytes, lowercased, to the hasher in pieces of up to 64 bytes, then its
/// length (so that no two authorities feed the same sequence).
#[inline]
fn hash_authority<H: Hasher>(a: &Authority, state: &mut H) {
    let mut buf = [0u8; 64];
    let bytes = a.as_str().as_bytes();
    for chunk in bytes.chunks(buf.len()) {
        let piece = &mut buf[..chunk.len()];
        piece.copy_from_slice(chunk);
        piece.make_ascii_lowercase();
        state.write(piece);
    }
    state.write_usize(bytes.len());
}

/// An authority in a buffer of its own (not a slice of a request's URI).
fn kept_authority(a: &Authority) -> Authority {
    Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(a.as_str().as_bytes()))
        .unwrap_or_else(|_| a.clone())
}

/// Byte-equal authorities are equal; only others need `Authority`'s comparison, which
/// ignores ASCII case byte by byte.
#[inline]
fn same_authority(a: &Authority, b: &Authority) -> bool {
    a.as_str() == b.as_str() || a == b
}

impl UpstreamKey for Option<Authority> {
    fn name(&self) -> String {
        self.as_ref()
            .map_or_else(|| "none".to_owned(), |a| a.to_string())
    }

    #[inline]
    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Some(a), Some(b)) => same_authority(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    fn to_kept(&self) -> Self {
        self.as_ref().map(kept_authority)
    }

    #[inline]
    fn hash_key<H: Hasher>(&self, state: &mut H) {
        match self {
            Some(a) => hash_authority(a, state),
            None => state.write_u8(0xff),
        }
    }
}

impl UpstreamKey for Authority {
    fn name(&self) -> String {
        self.to_string()
    }

    #[inline]
    fn same(&self, other: &Self) -> bool {
        same_authority(self, other)
    }

    fn to_kept(&self) -> Self {
        kept_authority(self)
    }

    #[inline]
    fn hash_key<H: Hasher>(&self, state: &mut H) {
        hash_authority(self, state);
    }
}

impl UpstreamKey for String {
    fn name(&self) -> String {
        self.clone()
    }
}

impl UpstreamKey for &'static str {
    fn name(&self) -> String {
        (*self).to_owned()
    }
}

impl UpstreamKey for Arc<str> {
    fn name(&self) -> String {
        self.to_string()
    }
}

macro_rules! integer_keys {
    ($($t:ty),*) => {$(
        impl UpstreamKey for $t {
            fn name(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
integer_keys!(u8, u16, u32, u64, usize, i8, i16, i32, i64);

/// One state (breaker, limit) per upstream authority (`host:port` of the request URI,
/// without any `user:password@`: credentials neither split an upstream in two nor reach a
/// name, a label or a log); requests without an authority share one.
///
/// ```
/// use steadfast_core::key::{ByAuthority, ExtractKey};
///
/// let uri: http::Uri = "http://user:secret@orders:8080/x".parse().unwrap();
/// let key = ByAuthority.extract(&uri, &http::HeaderMap::new());
/// assert_eq!(key.unwrap().as_str(), "orders:8080");
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct ByAuthority;

impl ExtractKey<Option<Authority>> for ByAuthority {
    #[inline]
    fn extract(&self, uri: &Uri, _: &HeaderMap) -> Option<Authority> {
        let a = uri.authority()?;
        match a.as_str().bytes().rposition(|b| b == b'@') {
            None => Some(a.clone()),
            Some(at) => without_userinfo(a, at),
        }
    }
}

/// `a` without the userinfo that ends at byte `at` (`None` if nothing valid is left: such a
/// request shares the key of requests without an authority).
#[cold]
fn without_userinfo(a: &Authority, at: usize) -> Option<Authority> {
    let host = a.as_str().get(at + 1..)?;
    Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(host.as_bytes())).ok()
}

/// Builds the [`KeyHasher`]s of one per-key map, all from one random seed.
///
/// ```
/// use std::hash::BuildHasher;
/// use steadfast_core::key::KeyHashing;
///
/// let h = KeyHashing::new();
/// assert_eq!(h.hash_one("orders:8080"), h.hash_one("orders:8080"));
/// assert_ne!(h.hash_one("orders:8080"), h.hash_one("orders:8081"));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct KeyHashing {
    seed: u64,
}

impl KeyHashing {
    /// A builder with a seed of its own.
    pub fn new() -> Self {
        Self {
            seed: crate::rand_impl::random_seed(0x6b),
        }
    }

    /// A builder with the given seed (for reproducible tests).
    pub const fn with_seed(seed: u64) -> Self {
        Self { seed }
    }
}

impl Default for KeyHashing {
    fn default() -> Self {
        Self::new()
    }
}

impl std::hash::BuildHasher for KeyHashing {
    type Hasher = KeyHasher;

    #[inline]
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.seed)
    }
}

/// A quick hasher for the keys of the per-key maps (breakers, limits): a folded multiply per
/// 8-byte word (foldhash's mix), from a seed drawn per map, with a final mix. Not meant to
/// resist a caller who crafts colliding keys: those maps are bounded (a shard holds a few
/// dozen keys), so collisions cost a scan of one shard's entries at most, never more memory.
/// SipHash, `std`'s default, costs about three times as much per short key.
#[derive(Clone, Copy, Debug)]
pub struct KeyHasher(u64);

const MULTIPLY: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl KeyHasher {
    /// A folded multiply (the full 128-bit product's halves xored), as foldhash and aHash's
    /// fallback mix a word: unlike a plain multiply, every input bit reaches every output bit.
    #[inline]
    fn add(&mut self, word: u64) {
        let m = u128::from(self.0 ^ word) * u128::from(MULTIPLY);
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

impl Hasher for KeyHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            // The length keeps "a" and "a\0" apart.
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // SplitMix64's finalizer: every bit of the state reaches the high bits shards use.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn authorities_spread_over_shards_and_hash_as_they_compare() {
        let h = KeyHashing::with_seed(0x5eed);
        let hash = |k: &Option<Authority>| {
            let mut s = h.build_hasher();
            k.hash_key(&mut s);
            s.finish()
        };
        let a = Some(Authority::from_static("Orders.Internal:8080"));
        let b = Some(Authority::from_static("orders.internal:8080"));
        assert!(a.same(&b));
        assert_eq!(hash(&a), hash(&b));
        let mut shards = [0u32; 16];
        let mut seen = HashSet::new();
        for i in 0..4096 {
            let k: Option<Authority> = Some(
                format!("10.0.{}.{}:8080", i / 256, i % 256)
                    .parse()
                    .unwrap(),
            );
            let x = hash(&k);
            assert!(seen.insert(x), "a collision at {i}");
            shards[(x >> 32) as usize % 16] += 1;
        }
        // 256 per shard on average: none far off.
        assert!(shards.iter().all(|n| (160..=352).contains(n)), "{shards:?}");
    }
}
