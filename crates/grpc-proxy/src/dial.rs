//! How the proxy reaches a member, for everything it sends there: the forwarding connections
//! ([`crate::upstream`]), its own tonic channels ([`crate::cluster`]), and the health and
//! `/metrics` calls ([`crate::admin`]). `https` members get TLS with the configuration of
//! `--cacert`, `--cert`, `--key` and `--insecure-skip-tls-verify` ([`Config::member_tls`]);
//! host names are resolved by [`Config::dns`] (SRV targets with `--discovery-dns-server`).

use std::sync::Arc;
use std::time::Duration;

use backend::endpoint::Scheme;
use backend::tls::MemberStream;
use backend::{Dns, Endpoint};
use rustls::ClientConfig;

use crate::Config;

/// Which protocol the connection will carry, for the TLS ALPN offer (Go's server picks HTTP/2
/// for a TLS client that offers `h2`, and HTTP/1.1 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC.
    H2,
    /// `GET /metrics`, `/version`.
    Http1,
}

/// Connects to members, with TLS where their scheme asks for it.
#[derive(Clone)]
pub struct Dialer {
    dns: Dns,
    /// `None` when no TLS configuration could be made: `https` members then fail to connect.
    h2: Option<Arc<ClientConfig>>,
    http1: Option<Arc<ClientConfig>>,
    timeout: Duration,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("dns", &self.dns.describe())
            .field("tls", &self.h2.is_some())
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// The dialer of `config`: its TLS configuration toward members, or the system roots when
    /// it has none (as clientv3 does for an `https` endpoint without TLS flags).
    pub fn new(config: &Config) -> Dialer {
        let base = match &config.member_tls {
            Some(c) => Some(c.as_ref().clone()),
            None => backend::tls::client_config(&backend::tls::ClientFiles::default(), &[]).ok(),
        };
        let with_alpn = |alpn: &[u8]| {
            base.as_ref().map(|c| {
                let mut c = c.clone();
                c.alpn_protocols = vec![alpn.to_vec()];
                Arc::new(c)
            })
        };
        Dialer {
            dns: config.dns.clone(),
            h2: with_alpn(b"h2"),
            http1: with_alpn(b"http/1.1"),
            timeout: config.dial_timeout,
        }
    }

    /// Whether `ep` is spoken to over TLS.
    pub fn uses_tls(ep: &Endpoint) -> bool {
        ep.scheme == Scheme::Https
    }

    /// The resolver for member names.
    pub fn dns(&self) -> &Dns {
        &self.dns
    }

    /// A connection to `ep` (TCP, plus TLS for an `https` member), within the dial timeout.
    pub async fn connect(&self, ep: &Endpoint, alpn: Alpn) -> std::io::Result<MemberStream> {
        let tls = if Dialer::uses_tls(ep) {
            let config = match alpn {
                Alpn::H2 => &self.h2,
                Alpn::Http1 => &self.http1,
            };
            match config {
                Some(c) => Some(c),
                None => {
                    return Err(std::io::Error::other(format!(
                        "no TLS configuration for https member {ep}"
                    )));
                }
            }
        } else {
            None
        };
        match tokio::time::timeout(self.timeout, backend::tls::dial(&self.dns, ep, tls)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("dial {ep}: timed out after {:?}", self.timeout),
            )),
        }
    }
}
