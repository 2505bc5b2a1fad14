//! The bus's figures through the [`metrics`](https://docs.rs/metrics) facade, for Prometheus,
//! StatsD, OpenTelemetry or any other recorder.
//!
//! Handles are registered when the bus is built (bus-wide series) and when a subscription is
//! made (series labelled `topic` and `group`): install the recorder before building the bus.
//! Without a recorder every update is a branch on an empty handle. Counters end in `_total`,
//! durations are histograms in seconds; [`names`] lists every series.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::metrics::{Counter, Gauge, Histogram, Unit};

/// Names of every series the bus reports. Labels: `topic` and `group` on the consuming
/// series, none on the publishing ones (a bus publishes to any number of topics).
pub mod names {
    /// Counter: messages handed to the broker client.
    pub const PUBLISHED: &str = "eventbus_published_total";
    /// Counter: publishes the broker acknowledged.
    pub const PUBLISH_ACKED: &str = "eventbus_publish_acked_total";
    /// Counter: publishes that failed.
    pub const PUBLISH_FAILED: &str = "eventbus_publish_failed_total";
    /// Counter: publishes the broker reported as duplicates of an earlier `event_id`.
    pub const PUBLISH_DUPLICATES: &str = "eventbus_publish_duplicates_total";
    /// Counter: results dropped from the results stream at the close deadline.
    pub const RESULTS_DROPPED: &str = "eventbus_publish_results_dropped_total";
    /// Histogram (seconds): from handing a message to the broker client to its ACK or failure.
    pub const PUBLISH_ACK_SECONDS: &str = "eventbus_publish_ack_seconds";
    /// Gauge: publishes awaiting their ACK (the in-flight window in use).
    pub const PUBLISH_IN_FLIGHT: &str = "eventbus_publish_in_flight";
    /// Gauge: messages waiting in the dispatcher's queues (sampled after every fetch).
    pub const DISPATCH_QUEUED: &str = "eventbus_dispatch_queued";
    /// Counter: messages fetched from the broker.
    pub const FETCHED: &str = "eventbus_fetched_total";
    /// Counter: fetches that failed (the fetcher backs off and retries).
    pub const FETCH_ERRORS: &str = "eventbus_fetch_errors_total";
    /// Counter: stalls found (nothing received for `stall_timeout` while a partition the
    /// subscription holds had messages waiting); each got a new consumer.
    pub const FETCH_STALLS: &str = "eventbus_fetch_stalls_total";
    /// Counter: messages the broker delivered again (delivery count above 1).
    pub const REDELIVERED: &str = "eventbus_redelivered_total";
    /// Counter: messages whose handler succeeded.
    pub const HANDLED: &str = "eventbus_handled_total";
    /// Counter: failed handler attempts, panics included.
    pub const HANDLER_ERRORS: &str = "eventbus_handler_errors_total";
    /// Counter: handler panics.
    pub const HANDLER_PANICS: &str = "eventbus_handler_panics_total";
    /// Counter: retries scheduled.
    pub const RETRIES: &str = "eventbus_retries_total";
    /// Counter: messages moved to the dead-letter topic.
    pub const DEAD_LETTERED: &str = "eventbus_dead_lettered_total";
    /// Counter: dead-letter publishes that failed.
    pub const DEAD_LETTER_FAILURES: &str = "eventbus_dead_letter_failures_total";
    /// Counter: redeliveries skipped because their `event_id` was already handled.
    pub const DEDUPLICATED: &str = "eventbus_deduplicated_total";
    /// Counter: malformed envelopes and undecodable payloads.
    pub const MALFORMED: &str = "eventbus_malformed_total";
    /// Counter: messages dropped unstarted because their partition was no longer owned.
    pub const NOT_OWNED_DROPPED: &str = "eventbus_not_owned_dropped_total";
    /// Histogram (seconds): one handler attempt.
    pub const HANDLER_SECONDS: &str = "eventbus_handler_seconds";
    /// Histogram (seconds): from the event's `X-Timestamp` to the start of its handling
    /// (includes time in an outbox; needs synchronised clocks across machines).
    pub const END_TO_END_SECONDS: &str = "eventbus_end_to_end_seconds";
}

