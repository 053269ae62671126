//! etcdctl through `etcd-proxy grpc-proxy start` prints what it prints against etcd directly, on a
//! real 3-member cluster: the same command is run both ways and the outputs compared.
//!
//! What legitimately differs is normalised, and only that: the `member_id` (and so a `-w json`,
//! `-w fields` or `-w protobuf` header) of whichever member answered, which is handled by comparing
//! the proxy's output with the output of each member asked directly (it must be exactly one of
//! them); lease IDs; endpoint addresses. Reads compared are made at the same revision (writes
//! first, then both reads). Writes are compared by running them twice on the same starting state
//! (once through the proxy, once directly) and comparing both the output and the state left.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{etcdctl_stdin, ok, start_grpc_proxy};
use testkit::Cluster;

/// Bound on waiting for a spawned etcdctl (watch, lock, elect) to print something.
const WAIT: Duration = Duration::from_secs(20);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// The `Error: ...` lines etcdctl printed (its JSON log lines name endpoints, so they differ).
fn error_lines(out: &Output) -> Vec<String> {
    text(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("Error:"))
        .map(str::to_string)
        .collect()
}

/// The revision in the header of a `-w json` reply.
fn revision(json: &str) -> i64 {
    let v: serde_json::Value = serde_json::from_str(json).expect("etcdctl -w json output");
    v["header"]["revision"].as_i64().expect("header.revision")
}

/// One cluster and the proxy in front of it: every command run both ways.
struct Both<'a> {
    cluster: &'a Cluster,
    proxy: &'a str,
    direct: String,
}

impl<'a> Both<'a> {
    fn new(cluster: &'a Cluster, proxy: &'a str) -> Self {
        Both {
            cluster,
            proxy,
            direct: cluster.client_urls().join(","),
        }
    }

    fn proxy(&self, args: &[&str]) -> Output {
        self.cluster.etcdctl_at(self.proxy, args)
    }

    fn direct(&self, args: &[&str]) -> Output {
        self.cluster.etcdctl(args)
    }

    /// `args` at each member on its own.
    fn each_member(&self, args: &[&str]) -> Vec<Output> {
        (0..self.cluster.len())
            .map(|i| {
                self.cluster
                    .etcdctl_at(&self.cluster.member(i).client_url(), args)
            })
            .collect()
    }

    /// Both succeed with the same stdout, which is returned.
    fn same(&self, args: &[&str]) -> String {
        let direct = self.direct(args);
        let proxy = self.proxy(args);
        assert!(
            direct.status.success() && proxy.status.success(),
            "etcdctl {args:?}\ndirect: {}\nproxy: {}",
            show(&direct),
            show(&proxy)
        );
        assert_eq!(
            text(&proxy.stdout),
            text(&direct.stdout),
            "etcdctl {args:?}: proxy (left) and direct (right) differ"
        );
        text(&proxy.stdout)
    }

    /// Both fail with the same exit code, stdout and `Error:` lines; returns the latter.
    fn same_err(&self, args: &[&str]) -> String {
        let direct = self.direct(args);
        let proxy = self.proxy(args);
        same_failure(args, &proxy, &direct)
    }

    /// The proxy's stdout (bytes) is exactly the stdout of one member asked directly: only the
    /// header's `member_id` may differ from one member to the next.
    fn same_as_a_member(&self, args: &[&str]) -> String {
        let proxy = self.proxy(args);
        let members = self.each_member(args);
        one_of_members(args, &proxy, &members)
    }
}

fn same_failure(what: &[&str], proxy: &Output, direct: &Output) -> String {
    assert!(
        !direct.status.success() && !proxy.status.success(),
        "etcdctl {what:?} should fail both ways\ndirect: {}\nproxy: {}",
        show(direct),
        show(proxy)
    );
    assert_eq!(
        proxy.status.code(),
        direct.status.code(),
        "etcdctl {what:?} exit codes\ndirect: {}\nproxy: {}",
        show(direct),
        show(proxy)
    );
    assert_eq!(
        text(&proxy.stdout),
        text(&direct.stdout),
        "etcdctl {what:?} stdout"
    );
    let (p, d) = (error_lines(proxy), error_lines(direct));
    assert!(!d.is_empty(), "no Error: line: {}", show(direct));
    assert_eq!(
        p, d,
        "etcdctl {what:?}: proxy (left) and direct (right) errors"
    );
    d.join("\n")
}

fn one_of_members(what: &[&str], proxy: &Output, members: &[Output]) -> String {
    assert!(proxy.status.success(), "etcdctl {what:?}: {}", show(proxy));
    for m in members {
        assert!(m.status.success(), "etcdctl {what:?} direct: {}", show(m));
    }
    assert!(
        members.iter().any(|m| m.stdout == proxy.stdout),
        "etcdctl {what:?}: the proxy's output is no member's\nproxy: {}\nmembers:\n{}",
        text(&proxy.stdout),
        members
            .iter()
            .map(|m| text(&m.stdout))
            .collect::<Vec<_>>()
            .join("\n")
    );
    text(&proxy.stdout)
}

/// An etcdctl left running (watch, lock, elect), its stdout collected line by line; killed on
/// drop.
struct Spawned {
    child: Child,
    rx: Receiver<String>,
    lines: Vec<String>,
    stderr: Arc<Mutex<String>>,
    what: String,
}

