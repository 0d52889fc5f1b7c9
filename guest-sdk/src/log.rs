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

/// Send panic messages to the host's log instead of standard error. (A
/// panic then traps, and the host reports the failed call.) The host serves
/// stdout/stderr only off its request path, so a module should never write
/// to them; this keeps panics, the common case, out of them.
#[cfg(target_arch = "wasm32")]
pub(crate) fn report_panics_to_host() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let message = match (info.payload().downcast_ref::<&str>(), info.payload().downcast_ref::<String>()) {
            (Some(text), _) => (*text).to_owned(),
            (_, Some(text)) => text.clone(),
            _ => "panic".to_owned(),
        };
        emit(Level::Error, &format!("guest panicked: {message}"), &[("location".to_owned(), location)]);
    }));
}

#[cfg(not(target_arch = "wasm32"))]
fn emit(level: Level, message: &str, fields: &[(String, String)]) {
    eprintln!("[{level:?}] {message} {fields:?}");
}
