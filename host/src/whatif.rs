//! What-if replay: what would a candidate build of a module make of the
//! history already stored? The candidate is loaded in the sandbox (never
//! serving, same limits as any guest), then for each of its aggregate types
//! a sample of streams (or all) is folded through it and through the serving
//! version and the states compared, and each of its projections is built
//! into a scratch copy in memory from the log and compared with the serving
//! read model, then dropped. A candidate that traps or loops is reported,
//! never fatal.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::Value;

use crate::sandbox::{
    EventOwners, FoldError, GuestDocument, GuestDocumentKey, GuestModule, ModuleRegistry, ModuleSet, ReadModelOp,
    fold_events, into_recorded, upcast_events,
};
use crate::store::{CopyRole, DocumentQuery, EventNames, EventStore, StoreError, StoredEvent, StreamId};

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct WhatIfOptions {
    /// Streams per aggregate type, the most recently written (`None`: all).
    pub streams: Option<usize>,
    /// Projections to build in scratch (`None`: every one the candidate
    /// declares; empty: none).
    pub projections: Option<Vec<String>>,
}

/// Why a what-if could not run at all (anything the candidate does wrong is
/// part of the report instead).
#[derive(Debug, thiserror::Error)]
pub enum WhatIfError {
    #[error("the candidate cannot be loaded: {0}")]
    Candidate(String),
    #[error("the candidate declares no projection `{0}`")]
    UnknownProjection(String),
    #[error("the scratch copy of projection `{projection}` outgrew {limit} documents")]
    ScratchTooLarge { projection: String, limit: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A module build, as the report names it.
#[derive(Debug, Serialize)]
pub struct Build {
    pub name: String,
    pub version: String,
    pub content_hash: String,
}

impl Build {
    fn of(module: &GuestModule) -> Self {
        Self { name: module.name.clone(), version: module.version.clone(), content_hash: module.content_hash.clone() }
    }
}

/// The answer to one what-if.
#[derive(Debug, Serialize)]
pub struct WhatIfReport {
    pub candidate: Build,
    /// The build serving the module now (none: a new module).
    pub serving: Option<Build>,
    pub aggregates: Vec<AggregateReport>,
    pub projections: Vec<ProjectionReport>,
    pub took_ms: f64,
}

/// One aggregate type: how the candidate's states compare with the serving ones.
#[derive(Debug, Serialize, Default)]
pub struct AggregateReport {
    pub aggregate_type: String,
    pub streams: usize,
    pub identical: usize,
    pub differ: usize,
    /// Streams the candidate could not fold (or render).
    pub failed: usize,
    /// Up to [`EXAMPLES`] streams whose states differ.
    pub examples: Vec<StateDifference>,
    pub first_error: Option<StreamFailure>,
}

#[derive(Debug, Serialize)]
pub struct StateDifference {
    pub stream: String,
    /// The serving version's state (null: no serving version owns the type).
    pub current: Value,
    pub candidate: Value,
}

#[derive(Debug, Serialize)]
pub struct StreamFailure {
    pub stream: String,
    pub error: String,
}

/// One projection: the scratch copy against the serving read model.
#[derive(Debug, Serialize, Default)]
pub struct ProjectionReport {
    pub projection: String,
    /// Events of the log projected into the scratch copy (up to `position`).
    pub events: u64,
    /// The log position the scratch copy reflects.
    pub position: u64,
    /// The checkpoint of the serving copy compared with (none: no copy).
    pub current_position: Option<u64>,
    pub documents: usize,
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
    pub unchanged: usize,
    /// Up to [`EXAMPLES`] documents added, removed or changed.
    pub examples: Vec<DocumentDifference>,
    /// Why the build stopped (the candidate failed on an event): the
    /// comparison is then of what was built before it.
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DocumentDifference {
    pub collection: String,
    pub key: String,
    pub current: Option<Value>,
    pub candidate: Option<Value>,
}

/// Examples kept per aggregate type and per projection.
const EXAMPLES: usize = 5;
/// Streams read per query.
const STREAMS_PER_READ: usize = 64;
/// Events read from the log per scratch batch.
const EVENTS_PER_READ: usize = 1000;
/// Largest scratch copy held in memory.
const SCRATCH_LIMIT: usize = 1_000_000;

/// Runs what-ifs, one at a time (each may fold a whole store).
pub struct WhatIfService {
    registry: Arc<ModuleRegistry>,
    store: Arc<dyn EventStore>,
    running: tokio::sync::Mutex<()>,
}

impl WhatIfService {
    pub fn new(registry: Arc<ModuleRegistry>, store: Arc<dyn EventStore>) -> Self {
        Self { registry, store, running: tokio::sync::Mutex::new(()) }
    }

    /// Load `wasm` as a candidate and compare it with the serving version.
    pub async fn run(&self, wasm: Vec<u8>, options: WhatIfOptions) -> Result<WhatIfReport, WhatIfError> {
        let started = Instant::now();
        let candidate = self.registry.load_candidate(wasm).await.map_err(WhatIfError::Candidate)?;
        let projections: Vec<String> = match options.projections {
            None => candidate.manifest.projections.iter().map(|p| p.name.clone()).collect(),
            Some(names) => {
                if let Some(unknown) = names.iter().find(|name| candidate.projection(name).is_none()) {
                    return Err(WhatIfError::UnknownProjection(unknown.clone()));
                }
                names
            }
        };
        let _one_at_a_time = self.running.lock().await;
        let serving_set = self.registry.current();
        let serving = serving_set.by_name(&candidate.name).cloned();
        let owners = Arc::new(CandidateOwners { candidate: candidate.clone(), serving: serving_set.clone() });
        let mut aggregates = Vec::new();
        for aggregate in &candidate.manifest.aggregates {
            let current = serving_set.route(&aggregate.name).cloned();
            aggregates.push(self.compare_aggregate(&candidate, current, &aggregate.name, options.streams).await?);
        }
        let mut reports = Vec::new();
        for projection in projections {
            reports.push(self.compare_projection(&candidate, &owners, &projection).await?);
        }
        Ok(WhatIfReport {
            candidate: Build::of(&candidate),
            serving: serving.as_deref().map(Build::of),
            aggregates,
            projections: reports,
            took_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// The streams to replay: the most recent `sample`, or all.
    async fn streams(&self, aggregate_type: &str, sample: Option<usize>) -> Result<Vec<StreamId>, StoreError> {
        if let Some(sample) = sample {
            return self.store.recent_streams(aggregate_type, sample).await;
        }
        let mut streams: Vec<StreamId> = Vec::new();
        loop {
            let after = streams.last().map(|s| s.aggregate_id.clone());
            let page = self.store.stream_ids(aggregate_type, after.as_deref(), 10_000).await?;
            if page.is_empty() {
                return Ok(streams);
            }
            streams.extend(page);
        }
    }

    async fn compare_aggregate(
        &self,
        candidate: &Arc<GuestModule>,
        current: Option<Arc<GuestModule>>,
        aggregate_type: &str,
        sample: Option<usize>,
    ) -> Result<AggregateReport, WhatIfError> {
        let streams = self.streams(aggregate_type, sample).await?;
        let mut report =
            AggregateReport { aggregate_type: aggregate_type.to_owned(), streams: streams.len(), ..Default::default() };
        // Read the next chunks while earlier ones fold; each chunk's two
        // folds run side by side (on blocking threads: untrusted code,
        // perhaps looping until its deadline).
        let chunks: Vec<Vec<StreamId>> = streams.chunks(STREAMS_PER_READ).map(<[StreamId]>::to_vec).collect();
        let mut outcomes = futures_util::stream::iter(chunks)
            .map(|chunk| {
                let (candidate, current) = (candidate.clone(), current.clone());
                async move {
                    let histories = Arc::new(self.store.read_streams(&chunk).await?);
                    let chunk = Arc::new(chunk);
                    let fold_all = |module: Arc<GuestModule>| {
                        let (chunk, histories) = (chunk.clone(), histories.clone());
                        tokio::task::spawn_blocking(move || {
                            chunk
                                .iter()
                                .zip(histories.iter())
                                .map(|(stream, events)| folded_state(&module, stream, events))
                                .collect::<Vec<_>>()
                        })
                    };
                    let candidate_states = fold_all(candidate);
                    let current_states = current.map(fold_all);
                    let candidate_states = candidate_states.await.expect("folding does not panic");
                    let current_states = match current_states {
                        Some(states) => Some(states.await.expect("folding does not panic")),
                        None => None,
                    };
                    let compared: Vec<(StreamId, Compared)> = candidate_states
                        .into_iter()
                        .enumerate()
                        .map(|(n, candidate)| {
                            let current = current_states.as_ref().map(|states| &states[n]);
                            (chunk[n].clone(), compare(candidate, current))
                        })
                        .collect();
                    Ok::<_, StoreError>(compared)
                }
            })
            .buffered(3);
        while let Some(compared) = outcomes.next().await {
            for (stream, outcome) in compared? {
                match outcome {
                    Compared::Identical => report.identical += 1,
                    Compared::Differ { current, candidate } => {
                        report.differ += 1;
                        if report.examples.len() < EXAMPLES {
                            report.examples.push(StateDifference { stream: stream.to_string(), current, candidate });
                        }
                    }
                    Compared::Failed(error) => {
                        report.failed += 1;
                        report.first_error.get_or_insert(StreamFailure { stream: stream.to_string(), error });
                    }
                }
            }
        }
        Ok(report)
    }

    /// Build `projection` with the candidate into a scratch copy (in
    /// memory) from the whole log, then compare it with the serving copy.
    async fn compare_projection(
        &self,
        candidate: &Arc<GuestModule>,
        owners: &Arc<CandidateOwners>,
        projection: &str,
    ) -> Result<ProjectionReport, WhatIfError> {
        let info = candidate.projection(projection).expect("checked to be declared").clone();
        let subscribed = EventNames::new(&info.event_types);
        let head = *self.store.head().borrow();
        let mut report = ProjectionReport { projection: projection.to_owned(), position: 0, ..Default::default() };
        let mut scratch: HashMap<(String, String), String> = HashMap::new();
        while report.position < head {
            let events = self.store.read_all(report.position, EVENTS_PER_READ).await?;
            let Some(last) = events.last().map(|e| e.position.min(head)) else { break };
            let batch: Vec<StoredEvent> =
                events.into_iter().filter(|e| e.position <= head && subscribed.contains(e)).collect();
            if !batch.is_empty() {
                let count = batch.len() as u64;
                let (module, owners, name) = (candidate.clone(), owners.clone(), projection.to_owned());
                let (returned, outcome) =
                    tokio::task::spawn_blocking(move || project_batch(&module, &owners, &name, batch, scratch))
                        .await
                        .expect("projecting does not panic");
                scratch = returned;
                if let Err(error) = outcome {
                    report.error = Some(error);
                    break;
                }
                report.events += count;
                if scratch.len() > SCRATCH_LIMIT {
                    return Err(WhatIfError::ScratchTooLarge {
                        projection: projection.to_owned(),
                        limit: SCRATCH_LIMIT,
                    });
                }
            }
            report.position = last;
        }
        let (current_position, current) = self.serving_documents(projection).await?;
        report.current_position = current_position;
        report.documents = scratch.len();
        let keys: BTreeSet<&(String, String)> = scratch.keys().chain(current.keys()).collect();
        for key in keys {
            let before = current.get(key).and_then(|body| serde_json::from_str::<Value>(body).ok());
            let after = scratch.get(key).and_then(|body| serde_json::from_str::<Value>(body).ok());
            match (&before, &after) {
                (Some(a), Some(b)) if a == b => {
                    report.unchanged += 1;
                    continue;
                }
                (Some(_), Some(_)) => report.changed += 1,
                (None, _) => report.added += 1,
                (_, None) => report.removed += 1,
            }
            if report.examples.len() < EXAMPLES {
                report.examples.push(DocumentDifference {
                    collection: key.0.clone(),
                    key: key.1.clone(),
                    current: before,
                    candidate: after,
                });
            }
        }
        Ok(report)
    }

    /// Every document of the serving (active) copy of `projection`, with
    /// its checkpoint.
    async fn serving_documents(
        &self,
        projection: &str,
    ) -> Result<(Option<u64>, HashMap<(String, String), String>), StoreError> {
        let copies = self.store.projection_copies().await?;
        let Some(copy) = copies.into_iter().find(|c| c.id.projection == projection && c.role == CopyRole::Active)
        else {
            return Ok((None, HashMap::new()));
        };
        let mut documents = HashMap::new();
        let mut position = copy.position;
        for collection in &copy.collections {
            let mut after = None;
            loop {
                let query = DocumentQuery {
                    projection: projection.to_owned(),
                    collection: collection.clone(),
                    filters: Vec::new(),
                    after: after.take(),
                    limit: 1000,
                };
                let Some(page) = self.store.list_documents(&query).await? else { break };
                position = page.position;
                after = page.documents.last().map(|(key, _)| key.clone());
                for (key, body) in page.documents {
                    documents.insert((collection.clone(), key), body);
                }
                if !page.more {
                    break;
                }
            }
        }
        Ok((Some(position), documents))
    }
}

/// Events are upcast by the candidate for its own aggregate types, by the
/// serving modules for the others (but not by the serving build of the
/// candidate's own module, which the candidate replaces).
struct CandidateOwners {
    candidate: Arc<GuestModule>,
    serving: Arc<ModuleSet>,
}

impl EventOwners for CandidateOwners {
    fn owner(&self, aggregate_type: &str) -> Option<&GuestModule> {
        self.candidate
            .owner(aggregate_type)
            .or_else(|| self.serving.route(aggregate_type).map(|m| &**m).filter(|m| m.name != self.candidate.name))
    }
}

enum Compared {
    Identical,
    Differ { current: Value, candidate: Value },
    Failed(String),
}

/// The candidate's rendered state of a stream against the serving
/// version's (`None`: no serving version owns the type).
fn compare(candidate: Result<Value, String>, current: Option<&Result<Value, String>>) -> Compared {
    let candidate = match candidate {
        Ok(state) => state,
        Err(error) => return Compared::Failed(error),
    };
    let current = match current {
        None => Value::Null,
        Some(Ok(state)) => state.clone(),
        Some(Err(error)) => return Compared::Failed(format!("the serving version failed too: {error}")),
    };
    if current == candidate { Compared::Identical } else { Compared::Differ { current, candidate } }
}

/// A stream folded from its start by `module`, rendered as JSON.
fn folded_state(module: &GuestModule, stream: &StreamId, events: &[StoredEvent]) -> Result<Value, String> {
    let state = fold_events(module, &stream.aggregate_type, Vec::new(), events).map_err(|error| match error {
        FoldError::Refused { first, last, error } => {
            format!("`apply` refused versions {first}..={last}: {}", error.describe())
        }
        FoldError::Failed { first, last, failure } => {
            format!("`apply` failed on versions {first}..={last}: {}", failure.reason)
        }
    })?;
    let rendered = match module.describe_state(&stream.aggregate_type, &state) {
        Ok(Ok(rendered)) => rendered,
        Ok(Err(error)) => return Err(format!("`describe-state` refused: {}", error.describe())),
        Err(failure) => return Err(format!("`describe-state` failed: {}", failure.reason)),
    };
    serde_json::from_str(&rendered).map_err(|e| format!("`describe-state` returned invalid JSON: {e}"))
}

/// One batch into the scratch copy: upcast, `touches`, `project`, apply.
/// Returns the copy (changed only when the batch succeeded).
fn project_batch(
    module: &GuestModule,
    owners: &CandidateOwners,
    projection: &str,
    events: Vec<StoredEvent>,
    mut scratch: HashMap<(String, String), String>,
) -> (HashMap<(String, String), String>, Result<(), String>) {
    let first = events.first().map_or(0, |e| e.position);
    let last = events.last().map_or(0, |e| e.position);
    let failed = |what: String| Err(format!("events {first}..={last}: {what}"));
    let mut recorded: Vec<_> = events.into_iter().map(into_recorded).collect();
    if let Err(failure) = upcast_events(owners, &mut recorded) {
        return (scratch, failed(failure.describe()));
    }
    let keys = match module.touches(projection, &recorded) {
        Ok(Ok(keys)) => keys,
        Ok(Err(error)) => return (scratch, failed(format!("`touches` refused: {}", error.describe()))),
        Err(failure) => return (scratch, failed(format!("`touches` failed: {}", failure.reason))),
    };
    let documents: Vec<GuestDocument> = keys
        .into_iter()
        .map(|key| {
            let body = scratch.get(&(key.collection.clone(), key.key.clone())).cloned();
            GuestDocument { key: GuestDocumentKey { collection: key.collection, key: key.key }, body }
        })
        .collect();
    let ops = match module.project(projection, &recorded, &documents) {
        Ok(Ok(ops)) => ops,
        Ok(Err(error)) => return (scratch, failed(format!("`project` refused: {}", error.describe()))),
        Err(failure) => return (scratch, failed(format!("`project` failed: {}", failure.reason))),
    };
    for op in ops {
        match op {
            ReadModelOp::Upsert((key, body)) => {
                scratch.insert((key.collection, key.key), body);
            }
            ReadModelOp::Delete(key) => {
                scratch.remove(&(key.collection, key.key));
            }
        }
    }
    (scratch, Ok(()))
}
