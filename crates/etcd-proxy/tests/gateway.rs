//! `etcd-proxy gateway start` end to end: the real binary in front of real etcd members, used by
//! the real etcdctl and by raw TCP/HTTP clients.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    ProxyProcess, check_lease_flow, check_watch_sees_direct_put, etcdctl_stdin, free_port, ok,
    run_to_exit,
};
use testkit::Cluster;

/// Starts a gateway in front of `cluster` with `extra` flags; listens on a free port.
fn gateway(cluster: &Cluster, extra: &[&str]) -> ProxyProcess {
    let endpoints = format!("--endpoints={}", cluster.client_urls().join(","));
    let mut args = vec![
        "gateway",
        "start",
        "--listen-addr=127.0.0.1:0",
        endpoints.as_str(),
    ];
    args.extend_from_slice(extra);
    ProxyProcess::start(&args, "ready to proxy client requests")
}

/// etcdctl at the gateway, with short timeouts so a hang shows as a failure.
fn ctl(cluster: &Cluster, gw: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--dial-timeout=3s", "--command-timeout=5s"];
    all.extend_from_slice(args);
    cluster.etcdctl_at(gw, &all)
}

fn http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read reply");
    out
}

fn post(addr: &str, path: &str, body: &str) -> String {
    http(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

async fn follower(cluster: &Cluster) -> usize {
    let leader = cluster.leader().await.expect("the cluster has a leader");
    (leader + 1) % cluster.len()
}

fn metric(text: &str, name: &str, endpoint: &str) -> f64 {
    let prefix = format!("{name}{{endpoint=\"{endpoint}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn etcdctl_works_through_the_gateway_on_three_members() {
    let cluster = Cluster::start(3).await;
    let maddr = format!("--metrics-addr=127.0.0.1:{}", free_port());
    let gw = gateway(&cluster, &[&maddr]);
    let addr = gw.listen_addr();

    ok(ctl(&cluster, &addr, &["put", "foo", "bar"]));
    assert_eq!(ok(ctl(&cluster, &addr, &["get", "foo"])), "foo\nbar\n");
    // What went through the gateway is in the cluster, read directly.
    assert_eq!(
        ok(cluster.etcdctl(&["get", "foo", "--print-value-only"])),
        "bar\n"
    );

    // txn reads its operations from stdin.
    let txn = etcdctl_stdin(
        &addr,
        &["txn"],
        b"value(\"foo\") = \"bar\"\n\nput foo baz\n\nput nope x\n\n",
    );
    let out = ok(txn);
    assert!(out.starts_with("SUCCESS"), "{out}");
    assert_eq!(
        ok(ctl(&cluster, &addr, &["get", "foo", "--print-value-only"])),
        "baz\n"
    );
    assert_eq!(ok(ctl(&cluster, &addr, &["get", "nope"])), "");

    // Leases: grant, attach, keep alive, time to live, revoke (the key goes with it).
    check_lease_flow(&cluster, &addr);
    // A watch held open through the gateway sees a put made directly on a member.
    check_watch_sees_direct_put(&cluster, &addr, "wkey");

    // The HTTP/JSON API passes through untouched as well (the gateway is byte-transparent).
    let reply = post(&addr, "/v3/kv/range", r#"{"key":"Zm9v"}"#);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.contains(r#""key":"Zm9v""#) && reply.contains(r#""value":"YmF6""#),
        "{reply}"
    );

    // Round robin: connections were spread over all three members, and bytes were counted.
    let metrics_addr = maddr.trim_start_matches("--metrics-addr=");
    let text = http(
        metrics_addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    for ep in cluster.client_endpoints() {
        assert!(
            metric(&text, "etcd_gateway_endpoint_connections_total", &ep) >= 1.0,
            "{ep} got no connection:\n{text}"
        );
        assert_eq!(metric(&text, "etcd_gateway_endpoint_up", &ep), 1.0);
        assert!(metric(&text, "etcd_gateway_endpoint_received_bytes_total", &ep) > 0.0);
    }
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
    let health = http(
        metrics_addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with(r#"{"health":"true"}"#),
        "{health}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_member_is_invisible_to_clients_and_used_again_after_retry_delay() {
    let mut cluster = Cluster::start(3).await;
    let maddr = format!("127.0.0.1:{}", free_port());
    let mflag = format!("--metrics-addr={maddr}");
    // Probing off: this test is about the dial-failure path.
    let mut gw = gateway(
        &cluster,
        &["--retry-delay=2s", "--health-check-interval=0", &mflag],
    );
    let addr = gw.listen_addr();
    ok(ctl(&cluster, &addr, &["put", "k", "v"]));

    // A follower: killing the leader starts an election that clients see with or without a gateway.
    let v = follower(&cluster).await;
    let victim = cluster.member(v).client_endpoint();
    cluster.kill(v);
    // Every new connection succeeds: the one that lands on the dead member moves on silently.
    for i in 0..9 {
        let out = ctl(&cluster, &addr, &["get", "k", "--print-value-only"]);
        assert_eq!(ok(out), "v\n", "connection {i} saw the dead member");
    }
    let line = gw.wait_for_log("deactivated endpoint", Duration::from_secs(5));
    assert!(
        line.contains(&victim) && line.contains("\"interval\":\"2s\""),
        "{line}"
    );

    cluster.restart(v).await;
    let line = gw.wait_for_log("\"msg\":\"activated\"", Duration::from_secs(30));
    assert!(line.contains(&victim), "{line}");
    let get_metrics = || {
        http(
            &maddr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    };
    let before = metric(
        &get_metrics(),
        "etcd_gateway_endpoint_connections_total",
        &victim,
    );
    for _ in 0..6 {
        assert_eq!(
            ok(ctl(&cluster, &addr, &["get", "k", "--print-value-only"])),
            "v\n"
        );
    }
    let after = metric(
        &get_metrics(),
        "etcd_gateway_endpoint_connections_total",
        &victim,
    );
    assert!(
        after >= before + 1.0,
        "restarted member got no new connection ({before} -> {after})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_member_that_still_accepts_tcp_is_found_by_the_probe_and_skipped() {
    let cluster = Cluster::start(3).await;
    let mut gw = gateway(
        &cluster,
        &[
            "--retry-delay=1s",
            "--health-check-interval=300ms",
            "--dial-timeout=1s",
        ],
    );
    let addr = gw.listen_addr();
    ok(ctl(&cluster, &addr, &["put", "k", "v"]));

    let v = follower(&cluster).await;
    let victim = cluster.member(v).client_endpoint();
    cluster.pause(v); // SIGSTOP: the kernel still completes TCP handshakes for it
    let needle =
        format!("\"address\":\"{victim}\",\"interval\":\"1s\",\"error\":\"health check failed");
    gw.wait_for_log(&needle, Duration::from_secs(15));
    // The others stay in: only the stopped member was taken out.
    for i in (0..cluster.len()).filter(|&i| i != v) {
        let m = cluster.member(i);
        assert!(
            m.is_running(),
            "member {i} died during the test:\n{}",
            m.log()
        );
    }
    for i in 0..9 {
        let out = ctl(&cluster, &addr, &["get", "k", "--print-value-only"]);
        assert_eq!(ok(out), "v\n", "connection {i} went to the stopped member");
    }
    cluster.resume(v);
    let line = gw.wait_for_log("\"msg\":\"activated\"", Duration::from_secs(15));
    assert!(line.contains(&victim), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_every_member_down_clients_are_closed_and_served_again_when_one_returns() {
    let mut cluster = Cluster::start(1).await;
    // A long retry delay: recovery must not wait for it.
    let mut gw = gateway(
        &cluster,
        &["--retry-delay=10m", "--health-check-interval=0"],
    );
    let addr = gw.listen_addr();
    ok(ctl(&cluster, &addr, &["put", "k", "v"]));
    cluster.kill(0);

    // A raw client is closed promptly and cleanly: EOF, nothing written.
    let started = Instant::now();
    let mut s = TcpStream::connect(&addr).expect("the gateway still accepts");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).expect("clean close, not a timeout");
    assert_eq!(n, 0, "nothing is written to a client no member can serve");
    assert!(started.elapsed() < Duration::from_secs(10));
    gw.wait_for_log("no endpoint reachable", Duration::from_secs(5));
    assert!(!ctl(&cluster, &addr, &["get", "k"]).status.success());

    cluster.restart(0).await;
    // Served at once, although the member is still marked out for ten minutes.
    assert_eq!(
        ok(ctl(&cluster, &addr, &["get", "k", "--print-value-only"])),
        "v\n"
    );
    assert!(
        gw.wait_exit(Duration::from_millis(10)).is_none(),
        "the gateway kept running"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_half_closed_client_still_gets_the_whole_reply() {
    let cluster = Cluster::start(1).await;
    let gw = gateway(&cluster, &[]);
    let addr = gw.listen_addr();
    // A request, then shutdown(SHUT_WR), then read to EOF: etcd's gateway loses the reply here.
    // (Handlers that honour the request context, like /v3/kv/range, answer 408 to a half-closed
    // client even without a gateway: Go cancels the context on EOF. /version and /metrics do not.)
    let half_closed = |target: &str, path: &str| {
        let mut s = TcpStream::connect(target).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    };
    let direct = half_closed(&cluster.member(0).client_endpoint(), "/version");
    let through = half_closed(&addr, "/version");
    assert!(
        through.starts_with("HTTP/1.0 200 OK") && through.contains("etcdserver"),
        "{through:?}"
    );
    let body = |r: &str| r.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    assert_eq!(body(&through), body(&direct));
    // A large reply (tens of kilobytes, many segments) arrives whole: metrics are sorted by
    // name, so the last family proves the tail came through.
    let reply = half_closed(&addr, "/metrics");
    assert!(reply.len() > 20_000, "short reply: {} bytes", reply.len());
    assert!(
        reply.contains("etcd_server_has_leader 1")
            && reply.contains("promhttp_metric_handler_requests_total"),
        "{}",
        &reply[reply.len() - 300..]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_listen_address_works() {
    let cluster = Cluster::start(1).await;
    let endpoints = format!("--endpoints={}", cluster.client_urls().join(","));
    let gw = ProxyProcess::start(
        &["gateway", "start", "--listen-addr=[::1]:0", &endpoints],
        "ready to proxy client requests",
    );
    let addr = gw.listen_addr();
    assert!(addr.starts_with("[::1]:"), "{addr}");
    ok(ctl(&cluster, &addr, &["put", "six", "yes"]));
    assert_eq!(
        ok(cluster.etcdctl(&["get", "six", "--print-value-only"])),
        "yes\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_accepting_and_drains_open_connections() {
    let cluster = Cluster::start(1).await;
    let mut gw = gateway(&cluster, &["--drain-timeout=2s"]);
    let addr = gw.listen_addr();
    // An open watch connection must not keep the gateway alive past the drain timeout.
    let mut watch = Command::new(testkit::etcdctl_path())
        .args(["--endpoints", &addr, "watch", "x"])
        .env("ETCDCTL_API", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    gw.wait_for_log("ready", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(500)); // let the watch connect
    gw.signal("TERM");
    let line = gw.wait_for_log("received signal; shutting down", Duration::from_secs(5));
    assert!(line.contains("terminated"), "{line}");
    let line = gw.wait_for_log(
        "stopped accepting connections; draining",
        Duration::from_secs(5),
    );
    assert!(line.contains("\"connections\":1"), "{line}");
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        gw.log()
    );
    gw.wait_for_log("drain timed out", Duration::from_secs(1));
    assert!(TcpStream::connect(&addr).is_err(), "the listener is closed");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn bad_flags_give_one_clear_line_and_exit_1() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let listen_busy = format!("--listen-addr={busy_addr}");
    let self_port = free_port();
    let listen_self = format!("--listen-addr=127.0.0.1:{self_port}");
    let ep_self = format!("--endpoints=127.0.0.1:{self_port}");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--endpoints=localhost"],
            "error parsing endpoint \"localhost\"",
        ),
        (vec!["--endpoints=127.0.0.1:abc"], "invalid port \"abc\""),
        (
            vec!["--endpoints=ftp://127.0.0.1:2379"],
            "unsupported scheme",
        ),
        (vec!["--endpoints="], "no endpoints found"),
        (
            vec!["--listen-addr=nope", "--endpoints=127.0.0.1:1"],
            "failed to validate listen address: nope",
        ),
        (
            vec![&listen_self, &ep_self],
            "should not resolve to the gateway listen addr",
        ),
        (
            vec![&listen_busy, "--endpoints=127.0.0.1:1"],
            "address already in use",
        ),
        (
            vec!["--retry-delay=-1s", "--endpoints=127.0.0.1:1"],
            "--retry-delay must not be negative",
        ),
        (vec!["--retry-delay=abc"], "invalid duration"),
        (
            vec!["--dial-timeout=0s", "--endpoints=127.0.0.1:1"],
            "--dial-timeout must be greater than 0",
        ),
        (
            vec![
                "--metrics-addr=nope",
                "--endpoints=127.0.0.1:1",
                "--listen-addr=127.0.0.1:0",
            ],
            "invalid --metrics-addr",
        ),
        (
            vec![
                "--discovery-dns-server=nope",
                "--discovery-srv=example.test",
            ],
            "invalid --discovery-dns-server",
        ),
        (vec!["--no-such-flag"], "no-such-flag"),
    ];
    for (flags, want) in cases {
        let mut args = vec!["gateway", "start"];
        args.extend(flags.iter().copied());
        let (code, out) = run_to_exit(&args);
        assert_eq!(code, 1, "{args:?} exited {code}: {out}");
        assert!(out.contains(want), "{args:?}: want {want:?} in:\n{out}");
        assert!(!out.contains("panicked"), "{args:?} panicked:\n{out}");
    }
    drop(busy);
}
