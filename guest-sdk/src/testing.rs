//! Native given/when/then harness: test domain logic with plain `cargo test`
//! — aggregates ([`given`]), projections ([`projection`]) and sagas
//! ([`saga`]).
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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::aggregate::{AggregateAdapter, ErasedAggregate};
use crate::codec;
use crate::projection::{DocumentKey, Documents, ErasedProjection, ProjectionAdapter, ReadModelOp};
use crate::saga::{ErasedSaga, RawSagaInput, Reaction, SagaAdapter};
use crate::{Aggregate, CommandRequest, DomainError, Envelope, Projection, RecordedEvent, Saga, SagaInput, Timestamp};

/// The time of every fixture's first input, and of the events of aggregate
/// and projection tests: 2026-01-01T00:00:00Z.
pub const START: Timestamp = Timestamp::from_millis(1_767_225_600_000);

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
        time: START.to_string(),
        payload,
    }
}

/// Wrap an event in an envelope (stream version 1, at [`START`]), e.g. to
/// test a saga's `correlate`. Set `stream_version` when it matters; a saga
/// fixture stamps the id, position and time itself, as the host does.
pub fn envelope<E>(aggregate_type: &str, aggregate_id: &str, event: E) -> Envelope<E> {
    Envelope {
        id: "test-event".to_owned(),
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        stream_version: 1,
        position: 1,
        time: START.to_string(),
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
    /// Handle a typed command.
    #[track_caller]
    pub fn when(self, command: A::Command) -> AggregateOutcome<A> {
        let (command_type, payload) = codec::encode(&command)
            .unwrap_or_else(|e| panic!("the test command for `{}` must serialize: {e}", A::TYPE));
        self.when_raw(&command_type, &payload)
    }

    /// Handle a command given as wire type and JSON text, as the host would.
    #[track_caller]
    pub fn when_raw(self, command_type: &str, payload: &str) -> AggregateOutcome<A> {
        let adapter = AggregateAdapter::<A>::new();
        let state = folded_state::<A>(&self.history);
        let result = adapter.handle(&state, command_type, payload).map(|events| {
            events
                .iter()
                .map(|e| codec::decode(&e.event_type, &e.payload).expect("produced events must decode"))
                .collect()
        });
        AggregateOutcome { history: self.history, result }
    }

    /// The state the history folds to, as the module renders it.
    #[track_caller]
    pub fn state_json(&self) -> Value {
        state_json::<A>(&self.history)
    }
}

/// `history` folded by `A` from its default state.
#[track_caller]
fn folded_state<A: Aggregate>(history: &[A::Event]) -> Vec<u8> {
    let adapter = AggregateAdapter::<A>::new();
    let events: Vec<RecordedEvent> =
        history.iter().enumerate().map(|(i, e)| record(A::TYPE, "test", i as u64 + 1, i as u64 + 1, e)).collect();
    adapter.apply(&[], &events).unwrap_or_else(|e| panic!("the history of `{}` must fold: {e}", A::TYPE))
}

/// The state `history` folds to, as the module renders it (JSON).
#[track_caller]
fn state_json<A: Aggregate>(history: &[A::Event]) -> Value {
    let adapter = AggregateAdapter::<A>::new();
    let text = adapter
        .describe_state(&folded_state::<A>(history))
        .unwrap_or_else(|e| panic!("the state of `{}` must render: {e}", A::TYPE));
    serde_json::from_str(&text).expect("state renders as JSON")
}

/// What handling a command produced, and the history it was handled on.
pub struct AggregateOutcome<A: Aggregate> {
    history: Vec<A::Event>,
    result: Result<Vec<A::Event>, DomainError>,
}

impl<A: Aggregate> AggregateOutcome<A>
where
    A::Event: Debug,
{
    /// Handle another command on the history and the events this one
    /// produced (it must have been accepted); the `then_expect_*`
    /// assertions then look at the new command alone.
    #[track_caller]
    pub fn when(self, command: A::Command) -> AggregateOutcome<A> {
        self.accepted().when(command)
    }

    /// [`when`](Self::when), with a command given as wire type and JSON text.
    #[track_caller]
    pub fn when_raw(self, command_type: &str, payload: &str) -> AggregateOutcome<A> {
        self.accepted().when_raw(command_type, payload)
    }

    /// The history with this command's events appended.
    #[track_caller]
    fn accepted(self) -> AggregateFixture<A> {
        let mut history = self.history;
        match self.result {
            Ok(events) => history.extend(events),
            Err(error) => panic!(
                "the previous command of `{}` was refused ({error}); a chained `when` needs it accepted",
                A::TYPE
            ),
        }
        AggregateFixture { history }
    }
}

impl<A: Aggregate> AggregateOutcome<A>
where
    A::Event: PartialEq + Debug,
{
    /// Assert the command was accepted with exactly these events.
    #[track_caller]
    pub fn then_expect_events(self, expected: impl IntoIterator<Item = A::Event>) -> Self {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match &self.result {
            Ok(events) => assert_eq!(events, &expected, "unexpected events"),
            Err(error) => panic!("expected events {expected:?}, got error: {error}"),
        }
        self
    }

    /// Assert the command was accepted and the state after its events, as
    /// the module renders it, is `expected`.
    #[track_caller]
    pub fn then_expect_state(self, expected: Value) -> Self {
        let mut history = Vec::new();
        match &self.result {
            Ok(events) => {
                history.extend(self.history.iter().map(clone_event::<A>));
                history.extend(events.iter().map(clone_event::<A>));
            }
            Err(error) => panic!("expected the state {expected}, got error: {error}"),
        }
        assert_eq!(state_json::<A>(&history), expected, "state of `{}` after the command", A::TYPE);
        self
    }

    /// Assert a business-rule rejection (with a code or without) whose
    /// reason contains `reason`.
    #[track_caller]
    pub fn then_expect_rejection(self, reason: &str) {
        match self.result {
            Err(DomainError::Rejected(actual) | DomainError::RejectedWith { message: actual, .. }) => {
                assert!(actual.contains(reason), "rejection `{actual}` does not mention `{reason}`")
            }
            other => panic!("expected a rejection mentioning `{reason}`, got {other:?}"),
        }
    }

    /// Assert a business-rule rejection with the code `code`
    /// ([`DomainError::rejected_with`]).
    #[track_caller]
    pub fn then_expect_rejection_code(self, code: &str) {
        match self.result {
            Err(DomainError::RejectedWith { code: actual, .. }) => {
                assert_eq!(actual, code, "the rejection's code")
            }
            other => panic!("expected a rejection with the code `{code}`, got {other:?}"),
        }
    }

    /// Assert an invalid-input error whose reason contains `reason`.
    #[track_caller]
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

/// A copy of an event through its wire form (events need not be `Clone`).
#[track_caller]
fn clone_event<A: Aggregate>(event: &A::Event) -> A::Event {
    let (event_type, payload) = codec::encode(event).expect("events must serialize");
    codec::decode(&event_type, &payload).expect("events must decode")
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
    #[track_caller]
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
    #[track_caller]
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
    #[track_caller]
    pub fn then_expect_document(self, collection: &str, key: &str, expected: Value) -> Self {
        let actual = self.documents.get(&DocumentKey::new(collection, key));
        assert_eq!(actual, Some(&expected), "document {collection}/{key}");
        self
    }

    /// Assert a document does not exist.
    #[track_caller]
    pub fn then_expect_no_document(self, collection: &str, key: &str) -> Self {
        let actual = self.documents.get(&DocumentKey::new(collection, key));
        assert_eq!(actual, None, "document {collection}/{key} should not exist");
        self
    }

    /// Assert a whole collection: exactly these documents, by key.
    #[track_caller]
    pub fn then_expect_collection<'a>(
        self,
        collection: &str,
        expected: impl IntoIterator<Item = (&'a str, Value)>,
    ) -> Self {
        let expected: BTreeMap<String, Value> =
            expected.into_iter().map(|(key, body)| (key.to_owned(), body)).collect();
        let actual: BTreeMap<String, Value> = self
            .documents
            .iter()
            .filter(|(key, _)| key.collection == collection)
            .map(|(key, body)| (key.key.clone(), body.clone()))
            .collect();
        assert_eq!(actual, expected, "collection {collection} of `{}`", P::NAME);
        self
    }
}

/// An event input for a saga test (see [`envelope`]).
pub fn event<E>(aggregate_type: &str, aggregate_id: &str, event: E) -> SagaInput<E> {
    SagaInput::Event(envelope(aggregate_type, aggregate_id, event))
}

/// The command a saga is expected to send to aggregate `A` (see
/// [`CommandRequest::to`]).
///
/// # Panics
/// When the command does not serialize.
#[track_caller]
pub fn command<A: Aggregate>(request_id: &str, aggregate_id: &str, command: A::Command) -> CommandRequest {
    CommandRequest::to::<A>(request_id, aggregate_id, &command)
        .unwrap_or_else(|e| panic!("expected command for `{}` must serialize: {e}", A::TYPE))
}

/// Start a saga test with a fresh instance, its clock at [`START`].
///
/// The fixture plays the host: it delivers each input with a time, keeps
/// the instance's state, the commands awaiting an outcome and the pending
/// timers, and refuses (panics on) inputs the host would never deliver —
/// a first input that is not a starting event, an event that does not
/// correlate to the instance, an outcome for a request that is not awaiting
/// one, a timer that is not pending, anything after the instance is done —
/// and reactions that break the contract (a request id used twice).
///
/// Times: every input comes at the fixture's clock, except a timer, which
/// comes at its due time (the clock moves there if it was earlier);
/// [`SagaFixture::after`] moves the clock on. Like the host, the fixture
/// stamps each event it delivers: its id, global position and `time` (the
/// clock's) replace the envelope's.
///
/// # Panics
/// When the saga's `STARTED_BY` names a variant its `Event` enum lacks.
#[track_caller]
pub fn saga<S: Saga>() -> SagaFixture<S>
where
    S::Event: Serialize,
{
    let adapter = SagaAdapter::new();
    adapter.starting_event_types();
    SagaFixture {
        adapter,
        state: Vec::new(),
        clock: START,
        instance: None,
        awaiting: BTreeSet::new(),
        request_ids: BTreeSet::new(),
        timers: BTreeMap::new(),
        done: false,
        position: 0,
    }
}

/// A saga instance, as the host would keep it.
pub struct SagaFixture<S: Saga> {
    adapter: SagaAdapter<S>,
    state: Vec<u8>,
    clock: Timestamp,
    /// The id the first event correlated to.
    instance: Option<String>,
    /// Request ids of commands sent whose outcome has not been delivered.
    awaiting: BTreeSet<String>,
    /// Every request id the instance has used.
    request_ids: BTreeSet<String>,
    /// Pending timers and their due times.
    timers: BTreeMap<String, Timestamp>,
    done: bool,
    /// Global position of the last event delivered.
    position: u64,
}

impl<S: Saga> SagaFixture<S>
where
    S::Event: Serialize,
{
    /// Which instances an event correlates to.
    #[track_caller]
    pub fn correlate(&self, event: Envelope<S::Event>) -> Vec<String> {
        let recorded = self.recorded(event, self.position + 1);
        self.adapter.correlate(&recorded).unwrap_or_else(|e| panic!("saga `{}` failed to correlate: {e}", S::NAME))
    }

    /// Move the clock on: the next inputs come `elapsed` later.
    pub fn after(mut self, elapsed: Duration) -> Self {
        self.clock = self.clock + elapsed;
        self
    }

    /// Feed inputs the instance has already reacted to.
    ///
    /// # Panics
    /// When the saga fails on one of them, or the host would not deliver it.
    #[track_caller]
    pub fn given(mut self, inputs: impl IntoIterator<Item = SagaInput<S::Event>>) -> Self {
        for input in inputs {
            if let Err(error) = self.deliver(input) {
                panic!("saga `{}` failed on a given input: {error}", S::NAME);
            }
        }
        self
    }

    /// React to one input; assert on what it did with the `then_expect_*`
    /// methods of the result.
    ///
    /// # Panics
    /// When the host would not deliver the input.
    #[track_caller]
    pub fn when(mut self, input: SagaInput<S::Event>) -> SagaOutcome<S> {
        let result = self.deliver(input).map(|reaction| {
            let state = codec::decode_state(&self.state).expect("a state the saga just encoded decodes");
            (state, reaction)
        });
        SagaOutcome { result }
    }

    fn recorded(&self, event: Envelope<S::Event>, position: u64) -> RecordedEvent {
        let mut recorded =
            record(&event.aggregate_type, &event.aggregate_id, event.stream_version, position, &event.event);
        recorded.time = self.clock.to_string();
        recorded
    }

    /// Deliver one input as the host would, and keep what the reaction
    /// changed.
    #[track_caller]
    fn deliver(&mut self, input: SagaInput<S::Event>) -> Result<Reaction, DomainError> {
        let name = S::NAME;
        assert!(!self.done, "saga `{name}` is done: the host delivers nothing more to it, got {}", describe(&input));
        if self.instance.is_none() && !matches!(input, SagaInput::Event(_)) {
            panic!("saga `{name}`: the first input must be an event that starts it, got {}", describe(&input));
        }
        let raw = match input {
            SagaInput::Event(event) => {
                self.position += 1;
                let recorded = self.recorded(event, self.position);
                self.check_correlation(&recorded);
                RawSagaInput::Event(recorded)
            }
            SagaInput::Outcome { request_id, result } => {
                assert!(
                    self.awaiting.remove(&request_id),
                    "saga `{name}`: no command with request id `{request_id}` awaits an outcome (awaiting: {:?})",
                    self.awaiting
                );
                RawSagaInput::Outcome { request_id, result }
            }
            SagaInput::Timer { name: timer } => {
                let Some(due) = self.timers.remove(&timer) else {
                    panic!("saga `{name}`: timer `{timer}` is not pending (pending: {:?})", self.timers.keys())
                };
                self.clock = self.clock.max(due);
                RawSagaInput::Timer { name: timer }
            }
            SagaInput::Cancelled { reason } => RawSagaInput::Cancelled { reason },
        };
        let (state, reaction) = self.adapter.react(&self.state, raw, self.clock)?;
        self.state = state;
        for command in &reaction.commands {
            assert!(
                self.request_ids.insert(command.request_id.clone()),
                "saga `{name}` used request id `{}` twice: it must be unique within the instance",
                command.request_id
            );
            self.awaiting.insert(command.request_id.clone());
        }
        for timer in &reaction.timers_cancelled {
            self.timers.remove(timer);
        }
        for (timer, after) in &reaction.timers_set {
            self.timers.insert(timer.clone(), self.clock + *after);
        }
        if reaction.done {
            self.done = true;
            self.timers.clear();
        }
        Ok(reaction)
    }

    /// The host delivers an event only to the instances it correlates to;
    /// the first one creates the instance, and must be of a starting type.
    #[track_caller]
    fn check_correlation(&mut self, event: &RecordedEvent) {
        let name = S::NAME;
        let ids = self
            .adapter
            .correlate(event)
            .unwrap_or_else(|e| panic!("saga `{name}` failed to correlate `{}`: {e}", event.event_type));
        match &self.instance {
            Some(instance) => assert!(
                ids.contains(instance),
                "saga `{name}`: `{}` correlates to {ids:?}, not to this instance `{instance}`: the host would not \
                 deliver it",
                event.event_type
            ),
            None => {
                assert!(
                    S::STARTED_BY.contains(&event.event_type.as_str()),
                    "saga `{name}`: the first input must be an event that starts it ({:?}), got `{}`",
                    S::STARTED_BY,
                    event.event_type
                );
                let Some(first) = ids.into_iter().next() else {
                    panic!("saga `{name}`: starting event `{}` correlates to no instance", event.event_type)
                };
                self.instance = Some(first);
            }
        }
    }
}

/// A short description of an input, for the harness's messages.
fn describe<E>(input: &SagaInput<E>) -> String {
    match input {
        SagaInput::Event(event) => format!("an event of {} `{}`", event.aggregate_type, event.aggregate_id),
        SagaInput::Outcome { request_id, .. } => format!("the outcome of `{request_id}`"),
        SagaInput::Timer { name } => format!("timer `{name}`"),
        SagaInput::Cancelled { reason } => format!("a cancel ({reason})"),
    }
}

/// What a saga did with one input: its new state and reaction, or its
/// error. The `then_expect_*` methods chain.
pub struct SagaOutcome<S: Saga> {
    result: Result<(S, Reaction), DomainError>,
}

impl<S: Saga> SagaOutcome<S> {
    #[track_caller]
    fn reacted(&self) -> &(S, Reaction) {
        match &self.result {
            Ok(reacted) => reacted,
            Err(error) => panic!("saga `{}` failed: {error}", S::NAME),
        }
    }

    /// Assert the commands it sent, in order (build them with [`command`]).
    #[track_caller]
    pub fn then_expect_commands(self, expected: impl IntoIterator<Item = CommandRequest>) -> Self {
        let expected: Vec<CommandRequest> = expected.into_iter().collect();
        assert_eq!(self.reacted().1.commands, expected, "commands sent by saga `{}`", S::NAME);
        self
    }

    /// Assert the timers it set: name and delay from the input's time.
    #[track_caller]
    pub fn then_expect_timers<'a>(self, expected: impl IntoIterator<Item = (&'a str, Duration)>) -> Self {
        let expected: Vec<(String, Duration)> =
            expected.into_iter().map(|(name, after)| (name.to_owned(), after)).collect();
        assert_eq!(self.reacted().1.timers_set, expected, "timers set by saga `{}`", S::NAME);
        self
    }

    /// Assert the timers it cancelled.
    #[track_caller]
    pub fn then_expect_cancelled_timers<'a>(self, expected: impl IntoIterator<Item = &'a str>) -> Self {
        let expected: Vec<String> = expected.into_iter().map(str::to_owned).collect();
        assert_eq!(self.reacted().1.timers_cancelled, expected, "timers cancelled by saga `{}`", S::NAME);
        self
    }

    /// Assert its state after the reaction.
    #[track_caller]
    pub fn then_expect_state(self, expected: S) -> Self
    where
        S: PartialEq + Debug,
    {
        assert_eq!(self.reacted().0, expected, "state of saga `{}`", S::NAME);
        self
    }

    /// Assert the instance finished.
    #[track_caller]
    pub fn then_expect_done(self) -> Self {
        assert!(self.reacted().1.done, "saga `{}` should be done", S::NAME);
        self
    }

    /// Assert the instance goes on.
    #[track_caller]
    pub fn then_expect_running(self) -> Self {
        assert!(!self.reacted().1.done, "saga `{}` should not be done", S::NAME);
        self
    }

    /// Assert it failed with an error whose reason contains `reason`.
    #[track_caller]
    pub fn then_expect_error(self, reason: &str) {
        match self.result {
            Err(error) => assert!(error.to_string().contains(reason), "error `{error}` does not mention `{reason}`"),
            Ok((_, reaction)) => panic!("expected saga `{}` to fail mentioning `{reason}`, got {reaction:?}", S::NAME),
        }
    }

    /// The new state and reaction (or the error), for assertions the
    /// helpers don't cover.
    pub fn result(self) -> Result<(S, Reaction), DomainError> {
        self.result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Default, Serialize, Deserialize)]
    struct Lamp {
        on: bool,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum LampCommand {
        Switch {},
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum LampEvent {
        SwitchedOn {},
        SwitchedOff {},
    }

    impl Aggregate for Lamp {
        const TYPE: &'static str = "lamp";
        type Command = LampCommand;
        type Event = LampEvent;

        fn handle(&self, _: LampCommand) -> Result<Vec<LampEvent>, DomainError> {
            Ok(vec![if self.on { LampEvent::SwitchedOff {} } else { LampEvent::SwitchedOn {} }])
        }

        fn apply(&mut self, event: LampEvent) {
            self.on = event == LampEvent::SwitchedOn {};
        }
    }

    /// The line a panic inside `run` was reported at (on this thread).
    fn panic_line(run: impl FnOnce() + std::panic::UnwindSafe) -> u32 {
        let seen = Arc::new(Mutex::new(None));
        let previous: Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync> = Arc::from(std::panic::take_hook());
        let this_thread = std::thread::current().id();
        {
            let (seen, previous) = (seen.clone(), previous.clone());
            std::panic::set_hook(Box::new(move |info| match info.location() {
                Some(location) if std::thread::current().id() == this_thread => {
                    *seen.lock().unwrap() = Some(location.line());
                }
                _ => previous(info),
            }));
        }
        let outcome = std::panic::catch_unwind(run);
        std::panic::set_hook(Box::new(move |info| previous(info)));
        assert!(outcome.is_err(), "the assertion should have failed");
        seen.lock().unwrap().expect("a panic location")
    }

    #[test]
    fn a_failing_assertion_points_at_the_test_line() {
        let line = line!() + 1;
        let reported = panic_line(|| drop(given::<Lamp>([]).when(LampCommand::Switch {}).then_expect_events([])));
        assert_eq!(reported, line);
        let line = line!() + 2;
        let reported = panic_line(|| {
            given::<Lamp>([]).when(LampCommand::Switch {}).then_expect_state(serde_json::json!({"on": false}));
        });
        assert_eq!(reported, line);
    }

    #[test]
    fn chained_commands_see_the_events_before_them() {
        given::<Lamp>([LampEvent::SwitchedOn {}])
            .when(LampCommand::Switch {})
            .then_expect_events([LampEvent::SwitchedOff {}])
            .when(LampCommand::Switch {})
            .then_expect_events([LampEvent::SwitchedOn {}])
            .then_expect_state(serde_json::json!({"on": true}));
    }
}
