//! Group commit, shared by every backend: the queue in front of a backend's
//! single writer task, the batching loop, and the planning step that turns
//! a batch of appends into rows with positions and versions — each append
//! decided on its own (accepted, duplicate or refused) before one
//! transaction writes every accepted one.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::telemetry;

use super::chain::{self, ChainHash};
use super::{
    AppendOutcome, AppendRequest, CommandRecord, EventData, EventMetadata, ExpectedVersion, StoreError, StoredEvent,
    StreamId,
};

pub(super) type Reply = oneshot::Sender<Result<AppendOutcome, StoreError>>;

/// What a writer task takes from its queue. `W` is work of the backend's
/// own that its writer runs on its connection, after the appends queued
/// before it (SQLite: read-model changes; PostgreSQL has none).
pub(super) enum Job<W> {
    Append(Box<AppendRequest>, Reply),
    Work(W),
    Shutdown(oneshot::Sender<()>),
}

/// A backend's own kind of [`Job::Work`].
pub(super) trait WriterWork: Send + 'static {
    /// Answer the work without doing it: the writer is shutting down.
    fn refuse(self);
}

/// A writer with no work of its own besides appends.
impl WriterWork for std::convert::Infallible {
    fn refuse(self) {
        match self {}
    }
}

/// Stream versions a writer remembers before it starts forgetting.
pub(super) const VERSION_CACHE_LIMIT: usize = 200_000;

/// Whether the writer's last write attempt succeeded, shared between the
/// writer (which records every commit and probe) and readers of the
/// store's readiness.
#[derive(Default)]
pub(super) struct WriteHealth {
    failure: parking_lot::Mutex<Option<String>>,
}

/// How often a writer whose writes fail tries a probe write while idle, so
/// readiness comes back on its own once the database accepts writes.
pub(super) const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl WriteHealth {
    /// Record the outcome of a write: a success clears the failure; a store
    /// that cannot write (not a refused request) sets it.
    pub(super) fn record<T>(&self, outcome: &Result<T, StoreError>) {
        match outcome {
            Ok(_) => *self.failure.lock() = None,
            Err(StoreError::Unavailable { reason, .. }) => *self.failure.lock() = Some(reason.clone()),
            Err(_) => {}
        }
    }

    /// Why writes fail, if the last attempt failed.
    pub(super) fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }
}

/// The caller's side of a writer task: a bounded queue (back-pressure) and
/// the payload limit, checked before anything is queued.
pub(super) struct Submitter<W> {
    jobs: mpsc::Sender<Job<W>>,
    max_event_bytes: usize,
    head: watch::Receiver<u64>,
    health: std::sync::Arc<WriteHealth>,
}

impl<W: WriterWork> Submitter<W> {
    /// A queue of `depth` jobs, the receiving end for the writer task, and
    /// the head channel the writer publishes committed positions on.
    pub(super) fn new(
        depth: usize,
        max_event_bytes: usize,
        head: u64,
    ) -> (Self, mpsc::Receiver<Job<W>>, watch::Sender<u64>, std::sync::Arc<WriteHealth>) {
        let (jobs, queue) = mpsc::channel(depth);
        let (head_sender, head) = watch::channel(head);
        let health = std::sync::Arc::new(WriteHealth::default());
        (Self { jobs, max_event_bytes, head, health: health.clone() }, queue, head_sender, health)
    }

    /// Why the writer's writes fail, if its last attempt failed.
    pub(super) fn write_failure(&self) -> Option<String> {
        self.health.failure()
    }

    pub(super) async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        if let Some(size) = request.events.iter().map(|e| e.data.len()).find(|size| *size > self.max_event_bytes) {
            return Err(StoreError::PayloadTooLarge { size, limit: self.max_event_bytes });
        }
        let (reply, outcome) = oneshot::channel();
        self.jobs.send(Job::Append(Box::new(request), reply)).await.map_err(|_| StoreError::ShuttingDown)?;
        outcome.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// Queue the backend's own work behind the appends already queued.
    pub(super) async fn queue_work(&self, work: W) -> Result<(), StoreError> {
        self.jobs.send(Job::Work(work)).await.map_err(|_| StoreError::ShuttingDown)
    }

