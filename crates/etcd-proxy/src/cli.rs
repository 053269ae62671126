//! The command line, flag for flag the one of etcd 3.5's `gateway start` and `grpc-proxy start`
//! (cobra/pflag): same names, defaults and help texts; `--flag=value` and `--flag value`; bools as
//! `--x` or `--x=false`; comma-separated, repeatable string slices; Go durations and Go integer
//! syntax; cobra's help layout; exit 1 on bad input. Flags we add beyond etcd say so in their help.

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{
    Arg, ArgAction, ArgMatches, Args, Command, CommandFactory, FromArgMatches, Parser, Subcommand,
};

use crate::ExitError;
use crate::duration::GoDuration;
use crate::strconv;

/// The name the help and error texts use for the binary (cobra uses its root command's name, not
/// argv[0]).
pub const BIN: &str = "etcd-proxy";

/// What the command line asks for.
// Built once per process; boxing the big variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Invocation {
    /// `etcd-proxy gateway start ...`
    GatewayStart(GatewayStartArgs),
    /// `etcd-proxy grpc-proxy start ...`
    GrpcProxyStart(GrpcProxyStartArgs),
    /// `etcd-proxy bench put|range|watch|staleness ...`: run the load generator and print its report.
    Bench(bench::BenchArgs),
    /// `etcd-proxy version` or `etcd-proxy --version`: print [`crate::version::version_text`].
    Version,
    /// `--help`, or a command that needs a sub-command given none: print this to stdout, exit 0.
    Help(String),
}

/// Parses a full argv (program name first). Usage errors come back as an [`ExitError`] with code 1
/// whose message is cobra-like: `Error: unknown flag: --foo` and a hint line.
pub fn parse<I, T>(argv: I) -> Result<Invocation, ExitError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let cmd = command();
    let path = command_path(&cmd, &argv);
    let matches = match cmd.clone().try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) => return clap_error(e, &path),
    };
    let cli = Cli::from_arg_matches(&matches).map_err(|e| usage_error(&e.to_string(), &path))?;
    if cli.version {
        return Ok(Invocation::Version);
    }
    match cli.command {
        None => Ok(Invocation::Help(help_for(&[]))),
        Some(TopCommand::Version) => Ok(Invocation::Version),
        Some(TopCommand::Bench(args)) => Ok(Invocation::Bench(args)),
        Some(TopCommand::Gateway(GatewayCommand { command: None })) => {
            Ok(Invocation::Help(help_for(&["gateway"])))
        }
        Some(TopCommand::GrpcProxy(GrpcProxyCommand { command: None })) => {
            Ok(Invocation::Help(help_for(&["grpc-proxy"])))
        }
        Some(TopCommand::Gateway(GatewayCommand {
            command: Some(GatewaySubcommand::Start(mut args)),
        })) => {
            if let Some(m) = leaf_matches(&matches, &["gateway", "start"]) {
                args.endpoints = string_slice(m, "endpoints");
            }
            Ok(Invocation::GatewayStart(args))
        }
        Some(TopCommand::GrpcProxy(GrpcProxyCommand {
            command: Some(GrpcProxySubcommand::Start(mut args)),
        })) => {
            if let Some(m) = leaf_matches(&matches, &["grpc-proxy", "start"]) {
                args.endpoints = string_slice(m, "endpoints");
                args.listen_cipher_suites = string_slice(m, "listen_cipher_suites");
            }
            args.validate()?;
            Ok(Invocation::GrpcProxyStart(args))
        }
    }
}

/// The root command, clap-derived, then adjusted to behave and print like cobra/pflag.
pub fn command() -> Command {
    prepare(Cli::command(), BIN)
}

/// The help text of the command at `path` below the root (`&[]` for the root itself).
pub fn help_for(path: &[&str]) -> String {
    let mut cmd = command();
    for name in path {
        match cmd.find_subcommand(name) {
            Some(sub) => cmd = sub.clone(),
            None => break,
        }
    }
    cmd.render_help().to_string()
}

// ---------------------------------------------------------------------------------------------
// The command tree.

#[derive(Parser, Debug)]
#[command(
    name = "etcd-proxy",
    about = "Drop-in, faster and more correct replacements for etcd's gateway and gRPC proxy",
    disable_version_flag = true,
    disable_help_subcommand = true
)]
struct Cli {
    #[arg(long, help = "print the version and exit")]
    version: bool,
    #[command(subcommand)]
    command: Option<TopCommand>,
}

// Built once per process, like Invocation.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum TopCommand {
    #[command(about = "gateway related command")]
    Gateway(GatewayCommand),
    #[command(name = "grpc-proxy", about = "grpc-proxy related command")]
    GrpcProxy(GrpcProxyCommand),
    #[command(
        about = "benchmark etcd: bench put|range|watch|staleness [flags] (as etcd's tools/benchmark)"
    )]
    Bench(bench::BenchArgs),
    #[command(about = "print the version")]
    Version,
}

#[derive(Args, Debug)]
struct GatewayCommand {
    #[command(subcommand)]
    command: Option<GatewaySubcommand>,
}

#[derive(Subcommand, Debug)]
enum GatewaySubcommand {
    #[command(about = "start the gateway")]
    Start(GatewayStartArgs),
}

#[derive(Args, Debug)]
struct GrpcProxyCommand {
    #[command(subcommand)]
    command: Option<GrpcProxySubcommand>,
}

#[derive(Subcommand, Debug)]
enum GrpcProxySubcommand {
    #[command(about = "start the grpc proxy")]
    Start(GrpcProxyStartArgs),
}

// Value parsers with Go's syntax and messages. Durations use GoDuration's FromStr.

fn go_bool(s: &str) -> Result<bool, strconv::NumError> {
    strconv::parse_bool(s)
}

fn go_int(s: &str) -> Result<i64, strconv::NumError> {
    strconv::parse_int(s)
}

fn go_uint(s: &str) -> Result<u64, strconv::NumError> {
    strconv::parse_uint(s)
}

fn go_uint32(s: &str) -> Result<u32, strconv::NumError> {
    strconv::parse_uint32(s)
}

