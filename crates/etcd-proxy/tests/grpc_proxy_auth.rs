//! `etcd-proxy grpc-proxy start` with the Rust `etcd-client` crate as the client, against a real
//! 3-member etcd: auth with two users whose tokens must each travel only with their own
//! requests, etcd's status codes and messages passed through unchanged (compared with the same
//! call made directly to etcd), and a follower killed under load without losing an acknowledged
//! write.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{ok, start_grpc_proxy};
use etcd_api::etcdserverpb::auth_client::AuthClient;
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::{AuthenticateRequest, PutRequest, RangeRequest};
use etcd_client::{Client, ConnectOptions, GetOptions};
use testkit::Cluster;
use tonic::Code;
use tonic::transport::Channel;

/// Bound on any one call of a test, so that a hung proxy fails the test instead of stalling it.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

const PERMISSION_DENIED: (Code, &str) = (Code::PermissionDenied, "etcdserver: permission denied");

/// An `etcd-client` at `endpoints`, logged in as `user` (name, password) when given.
async fn connect(
    endpoints: &[String],
    user: Option<(&str, &str)>,
) -> Result<Client, etcd_client::Error> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(CALL_TIMEOUT);
    if let Some((name, password)) = user {
        opts = opts.with_user(name, password);
    }
    Client::connect(endpoints, Some(opts)).await
}

/// The gRPC code and message of a failed `etcd-client` call; panics on success or on an error
/// that is not a gRPC status.
fn status<T: std::fmt::Debug>(what: &str, r: Result<T, etcd_client::Error>) -> (Code, String) {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("{what}: expected a gRPC status, got {other:?}"),
    }
}

fn assert_status<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, etcd_client::Error>,
    want: (Code, &str),
) {
    let got = status(what, r);
    assert_eq!((got.0, got.1.as_str()), want, "{what}");
}

/// The value of `key` read with `client`, `None` if the key does not exist.
async fn value(client: &mut Client, key: &str) -> Result<Option<Vec<u8>>, etcd_client::Error> {
    let resp = client.get(key, None).await?;
    Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
}

