//! One runner per running copy: read the feed after the copy's checkpoint
//! (a read-ahead task keeps the next batch ready), keep the events the
//! projection subscribes to, call `touches`, load those documents, call
//! `project`, and commit the operations with the new checkpoint in one
//! transaction. A failing batch is replayed one event at a time to find the
//! poison event, which is retried with backoff and then parked.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};
use tracing::{Instrument, Span};

use super::ProjectionConfig;
use crate::metrics::Metrics;
use crate::sandbox::{
    GuestDocument, GuestDocumentKey, GuestFailure, GuestModule, ModuleRegistry, ProjectionInfo, ReadModelOp,
    RecordedEvent, into_recorded, is_current, upcast_events,
};
use crate::store::{
    CopyRecord, CopyRole, DocumentKey, DocumentOp, EventNames, EventStore, Parked, ReadModelChange, StoreError,
    StoredEvent,
};
use crate::telemetry;

/// What a runner shares with status queries.
#[derive(Default)]
pub struct Progress {
    pub position: AtomicU64,
    /// The last read reached the head of the log.
    pub caught_up: AtomicBool,
    /// The last failure, cleared by the next successful commit.
    pub last_error: Mutex<Option<String>>,
}

/// Events skipped over without a commit before the checkpoint is moved
/// anyway (so a projection whose events are rare does not lag on paper).
const CHECKPOINT_EVERY: u64 = 10_000;

/// Longest pause after a store failure.
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(5);

pub(super) struct Runner {
    pub store: Arc<dyn EventStore>,
    pub metrics: Metrics,
    pub module: Arc<GuestModule>,
    /// Who upcasts the events read (the modules owning their aggregate types).
    pub registry: Arc<ModuleRegistry>,
    pub info: ProjectionInfo,
    pub config: ProjectionConfig,
    pub copy: CopyRecord,
    pub progress: Arc<Progress>,
    /// Wakes the service's reconciler (after an activation, a parking, an exit).
    pub poke: Arc<Notify>,
    pub service: std::sync::Weak<super::ProjectionService>,
}

/// Why a run ended.
enum Exit {
    /// Parked on a poison event: waits for an operator.
    Parked,
    /// The copy changed under us (another runner, an activation, a retire):
    /// re-read it and carry on if it is still ours to run.
    Moved,
}

/// A guest failure or a store failure during a batch.
enum BatchFailure {
    Guest(String),
    Store(StoreError),
}

impl From<StoreError> for BatchFailure {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

/// A runner on its own thread, and the signal that stops it.
pub(super) struct RunnerThread {
    stop: tokio::sync::watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

impl RunnerThread {
    /// Stop at the next await (like aborting a task: a commit under way
    /// either completes or never happens).
    pub(super) fn stop(&self) {
        self.stop.send_replace(true);
    }

    pub(super) fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

impl Runner {
    /// Run on a thread of its own (with its read-ahead) that drives the
    /// runner's futures with the host's tokio runtime (I/O, timers, blocking
    /// pool). The runner is then
    /// woken directly rather than queued behind every request task on the
    /// runtime's workers — under a heavy command load that queueing, paid
    /// at each of a batch's awaits, was most of the projection lag.
    pub(super) fn spawn(self) -> RunnerThread {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let handle = tokio::runtime::Handle::current();
        let name = format!("projection-{}-{}", self.info.name, self.copy.id.generation);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // Inside the runtime's context for the whole thread: what the
                // runner leaves behind (pooled connections) is dropped here.
                let _context = handle.enter();
                // A local set, so the read-ahead task runs on this thread too.
                let local = tokio::task::LocalSet::new();
                handle.block_on(local.run_until(async move {
                    tokio::select! {
                        () = self.run() => {}
                        _ = stopped.wait_for(|stop| *stop) => {}
                    }
                }));
            })
            .expect("the OS starts a projection thread");
        RunnerThread { stop, thread }
    }

    fn label(&self) -> String {
        self.copy.id.generation.to_string()
    }

