//! Long streams through `etcd-proxy grpc-proxy start` when the member serving them dies: watch
//! and election observe streams move to another member, and the client sees one unbroken
//! stream: every event exactly once and in order, the new leader observed once; lease
//! keep-alives go on being answered. Real 3-member etcd, the Rust `etcd-client` crate as the client.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::start_grpc_proxy;
use etcd_client::{Client, GetOptions, WatchOptions, WatchStream};
use testkit::Cluster;

/// Streams of each kind opened through the proxy, one after the other. The watch streams share
/// one upstream stream, whose member is the one killed; the proxy gives consecutive observe
/// calls to consecutive members, so with 3 members one observer is on it too.
const STREAMS: usize = 3;
/// Keys written, half before the kill and half after.
const WRITES: usize = 40;

async fn connect(endpoints: &[String]) -> Client {
    common::etcd_client(endpoints).await
}

/// The member to kill or stop: the one holding the proxy's shared upstream watch stream; and a
/// client of the other members (writes go straight to them; only the streams under test use
/// the proxy).
async fn victim_and_survivors(cluster: &Cluster) -> (usize, Client) {
    let victim = common::member_with_streams(cluster, "Watch").await;
    // Writes must go on while the victim is gone: it must be a follower.
    if cluster.leader().await == Some(victim) {
        let target = (victim + 1) % cluster.len();
        let status = cluster.etcdctl_at(
            &cluster.member(target).client_endpoint(),
            &["endpoint", "status", "-w", "json"],
        );
        let json: serde_json::Value =
            serde_json::from_slice(&status.stdout).expect("endpoint status json");
        let id = json[0]["Status"]["header"]["member_id"]
            .as_u64()
            .expect("member_id");
        let moved = cluster.etcdctl_at(
            &cluster.member(victim).client_endpoint(),
            &["move-leader", &format!("{id:x}")],
        );
        assert!(moved.status.success(), "move-leader: {moved:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while cluster.leader().await == Some(victim) {
            assert!(Instant::now() < deadline, "leadership did not move");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let survivors: Vec<String> = (0..cluster.len())
        .filter(|&i| i != victim)
        .map(|i| cluster.member(i).client_endpoint())
        .collect();
    (victim, connect(&survivors).await)
}

/// A client of every member, for the set-up before the victim is known.
async fn everyone(cluster: &Cluster) -> Client {
    let all: Vec<String> = (0..cluster.len())
        .map(|i| cluster.member(i).client_endpoint())
        .collect();
    connect(&all).await
}

/// Reads `stream` until it has seen `want` events, or fails after 30 s; returns the events'
/// (key, mod_revision, prev_kv value) in the order they came.
async fn collect_events(
    stream: &mut WatchStream,
    want: usize,
) -> Vec<(String, i64, Option<String>)> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!("only {} of {want} events within 30 s: {seen:?}", seen.len())
            })
            .expect("watch stream error")
            .expect("watch stream ended");
        assert!(!msg.canceled(), "watch canceled: {}", msg.cancel_reason());
        for e in msg.events() {
            let kv = e.kv().expect("event kv");
            seen.push((
                kv.key_str().expect("utf-8 key").to_string(),
                kv.mod_revision(),
                e.prev_kv()
                    .map(|p| p.value_str().expect("utf-8").to_string()),
            ));
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_move_to_another_member_without_losing_or_repeating_anything() {
    let mut cluster = Cluster::start(3).await;
    let (p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut direct = everyone(&cluster).await;
    let mut proxied = connect(std::slice::from_ref(&addr)).await;

    // Each key is first written before the streams exist, so prev_kv is known for every event.
    for i in 0..WRITES {
        direct
            .put(format!("ev/{i:02}"), "old", None)
            .await
            .expect("put");
    }
    let from = direct
        .get(
            "ev/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision()
        + 1;

    let mut leases = Vec::new();
    for _ in 0..STREAMS {
        leases.push(direct.lease_grant(4, None).await.expect("grant").id());
    }
    let campaign = direct
        .campaign("ballot", "first", leases[0])
        .await
        .expect("campaign");
    let leader_key = campaign.leader().expect("leader key").clone();

    // The streams, consecutively through the proxy.
    let mut watches = Vec::new();
    for _ in 0..STREAMS {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_prev_key();
        watches.push(proxied.watch("ev/", Some(opts)).await.expect("watch"));
    }
    let mut keepers = Vec::new();
    for &id in &leases {
        keepers.push(proxied.lease_keep_alive(id).await.expect("keep-alive"));
    }
    let mut observers = Vec::new();
    for _ in 0..STREAMS {
        observers.push(proxied.observe("ballot").await.expect("observe"));
    }
    let (victim, mut direct) = victim_and_survivors(&cluster).await;

    // Keep the leases alive through the proxy every second from now on, counting answers
    // with a TTL after the kill.
    let killed_at = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut keep_tasks = Vec::new();
    for (mut keeper, mut stream) in keepers {
        let killed_at = killed_at.clone();
        keep_tasks.push(tokio::spawn(async move {
            let mut after_kill = 0;
            let end = Instant::now() + Duration::from_secs(14);
            while Instant::now() < end {
                keeper.keep_alive().await.expect("send keep-alive");
                let resp = tokio::time::timeout(Duration::from_secs(3), stream.message())
                    .await
                    .expect("keep-alive answered within 3 s")
                    .expect("keep-alive stream error")
                    .expect("keep-alive stream ended");
                assert!(resp.ttl() > 0, "lease {} expired: {resp:?}", keeper.id());
                if killed_at
                    .get()
                    .is_some_and(|t| t.elapsed() > Duration::from_secs(1))
                {
                    after_kill += 1;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            after_kill
        }));
    }

    // Half the writes, the kill, the other half.
    let mut written = BTreeMap::new();
    for i in 0..WRITES {
        if i == WRITES / 2 {
            cluster.kill(victim);
            let _ = killed_at.set(Instant::now());
        }
        let key = format!("ev/{i:02}");
        let resp = direct.put(key.as_str(), "new", None).await.expect("put");
        written.insert(key, resp.header().expect("header").revision());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let expected: Vec<(String, i64, Option<String>)> = {
        let mut v: Vec<_> = written
            .iter()
            .map(|(k, &r)| (k.clone(), r, Some("old".to_string())))
            .collect();
        v.sort_by_key(|e| e.1);
        v
    };
    for (n, w) in watches.iter_mut().enumerate() {
        let got = collect_events(w, WRITES).await;
        assert_eq!(
            got, expected,
            "watch stream {n}: every event exactly once, in order"
        );
    }

    // A new leader value after the kill reaches every observer once, right after the first.
    direct
        .proclaim(
            "second",
            Some(etcd_client::ProclaimOptions::new().with_leader(leader_key)),
        )
        .await
        .expect("proclaim");
    for (n, o) in observers.iter_mut().enumerate() {
        let mut values = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while values.last().map(String::as_str) != Some("second") {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, o.message())
                .await
                .unwrap_or_else(|_| panic!("observer {n} saw only {values:?}"))
                .expect("observe error")
                .expect("observe ended");
            values.push(
                msg.kv()
                    .expect("leader kv")
                    .value_str()
                    .expect("utf-8")
                    .to_string(),
            );
        }
        assert_eq!(values, ["first", "second"], "observer {n}");
    }

    for t in keep_tasks {
        let after_kill = t.await.expect("keep-alive task");
        assert!(
            after_kill >= 5,
            "only {after_kill} keep-alives answered after the kill"
        );
    }
    for &id in &leases {
        let ttl = direct
            .lease_time_to_live(id, None)
            .await
            .expect("ttl")
            .ttl();
        assert!(
            ttl > 0,
            "lease {id:x} kept alive through the proxy has expired"
        );
    }
    // The keep-alives share one upstream stream, which may or may not have been on the killed
    // member (grpc_proxy_keepalive.rs kills the one it is on); watches and observers were.
    let moves = p.log_entries("moving a stream to another etcd member");
    let paths: Vec<&str> = moves.iter().filter_map(|e| e["method"].as_str()).collect();
    for path in [
        "/etcdserverpb.Watch/Watch",
        "/v3electionpb.Election/Observe",
    ] {
        assert!(
            paths.contains(&path),
            "no {path} stream moved: {moves:?}\n{}",
            p.log()
        );
    }
}

/// A member stopped with SIGSTOP keeps its connections and streams open but never answers: the
/// proxy's health probe notices, and the watch streams it served move to another member.
#[tokio::test(flavor = "multi_thread")]
async fn watches_leave_a_member_that_stops_answering() {
    let cluster = Cluster::start(3).await;
    let (p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut direct = everyone(&cluster).await;
    let mut proxied = connect(std::slice::from_ref(&addr)).await;

    let from = direct
        .put("stop/0", "before", None)
        .await
        .expect("put")
        .header()
        .expect("header")
        .revision();
    let mut watches = Vec::new();
    for _ in 0..STREAMS {
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        watches.push(proxied.watch("stop/", Some(opts)).await.expect("watch"));
    }
    for w in &mut watches {
        assert_eq!(collect_events(w, 1).await[0].1, from);
    }
    let (victim, mut direct) = victim_and_survivors(&cluster).await;

    cluster.pause(victim);
    let mut expected = Vec::new();
    for i in 1..=5 {
        let key = format!("stop/{i}");
        let rev = direct
            .put(key.as_str(), "after", None)
            .await
            .expect("put")
            .header()
            .expect("header")
            .revision();
        expected.push((key, rev, None));
    }
    let started = Instant::now();
    for (n, w) in watches.iter_mut().enumerate() {
        let got = collect_events(w, expected.len()).await;
        assert_eq!(got, expected, "watch stream {n}");
    }
    eprintln!(
        "events of the stopped member's stream arrived after {:?}",
        started.elapsed()
    );
    cluster.resume(victim);
    let moves = p.log_entries("moving a stream to another etcd member");
    assert!(
        moves
            .iter()
            .any(|e| e["reason"] == "the member failed its health probe"),
        "{moves:?}\n{}",
        p.log()
    );
}

/// Opens a watch on `key` at `addr` with etcd's require-leader metadata (`hasleader`), and
/// returns the status the stream ends with, or `None` if it is still open after 20 s.
async fn watch_requiring_a_leader(addr: &str) -> Option<(tonic::Code, String)> {
    use etcd_api::etcdserverpb::watch_client::WatchClient;
    use etcd_api::etcdserverpb::watch_request::RequestUnion;
    use etcd_api::etcdserverpb::{WatchCreateRequest, WatchRequest};
    use futures::StreamExt as _;

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: bytes::Bytes::from_static(b"k"),
            ..Default::default()
        })),
    };
    // One request, and the stream kept open from our side.
    let requests = futures::stream::iter([create]).chain(futures::stream::pending());
    let mut req = tonic::Request::new(requests);
    req.metadata_mut()
        .insert("hasleader", "true".parse().expect("metadata"));
    let run = async {
        match WatchClient::new(channel).watch(req).await {
            Err(s) => (s.code(), s.message().to_string()),
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => return (tonic::Code::Ok, "ended".to_string()),
                        Err(s) => return (s.code(), s.message().to_string()),
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .ok()
}

/// With `hasleader`, etcd refuses a watch when its member has no leader; when no member has
/// one, the client gets etcd's answer promptly (the proxy does not keep moving the stream).
#[tokio::test(flavor = "multi_thread")]
async fn require_leader_watch_gets_etcds_no_leader_answer() {
    let mut cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    // With a leader, the watch stays open.
    assert_eq!(watch_requiring_a_leader_briefly(&addr).await, None);

    // Two of three members gone: the survivor has no leader once its election timeout passes.
    cluster.kill(1);
    cluster.kill(2);
    let survivor = cluster.member(0).client_endpoint();
    let deadline = Instant::now() + Duration::from_secs(30);
    let direct = loop {
        if let Some(status) = watch_requiring_a_leader(&survivor).await {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the survivor never lost its leader"
        );
    };
    assert_eq!(
        direct,
        (
            tonic::Code::Unavailable,
            "etcdserver: no leader".to_string()
        )
    );

    let started = Instant::now();
    let proxied = watch_requiring_a_leader(&addr).await;
    assert_eq!(proxied, Some(direct), "through the proxy vs directly");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "etcd's answer took {:?} to reach the client",
        started.elapsed()
    );
}

/// [`watch_requiring_a_leader`] given 2 s: `None` when the stream is still open then.
async fn watch_requiring_a_leader_briefly(addr: &str) -> Option<(tonic::Code, String)> {
    tokio::time::timeout(Duration::from_secs(2), watch_requiring_a_leader(addr))
        .await
        .ok()
        .flatten()
}
