//! Starting, faulting and tearing down real etcd members.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::process::{Pid, Signal, kill_process};
use tempfile::TempDir;

use crate::certs::{Ca, CertFiles};
use crate::http;

/// How long a cluster (or a restarted member) gets to become healthy. Generous: on 2 shared cores
/// with several test binaries starting clusters at once, a start that takes 1 s alone can take 20.
const HEALTH_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between health polls.
const POLL_INTERVAL: Duration = Duration::from_millis(150);
/// Bound on one `/health` request: a paused or wedged member must not stall the poll loop.
const HEALTH_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one `/metrics` request.
const METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Free ports are found by binding port 0 and letting go; another process can grab one before
/// etcd binds it, so a start that fails with "address already in use" is retried with fresh ports.
const START_ATTEMPTS: usize = 3;
/// How many lines of a member's log go into a panic message.
const LOG_TAIL_LINES: usize = 40;
/// etcdctl defaults, chosen to fail well within a test's time yet ride out a leader election.
/// Callers override them by passing the flag again: etcdctl keeps the last value.
const ETCDCTL_DIAL_TIMEOUT: &str = "--dial-timeout=5s";
const ETCDCTL_COMMAND_TIMEOUT: &str = "--command-timeout=15s";

/// What to start.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of members (at least 1).
    pub members: usize,
    /// Serve clients over TLS; `None` serves plain http.
    pub tls: Option<TlsOptions>,
}

impl Default for ClusterOptions {
    /// One member, no TLS.
    fn default() -> Self {
        ClusterOptions {
            members: 1,
            tls: None,
        }
    }
}

/// Client-side TLS of a cluster. Peer traffic stays plain http: no test is about peer TLS, and it
/// would only slow every start.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// CA that signed the server (and client) certificates; etcdctl's `--cacert`, and etcd's
    /// `--trusted-ca-file` when `client_cert_auth`.
    pub ca: PathBuf,
    /// Server certificate (`--cert-file`); needs an IP SAN `127.0.0.1`.
    pub server_cert: PathBuf,
    /// Server key (`--key-file`).
    pub server_key: PathBuf,
    /// Require and verify client certificates (`--client-cert-auth`).
    pub client_cert_auth: bool,
    /// Client certificate etcdctl presents (`--cert`); needed when `client_cert_auth`.
    pub client_cert: Option<PathBuf>,
    /// Key of `client_cert` (`--key`).
    pub client_key: Option<PathBuf>,
}

impl TlsOptions {
    /// TLS options from a fresh server certificate (SANs `127.0.0.1`, `localhost`, named
    /// `etcd-server`) and, when `client_cert_auth`, a client certificate with an empty CN
    /// (`etcd-client`), both issued by `ca`.
    pub fn from_ca(ca: &Ca, client_cert_auth: bool) -> TlsOptions {
        let server = ca.server("etcd-server", &["127.0.0.1", "localhost"]);
        let client: Option<CertFiles> = client_cert_auth.then(|| ca.client("etcd-client", ""));
        TlsOptions {
            ca: ca.cert_path().to_path_buf(),
            server_cert: server.cert,
            server_key: server.key,
            client_cert_auth,
            client_cert: client.as_ref().map(|c| c.cert.clone()),
            client_key: client.map(|c| c.key),
        }
    }
}

/// A running etcd cluster owned by a test. Dropping it kills every member and deletes its data.
#[derive(Debug)]
pub struct Cluster {
    members: Vec<Member>,
    tls: Option<TlsOptions>,
}

/// One etcd member: its ports, data dir, log, and process (if running).
#[derive(Debug)]
pub struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    client_scheme: &'static str,
    /// The full etcd command line, kept so a restart is the same member.
    args: Vec<OsString>,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// Log length when the current process was spawned: "address already in use" from an
    /// earlier run must not be blamed on this one.
    log_offset: AtomicU64,
    process: Mutex<Process>,
    paused: AtomicBool,
    /// Holds the data dir and log; only its drop matters (after `Drop for Member` killed the
    /// process, as fields drop after the struct's own `drop`).
    _dir: TempDir,
}

