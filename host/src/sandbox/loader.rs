//! Turning one `.wasm` file into a validated [`GuestModule`] — hash,
//! compile (or load the precompiled artifact from the on-disk cache),
//! validate the world and the manifest — and the [`ModuleSet`] that indexes
//! serving modules by name and by aggregate type. The registry
//! (`registry.rs`) decides which files become which set.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::{GuestModule, Sandbox, prepare_module};
use crate::metrics::Metrics;

/// The serving modules, indexed for routing. Immutable: a reload builds a
/// new one and swaps it in.
#[derive(Default)]
pub struct ModuleSet {
    by_name: BTreeMap<String, Arc<GuestModule>>,
    by_aggregate: HashMap<String, Arc<GuestModule>>,
}

impl ModuleSet {
    /// Index modules that the registry has already checked for conflicts.
    pub(super) fn from_modules(modules: impl IntoIterator<Item = Arc<GuestModule>>) -> Self {
        let mut set = Self::default();
        for module in modules {
            for aggregate in &module.manifest.aggregates {
                set.by_aggregate.insert(aggregate.name.clone(), module.clone());
            }
            set.by_name.insert(module.name.clone(), module);
        }
        set
    }

    /// The module that owns an aggregate type.
    pub fn route(&self, aggregate_type: &str) -> Option<&Arc<GuestModule>> {
        self.by_aggregate.get(aggregate_type)
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<GuestModule>> {
        self.by_name.get(name)
    }

    pub fn modules(&self) -> impl Iterator<Item = &Arc<GuestModule>> {
        self.by_name.values()
    }
}

/// SHA-256 of a module file, hex: its content identity.
pub(super) fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Steps 2 and 3 of loading a file already read and hashed: compile (or
/// load from the cache), then validate. Returns the module and the
/// milliseconds of each step.
pub(super) fn compile_file(
    sandbox: &Sandbox,
    file: &Path,
    bytes: Vec<u8>,
    content_hash: String,
    cache_dir: &Path,
    metrics: &Metrics,
) -> Result<(GuestModule, BTreeMap<&'static str, f64>), String> {
    check_component_header(&bytes)?;
    check_signature(sandbox, file, &bytes)?;
    let mut steps = BTreeMap::new();
    let started = Instant::now();
    let component = compile_cached(sandbox, &bytes, &content_hash, cache_dir)?;
    steps.insert("compile", started.elapsed().as_secs_f64() * 1000.0);
    let started = Instant::now();
    let module = prepare_module(sandbox, &component, file.to_path_buf(), content_hash, metrics.clone())?;
    steps.insert("validate", started.elapsed().as_secs_f64() * 1000.0);
    Ok((module, steps))
}

/// A module that will never serve (a what-if candidate): compiled without
/// touching the precompile cache, validated like any file, its calls under
/// the same limits as any guest.
pub(super) fn compile_candidate(sandbox: &Sandbox, bytes: &[u8], metrics: &Metrics) -> Result<GuestModule, String> {
    check_component_header(bytes)?;
    check_signature(sandbox, Path::new(""), bytes)?;
    let content_hash = content_hash(bytes);
    let component = Component::new(sandbox.engine(), bytes).map_err(|e| format!("invalid component: {e:#}"))?;
    prepare_module(sandbox, &component, "what-if candidate".into(), content_hash, metrics.clone())
}

/// With `--trusted-keys`: refuse a module no trusted key signed (its
/// embedded signature, or `FILE.wasm.sig` beside a file).
fn check_signature(sandbox: &Sandbox, file: &Path, bytes: &[u8]) -> Result<(), String> {
    let Some(trusted) = sandbox.trusted_keys() else { return Ok(()) };
    let detached = match file.file_name() {
        Some(name) => std::fs::read(file.with_file_name(format!("{}.sig", name.to_string_lossy()))).ok(),
        None => None,
    };
    let signer = trusted.verify(bytes, detached.as_deref())?;
    tracing::debug!(file = %file.display(), key = %signer, "module signature verified");
    Ok(())
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
    if let Err(error) = std::fs::create_dir_all(cache_dir) {
        tracing::warn!(cache_dir = %cache_dir.display(), %error, "precompile cache unavailable");
    }
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
