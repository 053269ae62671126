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
//!
//! The member set can change at run time (`--endpoints-auto-sync-interval`,
//! [`Upstream::set_endpoints`]): it is an immutable snapshot swapped whole, so a call reads it
//! with one short read lock and never holds a lock across an await. Members that stay keep their
//! connections; a member that leaves has its tasks stopped and its connections closed.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backend::Endpoint;
use hyper::Request;
use hyper::Response;
use hyper::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::dial::{Alpn, Dialer};
use crate::http2::StreamError;
use crate::http2::client::{self as http2_client, Keepalive, SendHandle};
use crate::rewrite::RequestBody;

/// The body of a member's response.
pub type UpstreamBody = crate::http2::StreamBody;

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
        /// What the HTTP/2 connection reported.
        source: StreamError,
    },
}

/// One member: its address for dialing and for the `:authority` of forwarded calls.
#[derive(Debug)]
struct Member {
    endpoint: Endpoint,
    name: String,
    authority: Authority,
    /// Spoken to over TLS (`https`): forwarded calls carry `:scheme https`.
    tls: bool,
    /// False while the member's last probe failed: new calls skip it.
    active: AtomicBool,
    /// The same as `active`, for long streams that wait for their member to fail
    /// ([`Serving::failed`]).
    health: watch::Sender<bool>,
    /// Cancelled when the member leaves the set (auto-sync): ends its connection and probe tasks.
    stop: CancellationToken,
}

/// One connection slot: the sender of the live connection, `None` while (re)connecting.
struct Slot {
    member: Arc<Member>,
    /// Which of the member's connections this is (for logs).
    connection: usize,
    // Held only to clone or replace the sender (an Arc): never across await.
    sender: Mutex<Option<SendHandle>>,
}

impl Slot {
    fn sender(&self) -> Option<SendHandle> {
        let guard = self.sender.lock().ok()?;
        guard.clone()
    }

    fn set(&self, sender: Option<SendHandle>) {
        if let Ok(mut guard) = self.sender.lock() {
            *guard = sender;
        }
    }
}

/// The members at one moment. Replaced whole when auto-sync changes the members, so a call
/// works on one consistent snapshot without holding a lock.
struct MemberSet {
    members: Vec<Arc<Member>>,
    /// Connection `c` of member `m` is at `c * members.len() + m`, so consecutive positions are
    /// different members: round-robin over the slots is round-robin over members.
    slots: Vec<Arc<Slot>>,
    names: String,
}

/// What is needed to start the tasks of a member that joins later.
struct Spawner {
    keepalive: Keepalive,
    dial_timeout: Duration,
    per_member: usize,
    health_check_interval: Duration,
    tls_probe: Arc<rustls::ClientConfig>,
    /// TCP and TLS to members.
    dialer: Dialer,
    stop: CancellationToken,
}

/// Every member's connections, and the round-robin position.
pub struct Upstream {
    /// The current members. The lock is held only to clone or swap the `Arc` (never across an
    /// await), so a call pays one uncontended read lock.
    set: RwLock<Arc<MemberSet>>,
    next: AtomicUsize,
    /// Bumped each time a connection comes up: wakes calls waiting for a member.
    connected: watch::Sender<u64>,
    connect_wait: Duration,
    spawner: Spawner,
}

fn new_member(ep: &Endpoint, stop: &CancellationToken) -> Option<Arc<Member>> {
    let name = ep.to_string();
    match Authority::try_from(name.as_str()) {
        Ok(authority) => Some(Arc::new(Member {
            endpoint: ep.clone(),
            name,
            authority,
            tls: Dialer::uses_tls(ep),
            active: AtomicBool::new(true),
            health: watch::Sender::new(true),
            stop: stop.child_token(),
        })),
        Err(e) => {
            tracing::warn!(endpoint = %name, error = %e, "skipping an endpoint that is not a valid authority");
            None
        }
    }
}

