//! The proxy's own Prometheus metrics, served at `/proxy/metrics`: the `grpc_server_*` family
//! that etcd's proxy gets from go-grpc-prometheus (same names, labels and code names), etcd's
//! `/health` counters, the `etcd_grpc_proxy_*` names this proxy can fill truthfully, and the
//! standard `process_*` metrics.
//!
//! Counting stays off the hot path's allocator: every known etcd method's counters are resolved
//! once at start, so a call costs one map lookup by its path and atomic increments.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::HeaderMap;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// gRPC status codes by number, named as grpc-go's `codes.Code.String()` (the `grpc_code` label).
pub(crate) const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
/// grpc-go's name of a status code (`Code(17)` past the known ones), as in `rpc error: code = ...`.
pub(crate) fn code_name(code: u16) -> String {
    CODE_NAMES
        .get(usize::from(code))
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("Code({code})"))
}

const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// Every method etcd's proxy registers, plus the standard health service, with its gRPC type.
const METHODS: &[(&str, &[(&str, &str)])] = &[
    (
        "etcdserverpb.KV",
        &[
            ("Range", "unary"),
            ("Put", "unary"),
            ("DeleteRange", "unary"),
            ("Txn", "unary"),
            ("Compact", "unary"),
        ],
    ),
    ("etcdserverpb.Watch", &[("Watch", "bidi_stream")]),
    (
        "etcdserverpb.Lease",
        &[
            ("LeaseGrant", "unary"),
            ("LeaseRevoke", "unary"),
            ("LeaseKeepAlive", "bidi_stream"),
            ("LeaseTimeToLive", "unary"),
            ("LeaseLeases", "unary"),
        ],
    ),
    (
        "etcdserverpb.Cluster",
        &[
            ("MemberAdd", "unary"),
            ("MemberRemove", "unary"),
            ("MemberUpdate", "unary"),
            ("MemberList", "unary"),
            ("MemberPromote", "unary"),
        ],
    ),
    (
        "etcdserverpb.Maintenance",
        &[
            ("Alarm", "unary"),
            ("Status", "unary"),
            ("Defragment", "unary"),
            ("Hash", "unary"),
            ("HashKV", "unary"),
            ("Snapshot", "server_stream"),
            ("MoveLeader", "unary"),
            ("Downgrade", "unary"),
        ],
    ),
    (
        "etcdserverpb.Auth",
        &[
            ("AuthEnable", "unary"),
            ("AuthDisable", "unary"),
            ("AuthStatus", "unary"),
            ("Authenticate", "unary"),
            ("UserAdd", "unary"),
            ("UserGet", "unary"),
            ("UserList", "unary"),
            ("UserDelete", "unary"),
            ("UserChangePassword", "unary"),
            ("UserGrantRole", "unary"),
            ("UserRevokeRole", "unary"),
            ("RoleAdd", "unary"),
            ("RoleGet", "unary"),
            ("RoleList", "unary"),
            ("RoleDelete", "unary"),
            ("RoleGrantPermission", "unary"),
            ("RoleRevokePermission", "unary"),
        ],
    ),
    (
        "v3electionpb.Election",
        &[
            ("Campaign", "unary"),
            ("Proclaim", "unary"),
            ("Leader", "unary"),
            ("Observe", "server_stream"),
            ("Resign", "unary"),
        ],
    ),
    ("v3lockpb.Lock", &[("Lock", "unary"), ("Unlock", "unary")]),
    (
        "grpc.health.v1.Health",
        &[("Check", "unary"), ("Watch", "server_stream")],
    ),
];

/// One method's counters, resolved once.
struct MethodCounters {
    started: IntCounter,
    handled: [IntCounter; 17],
}

/// The proxy's registry and the handles the request path uses.
pub struct Metrics {
    registry: Registry,
    methods: HashMap<String, Arc<MethodCounters>>,
    /// `/health` checks that found the cluster healthy (`etcd_server_health_success`).
    pub health_success: IntCounter,
    /// `/health` checks that did not (`etcd_server_health_failures`).
    pub health_failures: IntCounter,
    /// The range cache's metrics ([`crate::cache`]).
    pub cache: crate::cache::CacheMetrics,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    // Names are static and each is registered once in a new registry: this cannot fail.
    let _ = registry.register(Box::new(c.clone()));
    c
}

