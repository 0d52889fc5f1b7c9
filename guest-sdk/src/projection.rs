//! Projections: typed read-model builders and their type-erased adapter.
//!
//! A projection reads events and writes JSON documents addressed by
//! `(collection, key)`. The host first asks which documents a batch touches,
//! loads them, then runs the batch; the SDK keeps an in-batch overlay so a
//! document written by one event is seen by the next.

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::codec;
use crate::{DomainError, Envelope, RecordedEvent};

/// Address of one read-model document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocumentKey {
    pub collection: String,
    pub key: String,
}

impl DocumentKey {
    pub fn new(collection: impl Into<String>, key: impl Into<String>) -> Self {
        Self { collection: collection.into(), key: key.into() }
    }
}

/// One change to a read model, as returned to the host.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadModelOp {
    Upsert(DocumentKey, String),
    Delete(DocumentKey),
}

/// Builds read-model documents from events.
///
/// `Event` is an enum (externally tagged, like an aggregate's events) whose
/// variant names are the event types the projection subscribes to. When it
/// is the `Event` type of an aggregate the module registers, the
/// subscription names that aggregate's events (`account.MoneyDeposited`)
/// and nothing else: another module's event of the same name never reaches
/// the projection. Otherwise (events of another module, or an enum of its
/// own) register it with
/// [`ModuleBuilder::projection_of`](crate::ModuleBuilder::projection_of),
/// naming whose events they are.
///
/// A worked example — a running total per customer, tested natively:
///
/// ```
/// use orchestrix_guest::testing::projection;
/// use orchestrix_guest::{DocumentKey, Documents, DomainError, Envelope, Projection};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// enum OrderEvent {
///     Placed { customer: String, total: i64 },
///     Cancelled { customer: String, total: i64 },
/// }
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Spent {
///     total: i64,
///     orders: u32,
/// }
///
/// #[derive(Default)]
/// struct SpentPerCustomer;
///
/// impl Projection for SpentPerCustomer {
///     const NAME: &'static str = "spent_per_customer";
///     type Event = OrderEvent;
///
///     // Name every document `project` reads: the host loads them first.
///     fn touches(&self, event: &Envelope<OrderEvent>) -> Vec<DocumentKey> {
///         match &event.event {
///             OrderEvent::Placed { customer, .. } | OrderEvent::Cancelled { customer, .. } => {
///                 vec![DocumentKey::new("customers", customer)]
///             }
///         }
///     }
///
///     fn project(&self, event: &Envelope<OrderEvent>, documents: &mut Documents) -> Result<(), DomainError> {
///         let (customer, change, orders) = match &event.event {
///             OrderEvent::Placed { customer, total } => (customer, *total, 1),
///             OrderEvent::Cancelled { customer, total } => (customer, -*total, -1),
///         };
///         let mut spent: Spent = documents.get("customers", customer)?.unwrap_or_default();
///         spent.total += change;
///         spent.orders = spent.orders.saturating_add_signed(orders);
///         documents.upsert("customers", customer, &spent)
///     }
/// }
///
/// projection::<SpentPerCustomer>()
///     .given("order", "o1", [OrderEvent::Placed { customer: "ada".into(), total: 30 }])
///     .given("order", "o2", [OrderEvent::Placed { customer: "ada".into(), total: 12 }])
///     .given("order", "o1", [OrderEvent::Cancelled { customer: "ada".into(), total: 30 }])
///     .then_expect_collection("customers", [("ada", serde_json::json!({"total": 12, "orders": 1}))]);
/// ```
pub trait Projection: Default + Send + Sync + 'static {
    /// Projection name, unique across all modules.
    const NAME: &'static str;
    /// Bump it when the projection's logic changes: the host rebuilds.
    const VERSION: u32 = 1;
    /// The events it consumes.
    type Event: DeserializeOwned + 'static;

    /// The documents `project` reads for this event.
    fn touches(&self, event: &Envelope<Self::Event>) -> Vec<DocumentKey>;

    /// Apply one event to the documents.
    fn project(&self, event: &Envelope<Self::Event>, documents: &mut Documents) -> Result<(), DomainError>;
}

