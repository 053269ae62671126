//! TLS between clients and `etcd-proxy grpc-proxy start` (issue 6, server side), end to end with
//! real clients (etcdctl, curl, openssl s_client) in front of a real (plain-text) etcd:
//! `--cert-file`/`--key-file` with HTTP/2 and HTTP/1.1 on one port, client certificates
//! required (`--trusted-ca-file`) and revoked ones refused (`--client-crl-file`), cipher suite
//! and version limits, `--auto-tls` certificates kept across restarts, `https://` metrics
//! listener, and start-up errors for bad files.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{free_port, run_to_exit, start_grpc_proxy};
use testkit::Cluster;
use testkit::certs::{Ca, CertFiles};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// etcdctl at `addr` with `tls` flags (`--cacert=...` etc.).
fn etcdctl(addr: &str, tls: &[String], args: &[&str]) -> Output {
    Command::new(testkit::etcdctl_path())
        .arg(format!("--endpoints={addr}"))
        .args(["--dial-timeout=5s", "--command-timeout=10s"])
        .args(tls)
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .expect("run etcdctl")
}

/// curl with `args`: (exit code, stdout, stderr). `-w` prints the HTTP version and status.
fn curl(args: &[&str], url: &str) -> (i32, String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_version} %{http_code}",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn client_flags(ca: &Ca, client: &CertFiles) -> Vec<String> {
    vec![
        format!("--cacert={}", s(ca.cert_path())),
        format!("--cert={}", s(&client.cert)),
        format!("--key={}", s(&client.key)),
    ]
}

fn curl_client<'a>(ca: &'a Ca, client: &'a CertFiles) -> Vec<&'a str> {
    vec![
        "--cacert",
        s(ca.cert_path()),
        "--cert",
        s(&client.cert),
        "--key",
        s(&client.key),
    ]
}

const HEALTHY: &str = r#"{"health":"true","reason":""}"#;

