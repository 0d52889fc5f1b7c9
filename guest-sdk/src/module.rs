//! The module description: what a module registers, and the registry built from it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::Value;

use crate::aggregate::{AggregateAdapter, ErasedAggregate};
use crate::projection::{ErasedProjection, ProjectionAdapter};
use crate::saga::{ErasedSaga, SagaAdapter};
use crate::{Aggregate, DomainError, Projection, Saga};

/// A domain module: a name, a version and what it registers. Export it with
/// [`export!`](crate::export).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an Orchestrix module",
    label = "this type must implement `orchestrix_guest::Module`",
    note = "write `impl orchestrix_guest::Module for {Self} {{ const NAME: &str = ...; const VERSION: &str = ...; fn register(module: &mut ModuleBuilder) {{ ... }} }}`"
)]
pub trait Module: 'static {
    /// Module identity; the host refuses two loaded files with the same name.
    const NAME: &'static str;
    /// Semantic version, usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;

    /// Register the module's aggregates, projections, sagas and upcasters.
    fn register(module: &mut ModuleBuilder);
}

/// Upgrades one event payload from one schema version to the next.
pub type Upcast = fn(Value) -> Result<Value, DomainError>;

/// Collects what a module registers.
#[derive(Default)]
pub struct ModuleBuilder {
    pub(crate) aggregates: Vec<Box<dyn ErasedAggregate>>,
    pub(crate) projections: Vec<Box<dyn ErasedProjection>>,
    pub(crate) sagas: Vec<Box<dyn ErasedSaga>>,
    /// `(event type, from version)` → step to `from version + 1`.
    pub(crate) upcasters: BTreeMap<(String, u32), Upcast>,
    /// Whose events a projection or saga reads, when its registration said
    /// so (`projection_of`, `saga_of`): its name → `aggregate` or
    /// `module.aggregate`.
    pub(crate) sources: BTreeMap<&'static str, String>,
}

impl ModuleBuilder {
    /// Register an aggregate type.
    pub fn aggregate<A: Aggregate>(&mut self) -> &mut Self {
        self.aggregates.push(Box::new(AggregateAdapter::<A>::new()));
        self
    }

    /// Register a projection.
    pub fn projection<P: Projection>(&mut self) -> &mut Self {
        self.projections.push(Box::new(ProjectionAdapter::<P>::new()));
        self
    }

    /// Register a projection of events its enum does not say the origin
    /// of: those of aggregate type `source` (`"account"`) of this module, or
    /// of another module (`"bank.account"`).
    pub fn projection_of<P: Projection>(&mut self, source: &str) -> &mut Self {
        self.sources.insert(P::NAME, source.to_owned());
        self.projection::<P>()
    }

    /// Register a saga.
    pub fn saga<S: Saga>(&mut self) -> &mut Self {
        self.sagas.push(Box::new(SagaAdapter::<S>::new()));
        self
    }

    /// Register a saga of events its enum does not say the origin of (see
    /// [`projection_of`](Self::projection_of)).
    pub fn saga_of<S: Saga>(&mut self, source: &str) -> &mut Self {
        self.sources.insert(S::NAME, source.to_owned());
        self.saga::<S>()
    }

    /// The event types a projection or saga named `name` subscribes to,
    /// qualified by whose they are: `aggregate.Event` (the aggregate of this
    /// module whose event enum it reads) or `source.Event` as registered.
    /// Without either they stay bare, and the host refuses the module,
    /// saying so.
    pub(crate) fn qualified(&self, name: &str, events: std::any::TypeId, bare: Vec<String>) -> Vec<String> {
        let source = self
            .sources
            .get(name)
            .map(String::as_str)
            .or_else(|| self.aggregates.iter().find(|a| a.event_enum() == events).map(|a| a.aggregate_type()));
        match source {
            Some(source) => bare.into_iter().map(|event| format!("{source}.{event}")).collect(),
            None => bare,
        }
    }

    /// Register the step that upgrades `event_type` payloads stored at schema
    /// version `from_version` to `from_version + 1`. The current version of
    /// an event type is one above its highest registered step (1 without any).
    pub fn upcaster(&mut self, event_type: &str, from_version: u32, step: Upcast) -> &mut Self {
        self.upcasters.insert((event_type.to_owned(), from_version), step);
        self
    }

    pub(crate) fn aggregate_named(&self, aggregate_type: &str) -> Result<&dyn ErasedAggregate, DomainError> {
        self.aggregates
            .iter()
            .find(|a| a.aggregate_type() == aggregate_type)
            .map(|a| a.as_ref())
            .ok_or_else(|| DomainError::Invalid(format!("unknown aggregate type `{aggregate_type}`")))
    }

    pub(crate) fn projection_named(&self, name: &str) -> Result<&dyn ErasedProjection, DomainError> {
        self.projections
            .iter()
            .find(|p| p.name() == name)
            .map(|p| p.as_ref())
            .ok_or_else(|| DomainError::Invalid(format!("unknown projection `{name}`")))
    }

    pub(crate) fn saga_named(&self, name: &str) -> Result<&dyn ErasedSaga, DomainError> {
        self.sagas
            .iter()
            .find(|s| s.name() == name)
            .map(|s| s.as_ref())
            .ok_or_else(|| DomainError::Invalid(format!("unknown saga `{name}`")))
    }

    /// Current schema version of every event type that has upcasters.
    pub(crate) fn event_schemas(&self) -> BTreeMap<String, u32> {
        let mut versions = BTreeMap::new();
        for (event_type, from) in self.upcasters.keys() {
            let current = versions.entry(event_type.clone()).or_insert(1);
            *current = (*current).max(from + 1);
        }
        versions
    }

    /// Upgrade a payload from schema version `version` to `target`, one
    /// registered step at a time (parsed once, serialized once).
    pub(crate) fn upcast_to(
        &self,
        event_type: &str,
        mut version: u32,
        target: u32,
        payload: String,
    ) -> Result<(u32, String), DomainError> {
        if version >= target {
            return Ok((version, payload));
        }
        let mut body: Value = serde_json::from_str(&payload)
            .map_err(|e| DomainError::Invalid(format!("`{event_type}` payload is not valid JSON: {e}")))?;
        while version < target {
            let step = self.upcasters.get(&(event_type.to_owned(), version)).ok_or_else(|| {
                DomainError::Invalid(format!("no upcaster for `{event_type}` at schema version {version}"))
            })?;
            body = step(body)?;
            version += 1;
        }
        Ok((version, body.to_string()))
    }
}

/// The registry of the module compiled into this component, built on first use.
pub(crate) fn registry<M: Module>() -> &'static ModuleBuilder {
    static REGISTRY: OnceLock<ModuleBuilder> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        #[cfg(target_arch = "wasm32")]
        crate::log::report_panics_to_host();
        let mut builder = ModuleBuilder::default();
        M::register(&mut builder);
        builder
    })
}
