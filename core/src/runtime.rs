//! The only module that speaks wasmtime.
//!
//! A [`Runtime`] owns the engine (pooling allocator, epoch interruption, async support) and a
//! linker holding the contract's interfaces and what each capability provides (see
//! [`capability`]: logging and WASI without authority, state, outbound HTTP to allowed
//! origins, secrets). [`Runtime::load`] compiles a component once, checks that it speaks this host's
//! contract and pre-links it ([`Plugin`]). [`Plugin::instantiate`] makes a fresh store and
//! instance for one ext_proc stream ([`Instance`]), and [`Instance::call`] runs one handler on
//! the plugin's budget, answering in the host's own types.
//!
//! Failures come back as [`PluginError`], classified so the failure policy and the logs can
//! tell a trap from a deadline from a memory ceiling.

mod bindings;
mod capability;
mod epoch;
mod handlers;
mod outbound;
mod output;
mod secrets;
mod slots;
mod state;
mod store;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use wasmtime::component::{
    Component, ComponentNamedList, Instance as ComponentInstance, InstancePre, Lift, Linker, Lower,
    Resource, TypedFunc, types::ComponentItem,
};
use wasmtime::{
    Cache, CacheConfig, Config, Enabled, Engine, InstanceAllocationStrategy,
    PoolingAllocationConfig, Store, Trap,
};

use crate::breaker::Breaker;
use crate::config::{Isolation, PluginSettings, Settings};
use crate::http::{
    Delivery, Effects, ExchangeContext, HeaderMap, ImmediateResponse, Message, Phase, PhaseSet,
    Registration,
};
use crate::metrics::Metrics;
use crate::signing::Signature;
use bindings::current::wasm_extproc::processor::types as wit;
use capability::PluginId;
use epoch::EpochTicker;
use handlers::{BodyHandler, Exports, Handlers};
use slots::{Slot, Slots};
use store::{Capabilities, Grants, StoreState};

pub use store::CapabilitySettings;

/// The contract this host speaks, as it appears in import and export names.
pub const CONTRACT_PACKAGE: &str = "wasm-extproc:processor";

pub use bindings::Contract;

impl Contract {
    /// The name of the `handler` interface a plugin of this version exports.
    pub fn handler_export(self) -> String {
        format!("{CONTRACT_PACKAGE}/handler@{}", self.version())
    }

    fn spoken() -> String {
        let versions: Vec<&str> = Contract::SPOKEN.iter().map(|c| c.version()).collect();
        let (last, rest) = versions.split_last().expect("the host speaks a version");
        format!("{} and {last}", rest.join(", "))
    }
}

pub use epoch::longest_call;
/// How a front end routes plugins' outbound requests its own way (Envoy's callouts, in-process).
pub use outbound::{Answer, Way, set_way};
pub use wasmtime_wasi_http::{Error as HttpError, WasiBody as HttpBody};

/// Dirtied memory per linear memory that is reset in place and kept resident between streams
/// (the rest is returned to the kernel). A Rust plugin dirties a few dozen KiB per stream;
/// JavaScript and Python ones, megabytes.
const KEEP_RESIDENT_BYTES: usize = 1 << 20;
const KEEP_RESIDENT_TABLE_BYTES: usize = 64 << 10;
/// Memories reset together when PAGEMAP_SCAN is missing.
const DECOMMIT_BATCH: usize = 16;

/// What went wrong in a plugin.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PluginError {
    /// The guest trapped (`unreachable`, a Rust panic, stack overflow, out-of-bounds access).
    #[error("trapped: {0}")]
    Trap(String),
    /// The handler ran past its deadline and was interrupted.
    #[error("ran past its {0:?} deadline")]
    Deadline(Duration),
    /// The instance tried to grow its memory past its ceiling.
    #[error("exceeded its memory limit of {0} bytes")]
    MemoryLimit(u64),
    /// The handler returned something the host cannot pass on.
    #[error("returned invalid output: {0}")]
    InvalidOutput(String),
    /// No instance could be created: the pool is full or instantiation failed.
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
    /// The plugin asked for whole bodies and this one outgrew what the host will hold.
    #[error("needs the whole body, which grew past the {0}-byte limit")]
    BodyTooLarge(usize),
    /// The plugin kept failing and is quarantined: not called until the back-off ends.
    #[error("is quarantined for another {0:?} after failing repeatedly")]
    Quarantined(Duration),
    /// The body it would have seen did not fit the host-wide budget for bodies held.
    #[error(
        "was not given a body of {bytes} bytes: the host holds all it may of bodies ([runtime] \
         max_body_bytes_in_flight = {limit})"
    )]
    BodyBudget { bytes: u64, limit: u64 },
}

