//! Which plugins run, in which order: every `.wasm` file in the plugins directory, by file name.
//!
//! File-name order is what an operator controls on a volume (`10-auth.wasm` before
//! `20-tag.wasm`) and is the same on every replica. Entries whose names start with `.` are
//! skipped: Kubernetes keeps the real files of ConfigMap volumes under `..data` and
//! timestamped `..2026_...` directories, and exposes each file as a symlink beside them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::config::{Config, EnvoySettings};
use crate::http::{Phase, PhaseSet};
use crate::runtime::{Plugin, Runtime};

/// The loaded chain, in order. Shared by every stream that starts while it is current.
#[derive(Debug, Clone)]
pub struct Chain {
    plugins: Vec<Plugin>,
    phases: PhaseSet,
}

impl Chain {
    pub fn new(plugins: Vec<Plugin>) -> Self {
        let phases = plugins
            .iter()
            .fold(PhaseSet::EMPTY, |set, p| set.union(p.phases()));
        Chain { plugins, phases }
    }

    pub fn plugins(&self) -> &[Plugin] {
        &self.plugins
    }

    /// Every phase some plugin handles.
    pub fn phases(&self) -> PhaseSet {
        self.phases
    }

    /// The most time the chain can take on one message of `phase`: the budgets of the
    /// plugins that handle it, added up.
    pub fn budget(&self, phase: Phase) -> Duration {
        self.plugins
            .iter()
            .filter(|p| p.phases().contains(phase))
            .map(|p| p.settings().budget.timeout)
            .sum()
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
                bail!(
                    "the budgets of the plugins handling {phase} add up to {} ms ({}), but Envoy \
                     waits {} ms for an answer; lower their timeout_ms, or raise the filter's \
                     max_message_timeout and set [envoy] max_message_timeout_ms to match",
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

/// Loads every plugin in the configured directory. Any failure stops the whole load: a chain
/// with a plugin silently missing would run requests through the wrong policy.
pub async fn load_chain(runtime: &Runtime, config: &Config) -> anyhow::Result<Chain> {
    let files = discover(&config.plugins_dir)?;
    if files.is_empty() {
        bail!(
            "plugins directory {}: no .wasm files; put at least one component plugin there",
            config.plugins_dir.display()
        );
    }
    for name in config.plugins.keys() {
        if !files.iter().any(|(n, _)| n == name) {
            bail!(
                "config has [plugins.{name}] but {} has no {name}.wasm (found: {})",
                config.plugins_dir.display(),
                files
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let mut plugins = Vec::with_capacity(files.len());
    for (name, path) in files {
        let settings = config.settings_for(&name).clone();
        let plugin = runtime.load(&name, &path, settings).await?;
        tracing::info!(
            plugin = plugin.name(),
            path = %path.display(),
            phases = ?plugin.phases(),
            "loaded plugin"
        );
        plugins.push(plugin);
    }
    let chain = Chain::new(plugins);
    chain.check_budgets(&config.envoy)?;
    Ok(chain)
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
    fn a_missing_directory_is_named() {
        let err = discover(Path::new("/definitely/not/here")).unwrap_err();
        assert!(format!("{err:#}").starts_with("plugins directory /definitely/not/here: "));
    }
}
