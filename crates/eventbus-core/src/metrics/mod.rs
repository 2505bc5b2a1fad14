//! Counters of one bus, read with [`crate::Bus::metrics`], and the same figures (with
//! latencies) through the `metrics` facade ([`facade`]).

use std::sync::atomic::{AtomicU64, Ordering};

pub mod facade;

pub(crate) use facade::{BusExport, RouteExport};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters (relaxed atomics: monotonic, cheap, read as a snapshot).
        #[derive(Debug, Default)]
        pub(crate) struct Metrics {
            $(pub(crate) $name: AtomicU64,)*
            /// The bus-wide series of the `metrics` facade.
            pub(crate) export: BusExport,
        }

        /// A snapshot of a bus's counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct MetricsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
            /// Publishes handed over and still awaiting their ACK.
            pub in_flight_publishes: u64,
            /// Messages waiting in the dispatcher's queues.
            pub queued_messages: u64,
            /// Live subscriptions.
            pub subscriptions: u64,
            /// Dispatcher worker tasks (keyed + global), fixed by configuration.
            pub workers: u64,
        }

        impl Metrics {
            pub(crate) fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                    ..MetricsSnapshot::default()
                }
            }
        }
    };
}

counters! {
    /// Messages accepted by `publish` (handed to the broker client).
    published,
    /// Publishes the broker acknowledged.
    publish_acked,
    /// Publishes that failed (broker error or no ACK before the close deadline).
    publish_failed,
    /// Publishes the broker reported as duplicates of an earlier `event_id`.
    publish_duplicates,
    /// Publish results dropped from the results stream because its reader did not take them
    /// before the close deadline (the callback saw them).
    results_dropped,
    /// Messages the fetchers handed to the dispatcher.
    fetched,
    /// Messages whose handler succeeded.
    handled,
    /// Failed handler attempts (panics included).
    handler_errors,
    /// Handler panics.
    handler_panics,
    /// Retries scheduled.
    retries,
    /// Messages moved to a dead-letter topic.
    dead_lettered,
    /// Dead-letter publishes that failed (the message is redelivered instead).
    dead_letter_failures,
    /// Redelivered messages skipped because their `event_id` was already handled.
    deduplicated,
    /// Malformed envelopes and undecodable payloads.
    malformed,
    /// Messages dropped unstarted because this member no longer owned their partition (a lost
    /// assignment or lease, a revoke): the partition's next owner delivers them.
    not_owned_dropped,
    /// Acks, naks or terms the broker did not take.
    settle_failures,
    /// Failed fetches (the fetcher backs off and tries again).
    fetch_errors,
    /// Subscriptions found stalled (nothing received for `stall_timeout` while a partition
    /// they hold had messages waiting) and given a new consumer.
    fetch_stalls,
}

impl Metrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