impl Spawned {
    fn start(endpoints: &str, args: &[&str]) -> Spawned {
        let mut cmd = Command::new(testkit::etcdctl_path());
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("ETCD_") || k.starts_with("ETCDCTL_") {
                cmd.env_remove(&key);
            }
        }
        let mut child = cmd
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .arg("--dial-timeout=5s")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcdctl");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&text(&buf[..n]));
            }
        });
        Spawned {
            child,
            rx,
            lines: Vec::new(),
            stderr,
            what: format!("etcdctl --endpoints={endpoints} {}", args.join(" ")),
        }
    }

    /// Collects lines until `done` holds for them, for at most `timeout`; whether it did.
    fn wait_for(&mut self, timeout: Duration, done: impl Fn(&[String]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.lines) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(l) => self.lines.push(l),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                // Exited: what it printed is all there is.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return done(&self.lines),
            }
        }
    }

    /// Like `wait_for`, panicking with what was printed on timeout.
    fn expect(&mut self, what: &str, done: impl Fn(&[String]) -> bool) {
        if !self.wait_for(WAIT, done) {
            panic!(
                "{}: no {what} within {WAIT:?}; stdout: {:?}; stderr: {}",
                self.what,
                self.lines,
                self.stderr()
            );
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `sig` (e.g. `INT`) to this etcdctl, by its PID.
    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {}", self.child.id());
    }

    /// Waits (bounded) for it to exit, then for its output to be read.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                while let Ok(l) = self.rx.recv_timeout(Duration::from_secs(2)) {
                    self.lines.push(l);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {WAIT:?}; stdout: {:?}; stderr: {}",
                self.what,
                self.lines,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `etcdctl txn` with `stdin`, at `endpoints`.
fn txn(endpoints: &str, args: &[&str], stdin: &str) -> Output {
    etcdctl_stdin(endpoints, args, stdin.as_bytes())
}

/// Runs `action(endpoint)` twice from the same state (made by `reset`), through the proxy then
/// directly, and checks that both print the same and leave the same keys under `prefix`; returns
/// the direct run's output.
fn same_write(
    both: &Both,
    reset: &dyn Fn(),
    prefix: &str,
    what: &str,
    action: &dyn Fn(&str) -> Output,
) -> Output {
    let state = || ok(both.direct(&["get", prefix, "--prefix"]));
    reset();
    let before = state();
    let proxy = action(both.proxy);
    let left_by_proxy = state();
    reset();
    assert_eq!(state(), before, "{what}: reset did not restore the state");
    let direct = action(&both.direct);
    let left_by_direct = state();
    assert_eq!(
        proxy.status.code(),
        direct.status.code(),
        "{what}\ndirect: {}\nproxy: {}",
        show(&direct),
        show(&proxy)
    );
    assert_eq!(
        text(&proxy.stdout),
        text(&direct.stdout),
        "{what}: proxy (left) and direct (right) print differently"
    );
    assert_eq!(
        error_lines(&proxy),
        error_lines(&direct),
        "{what}: proxy (left) and direct (right) errors"
    );
    assert_eq!(
        left_by_proxy, left_by_direct,
        "{what}: keys left by the proxy (left) and directly (right)"
    );
    direct
}

#[tokio::test(flavor = "multi_thread")]
async fn get_del_txn_and_compaction_match_direct() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let both = Both::new(&cluster, &addr);

    // Created in the order c a e b d, then a and c updated: key, create, modify, version and
    // value orders all differ.
    for (k, v) in [
        ("s/c", "3"),
        ("s/a", "5"),
        ("s/e", "1"),
        ("s/b", "4"),
        ("s/d", "2"),
        ("t", "x"),
        ("u", "y"),
    ] {
        assert_eq!(ok(both.proxy(&["put", k, v])), "OK\n");
    }
    let r0 = revision(&ok(both.direct(&["get", "s/a", "-w", "json"])));
    for (k, v) in [("s/a", "6"), ("s/c", "0"), ("s/c", "7")] {
        assert_eq!(ok(both.direct(&["put", k, v])), "OK\n");
    }
    let old = r0.to_string();

    // From here on nothing writes until the txn section: every read is at the same revision.
    assert_eq!(
        both.same(&["get", "s/", "--prefix"]),
        "s/a\n6\ns/b\n4\ns/c\n7\ns/d\n2\ns/e\n1\n"
    );
    assert_eq!(
        both.same(&["get", "s/d", "--from-key"]),
        "s/d\n2\ns/e\n1\nt\nx\nu\ny\n"
    );
    assert_eq!(
        both.same(&["get", "s/", "--prefix", "--limit", "2"]),
        "s/a\n6\ns/b\n4\n"
    );
    assert_eq!(
        both.same(&["get", "s/b", "s/d"]),
        "s/b\n4\ns/c\n7\n",
        "range [s/b, s/d)"
    );
    assert_eq!(both.same(&["get", "nope"]), "");
    for target in ["KEY", "CREATE", "MODIFY", "VERSION", "VALUE"] {
        let asc = both.same(&[
            "get",
            "s/",
            "--prefix",
            "--sort-by",
            target,
            "--order",
            "ASCEND",
        ]);
        let desc = both.same(&[
            "get",
            "s/",
            "--prefix",
            "--sort-by",
            target,
            "--order",
            "DESCEND",
        ]);
        assert_eq!(asc.lines().count(), 10, "{target}: {asc}");
        assert_ne!(asc, desc, "{target}");
        both.same(&[
            "get",
            "s/",
            "--prefix",
            "--sort-by",
            target,
            "--order",
            "DESCEND",
            "--limit",
            "2",
        ]);
    }
    assert_eq!(
        both.same(&[
            "get",
            "s/",
            "--prefix",
            "--sort-by",
            "CREATE",
            "--order",
            "ASCEND",
            "--keys-only"
        ]),
        "s/c\n\ns/a\n\ns/e\n\ns/b\n\ns/d\n\n"
    );
    assert_eq!(
        both.same(&[
            "get",
            "s/",
            "--prefix",
            "--sort-by",
            "VALUE",
            "--order",
            "DESCEND",
            "--print-value-only"
        ]),
        "7\n6\n4\n2\n1\n"
    );
    assert_eq!(
        both.same(&["get", "s/", "--prefix", "--rev", &old]),
        "s/a\n5\ns/b\n4\ns/c\n3\ns/d\n2\ns/e\n1\n"
    );
    assert_eq!(
        both.same(&["get", "s/a", "--hex"]),
        "\\x73\\x2f\\x61\n\\x36\n"
    );

    // Formats with a header: exactly one member's answer.
    let json = both.same_as_a_member(&["get", "s/", "--prefix", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["count"], 5, "{json}");
    let fields = both.same_as_a_member(&["get", "s/", "--prefix", "--count-only", "-w", "fields"]);
    assert!(fields.contains("\"Count\" : 5"), "{fields}");
    both.same_as_a_member(&["get", "s/", "--prefix", "--keys-only", "-w", "json"]);
    let limited = both.same_as_a_member(&["get", "s/", "--prefix", "--limit", "2", "-w", "json"]);
    assert!(limited.contains("\"more\":true"), "{limited}");
    both.same_as_a_member(&["get", "s/", "--prefix", "--rev", &old, "-w", "fields"]);
    both.same_as_a_member(&[
        "get",
        "s/",
        "--prefix",
        "--sort-by",
        "MODIFY",
        "--order",
        "DESCEND",
        "--limit",
        "3",
        "-w",
        "protobuf",
    ]);

    // Serializable reads are answered from the member's own state: all are caught up once a
    // linearizable read has been answered by each, which a bounded retry allows for.
    let linearizable = both.same(&["get", "s/", "--prefix"]);
    let deadline = Instant::now() + WAIT;
    loop {
        let p = both.proxy(&["get", "s/", "--prefix", "--consistency=s"]);
        let d = both.direct(&["get", "s/", "--prefix", "--consistency=s"]);
        if ok(p.clone()) == linearizable && ok(d.clone()) == linearizable {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serializable reads never caught up\nproxy: {}\ndirect: {}",
            show(&p),
            show(&d)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    both.same_as_a_member(&["get", "s/a", "--consistency=s", "-w", "json"]);

    // Errors etcd returns for a read.
    let future = (r0 + 1000).to_string();
    let err = both.same_err(&["get", "s/a", "--rev", &future]);
    assert!(
        err.contains("required revision is a future revision"),
        "{err}"
    );

    // txn, from the same state each time: the output and the keys it leaves.
    let direct = both.direct.clone();
    let txn_reset = || {
        ok(both.direct(&["del", "~txn/", "--prefix"]));
        ok(txn(
            &direct,
            &["txn"],
            "\nput ~txn/k v1\nput ~txn/o other\n\n\n",
        ));
    };
    let txns: [(&[&str], &str); 6] = [
        (
            &["txn"],
            "value(\"~txn/k\") = \"v1\"\n\nput ~txn/k v2\nget ~txn/k\n\nput ~txn/f failed\n\n",
        ),
        (
            &["txn"],
            "value(\"~txn/k\") = \"nope\"\n\nput ~txn/k v2\n\nput ~txn/f failed\nget ~txn/ --prefix\n\n",
        ),
        (
            &["txn", "-i"],
            "version(\"~txn/k\") = \"1\"\ncreate(\"~txn/absent\") = \"0\"\n\ndel ~txn/o\nget ~txn/ --prefix\n\nput ~txn/f failed\n\n",
        ),
        (
            &["txn", "-i"],
            "value(\"~txn/k\") > \"v5\"\n\nput ~txn/k v2\n\ndel ~txn/ --prefix\n\n",
        ),
        // etcd refuses a txn writing a key twice.
        (&["txn"], "\nput ~txn/k a\nput ~txn/k b\n\n\n"),
        (
            &["txn", "-w", "json"],
            "value(\"~txn/k\") = \"v1\"\n\nget ~txn/k\n\n\n",
        ),
    ];
    let mut txn_outputs = Vec::new();
    for (args, stdin) in txns {
        let what = format!("etcdctl {args:?} <<< {stdin:?}");
        if args.contains(&"json") {
            // The header has the revision, which differs after a write: compare the json
            // without it (read-only txn, so nothing else depends on when it ran).
            txn_reset();
            let p = ok(txn(both.proxy, args, stdin));
            let d = ok(txn(&direct, args, stdin));
            let strip = |s: &str| {
                let mut v: serde_json::Value = serde_json::from_str(s).expect("txn json");
                strip_headers(&mut v);
                v
            };
            assert_eq!(strip(&p), strip(&d), "{what}: proxy {p}\ndirect {d}");
            txn_outputs.push(d);
        } else {
            let out = same_write(&both, &txn_reset, "~txn/", &what, &|ep| {
                txn(ep, args, stdin)
            });
            if stdin.starts_with("\nput ~txn/k a") {
                assert_eq!(
                    error_lines(&out),
                    ["Error: etcdserver: duplicate key given in txn request"],
                    "{what}"
                );
            }
            txn_outputs.push(text(&out.stdout));
        }
    }
    assert!(
        txn_outputs[0].starts_with("SUCCESS\n"),
        "{}",
        txn_outputs[0]
    );
    assert!(
        txn_outputs[1].starts_with("FAILURE\n"),
        "{}",
        txn_outputs[1]
    );
    assert!(txn_outputs[2].contains("SUCCESS\n"), "{}", txn_outputs[2]);
    assert!(txn_outputs[3].contains("FAILURE\n"), "{}", txn_outputs[3]);
    assert_eq!(txn_outputs[4], "", "duplicate keys fail");
    // A read-only txn at one revision, with its header: one member's answer.
    txn_reset();
    let stdin = "value(\"~txn/k\") = \"v1\"\n\nget ~txn/k\n\n\n";
    let proxy = txn(both.proxy, &["txn", "-w", "json"], stdin);
    let members: Vec<Output> = (0..cluster.len())
        .map(|i| {
            txn(
                &cluster.member(i).client_url(),
                &["txn", "-w", "json"],
                stdin,
            )
        })
        .collect();
    one_of_members(&["txn", "-w", "json"], &proxy, &members);

    // del, from the same state each time: "~~del/" sorts after every other key, so --from-key
    // stays inside it.
    let del_reset = || {
        ok(both.direct(&["del", "~~del/", "--prefix"]));
        ok(txn(
            &direct,
            &["txn"],
            "\nput ~~del/a 1\nput ~~del/b 2\nput ~~del/m 5\nput ~~del/n 6\nput ~~del/x/1 3\nput ~~del/x/2 4\nput ~~del/z 7\n\n\n",
        ));
    };
    let dels: [(&[&str], &str); 7] = [
        (&["del", "~~del/a"], "1\n"),
        (&["del", "~~del/nope"], "0\n"),
        (&["del", "~~del/b", "--prev-kv"], "1\n~~del/b\n2\n"),
        (&["del", "~~del/x/", "--prefix"], "2\n"),
        (
            &["del", "~~del/x/", "--prefix", "--prev-kv"],
            "2\n~~del/x/1\n3\n~~del/x/2\n4\n",
        ),
        (&["del", "~~del/m", "--from-key"], "5\n"),
        (&["del", "~~del/a", "~~del/n"], "3\n"),
    ];
    for (args, want) in dels {
        let what = format!("etcdctl {args:?}");
        let out = same_write(&both, &del_reset, "~~del/", &what, &|ep| {
            cluster.etcdctl_at(ep, args)
        });
        assert_eq!(text(&out.stdout), want, "{what}");
    }

    // Compaction: through the proxy, then etcd's errors for the compacted revision both ways.
    let keep = (r0 + 1).to_string();
    assert_eq!(
        ok(both.proxy(&["compaction", &keep])),
        format!("compacted revision {keep}\n")
    );
    let err = both.same_err(&["get", "s/a", "--rev", &old]);
    assert!(
        err.contains("required revision has been compacted"),
        "{err}"
    );
    let err = both.same_err(&["compaction", &keep]);
    assert!(
        err.contains("required revision has been compacted"),
        "{err}"
    );
    let err = both.same_err(&["compaction", &future]);
    assert!(
        err.contains("required revision is a future revision"),
        "{err}"
    );
    // --physical waits for the compaction to reach the backend; same output both ways.
    let now = revision(&ok(both.direct(&["get", "s/a", "-w", "json"])));
    let by_proxy = (now - 1).to_string();
    let by_direct = now.to_string();
    assert_eq!(
        ok(both.proxy(&["compaction", "--physical", &by_proxy])),
        format!("compacted revision {by_proxy}\n")
    );
    assert_eq!(
        ok(both.direct(&["compaction", "--physical", &by_direct])),
        format!("compacted revision {by_direct}\n")
    );
    let err = both.same_err(&["get", "s/a", "--rev", &by_proxy]);
    assert!(
        err.contains("required revision has been compacted"),
        "{err}"
    );
    both.same(&["get", "s/a", "--rev", &by_direct]);
}

/// Removes every `header` object, at any depth.
fn strip_headers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            o.remove("header");
            o.values_mut().for_each(strip_headers);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_headers),
        _ => {}
    }
}

