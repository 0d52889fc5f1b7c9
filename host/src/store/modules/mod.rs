//! Cluster-module storage: every build published to the cluster (its
//! bytes and what its checks found), the current build of each module with
//! its **generation**, and the hosts that run them.
//!
//! The generation is the fence of the group commit: an append carries the
//! generation of the build that handled its command, and the writer refuses
//! it when the module's generation in the store is newer
//! ([`StoreError::StaleModule`](super::StoreError::StaleModule)). An
//! activation bumps the generation under the appends' own serialisation (on
//! PostgreSQL the schema's advisory lock, on SQLite the single writer), and
//! records the head at that moment as its position: every event after it
//! was produced by the new build. The SQL is written once (`common.rs`).

mod common;

use std::collections::BTreeMap;

use serde::Serialize;

pub(super) use common::ModuleSql;

/// What a build's checks found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Passed,
    Refused,
}

impl BuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Refused => "refused",
        }
    }

    fn parse(text: &str) -> Self {
        if text == "passed" { Self::Passed } else { Self::Refused }
    }
}

/// A build to keep (first write of a content hash keeps its bytes; a later
/// one updates only what its checks found).
#[derive(Debug, Clone)]
pub struct NewModuleBuild {
    pub content_hash: String,
    pub name: String,
    pub version: String,
    pub bytes: Vec<u8>,
    /// Who published it: this host's id and how (API, plugins directory).
    pub uploader: String,
    pub status: BuildStatus,
    /// Passed: what was checked; refused: why.
    pub check_result: String,
}

/// A stored build, without its bytes.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleBuildRecord {
    pub content_hash: String,
    pub name: String,
    pub version: String,
    pub size_bytes: u64,
    pub uploaded_at_ms: i64,
    pub uploader: String,
    pub status: BuildStatus,
    pub check_result: String,
}

/// The current build of one module, cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleGeneration {
    pub name: String,
    /// Bumped by every activation (and withdrawal) of the module.
    pub generation: u64,
    /// `None`: withdrawn — no build serves.
    pub content_hash: Option<String>,
    pub activated_at_ms: i64,
    /// The head of the log when the activation committed: every event
    /// after it was produced by this build.
    pub activated_position: u64,
    pub activated_by: String,
}

/// Make `content_hash` (or nothing, to withdraw the module) the current
/// build of `name`, if its generation is still `expected` (0: it has none
/// yet) — so an activation checked against one build never silently
/// replaces another.
#[derive(Debug, Clone)]
pub struct Activation {
    pub name: String,
    pub content_hash: Option<String>,
    pub expected_generation: u64,
    pub by: String,
}

/// What one host runs, as its heartbeat says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RunningModule {
    pub generation: u64,
    pub content_hash: String,
}

/// A host of the cluster, as it last reported itself.
#[derive(Debug, Clone, Serialize)]
pub struct HostRecord {
    pub host_id: String,
    pub address: String,
    pub started_at_ms: i64,
    pub heartbeat_at_ms: i64,
    pub modules: BTreeMap<String, RunningModule>,
    /// Published builds it has compiled ahead of their activation.
    pub prepared: Vec<String>,
}

/// One cluster change, one transaction each.
#[derive(Debug, Clone)]
pub enum ClusterChange {
    SaveBuild(Box<NewModuleBuild>),
    /// Answered with the new [`ModuleGeneration`]; a generation that moved
    /// meanwhile answers `StoreError::ModuleConflict`.
    Activate(Activation),
    /// Upsert this host's record (its `heartbeat_at_ms` is the database's
    /// clock) and forget hosts silent for an hour.
    Heartbeat(HostRecord),
}

/// Hosts silent this long are forgotten.
pub const FORGET_HOSTS_AFTER_MS: i64 = 3_600_000;
