//! Glue between the generated bindings and a [`Module`]: implements every
//! exported WIT interface for [`Exports<M>`] by converting the generated
//! types to the SDK's own and dispatching through the module's registry.

use std::marker::PhantomData;

use crate::bindings::exports::orchestrix::domain::{aggregate, manifest, projection, saga, upcaster};
use crate::bindings::orchestrix::domain::types;
use crate::module::registry;
use crate::projection::{DocumentKey, Documents, ReadModelOp};
use crate::saga::{CommandResult, RawSagaInput};
use crate::{DomainError, Module, RecordedEvent, Timestamp};

/// The component's exports for module `M`; named by [`export!`](crate::export).
pub struct Exports<M>(PhantomData<fn() -> M>);

impl From<DomainError> for types::DomainError {
    fn from(error: DomainError) -> Self {
        match error {
            DomainError::Rejected(reason) => Self::Rejected(reason),
            DomainError::Invalid(reason) => Self::Invalid(reason),
            DomainError::RejectedWith { code, message } => Self::RejectedWith(types::Rejection { code, message }),
        }
    }
}

impl From<types::RecordedEvent> for RecordedEvent {
    fn from(e: types::RecordedEvent) -> Self {
        RecordedEvent {
            id: e.id,
            aggregate_type: e.aggregate_type,
            aggregate_id: e.aggregate_id,
            stream_version: e.stream_version,
            position: e.position,
            event_type: e.event_type,
            schema_version: e.schema_version,
            time: e.time,
            payload: e.payload,
        }
    }
}

fn recorded(events: Vec<types::RecordedEvent>) -> Vec<RecordedEvent> {
    events.into_iter().map(RecordedEvent::from).collect()
}

impl From<projection::DocumentKey> for DocumentKey {
    fn from(key: projection::DocumentKey) -> Self {
        DocumentKey { collection: key.collection, key: key.key }
    }
}

impl From<DocumentKey> for projection::DocumentKey {
    fn from(key: DocumentKey) -> Self {
        projection::DocumentKey { collection: key.collection, key: key.key }
    }
}

impl<M: Module> manifest::Guest for Exports<M> {
    fn manifest() -> manifest::ModuleManifest {
        let module = registry::<M>();
        manifest::ModuleManifest {
            name: M::NAME.to_owned(),
            version: M::VERSION.to_owned(),
            aggregates: module
                .aggregates
                .iter()
                .map(|a| manifest::AggregateInfo {
                    name: a.aggregate_type().to_owned(),
                    command_types: a.command_types(),
                    event_types: a.event_types(),
                    state_version: a.state_version(),
                })
                .collect(),
            projections: module
                .projections
                .iter()
                .map(|p| manifest::ProjectionInfo {
                    name: p.name().to_owned(),
                    version: p.version(),
                    event_types: module.qualified(p.name(), p.event_enum(), p.event_types()),
                })
                .collect(),
            sagas: module
                .sagas
                .iter()
                .map(|s| manifest::SagaInfo {
                    name: s.name().to_owned(),
                    starting_event_types: module.qualified(s.name(), s.event_enum(), s.starting_event_types()),
                    event_types: module.qualified(s.name(), s.event_enum(), s.event_types()),
                })
                .collect(),
            event_schemas: module
                .event_schemas()
                .into_iter()
                .map(|(event_type, version)| manifest::EventSchema { event_type, version })
                .collect(),
        }
    }
}

impl<M: Module> aggregate::Guest for Exports<M> {
    fn handle(
        aggregate_type: String,
        state: Vec<u8>,
        command: types::Command,
    ) -> Result<Vec<types::NewEvent>, types::DomainError> {
        let events = registry::<M>().aggregate_named(&aggregate_type)?.handle(
            &state,
            &command.command_type,
            &command.payload,
        )?;
        Ok(events.into_iter().map(|e| types::NewEvent { event_type: e.event_type, payload: e.payload }).collect())
    }

    fn apply(
        aggregate_type: String,
        state: Vec<u8>,
        events: Vec<types::RecordedEvent>,
    ) -> Result<Vec<u8>, types::DomainError> {
        Ok(registry::<M>().aggregate_named(&aggregate_type)?.apply(&state, &recorded(events))?)
    }

    fn describe_state(aggregate_type: String, state: Vec<u8>) -> Result<String, types::DomainError> {
        Ok(registry::<M>().aggregate_named(&aggregate_type)?.describe_state(&state)?)
    }
}

