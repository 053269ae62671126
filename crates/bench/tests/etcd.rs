//! The load generator against a real etcd: requests are counted right, and puts really land.

mod common;

use bench::{BenchError, Mode};
use common::args;
use testkit::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_and_ranges_against_real_etcd() {
    let cluster = Cluster::start(1).await;
    let endpoints = format!("--endpoints={}", cluster.client_endpoints().join(","));

    let put = args(&[
        "put",
        &endpoints,
        "--conns=2",
        "--clients=8",
        "--total=200",
        "--key-size=10",
        "--val-size=32",
        "--key-space-size=50",
        "--sequential-keys",
    ]);
    let report = bench::run(&put).await.expect("puts run");
    assert_eq!(report.mode, "put");
    assert_eq!(report.requests, 200, "{}", report.text());
    assert_eq!(report.succeeded, 200, "{}", report.text());
    assert_eq!(report.errors, 0, "{}", report.text());
    assert!(report.requests_per_sec > 0.0);
    let l = &report.latency_secs;
    assert!(l.fastest > 0.0 && l.fastest <= l.p50 && l.p50 <= l.p99 && l.p99 <= l.slowest);

    // Sequential keys over a key space of 50: exactly keys 0000000000..0000000049, 32-byte values.
    let keys = cluster.etcdctl_ok(&["get", "0", "--prefix", "--keys-only"]);
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    let want: Vec<String> = (0..50).map(|i| format!("{i:010}")).collect();
    assert_eq!(keys, want);
    let last = cluster.etcdctl_ok(&["get", "0000000049", "--print-value-only"]);
    assert_eq!(last.trim_end().len(), 32, "{last:?}");

    let range = args(&[
        "range",
        &endpoints,
        "--conns=2",
        "--clients=8",
        "--total=200",
        "--key-space-size=20",
        "--consistency=s",
    ]);
    let report = bench::run(&range).await.expect("ranges run");
    assert_eq!(report.mode, "range");
    assert_eq!(
        (report.requests, report.succeeded, report.errors),
        (200, 200, 0),
        "{}",
        report.text()
    );
    // The warm-up wrote the range's key space: 8-byte keys, next to the puts' 10-byte ones.
    let all = cluster.etcdctl_ok(&["get", "", "--from-key", "--keys-only"]);
    let short: Vec<&str> = all.lines().filter(|l| l.len() == 8).collect();
    let want: Vec<String> = (0..20).map(|i| format!("{i:08}")).collect();
    assert_eq!(short, want);

    // Linearizable ranges work too (the default).
    let report = bench::run(&args(&["range", &endpoints, "--total=20"]))
        .await
        .expect("linearizable ranges run");
    assert_eq!(report.succeeded, 20);
}

#[tokio::test]
async fn a_dead_endpoint_is_an_error_not_a_panic() {
    // Bind and drop: the port is free and nobody listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let a = args(&[
        "put",
        &format!("--endpoints=127.0.0.1:{port}"),
        "--total=10",
    ]);
    assert_eq!(a.mode, Mode::Put);
    match bench::run(&a).await {
        Err(BenchError::Connect { endpoint, .. }) => {
            assert_eq!(endpoint, format!("http://127.0.0.1:{port}"))
        }
        other => panic!("want a connect error, got {other:?}"),
    }
}
