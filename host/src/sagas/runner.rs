//! One saga's loop, on the host that holds its lease: fire due timers,
//! correlate new events into inputs, react to ready inputs, send the
//! commands reactions queued — each step one transaction, repeated until
//! there is nothing to do, then wait for the log's head, a wake-up (an
//! operator's action, a command reaction) or the next due timer.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};

use super::{Inner, recorded_from_input};
use crate::pipeline::{CommandRequest, ErrorKind};
use crate::sandbox::{
    GuestCommandOutcome, GuestCommandRejection, GuestCommandResult, GuestFailure, GuestModule, GuestSagaInput,
    GuestTimerFired, ModuleSet, Reaction, to_recorded, upcast_events,
};
use crate::store::{
    CommandOutcomeWrite, EventNames, Fence, InputRecord, InstanceStatus, InstanceWrite, NewInput, NewInstance,
    OutboxCommand, PendingCommand, ReadyInput, SagaChange, StoreError, StreamId, TimerKey,
};
use crate::telemetry::{self, TraceContext};

/// Events read from the log per intake step.
const INTAKE_BATCH: usize = 512;
/// Timers moved into the inbox per step.
const FIRE_BATCH: usize = 2048;

/// Whether a step found work (so the loop goes round again at once).
type Busy = bool;

/// Events read past without an input for the saga before the checkpoint is
/// written anyway (it is also written when the runner has been idle a
/// renewal tick): lag stays honest without a write per read.
const CHECKPOINT_EVERY: u64 = 10_000;

pub(super) struct Runner {
    pub saga: String,
    pub inner: Arc<Inner>,
    pub wake: Arc<Notify>,
    pub stop: watch::Receiver<bool>,
    fence: Option<Fence>,
    /// How far the log has been read and correlated.
    position: u64,
    /// The checkpoint as stored (at most `position`).
    checkpoint: u64,
    /// The inbox may hold ready inputs / the outbox pending commands: set
    /// by what queues them, by wake-ups and renewal ticks; cleared by a
    /// step that found none (so an idle saga costs no queries).
    inbox_dirty: bool,
    outbox_dirty: bool,
    /// The earliest time an instance backing off may be retried.
    retry_at: Option<Instant>,
    renewed: Instant,
    /// Database clock minus this host's clock, in ms, as last seen.
    skew_ms: i64,
    /// The soonest timer due, as far as this runner knows.
    next_due_ms: Option<i64>,
    /// Commands left pending because the store or target was unavailable:
    /// do not resend before this.
    dispatch_after: Option<Instant>,
    gauges_at: Instant,
}

impl Runner {
    pub fn new(saga: String, inner: Arc<Inner>, wake: Arc<Notify>, stop: watch::Receiver<bool>) -> Self {
        Self {
            saga,
            inner,
            wake,
            stop,
            fence: None,
            position: 0,
            checkpoint: 0,
            inbox_dirty: true,
            outbox_dirty: true,
            retry_at: None,
            renewed: Instant::now(),
            skew_ms: 0,
            next_due_ms: None,
            dispatch_after: None,
            gauges_at: Instant::now() - Duration::from_secs(60),
        }
    }

    /// The module serving the saga now (a swap hands running instances to
    /// the new version at the next step).
    fn module(&self) -> Option<Arc<GuestModule>> {
        self.inner.commands.modules().modules().find(|m| m.saga(&self.saga).is_some()).cloned()
    }

