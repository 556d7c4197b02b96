//! Changing the endpoint set while calls run.

use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use futures_core::Stream;
use http::uri::Authority;

use crate::set::Shared;

/// A change to a service's endpoints, as a discovery source reports it (the shape of tower's
/// `discover::Change`, keyed by address).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// An endpoint joined.
    Insert(Authority),
    /// An endpoint left; calls in flight to it finish.
    Remove(Authority),
}

/// What an endpoint is doing now, for dashboards and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// Its address.
    pub authority: Authority,
    /// Whether it is ejected now.
    pub ejected: bool,
    /// How many times it has been ejected (decays while healthy).
    pub ejections: u32,
    /// Whether its breaker (or a limit below the balancer) refused a call within the failure
    /// penalty (2 s): it gets no call while another endpoint can take one. A refusal does not
    /// eject: the next call after the penalty asks the breaker again.
    pub refusing: bool,
    /// Calls in flight to it.
    pub in_flight: u32,
    /// Its latency estimate now (the peak-EWMA, decayed for the time since its last answer):
    /// with `in_flight`, the load the picks weigh.
    pub latency: Duration,
}

/// Lists and changes the endpoints of a [`BalanceLayer`](crate::BalanceLayer) while calls
/// run. A change never fails a call in flight: an endpoint that leaves drains.
///
/// ```
/// use steadfast_balance::BalanceLayer;
///
/// let layer = BalanceLayer::builder().endpoints(["10.0.0.1:80"]).build().unwrap();
/// let handle = layer.handle();
/// handle.insert("10.0.0.2:80".parse().unwrap());
/// handle.remove(&"10.0.0.1:80".parse().unwrap());
/// let now: Vec<String> = handle.list().iter().map(|e| e.authority.to_string()).collect();
/// assert_eq!(now, ["10.0.0.2:80"]);
/// ```
pub struct EndpointsHandle<C> {
    shared: Option<Arc<Shared<C>>>,
}

impl<C> Clone for EndpointsHandle<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<C> fmt::Debug for EndpointsHandle<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointsHandle")
            .field("shared", &self.shared)
            .finish()
    }
}

impl<C> EndpointsHandle<C> {
    pub(crate) fn new(shared: Option<Arc<Shared<C>>>) -> Self {
        Self { shared }
    }

    /// The endpoints now, in the set's order.
    pub fn list(&self) -> Vec<EndpointStatus> {
        let Some(shared) = &self.shared else {
            return Vec::new();
        };
        let now = shared.now();
        shared
            .endpoints
            .load()
            .iter()
            .map(|ep| EndpointStatus {
                authority: ep.authority.clone(),
                // An ejection whose time is up ends here, not at the next call.
                ejected: !shared.available(ep, now),
                ejections: ep.ejections.load(Relaxed),
                refusing: ep.refusing(now),
                in_flight: ep.in_flight(),
                latency: Duration::from_secs_f64(
                    ep.estimate(now, shared.config.decay.as_secs_f64() * 1e9) / 1e9,
                ),
            })
            .collect()
    }

    /// How many endpoints are ejected now.
    pub fn ejected(&self) -> usize {
        self.list().iter().filter(|e| e.ejected).count()
    }

    /// Replaces the whole set (what a source that lists every endpoint each time, such as a
    /// DNS answer, reports). Endpoints that stay keep their load estimate and ejections; when
    /// the smaller set allows fewer ejected endpoints, the ones ejected longest ago return.
    /// An endpoint that leaves and later comes back starts afresh, not ejected: its source
    /// (a health check passing again, a DNS record back) vouches for it.
    /// An authority that is not an endpoint (no port, port 0, userinfo) is skipped, with a
    /// warning, as the builder would refuse it.
    pub fn set(&self, endpoints: impl IntoIterator<Item = Authority>) {
        if let Some(shared) = &self.shared {
            shared.replace(endpoints.into_iter().collect());
        }
    }