/// Flags of `etcd-proxy gateway start`: etcd's `gateway start` flags, then ours.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct GatewayStartArgs {
    /// `--listen-addr`: where the gateway accepts client connections (`host:port`).
    #[arg(
        long,
        value_name = "string",
        default_value = "127.0.0.1:23790",
        help = "listen address"
    )]
    pub listen_addr: String,

    /// `--endpoints`: the etcd members to forward to; a scheme (`http://`) is allowed and stripped
    /// by the gateway. `--endpoints=""` gives an empty list, as pflag does.
    #[arg(
        long,
        value_name = "strings",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        help = "comma separated etcd cluster endpoints"
    )]
    pub endpoints: Vec<String>,

    /// `--retry-delay`: how long a member that failed a dial stays out of rotation before it is
    /// probed again (etcd's tcpproxy `MonitorInterval`).
    #[arg(
        long,
        value_name = "duration",
        default_value = "1m0s",
        help = "duration of delay before retrying failed endpoints"
    )]
    pub retry_delay: GoDuration,

    /// `--discovery-srv`: DNS domain whose `_etcd-client[-ssl]._tcp` SRV records give the members;
    /// empty disables discovery.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "DNS domain used to bootstrap initial cluster"
    )]
    pub discovery_srv: String,

    /// `--discovery-srv-name`: suffix of the SRV service name (`_etcd-client-<name>._tcp`).
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "service name to query when using DNS discovery"
    )]
    pub discovery_srv_name: String,

    /// `--insecure-discovery`: use discovered `http` members and skip validating `https` ones.
    #[arg(
        long,
        value_name = "bool",
        action = ArgAction::Set,
        value_parser = go_bool,
        default_value = "false",
        help = "accept insecure SRV records"
    )]
    pub insecure_discovery: bool,

    /// `--trusted-ca-file`: CA bundle used when validating discovered SRV endpoints.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "path to the client server TLS CA file for verifying the discovered endpoints when discovery-srv is provided."
    )]
    pub trusted_ca_file: String,

    /// `--metrics-addr` (etcd-proxy only): where to serve Prometheus `/metrics`, as `host:port` or
    /// `http://host:port`; empty serves none.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "etcd-proxy only: serve /metrics on this address (host:port or http://host:port; empty disables)"
    )]
    pub metrics_addr: String,

    /// `--dial-timeout` (etcd-proxy only): how long a connect to a member may take before the next
    /// member is tried (etcd has no timeout here).
    #[arg(
        long,
        value_name = "duration",
        default_value = "5s",
        help = "etcd-proxy only: timeout to connect to a member"
    )]
    pub dial_timeout: GoDuration,

    /// `--health-check-interval` (etcd-proxy only): how often active members are probed so dead ones
    /// are skipped before a client hits them; 0 disables probing (etcd's behaviour).
    #[arg(
        long,
        value_name = "duration",
        default_value = "5s",
        help = "etcd-proxy only: interval of health probes of active members, so dead ones are skipped (0 disables)"
    )]
    pub health_check_interval: GoDuration,

    /// `--drain-timeout` (etcd-proxy only): after SIGTERM or SIGINT, how long open connections may
    /// go on before they are closed.
    #[arg(
        long,
        value_name = "duration",
        default_value = "10s",
        help = "etcd-proxy only: how long open connections may finish after SIGTERM or SIGINT"
    )]
    pub drain_timeout: GoDuration,

    /// `--discovery-dns-server` (etcd-proxy only): `IP:PORT` of the only DNS server to ask for SRV
    /// records; empty uses the system resolver (tests point it at a loopback DNS server).
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "etcd-proxy only: DNS server (IP:PORT) to ask for SRV records instead of the system resolver"
    )]
    pub discovery_dns_server: String,
}

impl Default for GatewayStartArgs {
    /// Every flag at its default, as `etcd-proxy gateway start` with no flags gives.
    fn default() -> Self {
        match parse([BIN, "gateway", "start"]) {
            Ok(Invocation::GatewayStart(args)) => args,
            // Invariant: every default above is a valid value (test `defaults_parse` checks it).
            other => unreachable!("gateway start defaults do not parse: {other:?}"),
        }
    }
}

