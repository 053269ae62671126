//! TLS for the proxy's clients (`--cert-file`, `--key-file`, `--trusted-ca-file`,
//! `--client-crl-file`, `--listen-cipher-suites`, `--tls-min-version`, `--tls-max-version`,
//! `--auto-tls`): the rustls server configuration of the listeners, and the client
//! configuration the proxy uses to call itself (`/proxy/health`).
//!
//! Everything is read and checked once at start-up, so a file that cannot be read, a key that
//! does not match its certificate or an unknown cipher suite is one clear error before the
//! proxy listens, never a failure at the first handshake.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite, SupportedProtocolVersion,
};

/// A TLS version named by `--tls-min-version` / `--tls-max-version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    /// `TLS1.2`
    Tls12,
    /// `TLS1.3`
    Tls13,
}

/// What the flags say about the listener's TLS. Paths are as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--cert-file`: the serving certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// `--key-file`: its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// `--trusted-ca-file`: when set, clients must present a certificate issued by one of
    /// these CAs.
    pub trusted_ca_file: Option<PathBuf>,
    /// `--client-crl-file`: revoked client certificates (PEM or DER).
    pub client_crl_file: Option<PathBuf>,
    /// `--listen-cipher-suites`: Go/IANA names; empty for rustls' defaults.
    pub cipher_suites: Vec<String>,
    /// `--tls-min-version`.
    pub min_version: Option<Version>,
    /// `--tls-max-version`; `None` for the highest the library has (TLS 1.3).
    pub max_version: Option<Version>,
}

/// The listener's TLS, built from [`Options`].
#[derive(Debug, Clone)]
pub struct ListenTls {
    /// Serves clients (ALPN `h2` and `http/1.1`).
    pub server: Arc<ServerConfig>,
    /// For the proxy's calls to itself: trusts exactly the proxy's own certificate, and
    /// presents it as its client certificate (as etcd's self-client does with its listen TLS).
    pub self_client: Arc<ClientConfig>,
}

/// A start-up error, with the flag and the file it is about.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

impl TlsError {
    fn new(message: impl Into<String>) -> TlsError {
        TlsError(message.into())
    }
}

/// TLS 1.2 suites by Go's names (`tls.CipherSuiteName`, and etcd's older names without the
/// `_SHA256` of the ChaCha20 suites). TLS 1.3 suites are not configurable (as in Go).
fn tls12_suite(name: &str) -> Option<SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite as cs;
    Some(match name {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
        | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => {
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => {
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        _ => return None,
    })
}

/// Suites Go knows (so etcd accepts the name) that rustls does not implement: CBC modes, RSA
/// key exchange, 3DES and RC4. They are skipped with a warning.
const GO_ONLY_SUITES: &[&str] = &[
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

/// TLS 1.3 suite names Go accepts in the list; they change nothing (always on).
const TLS13_SUITES: &[&str] = &[
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

/// The crypto provider with `--listen-cipher-suites` applied: the listed TLS 1.2 suites in
/// their order, after every TLS 1.3 suite.
fn provider(names: &[String]) -> Result<CryptoProvider, TlsError> {
    let mut provider = rustls::crypto::ring::default_provider();
    if names.is_empty() {
        return Ok(provider);
    }
    let mut tls12 = Vec::new();
    for name in names {
        let name = name.trim();
        if let Some(suite) = tls12_suite(name) {
            if !tls12.contains(&suite) {
                tls12.push(suite);
            }
        } else if GO_ONLY_SUITES.contains(&name) {
            tracing::warn!(
                cipher_suite = name,
                "--listen-cipher-suites: suite not offered (rustls has no CBC, RSA key exchange, 3DES or RC4 suites)"
            );
        } else if !TLS13_SUITES.contains(&name) {
            return Err(TlsError::new(format!(
                "unexpected TLS cipher suite \"{name}\""
            )));
        }
    }
    if tls12.is_empty() {
        return Err(TlsError::new(format!(
            "--listen-cipher-suites: none of {names:?} is supported; supported TLS 1.2 suites: \
             TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, \
             TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, \
             TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"
        )));
    }
    let mut suites: Vec<SupportedCipherSuite> = provider
        .cipher_suites
        .iter()
        .copied()
        .filter(|s| s.version() == &rustls::version::TLS13)
        .collect();
    suites.extend(tls12);
    provider.cipher_suites = suites;
    Ok(provider)
}

/// The protocol versions between `min` (default TLS 1.2) and `max` (default TLS 1.3).
fn versions(
    min: Option<Version>,
    max: Option<Version>,
) -> Result<Vec<&'static SupportedProtocolVersion>, TlsError> {
    let min = min.unwrap_or(Version::Tls12);
    let max = max.unwrap_or(Version::Tls13);
    if min > max {
        return Err(TlsError::new(format!(
            "min version ({min:?}) is greater than max version ({max:?})"
        )));
    }
    let mut v = Vec::new();
    if min <= Version::Tls13 && max >= Version::Tls13 {
        v.push(&rustls::version::TLS13);
    }
    if min <= Version::Tls12 && max >= Version::Tls12 {
        v.push(&rustls::version::TLS12);
    }
    Ok(v)
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path)
        .map_err(|e| TlsError::new(format!("{flag}: cannot read {}: {e}", path.display())))
}

/// Every certificate of a PEM file; at least one.
fn certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(format!("{flag}: {} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::new(format!(
            "{flag}: no certificate (PEM \"CERTIFICATE\" block) in {}",
            path.display()
        )));
    }
    Ok(certs)
}

