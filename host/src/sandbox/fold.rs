//! The one path from stored events to a guest: the conversion of a
//! [`StoredEvent`] into the contract's [`RecordedEvent`], and the fold loop
//! that runs `apply` over a stream — used by commands, swap preparation and
//! the replay check alike.

use super::{DomainError, GuestFailure, GuestModule, RecordedEvent};
use crate::store::StoredEvent;

/// Events folded per `apply` call when loading a stream.
const FOLD_CHUNK: usize = 256;

/// Why stored events could not be folded, with the versions of the chunk
/// that failed.
pub enum FoldError {
    /// `apply` returned a domain error.
    Refused { first: u64, last: u64, error: DomainError },
    /// `apply` trapped, ran out of time or memory.
    Failed { first: u64, last: u64, failure: GuestFailure },
}

/// Fold stored events (of one stream, in version order) onto `state` with
/// `module`'s `apply`, `FOLD_CHUNK` events per call.
pub fn fold_events(
    module: &GuestModule,
    aggregate_type: &str,
    mut state: Vec<u8>,
    events: &[StoredEvent],
) -> Result<Vec<u8>, FoldError> {
    for chunk in events.chunks(FOLD_CHUNK) {
        let recorded: Vec<RecordedEvent> = chunk.iter().map(to_recorded).collect();
        let (first, last) = (chunk[0].version, chunk[chunk.len() - 1].version);
        state = match module.apply(aggregate_type, &state, &recorded) {
            Ok(Ok(state)) => state,
            Ok(Err(error)) => return Err(FoldError::Refused { first, last, error }),
            Err(failure) => return Err(FoldError::Failed { first, last, failure }),
        };
    }
    Ok(state)
}

/// An event as the guest contract presents it, taking its strings.
pub fn into_recorded(event: StoredEvent) -> RecordedEvent {
    RecordedEvent {
        id: event.id.to_string(),
        time: event.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        aggregate_type: event.stream.aggregate_type,
        aggregate_id: event.stream.aggregate_id,
        stream_version: event.version,
        position: event.position,
        event_type: event.event_type,
        schema_version: event.schema_version,
        payload: event.data,
    }
}

/// An event as the guest contract presents it.
pub fn to_recorded(event: &StoredEvent) -> RecordedEvent {
    RecordedEvent {
        id: event.id.to_string(),
        aggregate_type: event.stream.aggregate_type.clone(),
        aggregate_id: event.stream.aggregate_id.clone(),
        stream_version: event.version,
        position: event.position,
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        time: event.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        payload: event.data.clone(),
    }
}
