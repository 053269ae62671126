//! The etcd members as the forwarder sees them: a few HTTP/2 connections to each, kept open and
//! reconnected in the background, and the choice of a connection per call.
//!
//! We own the member choice instead of using a balancing channel (tonic's `balance_list` does not
//! fail over from a dead endpoint): a call goes round-robin to the next connected member, and a
//! call that could not even be handed to a connection moves on to the next one. A call that may
//! have reached etcd is never sent twice: only the client knows whether repeating it is safe.
//!
//! Connected is not the same as answering: a stopped (SIGSTOP) or wedged member keeps its TCP
//! connections and HTTP/2 streams open but never replies. So each member is also probed every
//! [`Config::health_check_interval`] with [`backend::probe::probe`]; a member that fails is
//! skipped by new calls until a probe succeeds again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backend::Endpoint;
use hyper::Request;
use hyper::Response;
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::rewrite::RequestBody;

/// First pause before reconnecting to a member that failed.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between reconnect attempts: a restarted member is back in use within this.
const MAX_BACKOFF: Duration = Duration::from_secs(3);
/// A connection that lived this long was healthy: its loss restarts the backoff from the start.
const HEALTHY_LIFETIME: Duration = Duration::from_secs(10);

/// Why a call could not be forwarded; the forwarder answers it with gRPC `UNAVAILABLE`.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection to any member could take the call (none was established in time).
    #[error("no etcd member is reachable (endpoints: {0})")]
    NoMember(String),
    /// The call was handed to a member and failed there, so it may have reached etcd.
    #[error("connection to etcd member {member} failed: {source}")]
    Failed {
        /// The member the call went to.
        member: String,
        /// What hyper reported.
        source: hyper::Error,
    },
}

/// One member: its address for dialing and for the `:authority` of forwarded calls.
#[derive(Debug)]
struct Member {
    endpoint: Endpoint,
    name: String,
    authority: Authority,
    /// False while the member's last probe failed: new calls skip it.
    active: AtomicBool,
}

/// One connection slot: the sender of the live connection, `None` while (re)connecting.
struct Slot {
    member: usize,
    // Held only to clone or replace the sender (an Arc and a channel handle): never across await.
    sender: Mutex<Option<SendRequest<RequestBody>>>,
}

impl Slot {
    fn ready_sender(&self) -> Option<SendRequest<RequestBody>> {
        let guard = self.sender.lock().ok()?;
        guard.as_ref().filter(|s| s.is_ready()).cloned()
    }

    fn set(&self, sender: Option<SendRequest<RequestBody>>) {
        if let Ok(mut guard) = self.sender.lock() {
            *guard = sender;
        }
    }
}

/// Every member's connections, and the round-robin position.
pub struct Upstream {
    members: Vec<Member>,
    /// Connection `c` of member `m` is at `c * members.len() + m`, so consecutive positions are
    /// different members: round-robin over the slots is round-robin over members.
    slots: Vec<Slot>,
    next: AtomicUsize,
    /// Bumped each time a connection comes up: wakes calls waiting for a member.
    connected: watch::Sender<u64>,
    connect_wait: Duration,
    names: String,
}