impl PluginError {
    /// A short, stable name for logs and metrics (one of [`crate::metrics::OUTCOMES`]).
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Trap(_) => "trap",
            PluginError::Deadline(_) => "deadline",
            PluginError::MemoryLimit(_) => "memory_limit",
            PluginError::InvalidOutput(_) => "invalid_output",
            PluginError::Instantiate(_) => "instantiate",
            PluginError::BodyTooLarge(_) => "body_too_large",
            PluginError::Quarantined(_) => "quarantined",
            PluginError::BodyBudget { .. } => "body_budget",
        }
    }

    /// Whether the failure is the plugin's own doing and counts towards quarantine. A full
    /// instance pool and a full body budget are the host's load, a body too large is the
    /// client's, and a quarantine is not a new failure.
    pub fn is_plugins_fault(&self) -> bool {
        !matches!(
            self,
            PluginError::Instantiate(_)
                | PluginError::Quarantined(_)
                | PluginError::BodyTooLarge(_)
                | PluginError::BodyBudget { .. }
        )
    }
}

/// Why a component could not be loaded. Each names what the operator must fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid WebAssembly component: {reason}")]
    Compile { path: String, reason: String },
    #[error("{path}: {reason}")]
    Contract { path: String, reason: String },
    #[error("{path}: imports {reason}")]
    Link { path: String, reason: String },
    #[error("{path}: failed while the host asked what it handles (register): {reason}")]
    Probe { path: String, reason: String },
    #[error("{path}: {reason}")]
    Signature { path: String, reason: String },
}

/// The engine and linker, shared by every plugin.
pub struct Runtime {
    /// What plugins may be granted besides their messages.
    capabilities: Arc<Capabilities>,
    engine: Engine,
    linker: Linker<StoreState>,
    ticker: Arc<EpochTicker>,
    slots: Arc<Slots>,
    cache: Option<Cache>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

/// Sizes of the instance pool, where compiled code is cached, and where plugins keep state:
/// what a runtime is made with, for its whole life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLimits {
    /// Component instances alive at once (one per plugin per stream in flight).
    pub max_instances: u32,
    /// Of those, instances that run on fibers (plugins importing WASI).
    pub max_wasi_instances: u32,
    /// How long an instantiation waits for a free place when the pool is full.
    pub instance_wait: Duration,
    /// The largest linear memory any instance may have.
    pub max_memory_bytes: u64,
    /// Compiled components are kept here, keyed by their bytes and the engine's settings:
    /// a restart or a reload with a known component skips compilation (seconds for JavaScript
    /// and Python plugins).
    pub cache_dir: Option<PathBuf>,
    /// What the capabilities live by: the state store (`[kv]`), the secrets (`[secrets]`).
    pub capabilities: CapabilitySettings,
}

impl PoolLimits {
    /// The limits the configuration sets.
    pub fn of(settings: &Settings) -> PoolLimits {
        PoolLimits {
            max_instances: settings.max_instances,
            max_wasi_instances: settings.max_wasi_instances,
            instance_wait: settings.instance_wait,
            max_memory_bytes: settings.max_memory_limit_bytes(),
            cache_dir: settings.cache_dir.clone(),
            capabilities: CapabilitySettings::of(settings),
        }
    }
}

