//! `etcd-proxy grpc-proxy start` talking TLS to etcd (`https://` endpoints, `--cacert`, `--cert`,
//! `--key`, `--insecure-skip-tls-verify`) and finding the members by DNS SRV discovery, against
//! real etcd members that require client certificates. Clients reach the proxy in plain text
//! here; TLS toward the proxy is tested elsewhere.

mod common;

use std::time::{Duration, Instant};

use common::dnsmasq::Dns;
use common::{
    ProxyProcess, check_watch_sees_direct_put, curl, etcdctl_stdin, member_with_streams, ok,
    run_to_exit, start_grpc_proxy,
};
use testkit::certs::{Ca, CertFiles};
use testkit::{Cluster, ClusterOptions, TlsOptions};

/// etcdctl in plain text to the proxy at `addr` (no TLS flag: the proxy's port is h2c).
fn plain(addr: &str, args: &[&str]) -> std::process::Output {
    etcdctl_stdin(addr, args, b"")
}

/// The proxy's flags for TLS to `cluster`'s members: its CA, and the cluster's client
/// certificate (empty Common Name, as etcd requires of a proxy).
fn tls_flags(cluster: &Cluster) -> Vec<String> {
    let tls = cluster.tls().expect("a TLS cluster");
    vec![
        format!("--cacert={}", tls.ca.display()),
        format!(
            "--cert={}",
            tls.client_cert.as_ref().expect("client cert").display()
        ),
        format!(
            "--key={}",
            tls.client_key.as_ref().expect("client key").display()
        ),
    ]
}

async fn tls_cluster(dir: &std::path::Path, members: usize) -> (Ca, Cluster) {
    let ca = Ca::new(dir, "ca");
    let cluster = Cluster::start_with(ClusterOptions {
        members,
        tls: Some(TlsOptions::from_ca(&ca, true)),
    })
    .await;
    (ca, cluster)
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Put, get, a watch (whose created answer comes from the proxy's own tonic call to a member),
/// `/health` and the `/metrics` pass-through, all with every member behind https and client
/// certificates required; then the member holding the shared upstream watch is killed and the
/// watch goes on from another member.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_serves_a_tls_cluster_with_client_cert_auth() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, mut cluster) = tls_cluster(dir.path(), 3).await;
    assert!(cluster.client_urls()[0].starts_with("https://"));
    let flags = tls_flags(&cluster);
    let (proxy, addr) = start_grpc_proxy(&cluster, &refs(&flags));
    // `/health` is a linearizable read through a member over TLS: once it passes, the new
    // cluster's leader serves (a put sooner may get etcd's own "request timed out").
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = curl(&[], &format!("http://{addr}/health"));
        if code == 200 {
            assert_eq!(body, r#"{"health":"true","reason":""}"#);
            break;
        }
        assert!(Instant::now() < deadline, "{body}\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    ok(plain(&addr, &["put", "tls-key", "tls-value"]));
    assert_eq!(
        ok(plain(&addr, &["get", "tls-key", "--print-value-only"])),
        "tls-value\n"
    );
    // Written through the proxy, read directly from etcd (over TLS, with the test's own client).
    assert_eq!(
        ok(cluster.etcdctl(&["get", "tls-key", "--print-value-only"])),
        "tls-value\n"
    );
    check_watch_sees_direct_put(&cluster, &addr, "tls-watched");

    let (code, body) = curl(&[], &format!("http://{addr}/health"));
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"health":"true","reason":""}"#),
        "{}",
        proxy.log()
    );
    // etcd's own metrics, read by the proxy from a member over TLS.
    let (code, body) = curl(&[], &format!("http://{addr}/metrics"));
    assert_eq!(code, 200, "{}", proxy.log());
    assert!(body.contains("etcd_server_has_leader"), "{body}");

    // A watch held through the proxy survives the death of the member serving it.
    let (mut watch, rx) = common::etcdctl_watch(&addr, "survivor");
    let wait_for = |value: &str, put: &dyn Fn()| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "the watch never saw {value}");
            put();
            while let Ok(l) = rx.recv_timeout(Duration::from_millis(300)) {
                if l == value {
                    return;
                }
            }
        }
    };
    wait_for("before", &|| {
        ok(cluster.etcdctl(&["put", "survivor", "before"]));
    });
    let holder = member_with_streams(&cluster, "Watch").await;
    cluster.kill(holder);
    let other = cluster.member((holder + 1) % 3).client_url();
    // May fail while the survivors elect a new leader (the killed member may have led): the
    // loop puts again until the watch reports it.
    let seen_after = || {
        let _ = cluster.etcdctl_at(&other, &["put", "survivor", "after"]);
    };
    wait_for("after", &seen_after);
    let _ = watch.kill();
    let _ = watch.wait();
}