    /// Adds an endpoint (no change if it is there already).
    pub fn insert(&self, endpoint: Authority) {
        self.apply(Change::Insert(endpoint));
    }

    /// Removes an endpoint; calls in flight to it finish.
    pub fn remove(&self, endpoint: &Authority) {
        self.apply(Change::Remove(endpoint.clone()));
    }

    /// Applies one change.
    pub fn apply(&self, change: Change) {
        let Some(shared) = &self.shared else {
            return;
        };
        let mut list: Vec<Authority> = shared
            .endpoints
            .load()
            .iter()
            .map(|ep| ep.authority.clone())
            .collect();
        match change {
            Change::Insert(a) => {
                if !list.contains(&a) {
                    list.push(a);
                }
            }
            Change::Remove(a) => list.retain(|e| *e != a),
        }
        self.set(list);
    }

    /// Follows a discovery stream: every change it yields is applied, until it ends or
    /// yields an error (logged). Abort the returned handle to stop following; following also
    /// stops once the balancer is gone (every clone of its layer, its services and its
    /// handles dropped). Dropping the returned handle alone does not stop it: a tokio
    /// `JoinHandle` dropped detaches its task.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (it is spawned on the current one).
    pub fn follow<St, E>(&self, changes: St) -> tokio::task::JoinHandle<()>
    where
        St: Stream<Item = Result<Change, E>> + Send + 'static,
        E: fmt::Display,
        C: Send + Sync + 'static,
    {
        let following = self.following();
        tokio::spawn(async move {
            let Some(mut following) = following else {
                return;
            };
            let mut changes = std::pin::pin!(changes);
            loop {
                let next = std::future::poll_fn(|cx| changes.as_mut().poll_next(cx));
                let Some(Some(next)) = following.unless_gone(next).await else {
                    return;
                };
                let Some(handle) = following.handle() else {
                    return;
                };
                match next {
                    Ok(change) => handle.apply(change),
                    Err(e) => {
                        tracing::warn!(target: "steadfast::balance", error = %e, "discovery stream failed; endpoints stay as they are");
                        return;
                    }
                }
            }
        })
    }

    /// What a discovery task holds: the set, weakly, and word of its end. `None` for a
    /// handle with no balancer behind it (nothing to follow).
    pub(crate) fn following(&self) -> Option<Following<C>> {
        let Some(shared) = &self.shared else {
            tracing::warn!(target: "steadfast::balance", "this stack has no balancer: nothing follows the discovery source");
            return None;
        };
        Some(Following {
            set: Arc::downgrade(shared),
            gone: shared.gone(),
        })
    }
}

/// A discovery task's hold on the set it follows: it keeps the set alive only while applying
/// a change, so the task ends once the balancer is gone rather than keeping it (and itself)
/// alive.
pub(crate) struct Following<C> {
    set: Weak<Shared<C>>,
    gone: tokio::sync::watch::Receiver<()>,
}

impl<C> Following<C> {
    /// Runs `fut` to its end, unless the set is dropped first (`None`).
    pub(crate) async fn unless_gone<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        let gone = self.gone.changed();
        let mut gone = std::pin::pin!(gone);
        std::future::poll_fn(|cx| {
            // Nothing is ever sent: `changed` ends only when the set's sender is dropped.
            if gone.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            fut.as_mut().poll(cx).map(Some)
        })
        .await
    }

    /// Waits `d`; false when the set is dropped first.
    #[cfg(any(feature = "consul", feature = "dns"))]
    pub(crate) async fn pause(&mut self, d: Duration) -> bool {
        self.unless_gone(tokio::time::sleep(d)).await.is_some()
    }

    /// The set, to change it now; `None` once it is gone.
    pub(crate) fn handle(&self) -> Option<EndpointsHandle<C>> {
        self.set
            .upgrade()
            .map(|shared| EndpointsHandle::new(Some(shared)))
    }
}