impl Upstream {
    /// Builds the member set and starts one task per connection that connects, and reconnects
    /// with backoff whenever the connection fails, until `stop` is cancelled.
    pub fn start(config: &Config, stop: CancellationToken) -> Arc<Upstream> {
        let spawner = Spawner {
            keepalive: Keepalive {
                interval: config.dial_keepalive_time,
                timeout: config.dial_keepalive_timeout,
                while_idle: config.permit_without_stream,
            },
            dial_timeout: config.dial_timeout,
            per_member: config.connections_per_member.max(1),
            health_check_interval: config.health_check_interval,
            tls_probe: backend::tls::probe_client_config(),
            dialer: Dialer::new(config),
            stop,
        };
        let mut members: Vec<Arc<Member>> = Vec::new();
        for ep in &config.endpoints {
            if members.iter().any(|m| m.name == ep.to_string()) {
                continue;
            }
            members.extend(new_member(ep, &spawner.stop));
        }
        let set = layout(members, &[], spawner.per_member);
        let upstream = Arc::new(Upstream {
            set: RwLock::new(Arc::new(MemberSet {
                members: Vec::new(),
                slots: Vec::new(),
                names: String::new(),
            })),
            next: AtomicUsize::new(0),
            connected: watch::Sender::new(0),
            connect_wait: config.connect_wait,
            spawner,
        });
        upstream.spawn_tasks(&set.members, &set.slots);
        *upstream.set.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        upstream
    }

    /// Starts the connection tasks of `slots` and the probes of `members`.
    fn spawn_tasks(self: &Arc<Self>, members: &[Arc<Member>], slots: &[Arc<Slot>]) {
        let sp = &self.spawner;
        for slot in slots {
            tokio::spawn(maintain(
                self.clone(),
                slot.clone(),
                sp.keepalive,
                sp.dialer.clone(),
                sp.dial_timeout,
            ));
        }
        if !sp.health_check_interval.is_zero() {
            for member in members {
                tokio::spawn(monitor(
                    member.clone(),
                    sp.health_check_interval,
                    sp.dial_timeout,
                    sp.tls_probe.clone(),
                    sp.dialer.dns().clone(),
                ));
            }
        }
    }

    /// How the proxy connects to members (TLS, name resolution), for its own calls.
    pub fn dialer(&self) -> &Dialer {
        &self.spawner.dialer
    }

    fn snapshot(&self) -> Arc<MemberSet> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the member set with `endpoints` (auto-sync): members that stay keep their
    /// connections and health, new ones are connected, gone ones are closed (their open calls
    /// end). An empty list changes nothing, so a bad sync never leaves the proxy without
    /// members. Returns the names added and removed, `None` when nothing changed.
    pub fn set_endpoints(
        self: &Arc<Self>,
        endpoints: &[Endpoint],
    ) -> Option<(Vec<String>, Vec<String>)> {
        let mut wanted: Vec<&Endpoint> = Vec::new();
        for ep in endpoints {
            if !wanted.iter().any(|w| w.to_string() == ep.to_string()) {
                wanted.push(ep);
            }
        }
        if wanted.is_empty() {
            return None;
        }
        let (added, removed, new_members, new_slots) = {
            let mut guard = self.set.write().unwrap_or_else(|e| e.into_inner());
            let old = guard.clone();
            let names: Vec<String> = wanted.iter().map(|e| e.to_string()).collect();
            let removed: Vec<Arc<Member>> = old
                .members
                .iter()
                .filter(|m| !names.contains(&m.name))
                .cloned()
                .collect();
            let mut members: Vec<Arc<Member>> = old
                .members
                .iter()
                .filter(|m| names.contains(&m.name))
                .cloned()
                .collect();
            let mut new_members = Vec::new();
            for ep in wanted {
                if members.iter().any(|m| m.name == ep.to_string()) {
                    continue;
                }
                if let Some(m) = new_member(ep, &self.spawner.stop) {
                    new_members.push(m.clone());
                    members.push(m);
                }
            }
            if new_members.is_empty() && removed.is_empty() {
                return None;
            }
            if members.is_empty() {
                // Every wanted endpoint was invalid: keep what works.
                return None;
            }
            let set = layout(members, &old.slots, self.spawner.per_member);
            let new_slots: Vec<Arc<Slot>> = set
                .slots
                .iter()
                .filter(|s| new_members.iter().any(|m| Arc::ptr_eq(m, &s.member)))
                .cloned()
                .collect();
            *guard = Arc::new(set);
            (
                new_members
                    .iter()
                    .map(|m| m.name.clone())
                    .collect::<Vec<_>>(),
                removed,
                new_members,
                new_slots,
            )
        };
        for m in &removed {
            m.stop.cancel();
        }
        self.spawn_tasks(&new_members, &new_slots);
        Some((added, removed.iter().map(|m| m.name.clone()).collect()))
    }

