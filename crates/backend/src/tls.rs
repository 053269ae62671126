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

/// rustls's client configuration, for crates that take one from here without depending on rustls.
pub use rustls::ClientConfig as TlsClientConfig;

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
            // The member asks for a client certificate (`--client-cert-auth`) and refuses the
            // handshake without one. It can only say so after ours verified its certificate
            // (a client checks the server's certificate before sending its own), so the member
            // passed.
            Err(e)
                if e.get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| {
                        matches!(
                            r,
                            rustls::Error::AlertReceived(
                                rustls::AlertDescription::BadCertificate
                                    | rustls::AlertDescription::CertificateRequired
                            )
                        )
                    }) =>
            {
                return Ok(());
            }
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
    let verifier = Arc::new(AcceptCert::any(provider.signature_verification_algorithms));
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // The ring provider supports TLS 1.2 and 1.3, the safe defaults, so this cannot fail.
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

/// A server certificate verifier that trusts by fiat (any certificate, or exactly one pinned
/// certificate) but still checks the handshake's signatures: for liveness probes and
/// `--insecure-skip-tls-verify`, and for the proxy calling itself (its own, possibly
/// self-signed, certificate).
#[derive(Debug)]
pub struct AcceptCert {
    /// `None`: any certificate.
    only: Option<CertificateDer<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl AcceptCert {
    /// Accepts any certificate.
    pub fn any(algorithms: WebPkiSupportedAlgorithms) -> AcceptCert {
        AcceptCert {
            only: None,
            algorithms,
        }
    }

    /// Accepts exactly `cert` as the server's leaf certificate.
    pub fn pinned(
        cert: CertificateDer<'static>,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> AcceptCert {
        AcceptCert {
            only: Some(cert),
            algorithms,
        }
    }
}

impl ServerCertVerifier for AcceptCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.only {
            Some(pinned) if pinned.as_ref() != end_entity.as_ref() => {
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The files and switches of a TLS client toward etcd members, as etcd's `TLSInfo` takes them
/// (`--cacert`, `--cert`, `--key`, `--insecure-skip-tls-verify` of `etcd grpc-proxy start`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFiles {
    /// CA bundle the members' certificates must chain to; `None`: the system roots.
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate presented to members (with `key`).
    pub cert: Option<std::path::PathBuf>,
    /// Key of `cert`.
    pub key: Option<std::path::PathBuf>,
    /// Accept any member certificate (signatures of the handshake are still checked).
    pub insecure_skip_verify: bool,
    /// Refuse a client certificate whose subject has a Common Name (etcd's `EmptyCN`: with
    /// `--client-cert-auth`, etcd would take the CN as the user of every proxied request).
    pub require_empty_cn: bool,
}

/// Why [`client_config`] could not build a configuration. The wording follows Go's and etcd's
/// where they have one (`open x: no such file or directory`, `cert has non empty Common Name`).
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    /// One of cert and key without the other (etcd's `TLSInfo.baseConfig` message).
    #[error("KeyFile and CertFile must both be present[key: {key}, cert: {cert}]")]
    Pair {
        /// `--key`.
        key: String,
        /// `--cert`.
        cert: String,
    },
    /// A file that cannot be read, or holds nothing usable.
    #[error("{flag}: {reason}")]
    File {
        /// The flag that named the file.
        flag: &'static str,
        /// What went wrong, with the path.
        reason: String,
    },
    /// The client certificate has a Common Name (etcd's message and form).
    #[error("cert has non empty Common Name ({cn}): {path}")]
    CommonName {
        /// The Common Name found.
        cn: String,
        /// The certificate file.
        path: String,
    },
    /// The key is not the certificate's (Go: `tls: private key does not match public key`).
    #[error("tls: private key does not match public key (--cert {cert}, --key {key})")]
    Mismatch {
        /// `--cert`.
        cert: String,
        /// `--key`.
        key: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Go's `open <path>: <reason>` for a file that cannot be read.
fn open_error(path: &Path, e: &std::io::Error) -> String {
    format!("open {}: {}", path.display(), crate::io_error_text(e))
}

/// Reads every PEM certificate of `path` (at least one).
fn read_certs(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ClientTlsError> {
    let file_err = |reason: String| ClientTlsError::File { flag, reason };
    let bytes = std::fs::read(path).map_err(|e| file_err(open_error(path, &e)))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(file_err(format!(
            "{}: no PEM certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

/// The Common Name of a DER certificate's subject; empty when it has none.
pub fn common_name(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .map(|cn| cn.as_str().map(str::to_string).unwrap_or_default());
    Ok(cn.unwrap_or_default())
}

/// A client configuration toward members from `files`, offering `alpn` (e.g. `h2`). Every file
/// is read and checked here, so a bad one is an error at start-up rather than at the first call.
pub fn client_config(files: &ClientFiles, alpn: &[&[u8]]) -> Result<ClientConfig, ClientTlsError> {
    let provider = provider();
    let client_auth = match (&files.cert, &files.key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let chain = read_certs("--cert", cert)?;
            if files.require_empty_cn {
                let cn = common_name(&chain[0]).map_err(|e| ClientTlsError::File {
                    flag: "--cert",
                    reason: format!("{}: {e}", cert.display()),
                })?;
                if !cn.is_empty() {
                    return Err(ClientTlsError::CommonName {
                        cn,
                        path: cert.display().to_string(),
                    });
                }
            }
            let key_err = |reason: String| ClientTlsError::File {
                flag: "--key",
                reason,
            };
            let bytes = std::fs::read(key).map_err(|e| key_err(open_error(key, &e)))?;
            let key_der = rustls_pki_types::PrivateKeyDer::from_pem_slice(&bytes)
                .map_err(|e| key_err(format!("{}: {e}", key.display())))?;
            Some((chain, key_der))
        }
        (cert, key) => {
            let show = |p: &Option<std::path::PathBuf>| {
                p.as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            };
            return Err(ClientTlsError::Pair {
                key: show(key),
                cert: show(cert),
            });
        }
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientTlsError::Config(e.to_string()))?;
    let builder = if files.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptCert::any(
                provider.signature_verification_algorithms,
            )))
    } else {
        let mut roots = RootCertStore::empty();
        match &files.ca {
            Some(path) => {
                for cert in read_certs("--cacert", path)? {
                    roots.add(cert).map_err(|e| ClientTlsError::File {
                        flag: "--cacert",
                        reason: format!("{}: {e}", path.display()),
                    })?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    // A broken system root is skipped; the others still verify.
                    let _ = roots.add(cert);
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match client_auth {
        None => builder.with_no_client_auth(),
        Some((chain, key_der)) => {
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => ClientTlsError::Mismatch {
                        cert: files
                            .cert
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                        key: files
                            .key
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                    },
                    other => ClientTlsError::File {
                        flag: "--key",
                        reason: other.to_string(),
                    },
                })?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A connection to a member: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum MemberStream {
    /// `http` members.
    Plain(TcpStream),
    /// `https` members.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connects to `ep` (resolved by `dns`, each address in turn) with TCP_NODELAY, and completes a
/// TLS handshake with `tls` when given, checking the certificate against the member's name.
pub async fn dial(
    dns: &Dns,
    ep: &Endpoint,
    tls: Option<&Arc<ClientConfig>>,
) -> std::io::Result<MemberStream> {
    let tcp = connect(dns, ep)
        .await
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e))?;
    let _ = tcp.set_nodelay(true);
    let Some(config) = tls else {
        return Ok(MemberStream::Plain(tcp));
    };
    let name = ServerName::try_from(ep.server_name().to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tls = TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake with {ep}: {e}")))?;
    Ok(MemberStream::Tls(Box::new(tls)))
}

impl tokio::io::AsyncRead for MemberStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MemberStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            MemberStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for MemberStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MemberStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            MemberStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MemberStream::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            MemberStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MemberStream::Plain(s) => s.is_write_vectored(),
            MemberStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MemberStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            MemberStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MemberStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            MemberStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    /// Writes a self-signed certificate with Common Name `cn` (none when empty) and its key.
    fn cert(dir: &Path, name: &str, cn: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "test");
        if !cn.is_empty() {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        let c = params.self_signed(&key).unwrap();
        let (cp, kp) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cp, c.pem()).unwrap();
        std::fs::write(&kp, key.serialize_pem()).unwrap();
        (cp, kp)
    }

    fn files(ca: &Path, cert: &Path, key: &Path) -> ClientFiles {
        ClientFiles {
            ca: Some(ca.to_path_buf()),
            cert: Some(cert.to_path_buf()),
            key: Some(key.to_path_buf()),
            insecure_skip_verify: false,
            require_empty_cn: true,
        }
    }

    #[test]
    fn client_certificates_are_checked_like_etcd() {
        let dir = tempfile::tempdir().unwrap();
        let (named, named_key) = cert(dir.path(), "named", "proxy");
        let (nameless, nameless_key) = cert(dir.path(), "nameless", "");

        let err = client_config(&files(&nameless, &named, &named_key), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cert has non empty Common Name (proxy): {}",
                named.display()
            )
        );
        // Without etcd's rule the same certificate is fine.
        let mut f = files(&nameless, &named, &named_key);
        f.require_empty_cn = false;
        assert!(client_config(&f, &[]).is_ok());

        let ok = client_config(&files(&named, &nameless, &nameless_key), &[b"h2"]).unwrap();
        assert_eq!(ok.alpn_protocols, vec![b"h2".to_vec()]);

        let err = client_config(&files(&named, &nameless, &named_key), &[]).unwrap_err();
        assert!(matches!(err, ClientTlsError::Mismatch { .. }), "{err}");

        let mut f = files(&named, &nameless, &nameless_key);
        f.key = None;
        let err = client_config(&f, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "KeyFile and CertFile must both be present[key: , cert: {}]",
                nameless.display()
            )
        );

        let missing = dir.path().join("missing.pem");
        let err = client_config(&files(&missing, &nameless, &nameless_key), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "--cacert: open {}: no such file or directory",
                missing.display()
            )
        );
        assert_eq!(
            common_name(&CertificateDer::from_pem_file(&nameless).unwrap()).unwrap(),
            ""
        );
    }
}
