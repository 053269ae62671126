//! `--experimental-serializable-ordering` against a real lagging member.
//!
//! A member is made to lag deterministically by a network partition of its raft traffic, while
//! its client port keeps serving serializable reads from its stale state. The cluster is started
//! here (not by the test kit) so that every member's advertised peer URL is a relay of this
//! test: raft messages between two members always travel over a TCP connection to one of those
//! relays, and every rafthttp request names its sender in `X-Server-From`. Isolating a member
//! closes every relayed connection and from then on refuses the ones to it or from it, so after
//! the partition it cannot learn of a write made through the others, however long the test takes.
//!
//! Phases: on the healthy cluster, every serializable read through a flagged proxy sees the
//! write made just before through it. Then, one follower cut off and the key written on: without
//! the flag, serializable reads through the proxy go back in revision (round-robin reaches the
//! lagging member after a fresh one); with it, they never do, also for a serializable Txn and
//! under `--namespace`. Last, when every member the proxy knows is behind, the read is made
//! linearizable and answered fresh once the lagging member can catch up.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{ProxyProcess, free_port};
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::maintenance_client::MaintenanceClient;
use etcd_api::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest, request_op,
    response_op,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tonic::transport::Channel;

/// Which member is cut off, by index and raft member ID; `None` while the network is whole.
#[derive(Default)]
struct Partition {
    isolated: Option<(usize, u64)>,
    /// Every relayed connection, so that the partition can close them.
    conns: Vec<AbortHandle>,
}

/// The relays in front of every member's peer port.
#[derive(Clone, Default)]
struct Network(Arc<Mutex<Partition>>);

impl Network {
    /// Cuts member `index` (raft ID `id`) off from the others, both ways, from now on.
    fn isolate(&self, index: usize, id: u64) {
        let mut p = self.0.lock().unwrap();
        p.isolated = Some((index, id));
        // Existing connections may carry anything; the members dial again at once and each new
        // connection is judged by its first request.
        for conn in p.conns.drain(..) {
            conn.abort();
        }
    }

    /// Makes the network whole again.
    fn heal(&self) {
        self.0.lock().unwrap().isolated = None;
    }

    /// Relays `listener` (member `index`'s advertised peer URL) to its real peer port.
    fn relay(&self, index: usize, listener: TcpListener, to: u16) {
        let net = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let net2 = net.clone();
                let task = tokio::spawn(async move { net2.serve(index, conn, to).await });
                let mut p = net.0.lock().unwrap();
                p.conns.retain(|c| !c.is_finished());
                p.conns.push(task.abort_handle());
            }
        });
    }

    async fn serve(&self, index: usize, mut conn: TcpStream, to: u16) {
        // The head of the first request: rafthttp's requests all carry X-Server-From.
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
            match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
        let from = String::from_utf8_lossy(&head).lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("x-server-from")
                .then(|| u64::from_str_radix(value.trim(), 16).ok())?
        });
        let allowed = match self.0.lock().unwrap().isolated {
            None => true,
            // Requests without a sender (probes, version checks) are refused too while the
            // network is cut: one of them may share its connection with raft messages later.
            Some((cut, id)) => cut != index && from.is_some_and(|f| f != id),
        };
        if !allowed {
            return;
        }
        let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", to)).await else {
            return;
        };
        if upstream.write_all(&head).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
    }
}

/// One etcd member of the test's cluster.
struct Member {
    child: Child,
    client: u16,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Member {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.client)
    }
}

