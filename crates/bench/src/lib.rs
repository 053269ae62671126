//! An etcd v3 load generator, in the spirit of etcd's `tools/benchmark`: many concurrent gRPC
//! puts or ranges over a few HTTP/2 connections, or many watchers of one key receiving a series of
//! puts (`watch`, [`WatchSummary`]), and a report of throughput and latency.
//!
//! It exists so that "faster, cheaper" claims about the proxies are measured, against etcd itself
//! and against etcd's own gateway and grpc-proxy, with the same client for all of them
//! (`scripts/bench-gateway.sh`, `docs/benchmarks.md`). It uses this workspace's own etcd API types,
//! so what it sends is what any etcd client sends.
//!
//! ```no_run
//! # async fn demo() -> Result<(), bench::BenchError> {
//! use clap::Parser;
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     bench: bench::BenchArgs,
//! }
//! let cli = Cli::parse_from(["x", "put", "--endpoints=127.0.0.1:32379", "--clients=16", "--total=1000"]);
//! let report = bench::run(&cli.bench).await?;
//! report.print_text();
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod keys;
pub mod report;
mod staleness;
mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::{PutRequest, RangeRequest};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

pub use keys::KeyGen;
pub use report::{Report, WatchSummary};

/// How long a connection may take to establish before the run is refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one request, so a wedged server ends the run with errors instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A run stops early when this many requests have failed and none has succeeded: the target is
/// down or refuses us, and sending the rest would only repeat the same error.
const ABORT_AFTER_FAILURES: u64 = 100;

/// Command-line flags of `etcd-proxy bench`, named after etcd benchmark's.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct BenchArgs {
    /// The workload: `put` writes keys; `range` reads keys written in a warm-up first.
    #[arg(value_enum)]
    pub mode: Mode,

    /// gRPC endpoints (`host:port` or `http://host:port`), comma-separated; connections
    /// round-robin over them.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        value_name = "strings"
    )]
    pub endpoints: Vec<String>,

    /// Total number of gRPC (HTTP/2) connections.
    #[arg(long, default_value_t = 1, value_name = "uint")]
    pub conns: usize,

    /// Total number of concurrent in-flight requests (workers), spread over the connections.
    #[arg(long, default_value_t = 1, value_name = "uint")]
    pub clients: usize,

    /// Total number of requests.
    #[arg(long, default_value_t = 10_000, value_name = "int")]
    pub total: u64,

    /// Key size in bytes (keys are zero-padded decimal indexes).
    #[arg(long, default_value_t = 8, value_name = "int")]
    pub key_size: usize,

    /// Value size of puts, in bytes.
    #[arg(long, default_value_t = 8, value_name = "int")]
    pub val_size: usize,

    /// Number of distinct keys.
    #[arg(long, default_value_t = 1, value_name = "int")]
    pub key_space_size: u64,

    /// Use keys in order (request i gets key i mod key-space-size) instead of random ones.
    #[arg(long)]
    pub sequential_keys: bool,

    /// Range consistency: `l` (linearizable) or `s` (serializable). Ignored by puts.
    #[arg(long, value_enum, default_value = "l", value_name = "string")]
    pub consistency: Consistency,

    /// Print the report as one line of JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// `staleness` only: where the writes go (etcd itself, not the proxy under test).
    #[arg(long, value_delimiter = ',', value_name = "strings")]
    pub write_endpoints: Vec<String>,

    /// `watch` only: watchers opened (all of `--key`, from now).
    #[arg(long, default_value_t = 2000, value_name = "uint")]
    pub watchers: usize,

    /// `watch` only: Watch streams the watchers are spread over (streams over `--conns`).
    #[arg(long, default_value_t = 20, value_name = "uint")]
    pub streams: usize,

    /// `watch` only: puts written once every watcher is created (each an event for every watcher).
    #[arg(long, default_value_t = 200, value_name = "uint")]
    pub events: u64,

    /// `watch` only: the key watched and written.
    #[arg(long, default_value = "bench-watch", value_name = "string")]
    pub key: String,

    /// `watch` only: where the puts go, etcd itself (default: the first of `--endpoints`).
    /// `--clients` puts are in flight at a time.
    #[arg(long, value_name = "string")]
    pub put_endpoint: Option<String>,

    /// `watch` only: puts a second at most (0: as fast as `--clients` puts in flight allow).
    #[arg(long, default_value_t = 0.0, value_name = "float")]
    pub put_rate: f64,

    /// `watch` only: etcd's metrics (`http://host:port/metrics`), to read its watcher count
    /// (`etcd_debugging_mvcc_watcher_total`) before, with the watchers created, and after.
    #[arg(long, value_name = "url")]
    pub metrics_url: Option<String>,

    /// `watch` only: a process (the proxy) whose CPU time to report for each phase (Linux).
    #[arg(long, value_name = "pid")]
    pub cpu_pid: Option<u32>,

    /// `watch` only: seconds allowed for creating every watcher, and for the last delivery after
    /// the last put; what has not arrived by then is reported missing.
    #[arg(long, default_value_t = 60, value_name = "secs")]
    pub timeout: u64,
}

