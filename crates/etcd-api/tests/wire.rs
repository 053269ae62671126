//! The generated tonic clients against a real etcd 3.5 member: proves that the
//! hand-written protos agree with etcd on package, service, method and field
//! numbers (a wrong number would decode as a missing field, so every test
//! checks real values, not just that a call succeeded).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use etcd_api::etcdserverpb::auth_client::AuthClient;
use etcd_api::etcdserverpb::cluster_client::ClusterClient;
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::lease_client::LeaseClient;
use etcd_api::etcdserverpb::maintenance_client::MaintenanceClient;
use etcd_api::etcdserverpb::watch_client::WatchClient;
use etcd_api::etcdserverpb::{
    AuthStatusRequest, CompactionRequest, Compare, DeleteRangeRequest, HashKvRequest, HashRequest,
    LeaseGrantRequest, LeaseLeasesRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
    MemberListRequest, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest,
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
    compare, request_op, response_op, watch_request,
};
use etcd_api::mvccpb::event::EventType;
use etcd_api::v3electionpb::election_client::ElectionClient;
use etcd_api::v3electionpb::{CampaignRequest, LeaderRequest, ProclaimRequest, ResignRequest};
use etcd_api::v3lockpb::lock_client::LockClient;
use etcd_api::v3lockpb::{LockRequest, UnlockRequest};
use futures::SinkExt;
use testkit::Cluster;
use tonic::transport::Channel;

/// Bound on every call: a hang must fail the test, not stall the run. Generous
/// because the machine's 2 cores are shared with other builds and tests.
const CALL_DEADLINE: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(CALL_DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_DEADLINE:?}"))
}

