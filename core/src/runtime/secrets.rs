//! The secrets capability: `wasi:config/store` (the standard interface, any contract version),
//! answering each plugin with the secrets its settings grant, as their files hold them now
//! ([`crate::secrets`]). A plugin granted none sees an empty store; a name it was not granted
//! reads as absent, like one that does not exist, so a plugin cannot learn what others hold.

use std::sync::{Arc, Mutex};

use wasmtime::component::Linker;
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};

use super::capability::{Capability, Host, PluginId};
use crate::config::{PluginSettings, Settings};
use crate::metrics::Metrics;
use crate::secrets::SecretsSettings;

/// Every secret's current value.
pub struct Secrets {
    secrets: Arc<crate::secrets::Secrets>,
}

impl Capability for Secrets {
    type Settings = SecretsSettings;
    type Grant = Arc<Grant>;
    type Store = SecretsStore;

    /// Reading a secret is a lookup in memory.
    const NEVER_WAIT: &'static [&'static str] = &["wasi:config/store@"];

    fn settings(settings: &Settings) -> SecretsSettings {
        settings.secrets.clone()
    }

    fn new(settings: &SecretsSettings, metrics: &Arc<Metrics>) -> anyhow::Result<Secrets> {
        Ok(Secrets {
            secrets: Arc::new(crate::secrets::Secrets::open(settings, metrics)?),
        })
    }

    fn link<T: Host<Self>>(linker: &mut Linker<T>) -> anyhow::Result<()> {
        wasmtime_wasi_config::add_to_linker(linker, |store| store.parts().part.view())
            .map_err(super::to_anyhow)
    }

    fn grant(&self, _plugin: PluginId<'_>, settings: &PluginSettings) -> Arc<Grant> {
        Arc::new(Grant {
            secrets: self.secrets.clone(),
            names: settings.secrets.clone(),
            view: Mutex::new(None),
        })
    }

    fn store(grant: &Arc<Grant>) -> SecretsStore {
        SecretsStore {
            grant: grant.clone(),
            view: None,
        }
    }
}

/// The secrets one plugin may read, and what it was last shown of them.
pub struct Grant {
    secrets: Arc<crate::secrets::Secrets>,
    names: Vec<String>,
    /// Built when first read, and again only after a secret changed.
    view: Mutex<Option<(u64, Arc<WasiConfigVariables>)>>,
}

impl Grant {
    /// The granted secrets as they are now.
    fn current(&self) -> Arc<WasiConfigVariables> {
        let mut view = self.view.lock().expect("secrets view");
        let generation = self.secrets.generation();
        match &*view {
            Some((seen, values)) if *seen == generation => values.clone(),
            _ => {
                let (generation, values) = self.secrets.values(&self.names);
                let values = Arc::new(values.into_iter().collect::<WasiConfigVariables>());
                *view = Some((generation, values.clone()));
                values
            }
        }
    }
}

/// One store's secrets: its plugin's grant, and the values its current call reads.
pub struct SecretsStore {
    grant: Arc<Grant>,
    view: Option<Arc<WasiConfigVariables>>,
}

impl SecretsStore {
    fn view(&mut self) -> WasiConfig<'_> {
        WasiConfig::from(&**self.view.insert(self.grant.current()))
    }
}
