//! `etcd-proxy grpc-proxy start --namespace=/app/` end to end: the real binary in front of a
//! real 3-member etcd cluster, used by etcdctl and by tonic clients of the Lock and Election
//! services. A client of the proxy sees only the keys under `/app/`, stripped of the prefix, and
//! can neither read, write, watch, delete nor learn of any other key.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{etcdctl_stdin, ok, start_grpc_proxy};
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::lease_client::LeaseClient;
use etcd_api::etcdserverpb::{LeaseGrantRequest, PutRequest, RangeRequest};
use etcd_api::v3electionpb::election_client::ElectionClient;
use etcd_api::v3electionpb::{CampaignRequest, LeaderRequest, ProclaimRequest, ResignRequest};
use etcd_api::v3lockpb::lock_client::LockClient;
use etcd_api::v3lockpb::{LockRequest, UnlockRequest};
use testkit::Cluster;

/// etcdctl at the proxy.
fn ctl(cluster: &Cluster, addr: &str, args: &[&str]) -> Output {
    cluster.etcdctl_at(addr, args)
}

/// A long-running etcdctl at the proxy (watch, lock, elect) and its stdout, line by line.
fn spawn_ctl(addr: &str, args: &[&str]) -> (Child, Receiver<String>) {
    let mut child = Command::new(testkit::etcdctl_path())
        .arg(format!("--endpoints={addr}"))
        .args(args)
        .env("ETCDCTL_API", "3")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcdctl");
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The next `n` lines of a spawned etcdctl, within 30 s.
fn lines(rx: &Receiver<String>, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => out.push(l),
            Err(_) => panic!("expected {n} lines from etcdctl, got {out:?}"),
        }
    }
    out
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_isolates_kv_txn_and_watch() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &["--namespace=/app/"]);

    // Keys outside the namespace, written directly, some right at its edges.
    for (k, v) in [
        ("outside", "x"),
        ("/app", "edge-below"),
        ("/app0", "edge-above"),
        ("/ap", "short"),
    ] {
        ok(cluster.etcdctl(&["put", k, v]));
    }

    for (k, v) in [("a", "1"), ("b", "2"), ("c/d", "3")] {
        assert_eq!(ok(ctl(&cluster, &addr, &["put", k, v])), "OK\n");
    }
    // Stored under the prefix...
    assert_eq!(
        ok(cluster.etcdctl(&["get", "/app/", "--prefix"])),
        "/app/a\n1\n/app/b\n2\n/app/c/d\n3\n"
    );
    // ...and read back stripped, whatever the range form.
    assert_eq!(ok(ctl(&cluster, &addr, &["get", "a"])), "a\n1\n");
    let everything = "a\n1\nb\n2\nc/d\n3\n";
    assert_eq!(
        ok(ctl(&cluster, &addr, &["get", "", "--from-key"])),
        everything
    );
    assert_eq!(
        ok(ctl(&cluster, &addr, &["get", "", "--prefix"])),
        everything
    );
    assert_eq!(
        ok(ctl(&cluster, &addr, &["get", "b", "--from-key"])),
        "b\n2\nc/d\n3\n"
    );
    assert_eq!(ok(ctl(&cluster, &addr, &["get", "a", "c"])), "a\n1\nb\n2\n");
    assert_eq!(
        ok(ctl(&cluster, &addr, &["get", "c/", "--prefix"])),
        "c/d\n3\n"
    );
    let counted = ok(ctl(
        &cluster,
        &addr,
        &["get", "", "--from-key", "--count-only", "-w", "fields"],
    ));
    assert!(counted.contains("\"Count\" : 3"), "{counted}");
    // The keys outside cannot be named.
    for k in ["outside", "/app", "/app0", "/ap", "/app/a"] {
        assert_eq!(ok(ctl(&cluster, &addr, &["get", k])), "", "{k}");
    }

    // Put and delete return previous key-values stripped.
    assert_eq!(
        ok(ctl(&cluster, &addr, &["put", "b", "20", "--prev-kv"])),
        "OK\nb\n2\n"
    );
    assert_eq!(
        ok(ctl(&cluster, &addr, &["del", "a", "--prev-kv"])),
        "1\na\n1\n"
    );
    ok(ctl(&cluster, &addr, &["put", "a", "1"]));

    // Txn: compares and operations are namespaced; a compare on a key outside the namespace
    // compares the namespaced key, which does not exist.
    let out = ok(etcdctl_stdin(
        &addr,
        &["txn"],
        b"value(\"a\") = \"1\"\n\nput b 21\nget c/d\n\nput nope x\n\n",
    ));
    assert_eq!(out, "SUCCESS\n\nOK\n\nc/d\n3\n", "{out}");
    assert_eq!(
        ok(cluster.etcdctl(&["get", "/app/b", "--print-value-only"])),
        "21\n"
    );
    let out = ok(etcdctl_stdin(
        &addr,
        &["txn"],
        b"value(\"outside\") = \"x\"\n\nput hit y\n\nput miss z\n\n",
    ));
    assert!(out.starts_with("FAILURE"), "{out}");
    assert_eq!(
        ok(cluster.etcdctl(&["get", "/app/miss", "--print-value-only"])),
        "z\n"
    );
    assert_eq!(ok(cluster.etcdctl(&["get", "hit"])), "");
    assert_eq!(ok(cluster.etcdctl(&["get", "miss"])), "");

    // Empty keys are refused as etcd refuses them (not written as the prefix itself).
    let out = ctl(&cluster, &addr, &["put", "", "v"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("etcdserver: key is not provided"), "{err}");
    assert_eq!(ok(cluster.etcdctl(&["get", "/app/"])), "");

    // A watch of everything sees the namespace only, stripped, previous values included.
    let (watch, rx) = spawn_ctl(&addr, &["watch", "", "--prefix", "--prev-kv"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l == "w1") {
        assert!(Instant::now() < deadline, "watch saw only {seen:?}");
        // The watcher may not be registered yet: write until it reports the event.
        ok(cluster.etcdctl(&["put", "outside-w", "nope"]));
        ok(cluster.etcdctl(&["put", "/app/w", "w1"]));
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(300)) {
            seen.push(l);
        }
    }
    ok(cluster.etcdctl(&["put", "/app0", "nope"]));
    ok(ctl(&cluster, &addr, &["put", "w", "w2"]));
    ok(cluster.etcdctl(&["del", "/app/w"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.iter().any(|l| l == "DELETE") {
        assert!(Instant::now() < deadline, "watch saw only {seen:?}");
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(300)) {
            seen.push(l);
        }
    }
    stop(watch);
    let tail: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .skip_while(|l| *l != "w2")
        .collect();
    assert!(
        seen.iter()
            .all(|l| l != "nope" && !l.starts_with("/app") && !l.starts_with("outside")),
        "{seen:?}"
    );
    assert!(
        seen.windows(5).any(|w| w == ["PUT", "w", "w1", "w", "w2"]),
        "{seen:?}"
    );
    assert!(tail.starts_with(&["w2", "DELETE"]), "{seen:?}");

    // Deleting everything through the proxy deletes the namespace only.
    let deleted = ok(ctl(&cluster, &addr, &["del", "", "--from-key"]));
    assert_eq!(deleted, "4\n", "a b c/d miss");
    assert_eq!(ok(ctl(&cluster, &addr, &["del", "outside"])), "0\n");
    assert_eq!(ok(ctl(&cluster, &addr, &["get", "", "--prefix"])), "");
    for (k, v) in [
        ("outside", "x"),
        ("/app", "edge-below"),
        ("/app0", "nope"),
        ("/ap", "short"),
    ] {
        assert_eq!(
            ok(cluster.etcdctl(&["get", k, "--print-value-only"])),
            format!("{v}\n"),
            "{k}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_covers_leases_locks_and_elections() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &["--namespace=/app/"]);

    // A snapshot is the whole keyspace: refused, with a reason, and no file is written.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("snap.db");
    let out = ctl(
        &cluster,
        &addr,
        &["snapshot", "save", file.to_str().expect("utf-8 path")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "snapshot through a namespaced proxy succeeded"
    );
    assert!(
        err.contains("PermissionDenied")
            && err.contains("not available through a namespaced proxy"),
        "{err}"
    );
    assert!(!file.exists());

    // A lease holding keys in and out of the namespace lists only its own, stripped.
    let granted = ok(ctl(&cluster, &addr, &["lease", "grant", "60"]));
    let id = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    let lease_flag = format!("--lease={id}");
    ok(ctl(&cluster, &addr, &["put", "lk", "v", &lease_flag]));
    ok(cluster.etcdctl(&["put", "/other/lk", "v", &lease_flag]));
    let ttl = ok(ctl(
        &cluster,
        &addr,
        &["lease", "timetolive", &id, "--keys"],
    ));
    assert!(ttl.contains("attached keys([lk])"), "{ttl}");
    let direct = ok(cluster.etcdctl(&["lease", "timetolive", &id, "--keys"]));
    assert!(
        direct.contains("/app/lk") && direct.contains("/other/lk"),
        "{direct}"
    );

    // etcdctl lock and elect (client-side recipes over KV and Watch) live under the prefix.
    let (lock, rx) = spawn_ctl(&addr, &["lock", "l1"]);
    let key = lines(&rx, 1).remove(0);
    assert!(key.starts_with("l1/"), "{key}");
    assert_eq!(
        ok(cluster.etcdctl(&["get", "/app/l1/", "--prefix", "--keys-only"])),
        format!("/app/{key}\n\n")
    );
    assert_eq!(ok(cluster.etcdctl(&["get", "l1", "--prefix"])), "");
    stop(lock);

    let (elect, rx) = spawn_ctl(&addr, &["elect", "e1", "p1"]);
    let got = lines(&rx, 2);
    assert!(got[0].starts_with("e1/") && got[1] == "p1", "{got:?}");
    assert_eq!(
        ok(cluster.etcdctl(&["get", "/app/e1/", "--prefix"])),
        format!("/app/{}\np1\n", got[0])
    );
    let (listen, lrx) = spawn_ctl(&addr, &["elect", "-l", "e1"]);
    assert_eq!(lines(&lrx, 2), got);
    stop(listen);
    stop(elect);

    // The Lock and Election gRPC services (which etcd's proxy leaves outside the namespace).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the proxy");
    let lease = LeaseClient::new(channel.clone())
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .expect("lease grant")
        .into_inner()
        .id;

    let mut locks = LockClient::new(channel.clone());
    let key = locks
        .lock(LockRequest {
            name: Bytes::from_static(b"glock"),
            lease,
        })
        .await
        .expect("lock")
        .into_inner()
        .key;
    assert!(key.starts_with(b"glock/"), "{key:?}");
    let stored = ok(cluster.etcdctl(&["get", "/app/glock/", "--prefix", "--keys-only"]));
    assert_eq!(
        stored,
        format!("/app/{}\n\n", String::from_utf8_lossy(&key))
    );
    locks.unlock(UnlockRequest { key }).await.expect("unlock");
    assert_eq!(ok(cluster.etcdctl(&["get", "/app/glock/", "--prefix"])), "");

    let mut elections = ElectionClient::new(channel.clone());
    let name = Bytes::from_static(b"gelect");
    let leader = elections
        .campaign(CampaignRequest {
            name: name.clone(),
            lease,
            value: Bytes::from_static(b"v1"),
        })
        .await
        .expect("campaign")
        .into_inner()
        .leader
        .expect("a leader key");
    assert_eq!(leader.name, name);
    assert!(leader.key.starts_with(b"gelect/"), "{leader:?}");
    let kv = elections
        .leader(LeaderRequest { name: name.clone() })
        .await
        .expect("leader")
        .into_inner()
        .kv
        .expect("a leader");
    assert_eq!((&kv.key, &kv.value[..]), (&leader.key, &b"v1"[..]));
    let mut observe = elections
        .observe(LeaderRequest { name: name.clone() })
        .await
        .expect("observe")
        .into_inner();
    let first = observe
        .message()
        .await
        .expect("observe message")
        .and_then(|r| r.kv)
        .expect("a leader");
    assert_eq!(first.key, leader.key);
    elections
        .proclaim(ProclaimRequest {
            leader: Some(leader.clone()),
            value: Bytes::from_static(b"v2"),
        })
        .await
        .expect("proclaim");
    let next = observe
        .message()
        .await
        .expect("observe message")
        .and_then(|r| r.kv)
        .expect("a leader");
    assert_eq!((&next.key, &next.value[..]), (&leader.key, &b"v2"[..]));
    assert_eq!(
        ok(cluster.etcdctl(&["get", "/app/gelect/", "--prefix"])),
        format!("/app/{}\nv2\n", String::from_utf8_lossy(&leader.key))
    );
    elections
        .resign(ResignRequest {
            leader: Some(leader),
        })
        .await
        .expect("resign");
    assert_eq!(
        ok(cluster.etcdctl(&["get", "/app/gelect/", "--prefix"])),
        ""
    );

    // Messages spanning many HTTP/2 DATA frames both ways: 1 MiB values and a range of 3 MiB.
    let mut kv = KvClient::new(channel.clone());
    let value = Bytes::from(
        (0..1u32 << 20)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    for k in ["big/1", "big/2", "big/3"] {
        kv.put(PutRequest {
            key: Bytes::from(k),
            value: value.clone(),
            ..Default::default()
        })
        .await
        .expect("1 MiB put");
    }
    let got = kv
        .range(RangeRequest {
            key: Bytes::from_static(b"big/"),
            range_end: Bytes::from_static(b"big0"),
            ..Default::default()
        })
        .await
        .expect("3 MiB range")
        .into_inner();
    let keys: Vec<&[u8]> = got.kvs.iter().map(|kv| &kv.key[..]).collect();
    assert_eq!(keys, [&b"big/1"[..], b"big/2", b"big/3"]);
    assert!(got.kvs.iter().all(|kv| kv.value == value));
    let direct = ok(cluster.etcdctl(&["get", "/app/big/", "--prefix", "--keys-only"]));
    assert_eq!(direct, "/app/big/1\n\n/app/big/2\n\n/app/big/3\n\n");

    // A compressed message (no compression was negotiated) is refused, whole or split.
    for split in [false, true] {
        let (code, message) =
            common::raw_call(&addr, "/etcdserverpb.KV/Put", &[1, 0, 0, 0, 1, 0], split).await;
        assert_eq!(code, "12", "{message}");
        assert!(message.contains("compressed"), "{message}");
    }

    // A request over gRPC's 4 MiB is refused by the proxy, before etcd.
    let err = KvClient::new(channel)
        .put(PutRequest {
            key: Bytes::from_static(b"big"),
            value: Bytes::from(vec![b'x'; 5 << 20]),
            ..Default::default()
        })
        .await
        .expect_err("a 5 MiB put is refused");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
}

/// Lease IDs are cluster-wide and a revoke deletes the lease's keys: through the namespaced
/// proxy, a lease holding a key outside `/app/` cannot be revoked, so that key survives; a lease
/// used inside the namespace revokes as usual, and a missing one gets etcd's own error.
#[tokio::test(flavor = "multi_thread")]
async fn namespace_guards_lease_revoke() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &["--namespace=/app/"]);
    let lease_id = |granted: String| {
        granted
            .split_whitespace()
            .nth(1)
            .expect("lease id")
            .to_string()
    };

    // Granted directly, with a key outside the namespace: refused, and the key stays.
    let outside = lease_id(ok(cluster.etcdctl(&["lease", "grant", "60"])));
    let flag = format!("--lease={outside}");
    ok(cluster.etcdctl(&["put", "/other/guarded", "v", &flag]));
    let out = ctl(&cluster, &addr, &["lease", "revoke", &outside]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "revoking lease {outside} succeeded");
    assert!(
        err.contains("PermissionDenied")
            && err.contains(&format!(
                "etcd-proxy: lease {outside} holds keys outside the namespace"
            )),
        "{err}"
    );
    assert_eq!(
        ok(cluster.etcdctl(&["get", "/other/guarded", "--print-value-only"])),
        "v\n"
    );

    // Granted and used through the proxy (so its key is under /app/): revoked, key gone.
    let inside = lease_id(ok(ctl(&cluster, &addr, &["lease", "grant", "60"])));
    let flag = format!("--lease={inside}");
    ok(ctl(&cluster, &addr, &["put", "mine", "v", &flag]));
    assert_eq!(
        ok(cluster.etcdctl(&["get", "/app/mine", "--print-value-only"])),
        "v\n"
    );
    // `lease list` through the proxy shows the namespace's leases (with a key inside, or with
    // no key yet) but not the one whose only key is outside; etcd lists all three.
    let bare = lease_id(ok(ctl(&cluster, &addr, &["lease", "grant", "60"])));
    let listed = ok(ctl(&cluster, &addr, &["lease", "list"]));
    assert!(
        listed.contains(&inside) && listed.contains(&bare),
        "{listed}"
    );
    assert!(!listed.contains(&outside), "{listed}");
    assert!(listed.starts_with("found 2 leases"), "{listed}");
    let all = ok(cluster.etcdctl(&["lease", "list"]));
    for id in [&inside, &bare, &outside] {
        assert!(all.contains(id.as_str()), "{all}");
    }

    let revoked = ok(ctl(&cluster, &addr, &["lease", "revoke", &inside]));
    assert!(revoked.contains("revoked"), "{revoked}");
    assert_eq!(ok(cluster.etcdctl(&["get", "/app/mine"])), "");

    // A lease that does not exist: etcd's own NotFound.
    let out = ctl(&cluster, &addr, &["lease", "revoke", "1234abcd"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "revoking a missing lease succeeded");
    assert!(
        err.contains("etcdserver: requested lease not found"),
        "{err}"
    );
}
