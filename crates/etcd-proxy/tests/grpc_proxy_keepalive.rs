//! Lease keep-alive coalescing in `etcd-proxy grpc-proxy start`, against a real 3-member etcd:
//! many clients' keep-alive streams cost the cluster one stream (read from etcd's own
//! `grpc_server_started_total`), every keep-alive gets etcd's answer (the real TTL, 0 for a
//! lease that does not exist), a lease expires on time once its clients stop, the shared stream
//! survives the death of its member, and half-close ends a client's stream as etcd does.

mod common;

use std::time::{Duration, Instant};

use common::start_grpc_proxy;
use etcd_api::etcdserverpb::lease_client::LeaseClient;
use etcd_api::etcdserverpb::{LeaseKeepAliveRequest, LeaseKeepAliveResponse};
use etcd_client::Client;
use testkit::Cluster;
use tonic::transport::Channel;

const CLIENTS: usize = 12;

async fn connect(endpoints: &[String]) -> Client {
    common::etcd_client(endpoints).await
}

/// LeaseKeepAlive streams member `i` has started, from etcd's own gRPC metrics.
async fn keepalive_streams_started(cluster: &Cluster, i: usize) -> f64 {
    cluster
        .metrics_text(i)
        .await
        .lines()
        .filter(|l| {
            l.starts_with("grpc_server_started_total{")
                && l.contains(r#"grpc_method="LeaseKeepAlive""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One keep-alive on an `etcd-client` stream, and its answer within 5 s.
async fn keep_alive_once(
    keeper: &mut etcd_client::LeaseKeeper,
    stream: &mut etcd_client::LeaseKeepAliveStream,
) -> etcd_client::LeaseKeepAliveResponse {
    keeper.keep_alive().await.expect("send");
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("answered in time")
        .expect("stream")
        .expect("open")
}

/// One keep-alive on a raw tonic stream that is half-closed after it: the answers and the
/// final status, as the client sees them.
async fn keepalive_then_half_close(
    addr: &str,
    id: i64,
) -> (Vec<LeaseKeepAliveResponse>, tonic::Code) {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let requests = futures::stream::iter([LeaseKeepAliveRequest { id }]);
    let mut stream = LeaseClient::new(channel)
        .lease_keep_alive(requests)
        .await
        .expect("keep-alive call")
        .into_inner();
    let mut answers = Vec::new();
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream ends within 10 s")
        {
            Ok(Some(mut m)) => {
                // The member that answered may differ between the two runs.
                if let Some(h) = &mut m.header {
                    h.member_id = 0;
                    h.raft_term = 0;
                    h.revision = 0;
                }
                answers.push(m);
            }
            Ok(None) => break tonic::Code::Ok,
            Err(s) => break s.code(),
        }
    };
    (answers, code)
}

#[tokio::test(flavor = "multi_thread")]
async fn keepalives_share_one_upstream_stream_and_keep_etcds_answers() {
    let mut cluster = Cluster::start(3).await;
    let (p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut direct = connect(&cluster.client_endpoints()).await;
    let before: Vec<f64> = {
        let mut v = Vec::new();
        for i in 0..cluster.len() {
            v.push(keepalive_streams_started(&cluster, i).await);
        }
        v
    };

    // CLIENTS clients, each with its own connection and its own keep-alive stream; half of
    // them on one shared lease, the others on a lease each.
    let shared = direct.lease_grant(5, None).await.expect("grant").id();
    let mut leases = Vec::new();
    let mut keepers = Vec::new();
    for n in 0..CLIENTS {
        let id = if n % 2 == 0 {
            shared
        } else {
            direct.lease_grant(5, None).await.expect("grant").id()
        };
        leases.push(id);
        let mut c = connect(std::slice::from_ref(&addr)).await;
        keepers.push(c.lease_keep_alive(id).await.expect("keep-alive stream"));
    }
    for ((keeper, stream), &id) in keepers.iter_mut().zip(&leases) {
        let answer = keep_alive_once(keeper, stream).await;
        assert_eq!(answer.id(), id);
        assert!(answer.ttl() > 0 && answer.ttl() <= 5, "{answer:?}");
    }
    // Latency (etcd bug: its proxy answers from a renew loop, 0.5 s to TTL/3 late): each answer
    // is etcd's, so a round trip costs about what it costs directly. The median of 20 is bounded
    // well below etcd's proxy's half second, loosely enough for a loaded machine.
    let (keeper, stream) = &mut keepers[1];
    let mut rtts = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let answer = keep_alive_once(keeper, stream).await;
        assert_eq!(
            answer.ttl(),
            5,
            "etcd's answer carries the granted TTL: {answer:?}"
        );
        rtts.push(t.elapsed());
    }
    rtts.sort();
    eprintln!(
        "keep-alive round trips: median {:?}, max {:?}",
        rtts[10], rtts[19]
    );
    assert!(
        rtts[10] < Duration::from_millis(250),
        "keep-alive answers are late: {rtts:?}"
    );
    // One upstream stream for all of them.
    let mut holder = None;
    let mut started = 0.0;
    for (i, b) in before.iter().enumerate() {
        let delta = keepalive_streams_started(&cluster, i).await - b;
        if delta > 0.0 {
            holder = Some(i);
        }
        started += delta;
    }
    assert_eq!(
        started, 1.0,
        "LeaseKeepAlive streams opened on etcd for {CLIENTS} clients"
    );
    let holder = holder.expect("a member holds the stream");

    // Half-close: the answer, then the end of the stream, as etcd does it.
    let direct_addr = cluster.member(holder).client_endpoint();
    let through = keepalive_then_half_close(&addr, shared).await;
    let straight = keepalive_then_half_close(&direct_addr, shared).await;
    assert_eq!(through, straight, "through the proxy vs directly");
    assert_eq!(through.0.len(), 1);
    // A lease that does not exist: etcd's TTL 0 (etcd's proxy says -1).
    let missing = 0x7e57_0001;
    let through = keepalive_then_half_close(&addr, missing).await;
    assert_eq!(
        through,
        keepalive_then_half_close(&direct_addr, missing).await
    );
    assert_eq!((through.0[0].id, through.0[0].ttl), (missing, 0));

    // Kill the member holding the shared stream: keep-alives go on being answered.
    cluster.kill(holder);
    let killed = Instant::now();
    for round in 0..3 {
        for ((keeper, stream), &id) in keepers.iter_mut().zip(&leases) {
            keeper.keep_alive().await.expect("send");
            let answer = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .unwrap_or_else(|_| {
                    panic!("round {round}: no answer for lease {id:x}\n{}", p.log())
                })
                .expect("stream")
                .expect("open");
            assert!(answer.ttl() > 0, "round {round}: {answer:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "keep-alives answered across the kill in {:?}",
        killed.elapsed()
    );
    assert!(
        !p.log_entries("moving the lease keep-alive stream to another etcd member")
            .is_empty(),
        "{}",
        p.log()
    );
    let moved = common::proxy_metric(
        &addr,
        r#"etcd_grpc_proxy_streams_moved_total{grpc_method="/etcdserverpb.Lease/LeaseKeepAlive"}"#,
    );
    assert!(moved >= 1.0, "{moved}");

    // The clients stop: every lease expires about its TTL after its last keep-alive (the proxy
    // keeps nothing alive on its own).
    let survivors: Vec<String> = (0..cluster.len())
        .filter(|&i| i != holder)
        .map(|i| cluster.member(i).client_endpoint())
        .collect();
    let mut direct = connect(&survivors).await;
    drop(keepers);
    let stopped = Instant::now();
    for &id in &leases {
        loop {
            let ttl = direct
                .lease_time_to_live(id, None)
                .await
                .expect("ttl")
                .ttl();
            if ttl == -1 {
                break;
            }
            assert!(
                stopped.elapsed() < Duration::from_secs(5 + 4),
                "lease {id:x} still alive (TTL {ttl}) {:?} after its clients stopped",
                stopped.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    eprintln!(
        "leases expired {:?} after their clients stopped",
        stopped.elapsed()
    );
}

/// Bad input on a keep-alive stream gets grpc-go's code and a clear message, and the proxy goes
/// on serving.
#[tokio::test(flavor = "multi_thread")]
async fn bad_keepalive_messages_get_grpc_codes() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    const PATH: &str = "/etcdserverpb.Lease/LeaseKeepAlive";
    let mut over_limit = vec![0u8];
    over_limit.extend_from_slice(&(5u32 << 20).to_be_bytes());
    for (what, body, code, message) in [
        // Field 1 (ID) with a varint cut short.
        (
            "undecodable",
            vec![0, 0, 0, 0, 2, 0x08, 0x80],
            "13",
            "error unmarshalling request",
        ),
        ("compressed", vec![1, 0, 0, 0, 0], "12", "compressed"),
        ("over 4 MiB", over_limit, "8", "larger than max"),
        (
            "truncated",
            vec![0, 0, 0, 0, 9, 8],
            "13",
            "ended in the middle",
        ),
    ] {
        let (got_code, got_message) = common::raw_call(&addr, PATH, &body, false).await;
        assert_eq!(got_code, code, "{what}: {got_message}");
        assert!(got_message.contains(message), "{what}: {got_message}");
    }
    // Still serving: a keep-alive of a missing lease gets etcd's TTL 0.
    let (answers, code) = keepalive_then_half_close(&addr, 0x7e57_0002).await;
    assert_eq!(
        (answers.len(), answers[0].ttl, code),
        (1, 0, tonic::Code::Ok)
    );
}
