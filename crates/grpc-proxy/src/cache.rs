//! The range cache: serializable `KV/Range` calls answered from memory, kept coherent with
//! every write to the cluster by a watch, bounded, and never shown to an identity that could
//! not read it.
//!
//! etcd's proxy caches every Range by request and invalidates only on writes that go through
//! that proxy, so a write made elsewhere (directly, another proxy) is never seen, open-ended
//! ranges are never invalidated, nested Txn writes are missed, one user's cached data is served
//! to another, and after a Compact nothing is cached again (reference §1.1). This cache differs:
//!
//! - **What**: a Range with `serializable`, `revision` 0 and no `hasleader` metadata. Every other
//!   call, linearizable reads included, goes to etcd unchanged.
//! - **Coherent**: one watch over the whole key space (the namespace's range under
//!   `--namespace`), opened with no credentials ([`KeyspaceWatch`]). Every event drops the
//!   entries whose interval holds its key. `W` is the highest revision the watch has reported
//!   (created header, event revisions, progress notifications of the watcher itself). An answer
//!   from etcd is kept only if the watch is live and its revision is at least `W`: every event
//!   after it is still to come and will drop it. A hit is answered with the kept response, its
//!   header revision raised to `max(revision, W)`: no event touched the range in between, so it
//!   is what a serializable read at `W` returns. Any failure of the watch flushes everything and
//!   nothing is kept until a new one is created (on another member, with backoff).
//! - **Auth-safe**: the watch carries no token, so with etcd auth on it is refused and the cache
//!   stays empty (every read goes to etcd). Auth switched on later does not end a watch, so
//!   every second a credential-less serializable read checks that etcd still serves it (etcd
//!   refuses it with auth on), and an `Auth/AuthEnable` through this proxy flushes at once; both
//!   stop the cache. Entries are keyed by the caller's `token` and
//!   `authorization` metadata too, so even then one identity never gets another's entry.
//! - **Bounded**: at most `max_entries` entries and `max_bytes` bytes, least recently used out
//!   first.
//!
//! The watch and the poll start with the first cacheable read: a proxy whose clients never read
//! serializably costs the cluster nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering as Mem};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use http_body_util::{BodyExt, Limited};

use hyper::header::{CONTENT_LENGTH, HeaderMap};
use hyper::{Request, Response, StatusCode};
use prometheus::{IntCounter, IntGauge};
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::body::ClientBody;
use crate::cluster::Cluster;
use crate::forward::{
    ResponseBody, collect_request, local_response, send_buffered_read, status_response,
};
use crate::keyspace::KeyspaceWatch;
use crate::namespace::Namespace;
use crate::ordering::single_message;
use crate::resume::grpc_status;
use crate::rewrite::{GRPC_ACCEPT_ENCODING, Limits, Status, encode_message};
use crate::upstream::Upstream;

/// The call the cache serves.
pub const RANGE_PATH: &str = "/etcdserverpb.KV/Range";
/// The call that turns etcd auth on: the cache stops at once when one goes through the proxy.
pub const AUTH_ENABLE_PATH: &str = "/etcdserverpb.Auth/AuthEnable";

/// How often the watch asks for a progress report; three silent periods end it.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Hits are served only while the watch was heard from this recently: a member that hangs with
/// the watch open must not leave stale entries served until the silence ends the watch.
const FRESH: Duration = Duration::from_millis(1500);
/// How often the cache checks that etcd has auth off.
const AUTH_POLL: Duration = Duration::from_secs(1);
/// Backoff between attempts to create the watch.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Bytes counted for an entry beyond its key and response (maps, index, LRU slot).
const ENTRY_OVERHEAD: usize = 128;

const RESOURCE_EXHAUSTED: u16 = 8;
const INTERNAL: u16 = 13;
const UNAVAILABLE: u16 = 14;

/// `--range-cache-max-entries` and `--range-cache-max-bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Most entries held (etcd's proxy holds 2048).
    pub max_entries: usize,
    /// Most bytes held (keys, responses and a fixed overhead per entry); an answer larger than
    /// this is never kept.
    pub max_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> CacheLimits {
        CacheLimits {
            max_entries: 2048,
            max_bytes: 64 << 20,
        }
    }
}