/// The documents a projection can see and change while it runs a batch.
///
/// Changes are kept as the documents' latest state: the batch returns one
/// operation per changed document, serialized once, however many events
/// wrote it.
#[derive(Debug, Default)]
pub struct Documents {
    /// Each document's state, and whether this batch changed it.
    current: BTreeMap<DocumentKey, (Option<Value>, bool)>,
}

impl Documents {
    pub(crate) fn new(loaded: impl IntoIterator<Item = (DocumentKey, Option<Value>)>) -> Self {
        Self { current: loaded.into_iter().map(|(key, body)| (key, (body, false))).collect() }
    }

    /// Read a document. It must have been named by `touches`.
    pub fn get<T: DeserializeOwned>(&self, collection: &str, key: &str) -> Result<Option<T>, DomainError> {
        let address = DocumentKey::new(collection, key);
        match self.current.get(&address) {
            Some((Some(body), _)) => T::deserialize(body)
                .map(Some)
                .map_err(|e| DomainError::Invalid(format!("document {collection}/{key} has an unexpected shape: {e}"))),
            Some((None, _)) => Ok(None),
            None => Err(DomainError::Invalid(format!(
                "document {collection}/{key} was not loaded: return it from `touches`"
            ))),
        }
    }

    /// Create or replace a document.
    pub fn upsert<T: Serialize>(&mut self, collection: &str, key: &str, body: &T) -> Result<(), DomainError> {
        let body = serde_json::to_value(body)
            .map_err(|e| DomainError::Invalid(format!("cannot serialize document {collection}/{key}: {e}")))?;
        self.current.insert(DocumentKey::new(collection, key), (Some(body), true));
        Ok(())
    }

    /// Remove a document (absent documents are fine).
    pub fn delete(&mut self, collection: &str, key: &str) {
        self.current.insert(DocumentKey::new(collection, key), (None, true));
    }

    /// One operation per changed document (in key order): its state at the
    /// end of the batch.
    pub(crate) fn into_ops(self) -> Vec<ReadModelOp> {
        self.current
            .into_iter()
            .filter(|(_, (_, changed))| *changed)
            .map(|(address, (body, _))| match body {
                Some(body) => ReadModelOp::Upsert(address, body.to_string()),
                None => ReadModelOp::Delete(address),
            })
            .collect()
    }
}

pub(crate) trait ErasedProjection: Send + Sync {
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    fn event_types(&self) -> Vec<String>;
    fn event_enum(&self) -> std::any::TypeId;
    fn touches(&self, events: Vec<RecordedEvent>) -> Result<Vec<DocumentKey>, DomainError>;
    fn project(&self, events: Vec<RecordedEvent>, documents: &mut Documents) -> Result<(), DomainError>;
}

pub(crate) struct ProjectionAdapter<P> {
    projection: P,
}

impl<P: Projection> ProjectionAdapter<P> {
    pub(crate) fn new() -> Self {
        Self { projection: P::default() }
    }
}

impl<P: Projection> ErasedProjection for ProjectionAdapter<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn version(&self) -> u32 {
        P::VERSION
    }

    fn event_types(&self) -> Vec<String> {
        codec::variant_names::<P::Event>()
    }

    fn event_enum(&self) -> std::any::TypeId {
        std::any::TypeId::of::<P::Event>()
    }

    fn touches(&self, events: Vec<RecordedEvent>) -> Result<Vec<DocumentKey>, DomainError> {
        let mut seen = std::collections::BTreeSet::new();
        let mut keys = Vec::new();
        for event in events {
            for key in self.projection.touches(&Envelope::decode_owned(event)?) {
                if seen.insert(key.clone()) {
                    keys.push(key);
                }
            }
        }
        Ok(keys)
    }

    fn project(&self, events: Vec<RecordedEvent>, documents: &mut Documents) -> Result<(), DomainError> {
        for event in events {
            self.projection.project(&Envelope::decode_owned(event)?, documents)?;
        }
        Ok(())
    }
}
