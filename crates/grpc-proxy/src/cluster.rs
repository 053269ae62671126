//! The proxy's own side of etcd's Cluster service: registration under `--resolver-prefix`,
//! `MemberList` answered from the registered proxies, and `--endpoints-auto-sync-interval`.
//!
//! These are calls the proxy makes for itself, so they go through tonic clients over one lazy
//! channel per member (tried in [`Upstream::members_in_order`] order, the next member on
//! `UNAVAILABLE` or a timeout), not through the byte forwarder.
//!
//! Registration follows etcd's `grpcproxy.Register`: key `<prefix>/<advertise-client-url>`,
//! value `{"Op":0,"Addr":"<url>","Metadata":"{\"name\":\"<hostname>\"}"}` (Metadata is a JSON
//! string), on a lease of `--resolver-ttl` seconds kept alive every TTL/3. When the lease is lost
//! (etcd says it is gone, or no keep-alive succeeded for a whole TTL) the proxy registers again
//! with a new lease, at most once a second. On shutdown the lease is revoked, so the entry goes
//! at once rather than after the TTL.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backend::Endpoint;
use bytes::Bytes;
use etcd_api::etcdserverpb::cluster_client::ClusterClient;
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::lease_client::LeaseClient;
use etcd_api::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseLeasesRequest, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseTimeToLiveRequest, Member, MemberListRequest, MemberListResponse,
    PutRequest, RangeRequest, ResponseHeader,
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::Request;
use hyper::Response;

use hyper::header::HeaderMap;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use crate::Config;
use crate::body::ClientBody;
use crate::forward::{ResponseBody, status_response};
use crate::namespace::prefix_end;
use crate::rewrite::Decoder;
use crate::upstream::Upstream;

/// gRPC path of the call answered here when registration is on.
pub const MEMBER_LIST_PATH: &str = "/etcdserverpb.Cluster/MemberList";

/// Shortest pause between two registrations (etcd's rate limit).
const REREGISTER_PAUSE: Duration = Duration::from_secs(1);
/// How long the revoke at shutdown may take.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest MemberList request accepted (the message is a single bool).
const MAX_MEMBER_LIST_REQUEST: usize = 64 << 10;

/// `--resolver-prefix` and `--resolver-ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolver {
    /// Key prefix the proxies register under (`<prefix>/<advertise-client-url>`).
    pub prefix: String,
    /// TTL of the registration lease, in seconds (at least 1).
    pub ttl: i64,
}

/// The proxy's own calls to the cluster.
pub struct Cluster {
    upstream: Arc<Upstream>,
    /// One lazily connected channel per member, by `host:port`. Held only to look up or insert.
    channels: Mutex<HashMap<String, Channel>>,
    call_timeout: Duration,
    /// The registration key, namespace applied; `None` without `--resolver-prefix`.
    registration: Option<Registration>,
}

/// What this proxy registers, and where every proxy registers.
#[derive(Debug, Clone)]
struct Registration {
    /// `--advertise-client-url`.
    addr: String,
    key: Bytes,
    /// `<prefix>/`, namespace applied: the range of every registered proxy.
    range: Bytes,
    value: Bytes,
    ttl: i64,
}

/// Why a call through [`Cluster::call`] failed.
type CallResult<T> = Result<T, tonic::Status>;

impl Cluster {
    /// The Cluster side of `config`, over `upstream`'s members.
    pub fn new(config: &Config, upstream: Arc<Upstream>) -> Arc<Cluster> {
        let registration = config.resolver.as_ref().map(|r| {
            let ns = |k: &str| -> Bytes {
                match &config.namespace {
                    Some(ns) => ns.key(k.as_bytes()),
                    None => Bytes::copy_from_slice(k.as_bytes()),
                }
            };
            Registration {
                addr: config.advertise_client_url.clone(),
                key: ns(&format!("{}/{}", r.prefix, config.advertise_client_url)),
                range: ns(&format!("{}/", r.prefix)),
                value: Bytes::from(registration_value(
                    &config.advertise_client_url,
                    &config.hostname,
                )),
                ttl: r.ttl.max(1),
            }
        });
        Arc::new(Cluster {
            upstream,
            channels: Mutex::new(HashMap::new()),
            call_timeout: config.dial_timeout,
            registration,
        })
    }

    /// True when MemberList is answered from the registered proxies.
    pub fn answers_member_list(&self) -> bool {
        self.registration.is_some()
    }

