//! Watch coalescing in `etcd-proxy grpc-proxy start`, against real etcd: client watchers on one
//! key range share one upstream watcher (read from etcd's own `etcd_debugging_mvcc_watcher_total`),
//! and each still sees exactly what etcd would show it. Regression tests for etcd's proxy bugs
//! listed in ../shared/reference/etcd-grpc-proxy-behaviour.md §1.2: the joined watcher's fake
//! created header, a dead upstream watcher capturing new watchers (#21813), a slow consumer
//! canceling a whole stream; and per-user permission with watchers sharing a proxy.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{proxy_metric, start_grpc_proxy};
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::watch_client::WatchClient;
use etcd_api::etcdserverpb::watch_request::RequestUnion;
use etcd_api::etcdserverpb::{
    CompactionRequest, PutRequest, RangeRequest, ResponseHeader, WatchCreateRequest, WatchRequest,
    WatchResponse,
};
use testkit::Cluster;
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::Channel;

/// How long any one expected response may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

fn create(key: &str, start: i64, prev_kv: bool) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            start_revision: start,
            prev_kv,
            ..Default::default()
        })),
    }
}

/// One watch stream.
struct Stream {
    tx: mpsc::Sender<WatchRequest>,
    rx: Streaming<WatchResponse>,
}

impl Stream {
    async fn open(ch: &Channel, first: WatchRequest) -> Stream {
        let (tx, rx) = mpsc::channel(256);
        tx.send(first).await.expect("queue");
        // Unbounded as clientv3's default: a watcher catching up gets many revisions at once.
        let rx = WatchClient::new(ch.clone())
            .max_decoding_message_size(usize::MAX)
            .watch(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            }))
            .await
            .expect("watch")
            .into_inner();
        Stream { tx, rx }
    }

    async fn send(&self, req: WatchRequest) {
        self.tx.send(req).await.expect("send");
    }

    async fn next(&mut self, what: &str) -> WatchResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
            .unwrap_or_else(|e| panic!("{what}: stream error {e:?}"))
            .unwrap_or_else(|| panic!("{what}: stream ended"))
    }

    /// The next response that carries events, skipping progress notifications.
    async fn next_events(&mut self, what: &str) -> WatchResponse {
        loop {
            let m = self.next(what).await;
            assert!(!m.canceled, "{what}: canceled: {m:?}");
            if !m.events.is_empty() {
                return m;
            }
        }
    }
}

async fn put(ch: &Channel, key: &str, value: &[u8]) -> i64 {
    KvClient::new(ch.clone())
        .put(PutRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value),
            ..Default::default()
        })
        .await
        .expect("put")
        .into_inner()
        .header
        .expect("header")
        .revision
}

