//! The plugin authors' loop, without Envoy: exchanges written down in files, played through
//! the same chain, runtime, guard and failure policies the server runs, and checked against
//! what the author expects (`wasm-extproc test`).
//!
//! - [`file`]: the exchange file format (YAML), validated strictly.
//! - [`play`]: one exchange played to the ext_proc state machine as Envoy would send it, and
//!   what Envoy would receive.
//! - [`transcript`]: an exchange's messages and answers read into what came out (and, for a
//!   recording, into the exchange as a file describes it).
//! - [`check`]: what came out against the file's `expect:`, and the report.
//! - [`plugin_log`]: what the plugins log during an exchange, for its report.
//! - [`templates`]: `wasm-extproc new`, a plugin project to start from.

pub mod check;
pub mod file;
pub mod play;
pub mod plugin_log;
pub mod templates;
pub mod transcript;

use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::OnceLock;

use anyhow::Context;

use crate::Host;
use crate::config::Config;
use file::{ExchangeFile, FileError};

/// How a test run went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub exchanges: usize,
    pub failed: usize,
}

/// Why a test run could not run.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// An exchange file is unreadable or invalid; nothing ran.
    #[error(transparent)]
    File(#[from] FileError),
    /// The plugins could not be loaded.
    #[error("{0:#}")]
    Load(anyhow::Error),
}

/// Where the plugins' lines go while `test` runs, when the command's log sends them there
/// (`main.rs` adds it to the log's layers); each exchange's report shows what they logged.
pub fn plugin_log() -> &'static plugin_log::PluginLog {
    static LOG: OnceLock<plugin_log::PluginLog> = OnceLock::new();
    LOG.get_or_init(plugin_log::PluginLog::default)
}

/// Plays every exchange of `files` through the plugins `config` names, writing a report per
/// exchange to `out`. Every file is read and checked before any exchange runs.
pub async fn test(
    config: &Config,
    files: &[PathBuf],
    out: &mut impl Write,
) -> Result<Summary, TestError> {
    let loaded: Vec<(PathBuf, ExchangeFile)> = files
        .iter()
        .map(|path| ExchangeFile::load(path).map(|file| (path.clone(), file)))
        .collect::<Result<_, _>>()?;
    let host = Host::load(config).await.map_err(TestError::Load)?;
    let generation = host
        .current()
        .context("nothing loaded")
        .map_err(TestError::Load)?;
    let metrics = host.metrics();
    let mut summary = Summary::default();
    let log = plugin_log();
    for (path, file) in &loaded {
        for spec in &file.exchanges {
            log.take();
            let played = play::play(&generation, &metrics, spec, &file.envoy).await;
            let differences = check::differences(&played, spec.expect.as_ref());
            summary.exchanges += 1;
            if !differences.is_empty() {
                summary.failed += 1;
            }
            let mut report = check::report(
                &path.display().to_string(),
                &spec.name,
                &played,
                &differences,
            );
            report.push_str(&check::removals_of_absent_headers(spec, &played.output));
            let lines = log.take();
            if !lines.is_empty() {
                report.push_str("     plugin log:\n");
                for line in lines {
                    report.push_str(&format!("       {line}\n"));
                }
            }
            let _ = out.write_all(report.as_bytes());
        }
    }
    let _ = writeln!(
        out,
        "{} exchange(s), {} passed, {} failed",
        summary.exchanges,
        summary.exchanges - summary.failed,
        summary.failed
    );
    Ok(summary)
}

/// A temporary plugins directory holding only `plugin`, and the plugin's name there.
pub fn alone(plugin: &Path) -> anyhow::Result<(tempfile::TempDir, String)> {
    let name = plugin
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_suffix(".wasm"))
        .with_context(|| format!("--plugin {}: not a .wasm file", plugin.display()))?;
    let dir = tempfile::tempdir()?;
    std::fs::copy(plugin, dir.path().join(format!("{name}.wasm")))
        .with_context(|| format!("--plugin {}", plugin.display()))?;
    Ok((dir, name.to_string()))
}

/// A temporary copy of the plugins directory `plugins` (its chains too) with `candidate` in
/// place of the plugin called `replacing` -- by default the one named like the candidate's
/// file, or the only plugin there is -- in every chain that has it.
pub fn with_candidate(
    plugins: &Path,
    candidate: &Path,
    replacing: Option<&str>,
) -> anyhow::Result<tempfile::TempDir> {
    let wasm = |path: &Path| -> Option<String> {
        let name = path.file_name()?.to_str()?.strip_suffix(".wasm")?;
        (!name.starts_with('.')).then(|| name.to_string())
    };
    let mut files = Vec::new();
    let listing = |dir: &Path| {
        std::fs::read_dir(dir).with_context(|| format!("plugins directory {}", dir.display()))
    };
    for entry in listing(plugins)? {
        let path = entry?.path();
        if path.is_dir() {
            for inner in listing(&path)? {
                let inner = inner?.path();
                if let Some(name) = wasm(&inner) {
                    files.push((inner.clone(), name));
                }
            }
        } else if let Some(name) = wasm(&path) {
            files.push((path, name));
        }
    }
    let mut names: Vec<&str> = files.iter().map(|(_, name)| name.as_str()).collect();
    names.sort();
    names.dedup();
    let own = wasm(candidate)
        .with_context(|| format!("--compare {}: not a .wasm file", candidate.display()))?;
    let replaced = match replacing {
        Some(name) => name.to_string(),
        None if names.contains(&own.as_str()) => own,
        None if names.len() == 1 => names[0].to_string(),
        None => anyhow::bail!(
            "--compare {}: which plugin does it stand in for? --replacing NAME, one of {}",
            candidate.display(),
            names.join(", ")
        ),
    };
    if !names.contains(&replaced.as_str()) {
        anyhow::bail!(
            "--replacing {replaced}: {} has no such plugin; it has {}",
            plugins.display(),
            names.join(", ")
        );
    }
    let copy = tempfile::tempdir()?;
    for (path, name) in &files {
        let relative = path.strip_prefix(plugins).expect("listed under it");
        let to = copy.path().join(relative);
        std::fs::create_dir_all(to.parent().expect("a file in a directory"))?;
        let from = if *name == replaced { candidate } else { path };
        std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(copy)
}
