//! Provisioning that survives a busy server: the create-or-get requests for streams and
//! key-value buckets are idempotent, so one that timed out (a replicated create on a busy
//! cluster, a server that answered too late) is sent again, with backoff, until the
//! provisioning deadline (`NatsConfig::provision_timeout`) — not given up at the first
//! request timeout (`publish_ack_timeout`).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// First wait before a provisioning request is sent again; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Runs `op` until it succeeds, fails with an error `retryable` rejects, or `deadline` (from
/// now) passes; then returns its last result. Each retry is logged at WARN with `what`.
pub(crate) async fn until_deadline<T, E, F>(
    what: &str,
    deadline: Duration,
    retryable: impl Fn(&E) -> bool,
    mut op: impl FnMut() -> F,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let until = Instant::now() + deadline;
    let mut backoff = FIRST_BACKOFF;
    let mut tries = 0u32;
    loop {
        tries += 1;
        match op().await {
            Err(e) if retryable(&e) && Instant::now() + backoff < until => {
                tracing::warn!(what, tries, error = %e, "provisioning request failed; sending it again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test(start_paused = true)]
    async fn retries_what_may_pass_until_the_deadline_and_nothing_else() {
        let calls = Cell::new(0);
        let ok: Result<u32, String> = until_deadline(
            "x",
            Duration::from_secs(10),
            |_| true,
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move {
                    if n < 3 {
                        Err("timed out".to_string())
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(ok, Ok(3));
        calls.set(0);
        let permanent: Result<u32, String> = until_deadline(
            "x",
            Duration::from_secs(10),
            |e: &String| e != "bad",
            || {
                calls.set(calls.get() + 1);
                async { Err("bad".to_string()) }
            },
        )
        .await;
        assert_eq!(permanent, Err("bad".into()));
        assert_eq!(calls.get(), 1, "a permanent error is not retried");
        calls.set(0);
        let late: Result<u32, String> = until_deadline(
            "x",
            Duration::from_secs(2),
            |_| true,
            || {
                calls.set(calls.get() + 1);
                async { Err("timed out".to_string()) }
            },
        )
        .await;
        assert!(late.is_err());
        assert!(
            calls.get() > 1 && calls.get() < 10,
            "bounded by the deadline: {}",
            calls.get()
        );
    }
}
