//! One subscription's loop. Every host runs one per subscription; only the
//! one holding the subscription's lease delivers. While it holds it, a
//! keeper task renews the lease every tick and hands the loop the
//! subscription's row as stored (so a pause, an edit or a lost lease
//! reaches the loop within a tick, at once on this host). The loop reads
//! the log after the checkpoint, keeps the events the filter takes, hands
//! them to the sink in order, retries failures with backoff, dead-letters
//! what keeps failing, and moves the checkpoint only over what the sink
//! acknowledged or the queue took.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::Inner;
use super::sink::{Outgoing, Sink};
use super::spec::{EventFilter, RetryPolicy, SubscriptionSpec};
use crate::store::{
    DeadLetterQuery, NewDeadLetter, StoreError, SubscriptionChange, SubscriptionFence, SubscriptionRecord,
    SubscriptionState,
};

/// Events read past without a delivery before the checkpoint is written
/// anyway (it is also written when the loop goes idle).
const CHECKPOINT_EVERY: u64 = 10_000;
/// How often the dead-letter queue is checked for entries an operator
/// asked to retry, while it has entries.
const REDELIVERY_CHECK: Duration = Duration::from_millis(250);
/// Dead letters retried per check.
const REDELIVERY_BATCH: usize = 64;
/// The longest the loop waits for the head to move before reading anyway.
const POLL: Duration = Duration::from_millis(500);
/// While a read batch is being delivered, the checkpoint follows the
/// acknowledgements at least this often, so a crash repeats at most this
/// much delivery work (not the whole batch).
const CHECKPOINT_WHILE_DELIVERING: Duration = Duration::from_millis(200);

/// What the keeper tells the loop.
#[derive(Clone)]
enum Held {
    /// The lease is held; the row as last read.
    Holding(Box<SubscriptionRecord>),
    /// The lease is gone (taken, expired, or the subscription deleted).
    Lost,
}

/// The sink and the parsed definition of one revision.
struct Ready {
    revision: u64,
    sink: Sink,
    filter: Arc<EventFilter>,
    retry: RetryPolicy,
}

/// Where a delivery of read events ended — all done (`to: None`), or
/// interrupted (lease lost, paused, edited, stopping) with everything up to
/// `to` done — and what it dead-lettered on the way.
struct Progress {
    to: Option<u64>,
    dead: Vec<NewDeadLetter>,
}

pub(super) struct Runner {
    pub name: String,
    pub inner: Arc<Inner>,
    pub wake: Arc<Notify>,
    /// Bumped after each hand-over of the stored row to the deliverer.
    pub handed_over: Arc<watch::Sender<u64>>,
    pub stop: watch::Receiver<bool>,
}

impl Runner {
    pub async fn run(mut self) {
        let mut warned = false;
        loop {
            if *self.stop.borrow() {
                return;
            }
            match self.acquire().await {
                Ok(Some((fence, position))) => {
                    warned = false;
                    tracing::info!(subscription = %self.name, epoch = fence.epoch, position, "delivering");
                    self.hold(fence, position).await;
                    self.inner.metrics.set_subscription_delivering(&self.name, false);
                }
                Ok(None) => {}
                Err(error) if !warned => {
                    warned = true;
                    tracing::warn!(subscription = %self.name, %error, "cannot take the subscription's lease");
                }
                Err(_) => {}
            }
            tokio::select! {
                () = tokio::time::sleep(self.inner.config.renew_every) => {}
                () = self.wake.notified() => {}
                _ = self.stop.changed() => {}
            }
        }
    }

    async fn acquire(&self) -> Result<Option<(SubscriptionFence, u64)>, StoreError> {
        let applied = self
            .inner
            .store
            .change_subscription(SubscriptionChange::Acquire {
                name: self.name.clone(),
                owner: self.inner.owner.clone(),
                ttl_ms: self.inner.config.lease_ttl.as_millis() as i64,
            })
            .await?;
        Ok(applied.lease.map(|(epoch, position)| {
            (SubscriptionFence { name: self.name.clone(), owner: self.inner.owner.clone(), epoch }, position)
        }))
    }

