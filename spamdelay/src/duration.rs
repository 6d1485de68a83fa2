//! Durations shown to admins, written the way they write them in the config
//! and on the command line (`7d`, `1h 30m`, `90s` shown as `1m 30s`).

use std::time::Duration;

/// The units, largest first; months and years are left out on purpose: an
/// admin writes `30d`, and a month of 30.44 days reads back as nonsense.
const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];

/// `d` in the compact form `cli::duration` parses: `s m h d`, largest units
/// first, one space between units, none inside one. A fraction of a second
/// is shown in milliseconds (a greet pause of `1s 500ms`), anything finer is
/// dropped; nothing at all is `0s`.
pub fn show(d: Duration) -> String {
    let mut left = d.as_secs();
    let mut parts = Vec::new();
    for (size, unit) in UNITS {
        let n = left / size;
        left %= size;
        if n > 0 {
            parts.push(format!("{n}{unit}"));
        }
    }
    let ms = d.subsec_millis();
    if ms > 0 {
        parts.push(format!("{ms}ms"));
    }
    if parts.is_empty() {
        return "0s".to_string();
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn shows_the_forms_admins_write() {
        assert_eq!(show(secs(7 * 86_400)), "7d");
        assert_eq!(show(secs(3_600)), "1h");
        assert_eq!(show(secs(90)), "1m 30s");
        assert_eq!(show(secs(5_400)), "1h 30m");
        assert_eq!(show(secs(10)), "10s");
        assert_eq!(show(secs(86_400 + 1)), "1d 1s");
        assert_eq!(show(secs(30 * 86_400)), "30d");
        assert_eq!(show(secs(400 * 86_400)), "400d");
    }

    #[test]
    fn fractions_show_in_milliseconds_and_nothing_is_zero_seconds() {
        assert_eq!(show(Duration::from_millis(1_500)), "1s 500ms");
        assert_eq!(show(Duration::from_millis(250)), "250ms");
        assert_eq!(show(Duration::from_micros(1_999)), "1ms");
        assert_eq!(show(Duration::from_nanos(999)), "0s");
        assert_eq!(show(Duration::ZERO), "0s");
    }

    #[test]
    fn what_is_shown_parses_back_to_the_same_duration() {
        let samples = [
            Duration::from_millis(1),
            Duration::from_millis(6_000),
            Duration::from_millis(61_001),
            secs(3_599),
            secs(86_399),
            secs(7 * 86_400),
            secs(90 * 86_400 + 3_600 + 60 + 1),
            secs(u64::from(u32::MAX)),
        ];
        for d in samples {
            let shown = show(d);
            assert_eq!(humantime::parse_duration(&shown).ok(), Some(d), "{shown}");
            if d >= secs(1) {
                assert_eq!(crate::cli::duration(&shown), Ok(d), "{shown}");
            }
        }
    }

    #[test]
    fn no_unit_is_split_by_a_space() {
        let shown = show(secs(2 * 86_400 + 3 * 3_600 + 4 * 60 + 5));
        assert_eq!(shown, "2d 3h 4m 5s");
        for part in shown.split(' ') {
            assert!(
                part.trim_start_matches(|c: char| c.is_ascii_digit())
                    .chars()
                    .all(|c| c.is_ascii_alphabetic()),
                "{part}"
            );
        }
    }
}