async fn current_header(ch: &Channel) -> ResponseHeader {
    KvClient::new(ch.clone())
        .range(RangeRequest {
            key: Bytes::from_static(b"any"),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner()
        .header
        .expect("header")
}

/// Watchers held by the whole cluster, from etcd's own metric.
async fn etcd_watchers(cluster: &Cluster) -> f64 {
    let mut total = 0.0;
    for i in 0..cluster.len() {
        total += cluster
            .metric(i, "etcd_debugging_mvcc_watcher_total")
            .await
            .unwrap_or(0.0);
    }
    total
}

/// Waits (bounded) until the cluster holds `want` watchers; returns what it last saw.
async fn wait_for_etcd_watchers(cluster: &Cluster, want: f64) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = etcd_watchers(cluster).await;
        if n == want || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 2,000 client watchers on one key, over 20 streams and 2 connections, some from a past
/// revision and some with prev_kv, cost etcd one watcher; each gets every event exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_watchers_on_one_key_cost_etcd_one_watcher() {
    const STREAMS: usize = 20;
    const PER_STREAM: usize = 100;
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let direct = channel(&cluster.member(0).client_endpoint()).await;
    let before = etcd_watchers(&cluster).await;

    let past = put(&direct, "hot", b"0").await;
    put(&direct, "other", b"x").await;
    let conns = [channel(&addr).await, channel(&addr).await];
    let mut streams = Vec::new();
    for s in 0..STREAMS {
        // Every tenth stream watches from `past` (history first), the others from now.
        let start = if s % 10 == 9 { past } else { 0 };
        let prev_kv = s % 2 == 0;
        let mut st = Stream::open(&conns[s % 2], create("hot", start, prev_kv)).await;
        for _ in 1..PER_STREAM {
            st.send(create("hot", start, prev_kv)).await;
        }
        // Created answers, and for watchers from `past` the event at `past`, which may come
        // before the other watchers' created answers (as from etcd).
        let mut ids = std::collections::BTreeSet::new();
        let mut history = 0;
        let want_history = if start == past { PER_STREAM } else { 0 };
        while ids.len() < PER_STREAM || history < want_history {
            let m = st.next("created").await;
            assert!(!m.canceled, "{m:?}");
            if m.created {
                let h = m.header.expect("created header");
                assert!(
                    h.cluster_id != 0 && h.member_id != 0 && h.raft_term > 0,
                    "{h:?}"
                );
                ids.insert(m.watch_id);
            } else {
                assert!(ids.contains(&m.watch_id), "event before created: {m:?}");
                assert_eq!(m.events.len(), 1, "{m:?}");
                assert_eq!(m.events[0].kv.as_ref().unwrap().mod_revision, past);
                history += 1;
            }
        }
        assert_eq!(
            ids,
            (0..PER_STREAM as i64).collect(),
            "ids allocated as etcd does"
        );
        assert_eq!(history, want_history);
        streams.push((st, prev_kv));
    }

    // Two writes: every watcher sees each once, in order, with prev_kv as it asked.
    let mut revs = Vec::new();
    for v in [b"1", b"2"] {
        revs.push(put(&direct, "hot", v).await);
    }
    for (n, (st, prev_kv)) in streams.iter_mut().enumerate() {
        let mut seen = vec![Vec::new(); PER_STREAM];
        for _ in 0..2 * PER_STREAM {
            let m = st.next_events("event").await;
            for e in &m.events {
                let kv = e.kv.as_ref().unwrap();
                assert_eq!(e.prev_kv.is_some(), *prev_kv, "stream {n}: {e:?}");
                seen[m.watch_id as usize].push(kv.mod_revision);
            }
        }
        for (id, s) in seen.iter().enumerate() {
            assert_eq!(s, &revs, "stream {n} watcher {id}");
        }
    }

    // The catch-up watchers joined the shared one: etcd holds one watcher for all 2,000.
    let held = wait_for_etcd_watchers(&cluster, before + 1.0).await;
    assert_eq!(
        held - before,
        1.0,
        "watchers on etcd for 2,000 client watchers"
    );
    let total = (STREAMS * PER_STREAM) as f64;
    assert_eq!(
        proxy_metric(&addr, "etcd_grpc_proxy_watch_client_watchers"),
        total
    );
    assert_eq!(
        proxy_metric(&addr, "etcd_grpc_proxy_watch_upstream_watchers"),
        1.0
    );
    assert_eq!(
        proxy_metric(&addr, "etcd_grpc_proxy_watchers_coalescing_total"),
        total - 1.0
    );
    // One more event to 2,000 watchers from one upstream copy.
    let coalesced = proxy_metric(&addr, "etcd_grpc_proxy_events_coalescing_total");
    put(&direct, "hot", b"3").await;
    for (st, _) in streams.iter_mut() {
        for _ in 0..PER_STREAM {
            st.next_events("third event").await;
        }
    }
    assert_eq!(
        proxy_metric(&addr, "etcd_grpc_proxy_events_coalescing_total") - coalesced,
        total - 1.0
    );

    // Canceling every watcher releases the upstream one.
    drop(streams);
    let held = wait_for_etcd_watchers(&cluster, before).await;
    assert_eq!(held, before, "etcd watchers after every client left");
}

/// A watcher that joins a shared upstream watcher gets a created header as etcd gives it:
/// cluster, member, term, and the current revision (etcd's proxy sends only a revision, the one
/// asked for). Its events start after that revision.
#[tokio::test(flavor = "multi_thread")]
async fn a_joining_watcher_gets_a_complete_current_header() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let direct = channel(&cluster.member(0).client_endpoint()).await;
    let proxy = channel(&addr).await;

    let mut first = Stream::open(&proxy, create("j", 0, false)).await;
    first.next("first created").await;
    for i in 0..5 {
        put(&direct, &format!("elsewhere/{i}"), b"x").await;
    }
    let now = current_header(&direct).await;
    let mut joined = Stream::open(&proxy, create("j", 0, false)).await;
    let created = joined.next("joined created").await;
    let h = created.header.expect("header");
    assert_eq!(
        (h.cluster_id, h.member_id, h.raft_term, h.revision),
        (now.cluster_id, now.member_id, now.raft_term, now.revision),
        "the joined watcher's created header is etcd's current one"
    );
    assert_eq!(
        etcd_watchers(&cluster).await,
        1.0,
        "the second watcher shares the first one's upstream watcher"
    );
    let rev = put(&direct, "j", b"v").await;
    for st in [&mut first, &mut joined] {
        let m = st.next_events("event").await;
        assert_eq!(m.events[0].kv.as_ref().unwrap().mod_revision, rev);
    }
}

