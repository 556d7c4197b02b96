use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use steadfast_core::DefaultClassifier;
use tower_layer::Layer;

use crate::error::InvalidBalanceConfig;
use crate::handle::EndpointsHandle;
use crate::service::Balance;
use crate::set::Shared;

/// How an endpoint is chosen for a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pick {
    /// Two endpoints drawn at random; the one with the lower load takes the call (the load
    /// is a peak-EWMA of latency times the calls in flight plus one, as linkerd and Finagle
    /// weigh endpoints). The default.
    #[default]
    PowerOfTwoChoices,
    /// Each endpoint in turn; one that failed within the failure penalty gives its turn to
    /// the next that has not (among the next 16 in turn).
    RoundRobin,
}

/// What the `Host` header of a balanced request carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostHeader {
    /// The authority the caller addressed (the service's name), as Envoy keeps `:authority`
    /// and nginx sends its upstream's name: virtual hosts keep working. The default. A `Host`
    /// header the caller set is never replaced.
    #[default]
    Service,
    /// The chosen endpoint's address (the transport's own default once the URI is rewritten).
    Endpoint,
}

/// Success-rate ejection (Envoy, gRPC A50): once per interval, endpoints whose success rate
/// is below the mean by more than `stdev_factor` standard deviations are ejected.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct SuccessRate {
    /// How many standard deviations below the mean ejects (default 1.9).
    pub stdev_factor: f64,
    /// Endpoints with at least `request_volume` calls needed for the rule to run (default 5).
    pub minimum_hosts: usize,
    /// Calls an endpoint needs in the interval to be judged (default 100).
    pub request_volume: u32,
}

impl Default for SuccessRate {
    fn default() -> Self {
        Self {
            stdev_factor: 1.9,
            minimum_hosts: 5,
            request_volume: 100,
        }
    }
}

impl SuccessRate {
    /// The defaults with a different minimum of endpoints (set it to 2 or 3 for small
    /// services, whose mean and deviation are then rough).
    pub fn minimum_hosts(mut self, n: usize) -> Self {
        self.minimum_hosts = n;
        self
    }

    /// The defaults with a different call volume per endpoint and interval.
    pub fn request_volume(mut self, n: u32) -> Self {
        self.request_volume = n;
        self
    }
}

/// Failure-percentage ejection (Envoy, gRPC A50): once per interval, endpoints whose failures
/// exceed `threshold` percent of their calls are ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailurePercentage {
    /// Percent of failed calls above which an endpoint is ejected (default 85).
    pub threshold: u8,
    /// Endpoints with at least `request_volume` calls needed for the rule to run (default 5).
    pub minimum_hosts: usize,
    /// Calls an endpoint needs in the interval to be judged (default 50).
    pub request_volume: u32,
}

impl Default for FailurePercentage {
    fn default() -> Self {
        Self {
            threshold: 85,
            minimum_hosts: 5,
            request_volume: 50,
        }
    }
}

impl FailurePercentage {
    /// The defaults with a different threshold.
    pub fn threshold(mut self, percent: u8) -> Self {
        self.threshold = percent;
        self
    }

    /// The defaults with a different minimum of endpoints.
    pub fn minimum_hosts(mut self, n: usize) -> Self {
        self.minimum_hosts = n;
        self
    }

    /// The defaults with a different call volume per endpoint and interval.
    pub fn request_volume(mut self, n: u32) -> Self {
        self.request_volume = n;
        self
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) pick: Pick,
    pub(crate) host: HostHeader,
    pub(crate) consecutive_failures: Option<u32>,
    pub(crate) interval: Duration,
    pub(crate) success_rate: Option<SuccessRate>,
    pub(crate) failure_percentage: Option<FailurePercentage>,
    pub(crate) ejection_base: Duration,
    pub(crate) ejection_max: Duration,
    pub(crate) max_ejection_percent: u8,
    pub(crate) failure_penalty: Duration,
    pub(crate) decay: Duration,
    pub(crate) default_rtt: Duration,
    pub(crate) fail_fast: bool,
    pub(crate) seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pick: Pick::default(),
            host: HostHeader::default(),
            consecutive_failures: Some(5),
            interval: Duration::from_secs(10),
            success_rate: Some(SuccessRate::default()),
            failure_percentage: Some(FailurePercentage::default()),
            ejection_base: Duration::from_secs(30),
            ejection_max: Duration::from_secs(300),
            max_ejection_percent: 10,
            failure_penalty: Duration::from_secs(2),
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
            fail_fast: false,
            seed: None,
        }
    }
}

