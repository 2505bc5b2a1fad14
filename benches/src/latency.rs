//! Latency recording: an HdrHistogram per measured quantity, and its percentile summary.

use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Highest latency recorded exactly: one hour, in microseconds. Larger values are clamped.
const MAX_US: u64 = 3_600_000_000;
/// Significant digits kept: values are exact to 0.1 % across the whole range.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Thread-safe latency histograms in microseconds, one for the whole run and one for the
/// current period: constant memory (a few hundred KiB) whatever the number of messages,
/// unlike a list of samples.
pub struct Latencies {
    histograms: Mutex<Pair>,
}

struct Pair {
    total: Histogram<u64>,
    period: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Self {
        // Constant bounds that `new_with_bounds` accepts (1 ≤ low, high ≥ 2·low, digits ≤ 5):
        // nothing a user passes can make this fail.
        let total = Histogram::new_with_bounds(1, MAX_US, SIGNIFICANT_DIGITS)
            .expect("constant histogram bounds are valid");
        Self {
            histograms: Mutex::new(Pair {
                period: total.clone(),
                total,
            }),
        }
    }

    /// Records one latency in microseconds (clamped to the histogram's range).
    pub fn record_us(&self, us: u64) {
        if let Ok(mut h) = self.histograms.lock() {
            let us = us.clamp(1, MAX_US);
            h.total.saturating_record(us);
            h.period.saturating_record(us);
        }
    }

    /// How many latencies were recorded.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.histograms.lock().map_or(0, |h| h.total.len())
    }

    /// The percentile summary of everything recorded so far.
    pub fn percentiles(&self) -> Percentiles {
        self.histograms
            .lock()
            .map_or_else(|_| Percentiles::default(), |h| Percentiles::of(&h.total))
    }

    /// The percentile summary of what was recorded since the last call; starts a new period.
    pub fn take_period(&self) -> Percentiles {
        self.histograms.lock().map_or_else(
            |_| Percentiles::default(),
            |mut h| {
                let p = Percentiles::of(&h.period);
                h.period.reset();
                p
            },
        )
    }

    /// `(quantile, ms)` pairs of the whole run at OpenMessaging's reporting quantiles.
    pub fn quantiles(&self) -> Vec<(f64, f64)> {
        let Ok(h) = self.histograms.lock() else {
            return Vec::new();
        };
        if h.total.is_empty() {
            return Vec::new();
        }
        [50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99, 100.0]
            .into_iter()
            .map(|q| (q, h.total.value_at_percentile(q) as f64 / 1000.0))
            .collect()
    }
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p75_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub p9999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// `(OMB field suffix, ms)`, in the order of OMB's `TestResult`.
    pub fn omb_fields(&self) -> [(&'static str, f64); 8] {
        [
            ("Avg", self.avg_ms),
            ("50pct", self.p50_ms),
            ("75pct", self.p75_ms),
            ("95pct", self.p95_ms),
            ("99pct", self.p99_ms),
            ("999pct", self.p999_ms),
            ("9999pct", self.p9999_ms),
            ("Max", self.max_ms),
        ]
    }

    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let at = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            avg_ms: h.mean() / 1000.0,
            p50_ms: at(0.5),
            p75_ms: at(0.75),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            p9999_ms: at(0.9999),
            max_ms: h.max() as f64 / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_follow_the_recorded_distribution() {
        let l = Latencies::new();
        for us in 1..=10_000u64 {
            l.record_us(us);
        }
        let p = l.percentiles();
        assert_eq!(l.len(), 10_000);
        // Within the histogram's 0.1 % precision.
        assert!((p.p50_ms - 5.0).abs() <= 0.01, "{p:?}");
        assert!((p.p99_ms - 9.9).abs() <= 0.01, "{p:?}");
        assert!((p.max_ms - 10.0).abs() <= 0.01, "{p:?}");
        assert!(p.p75_ms <= p.p95_ms && p.p95_ms <= p.p999_ms && p.p999_ms <= p.max_ms);
    }

    #[test]
    fn values_beyond_the_range_are_clamped_not_lost() {
        let l = Latencies::new();
        l.record_us(0);
        l.record_us(u64::MAX);
        assert_eq!(l.len(), 2);
        assert!(l.percentiles().max_ms >= 3_599_000.0);
    }

    #[test]
    fn a_period_holds_only_what_was_recorded_since_the_last() {
        let l = Latencies::new();
        l.record_us(1_000);
        assert!((l.take_period().max_ms - 1.0).abs() < 0.01);
        l.record_us(5_000);
        let p = l.take_period();
        assert!((p.p50_ms - 5.0).abs() < 0.01, "{p:?}");
        assert_eq!(l.take_period().max_ms, 0.0, "an empty period");
        assert!(
            (l.percentiles().p50_ms - 1.0).abs() < 0.01,
            "the total keeps both"
        );
    }

    #[test]
    fn an_empty_histogram_reports_zeros() {
        assert_eq!(Latencies::new().percentiles().p99_ms, 0.0);
    }
}
