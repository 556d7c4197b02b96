//! One concurrency limit per key of the request (by default per upstream authority).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::marker::PhantomData;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use http_body::Body;
use steadfast_core::BoxError;
use steadfast_core::key::{ByAuthority, ExtractKey, KeyHashing, UpstreamKey};
use tower_layer::Layer;
use tower_service::Service;

use crate::algorithm::Rule;
use crate::error::InvalidLimitConfig;
use crate::future::{Admission, ResponseFuture};
use crate::layer::{ConcurrencyLimitBuilder, make_limiter};
use crate::limiter::Limiter;
use crate::service::refuse_or_wait;

const SHARDS: usize = 16;

/// The settings of a [`KeyedConcurrencyLimitLayer`]: a [`ConcurrencyLimitBuilder`]'s, applied
/// to each key, and how many keys to keep.
#[must_use]
pub struct KeyedConcurrencyLimitBuilder<E, K> {
    base: ConcurrencyLimitBuilder,
    extract: E,
    max_keys: usize,
    _key: PhantomData<fn() -> K>,
}

impl<E, K> fmt::Debug for KeyedConcurrencyLimitBuilder<E, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedConcurrencyLimitBuilder")
            .field("base", &self.base)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl<E, K> KeyedConcurrencyLimitBuilder<E, K>
where
    E: ExtractKey<K>,
    K: UpstreamKey,
{
    pub(crate) fn new(base: ConcurrencyLimitBuilder, extract: E) -> Self {
        Self {
            base,
            extract,
            max_keys: 1024,
            _key: PhantomData,
        }
    }

    /// How many keys keep a limit while idle (default 1024): the map has 16 shards, each
    /// holding `n / 16` keys (rounded up, so at least 16 keys in all). When a new key finds its
    /// shard full, limits with no call in flight or waiting are dropped to make room (an
    /// adaptive one starts again from its initial limit when its key comes back). A key with
    /// calls in flight always keeps its own limit, so a shard grows past its bound only by
    /// keys that have calls in flight (memory in proportion to the calls under way).
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n.max(1);
        self
    }

    /// Validates and builds the layer.
    ///
    /// # Errors
    ///
    /// As [`ConcurrencyLimitBuilder::build`].
    pub fn build(self) -> Result<KeyedConcurrencyLimitLayer<E, K>, InvalidLimitConfig> {
        let (limit, rule) = self.base.validated()?;
        let template = Template {
            limit,
            rule,
            wait: self.base.wait(),
            name: Arc::from(self.base.name_str()),
            window: self.base.window(),
        };
        let per_shard = self.max_keys.div_ceil(SHARDS);
        Ok(KeyedConcurrencyLimitLayer {
            map: Arc::new(KeyedLimits {
                template,
                extract: self.extract,
                shards: (0..SHARDS)
                    .map(|_| {
                        Shard(RwLock::new(Slots {
                            map: HashMap::default(),
                            scan_at: per_shard,
                        }))
                    })
                    .collect(),
                per_shard,
                hasher: KeyHashing::new(),
            }),
        })
    }
}

/// How each key's limiter is made.
struct Template {
    limit: u32,
    rule: Option<Rule>,
    wait: Option<Duration>,
    name: Arc<str>,
    window: (Duration, u32),
}

impl Template {
    fn limiter(&self, name: String) -> Limiter {
        make_limiter(
            self.limit,
            self.rule,
            self.wait,
            Arc::from(name),
            self.window,
        )
    }
}

/// A map key with its hash computed once (by the key's own [`UpstreamKey::hash_key`]), so the
/// map does not hash it again.
struct Prehashed<K> {
    hash: u64,
    key: K,
}

impl<K> Hash for Prehashed<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl<K: UpstreamKey> PartialEq for Prehashed<K> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key.same(&other.key)
    }
}

impl<K: UpstreamKey> Eq for Prehashed<K> {}

/// Passes a [`Prehashed`] key's hash through.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; fold anything else in.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map<K> = HashMap<Prehashed<K>, Arc<Limiter>, BuildHasherDefault<PassThrough>>;