/// Output after the event putting `w/ready` = `last`: the sentinel writes before it depend on
/// when each watcher was registered.
fn after_sentinel(lines: &[String], last: &str) -> Vec<String> {
    let i = lines
        .windows(2)
        .position(|w| w[0] == "w/ready" && w[1] == last)
        .unwrap_or_else(|| panic!("no w/ready={last} event in {lines:?}"));
    lines[i + 2..].to_vec()
}

fn saw_end(lines: &[String]) -> bool {
    lines.windows(2).any(|w| w[0] == "w/end" && w[1] == "done")
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_output_matches_direct() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let both = Both::new(&cluster, &addr);
    let direct = both.direct.clone();

    let flavours: [&[&str]; 2] = [
        &["watch", "--prefix", "w/"],
        &["watch", "--prefix", "w/", "--prev-kv"],
    ];
    // (flavour, proxy watcher, direct watcher)
    let mut live: Vec<(usize, Spawned, Spawned)> = flavours
        .iter()
        .enumerate()
        .map(|(i, args)| {
            (
                i,
                Spawned::start(&addr, args),
                Spawned::start(&direct, args),
            )
        })
        .collect();

    // The watchers are registered once each has seen a sentinel put.
    let deadline = Instant::now() + WAIT;
    let mut last = 0;
    loop {
        last += 1;
        ok(both.direct(&["put", "w/ready", &last.to_string()]));
        let mut all = true;
        for (_, p, d) in &mut live {
            for w in [p, d] {
                all &= w.wait_for(Duration::from_millis(300), |l| {
                    l.iter().any(|x| x == "w/ready")
                });
            }
        }
        if all {
            break;
        }
        assert!(Instant::now() < deadline, "watchers never registered");
    }
    let last = last.to_string();

    // Puts, overwrites, deletes, a key outside the prefix, a txn with two events and a
    // multi-key delete at one revision; both ways.
    let first = revision(&ok(both.proxy(&["put", "w/a", "1", "-w", "json"])));
    ok(both.direct(&["put", "w/b", "2"]));
    ok(both.proxy(&["put", "w/a", "3"]));
    ok(both.proxy(&["put", "outside", "9"]));
    ok(both.direct(&["del", "w/b"]));
    ok(txn(&addr, &["txn"], "\nput w/c 4\nput w/d 5\n\n\n"));
    ok(both.proxy(&["del", "w/", "--prefix"]));
    ok(both.direct(&["put", "w/end", "done"]));

    let plain: Vec<&str> = vec![
        "PUT", "w/a", "1", "PUT", "w/b", "2", "PUT", "w/a", "3", "DELETE", "w/b", "", "PUT", "w/c",
        "4", "PUT", "w/d", "5", "DELETE", "w/a", "", "DELETE", "w/c", "", "DELETE", "w/d", "",
        "DELETE", "w/ready", "", "PUT", "w/end", "done",
    ];
    let with_prev: Vec<&str> = vec![
        "PUT", "w/a", "1", "PUT", "w/b", "2", "PUT", "w/a", "1", "w/a", "3", "DELETE", "w/b", "2",
        "w/b", "", "PUT", "w/c", "4", "PUT", "w/d", "5", "DELETE", "w/a", "3", "w/a", "", "DELETE",
        "w/c", "4", "w/c", "", "DELETE", "w/d", "5", "w/d", "", "DELETE", "w/ready", &last,
        "w/ready", "", "PUT", "w/end", "done",
    ];
    let wants = [plain, with_prev];
    let mut tails = Vec::new();
    for (i, p, d) in &mut live {
        let args = flavours[*i];
        p.expect("w/end event", saw_end);
        d.expect("w/end event", saw_end);
        let (tp, td) = (
            after_sentinel(&p.lines, &last),
            after_sentinel(&d.lines, &last),
        );
        assert_eq!(td, wants[*i], "etcdctl {args:?} directly");
        assert_eq!(
            tp, td,
            "etcdctl {args:?}: proxy (left) and direct (right) events"
        );
        tails.push(td);
    }
    drop(live);

    // The same history replayed from a revision: the same events as seen live.
    let first_s = first.to_string();
    for (i, args) in flavours.iter().enumerate() {
        let mut args = args.to_vec();
        args.extend(["--rev", &first_s]);
        let mut p = Spawned::start(&addr, &args);
        let mut d = Spawned::start(&direct, &args);
        p.expect("w/end event", saw_end);
        d.expect("w/end event", saw_end);
        assert_eq!(d.lines, tails[i], "etcdctl {args:?} directly replays");
        assert_eq!(
            p.lines, d.lines,
            "etcdctl {args:?}: proxy (left) and direct (right) replay"
        );
    }

    // A watch from a compacted revision is cancelled by etcd, and etcdctl exits the same way.
    ok(both.direct(&["compaction", &(first + 2).to_string()]));
    let args = ["watch", "--prefix", "w/", "--rev", &first_s];
    let mut p = Spawned::start(&addr, &args);
    let mut d = Spawned::start(&direct, &args);
    let (sp, sd) = (p.wait_exit(), d.wait_exit());
    let cancel_lines = |s: &Spawned| -> Vec<String> {
        s.stderr()
            .lines()
            .filter(|l| l.starts_with("watch was canceled") || l.starts_with("Error:"))
            .map(str::to_string)
            .collect()
    };
    let (cp, cd) = (cancel_lines(&p), cancel_lines(&d));
    assert!(
        cd.iter()
            .any(|l| l.contains("required revision has been compacted")),
        "direct: {}",
        d.stderr()
    );
    assert_eq!(cp, cd, "compacted watch: proxy (left), direct (right)");
    assert_eq!(sp.code(), sd.code(), "compacted watch exit codes");
    assert_eq!(p.lines, d.lines, "compacted watch stdout");
}

