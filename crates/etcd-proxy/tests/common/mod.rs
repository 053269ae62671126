//! Runs the real `etcd-proxy` binary for end-to-end tests: start it with flags, wait for a log
//! line, read its JSON logs, stop it by PID.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod dnsmasq;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `etcd-proxy`, killed on drop.
pub struct ProxyProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_etcd-proxy")
}

/// `etcd-proxy <args>` with stdout and stderr piped, stdin closed, and `env` added.
fn spawn(args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn etcd-proxy")
}

impl ProxyProcess {
    /// Starts `etcd-proxy <args>` and waits (up to 30 s) for a log line containing `ready_msg`.
    pub fn start(args: &[&str], ready_msg: &str) -> ProxyProcess {
        ProxyProcess::start_with_env(args, &[], ready_msg)
    }

    /// [`ProxyProcess::start`] with `env` added to the environment.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)], ready_msg: &str) -> ProxyProcess {
        let mut child = spawn(args, env);
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stderr.take().expect("stderr piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().expect("stdout piped")),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let mut p = ProxyProcess { child, lines };
        p.wait_for_log(ready_msg, Duration::from_secs(30));
        p
    }

    /// Waits until a log line contains `needle`; panics with the whole log otherwise.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200)); // let the reader threads catch up
                panic!(
                    "etcd-proxy exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every line logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Lines logged so far whose message is `msg`, parsed.
    pub fn log_entries(&self, msg: &str) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["msg"] == msg)
            .collect()
    }

    /// The address the gRPC proxy listens on, from its `started gRPC proxy` line.
    pub fn grpc_address(&self) -> String {
        self.log_entries("started gRPC proxy")
            .first()
            .and_then(|v| v["address"].as_str())
            .expect("`started gRPC proxy` has an address")
            .to_string()
    }

    /// The address the gateway listens on, from its `ready to proxy client requests` line.
    pub fn listen_addr(&self) -> String {
        let ready = self.log_entries("ready to proxy client requests");
        ready
            .first()
            .and_then(|v| v["listen_addr"].as_str())
            .expect("ready line has listen_addr")
            .to_string()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal by PID (only to the process this test started).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for exit, up to `timeout`; returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `etcd-proxy <args>` to completion (for flag errors); returns (code, stdout+stderr).
pub fn run_to_exit(args: &[&str]) -> (i32, String) {
    let mut child = spawn(args, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("etcd-proxy {args:?} did not exit within 30s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Asserts an etcdctl run succeeded and returns its stdout.
pub fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "etcdctl failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free loopback port (bound then released; tests tolerate the small race).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Runs etcdctl at `addr` with `stdin` (`txn` reads its operations from stdin).
pub fn etcdctl_stdin(addr: &str, args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(testkit::etcdctl_path())
        .arg(format!("--endpoints={addr}"))
        .args(["--dial-timeout=5s", "--command-timeout=10s"])
        .args(args)
        .env("ETCDCTL_API", "3")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn etcdctl");
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(stdin)
        .expect("write etcdctl stdin");
    child.wait_with_output().expect("etcdctl output")
}

/// Lease grant, a key attached, keep-alive, time-to-live with keys, revoke: all through `addr`,
/// checking etcd's answers; the key goes with the lease. Returns the (revoked) lease id.
pub fn check_lease_flow(cluster: &testkit::Cluster, addr: &str) -> String {
    let ctl = |args: &[&str]| ok(cluster.etcdctl_at(addr, args));
    let granted = ctl(&["lease", "grant", "60"]);
    let id = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    ctl(&["put", "leased", "v", &format!("--lease={id}")]);
    let kept = ctl(&["lease", "keep-alive", "--once", &id]);
    assert!(kept.contains(&id) && kept.contains("TTL(60)"), "{kept}");
    let ttl = ctl(&["lease", "timetolive", &id, "--keys"]);
    assert!(
        ttl.contains("leased") && ttl.contains("granted with TTL(60s)"),
        "{ttl}"
    );
    let list = ctl(&["lease", "list"]);
    assert!(list.contains(&id), "{list}");
    ctl(&["lease", "revoke", &id]);
    assert_eq!(ctl(&["get", "leased"]), "");
    id
}

/// `etcdctl watch key` through `addr`, running: the process and its output lines as they come.
pub fn etcdctl_watch(
    addr: &str,
    key: &str,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut watch = Command::new(testkit::etcdctl_path())
        .args(["--endpoints", addr, "watch", key])
        .env("ETCDCTL_API", "3")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcdctl watch");
    let stdout = watch.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (watch, rx)
}

/// A watch on `key` held open through `addr` reports a put made directly on the cluster.
pub fn check_watch_sees_direct_put(cluster: &testkit::Cluster, addr: &str, key: &str) {
    let (mut watch, rx) = etcdctl_watch(addr, key);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen: Vec<String> = Vec::new();
    let mut puts = 0;
    while !seen.iter().any(|l| l == "watched-value") {
        assert!(Instant::now() < deadline, "watch saw only {seen:?}");
        // The watcher may not be registered yet: put until it reports the event.
        ok(cluster.etcdctl(&["put", key, "watched-value"]));
        puts += 1;
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(300)) {
            seen.push(l);
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(
        seen.starts_with(&["PUT".into(), key.into(), "watched-value".into()]),
        "{seen:?} after {puts} puts"
    );
}

/// Starts `etcd-proxy grpc-proxy start` in front of `cluster` on a port of its choosing, with
/// `extra` flags; returns it and the address from its `started gRPC proxy` line.
pub fn start_grpc_proxy(cluster: &testkit::Cluster, extra: &[&str]) -> (ProxyProcess, String) {
    start_grpc_proxy_at(&cluster.client_urls(), extra)
}

/// [`start_grpc_proxy`] in front of the members at `urls` only.
pub fn start_grpc_proxy_at(urls: &[String], extra: &[&str]) -> (ProxyProcess, String) {
    let endpoints = format!("--endpoints={}", urls.join(","));
    let mut args = vec![
        "grpc-proxy",
        "start",
        "--listen-addr=127.0.0.1:0",
        endpoints.as_str(),
    ];
    args.extend_from_slice(extra);
    let p = ProxyProcess::start(&args, "started gRPC proxy");
    let addr = p.grpc_address();
    (p, addr)
}

/// Sends `body` as the request body of a gRPC call to `path` over a fresh HTTP/2 connection
/// (in two DATA frames when `split`); returns `grpc-status` and `grpc-message`.
pub async fn raw_call(addr: &str, path: &str, body: &[u8], split: bool) -> (String, String) {
    let (status, message, _) = raw_call_body(addr, path, body, split).await;
    (status, message)
}

/// [`raw_call`], also returning the response body (framed messages).
pub async fn raw_call_body(
    addr: &str,
    path: &str,
    body: &[u8],
    split: bool,
) -> (String, String, bytes::Bytes) {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let chunks = if split {
        vec![
            bytes::Bytes::copy_from_slice(&body[..2]),
            bytes::Bytes::copy_from_slice(&body[2..]),
        ]
    } else {
        vec![bytes::Bytes::copy_from_slice(body)]
    };
    let frames = futures::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))),
    );
    let req = hyper::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(frames))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let mut headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.expect("body");
    if let Some(trailers) = collected.trailers() {
        headers.extend(trailers.clone());
    }
    let data = collected.to_bytes();
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    (get("grpc-status"), get("grpc-message"), data)
}

