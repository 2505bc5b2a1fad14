//! The outbox on SQLite (a file per test) with the memory backend.

mod common;

use common::Db;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_publishes_exactly_once() {
    common::commit_publishes_exactly_once(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_publishes_nothing() {
    common::rollback_publishes_nothing(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_failure_is_retried_then_published() {
    common::broker_failure_is_retried_then_published(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_after_max_attempts() {
    common::dead_after_max_attempts(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_kept_when_an_earlier_event_fails() {
    common::order_kept_when_an_earlier_event_fails(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_one_aggregate_takes_few_rounds() {
    common::backlog_of_one_aggregate_takes_few_rounds(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_kept_when_an_event_inside_a_run_fails() {
    common::order_kept_when_an_event_inside_a_run_fails(Db::sqlite().await).await;
}