/// The metrics the cache updates (registered in [`crate::metrics::Metrics`]).
#[derive(Clone)]
pub struct CacheMetrics {
    /// `etcd_grpc_proxy_cache_keys_total`: entries held.
    pub keys: IntGauge,
    /// `etcd_grpc_proxy_cache_hits_total`: cacheable reads answered from memory.
    pub hits: IntCounter,
    /// `etcd_grpc_proxy_cache_misses_total`: cacheable reads sent to etcd.
    pub misses: IntCounter,
}

/// The keys an entry depends on, in etcd's form (namespace applied).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Interval {
    /// One key (`range_end` empty).
    Point(Bytes),
    /// `[start, end)`; `end` `None` is the end of the key space (`range_end` `"\0"`).
    Range(Bytes, Option<Bytes>),
}

impl Interval {
    fn of(key: &Bytes, range_end: &Bytes) -> Interval {
        match range_end.as_ref() {
            b"" => Interval::Point(key.clone()),
            b"\x00" => Interval::Range(key.clone(), None),
            _ => Interval::Range(key.clone(), Some(range_end.clone())),
        }
    }

    fn len(&self) -> usize {
        match self {
            Interval::Point(k) => k.len(),
            Interval::Range(s, e) => s.len() + e.as_ref().map_or(0, Bytes::len),
        }
    }
}

struct Entry {
    /// The response's header as etcd sent it.
    header: ResponseHeader,
    /// The response in the client's form without its header, encoded: on a hit the header
    /// (field 1) is encoded in front, which gives the whole message as prost encodes it.
    body: Bytes,
    interval: Interval,
    /// Position in the LRU order.
    tick: u64,
    size: usize,
}

/// Everything the cache knows, under one lock held briefly and never across an await.
struct State {
    /// The watch is created and has not failed since.
    live: bool,
    /// `W`: the highest revision the live watch has reported.
    watermark: i64,
    /// When the watch last said anything.
    heard: Instant,
    /// etcd's last answer to the auth check says auth is off.
    auth_off: bool,
    /// `AuthEnable` calls going through the proxy now.
    auth_changes: u32,
    /// Bumped when an `AuthEnable` starts or ends: a poll answer that predates it is void.
    auth_epoch: u64,
    /// By (identity, request message).
    entries: HashMap<Bytes, Entry>,
    /// Entries of one key, by that key.
    points: HashMap<Bytes, HashSet<Bytes>>,
    /// Entries of a key range, by (start, entry key): the end.
    ranges: BTreeMap<(Bytes, Bytes), Option<Bytes>>,
    /// Least recently used first.
    lru: BTreeMap<u64, Bytes>,
    tick: u64,
    bytes: usize,
}

impl State {
    fn new() -> State {
        State {
            live: false,
            watermark: 0,
            heard: Instant::now(),
            auth_off: false,
            auth_changes: 0,
            auth_epoch: 0,
            entries: HashMap::new(),
            points: HashMap::new(),
            ranges: BTreeMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            bytes: 0,
        }
    }

    /// Entries may be kept (and, with a watch heard from lately, served).
    fn usable(&self) -> bool {
        self.live && self.auth_off && self.auth_changes == 0
    }

    fn remove(&mut self, key: &Bytes) {
        let Some(e) = self.entries.remove(key) else {
            return;
        };
        self.lru.remove(&e.tick);
        self.bytes -= e.size;
        match e.interval {
            Interval::Point(k) => {
                if let Some(set) = self.points.get_mut(&k) {
                    set.remove(key);
                    if set.is_empty() {
                        self.points.remove(&k);
                    }
                }
            }
            Interval::Range(start, _) => {
                self.ranges.remove(&(start, key.clone()));
            }
        }
    }

    fn flush(&mut self) {
        self.entries.clear();
        self.points.clear();
        self.ranges.clear();
        self.lru.clear();
        self.bytes = 0;
    }

    /// Drops every entry whose interval holds the etcd key `key`.
    fn invalidate(&mut self, key: &Bytes) {
        let mut doomed: Vec<Bytes> = self
            .points
            .get(key)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        // Ranges starting at or before `key`: (key + "\0", "") is past every (key, _).
        let mut after = BytesMut::with_capacity(key.len() + 1);
        after.put_slice(key);
        after.put_u8(0);
        let bound = (after.freeze(), Bytes::new());
        for ((_, entry), end) in self.ranges.range(..bound) {
            if end.as_ref().is_none_or(|e| key < e) {
                doomed.push(entry.clone());
            }
        }
        for k in &doomed {
            self.remove(k);
        }
    }

