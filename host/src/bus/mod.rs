//! The outbound bus: subscriptions that deliver the log's events to NATS
//! JetStream or to webhooks, in log order, at least once, with retries,
//! backoff and a dead-letter queue — and what operators see and do.
//!
//! Subscriptions live in the event database ([`crate::store::subscriptions`])
//! beside their checkpoints. Every host runs a [`runner`] per subscription;
//! the one holding the subscription's lease delivers, the others wait to
//! take over. See ARCHITECTURE.md, "Outbound bus".

mod runner;
mod sink;
pub mod spec;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{Notify, watch};

pub use self::sink::{sign, verify};
use self::spec::{SinkSpec, Start, SubscriptionSpec};
use crate::egress::EgressPolicy;
use crate::leases::rfc3339;
use crate::metrics::Metrics;
use crate::store::{
    DeadLetterQuery, DeadLetterRecord, EventStore, StoreError, SubscriptionChange, SubscriptionRecord,
    SubscriptionState,
};

/// How subscriptions are delivered.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// A lease not renewed for this long may be taken by another host.
    pub lease_ttl: Duration,
    /// How often the holder renews it (and a waiting host tries to take it).
    pub renew_every: Duration,
    /// Events read from the log per step (the most one checkpoint move
    /// covers).
    pub read_batch: usize,
    /// Where sinks may connect (see [`crate::egress`]).
    pub egress: Arc<EgressPolicy>,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(3),
            renew_every: Duration::from_millis(1000),
            read_batch: 1024,
            egress: Arc::default(),
        }
    }
}

/// What the runners share.
pub(crate) struct Inner {
    store: Arc<dyn EventStore>,
    metrics: Metrics,
    config: BusConfig,
    /// This host's identity in leases.
    owner: String,
}

