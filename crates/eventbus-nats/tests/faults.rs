//! The fault suite on NATS: 100,000 envelopes over 1,000 aggregates through a consumer group
//! of child processes while (a) the nats-server holding the stream is killed with SIGKILL and
//! restarted on its store, (b) a consuming process is killed with SIGKILL and another started,
//! (c) handlers fail at random 5 % of the time and panic 0.1 %, (d) one consumer is slow.
//! Asserted: no `event_id` lost, per-aggregate order of first handlings intact, no aggregate
//! handled by two instances at once, duplicates are events already handled and bounded by the
//! killed windows, and no task or memory growth once the faults stopped. The figures are
//! printed (docs/reliability.md quotes them).
//!
//! The stream lives on a nats-server of this test's own (it is killed); the children report
//! each handling over core NATS request-reply to the shared server (`EVENTBUS_NATS_URL`),
//! which the kill does not touch.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{audit_loop, nats_url, OwnServer};
use eventbus_core::testkit::{
    hang_guard, injected_fault, kit_config, silence_injected_panics, tasks_and_rss, unique,
    GroupLedger, InjectedFault, INJECTED_PANIC,
};
use eventbus_core::{Bus, ConnectionState, Envelope, HandlerError};
use eventbus_nats::{GroupSettings, NatsConfig, NatsTransport};
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

const CHILD_ENV: &str = "EVENTBUS_FAULT_CHILD";
const AGGREGATES: usize = 1_000;
const ROUNDS: i64 = 100;
/// Unacknowledged messages a partition consumer hands out at most: bounds what a killed
/// instance (or a killed server) leaves to be redelivered.
const MAX_ACK_PENDING: i64 = 500;
/// After the faults: more traffic, to see that tasks and memory stay where they were.
const AFTER_ROUNDS: i64 = 10;

fn data_config(url: &str, instance: Option<String>) -> NatsConfig {
    let mut c = NatsConfig::new(url).with_ack_wait(Duration::from_secs(5));
    c.group = GroupSettings {
        lease_ttl: Duration::from_secs(3),
        heartbeat: Duration::from_millis(500),
        instance_id: instance,
    };
    c.consumer.max_ack_pending = MAX_ACK_PENDING;
    c.publish_ack_timeout = Duration::from_secs(2);
    c.publish_retries = 60;
    c
}

/// One consuming instance, run as a child (`CHILD_ENV` = `data-url topic group instance
/// audit-subject slow`). Its handler fails the first time for 5 % of the events and panics
/// the first time for 0.1 % (a retry in place then succeeds); a slow instance takes 2 ms more
/// per event. Answers `ctl.<audit>.<instance>` with its task count and RSS.
#[test]
#[ignore = "an instance of the fault suite, started by it as a child process"]
fn fault_child_instance() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<String> = args.split(' ').map(str::to_string).collect();
    let [url, topic, group, instance, audit, slow] = parts.as_slice() else {
        panic!("{CHILD_ENV}={args:?}");
    };
    let slow = slow == "1";
    eventbus_core::testkit::exit_when_stdin_closes();
    silence_injected_panics();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = async_nats::connect(nats_url()).await.expect("audit client");
        let mut ctl = client
            .subscribe(format!("ctl.{audit}.{instance}"))
            .await
            .expect("control");
        let ctl_client = client.clone();
        tokio::spawn(async move {
            while let Some(m) = ctl.next().await {
                let (tasks, rss) = tasks_and_rss();
                if let Some(reply) = m.reply {
                    let _ = ctl_client
                        .publish(reply, Bytes::from(format!("{tasks} {rss}")))
                        .await;
                }
            }
        });
        let bus = Bus::new(
            NatsTransport::connect(data_config(url, Some(format!("child-{instance}"))))
                .await
                .expect("connect"),
            kit_config(),
        )
        .expect("bus");
        let failed_once = Arc::new(Mutex::new(HashSet::<String>::new()));
        let (instance, audit) = (instance.clone(), audit.clone());
        bus.subscribe_envelope(topic, group, move |e: Envelope| {
            let (client, audit, instance) = (client.clone(), audit.clone(), instance.clone());
            let failed_once = failed_once.clone();
            async move {
                let first_try = failed_once
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(e.event_id.clone());
                match injected_fault(&e.event_id).filter(|_| first_try) {
                    Some(InjectedFault::Panic) => panic!("{INJECTED_PANIC} for {}", e.event_id),
                    Some(InjectedFault::Error) => {
                        return Err(HandlerError::retryable("injected failure"))
                    }
                    None => {}
                }
                let record = |what: &str| {
                    Bytes::from(format!(
                        "{what} {instance} {} {} {}",
                        e.event_id, e.aggregate_id, e.event_version
                    ))
                };
                let failed = |e: async_nats::RequestError| HandlerError::retryable(e.to_string());
                client
                    .request(audit.clone(), record("begin"))
                    .await
                    .map_err(failed)?;
                if slow {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                } else {
                    tokio::task::yield_now().await;
                }
                client
                    .request(audit.clone(), record("end"))
                    .await
                    .map_err(failed)?;
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .expect("subscribe");
        std::future::pending::<()>().await;
    });
}

