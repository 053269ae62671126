//! `etcd-proxy grpc-proxy start`: turns the flags (parsed and checked by
//! [`crate::cli::GrpcProxyStartArgs::validate`]) into a running [`grpc_proxy`], serves until
//! SIGTERM or SIGINT, then drains.
//!
//! Flags whose feature is not built yet are refused when set to anything but their default, so
//! nobody runs a proxy that silently ignores TLS or discovery.

use std::time::Duration;

use backend::Endpoint;
use backend::endpoint::Scheme;
use tokio::net::TcpListener;

use crate::ExitError;
use crate::cli::GrpcProxyStartArgs;
use crate::duration::GoDuration;
use crate::signals::ShutdownSignals;

/// grpc-go's default when `--grpc-keepalive-timeout` or `--dial-keepalive-timeout` is 0.
const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A message size flag: at least 1 byte (grpc-go would fail every call with 0 or less, so the
/// proxy refuses to start instead).
fn message_limit(flag: &str, value: i64) -> Result<usize, ExitError> {
    usize::try_from(value)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| {
            ExitError::new(format!(
                "{flag} must be a positive number of bytes, got {value}"
            ))
        })
}

/// The range cache's bounds, `None` with `--disable-range-cache`; a negative bound is refused.
fn range_cache(
    args: &GrpcProxyStartArgs,
) -> Result<Option<grpc_proxy::cache::CacheLimits>, ExitError> {
    if args.disable_range_cache {
        return Ok(None);
    }
    let bound = |flag: &str, value: i64| {
        usize::try_from(value)
            .map_err(|_| ExitError::new(format!("{flag} must not be negative, got {value}")))
    };
    Ok(Some(grpc_proxy::cache::CacheLimits {
        max_entries: bound("--range-cache-max-entries", args.range_cache_max_entries)?,
        max_bytes: bound("--range-cache-max-bytes", args.range_cache_max_bytes)?,
    }))
}

/// Validates the flags, binds, logs `started gRPC proxy` and serves until a shutdown signal.
pub async fn run(args: GrpcProxyStartArgs) -> Result<(), ExitError> {
    // etcd's order: SRV discovery (a failed lookup ends here), then the client TLS.
    let dns = crate::discovery::dns(&args.discovery_dns_server)?;
    let endpoints = endpoints(&args, &dns).await?;
    let member_tls = member_tls(&args)?;

    let mut config = grpc_proxy::Config::new(endpoints);
    config.member_tls = member_tls;
    config.dns = dns;
    config.dial_keepalive_time = positive("--dial-keepalive-time", args.dial_keepalive_time)?;
    config.dial_keepalive_timeout =
        positive("--dial-keepalive-timeout", args.dial_keepalive_timeout)?
            .unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT);
    config.permit_without_stream = args.permit_without_stream;
    // An empty prefix is no namespace.
    config.namespace = grpc_proxy::namespace::Namespace::new(args.namespace.clone().into_bytes());
    config.max_concurrent_streams = args.max_concurrent_streams;
    config.keepalive_interval =
        positive("--grpc-keepalive-interval", args.grpc_keepalive_interval)?;
    config.keepalive_timeout = positive("--grpc-keepalive-timeout", args.grpc_keepalive_timeout)?
        .unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT);
    // 0 is grpc-go's own default, 5 minutes, as etcd passes it on.
    config.keepalive_min_time =
        positive("--grpc-keepalive-min-time", args.grpc_keepalive_min_time)?
            .unwrap_or(Duration::from_secs(5 * 60));
    config.advertise_client_url = args.advertise_client_url.clone();
    config.hostname = hostname();
    // `validate` has checked that the prefix comes with a TTL of at least 1 and an advertise URL.
    if !args.resolver_prefix.is_empty() {
        config.resolver = Some(grpc_proxy::cluster::Resolver {
            prefix: args.resolver_prefix.clone(),
            ttl: args.resolver_ttl,
        });
    }
    config.auto_sync_interval = positive(
        "--endpoints-auto-sync-interval",
        args.endpoints_auto_sync_interval,
    )?;
    config.pprof = args.enable_pprof;
    config.serializable_ordering = args.experimental_serializable_ordering;
    // As etcd: an empty prefix is no leasing.
    config.leasing_prefix = (!args.experimental_leasing_prefix.is_empty())
        .then(|| args.experimental_leasing_prefix.clone().into_bytes().into());
    config.range_cache = range_cache(&args)?;
    config.limits.send = message_limit("--max-send-bytes", args.max_send_bytes)?;
    config.limits.recv = message_limit("--max-recv-bytes", args.max_recv_bytes)?;
    config.tls = crate::listen_tls::from_args(&args)?;
    config.metrics_tls = args.metrics_addr.starts_with("https://");
    if config.metrics_tls && config.tls.is_none() {
        return Err(ExitError::new(format!(
            "--metrics-addr {}: https needs --cert-file and --key-file, or --auto-tls",
            args.metrics_addr
        )));
    }

    let listener = TcpListener::bind(args.listen_addr.as_str())
        .await
        .map_err(|e| {
            ExitError::new(format!(
                "listen tcp {}: bind: {}",
                args.listen_addr,
                backend::io_error_text(&e)
            ))
        })?;
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| args.listen_addr.clone());
    let metrics_listener = match metrics_addr(&args.metrics_addr)? {
        Some(addr) => {
            let l = TcpListener::bind(addr.as_str()).await.map_err(|e| {
                ExitError::new(format!(
                    "listen tcp {addr} (--metrics-addr): bind: {}",
                    backend::io_error_text(&e)
                ))
            })?;
            let bound = l.local_addr().map(|a| a.to_string()).unwrap_or(addr);
            tracing::info!(address = %bound, "gRPC proxy listening for metrics");
            Some(l)
        }
        None => None,
    };
    // Installed before the ready line, so a signal sent as soon as it appears is not missed.
    let signals = ShutdownSignals::install();
    tracing::info!(address = %address, "started gRPC proxy");
    crate::systemd::notify_ready();
    grpc_proxy::serve_with_metrics(listener, metrics_listener, config, async move {
        signals.recv().await;
    })
    .await;
    Ok(())
}