/// etcd bug #21813: an upstream watcher that etcd canceled (here: its start revision was
/// compacted) must not capture later watchers of the same range. The canceled watcher gets
/// etcd's compaction answer, as directly.
#[tokio::test(flavor = "multi_thread")]
async fn a_canceled_upstream_watcher_does_not_capture_new_watchers() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let direct = channel(&cluster.member(0).client_endpoint()).await;
    let proxy = channel(&addr).await;

    let old = put(&direct, "x", b"1").await;
    let compacted = put(&direct, "x", b"2").await;
    KvClient::new(direct.clone())
        .compact(CompactionRequest {
            revision: compacted,
            physical: true,
        })
        .await
        .expect("compact");

    let mut expected = Stream::open(&direct, create("x", old, false)).await;
    let mut dead = Stream::open(&proxy, create("x", old, false)).await;
    for (what, st) in [("direct", &mut expected), ("proxied", &mut dead)] {
        let created = st.next(what).await;
        assert!(created.created, "{what}: {created:?}");
    }
    let want = expected.next("direct compaction").await;
    let got = dead.next("proxied compaction").await;
    assert!(got.canceled && want.canceled, "{got:?} vs {want:?}");
    assert_eq!(
        (got.watch_id, got.compact_revision),
        (want.watch_id, want.compact_revision)
    );
    assert_eq!(got.compact_revision, compacted);

    // A new watcher of the same key, from now, on another stream: it gets events.
    let mut live = Stream::open(&proxy, create("x", 0, false)).await;
    assert!(live.next("created").await.created);
    let rev = put(&direct, "x", b"3").await;
    let m = live.next_events("event after the dead watcher").await;
    assert_eq!(m.events[0].kv.as_ref().unwrap().mod_revision, rev);
}