impl Upstream {
    /// Builds the member set and starts one task per connection that connects, and reconnects
    /// with backoff whenever the connection fails, until `stop` is cancelled.
    pub fn start(config: &Config, stop: CancellationToken) -> std::sync::Arc<Upstream> {
        let members: Vec<Member> = config
            .endpoints
            .iter()
            .filter_map(|ep| {
                let name = ep.to_string();
                match Authority::try_from(name.as_str()) {
                    Ok(authority) => Some(Member {
                        endpoint: ep.clone(),
                        name,
                        authority,
                        active: AtomicBool::new(true),
                    }),
                    Err(e) => {
                        tracing::warn!(endpoint = %name, error = %e, "skipping an endpoint that is not a valid authority");
                        None
                    }
                }
            })
            .collect();
        let per_member = config.connections_per_member.max(1);
        let slots = (0..per_member)
            .flat_map(|_| 0..members.len())
            .map(|member| Slot {
                member,
                sender: Mutex::new(None),
            })
            .collect();
        let names = members
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let upstream = std::sync::Arc::new(Upstream {
            members,
            slots,
            next: AtomicUsize::new(0),
            connected: watch::Sender::new(0),
            connect_wait: config.connect_wait,
            names,
        });

        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(config.dial_keepalive_time)
            .keep_alive_timeout(config.dial_keepalive_timeout)
            .keep_alive_while_idle(config.permit_without_stream);
        for index in 0..upstream.slots.len() {
            tokio::spawn(maintain(
                upstream.clone(),
                index,
                builder.clone(),
                config.dial_timeout,
                stop.clone(),
            ));
        }
        if !config.health_check_interval.is_zero() {
            let tls_probe = backend::tls::probe_client_config();
            for member in 0..upstream.members.len() {
                tokio::spawn(monitor(
                    upstream.clone(),
                    member,
                    config.health_check_interval,
                    config.dial_timeout,
                    tls_probe.clone(),
                    stop.clone(),
                ));
            }
        }
        upstream
    }

    /// The members to try for a call made by the proxy itself (health, `/metrics`): the ones
    /// whose probe passes first, starting at the next round-robin position, then the others.
    pub fn members_in_order(&self) -> Vec<Endpoint> {
        let n = self.members.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let rotated = (0..n).map(|k| &self.members[(start + k) % n]);
        let (active, inactive): (Vec<&Member>, Vec<&Member>) =
            rotated.partition(|m| m.active.load(Ordering::Acquire));
        active
            .into_iter()
            .chain(inactive)
            .map(|m| m.endpoint.clone())
            .collect()
    }

    /// Sends `req` to the next member that can take it, and returns etcd's response head (its
    /// body and trailers stream on). A call refused by a connection before anything was sent
    /// moves on to the next member; when no member is connected, waits up to
    /// [`Config::connect_wait`] for one.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let total = self.slots.len();
        let mut waited = false;
        loop {
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            // First pass: members whose probe passes. Second pass: the others, as a last
            // resort: a probe can be wrong (a slow answer), and trying them beats failing the
            // call when nothing else is connected.
            for last_resort in [false, true] {
                for i in 0..total {
                    let slot = &self.slots[(start + i) % total];
                    let member = &self.members[slot.member];
                    if member.is_active() == last_resort {
                        continue;
                    }
                    let Some(mut sender) = slot.ready_sender() else {
                        continue;
                    };
                    set_authority(&mut req, &member.authority);
                    match sender.try_send_request(req).await {
                        Ok(resp) => return Ok(resp),
                        Err(mut err) => match err.take_message() {
                            // The connection closed before the call was written: nothing
                            // reached etcd, so the next member may have it.
                            Some(back) => {
                                tracing::debug!(member = %member.name, error = %err.error(), "connection refused a call before sending it; trying the next member");
                                req = back;
                            }
                            None => {
                                return Err(SendError::Failed {
                                    member: member.name.clone(),
                                    source: err.into_error(),
                                });
                            }
                        },
                    }
                }
            }
            if waited || self.connect_wait.is_zero() || total == 0 {
                return Err(SendError::NoMember(self.names.clone()));
            }
            waited = true;
            // Subscribe before looking again, so a connection that comes up in between is not
            // missed.
            let mut changed = self.connected.subscribe();
            if self.slots.iter().any(|s| s.ready_sender().is_some()) {
                continue;
            }
            let _ = tokio::time::timeout(self.connect_wait, changed.changed()).await;
        }
    }
}

impl Member {
    fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }
}

