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
    if let Some(result) = signing(cli.command.as_ref()) {
        let _ = telemetry::init(cli.log_format, None);
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("wasm-extproc: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(&cli) {
        Ok(config) => config,
        Err(error) => {
            let _ = telemetry::init(cli.log_format, None);
            eprintln!("wasm-extproc: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let tracing = match telemetry::init(cli.log_format, config.tracing.as_ref()) {
        Ok(tracing) => tracing,
        Err(error) => {
            eprintln!("wasm-extproc: {error:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command {
        Some(Command::Check) => check(config).await,
        Some(_) => unreachable!("signing commands ran above"),
        None => serve(config, cli).await,
    };
    if let Some(tracing) = tracing {
        tracing.shutdown();
    }
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
            "ok  {}  {}  sha256:{}  contract:{}  {}  phases:{:?}  needs from Envoy's processing_mode: {}",
            // Named chains' plugins as chain/plugin, as their files lie.
            if plugin.chain() == DEFAULT_CHAIN {
                plugin.name().to_string()
            } else {
                format!("{}/{}", plugin.chain(), plugin.name())
            },
            plugin.path().display(),
            plugin.digest(),
            plugin.contract().version(),
            plugin.signature(),
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

/// The key and signature commands, which need no configuration; `None` for the others.
fn signing(command: Option<&Command>) -> Option<anyhow::Result<()>> {
    use wasm_extproc::config::SigningSettings;
    use wasm_extproc::signing::{Trust, detached};
    use wasmsign2::{KeyPair, Module};
    let run = || -> anyhow::Result<()> {
        match command {
            Some(Command::Keygen {
                secret_key,
                public_key,
            }) => {
                let pair = KeyPair::generate();
                std::fs::write(secret_key, pair.sk.to_pem())
                    .with_context(|| format!("writing {}", secret_key.display()))?;
                std::fs::write(public_key, pair.pk.to_pem())
                    .with_context(|| format!("writing {}", public_key.display()))?;
                eprintln!(
                    "wrote {} (secret) and {} (public: list it in [signing] trusted_keys)",
                    secret_key.display(),
                    public_key.display()
                );
            }
            Some(Command::Sign {
                secret_key,
                detached: detach,
                plugin,
            }) => {
                let key = wasmsign2::SecretKey::from_any_file(secret_key)
                    .with_context(|| format!("reading the secret key {}", secret_key.display()))?;
                let module = Module::deserialize_from_file(plugin)
                    .with_context(|| format!("reading {}", plugin.display()))?;
                let signed = key.sign(module, None).context("signing")?;
                if *detach {
                    let (_, signature) = signed.detach_signature().context("detaching")?;
                    std::fs::write(detached(plugin), signature)?;
                    eprintln!("wrote {}", detached(plugin).display());
                } else {
                    signed
                        .serialize_to_file(plugin)
                        .with_context(|| format!("writing {}", plugin.display()))?;
                    eprintln!("signed {}", plugin.display());
                }
            }
            Some(Command::Verify {
                public_keys,
                plugin,
            }) => {
                let trust = Trust::load(&SigningSettings {
                    require_signatures: true,
                    trusted_keys: public_keys.clone(),
                })?;
                let bytes = std::fs::read(plugin)
                    .with_context(|| format!("reading {}", plugin.display()))?;
                let signature = trust
                    .check(plugin, &bytes)
                    .map_err(|reason| anyhow::anyhow!("{}: {reason}", plugin.display()))?;
                eprintln!("{}: {signature}", plugin.display());
            }
            Some(Command::Check) | None => unreachable!("not a signing command"),
        }
        Ok(())
    };
    match command {
        Some(Command::Keygen { .. } | Command::Sign { .. } | Command::Verify { .. }) => Some(run()),
        _ => None,
    }
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
