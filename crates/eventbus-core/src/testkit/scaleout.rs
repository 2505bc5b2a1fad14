//! A consumer group across several instances: per-aggregate order and exclusive handling.

use super::*;

use tokio::sync::Notify;

/// What every instance of a group handled, checked as it happens: two handlings of one
/// aggregate at overlapping times (in one instance or across instances), first handlings out
/// of version order, and duplicates (an `event_id` handled again).
#[derive(Default)]
pub struct GroupLedger {
    state: Mutex<LedgerState>,
    changed: Notify,
}

#[derive(Default)]
struct LedgerState {
    /// Aggregates being handled now, with the instance handling them.
    active: HashMap<String, u8>,
    last_version: HashMap<String, i64>,
    seen: HashSet<String>,
    per_instance: HashMap<u8, usize>,
    forgotten: HashSet<u8>,
    overlaps: usize,
    order_violations: usize,
    duplicates: usize,
}

/// The ledger's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerCounts {
    /// Distinct events handled.
    pub handled: usize,
    /// Handlings of an aggregate that began while another handling of it was under way.
    pub overlaps: usize,
    /// First handlings of an event whose version was not above the aggregate's previous one.
    pub order_violations: usize,
    /// Handlings of an event already handled.
    pub duplicates: usize,
    /// Distinct instances that handled something.
    pub instances: usize,
    /// Events handled per instance.
    pub per_instance: Vec<(u8, usize)>,
}

impl GroupLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handling of `e` by `instance` begins.
    pub fn enter(&self, instance: u8, e: &Envelope) {
        self.begin(instance, &e.aggregate_id);
    }

    /// The handling of `e` by `instance` ends.
    pub fn leave(&self, instance: u8, e: &Envelope) {
        self.end(instance, &e.event_id, &e.aggregate_id, e.event_version);
    }

    /// A handling of an event of `aggregate` by `instance` begins (for records that come from
    /// another process). Ignored for a forgotten instance.
    pub fn begin(&self, instance: u8, aggregate: &str) {
        let mut s = self.lock();
        if s.forgotten.contains(&instance) {
            return;
        }
        if s.active.insert(aggregate.to_string(), instance).is_some() {
            s.overlaps += 1;
        }
    }

    /// The handling of event `event_id` (`aggregate`, `version`) by `instance` ends.
    pub fn end(&self, instance: u8, event_id: &str, aggregate: &str, version: i64) {
        {
            let mut s = self.lock();
            if s.active.get(aggregate) == Some(&instance) {
                s.active.remove(aggregate);
            }
            *s.per_instance.entry(instance).or_default() += 1;
            if !s.seen.insert(event_id.to_string()) {
                s.duplicates += 1;
            } else {
                let prev = s.last_version.insert(aggregate.to_string(), version);
                if prev.is_some_and(|p| version <= p) {
                    s.order_violations += 1;
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// `instance` is dead (its process was killed): what it was handling ends without an
    /// end, and a begin of it still in transit is not counted.
    pub fn forget(&self, instance: u8) {
        let mut s = self.lock();
        s.forgotten.insert(instance);
        s.active.retain(|_, i| *i != instance);
    }

    /// The counts so far.
    pub fn counts(&self) -> LedgerCounts {
        let s = self.lock();
        LedgerCounts {
            handled: s.seen.len(),
            overlaps: s.overlaps,
            order_violations: s.order_violations,
            duplicates: s.duplicates,
            instances: s.per_instance.values().filter(|n| **n > 0).count(),
            per_instance: {
                let mut v: Vec<(u8, usize)> =
                    s.per_instance.iter().map(|(i, n)| (*i, *n)).collect();
                v.sort_unstable();
                v
            },
        }
    }

    /// Waits until `pred` holds for the counts; panics with them after the kit timeout.
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&LedgerCounts) -> bool) {
        let deadline = tokio::time::Instant::now() + kit_timeout();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let counts = self.counts();
            if pred(&counts) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out waiting for {what}: {:?}", self.counts());
            }
        }
    }
}

