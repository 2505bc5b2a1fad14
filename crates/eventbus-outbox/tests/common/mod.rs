//! Shared by the outbox tests: databases (SQLite in a temporary file, PostgreSQL from
//! `EVENTBUS_POSTGRES_URL`, a fresh database per test), a transport wrapper that fails chosen
//! publishes or records concurrent ones, and the cases every database runs.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use eventbus_core::memory::{MemoryBroker, MemoryTransport};
use eventbus_core::testkit::{kit_timeout, unique};
use eventbus_core::{
    Bus, BusConfig, Capabilities, Envelope, Health, OutgoingMessage, Receipt, SubscriptionSpec,
    Transport, TransportError,
};
use eventbus_outbox::{
    enqueue, DeadCallback, DeadEvent, OutboxDb, OutboxExecutor, Relay, RelayConfig, RelayMetrics,
};

/// A database under test, with the application's side: a transaction that enqueues.
pub enum Db {
    Sqlite(sqlx::SqlitePool, std::path::PathBuf),
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

impl Db {
    /// SQLite in a fresh temporary file (WAL, so the relay reads while the test writes).
    pub async fn sqlite() -> Self {
        let path = std::env::temp_dir().join(format!("{}.sqlite", unique("outbox")));
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .expect("open SQLite");
        let db = Self::Sqlite(pool, path);
        db.outbox().migrate().await.expect("migrate");
        db
    }

    /// A fresh database on the PostgreSQL server of `EVENTBUS_POSTGRES_URL`.
    #[cfg(feature = "postgres")]
    pub async fn postgres() -> Self {
        Self::Postgres(postgres_pool(&fresh_postgres_database().await).await)
    }

    pub fn outbox(&self) -> OutboxDb {
        match self {
            Self::Sqlite(p, _) => OutboxDb::from(p.clone()),
            #[cfg(feature = "postgres")]
            Self::Postgres(p) => OutboxDb::from(p.clone()),
        }
    }

    /// Enqueues `events` in one transaction, then commits (or rolls back).
    pub async fn write(&self, topic: &str, events: &[Envelope], commit: bool) {
        match self {
            Self::Sqlite(p, _) => write_in(p, topic, events, commit).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(p) => write_in(p, topic, events, commit).await,
        }
    }

    /// The row of `event_id`: (state, attempts, published_at is set).
    pub async fn row(&self, event_id: &str) -> (i64, i64, bool) {
        const SQL: &str = "SELECT state, attempts, published_at IS NOT NULL FROM eventbus_outbox WHERE event_id = ";
        match self {
            Self::Sqlite(p, _) => sqlx::query_as(&format!("{SQL}?"))
                .bind(event_id)
                .fetch_one(p)
                .await
                .expect("row"),
            #[cfg(feature = "postgres")]
            Self::Postgres(p) => sqlx::query_as(&format!("{SQL}$1"))
                .bind(event_id)
                .fetch_one(p)
                .await
                .expect("row"),
        }
    }
}

async fn write_in<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    topic: &str,
    events: &[Envelope],
    commit: bool,
) where
    sqlx::Transaction<'static, DB>: OutboxExecutor,
{
    let mut tx = pool.begin().await.expect("begin");
    for e in events {
        enqueue(&mut tx, topic, e).await.expect("enqueue");
    }
    if commit {
        tx.commit().await.expect("commit");
    } else {
        tx.rollback().await.expect("rollback");
    }
}

pub fn nats_url() -> String {
    std::env::var("EVENTBUS_NATS_URL")
        .expect("EVENTBUS_NATS_URL (scripts/test.sh starts nats-server)")
}

/// A bus on the NATS server of `EVENTBUS_NATS_URL`.
pub async fn nats_bus() -> Bus<eventbus_nats::NatsTransport> {
    let t = eventbus_nats::NatsTransport::connect(eventbus_nats::NatsConfig::new(nats_url()))
        .await
        .expect("connect to NATS");
    Bus::new(t, eventbus_core::testkit::kit_config()).expect("bus")
}

pub fn postgres_url() -> String {
    std::env::var("EVENTBUS_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "EVENTBUS_POSTGRES_URL is not set. Run scripts/test.sh (it starts PostgreSQL), or \
             `scripts/postgres.sh start` and export what `scripts/postgres.sh env` prints."
        )
    })
}

/// Creates a database of its own for one test; returns its URL.
#[cfg(feature = "postgres")]
pub async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    let admin = postgres_url();
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to the PostgreSQL server of EVENTBUS_POSTGRES_URL");
    let name = unique("outbox").replace('-', "_");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create a test database");
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    format!("{base}/{name}")
}

