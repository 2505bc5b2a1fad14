//! Cases on what the bus hands to the application's observability and middleware: the W3C
//! trace context across the broker, and handler layers.

use std::time::Duration;

use super::*;
use crate::middleware::{from_fn, Next, Timeout};
use crate::trace::TraceContext;
use crate::{Headers, SubscribeOptions};

/// What a handler saw of one message's trace.
#[derive(Debug, Clone)]
struct Seen {
    event_id: String,
    /// The message's `traceparent` header: the publish span's context.
    header: Option<String>,
    tracestate: Option<String>,
    /// `TraceContext::current()` inside the handler: the handling span's context.
    handling: Option<TraceContext>,
}

fn seen(msg: &Message) -> Seen {
    Seen {
        event_id: msg.event_id().unwrap_or_default().to_string(),
        header: msg.headers().get(headers::TRACEPARENT).map(str::to_owned),
        tracestate: msg.headers().get(headers::TRACESTATE).map(str::to_owned),
        handling: TraceContext::current(),
    }
}

/// A trace crosses the broker: the message carries a `traceparent` of a publish span that
/// is a child of the publisher's context (tracestate passed along); the handling runs in a
/// child of that publish span; a publish from inside the handler continues the same trace,
/// and its handling is a child of that second publish. A malformed `traceparent` is
/// replaced, never an error.
pub async fn trace_context_crosses_the_broker<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let (first, second) = (unique("trace-a"), unique("trace-b"));
    let group = unique("group");
    let hops: Recorder<(usize, Seen)> = Recorder::default();
    let (h, inner, out) = (hops.clone(), bus.clone(), second.clone());
    bus.subscribe(&first, &group, move |msg: Message| {
        let (h, bus, out) = (h.clone(), inner.clone(), out.clone());
        async move {
            h.push((1, seen(&msg)));
            // Published from inside the handling: continues its trace.
            bus.send(Publication::new(
                out.as_str(),
                Bytes::from_static(b"second hop"),
            ))
            .await
            .map(|_| ())
            .map_err(|e| HandlerError::retryable(e.to_string()))
        }
    })
    .await
    .expect("subscribe");
    let h2 = hops.clone();
    bus.subscribe(&second, &group, move |msg: Message| {
        let h = h2.clone();
        async move {
            h.push((2, seen(&msg)));
            Ok(())
        }
    })
    .await
    .expect("subscribe");

    let mut parent_headers = Headers::new();
    parent_headers.insert(
        headers::TRACEPARENT,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    parent_headers.insert(headers::TRACESTATE, "kit=1");
    let parent = TraceContext::from_headers(&parent_headers).expect("valid parent");
    let published = parent
        .clone()
        .scope(bus.publish_and_wait(&first, Bytes::from_static(b"first hop")))
        .await
        .expect("publish");
    assert!(published.is_ok(), "{published:?}");
    let got = hops.wait_for(2, "both hops handled").await;
    let hop = |n: usize| {
        got.iter()
            .find(|(i, _)| *i == n)
            .map(|(_, s)| s.clone())
            .expect("hop")
    };
    let (one, two) = (hop(1), hop(2));
    let publish1 = TraceContext::parse(one.header.as_deref().expect("traceparent on hop 1"))
        .expect("a valid traceparent on hop 1");
    assert_eq!(
        publish1.trace_id(),
        parent.trace_id(),
        "publish joins the trace of its scope"
    );
    assert_ne!(
        publish1.span_id(),
        parent.span_id(),
        "the publish is a span of its own"
    );
    assert_eq!(one.tracestate.as_deref(), Some("kit=1"));
    let handling1 = one.handling.expect("a trace context inside the handler");
    assert_eq!(handling1.trace_id(), parent.trace_id());
    assert_eq!(
        handling1.parent_span_id(),
        Some(publish1.span_id()),
        "the handling's parent is the publish span"
    );
    let publish2 = TraceContext::parse(two.header.as_deref().expect("traceparent on hop 2"))
        .expect("a valid traceparent on hop 2");
    assert_eq!(
        publish2.trace_id(),
        parent.trace_id(),
        "the second hop stays in the trace"
    );
    assert_ne!(publish2.span_id(), handling1.span_id());
    assert_eq!(two.tracestate.as_deref(), Some("kit=1"));
    let handling2 = two
        .handling
        .expect("a trace context inside the second handler");
    assert_eq!(handling2.parent_span_id(), Some(publish2.span_id()));

    // A malformed traceparent: replaced by a new trace, delivered as usual.
    let p = Publication::new(first.as_str(), Bytes::from_static(b"bad trace"))
        .header(headers::TRACEPARENT, "00-not-a-trace-01");
    let r = bus.send_and_wait(p).await.expect("publish");
    let got = hops
        .wait_until("the malformed-trace message handled", |s| {
            s.iter().any(|(_, x)| x.event_id == r.event_id)
        })
        .await;
    let bad = got
        .iter()
        .find(|(_, x)| x.event_id == r.event_id)
        .map(|(_, s)| s.clone())
        .expect("seen");
    let fresh = TraceContext::parse(bad.header.as_deref().expect("traceparent"))
        .expect("the malformed value was replaced by a valid one");
    assert_ne!(fresh.trace_id(), parent.trace_id());
    bus.close().await.expect("close");
}

