//! The verbs of `cargo xtask` that run the system live, through a real Envoy: the demo and the
//! reliability run. They need the test kit (Envoy's configuration, the host's processes, gRPC
//! clients), so they live in this binary, which the workspace build compiles with everything
//! else, and not in the driver (`xtask/`), which must be ready in seconds on a fresh machine.
//! `cargo xtask <verb>` runs this with the same arguments. The benchmark suite, which runs the
//! system the same way, is the bench crate's `bench` binary (`bench/src/bin/bench/`).

#![expect(clippy::print_stdout, reason = "the demo prints what `curl -i` would")]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use extproc_testkit::envoy::{self, Envoy};
use extproc_testkit::process::{KillOnDrop, wait_until_ready};

mod reliability;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Run the ASM demo: Envoy on :8000 -> wasm-extproc on :9002 with the bundled plugin ->
    /// httpbin (PyPI, served by gunicorn) on :8080. Shows `curl -i /headers`, then serves
    /// until Ctrl-C.
    Demo(DemoOptions),
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
}

#[derive(Debug, clap::Args)]
struct DemoOptions {
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
}

fn main() -> std::process::ExitCode {
    xtask::exit_code(dispatch(Cli::parse().command))
}

fn dispatch(verb: Verb) -> anyhow::Result<()> {
    match verb {
        Verb::Demo(options) => {
            xtask::setup::demo()?;
            demo(&options)
        }
        Verb::Reliability {
            requests,
            concurrency,
            soak,
        } => {
            xtask::setup::base()?;
            xtask::build_rust_plugins()?;
            let load = match soak {
                Some(seconds) => reliability::Load::For(Duration::from_secs(seconds)),
                None => reliability::Load::Requests(requests),
            };
            reliability::run(load, concurrency)
        }
    }
}

/// Starts what the container image holds -- the release binary and the bundled plugin, built
/// by deploy/build.sh -- as an operator would.
fn demo(options: &DemoOptions) -> anyhow::Result<()> {
    let dist = xtask::build_dist()?;
    let plugins = dist.join("plugins");
    let ext_proc: SocketAddr = ([127, 0, 0, 1], options.ext_proc_port).into();
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
    let upstream: SocketAddr = ([127, 0, 0, 1], options.upstream_port).into();
    let mut httpbin = KillOnDrop(
        Command::new(xtask::setup::httpbin_venv().join("bin/gunicorn"))
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
        let config = envoy::render_config(options.port, ext_proc, upstream, 0)?;
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
        if !options.once {
            eprintln!("\nServing: try `curl -i {url}`. Ctrl-C stops.");
            tokio::signal::ctrl_c().await?;
        }
        Ok(())
    })
}
