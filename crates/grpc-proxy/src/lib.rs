//! The L7 gRPC proxy behind `etcd-proxy grpc-proxy start`.
//!
//! Its core is a transparent HTTP/2 forwarder: a gRPC call arrives on an h2c connection and goes
//! to an etcd member as bytes, headers (metadata such as `token`, `authorization`, `hasleader`,
//! `grpc-timeout`), streaming body and trailers unchanged both ways. Nothing is decoded on that
//! path, so unknown protobuf fields survive, etcd's own status codes and messages reach the
//! client (etcd's proxy turns many of them into `Unknown`), and a call costs little CPU.
//! Features that must look inside a call (namespace, cache, watch coalescing) will be handlers
//! chosen by [`forward::route`] in front of that fallback.
//!
//! The same port also answers plain HTTP (1.1 or 2) for health and metrics ([`admin`]); a
//! request is gRPC when its content type says so. With [`Config::tls`] every connection is TLS
//! first (ALPN `h2` and `http/1.1`, [`listen_tls`]), then served the same way.

#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod cache;
pub mod cluster;
pub mod dial;
pub mod forward;
pub(crate) mod http2;
pub mod http_api;
pub mod keepalive;
mod keyspace;
pub mod lease;
pub mod leasing;
pub mod limits;
pub mod listen_tls;
pub mod metrics;
pub mod namespace;
pub mod ordering;
pub mod profiling;
pub mod resume;
pub mod rewrite;
mod serve;
pub mod upstream;
pub mod watch;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use backend::Endpoint;
use http_body_util::Either;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::body::ClientBody;
use crate::metrics::{Counted, Metrics};
use crate::upstream::Upstream;

/// How the proxy is set up. [`Config::new`] gives etcd's defaults for everything but the
/// endpoints.
#[derive(Debug, Clone)]
pub struct Config {
    /// The etcd members to forward to (`--endpoints`), plain HTTP/2 (h2c) for now.
    pub endpoints: Vec<Endpoint>,
    /// HTTP/2 connections kept open to each member. One connection serialises every call on
    /// one TCP stream and one flow-control window; a few spread the load over cores and
    /// windows without the cost of a connection per client.
    pub connections_per_member: usize,
    /// How long a TCP connect plus HTTP/2 handshake to a member may take (clientv3's dial
    /// timeout is 5 s, and so is etcd's proxy's).
    pub dial_timeout: Duration,
    /// How long a call waits for some member to become connected when none is, e.g. right
    /// after start or while every member restarts, before it fails with `UNAVAILABLE`.
    pub connect_wait: Duration,
    /// `--dial-keepalive-time`: interval of HTTP/2 pings to members; `None` sends none.
    pub dial_keepalive_time: Option<Duration>,
    /// `--dial-keepalive-timeout`: how long a ping to a member may go unanswered before the
    /// connection is closed and the member marked down.
    pub dial_keepalive_timeout: Duration,
    /// `--permit-without-stream`: ping members also when no call is open.
    pub permit_without_stream: bool,
    /// `--max-concurrent-streams`: the HTTP/2 stream limit advertised to each client.
    pub max_concurrent_streams: u32,
    /// `--grpc-keepalive-interval`: interval of HTTP/2 pings to idle clients; `None` sends none.
    pub keepalive_interval: Option<Duration>,
    /// `--grpc-keepalive-timeout`: how long a ping to a client may go unanswered before its
    /// connection is closed.
    pub keepalive_timeout: Duration,
    /// `--grpc-keepalive-min-time`: how often a client with calls open may ping; a client
    /// pinging more often gets GOAWAY `too_many_pings`.
    pub keepalive_min_time: Duration,
    /// After the shutdown future resolves: how long open client connections may finish their
    /// calls (watches never finish on their own) before they are closed.
    pub drain_timeout: Duration,
    /// How often each member is probed for an answer (a stopped member keeps its connections
    /// open); a member that fails gets no new calls until a probe succeeds. Zero turns it off.
    pub health_check_interval: Duration,
    /// `--namespace`: the prefix every client key goes under; `None` for none.
    pub namespace: Option<namespace::Namespace>,
    /// Message size limits: gRPC's server default, `--max-send-bytes`, `--max-recv-bytes`, and
    /// the largest message the proxy decodes where it must look inside a call.
    pub limits: rewrite::Limits,
    /// `--advertise-client-url`: the address this proxy registers under `--resolver-prefix`.
    pub advertise_client_url: String,
    /// This host's name, put in the registration value's metadata as etcd does.
    pub hostname: String,
    /// `--resolver-prefix` and `--resolver-ttl`: register this proxy and answer MemberList
    /// with the registered proxies; `None` passes MemberList through to etcd.
    pub resolver: Option<cluster::Resolver>,
    /// `--endpoints-auto-sync-interval`: how often the members are refreshed from etcd's
    /// MemberList; `None` never.
    pub auto_sync_interval: Option<Duration>,
    /// `--enable-pprof`: serve CPU profiles under `/debug/pprof/` on the main port.
    pub pprof: bool,
    /// `--experimental-serializable-ordering`: a serializable read never returns an older
    /// revision than one this proxy already returned ([`ordering`]).
    pub serializable_ordering: bool,
    /// `--experimental-leasing-prefix`: serve owned keys' linearizable reads from memory, with
    /// etcd's leasing protocol under this prefix ([`leasing`]); `None` for none.
    pub leasing_prefix: Option<bytes::Bytes>,
    /// The range cache's bounds (`--range-cache-max-entries`, `--range-cache-max-bytes`);
    /// `None` turns it off (`--disable-range-cache`) ([`cache`]).
    pub range_cache: Option<cache::CacheLimits>,
    /// TLS toward `https` members (`--cacert`, `--cert`, `--key`, `--insecure-skip-tls-verify`,
    /// [`dial`]); `None` verifies them against the system roots without a client certificate.
    pub member_tls: Option<Arc<rustls::ClientConfig>>,
    /// Resolves member host names: the system's resolver, or `--discovery-dns-server`.
    pub dns: backend::Dns,
    /// TLS for clients (`--cert-file`/`--key-file` or `--auto-tls`, [`listen_tls`]); `None`
    /// serves plain text (h2c and HTTP/1.1).
    pub tls: Option<listen_tls::ListenTls>,
    /// `--metrics-addr https://...`: the metrics listener serves [`Config::tls`] too.
    pub metrics_tls: bool,
}

