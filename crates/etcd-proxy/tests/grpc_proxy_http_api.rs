//! The HTTP/JSON API (etcd's gRPC-Gateway) on `etcd-proxy grpc-proxy start`'s port, with curl,
//! compared with the same requests sent to a real etcd's own gateway: the seed's curl examples
//! verbatim, more routes, streams, and bad input. Two fresh 1-member clusters take the same
//! requests, one directly and one through the proxy, so revisions match; member and cluster IDs,
//! tokens and lease IDs differ and are masked.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{curl, start_grpc_proxy};
use testkit::Cluster;

/// `POST base+path` with `body` and extra curl arguments.
fn post(base: &str, path: &str, body: &str, extra: &[&str]) -> (u16, String) {
    let mut args = vec!["-X", "POST", "-d", body];
    args.extend_from_slice(extra);
    curl(&args, &format!("{base}{path}"))
}

/// Fields whose values differ between two clusters: IDs, tokens, member names and URLs.
const MASKED: &[&str] = &[
    "cluster_id",
    "member_id",
    "token",
    "ID",
    "leader",
    "name",
    "peerURLs",
    "clientURLs",
    "hash",
    "dbSize",
    "dbSizeInUse",
    "raftIndex",
    "raftAppliedIndex",
];

/// `body` with the values that differ between two clusters masked, one JSON document per
/// line (a stream has several).
fn masked(body: &str) -> String {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m.iter_mut() {
                    if MASKED.contains(&k.as_str()) {
                        *v = serde_json::Value::String("X".into());
                    } else {
                        walk(v);
                    }
                    // Members come in ID order, and IDs differ between clusters.
                    if k == "members"
                        && let serde_json::Value::Array(a) = v
                    {
                        a.sort_by_key(|m| m.to_string());
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    body.lines()
        .map(
            |line| match serde_json::from_str::<serde_json::Value>(line) {
                Ok(mut v) => {
                    walk(&mut v);
                    v.to_string()
                }
                Err(_) => line.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

/// The gateway of a member and the proxy, each on its own fresh 1-member cluster.
struct Pair {
    direct: String,
    proxied: String,
    _clusters: (Cluster, Cluster),
    _proxy: common::ProxyProcess,
}

impl Pair {
    async fn start() -> Pair {
        let d = Cluster::start(1).await;
        let p = Cluster::start(1).await;
        let (proxy, addr) = start_grpc_proxy(&p, &[]);
        Pair {
            direct: format!("http://{}", d.member(0).client_endpoint()),
            proxied: format!("http://{addr}"),
            _clusters: (d, p),
            _proxy: proxy,
        }
    }

    /// The same POST to both; their status and masked bodies must be equal. Returns the
    /// proxy's raw answer.
    fn same(&self, path: &str, body: &str, extra: &[&str]) -> (u16, String) {
        let d = post(&self.direct, path, body, extra);
        let p = post(&self.proxied, path, body, extra);
        assert_eq!(
            (p.0, masked(&p.1)),
            (d.0, masked(&d.1)),
            "POST {path} {body}: through the proxy (left) vs etcd (right)"
        );
        p
    }
}

/// The seed document's curl examples, verbatim, against the proxy and against etcd.
#[tokio::test(flavor = "multi_thread")]
async fn the_seed_curl_examples_give_etcds_answers() {
    let pair = Pair::start().await;
    let (code, body) = pair.same("/v3/kv/put", r#"{"key": "Zm9v", "value": "YmFy"}"#, &["-L"]);
    assert_eq!(code, 200);
    assert!(body.starts_with(r#"{"header":{"cluster_id":""#), "{body}");
    let (_, body) = pair.same("/v3/kv/range", r#"{"key": "Zm9v"}"#, &["-L"]);
    assert!(body.contains(r#""kvs":[{"key":"Zm9v","#), "{body}");

    // Watch: the created line, then the event of a put made meanwhile.
    let watch = |base: &str| {
        Command::new("curl")
            .args(["-s", "-N", "--max-time", "3"])
            .arg(format!("{base}/v3/watch"))
            .args(["-X", "POST", "-d", r#"{"create_request": {"key": "Zm9v"}}"#])
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl watch")
    };
    let (wd, wp) = (watch(&pair.direct), watch(&pair.proxied));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    pair.same("/v3/kv/put", r#"{"key": "Zm9v", "value": "YmF6"}"#, &[]);
    let read = |c: std::process::Child| {
        String::from_utf8_lossy(&c.wait_with_output().expect("curl").stdout).into_owned()
    };
    let (wd, wp) = (read(wd), read(wp));
    assert_eq!(masked(&wp), masked(&wd), "watch output, proxy vs etcd");
    assert_eq!(wp.lines().count(), 2, "created, then the event: {wp}");
    assert!(wp.lines().all(|l| l.starts_with(r#"{"result":"#)), "{wp}");

    pair.same(
        "/v3/kv/txn",
        r#"{"compare": [{"target": "CREATE", "key": "Zm9v", "createRevision": "4"}], "success": [{"requestPut": {"key": "Zm9v", "value": "YmFy"}}]}"#,
        &["-L"],
    );
    pair.same(
        "/v3/auth/user/add",
        r#"{"name": "root", "password": "123456"}"#,
        &["-L"],
    );
    pair.same("/v3/auth/role/add", r#"{"name": "root"}"#, &["-L"]);
    pair.same(
        "/v3/auth/user/grant",
        r#"{"user": "root", "role": "root"}"#,
        &["-L"],
    );
    pair.same("/v3/auth/enable", "{}", &["-L"]);
    let token = |base: &str| {
        let (code, body) = post(
            base,
            "/v3/auth/authenticate",
            r#"{"name": "root", "password": "123456"}"#,
            &["-L"],
        );
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["token"].as_str().expect("token").to_string()
    };
    let (td, tp) = (token(&pair.direct), token(&pair.proxied));
    let put = r#"{"key": "Zm9v", "value": "YmFy"}"#;
    let d = post(
        &pair.direct,
        "/v3/kv/put",
        put,
        &["-L", "-H", &format!("Authorization: {td}")],
    );
    let p = post(
        &pair.proxied,
        "/v3/kv/put",
        put,
        &["-L", "-H", &format!("Authorization: {tp}")],
    );
    assert_eq!(
        (p.0, masked(&p.1)),
        (d.0, masked(&d.1)),
        "put with the token"
    );
    assert_eq!(p.0, 200);
    let (code, body) = pair.same("/v3/kv/put", put, &["-L", "-H", "Authorization: xxx"]);
    assert_eq!(
        (code, body.as_str()),
        (
            401,
            r#"{"error":"etcdserver: invalid auth token","code":16,"message":"etcdserver: invalid auth token"}"#
        )
    );
}

/// More routes, compared with etcd's gateway: options, nested txn, leases, maintenance, lock and
/// election, and the server streams.
#[tokio::test(flavor = "multi_thread")]
async fn routes_give_etcds_json() {
    let pair = Pair::start().await;
    for (k, v) in [("a", "MQ=="), ("b", "Mg=="), ("c", "Mw==")] {
        let key = base64(k);
        pair.same(
            "/v3/kv/put",
            &format!(r#"{{"key":"{key}","value":"{v}"}}"#),
            &[],
        );
    }
    for body in [
        r#"{"key":"YQ==","range_end":"AA=="}"#,
        r#"{"key":"YQ==","rangeEnd":"ZA==","limit":"2","sort_order":"DESCEND","sort_target":"KEY"}"#,
        r#"{"key":"YQ==","range_end":"ZA==","count_only":true}"#,
        r#"{"key":"YQ==","range_end":"ZA==","keys_only":true,"revision":3}"#,
        r#"{"key":"YQ==","serializable":true}"#,
    ] {
        pair.same("/v3/kv/range", body, &[]);
    }
    pair.same(
        "/v3/kv/txn",
        r#"{"compare":[{"target":"VALUE","result":"EQUAL","key":"YQ==","value":"MQ=="}],"success":[{"request_txn":{"success":[{"request_range":{"key":"YQ=="}}]}},{"request_delete_range":{"key":"Yw==","prev_kv":true}}]}"#,
        &[],
    );
    pair.same(
        "/v3/kv/deleterange",
        r#"{"key":"Yg==","prev_kv":true}"#,
        &[],
    );
    pair.same("/v3/kv/compaction", r#"{"revision":"3"}"#, &[]);
    pair.same("/v3/kv/range", r#"{"key":"YQ==","revision":"2"}"#, &[]);

    pair.same("/v3/lease/grant", r#"{"TTL":"30","ID":"777"}"#, &[]);
    pair.same("/v3/kv/lease/timetolive", r#"{"ID":777,"keys":true}"#, &[]);
    pair.same("/v3/lease/leases", "{}", &[]);
    pair.same("/v3/lease/timetolive", r#"{"ID":999}"#, &[]);
    let (code, _) = pair.same("/v3/lease/revoke", r#"{"ID":999}"#, &[]);
    assert_eq!(code, 404);
    // Keep-alive: one answer, then the stream ends.
    let (code, body) = pair.same("/v3/lease/keepalive", r#"{"ID":777}"#, &["-N"]);
    assert_eq!((code, body.lines().count()), (200, 1), "{body}");
    pair.same("/v3/lease/revoke", r#"{"ID":"777"}"#, &[]);

    pair.same("/v3/maintenance/alarm", r#"{"action":"GET"}"#, &[]);
    pair.same("/v3/auth/status", "{}", &[]);
    pair.same("/v3/auth/user/list", "{}", &[]);
    let (code, body) = pair.same("/v3/cluster/member/list", "{}", &[]);
    assert_eq!(code, 200, "{body}");

    pair.same("/v3/lease/grant", r#"{"TTL":"30","ID":"888"}"#, &[]);
    pair.same("/v3/lock/lock", r#"{"name":"bXlsb2Nr","lease":"888"}"#, &[]);
    // Each side unlocks the key its lock returned (it holds the lease ID, the same on both).
    let lock_key = |base: &str| {
        let (_, body) = post(
            base,
            "/v3/lock/lock",
            r#"{"name":"b3RoZXI=","lease":"888"}"#,
            &[],
        );
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["key"].as_str().expect("lock key").to_string()
    };
    let (kd, kp) = (lock_key(&pair.direct), lock_key(&pair.proxied));
    assert_eq!(kd, kp, "the lock key is name/lease in both");
    pair.same("/v3/lock/unlock", &format!(r#"{{"key":"{kp}"}}"#), &[]);
    pair.same(
        "/v3/election/campaign",
        r#"{"name":"ZWxlYw==","lease":"888","value":"djE="}"#,
        &[],
    );
    pair.same("/v3/election/leader", r#"{"name":"ZWxlYw=="}"#, &[]);
    // A snapshot: blobs, the last one etcd's sha256 (32 bytes, 44 base64 characters).
    let (code, body) = post(&pair.proxied, "/v3/maintenance/snapshot", "{}", &["-N"]);
    assert_eq!(code, 200);
    let lines: Vec<&str> = body.lines().collect();
    assert!(lines.len() >= 2, "{body:.200}");
    assert!(lines.iter().all(|l| l.starts_with(r#"{"result":{"#)));
    let last: serde_json::Value = serde_json::from_str(lines[lines.len() - 1]).expect("json");
    assert_eq!(
        last["result"]["blob"].as_str().map(str::len),
        Some(44),
        "{last}"
    );
    // Observe streams the current leader value at once.
    let (code, body) = pair.same(
        "/v3/election/observe",
        r#"{"name":"ZWxlYw=="}"#,
        &["-N", "--max-time", "2"],
    );
    assert_eq!(code, 200);
    assert!(body.starts_with(r#"{"result":{"header":"#), "{body}");
}

/// The remaining routes, compared with etcd's gateway: the user and role calls, maintenance,
/// and the member calls (a learner added, updated, refused promotion and removed).
#[tokio::test(flavor = "multi_thread")]
async fn every_other_route_gives_etcds_json() {
    let pair = Pair::start().await;
    for (path, body) in [
        ("/v3/auth/user/add", r#"{"name":"u","password":"p"}"#),
        ("/v3/auth/user/get", r#"{"name":"u"}"#),
        ("/v3/auth/user/changepw", r#"{"name":"u","password":"q"}"#),
        ("/v3/auth/role/add", r#"{"name":"r"}"#),
        (
            "/v3/auth/role/grant",
            r#"{"name":"r","perm":{"key":"YQ==","range_end":"Yg==","permType":"READWRITE"}}"#,
        ),
        ("/v3/auth/role/get", r#"{"role":"r"}"#),
        ("/v3/auth/role/list", "{}"),
        ("/v3/auth/user/grant", r#"{"user":"u","role":"r"}"#),
        ("/v3/auth/user/get", r#"{"name":"u"}"#),
        ("/v3/auth/user/revoke", r#"{"name":"u","role":"r"}"#),
        (
            "/v3/auth/role/revoke",
            r#"{"role":"r","key":"YQ==","range_end":"Yg=="}"#,
        ),
        ("/v3/auth/role/delete", r#"{"role":"r"}"#),
        ("/v3/auth/user/delete", r#"{"name":"u"}"#),
        ("/v3/auth/user/get", r#"{"name":"u"}"#),
        ("/v3/auth/disable", "{}"),
        ("/v3/maintenance/status", "{}"),
        ("/v3/maintenance/defragment", "{}"),
        ("/v3/maintenance/hash", "{}"),
        ("/v3/maintenance/transfer-leadership", r#"{"targetID":"1"}"#),
        (
            "/v3/maintenance/downgrade",
            r#"{"action":"VALIDATE","version":"3.4"}"#,
        ),
        (
            "/v3/cluster/member/add",
            r#"{"peerURLs":["http://127.0.0.1:1"],"isLearner":true}"#,
        ),
    ] {
        pair.same(path, body, &[]);
    }
    // Each cluster's learner has its own ID.
    let learner = |base: &str| {
        let (_, body) = post(base, "/v3/cluster/member/list", "{}", &[]);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["members"]
            .as_array()
            .expect("members")
            .iter()
            .find(|m| m["isLearner"] == true)
            .and_then(|m| m["ID"].as_str())
            .expect("the learner")
            .to_string()
    };
    let (ld, lp) = (learner(&pair.direct), learner(&pair.proxied));
    for (path, body) in [
        (
            "/v3/cluster/member/update",
            r#"{"ID":"{id}","peerURLs":["http://127.0.0.1:2"]}"#,
        ),
        ("/v3/cluster/member/promote", r#"{"ID":"{id}"}"#),
        ("/v3/cluster/member/remove", r#"{"ID":"{id}"}"#),
    ] {
        let d = post(&pair.direct, path, &body.replace("{id}", &ld), &[]);
        let p = post(&pair.proxied, path, &body.replace("{id}", &lp), &[]);
        assert_eq!((p.0, masked(&p.1)), (d.0, masked(&d.1)), "POST {path}");
    }
}

/// Bad input gets etcd's status and message (or, where etcd's text is Go's own, the same status
/// and code), and nothing breaks the proxy.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_etcds_status() {
    let pair = Pair::start().await;
    let (code, body) = post(&pair.proxied, "/v3/kv/put", r#"{"key":"#, &[]);
    assert_eq!(
        (code, body.as_str()),
        (
            400,
            r#"{"error":"unexpected EOF","code":3,"message":"unexpected EOF"}"#
        )
    );
    for (what, path, body, status) in [
        (
            "bad base64",
            "/v3/kv/put",
            r#"{"key":"!!!","value":"YmFy"}"#,
            400,
        ),
        (
            "a string for a bool",
            "/v3/kv/range",
            r#"{"key":"YQ==","serializable":"true"}"#,
            400,
        ),
        (
            "a lowercase enum",
            "/v3/kv/range",
            r#"{"key":"YQ==","sort_order":"descend"}"#,
            400,
        ),
        ("no key", "/v3/kv/put", r#"{"value":"YmFy"}"#, 400),
    ] {
        let d = post(&pair.direct, path, body, &[]);
        let p = post(&pair.proxied, path, body, &[]);
        assert_eq!((p.0, d.0), (status, status), "{what}: {p:?} vs etcd {d:?}");
        let code =
            |b: &str| serde_json::from_str::<serde_json::Value>(b).expect(what)["code"].clone();
        assert_eq!(code(&p.1), code(&d.1), "{what}");
    }
    // etcd's own message where it is etcd's.
    pair.same("/v3/kv/put", r#"{"value":"YmFy"}"#, &[]);
    // Unknown fields are ignored; /v3beta/ is /v3/.
    pair.same(
        "/v3/kv/put",
        r#"{"key":"Zm9v","value":"YmFy","bogus":1}"#,
        &[],
    );
    pair.same("/v3beta/kv/range", r#"{"key":"Zm9v"}"#, &[]);
    for (args, path, status) in [
        (&["-X", "GET"][..], "/v3/kv/range", 405),
        (&["-X", "POST", "-d", "{}"], "/v3/kv/nope", 404),
        (&["-X", "POST", "-d", "{}"], "/v3alpha/kv/range", 404),
        (&["-X", "OPTIONS"], "/v3/kv/range", 200),
    ] {
        let d = curl(args, &format!("{}{path}", pair.direct));
        let p = curl(args, &format!("{}{path}", pair.proxied));
        assert_eq!((p.0, &p.1), (d.0, &d.1), "{args:?} {path}");
        assert_eq!(p.0, status);
    }
    let (code, body) = post(
        &pair.proxied,
        "/v3/kv/range",
        r#"{"key":"Zm9v"}"#,
        &["-H", "Grpc-Timeout: xyz"],
    );
    assert_eq!(
        (code, body.contains("invalid grpc-timeout")),
        (400, true),
        "{body}"
    );
    // A deadline: passed on a unary call, and bounding a watch stream, as etcd's gateway does.
    pair.same(
        "/v3/kv/range",
        r#"{"key":"Zm9v"}"#,
        &["-H", "Grpc-Timeout: 1n"],
    );
    // A watch bounded by a deadline: created, then the deadline's error. etcd's gateway says
    // code 4 or, when the server's side of the deadline reaches it first, code 2; the proxy 4.
    let watch = |base: &str| {
        post(
            base,
            "/v3/watch",
            r#"{"create_request":{"key":"Zm9v"}}"#,
            &["-N", "-H", "Grpc-Timeout: 500m"],
        )
    };
    let (d, p) = (watch(&pair.direct), watch(&pair.proxied));
    assert_eq!((p.0, d.0), (200, 200));
    let (dl, pl): (Vec<&str>, Vec<&str>) = (d.1.lines().collect(), p.1.lines().collect());
    assert_eq!(pl.len(), 2, "{}", p.1);
    assert_eq!(masked(pl[0]), masked(dl[0]), "the created line");
    assert_eq!(
        pl[1],
        r#"{"error":{"grpc_code":4,"http_code":504,"message":"context deadline exceeded","http_status":"Gateway Timeout"}}"#
    );
    assert!(dl[1].contains("context deadline exceeded"), "etcd: {}", d.1);
    // An oversized request: a 3 MiB value is over etcd's request limit; the same refusal
    // (429, code 8) through the proxy as from etcd's gateway. A body over the proxy's own
    // bound (8 MiB) is refused without being read whole.
    let big = format!(r#"{{"key":"Zm9v","value":"{}"}}"#, "QUFB".repeat(1 << 20));
    let file = std::env::temp_dir().join(format!("etcd-proxy-big-{}.json", std::process::id()));
    std::fs::write(&file, &big).expect("write the big body");
    let at = format!("@{}", file.display());
    let d = post(&pair.direct, "/v3/kv/put", &at, &[]);
    let p = post(&pair.proxied, "/v3/kv/put", &at, &[]);
    let code =
        |b: &str| serde_json::from_str::<serde_json::Value>(b).expect("json")["code"].clone();
    assert_eq!(
        (p.0, code(&p.1)),
        (d.0, code(&d.1)),
        "{} vs etcd {}",
        p.1,
        d.1
    );
    assert_eq!(p.0, 429);
    std::fs::write(&file, "A".repeat(9 << 20)).expect("write the huge body");
    let (code9, body9) = post(&pair.proxied, "/v3/kv/put", &at, &[]);
    assert_eq!(code9, 429, "{body9}");
    let _ = std::fs::remove_file(&file);
    // The proxy still serves.
    let (code, _) = pair.same("/v3/kv/range", r#"{"key":"Zm9v"}"#, &[]);
    assert_eq!(code, 200);
}

fn base64(s: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, &c| n << 8 | u32::from(c)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One message of a WebSocket, as text, within 10 s.
async fn ws_next<S>(ws: &mut S) -> String
where
    S: futures::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures::StreamExt;
    let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a websocket message within 10 s")
        .expect("websocket open")
        .expect("websocket message");
    m.into_text().expect("text frame").to_string()
}

/// WebSocket on the watch route: each text frame a request, each response a frame; and with
/// etcd auth on, the token in `Sec-WebSocket-Protocol: Bearer, <token>` works (etcd 3.5's own
/// gateway refuses that form, so auth over WebSocket does not work there).
#[tokio::test(flavor = "multi_thread")]
async fn websocket_watch_with_a_token() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message as Ws;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let base = format!("http://{addr}");
    let direct = format!("http://{}", cluster.member(0).client_endpoint());

    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/v3/watch"))
        .await
        .expect("websocket upgrade");
    assert_eq!(resp.status(), 101);
    ws.send(Ws::text(r#"{"create_request":{"key":"Zm9v"}}"#))
        .await
        .expect("send");
    let created = ws_next(&mut ws).await;
    assert!(created.contains(r#""created":true"#), "{created}");
    assert!(!created.ends_with('\n'));
    let (code, _) = post(
        &direct,
        "/v3/kv/put",
        r#"{"key":"Zm9v","value":"d3M="}"#,
        &[],
    );
    assert_eq!(code, 200);
    let event = ws_next(&mut ws).await;
    assert!(event.contains(r#""value":"d3M=""#), "{event}");
    drop(ws);

    // Auth on: a watch needs the token.
    for args in [
        &["user", "add", "root:pw"][..],
        &["user", "grant-role", "root", "root"],
        &["auth", "enable"],
    ] {
        common::ok(cluster.etcdctl(args));
    }
    let (_, body) = post(
        &base,
        "/v3/auth/authenticate",
        r#"{"name":"root","password":"pw"}"#,
        &[],
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let token = v["token"].as_str().expect("token").to_string();

    let mut req = format!("ws://{addr}/v3/watch")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("Bearer, {token}").parse().expect("header"),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket upgrade with a token");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "Bearer");
    ws.send(Ws::text(r#"{"create_request":{"key":"Zm9v"}}"#))
        .await
        .expect("send");
    let created = ws_next(&mut ws).await;
    assert!(
        created.contains(r#""created":true"#) && !created.contains("canceled"),
        "{created}"
    );
    let (code, _) = post(
        &base,
        "/v3/kv/put",
        r#"{"key":"Zm9v","value":"YXV0aA=="}"#,
        &["-H", &format!("Authorization: {token}")],
    );
    assert_eq!(code, 200);
    let event = ws_next(&mut ws).await;
    assert!(event.contains(r#""value":"YXV0aA==""#), "{event}");

    // Without the token the watch is refused, as etcd refuses it.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v3/watch"))
        .await
        .expect("websocket upgrade");
    ws.send(Ws::text(r#"{"create_request":{"key":"Zm9v"}}"#))
        .await
        .expect("send");
    let refused = ws_next(&mut ws).await;
    assert!(refused.contains(r#""canceled":true"#), "{refused}");
}

/// JSON calls go through the same in-process handlers as gRPC ones: under `--namespace` a JSON
/// client's keys are stored under the prefix and it sees nothing outside it.
#[tokio::test(flavor = "multi_thread")]
async fn json_clients_get_the_namespace() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &["--namespace=/app/"]);
    let base = format!("http://{addr}");
    let direct = format!("http://{}", cluster.member(0).client_endpoint());
    post(
        &direct,
        "/v3/kv/put",
        &format!(r#"{{"key":"{}","value":"eA=="}}"#, base64("outside")),
        &[],
    );
    let (code, _) = post(&base, "/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#, &[]);
    assert_eq!(code, 200);
    // Stored as /app/foo.
    let (_, body) = post(
        &direct,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, base64("/app/foo")),
        &[],
    );
    assert!(body.contains(r#""value":"YmFy""#), "{body}");
    // The whole key space, as the client sees it: only foo, without the prefix.
    let (_, body) = post(
        &base,
        "/v3/kv/range",
        r#"{"key":"AA==","range_end":"AA=="}"#,
        &[],
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let keys: Vec<&str> = v["kvs"]
        .as_array()
        .expect("kvs")
        .iter()
        .map(|kv| kv["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys, ["Zm9v"], "{body}");
}

/// A JSON client's serializable reads are served from the range cache like a gRPC client's.
#[tokio::test(flavor = "multi_thread")]
async fn json_serializable_reads_use_the_range_cache() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let base = format!("http://{addr}");
    post(&base, "/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#, &[]);
    let read = r#"{"key":"Zm9v","serializable":true}"#;
    let (_, first) = post(&base, "/v3/kv/range", read, &[]);
    // The cache sets up its watch at the first cacheable read: warm it up (bounded).
    let hit = || common::proxy_metric(&addr, "etcd_grpc_proxy_cache_hits_total");
    for _ in 0..50 {
        if hit() > 0.0 {
            break;
        }
        post(&base, "/v3/kv/range", read, &[]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hits = hit();
    assert!(hits > 0.0, "the cache never served the JSON read");
    for _ in 0..5 {
        let (code, body) = post(&base, "/v3/kv/range", read, &[]);
        assert_eq!((code, &body), (200, &first));
    }
    assert_eq!(hit() - hits, 5.0, "five JSON reads served from the cache");
}
