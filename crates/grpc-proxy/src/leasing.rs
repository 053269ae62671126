//! `--experimental-leasing-prefix=L`: linearizable single-key reads served from memory while this
//! proxy owns the key, with the ownership protocol of etcd's `client/v3/leasing`, so that this
//! proxy, etcd's own proxy and Go leasing clients can share a cluster.
//!
//! The protocol, as etcd's leasing client speaks it (keys below are etcd keys, namespace applied;
//! `L+k` is the leasing key of key `k`, no separator):
//!
//! - **Session**: a lease (TTL 60 s, as `concurrency.NewSession`) kept alive. Every leasing key
//!   this proxy owns is attached to it, so a dead proxy releases its keys when the lease expires.
//! - **Acquire** (a linearizable Range of one key at the latest revision):
//!   `Txn If(CreateRevision(L+k) = 0, Lease(k) = 0) Then(Range k, Put L+k "" lease=session)
//!   Else(Range k, Range L+k)`. Owned when it succeeds, or when `L+k` already carries the session
//!   lease. While owned the answer is kept and later Ranges of `k` are served from memory, with the
//!   header of the read that filled the cache (as etcd's leasing client answers). A key attached to
//!   a lease is never cached (it may expire without a write).
//! - **Write** (Put, DeleteRange, Txn): sent as `Txn If(guards) Then(the write) Else(Range of the
//!   leasing keys)`, where the guard of a single key is `CreateRevision(L+k) < own+1` (no owner,
//!   or this proxy since revision `own`) and that of a range is `CreateRevision(L+k..L+end) <
//!   max+1` after every other owner in the range was revoked. When a guard fails, every other
//!   owner found is **revoked**: `Put L+k "REVOKE"` (keeping the owner's lease), then a watch on
//!   `L+k` until the owner deletes it; then the write is tried again.
//! - **Revoked by another client**: one watch over the whole key space (the namespace, under
//!   `--namespace`) sees `L+k` set to `REVOKE` on this proxy's lease: the cached value is dropped
//!   first, then `L+k` is deleted (`If(CreateRevision(L+k) = c) Then(Delete L+k)`).
//! - **Session lost** (etcd reports the lease gone, or no keep-alive succeeded in time): the whole
//!   cache is dropped, nothing is served from memory until a new session exists.
//!
//! Better than etcd's leasing client: the same watch sees every write to a cached key, also one
//! made directly to etcd (which the protocol does not cover); such a write drops the cached value
//! (the key stays owned, the next Range reads etcd again). This is a safety net with the watch's
//! delay, not a guarantee: a Range served between the direct write and its event is stale.
//! Writes of this proxy drop the cached value before they are sent and again when they are
//! answered, so a Range after a write through this proxy always sees it.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use etcd_api::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::lease_client::LeaseClient;
use etcd_api::etcdserverpb::request_op::Request as Op;
use etcd_api::etcdserverpb::response_op::Response as OpResponse;
use etcd_api::etcdserverpb::watch_client::WatchClient;
use etcd_api::etcdserverpb::watch_request::RequestUnion;
use etcd_api::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest,
    RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse, WatchCreateRequest,
    WatchRequest,
};
use etcd_api::mvccpb::{Event, KeyValue, event::EventType};
use futures::StreamExt;
use http_body_util::{BodyExt, Limited};

use hyper::header::HeaderMap;
use hyper::{Request, Response};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::body::ClientBody;
use crate::cluster::Cluster;
use crate::forward::{ResponseBody, local_response, status_response};
use crate::keyspace::KeyspaceWatch;
use crate::namespace::{Namespace, prefix_end};
use crate::rewrite::{Decoder, Limits, Status};

/// The value a writer puts in a leasing key to ask its owner to give it up.
const REVOKE: &[u8] = b"REVOKE";
/// TTL of the session lease, in seconds (`concurrency.NewSession`'s default).
pub const SESSION_TTL: i64 = 60;
/// A key given up after a REVOKE is not acquired again for this long (etcd's `revokeBackoff`),
/// so that a reader and a writer do not take the key from each other at every call.
const REVOKE_BACKOFF: Duration = Duration::from_secs(2);
/// How often the session lease is kept alive: TTL/3 as clientv3, at most this, so that a lease
/// revoked behind the proxy's back is noticed soon.
const MAX_KEEPALIVE_PERIOD: Duration = Duration::from_secs(5);
/// Served from memory only while the lease is known alive with this much to spare.
const SESSION_MARGIN: Duration = Duration::from_secs(2);
/// Longest wait for another owner to give up a key (its lease expires within its TTL, 60 s by
/// default, when it is gone).
const REVOKE_WAIT: Duration = Duration::from_secs(90);
/// Longest single watch while waiting for an owner, before the key is looked at directly.
const WAIT_SLICE: Duration = Duration::from_secs(5);
/// Attempts of a write whose guard keeps failing (each one revoked the owners it found).
const WRITE_ATTEMPTS: usize = 10;
/// Pause before the session or the watch is set up again after a failure.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How often the watch asks for a progress report, and how long it may stay silent before it
/// is set up again (on another member when this one fails its probe).
const WATCH_PROGRESS_PERIOD: Duration = Duration::from_secs(2);

/// gRPC codes made here.
const INTERNAL: u16 = 13;

const RANGE_PATH: &str = "/etcdserverpb.KV/Range";
const PUT_PATH: &str = "/etcdserverpb.KV/Put";
const DELETE_RANGE_PATH: &str = "/etcdserverpb.KV/DeleteRange";
const TXN_PATH: &str = "/etcdserverpb.KV/Txn";