/// Flags of `etcd-proxy grpc-proxy start`: every flag of etcd 3.5's `grpc-proxy start`.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct GrpcProxyStartArgs {
    /// `--listen-addr`: the one port serving gRPC and HTTP to clients.
    #[arg(
        long,
        value_name = "string",
        default_value = "127.0.0.1:23790",
        help = "listen address"
    )]
    pub listen_addr: String,

    /// `--discovery-srv`: domain whose SRV records describe the cluster's client endpoints.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "domain name to query for SRV records describing cluster endpoints"
    )]
    pub discovery_srv: String,

    /// `--discovery-srv-name`: suffix of the SRV service name.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "service name to query when using DNS discovery"
    )]
    pub discovery_srv_name: String,

    /// `--metrics-addr`: an extra listener URL (with scheme) for `/metrics` and `/health`.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "listen for endpoint /metrics requests on an additional interface"
    )]
    pub metrics_addr: String,

    /// `--insecure-discovery`: accept discovered endpoints without TLS validation.
    #[arg(
        long,
        value_name = "bool",
        action = ArgAction::Set,
        value_parser = go_bool,
        default_value = "false",
        help = "accept insecure SRV records"
    )]
    pub insecure_discovery: bool,

    /// `--endpoints`: the etcd members the proxy's backend client uses.
    #[arg(
        long,
        value_name = "strings",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        help = "comma separated etcd cluster endpoints"
    )]
    pub endpoints: Vec<String>,

    /// `--endpoints-auto-sync-interval`: how often the member list refreshes the endpoints; 0 never.
    #[arg(
        long,
        value_name = "duration",
        default_value = "0s",
        help = "etcd endpoints auto sync interval (disabled by default)"
    )]
    pub endpoints_auto_sync_interval: GoDuration,

    /// `--dial-keepalive-time`: client-side keepalive ping interval towards etcd; 0 disables.
    #[arg(
        long,
        value_name = "duration",
        default_value = "0s",
        help = "keepalive time for client(grpc-proxy) connections (default 0, disable)."
    )]
    pub dial_keepalive_time: GoDuration,

    /// `--dial-keepalive-timeout`: client-side keepalive timeout towards etcd.
    #[arg(
        long,
        value_name = "duration",
        default_value = "20s",
        help = "keepalive timeout for client(grpc-proxy) connections (default 20s)."
    )]
    pub dial_keepalive_timeout: GoDuration,

    /// `--permit-without-stream`: send client keepalive pings to etcd even with no active RPC.
    #[arg(
        long,
        value_name = "bool",
        action = ArgAction::Set,
        value_parser = go_bool,
        default_value = "false",
        help = "Enable client(grpc-proxy) to send keepalive pings even with no active RPCs."
    )]
    pub permit_without_stream: bool,

    /// `--advertise-client-url`: the proxy's own address for MemberList, registration and the
    /// `/proxy/health` self-check; empty passes MemberList through.
    #[arg(
        long,
        value_name = "string",
        default_value = "127.0.0.1:23790",
        help = "advertise address to register (must be reachable by client)"
    )]
    pub advertise_client_url: String,

    /// `--resolver-prefix`: key prefix under which the proxy registers itself (needs
    /// `--resolver-ttl`).
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "prefix to use for registering proxy (must be shared with other grpc-proxy members)"
    )]
    pub resolver_prefix: String,

    /// `--resolver-ttl`: TTL in seconds of the registration lease.
    #[arg(
        long,
        value_name = "int",
        value_parser = go_int,
        default_value = "0",
        help = "specify TTL, in seconds, when registering proxy endpoints"
    )]
    pub resolver_ttl: i64,

    /// `--namespace`: prefix added to every key of every request.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "string to prefix to all keys for namespacing requests"
    )]
    pub namespace: String,

    /// `--enable-pprof`: etcd serves Go's `/debug/pprof/` on the client port.
    #[arg(
        long,
        value_name = "bool",
        action = ArgAction::Set,
        value_parser = go_bool,
        default_value = "false",
        help = "Enable runtime profiling data via HTTP server. Address is at client URL + \"/debug/pprof/\""
    )]
    pub enable_pprof: bool,

    /// `--data-dir`: where `--auto-tls` keeps its generated certificates (`<dir>/fixtures/proxy`).
    #[arg(
        long,
        value_name = "string",
        default_value = "default.proxy",
        help = "Data directory for persistent data"
    )]
    pub data_dir: String,

    /// `--max-send-bytes`: largest message the proxy sends to etcd; values <= 0 keep the default.
    #[arg(
        long,
        value_name = "int",
        value_parser = go_int,
        default_value = "1572864",
        help = "message send limits in bytes (default value is 1.5 MiB)"
    )]
    pub max_send_bytes: i64,

    /// `--max-recv-bytes`: largest message the proxy accepts from etcd; values <= 0 keep the default.
    #[arg(
        long,
        value_name = "int",
        value_parser = go_int,
        default_value = "2147483647",
        help = "message receive limits in bytes (default value is math.MaxInt32)"
    )]
    pub max_recv_bytes: i64,

    /// `--grpc-keepalive-min-time`: clients pinging more often than this get GOAWAY.
    #[arg(
        long,
        value_name = "duration",
        default_value = "5s",
        help = "Minimum interval duration that a client should wait before pinging proxy."
    )]
    pub grpc_keepalive_min_time: GoDuration,

    /// `--grpc-keepalive-interval`: server-to-client ping interval; 0 disables.
    #[arg(
        long,
        value_name = "duration",
        default_value = "2h0m0s",
        help = "Frequency duration of server-to-client ping to check if a connection is alive (0 to disable)."
    )]
    pub grpc_keepalive_interval: GoDuration,

    /// `--grpc-keepalive-timeout`: how long an unanswered server ping waits before closing; 0
    /// disables.
    #[arg(
        long,
        value_name = "duration",
        default_value = "20s",
        help = "Additional duration of wait before closing a non-responsive connection (0 to disable)."
    )]
    pub grpc_keepalive_timeout: GoDuration,

    /// `--cert`: client certificate for TLS to etcd (must have an empty CN in etcd).
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "identify secure connections with etcd servers using this TLS certificate file"
    )]
    pub cert: String,

    /// `--key`: client key for TLS to etcd.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "identify secure connections with etcd servers using this TLS key file"
    )]
    pub key: String,

    /// `--cacert`: CA bundle to verify etcd's server certificates.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "verify certificates of TLS-enabled secure etcd servers using this CA bundle"
    )]
    pub cacert: String,

    /// `--insecure-skip-tls-verify`: do not verify etcd's server certificates.
    #[arg(
        long,
        value_name = "bool",
        action = ArgAction::Set,
        value_parser = go_bool,
        default_value = "false",
        help = "skip authentication of etcd server TLS certificates (CAUTION: this option should be enabled only for testing purposes)"
    )]
    pub insecure_skip_tls_verify: bool,

    /// `--cert-file`: the proxy's serving certificate.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "identify secure connections to the proxy using this TLS certificate file"
    )]
    pub cert_file: String,

    /// `--key-file`: the proxy's serving key.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "identify secure connections to the proxy using this TLS key file"
    )]
    pub key_file: String,

    /// `--trusted-ca-file`: when set, clients must present a certificate signed by this CA.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "verify certificates of TLS-enabled secure proxy using this CA bundle"
    )]
    pub trusted_ca_file: String,

    /// `--listen-cipher-suites`: TLS cipher suites offered to clients; empty uses the defaults.
    #[arg(
        long,
        value_name = "strings",
        value_delimiter = ',',
        help = "Comma-separated list of supported TLS cipher suites between client/proxy (empty will be auto-populated by Go)."
    )]
    pub listen_cipher_suites: Vec<String>,

    /// `--auto-tls`: serve TLS with a generated self-signed certificate when no `--cert-file`.
    #[arg(
        long,
        value_name = "bool",
        action = ArgAction::Set,
        value_parser = go_bool,
        default_value = "false",
        help = "proxy TLS using generated certificates"
    )]
    pub auto_tls: bool,

    /// `--client-crl-file`: certificate revocation list checked on every client handshake.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "proxy client certificate revocation list file."
    )]
    pub client_crl_file: String,

    /// `--self-signed-cert-validity`: validity in years of `--auto-tls` certificates; 0 is rejected
    /// with `--auto-tls`.
    #[arg(
        long,
        value_name = "uint",
        value_parser = go_uint,
        default_value = "1",
        help = "The validity period of the proxy certificates, unit is year"
    )]
    pub self_signed_cert_validity: u64,

    /// `--tls-min-version`: lowest TLS version offered to clients: `TLS1.2` or `TLS1.3`.
    #[arg(
        long,
        value_name = "string",
        default_value = "TLS1.2",
        help = "Minimum TLS version supported by grpc proxy. Possible values: TLS1.2, TLS1.3."
    )]
    pub tls_min_version: String,

    /// `--tls-max-version`: highest TLS version offered to clients: `TLS1.2`, `TLS1.3`, or empty for
    /// the library's highest.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "Maximum TLS version supported by grpc proxy. Possible values: TLS1.2, TLS1.3 (empty defers to Go)."
    )]
    pub tls_max_version: String,

    /// `--experimental-serializable-ordering`: keep serializable reads' revisions monotonic across
    /// endpoints.
    #[arg(
        long,
        value_name = "bool",
        action = ArgAction::Set,
        value_parser = go_bool,
        default_value = "false",
        help = "Ensure serializable reads have monotonically increasing store revisions across endpoints."
    )]
    pub experimental_serializable_ordering: bool,

    /// `--experimental-leasing-prefix`: key prefix for leasing metadata (disconnected linearized
    /// reads).
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "leasing metadata prefix for disconnected linearized reads."
    )]
    pub experimental_leasing_prefix: String,

    /// `--range-cache-max-entries` (not in etcd, whose cache holds 2048 entries): most
    /// serializable Range answers the range cache holds.
    #[arg(
        long,
        value_name = "int",
        value_parser = go_int,
        default_value = "2048",
        help = "Maximum number of serializable Range responses held by the range cache (least recently used evicted first)."
    )]
    pub range_cache_max_entries: i64,

    /// `--range-cache-max-bytes` (not in etcd): most bytes the range cache holds.
    #[arg(
        long,
        value_name = "int",
        value_parser = go_int,
        default_value = "67108864",
        help = "Maximum bytes held by the range cache; a larger response is never cached."
    )]
    pub range_cache_max_bytes: i64,

    /// `--disable-range-cache` (not in etcd): send every Range to etcd.
    #[arg(
        long,
        value_name = "bool",
        action = ArgAction::Set,
        value_parser = go_bool,
        default_value = "false",
        help = "Disable the range cache: every Range request goes to etcd."
    )]
    pub disable_range_cache: bool,

    /// `--discovery-dns-server` (not in etcd): `IP:PORT` of the only DNS server to ask for the
    /// SRV records and member names of `--discovery-srv`; empty uses the system resolver.
    #[arg(
        long,
        value_name = "string",
        default_value = "",
        help = "etcd-proxy only: DNS server (IP:PORT) to ask for SRV records instead of the system resolver"
    )]
    pub discovery_dns_server: String,

    /// `--debug`: log at debug level.
    #[arg(
        long,
        value_name = "bool",
        action = ArgAction::Set,
        value_parser = go_bool,
        default_value = "false",
        help = "Enable debug-level logging for grpc-proxy."
    )]
    pub debug: bool,

    /// `--max-concurrent-streams`: HTTP/2 streams each client may have open at once.
    #[arg(
        long,
        value_name = "uint32",
        value_parser = go_uint32,
        default_value = "4294967295",
        help = "Maximum concurrent streams that each client can open at a time."
    )]
    pub max_concurrent_streams: u32,
}

