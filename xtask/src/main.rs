//! The project's verbs, in one place that knows the toolchains:
//!
//! - `cargo xtask setup`          install what builds and tests need (wasm target, Envoy,
//!   the deploy validators, the example plugins' toolchains)
//! - `cargo xtask build-plugins`  build the bundled plugins and test fixtures into components
//! - `cargo xtask demo`           the ASM guide's result on this machine, through a real Envoy
//! - `cargo xtask test`           every check and test; what CI runs
//! - `cargo xtask bench`          the benchmark suite, into BENCHMARKS.md

#![expect(clippy::print_stdout, reason = "the demo prints what `curl -i` would")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use extproc_testkit::envoy::{self, Envoy};
use extproc_testkit::fixtures::{BUNDLED_TARGET, WASI_TARGET};
use extproc_testkit::process::{KillOnDrop, wait_until_ready};
use extproc_testkit::repo_root;

mod bench;
mod languages;
mod reliability;
mod setup;

/// Guest workspaces and their targets (`plugins/.cargo/config.toml` explains the bundled
/// plugins' one). Each builds into the shared target directory.
const GUEST_WORKSPACES: [(&str, &str); 2] =
    [("plugins", BUNDLED_TARGET), ("tests/fixtures", WASI_TARGET)];

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
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
    /// until Ctrl-C.
    Demo {
        /// Show the response and exit instead of serving.
        #[arg(long)]
        once: bool,
        /// Envoy's listener port.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// wasm-extproc's port.
        #[arg(long, default_value_t = 9002)]
        ext_proc_port: u16,
        /// httpbin's port.
        #[arg(long, default_value_t = 8080)]
        upstream_port: u16,
    },
    /// Formatting, lints, unit and system tests, and the demo: what CI runs.
    Test,
    /// The measured proof of isolation: requests through Envoy and a chain of the ASM plugin
    /// and a plugin that traps on 1% of them, once fail-open and once fail-closed. Writes
    /// target/reliability.md, and fails if any figure is off (a lost, duplicated or wrongly
    /// answered request, an Envoy ext_proc error, memory or descriptors not flat).
    Reliability {
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Keep the load on for this many seconds per policy instead of sending `--requests`,
        /// and report the host's memory and descriptors over time.
        #[arg(long, value_name = "SECONDS")]
        soak: Option<u64>,
    },
    /// The benchmark suite: in-process criterion benchmarks, memory against open streams, and
    /// four setups through a real Envoy (none, Lua, wasm-extproc, a native ext_proc server).
    /// Writes BENCHMARKS.md, bench/plots/ and bench/results.json. Not part of `test`.
    Bench(bench::Options),
}

fn main() -> std::process::ExitCode {
    match dispatch(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(verb: Verb) -> anyhow::Result<()> {
    match verb {
        Verb::Setup => setup::all(),
        Verb::BuildPlugins => build_plugins(),
        Verb::Demo {
            once,
            port,
            ext_proc_port,
            upstream_port,
        } => {
            setup::demo()?;
            demo(once, port, ext_proc_port, upstream_port)
        }
        Verb::Test => test(),
        Verb::Reliability {
            requests,
            concurrency,
            soak,
        } => {
            setup::base()?;
            build_rust_plugins()?;
            let load = match soak {
                Some(seconds) => reliability::Load::For(Duration::from_secs(seconds)),
                None => reliability::Load::Requests(requests),
            };
            reliability::run(load, concurrency)
        }
        Verb::Bench(options) => bench::run_suite(&options),
    }
}

pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    eprintln!("+ {shown}");
    let status = command
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

pub(crate) fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(repo_root());
    without_run_env(&mut command);
    command
}

/// Removes from `command`'s environment what `cargo run` set for xtask itself
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, ...). Build scripts that watch those variables
/// (ring's does) would otherwise see them change between a build started here and one started
/// from a shell, and rebuild -- ring, then rustls, tonic and everything above them, on every
/// run.
pub(crate) fn without_run_env(command: &mut Command) -> &mut Command {
    const SET_BY_CARGO_RUN: [&str; 5] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
    ];
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_") || SET_BY_CARGO_RUN.contains(&name.as_ref()) {
            command.env_remove(name.as_ref());
        }
    }
    command
}

pub(crate) fn target_dir() -> PathBuf {
    extproc_testkit::fixtures::target_dir()
}

