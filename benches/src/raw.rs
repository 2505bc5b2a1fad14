//! Raw client baselines: the same load through async-nats and rdkafka directly, with the same
//! application work (envelope JSON out, envelope JSON parsed in). They check nothing about
//! order, only delivery counts.

use std::future::IntoFuture;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use eventbus::Envelope;
use futures_util::{FutureExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message as _};

use crate::targets::publishers;
use crate::targets::{
    collect_acks, result, watch, Knobs, Pacer, Peaks, Plan, RunResult, SendClock, Target,
};
use crate::workload::{Checker, Shape};

const WARMUP_DEADLINE: Duration = Duration::from_secs(60);

fn ok<T, E>(r: Result<T, E>) -> bool {
    r.is_ok()
}

/// A Kafka delivery counts only if the report itself says delivered.
fn delivered<C>(r: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, C>) -> bool {
    matches!(r, Ok(Ok(_)))
}

async fn wait_warm(warm: &AtomicUsize, topics: usize, what: &str) -> Result<(), String> {
    let start = Instant::now();
    while warm.load(Ordering::Relaxed) < topics {
        if start.elapsed() > WARMUP_DEADLINE {
            return Err(format!("{what}: warm-up messages never arrived"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn warmup() -> Vec<u8> {
    Envelope::new("warmup", "warmup", 1, serde_json::Value::Null)
        .to_json()
        .unwrap_or_default()
}

pub(crate) async fn delete_nats_streams(url: &str, names: impl Iterator<Item = String>) {
    if let Ok(client) = async_nats::connect(url).await {
        let js = jetstream::new(client);
        for n in names {
            let _ = js.delete_stream(n).await;
        }
    }
}

/// async-nats: JetStream publish with the same in-flight window, one pull consumer per topic.
pub async fn nats(
    target: Target,
    shape: &Shape,
    repeat: usize,
    k: &Knobs,
) -> Result<RunResult, String> {
    let url = k
        .nats_url
        .clone()
        .ok_or("no NATS address (--nats-url or EVENTBUS_NATS_URL)")?;
    let plan = Arc::new(Plan::new(shape));
    let n = plan.messages();
    let clock = Arc::new(SendClock::new(n));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut peaks = Peaks::reset(k);
    let client = async_nats::connect(&url)
        .await
        .map_err(|e| format!("cannot connect to NATS at {url}: {e}"))?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(k.window)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let storage = if target == Target::RawNatsMem {
        stream::StorageType::Memory
    } else {
        stream::StorageType::File
    };
    let checker = Arc::new(Checker::new(
        plan.shape.aggregates,
        plan.shape.versions,
        false,
    ));
    let warm = Arc::new(AtomicUsize::new(0));
    let mut consumers = Vec::new();
    let stream_names: Vec<String> = (0..plan.topics())
        .map(|t| format!("RAW_{}", plan.topic(t)))
        .collect();
    for (t, name) in stream_names.iter().enumerate() {
        let topic = plan.topic(t);
        let s = js
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![topic.clone()],
                storage,
                max_bytes: 1 << 30,
                max_messages: 1_000_000,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("raw stream: {e}"))?;
        let consumer: jetstream::consumer::PullConsumer = s
            .get_or_create_consumer(
                "raw",
                pull::Config {
                    durable_name: Some("raw".into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    max_ack_pending: 10_000,
                    filter_subject: topic,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("raw consumer: {e}"))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(k.batch)
            .messages()
            .await
            .map_err(|e| format!("raw pull: {e}"))?;
        let (c, w) = (checker.clone(), warm.clone());
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(m)) = messages.next().await {
                if let Ok(e) = Envelope::from_json(&m.payload) {
                    if c.check(&e).is_err() {
                        w.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = m.ack().await;
            }
        }));
    }
    for t in 0..plan.topics() {
        let ack = js
            .publish(plan.topic(t), warmup().into())
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map_err(|e| e.to_string())?;
    }
    wait_warm(&warm, plan.topics(), target.name()).await?;

    let (tx, rx) = tokio::sync::mpsc::channel(k.window);
    let collector = tokio::spawn(collect_acks(rx, clock.clone(), acked.clone()));
    let start = Instant::now();
    let publishers = publishers(&plan, k);
    let mut tasks = Vec::new();
    let pacer = Pacer::new(k.rate, publishers);
    for p in 0..publishers {
        let (js, plan, clock, k, tx) = (
            js.clone(),
            plan.clone(),
            clock.clone(),
            k.clone(),
            tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            for v in 1..=plan.shape.versions {
                for agg in (p..plan.shape.aggregates).step_by(publishers) {
                    let due = pacer.due(p, i).await;
                    i += 1;
                    let e = Pacer::stamp(due, plan.event(&k, agg, v));
                    let mut headers = async_nats::HeaderMap::new();
                    for (name, value) in e.headers().iter() {
                        if let (Ok(n), Ok(v)) = (
                            async_nats::HeaderName::from_str(name),
                            async_nats::HeaderValue::from_str(value),
                        ) {
                            headers.insert(n, v);
                        }
                    }
                    let body = e.to_json().map_err(|e| e.to_string())?;
                    let msg = jetstream::message::PublishMessage::build()
                        .payload(body.into())
                        .headers(headers)
                        .message_id(&e.event_id);
                    let seq = plan.seq(agg, v);
                    clock.sent(seq, due.map(|(at, _)| at));
                    let ack = js
                        .send_publish(plan.topic(plan.topic_of(agg)), msg)
                        .await
                        .map_err(|e| e.to_string())?;
                    let fut = ack.into_future().map(ok as fn(_) -> bool);
                    if tx.send((seq, fut)).await.is_err() {
                        return Err("ack collector gone".to_string());
                    }
                }
            }
            Ok::<(), String>(())
        }));
    }
    drop(tx);
    let (send, e2e) = watch(&checker, &clock, &acked, n, start, &mut peaks).await;
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let _ = collector.await;
    let r = result(
        target, &plan, repeat, send, e2e, &clock, &checker, &mut peaks,
    );
    for c in consumers {
        c.abort();
    }
    delete_nats_streams(&url, stream_names.into_iter()).await;
    Ok(r)
}

/// rdkafka: an idempotent LZ4 producer as the bus configures it, one consumer per topic.
pub async fn kafka(shape: &Shape, repeat: usize, k: &Knobs) -> Result<RunResult, String> {
    let brokers = k
        .kafka_brokers
        .clone()
        .ok_or("no Kafka address (--kafka-brokers or EVENTBUS_KAFKA_BROKERS)")?;
    let plan = Arc::new(Plan::new(shape));
    let n = plan.messages();
    let clock = Arc::new(SendClock::new(n));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut peaks = Peaks::reset(k);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .create()
        .map_err(|e| e.to_string())?;
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .map_err(|e| e.to_string())?;
    let topics: Vec<String> = (0..plan.topics())
        .map(|t| format!("raw-{}", plan.topic(t)))
        .collect();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, plan.shape.partitions, TopicReplication::Fixed(1)))
        .collect();
    admin
        .create_topics(new.iter(), &AdminOptions::new())
        .await
        .map_err(|e| format!("cannot create topics on Kafka at {brokers}: {e}"))?;
    let checker = Arc::new(Checker::new(
        plan.shape.aggregates,
        plan.shape.versions,
        false,
    ));
    let warm = Arc::new(AtomicUsize::new(0));
    let mut consumers = Vec::new();
    for topic in &topics {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("raw-{}", plan.run_id))
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set(
                "fetch.wait.max.ms",
                k.kafka_fetch_wait_ms.max(1).to_string(),
            )
            .create()
            .map_err(|e| e.to_string())?;
        consumer.subscribe(&[topic]).map_err(|e| e.to_string())?;
        let (c, w) = (checker.clone(), warm.clone());
        consumers.push(tokio::spawn(async move {
            while let Ok(m) = consumer.recv().await {
                if let Ok(e) = Envelope::from_json(m.payload().unwrap_or_default()) {
                    if c.check(&e).is_err() {
                        w.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for topic in &topics {
        let body = warmup();
        let f = producer
            .send_result(FutureRecord::<str, _>::to(topic).payload(&body))
            .map_err(|(e, _)| e.to_string())?;
        let _ = f.await;
    }
    wait_warm(&warm, plan.topics(), "raw-kafka").await?;

    let (tx, rx) = tokio::sync::mpsc::channel(k.window);
    let collector = tokio::spawn(collect_acks(rx, clock.clone(), acked.clone()));
    let start = Instant::now();
    let publishers = publishers(&plan, k);
    let mut tasks = Vec::new();
    let topics = Arc::new(topics);
    let pacer = Pacer::new(k.rate, publishers);
    for p in 0..publishers {
        let (producer, plan, clock, k, tx, topics) = (
            producer.clone(),
            plan.clone(),
            clock.clone(),
            k.clone(),
            tx.clone(),
            topics.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            for v in 1..=plan.shape.versions {
                for agg in (p..plan.shape.aggregates).step_by(publishers) {
                    let due = pacer.due(p, i).await;
                    i += 1;
                    let e = Pacer::stamp(due, plan.event(&k, agg, v));
                    let hdrs = e.headers();
                    let mut headers = OwnedHeaders::new_with_capacity(hdrs.len());
                    for (key, value) in hdrs.iter() {
                        headers = headers.insert(Header {
                            key,
                            value: Some(value.as_bytes()),
                        });
                    }
                    let body = e.to_json().map_err(|e| e.to_string())?;
                    let mut record = FutureRecord::to(&topics[plan.topic_of(agg)])
                        .payload(&body)
                        .key(e.aggregate_id.as_str())
                        .headers(headers);
                    let seq = plan.seq(agg, v);
                    clock.sent(seq, due.map(|(at, _)| at));
                    let fut = loop {
                        match producer.send_result(record) {
                            Ok(f) => break f,
                            Err((_, r)) => {
                                record = r;
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                        }
                    };
                    if tx
                        .send((seq, fut.map(delivered as fn(_) -> bool)))
                        .await
                        .is_err()
                    {
                        return Err("ack collector gone".to_string());
                    }
                }
            }
            Ok::<(), String>(())
        }));
    }
    drop(tx);
    let (send, e2e) = watch(&checker, &clock, &acked, n, start, &mut peaks).await;
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let _ = collector.await;
    let r = result(
        Target::RawKafka,
        &plan,
        repeat,
        send,
        e2e,
        &clock,
        &checker,
        &mut peaks,
    );
    for c in consumers {
        c.abort();
    }
    Ok(r)
}
