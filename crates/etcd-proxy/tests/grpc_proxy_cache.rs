//! The range cache of `etcd-proxy grpc-proxy start` end to end, against real etcd with the
//! `etcd-client` crate: serializable reads are answered from memory (the proxy's hit counter
//! rises and etcd's own range counter does not), writes made anywhere are seen (directly to
//! etcd, nested in a Txn, above the start of an open-ended range), request options get etcd's
//! own answers, Compact does not stop the cache, auth never lets one identity see another's
//! data, the bounds and the off switch hold, and killing the member of the cache's watch does
//! not leave stale answers.

mod common;

use std::time::{Duration, Instant};

use common::{proxy_metric, start_grpc_proxy};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, GetResponse, SortOrder, SortTarget,
    Txn, TxnOp,
};
use testkit::Cluster;

const HITS: &str = "etcd_grpc_proxy_cache_hits_total";
const MISSES: &str = "etcd_grpc_proxy_cache_misses_total";
const KEYS: &str = "etcd_grpc_proxy_cache_keys_total";
/// etcd's count of Range requests it executed.
const ETCD_RANGES: &str = "etcd_mvcc_range_total";
/// How long a write may take to show through the proxy before a test fails: a correctness
/// bound (never stale for good), not a speed claim (the measured figures are in the docs).
const VISIBLE_WITHIN: Duration = Duration::from_secs(5);

async fn connect(endpoints: &[String], user: Option<(&str, &str)>) -> Client {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(20));
    if let Some((name, password)) = user {
        opts = opts.with_user(name, password);
    }
    Client::connect(endpoints, Some(opts))
        .await
        .expect("connect")
}

fn ser() -> GetOptions {
    GetOptions::new().with_serializable()
}

async fn sget(c: &mut Client, key: &str, opts: GetOptions) -> GetResponse {
    c.get(key, Some(opts)).await.expect("serializable get")
}

/// The value of `key` read serializably, `None` when absent.
async fn svalue(c: &mut Client, key: &str) -> Option<String> {
    sget(c, key, ser())
        .await
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

fn kvs(r: &GetResponse) -> Vec<(String, String, i64, i64)> {
    r.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.mod_revision(),
                kv.create_revision(),
            )
        })
        .collect()
}

fn revision(r: &GetResponse) -> i64 {
    r.header().expect("header").revision()
}

/// Ranges etcd executed, over every member.
async fn etcd_ranges(cluster: &Cluster) -> f64 {
    let mut total = 0.0;
    for i in 0..cluster.len() {
        total += cluster.metric(i, ETCD_RANGES).await.unwrap_or(0.0);
    }
    total
}

