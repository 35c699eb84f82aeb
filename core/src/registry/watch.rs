//! Reloads when the plugins directory or the configuration file changes.
//!
//! Writes arrive as bursts of events (a copy is create + many modifies + close; a ConfigMap
//! update is a new timestamped directory and a `..data` symlink swap), so the watcher waits for
//! a quiet moment before reloading. A file caught half-written fails to load and is rejected;
//! the event that completes it triggers the reload that succeeds.
//!
//! Only what a reload reads counts: `*.wasm` in the plugins directory and its chains'
//! subdirectories (and those directories coming and going), the configuration file
//! itself, and the `..`-prefixed entries through which Kubernetes swaps a mounted volume's
//! contents. A log, a pid file or an editor's swap file beside them changes nothing.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::Registry;

/// How long the watched paths must stay quiet before a reload starts.
pub const QUIET: Duration = Duration::from_millis(250);

/// Keeps watching while it lives.
#[derive(Debug)]
pub struct WatchGuard {
    _watcher: RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a reload reads: the files whose changes matter.
#[derive(Debug, Clone)]
struct Watched {
    plugins_dir: PathBuf,
    config_file: Option<PathBuf>,
}

impl Watched {
    /// Whether an event can change what a reload would load. Reads are not changes -- and the
    /// reload itself reads every file.
    fn is_change(&self, event: &Event) -> bool {
        let writes = matches!(
            event.kind,
            EventKind::Create(_)
                | EventKind::Remove(_)
                | EventKind::Modify(_)
                | EventKind::Access(AccessKind::Close(AccessMode::Write))
        );
        writes && event.paths.iter().any(|path| self.is_read(path))
    }

    fn is_read(&self, path: &Path) -> bool {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return false;
        };
        let name = Path::new(name);
        let hidden = name.to_string_lossy().starts_with('.');
        // Kubernetes' atomic writer: `..data`, `..data_tmp`, `..2026_11_30_...`.
        let volume_swap = name.to_string_lossy().starts_with("..");
        let wasm = name.extension() == Some(OsStr::new("wasm"));
        if dir == self.plugins_dir
            // A plugin, a volume swap, or a chain's directory coming or going.
            && (volume_swap || wasm || (!hidden && name.extension().is_none()))
        {
            return true;
        }
        // A named chain's plugin: `plugins/checkout/10-auth.wasm`.
        let in_chain = dir.parent() == Some(self.plugins_dir.as_path())
            && dir
                .file_name()
                .is_some_and(|d| !d.to_string_lossy().starts_with('.'));
        if in_chain && wasm && !hidden {
            return true;
        }
        self.config_file.as_deref().is_some_and(|file| {
            Some(dir) == file.parent()
                && (volume_swap || Some(name.as_os_str()) == file.file_name())
        })
    }
}

/// Watches `plugins_dir` (and the directory of `config_file`) and reloads `registry` after
/// changes.
pub fn watch(
    registry: Arc<Registry>,
    plugins_dir: &Path,
    config_file: Option<&Path>,
) -> anyhow::Result<WatchGuard> {
    let (changed, mut changes) = mpsc::unbounded_channel();
    // Absolute, so that the paths events carry compare with these whatever the working
    // directory.
    let watched = Watched {
        plugins_dir: absolute(plugins_dir),
        config_file: config_file.map(absolute),
    };
    // The configuration file's directory, not the file: editors and ConfigMaps replace files
    // rather than write them in place, and a watch on the old file would go quiet.
    let config_dir = watched
        .config_file
        .as_deref()
        .map(|file| file.parent().unwrap_or(Path::new("/")).to_path_buf());
    let plugins_dir = watched.plugins_dir.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if let Ok(event) = event
            && watched.is_change(&event)
        {
            let _ = changed.send(());
        }
    })
    .context("cannot start watching files")?;
    let config_dir = config_dir.filter(|dir| *dir != plugins_dir);
    // The plugins directory with its chains' subdirectories (new ones are watched as they
    // appear); the configuration file's directory on its own.
    watcher
        .watch(&plugins_dir, RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch {}", plugins_dir.display()))?;
    if let Some(dir) = config_dir {
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
    }
    let task = tokio::spawn(async move {
        while changes.recv().await.is_some() {
            // Wait out the burst.
            while let Ok(Some(())) = tokio::time::timeout(QUIET, changes.recv()).await {}
            tracing::info!("plugins or configuration changed; reloading");
            // Errors are logged by the registry; the previous chain keeps serving.
            let _ = registry.reload().await;
        }
    });
    Ok(WatchGuard {
        _watcher: watcher,
        task,
    })
}

/// `path` as the watcher reports it: absolute (relative to the working directory).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
