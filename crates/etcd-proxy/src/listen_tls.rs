//! `grpc-proxy start`'s TLS flags for clients of the proxy (`--cert-file`, `--key-file`,
//! `--trusted-ca-file`, `--client-crl-file`, `--listen-cipher-suites`, `--tls-min-version`,
//! `--tls-max-version`, `--auto-tls`, `--self-signed-cert-validity`, `--data-dir`) turned into
//! [`grpc_proxy::listen_tls::ListenTls`], as etcd's `startGRPCProxy` chooses: the given
//! certificate first, else with `--auto-tls` a self-signed one kept in
//! `<data-dir>/fixtures/proxy`, else plain text.

use std::path::{Path, PathBuf};

use grpc_proxy::listen_tls::{self, ListenTls, Options, Version};

use crate::ExitError;
use crate::cli::{GrpcProxyStartArgs, TlsVersion};

fn version(flag: &str, value: &str) -> Result<Option<Version>, ExitError> {
    match TlsVersion::parse(value) {
        Ok(TlsVersion::Default) => Ok(None),
        Ok(TlsVersion::Tls12) => Ok(Some(Version::Tls12)),
        Ok(TlsVersion::Tls13) => Ok(Some(Version::Tls13)),
        Err(e) => Err(ExitError::new(format!("{flag} is invalid: {e}"))),
    }
}

fn non_empty(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// The listener's TLS from the flags; `None` without `--cert-file`/`--key-file`/`--auto-tls`.
pub fn from_args(args: &GrpcProxyStartArgs) -> Result<Option<ListenTls>, ExitError> {
    let (cert_file, key_file) = if !args.cert_file.is_empty() || !args.key_file.is_empty() {
        if args.cert_file.is_empty() || args.key_file.is_empty() {
            return Err(ExitError::new(
                "--cert-file and --key-file must be given together",
            ));
        }
        (
            PathBuf::from(&args.cert_file),
            PathBuf::from(&args.key_file),
        )
    } else if args.auto_tls {
        let dir = Path::new(&args.data_dir).join("fixtures").join("proxy");
        listen_tls::self_cert(&dir, &args.listen_addr, args.self_signed_cert_validity)
            .map_err(|e| ExitError::new(e.to_string()))?
    } else {
        if !args.trusted_ca_file.is_empty() {
            return Err(ExitError::new(
                "--trusted-ca-file needs --cert-file and --key-file (or --auto-tls): \
                 client certificates can only be checked over TLS",
            ));
        }
        if !args.client_crl_file.is_empty() || !args.listen_cipher_suites.is_empty() {
            tracing::warn!(
                "--client-crl-file and --listen-cipher-suites are ignored without \
                 --cert-file/--key-file or --auto-tls: clients are served in plain text"
            );
        }
        return Ok(None);
    };
    let opts = Options {
        cert_file,
        key_file,
        trusted_ca_file: non_empty(&args.trusted_ca_file),
        client_crl_file: non_empty(&args.client_crl_file),
        cipher_suites: args.listen_cipher_suites.clone(),
        min_version: version("tls-min-version", &args.tls_min_version)?,
        max_version: version("tls-max-version", &args.tls_max_version)?,
    };
    let tls = listen_tls::build(&opts).map_err(|e| ExitError::new(e.to_string()))?;
    tracing::info!(
        "tls-info" = %format!(
            "cert = {}, key = {}, trusted-ca = {}, client-cert-auth = {}, crl-file = {}",
            opts.cert_file.display(),
            opts.key_file.display(),
            args.trusted_ca_file,
            opts.trusted_ca_file.is_some(),
            args.client_crl_file,
        ),
        "gRPC proxy server TLS"
    );
    Ok(Some(tls))
}
