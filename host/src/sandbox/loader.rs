//! Loading the plugins directory: read, hash, compile (or load the
//! precompiled artifact from the on-disk cache), validate, and index the
//! modules by name and by aggregate type. A bad file is reported with its
//! name and reason; it never stops the other modules from loading.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::{GuestModule, Sandbox, prepare_module};
use crate::metrics::Metrics;

/// A file in the plugins directory that was refused, and why.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFailure {
    pub file: PathBuf,
    pub reason: String,
}

/// The loaded modules, indexed for routing.
#[derive(Default)]
pub struct ModuleSet {
    by_name: BTreeMap<String, Arc<GuestModule>>,
    by_aggregate: BTreeMap<String, Arc<GuestModule>>,
}

impl ModuleSet {
    /// The module that owns an aggregate type.
    pub fn route(&self, aggregate_type: &str) -> Option<&Arc<GuestModule>> {
        self.by_aggregate.get(aggregate_type)
    }

    pub fn modules(&self) -> impl Iterator<Item = &Arc<GuestModule>> {
        self.by_name.values()
    }

    /// Add a module, refusing a duplicate module name or aggregate type.
    fn insert(&mut self, module: GuestModule) -> Result<(), String> {
        if let Some(existing) = self.by_name.get(&module.name) {
            return Err(format!(
                "declares module name `{}`, already loaded from {}",
                module.name,
                existing.file.display()
            ));
        }
        for aggregate in &module.manifest.aggregates {
            if let Some(owner) = self.by_aggregate.get(&aggregate.name) {
                return Err(format!(
                    "declares aggregate type `{}`, already owned by module `{}`",
                    aggregate.name, owner.name
                ));
            }
        }
        let module = Arc::new(module);
        for aggregate in &module.manifest.aggregates {
            self.by_aggregate.insert(aggregate.name.clone(), module.clone());
        }
        self.by_name.insert(module.name.clone(), module);
        Ok(())
    }
}

/// Load every `*.wasm` in `dir` (in file-name order).
pub fn load_plugins_dir(
    sandbox: &Sandbox,
    dir: &Path,
    cache_dir: &Path,
    metrics: &Metrics,
) -> std::io::Result<(ModuleSet, Vec<LoadFailure>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
        .collect();
    files.sort();
    if let Err(error) = std::fs::create_dir_all(cache_dir) {
        tracing::warn!(cache_dir = %cache_dir.display(), %error, "precompile cache unavailable; compiling every module");
    }

    let mut set = ModuleSet::default();
    let mut failures = Vec::new();
    for file in files {
        let result = load_file(sandbox, &file, cache_dir, metrics).and_then(|module| {
            let summary = (module.name.clone(), module.version.clone(), module.content_hash.clone());
            set.insert(module).map(|()| summary)
        });
        match result {
            Ok((name, version, hash)) => {
                tracing::info!(file = %file.display(), module = %name, %version, hash = &hash[..12], "module loaded");
            }
            Err(reason) => {
                tracing::error!(file = %file.display(), %reason, "module refused");
                failures.push(LoadFailure { file, reason });
            }
        }
    }
    Ok((set, failures))
}

fn load_file(sandbox: &Sandbox, file: &Path, cache_dir: &Path, metrics: &Metrics) -> Result<GuestModule, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read: {e}"))?;
    check_component_header(&bytes)?;
    let content_hash = hex::encode(Sha256::digest(&bytes));
    let component = compile_cached(sandbox, &bytes, &content_hash, cache_dir)?;
    prepare_module(sandbox, &component, file.to_path_buf(), content_hash, metrics.clone())
}

/// Explain the two most common wrong files before wasmtime does, tersely.
fn check_component_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err("not a WebAssembly file (missing the \\0asm header)".into());
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err("is a core WebAssembly module, not a component: build it with `--target wasm32-wasip2`".into());
    }
    Ok(())
}

/// Compile a component, or load its precompiled artifact when the cache has
/// one for this content hash, wasmtime version and engine configuration.
fn compile_cached(sandbox: &Sandbox, bytes: &[u8], content_hash: &str, cache_dir: &Path) -> Result<Component, String> {
    let artifact = cache_dir.join(format!("{content_hash}-{}.cwasm", sandbox.artifact_key()));
    if artifact.is_file() {
        // SAFETY: the artifact was written by `Component::serialize` of this
        // very engine configuration and wasmtime version (both are in its
        // file name), into a cache directory the host owns.
        match unsafe { Component::deserialize_file(sandbox.engine(), &artifact) } {
            Ok(component) => return Ok(component),
            Err(error) => {
                tracing::warn!(artifact = %artifact.display(), %error, "discarding unreadable precompiled artifact");
                let _ = std::fs::remove_file(&artifact);
            }
        }
    }
    let component = Component::new(sandbox.engine(), bytes).map_err(|e| format!("invalid component: {e:#}"))?;
    match component.serialize() {
        Ok(serialized) => {
            let temporary = artifact.with_extension(format!("tmp-{}", uuid::Uuid::now_v7()));
            let written = std::fs::write(&temporary, serialized).and_then(|()| std::fs::rename(&temporary, &artifact));
            if let Err(error) = written {
                tracing::warn!(artifact = %artifact.display(), %error, "cannot write precompiled artifact");
                let _ = std::fs::remove_file(&temporary);
            }
        }
        Err(error) => tracing::warn!(%error, "cannot serialize compiled component"),
    }
    Ok(component)
}