/// True for the calls [`Leasing::handle`] serves (the other KV call, Compact, and every other
/// service are forwarded as usual).
pub fn serves(path: &str) -> bool {
    matches!(path, RANGE_PATH | PUT_PATH | DELETE_RANGE_PATH | TXN_PATH)
}

/// The leasing cache and its protocol state, shared by every call.
pub struct Leasing {
    /// `--experimental-leasing-prefix`, in the client's key space.
    prefix: Bytes,
    namespace: Option<Namespace>,
    cluster: Arc<Cluster>,
    limits: Limits,
    state: Mutex<State>,
}

/// What the protocol knows, under one lock (never held across an await).
#[derive(Default)]
struct State {
    /// The session lease; 0 while there is none.
    lease: i64,
    /// The lease is known alive until then (minus [`SESSION_MARGIN`]).
    valid_until: Option<Instant>,
    /// The watch over the key space is running, so REVOKEs and writes are seen.
    watching: bool,
    /// Bumped whenever everything is dropped (session or watch lost): an acquire that started
    /// before must not fill the cache.
    epoch: u64,
    /// By client key.
    slots: BTreeMap<Bytes, Slot>,
    /// Keys given up after a REVOKE, and when.
    revoked: HashMap<Bytes, Instant>,
}

#[derive(Default)]
struct Slot {
    /// The plain Range of the key (client key space, header of the read), while owned.
    cached: Option<RangeResponse>,
    /// Create revision of this proxy's leasing key; 0 when not owned.
    owned: i64,
    /// Bumped by everything that makes an acquire in flight stale (writes, events).
    generation: u64,
    /// Acquires and writes in flight on the key: the slot stays while they run.
    busy: u32,
}

impl State {
    fn session_ready(&self) -> bool {
        self.lease != 0
            && self.watching
            && self
                .valid_until
                .is_some_and(|t| Instant::now() + SESSION_MARGIN < t)
    }

    /// Drops every cached value and ownership (the leasing keys go with the lease, or are
    /// released when the watch is set up again).
    fn drop_all(&mut self) {
        self.epoch += 1;
        self.slots.retain(|_, s| {
            s.cached = None;
            s.owned = 0;
            s.generation += 1;
            s.busy > 0
        });
    }

    fn tidy(&mut self, key: &Bytes) {
        if let Some(s) = self.slots.get(key)
            && s.cached.is_none()
            && s.owned == 0
            && s.busy == 0
        {
            self.slots.remove(key);
        }
    }

    /// Makes every acquire in flight on the keys of `ops` stale and drops their cached values;
    /// with `enter`, marks them busy (a write starts), else releases them (it ended).
    fn invalidate(&mut self, ops: &[(Bytes, Bytes)], enter: bool) {
        for (key, end) in ops {
            if end.is_empty() {
                let slot = self.slots.entry(key.clone()).or_default();
                slot.cached = None;
                slot.generation += 1;
                if enter {
                    slot.busy += 1;
                } else {
                    slot.busy = slot.busy.saturating_sub(1);
                }
                self.tidy(key);
            } else {
                for (_, slot) in range_mut(&mut self.slots, key, end) {
                    slot.cached = None;
                    slot.generation += 1;
                }
            }
        }
    }
}

/// The slots whose keys lie in `[key, end)` (`end` `"\0"`: every key from `key` on).
fn range_mut<'a>(
    slots: &'a mut BTreeMap<Bytes, Slot>,
    key: &Bytes,
    end: &Bytes,
) -> impl Iterator<Item = (&'a Bytes, &'a mut Slot)> {
    let upper = if end.as_ref() == b"\x00" {
        Bound::Unbounded
    } else {
        Bound::Excluded(end.clone())
    };
    let lower = Bound::Included(key.clone());
    let valid = match &upper {
        Bound::Excluded(e) => key < e,
        _ => true,
    };
    let iter = valid.then(|| slots.range_mut((lower, upper)));
    iter.into_iter().flatten()
}

/// Auth metadata of the client, passed on with the calls made for it.
type Meta = Vec<(&'static str, MetadataValue<Ascii>)>;

fn auth_meta(headers: &HeaderMap) -> Meta {
    ["token", "authorization"]
        .into_iter()
        .filter_map(|name| Some((name, headers.get(name)?.to_str().ok()?.parse().ok()?)))
        .collect()
}

fn request<T>(msg: T, meta: &Meta) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    for (name, value) in meta {
        r.metadata_mut().insert(*name, value.clone());
    }
    r
}

fn status(s: &tonic::Status) -> Response<ResponseBody> {
    status_response(s.code() as u16, s.message())
}

fn compare_create(key: Bytes, range_end: Bytes, result: CompareResult, rev: i64) -> Compare {
    Compare {
        result: result as i32,
        target: CompareTarget::Create as i32,
        key,
        range_end,
        target_union: Some(TargetUnion::CreateRevision(rev)),
    }
}

fn op(request: Op) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
}

fn range_op(key: Bytes, range_end: Bytes) -> RequestOp {
    op(Op::RequestRange(RangeRequest {
        key,
        range_end,
        ..Default::default()
    }))
}

/// The range answer of a Txn's `i`th operation (empty if etcd answered something else).
fn range_of(resp: &TxnResponse, i: usize) -> RangeResponse {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(OpResponse::ResponseRange(r)) => r.clone(),
        _ => RangeResponse::default(),
    }
}

