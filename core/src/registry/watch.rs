//! Reloads when the plugins directory or the configuration file changes.
//!
//! Writes arrive as bursts of events (a copy is create + many modifies + close; a ConfigMap
//! update is a new timestamped directory and a `..data` symlink swap), so the watcher waits for
//! a quiet moment before reloading. A file caught half-written fails to load and is rejected;
//! the event that completes it triggers the reload that succeeds.

use std::path::Path;
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

/// Whether an event can change what a reload would load. Reads are not changes -- and the
/// reload itself reads every file.
fn is_change(event: &Event) -> bool {
    matches!(
        event.kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(_)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

/// Watches `plugins_dir` (and the directory of `config_file`) and reloads `registry` after
/// changes.
pub fn watch(
    registry: Arc<Registry>,
    plugins_dir: &Path,
    config_file: Option<&Path>,
) -> anyhow::Result<WatchGuard> {
    let (changed, mut changes) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if let Ok(event) = event
            && is_change(&event)
        {
            let _ = changed.send(());
        }
    })
    .context("cannot start watching files")?;
    watcher
        .watch(plugins_dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", plugins_dir.display()))?;
    if let Some(file) = config_file {
        // The directory, not the file: editors and ConfigMaps replace files rather than write
        // them in place, and a watch on the old file would go quiet.
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
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