struct Running {
    wake: Arc<Notify>,
    /// Counts the lease keeper's hand-overs of the stored row to the
    /// deliverer (while this host holds the lease).
    handovers: watch::Receiver<u64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Runs every subscription; answers operators.
pub struct BusService {
    inner: Arc<Inner>,
    running: Mutex<HashMap<String, Running>>,
    reconciler: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Why an operator's request could not be done.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("{0}")]
    Invalid(String),
    /// The sink cannot take events as defined (NATS unreachable, no stream).
    #[error("{0}")]
    SinkNotReady(String),
    /// The sink's destination is one the host does not connect to.
    #[error("{0}")]
    EgressRefused(String),
    #[error("a subscription named `{0}` exists already")]
    Exists(String),
    #[error("no subscription named `{0}`")]
    UnknownSubscription(String),
    #[error("subscription `{subscription}` has no dead letter {id}")]
    UnknownDeadLetter { subscription: String, id: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A subscription as the API shows it: its definition (secret redacted)
/// and how its delivery stands.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionView {
    pub name: String,
    #[serde(flatten)]
    pub definition: serde_json::Value,
    /// `active`, or `paused` (by an operator, or by a 410 Gone).
    pub state: &'static str,
    pub paused_reason: Option<String>,
    /// The error the delivery is retrying now.
    pub last_error: Option<String>,
    /// Every event up to this position was delivered or dead-lettered.
    pub position: u64,
    /// Events in the log after `position`.
    pub lag: u64,
    pub dead_letters: u64,
    pub revision: u64,
    pub lease: Option<Lease>,
    pub created_at: String,
    pub updated_at: String,
}

/// The host delivering a subscription.
#[derive(Debug, Clone, Serialize)]
pub struct Lease {
    pub owner: String,
    pub epoch: u64,
    pub this_host: bool,
    pub expires_at: String,
}

/// A dead-letter queue entry as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterView {
    pub id: u64,
    pub position: u64,
    pub event_id: String,
    /// The CloudEvent that could not be delivered.
    pub event: serde_json::Value,
    pub error: String,
    pub attempts: u32,
    pub failed_at: String,
    pub retry_requested: bool,
}

/// A page of dead letters.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetterView>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

impl BusService {
    /// Start a runner for every stored subscription, and keep the set in
    /// step with the store (other hosts' creations and deletions) every tick.
    pub async fn start(store: Arc<dyn EventStore>, metrics: Metrics, config: BusConfig) -> Arc<Self> {
        let service = Arc::new(Self {
            inner: Arc::new(Inner { store, metrics, owner: crate::leases::owner_id(), config }),
            running: Mutex::new(HashMap::new()),
            reconciler: Mutex::new(None),
        });
        if let Err(error) = service.reconcile().await {
            tracing::warn!(%error, "cannot read the subscriptions; retrying");
        }
        let weak = Arc::downgrade(&service);
        let every = service.inner.config.renew_every;
        *service.reconciler.lock() = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(service) = weak.upgrade() else { return };
                if let Err(error) = service.reconcile().await {
                    tracing::debug!(%error, "cannot read the subscriptions");
                }
            }
        }));
        service
    }

    /// Runners for the stored subscriptions, none for the others; the
    /// gauges of all.
    async fn reconcile(&self) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let records = self.inner.store.subscriptions().await?;
        let head = *self.inner.store.head().borrow();
        let mut running = self.running.lock();
        running.retain(|name, runner| {
            let keep = records.iter().any(|r| &r.name == name);
            if !keep {
                runner.stop.send_replace(true);
                self.inner.metrics.forget_subscription(name);
            }
            keep
        });
        for record in &records {
            let metrics = &self.inner.metrics;
            metrics.set_subscription_state(&record.name, record.state.as_str());
            metrics.set_subscription_dead_letters(&record.name, record.dead_letters);
            let holding = record.owner.as_deref() == Some(self.inner.owner.as_str());
            if !holding {
                metrics.set_subscription_lag(&record.name, head.saturating_sub(record.position));
            }
            running.entry(record.name.clone()).or_insert_with(|| {
                let wake = Arc::new(Notify::new());
                let (stop, stop_receiver) = watch::channel(false);
                let (handed_over, handovers) = watch::channel(0);
                let runner = runner::Runner {
                    name: record.name.clone(),
                    inner: self.inner.clone(),
                    wake: wake.clone(),
                    handed_over: Arc::new(handed_over),
                    stop: stop_receiver,
                };
                Running { wake, handovers, stop, task: tokio::spawn(runner.run()) }
            });
        }
        Ok(records)
    }

    /// Stop every runner (each releases its lease) and the reconciler.
    pub async fn stop(&self) {
        if let Some(reconciler) = self.reconciler.lock().take() {
            reconciler.abort();
        }
        let runners: Vec<Running> = self.running.lock().drain().map(|(_, running)| running).collect();
        for runner in &runners {
            runner.stop.send_replace(true);
        }
        for runner in runners {
            let _ = runner.task.await;
        }
    }

    fn wake(&self, name: &str) {
        if let Some(runner) = self.running.lock().get(name) {
            runner.wake.notify_one();
        }
    }

    /// `POST /v1/subscriptions`: check the definition (and that its sink
    /// can take events: NATS reachable, a stream for its subjects), store it.
    pub async fn create(&self, body: &[u8]) -> Result<SubscriptionView, BusError> {
        let spec = SubscriptionSpec::parse(body).map_err(BusError::Invalid)?;
        check_sink(&spec.sink, &self.inner.config.egress).await?;
        let change = SubscriptionChange::Create {
            name: spec.name.clone(),
            spec: serde_json::to_string(&spec).expect("a spec is JSON"),
            start_at_head: spec.delivery.start == Start::Now,
        };
        if self.inner.store.change_subscription(change).await?.rows == 0 {
            return Err(BusError::Exists(spec.name));
        }
        tracing::info!(subscription = %spec.name, "subscription created");
        self.reconcile().await?;
        self.get(&spec.name).await
    }

    /// `PUT /v1/subscriptions/{name}`: a new definition (the body's `name`
    /// may be left out; if given it must be `name`). The checkpoint, state
    /// and dead letters stay; `delivery.start` is not read again.
    pub async fn update(&self, name: &str, body: &[u8]) -> Result<SubscriptionView, BusError> {
        let mut value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| BusError::Invalid(format!("invalid subscription: {e}")))?;
        if let Some(object) = value.as_object_mut() {
            let named = object.entry("name").or_insert_with(|| name.into());
            if named != name {
                return Err(BusError::Invalid(format!(
                    "the body names `{named}`, the path `{name}`: rename is not supported"
                )));
            }
        }
        let spec = SubscriptionSpec::parse(&serde_json::to_vec(&value).expect("JSON")).map_err(BusError::Invalid)?;
        check_sink(&spec.sink, &self.inner.config.egress).await?;
        let change = SubscriptionChange::Update {
            name: name.to_owned(),
            spec: serde_json::to_string(&spec).expect("a spec is JSON"),
        };
        self.changed(name, change).await?;
        self.get(name).await
    }

    pub async fn delete(&self, name: &str) -> Result<(), BusError> {
        self.changed(name, SubscriptionChange::Delete { name: name.to_owned() }).await?;
        tracing::info!(subscription = %name, "subscription deleted");
        self.reconcile().await?;
        Ok(())
    }

    pub async fn pause(&self, name: &str) -> Result<SubscriptionView, BusError> {
        let reason = Some("paused by an operator".to_owned());
        let change = SubscriptionChange::SetState { name: name.to_owned(), state: SubscriptionState::Paused, reason };
        self.changed(name, change).await?;
        self.inner.metrics.set_subscription_state(name, "paused");
        self.get(name).await
    }

    pub async fn resume(&self, name: &str) -> Result<SubscriptionView, BusError> {
        let change =
            SubscriptionChange::SetState { name: name.to_owned(), state: SubscriptionState::Active, reason: None };
        self.changed(name, change).await?;
        self.inner.metrics.set_subscription_state(name, "active");
        self.get(name).await
    }

    /// Run a change of one named subscription and wake its runner. When
    /// this host delivers it, wait (at most 1 s) until its deliverer holds
    /// a row read after the change — two hand-overs, the first may come
    /// from a read already under way — so a pause answered here stops
    /// every later delivery.
    async fn changed(&self, name: &str, change: SubscriptionChange) -> Result<u64, BusError> {
        let rows = self.inner.store.change_subscription(change).await?.rows;
        if rows == 0 {
            return Err(BusError::UnknownSubscription(name.to_owned()));
        }
        let handovers = self.running.lock().get(name).map(|runner| runner.handovers.clone());
        self.wake(name);
        if let Some(mut handovers) = handovers {
            let seen = *handovers.borrow_and_update();
            let holding = self
                .inner
                .store
                .subscriptions()
                .await?
                .iter()
                .any(|record| record.name == name && record.owner.as_deref() == Some(self.inner.owner.as_str()));
            if holding {
                let handed_over = handovers.wait_for(|count| *count >= seen + 2);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), handed_over).await;
            }
        }
        Ok(rows)
    }

    pub async fn list(&self) -> Result<Vec<SubscriptionView>, BusError> {
        let records = self.inner.store.subscriptions().await?;
        let head = *self.inner.store.head().borrow();
        Ok(records.into_iter().map(|record| self.view(record, head)).collect())
    }

    pub async fn get(&self, name: &str) -> Result<SubscriptionView, BusError> {
        self.list()
            .await?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| BusError::UnknownSubscription(name.to_owned()))
    }

    fn view(&self, record: SubscriptionRecord, head: u64) -> SubscriptionView {
        let definition = match serde_json::from_str::<SubscriptionSpec>(&record.spec) {
            Ok(spec) => {
                let mut shown = spec.redacted();
                if let Some(object) = shown.as_object_mut() {
                    object.remove("name");
                }
                shown
            }
            Err(error) => serde_json::json!({ "definition_error": error.to_string() }),
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        let lease = record.owner.clone().filter(|_| record.lease_expires_ms > now_ms).map(|owner| Lease {
            this_host: owner == self.inner.owner,
            owner,
            epoch: record.epoch,
            expires_at: rfc3339(record.lease_expires_ms),
        });
        SubscriptionView {
            definition,
            state: record.state.as_str(),
            paused_reason: record.paused_reason,
            last_error: record.last_error,
            position: record.position,
            lag: head.saturating_sub(record.position),
            dead_letters: record.dead_letters,
            revision: record.revision,
            lease,
            created_at: rfc3339(record.created_at_ms),
            updated_at: rfc3339(record.updated_at_ms),
            name: record.name,
        }
    }

    /// `GET /v1/subscriptions/{name}/dead-letters?cursor=&limit=`
    pub async fn dead_letters(&self, name: &str, after: Option<u64>, limit: usize) -> Result<DeadLetterPage, BusError> {
        self.get(name).await?;
        let query =
            DeadLetterQuery { subscription: name.to_owned(), after, limit: limit + 1, retry_requested_only: false };
        let mut letters = self.inner.store.dead_letters(&query).await?;
        let next_cursor = (letters.len() > limit).then(|| {
            letters.truncate(limit);
            letters.last().map(|l| l.id.to_string()).unwrap_or_default()
        });
        Ok(DeadLetterPage { dead_letters: letters.into_iter().map(dead_letter_view).collect(), next_cursor })
    }

    /// Ask the delivering host to deliver one dead letter (`Some(id)`) or
    /// all of them again; returns how many were asked for.
    pub async fn retry_dead_letters(&self, name: &str, id: Option<u64>) -> Result<u64, BusError> {
        self.get(name).await?;
        let rows = self
            .inner
            .store
            .change_subscription(SubscriptionChange::RequestRetry { name: name.to_owned(), id })
            .await?
            .rows;
        if let (Some(id), 0) = (id, rows) {
            return Err(BusError::UnknownDeadLetter { subscription: name.to_owned(), id });
        }
        self.wake(name);
        Ok(rows)
    }

    pub async fn discard_dead_letter(&self, name: &str, id: u64) -> Result<(), BusError> {
        self.get(name).await?;
        let change = SubscriptionChange::Discard { name: name.to_owned(), id };
        if self.inner.store.change_subscription(change).await?.rows == 0 {
            return Err(BusError::UnknownDeadLetter { subscription: name.to_owned(), id });
        }
        self.wake(name);
        Ok(())
    }
}

