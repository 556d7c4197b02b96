//! The errors of this crate.

use std::error::Error;
use std::fmt;

use http::uri::Authority;
use steadfast_core::{BoxError, NotSent, PolicyRejected};

/// A balancer builder was given a setting that cannot work; the message says what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidBalanceConfig {
    /// An endpoint that is not a `host:port` authority.
    Endpoint(String),
    /// A setting that must be at least 1 (or longer than zero).
    Zero(&'static str),
    /// A percentage over 100.
    Percent(&'static str, u8),
    /// The longest ejection time is below the first one.
    EjectionMaxBelowBase,
    /// A success-rate factor that is not a positive number.
    StdevFactor,
    /// A Consul source that cannot work (the agent's URL, the service name, the token).
    Consul(String),
    /// A DNS source that cannot work (the name, the port, the TTL bounds).
    Dns(String),
}

impl fmt::Display for InvalidBalanceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Endpoint(e) => write!(
                f,
                "endpoint {e:?} is not a host:port address: give each endpoint as \
                 \"10.0.0.7:8080\" or \"orders-1.internal:8080\" (no scheme, no path)"
            ),
            Self::Zero(what) => write!(f, "balancer {what} must be at least 1 (or above zero)"),
            Self::Percent(what, v) => write!(f, "balancer {what} must be 0-100 %, got {v}"),
            Self::EjectionMaxBelowBase => {
                f.write_str("balancer ejection_time max must be >= its base: raise max")
            }
            Self::StdevFactor => f.write_str(
                "balancer success_rate stdev_factor must be a positive number (default 1.9)",
            ),
            Self::Consul(why) => write!(f, "consul source: {why}"),
            Self::Dns(why) => write!(f, "dns source: {why}"),
        }
    }
}

impl Error for InvalidBalanceConfig {}

/// No endpoint could take the call: the set is empty, or (with
/// [`fail_fast`](crate::BalanceBuilder::fail_fast)) every endpoint is ejected. Nothing was
/// sent. Its [`source`](Error::source) is [`PolicyRejected`], so a retry layer above neither
/// retries it nor charges its budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoEndpoint {
    empty: bool,
}

impl NoEndpoint {
    pub(crate) fn new(empty: bool) -> Self {
        Self { empty }
    }

    /// Whether the set had no endpoint at all (rather than none in service).
    pub fn is_empty_set(&self) -> bool {
        self.empty
    }
}

impl fmt::Display for NoEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.empty {
            f.write_str("the service has no endpoints")
        } else {
            f.write_str("every endpoint of the service is ejected")
        }
    }
}

impl Error for NoEndpoint {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&PolicyRejected::INSTANCE)
    }
}

/// An endpoint's own breaker refused the call, and other endpoints are in service: nothing
/// was sent, and the endpoint gets no call for the failure penalty while another can take
/// it (it is not ejected: its breaker decides when it takes calls again). Its [`source`](Error::source) is
/// [`NotSent`], so a retry layer above sends the call again, to another endpoint (for any
/// method: nothing reached a server). Without endpoints to go to, the balancer returns the
/// breaker's own refusal instead, which is not retried.
///
/// A body larger than the retry layer's replay cap goes along too: the refused attempt read
/// none of it, so the next attempt takes it over whole.
#[derive(Debug)]
pub struct Rerouted {
    endpoint: Authority,
    refusal: BoxError,
}

impl Rerouted {
    pub(crate) fn new(endpoint: Authority, refusal: BoxError) -> Self {
        Self { endpoint, refusal }
    }

    /// The endpoint that refused.
    pub fn endpoint(&self) -> &Authority {
        &self.endpoint
    }

    /// The refusal (the breaker's error).
    pub fn refusal(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.refusal
    }

    /// The refusal (the breaker's error), owned.
    pub fn into_refusal(self) -> BoxError {
        self.refusal
    }
}

impl fmt::Display for Rerouted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "endpoint {} refused the call ({}); another endpoint can take it",
            self.endpoint, self.refusal
        )
    }
}

impl Error for Rerouted {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&NotSent::INSTANCE)
    }
}