impl Default for GrpcProxyStartArgs {
    /// Every flag at its default, as `etcd-proxy grpc-proxy start` with no flags gives.
    fn default() -> Self {
        match parse([BIN, "grpc-proxy", "start"]) {
            Ok(Invocation::GrpcProxyStart(args)) => args,
            // Invariant: every default above is valid (test `defaults_parse` checks it).
            other => unreachable!("grpc-proxy start defaults do not parse: {other:?}"),
        }
    }
}

/// A TLS version as `--tls-min-version`/`--tls-max-version` name it (etcd's `tlsutil.GetTLSVersion`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// `""`: let the TLS library choose.
    Default,
    /// `TLS1.2`
    Tls12,
    /// `TLS1.3`
    Tls13,
}

impl TlsVersion {
    /// Parses `TLS1.2`, `TLS1.3` or `""`, with etcd's error text.
    pub fn parse(s: &str) -> Result<TlsVersion, String> {
        match s {
            "" => Ok(TlsVersion::Default),
            "TLS1.2" => Ok(TlsVersion::Tls12),
            "TLS1.3" => Ok(TlsVersion::Tls13),
            _ => Err(format!(
                "unexpected TLS version {} (must be one of: TLS1.2, TLS1.3)",
                strconv::quote(s)
            )),
        }
    }
}

