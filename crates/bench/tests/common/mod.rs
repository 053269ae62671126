//! What the bench tests share: the bench's command line, parsed as `etcd-proxy bench` parses it.

use bench::BenchArgs;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

/// `argv` (without the program name) as bench flags; panics on a parse error.
pub fn args(argv: &[&str]) -> BenchArgs {
    Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .bench
}
