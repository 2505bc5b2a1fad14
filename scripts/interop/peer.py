#!/usr/bin/env python3
"""An independent client for the interop tests (crates/eventbus/tests/interop.rs).

    peer.py nats-read  URL STREAM:FILTER COUNT  JSON lines of what JetStream holds
    peer.py nats-write URL SUBJECT FILE         publish the JSON lines of FILE
    peer.py kafka-read BROKERS TOPIC COUNT      JSON lines of what the topic holds
    peer.py kafka-write BROKERS TOPIC FILE      produce the JSON lines of FILE

A line read out is {"subject"|"partition", "key", "headers": {...}, "body": <text>}.
A line written in is {"key", "headers": {...}, "body": <text>} and is sent as it is.
Uses nats-py and confluent-kafka only: nothing of eventbus.
"""
import asyncio
import json
import sys


async def nats_read(url, stream, count):
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=1)
    js = nc.jetstream()
    # An ephemeral ordered consumer over the whole stream, from its first message.
    name, subjects = stream.split(":", 1)
    sub = await js.subscribe(subjects, ordered_consumer=True, stream=name,
                             deliver_policy=nats.js.api.DeliverPolicy.ALL)
    for _ in range(count):
        msg = await sub.next_msg(timeout=30)
        print(json.dumps({
            "subject": msg.subject,
            "headers": dict(msg.headers or {}),
            "body": msg.data.decode("utf-8", "replace"),
        }), flush=True)
    await nc.close()


async def nats_write(url, subject, path):
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=1)
    js = nc.jetstream()
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            ack = await js.publish(subject, m["body"].encode(), headers=m.get("headers") or None,
                                   timeout=10)
            print(json.dumps({"seq": ack.seq, "duplicate": bool(ack.duplicate)}), flush=True)
    await nc.close()


def kafka_read(brokers, topic, count):
    from confluent_kafka import Consumer

    c = Consumer({
        "bootstrap.servers": brokers,
        "group.id": f"interop-peer-{topic}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    c.subscribe([topic])
    got = 0
    idle = 0
    while got < count and idle < 60:
        msg = c.poll(1.0)
        if msg is None:
            idle += 1
            continue
        if msg.error():
            print(json.dumps({"error": str(msg.error())}), file=sys.stderr, flush=True)
            continue
        got += 1
        headers = {k: (v.decode("utf-8", "replace") if v is not None else None)
                   for k, v in (msg.headers() or [])}
        print(json.dumps({
            "partition": msg.partition(),
            "key": msg.key().decode() if msg.key() is not None else None,
            "headers": headers,
            "body": msg.value().decode("utf-8", "replace"),
        }), flush=True)
    c.close()
    if got < count:
        sys.exit(f"read {got} of {count} messages")


def kafka_write(brokers, topic, path):
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
    failures = []

    def report(err, msg):
        if err is not None:
            failures.append(str(err))

    with open(path) as f:
        for line in f:
            m = json.loads(line)
            headers = [(k, v.encode()) for k, v in (m.get("headers") or {}).items()]
            key = m.get("key")
            p.produce(topic, value=m["body"].encode(), key=key.encode() if key else None,
                      headers=headers, on_delivery=report)
    left = p.flush(30)
    if failures or left:
        sys.exit(f"produce failed: {failures} ({left} not delivered)")
    print(json.dumps({"produced": True}), flush=True)


def main():
    cmd, where, name, arg = sys.argv[1:5]
    if cmd == "nats-read":
        asyncio.run(nats_read(where, name, int(arg)))
    elif cmd == "nats-write":
        asyncio.run(nats_write(where, name, arg))
    elif cmd == "kafka-read":
        kafka_read(where, name, int(arg))
    elif cmd == "kafka-write":
        kafka_write(where, name, arg)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