/// Three members whose peer traffic goes through `net`'s relays.
async fn start_cluster(net: &Network, dir: &Path) -> Vec<Member> {
    let n = 3;
    let mut relays = Vec::new();
    for _ in 0..n {
        relays.push(
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a relay"),
        );
    }
    let relay_ports: Vec<u16> = relays
        .iter()
        .map(|l| l.local_addr().expect("relay address").port())
        .collect();
    let initial = (0..n)
        .map(|i| format!("m{i}=http://127.0.0.1:{}", relay_ports[i]))
        .collect::<Vec<_>>()
        .join(",");
    let token = format!("ordering-{}", std::process::id());
    let mut members = Vec::new();
    for (i, relay) in relays.into_iter().enumerate() {
        let (client, peer) = (free_port(), free_port());
        net.relay(i, relay, peer);
        let log = std::fs::File::create(dir.join(format!("m{i}.log"))).expect("create log");
        let child = Command::new(testkit::etcd_path())
            .arg(format!("--name=m{i}"))
            .arg(format!(
                "--data-dir={}",
                dir.join(format!("m{i}")).display()
            ))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                relay_ports[i]
            ))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={token}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        members.push(Member { child, client });
    }
    members
}

async fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// `(member ID, leader ID)` of the member at `addr`, once it has a leader.
async fn status(addr: &str) -> Option<(u64, u64)> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    let mut m = MaintenanceClient::new(channel);
    let s = m.status(StatusRequest {}).await.ok()?.into_inner();
    let id = s.header?.member_id;
    (s.leader != 0).then_some((id, s.leader))
}

fn range(key: &str, serializable: bool) -> RangeRequest {
    RangeRequest {
        key: Bytes::from(key.to_string()),
        serializable,
        ..Default::default()
    }
}

/// A serializable get of `key` at `channel`: (header revision, value).
async fn sget(channel: &Channel, key: &str) -> (i64, String) {
    let resp = KvClient::new(channel.clone())
        .range(range(key, true))
        .await
        .unwrap_or_else(|e| panic!("serializable get {key}: {e}"))
        .into_inner();
    let value = resp
        .kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_default();
    (resp.header.expect("a header").revision, value)
}

/// A Txn of one serializable get of `key`: (header revision, value).
async fn stxn(channel: &Channel, key: &str) -> (i64, String) {
    let resp = KvClient::new(channel.clone())
        .txn(TxnRequest {
            compare: vec![],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(range(key, true))),
            }],
            failure: vec![],
        })
        .await
        .unwrap_or_else(|e| panic!("serializable txn {key}: {e}"))
        .into_inner();
    let value = match resp.responses.first().and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(r)) => r
            .kvs
            .first()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default(),
        other => panic!("a range answer, not {other:?}"),
    };
    (resp.header.expect("a header").revision, value)
}

