//! # Orchestrix guest SDK
//!
//! Write an Orchestrix domain module in plain Rust: implement [`Aggregate`]
//! (and, when you need them, [`Projection`] and [`Saga`]), describe the module
//! with [`Module`], and export it with [`export!`]. Compile it with
//! `cargo build --target wasm32-wasip2` and drop the `.wasm` into the host's
//! plugins directory. The SDK generates the WebAssembly bindings from the one
//! contract in the repository's `wit/` folder; you never see them.
//!
//! Domain logic is tested natively, with no wasm, through [`testing`].
//!
//! ```
//! use orchestrix_guest::{Aggregate, DomainError, Module, ModuleBuilder};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Counter {
//!     value: i64,
//! }
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! pub enum CounterCommand {
//!     Add { amount: i64 },
//! }
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! pub enum CounterEvent {
//!     Added { amount: i64 },
//! }
//!
//! impl Aggregate for Counter {
//!     const TYPE: &'static str = "counter";
//!     type Command = CounterCommand;
//!     type Event = CounterEvent;
//!
//!     fn handle(&self, command: CounterCommand) -> Result<Vec<CounterEvent>, DomainError> {
//!         match command {
//!             CounterCommand::Add { amount } if amount <= 0 => {
//!                 Err(DomainError::Invalid("amount must be positive".into()))
//!             }
//!             CounterCommand::Add { amount } if self.value + amount > 100 => {
//!                 Err(DomainError::Rejected("a counter never exceeds 100".into()))
//!             }
//!             CounterCommand::Add { amount } => Ok(vec![CounterEvent::Added { amount }]),
//!         }
//!     }
//!
//!     fn apply(&mut self, event: CounterEvent) {
//!         match event {
//!             CounterEvent::Added { amount } => self.value += amount,
//!         }
//!     }
//! }
//!
//! pub struct Counters;
//!
//! impl Module for Counters {
//!     const NAME: &'static str = "counters";
//!     const VERSION: &'static str = "1.0.0";
//!     fn register(module: &mut ModuleBuilder) {
//!         module.aggregate::<Counter>();
//!     }
//! }
//!
//! orchestrix_guest::export!(Counters);
//!
//! // Given/when/then, natively:
//! use orchestrix_guest::testing::given;
//!
//! given::<Counter>([CounterEvent::Added { amount: 90 }])
//!     .when(CounterCommand::Add { amount: 5 })
//!     .then_expect_events([CounterEvent::Added { amount: 5 }]);
//! given::<Counter>([CounterEvent::Added { amount: 90 }])
//!     .when(CounterCommand::Add { amount: 20 })
//!     .then_expect_rejection("never exceeds");
//! ```
//!
//! Guests are sandboxed: there is no clock, randomness, file, network or
//! environment access. The host stamps ids and times (a saga gets the time
//! of each input as a [`Timestamp`]); [`log`] is the only way out.

// Lets the generated bindings name this crate the same way inside and outside it.
extern crate self as orchestrix_guest;

mod aggregate;
mod codec;
mod exports;
pub mod log;
mod module;
mod projection;
mod saga;
pub mod testing;
mod time;

use std::fmt;

pub use aggregate::Aggregate;
#[doc(hidden)]
pub use exports::Exports;
pub use module::{Module, ModuleBuilder, Upcast};
pub use projection::{DocumentKey, Documents, Projection, ReadModelOp};
pub use saga::{CommandRequest, CommandResult, Reaction, Saga, SagaInput};
pub use serde;
pub use serde_json;
pub use time::Timestamp;
#[doc(hidden)]
pub use wit_bindgen;

/// The bindings generated from the package's own copy of the contract,
/// `guest-sdk/wit/domain.wit` (kept equal to the workspace's `wit/` by a
/// test), so the crate builds outside this repository. Not part of the
/// public API.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "module",
        pub_export_macro: true,
        export_macro_name: "__export_component",
        default_bindings_module: "::orchestrix_guest::bindings",
        runtime_path: "::orchestrix_guest::wit_bindgen::rt",
    });
}

