//! A wasm-extproc host in this process, on an ephemeral port, with its plugins copied into a
//! temporary directory under the names the test chooses (which fixes their order).

use std::net::SocketAddr;
use std::path::Path;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use std::sync::Arc;

use crate::fixtures::Component;
use wasm_extproc::metrics::Metrics;
use wasm_extproc::{Config, Host};

/// A running host. Stops when dropped.
#[derive(Debug)]
pub struct RunningHost {
    pub address: SocketAddr,
    metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// A plugin directory: `(file name without .wasm, component)` in any order.
pub fn plugin_dir(plugins: &[(&str, Component)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, component) in plugins {
        std::fs::copy(component.path(), dir.path().join(format!("{name}.wasm")))
            .expect("copy fixture");
    }
    dir
}

/// The configuration a test gives: the TOML text, with the plugins directory filled in.
pub fn config(dir: &Path, toml: &str) -> Config {
    let text = format!(
        "plugins_dir = {:?}\nlisten = \"127.0.0.1:0\"\n{toml}",
        dir.display().to_string()
    );
    Config::from_toml(&text, Path::new("test.toml")).expect("valid test config")
}

impl RunningHost {
    /// Loads `plugins` with the settings in `toml` and serves on 127.0.0.1. The host's log goes
    /// to the test's output (shown for failing tests), filtered by `RUST_LOG` (default `warn`).
    pub async fn start(plugins: &[(&str, Component)], toml: &str) -> RunningHost {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let dir = plugin_dir(plugins);
        let config = config(dir.path(), toml);
        let host = Host::load(&config).await.expect("host loads");
        let metrics = host.metrics();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(host.serve(listener, async {
            let _ = stopped.await;
        }));
        RunningHost {
            address,
            metrics,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// The host's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Asks the host to stop and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningHost {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