    /// Deliver while the lease is held.
    async fn hold(&mut self, fence: SubscriptionFence, checkpoint: u64) {
        let (held_sender, mut held) = watch::channel(Held::Lost);
        let keeper = tokio::spawn(keep_lease(
            self.inner.clone(),
            fence.clone(),
            self.wake.clone(),
            self.stop.clone(),
            held_sender,
            self.handed_over.clone(),
        ));
        // The keeper's first read, before anything else.
        if held.changed().await.is_err() {
            return;
        }
        self.inner.metrics.set_subscription_delivering(&self.name, true);
        let mut delivery = Delivery {
            runner: self,
            fence,
            position: checkpoint,
            checkpoint,
            ready: None,
            connect_failures: 0,
            redelivery_checked: Instant::now() - REDELIVERY_CHECK,
            paused_at_ms: None,
            advanced_at: Instant::now(),
        };
        delivery.run(&mut held).await;
        let Delivery { fence, position, checkpoint, .. } = delivery;
        if position != checkpoint {
            let _ = self.advance(&fence, checkpoint, position, Vec::new()).await;
        }
        keeper.abort();
        if *self.stop.borrow() {
            let _ = self.inner.store.change_subscription(SubscriptionChange::Release { fence }).await;
        }
    }

    async fn advance(
        &self,
        fence: &SubscriptionFence,
        from: u64,
        to: u64,
        dead: Vec<NewDeadLetter>,
    ) -> Result<(), StoreError> {
        let change = SubscriptionChange::Advance { fence: fence.clone(), from, to, dead };
        self.inner.store.change_subscription(change).await.map(|_| ())
    }
}