/// A single-key Range `req` answered from `resp`, the plain Range of that key, as etcd would
/// answer it (filters and `keys_only`/`count_only` applied; the count is before the filters, as
/// etcd counts).
fn answer(mut resp: RangeResponse, req: &RangeRequest) -> RangeResponse {
    let keep = resp.kvs.first().is_some_and(|kv| {
        !req.count_only
            && (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
            && (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
            && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
            && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
    });
    if !keep {
        resp.kvs.clear();
    } else if req.keys_only {
        for kv in &mut resp.kvs {
            kv.value = Bytes::new();
        }
    }
    resp.more = false;
    resp
}

/// The write operations of a request, in the client's key space: `(key, range_end)`.
fn gather(ops: &[RequestOp], out: &mut Vec<(Bytes, Bytes)>) {
    for o in ops {
        match &o.request {
            Some(Op::RequestPut(p)) => out.push((p.key.clone(), Bytes::new())),
            Some(Op::RequestDeleteRange(d)) => out.push((d.key.clone(), d.range_end.clone())),
            Some(Op::RequestTxn(t)) => {
                gather(&t.success, out);
                gather(&t.failure, out);
            }
            Some(Op::RequestRange(_)) | None => {}
        }
    }
}

/// One decoded call.
enum Call {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
}

impl Leasing {
    /// The leasing side of the proxy; [`Leasing::start`] sets up its session and watch.
    pub fn new(
        prefix: Bytes,
        namespace: Option<Namespace>,
        cluster: Arc<Cluster>,
        limits: Limits,
    ) -> Arc<Leasing> {
        Arc::new(Leasing {
            prefix,
            namespace,
            cluster,
            limits,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the session and the watch until `stop`; the session lease is revoked at the end.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let watch_stop = stop.clone();
        tokio::spawn(async move {
            let watcher = tokio::spawn(this.clone().watch_loop(watch_stop));
            this.session_loop(stop).await;
            let _ = watcher.await;
        })
    }

    // ---- key spaces -------------------------------------------------------------------------

    fn real(&self, key: &[u8]) -> Bytes {
        match &self.namespace {
            Some(ns) => ns.key(key),
            None => Bytes::copy_from_slice(key),
        }
    }

    fn real_end(&self, end: &[u8]) -> Bytes {
        match &self.namespace {
            Some(ns) => ns.range_end(end),
            None => Bytes::copy_from_slice(end),
        }
    }

    /// The leasing key of client key `key`, as etcd stores it.
    fn lease_key(&self, key: &[u8]) -> Bytes {
        let mut k = BytesMut::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        self.real(&k)
    }

    /// The leasing keys of the client range `[key, end)`, as an etcd range.
    fn lease_range(&self, key: &[u8], end: &[u8]) -> (Bytes, Bytes) {
        let begin = self.lease_key(key);
        let end = match end {
            b"" => Bytes::new(),
            b"\x00" => self.real_end(&prefix_end(&self.prefix)),
            e => self.lease_key(e),
        };
        (begin, end)
    }

    /// The client key of an etcd key, if it is in the namespace.
    fn client_key(&self, key: &Bytes) -> Option<Bytes> {
        match &self.namespace {
            Some(ns) => ns.strip(key),
            None => Some(key.clone()),
        }
    }

    // ---- calls to etcd ----------------------------------------------------------------------

    fn kv(&self, ch: Channel) -> KvClient<Channel> {
        KvClient::new(ch).max_decoding_message_size(self.limits.decoded_response())
    }

    /// A Txn the protocol may send again (acquire, revoke, release: each is guarded).
    async fn txn(&self, t: TxnRequest, meta: &Meta) -> Result<TxnResponse, tonic::Status> {
        self.cluster
            .call(|ch| {
                let r = request(t.clone(), meta);
                let mut kv = self.kv(ch);
                async move { kv.txn(r).await.map(|r| r.into_inner()) }
            })
            .await
    }

    /// A Txn carrying a client's write: sent once, to one member (it may have been applied when
    /// it fails).
    async fn txn_once(&self, t: TxnRequest, meta: &Meta) -> Result<TxnResponse, tonic::Status> {
        let Some(ch) = self.cluster.channels().into_iter().next() else {
            return Err(tonic::Status::unavailable("no etcd member is configured"));
        };
        self.kv(ch)
            .txn(request(t, meta))
            .await
            .map(|r| r.into_inner())
    }

    async fn range(&self, r: RangeRequest, meta: &Meta) -> Result<RangeResponse, tonic::Status> {
        self.cluster
            .call(|ch| {
                let r = request(r.clone(), meta);
                let mut kv = self.kv(ch);
                async move { kv.range(r).await.map(|r| r.into_inner()) }
            })
            .await
    }

    // ---- calls from clients -----------------------------------------------------------------

    /// Serves a KV call ([`serves`]).
    pub async fn handle(&self, req: Request<ClientBody>) -> Response<ResponseBody> {
        let (parts, body) = req.into_parts();
        let max = self.limits.request;
        let body = match Limited::new(body, max + 5).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                let s = self.limits.request_refusal(max + 1);
                return status_response(s.code, &s.message);
            }
            Err(e) => return status_response(INTERNAL, &format!("reading the request: {e}")),
        };
        let mut decoder = Decoder::new(max);
        decoder.push(&body);
        let message = match decoder.next_message() {
            Ok(Some(m)) => m,
            Ok(None) => return status_response(INTERNAL, "grpc: the request has no message"),
            Err(e) => {
                let s = Status::from(e);
                return status_response(s.code, &s.message);
            }
        };
        // `--max-send-bytes`, as on the forwarded path (the guards etcd receives with it are small).
        if let Err(s) = self.limits.check_send(message.len()) {
            return status_response(s.code, &s.message);
        }
        let call = match parts.uri.path() {
            RANGE_PATH => RangeRequest::decode(message).map(Call::Range),
            PUT_PATH => PutRequest::decode(message).map(Call::Put),
            DELETE_RANGE_PATH => DeleteRangeRequest::decode(message).map(Call::Delete),
            _ => TxnRequest::decode(message).map(Call::Txn),
        };
        let call = match call {
            Ok(c) => c,
            Err(e) => {
                return status_response(
                    INTERNAL,
                    &format!("grpc: failed to unmarshal message: {e}"),
                );
            }
        };
        let meta = auth_meta(&parts.headers);
        let result = match call {
            Call::Range(r) => self.get(r, &meta).await.map(|r| r.encode_to_vec()),
            call => self.write(call, &meta).await,
        };
        match result {
            Ok(message) => local_response(&message),
            Err(resp) => resp,
        }
    }

    /// A Range: from memory when owned, else through the acquire Txn when it may be cached,
    /// else as is.
    async fn get(
        &self,
        req: RangeRequest,
        meta: &Meta,
    ) -> Result<RangeResponse, Response<ResponseBody>> {
        let cacheable = req.range_end.is_empty()
            && req.revision == 0
            && !req.serializable
            && meta.is_empty()
            && !req.key.is_empty();
        if !cacheable {
            return self.pass_range(req, meta).await;
        }
        let acquiring = {
            let mut st = self.state();
            if !st.session_ready()
                || st
                    .revoked
                    .get(&req.key)
                    .is_some_and(|t| t.elapsed() < REVOKE_BACKOFF)
            {
                None
            } else if let Some(cached) = st.slots.get(&req.key).and_then(|s| s.cached.clone()) {
                return Ok(answer(cached, &req));
            } else {
                let (epoch, lease) = (st.epoch, st.lease);
                let slot = st.slots.entry(req.key.clone()).or_default();
                slot.busy += 1;
                Some((slot.generation, epoch, lease))
            }
        };
        let Some((generation, epoch, lease)) = acquiring else {
            return self.pass_range(req, meta).await;
        };
        // Releases the slot also when the client leaves during the acquire.
        let busy = Busy {
            leasing: self,
            ops: vec![(req.key.clone(), Bytes::new())],
            write: false,
        };
        let (resp, owned) = self
            .acquire(&req.key, lease)
            .await
            .map_err(|s| status(&s))?;
        {
            let mut st = self.state();
            let fresh = st.epoch == epoch && st.lease == lease;
            if let Some(slot) = st.slots.get_mut(&req.key)
                && fresh
                && slot.generation == generation
                && owned > 0
            {
                slot.owned = owned;
                if resp.kvs.iter().all(|kv| kv.lease == 0) {
                    slot.cached = Some(resp.clone());
                }
            }
        }
        drop(busy);
        Ok(answer(resp, &req))
    }

    /// The acquire Txn for client key `key` on `lease`: the plain Range of the key (client
    /// space, header of the Txn), and the create revision of the leasing key when this proxy
    /// owns it (0 when not).
    async fn acquire(
        &self,
        key: &Bytes,
        lease: i64,
    ) -> Result<(RangeResponse, i64), tonic::Status> {
        let real = self.real(key);
        let lkey = self.lease_key(key);
        let t = TxnRequest {
            compare: vec![
                compare_create(lkey.clone(), Bytes::new(), CompareResult::Equal, 0),
                Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Lease as i32,
                    key: real.clone(),
                    range_end: Bytes::new(),
                    target_union: Some(TargetUnion::Lease(0)),
                },
            ],
            success: vec![
                range_op(real.clone(), Bytes::new()),
                op(Op::RequestPut(PutRequest {
                    key: lkey.clone(),
                    value: Bytes::new(),
                    lease,
                    ..Default::default()
                })),
            ],
            failure: vec![range_op(real, Bytes::new()), range_op(lkey, Bytes::new())],
        };
        let resp = self.txn(t, &Meta::new()).await?;
        let revision = resp.header.map_or(0, |h| h.revision);
        let owned = if resp.succeeded {
            revision
        } else {
            range_of(&resp, 1)
                .kvs
                .first()
                .filter(|kv| kv.lease == lease && kv.value.as_ref() != REVOKE)
                .map_or(0, |kv| kv.create_revision)
        };
        let mut range = range_of(&resp, 0);
        range.header = resp.header;
        self.strip_kvs(&mut range.kvs)?;
        Ok((range, owned))
    }

    fn strip_kvs(&self, kvs: &mut [KeyValue]) -> Result<(), tonic::Status> {
        if let Some(ns) = &self.namespace {
            for kv in kvs {
                kv.key = ns.strip(&kv.key).ok_or_else(|| {
                    tonic::Status::internal("etcd returned a key outside the proxy's namespace")
                })?;
            }
        }
        Ok(())
    }

    /// A Range that does not use the cache, namespace applied.
    async fn pass_range(
        &self,
        mut req: RangeRequest,
        meta: &Meta,
    ) -> Result<RangeResponse, Response<ResponseBody>> {
        if let Some(ns) = &self.namespace {
            ns.range_request(&mut req).map_err(refused)?;
        }
        let mut resp = self.range(req, meta).await.map_err(|s| status(&s))?;
        if let Some(ns) = &self.namespace {
            ns.range_response(&mut resp).map_err(refused)?;
        }
        Ok(resp)
    }

    /// A Put, DeleteRange or Txn, guarded by the leasing keys of the keys it writes; other owners
    /// are revoked until the guard holds. Returns the encoded answer.
    async fn write(&self, call: Call, meta: &Meta) -> Result<Vec<u8>, Response<ResponseBody>> {
        // The client's operation (client key space) and its keys.
        let (user, ops) = match call {
            Call::Put(p) => {
                let ops = vec![(p.key.clone(), Bytes::new())];
                (op(Op::RequestPut(p)), ops)
            }
            Call::Delete(d) => {
                let ops = vec![(d.key.clone(), d.range_end.clone())];
                (op(Op::RequestDeleteRange(d)), ops)
            }
            Call::Txn(t) => {
                let mut ops = Vec::new();
                gather(&t.success, &mut ops);
                gather(&t.failure, &mut ops);
                (op(Op::RequestTxn(t)), ops)
            }
            Call::Range(_) => return Err(status_response(INTERNAL, "leasing: not a write")),
        };
        let mut real_user = user.clone();
        if let Some(ns) = &self.namespace {
            let refused_now = match &mut real_user.request {
                Some(Op::RequestPut(p)) => ns.put_request(p),
                Some(Op::RequestDeleteRange(d)) => ns.delete_range_request(d),
                Some(Op::RequestTxn(t)) => ns.txn_request(t),
                _ => Ok(()),
            };
            refused_now.map_err(refused)?;
        }
        let mut seen = std::collections::HashSet::new();
        let ops: Vec<(Bytes, Bytes)> = ops.into_iter().filter(|o| seen.insert(o.clone())).collect();

        self.state().invalidate(&ops, true);
        // Drops the cached values again when the write ends, also when the client leaves first.
        let busy = Busy {
            leasing: self,
            ops,
            write: true,
        };
        let result = self.write_loop(real_user, &busy.ops, meta).await;
        drop(busy);
        let resp = result.map_err(|s| status(&s))?;

        let header = resp.header;
        let mut answer = resp
            .responses
            .into_iter()
            .next()
            .and_then(|r| r.response)
            .ok_or_else(|| status_response(INTERNAL, "leasing: etcd answered no operation"))?;
        let encoded = match &mut answer {
            OpResponse::ResponsePut(p) => {
                p.header = header;
                if let Some(ns) = &self.namespace {
                    ns.put_response(p).map_err(refused)?;
                }
                p.encode_to_vec()
            }
            OpResponse::ResponseDeleteRange(d) => {
                d.header = header;
                if let Some(ns) = &self.namespace {
                    ns.delete_range_response(d).map_err(refused)?;
                }
                d.encode_to_vec()
            }
            OpResponse::ResponseTxn(t) => {
                t.header = header;
                if let Some(ns) = &self.namespace {
                    ns.txn_response(t).map_err(refused)?;
                }
                t.encode_to_vec()
            }
            OpResponse::ResponseRange(_) => {
                return Err(status_response(INTERNAL, "leasing: unexpected answer"));
            }
        };
        Ok(encoded)
    }

    async fn write_loop(
        &self,
        user: RequestOp,
        ops: &[(Bytes, Bytes)],
        meta: &Meta,
    ) -> Result<TxnResponse, tonic::Status> {
        for _ in 0..WRITE_ATTEMPTS {
            let mut guards = Vec::new();
            let mut fallback = Vec::new();
            for (key, end) in ops {
                let (lkey, lend) = self.lease_range(key, end);
                if end.is_empty() {
                    let own = {
                        let st = self.state();
                        st.slots.get(key).map_or(0, |s| s.owned)
                    };
                    guards.push(compare_create(
                        lkey.clone(),
                        Bytes::new(),
                        CompareResult::Less,
                        own + 1,
                    ));
                } else {
                    let max = self.revoke_range(&lkey, &lend, meta).await?;
                    guards.push(compare_create(
                        lkey.clone(),
                        lend.clone(),
                        CompareResult::Less,
                        max + 1,
                    ));
                }
                fallback.push(range_op(lkey, lend));
            }
            let t = TxnRequest {
                compare: guards,
                success: vec![user.clone()],
                failure: fallback,
            };
            let resp = self.txn_once(t, meta).await?;
            if resp.succeeded {
                return Ok(resp);
            }
            for r in &resp.responses {
                if let Some(OpResponse::ResponseRange(r)) = &r.response {
                    self.revoke_all(&r.kvs, meta).await?;
                }
            }
        }
        Err(tonic::Status::unavailable(
            "etcd-proxy: leasing: the keys of this write kept being acquired by other clients",
        ))
    }

    /// Revokes every other owner in a range of leasing keys; returns the highest create
    /// revision seen (own keys included).
    async fn revoke_range(
        &self,
        lkey: &Bytes,
        lend: &Bytes,
        meta: &Meta,
    ) -> Result<i64, tonic::Status> {
        let resp = self
            .range(
                RangeRequest {
                    key: lkey.clone(),
                    range_end: lend.clone(),
                    ..Default::default()
                },
                meta,
            )
            .await?;
        let max = resp
            .kvs
            .iter()
            .map(|kv| kv.create_revision)
            .max()
            .unwrap_or(0);
        let lease = self.state().lease;
        let others: Vec<KeyValue> = resp
            .kvs
            .into_iter()
            .filter(|kv| lease == 0 || kv.lease != lease)
            .collect();
        self.revoke_all(&others, meta).await?;
        Ok(max)
    }

    /// Asks the owner of each leasing key in `kvs` to give it up and waits until it did; this
    /// proxy's own keys are released at once.
    async fn revoke_all(&self, kvs: &[KeyValue], meta: &Meta) -> Result<(), tonic::Status> {
        let lease = self.state().lease;
        for kv in kvs {
            if lease != 0 && kv.lease == lease {
                // Ours, though the guard did not know it (a stale acquire): give it up.
                if let Some(key) = self.lease_client_key(&kv.key) {
                    let mut st = self.state();
                    if let Some(slot) = st.slots.get_mut(&key) {
                        slot.cached = None;
                        slot.owned = 0;
                        slot.generation += 1;
                    }
                    st.tidy(&key);
                }
                self.release(&kv.key, kv.create_revision, meta).await?;
                continue;
            }
            let from = if kv.value.as_ref() == REVOKE {
                kv.mod_revision
            } else {
                let t = TxnRequest {
                    compare: vec![compare_create(
                        kv.key.clone(),
                        Bytes::new(),
                        CompareResult::Equal,
                        kv.create_revision,
                    )],
                    success: vec![op(Op::RequestPut(PutRequest {
                        key: kv.key.clone(),
                        value: Bytes::from_static(REVOKE),
                        ignore_lease: true,
                        ..Default::default()
                    }))],
                    failure: vec![],
                };
                let resp = self.txn(t, meta).await?;
                if !resp.succeeded {
                    // Gone or replaced already: the next attempt looks again.
                    continue;
                }
                resp.header.map_or(0, |h| h.revision)
            };
            self.wait_deleted(&kv.key, kv.create_revision, from, meta)
                .await?;
        }
        Ok(())
    }

    /// Deletes this proxy's leasing key `lkey` if it is still the one created at `created`.
    async fn release(&self, lkey: &Bytes, created: i64, meta: &Meta) -> Result<(), tonic::Status> {
        let t = TxnRequest {
            compare: vec![compare_create(
                lkey.clone(),
                Bytes::new(),
                CompareResult::Equal,
                created,
            )],
            success: vec![op(Op::RequestDeleteRange(DeleteRangeRequest {
                key: lkey.clone(),
                ..Default::default()
            }))],
            failure: vec![],
        };
        self.txn(t, meta).await.map(|_| ())
    }

    /// Waits until leasing key `lkey` (the one created at `created`) is deleted after revision
    /// `after`. Watches in slices of [`WAIT_SLICE`] and looks at the key directly between them
    /// (through any member), so a member that stops answering does not hold the write.
    async fn wait_deleted(
        &self,
        lkey: &Bytes,
        created: i64,
        mut after: i64,
        meta: &Meta,
    ) -> Result<(), tonic::Status> {
        let deadline = Instant::now() + REVOKE_WAIT;
        while Instant::now() < deadline {
            if let Some(ch) = self.cluster.channels().into_iter().next() {
                let create = WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                        key: lkey.clone(),
                        start_revision: after + 1,
                        ..Default::default()
                    })),
                };
                let requests = futures::stream::iter([create]).chain(futures::stream::pending());
                let watched = tokio::time::timeout(WAIT_SLICE, async {
                    let mut stream = WatchClient::new(ch)
                        .watch(request(requests, meta))
                        .await?
                        .into_inner();
                    while let Some(resp) = stream.message().await? {
                        if resp.compact_revision != 0 || resp.canceled {
                            return Ok(false);
                        }
                        if resp
                            .events
                            .iter()
                            .any(|e| e.r#type == EventType::Delete as i32)
                        {
                            return Ok(true);
                        }
                    }
                    Ok::<bool, tonic::Status>(false)
                })
                .await;
                match watched {
                    Ok(Ok(true)) => return Ok(()),
                    Ok(Err(s)) if !matches!(s.code(), Code::Unavailable | Code::Unknown) => {
                        return Err(s);
                    }
                    _ => {}
                }
            }
            // Compacted, failed or silent: look at the key itself.
            let now = self
                .range(
                    RangeRequest {
                        key: lkey.clone(),
                        ..Default::default()
                    },
                    meta,
                )
                .await?;
            if now
                .kvs
                .first()
                .is_none_or(|kv| kv.create_revision != created)
            {
                return Ok(());
            }
            after = now.header.map_or(after, |h| h.revision);
        }
        Err(tonic::Status::deadline_exceeded(
            "etcd-proxy: leasing: the key's owner did not give it up in time",
        ))
    }

    /// The client key whose leasing key is `lkey` (an etcd key).
    fn lease_client_key(&self, lkey: &Bytes) -> Option<Bytes> {
        let k = self.client_key(lkey)?;
        k.starts_with(&self.prefix)
            .then(|| k.slice(self.prefix.len()..))
    }

    // ---- session --------------------------------------------------------------------------

    async fn session_loop(&self, stop: CancellationToken) {
        loop {
            let sent = Instant::now();
            let granted = tokio::select! {
                () = stop.cancelled() => return,
                g = self.cluster.call(|ch| async move {
                    LeaseClient::new(ch)
                        .lease_grant(LeaseGrantRequest { ttl: SESSION_TTL, id: 0 })
                        .await
                        .map(|r| r.into_inner())
                }) => g,
            };
            let granted = match granted {
                Ok(g) if g.error.is_empty() && g.id != 0 => g,
                Ok(g) => {
                    tracing::warn!(error = %g.error, "cannot start the leasing session; retrying");
                    tokio::select! { () = stop.cancelled() => return, () = tokio::time::sleep(RETRY_PAUSE) => {} }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the leasing session; retrying");
                    tokio::select! { () = stop.cancelled() => return, () = tokio::time::sleep(RETRY_PAUSE) => {} }
                    continue;
                }
            };
            let lease = granted.id;
            {
                let mut st = self.state();
                st.drop_all();
                // The watch follows the session: nothing is served until it is set up again.
                st.watching = false;
                st.lease = lease;
                st.valid_until = Some(sent + secs(granted.ttl));
            }
            tracing::info!(lease = %format!("{lease:x}"), ttl = granted.ttl, "started leasing session");
            let lost = tokio::select! {
                () = stop.cancelled() => None,
                why = self.keep_alive(lease, granted.ttl) => Some(why),
            };
            {
                let mut st = self.state();
                st.drop_all();
                st.watching = false;
                st.lease = 0;
                st.valid_until = None;
            }
            // Whether lost or stopping: revoke, so that the leasing keys go now (a lease etcd
            // already dropped answers NotFound, which changes nothing).
            let _ = tokio::time::timeout(Duration::from_secs(2), self.cluster.lease_revoke(lease))
                .await;
            match lost {
                None => return,
                Some(why) => {
                    tracing::warn!(lease = %format!("{lease:x}"), reason = %why, "lost leasing session; dropped the leasing cache");
                }
            }
        }
    }

    /// Keeps `lease` alive until it is lost; returns why.
    async fn keep_alive(&self, lease: i64, ttl: i64) -> String {
        let period = (secs(ttl) / 3).min(MAX_KEEPALIVE_PERIOD);
        loop {
            tokio::time::sleep(period).await;
            let sent = Instant::now();
            let answered = self
                .cluster
                .call(|ch| async move {
                    let mut stream = LeaseClient::new(ch)
                        .lease_keep_alive(futures::stream::iter([LeaseKeepAliveRequest {
                            id: lease,
                        }]))
                        .await?
                        .into_inner();
                    match stream.message().await? {
                        Some(r) => Ok(r.ttl),
                        None => Err(tonic::Status::unavailable("keep-alive stream ended")),
                    }
                })
                .await;
            match answered {
                Ok(t) if t > 0 => self.state().valid_until = Some(sent + secs(t)),
                Ok(_) => return "etcd reports the lease expired or revoked".into(),
                Err(e) if e.code() == Code::NotFound => {
                    return format!("etcd reports the lease gone: {}", e.message());
                }
                Err(e) => {
                    let expired = self
                        .state()
                        .valid_until
                        .is_none_or(|t| Instant::now() + SESSION_MARGIN >= t);
                    if expired {
                        return format!("no keep-alive succeeded within the TTL: {e}");
                    }
                    tracing::debug!(error = %e, "leasing keep-alive failed; retrying");
                }
            }
        }
    }

    // ---- watch ------------------------------------------------------------------------------

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

    async fn watch_loop(self: Arc<Self>, stop: CancellationToken) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            let lease = self.state().lease;
            if lease == 0 {
                tokio::select! { () = stop.cancelled() => return, () = tokio::time::sleep(Duration::from_millis(100)) => {} }
                continue;
            }
            let why = tokio::select! {
                () = stop.cancelled() => return,
                why = self.watch_once(lease) => why,
            };
            {
                let mut st = self.state();
                st.watching = false;
                st.drop_all();
            }
            tracing::debug!(reason = %why, "leasing watch ended; setting it up again");
            tokio::select! { () = stop.cancelled() => return, () = tokio::time::sleep(RETRY_PAUSE) => {} }
        }
    }

    /// Releases this proxy's leasing keys left from before, then watches from the revision of
    /// that look until the watch fails or the session changes; returns why it ended.
    async fn watch_once(&self, lease: i64) -> String {
        let (lkey, lend) = self.lease_range(b"", b"\x00");
        let scan = self
            .range(
                RangeRequest {
                    key: lkey,
                    range_end: lend,
                    ..Default::default()
                },
                &Meta::new(),
            )
            .await;
        let scan = match scan {
            Ok(s) => s,
            Err(e) => return format!("cannot read the leasing keys: {e}"),
        };
        for kv in scan.kvs.iter().filter(|kv| kv.lease == lease) {
            if let Err(e) = self
                .release(&kv.key, kv.create_revision, &Meta::new())
                .await
            {
                return format!("cannot release a leasing key: {e}");
            }
        }
        let from = scan.header.map_or(0, |h| h.revision) + 1;
        let mut watch = match KeyspaceWatch::open(
            &self.cluster,
            self.limits,
            self.watched_range(),
            from,
            WATCH_PROGRESS_PERIOD,
            None,
        )
        .await
        {
            Ok(w) => w,
            Err(e) => return e,
        };
        loop {
            let resp = match watch.next().await {
                Ok(r) => r,
                Err(e) => return e,
            };
            let releases = {
                let mut st = self.state();
                if st.lease != lease {
                    return "session changed".into();
                }
                if resp.created {
                    st.watching = true;
                    tracing::debug!(revision = from, "leasing watch started");
                }
                let mut releases = Vec::new();
                for ev in &resp.events {
                    if let Some(r) = self.on_event(&mut st, ev, lease) {
                        releases.push(r);
                    }
                }
                releases
            };
            for (lkey, created) in releases {
                // A REVOKE of one of our keys: the value is already dropped; give the key up.
                if let Err(e) = self.release(&lkey, created, &Meta::new()).await {
                    return format!("cannot release a revoked leasing key: {e}");
                }
            }
        }
    }

    /// Applies one event; returns a leasing key to release (revoked by another client).
    fn on_event(&self, st: &mut State, ev: &Event, lease: i64) -> Option<(Bytes, i64)> {
        let kv = ev.kv.as_ref()?;
        let key = self.client_key(&kv.key)?;
        let put = ev.r#type == EventType::Put as i32;
        // Any write to a key drops a cached value older than it.
        if let Some(slot) = st.slots.get_mut(&key) {
            let older = slot
                .cached
                .as_ref()
                .is_none_or(|c| c.header.map_or(0, |h| h.revision) < kv.mod_revision);
            if older {
                slot.cached = None;
                slot.generation += 1;
            }
        }
        st.tidy(&key);
        let mut release = None;
        if let Some(owned_key) = key.strip_prefix(self.prefix.as_ref()) {
            let owned_key = key.slice_ref(owned_key);
            let revoke_of_ours = put && kv.lease == lease && kv.value.as_ref() == REVOKE;
            if let Some(slot) = st.slots.get_mut(&owned_key) {
                // Lost: revoked, deleted (lease expired, released, deleted by hand), or taken by
                // another client.
                let lost = if put {
                    revoke_of_ours || (kv.lease != lease && kv.create_revision >= slot.owned)
                } else {
                    kv.mod_revision > slot.owned
                };
                if lost {
                    slot.cached = None;
                    slot.owned = 0;
                    slot.generation += 1;
                }
            }
            if revoke_of_ours {
                st.revoked.retain(|_, t| t.elapsed() < REVOKE_BACKOFF);
                st.revoked.insert(owned_key.clone(), Instant::now());
                release = Some((kv.key.clone(), kv.create_revision));
            }
            st.tidy(&owned_key);
        }
        release
    }
}

