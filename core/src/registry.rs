//! Which plugins run, in which order, and reloads.
//!
//! A chain is every `.wasm` file in a directory, by file name: the order an operator controls
//! on a volume (`10-auth.wasm` before `20-tag.wasm`), the same on every replica. The plugins
//! directory's own files are the default chain; each subdirectory holding `.wasm` files is a
//! named chain (`checkout/10-auth.wasm`), which streams ask for by name (see
//! [`Generation::find_chain`]). Entries whose names start with `.` are skipped: Kubernetes
//! keeps the real files of ConfigMap volumes under `..data` and timestamped `..2026_...`
//! directories, and exposes each file as a symlink beside them.
//!
//! A [`Registry`] holds the current [`Generation`] -- the chains and the settings that go with
//! them -- and swaps in a new one atomically on reload. Streams take the generation current when
//! they start and finish on it, whatever happens meanwhile. A reload is all or nothing: if any
//! file fails to load, the previous generation keeps serving and the error names the file.
//! Files whose bytes did not change are not compiled again.

mod watch;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arc_swap::ArcSwapOption;

use crate::bodies::BodyBudget;
pub use crate::config::DEFAULT_CHAIN;
use crate::config::{ConfigError, EnvoySettings, Settings, UnknownChain};
use crate::guard::Guard;
use crate::http::{Direction, PerDirection, Phase, PhaseSet};
use crate::metrics::{Metrics, PluginMetrics};
use crate::runtime::{LoadError, Plugin, Runtime, longest_call};
use crate::signing::Trust;

pub use watch::{WatchGuard, watch};

/// One loaded chain, in order. Shared by every stream that starts on it while it is current.
#[derive(Debug)]
pub struct Chain {
    name: Arc<str>,
    /// The plugins whose answers count, in order.
    plugins: Vec<Plugin>,
    /// Each plugin's metric series, in the same order.
    metrics: Vec<PluginMetrics>,
    /// Plugins in shadow mode, each beside one of `plugins`.
    shadows: Vec<Shadow>,
    /// Per plugin, in order: whether some shadow runs beside it.
    shadowed: Vec<bool>,
    phases: PhaseSet,
    /// Whether some plugin or shadow may wait inside a call ([`Plugin::may_wait`]).
    may_wait: bool,
    /// Per phase, the budgets of the plugins that handle it, added up.
    budgets: [Duration; 6],
    /// Per direction, whether a front end has said that Envoy sends none of the body plugins
    /// here handle.
    no_body_noticed: PerDirection<AtomicBool>,
}

/// How often a shadow plugin's differences are logged: at most once per interval each (the
/// metrics count every one).
pub const SHADOW_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A plugin in shadow mode: it runs beside the chain's plugin at `beside` on what that plugin
/// is given, with its own budget and instances; its output is compared with that plugin's and
/// never applied, and its failures touch nothing but its own metrics.
#[derive(Debug)]
pub struct Shadow {
    pub plugin: Plugin,
    /// The index, in the chain's plugins, of the plugin it runs beside.
    pub beside: usize,
    pub metrics: PluginMetrics,
    /// When its last difference or failure was logged, in ms since the chain loaded.
    logged_ms: AtomicU64,
    loaded: Instant,
}

