//! Message size limits of `etcd-proxy grpc-proxy start`, end to end against a real etcd with the
//! `etcd-client` crate: gRPC's 4 MiB server limit, `--max-send-bytes` (1.5 MiB by default, as
//! etcd's proxy) and `--max-recv-bytes`, on calls forwarded as bytes, on rewritten calls
//! (`--namespace`, where the prefix counts) and on watch streams. Each refusal is
//! `RESOURCE_EXHAUSTED` with grpc-go's text, and nothing over a limit reaches etcd.

mod common;

use std::time::Duration;

use common::start_grpc_proxy;
use etcd_client::{Client, ConnectOptions, WatchOptions};
use testkit::Cluster;
use tonic::Code;

async fn connect(addr: &str) -> Client {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(20));
    Client::connect([addr], Some(opts)).await.expect("connect")
}

/// The code and message of a call that must fail.
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, etcd_client::Error>) -> (Code, String) {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("{what}: expected a gRPC status, got {other:?}"),
    }
}

fn assert_too_large(what: &str, got: (Code, String), side: &str, max: usize) {
    assert_eq!(got.0, Code::ResourceExhausted, "{what}: {}", got.1);
    let prefix = format!("grpc: {side} message larger than max (");
    let suffix = format!(" vs. {max})");
    assert!(
        got.1.starts_with(&prefix) && got.1.ends_with(&suffix),
        "{what}: {:?} is not {prefix}N{suffix}",
        got.1
    );
}

const SEND: &str = "trying to send";
const RECV: &str = "received";

#[tokio::test(flavor = "multi_thread")]
async fn default_limits_are_etcds() {
    let cluster = Cluster::start(1).await;
    let (_p, addr) = start_grpc_proxy(&cluster, &[]);
    let mut c = connect(&addr).await;
    let mut direct = connect(&cluster.member(0).client_endpoint()).await;

    // Under 1.5 MiB: forwarded.
    let one_mib = vec![b'x'; 1 << 20];
    c.put("small", one_mib.clone(), None)
        .await
        .expect("1 MiB put");
    let got = direct.get("small", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), one_mib.as_slice());

    // Over --max-send-bytes (1 572 864): refused as etcd's proxy does, never sent.
    let two_mib = vec![b'y'; 2 << 20];
    let r = refused("2 MiB put", c.put("big", two_mib, None).await);
    assert_too_large("2 MiB put", r, SEND, 1_572_864);
    // Over gRPC's 4 MiB server limit: not even received.
    let five_mib = vec![b'z'; 5 << 20];
    let r = refused("5 MiB put", c.put("huge", five_mib, None).await);
    assert_too_large("5 MiB put", r, RECV, 4 << 20);
    // The same refusal for a read, which the proxy reads whole to retry it.
    let r = refused("5 MiB key range", c.get(vec![b'k'; 5 << 20], None).await);
    assert_too_large("5 MiB key range", r, RECV, 4 << 20);
    for key in ["big", "huge"] {
        let got = direct.get(key, None).await.expect("get");
        assert_eq!(got.count(), 0, "{key} reached etcd");
    }
    // The connection is still good.
    c.put("after", "ok", None)
        .await
        .expect("put after refusals");
}

#[tokio::test(flavor = "multi_thread")]
async fn max_send_and_recv_bytes_are_enforced_on_every_path() {
    let cluster = Cluster::start(1).await;
    let mut direct = connect(&cluster.member(0).client_endpoint()).await;
    let (_p, addr) = start_grpc_proxy(
        &cluster,
        &["--max-send-bytes=2000", "--max-recv-bytes=3000"],
    );
    let mut c = connect(&addr).await;

    // Send: a put whose message is over 2000 bytes is refused; a smaller one is not.
    c.put("k", vec![b'a'; 1500], None).await.expect("small put");
    let r = refused("big put", c.put("k", vec![b'b'; 2500], None).await);
    assert_too_large("big put", r, SEND, 2000);
    let got = direct.get("k", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), vec![b'a'; 1500].as_slice());

    // Recv: a read whose answer is over 3000 bytes is refused; a smaller one is not.
    direct
        .put("wide", vec![b'w'; 4000], None)
        .await
        .expect("direct put");
    assert_eq!(
        c.get("k", None).await.expect("small get").kvs()[0]
            .value()
            .len(),
        1500
    );
    let r = refused("big get", c.get("wide", None).await);
    assert_too_large("big get", r, RECV, 3000);

    // A watch stream: small events pass, a big one ends the stream with the same status.
    let mut w = c
        .watch("w", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    direct.put("w/1", "small", None).await.expect("put");
    direct
        .put("w/2", vec![b'v'; 4000], None)
        .await
        .expect("put");
    // The created response, then the first event.
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = w
                .message()
                .await
                .expect("watch message")
                .expect("stream open");
            if !m.events().is_empty() {
                return m;
            }
        }
    })
    .await
    .expect("event in time");
    assert_eq!(first.events()[0].kv().unwrap().key(), b"w/1");
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match w.message().await {
                Ok(Some(m)) if m.events().is_empty() => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends in time");
    assert_too_large("big watch event", refused("watch", end), RECV, 3000);

    // Under a namespace the prefix counts towards what is sent.
    let (_q, ns_addr) = start_grpc_proxy(
        &cluster,
        &[
            "--max-send-bytes=2000",
            "--namespace=/a-long-namespace-prefix/",
        ],
    );
    let mut n = connect(&ns_addr).await;
    n.put("k", vec![b'a'; 1900], None).await.expect("fits");
    let r = refused("namespaced put", n.put("k", vec![b'a'; 1985], None).await);
    assert_too_large("namespaced put", r, SEND, 2000);
}
