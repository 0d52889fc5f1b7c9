//! Sagas (process managers): typed reactions and their type-erased adapter.
//!
//! A saga instance is addressed by the id `correlate` returns for an event.
//! It reacts to events, to the outcomes of the commands it sent (which is how
//! it compensates) and to its timers, and answers with a [`Reaction`].

use std::marker::PhantomData;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::{DomainError, Envelope, RecordedEvent};

/// What became of a command a saga sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandResult {
    /// Appended at this stream version.
    Accepted(u64),
    /// Refused, with the reason.
    Rejected(String),
}

/// One input to a saga instance.
#[derive(Debug, Clone, PartialEq)]
pub enum SagaInput<E> {
    Event(Envelope<E>),
    Outcome { request_id: String, result: CommandResult },
    Timer { name: String },
}

/// A command a saga asks the host to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRequest {
    pub request_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub command_type: String,
    pub payload: String,
}

/// What a saga instance does in response to one input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaction {
    pub commands: Vec<CommandRequest>,
    pub set_timers: Vec<(String, Duration)>,
    pub cancel_timers: Vec<String>,
    pub done: bool,
}

impl Reaction {
    /// Send a typed command (an aggregate's `Command` value). `request_id`
    /// must be unique within the instance; the outcome comes back with it.
    pub fn send<C: Serialize>(
        &mut self,
        request_id: impl Into<String>,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        command: &C,
    ) -> Result<(), DomainError> {
        let (command_type, payload) = codec::encode(command)?;
        self.commands.push(CommandRequest {
            request_id: request_id.into(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            command_type,
            payload,
        });
        Ok(())
    }

    /// Set (or replace) a named timer, relative to the input's time.
    pub fn set_timer(&mut self, name: impl Into<String>, after: Duration) {
        self.set_timers.push((name.into(), after));
    }

    /// Cancel a named timer.
    pub fn cancel_timer(&mut self, name: impl Into<String>) {
        self.cancel_timers.push(name.into());
    }

    /// Mark the instance finished.
    pub fn complete(&mut self) {
        self.done = true;
    }
}

/// A long-running process. `Self` is the per-instance state (JSON blob).
pub trait Saga: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Saga name, unique across all modules.
    const NAME: &'static str;
    /// Event types (variant names of `Event`) that may start an instance.
    const STARTED_BY: &'static [&'static str];
    /// The events it listens to.
    type Event: DeserializeOwned;

    /// The instance an event belongs to, or `None` to ignore it.
    fn correlate(event: &Envelope<Self::Event>) -> Option<String>;

    /// React to one input.
    fn react(&mut self, input: SagaInput<Self::Event>, reaction: &mut Reaction) -> Result<(), DomainError>;
}

/// A saga input before the event inside it is decoded.
pub(crate) enum RawSagaInput {
    Event(RecordedEvent),
    Outcome { request_id: String, result: CommandResult },
    Timer { name: String },
}

pub(crate) trait ErasedSaga: Send + Sync {
    fn name(&self) -> &'static str;
    fn starting_event_types(&self) -> Vec<String>;
    fn event_types(&self) -> Vec<String>;
    fn correlate(&self, event: &RecordedEvent) -> Result<Option<String>, DomainError>;
    fn react(&self, state: &[u8], input: RawSagaInput) -> Result<(Vec<u8>, Reaction), DomainError>;
}

pub(crate) struct SagaAdapter<S>(PhantomData<fn() -> S>);

impl<S> SagaAdapter<S> {
    pub(crate) fn new() -> Self {
        Self(PhantomData)
    }
}

impl<S: Saga> ErasedSaga for SagaAdapter<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn starting_event_types(&self) -> Vec<String> {
        S::STARTED_BY.iter().map(|name| (*name).to_owned()).collect()
    }

    fn event_types(&self) -> Vec<String> {
        codec::variant_names::<S::Event>()
    }

    fn correlate(&self, event: &RecordedEvent) -> Result<Option<String>, DomainError> {
        Ok(S::correlate(&Envelope::decode(event)?))
    }

    fn react(&self, state: &[u8], input: RawSagaInput) -> Result<(Vec<u8>, Reaction), DomainError> {
        let mut saga: S = codec::decode_state(state)?;
        let input = match input {
            RawSagaInput::Event(event) => SagaInput::Event(Envelope::decode(&event)?),
            RawSagaInput::Outcome { request_id, result } => SagaInput::Outcome { request_id, result },
            RawSagaInput::Timer { name } => SagaInput::Timer { name },
        };
        let mut reaction = Reaction::default();
        saga.react(input, &mut reaction)?;
        Ok((codec::encode_state(&saga)?, reaction))
    }
}