/// The host name (Go's `os.Hostname`), for the registration metadata; empty if unknown.
fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether any flag of the client TLS toward etcd is set: etcd then gives its client a TLS
/// configuration, which clientv3 also uses for scheme-less endpoints.
fn tls_flags_set(args: &GrpcProxyStartArgs) -> bool {
    !args.cacert.is_empty()
        || !args.cert.is_empty()
        || !args.key.is_empty()
        || args.insecure_skip_tls_verify
}

/// The TLS configuration toward members from `--cacert`, `--cert`, `--key` and
/// `--insecure-skip-tls-verify` (etcd's `newClientCfg`), every file read and checked now; `None`
/// when no flag is set (an `https` member is then verified against the system roots). A client
/// certificate with a Common Name is refused with etcd's message.
fn member_tls(
    args: &GrpcProxyStartArgs,
) -> Result<Option<std::sync::Arc<backend::tls::TlsClientConfig>>, ExitError> {
    if !tls_flags_set(args) {
        return Ok(None);
    }
    let path = |s: &str| (!s.is_empty()).then(|| std::path::PathBuf::from(s));
    let files = backend::tls::ClientFiles {
        ca: path(&args.cacert),
        cert: path(&args.cert),
        key: path(&args.key),
        insecure_skip_verify: args.insecure_skip_tls_verify,
        require_empty_cn: true,
    };
    let config =
        backend::tls::client_config(&files, &[b"h2"]).map_err(|e| ExitError::new(e.to_string()))?;
    if args.insecure_skip_tls_verify {
        tracing::warn!(
            "--insecure-skip-tls-verify was given, this grpc proxy process skips authentication of etcd server TLS certificates. This option should be enabled only for testing purposes."
        );
    }
    tracing::info!(
        cacert = %args.cacert,
        cert = %args.cert,
        key = %args.key,
        insecure_skip_tls_verify = args.insecure_skip_tls_verify,
        "gRPC proxy client TLS"
    );
    Ok(Some(std::sync::Arc::new(config)))
}

/// The members: from SRV records with `--discovery-srv` (validated against `--cacert`, as
/// etcd does), else, or when discovery finds nothing usable, `--endpoints`.
async fn endpoints(
    args: &GrpcProxyStartArgs,
    dns: &backend::Dns,
) -> Result<Vec<Endpoint>, ExitError> {
    let flags = crate::discovery::SrvFlags {
        domain: &args.discovery_srv,
        name: &args.discovery_srv_name,
        insecure: args.insecure_discovery,
        ca: (!args.cacert.is_empty()).then(|| std::path::Path::new(&args.cacert)),
        timeout: Duration::from_secs(5),
    };
    if let Some(found) = crate::discovery::srv_endpoints(dns, flags).await? {
        return Ok(found);
    }
    static_endpoints(args)
}