/// `lease <id> ...` with the ID and the remaining TTL (checked to be 50..=60 s) normalised.
fn lease_norm(out: &str, id: &str) -> String {
    let mut s = out.replace(id, "<ID>");
    if let Some(start) = s.find("remaining(") {
        let rest = &s[start + "remaining(".len()..];
        let end = rest.find("s)").expect("remaining(Ns)");
        let secs: u32 = rest[..end].parse().expect("remaining seconds");
        assert!((50..=60).contains(&secs), "{out}");
        s = format!("{}remaining(<N>s){}", &s[..start], &rest[end + 2..]);
    }
    // etcd lists a lease's keys in Go map order, which varies from one call to the next.
    if let Some(start) = s.find("attached keys([") {
        let from = start + "attached keys([".len();
        let end = from + s[from..].find("])").expect("attached keys([...])");
        let mut keys: Vec<&str> = s[from..end].split(' ').collect();
        keys.sort_unstable();
        s = format!("{}{}{}", &s[..from], keys.join(" "), &s[end..]);
    }
    s
}

/// A lease's life through `endpoints`, every output normalised for its ID.
fn lease_flow(cluster: &Cluster, endpoints: &str) -> Vec<String> {
    let run = |args: &[&str]| cluster.etcdctl_at(endpoints, args);
    let granted = ok(run(&["lease", "grant", "60"]));
    let id = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    let mut outs = vec![lease_norm(&granted, &id)];
    let lease = format!("--lease={id}");
    outs.push(ok(run(&["put", "leased", "v", &lease])));
    outs.push(ok(run(&["put", "leased2", "w", &lease])));
    for args in [
        &["lease", "keep-alive", "--once", &id][..],
        &["lease", "timetolive", &id],
        &["lease", "timetolive", &id, "--keys"],
    ] {
        outs.push(lease_norm(&ok(run(args)), &id));
    }
    let json = ok(run(&["lease", "timetolive", &id, "--keys", "-w", "json"]));
    let mut v: serde_json::Value = serde_json::from_str(&json).expect("timetolive json");
    let o = v.as_object_mut().expect("object");
    let ttl = o.remove("ttl").and_then(|t| t.as_i64()).expect("ttl");
    assert!((50..=60).contains(&ttl), "{json}");
    assert_eq!(
        o.remove("id").and_then(|t| t.as_i64()),
        i64::from_str_radix(&id, 16).ok(),
        "{json}"
    );
    for k in ["member_id", "revision"] {
        o.remove(k);
    }
    // In Go map order (see `lease_norm`).
    if let Some(keys) = o.get_mut("keys").and_then(|k| k.as_array_mut()) {
        keys.sort_by_key(|k| k.to_string());
    }
    outs.push(v.to_string());
    outs.push(ok(run(&["get", "leased", "--print-value-only"])));
    outs.push(lease_norm(&ok(run(&["lease", "revoke", &id])), &id));
    outs.push(ok(run(&["get", "leased", "--prefix"])));
    outs.push(lease_norm(&ok(run(&["lease", "timetolive", &id])), &id));
    for args in [
        &["lease", "revoke", &id][..],
        &["lease", "keep-alive", "--once", &id],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?}: {}", show(&out));
        outs.push(format!(
            "{:?} {} {:?}",
            out.status.code(),
            lease_norm(&text(&out.stdout), &id),
            error_lines(&out)
                .iter()
                .map(|l| lease_norm(l, &id))
                .collect::<Vec<_>>()
        ));
    }
    outs
}