    /// How many members there are now.
    pub fn member_count(&self) -> usize {
        self.snapshot().members.len()
    }

    /// The members to try for a call made by the proxy itself (health, `/metrics`): the ones
    /// whose probe passes first, starting at the next round-robin position, then the others.
    pub fn members_in_order(&self) -> Vec<Endpoint> {
        let set = self.snapshot();
        let n = set.members.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let rotated = (0..n).map(|k| &set.members[(start + k) % n]);
        let (active, inactive): (Vec<&Arc<Member>>, Vec<&Arc<Member>>) =
            rotated.partition(|m| m.active.load(Ordering::Acquire));
        active
            .into_iter()
            .chain(inactive)
            .map(|m| m.endpoint.clone())
            .collect()
    }

    /// The member at `ep`, as a [`Serving`] whose [`Serving::failed`] a stream the proxy opened
    /// there itself (over its own channel) can wait on; `None` if it is not a member.
    pub fn serving(&self, ep: &Endpoint) -> Option<Serving> {
        let set = self.snapshot();
        let member = set.members.iter().find(|m| &m.endpoint == ep)?;
        Some(Serving {
            member: member.clone(),
        })
    }

    /// Sends `req` to the next member that can take it, and returns etcd's response head (its
    /// body and trailers stream on). A call refused by a connection before anything was sent
    /// moves on to the next member; when no member is connected, waits up to
    /// [`Config::connect_wait`] for one.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        self.dispatch(req, None).await.map(|(resp, _)| resp)
    }

    /// [`Upstream::send`] for a stream that must survive its member: prefers members other
    /// than `avoid` (the one that just failed it), and says which member took the call.
    pub async fn send_stream(
        &self,
        req: Request<RequestBody>,
        avoid: Option<&str>,
    ) -> Result<(Response<UpstreamBody>, Serving), SendError> {
        self.dispatch(req, avoid)
            .await
            .map(|(resp, member)| (resp, Serving { member }))
    }

    async fn dispatch(
        &self,
        mut req: Request<RequestBody>,
        avoid: Option<&str>,
    ) -> Result<(Response<UpstreamBody>, Arc<Member>), SendError> {
        let mut waited = false;
        loop {
            let set = self.snapshot();
            let total = set.slots.len();
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            // First pass: members whose probe passes. Second pass: the others, as a last
            // resort: a probe can be wrong (a slow answer), and trying them beats failing the
            // call when nothing else is connected. Third: the member to avoid, if nothing else
            // could take the call.
            for pass in [Pass::Active, Pass::Inactive, Pass::Avoided] {
                if pass == Pass::Avoided && avoid.is_none() {
                    break;
                }
                for i in 0..total {
                    let slot = &set.slots[(start + i) % total];
                    let member = &slot.member;
                    let avoided = avoid.is_some_and(|a| a == member.name);
                    let wanted = match pass {
                        Pass::Active => !avoided && member.is_active(),
                        Pass::Inactive => !avoided && !member.is_active(),
                        Pass::Avoided => avoided,
                    };
                    if !wanted {
                        continue;
                    }
                    let Some(sender) = slot.sender() else {
                        continue;
                    };
                    // Waits only while the member's stream limit is reached. A connection
                    // that fails here took nothing: the next member may have the call.
                    if let Err(e) = poll_fn(|cx| sender.poll_ready(cx)).await {
                        tracing::debug!(member = %member.name, error = %e, "connection refused a call before sending it; trying the next member");
                        continue;
                    }
                    set_authority(&mut req, &member.authority, member.tls);
                    let (parts, body) = req.into_parts();
                    let response = match sender.send(parts, body) {
                        Ok(response) => response,
                        Err(source) => {
                            return Err(SendError::Failed {
                                member: member.name.clone(),
                                source,
                            });
                        }
                    };
                    return match response.await {
                        Ok(resp) => Ok((resp, member.clone())),
                        Err(source) => Err(SendError::Failed {
                            member: member.name.clone(),
                            source,
                        }),
                    };
                }
            }
            if waited || self.connect_wait.is_zero() || total == 0 {
                return Err(SendError::NoMember(set.names.clone()));
            }
            waited = true;
            // Subscribe before looking again, so a connection that comes up in between is not
            // missed.
            let mut changed = self.connected.subscribe();
            if set.slots.iter().any(|s| s.sender().is_some()) {
                continue;
            }
            let _ = tokio::time::timeout(self.connect_wait, changed.changed()).await;
        }
    }
}

