//! DNS SRV discovery of the members, shared by `gateway start` and `grpc-proxy start` (etcd's
//! `discoverEndpoints`): the same service names, log lines and validation for both front doors.
//! Each falls back to `--endpoints` when nothing usable is found, as etcd does.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use backend::{Dns, Endpoint};

use crate::ExitError;

/// The discovery flags of either command.
#[derive(Debug, Clone, Copy)]
pub struct SrvFlags<'a> {
    /// `--discovery-srv`: the domain; empty turns discovery off.
    pub domain: &'a str,
    /// `--discovery-srv-name`.
    pub name: &'a str,
    /// `--insecure-discovery`: take `http` records, and `https` ones unchecked.
    pub insecure: bool,
    /// The CA `https` members must present a certificate of (`--trusted-ca-file` for the
    /// gateway, `--cacert` for the gRPC proxy, as in etcd); `None`: the system roots.
    pub ca: Option<&'a Path>,
    /// Budget of each member's TLS handshake.
    pub timeout: Duration,
}

/// `--discovery-dns-server`: that server only, or the system resolver when empty.
pub fn dns(flag: &str) -> Result<Dns, ExitError> {
    if flag.is_empty() {
        return Ok(Dns::system());
    }
    let addr: SocketAddr = flag.parse().map_err(|_| {
        ExitError::new(format!(
            "invalid --discovery-dns-server {flag:?}: want IP:PORT"
        ))
    })?;
    Ok(Dns::server(addr))
}

/// The members found by SRV discovery and, unless `insecure`, validated by a real TLS
/// handshake; `Ok(None)` when discovery is off or found nothing usable (logged), so the caller
/// uses `--endpoints`. Fails (exit 1) only when both SRV lookups fail, like etcd.
pub async fn srv_endpoints(
    dns: &Dns,
    flags: SrvFlags<'_>,
) -> Result<Option<Vec<Endpoint>>, ExitError> {
    if flags.domain.is_empty() {
        return Ok(None);
    }
    let found = backend::srv::discover(dns, flags.domain, flags.name)
        .await
        .map_err(|e| ExitError::new(e.to_string()))?;
    let names: Vec<String> = found.iter().map(|e| e.to_string()).collect();
    tracing::info!(srv_server = %flags.domain, dns = %dns.describe(), endpoints = ?names, "discovered cluster from SRV");
    let usable = if flags.insecure {
        found
    } else {
        tracing::info!(srv_server = %flags.domain, endpoints = ?names, "validating discovered SRV endpoints");
        let checked =
            backend::srv::validate_secure(dns, found, flags.ca, flags.domain, flags.timeout).await;
        for (ep, reason) in &checked.rejected {
            tracing::warn!(srv_server = %flags.domain, endpoint = %ep, error = %reason, "failed to validate discovered endpoints");
        }
        if !checked.valid.is_empty() {
            let valid: Vec<String> = checked.valid.iter().map(|e| e.to_string()).collect();
            tracing::info!(srv_server = %flags.domain, endpoints = ?valid, "using validated discovered SRV endpoints");
        }
        checked.valid
    };
    if usable.is_empty() {
        tracing::warn!(srv_server = %flags.domain, "no usable SRV endpoint; falling back to --endpoints");
        return Ok(None);
    }
    Ok(Some(usable))
}
