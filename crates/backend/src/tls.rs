//! TLS toward members, for the checks the front doors make themselves: validating discovered
//! https members, and probing whether a TLS member is alive. Client traffic never goes through
//! here (the L4 gateway passes TLS through untouched).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::dns::Dns;
use crate::endpoint::Endpoint;

/// A CA bundle that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read or holds no PEM certificate.
    #[error("cannot load CA file {path}: {reason}")]
    Ca {
        /// The file given.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client config that verifies members against `ca_file`, or the system roots without one.
pub fn verifying_client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let ca_err = |reason: String| TlsError::Ca {
                path: path.display().to_string(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))?;
            for cert in certs {
                let cert = cert.map_err(|e| ca_err(e.to_string()))?;
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ca_err("no certificate found".into()));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A broken system root is skipped; the others still verify.
                let _ = roots.add(cert);
            }
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Connects to `ep` and completes a TLS handshake. The certificate must name the member, or
/// `domain` (what etcd sets as ServerName during SRV validation), so certificates made for
/// either convention pass.
pub async fn handshake(
    dns: &Dns,
    ep: &Endpoint,
    config: Arc<ClientConfig>,
    domain: &str,
) -> Result<(), String> {
    let connector = TlsConnector::from(config);
    let mut names = vec![ep.server_name().to_string()];
    let domain = domain.trim_end_matches('.');
    if !domain.is_empty() && domain != names[0] {
        names.push(domain.to_string());
    }
    let mut last = String::new();
    for name in names {
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| format!("invalid server name {name:?}: {e}"))?;
        let tcp = connect(dns, ep).await?;
        match connector.connect(server_name, tcp).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                let wrong_name = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(c) if format!("{c:?}").contains("NotValidForName")));
                last = format!("TLS handshake with {ep}: {e}");
                if !wrong_name {
                    break;
                }
            }
        }
    }
    Err(last)
}

/// First address of `ep` that accepts a TCP connection.
pub async fn connect(dns: &Dns, ep: &Endpoint) -> Result<TcpStream, String> {
    let addrs = dns
        .resolve(&ep.host, ep.port)
        .await
        .map_err(|e| e.to_string())?;
    let mut last = String::new();
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("dial tcp {addr}: connect: {}", crate::io_error_text(&e)),
        }
    }
    Err(last)
}

/// Client config for liveness probes: any certificate is accepted, because the probe only asks
/// "does a TLS server answer", never trusts what it says.
pub fn probe_client_config() -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(AnyCert(provider.signature_verification_algorithms));
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // The ring provider supports TLS 1.2 and 1.3, the safe defaults, so this cannot fail.
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

#[derive(Debug)]
struct AnyCert(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
