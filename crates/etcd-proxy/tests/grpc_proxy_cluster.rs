//! `etcd-proxy grpc-proxy start` and etcd's Cluster service: registration under
//! `--resolver-prefix` (key, value, lease expiry after SIGKILL, revoke on SIGTERM), MemberList
//! from the registered proxies or passed through, and `--endpoints-auto-sync-interval`.
//! The real binary, a real etcd cluster, the real etcdctl.

mod common;

use std::time::{Duration, Instant};

use common::{ProxyProcess, free_port, ok};
use testkit::Cluster;

const PREFIX: &str = "__grpc_proxy_endpoint";

/// A proxy on `127.0.0.1:<port>` that registers that address under [`PREFIX`] with a 5 s TTL.
fn registered_proxy(cluster: &Cluster, port: u16) -> ProxyProcess {
    let endpoints = format!("--endpoints={}", cluster.client_urls().join(","));
    let listen = format!("--listen-addr=127.0.0.1:{port}");
    let advertise = format!("--advertise-client-url=127.0.0.1:{port}");
    let prefix = format!("--resolver-prefix={PREFIX}");
    let mut p = ProxyProcess::start(
        &[
            "grpc-proxy",
            "start",
            listen.as_str(),
            endpoints.as_str(),
            advertise.as_str(),
            prefix.as_str(),
            "--resolver-ttl=5",
        ],
        "started gRPC proxy",
    );
    p.wait_for_log("registered gRPC proxy", Duration::from_secs(20));
    p
}

/// A MemberList request message larger than the proxy reads (64 KiB): a field 99 with 70 000
/// bytes, which etcd would ignore.
fn over_limit() -> Vec<u8> {
    let payload_len: usize = 70_000;
    let mut field = vec![0x9a, 0x06]; // tag of field 99, length-delimited
    let mut n = payload_len;
    while n >= 0x80 {
        field.push((n as u8) | 0x80);
        n >>= 7;
    }
    field.push(n as u8);
    field.resize(field.len() + payload_len, b'x');
    let mut body = vec![0];
    body.extend_from_slice(&(field.len() as u32).to_be_bytes());
    body.extend_from_slice(&field);
    body
}

/// The registration keys and values in etcd, read directly.
fn registrations(cluster: &Cluster) -> String {
    ok(cluster.etcdctl(&["get", "--prefix", &format!("{PREFIX}/")]))
}

