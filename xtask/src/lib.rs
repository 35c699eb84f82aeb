//! What the `cargo xtask` driver, its live runner (`xtask/live`) and the benchmark suite's
//! driver (`bench/src/bin/bench/`) share: where things are, how the project's own builds are
//! started, and the builds themselves.
//!
//! This crate is small on purpose. `cargo xtask` compiles it before it can do anything, so it
//! depends on nothing of the host's (no wasmtime, no tonic): on a fresh machine it is ready in
//! seconds and installs the toolchains while cargo compiles the workspace. What needs the
//! test kit -- the demo and the reliability run (the `xtask-live` binary), the benchmarks (the
//! bench crate's `bench` binary) -- the workspace build compiles with everything else.

use std::path::PathBuf;
use std::process::Command;
use std::thread;

use anyhow::{Context, bail};

pub mod install;
pub mod languages;
pub mod setup;

/// The bundled plugins need no WASI (`plugins/.cargo/config.toml`), as in
/// tests/src/fixtures.rs.
pub const BUNDLED_TARGET: &str = "wasm32-unknown-unknown";
/// Fixtures and the other languages' examples build for WASI 0.2.
pub const WASI_TARGET: &str = "wasm32-wasip2";

/// Guest workspaces and their targets. Each builds into the shared target directory.
pub const GUEST_WORKSPACES: [(&str, &str); 2] =
    [("plugins", BUNDLED_TARGET), ("tests/fixtures", WASI_TARGET)];

/// The repository's root (this crate is `xtask/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

/// The one target directory every build shares: `$CARGO_TARGET_DIR`, else `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// A verb's exit status: its error on standard error, with its causes, and failure.
pub fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs `command`, echoing it; fails naming it if it cannot start or does not succeed.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = shown(command);
    eprintln!("+ {shown}");
    let status = command
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// `command` as a shell would run it, with its directory when that is not the repository's
/// root (the environment it sets or removes left out: [`cargo`]'s is always the same).
pub fn shown(command: &Command) -> String {
    let mut line = String::new();
    if let Some(dir) = command.get_current_dir()
        && dir != repo_root()
    {
        line.push_str(&format!("(in {}) ", dir.display()));
    }
    line.push_str(&command.get_program().to_string_lossy());
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// `cargo` in the repository, for the project's own builds, with [`linted`]'s settings.
pub fn cargo() -> Command {
    let mut command = cargo_unlinted();
    linted(&mut command);
    command
}

/// `cargo` in the repository, for what is not the project's own build (`cargo install`,
/// `cargo fmt`).
pub fn cargo_unlinted() -> Command {
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
pub fn without_run_env(command: &mut Command) -> &mut Command {
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

/// Clippy's lints run inside the compile, as errors: cargo hands each of the workspace's own
/// crates to `clippy-driver` (rustc with clippy's lints registered) instead of `rustc`, and
/// every dependency to `rustc` as usual. The lint pass then costs no second compile of every
/// dependency in check mode, which `cargo clippy` needs (three minutes of a fresh run here).
///
/// Every build xtask starts, and the scripts it runs that build (deploy/build.sh), carry
/// these settings: the wrapper is part of cargo's fingerprint, so a build without them would
/// compile the workspace's own crates again. A plain `cargo build` or `cargo test` from a shell
/// compiles them once more, unlinted, and leaves these untouched.
pub fn linted(command: &mut Command) -> &mut Command {
    command
        .env("RUSTC_WORKSPACE_WRAPPER", "clippy-driver")
        // clippy-driver reads its arguments from here, each followed by this separator, as
        // `cargo clippy -- -D warnings` passes them.
        .env(
            "CLIPPY_ARGS",
            "-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__",
        )
}

/// A task run by [`at_once`], and what to call it if it fails.
pub type Task<'a> = (&'static str, &'a (dyn Fn() -> anyhow::Result<()> + Sync));

/// Runs every task on a thread of its own; fails naming each one that failed.
pub fn at_once(tasks: &[Task<'_>]) -> anyhow::Result<()> {
    let failed: Vec<String> = thread::scope(|scope| {
        let running: Vec<_> = tasks
            .iter()
            .map(|(name, task)| (name, scope.spawn(task)))
            .collect();
        running
            .into_iter()
            .filter_map(|(name, handle)| match handle.join() {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(format!("{name}: {error:#}")),
                Err(_) => Some(format!("{name}: panicked")),
            })
            .collect()
    });
    if !failed.is_empty() {
        bail!("failed:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

/// Every plugin and fixture: Rust, and the examples in other languages, at once (cargo keeps
/// both cores busy only part of the time; the other languages' toolchains mostly use one).
pub fn build_plugins() -> anyhow::Result<()> {
    at_once(&[
        ("Rust plugins and fixtures", &build_rust_plugins),
        ("the other languages' plugins", &languages::build),
    ])
}

/// The Rust plugins and fixtures (no other toolchain needed), linted as they compile.
pub fn build_rust_plugins() -> anyhow::Result<()> {
    for (workspace, target) in GUEST_WORKSPACES {
        run(cargo()
            .current_dir(repo_root().join(workspace))
            .args(["build", "--release", "--target", target, "--target-dir"])
            .arg(target_dir()))?;
    }
    // Two fixtures for the bundled plugins' target as well: trap, which has no stderr there
    // (the SDK must bring a panic's message to the log too), and slow, which there is called
    // without a fiber and so holds its worker for the whole call, as the bundled plugins do.
    run(cargo()
        .current_dir(repo_root().join("tests/fixtures"))
        .args([
            "build",
            "--release",
            "--package",
            "trap",
            "--package",
            "slow",
        ])
        .arg("--target")
        .args([BUNDLED_TARGET, "--target-dir"])
        .arg(target_dir()))
}

/// Builds what the container image ships, with the script its Dockerfile runs, in the release
/// profile the tests share (the image itself links the host with LTO: `PROFILE=dist`).
pub fn build_dist() -> anyhow::Result<PathBuf> {
    let dist = target_dir().join("image");
    run(linted(without_run_env(&mut Command::new(
        repo_root().join("deploy/build.sh"),
    )))
    .arg(&dist)
    .env("CARGO_TARGET_DIR", target_dir())
    .env("PROFILE", "release"))?;
    Ok(dist)
}

/// The Envoy `cargo xtask setup` installs.
pub fn envoy_bin() -> PathBuf {
    setup::envoy_venv().join("bin/envoy")
}

/// The live runner (`xtask/live`: the demo, the reliability run), built in the release
/// profile the tests share, with `args`.
pub fn live<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run_in_release(&["--package", "xtask-live"], args)
}

/// The benchmark suite's driver (`bench/src/bin/bench/`), built in the release profile the
/// tests share, with `args`.
pub fn bench<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run_in_release(&["--package", "extproc-bench", "--bin", "bench"], args)
}

/// `cargo run` of the binary `selected` names, with `args`, pointed at the Envoy
/// [`envoy_bin`] names.
fn run_in_release<I, S>(selected: &[&str], args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = cargo();
    command
        .args(["run", "--quiet", "--release"])
        .args(selected)
        .arg("--")
        .args(args)
        .env("ENVOY_BIN", envoy_bin());
    command
}
