//! `cargo xtask bench`: the benchmark suite, in one command. It builds what it measures, then
//! runs, in order:
//!
//! - [`micro`]: criterion, in process -- per-stream cost, chain length, body throughput
//!   (`bench/benches/stream.rs`);
//! - the languages benchmark (the ASM plugin in Rust, C, JavaScript and Python;
//!   `bench/benches/languages.rs`);
//! - the state benchmark (state store operations on each backend, an outbound HTTP request;
//!   `bench/benches/state.rs`);
//! - [`rss`]: the host's memory against open streams;
//! - [`e2e`]: the setups through a real Envoy, pinned to cores, under wrk and hey;
//! - [`counts`]: instructions and system calls per request in each process of those setups;
//! - [`concurrency`]: thousands of exchanges in flight behind a slow upstream, host and native;
//! - [`overload`]: more clients than the machine serves, host and native: failed requests and
//!   each ext_proc message's wait, as Envoy saw it;
//!
//! and writes BENCHMARKS.md with its plots (bench/plots/) and the raw figures
//! (bench/results.json). `--report-only` renders the report again from the raw figures.
//!
//! `WASM_EXTPROC_BIN` (the host) and `WASM_EXTPROC_MODULE_DIR` (the module's directory) measure
//! another build of them against the same baselines: an older commit's, say, side by side.
//!
//! `cargo xtask bench` builds this and runs it with the same arguments; `cargo xtask test` runs
//! its `concurrency-check`. It needs the test kit, as the live verbs do (`xtask/live`), and the
//! workspace build compiles it with everything else.

mod concurrency;
mod counts;
mod e2e;
mod micro;
mod overload;
mod report;
mod rss;

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use xtask::{cargo, repo_root, run, target_dir};

/// Open-stream counts for the memory benchmark.
const STREAM_COUNTS: [usize; 4] = [1, 100, 1_000, 10_000];

/// The benchmark suite: in-process criterion benchmarks, memory against open streams, and
/// four setups through a real Envoy (none, Lua, wasm-extproc, a native ext_proc server).
/// Writes BENCHMARKS.md, bench/plots/ and bench/results.json. Not part of `cargo xtask test`.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask bench",
    bin_name = "cargo xtask bench",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    check: Option<Check>,
    #[command(flatten)]
    suite: Options,
}

/// What `cargo xtask test` runs of the suite, reduced to fit it.
#[derive(Debug, Subcommand)]
enum Check {
    /// The concurrency benchmark's reduced form: the host with its shipped settings holds
    /// 2,000 exchanges in flight through Envoy with no error.
    ConcurrencyCheck,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    xtask::exit_code(match cli.check {
        Some(Check::ConcurrencyCheck) => concurrency::check(),
        None => run_suite(&cli.suite),
    })
}

#[derive(Debug, clap::Args)]
struct Options {
    /// Length of each end-to-end load run, in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// End-to-end rounds (each measures every setup); figures are medians over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// wrk connections and hey workers.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Requests per second for the fixed-rate runs (default: half the slowest setup's
    /// closed-loop rate).
    #[arg(long)]
    fixed_rate: Option<u64>,
    /// Render BENCHMARKS.md again from bench/results.json without measuring.
    #[arg(long)]
    report_only: bool,
    /// Measure only this part, keeping the other parts' figures from bench/results.json.
    #[arg(long, value_enum)]
    only: Option<Part>,
}

/// The parts of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Micro,
    Languages,
    /// State store operations and outbound HTTP (bench/benches/state.rs).
    State,
    Rss,
    E2e,
    /// Instructions and system calls per request, by process (callgrind and strace).
    Counts,
    Concurrency,
    /// More clients than the machine serves: failed requests and ext_proc message latency.
    Overload,
}

fn run_suite(options: &Options) -> anyhow::Result<()> {
    let results_path = repo_root().join("bench/results.json");
    let results = if options.report_only {
        serde_json::from_slice(
            &std::fs::read(&results_path).context("bench/results.json: run `cargo xtask bench`")?,
        )?
    } else {
        let previous = match options.only {
            Some(_) => Some(
                serde_json::from_slice(&std::fs::read(&results_path).context(
                    "bench/results.json: run the whole `cargo xtask bench` once before --only",
                )?)
                .context("bench/results.json")?,
            ),
            None => None,
        };
        let results = measure(options, previous)?;
        std::fs::write(&results_path, serde_json::to_vec_pretty(&results)?)?;
        results
    };
    let report = repo_root().join("BENCHMARKS.md");
    report::write(&results, &report, &repo_root().join("bench/plots"))?;
    eprintln!("bench: wrote {}", report.display());
    Ok(())
}

