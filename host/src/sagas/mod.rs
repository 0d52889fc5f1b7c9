//! Sagas (process managers): the service that runs every saga the serving
//! modules declare, and what operators see and do.
//!
//! Each saga has one runner per host ([`runner`]); only the one holding the
//! saga's lease in the store works, the others wait to take over (within
//! the lease's time to live when its holder dies). A runner turns subscribed
//! events into inputs (`correlate`), reacts to inputs one instance at a time
//! (`react`) committing each batch of reactions in one transaction with the
//! commands they send and the timers they set, sends those commands through
//! the command pipeline under idempotency keys derived from the input, and
//! delivers their outcomes as inputs. See ARCHITECTURE.md, "Sagas".

mod runner;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::leases::rfc3339;
use crate::metrics::Metrics;
use crate::pipeline::CommandService;
use crate::sandbox::{ModuleSet, RecordedEvent};
use crate::store::{
    EventStore, InputRecord, InstanceDetail, InstanceQuery, InstanceRecord, InstanceStatus, SagaChange, StoreError,
};

/// How sagas run.
#[derive(Debug, Clone)]
pub struct SagaConfig {
    /// A lease not renewed for this long may be taken by another host.
    pub lease_ttl: Duration,
    /// How often the holder renews it (and a waiting host tries to take it).
    pub renew_every: Duration,
    /// Inputs reacted to, and commands sent, per step.
    pub batch: usize,
    /// Failed reactions in a row before an instance is parked.
    pub max_attempts: u32,
    /// Backoff after the first failure (doubling each time, with jitter).
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for SagaConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(3),
            renew_every: Duration::from_millis(1000),
            batch: 512,
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// What the runners share.
pub(crate) struct Inner {
    store: Arc<dyn EventStore>,
    commands: Arc<CommandService>,
    metrics: Metrics,
    config: SagaConfig,
    /// This host's identity in leases.
    owner: String,
}

struct Running {
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Runs the declared sagas; answers operators.
pub struct SagaService {
    inner: Arc<Inner>,
    running: Mutex<HashMap<String, Running>>,
    reconciler: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Why an operator's request could not be done.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    #[error("no saga `{0}` is declared by a serving module")]
    UnknownSaga(String),
    #[error("saga `{saga}` has no instance `{instance}`")]
    UnknownInstance { saga: String, instance: String },
    #[error("instance `{instance}` of saga `{saga}` is {status}: {action} needs {needs}")]
    WrongStatus { saga: String, instance: String, status: &'static str, action: &'static str, needs: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One saga, as `GET /v1/sagas` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SagaStatus {
    pub name: String,
    pub module: String,
    /// `running` (this or another host holds the lease), `waiting` (no
    /// host holds it), or `stalled` (it cannot correlate an event: `error`).
    pub state: &'static str,
    pub position: u64,
    /// Events in the log after `position`.
    pub lag: u64,
    pub instances: InstanceCounts,
    pub pending_inputs: u64,
    pub pending_commands: u64,
    pub pending_timers: u64,
    /// RFC 3339, the soonest pending timer.
    pub next_due: Option<String>,
    /// The host holding the lease, and whether it is this one.
    pub lease: Option<LeaseStatus>,
    pub error: Option<String>,
    pub starting_event_types: Vec<String>,
    pub event_types: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceCounts {
    pub active: u64,
    pub completed: u64,
    pub parked: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LeaseStatus {
    pub owner: String,
    pub epoch: u64,
    pub this_host: bool,
    pub expires_at: String,
}

/// One instance, as the instance routes show it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub id: String,
    pub status: &'static str,
    /// The state as the serving module describes it (JSON), or `null` when
    /// it cannot (see `state_error`).
    pub state: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_error: Option<String>,
    pub correlation_id: String,
    pub reactions: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// The input it is parked on (or failed on last).
    pub parked_input: Option<u64>,
    pub next_retry_at: Option<String>,
    pub started_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timers: Option<Vec<TimerView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commands: Option<Vec<CommandView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Vec<InputView>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimerView {
    pub name: String,
    pub due_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CommandView {
    pub request_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub command_type: String,
    pub payload: serde_json::Value,
    pub idempotency_key: String,
    /// `pending`, `accepted` or `rejected`.
    pub status: String,
    pub version: Option<u64>,
    pub reason: Option<String>,
    pub code: Option<u16>,
    pub sent_at: String,
    pub outcome_at: Option<String>,
    /// The trace the command continues (its reaction's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InputView {
    pub id: u64,
    pub input: serde_json::Value,
    pub at: String,
}

/// A page of instances.
#[derive(Debug, Clone, Serialize)]
pub struct InstancePage {
    pub saga: String,
    pub instances: Vec<InstanceView>,
    /// Pass as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}

impl SagaService {
    /// Take (or wait for) the lease of every declared saga — creating the
    /// saga's row at the current head, so a new saga starts with the
    /// events that follow — and follow module swaps from then on.
    pub async fn start(commands: Arc<CommandService>, metrics: Metrics, config: SagaConfig) -> Arc<Self> {
        let inner = Arc::new(Inner {
            store: commands.store().clone(),
            commands: commands.clone(),
            metrics,
            config,
            owner: crate::leases::owner_id(),
        });
        let service = Arc::new(Self { inner, running: Mutex::new(HashMap::new()), reconciler: Mutex::new(None) });
        let mut swaps = commands.registry().subscribe();
        let current = commands.modules();
        service.reconcile(&current, true).await;
        let weak = Arc::downgrade(&service);
        let task = tokio::spawn(async move {
            while swaps.changed().await.is_ok() {
                let set = swaps.borrow_and_update().clone();
                let Some(service) = weak.upgrade() else { return };
                service.reconcile(&set, false).await;
            }
        });
        *service.reconciler.lock() = Some(task);
        service
    }

    /// Start a runner for every saga `set` declares that has none; stop
    /// those of sagas no longer declared.
    async fn reconcile(&self, set: &ModuleSet, first: bool) {
        let declared: Vec<String> =
            set.modules().flat_map(|m| m.manifest.sagas.iter().map(|s| s.name.clone())).collect();
        let mut stopped = Vec::new();
        {
            let mut running = self.running.lock();
            running.retain(|saga, runner| {
                let keep = declared.contains(saga) && !runner.task.is_finished();
                if !keep {
                    let _ = runner.stop.send(true);
                    stopped.push(saga.clone());
                }
                keep
            });
        }
        for saga in declared {
            if self.running.lock().contains_key(&saga) {
                continue;
            }
            let wake = Arc::new(Notify::new());
            let (stop, stopping) = watch::channel(false);
            let mut runner = runner::Runner::new(saga.clone(), self.inner.clone(), wake.clone(), stopping);
            if first && let Err(error) = runner.acquire().await {
                tracing::warn!(%saga, %error, "cannot take the saga's lease yet; retrying");
            }
            let task = tokio::spawn(runner.run());
            self.running.lock().insert(saga, Running { wake, stop, task });
        }
        for saga in stopped {
            tracing::info!(%saga, "saga runner stopped: no serving module declares it");
        }
    }

    /// Stop every runner (each releases its lease).
    pub async fn stop(&self) {
        if let Some(task) = self.reconciler.lock().take() {
            task.abort();
        }
        let runners: Vec<Running> = self.running.lock().drain().map(|(_, r)| r).collect();
        for runner in &runners {
            let _ = runner.stop.send(true);
        }
        for runner in runners {
            let _ = runner.task.await;
        }
    }

    fn wake(&self, saga: &str) {
        if let Some(runner) = self.running.lock().get(saga) {
            runner.wake.notify_one();
        }
    }

    /// Every declared saga with its checkpoint, lease and counts.
    pub async fn status(&self) -> Result<Vec<SagaStatus>, StoreError> {
        let overview = self.inner.store.saga_overview().await?;
        let head = *self.inner.store.head().borrow();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let set = self.inner.commands.modules();
        let mut statuses = Vec::new();
        for module in set.modules() {
            for info in &module.manifest.sagas {
                let found = overview.iter().find(|(record, _)| record.saga == info.name);
                let (record, counts) = match found {
                    Some((record, counts)) => (Some(record), counts.clone()),
                    None => (None, Default::default()),
                };
                let leased = record.is_some_and(|r| r.lease_expires_ms > now_ms);
                let state = match record {
                    Some(record) if record.error.is_some() => "stalled",
                    _ if leased => "running",
                    _ => "waiting",
                };
                let position = record.map_or(head, |r| r.position);
                statuses.push(SagaStatus {
                    name: info.name.clone(),
                    module: module.name.clone(),
                    state,
                    position,
                    lag: head.saturating_sub(position),
                    instances: InstanceCounts { active: counts.active, completed: counts.done, parked: counts.parked },
                    pending_inputs: counts.pending_inputs,
                    pending_commands: counts.pending_commands,
                    pending_timers: counts.pending_timers,
                    next_due: counts.next_due_ms.map(rfc3339),
                    lease: record.filter(|_| leased).map(|r| LeaseStatus {
                        owner: r.owner.clone(),
                        epoch: r.epoch,
                        this_host: r.owner == self.inner.owner,
                        expires_at: rfc3339(r.lease_expires_ms),
                    }),
                    error: record.and_then(|r| r.error.clone()),
                    starting_event_types: info.starting_event_types.clone(),
                    event_types: info.event_types.clone(),
                });
            }
        }
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(statuses)
    }

    fn declared(&self, saga: &str) -> Result<Arc<crate::sandbox::GuestModule>, SagaError> {
        self.inner
            .commands
            .modules()
            .modules()
            .find(|m| m.saga(saga).is_some())
            .cloned()
            .ok_or_else(|| SagaError::UnknownSaga(saga.to_owned()))
    }

    /// A page of a saga's instances.
    pub async fn instances(&self, query: InstanceQuery) -> Result<InstancePage, SagaError> {
        let module = self.declared(&query.saga)?;
        let limit = query.limit;
        let records = self.inner.store.saga_instances(&InstanceQuery { limit: limit + 1, ..query.clone() }).await?;
        let more = records.len() > limit;
        // A page may hold a thousand states, each described by a guest call:
        // off the async threads.
        let saga = query.saga.clone();
        let instances: Vec<InstanceView> = tokio::task::spawn_blocking(move || {
            records.into_iter().take(limit).map(|r| view(&module, &saga, r)).collect()
        })
        .await
        .expect("describing states does not panic");
        let next_cursor = if more { instances.last().map(|i| i.id.clone()) } else { None };
        Ok(InstancePage { saga: query.saga, instances, next_cursor })
    }

    /// One instance with its timers, commands and outcomes, and queued inputs.
    pub async fn instance(&self, saga: &str, instance: &str) -> Result<InstanceView, SagaError> {
        let module = self.declared(saga)?;
        let InstanceDetail { record, timers, commands, inputs } = self
            .inner
            .store
            .saga_instance(saga, instance)
            .await?
            .ok_or_else(|| SagaError::UnknownInstance { saga: saga.to_owned(), instance: instance.to_owned() })?;
        let mut view = view(&module, saga, record);
        view.timers = Some(timers.into_iter().map(|(name, due)| TimerView { name, due_at: rfc3339(due) }).collect());
        view.commands = Some(
            commands
                .into_iter()
                .map(|sent| CommandView {
                    payload: serde_json::from_str(&sent.command.payload)
                        .unwrap_or(serde_json::Value::String(sent.command.payload.clone())),
                    request_id: sent.command.request_id,
                    aggregate_type: sent.command.aggregate_type,
                    aggregate_id: sent.command.aggregate_id,
                    command_type: sent.command.command_type,
                    idempotency_key: sent.command.idempotency_key,
                    traceparent: sent.command.trace.as_ref().map(|t| t.traceparent().to_owned()),
                    status: sent.status,
                    version: sent.version,
                    reason: sent.reason,
                    code: sent.code,
                    sent_at: rfc3339(sent.sent_at_ms),
                    outcome_at: sent.outcome_at_ms.map(rfc3339),
                })
                .collect(),
        );
        view.inputs = Some(
            inputs
                .into_iter()
                .map(|queued| InputView {
                    id: queued.id,
                    input: serde_json::from_str(&queued.input).unwrap_or(serde_json::Value::String(queued.input)),
                    at: rfc3339(queued.at_ms),
                })
                .collect(),
        );
        Ok(view)
    }

    /// A parked instance takes inputs again, from the one it parked on.
    pub async fn retry(&self, saga: &str, instance: &str) -> Result<InstanceView, SagaError> {
        self.operate(
            saga,
            instance,
            "retry",
            "a parked instance",
            SagaChange::Retry { saga: saga.to_owned(), instance: instance.to_owned() },
        )
        .await
    }

    /// Drop the input a parked instance is parked on, and resume it.
    pub async fn skip(&self, saga: &str, instance: &str) -> Result<InstanceView, SagaError> {
        self.operate(
            saga,
            instance,
            "skip",
            "a parked instance",
            SagaChange::Skip { saga: saga.to_owned(), instance: instance.to_owned() },
        )
        .await
    }

    /// Deliver a cancel (ahead of everything queued) to an instance that is
    /// not done; the saga decides what it means.
    pub async fn cancel(&self, saga: &str, instance: &str, reason: &str) -> Result<InstanceView, SagaError> {
        let input = InputRecord::Cancelled { reason: reason.to_owned() }.to_json();
        let at_ms = chrono::Utc::now().timestamp_millis();
        self.operate(
            saga,
            instance,
            "cancel",
            "an instance that is not done",
            SagaChange::Cancel { saga: saga.to_owned(), instance: instance.to_owned(), input, at_ms },
        )
        .await
    }

    async fn operate(
        &self,
        saga: &str,
        instance: &str,
        action: &'static str,
        needs: &'static str,
        change: SagaChange,
    ) -> Result<InstanceView, SagaError> {
        self.declared(saga)?;
        let applied = self.inner.store.change_saga(change).await?;
        if applied.rows == 0 {
            let current = self.instance(saga, instance).await?;
            return Err(SagaError::WrongStatus {
                saga: saga.to_owned(),
                instance: instance.to_owned(),
                status: current.status,
                action,
                needs,
            });
        }
        tracing::info!(%saga, %instance, action, "saga instance: operator action");
        self.wake(saga);
        self.instance(saga, instance).await
    }
}

fn view(module: &crate::sandbox::GuestModule, saga: &str, record: InstanceRecord) -> InstanceView {
    let (state, state_error) = match module.describe_saga_state(saga, &record.state) {
        Ok(Ok(json)) => match serde_json::from_str(&json) {
            Ok(value) => (Some(value), None),
            Err(error) => (None, Some(format!("`describe-state` returned invalid JSON: {error}"))),
        },
        Ok(Err(error)) => (None, Some(error.describe())),
        Err(failure) => (None, Some(failure.reason)),
    };
    let status = record.status.as_str();
    InstanceView {
        id: record.instance,
        status: if record.status == InstanceStatus::Done { "completed" } else { status },
        state,
        state_error,
        correlation_id: record.correlation_id,
        reactions: record.reactions,
        attempts: record.attempts,
        last_error: record.last_error,
        parked_input: record.parked_input,
        next_retry_at: (record.status == InstanceStatus::Active && record.attempts > 0)
            .then(|| rfc3339(record.retry_at_ms)),
        started_at: rfc3339(record.started_at_ms),
        updated_at: rfc3339(record.updated_at_ms),
        timers: None,
        commands: None,
        inputs: None,
    }
}

/// An event input as the guest's `recorded-event`.
pub(crate) fn recorded_from_input(record: &InputRecord) -> Option<RecordedEvent> {
    match record {
        InputRecord::Event {
            id,
            position,
            aggregate_type,
            aggregate_id,
            stream_version,
            event_type,
            schema_version,
            time,
            payload,
            ..
        } => Some(RecordedEvent {
            id: id.clone(),
            aggregate_type: aggregate_type.clone(),
            aggregate_id: aggregate_id.clone(),
            stream_version: *stream_version,
            position: *position,
            event_type: event_type.clone(),
            schema_version: *schema_version,
            time: time.clone(),
            payload: payload.clone(),
        }),
        _ => None,
    }
}