    fn db_now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis() + self.skew_ms
    }

    fn note_clock(&mut self, db_now_ms: i64) {
        self.skew_ms = db_now_ms - chrono::Utc::now().timestamp_millis();
    }

    /// Try to take the lease (creating the saga's row at the current head
    /// when it has none). Returns whether this host holds it.
    pub async fn acquire(&mut self) -> Result<bool, StoreError> {
        let Some(module) = self.module() else { return Ok(false) };
        let start_position = *self.inner.store.head().borrow();
        let applied = self
            .inner
            .store
            .change_saga(SagaChange::Acquire {
                saga: self.saga.clone(),
                module: module.name.clone(),
                owner: self.inner.owner.clone(),
                ttl_ms: self.inner.config.lease_ttl.as_millis() as i64,
                start_position,
            })
            .await?;
        self.note_clock(applied.now_ms);
        if let Some((epoch, position)) = applied.lease {
            tracing::info!(saga = %self.saga, epoch, position, "saga lease taken");
            let built_by = (module.generation() > 0).then(|| (module.name.clone(), module.generation()));
            self.fence =
                Some(Fence { saga: self.saga.clone(), owner: self.inner.owner.clone(), epoch, module: built_by });
            self.position = position;
            self.checkpoint = position;
            self.inbox_dirty = true;
            self.outbox_dirty = true;
            self.renewed = Instant::now();
            // Learn the next due time (and fire what fell due meanwhile).
            self.next_due_ms = Some(i64::MIN);
        }
        Ok(self.fence.is_some())
    }

    pub async fn run(mut self) {
        loop {
            if *self.stop.borrow() {
                break;
            }
            let Some(module) = self.module() else { break };
            // Every change of this step is fenced by the build that computes it.
            if let Some(fence) = &mut self.fence {
                fence.module = (module.generation() > 0).then(|| (module.name.clone(), module.generation()));
            }
            let step = self.step(&module).await;
            let busy = match step {
                Ok(busy) => busy,
                Err(StoreError::LeaseLost(reason)) => {
                    tracing::warn!(saga = %self.saga, %reason, "saga lease lost; another host runs it now");
                    self.fence = None;
                    false
                }
                Err(StoreError::StaleModule { module, current, .. }) => {
                    // A newer build was activated: load it, then redo the
                    // step with it (nothing of this one was written).
                    let registry = self.inner.commands.registry().clone();
                    registry.catch_up(&module, current, Duration::from_secs(5)).await;
                    continue;
                }
                Err(error) => {
                    tracing::warn!(saga = %self.saga, %error, "saga step failed; retrying");
                    self.sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if !busy {
                self.idle().await;
            }
        }
        if let Some(fence) = self.fence.take() {
            let _ = self.inner.store.change_saga(SagaChange::Release { fence }).await;
        }
    }

    async fn sleep(&mut self, duration: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = self.stop.changed() => {}
        }
    }

    /// Wait for something to do: new events, a wake-up, the next timer, or
    /// the lease's renewal.
    async fn idle(&mut self) {
        let mut wait = self.inner.config.renew_every;
        if let Some(due) = self.next_due_ms {
            let until_due = Duration::from_millis((due - self.db_now_ms()).max(0) as u64);
            wait = wait.min(until_due);
        }
        for at in [self.dispatch_after, self.retry_at].into_iter().flatten() {
            wait = wait.min(at.saturating_duration_since(Instant::now()));
        }
        let mut head = self.inner.store.head();
        let position = self.position;
        let leased = self.fence.is_some();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = self.wake.notified() => {
                self.inbox_dirty = true;
            }
            _ = head.wait_for(|head| leased && *head > position) => {}
            _ = self.stop.changed() => {}
        }
        if self.retry_at.is_some_and(|at| at <= Instant::now()) {
            self.retry_at = None;
            self.inbox_dirty = true;
        }
        if self.dispatch_after.is_some_and(|at| at <= Instant::now()) {
            self.outbox_dirty = true;
        }
    }

    /// One round: lease, timers, intake, reactions, dispatch.
    async fn step(&mut self, module: &Arc<GuestModule>) -> Result<Busy, StoreError> {
        if self.fence.is_none() {
            if !self.acquire().await? {
                return Ok(false);
            }
        } else if self.renewed.elapsed() >= self.inner.config.renew_every {
            self.renew().await?;
            // Catch what another host queued (an operator's action) and
            // write a checkpoint left behind while reading past others' events.
            self.inbox_dirty = true;
            self.outbox_dirty = true;
            if self.checkpoint < self.position {
                self.write_checkpoint().await?;
            }
        }
        let mut busy = self.fire_timers().await?;
        busy |= self.intake(module).await?;
        busy |= self.react(module).await?;
        busy |= self.dispatch().await?;
        if self.gauges_at.elapsed() >= Duration::from_secs(2) {
            self.refresh_gauges().await;
        }
        Ok(busy)
    }

    fn fence(&self) -> Result<Fence, StoreError> {
        self.fence.clone().ok_or_else(|| StoreError::LeaseLost(format!("saga `{}`: not leased", self.saga)))
    }

    async fn renew(&mut self) -> Result<(), StoreError> {
        let fence = self.fence()?;
        let ttl_ms = self.inner.config.lease_ttl.as_millis() as i64;
        let applied = self.inner.store.change_saga(SagaChange::Renew { fence: fence.clone(), ttl_ms }).await?;
        self.note_clock(applied.now_ms);
        if applied.rows != 1 {
            return Err(StoreError::LeaseLost(format!(
                "saga `{}` (epoch {}): renewal refused",
                self.saga, fence.epoch
            )));
        }
        self.renewed = Instant::now();
        // Catch timers another host's reactions may have set before a takeover.
        self.next_due_ms = Some(self.next_due_ms.map_or(i64::MIN, |due| due.min(self.db_now_ms())));
        Ok(())
    }

    async fn refresh_gauges(&mut self) {
        self.gauges_at = Instant::now();
        if let Ok(overview) = self.inner.store.saga_overview().await
            && let Some((record, counts)) = overview.into_iter().find(|(record, _)| record.saga == self.saga)
        {
            let lag = self.inner.store.head().borrow().saturating_sub(record.position);
            self.inner.metrics.set_saga_gauges(
                &self.saga,
                counts.active,
                counts.parked,
                counts.done,
                counts.pending_timers,
                lag,
            );
        }
    }

    /// Move the timers that fell due into the inbox.
    async fn fire_timers(&mut self) -> Result<Busy, StoreError> {
        match self.next_due_ms {
            Some(due) if due <= self.db_now_ms() => {}
            _ => return Ok(false),
        }
        let fence = self.fence()?;
        let applied = self.inner.store.change_saga(SagaChange::FireTimers { fence, limit: FIRE_BATCH }).await?;
        self.note_clock(applied.now_ms);
        self.next_due_ms = applied.next_due_ms;
        self.inbox_dirty |= !applied.fired.is_empty();
        for timer in &applied.fired {
            let lag = Duration::from_millis((applied.now_ms - timer.due_at_ms).max(0) as u64);
            self.inner.metrics.observe_saga_timer_lag(&self.saga, lag);
        }
        Ok(!applied.fired.is_empty())
    }

    /// Correlate the events after the checkpoint and queue their inputs.
    async fn intake(&mut self, module: &Arc<GuestModule>) -> Result<Busy, StoreError> {
        if *self.inner.store.head().borrow() <= self.position {
            return Ok(false);
        }
        let events = self.inner.store.read_all(self.position, INTAKE_BATCH).await?;
        let Some(last) = events.last().map(|e| e.position) else { return Ok(false) };
        let info = module.saga(&self.saga).expect("the runner's module declares its saga");
        let subscribed = EventNames::new(&info.event_types);
        let starting = EventNames::new(&info.starting_event_types);
        let mut relevant: Vec<_> = events.into_iter().filter(|e| subscribed.contains(e)).collect();
        let correlating = module.clone();
        let owners = self.inner.commands.modules();
        let saga = self.saga.clone();
        let correlated = tokio::task::spawn_blocking(move || {
            // The events in the shape current now: `correlate` reads them,
            // and they are queued so.
            upcast_events(&*owners, &mut relevant).map_err(|failure| failure.describe())?;
            relevant
                .into_iter()
                .map(|event| {
                    let instances = match correlating.correlate(&saga, &to_recorded(&event)) {
                        Ok(Ok(instances)) => instances,
                        Ok(Err(error)) => {
                            return Err(format!(
                                "`correlate` refused event {} ({}): {}",
                                event.id,
                                event.cloudevents_type(),
                                error.describe()
                            ));
                        }
                        Err(failure) => {
                            return Err(format!(
                                "`correlate` failed on event {} ({}): {}",
                                event.id,
                                event.cloudevents_type(),
                                failure.reason
                            ));
                        }
                    };
                    Ok((event, instances))
                })
                .collect::<Result<Vec<_>, String>>()
        })
        .await
        .expect("correlation does not panic");
        let correlated = match correlated {
            Ok(correlated) => correlated,
            Err(error) => {
                tracing::error!(saga = %self.saga, %error, "saga cannot correlate an event; it waits until a new module version can");
                let fence = self.fence()?;
                self.inner.store.change_saga(SagaChange::SetError { fence, error: Some(error) }).await?;
                self.sleep(Duration::from_secs(1)).await;
                return Ok(false);
            }
        };
        let mut starts = Vec::new();
        let mut inputs = Vec::new();
        for (event, mut instances) in correlated {
            instances.sort_unstable();
            instances.dedup();
            let at_ms = event.time.timestamp_millis();
            let is_start = starting.contains(&event);
            let recorded = to_recorded(&event);
            let input = InputRecord::Event {
                id: recorded.id,
                position: recorded.position,
                module: event.module.clone(),
                aggregate_type: recorded.aggregate_type,
                aggregate_id: recorded.aggregate_id,
                stream_version: recorded.stream_version,
                event_type: recorded.event_type,
                schema_version: recorded.schema_version,
                time: recorded.time,
                payload: recorded.payload,
                traceparent: event.trace.as_ref().map(|t| t.traceparent().to_owned()),
                tracestate: event.trace.as_ref().and_then(|t| t.tracestate().map(str::to_owned)),
            }
            .to_json();
            for instance in instances {
                if crate::limits::check_id("saga instance", &instance).is_err() {
                    tracing::warn!(saga = %self.saga, event = %event.id, "`correlate` named an invalid instance id; ignored");
                    continue;
                }
                if is_start {
                    let correlation_id = event.correlation_id.clone().unwrap_or_else(|| event.id.to_string());
                    starts.push(NewInstance { instance: instance.clone(), correlation_id, at_ms });
                }
                inputs.push(NewInput { instance, priority: 0, input: input.clone(), at_ms, timer: None });
            }
        }
        if inputs.is_empty() && last - self.checkpoint < CHECKPOINT_EVERY {
            self.position = last;
            return Ok(true);
        }
        self.inbox_dirty |= !inputs.is_empty();
        let fence = self.fence()?;
        let from = self.checkpoint;
        self.inner.store.change_saga(SagaChange::Intake { fence, from, to: last, starts, inputs }).await?;
        self.position = last;
        self.checkpoint = last;
        Ok(true)
    }

    /// Store the read position as the checkpoint (no inputs to queue).
    async fn write_checkpoint(&mut self) -> Result<(), StoreError> {
        let fence = self.fence()?;
        let (from, to) = (self.checkpoint, self.position);
        let change = SagaChange::Intake { fence, from, to, starts: Vec::new(), inputs: Vec::new() };
        self.inner.store.change_saga(change).await?;
        self.checkpoint = to;
        Ok(())
    }

    /// React to the ready inputs, instance by instance, and commit all the
    /// reactions in one transaction.
    async fn react(&mut self, module: &Arc<GuestModule>) -> Result<Busy, StoreError> {
        if !self.inbox_dirty {
            return Ok(false);
        }
        let ready = self.inner.store.saga_ready_inputs(&self.saga, self.inner.config.batch).await?;
        if ready.is_empty() {
            self.inbox_dirty = false;
            return Ok(false);
        }
        // Inputs come in queue order; each instance's are a prefix of its queue.
        let mut by_instance: BTreeMap<String, Vec<ReadyInput>> = BTreeMap::new();
        for input in ready {
            by_instance.entry(input.instance.clone()).or_default().push(input);
        }
        let reacting = module.clone();
        let owners = self.inner.commands.modules();
        let saga = self.saga.clone();
        let config = self.inner.config.clone();
        let outcomes = tokio::task::spawn_blocking(move || {
            by_instance
                .into_values()
                .map(|inputs| react_instance(&reacting, &owners, &saga, &config, inputs))
                .collect::<Vec<_>>()
        })
        .await
        .expect("reactions do not panic");
        let fence = self.fence()?;
        let change = merge(&fence, &outcomes);
        match self.inner.store.change_saga(change).await {
            Ok(applied) => self.note_clock(applied.now_ms),
            Err(error) if error.is_refusal() => {
                // One instance's reaction carried what the store refuses
                // (e.g. a request id it used before): commit each alone.
                for outcome in &outcomes {
                    let single = merge(&fence, std::slice::from_ref(outcome));
                    if let Err(error) = self.inner.store.change_saga(single).await {
                        if !error.is_refusal() {
                            return Err(error);
                        }
                        let failed = outcome.refused(&self.inner.config, &error.to_string());
                        self.inner.store.change_saga(merge(&fence, &[failed])).await?;
                    }
                }
            }
            Err(error) => return Err(error),
        }
        for outcome in &outcomes {
            self.outbox_dirty |= !outcome.commands.is_empty();
            if outcome.failure.is_some() && outcome.write.status == InstanceStatus::Active {
                let at = Instant::now() + Duration::from_millis(outcome.write.retry_after_ms.max(0) as u64);
                self.retry_at = Some(self.retry_at.map_or(at, |earlier| earlier.min(at)));
            }
            for (_, due) in &outcome.timers {
                if let Some(due) = due {
                    self.next_due_ms = Some(self.next_due_ms.map_or(*due, |next| next.min(*due)));
                }
            }
            let metrics = &self.inner.metrics;
            metrics.observe_saga_reactions(&self.saga, "ok", outcome.consumed.len());
            if let Some(error) = &outcome.failure {
                let parked = outcome.write.status == InstanceStatus::Parked;
                metrics.observe_saga_reactions(&self.saga, if parked { "parked" } else { "failed" }, 1);
                let level_parked = if parked { "instance parked" } else { "reaction failed; retrying after a backoff" };
                tracing::warn!(saga = %self.saga, instance = %outcome.write.instance, input = outcome.write.parked_input.unwrap_or_default(), attempts = outcome.write.attempts, %error, "{level_parked}");
            }
        }
        Ok(true)
    }

    /// Send the commands waiting in the outbox — each instance's in order,
    /// instances concurrently — and record their outcomes.
    async fn dispatch(&mut self) -> Result<Busy, StoreError> {
        if !self.outbox_dirty || self.dispatch_after.is_some_and(|after| Instant::now() < after) {
            return Ok(false);
        }
        self.dispatch_after = None;
        let pending = self.inner.store.saga_pending_commands(&self.saga, self.inner.config.batch).await?;
        if pending.is_empty() {
            self.outbox_dirty = false;
            return Ok(false);
        }
        let mut by_instance: BTreeMap<String, Vec<PendingCommand>> = BTreeMap::new();
        for command in pending {
            by_instance.entry(command.command.instance.clone()).or_default().push(command);
        }
        let sends = by_instance.into_values().map(|commands| self.send_in_order(commands));
        let results: Vec<(Vec<CommandOutcomeWrite>, bool)> = futures_util::future::join_all(sends).await;
        let mut outcomes = Vec::new();
        for (written, held_back) in results {
            outcomes.extend(written);
            if held_back {
                self.dispatch_after = Some(Instant::now() + Duration::from_secs(1));
            }
        }
        if outcomes.is_empty() {
            return Ok(false);
        }
        let fence = self.fence()?;
        let applied = self.inner.store.change_saga(SagaChange::Outcomes { fence, outcomes }).await?;
        self.note_clock(applied.now_ms);
        self.inbox_dirty |= applied.rows > 0;
        Ok(true)
    }

    /// One instance's commands, in order; stops at the first that must be
    /// retried later (the store or the target unavailable). Returns the
    /// outcomes and whether one was held back.
    async fn send_in_order(&self, commands: Vec<PendingCommand>) -> (Vec<CommandOutcomeWrite>, bool) {
        let mut outcomes = Vec::with_capacity(commands.len());
        for pending in commands {
            let command = &pending.command;
            let request = CommandRequest {
                stream: StreamId::new(command.aggregate_type.clone(), command.aggregate_id.clone()),
                command_type: command.command_type.clone(),
                payload: command.payload.clone(),
                expected_version: None,
                command_id: Some(command.idempotency_key.clone()),
                correlation_id: Some(pending.correlation_id.clone()).filter(|id| !id.is_empty()),
                trace: command.trace.clone(),
            };
            let result = self.inner.commands.execute(request).await;
            // The outcome continues the command's trace: its events' (the
            // command's own span), else the one it was sent with.
            let mut trace = command.trace.clone();
            let (accepted, reason, code, at_ms) = match result {
                Ok(reply) => {
                    if let Some(event_trace) = reply.events.first().and_then(|e| e.trace.clone()) {
                        trace = Some(event_trace);
                    }
                    let at_ms = reply.events.last().map_or_else(|| self.db_now_ms(), |e| e.time.timestamp_millis());
                    self.inner.metrics.observe_saga_command(&self.saga, "accepted");
                    (Some(reply.version), None, None, at_ms)
                }
                Err(error) if error.kind() == ErrorKind::Unavailable => {
                    self.inner.metrics.observe_saga_command(&self.saga, "retried");
                    tracing::warn!(saga = %self.saga, instance = %command.instance, %error, "saga command held back; resent later");
                    return (outcomes, true);
                }
                Err(error) => {
                    self.inner.metrics.observe_saga_command(&self.saga, "rejected");
                    let code = error.kind().http_status();
                    (None, Some(error.to_string()), Some(code), self.db_now_ms())
                }
            };
            let input = InputRecord::Outcome {
                request_id: command.request_id.clone(),
                accepted,
                reason: reason.clone(),
                code,
                traceparent: trace.as_ref().map(|t| t.traceparent().to_owned()),
                tracestate: trace.as_ref().and_then(|t| t.tracestate().map(str::to_owned)),
            }
            .to_json();
            outcomes.push(CommandOutcomeWrite {
                command_id: pending.id,
                instance: command.instance.clone(),
                accepted,
                reason,
                code,
                input,
                at_ms,
            });
        }
        (outcomes, false)
    }
}