#[cfg(feature = "postgres")]
pub async fn postgres_pool(url: &str) -> sqlx::PgPool {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(url)
        .await
        .expect("connect to the test database");
    OutboxDb::from(pool.clone())
        .migrate()
        .await
        .expect("migrate");
    pool
}

/// The relay configuration of the tests: quick retries and polls.
pub fn relay_config() -> RelayConfig {
    RelayConfig {
        poll_interval: Duration::from_millis(50),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        ..RelayConfig::default()
    }
}

/// Waits (under the kit's hang guard) until the relay's metrics satisfy `pred`.
pub async fn wait_for(relay: &Relay, what: &str, pred: impl Fn(&RelayMetrics) -> bool) {
    let mut progress = relay.progress();
    let waited = tokio::time::timeout(kit_timeout(), progress.wait_for(|m| pred(m))).await;
    assert!(
        matches!(waited, Ok(Ok(_))),
        "timed out waiting for {what}: {:?}",
        relay.metrics()
    );
}

/// A memory-backend transport whose publishes fail on demand (the ACK reports
/// `Unavailable`, the message is not stored) and which records publishes of one event id
/// that overlap in time.
#[derive(Clone)]
pub struct Flaky {
    inner: Arc<MemoryTransport>,
    /// Publishes to fail, whatever the event.
    pub fail_any: Arc<AtomicUsize>,
    /// Publishes to fail per event id.
    pub fail_ids: Arc<Mutex<HashMap<String, usize>>>,
    /// Event ids being published now, and how often one was published while already in flight.
    in_flight: Arc<Mutex<HashSet<String>>>,
    pub overlapping: Arc<AtomicUsize>,
    /// Publishes per event id.
    pub sends: Arc<Mutex<HashMap<String, usize>>>,
}

impl Flaky {
    pub fn new(broker: &MemoryBroker) -> Self {
        Self {
            inner: Arc::new(broker.transport()),
            fail_any: Arc::default(),
            fail_ids: Arc::default(),
            in_flight: Arc::default(),
            overlapping: Arc::default(),
            sends: Arc::default(),
        }
    }

    fn should_fail(&self, event_id: &str) -> bool {
        let any = self
            .fail_any
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        let mut ids = self.fail_ids.lock().expect("lock");
        let by_id = match ids.get_mut(event_id) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        any || by_id
    }
}

pub enum FlakyAck<A> {
    Fail,
    Inner {
        ack: A,
        event_id: String,
        in_flight: Arc<Mutex<HashSet<String>>>,
    },
}

impl<A: Future<Output = Result<Receipt, TransportError>> + Unpin> Future for FlakyAck<A> {
    type Output = Result<Receipt, TransportError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Fail => Poll::Ready(Err(TransportError::Unavailable(
                "injected publish failure".into(),
            ))),
            Self::Inner {
                ack,
                event_id,
                in_flight,
            } => {
                let r = std::task::ready!(Pin::new(ack).poll(cx));
                in_flight.lock().expect("lock").remove(event_id.as_str());
                Poll::Ready(r)
            }
        }
    }
}

impl Transport for Flaky {
    type Ack = FlakyAck<<MemoryTransport as Transport>::Ack>;
    type Subscription = <MemoryTransport as Transport>::Subscription;

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn send(&self, message: OutgoingMessage) -> Result<Self::Ack, TransportError> {
        let event_id = message.event_id.clone();
        *self
            .sends
            .lock()
            .expect("lock")
            .entry(event_id.clone())
            .or_default() += 1;
        if self.should_fail(&event_id) {
            return Ok(FlakyAck::Fail);
        }
        if !self
            .in_flight
            .lock()
            .expect("lock")
            .insert(event_id.clone())
        {
            self.overlapping.fetch_add(1, Ordering::Relaxed);
        }
        let ack = self.inner.send(message).await?;
        Ok(FlakyAck::Inner {
            ack,
            event_id,
            in_flight: self.in_flight.clone(),
        })
    }

    async fn subscribe(
        &self,
        spec: SubscriptionSpec,
    ) -> Result<Self::Subscription, TransportError> {
        self.inner.subscribe(spec).await
    }

    fn health(&self) -> Health {
        self.inner.health()
    }

    async fn close(&self) -> Result<(), TransportError> {
        self.inner.close().await
    }
}

/// The envelopes of `topic` as the memory broker stored them, in order.
pub fn stored(broker: &MemoryBroker, topic: &str) -> Vec<Envelope> {
    broker
        .messages(topic)
        .into_iter()
        .map(|(_, payload)| Envelope::from_json(&payload).expect("stored envelope"))
        .collect()
}