impl Config {
    /// etcd's defaults around the given members.
    pub fn new(endpoints: Vec<Endpoint>) -> Config {
        Config {
            endpoints,
            connections_per_member: 2,
            dial_timeout: Duration::from_secs(5),
            connect_wait: Duration::from_secs(5),
            dial_keepalive_time: None,
            dial_keepalive_timeout: Duration::from_secs(20),
            permit_without_stream: false,
            max_concurrent_streams: u32::MAX,
            keepalive_interval: Some(Duration::from_secs(2 * 60 * 60)),
            keepalive_timeout: Duration::from_secs(20),
            keepalive_min_time: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            health_check_interval: Duration::from_secs(5),
            namespace: None,
            limits: rewrite::Limits::default(),
            advertise_client_url: "127.0.0.1:23790".to_string(),
            hostname: String::new(),
            resolver: None,
            auto_sync_interval: None,
            pprof: false,
            serializable_ordering: false,
            leasing_prefix: None,
            range_cache: Some(cache::CacheLimits::default()),
            member_tls: None,
            dns: backend::Dns::system(),
            tls: None,
            metrics_tls: false,
        }
    }
}

/// Serves gRPC clients on `listener` until `shutdown` resolves, then stops accepting, lets open
/// calls finish for [`Config::drain_timeout`], closes what is left and returns.
pub async fn serve(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    serve_with_metrics(listener, None, config, shutdown).await;
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    /// gRPC and the HTTP endpoints (`--listen-addr`).
    Main,
    /// The HTTP endpoints only (`--metrics-addr`).
    Metrics,
}

/// Shared by every connection.
struct State {
    admin: Admin,
    /// Set with `--namespace`.
    rewriter: Option<Arc<rewrite::Rewriter>>,
    /// Set with `--resolver-prefix`: answers MemberList.
    member_list: Option<Arc<cluster::Cluster>>,
    /// The proxy's own calls to etcd (the lease check under `--namespace`).
    cluster: Arc<cluster::Cluster>,
    /// Message size limits.
    limits: rewrite::Limits,
    /// Set with `--enable-pprof`: `/debug/pprof/` on the main port.
    profiler: Option<profiling::Profiler>,
    /// `--experimental-serializable-ordering`: serves the KV calls when on.
    ordering: Arc<ordering::Ordering>,
    /// Set with `--experimental-leasing-prefix`: serves Range, Put, DeleteRange and Txn.
    leasing: Option<Arc<leasing::Leasing>>,
    /// Serves every client's `LeaseKeepAlive` over shared upstream streams.
    keepalives: keepalive::KeepAlives,
    /// Serves serializable Ranges from memory; `None` with `--disable-range-cache`.
    cache: Option<Arc<cache::RangeCache>>,
    /// Serves every client's `Watch` over shared upstream watchers.
    watches: watch::Watches,
}