/// Keys with a call in flight: released on drop (the call ended, or its client left).
struct Busy<'a> {
    leasing: &'a Leasing,
    ops: Vec<(Bytes, Bytes)>,
    /// A write: its keys' cached values are dropped again at the end.
    write: bool,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut st = self.leasing.state();
        if self.write {
            st.invalidate(&self.ops, false);
        } else {
            for (key, _) in &self.ops {
                if let Some(slot) = st.slots.get_mut(key) {
                    slot.busy = slot.busy.saturating_sub(1);
                }
                st.tidy(key);
            }
        }
    }
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

fn refused(e: impl Into<Status>) -> Response<ResponseBody> {
    let s: Status = e.into();
    status_response(s.code, &s.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, m: i64, c: i64) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            mod_revision: m,
            create_revision: c,
            version: 1,
            lease: 0,
        }
    }

    #[test]
    fn answers_apply_the_request_options() {
        let resp = RangeResponse {
            header: None,
            kvs: vec![kv("a", "v", 5, 3)],
            more: false,
            count: 1,
        };
        let plain = RangeRequest::default();
        assert_eq!(answer(resp.clone(), &plain).kvs.len(), 1);
        let keys = RangeRequest {
            keys_only: true,
            ..Default::default()
        };
        assert!(answer(resp.clone(), &keys).kvs[0].value.is_empty());
        let count = RangeRequest {
            count_only: true,
            ..Default::default()
        };
        let c = answer(resp.clone(), &count);
        assert!(c.kvs.is_empty());
        assert_eq!(c.count, 1);
        for (min_m, max_m, min_c, max_c, kept) in [
            (6, 0, 0, 0, false),
            (5, 0, 0, 0, true),
            (0, 4, 0, 0, false),
            (0, 0, 4, 0, false),
            (0, 0, 0, 2, false),
            (0, 5, 3, 3, true),
        ] {
            let r = RangeRequest {
                min_mod_revision: min_m,
                max_mod_revision: max_m,
                min_create_revision: min_c,
                max_create_revision: max_c,
                ..Default::default()
            };
            assert_eq!(answer(resp.clone(), &r).kvs.len() == 1, kept, "{r:?}");
        }
    }

    #[test]
    fn write_operations_are_gathered_from_both_branches_and_nested_txns() {
        let put = |k: &str| {
            op(Op::RequestPut(PutRequest {
                key: Bytes::copy_from_slice(k.as_bytes()),
                ..Default::default()
            }))
        };
        let del = |k: &str, e: &str| {
            op(Op::RequestDeleteRange(DeleteRangeRequest {
                key: Bytes::copy_from_slice(k.as_bytes()),
                range_end: Bytes::copy_from_slice(e.as_bytes()),
                prev_kv: false,
            }))
        };
        let get = range_op(Bytes::from_static(b"g"), Bytes::new());
        let nested = op(Op::RequestTxn(TxnRequest {
            compare: vec![],
            success: vec![put("n1")],
            failure: vec![del("n2", "n3")],
        }));
        let mut out = Vec::new();
        gather(&[put("a"), get, nested], &mut out);
        gather(&[del("b", "")], &mut out);
        let names: Vec<(&[u8], &[u8])> =
            out.iter().map(|(k, e)| (k.as_ref(), e.as_ref())).collect();
        assert_eq!(
            names,
            [
                (&b"a"[..], &b""[..]),
                (b"n1", b""),
                (b"n2", b"n3"),
                (b"b", b""),
            ]
        );
    }

    #[test]
    fn ranges_of_slots_follow_etcd_ranges() {
        let mut slots: BTreeMap<Bytes, Slot> = BTreeMap::new();
        for k in ["a", "b", "c", "d"] {
            slots.insert(Bytes::copy_from_slice(k.as_bytes()), Slot::default());
        }
        let keys = |slots: &mut BTreeMap<Bytes, Slot>, k: &'static [u8], e: &'static [u8]| {
            range_mut(slots, &Bytes::from_static(k), &Bytes::from_static(e))
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&mut slots, b"b", b"d"), ["b", "c"]);
        assert_eq!(keys(&mut slots, b"b", b"\x00"), ["b", "c", "d"]);
        assert!(keys(&mut slots, b"d", b"b").is_empty());
    }
}
