//! What a plugin may be given beyond the message it handles: logging, state, outbound HTTP,
//! secrets. Each capability is one module that owns all of it -- the settings it lives by, what
//! it grants each plugin, what each store holds of it, the imports it links and its metrics --
//! and is registered once, in the list in `store.rs` ([`capabilities!`]). Adding one is a module
//! with a type that implements [`Capability`], a line in that list, and its settings in
//! `config.rs` if it has any. The runtime, the
//! plugin and the store see the capabilities only through the structs that list makes, and a
//! capability sees the store only through [`Host`]: its own part, the resource table and the
//! current call's budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::WasiView;
use wasmtime_wasi_http::WasiHttpView;

use crate::config::{PluginSettings, Settings};
use crate::metrics::Metrics;

/// Which plugin a grant is for.
#[derive(Debug, Clone, Copy)]
pub struct PluginId<'a> {
    pub chain: &'a str,
    pub name: &'a str,
}

/// One capability. Its runtime-wide part is made once with the runtime; each loaded plugin
/// gets a [`Grant`](Capability::Grant) from it, and each instance of that plugin a
/// [`Store`](Capability::Store) part made from the grant -- on the path of every stream, so
/// it should cost no more than a few reference counts.
pub trait Capability: Sized + Send + Sync + 'static {
    /// Its share of the configuration that lives as long as the runtime.
    type Settings: std::fmt::Debug + Clone + PartialEq + Eq + Default;
    /// What one plugin may do with it, shared by every instance of the plugin.
    type Grant: Send + Sync + 'static;
    /// What one store holds of it.
    type Store: Send + 'static;

    /// Imports it links (names, or their start) whose functions never wait: a plugin that
    /// imports nothing else is called directly, without a fiber.
    const NEVER_WAIT: &'static [&'static str] = &[];

    /// Its settings, from the whole configuration.
    fn settings(settings: &Settings) -> Self::Settings;
    /// Its runtime-wide part.
    fn new(settings: &Self::Settings, metrics: &Arc<Metrics>) -> anyhow::Result<Self>;
    /// Adds the imports it provides to the linker every plugin is linked with.
    fn link<T: Host<Self>>(linker: &mut Linker<T>) -> anyhow::Result<()>;
    /// What `plugin`, running with `settings`, is granted.
    fn grant(&self, plugin: PluginId<'_>, settings: &PluginSettings) -> Self::Grant;
    /// A new store's part, from its plugin's grant.
    fn store(grant: &Self::Grant) -> Self::Store;
}

/// A store, as a capability's imports reach it. WASI's and `wasi:http`'s own views are part of
/// it, because wasmtime's WASI crates link against them.
pub trait Host<C: Capability>: WasiView + WasiHttpView + Send + 'static {
    /// The capability's part of the store, the resource table, and the current call's budget.
    fn parts(&mut self) -> Parts<'_, C>;
}

/// What [`Host::parts`] lends.
pub struct Parts<'a, C: Capability> {
    pub part: &'a mut C::Store,
    pub table: &'a mut ResourceTable,
    pub call: Call,
}

/// The budget of the guest call under way.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// When it started; `None` between calls.
    pub started: Option<Instant>,
    /// How long it may take.
    pub timeout: Duration,
}

impl Call {
    /// What is left of it.
    pub fn left(self) -> Duration {
        self.started
            .map_or(self.timeout, |t| self.timeout.saturating_sub(t.elapsed()))
    }

    /// When `share` of it will have passed (from now, between calls).
    pub fn share_ends(self, share: f64) -> Instant {
        self.started.map_or_else(Instant::now, |started| {
            started + self.timeout.mul_f64(share)
        })
    }
}

/// Makes, from a list of `field: Capability => its Settings`, the structs that hold one of
/// each: settings, runtime-wide parts, a plugin's grants and a store's parts. (The settings
/// type is spelt out so that the public settings name no capability type.)
macro_rules! capabilities {
    (store: $store:ty; $($field:ident: $capability:ty => $settings:ty),* $(,)?) => {
        /// Every capability's settings: what a runtime is made with, besides its pool.
        #[derive(Debug, Clone, PartialEq, Eq, Default)]
        pub struct CapabilitySettings {
            $(pub $field: $settings,)*
        }

        impl CapabilitySettings {
            pub fn of(settings: &$crate::config::Settings) -> CapabilitySettings {
                CapabilitySettings {
                    $($field: <$capability as $crate::runtime::capability::Capability>::settings(settings),)*
                }
            }
        }

        /// Every capability's runtime-wide part.
        pub struct Capabilities {
            $(pub $field: $capability,)*
        }

        impl Capabilities {
            pub fn new(
                settings: &CapabilitySettings,
                metrics: &std::sync::Arc<$crate::metrics::Metrics>,
            ) -> anyhow::Result<Capabilities> {
                Ok(Capabilities {
                    $($field: <$capability as $crate::runtime::capability::Capability>::new(&settings.$field, metrics)?,)*
                })
            }

            /// Whether every capability that links `import` says its functions never wait.
            pub fn never_waits(import: &str) -> bool {
                false $(|| <$capability as $crate::runtime::capability::Capability>::NEVER_WAIT
                    .iter()
                    .any(|start| import.starts_with(start)))*
            }

            pub fn link(linker: &mut wasmtime::component::Linker<$store>) -> anyhow::Result<()> {
                $(<$capability as $crate::runtime::capability::Capability>::link(linker)?;)*
                Ok(())
            }

            pub fn grant(
                &self,
                plugin: $crate::runtime::capability::PluginId<'_>,
                settings: &$crate::config::PluginSettings,
            ) -> Grants {
                Grants {
                    $($field: <$capability as $crate::runtime::capability::Capability>::grant(&self.$field, plugin, settings),)*
                }
            }
        }

        /// What one plugin is granted of every capability.
        pub struct Grants {
            $(pub $field: <$capability as $crate::runtime::capability::Capability>::Grant,)*
        }

        impl Grants {
            /// A new store's parts.
            pub fn store(&self) -> InStore {
                InStore {
                    $($field: <$capability as $crate::runtime::capability::Capability>::store(&self.$field),)*
                }
            }
        }

        /// What one store holds of every capability.
        pub struct InStore {
            $(pub $field: <$capability as $crate::runtime::capability::Capability>::Store,)*
        }

        $(
            impl $crate::runtime::capability::Host<$capability> for $store {
                fn parts(&mut self) -> $crate::runtime::capability::Parts<'_, $capability> {
                    let call = self.call();
                    $crate::runtime::capability::Parts {
                        part: &mut self.caps.$field,
                        table: &mut self.table,
                        call,
                    }
                }
            }
        )*
    };
}

pub(super) use capabilities;
