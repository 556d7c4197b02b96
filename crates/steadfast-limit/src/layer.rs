//! The layer and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use http::uri::Authority;
use steadfast_core::key::{ByAuthority, ExtractKey, UpstreamKey};

use crate::algorithm::{Aimd, Estimator, Gradient2, Rule, Vegas, Windowed};
use crate::error::InvalidLimitConfig;
use crate::keyed::KeyedConcurrencyLimitBuilder;
use crate::limiter::Limiter;
use crate::service::ConcurrencyLimit;

/// Caps the calls in flight through it; see the [crate docs](crate).
///
/// Every service this layer makes shares one limit: a host that clones the service per request
/// still counts every request against the same permits.
///
/// ```
/// use steadfast_limit::ConcurrencyLimitLayer;
///
/// let layer = ConcurrencyLimitLayer::new(64);
/// assert_eq!((layer.limit(), layer.in_flight(), layer.waiting()), (64, 0, 0));
/// ```
#[derive(Clone)]
pub struct ConcurrencyLimitLayer {
    pub(crate) limiter: Arc<Limiter>,
}

impl fmt::Debug for ConcurrencyLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitLayer")
            .field("limiter", &self.limiter)
            .finish()
    }
}

impl ConcurrencyLimitLayer {
    /// A fixed limit of `max` calls in flight that refuses the next call at once with
    /// [`LimitExceeded`](crate::error::LimitExceeded). A `max` of zero is taken as 1 (a limit
    /// that admits nothing is a closed door: force a breaker open for that);
    /// [`builder`](Self::builder)`().max(0)` is refused instead.
    pub fn new(max: u32) -> Self {
        Self::from_parts(max.max(1), None, None, "limit", WINDOW)
    }

    /// Every other setting: an adaptive rule, waiting for a permit, a name.
    pub fn builder() -> ConcurrencyLimitBuilder {
        ConcurrencyLimitBuilder::default()
    }

    fn from_parts(
        limit: u32,
        rule: Option<Rule>,
        wait: Option<Duration>,
        name: &str,
        window: (Duration, u32),
    ) -> Self {
        Self {
            limiter: Arc::new(make_limiter(limit, rule, wait, Arc::from(name), window)),
        }
    }

    /// The limit in force (it moves when the limit is adaptive).
    pub fn limit(&self) -> u32 {
        self.limiter.limit()
    }

    /// Calls holding a permit: admitted, and whose response body has not ended.
    pub fn in_flight(&self) -> u32 {
        self.limiter.in_flight()
    }

    /// Calls waiting for a permit.
    pub fn waiting(&self) -> u32 {
        self.limiter.waiting()
    }

    /// The limit's name (`limit` unless set), for logs.
    pub fn name(&self) -> &str {
        &self.limiter.name
    }
}

/// A limiter with these settings.
pub(crate) fn make_limiter(
    limit: u32,
    rule: Option<Rule>,
    wait: Option<Duration>,
    name: Arc<str>,
    window: (Duration, u32),
) -> Limiter {
    let estimator = rule.map(|r| Windowed::new(Estimator::new(r), window.0, window.1));
    // The limit in force from the start is the rule's (Vegas measures at its floor first).
    let limit = estimator.as_ref().map_or(limit, |e| e.estimator.limit());
    Limiter::new(limit, estimator, wait, name)
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit::new(inner, self.limiter.clone())
    }
}

/// The settings of a [`ConcurrencyLimitLayer`].
///
/// ```
/// use std::time::Duration;
/// use steadfast_limit::{ConcurrencyLimitLayer, Gradient2};
///
/// let layer = ConcurrencyLimitLayer::builder()
///     .gradient2(Gradient2 { initial: 10, min: 4, max: 100, ..Gradient2::default() })
///     .wait_up_to(Duration::from_millis(50))
///     .name("orders")
///     .build()?;
/// assert_eq!(layer.limit(), 10);
/// # Ok::<_, steadfast_limit::error::InvalidLimitConfig>(())
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct ConcurrencyLimitBuilder {
    limit: Limit,
    wait: Option<Duration>,
    name: String,
    window: (Duration, u32),
}

/// The default sample window: 100 ms and at least 10 calls.
const WINDOW: (Duration, u32) = (Duration::from_millis(100), 10);

#[derive(Clone, Copy, Debug)]
enum Limit {
    Fixed(u32),
    Adaptive(Rule),
}

impl Default for ConcurrencyLimitBuilder {
    fn default() -> Self {
        Self {
            limit: Limit::Adaptive(Rule::Vegas(Vegas::default())),
            wait: None,
            name: "limit".to_owned(),
            window: WINDOW,
        }
    }
}

impl ConcurrencyLimitBuilder {
    /// A fixed limit of `max` calls in flight.
    pub fn max(mut self, max: u32) -> Self {
        self.limit = Limit::Fixed(max);
        self
    }

    /// An adaptive limit by additive increase and multiplicative decrease; see [`Aimd`].
    pub fn aimd(mut self, aimd: Aimd) -> Self {
        self.limit = Limit::Adaptive(Rule::Aimd(aimd));
        self
    }

    /// An adaptive limit that follows the latency gradient; see [`Gradient2`].
    pub fn gradient2(mut self, gradient2: Gradient2) -> Self {
        self.limit = Limit::Adaptive(Rule::Gradient2(gradient2));
        self
    }

    /// An adaptive limit that estimates the upstream's queue (the builder's default, with
    /// [`Vegas::default`]); see [`Vegas`].
    pub fn vegas(mut self, vegas: Vegas) -> Self {
        self.limit = Limit::Adaptive(Rule::Vegas(vegas));
        self
    }

