//! The test kit against real etcd: clusters start, serve, fail the way tests need, and leave
//! nothing behind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use testkit::certs::Ca;
use testkit::{Cluster, ClusterOptions, TlsOptions};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_success(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed: {}", describe(out));
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn single_member_serves_and_drop_cleans_up() {
    let t0 = Instant::now();
    let cluster = Cluster::start(1).await;
    eprintln!("1-member cluster healthy after {:?}", t0.elapsed());
    assert_eq!(cluster.len(), 1);
    assert!(cluster.client_urls()[0].starts_with("http://127.0.0.1:"));

    cluster.etcdctl_ok(&["put", "greeting", "hello world"]);
    let value = cluster.etcdctl_ok(&["get", "greeting", "--print-value-only"]);
    assert_eq!(value.trim(), "hello world");

    let member = cluster.member(0);
    let pid = member.pid().expect("a started member has a pid");
    let data_dir = member.data_dir().to_path_buf();
    assert!(member.is_running());
    assert!(process_exists(pid));
    assert!(data_dir.join("member").is_dir(), "etcd wrote no data");

    drop(cluster);
    assert!(
        !process_exists(pid),
        "etcd pid {pid} still exists after drop"
    );
    assert!(
        !data_dir.exists(),
        "{} still exists after drop",
        data_dir.display()
    );
}

#[tokio::test]
async fn three_members_survive_kill_restart_and_pause() {
    let t0 = Instant::now();
    let mut cluster = Cluster::start(3).await;
    eprintln!("3-member cluster healthy after {:?}", t0.elapsed());

    let members = cluster.etcdctl_ok(&["member", "list"]);
    assert_eq!(members.lines().count(), 3, "member list:\n{members}");
    for i in 0..3 {
        let m = cluster.member(i);
        assert!(
            members.contains(m.name()) && members.contains(&m.peer_url()),
            "{} missing from member list:\n{members}",
            m.name()
        );
    }

    // Kill the leader, the harder case: the other two still make a quorum and elect a new one.
    let victim = cluster
        .leader()
        .await
        .expect("a healthy cluster has a leader");
    let others: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let victim_pid = cluster.member(victim).pid().expect("the leader is running");
    cluster.kill(victim);
    assert!(!cluster.member(victim).is_running());
    assert_eq!(cluster.member(victim).pid(), None);
    assert!(!process_exists(victim_pid));
    assert_eq!(
        cluster.client_endpoints().len(),
        3,
        "killed members stay listed"
    );
    let t1 = Instant::now();
    cluster.wait_healthy().await;
    eprintln!("survivors healthy after {:?}", t1.elapsed());
    let new_leader = cluster
        .leader()
        .await
        .expect("the survivors elected a leader");
    assert!(others.contains(&new_leader));
    let survivors = others
        .iter()
        .map(|&i| cluster.member(i).client_url())
        .collect::<Vec<_>>()
        .join(",");
    assert_success(
        &cluster.etcdctl_at(&survivors, &["put", "after-kill", "still-serving"]),
        "put with the old leader down",
    );

    // Restart: same member, catches up on what it missed.
    let t2 = Instant::now();
    cluster.restart(victim).await;
    eprintln!("member restart healthy after {:?}", t2.elapsed());
    assert!(cluster.member(victim).is_running());
    let restarted = cluster.member(victim).client_url();
    assert_success(
        &cluster.etcdctl_at(&restarted, &["endpoint", "health"]),
        "endpoint health at the restarted member",
    );
    // Serializable: answered from the restarted member's own store.
    let got = cluster.etcdctl_at(
        &restarted,
        &["get", "after-kill", "--print-value-only", "--consistency=s"],
    );
    assert_success(&got, "get at the restarted member");
    assert_eq!(stdout(&got).trim(), "still-serving");

    // Pause: the kernel still accepts connections, etcd answers nothing.
    let frozen_member = others[0];
    cluster.pause(frozen_member);
    let m1 = cluster.member(frozen_member);
    assert!(m1.is_paused() && m1.is_running());
    let addr: SocketAddr = m1.client_endpoint().parse().expect("endpoint is ip:port");
    TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .expect("a paused member's port still accepts TCP");
    let m1 = m1.client_url();
    let t3 = Instant::now();
    let frozen = cluster.etcdctl_at(
        &m1,
        &[
            "get",
            "after-kill",
            "--dial-timeout=1s",
            "--command-timeout=2s",
        ],
    );
    eprintln!(
        "etcdctl against a paused member gave up after {:?}",
        t3.elapsed()
    );
    assert!(
        !frozen.status.success(),
        "get from a paused member succeeded: {}",
        describe(&frozen)
    );

    cluster.resume(frozen_member);
    assert!(!cluster.member(frozen_member).is_paused());
    let t4 = Instant::now();
    cluster.wait_healthy().await;
    eprintln!("resumed member healthy after {:?}", t4.elapsed());
    assert_success(
        &cluster.etcdctl_at(&m1, &["endpoint", "health"]),
        "endpoint health at the resumed member",
    );

    // Drop kills every member, a stopped one included (SIGKILL needs no cooperation).
    cluster.pause(frozen_member);
    let pids: Vec<u32> = (0..3).filter_map(|i| cluster.member(i).pid()).collect();
    assert_eq!(pids.len(), 3);
    drop(cluster);
    for pid in pids {
        assert!(!process_exists(pid), "etcd pid {pid} survived drop");
    }
}

#[tokio::test]
async fn tls_cluster_with_client_cert_auth_and_empty_cn() {
    let certs = tempfile::tempdir().expect("temp dir for certificates");
    let ca = Ca::new(certs.path(), "ca");
    let server = ca.server("server", &["127.0.0.1", "localhost"]);
    let client = ca.client("client", "");
    let tls = TlsOptions {
        ca: ca.cert_path().to_path_buf(),
        server_cert: server.cert,
        server_key: server.key,
        client_cert_auth: true,
        client_cert: Some(client.cert.clone()),
        client_key: Some(client.key.clone()),
    };
    let cluster = Cluster::start_with(ClusterOptions {
        members: 1,
        tls: Some(tls),
    })
    .await;
    let url = cluster.member(0).client_url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    cluster.etcdctl_ok(&["put", "secure", "yes"]);
    let value = cluster.etcdctl_ok(&["get", "secure", "--print-value-only"]);
    assert_eq!(value.trim(), "yes");

    // A client without a certificate is turned away.
    let no_cert = std::process::Command::new(testkit::etcdctl_path())
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints={url}"),
            "--cacert",
            &ca.cert_path().display().to_string(),
            "--dial-timeout=2s",
            "--command-timeout=3s",
            "get",
            "secure",
        ])
        .output()
        .expect("run etcdctl");
    assert!(
        !no_cert.status.success()
            && String::from_utf8_lossy(&no_cert.stderr).contains("handshake failed"),
        "get without a client cert did not fail the TLS handshake: {}",
        describe(&no_cert)
    );

    // Plain http to the TLS port fails: etcdctl gets nothing, a raw request no 200.
    let plain = cluster.etcdctl_at(
        &format!("http://{}", cluster.member(0).client_endpoint()),
        &["get", "secure", "--dial-timeout=2s", "--command-timeout=3s"],
    );
    assert!(
        !plain.status.success(),
        "plain-http get succeeded: {}",
        describe(&plain)
    );
    let raw = raw_http_get(&cluster.member(0).client_endpoint(), "/health");
    assert!(
        !raw.starts_with("HTTP/1.1 200") && !raw.starts_with("HTTP/1.0 200"),
        "plain http /health to a TLS port answered: {raw}"
    );

    // Health and metrics stay readable over the plain metrics listener.
    assert_eq!(cluster.metric(0, "etcd_server_has_leader").await, Some(1.0));
}

// Multi-thread: also covers etcdctl's `block_in_place` path next to the async variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_reads_prometheus_samples() {
    let cluster = Cluster::start(1).await;
    assert_eq!(cluster.metric(0, "etcd_server_has_leader").await, Some(1.0));
    assert_eq!(cluster.metric(0, "testkit_no_such_metric").await, None);

    let before = cluster
        .metric(0, "etcd_mvcc_put_total")
        .await
        .expect("etcd_mvcc_put_total is exported");
    cluster.etcdctl_ok(&["put", "counted", "1"]);
    let put = cluster.etcdctl_async(&["put", "counted", "2"]).await;
    assert_success(&put, "async put");
    let after = cluster.metric(0, "etcd_mvcc_put_total").await;
    assert_eq!(after, Some(before + 2.0));
}

/// Sends a plain HTTP/1.0 GET and returns whatever comes back (empty if the peer just closes).
fn raw_http_get(endpoint: &str, path: &str) -> String {
    let addr: SocketAddr = endpoint.parse().expect("endpoint is ip:port");
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to etcd");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set read timeout");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {endpoint}\r\n\r\n").as_bytes())
        .expect("send request");
    let mut response = Vec::new();
    // A TLS server may reset the connection: what was read so far is the answer.
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}
