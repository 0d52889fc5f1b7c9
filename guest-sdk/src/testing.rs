//! Native given/when/then harness: test domain logic with plain `cargo test`.
//!
//! Every fixture drives the module through the same encode → erased adapter
//! → decode path the wasm exports use, so a serde naming mistake fails here
//! exactly as it would in the host.
//!
//! ```
//! # use orchestrix_guest::{Aggregate, DomainError};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Default, Serialize, Deserialize)] struct Door { open: bool }
//! # #[derive(Debug, PartialEq, Serialize, Deserialize)] enum Cmd { Open {} }
//! # #[derive(Debug, PartialEq, Serialize, Deserialize)] enum Ev { Opened {} }
//! # impl Aggregate for Door {
//! #     const TYPE: &'static str = "door";
//! #     type Command = Cmd;
//! #     type Event = Ev;
//! #     fn handle(&self, _: Cmd) -> Result<Vec<Ev>, DomainError> {
//! #         if self.open { Err(DomainError::rejected("already open")) } else { Ok(vec![Ev::Opened {}]) }
//! #     }
//! #     fn apply(&mut self, _: Ev) { self.open = true; }
//! # }
//! use orchestrix_guest::testing::given;
//!
//! given::<Door>([]).when(Cmd::Open {}).then_expect_events([Ev::Opened {}]);
//! given::<Door>([Ev::Opened {}]).when(Cmd::Open {}).then_expect_rejection("already open");
//! ```

use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::Serialize;
use serde_json::Value;

use crate::aggregate::{AggregateAdapter, ErasedAggregate};
use crate::codec;
use crate::projection::{DocumentKey, Documents, ErasedProjection, ProjectionAdapter, ReadModelOp};
use crate::saga::{ErasedSaga, RawSagaInput, Reaction, SagaAdapter};
use crate::{Aggregate, DomainError, Envelope, Projection, RecordedEvent, Saga, SagaInput};

const TEST_TIME: &str = "2026-01-01T00:00:00Z";

fn record<E: Serialize>(
    aggregate_type: &str,
    aggregate_id: &str,
    stream_version: u64,
    position: u64,
    event: &E,
) -> RecordedEvent {
    let (event_type, payload) = codec::encode(event).expect("test event must serialize");
    RecordedEvent {
        id: format!("test-{position}"),
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        stream_version,
        position,
        event_type,
        schema_version: 1,
        time: TEST_TIME.to_owned(),
        payload,
    }
}

/// Wrap an event in an envelope for saga inputs.
pub fn envelope<E>(aggregate_type: &str, aggregate_id: &str, event: E) -> Envelope<E> {
    Envelope {
        id: "test-event".to_owned(),
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        stream_version: 1,
        position: 1,
        time: TEST_TIME.to_owned(),
        event,
    }
}

/// Start an aggregate test from its history.
pub fn given<A: Aggregate>(history: impl IntoIterator<Item = A::Event>) -> AggregateFixture<A> {
    AggregateFixture { history: history.into_iter().collect() }
}

/// An aggregate with a known history.
pub struct AggregateFixture<A: Aggregate> {
    history: Vec<A::Event>,
}

impl<A: Aggregate> AggregateFixture<A> {
    fn folded_state(&self) -> Vec<u8> {
        let adapter = AggregateAdapter::<A>::new();
        let events: Vec<RecordedEvent> = self
            .history
            .iter()
            .enumerate()
            .map(|(i, e)| record(A::TYPE, "test", i as u64 + 1, i as u64 + 1, e))
            .collect();
        adapter.apply(&[], &events).expect("history must fold")
    }

    /// Handle a typed command.
    pub fn when(self, command: A::Command) -> AggregateOutcome<A> {
        let (command_type, payload) = codec::encode(&command).expect("test command must serialize");
        self.when_raw(&command_type, &payload)
    }

    /// Handle a command given as wire type and JSON text, as the host would.
    pub fn when_raw(self, command_type: &str, payload: &str) -> AggregateOutcome<A> {
        let adapter = AggregateAdapter::<A>::new();
        let state = self.folded_state();
        let result = adapter.handle(&state, command_type, payload).map(|events| {
            events
                .iter()
                .map(|e| codec::decode(&e.event_type, &e.payload).expect("produced events must decode"))
                .collect()
        });
        AggregateOutcome { result }
    }

    /// The state the history folds to, as the module renders it.
    pub fn state_json(&self) -> Value {
        let adapter = AggregateAdapter::<A>::new();
        let text = adapter.describe_state(&self.folded_state()).expect("state must render");
        serde_json::from_str(&text).expect("state renders as JSON")
    }
}

/// What handling a command produced.
pub struct AggregateOutcome<A: Aggregate> {
    result: Result<Vec<A::Event>, DomainError>,
}

impl<A: Aggregate> AggregateOutcome<A>
where
    A::Event: PartialEq + Debug,
{
    /// Assert the command was accepted with exactly these events.
    pub fn then_expect_events(self, expected: impl IntoIterator<Item = A::Event>) {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => assert_eq!(events, expected, "unexpected events"),
            Err(error) => panic!("expected events {expected:?}, got error: {error}"),
        }
    }

    /// Assert a business-rule rejection whose reason contains `reason`.
    pub fn then_expect_rejection(self, reason: &str) {
        match self.result {
            Err(DomainError::Rejected(actual)) => {
                assert!(actual.contains(reason), "rejection `{actual}` does not mention `{reason}`")
            }
            other => panic!("expected a rejection mentioning `{reason}`, got {other:?}"),
        }
    }

    /// Assert an invalid-input error whose reason contains `reason`.
    pub fn then_expect_invalid(self, reason: &str) {
        match self.result {
            Err(DomainError::Invalid(actual)) => {
                assert!(actual.contains(reason), "invalid-input error `{actual}` does not mention `{reason}`")
            }
            other => panic!("expected an invalid-input error mentioning `{reason}`, got {other:?}"),
        }
    }

    /// The raw result, for assertions the helpers don't cover.
    pub fn result(self) -> Result<Vec<A::Event>, DomainError> {
        self.result
    }
}