    /// Lets a call that finds the limit reached wait up to `wait` for a permit (first come,
    /// first served), and never past the call's [`Deadline`](steadfast_core::Deadline), before
    /// it is refused. The default refuses at once; `Duration::ZERO` does too.
    ///
    /// While it waits, the call keeps the inner service it made ready (a readiness
    /// reservation, such as a buffer slot, is held until the call is sent or refused).
    pub fn wait_up_to(mut self, wait: Duration) -> Self {
        self.wait = (!wait.is_zero()).then_some(wait);
        self
    }

    /// How an adaptive limit gathers samples: it moves once per window of at least
    /// `min_time` and `min_samples` calls, on the window's mean latency, its highest in-flight
    /// count, and whether any call was dropped (Netflix's `WindowedLimit`). The default is
    /// 100 ms and 10 calls (Netflix: 1 s and 10); `(Duration::ZERO, 1)` moves on every call.
    /// A `min_samples` of zero is taken as 1.
    pub fn sample_window(mut self, min_time: Duration, min_samples: u32) -> Self {
        self.window = (min_time, min_samples.max(1));
        self
    }

    /// Names the limit (for logs and [`ConcurrencyLimitLayer::name`]).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// One limit with these settings per upstream authority (`host:port` of the request URI),
    /// instead of one for every call: see [`KeyedConcurrencyLimitLayer`](crate::KeyedConcurrencyLimitLayer).
    ///
    /// ```
    /// use steadfast_limit::ConcurrencyLimitLayer;
    ///
    /// let per_upstream = ConcurrencyLimitLayer::builder().max(32).per_authority().build()?;
    /// # let _ = per_upstream;
    /// # Ok::<_, steadfast_limit::error::InvalidLimitConfig>(())
    /// ```
    pub fn per_authority(self) -> KeyedConcurrencyLimitBuilder<ByAuthority, Option<Authority>> {
        self.per_key(ByAuthority)
    }

    /// One limit with these settings per key that `extract` finds in a request (a closure
    /// `Fn(&Uri, &HeaderMap) -> K` or an [`ExtractKey`]): see [`KeyedConcurrencyLimitLayer`](crate::KeyedConcurrencyLimitLayer).
    pub fn per_key<E, K>(self, extract: E) -> KeyedConcurrencyLimitBuilder<E, K>
    where
        E: ExtractKey<K>,
        K: UpstreamKey,
    {
        KeyedConcurrencyLimitBuilder::new(self, extract)
    }

    /// The limit and rule, validated.
    pub(crate) fn validated(&self) -> Result<(u32, Option<Rule>), InvalidLimitConfig> {
        Ok(match self.limit {
            Limit::Fixed(0) => return Err(InvalidLimitConfig::Zero("max")),
            Limit::Fixed(n) => (n, None),
            Limit::Adaptive(rule) => {
                validate(&rule)?;
                (rule.bounds().0, Some(rule))
            }
        })
    }

    pub(crate) fn wait(&self) -> Option<Duration> {
        self.wait
    }

    pub(crate) fn window(&self) -> (Duration, u32) {
        self.window
    }

    pub(crate) fn name_str(&self) -> &str {
        &self.name
    }

    /// Validates and builds the layer.
    ///
    /// # Errors
    ///
    /// [`InvalidLimitConfig`] for a limit, floor or ceiling of zero, bounds that do not hold
    /// the initial limit, or a factor out of its range.
    pub fn build(self) -> Result<ConcurrencyLimitLayer, InvalidLimitConfig> {
        let (limit, rule) = match self.limit {
            Limit::Fixed(0) => return Err(InvalidLimitConfig::Zero("max")),
            Limit::Fixed(n) => (n, None),
            Limit::Adaptive(rule) => {
                validate(&rule)?;
                (rule.bounds().0, Some(rule))
            }
        };
        Ok(ConcurrencyLimitLayer::from_parts(
            limit,
            rule,
            self.wait,
            &self.name,
            self.window,
        ))
    }
}

fn validate(rule: &Rule) -> Result<(), InvalidLimitConfig> {
    let (initial, min, max) = rule.bounds();
    for (name, v) in [("initial", initial), ("min", min), ("max", max)] {
        if v == 0 {
            return Err(InvalidLimitConfig::Zero(name));
        }
    }
    if !(min <= initial && initial <= max) {
        return Err(InvalidLimitConfig::Bounds { initial, min, max });
    }
    let open_unit = |name, value: f64| {
        if value > 0.0 && value < 1.0 {
            Ok(())
        } else {
            Err(InvalidLimitConfig::Factor { name, value })
        }
    };
    match rule {
        Rule::Aimd(a) => open_unit("backoff", a.backoff),
        Rule::Gradient2(g) => {
            open_unit("backoff", g.backoff)?;
            if !(g.smoothing > 0.0 && g.smoothing <= 1.0) {
                return Err(InvalidLimitConfig::Factor {
                    name: "smoothing",
                    value: g.smoothing,
                });
            }
            if !(g.tolerance >= 1.0 && g.tolerance.is_finite()) {
                return Err(InvalidLimitConfig::Factor {
                    name: "tolerance",
                    value: g.tolerance,
                });
            }
            if g.long_window == 0 {
                return Err(InvalidLimitConfig::Zero("long_window"));
            }
            Ok(())
        }
        Rule::Vegas(v) => {
            if v.probe_every == 0 {
                return Err(InvalidLimitConfig::Zero("probe_every"));
            }
            for (name, value) in [("alpha", v.alpha), ("beta", v.beta)] {
                if !(value > 0.0 && value.is_finite()) {
                    return Err(InvalidLimitConfig::Factor { name, value });
                }
            }
            if v.alpha > v.beta {
                return Err(InvalidLimitConfig::Factor {
                    name: "alpha (above beta)",
                    value: v.alpha,
                });
            }
            Ok(())
        }
    }
}