    fn touch(&mut self, key: &Bytes) -> Option<&Entry> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.entries.get_mut(key)?;
        self.lru.remove(&e.tick);
        e.tick = tick;
        self.lru.insert(tick, key.clone());
        Some(e)
    }

    fn insert(&mut self, key: Bytes, mut entry: Entry, limits: CacheLimits) {
        self.remove(&key);
        if entry.size > limits.max_bytes || limits.max_entries == 0 {
            return;
        }
        self.tick += 1;
        entry.tick = self.tick;
        self.lru.insert(entry.tick, key.clone());
        self.bytes += entry.size;
        match &entry.interval {
            Interval::Point(k) => {
                self.points
                    .entry(k.clone())
                    .or_default()
                    .insert(key.clone());
            }
            Interval::Range(start, end) => {
                self.ranges
                    .insert((start.clone(), key.clone()), end.clone());
            }
        }
        self.entries.insert(key, entry);
        while self.entries.len() > limits.max_entries || self.bytes > limits.max_bytes {
            let Some(oldest) = self.lru.values().next().cloned() else {
                break;
            };
            self.remove(&oldest);
        }
    }
}

/// The range cache of one proxy.
pub struct RangeCache {
    limits: CacheLimits,
    proxy_limits: Limits,
    namespace: Option<Namespace>,
    cluster: Arc<Cluster>,
    upstream: Arc<Upstream>,
    metrics: CacheMetrics,
    state: Mutex<State>,
    started: AtomicBool,
    stop: CancellationToken,
}

/// What a client's Range is, once read.
struct Read {
    /// The decoded request.
    request: RangeRequest,
    /// The request message as the client sent it.
    message: Bytes,
}

