//! The proxy's own HTTP/2 server, frame by frame, with a raw HTTP/2 client (loopback TCP and
//! hand-written frames, since client libraries hide what these tests look at): keep-alive pings
//! to clients (`--grpc-keepalive-interval`/`-timeout`), etcd's ping policy
//! (`--grpc-keepalive-min-time`, checked against etcd itself), `--max-concurrent-streams`, and a
//! `:path` no client library can send. And the multi-thread runtime (`TOKIO_WORKER_THREADS`),
//! where each call is a task of its own writing into its connection from another thread.

mod common;

use std::time::{Duration, Instant};

use common::{ProxyProcess, start_grpc_proxy};
use testkit::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const DATA: u8 = 0x0;
const END_STREAM: u8 = 0x1;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// An HTTP/2 client connection driven by hand.
struct Raw {
    tcp: TcpStream,
    read: Vec<u8>,
}

impl Raw {
    /// Connects and sends the preface and an empty SETTINGS frame.
    async fn connect(addr: &str) -> Raw {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut raw = Raw {
            tcp,
            read: Vec::new(),
        };
        raw.tcp.write_all(PREFACE).await.expect("preface");
        raw.send(SETTINGS, 0, 0, &[]).await;
        raw
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        // The peer may have closed the connection: what it sent is read next.
        let _ = self.tcp.write_all(&frame).await;
    }

    /// The next frame (SETTINGS are acknowledged on the way), or `None` when the connection
    /// closed; panics if nothing comes within `within`.
    async fn next(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.read.len() >= 9 {
                let len = (usize::from(self.read[0]) << 16)
                    | (usize::from(self.read[1]) << 8)
                    | usize::from(self.read[2]);
                if self.read.len() >= 9 + len {
                    let bytes: Vec<u8> = self.read.drain(..9 + len).collect();
                    let frame = Frame {
                        kind: bytes[3],
                        flags: bytes[4],
                        stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]])
                            & 0x7fff_ffff,
                        payload: bytes[9..].to_vec(),
                    };
                    if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                        self.send(SETTINGS, ACK, 0, &[]).await;
                    }
                    return Some(frame);
                }
            }
            let mut chunk = [0u8; 16 << 10];
            let n = tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk))
                .await
                .expect("a frame or the end of the connection in time");
            match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.read.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Frames until `want` matches one (returned) or the connection closes (`None`).
    async fn until(&mut self, within: Duration, want: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.next(left).await?;
            if want(&frame) {
                return Some(frame);
            }
        }
    }

    /// Opens stream `id` with a gRPC call's headers (literals, no Huffman) and no body yet: the
    /// call stays open, waiting for its request.
    async fn open_call(&mut self, id: u32, path: &str) {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "proxy"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            block.push(0x00);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        self.send(HEADERS, END_HEADERS, id, &block).await;
    }
}

fn code_of(frame: &Frame, at: usize) -> u32 {
    u32::from_be_bytes(frame.payload[at..at + 4].try_into().expect("4 bytes"))
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_disconnected() {
    let cluster = Cluster::start(1).await;
    let (_proxy, addr) = start_grpc_proxy(
        &cluster,
        &[
            "--grpc-keepalive-interval=200ms",
            "--grpc-keepalive-timeout=300ms",
        ],
    );
    // A client that does not answer is pinged after the interval, then closed after the
    // timeout.
    let start = Instant::now();
    let mut silent = Raw::connect(&addr).await;
    let ping = silent
        .until(Duration::from_secs(3), |f| f.kind == PING)
        .await;
    assert!(ping.is_some(), "the silent client is pinged first");
    let end = silent.until(Duration::from_secs(5), |_| false).await;
    assert!(end.is_none(), "closed");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "closed after the interval and the timeout, not sooner: {waited:?}"
    );
    // A client that answers stays connected: it is pinged again and again.
    let mut live = Raw::connect(&addr).await;
    for _ in 0..4 {
        let ping = live
            .until(Duration::from_secs(3), |f| f.kind == PING)
            .await
            .expect("pinged, not closed");
        assert_eq!(ping.flags & ACK, 0, "a ping, not an answer");
        live.send(PING, ACK, 0, &ping.payload).await;
    }
}

