//! Name resolution for member addresses and SRV records. Either the machine's resolver, or one
//! DNS server given by address, so that tests (and operators) can point discovery at a server of
//! their choosing without touching `/etc/resolv.conf`.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// A DNS failure, with the name that was asked for (Go-like wording, as etcd prints it).
#[derive(Debug, Clone, thiserror::Error)]
#[error("lookup {name}: {reason}")]
pub struct DnsError {
    /// The name looked up.
    pub name: String,
    /// What went wrong.
    pub reason: String,
}

/// One SRV answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvRecord {
    /// Target host, fully qualified with its trailing dot.
    pub target: String,
    /// Port on the target.
    pub port: u16,
    /// Lower is preferred.
    pub priority: u16,
    /// Relative share within a priority.
    pub weight: u16,
}

/// Where names are resolved.
#[derive(Clone)]
pub enum Dns {
    /// getaddrinfo for host names (so `/etc/hosts` works) and `/etc/resolv.conf` for SRV.
    System,
    /// Every query, host names included, goes to this one server over UDP (and TCP on truncation).
    Server(SocketAddr, Box<TokioResolver>),
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dns({})", self.describe())
    }
}

impl Dns {
    /// The machine's resolver.
    pub fn system() -> Dns {
        Dns::System
    }

    /// Only ask the DNS server at `addr`.
    pub fn server(addr: SocketAddr) -> Dns {
        let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
        for conn in &mut ns.connections {
            conn.port = addr.port();
        }
        let config = ResolverConfig::from_parts(None, vec![], vec![ns]);
        let mut opts = ResolverOpts::default();
        opts.attempts = 2;
        opts.timeout = std::time::Duration::from_secs(2);
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build();
        match resolver {
            Ok(r) => Dns::Server(addr, Box::new(r)),
            // Building only fails on options we do not set (DNSSEC, TLS); fall back rather than abort.
            Err(_) => Dns::System,
        }
    }

    /// Describes the resolver for logs (`srv-server` in etcd's discovery log line).
    pub fn describe(&self) -> String {
        match self {
            Dns::System => "system resolver".to_string(),
            Dns::Server(addr, _) => addr.to_string(),
        }
    }

    /// SRV records for `name`, e.g. `_etcd-client._tcp.example.com`.
    pub async fn lookup_srv(&self, name: &str) -> Result<Vec<SrvRecord>, DnsError> {
        let err = |reason: String| DnsError {
            name: name.to_string(),
            reason,
        };
        let system;
        let resolver = match self {
            Dns::Server(_, r) => r,
            Dns::System => {
                system = TokioResolver::builder_tokio()
                    .map_err(|e| err(e.to_string()))?
                    .build()
                    .map_err(|e| err(e.to_string()))?;
                &system
            }
        };
        // A trailing dot makes the name absolute, so no search domain is tried first.
        let fqdn = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        let lookup = resolver
            .srv_lookup(fqdn.as_str())
            .await
            .map_err(|e| err(no_such_host(&e.to_string())))?;
        let records: Vec<SrvRecord> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some(SrvRecord {
                    target: srv.target.to_ascii(),
                    port: srv.port,
                    priority: srv.priority,
                    weight: srv.weight,
                }),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return Err(err("no such host".into()));
        }
        Ok(records)
    }

    /// Every address of `host` (an IP literal resolves to itself).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DnsError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let err = |reason: String| DnsError {
            name: host.to_string(),
            reason,
        };
        let addrs: Vec<SocketAddr> = match self {
            Dns::System => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| err(e.to_string()))?
                .collect(),
            Dns::Server(_, r) => {
                let fqdn = if host.ends_with('.') {
                    host.to_string()
                } else {
                    format!("{host}.")
                };
                let ips = r
                    .lookup_ip(fqdn.as_str())
                    .await
                    .map_err(|e| err(no_such_host(&e.to_string())))?;
                ips.iter().map(|ip| SocketAddr::new(ip, port)).collect()
            }
        };
        if addrs.is_empty() {
            return Err(err("no such host".into()));
        }
        Ok(addrs)
    }
}

/// hickory's "no records found" wording differs from Go's; keep the Go one users search for.
fn no_such_host(msg: &str) -> String {
    if msg.contains("no record") || msg.contains("NXDomain") || msg.contains("NoRecordsFound") {
        "no such host".to_string()
    } else {
        msg.to_string()
    }
}