/// A stream that stops reading falls behind without slowing anyone: the other stream of the same
/// key gets every event at once; the slow one, when it reads again, gets every event too,
/// exactly once and in order (caught up from etcd's history), and its stream is not canceled
/// (etcd's proxy cancels the whole stream after 50 ms).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_stream_falls_behind_alone_and_catches_up_from_history() {
    const WRITES: usize = 160;
    let cluster = Cluster::start(1).await;
    let (p, addr) = start_grpc_proxy(&cluster, &[]);
    let direct = channel(&cluster.member(0).client_endpoint()).await;

    let mut slow = Stream::open(&channel(&addr).await, create("big", 0, false)).await;
    let mut fast = Stream::open(&channel(&addr).await, create("big", 0, false)).await;
    assert!(slow.next("slow created").await.created);
    assert!(fast.next("fast created").await.created);

    // 160 values of 256 KiB: 40 MiB, more than the proxy, the HTTP/2 windows and the client
    // together hold for one stream.
    let value = vec![b'v'; 256 << 10];
    let mut revs = Vec::new();
    let writer = {
        let direct = direct.clone();
        tokio::spawn(async move {
            let mut revs = Vec::new();
            for _ in 0..WRITES {
                revs.push(put(&direct, "big", &value).await);
            }
            revs
        })
    };
    let mut fast_seen = Vec::new();
    while fast_seen.len() < WRITES {
        let m = fast.next_events("fast").await;
        fast_seen.extend(m.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
    }
    revs.extend(writer.await.expect("writer"));
    assert_eq!(
        fast_seen, revs,
        "the reading stream got every event while the other one was stalled"
    );

    let mut slow_seen = Vec::new();
    while slow_seen.len() < WRITES {
        let m = slow.next_events("slow").await;
        slow_seen.extend(m.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
    }
    assert_eq!(
        slow_seen, revs,
        "the slow stream: every event once, in order"
    );
    assert!(
        !p.log_entries("client stream fell behind; its watchers will catch up from etcd's history")
            .is_empty(),
        "the slow stream was never detached (the test did not test it):\n{}",
        p.log()
    );
}

/// With etcd auth on, each watcher is checked with its own token, as etcd checks it: a user
/// watching a key it may not read gets etcd's refusal (the same answer as directly), while
/// another user's watcher of that key, and its own watcher of a key it may read, get events.
#[tokio::test(flavor = "multi_thread")]
async fn each_watcher_is_checked_with_its_own_token() {
    let cluster = Cluster::start(1).await;
    common::enable_auth(&cluster, &[("alice", "alicepw", "readwrite", "a/")]);
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let direct = cluster.member(0).client_endpoint();
    let login = |at: String, user: &'static str, password: &'static str| async move {
        let opts = etcd_client::ConnectOptions::new().with_user(user, password);
        etcd_client::Client::connect([at], Some(opts))
            .await
            .expect("log in")
    };
    let mut alice = login(addr.clone(), "alice", "alicepw").await;
    let mut alice_direct = login(direct.clone(), "alice", "alicepw").await;
    let mut root = login(addr.clone(), "root", "rootpw").await;
    let mut root_direct = login(direct, "root", "rootpw").await;

    // Alice may not watch b/x: the same refusal through the proxy as directly.
    let refusal = |resp: etcd_client::WatchResponse| {
        (
            resp.created(),
            resp.canceled(),
            resp.watch_id(),
            resp.cancel_reason().to_string(),
        )
    };
    let mut proxied = alice.watch("b/x", None).await.expect("watch");
    let mut straight = alice_direct.watch("b/x", None).await.expect("watch");
    let got = refusal(proxied.message().await.expect("message").expect("open"));
    let want = refusal(straight.message().await.expect("message").expect("open"));
    assert_eq!(
        got, want,
        "alice's watch of b/x, through the proxy vs directly"
    );
    assert!(got.1, "alice's watch of b/x must be refused: {got:?}");

    // Root watches b/x and a/1, alice a/1: each gets the events it may see.
    let mut root_b = root.watch("b/x", None).await.expect("watch");
    let mut root_a = root.watch("a/1", None).await.expect("watch");
    let mut alice_a = alice.watch("a/1", None).await.expect("watch");
    for w in [&mut root_b, &mut root_a, &mut alice_a] {
        let created = w.message().await.expect("message").expect("open");
        assert!(created.created() && !created.canceled(), "{created:?}");
    }
    let b = root_direct
        .put("b/x", "secret", None)
        .await
        .expect("put b/x")
        .header()
        .expect("header")
        .revision();
    let a = root_direct
        .put("a/1", "shared", None)
        .await
        .expect("put a/1")
        .header()
        .expect("header")
        .revision();
    for (what, w, key, rev) in [
        ("root b/x", &mut root_b, "b/x", b),
        ("root a/1", &mut root_a, "a/1", a),
        ("alice a/1", &mut alice_a, "a/1", a),
    ] {
        let m = tokio::time::timeout(WAIT, w.message())
            .await
            .unwrap_or_else(|_| panic!("{what}: no event"))
            .expect("message")
            .expect("open");
        let kv = m.events()[0].kv().expect("kv");
        assert_eq!(
            (kv.key_str().unwrap(), kv.mod_revision()),
            (key, rev),
            "{what}"
        );
    }
    // Alice's refused stream got nothing more: b/x's event never reached it.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), proxied.message())
            .await
            .is_err(),
        "alice's refused watch of b/x received something"
    );
}