/// What each request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `KV.Put` of a fixed random value.
    Put,
    /// `KV.Range` of one key.
    Range,
    /// Writes to `--write-endpoints`, each followed by serializable reads through `--endpoints`
    /// until it shows: the latencies are the delays before a write is visible (a caching
    /// proxy's staleness).
    Staleness,
    /// `--watchers` watchers of one key get `--events` puts written to `--put-endpoint`: deliveries
    /// per second, and latency from each put's answer to each delivery.
    Watch,
}

impl Mode {
    /// The name on the command line and in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Put => "put",
            Mode::Range => "range",
            Mode::Staleness => "staleness",
            Mode::Watch => "watch",
        }
    }
}

/// Range consistency, as etcd benchmark's `--consistency`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Consistency {
    /// Linearizable: the member confirms it is up to date with the leader (a ReadIndex round).
    #[value(name = "l")]
    Linearizable,
    /// Serializable: the member answers from its local store.
    #[value(name = "s")]
    Serializable,
}

/// Why a run could not be done. Failed requests during a run are not errors: they are counted in
/// the [`Report`], unless every one failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag value that makes no sense.
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// A connection could not be established.
    #[error("cannot connect to {endpoint}: {}", chain(source))]
    Connect {
        /// The endpoint dialled.
        endpoint: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A put of the range warm-up failed.
    #[error("warm-up put failed: {0}")]
    WarmUp(String),
    /// A watch run could not be done (watchers not created in time, a put failed).
    #[error("watch: {0}")]
    Watch(String),
    /// No request succeeded.
    #[error("all {failed} requests failed; first error: {first}")]
    AllFailed {
        /// Requests sent before giving up.
        failed: u64,
        /// The most frequent error message.
        first: String,
    },
}

/// An error and its causes, `a: b: c`: tonic's transport errors say only "transport error" at the top.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Runs the benchmark `args` describes and reports on it.
pub async fn run(args: &BenchArgs) -> Result<Report, BenchError> {
    let keys = KeyGen::new(args.key_size, args.key_space_size, args.sequential_keys)?;
    if args.conns == 0 || args.clients == 0 || args.total == 0 {
        return Err(BenchError::InvalidArgs(
            "--conns, --clients and --total must be at least 1".into(),
        ));
    }
    let endpoints = endpoint_urls(&args.endpoints)?;
    if args.mode == Mode::Watch {
        return run_watch(args, &endpoints).await;
    }
    let channels = connect(&endpoints, args.conns).await?;
    if args.mode == Mode::Staleness {
        if args.write_endpoints.is_empty() {
            return Err(BenchError::InvalidArgs(
                "staleness needs --write-endpoints (etcd itself, not the proxy)".into(),
            ));
        }
        let write = connect(&endpoint_urls(&args.write_endpoints)?, 1).await?;
        let seen = staleness::run(channels[0].clone(), write[0].clone(), args.total).await;
        let report = Report::new(args.mode.as_str(), seen.elapsed, seen.delays, seen.errors);
        return finish(report);
    }
    let value = keys::value(args.val_size, &mut fastrand::Rng::new());

    if args.mode == Mode::Range {
        warm_up(&channels, args.clients, &keys, &value).await?;
    }

    let op = Arc::new(Op {
        mode: args.mode,
        keys,
        value,
        serializable: args.consistency == Consistency::Serializable,
    });
    let outcome = drive(&channels, args.clients, args.total, op).await;
    let report = Report::new(
        args.mode.as_str(),
        outcome.elapsed,
        outcome.latencies,
        outcome.errors,
    );
    finish(report)
}

