//! How messages and results are printed: text for people, one JSON object per line for
//! scripts; progress on stderr only when it is a terminal.

use std::io::{IsTerminal, Write};

use eventbus::{headers, Message, PublishResult};
use serde_json::{json, Map, Value};

use crate::args::Output;

/// A message as JSON: its ids, headers and body (the envelope when it is one, else the
/// payload as JSON, else as text).
pub fn message_json(msg: &Message) -> Value {
    let hdrs: Map<String, Value> = msg
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(v)))
        .collect();
    let mut out = json!({
        "topic": msg.topic(),
        "event_id": msg.event_id(),
        "aggregate_id": msg.aggregate_id(),
        "delivery": msg.delivery_count(),
        "headers": hdrs,
    });
    if let Some(p) = msg.position() {
        out["partition"] = json!(p.partition);
        out["offset"] = json!(p.offset);
    }
    match msg.envelope() {
        Ok(env) => out["envelope"] = json!(env),
        Err(_) => {
            out["payload"] = serde_json::from_slice(msg.payload())
                .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(msg.payload())));
        }
    }
    out
}

/// What a dead letter says about its failure.
pub fn dead_letter_json(msg: &Message) -> Value {
    let h = msg.headers();
    json!({
        "source_topic": h.get(headers::DLQ_TOPIC),
        "group": h.get(headers::DLQ_GROUP),
        "reason": h.get(headers::DLQ_REASON),
        "error": h.get(headers::DLQ_ERROR),
        "attempts": h.get(headers::DLQ_ATTEMPTS).and_then(|a| a.parse::<u64>().ok()),
    })
}

/// Prints one message (with its dead-letter details when `dead` is set).
pub fn print_message(output: Output, msg: &Message, dead: bool) {
    let mut value = message_json(msg);
    if dead {
        value["dead_letter"] = dead_letter_json(msg);
    }
    let mut stdout = std::io::stdout().lock();
    let _ = match output {
        Output::Json => writeln!(stdout, "{value}"),
        Output::Text => {
            let mut head = format!(
                "── {} {} aggregate={}",
                msg.topic(),
                msg.event_id().unwrap_or("-"),
                msg.aggregate_id().unwrap_or("-")
            );
            if let Some(p) = msg.position() {
                head.push_str(&format!(" offset={}", p.offset));
            }
            if dead {
                let d = &value["dead_letter"];
                head.push_str(&format!(
                    "\n   dead letter from {} (group {}, {} after {} attempts): {}",
                    d["source_topic"].as_str().unwrap_or("?"),
                    d["group"].as_str().unwrap_or("?"),
                    d["reason"].as_str().unwrap_or("?"),
                    d["attempts"],
                    d["error"].as_str().unwrap_or("?"),
                ));
            }
            let body = value
                .get("envelope")
                .or_else(|| value.get("payload"))
                .cloned()
                .unwrap_or(Value::Null);
            let pretty = serde_json::to_string_pretty(&body).unwrap_or_default();
            writeln!(stdout, "{head}\n{pretty}")
        }
    };
}

/// Prints one publish result.
pub fn print_result(output: Output, r: &PublishResult) {
    let mut stdout = std::io::stdout().lock();
    let _ = match (&r.outcome, output) {
        (Ok(receipt), Output::Json) => writeln!(
            stdout,
            "{}",
            json!({
                "topic": r.topic, "event_id": r.event_id, "aggregate_id": r.aggregate_id,
                "ok": true, "duplicate": receipt.duplicate,
                "partition": receipt.position.and_then(|p| p.partition),
                "offset": receipt.position.map(|p| p.offset),
            })
        ),
        (Err(e), Output::Json) => writeln!(
            stdout,
            "{}",
            json!({"topic": r.topic, "event_id": r.event_id, "ok": false, "error": e.to_string()})
        ),
        (Ok(receipt), Output::Text) => writeln!(
            stdout,
            "published {} to {}{}{}",
            r.event_id,
            r.topic,
            receipt
                .position
                .map(|p| format!(" at offset {}", p.offset))
                .unwrap_or_default(),
            if receipt.duplicate {
                " (duplicate)"
            } else {
                ""
            }
        ),
        (Err(e), Output::Text) => writeln!(stdout, "FAILED {} to {}: {e}", r.event_id, r.topic),
    };
}

/// A progress line on stderr, redrawn in place, only when stderr is a terminal.
pub struct Progress {
    what: &'static str,
    on: bool,
    done: u64,
}

impl Progress {
    /// A progress line counting `what`.
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            on: std::io::stderr().is_terminal(),
            done: 0,
        }
    }

    /// One more done.
    pub fn tick(&mut self) {
        self.done += 1;
        if self.on && (self.done < 100 || self.done % 100 == 0) {
            eprint!("\r{} {}", self.done, self.what);
        }
    }

    /// Clears the line.
    pub fn finish(&self) {
        if self.on && self.done > 0 {
            eprintln!("\r{} {}", self.done, self.what);
        }
    }
}