/// Pings `raw` every `every` until it sends GOAWAY (returned) or `pings` were sent.
async fn ping_flood(raw: &mut Raw, pings: usize, every: Duration) -> Option<Frame> {
    for i in 0..pings {
        raw.send(PING, 0, 0, &(i as u64).to_be_bytes()).await;
        tokio::time::sleep(every).await;
        loop {
            // What has arrived so far: ping answers, settings, or the GOAWAY.
            match tokio::time::timeout(Duration::from_millis(20), raw.next(Duration::from_secs(5)))
                .await
            {
                Ok(Some(f)) if f.kind == GOAWAY => return Some(f),
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(_) => break,
            }
        }
    }
    None
}

#[tokio::test]
async fn pinging_more_often_than_etcd_allows_gets_too_many_pings_as_from_etcd() {
    let cluster = Cluster::start(1).await;
    let (_proxy, addr) = start_grpc_proxy(&cluster, &["--grpc-keepalive-min-time=10s"]);
    let member = cluster.member(0).client_endpoint().to_string();
    // No call open: pings more often than every 2 hours are too many, for etcd and the proxy.
    for target in [&member, &addr] {
        let mut raw = Raw::connect(target).await;
        let goaway = ping_flood(&mut raw, 10, Duration::from_millis(30))
            .await
            .unwrap_or_else(|| panic!("{target}: no GOAWAY after 10 pings"));
        assert_eq!(code_of(&goaway, 4), ENHANCE_YOUR_CALM, "{target}");
        assert_eq!(&goaway.payload[8..], b"too_many_pings", "{target}");
    }
    // A call open: every 10 s at most (`--grpc-keepalive-min-time`).
    let mut raw = Raw::connect(&addr).await;
    raw.open_call(1, "/etcdserverpb.KV/Range").await;
    let goaway = ping_flood(&mut raw, 10, Duration::from_millis(30)).await;
    assert!(goaway.is_some(), "pings every 30 ms with a call open");
    // With a minimum under the interval, the same pings are fine.
    let (_lenient, lenient_addr) = start_grpc_proxy(&cluster, &["--grpc-keepalive-min-time=10ms"]);
    let mut raw = Raw::connect(&lenient_addr).await;
    raw.open_call(1, "/etcdserverpb.KV/Range").await;
    let goaway = ping_flood(&mut raw, 10, Duration::from_millis(30)).await;
    assert!(goaway.is_none(), "{goaway:?}");
}

#[tokio::test]
async fn calls_over_max_concurrent_streams_are_refused() {
    let cluster = Cluster::start(1).await;
    let (_proxy, addr) = start_grpc_proxy(&cluster, &["--max-concurrent-streams=2"]);
    let mut raw = Raw::connect(&addr).await;
    let settings = raw
        .until(Duration::from_secs(5), |f| {
            f.kind == SETTINGS && f.flags & ACK == 0
        })
        .await
        .expect("the proxy's settings");
    let advertised = settings
        .payload
        .chunks(6)
        .find(|s| s[..2] == [0, 3])
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    assert_eq!(advertised, Some(2), "SETTINGS_MAX_CONCURRENT_STREAMS");
    for id in [1, 3, 5] {
        raw.open_call(id, "/etcdserverpb.KV/Range").await;
    }
    let reset = raw
        .until(Duration::from_secs(5), |f| f.kind == RST_STREAM)
        .await
        .expect("a reset");
    assert_eq!((reset.stream, code_of(&reset, 0)), (5, REFUSED_STREAM));
}

#[tokio::test]
async fn a_path_without_its_leading_slash_is_unimplemented_not_forwarded() {
    let cluster = Cluster::start(1).await;
    let (_proxy, addr) = start_grpc_proxy(&cluster, &["--namespace=/tenant/"]);
    let mut raw = Raw::connect(&addr).await;
    // grpc-go before 1.79.3 would route this path; forwarded as bytes it would skip the
    // namespace. An empty Range request, framed.
    raw.open_call(1, "etcdserverpb.KV/Range").await;
    raw.send(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]).await;
    let answer = raw
        .until(Duration::from_secs(5), |f| {
            f.kind == HEADERS && f.stream == 1
        })
        .await
        .expect("an answer");
    assert_ne!(answer.flags & END_STREAM, 0, "trailers-only: {answer:?}");
    // The proxy writes header values as plain literals (no Huffman), so they can be read here.
    let block = String::from_utf8_lossy(&answer.payload);
    assert!(block.contains("grpc-status\u{2}12"), "{block:?}");
    assert!(block.contains("malformed method name"), "{block:?}");
}