/// Declare subscriptions from a JSON array of definitions: each one is
/// created when no subscription has its name, and updated when its stored
/// definition differs; subscriptions the array does not name are left
/// alone. Sinks are not checked here (a runner retries a sink that is not
/// ready, and shows why in `last_error`). Returns what changed.
pub async fn declare(store: &dyn EventStore, json: &[u8]) -> Result<Vec<String>, BusError> {
    let definitions: Vec<serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| BusError::Invalid(format!("expected a JSON array of subscription definitions: {e}")))?;
    let stored = store.subscriptions().await?;
    let mut changes = Vec::new();
    for (index, definition) in definitions.iter().enumerate() {
        let spec = SubscriptionSpec::parse(definition.to_string().as_bytes())
            .map_err(|e| BusError::Invalid(format!("definition {index}: {e}")))?;
        let text = serde_json::to_string(&spec).expect("a spec is JSON");
        let name = spec.name.clone();
        match stored.iter().find(|record| record.name == name) {
            None => {
                let start_at_head = spec.delivery.start == Start::Now;
                store
                    .change_subscription(SubscriptionChange::Create { name: name.clone(), spec: text, start_at_head })
                    .await?;
                changes.push(format!("subscription `{name}` created"));
            }
            Some(record) if record.spec != text => {
                store.change_subscription(SubscriptionChange::Update { name: name.clone(), spec: text }).await?;
                changes.push(format!("subscription `{name}` updated"));
            }
            Some(_) => {}
        }
    }
    Ok(changes)
}