/// What reacting to one instance's ready inputs came to.
pub(super) struct InstanceOutcome {
    pub consumed: Vec<u64>,
    pub write: InstanceWrite,
    /// Final timer changes by name: `Some(due)` set, `None` cancelled.
    pub timers: Vec<(String, Option<i64>)>,
    pub commands: Vec<OutboxCommand>,
    /// Why the last input failed, when one did.
    pub failure: Option<String>,
    /// The input it failed on (for a retry or parking).
    failed_input: Option<u64>,
    prior_attempts: u32,
    state_before: Vec<u8>,
    reactions_before: u64,
}

impl InstanceOutcome {
    /// The outcome when the store refused this instance's reactions: none
    /// of them happened; the first input counts as failed.
    fn refused(&self, config: &super::SagaConfig, error: &str) -> InstanceOutcome {
        let input = self.consumed.first().copied().or(self.failed_input).unwrap_or_default();
        let write = failed_write(
            config,
            &self.write.instance,
            self.state_before.clone(),
            self.reactions_before,
            self.prior_attempts,
            input,
            format!("the store refused the reaction: {error}"),
        );
        InstanceOutcome {
            consumed: Vec::new(),
            failure: write.last_error.clone(),
            write,
            timers: Vec::new(),
            commands: Vec::new(),
            failed_input: Some(input),
            prior_attempts: self.prior_attempts,
            state_before: self.state_before.clone(),
            reactions_before: self.reactions_before,
        }
    }
}

