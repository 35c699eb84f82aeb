//! One filter configuration -- one `DynamicModuleFilter` in Envoy's config -- and what every
//! configuration in the process shares.
//!
//! A configuration is the same TOML the ext_proc server reads, passed as the filter's
//! `filter_config` (a `google.protobuf.StringValue`). Envoy creates it on its main thread and
//! reads it from every worker; it loads its plugins before it returns, so Envoy never serves a
//! listener whose plugins failed to load: a bad plugin or setting refuses the configuration,
//! with the reason in Envoy's log.
//!
//! Shared by every configuration, because there is one of each per process:
//! - the [`Runtime`]: the engine, its instance pool (which reserves address space for
//!   `[runtime] max_instances` instances) and the epoch ticker. Two pools would not fit the
//!   address space, and a listener update creates the new configuration before the old one
//!   goes; the first configuration's `[runtime]` settings hold while any configuration lives;
//! - the [`Metrics`], published as Envoy stats;
//! - a small Tokio runtime for loading and watching plugins, and for what plugins wait on,
//!   off Envoy's threads ([`background`]).
//!
//! The chain itself runs on Envoy's worker threads ([`block_on`](crate::worker::block_on)).

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use anyhow::{Context, bail};
use wasm_extproc_core::config::{FileConfig, Origin, Overrides, Settings};
use wasm_extproc_core::metrics::Metrics;
use wasm_extproc_core::registry::{self, Generation, Mode, Registry};
use wasm_extproc_core::runtime::{PoolLimits, Runtime};

use crate::abi;
use crate::exchange::{Clusters, Envoy, Exchange, Reads};
use crate::stats::Stats;

/// Instances alive at once in Envoy's process, where the ext_proc server allows 14,000: each
/// reserves about 4 GiB of address space in one block, and Envoy's own mappings leave less
/// room for it than the server's process has (36 TiB fits some Envoy processes and not
/// others). 4,000 exchanges in flight with a plugin each, per Envoy: a sidecar's share; a
/// busy edge proxy raises it, and learns at load if its address space cannot hold the pool.
pub const DEFAULT_MAX_INSTANCES: u32 = 4_000;
/// Of those, instances of plugins that import WASI.
pub const DEFAULT_MAX_WASI_INSTANCES: u32 = 500;

/// One configuration of the filter, read by every worker.
#[derive(Debug)]
pub struct FilterConfig {
    /// The filter's `filter_name`, for logs.
    pub name: String,
    registry: Arc<Registry>,
    reads: Arc<Reads>,
    metrics: Arc<Metrics>,
    pub stats: Stats,
    /// Reloads on changes while the configuration lives.
    _watch: Option<registry::WatchGuard>,
}

impl FilterConfig {
    /// Parses `text`, loads the plugins it names and starts watching them. `stats` are the
    /// Envoy stats defined for this configuration.
    pub fn new(name: &str, text: &[u8], stats: Stats) -> anyhow::Result<FilterConfig> {
        let origin = format!("filter_config of dynamic module filter {name:?}");
        let text = std::str::from_utf8(text).with_context(|| {
            format!("{origin}: not UTF-8 text; give the TOML as a google.protobuf.StringValue")
        })?;
        let file = FileConfig::parse(text, Path::new(&origin))?;
        let ignored = file.server_keys();
        if !ignored.is_empty() {
            tracing::warn!(
                filter = name,
                keys = ignored.join(", "),
                "settings of the ext_proc server have no meaning in-process; ignored"
            );
        }
        let reads = reads(&file)?;
        let settings = file.settings(&Overrides {
            default_max_instances: Some(DEFAULT_MAX_INSTANCES),
            default_max_wasi_instances: Some(DEFAULT_MAX_WASI_INSTANCES),
            ..Overrides::default()
        })?;
        let runtime = shared_runtime(&settings)?;
        let fixed = settings.clone();
        let registry = Arc::new(Registry::new(
            runtime,
            Box::new(move || Ok(fixed.clone())),
            metrics(),
            Mode::InProcess,
        ));
        let loader = background();
        loader.block_on(registry.reload())?;
        let watch = if settings.watch && settings.plugins_dir.is_dir() {
            let _in_loader = loader.enter();
            Some(registry::watch(
                registry.clone(),
                &settings.plugins_dir,
                None,
            )?)
        } else {
            None
        };
        Ok(FilterConfig {
            name: name.to_string(),
            registry,
            reads: Arc::new(reads),
            metrics: metrics(),
            stats,
            _watch: watch,
        })
    }