    /// Starts registration and auto-sync (each when configured) until `stop` is cancelled; the
    /// returned task ends once the registration lease has been revoked.
    pub fn start(
        self: &Arc<Self>,
        auto_sync_interval: Option<Duration>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        if let Some(interval) = auto_sync_interval {
            tokio::spawn(self.clone().auto_sync(interval, stop.clone()));
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Some(reg) = this.registration.clone() {
                this.register_loop(reg, stop).await;
            }
        })
    }

    fn channel(&self, ep: &Endpoint) -> Option<Channel> {
        let name = ep.to_string();
        let mut channels = self.channels.lock().ok()?;
        if let Some(ch) = channels.get(&name) {
            return Some(ch.clone());
        }
        // The connector does TCP and, for an `https` member, TLS with the proxy's member TLS
        // configuration (tonic without its TLS features needs an `http` URI; the connection
        // underneath is what carries TLS).
        let dialer = self.upstream.dialer().clone();
        let member = ep.clone();
        let connector = tower::service_fn(move |_: hyper::Uri| {
            let (dialer, member) = (dialer.clone(), member.clone());
            async move {
                dialer
                    .connect(&member, crate::dial::Alpn::H2)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        });
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{name}"))
            .ok()?
            .connect_timeout(self.call_timeout)
            .connect_with_connector_lazy(connector);
        channels.insert(name, ch.clone());
        Some(ch)
    }

    /// One channel per member, in [`Upstream::members_in_order`] order (the leasing cache's
    /// streams and its calls that must not be sent twice).
    pub(crate) fn channels(&self) -> Vec<Channel> {
        self.member_channels()
            .into_iter()
            .map(|(_, ch)| ch)
            .collect()
    }

    /// [`Cluster::channels`] with the member each channel goes to.
    pub(crate) fn member_channels(&self) -> Vec<(Endpoint, Channel)> {
        self.upstream
            .members_in_order()
            .into_iter()
            .filter_map(|ep| self.channel(&ep).map(|ch| (ep, ch)))
            .collect()
    }

    /// The member at `ep`, to wait for it to fail its health probe.
    pub(crate) fn serving(&self, ep: &Endpoint) -> Option<crate::upstream::Serving> {
        self.upstream.serving(ep)
    }

    /// Runs `f` on the members in turn until one answers; `UNAVAILABLE`, a timeout and
    /// transport errors move on to the next member, any other status is etcd's answer.
    pub(crate) async fn call<T, F, Fut>(&self, f: F) -> CallResult<T>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = CallResult<T>>,
    {
        let mut last = tonic::Status::unavailable("no etcd member is configured");
        for ep in self.upstream.members_in_order() {
            let Some(ch) = self.channel(&ep) else {
                continue;
            };
            match tokio::time::timeout(self.call_timeout, f(ch)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(s)) if !matches!(s.code(), Code::Unavailable | Code::Unknown) => {
                    return Err(s);
                }
                Ok(Err(s)) => {
                    tracing::debug!(endpoint = %ep, error = %s, "etcd member did not answer; trying the next");
                    last = s;
                }
                Err(_) => {
                    tracing::debug!(endpoint = %ep, "etcd member timed out; trying the next");
                    last = tonic::Status::deadline_exceeded(format!(
                        "etcd member {ep} did not answer within {:?}",
                        self.call_timeout
                    ));
                }
            }
        }
        Err(last)
    }

    /// Grants a lease and writes the registration key on it; returns the lease.
    async fn register_once(&self, reg: &Registration) -> CallResult<i64> {
        let ttl = reg.ttl;
        let granted = self
            .call(|ch| async move {
                let r = LeaseClient::new(ch)
                    .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                    .await?;
                Ok(r.into_inner())
            })
            .await?;
        if !granted.error.is_empty() {
            return Err(tonic::Status::unknown(granted.error));
        }
        let lease = granted.id;
        let put = PutRequest {
            key: reg.key.clone(),
            value: reg.value.clone(),
            lease,
            ..Default::default()
        };
        let written = self
            .call(|ch| {
                let put = put.clone();
                async move { KvClient::new(ch).put(put).await.map(|_| ()) }
            })
            .await;
        if let Err(e) = written {
            self.revoke(lease).await;
            return Err(e);
        }
        Ok(lease)
    }

    /// One keep-alive of `lease`; returns the TTL etcd gives it (0 or less: the lease is gone).
    async fn keep_alive_once(&self, lease: i64) -> CallResult<i64> {
        self.call(|ch| async move {
            let req = LeaseKeepAliveRequest { id: lease };
            let mut stream = LeaseClient::new(ch)
                .lease_keep_alive(futures::stream::iter([req]))
                .await?
                .into_inner();
            match stream.message().await? {
                Some(r) => Ok(r.ttl),
                None => Err(tonic::Status::unavailable(
                    "lease keep-alive stream ended without an answer",
                )),
            }
        })
        .await
    }

    /// Keeps `lease` alive until it is lost; returns why.
    async fn keep_alive(&self, lease: i64, ttl: i64) -> String {
        let ttl = Duration::from_secs(u64::try_from(ttl).unwrap_or(1));
        let period = (ttl / 3).max(Duration::from_millis(500));
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(period).await;
            match self.keep_alive_once(lease).await {
                Ok(t) if t > 0 => last_ok = Instant::now(),
                Ok(_) => return "etcd reports the lease expired or revoked".to_string(),
                Err(e) if e.code() == Code::NotFound => {
                    return format!("etcd reports the lease gone: {}", e.message());
                }
                Err(e) => {
                    if last_ok.elapsed() >= ttl {
                        return format!("no keep-alive succeeded for the whole TTL: {e}");
                    }
                    tracing::debug!(lease = %format_lease(lease), error = %e, "registration keep-alive failed; retrying");
                }
            }
        }
    }

    async fn revoke(&self, lease: i64) {
        let revoked = tokio::time::timeout(REVOKE_TIMEOUT, self.lease_revoke(lease)).await;
        match revoked {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(lease = %format_lease(lease), error = %e, "cannot revoke the registration lease; it expires after its TTL")
            }
            Err(_) => {
                tracing::warn!(lease = %format_lease(lease), "revoking the registration lease timed out; it expires after its TTL")
            }
        }
    }

    /// Registers, keeps the registration alive, registers again when it is lost, and revokes
    /// it when `stop` is cancelled.
    async fn register_loop(&self, reg: Registration, stop: CancellationToken) {
        let key = String::from_utf8_lossy(&reg.key).into_owned();
        let mut failing = false;
        loop {
            if stop.is_cancelled() {
                return;
            }
            // Not raced against `stop`: a lease granted meanwhile must be known to be revoked.
            let attempt = self.register_once(&reg).await;
            match attempt {
                Ok(lease) => {
                    failing = false;
                    if stop.is_cancelled() {
                        self.revoke(lease).await;
                        return;
                    }
                    tracing::info!(key = %key, lease = %format_lease(lease), ttl = reg.ttl, "registered gRPC proxy");
                    let lost = tokio::select! {
                        () = stop.cancelled() => None,
                        why = self.keep_alive(lease, reg.ttl) => Some(why),
                    };
                    match lost {
                        None => {
                            self.revoke(lease).await;
                            tracing::info!(key = %key, lease = %format_lease(lease), "revoked gRPC proxy registration");
                            return;
                        }
                        Some(why) => {
                            tracing::warn!(key = %key, lease = %format_lease(lease), reason = %why, "lost gRPC proxy registration; registering again");
                        }
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(key = %key, error = %e, "cannot register gRPC proxy; retrying");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(REREGISTER_PAUSE) => {}
            }
        }
    }

    /// The keys attached to lease `id` (`LeaseTimeToLive` with keys), asked with the caller's
    /// `token` and `authorization` metadata from `headers`, so etcd applies the caller's
    /// permissions. A missing lease has no keys (etcd answers TTL -1).
    pub async fn lease_keys(&self, id: i64, headers: &HeaderMap) -> CallResult<Vec<Bytes>> {
        let auth = caller_auth(headers);
        self.call(|ch| {
            let r = with_auth(LeaseTimeToLiveRequest { id, keys: true }, &auth);
            async move {
                LeaseClient::new(ch)
                    .lease_time_to_live(r)
                    .await
                    .map(|r| r.into_inner().keys)
            }
        })
        .await
    }

    /// The header of a serializable count-only read of `[key, range_end)` (etcd's form) with
    /// the caller's `token` and `authorization` metadata from `headers`: the current revision
    /// of a member for a new watcher's created response, and etcd's permission check for the
    /// caller (a watcher must not join a shared upstream watcher it could not have created).
    pub async fn watch_check(
        &self,
        key: &Bytes,
        range_end: &Bytes,
        headers: &HeaderMap,
    ) -> CallResult<ResponseHeader> {
        let auth = caller_auth(headers);
        self.call(|ch| {
            let r = with_auth(
                RangeRequest {
                    key: key.clone(),
                    range_end: range_end.clone(),
                    serializable: true,
                    count_only: true,
                    limit: 1,
                    ..Default::default()
                },
                &auth,
            );
            async move {
                KvClient::new(ch)
                    .range(r)
                    .await
                    .map(|r| r.into_inner().header.unwrap_or_default())
            }
        })
        .await
    }

    /// etcd's `LeaseLeases` answer, asked with the caller's `token` and `authorization`.
    pub async fn lease_leases(&self, headers: &HeaderMap) -> CallResult<LeaseLeasesResponse> {
        let auth = caller_auth(headers);
        self.call(|ch| {
            let r = with_auth(LeaseLeasesRequest {}, &auth);
            async move {
                LeaseClient::new(ch)
                    .lease_leases(r)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Revokes lease `id` (the proxy's own leases: registration, leasing session).
    pub(crate) async fn lease_revoke(&self, id: i64) -> CallResult<()> {
        self.call(|ch| async move {
            LeaseClient::new(ch)
                .lease_revoke(LeaseRevokeRequest { id })
                .await
                .map(|_| ())
        })
        .await
    }

    /// Answers `Cluster/MemberList` with one member per registered proxy.
    pub async fn member_list(&self, req: Request<ClientBody>) -> Response<ResponseBody> {
        let Some(reg) = &self.registration else {
            return status_response(Code::Internal as u16, "MemberList: no resolver prefix");
        };
        let token = req.headers().get("token").cloned();
        let body = match Limited::new(req.into_body(), MAX_MEMBER_LIST_REQUEST + 5)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => {
                return status_response(
                    Code::ResourceExhausted as u16,
                    &format!(
                        "grpc: received message larger than max (more than {MAX_MEMBER_LIST_REQUEST} bytes)"
                    ),
                );
            }
            // The client reset its call.
            Err(e) => {
                return status_response(Code::Cancelled as u16, &format!("client stream: {e}"));
            }
        };
        let mut decoder = Decoder::new(MAX_MEMBER_LIST_REQUEST);
        decoder.push(&body);
        let message = decoder
            .next_message()
            .and_then(|m| decoder.finish().map(|()| m));
        let request = match message {
            // A body with no message is an empty request, as grpc-go reads it.
            Ok(m) => match MemberListRequest::decode(m.unwrap_or_default()) {
                Ok(r) => r,
                Err(e) => {
                    return status_response(
                        Code::Internal as u16,
                        &format!("grpc: error unmarshalling request: {e}"),
                    );
                }
            },
            // Compressed (UNIMPLEMENTED), over the limit (RESOURCE_EXHAUSTED), truncated.
            Err(e) => {
                let status = crate::rewrite::Status::from(e);
                return status_response(status.code, &status.message);
            }
        };
        let range = RangeRequest {
            key: reg.range.clone(),
            range_end: prefix_end(&reg.range),
            serializable: !request.linearizable,
            ..Default::default()
        };
        let ranged = self
            .call(|ch| {
                let mut r = tonic::Request::new(range.clone());
                if let Some(t) = token
                    .as_ref()
                    .and_then(|t| t.to_str().ok())
                    .and_then(|t| t.parse().ok())
                {
                    r.metadata_mut().insert("token", t);
                }
                async move { KvClient::new(ch).range(r).await.map(|r| r.into_inner()) }
            })
            .await;
        let ranged = match ranged {
            Ok(r) => r,
            Err(s) => return status_response(s.code() as u16, s.message()),
        };
        let mut addrs: Vec<String> = ranged
            .kvs
            .iter()
            .filter_map(|kv| registered_addr(&kv.value))
            .collect();
        // As etcd's proxy: while no registration is visible (this proxy's own is not written
        // yet, or was just lost), answer with this proxy alone rather than with no member, which
        // would leave a client that syncs its endpoints with nowhere to go.
        if addrs.is_empty() {
            addrs.push(reg.addr.clone());
        }
        let members = addrs
            .into_iter()
            .map(|addr| Member {
                id: member_id(&addr),
                name: addr.clone(),
                client_ur_ls: vec![addr],
                ..Default::default()
            })
            .collect();
        let resp = MemberListResponse {
            header: ranged.header,
            members,
        };
        crate::forward::local_response(&resp.encode_to_vec())
    }

    /// Every `interval`, asks the cluster for its members and makes them the member set:
    /// members that joined are added, members that left removed (log `updated endpoints`). A
    /// failed sync, or one that finds no usable client URL, changes nothing.
    async fn auto_sync(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let listed = self
                .call(|ch| async move {
                    ClusterClient::new(ch)
                        .member_list(MemberListRequest {
                            linearizable: false,
                        })
                        .await
                        .map(|r| r.into_inner())
                })
                .await;
            let resp = match listed {
                Ok(r) => r,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "failed to sync endpoints; keeping the current ones");
                    }
                    failing = true;
                    continue;
                }
            };
            failing = false;
            let endpoints = synced_endpoints(&resp.members);
            if endpoints.is_empty() {
                tracing::debug!(
                    "endpoint sync found no member with a client URL; keeping the current ones"
                );
                continue;
            }
            if let Some((added, removed)) = self.upstream.set_endpoints(&endpoints) {
                let url = |n: &String| format!("http://{n}");
                tracing::info!(
                    added = ?added.iter().map(url).collect::<Vec<_>>(),
                    removed = ?removed.iter().map(url).collect::<Vec<_>>(),
                    "updated endpoints"
                );
                if let Ok(mut channels) = self.channels.lock() {
                    channels.retain(|name, _| !removed.contains(name));
                }
            }
        }
    }
}

/// The client URLs clientv3's endpoint sync would use: started voting members only (a learner
/// or a member not yet started has no name); `https` ones are spoken to over TLS.
fn synced_endpoints(members: &[Member]) -> Vec<Endpoint> {
    members
        .iter()
        .filter(|m| !m.name.is_empty() && !m.is_learner)
        .flat_map(|m| m.client_ur_ls.iter())
        .filter_map(|u| Endpoint::parse(u).ok())
        .collect()
}

/// etcd's registration value (`endpoints.Update` as JSON, Metadata a JSON string).
fn registration_value(addr: &str, hostname: &str) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let metadata = format!("{{\"name\":{}}}", quote(hostname));
    format!(
        "{{\"Op\":0,\"Addr\":{},\"Metadata\":{}}}",
        quote(addr),
        quote(&metadata)
    )
}