fn spawn_instance(
    url: &str,
    topic: &str,
    group: &str,
    instance: u8,
    audit: &str,
    slow: bool,
) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "fault_child_instance",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(
            CHILD_ENV,
            format!(
                "{url} {topic} {group} {instance} {audit} {}",
                u8::from(slow)
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start a child instance")
}

async fn child_tasks_and_rss(
    client: &async_nats::Client,
    audit: &str,
    instance: u8,
) -> (usize, u64) {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(format!("ctl.{audit}.{instance}"), Bytes::new()),
    )
    .await
    .expect("the child answers")
    .expect("control request");
    let text = String::from_utf8_lossy(&reply.payload).to_string();
    let mut f = text.split(' ').map(|v| v.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0) as usize, f.next().unwrap_or(0))
}

/// Waits until `target` distinct events are handled; fails only if no progress is made for a
/// whole kit timeout (the faults make the total time unknowable, not the progress).
async fn wait_handled(ledger: &GroupLedger, target: usize) {
    while ledger.counts().handled < target {
        let next = (ledger.counts().handled + 2_000).min(target);
        ledger
            .wait_until("progress of the handled events", |c| c.handled >= next)
            .await;
    }
}

/// How long after `from` the handled count first grows past `before`.
async fn resumed_after(ledger: &GroupLedger, before: usize, from: Instant) -> Duration {
    wait_handled(ledger, before + 1).await;
    from.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_envelopes_through_broker_kill_consumer_kill_handler_faults_and_a_slow_consumer(
) {
    let store = std::env::temp_dir().join(unique("eventbus-faults"));
    let mut server = OwnServer::start(&store);
    let url = server.url();
    let topic = unique("faults");
    let group = unique("svc");
    let audit = format!("audit.{topic}");
    let client = async_nats::connect(nats_url()).await.expect("audit client");
    let reports = client.subscribe(audit.clone()).await.expect("subscribe");
    async_nats::jetstream::new(client.clone())
        .query_account()
        .await
        .expect("a round trip after SUB");
    let ledger = Arc::new(GroupLedger::default());
    let (forget, forget_rx) = mpsc::channel(4);
    let auditor = tokio::spawn(audit_loop(
        reports,
        client.clone(),
        ledger.clone(),
        forget_rx,
    ));

    let publisher = Bus::new(
        NatsTransport::connect(data_config(&url, None))
            .await
            .expect("connect"),
        kit_config(),
    )
    .expect("bus");
    let partitions = publisher
        .transport()
        .provision_topic(&topic)
        .await
        .expect("provision");
    // Instance 0 and 2 are of normal speed, 1 is slow; all three have faulty handlers.
    let mut children = [
        Some(spawn_instance(&url, &topic, &group, 0, &audit, false)),
        Some(spawn_instance(&url, &topic, &group, 1, &audit, true)),
        None,
    ];
    let started = Instant::now();
    let published = std::cell::Cell::new(0usize);
    let mut round = 0i64;
    let publish_round = async |round: i64| {
        for a in 0..AGGREGATES {
            let e = Envelope::new(format!("agg-{a}"), "t", round, json!({"round": round}));
            publisher
                .publish_envelope(&topic, &e)
                .await
                .expect("publish accepted");
        }
        published.set(published.get() + AGGREGATES);
        published.get()
    };
    // Both instances at work before any fault.
    hang_guard("both instances to get work", async {
        loop {
            round += 1;
            let target = publish_round(round).await;
            wait_handled(&ledger, target).await;
            if ledger.counts().instances == 2 {
                break;
            }
        }
    })
    .await;

    // (b) A third in: the normal-speed consumer is killed with work in flight.
    while round < ROUNDS / 3 {
        round += 1;
        publish_round(round).await;
    }
    let mut killed = children[0].take().expect("instance 0");
    killed.kill().expect("SIGKILL the consumer");
    let consumer_killed_at = Instant::now();
    killed.wait().expect("reap");
    forget.send(0).await.expect("auditor");
    children[2] = Some(spawn_instance(&url, &topic, &group, 2, &audit, false));
    let handled_at_consumer_kill = ledger.counts().handled;

    // (a) Two thirds in: the server is killed with SIGKILL and restarted on its store.
    while round < 2 * ROUNDS / 3 {
        round += 1;
        publish_round(round).await;
    }
    ledger
        .wait_until("the new instance to get work", |c| {
            c.per_instance.iter().any(|(i, n)| *i == 2 && *n > 0)
        })
        .await;
    let joined_after = consumer_killed_at.elapsed();
    server.kill();
    let down_for = Duration::from_secs(1);
    tokio::time::sleep(down_for).await;
    let handled_at_restart = ledger.counts().handled;
    server.restart();
    let restarted_at = Instant::now();
    let rest = async {
        while round < ROUNDS {
            round += 1;
            publish_round(round).await;
        }
    };
    // Recovery: the publisher connected again, and more handled than the children could
    // have had buffered before the kill (so fetched from the restarted server).
    let buffered = 2 * partitions as usize * MAX_ACK_PENDING as usize;
    let reconnected = async {
        hang_guard("the publisher to reconnect", async {
            while publisher.health().state != ConnectionState::Connected {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        restarted_at.elapsed()
    };
    let (reconnected, resumed, ()) = tokio::join!(
        reconnected,
        resumed_after(&ledger, handled_at_restart + buffered, restarted_at),
        rest
    );
    let total = published.get();
    wait_handled(&ledger, total).await;
    publisher.flush().await.expect("flush");
    let faulted = ledger.counts();
    let m = publisher.metrics();
    let elapsed = started.elapsed();

    // After the faults: the same traffic again; tasks and memory stay where they were.
    let before: Vec<(usize, u64)> = vec![
        child_tasks_and_rss(&client, &audit, 1).await,
        child_tasks_and_rss(&client, &audit, 2).await,
    ];
    for r in 0..AFTER_ROUNDS {
        publish_round(ROUNDS + 1 + r).await;
    }
    let total_after = published.get();
    wait_handled(&ledger, total_after).await;
    let after: Vec<(usize, u64)> = vec![
        child_tasks_and_rss(&client, &audit, 1).await,
        child_tasks_and_rss(&client, &audit, 2).await,
    ];
    let c = ledger.counts();
    eprintln!(
        "[faults nats] {total} envelopes over {AGGREGATES} aggregates in {elapsed:?} ({partitions} partitions, max_ack_pending {MAX_ACK_PENDING}); \
         publish: {} acked, {} failed, {} stored-duplicate acks; \
         consumer SIGKILL at {handled_at_consumer_kill} handled, the new instance handled {joined_after:?} after; \
         server SIGKILL with {handled_at_restart} handled, down {down_for:?}, the publisher connected {reconnected:?} and {buffered} more handled {resumed:?} after the restart; \
         handled {} distinct, duplicates {}, overlaps {}, order violations {}; per instance {:?}; \
         then {} more: tasks/RSS KiB of instances 1, 2 {before:?} -> {after:?}",
        m.publish_acked, m.publish_failed, m.publish_duplicates, faulted.handled, faulted.duplicates, faulted.overlaps,
        faulted.order_violations, c.per_instance, total_after - total,
    );
    for child in children.iter_mut().flatten() {
        let _ = child.kill();
        let _ = child.wait();
    }
    auditor.abort();
    publisher.close().await.expect("close");
    drop(server);
    let _ = std::fs::remove_dir_all(&store);

    assert_eq!(m.publish_failed, 0, "publishes reported failed");
    assert_eq!(c.handled, total_after, "events lost");
    assert_eq!(
        c.overlaps, 0,
        "an aggregate was handled by two instances at once"
    );
    assert_eq!(c.order_violations, 0, "per-aggregate order broken");
    // A duplicate is by construction an event already handled (the ledger keys them by
    // event_id); at most what the killed consumer and the killed server left unacknowledged:
    // MAX_ACK_PENDING per partition consumer, each fault.
    let window = 2 * partitions as usize * MAX_ACK_PENDING as usize;
    assert!(
        c.duplicates <= window,
        "{} duplicates, more than the two faults' windows ({window})",
        c.duplicates
    );
    assert_eq!(
        c.duplicates, faulted.duplicates,
        "duplicates after the faults stopped"
    );
    for ((t0, r0), (t1, r1)) in before.iter().zip(&after) {
        assert!(t1 <= t0, "tasks grew after the faults: {t0} -> {t1}");
        assert!(
            *r1 <= r0 + 16 * 1024,
            "memory grew after the faults: {r0} KiB -> {r1} KiB"
        );
    }
}