/// The key `etcdctl lock`/`elect` printed first: `<name>/<lease id in hex>`.
fn held_key(s: &Spawned, name: &str) -> String {
    let key = s.lines.first().expect("a line").clone();
    let hex = key
        .strip_prefix(&format!("{name}/"))
        .unwrap_or_else(|| panic!("{key:?} is not under {name}/"));
    assert!(u64::from_str_radix(hex, 16).is_ok(), "{key}");
    key
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_lock_and_elect_match_direct() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let both = Both::new(&cluster, &addr);
    let direct = both.direct.clone();

    let via_proxy = lease_flow(&cluster, &addr);
    let directly = lease_flow(&cluster, &direct);
    assert_eq!(
        via_proxy, directly,
        "lease flow: proxy (left), direct (right)"
    );
    assert_eq!(directly[0], "lease <ID> granted with TTL(60s)\n");
    assert!(
        directly[5].contains("attached keys([leased leased2])"),
        "{}",
        directly[5]
    );

    // Every lease of the cluster, whichever way it was granted.
    let ids: Vec<String> = [&addr, &direct]
        .iter()
        .map(|ep| {
            let g = ok(cluster.etcdctl_at(ep, &["lease", "grant", "600"]));
            g.split_whitespace().nth(1).expect("id").to_string()
        })
        .collect();
    let sorted = |s: String| {
        let mut l: Vec<String> = s.lines().map(str::to_string).collect();
        l.sort();
        l
    };
    let lp = sorted(ok(both.proxy(&["lease", "list"])));
    let ld = sorted(ok(both.direct(&["lease", "list"])));
    assert_eq!(lp, ld, "lease list: proxy (left), direct (right)");
    let mut want = vec!["found 2 leases".to_string()];
    want.extend(ids.iter().cloned());
    want.sort();
    assert_eq!(ld, want);

    // lock: the same command output both ways.
    assert_eq!(both.same(&["lock", "L0", "echo", "held"]), "held\n");
    // A holder through one way, a waiter the other way, both ways round.
    for (holder_ep, waiter_ep) in [(&addr, &direct), (&direct, &addr)] {
        let mut holder = Spawned::start(holder_ep, &["lock", "L"]);
        holder.expect("lock key", |l| !l.is_empty());
        let held = held_key(&holder, "L");
        assert_eq!(
            ok(both.direct(&["get", "L", "--prefix", "--keys-only"])),
            format!("{held}\n\n")
        );
        let mut waiter = Spawned::start(waiter_ep, &["lock", "L"]);
        // The waiter has registered once its key is in etcd; it must not print (hold) yet.
        let deadline = Instant::now() + WAIT;
        while ok(both.direct(&["get", "L", "--prefix", "--count-only", "-w", "fields"]))
            .contains("\"Count\" : 1\n")
        {
            assert!(Instant::now() < deadline, "the waiter never queued");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !waiter.wait_for(Duration::from_millis(500), |l| !l.is_empty()),
            "{} got the lock while {held} holds it: {:?}",
            waiter.what,
            waiter.lines
        );
        // SIGINT: etcdctl unlocks (deletes its key) and exits.
        holder.signal("INT");
        let status = holder.wait_exit();
        assert!(status.success(), "{status}: {}", holder.stderr());
        waiter.expect("lock key", |l| !l.is_empty());
        let next = held_key(&waiter, "L");
        assert_ne!(next, held);
        assert_eq!(
            ok(both.direct(&["get", "L", "--prefix", "--keys-only"])),
            format!("{next}\n\n")
        );
        waiter.signal("INT");
        assert!(waiter.wait_exit().success(), "{}", waiter.stderr());
        assert_eq!(ok(both.direct(&["get", "L", "--prefix"])), "");
    }

    // elect: a leader campaigning directly, observers both ways, then a candidate through the
    // proxy taking over when the leader resigns.
    let mut leader = Spawned::start(&direct, &["elect", "E", "p1"]);
    leader.expect("leader key and proposal", |l| l.len() >= 2);
    let k1 = held_key(&leader, "E");
    assert_eq!(leader.lines, [k1.clone(), "p1".to_string()]);
    let mut obs_p = Spawned::start(&addr, &["elect", "-l", "E"]);
    let mut obs_d = Spawned::start(&direct, &["elect", "-l", "E"]);
    for o in [&mut obs_p, &mut obs_d] {
        o.expect("the leader", |l| l.len() >= 2);
    }
    assert_eq!(obs_d.lines, [k1.clone(), "p1".to_string()]);
    assert_eq!(
        obs_p.lines, obs_d.lines,
        "elect -l: proxy (left), direct (right)"
    );
    let mut candidate = Spawned::start(&addr, &["elect", "E", "p2"]);
    let deadline = Instant::now() + WAIT;
    while ok(both.direct(&["get", "E", "--prefix", "--count-only", "-w", "fields"]))
        .contains("\"Count\" : 1\n")
    {
        assert!(Instant::now() < deadline, "the candidate never campaigned");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !candidate.wait_for(Duration::from_millis(500), |l| !l.is_empty()),
        "the candidate was elected while p1 leads: {:?}",
        candidate.lines
    );
    leader.signal("INT");
    assert!(leader.wait_exit().success(), "{}", leader.stderr());
    candidate.expect("leader key and proposal", |l| l.len() >= 2);
    let k2 = held_key(&candidate, "E");
    assert_eq!(candidate.lines, [k2.clone(), "p2".to_string()]);
    for o in [&mut obs_p, &mut obs_d] {
        o.expect("the new leader", |l| l.len() >= 4);
    }
    assert_eq!(obs_d.lines, [k1, "p1".into(), k2, "p2".into()]);
    assert_eq!(
        obs_p.lines, obs_d.lines,
        "elect -l: proxy (left), direct (right)"
    );
    candidate.signal("INT");
    assert!(candidate.wait_exit().success(), "{}", candidate.stderr());
}

