//! Tests of sagas through both of their doors: the WIT exports the host
//! calls, and the native harness — including the inputs the harness refuses
//! because the host would never deliver them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bindings::exports::orchestrix::domain::{manifest, saga as wit};
use crate::bindings::orchestrix::domain::types;
use crate::testing::{START, command, event, saga};
use crate::{
    Aggregate, CommandResult, DomainError, Envelope, Exports, Module, ModuleBuilder, Reaction, Saga, SagaInput,
    Timestamp,
};

/// A door that can be closed.
#[derive(Default, Serialize, Deserialize)]
struct Door {
    open: bool,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum DoorCommand {
    Close {},
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum DoorEvent {
    Opened {},
    Closed {},
}

impl Aggregate for Door {
    const TYPE: &'static str = "door";
    type Command = DoorCommand;
    type Event = DoorEvent;

    fn handle(&self, _: DoorCommand) -> Result<Vec<DoorEvent>, DomainError> {
        Ok(vec![DoorEvent::Closed {}])
    }

    fn apply(&mut self, event: DoorEvent) {
        self.open = event == DoorEvent::Opened {};
    }
}

/// Closes a door a minute after it opened, unless it was closed already.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct DoorWatch {
    door: String,
    opened_at: Option<Timestamp>,
    closed_by_timer_at: Option<Timestamp>,
    refused: Option<(String, u16)>,
}

const CLOSE_AFTER: Duration = Duration::from_secs(60);

impl Saga for DoorWatch {
    const NAME: &'static str = "door_watch";
    const STARTED_BY: &'static [&'static str] = &["Opened"];
    type Event = DoorEvent;

    fn correlate(event: &Envelope<DoorEvent>) -> Vec<String> {
        vec![event.aggregate_id.clone()]
    }

    fn react(
        &mut self,
        input: SagaInput<DoorEvent>,
        now: Timestamp,
        reaction: &mut Reaction,
    ) -> Result<(), DomainError> {
        match input {
            SagaInput::Event(Envelope { aggregate_id, event: DoorEvent::Opened {}, .. }) => {
                self.door = aggregate_id;
                self.opened_at = Some(now);
                reaction.set_timer("close", CLOSE_AFTER);
            }
            SagaInput::Event(Envelope { event: DoorEvent::Closed {}, .. }) => {
                reaction.cancel_timer("close");
                reaction.complete();
            }
            SagaInput::Timer { .. } => {
                self.closed_by_timer_at = Some(now);
                reaction.send::<Door>("close", &self.door, &DoorCommand::Close {})?;
            }
            SagaInput::Outcome { result: CommandResult::Rejected { reason, code }, .. } => {
                self.refused = Some((reason, code));
            }
            SagaInput::Outcome { result: CommandResult::Accepted { .. }, .. } => reaction.complete(),
            SagaInput::Cancelled { reason } => {
                // Reuses the id of the command sent on the timer: the harness
                // must refuse that.
                reaction.send::<Door>("close", &self.door, &DoorCommand::Close {})?;
                self.refused = Some((reason, 0));
            }
        }
        Ok(())
    }
}

struct Doors;

impl Module for Doors {
    const NAME: &'static str = "doors";
    const VERSION: &'static str = "1.0.0";

    fn register(module: &mut ModuleBuilder) {
        module.aggregate::<Door>().saga::<DoorWatch>();
    }
}

fn opened() -> SagaInput<DoorEvent> {
    event("door", "front", DoorEvent::Opened {})
}

#[test]
fn inputs_come_at_the_clock_and_timers_at_their_due_time() {
    saga::<DoorWatch>()
        .after(Duration::from_secs(10))
        .when(opened())
        .then_expect_timers([("close", CLOSE_AFTER)])
        .then_expect_state(DoorWatch {
            door: "front".into(),
            opened_at: Some(START + Duration::from_secs(10)),
            ..DoorWatch::default()
        });
    saga::<DoorWatch>()
        .after(Duration::from_secs(10))
        .given([opened()])
        .when(SagaInput::timer("close"))
        .then_expect_commands([command::<Door>("close", "front", DoorCommand::Close {})])
        .then_expect_state(DoorWatch {
            door: "front".into(),
            opened_at: Some(START + Duration::from_secs(10)),
            closed_by_timer_at: Some(START + Duration::from_secs(70)),
            refused: None,
        });
}

#[test]
fn outcomes_carry_the_rejection_reason_and_code() {
    let (state, _) = saga::<DoorWatch>()
        .given([opened(), SagaInput::timer("close")])
        .when(SagaInput::rejected("close", "jammed", 503))
        .then_expect_running()
        .result()
        .expect("reacts");
    assert_eq!(state.refused, Some(("jammed".into(), 503)));
    saga::<DoorWatch>()
        .given([opened(), SagaInput::timer("close")])
        .when(SagaInput::accepted("close", 2))
        .then_expect_done();
}