impl GrpcProxyStartArgs {
    /// etcd's `checkArgs`: combinations of flags that etcd rejects before starting, with its
    /// messages (printed to stderr, exit 1).
    pub fn validate(&self) -> Result<(), ExitError> {
        if !self.resolver_prefix.is_empty() && self.resolver_ttl < 1 {
            return Err(ExitError::new(format!(
                "invalid resolver-ttl {}",
                self.resolver_ttl
            )));
        }
        if self.resolver_prefix.is_empty() && self.resolver_ttl > 0 {
            return Err(ExitError::new(format!(
                "invalid resolver-prefix {}",
                strconv::quote(&self.resolver_prefix)
            )));
        }
        if !self.resolver_prefix.is_empty()
            && self.resolver_ttl > 0
            && self.advertise_client_url.is_empty()
        {
            return Err(ExitError::new(format!(
                "invalid advertise-client-url {}",
                strconv::quote(&self.advertise_client_url)
            )));
        }
        if self.auto_tls && self.self_signed_cert_validity == 0 {
            return Err(ExitError::new(
                "selfSignedCertValidity is invalid,it should be greater than 0",
            ));
        }
        let min = TlsVersion::parse(&self.tls_min_version)
            .map_err(|e| ExitError::new(format!("tls-min-version is invalid: {e}")))?;
        let max = TlsVersion::parse(&self.tls_max_version)
            .map_err(|e| ExitError::new(format!("tls-max-version is invalid: {e}")))?;
        if max != TlsVersion::Default && min > max {
            return Err(ExitError::new(format!(
                "min version ({}) is greater than max version ({})",
                self.tls_min_version, self.tls_max_version
            )));
        }
        if min == TlsVersion::Tls13 && !self.listen_cipher_suites.is_empty() {
            return Err(ExitError::new(
                "cipher suites cannot be configured when only TLS1.3 is enabled",
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Making clap behave like cobra/pflag.

/// Adjusts a derived command and its sub-commands: cobra's `-h, --help` flag, pflag's bool and
/// value syntax, last-one-wins for repeated flags, and cobra's help text as a static template.
fn prepare(mut cmd: Command, path: &str) -> Command {
    let name = cmd.get_name().to_string();
    cmd = cmd
        .disable_help_flag(true)
        .arg(
            Arg::new("help")
                .short('h')
                .long("help")
                .action(ArgAction::Help)
                .help(format!("help for {name}")),
        )
        .mut_args(pflag_syntax);
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for sub in &subs {
        let sub_path = format!("{path} {sub}");
        cmd = cmd.mut_subcommand(sub, |s| prepare(s, &sub_path));
    }
    if subs.is_empty() {
        // pflag: a repeated flag overrides the earlier one (slices append instead).
        cmd = cmd.args_override_self(true);
    }
    let help = render_help(&cmd, path);
    cmd.help_template(help)
}

/// pflag's value syntax for one flag: bools take no separate value (`--x`, `--x=false`), and a
/// value may start with `-` (`--retry-delay -1s`, as pflag takes the next word whatever it is).
fn pflag_syntax(arg: Arg) -> Arg {
    if is_bool(&arg) {
        arg.num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true")
    } else if arg.get_action().takes_values() {
        arg.allow_hyphen_values(true)
    } else {
        arg
    }
}

fn is_bool(arg: &Arg) -> bool {
    type_word(arg) == Some("bool")
}

/// pflag's type word shown after the flag name (`string`, `strings`, `duration`, ...).
fn type_word(arg: &Arg) -> Option<&str> {
    if !arg.get_action().takes_values() {
        return None;
    }
    arg.get_value_names()
        .and_then(|names| names.first())
        .map(|n| n.as_str())
}

/// The sub-command path argv selects, e.g. `etcd-proxy gateway start`, for messages.
fn command_path(root: &Command, argv: &[OsString]) -> String {
    let mut path = BIN.to_string();
    let mut cmd = root;
    for word in argv.iter().skip(1) {
        let Some(word) = word.to_str() else { break };
        if word.starts_with('-') {
            continue;
        }
        match cmd.find_subcommand(word) {
            Some(sub) => {
                path.push(' ');
                path.push_str(sub.get_name());
                cmd = sub;
            }
            None => break,
        }
    }
    path
}

/// The matches of the sub-command at `path`.
fn leaf_matches<'a>(matches: &'a ArgMatches, path: &[&str]) -> Option<&'a ArgMatches> {
    let mut m = matches;
    for name in path {
        m = match m.subcommand() {
            Some((n, sub)) if n == *name => sub,
            _ => return None,
        };
    }
    Some(m)
}

/// A pflag string slice from its occurrences: values split at commas; the first occurrence
/// replaces the default, later ones append; an empty occurrence (`--endpoints=`) adds nothing.
fn string_slice(m: &ArgMatches, id: &str) -> Vec<String> {
    let Ok(Some(occurrences)) = m.try_get_occurrences::<String>(id) else {
        return Vec::new();
    };
    occurrences
        .flat_map(|occ| {
            let values: Vec<&String> = occ.collect();
            if values.len() == 1 && values[0].is_empty() {
                Vec::new()
            } else {
                values.into_iter().cloned().collect()
            }
        })
        .collect()
}

fn context_str(err: &clap::Error, kind: ContextKind) -> Option<String> {
    match err.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => v.first().cloned(),
        _ => None,
    }
}

/// `--retry-delay <duration>` or `--debug[=<bool>]` to `--retry-delay` / `--debug`.
fn flag_name(rendered: &str) -> &str {
    rendered.split([' ', '=', '[']).next().unwrap_or(rendered)
}

fn usage_error(message: &str, path: &str) -> ExitError {
    ExitError::new(format!("Error: {message}\nRun '{path} --help' for usage."))
}

/// Turns clap's outcome into help text or a cobra-worded error.
fn clap_error(err: clap::Error, path: &str) -> Result<Invocation, ExitError> {
    let arg = context_str(&err, ContextKind::InvalidArg);
    let value = context_str(&err, ContextKind::InvalidValue);
    let message = match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            return Ok(Invocation::Help(err.render().to_string()));
        }
        ErrorKind::DisplayVersion => return Ok(Invocation::Version),
        ErrorKind::UnknownArgument => match arg.as_deref() {
            Some(a) if a.starts_with("--") => {
                format!("unknown flag: {}", a.split('=').next().unwrap_or(a))
            }
            Some(a) if a.starts_with('-') && a.len() > 1 => {
                let short = a.chars().nth(1).unwrap_or('-');
                format!("unknown shorthand flag: '{short}' in {a}")
            }
            Some(a) => format!(
                "unexpected argument {} for {}",
                strconv::quote(a),
                strconv::quote(path)
            ),
            None => first_line(&err),
        },
        ErrorKind::InvalidSubcommand => match context_str(&err, ContextKind::InvalidSubcommand) {
            Some(a) => format!(
                "unknown command {} for {}",
                strconv::quote(&a),
                strconv::quote(path)
            ),
            None => first_line(&err),
        },
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            let flag = arg.as_deref().map(flag_name).unwrap_or("?").to_string();
            match (value, std::error::Error::source(&err)) {
                (Some(v), Some(source)) => format!(
                    "invalid argument {} for {} flag: {}",
                    strconv::quote(&v),
                    strconv::quote(&flag),
                    source
                ),
                (Some(v), None) if !v.is_empty() => format!(
                    "invalid argument {} for {} flag",
                    strconv::quote(&v),
                    strconv::quote(&flag)
                ),
                _ => format!("flag needs an argument: {flag}"),
            }
        }
        _ => first_line(&err),
    };
    Err(usage_error(&message, path))
}

/// clap's own message, first line, without its `error: ` prefix.
fn first_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let line = rendered.lines().next().unwrap_or("invalid arguments");
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

// ---------------------------------------------------------------------------------------------
// cobra's help layout.

/// cobra's help for one command: its short description, `Usage:`, `Available Commands:` for a
/// command with sub-commands, and `Flags:` laid out as pflag's `FlagUsages` does.
fn render_help(cmd: &Command, path: &str) -> String {
    let mut out = String::new();
    if let Some(about) = cmd.get_about() {
        out.push_str(about.to_string().trim_end());
        out.push_str("\n\n");
    }
    let subs: Vec<&Command> = cmd.get_subcommands().filter(|s| !s.is_hide_set()).collect();
    out.push_str("Usage:\n");
    if subs.is_empty() {
        out.push_str(&format!("  {path} [flags]\n"));
    } else {
        out.push_str(&format!("  {path} [command]\n"));
        out.push_str("\nAvailable Commands:\n");
        // cobra pads command names to the longest, and to at least 11.
        let pad = subs
            .iter()
            .map(|s| s.get_name().len())
            .max()
            .unwrap_or(0)
            .max(11);
        for sub in &subs {
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            out.push_str(&format!("  {:<pad$} {about}\n", sub.get_name()));
        }
    }
    out.push_str("\nFlags:\n");
    out.push_str(&flag_usages(cmd));
    if !subs.is_empty() {
        out.push_str(&format!(
            "\nUse \"{path} [command] --help\" for more information about a command.\n"
        ));
    }
    out
}

