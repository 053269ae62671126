//! Prometheus metrics that etcd's gateway does not have: connections, bytes and state per
//! member, plus the standard `process_*` metrics. Served on `--metrics-addr` at `/metrics`,
//! next to a `/health` that says whether any member is live.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use backend::Endpoint;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::Gateway;

/// The gateway's metrics and the registry they live in.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Client connections accepted.
    pub accepted: IntCounter,
    /// Client connections open now.
    pub open: IntGauge,
    /// Client connections closed because no member could be reached.
    pub rejected: IntCounter,
    per_endpoint: PerEndpoint,
}

#[derive(Clone)]
struct PerEndpoint {
    connections: IntCounterVec,
    open: IntGaugeVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    up: IntGaugeVec,
    dial_failures: IntCounterVec,
    probe_failures: IntCounterVec,
}

/// One member's handles, resolved once so the data path never looks labels up.
#[derive(Clone)]
pub struct EndpointMetrics {
    /// Connections spliced to this member.
    pub connections: IntCounter,
    /// Of those, open now.
    pub open: IntGauge,
    /// Bytes sent to the member (client to member).
    pub sent: IntCounter,
    /// Bytes received from the member (member to client).
    pub received: IntCounter,
    /// 1 while the member is in the pool, 0 while it is out.
    pub up: IntGauge,
    /// Failed dials.
    pub dial_failures: IntCounter,
    /// Failed liveness probes.
    pub probe_failures: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric names are static and valid");
    registry
        .register(Box::new(c.clone()))
        .expect("each metric is registered once");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &["endpoint"])
        .expect("metric names are static and valid");
    registry
        .register(Box::new(c.clone()))
        .expect("each metric is registered once");
    c
}

fn gauge_vec(registry: &Registry, name: &str, help: &str) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), &["endpoint"])
        .expect("metric names are static and valid");
    registry
        .register(Box::new(g.clone()))
        .expect("each metric is registered once");
    g
}

impl Metrics {
    /// Registers every metric, with one series per member.
    pub fn new(endpoints: &[Endpoint]) -> Metrics {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            // Only fails if registered twice, and this registry is new.
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        let open = IntGauge::new(
            "etcd_gateway_client_connections_open",
            "Client connections open now.",
        )
        .expect("static name");
        registry
            .register(Box::new(open.clone()))
            .expect("registered once");
        let metrics = Metrics {
            accepted: counter(
                &registry,
                "etcd_gateway_client_connections_total",
                "Client connections accepted.",
            ),
            rejected: counter(
                &registry,
                "etcd_gateway_client_connections_rejected_total",
                "Client connections closed because no member could be reached.",
            ),
            open,
            per_endpoint: PerEndpoint {
                connections: counter_vec(
                    &registry,
                    "etcd_gateway_endpoint_connections_total",
                    "Connections spliced to a member.",
                ),
                open: gauge_vec(
                    &registry,
                    "etcd_gateway_endpoint_connections_open",
                    "Connections to a member open now.",
                ),
                sent: counter_vec(
                    &registry,
                    "etcd_gateway_endpoint_sent_bytes_total",
                    "Bytes sent from clients to a member.",
                ),
                received: counter_vec(
                    &registry,
                    "etcd_gateway_endpoint_received_bytes_total",
                    "Bytes received from a member for clients.",
                ),
                up: gauge_vec(
                    &registry,
                    "etcd_gateway_endpoint_up",
                    "1 if the member is in the pool, 0 while it is out.",
                ),
                dial_failures: counter_vec(
                    &registry,
                    "etcd_gateway_endpoint_dial_failures_total",
                    "Failed connection attempts to a member.",
                ),
                probe_failures: counter_vec(
                    &registry,
                    "etcd_gateway_endpoint_probe_failures_total",
                    "Failed liveness probes of a member.",
                ),
            },
            registry,
        };
        for ep in endpoints {
            metrics.endpoint(ep); // create every series now, so they show as 0 before traffic
        }
        metrics
    }

    /// The handles for one member.
    pub fn endpoint(&self, ep: &Endpoint) -> EndpointMetrics {
        let label = ep.to_string();
        let l = [label.as_str()];
        let p = &self.per_endpoint;
        EndpointMetrics {
            connections: p.connections.with_label_values(&l),
            open: p.open.with_label_values(&l),
            sent: p.sent.with_label_values(&l),
            received: p.received.with_label_values(&l),
            up: p.up.with_label_values(&l),
            dial_failures: p.dial_failures.with_label_values(&l),
            probe_failures: p.probe_failures.with_label_values(&l),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a bad metric family would be a bug here.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Serves `/metrics` and `/health` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(health_handler))
        .with_state(gateway);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(gw): State<Gateway>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.metrics().render(),
    )
}

async fn health_handler(State(gw): State<Gateway>) -> impl IntoResponse {
    let (status, body) = if gw.active_endpoints() > 0 {
        (StatusCode::OK, r#"{"health":"true"}"#)
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"health":"false","reason":"no live endpoint"}"#,
        )
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}
