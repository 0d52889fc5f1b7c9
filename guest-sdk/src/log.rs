//! Structured logging into the host's log, tagged with the module's name.
//!
//! In a native `cargo test` the records go to standard error instead.

use std::fmt::Display;

/// Severity of a log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Emit one record with key/value fields.
pub fn log(level: Level, message: &str, fields: &[(&str, &dyn Display)]) {
    let fields: Vec<(String, String)> = fields.iter().map(|(k, v)| ((*k).to_owned(), v.to_string())).collect();
    emit(level, message, &fields);
}

/// Emit an informational record.
pub fn info(message: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Info, message, fields);
}

/// Emit a warning.
pub fn warn(message: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Warn, message, fields);
}

#[cfg(target_arch = "wasm32")]
fn emit(level: Level, message: &str, fields: &[(String, String)]) {
    use crate::bindings::orchestrix::domain::log as host;
    let level = match level {
        Level::Trace => host::Level::Trace,
        Level::Debug => host::Level::Debug,
        Level::Info => host::Level::Info,
        Level::Warn => host::Level::Warn,
        Level::Error => host::Level::Error,
    };
    host::log(level, message, fields);
}

#[cfg(not(target_arch = "wasm32"))]
fn emit(level: Level, message: &str, fields: &[(String, String)]) {
    eprintln!("[{level:?}] {message} {fields:?}");
}