/// Renew the lease every tick (and when woken), then read the row and hand
/// it over; hand over `Lost` when the lease is gone or cannot be renewed
/// for a whole time to live.
async fn keep_lease(
    inner: Arc<Inner>,
    fence: SubscriptionFence,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    held: watch::Sender<Held>,
    handed_over: Arc<watch::Sender<u64>>,
) {
    let ttl_ms = inner.config.lease_ttl.as_millis() as i64;
    let mut renewed = Instant::now();
    loop {
        let renewal = inner.store.change_subscription(SubscriptionChange::Renew { fence: fence.clone(), ttl_ms }).await;
        match renewal {
            Ok(applied) if applied.rows == 1 => {
                renewed = Instant::now();
                match inner.store.subscriptions().await {
                    Ok(records) => match records.into_iter().find(|r| r.name == fence.name) {
                        Some(record) => {
                            held.send_replace(Held::Holding(Box::new(record)));
                            handed_over.send_modify(|count| *count += 1);
                        }
                        None => {
                            held.send_replace(Held::Lost);
                            return;
                        }
                    },
                    Err(error) => tracing::debug!(subscription = %fence.name, %error, "cannot read the subscription"),
                }
            }
            Ok(_) => {
                tracing::info!(subscription = %fence.name, "another host took the subscription's lease");
                held.send_replace(Held::Lost);
                return;
            }
            Err(error) => {
                tracing::warn!(subscription = %fence.name, %error, "cannot renew the subscription's lease");
                if renewed.elapsed() >= inner.config.lease_ttl {
                    held.send_replace(Held::Lost);
                    return;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(inner.config.renew_every) => {}
            () = wake.notified() => {}
            _ = stop.changed() => {
                held.send_replace(Held::Lost);
                return;
            }
        }
    }
}

/// The state of one lease's delivery.
struct Delivery<'r> {
    runner: &'r Runner,
    fence: SubscriptionFence,
    /// How far the log has been read and delivered.
    position: u64,
    /// The checkpoint as stored (at most `position`).
    checkpoint: u64,
    ready: Option<Ready>,
    connect_failures: u32,
    redelivery_checked: Instant,
    /// When this host paused the subscription (a 410), by the database's
    /// clock: rows read before then still say `active`.
    paused_at_ms: Option<i64>,
    /// When the checkpoint last moved during a delivery.
    advanced_at: Instant,
}

impl Delivery<'_> {
    fn name(&self) -> &str {
        &self.runner.name
    }

    async fn run(&mut self, held: &mut watch::Receiver<Held>) {
        let store = self.runner.inner.store.clone();
        let metrics = self.runner.inner.metrics.clone();
        let mut head = store.head();
        let mut ahead: Option<ReadAhead> = None;
        loop {
            let Held::Holding(record) = held.borrow_and_update().clone() else { return };
            if *self.runner.stop.borrow() {
                return;
            }
            metrics.set_subscription_lag(self.name(), (*head.borrow()).saturating_sub(self.position));
            if let Some(paused_at_ms) = self.paused_at_ms {
                if record.updated_at_ms < paused_at_ms {
                    if held.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                self.paused_at_ms = None;
            }
            if record.state == SubscriptionState::Paused {
                self.persist().await;
                if held.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if self.ready.as_ref().is_none_or(|ready| ready.revision != record.revision)
                && !self.prepare(&record, held).await
            {
                continue;
            }
            if record.dead_letters > 0 && self.redelivery_checked.elapsed() >= REDELIVERY_CHECK {
                self.redelivery_checked = Instant::now();
                if !self.redeliver().await {
                    continue;
                }
            }
            let ready = self.ready.as_ref().expect("prepared above");
            let (filter, revision) = (ready.filter.clone(), ready.revision);
            let read = match ahead.take() {
                Some((from, read_for, task)) if from == self.position && read_for == revision => {
                    task.await.unwrap_or_else(|e| Err(StoreError::unavailable(e.to_string())))
                }
                other => {
                    if let Some((_, _, task)) = other {
                        task.abort();
                    }
                    read_batch(store.clone(), self.position, self.runner.inner.config.read_batch, filter.clone()).await
                }
            };
            let read = match read {
                Ok(read) => read,
                Err(error) => {
                    tracing::warn!(subscription = %self.name(), %error, "cannot read the log");
                    tokio::time::sleep(self.runner.inner.config.renew_every).await;
                    continue;
                }
            };
            let Some(last) = read.last else {
                self.persist().await;
                tokio::select! {
                    _ = head.wait_for(|h| *h > self.position) => {}
                    _ = held.changed() => {}
                    () = tokio::time::sleep(POLL) => {}
                }
                continue;
            };
            // The next batch is read (and rendered) while this one is
            // delivered; it is used only if this one is delivered whole.
            if read.full {
                let limit = self.runner.inner.config.read_batch;
                ahead = Some((last, revision, tokio::spawn(read_batch(store.clone(), last, limit, filter))));
            }
            let matched = read.matched;
            if matched.is_empty() {
                self.position = last;
                if self.position - self.checkpoint >= CHECKPOINT_EVERY {
                    self.persist().await;
                }
                continue;
            }
            let Progress { to, dead } = self.deliver(&matched, held).await;
            let to = to.unwrap_or(last);
            if to > self.position || !dead.is_empty() {
                match self.runner.advance(&self.fence, self.checkpoint, to.max(self.position), dead).await {
                    Ok(()) => {
                        self.position = to.max(self.position);
                        self.checkpoint = self.position;
                        self.advanced_at = Instant::now();
                    }
                    Err(StoreError::LeaseLost(why)) => {
                        tracing::info!(subscription = %self.name(), %why, "lease lost; stopping delivery");
                        return;
                    }
                    Err(error) => {
                        // Delivered but not recorded: delivered again later
                        // (at least once).
                        tracing::warn!(subscription = %self.name(), %error, "cannot move the checkpoint");
                        tokio::time::sleep(self.runner.inner.config.renew_every).await;
                    }
                }
            }
        }
    }

    /// Write the checkpoint when reading moved past it without deliveries.
    async fn persist(&mut self) {
        if self.position != self.checkpoint
            && self.runner.advance(&self.fence, self.checkpoint, self.position, Vec::new()).await.is_ok()
        {
            self.checkpoint = self.position;
        }
    }

    /// Parse the definition and connect its sink; on failure, record the
    /// error and wait a backoff (or a change of the row). Returns whether
    /// the sink is ready.
    async fn prepare(&mut self, record: &SubscriptionRecord, held: &mut watch::Receiver<Held>) -> bool {
        let spec = match serde_json::from_str::<SubscriptionSpec>(&record.spec) {
            Ok(spec) => spec,
            Err(error) => {
                tracing::error!(subscription = %self.name(), %error, "the stored definition cannot be read");
                let _ = held.changed().await;
                return false;
            }
        };
        match Sink::connect(&spec.sink, &self.runner.inner.config.egress).await {
            Ok(sink) => {
                self.connect_failures = 0;
                self.ready = Some(Ready {
                    revision: record.revision,
                    sink,
                    filter: Arc::new(EventFilter::new(&spec.filter)),
                    retry: spec.retry,
                });
                true
            }
            Err(error) => {
                let error = error.to_string();
                self.connect_failures += 1;
                self.runner.inner.metrics.observe_subscription_failure(self.name());
                self.record_error(Some(error.clone())).await;
                let wait = spec.retry.backoff(self.connect_failures, random());
                tracing::warn!(subscription = %self.name(), %error, retry_in_ms = wait.as_millis() as u64, "sink not ready");
                self.wait_or_change(wait, held, record.revision).await;
                false
            }
        }
    }

    async fn record_error(&self, error: Option<String>) {
        let change = SubscriptionChange::RecordError { fence: self.fence.clone(), error };
        if let Err(error) = self.runner.inner.store.change_subscription(change).await {
            tracing::debug!(subscription = %self.name(), %error, "cannot record the delivery error");
        }
    }

    /// Sleep `wait`, or less when the lease is lost, the subscription is
    /// paused or edited, or the host stops. Returns whether it slept it all.
    async fn wait_or_change(&self, wait: Duration, held: &mut watch::Receiver<Held>, revision: u64) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        let mut stop = self.runner.stop.clone();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return true,
                _ = stop.changed() => return false,
                changed = held.changed() => {
                    let keep_waiting = changed.is_ok() && match &*held.borrow() {
                        Held::Holding(record) => record.state == SubscriptionState::Active && record.revision == revision,
                        Held::Lost => false,
                    };
                    if !keep_waiting {
                        return false;
                    }
                }
            }
        }
    }

    /// Deliver `matched` in order, retrying each failure with backoff and
    /// dead-lettering what fails `max_attempts` times.
    async fn deliver(&mut self, matched: &[Outgoing], held: &mut watch::Receiver<Held>) -> Progress {
        let metrics = self.runner.inner.metrics.clone();
        let name = self.runner.name.clone();
        let name = name.as_str();
        let ready = self.ready.as_ref().expect("prepared");
        let (revision, retry, unit) = (ready.revision, ready.retry, ready.sink.unit());
        let mut dead = Vec::new();
        let mut next = 0;
        let mut failures = 0u32;
        let mut failing = false;
        while next < matched.len() {
            let ready = self.ready.as_mut().expect("prepared");
            match ready.sink.deliver(&matched[next..]).await {
                Ok(count) => {
                    observe_delivered(&metrics, name, &matched[next..next + count]);
                    next += count;
                    failures = 0;
                    if failing {
                        failing = false;
                        metrics.set_subscription_failing(name, false);
                        self.record_error(None).await;
                    }
                    if next < matched.len() && self.advanced_at.elapsed() >= CHECKPOINT_WHILE_DELIVERING {
                        let to = matched[next - 1].event.position;
                        match self.runner.advance(&self.fence, self.checkpoint, to, dead.clone()).await {
                            Ok(()) => {
                                (self.position, self.checkpoint) = (to, to);
                                dead.clear();
                            }
                            // Lost: the caller's own move fails and stops.
                            Err(StoreError::LeaseLost(_)) => return Progress { to: Some(to), dead },
                            // Moved later, with the rest.
                            Err(_) => {}
                        }
                        self.advanced_at = Instant::now();
                    }
                }
                Err(failure) => {
                    observe_delivered(&metrics, name, &matched[next..next + failure.delivered]);
                    next += failure.delivered;
                    failures += 1;
                    metrics.observe_subscription_failure(name);
                    let before_failed = Some(matched[next].event.position - 1);
                    if failure.gone {
                        self.pause_held(&failure.error).await;
                        return Progress { to: before_failed, dead };
                    }
                    if failures >= retry.max_attempts {
                        let unit = unit.min(matched.len() - next);
                        tracing::warn!(
                            subscription = %name,
                            position = matched[next].event.position,
                            events = unit,
                            attempts = failures,
                            error = %failure.error,
                            "giving up on delivery; dead-lettered"
                        );
                        for outgoing in &matched[next..next + unit] {
                            dead.push(NewDeadLetter {
                                position: outgoing.event.position,
                                event_id: outgoing.event.id.to_string(),
                                event: String::from_utf8_lossy(&outgoing.body).into_owned(),
                                error: failure.error.clone(),
                                attempts: failures,
                            });
                        }
                        metrics.observe_subscription_dead_lettered(name, unit);
                        next += unit;
                        failures = 0;
                        continue;
                    }
                    let wait = retry.backoff(failures, random());
                    if !failing {
                        failing = true;
                        metrics.set_subscription_failing(name, true);
                        tracing::warn!(
                            subscription = %name,
                            position = matched[next].event.position,
                            error = %failure.error,
                            retry_in_ms = wait.as_millis() as u64,
                            "delivery failed; retrying"
                        );
                    } else {
                        tracing::debug!(subscription = %name, attempt = failures, error = %failure.error, "delivery failed again");
                    }
                    self.record_error(Some(failure.error)).await;
                    if !self.wait_or_change(wait, held, revision).await {
                        metrics.set_subscription_failing(name, false);
                        return Progress { to: before_failed, dead };
                    }
                }
            }
        }
        if failing {
            metrics.set_subscription_failing(name, false);
        }
        Progress { to: None, dead }
    }

    /// Pause the subscription because its sink is gone (410), and hold
    /// delivery until the row says so (or says it was resumed since).
    async fn pause_held(&mut self, error: &str) {
        tracing::warn!(subscription = %self.name(), %error, "the webhook is gone; pausing");
        let change = SubscriptionChange::PauseHeld { fence: self.fence.clone(), reason: format!("paused: {error}") };
        if let Ok(applied) = self.runner.inner.store.change_subscription(change).await {
            self.paused_at_ms = Some(applied.now_ms);
            self.runner.inner.metrics.set_subscription_state(self.name(), "paused");
        }
        self.runner.wake.notify_one();
    }

    /// Deliver the dead letters an operator asked to retry, once each.
    /// Returns false when the sink is gone (the subscription paused).
    async fn redeliver(&mut self) -> bool {
        let store = self.runner.inner.store.clone();
        let query = DeadLetterQuery {
            subscription: self.name().to_owned(),
            after: None,
            limit: REDELIVERY_BATCH,
            retry_requested_only: true,
        };
        let letters = match store.dead_letters(&query).await {
            Ok(letters) => letters,
            Err(error) => {
                tracing::debug!(subscription = %self.name(), %error, "cannot read the dead letters");
                return true;
            }
        };
        for letter in letters {
            let event = match store.read_all(letter.position - 1, 1).await {
                Ok(mut events) if events.first().is_some_and(|e| e.position == letter.position) => events.remove(0),
                Ok(_) => continue,
                Err(_) => return true,
            };
            let outgoing = [Outgoing::new(event)];
            let ready = self.ready.as_mut().expect("prepared");
            let (change, gone) = match ready.sink.deliver(&outgoing).await {
                Ok(_) => {
                    observe_delivered(&self.runner.inner.metrics, self.name(), &outgoing);
                    self.runner.inner.metrics.observe_subscription_redelivered(self.name());
                    tracing::info!(subscription = %self.name(), id = letter.id, "dead letter delivered");
                    (SubscriptionChange::Redelivered { fence: self.fence.clone(), id: letter.id }, None)
                }
                Err(failure) => {
                    self.runner.inner.metrics.observe_subscription_failure(self.name());
                    tracing::warn!(subscription = %self.name(), id = letter.id, error = %failure.error, "dead letter failed again");
                    let gone = failure.gone.then(|| failure.error.clone());
                    let id = letter.id;
                    (SubscriptionChange::RedeliveryFailed { fence: self.fence.clone(), id, error: failure.error }, gone)
                }
            };
            let _ = store.change_subscription(change).await;
            if let Some(error) = gone {
                self.pause_held(&error).await;
                return false;
            }
        }
        true
    }
}

