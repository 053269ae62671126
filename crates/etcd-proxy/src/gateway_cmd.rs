//! `etcd-proxy gateway start`: turns flags into a running gateway the way etcd's `startGateway`
//! does (same checks, same order, same messages where etcd has one), then serves until SIGTERM
//! or SIGINT and drains.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use backend::endpoint::split_host_port;
use backend::{Dns, Endpoint};
use gateway::{Config, Gateway};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ExitError;
use crate::cli::GatewayStartArgs;
use crate::duration::GoDuration;

/// etcd turns `--retry-delay=0` into five minutes inside its tcpproxy; so do we.
const ZERO_RETRY_DELAY: Duration = Duration::from_secs(300);

/// Validates the flags, binds, and serves until a shutdown signal.
pub async fn run(args: GatewayStartArgs) -> Result<(), ExitError> {
    let mut retry_delay = non_negative("--retry-delay", args.retry_delay)?;
    if retry_delay.is_zero() {
        retry_delay = ZERO_RETRY_DELAY;
    }
    let dial_timeout = non_negative("--dial-timeout", args.dial_timeout)?;
    if dial_timeout.is_zero() {
        return Err(ExitError::new("--dial-timeout must be greater than 0"));
    }
    let health_check_interval =
        non_negative("--health-check-interval", args.health_check_interval)?;
    let drain_timeout = non_negative("--drain-timeout", args.drain_timeout)?;
    let dns = crate::discovery::dns(&args.discovery_dns_server)?;

    let endpoints = endpoints(&args, &dns, dial_timeout).await?;

    let (lhost, lport) = split_host_port(&args.listen_addr).ok_or_else(|| {
        ExitError::new(format!(
            "failed to validate listen address: {}",
            args.listen_addr
        ))
    })?;
    let lport: u16 = lport.parse().map_err(|_| {
        ExitError::new(format!(
            "failed to validate listen address: {}",
            args.listen_addr
        ))
    })?;
    let listen_addrs = dns
        .resolve(lhost, lport)
        .await
        .map_err(|_| ExitError::new(format!("failed to resolve listen host: {lhost}")))?;
    for ep in &endpoints {
        let addrs = dns
            .resolve(&ep.host, ep.port)
            .await
            .map_err(|_| ExitError::new(format!("failed to resolve endpoint host: {}", ep.host)))?;
        if let Some(a) = addrs.iter().find(|a| is_self(a, &listen_addrs)) {
            return Err(ExitError::new(format!(
                "SRV or endpoint ({}->{}) should not resolve to the gateway listen addr ({})",
                ep, a, args.listen_addr
            )));
        }
    }
    if endpoints.is_empty() {
        return Err(ExitError::new("no endpoints found"));
    }

    let listener = TcpListener::bind(listen_addrs[0]).await.map_err(|e| {
        ExitError::new(format!(
            "listen tcp {}: bind: {}",
            listen_addrs[0],
            backend::io_error_text(&e)
        ))
    })?;
    let metrics_listener = match metrics_addr(&args.metrics_addr)? {
        Some(addr) => Some(TcpListener::bind(&addr).await.map_err(|e| {
            ExitError::new(format!(
                "listen tcp {addr} (--metrics-addr): {}",
                backend::io_error_text(&e)
            ))
        })?),
        None => None,
    };

    let config = Config {
        endpoints,
        retry_delay,
        dial_timeout,
        health_check_interval,
        drain_timeout,
        dns,
    };
    let gw = Gateway::new(config);
    let stop = CancellationToken::new();
    let metrics_task = metrics_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(address = %addr, "serving gateway metrics");
        }
        tokio::spawn(gateway::serve_metrics(
            l,
            gw.clone(),
            stop.clone().cancelled_owned(),
        ))
    });
    crate::systemd::notify_ready();
    let signal = {
        let stop = stop.clone();
        async move {
            crate::signals::shutdown_signal().await;
            stop.cancel();
        }
    };
    gw.serve(listener, signal).await;
    stop.cancel();
    if let Some(task) = metrics_task {
        // A scraper that never finishes its request must not keep the process alive: the
        // metrics listener gets the same drain budget as client connections.
        let _ = tokio::time::timeout(drain_timeout, task).await;
    }
    Ok(())
}