/// Builds what the container image ships, with the script its Dockerfile runs, in the release
/// profile the tests share (the image itself links the host with LTO: `PROFILE=dist`).
fn build_dist() -> anyhow::Result<PathBuf> {
    let dist = target_dir().join("image");
    run(
        without_run_env(&mut Command::new(repo_root().join("deploy/build.sh")))
            .arg(&dist)
            .env("CARGO_TARGET_DIR", target_dir())
            .env("PROFILE", "release"),
    )?;
    Ok(dist)
}

/// Every plugin and fixture: Rust, and the examples in other languages.
fn build_plugins() -> anyhow::Result<()> {
    build_rust_plugins()?;
    languages::build()
}

/// The Rust plugins and fixtures (no other toolchain needed).
fn build_rust_plugins() -> anyhow::Result<()> {
    for (workspace, target) in GUEST_WORKSPACES {
        run(cargo()
            .current_dir(repo_root().join(workspace))
            .args(["build", "--release", "--target", target, "--target-dir"])
            .arg(target_dir()))?;
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    let mut clock = Clock::default();
    let result = test_timed(&mut clock);
    clock.report();
    result
}

/// Every check, each phase timed on `clock`.
fn test_timed(clock: &mut Clock) -> anyhow::Result<()> {
    clock.time("setup: toolchains, Envoy, Redis, validators", setup::all)?;
    clock.time("rustfmt", || {
        run(cargo().args(["fmt", "--all", "--check"]))?;
        for (workspace, _) in GUEST_WORKSPACES {
            run(cargo()
                .current_dir(repo_root().join(workspace))
                .args(["fmt", "--all", "--check"]))?;
        }
        Ok(())
    })?;
    clock.time("plugins and fixtures (wasm, four languages)", build_plugins)?;
    clock.time("clippy: guests", || {
        for (workspace, target) in GUEST_WORKSPACES {
            run(cargo()
                .current_dir(repo_root().join(workspace))
                .args(["clippy", "--release", "--target", target, "--target-dir"])
                .arg(target_dir())
                .args(["--", "-D", "warnings"]))?;
        }
        Ok(())
    })?;
    clock.time("clippy: workspace", || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    // The fuzz target (fuzz/, its own workspace: cargo-fuzz instruments all it builds) is one
    // call into `wasm_extproc::ext_proc::fuzz`, which the workspace builds, lints and tests.
    // The in-process module, which the conformance tests load into Envoy.
    clock.time("in-process module: build", || {
        run(cargo().args(["build", "--release", "--package", "wasm-extproc-module"]))
    })?;
    let envoy = setup::envoy_venv().join("bin/envoy");
    clock.time("tests: build", || {
        run(cargo()
            .args(["test", "--release", "--workspace", "--no-run"])
            .env("ENVOY_BIN", &envoy))
    })?;
    let (mut passed, mut failed) = clock.time("tests: run", || {
        // cargo-nextest, where installed (.config/nextest.toml): every binary's tests in one
        // pool, each in its own process, and each test's time. Otherwise cargo's own runner,
        // one binary after another.
        let (mut command, format) = if nextest_installed() {
            let mut command = cargo();
            command.args([
                "nextest",
                "run",
                "--release",
                "--workspace",
                "--no-fail-fast",
            ]);
            (command, Format::Nextest)
        } else {
            let mut command = cargo();
            command.args(["test", "--release", "--workspace", "--no-fail-fast"]);
            (command, Format::Cargo)
        };
        run_tests(command.env("ENVOY_BIN", &envoy), format)
    })?;
    clock.time("the image's build (deploy/build.sh)", build_dist)?;
    // Load held: the shipped settings carry thousands of exchanges in flight through Envoy
    // with no error (the benchmark's concurrency run, reduced).
    clock.time("benchmark baselines: build", || {
        run(cargo().args(["build", "--release", "--package", "extproc-bench"]))
    })?;
    clock.time("concurrency check", bench::concurrency::check)?;
    passed += 1;
    // Isolation under load, at a size that fits CI: fails on any request lost, duplicated or
    // wrongly answered, on any Envoy ext_proc error, and on memory that does not stay flat.
    clock.time("reliability run", || {
        reliability::run(reliability::Load::Requests(2_000), 32)
    })?;
    passed += 1;
    // Benchmarks are not run here (`cargo xtask bench` runs them); `clippy --all-targets`
    // above has compiled and linted them, and the baselines in bench/ were built for the
    // concurrency check.
    let (deploy_passed, deploy_failed) = clock.time("deploy tests (pytest)", || {
        run_tests(
            Command::new(setup::tools_venv().join("bin/pytest"))
                .args(["-q", "-p", "no:cacheprovider"])
                .arg(repo_root().join("deploy/tests"))
                .env("ENVOY_BIN", &envoy)
                .env("CARGO_TARGET_DIR", target_dir()),
            Format::Pytest,
        )
    })?;
    passed += deploy_passed;
    failed += deploy_failed;
    if failed > 0 {
        println!("tests: {passed} passed, {failed} failed");
        bail!("{failed} tests failed");
    }
    clock.time("demo", || demo(true, 8000, 9002, 8080))?;
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// Where `cargo xtask test`'s time goes, phase by phase, so that the change that slows it
/// shows.
#[derive(Debug)]
struct Clock {
    phases: Vec<(&'static str, Duration)>,
}

impl Default for Clock {
    /// A clock whose first phase is what came before xtask ran: cargo building xtask itself
    /// (and with it the test kit and the host, in the release profile the tests share).
    fn default() -> Self {
        let phases = match time_since_parent_started() {
            Some(before) => vec![("cargo xtask: building xtask (release profile)", before)],
            None => Vec::new(),
        };
        Clock { phases }
    }
}

/// How long ago the process that started this one (`cargo`) started, from `/proc`.
fn time_since_parent_started() -> Option<Duration> {
    let stat = std::fs::read_to_string(format!(
        "/proc/{}/stat",
        std::os::unix::process::parent_id()
    ))
    .ok()?;
    // Field 22, counted after the command name's closing parenthesis (which may hold spaces).
    let after_name = &stat[stat.rfind(')')? + 2..];
    let started_ticks: f64 = after_name.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // The kernel's USER_HZ, 100 on Linux.
    let started = started_ticks / 100.0;
    (uptime > started).then(|| Duration::from_secs_f64(uptime - started))
}

impl Clock {
    /// Runs `phase`, timed as `name`.
    fn time<T>(
        &mut self,
        name: &'static str,
        phase: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let started = Instant::now();
        let result = phase();
        self.phases.push((name, started.elapsed()));
        result
    }

    /// The table of phases and seconds, and the total, on standard error.
    fn report(&self) {
        let total: Duration = self.phases.iter().map(|(_, took)| *took).sum();
        eprintln!("\nwhere the time went:\n");
        eprintln!("| phase | seconds |\n|---|---:|");
        for (name, took) in &self.phases {
            eprintln!("| {name} | {:.0} |", took.as_secs_f64());
        }
        eprintln!("| **total** | **{:.0}** |", total.as_secs_f64());
    }
}

fn nextest_installed() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A test runner's summary lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `test result: ok. N passed; M failed; ...`, once per test binary.
    Cargo,
    /// `Summary [ 413.2s] N tests run: N passed (5 slow), M failed, 0 skipped`, on stderr.
    Nextest,
    /// `M failed, N passed in 4.52s`.
    Pytest,
}

impl Format {
    /// The counts `line` gives, if it is a summary line.
    fn summary(self, line: &str) -> Option<&str> {
        match self {
            Format::Cargo => line.strip_prefix("test result: "),
            Format::Nextest => {
                let line = line.trim_start().strip_prefix("Summary [")?;
                let (_, counts) = line.split_once(" run: ")?;
                Some(counts)
            }
            Format::Pytest => {
                let (counts, took) = line.trim_matches(['=', ' ']).rsplit_once(" in ")?;
                let seconds = took.split_whitespace().next()?.strip_suffix('s')?;
                seconds.parse::<f64>().ok()?;
                Some(counts)
            }
        }
    }
}

/// Adds up `N passed` and `M failed` (or `timed out`) in a summary's parts.
fn counts(summary: &str) -> (u64, u64) {
    let (mut passed, mut failed) = (0, 0);
    for part in summary.split(['.', ';', ',']) {
        let mut words = part.split_whitespace();
        match (words.next().map(str::parse::<u64>), words.next()) {
            (Some(Ok(n)), Some("passed")) => passed += n,
            (Some(Ok(n)), Some("failed" | "timed")) => failed += n,
            _ => {}
        }
    }
    (passed, failed)
}

/// Runs a test runner, passing its output through, and adds up what its summary lines report.
fn run_tests(command: &mut Command, format: Format) -> anyhow::Result<(u64, u64)> {
    eprintln!("+ {command:?}");
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let read = |stream: Box<dyn std::io::Read + Send>, to_stderr: bool| {
        std::thread::spawn(move || -> std::io::Result<(u64, u64)> {
            let (mut passed, mut failed) = (0, 0);
            for line in BufReader::new(stream).lines() {
                let line = line?;
                if to_stderr {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
                if let Some(summary) = format.summary(&line) {
                    let (p, f) = counts(summary);
                    passed += p;
                    failed += f;
                }
            }
            Ok((passed, failed))
        })
    };
    let out = read(Box::new(stdout), false);
    let err = read(Box::new(stderr), true);
    let (passed_out, failed_out) = out.join().expect("reader")?;
    let (passed_err, failed_err) = err.join().expect("reader")?;
    let (passed, failed) = (passed_out + passed_err, failed_out + failed_err);
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("{command:?} failed: {status}");
    }
    Ok((passed, failed))
}

/// Starts what the container image holds -- the release binary and the bundled plugin, built
/// by deploy/build.sh -- as an operator would.
fn demo(once: bool, port: u16, ext_proc_port: u16, upstream_port: u16) -> anyhow::Result<()> {
    let dist = build_dist()?;
    let plugins = dist.join("plugins");
    let ext_proc: SocketAddr = ([127, 0, 0, 1], ext_proc_port).into();
    let mut host = KillOnDrop(
        Command::new(dist.join("bin/wasm-extproc"))
            .arg("--listen")
            .arg(ext_proc.to_string())
            .arg("--plugins-dir")
            .arg(&plugins)
            .args(["--admin-listen", "127.0.0.1:9003"])
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start wasm-extproc")?,
    );
    wait_until_ready(([127, 0, 0, 1], 9003).into(), &mut host.0)?;

    // The guide checks its setup against httpbin: the demo's upstream is httpbin itself.
    let upstream: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
    let mut httpbin = KillOnDrop(
        Command::new(setup::httpbin_venv().join("bin/gunicorn"))
            .args(["--workers", "2", "--bind"])
            .arg(upstream.to_string())
            .arg("httpbin:app")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start httpbin")?,
    );
    extproc_testkit::process::wait_for_port(upstream, &mut httpbin.0)
        .context("httpbin did not start")?;

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let config = envoy::render_config(port, ext_proc, upstream, 0)?;
        let envoy = Envoy::start_with_config(&config).await?;
        let url = format!("http://127.0.0.1:{}/headers", envoy.listener.port());
        let response = envoy.get("/headers").await?;
        println!("$ curl -i {url}");
        println!("HTTP/1.1 {}", response.status);
        for (name, value) in &response.headers {
            println!("{name}: {value}");
        }
        println!();
        print!("{}", String::from_utf8_lossy(&response.body));

        let tagged_response = response.header_values("x-ext-proc-header") == ["hello-from-asm"];
        let tagged_request = response.json()?["headers"]["X-Ext-Proc-Header"] == "hello-to-asm";
        if !(tagged_response && tagged_request) {
            bail!("the demo did not show both ASM headers");
        }
        if !once {
            eprintln!("\nServing: try `curl -i {url}`. Ctrl-C stops.");
            tokio::signal::ctrl_c().await?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::{Format, counts};

    #[test]
    fn each_runners_summary_is_counted_and_nothing_else() {
        let cases = [
            (
                Format::Cargo,
                "test result: FAILED. 40 passed; 2 failed; 0 ignored; 0 measured",
                Some((40, 2)),
            ),
            (
                Format::Nextest,
                "     Summary [ 413.205s] 282 tests run: 282 passed (5 slow), 0 skipped",
                Some((282, 0)),
            ),
            (
                Format::Nextest,
                "     Summary [  13.2s] 9 tests run: 6 passed, 2 failed, 1 timed out, 0 skipped",
                Some((6, 3)),
            ),
            (
                Format::Pytest,
                "1 failed, 51 passed in 4.52s",
                Some((51, 1)),
            ),
            (
                Format::Pytest,
                "============ 52 passed in 3.01s ============",
                Some((52, 0)),
            ),
            // A test's own output that looks like a summary is not one.
            (Format::Pytest, "2 passed, 0 failed in the report", None),
            (Format::Nextest, "test result: ok. 3 passed", None),
            (Format::Cargo, "  2 exchange(s), 2 passed, 0 failed", None),
        ];
        for (format, line, want) in cases {
            assert_eq!(format.summary(line).map(counts), want, "{format:?}: {line}");
        }
    }
}