/// pflag's `FlagUsages`: flags sorted by name; `  -h, --name type` or `      --name type`; the
/// usage column three spaces past the longest such prefix; `(default ...)` unless the default is
/// the type's zero value, quoted for strings and bracketed for slices.
fn flag_usages(cmd: &Command) -> String {
    let mut args: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_long().is_some())
        .collect();
    args.sort_by_key(|a| a.get_long());

    let rows: Vec<(String, String)> = args
        .iter()
        .map(|a| {
            let long = a.get_long().unwrap_or_default();
            let mut left = match a.get_short() {
                Some(s) => format!("  -{s}, --{long}"),
                None => format!("      --{long}"),
            };
            if let Some(word) = type_word(a).filter(|w| *w != "bool") {
                left.push(' ');
                left.push_str(word);
            }
            let mut usage = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            if let Some(default) = default_text(a) {
                usage.push_str(&format!(" (default {default})"));
            }
            (left, usage)
        })
        .collect();

    // pflag measures the prefix plus a separator byte, then prints one space on each side of
    // the padding: the longest prefix is followed by three spaces.
    let width = rows.iter().map(|(l, _)| l.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (left, usage) in rows {
        let line = format!("{left} {:pad$} {usage}", "", pad = width - left.len());
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `(default ...)` text pflag prints, or `None` when the default is the zero value.
fn default_text(arg: &Arg) -> Option<String> {
    let word = type_word(arg)?;
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    match word {
        "bool" => None,
        "strings" => (!defaults.is_empty()).then(|| format!("[{}]", defaults.join(","))),
        _ => {
            let d = defaults.first()?;
            if d.is_empty() || d == "0" || d == "0s" {
                None
            } else if word == "string" {
                Some(strconv::quote(d))
            } else {
                Some(d.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(flags: &[&str]) -> Result<GatewayStartArgs, ExitError> {
        let argv = [BIN, "gateway", "start"].iter().chain(flags).copied();
        match parse(argv)? {
            Invocation::GatewayStart(args) => Ok(args),
            other => panic!("expected gateway start, got {other:?}"),
        }
    }

    fn proxy(flags: &[&str]) -> Result<GrpcProxyStartArgs, ExitError> {
        let argv = [BIN, "grpc-proxy", "start"].iter().chain(flags).copied();
        match parse(argv)? {
            Invocation::GrpcProxyStart(args) => Ok(args),
            other => panic!("expected grpc-proxy start, got {other:?}"),
        }
    }

    fn err(argv: &[&str]) -> String {
        match parse(argv.iter().copied()) {
            Err(e) => {
                assert_eq!(e.code, 1);
                e.message
            }
            Ok(other) => panic!("expected an error for {argv:?}, got {other:?}"),
        }
    }

    #[test]
    fn clap_tree_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn defaults_parse() {
        let g = GatewayStartArgs::default();
        assert_eq!(g.listen_addr, "127.0.0.1:23790");
        assert_eq!(g.endpoints, ["127.0.0.1:2379"]);
        assert_eq!(g.retry_delay, GoDuration::from_secs(60));
        assert_eq!(g.discovery_srv, "");
        assert_eq!(g.discovery_srv_name, "");
        assert!(!g.insecure_discovery);
        assert_eq!(g.trusted_ca_file, "");
        assert_eq!(g.metrics_addr, "");
        assert_eq!(g.dial_timeout, GoDuration::from_secs(5));
        assert_eq!(g.health_check_interval, GoDuration::from_secs(5));
        assert_eq!(g.drain_timeout, GoDuration::from_secs(10));
        assert_eq!(g.discovery_dns_server, "");

        let p = GrpcProxyStartArgs::default();
        assert_eq!(p.listen_addr, "127.0.0.1:23790");
        assert_eq!(p.advertise_client_url, "127.0.0.1:23790");
        assert_eq!(p.endpoints, ["127.0.0.1:2379"]);
        assert_eq!(p.data_dir, "default.proxy");
        assert_eq!(p.max_send_bytes, 1_572_864);
        assert_eq!(p.max_recv_bytes, i64::from(i32::MAX));
        assert_eq!(p.max_concurrent_streams, u32::MAX);
        assert_eq!(p.self_signed_cert_validity, 1);
        assert_eq!(p.resolver_ttl, 0);
        assert_eq!(p.grpc_keepalive_min_time, GoDuration::from_secs(5));
        assert_eq!(p.grpc_keepalive_interval, GoDuration::from_secs(7200));
        assert_eq!(p.grpc_keepalive_timeout, GoDuration::from_secs(20));
        assert_eq!(p.dial_keepalive_time, GoDuration::ZERO);
        assert_eq!(p.dial_keepalive_timeout, GoDuration::from_secs(20));
        assert_eq!(p.endpoints_auto_sync_interval, GoDuration::ZERO);
        assert_eq!(p.tls_min_version, "TLS1.2");
        assert_eq!(p.tls_max_version, "");
        assert!(p.listen_cipher_suites.is_empty());
        assert!(!p.debug && !p.auto_tls && !p.enable_pprof && !p.permit_without_stream);
        assert!(!p.insecure_discovery && !p.insecure_skip_tls_verify);
        assert!(!p.experimental_serializable_ordering);
        assert_eq!(p.range_cache_max_entries, 2048);
        assert_eq!(p.range_cache_max_bytes, 64 << 20);
        assert!(!p.disable_range_cache);
        assert_eq!(p.discovery_dns_server, "");
    }

    #[test]
    fn values_with_equals_or_separate() {
        let g = gateway(&["--listen-addr=127.0.0.1:1", "--retry-delay", "1.5s"]).expect("parses");
        assert_eq!(g.listen_addr, "127.0.0.1:1");
        assert_eq!(g.retry_delay, GoDuration::from_millis(1500));
        let g = gateway(&["--listen-addr", "127.0.0.1:2", "--retry-delay=-1s"]).expect("parses");
        assert_eq!(g.listen_addr, "127.0.0.1:2");
        assert_eq!(g.retry_delay, GoDuration::from_secs(-1));
        let g = gateway(&["--retry-delay", "-1s"]).expect("a value may start with '-'");
        assert_eq!(g.retry_delay, GoDuration::from_secs(-1));
    }

    #[test]
    fn bools_like_pflag() {
        assert!(
            gateway(&["--insecure-discovery"])
                .expect("parses")
                .insecure_discovery
        );
        assert!(
            gateway(&["--insecure-discovery=true"])
                .expect("parses")
                .insecure_discovery
        );
        assert!(
            gateway(&["--insecure-discovery=T"])
                .expect("parses")
                .insecure_discovery
        );
        assert!(
            gateway(&["--insecure-discovery=1"])
                .expect("parses")
                .insecure_discovery
        );
        assert!(
            !gateway(&["--insecure-discovery=false"])
                .expect("parses")
                .insecure_discovery
        );
        assert!(
            !gateway(&["--insecure-discovery=0"])
                .expect("parses")
                .insecure_discovery
        );
        assert!(!gateway(&[]).expect("parses").insecure_discovery);
        // The last occurrence wins.
        assert!(
            !gateway(&["--insecure-discovery", "--insecure-discovery=false"])
                .expect("parses")
                .insecure_discovery
        );
        let m = err(&[BIN, "gateway", "start", "--insecure-discovery=yes"]);
        assert!(
            m.contains(r#"invalid argument "yes" for "--insecure-discovery" flag: strconv.ParseBool: parsing "yes": invalid syntax"#),
            "{m}"
        );
        // A bool never takes the next word as its value (pflag would ignore the word; we reject it).
        let m = err(&[BIN, "gateway", "start", "--insecure-discovery", "false"]);
        assert!(m.contains(r#"unexpected argument "false""#), "{m}");
        let p = proxy(&["--debug", "--auto-tls=true", "--enable-pprof"]).expect("parses");
        assert!(p.debug && p.auto_tls && p.enable_pprof);
    }

    #[test]
    fn string_slices_like_pflag() {
        let g = gateway(&["--endpoints=a:1,b:2", "--endpoints", "c:3"]).expect("parses");
        assert_eq!(g.endpoints, ["a:1", "b:2", "c:3"]);
        let g = gateway(&["--endpoints=http://a:1"]).expect("parses");
        assert_eq!(g.endpoints, ["http://a:1"]);
        let g = gateway(&["--endpoints="]).expect("parses");
        assert!(g.endpoints.is_empty(), "{:?}", g.endpoints);
        let g = gateway(&["--endpoints", ""]).expect("parses");
        assert!(g.endpoints.is_empty(), "{:?}", g.endpoints);
        let g = gateway(&["--endpoints=", "--endpoints=x:1"]).expect("parses");
        assert_eq!(g.endpoints, ["x:1"]);
        let p = proxy(&["--listen-cipher-suites=A,B", "--listen-cipher-suites=C"]).expect("parses");
        assert_eq!(p.listen_cipher_suites, ["A", "B", "C"]);
        assert_eq!(
            proxy(&[]).expect("parses").listen_cipher_suites,
            Vec::<String>::new()
        );
    }

    #[test]
    fn repeated_scalar_flags_keep_the_last() {
        let g = gateway(&["--listen-addr=a:1", "--listen-addr=b:2"]).expect("parses");
        assert_eq!(g.listen_addr, "b:2");
        let p = proxy(&["--max-send-bytes=1", "--max-send-bytes=2"]).expect("parses");
        assert_eq!(p.max_send_bytes, 2);
    }

    #[test]
    fn numbers_like_go() {
        let p = proxy(&[
            "--max-send-bytes=0x100",
            "--max-recv-bytes",
            "1_000",
            "--max-concurrent-streams=10",
            "--self-signed-cert-validity=2",
            "--resolver-ttl=-1",
        ])
        .expect("parses");
        assert_eq!(p.max_send_bytes, 256);
        assert_eq!(p.max_recv_bytes, 1000);
        assert_eq!(p.max_concurrent_streams, 10);
        assert_eq!(p.self_signed_cert_validity, 2);
        assert_eq!(p.resolver_ttl, -1);
        let m = err(&[BIN, "grpc-proxy", "start", "--max-send-bytes=abc"]);
        assert!(
            m.contains(r#"invalid argument "abc" for "--max-send-bytes" flag: strconv.ParseInt: parsing "abc": invalid syntax"#),
            "{m}"
        );
        let m = err(&[
            BIN,
            "grpc-proxy",
            "start",
            "--max-concurrent-streams=4294967296",
        ]);
        assert!(m.contains("value out of range"), "{m}");
        let m = err(&[BIN, "grpc-proxy", "start", "--self-signed-cert-validity=-1"]);
        assert!(m.contains("strconv.ParseUint"), "{m}");
    }

    #[test]
    fn durations_like_go() {
        let m = err(&[BIN, "gateway", "start", "--retry-delay=abc"]);
        assert!(
            m.contains(
                r#"invalid argument "abc" for "--retry-delay" flag: time: invalid duration "abc""#
            ),
            "{m}"
        );
        let m = err(&[BIN, "gateway", "start", "--retry-delay", "1x"]);
        assert!(
            m.contains(r#"time: unknown unit "x" in duration "1x""#),
            "{m}"
        );
        let m = err(&[BIN, "gateway", "start", "--retry-delay=1"]);
        assert!(m.contains(r#"time: missing unit in duration "1""#), "{m}");
        let m = err(&[BIN, "gateway", "start", "--retry-delay="]);
        assert!(m.contains(r#"time: invalid duration """#), "{m}");
        let g = gateway(&["--retry-delay=0", "--health-check-interval=0s"]).expect("parses");
        assert!(g.retry_delay.is_zero() && g.health_check_interval.is_zero());
    }

    #[test]
    fn unknown_flags_and_commands_are_named() {
        let m = err(&[BIN, "gateway", "start", "--no-such-flag"]);
        assert!(
            m.starts_with("Error: unknown flag: --no-such-flag\n"),
            "{m}"
        );
        assert!(
            m.ends_with("Run 'etcd-proxy gateway start --help' for usage."),
            "{m}"
        );
        let m = err(&[BIN, "gateway", "start", "--no-such-flag=1"]);
        assert!(
            m.starts_with("Error: unknown flag: --no-such-flag\n"),
            "{m}"
        );
        let m = err(&[BIN, "gateway", "start", "-x"]);
        assert!(m.contains("unknown shorthand flag: 'x' in -x"), "{m}");
        let m = err(&[BIN, "bogus"]);
        assert!(
            m.contains(r#"unknown command "bogus" for "etcd-proxy""#),
            "{m}"
        );
        let m = err(&[BIN, "gateway", "stop"]);
        assert!(m.contains(r#""stop""#), "{m}");
        let m = err(&[BIN, "gateway", "start", "--listen-addr"]);
        assert!(m.contains("--listen-addr"), "{m}");
    }

    #[test]
    fn help_version_and_bare_commands() {
        for argv in [
            &[BIN][..],
            &[BIN, "--help"],
            &[BIN, "-h"],
            &[BIN, "gateway"],
            &[BIN, "gateway", "-h"],
            &[BIN, "grpc-proxy"],
            &[BIN, "gateway", "start", "--help"],
            &[BIN, "grpc-proxy", "start", "-h"],
            &[BIN, "version", "--help"],
        ] {
            match parse(argv.iter().copied()) {
                Ok(Invocation::Help(text)) => assert!(text.contains("Usage:\n"), "{text}"),
                other => panic!("{argv:?}: expected help, got {other:?}"),
            }
        }
        assert_eq!(parse([BIN, "--version"]), Ok(Invocation::Version));
        assert_eq!(parse([BIN, "version"]), Ok(Invocation::Version));
    }

    #[test]
    fn gateway_start_help_matches_cobra_layout() {
        let help = help_for(&["gateway", "start"]);
        let want_head =
            "start the gateway\n\nUsage:\n  etcd-proxy gateway start [flags]\n\nFlags:\n";
        assert!(help.starts_with(want_head), "{help}");
        // etcd's lines, flag and text; the gap between them depends on the longest flag (ours
        // adds longer ones), so it is checked separately.
        let etcd_lines = [
            (
                "      --discovery-srv string",
                "DNS domain used to bootstrap initial cluster",
            ),
            (
                "      --discovery-srv-name string",
                "service name to query when using DNS discovery",
            ),
            (
                "      --endpoints strings",
                "comma separated etcd cluster endpoints (default [127.0.0.1:2379])",
            ),
            ("  -h, --help", "help for start"),
            ("      --insecure-discovery", "accept insecure SRV records"),
            (
                "      --listen-addr string",
                "listen address (default \"127.0.0.1:23790\")",
            ),
            (
                "      --retry-delay duration",
                "duration of delay before retrying failed endpoints (default 1m0s)",
            ),
            (
                "      --trusted-ca-file string",
                "path to the client server TLS CA file for verifying the discovered endpoints when discovery-srv is provided.",
            ),
        ];
        let flag_lines: Vec<&str> = help
            .lines()
            .skip_while(|l| *l != "Flags:")
            .skip(1)
            .collect();
        let longest = flag_lines
            .iter()
            .filter_map(|l| {
                let indent = l.len() - l.trim_start().len();
                l[indent..].find("   ").map(|i| indent + i)
            })
            .max()
            .expect("flag lines");
        let column = longest + 3;
        for (flag, text) in etcd_lines {
            let want = format!("{flag:<column$}{text}");
            assert!(
                flag_lines.contains(&want.as_str()),
                "missing {want:?} in\n{help}"
            );
        }
        for line in &flag_lines {
            assert_eq!(line.as_bytes()[column - 1], b' ', "{line}");
            assert_ne!(line.as_bytes()[column], b' ', "{line}");
        }
        // Alphabetical, as pflag sorts.
        let names: Vec<&str> = help
            .lines()
            .filter_map(|l| l.split("--").nth(1))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(help.ends_with("(default 10s)\n") || help.ends_with('\n'));
    }

    #[test]
    fn parent_help_lists_sub_commands() {
        let help = help_for(&["gateway"]);
        assert_eq!(
            help,
            "gateway related command\n\nUsage:\n  etcd-proxy gateway [command]\n\n\
             Available Commands:\n  start       start the gateway\n\n\
             Flags:\n  -h, --help   help for gateway\n\n\
             Use \"etcd-proxy gateway [command] --help\" for more information about a command.\n"
        );
        let root = help_for(&[]);
        assert!(
            root.contains("  grpc-proxy  grpc-proxy related command\n"),
            "{root}"
        );
        assert!(
            root.contains("      --version   print the version and exit\n"),
            "{root}"
        );
    }

    #[test]
    fn grpc_proxy_help_has_every_etcd_default() {
        let help = help_for(&["grpc-proxy", "start"]);
        for needle in [
            "--advertise-client-url string",
            "(default \"127.0.0.1:23790\")",
            "--data-dir string",
            "(default \"default.proxy\")",
            "--dial-keepalive-timeout duration",
            "keepalive timeout for client(grpc-proxy) connections (default 20s). (default 20s)",
            "--grpc-keepalive-interval duration",
            "(default 2h0m0s)",
            "--max-concurrent-streams uint32",
            "(default 4294967295)",
            "--max-recv-bytes int",
            "(default 2147483647)",
            "--max-send-bytes int",
            "(default 1572864)",
            "--self-signed-cert-validity uint",
            "unit is year (default 1)",
            "--listen-cipher-suites strings",
            "--tls-min-version string",
            "(default \"TLS1.2\")",
            "--endpoints strings",
            "(default [127.0.0.1:2379])",
            "      --debug ",
            "Address is at client URL + \"/debug/pprof/\"\n",
            "      --resolver-ttl int ",
            "specify TTL, in seconds, when registering proxy endpoints\n",
            "etcd endpoints auto sync interval (disabled by default)\n",
        ] {
            assert!(help.contains(needle), "missing {needle:?} in\n{help}");
        }
        assert!(!help.contains("experimental-enable-grpc-logging"));
    }

    #[test]
    fn grpc_proxy_checks_args_like_etcd() {
        let check = |flags: &[&str]| proxy(flags).map(|_| ()).map_err(|e| e.message);
        assert_eq!(
            check(&["--resolver-prefix=p"]),
            Err("invalid resolver-ttl 0".into())
        );
        assert_eq!(
            check(&["--resolver-ttl=5"]),
            Err("invalid resolver-prefix \"\"".into())
        );
        assert_eq!(
            check(&[
                "--resolver-prefix=p",
                "--resolver-ttl=5",
                "--advertise-client-url="
            ]),
            Err("invalid advertise-client-url \"\"".into())
        );
        assert_eq!(check(&["--resolver-prefix=p", "--resolver-ttl=5"]), Ok(()));
        assert_eq!(
            check(&["--auto-tls", "--self-signed-cert-validity=0"]),
            Err("selfSignedCertValidity is invalid,it should be greater than 0".into())
        );
        assert_eq!(
            check(&["--tls-min-version=TLS1.1"]),
            Err(
                "tls-min-version is invalid: unexpected TLS version \"TLS1.1\" (must be one of: TLS1.2, TLS1.3)"
                    .into()
            )
        );
        assert_eq!(
            check(&["--tls-min-version=TLS1.3", "--tls-max-version=TLS1.2"]),
            Err("min version (TLS1.3) is greater than max version (TLS1.2)".into())
        );
        assert_eq!(
            check(&["--tls-min-version=TLS1.3", "--listen-cipher-suites=X"]),
            Err("cipher suites cannot be configured when only TLS1.3 is enabled".into())
        );
        assert_eq!(check(&["--tls-min-version=TLS1.3"]), Ok(()));
        assert_eq!(check(&["--tls-max-version=TLS1.3"]), Ok(()));
    }
}
