//! `etcd-proxy grpc-proxy start --experimental-leasing-prefix` end to end, against a real
//! 3-member etcd: a linearizable Get acquires the leasing key and later Gets are answered from
//! memory (no Range reaches etcd); writes through another leasing proxy (ours, or etcd's own
//! `etcd grpc-proxy`) revoke the owner first; writes through the owner are seen by its next Get;
//! a direct write to etcd drops the cached value (the watch safety net); `--namespace` puts the
//! leasing keys in the namespace; a lost session drops the cache.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, start_grpc_proxy};
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::lease_client::LeaseClient;
use etcd_api::etcdserverpb::{
    DeleteRangeRequest, LeaseRevokeRequest, PutRequest, RangeRequest, RangeResponse,
};
use etcd_api::mvccpb::KeyValue;
use testkit::Cluster;
use tonic::transport::Channel;

const PREFIX: &str = "--experimental-leasing-prefix=/lease/";

async fn client(addr: &str) -> KvClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
        {
            Ok(ch) => return KvClient::new(ch),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect to {addr}: {e}"),
        }
    }
}

/// A client of member 0, straight to etcd.
async fn direct(cluster: &Cluster) -> KvClient<Channel> {
    client(&cluster.client_endpoints()[0]).await
}

async fn get(kv: &mut KvClient<Channel>, key: &str) -> RangeResponse {
    kv.range(RangeRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        ..Default::default()
    })
    .await
    .expect("range")
    .into_inner()
}

async fn value(kv: &mut KvClient<Channel>, key: &str) -> Option<String> {
    get(kv, key)
        .await
        .kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

async fn put(kv: &mut KvClient<Channel>, key: &str, value: &str) {
    kv.put(PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        ..Default::default()
    })
    .await
    .expect("put");
}

/// The key as etcd has it.
async fn raw(cluster: &Cluster, key: &str) -> Option<KeyValue> {
    get(&mut direct(cluster).await, key)
        .await
        .kvs
        .into_iter()
        .next()
}