fn non_negative(flag: &str, d: GoDuration) -> Result<Duration, ExitError> {
    d.to_std()
        .ok_or_else(|| ExitError::new(format!("{flag} must not be negative (got {d})")))
}

/// SRV discovery when asked for (falling back to `--endpoints` when it finds nothing usable, as
/// etcd does), else `--endpoints`.
async fn endpoints(
    args: &GatewayStartArgs,
    dns: &Dns,
    dial_timeout: Duration,
) -> Result<Vec<Endpoint>, ExitError> {
    let flags = crate::discovery::SrvFlags {
        domain: &args.discovery_srv,
        name: &args.discovery_srv_name,
        insecure: args.insecure_discovery,
        ca: (!args.trusted_ca_file.is_empty()).then(|| Path::new(&args.trusted_ca_file)),
        timeout: dial_timeout,
    };
    if let Some(found) = crate::discovery::srv_endpoints(dns, flags).await? {
        return Ok(found);
    }
    args.endpoints
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| Endpoint::parse(e).map_err(|err| ExitError::new(err.to_string())))
        .collect()
}

/// Would dialing `addr` reach the gateway's own listener? Besides etcd's exact-address check,
/// a wildcard listener also catches loopback and wildcard endpoints on the same port.
fn is_self(addr: &SocketAddr, listen: &[SocketAddr]) -> bool {
    listen.iter().any(|l| {
        l.port() == addr.port()
            && (l.ip() == addr.ip()
                || (l.ip().is_unspecified()
                    && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
    })
}

/// `--metrics-addr`: `host:port` or `http://host:port`; empty turns it off.
fn metrics_addr(flag: &str) -> Result<Option<String>, ExitError> {
    if flag.is_empty() {
        return Ok(None);
    }
    let bare = flag
        .strip_prefix("http://")
        .unwrap_or(flag)
        .trim_end_matches('/');
    if bare.contains("://") {
        return Err(ExitError::new(format!(
            "invalid --metrics-addr {flag:?}: only http:// is supported"
        )));
    }
    match split_host_port(bare) {
        Some((host, port)) if port.parse::<u16>().is_ok() => {
            let host = if host.is_empty() { "0.0.0.0" } else { host };
            let host = if host.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6()) {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            Ok(Some(format!("{host}:{port}")))
        }
        _ => Err(ExitError::new(format!(
            "invalid --metrics-addr {flag:?}: want host:port"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_detection() {
        let listen: Vec<SocketAddr> = vec!["127.0.0.1:23790".parse().unwrap()];
        assert!(is_self(&"127.0.0.1:23790".parse().unwrap(), &listen));
        assert!(!is_self(&"127.0.0.1:2379".parse().unwrap(), &listen));
        let any: Vec<SocketAddr> = vec!["0.0.0.0:23790".parse().unwrap()];
        assert!(is_self(&"127.0.0.1:23790".parse().unwrap(), &any));
        assert!(!is_self(&"10.0.0.1:23790".parse().unwrap(), &listen));
    }

    #[test]
    fn metrics_addr_forms() {
        assert_eq!(metrics_addr("").unwrap(), None);
        assert_eq!(
            metrics_addr("127.0.0.1:9000").unwrap().as_deref(),
            Some("127.0.0.1:9000")
        );
        assert_eq!(
            metrics_addr("http://127.0.0.1:9000/").unwrap().as_deref(),
            Some("127.0.0.1:9000")
        );
        assert_eq!(
            metrics_addr("http://[::1]:9000").unwrap().as_deref(),
            Some("[::1]:9000")
        );
        assert!(metrics_addr("https://127.0.0.1:9000").is_err());
        assert!(metrics_addr("nope").is_err());
    }
}