impl Metrics {
    /// Registers every metric, with a zero series for each known method and code (as
    /// go-grpc-prometheus pre-registers them), so dashboards see them before the first call.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        // The metric definitions below are static and valid, so the `expect`s cannot fire.
        let started = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "grpc_server_started_total",
                    "Total number of RPCs started on the server.",
                ),
                &["grpc_type", "grpc_service", "grpc_method"],
            )
            .expect("static metric definition"),
        );
        let handled = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "grpc_server_handled_total",
                    "Total number of RPCs completed on the server, regardless of success or failure.",
                ),
                &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            )
            .expect("static metric definition"),
        );
        let mut methods = HashMap::new();
        for (service, list) in METHODS {
            for (method, kind) in *list {
                let counters = MethodCounters {
                    started: started.with_label_values(&[kind, service, method]),
                    handled: CODE_NAMES
                        .map(|code| handled.with_label_values(&[kind, service, method, code])),
                };
                methods.insert(format!("/{service}/{method}"), Arc::new(counters));
            }
        }
        let health_success = register(
            &registry,
            IntCounter::new(
                "etcd_server_health_success",
                "The total number of successful health checks",
            )
            .expect("static metric definition"),
        );
        let health_failures = register(
            &registry,
            IntCounter::new(
                "etcd_server_health_failures",
                "The total number of failed health checks",
            )
            .expect("static metric definition"),
        );
        // etcd's names; hits and misses count serializable reads the cache could serve only.
        let cache = crate::cache::CacheMetrics {
            keys: register(
                &registry,
                IntGauge::new(
                    "etcd_grpc_proxy_cache_keys_total",
                    "Total number of keys/ranges cached",
                )
                .expect("static metric definition"),
            ),
            hits: register(
                &registry,
                IntCounter::new(
                    "etcd_grpc_proxy_cache_hits_total",
                    "Total number of cache hits",
                )
                .expect("static metric definition"),
            ),
            misses: register(
                &registry,
                IntCounter::new(
                    "etcd_grpc_proxy_cache_misses_total",
                    "Total number of cache misses",
                )
                .expect("static metric definition"),
            ),
        };
        for c in STREAMS.collectors() {
            let _ = registry.register(c);
        }
        Metrics {
            registry,
            methods,
            health_success,
            health_failures,
            cache,
        }
    }

    /// Counts a call to `path` as started; the returned tracker counts it as handled with the
    /// code the response carries. Paths of unknown methods are not counted (go-grpc-prometheus
    /// only sees registered methods).
    pub fn start_call(&self, path: &str) -> Option<CallTracker> {
        let counters = self.methods.get(path)?;
        counters.started.inc();
        Some(CallTracker {
            counters: counters.clone(),
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Counters of the long streams, updated where the streams live (`resume`, `keepalive`) and
/// exposed by every [`Metrics`] registry of the process (one per proxy).
pub struct StreamMetrics {
    /// `etcd_grpc_proxy_streams_moved_total{grpc_method}`: streams moved to another member.
    pub moved: IntCounterVec,
    /// `etcd_grpc_proxy_lease_keepalive_upstream_streams`: shared keep-alive streams open to etcd.
    pub keepalive_upstream_streams: IntGauge,
    /// `etcd_grpc_proxy_lease_keepalives_received_total`: keep-alives received from clients.
    pub keepalives_received: IntCounter,
    /// `etcd_grpc_proxy_lease_keepalives_sent_total`: keep-alives sent to etcd (fewer when
    /// clients of one lease share answers).
    pub keepalives_sent: IntCounter,
    /// `etcd_grpc_proxy_watchers_coalescing_total` (etcd's name, a gauge): client watchers
    /// served by an upstream watcher they share, beyond the first of each.
    pub watchers_coalescing: IntGauge,
    /// `etcd_grpc_proxy_events_coalescing_total` (etcd's name): event responses delivered to a
    /// client watcher without their own upstream copy (one upstream response to n watchers
    /// counts n - 1).
    pub events_coalescing: IntCounter,
    /// `etcd_grpc_proxy_watch_upstream_watchers`: watchers the proxy holds on etcd.
    pub watch_upstream_watchers: IntGauge,
    /// `etcd_grpc_proxy_watch_client_watchers`: client watchers attached to them.
    pub watch_client_watchers: IntGauge,
}

impl StreamMetrics {
    fn new() -> StreamMetrics {
        // Static, valid definitions: the `expect`s cannot fire.
        StreamMetrics {
            moved: IntCounterVec::new(
                Opts::new(
                    "etcd_grpc_proxy_streams_moved_total",
                    "Total number of streams moved to another etcd member after theirs failed them.",
                ),
                &["grpc_method"],
            )
            .expect("static metric definition"),
            keepalive_upstream_streams: IntGauge::new(
                "etcd_grpc_proxy_lease_keepalive_upstream_streams",
                "Number of lease keep-alive streams open to etcd, shared by all clients of one identity.",
            )
            .expect("static metric definition"),
            keepalives_received: IntCounter::new(
                "etcd_grpc_proxy_lease_keepalives_received_total",
                "Total number of lease keep-alives received from clients.",
            )
            .expect("static metric definition"),
            keepalives_sent: IntCounter::new(
                "etcd_grpc_proxy_lease_keepalives_sent_total",
                "Total number of lease keep-alives sent to etcd.",
            )
            .expect("static metric definition"),
            watchers_coalescing: IntGauge::new(
                "etcd_grpc_proxy_watchers_coalescing_total",
                "Total number of current watchers coalescing",
            )
            .expect("static metric definition"),
            events_coalescing: IntCounter::new(
                "etcd_grpc_proxy_events_coalescing_total",
                "Total number of events coalescing",
            )
            .expect("static metric definition"),
            watch_upstream_watchers: IntGauge::new(
                "etcd_grpc_proxy_watch_upstream_watchers",
                "Number of watchers the proxy holds on etcd, each shared by the client watchers of one key range.",
            )
            .expect("static metric definition"),
            watch_client_watchers: IntGauge::new(
                "etcd_grpc_proxy_watch_client_watchers",
                "Number of client watchers attached to an upstream watcher.",
            )
            .expect("static metric definition"),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.moved.clone()),
            Box::new(self.keepalive_upstream_streams.clone()),
            Box::new(self.keepalives_received.clone()),
            Box::new(self.keepalives_sent.clone()),
            Box::new(self.watchers_coalescing.clone()),
            Box::new(self.events_coalescing.clone()),
            Box::new(self.watch_upstream_watchers.clone()),
            Box::new(self.watch_client_watchers.clone()),
        ]
    }
}

/// The process's [`StreamMetrics`].
pub static STREAMS: std::sync::LazyLock<StreamMetrics> =
    std::sync::LazyLock::new(StreamMetrics::new);

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Counts one call as handled, once.
pub struct CallTracker {
    counters: Arc<MethodCounters>,
}

impl CallTracker {
    fn finish(self, code: usize) {
        if let Some(c) = self.counters.handled.get(code) {
            c.inc();
        }
    }
}

/// The `grpc-status` in `headers`, if any (an unknown number counts as `Unknown`).
fn grpc_code(headers: &HeaderMap) -> Option<usize> {
    let value = headers.get("grpc-status")?;
    let code = value
        .to_str()
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&c| c < CODE_NAMES.len())
        .unwrap_or(UNKNOWN);
    Some(code)
}

/// A response body that counts its call as handled when the status goes by: in the response
/// headers (trailers-only), in the trailers, `Unknown` when the body ends without one, and
/// `Canceled` when the client goes away first.
pub struct Counted<B> {
    inner: B,
    tracker: Option<CallTracker>,
}

impl<B> Counted<B> {
    /// Wraps the body of a response whose head is `headers`.
    pub fn new(inner: B, headers: &HeaderMap, tracker: Option<CallTracker>) -> Counted<B> {
        let mut tracker = tracker;
        if let Some(code) = grpc_code(headers)
            && let Some(t) = tracker.take()
        {
            t.finish(code);
        }
        Counted { inner, tracker }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(code) = f.trailers_ref().and_then(grpc_code)
                    && let Some(t) = this.tracker.take()
                {
                    t.finish(code);
                }
            }
            Some(Err(_)) | None => {
                if let Some(t) = this.tracker.take() {
                    t.finish(UNKNOWN);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if let Some(t) = self.tracker.take() {
            t.finish(CANCELED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};

    fn handled(m: &Metrics, method: &str, code: &str) -> bool {
        m.render().lines().any(|l| {
            l.starts_with("grpc_server_handled_total{")
                && l.contains(&format!("grpc_code=\"{code}\""))
                && l.contains(&format!("grpc_method=\"{method}\""))
                && l.ends_with(" 1")
        })
    }

    #[tokio::test]
    async fn codes_come_from_headers_trailers_or_their_absence() {
        let m = Metrics::new();
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", "5".parse().unwrap());
        drop(Counted::new(
            Empty::<Bytes>::new(),
            &headers,
            m.start_call("/etcdserverpb.KV/Range"),
        ));
        assert!(handled(&m, "Range", "NotFound"), "{}", m.render());

        let body = Counted::new(
            Empty::<Bytes>::new(),
            &HeaderMap::new(),
            m.start_call("/etcdserverpb.KV/Put"),
        );
        let _ = body.collect().await;
        assert!(handled(&m, "Put", "Unknown"));

        drop(Counted::new(
            Empty::<Bytes>::new(),
            &HeaderMap::new(),
            m.start_call("/etcdserverpb.Watch/Watch"),
        ));
        assert!(handled(&m, "Watch", "Canceled"));
        assert!(m.start_call("/no.such/Method").is_none());
        let text = m.render();
        assert!(text.contains(
            "grpc_server_started_total{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1"
        ), "{text}");
    }
}
