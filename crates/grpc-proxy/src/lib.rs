//! The L7 gRPC proxy behind `etcd-proxy grpc-proxy start`.
//!
//! Its core is a transparent HTTP/2 forwarder: a gRPC call arrives on an h2c connection and goes
//! to an etcd member as bytes, headers (metadata such as `token`, `authorization`, `hasleader`,
//! `grpc-timeout`), streaming body and trailers unchanged both ways. Nothing is decoded on that
//! path, so unknown protobuf fields survive, etcd's own status codes and messages reach the
//! client (etcd's proxy turns many of them into `Unknown`), and a call costs little CPU.
//! Features that must look inside a call (namespace, cache, watch coalescing) will be handlers
//! chosen by [`forward::route`] in front of that fallback.

#![forbid(unsafe_code)]

pub mod forward;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backend::Endpoint;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    /// After the shutdown future resolves: how long open client connections may finish their
    /// calls (watches never finish on their own) before they are closed.
    pub drain_timeout: Duration,
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
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Serves gRPC clients on `listener` until `shutdown` resolves, then stops accepting, lets open
/// calls finish for [`Config::drain_timeout`], closes what is left and returns.
pub async fn serve(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    let stop_upstream = CancellationToken::new();
    let upstream = Upstream::start(&config, stop_upstream.clone());

    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.max_concurrent_streams)
        // Grows the windows with the measured bandwidth-delay product, as grpc-go does, so a
        // large range or snapshot is not throttled by the 64 KiB default window.
        .adaptive_window(true)
        .keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout);
    let builder = Arc::new(builder);

    // `graceful` asks connections to finish (GOAWAY); `hard` drops those still open after the
    // drain timeout.
    let graceful = CancellationToken::new();
    let hard = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: neither ends the
                // server; a short pause keeps an fd shortage from spinning the loop.
                tracing::warn!(error = %e, "failed to accept a gRPC client connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // gRPC calls are small request/response pairs: Nagle's delay would add latency.
        let _ = tcp.set_nodelay(true);
        let upstream = upstream.clone();
        let builder = builder.clone();
        let graceful = graceful.clone();
        let hard = hard.clone();
        tracker.spawn(async move {
            let service = service_fn(move |req| {
                let upstream = upstream.clone();
                async move { Ok::<_, Infallible>(forward::handle(&upstream, req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = graceful.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        r = conn.as_mut() => r,
                        () = hard.cancelled() => Ok(()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "gRPC client connection ended with an error");
            }
        });
    }
    drop(listener);
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
    stop_upstream.cancel();
}
