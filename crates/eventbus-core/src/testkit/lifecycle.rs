//! Cases on the lifecycle: close while publishing, bounded close, subscribe racing close, current-thread runtimes.

use super::*;

/// `close()` during a stream of publishes: every accepted publish gets one result, all are
/// stored, later publishes are refused with `Closed`.
pub async fn close_while_publishing_loses_nothing<B: Backend>(b: &B) {
    let topic = unique("close");
    let bus = connect(b, kit_config()).await;
    let mut stream = bus.results().expect("results");
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let (pb, acc, t) = (bus.clone(), accepted.clone(), topic.clone());
    let (mid_flow, started) = tokio::sync::oneshot::channel();
    let publisher = tokio::spawn(async move {
        let mut mid_flow = Some(mid_flow);
        for v in 1..=20_000i64 {
            match pb
                .publish_envelope(&t, &env(&format!("agg-{}", v % 16), v))
                .await
            {
                Ok(id) => {
                    acc.lock().unwrap_or_else(|e| e.into_inner()).push(id);
                    if v == 500 {
                        if let Some(tx) = mid_flow.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Err(BusError::Closed) => return true,
                Err(e) => panic!("unexpected publish error {e}"),
            }
        }
        false
    });
    started.await.expect("500 publishes accepted");
    bus.close().await.expect("close");
    let refused = publisher.await.expect("publisher task");
    assert!(refused, "publishing went on after close");
    assert!(matches!(
        bus.publish(&topic, &b"late"[..]).await,
        Err(BusError::Closed)
    ));
    let accepted = accepted.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut results = HashMap::new();
    while let Some(r) = stream.recv().await {
        assert!(r.is_ok(), "{r:?}");
        *results.entry(r.event_id).or_insert(0) += 1;
    }
    assert_eq!(
        results.len(),
        accepted.len(),
        "one result per accepted publish"
    );
    assert!(results.values().all(|n| *n == 1));
    let reader = connect(b, kit_config()).await;
    let rec: Recorder<Envelope> = Recorder::default();
    reader
        .subscribe_envelope(&topic, &unique("after-close"), rec.envelope_handler())
        .await
        .expect("subscribe");
    let want: HashSet<String> = accepted.into_iter().collect();
    rec.wait_until("every accepted publish stored", |items| {
        items.iter().filter(|e| want.contains(&e.event_id)).count() >= want.len()
    })
    .await;
    reader.close().await.expect("close");
}

/// `close()` is bounded by the close timeout even when the application took the results
/// stream and never reads it: results that cannot be delivered in time are dropped from the
/// stream (counted in `results_dropped`), the callback still sees every one.
pub async fn close_bounded_with_unread_results<B: Backend>(b: &B) {
    const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
    let topic = unique("unread");
    let callback_seen = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let cs = callback_seen.clone();
    let mut cfg = kit_config()
        .with_close_timeout(CLOSE_TIMEOUT)
        .with_result_callback(move |r: &PublishResult| {
            *cs.lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(r.event_id.clone())
                .or_insert(0) += 1;
        });
    cfg.publish.results_capacity = 100;
    cfg.publish.in_flight_window = 100;
    let bus = connect(b, cfg).await;
    let stream = bus.results().expect("results");
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let (pb, acc, t) = (bus.clone(), accepted.clone(), topic.clone());
    let (going_tx, going) = tokio::sync::oneshot::channel::<()>();
    let publisher = tokio::spawn(async move {
        let mut going_tx = Some(going_tx);
        for v in 1..=1_000i64 {
            match pb.publish_envelope(&t, &env("agg-u", v)).await {
                Ok(id) => acc.lock().unwrap_or_else(|e| e.into_inner()).push(id),
                Err(BusError::Closed) => return,
                Err(e) => panic!("unexpected publish error {e}"),
            }
            if v == 150 {
                if let Some(tx) = going_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    // The stream (100) and the window (100) fill up; publishing then waits on the reader.
    going.await.expect("publishing got going (150 accepted)");
    // Four phases (subscriptions, dispatcher, flush, collector) each bounded by the timeout.
    let bound = CLOSE_TIMEOUT * 4 + Duration::from_secs(10);
    let closed = tokio::time::timeout(bound, bus.close()).await;
    assert!(closed.is_ok(), "close() did not return within {bound:?}");
    publisher.await.expect("publisher task");
    let accepted = accepted.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let seen = callback_seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for id in &accepted {
        assert_eq!(seen.get(id), Some(&1), "callback missed or repeated {id}");
    }
    let mut stream = stream;
    let mut streamed = 0;
    while let Some(_r) = stream.recv().await {
        streamed += 1;
    }
    let m = bus.metrics();
    assert!(m.results_dropped > 0, "{m:?}");
    assert_eq!(streamed + m.results_dropped as usize, accepted.len());
}

/// `subscribe` racing `close`: either the subscription is refused with `Closed` or it is
/// stopped by the close; in both cases nothing the bus spawned is alive once `close` returns.
pub async fn subscribe_racing_close_leaves_nothing<B: Backend>(b: &B) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let topic = unique("race");
    for round in 0..50 {
        let baseline = metrics.num_alive_tasks();
        let bus = connect(b, kit_config()).await;
        let handled = Arc::new(AtomicUsize::new(0));
        let h = handled.clone();
        let handler = move |_m: Message| {
            h.fetch_add(1, Ordering::SeqCst);
            futures_util::future::ready(Ok::<(), HandlerError>(()))
        };
        // `subscribe` runs on a thread of its own (not a task, which would itself count as
        // alive for a moment after it completed), so the two truly race.
        let (b1, t, g) = (bus.clone(), topic.clone(), unique("g"));
        let handle = tokio::runtime::Handle::current();
        let (done, subscribed) = tokio::sync::oneshot::channel();
        let racer = std::thread::spawn(move || {
            let r = handle.block_on(async move { b1.subscribe(&t, &g, handler).await.map(drop) });
            let _ = done.send(r);
        });
        bus.close().await.expect("close");
        let sub = subscribed.await.expect("the subscribing thread reports");
        racer.join().expect("the subscribing thread ends");
        match sub {
            Ok(()) | Err(BusError::Closed) => {}
            Err(e) => panic!("round {round}: unexpected subscribe error {e}"),
        }
        assert!(matches!(
            bus.subscribe(&topic, "late", |_m: Message| async { Ok(()) })
                .await,
            Err(BusError::Closed)
        ));
        // The bus is still held: a closed bus must not keep tasks alive until it is dropped.
        // The bus's own tasks have ended when `close()` returns; a broker client's internal
        // tasks (async-nats spawns some without join handles) may need a few scheduler turns
        // to be released after they signalled their end.
        assert_eq!(
            tasks_released(baseline).await,
            baseline,
            "round {round}: tasks still alive after close() returned"
        );
        drop(bus);
    }
}

/// Runs on Tokio's current-thread runtime (the default of `#[tokio::test]`): a backend that
/// supports it publishes, consumes, retries and closes there; one that does not refuses at
/// connect with a clear [`TransportError::Unsupported`] instead of stalling later.
pub async fn current_thread_runtime<B: Backend>(b: &B) {
    assert_eq!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::CurrentThread
    );
    let bus = match b.connect(kit_config()).await {
        Ok(bus) => bus,
        Err(e) => {
            assert!(
                !b.supports_current_thread(),
                "connect failed on a current-thread runtime: {e}"
            );
            assert!(
                matches!(e, BusError::Transport(TransportError::Unsupported(ref m)) if m.contains("multi-thread")),
                "refusal must say what to use instead: {e:?}"
            );
            println!("refused on a current-thread runtime, as declared: {e}");
            return;
        }
    };
    assert!(
        b.supports_current_thread(),
        "the backend declares no current-thread support but connected"
    );
    let topic = unique("current-thread");
    let rec: Recorder<Envelope> = Recorder::default();
    let r = rec.clone();
    let failed_once = Arc::new(AtomicUsize::new(0));
    let f = failed_once.clone();
    bus.subscribe_envelope(&topic, &unique("group"), move |e: Envelope| {
        let (r, f) = (r.clone(), f.clone());
        async move {
            if e.event_version == 2 && f.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(HandlerError::retryable("first attempt fails"));
            }
            r.push(e);
            Ok(())
        }
    })
    .await
    .expect("subscribe");
    for v in 1..=20 {
        bus.publish_envelope(&topic, &env(&format!("agg-{}", v % 3), v))
            .await
            .expect("publish");
    }
    let got = rec
        .wait_for(20, "20 envelopes on a current-thread runtime")
        .await;
    assert_eq!(ordering_violations(&got), 0);
    assert_eq!(
        failed_once.load(Ordering::SeqCst),
        2,
        "one retry of version 2"
    );
    bus.close().await.expect("close");
}
