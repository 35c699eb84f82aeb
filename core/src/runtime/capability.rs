//! What a plugin may be given beyond the message it handles: logging, state, outbound HTTP,
//! secrets. Each capability is one module that owns all of it -- the settings it lives by, what
//! it grants each plugin, what each store holds of it, the imports it links and its metrics --
//! and is registered once, in the list at the bottom of this file. The runtime, the plugin and
//! the store see the capabilities only through the structs that list makes.

use std::sync::Arc;

use wasmtime::component::Linker;

use super::store::StoreState;
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

    /// Its settings, from the whole configuration.
    fn settings(settings: &Settings) -> Self::Settings;
    /// Its runtime-wide part.
    fn new(settings: &Self::Settings, metrics: &Arc<Metrics>) -> anyhow::Result<Self>;
    /// Adds the imports it provides to the linker every plugin is linked with.
    fn link(linker: &mut Linker<StoreState>) -> anyhow::Result<()>;
    /// What `plugin`, running with `settings`, is granted.
    fn grant(&self, plugin: PluginId<'_>, settings: &PluginSettings) -> Self::Grant;
    /// A new store's part, from its plugin's grant.
    fn store(grant: &Self::Grant) -> Self::Store;
}

/// Makes, from a list of `field: Capability => its Settings`, the structs that hold one of
/// each: settings, runtime-wide parts, a plugin's grants and a store's parts. (The settings
/// type is spelt out so that the public settings name no capability type.)
macro_rules! capabilities {
    ($($field:ident: $capability:ty => $settings:ty),* $(,)?) => {
        /// Every capability's settings: what a runtime is made with, besides its pool.
        #[derive(Debug, Clone, PartialEq, Eq, Default)]
        pub struct CapabilitySettings {
            $(pub $field: $settings,)*
        }

        impl CapabilitySettings {
            pub fn of(settings: &Settings) -> CapabilitySettings {
                CapabilitySettings {
                    $($field: <$capability>::settings(settings),)*
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
                metrics: &Arc<Metrics>,
            ) -> anyhow::Result<Capabilities> {
                Ok(Capabilities {
                    $($field: <$capability>::new(&settings.$field, metrics)?,)*
                })
            }

            pub fn link(linker: &mut Linker<StoreState>) -> anyhow::Result<()> {
                $(<$capability>::link(linker)?;)*
                Ok(())
            }

            pub fn grant(&self, plugin: PluginId<'_>, settings: &PluginSettings) -> Grants {
                Grants {
                    $($field: self.$field.grant(plugin, settings),)*
                }
            }
        }

        /// What one plugin is granted of every capability.
        pub struct Grants {
            $(pub $field: <$capability as Capability>::Grant,)*
        }

        impl Grants {
            /// A new store's parts.
            pub fn store(&self) -> InStore {
                InStore {
                    $($field: <$capability>::store(&self.$field),)*
                }
            }
        }

        /// What one store holds of every capability.
        pub struct InStore {
            $(pub $field: <$capability as Capability>::Store,)*
        }
    };
}

capabilities! {
    log: super::output::Logging => (),
    state: super::state::State => crate::kv::KvSettings,
    http: super::outbound::Outbound => (),
    secrets: super::secrets::Secrets => crate::secrets::SecretsSettings,
}