impl Shadow {
    /// Whether a line about it may be logged `now`: at most one per [`SHADOW_LOG_INTERVAL`].
    pub fn may_log(&self, now: Instant) -> bool {
        let now_ms = now.saturating_duration_since(self.loaded).as_millis() as u64 + 1;
        let last = self.logged_ms.load(Ordering::Relaxed);
        let interval = SHADOW_LOG_INTERVAL.as_millis() as u64;
        (last == 0 || now_ms >= last + interval)
            && self
                .logged_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

impl Chain {
    /// The chain `name` of `plugins` (shadows among them run beside the plugin they name,
    /// which the loader checked is there), whose instantiations may wait `instance_wait` for a
    /// full pool.
    pub fn new(
        name: &str,
        plugins: Vec<Plugin>,
        metrics: &Arc<Metrics>,
        instance_wait: Duration,
    ) -> Self {
        let (shadows, plugins): (Vec<Plugin>, Vec<Plugin>) = plugins
            .into_iter()
            .partition(|p| p.settings().shadows.is_some());
        let shadows: Vec<Shadow> = shadows
            .into_iter()
            .filter_map(|plugin| {
                let target = plugin.settings().shadows.as_deref()?;
                let beside = plugins.iter().position(|p| p.name() == target)?;
                Some(Shadow {
                    metrics: metrics.for_plugin(name, plugin.name()),
                    plugin,
                    beside,
                    logged_ms: AtomicU64::new(0),
                    loaded: Instant::now(),
                })
            })
            .collect();
        let shadowed = (0..plugins.len())
            .map(|i| shadows.iter().any(|s| s.beside == i))
            .collect();
        let phases = plugins
            .iter()
            .fold(PhaseSet::EMPTY, |set, p| set.union(p.phases()));
        let metrics = plugins
            .iter()
            .map(|p| metrics.for_plugin(name, p.name()))
            .collect();
        // Shadows run inline, on their own budgets: a phase can take theirs too.
        let budgets = Phase::ALL.map(|phase| {
            let mut handling = plugins
                .iter()
                .chain(shadows.iter().map(|s| &s.plugin))
                .filter(|p| p.phases().contains(phase));
            match handling.next() {
                Some(first) => {
                    handling
                        .chain([first])
                        .map(|p| longest_call(p.settings().budget.timeout))
                        .sum::<Duration>()
                        + instance_wait
                }
                None => Duration::ZERO,
            }
        });
        let may_wait = plugins
            .iter()
            .chain(shadows.iter().map(|s| &s.plugin))
            .any(Plugin::may_wait);
        Chain {
            name: name.into(),
            plugins,
            metrics,
            shadows,
            shadowed,
            phases,
            may_wait,
            budgets,
            no_body_noticed: Default::default(),
        }
    }

    /// [`DEFAULT_CHAIN`], or the subdirectory it was loaded from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugins whose answers count, in order.
    pub fn plugins(&self) -> &[Plugin] {
        &self.plugins
    }

    /// The plugins in shadow mode.
    pub fn shadows(&self) -> &[Shadow] {
        &self.shadows
    }

    /// Whether a shadow runs beside the plugin at `index`.
    pub fn is_shadowed(&self, index: usize) -> bool {
        self.shadowed[index]
    }

    /// The plugins that handle `phase`.
    pub fn handling(&self, phase: Phase) -> impl Iterator<Item = &Plugin> {
        self.plugins
            .iter()
            .filter(move |p| p.phases().contains(phase))
    }

    /// True the first time it is asked for `direction`, false after: for a front end to say
    /// once per chain that Envoy sends none of the `direction` body its plugins handle.
    pub fn first_notice_of_no_body(&self, direction: Direction) -> bool {
        !self.no_body_noticed[direction].swap(true, Ordering::Relaxed)
    }

    /// Each plugin's metric series, in chain order.
    pub fn plugin_metrics(&self) -> &[PluginMetrics] {
        &self.metrics
    }

    /// Every phase some plugin handles.
    pub fn phases(&self) -> PhaseSet {
        self.phases
    }

    /// Whether a message's future can be pending: some plugin or shadow may wait inside a
    /// call (outbound HTTP, the state store, WASI). Otherwise the chain only waits for a free
    /// instance when the pool is full.
    pub fn may_wait(&self) -> bool {
        self.may_wait
    }

    /// The most time the chain can take on one message of `phase`: the budgets of the
    /// plugins that handle it, each with the precision of its deadline, added up, and one wait
    /// for a full instance pool.
    pub fn budget(&self, phase: Phase) -> Duration {
        self.budgets[phase as usize]
    }

    /// Checks that Envoy waits long enough for every phase: the plugins' budgets must fit in
    /// its `message_timeout`, or in `max_message_timeout` where the host can ask for more.
    pub fn check_budgets(&self, envoy: &EnvoySettings) -> anyhow::Result<()> {
        for phase in Phase::ALL {
            let budget = self.budget(phase);
            let limit = envoy.max_message_timeout.unwrap_or(envoy.message_timeout);
            if budget >= limit {
                let plugins: Vec<String> = self
                    .plugins
                    .iter()
                    .filter(|p| p.phases().contains(phase))
                    .map(|p| {
                        format!(
                            "{} ({} ms)",
                            p.name(),
                            p.settings().budget.timeout.as_millis()
                        )
                    })
                    .collect();
                let chain = if *self.name == *DEFAULT_CHAIN {
                    String::new()
                } else {
                    format!("chain {}: ", self.name)
                };
                bail!(
                    "{chain}the budgets of the plugins handling {phase} add up to {} ms ({}; each \
                     counted with the 1 ms precision of its deadline, and at least 10 ms, plus \
                     [runtime] instance_wait_ms), but Envoy waits {} ms for an answer; lower \
                     their timeout_ms, or raise the filter's max_message_timeout and set \
                     [envoy] max_message_timeout_ms to match",
                    budget.as_millis(),
                    plugins.join(", "),
                    limit.as_millis()
                );
            }
        }
        Ok(())
    }
}

/// The `.wasm` files in `dir`, in chain order, with their plugin names.
pub fn discover(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("plugins directory {}", dir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("plugins directory {}", dir.display()))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            bail!(
                "plugins directory {}: file name {:?} is not UTF-8",
                dir.display(),
                entry.file_name()
            );
        };
        if file_name.starts_with('.') {
            continue;
        }
        let Some(name) = file_name.strip_suffix(".wasm") else {
            continue;
        };
        let path = entry.path();
        // Follows symlinks, as ConfigMap volumes need.
        if !path.is_file() {
            continue;
        }
        found.push((name.to_string(), path));
    }
    found.sort();
    Ok(found)
}

