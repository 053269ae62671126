//! The L4 gateway behind `etcd-proxy gateway start`: accepts TCP connections and splices each
//! one, byte for byte, to an etcd member picked round-robin among the live ones. It never looks
//! inside the stream, so gRPC, the HTTP/JSON API and TLS all pass through unchanged.
//!
//! Where etcd's gateway is weak, this one is not: dials time out, half-close is propagated (a
//! client that shuts down its write side still gets the whole reply), IPv6 works, a member that
//! accepts TCP but does not answer is found by a probe and skipped, and shutdown drains.
#![forbid(unsafe_code)]

mod metrics;
mod pool;
mod proxy;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backend::{Dns, Endpoint};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

pub use metrics::{Metrics, serve_metrics};

/// Everything the gateway needs to run; built by the CLI, or by tests.
#[derive(Clone)]
pub struct Config {
    /// Members to forward to, in the order given (round-robin follows it).
    pub endpoints: Vec<Endpoint>,
    /// How long a failed member stays out before it is probed again (`--retry-delay`).
    pub retry_delay: Duration,
    /// Limit on connecting to a member, per address tried (`--dial-timeout`).
    pub dial_timeout: Duration,
    /// How often live members are probed; `Duration::ZERO` turns probing off
    /// (`--health-check-interval`).
    pub health_check_interval: Duration,
    /// After shutdown is asked for, how long open connections may go on (`--drain-timeout`).
    pub drain_timeout: Duration,
    /// How member host names are resolved.
    pub dns: Dns,
}

impl Config {
    /// A config with the CLI's defaults for everything but the endpoints.
    pub fn new(endpoints: Vec<Endpoint>) -> Config {
        Config {
            endpoints,
            retry_delay: Duration::from_secs(60),
            dial_timeout: Duration::from_secs(5),
            health_check_interval: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            dns: Dns::system(),
        }
    }
}

/// A running gateway's shared state: the member pool and its metrics.
#[derive(Clone)]
pub struct Gateway {
    pool: Arc<pool::Pool>,
    config: Arc<Config>,
}

impl Gateway {
    /// Builds the gateway; nothing runs until [`Gateway::serve`].
    pub fn new(config: Config) -> Gateway {
        let metrics = Metrics::new(&config.endpoints);
        let pool = Arc::new(pool::Pool::new(&config, metrics));
        Gateway {
            pool,
            config: Arc::new(config),
        }
    }

    /// The Prometheus metrics, to serve on `--metrics-addr`.
    pub fn metrics(&self) -> &Metrics {
        &self.pool.metrics
    }

    /// How many members are currently considered live.
    pub fn active_endpoints(&self) -> usize {
        self.pool.active_count()
    }

    /// Accepts and proxies connections until `shutdown` completes, then stops accepting and lets
    /// open connections finish for at most `drain_timeout`.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let addrs: Vec<String> = self
            .config
            .endpoints
            .iter()
            .map(|e| e.to_string())
            .collect();
        let listen = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(endpoints = ?addrs, listen_addr = %listen, "ready to proxy client requests");
        let monitors = self.pool.spawn_monitors();
        let connections = TaskTracker::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((client, peer)) => {
                        let pool = self.pool.clone();
                        connections.spawn(async move { proxy::serve_connection(pool, client, peer).await });
                    }
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of exiting like etcd.
                        tracing::warn!(error = %e, "failed to accept connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        connections.close();
        let open = connections.len();
        tracing::info!(connections = open, timeout = %format_duration(self.config.drain_timeout), "stopped accepting connections; draining");
        if tokio::time::timeout(self.config.drain_timeout, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = connections.len(),
                "drain timed out; closing remaining connections"
            );
        } else {
            tracing::info!("all connections drained");
        }
        for m in monitors {
            m.abort();
        }
    }
}

/// Go's `Duration.String()` (`1m0s`), the way etcd 3.5 logs durations such as `interval`.
pub(crate) fn format_duration(d: Duration) -> String {
    backend::GoDuration::from_std(d).to_string()
}
