//! Endpoints from Consul's health API: the passing instances of a service, followed with
//! blocking queries.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use steadfast_core::__private::rand;
use tokio::time::Instant;

use crate::error::InvalidBalanceConfig;
use crate::handle::EndpointsHandle;

/// The largest health answer read (a service with thousands of instances fits).
const MAX_ANSWER: usize = 16 << 20;

/// Where and what to ask Consul: the passing instances of one service, as its HTTP health
/// API gives them (`GET /v1/health/service/<service>?passing`), followed with blocking
/// queries (`index` and `wait`), so a change reaches the balancer as soon as Consul knows it.
///
/// Follow it with [`EndpointsHandle::follow_consul`]. What Consul answers replaces the set:
/// an instance that stops passing its checks leaves (its calls in flight drain), a new one
/// joins. An answer with no passing instance empties the set (calls then fail fast with
/// [`NoEndpoint`](crate::error::NoEndpoint)). While Consul cannot be reached or answers an
/// error, the set stays as it is and the query is retried with a growing backoff (1 s to
/// 30 s, jittered). An index that goes backwards (a Consul restart) starts over, as Consul's
/// documentation asks.
///
/// The tests run against `steadfast_testkit::ConsulServer`, which follows Consul's documented
/// protocol (no Consul agent can be installed where they run).
///
/// ```
/// use std::time::Duration;
/// use steadfast_balance::Consul;
///
/// let consul = Consul::new("http://127.0.0.1:8500", "orders")
///     .unwrap()
///     .wait(Duration::from_secs(60))
///     .tag("v2");
/// # let _ = consul;
/// assert!(Consul::new("127.0.0.1:8500", "orders").is_err()); // a URL, with its scheme
/// ```
#[derive(Clone)]
pub struct Consul {
    base: String,
    service: String,
    wait: Duration,
    token: Option<HeaderValue>,
    tag: Option<String>,
    datacenter: Option<String>,
}

impl fmt::Debug for Consul {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consul")
            .field("base", &self.base)
            .field("service", &self.service)
            .field("wait", &self.wait)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("tag", &self.tag)
            .field("datacenter", &self.datacenter)
            .finish()
    }
}

impl Consul {
    /// Ask the agent at `base` (`http://host:port`) about `service`.
    ///
    /// # Errors
    ///
    /// [`InvalidBalanceConfig::Consul`] when `base` is not an `http://` URL with a host, or
    /// `service` is empty or not a plain name.
    pub fn new(base: &str, service: &str) -> Result<Self, InvalidBalanceConfig> {
        let bad = |why: &str| InvalidBalanceConfig::Consul(format!("{why}: {base:?} {service:?}"));
        let uri: Uri = base.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(bad("the agent's URL must be http://host:port"));
        }
        if service.is_empty()
            || !service
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(bad(
                "the service name must be letters, digits, '-', '_' or '.'",
            ));
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            service: service.to_owned(),
            wait: Duration::from_secs(300),
            token: None,
            tag: None,
            datacenter: None,
        })
    }

    /// How long one blocking query may wait for a change (default 5 min; Consul caps it at
    /// 10 min).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait.clamp(Duration::from_secs(1), Duration::from_secs(600));
        self
    }

    /// An ACL token, sent as `X-Consul-Token` (never logged).
    ///
    /// # Errors
    ///
    /// [`InvalidBalanceConfig::Consul`] for a token that is not a valid header value.
    pub fn token(mut self, token: &str) -> Result<Self, InvalidBalanceConfig> {
        let mut v = HeaderValue::from_str(token)
            .map_err(|_| InvalidBalanceConfig::Consul("the token is not a header value".into()))?;
        v.set_sensitive(true);
        self.token = Some(v);
        Ok(self)
    }

    /// Only instances with this tag.
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = Some(tag.to_owned());
        self
    }

    /// Ask about this datacenter instead of the agent's own.
    pub fn datacenter(mut self, dc: &str) -> Self {
        self.datacenter = Some(dc.to_owned());
        self
    }

    fn url(&self, index: u64) -> String {
        let mut url = format!(
            "{}/v1/health/service/{}?passing&index={index}&wait={}s",
            self.base,
            self.service,
            self.wait.as_secs()
        );
        if let Some(tag) = &self.tag {
            url.push_str("&tag=");
            url.push_str(&percent(tag));
        }
        if let Some(dc) = &self.datacenter {
            url.push_str("&dc=");
            url.push_str(&percent(dc));
        }
        url
    }
}

fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The endpoints in one health answer: `Service.Address` (or the node's address when the
/// service has none) and `Service.Port` of every entry; entries that do not make an
/// address are skipped.
fn endpoints(body: &[u8]) -> Result<Vec<Authority>, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let entries = v.as_array().ok_or("the answer is not a JSON array")?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let service = &e["Service"];
        let port = service["Port"].as_u64().and_then(|p| u16::try_from(p).ok());
        let address = service["Address"]
            .as_str()
            .filter(|a| !a.is_empty())
            .or_else(|| e["Node"]["Address"].as_str());
        let (Some(port), Some(address)) = (port, address) else {
            continue;
        };
        // A bare IPv6 address gets its brackets; any other address with a colon (one that
        // carries a port of its own, say) is not one.
        let authority = if address.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("[{address}]:{port}")
        } else if address.contains(':') && !address.starts_with('[') {
            tracing::debug!(target: "steadfast::balance", address, "consul entry skipped: not an address");
            continue;
        } else {
            format!("{address}:{port}")
        };
        match authority.parse::<Authority>() {
            Ok(a) if port != 0 => out.push(a),
            _ => {
                tracing::debug!(target: "steadfast::balance", authority, "consul entry skipped: not an address")
            }
        }
    }
    Ok(out)
}