#[derive(Debug)]
enum Process {
    Running(Child),
    /// Killed by the test kit; expected to be down.
    Killed,
    /// Exited on its own: a crash or a failed start.
    Exited(ExitStatus),
}

/// Why a wait for health failed.
struct HealthFailure {
    /// etcd exited because a port was taken: worth a retry with fresh ports.
    port_in_use: bool,
    message: String,
}

impl Cluster {
    /// Starts a plain-http cluster of `members` members and waits until all are healthy.
    ///
    /// # Panics
    ///
    /// If the etcd binaries are missing, or the cluster is not healthy within 60 s (the message
    /// carries the tail of each unhealthy member's log).
    pub async fn start(members: usize) -> Cluster {
        Cluster::start_with(ClusterOptions { members, tls: None }).await
    }

    /// Starts a cluster as `opts` says and waits until all members are healthy.
    ///
    /// # Panics
    ///
    /// As [`Cluster::start`].
    pub async fn start_with(opts: ClusterOptions) -> Cluster {
        assert!(opts.members >= 1, "a cluster needs at least one member");
        let etcd = crate::etcd_path();
        let mut attempt = 1;
        loop {
            let cluster = Cluster::spawn(&etcd, &opts);
            let all: Vec<usize> = (0..cluster.members.len()).collect();
            match cluster.await_health(&all, "starting the cluster").await {
                Ok(()) => return cluster,
                Err(failure) if failure.port_in_use && attempt < START_ATTEMPTS => {
                    eprintln!(
                        "testkit: a port was taken before etcd could bind it; retrying with fresh ports ({attempt}/{START_ATTEMPTS})"
                    );
                    attempt += 1;
                }
                Err(failure) => panic!("{}", failure.message),
            }
        }
    }

    /// Creates the members' dirs and spawns every member, without waiting.
    fn spawn(etcd: &Path, opts: &ClusterOptions) -> Cluster {
        Cluster::spawn_on(etcd, opts, &free_ports(opts.members * 3))
    }