#[tokio::test]
async fn the_multi_thread_runtime_serves_calls_streams_and_large_values() {
    let cluster = Cluster::start(1).await;
    let endpoints = format!("--endpoints={}", cluster.client_urls().join(","));
    let proxy = ProxyProcess::start_with_env(
        &[
            "grpc-proxy",
            "start",
            "--listen-addr=127.0.0.1:0",
            &endpoints,
        ],
        &[("TOKIO_WORKER_THREADS", "2")],
        "started gRPC proxy",
    );
    let addr = proxy.grpc_address();
    let mut watcher = common::etcd_client(std::slice::from_ref(&addr)).await;
    let mut events = watcher
        .watch("mt/", Some(etcd_client::WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    // 8 clients on their own connections, 25 puts and reads each, at once.
    let mut tasks = Vec::new();
    for c in 0..8 {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = common::etcd_client(&[addr]).await;
            for i in 0..25 {
                let key = format!("mt/{c}/{i}");
                client
                    .put(key.as_str(), format!("v{c}-{i}"), None)
                    .await
                    .expect("put");
                let got = client.get(key.as_str(), None).await.expect("get");
                assert_eq!(got.kvs()[0].value_str().unwrap(), format!("v{c}-{i}"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    // Every put reached the watcher.
    let mut seen = 0;
    while seen < 200 {
        let resp = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("events in time")
            .expect("watch stream")
            .expect("open");
        seen += resp.events().len();
    }
    assert_eq!(seen, 200);
    // A value of 1.2 MiB each way: more than the windows a peer starts with (64 KiB).
    let big = "x".repeat(1200 << 10);
    let mut client = common::etcd_client(&[addr]).await;
    client
        .put("mt-big", big.as_str(), None)
        .await
        .expect("big put");
    let got = client.get("mt-big", None).await.expect("big get");
    assert_eq!(got.kvs()[0].value().len(), big.len());
}

#[tokio::test]
async fn clients_that_stop_reading_large_answers_do_not_stall_the_others() {
    let cluster = Cluster::start(1).await;
    let (_proxy, addr) = start_grpc_proxy(&cluster, &["--disable-range-cache"]);
    let mut client = common::etcd_client(std::slice::from_ref(&addr)).await;
    let big = "x".repeat(1200 << 10);
    client
        .put("big", big.as_str(), None)
        .await
        .expect("big put");
    // 8 clients ask for the 1.2 MiB value and never read the answer (nor give window back):
    // each leaves about 1 MiB waiting at the proxy on a member connection, 4 MiB or more per
    // connection, what a whole connection's window holds.
    let mut stuck = Vec::new();
    for _ in 0..8 {
        let mut raw = Raw::connect(&addr).await;
        raw.open_call(1, "/etcdserverpb.KV/Range").await;
        // RangeRequest { key: "big" }, framed.
        raw.send(
            DATA,
            END_STREAM,
            1,
            &[0, 0, 0, 0, 5, 0x0a, 3, b'b', b'i', b'g'],
        )
        .await;
        stuck.push(raw);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Everyone else is still served: reads of the same value, and writes.
    for i in 0..4 {
        let got = tokio::time::timeout(Duration::from_secs(10), client.get("big", None))
            .await
            .unwrap_or_else(|_| panic!("read {i} stalled behind the clients that stopped reading"))
            .expect("get");
        assert_eq!(got.kvs()[0].value().len(), big.len());
        tokio::time::timeout(Duration::from_secs(10), client.put("small", "v", None))
            .await
            .expect("put in time")
            .expect("put");
    }
    drop(stuck);
}

/// Polls the proxy's client watcher gauge until it is `want`, for up to 10 s; the last value seen.
async fn watchers_become(addr: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = common::proxy_metric(addr, "etcd_grpc_proxy_watch_client_watchers");
        if now == want || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_client_that_closes_its_connection_ends_its_calls() {
    let cluster = Cluster::start(1).await;
    let (_proxy, addr) = start_grpc_proxy(&cluster, &[]);
    let mut raw = Raw::connect(&addr).await;
    raw.open_call(1, "/etcdserverpb.Watch/Watch").await;
    // WatchRequest { create_request: { key: "k" } }, framed; the request stream stays open.
    raw.send(DATA, 0, 1, &[0, 0, 0, 0, 5, 0x0a, 3, 0x0a, 1, b'k'])
        .await;
    let created = raw
        .until(Duration::from_secs(5), |f| f.kind == DATA && f.stream == 1)
        .await;
    assert!(created.is_some(), "the watch was created");
    assert_eq!(watchers_become(&addr, 1.0).await, 1.0);
    // The client goes away without a word (a process that exits): its watcher goes too, not at
    // the next keep-alive timeout.
    drop(raw);
    assert_eq!(watchers_become(&addr, 0.0).await, 0.0);
}