/// Configures a [`BalanceLayer`].
///
/// Defaults (Envoy's and gRPC A50's outlier detection, linkerd's load estimate):
///
/// | setting | default |
/// |---|---|
/// | pick | power of two choices over peak-EWMA latency × (in flight + 1) |
/// | after a failure, the endpoint loses every choice against one that has not failed | for 2 s |
/// | estimate decay | 10 s; the first endpoint starts at 30 ms, later ones at the others' mean |
/// | consecutive failures that eject | 5 |
/// | evaluation interval | 10 s |
/// | success-rate ejection | mean − 1.9 σ, ≥ 5 endpoints with ≥ 100 calls each |
/// | failure-percentage ejection | > 85 %, ≥ 5 endpoints with ≥ 50 calls each |
/// | ejection time | 30 s × ejections so far, at most 300 s; one less per healthy interval |
/// | ejected at once | at most 10 % of the endpoints, at least one when there are two, never all |
/// | `Host` | the service's name ([`HostHeader::Service`]) |
///
/// ```
/// use std::time::Duration;
/// use steadfast_balance::{BalanceLayer, FailurePercentage, Pick};
///
/// let layer = BalanceLayer::builder()
///     .endpoints(["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])
///     .consecutive_failures(Some(3))
///     .failure_percentage(Some(FailurePercentage::default().minimum_hosts(3)))
///     .max_ejection_percent(34)
///     .build()
///     .unwrap();
/// assert_eq!(layer.handle().list().len(), 3);
///
/// // An address that is not one is refused with what to change.
/// let err = BalanceLayer::builder().endpoints(["not an address"]).build().unwrap_err();
/// assert!(err.to_string().contains("not an address"));
/// # let _ = Pick::RoundRobin;
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct BalanceBuilder<C = DefaultClassifier> {
    config: Config,
    endpoints: Vec<String>,
    classifier: C,
}

impl<C> BalanceBuilder<C> {
    /// The service's endpoints (`host:port`), replacing any given before. More can join and
    /// leave later through the layer's [`handle`](BalanceLayer::handle).
    pub fn endpoints<I, A>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: AsRef<str>,
    {
        self.endpoints = endpoints
            .into_iter()
            .map(|a| a.as_ref().to_owned())
            .collect();
        self
    }

    /// How an endpoint is chosen (default [`Pick::PowerOfTwoChoices`]).
    pub fn pick(mut self, pick: Pick) -> Self {
        self.config.pick = pick;
        self
    }

    /// What the `Host` header carries (default [`HostHeader::Service`]).
    pub fn host_header(mut self, host: HostHeader) -> Self {
        self.config.host = host;
        self
    }

    /// Eject an endpoint after this many failures in a row (default 5; `None` turns the rule
    /// off).
    pub fn consecutive_failures(mut self, n: Option<u32>) -> Self {
        self.config.consecutive_failures = n;
        self
    }