/// A chain's name and its plugins' names and files, in chain order.
pub type ChainFiles = (String, Vec<(String, PathBuf)>);

/// The chains in `dir`: its own `.wasm` files (the default chain, possibly none), then each
/// subdirectory holding `.wasm` files, by name.
pub fn discover_chains(dir: &Path) -> anyhow::Result<Vec<ChainFiles>> {
    let mut chains = vec![(DEFAULT_CHAIN.to_string(), discover(dir)?)];
    let mut named = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("plugins directory {}", dir.display()))?
    {
        let entry = entry.with_context(|| format!("plugins directory {}", dir.display()))?;
        let path = entry.path();
        // Follows symlinks; skips Kubernetes' `..data` and the like.
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        let files = discover(&path)?;
        if files.is_empty() {
            continue;
        }
        if name == DEFAULT_CHAIN {
            bail!(
                "plugins directory {}: a subdirectory cannot be called `{DEFAULT_CHAIN}`, the \
                 name of the directory's own chain",
                dir.display()
            );
        }
        named.push((name, files));
    }
    named.sort();
    chains.extend(named);
    Ok(chains)
}

/// Everything a stream uses that a reload can change, swapped as one.
#[derive(Debug)]
pub struct Generation {
    /// Counts reloads: 1 is the chain loaded at start-up.
    pub number: u64,
    /// The default chain first, then the named ones by name.
    chains: Vec<Chain>,
    /// Envoy route names (`xds.route_name`) to the chain serving them, by index in `chains`.
    routes: HashMap<String, usize>,
    /// What a stream naming a chain that does not exist gets.
    pub unknown_chain: UnknownChain,
    pub envoy: EnvoySettings,
    pub guard: Guard,
    /// The plugins directory it was loaded from.
    pub plugins_dir: PathBuf,
    /// The unknown chain names streams asked for, each said once.
    unknown_noticed: Mutex<HashSet<String>>,
    /// Body bytes all streams hold at once, shared with the generation before when its limit
    /// is the same (streams of both hold bodies during a reload).
    pub bodies: Arc<BodyBudget>,
}

impl Generation {
    /// Generation `number` of `chains` (the default one first), with `settings`' routes,
    /// policies and Envoy settings, after `previous`.
    pub fn new(
        number: u64,
        chains: Vec<Chain>,
        settings: &Settings,
        previous: Option<&Generation>,
        metrics: &Metrics,
    ) -> Generation {
        assert_eq!(
            chains.first().map(Chain::name),
            Some(DEFAULT_CHAIN),
            "the default chain comes first"
        );
        let routes = settings
            .chains
            .iter()
            .filter_map(|(name, chain)| {
                let index = chains.iter().position(|c| c.name() == name)?;
                Some(chain.routes.iter().map(move |route| (route.clone(), index)))
            })
            .flatten()
            .collect();
        Generation {
            number,
            chains,
            routes,
            unknown_chain: settings.unknown_chain,
            guard: Guard::new(settings.envoy.clone()),
            envoy: settings.envoy.clone(),
            plugins_dir: settings.plugins_dir.clone(),
            unknown_noticed: Mutex::default(),
            bodies: previous
                .map(|g| g.bodies.clone())
                .filter(|b| b.limit() == settings.max_body_bytes_in_flight)
                .unwrap_or_else(|| {
                    BodyBudget::new(
                        settings.max_body_bytes_in_flight,
                        metrics.bodies_over_budget_counter(),
                    )
                }),
        }
    }