/// `watch`: see [`watch`].
async fn run_watch(args: &BenchArgs, endpoints: &[String]) -> Result<Report, BenchError> {
    let put_endpoint = match &args.put_endpoint {
        Some(e) => endpoint_urls(std::slice::from_ref(e))?,
        None => endpoints[..1].to_vec(),
    };
    let plan = watch::Plan {
        conns: args.conns,
        watchers: args.watchers,
        streams: args.streams,
        events: args.events,
        key: Bytes::from(args.key.clone()),
        value: keys::value(args.val_size, &mut fastrand::Rng::new()),
        puts_in_flight: args.clients,
        put_rate: args.put_rate,
        timeout: Duration::from_secs(args.timeout),
        metrics: args
            .metrics_url
            .as_deref()
            .map(watch::parse_metrics_url)
            .transpose()?,
        cpu_pid: args.cpu_pid,
    };
    finish(watch::run(&plan, endpoints, &put_endpoint).await?)
}

/// The report, or the error that every request failed.
fn finish(report: Report) -> Result<Report, BenchError> {
    if report.succeeded == 0 {
        let first = report
            .error_distribution
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(m, _)| m.clone())
            .unwrap_or_default();
        return Err(BenchError::AllFailed {
            failed: report.errors,
            first,
        });
    }
    Ok(report)
}

/// `host:port` or `http://host:port` -> `http://host:port`. TLS is not supported (yet).
fn endpoint_urls(endpoints: &[String]) -> Result<Vec<String>, BenchError> {
    let urls: Vec<String> = endpoints
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.starts_with("https://") {
                Err(BenchError::InvalidArgs(format!(
                    "{e}: TLS endpoints are not supported"
                )))
            } else {
                Ok(format!("http://{}", e.trim_start_matches("http://")))
            }
        })
        .collect::<Result<_, _>>()?;
    if urls.is_empty() {
        return Err(BenchError::InvalidArgs("no --endpoints given".into()));
    }
    Ok(urls)
}

/// Opens `conns` HTTP/2 connections, round-robin over `endpoints`. Each `Channel` is one
/// connection (no balancing inside tonic), so `--conns` means what it says.
async fn connect(endpoints: &[String], conns: usize) -> Result<Vec<Channel>, BenchError> {
    connect_with(endpoints, conns, Some(REQUEST_TIMEOUT)).await
}