/// Sets up etcd auth directly on the cluster: `root` (role root), `alice` (readwrite on prefix
/// `a/`), `bob` (read on prefix `b/`), and the keys `a/seed` and `b/seed`; then enables auth.
fn enable_auth(cluster: &Cluster) {
    for (k, v) in [("a/seed", "A"), ("b/seed", "B")] {
        ok(cluster.etcdctl(&["put", k, v]));
    }
    for args in [
        &["role", "add", "root"][..],
        &["user", "add", "root:rootpw"],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "a-rw"],
        &[
            "role",
            "grant-permission",
            "a-rw",
            "readwrite",
            "a/",
            "--prefix=true",
        ],
        &["user", "add", "alice:alicepw"],
        &["user", "grant-role", "alice", "a-rw"],
        &["role", "add", "b-r"],
        &[
            "role",
            "grant-permission",
            "b-r",
            "read",
            "b/",
            "--prefix=true",
        ],
        &["user", "add", "bob:bobpw"],
        &["user", "grant-role", "bob", "b-r"],
        &["auth", "enable"],
    ] {
        ok(cluster.etcdctl(args));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_users_through_one_proxy_keep_their_own_rights() {
    let cluster = Cluster::start(3).await;
    enable_auth(&cluster);
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let at_proxy = [addr.clone()];

    let mut alice = connect(&at_proxy, Some(("alice", "alicepw")))
        .await
        .expect("alice logs in through the proxy");
    let mut bob = connect(&at_proxy, Some(("bob", "bobpw")))
        .await
        .expect("bob logs in through the proxy");

    // Alice reads and writes under a/, and nothing under b/.
    alice
        .put("a/1", "from-alice", None)
        .await
        .expect("alice put a/1");
    assert_eq!(
        value(&mut alice, "a/1").await.expect("alice get a/1"),
        Some(b"from-alice".to_vec())
    );
    assert_status(
        "alice put b/1",
        alice.put("b/1", "x", None).await,
        PERMISSION_DENIED,
    );
    assert_status(
        "alice get b/seed",
        alice.get("b/seed", None).await,
        PERMISSION_DENIED,
    );
    // Bob reads b/ but cannot write it, nor touch a/.
    assert_eq!(
        value(&mut bob, "b/seed").await.expect("bob get b/seed"),
        Some(b"B".to_vec())
    );
    assert_status(
        "bob put b/1",
        bob.put("b/1", "x", None).await,
        PERMISSION_DENIED,
    );
    assert_status("bob get a/1", bob.get("a/1", None).await, PERMISSION_DENIED);
    // The denied puts did not happen (read as root, directly on etcd).
    let mut root = connect(&cluster.client_endpoints(), Some(("root", "rootpw")))
        .await
        .expect("root logs in on etcd");
    assert_eq!(value(&mut root, "b/1").await.expect("root get b/1"), None);

    // Interleaved on one proxy, each over its own client connection: every call gets exactly
    // its own user's rights, never the other's.
    let rounds = 60;
    let alice_task = tokio::spawn(async move {
        for i in 0..rounds {
            let key = format!("a/i{i}");
            alice.put(key.as_str(), "v", None).await.expect("alice put");
            assert!(value(&mut alice, &key).await.expect("alice get").is_some());
            assert_status(
                "alice put b/ (interleaved)",
                alice.put(format!("b/i{i}"), "v", None).await,
                PERMISSION_DENIED,
            );
        }
    });
    let bob_task = tokio::spawn(async move {
        for i in 0..rounds {
            assert_eq!(
                value(&mut bob, "b/seed").await.expect("bob get"),
                Some(b"B".to_vec())
            );
            assert_status(
                "bob put b/ (interleaved)",
                bob.put(format!("b/j{i}"), "v", None).await,
                PERMISSION_DENIED,
            );
            assert_status(
                "bob get a/ (interleaved)",
                bob.get(format!("a/i{i}"), None).await,
                PERMISSION_DENIED,
            );
        }
    });
    alice_task.await.expect("alice's calls");
    bob_task.await.expect("bob's calls");

    // Interleaved on ONE HTTP/2 connection to the proxy: requests of both users share the
    // proxy's client connection and its connections to etcd, each with its own `token`.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the proxy");
    let token_of = |name: &'static str, password: &'static str| {
        let channel = channel.clone();
        async move {
            AuthClient::new(channel)
                .authenticate(AuthenticateRequest {
                    name: name.into(),
                    password: password.into(),
                })
                .await
                .expect("authenticate")
                .into_inner()
                .token
        }
    };
    let alice_token = token_of("alice", "alicepw").await;
    let bob_token = token_of("bob", "bobpw").await;
    assert_ne!(alice_token, bob_token);
    let mut calls = Vec::new();
    for i in 0..100 {
        let (user, token) = if i % 2 == 0 {
            ("alice", alice_token.clone())
        } else {
            ("bob", bob_token.clone())
        };
        let mut kv = KvClient::new(channel.clone());
        calls.push(tokio::spawn(async move {
            // Both users try both prefixes, concurrently.
            let mut answers = Vec::new();
            for key in ["a/seed", "b/seed"] {
                let mut req = tonic::Request::new(RangeRequest {
                    key: key.as_bytes().to_vec().into(),
                    ..Default::default()
                });
                req.metadata_mut()
                    .insert("token", token.parse().expect("token is ASCII"));
                let code = match kv.range(req).await {
                    Ok(_) => Code::Ok,
                    Err(s) => s.code(),
                };
                answers.push((user, key, code));
            }
            answers
        }));
    }
    for call in calls {
        for (user, key, code) in call.await.expect("interleaved call") {
            let allowed = (user == "alice") == key.starts_with("a/");
            let want = if allowed {
                Code::Ok
            } else {
                Code::PermissionDenied
            };
            assert_eq!(code, want, "{user} reading {key}");
        }
    }

    // Nothing Alice could not write appeared; her own writes are all there.
    let b_keys = root
        .get("b/", Some(GetOptions::new().with_prefix().with_keys_only()))
        .await
        .expect("root lists b/");
    let b_keys: Vec<_> = b_keys.kvs().iter().map(|kv| kv.key().to_vec()).collect();
    assert_eq!(b_keys, vec![b"b/seed".to_vec()]);
    let a_count = root
        .get(
            "a/i",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("root counts a/i");
    assert_eq!(a_count.count(), rounds as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_errors_are_etcds() {
    let cluster = Cluster::start(3).await;
    enable_auth(&cluster);
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let at_proxy = [addr.clone()];
    let direct = cluster.client_endpoints();

    // No credentials at all.
    let mut anon_proxy = connect(&at_proxy, None)
        .await
        .expect("connect to the proxy");
    let mut anon_direct = connect(&direct, None).await.expect("connect to etcd");
    let via_proxy = status("anonymous put", anon_proxy.put("a/x", "v", None).await);
    let via_etcd = status("anonymous put", anon_direct.put("a/x", "v", None).await);
    assert_eq!(
        (via_proxy.0, via_proxy.1.as_str()),
        (Code::InvalidArgument, "etcdserver: user name is empty")
    );
    assert_eq!(via_proxy, via_etcd);

    // A wrong password: the client's Authenticate at connect time fails.
    let via_proxy = status(
        "wrong password",
        connect(&at_proxy, Some(("alice", "nope"))).await.map(drop),
    );
    let via_etcd = status(
        "wrong password",
        connect(&direct, Some(("alice", "nope"))).await.map(drop),
    );
    assert_eq!(
        (via_proxy.0, via_proxy.1.as_str()),
        (
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password"
        )
    );
    assert_eq!(via_proxy, via_etcd);

    // A token etcd never issued.
    async fn bogus_token_put(addr: &str) -> (Code, String) {
        let mut kv = KvClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let mut req = tonic::Request::new(PutRequest {
            key: b"a/x".to_vec().into(),
            value: b"v".to_vec().into(),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("token", "bogus".parse().expect("ASCII"));
        match kv.put(req).await {
            Ok(r) => panic!("put with a bogus token succeeded: {r:?}"),
            Err(s) => (s.code(), s.message().to_string()),
        }
    }
    let via_proxy = bogus_token_put(&addr).await;
    let via_etcd = bogus_token_put(&direct[0]).await;
    assert_eq!(
        (via_proxy.0, via_proxy.1.as_str()),
        (Code::Unauthenticated, "etcdserver: invalid auth token")
    );
    assert_eq!(via_proxy, via_etcd);

    // Permission denied, through the proxy and directly.
    let mut bob_proxy = connect(&at_proxy, Some(("bob", "bobpw")))
        .await
        .expect("bob logs in through the proxy");
    let mut bob_direct = connect(&direct, Some(("bob", "bobpw")))
        .await
        .expect("bob logs in on etcd");
    let via_proxy = status("bob put", bob_proxy.put("b/x", "v", None).await);
    let via_etcd = status("bob put", bob_direct.put("b/x", "v", None).await);
    assert_eq!((via_proxy.0, via_proxy.1.as_str()), PERMISSION_DENIED);
    assert_eq!(via_proxy, via_etcd);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_codes_are_etcds_code_and_message() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut via = connect(&[addr], None).await.expect("connect to the proxy");
    let mut direct = connect(&cluster.client_endpoints(), None)
        .await
        .expect("connect to etcd");

    // A compacted revision.
    let first = via.put("k", "v1", None).await.expect("put v1");
    let old = first.header().expect("header").revision();
    let now = via
        .put("k", "v2", None)
        .await
        .expect("put v2")
        .header()
        .expect("header")
        .revision();
    via.compact(now, None).await.expect("compact");
    let at_old = || Some(GetOptions::new().with_revision(old));
    let p = status("get compacted", via.get("k", at_old()).await);
    let d = status("get compacted", direct.get("k", at_old()).await);
    assert_eq!(
        (p.0, p.1.as_str()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )
    );
    assert_eq!(p, d);

    // A future revision.
    let future = || Some(GetOptions::new().with_revision(now + 1000));
    let p = status("get future", via.get("k", future()).await);
    let d = status("get future", direct.get("k", future()).await);
    assert_eq!(
        (p.0, p.1.as_str()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision"
        )
    );
    assert_eq!(p, d);

    // An empty key.
    let p = status("put empty key", via.put("", "v", None).await);
    let d = status("put empty key", direct.put("", "v", None).await);
    assert_eq!(
        (p.0, p.1.as_str()),
        (Code::InvalidArgument, "etcdserver: key is not provided")
    );
    assert_eq!(p, d);

    // A lease that does not exist.
    let p = status("revoke missing lease", via.lease_revoke(0x7e57).await);
    let d = status("revoke missing lease", direct.lease_revoke(0x7e57).await);
    assert_eq!(
        (p.0, p.1.as_str()),
        (Code::NotFound, "etcdserver: requested lease not found")
    );
    assert_eq!(p, d);
}

/// What the load workers share: how many puts were acknowledged, and whether the follower is
/// dead yet.
#[derive(Default)]
struct LoadProgress {
    acked: AtomicUsize,
    killed: AtomicBool,
}

/// What one load worker saw.
#[derive(Default)]
struct LoadReport {
    /// Keys whose put was acknowledged, with the value put.
    acked: BTreeMap<String, String>,
    ops: usize,
    /// Calls that ended after the follower was killed.
    ops_after_kill: usize,
    /// Errors by call and gRPC code (`put Unavailable`, `get timeout`, ...).
    errors: BTreeMap<String, usize>,
    /// A few error messages, for the report.
    samples: Vec<String>,
    /// When the last error was seen.
    last_error: Option<Instant>,
}

impl LoadReport {
    /// Counts one `op` (`put` or `get`) that ended with `result` (`Err(None)`: timed out).
    fn record<T>(
        &mut self,
        progress: &LoadProgress,
        op: &str,
        result: &Result<T, Option<etcd_client::Error>>,
    ) {
        self.ops += 1;
        if progress.killed.load(Ordering::SeqCst) {
            self.ops_after_kill += 1;
        }
        let Err(e) = result else { return };
        let kind = match e {
            Some(etcd_client::Error::GRpcStatus(s)) => format!("{op} {:?}", s.code()),
            Some(_) => format!("{op} other"),
            None => format!("{op} timeout"),
        };
        if self.samples.len() < 3 {
            self.samples.push(format!("{kind}: {e:?}"));
        }
        *self.errors.entry(kind).or_default() += 1;
        self.last_error = Some(Instant::now());
    }

    fn merge(&mut self, other: LoadReport) {
        self.acked.extend(other.acked);
        self.ops += other.ops;
        self.ops_after_kill += other.ops_after_kill;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.samples.extend(other.samples);
        self.last_error = self.last_error.max(other.last_error);
    }
}

/// `fut` bounded by [`CALL_TIMEOUT`]; a timeout is `Err(None)`.
async fn bounded<T>(
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Option<etcd_client::Error>> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r.map_err(Some),
        Err(_) => Err(None),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_puts_survive_a_follower_killed_under_load() {
    let mut cluster = Cluster::start(3).await;
    let (p, addr) = start_grpc_proxy(&cluster, &[]);
    let client = connect(std::slice::from_ref(&addr), None)
        .await
        .expect("connect to the proxy");
    let leader = cluster.leader().await.expect("the cluster has a leader");
    let follower = (leader + 1) % cluster.len();

    // 4 workers, each a put then a linearizable get of the same key, 2 000 calls in all at most,
    // bounded in time too.
    const WORKERS: usize = 4;
    const PUTS_PER_WORKER: usize = 250;
    let budget = Duration::from_secs(20);
    let progress = Arc::new(LoadProgress::default());
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let mut client = client.clone();
        let progress = progress.clone();
        workers.push(tokio::spawn(async move {
            let mut report = LoadReport::default();
            for i in 0..PUTS_PER_WORKER {
                if start.elapsed() > budget {
                    break;
                }
                let key = format!("load/{w}/{i:04}");
                let val = format!("v{w}-{i}");
                let put = bounded(client.put(key.as_str(), val.as_str(), None)).await;
                report.record(&progress, "put", &put);
                if put.is_err() {
                    continue;
                }
                report.acked.insert(key.clone(), val.clone());
                progress.acked.fetch_add(1, Ordering::SeqCst);
                // A linearizable read after an acknowledged write sees it, whichever member
                // serves it.
                let got = bounded(value(&mut client, &key)).await;
                report.record(&progress, "get", &got);
                if let Ok(got) = got {
                    assert_eq!(got, Some(val.into_bytes()), "read of {key}");
                }
            }
            report
        }));
    }

    // Kill the follower once the load is well under way (progress, not a clock, decides).
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.acked.load(Ordering::SeqCst) < 150 {
        assert!(Instant::now() < deadline, "the load made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = Instant::now();
    cluster.kill(follower);
    progress.killed.store(true, Ordering::SeqCst);

    let mut total = LoadReport::default();
    for w in workers {
        total.merge(w.await.expect("load worker"));
    }
    let errors: usize = total.errors.values().sum();
    eprintln!(
        "load: {} calls ({} after the kill), {} acknowledged puts, {errors} errors {:?}, \
         last error {:?} after the kill; e.g. {:?}",
        total.ops,
        total.ops_after_kill,
        total.acked.len(),
        total.errors,
        total
            .last_error
            .map(|t| t.saturating_duration_since(killed_at)),
        total.samples,
    );
    assert!(
        total.ops_after_kill >= 100,
        "the load ended too soon after the kill to mean anything"
    );
    // Only writes in flight on the killed member may fail, and only as Unavailable (or a timeout
    // of a call stuck on it): never a wrong answer, never a lasting outage. Reads never fail:
    // the proxy sends a read the member failed to another member.
    for kind in total.errors.keys() {
        assert!(
            kind.starts_with("put "),
            "a read failed ({kind}): {:?}\n{}",
            total.samples,
            p.log()
        );
        assert!(
            kind.ends_with("Unavailable") || kind.ends_with("timeout"),
            "unexpected error {kind}: {:?}\n{}",
            total.samples,
            p.log()
        );
    }
    if let Some(last) = total.last_error {
        assert!(
            last < killed_at + Duration::from_secs(15),
            "errors went on {:?} after the kill: {:?}",
            last.saturating_duration_since(killed_at),
            total.errors
        );
    }

    // Calls succeed through the proxy again.
    let mut c = client.clone();
    for i in 0..20 {
        let key = format!("after/{i}");
        c.put(key.as_str(), "ok", None)
            .await
            .expect("put after the kill");
        assert_eq!(
            value(&mut c, &key).await.expect("get after the kill"),
            Some(b"ok".to_vec())
        );
    }

    // Every acknowledged put is in etcd, read directly from the survivors.
    let survivors: Vec<String> = (0..cluster.len())
        .filter(|&i| i != follower)
        .map(|i| cluster.member(i).client_endpoint())
        .collect();
    let mut direct = connect(&survivors, None).await.expect("connect to etcd");
    let stored = direct
        .get("load/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("read load/ directly");
    let stored: BTreeMap<String, String> = stored
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        })
        .collect();
    for (k, v) in &total.acked {
        assert_eq!(stored.get(k), Some(v), "acknowledged put of {k} lost");
    }
}