impl Runtime {
    pub fn new(limits: PoolLimits, metrics: &Arc<Metrics>) -> anyhow::Result<Runtime> {
        let mut pool = PoolingAllocationConfig::new();
        let (instances, wasi) = (limits.max_instances, limits.max_wasi_instances);
        check_memory_mappings(instances, wasi)?;
        pool.total_component_instances(instances);
        // Each store keeps the fiber stack its async calls ran on until it is dropped: every
        // live instance of a WASI plugin holds one. Plugins called directly need none.
        pool.total_stacks(wasi);
        // A Rust or C component holds one core module plus a few small shim modules (with a
        // table each) that wit-component adds; JS and Python components hold more.
        pool.total_core_instances(instances.saturating_mul(8));
        pool.total_tables(instances.saturating_mul(8));
        // A memory per instance, and a second one for WASI plugins, whose adapters may bring
        // their own. Each memory reserves 4 GiB (plus guard) of address space, so that guest
        // loads and stores need no bounds checks (they would cost a body-rewriting plugin a
        // third of its speed here); about 80 TiB fit in x86-64's address space.
        pool.total_memories(instances.saturating_add(wasi));
        pool.max_memories_per_component(4);
        pool.max_tables_per_component(16);
        pool.max_memory_size(usize::try_from(limits.max_memory_bytes)?);
        // Every stream ends by handing its instances' memories back to the pool, which must
        // reset them for the next stream. By default that is an madvise per memory (a syscall
        // and a TLB shootdown), and the next stream page-faults on every page it touches again:
        // together more than half of a small plugin's per-stream cost. With the PAGEMAP_SCAN
        // ioctl (Linux 6.7+) wasmtime finds just the pages the guest dirtied, restores them
        // in place and keeps them resident. Without it, resident memory would be reset with a
        // memset of the whole kept range, which costs more than it saves: batch the madvise
        // calls instead.
        if PoolingAllocationConfig::is_pagemap_scan_available() {
            pool.pagemap_scan(Enabled::Yes);
            pool.linear_memory_keep_resident(KEEP_RESIDENT_BYTES);
            pool.table_keep_resident(KEEP_RESIDENT_TABLE_BYTES);
        } else {
            pool.decommit_batch_size(DECOMMIT_BATCH);
        }

        let mut config = Config::new();
        config
            // Component-model async would slow every call down (wasmtime issues 11209 and
            // 12836); no plugin needs it, and a feature flag must not turn it on unnoticed.
            .concurrency_support(false)
            .epoch_interruption(true)
            .wasm_component_model(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let cache = match &limits.cache_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cache directory {}", dir.display()))?;
                let mut settings = CacheConfig::new();
                settings.with_directory(dir);
                Some(Cache::new(settings).map_err(to_anyhow)?)
            }
            None => None,
        };
        config.cache(cache.clone());
        let engine = Engine::new(&config).map_err(to_anyhow).with_context(|| {
            format!(
                "cannot set up the instance pool for [runtime] max_instances = {instances} and \
                 max_wasi_instances = {wasi}: each instance reserves 4 GiB of address space for \
                 its memory (WASI ones 8 GiB), in one block the process's free address space \
                 must hold (about 80 TiB on x86-64 for the server, less inside Envoy); lower \
                 them"
            )
        })?;

        let mut linker = Linker::new(&engine);
        bindings::link_contracts(&mut linker).map_err(to_anyhow)?;
        Capabilities::link(&mut linker)?;
        let capabilities = Arc::new(Capabilities::new(&limits.capabilities, metrics)?);

