//! Aggregates: the typed decide/evolve trait and its type-erased adapter.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::{DomainError, NewEvent, RecordedEvent};

/// A consistency boundary: it decides on commands and evolves by events.
///
/// `Self` is the state, stored by the host as an opaque blob (the SDK encodes
/// it as JSON) and folded from history with [`Aggregate::apply`]. `Default`
/// is the state of an instance that has no events yet.
///
/// `Command` and `Event` are enums in serde's default (externally tagged)
/// representation: each variant name is a command or event type as seen on
/// the wire, and its fields are the JSON body. Use `Variant {}` for a
/// variant without fields whose body is `{}`. Bodies are read strictly: a
/// struct (the variant's fields or one nested in them) must be a JSON object,
/// never an array, and no object may repeat a key.
///
/// Both methods must be pure: no clock, randomness or I/O (the sandbox has
/// none). The host stamps ids and times on stored events.
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The aggregate type, unique across all modules the host loads; it is
    /// the `{type}` in the HTTP route.
    const TYPE: &'static str;
    /// Everything this aggregate can be asked to do.
    type Command: Serialize + DeserializeOwned;
    /// Everything that can happen to it.
    type Event: Serialize + DeserializeOwned + 'static;
    /// The version of the state: its serialized form and what `apply` makes
    /// of each event. Declare it — and bump it whenever `Self` changes shape
    /// or `apply` folds any event differently — to let the host keep the
    /// states and snapshots the previous build folded across a hot swap,
    /// instead of refolding every stream with the new build. `None` (the
    /// default): states are trusted only by the very build that folded them.
    const STATE_VERSION: Option<u32> = None;

    /// Decide which events record the outcome of `command`, or refuse it.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, DomainError>;

    /// Evolve the state by one event. Events are facts: never refuse them.
    fn apply(&mut self, event: Self::Event);
}

/// An aggregate with its types erased, as the exports and the test harness
/// drive it: JSON and blobs in, JSON and blobs out.
pub(crate) trait ErasedAggregate: Send + Sync {
    fn aggregate_type(&self) -> &'static str;
    fn command_types(&self) -> Vec<String>;
    fn event_types(&self) -> Vec<String>;
    fn state_version(&self) -> Option<u32>;
    /// The type of its event enum, for projections and sagas that read it.
    fn event_enum(&self) -> std::any::TypeId;
    fn handle(&self, state: &[u8], command_type: &str, payload: &str) -> Result<Vec<NewEvent>, DomainError>;
    fn apply(&self, state: &[u8], events: &[RecordedEvent]) -> Result<Vec<u8>, DomainError>;
    fn describe_state(&self, state: &[u8]) -> Result<String, DomainError>;
}

pub(crate) struct AggregateAdapter<A>(PhantomData<fn() -> A>);

impl<A> AggregateAdapter<A> {
    pub(crate) fn new() -> Self {
        Self(PhantomData)
    }
}

impl<A: Aggregate> ErasedAggregate for AggregateAdapter<A> {
    fn aggregate_type(&self) -> &'static str {
        A::TYPE
    }

    fn command_types(&self) -> Vec<String> {
        codec::variant_names::<A::Command>()
    }

    fn event_types(&self) -> Vec<String> {
        codec::variant_names::<A::Event>()
    }

    fn state_version(&self) -> Option<u32> {
        A::STATE_VERSION
    }

    fn event_enum(&self) -> std::any::TypeId {
        std::any::TypeId::of::<A::Event>()
    }

    fn handle(&self, state: &[u8], command_type: &str, payload: &str) -> Result<Vec<NewEvent>, DomainError> {
        let state: A = codec::decode_state(state)?;
        let command: A::Command = codec::decode(command_type, payload)?;
        state
            .handle(command)?
            .iter()
            .map(|event| {
                let (event_type, payload) = codec::encode(event)?;
                Ok(NewEvent { event_type, payload })
            })
            .collect()
    }

    fn apply(&self, state: &[u8], events: &[RecordedEvent]) -> Result<Vec<u8>, DomainError> {
        let mut state: A = codec::decode_state(state)?;
        for event in events {
            state.apply(codec::decode(&event.event_type, &event.payload)?);
        }
        codec::encode_state(&state)
    }

    fn describe_state(&self, state: &[u8]) -> Result<String, DomainError> {
        let state: A = codec::decode_state(state)?;
        serde_json::to_string(&state).map_err(|e| DomainError::Invalid(format!("cannot render state: {e}")))
    }
}
