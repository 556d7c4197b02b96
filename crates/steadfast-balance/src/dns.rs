//! Endpoints from DNS: the addresses of a name (A/AAAA) with a port, or a service's SRV
//! records, re-resolved when their TTL runs out.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{Resolver, TokioResolver};
use http::uri::Authority;

use crate::error::InvalidBalanceConfig;
use crate::handle::EndpointsHandle;

/// What to resolve, and how often: the endpoints of a service from DNS, as Envoy's strict DNS
/// clusters and gRPC's DNS resolver find them.
///
/// - [`Dns::addresses`]: every A and AAAA record of a name, each with the given port.
/// - [`Dns::services`]: the SRV records of a name (`_http._tcp.orders.internal`): each
///   target's addresses with the record's port (every target, whatever its priority and
///   weight: the balancer weighs endpoints by their load). A target whose name has no
///   address is left out; one whose lookup fails fails the whole resolution.
///
/// The name is resolved again when the shortest TTL of the answer runs out, but never sooner
/// than the floor (default 1 s) nor later than the ceiling (default 5 min). Each answer
/// replaces the set: an address that leaves the records leaves the set (its calls in flight
/// drain). A failed resolution (a timeout, a server failure, a name that no longer exists)
/// leaves the set as it is and is tried again after the floor, growing to the ceiling: a
/// name that disappears by mistake does not take the service down.
///
/// The system's resolver configuration is used unless [`name_servers`](Dns::name_servers)
/// names the servers to ask. The tests run against `steadfast_testkit::DnsServer`, a small
/// authoritative server on 127.0.0.1 whose records they change.
///
/// ```
/// use std::time::Duration;
/// use steadfast_balance::Dns;
///
/// let dns = Dns::addresses("orders.internal", 8080)
///     .unwrap()
///     .ttl_bounds(Duration::from_secs(5), Duration::from_secs(60))
///     .unwrap();
/// # let _ = dns;
/// assert!(Dns::addresses("not a name", 80).is_err());
/// ```
#[derive(Clone)]
pub struct Dns {
    name: String,
    port: Option<u16>,
    floor: Duration,
    ceiling: Duration,
    name_servers: Vec<SocketAddr>,
}

impl fmt::Debug for Dns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dns")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("floor", &self.floor)
            .field("ceiling", &self.ceiling)
            .field("name_servers", &self.name_servers)
            .finish()
    }
}

fn check_name(name: &str) -> Result<String, InvalidBalanceConfig> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(name.to_owned())
    } else {
        Err(InvalidBalanceConfig::Dns(format!(
            "{name:?} is not a DNS name: give labels of letters, digits, '-' or '_' joined by dots"
        )))
    }
}

impl Dns {
    /// Every A and AAAA record of `name`, each with `port`.
    ///
    /// # Errors
    ///
    /// [`InvalidBalanceConfig::Dns`] for a name that is not a DNS name or a port of 0.
    pub fn addresses(name: &str, port: u16) -> Result<Self, InvalidBalanceConfig> {
        if port == 0 {
            return Err(InvalidBalanceConfig::Dns("port 0 cannot be called".into()));
        }
        Ok(Self {
            name: check_name(name)?,
            port: Some(port),
            floor: Duration::from_secs(1),
            ceiling: Duration::from_secs(300),
            name_servers: Vec::new(),
        })
    }

    /// The SRV records of `name`: each target's addresses with the record's port.
    ///
    /// # Errors
    ///
    /// [`InvalidBalanceConfig::Dns`] for a name that is not a DNS name.
    pub fn services(name: &str) -> Result<Self, InvalidBalanceConfig> {
        Ok(Self {
            port: None,
            ..Self::addresses(name, 1)?
        })
    }

    /// The shortest and longest time between resolutions (defaults 1 s and 5 min); the
    /// answer's TTL decides within them.
    ///
    /// # Errors
    ///
    /// [`InvalidBalanceConfig::Dns`] for a zero floor or a ceiling below the floor.
    pub fn ttl_bounds(
        mut self,
        floor: Duration,
        ceiling: Duration,
    ) -> Result<Self, InvalidBalanceConfig> {
        if floor.is_zero() || ceiling < floor {
            return Err(InvalidBalanceConfig::Dns(
                "the TTL floor must be above zero and the ceiling at least the floor".into(),
            ));
        }
        self.floor = floor;
        self.ceiling = ceiling;
        Ok(self)
    }

    /// Ask these name servers (UDP, then TCP for long answers) instead of the system's.
    pub fn name_servers(mut self, servers: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.name_servers = servers.into_iter().collect();
        self
    }