/// An `etcd-client` at `endpoints` with bounded connect and call timeouts, so a hung proxy
/// fails the test instead of stalling it.
pub async fn etcd_client(endpoints: &[String]) -> etcd_client::Client {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(20));
    etcd_client::Client::connect(endpoints, Some(opts))
        .await
        .expect("connect")
}

/// Streams of gRPC method `method` (`Watch`, `LeaseKeepAlive`, ...) open on member `i` now,
/// from etcd's own metrics (started minus handled).
pub async fn open_streams(cluster: &testkit::Cluster, i: usize, method: &str) -> f64 {
    let text = cluster.metrics_text(i).await;
    let sum = |metric: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(metric) && l.contains(&format!("grpc_method=\"{method}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    sum("grpc_server_started_total{") - sum("grpc_server_handled_total{")
}

/// The member holding the open streams of `method` (the proxy's shared upstream stream), once
/// exactly one member has some; panics after 10 s.
pub async fn member_with_streams(cluster: &testkit::Cluster, method: &str) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut holders = Vec::new();
        for i in 0..cluster.len() {
            if open_streams(cluster, i, method).await > 0.0 {
                holders.push(i);
            }
        }
        if let [one] = holders[..] {
            return one;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{method} streams are open on members {holders:?}, not on exactly one"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The value of the proxy's metric `name` (one series, labels included in `name` if any), read
/// from `/proxy/metrics` on its port.
pub fn proxy_metric(addr: &str, name: &str) -> f64 {
    let out = std::process::Command::new("curl")
        .args(["-sf", &format!("http://{addr}/proxy/metrics")])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /proxy/metrics:\n{text}"))
}

/// `curl -s <args> url` (bounded at 20 s): the status code and the body.
pub fn curl(args: &[&str], url: &str) -> (u16, String) {
    let run = || {
        std::process::Command::new("curl")
            .args(["-s", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .arg(url)
            .output()
            .expect("run curl")
    };
    let out = match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(run),
        Err(_) => run(),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("curl {url}: {text:?}"));
    (
        code.parse()
            .unwrap_or_else(|_| panic!("curl {url}: status {code:?}")),
        body.to_string(),
    )
}

/// Creates `root` (password `rootpw`, role root) and each user `(name, password, permission,
/// prefix)` with a role of its own granting `permission` (`read`, `write`, `readwrite`) on keys
/// under `prefix`, then enables auth; all with etcdctl, directly on the cluster.
pub fn enable_auth(cluster: &testkit::Cluster, users: &[(&str, &str, &str, &str)]) {
    for args in [
        &["role", "add", "root"][..],
        &["user", "add", "root:rootpw"],
        &["user", "grant-role", "root", "root"],
    ] {
        ok(cluster.etcdctl(args));
    }
    for (name, password, perm, prefix) in users {
        let role = format!("{name}-role");
        let user = format!("{name}:{password}");
        ok(cluster.etcdctl(&["role", "add", &role]));
        ok(cluster.etcdctl(&[
            "role",
            "grant-permission",
            &role,
            perm,
            prefix,
            "--prefix=true",
        ]));
        ok(cluster.etcdctl(&["user", "add", &user]));
        ok(cluster.etcdctl(&["user", "grant-role", name, &role]));
    }
    ok(cluster.etcdctl(&["auth", "enable"]));
}
