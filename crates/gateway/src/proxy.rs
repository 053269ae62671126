//! One client connection: pick a member, connect (failing over to the next member without the
//! client noticing), then copy bytes both ways until both directions are done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::metrics::EndpointMetrics;
use crate::pool::Pool;

/// Per direction. 16 KiB holds a typical gRPC frame burst; two per connection bound memory.
const COPY_BUFFER: usize = 16 * 1024;

pub async fn serve_connection(pool: Arc<Pool>, client: TcpStream, peer: SocketAddr) {
    pool.metrics.accepted.inc();
    tune(&client);
    let Some((i, upstream)) = connect(&pool).await else {
        pool.metrics.rejected.inc();
        tracing::warn!(client = %peer, "no endpoint reachable; closing client connection");
        return; // dropping `client` closes it, as etcd's gateway does
    };
    tune(&upstream);
    let m = &pool.members[i].metrics;
    m.connections.inc();
    m.open.inc();
    pool.metrics.open.inc();
    splice(client, upstream, m).await;
    pool.metrics.open.dec();
    m.open.dec();
}

/// Live members first, in round-robin order; if none is live, every member that is out, once,
/// so a recovered cluster serves the very next connection.
async fn connect(pool: &Pool) -> Option<(usize, TcpStream)> {
    let mut tried = Vec::new();
    while let Some(i) = pool.pick(&tried) {
        match dial(pool, i).await {
            Ok(s) => return Some((i, s)),
            Err(e) => {
                pool.members[i].metrics.dial_failures.inc();
                pool.deactivate(i, &e);
                tried.push(i);
            }
        }
    }
    for i in pool.inactive_in_order(&tried) {
        match dial(pool, i).await {
            Ok(s) => {
                pool.activate(i);
                return Some((i, s));
            }
            Err(_) => pool.members[i].metrics.dial_failures.inc(),
        }
    }
    None
}

async fn dial(pool: &Pool, i: usize) -> Result<TcpStream, String> {
    let ep = &pool.members[i].endpoint;
    let config = pool.config();
    // Name resolution counts against the dial timeout too: a slow resolver must not hold a
    // client longer than --dial-timeout promises.
    let addrs = match tokio::time::timeout(
        config.dial_timeout,
        config.dns.resolve(&ep.host, ep.port),
    )
    .await
    {
        Ok(resolved) => resolved.map_err(|e| format!("dial tcp {ep}: {e}"))?,
        Err(_) => {
            return Err(format!(
                "dial tcp {ep}: lookup timed out after {:?}",
                config.dial_timeout
            ));
        }
    };
    let mut last = String::new();
    for addr in addrs {
        match tokio::time::timeout(config.dial_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => {
                last = format!("dial tcp {addr}: connect: {}", backend::io_error_text(&e))
            }
            Err(_) => {
                last = format!(
                    "dial tcp {addr}: i/o timeout after {:?}",
                    config.dial_timeout
                )
            }
        }
    }
    Err(last)
}

/// No Nagle delay (gRPC sends many small frames), and TCP keepalive so a vanished peer does not
/// hold the other side's connection forever (etcd's listeners use 30 s too).
fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = SockRef::from(s).set_tcp_keepalive(&ka);
}

/// Copies both ways. End of stream on one side is passed on as a half-close (shutdown of the
/// write side) while the other direction keeps flowing; an error on either side ends both.
async fn splice(client: TcpStream, upstream: TcpStream, m: &EndpointMetrics) {
    let (client_read, client_write) = client.into_split();
    let (up_read, up_write) = upstream.into_split();
    let _ = tokio::try_join!(
        pump(client_read, up_write, &m.sent),
        pump(up_read, client_write, &m.received)
    );
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    bytes: &prometheus::IntCounter,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        bytes.inc_by(n as u64);
    }
}
