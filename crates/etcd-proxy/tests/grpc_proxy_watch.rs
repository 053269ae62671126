//! The Watch stream through `etcd-proxy grpc-proxy start` message by message, against the same
//! stream opened directly on the same etcd member at the same time: client-chosen `watch_id`,
//! server-chosen IDs, history from a past `start_revision`, `prev_kv`, filters, progress requests,
//! fragmented revisions, cancel, compaction and half-close must all give exactly what etcd gives.
//! etcd's own proxy gets several of these wrong (it ignores `watch_id`, never answers progress
//! requests, fakes the created header); see ../shared/reference/etcd-grpc-proxy-behaviour.md.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::start_grpc_proxy;
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::watch_client::WatchClient;
use etcd_api::etcdserverpb::watch_create_request::FilterType;
use etcd_api::etcdserverpb::watch_request::RequestUnion;
use etcd_api::etcdserverpb::{
    CompactionRequest, PutRequest, RequestOp, TxnRequest, WatchCancelRequest, WatchCreateRequest,
    WatchProgressRequest, WatchRequest, WatchResponse, request_op,
};
use testkit::Cluster;
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::Channel;

/// One watch stream: what to send on it, and what comes back.
struct Session {
    tx: Option<mpsc::Sender<WatchRequest>>,
    rx: Streaming<WatchResponse>,
}

impl Session {
    /// Opens a watch stream at `addr` whose first request is `first` (tonic waits for the
    /// response head, which etcd sends with its first answer).
    async fn open(addr: &str, first: WatchRequest) -> Session {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.expect("queue the first request");
        let rx = WatchClient::new(channel)
            .watch(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            }))
            .await
            .expect("watch")
            .into_inner();
        Session { tx: Some(tx), rx }
    }

    async fn send(&self, req: WatchRequest) {
        self.tx
            .as_ref()
            .expect("not half-closed")
            .send(req)
            .await
            .expect("send");
    }

    /// The next response, with the header fields that name the answering member cleared.
    async fn next(&mut self, what: &str) -> WatchResponse {
        let mut m = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .unwrap_or_else(|_| panic!("{what}: no response within 10 s"))
            .unwrap_or_else(|e| panic!("{what}: stream error {e:?}"))
            .unwrap_or_else(|| panic!("{what}: stream ended"));
        if let Some(h) = &mut m.header {
            h.member_id = 0;
            h.raft_term = 0;
        }
        m
    }
}

/// The same stream directly on the member and through the proxy.
struct Pair {
    direct: Session,
    proxied: Session,
}

impl Pair {
    async fn open(direct: &str, proxy: &str, first: WatchRequest) -> Pair {
        Pair {
            direct: Session::open(direct, first.clone()).await,
            proxied: Session::open(proxy, first).await,
        }
    }

    async fn send(&self, req: WatchRequest) {
        self.direct.send(req.clone()).await;
        self.proxied.send(req).await;
    }

    /// The next response of each; they must be equal. Returns it.
    async fn next(&mut self, what: &str) -> WatchResponse {
        let d = self.direct.next(what).await;
        let p = self.proxied.next(what).await;
        assert_eq!(p, d, "{what}: through the proxy (left) vs directly (right)");
        d
    }

    /// The next `n` responses of each, which etcd may send in any order (events of one revision
    /// for different watchers): equal as sets, returned sorted by watch ID.
    async fn next_set(&mut self, n: usize, what: &str) -> Vec<WatchResponse> {
        let mut d = Vec::new();
        let mut p = Vec::new();
        for _ in 0..n {
            d.push(self.direct.next(what).await);
            p.push(self.proxied.next(what).await);
        }
        d.sort_by_key(|m| m.watch_id);
        p.sort_by_key(|m| m.watch_id);
        assert_eq!(p, d, "{what}: through the proxy (left) vs directly (right)");
        d
    }

    /// Half-closes both streams.
    fn close_send(&mut self) {
        self.direct.tx = None;
        self.proxied.tx = None;
    }
}

fn create(c: WatchCreateRequest) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(c)),
    }
}

