//! Subscriptions to the global feed: catch-up from any position, then live,
//! through one cursor.
//!
//! A subscription only ever asks the store for "events after my cursor", in
//! position order, and moves the cursor to the last one it got. Because the
//! store makes positions gap-free and visible in order, there is no
//! separate catch-up phase to hand over from: history and live events come
//! through the same query, so none is skipped or repeated. The store's head
//! channel only decides when to ask again (at once after a commit, in this
//! process or — on PostgreSQL — another), with polling as the fallback.
//! Subscribers pull, so a slow one delays only itself: the writer never
//! buffers events for it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{EventStore, StoreError, StoredEvent};

/// Which events a subscriber wants. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Event types to deliver: bare (`MoneyDeposited`, any module's),
    /// qualified by aggregate type (`account.MoneyDeposited`) or as
    /// CloudEvents types (`bank.account.MoneyDeposited`).
    pub event_types: Vec<String>,
    /// Deliver only streams whose `aggregate_type/aggregate_id` starts with
    /// this text (`account/` for every account, `account/acc-1` for one).
    pub stream_prefix: Option<String>,
}

impl EventFilter {
    pub fn matches(&self, event: &StoredEvent) -> bool {
        let type_matches = self.event_types.is_empty()
            || self.event_types.iter().any(|t| *t == event.event_type || event.is_named_by(t));
        type_matches
            && self.stream_prefix.as_deref().is_none_or(|prefix| {
                let kind = &event.stream.aggregate_type;
                match prefix.strip_prefix(kind.as_str()) {
                    // The prefix covers the whole type: compare the rest with `/id`.
                    Some(rest) => {
                        rest.is_empty()
                            || rest.strip_prefix('/').is_some_and(|id| event.stream.aggregate_id.starts_with(id))
                    }
                    // The prefix ends inside the type name.
                    None => kind.starts_with(prefix),
                }
            })
    }
}

/// A cursor over the global feed.
pub struct Subscription {
    store: Arc<dyn EventStore>,
    after: u64,
    head: watch::Receiver<u64>,
    filter: EventFilter,
    batch_size: usize,
    poll_interval: Duration,
}

impl Subscription {
    /// Deliver every event after `after` (0: from the beginning).
    pub fn new(store: Arc<dyn EventStore>, after: u64) -> Self {
        let head = store.head();
        Self {
            store,
            after,
            head,
            filter: EventFilter::default(),
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
        }
    }

    pub fn with_filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Most events read from the store at once.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The last position this subscription has consumed, delivered or
    /// filtered out: where a resume continues after.
    pub fn position(&self) -> u64 {
        self.after
    }

    /// The next events after the cursor that pass the filter, waiting until
    /// there is at least one.
    pub async fn next_batch(&mut self) -> Result<Vec<StoredEvent>, StoreError> {
        loop {
            let events = self.store.read_all(self.after, self.batch_size).await?;
            if let Some(last) = events.last() {
                self.after = last.position;
                let delivered: Vec<StoredEvent> = events.into_iter().filter(|e| self.filter.matches(e)).collect();
                if !delivered.is_empty() {
                    return Ok(delivered);
                }
                continue;
            }
            let after = self.after;
            if *self.head.borrow() > after {
                // Announced but not yet readable here (a replica lagging, a
                // pool connection with an older snapshot): ask again shortly.
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            // Woken by a commit, or by the poll interval running out.
            let woken = tokio::time::timeout(self.poll_interval, self.head.wait_for(|head| *head > after)).await;
            if let Ok(Err(_)) = woken {
                return Err(StoreError::ShuttingDown);
            }
        }
    }
}
