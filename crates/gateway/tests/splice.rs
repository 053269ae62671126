//! The gateway's byte path, in-process, with exact control of both ends: half-close in each
//! direction, large transfers byte for byte, IPv6 endpoints. etcd-level behaviour is covered
//! end to end in `crates/etcd-proxy/tests/gateway.rs`.

use std::time::Duration;

use backend::Endpoint;
use gateway::{Config, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Starts a gateway in front of `endpoints`; returns its address and a stop handle.
async fn start(endpoints: Vec<Endpoint>, bind: &str) -> (String, CancellationToken) {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut config = Config::new(endpoints);
    config.health_check_interval = Duration::ZERO;
    config.drain_timeout = Duration::from_millis(100);
    let stop = CancellationToken::new();
    tokio::spawn(Gateway::new(config).serve(listener, stop.clone().cancelled_owned()));
    (addr, stop)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// A server that answers only after it has read the client's whole request up to EOF: if the
/// gateway did not pass the client's half-close on, it would never answer.
async fn reply_after_eof(listener: TcpListener, reply_len: usize) -> Vec<u8> {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut request = Vec::new();
    s.read_to_end(&mut request).await.unwrap();
    s.write_all(&pattern(reply_len)).await.unwrap();
    s.shutdown().await.unwrap();
    request
}

#[tokio::test]
async fn client_half_close_reaches_the_member_and_the_whole_reply_comes_back() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = Endpoint::parse(&upstream.local_addr().unwrap().to_string()).unwrap();
    let server = tokio::spawn(reply_after_eof(upstream, 4 << 20));
    let (addr, stop) = start(vec![ep], "127.0.0.1:0").await;

    let mut client = TcpStream::connect(&addr).await.unwrap();
    let request = pattern(300_000);
    client.write_all(&request).await.unwrap();
    client.shutdown().await.unwrap(); // SHUT_WR
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .unwrap();
    assert_eq!(reply.len(), 4 << 20);
    assert!(reply == pattern(4 << 20), "reply bytes differ");
    assert!(server.await.unwrap() == request, "request bytes differ");
    stop.cancel();
}

#[tokio::test]
async fn member_half_close_reaches_the_client_while_the_client_keeps_sending() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = Endpoint::parse(&upstream.local_addr().unwrap().to_string()).unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap(); // the member is done talking, still listening
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        rest
    });
    let (addr, stop) = start(vec![ep], "127.0.0.1:0").await;
    let mut client = TcpStream::connect(&addr).await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");
    client.write_all(b"still here").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(server.await.unwrap(), b"still here");
    stop.cancel();
}

#[tokio::test]
async fn ipv6_endpoints_are_dialed_with_brackets() {
    let upstream = TcpListener::bind("[::1]:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    let ep = Endpoint::parse(&format!("http://[::1]:{port}")).unwrap();
    assert_eq!(ep.to_string(), format!("[::1]:{port}"));
    let server = tokio::spawn(reply_after_eof(upstream, 10));
    let (addr, stop) = start(vec![ep], "[::1]:0").await;
    let mut client = TcpStream::connect(&addr).await.unwrap();
    client.write_all(b"v6").await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, pattern(10));
    assert_eq!(server.await.unwrap(), b"v6");
    stop.cancel();
}

#[tokio::test]
async fn a_refused_member_is_skipped_within_the_same_client_connection() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_ep = Endpoint::parse(&dead.local_addr().unwrap().to_string()).unwrap();
    drop(dead); // nothing listens there now: connections are refused
    let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live_ep = Endpoint::parse(&live.local_addr().unwrap().to_string()).unwrap();
    let server = tokio::spawn(async move {
        for _ in 0..4 {
            reply_after_eof_once(&live).await;
        }
    });
    let (addr, stop) = start(vec![dead_ep, live_ep], "127.0.0.1:0").await;
    for _ in 0..4 {
        let mut client = TcpStream::connect(&addr).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(
            reply, b"pong",
            "every connection is served by the live member"
        );
    }
    server.await.unwrap();
    stop.cancel();
}

async fn reply_after_eof_once(listener: &TcpListener) {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut request = Vec::new();
    s.read_to_end(&mut request).await.unwrap();
    assert_eq!(request, b"ping");
    s.write_all(b"pong").await.unwrap();
}
