//! DNS SRV discovery of a cluster's client endpoints, as `etcd --discovery-srv` does it:
//! `_etcd-client-ssl[-NAME]._tcp.DOMAIN` (https) and `_etcd-client[-NAME]._tcp.DOMAIN` (http).
//! Validation of secure records is stricter than etcd's, which only opens a TCP connection:
//! here an https member must complete a TLS handshake with a certificate the CA vouches for.

use std::path::Path;
use std::time::Duration;

use crate::dns::{Dns, DnsError};
use crate::endpoint::{Endpoint, Scheme};
use crate::tls;

/// Both SRV lookups failed (etcd's wording: `dns lookup errors: <https> and <http>`).
#[derive(Debug, thiserror::Error)]
#[error("dns lookup errors: {https} and {http}")]
pub struct DiscoveryError {
    /// Why `_etcd-client-ssl` failed.
    pub https: DnsError,
    /// Why `_etcd-client` failed.
    pub http: DnsError,
}

/// `_etcd-client[-ssl][-NAME]._tcp.DOMAIN`.
pub fn service_name(domain: &str, name: &str, secure: bool) -> String {
    let mut service = String::from("_etcd-client");
    if secure {
        service.push_str("-ssl");
    }
    if !name.is_empty() {
        service.push('-');
        service.push_str(name);
    }
    format!("{service}._tcp.{domain}")
}

/// Looks up both services; https records first, each set ordered by priority. Fails only if
/// both lookups fail, like etcd.
pub async fn discover(
    dns: &Dns,
    domain: &str,
    name: &str,
) -> Result<Vec<Endpoint>, DiscoveryError> {
    let (secure, plain) = (
        service_name(domain, name, true),
        service_name(domain, name, false),
    );
    let (https, http) = tokio::join!(dns.lookup_srv(&secure), dns.lookup_srv(&plain));
    if let (Err(https), Err(http)) = (&https, &http) {
        return Err(DiscoveryError {
            https: https.clone(),
            http: http.clone(),
        });
    }
    let mut out = Vec::new();
    for (records, scheme) in [(https, Scheme::Https), (http, Scheme::Http)] {
        let mut records = records.unwrap_or_default();
        records.sort_by_key(|r| r.priority);
        out.extend(records.into_iter().map(|r| Endpoint {
            host: r.target,
            port: r.port,
            scheme,
            priority: r.priority,
            weight: r.weight,
        }));
    }
    Ok(out)
}

/// Outcome of [`validate_secure`].
#[derive(Debug, Default)]
pub struct Validation {
    /// Endpoints that passed.
    pub valid: Vec<Endpoint>,
    /// Endpoints refused, with the reason.
    pub rejected: Vec<(Endpoint, String)>,
}

/// Keeps only https endpoints whose member completes a TLS handshake, within `timeout`, with a
/// certificate signed by `ca_file` (or the system roots) for the member's name or `domain`.
pub async fn validate_secure(
    dns: &Dns,
    endpoints: Vec<Endpoint>,
    ca_file: Option<&Path>,
    domain: &str,
    timeout: Duration,
) -> Validation {
    let mut result = Validation::default();
    let config = match tls::verifying_client_config(ca_file) {
        Ok(c) => c,
        Err(e) => {
            // Like etcd: a CA that does not load drops every endpoint.
            result.rejected = endpoints
                .into_iter()
                .map(|ep| (ep, e.to_string()))
                .collect();
            return result;
        }
    };
    for ep in endpoints {
        if ep.scheme != Scheme::Https {
            let reason = format!("{:?} is insecure", format!("http://{ep}"));
            result.rejected.push((ep, reason));
            continue;
        }
        let outcome =
            tokio::time::timeout(timeout, tls::handshake(dns, &ep, config.clone(), domain)).await;
        match outcome {
            Ok(Ok(())) => result.valid.push(ep),
            Ok(Err(e)) => result.rejected.push((ep, e)),
            Err(_) => result
                .rejected
                .push((ep, format!("TLS handshake timed out after {timeout:?}"))),
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_match_etcd() {
        assert_eq!(
            service_name("example.com", "", false),
            "_etcd-client._tcp.example.com"
        );
        assert_eq!(
            service_name("example.com", "", true),
            "_etcd-client-ssl._tcp.example.com"
        );
        assert_eq!(
            service_name("example.com", "foo", true),
            "_etcd-client-ssl-foo._tcp.example.com"
        );
        assert_eq!(
            service_name("example.com", "foo", false),
            "_etcd-client-foo._tcp.example.com"
        );
    }
}
