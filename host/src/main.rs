use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use wasm_extproc::config::{Cli, Command, Config, DEFAULT_CHAIN};
use wasm_extproc::{Host, Listeners, authoring, shutdown, telemetry};

/// `EX_USAGE`: the configuration is wrong, retrying will not help.
const EXIT_CONFIG: u8 = 64;

/// A stream allocates and frees its messages, answers and plugin instances' host state on
/// whichever worker serves it: with mimalloc's per-thread pages that takes about a third of
/// the instructions glibc's malloc and free spend (`cargo xtask bench --only counts`). The
/// module in Envoy's process uses it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // `test` reports on stdout; the host's own progress would only crowd it, and the
    // plugins' lines go into the report, under the exchange they belong to.
    let (log_filter, more_layers) = match cli.command {
        Some(Command::Test { .. }) => ("warn,plugin=off", test_layers()),
        _ => ("info", Vec::new()),
    };
    if let Some(Command::New {
        name,
        lang,
        dir,
        sdk,
    }) = &cli.command
    {
        return match authoring::templates::write(dir, name, *lang, sdk) {
            Ok(project) => {
                eprintln!(
                    "wrote {}: ./build.sh, then wasm-extproc test --plugin {name}.wasm \
                     exchanges.yaml, then wasm-extproc dev {name}.wasm (its README says more)",
                    project.display()
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("wasm-extproc: {error}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    if let Some(result) = signing(cli.command.as_ref()) {
        let _ = telemetry::init(cli.log_format, log_filter, None);
        return exit_code(result);
    }
    let config = match Config::load(&cli) {
        Ok(config) => config,
        Err(error) => {
            let _ = telemetry::init(cli.log_format, log_filter, None);
            eprintln!("wasm-extproc: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let tracing = match telemetry::init_with(
        cli.log_format,
        log_filter,
        config.tracing.as_ref(),
        more_layers,
    ) {
        Ok(tracing) => tracing,
        Err(error) => {
            eprintln!("wasm-extproc: {error:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let code = match cli.command {
        Some(Command::Check) => exit_code(check(config).await),
        Some(Command::Test {
            plugin,
            plugin_config,
            compare,
            replacing,
            exchanges,
        }) => {
            let under_test = match (plugin, compare) {
                (Some(plugin), _) => UnderTest::Alone(plugin, plugin_config),
                (None, Some(candidate)) => UnderTest::Candidate(candidate, replacing),
                (None, None) => UnderTest::Directory,
            };
            let mut config = config;
            if config.settings.cache_dir.is_none() {
                config.settings.cache_dir = user_cache_dir();
            }
            test(config, under_test, &exchanges).await
        }
        Some(Command::Dev {
            ref port,
            ref envoy,
            ref plugins,
        }) => {
            let dev = wasm_extproc::dev::Dev {
                port: *port,
                envoy: envoy.clone(),
                plugins: plugins.clone(),
            };
            exit_code(wasm_extproc::dev::run(config, cli, dev).await)
        }
        Some(_) => unreachable!("new and the signing commands ran above"),
        None => exit_code(serve(config, cli).await),
    };
    if let Some(tracing) = tracing {
        tracing.shutdown();
    }
    code
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wasm-extproc: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `test`'s plugin log ([`authoring::plugin_log`]): the plugins' lines at info and above.
fn test_layers()
-> Vec<Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>> {
    use tracing_subscriber::Layer;
    let targets = tracing_subscriber::filter::Targets::new()
        .with_target("plugin", tracing::level_filters::LevelFilter::INFO);
    vec![authoring::plugin_log().clone().with_filter(targets).boxed()]
}

/// Where `test` keeps compiled plugins when no cache directory is configured: the user's cache
/// (`$XDG_CACHE_HOME/wasm-extproc`, else `~/.cache/wasm-extproc`), so that a JavaScript or
/// Python plugin, seconds to compile, compiles once and not at every run. wasmtime keys each
/// entry by the component's bytes and the engine's settings: a rebuilt plugin compiles again.
fn user_cache_dir() -> Option<PathBuf> {
    let absolute = |dir: std::ffi::OsString| Some(PathBuf::from(dir)).filter(|d| d.is_absolute());
    std::env::var_os("XDG_CACHE_HOME")
        .and_then(absolute)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(absolute)
                .map(|home| home.join(".cache"))
        })
        .map(|cache| cache.join("wasm-extproc"))
}

/// Loads everything a server would, reports, and exits.
async fn check(config: Config) -> anyhow::Result<()> {
    let host = Host::load(&config).await?;
    let generation = host.current().context("nothing loaded")?;
    for plugin in generation.plugins() {
        let registration = plugin.registration();
        let needs = registration.envoy_needs();
        eprintln!(
            "ok  {}{}  {}  sha256:{}  contract:{}  {}  phases:{:?}  needs from Envoy's processing_mode: {}",
            // Named chains' plugins as chain/plugin, as their files lie.
            if plugin.chain() == DEFAULT_CHAIN {
                plugin.name().to_string()
            } else {
                format!("{}/{}", plugin.chain(), plugin.name())
            },
            match &plugin.settings().shadows {
                Some(beside) => format!(" (shadow of {beside}: compared, never applied)"),
                None => String::new(),
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

/// What `test` plays the exchanges through.
enum UnderTest {
    /// The plugins directory, as configured.
    Directory,
    /// One component, with its configuration string if given.
    Alone(PathBuf, Option<String>),
    /// The plugins directory with a candidate in place of one plugin (named, or found).
    Candidate(PathBuf, Option<String>),
}

/// Plays exchange files: 0 when every exchange came out as expected, 1 when one did not,
/// [`EXIT_CONFIG`] when a file or a plugin is unusable.
async fn test(mut config: Config, under_test: UnderTest, exchanges: &[PathBuf]) -> ExitCode {
    let prepared = match under_test {
        UnderTest::Directory => Ok(None),
        UnderTest::Alone(plugin, plugin_config) => authoring::alone(&plugin).map(|(dir, name)| {
            if let Some(value) = plugin_config {
                let defaults = config.settings.defaults.clone();
                config
                    .settings
                    .plugins
                    .entry(name)
                    .or_insert(defaults)
                    .config = value;
            }
            Some(dir)
        }),
        UnderTest::Candidate(candidate, replacing) => authoring::with_candidate(
            &config.settings.plugins_dir,
            &candidate,
            replacing.as_deref(),
        )
        .map(Some),
    };
    // The directory lives until the run ends.
    let _dir = match prepared {
        Ok(dir) => {
            if let Some(dir) = &dir {
                config.settings.plugins_dir = dir.path().to_path_buf();
            }
            dir
        }
        Err(error) => {
            eprintln!("wasm-extproc: {error:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match authoring::test(&config, exchanges, &mut std::io::stdout()).await {
        Ok(summary) if summary.failed == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("wasm-extproc: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
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
            Some(
                Command::Check | Command::Test { .. } | Command::New { .. } | Command::Dev { .. },
            )
            | None => {
                unreachable!("not a signing command")
            }
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
    // Before listening: a SIGTERM from the moment the port is open must drain, not kill; a
    // SIGHUP from then on reloads once the first load is done.
    let stop = shutdown::signal();
    let hangups = shutdown::hangups();
    let listeners = Listeners::bind(&config).await?;
    let serving = host.serve(listeners, stop);
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => return result,
        loaded = host.reload() => { loaded?; }
    }
    tokio::select! {
        result = &mut serving => result,
        () = hangups.reload_on_each(|| async {
            // The registry logs a failed reload; the previous chain keeps serving.
            let _ = host.reload().await;
        }) => Ok(()),
    }
}