/// The passes of [`Upstream::dispatch`] over the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Active,
    Inactive,
    Avoided,
}

/// The member serving a stream ([`Upstream::send_stream`]).
#[derive(Debug, Clone)]
pub struct Serving {
    member: Arc<Member>,
}

impl Serving {
    /// The member's name (`host:port`).
    pub fn name(&self) -> &str {
        &self.member.name
    }

    /// Resolves when the member fails a probe from now on, or leaves the member set: a stopped
    /// member keeps its streams open without ever answering, so a stream must move on its own.
    /// (A member already failing when the stream started is the last resort that took it: only
    /// a new failure counts.)
    pub async fn failed(&self) {
        let mut health = self.member.health.subscribe();
        let went_down = async {
            while health.changed().await.is_ok() {
                if !*health.borrow_and_update() {
                    return;
                }
            }
            // The sender lives as long as the member: closed means the member is gone.
        };
        tokio::select! {
            () = went_down => {}
            () = self.member.stop.cancelled() => {}
        }
    }
}

/// The slot layout for `members`, reusing the slots of `old` for members that stay (so their
/// live connections are kept).
fn layout(members: Vec<Arc<Member>>, old: &[Arc<Slot>], per_member: usize) -> MemberSet {
    let mut slots = Vec::with_capacity(per_member * members.len());
    for connection in 0..per_member {
        for member in &members {
            let reused = old
                .iter()
                .find(|s| s.connection == connection && Arc::ptr_eq(&s.member, member));
            slots.push(match reused {
                Some(s) => s.clone(),
                None => Arc::new(Slot {
                    member: member.clone(),
                    connection,
                    sender: Mutex::new(None),
                }),
            });
        }
    }
    let names = members
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(",");
    MemberSet {
        members,
        slots,
        names,
    }
}

impl Member {
    fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }
}

/// Probes `member` every `interval` (each probe may take up to `timeout`), taking it out of the
/// rotation when a probe fails and putting it back when one succeeds, until the member leaves
/// the set or the proxy stops. Only transitions are logged.
async fn monitor(
    member: Arc<Member>,
    interval: Duration,
    timeout: Duration,
    tls_probe: Arc<rustls::ClientConfig>,
    dns: backend::Dns,
) {
    let stop = member.stop.clone();
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
                member
                    .health
                    .send_if_modified(|h| !std::mem::replace(h, true));
                if !member.active.swap(true, Ordering::AcqRel) {
                    tracing::info!(endpoint = %member.name, "activated endpoint");
                }
            }
            Err(e) => {
                member
                    .health
                    .send_if_modified(|h| std::mem::replace(h, false));
                if member.active.swap(false, Ordering::AcqRel) {
                    tracing::warn!(endpoint = %member.name, error = %e, "deactivated endpoint");
                }
            }
        }
    }
}