fn measure(
    options: &Options,
    previous: Option<report::Results>,
) -> anyhow::Result<report::Results> {
    xtask::setup::all()?;
    xtask::build_plugins()?;
    // The bundled plugin as a WASI plugin would be built, for comparison.
    run(cargo()
        .current_dir(repo_root().join("plugins"))
        .args([
            "build",
            "--release",
            "--package",
            "asm-demo",
            "--target",
            xtask::WASI_TARGET,
        ])
        .arg("--target-dir")
        .arg(target_dir()))?;
    // What ships: the host and the module linked with thin LTO, as the image's build does
    // (`[profile.dist]`); the baselines likewise. Their package's own features apart, so the
    // host's and the module's stay those the image builds with.
    run(cargo().args([
        "build",
        "--profile",
        e2e::MEASURED_PROFILE,
        "--package",
        "wasm-extproc",
        "--package",
        "wasm-extproc-module",
    ]))?;
    // Without this driver (the `driver` feature), which is no baseline: neither it nor the
    // test kit it needs is built with LTO for nothing.
    run(cargo().args([
        "build",
        "--profile",
        e2e::MEASURED_PROFILE,
        "--package",
        "extproc-bench",
        "--no-default-features",
        "--bins",
    ]))?;

    let wanted = |part: Part| options.only.is_none_or(|only| only == part);
    let mut results = previous.unwrap_or_else(|| report::Results::empty(options.duration));
    if wanted(Part::Micro) {
        results.micro = micro::run_stream_benchmarks()?;
    }
    if wanted(Part::Languages) {
        run(cargo().args(["bench", "-p", "extproc-bench", "--bench", "languages"]))?;
        results.languages = std::fs::read_to_string(target_dir().join("bench/languages.md")).ok();
    }
    if wanted(Part::State) {
        run(cargo().args(["bench", "-p", "extproc-bench", "--bench", "state"]))?;
        results.state = std::fs::read_to_string(target_dir().join("bench/state.md")).ok();
    }
    if wanted(Part::Rss) {
        results.rss = rss::run(&STREAM_COUNTS)?;
    }
    if wanted(Part::E2e) {
        let (e2e, fixed_rate) = e2e::run(&e2e::Options {
            duration: Duration::from_secs(options.duration),
            rounds: options.rounds,
            connections: options.connections,
            fixed_rate: options.fixed_rate,
        })?;
        results.e2e = e2e;
        results.fixed_rate = fixed_rate;
        results.e2e_duration_s = options.duration;
        results.e2e_rounds = options.rounds;
        results.e2e_connections = options.connections;
    }
    if wanted(Part::Counts) {
        results.counts = counts::run()?;
    }
    if wanted(Part::Concurrency) {
        results.concurrency = concurrency::run(Duration::from_secs(options.duration))?;
    }
    if wanted(Part::Overload) {
        results.overload = overload::run(options.rounds)?;
    }
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?;
    match options.only {
        // One part again: the rest was measured by the run the header names, perhaps on
        // another machine, so the header keeps it and lists this part after it.
        Some(part) if !results.date.is_empty() => {
            // A part measured again replaces its earlier entry.
            let only = format!("`--only {}`", part_name(part));
            results.later.retain(|entry| !entry.starts_with(&only));
            results
                .later
                .push(format!("{only} {date} on {}", machine()?));
        }
        _ => {
            results.date = date;
            results.machine = machine()?;
            results.command = command_line(options);
            results.later.clear();
        }
    }
    Ok(results)
}

/// The command that reproduces this run.
fn command_line(options: &Options) -> String {
    let mut line = format!(
        "cargo xtask bench --duration {} --rounds {} --connections {}",
        options.duration, options.rounds, options.connections
    );
    if let Some(rate) = options.fixed_rate {
        line.push_str(&format!(" --fixed-rate {rate}"));
    }
    if let Some(part) = options.only {
        line.push_str(&format!(" --only {}", part_name(part)));
    }
    line
}

/// How `--only` spells `part`.
fn part_name(part: Part) -> String {
    format!("{part:?}").to_lowercase()
}

/// CPU model, cores and kernel, for the report's header.
fn machine() -> anyhow::Result<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = output(Command::new("uname").arg("-r"))?;
    Ok(format!("{cores} × {model}, Linux {kernel}"))
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command.output().with_context(|| format!("{command:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