/// Client certificates: required, verified against `--trusted-ca-file`, revoked ones refused;
/// with a good one, gRPC (etcdctl), the JSON API, health and metrics work over HTTP/2 and
/// HTTP/1.1, on the main port and on an `https://` metrics port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_verified_and_checked_for_revocation() {
    let cluster = Cluster::start(1).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new(dir.path(), "ca");
    let server = ca.server("proxy", &["127.0.0.1", "localhost"]);
    let client = ca.client("client", "");
    let revoked = ca.client("revoked", "");
    let crl = ca.crl("crl", &[&revoked]);
    let other_ca = Ca::new(&dir.path().join("other"), "other-ca");
    let stranger = other_ca.client("stranger", "");

    let metrics_port = free_port();
    let metrics_url = format!("--metrics-addr=https://127.0.0.1:{metrics_port}");
    let cert_file = format!("--cert-file={}", s(&server.cert));
    let key_file = format!("--key-file={}", s(&server.key));
    let trusted = format!("--trusted-ca-file={}", s(ca.cert_path()));
    let crl_flag = format!("--client-crl-file={}", s(&crl));
    let (proxy, addr) = start_grpc_proxy(
        &cluster,
        &[&cert_file, &key_file, &trusted, &crl_flag, &metrics_url],
    );
    let base = format!("https://{addr}");

    // etcdctl through the proxy with its certificate.
    let good = client_flags(&ca, &client);
    let put = etcdctl(&addr, &good, &["put", "tls-key", "tls-value"]);
    assert!(put.status.success(), "put: {put:?}");
    let get = etcdctl(&addr, &good, &["get", "tls-key", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "tls-value");

    // curl: HTTP/2 (ALPN, no --http1.1 needed) and HTTP/1.1, health and the JSON API.
    let c = curl_client(&ca, &client);
    for (extra, version) in [(None, "2"), (Some("--http1.1"), "1.1")] {
        let mut args = c.clone();
        args.extend(extra);
        for path in ["/health", "/proxy/health"] {
            let (code, out, err) = curl(&args, &format!("{base}{path}"));
            assert_eq!(
                (code, out.as_str()),
                (0, format!("{HEALTHY}\n{version} 200").as_str()),
                "{path} over HTTP/{version}: {err}\n{}",
                proxy.log()
            );
        }
        let mut post = args.clone();
        post.extend(["-X", "POST", "-d", r#"{"key":"dGxzLWtleQ=="}"#]);
        let (code, out, err) = curl(&post, &format!("{base}/v3/kv/range"));
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(r#""value":"dGxzLXZhbHVl""#) && out.ends_with(&format!("{version} 200")),
            "/v3/kv/range over HTTP/{version}: {out}"
        );
        let (code, out, err) = curl(&args, &format!("{base}/proxy/metrics"));
        assert!(
            code == 0 && out.contains("etcd_grpc_proxy_") && out.ends_with(" 200"),
            "{err} {out}"
        );
    }
    // The https metrics port: the same TLS, client certificate included.
    let (code, out, err) = curl(&c, &format!("https://127.0.0.1:{metrics_port}/health"));
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{HEALTHY}\n2 200").as_str()),
        "{err}"
    );
    let (code, _, _) = curl(
        &["--cacert", s(ca.cert_path())],
        &format!("https://127.0.0.1:{metrics_port}/health"),
    );
    assert_ne!(code, 0, "the metrics port wants a client certificate too");
    // Plain text on a TLS port gets nothing.
    let (code, out, _) = curl(&[], &format!("http://{addr}/health"));
    assert!(code != 0 && !out.contains("health"), "{code} {out}");

    // Refused clients: no certificate, another CA's, a revoked one. Over TLS 1.2 the server
    // checks the client's certificate before its own Finished, so curl always reads the alert
    // (over TLS 1.3 the alert may come after curl's handshake; there only the failure is
    // checked).
    let refused = [
        (
            vec!["--cacert", s(ca.cert_path())],
            "no certificate",
            "alert certificate required",
        ),
        (curl_client(&ca, &stranger), "another CA's", "unknown ca"),
        (curl_client(&ca, &revoked), "revoked", "certificate revoked"),
    ];
    for (args, who, alert) in &refused {
        let tls12 = [&args[..], &["--tls-max", "1.2"]].concat();
        let (code, out, err) = curl(&tls12, &format!("{base}/health"));
        assert!(code != 0 && !out.contains("health"), "{who}: {out}");
        assert!(
            err.contains(alert),
            "{who} over TLS 1.2: want {alert:?} in {err}"
        );
        let (code, out, err) = curl(args, &format!("{base}/health"));
        assert!(
            code != 0 && !out.contains("health"),
            "{who} over TLS 1.3: {out} {err}"
        );
    }

    // etcdctl is refused the same way (its retries end in a deadline error).
    for (who, flags) in [
        (
            "no certificate",
            vec![format!("--cacert={}", s(ca.cert_path()))],
        ),
        ("revoked", client_flags(&ca, &revoked)),
    ] {
        let out = etcdctl(
            &addr,
            &flags,
            &[
                "get",
                "tls-key",
                "--dial-timeout=2s",
                "--command-timeout=3s",
            ],
        );
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "{who}: {out:?}"
        );
    }
    // The refusals did not hurt the proxy.
    let get = etcdctl(&addr, &good, &["get", "tls-key", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "tls-value");
    drop(proxy);

    // A serving certificate the trusted CA did not issue: clients of that CA are served, but the
    // proxy cannot present its certificate to itself, and `/proxy/health` says why.
    let other_trusted = format!("--trusted-ca-file={}", s(other_ca.cert_path()));
    let (proxy, addr) = start_grpc_proxy(&cluster, &[&cert_file, &key_file, &other_trusted]);
    let c = curl_client(&ca, &stranger);
    let (code, out, err) = curl(&c, &format!("https://{addr}/health"));
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{HEALTHY}\n2 200").as_str()),
        "{err}"
    );
    let (code, out, err) = curl(&c, &format!("https://{addr}/proxy/health"));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(r#"{"health":"false","reason":"GET ERROR:"#)
            && out.contains("alert")
            && out.ends_with(" 503"),
        "{out}"
    );
    drop(proxy);
}