impl RangeCache {
    /// A cache in front of `upstream`; its watch and auth poll start with the first cacheable
    /// read and stop with `stop`.
    pub fn new(
        limits: CacheLimits,
        proxy_limits: Limits,
        namespace: Option<Namespace>,
        cluster: Arc<Cluster>,
        upstream: Arc<Upstream>,
        metrics: CacheMetrics,
        stop: CancellationToken,
    ) -> Arc<RangeCache> {
        Arc::new(RangeCache {
            limits,
            proxy_limits,
            namespace,
            cluster,
            upstream,
            metrics,
            state: Mutex::new(State::new()),
            started: AtomicBool::new(false),
            stop,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(self: &Arc<Self>) {
        if self.started.load(Mem::Relaxed) || self.started.swap(true, Mem::AcqRel) {
            return;
        }
        tokio::spawn(self.clone().watch_loop());
        tokio::spawn(self.clone().auth_loop());
    }

    /// Serves a `KV/Range` call: from memory when it is cacheable and held, else from etcd
    /// (keeping the answer when it may be kept).
    pub async fn handle(self: &Arc<Self>, req: Request<ClientBody>) -> Response<ResponseBody> {
        let (parts, body) = req.into_parts();
        let body = match collect_request(body, self.proxy_limits).await {
            Ok(body) => body,
            Err(refusal) => return refusal,
        };
        let read = single_message(&body, self.proxy_limits).and_then(|message| {
            let request = RangeRequest::decode(message.clone()).map_err(|e| {
                Status::new(INTERNAL, format!("grpc: error unmarshalling request: {e}"))
            })?;
            Ok(Read { request, message })
        });
        let read = match (read, &self.namespace) {
            (Ok(read), _) => read,
            // Not a message the proxy can read: etcd answers it as it is, as on the byte path;
            // under a namespace it cannot be sent unchanged, as the rewrite handler refuses it.
            (Err(_), None) => return self.pass(&parts, body).await,
            (Err(status), Some(_)) => return status_response(status.code, &status.message),
        };
        let cacheable = read.request.serializable
            && read.request.revision == 0
            && !parts.headers.contains_key("hasleader");
        if !cacheable && self.namespace.is_none() {
            return self.pass(&parts, body).await;
        }
        let key = cacheable.then(|| entry_key(&parts.headers, &read.message));
        if let Some(key) = &key {
            self.start();
            if let Some(hit) = self.lookup(key) {
                self.metrics.hits.inc();
                return local_response(&hit);
            }
            self.metrics.misses.inc();
            // Nothing can be kept now (no live watch, auth on): no need to read the answer.
            if self.namespace.is_none() && !self.state().usable() {
                return self.pass(&parts, body).await;
            }
        }
        self.miss(parts, body, read.request, key).await
    }

    /// The whole answer message for `key` if it is held and may be served.
    fn lookup(&self, key: &Bytes) -> Option<Vec<u8>> {
        let mut st = self.state();
        if !st.usable() || st.heard.elapsed() > FRESH {
            return None;
        }
        let watermark = st.watermark;
        let e = st.touch(key)?;
        let mut header = e.header;
        header.revision = header.revision.max(watermark);
        let head = RangeResponse {
            header: Some(header),
            ..Default::default()
        };
        let mut out = Vec::with_capacity(head.encoded_len() + e.body.len());
        // Encoding into a Vec cannot run out of room.
        let _ = head.encode(&mut out);
        out.extend_from_slice(&e.body);
        Some(out)
    }

    /// Sends the client's request as it is and relays etcd's answer as it is.
    async fn pass(
        &self,
        parts: &hyper::http::request::Parts,
        body: Bytes,
    ) -> Response<ResponseBody> {
        match send_buffered_read(&self.upstream, parts, body).await {
            Ok(resp) => resp.map(|inner| ResponseBody::upstream(inner, self.proxy_limits)),
            Err(refusal) => refusal,
        }
    }

    /// Reads from etcd (namespace applied), answers the client, and keeps the answer under `key`
    /// when there is one and it may be kept.
    async fn miss(
        &self,
        mut parts: hyper::http::request::Parts,
        body: Bytes,
        mut request: RangeRequest,
        key: Option<Bytes>,
    ) -> Response<ResponseBody> {
        let limits = self.proxy_limits;
        let wire = match &self.namespace {
            Some(ns) => {
                if let Err(refusal) = ns.range_request(&mut request) {
                    let s = Status::from(refusal);
                    return status_response(s.code, &s.message);
                }
                if let Err(s) = limits.check_send(request.encoded_len()) {
                    return status_response(s.code, &s.message);
                }
                parts.headers.remove(CONTENT_LENGTH);
                let mut out = BytesMut::new();
                encode_message(&request, &mut out);
                out.freeze()
            }
            None => body,
        };
        // etcd must not compress an answer the proxy reads.
        parts.headers.remove(GRPC_ACCEPT_ENCODING);
        let resp = match send_buffered_read(&self.upstream, &parts, wire).await {
            Ok(resp) => resp,
            Err(refusal) => return refusal,
        };
        if resp.status() != StatusCode::OK || grpc_status(resp.headers()).is_some() {
            // Not a gRPC answer, or a trailers-only status: relayed as it is.
            return resp.map(|inner| ResponseBody::upstream(inner, limits));
        }
        let (mut head, body) = resp.into_parts();
        let max = limits.decoded_response();
        let collected = match Limited::new(body, max.saturating_add(5)).collect().await {
            Ok(c) => c,
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return status_response(
                    RESOURCE_EXHAUSTED,
                    &format!("grpc: received message larger than max (more than {max} bytes)"),
                );
            }
            Err(e) => {
                return status_response(
                    UNAVAILABLE,
                    &format!("connection to etcd member broke: {e}"),
                );
            }
        };
        let trailers = collected.trailers().cloned();
        let data = collected.to_bytes();
        let ok = trailers.as_ref().and_then(grpc_status) == Some(0);
        let answer = if ok {
            match self.keep(&data, &request, key) {
                Ok(Some(client_form)) => {
                    head.headers.remove(CONTENT_LENGTH);
                    client_form
                }
                Ok(None) => data,
                Err(s) => return status_response(s.code, &s.message),
            }
        } else {
            data
        };
        let message = (!answer.is_empty()).then_some(answer);
        Response::from_parts(head, ResponseBody::Local { message, trailers })
    }

    /// Reads etcd's answer `data` to `request` (etcd's form); keeps it under `key` when it may
    /// be kept. Under a namespace returns the answer in the client's form (framed).
    fn keep(
        &self,
        data: &Bytes,
        request: &RangeRequest,
        key: Option<Bytes>,
    ) -> Result<Option<Bytes>, Status> {
        if key.is_none() && self.namespace.is_none() {
            return Ok(None);
        }
        // The answer is one message, within the decoding limit rather than the request one.
        let answer_limits = Limits {
            request: self.proxy_limits.decoded_response(),
            ..self.proxy_limits
        };
        let message = single_message(data, answer_limits)?;
        let mut resp = RangeResponse::decode(message).map_err(|e| {
            Status::new(INTERNAL, format!("grpc: failed to unmarshal message: {e}"))
        })?;
        let framed = match &self.namespace {
            Some(ns) => {
                ns.range_response(&mut resp)?;
                let mut out = BytesMut::new();
                encode_message(&resp, &mut out);
                Some(out.freeze())
            }
            None => None,
        };
        if let Some(key) = key {
            self.insert(key, resp, Interval::of(&request.key, &request.range_end));
        }
        Ok(framed)
    }

    fn insert(&self, key: Bytes, mut resp: RangeResponse, interval: Interval) {
        let header = resp.header.take().unwrap_or_default();
        let mut st = self.state();
        // Events after `W` are still to come; an answer older than `W` may have missed some.
        if !st.usable() || header.revision < st.watermark {
            return;
        }
        let body = Bytes::from(resp.encode_to_vec());
        let size = key.len() + body.len() + interval.len() + ENTRY_OVERHEAD;
        let entry = Entry {
            header,
            body,
            interval,
            tick: 0,
            size,
        };
        st.insert(key, entry, self.limits);
        self.metrics.keys.set(st.entries.len() as i64);
    }

    /// Drops every entry (and keeps none until `allow` says so again).
    fn flush(&self, st: &mut State) {
        st.flush();
        self.metrics.keys.set(0);
    }

    // ---- the watch --------------------------------------------------------------------------

    /// The etcd range the watch covers: the namespace, or every key.
    fn watched_range(&self) -> (Bytes, Bytes) {
        match &self.namespace {
            Some(ns) => (
                Bytes::copy_from_slice(ns.prefix()),
                Bytes::copy_from_slice(ns.end()),
            ),
            None => (Bytes::from_static(b"\x00"), Bytes::from_static(b"\x00")),
        }
    }

    async fn watch_loop(self: Arc<Self>) {
        let mut avoid: Option<String> = None;
        let mut backoff = RETRY_MIN;
        loop {
            let opened = tokio::select! {
                () = self.stop.cancelled() => return,
                w = KeyspaceWatch::open(
                    &self.cluster,
                    self.proxy_limits,
                    self.watched_range(),
                    0,
                    PROGRESS_EVERY,
                    avoid.as_deref(),
                ) => w,
            };
            let why = match opened {
                Ok(mut watch) => {
                    avoid = Some(watch.member().to_string());
                    let (created, why) = tokio::select! {
                        () = self.stop.cancelled() => return,
                        ended = self.follow(&mut watch) => ended,
                    };
                    let mut st = self.state();
                    st.live = false;
                    self.flush(&mut st);
                    if created {
                        backoff = RETRY_MIN;
                    }
                    why
                }
                Err(why) => why,
            };
            tracing::debug!(reason = %why, retry_in = ?backoff, "range cache watch ended; range cache flushed");
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }

    /// Applies the watch's responses until it ends; returns whether it was created, and why
    /// it ended.
    async fn follow(&self, watch: &mut KeyspaceWatch) -> (bool, String) {
        let mut created = false;
        let mut watch_id = 0;
        loop {
            let resp = match watch.next().await {
                Ok(r) => r,
                Err(e) => return (created, e),
            };
            let mut st = self.state();
            st.heard = Instant::now();
            if resp.created {
                created = true;
                watch_id = resp.watch_id;
                self.flush(&mut st);
                st.live = true;
                st.watermark = resp.header.map_or(0, |h| h.revision);
                tracing::debug!(
                    member = watch.member(),
                    revision = st.watermark,
                    "range cache watch created"
                );
                continue;
            }
            for ev in &resp.events {
                if let Some(kv) = &ev.kv {
                    st.invalidate(&kv.key);
                    st.watermark = st.watermark.max(kv.mod_revision);
                }
            }
            // A progress notification of the watcher itself says every event up to its
            // revision was sent. etcd 3.5 answers a progress request (watch ID -1) before
            // pending events, so those only show the watch is alive.
            if resp.events.is_empty() && resp.watch_id == watch_id {
                let rev = resp.header.map_or(0, |h| h.revision);
                st.watermark = st.watermark.max(rev);
            }
            let n = st.entries.len() as i64;
            self.metrics.keys.set(n);
        }
    }

    // ---- auth -------------------------------------------------------------------------------

    /// Checks every second whether etcd has auth on: a serializable count of one key without
    /// credentials, which etcd refuses (`user name is empty`) when auth is on. A refusal, or no
    /// answer, stops the cache and flushes it; an answer lets it work. (`Auth/AuthStatus` would
    /// say it directly, but etcd 3.5 runs it through raft: a log entry every second.)
    async fn auth_loop(self: Arc<Self>) {
        loop {
            let epoch = self.state().auth_epoch;
            let (key, _) = self.watched_range();
            let status = self
                .cluster
                .call(|ch| {
                    let probe = RangeRequest {
                        key: key.clone(),
                        serializable: true,
                        count_only: true,
                        limit: 1,
                        ..Default::default()
                    };
                    async move { KvClient::new(ch).range(probe).await }
                })
                .await;
            let off = status.is_ok();
            {
                let mut st = self.state();
                if st.auth_epoch != epoch {
                    // An `AuthEnable` started or ended meanwhile: ask again.
                    continue;
                }
                if !off && st.auth_off {
                    self.flush(&mut st);
                    tracing::info!(
                        reason = %status.as_ref().map_or_else(|e| e.to_string(), |_| String::new()),
                        "etcd auth is on or unknown; range cache stopped"
                    );
                }
                st.auth_off = off;
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(AUTH_POLL) => {}
            }
        }
    }

    /// Runs an `Auth/AuthEnable` call (`call`): the cache is flushed and stopped before it is
    /// sent, and stays stopped until the next auth check says auth is off.
    pub async fn auth_enable<F: std::future::Future>(&self, call: F) -> F::Output {
        {
            let mut st = self.state();
            st.auth_changes += 1;
            st.auth_epoch += 1;
            self.flush(&mut st);
        }
        let _done = AuthChange(self);
        call.await
    }
}

/// An `AuthEnable` in flight; when it ends (answered, or the client left), auth may be on.
struct AuthChange<'a>(&'a RangeCache);

impl Drop for AuthChange<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.auth_changes -= 1;
        st.auth_epoch += 1;
        st.auth_off = false;
        self.0.flush(&mut st);
    }
}