    /// Every chain, the default one first.
    pub fn chains(&self) -> &[Chain] {
        &self.chains
    }

    /// The chain at `index` (as [`find_chain`](Self::find_chain) and
    /// [`chain_for_route`](Self::chain_for_route) give it); 0 is the default chain.
    pub fn chain(&self, index: usize) -> &Chain {
        &self.chains[index]
    }

    /// The chain of the plugins directory's own files.
    pub fn default_chain(&self) -> &Chain {
        &self.chains[0]
    }

    /// The index of the chain called `name`.
    pub fn find_chain(&self, name: &str) -> Option<usize> {
        self.chains.iter().position(|chain| chain.name() == name)
    }

    /// The index of the chain the configuration maps Envoy route `route` to.
    pub fn chain_for_route(&self, route: &str) -> Option<usize> {
        self.routes.get(route).copied()
    }

    /// The route names mapped to the chain at `index`, sorted.
    pub fn routes_of(&self, index: usize) -> Vec<&str> {
        let mut routes: Vec<&str> = self
            .routes
            .iter()
            .filter(|(_, i)| **i == index)
            .map(|(route, _)| route.as_str())
            .collect();
        routes.sort_unstable();
        routes
    }

    /// Whether any chain is mapped to route names: only then is a stream's route worth
    /// reading.
    pub fn maps_routes(&self) -> bool {
        !self.routes.is_empty()
    }

    /// Every plugin of every chain.
    pub fn plugins(&self) -> impl Iterator<Item = &Plugin> {
        self.chains.iter().flat_map(|chain| {
            chain
                .plugins()
                .iter()
                .chain(chain.shadows().iter().map(|s| &s.plugin))
        })
    }

    /// The chain serving a stream that asked for the chain `name` through `asked_with` (how
    /// Envoy names chains in this mode, for the log line): that chain if there is one; else,
    /// as `unknown_chain` says, the default chain or a rejection -- said once per name and
    /// generation, and counted.
    pub fn choose_chain(&self, name: &str, metrics: &Metrics, asked_with: &str) -> ChainChoice {
        if let Some(index) = self.find_chain(name) {
            return ChainChoice::Serve(index);
        }
        let reject = self.unknown_chain == UnknownChain::Reject;
        let answer = if reject { "reject" } else { "default" };
        metrics.unknown_chain(answer);
        if self.first_notice_of_unknown_chain(name) {
            let chains: Vec<&str> = self.chains.iter().map(Chain::name).collect();
            tracing::warn!(
                requested = name,
                chains = ?chains,
                "a stream asked for chain {name:?} ({asked_with}), which the plugins directory \
                 does not have; {} (unknown_chain = \"{answer}\"; said once per name and load, \
                 counted in wasm_extproc_unknown_chain_streams_total)",
                if reject {
                    "answering 500"
                } else {
                    "serving it the default chain"
                },
            );
        }
        if reject {
            ChainChoice::Reject
        } else {
            ChainChoice::Serve(0)
        }
    }

    /// True the first time a stream asks for the unknown chain `name` in this generation (for
    /// the first 64 names: a bound on what the set may hold).
    fn first_notice_of_unknown_chain(&self, name: &str) -> bool {
        let mut noticed = self
            .unknown_noticed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        noticed.len() < 64 && noticed.insert(name.to_string())
    }
}

/// What a stream that named its chain gets ([`Generation::choose_chain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainChoice {
    /// The chain at this index.
    Serve(usize),
    /// Nothing: the chain it named does not exist, and `unknown_chain = "reject"`. Its first
    /// message is answered 500 (`wasm_extproc_unknown_chain`).
    Reject,
}

/// Where a reload reads its settings from: the file and flags again, or a fixed value.
pub type ConfigSource = Box<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>;

/// How Envoy waits for the chain, which decides what a loaded chain must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Over ext_proc: Envoy gives each message `message_timeout` (or up to
    /// `max_message_timeout` when asked), so each phase's budgets must fit in it.
    ExtProc,
    /// In Envoy's process: the chain runs on Envoy's worker thread and Envoy waits for it;
    /// only the plugins' own budgets bound a phase.
    InProcess,
}

