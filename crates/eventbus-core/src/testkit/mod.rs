//! The conformance kit: the same cases for every backend (DESIGN.md §3 "Identical
//! behaviour"). A backend implements [`Backend`] and runs all cases with one line:
//!
//! ```text
//! async fn backend() -> MyBackend { MyBackend::from_env().await }
//! eventbus_core::conformance_tests!(backend);
//! ```
//!
//! Each case talks to the broker only through [`Bus`], uses fresh topic and group names, and
//! waits for what it expects with a deadline (`EVENTBUS_KIT_TIMEOUT_SECS`, default 60 s):
//! a missing message fails the case with what was seen; nothing is skipped. Where backends
//! legitimately differ the case asserts according to [`crate::Capabilities`] and prints it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use crate::{
    headers, Bus, BusConfig, BusError, Compression, Envelope, HandlerError, Headers, Message,
    Publication, PublishResult, RetryPolicy, Transport, TransportError,
};
use crate::{Delivery as _, Subscription as _, SubscriptionSpec};

mod alloc;
mod bad_input;
mod cloud;
mod compression;
mod delivery;
mod failures;
mod faults;
mod groups;
mod lifecycle;
mod log;
mod ordering;
mod outage;
mod peers;
mod placement;
mod proxy;
mod recorder;
mod scaleout;
mod telemetry;

pub use alloc::{allocations_per_message, ALLOC_MEASURED};
pub use bad_input::*;
pub use cloud::*;
pub use compression::*;
pub use delivery::*;
pub use failures::*;
pub use faults::{
    injected_fault, silence_injected_panics, tasks_and_rss, InjectedFault, INJECTED_PANIC,
};
pub use groups::*;
pub use lifecycle::*;
pub use log::captured_log;
pub use ordering::*;
pub use outage::{connection_lost_and_back, wait_for_state, Outage};
pub use peers::*;
pub use placement::java_partition_mismatches;
pub use proxy::TcpProxy;
pub use recorder::Recorder;
pub use scaleout::*;
pub use telemetry::*;

/// The names of every case, in the order [`conformance_tests!`](crate::conformance_tests)
/// runs them.
pub const CASES: &[&str] = crate::__eventbus_kit_cases!(names);

/// A broker under test: each call gives a new client connection (a "process") to the same
/// broker.
pub trait Backend: Send + Sync + 'static {
    /// The backend's transport.
    type Transport: Transport;
    /// A new bus connected to the broker under test.
    fn connect(
        &self,
        config: BusConfig,
    ) -> impl Future<Output = Result<Bus<Self::Transport>, BusError>> + Send;

    /// Whether the backend works on Tokio's current-thread runtime. A backend that does not
    /// must refuse it at connect with [`TransportError::Unsupported`]
    /// (checked by [`current_thread_runtime`]).
    fn supports_current_thread(&self) -> bool {
        true
    }

    /// The messages of `topic` as the broker stores them, read without the bus (at least
    /// `count` of them, waiting for them to arrive). `None` when this harness has no raw
    /// reader; the backend crates' own kit runs have one.
    fn read_stored(
        &self,
        topic: &str,
        count: usize,
    ) -> impl Future<Output = Option<Vec<StoredMessage>>> + Send {
        let _ = (topic, count);
        async { None }
    }
}

/// One message as the broker holds it, read back without the bus.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// The payload bytes as stored (compressed if the bus compressed them).
    pub payload: Bytes,
    /// The headers as stored.
    pub headers: Vec<(String, String)>,
    /// The codec the broker stores the message's batch with (`"lz4"`, …), where the
    /// protocol compresses batches (Kafka record batches); `None` when uncompressed or when
    /// the protocol has no batch compression.
    pub batch_compression: Option<String>,
}

impl StoredMessage {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The configuration every case starts from: short backoffs and waits so cases run fast.
pub fn kit_config() -> BusConfig {
    BusConfig::default()
        .with_retry(RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            multiplier: 2.0,
        })
        .with_max_wait(Duration::from_millis(50))
        .with_close_timeout(Duration::from_secs(20))
        .with_keyed_workers(8)
        .with_global_workers(4)
}