/// React to `inputs` (one instance's, in order) until one fails or the
/// instance is done.
pub(super) fn react_instance(
    module: &GuestModule,
    owners: &ModuleSet,
    saga: &str,
    config: &super::SagaConfig,
    inputs: Vec<ReadyInput>,
) -> InstanceOutcome {
    let first = &inputs[0];
    let instance = first.instance.clone();
    let state_before = first.state.clone();
    let reactions_before = first.reactions;
    let prior_attempts = first.attempts;
    let mut state = state_before.clone();
    let mut reactions = reactions_before;
    let mut consumed = Vec::new();
    let mut timers: Vec<(String, Option<i64>)> = Vec::new();
    let mut commands = Vec::new();
    let mut done = false;
    for input in inputs {
        let span = tracing::info_span!(
            target: telemetry::TARGET,
            "saga_react",
            orchestrix.saga = saga,
            orchestrix.instance = %instance,
            orchestrix.input = input.id,
        );
        let _in_span = span.enter();
        let record: Result<InputRecord, String> = serde_json::from_str(&input.input)
            .map_err(|e| format!("the inbox holds an input the host cannot read: {e}"));
        let input_trace = record.as_ref().ok().and_then(InputRecord::trace);
        telemetry::continue_trace(&span, input_trace.as_ref());
        // The commands of the reaction continue its trace.
        let trace = TraceContext::of_span(&span).or(input_trace);
        let reaction = record.and_then(|record| decode_input(record, owners)).and_then(|guest_input| {
            call_react(module, saga, &state, &guest_input, input.at_ms).and_then(|r| check_reaction(r, &commands))
        });
        if let Err(error) = &reaction {
            tracing::debug!(target: telemetry::TARGET, %error, "reaction failed");
            telemetry::record_error(&span, "reaction_failed");
        }
        match reaction {
            Ok(reaction) => {
                state = reaction.state;
                reactions += 1;
                consumed.push(input.id);
                for name in reaction.cancel_timers {
                    set_timer(&mut timers, name, None);
                }
                for timer in reaction.set_timers {
                    let due = input.at_ms.saturating_add(i64::try_from(timer.delay_ms).unwrap_or(i64::MAX / 4));
                    set_timer(&mut timers, timer.name, Some(due));
                }
                for request in reaction.commands {
                    commands.push(OutboxCommand {
                        idempotency_key: idempotency_key(saga, &instance, input.id, &request.request_id),
                        instance: instance.clone(),
                        input_id: input.id,
                        request_id: request.request_id,
                        aggregate_type: request.aggregate_type,
                        aggregate_id: request.aggregate_id,
                        command_type: request.command_type,
                        payload: request.payload,
                        trace: trace.clone(),
                    });
                }
                if reaction.done {
                    done = true;
                    break;
                }
            }
            Err(error) => {
                let write = failed_write(config, &instance, state, reactions, prior_attempts, input.id, error.clone());
                return InstanceOutcome {
                    consumed,
                    write,
                    timers,
                    commands,
                    failure: Some(error),
                    failed_input: Some(input.id),
                    prior_attempts,
                    state_before,
                    reactions_before,
                };
            }
        }
    }
    if done {
        timers.clear();
    }
    InstanceOutcome {
        consumed,
        write: InstanceWrite {
            instance,
            status: if done { InstanceStatus::Done } else { InstanceStatus::Active },
            state,
            reactions,
            attempts: 0,
            retry_after_ms: 0,
            last_error: None,
            parked_input: None,
        },
        timers,
        commands,
        failure: None,
        failed_input: None,
        prior_attempts,
        state_before,
        reactions_before,
    }
}