    pub(super) fn head(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    /// Ask the writer to finish what is queued and stop; wait until it has.
    pub(super) async fn shutdown(&self) {
        let (done, finished) = oneshot::channel();
        if self.jobs.send(Job::Shutdown(done)).await.is_ok() {
            let _ = finished.await;
        }
    }
}

/// What the writer takes from the queue in one go (nothing at all: time for
/// a probe write).
pub(super) struct Batch<W> {
    pub appends: Vec<(AppendRequest, Reply)>,
    /// The backend's own work queued behind these appends: runs after them.
    pub work: Option<W>,
    /// Set when a shutdown was queued behind these appends.
    pub shutdown: Option<oneshot::Sender<()>>,
}

/// Wait for at least one job, then take everything already queued, up to
/// `max` appends. `None` once every submitter is gone. While `health` says
/// writes fail, an empty batch comes back after [`PROBE_EVERY`] without a
/// job, for the writer to probe with.
pub(super) async fn next_batch<W>(
    queue: &mut mpsc::Receiver<Job<W>>,
    max: usize,
    health: &WriteHealth,
) -> Option<Batch<W>> {
    let mut batch = Batch { appends: Vec::new(), work: None, shutdown: None };
    let first = if health.failure().is_some() {
        match tokio::time::timeout(PROBE_EVERY, queue.recv()).await {
            Ok(job) => job?,
            Err(_) => return Some(batch),
        }
    } else {
        queue.recv().await?
    };
    let mut job = Some(first);
    while let Some(next) = job.take() {
        match next {
            Job::Append(request, reply) => batch.appends.push((*request, reply)),
            Job::Work(work) => batch.work = Some(work),
            Job::Shutdown(done) => batch.shutdown = Some(done),
        }
        if batch.shutdown.is_none() && batch.work.is_none() && batch.appends.len() < max {
            job = queue.try_recv().ok();
        }
    }
    Some(batch)
}

impl<W> Batch<W> {
    /// A batch with no job: the writer should probe whether it can write.
    pub(super) fn is_probe(&self) -> bool {
        self.appends.is_empty() && self.work.is_none() && self.shutdown.is_none()
    }
}

/// The write a writer probes with while its writes fail: one row rewritten
/// (`write_probe`, in both backends' migrations).
pub(super) const PROBE_SQL: &str = "INSERT INTO write_probe (id, probed_at_us) VALUES (1, $1) \
     ON CONFLICT (id) DO UPDATE SET probed_at_us = excluded.probed_at_us";

/// Refuse everything still queued after a shutdown.
pub(super) fn refuse_remaining<W: WriterWork>(queue: &mut mpsc::Receiver<Job<W>>) {
    queue.close();
    while let Ok(job) = queue.try_recv() {
        match job {
            Job::Append(_, reply) => {
                let _ = reply.send(Err(StoreError::ShuttingDown));
            }
            Job::Work(work) => work.refuse(),
            Job::Shutdown(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// An append that passed its checks, waiting for the commit. It keeps what
/// it was asked, so a refused batch can be split and its appends planned
/// again.
pub(super) struct Accepted {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub metadata: EventMetadata,
    pub events: Vec<StoredEvent>,
    /// The chain of each of `events` (empty when the chain is off).
    pub chains: Vec<ChainHash>,
    pub command_id: Option<String>,
    pub reply: Reply,
}

impl Accepted {
    /// The append as it was queued.
    fn into_request(self) -> (AppendRequest, Reply) {
        let events = self
            .events
            .into_iter()
            .map(|e| EventData { event_type: e.event_type, schema_version: e.schema_version, data: e.data })
            .collect();
        let request = AppendRequest {
            stream: self.stream,
            expected: self.expected,
            events,
            metadata: self.metadata,
            command_id: self.command_id,
        };
        (request, self.reply)
    }
}

/// What the database says about the streams and command ids of a batch,
/// read before planning it. Both maps must cover every stream and command
/// id in the batch (a stream with no events is at version 0).
pub(super) struct Facts {
    pub head: u64,
    /// The chain of the event at `head` (`chain::GENESIS` for an empty
    /// log); `None` when the store writes no chain.
    pub head_chain: Option<ChainHash>,
    /// Every module's generation in the store (the fence; a module absent
    /// here fences nothing).
    pub generations: HashMap<String, u64>,
    pub versions: HashMap<StreamId, u64>,
    pub commands: HashMap<String, CommandRecord>,
}

/// A planned batch: the accepted appends with their rows, and the head and
/// stream versions once it commits.
pub(super) struct Plan {
    pub accepted: Vec<Accepted>,
    pub head: u64,
    /// The chain at `head` once the batch commits.
    pub head_chain: Option<ChainHash>,
    pub versions: HashMap<StreamId, u64>,
}

impl Plan {
    /// Every row of the batch with its chain, in position order.
    pub(super) fn rows(&self) -> impl Iterator<Item = (&StoredEvent, Option<&ChainHash>)> {
        self.accepted
            .iter()
            .flat_map(|a| a.events.iter().enumerate().map(|(index, event)| (event, a.chains.get(index))))
    }

    /// The idempotency record of every accepted append that carries a key.
    pub(super) fn command_records(&self) -> impl Iterator<Item = CommandRow<'_>> {
        self.accepted.iter().filter_map(|a| {
            let (first, last) = (a.events.first()?, a.events.last()?);
            Some(CommandRow {
                command_id: a.command_id.as_ref()?,
                stream: &first.stream,
                first_position: first.position,
                last_position: last.position,
                version: last.version,
            })
        })
    }

    /// The span of this batch's commit (`db.system` names the database),
    /// linked to the work whose appends it carries.
    pub(super) fn commit_span(&self, system: &'static str) -> tracing::Span {
        let span = tracing::info_span!(
            target: telemetry::TARGET,
            parent: None,
            "group_commit",
            db.system = system,
            orchestrix.appends = self.accepted.len(),
            orchestrix.events = self.accepted.iter().map(|a| a.events.len()).sum::<usize>(),
            orchestrix.head = self.head,
        );
        telemetry::link_to(&span, self.accepted.iter().filter_map(|a| a.metadata.trace.as_ref()));
        span
    }

    /// Answer every accepted append once the transaction is durable.
    pub(super) fn acknowledge(self) {
        for append in self.accepted {
            let _ = append.reply.send(Ok(AppendOutcome::Appended(append.events)));
        }
    }

    /// Answer every accepted append with the failure of the transaction.
    pub(super) fn fail(self, error: &StoreError) {
        for append in self.accepted {
            let _ = append.reply.send(Err(error.clone()));
        }
    }

    /// After the database refused this batch's transaction: when the
    /// refusal may belong to one member, the appends again in two halves
    /// (queue order kept) to be planned and committed one after the other,
    /// so the valid ones commit and only the culprit is refused; a single
    /// append (or a failure of the store as a whole) is answered with the
    /// error.
    pub(super) fn isolate(self, error: &StoreError) -> Option<[Vec<(AppendRequest, Reply)>; 2]> {
        if !error.is_refusal() || self.accepted.len() < 2 {
            self.fail(error);
            return None;
        }
        let mut first: Vec<(AppendRequest, Reply)> = self.accepted.into_iter().map(Accepted::into_request).collect();
        let second = first.split_off(first.len() / 2);
        Some([first, second])
    }
}

/// A row of `commands`, borrowed from what is being written.
pub(super) struct CommandRow<'a> {
    pub command_id: &'a str,
    pub stream: &'a StreamId,
    pub first_position: u64,
    pub last_position: u64,
    pub version: u64,
}

/// The streams and command ids a batch needs facts about.
pub(super) fn batch_keys(appends: &[(AppendRequest, Reply)]) -> (Vec<StreamId>, Vec<String>) {
    let streams: HashSet<&StreamId> = appends.iter().map(|(request, _)| &request.stream).collect();
    let ids: HashSet<&String> = appends.iter().filter_map(|(request, _)| request.command_id.as_ref()).collect();
    (streams.into_iter().cloned().collect(), ids.into_iter().cloned().collect())
}

/// An import checked against the log: the chain of each row and what the
/// log looks like once it commits.
pub(super) struct ImportPlan {
    /// The chain of each imported row (empty when the store writes none).
    pub chains: Vec<ChainHash>,
    pub head: u64,
    pub head_chain: Option<ChainHash>,
    /// The streams' versions after the import.
    pub versions: HashMap<StreamId, u64>,
}

/// Check that `events` continue the log at `head` without a gap and each
/// continues its stream (`versions` holds the current version of every
/// stream they touch), and chain them onto `head_chain`.
pub(super) fn plan_import(
    events: &[StoredEvent],
    head: u64,
    head_chain: Option<ChainHash>,
    mut versions: HashMap<StreamId, u64>,
) -> Result<ImportPlan, StoreError> {
    let mut position = head;
    let mut last_chain = head_chain;
    let mut chains = Vec::with_capacity(if head_chain.is_some() { events.len() } else { 0 });
    for event in events {
        if event.position != position + 1 {
            return Err(StoreError::Refused(format!(
                "an imported event must continue the log: the store's last position is {position}, the next event \
                 has position {} (import into an empty store, a file without gaps)",
                event.position
            )));
        }
        let version = versions.entry(event.stream.clone()).or_insert(0);
        if event.version != *version + 1 {
            return Err(StoreError::Refused(format!(
                "imported event at position {} has version {} of {}, which is at version {version}: duplicate or \
                 missing events",
                event.position, event.version, event.stream
            )));
        }
        *version = event.version;
        position = event.position;
        if let Some(previous) = last_chain.as_mut() {
            *previous = chain::link(previous, event);
            chains.push(*previous);
        }
    }
    Ok(ImportPlan { chains, head: position, head_chain: last_chain, versions })
}

/// Answer every append of a batch that cannot be planned with `error`.
pub(super) fn fail_appends(appends: Vec<(AppendRequest, Reply)>, error: &StoreError) {
    for (_, reply) in appends {
        let _ = reply.send(Err(error.clone()));
    }
}

/// The commit time stamped on a batch, at the microsecond precision both
/// backends store.
pub(super) fn commit_time() -> DateTime<Utc> {
    let now = Utc::now();
    Utc.timestamp_micros(now.timestamp_micros()).single().unwrap_or(now)
}

/// Decide every append of a batch in queue order against `facts` and the
/// appends before it. Refusals and duplicates are answered here; accepted
/// appends get consecutive positions after `facts.head`.
pub(super) fn plan(appends: Vec<(AppendRequest, Reply)>, facts: Facts, time: DateTime<Utc>) -> Plan {
    let Facts { head, head_chain, generations, mut versions, commands } = facts;
    let mut next_position = head;
    let mut last_chain = head_chain;
    let mut used_ids: HashSet<String> = HashSet::new();
    let mut accepted = Vec::with_capacity(appends.len());
    for (request, reply) in appends {
        if let Some(id) = &request.command_id {
            if used_ids.contains(id) {
                let _ = reply.send(Err(StoreError::CommandIdReused(id.clone())));
                continue;
            }
            if let Some(record) = commands.get(id) {
                let _ = reply.send(if record.stream == request.stream {
                    Ok(AppendOutcome::Duplicate(record.clone()))
                } else {
                    Err(StoreError::CommandIdReused(id.clone()))
                });
                continue;
            }
        }
        if let Some(generation) = request.metadata.module_generation
            && let Some(current) = generations.get(&request.metadata.module).copied()
            && current > generation
        {
            let module = request.metadata.module.clone();
            let _ = reply.send(Err(StoreError::StaleModule { module, generation, current }));
            continue;
        }
        let current = versions.get(&request.stream).copied().unwrap_or(0);
        if !request.expected.admits(current) {
            let _ = reply.send(Err(StoreError::Conflict {
                stream: request.stream.clone(),
                expected: request.expected,
                actual: current,
            }));
            continue;
        }
        let AppendRequest { stream, expected, events, metadata, command_id } = request;
        let events: Vec<StoredEvent> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| {
                next_position += 1;
                StoredEvent {
                    position: next_position,
                    stream: stream.clone(),
                    version: current + i as u64 + 1,
                    id: Uuid::now_v7(),
                    event_type: event.event_type,
                    schema_version: event.schema_version,
                    time,
                    data: event.data,
                    correlation_id: metadata.correlation_id.clone(),
                    causation_id: metadata.causation_id.clone(),
                    module: metadata.module.clone(),
                    module_version: metadata.module_version.clone(),
                    module_hash: metadata.module_hash.clone(),
                    trace: metadata.trace.clone(),
                }
            })
            .collect();
        let chains: Vec<ChainHash> = match last_chain.as_mut() {
            Some(previous) => events
                .iter()
                .map(|event| {
                    *previous = chain::link(previous, event);
                    *previous
                })
                .collect(),
            None => Vec::new(),
        };
        if let Some(last) = events.last() {
            versions.insert(stream.clone(), last.version);
        }
        if let Some(id) = &command_id {
            used_ids.insert(id.clone());
        }
        accepted.push(Accepted { stream, expected, metadata, events, chains, command_id, reply });
    }
    Plan { accepted, head: next_position, head_chain: last_chain, versions }
}
