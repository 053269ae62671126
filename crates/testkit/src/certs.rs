//! A throw-away certificate authority for TLS tests.
//!
//! Tests need a CA, server certificates with IP SANs, and client certificates, including ones with
//! an empty Common Name (etcd's grpc-proxy refuses a `--cert` with a CN, because etcd would take
//! the CN as the user of every proxied request). Everything is written as PEM files, since that is
//! what etcd, etcdctl and the proxy's flags take.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SerialNumber,
};

/// A certificate and its private key, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PKCS#8 PEM, ECDSA P-256).
    pub key: PathBuf,
}

/// A self-signed test CA that issues certificates into its directory.
pub struct Ca {
    dir: PathBuf,
    cert_path: PathBuf,
    key_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    next_serial: AtomicU64,
    /// Serial of every certificate issued, by certificate path, so [`Ca::crl`] can revoke them.
    serials: Mutex<HashMap<PathBuf, u64>>,
}

impl Ca {
    /// Creates a CA named `name` and writes `<dir>/<name>.pem` (and its key, `<dir>/<name>-key.pem`).
    ///
    /// # Panics
    ///
    /// If the key cannot be generated or the files cannot be written.
    pub fn new(dir: &Path, name: &str) -> Ca {
        fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create CA dir {}: {e}", dir.display()));
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(SerialNumber::from(1u64));
        let cert = params.self_signed(&key).expect("self-sign CA certificate");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        write(&cert_path, &cert.pem());
        write(&key_path, &key.serialize_pem());
        Ca {
            dir: dir.to_path_buf(),
            cert_path,
            key_path,
            issuer: Issuer::new(params, key),
            next_serial: AtomicU64::new(2),
            serials: Mutex::new(HashMap::new()),
        }
    }

    /// The CA certificate (PEM): the trust anchor to give `--trusted-ca-file`, `--cacert`.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The CA's private key (PEM).
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// Issues `<dir>/<name>.pem` + `<dir>/<name>-key.pem` for a server, with subject alternative
    /// names `sans` (an IP SAN when the string parses as an IP address, else a DNS SAN).
    ///
    /// The certificate is valid for both server and client authentication: etcd uses its
    /// server certificate as a client too (peer and gateway connections) and Go checks the
    /// extended key usage both ways.
    ///
    /// # Panics
    ///
    /// If a SAN is not a valid DNS name or IP, or the files cannot be written.
    pub fn server(&self, name: &str, sans: &[&str]) -> CertFiles {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans.clone())
            .unwrap_or_else(|e| panic!("invalid SANs {sans:?} for {name}: {e}"));
        params.distinguished_name = distinguished_name(name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(name, params)
    }

    /// Issues `<dir>/<name>.pem` + `<dir>/<name>-key.pem` for a client, with Common Name
    /// `common_name`.
    ///
    /// An empty `common_name` leaves the CN out of the subject altogether (the subject keeps an
    /// Organization so it is not empty), which is what etcd's "empty CN" checks look for.
    ///
    /// # Panics
    ///
    /// If the files cannot be written.
    pub fn client(&self, name: &str, common_name: &str) -> CertFiles {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(name, params)
    }

    /// Writes `<dir>/<name>.crl.pem`, a CRL signed by this CA revoking `revoked` (certificates
    /// issued by this CA), for `--client-crl-file`.
    ///
    /// # Panics
    ///
    /// If a certificate was not issued by this CA, or the file cannot be written.
    pub fn crl(&self, name: &str, revoked: &[&CertFiles]) -> PathBuf {
        let serials = self.serials.lock().expect("CA serials lock poisoned");
        let revoked_certs = revoked
            .iter()
            .map(|files| {
                let serial = serials.get(&files.cert).unwrap_or_else(|| {
                    panic!("{} was not issued by this CA", files.cert.display())
                });
                RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: rcgen::date_time_ymd(2020, 1, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                }
            })
            .collect();
        let params = CertificateRevocationListParams {
            // Fixed dates far on both sides of "now": validity windows are not under test.
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(4000, 1, 1),
            crl_number: SerialNumber::from(self.next_serial.fetch_add(1, Ordering::Relaxed)),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).expect("sign CRL");
        let path = self.dir.join(format!("{name}.crl.pem"));
        write(&path, &crl.pem().expect("encode CRL as PEM"));
        path
    }

    fn issue(&self, name: &str, mut params: CertificateParams) -> CertFiles {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        params.serial_number = Some(SerialNumber::from(serial));
        // Lets verifiers (rustls/webpki) find the issuer by key id, as real CAs do.
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate certificate key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("sign certificate {name}: {e}"));
        let files = CertFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        write(&files.cert, &cert.pem());
        write(&files.key, &key.serialize_pem());
        self.serials
            .lock()
            .expect("CA serials lock poisoned")
            .insert(files.cert.clone(), serial);
        files
    }
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// `O=etcd-proxy testkit` plus `CN=<common_name>` unless it is empty.
fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "etcd-proxy testkit");
    if !common_name.is_empty() {
        dn.push(DnType::CommonName, common_name);
    }
    dn
}

fn write(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
