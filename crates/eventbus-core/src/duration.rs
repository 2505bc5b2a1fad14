//! How durations are written in configuration files and environment variables: a number and
//! a unit, `250ms`, `30s`, `1.5s`, `5m`, `1h` (units `ns`, `us`, `ms`, `s`, `m`, `h`, `d`), or
//! `0`. A bare number other than zero is refused: `30` could mean seconds or milliseconds.
//!
//! ```
//! use std::time::Duration;
//! use eventbus_core::duration;
//! assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
//! assert_eq!(duration::parse("1.5s"), Ok(Duration::from_millis(1500)));
//! assert!(duration::parse("30").is_err());
//! ```

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

const UNITS: [(&str, f64); 8] = [
    ("ns", 1e-9),
    ("us", 1e-6),
    ("µs", 1e-6),
    ("ms", 1e-3),
    ("s", 1.0),
    ("m", 60.0),
    ("h", 3600.0),
    ("d", 86_400.0),
];

/// Parses `"<number><unit>"` (whitespace between them allowed) or `"0"`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| {
            format!("{text:?} has no unit: write it as e.g. \"100ms\", \"30s\" or \"5m\"")
        })?;
    let (number, unit) = t.split_at(split);
    let unit = unit.trim();
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: expected a number before the unit"))?;
    let scale = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, s)| *s)
        .ok_or_else(|| {
            format!("{text:?} has an unknown unit {unit:?} (known: ns, us, ms, s, m, h, d)")
        })?;
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("{text:?}: {e}"))
}

/// For `#[serde(deserialize_with = "eventbus_core::duration::deserialize")]`: a string as
/// [`parse`] reads it, or the integer 0.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration with a unit, such as \"100ms\", \"30s\" or \"5m\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse(v).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        if v == 0 {
            Ok(Duration::ZERO)
        } else {
            Err(E::custom(format!(
                "{v} has no unit: write it as a string such as \"{v}ms\" or \"{v}s\""
            )))
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_fractions() {
        assert_eq!(parse("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse("30 s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("750us"), Ok(Duration::from_micros(750)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_say_why() {
        assert!(parse("30").unwrap_err().contains("no unit"));
        assert!(parse("3 fortnights").unwrap_err().contains("unknown unit"));
        assert!(parse("ms").unwrap_err().contains("number"));
        assert!(parse("-1s").is_err());
    }

    #[test]
    fn deserializes_from_strings_and_zero_only() {
        #[derive(Debug, serde::Deserialize)]
        struct T {
            #[serde(deserialize_with = "deserialize")]
            d: Duration,
        }
        let t: T = serde_json::from_str(r#"{"d": "250ms"}"#).expect("string");
        assert_eq!(t.d, Duration::from_millis(250));
        let t: T = serde_json::from_str(r#"{"d": 0}"#).expect("zero");
        assert_eq!(t.d, Duration::ZERO);
        let e = serde_json::from_str::<T>(r#"{"d": 30}"#).expect_err("a bare number is refused");
        assert!(e.to_string().contains("no unit"), "{e}");
    }
}