pub fn env(agg: &str, version: i64) -> Envelope {
    Envelope::new(
        agg,
        "outbox.test",
        version,
        serde_json::json!({ "v": version }),
    )
}

/// A relay on `db` through a fresh memory broker behind [`Flaky`].
pub struct Harness {
    pub db: Db,
    pub broker: MemoryBroker,
    pub flaky: Flaky,
    pub bus: Bus<Flaky>,
}

impl Harness {
    pub fn new(db: Db) -> Self {
        let broker = MemoryBroker::new();
        let flaky = Flaky::new(&broker);
        let bus = Bus::new(flaky.clone(), BusConfig::default()).expect("bus");
        Self {
            db,
            broker,
            flaky,
            bus,
        }
    }

    pub fn relay(&self, config: RelayConfig) -> Relay {
        Relay::start(self.db.outbox(), self.bus.clone(), config).expect("relay")
    }
}

// ---- the cases every database runs ----

/// Commit → published exactly once: one publish, one ACK, one mark.
pub async fn commit_publishes_exactly_once(db: Db) {
    let h = Harness::new(db);
    let relay = h.relay(relay_config());
    let topic = unique("orders");
    let e = env("order-1", 1);
    h.db.write(&topic, std::slice::from_ref(&e), true).await;
    relay.wake();
    wait_for(&relay, "the mark", |m| m.published >= 1).await;
    let metrics = relay.stop().await.expect("stop");
    assert_eq!(metrics.published, 1);
    assert_eq!(stored(&h.broker, &topic).len(), 1);
    assert_eq!(
        h.flaky.sends.lock().expect("lock").get(&e.event_id),
        Some(&1)
    );
    let (state, attempts, published_at) = h.db.row(&e.event_id).await;
    assert_eq!((state, attempts, published_at), (1, 0, true));
    let stats = h.db.outbox().stats().await.expect("stats");
    assert_eq!((stats.pending, stats.published), (0, 1));
    h.bus.close().await.expect("close");
}

/// Rollback → nothing published (a committed event after it shows the relay ran).
pub async fn rollback_publishes_nothing(db: Db) {
    let h = Harness::new(db);
    let relay = h.relay(relay_config());
    let topic = unique("orders");
    let rolled_back = env("order-1", 1);
    h.db.write(&topic, std::slice::from_ref(&rolled_back), false)
        .await;
    let committed = env("order-2", 1);
    h.db.write(&topic, std::slice::from_ref(&committed), true)
        .await;
    relay.wake();
    wait_for(&relay, "the committed event", |m| m.published >= 1).await;
    relay.stop().await.expect("stop");
    let ids: Vec<String> = stored(&h.broker, &topic)
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(ids, vec![committed.event_id]);
    assert!(!h
        .flaky
        .sends
        .lock()
        .expect("lock")
        .contains_key(&rolled_back.event_id));
    h.bus.close().await.expect("close");
}

/// A broker failure is retried with backoff, then the event is published (once stored).
pub async fn broker_failure_is_retried_then_published(db: Db) {
    let h = Harness::new(db);
    h.flaky.fail_any.store(3, Ordering::Release);
    let relay = h.relay(relay_config());
    let topic = unique("orders");
    let e = env("order-1", 1);
    h.db.write(&topic, std::slice::from_ref(&e), true).await;
    relay.wake();
    wait_for(&relay, "publish after failures", |m| m.published >= 1).await;
    let metrics = relay.stop().await.expect("stop");
    assert_eq!(metrics.retried, 3);
    assert_eq!(stored(&h.broker, &topic).len(), 1);
    let (state, attempts, _) = h.db.row(&e.event_id).await;
    assert_eq!((state, attempts), (1, 3));
    h.bus.close().await.expect("close");
}

/// After the configured attempts a row is marked dead and reported; later events of its
/// aggregate flow again.
pub async fn dead_after_max_attempts(db: Db) {
    let h = Harness::new(db);
    let topic = unique("orders");
    let doomed = env("order-1", 1);
    h.flaky
        .fail_ids
        .lock()
        .expect("lock")
        .insert(doomed.event_id.clone(), usize::MAX);
    let reported: Arc<Mutex<Vec<DeadEvent>>> = Arc::default();
    let r = reported.clone();
    let relay = h.relay(RelayConfig {
        max_attempts: 3,
        on_dead: Some(DeadCallback::new(move |d| {
            r.lock().expect("lock").push(d.clone());
        })),
        ..relay_config()
    });
    let next = env("order-1", 2);
    h.db.write(&topic, &[doomed.clone(), next.clone()], true)
        .await;
    relay.wake();
    wait_for(&relay, "the dead row and the next event", |m| {
        m.dead >= 1 && m.published >= 1
    })
    .await;
    let metrics = relay.stop().await.expect("stop");
    assert_eq!((metrics.dead, metrics.retried), (1, 2));
    let dead = reported.lock().expect("lock").clone();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_id, doomed.event_id);
    assert_eq!(dead[0].attempts, 3);
    assert!(dead[0].error.contains("injected"), "{:?}", dead[0]);
    assert_eq!(h.db.row(&doomed.event_id).await.0, 2);
    let ids: Vec<String> = stored(&h.broker, &topic)
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(ids, vec![next.event_id]);
    assert_eq!(h.db.outbox().stats().await.expect("stats").dead, 1);
    h.bus.close().await.expect("close");
}

