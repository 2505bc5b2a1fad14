//! Runnable examples: `cargo run -p eventbus-examples --example quickstart`.
//!
//! `--example prometheus` exports the bus's metrics for Prometheus on `GET /metrics`
//! ([`metrics_http`] is its endpoint).

pub mod metrics_http;