        let ticker = Arc::new(EpochTicker::start(engine.weak())?);
        let slots = Arc::new(Slots::new(
            instances,
            wasi,
            limits.instance_wait,
            metrics.pool(),
        ));
        Ok(Runtime {
            capabilities,
            engine,
            linker,
            ticker,
            slots,
            cache,
        })
    }

    /// Compilation cache hits and misses so far; `None` without a cache directory.
    pub fn cache_stats(&self) -> Option<(usize, usize)> {
        self.cache
            .as_ref()
            .map(|cache| (cache.cache_hits(), cache.cache_misses()))
    }

    /// Reads the component at `path`. Returns its bytes and their SHA-256, which identifies a
    /// plugin version in logs, the admin listing and reloads.
    pub fn read(path: &Path) -> Result<(Vec<u8>, String), LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let digest = hex::encode(Sha256::digest(&bytes));
        Ok((bytes, digest))
    }

    /// Compiles, checks and links the component `bytes` read from `path` (see
    /// [`read`](Self::read)), then asks it what it handles. Every error names the file.
    pub async fn load(
        &self,
        chain: &str,
        name: &str,
        path: &Path,
        (bytes, digest): (Vec<u8>, String),
        settings: PluginSettings,
    ) -> Result<Plugin, LoadError> {
        let shown = path.display().to_string();
        if let Some(reason) = not_a_component(&bytes) {
            return Err(LoadError::Compile {
                path: shown,
                reason,
            });
        }
        let engine = self.engine.clone();
        let component = tokio::task::spawn_blocking(move || Component::new(&engine, &bytes))
            .await
            .expect("compilation task panicked")
            .map_err(|e| LoadError::Compile {
                path: shown.clone(),
                reason: first_line(&e),
            })?;
        let version = self
            .check_contract(&component)
            .map_err(|reason| LoadError::Contract {
                path: shown.clone(),
                reason,
            })?;
        let instance_pre =
            self.linker
                .instantiate_pre(&component)
                .map_err(|e| LoadError::Link {
                    path: shown.clone(),
                    reason: describe_link_error(&e),
                })?;
        let contract = |reason: String| LoadError::Contract {
            path: shown.clone(),
            reason: format!(
                "exports {} with a different shape than this host expects: {reason}",
                version.handler_export()
            ),
        };
        let exports = Exports::locate(&component, version).map_err(contract)?;
        let mut plugin = Plugin {
            compiled: Arc::new(Compiled {
                registration: Registration::default(),
                engine: self.engine.clone(),
                ticker: self.ticker.clone(),
                slots: self.slots.clone(),
                entry: self.entry(&component),
                pre: instance_pre,
                exports,
                path: path.to_path_buf(),
                digest,
                loaded_at: SystemTime::now(),
                capabilities: self.capabilities.clone(),
            }),
            chain: chain.into(),
            name: name.into(),
            signature: Arc::new(Signature::NotChecked),
            grants: Arc::new(self.capabilities.grant(PluginId { chain, name }, &settings)),
            breaker: Arc::new(Breaker::new(settings.breaker)),
            settings: Arc::new(settings),
            idle: Arc::default(),
        };
        let registration = match plugin.probe().await {
            Ok(registration) => registration,
            Err(Probe::Shape(e)) => return Err(contract(first_line(&e))),
            Err(Probe::Failed(e)) => {
                return Err(LoadError::Probe {
                    path: shown,
                    reason: e.to_string(),
                });
            }
        };
        Arc::get_mut(&mut plugin.compiled)
            .expect("plugin not yet shared")
            .registration = registration;
        Ok(plugin)
    }

    /// How the host calls into `component`: directly when it imports nothing but interfaces
    /// that never wait (the contract's own, bar `state`; those capabilities say never wait),
    /// else on a fiber, so WASI and state store calls can wait and long calls yield to other
    /// streams.
    fn entry(&self, component: &Component) -> Entry {
        let contract = format!("{CONTRACT_PACKAGE}/");
        let state = format!("{CONTRACT_PACKAGE}/state@");
        let only_contract = component
            .component_type()
            .imports(&self.engine)
            .all(|(name, _)| {
                (name.starts_with(&contract) && !name.starts_with(&state))
                    || Capabilities::never_waits(name)
            });
        if only_contract {
            Entry::Direct
        } else {
            Entry::Fiber
        }
    }

    /// The contract version `component` was built against; or, for one this host cannot run,
    /// why, in the operator's terms.
    fn check_contract(&self, component: &Component) -> Result<Contract, String> {
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        if let Some(&contract) = Contract::SPOKEN
            .iter()
            .find(|c| exports.contains(&c.handler_export()))
        {
            return Ok(contract);
        }
        let current = Contract::CURRENT.handler_export();
        let prefix = format!("{CONTRACT_PACKAGE}/handler@");
        if let Some(other) = exports.iter().find(|e| e.starts_with(&prefix)) {
            let version = &other[prefix.len()..];
            return Err(format!(
                "built against {CONTRACT_PACKAGE}@{version}, but this host speaks \
                 {CONTRACT_PACKAGE}@{} (expected an export named {current}); rebuild the \
                 plugin against wit/processor.wit",
                Contract::spoken()
            ));
        }
        let interfaces: Vec<&String> = exports
            .iter()
            .filter(|e| {
                ty.get_export(&self.engine, e)
                    .is_some_and(|i| matches!(i.ty, ComponentItem::ComponentInstance(_)))
            })
            .collect();
        Err(format!(
            "does not export {current}; it exports {} -- is it built for the \
             wasm-extproc:processor/plugin world?",
            if interfaces.is_empty() {
                "no interfaces".to_string()
            } else {
                interfaces
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))
    }
}

/// A compiled, linked plugin with its name and settings. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    compiled: Arc<Compiled>,
    /// The chain it belongs to ([`DEFAULT_CHAIN`](crate::registry::DEFAULT_CHAIN) for the
    /// plugins directory's own files).
    chain: Arc<str>,
    name: Arc<str>,
    /// Who signed the file it was loaded from.
    signature: Arc<Signature>,
    settings: Arc<PluginSettings>,
    breaker: Arc<Breaker>,
    /// Instances that served an exchange and wait for the next (`isolation = "reuse"` only).
    idle: Arc<Mutex<Vec<Instance>>>,
    /// What its settings grant it of each capability: its log budget, its namespaces in the
    /// state store, the origins it may call, its secrets.
    grants: Arc<Grants>,
}

