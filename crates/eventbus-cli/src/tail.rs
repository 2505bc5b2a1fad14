//! `tail` and `dlq list`: print what a topic holds and what arrives, filtered by aggregate.

use tokio::time::Instant;

use eventbus::EventBus;

use crate::args::{Output, ReadArgs};
use crate::output::print_message;
use crate::read::{Next, Reader};
use crate::Failure;

/// A throwaway group name: a new group reads the topic from its start.
pub fn fresh_group(prefix: &str) -> String {
    let id = eventbus::new_event_id();
    format!("{prefix}-{}", &id[id.len() - 12..])
}

/// Prints messages of `topic` until `--count`, `--idle`, `--timeout` (with `--count`) or
/// Ctrl-C. `dead` prints the dead-letter details.
pub async fn run(
    bus: &EventBus,
    topic: &str,
    args: &ReadArgs,
    output: Output,
    dead: bool,
) -> Result<(), Failure> {
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| fresh_group("eventbus-cli-tail"));
    let mut reader = Reader::open(bus, topic, &group)
        .await
        .map_err(Failure::Bus)?;
    let deadline = args.count.map(|_| Instant::now() + args.timeout);
    let mut printed = 0usize;
    let outcome = loop {
        if args.count.is_some_and(|c| printed >= c) {
            break Ok(());
        }
        match reader.next(args.idle, deadline).await {
            Next::Item(item) => {
                let wanted = args
                    .aggregate
                    .as_deref()
                    .map_or(true, |a| item.msg.aggregate_id() == Some(a));
                if wanted {
                    print_message(output, &item.msg, dead);
                    printed += 1;
                }
                item.done();
            }
            Next::Idle | Next::Interrupted => break Ok(()),
            Next::TimedOut => break Err(()),
        }
    };
    reader.stop(None).await;
    match (outcome, args.count) {
        (Ok(()), Some(c)) if printed < c => Err(Failure::Short {
            got: printed,
            want: c,
        }),
        (Err(()), Some(c)) => Err(Failure::Short {
            got: printed,
            want: c,
        }),
        _ => Ok(()),
    }
}
