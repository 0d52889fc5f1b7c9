//! Sagas (process managers): the typed trait, its inputs and reactions, and
//! the type-erased adapter.
//!
//! A saga instance is addressed by the ids `correlate` returns for an event
//! (an event of a starting type creates the instance). It reacts to one
//! input at a time — an event, the outcome of a command it sent (which is
//! how it compensates), one of its timers, or an operator's cancel — at the
//! time the host stamps on that input, and answers with a [`Reaction`].

use std::marker::PhantomData;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::{Aggregate, DomainError, Envelope, RecordedEvent, Timestamp};

/// What became of a command a saga sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandResult {
    /// Appended; `version` is the stream version of the last event it
    /// appended (the stream's version when it appended none).
    Accepted { version: u64 },
    /// Refused and nothing appended: the reason, and the HTTP status the
    /// same command would have got from the host's API (422 a business
    /// rule, 400 invalid, 404 unknown aggregate or command type, 409
    /// conflict, 503 unavailable or quarantined, 500 module failure).
    Rejected { reason: String, code: u16 },
}

/// One input to a saga instance.
#[derive(Debug, Clone, PartialEq)]
pub enum SagaInput<E> {
    /// A subscribed event that `correlate` mapped to this instance. Its
    /// time is the event's commit time.
    Event(Envelope<E>),
    /// The outcome of a command this instance sent, under the request id it
    /// was sent with.
    Outcome { request_id: String, result: CommandResult },
    /// A timer of this instance came due. Its time is the due time.
    Timer { name: String },
    /// An operator asked to cancel the instance. It is up to the saga what
    /// that means (typically: compensate, then [`Reaction::complete`]).
    Cancelled { reason: String },
}

impl<E> SagaInput<E> {
    /// The outcome of an accepted command.
    pub fn accepted(request_id: impl Into<String>, version: u64) -> Self {
        Self::Outcome { request_id: request_id.into(), result: CommandResult::Accepted { version } }
    }

    /// The outcome of a refused command.
    pub fn rejected(request_id: impl Into<String>, reason: impl Into<String>, code: u16) -> Self {
        Self::Outcome { request_id: request_id.into(), result: CommandResult::Rejected { reason: reason.into(), code } }
    }

    /// A timer firing.
    pub fn timer(name: impl Into<String>) -> Self {
        Self::Timer { name: name.into() }
    }

    /// An operator's cancel.
    pub fn cancelled(reason: impl Into<String>) -> Self {
        Self::Cancelled { reason: reason.into() }
    }
}

/// A command a saga asks the host to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRequest {
    /// Unique within the instance for its whole life: the outcome comes
    /// back under it, and the host derives the command's idempotency key
    /// from it.
    pub request_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub command_type: String,
    /// The command body (JSON).
    pub payload: String,
}

impl CommandRequest {
    /// A command for aggregate `A` (one of this crate's aggregates).
    pub fn to<A: Aggregate>(
        request_id: impl Into<String>,
        aggregate_id: impl Into<String>,
        command: &A::Command,
    ) -> Result<Self, DomainError> {
        Self::to_type(A::TYPE, request_id, aggregate_id, command)
    }

    /// A command for an aggregate type named by its string, e.g. another
    /// module's (`command` is an enum shaped like that aggregate's commands:
    /// the variant name is the command type, its fields the body).
    pub fn to_type<C: Serialize>(
        aggregate_type: &str,
        request_id: impl Into<String>,
        aggregate_id: impl Into<String>,
        command: &C,
    ) -> Result<Self, DomainError> {
        let (command_type, payload) = codec::encode(command)?;
        Ok(Self {
            request_id: request_id.into(),
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.into(),
            command_type,
            payload,
        })
    }
}

/// What a saga instance does in response to one input: commands to send,
/// timers to set or cancel, and whether it is finished. (Its new state is
/// the saga value itself after `react`.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaction {
    pub(crate) commands: Vec<CommandRequest>,
    pub(crate) timers_set: Vec<(String, Duration)>,
    pub(crate) timers_cancelled: Vec<String>,
    pub(crate) done: bool,
}

impl Reaction {
    /// Send a command to aggregate `A` of this crate; its type comes from
    /// `A::TYPE`. `request_id` must be unique within the instance for its
    /// whole life; the outcome comes back under it.
    pub fn send<A: Aggregate>(
        &mut self,
        request_id: impl Into<String>,
        aggregate_id: impl Into<String>,
        command: &A::Command,
    ) -> Result<(), DomainError> {
        self.commands.push(CommandRequest::to::<A>(request_id, aggregate_id, command)?);
        Ok(())
    }