fn private_key(flag: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        TlsError::new(format!(
            "{flag}: no private key (PKCS#8, PKCS#1 or SEC1 PEM) in {}: {e}",
            path.display()
        ))
    })
}

/// CRLs of a file, PEM (one or more `X509 CRL` blocks) or DER, as Go's `x509.ParseCRL` takes.
fn crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let flag = "--client-crl-file";
    let data = read(flag, path)?;
    let pem = CertificateRevocationListDer::pem_slice_iter(&data).collect::<Result<Vec<_>, _>>();
    match pem {
        Ok(crls) if !crls.is_empty() => Ok(crls),
        // DER starts with a SEQUENCE tag.
        _ if data.first() == Some(&0x30) => Ok(vec![CertificateRevocationListDer::from(data)]),
        _ => Err(TlsError::new(format!(
            "{flag}: no certificate revocation list (PEM \"X509 CRL\" or DER) in {}",
            path.display()
        ))),
    }
}

/// Builds the listener's TLS from the flags.
pub fn build(opts: &Options) -> Result<ListenTls, TlsError> {
    let provider = Arc::new(provider(&opts.cipher_suites)?);
    let versions = versions(opts.min_version, opts.max_version)?;
    let chain = certs("--cert-file", &opts.cert_file)?;
    let key = private_key("--key-file", &opts.key_file)?;

    let verifier = match &opts.trusted_ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs("--trusted-ca-file", ca)? {
                roots.add(cert).map_err(|e| {
                    TlsError::new(format!(
                        "--trusted-ca-file: a certificate of {} is not a usable CA: {e}",
                        ca.display()
                    ))
                })?;
            }
            let mut builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if let Some(crl) = &opts.client_crl_file {
                // Go's check: a presented certificate whose serial is in the CRL is refused.
                // Certificates of CAs the CRL is not about stay accepted.
                builder = builder
                    .with_crls(crls(crl)?)
                    .only_check_end_entity_revocation()
                    .allow_unknown_revocation_status();
            }
            builder.build().map_err(|e| {
                TlsError::new(format!(
                    "--trusted-ca-file {} / --client-crl-file: {e}",
                    ca.display()
                ))
            })?
        }
        None if opts.client_crl_file.is_some() => {
            return Err(TlsError::new(
                "--client-crl-file needs --trusted-ca-file: client certificates are only \
                 requested, and so checked against the CRL, when a trusted CA is given",
            ));
        }
        None => WebPkiClientVerifier::no_client_auth(),
    };

    let version_error = |e: rustls::Error| TlsError::new(format!("TLS versions: {e}"));
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(version_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            TlsError::new(format!(
                "--cert-file {} / --key-file {}: {}",
                opts.cert_file.display(),
                opts.key_file.display(),
                match e {
                    rustls::Error::InconsistentKeys(_) => {
                        "the private key does not match the certificate".to_string()
                    }
                    e => e.to_string(),
                }
            ))
        })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    // The self-client speaks every version and suite the server may have kept.
    let self_provider = Arc::new(rustls::crypto::ring::default_provider());
    // Exactly the proxy's own certificate: it needs no CA (an `--auto-tls` one has none).
    let pinned = backend::tls::AcceptCert::pinned(
        chain[0].clone(),
        self_provider.signature_verification_algorithms,
    );
    let mut self_client = ClientConfig::builder_with_provider(self_provider)
        .with_safe_default_protocol_versions()
        .map_err(version_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(pinned))
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::new(format!("--cert-file / --key-file: {e}")))?;
    self_client.alpn_protocols = vec![b"h2".to_vec()];

    Ok(ListenTls {
        server: Arc::new(server),
        self_client: Arc::new(self_client),
    })
}

