//! The project's verbs, in one place that knows the toolchains:
//!
//! - `cargo xtask setup`          install what builds and tests need (wasm target, Envoy,
//!   the deploy validators, the example plugins' toolchains)
//! - `cargo xtask build-plugins`  build the bundled plugins and test fixtures into components
//! - `cargo xtask demo`           the ASM guide's result on this machine, through a real Envoy
//! - `cargo xtask test`           every check and test; what CI runs
//! - `cargo xtask bench`          the benchmark suite, into BENCHMARKS.md
//!
//! The verbs that run the system live are binaries of their own, which this one builds and
//! runs with the same arguments: demo and reliability are `xtask-live` (`xtask/live`), bench
//! is the bench crate's `bench` (`bench/src/bin/bench/`).

#![expect(
    clippy::print_stdout,
    reason = "the test command passes its runners' output through, and prints their counts"
)]

use std::ffi::OsString;

use clap::{Parser, Subcommand};
use xtask::{bench, build_plugins, live, run, setup};

mod suite;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Install the wasm targets, Envoy (into target/tools) and the other languages' toolchains.
    Setup,
    /// Build the bundled plugins and the test fixtures into components.
    BuildPlugins,
    /// Run the ASM demo: Envoy on :8000 -> wasm-extproc on :9002 with the bundled plugin ->
    /// httpbin (PyPI, served by gunicorn) on :8080. Shows `curl -i /headers`, then serves
    /// until Ctrl-C (`--once`: shows it and exits; `cargo xtask demo --help`: the ports).
    #[command(disable_help_flag = true)]
    Demo(Forwarded),
    /// Formatting, lints, unit and system tests, and the demo: what CI runs.
    Test,
    /// The measured proof of isolation: requests through Envoy and a chain of the ASM plugin
    /// and a plugin that traps on 1% of them, once fail-open and once fail-closed. Writes
    /// target/reliability.md, and fails if any figure is off.
    #[command(disable_help_flag = true)]
    Reliability(Forwarded),
    /// The benchmark suite, into BENCHMARKS.md, bench/plots/ and bench/results.json (see
    /// `cargo xtask bench --help`). Not part of `test`.
    #[command(disable_help_flag = true)]
    Bench(Forwarded),
}

/// A live verb's own arguments, which its binary parses (and explains with `--help`).
#[derive(Debug, clap::Args)]
struct Forwarded {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

fn main() -> std::process::ExitCode {
    xtask::exit_code(dispatch(Cli::parse().command))
}

fn dispatch(verb: Verb) -> anyhow::Result<()> {
    match verb {
        Verb::Setup => setup::all(),
        Verb::BuildPlugins => build_plugins(),
        Verb::Test => suite::test(),
        Verb::Demo(Forwarded { args }) => run(live(["demo"]).args(args)),
        Verb::Reliability(Forwarded { args }) => run(live(["reliability"]).args(args)),
        Verb::Bench(Forwarded { args }) => run(&mut bench(args)),
    }
}
