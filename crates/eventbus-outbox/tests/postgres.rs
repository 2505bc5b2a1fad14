#![cfg(feature = "postgres")]
//! The outbox on PostgreSQL (a database per test, `EVENTBUS_POSTGRES_URL`) with the memory
//! backend.

mod common;

use common::Db;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_publishes_exactly_once() {
    common::commit_publishes_exactly_once(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_publishes_nothing() {
    common::rollback_publishes_nothing(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_failure_is_retried_then_published() {
    common::broker_failure_is_retried_then_published(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_after_max_attempts() {
    common::dead_after_max_attempts(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_kept_when_an_earlier_event_fails() {
    common::order_kept_when_an_earlier_event_fails(Db::postgres().await).await;
}