#[test]
fn a_finished_instance_drops_its_timers() {
    saga::<DoorWatch>()
        .given([opened()])
        .when(event("door", "front", DoorEvent::Closed {}))
        .then_expect_cancelled_timers(["close"])
        .then_expect_done();
}

#[test]
#[should_panic(expected = "the first input must be an event that starts it")]
fn the_harness_refuses_a_first_input_that_starts_nothing() {
    saga::<DoorWatch>().given([event("door", "front", DoorEvent::Closed {})]);
}

#[test]
#[should_panic(expected = "no command with request id `close` awaits an outcome")]
fn the_harness_refuses_an_outcome_for_a_command_never_sent() {
    saga::<DoorWatch>().given([opened(), SagaInput::accepted("close", 1)]);
}

#[test]
#[should_panic(expected = "timer `open` is not pending")]
fn the_harness_refuses_a_timer_never_set() {
    saga::<DoorWatch>().given([opened(), SagaInput::timer("open")]);
}

#[test]
#[should_panic(expected = "saga `door_watch` is done")]
fn the_harness_delivers_nothing_after_done() {
    saga::<DoorWatch>().given([opened(), event("door", "front", DoorEvent::Closed {}), SagaInput::cancelled("late")]);
}

#[test]
#[should_panic(expected = "correlates to [\"back\"], not to this instance `front`")]
fn the_harness_refuses_another_instances_event() {
    saga::<DoorWatch>().given([opened(), event("door", "back", DoorEvent::Closed {})]);
}

#[test]
#[should_panic(expected = "used request id `close` twice")]
fn the_harness_refuses_a_request_id_used_twice() {
    saga::<DoorWatch>().given([opened(), SagaInput::timer("close"), SagaInput::cancelled("reuse")]);
}

fn recorded_opened() -> types::RecordedEvent {
    types::RecordedEvent {
        id: "e-1".into(),
        aggregate_type: "door".into(),
        aggregate_id: "front".into(),
        stream_version: 1,
        position: 7,
        event_type: "Opened".into(),
        schema_version: 1,
        time: "2026-01-01T00:00:00.000Z".into(),
        payload: "{}".into(),
    }
}

#[test]
fn the_exports_speak_the_contract() {
    use manifest::Guest as _;
    use wit::Guest as _;
    let sagas = Exports::<Doors>::manifest().sagas;
    assert_eq!(sagas.len(), 1);
    assert_eq!(sagas[0].starting_event_types, ["door.Opened"]);
    assert_eq!(sagas[0].event_types, ["door.Opened", "door.Closed"]);

    assert_eq!(Exports::<Doors>::correlate("door_watch".into(), recorded_opened()).unwrap(), ["front"]);
    let now_ms = START.as_millis() + 5;
    let reaction =
        Exports::<Doors>::react("door_watch".into(), Vec::new(), wit::SagaInput::Event(recorded_opened()), now_ms)
            .unwrap_or_else(|e| panic!("react failed: {e:?}"));
    assert_eq!(reaction.set_timers.len(), 1);
    assert_eq!((reaction.set_timers[0].name.as_str(), reaction.set_timers[0].delay_ms), ("close", 60_000));
    let state: DoorWatch = serde_json::from_slice(&reaction.state).unwrap();
    assert_eq!(state.opened_at, Some(Timestamp::from_millis(now_ms)));

    let rejected = wit::SagaInput::Outcome(wit::CommandOutcome {
        request_id: "close".into(),
        result: wit::CommandResult::Rejected(wit::CommandRejection { reason: "jammed".into(), code: 409 }),
    });
    let reaction = Exports::<Doors>::react("door_watch".into(), reaction.state, rejected, now_ms + 1).unwrap();
    let state: DoorWatch = serde_json::from_slice(&reaction.state).unwrap();
    assert_eq!(state.refused, Some(("jammed".into(), 409)));

    let reaction =
        Exports::<Doors>::react("door_watch".into(), reaction.state, wit::SagaInput::Cancelled("fire drill".into()), 0)
            .unwrap();
    assert_eq!(reaction.commands.len(), 1);
    assert_eq!(
        (reaction.commands[0].aggregate_type.as_str(), reaction.commands[0].command_type.as_str()),
        ("door", "Close")
    );
    let state: DoorWatch = serde_json::from_slice(&reaction.state).unwrap();
    assert_eq!(state.refused, Some(("fire drill".into(), 0)));

    assert!(matches!(
        Exports::<Doors>::react("nope".into(), Vec::new(), wit::SagaInput::Cancelled(String::new()), 0),
        Err(types::DomainError::Invalid(reason)) if reason.contains("unknown saga `nope`")
    ));
}
