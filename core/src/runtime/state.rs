//! The state capability: the contract's state imports, `wasi:keyvalue/store` and `atomics` and
//! the contract's own `state` interface, over the host's [`Kv`].
//!
//! A bucket is a namespace the plugin may open ([`Access::open`]): its own, and the shared ones
//! its settings grant. Every operation runs within what is left of the plugin's call, and its
//! result is counted per plugin.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use wasmtime::Result;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use super::bindings::Bucket;
use super::bindings::current::wasi::keyvalue::{atomics, store};
use super::bindings::current::wasm_extproc::processor::state;
use super::capability::{Call, Capability, Host, PluginId};
use crate::config::{PluginSettings, Settings};
use crate::kv::{Access, Count, Kv, KvError, KvSettings};
use crate::metrics::Metrics;

/// The state store every plugin reaches through `wasi:keyvalue` and `state`.
pub struct State {
    kv: Arc<Kv>,
    operations: Family<KvLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KvLabels {
    chain: String,
    plugin: String,
    operation: &'static str,
    result: &'static str,
}

impl Capability for State {
    type Settings = KvSettings;
    /// The plugin's namespaces and counters.
    type Grant = Arc<StateGrant>;
    type Store = Arc<StateGrant>;

    fn settings(settings: &Settings) -> KvSettings {
        settings.kv.clone()
    }

    fn new(settings: &KvSettings, metrics: &Arc<Metrics>) -> anyhow::Result<State> {
        Ok(State {
            kv: Arc::new(Kv::new(settings.clone())?),
            operations: metrics.family(
                "kv_operations",
                "State store operations plugins made, by plugin, operation and result (ok, or \
                 denied, too_large, full, not_a_counter, invalid, timeout, unavailable)",
                Family::default,
            ),
        })
    }

    fn link<T: Host<Self>>(linker: &mut Linker<T>) -> anyhow::Result<()> {
        store::add_to_linker::<T, InStore>(linker, view).map_err(super::to_anyhow)?;
        atomics::add_to_linker::<T, InStore>(linker, view).map_err(super::to_anyhow)?;
        state::add_to_linker::<T, InStore>(linker, view).map_err(super::to_anyhow)
    }

    /// Its own namespace (its chain and name) and the shared ones its settings grant.
    fn grant(&self, plugin: PluginId<'_>, settings: &PluginSettings) -> Arc<StateGrant> {
        let access = Access {
            kv: self.kv.clone(),
            chain: plugin.chain.into(),
            own: plugin.name.into(),
            shared: settings.kv_namespaces.clone().into(),
        };
        Arc::new(StateGrant::new(
            access,
            self.operations.clone(),
            plugin.chain.into(),
            plugin.name.into(),
        ))
    }

    fn store(grant: &Arc<StateGrant>) -> Arc<StateGrant> {
        grant.clone()
    }
}

/// The operations, as counted: `set-with-ttl` counts as a `set`.
#[derive(Debug, Clone, Copy)]
enum Operation {
    Open,
    Get,
    Set,
    Delete,
    Exists,
    ListKeys,
    Increment,
    IncrementInWindow,
}

impl Operation {
    const COUNT: usize = 8;

    fn name(self) -> &'static str {
        match self {
            Operation::Open => "open",
            Operation::Get => "get",
            Operation::Set => "set",
            Operation::Delete => "delete",
            Operation::Exists => "exists",
            Operation::ListKeys => "list_keys",
            Operation::Increment => "increment",
            Operation::IncrementInWindow => "increment_in_window",
        }
    }
}
const RESULTS: [&str; 8] = [
    "ok",
    "denied",
    "too_large",
    "full",
    "not_a_counter",
    "invalid",
    "timeout",
    "unavailable",
];

/// One plugin's way into the store, and its counters, looked up once each.
pub struct StateGrant {
    pub access: Access,
    operations: Family<KvLabels, Counter>,
    chain: Arc<str>,
    plugin: Arc<str>,
    counters: [[OnceLock<Counter>; RESULTS.len()]; Operation::COUNT],
}

impl StateGrant {
    fn new(
        access: Access,
        operations: Family<KvLabels, Counter>,
        chain: Arc<str>,
        plugin: Arc<str>,
    ) -> Self {
        StateGrant {
            access,
            operations,
            chain,
            plugin,
            counters: Default::default(),
        }
    }

    fn count<T>(&self, operation: Operation, result: &Result<T, KvError>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        let index = RESULTS.iter().position(|r| *r == outcome).unwrap_or(0);
        self.counters[operation as usize][index]
            .get_or_init(|| {
                let labels = KvLabels {
                    chain: self.chain.to_string(),
                    plugin: self.plugin.to_string(),
                    operation: operation.name(),
                    result: outcome,
                };
                self.operations.get_or_create(&labels).clone()
            })
            .inc();
    }
}

impl std::fmt::Debug for StateGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateGrant")
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