    /// As [`Cluster::spawn`], on `ports`: client, peer, metrics port of member 0, then member 1...
    fn spawn_on(etcd: &Path, opts: &ClusterOptions, ports: &[u16]) -> Cluster {
        let token = unique_token();
        let names: Vec<String> = (0..opts.members).map(|i| format!("m{i}")).collect();
        let peer_url = |i: usize| format!("http://127.0.0.1:{}", ports[i * 3 + 1]);
        let initial_cluster = names
            .iter()
            .enumerate()
            .map(|(i, name)| format!("{name}={}", peer_url(i)))
            .collect::<Vec<_>>()
            .join(",");
        let client_scheme = if opts.tls.is_some() { "https" } else { "http" };

        let members: Vec<Member> = names
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let (client_port, peer_port, metrics_port) =
                    (ports[i * 3], ports[i * 3 + 1], ports[i * 3 + 2]);
                let dir = tempfile::Builder::new()
                    .prefix(&format!("testkit-etcd-{name}-"))
                    .tempdir()
                    .expect("create a temp dir for an etcd member");
                let data_dir = dir.path().join("data");
                let log_path = dir.path().join("etcd.log");
                let client_url = format!("{client_scheme}://127.0.0.1:{client_port}");
                let mut args: Vec<OsString> = Vec::new();
                let mut flag = |name: &str, value: &dyn AsRef<std::ffi::OsStr>| {
                    let mut arg = OsString::from(format!("--{name}="));
                    arg.push(value.as_ref());
                    args.push(arg);
                };
                flag("name", &name);
                flag("data-dir", &data_dir);
                flag("listen-client-urls", &client_url);
                flag("advertise-client-urls", &client_url);
                flag("listen-peer-urls", &peer_url(i));
                flag("initial-advertise-peer-urls", &peer_url(i));
                // /health and /metrics over plain http whatever the client TLS: the kit polls
                // health and reads metrics without a TLS client.
                flag(
                    "listen-metrics-urls",
                    &format!("http://127.0.0.1:{metrics_port}"),
                );
                flag("initial-cluster", &initial_cluster);
                flag("initial-cluster-state", &"new");
                flag("initial-cluster-token", &token);
                flag("log-level", &"info");
                if let Some(tls) = &opts.tls {
                    flag("cert-file", &tls.server_cert);
                    flag("key-file", &tls.server_key);
                    if tls.client_cert_auth {
                        flag("trusted-ca-file", &tls.ca);
                    }
                }
                // Data dies with the test; fsync would only make every write slow.
                args.push("--unsafe-no-fsync".into());
                if opts.tls.as_ref().is_some_and(|t| t.client_cert_auth) {
                    args.push("--client-cert-auth".into());
                }
                Member {
                    name,
                    client_port,
                    peer_port,
                    metrics_port,
                    client_scheme,
                    args,
                    data_dir,
                    log_path,
                    log_offset: AtomicU64::new(0),
                    process: Mutex::new(Process::Killed),
                    paused: AtomicBool::new(false),
                    _dir: dir,
                }
            })
            .collect();
        for member in &members {
            member.spawn(etcd);
        }
        Cluster {
            members,
            tls: opts.tls.clone(),
        }
    }

    /// Number of members, running or not.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member. (Pairs with [`Cluster::len`].)
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// `127.0.0.1:PORT` of every member's client listener, killed members included.
    pub fn client_endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_endpoint).collect()
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS) of every member, killed members included.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Member `i`.
    ///
    /// # Panics
    ///
    /// If `i` is out of range.
    pub fn member(&self, i: usize) -> &Member {
        self.members.get(i).unwrap_or_else(|| {
            panic!(
                "no member {i}: the cluster has {} members",
                self.members.len()
            )
        })
    }

    /// The cluster's TLS options, if it serves TLS.
    pub fn tls(&self) -> Option<&TlsOptions> {
        self.tls.as_ref()
    }

    /// Kills member `i` with SIGKILL and reaps it. Its data dir stays, for [`Cluster::restart`].
    /// Killing a member that is not running does nothing.
    ///
    /// Returns at once. If the member was the leader, the others keep trusting it until the
    /// election timeout, and a write sent to them meanwhile can fail with "request timed out,
    /// possibly due to previous leader failure" (etcd drops proposals forwarded to a dead leader,
    /// and etcdctl does not retry writes): call [`Cluster::wait_healthy`] first when a test needs
    /// the survivors to serve.
    pub fn kill(&mut self, i: usize) {
        self.member(i).kill();
    }

    /// Starts member `i` again with the same name, ports and data dir, and waits until it is
    /// healthy. A running member is killed first.
    ///
    /// # Panics
    ///
    /// If it is not healthy within 60 s, e.g. because another process took one of its ports.
    pub async fn restart(&mut self, i: usize) {
        let member = self.member(i);
        member.kill();
        member.spawn(&crate::etcd_path());
        if let Err(failure) = self
            .await_health(&[i], &format!("restarting member {}", member.name))
            .await
        {
            panic!("{}", failure.message);
        }
    }

    /// Freezes member `i` with SIGSTOP: its sockets stay open (the kernel still accepts TCP
    /// connections) but it answers nothing, like a hung or partitioned node.
    ///
    /// # Panics
    ///
    /// If the member is not running.
    pub fn pause(&self, i: usize) {
        let member = self.member(i);
        member.signal(Signal::STOP, "pause");
        member.paused.store(true, Ordering::SeqCst);
    }

    /// Thaws member `i` (SIGCONT) after [`Cluster::pause`].
    ///
    /// # Panics
    ///
    /// If the member is not running.
    pub fn resume(&self, i: usize) {
        let member = self.member(i);
        member.signal(Signal::CONT, "resume");
        member.paused.store(false, Ordering::SeqCst);
    }

    /// Waits until every running member is healthy (`/health` says `{"health":"true"}`), 60 s at
    /// most. Killed and paused members are skipped.
    ///
    /// # Panics
    ///
    /// On timeout, or if a member exited on its own; the message carries the logs' tails.
    pub async fn wait_healthy(&self) {
        let running: Vec<usize> = (0..self.members.len())
            .filter(|&i| {
                let m = &self.members[i];
                !m.is_paused() && !m.is_killed()
            })
            .collect();
        if let Err(failure) = self.await_health(&running, "waiting for health").await {
            panic!("{}", failure.message);
        }
    }

    /// Index of the member that reports itself leader (`etcd_server_is_leader`), among running,
    /// unpaused members; `None` if none does. Right after a fault a stale leader may still claim
    /// it: ask after [`Cluster::wait_healthy`].
    pub async fn leader(&self) -> Option<usize> {
        for (i, member) in self.members.iter().enumerate() {
            if member.is_paused() || !member.is_running() {
                continue;
            }
            let Ok(resp) =
                http::get(member.metrics_port, "/metrics", METRICS_REQUEST_TIMEOUT).await
            else {
                continue;
            };
            if http::sum_metric(&resp.body, "etcd_server_is_leader") == Some(1.0) {
                return Some(i);
            }
        }
        None
    }

    /// Runs `etcdctl` (API v3) against all members with `args`, TLS flags when the cluster has
    /// TLS, and sane `--dial-timeout`/`--command-timeout` (pass the flag again to override).
    ///
    /// Blocks until etcdctl exits; see the crate docs about runtimes.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.etcdctl_at(&self.client_urls().join(","), args)
    }

    /// As [`Cluster::etcdctl`] but at `endpoints` (comma-separated), e.g. a proxy in front of the
    /// cluster; the TLS flags are kept.
    pub fn etcdctl_at(&self, endpoints: &str, args: &[&str]) -> Output {
        let mut cmd = self.etcdctl_command(endpoints, args);
        let mut run = || {
            cmd.output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", crate::etcdctl_path().display()))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            _ => run(),
        }
    }

    /// [`Cluster::etcdctl`] without blocking the runtime.
    pub async fn etcdctl_async(&self, args: &[&str]) -> Output {
        self.etcdctl_at_async(&self.client_urls().join(","), args)
            .await
    }

    /// [`Cluster::etcdctl_at`] without blocking the runtime.
    pub async fn etcdctl_at_async(&self, endpoints: &str, args: &[&str]) -> Output {
        let cmd = self.etcdctl_command(endpoints, args);
        tokio::process::Command::from(cmd)
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", crate::etcdctl_path().display()))
    }

    /// Runs [`Cluster::etcdctl`] and returns its stdout.
    ///
    /// # Panics
    ///
    /// If etcdctl fails; the message has the command and its stderr.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        if !out.status.success() {
            panic!(
                "etcdctl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The etcdctl command line: defaults first so that `args` can override them.
    fn etcdctl_command(&self, endpoints: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(crate::etcdctl_path());
        hermetic_env(&mut cmd);
        cmd.env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .arg(format!("--endpoints={endpoints}"))
            .arg(ETCDCTL_DIAL_TIMEOUT)
            .arg(ETCDCTL_COMMAND_TIMEOUT);
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert").arg(&tls.ca);
            if let Some(cert) = &tls.client_cert {
                cmd.arg("--cert").arg(cert);
            }
            if let Some(key) = &tls.client_key {
                cmd.arg("--key").arg(key);
            }
        }
        cmd.args(args);
        cmd
    }

    /// Sum of the samples of Prometheus metric `name` on member `i`'s `/metrics`; `None` if the
    /// member exposes no such metric. For histograms ask for `name_count`, `name_sum`, ...
    ///
    /// # Panics
    ///
    /// If `/metrics` cannot be read (member down or paused).
    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        http::sum_metric(&self.metrics_text(i).await, name)
    }

    /// The raw text of member `i`'s `/metrics`.
    ///
    /// # Panics
    ///
    /// If it cannot be read (member down or paused).
    pub async fn metrics_text(&self, i: usize) -> String {
        let member = self.member(i);
        match http::get(member.metrics_port, "/metrics", METRICS_REQUEST_TIMEOUT).await {
            Ok(resp) if resp.status == 200 => resp.body,
            Ok(resp) => panic!(
                "GET {}/metrics of member {}: status {}",
                member.metrics_url(),
                member.name,
                resp.status
            ),
            Err(e) => panic!(
                "GET {}/metrics of member {}: {e}",
                member.metrics_url(),
                member.name
            ),
        }
    }

    /// Polls until members `targets` are healthy, failing fast if one exits.
    async fn await_health(&self, targets: &[usize], doing: &str) -> Result<(), HealthFailure> {
        let started = Instant::now();
        let deadline = started + HEALTH_DEADLINE;
        let mut pending: Vec<usize> = targets.to_vec();
        let mut last_error: Vec<String> = vec![String::new(); self.members.len()];
        loop {
            let mut still_pending = Vec::new();
            for &i in &pending {
                let member = &self.members[i];
                if let Some(status) = member.reap_if_exited() {
                    let log = member.log_since_spawn();
                    return Err(HealthFailure {
                        port_in_use: log.contains("address already in use"),
                        message: format!(
                            "etcd member {} exited ({status}) while {doing}; last log lines of {}:\n{}",
                            member.name,
                            member.log_path.display(),
                            member.log_tail()
                        ),
                    });
                }
                if let Err(e) = member.check_health().await {
                    last_error[i] = e;
                    still_pending.push(i);
                }
            }
            pending = still_pending;
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut message = format!(
                    "etcd not healthy after {:?} while {doing}:",
                    started.elapsed()
                );
                for &i in &pending {
                    let member = &self.members[i];
                    message.push_str(&format!(
                        "\n--- member {} ({}): {}; last log lines of {}:\n{}",
                        member.name,
                        member.client_url(),
                        last_error[i],
                        member.log_path.display(),
                        member.log_tail()
                    ));
                }
                return Err(HealthFailure {
                    port_in_use: false,
                    message,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Member {
    /// The member's name (`m0`, `m1`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `127.0.0.1:PORT` of the client listener.
    pub fn client_endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `http://127.0.0.1:PORT`, or `https://` when the cluster has TLS.
    pub fn client_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.client_scheme, self.client_port)
    }

    /// `http://127.0.0.1:PORT` of the peer listener.
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// `http://127.0.0.1:PORT` serving `/health` and `/metrics`, plain http even with TLS.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port)
    }

    /// PID of the running process; `None` once killed or exited.
    pub fn pid(&self) -> Option<u32> {
        match &*self.lock() {
            Process::Running(child) => Some(child.id()),
            _ => None,
        }
    }

    /// The file etcd logs to (stdout and stderr), across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The member's `--data-dir`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether the process is alive (a paused member is running).
    pub fn is_running(&self) -> bool {
        self.reap_if_exited();
        matches!(&*self.lock(), Process::Running(_))
    }

    /// Whether the member is stopped by [`Cluster::pause`].
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path, 0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Process> {
        // A panic while holding this lock leaves a valid state: recover it.
        self.process.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_killed(&self) -> bool {
        matches!(&*self.lock(), Process::Killed)
    }

    fn spawn(&self, etcd: &Path) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        self.log_offset.store(offset, Ordering::SeqCst);
        let stdout = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup {}: {e}", self.log_path.display()));
        let mut cmd = Command::new(etcd);
        hermetic_env(&mut cmd);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", etcd.display()));
        self.paused.store(false, Ordering::SeqCst);
        *self.lock() = Process::Running(child);
    }

    fn kill(&self) {
        let mut process = self.lock();
        if let Process::Running(child) = &mut *process {
            // Errors mean it is already dead; wait() reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
            *process = Process::Killed;
        }
        self.paused.store(false, Ordering::SeqCst);
    }

    fn signal(&self, signal: Signal, what: &str) {
        let process = self.lock();
        let Process::Running(child) = &*process else {
            panic!("cannot {what} member {}: not running", self.name);
        };
        // The child is not reaped while we hold it, so its PID cannot have been reused.
        let pid = i32::try_from(child.id())
            .ok()
            .and_then(Pid::from_raw)
            .unwrap_or_else(|| panic!("bad pid {}", child.id()));
        kill_process(pid, signal)
            .unwrap_or_else(|e| panic!("cannot {what} member {} (pid {pid:?}): {e}", self.name));
    }

    /// If the process exited by itself, reaps it and returns how it ended.
    fn reap_if_exited(&self) -> Option<ExitStatus> {
        let mut process = self.lock();
        match &mut *process {
            Process::Running(child) => match child.try_wait() {
                Ok(Some(status)) => {
                    *process = Process::Exited(status);
                    Some(status)
                }
                _ => None,
            },
            Process::Exited(status) => Some(*status),
            Process::Killed => None,
        }
    }

    async fn check_health(&self) -> Result<(), String> {
        match http::get(self.metrics_port, "/health", HEALTH_REQUEST_TIMEOUT).await {
            Ok(resp) if resp.status == 200 && resp.body.contains(r#""health":"true""#) => Ok(()),
            Ok(resp) => Err(format!(
                "/health answered {}: {}",
                resp.status,
                resp.body.trim()
            )),
            Err(e) => Err(format!("/health: {e}")),
        }
    }

    fn log_since_spawn(&self) -> String {
        read_log(&self.log_path, self.log_offset.load(Ordering::SeqCst))
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_log(path: &Path, offset: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    read().unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// `n` distinct free loopback ports. All are held until every one is found, so they differ from
/// each other; they are released on return, for etcd to bind.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .expect("local address of a bound listener")
                .port()
        })
        .collect()
}

/// A cluster token no other cluster on this machine shares, so members of different tests can
/// never join each other even if ports get mixed up.
fn unique_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "testkit-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Drops `ETCD_*` / `ETCDCTL_*` from the child's environment: etcd and etcdctl read flags from
/// them, and a developer's shell settings must not change what a test runs.
fn hermetic_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        if key_str.starts_with("ETCD_") || key_str.starts_with("ETCDCTL_") {
            cmd.env_remove(&key);
        }
    }
}

/// Makes the kernel SIGKILL the child when the spawning thread dies, so a killed test run leaves
/// no etcd behind.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: prctl and getppid are, and nothing here allocates or takes a lock
    // (`last_os_error`/`from_raw_os_error` only read errno or wrap an integer).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl, and then no signal will come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests share `&Cluster` across tasks and move it into them.
    #[test]
    fn cluster_is_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Cluster>();
        send_sync::<crate::certs::Ca>();
    }

    /// The retry in `start_with` hinges on telling "port taken" apart from other failures.
    #[tokio::test]
    async fn a_taken_port_is_reported_as_such() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
        let mut ports = free_ports(3);
        ports[0] = taken.local_addr().expect("local addr").port();
        let cluster = Cluster::spawn_on(&crate::etcd_path(), &ClusterOptions::default(), &ports);
        let failure = match cluster.await_health(&[0], "testing").await {
            Ok(()) => panic!("etcd became healthy on a port held by the test"),
            Err(failure) => failure,
        };
        assert!(
            failure.port_in_use,
            "not seen as a port clash: {}",
            failure.message
        );
        assert!(failure.message.contains("exited"), "{}", failure.message);
        assert!(!cluster.member(0).is_running());
    }
}