/// `-w json` of `endpoint status`/`hashkv`: the one entry's `Status`/`HashKV`.
fn only_entry(json: &str, field: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(json).expect("json");
    let list = v.as_array().expect("a list");
    assert_eq!(list.len(), 1, "{json}");
    list[0][field].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_maintenance_and_auth_match_direct() {
    let cluster = Cluster::start(3).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let both = Both::new(&cluster, &addr);
    for (k, v) in [("m/a", "1"), ("m/b", "2"), ("m/a", "3")] {
        ok(both.proxy(&["put", k, v]));
    }

    // member list: same table; with a header, one member's answer.
    let members = both.same(&["member", "list"]);
    assert_eq!(members.lines().count(), 3, "{members}");
    both.same(&["member", "list", "-w", "table"]);
    let json = both.same_as_a_member(&["member", "list", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let ids: Vec<u64> = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["ID"].as_u64().expect("ID"))
        .collect();
    assert_eq!(ids.len(), 3, "{json}");

    // endpoint status through the proxy: the status of the member that answered.
    let sp = only_entry(
        &ok(both.proxy(&["endpoint", "status", "-w", "json"])),
        "Status",
    );
    let answered = sp["header"]["member_id"].as_u64().expect("member_id");
    let i = ids
        .iter()
        .position(|&id| id == answered)
        .expect("a member answered");
    let m_ep = cluster.member(i).client_url();
    let sd = only_entry(
        &ok(cluster.etcdctl_at(&m_ep, &["endpoint", "status", "-w", "json"])),
        "Status",
    );
    assert!(
        ids.contains(&sd["leader"].as_u64().expect("leader")),
        "{sd}"
    );
    for field in ["version", "leader", "raftTerm", "isLearner"] {
        assert_eq!(
            sp[field], sd[field],
            "endpoint status {field}: {sp} vs {sd}"
        );
    }
    assert_eq!(sp["header"]["cluster_id"], sd["header"]["cluster_id"]);
    let health = ok(both.proxy(&["endpoint", "health"]));
    assert!(
        health.starts_with(&format!(
            "{addr} is healthy: successfully committed proposal"
        )),
        "{health}"
    );

    // hashkv at one revision: the proxy's answer is every member's.
    let hd: serde_json::Value = serde_json::from_str(&ok(both.direct(&[
        "endpoint",
        "hashkv",
        "--cluster",
        "-w",
        "json",
    ])))
    .expect("json");
    let hp = only_entry(
        &ok(both.proxy(&["endpoint", "hashkv", "-w", "json"])),
        "HashKV",
    );
    let hd = hd.as_array().expect("list");
    assert_eq!(hd.len(), 3, "{hd:?}");
    for m in hd {
        for field in ["hash", "compact_revision"] {
            assert_eq!(hp[field], m["HashKV"][field], "hashkv {field}: {hp} vs {m}");
        }
        assert_eq!(hp["header"]["revision"], m["HashKV"]["header"]["revision"]);
    }
    let rev = hp["header"]["revision"].as_i64().expect("revision");
    let at = format!("--rev={}", rev - 1);
    let hp_old = only_entry(
        &ok(both.proxy(&["endpoint", "hashkv", &at, "-w", "json"])),
        "HashKV",
    );
    let hd_old = only_entry(
        &ok(cluster.etcdctl_at(&m_ep, &["endpoint", "hashkv", &at, "-w", "json"])),
        "HashKV",
    );
    assert_eq!(hp_old["hash"], hd_old["hash"], "hashkv {at}");
    assert_ne!(
        hp_old["hash"], hp["hash"],
        "hashkv {at} is another revision"
    );

    // snapshot through the proxy and directly: same revision and keys.
    let dir = tempfile::tempdir().expect("temp dir");
    let etcdutl = testkit::etcd_bin_dir().join("etcdutl");
    let mut statuses = Vec::new();
    for (name, ep) in [("proxy", addr.as_str()), ("direct", m_ep.as_str())] {
        let file = dir.path().join(format!("{name}.db"));
        let file_arg = file.to_string_lossy().into_owned();
        let out = ok(cluster.etcdctl_at(ep, &["snapshot", "save", &file_arg]));
        assert_eq!(out, format!("Snapshot saved at {file_arg}\n"));
        let status = ok(Command::new(&etcdutl)
            .args(["snapshot", "status", &file_arg, "-w", "json"])
            .output()
            .expect("run etcdutl"));
        let v: serde_json::Value = serde_json::from_str(&status).expect("status json");
        statuses.push(v);
    }
    for field in ["revision", "totalKey"] {
        assert_eq!(
            statuses[0][field], statuses[1][field],
            "snapshot status {field}: proxy {} direct {}",
            statuses[0], statuses[1]
        );
    }
    assert_eq!(
        statuses[0]["revision"].as_i64(),
        Some(rev),
        "{}",
        statuses[0]
    );

    // defrag: the same line, for the endpoint etcdctl was given.
    assert_eq!(
        ok(both.proxy(&["defrag"])),
        format!("Finished defragmenting etcd member[{addr}]\n")
    );
    assert_eq!(
        ok(cluster.etcdctl_at(&m_ep, &["defrag"])),
        format!("Finished defragmenting etcd member[{m_ep}]\n")
    );
    assert_eq!(both.same(&["alarm", "list"]), "");

    // Auth, set up through the proxy with etcdctl only; reads and errors compared both ways.
    for (args, want) in [
        (
            &["user", "add", "root", "--new-user-password=rootpw"][..],
            "User root created\n",
        ),
        (&["role", "add", "r"], "Role r created\n"),
        (
            &[
                "role",
                "grant-permission",
                "r",
                "readwrite",
                "/app/",
                "--prefix",
            ],
            "Role r updated\n",
        ),
        (
            &["user", "add", "alice", "--new-user-password=alicepw"],
            "User alice created\n",
        ),
        (
            &["user", "grant-role", "alice", "r"],
            "Role r is granted to user alice\n",
        ),
    ] {
        assert_eq!(ok(both.proxy(args)), want, "{args:?}");
    }
    for args in [
        &["user", "list"][..],
        &["role", "list"],
        &["role", "get", "r"],
        &["user", "get", "alice"],
        &["user", "get", "alice", "--detail"],
        &["auth", "status"],
    ] {
        both.same(args);
    }
    both.same_as_a_member(&["role", "get", "r", "-w", "json"]);
    for (args, err) in [
        (
            &["user", "add", "alice", "--new-user-password=x"][..],
            "user name already exists",
        ),
        (&["role", "get", "nope"], "role name not found"),
        (
            &["user", "grant-role", "alice", "nope"],
            "role name not found",
        ),
    ] {
        let got = both.same_err(args);
        assert!(got.contains(err), "{args:?}: {got}");
    }
    // etcd refuses to enable auth while root lacks the root role; etcdctl recognises that
    // exact error, adds the role, grants it and enables: only works if the error came through
    // as etcd sent it.
    assert_eq!(
        ok(both.proxy(&["auth", "enable"])),
        "Authentication Enabled\n"
    );

    let alice = "--user=alice:alicepw";
    let root = "--user=root:rootpw";
    assert_eq!(ok(both.proxy(&[alice, "put", "/app/x", "1"])), "OK\n");
    assert_eq!(ok(both.direct(&[alice, "put", "/app/y", "2"])), "OK\n");
    assert_eq!(
        both.same(&[alice, "get", "/app/", "--prefix"]),
        "/app/x\n1\n/app/y\n2\n"
    );
    for (args, err) in [
        (&[alice, "get", "m/a"][..], "etcdserver: permission denied"),
        (&[alice, "put", "m/a", "v"], "etcdserver: permission denied"),
        (
            &[alice, "get", "", "--from-key"],
            "etcdserver: permission denied",
        ),
        (&[alice, "user", "list"], "etcdserver: permission denied"),
        (
            &["--user=alice:wrong", "get", "/app/x"],
            "etcdserver: authentication failed, invalid user ID or password",
        ),
        (&["get", "/app/x"], "etcdserver: user name is empty"),
    ] {
        let got = both.same_err(args);
        assert!(got.contains(err), "{args:?}: {got}");
    }
    assert_eq!(
        ok(both.direct(&["get", "m/a", "--print-value-only", root])),
        "3\n",
        "refused writes left the key alone"
    );
    let status = both.same(&[root, "auth", "status"]);
    assert!(
        status.starts_with("Authentication Status: true\n"),
        "{status}"
    );
    both.same(&[root, "user", "list"]);
    both.same(&[root, "user", "get", "alice"]);
    assert_eq!(
        both.same(&[root, "user", "get", "root"]),
        "User: root\nRoles: root\n"
    );
    assert_eq!(
        ok(both.proxy(&[root, "auth", "disable"])),
        "Authentication Disabled\n"
    );
    let status = both.same(&["auth", "status"]);
    assert!(
        status.starts_with("Authentication Status: false\n"),
        "{status}"
    );
    assert_eq!(both.same(&["get", "m/a", "--print-value-only"]), "3\n");
}
