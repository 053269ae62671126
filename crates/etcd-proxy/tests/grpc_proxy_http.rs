//! `etcd-proxy grpc-proxy start`'s plain-HTTP side, end to end: `/health`, `/proxy/health`,
//! `/metrics`, `/proxy/metrics` and 404s on the gRPC port (HTTP/1.1 and HTTP/2) and on
//! `--metrics-addr`, read with curl; and member health: a stopped (SIGSTOP) member is skipped.

mod common;

use std::time::{Duration, Instant};

use common::{ProxyProcess, curl, ok, start_grpc_proxy};
use testkit::Cluster;

fn address(p: &ProxyProcess, msg: &str) -> String {
    p.log_entries(msg)
        .first()
        .and_then(|v| v["address"].as_str())
        .unwrap_or_else(|| panic!("`{msg}` has an address:\n{}", p.log()))
        .to_string()
}

fn get(url: &str) -> (u16, String) {
    curl(&[], url)
}

/// The value of the sample of `name` whose labels contain every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn check_endpoints(cluster: &Cluster, grpc_addr: &str, http_base: &str) {
    assert_eq!(
        get(&format!("{http_base}/health")),
        (200, r#"{"health":"true","reason":""}"#.to_string())
    );
    assert_eq!(
        get(&format!("{http_base}/proxy/health")),
        (200, r#"{"health":"true","reason":""}"#.to_string())
    );
    let (code, body) = get(&format!("{http_base}/metrics"));
    assert_eq!(code, 200);
    assert!(body.contains("etcd_server_has_leader 1"), "{body}");

    ok(cluster.etcdctl_at(grpc_addr, &["put", "hk", "hv"]));
    assert_eq!(
        ok(cluster.etcdctl_at(grpc_addr, &["get", "hk", "--print-value-only"])),
        "hv\n"
    );
    let (code, text) = get(&format!("{http_base}/proxy/metrics"));
    assert_eq!(code, 200);
    let range_ok = [
        "grpc_code=\"OK\"",
        "grpc_method=\"Range\"",
        "grpc_service=\"etcdserverpb.KV\"",
        "grpc_type=\"unary\"",
    ];
    assert!(
        sample(&text, "grpc_server_handled_total", &range_ok).is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert!(
        sample(&text, "grpc_server_started_total", &["grpc_method=\"Put\""])
            .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "grpc_server_handled_total",
            &["grpc_code=\"OK\"", "grpc_method=\"Put\""]
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    for name in [
        "etcd_grpc_proxy_watchers_coalescing_total",
        "etcd_grpc_proxy_events_coalescing_total",
    ] {
        assert_eq!(sample(&text, name, &[]), Some(0.0), "{name}:\n{text}");
    }
    assert!(
        sample(&text, "etcd_server_health_success", &[]).is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert!(
        sample(&text, "process_resident_memory_bytes", &[]).is_some_and(|v| v > 0.0),
        "{text}"
    );

    assert_eq!(
        get(&format!("{http_base}/no/such/path")),
        (404, "404 page not found\n".to_string())
    );
    assert_eq!(
        curl(&["-X", "POST"], &format!("{http_base}/health")),
        (405, "Method Not Allowed\n".to_string())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics_on_the_grpc_port_and_on_metrics_addr() {
    let cluster = Cluster::start(3).await;
    let (p, addr) = start_grpc_proxy(&cluster, &["--metrics-addr=http://127.0.0.1:0"]);
    let metrics_addr = address(&p, "gRPC proxy listening for metrics");

    check_endpoints(&cluster, &addr, &format!("http://{addr}"));
    check_endpoints(&cluster, &addr, &format!("http://{metrics_addr}"));

    // HTTP/2 without TLS (prior knowledge) on the gRPC port: etcd's cmux sends that to gRPC.
    for path in ["/health", "/proxy/health"] {
        assert_eq!(
            curl(
                &["--http2-prior-knowledge"],
                &format!("http://{addr}{path}")
            ),
            (200, r#"{"health":"true","reason":""}"#.to_string()),
            "{path}"
        );
    }
    let (code, body) = curl(
        &["--http2-prior-knowledge"],
        &format!("http://{addr}/metrics"),
    );
    assert_eq!(code, 200);
    assert!(body.contains("etcd_server_has_leader"), "{body}");
    // The metrics listener serves no gRPC.
    let out = cluster.etcdctl_at(&metrics_addr, &["get", "hk", "--command-timeout=3s"]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_503_when_every_member_is_down() {
    let mut cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    assert_eq!(get(&format!("http://{addr}/health")).0, 200);
    for i in 0..cluster.len() {
        cluster.kill(i);
    }
    assert_eq!(
        get(&format!("http://{addr}/health")),
        (
            503,
            "{\"health\":\"false\",\"reason\":\"GET ERROR:context deadline exceeded\"}\n"
                .to_string()
        )
    );
    let (code, body) = get(&format!("http://{addr}/proxy/health"));
    assert_eq!(code, 503);
    assert!(
        body.starts_with(r#"{"health":"false","reason":"GET ERROR:"#),
        "{body}"
    );
    assert_eq!(
        get(&format!("http://{addr}/metrics")),
        (500, "Internal server error\n".to_string())
    );
    let (_, text) = get(&format!("http://{addr}/proxy/metrics"));
    assert!(
        sample(&text, "etcd_server_health_failures", &[]).is_some_and(|v| v >= 1.0),
        "{text}"
    );
}

/// Range calls member `i` has served, from its own `/metrics`.
async fn ranges_served(cluster: &Cluster, i: usize) -> f64 {
    let text = cluster.metrics_text(i).await;
    text.lines()
        .filter(|l| {
            l.starts_with("grpc_server_handled_total{") && l.contains("grpc_method=\"Range\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_member_is_skipped_and_used_again_once_it_answers() {
    let cluster = Cluster::start(3).await;
    let (p, addr) = start_grpc_proxy(&cluster, &[]);
    ok(cluster.etcdctl_at(&addr, &["put", "k", "v0"]));
    let leader = cluster.leader().await.expect("the cluster has a leader");
    let follower = (leader + 1) % cluster.len();
    let stopped = cluster.member(follower).client_endpoint();
    cluster.pause(follower);
    // Before the probe has caught it, `/health` does not wait on the stopped member alone.
    for _ in 0..3 {
        assert_eq!(get(&format!("http://{addr}/health")).0, 200);
    }

    // The probe (every 5 s by default) takes it out.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p
        .log_entries("deactivated endpoint")
        .iter()
        .any(|e| e["endpoint"] == stopped.as_str())
    {
        assert!(
            Instant::now() < deadline,
            "{stopped} was not deactivated:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Enough calls that round-robin would have picked the stopped member several times; each
    // must succeed well within etcdctl's command timeout.
    for i in 0..9 {
        let v = format!("while-stopped-{i}");
        ok(cluster.etcdctl_at(&addr, &["--command-timeout=3s", "put", "k", &v]));
        assert_eq!(
            ok(cluster.etcdctl_at(
                &addr,
                &["--command-timeout=3s", "get", "k", "--print-value-only"]
            )),
            format!("{v}\n")
        );
    }
    let (code, _) = get(&format!("http://{addr}/health"));
    assert_eq!(code, 200);

    cluster.resume(follower);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p
        .log_entries("activated endpoint")
        .iter()
        .any(|e| e["endpoint"] == stopped.as_str())
    {
        assert!(
            Instant::now() < deadline,
            "{stopped} was not activated again:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = ranges_served(&cluster, follower).await;
    for _ in 0..9 {
        ok(cluster.etcdctl_at(&addr, &["--command-timeout=3s", "get", "k"]));
    }
    let after = ranges_served(&cluster, follower).await;
    assert!(
        after > before,
        "the resumed member {stopped} served no Range ({before} -> {after})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_200_with_etcd_auth_on() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    ok(cluster.etcdctl(&["user", "add", "root", "--new-user-password=rootpw"]));
    // etcd 3.5 creates no root role by itself.
    let _ = cluster.etcdctl(&["role", "add", "root"]);
    ok(cluster.etcdctl(&["user", "grant-role", "root", "root"]));
    ok(cluster.etcdctl(&["auth", "enable"]));
    // The health Range carries no token: etcd refuses it, after the read went through raft.
    let denied = cluster.etcdctl_at(&addr, &["get", "a"]);
    assert!(!denied.status.success());
    assert_eq!(
        get(&format!("http://{addr}/health")),
        (200, r#"{"health":"true","reason":""}"#.to_string())
    );
    assert_eq!(
        get(&format!("http://{addr}/proxy/health")),
        (200, r#"{"health":"true","reason":""}"#.to_string())
    );
}
