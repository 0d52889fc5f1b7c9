//! Outbound-bus storage: each subscription's definition, checkpoint, state
//! and lease, and its dead-letter queue, in the same database as the events.
//!
//! Every [`SubscriptionChange`] is one transaction. The changes the
//! delivering host makes carry a [`SubscriptionFence`] (the lease's owner
//! and epoch) and check it in the same statement or transaction, so a host
//! that lost its lease writes nothing: the checkpoint can only move from
//! the value its holder read. Lease expiry compares against the database's
//! clock. The SQL is written once (`common.rs`), like the sagas'.

mod common;

pub(super) use common::SubscriptionSql;

/// Whether a subscription delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionState {
    Active,
    /// By an operator, or because its webhook answered 410 Gone
    /// (`paused_reason` says which).
    Paused,
}

impl SubscriptionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(Self::Active),
            "paused" => Some(Self::Paused),
            _ => None,
        }
    }
}

/// A subscription as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRecord {
    pub name: String,
    /// The definition, JSON as the API took it.
    pub spec: String,
    /// Bumped by every change of `spec`.
    pub revision: u64,
    /// Every event up to this position was delivered or dead-lettered.
    pub position: u64,
    pub state: SubscriptionState,
    pub paused_reason: Option<String>,
    /// The delivery error being retried now, if any.
    pub last_error: Option<String>,
    pub owner: Option<String>,
    pub epoch: u64,
    pub lease_expires_ms: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Entries in its dead-letter queue.
    pub dead_letters: u64,
}

/// The lease a delivering host holds: every write it makes checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionFence {
    pub name: String,
    pub owner: String,
    pub epoch: u64,
}

/// An event a subscription gave up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeadLetter {
    pub position: u64,
    pub event_id: String,
    /// The CloudEvent as it was sent (JSON).
    pub event: String,
    pub error: String,
    pub attempts: u32,
}

/// A dead-letter queue entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRecord {
    pub id: u64,
    pub subscription: String,
    pub position: u64,
    pub event_id: String,
    pub event: String,
    pub error: String,
    pub attempts: u32,
    pub failed_at_ms: i64,
    /// An operator asked for it to be delivered again; the delivering host
    /// has not tried yet.
    pub retry_requested: bool,
}

/// One change, one transaction. What `rows` of [`SubscriptionApplied`]
/// counts is said per variant.
#[derive(Debug, Clone)]
pub enum SubscriptionChange {
    /// A new subscription whose checkpoint is 0, or the head when
    /// `start_at_head` (rows: 1, or 0 when the name is taken).
    Create { name: String, spec: String, start_at_head: bool },
    /// A new definition; checkpoint, state and dead letters stay (rows).
    Update { name: String, spec: String },
    /// The subscription and its dead letters (rows: subscriptions deleted).
    Delete { name: String },
    /// An operator's pause or resume (rows).
    SetState { name: String, state: SubscriptionState, reason: Option<String> },
    /// Take the lease when it expired or is this owner's (`lease`: the new
    /// epoch and the checkpoint).
    Acquire { name: String, owner: String, ttl_ms: i64 },
    /// Extend the lease (rows: 0 when lost).
    Renew { fence: SubscriptionFence, ttl_ms: i64 },
    /// Give the lease up (at shutdown).
    Release { fence: SubscriptionFence },
    /// Move the checkpoint from `from` to `to`, queueing the events given
    /// up on in between; clears `last_error`. Lease lost: an error.
    Advance { fence: SubscriptionFence, from: u64, to: u64, dead: Vec<NewDeadLetter> },
    /// The error being retried now (`None`: clear it) (rows).
    RecordError { fence: SubscriptionFence, error: Option<String> },
    /// Pause on the sink's request (a 410 Gone), by the holder (rows).
    PauseHeld { fence: SubscriptionFence, reason: String },
    /// Ask for one entry (`Some(id)`) or all to be delivered again (rows).
    RequestRetry { name: String, id: Option<u64> },
    /// Drop one entry (rows).
    Discard { name: String, id: u64 },
    /// A retried entry was delivered: it leaves the queue (rows).
    Redelivered { fence: SubscriptionFence, id: u64 },
    /// A retried entry failed again: one more attempt, the new error, back
    /// to waiting for an operator (rows).
    RedeliveryFailed { fence: SubscriptionFence, id: u64, error: String },
}

/// What a change did.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionApplied {
    pub rows: u64,
    /// `Acquire`: the epoch taken and the checkpoint.
    pub lease: Option<(u64, u64)>,
    /// The database's clock when the change ran.
    pub now_ms: i64,
}

/// Which dead letters to list.
#[derive(Debug, Clone)]
pub struct DeadLetterQuery {
    pub subscription: String,
    /// Entries with a larger id (a page's cursor).
    pub after: Option<u64>,
    pub limit: usize,
    /// Only those an operator asked to retry.
    pub retry_requested_only: bool,
}
