//! A consumer that is alive but no longer receiving (rdkafka #638, async-nats #860) is found
//! and replaced: health lists it as stalled, `fetch_stalls` counts it, a new consumer takes
//! over and the messages waiting are handled. The stall is made by a transport wrapping the
//! memory backend whose first consumer stops returning messages while they pile up (the
//! broker's lag shows them waiting); what is tested is the bus's fetcher, on every backend the
//! same code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eventbus_core::memory::{MemoryDelivery, MemorySubscription, MemoryTransport};
use eventbus_core::testkit::{hang_guard, kit_config, unique, Recorder};
use eventbus_core::{
    Bus, Capabilities, Envelope, Health, Lag, OutgoingMessage, StalledSubscription, Subscription,
    SubscriptionSpec, Transport, TransportError,
};
use serde_json::json;
use tokio::sync::Semaphore;

/// The memory backend, except that its first consumer goes silent, and a replacement
/// consumer waits for `replace` to let it through.
struct Stalling {
    inner: MemoryTransport,
    stall_next: AtomicBool,
    replace: Arc<Semaphore>,
}

struct StallingSubscription {
    inner: MemorySubscription,
    silent: bool,
}

impl Transport for Stalling {
    type Ack = <MemoryTransport as Transport>::Ack;
    type Subscription = StallingSubscription;

    fn backend(&self) -> &'static str {
        "stalling-memory"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn send(&self, message: OutgoingMessage) -> Result<Self::Ack, TransportError> {
        self.inner.send(message).await
    }

    async fn subscribe(
        &self,
        spec: SubscriptionSpec,
    ) -> Result<StallingSubscription, TransportError> {
        let silent = self.stall_next.swap(false, Ordering::SeqCst);
        if !silent {
            let _permit = self
                .replace
                .acquire()
                .await
                .map_err(|_| TransportError::Closed)?;
        }
        Ok(StallingSubscription {
            inner: self.inner.subscribe(spec).await?,
            silent,
        })
    }

    fn health(&self) -> Health {
        self.inner.health()
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<Option<Lag>, TransportError> {
        self.inner.lag(topic, group).await
    }

    async fn close(&self) -> Result<(), TransportError> {
        self.inner.close().await
    }
}

impl Subscription for StallingSubscription {
    type Delivery = MemoryDelivery;

    async fn fetch(
        &mut self,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<MemoryDelivery>, TransportError> {
        if self.silent {
            // Alive, answering, and receiving nothing.
            tokio::time::sleep(max_wait).await;
            return Ok(Vec::new());
        }
        self.inner.fetch(max, max_wait).await
    }

    async fn close(self) -> Result<(), TransportError> {
        self.inner.close().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stopped_receiving_is_reported_and_replaced() {
    let replace = Arc::new(Semaphore::new(0));
    let transport = Stalling {
        inner: MemoryTransport::new(),
        stall_next: AtomicBool::new(true),
        replace: replace.clone(),
    };
    let mut config = kit_config().with_max_wait(Duration::from_millis(20));
    config.subscribe.stall_timeout = Duration::from_millis(200);
    let bus = Bus::new(transport, config).expect("bus");
    let topic = unique("stall");
    let group = unique("group");
    let got: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &group, got.envelope_handler())
        .await
        .expect("subscribe");
    for v in 1..=20 {
        bus.publish_envelope(&topic, &Envelope::new("agg-s", "t", v, json!({})))
            .await
            .expect("publish");
    }
    // Found stalled while its replacement waits.
    let stalled = hang_guard("the stall to be reported", async {
        loop {
            let h = bus.health();
            if !h.stalled.is_empty() {
                return h.stalled;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        stalled,
        vec![StalledSubscription {
            topic: topic.clone(),
            group: group.clone()
        }]
    );
    assert_eq!(bus.metrics().fetch_stalls, 1);
    assert!(got.snapshot().is_empty(), "nothing handled while stalled");
    // The replacement consumer takes over: everything waiting is handled, in order, and the
    // subscription is no longer listed.
    replace.add_permits(1);
    let items = got.wait_for(20, "the waiting messages").await;
    let versions: Vec<i64> = items.iter().map(|e| e.event_version).collect();
    assert_eq!(versions, (1..=20).collect::<Vec<_>>());
    assert!(bus.health().stalled.is_empty(), "{:?}", bus.health());
    bus.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_consumer_with_nothing_waiting_is_not_stalled() {
    let transport = Stalling {
        inner: MemoryTransport::new(),
        // Silent from the start, but nothing is ever published: nothing waits.
        stall_next: AtomicBool::new(true),
        replace: Arc::new(Semaphore::new(0)),
    };
    let mut config = kit_config().with_max_wait(Duration::from_millis(20));
    config.subscribe.stall_timeout = Duration::from_millis(50);
    let bus = Bus::new(transport, config).expect("bus");
    let topic = unique("idle");
    // Another topic gets traffic, so the bus is busy while this subscription idles.
    let busy = unique("busy");
    let got: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &unique("group"), got.envelope_handler())
        .await
        .expect("subscribe");
    // Several stall periods pass (seen from the publishes' own pace, not a sleep).
    let started = tokio::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(400) {
        n += 1;
        bus.publish_envelope(&busy, &Envelope::new("agg-b", "t", n, json!({})))
            .await
            .expect("publish");
        tokio::task::yield_now().await;
        assert!(bus.health().stalled.is_empty(), "{:?}", bus.health());
    }
    assert_eq!(bus.metrics().fetch_stalls, 0);
    bus.close().await.expect("close");
}
