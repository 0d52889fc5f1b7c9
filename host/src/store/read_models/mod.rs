//! Read-model storage: the documents projections write and the copies
//! (generations) they live in, in the same database as the events.
//!
//! A projection owns one or more *copies*, each with its own checkpoint:
//! the `active` copy answers queries; a `building` copy is a rebuild into a
//! shadow that becomes active in one transaction once it has caught up;
//! `retired` copies are dropped in the background. Every change to a copy
//! ([`ReadModelChange`]) is one transaction, and a checkpoint only moves
//! under a compare-and-set on its previous value — so document changes and
//! the position they reflect are committed together, exactly once.
//!
//! The SQL that is the same on both backends is written once
//! (`common.rs`: the `ReadModelSql` trait, generic over the sqlx
//! database); `sqlite.rs` and `postgres.rs` hold only what differs, and
//! run each change as one transaction — on SQLite on the single writer's
//! connection, queued behind the appends.

mod common;
pub(super) mod postgres;
pub(super) mod sqlite;

pub(super) use common::ReadModelSql;

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::StoreError;

/// Address of one document within a projection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocumentKey {
    pub collection: String,
    pub key: String,
}

impl DocumentKey {
    pub fn new(collection: impl Into<String>, key: impl Into<String>) -> Self {
        Self { collection: collection.into(), key: key.into() }
    }
}

/// One change to a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocumentOp {
    /// Create or replace, with a JSON body.
    Upsert(DocumentKey, String),
    Delete(DocumentKey),
}

impl DocumentOp {
    pub fn key(&self) -> &DocumentKey {
        match self {
            Self::Upsert(key, _) | Self::Delete(key) => key,
        }
    }
}

/// Check a batch's operations against what every backend can store, then
/// [`collapse`] them. A document containing a NUL character (in its key or
/// as `\u0000` in its JSON body) is refused on both backends alike:
/// PostgreSQL's JSONB cannot hold it, and a read model must not hold on one
/// store what the other refuses. The refusal names the document, so the
/// projection parks on the event that produced it.
pub(crate) fn checked_ops(ops: Vec<DocumentOp>) -> Result<Vec<DocumentOp>, StoreError> {
    for op in &ops {
        let key = op.key();
        let nul_in_body = matches!(op, DocumentOp::Upsert(_, body) if crate::limits::json_has_nul(body));
        if key.collection.contains('\0') || key.key.contains('\0') || nul_in_body {
            return Err(StoreError::Refused(format!(
                "document `{}/{}` contains a NUL character, which read models cannot store",
                key.collection.escape_debug(),
                key.key.escape_debug()
            )));
        }
    }
    Ok(collapse(ops))
}

/// Keep only the last operation on each document, in first-touched order:
/// applying the result has the same effect as applying `ops` in order.
pub fn collapse(ops: Vec<DocumentOp>) -> Vec<DocumentOp> {
    let mut last: HashMap<DocumentKey, usize> = HashMap::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        last.insert(op.key().clone(), i);
    }
    ops.into_iter().enumerate().filter(|(i, op)| last.get(op.key()) == Some(i)).map(|(_, op)| op).collect()
}

/// What a copy is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyRole {
    /// Answers queries.
    Active,
    /// A rebuild in progress: becomes active once caught up.
    Building,
    /// Replaced; its documents are being dropped.
    Retired,
}

impl CopyRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Building => "building",
            Self::Retired => "retired",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "active" => Ok(Self::Active),
            "building" => Ok(Self::Building),
            "retired" => Ok(Self::Retired),
            other => Err(StoreError::Corrupt(format!("projection copy role `{other}`"))),
        }
    }
}

/// One copy of a projection's read model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CopyId {
    pub projection: String,
    pub generation: u64,
}

/// Where a projection stopped because an event kept failing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Parked {
    /// Global position of the failing event.
    pub position: u64,
    pub event_id: String,
    pub error: String,
    /// Calls made before parking.
    pub attempts: u32,
    pub since: DateTime<Utc>,
}

