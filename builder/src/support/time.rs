//! Time: now, and Unix times as UTC text.

use std::time::SystemTime;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now() -> u64 {
    secs(SystemTime::now())
}

/// A system time as seconds since the Unix epoch (0 if before it).
pub(crate) fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for a Unix time, as the human output shows times; a
/// time past year 9999, which no clock or archive gives, shows as the epoch.
pub(crate) fn utc(t: u64) -> String {
    format_utc(t, ' ', "")
}

/// ISO 8601 (`YYYY-MM-DDTHH:MM:SSZ`), as every time in `--json` output is written.
pub(crate) fn iso(t: u64) -> String {
    format_utc(t, 'T', "Z")
}

fn format_utc(t: u64, sep: char, zone: &str) -> String {
    let t = i64::try_from(t)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}{sep}{:02}:{:02}:{:02}{zone}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `#[serde(serialize_with = "...")]` for a Unix time written as [`iso`].
pub(crate) fn serialize_iso<S: serde::Serializer>(t: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&iso(*t))
}

/// [`serialize_iso`] for a time that may not be there yet (`null`).
pub(crate) fn serialize_iso_opt<S: serde::Serializer>(
    t: &Option<u64>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&iso(*t)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_text() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_709_251_199), "2024-02-29 23:59:59");
        assert_eq!(iso(1_709_251_199), "2024-02-29T23:59:59Z");
    }
}
