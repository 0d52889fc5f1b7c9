//! End-to-end tests of the host: real wasm modules built from source by
//! `build.rs` (their paths in [`fixtures`], each artifact with a test), real
//! SQLite files in temporary directories, the real PostgreSQL server at
//! `DATABASE_URL` (one schema per test), the real NATS server at `NATS_URL`,
//! real HTTP.

mod bank_rules;
mod bus;
mod cluster;
mod commands;
mod connections;
mod data_lifecycle;
mod feed;
mod fixtures;
mod history;
mod lifecycle;
mod plugins_dir;
mod projections;
mod robustness;
mod saga_domains;
mod sagas;
mod sandbox_limits;
mod security;
mod store_conformance;
mod support;
mod telemetry;