    /// Send a command to an aggregate type named by its string, e.g. one of
    /// another module (see [`CommandRequest::to_type`]).
    pub fn send_to<C: Serialize>(
        &mut self,
        aggregate_type: &str,
        request_id: impl Into<String>,
        aggregate_id: impl Into<String>,
        command: &C,
    ) -> Result<(), DomainError> {
        self.commands.push(CommandRequest::to_type(aggregate_type, request_id, aggregate_id, command)?);
        Ok(())
    }

    /// Set (or replace) a named timer, due `after` the time of the input
    /// being reacted to. Millisecond precision.
    pub fn set_timer(&mut self, name: impl Into<String>, after: Duration) {
        self.timers_set.push((name.into(), after));
    }

    /// Cancel a named timer (one that is not pending is fine). The host
    /// applies cancellations before the timers set by the same reaction.
    pub fn cancel_timer(&mut self, name: impl Into<String>) {
        self.timers_cancelled.push(name.into());
    }

    /// Mark the instance finished: it gets no more inputs and its pending
    /// timers are dropped. The commands of this reaction are still sent;
    /// their outcomes are not delivered.
    pub fn complete(&mut self) {
        self.done = true;
    }

    /// The commands to send, in order.
    pub fn commands(&self) -> &[CommandRequest] {
        &self.commands
    }

    /// The timers to set: name and delay from the input's time.
    pub fn timers_set(&self) -> &[(String, Duration)] {
        &self.timers_set
    }

    /// The names of the timers to cancel.
    pub fn timers_cancelled(&self) -> &[String] {
        &self.timers_cancelled
    }

    /// Whether the instance is finished.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// A long-running process that coordinates aggregates. `Self` is the
/// per-instance state (the SDK stores it as JSON; `Default` is a new
/// instance's).
///
/// `Event` is an enum of the events it subscribes to, named like a
/// projection's (see [`Projection::Event`](crate::Projection::Event)): the
/// event enum of one of the module's aggregates, or any enum registered with
/// [`ModuleBuilder::saga_of`](crate::ModuleBuilder::saga_of) naming whose
/// events they are (another module's: `"bank.account"`).
///
/// Both functions must be pure, like everything in a module: the time is
/// the `now` the host passes, never a clock.
///
/// ```
/// # use orchestrix_guest::{Aggregate, DomainError};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Default, Serialize, Deserialize)] pub struct Seat { held: bool }
/// # #[derive(Debug, PartialEq, Serialize, Deserialize)] pub enum SeatCommand { Release {} }
/// # #[derive(Debug, PartialEq, Serialize, Deserialize)] pub enum SeatEvent { SeatHeld {}, SeatBooked {}, SeatReleased {} }
/// # impl Aggregate for Seat {
/// #     const TYPE: &'static str = "seat";
/// #     type Command = SeatCommand;
/// #     type Event = SeatEvent;
/// #     fn handle(&self, _: SeatCommand) -> Result<Vec<SeatEvent>, DomainError> { Ok(vec![SeatEvent::SeatReleased {}]) }
/// #     fn apply(&mut self, event: SeatEvent) { self.held = event == SeatEvent::SeatHeld {}; }
/// # }
/// use std::time::Duration;
///
/// use orchestrix_guest::{CommandResult, Envelope, Reaction, Saga, SagaInput, Timestamp, log};
///
/// /// Releases a held seat that is not booked within 15 minutes.
/// #[derive(Default, Serialize, Deserialize)]
/// pub struct SeatHold {
///     seat: String,
///     held_at: Option<Timestamp>,
///     releasing: bool,
/// }
///
/// impl Saga for SeatHold {
///     const NAME: &'static str = "seat_hold";
///     const STARTED_BY: &'static [&'static str] = &["SeatHeld"];
///     type Event = SeatEvent; // the `seat` aggregate's: subscribes to seat.SeatHeld, seat.SeatBooked, …
///
///     fn correlate(event: &Envelope<SeatEvent>) -> Vec<String> {
///         vec![event.aggregate_id.clone()] // one instance per seat
///     }
///
///     fn react(&mut self, input: SagaInput<SeatEvent>, now: Timestamp, reaction: &mut Reaction) -> Result<(), DomainError> {
///         match input {
///             SagaInput::Event(Envelope { aggregate_id, event: SeatEvent::SeatHeld {}, .. }) => {
///                 self.seat = aggregate_id;
///                 self.held_at = Some(now); // the input's time, from the host
///                 reaction.set_timer("expiry", Duration::from_secs(15 * 60));
///             }
///             SagaInput::Event(Envelope { event: SeatEvent::SeatBooked {}, .. }) => {
///                 reaction.cancel_timer("expiry");
///                 reaction.complete();
///             }
///             SagaInput::Timer { .. } | SagaInput::Cancelled { .. } if !self.releasing => {
///                 self.releasing = true;
///                 reaction.send::<Seat>("release", &self.seat, &SeatCommand::Release {})?;
///             }
///             SagaInput::Outcome { result: CommandResult::Rejected { reason, code }, .. } => {
///                 log::warn("release refused", &[("seat", &self.seat), ("code", &code), ("reason", &reason)]);
///                 reaction.complete();
///             }
///             SagaInput::Outcome { .. } => reaction.complete(),
///             _ => {}
///         }
///         Ok(())
///     }
/// }
///
/// use orchestrix_guest::testing::{command, event, saga};
///
/// saga::<SeatHold>()
///     .given([event("seat", "12A", SeatEvent::SeatHeld {})])
///     .when(SagaInput::timer("expiry")) // comes at its due time
///     .then_expect_commands([command::<Seat>("release", "12A", SeatCommand::Release {})])
///     .then_expect_running();
/// saga::<SeatHold>()
///     .given([event("seat", "12A", SeatEvent::SeatHeld {})])
///     .when(event("seat", "12A", SeatEvent::SeatBooked {}))
///     .then_expect_cancelled_timers(["expiry"])
///     .then_expect_done();
/// ```
pub trait Saga: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Saga name, unique across all modules.
    const NAME: &'static str;
    /// Event types (variant names of `Event`) that start an instance: when
    /// `correlate` names an instance that does not exist yet for such an
    /// event, the host creates it.
    const STARTED_BY: &'static [&'static str];
    /// The events it subscribes to.
    type Event: DeserializeOwned + 'static;

    /// The instances an event belongs to: usually one id taken from the
    /// event (`vec![event.aggregate_id.clone()]`), none to ignore it.
    fn correlate(event: &Envelope<Self::Event>) -> Vec<String>;

    /// React to one input, at `now` (the input's time, stamped by the
    /// host): change `self`, and say what to do in `reaction`. An error
    /// leaves the instance as it was.
    fn react(
        &mut self,
        input: SagaInput<Self::Event>,
        now: Timestamp,
        reaction: &mut Reaction,
    ) -> Result<(), DomainError>;
}

