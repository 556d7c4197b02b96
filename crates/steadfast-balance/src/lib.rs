//! Call a service, not an address: balancing with passive health for tower.
//!
//! A [`BalanceLayer`] turns the endpoints of one service into a balanced, healthy set. Each
//! call goes to one endpoint (its request URI's authority is rewritten to it):
//!
//! - **Picking**: power of two choices over a load estimate (a peak-EWMA of latency times
//!   the calls in flight plus one, as linkerd and Finagle weigh endpoints), or round-robin.
//!   Lock-free and O(1) per call; clones share one set with no `Buffer` in front.
//! - **A failure costs the endpoint the next choices**: for 2 s it loses every choice against
//!   an endpoint that has not failed, whatever their loads, so a retry goes elsewhere; then
//!   it competes on its load again. A call refused by an endpoint's own breaker (nothing
//!   was sent) is handed back as [`Rerouted`](error::Rerouted), which a retry layer sends to
//!   another endpoint at once, free of its budget; that endpoint then gets no call for the
//!   failure penalty while another can take it, and the next call after it asks its breaker
//!   again. A refusal does not eject: the breaker alone decides when its endpoint takes
//!   calls again (its open time, its half-open probes, or a hand that closes it), and the
//!   balancer follows within the penalty.
//! - **Outlier ejection** (Envoy, gRPC A50), with the same outcome classification as retry
//!   and breaker: consecutive failures (5), and per interval (10 s) success rate
//!   (mean − 1.9 σ) and failure percentage (85 %). An ejection lasts 30 s × the ejections so
//!   far, at most 300 s; at most 10 % of the endpoints (at least one of two or more, never
//!   all) are ejected at once. An answer the endpoint marked as shed
//!   ([`Class::overloaded`](steadfast_core::Class::overloaded)) costs it the next choices for
//!   the failure penalty, but no outlier rule counts it: a busy endpoint is not ejected.
//! - **Endpoints change while calls run** ([`EndpointsHandle`]): a static list, any stream of
//!   [`Change`]s, your own code, DNS (feature `dns`: A/AAAA or SRV records re-resolved on
//!   their TTL, `Dns`), or the passing instances Consul's health API reports (feature
//!   `consul`, followed with blocking queries, `Consul`); a removed endpoint drains.
//!
//! Where it sits in a client stack:
//!
//! ```text
//! PropagateCorrelationId
//!   Timeout (total)
//!     Retry               a failed attempt is retried; the balancer sends it elsewhere
//!       Balance           <- this crate: picks the endpoint, rewrites the authority
//!         CircuitBreaker  per authority = per endpoint
//!           Timeout (per attempt)
//!             transport   any client that dials the request's authority (hyper-util)
//! ```
//!
//! The transport must connect to the authority in the request URI, as hyper-util's client
//! does. A tonic `Channel` is bound to one address and ignores it: balance gRPC over a
//! hyper-util HTTP/2 client, or use tonic's own balanced channel.
//!
//! A gRPC status that arrives in trailers is not seen by the balancer yet: it judges a
//! streamed gRPC response by its head (the breaker below it, per endpoint, judges the
//! trailers).
//!
//! # Features
//!
//! - `dns`: the DNS source (hickory-resolver).
//! - `consul`: the Consul source (plain HTTP to the agent, as a node's local agent is usually
//!   reached).
//! - `metrics`: the counters below.
//!
//! # Events
//!
//! `tracing` events on target `steadfast::balance`: `balance.ejected` (endpoint, reason:
//! `consecutive_failures`, `success_rate`, `failure_percentage`; ejection_ms, ejections) and
//! `balance.returned` (endpoint). With the `metrics` feature:
//! `steadfast_balance_ejections_total{endpoint, reason}`,
//! `steadfast_balance_returned_total{endpoint}`, and once per interval (when calls run) the
//! gauges `steadfast_balance_endpoint_in_flight{endpoint}`,
//! `steadfast_balance_endpoint_latency_seconds{endpoint}` (the latency estimate the picks
//! weigh) and `steadfast_balance_endpoint_ejected{endpoint}` (1 while ejected). The same load
//! is in [`EndpointsHandle::list`]'s [`EndpointStatus`].

#[cfg(feature = "consul")]
mod consul;
#[cfg(feature = "dns")]
mod dns;
mod endpoint;
pub mod error;
pub mod future;
mod handle;
mod layer;
mod pick;
mod service;
mod set;

#[cfg(feature = "consul")]
pub use consul::Consul;
#[cfg(feature = "dns")]
pub use dns::Dns;
pub use handle::{Change, EndpointStatus, EndpointsHandle};
pub use layer::{BalanceBuilder, BalanceLayer, FailurePercentage, HostHeader, Pick, SuccessRate};
pub use service::Balance;

/// What the benchmarks measure in isolation. Not part of the public API; may change in any
/// release.
#[doc(hidden)]
pub mod __private {
    use crate::Balance;

    /// Chooses an endpoint as a call would (the clock read, the interval check and the pick)
    /// without taking it or calling anything; true when one was chosen.
    pub fn pick<S, C>(balance: &Balance<S, C>) -> bool {
        balance.choose(false)
    }

    /// [`pick`], then takes a reference to the endpoint as a call does (one shared counter
    /// written), dropped at once.
    pub fn pick_and_take<S, C>(balance: &Balance<S, C>) -> bool {
        balance.choose(true)
    }
}

/// Describes this crate's metrics to the installed recorder (help text and unit, which
/// exporters such as Prometheus's print): call it once after installing the recorder.
///
/// ```
/// steadfast_balance::describe_metrics(); // without a recorder: nothing happens
/// ```
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        "steadfast_balance_ejections_total",
        Unit::Count,
        "Endpoints ejected from a balanced service, by endpoint and reason."
    );
    describe_counter!(
        "steadfast_balance_returned_total",
        Unit::Count,
        "Ejected endpoints returned to service when their ejection ran out."
    );
    describe_gauge!(
        "steadfast_balance_endpoint_in_flight",
        Unit::Count,
        "Calls in flight to an endpoint, set once per interval while calls run."
    );
    describe_gauge!(
        "steadfast_balance_endpoint_latency_seconds",
        Unit::Seconds,
        "An endpoint's peak-EWMA latency estimate, set once per interval while calls run."
    );
    describe_gauge!(
        "steadfast_balance_endpoint_ejected",
        Unit::Count,
        "1 while an endpoint is ejected, else 0; set once per interval while calls run."
    );
}