/// [`connect`] with `timeout` on each request (`None`: none, for streams lasting a whole run).
pub(crate) async fn connect_with(
    endpoints: &[String],
    conns: usize,
    timeout: Option<Duration>,
) -> Result<Vec<Channel>, BenchError> {
    let mut channels = Vec::with_capacity(conns);
    for i in 0..conns {
        let url = &endpoints[i % endpoints.len()];
        let err = |source| BenchError::Connect {
            endpoint: url.clone(),
            source,
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(err)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(t) = timeout {
            endpoint = endpoint.timeout(t);
        }
        channels.push(endpoint.connect().await.map_err(err)?);
    }
    Ok(channels)
}

/// Writes every key of the key space once, so that ranges find what they read. Not timed.
async fn warm_up(
    channels: &[Channel],
    clients: usize,
    keys: &KeyGen,
    value: &Bytes,
) -> Result<(), BenchError> {
    let op = Arc::new(Op {
        mode: Mode::Put,
        keys: keys.sequential(),
        value: value.clone(),
        serializable: false,
    });
    let outcome = drive(channels, clients, keys.key_space_size(), op).await;
    match outcome.errors.into_iter().next() {
        None => Ok(()),
        Some((msg, _)) => Err(BenchError::WarmUp(msg)),
    }
}

/// One request kind, shared by all workers.
struct Op {
    mode: Mode,
    keys: KeyGen,
    value: Bytes,
    serializable: bool,
}

/// What the workers of one run saw.
struct Outcome {
    elapsed: Duration,
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
}

/// Shared by the workers of one run: the next request number, and early-abort bookkeeping.
struct Progress {
    next: AtomicU64,
    total: u64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

/// Sends `total` requests with `clients` workers, worker `w` on connection `w % conns`, each with
/// one request in flight at a time.
async fn drive(channels: &[Channel], clients: usize, total: u64, op: Arc<Op>) -> Outcome {
    let progress = Arc::new(Progress {
        next: AtomicU64::new(0),
        total,
        succeeded: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|w| {
            let client = KvClient::new(channels[w % channels.len()].clone());
            tokio::spawn(worker(client, op.clone(), progress.clone()))
        })
        .collect();
    let mut latencies = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut errors = BTreeMap::new();
    for w in workers {
        match w.await {
            Ok(result) => {
                latencies.extend(result.latencies);
                for (msg, n) in result.errors {
                    *errors.entry(msg).or_insert(0) += n;
                }
            }
            // A worker only panics on a bug; report it rather than lose the run.
            Err(e) => *errors.entry(format!("worker failed: {e}")).or_insert(0) += 1,
        }
    }
    Outcome {
        elapsed: start.elapsed(),
        latencies,
        errors,
    }
}

/// One worker's measurements.
struct WorkerResult {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
}

async fn worker(
    mut client: KvClient<Channel>,
    op: Arc<Op>,
    progress: Arc<Progress>,
) -> WorkerResult {
    let mut rng = fastrand::Rng::new();
    let mut latencies = Vec::new();
    let mut errors = BTreeMap::new();
    loop {
        if progress.stop.load(Ordering::Relaxed) {
            break;
        }
        let i = progress.next.fetch_add(1, Ordering::Relaxed);
        if i >= progress.total {
            break;
        }
        let key = op.keys.key(op.keys.index(i, &mut rng));
        let started = Instant::now();
        let result = match op.mode {
            Mode::Put => client
                .put(PutRequest {
                    key,
                    value: op.value.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
            // Staleness and watch run elsewhere ([`staleness`], [`watch`]); never here.
            Mode::Range | Mode::Staleness | Mode::Watch => client
                .range(RangeRequest {
                    key,
                    serializable: op.serializable,
                    ..Default::default()
                })
                .await
                .map(drop),
        };
        match result {
            Ok(()) => {
                latencies.push(started.elapsed());
                progress.succeeded.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => {
                let msg = format!(
                    "rpc error: code = {:?} desc = {}",
                    status.code(),
                    status.message()
                );
                *errors.entry(msg).or_insert(0) += 1;
                let failed = progress.failed.fetch_add(1, Ordering::Relaxed) + 1;
                if failed >= ABORT_AFTER_FAILURES && progress.succeeded.load(Ordering::Relaxed) == 0
                {
                    progress.stop.store(true, Ordering::Relaxed);
                }
            }
        }
    }
    WorkerResult { latencies, errors }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .map(|c| c.bench)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn defaults_are_etcd_benchmarks() {
        let a = parse(&["put"]);
        assert_eq!(a.mode, Mode::Put);
        assert_eq!(a.endpoints, ["127.0.0.1:2379"]);
        assert_eq!((a.conns, a.clients, a.total), (1, 1, 10_000));
        assert_eq!((a.key_size, a.val_size, a.key_space_size), (8, 8, 1));
        assert!(!a.sequential_keys && !a.json);
        assert_eq!(a.consistency, Consistency::Linearizable);
    }

    #[test]
    fn flags_parse_before_or_after_the_mode() {
        let a = parse(&[
            "--endpoints=a:1,b:2",
            "--conns",
            "8",
            "range",
            "--clients=64",
            "--consistency=s",
            "--sequential-keys",
            "--key-space-size=100",
            "--json",
        ]);
        assert_eq!(a.mode, Mode::Range);
        assert_eq!(a.endpoints, ["a:1", "b:2"]);
        assert_eq!((a.conns, a.clients, a.key_space_size), (8, 64, 100));
        assert_eq!(a.consistency, Consistency::Serializable);
        assert!(a.sequential_keys && a.json);
        assert!(Cli::try_parse_from(["bench", "delete"]).is_err());
        assert!(Cli::try_parse_from(["bench", "put", "--consistency=x"]).is_err());
    }

    #[test]
    fn watch_flags_and_defaults() {
        let a = parse(&["watch"]);
        assert_eq!(a.mode, Mode::Watch);
        assert_eq!((a.watchers, a.streams, a.events), (2000, 20, 200));
        assert_eq!(a.key, "bench-watch");
        assert_eq!((a.timeout, a.put_rate), (60, 0.0));
        assert_eq!(
            (a.put_endpoint, a.metrics_url, a.cpu_pid),
            (None, None, None)
        );
        let a = parse(&[
            "watch",
            "--endpoints=127.0.0.1:23790",
            "--put-endpoint=http://127.0.0.1:2379",
            "--watchers=50",
            "--streams=5",
            "--conns=2",
            "--events=10",
            "--key=k",
            "--val-size=64",
            "--metrics-url=http://127.0.0.1:2379/metrics",
            "--cpu-pid=42",
            "--timeout=5",
            "--put-rate=50",
            "--json",
        ]);
        assert_eq!((a.watchers, a.streams, a.conns, a.events), (50, 5, 2, 10));
        assert_eq!(a.put_endpoint.as_deref(), Some("http://127.0.0.1:2379"));
        assert_eq!(
            a.metrics_url.as_deref(),
            Some("http://127.0.0.1:2379/metrics")
        );
        assert_eq!(
            (a.key.as_str(), a.val_size, a.cpu_pid, a.timeout),
            ("k", 64, Some(42), 5)
        );
        assert_eq!(a.put_rate, 50.0);
        assert!(a.json);
    }

    #[tokio::test]
    async fn bad_watch_arguments_fail_before_connecting() {
        for bad in [
            &["watch", "--endpoints=127.0.0.1:1", "--watchers=0"][..],
            &[
                "watch",
                "--endpoints=127.0.0.1:1",
                "--watchers=3",
                "--streams=4",
            ],
            &["watch", "--endpoints=127.0.0.1:1", "--events=0"],
            &["watch", "--endpoints=127.0.0.1:1", "--put-rate=-1"],
            &[
                "watch",
                "--endpoints=127.0.0.1:1",
                "--metrics-url=127.0.0.1:2",
            ],
            &[
                "watch",
                "--endpoints=127.0.0.1:1",
                "--put-endpoint=https://a:1",
            ],
        ] {
            let got = run(&parse(bad)).await;
            assert!(
                matches!(got, Err(BenchError::InvalidArgs(_))),
                "{bad:?}: {got:?}"
            );
        }
    }

    #[test]
    fn endpoints_become_http_urls() {
        let e = |v: &[&str]| endpoint_urls(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            e(&["127.0.0.1:1", "http://[::1]:2"]).unwrap(),
            ["http://127.0.0.1:1", "http://[::1]:2"]
        );
        assert!(e(&["https://a:1"]).is_err());
        assert!(e(&[""]).is_err());
    }

    #[tokio::test]
    async fn bad_arguments_fail_before_connecting() {
        let mut a = parse(&["put", "--endpoints=127.0.0.1:1"]);
        a.clients = 0;
        assert!(matches!(run(&a).await, Err(BenchError::InvalidArgs(_))));
        let a = parse(&["put", "--key-size=1", "--key-space-size=11"]);
        assert!(matches!(run(&a).await, Err(BenchError::InvalidArgs(_))));
    }
}
