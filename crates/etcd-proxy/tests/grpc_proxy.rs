//! `etcd-proxy grpc-proxy start` end to end: the real binary in front of a real 3-member etcd
//! cluster, used by the real etcdctl (and etcdutl to check a snapshot taken through it).

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{
    ProxyProcess, check_lease_flow, check_watch_sees_direct_put, etcdctl_stdin, ok, run_to_exit,
    start_grpc_proxy,
};
use testkit::Cluster;

/// etcdctl at the proxy only.
fn ctl(cluster: &Cluster, addr: &str, args: &[&str]) -> Output {
    cluster.etcdctl_at(addr, args)
}

/// Runs etcdctl at the proxy expecting failure; returns its stderr.
fn ctl_err(cluster: &Cluster, addr: &str, args: &[&str]) -> String {
    let out = ctl(cluster, addr, args);
    assert!(
        !out.status.success(),
        "etcdctl {args:?} should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The revision in the header of a `-w json` reply.
fn revision(json: &str) -> i64 {
    let v: serde_json::Value = serde_json::from_str(json).expect("etcdctl -w json output");
    v["header"]["revision"].as_i64().expect("header.revision")
}

#[tokio::test(flavor = "multi_thread")]
async fn kv_txn_and_compaction_through_the_proxy() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);

    let r1 = revision(&ok(ctl(
        &cluster,
        &addr,
        &["put", "foo", "v1", "-w", "json"],
    )));
    ok(ctl(&cluster, &addr, &["put", "foo", "v2"]));
    assert_eq!(ok(ctl(&cluster, &addr, &["get", "foo"])), "foo\nv2\n");
    // What went through the proxy is in the cluster, read directly.
    assert_eq!(
        ok(cluster.etcdctl(&["get", "foo", "--print-value-only"])),
        "v2\n"
    );
    let old = r1.to_string();
    assert_eq!(
        ok(ctl(
            &cluster,
            &addr,
            &["get", "foo", "--rev", &old, "--print-value-only"]
        )),
        "v1\n"
    );

    for (k, v) in [("p/a", "1"), ("p/b", "2"), ("p/c", "3"), ("q", "4")] {
        ok(ctl(&cluster, &addr, &["put", k, v]));
    }
    assert_eq!(
        ok(ctl(&cluster, &addr, &["get", "p/", "--prefix"])),
        "p/a\n1\np/b\n2\np/c\n3\n"
    );
    assert_eq!(
        ok(ctl(
            &cluster,
            &addr,
            &["get", "p/", "--prefix", "--keys-only"]
        )),
        "p/a\n\np/b\n\np/c\n\n"
    );
    let counted = ok(ctl(
        &cluster,
        &addr,
        &["get", "p/", "--prefix", "--count-only", "-w", "fields"],
    ));
    assert!(counted.contains("\"Count\" : 3"), "{counted}");
    assert_eq!(ok(ctl(&cluster, &addr, &["del", "p/", "--prefix"])), "3\n");
    assert_eq!(ok(ctl(&cluster, &addr, &["get", "p/", "--prefix"])), "");

    let out = ok(etcdctl_stdin(
        &addr,
        &["txn"],
        b"value(\"foo\") = \"v2\"\n\nput foo v3\n\nput nope x\n\n",
    ));
    assert!(out.starts_with("SUCCESS"), "{out}");
    assert_eq!(
        ok(ctl(&cluster, &addr, &["get", "foo", "--print-value-only"])),
        "v3\n"
    );
    assert_eq!(ok(ctl(&cluster, &addr, &["get", "nope"])), "");

    // Compaction through the proxy, then etcd's own error text for a compacted revision.
    let now = revision(&ok(ctl(&cluster, &addr, &["get", "foo", "-w", "json"])));
    let compacted = ok(ctl(&cluster, &addr, &["compaction", &now.to_string()]));
    assert!(compacted.contains(&now.to_string()), "{compacted}");
    let err = ctl_err(&cluster, &addr, &["get", "foo", "--rev", &old]);
    assert!(
        err.contains("etcdserver: mvcc: required revision has been compacted"),
        "{err}"
    );

    // etcd's status for an invalid request passes through as etcd sent it.
    let err = ctl_err(&cluster, &addr, &["put", "", "v"]);
    assert!(err.contains("etcdserver: key is not provided"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_watch_and_lock_through_the_proxy() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);

    let id = check_lease_flow(&cluster, &addr);
    let err = ctl_err(&cluster, &addr, &["lease", "revoke", &id]);
    assert!(
        err.contains("etcdserver: requested lease not found"),
        "{err}"
    );

    // A watch held open through the proxy sees a put made directly on etcd.
    check_watch_sees_direct_put(&cluster, &addr, "wkey");

    // The lock service (v3lockpb) is forwarded like any other.
    let held = ok(ctl(&cluster, &addr, &["lock", "l1", "echo", "held"]));
    assert!(held.lines().any(|l| l == "held"), "{held}");
    // And released afterwards: a second holder gets it too.
    let again = ok(ctl(&cluster, &addr, &["lock", "l1", "echo", "again"]));
    assert!(again.lines().any(|l| l == "again"), "{again}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_and_maintenance_through_the_proxy() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);

    let members = ok(ctl(&cluster, &addr, &["member", "list"]));
    for i in 0..cluster.len() {
        let m = cluster.member(i);
        assert!(
            members.contains(m.name()) && members.contains(&m.client_url()),
            "{members}"
        );
    }
    let status = ok(ctl(&cluster, &addr, &["endpoint", "status"]));
    assert!(status.starts_with(&addr), "{status}");

    // The standard gRPC health service: Check{service: ""} is SERVING (status 1), as etcd
    // answers it directly; an unknown service is etcd's NOT_FOUND.
    const CHECK: &str = "/grpc.health.v1.Health/Check";
    let (code, message, body) = common::raw_call_body(&addr, CHECK, &[0, 0, 0, 0, 0], false).await;
    assert_eq!(
        (code.as_str(), &body[..]),
        ("0", &[0, 0, 0, 0, 2, 0x08, 0x01][..]),
        "{message}"
    );
    let unknown = [0, 0, 0, 0, 4, 0x0a, 0x02, b'n', b'o'];
    let direct = cluster.member(0).client_endpoint();
    let via_proxy = common::raw_call(&addr, CHECK, &unknown, false).await;
    assert_eq!(
        via_proxy,
        common::raw_call(&direct, CHECK, &unknown, false).await
    );
    assert_eq!(via_proxy.0, "5", "{via_proxy:?}");

    ok(ctl(&cluster, &addr, &["put", "snap", "shot"]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("snap.db");
    let file_arg = file.to_string_lossy().into_owned();
    ok(ctl(&cluster, &addr, &["snapshot", "save", &file_arg]));
    let size = std::fs::metadata(&file).expect("snapshot file").len();
    assert!(size > 0, "empty snapshot");
    let etcdutl = testkit::etcd_bin_dir().join("etcdutl");
    if etcdutl.is_file() {
        let out = Command::new(etcdutl)
            .args(["snapshot", "status", &file_arg, "-w", "json"])
            .output()
            .expect("run etcdutl");
        let text = ok(out);
        assert!(text.contains("\"totalKey\""), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_continue_when_a_follower_is_killed() {
    let mut cluster = Cluster::start(3).await;
    let (p, addr) = start_grpc_proxy(&cluster, &[]);
    for i in 0..6 {
        ok(ctl(&cluster, &addr, &["put", "k", &i.to_string()]));
    }
    let leader = cluster.leader().await.expect("the cluster has a leader");
    let follower = (leader + 1) % cluster.len();
    cluster.kill(follower);

    // Enough calls that round-robin would have picked the dead member several times.
    for i in 0..12 {
        let v = format!("after-{i}");
        ok(ctl(&cluster, &addr, &["put", "k", &v]));
        assert_eq!(
            ok(ctl(&cluster, &addr, &["get", "k", "--print-value-only"])),
            format!("{v}\n")
        );
    }
    let dead = cluster.member(follower).client_endpoint();
    assert!(
        p.log_entries("lost connection to etcd member")
            .iter()
            .chain(p.log_entries("etcd member closed the connection").iter())
            .any(|e| e["endpoint"] == dead.as_str()),
        "no log of the lost member {dead}:\n{}",
        p.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_reachable_member_is_unavailable() {
    // A port nothing listens on: every connect is refused.
    let dead = format!("--endpoints=127.0.0.1:{}", common::free_port());
    let p = ProxyProcess::start(
        &["grpc-proxy", "start", "--listen-addr=127.0.0.1:0", &dead],
        "started gRPC proxy",
    );
    let addr = p.grpc_address();
    // A put is not retried by clientv3, so etcdctl prints the proxy's status as it came.
    let out = Command::new(testkit::etcdctl_path())
        .arg(format!("--endpoints={addr}"))
        .args([
            "--dial-timeout=5s",
            "--command-timeout=20s",
            "put",
            "a",
            "b",
        ])
        .env("ETCDCTL_API", "3")
        .stdin(Stdio::null())
        .output()
        .expect("run etcdctl");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Unavailable") && err.contains("no etcd member is reachable"),
        "{err}"
    );
}

#[test]
fn https_metrics_addr_without_a_certificate_is_refused() {
    let (code, text) = run_to_exit(&[
        "grpc-proxy",
        "start",
        "--listen-addr=127.0.0.1:0",
        "--endpoints=127.0.0.1:1",
        "--metrics-addr=https://127.0.0.1:9999",
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("https needs --cert-file and --key-file, or --auto-tls"),
        "{text}"
    );
}

#[test]
fn sigterm_stops_the_proxy() {
    let dead = format!("--endpoints=127.0.0.1:{}", common::free_port());
    let mut p = ProxyProcess::start(
        &["grpc-proxy", "start", "--listen-addr=127.0.0.1:0", &dead],
        "started gRPC proxy",
    );
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(15)), Some(0), "{}", p.log());
}