/// Without `--cacert` the members' test CA is not trusted (the system roots are used, as etcd
/// does), and with another CA neither: calls fail and `/health` says so. With
/// `--insecure-skip-tls-verify` the same members are used without verification.
#[tokio::test(flavor = "multi_thread")]
async fn member_certificates_are_verified_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, cluster) = tls_cluster(dir.path(), 1).await;
    let tls = cluster.tls().unwrap().clone();
    let cert = format!("--cert={}", tls.client_cert.as_ref().unwrap().display());
    let key = format!("--key={}", tls.client_key.as_ref().unwrap().display());
    let other = Ca::new(&dir.path().join("other"), "other");
    let other_ca = format!("--cacert={}", other.cert_path().display());

    for (what, extra) in [
        ("system roots", vec![cert.as_str(), key.as_str()]),
        (
            "another CA",
            vec![other_ca.as_str(), cert.as_str(), key.as_str()],
        ),
    ] {
        let (proxy, addr) = start_grpc_proxy(&cluster, &extra);
        let out = etcdctl_stdin(&addr, &["--command-timeout=4s", "put", "refused", "v"], b"");
        assert!(!out.status.success(), "{what}: put went through");
        let (code, body) = curl(&[], &format!("http://{addr}/health"));
        assert_eq!(code, 503, "{what}: {body}");
        assert!(body.contains(r#""health":"false""#), "{what}: {body}");
        // The reason is in the log: the member's certificate is not trusted.
        let log = proxy.log();
        assert!(
            log.contains("cannot connect to etcd member") && log.contains("UnknownIssuer"),
            "{what}: {log}"
        );
    }
    assert!(
        ok(cluster.etcdctl(&["get", "refused", "--print-value-only"])).is_empty(),
        "nothing was written"
    );

    let (proxy, addr) = start_grpc_proxy(
        &cluster,
        &["--insecure-skip-tls-verify", cert.as_str(), key.as_str()],
    );
    assert_eq!(
        proxy
            .log_entries("--insecure-skip-tls-verify was given, this grpc proxy process skips authentication of etcd server TLS certificates. This option should be enabled only for testing purposes.")
            .len(),
        1,
        "{}",
        proxy.log()
    );
    ok(plain(&addr, &["put", "unverified", "works"]));
    assert_eq!(
        ok(cluster.etcdctl(&["get", "unverified", "--print-value-only"])),
        "works\n"
    );
    // Scheme-less endpoints are TLS once a TLS flag is set (clientv3's rule).
    let bare = cluster.client_endpoints()[0].clone();
    let endpoints = format!("--endpoints={bare}");
    let cacert = format!("--cacert={}", tls.ca.display());
    let p = ProxyProcess::start(
        &[
            "grpc-proxy",
            "start",
            "--listen-addr=127.0.0.1:0",
            &endpoints,
            &cacert,
            &cert,
            &key,
        ],
        "started gRPC proxy",
    );
    let bare_addr = p.grpc_address();
    assert_eq!(
        ok(plain(
            &bare_addr,
            &["get", "unverified", "--print-value-only"]
        )),
        "works\n"
    );
}

/// etcd refuses a proxy client certificate with a Common Name (etcd would take it as the user of
/// every proxied request); unusable files are one clear error. All exit 1 at start-up.
#[test]
fn bad_client_tls_files_exit_1_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let named = ca.client("named", "proxy-user");
    let nameless = ca.client("nameless", "");
    let other = ca.client("other", "");
    let cacert = format!("--cacert={}", ca.cert_path().display());
    let flag = |name: &str, path: &std::path::Path| format!("--{name}={}", path.display());
    let start = |extra: &[String]| {
        let mut args = vec![
            "grpc-proxy".to_string(),
            "start".into(),
            "--listen-addr=127.0.0.1:0".into(),
            "--endpoints=https://127.0.0.1:1".into(),
        ];
        args.extend_from_slice(extra);
        run_to_exit(&refs(&args))
    };
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec![
                cacert.clone(),
                flag("cert", &named.cert),
                flag("key", &named.key),
            ],
            format!(
                "cert has non empty Common Name (proxy-user): {}",
                named.cert.display()
            ),
        ),
        (
            vec![
                cacert.clone(),
                flag("cert", &nameless.cert),
                flag("key", &other.key),
            ],
            "tls: private key does not match public key".into(),
        ),
        (
            vec![
                flag("cacert", &dir.path().join("missing.pem")),
                flag("cert", &nameless.cert),
                flag("key", &nameless.key),
            ],
            format!(
                "--cacert: open {}: no such file or directory",
                dir.path().join("missing.pem").display()
            ),
        ),
        (
            vec![cacert.clone(), flag("cert", &nameless.cert)],
            format!(
                "KeyFile and CertFile must both be present[key: , cert: {}]",
                nameless.cert.display()
            ),
        ),
        (
            // A key file given as the CA: no certificate in it.
            vec![flag("cacert", &nameless.key)],
            "--cacert:".into(),
        ),
    ];
    for (args, want) in cases {
        let (code, out) = start(&args);
        assert_eq!(code, 1, "{args:?}: {out}");
        assert!(out.contains(&want), "{args:?}: want {want:?} in:\n{out}");
        assert!(!out.contains("panicked"), "{out}");
        assert!(!out.contains("started gRPC proxy"), "{out}");
    }
    // The same files with a nameless certificate and its own key are fine: the proxy starts.
    let cert = flag("cert", &nameless.cert);
    let key = flag("key", &nameless.key);
    let p = ProxyProcess::start(
        &[
            "grpc-proxy",
            "start",
            "--listen-addr=127.0.0.1:0",
            "--endpoints=https://127.0.0.1:1",
            &cacert,
            &cert,
            &key,
        ],
        "started gRPC proxy",
    );
    assert_eq!(
        p.log_entries("gRPC proxy client TLS").len(),
        1,
        "{}",
        p.log()
    );
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("host:port")
}

