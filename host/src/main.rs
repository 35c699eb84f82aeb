use std::process::ExitCode;

use clap::Parser;
use wasm_extproc::config::{Cli, Config};
use wasm_extproc::{Host, shutdown, telemetry};

/// `EX_USAGE`: the configuration is wrong, retrying will not help.
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let config = match Config::load(&cli) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("wasm-extproc: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wasm-extproc: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let host = Host::load(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    host.serve(listener, shutdown::signal()).await
}
