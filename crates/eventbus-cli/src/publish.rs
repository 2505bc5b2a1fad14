//! `publish`: envelopes from the argument or stdin, every ACK awaited and reported.

use eventbus::{BusError, Envelope, EnvelopeError, EventBus, PublishResult};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

use crate::args::{Output, PublishArgs};
use crate::output::{print_result, Progress};
use crate::Failure;

/// An envelope from JSON, with `event_id`, `event_version` (1) and `timestamp` (now) filled
/// in when missing.
pub fn envelope_from(text: &str) -> Result<Envelope, String> {
    let mut v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Some(obj) = v.as_object_mut() else {
        return Err("an envelope is a JSON object".into());
    };
    obj.entry("event_id")
        .or_insert_with(|| Value::from(eventbus::new_event_id()));
    obj.entry("event_version").or_insert_with(|| Value::from(1));
    obj.entry("timestamp").or_insert_with(|| {
        // The envelope's own constructor gives the canonical time form.
        serde_json::to_value(Envelope::new("x", "x", 0, Value::Null).timestamp)
            .unwrap_or(Value::Null)
    });
    obj.entry("payload").or_insert(Value::Null);
    let env: Envelope = serde_json::from_value(v)
        .map_err(|e| EnvelopeError::Malformed(e.to_string()).to_string())?;
    env.validate().map_err(|e| e.to_string())?;
    Ok(env)
}

/// Publishes and prints one result per envelope; a failed publish makes the exit code 1.
pub async fn run(bus: &EventBus, args: PublishArgs, output: Output) -> Result<(), Failure> {
    let mut results = bus.results().map_err(Failure::Bus)?;
    let topic = args.topic.clone();
    // Results are read while publishing: the stream is bounded and would stall the publisher.
    let mut progress = Progress::new("acknowledged");
    let mut failed = 0usize;
    let mut got = 0usize;
    let mut report = |r: PublishResult, got: &mut usize| {
        *got += 1;
        if !r.is_ok() {
            failed += 1;
        }
        progress.tick();
        print_result(output, &r);
    };
    let mut sent = 0usize;
    let published = {
        let publish = async {
            let one = |text: &str, line: usize| -> Result<Envelope, Failure> {
                envelope_from(text).map_err(|e| match line {
                    0 => Failure::Input(e),
                    n => Failure::Input(format!("line {n}: {e}")),
                })
            };
            match &args.json {
                Some(text) => {
                    let e = one(text, 0)?;
                    bus.publish_envelope(&topic, &e)
                        .await
                        .map_err(Failure::Bus)?;
                    sent += 1;
                }
                None => {
                    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
                    let mut n = 0;
                    while let Some(line) = lines
                        .next_line()
                        .await
                        .map_err(|e| Failure::Input(format!("reading stdin: {e}")))?
                    {
                        n += 1;
                        if line.trim().is_empty() {
                            continue;
                        }
                        let e = one(&line, n)?;
                        bus.publish_envelope(&topic, &e)
                            .await
                            .map_err(Failure::Bus)?;
                        sent += 1;
                    }
                }
            }
            Ok::<(), Failure>(())
        };
        let mut publish = std::pin::pin!(publish);
        loop {
            tokio::select! {
                done = &mut publish => break done,
                Some(r) = results.recv() => report(r, &mut got),
            }
        }
    };
    // What was accepted (before a bad line, too) gets its result.
    while got < sent {
        match results.recv().await {
            Some(r) => report(r, &mut got),
            None => return Err(Failure::Bus(BusError::Closed)),
        }
    }
    progress.finish();
    published?;
    if failed > 0 {
        return Err(Failure::Rejected(failed));
    }
    Ok(())
}