/// The error a plugin sees: `access-denied`, or `other` with the kind first, so that a plugin
/// can tell a store it cannot reach (`timeout: ...`, `unavailable: ...`) from a refusal
/// (`full: ...`, `too_large: ...`).
fn to_wit(e: KvError) -> store::Error {
    match e {
        KvError::Denied(_) => store::Error::AccessDenied,
        other => store::Error::Other(format!("{}: {other}", other.kind())),
    }
}

/// What the state imports work on in a store: the plugin's grant, the resource table its
/// buckets live in, and the budget of the call under way.
pub struct StateView<'a> {
    state: &'a Arc<StateGrant>,
    table: &'a mut ResourceTable,
    call: Call,
}

fn view<T: Host<State>>(store: &mut T) -> StateView<'_> {
    let parts = store.parts();
    StateView {
        state: parts.part,
        table: parts.table,
        call: parts.call,
    }
}

/// The state imports' view of a store, for the linker.
struct InStore;

impl HasData for InStore {
    type Data<'a> = StateView<'a>;
}

impl StateView<'_> {
    /// What is left of the current call's budget.
    fn left(&self) -> Duration {
        self.call.left()
    }

    fn bucket(&mut self, bucket: &Resource<Bucket>) -> Result<Arc<str>> {
        Ok(self.table.get(bucket)?.namespace.clone())
    }

    /// Runs one operation on the namespace of `bucket`, counts it and answers in WIT's terms.
    async fn on<T, F>(
        &mut self,
        operation: Operation,
        bucket: &Resource<Bucket>,
        run: impl FnOnce(Arc<StateGrant>, Arc<str>, Duration) -> F,
    ) -> Result<Result<T, store::Error>>
    where
        F: Future<Output = Result<T, KvError>>,
    {
        let namespace = self.bucket(bucket)?;
        let state = self.state.clone();
        let result = run(state.clone(), namespace, self.left()).await;
        state.count(operation, &result);
        Ok(result.map_err(to_wit))
    }
}

impl store::Host for StateView<'_> {
    fn open(&mut self, identifier: String) -> Result<Result<Resource<Bucket>, store::Error>> {
        let opened = self.state.access.open(&identifier);
        self.state.count(Operation::Open, &opened);
        match opened {
            Ok(namespace) => Ok(Ok(self.table.push(Bucket { namespace })?)),
            Err(e) => Ok(Err(to_wit(e))),
        }
    }
}

impl store::HostBucket for StateView<'_> {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Result<Option<Vec<u8>>, store::Error>> {
        self.on(Operation::Get, &bucket, |s, ns, left| async move {
            s.access.kv.get(&ns, &key, left).await
        })
        .await
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<Result<(), store::Error>> {
        self.on(Operation::Set, &bucket, |s, ns, left| async move {
            s.access.kv.set(&ns, &key, value, None, left).await
        })
        .await
    }

    async fn delete(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Result<(), store::Error>> {
        self.on(Operation::Delete, &bucket, |s, ns, left| async move {
            s.access.kv.delete(&ns, &key, left).await
        })
        .await
    }

    async fn exists(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Result<bool, store::Error>> {
        self.on(Operation::Exists, &bucket, |s, ns, left| async move {
            s.access.kv.exists(&ns, &key, left).await
        })
        .await
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<Result<store::KeyResponse, store::Error>> {
        self.on(Operation::ListKeys, &bucket, |s, ns, left| async move {
            let (keys, cursor) = s.access.kv.keys(&ns, cursor.unwrap_or(0), left).await?;
            Ok(store::KeyResponse { keys, cursor })
        })
        .await
    }

    fn drop(&mut self, bucket: Resource<Bucket>) -> Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for StateView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<Result<u64, store::Error>> {
        self.on(Operation::Increment, &bucket, |s, ns, left| async move {
            let count = s.access.kv.increment(&ns, &key, delta, None, left).await?;
            Ok(count.value)
        })
        .await
    }
}

impl state::Host for StateView<'_> {
    async fn set_with_ttl(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        ttl_ms: u64,
    ) -> Result<Result<(), store::Error>> {
        self.on(Operation::Set, &bucket, |s, ns, left| async move {
            let ttl = Duration::from_millis(ttl_ms);
            s.access.kv.set(&ns, &key, value, Some(ttl), left).await
        })
        .await
    }

    async fn increment_in_window(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
        window_ms: u64,
    ) -> Result<Result<state::WindowCount, store::Error>> {
        self.on(
            Operation::IncrementInWindow,
            &bucket,
            |s, ns, left| async move {
                let window = Duration::from_millis(window_ms);
                let Count { value, expires_in } = s
                    .access
                    .kv
                    .increment(&ns, &key, delta, Some(window), left)
                    .await?;
                Ok(state::WindowCount {
                    count: value,
                    resets_in_ms: expires_in.map_or(window_ms, |d| d.as_millis() as u64),
                })
            },
        )
        .await
    }
}
