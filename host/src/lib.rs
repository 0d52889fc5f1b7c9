//! Orchestrix host: runs event-sourced domain modules compiled to
//! WebAssembly components, and owns everything durable around them.
//!
//! Code map (see ARCHITECTURE.md for the invariants):
//! - [`sandbox`]: wasmtime engine, bindings of the `orchestrix:domain`
//!   world, plugin loading with the precompile cache, guest calls.
//! - [`store`]: the [`store::EventStore`] trait, its SQLite and PostgreSQL
//!   backends with group commit, and feed subscriptions.
//! - [`pipeline`]: the command path (route, load, handle, append, fold).
//! - [`projections`]: read models — runners, rebuilds into shadow copies,
//!   parking of poison events.
//! - [`whatif`]: what-if replay — a candidate module folds and projects
//!   history beside the serving one, never serving.
//! - [`sagas`]: process managers — runners under store leases, the
//!   reaction transaction, timers, the outbox, parking.
//! - [`bus`]: the outbound bus — subscriptions delivering events to NATS
//!   JetStream and webhooks under store leases, retries, dead letters.
//! - [`cluster`]: one build per module across the hosts of one store —
//!   the sync and heartbeat loops, `GET /v1/cluster`.
//! - [`http_client`]: every outgoing HTTP(S) client, with its TLS provider;
//!   [`egress`]: where the host may connect when a client names the place.
//! - [`leases`]: lease identity and times shared by sagas and the bus.
//! - [`http`]: the JSON HTTP API; [`cloudevents`]: the event wire format;
//!   [`sse`]: the Server-Sent Events parser of the CLI's `--follow`.
//! - [`auth`]: who may do what — tokens, scopes, rate limits (the HTTP
//!   side, 401/403 and the audit log, is `http::access`).
//! - [`limits`]: what a request may name, the same on every store.
//! - [`server`]: the HTTP server (accept loop, connection limits and timeouts);
//!   [`tls`]: its certificate, reloaded when the files change.
//! - [`telemetry`]: W3C trace context, spans, OTLP export.
//! - [`metrics`]: Prometheus metrics; [`runtime`]: wiring it all together.

pub mod auth;
pub mod bus;
pub mod cloudevents;
pub mod cluster;
pub mod egress;
pub mod http;
pub mod http_client;
pub mod leases;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod projections;
pub mod runtime;
pub mod sagas;
pub mod sandbox;
pub mod server;
pub mod sse;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod whatif;