/// Bus-wide series.
pub(crate) struct BusExport {
    pub(crate) published: Counter,
    pub(crate) acked: Counter,
    pub(crate) failed: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) results_dropped: Counter,
    pub(crate) ack_seconds: Histogram,
    pub(crate) in_flight: Gauge,
    pub(crate) queued: Gauge,
}

impl Default for BusExport {
    fn default() -> Self {
        describe();
        Self {
            published: ::metrics::counter!(names::PUBLISHED),
            acked: ::metrics::counter!(names::PUBLISH_ACKED),
            failed: ::metrics::counter!(names::PUBLISH_FAILED),
            duplicates: ::metrics::counter!(names::PUBLISH_DUPLICATES),
            results_dropped: ::metrics::counter!(names::RESULTS_DROPPED),
            ack_seconds: ::metrics::histogram!(names::PUBLISH_ACK_SECONDS),
            in_flight: ::metrics::gauge!(names::PUBLISH_IN_FLIGHT),
            queued: ::metrics::gauge!(names::DISPATCH_QUEUED),
        }
    }
}

impl std::fmt::Debug for BusExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BusExport")
    }
}

/// One subscription's series, labelled with its topic and group.
pub(crate) struct RouteExport {
    pub(crate) fetched: Counter,
    pub(crate) fetch_errors: Counter,
    pub(crate) fetch_stalls: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) handled: Counter,
    pub(crate) handler_errors: Counter,
    pub(crate) handler_panics: Counter,
    pub(crate) retries: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) dead_letter_failures: Counter,
    pub(crate) deduplicated: Counter,
    pub(crate) malformed: Counter,
    pub(crate) not_owned_dropped: Counter,
    pub(crate) handler_seconds: Histogram,
    pub(crate) end_to_end_seconds: Histogram,
}

impl RouteExport {
    pub(crate) fn new(topic: &str, group: &str) -> Self {
        let labels = [("topic", topic.to_string()), ("group", group.to_string())];
        Self {
            fetched: ::metrics::counter!(names::FETCHED, &labels),
            fetch_errors: ::metrics::counter!(names::FETCH_ERRORS, &labels),
            fetch_stalls: ::metrics::counter!(names::FETCH_STALLS, &labels),
            redelivered: ::metrics::counter!(names::REDELIVERED, &labels),
            handled: ::metrics::counter!(names::HANDLED, &labels),
            handler_errors: ::metrics::counter!(names::HANDLER_ERRORS, &labels),
            handler_panics: ::metrics::counter!(names::HANDLER_PANICS, &labels),
            retries: ::metrics::counter!(names::RETRIES, &labels),
            dead_lettered: ::metrics::counter!(names::DEAD_LETTERED, &labels),
            dead_letter_failures: ::metrics::counter!(names::DEAD_LETTER_FAILURES, &labels),
            deduplicated: ::metrics::counter!(names::DEDUPLICATED, &labels),
            malformed: ::metrics::counter!(names::MALFORMED, &labels),
            not_owned_dropped: ::metrics::counter!(names::NOT_OWNED_DROPPED, &labels),
            handler_seconds: ::metrics::histogram!(names::HANDLER_SECONDS, &labels),
            end_to_end_seconds: ::metrics::histogram!(names::END_TO_END_SECONDS, &labels),
        }
    }

    /// Records the end-to-end latency of a message stamped `timestamp` (an RFC 3339
    /// `X-Timestamp`); nothing for a missing or unreadable stamp or a clock behind it.
    pub(crate) fn end_to_end(&self, timestamp: Option<&str>) {
        let Some(stamped) = timestamp.and_then(parse_utc) else {
            return;
        };
        if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
            if let Some(age) = now.checked_sub(stamped) {
                self.end_to_end_seconds.record(age.as_secs_f64());
            }
        }
    }
}

fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(names::PUBLISHED, "Messages handed to the broker client");
    describe_counter!(names::PUBLISH_ACKED, "Publishes the broker acknowledged");
    describe_counter!(names::PUBLISH_FAILED, "Publishes that failed");
    describe_counter!(
        names::PUBLISH_DUPLICATES,
        "Publishes reported as duplicates"
    );
    describe_counter!(
        names::RESULTS_DROPPED,
        "Results dropped from the stream at close"
    );
    describe_histogram!(
        names::PUBLISH_ACK_SECONDS,
        Unit::Seconds,
        "From hand-over to broker ACK"
    );
    describe_gauge!(names::PUBLISH_IN_FLIGHT, "Publishes awaiting their ACK");
    describe_gauge!(names::DISPATCH_QUEUED, "Messages queued in the dispatcher");
    describe_counter!(names::FETCHED, "Messages fetched");
    describe_counter!(names::FETCH_ERRORS, "Failed fetches");
    describe_counter!(names::REDELIVERED, "Messages delivered more than once");
    describe_counter!(names::HANDLED, "Messages handled");
    describe_counter!(names::HANDLER_ERRORS, "Failed handler attempts");
    describe_counter!(names::HANDLER_PANICS, "Handler panics");
    describe_counter!(names::RETRIES, "Retries scheduled");
    describe_counter!(names::DEAD_LETTERED, "Messages dead-lettered");
    describe_counter!(names::DEAD_LETTER_FAILURES, "Failed dead-letter publishes");
    describe_counter!(names::DEDUPLICATED, "Duplicates skipped by event id");
    describe_counter!(names::MALFORMED, "Malformed or undecodable messages");
    describe_histogram!(
        names::HANDLER_SECONDS,
        Unit::Seconds,
        "Duration of one handler attempt"
    );
    describe_histogram!(
        names::END_TO_END_SECONDS,
        Unit::Seconds,
        "From the event's timestamp to its handling"
    );
}

/// Parses the UTC RFC 3339 stamps envelopes carry (`2026-12-02T13:16:33.123456789Z`) without
/// a date library; other offsets go through chrono.
fn parse_utc(s: &str) -> Option<Duration> {
    let b = s.as_bytes();
    let fixed = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b't')
        && b[13] == b':'
        && b[16] == b':'
        && b.last() == Some(&b'Z');
    if !fixed {
        let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
        let secs = u64::try_from(t.timestamp()).ok()?;
        return Some(Duration::new(secs, t.timestamp_subsec_nanos()));
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        b[r].iter().try_fold(0u64, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + u64::from(c - b'0'))
        })
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let mut nanos = 0u64;
    let frac = &b[19..b.len() - 1];
    if !frac.is_empty() {
        if frac[0] != b'.' || frac.len() < 2 || frac.len() > 10 {
            return None;
        }
        let digits = num(20..b.len() - 1)?;
        nanos = digits * 10u64.pow(10 - frac.len() as u32);
    }
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let secs = u64::try_from(days).ok()? * 86_400 + hour * 3_600 + minute * 60 + second;
    Some(Duration::new(secs, nanos as u32))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_parse_like_chrono() {
        for s in [
            "2026-12-02T13:16:33.123456789Z",
            "2026-12-02T13:16:33Z",
            "2000-02-29T00:00:00.5Z",
            "1970-01-01T00:00:00Z",
            "2026-12-02T14:16:33.25+01:00",
        ] {
            let c = chrono::DateTime::parse_from_rfc3339(s).expect("valid");
            let want = Duration::new(c.timestamp() as u64, c.timestamp_subsec_nanos());
            assert_eq!(parse_utc(s), Some(want), "{s}");
        }
        for bad in [
            "",
            "yesterday",
            "2026-13-02T13:16:33Z",
            "2026-12-02T13:16:33.Z",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
    }
}