/// A read started ahead: from where, for which revision's filter.
type ReadAhead = (u64, u64, tokio::task::JoinHandle<Result<Read, StoreError>>);

/// One read of the log: the events the filter takes, rendered.
struct Read {
    /// The position of the last event read (`None`: nothing new).
    last: Option<u64>,
    /// The read returned as many events as asked (more may follow).
    full: bool,
    matched: Vec<Outgoing>,
}

async fn read_batch(
    store: Arc<dyn crate::store::EventStore>,
    after: u64,
    limit: usize,
    filter: Arc<EventFilter>,
) -> Result<Read, StoreError> {
    let events = store.read_all(after, limit).await?;
    Ok(Read {
        last: events.last().map(|e| e.position),
        full: events.len() == limit,
        matched: events.into_iter().filter(|event| filter.matches(event)).map(Outgoing::new).collect(),
    })
}

/// Count acknowledged events with their time since commit.
fn observe_delivered(metrics: &crate::metrics::Metrics, subscription: &str, delivered: &[Outgoing]) {
    let now = chrono::Utc::now();
    metrics.observe_subscription_delivered(
        subscription,
        delivered.iter().map(|o| (now - o.event.time).to_std().unwrap_or_default()),
    );
}

/// A random number for backoff jitter.
fn random() -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(Instant::now())
}