/// One shard's limits, and the size at which a new key next looks for idle ones to drop.
struct Slots<K> {
    map: Map<K>,
    scan_at: usize,
}

#[repr(align(128))]
struct Shard<K>(RwLock<Slots<K>>);

/// What every service of one keyed layer shares.
pub(crate) struct KeyedLimits<E, K> {
    template: Template,
    extract: E,
    shards: Box<[Shard<K>]>,
    per_shard: usize,
    hasher: KeyHashing,
}

/// Feeds a key to a hasher by its [`UpstreamKey::hash_key`].
struct ByKey<'a, K>(&'a K);

impl<K: UpstreamKey> Hash for ByKey<'_, K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash_key(state);
    }
}

impl<E, K: UpstreamKey> KeyedLimits<E, K> {
    fn prehash(&self, key: K) -> (usize, Prehashed<K>) {
        let hash = self.hasher.hash_one(ByKey(&key));
        let shard = (hash >> 32) as usize % SHARDS;
        (shard, Prehashed { hash, key })
    }

    /// Runs `f` with `key`'s limiter (made for a key seen for the first time), under the
    /// shard's lock: `f` must not call out.
    #[inline]
    fn with<R>(&self, key: K, f: impl Fn(&Arc<Limiter>) -> R) -> R {
        let (i, key) = self.prehash(key);
        let shard = &self.shards[i].0;
        {
            let slots = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(limiter) = slots.map.get(&key) {
                return f(limiter);
            }
        }
        self.insert(shard, key, f)
    }

    #[cold]
    fn insert<R>(
        &self,
        shard: &RwLock<Slots<K>>,
        key: Prehashed<K>,
        f: impl Fn(&Arc<Limiter>) -> R,
    ) -> R {
        let mut slots = shard.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(limiter) = slots.map.get(&key) {
            return f(limiter);
        }
        if slots.map.len() >= slots.scan_at {
            // Make room from limits nothing holds (no call in flight or waiting). Busy ones
            // stay: a key with calls in flight keeps its own limit, so a shard outgrows its
            // bound only by keys that have calls in flight, and looks again only once it has
            // doubled (each new key costs O(1) on average).
            slots.map.retain(|_, l| !l.is_idle());
            slots.scan_at = self.per_shard.max(2 * slots.map.len());
        }
        let name = format!("{}/{}", self.template.name, key.key.name());
        let kept = Prehashed {
            hash: key.hash,
            key: key.key.to_kept(),
        };
        let limiter = slots
            .map
            .entry(kept)
            .or_insert_with(|| Arc::new(self.template.limiter(name)));
        f(limiter)
    }

    /// The limiter of `key`, if it has one.
    fn get(&self, key: &K) -> Option<Arc<Limiter>> {
        let (i, key) = self.prehash(key.clone());
        let slots = self.shards[i]
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        slots.map.get(&key).cloned()
    }
}

/// One concurrency limit per key of the request: by default per upstream authority, so that
/// one slow upstream's calls fill its own limit and not the others'. Each key's limit has the
/// settings of the [`ConcurrencyLimitBuilder`] it was made from (fixed or adaptive, refusing
/// or waiting), is named `<name>/<key>` (in events and the `limit` label of the metrics), and
/// holds each call's permit until its response body ends, as [`ConcurrencyLimitLayer`](crate::ConcurrencyLimitLayer)
/// does.
///
/// Keys are kept in a bounded map ([`max_keys`](KeyedConcurrencyLimitBuilder::max_keys)). A
/// call takes its key's permit under a shared read lock of one of 16 shards, without cloning
/// anything but the key.
///
/// # Clone
///
/// Every service this layer makes shares the same per-key limits.
///
/// ```
/// use std::convert::Infallible;
/// use steadfast_limit::ConcurrencyLimitLayer;
/// use tower::{Layer, Service, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let layer = ConcurrencyLimitLayer::builder().max(1).per_authority().build().unwrap();
/// let hang = service_fn(|_req: http::Request<String>| async {
///     std::future::pending::<Result<http::Response<String>, Infallible>>().await
/// });
/// let mut svc = layer.layer(hang);
/// let get = |uri| http::Request::get(uri).body(String::new()).unwrap();
/// let _a = svc.ready().await.unwrap().call(get("http://a.test/"));
/// // `a.test` has its one call in flight; `b.test` has a limit of its own.
/// let _b = svc.ready().await.unwrap().call(get("http://b.test/"));
/// let refused = svc.ready().await.unwrap().call(get("http://a.test/x")).await;
/// assert!(refused.is_err());
/// let a = http::uri::Authority::from_static("a.test");
/// assert_eq!(layer.in_flight(&Some(a)), 1);
/// # }
/// ```
pub struct KeyedConcurrencyLimitLayer<E = ByAuthority, K = Option<Authority>> {
    map: Arc<KeyedLimits<E, K>>,
}