impl<C: Send + Sync + 'static> EndpointsHandle<C> {
    /// Follows `consul`: the set becomes the service's passing instances and follows them as
    /// they change (see [`Consul`]). Spawned on the current tokio runtime; call it from inside
    /// one. Abort the returned handle to stop following; following also stops once the
    /// balancer is gone (every clone of its layer, its services and its handles dropped),
    /// a query in flight abandoned. Dropping the returned handle alone does not stop it: a
    /// tokio `JoinHandle` dropped detaches its task.
    pub fn follow_consul(&self, consul: Consul) -> tokio::task::JoinHandle<()> {
        let following = self.following();
        tokio::spawn(async move {
            let Some(mut following) = following else {
                return;
            };
            let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
            let (mut index, mut failures) = (0u64, 0u32);
            loop {
                let asked = Instant::now();
                let Some(answer) = following.unless_gone(query(&client, &consul, index)).await
                else {
                    return;
                };
                let wait = match answer {
                    Ok((next, list)) => {
                        failures = 0;
                        // An index that goes backwards means Consul restarted: start over.
                        let next = if next < index { 0 } else { next };
                        let unchanged = next == index;
                        index = next;
                        let Some(handle) = following.handle() else {
                            return;
                        };
                        handle.set(list);
                        // A server that answers at once without a change must not be asked
                        // in a tight loop.
                        if unchanged && asked.elapsed() < Duration::from_millis(100) {
                            Duration::from_secs(1)
                        } else {
                            continue;
                        }
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let backoff =
                            Duration::from_secs(1 << failures.min(5)).min(Duration::from_secs(30));
                        let jitter = rand::unit(rand::next(rand::random_seed(4)));
                        let wait = backoff.mul_f64(0.5 + jitter / 2.0);
                        tracing::warn!(target: "steadfast::balance", error = %e, retry_in_ms = wait.as_millis() as u64, "consul query failed; endpoints stay as they are");
                        wait
                    }
                };
                if !following.pause(wait).await {
                    return;
                }
            }
        })
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// One blocking query, its answer read whole, within the query's wait (and Consul's jitter)
/// plus 5 s: an agent that stalls, before its answer's head or within its body, is given up
/// on and asked again.
async fn query(
    client: &HttpClient,
    consul: &Consul,
    index: u64,
) -> Result<(u64, Vec<Authority>), String> {
    let mut req = Request::get(consul.url(index))
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    if let Some(t) = &consul.token {
        req.headers_mut().insert("x-consul-token", t.clone());
    }
    // Consul adds up to wait/16 of jitter to a blocking query's wait.
    let limit = consul.wait + consul.wait / 16 + Duration::from_secs(5);
    let exchange = async {
        let res = client.request(req).await.map_err(|e| e.to_string())?;
        if res.status() != StatusCode::OK {
            return Err(format!("consul answered {}", res.status()));
        }
        let next = res
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("no X-Consul-Index in the answer")?;
        let body = Limited::new(res.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((next, body))
    };
    let (next, body) = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| "no whole answer within the wait".to_owned())??;
    Ok((next, endpoints(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_gives_service_addresses_or_node_addresses() {
        let body = br#"[
            {"Node":{"Address":"10.0.0.9"},"Service":{"Address":"10.0.0.1","Port":8080}},
            {"Node":{"Address":"10.0.0.2"},"Service":{"Address":"","Port":8081}},
            {"Node":{"Address":"fe80::1"},"Service":{"Address":"","Port":8082}},
            {"Node":{"Address":"10.0.0.3"},"Service":{"Address":"x y","Port":1}},
            {"Node":{"Address":"10.0.0.4"},"Service":{"Address":"10.0.0.4","Port":0}},
            {"Node":{"Address":"10.0.0.5"},"Service":{"Address":"10.0.0.5","Port":70000}},
            {"Node":{"Address":"10.0.0.6"},"Service":{"Address":"10.0.0.6:9","Port":8083}},
            {"Node":{"Address":"10.0.0.7"},"Service":{"Address":"orders-3.internal:9","Port":8084}},
            {"Node":{"Address":"10.0.0.8"},"Service":{"Address":"[::2]","Port":8085}},
            {"Node":{},"Service":{}}
        ]"#;
        let got: Vec<String> = endpoints(body)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "10.0.0.1:8080",
                "10.0.0.2:8081",
                "[fe80::1]:8082",
                "[::2]:8085"
            ]
        );
        assert!(endpoints(b"{}").is_err());
        assert!(endpoints(b"not json").is_err());
    }

    #[test]
    fn the_query_asks_for_passing_instances_with_the_index() {
        let c = Consul::new("http://127.0.0.1:8500/", "orders")
            .unwrap()
            .tag("v 2")
            .datacenter("eu-1")
            .wait(Duration::from_secs(30));
        assert_eq!(
            c.url(42),
            "http://127.0.0.1:8500/v1/health/service/orders?passing&index=42&wait=30s&tag=v%202&dc=eu-1"
        );
        assert!(Consul::new("http://127.0.0.1:8500", "orders/../x").is_err());
        assert!(Consul::new("https://consul:8501", "orders").is_err());
    }
}