/// Probes member `index` every `interval` (each probe may take up to `timeout`), taking it out
/// of the rotation when a probe fails and putting it back when one succeeds. Only transitions
/// are logged.
async fn monitor(
    upstream: Arc<Upstream>,
    index: usize,
    interval: Duration,
    timeout: Duration,
    tls_probe: Arc<rustls::ClientConfig>,
    stop: CancellationToken,
) {
    let member = &upstream.members[index];
    let dns = backend::dns::Dns::system();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = backend::probe::probe(&dns, &member.endpoint, timeout, &tls_probe) => r,
        };
        match result {
            Ok(()) => {
                if !member.active.swap(true, Ordering::AcqRel) {
                    tracing::info!(endpoint = %member.name, "activated endpoint");
                }
            }
            Err(e) => {
                if member.active.swap(false, Ordering::AcqRel) {
                    tracing::warn!(endpoint = %member.name, error = %e, "deactivated endpoint");
                }
            }
        }
    }
}

/// Points the call at `authority` over plain HTTP, keeping its path.
fn set_authority(req: &mut Request<RequestBody>, authority: &Authority) {
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    // Scheme, authority and path are all set, the only combination `from_parts` requires.
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// Keeps slot `index` connected: connect, publish the sender, drive the connection until it
/// ends, then retry with exponential backoff (jittered so members restarting together are not
/// hit in lockstep).
async fn maintain(
    upstream: std::sync::Arc<Upstream>,
    index: usize,
    builder: http2::Builder<TokioExecutor>,
    dial_timeout: Duration,
    stop: CancellationToken,
) {
    let slot = &upstream.slots[index];
    let member = &upstream.members[slot.member];
    let connection = index / upstream.members.len().max(1);
    let mut backoff = MIN_BACKOFF;
    // Only transitions are logged, so a member that stays down does not flood the log.
    let mut down = false;
    loop {
        let attempt = tokio::select! {
            () = stop.cancelled() => return,
            r = connect(&member.endpoint, &builder, dial_timeout) => r,
        };
        match attempt {
            Ok((sender, conn)) => {
                slot.set(Some(sender));
                upstream.connected.send_modify(|n| *n = n.wrapping_add(1));
                if down {
                    tracing::info!(endpoint = %member.name, connection, "reconnected to etcd member");
                } else {
                    tracing::debug!(endpoint = %member.name, connection, "connected to etcd member");
                }
                let since = Instant::now();
                let result = tokio::select! {
                    () = stop.cancelled() => {
                        slot.set(None);
                        return;
                    }
                    r = conn => r,
                };
                slot.set(None);
                down = true;
                match result {
                    Ok(()) => {
                        tracing::warn!(endpoint = %member.name, connection, "etcd member closed the connection")
                    }
                    Err(e) => {
                        tracing::warn!(endpoint = %member.name, connection, error = %e, "lost connection to etcd member")
                    }
                }
                if since.elapsed() >= HEALTHY_LIFETIME {
                    backoff = MIN_BACKOFF;
                }
            }
            Err(e) => {
                if !down {
                    tracing::warn!(endpoint = %member.name, connection, error = %e, "cannot connect to etcd member; retrying in the background");
                }
                down = true;
            }
        }
        let pause = backoff.mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

type Connection = http2::Connection<TokioIo<TcpStream>, RequestBody, TokioExecutor>;

/// Why a connection to a member could not be made.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(#[from] hyper::Error),
}

async fn connect(
    endpoint: &Endpoint,
    builder: &http2::Builder<TokioExecutor>,
    dial_timeout: Duration,
) -> Result<(SendRequest<RequestBody>, Connection), ConnectError> {
    let dial = async {
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
        tcp.set_nodelay(true)?;
        Ok::<_, ConnectError>(builder.handshake(TokioIo::new(tcp)).await?)
    };
    tokio::time::timeout(dial_timeout, dial)
        .await
        .map_err(|_| ConnectError::Timeout(dial_timeout))?
}
