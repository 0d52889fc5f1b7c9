//! What the lease holders (saga and subscription runners) share: this
//! host's identity in a lease, and lease times (milliseconds on the
//! database's clock) as RFC 3339.

/// A name for this host process in leases: host name, process id and a
/// fresh id, so that a restarted process never passes for its predecessor.
pub fn owner_id() -> String {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!("{hostname}/{}/{}", std::process::id(), uuid::Uuid::now_v7())
}

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
