//! Watching the plugins directory: file events (`notify`) on `*.wasm` paths
//! start a reload once the directory has been quiet for a short while, so a
//! copy in progress is read when it is complete. A reload that still reads a
//! half-written file refuses it under that content hash only: the next write
//! changes the hash and it is tried again. Write-to-temp-then-rename, a
//! replace in place, a new file name and deletion all end in the same
//! reload, which compares the directory with what serves.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::ModuleRegistry;

/// Keeps the watch alive; dropping it stops watching.
pub struct PluginsWatcher {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PluginsWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watch the registry's plugins directory; reload after `quiet` without
/// further events.
pub fn watch_plugins(registry: Arc<ModuleRegistry>, quiet: Duration) -> notify::Result<PluginsWatcher> {
    let (events, mut changes) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) if event.paths.iter().any(|path| is_module_file(path)) => {
            // Full means a reload is already due; nothing is lost.
            let _ = events.try_send(());
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "plugins directory watch error"),
    })?;
    watcher.watch(registry.plugins_dir(), RecursiveMode::NonRecursive)?;
    let task = tokio::spawn(async move {
        while changes.recv().await.is_some() {
            // Debounce: wait until the directory has been quiet.
            while let Ok(Some(())) = tokio::time::timeout(quiet, changes.recv()).await {}
            match registry.reload().await {
                Ok(report) if report.loaded.is_empty() && report.unloaded.is_empty() => {
                    tracing::debug!(failures = report.failures.len(), "plugins changed; nothing new to serve");
                }
                Ok(report) => tracing::info!(
                    loaded = report.loaded.len(),
                    unloaded = report.unloaded.len(),
                    took_ms = report.took_ms,
                    "plugins reloaded"
                ),
                Err(error) => tracing::error!(%error, "cannot read the plugins directory"),
            }
        }
    });
    Ok(PluginsWatcher { _watcher: watcher, task })
}

fn is_module_file(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == "wasm")
}