/// The instance after a failed reaction: backing off, or parked once it
/// has failed `max_attempts` times in a row.
fn failed_write(
    config: &super::SagaConfig,
    instance: &str,
    state: Vec<u8>,
    reactions: u64,
    prior_attempts: u32,
    input: u64,
    error: String,
) -> InstanceWrite {
    let attempts = prior_attempts + 1;
    let parked = attempts >= config.max_attempts;
    InstanceWrite {
        instance: instance.to_owned(),
        status: if parked { InstanceStatus::Parked } else { InstanceStatus::Active },
        state,
        reactions,
        attempts,
        retry_after_ms: if parked { 0 } else { backoff(config, attempts).as_millis() as i64 },
        last_error: Some(error),
        parked_input: Some(input),
    }
}

/// Exponential backoff from `initial_backoff`, capped, with ±25% jitter so
/// instances that failed together do not retry together.
fn backoff(config: &super::SagaConfig, attempts: u32) -> Duration {
    let base = config.initial_backoff.saturating_mul(1 << attempts.saturating_sub(1).min(16)).min(config.max_backoff);
    let jitter = std::collections::hash_map::RandomState::new().hash_one(Instant::now()) % 501;
    base.mul_f64(0.75 + jitter as f64 / 1000.0)
}

fn set_timer(timers: &mut Vec<(String, Option<i64>)>, name: String, due: Option<i64>) {
    timers.retain(|(existing, _)| *existing != name);
    timers.push((name, due));
}