/// The longest a kit step waits for something that must happen (a hang guard, not a timing
/// assertion): 60 s, or `EVENTBUS_KIT_TIMEOUT_SECS`.
pub fn kit_timeout() -> Duration {
    let secs = std::env::var("EVENTBUS_KIT_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// Runs `work` under the kit's hang guard: panics naming `what` if it has not finished within
/// [`kit_timeout`]. It guards against a hang; it asserts nothing about speed.
pub async fn hang_guard<F: Future>(what: &str, work: F) -> F::Output {
    match tokio::time::timeout(kit_timeout(), work).await {
        Ok(out) => out,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// For a test's child process (a bus instance or a relay the test kills and restarts): ends
/// this process when the parent closes its stdin or dies, so no child outlives its test.
pub fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
}

/// A fresh topic name for one case.
pub fn unique(name: &str) -> String {
    let id = crate::new_event_id();
    format!("kit-{name}-{}", &id[id.len() - 12..])
}

async fn connect<B: Backend>(b: &B, config: BusConfig) -> Bus<B::Transport> {
    b.connect(config)
        .await
        .expect("connect to the broker under test")
}

fn env(agg: &str, version: i64) -> Envelope {
    Envelope::new(
        agg,
        "kit.event",
        version,
        json!({"aggregate": agg, "version": version, "note": format!("event {version} of {agg}")}),
    )
}

fn versions_of(items: &[Envelope], agg: &str) -> Vec<i64> {
    items
        .iter()
        .filter(|e| e.aggregate_id == agg)
        .map(|e| e.event_version)
        .collect()
}

/// Counts per-aggregate ordering violations: a version that is not above the previous one
/// handled for the same aggregate.
pub fn ordering_violations(items: &[Envelope]) -> usize {
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut violations = 0;
    for e in items {
        if let Some(prev) = last.insert(e.aggregate_id.as_str(), e.event_version) {
            if e.event_version <= prev {
                violations += 1;
            }
        }
    }
    violations
}

/// Waits until every event of `ids` was handled and returns all handlings and the first
/// handling of each event (in handling order), for the order check.
pub async fn every_event_handled(
    handled: &Recorder<Envelope>,
    ids: &[String],
    what: &str,
) -> (Vec<Envelope>, Vec<Envelope>) {
    let want: HashSet<&String> = ids.iter().collect();
    let got = handled
        .wait_until(what, |items| {
            let seen: HashSet<&String> = items.iter().map(|e| &e.event_id).collect();
            want.iter().all(|id| seen.contains(*id))
        })
        .await;
    let mut seen = HashSet::new();
    let first = got
        .iter()
        .filter(|e| seen.insert(e.event_id.clone()))
        .cloned()
        .collect();
    (got, first)
}

async fn subscribe_dlq<T: Transport>(bus: &Bus<T>, topic: &str) -> Recorder<Message> {
    let dlq = Recorder::default();
    bus.subscribe(
        &format!("{topic}.dlq"),
        &unique("dlq-reader"),
        dlq.handler(),
    )
    .await
    .expect("subscribe to the dead-letter topic");
    dlq
}

/// The case list, written once: [`CASES`] and [`conformance_tests!`](crate::conformance_tests)
/// are generated from it. Cases in `current_thread` run on Tokio's current-thread runtime.
#[doc(hidden)]
#[macro_export]
macro_rules! __eventbus_kit_cases {
    ($($mode:tt)*) => {
        $crate::__eventbus_kit_apply! {$($mode)*;
            multi_thread [
                round_trip, headers_round_trip, per_aggregate_order, global_pool_delivery,
                blocked_aggregate_stalls_no_other, retrying_aggregate_keeps_order_others_flow,
                retry_then_success, panic_is_an_error, dead_letter_after_attempts,
                consumer_group_shares_work, group_across_instances_keeps_aggregate_order,
                independent_groups, new_subscriber_receives_stored,
                resume_after_restart, one_result_per_publish, dedup_by_event_id,
                close_while_publishing_loses_nothing, close_bounded_with_unread_results,
                subscribe_racing_close_leaves_nothing, compression_round_trip,
                mixed_compressed_and_plain, malformed_input_dead_letter, bad_input_is_rejected,
                ack_settles_nak_redelivers, trace_context_crosses_the_broker,
                middleware_wraps_the_handler, cloud_events_round_trip,
                lag_counts_what_a_group_has_not_acknowledged, bad_input_sweep,
                poison_message_is_dead_lettered_once_across_members,
                retrying_message_survives_its_member_leaving
            ];
            current_thread [current_thread_runtime]}
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __eventbus_kit_apply {
    (names; multi_thread [$($m:ident),* $(,)?]; current_thread [$($c:ident),* $(,)?]) => {
        &[$(stringify!($m),)* $(stringify!($c),)*]
    };
    (tests $make:path; multi_thread [$($m:ident),* $(,)?]; current_thread [$($c:ident),* $(,)?]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $m() {
                let backend = $make().await;
                $crate::testkit::$m(&backend).await;
            }
        )*
        $(
            #[tokio::test(flavor = "current_thread")]
            async fn $c() {
                let backend = $make().await;
                $crate::testkit::$c(&backend).await;
            }
        )*
    };
}

/// Runs every conformance case as its own `#[tokio::test]`. `$make` is an `async fn()`
/// returning the [`Backend`].
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::__eventbus_kit_cases!(tests $make);
    };
}

/// The memory backend under the kit: each `connect` is a new client of the same broker.
impl Backend for crate::memory::MemoryBroker {
    type Transport = crate::memory::MemoryTransport;
    async fn connect(&self, config: BusConfig) -> Result<Bus<Self::Transport>, BusError> {
        Bus::new(self.transport(), config)
    }

    async fn read_stored(&self, topic: &str, count: usize) -> Option<Vec<StoredMessage>> {
        let stored = self.messages(topic);
        assert!(
            stored.len() >= count,
            "{} of {count} messages stored",
            stored.len()
        );
        Some(
            stored
                .into_iter()
                .map(|(h, payload)| StoredMessage {
                    payload,
                    headers: h
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    batch_compression: None,
                })
                .collect(),
        )
    }
}

/// Peak tokio tasks alive while `messages` envelopes over `aggregates` aggregates flow
/// through `bus` (one envelope subscription on a fresh topic). Backends compare it at two
/// volumes to show the task count is set by configuration only.
pub async fn peak_tasks_during_flow<T: Transport>(
    bus: &Bus<T>,
    messages: usize,
    aggregates: usize,
) -> usize {
    let topic = unique("tasks");
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    bus.subscribe_envelope(&topic, &unique("group"), move |_e: Envelope| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::Relaxed);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
    let metrics = tokio::runtime::Handle::current().metrics();
    let publish = async {
        for v in 1..=(messages / aggregates) as i64 {
            for a in 0..aggregates {
                bus.publish_envelope(&topic, &env(&format!("agg-{a}"), v))
                    .await
                    .expect("publish");
            }
        }
    };
    let mut peak = 0;
    // The sampler runs inside this future, not as a task of its own, and samples at least once.
    let sample = async {
        let deadline = tokio::time::Instant::now() + kit_timeout() * 5;
        loop {
            peak = peak.max(metrics.num_alive_tasks());
            if seen.load(Ordering::Relaxed) >= messages {
                break;
            }
            assert!(
                deadline > tokio::time::Instant::now(),
                "not all {messages} envelopes delivered"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::join!(publish, sample);
    peak
}

/// Waits until at most `baseline` tokio tasks are alive and returns how many are; the kit
/// timeout only guards against a hang. A task whose join handle was awaited, or a client
/// library's task that has signalled its end (async-nats spawns some without join handles),
/// is released a little later; there is no event to wait on, so this looks again on every
/// runtime tick.
pub async fn tasks_released(baseline: usize) -> usize {
    let metrics = tokio::runtime::Handle::current().metrics();
    let released = async {
        while metrics.num_alive_tasks() > baseline {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let _ = tokio::time::timeout(kit_timeout(), released).await;
    metrics.num_alive_tasks()
}