/// `--discovery-srv` with `_etcd-client-ssl` records on a loopback DNS server: each member is
/// checked with a TLS handshake against `--cacert`, the proxy then talks TLS to the names found
/// (resolved by the same DNS server) and serves.
#[tokio::test(flavor = "multi_thread")]
async fn srv_discovery_finds_https_members_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let names = ["m0.example.test", "m1.example.test", "m2.example.test"];
    let server = ca.server(
        "server",
        &["127.0.0.1", "localhost", names[0], names[1], names[2]],
    );
    let client: CertFiles = ca.client("proxy", "");
    let cluster = Cluster::start_with(ClusterOptions {
        members: 3,
        tls: Some(TlsOptions {
            ca: ca.cert_path().to_path_buf(),
            server_cert: server.cert.clone(),
            server_key: server.key.clone(),
            client_cert_auth: true,
            client_cert: Some(client.cert.clone()),
            client_key: Some(client.key.clone()),
        }),
    })
    .await;
    let urls = cluster.client_urls();
    let srv: Vec<(&str, &str, u16)> = names
        .iter()
        .zip(&urls)
        .map(|(n, u)| ("_etcd-client-ssl._tcp.example.test", *n, port_of(u)))
        .collect();
    let dns = Dns::start(&srv, &names);
    let flags = [
        "grpc-proxy".to_string(),
        "start".into(),
        "--listen-addr=127.0.0.1:0".into(),
        "--discovery-srv=example.test".into(),
        dns.flag(),
        // Never used: discovery finds the members.
        "--endpoints=127.0.0.1:1".into(),
        format!("--cacert={}", ca.cert_path().display()),
        format!("--cert={}", client.cert.display()),
        format!("--key={}", client.key.display()),
    ];
    let proxy = ProxyProcess::start(&refs(&flags), "started gRPC proxy");
    let used = proxy.log_entries("using validated discovered SRV endpoints");
    assert_eq!(used.len(), 1, "{}", proxy.log());
    let mut got: Vec<String> = used[0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    got.sort();
    let want: Vec<String> = names
        .iter()
        .zip(&urls)
        .map(|(n, u)| format!("{n}.:{}", port_of(u)))
        .collect();
    assert_eq!(got, want, "{}", proxy.log());
    let addr = proxy.grpc_address();
    ok(plain(&addr, &["put", "discovered", "yes"]));
    assert_eq!(
        ok(cluster.etcdctl(&["get", "discovered", "--print-value-only"])),
        "yes\n"
    );
    let (code, body) = curl(&[], &format!("http://{addr}/health"));
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"health":"true","reason":""}"#)
    );

    // With a CA that did not sign the members' certificates nothing validates: the proxy falls
    // back to --endpoints, as etcd does.
    let other = Ca::new(&dir.path().join("other"), "other");
    let mut flags2 = flags.to_vec();
    flags2[6] = format!("--cacert={}", other.cert_path().display());
    flags2[5] = format!("--endpoints={}", urls[0]);
    let p2 = ProxyProcess::start(&refs(&flags2), "started gRPC proxy");
    assert!(
        p2.log_entries("using validated discovered SRV endpoints")
            .is_empty(),
        "{}",
        p2.log()
    );
    assert_eq!(
        p2.log_entries("failed to validate discovered endpoints")
            .len(),
        3,
        "{}",
        p2.log()
    );
    assert_eq!(
        p2.log_entries("no usable SRV endpoint; falling back to --endpoints")
            .len(),
        1
    );
}