fn key(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_stream_matches_etcd_message_for_message() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let direct = cluster.member(0).client_endpoint();
    let channel = Channel::from_shared(format!("http://{direct}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut kv = KvClient::new(channel);
    let put = |k: &str, v: Vec<u8>| PutRequest {
        key: key(k),
        value: Bytes::from(v),
        ..Default::default()
    };

    // History before the streams exist.
    let first = kv
        .put(put("w/a", b"1".to_vec()))
        .await
        .expect("put")
        .into_inner()
        .header
        .expect("header")
        .revision;
    kv.put(put("w/b", b"2".to_vec())).await.expect("put");

    // A client-chosen ID, from a past revision, with prev_kv and a NODELETE filter.
    let mut pair = Pair::open(
        &direct,
        &addr,
        create(WatchCreateRequest {
            key: key("w/"),
            range_end: key("w0"),
            start_revision: first,
            prev_kv: true,
            filters: vec![FilterType::Nodelete as i32],
            watch_id: 7,
            ..Default::default()
        }),
    )
    .await;
    let created = pair.next("created, client-chosen id").await;
    assert!(created.created && created.watch_id == 7, "{created:?}");
    let history = pair.next("history").await;
    assert_eq!(history.events.len(), 2, "{history:?}");

    // Big values, so that one revision overwriting both with prev_kv is 4 × 700 KiB: more than
    // etcd's 1.5 MiB per watch response.
    let big_value = || vec![b'x'; 700 << 10];
    kv.put(put("big/1", big_value())).await.expect("put");
    kv.put(put("big/2", big_value())).await.expect("put");

    // A server-chosen ID next to it, and a watcher of big values that may be fragmented.
    pair.send(create(WatchCreateRequest {
        key: key("w/a"),
        ..Default::default()
    }))
    .await;
    let auto = pair.next("created, server-chosen id").await;
    assert!(auto.created, "{auto:?}");
    pair.send(create(WatchCreateRequest {
        key: key("big/"),
        range_end: key("big0"),
        fragment: true,
        prev_kv: true,
        watch_id: 9,
        ..Default::default()
    }))
    .await;
    assert_eq!(pair.next("created, fragment").await.watch_id, 9);

    // Live events, and a delete the NODELETE watcher does not see.
    kv.put(put("w/a", b"3".to_vec())).await.expect("put");
    let both = pair.next_set(2, "one event for each watcher of w/a").await;
    let ids: Vec<i64> = both.iter().map(|m| m.watch_id).collect();
    assert_eq!(ids, [auto.watch_id.min(7), auto.watch_id.max(7)]);

    // A progress request is answered (etcd's proxy never answers it).
    pair.send(WatchRequest {
        request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
    })
    .await;
    let progress = pair.next("progress").await;
    assert!(
        progress.events.is_empty() && !progress.created,
        "{progress:?}"
    );

    // One revision of 2 × (700 KiB + 700 KiB prev_kv): it comes in fragments.
    let big = |k: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(put(k, big_value()))),
    };
    kv.txn(TxnRequest {
        success: vec![big("big/1"), big("big/2")],
        ..Default::default()
    })
    .await
    .expect("txn");
    let mut events = 0;
    let mut fragments = 0;
    loop {
        let m = pair.next("fragment").await;
        assert_eq!(m.watch_id, 9);
        events += m.events.len();
        fragments += 1;
        if !m.fragment {
            break;
        }
    }
    assert_eq!(events, 2);
    assert!(
        fragments >= 2,
        "one revision over 1.5 MiB must be fragmented"
    );

    // Cancel, then a compaction that cancels a new watcher from before it.
    pair.send(WatchRequest {
        request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
            watch_id: 7,
        })),
    })
    .await;
    let canceled = pair.next("cancel").await;
    assert!(canceled.canceled && canceled.watch_id == 7, "{canceled:?}");
    let now = kv
        .put(put("w/c", b"4".to_vec()))
        .await
        .expect("put")
        .into_inner()
        .header
        .expect("header")
        .revision;
    kv.compact(CompactionRequest {
        revision: now,
        physical: true,
    })
    .await
    .expect("compact");
    pair.send(create(WatchCreateRequest {
        key: key("w/"),
        range_end: key("w0"),
        start_revision: first,
        watch_id: 11,
        ..Default::default()
    }))
    .await;
    let mut compacted = pair.next("created or compacted").await;
    if compacted.created && !compacted.canceled {
        compacted = pair.next("compacted").await;
    }
    assert!(
        compacted.canceled && compacted.compact_revision == now,
        "{compacted:?}"
    );

    // Half-close: etcd keeps sending events on the open watchers.
    pair.close_send();
    kv.put(put("w/a", b"5".to_vec())).await.expect("put");
    let after = pair.next("event after half-close").await;
    assert_eq!(after.watch_id, auto.watch_id);
    assert_eq!(after.events[0].kv.as_ref().expect("kv").value, key("5"));
}
