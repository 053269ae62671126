//! Is a member alive? A TCP connection alone does not say: a stopped or wedged etcd still
//! completes handshakes from the kernel's backlog. So the probe asks for an answer at the
//! protocol level: an HTTP reply to `GET /version` for plain members (Go's TLS server also
//! answers a plain request, with a 400), or the server's side of a TLS handshake for https
//! members. `/version` is used rather than `/health` on purpose: `/health` also reports a
//! cluster-wide NOSPACE alarm or lost quorum, and skipping every member then would keep clients
//! from the very member they need to disarm the alarm. Liveness is what decides routing.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use crate::dns::Dns;
use crate::endpoint::{Endpoint, Scheme};
use crate::tls;

/// Checks that the member at `ep` answers within `timeout`. `Err` says why it is considered dead.
pub async fn probe(
    dns: &Dns,
    ep: &Endpoint,
    timeout: Duration,
    tls_config: &Arc<ClientConfig>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, probe_inner(dns, ep, tls_config)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer from {ep} within {timeout:?}")),
    }
}

async fn probe_inner(
    dns: &Dns,
    ep: &Endpoint,
    tls_config: &Arc<ClientConfig>,
) -> Result<(), String> {
    let mut tcp = tls::connect(dns, ep).await?;
    if ep.scheme == Scheme::Https {
        let name = ServerName::try_from(ep.server_name().to_string()).map_err(|e| e.to_string())?;
        return match TlsConnector::from(tls_config.clone())
            .connect(name, tcp)
            .await
        {
            Ok(_) => Ok(()),
            // An alert (e.g. "certificate required") is still an answer from a live server.
            Err(e)
                if e.get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| matches!(r, rustls::Error::AlertReceived(_))) =>
            {
                Ok(())
            }
            Err(e) => Err(format!("TLS probe of {ep}: {e}")),
        };
    }
    let request = format!("GET /version HTTP/1.1\r\nHost: {ep}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("probe write to {ep}: {e}"))?;
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match tcp.read(&mut head[got..]).await {
            Ok(0) => return Err(format!("{ep} closed the connection without answering")),
            Ok(n) => got += n,
            Err(e) => return Err(format!("probe read from {ep}: {e}")),
        }
    }
    if &head == b"HTTP/" {
        Ok(())
    } else {
        Err(format!("{ep} answered something other than HTTP"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn ep(addr: std::net::SocketAddr) -> Endpoint {
        Endpoint::parse(&addr.to_string()).unwrap()
    }

    #[tokio::test]
    async fn a_listener_that_never_answers_is_dead() {
        // The kernel accepts the connection (backlog) but nobody reads: like a SIGSTOPped etcd.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = tls::probe_client_config();
        let err = probe(&Dns::system(), &ep(addr), Duration::from_millis(300), &cfg)
            .await
            .unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        drop(listener);
    }

    #[tokio::test]
    async fn an_http_answer_is_alive_and_a_refused_port_is_dead() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /version HTTP/1.1\r\n"));
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        let cfg = tls::probe_client_config();
        probe(&Dns::system(), &ep(addr), Duration::from_secs(5), &cfg)
            .await
            .unwrap();
        server.await.unwrap();
        // Nothing listens there any more.
        let err = probe(&Dns::system(), &ep(addr), Duration::from_secs(5), &cfg)
            .await
            .unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }
}
