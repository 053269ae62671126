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
    reject_unsupported(&args)?;
    let endpoints = endpoints(&args)?;

    let mut config = grpc_proxy::Config::new(endpoints);
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

/// Refuses flags set to a non-default value whose feature does not exist yet.
fn reject_unsupported(args: &GrpcProxyStartArgs) -> Result<(), ExitError> {
    let d = GrpcProxyStartArgs::default();
    let unsupported = [
        ("discovery-srv", args.discovery_srv != d.discovery_srv),
        (
            "discovery-srv-name",
            args.discovery_srv_name != d.discovery_srv_name,
        ),
        (
            "insecure-discovery",
            args.insecure_discovery != d.insecure_discovery,
        ),
        ("cert", args.cert != d.cert),
        ("key", args.key != d.key),
        ("cacert", args.cacert != d.cacert),
        (
            "insecure-skip-tls-verify",
            args.insecure_skip_tls_verify != d.insecure_skip_tls_verify,
        ),
        ("cert-file", args.cert_file != d.cert_file),
        ("key-file", args.key_file != d.key_file),
        ("trusted-ca-file", args.trusted_ca_file != d.trusted_ca_file),
        (
            "listen-cipher-suites",
            args.listen_cipher_suites != d.listen_cipher_suites,
        ),
        ("auto-tls", args.auto_tls != d.auto_tls),
        ("client-crl-file", args.client_crl_file != d.client_crl_file),
        (
            "self-signed-cert-validity",
            args.self_signed_cert_validity != d.self_signed_cert_validity,
        ),
        ("tls-min-version", args.tls_min_version != d.tls_min_version),
        ("tls-max-version", args.tls_max_version != d.tls_max_version),
    ];
    match unsupported.iter().find(|(_, set)| *set) {
        Some((flag, _)) => Err(ExitError::new(format!("--{flag} is not supported yet"))),
        None => Ok(()),
    }
}

/// `--endpoints`, with an `http://` scheme stripped; `https://` members need TLS, not built yet.
fn endpoints(args: &GrpcProxyStartArgs) -> Result<Vec<Endpoint>, ExitError> {
    let endpoints = args
        .endpoints
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| Endpoint::parse(e).map_err(|err| ExitError::new(err.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(ep) = endpoints.iter().find(|ep| ep.scheme == Scheme::Https) {
        return Err(ExitError::new(format!(
            "--endpoints: https:// members are not supported yet ({ep})"
        )));
    }
    if endpoints.is_empty() {
        return Err(ExitError::new("no endpoints found"));
    }
    Ok(endpoints)
}

/// `--metrics-addr`: a URL with a scheme (`http://host:port`), as etcd requires; empty turns it
/// off. `https://` needs the listener TLS, not built yet.
fn metrics_addr(flag: &str) -> Result<Option<String>, ExitError> {
    if flag.is_empty() {
        return Ok(None);
    }
    if flag.starts_with("https://") {
        return Err(ExitError::new(format!(
            "--metrics-addr: https is not supported yet ({flag})"
        )));
    }
    let Some(rest) = flag.strip_prefix("http://") else {
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
    fn defaults_are_supported() {
        assert!(reject_unsupported(&args(&[])).is_ok());
        assert!(
            reject_unsupported(&args(&[
                "--debug",
                "--enable-pprof",
                "--max-concurrent-streams=100",
                "--dial-keepalive-time=10s",
                "--permit-without-stream",
                "--advertise-client-url=127.0.0.1:1",
                "--resolver-prefix=p",
                "--resolver-ttl=5",
                "--endpoints-auto-sync-interval=1m",
                "--experimental-serializable-ordering",
                "--experimental-leasing-prefix=l",
                "--grpc-keepalive-min-time=10s",
            ]))
            .is_ok()
        );
    }

    #[test]
    fn unbuilt_features_are_refused_by_name() {
        for (flag, name) in [
            ("--cert-file=x.crt", "cert-file"),
            ("--auto-tls", "auto-tls"),
            ("--cacert=ca.pem", "cacert"),
        ] {
            let err = reject_unsupported(&args(&[flag])).unwrap_err();
            assert_eq!(err.to_string(), format!("--{name} is not supported yet"));
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
        let err = metrics_addr("https://127.0.0.1:9000").unwrap_err();
        assert!(err.to_string().contains("not supported yet"), "{err}");
        assert!(metrics_addr("127.0.0.1:9000").is_err());
        assert!(metrics_addr("http://nope").is_err());
    }

    #[test]
    fn endpoint_forms() {
        let eps = endpoints(&args(&["--endpoints=http://127.0.0.1:1,127.0.0.1:2"])).unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].to_string(), "127.0.0.1:1");
        assert!(endpoints(&args(&["--endpoints=https://127.0.0.1:1"])).is_err());
        assert!(endpoints(&args(&["--endpoints="])).is_err());
    }
}
