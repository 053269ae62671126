//! Watch coalescing: the proxy serves every client's `Watch/Watch` stream itself, and client
//! watchers on the same key range share one upstream watcher, whatever their start revision,
//! filters, `prev_kv`, `progress_notify` or `fragment`: two thousand watchers on one key cost
//! the cluster one watcher.
//!
//! Three parts:
//!
//! - **The client's stream** ([`stream`]) is etcd's watch server as the client sees it: it
//!   keeps the stream's watchers (their `watch_id`, chosen by the client or allocated as etcd
//!   does, options and the next revision each has not seen), answers creates, cancels and
//!   progress requests, and turns what the hub shares into exactly the responses etcd would
//!   send this watcher (its own `watch_id`, events from its start revision once and in order,
//!   filters, `prev_kv`, progress notifications, fragments, compaction, cancel reasons).
//! - **The hub** ([`hub`]) of an identity (clients with the same `token` / `authorization` /
//!   `hasleader` metadata) holds the upstream watchers, one per key range: a *group*. A new
//!   watcher from now or from a revision the group has not passed joins it; one from a revision
//!   the group has passed gets a catch-up group of its own from that revision, which is merged
//!   into the shared one as soon as it has caught up. Each upstream response is shared by the
//!   group's watchers (its events encoded once per variant, not once per watcher).
//! - **The upstream stream** is [`crate::resume`]'s: it moves to another member when its
//!   member fails, and every upstream watcher resumes from the next revision it has not seen,
//!   so a member lost is invisible to the clients. A group etcd cancels (compaction while
//!   moving) cancels its watchers with etcd's reason and is forgotten, so no later watcher joins
//!   a dead upstream watcher (etcd bug #21813).
//!
//! **Before a watcher joins anything**, a serializable count-only read of its range is made with
//! the client's own metadata: etcd checks the client's permission (as etcd does at create), and
//! its header, from a member, is the watcher's created header (complete and current; etcd's proxy
//! fakes one with a revision only).
//!
//! **Slow clients**: what waits for one client stream is bounded ([`MAX_QUEUED_BYTES`]). When a
//! group's response would pass the bound, that stream's watchers in that group are detached, and
//! once the stream has drained to where they stopped they are attached again from their next
//! revision: they catch up from etcd's history. The other watchers of the group, and the other
//! streams, never wait for it.

mod hub;
mod stream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Request, Response};
use tokio::sync::{mpsc, oneshot};

use crate::body::ClientBody;
use crate::cluster::Cluster;
use crate::forward::ResponseBody;
use crate::namespace::Namespace;
use crate::resume::Client;
use crate::rewrite::Limits;
use crate::upstream::Upstream;

pub use hub::MAX_QUEUED_BYTES;

/// The gRPC path served here.
pub const PATH: &str = "/etcdserverpb.Watch/Watch";

/// Frames queued towards one client's HTTP/2 stream.
const CLIENT_QUEUE: usize = 16;

/// The metadata that tells identities apart, in a fixed order.
type Identity = Vec<(&'static str, HeaderValue)>;

/// Metadata names that make an identity: auth, and `hasleader` (etcd ends such a stream when
/// the member has no leader, which must not end the others).
const IDENTITY_HEADERS: [&str; 3] = ["token", "authorization", "hasleader"];

/// What client streams hold to reach their hub; the hub's task ends when the last is dropped.
struct HubHandle {
    tx: mpsc::UnboundedSender<hub::ToHub>,
}

/// Every identity's hub.
pub struct Watches {
    upstream: Arc<Upstream>,
    cluster: Arc<Cluster>,
    limits: Limits,
    namespace: Option<Namespace>,
    hubs: Mutex<HashMap<Identity, Weak<HubHandle>>>,
    next_client: AtomicU64,
}

impl Watches {
    /// Hubs over `upstream`; `cluster` makes the per-watcher reads; with `namespace`, clients
    /// see keys under it only.
    pub fn new(
        upstream: Arc<Upstream>,
        cluster: Arc<Cluster>,
        limits: Limits,
        namespace: Option<Namespace>,
    ) -> Watches {
        Watches {
            upstream,
            cluster,
            limits,
            namespace,
            hubs: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(1),
        }
    }

    /// The hub of `identity`, started if it has none.
    fn hub(&self, identity: Identity) -> Arc<HubHandle> {
        let mut hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hubs.get(&identity).and_then(Weak::upgrade) {
            return h;
        }
        hubs.retain(|_, h| h.strong_count() > 0);
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = Arc::new(HubHandle { tx });
        hubs.insert(identity.clone(), Arc::downgrade(&handle));
        let mut headers = HeaderMap::new();
        for (name, value) in identity {
            headers.insert(name, value);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        let hub = hub::Hub::new(
            self.upstream.clone(),
            self.limits,
            self.namespace.clone(),
            headers,
            rx,
        );
        tokio::spawn(hub.run());
        handle
    }

    /// Serves one client's `Watch` call.
    pub async fn handle(&self, req: Request<ClientBody>) -> Response<ResponseBody> {
        let identity: Identity = IDENTITY_HEADERS
            .into_iter()
            .filter_map(|name| Some((name, req.headers().get(name)?.clone())))
            .collect();
        let hub = self.hub(identity);
        let (parts, body) = req.into_parts();
        let (head, head_rx) = oneshot::channel();
        let cid = self.next_client.fetch_add(1, Ordering::Relaxed);
        let served = stream::ClientStream::new(
            cid,
            hub,
            self.cluster.clone(),
            self.namespace.clone(),
            parts.headers,
            Client::new(body, self.limits),
            head,
        );
        tokio::spawn(served.run());
        head_rx.await.unwrap_or_else(|_| {
            crate::forward::status_response(13, "etcd-proxy: watch stream ended without an answer")
        })
    }
}
