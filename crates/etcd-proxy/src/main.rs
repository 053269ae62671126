//! `etcd-proxy`: parse the command line, start the runtime and the logger, run the sub-command,
//! turn its error into an exit code. Everything else lives in the library half (`lib.rs`).

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::future::Future;
use std::io::Write as _;
use std::process::ExitCode;

use etcd_proxy::cli::{self, Invocation};
use etcd_proxy::{ExitError, gateway_cmd, grpc_proxy_cmd, logging, version};

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let invocation = match cli::parse(argv.iter().cloned()) {
        Ok(invocation) => invocation,
        Err(e) => return fail(&e),
    };
    match invocation {
        Invocation::Help(text) => print_stdout(&text),
        Invocation::Version => print_stdout(&version::version_text()),
        Invocation::Bench(args) => bench(&args),
        Invocation::GatewayStart(args) => run(&argv, false, false, gateway_cmd::run(args)),
        Invocation::GrpcProxyStart(args) => {
            let debug = args.debug;
            // One thread unless `TOKIO_WORKER_THREADS` asks for more: a proxied call is handed
            // between several tasks (client connection, call, member connection), and on one
            // thread each hand-off is a queue push instead of a wake-up of another thread, which
            // costs about a quarter less CPU per call (docs/benchmarks.md). A proxy that must use
            // more than one core sets `TOKIO_WORKER_THREADS=N` for N worker threads.
            let one_thread = std::env::var_os("TOKIO_WORKER_THREADS").is_none();
            run(&argv, debug, one_thread, grpc_proxy_cmd::run(args))
        }
    }
}

/// Runs a sub-command with the JSON logger installed, on a current-thread runtime if
/// `one_thread`, else on a multi-thread one (as many workers as cores, or
/// `TOKIO_WORKER_THREADS`).
fn run(
    argv: &[OsString],
    debug: bool,
    one_thread: bool,
    command: impl Future<Output = Result<(), ExitError>>,
) -> ExitCode {
    let mut builder = if one_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&ExitError::new(format!("failed to start the runtime: {e}"))),
    };
    logging::init(debug);
    // As etcd 3.5.3+ does: the whole argv, not only what the flag parser saw.
    let args: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    tracing::info!(args = ?logging::JsonStrings(&args), "Running: ");
    let result = runtime.block_on(command);
    // The command has drained what it owns; do not wait for stray tasks.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// `etcd-proxy bench`: runs the load generator and prints its report (text, or JSON with `--json`)
/// to stdout. No logger: the report is the output.
fn bench(args: &bench::BenchArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&ExitError::new(format!("failed to start the runtime: {e}"))),
    };
    match runtime.block_on(bench::run(args)) {
        Ok(report) if args.json => print_stdout(&format!("{}\n", report.json())),
        Ok(report) => print_stdout(&report.text()),
        Err(e) => fail(&ExitError::new(format!("Error: {e}"))),
    }
}

/// Prints help or version text to stdout (a closed pipe is not an error worth reporting).
fn print_stdout(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    ExitCode::SUCCESS
}

/// Prints the error to stderr and returns its exit code (1 when it does not fit an exit status).
fn fail(e: &ExitError) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "{}", e.message);
    match u8::try_from(e.code) {
        Ok(code) if code != 0 => ExitCode::from(code),
        _ => ExitCode::FAILURE,
    }
}