/// The idempotency key of a saga's command: a hash of (saga, instance, the
/// input's id, the request id) — the same when a reaction is repeated
/// after a crash, different for every other command.
pub(super) fn idempotency_key(saga: &str, instance: &str, input: u64, request_id: &str) -> String {
    let mut hash = Sha256::new();
    for part in [saga.as_bytes(), instance.as_bytes(), &input.to_be_bytes(), request_id.as_bytes()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    format!("saga-{}", hex::encode(&hash.finalize()[..16]))
}

fn call_react(
    module: &GuestModule,
    saga: &str,
    state: &[u8],
    input: &GuestSagaInput,
    at_ms: i64,
) -> Result<Reaction, String> {
    match module.react(saga, state, input, at_ms.max(0) as u64) {
        Ok(Ok(reaction)) => Ok(reaction),
        Ok(Err(error)) => Err(format!("`react` returned an error: {}", error.describe())),
        Err(GuestFailure { reason, .. }) => Err(format!("`react` failed: {reason}")),
    }
}

/// Contract checks on a reaction: request ids unique within it and among
/// the commands earlier inputs of this batch sent (the store checks the
/// instance's whole life).
fn check_reaction(reaction: Reaction, earlier: &[OutboxCommand]) -> Result<Reaction, String> {
    let mut seen: HashMap<&str, ()> = earlier.iter().map(|c| (c.request_id.as_str(), ())).collect();
    for command in &reaction.commands {
        if seen.insert(command.request_id.as_str(), ()).is_some() {
            return Err(format!("the reaction reuses request id `{}`", command.request_id));
        }
    }
    Ok(reaction)
}

/// An inbox input as the guest's `saga-input`; an event upcast to the
/// current schema of its type (it was queued in the shape current then).
fn decode_input(record: InputRecord, owners: &ModuleSet) -> Result<GuestSagaInput, String> {
    Ok(match record {
        InputRecord::Event { .. } => {
            let mut event = [recorded_from_input(&record).expect("an event input")];
            upcast_events(owners, &mut event).map_err(|failure| failure.describe())?;
            let [event] = event;
            GuestSagaInput::Event(event)
        }
        InputRecord::Outcome { request_id, accepted, reason, code, .. } => {
            GuestSagaInput::Outcome(GuestCommandOutcome {
                request_id,
                result: match accepted {
                    Some(version) => GuestCommandResult::Accepted(version),
                    None => GuestCommandResult::Rejected(GuestCommandRejection {
                        reason: reason.unwrap_or_default(),
                        code: code.unwrap_or(500),
                    }),
                },
            })
        }
        InputRecord::Timer { name } => GuestSagaInput::Timer(GuestTimerFired { name }),
        InputRecord::Cancelled { reason } => GuestSagaInput::Cancelled(reason),
    })
}

/// One [`SagaChange::React`] for the outcomes of several instances.
fn merge(fence: &Fence, outcomes: &[InstanceOutcome]) -> SagaChange {
    let mut consumed = Vec::new();
    let mut instances = Vec::new();
    let mut timers_cancelled = Vec::new();
    let mut timers_set = Vec::new();
    let mut commands = Vec::new();
    for outcome in outcomes {
        consumed.extend(&outcome.consumed);
        instances.push(outcome.write.clone());
        for (name, due) in &outcome.timers {
            let key = TimerKey { instance: outcome.write.instance.clone(), name: name.clone() };
            // Setting a timer again replaces it: one that fired but was not
            // consumed yet is dropped like a cancelled one.
            if let Some(due) = due {
                timers_set.push((key.clone(), *due));
            }
            timers_cancelled.push(key);
        }
        commands.extend(outcome.commands.iter().cloned());
    }
    SagaChange::React { fence: fence.clone(), consumed, instances, timers_cancelled, timers_set, commands }
}
