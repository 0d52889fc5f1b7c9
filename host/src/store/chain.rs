//! Tamper evidence: every event carries `chain`, a SHA-256 that links it to
//! the event before it in the global log, so the chain at position N vouches
//! for every byte of positions 1..=N.
//!
//! `chain(N) = SHA-256(chain(N-1) ‖ canonical(event N))`, with 32 zero
//! bytes before position 1. The canonical encoding is fixed and
//! versioned: the tag `orchestrix-chain-v1`, then each field of the stored
//! row in a fixed order — integers big-endian (`u64` position and version,
//! the 16 bytes of the event id, `u32` schema version, `i64` time in
//! microseconds since the epoch), strings as a `u32` length and their UTF-8
//! bytes, optional strings as `0` (absent) or `1` and the string. The
//! payload is hashed exactly as stored (ciphertext of personal data
//! included), so a chain verifies on any backend holding the same rows.
//!
//! The group commit computes the chain of each row it writes from the head's
//! chain it read under the writers' lock (`group::plan`); rows written
//! before the chain existed are sealed when a store opens
//! (`SqliteStore::open`, `PostgresStore::open`). [`verify`] recomputes the
//! chain from the start and names the first position whose bytes or link do
//! not match; [`compare`] walks two stores side by side.

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{EventStore, StoreError, StoredEvent};

/// A link of the chain.
pub type ChainHash = [u8; 32];

/// The link before position 1.
pub const GENESIS: ChainHash = [0; 32];

const TAG: &[u8] = b"orchestrix-chain-v1";

/// The chain of `event` following `previous`.
pub fn link(previous: &ChainHash, event: &StoredEvent) -> ChainHash {
    let mut hash = Sha256::new();
    hash.update(TAG);
    hash.update(previous);
    hash.update(event.position.to_be_bytes());
    text(&mut hash, &event.stream.aggregate_type);
    text(&mut hash, &event.stream.aggregate_id);
    hash.update(event.version.to_be_bytes());
    hash.update(event.id.as_bytes());
    text(&mut hash, &event.event_type);
    hash.update(event.schema_version.to_be_bytes());
    hash.update(event.time.timestamp_micros().to_be_bytes());
    text(&mut hash, &event.data);
    optional(&mut hash, event.correlation_id.as_deref());
    optional(&mut hash, event.causation_id.as_deref());
    text(&mut hash, &event.module);
    text(&mut hash, &event.module_version);
    optional(&mut hash, event.module_hash.as_deref());
    optional(&mut hash, event.trace.as_ref().map(|trace| trace.traceparent()));
    optional(&mut hash, event.trace.as_ref().and_then(|trace| trace.tracestate()));
    hash.finalize().into()
}

fn text(hash: &mut Sha256, value: &str) {
    hash.update((value.len() as u32).to_be_bytes());
    hash.update(value.as_bytes());
}

fn optional(hash: &mut Sha256, value: Option<&str>) {
    match value {
        None => hash.update([0]),
        Some(value) => {
            hash.update([1]);
            text(hash, value);
        }
    }
}

/// A stored event with the chain stored beside it (`None`: never sealed).
#[derive(Debug, Clone)]
pub struct ChainedEvent {
    pub event: StoredEvent,
    pub chain: Option<Vec<u8>>,
}

/// A stored chain value as a link (`Corrupt` when it is not 32 bytes).
pub(super) fn stored(value: Option<Vec<u8>>) -> Result<Option<ChainHash>, StoreError> {
    value
        .map(|bytes| {
            ChainHash::try_from(bytes.as_slice())
                .map_err(|_| StoreError::Corrupt(format!("a stored chain has {} bytes, not 32", bytes.len())))
        })
        .transpose()
}

/// The last event's position and chain: what an operator anchors elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    pub position: u64,
    /// `None` for an empty log, or a head written with the chain turned off.
    pub chain: Option<ChainHash>,
}

impl ChainHead {
    /// `{"position": N, "chain": "hex"}` (`chain` null for an empty log).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"position": self.position, "chain": self.chain.map(hex::encode)})
    }
}