/// Idle instances a reused plugin keeps: enough for the streams a busy host finishes between
/// two of its starts, and a bound on the memory (and pool slots) idle instances hold.
const MAX_IDLE_INSTANCES: usize = 64;

/// What compiling and linking one version of a component produced: shared by every chain
/// that holds this version, whatever its name and settings there.
struct Compiled {
    registration: Registration,
    engine: Engine,
    ticker: Arc<EpochTicker>,
    slots: Arc<Slots>,
    entry: Entry,
    pre: InstancePre<StoreState>,
    exports: Exports,
    path: PathBuf,
    digest: String,
    loaded_at: SystemTime,
    /// What plugins made of it are granted from.
    capabilities: Arc<Capabilities>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("registration", &self.compiled.registration)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// The chain it belongs to.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Whether a call into it can wait on something outside it (WASI, the state store,
    /// outbound HTTP; a long call yields too): it runs on a fiber, and its calls' futures can
    /// be pending. A plugin importing only the contract's interfaces that never wait runs to
    /// the end of each call on the calling thread.
    pub fn may_wait(&self) -> bool {
        self.compiled.entry == Entry::Fiber
    }

    /// Who signed the file it was loaded from.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The same plugin, with what its file's signature said.
    pub fn signed(mut self, signature: Signature) -> Plugin {
        self.signature = Arc::new(signature);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn settings(&self) -> &PluginSettings {
        &self.settings
    }

    /// The phases the plugin said it handles.
    pub fn phases(&self) -> PhaseSet {
        self.compiled.registration.phases
    }

    /// What the plugin registered at load.
    /// The contract version it was built against.
    pub fn contract(&self) -> Contract {
        self.compiled.exports.contract()
    }

    pub fn registration(&self) -> &Registration {
        &self.compiled.registration
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.compiled.path
    }

    /// SHA-256 of the component, hex.
    pub fn digest(&self) -> &str {
        &self.compiled.digest
    }

    /// When this version was compiled.
    pub fn loaded_at(&self) -> SystemTime {
        self.compiled.loaded_at
    }

    /// The same compiled component under another chain, name and settings: what a reload does
    /// with a file whose bytes did not change, and with one file in several chains.
    pub fn reconfigured(&self, chain: &str, name: &str, settings: PluginSettings) -> Plugin {
        Plugin {
            compiled: self.compiled.clone(),
            chain: chain.into(),
            name: name.into(),
            signature: self.signature.clone(),
            grants: Arc::new(
                self.compiled
                    .capabilities
                    .grant(PluginId { chain, name }, &settings),
            ),
            breaker: Arc::new(Breaker::new(settings.breaker)),
            settings: Arc::new(settings),
            idle: Arc::default(),
        }
    }

    /// The plugin's crash-loop breaker, shared by every stream.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// An instance that served an earlier stream, if the plugin is reused and one is idle.
    pub fn take_idle(&self) -> Option<Instance> {
        if self.settings.isolation != Isolation::Reuse {
            return None;
        }
        self.idle.lock().expect("idle instances").pop()
    }

    /// Takes back an instance whose stream ended with it in good health: a reused plugin keeps
    /// it for a later stream; otherwise it is dropped, and its memory returns to the pool.
    pub fn release(&self, instance: Instance) {
        // A stream dropped in the middle of an async call leaves the guest half way through
        // it: that instance is not trusted again.
        let abandoned = instance.store.data().call_started.is_some();
        if self.settings.isolation != Isolation::Reuse || abandoned {
            return;
        }
        let mut idle = self.idle.lock().expect("idle instances");
        if idle.len() < MAX_IDLE_INSTANCES {
            idle.push(instance);
        }
    }

    /// A fresh instance with its own store, for one ext_proc stream that received its current
    /// message at `arrived` (a full pool is waited on from then, for `[runtime]
    /// instance_wait_ms`). Its start code runs on the budget of a call that started at
    /// `started`.
    pub fn instantiate(
        &self,
        started: Instant,
        arrived: Instant,
    ) -> impl Future<Output = Result<Instance, PluginError>> {
        self.instantiate_within(started, arrived, self.settings.budget.timeout)
    }

    /// [`instantiate`](Self::instantiate) with the instance's calls on `timeout` rather than
    /// the plugin's own budget.
    async fn instantiate_within(
        &self,
        started: Instant,
        arrived: Instant,
        timeout: Duration,
    ) -> Result<Instance, PluginError> {
        let compiled = &self.compiled;
        let slot = compiled
            .slots
            .take(compiled.entry == Entry::Fiber, arrived)
            .await?;
        let _running = compiled.ticker.enter();
        let mut state = StoreState::new(self.settings.clone(), self.grants.store());
        state.timeout = timeout;
        let mut store = Store::new(&compiled.engine, state);
        store.limiter(|s| &mut s.limits);
        let entry = compiled.entry;
        store.epoch_deadline_callback(move |mut ctx| {
            let state = ctx.data_mut();
            state.ticks_seen = state.ticks_seen.saturating_add(1);
            Ok(if state.within_budget() {
                match entry {
                    Entry::Direct => wasmtime::UpdateDeadline::Continue(1),
                    Entry::Fiber => wasmtime::UpdateDeadline::Yield(1),
                }
            } else {
                wasmtime::UpdateDeadline::Interrupt
            })
        });
        store.data_mut().call_started = Some(started);
        store.set_epoch_deadline(1);
        let result = match entry {
            Entry::Direct => compiled.pre.instantiate(&mut store),
            // Boxed: its state is most of this future's, which every stream's future would
            // otherwise carry, whether its plugins need a fiber or not.
            Entry::Fiber => Box::pin(compiled.pre.instantiate_async(&mut store)).await,
        };
        store.data_mut().call_started = None;
        match result {
            Ok(instance) => Ok(Instance {
                store,
                instance,
                handlers: Handlers::default(),
                compiled: compiled.clone(),
                _slot: slot,
            }),
            Err(e) => Err(classify(&e, store.data(), true)),
        }
    }

    /// Checks a fresh instance's handlers and asks it what it handles, on [`LOAD_BUDGET`]
    /// (or the plugin's own budget, if longer).
    async fn probe(&self) -> Result<Registration, Probe> {
        let started = Instant::now();
        let budget = self.settings.budget.timeout.max(LOAD_BUDGET);
        let mut instance = self
            .instantiate_within(started, started, budget)
            .await
            .map_err(Probe::Failed)?;
        let Instance {
            store,
            instance,
            compiled,
            ..
        } = &mut instance;
        let exports = &compiled.exports;
        exports.check(&mut *store, instance).map_err(Probe::Shape)?;
        let register = exports
            .register(&mut *store, instance)
            .map_err(Probe::Shape)?;
        let _running = compiled.ticker.enter();
        begin(store, None, started);
        let result = invoke(store, compiled.entry, register, ()).await;
        store.data_mut().call_started = None;
        let (registration,) =
            result.map_err(|e| Probe::Failed(classify(&e, store.data(), false)))?;
        Ok(Registration {
            phases: from_wit_phases(registration.phases),
            request_body: from_wit_delivery(registration.request_body),
            response_body: from_wit_delivery(registration.response_body),
        })
    }
}

/// How long a plugin may take, at load, to start and say what it handles. No request waits on
/// it, so it is not the plugin's per-call budget: a large guest (an interpreter's snapshot)
/// starting on a busy machine takes tens of milliseconds, and this only stops one that never
/// answers.
pub const LOAD_BUDGET: Duration = Duration::from_secs(1);

/// Why asking a new plugin what it handles failed.
enum Probe {
    /// Its handlers do not have the contract's types.
    Shape(wasmtime::Error),
    /// It failed like a plugin fails on a request.
    Failed(PluginError),
}

/// How the host enters a plugin's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// A plain call on the caller's thread. Its epoch deadline can only stop it, not pause it:
    /// it holds its tokio worker for at most its budget.
    Direct,
    /// On a fiber (`call_async`): the guest can wait on WASI and yields to other streams at
    /// every epoch tick.
    Fiber,
}

