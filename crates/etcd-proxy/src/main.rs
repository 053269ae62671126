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
        Invocation::GatewayStart(args) => run(&argv, false, gateway_cmd::run(args)),
        Invocation::GrpcProxyStart(args) => {
            let debug = args.debug;
            run(&argv, debug, grpc_proxy_cmd::run(args))
        }
    }
}

/// Runs a sub-command on a multi-thread runtime with the JSON logger installed.
fn run(
    argv: &[OsString],
    debug: bool,
    command: impl Future<Output = Result<(), ExitError>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
