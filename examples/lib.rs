//! Runnable examples: `cargo run -p eventbus-examples --example quickstart`.