/// What sealing needs of a backend's connection (it holds whatever
/// serialises writers: the single SQLite writer, the PostgreSQL lock).
pub(super) trait ChainRows {
    async fn chain_head(&mut self) -> Result<ChainHead, StoreError>;
    /// The position and chain of the last event that has one.
    async fn last_sealed(&mut self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    async fn events_after(&mut self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;
    /// Store the chain of each `(position, chain)`.
    async fn write_chains(&mut self, links: &[(u64, ChainHash)]) -> Result<(), StoreError>;
}

/// Events sealed per read and write (two parameters each in SQLite's
/// multi-row update).
const SEAL_BATCH: usize = 5_000;

/// Chain the unsealed end of the log — events written before the chain
/// existed (a store migrated from an older version, an older host still
/// writing) or with it turned off — onto the last sealed event, and return
/// the head's chain (`None` for an empty log). An unsealed event in the
/// middle of the log is left for [`verify`] to report.
pub(super) async fn seal(rows: &mut impl ChainRows) -> Result<Option<ChainHash>, StoreError> {
    let head = rows.chain_head().await?;
    if head.position == 0 || head.chain.is_some() {
        return Ok(head.chain);
    }
    let (mut after, mut previous) = match rows.last_sealed().await? {
        Some((position, chain)) => (position, stored(Some(chain))?.unwrap_or(GENESIS)),
        None => (0, GENESIS),
    };
    let sealed_after = after;
    let mut count = 0;
    loop {
        let events = rows.events_after(after, SEAL_BATCH).await?;
        let Some(last) = events.last() else { break };
        after = last.position;
        let links: Vec<(u64, ChainHash)> = events
            .iter()
            .map(|event| {
                previous = link(&previous, event);
                (event.position, previous)
            })
            .collect();
        rows.write_chains(&links).await?;
        count += links.len();
    }
    tracing::warn!(
        events = count,
        after_position = sealed_after,
        "sealed events that had no chain (written before the chain existed, or with it off) onto the chain"
    );
    Ok(Some(previous))
}

/// Where a chain stops vouching for the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChainBreak {
    /// The row for `position` is missing: the next row found is `found`.
    Missing { position: u64, found: u64 },
    /// The row at `position` does not hash to its stored chain: its bytes
    /// were changed, or a row before it was changed, removed or moved.
    Mismatch { position: u64 },
    /// The row at `position` has no chain (written with the chain off).
    Unsealed { position: u64 },
    /// The chain at `position` differs from the one anchored for it.
    Anchor { position: u64 },
    /// The anchored position is past the last event, `head`: events were
    /// removed from the end of the log.
    Truncated { position: u64, head: u64 },
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing { position, found } => {
                write!(f, "position {position} is missing (the next stored event is at {found})")
            }
            Self::Mismatch { position } => write!(
                f,
                "position {position} does not match its chain: its bytes were changed, or an event before it was \
                 changed, deleted or moved"
            ),
            Self::Unsealed { position } => write!(f, "position {position} carries no chain"),
            Self::Anchor { position } => write!(f, "the chain at position {position} differs from the anchored one"),
            Self::Truncated { position, head } => {
                write!(f, "the anchored position {position} is past the last event ({head}): events were removed")
            }
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Events read.
    pub events: u64,
    /// The recomputed head: the last position and the chain recomputed
    /// over everything up to it.
    pub head: ChainHead,
    pub first_break: Option<ChainBreak>,
}

/// Events read per query while verifying or comparing.
const PAGE: usize = 5_000;

/// Recompute the chain of `store` from position 1, comparing it with the
/// stored one (and with `anchor`, a chain an operator recorded for a
/// position), stopping at the first break. `progress` is called after each
/// page with the position reached.
pub async fn verify(
    store: &dyn EventStore,
    anchor: Option<(u64, ChainHash)>,
    mut progress: impl FnMut(u64),
) -> Result<Verified, StoreError> {
    let mut previous = GENESIS;
    let mut position = 0;
    let mut events = 0;
    loop {
        let page = store.read_chained(position, PAGE).await?;
        let Some(last) = page.last() else { break };
        let reached = last.event.position;
        for row in page {
            let expected = position + 1;
            let done = |first_break| Verified {
                events,
                head: ChainHead { position, chain: (position > 0).then_some(previous) },
                first_break: Some(first_break),
            };
            if row.event.position != expected {
                return Ok(done(ChainBreak::Missing { position: expected, found: row.event.position }));
            }
            let computed = link(&previous, &row.event);
            match row.chain {
                None => return Ok(done(ChainBreak::Unsealed { position: expected })),
                Some(stored) if stored.as_slice() != computed => {
                    return Ok(done(ChainBreak::Mismatch { position: expected }));
                }
                Some(_) => {}
            }
            if anchor.is_some_and(|(at, chain)| at == expected && chain != computed) {
                return Ok(done(ChainBreak::Anchor { position: expected }));
            }
            previous = computed;
            position = expected;
            events += 1;
        }
        progress(reached);
    }
    let head = ChainHead { position, chain: (position > 0).then_some(previous) };
    let first_break =
        anchor.filter(|(at, _)| *at > position).map(|(at, _)| ChainBreak::Truncated { position: at, head: position });
    Ok(Verified { events, head, first_break })
}

/// What [`compare`] found between two stores.
#[derive(Debug, Clone)]
pub struct Compared {
    /// Events in each store.
    pub events: (u64, u64),
    /// The first position whose event (or whose presence) differs.
    pub first_difference: Option<u64>,
}

/// Walk two stores side by side, recomputing each one's chain (a rolling
/// hash of everything up to a position), and report the first position
/// where they differ — a different event, or one store ending first.
pub async fn compare(left: &dyn EventStore, right: &dyn EventStore) -> Result<Compared, StoreError> {
    let (mut left_chain, mut right_chain) = (GENESIS, GENESIS);
    let (mut left_count, mut right_count) = (0u64, 0u64);
    let mut first_difference = None;
    let mut after = 0;
    loop {
        let (left_page, right_page) =
            tokio::try_join!(left.read_chained(after, PAGE), right.read_chained(after, PAGE))?;
        if left_page.is_empty() && right_page.is_empty() {
            break;
        }
        left_count += left_page.len() as u64;
        right_count += right_page.len() as u64;
        if first_difference.is_none() {
            for index in 0..left_page.len().max(right_page.len()) {
                match (left_page.get(index), right_page.get(index)) {
                    (Some(l), Some(r)) => {
                        left_chain = link(&left_chain, &l.event);
                        right_chain = link(&right_chain, &r.event);
                        if left_chain != right_chain || l.event.position != r.event.position {
                            first_difference = Some(l.event.position.min(r.event.position));
                            break;
                        }
                    }
                    (Some(only), None) | (None, Some(only)) => {
                        first_difference = Some(only.event.position);
                        break;
                    }
                    (None, None) => unreachable!("the index is below the longer page's length"),
                }
            }
        }
        let reached = |page: &[ChainedEvent]| page.last().map_or(0, |row| row.event.position);
        after = reached(&left_page).max(reached(&right_page));
    }
    Ok(Compared { events: (left_count, right_count), first_difference })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StreamId;

    #[test]
    fn every_field_and_the_previous_link_change_the_chain() {
        let event = StoredEvent::sample("bank", StreamId::new("account", "a-1"), "Opened");
        let base = link(&GENESIS, &event);
        assert_eq!(base, link(&GENESIS, &event), "the chain is a function of the row");
        let mut other_link = GENESIS;
        other_link[31] = 1;
        assert_ne!(base, link(&other_link, &event));
        let changes: Vec<fn(&mut StoredEvent)> = vec![
            |e| e.position += 1,
            |e| e.version += 1,
            |e| e.data = r#"{"owner":"x"}"#.into(),
            |e| e.stream.aggregate_id.push('x'),
            |e| e.correlation_id = Some(String::new()),
            |e| e.module_hash = Some("ab".into()),
            |e| e.time += chrono::Duration::microseconds(1),
            |e| e.schema_version += 1,
        ];
        for change in changes {
            let mut changed = event.clone();
            change(&mut changed);
            assert_ne!(base, link(&GENESIS, &changed));
        }
    }

    #[test]
    fn strings_are_length_prefixed_so_fields_cannot_trade_bytes() {
        let mut left = StoredEvent::sample("bank", StreamId::new("ab", "c"), "Opened");
        let mut right = StoredEvent::sample("bank", StreamId::new("a", "bc"), "Opened");
        left.data = "{}".into();
        right.data = "{}".into();
        assert_ne!(link(&GENESIS, &left), link(&GENESIS, &right));
    }
}
