//! Host-stamped time, as guests see it.
//!
//! Guests have no clock: the host passes the time of what they react to. A
//! [`Timestamp`] is that instant, in milliseconds since the Unix epoch (UTC),
//! with just the arithmetic a saga needs (deadlines, elapsed time) and an
//! RFC 3339 rendering — no calendar library, no time zones.

use std::fmt;
use std::ops::Add;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An instant, in milliseconds since the Unix epoch (UTC). Stored in state
/// as that number (JSON), displayed as RFC 3339 (`2026-01-01T00:00:00.000Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The instant `millis` milliseconds after the Unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this instant is (zero when it is not later).
    pub fn duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// `instant + duration`, saturating at the largest representable instant;
/// sub-millisecond parts of the duration are dropped.
impl Add<Duration> for Timestamp {
    type Output = Timestamp;

    fn add(self, duration: Duration) -> Timestamp {
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(millis))
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-01-01T00:00:00.000Z`.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MILLIS_PER_DAY: u64 = 86_400_000;
        let (days, of_day) = (self.0 / MILLIS_PER_DAY, self.0 % MILLIS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        let (seconds, millis) = (of_day / 1000, of_day % 1000);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            seconds / 3600,
            seconds / 60 % 60,
            seconds % 60
        )
    }
}

/// The proleptic Gregorian date `days` days after 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01, so leap days end each 400-year era.
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc3339_in_utc_with_milliseconds() {
        assert_eq!(Timestamp::from_millis(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Timestamp::from_millis(1_767_225_600_000).to_string(), "2026-01-01T00:00:00.000Z");
        // A leap day, and the last millisecond of a century leap year.
        assert_eq!(Timestamp::from_millis(1_709_210_096_789).to_string(), "2024-02-29T12:34:56.789Z");
        assert_eq!(Timestamp::from_millis(978_307_199_999).to_string(), "2000-12-31T23:59:59.999Z");
    }

    #[test]
    fn adds_durations_and_measures_elapsed_time() {
        let start = Timestamp::from_millis(1_000);
        assert_eq!(start + Duration::from_secs(2), Timestamp::from_millis(3_000));
        assert_eq!((start + Duration::from_millis(1500)).duration_since(start), Duration::from_millis(1500));
        assert_eq!(start.duration_since(start + Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(Timestamp::from_millis(u64::MAX) + Duration::from_secs(1), Timestamp::from_millis(u64::MAX));
    }

    #[test]
    fn is_stored_as_a_number() {
        assert_eq!(serde_json::to_string(&Timestamp::from_millis(42)).unwrap(), "42");
        assert_eq!(serde_json::from_str::<Timestamp>("42").unwrap(), Timestamp::from_millis(42));
    }
}