/// The current generation and how to make the next one.
pub struct Registry {
    runtime: Arc<Runtime>,
    source: ConfigSource,
    mode: Mode,
    current: ArcSwapOption<Generation>,
    /// One reload at a time; a trigger that arrives during one waits for it and runs after.
    reloading: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("current", &self.current.load().as_ref().map(|g| g.number))
            .finish_non_exhaustive()
    }
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    pub generation: u64,
    pub plugins: usize,
    /// Plugins compiled anew (new or changed bytes).
    pub compiled: usize,
}

impl Registry {
    /// A registry that loads with `runtime` (which other registries may share) and reads its
    /// settings from `source` on every reload.
    pub fn new(
        runtime: Arc<Runtime>,
        source: ConfigSource,
        metrics: Arc<Metrics>,
        mode: Mode,
    ) -> Self {
        Registry {
            runtime,
            source,
            mode,
            current: ArcSwapOption::empty(),
            reloading: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    /// The runtime every generation is compiled with.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The generation new streams get; `None` until the first load succeeds.
    pub fn current(&self) -> Option<Arc<Generation>> {
        self.current.load_full()
    }

    /// Reads the configuration and the plugins directory again and swaps in the result. On
    /// failure the current generation stays, and the error names what is wrong.
    pub async fn reload(&self) -> anyhow::Result<ReloadSummary> {
        let _one_at_a_time = self.reloading.lock().await;
        let started = Instant::now();
        let result = self.build_next().await;
        match &result {
            Ok(summary) => {
                self.metrics.reload("ok");
                tracing::info!(
                    generation = summary.generation,
                    plugins = summary.plugins,
                    compiled = summary.compiled,
                    took_ms = started.elapsed().as_millis() as u64,
                    "plugin chain loaded"
                );
            }
            Err(error) => {
                self.metrics.reload("error");
                if self.current.load().is_some() {
                    tracing::error!(
                        "reload rejected, the previous plugin chain keeps serving: {error:#}"
                    );
                }
            }
        }
        result
    }

    async fn build_next(&self) -> anyhow::Result<ReloadSummary> {
        let config = (self.source)()?;
        let previous = self.current();
        let (chains, compiled) =
            load_chains(&self.runtime, &config, previous.as_deref(), &self.metrics).await?;
        if self.mode == Mode::ExtProc {
            for chain in &chains {
                chain.check_budgets(&config.envoy)?;
            }
        }
        let number = previous.as_ref().map_or(1, |g| g.number + 1);
        let generation =
            Generation::new(number, chains, &config, previous.as_deref(), &self.metrics);
        let summary = ReloadSummary {
            generation: generation.number,
            plugins: generation.plugins().count(),
            compiled,
        };
        self.current.store(Some(Arc::new(generation)));
        Ok(summary)
    }
}

/// Loads every chain in the configured directory, reusing the compiled form of any file whose
/// bytes match a plugin of `previous` (or one loaded earlier in this load: a file in several
/// chains compiles once). Returns the chains, the default one first, and how many plugins were
/// compiled anew. Any failure stops the whole load: a chain with a plugin silently missing
/// would run requests through the wrong policy.
pub async fn load_chains(
    runtime: &Runtime,
    config: &Settings,
    previous: Option<&Generation>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Vec<Chain>, usize)> {
    let dir = &config.plugins_dir;
    let found = discover_chains(dir)?;
    if found.iter().all(|(_, files)| files.is_empty()) {
        bail!(
            "plugins directory {}: no .wasm files; put at least one component plugin there",
            dir.display()
        );
    }
    let names = |files: &[(String, PathBuf)]| {
        files
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for name in config.plugins.keys() {
        if !found
            .iter()
            .any(|(_, files)| files.iter().any(|(n, _)| n == name))
        {
            bail!(
                "config has [plugins.{name}] but {} has no {name}.wasm (found: {})",
                dir.display(),
                names(&found[0].1)
            );
        }
    }
    for (chain, settings) in &config.chains {
        let Some((_, files)) = found.iter().find(|(c, _)| c == chain) else {
            bail!(
                "config has [chains.{chain}] but {} has no subdirectory {chain} with .wasm files",
                dir.display()
            );
        };
        for name in settings.plugins.keys() {
            if !files.iter().any(|(n, _)| n == name) {
                bail!(
                    "config has [chains.{chain}.plugins.{name}] but {} has no {name}.wasm \
                     (found: {})",
                    dir.join(chain).display(),
                    names(files)
                );
            }
        }
    }
    let trust = Trust::load(&config.signing)?;
    let mut compiled_before: HashMap<String, Plugin> = previous
        .into_iter()
        .flat_map(Generation::plugins)
        .map(|p| (p.digest().to_string(), p.clone()))
        .collect();
    let mut chains = Vec::with_capacity(found.len());
    let mut compiled = 0;
    for (chain, files) in found {
        let mut plugins = Vec::with_capacity(files.len());
        for (name, path) in files {
            let settings = config.settings_for(&chain, &name).clone();
            let (bytes, digest) = Runtime::read(&path)?;
            let signature = trust
                .check(&path, &bytes)
                .map_err(|reason| LoadError::Signature {
                    path: path.display().to_string(),
                    reason,
                })?;
            let plugin = match compiled_before.get(digest.as_str()) {
                Some(same) => same.reconfigured(&chain, &name, settings),
                None => {
                    compiled += 1;
                    let plugin = runtime
                        .load(&chain, &name, &path, (bytes, digest), settings)
                        .await?;
                    tracing::info!(
                        chain,
                        plugin = plugin.name(),
                        path = %path.display(),
                        sha256 = plugin.digest(),
                        phases = ?plugin.phases(),
                        "compiled plugin"
                    );
                    compiled_before.insert(plugin.digest().to_string(), plugin.clone());
                    plugin
                }
            };
            plugins.push(plugin.signed(signature));
        }
        for plugin in &plugins {
            let Some(target) = plugin.settings().shadows.as_deref() else {
                continue;
            };
            let serving = plugins
                .iter()
                .any(|p| p.name() == target && p.settings().shadows.is_none());
            if !serving {
                bail!(
                    "{}: mode = \"shadow\" beside {target:?}, which chain {chain:?} does not \
                     serve with (its plugins: {})",
                    plugin.path().display(),
                    plugins
                        .iter()
                        .filter(|p| p.settings().shadows.is_none())
                        .map(Plugin::name)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        chains.push(Chain::new(&chain, plugins, metrics, config.instance_wait));
    }
    Ok((chains, compiled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_orders_by_file_name_and_skips_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["20-b.wasm", "10-a.wasm", "notes.txt", ".hidden.wasm"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        std::fs::create_dir(dir.path().join("dir.wasm")).unwrap();
        let names: Vec<String> = discover(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["10-a", "20-b"]);
    }

    #[test]
    fn chains_are_the_directory_then_its_subdirectories_with_plugins() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "10-a.wasm",
            "search/10-s.wasm",
            "checkout/20-c.wasm",
            "checkout/10-c.wasm",
        ] {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"").unwrap();
        }
        // Not chains: hidden (Kubernetes' volume internals), or holding no plugin.
        std::fs::create_dir_all(dir.path().join("..2026_11_30/x")).unwrap();
        std::fs::write(dir.path().join("..2026_11_30/x/y.wasm"), b"").unwrap();
        std::fs::create_dir(dir.path().join("lost+found")).unwrap();
        let chains: Vec<(String, Vec<String>)> = discover_chains(dir.path())
            .unwrap()
            .into_iter()
            .map(|(chain, files)| (chain, files.into_iter().map(|(n, _)| n).collect()))
            .collect();
        assert_eq!(
            chains,
            [
                ("default".to_string(), vec!["10-a".to_string()]),
                (
                    "checkout".to_string(),
                    vec!["10-c".to_string(), "20-c".to_string()]
                ),
                ("search".to_string(), vec!["10-s".to_string()]),
            ]
        );

        std::fs::create_dir(dir.path().join("default")).unwrap();
        std::fs::write(dir.path().join("default/x.wasm"), b"").unwrap();
        let error = discover_chains(dir.path()).unwrap_err().to_string();
        assert!(
            error.ends_with(
                "a subdirectory cannot be called `default`, the name of the directory's own chain"
            ),
            "{error}"
        );
    }

    #[test]
    fn a_missing_directory_is_named() {
        let err = discover(Path::new("/definitely/not/here")).unwrap_err();
        assert!(format!("{err:#}").starts_with("plugins directory /definitely/not/here: "));
    }
}