/// What a handler decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Continue,
    Respond(ImmediateResponse),
}

/// A successful call: the handler's decision and what it asked for besides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub action: Action,
    pub effects: Effects,
}

/// One plugin's instance for one stream. Owned by the task serving the stream.
pub struct Instance {
    // Dropped before the slot below: the pool has the instance back before another stream
    // may take its place.
    store: Store<StoreState>,
    instance: ComponentInstance,
    handlers: Handlers,
    compiled: Arc<Compiled>,
    _slot: Slot,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("path", &self.compiled.path)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Runs the handler for `phase` on `message`, with `context` describing the exchange, on a
    /// budget that started at `started`. The message comes back as the handler left it,
    /// whether or not it failed: the caller keeps or rolls back its changes (see
    /// [`Message::rollback`]).
    /// Calls the handler for `phase` on `message`, lending a body handler `headers` too (when
    /// its contract takes them). Returns what was lent, changed or not, and the outcome.
    pub async fn call(
        &mut self,
        phase: Phase,
        message: Message,
        headers: Option<HeaderMap>,
        context: &Arc<ExchangeContext>,
        started: Instant,
    ) -> (Message, Option<HeaderMap>, Result<Outcome, PluginError>) {
        let Instance {
            store,
            instance,
            handlers,
            compiled,
            ..
        } = self;
        let _running = compiled.ticker.enter();
        begin(store, Some(phase), started);
        let end_of_stream = matches!(
            message,
            Message::Headers {
                end_of_stream: true,
                ..
            }
        );
        let state = store.data_mut();
        state.lent = Some(message);
        state.lent_headers = headers;
        if !Arc::ptr_eq(&state.context, context) {
            state.context = context.clone();
        }
        let (entry, exports) = (compiled.entry, &compiled.exports);
        let fields = || Resource::<bindings::Fields>::new_borrow(store::LENT_REP);
        let body = || Resource::<bindings::Body>::new_borrow(store::LENT_REP);
        let result = match phase {
            Phase::RequestHeaders | Phase::ResponseHeaders => {
                match handlers.headers(exports, &mut *store, instance, phase) {
                    Ok(func) => invoke(store, entry, func, (fields(), end_of_stream)).await,
                    Err(e) => Err(e),
                }
            }
            Phase::RequestBody | Phase::ResponseBody => {
                match handlers.body(exports, &mut *store, instance, phase) {
                    Ok(BodyHandler::WithHeaders(func)) => {
                        let headers = store
                            .data()
                            .lent_headers
                            .is_some()
                            .then(|| Resource::new_borrow(store::HEADERS_REP));
                        invoke(store, entry, func, (body(), headers)).await
                    }
                    Ok(BodyHandler::BodyOnly(func)) => invoke(store, entry, func, (body(),)).await,
                    Err(e) => Err(e),
                }
            }
            Phase::RequestTrailers | Phase::ResponseTrailers => {
                match handlers.trailers(exports, &mut *store, instance, phase) {
                    Ok(func) => invoke(store, entry, func, (fields(),)).await,
                    Err(e) => Err(e),
                }
            }
        };
        let state = store.data_mut();
        state.call_started = None;
        state.flush_output();
        let message = state.lent.take().expect("message lent for the call");
        let headers = state.lent_headers.take();
        let effects = std::mem::take(&mut state.effects);
        let outcome = match result {
            Ok((action,)) => convert_action(action).map(|action| Outcome { action, effects }),
            Err(e) => Err(classify(&e, store.data(), false)),
        };
        (message, headers, outcome)
    }
}

