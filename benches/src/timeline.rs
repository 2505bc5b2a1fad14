//! Per-period samples of a run (rates, backlog, latency percentiles), as the OpenMessaging
//! Benchmark reports them every 10 seconds.

use std::time::{Duration, Instant};

use crate::latency::Percentiles;
use crate::targets::SendClock;
use crate::workload::Checker;

/// One period's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Messages acknowledged by the broker per second in this period.
    pub publish_rate: f64,
    /// Messages handled per second in this period.
    pub consume_rate: f64,
    /// Acknowledged but not yet handled, at the end of the period.
    pub backlog: i64,
    /// Publish-to-ACK latency of this period's ACKs.
    pub publish: Percentiles,
    /// End-to-end latency of this period's deliveries.
    pub e2e: Percentiles,
}

/// Collects a [`Sample`] every `period` while a run is watched.
#[derive(Debug, Clone)]
pub struct Timeline {
    period: Duration,
    last_at: Duration,
    last_acked: u64,
    last_delivered: u64,
    pub samples: Vec<Sample>,
    /// `(percentile, ms)` of the whole run, publish to ACK (set at the end).
    pub publish_quantiles: Vec<(f64, f64)>,
    /// `(percentile, ms)` of the whole run, end to end (set at the end).
    pub e2e_quantiles: Vec<(f64, f64)>,
}

impl Timeline {
    pub fn new(period: Duration) -> Self {
        Self {
            period: period.max(Duration::from_millis(100)),
            last_at: Duration::ZERO,
            last_acked: 0,
            last_delivered: 0,
            samples: Vec::new(),
            publish_quantiles: Vec::new(),
            e2e_quantiles: Vec::new(),
        }
    }

    /// Closes the current period if it is over. At the end of the run (`last`), closes the
    /// last, shorter period if it lasted at least half a period (a shorter tail would report
    /// the rate of a few stragglers; the whole-run figures include it either way) and takes
    /// the whole-run quantiles.
    pub(crate) fn observe(
        &mut self,
        start: Instant,
        acked: u64,
        (checker, clock): (&Checker, &SendClock),
        last: bool,
    ) {
        let now = start.elapsed();
        let due = if last {
            now >= self.last_at + self.period / 2
                && (acked > self.last_acked || checker.delivered() > self.last_delivered)
        } else {
            now >= self.last_at + self.period
        };
        if due {
            self.close_period(now, acked, checker, clock);
        }
        if last {
            self.publish_quantiles = clock.acked.quantiles();
            self.e2e_quantiles = checker.latencies().quantiles();
        }
    }

    fn close_period(&mut self, now: Duration, acked: u64, checker: &Checker, clock: &SendClock) {
        let secs = (now - self.last_at).as_secs_f64().max(1e-9);
        let delivered = checker.delivered();
        self.samples.push(Sample {
            publish_rate: acked.saturating_sub(self.last_acked) as f64 / secs,
            consume_rate: delivered.saturating_sub(self.last_delivered) as f64 / secs,
            backlog: acked as i64 - delivered as i64,
            publish: clock.acked.take_period(),
            e2e: checker.latencies().take_period(),
        });
        self.last_at = now;
        self.last_acked = acked;
        self.last_delivered = delivered;
    }
}