impl<E, K> Clone for KeyedConcurrencyLimitLayer<E, K> {
    fn clone(&self) -> Self {
        Self {
            map: self.map.clone(),
        }
    }
}

impl<E, K> fmt::Debug for KeyedConcurrencyLimitLayer<E, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedConcurrencyLimitLayer")
            .field("name", &self.map.template.name)
            .finish_non_exhaustive()
    }
}

impl<E, K: UpstreamKey> KeyedConcurrencyLimitLayer<E, K> {
    /// The limit in force for `key` (`None` until a call with that key was made).
    pub fn limit(&self, key: &K) -> Option<u32> {
        self.map.get(key).map(|l| l.limit())
    }

    /// `key`'s calls holding a permit (0 for a key never seen).
    pub fn in_flight(&self, key: &K) -> u32 {
        self.map.get(key).map_or(0, |l| l.in_flight())
    }

    /// `key`'s calls waiting for a permit (0 for a key never seen).
    pub fn waiting(&self, key: &K) -> u32 {
        self.map.get(key).map_or(0, |l| l.waiting())
    }

    /// The keys that have a limit of their own now.
    pub fn keys(&self) -> Vec<K> {
        self.map
            .shards
            .iter()
            .flat_map(|s| {
                let slots = s.0.read().unwrap_or_else(PoisonError::into_inner);
                slots.map.keys().map(|k| k.key.clone()).collect::<Vec<_>>()
            })
            .collect()
    }
}

impl<S, E, K> Layer<S> for KeyedConcurrencyLimitLayer<E, K> {
    type Service = KeyedConcurrencyLimit<S, E, K>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedConcurrencyLimit {
            inner,
            map: self.map.clone(),
        }
    }
}

/// The service of a [`KeyedConcurrencyLimitLayer`].
///
/// # Clone
///
/// Clones share the layer's per-key limits.
pub struct KeyedConcurrencyLimit<S, E = ByAuthority, K = Option<Authority>> {
    inner: S,
    map: Arc<KeyedLimits<E, K>>,
}

impl<S: Clone, E, K> Clone for KeyedConcurrencyLimit<S, E, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            map: self.map.clone(),
        }
    }
}

impl<S: fmt::Debug, E, K> fmt::Debug for KeyedConcurrencyLimit<S, E, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedConcurrencyLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, E, K> KeyedConcurrencyLimit<S, E, K> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResB, E, K> Service<Request<B>> for KeyedConcurrencyLimit<S, E, K>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ResB: Body,
    E: ExtractKey<K>,
    K: UpstreamKey,
{
    type Response = Response<crate::LimitBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request<B>, S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let key = self.map.extract.extract(req.uri(), req.headers());
        // The permit is taken under the shard's read lock; the limiter is cloned only for a
        // call that must wait or be refused.
        let admitted = self.map.with(key, |limiter| {
            limiter.try_acquire().ok_or_else(|| limiter.clone())
        });
        ResponseFuture::new(match admitted {
            Ok(permit) => Admission::called(self.inner.call(req), permit),
            Err(limiter) => refuse_or_wait(&mut self.inner, &limiter, req),
        })
    }
}