/// Readies `store` for a call of `phase` (`None`: `register`) that started at `started`.
fn begin(store: &mut Store<StoreState>, phase: Option<Phase>, started: Instant) {
    let state = store.data_mut();
    state.set_phase(phase);
    state.limits.reset();
    state.call_started = Some(started);
    state.ticks_seen = 0;
    store.set_epoch_deadline(1);
}

/// Calls a guest export directly or on a fiber, as the plugin's [`Entry`] says.
async fn invoke<P, R>(
    store: &mut Store<StoreState>,
    entry: Entry,
    func: TypedFunc<P, R>,
    params: P,
) -> wasmtime::Result<R>
where
    P: ComponentNamedList + Lower + Send + Sync,
    R: ComponentNamedList + Lift + Send + Sync + 'static,
{
    match entry {
        Entry::Direct => func.call(store, params),
        Entry::Fiber => func.call_async(store, params).await,
    }
}

fn convert_action(action: wit::Action) -> Result<Action, PluginError> {
    match action {
        wit::Action::Continue => Ok(Action::Continue),
        wit::Action::Respond(r) => {
            if !(200..=599).contains(&r.status) {
                return Err(PluginError::InvalidOutput(format!(
                    "immediate response status {} is not 200-599",
                    r.status
                )));
            }
            Ok(Action::Respond(ImmediateResponse {
                status: r.status,
                headers: r.headers,
                body: r.body,
                grpc_status: r.grpc_status,
                details: r.details,
            }))
        }
    }
}

fn from_wit_delivery(delivery: wit::BodyDelivery) -> Delivery {
    match delivery {
        wit::BodyDelivery::Chunks => Delivery::Chunks,
        wit::BodyDelivery::Whole => Delivery::Whole,
    }
}