    fn resolver(&self) -> Result<TokioResolver, String> {
        let builder = if self.name_servers.is_empty() {
            Resolver::builder_tokio().map_err(|e| e.to_string())?
        } else {
            let mut config = ResolverConfig::new();
            for s in &self.name_servers {
                config.add_name_server(NameServerConfig::new(*s, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(*s, Protocol::Tcp));
            }
            Resolver::builder_with_config(config, TokioConnectionProvider::default())
        };
        let mut opts = ResolverOpts::default();
        // This source decides when to ask again; a cache would answer from the last TTL.
        opts.cache_size = 0;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        Ok(builder.with_options(opts).build())
    }

    /// The endpoints now, and how long the answer may be kept.
    async fn resolve(&self, resolver: &TokioResolver) -> Result<(Vec<Authority>, u32), String> {
        let mut out = Vec::new();
        let mut ttl = u32::MAX;
        match self.port {
            Some(port) => {
                let lookup = resolver
                    .lookup_ip(self.name.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                ttl = min_ttl(lookup.as_lookup()).unwrap_or(ttl);
                out.extend(lookup.iter().map(|ip| authority(ip, port)));
            }
            None => {
                let srv = resolver
                    .srv_lookup(self.name.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                ttl = min_ttl(srv.as_lookup()).unwrap_or(ttl);
                for record in srv.iter() {
                    let target = record.target().to_utf8();
                    match resolver.lookup_ip(target.as_str()).await {
                        Ok(ips) => {
                            ttl = ttl.min(min_ttl(ips.as_lookup()).unwrap_or(ttl));
                            out.extend(ips.iter().map(|ip| authority(ip, record.port())));
                        }
                        // A target with no address is skipped; one whose lookup failed
                        // (a timeout, a server error) fails the whole resolution, so that
                        // the set keeps that instance rather than dropping it.
                        Err(e) if has_no_address(&e) => {
                            tracing::debug!(target: "steadfast::balance", target, error = %e, "SRV target has no address; skipped")
                        }
                        Err(e) => return Err(format!("SRV target {target}: {e}")),
                    }
                }
            }
        }
        Ok((out, ttl))
    }
}

/// Whether a lookup failed because the name has no address (NXDOMAIN, or an empty answer),
/// rather than because no server answered it (SERVFAIL, REFUSED, a timeout).
fn has_no_address(e: &hickory_resolver::ResolveError) -> bool {
    use hickory_resolver::proto::ProtoErrorKind;
    use hickory_resolver::proto::op::ResponseCode;
    matches!(
        e.proto().map(|p| p.kind()),
        Some(ProtoErrorKind::NoRecordsFound {
            response_code: ResponseCode::NXDomain | ResponseCode::NoError,
            ..
        })
    )
}

/// The shortest TTL of an answer's records.
fn min_ttl(lookup: &hickory_resolver::lookup::Lookup) -> Option<u32> {
    lookup.records().iter().map(|r| r.ttl()).min()
}

fn authority(ip: IpAddr, port: u16) -> Authority {
    let s = match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    };
    s.parse()
        .expect("an IP address and a port make an authority")
}

impl<C: Send + Sync + 'static> EndpointsHandle<C> {
    /// Follows `dns`: the set becomes what the name resolves to, and is resolved again when
    /// the answer's TTL runs out (see [`Dns`]). Spawned on the current tokio runtime; call it
    /// from inside one. Abort the returned handle to stop following; following also stops
    /// once the balancer is gone (every clone of its layer, its services and its handles
    /// dropped). Dropping the returned handle alone does not stop it: a tokio `JoinHandle`
    /// dropped detaches its task.
    pub fn follow_dns(&self, dns: Dns) -> tokio::task::JoinHandle<()> {
        let following = self.following();
        tokio::spawn(async move {
            let Some(mut following) = following else {
                return;
            };
            let resolver = match dns.resolver() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(target: "steadfast::balance", error = %e, "no DNS resolver; endpoints stay as they are");
                    return;
                }
            };
            let mut retry = dns.floor;
            loop {
                let Some(answer) = following.unless_gone(dns.resolve(&resolver)).await else {
                    return;
                };
                let wait = match answer {
                    Ok((list, ttl)) if !list.is_empty() => {
                        let Some(handle) = following.handle() else {
                            return;
                        };
                        handle.set(list);
                        retry = dns.floor;
                        Duration::from_secs(u64::from(ttl)).clamp(dns.floor, dns.ceiling)
                    }
                    Ok(_) => {
                        tracing::warn!(target: "steadfast::balance", name = dns.name, "DNS answer with no address; endpoints stay as they are");
                        retry = retry.saturating_mul(2).min(dns.ceiling);
                        retry
                    }
                    Err(e) => {
                        tracing::warn!(target: "steadfast::balance", name = dns.name, error = %e, "DNS resolution failed; endpoints stay as they are");
                        let wait = retry;
                        retry = retry.saturating_mul(2).min(dns.ceiling);
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