/// Polls until `cond` holds on the registrations, up to `timeout`; returns how long it took.
fn wait_registrations(
    cluster: &Cluster,
    timeout: Duration,
    cond: impl Fn(&str) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let regs = registrations(cluster);
        if cond(&regs) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "registrations not as expected within {timeout:?}:\n{regs}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_register_and_member_list_shows_them() {
    let cluster = Cluster::start(1).await;
    let (port_a, port_b) = (free_port(), free_port());
    let (addr_a, addr_b) = (format!("127.0.0.1:{port_a}"), format!("127.0.0.1:{port_b}"));
    let a = registered_proxy(&cluster, port_a);
    let mut b = registered_proxy(&cluster, port_b);

    // etcd's exact key and value.
    let regs = registrations(&cluster);
    for addr in [&addr_a, &addr_b] {
        let expected = format!(
            "{PREFIX}/{addr}\n{{\"Op\":0,\"Addr\":\"{addr}\",\"Metadata\":\"{{\\\"name\\\":\\\"{}\\\"}}\"}}\n",
            hostname()
        );
        assert!(regs.contains(&expected), "want {expected:?} in:\n{regs}");
    }
    // The keys are on a lease of the TTL asked for.
    let json = ok(cluster.etcdctl(&["get", &format!("{PREFIX}/{addr_a}"), "-w", "json"]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("etcdctl -w json");
    let lease = v["kvs"][0]["lease"].as_i64().expect("the key has a lease");
    let ttl = ok(cluster.etcdctl(&["lease", "timetolive", &format!("{lease:x}")]));
    assert!(ttl.contains("granted with TTL(5s)"), "{ttl}");

    // MemberList through either proxy lists both proxies.
    for addr in [&addr_a, &addr_b] {
        let members = ok(cluster.etcdctl_at(addr, &["member", "list"]));
        assert_eq!(members.lines().count(), 2, "{members}");
        assert!(
            members.contains(&addr_a) && members.contains(&addr_b),
            "{members}"
        );
        let json = ok(cluster.etcdctl_at(addr, &["member", "list", "-w", "json"]));
        let v: serde_json::Value = serde_json::from_str(&json).expect("etcdctl -w json");
        assert!(v["header"]["revision"].as_i64().unwrap_or(0) > 0, "{json}");
        let ids: Vec<u64> = v["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| m["ID"].as_u64().expect("ID"))
            .collect();
        assert!(ids.iter().all(|&id| id != 0) && ids[0] != ids[1], "{json}");
    }
    // A MemberList the proxy cannot read gets grpc-go's code for the reason, as etcd would.
    const PATH: &str = "/etcdserverpb.Cluster/MemberList";
    for (what, body, code, message) in [
        ("compressed", vec![1, 0, 0, 0, 0], "12", "compressed"),
        ("over the limit", over_limit(), "8", "larger than max"),
        (
            "truncated",
            vec![0, 0, 0, 0, 9, 8],
            "13",
            "ended in the middle",
        ),
        (
            "not a MemberListRequest",
            vec![0, 0, 0, 0, 2, 0x08, 0x80],
            "13",
            "unmarshalling",
        ),
    ] {
        let (got_code, got_message) = common::raw_call(&addr_a, PATH, &body, false).await;
        assert_eq!(got_code, code, "{what}: {got_message}");
        assert!(got_message.contains(message), "{what}: {got_message}");
    }
    // An empty request (no message at all) is answered.
    assert_eq!(
        common::raw_call(&addr_a, PATH, &[0, 0, 0, 0, 0], false)
            .await
            .0,
        "0"
    );

    // Other calls still work through a registering proxy.
    ok(cluster.etcdctl_at(&addr_a, &["put", "k", "v"]));
    assert_eq!(ok(cluster.etcdctl_at(&addr_b, &["get", "k"])), "k\nv\n");

    // SIGKILL: nobody revokes, the entry goes when the lease expires.
    a.signal("KILL");
    let key_a = format!("{PREFIX}/{addr_a}\n");
    let took = wait_registrations(&cluster, Duration::from_secs(5 + 10), |r| {
        !r.contains(&key_a)
    });
    eprintln!("killed proxy's registration expired after {took:?}");
    let members = ok(cluster.etcdctl_at(&addr_b, &["member", "list"]));
    assert!(
        !members.contains(&addr_a) && members.contains(&addr_b),
        "{members}"
    );

    // SIGTERM: the lease is revoked on the way out, the entry is gone at once.
    b.signal("TERM");
    assert_eq!(b.wait_exit(Duration::from_secs(15)), Some(0), "{}", b.log());
    assert_eq!(registrations(&cluster), "", "{}", b.log());
    assert!(!b.log_entries("revoked gRPC proxy registration").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_registration_is_written_again() {
    let cluster = Cluster::start(1).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut p = registered_proxy(&cluster, port);
    let key = format!("{PREFIX}/{addr}");
    let json = ok(cluster.etcdctl(&["get", &key, "-w", "json"]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("etcdctl -w json");
    let lease = v["kvs"][0]["lease"].as_i64().expect("the key has a lease");
    // Someone revokes the lease: the key goes, and the proxy notices at its next keep-alive.
    ok(cluster.etcdctl(&["lease", "revoke", &format!("{lease:x}")]));
    p.wait_for_log("lost gRPC proxy registration", Duration::from_secs(10));
    wait_registrations(&cluster, Duration::from_secs(10), |r| r.contains(&key));
    let json = ok(cluster.etcdctl(&["get", &key, "-w", "json"]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("etcdctl -w json");
    assert_ne!(v["kvs"][0]["lease"].as_i64(), Some(lease), "{json}");
}

#[tokio::test(flavor = "multi_thread")]
async fn member_list_passes_through_without_resolver_prefix() {
    let cluster = Cluster::start(3).await;
    let port = free_port();
    let endpoints = format!("--endpoints={}", cluster.client_urls().join(","));
    let listen = format!("--listen-addr=127.0.0.1:{port}");
    let _p = ProxyProcess::start(
        &["grpc-proxy", "start", listen.as_str(), endpoints.as_str()],
        "started gRPC proxy",
    );
    let addr = format!("127.0.0.1:{port}");
    let through = ok(cluster.etcdctl_at(&addr, &["member", "list"]));
    let direct = ok(cluster.etcdctl(&["member", "list"]));
    assert_eq!(through, direct);
    assert_eq!(through.lines().count(), 3, "{through}");
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_sync_learns_the_members_and_survives_the_first_one() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_healthy().await;
    let leader = cluster.leader().await.expect("the cluster has a leader");
    let first = (leader + 1) % cluster.len();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let endpoints = format!("--endpoints={}", cluster.member(first).client_url());
    let listen = format!("--listen-addr={addr}");
    let mut p = ProxyProcess::start(
        &[
            "grpc-proxy",
            "start",
            listen.as_str(),
            endpoints.as_str(),
            "--endpoints-auto-sync-interval=1s",
        ],
        "started gRPC proxy",
    );
    let line = p.wait_for_log("updated endpoints", Duration::from_secs(20));
    for i in (0..cluster.len()).filter(|&i| i != first) {
        let url = cluster.member(i).client_url();
        assert!(line.contains(&url), "{url} not in {line}");
    }
    assert!(
        !line.contains(&cluster.member(first).client_url()),
        "{line}"
    );
    ok(cluster.etcdctl_at(&addr, &["put", "synced", "yes"]));

    cluster.kill(first);
    cluster.wait_healthy().await;
    // The proxy knows the other two: calls keep succeeding. The first call after the kill may
    // still meet the dead member's connection being torn down, so allow a short settling time.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = cluster.etcdctl_at(&addr, &["get", "synced", "--print-value-only"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "get through the proxy keeps failing: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            p.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for i in 0..10 {
        let v = format!("v{i}");
        ok(cluster.etcdctl_at(&addr, &["put", "synced", &v]));
        assert_eq!(
            ok(cluster.etcdctl_at(&addr, &["get", "synced", "--print-value-only"])),
            format!("{v}\n")
        );
    }
    // The killed member is still a member of the cluster: the set did not change again.
    assert_eq!(p.log_entries("updated endpoints").len(), 1, "{}", p.log());
}