/// Points the call at `authority` (`https` over TLS, else `http`), keeping its path.
fn set_authority(req: &mut Request<RequestBody>, authority: &Authority, tls: bool) {
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(authority.clone());
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    // Scheme, authority and path are all set, the only combination `from_parts` requires.
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// Keeps `slot` connected: connect, publish the sender, drive the connection until it ends,
/// then retry with exponential backoff (jittered so members restarting together are not hit in
/// lockstep). Ends when the member leaves the set or the proxy stops.
async fn maintain(
    upstream: Arc<Upstream>,
    slot: Arc<Slot>,
    keepalive: Keepalive,
    dialer: Dialer,
    dial_timeout: Duration,
) {
    let member = &slot.member;
    let stop = member.stop.clone();
    let connection = slot.connection;
    let mut backoff = MIN_BACKOFF;
    // Only transitions are logged, so a member that stays down does not flood the log.
    let mut down = false;
    loop {
        let attempt = tokio::select! {
            () = stop.cancelled() => return,
            r = connect(&dialer, &member.endpoint, keepalive, dial_timeout) => r,
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

type Connection = http2_client::Connection<backend::tls::MemberStream>;

/// Why a connection to a member could not be made.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

async fn connect(
    dialer: &Dialer,
    endpoint: &Endpoint,
    keepalive: Keepalive,
    dial_timeout: Duration,
) -> Result<(SendHandle, Connection), ConnectError> {
    let dial = async {
        let stream = dialer.connect(endpoint, Alpn::H2).await?;
        Ok::<_, ConnectError>(http2_client::handshake(stream, keepalive))
    };
    tokio::time::timeout(dial_timeout, dial)
        .await
        .map_err(|_| ConnectError::Timeout(dial_timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(ports: &[u16]) -> Vec<Endpoint> {
        ports
            .iter()
            .map(|p| Endpoint::parse(&format!("127.0.0.1:{p}")).unwrap())
            .collect()
    }

    fn names(u: &Upstream) -> Vec<String> {
        let mut n: Vec<String> = u
            .snapshot()
            .members
            .iter()
            .map(|m| m.name.clone())
            .collect();
        n.sort();
        n
    }

    #[tokio::test]
    async fn member_set_changes_keep_members_that_stay() {
        let stop = CancellationToken::new();
        let mut config = Config::new(eps(&[1, 2]));
        config.health_check_interval = Duration::ZERO;
        let u = Upstream::start(&config, stop.clone());
        assert_eq!(u.snapshot().slots.len(), 2 * config.connections_per_member);
        let kept = u.snapshot().members[1].clone();

        let (added, removed) = u.set_endpoints(&eps(&[2, 3, 3])).expect("a change");
        assert_eq!(added, ["127.0.0.1:3"]);
        assert_eq!(removed, ["127.0.0.1:1"]);
        assert_eq!(names(&u), ["127.0.0.1:2", "127.0.0.1:3"]);
        let set = u.snapshot();
        assert!(set.members.iter().any(|m| Arc::ptr_eq(m, &kept)));
        assert!(!kept.stop.is_cancelled());
        // Consecutive slots are different members, and every member has its connections.
        assert_eq!(set.slots.len(), 2 * config.connections_per_member);
        assert!(!Arc::ptr_eq(&set.slots[0].member, &set.slots[1].member));

        // Same set, or an empty or unusable one: no change, never zero members.
        assert!(u.set_endpoints(&eps(&[3, 2])).is_none());
        assert!(u.set_endpoints(&[]).is_none());
        assert_eq!(names(&u), ["127.0.0.1:2", "127.0.0.1:3"]);
        stop.cancel();
        assert!(kept.stop.is_cancelled());
    }
}