/// Handler layers wrap every attempt, in order, in the worker: a timeout layer fails a hung
/// first attempt as retryable, the retry goes through the layers again and succeeds, and a
/// layer that refuses a message sends it to the dead letter with its reason.
pub async fn middleware_wraps_the_handler<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("middleware");
    let group = unique("group");
    let dlq = subscribe_dlq(&bus, &topic).await;
    let log: Recorder<String> = Recorder::default();
    let (outer, inner) = (log.clone(), log.clone());
    let options = SubscribeOptions::default()
        .layer(from_fn(move |msg: Message, next: Next| {
            let log = outer.clone();
            async move {
                if msg.payload().as_ref() == b"refuse" {
                    return Err(HandlerError::permanent("refused by a layer"));
                }
                log.push("outer".into());
                next.run(msg).await
            }
        }))
        .layer(Timeout::new(Duration::from_millis(300)));
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    bus.subscribe_with(&topic, &group, options, move |msg: Message| {
        let (log, a) = (inner.clone(), a.clone());
        async move {
            if a.fetch_add(1, Ordering::SeqCst) == 0 {
                // The first attempt hangs: the timeout layer ends it.
                std::future::pending::<()>().await;
            }
            log.push(format!(
                "handled {}",
                String::from_utf8_lossy(msg.payload())
            ));
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    bus.publish_and_wait(&topic, Bytes::from_static(b"slow once"))
        .await
        .expect("publish");
    let got = log
        .wait_for(3, "two passes of the outer layer, one success")
        .await;
    assert_eq!(got, ["outer", "outer", "handled slow once"]);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    bus.publish_and_wait(&topic, Bytes::from_static(b"refuse"))
        .await
        .expect("publish");
    let dead = dlq.wait_for(1, "the refused message dead-lettered").await;
    assert_eq!(
        dead[0].headers().get(headers::DLQ_ERROR),
        Some("refused by a layer")
    );
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2,
        "a refused message never reaches the handler"
    );
    let m = bus.metrics();
    assert!(m.retries >= 1 && m.handler_errors >= 2, "{m:?}");
    bus.close().await.expect("close");
}

/// Consumer lag as the broker reports it: a group that never consumed has everything stored
/// pending; a group that handled everything drops to zero once its acknowledgements reach
/// the broker; the untouched group still has everything.
pub async fn lag_counts_what_a_group_has_not_acknowledged<B: Backend>(b: &B) {
    let bus = connect(b, kit_config()).await;
    let topic = unique("lag");
    let (idle, busy) = (unique("idle"), unique("busy"));
    let n = 12;
    for v in 1..=n {
        let r = bus
            .publish_envelope_and_wait(&topic, &env(&format!("agg-{}", v % 3), v))
            .await
            .expect("publish");
        assert!(r.is_ok(), "{r:?}");
    }
    let Some(before) = bus.lag(&topic, &idle).await.expect("lag") else {
        println!("{}: the backend reports no lag", bus.health().backend);
        bus.close().await.expect("close");
        return;
    };
    assert_eq!(before.total(), n as u64, "{before:?}");
    let rec: Recorder<Envelope> = Recorder::default();
    bus.subscribe_envelope(&topic, &busy, rec.envelope_handler())
        .await
        .expect("subscribe");
    rec.wait_for(n as usize, "every message handled").await;
    // Acknowledgements (NATS acks, Kafka's periodic commits) reach the broker a little later;
    // there is no event to wait for, so ask again until they have.
    let caught_up = hang_guard("the busy group's lag to reach zero", async {
        loop {
            let lag = bus
                .lag(&topic, &busy)
                .await
                .expect("lag")
                .expect("reported");
            if lag.total() == 0 {
                return lag;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(!caught_up.partitions.is_empty());
    let untouched = bus
        .lag(&topic, &idle)
        .await
        .expect("lag")
        .expect("reported");
    assert_eq!(untouched.total(), n as u64, "{untouched:?}");
    assert!(
        bus.lag("bad topic", &idle).await.is_err(),
        "a bad name is an error"
    );
    bus.close().await.expect("close");
}
