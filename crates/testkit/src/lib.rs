//! Real etcd clusters for tests.
//!
//! Every integration and end-to-end test of the project runs against the official etcd 3.5
//! binaries (installed by `scripts/install-etcd.sh`), never a mock: the point of the proxy is to
//! behave like etcd in front of etcd, and only the real thing tells us what that means.
//!
//! [`Cluster`] starts 1..n members on free loopback ports with throw-away data dirs, waits until
//! they are healthy (polling, with a deadline; never a fixed sleep), and offers the faults tests
//! need: [`Cluster::kill`], [`Cluster::restart`], [`Cluster::pause`] / [`Cluster::resume`].
//! [`certs`] makes a test CA and certificates for TLS clusters.
//!
//! ```no_run
//! # async fn demo() {
//! use testkit::Cluster;
//!
//! let mut cluster = Cluster::start(3).await;
//! cluster.etcdctl_ok(&["put", "k", "v"]);
//! let leader = cluster.leader().await.expect("a healthy cluster has a leader");
//! cluster.kill(leader);
//! cluster.wait_healthy().await; // the survivors elected a new leader
//! cluster.restart(leader).await;
//! # }
//! ```
//!
//! # Process hygiene
//!
//! Members are killed (SIGKILL) and reaped when the [`Cluster`] is dropped, also while a test
//! unwinds from a panic. If the test process itself is killed (a nextest timeout, Ctrl-C), the
//! kernel kills the members too (`PR_SET_PDEATHSIG`). That signal follows the *thread* that spawned
//! the member, not the process: start and restart clusters from the test's own thread or a runtime
//! worker, never inside `spawn_blocking` (whose threads exit when idle, taking the members along).
//!
//! # Blocking calls
//!
//! [`Cluster::etcdctl`] and [`Cluster::etcdctl_at`] run etcdctl to completion on the calling thread.
//! On a multi-thread tokio runtime they step aside with `block_in_place`, so a server running in
//! the same runtime (a proxy under test) keeps serving. On a `current_thread` runtime nothing else
//! runs until etcdctl returns: a test that points etcdctl at an in-process server must use
//! `#[tokio::test(flavor = "multi_thread")]` or the `*_async` variants.
//!
//! # Concurrency
//!
//! The machine has 2 cores; `.config/nextest.toml` puts every test of a crate depending on this
//! one in the `etcd` test group, which bounds how many clusters run at once.

// Unsafe is needed once, to set the parent-death signal between fork and exec.
#![deny(unsafe_code)]

pub mod certs;
mod cluster;
mod http;

pub use cluster::{Cluster, ClusterOptions, Member, TlsOptions};

use std::path::{Path, PathBuf};

/// The directory holding the `etcd` and `etcdctl` binaries.
///
/// `$ETCD_BIN` if set (to run the suite against another etcd, e.g. Debian's 3.4), else
/// `<workspace root>/.etcd/bin` as filled by `scripts/install-etcd.sh`.
///
/// # Panics
///
/// If there is no `etcd` binary in that directory.
pub fn etcd_bin_dir() -> PathBuf {
    let dir = match std::env::var_os("ETCD_BIN") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join(".etcd").join("bin"),
    };
    if !dir.join("etcd").is_file() {
        panic!(
            "etcd binaries not found in {}: run scripts/install-etcd.sh",
            dir.display()
        );
    }
    dir
}

/// Path of the `etcd` server binary (see [`etcd_bin_dir`]).
pub fn etcd_path() -> PathBuf {
    etcd_bin_dir().join("etcd")
}

/// Path of the `etcdctl` binary (see [`etcd_bin_dir`]).
///
/// # Panics
///
/// If etcd or etcdctl is missing.
pub fn etcdctl_path() -> PathBuf {
    let path = etcd_bin_dir().join("etcdctl");
    if !path.is_file() {
        panic!(
            "etcd binaries not found in {}: run scripts/install-etcd.sh",
            path.parent().unwrap_or(Path::new("")).display()
        );
    }
    path
}

/// The Cargo workspace root, which holds `.etcd/` and `scripts/`.
pub fn workspace_root() -> PathBuf {
    // This crate lives at <root>/crates/testkit; the path is fixed at compile time, which is what
    // we want: tests run from each crate's own directory, not from the root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