/// Start a projection test with empty read models.
pub fn projection<P: Projection>() -> ProjectionFixture<P>
where
    P::Event: Serialize,
{
    ProjectionFixture { adapter: ProjectionAdapter::new(), documents: BTreeMap::new(), position: 0 }
}

/// A projection and the documents it has written so far.
pub struct ProjectionFixture<P: Projection> {
    adapter: ProjectionAdapter<P>,
    documents: BTreeMap<DocumentKey, Value>,
    position: u64,
}

impl<P: Projection> ProjectionFixture<P>
where
    P::Event: Serialize,
{
    /// Project these events of one stream, as one batch.
    pub fn given(
        mut self,
        aggregate_type: &str,
        aggregate_id: &str,
        events: impl IntoIterator<Item = P::Event>,
    ) -> Self {
        let batch: Vec<RecordedEvent> = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                self.position += 1;
                record(aggregate_type, aggregate_id, i as u64 + 1, self.position, &e)
            })
            .collect();
        self.run(&batch).unwrap_or_else(|e| panic!("projection `{}` failed: {e}", P::NAME));
        self
    }

    /// Project events and expect the projection to fail.
    pub fn given_failing(mut self, aggregate_type: &str, aggregate_id: &str, event: P::Event) -> DomainError {
        self.position += 1;
        let batch = [record(aggregate_type, aggregate_id, 1, self.position, &event)];
        match self.run(&batch) {
            Err(error) => error,
            Ok(()) => panic!("expected projection `{}` to fail", P::NAME),
        }
    }

    fn run(&mut self, batch: &[RecordedEvent]) -> Result<(), DomainError> {
        let keys = self.adapter.touches(batch.to_vec())?;
        let loaded = keys.into_iter().map(|k| {
            let body = self.documents.get(&k).cloned();
            (k, body)
        });
        let mut documents = Documents::new(loaded);
        self.adapter.project(batch.to_vec(), &mut documents)?;
        let ops = documents.into_ops();
        for op in ops {
            match op {
                ReadModelOp::Upsert(key, body) => {
                    self.documents.insert(key, serde_json::from_str(&body).expect("upserted JSON"));
                }
                ReadModelOp::Delete(key) => {
                    self.documents.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// Assert a document's body.
    pub fn then_expect_document(self, collection: &str, key: &str, expected: Value) -> Self {
        let actual = self.documents.get(&DocumentKey::new(collection, key));
        assert_eq!(actual, Some(&expected), "document {collection}/{key}");
        self
    }

    /// Assert a document does not exist.
    pub fn then_expect_no_document(self, collection: &str, key: &str) -> Self {
        let actual = self.documents.get(&DocumentKey::new(collection, key));
        assert_eq!(actual, None, "document {collection}/{key} should not exist");
        self
    }
}

/// Start a saga test with a fresh instance.
pub fn saga<S: Saga>() -> SagaFixture<S>
where
    S::Event: Serialize,
{
    SagaFixture { adapter: SagaAdapter::new(), state: Vec::new() }
}

/// A saga instance and its state.
pub struct SagaFixture<S: Saga> {
    adapter: SagaAdapter<S>,
    state: Vec<u8>,
}

impl<S: Saga> SagaFixture<S>
where
    S::Event: Serialize,
{
    fn raw(input: SagaInput<S::Event>) -> RawSagaInput {
        match input {
            SagaInput::Event(e) => {
                let mut recorded = record(&e.aggregate_type, &e.aggregate_id, e.stream_version, e.position, &e.event);
                recorded.id = e.id;
                recorded.time = e.time;
                RawSagaInput::Event(recorded)
            }
            SagaInput::Outcome { request_id, result } => RawSagaInput::Outcome { request_id, result },
            SagaInput::Timer { name } => RawSagaInput::Timer { name },
        }
    }

    /// Which instance an event correlates to.
    pub fn correlate(&self, event: Envelope<S::Event>) -> Option<String> {
        let RawSagaInput::Event(recorded) = Self::raw(SagaInput::Event(event)) else { unreachable!() };
        self.adapter.correlate(&recorded).expect("correlate must succeed")
    }

    /// Feed inputs the instance has already seen.
    pub fn given(mut self, inputs: impl IntoIterator<Item = SagaInput<S::Event>>) -> Self {
        for input in inputs {
            let (state, _) = self
                .adapter
                .react(&self.state, Self::raw(input))
                .unwrap_or_else(|e| panic!("saga `{}` failed on a given input: {e}", S::NAME));
            self.state = state;
        }
        self
    }

    /// React to one input and return the reaction (or the error).
    pub fn when(self, input: SagaInput<S::Event>) -> Result<Reaction, DomainError> {
        self.adapter.react(&self.state, Self::raw(input)).map(|(_, reaction)| reaction)
    }
}