/// The name the self-client gives in SNI: the address's IP (the pinned verifier does not look
/// at it).
pub fn self_server_name(ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

/// etcd's `transport.SelfCert` for `--auto-tls`: `<dir>/cert.pem` and `<dir>/key.pem`, reused
/// when both exist, else generated (ECDSA P-256, self-signed, `O=etcd`, valid `validity_years`
/// years, SANs from the host of `listen_addr`, plus loopback when it is a wildcard).
/// Returns the certificate and key paths.
pub fn self_cert(
    dir: &Path,
    listen_addr: &str,
    validity_years: u64,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        tracing::info!(cert = %cert_path.display(), "--auto-tls: reusing the certificate");
        return Ok((cert_path, key_path));
    }
    if validity_years == 0 || validity_years > 1000 {
        return Err(TlsError::new(format!(
            "--self-signed-cert-validity must be between 1 and 1000 years, got {validity_years}"
        )));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                TlsError::new(format!("--auto-tls: cannot create {}: {e}", dir.display()))
            })?;
    }
    let gen_error = |e: rcgen::Error| TlsError::new(format!("--auto-tls: {e}"));
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "etcd");
    params.distinguished_name = dn;
    params.subject_alt_names = sans(listen_addr)?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    // `validity_years` is at most 1000: no overflow.
    params.not_after = now + time::Duration::days(365 * validity_years as i64);
    let mut serial = [0u8; 16];
    for b in serial.iter_mut() {
        *b = fastrand::u8(..);
    }
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    // Client auth too, so the proxy can present it to itself.
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().map_err(gen_error)?;
    let cert = params.self_signed(&key).map_err(gen_error)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_private(&cert_path, cert.pem().as_bytes())?;
    tracing::info!(cert = %cert_path.display(), validity_years, "--auto-tls: generated a self-signed certificate");
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| {
        TlsError::new(format!("--auto-tls: cannot write {}: {e}", path.display()))
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)
}

/// The subject alternative names for `--auto-tls`: the host of `--listen-addr`.
fn sans(listen_addr: &str) -> Result<Vec<rcgen::SanType>, TlsError> {
    let host = match listen_addr.rsplit_once(':') {
        Some((host, _)) => host,
        None => listen_addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut sans = Vec::new();
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => {
            sans.push(rcgen::SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
            sans.push(rcgen::SanType::IpAddress(IpAddr::from(
                std::net::Ipv6Addr::LOCALHOST,
            )));
            sans.push(dns("localhost")?);
        }
        Ok(ip) => sans.push(rcgen::SanType::IpAddress(ip)),
        Err(_) if host.is_empty() => sans.push(dns("localhost")?),
        Err(_) => sans.push(dns(host)?),
    }
    Ok(sans)
}

fn dns(name: &str) -> Result<rcgen::SanType, TlsError> {
    rcgen::string::Ia5String::try_from(name)
        .map(rcgen::SanType::DnsName)
        .map_err(|e| TlsError::new(format!("--auto-tls: host {name:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_suite_names() {
        let p = provider(&["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into()]).unwrap();
        let tls12: Vec<_> = p
            .cipher_suites
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS12)
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            tls12,
            [rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]
        );
        assert_eq!(
            p.cipher_suites.len(),
            4,
            "the three TLS 1.3 suites are kept"
        );
        let err = provider(&["TLS_NOPE".into()]).unwrap_err();
        assert_eq!(err.to_string(), "unexpected TLS cipher suite \"TLS_NOPE\"");
        // Known to Go but not to rustls: skipped, and an error when nothing is left.
        assert!(provider(&["TLS_RSA_WITH_AES_128_CBC_SHA".into()]).is_err());
        assert!(
            provider(&[
                "TLS_RSA_WITH_AES_128_CBC_SHA".into(),
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305".into()
            ])
            .is_ok()
        );
        assert_eq!(provider(&[]).unwrap().cipher_suites.len(), 9);
    }

    #[test]
    fn version_ranges() {
        assert_eq!(versions(None, None).unwrap().len(), 2);
        assert_eq!(
            versions(Some(Version::Tls13), None).unwrap(),
            [&rustls::version::TLS13]
        );
        assert_eq!(
            versions(None, Some(Version::Tls12)).unwrap(),
            [&rustls::version::TLS12]
        );
        assert!(versions(Some(Version::Tls13), Some(Version::Tls12)).is_err());
    }

    #[test]
    fn auto_tls_sans() {
        assert_eq!(sans("127.0.0.1:0").unwrap().len(), 1);
        assert_eq!(sans("0.0.0.0:2379").unwrap().len(), 3);
        assert_eq!(sans("[::1]:2379").unwrap().len(), 1);
        assert!(matches!(
            &sans("proxy.example:1").unwrap()[0],
            rcgen::SanType::DnsName(_)
        ));
    }

    #[test]
    fn self_cert_is_reused_and_loads() {
        let dir = std::env::temp_dir().join(format!("listen-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (cert, key) = self_cert(&dir, "127.0.0.1:0", 1).unwrap();
        let first = fs::read(&cert).unwrap();
        let (cert2, _) = self_cert(&dir, "127.0.0.1:0", 1).unwrap();
        assert_eq!(first, fs::read(cert2).unwrap());
        let opts = Options {
            cert_file: cert,
            key_file: key,
            ..Options::default()
        };
        build(&opts).unwrap();
        let _ = fs::remove_dir_all(&dir);
    }
}
