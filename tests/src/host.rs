//! A wasm-extproc host in this process, on ephemeral ports, with its plugins copied into a
//! temporary directory under the names the test chooses (which fixes their order).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Parser;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::fixtures::Component;
use wasm_extproc::metrics::Metrics;
use wasm_extproc::{Config, Host, Listener, Listeners};

/// A running host. Stops when dropped.
#[derive(Debug)]
pub struct RunningHost {
    /// The gRPC (ext_proc and health) listener.
    pub address: SocketAddr,
    /// The admin HTTP listener.
    pub admin: SocketAddr,
    host: Arc<Host>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    dir: PluginDir,
}

/// Where the host's plugins live: a temporary directory, or one the test manages.
#[derive(Debug)]
enum PluginDir {
    Temporary(tempfile::TempDir),
    Given(PathBuf),
}

impl PluginDir {
    fn path(&self) -> &Path {
        match self {
            PluginDir::Temporary(dir) => dir.path(),
            PluginDir::Given(path) => path,
        }
    }
}

/// A plugin directory: `(file name without .wasm, component)` in any order.
pub fn plugin_dir(plugins: &[(&str, Component)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, component) in plugins {
        // `checkout/10-auth`: the plugin `10-auth` of the chain `checkout`.
        let path = dir.path().join(format!("{name}.wasm"));
        std::fs::create_dir_all(path.parent().unwrap()).expect("chain directory");
        std::fs::copy(component.path(), path).expect("copy fixture");
    }
    dir
}

/// The configuration a test gives: the TOML text, with the plugins directory and loopback
/// listeners on ephemeral ports filled in.
pub fn config(dir: &Path, toml: &str) -> Config {
    let mut text = format!("plugins_dir = {:?}\n", dir.display().to_string());
    for (key, value) in [("listen", "127.0.0.1:0"), ("admin_listen", "127.0.0.1:0")] {
        if !toml
            .lines()
            .any(|line| line.starts_with(&format!("{key} ")))
        {
            text.push_str(&format!("{key} = \"{value}\"\n"));
        }
    }
    text.push_str(toml);
    // Tests run unoptimised and in parallel on small machines: a 20 ms call budget can run out
    // for reasons that have nothing to do with the plugin. Tests about budgets set their own.
    if !toml.contains("[defaults]") {
        text.push_str("\n[defaults]\ntimeout_ms = 1000\n");
    }
    if !toml.contains("[envoy]") {
        text.push_str("\n[envoy]\nmessage_timeout_ms = 10000\n");
    }
    // Tests run many hosts in one process at once, and the shipped pool reserves some 60 TiB
    // of address space: a smaller one each, unless the test sets [runtime] itself.
    if !toml.contains("[runtime]") {
        text.push_str("\n[runtime]\nmax_instances = 1000\nmax_wasi_instances = 1000\n");
    }
    let mut config = Config::from_toml(&text, Path::new("test.toml")).expect("valid test config");
    if config.settings.cache_dir.is_none() {
        config.settings.cache_dir = Some(crate::fixtures::compile_cache());
    }
    config
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

impl RunningHost {
    /// Loads `plugins` with the settings in `toml` and serves on 127.0.0.1. The host's log goes
    /// to the test's output (shown for failing tests), filtered by `RUST_LOG` (default `warn`).
    pub async fn start(plugins: &[(&str, Component)], toml: &str) -> RunningHost {
        let dir = plugin_dir(plugins);
        let config = config(dir.path(), toml);
        Self::start_with(config, PluginDir::Temporary(dir), true).await
    }

    /// Serves the plugins in `dir`, which the test may change while the host runs.
    pub async fn start_in(dir: &Path, toml: &str) -> RunningHost {
        let config = config(dir, toml);
        Self::start_with(config, PluginDir::Given(dir.to_path_buf()), true).await
    }

    /// Serves with the configuration file at `path` (which must name loopback listeners with
    /// port 0), re-read on every reload as the binary does.
    pub async fn start_from_file(path: &Path) -> RunningHost {
        init_logging();
        let cli = wasm_extproc::config::Cli::parse_from([
            "wasm-extproc",
            "--config",
            &path.display().to_string(),
        ]);
        let config = Config::load(&cli).expect("valid config file");
        let dir = PluginDir::Given(config.settings.plugins_dir.clone());
        let host = Host::with_source(
            config.clone(),
            Box::new(move || Config::load(&cli).map(|c| c.settings)),
        )
        .expect("host builds");
        Self::serve(Arc::new(host), config, dir, true).await
    }

    /// Serves without loading the plugins: health says NOT_SERVING until [`load`](Self::load).
    pub async fn start_unloaded(plugins: &[(&str, Component)], toml: &str) -> RunningHost {
        let dir = plugin_dir(plugins);
        let config = config(dir.path(), toml);
        Self::start_with(config, PluginDir::Temporary(dir), false).await
    }

    async fn start_with(config: Config, dir: PluginDir, load: bool) -> RunningHost {
        init_logging();
        let host = Arc::new(Host::new(config.clone()).expect("host builds"));
        Self::serve(host, config, dir, load).await
    }

    async fn serve(host: Arc<Host>, config: Config, dir: PluginDir, load: bool) -> RunningHost {
        if load {
            host.reload().await.expect("host loads");
        }
        let listeners = Listeners::bind(&config).await.expect("bind");
        let address = match &listeners.ext_proc {
            Listener::Tcp(grpc) => grpc.local_addr().expect("address"),
            // Reached through the socket path; there is no TCP address.
            Listener::Unix(..) => "0.0.0.0:0".parse().expect("address"),
        };
        let admin = listeners
            .admin
            .as_ref()
            .expect("admin listener")
            .local_addr()
            .expect("address");
        let (stop, stopped) = oneshot::channel();
        let serving = host.clone();
        let task = tokio::spawn(async move {
            serving
                .serve(listeners, async {
                    let _ = stopped.await;
                })
                .await
        });
        RunningHost {
            address,
            admin,
            host,
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    /// The host itself.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Loads (or reloads) the plugins now.
    pub async fn load(&self) -> anyhow::Result<()> {
        self.host.reload().await.map(|_| ())
    }

    /// The plugins directory.
    pub fn plugins_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The host's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.host.metrics()
    }

    /// Starts the shutdown (as SIGTERM does) without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Asks the host to stop and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.begin_shutdown();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningHost {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}