/// `--tls-min-version`, `--tls-max-version` and `--listen-cipher-suites` are enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_versions_and_cipher_suites_are_enforced() {
    let cluster = Cluster::start(1).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new(dir.path(), "ca");
    // testkit certificates are ECDSA: the ECDHE_ECDSA suites apply.
    let server = ca.server("proxy", &["127.0.0.1"]);
    let cert_file = format!("--cert-file={}", s(&server.cert));
    let key_file = format!("--key-file={}", s(&server.key));
    let cacert = ["--cacert", s(ca.cert_path())];

    let (p13, addr13) = start_grpc_proxy(
        &cluster,
        &[&cert_file, &key_file, "--tls-min-version=TLS1.3"],
    );
    let url13 = format!("https://{addr13}/health");
    let (code, out, err) = curl(&[&cacert[..], &["--tls-max", "1.2"]].concat(), &url13);
    assert!(code != 0 && !out.contains("health"), "{out}");
    assert!(
        err.contains("protocol version"),
        "TLS 1.2 against min TLS1.3: {err}"
    );
    let (code, out, err) = curl(&[&cacert[..], &["--tlsv1.3"]].concat(), &url13);
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{HEALTHY}\n2 200").as_str()),
        "{err}"
    );
    // The proxy's call to itself stays within the limits.
    let (code, out, err) = curl(&cacert, &format!("https://{addr13}/proxy/health"));
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{HEALTHY}\n2 200").as_str()),
        "{err}"
    );
    drop(p13);

    let (p12, addr12) = start_grpc_proxy(
        &cluster,
        &[
            &cert_file,
            &key_file,
            "--tls-max-version=TLS1.2",
            "--listen-cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        ],
    );
    let url12 = format!("https://{addr12}/health");
    let (code, out, err) = curl(&[&cacert[..], &["--tlsv1.3"]].concat(), &url12);
    assert!(code != 0 && !out.contains("health"), "{out}");
    assert!(
        err.contains("protocol version"),
        "TLS 1.3 against max TLS1.2: {err}"
    );
    // A suite not in the list is refused; the listed one is used.
    let (code, out, err) = curl(
        &[&cacert[..], &["--ciphers", "ECDHE-ECDSA-AES256-GCM-SHA384"]].concat(),
        &url12,
    );
    assert!(code != 0 && !out.contains("health"), "{out}");
    assert!(err.contains("handshake failure"), "unlisted suite: {err}");
    let (code, out, err) = curl(
        &[
            &cacert[..],
            &["-v", "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256"],
        ]
        .concat(),
        &url12,
    );
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{HEALTHY}\n2 200").as_str()),
        "{err}"
    );
    assert!(
        err.contains("TLSv1.2 / ECDHE-ECDSA-AES128-GCM-SHA256"),
        "negotiated: {err}"
    );
    // etcdctl (Go) negotiates within the limits too.
    let out = etcdctl(
        &addr12,
        &[format!("--cacert={}", s(ca.cert_path()))],
        &["put", "k12", "v12"],
    );
    assert!(out.status.success(), "{out:?}");
    let (code, out, err) = curl(&cacert, &format!("https://{addr12}/proxy/health"));
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{HEALTHY}\n2 200").as_str()),
        "{err}"
    );
    drop(p12);
}

/// The served certificate's SHA-256 fingerprint, read with `openssl s_client`.
fn served_fingerprint(addr: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .expect("run openssl");
    let fp = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        fp.contains("Fingerprint="),
        "no certificate served at {addr}: {out:?}"
    );
    fp
}

fn file_fingerprint(path: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in", s(path)])
        .output()
        .expect("run openssl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `--auto-tls`: a self-signed certificate in `<data-dir>/fixtures/proxy`, served, valid for
/// `--self-signed-cert-validity` years, and the same one after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tls_certificate_is_served_and_reused_after_a_restart() {
    let cluster = Cluster::start(1).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = format!("--data-dir={}", s(&dir.path().join("proxy-data")));
    let flags = ["--auto-tls", &data_dir, "--self-signed-cert-validity=3"];
    let fixtures = dir.path().join("proxy-data/fixtures/proxy");
    let (cert, key) = (fixtures.join("cert.pem"), fixtures.join("key.pem"));

    let (first, addr) = start_grpc_proxy(&cluster, &flags);
    let cert_pem = std::fs::read(&cert).expect("auto-tls wrote cert.pem");
    let key_pem = std::fs::read(&key).expect("auto-tls wrote key.pem");
    let served = served_fingerprint(&addr);
    assert_eq!(served, file_fingerprint(&cert));
    // Valid for 3 years: not after is more than 2 and at most 3 years (+ a day) from now.
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-in", s(&cert), "-checkend"])
        .arg((2 * 365 * 86400).to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "expires within 2 years: {out:?}");
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-in", s(&cert), "-checkend"])
        .arg((3 * 365 * 86400 + 86400).to_string())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "valid for more than 3 years: {out:?}"
    );

    // The certificate names the listen address: curl verifies it with the file as CA.
    let (code, out, err) = curl(&["--cacert", s(&cert)], &format!("https://{addr}/health"));
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{HEALTHY}\n2 200").as_str()),
        "{err}"
    );
    let (code, out, err) = curl(
        &["--cacert", s(&cert)],
        &format!("https://{addr}/proxy/health"),
    );
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{HEALTHY}\n2 200").as_str()),
        "{err}"
    );
    let put = etcdctl(
        &addr,
        &[format!("--cacert={}", s(&cert))],
        &["put", "auto", "tls"],
    );
    assert!(put.status.success(), "{put:?}");
    drop(first);

    let (second, addr) = start_grpc_proxy(&cluster, &flags);
    assert_eq!(
        std::fs::read(&cert).unwrap(),
        cert_pem,
        "cert.pem rewritten"
    );
    assert_eq!(std::fs::read(&key).unwrap(), key_pem, "key.pem rewritten");
    assert_eq!(
        served_fingerprint(&addr),
        served,
        "another certificate served"
    );
    let get = etcdctl(
        &addr,
        &[format!("--cacert={}", s(&cert))],
        &["get", "auto", "--print-value-only"],
    );
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "tls");
    assert!(
        second.log().contains("reusing the certificate"),
        "{}",
        second.log()
    );
    drop(second);
}

