//! Real Python etcd v3 clients through `etcd-proxy grpc-proxy start`, on a real 3-member etcd
//! cluster: `tests/python/client_through_proxy.py` (aetcd, i.e. grpcio's asyncio stack, not Go's
//! or tonic's) does KV, txn, leases, watch, lock and error checks through the proxy, and
//! `tests/python/http_client_through_proxy.py` (etcd3gw, a client of etcd's HTTP/JSON gateway)
//! does KV, transactions, watch and leases through the proxy's HTTP/JSON API; both check against
//! direct reads and writes on a member.
//!
//! The client lives in the `.venv-tests` venv that `scripts/install-deps.sh` creates with pinned
//! versions; without it the test fails (it does not skip) and says so.

mod common;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::start_grpc_proxy;
use testkit::Cluster;

/// Bound on one run of the script (it bounds itself at 120 s; this catches a hung interpreter).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(150);

fn repo_root() -> PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .expect("crates/etcd-proxy is two levels below the repository root")
        .to_path_buf()
}

/// The venv's interpreter; panics, pointing at the install script, when the venv is missing.
fn venv_python() -> PathBuf {
    let python = repo_root().join(".venv-tests/bin/python");
    assert!(
        python.exists(),
        "{} does not exist: run scripts/install-deps.sh (it creates the .venv-tests venv with the \
         pinned Python etcd client this test needs)",
        python.display()
    );
    python
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Runs the script `name` with `target` as the address it talks to and `direct` as the member it checks
/// against; returns its output, or panics (killing it) after `SCRIPT_TIMEOUT`.
async fn run_script(python: &PathBuf, name: &str, target: &str, direct: &str) -> Output {
    let child = tokio::process::Command::new(python)
        .arg(script(name))
        .args([target, direct])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", python.display()));
    match tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output()).await {
        Ok(out) => out.expect("wait for the Python client"),
        Err(_) => {
            panic!("the Python client against {target} did not exit within {SCRIPT_TIMEOUT:?}")
        }
    }
}

fn show(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `name` against etcd itself (the baseline: if that fails, the client or the environment
/// is broken, not the proxy), then through a proxy; the proxy's run must pass too.
async fn baseline_then_proxy(name: &str) {
    let python = venv_python();
    let cluster = Cluster::start(3).await;
    let direct = cluster.client_endpoints()[0].clone();

    let started = Instant::now();
    let baseline = run_script(&python, name, &direct, &direct).await;
    assert!(
        baseline.status.success(),
        "{name} fails against etcd itself ({direct}), so the proxy is not the cause:\n{}",
        show(&baseline)
    );
    println!(
        "direct ({:.1?}): {}",
        started.elapsed(),
        String::from_utf8_lossy(&baseline.stdout).trim()
    );

    let (proxy, addr) = start_grpc_proxy(&cluster, &[]);
    let started = Instant::now();
    let out = run_script(&python, name, &addr, &direct).await;
    assert!(
        out.status.success(),
        "{name} fails through the proxy ({addr}) but passes against etcd directly:\n{}\n\
         --- proxy log:\n{}",
        show(&out),
        proxy.log()
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.starts_with("ok: "), "{}", show(&out));
    println!("proxy ({:.1?}): {}", started.elapsed(), summary.trim());
}

#[tokio::test(flavor = "multi_thread")]
async fn python_etcd_client_through_the_grpc_proxy() {
    baseline_then_proxy("client_through_proxy.py").await;
}

/// etcd3gw talks to etcd's HTTP/JSON gateway; through the proxy it gets the same API.
#[tokio::test(flavor = "multi_thread")]
async fn python_http_client_through_the_proxys_json_api() {
    baseline_then_proxy("http_client_through_proxy.py").await;
}
