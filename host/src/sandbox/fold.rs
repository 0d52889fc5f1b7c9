//! The one path from stored events to a guest: the conversion of a
//! [`StoredEvent`] into the contract's [`RecordedEvent`], the upcast of
//! events stored at an older schema version ([`upcast_events`], by the
//! module owning their aggregate type), and the fold loop that runs `apply`
//! over a stream — used by commands, swap preparation, the replay check,
//! time travel and what-if alike; projections and sagas upcast what they
//! read with the same [`upcast_events`].

use super::{DomainError, GuestFailure, GuestModule, ModuleSet, RecordedEvent, UpcastEvent};
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
/// `module`'s `apply`, `FOLD_CHUNK` events per call, each chunk upcast by
/// `module` (the owner of the stream's aggregate type) first.
pub fn fold_events(
    module: &GuestModule,
    aggregate_type: &str,
    mut state: Vec<u8>,
    events: &[StoredEvent],
) -> Result<Vec<u8>, FoldError> {
    for chunk in events.chunks(FOLD_CHUNK) {
        let mut recorded: Vec<RecordedEvent> = chunk.iter().map(to_recorded).collect();
        let (first, last) = (chunk[0].version, chunk[chunk.len() - 1].version);
        match upcast_events(module, &mut recorded) {
            Ok(()) => {}
            Err(UpcastFailure::Refused { error, .. }) => return Err(FoldError::Refused { first, last, error }),
            Err(UpcastFailure::Failed { failure, .. }) => return Err(FoldError::Failed { first, last, failure }),
        }
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

/// Who upcasts an event: the module that owns its aggregate type.
pub trait EventOwners {
    fn owner(&self, aggregate_type: &str) -> Option<&GuestModule>;
}

impl EventOwners for ModuleSet {
    fn owner(&self, aggregate_type: &str) -> Option<&GuestModule> {
        self.route(aggregate_type).map(|module| &**module)
    }
}

/// A module upcasts its own aggregates' events (a fold, a what-if candidate).
impl EventOwners for GuestModule {
    fn owner(&self, aggregate_type: &str) -> Option<&GuestModule> {
        self.aggregate(aggregate_type).is_some().then_some(self)
    }
}

/// Why events could not be brought to their current schema version.
#[derive(Debug)]
pub enum UpcastFailure {
    /// The owner's `upcast` returned a domain error.
    Refused { module: String, error: DomainError },
    /// The owner's `upcast` trapped, ran out of time or memory, or broke the
    /// contract (wrong count, type or version).
    Failed { module: String, failure: GuestFailure },
}

impl UpcastFailure {
    /// One line for logs and parked reasons.
    pub fn describe(&self) -> String {
        match self {
            UpcastFailure::Refused { module, error } => {
                format!("module `{module}` cannot upcast an event: {}", error.describe())
            }
            UpcastFailure::Failed { failure, .. } => failure.to_string(),
        }
    }
}

/// What the upcast reads and rewrites of an event: the contract's
/// [`RecordedEvent`] on the way to a guest, a [`StoredEvent`] on the way to
/// a reader who asked for the current schema.
pub trait Upcastable {
    fn aggregate_type(&self) -> &str;
    fn event_type(&self) -> &str;
    fn schema_version(&self) -> u32;
    fn payload_mut(&mut self) -> &mut String;
    fn set_schema_version(&mut self, version: u32);
}

impl Upcastable for RecordedEvent {
    fn aggregate_type(&self) -> &str {
        &self.aggregate_type
    }
    fn event_type(&self) -> &str {
        &self.event_type
    }
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
    fn payload_mut(&mut self) -> &mut String {
        &mut self.payload
    }
    fn set_schema_version(&mut self, version: u32) {
        self.schema_version = version;
    }
}

impl Upcastable for StoredEvent {
    fn aggregate_type(&self) -> &str {
        &self.stream.aggregate_type
    }
    fn event_type(&self) -> &str {
        &self.event_type
    }
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
    fn payload_mut(&mut self) -> &mut String {
        &mut self.data
    }
    fn set_schema_version(&mut self, version: u32) {
        self.schema_version = version;
    }
}

/// Whether every event is at its owner's current schema version already
/// (then [`upcast_events`] has nothing to do).
pub fn is_current<E: Upcastable>(owners: &impl EventOwners, events: &[E]) -> bool {
    events.iter().all(|event| {
        owners
            .owner(event.aggregate_type())
            .is_none_or(|owner| owner.schema_version(event.event_type()) <= event.schema_version())
    })
}

/// Bring every event stored at an older schema version than its owner's
/// current one to the current version, in place: one `upcast` call per
/// owner for all of its stale events. Events that are current (the common
/// case: no call at all), or whose owner is not loaded, stay as they are.
pub fn upcast_events<E: Upcastable>(owners: &impl EventOwners, events: &mut [E]) -> Result<(), UpcastFailure> {
    let mut stale: Vec<(usize, &GuestModule)> = Vec::new();
    for (index, event) in events.iter().enumerate() {
        if let Some(owner) = owners.owner(event.aggregate_type())
            && owner.schema_version(event.event_type()) > event.schema_version()
        {
            stale.push((index, owner));
        }
    }
    while let Some(&(_, owner)) = stale.first() {
        let (mine, rest): (Vec<_>, Vec<_>) = stale.into_iter().partition(|(_, m)| std::ptr::eq(*m, owner));
        stale = rest;
        let old: Vec<UpcastEvent> = mine
            .iter()
            .map(|&(index, _)| UpcastEvent {
                event_type: events[index].event_type().to_owned(),
                schema_version: events[index].schema_version(),
                payload: std::mem::take(events[index].payload_mut()),
            })
            .collect();
        let broken = |reason: String| UpcastFailure::Failed {
            module: owner.name.clone(),
            failure: GuestFailure { module: owner.name.clone(), function: "upcast", reason },
        };
        let upcast = match owner.upcast(&old) {
            Ok(Ok(upcast)) => upcast,
            Ok(Err(error)) => return Err(UpcastFailure::Refused { module: owner.name.clone(), error }),
            Err(failure) => return Err(UpcastFailure::Failed { module: owner.name.clone(), failure }),
        };
        if upcast.len() != old.len() {
            return Err(broken(format!("returned {} events for {}", upcast.len(), old.len())));
        }
        for ((index, _), new) in mine.into_iter().zip(upcast) {
            let event = &mut events[index];
            let current = owner.schema_version(event.event_type());
            if new.event_type != event.event_type() || new.schema_version != current {
                return Err(broken(format!(
                    "turned `{}` v{} into `{}` v{} (the manifest says v{current})",
                    event.event_type(),
                    event.schema_version(),
                    new.event_type,
                    new.schema_version
                )));
            }
            event.set_schema_version(new.schema_version);
            *event.payload_mut() = new.payload;
        }
    }
    Ok(())
}
