//! Scale-out with real processes: instances of one consumer group run as child processes of
//! this test; one is killed with SIGKILL mid-run and another joins. Nothing is lost, each
//! aggregate's events are first handled in order, no aggregate is handled by two instances at
//! overlapping times, and the dead instance's partitions move to the live ones.
//!
//! Every handling is reported to this process twice over core NATS request-reply, at its
//! start and at its end; the child waits for each reply, so the records form one order
//! consistent with real time and overlaps are seen exactly. Needs nats-server (see
//! `common::nats_url`).

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{audit_loop, nats_url};
use eventbus_core::testkit::{hang_guard, kit_config, kit_timeout, unique, GroupLedger};
use eventbus_core::{Bus, Envelope, HandlerError};
use eventbus_nats::{GroupSettings, NatsConfig, NatsTransport};
use serde_json::json;
use tokio::sync::mpsc;

const CHILD_ENV: &str = "EVENTBUS_SCALE_OUT_CHILD";
const AGGREGATES: usize = 200;
const ROUNDS: i64 = 100;

/// Short lease timings, so the test does not wait the defaults' 10 s for a dead instance.
fn group_settings() -> GroupSettings {
    GroupSettings {
        lease_ttl: Duration::from_secs(3),
        heartbeat: Duration::from_millis(500),
        instance_id: None,
    }
}

fn config(instance: Option<String>) -> NatsConfig {
    let mut c = NatsConfig::new(nats_url());
    c.group = GroupSettings {
        instance_id: instance,
        ..group_settings()
    };
    c
}