/// Unreadable, mismatched or wrong files and unknown names: exit 1 with one clear line, before
/// listening, and no panic.
#[test]
fn bad_tls_files_and_flags_fail_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new(dir.path(), "ca");
    let a = ca.server("a", &["127.0.0.1"]);
    let b = ca.server("b", &["127.0.0.1"]);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let p = |flag: &str, path: &Path| format!("--{flag}={}", s(path));

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![p("cert-file", &missing), p("key-file", &a.key)],
            "--cert-file: cannot read",
        ),
        (
            vec![p("cert-file", &a.cert), p("key-file", &b.key)],
            "the private key does not match the certificate",
        ),
        (
            vec![p("cert-file", &garbage), p("key-file", &a.key)],
            "--cert-file: no certificate",
        ),
        (
            vec![p("cert-file", &a.cert), p("key-file", &garbage)],
            "--key-file: no private key",
        ),
        (vec![p("cert-file", &a.cert)], "must be given together"),
        (
            vec![
                p("cert-file", &a.cert),
                p("key-file", &a.key),
                p("trusted-ca-file", &garbage),
            ],
            "--trusted-ca-file: no certificate",
        ),
        (
            vec![
                p("cert-file", &a.cert),
                p("key-file", &a.key),
                p("trusted-ca-file", ca.cert_path()),
                p("client-crl-file", &garbage),
            ],
            "--client-crl-file: no certificate revocation list",
        ),
        (
            vec![
                p("cert-file", &a.cert),
                p("key-file", &a.key),
                p("client-crl-file", &garbage),
            ],
            "--client-crl-file needs --trusted-ca-file",
        ),
        (
            vec![p("trusted-ca-file", ca.cert_path())],
            "--trusted-ca-file needs --cert-file",
        ),
        (
            vec![
                p("cert-file", &a.cert),
                p("key-file", &a.key),
                "--listen-cipher-suites=TLS_NOT_A_SUITE".into(),
            ],
            "unexpected TLS cipher suite \"TLS_NOT_A_SUITE\"",
        ),
        (
            vec!["--metrics-addr=https://127.0.0.1:0".into()],
            "https needs --cert-file",
        ),
        (
            vec![
                "--tls-min-version=TLS1.3".into(),
                "--tls-max-version=TLS1.2".into(),
            ],
            "min version (TLS1.3) is greater than max version (TLS1.2)",
        ),
        (
            vec!["--auto-tls".into(), "--self-signed-cert-validity=0".into()],
            "selfSignedCertValidity is invalid",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec![
            "grpc-proxy",
            "start",
            "--listen-addr=127.0.0.1:0",
            "--endpoints=127.0.0.1:1",
        ];
        args.extend(flags.iter().map(String::as_str));
        let (code, out) = run_to_exit(&args);
        assert_eq!(code, 1, "{flags:?}: {out}");
        assert!(out.contains(want), "{flags:?}: want {want:?} in:\n{out}");
        assert!(
            !out.contains("panicked") && !out.contains("started gRPC proxy"),
            "{out}"
        );
    }
}
