//! `dlq replay`: dead letters back to the topic they came from, one at a time in their
//! order; a dead letter is acknowledged only after its republish was acknowledged.

use tokio::time::Instant;

use eventbus::{headers, EventBus, Message, Publication};

use crate::args::{Output, ReadArgs};
use crate::output::{print_result, Progress};
use crate::read::{Next, Reader};
use crate::Failure;

/// The group that remembers what was replayed, unless `--group` names another.
pub const REPLAY_GROUP: &str = "eventbus-cli-replay";
/// On a replayed message: the event id of the dead letter it replays.
pub const REPLAY_OF: &str = "X-Replay-Of";

/// The republication of dead letter `msg`: its source topic, aggregate and headers without
/// the dead-letter ones; event id `<original>:replay` (the broker's duplicate window would
/// drop the original id), the original id in `X-Replay-Of`.
pub fn replay_of(msg: &Message) -> Result<Publication, String> {
    let h = msg.headers();
    let source = h
        .get(headers::DLQ_TOPIC)
        .ok_or("not a dead letter: no X-DLQ-Topic header")?;
    let original = msg.event_id().unwrap_or_default().to_string();
    let mut p = Publication::new(source, msg.payload().clone())
        .event_id(format!("{original}:replay"))
        .header(REPLAY_OF, original.as_str());
    if let Some(a) = msg.aggregate_id() {
        p = p.aggregate_id(a);
    }
    let skip = [
        headers::EVENT_ID,
        headers::AGGREGATE_ID,
        headers::CONTENT_ENCODING,
        headers::DLQ_ERROR,
        headers::DLQ_TOPIC,
        headers::DLQ_GROUP,
        headers::DLQ_ATTEMPTS,
        headers::DLQ_REASON,
        headers::DLQ_CONTENT_ENCODING,
    ];
    for (name, value) in h.iter() {
        if !skip.iter().any(|s| s.eq_ignore_ascii_case(name)) {
            p = p.header(name, value);
        }
    }
    Ok(p)
}

/// Replays the dead letters of `topic` until `--count`, `--idle`, `--timeout` or Ctrl-C.
pub async fn replay(
    bus: &EventBus,
    dlq_topic: &str,
    args: &ReadArgs,
    output: Output,
) -> Result<(), Failure> {
    if args.aggregate.is_some() {
        return Err(Failure::Usage(
            "dlq replay takes no --aggregate: skipping a dead letter would acknowledge it unreplayed".into(),
        ));
    }
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| REPLAY_GROUP.to_string());
    let mut reader = Reader::open(bus, dlq_topic, &group)
        .await
        .map_err(Failure::Bus)?;
    let deadline = args.count.map(|_| Instant::now() + args.timeout);
    let mut progress = Progress::new("replayed");
    let mut replayed = 0usize;
    // A dead letter whose replay failed: held until the subscription is stopping.
    let mut unfinished = None;
    let outcome = loop {
        if args.count.is_some_and(|c| replayed >= c) {
            break Ok(());
        }
        match reader.next(args.idle, deadline).await {
            Next::Item(item) => {
                let p = match replay_of(&item.msg) {
                    Ok(p) => p,
                    // Left where it is: handed back when the reader stops.
                    Err(e) => {
                        unfinished = Some(item);
                        break Err(Failure::Input(e));
                    }
                };
                match bus.send_and_wait(p).await {
                    Ok(r) if r.is_ok() => {
                        print_result(output, &r);
                        item.done();
                        replayed += 1;
                        progress.tick();
                    }
                    Ok(r) => {
                        print_result(output, &r);
                        unfinished = Some(item);
                        break Err(Failure::Rejected(1));
                    }
                    Err(e) => {
                        unfinished = Some(item);
                        break Err(Failure::Bus(e));
                    }
                }
            }
            Next::Idle | Next::Interrupted => break Ok(()),
            Next::TimedOut => {
                break Err(Failure::Short {
                    got: replayed,
                    want: args.count.unwrap_or_default(),
                })
            }
        }
    };
    progress.finish();
    reader.stop(unfinished).await;
    outcome?;
    match args.count {
        Some(c) if replayed < c => Err(Failure::Short {
            got: replayed,
            want: c,
        }),
        _ => Ok(()),
    }
}
