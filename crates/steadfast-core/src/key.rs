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

/// One state (breaker, limit) per upstream authority (`host:port` of the request URI);
/// requests without an authority share one.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByAuthority;

impl ExtractKey<Option<Authority>> for ByAuthority {
    fn extract(&self, uri: &Uri, _: &HeaderMap) -> Option<Authority> {
        uri.authority().cloned()
    }
}