/// [`serve`], plus the HTTP endpoints alone on `metrics_listener` (`--metrics-addr`).
pub async fn serve_with_metrics(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) {
    let stop_upstream = CancellationToken::new();
    let upstream = Upstream::start(&config, stop_upstream.clone());
    let rewriter = rewrite::Rewriter::from_config(&config);
    let cluster = cluster::Cluster::new(&config, upstream.clone());
    let stop_cluster = CancellationToken::new();
    let cluster_task = cluster.start(config.auto_sync_interval, stop_cluster.clone());
    let leasing = config.leasing_prefix.clone().map(|prefix| {
        let ns = config.namespace.clone();
        let leasing = leasing::Leasing::new(prefix, ns, cluster.clone(), config.limits);
        (leasing.clone(), leasing.start(stop_upstream.child_token()))
    });
    let metrics = Arc::new(Metrics::new());
    let cache = config.range_cache.map(|limits| {
        cache::RangeCache::new(
            limits,
            config.limits,
            config.namespace.clone(),
            cluster.clone(),
            upstream.clone(),
            metrics.cache.clone(),
            stop_upstream.child_token(),
        )
    });
    let state = Arc::new(State {
        rewriter,
        cache,
        member_list: cluster.answers_member_list().then(|| cluster.clone()),
        cluster: cluster.clone(),
        limits: config.limits,
        profiler: config.pprof.then(profiling::Profiler::new),
        ordering: ordering::Ordering::new(config.serializable_ordering),
        leasing: leasing.as_ref().map(|(l, _)| l.clone()),
        keepalives: keepalive::KeepAlives::new(upstream.clone(), config.limits),
        watches: watch::Watches::new(
            upstream.clone(),
            cluster.clone(),
            config.limits,
            config.namespace.clone(),
        ),
        admin: Admin {
            upstream,
            metrics,
            self_addr: dialable(&listener),
            self_tls: config.tls.as_ref().map(|t| t.self_client.clone()),
            dial_timeout: config.dial_timeout,
            cluster_check: admin::CheckGate::default(),
            proxy_check: admin::CheckGate::default(),
        },
    });

    let server = |port| {
        Arc::new(serve::Server {
            service: Routes {
                state: state.clone(),
                port,
            },
            http2: http2::Settings {
                max_concurrent_streams: config.max_concurrent_streams,
                keepalive_interval: config.keepalive_interval,
                keepalive_timeout: config.keepalive_timeout,
                keepalive_min_time: config.keepalive_min_time,
            },
        })
    };
    let acceptor = config
        .tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(t.server.clone()));

    // `graceful` asks connections to finish (GOAWAY); `hard` drops those still open after the
    // drain timeout.
    let graceful = CancellationToken::new();
    let hard = CancellationToken::new();
    let tracker = TaskTracker::new();
    if let Some(metrics_listener) = metrics_listener {
        let stop = graceful.clone();
        tracker.spawn(accept_loop(
            metrics_listener,
            acceptor.clone().filter(|_| config.metrics_tls),
            server(Port::Metrics),
            graceful.clone(),
            hard.clone(),
            tracker.clone(),
            async move { stop.cancelled().await },
        ));
    }
    accept_loop(
        listener,
        acceptor,
        server(Port::Main),
        graceful.clone(),
        hard.clone(),
        tracker.clone(),
        shutdown,
    )
    .await;
    // Revoke the registration first, so clients stop being sent here while connections drain.
    stop_cluster.cancel();
    graceful.cancel();
    tracker.close();
    if tokio::time::timeout(config.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::info!(
            drain_timeout = ?config.drain_timeout,
            "closing gRPC client connections still open after the drain timeout"
        );
        hard.cancel();
        tracker.wait().await;
    }
    // Bounded: a registration attempt in flight against unreachable members must not hold the
    // exit; its lease then expires after the TTL.
    let _ = tokio::time::timeout(config.dial_timeout, cluster_task).await;
    if let Some((_, task)) = leasing {
        // Revokes the leasing session, so that other clients need not wait for its TTL.
        stop_upstream.cancel();
        let _ = tokio::time::timeout(config.dial_timeout, task).await;
    }
    stop_upstream.cancel();
}