/// The cache key: the caller's identity (`token`, `authorization`) and its request message.
fn entry_key(headers: &HeaderMap, message: &Bytes) -> Bytes {
    let mut key = BytesMut::with_capacity(message.len() + 64);
    for name in ["token", "authorization"] {
        let value = headers.get(name).map_or(&[][..], |v| v.as_bytes());
        key.put_u32(u32::try_from(value.len()).unwrap_or(u32::MAX));
        key.put_slice(value);
    }
    key.put_slice(message);
    key.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn entry(interval: Interval, size: usize) -> Entry {
        Entry {
            header: ResponseHeader::default(),
            body: Bytes::new(),
            interval,
            tick: 0,
            size,
        }
    }

    const ROOMY: CacheLimits = CacheLimits {
        max_entries: 100,
        max_bytes: 1 << 20,
    };

    fn held(st: &State) -> Vec<String> {
        let mut v: Vec<String> = st
            .entries
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_event_drops_exactly_the_entries_whose_interval_holds_its_key() {
        let mut st = State::new();
        let cases = [
            ("point b", Interval::of(&b("b"), &b(""))),
            ("point bb", Interval::of(&b("bb"), &b(""))),
            ("[a, c)", Interval::of(&b("a"), &b("c"))),
            ("[b, b\\0)", Interval::of(&b("b"), &b("b\0"))),
            ("[c, d)", Interval::of(&b("c"), &b("d"))),
            ("from a", Interval::of(&b("a"), &b("\0"))),
            ("from \\0", Interval::of(&b("\0"), &b("\0"))),
            ("from c", Interval::of(&b("c"), &b("\0"))),
            ("empty [c, a)", Interval::of(&b("c"), &b("a"))),
        ];
        for (name, interval) in cases.clone() {
            st.insert(b(name), entry(interval, 10), ROOMY);
        }
        st.invalidate(&b("b"));
        assert_eq!(
            held(&st),
            ["[c, d)", "empty [c, a)", "from c", "point bb"],
            "after b"
        );
        st.invalidate(&b("zzz"));
        assert_eq!(held(&st), ["[c, d)", "empty [c, a)", "point bb"]);
        st.invalidate(&b("c"));
        assert_eq!(held(&st), ["empty [c, a)", "point bb"]);
        assert_eq!(st.bytes, 20);
        assert_eq!(st.lru.len(), 2);
        assert_eq!(st.ranges.len(), 1);
        assert_eq!(st.points.len(), 1);
    }

    #[test]
    fn the_least_recently_used_entry_goes_first_at_either_bound() {
        let limits = CacheLimits {
            max_entries: 3,
            max_bytes: 1000,
        };
        let mut st = State::new();
        for k in ["a", "b", "c"] {
            st.insert(b(k), entry(Interval::of(&b(k), &b("")), 100), limits);
        }
        assert!(st.touch(&b("a")).is_some());
        st.insert(b("d"), entry(Interval::of(&b("d"), &b("")), 100), limits);
        assert_eq!(held(&st), ["a", "c", "d"]);
        // Over the entry bound (c goes), then still over the byte bound (a goes).
        st.insert(b("e"), entry(Interval::of(&b("e"), &b("")), 850), limits);
        assert_eq!(held(&st), ["d", "e"]);
        assert_eq!(st.bytes, 950);
        // Larger than the bound: never kept, and nothing else is dropped for it.
        st.insert(b("f"), entry(Interval::of(&b("f"), &b("")), 1001), limits);
        assert_eq!(held(&st), ["d", "e"]);
        // Replacing an entry does not count it twice.
        st.insert(b("d"), entry(Interval::of(&b("d"), &b("")), 100), limits);
        assert_eq!((held(&st).len(), st.bytes, st.lru.len()), (2, 950, 2));
        st.flush();
        assert!(st.entries.is_empty() && st.points.is_empty() && st.lru.is_empty());
        assert_eq!(st.bytes, 0);
    }

    #[test]
    fn identities_and_requests_make_different_keys() {
        let mut alice = HeaderMap::new();
        alice.insert("token", "alice".parse().unwrap());
        let mut auth = HeaderMap::new();
        auth.insert("authorization", "alice".parse().unwrap());
        let none = HeaderMap::new();
        let m = b("request");
        let keys = [
            entry_key(&none, &m),
            entry_key(&alice, &m),
            entry_key(&auth, &m),
            entry_key(&none, &b("other")),
        ];
        for i in 0..keys.len() {
            for j in i + 1..keys.len() {
                assert_ne!(keys[i], keys[j], "{i} {j}");
            }
        }
        assert_eq!(entry_key(&alice, &m), entry_key(&alice.clone(), &m));
    }

    #[test]
    fn a_hit_is_the_stored_answer_with_its_revision_raised() {
        let resp = RangeResponse {
            header: Some(ResponseHeader {
                cluster_id: 1,
                member_id: 2,
                revision: 7,
                raft_term: 3,
            }),
            kvs: vec![etcd_api::mvccpb::KeyValue {
                key: b("k"),
                value: b("v"),
                mod_revision: 5,
                ..Default::default()
            }],
            count: 1,
            more: false,
        };
        let mut rest = resp.clone();
        let header = rest.header.take().unwrap();
        let body = Bytes::from(rest.encode_to_vec());
        // The header in front of the rest is the whole message as prost encodes it.
        let head = RangeResponse {
            header: Some(header),
            ..Default::default()
        };
        let mut whole = head.encode_to_vec();
        whole.extend_from_slice(&body);
        assert_eq!(whole, resp.encode_to_vec());
    }
}