fn from_wit_phases(flags: wit::Phases) -> PhaseSet {
    [
        (wit::Phases::REQUEST_HEADERS, Phase::RequestHeaders),
        (wit::Phases::REQUEST_BODY, Phase::RequestBody),
        (wit::Phases::REQUEST_TRAILERS, Phase::RequestTrailers),
        (wit::Phases::RESPONSE_HEADERS, Phase::ResponseHeaders),
        (wit::Phases::RESPONSE_BODY, Phase::ResponseBody),
        (wit::Phases::RESPONSE_TRAILERS, Phase::ResponseTrailers),
    ]
    .into_iter()
    .filter(|(flag, _)| flags.contains(*flag))
    .map(|(_, phase)| phase)
    .collect()
}

/// Sorts a guest failure into the kinds the failure policy and the logs distinguish.
fn classify(error: &wasmtime::Error, state: &StoreState, instantiating: bool) -> PluginError {
    if state.limits.exceeded() {
        return PluginError::MemoryLimit(state.limits.limit());
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PluginError::Deadline(state.timeout),
        Some(trap) => PluginError::Trap(trap.to_string()),
        None if instantiating => PluginError::Instantiate(first_line(error)),
        None => PluginError::Trap(first_line(error)),
    }
}

/// What a file that cannot be a component is, and how to get a component instead; `None`
/// when it has a component's header (the parser then says what is wrong inside).
fn not_a_component(bytes: &[u8]) -> Option<String> {
    const BUILD: &str = "build the plugin for `wasm32-wasip2`, or link it as a component \
                         (plugins/README.md, \"Building a plugin\")";
    let Some(header) = bytes.get(..8) else {
        return Some(format!(
            "{} bytes, too short for WebAssembly (a half-written file?); {BUILD}",
            bytes.len()
        ));
    };
    if &header[..4] != b"\0asm" {
        let start: String = bytes[..bytes.len().min(16)]
            .iter()
            .map(|&b| match b {
                b' '..=b'~' => (b as char).to_string(),
                _ => format!("\\x{b:02x}"),
            })
            .collect();
        return Some(format!(
            "not WebAssembly: it starts with \"{start}\", not \"\\0asm\"; {BUILD}"
        ));
    }
    match &header[4..] {
        // Version 1, layer 0: a core module.
        [1, 0, 0, 0] => Some(
            "a core WebAssembly module, not a component: build it for `wasm32-wasip2` \
             (which links a component), or wrap it with `wasm-tools component new` \
             (plugins/README.md, \"Building a plugin\")"
                .to_string(),
        ),
        // Layer 1: a component, of whatever version; the parser takes it from here.
        [_, _, 1, 0] => None,
        _ => Some(format!(
            "an unknown WebAssembly version or layer ({:02x?}); {BUILD}",
            &header[4..]
        )),
    }
}

fn first_line(error: &wasmtime::Error) -> String {
    let text = format!("{error:#}");
    text.lines().next().unwrap_or_default().to_string()
}

/// wasmtime says "component imports instance `x`, but a matching implementation was not found
/// in the linker"; operators need the name and that the host does not provide it.
fn describe_link_error(error: &wasmtime::Error) -> String {
    let text = format!("{error:#}");
    let import = text
        .split('`')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| first_line(error));
    format!(
        "`{import}`, which this host does not provide (it provides WASI 0.2 and \
         {CONTRACT_PACKAGE}/{{host,context}}@{}): {}",
        Contract::spoken(),
        text.replace('\n', " ")
    )
}

/// Memory mappings the kernel lets one process hold on Linux unless told otherwise
/// (`vm.max_map_count`).
const DEFAULT_MAX_MAP_COUNT: u64 = 65_530;
/// What the process maps besides the pool: code, heaps, thread stacks, sockets.
const OTHER_MAPPINGS: u64 = 3_000;

/// Refuses a pool the kernel would not let the host fill: each fiber stack takes two memory
/// mappings from the start (stack and guard page), and each live instance about four (its
/// memory's image, its writable pages, its guard). Past `vm.max_map_count` instantiations
/// would fail at random under load; better to say so at start-up.
fn check_memory_mappings(instances: u32, wasi: u32) -> anyhow::Result<()> {
    let limit = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_MAP_COUNT);
    let needed = OTHER_MAPPINGS + 2 * u64::from(wasi) + 4 * u64::from(instances);
    if needed > limit {
        anyhow::bail!(
            "[runtime] max_instances = {instances} and max_wasi_instances = {wasi} need about \
             {needed} memory mappings when the pool is full, but the kernel allows {limit} \
             (vm.max_map_count): lower them, or raise vm.max_map_count on the node"
        );
    }
    Ok(())
}

fn to_anyhow(error: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{error:#}")
}