/// A put of `key`: its revision. Tried again for a while: on two busy cores a leader election
/// can fail a write (the value is the same each time, so a repeat only adds a revision).
async fn put(channel: &Channel, key: &str, value: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent = KvClient::new(channel.clone())
            .put(PutRequest {
                key: Bytes::from(key.to_string()),
                value: Bytes::from(value.to_string()),
                ..Default::default()
            })
            .await;
        match sent {
            Ok(resp) => return resp.into_inner().header.expect("a header").revision,
            Err(e) if Instant::now() < deadline => {
                eprintln!("put {key}: {e}; again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("put {key}: {e}"),
        }
    }
}

/// The index of the first answer older than one before it, if any.
fn goes_back(revisions: &[i64]) -> Option<usize> {
    let mut max = i64::MIN;
    for (i, &rev) in revisions.iter().enumerate() {
        if rev < max {
            return Some(i);
        }
        max = max.max(rev);
    }
    None
}

fn start_proxy(members: &[&Member], extra: &[&str]) -> (ProxyProcess, String) {
    let urls: Vec<String> = members
        .iter()
        .map(|m| format!("http://{}", m.addr()))
        .collect();
    common::start_grpc_proxy_at(&urls, extra)
}

const READS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_reads_never_go_back_across_a_lagging_member() {
    let dir = tempfile::tempdir().expect("temp dir");
    let net = Network::default();
    let mut members = start_cluster(&net, dir.path()).await;
    let logs = || {
        (0..members.len())
            .map(|i| {
                std::fs::read_to_string(dir.path().join(format!("m{i}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n----\n")
    };

    // Every member up with a leader; who is who.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ids: HashMap<usize, u64> = HashMap::new();
    let mut leader = 0;
    while ids.len() < members.len() {
        assert!(Instant::now() < deadline, "cluster not up:\n{}", logs());
        for (i, m) in members.iter().enumerate() {
            if !ids.contains_key(&i)
                && let Ok(Some((id, lead))) =
                    tokio::time::timeout(Duration::from_secs(5), status(&m.addr())).await
            {
                ids.insert(i, id);
                leader = lead;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let leader_index = (0..members.len())
        .find(|i| ids[i] == leader)
        .expect("the leader is a member");
    let lagging = (0..members.len())
        .find(|&i| i != leader_index)
        .expect("a follower");
    let lead = channel(&members[leader_index].addr()).await;
    let behind = channel(&members[lagging].addr()).await;

    // A healthy cluster first: writes through the proxy (Put, a Txn with a put, DeleteRange)
    // count too, so a serializable read right after a write never misses it, even when it
    // lands on a follower that has not applied the write yet; under a namespace as well.
    for namespace in [None, Some("ns/")] {
        let flag = namespace.map(|ns| format!("--namespace={ns}"));
        let mut extra = vec!["--experimental-serializable-ordering"];
        extra.extend(flag.as_deref());
        let (_proxy, addr) = start_proxy(&members.iter().collect::<Vec<_>>(), &extra);
        let via = channel(&addr).await;
        for i in 0..20 {
            let value = format!("w{i}");
            let written = if i % 2 == 0 {
                put(&via, "w", &value).await
            } else {
                let resp = KvClient::new(via.clone())
                    .txn(TxnRequest {
                        compare: vec![],
                        success: vec![RequestOp {
                            request: Some(request_op::Request::RequestPut(PutRequest {
                                key: Bytes::from_static(b"w"),
                                value: Bytes::from(value.clone()),
                                ..Default::default()
                            })),
                        }],
                        failure: vec![],
                    })
                    .await
                    .expect("txn put")
                    .into_inner();
                resp.header.expect("a header").revision
            };
            let (rev, got) = sget(&via, "w").await;
            assert!(
                rev >= written,
                "namespace {namespace:?}: read {rev} after write {written}"
            );
            assert_eq!(got, value, "namespace {namespace:?}");
        }
        let stored = format!("{}w", namespace.unwrap_or(""));
        assert_eq!(sget(&lead, &stored).await.1, "w19");
        let deleted = KvClient::new(via.clone())
            .delete_range(DeleteRangeRequest {
                key: Bytes::from_static(b"w"),
                ..Default::default()
            })
            .await
            .expect("delete")
            .into_inner();
        assert_eq!(deleted.deleted, 1);
        let gone = deleted.header.expect("a header").revision;
        let (rev, got) = sget(&via, "w").await;
        assert!(rev >= gone && got.is_empty(), "{rev} {got:?}");
    }

    // Every member has the key, then the follower is cut off and the key moves on without it.
    let first = put(&lead, "k", "v1").await;
    let ns_first = put(&lead, "ns/k", "n1").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sget(&behind, "ns/k").await.0 < ns_first {
        assert!(
            Instant::now() < deadline,
            "the follower never applied the first puts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ns_first > first);
    net.isolate(lagging, ids[&lagging]);
    let mut latest = 0;
    for i in 2..=5 {
        put(&lead, "k", &format!("v{i}")).await;
        latest = put(&lead, "ns/k", &format!("n{i}")).await;
    }
    // Direct: the lagging member answers serializable reads, from its old state.
    let (old, value) = sget(&behind, "k").await;
    assert_eq!((old, value.as_str()), (ns_first, "v1"));
    assert_eq!(sget(&lead, "k").await, (latest, "v5".to_string()));

    // Without the flag, round-robin reaches the lagging member after a fresh one. (The range
    // cache is off here: once warm it would answer from memory and hide the lagging member.)
    {
        let (_proxy, addr) = start_proxy(
            &members.iter().collect::<Vec<_>>(),
            &["--disable-range-cache"],
        );
        let via = channel(&addr).await;
        let mut revisions = Vec::new();
        for _ in 0..READS {
            revisions.push(sget(&via, "k").await.0);
        }
        assert!(
            goes_back(&revisions).is_some(),
            "without the flag, reads were expected to go back: {revisions:?}"
        );
        assert!(
            revisions.contains(&old) && revisions.contains(&latest),
            "{revisions:?}"
        );
    }

    // With the flag: never back, for ranges, serializable Txns, and under a namespace.
    for namespace in [None, Some("ns/")] {
        let flag = namespace.map(|ns| format!("--namespace={ns}"));
        let mut extra = vec!["--experimental-serializable-ordering", "--debug"];
        extra.extend(flag.as_deref());
        let (proxy, addr) = start_proxy(&members.iter().collect::<Vec<_>>(), &extra);
        let via = channel(&addr).await;
        let (fresh_value, stale_value) = match namespace {
            None => ("v5", "v1"),
            Some(_) => ("n5", "n1"),
        };
        let mut revisions = Vec::new();
        let mut values = Vec::new();
        for i in 0..READS {
            let (rev, value) = if i % 2 == 0 {
                sget(&via, "k").await
            } else {
                stxn(&via, "k").await
            };
            revisions.push(rev);
            values.push(value);
        }
        assert_eq!(
            goes_back(&revisions),
            None,
            "namespace {namespace:?}: with the flag a read went back: {revisions:?}"
        );
        // Once a fresh answer was returned, only fresh ones follow.
        let fresh_from = revisions
            .iter()
            .position(|&r| r == latest)
            .unwrap_or_else(|| panic!("namespace {namespace:?}: no fresh answer: {revisions:?}"));
        assert!(
            values[fresh_from..].iter().all(|v| v == fresh_value),
            "{values:?}"
        );
        assert!(
            values.iter().all(|v| v == fresh_value || v == stale_value),
            "{values:?}"
        );
        // The lagging member is still behind: the proxy skipped it, it did not catch up.
        assert_eq!(sget(&behind, "k").await.0, old);
        let retried = proxy
            .log_entries(
                "member answered a serializable read behind the revision already returned; asking another",
            )
            .len();
        assert!(
            retried > 0,
            "namespace {namespace:?}: the lagging member was never asked and refused:\n{}",
            proxy.log()
        );
    }

    // Every member of the proxy behind what it returned: the read becomes linearizable, which
    // the lagging member answers only once it has caught up (here: once the network heals), so
    // the answer is fresh rather than stale. The proxy knows the lagging member and the other
    // follower; after one fresh answer, that follower dies.
    let other = (0..members.len())
        .find(|&i| i != leader_index && i != lagging)
        .expect("a third member");
    let (proxy, addr) = start_proxy(
        &[&members[lagging], &members[other]],
        &["--experimental-serializable-ordering", "--debug"],
    );
    let via = channel(&addr).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sget(&via, "k").await.0 < latest {
        assert!(
            Instant::now() < deadline,
            "no fresh answer through the proxy"
        );
    }
    members[other].kill();
    // Let the proxy see the connections close, so the read goes where this test expects.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let healer = net.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        healer.heal();
    });
    let (rev, value) = sget(&via, "k").await;
    assert!(rev >= latest, "{rev} < {latest}");
    assert_eq!(value, "v5");
    assert!(
        !proxy
            .log_entries("every member answered a serializable read behind the revision already returned; reading linearizably")
            .is_empty(),
        "{}",
        proxy.log()
    );
}

#[test]
fn goes_back_finds_the_first_older_answer() {
    assert_eq!(goes_back(&[1, 2, 2, 3]), None);
    assert_eq!(goes_back(&[5, 9, 5]), Some(2));
    assert_eq!(goes_back(&[]), None);
}
