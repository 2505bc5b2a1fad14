//! Reads a topic back without the bus: the record batches' compression codec through a
//! minimal Kafka Fetch (v4) request over a plain TCP socket, and the records themselves
//! through a plain rdkafka consumer (no group).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use eventbus_core::testkit::StoredMessage;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers as _;
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

const FETCH: i16 = 1;
const FETCH_VERSION: i16 = 4;

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as i16).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        assert!(self.0.len() >= n, "truncated fetch response");
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    fn i8(&mut self) -> i8 {
        self.take(1)[0] as i8
    }
    fn i16(&mut self) -> i16 {
        i16::from_be_bytes(self.take(2).try_into().expect("2 bytes"))
    }
    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take(4).try_into().expect("4 bytes"))
    }
    fn i64(&mut self) -> i64 {
        i64::from_be_bytes(self.take(8).try_into().expect("8 bytes"))
    }
    fn string(&mut self) -> String {
        let n = self.i16();
        String::from_utf8_lossy(self.take(n.max(0) as usize)).into_owned()
    }
}

/// The compression codec of every record batch in `topic` (partitions `0..partitions`, from
/// offset 0), as the broker serves it: 0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd.
pub fn batch_codecs(broker: &str, topic: &str, partitions: i32) -> Vec<i8> {
    let mut body = Vec::new();
    body.extend_from_slice(&FETCH.to_be_bytes());
    body.extend_from_slice(&FETCH_VERSION.to_be_bytes());
    body.extend_from_slice(&1i32.to_be_bytes()); // correlation id
    put_str(&mut body, "eventbus-raw-reader");
    body.extend_from_slice(&(-1i32).to_be_bytes()); // replica id: a consumer
    body.extend_from_slice(&500i32.to_be_bytes()); // max wait ms
    body.extend_from_slice(&1i32.to_be_bytes()); // min bytes
    body.extend_from_slice(&(4i32 << 20).to_be_bytes()); // max bytes
    body.push(0); // isolation: read uncommitted
    body.extend_from_slice(&1i32.to_be_bytes()); // one topic
    put_str(&mut body, topic);
    body.extend_from_slice(&partitions.to_be_bytes());
    for p in 0..partitions {
        body.extend_from_slice(&p.to_be_bytes());
        body.extend_from_slice(&0i64.to_be_bytes()); // fetch offset
        body.extend_from_slice(&(1i32 << 20).to_be_bytes()); // partition max bytes
    }
    let mut s = TcpStream::connect(broker).expect("connect to the broker");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s.write_all(&(body.len() as i32).to_be_bytes())
        .and_then(|_| s.write_all(&body))
        .expect("send fetch");
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("response size");
    let mut resp = vec![0u8; i32::from_be_bytes(len).max(0) as usize];
    s.read_exact(&mut resp).expect("response");
    let mut c = Cursor(&resp);
    assert_eq!(c.i32(), 1, "correlation id");
    let _throttle = c.i32();
    let mut codecs = Vec::new();
    for _ in 0..c.i32() {
        let _name = c.string();
        for _ in 0..c.i32() {
            let _partition = c.i32();
            let error = c.i16();
            assert_eq!(error, 0, "fetch error code");
            let _high = c.i64();
            let _last_stable = c.i64();
            let aborted = c.i32();
            if aborted > 0 {
                c.take(aborted as usize * 16);
            }
            let size = c.i32();
            if size <= 0 {
                continue;
            }
            let mut records = Cursor(c.take(size as usize));
            // Record batches: base offset, length, then the batch (a partial last one is
            // allowed by the protocol and skipped).
            while records.0.len() >= 12 {
                let _base = records.i64();
                let len = records.i32() as usize;
                if records.0.len() < len {
                    break;
                }
                let mut batch = Cursor(records.take(len));
                let _epoch = batch.i32();
                let magic = batch.i8();
                assert_eq!(magic, 2, "record batch format v2");
                let _crc = batch.i32();
                codecs.push((batch.i16() & 0x7) as i8);
            }
        }
    }
    codecs
}

/// The first `count` records of `topic` through a plain consumer assigned to every partition.
pub fn records(broker: &str, topic: &str, partitions: i32, count: usize) -> Vec<StoredMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", "eventbus-raw-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("raw consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    // At most this many polls of 200 ms: a hang guard, not a speed check.
    const MAX_POLLS: usize = 150;
    for _ in 0..MAX_POLLS {
        if out.len() >= count {
            break;
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.expect("raw record");
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(StoredMessage {
            payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
            headers,
            batch_compression: None,
        });
    }
    assert!(
        out.len() >= count,
        "{} of {count} records read back",
        out.len()
    );
    out
}

/// Records with their batches' codec name; all batches must agree.
pub fn stored(broker: &str, topic: &str, partitions: i32, count: usize) -> Vec<StoredMessage> {
    let mut records = records(broker, topic, partitions, count);
    let codecs = batch_codecs(broker, topic, partitions);
    assert!(!codecs.is_empty(), "no record batch fetched");
    assert!(
        codecs.iter().all(|c| *c == codecs[0]),
        "mixed codecs {codecs:?}"
    );
    let name = match codecs[0] {
        0 => None,
        1 => Some("gzip"),
        2 => Some("snappy"),
        3 => Some("lz4"),
        4 => Some("zstd"),
        other => panic!("unknown codec {other}"),
    };
    for r in &mut records {
        r.batch_compression = name.map(str::to_owned);
    }
    records
}