async fn channel(cluster: &Cluster) -> Channel {
    let url = cluster.client_urls()[0].clone();
    within(
        "connect",
        Channel::from_shared(url.clone())
            .expect("testkit gives valid URLs")
            .connect(),
    )
    .await
    .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

fn revision_of(header: &Option<etcd_api::etcdserverpb::ResponseHeader>) -> i64 {
    header
        .as_ref()
        .expect("etcd always sends a header")
        .revision
}

#[tokio::test]
async fn kv_put_range_txn_delete_compact() {
    let cluster = Cluster::start(1).await;
    let mut kv = KvClient::new(channel(&cluster).await);

    let put1 = within(
        "put",
        kv.put(PutRequest {
            key: b("foo"),
            value: b("bar"),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let rev1 = revision_of(&put1.header);
    assert!(rev1 >= 2, "first put makes revision >= 2, got {rev1}");
    assert!(put1.prev_kv.is_none());

    let put2 = within(
        "put prev_kv",
        kv.put(PutRequest {
            key: b("foo"),
            value: b("baz"),
            prev_kv: true,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let rev2 = revision_of(&put2.header);
    assert_eq!(rev2, rev1 + 1);
    let prev = put2.prev_kv.expect("prev_kv asked for");
    assert_eq!(prev.key, b("foo"));
    assert_eq!(prev.value, b("bar"));
    assert_eq!(prev.mod_revision, rev1);
    assert_eq!(prev.version, 1);

    let range = within(
        "range",
        kv.range(RangeRequest {
            key: b("foo"),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(revision_of(&range.header), rev2);
    assert_eq!(range.count, 1);
    assert!(!range.more);
    let kvp = &range.kvs[0];
    assert_eq!((kvp.key.clone(), kvp.value.clone()), (b("foo"), b("baz")));
    assert_eq!(kvp.create_revision, rev1);
    assert_eq!(kvp.mod_revision, rev2);
    assert_eq!(kvp.version, 2);
    assert_eq!(kvp.lease, 0);
    let header = range.header.unwrap();
    assert_ne!(header.cluster_id, 0);
    assert_ne!(header.member_id, 0);
    assert!(header.raft_term >= 1);

    // An old revision still has the old value.
    let old = within(
        "range at revision",
        kv.range(RangeRequest {
            key: b("foo"),
            revision: rev1,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(old.kvs[0].value, b("bar"));

    for (k, v) in [("pre/a", "1"), ("pre/b", "2"), ("pre/c", "3")] {
        within(
            "put prefix",
            kv.put(PutRequest {
                key: b(k),
                value: b(v),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    }
    let count_only = within(
        "range count_only",
        kv.range(RangeRequest {
            key: b("pre/"),
            range_end: b("pre0"),
            count_only: true,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(count_only.count, 3);
    assert!(count_only.kvs.is_empty());

    let limited = within(
        "range limit sort",
        kv.range(RangeRequest {
            key: b("pre/"),
            range_end: b("pre0"),
            limit: 2,
            sort_order: etcd_api::etcdserverpb::range_request::SortOrder::Descend as i32,
            keys_only: true,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(limited.more);
    assert_eq!(limited.count, 3);
    let keys: Vec<_> = limited.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, vec![b("pre/c"), b("pre/b")]);
    assert!(limited.kvs.iter().all(|kv| kv.value.is_empty()));

    // Txn: compare on the value, then a put and a nested txn that reads.
    let before_txn = revision_of(&limited.header);
    let txn = within(
        "txn",
        kv.txn(TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Value as i32,
                key: b("foo"),
                target_union: Some(compare::TargetUnion::Value(b("baz"))),
                range_end: Bytes::new(),
            }],
            success: vec![
                RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: b("txn-key"),
                        value: b("txn-value"),
                        ..Default::default()
                    })),
                },
                RequestOp {
                    request: Some(request_op::Request::RequestTxn(TxnRequest {
                        compare: vec![Compare {
                            result: compare::CompareResult::Greater as i32,
                            target: compare::CompareTarget::Version as i32,
                            key: b("foo"),
                            target_union: Some(compare::TargetUnion::Version(1)),
                            range_end: Bytes::new(),
                        }],
                        success: vec![RequestOp {
                            request: Some(request_op::Request::RequestRange(RangeRequest {
                                key: b("foo"),
                                ..Default::default()
                            })),
                        }],
                        failure: vec![],
                    })),
                },
            ],
            failure: vec![],
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(txn.succeeded);
    assert_eq!(revision_of(&txn.header), before_txn + 1);
    assert_eq!(txn.responses.len(), 2);
    assert!(matches!(
        txn.responses[0].response,
        Some(response_op::Response::ResponsePut(_))
    ));
    let Some(response_op::Response::ResponseTxn(nested)) = &txn.responses[1].response else {
        panic!("expected a nested txn response, got {:?}", txn.responses[1]);
    };
    assert!(nested.succeeded, "version(foo) = 2 > 1");
    let Some(response_op::Response::ResponseRange(nested_range)) = &nested.responses[0].response
    else {
        panic!("expected a range in the nested txn, got {nested:?}");
    };
    assert_eq!(nested_range.kvs[0].value, b("baz"));

    // A failing compare runs the failure branch.
    let failed = within(
        "txn failure branch",
        kv.txn(TxnRequest {
            compare: vec![Compare {
                target: compare::CompareTarget::Create as i32,
                result: compare::CompareResult::Equal as i32,
                key: b("absent"),
                target_union: Some(compare::TargetUnion::CreateRevision(12345)),
                range_end: Bytes::new(),
            }],
            success: vec![],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: b("txn-key"),
                    ..Default::default()
                })),
            }],
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(!failed.succeeded);
    let Some(response_op::Response::ResponseRange(r)) = &failed.responses[0].response else {
        panic!("expected a range, got {failed:?}");
    };
    assert_eq!(r.kvs[0].value, b("txn-value"));

    let del = within(
        "delete range",
        kv.delete_range(DeleteRangeRequest {
            key: b("pre/"),
            range_end: b("pre0"),
            prev_kv: true,
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(del.deleted, 3);
    let mut deleted: Vec<_> = del
        .prev_kvs
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    deleted.sort();
    assert_eq!(
        deleted,
        vec![
            (b("pre/a"), b("1")),
            (b("pre/b"), b("2")),
            (b("pre/c"), b("3"))
        ]
    );
    let rev_del = revision_of(&del.header);

    let compacted = within(
        "compact",
        kv.compact(CompactionRequest {
            revision: rev_del,
            physical: true,
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(revision_of(&compacted.header) >= rev_del);

    let err = within(
        "range at compacted revision",
        kv.range(RangeRequest {
            key: b("foo"),
            revision: rev1,
            ..Default::default()
        }),
    )
    .await
    .expect_err("revision was compacted");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("compacted"), "{err:?}");
}

#[tokio::test]
async fn lease_grant_ttl_leases_revoke() {
    let cluster = Cluster::start(1).await;
    let ch = channel(&cluster).await;
    let mut lease = LeaseClient::new(ch.clone());
    let mut kv = KvClient::new(ch);

    let grant = within(
        "lease grant",
        lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_ne!(grant.id, 0);
    assert_eq!(grant.ttl, 60);
    assert!(grant.error.is_empty());
    let id = grant.id;

    // A chosen ID is honoured.
    let chosen = within(
        "lease grant with ID",
        lease.lease_grant(LeaseGrantRequest { ttl: 30, id: 777 }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!((chosen.id, chosen.ttl), (777, 30));

    within(
        "put with lease",
        kv.put(PutRequest {
            key: b("leased"),
            value: b("v"),
            lease: id,
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let r = within(
        "range leased",
        kv.range(RangeRequest {
            key: b("leased"),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.kvs[0].lease, id);

    let ttl = within(
        "time to live",
        lease.lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(ttl.id, id);
    assert_eq!(ttl.granted_ttl, 60);
    assert!(ttl.ttl > 0 && ttl.ttl <= 60, "ttl {}", ttl.ttl);
    assert_eq!(ttl.keys, vec![b("leased")]);

    let leases = within("leases", lease.lease_leases(LeaseLeasesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut ids: Vec<i64> = leases.leases.iter().map(|l| l.id).collect();
    ids.sort();
    let mut want = vec![id, 777];
    want.sort();
    assert_eq!(ids, want);

    within("revoke", lease.lease_revoke(LeaseRevokeRequest { id }))
        .await
        .unwrap();
    let gone = within(
        "range after revoke",
        kv.range(RangeRequest {
            key: b("leased"),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(gone.count, 0, "revoking the lease deletes its keys");
    let ttl = within(
        "time to live after revoke",
        lease.lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(ttl.ttl, -1);
}

/// Reads the next response of a watch stream, failing on end of stream.
async fn next_watch(stream: &mut tonic::Streaming<WatchResponse>, what: &str) -> WatchResponse {
    within(what, stream.message())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .unwrap_or_else(|| panic!("{what}: stream ended"))
}

#[tokio::test]
async fn watch_create_event_progress_cancel() {
    let cluster = Cluster::start(1).await;
    let ch = channel(&cluster).await;
    let mut watch = WatchClient::new(ch.clone());
    let mut kv = KvClient::new(ch);

    let (mut tx, rx) = futures::channel::mpsc::channel::<WatchRequest>(8);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b("w/"),
                range_end: b("w0"),
                watch_id: 7,
                prev_kv: true,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut stream = within("watch", watch.watch(rx)).await.unwrap().into_inner();

    let created = next_watch(&mut stream, "created").await;
    assert!(created.created);
    assert_eq!(created.watch_id, 7);
    assert!(created.events.is_empty());
    let start_rev = revision_of(&created.header);

    let put = within(
        "put",
        kv.put(PutRequest {
            key: b("w/a"),
            value: b("1"),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let put_rev = revision_of(&put.header);
    assert!(put_rev > start_rev);

    let ev = next_watch(&mut stream, "event").await;
    assert_eq!(ev.watch_id, 7);
    assert_eq!(ev.events.len(), 1);
    let event = &ev.events[0];
    assert_eq!(event.r#type, EventType::Put as i32);
    let kvp = event.kv.as_ref().unwrap();
    assert_eq!((kvp.key.clone(), kvp.value.clone()), (b("w/a"), b("1")));
    assert_eq!(kvp.mod_revision, put_rev);
    assert_eq!(kvp.create_revision, put_rev);
    assert!(event.prev_kv.is_none(), "the key was new");

    // A delete arrives as a DELETE event with the old pair as prev_kv.
    within(
        "delete",
        kv.delete_range(DeleteRangeRequest {
            key: b("w/a"),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let del = next_watch(&mut stream, "delete event").await;
    assert_eq!(del.events[0].r#type, EventType::Delete as i32);
    assert_eq!(
        del.events[0].prev_kv.as_ref().map(|p| p.value.clone()),
        Some(b("1"))
    );
    let del_rev = revision_of(&del.header);

    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::ProgressRequest(
            WatchProgressRequest {},
        )),
    })
    .await
    .unwrap();
    let progress = next_watch(&mut stream, "progress").await;
    assert!(progress.events.is_empty());
    assert!(!progress.created && !progress.canceled);
    assert!(revision_of(&progress.header) >= del_rev);

    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CancelRequest(
            WatchCancelRequest { watch_id: 7 },
        )),
    })
    .await
    .unwrap();
    let canceled = next_watch(&mut stream, "cancel").await;
    assert!(canceled.canceled);
    assert_eq!(canceled.watch_id, 7);
}

#[tokio::test]
async fn cluster_maintenance_auth() {
    let cluster = Cluster::start(1).await;
    let ch = channel(&cluster).await;
    let mut members = ClusterClient::new(ch.clone());
    let mut maint = MaintenanceClient::new(ch.clone());
    let mut auth = AuthClient::new(ch.clone());
    let mut kv = KvClient::new(ch);

    let list = within(
        "member list",
        members.member_list(MemberListRequest { linearizable: true }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(list.members.len(), 1);
    let me = &list.members[0];
    assert_ne!(me.id, 0);
    assert!(!me.name.is_empty());
    assert!(!me.is_learner);
    assert_eq!(me.id, list.header.as_ref().unwrap().member_id);
    assert_eq!(me.client_ur_ls, cluster.client_urls());
    assert_eq!(me.peer_ur_ls.len(), 1);
    assert!(me.peer_ur_ls[0].starts_with("http://127.0.0.1:"));

    let status = within("status", maint.status(StatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(status.version.starts_with("3."), "{}", status.version);
    assert_eq!(status.leader, me.id);
    assert!(status.db_size > 0);
    assert!(status.db_size_in_use > 0 && status.db_size_in_use <= status.db_size);
    assert!(status.raft_index > 0);
    assert!(status.raft_applied_index > 0);
    assert!(status.raft_term >= 1);
    assert!(!status.is_learner);
    assert!(status.errors.is_empty());

    within(
        "put",
        kv.put(PutRequest {
            key: b("h"),
            value: b("1"),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let h1 = within("hashkv", maint.hash_kv(HashKvRequest { revision: 0 }))
        .await
        .unwrap()
        .into_inner();
    let rev = revision_of(&h1.header);
    assert!(rev >= 2);
    assert_ne!(h1.hash, 0);
    let h2 = within(
        "hashkv at revision",
        maint.hash_kv(HashKvRequest { revision: rev }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(h1.hash, h2.hash, "same revision, same hash");
    within(
        "put",
        kv.put(PutRequest {
            key: b("h"),
            value: b("2"),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let h3 = within(
        "hashkv after put",
        maint.hash_kv(HashKvRequest { revision: 0 }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_ne!(h3.hash, h1.hash, "a new revision changes the hash");

    let auth_status = within("auth status", auth.auth_status(AuthStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(!auth_status.enabled);
    assert!(auth_status.header.is_some());
}

#[tokio::test]
async fn lock_and_election() {
    let cluster = Cluster::start(1).await;
    let ch = channel(&cluster).await;
    let mut lease = LeaseClient::new(ch.clone());
    let mut kv = KvClient::new(ch.clone());
    let mut lock = LockClient::new(ch.clone());
    let mut election = ElectionClient::new(ch);

    let id = within(
        "lease grant",
        lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }),
    )
    .await
    .unwrap()
    .into_inner()
    .id;

    let locked = within(
        "lock",
        lock.lock(LockRequest {
            name: b("my-lock"),
            lease: id,
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(locked.key.starts_with(b"my-lock/"), "{:?}", locked.key);
    assert!(revision_of(&locked.header) > 0);
    let held = within(
        "range lock key",
        kv.range(RangeRequest {
            key: locked.key.clone(),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(held.count, 1);
    assert_eq!(held.kvs[0].lease, id);

    within(
        "unlock",
        lock.unlock(UnlockRequest {
            key: locked.key.clone(),
        }),
    )
    .await
    .unwrap();
    let released = within(
        "range lock key after unlock",
        kv.range(RangeRequest {
            key: locked.key,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(released.count, 0);

    let campaign = within(
        "campaign",
        election.campaign(CampaignRequest {
            name: b("my-election"),
            lease: id,
            value: b("v1"),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let leader = campaign.leader.expect("campaign returns the leader key");
    assert_eq!(leader.name, b("my-election"));
    assert!(leader.key.starts_with(b"my-election/"));
    assert_eq!(leader.lease, id);
    assert!(leader.rev > 0);

    let current = within(
        "leader",
        election.leader(LeaderRequest {
            name: b("my-election"),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let kvp = current.kv.expect("there is a leader");
    assert_eq!(kvp.key, leader.key);
    assert_eq!(kvp.value, b("v1"));
    assert_eq!(kvp.create_revision, leader.rev);

    within(
        "proclaim",
        election.proclaim(ProclaimRequest {
            leader: Some(leader.clone()),
            value: b("v2"),
        }),
    )
    .await
    .unwrap();
    let mut observe = within(
        "observe",
        election.observe(LeaderRequest {
            name: b("my-election"),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let seen = within("observe first", observe.message())
        .await
        .unwrap()
        .expect("observe streams the current leader");
    assert_eq!(seen.kv.unwrap().value, b("v2"));

    within(
        "resign",
        election.resign(ResignRequest {
            leader: Some(leader),
        }),
    )
    .await
    .unwrap();
    let none = within(
        "leader after resign",
        election.leader(LeaderRequest {
            name: b("my-election"),
        }),
    )
    .await;
    assert!(none.is_err(), "no leader after resigning: {none:?}");
}

/// POSTs `body` to etcd's own JSON gateway and returns the response body.
/// HTTP/1.0 keeps the answer simple: no chunking, the body ends at close.
async fn gateway_post(cluster: &Cluster, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = cluster.client_endpoints()[0].clone();
    within("gateway call", async {
        let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let req = format!(
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        sock.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).expect("etcd answers UTF-8 JSON");
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.0 200"), "{path}: {head}\n{body}");
        body.to_string()
    })
    .await
}

/// Our serde output must equal, byte for byte, what etcd's gateway prints for
/// the same state, and etcd's output must read back to the gRPC answer.
#[tokio::test]
async fn json_matches_etcd_gateway() {
    let cluster = Cluster::start(1).await;
    let ch = channel(&cluster).await;
    let mut kv = KvClient::new(ch.clone());
    let mut lease = LeaseClient::new(ch.clone());
    let mut members = ClusterClient::new(ch.clone());
    let mut maint = MaintenanceClient::new(ch);

    let id = within(
        "lease grant",
        lease.lease_grant(LeaseGrantRequest { ttl: 600, id: 0 }),
    )
    .await
    .unwrap()
    .into_inner()
    .id;
    for (k, v) in [("foo", "bar"), ("foo", "baz"), ("fop", "<&>")] {
        within(
            "put",
            kv.put(PutRequest {
                key: b(k),
                value: b(v),
                lease: id,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    }

    let range = RangeRequest {
        key: b("fo"),
        range_end: b("fp"),
        ..Default::default()
    };
    let ours = within("range", kv.range(range.clone()))
        .await
        .unwrap()
        .into_inner();
    let etcd = gateway_post(
        &cluster,
        "/v3/kv/range",
        &serde_json::to_string(&range).unwrap(),
    )
    .await;
    assert_eq!(serde_json::to_string(&ours).unwrap(), etcd);
    assert_eq!(
        serde_json::from_str::<etcd_api::etcdserverpb::RangeResponse>(&etcd).unwrap(),
        ours
    );

    // A txn whose response holds an empty nested header and a failed branch.
    let txn = TxnRequest {
        compare: vec![Compare {
            target: compare::CompareTarget::Version as i32,
            result: compare::CompareResult::Greater as i32,
            key: b("foo"),
            target_union: Some(compare::TargetUnion::Version(100)),
            range_end: Bytes::new(),
        }],
        success: vec![],
        failure: vec![
            RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: b("foo"),
                    count_only: true,
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest::default())),
            },
        ],
    };
    let ours = within("txn", kv.txn(txn.clone()))
        .await
        .unwrap()
        .into_inner();
    let etcd = gateway_post(
        &cluster,
        "/v3/kv/txn",
        &serde_json::to_string(&txn).unwrap(),
    )
    .await;
    assert_eq!(serde_json::to_string(&ours).unwrap(), etcd);

    let ttl_req = LeaseTimeToLiveRequest { id, keys: true };
    let etcd = gateway_post(
        &cluster,
        "/v3/lease/timetolive",
        &serde_json::to_string(&ttl_req).unwrap(),
    )
    .await;
    let parsed: etcd_api::etcdserverpb::LeaseTimeToLiveResponse =
        serde_json::from_str(&etcd).unwrap();
    assert_eq!(parsed.id, id);
    assert_eq!(parsed.granted_ttl, 600);
    // etcd lists a lease's keys in no fixed order.
    let mut keys = parsed.keys.clone();
    keys.sort();
    assert_eq!(keys, vec![b("foo"), b("fop")]);
    assert_eq!(serde_json::to_string(&parsed).unwrap(), etcd);

    let ours = within(
        "member list",
        members.member_list(MemberListRequest::default()),
    )
    .await
    .unwrap()
    .into_inner();
    let etcd = gateway_post(&cluster, "/v3/cluster/member/list", "{}").await;
    assert_eq!(serde_json::to_string(&ours).unwrap(), etcd);

    // etcd 3.5 routes only Hash over HTTP (/v3/maintenance/hash); HashKV has
    // no route. The uint32 hash prints as a JSON number.
    let ours = within("hash", maint.hash(HashRequest {}))
        .await
        .unwrap()
        .into_inner();
    let etcd = gateway_post(&cluster, "/v3/maintenance/hash", "{}").await;
    assert!(etcd.contains(&format!(r#""hash":{}"#, ours.hash)), "{etcd}");
    assert_eq!(serde_json::to_string(&ours).unwrap(), etcd);

    // Status: camelCase proto names (dbSize, raftIndex ...) read back and
    // print again unchanged.
    let etcd = gateway_post(&cluster, "/v3/maintenance/status", "{}").await;
    let parsed: etcd_api::etcdserverpb::StatusResponse = serde_json::from_str(&etcd).unwrap();
    assert!(parsed.version.starts_with("3."));
    assert!(parsed.db_size > 0 && parsed.raft_index > 0);
    assert_eq!(serde_json::to_string(&parsed).unwrap(), etcd);
}