/// Where the proxy can call itself: the listener's address, with a wildcard IP made loopback.
fn dialable(listener: &TcpListener) -> SocketAddr {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// The response body of either side of the port.
type Body = Either<Counted<forward::ResponseBody>, admin::HttpBody>;

/// Serves one gRPC call (from a client connection, or made by the HTTP/JSON API).
async fn grpc(state: &State, req: Request<ClientBody>) -> Response<forward::ResponseBody> {
    match &state.member_list {
        Some(cluster) if req.uri().path() == cluster::MEMBER_LIST_PATH => {
            Box::pin(cluster.member_list(req)).await
        }
        _ if let Some(leasing) = &state.leasing
            && leasing::serves(req.uri().path()) =>
        {
            Box::pin(leasing.handle(req)).await
        }
        _ if req.uri().path() == keepalive::PATH => Box::pin(state.keepalives.handle(req)).await,
        _ if req.uri().path() == watch::PATH => Box::pin(state.watches.handle(req)).await,
        _ if state.ordering.applies(req.uri().path()) => {
            let rewriter = state.rewriter.as_ref();
            let upstream = &state.admin.upstream;
            Box::pin(state.ordering.handle(upstream, rewriter, state.limits, req)).await
        }
        // After leasing and ordering: with either flag, they serve the KV calls.
        _ if let Some(cache) = &state.cache
            && req.uri().path() == cache::RANGE_PATH =>
        {
            cache.handle(req).await
        }
        _ if let Some(cache) = &state.cache
            && req.uri().path() == cache::AUTH_ENABLE_PATH =>
        {
            let forwarded = forward::handle(
                &state.admin.upstream,
                state.rewriter.as_ref(),
                &state.cluster,
                state.limits,
                req,
            );
            Box::pin(cache.auth_enable(forwarded)).await
        }
        _ => {
            forward::handle(
                &state.admin.upstream,
                state.rewriter.as_ref(),
                &state.cluster,
                state.limits,
                req,
            )
            .await
        }
    }
}

/// Every request of a port, HTTP/2 or HTTP/1.1, as [`serve`] serves them.
#[derive(Clone)]
struct Routes {
    state: Arc<State>,
    port: Port,
}

impl serve::Service for Routes {
    type Body = Body;

    fn call(&self, req: Request<ClientBody>) -> impl Future<Output = Response<Body>> + Send {
        route(&self.state, self.port, req)
    }
}

async fn route(state: &Arc<State>, port: Port, req: Request<ClientBody>) -> Response<Body> {
    if port == Port::Main && admin::is_grpc(&req) {
        let tracker = state.admin.metrics.start_call(req.uri().path());
        let resp = grpc(state, req).await;
        let (parts, body) = resp.into_parts();
        let body = Counted::new(body, &parts.headers, tracker);
        Response::from_parts(parts, Either::Left(body))
    } else if port == Port::Main
        && http_api::serves(req.uri().path())
        && http_api::is_websocket(&req)
    {
        let state = state.clone();
        let resp = http_api::websocket(req, move |call| async move { grpc(&state, call).await });
        let (parts, body) = resp.into_parts();
        let body = Counted::new(body, &parts.headers, None);
        Response::from_parts(parts, Either::Left(body))
    } else if port == Port::Main && http_api::serves(req.uri().path()) {
        // Boxed, as every path but the gRPC one: a call's future is as large as its largest
        // path, and is moved whole when a connection takes it in.
        let resp = Box::pin(http_api::handle(req, |call| grpc(state, call))).await;
        let (parts, body) = resp.into_parts();
        let body = Counted::new(body, &parts.headers, None);
        Response::from_parts(parts, Either::Left(body))
    } else if port == Port::Main
        && let Some(profiler) = &state.profiler
        && profiling::Profiler::serves(req.uri().path())
    {
        Box::pin(profiler.handle(&req)).await.map(Either::Right)
    } else {
        Box::pin(admin::handle(&state.admin, req))
            .await
            .map(Either::Right)
    }
}

/// Accepts connections on `listener` until `stop` resolves; each is served in a task of
/// `tracker` until it ends, `graceful` asks it to finish, or `hard` drops it.
#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    server: Arc<serve::Server<Routes>>,
    graceful: CancellationToken,
    hard: CancellationToken,
    tracker: TaskTracker,
    stop: impl Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: neither ends the
                // server; a short pause keeps an fd shortage from spinning the loop.
                tracing::warn!(error = %e, "failed to accept a client connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // gRPC calls are small request/response pairs: Nagle's delay would add latency.
        let _ = tcp.set_nodelay(true);
        let server = server.clone();
        let graceful = graceful.clone();
        let hard = hard.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let Some(acceptor) = tls else {
                let result = server.serve(tcp, false, &graceful, &hard).await;
                return log_end(peer, result);
            };
            // Bounded, and given up on shutdown: a client that opens a connection and sends
            // nothing must not hold a task (or the drain) forever.
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let stream = tokio::select! {
                r = handshake => r,
                () = graceful.cancelled() => return,
            };
            match stream {
                Ok(Ok(stream)) => {
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    log_end(peer, server.serve(stream, h2, &graceful, &hard).await)
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake with a client failed")
                }
                Err(_) => tracing::debug!(
                    peer = %peer,
                    timeout = ?TLS_HANDSHAKE_TIMEOUT,
                    "TLS handshake with a client timed out"
                ),
            }
        });
    }
}

fn log_end(peer: SocketAddr, result: Result<(), String>) {
    if let Err(e) = result {
        tracing::debug!(peer = %peer, error = %e, "client connection ended with an error");
    }
}

/// How long a client may take to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