/// Gets `key` through `kv` until the proxy owns it (its leasing key `lkey` exists in etcd on a
/// lease); returns the leasing key.
async fn acquire(cluster: &Cluster, kv: &mut KvClient<Channel>, key: &str, lkey: &str) -> KeyValue {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = get(kv, key).await;
        if let Some(l) = raw(cluster, lkey).await
            && l.lease != 0
            && l.value.is_empty()
        {
            return l;
        }
        assert!(Instant::now() < deadline, "{lkey} never acquired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Ranges executed by the whole cluster so far.
async fn ranges(cluster: &Cluster) -> f64 {
    let mut total = 0.0;
    for i in 0..cluster.len() {
        total += cluster
            .metric(i, "etcd_debugging_mvcc_range_total")
            .await
            .unwrap_or(0.0);
    }
    total
}

async fn eventually_value(kv: &mut KvClient<Channel>, key: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = value(kv, key).await;
        if v.as_deref() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{key}: got {v:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn owned_key_is_served_from_memory() {
    let cluster = Cluster::start(3).await;
    let (_proxy, addr) = start_grpc_proxy(&cluster, &[PREFIX]);
    let mut kv = client(&addr).await;
    put(&mut direct(&cluster).await, "foo", "bar").await;

    let lease_key = acquire(&cluster, &mut kv, "foo", "/lease/foo").await;
    assert_ne!(lease_key.lease, 0);
    let first = get(&mut kv, "foo").await;
    assert_eq!(first.kvs[0].value.as_ref(), b"bar");

    let before = ranges(&cluster).await;
    for _ in 0..10 {
        let again = get(&mut kv, "foo").await;
        assert_eq!(again.kvs, first.kvs);
        // etcd's leasing client answers with the header of the read that filled the cache.
        assert_eq!(again.header, first.header);
    }
    // keys_only and count_only are answered from memory as etcd answers them.
    let keys_only = kv
        .range(RangeRequest {
            key: Bytes::from_static(b"foo"),
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys_only.kvs[0].key.as_ref(), b"foo");
    assert!(keys_only.kvs[0].value.is_empty());
    let count_only = kv
        .range(RangeRequest {
            key: Bytes::from_static(b"foo"),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(count_only.kvs.is_empty());
    assert_eq!(count_only.count, 1);
    assert_eq!(ranges(&cluster).await, before, "cached Gets reached etcd");

    // A serializable Get and a range are passed through.
    kv.range(RangeRequest {
        key: Bytes::from_static(b"foo"),
        serializable: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let range = kv
        .range(RangeRequest {
            key: Bytes::from_static(b"f"),
            range_end: Bytes::from_static(b"g"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(range.kvs.len(), 1);
    assert!(ranges(&cluster).await >= before + 2.0);

    // A missing key is owned and cached as missing too.
    acquire(&cluster, &mut kv, "absent", "/lease/absent").await;
    let before = ranges(&cluster).await;
    assert!(get(&mut kv, "absent").await.kvs.is_empty());
    assert_eq!(ranges(&cluster).await, before);
}

#[tokio::test]
async fn writes_through_the_owner_are_seen_and_keep_ownership() {
    let cluster = Cluster::start(3).await;
    let (_proxy, addr) = start_grpc_proxy(&cluster, &[PREFIX]);
    let mut kv = client(&addr).await;
    put(&mut kv, "k", "v1").await;
    let owned = acquire(&cluster, &mut kv, "k", "/lease/k").await;

    put(&mut kv, "k", "v2").await;
    assert_eq!(value(&mut kv, "k").await.as_deref(), Some("v2"));
    assert_eq!(raw(&cluster, "/lease/k").await, Some(owned.clone()));
    let resp = kv
        .delete_range(DeleteRangeRequest {
            key: Bytes::from_static(b"k"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.deleted, 1);
    assert_eq!(value(&mut kv, "k").await, None);
    assert_eq!(raw(&cluster, "/lease/k").await, Some(owned));
    // A range delete through the owner.
    put(&mut kv, "k", "v3").await;
    assert_eq!(value(&mut kv, "k").await.as_deref(), Some("v3"));
    kv.delete_range(DeleteRangeRequest {
        key: Bytes::from_static(b"a"),
        range_end: Bytes::from_static(b"z"),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(value(&mut kv, "k").await, None);
    assert_eq!(raw(&cluster, "k").await, None);
}

#[tokio::test]
async fn a_write_through_another_proxy_revokes_the_owner() {
    let cluster = Cluster::start(3).await;
    let (_a, addr_a) = start_grpc_proxy(&cluster, &[PREFIX]);
    let (_b, addr_b) = start_grpc_proxy(&cluster, &[PREFIX]);
    let (mut a, mut b) = (client(&addr_a).await, client(&addr_b).await);
    put(&mut a, "x", "1").await;
    acquire(&cluster, &mut a, "x", "/lease/x").await;
    assert_eq!(value(&mut a, "x").await.as_deref(), Some("1"));

    let started = Instant::now();
    put(&mut b, "x", "2").await;
    assert!(started.elapsed() < Duration::from_secs(10));
    // The owner gave the key up before the write was made.
    assert_eq!(value(&mut a, "x").await.as_deref(), Some("2"));
    assert_eq!(value(&mut b, "x").await.as_deref(), Some("2"));

    // And the other way, after the back-off: B owns it, A writes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    acquire(&cluster, &mut b, "x", "/lease/x").await;
    put(&mut a, "x", "3").await;
    assert_eq!(value(&mut b, "x").await.as_deref(), Some("3"));
}

#[tokio::test]
async fn a_direct_write_drops_the_cached_value() {
    let cluster = Cluster::start(3).await;
    let (_proxy, addr) = start_grpc_proxy(&cluster, &[PREFIX]);
    let mut kv = client(&addr).await;
    put(&mut kv, "d", "old").await;
    acquire(&cluster, &mut kv, "d", "/lease/d").await;
    assert_eq!(value(&mut kv, "d").await.as_deref(), Some("old"));
    // Not covered by the protocol: caught by the proxy's watch, shortly after.
    put(&mut direct(&cluster).await, "d", "new").await;
    eventually_value(&mut kv, "d", "new").await;
}

#[tokio::test]
async fn leasing_keys_are_namespaced() {
    let cluster = Cluster::start(3).await;
    let (_proxy, addr) = start_grpc_proxy(&cluster, &["--namespace=/ns/", PREFIX]);
    let mut kv = client(&addr).await;
    put(&mut kv, "k", "v").await;
    assert_eq!(raw(&cluster, "/ns/k").await.unwrap().value.as_ref(), b"v");
    let deadline = Instant::now() + Duration::from_secs(20);
    while raw(&cluster, "/ns//lease/k").await.is_none() {
        assert_eq!(value(&mut kv, "k").await.as_deref(), Some("v"));
        assert!(Instant::now() < deadline, "never acquired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(raw(&cluster, "/lease/k").await.is_none());
    let cached = get(&mut kv, "k").await;
    assert_eq!(cached.kvs[0].key.as_ref(), b"k");
    put(&mut kv, "k", "w").await;
    assert_eq!(value(&mut kv, "k").await.as_deref(), Some("w"));
    // A second namespaced leasing proxy revokes the first.
    let (_other, other_addr) = start_grpc_proxy(&cluster, &["--namespace=/ns/", PREFIX]);
    put(&mut client(&other_addr).await, "k", "z").await;
    assert_eq!(value(&mut kv, "k").await.as_deref(), Some("z"));
}

#[tokio::test]
async fn a_lost_session_drops_the_cache() {
    let cluster = Cluster::start(3).await;
    let (mut proxy, addr) = start_grpc_proxy(&cluster, &[PREFIX]);
    let mut kv = client(&addr).await;
    put(&mut kv, "s", "1").await;
    let owned = acquire(&cluster, &mut kv, "s", "/lease/s").await;
    let ch = Channel::from_shared(format!("http://{}", cluster.client_endpoints()[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    LeaseClient::new(ch)
        .lease_revoke(LeaseRevokeRequest { id: owned.lease })
        .await
        .unwrap();
    assert!(raw(&cluster, "/lease/s").await.is_none());
    proxy.wait_for_log("lost leasing session", Duration::from_secs(15));
    let again = acquire(&cluster, &mut kv, "s", "/lease/s").await;
    assert_ne!(again.lease, owned.lease, "a new session");
    put(&mut direct(&cluster).await, "s", "2").await;
    eventually_value(&mut kv, "s", "2").await;
}

#[tokio::test]
async fn txns_and_range_deletes_revoke_owners() {
    use etcd_api::etcdserverpb::request_op::Request as Op;
    use etcd_api::etcdserverpb::{RequestOp, TxnRequest};
    let cluster = Cluster::start(3).await;
    let (_a, addr_a) = start_grpc_proxy(&cluster, &[PREFIX]);
    let (_b, addr_b) = start_grpc_proxy(&cluster, &[PREFIX]);
    let (mut a, mut b) = (client(&addr_a).await, client(&addr_b).await);
    for k in ["t1", "t2", "t3"] {
        put(&mut a, k, "old").await;
        acquire(&cluster, &mut a, k, &format!("/lease/{k}")).await;
    }
    // A Txn through B puts t1 in its success branch (nested in a Txn).
    let nested = TxnRequest {
        compare: vec![],
        success: vec![RequestOp {
            request: Some(Op::RequestPut(PutRequest {
                key: Bytes::from_static(b"t1"),
                value: Bytes::from_static(b"txn"),
                ..Default::default()
            })),
        }],
        failure: vec![],
    };
    let resp = b
        .txn(TxnRequest {
            compare: vec![],
            success: vec![RequestOp {
                request: Some(Op::RequestTxn(nested)),
            }],
            failure: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.succeeded);
    assert!(resp.header.is_some_and(|h| h.revision > 0));
    assert_eq!(value(&mut a, "t1").await.as_deref(), Some("txn"));
    // A range delete through B of [t2, t4).
    let deleted = b
        .delete_range(DeleteRangeRequest {
            key: Bytes::from_static(b"t2"),
            range_end: Bytes::from_static(b"t4"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted, 2);
    assert_eq!(value(&mut a, "t2").await, None);
    assert_eq!(value(&mut a, "t3").await, None);
    assert!(raw(&cluster, "/lease/t2").await.is_none());
}

#[tokio::test]
async fn a_stopped_member_does_not_hold_revokes() {
    let cluster = Cluster::start(3).await;
    let (mut proxy_a, addr_a) = start_grpc_proxy(&cluster, &[PREFIX]);
    let (mut proxy_b, addr_b) = start_grpc_proxy(&cluster, &[PREFIX]);
    let (mut a, mut b) = (client(&addr_a).await, client(&addr_b).await);
    for i in 0..3 {
        let key = format!("p{i}");
        put(&mut a, &key, "old").await;
        acquire(&cluster, &mut a, &key, &format!("/lease/{key}")).await;
    }
    // A follower stops answering but keeps its connections; the proxies' probes take it out
    // of the rotation. Whichever member the watches were on, revokes go through.
    let leader = cluster.leader().await.expect("a leader");
    let stopped = (leader + 1) % cluster.len();
    cluster.pause(stopped);
    proxy_a.wait_for_log("deactivated endpoint", Duration::from_secs(20));
    proxy_b.wait_for_log("deactivated endpoint", Duration::from_secs(20));
    for i in 0..3 {
        let key = format!("p{i}");
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), put(&mut b, &key, "new"))
            .await
            .expect("write through B within 30 s");
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(value(&mut a, &key).await.as_deref(), Some("new"));
    }
    cluster.resume(stopped);
}

#[tokio::test]
async fn shutdown_releases_the_leasing_keys() {
    let cluster = Cluster::start(3).await;
    let (mut proxy, addr) = start_grpc_proxy(&cluster, &[PREFIX]);
    let mut kv = client(&addr).await;
    put(&mut kv, "q", "1").await;
    acquire(&cluster, &mut kv, "q", "/lease/q").await;
    drop(kv);
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(15)), Some(0));
    // The session lease was revoked: another client need not wait for its TTL.
    assert!(raw(&cluster, "/lease/q").await.is_none());
}

/// One writer puts 1, 2, 3, ... alternately through two proxies while readers Get through both:
/// a Get that starts after a write was answered never returns an older value.
#[tokio::test]
async fn reads_never_go_back_past_a_finished_write() {
    let cluster = Cluster::start(3).await;
    let (_a, addr_a) = start_grpc_proxy(&cluster, &[PREFIX]);
    let (_b, addr_b) = start_grpc_proxy(&cluster, &[PREFIX]);
    let mut w = [client(&addr_a).await, client(&addr_b).await];
    put(&mut w[0], "c", "0").await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for addr in [&addr_a, &addr_b, &addr_a, &addr_b] {
        let mut kv = client(addr).await;
        let (done, stop) = (done.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let floor = done.load(std::sync::atomic::Ordering::SeqCst);
                let got: i64 = value(&mut kv, "c").await.unwrap().parse().unwrap();
                assert!(got >= floor, "read {got} after write {floor} was answered");
                reads += 1;
            }
            reads
        }));
    }
    let ranges_before = ranges(&cluster).await;
    // First every fourth write goes through B (ownership moves between the proxies), then all
    // go through A (the owner after the back-off: its own writes and cached reads).
    for n in 1..=60i64 {
        put(
            &mut w[usize::from(n <= 20 && n % 4 == 0)],
            "c",
            &n.to_string(),
        )
        .await;
        done.store(n, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut reads = 0;
    for r in readers {
        let n = r.await.expect("reader");
        assert!(n > 0);
        reads += n;
    }
    let ranges = ranges(&cluster).await - ranges_before;
    eprintln!("{reads} reads, {ranges} ranges in etcd");
}

/// etcd's own `etcd grpc-proxy start`, killed on drop.
struct EtcdProxy(Child);

impl Drop for EtcdProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_etcd_proxy(cluster: &Cluster, extra: &[&str]) -> (EtcdProxy, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(testkit::etcd_path())
        .args(["grpc-proxy", "start"])
        .arg(format!("--endpoints={}", cluster.client_urls().join(",")))
        .arg(format!("--listen-addr={addr}"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcd grpc-proxy");
    (EtcdProxy(child), addr)
}

#[tokio::test]
async fn interoperates_with_etcds_leasing_proxy() {
    let cluster = Cluster::start(3).await;
    let (_ours, ours_addr) = start_grpc_proxy(&cluster, &[PREFIX]);
    let (_etcd, etcd_addr) = start_etcd_proxy(&cluster, &[PREFIX]);
    let mut ours: KvClient<Channel> = client(&ours_addr).await;
    let mut theirs = client(&etcd_addr).await;
    // etcd's proxy may take a moment to start its session.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match theirs
            .put(PutRequest {
                key: Bytes::from_static(b"i"),
                value: Bytes::from_static(b"1"),
                ..Default::default()
            })
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "etcd's proxy: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                theirs = client(&etcd_addr).await;
            }
        }
    }

    // etcd's proxy owns `i`; a write through ours revokes it, and etcd's proxy then reads it.
    let etcd_owned = acquire(&cluster, &mut theirs, "i", "/lease/i").await;
    put(&mut ours, "i", "2").await;
    let after = raw(&cluster, "/lease/i").await;
    assert!(
        after.is_none_or(|l| l.create_revision != etcd_owned.create_revision),
        "etcd's proxy still holds the key"
    );
    assert_eq!(value(&mut theirs, "i").await.as_deref(), Some("2"));

    // Ours owns `j`; a write through etcd's proxy revokes it, and ours then reads it.
    put(&mut ours, "j", "1").await;
    let our_owned = acquire(&cluster, &mut ours, "j", "/lease/j").await;
    let started = Instant::now();
    put(&mut theirs, "j", "2").await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let after = raw(&cluster, "/lease/j").await;
    assert!(after.is_none_or(|l| l.create_revision != our_owned.create_revision));
    assert_eq!(value(&mut ours, "j").await.as_deref(), Some("2"));
}