/// `--endpoints`: `http://` members are plain, `https://` ones TLS, and scheme-less ones TLS
/// only when a TLS flag is set (clientv3's rule).
fn static_endpoints(args: &GrpcProxyStartArgs) -> Result<Vec<Endpoint>, ExitError> {
    let tls = tls_flags_set(args);
    let endpoints = args
        .endpoints
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| Endpoint::parse(e).map_err(|err| ExitError::new(err.to_string())))
        .map(|ep| {
            ep.map(|mut ep| {
                if tls && ep.scheme == Scheme::Unspecified {
                    ep.scheme = Scheme::Https;
                }
                ep
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() {
        return Err(ExitError::new("no endpoints found"));
    }
    Ok(endpoints)
}

/// `--metrics-addr`: a URL with a scheme (`http://host:port`, or `https://host:port` served with
/// the listener's TLS), as etcd requires; empty turns it off.
fn metrics_addr(flag: &str) -> Result<Option<String>, ExitError> {
    if flag.is_empty() {
        return Ok(None);
    }
    let Some(rest) = flag
        .strip_prefix("http://")
        .or_else(|| flag.strip_prefix("https://"))
    else {
        return Err(ExitError::new(format!(
            "invalid --metrics-addr {flag:?}: want a URL with a scheme, e.g. http://127.0.0.1:9090"
        )));
    };
    let host_port = rest.trim_end_matches('/');
    let valid = host_port
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.contains('/') && port.parse::<u16>().is_ok());
    if !valid {
        return Err(ExitError::new(format!(
            "invalid --metrics-addr {flag:?}: want http://host:port"
        )));
    }
    // Go listens on all interfaces for an empty host (`http://:9090`).
    Ok(Some(match host_port.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => host_port.to_string(),
    }))
}

/// A duration flag that must not be negative; zero means "off" (`None`).
fn positive(flag: &str, d: GoDuration) -> Result<Option<Duration>, ExitError> {
    let d = d
        .to_std()
        .ok_or_else(|| ExitError::new(format!("{flag} must not be negative (got {d})")))?;
    Ok((!d.is_zero()).then_some(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Invocation, parse};

    fn args(extra: &[&str]) -> GrpcProxyStartArgs {
        let mut argv = vec!["etcd-proxy", "grpc-proxy", "start"];
        argv.extend_from_slice(extra);
        match parse(argv) {
            Ok(Invocation::GrpcProxyStart(a)) => a,
            other => panic!("unexpected parse result: {other:?}"),
        }
    }

    #[test]
    fn metrics_addr_forms() {
        assert_eq!(metrics_addr("").unwrap(), None);
        assert_eq!(
            metrics_addr("http://127.0.0.1:9000").unwrap().as_deref(),
            Some("127.0.0.1:9000")
        );
        assert_eq!(
            metrics_addr("http://[::1]:9000/").unwrap().as_deref(),
            Some("[::1]:9000")
        );
        assert_eq!(
            metrics_addr("http://:9000").unwrap().as_deref(),
            Some("0.0.0.0:9000")
        );
        assert_eq!(
            metrics_addr("https://127.0.0.1:9000").unwrap().as_deref(),
            Some("127.0.0.1:9000")
        );
        assert!(metrics_addr("127.0.0.1:9000").is_err());
        assert!(metrics_addr("http://nope").is_err());
    }

    #[test]
    fn endpoint_forms() {
        let eps = static_endpoints(&args(&["--endpoints=http://127.0.0.1:1,127.0.0.1:2"])).unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].to_string(), "127.0.0.1:1");
        assert_eq!(eps[1].scheme, Scheme::Unspecified);
        let eps = static_endpoints(&args(&["--endpoints=https://127.0.0.1:1"])).unwrap();
        assert_eq!(eps[0].scheme, Scheme::Https);
        assert!(static_endpoints(&args(&["--endpoints="])).is_err());
        // With a TLS flag, scheme-less members are TLS too; explicit http:// stays plain.
        let eps = static_endpoints(&args(&[
            "--endpoints=http://127.0.0.1:1,127.0.0.1:2",
            "--insecure-skip-tls-verify",
        ]))
        .unwrap();
        assert_eq!(
            (eps[0].scheme, eps[1].scheme),
            (Scheme::Http, Scheme::Https)
        );
    }
}