impl<M: Module> projection::Guest for Exports<M> {
    fn touches(
        name: String,
        events: Vec<types::RecordedEvent>,
    ) -> Result<Vec<projection::DocumentKey>, types::DomainError> {
        let keys = registry::<M>().projection_named(&name)?.touches(recorded(events))?;
        Ok(keys.into_iter().map(Into::into).collect())
    }

    fn project(
        name: String,
        events: Vec<types::RecordedEvent>,
        documents: Vec<projection::Document>,
    ) -> Result<Vec<projection::ReadModelOp>, types::DomainError> {
        let mut loaded = Vec::with_capacity(documents.len());
        for document in documents {
            let body = match document.body {
                Some(text) => Some(
                    serde_json::from_str(&text)
                        .map_err(|e| DomainError::Invalid(format!("stored document is not valid JSON: {e}")))?,
                ),
                None => None,
            };
            loaded.push((DocumentKey::from(document.key), body));
        }
        let mut documents = Documents::new(loaded);
        registry::<M>().projection_named(&name)?.project(recorded(events), &mut documents)?;
        Ok(documents
            .into_ops()
            .into_iter()
            .map(|op| match op {
                ReadModelOp::Upsert(key, body) => projection::ReadModelOp::Upsert((key.into(), body)),
                ReadModelOp::Delete(key) => projection::ReadModelOp::Delete(key.into()),
            })
            .collect())
    }
}

impl From<saga::SagaInput> for RawSagaInput {
    fn from(input: saga::SagaInput) -> Self {
        match input {
            saga::SagaInput::Event(event) => RawSagaInput::Event(event.into()),
            saga::SagaInput::Outcome(outcome) => RawSagaInput::Outcome {
                request_id: outcome.request_id,
                result: match outcome.result {
                    saga::CommandResult::Accepted(version) => CommandResult::Accepted { version },
                    saga::CommandResult::Rejected(rejection) => {
                        CommandResult::Rejected { reason: rejection.reason, code: rejection.code }
                    }
                },
            },
            saga::SagaInput::Timer(timer) => RawSagaInput::Timer { name: timer.name },
            saga::SagaInput::Cancelled(reason) => RawSagaInput::Cancelled { reason },
        }
    }
}

impl<M: Module> saga::Guest for Exports<M> {
    fn correlate(name: String, event: types::RecordedEvent) -> Result<Vec<String>, types::DomainError> {
        Ok(registry::<M>().saga_named(&name)?.correlate(&event.into())?)
    }

    fn react(
        name: String,
        state: Vec<u8>,
        input: saga::SagaInput,
        now_ms: u64,
    ) -> Result<saga::Reaction, types::DomainError> {
        let now = Timestamp::from_millis(now_ms);
        let (state, reaction) = registry::<M>().saga_named(&name)?.react(&state, input.into(), now)?;
        Ok(saga::Reaction {
            state,
            commands: reaction
                .commands
                .into_iter()
                .map(|c| saga::CommandRequest {
                    request_id: c.request_id,
                    aggregate_type: c.aggregate_type,
                    aggregate_id: c.aggregate_id,
                    command_type: c.command_type,
                    payload: c.payload,
                })
                .collect(),
            set_timers: reaction
                .timers_set
                .into_iter()
                .map(|(name, after)| saga::TimerRequest {
                    name,
                    delay_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
                })
                .collect(),
            cancel_timers: reaction.timers_cancelled,
            done: reaction.done,
        })
    }

    fn describe_state(name: String, state: Vec<u8>) -> Result<String, types::DomainError> {
        Ok(registry::<M>().saga_named(&name)?.describe_state(&state)?)
    }
}

impl<M: Module> upcaster::Guest for Exports<M> {
    fn upcast(events: Vec<upcaster::UpcastEvent>) -> Result<Vec<upcaster::UpcastEvent>, types::DomainError> {
        let module = registry::<M>();
        let current = module.event_schemas();
        events
            .into_iter()
            .map(|event| {
                let target = current.get(&event.event_type).copied().unwrap_or(1);
                let (schema_version, payload) =
                    module.upcast_to(&event.event_type, event.schema_version, target, event.payload)?;
                Ok(upcaster::UpcastEvent { event_type: event.event_type, schema_version, payload })
            })
            .collect()
    }
}