/// The address of a registration value, `None` for anything but an add (`Op` 0) with an address.
fn registered_addr(value: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    if v.get("Op").and_then(serde_json::Value::as_i64).unwrap_or(0) != 0 {
        return None;
    }
    let addr = v.get("Addr")?.as_str()?;
    (!addr.is_empty()).then(|| addr.to_string())
}

/// A stable member ID for a proxy: FNV-1a of its URL (never 0, which etcd's proxy reports).
fn member_id(url: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in url.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

/// A lease ID as etcd prints it (hex).
fn format_lease(lease: i64) -> String {
    format!("{lease:x}")
}

/// The caller's auth metadata (`token`, `authorization`) from its request headers, for a call
/// the proxy makes on its behalf.
fn caller_auth(headers: &HeaderMap) -> Vec<(&'static str, tonic::metadata::AsciiMetadataValue)> {
    ["token", "authorization"]
        .into_iter()
        .filter_map(|name| Some((name, headers.get(name)?.to_str().ok()?.parse().ok()?)))
        .collect()
}

/// `message` as a request carrying `auth`.
fn with_auth<T>(
    message: T,
    auth: &[(&'static str, tonic::metadata::AsciiMetadataValue)],
) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    for (name, value) in auth {
        r.metadata_mut().insert(*name, value.clone());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_value_is_etcds() {
        assert_eq!(
            registration_value("127.0.0.1:42790", "vm"),
            r#"{"Op":0,"Addr":"127.0.0.1:42790","Metadata":"{\"name\":\"vm\"}"}"#
        );
        assert_eq!(
            registered_addr(registration_value("127.0.0.1:42790", "vm").as_bytes()).as_deref(),
            Some("127.0.0.1:42790")
        );
        assert_eq!(registered_addr(br#"{"Op":1,"Addr":"x:1"}"#), None);
        assert_eq!(registered_addr(b"not json"), None);
    }

    #[test]
    fn member_ids_are_stable_and_distinct() {
        assert_eq!(member_id("127.0.0.1:1"), member_id("127.0.0.1:1"));
        assert_ne!(member_id("127.0.0.1:1"), member_id("127.0.0.1:2"));
        assert_ne!(member_id(""), 0);
    }

    #[test]
    fn sync_keeps_started_voting_http_members() {
        let m = |name: &str, urls: &[&str], learner: bool| Member {
            name: name.into(),
            client_ur_ls: urls.iter().map(|s| s.to_string()).collect(),
            is_learner: learner,
            ..Default::default()
        };
        let eps = synced_endpoints(&[
            m("a", &["http://127.0.0.1:1"], false),
            m("", &["http://127.0.0.1:2"], false),
            m("c", &["http://127.0.0.1:3"], true),
            m("d", &["https://127.0.0.1:4", "127.0.0.1:5"], false),
        ]);
        let names: Vec<String> = eps.iter().map(|e| e.to_string()).collect();
        assert_eq!(names, ["127.0.0.1:1", "127.0.0.1:4", "127.0.0.1:5"]);
        assert_eq!(eps[1].scheme, backend::endpoint::Scheme::Https);
    }
}