/// A saga input before the event inside it is decoded.
pub(crate) enum RawSagaInput {
    Event(RecordedEvent),
    Outcome { request_id: String, result: CommandResult },
    Timer { name: String },
    Cancelled { reason: String },
}

pub(crate) trait ErasedSaga: Send + Sync {
    fn name(&self) -> &'static str;
    fn starting_event_types(&self) -> Vec<String>;
    fn event_types(&self) -> Vec<String>;
    fn event_enum(&self) -> std::any::TypeId;
    fn correlate(&self, event: &RecordedEvent) -> Result<Vec<String>, DomainError>;
    fn react(&self, state: &[u8], input: RawSagaInput, now: Timestamp) -> Result<(Vec<u8>, Reaction), DomainError>;
    fn describe_state(&self, state: &[u8]) -> Result<String, DomainError>;
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

    /// # Panics
    /// When `STARTED_BY` names something that is not a variant of `Event`
    /// (a programming error, surfaced by the first `cargo test` that builds
    /// the saga's harness).
    fn starting_event_types(&self) -> Vec<String> {
        let events = self.event_types();
        S::STARTED_BY
            .iter()
            .map(|name| {
                assert!(
                    events.iter().any(|event| event == name),
                    "saga `{}`: STARTED_BY names `{name}`, which is not a variant of its `Event` enum ({events:?})",
                    S::NAME
                );
                (*name).to_owned()
            })
            .collect()
    }

    fn event_types(&self) -> Vec<String> {
        codec::variant_names::<S::Event>()
    }

    fn event_enum(&self) -> std::any::TypeId {
        std::any::TypeId::of::<S::Event>()
    }

    fn correlate(&self, event: &RecordedEvent) -> Result<Vec<String>, DomainError> {
        Ok(S::correlate(&Envelope::decode(event)?))
    }

    fn react(&self, state: &[u8], input: RawSagaInput, now: Timestamp) -> Result<(Vec<u8>, Reaction), DomainError> {
        let mut saga: S = codec::decode_state(state)?;
        let input = match input {
            RawSagaInput::Event(event) => SagaInput::Event(Envelope::decode_owned(event)?),
            RawSagaInput::Outcome { request_id, result } => SagaInput::Outcome { request_id, result },
            RawSagaInput::Timer { name } => SagaInput::Timer { name },
            RawSagaInput::Cancelled { reason } => SagaInput::Cancelled { reason },
        };
        let mut reaction = Reaction::default();
        saga.react(input, now, &mut reaction)?;
        Ok((codec::encode_state(&saga)?, reaction))
    }

    /// Decoding is the point: the host asks a new build to describe the
    /// states the old one stored before letting it take them over.
    fn describe_state(&self, state: &[u8]) -> Result<String, DomainError> {
        let saga: S = codec::decode_state(state)?;
        serde_json::to_string(&saga).map_err(|e| DomainError::Invalid(format!("cannot render state: {e}")))
    }
}

#[cfg(test)]
mod tests;