    /// A new stream's exchange, on the generation current now and the chain its route
    /// chooses (see [`Exchange::start`]).
    pub fn exchange(&self, envoy: &mut impl Envoy) -> Option<Exchange> {
        let generation: Arc<Generation> = self.registry.current()?;
        Some(Exchange::start(
            generation,
            self.reads.clone(),
            self.metrics.clone(),
            envoy,
        ))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// This filter's configuration on one route (or virtual host): Envoy's
/// `DynamicModuleFilterPerRoute`, whose `filter_config` (a `google.protobuf.StringValue`) is
/// TOML naming the chain that serves the route's streams, as the server's streams name theirs
/// in their gRPC initial metadata:
///
/// ```toml
/// chain = "checkout"
/// ```
///
/// A chain the plugins directory does not have is answered as `unknown_chain` says. To run no
/// plugin at all on a route, Envoy's own `envoy.config.route.v3.FilterConfig` with
/// `disabled: true` takes the filter out of its streams.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The chain serving the route: a subdirectory of `plugins_dir`, `[chains.NAME]`.
    pub chain: String,
}

impl RouteConfig {
    /// Parses the per-route `filter_config` Envoy passed for `name` (its `filter_name`).
    pub fn parse(name: &str, text: &[u8]) -> anyhow::Result<RouteConfig> {
        let origin = format!("per-route filter_config {name:?} of dynamic module filter");
        let text = std::str::from_utf8(text).with_context(|| {
            format!("{origin}: not UTF-8 text; give the TOML as a google.protobuf.StringValue")
        })?;
        let config: RouteConfig = toml::from_str(text).with_context(|| {
            format!("{origin}: expected `chain = \"NAME\"` (the chain serving the route)")
        })?;
        if config.chain.is_empty() {
            bail!("{origin}: `chain` is empty; name a chain of plugins_dir");
        }
        Ok(config)
    }
}

/// What `[module]` asks to read, checked against what Envoy can give.
fn reads(file: &FileConfig) -> anyhow::Result<Reads> {
    let module = &file.module;
    for name in module
        .request_attributes
        .iter()
        .chain(&module.response_attributes)
    {
        if abi::attribute_id(name).is_none() {
            bail!(
                "[module]: {name:?} is not an attribute Envoy's dynamic modules can read; known: {}",
                abi::ATTRIBUTES.join(", ")
            );
        }
    }
    let mut http_clusters = Clusters::new();
    for (origin, cluster) in &module.http_clusters {
        let parsed =
            Origin::parse(origin).map_err(|e| anyhow::anyhow!("[module] http_clusters: {e}"))?;
        if cluster.is_empty() {
            bail!("[module] http_clusters: {origin:?} names no cluster");
        }
        http_clusters.insert(parsed.to_string(), cluster.clone());
    }
    Ok(Reads {
        request_attributes: module.request_attributes.clone(),
        response_attributes: module.response_attributes.clone(),
        metadata_namespaces: module.metadata_namespaces.clone(),
        http_clusters: Arc::new(http_clusters),
    })
}

/// The process's metrics, created on first use.
pub fn metrics() -> Arc<Metrics> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    METRICS.get_or_init(Metrics::new).clone()
}

/// The runtime of the configurations alive now, or a new one if none is.
fn shared_runtime(settings: &Settings) -> anyhow::Result<Arc<Runtime>> {
    static SHARED: Mutex<(Weak<Runtime>, Option<PoolLimits>)> = Mutex::new((Weak::new(), None));
    let limits = PoolLimits::of(settings);
    let mut shared = SHARED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(runtime) = shared.0.upgrade() {
        if shared.1.as_ref() != Some(&limits) {
            tracing::warn!(
                "[runtime] settings differ from those of the filter configurations already \
                 loaded; the first ones hold until every configuration using them is gone \
                 (restart Envoy to apply them now)"
            );
        }
        return Ok(runtime);
    }
    let runtime = Arc::new(Runtime::new(limits.clone(), &metrics())?);
    *shared = (Arc::downgrade(&runtime), Some(limits));
    Ok(runtime)
}

/// The module's own Tokio runtime, one thread beside Envoy's: it loads and watches plugins,
/// and drives the I/O and timers plugins wait on inside a call (outbound HTTP, Redis), so
/// that no Envoy worker waits for them.
pub fn background() -> &'static tokio::runtime::Runtime {
    static LOADER: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    LOADER.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("wasm-extproc-loader")
            .enable_all()
            .build()
            .expect("a Tokio runtime with one thread starts")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_clusters_map_origins_to_named_clusters() {
        let parse = |clusters: &str| {
            let text = format!("plugins_dir = \"/p\"\n[module]\nhttp_clusters = {clusters}\n");
            reads(&FileConfig::parse(&text, Path::new("t")).unwrap())
        };
        let reads = parse(r#"{ "http://Auth:8080/" = "authz" }"#).unwrap();
        assert_eq!(
            reads
                .http_clusters
                .get("http://auth:8080")
                .map(String::as_str),
            Some("authz")
        );
        for bad in [
            r#"{ "ftp://auth" = "authz" }"#,
            r#"{ "http://auth:8080" = "" }"#,
        ] {
            let error = format!("{:#}", parse(bad).unwrap_err());
            assert!(error.contains("[module] http_clusters"), "{error}");
        }
    }

    #[test]
    fn a_route_names_its_chain_and_nothing_else() {
        let config = RouteConfig::parse("r", b"chain = \"checkout\"\n").unwrap();
        assert_eq!(config.chain, "checkout");
        for (text, expected) in [
            (&b"chain = \"\""[..], "`chain` is empty"),
            (b"chian = \"checkout\"", "unknown field `chian`"),
            (b"checkout", "expected `chain = \"NAME\"`"),
            (b"\xff", "not UTF-8"),
        ] {
            let error = format!("{:#}", RouteConfig::parse("r", text).unwrap_err());
            assert!(error.contains(expected), "{error}");
            assert!(error.contains("per-route filter_config \"r\""), "{error}");
        }
    }
}