    /// How often the success-rate and failure-percentage rules run (default 10 s).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.config.interval = interval;
        self
    }

    /// The success-rate rule (`None` turns it off).
    pub fn success_rate(mut self, rule: Option<SuccessRate>) -> Self {
        self.config.success_rate = rule;
        self
    }

    /// The failure-percentage rule (`None` turns it off).
    pub fn failure_percentage(mut self, rule: Option<FailurePercentage>) -> Self {
        self.config.failure_percentage = rule;
        self
    }

    /// The first ejection's time and the longest (defaults 30 s and 300 s): the n-th ejection
    /// lasts `base × n`, at most `max`.
    pub fn ejection_time(mut self, base: Duration, max: Duration) -> Self {
        self.config.ejection_base = base;
        self.config.ejection_max = max;
        self
    }

    /// At most this share of the endpoints is ejected at once (default 10 %; at least one
    /// endpoint of two or more can be, and never all).
    pub fn max_ejection_percent(mut self, percent: u8) -> Self {
        self.config.max_ejection_percent = percent;
        self
    }

    /// For how long after a failure the endpoint loses every choice against one that has not
    /// failed in that time, whatever their loads (default 2 s): a retry goes elsewhere. Then
    /// it competes on its load again (an endpoint that keeps failing is what ejection is for).
    /// Zero turns it off.
    pub fn failure_penalty(mut self, penalty: Duration) -> Self {
        self.config.failure_penalty = penalty;
        self
    }

    /// The time constant of the latency estimate (default 10 s), and the latency the first
    /// endpoints start with (default 30 ms; one that joins later starts at the mean of the
    /// others).
    pub fn load_estimate(mut self, decay: Duration, default_rtt: Duration) -> Self {
        self.config.decay = decay;
        self.config.default_rtt = default_rtt;
        self
    }

    /// With no endpoint in service, fail the call at once with
    /// [`NoEndpoint`](crate::error::NoEndpoint) instead of sending it to an ejected one
    /// (default off: calls still go somewhere).
    pub fn fail_fast(mut self, on: bool) -> Self {
        self.config.fail_fast = on;
        self
    }

    /// Seeds the endpoint draws (shared by every clone) for reproducible tests.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = Some(seed);
        self
    }

    /// Replaces what counts as a failure.
    pub fn classifier<C2>(self, classifier: C2) -> BalanceBuilder<C2> {
        BalanceBuilder {
            config: self.config,
            endpoints: self.endpoints,
            classifier,
        }
    }

    /// Builds the layer.
    ///
    /// # Errors
    ///
    /// [`InvalidBalanceConfig`] for an endpoint that is not a `host:port` authority, a zero
    /// interval, decay or ejection time, an ejection cap below its base, a percentage over
    /// 100, a zero consecutive-failure count, a success-rate factor that is not a positive
    /// number, or a rule that needs fewer than one endpoint.
    pub fn build(self) -> Result<BalanceLayer<C>, InvalidBalanceConfig> {
        let c = &self.config;
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for e in &self.endpoints {
            endpoints.push(parse_endpoint(e)?);
        }
        if c.interval.is_zero() {
            return Err(InvalidBalanceConfig::Zero("interval"));
        }
        if c.decay.is_zero() {
            return Err(InvalidBalanceConfig::Zero("load_estimate decay"));
        }
        if c.ejection_base.is_zero() {
            return Err(InvalidBalanceConfig::Zero("ejection_time base"));
        }
        if c.ejection_max < c.ejection_base {
            return Err(InvalidBalanceConfig::EjectionMaxBelowBase);
        }
        if c.max_ejection_percent > 100 {
            return Err(InvalidBalanceConfig::Percent(
                "max_ejection_percent",
                c.max_ejection_percent,
            ));
        }
        if c.consecutive_failures == Some(0) {
            return Err(InvalidBalanceConfig::Zero("consecutive_failures"));
        }
        if let Some(r) = &c.success_rate {
            if !(r.stdev_factor.is_finite() && r.stdev_factor > 0.0) {
                return Err(InvalidBalanceConfig::StdevFactor);
            }
            if r.minimum_hosts == 0 {
                return Err(InvalidBalanceConfig::Zero("success_rate minimum_hosts"));
            }
        }
        if let Some(r) = &c.failure_percentage {
            if r.threshold > 100 {
                return Err(InvalidBalanceConfig::Percent(
                    "failure_percentage threshold",
                    r.threshold,
                ));
            }
            if r.minimum_hosts == 0 {
                return Err(InvalidBalanceConfig::Zero(
                    "failure_percentage minimum_hosts",
                ));
            }
        }
        Ok(BalanceLayer {
            shared: Some(Arc::new(Shared::new(
                self.config,
                self.classifier,
                endpoints,
            ))),
        })
    }
}