/// A copy as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRecord {
    pub id: CopyId,
    /// Module that declared the projection when the copy was created.
    pub module: String,
    /// Projection version the copy is built with.
    pub version: u32,
    pub role: CopyRole,
    /// Checkpoint: every event up to here is reflected, none after.
    pub position: u64,
    /// Collections the copy has written to.
    pub collections: Vec<String>,
    /// Events an operator chose to skip.
    pub skipped: u64,
    pub parked: Option<Parked>,
    pub created_at: DateTime<Utc>,
}

/// One transaction on the read models.
#[derive(Debug, Clone)]
pub enum ReadModelChange {
    /// A new copy at position 0 with the next generation number, which the
    /// change returns. Fails with [`StoreError::ReadModelConflict`] if the
    /// projection already has a copy in that role (another host won).
    CreateCopy { projection: String, module: String, version: u32, role: CopyRole },
    /// Apply `ops` and move the checkpoint from `from` to `to`, clearing any
    /// parking. Fails with [`StoreError::ReadModelConflict`] (and changes
    /// nothing) unless the copy is active or building and at `from`.
    Commit {
        copy: CopyId,
        from: u64,
        to: u64,
        ops: Vec<DocumentOp>,
        /// The full list, when `ops` add a collection.
        collections: Option<Vec<String>>,
        /// Events skipped by an operator in this step.
        skipped: u64,
        /// The module build that projected the batch: `(module,
        /// generation)`. The commit is refused (as a conflict) when the
        /// module's generation in the store is newer — see ARCHITECTURE.md,
        /// "Cluster modules".
        fence: Option<(String, u64)>,
    },
    /// Park the copy (its checkpoint stays where it is), or with `None`
    /// clear the parking so the copy is retried.
    SetParked { copy: CopyId, parked: Option<Parked> },
    /// Make a building copy active and retire the active one, atomically.
    Activate { copy: CopyId },
    /// Retire a copy that is not active (an abandoned rebuild).
    Retire { copy: CopyId },
    /// Delete up to `limit` documents of a retired copy, and the copy itself
    /// once it has none left. Returns how many documents went.
    DropRetired { copy: CopyId, limit: usize },
}

/// A page of documents from the active copy.
#[derive(Debug, Clone)]
pub struct DocumentQuery {
    pub projection: String,
    pub collection: String,
    /// Top-level field and the JSON texts it may equal (one of them).
    pub filters: Vec<(String, Vec<String>)>,
    /// Continue after this key.
    pub after: Option<String>,
    pub limit: usize,
}

/// What the active copy answered, all from one snapshot.
#[derive(Debug, Clone)]
pub struct DocumentPage {
    pub generation: u64,
    /// The checkpoint the documents reflect.
    pub position: u64,
    /// `(key, JSON body)` in key order.
    pub documents: Vec<(String, String)>,
    /// More documents follow the last one.
    pub more: bool,
}

/// One document looked up in the active copy.
#[derive(Debug, Clone)]
pub struct DocumentLookup {
    pub generation: u64,
    pub position: u64,
    /// The JSON body, or `None` when the copy has no such document.
    pub body: Option<String>,
}

/// Field names usable in filters: they end up in a JSON path.
pub fn valid_field_name(field: &str) -> bool {
    !field.is_empty() && field.len() <= 128 && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The JSON texts a query-string value matches: the value as a JSON string,
/// and, when it reads as a JSON number, boolean or null, that literal too
/// (`?balance=100` matches `100`, `?status=ACTIVE` matches `"ACTIVE"`).
pub fn filter_candidates(value: &str) -> Vec<String> {
    let mut candidates = vec![serde_json::Value::String(value.to_owned()).to_string()];
    if let Ok(literal) = serde_json::from_str::<serde_json::Value>(value)
        && (literal.is_number() || literal.is_boolean() || literal.is_null())
    {
        candidates.push(literal.to_string());
    }
    candidates
}