/// Refuse a sink that cannot take events now, with the reason: a
/// destination the egress policy refuses, a NATS server that does not
/// answer, or no stream capturing the subjects.
async fn check_sink(sink: &SinkSpec, egress: &Arc<EgressPolicy>) -> Result<(), BusError> {
    let refused = |reason: String| BusError::EgressRefused(format!("`sink.url`: {reason}"));
    match sink {
        SinkSpec::Nats { .. } => sink::Sink::connect(sink, egress).await.map(drop).map_err(|failure| match failure {
            sink::ConnectError::Refused(reason) => refused(reason),
            sink::ConnectError::NotReady(reason) => BusError::SinkNotReady(reason),
        }),
        SinkSpec::Webhook { url, .. } => {
            let url = reqwest::Url::parse(url).map_err(|e| BusError::Invalid(e.to_string()))?;
            egress.check_url(&url).await.map_err(refused)
        }
    }
}

fn dead_letter_view(letter: DeadLetterRecord) -> DeadLetterView {
    DeadLetterView {
        id: letter.id,
        position: letter.position,
        event_id: letter.event_id,
        event: serde_json::from_str(&letter.event).unwrap_or(serde_json::Value::String(letter.event)),
        error: letter.error,
        attempts: letter.attempts,
        failed_at: rfc3339(letter.failed_at_ms),
        retry_requested: letter.retry_requested,
    }
}