/// Per aggregate, broker order is outbox order, also when an earlier event fails and is
/// retried: later events of its aggregate wait for it.
pub async fn order_kept_when_an_earlier_event_fails(db: Db) {
    let h = Harness::new(db);
    let topic = unique("orders");
    let a: Vec<Envelope> = (1..=5).map(|v| env("agg-a", v)).collect();
    let b: Vec<Envelope> = (1..=5).map(|v| env("agg-b", v)).collect();
    h.flaky
        .fail_ids
        .lock()
        .expect("lock")
        .insert(a[0].event_id.clone(), 2);
    let relay = h.relay(relay_config());
    let mut all = Vec::new();
    for v in 0..5 {
        all.push(a[v].clone());
        all.push(b[v].clone());
    }
    h.db.write(&topic, &all, true).await;
    relay.wake();
    wait_for(&relay, "every event", |m| m.published >= 10).await;
    relay.stop().await.expect("stop");
    let got = stored(&h.broker, &topic);
    let versions = |agg: &str| -> Vec<i64> {
        got.iter()
            .filter(|e| e.aggregate_id == agg)
            .map(|e| e.event_version)
            .collect()
    };
    assert_eq!(versions("agg-a"), vec![1, 2, 3, 4, 5]);
    assert_eq!(versions("agg-b"), vec![1, 2, 3, 4, 5]);
    h.bus.close().await.expect("close");
}

/// Rows of one aggregate go out a run at a time: a backlog of 64 events of one aggregate
/// takes one round, not one round (claim, publish, mark) per event.
pub async fn backlog_of_one_aggregate_takes_few_rounds(db: Db) {
    const EVENTS: i64 = 64;
    let h = Harness::new(db);
    let topic = unique("orders");
    let events: Vec<Envelope> = (1..=EVENTS).map(|v| env("agg-a", v)).collect();
    h.db.write(&topic, &events, true).await;
    let relay = h.relay(relay_config());
    wait_for(&relay, "every event", |m| m.published >= EVENTS as u64).await;
    let metrics = relay.stop().await.expect("stop");
    let versions: Vec<i64> = stored(&h.broker, &topic)
        .iter()
        .map(|e| e.event_version)
        .collect();
    assert_eq!(versions, (1..=EVENTS).collect::<Vec<_>>());
    // A round's rows are shared by the aggregates it claims: one aggregate gets them all, so
    // one round (two leave room for a claim that raced the write); one round per event (the
    // heads-only relay) is 64.
    assert!(metrics.rounds <= 2, "{metrics:?}");
    h.bus.close().await.expect("close");
}

/// A failure in the middle of an aggregate's run stops the run there: the events after it
/// wait for it, so broker order is outbox order.
pub async fn order_kept_when_an_event_inside_a_run_fails(db: Db) {
    let h = Harness::new(db);
    let topic = unique("orders");
    let a: Vec<Envelope> = (1..=8).map(|v| env("agg-a", v)).collect();
    h.flaky
        .fail_ids
        .lock()
        .expect("lock")
        .insert(a[3].event_id.clone(), 2);
    h.db.write(&topic, &a, true).await;
    let relay = h.relay(relay_config());
    wait_for(&relay, "every event", |m| m.published >= 8).await;
    let metrics = relay.stop().await.expect("stop");
    assert_eq!(metrics.retried, 2);
    let versions: Vec<i64> = stored(&h.broker, &topic)
        .iter()
        .map(|e| e.event_version)
        .collect();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
    let sends = h.flaky.sends.lock().expect("lock").clone();
    for (i, e) in a.iter().enumerate() {
        let expected = if i == 3 { 3 } else { 1 };
        assert_eq!(sends.get(&e.event_id), Some(&expected), "event {}", i + 1);
    }
    h.bus.close().await.expect("close");
}