/// Why a module refused a command (or could not read its input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainError {
    /// A business rule forbids it. The host answers 422, error code
    /// `rejected`.
    Rejected(String),
    /// The input does not make sense for its type. The host answers 400.
    Invalid(String),
    /// A business rule forbids it, with a code clients can match on. The
    /// host answers 422 with `code` as the error code.
    RejectedWith { code: String, message: String },
}

impl DomainError {
    /// A business-rule rejection.
    pub fn rejected(reason: impl Into<String>) -> Self {
        Self::Rejected(reason.into())
    }

    /// A business-rule rejection with a machine-readable code — `snake_case`,
    /// up to 64 characters (`insufficient_funds`) — which clients get as
    /// `{"error": {"code": "insufficient_funds", "message": …}}`.
    ///
    /// ```
    /// use orchestrix_guest::DomainError;
    /// let error = DomainError::rejected_with("insufficient_funds", "balance 10, requested 50");
    /// assert_eq!(error.to_string(), "rejected (insufficient_funds): balance 10, requested 50");
    /// ```
    pub fn rejected_with(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::RejectedWith { code: code.into(), message: message.into() }
    }

    /// An invalid-input error.
    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::Invalid(reason.into())
    }
}

impl fmt::Display for DomainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(reason) => write!(f, "rejected: {reason}"),
            Self::Invalid(reason) => write!(f, "invalid: {reason}"),
            Self::RejectedWith { code, message } => write!(f, "rejected ({code}): {message}"),
        }
    }
}

impl std::error::Error for DomainError {}

/// An event produced by `handle`, as sent to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_type: String,
    pub payload: String,
}

/// An event as stored by the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub stream_version: u64,
    pub position: u64,
    pub event_type: String,
    pub schema_version: u32,
    pub time: String,
    pub payload: String,
}

/// A stored event with its typed body, as projections and sagas see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<E> {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub stream_version: u64,
    pub position: u64,
    /// Host-stamped commit time (RFC 3339, UTC).
    pub time: String,
    pub event: E,
}

impl<E: serde::de::DeserializeOwned> Envelope<E> {
    /// Decode an event the caller no longer needs, moving its strings.
    pub(crate) fn decode_owned(event: RecordedEvent) -> Result<Self, DomainError> {
        let body = codec::decode(&event.event_type, &event.payload)?;
        Ok(Envelope {
            id: event.id,
            aggregate_type: event.aggregate_type,
            aggregate_id: event.aggregate_id,
            stream_version: event.stream_version,
            position: event.position,
            time: event.time,
            event: body,
        })
    }

    pub(crate) fn decode(event: &RecordedEvent) -> Result<Self, DomainError> {
        Ok(Envelope {
            id: event.id.clone(),
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            stream_version: event.stream_version,
            position: event.position,
            time: event.time.clone(),
            event: codec::decode(&event.event_type, &event.payload)?,
        })
    }
}

#[doc(hidden)]
pub fn __assert_module<M: Module>() {}

/// Export a [`Module`] as this component's implementation of the
/// `orchestrix:domain/module` world. Use it once, at the crate root.
///
/// ```ignore
/// orchestrix_guest::export!(Bank);
/// ```
///
/// Exporting a type that is not a [`Module`] fails to compile, with the
/// error on that type: "`NotAModule` is not an Orchestrix module".
///
/// ```compile_fail
/// struct NotAModule;
/// orchestrix_guest::export!(NotAModule);
/// ```
#[macro_export]
macro_rules! export {
    ($module:ty) => {
        const _: fn() = $crate::__assert_module::<$module>;
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type __OrchestrixExports = $crate::Exports<$module>;
    $crate::bindings::__export_component!(__OrchestrixExports with_types_in $crate::bindings);
        };
    };
    ($($other:tt)*) => {
        ::core::compile_error!(
            "usage: `orchestrix_guest::export!(MyModule);` where `MyModule` implements `orchestrix_guest::Module`"
        );
    };
}