    pub(super) async fn run(mut self) {
        let mut store_backoff = Duration::from_millis(100);
        loop {
            match self.run_from_checkpoint().await {
                Ok(Exit::Parked) => break,
                Ok(Exit::Moved) => {}
                Err(error) => {
                    self.metrics.observe_projection_failure(&self.info.name, "store");
                    tracing::warn!(projection = %self.info.name, copy = self.copy.id.generation, %error, "projection paused: the store failed; retrying");
                    *self.progress.last_error.lock() = Some(error.to_string());
                    tokio::time::sleep(store_backoff).await;
                    store_backoff = (store_backoff * 2).min(MAX_STORE_BACKOFF);
                }
            }
            match self.reload_copy().await {
                Ok(true) => {}
                Ok(false) => break,
                Err(error) => *self.progress.last_error.lock() = Some(error.to_string()),
            }
        }
        self.poke.notify_one();
    }

    /// Re-read the copy; false when it is no longer ours to run.
    async fn reload_copy(&mut self) -> Result<bool, StoreError> {
        let copies = self.store.projection_copies().await?;
        match copies.into_iter().find(|c| c.id == self.copy.id) {
            Some(copy) if copy.role != CopyRole::Retired && copy.parked.is_none() => {
                self.copy = copy;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn run_from_checkpoint(&mut self) -> Result<Exit, StoreError> {
        self.progress.position.store(self.copy.position, Ordering::Relaxed);
        let mut reader =
            ReadAhead::start(self.store.clone(), self.copy.position, self.config.batch_size, self.config.linger);
        let subscribed = EventNames::new(&self.info.event_types);
        let mut ahead: Option<Batch> = None;
        loop {
            let batch = match ahead.take() {
                Some(batch) => batch,
                None => self.prepare(reader.next().await?, &subscribed),
            };
            // While this batch is projected, the next one's `touches` runs
            // (it depends on the events only).
            if let Some(chunk) = reader.ready() {
                ahead = Some(self.prepare(chunk?, &subscribed));
            }
            if let Some(through) = batch.through {
                let exit = if let Some(touched) = batch.touched {
                    let span = batch.span.clone();
                    self.project_and_commit(&batch.events, touched, through).instrument(span).await?
                } else if !batch.full || through - self.copy.position >= CHECKPOINT_EVERY {
                    self.commit(through, Vec::new(), 0, Instant::now()).await?
                } else {
                    None
                };
                if let Some(exit) = exit {
                    return Ok(exit);
                }
            }
            self.progress.caught_up.store(!batch.full, Ordering::Relaxed);
            if !batch.full && self.copy.role == CopyRole::Building && self.copy.position >= *self.store.head().borrow()
            {
                return self.activate().await;
            }
        }
    }

    /// Keep the subscribed events of a chunk and start their `touches`,
    /// in the batch's span (linked to the work that produced its events).
    fn prepare(&self, chunk: Chunk, subscribed: &EventNames) -> Batch {
        let through = chunk.events.last().map(|e| e.position);
        let kept: Vec<StoredEvent> = chunk.events.into_iter().filter(|e| subscribed.contains(e)).collect();
        if kept.is_empty() {
            return Batch { events: Arc::from([]), through, full: chunk.full, touched: None, span: Span::none() };
        }
        let span = tracing::info_span!(
            target: telemetry::TARGET,
            parent: None,
            "project_batch",
            orchestrix.projection = %self.info.name,
            orchestrix.copy = self.copy.id.generation,
            orchestrix.module = %self.module.name,
            orchestrix.events = kept.len(),
            orchestrix.through = through,
        );
        telemetry::link_to(&span, kept.iter().filter_map(|e| e.trace.as_ref()));
        let events: Events = kept.into_iter().map(into_recorded).collect();
        let touched = Some(self.start_touches(events.clone(), span.clone()));
        Batch { events, through, full: chunk.full, touched, span }
    }

    /// The rebuild has caught up with the head: switch it in.
    async fn activate(&mut self) -> Result<Exit, StoreError> {
        match self.store.change_read_model(ReadModelChange::Activate { copy: self.copy.id.clone() }).await {
            Ok(_) => {
                tracing::info!(projection = %self.info.name, copy = self.copy.id.generation, position = self.copy.position, "rebuild caught up: the new copy now answers queries");
                self.copy.role = CopyRole::Active;
                self.poke.notify_one();
                Ok(Exit::Moved)
            }
            Err(StoreError::ReadModelConflict(_)) => Ok(Exit::Moved),
            Err(error) => Err(error),
        }
    }

    /// Project `events` (all subscribed) and commit through `through`. On a
    /// guest failure, or the database refusing the batch's documents, replay
    /// them one by one to isolate the poison event: a guest failure parks
    /// after the retries, a refusal (deterministic) at once.
    async fn project_and_commit(
        &mut self,
        events: &Events,
        touched: Touched,
        through: u64,
    ) -> Result<Option<Exit>, StoreError> {
        let started = Instant::now();
        let failure = match self.finish_project(touched).await {
            Ok(ops) => match self.commit(through, ops, events.len(), started).await {
                Err(error) if error.is_refusal() => error.to_string(),
                committed => return committed,
            },
            Err(BatchFailure::Store(error)) => return Err(error),
            Err(BatchFailure::Guest(reason)) => reason,
        };
        tracing::debug!(projection = %self.info.name, %failure, "batch failed; replaying it event by event");
        for event in events.iter() {
            let mut attempts = 0;
            loop {
                attempts += 1;
                let started = Instant::now();
                let reason = match self.project(Arc::from([event.clone()])).await {
                    Ok(ops) => match self.commit(event.position, ops, 1, started).await {
                        Ok(Some(exit)) => return Ok(Some(exit)),
                        Ok(None) => break,
                        // The database refuses what this event makes of the
                        // documents: the same call would be refused again.
                        Err(error) if error.is_refusal() => {
                            self.metrics.observe_projection_failure(&self.info.name, "refused");
                            *self.progress.last_error.lock() = Some(error.to_string());
                            return self.park(event, error.to_string(), attempts).await.map(Some);
                        }
                        Err(error) => return Err(error),
                    },
                    Err(BatchFailure::Store(error)) => return Err(error),
                    Err(BatchFailure::Guest(reason)) => reason,
                };
                self.metrics.observe_projection_failure(&self.info.name, "guest");
                *self.progress.last_error.lock() = Some(reason.clone());
                if attempts >= self.config.retry_attempts.max(1) {
                    return self.park(event, reason, attempts).await.map(Some);
                }
                let pause = self.config.retry_backoff * 2u32.saturating_pow(attempts - 1);
                tracing::warn!(projection = %self.info.name, module = %self.module.name, event_id = %event.id, position = event.position, attempt = attempts, %reason, "projection failed on an event; retrying in {pause:?}");
                tokio::time::sleep(pause).await;
            }
        }
        if self.copy.position < through {
            return self.commit(through, Vec::new(), 0, Instant::now()).await;
        }
        Ok(None)
    }

    /// Stop at `event`: move the checkpoint up to just before it, then park.
    async fn park(&mut self, event: &RecordedEvent, reason: String, attempts: u32) -> Result<Exit, StoreError> {
        if self.copy.position + 1 < event.position
            && let Some(exit) = self.commit(event.position - 1, Vec::new(), 0, Instant::now()).await?
        {
            return Ok(exit);
        }
        let parked = Parked {
            position: event.position,
            event_id: event.id.clone(),
            error: reason.clone(),
            attempts,
            since: chrono::Utc::now(),
        };
        self.store
            .change_read_model(ReadModelChange::SetParked { copy: self.copy.id.clone(), parked: Some(parked) })
            .await?;
        self.metrics.set_projection_parked(&self.info.name, &self.label(), true);
        if let Some(service) = self.service.upgrade() {
            service.parked(&self.copy.id, &self.module.content_hash);
        }
        tracing::error!(projection = %self.info.name, copy = self.copy.id.generation, module = %self.module.name, event_id = %event.id, position = event.position, attempts, error = %reason, "projection parked on a poison event: retry or skip it (`orchestrix projections retry|skip`)");
        Ok(Exit::Parked)
    }

    /// Commit `ops` and move the checkpoint to `to`.
    async fn commit(
        &mut self,
        to: u64,
        ops: Vec<DocumentOp>,
        events: usize,
        started: Instant,
    ) -> Result<Option<Exit>, StoreError> {
        let mut collections: BTreeSet<String> = self.copy.collections.iter().cloned().collect();
        let before = collections.len();
        collections.extend(ops.iter().map(|op| op.key().collection.clone()));
        let added = (collections.len() > before).then(|| collections.into_iter().collect::<Vec<_>>());
        let change = ReadModelChange::Commit {
            copy: self.copy.id.clone(),
            from: self.copy.position,
            to,
            ops,
            collections: added.clone(),
            skipped: 0,
            fence: (self.module.generation() > 0).then(|| (self.module.name.clone(), self.module.generation())),
        };
        match self.store.change_read_model(change).await {
            Ok(_) => {}
            Err(StoreError::ReadModelConflict(_)) => return Ok(Some(Exit::Moved)),
            Err(error) => return Err(error),
        }
        if let Some(added) = added {
            self.copy.collections = added;
        }
        self.copy.position = to;
        self.progress.position.store(to, Ordering::Relaxed);
        *self.progress.last_error.lock() = None;
        self.metrics.observe_projection_batch(&self.info.name, &self.label(), events, to, started.elapsed());
        Ok(None)
    }

    /// `touches`, load, `project`: the operations for `events`.
    async fn project(&self, events: Events) -> Result<Vec<DocumentOp>, BatchFailure> {
        self.finish_project(self.start_touches(events, Span::current())).await
    }

    /// Upcast `events` to the current schemas of their types and call
    /// `touches` on a blocking thread. An event that cannot be upcast fails
    /// the batch like a guest failure of the projection (and parks on it).
    fn start_touches(&self, events: Events, span: Span) -> Touched {
        let (module, name) = (self.module.clone(), self.info.name.clone());
        let owners = self.registry.current();
        tokio::task::spawn_blocking(move || {
            let _in_span = span.enter();
            let events = if is_current(&*owners, &events) {
                events
            } else {
                let mut current = events.to_vec();
                if let Err(failure) = upcast_events(&*owners, &mut current) {
                    let failure =
                        GuestFailure { module: module.name.clone(), function: "upcast", reason: failure.describe() };
                    return (events, Err(failure));
                }
                Arc::from(current)
            };
            let keys = module.touches(&name, &events);
            (events, keys)
        })
    }

    /// Load what `touches` named, then `project`.
    async fn finish_project(&self, touched: Touched) -> Result<Vec<DocumentOp>, BatchFailure> {
        let (recorded, keys) =
            touched.await.map_err(|e| BatchFailure::Guest(format!("projection call panicked: {e}")))?;
        let keys: Vec<DocumentKey> =
            guest_result(keys, "touches")?.into_iter().map(|k| DocumentKey::new(k.collection, k.key)).collect();
        let bodies = self.store.load_documents(&self.copy.id, &keys).await?;
        let documents: Vec<GuestDocument> = keys
            .into_iter()
            .zip(bodies)
            .map(|(key, body)| GuestDocument {
                key: GuestDocumentKey { collection: key.collection, key: key.key },
                body,
            })
            .collect();
        let (module, name) = (self.module.clone(), self.info.name.clone());
        let span = Span::current();
        let ops = tokio::task::spawn_blocking(move || span.in_scope(|| module.project(&name, &recorded, &documents)))
            .await
            .map_err(|e| BatchFailure::Guest(format!("projection call panicked: {e}")))?;
        guest_result(ops, "project")?.into_iter().map(checked_op).collect()
    }
}

/// A batch's events as the guest sees them, shared by the calls on it.
type Events = Arc<[RecordedEvent]>;

/// A `touches` call in flight, with the events it was given.
type Touched = tokio::task::JoinHandle<(
    Events,
    Result<Result<Vec<GuestDocumentKey>, crate::sandbox::DomainError>, crate::sandbox::GuestFailure>,
)>;

/// The subscribed events of one chunk, with their `touches` under way.
struct Batch {
    events: Events,
    /// Last position read (subscribed or not); `None` for an empty chunk.
    through: Option<u64>,
    full: bool,
    touched: Option<Touched>,
    /// The batch's `project_batch` span (disabled when traces are off).
    span: Span,
}

/// A guest call's outcome as a batch result: traps and domain errors both
/// fail the batch.
fn guest_result<T>(
    result: Result<Result<T, crate::sandbox::DomainError>, crate::sandbox::GuestFailure>,
    function: &str,
) -> Result<T, BatchFailure> {
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(BatchFailure::Guest(format!("`{function}` returned an error: {}", error.describe()))),
        Err(failure) => Err(BatchFailure::Guest(failure.to_string())),
    }
}

/// A guest operation, checked: non-empty addresses and JSON bodies.
fn checked_op(op: ReadModelOp) -> Result<DocumentOp, BatchFailure> {
    let (key, body) = match op {
        ReadModelOp::Upsert((key, body)) => (key, Some(body)),
        ReadModelOp::Delete(key) => (key, None),
    };
    if key.collection.is_empty() || key.key.is_empty() {
        return Err(BatchFailure::Guest("`project` returned a document with an empty collection or key".into()));
    }
    let key = DocumentKey::new(key.collection, key.key);
    match body {
        Some(body) => {
            if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(&body) {
                return Err(BatchFailure::Guest(format!(
                    "`project` returned a body for {}/{} that is not JSON: {error}",
                    key.collection, key.key
                )));
            }
            Ok(DocumentOp::Upsert(key, body))
        }
        None => Ok(DocumentOp::Delete(key)),
    }
}

/// One read of the feed (empty when the reads reached the head with
/// nothing new).
struct Chunk {
    events: Vec<StoredEvent>,
    /// The read returned a full batch: more may be waiting.
    full: bool,
}

/// Reads the next batches of the global log while the current one is being
/// projected. Stops when dropped.
struct ReadAhead {
    chunks: mpsc::Receiver<Result<Chunk, StoreError>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadAhead {
    fn start(store: Arc<dyn EventStore>, mut after: u64, batch_size: usize, linger: Duration) -> Self {
        let (sender, chunks) = mpsc::channel(2);
        // On the runner's thread (its local set), not the request workers.
        let task = tokio::task::spawn_local(async move {
            let mut head = store.head();
            // Whether the runner has been told that the reads reached the head.
            let mut told_idle = false;
            loop {
                match store.read_all(after, batch_size).await {
                    Ok(events) if events.is_empty() => {
                        if !told_idle {
                            told_idle = true;
                            if sender.send(Ok(Chunk { events, full: false })).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let seen = after;
                        if *head.borrow() > seen {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            continue;
                        }
                        let woken =
                            tokio::time::timeout(Duration::from_millis(500), head.wait_for(|h| *h > seen)).await;
                        if let Ok(Err(_)) = woken {
                            return;
                        }
                    }
                    Ok(events) => {
                        after = events.last().map_or(after, |e| e.position);
                        let full = events.len() >= batch_size;
                        told_idle = !full;
                        if sender.send(Ok(Chunk { events, full })).await.is_err() {
                            return;
                        }
                        if !full {
                            tokio::time::sleep(linger).await;
                        }
                    }
                    Err(error) => {
                        if sender.send(Err(error)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Self { chunks, task }
    }

    async fn next(&mut self) -> Result<Chunk, StoreError> {
        self.chunks.recv().await.unwrap_or(Err(StoreError::ShuttingDown))
    }

    /// The next chunk, if it has already been read.
    fn ready(&mut self) -> Option<Result<Chunk, StoreError>> {
        self.chunks.try_recv().ok()
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.task.abort();
    }
}