/// An authority a call can go to: a host and a port other than 0, no userinfo.
pub(crate) fn valid_endpoint(a: &Authority) -> bool {
    a.port_u16().is_some_and(|p| p != 0) && !a.host().is_empty() && !a.as_str().contains('@')
}

fn parse_endpoint(s: &str) -> Result<Authority, InvalidBalanceConfig> {
    let bad = || InvalidBalanceConfig::Endpoint(s.to_owned());
    let a: Authority = s.parse().map_err(|_| bad())?;
    if !valid_endpoint(&a) {
        return Err(bad());
    }
    Ok(a)
}

/// Balances calls over the endpoints of one service: picks an endpoint per call and rewrites
/// the request's authority to it, and ejects endpoints that fail (passive health).
///
/// A layer built with endpoints balances; [`BalanceLayer::disabled`] passes every request
/// through untouched (what the client preset uses for a stack built for one address).
///
/// Put it inside the retry layer and outside a per-authority breaker and the per-attempt
/// timeout: each attempt is balanced on its own, a failed endpoint loses the next choice (so
/// a retry goes elsewhere), and the breakers, keyed by the rewritten authority, are per
/// endpoint.
///
/// # Example
///
/// ```
/// use steadfast_balance::BalanceLayer;
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = BalanceLayer::builder()
///     .endpoints(["10.0.0.1:8080", "10.0.0.2:8080"])
///     .build()
///     .unwrap();
/// // The transport sees the chosen endpoint; `Host` still names the service.
/// let transport = service_fn(|req: http::Request<()>| async move {
///     let to = req.uri().authority().unwrap().to_string();
///     let host = req.headers()["host"].to_str().unwrap().to_owned();
///     Ok::<_, std::convert::Infallible>(http::Response::new((to, host)))
/// });
/// let req = http::Request::get("http://orders/orders/7").body(()).unwrap();
/// let (to, host) = layer.layer(transport).oneshot(req).await.unwrap().into_body();
/// assert!(to == "10.0.0.1:8080" || to == "10.0.0.2:8080");
/// assert_eq!(host, "orders");
/// # }
/// ```
///
/// # Clone
///
/// The endpoint set, its load estimates and its ejections are shared by every service this
/// layer value (or a clone) makes.
pub struct BalanceLayer<C = DefaultClassifier> {
    pub(crate) shared: Option<Arc<Shared<C>>>,
}

impl<C> Clone for BalanceLayer<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<C> fmt::Debug for BalanceLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceLayer")
            .field("shared", &self.shared)
            .finish()
    }
}

impl BalanceLayer {
    /// Balances over `endpoints` with the defaults (see [`BalanceBuilder`]).
    pub fn new(endpoints: impl IntoIterator<Item = Authority>) -> Self {
        Self {
            shared: Some(Arc::new(Shared::new(
                Config::default(),
                DefaultClassifier::new(),
                endpoints.into_iter().collect(),
            ))),
        }
    }

    /// A builder with the defaults and no endpoints.
    pub fn builder() -> BalanceBuilder {
        BalanceBuilder {
            config: Config::default(),
            endpoints: Vec::new(),
            classifier: DefaultClassifier::new(),
        }
    }
}

impl<C> BalanceLayer<C> {
    /// A layer that passes every request through untouched.
    pub fn disabled() -> Self {
        Self { shared: None }
    }

    /// The handle that lists, adds and removes endpoints while calls run (a disabled layer's
    /// handle manages an empty set that nothing reads).
    pub fn handle(&self) -> EndpointsHandle<C> {
        EndpointsHandle::new(self.shared.clone())
    }

    /// Whether the layer balances (false for [`disabled`](BalanceLayer::disabled)).
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }
}

impl<S, C> Layer<S> for BalanceLayer<C> {
    type Service = Balance<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Balance::new(inner, self.shared.clone())
    }
}