/// Reads `key` serializably through `c` until a read is a hit (the cache's watch comes up with
/// the first cacheable read); returns the value.
async fn warm(c: &mut Client, addr: &str, key: &str, opts: GetOptions) -> GetResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = proxy_metric(addr, HITS);
        let r = sget(c, key, opts.clone()).await;
        if proxy_metric(addr, HITS) > before {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{key} never served from the cache"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until `check` accepts the answer, within [`VISIBLE_WITHIN`]; returns how long it took.
async fn until<F>(c: &mut Client, key: &str, opts: GetOptions, what: &str, check: F) -> Duration
where
    F: Fn(&GetResponse) -> bool,
{
    let start = Instant::now();
    loop {
        let r = sget(c, key, opts.clone()).await;
        if check(&r) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < VISIBLE_WITHIN,
            "{what}: still {:?} after {VISIBLE_WITHIN:?}",
            kvs(&r)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_serializable_get_is_served_from_memory() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut direct = connect(&cluster.client_endpoints(), None).await;
    let put = direct.put("foo", "bar", None).await.expect("put");
    let written = put.header().expect("header").revision();
    let mut c = connect(std::slice::from_ref(&addr), None).await;
    let first = warm(&mut c, &addr, "foo", ser()).await;
    assert_eq!(kvs(&first)[0].1, "bar");

    let (hits, misses, ranges) = (
        proxy_metric(&addr, HITS),
        proxy_metric(&addr, MISSES),
        etcd_ranges(&cluster).await,
    );
    let start = Instant::now();
    for _ in 0..50 {
        let r = sget(&mut c, "foo", ser()).await;
        assert_eq!(kvs(&r), kvs(&first));
        assert!(revision(&r) >= written);
    }
    assert_eq!(proxy_metric(&addr, HITS), hits + 50.0);
    assert_eq!(proxy_metric(&addr, MISSES), misses);
    // The only Ranges etcd ran meanwhile are the cache's auth check, one a second.
    let executed = etcd_ranges(&cluster).await - ranges;
    let checks = start.elapsed().as_secs_f64().ceil() + 1.0;
    assert!(
        executed <= checks,
        "{executed} ranges reached etcd during 50 cached reads"
    );
    assert!(proxy_metric(&addr, KEYS) >= 1.0);

    // Linearizable reads always go to etcd and are neither hits nor misses.
    let before = etcd_ranges(&cluster).await;
    for _ in 0..3 {
        let r = c.get("foo", None).await.expect("get");
        assert_eq!(kvs(&r), kvs(&first));
    }
    assert_eq!(proxy_metric(&addr, HITS), hits + 50.0);
    assert_eq!(proxy_metric(&addr, MISSES), misses);
    assert!(etcd_ranges(&cluster).await >= before + 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_made_directly_to_etcd_are_seen_through_the_proxy() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut direct = connect(&cluster.client_endpoints(), None).await;
    direct.put("k", "0", None).await.expect("put");
    let mut c = connect(std::slice::from_ref(&addr), None).await;
    warm(&mut c, &addr, "k", ser()).await;
    let mut delays = Vec::new();
    for i in 1..=20 {
        let want = i.to_string();
        let put = direct.put("k", want.as_str(), None).await.expect("put");
        let rev = put.header().expect("header").revision();
        let d = until(&mut c, "k", ser(), "direct put", |r| {
            kvs(r).first().map(|kv| kv.1.as_str()) == Some(want.as_str())
        })
        .await;
        delays.push(d);
        // Once seen, never older again; a hit's revision covers the write.
        let r = sget(&mut c, "k", ser()).await;
        assert_eq!(kvs(&r)[0].1, want);
        assert!(revision(&r) >= rev, "{} < {rev}", revision(&r));
        // Let the new value be cached again, so that the next write has a stale entry to drop.
        warm(&mut c, &addr, "k", ser()).await;
    }
    delays.sort();
    println!(
        "direct write visible through the proxy: median {:?}, max {:?}",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    // Deletes too.
    direct.delete("k", None).await.expect("delete");
    until(&mut c, "k", ser(), "direct delete", |r| r.kvs().is_empty()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn open_ended_ranges_are_invalidated() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut direct = connect(&cluster.client_endpoints(), None).await;
    direct.put("a1", "foo", None).await.expect("put");
    let mut c = connect(std::slice::from_ref(&addr), None).await;
    // `get a --from-key` (range end "\0") and `get --prefix ""` (key "\0", range end "\0").
    let from_key = || ser().with_range(vec![0u8]);
    let all = || ser().with_range(vec![0u8]);
    let counted = || ser().with_range(vec![0u8]).with_count_only();
    let r = warm(&mut c, &addr, "a", from_key()).await;
    assert_eq!(kvs(&r).len(), 1);
    warm(&mut c, &addr, "\0", all()).await;
    warm(&mut c, &addr, "a", counted()).await;

    direct
        .put("a2", "bar", None)
        .await
        .expect("put above the start key");
    until(&mut c, "a", from_key(), "from-key", |r| kvs(r).len() == 2).await;
    until(&mut c, "\0", all(), "prefix of \"\"", |r| kvs(r).len() == 2).await;
    until(&mut c, "a", counted(), "count from-key", |r| r.count() == 2).await;
    // And again through the proxy itself (etcd's proxy missed even these).
    warm(&mut c, &addr, "a", from_key()).await;
    c.put("zz", "z", None).await.expect("put through the proxy");
    until(
        &mut c,
        "a",
        from_key(),
        "from-key after a proxied put",
        |r| kvs(r).len() == 3,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nested_txn_write_invalidates() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut c = connect(std::slice::from_ref(&addr), None).await;
    c.put("t", "old", None).await.expect("put");
    c.put("u", "1", None).await.expect("put");
    warm(&mut c, &addr, "t", ser()).await;
    warm(&mut c, &addr, "u", ser().with_prefix()).await;
    let inner = Txn::new().and_then(vec![TxnOp::put("t", "new", None), TxnOp::delete("u", None)]);
    let outer = Txn::new()
        .when(vec![Compare::version("t", CompareOp::Greater, 0)])
        .and_then(vec![TxnOp::txn(inner)]);
    let r = c.txn(outer).await.expect("nested txn");
    assert!(r.succeeded());
    until(&mut c, "t", ser(), "nested txn put", |r| {
        kvs(r).first().map(|kv| kv.1.as_str()) == Some("new")
    })
    .await;
    until(&mut c, "u", ser().with_prefix(), "nested txn delete", |r| {
        r.kvs().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_options_get_etcds_own_answers() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut direct = connect(&cluster.client_endpoints(), None).await;
    for (k, v) in [
        ("o/a", "3"),
        ("o/b", "1"),
        ("o/c", "2"),
        ("o/d", "5"),
        ("p", "x"),
    ] {
        direct.put(k, v, None).await.expect("put");
    }
    direct.put("o/b", "4", None).await.expect("put");
    let mut c = connect(std::slice::from_ref(&addr), None).await;
    let cases: Vec<(&str, GetOptions)> = vec![
        ("plain prefix", ser().with_prefix()),
        ("count only", ser().with_prefix().with_count_only()),
        ("keys only", ser().with_prefix().with_keys_only()),
        ("limit 2", ser().with_prefix().with_limit(2)),
        (
            "sort by key descending",
            ser()
                .with_prefix()
                .with_sort(SortTarget::Key, SortOrder::Descend),
        ),
        (
            "sort by value, limit 3",
            ser()
                .with_prefix()
                .with_sort(SortTarget::Value, SortOrder::Ascend)
                .with_limit(3),
        ),
        (
            "sort by mod revision descending",
            ser()
                .with_prefix()
                .with_sort(SortTarget::Mod, SortOrder::Descend),
        ),
        (
            "min mod revision",
            ser().with_prefix().with_min_mod_revision(5),
        ),
        (
            "max create revision",
            ser().with_prefix().with_max_create_revision(3),
        ),
        ("range [o/b, o/d)", ser().with_range("o/d")),
    ];
    for (what, opts) in cases {
        let key = if what.starts_with("range") {
            "o/b"
        } else {
            "o/"
        };
        let want = sget(&mut direct, key, opts.clone()).await;
        let missed = sget(&mut c, key, opts.clone()).await;
        let hit = warm(&mut c, &addr, key, opts.clone()).await;
        for (how, got) in [("miss", &missed), ("hit", &hit)] {
            assert_eq!(kvs(got), kvs(&want), "{what} ({how})");
            assert_eq!(got.count(), want.count(), "{what} ({how})");
            assert_eq!(got.more(), want.more(), "{what} ({how})");
            assert_eq!(revision(got), revision(&want), "{what} ({how})");
        }
    }
    // The keys-only answer really has no values, and the count-only one no kvs.
    let k = sget(&mut c, "o/", ser().with_prefix().with_keys_only()).await;
    assert!(k.kvs().iter().all(|kv| kv.value().is_empty()) && k.kvs().len() == 4);
    let n = sget(&mut c, "o/", ser().with_prefix().with_count_only()).await;
    assert!(n.kvs().is_empty() && n.count() == 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_keeps_working_after_compact() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut c = connect(std::slice::from_ref(&addr), None).await;
    let mut rev = 0;
    for i in 0..5 {
        let put = c.put("c", format!("v{i}"), None).await.expect("put");
        rev = put.header().expect("header").revision();
    }
    c.compact(rev, None)
        .await
        .expect("compact through the proxy");
    let r = warm(&mut c, &addr, "c", ser()).await;
    assert_eq!(kvs(&r)[0].1, "v4");
    let hits = proxy_metric(&addr, HITS);
    for _ in 0..5 {
        assert_eq!(kvs(&sget(&mut c, "c", ser()).await)[0].1, "v4");
    }
    assert_eq!(proxy_metric(&addr, HITS), hits + 5.0);
    let mut direct = connect(&cluster.client_endpoints(), None).await;
    direct.put("c", "after", None).await.expect("put");
    until(&mut c, "c", ser(), "put after compact", |r| {
        kvs(r).first().map(|kv| kv.1.as_str()) == Some("after")
    })
    .await;
    // A read at a compacted revision is etcd's error, not a cached answer.
    let old = c
        .get("c", Some(ser().with_revision(rev - 2)))
        .await
        .expect_err("compacted revision");
    assert!(old.to_string().contains("compacted"), "{old}");
}

/// Users for the auth tests: `root`, and `alice` who may read only `a/`.
fn add_users(cluster: &Cluster) {
    for args in [
        &["role", "add", "root"][..],
        &["user", "add", "root:rootpw"],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "a-r"],
        &[
            "role",
            "grant-permission",
            "a-r",
            "read",
            "a/",
            "--prefix=true",
        ],
        &["user", "add", "alice:alicepw"],
        &["user", "grant-role", "alice", "a-r"],
    ] {
        common::ok(cluster.etcdctl(args));
    }
}

/// The gRPC code and message of a failed call.
fn refusal<T: std::fmt::Debug>(r: Result<T, etcd_client::Error>) -> (tonic::Code, String) {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_auth_on_no_identity_sees_anothers_data() {
    let cluster = Cluster::start(1).await;
    common::ok(cluster.etcdctl(&["put", "secret", "s3cr3t"]));
    add_users(&cluster);
    common::ok(cluster.etcdctl(&["auth", "enable"]));
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let at_proxy = std::slice::from_ref(&addr);
    let etcd = cluster.client_endpoints();

    let mut root = connect(at_proxy, Some(("root", "rootpw"))).await;
    for _ in 0..5 {
        assert_eq!(svalue(&mut root, "secret").await.as_deref(), Some("s3cr3t"));
    }
    let mut alice = connect(at_proxy, Some(("alice", "alicepw"))).await;
    let mut alice_direct = connect(&etcd, Some(("alice", "alicepw"))).await;
    let want = refusal(alice_direct.get("secret", Some(ser())).await);
    assert_eq!(want.0, tonic::Code::PermissionDenied);
    let mut anonymous = connect(at_proxy, None).await;
    let mut anonymous_direct = connect(&etcd, None).await;
    let want_anonymous = refusal(anonymous_direct.get("secret", Some(ser())).await);
    for _ in 0..5 {
        assert_eq!(refusal(alice.get("secret", Some(ser())).await), want);
        assert_eq!(
            refusal(anonymous.get("secret", Some(ser())).await),
            want_anonymous
        );
    }
    // The cache does not work at all with auth on: its watch carries no credentials.
    assert_eq!(proxy_metric(&addr, HITS), 0.0);
    assert_eq!(proxy_metric(&addr, KEYS), 0.0);
}

/// A 1-member etcd with `secret` and the users, auth still off; a proxy; an anonymous client
/// of the proxy whose serializable read of `secret` is cached.
async fn warm_secret() -> (Cluster, common::ProxyProcess, String, Client) {
    let cluster = Cluster::start(1).await;
    common::ok(cluster.etcdctl(&["put", "secret", "s3cr3t"]));
    add_users(&cluster);
    let (p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut anonymous = connect(std::slice::from_ref(&addr), None).await;
    warm(&mut anonymous, &addr, "secret", ser()).await;
    (cluster, p, addr, anonymous)
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_enabled_directly_on_etcd_stops_the_cache() {
    let (cluster, _p, _addr, mut anonymous) = warm_secret().await;

    common::ok(cluster.etcdctl(&["auth", "enable"]));
    let mut anonymous_direct = connect(&cluster.client_endpoints(), None).await;
    let want = refusal(anonymous_direct.get("secret", Some(ser())).await);
    let start = Instant::now();
    loop {
        match anonymous.get("secret", Some(ser())).await {
            Ok(r) => {
                assert_eq!(kvs(&r)[0].1, "s3cr3t");
                assert!(
                    start.elapsed() < VISIBLE_WITHIN,
                    "cached data still served {VISIBLE_WITHIN:?} after auth enable"
                );
            }
            Err(e) => {
                assert_eq!(refusal::<()>(Err(e)), want);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "auth enabled behind the proxy: refused after {:?}",
        start.elapsed()
    );
    for _ in 0..10 {
        assert_eq!(refusal(anonymous.get("secret", Some(ser())).await), want);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_enable_through_the_proxy_stops_the_cache_at_once() {
    let (cluster, _p, addr, mut anonymous) = warm_secret().await;
    anonymous.auth_enable().await.expect("auth enable");
    let mut anonymous_direct = connect(&cluster.client_endpoints(), None).await;
    let want = refusal(anonymous_direct.get("secret", Some(ser())).await);
    for _ in 0..10 {
        assert_eq!(refusal(anonymous.get("secret", Some(ser())).await), want);
    }
    assert_eq!(proxy_metric(&addr, KEYS), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_entry_bound_holds() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &["--range-cache-max-entries=3"]);
    let mut c = connect(std::slice::from_ref(&addr), None).await;
    for i in 0..10 {
        c.put(format!("l{i}"), i.to_string(), None)
            .await
            .expect("put");
    }
    warm(&mut c, &addr, "l0", ser()).await;
    let mut max = 0.0f64;
    for round in 0..2 {
        for i in 0..10 {
            let v = svalue(&mut c, &format!("l{i}")).await;
            assert_eq!(v, Some(i.to_string()), "round {round}");
            max = max.max(proxy_metric(&addr, KEYS));
        }
    }
    assert!(max <= 3.0, "the keys gauge reached {max}");
    assert_eq!(proxy_metric(&addr, KEYS), 3.0);
    // The most recent entries are the ones kept.
    let hits = proxy_metric(&addr, HITS);
    for i in 7..10 {
        assert_eq!(svalue(&mut c, &format!("l{i}")).await, Some(i.to_string()));
    }
    assert_eq!(proxy_metric(&addr, HITS), hits + 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn disable_range_cache_sends_every_read_to_etcd() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &["--disable-range-cache"]);
    let mut c = connect(std::slice::from_ref(&addr), None).await;
    c.put("d", "1", None).await.expect("put");
    let ranges = etcd_ranges(&cluster).await;
    for _ in 0..10 {
        assert_eq!(svalue(&mut c, "d").await.as_deref(), Some("1"));
    }
    assert!(etcd_ranges(&cluster).await >= ranges + 10.0);
    assert_eq!(proxy_metric(&addr, HITS), 0.0);
    assert_eq!(proxy_metric(&addr, MISSES), 0.0);
    assert_eq!(proxy_metric(&addr, KEYS), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_is_cached_in_the_clients_form() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &["--namespace=/ns/"]);
    let mut direct = connect(&cluster.client_endpoints(), None).await;
    direct.put("/ns/k", "1", None).await.expect("put");
    direct.put("k", "outside", None).await.expect("put");
    let mut c = connect(std::slice::from_ref(&addr), None).await;
    let r = warm(&mut c, &addr, "k", ser()).await;
    assert_eq!(kvs(&r)[0].0, "k");
    assert_eq!(kvs(&r)[0].1, "1");
    let from_key = || ser().with_range(vec![0u8]);
    let r = warm(&mut c, &addr, "\0", from_key()).await;
    assert_eq!(kvs(&r).len(), 1);
    direct.put("/ns/k", "2", None).await.expect("put");
    direct.put("/ns/z", "3", None).await.expect("put");
    until(&mut c, "k", ser(), "namespaced put", |r| {
        kvs(r).first().map(|kv| (kv.0.as_str(), kv.1.as_str())) == Some(("k", "2"))
    })
    .await;
    until(&mut c, "\0", from_key(), "namespaced from-key", |r| {
        kvs(r).iter().map(|kv| kv.0.as_str()).collect::<Vec<_>>() == ["k", "z"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_member_of_the_watch_leaves_no_stale_answer() {
    let mut cluster = Cluster::start(3).await;
    // The proxy knows the followers only, so its watch is on a follower and freezing it does
    // not hold up the write below with an election.
    let leader = cluster.leader().await.expect("a leader");
    let followers: Vec<String> = (0..cluster.len())
        .filter(|&i| i != leader)
        .map(|i| cluster.member(i).client_url())
        .collect();
    let (p, addr) = common::start_grpc_proxy_at(&followers, &[]);
    let mut c = connect(std::slice::from_ref(&addr), None).await;
    let mut direct = connect(&[cluster.member(leader).client_endpoint()], None).await;
    direct.put("w", "before", None).await.expect("put");
    warm(&mut c, &addr, "w", ser()).await;
    // The cache's watch is the only stream this proxy holds. Its member is frozen first, so
    // that the write below is certainly never reported by it, and killed later.
    let victim = common::member_with_streams(&cluster, "Watch").await;
    assert_ne!(victim, leader);
    cluster.pause(victim);
    let deadline = Instant::now() + Duration::from_secs(20);
    let written = loop {
        match direct.put("w", "after", None).await {
            Ok(r) => break r.header().expect("header").revision(),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no write while a member is frozen: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // While the member is frozen (its connections open, its watch silent), the write shows
    // once the silent watch is given up: hits stop after 1.5 s without news. A miss may be sent
    // to the frozen member until its health probe fails (as any read through the proxy), so a
    // read that hangs is given up after a while and the next one goes to another member.
    let start = Instant::now();
    loop {
        let read = tokio::time::timeout(Duration::from_millis(500), c.get("w", Some(ser())));
        match read.await {
            Ok(Ok(r)) if kvs(&r)[0].1 == "after" => break,
            Ok(_) | Err(_) => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still the old value 10 s after the write, its member frozen:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "write made while the watch's member was frozen: visible after {:?}",
        start.elapsed()
    );
    cluster.kill(victim);
    for _ in 0..20 {
        let r = sget(&mut c, "w", ser()).await;
        assert_eq!(kvs(&r)[0].1, "after");
        assert!(revision(&r) >= written);
    }
    // A new watch on a surviving member: the cache serves again.
    let r = warm(&mut c, &addr, "w", ser()).await;
    assert_eq!(kvs(&r)[0].1, "after");
}
