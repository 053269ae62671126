//! DNS SRV discovery for `etcd-proxy gateway start`, against a real DNS server (dnsmasq) on
//! loopback and real etcd members, plain and TLS.

mod common;

use std::time::{Duration, Instant};

use common::dnsmasq::Dns;
use common::{ProxyProcess, ok, run_to_exit};
use testkit::certs::Ca;
use testkit::{Cluster, ClusterOptions, TlsOptions};

fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("host:port")
}

fn ready_endpoints(gw: &ProxyProcess) -> Vec<String> {
    let ready = gw.log_entries("ready to proxy client requests");
    ready[0]["endpoints"]
        .as_array()
        .expect("endpoints array")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn insecure_discovery_uses_http_records() {
    let cluster = Cluster::start(3).await;
    let eps = cluster.client_endpoints();
    let names = ["m0.example.test", "m1.example.test", "m2.example.test"];
    let srv: Vec<(&str, &str, u16)> = names
        .iter()
        .zip(&eps)
        .map(|(n, e)| ("_etcd-client._tcp.example.test", *n, port_of(e)))
        .collect();
    let dns = Dns::start(&srv, &names);
    let gw = ProxyProcess::start(
        &[
            "gateway",
            "start",
            "--listen-addr=127.0.0.1:0",
            "--discovery-srv=example.test",
            "--insecure-discovery",
            &dns.flag(),
            "--endpoints=127.0.0.1:1",
        ],
        "ready to proxy client requests",
    );
    let mut got = ready_endpoints(&gw);
    got.sort();
    let mut want: Vec<String> = names
        .iter()
        .zip(&eps)
        .map(|(n, e)| format!("{n}.:{}", port_of(e)))
        .collect();
    want.sort();
    assert_eq!(got, want, "{}", gw.log());
    assert_eq!(gw.log_entries("discovered cluster from SRV").len(), 1);
    let addr = gw.listen_addr();
    ok(cluster.etcdctl_at(&addr, &["put", "srv", "yes"]));
    assert_eq!(
        ok(cluster.etcdctl(&["get", "srv", "--print-value-only"])),
        "yes\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn secure_discovery_refuses_http_records_and_falls_back_to_endpoints() {
    let cluster = Cluster::start(1).await;
    let ep = cluster.client_endpoints()[0].clone();
    // A named service, to cover --discovery-srv-name too.
    let dns = Dns::start(
        &[(
            "_etcd-client-foo._tcp.example.test",
            "m0.example.test",
            port_of(&ep),
        )],
        &["m0.example.test"],
    );
    let fallback = format!("--endpoints={}", cluster.client_urls()[0]);
    let gw = ProxyProcess::start(
        &[
            "gateway",
            "start",
            "--listen-addr=127.0.0.1:0",
            "--discovery-srv=example.test",
            "--discovery-srv-name=foo",
            &dns.flag(),
            &fallback,
        ],
        "ready to proxy client requests",
    );
    let rejected = gw.log_entries("failed to validate discovered endpoints");
    assert!(
        rejected
            .iter()
            .any(|v| v["error"].as_str().unwrap_or("").contains("is insecure")),
        "{}",
        gw.log()
    );
    assert_eq!(
        gw.log_entries("no usable SRV endpoint; falling back to --endpoints")
            .len(),
        1
    );
    assert_eq!(ready_endpoints(&gw), vec![ep.clone()]);
    ok(cluster.etcdctl_at(&gw.listen_addr(), &["put", "fallback", "works"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn secure_discovery_keeps_https_members_that_pass_a_real_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.server("server", &["127.0.0.1", "localhost", "tls0.example.test"]);
    let tls = TlsOptions {
        ca: ca.cert_path().to_path_buf(),
        server_cert: server.cert.clone(),
        server_key: server.key.clone(),
        client_cert_auth: false,
        client_cert: None,
        client_key: None,
    };
    let secure = Cluster::start_with(ClusterOptions {
        members: 1,
        tls: Some(tls),
    })
    .await;
    // A plain member published as https must fail validation: no TLS answers there.
    let plain = Cluster::start(1).await;
    let dns = Dns::start(
        &[
            (
                "_etcd-client-ssl._tcp.example.test",
                "tls0.example.test",
                port_of(&secure.client_endpoints()[0]),
            ),
            (
                "_etcd-client-ssl._tcp.example.test",
                "plain0.example.test",
                port_of(&plain.client_endpoints()[0]),
            ),
        ],
        &["tls0.example.test", "plain0.example.test"],
    );
    let ca_flag = format!("--trusted-ca-file={}", ca.cert_path().display());
    let gw = ProxyProcess::start(
        &[
            "gateway",
            "start",
            "--listen-addr=127.0.0.1:0",
            "--discovery-srv=example.test",
            &dns.flag(),
            &ca_flag,
            "--endpoints=127.0.0.1:1",
        ],
        "ready to proxy client requests",
    );
    let want = format!(
        "tls0.example.test.:{}",
        port_of(&secure.client_endpoints()[0])
    );
    assert_eq!(ready_endpoints(&gw), vec![want], "{}", gw.log());
    let rejected = gw.log_entries("failed to validate discovered endpoints");
    assert!(
        rejected.iter().any(|v| v["endpoint"]
            .as_str()
            .unwrap_or("")
            .starts_with("plain0.example.test.")),
        "{}",
        gw.log()
    );
    // TLS passes through the gateway end to end: etcdctl verifies etcd's certificate itself.
    let addr = gw.listen_addr();
    ok(secure.etcdctl_at(&addr, &["put", "tls", "through"]));
    assert_eq!(
        ok(secure.etcdctl(&["get", "tls", "--print-value-only"])),
        "through\n"
    );

    // A CA that did not sign the member's certificate: nothing validates, so the fallback is used.
    let other = Ca::new(dir.path(), "other");
    let other_flag = format!("--trusted-ca-file={}", other.cert_path().display());
    let fallback = format!("--endpoints={}", plain.client_urls()[0]);
    let gw2 = ProxyProcess::start(
        &[
            "gateway",
            "start",
            "--listen-addr=127.0.0.1:0",
            "--discovery-srv=example.test",
            &dns.flag(),
            &other_flag,
            &fallback,
        ],
        "ready to proxy client requests",
    );
    assert_eq!(
        ready_endpoints(&gw2),
        plain.client_endpoints(),
        "{}",
        gw2.log()
    );
}

#[test]
fn failed_lookups_of_both_services_exit_1_with_both_errors() {
    let dns = Dns::start(&[], &[]);
    let started = Instant::now();
    let (code, out) = run_to_exit(&[
        "gateway",
        "start",
        "--discovery-srv=example.test",
        &dns.flag(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("dns lookup errors:"), "{out}");
    assert!(
        out.contains("_etcd-client-ssl._tcp.example.test")
            && out.contains("_etcd-client._tcp.example.test"),
        "{out}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let (code, out) = run_to_exit(&[
        "gateway",
        "start",
        "--endpoints=nosuch.example.test:2379",
        &dns.flag(),
    ]);
    assert_eq!(
        (
            code,
            out.contains("failed to resolve endpoint host: nosuch.example.test")
        ),
        (1, true),
        "{out}"
    );
}