/// One instance of the group, in this process when run as a child (the parent sets
/// `CHILD_ENV` to `topic group instance audit-subject`). Runs until its stdin closes.
#[test]
#[ignore = "an instance of the scale-out test, started by it as a child process"]
fn scale_out_child_instance() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<String> = args.split(' ').map(str::to_string).collect();
    let [topic, group, instance, audit] = parts.as_slice() else {
        panic!("{CHILD_ENV}={args:?}: want `topic group instance audit-subject`");
    };
    eventbus_core::testkit::exit_when_stdin_closes();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = async_nats::connect(nats_url()).await.expect("audit client");
        let bus = Bus::new(
            NatsTransport::connect(config(Some(format!("child-{instance}"))))
                .await
                .expect("connect"),
            kit_config(),
        )
        .expect("bus");
        let (instance, audit) = (instance.clone(), audit.clone());
        bus.subscribe_envelope(topic, group, move |e: Envelope| {
            let (client, audit, instance) = (client.clone(), audit.clone(), instance.clone());
            async move {
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
                tokio::task::yield_now().await;
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

fn spawn_instance(topic: &str, group: &str, instance: u8, audit: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "scale_out_child_instance",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, format!("{topic} {group} {instance} {audit}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start a child instance")
}

/// The instances holding the group's partition leases, read from its bucket.
async fn lease_holders(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    group: &str,
    partitions: u16,
) -> Vec<Option<String>> {
    let kv = js.get_key_value(bucket).await.expect("group bucket");
    let mut holders = Vec::new();
    for p in 0..partitions {
        let v = kv
            .get(format!("{group}.l.{p}"))
            .await
            .expect("read a lease");
        // The value is "<instance> <nonce of its subscription>".
        holders.push(v.map(|b| {
            let value = String::from_utf8_lossy(&b);
            value.split(' ').next().unwrap_or_default().to_string()
        }));
    }
    holders
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_killed_mid_run_and_one_joining_lose_nothing_and_keep_order() {
    let topic = unique("scale-kill");
    let group = unique("svc");
    let audit = format!("audit.{topic}");
    let client = async_nats::connect(nats_url()).await.expect("audit client");
    let js = async_nats::jetstream::new(client.clone());
    let reports = client.subscribe(audit.clone()).await.expect("subscribe");
    js.query_account().await.expect("a round trip after SUB");
    let ledger = Arc::new(GroupLedger::default());
    let (forget, forget_rx) = mpsc::channel(4);
    let auditor = tokio::spawn(audit_loop(
        reports,
        client.clone(),
        ledger.clone(),
        forget_rx,
    ));

    let publisher = Bus::new(
        NatsTransport::connect(config(None)).await.expect("connect"),
        kit_config(),
    )
    .expect("bus");
    let partitions = publisher
        .transport()
        .provision_topic(&topic)
        .await
        .expect("provision");
    let bucket = format!("{}_groups", publisher.transport().stream_name(&topic));
    let mut children = [
        Some(spawn_instance(&topic, &group, 0, &audit)),
        Some(spawn_instance(&topic, &group, 1, &audit)),
        None,
    ];

    let mut published = 0usize;
    let mut round = 0i64;
    let mut publish_round = async |round: i64| {
        for a in 0..AGGREGATES {
            let e = Envelope::new(format!("agg-{a}"), "t", round, json!({"round": round}));
            publisher
                .publish_envelope(&topic, &e)
                .await
                .expect("publish");
        }
        published += AGGREGATES;
        published
    };
    // Both first instances at work.
    hang_guard("the second instance to get work", async {
        loop {
            round += 1;
            let target = publish_round(round).await;
            ledger.wait_until("a round", |c| c.handled >= target).await;
            if ledger.counts().instances == 2 {
                break;
            }
        }
    })
    .await;
    // A third of the rounds, not waited for, then the kill: instance 0 dies with work in
    // flight and prefetched.
    while round < ROUNDS / 3 {
        round += 1;
        publish_round(round).await;
    }
    let mut killed = children[0].take().expect("instance 0");
    killed.kill().expect("SIGKILL");
    let killed_at = tokio::time::Instant::now();
    killed.wait().expect("reap");
    forget.send(0).await.expect("auditor");
    children[2] = Some(spawn_instance(&topic, &group, 2, &audit));
    // Partitions move: every lease held, by the live instances only; watched from the kill on
    // while events keep coming.
    let live: HashSet<String> = ["child-1", "child-2"].map(String::from).into();
    let moved = async {
        loop {
            let holders = lease_holders(&js, &bucket, &group, partitions).await;
            if holders
                .iter()
                .all(|h| h.as_ref().is_some_and(|h| live.contains(h)))
            {
                return (holders, killed_at.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Rounds one at a time until the joining instance has work (the first waits for the dead
    // instance's leases to lapse), then the rest at full speed.
    let publishing = async {
        hang_guard("the joining instance to get work", async {
            while !ledger
                .counts()
                .per_instance
                .iter()
                .any(|(i, n)| *i == 2 && *n > 0)
            {
                round += 1;
                let target = publish_round(round).await;
                ledger.wait_until("a round", |c| c.handled >= target).await;
            }
        })
        .await;
        while round < ROUNDS {
            round += 1;
            publish_round(round).await;
        }
    };
    let (moved, ()) = tokio::join!(tokio::time::timeout(kit_timeout(), moved), publishing);
    let (holders, moved_after) = moved.expect("the dead instance's partitions never moved");
    let total = published;
    ledger
        .wait_until("every event handled", |c| c.handled >= total)
        .await;
    let c = ledger.counts();
    eprintln!(
        "[scale-out] {total} events, lease {:?}, heartbeat {:?}: all {partitions} partitions held by live instances {moved_after:?} after the kill ({holders:?}); {c:?}",
        group_settings().lease_ttl,
        group_settings().heartbeat
    );
    for child in children.iter_mut().flatten() {
        let _ = child.kill();
        let _ = child.wait();
    }
    auditor.abort();
    assert_eq!(c.handled, total, "events lost");
    assert_eq!(
        c.overlaps, 0,
        "an aggregate was handled by two instances at once"
    );
    assert_eq!(c.order_violations, 0, "per-aggregate order broken");
    publisher.close().await.expect("close");
}
