//! Saga storage: checkpoints and leases, instances, the inbox of inputs,
//! timers and the outbox of commands, in the same database as the events.
//!
//! Every [`SagaChange`] is one transaction. The changes a saga's runner
//! makes carry a [`Fence`] — the lease's owner and epoch — and check it in
//! the same transaction (`UPDATE sagas … WHERE owner AND epoch`), so a host
//! that lost its lease writes nothing; on PostgreSQL that row lock also
//! makes a takeover wait for a write in flight. Times are milliseconds since
//! the Unix epoch; due times and lease expiry compare against the
//! database's clock, never a host's.
//!
//! The SQL is written once (`common.rs`, generic over the sqlx database);
//! the backends run each change on their write connection (SQLite: the
//! writer's, queued behind the appends; PostgreSQL: a pooled one).

mod common;

pub(super) use common::SagaSql;

use serde::{Deserialize, Serialize};

use crate::telemetry::TraceContext;

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceStatus {
    /// Takes inputs (possibly after a backoff, when its last reaction failed).
    Active,
    /// Its reactions kept failing: it waits for an operator (retry, skip,
    /// cancel). Other instances are not held up.
    Parked,
    /// Finished: no more inputs, no timers.
    Done,
}

impl InstanceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Parked => "parked",
            Self::Done => "done",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(Self::Active),
            "parked" => Some(Self::Parked),
            "done" => Some(Self::Done),
            _ => None,
        }
    }
}

/// An input as the inbox holds it (JSON in `saga_inbox.input`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InputRecord {
    /// A subscribed event, as stored.
    Event {
        id: String,
        position: u64,
        module: String,
        aggregate_type: String,
        aggregate_id: String,
        stream_version: u64,
        event_type: String,
        schema_version: u32,
        /// RFC 3339.
        time: String,
        payload: String,
        /// The trace of the work that produced the event.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tracestate: Option<String>,
    },
    /// The outcome of a command the instance sent.
    Outcome {
        request_id: String,
        /// The stream version, when accepted.
        accepted: Option<u64>,
        reason: Option<String>,
        code: Option<u16>,
        /// The trace of the command's work.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tracestate: Option<String>,
    },
    Timer {
        name: String,
    },
    Cancelled {
        reason: String,
    },
}

impl InputRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an input record serializes")
    }

    /// The trace a reaction to this input continues: the event's, or the
    /// reported command's (a timer or a cancel starts its own).
    pub fn trace(&self) -> Option<TraceContext> {
        match self {
            InputRecord::Event { traceparent, tracestate, .. }
            | InputRecord::Outcome { traceparent, tracestate, .. } => {
                TraceContext::from_stored(traceparent.clone(), tracestate.clone())
            }
            InputRecord::Timer { .. } | InputRecord::Cancelled { .. } => None,
        }
    }
}

/// The lease a runner writes under: every change it makes checks that the
/// saga's row still names this owner and epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub saga: String,
    pub owner: String,
    pub epoch: u64,
    /// `(module, generation)` of the build that computed the change: a
    /// change is refused (`StoreError::StaleModule`) when the module's
    /// generation in the store is newer (see ARCHITECTURE.md, "Cluster
    /// modules").
    pub module: Option<(String, u64)>,
}

/// A saga's row: checkpoint and lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaRecord {
    pub saga: String,
    pub module: String,
    /// Every event up to here has been correlated and its inputs queued.
    pub position: u64,
    pub owner: String,
    pub epoch: u64,
    pub lease_expires_ms: i64,
    /// Why the runner cannot move on (e.g. `correlate` fails), if it cannot.
    pub error: Option<String>,
}

/// What the database says about a saga's instances and timers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SagaCounts {
    pub active: u64,
    pub parked: u64,
    pub done: u64,
    pub pending_inputs: u64,
    pub pending_commands: u64,
    pub pending_timers: u64,
    pub next_due_ms: Option<i64>,
}

/// An input to queue for an instance. `input` is JSON the saga runner
/// writes and reads; the store keeps it as text.
#[derive(Debug, Clone)]
pub struct NewInput {
    pub instance: String,
    /// Lower goes first (an operator's cancel jumps the queue).
    pub priority: i64,
    pub input: String,
    /// The time of the input (`now-ms` of the reaction to it).
    pub at_ms: i64,
    /// For a fired timer: its name (a cancel drops it if not yet consumed).
    pub timer: Option<String>,
}

/// An instance to create when an event of a starting type names it.
#[derive(Debug, Clone)]
pub struct NewInstance {
    pub instance: String,
    pub correlation_id: String,
    pub at_ms: i64,
}

/// An input ready for its instance, with the instance as it stands.
#[derive(Debug, Clone)]
pub struct ReadyInput {
    pub id: u64,
    pub instance: String,
    pub input: String,
    pub at_ms: i64,
    pub state: Vec<u8>,
    pub correlation_id: String,
    pub reactions: u64,
    pub attempts: u32,
}

/// An instance as a reaction (or a failed one) leaves it.
#[derive(Debug, Clone)]
pub struct InstanceWrite {
    pub instance: String,
    pub status: InstanceStatus,
    pub state: Vec<u8>,
    pub reactions: u64,
    /// Failed reactions in a row (0 after a success).
    pub attempts: u32,
    /// Wait this long (from the database's now) before the next try.
    pub retry_after_ms: i64,
    pub last_error: Option<String>,
    /// The input it is parked on.
    pub parked_input: Option<u64>,
}