/// Subscribes `bus` as instance `instance` of `group`, recording into `ledger`. The handler
/// yields between the start and the end of a handling, so a second handling of the same
/// aggregate that runs concurrently is seen.
pub async fn join_group<T: Transport>(
    bus: &Bus<T>,
    topic: &str,
    group: &str,
    instance: u8,
    ledger: &Arc<GroupLedger>,
) {
    let l = ledger.clone();
    bus.subscribe_envelope(topic, group, move |e: Envelope| {
        let l = l.clone();
        async move {
            l.enter(instance, &e);
            tokio::task::yield_now().await;
            l.leave(instance, &e);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .expect("subscribe");
}

/// A handler for instance `instance` that records its handlings in `ledger` and works
/// `work` on each (so a second handling of the aggregate meanwhile, on another instance, is
/// seen as an overlap).
pub fn working_ledger_handler(
    ledger: &Arc<GroupLedger>,
    instance: u8,
    work: Duration,
) -> impl Fn(Envelope) -> std::pin::Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>
       + Send
       + Sync
       + 'static {
    let ledger = ledger.clone();
    move |e: Envelope| {
        let l = ledger.clone();
        Box::pin(async move {
            l.enter(instance, &e);
            tokio::time::sleep(work).await;
            l.leave(instance, &e);
            Ok(())
        })
    }
}

/// Three bus instances in one group, 100,000 envelopes over 1,000 aggregates: every event is
/// handled, each aggregate's events in version order, and no aggregate is handled by two
/// instances (or twice in one) at overlapping times. Every instance gets work: rounds of one
/// event per aggregate are published and handled one by one until all three have handled
/// something (instances join a group over some time on every broker), then the rest.
pub async fn group_across_instances_keeps_aggregate_order<B: Backend>(b: &B) {
    const INSTANCES: u8 = 3;
    const AGGREGATES: usize = 1_000;
    const ROUNDS: i64 = 100;
    let topic = unique("scale-out");
    let group = unique("svc");
    let publisher = connect(b, kit_config()).await;
    assert!(
        publisher.capabilities().partitioned_groups,
        "backend {} does not keep per-aggregate order across the instances of a group",
        publisher.health().backend
    );
    let ledger = Arc::new(GroupLedger::default());
    let mut instances = Vec::new();
    for i in 0..INSTANCES {
        let bus = connect(b, kit_config()).await;
        join_group(&bus, &topic, &group, i, &ledger).await;
        instances.push(bus);
    }
    let mut published = 0usize;
    let mut round = 0i64;
    let publish_round = |round: i64| {
        let publisher = &publisher;
        let topic = &topic;
        async move {
            for a in 0..AGGREGATES {
                publisher
                    .publish_envelope(topic, &env(&format!("agg-{a}"), round))
                    .await
                    .expect("publish");
            }
        }
    };
    // Until every instance has work, one round at a time, each handled before the next.
    hang_guard("every instance to get work", async {
        while ledger.counts().instances < usize::from(INSTANCES) {
            round += 1;
            publish_round(round).await;
            published += AGGREGATES;
            publisher.flush().await.expect("flush");
            ledger
                .wait_until("this round", |c| c.handled >= published)
                .await;
        }
    })
    .await;
    // Then the rest at full speed.
    while round < ROUNDS {
        round += 1;
        publish_round(round).await;
        published += AGGREGATES;
    }
    publisher.flush().await.expect("flush");
    ledger
        .wait_until("every event handled", |c| c.handled >= published)
        .await;
    for bus in &instances {
        bus.close().await.expect("close");
    }
    let c = ledger.counts();
    eprintln!("[conformance] group across {INSTANCES} instances: {c:?}");
    assert_eq!(c.handled, published, "events lost");
    assert_eq!(c.overlaps, 0, "an aggregate was handled concurrently");
    assert_eq!(c.order_violations, 0, "per-aggregate order broken");
    publisher.close().await.expect("close");
}
