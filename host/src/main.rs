use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use wasm_extproc::config::{Cli, Command, Config, DEFAULT_CHAIN};
use wasm_extproc::{Host, Listeners, shutdown, telemetry};

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
    let result = match cli.command {
        Some(Command::Check) => check(config).await,
        None => serve(config, cli).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wasm-extproc: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads everything a server would, reports, and exits.
async fn check(config: Config) -> anyhow::Result<()> {
    let host = Host::load(&config).await?;
    let generation = host.current().context("nothing loaded")?;
    for plugin in generation.plugins() {
        let registration = plugin.registration();
        let needs = registration.envoy_needs();
        eprintln!(
            "ok  {}  {}  sha256:{}  contract:{}  phases:{:?}  needs from Envoy's processing_mode: {}",
            // Named chains' plugins as chain/plugin, as their files lie.
            if plugin.chain() == DEFAULT_CHAIN {
                plugin.name().to_string()
            } else {
                format!("{}/{}", plugin.chain(), plugin.name())
            },
            plugin.path().display(),
            plugin.digest(),
            plugin.contract().version(),
            plugin.phases(),
            if needs.is_empty() {
                "its defaults (headers sent)".to_string()
            } else {
                needs.join("; ")
            }
        );
    }
    eprintln!(
        "{} plugin(s) in {} chain(s) in {} load, link and register against this host",
        generation.plugins().count(),
        generation.chains().len(),
        config.settings.plugins_dir.display()
    );
    Ok(())
}

/// Listens first (health answers NOT_SERVING while plugins compile), then loads the plugins;
/// a plugin that fails to load stops start-up.
async fn serve(config: Config, cli: Cli) -> anyhow::Result<()> {
    let host = Host::with_source(
        config.clone(),
        Box::new(move || Config::load(&cli).map(|c| c.settings)),
    )?;
    // Before listening: a SIGTERM from the moment the port is open must drain, not kill.
    let stop = shutdown::signal();
    let listeners = Listeners::bind(&config).await?;
    let serving = host.serve(listeners, stop);
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => return result,
        loaded = host.reload() => { loaded?; }
    }
    tokio::select! {
        result = &mut serving => result,
        () = shutdown::reload_requests(&host) => Ok(()),
    }
}