/// A named timer of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerKey {
    pub instance: String,
    pub name: String,
}

/// A command a reaction sends, written to the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxCommand {
    pub instance: String,
    pub input_id: u64,
    pub request_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub command_type: String,
    pub payload: String,
    pub idempotency_key: String,
    /// The trace of the reaction that sent it; the command continues it.
    pub trace: Option<TraceContext>,
}

/// A command waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCommand {
    pub id: u64,
    pub command: OutboxCommand,
    pub correlation_id: String,
}

/// What became of a sent command, to record (and deliver as `input` unless
/// the instance is done by then).
#[derive(Debug, Clone)]
pub struct CommandOutcomeWrite {
    pub command_id: u64,
    pub instance: String,
    /// `Some(version)` when accepted.
    pub accepted: Option<u64>,
    pub reason: Option<String>,
    pub code: Option<u16>,
    pub input: String,
    pub at_ms: i64,
}

/// One transaction on a saga's tables.
#[derive(Debug, Clone)]
pub enum SagaChange {
    /// Take the saga's lease for `owner` if it is free, expired or already
    /// ours (the epoch goes up by one), creating the saga's row at
    /// `start_position` when there is none. Answers `lease`.
    Acquire { saga: String, module: String, owner: String, ttl_ms: i64, start_position: u64 },
    /// Extend the lease; answers `rows` = 0 when it is no longer ours.
    Renew { fence: Fence, ttl_ms: i64 },
    /// Let the lease expire now (a clean shutdown), so another host takes
    /// over at once.
    Release { fence: Fence },
    /// Queue the inputs the events in `(from, to]` produced and move the
    /// checkpoint from `from` to `to` (a compare-and-set). Instances in
    /// `starts` are created if they do not exist; inputs for instances that
    /// do not exist or are done are dropped.
    Intake { fence: Fence, from: u64, to: u64, starts: Vec<NewInstance>, inputs: Vec<NewInput> },
    /// Commit reactions: consume inputs, write instances, drop and set
    /// timers, queue commands. A done instance loses its timers and any
    /// inputs still queued.
    React {
        fence: Fence,
        consumed: Vec<u64>,
        instances: Vec<InstanceWrite>,
        timers_cancelled: Vec<TimerKey>,
        timers_set: Vec<(TimerKey, i64)>,
        commands: Vec<OutboxCommand>,
    },
    /// Record outcomes of sent commands and queue them as inputs.
    Outcomes { fence: Fence, outcomes: Vec<CommandOutcomeWrite> },
    /// Move up to `limit` timers due by the database's clock into the inbox
    /// (each as an [`InputRecord::Timer`] at its due time). Answers `fired`,
    /// `next_due_ms` and `now_ms`.
    FireTimers { fence: Fence, limit: usize },
    /// Record (or clear) why the runner cannot move on.
    SetError { fence: Fence, error: Option<String> },
    /// Operator: a parked instance takes inputs again (from the one it
    /// parked on). Answers `rows` = 0 when it was not parked.
    Retry { saga: String, instance: String },
    /// Operator: drop the input a parked instance is parked on, then
    /// resume it. Answers `rows` = 0 when it was not parked.
    Skip { saga: String, instance: String },
    /// Operator: queue `input` (a cancel) ahead of everything else for an
    /// instance that is not done, resuming it if parked. Answers `rows` = 0
    /// when there is no such instance or it is done.
    Cancel { saga: String, instance: String, input: String, at_ms: i64 },
}

/// A timer moved into the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredTimer {
    pub key: TimerKey,
    pub due_at_ms: i64,
}

/// The answer to a [`SagaChange`] (the fields its documentation names).
#[derive(Debug, Clone, Default)]
pub struct SagaApplied {
    pub rows: u64,
    /// `(epoch, position)` of a lease taken; `None` when another host holds it.
    pub lease: Option<(u64, u64)>,
    pub fired: Vec<FiredTimer>,
    pub next_due_ms: Option<i64>,
    /// The database's clock when the change ran.
    pub now_ms: i64,
}

/// One instance as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    pub instance: String,
    pub status: InstanceStatus,
    pub state: Vec<u8>,
    pub correlation_id: String,
    pub reactions: u64,
    pub attempts: u32,
    pub retry_at_ms: i64,
    pub last_error: Option<String>,
    pub parked_input: Option<u64>,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A command an instance sent, with its outcome once known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentCommand {
    pub id: u64,
    pub command: OutboxCommand,
    /// `pending`, `accepted` or `rejected`.
    pub status: String,
    pub version: Option<u64>,
    pub reason: Option<String>,
    pub code: Option<u16>,
    pub sent_at_ms: i64,
    pub outcome_at_ms: Option<i64>,
}

/// An input still queued for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedInput {
    pub id: u64,
    pub input: String,
    pub at_ms: i64,
}

/// Everything about one instance.
#[derive(Debug, Clone)]
pub struct InstanceDetail {
    pub record: InstanceRecord,
    /// `(name, due_at_ms)`, soonest first.
    pub timers: Vec<(String, i64)>,
    pub commands: Vec<SentCommand>,
    pub inputs: Vec<QueuedInput>,
}

/// A page of a saga's instances, in instance order.
#[derive(Debug, Clone)]
pub struct InstanceQuery {
    pub saga: String,
    pub status: Option<InstanceStatus>,
    /// Continue after this instance id.
    pub after: Option<String>,
    pub limit: usize,
}
