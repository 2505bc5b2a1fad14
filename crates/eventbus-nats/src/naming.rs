//! Topic → subject and stream names.
//!
//! A topic is published on the subject of the same name (the core's topic rule makes every
//! topic a valid subject: no wildcards, no spaces, no empty tokens). Each topic has its own
//! stream, `<prefix><topic with '.' → '_'>`, capturing exactly that subject; a per-topic stream
//! gives each topic its own limits and its own duplicate window (so a dead letter, which keeps
//! its original `X-Event-ID`, is never taken for a duplicate of the original).

/// The subject of `topic`.
pub(crate) fn subject(topic: &str) -> &str {
    topic
}

/// The stream holding `topic`.
pub(crate) fn stream_name(prefix: &str, topic: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + topic.len());
    s.push_str(prefix);
    s.extend(topic.chars().map(|c| if c == '.' { '_' } else { c }));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_have_no_dots() {
        assert_eq!(stream_name("EB_", "orders.created"), "EB_orders_created");
        assert_eq!(stream_name("", "a-b"), "a-b");
    }
}
