//! The relay killed with SIGKILL mid-batch, again and again, while 10,000 events flow
//! (PostgreSQL and SQLite, on NATS). The relay runs in a child process of this test. After
//! each kill, every row the dead relay had marked published is checked against the broker:
//! republished with its `event_id` as `Nats-Msg-Id`, JetStream must call it a duplicate (it
//! was stored before the mark). At the end every event is published and marked, and the
//! consumer saw each one.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{env, nats_bus, nats_url, Db};
use eventbus_core::partitioner::partition_for;
use eventbus_core::testkit::{kit_timeout, unique, Recorder};
use eventbus_core::Envelope;
use eventbus_outbox::{OutboxDb, Relay, RelayConfig};

const CHILD_ENV: &str = "EVENTBUS_OUTBOX_RELAY_CHILD";
const AGGREGATES: usize = 100;
const VERSIONS: i64 = 100;
const KILLS: usize = 8;

/// Opens the outbox of `url` (`sqlite://path` or a PostgreSQL URL).
async fn open(url: &str) -> OutboxDb {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(opts)
            .await
            .expect("open SQLite");
        return OutboxDb::from(pool);
    }
    #[cfg(feature = "postgres")]
    {
        OutboxDb::from(common::postgres_pool(url).await)
    }
    #[cfg(not(feature = "postgres"))]
    panic!("{url}: PostgreSQL needs the `postgres` feature")
}

/// The relay, in this process when run as a child (the parent sets `CHILD_ENV` to the
/// database URL). Runs until its stdin closes or it is killed.
#[test]
#[ignore = "the relay of the crash test, started by it as a child process"]
fn crash_relay_child() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    eventbus_core::testkit::exit_when_stdin_closes();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let db = open(&url).await;
        let bus = nats_bus().await;
        // Small rounds, so kills land in the middle of one.
        let _relay = Relay::start(
            db,
            bus,
            RelayConfig {
                batch_size: 50,
                poll_interval: Duration::from_millis(20),
                ..RelayConfig::default()
            },
        )
        .expect("relay");
        std::future::pending::<()>().await;
    });
}

fn spawn_relay(url: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["crash_relay_child", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV, url)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the relay")
}

/// Event ids marked published.
async fn marked(db: &Db) -> HashSet<String> {
    let rows: Vec<(String,)> = match db {
        Db::Sqlite(p, _) => sqlx::query_as("SELECT event_id FROM eventbus_outbox WHERE state = 1")
            .fetch_all(p)
            .await
            .expect("read marks"),
        #[cfg(feature = "postgres")]
        Db::Postgres(p) => sqlx::query_as("SELECT event_id FROM eventbus_outbox WHERE state = 1")
            .fetch_all(p)
            .await
            .expect("read marks"),
    };
    rows.into_iter().map(|(id,)| id).collect()
}

/// Every event in `ids` is stored on the broker: republished with the same `Nats-Msg-Id`,
/// JetStream answers "duplicate".
async fn all_stored(
    js: &async_nats::jetstream::Context,
    topic: &str,
    ids: &[String],
    events: &HashMap<String, Envelope>,
) {
    let mut acks = Vec::new();
    for id in ids {
        let e = &events[id];
        let partition = partition_for(e.aggregate_id.as_bytes(), 16);
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(e.to_json().expect("json").into())
            .message_id(id.as_str());
        acks.push(
            js.send_publish(format!("{topic}.{partition}"), msg)
                .await
                .expect("republish"),
        );
    }
    for (ack, id) in acks.into_iter().zip(ids) {
        let ack = ack.await.expect("ack");
        assert!(
            ack.duplicate,
            "{id} was marked published but the broker did not have it"
        );
    }
}

async fn crash_run(db: Db, url: String) {
    let topic = unique("outbox-crash");
    let bus = nats_bus().await;
    let seen: Recorder<String> = Recorder::default();
    let s = seen.clone();
    bus.subscribe_envelope(&topic, &unique("readers"), move |e: Envelope| {
        let s = s.clone();
        async move {
            s.push(e.event_id);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.expect("raw client"));

    // The events, written in transactions of 50 while the relay is killed and restarted.
    let mut events: Vec<Envelope> = Vec::new();
    for v in 1..=VERSIONS {
        for a in 0..AGGREGATES {
            events.push(env(&format!("agg-{a}"), v));
        }
    }
    let total = events.len();
    let by_id: HashMap<String, Envelope> = events
        .iter()
        .map(|e| (e.event_id.clone(), e.clone()))
        .collect();
    let writing = async {
        for chunk in events.chunks(50) {
            db.write(&topic, chunk, true).await;
        }
    };
    let killing = async {
        let mut checked: HashSet<String> = HashSet::new();
        for kill in 0..KILLS {
            let mut child = spawn_relay(&url);
            // Let it publish a few hundred more, then kill it wherever it is.
            let target = seen.snapshot().len() + 300;
            seen.wait_until("the relay's progress", |s| s.len() >= target.min(total))
                .await;
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            let now_marked: Vec<String> = marked(&db)
                .await
                .into_iter()
                .filter(|id| !checked.contains(id))
                .collect();
            all_stored(&js, &topic, &now_marked, &by_id).await;
            // Events the consumer had when the relay died but the table did not mark: the
            // kill fell between a broker ACK and its mark (they are published again).
            let at_consumer = seen.snapshot().into_iter().collect::<HashSet<_>>().len();
            eprintln!(
                "[outbox-crash] kill {}: {} more rows marked, all stored; {} at the consumer, {} marked",
                kill + 1,
                now_marked.len(),
                at_consumer,
                checked.len() + now_marked.len()
            );
            checked.extend(now_marked);
        }
    };
    tokio::join!(writing, killing);
    // A last relay finishes the work.
    let mut last = spawn_relay(&url);
    let outbox = db.outbox();
    let finished = async {
        loop {
            let s = outbox.stats().await.expect("stats");
            if s.published as usize >= total {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let stats = tokio::time::timeout(kit_timeout(), finished)
        .await
        .expect("every row published");
    let got = seen
        .wait_until("every event at the consumer", |s| {
            s.iter().collect::<HashSet<_>>().len() >= total
        })
        .await;
    let _ = last.kill();
    let _ = last.wait();
    let distinct: HashSet<&String> = got.iter().collect();
    eprintln!(
        "[outbox-crash] {total} events, {KILLS} kills: {stats:?}; consumer saw {} deliveries of {} events",
        got.len(),
        distinct.len()
    );
    assert_eq!(distinct.len(), total);
    assert!(distinct.iter().all(|id| by_id.contains_key(*id)));
    assert_eq!((stats.pending, stats.dead), (0, 0));
    // NATS dropped every republished copy (same Nats-Msg-Id within the duplicate window).
    assert_eq!(
        got.len(),
        total,
        "the consumer saw a copy the broker should have dropped"
    );
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_relay_killed_mid_batch_loses_nothing() {
    let db = Db::sqlite().await;
    let Db::Sqlite(_, path) = &db else {
        unreachable!("a SQLite harness");
    };
    let url = format!("sqlite://{}", path.display());
    crash_run(db, url).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_relay_killed_mid_batch_loses_nothing() {
    let url = common::fresh_postgres_database().await;
    let db = Db::Postgres(common::postgres_pool(&url).await);
    crash_run(db, url).await;
}
