//! The same plugins and settings deployed either way a user can: behind Envoy's ext_proc
//! filter with the host as its server, or in Envoy's process through the dynamic module. The
//! conformance tests run each case in both and expect the same from the outside.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use wasm_extproc::metrics::OUTCOMES;

use crate::echo::EchoServer;
use crate::envoy::{Envoy, EnvoyConfig};
use crate::fixtures::Component;
use crate::host::{RunningHost, plugin_dir};

/// How the plugins run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In the host, behind Envoy's ext_proc filter.
    ExtProc,
    /// In Envoy, through the dynamic module.
    InProcess,
}

impl Mode {
    pub const BOTH: [Mode; 2] = [Mode::ExtProc, Mode::InProcess];
}

/// What a case deploys: the plugins, their settings, and what Envoy must give them.
#[derive(Debug, Clone, Default)]
pub struct Case {
    /// `(file name without .wasm, component)`; file names fix the order.
    pub plugins: Vec<(&'static str, Component)>,
    /// The TOML both modes read (without `plugins_dir`).
    pub toml: String,
    /// Attributes read with the request's and the response's headers.
    pub request_attributes: Vec<&'static str>,
    pub response_attributes: Vec<&'static str>,
    /// Dynamic metadata namespaces plugins read.
    pub metadata_namespaces: Vec<&'static str>,
    /// Namespaces plugins set dynamic metadata in (ext_proc must be told to accept them).
    pub metadata_set: Vec<&'static str>,
    /// Bodies and trailers reach the plugins (over ext_proc: `FULL_DUPLEX_STREAMED` both ways,
    /// trailers sent).
    pub bodies: bool,
    pub upstream_http2: bool,
    /// Edits to both Envoy configurations: text each contains exactly once, and its
    /// replacement (routes, filters before the plugins').
    pub edits: Vec<(String, String)>,
    /// Where Envoy writes `%RESPONSE_CODE% %RESPONSE_CODE_DETAILS%` per request, if anywhere.
    pub access_log: Option<PathBuf>,
    /// Clusters added to Envoy's configuration in both modes: name, address.
    pub clusters: Vec<(String, SocketAddr)>,
    /// In-process, origins plugins call through an Envoy cluster (`[module] http_clusters`).
    pub http_clusters: Vec<(String, String)>,
}

impl Case {
    pub fn new(plugins: &[(&'static str, Component)], toml: &str) -> Case {
        Case {
            plugins: plugins.to_vec(),
            toml: toml.into(),
            ..Case::default()
        }
    }

    pub fn bodies(mut self) -> Case {
        self.bodies = true;
        self
    }

    pub fn upstream_http2(mut self) -> Case {
        self.upstream_http2 = true;
        self
    }

    /// Envoy logs each request's status and response code details to `path`.
    pub fn access_log(mut self, path: &Path) -> Case {
        self.access_log = Some(path.to_path_buf());
        self
    }

    /// Envoy has the cluster `name`, reaching `address`; in Envoy's process, plugins' requests
    /// to `origin` go through it.
    pub fn through_cluster(mut self, origin: &str, name: &str, address: SocketAddr) -> Case {
        self.clusters.push((name.into(), address));
        self.http_clusters.push((origin.into(), name.into()));
        self
    }

    pub fn edit(mut self, text: &str, replacement: &str) -> Case {
        self.edits.push((text.into(), replacement.into()));
        self
    }

    /// The ext_proc filter's configuration for this case.
    fn ext_proc(&self) -> EnvoyConfig {
        let mut config = EnvoyConfig::default();
        if self.bodies {
            config = config
                .mode("request_body_mode", "FULL_DUPLEX_STREAMED")
                .mode("response_body_mode", "FULL_DUPLEX_STREAMED")
                .mode("request_trailer_mode", "SEND")
                .mode("response_trailer_mode", "SEND");
        }
        let list = |names: &[&str]| names.join(", ");
        if !self.request_attributes.is_empty() {
            config = config.filter(format!(
                "request_attributes: [{}]",
                list(&self.request_attributes)
            ));
        }
        if !self.response_attributes.is_empty() {
            config = config.filter(format!(
                "response_attributes: [{}]",
                list(&self.response_attributes)
            ));
        }
        if !self.metadata_namespaces.is_empty() || !self.metadata_set.is_empty() {
            config = config.filter(format!(
                "metadata_options: {{ forwarding_namespaces: {{ untyped: [{}] }}, \
                 receiving_namespaces: {{ untyped: [{}] }} }}",
                list(&self.metadata_namespaces),
                list(&self.metadata_set)
            ));
        }
        config
    }

    /// `config` with what this case asks of Envoy in either mode: HTTP/2 upstream, edits, an
    /// access log.
    fn around(&self, mut config: EnvoyConfig) -> EnvoyConfig {
        if self.upstream_http2 {
            config = config.upstream_http2();
        }
        for (text, replacement) in &self.edits {
            config = config.edit(text, replacement);
        }
        if let Some(path) = &self.access_log {
            config = config.access_log(path);
        }
        for (name, address) in &self.clusters {
            config = config.cluster(name, *address);
        }
        config
    }

    /// The module's settings for this case: the shared TOML and `[module]`.
    fn module_toml(&self) -> String {
        let quoted = |names: &[&str]| {
            names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut toml = self.toml.clone();
        // As for the test host: unoptimised test builds need generous budgets, and each Envoy
        // gets a small pool.
        if !toml.contains("[defaults]") {
            toml.push_str("\n[defaults]\ntimeout_ms = 1000\n");
        }
        if !toml.contains("[runtime]") {
            toml.push_str("\n[runtime]\nmax_instances = 1000\nmax_wasi_instances = 1000\n");
        }
        let clusters: Vec<String> = self
            .http_clusters
            .iter()
            .map(|(origin, cluster)| format!("{origin:?} = {cluster:?}"))
            .collect();
        toml.push_str(&format!(
            "\n[module]\nrequest_attributes = [{}]\nresponse_attributes = [{}]\n\
             metadata_namespaces = [{}]\nhttp_clusters = {{ {} }}\n",
            quoted(&self.request_attributes),
            quoted(&self.response_attributes),
            quoted(&self.metadata_namespaces),
            clusters.join(", ")
        ));
        toml
    }
}

/// A case deployed: Envoy, the upstream, and the host when over ext_proc.
#[derive(Debug)]
pub struct Deployment {
    pub mode: Mode,
    /// The ext_proc host; `None` in-process.
    pub host: Option<RunningHost>,
    pub upstream: EchoServer,
    pub envoy: Envoy,
    _plugins: Option<tempfile::TempDir>,
}

impl Deployment {
    pub async fn start(mode: Mode, case: &Case) -> Deployment {
        let upstream = EchoServer::start().await.expect("upstream starts");
        match mode {
            Mode::ExtProc => {
                let host = RunningHost::start(&case.plugins, &case.toml).await;
                let config = case.around(case.ext_proc());
                let envoy = Envoy::start_with(&config, host.address, upstream.address)
                    .await
                    .expect("envoy starts");
                Deployment {
                    mode,
                    host: Some(host),
                    upstream,
                    envoy,
                    _plugins: None,
                }
            }
            Mode::InProcess => {
                let dir = plugin_dir(&case.plugins);
                let envoy = Self::start_in_process(dir.path(), case, &upstream)
                    .await
                    .expect("envoy starts with the module");
                Deployment {
                    mode,
                    host: None,
                    upstream,
                    envoy,
                    _plugins: Some(dir),
                }
            }
        }
    }

    async fn start_in_process(
        dir: &Path,
        case: &Case,
        upstream: &EchoServer,
    ) -> anyhow::Result<Envoy> {
        let config = case.around(EnvoyConfig::default().in_process(dir, &case.module_toml()));
        // No ext_proc server: the address is never used.
        Envoy::start_with(&config, upstream.address, upstream.address).await
    }

    /// The directory the plugins are loaded from, which a test may change while they serve.
    pub fn plugins_dir(&self) -> &Path {
        match (&self.host, &self._plugins) {
            (Some(host), _) => host.plugins_dir(),
            (None, Some(dir)) => dir.path(),
            (None, None) => unreachable!("an in-process deployment keeps its plugins directory"),
        }
    }

    /// How many calls of `plugin`, in any phase, ended with `outcome` (one of
    /// [`OUTCOMES`]): the host's metrics, or Envoy's stats in-process (of the default chain).
    /// Envoy's copy trails by up to a second and is refreshed when a stream ends: this waits,
    /// then sends one request to `/` (whose own calls count too).
    pub async fn plugin_outcomes(&self, plugin: &str, outcome: &'static str) -> u64 {
        if let Some(host) = &self.host {
            return host.metrics().plugin_outcomes(plugin, outcome);
        }
        self.chain_plugin_outcomes("default", plugin, outcome).await
    }

    /// [`plugin_outcomes`](Self::plugin_outcomes) in the chain `chain`.
    pub async fn chain_plugin_outcomes(
        &self,
        chain: &str,
        plugin: &str,
        outcome: &'static str,
    ) -> u64 {
        assert!(OUTCOMES.contains(&outcome), "{outcome} is not an outcome");
        if let Some(host) = &self.host {
            return host.metrics().chain_plugin_outcomes(chain, plugin, outcome);
        }
        let prefix = format!("plugin_calls.chain.{chain}.plugin.{plugin}.phase.");
        let suffix = format!(".outcome.{outcome}");
        self.module_stats("plugin_calls")
            .await
            .into_iter()
            .filter_map(|(name, value)| {
                let phase = name.strip_prefix(&prefix)?.strip_suffix(&suffix)?;
                (!phase.contains('.')).then_some(value)
            })
            .sum()
    }

    /// The module's Envoy stats whose names contain `filter`, without the
    /// `dynamicmodulescustom.` prefix, once Envoy's copy is fresh (see
    /// [`plugin_outcomes`](Self::plugin_outcomes): a request to `/` refreshes it).
    pub async fn module_stats(&self, filter: &str) -> Vec<(String, u64)> {
        assert_eq!(self.mode, Mode::InProcess, "the module's stats are Envoy's");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let _ = self.envoy.get("/").await;
        self.envoy
            .admin_get(&format!("/stats?filter={filter}"))
            .await
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(": ")?;
                let name = name.strip_prefix("dynamicmodulescustom.")?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect()
    }
}
