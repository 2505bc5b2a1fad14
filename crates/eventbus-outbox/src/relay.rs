//! The relay: publishes committed outbox rows and marks them from the broker's answers.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Bus, Envelope, Publication, Transport};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::error::{OutboxError, OutboxErrorKind};
use crate::store::{Batch, Claimed, OutboxDb, Outcome};

/// A row given up on: its attempts ran out (or its stored envelope does not decode).
#[derive(Debug, Clone)]
pub struct DeadEvent {
    /// The event's id.
    pub event_id: String,
    /// Its topic.
    pub topic: String,
    /// The last error.
    pub error: String,
    /// Attempts made.
    pub attempts: i64,
}

/// Called with every row marked dead, on the relay's task: keep it short.
#[derive(Clone)]
pub struct DeadCallback(Arc<dyn Fn(&DeadEvent) + Send + Sync>);

impl DeadCallback {
    /// Wraps `f`.
    pub fn new(f: impl Fn(&DeadEvent) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl fmt::Debug for DeadCallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeadCallback")
    }
}

/// How the relay works; every field has a default.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Aggregates claimed per round (default 500, the bus's pull batch): the oldest pending
    /// event of each (its head), followed by its next pending events (see `round_rows`).
    pub batch_size: usize,
    /// Rows claimed per round at most (default 8,000: 16 events of each of 500 aggregates),
    /// the bound on the envelopes a round holds in memory. Each aggregate claimed gets an
    /// equal share, its head included (at least the head): 16 events each for 500
    /// aggregates, all 8,000 for a backlog of one. An aggregate's events are published one
    /// after another — each once the broker acknowledged the one before it — and a failure
    /// ends the aggregate's run there, so broker order stays outbox order. Set it to
    /// `batch_size` or less for one event per aggregate per round.
    pub round_rows: usize,
    /// With nothing to do, look again after this long even without a wake-up (default 1 s):
    /// the fallback when a wake-up is missed, and how retries that come due are found.
    pub poll_interval: Duration,
    /// Attempts before a row is marked dead (default 10).
    pub max_attempts: u32,
    /// Wait before the first retry; doubles per attempt up to `max_backoff` (default 200 ms).
    pub initial_backoff: Duration,
    /// Longest wait between attempts (default 30 s).
    pub max_backoff: Duration,
    /// Published rows are deleted after this long (default 24 h; `Duration::ZERO` keeps
    /// them).
    pub retention: Duration,
    /// How often the retention cleanup runs (default 1 min); it deletes at most 10,000 rows
    /// per run.
    pub cleanup_interval: Duration,
    /// `stop()` waits this long for the round under way (default 30 s).
    pub stop_timeout: Duration,
    /// Called with each row marked dead (default: logged only).
    pub on_dead: Option<DeadCallback>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            round_rows: 8_000,
            poll_interval: Duration::from_secs(1),
            max_attempts: 10,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
            cleanup_interval: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(30),
            on_dead: None,
        }
    }
}

/// What the relay did since it started (the table's own counts are [`OutboxDb::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayMetrics {
    /// Rows marked published (each after its broker ACK).
    pub published: u64,
    /// Failed attempts scheduled for a retry.
    pub retried: u64,
    /// Rows marked dead.
    pub dead: u64,
    /// Rounds whose marks could not be written (their rows are published again later, with
    /// the same `event_id`).
    pub mark_failures: u64,
    /// Rounds run (each claimed at least one row, published it and wrote the outcomes).
    pub rounds: u64,
}

struct Shared {
    wake: Notify,
    stopping: AtomicBool,
    published: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    mark_failures: AtomicU64,
    rounds: AtomicU64,
    /// The metrics after every round, for waiting on progress.
    progress: watch::Sender<RelayMetrics>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            wake: Notify::new(),
            stopping: AtomicBool::new(false),
            published: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            mark_failures: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            progress: watch::channel(RelayMetrics::default()).0,
        }
    }
}

/// Wakes the relay after a commit, so it does not wait for its poll interval. Cheap to clone.
#[derive(Clone)]
pub struct RelayWaker(Arc<Shared>);

impl RelayWaker {
    /// Tells the relay there is work (call after committing a transaction that enqueued).
    pub fn wake(&self) {
        self.0.wake.notify_one();
    }
}

/// A running relay (one task). On PostgreSQL several relays, in one process or many, may run
/// on one table: each claims rows with `FOR UPDATE SKIP LOCKED`, so a row is never published
/// by two at once, and an insert trigger's NOTIFY wakes them. On SQLite run one relay per
/// database file.
pub struct Relay {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    stop_timeout: Duration,
}

impl Relay {
    /// Starts relaying `db`'s outbox through `bus`.
    pub fn start<T: Transport>(
        db: OutboxDb,
        bus: Bus<T>,
        config: RelayConfig,
    ) -> Result<Self, OutboxError> {
        if config.batch_size == 0
            || config.round_rows == 0
            || config.max_attempts == 0
            || config.poll_interval.is_zero()
        {
            return Err(OutboxError::new(
                OutboxErrorKind::Config,
                "batch_size, round_rows, max_attempts and poll_interval must be above zero",
            ));
        }
        let shared = Arc::new(Shared::default());
        let stop_timeout = config.stop_timeout;
        let task = tokio::spawn(run(db, bus, config, shared.clone()));
        Ok(Self {
            shared,
            task,
            stop_timeout,
        })
    }

    /// A handle that wakes the relay.
    pub fn waker(&self) -> RelayWaker {
        RelayWaker(self.shared.clone())
    }

    /// Wakes the relay (see [`RelayWaker::wake`]).
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// What the relay did so far.
    pub fn metrics(&self) -> RelayMetrics {
        snapshot(&self.shared)
    }

    /// The metrics, updated after every round: wait on it for progress.
    ///
    /// ```no_run
    /// # async fn f(relay: &eventbus_outbox::Relay) {
    /// let mut progress = relay.progress();
    /// let _ = progress.wait_for(|m| m.published >= 100).await;
    /// # }
    /// ```
    pub fn progress(&self) -> watch::Receiver<RelayMetrics> {
        self.shared.progress.subscribe()
    }

    /// Stops after the round under way (its results are marked), waiting at most
    /// `stop_timeout`; a round cut off there is published again by the next relay.
    pub async fn stop(mut self) -> Result<RelayMetrics, OutboxError> {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if tokio::time::timeout(self.stop_timeout, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            return Err(OutboxError::new(
                OutboxErrorKind::Stopped,
                "the relay's round did not end within stop_timeout; aborted",
            ));
        }
        Ok(snapshot(&self.shared))
    }
}

impl Drop for Relay {
    /// A relay dropped without `stop` ends after its round under way.
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

fn snapshot(s: &Shared) -> RelayMetrics {
    RelayMetrics {
        published: s.published.load(Ordering::Relaxed),
        retried: s.retried.load(Ordering::Relaxed),
        dead: s.dead.load(Ordering::Relaxed),
        mark_failures: s.mark_failures.load(Ordering::Relaxed),
        rounds: s.rounds.load(Ordering::Relaxed),
    }
}

/// Rows deleted per cleanup run at most.
const CLEANUP_LIMIT: i64 = 10_000;

/// A run starts no new publish once its round has been publishing for this long: the round
/// then writes its marks, so a long run (a backlog of one aggregate on a broker with slow
/// ACKs) never keeps published rows unmarked — and the lag they show — for longer than this
/// plus one ACK. The rest of the run waits for the next round.
const ROUND_PUBLISH_LIMIT: Duration = Duration::from_secs(1);

/// Rounds in flight at once: while one round's marks are written, the next is claimed and
/// published. A round never holds a row of an aggregate that has a row in the other (a run
/// begins at its aggregate's head, heads in flight are not claimed again, and rows in flight
/// are still pending, so their successors are not heads), so order holds.
const ROUNDS_IN_FLIGHT: usize = 2;

async fn run<T: Transport>(db: OutboxDb, bus: Bus<T>, config: RelayConfig, shared: Arc<Shared>) {
    use futures_util::stream::{FuturesUnordered, StreamExt};

    let mut listener = Listener::start(&db).await;
    let mut next_cleanup = tokio::time::Instant::now();
    let mut rounds = FuturesUnordered::new();
    // Heads of the runs in flight: not claimed again (their successors cannot be heads
    // while they are pending).
    let mut in_flight: HashSet<i64> = HashSet::new();
    // The last claim found fewer heads than it could take: new ones appear when a round's
    // marks commit (or rows are inserted), so wait for a round before claiming again rather
    // than scanning pending rows that are all held back by rows in flight.
    let mut exhausted = false;
    loop {
        let stopping = shared.stopping.load(Ordering::Acquire);
        if stopping || rounds.len() >= ROUNDS_IN_FLIGHT || (exhausted && !rounds.is_empty()) {
            exhausted = false;
            match rounds.next().await {
                Some(done) => {
                    forget(&mut in_flight, done);
                    continue;
                }
                None => break,
            }
        }
        if !config.retention.is_zero() && tokio::time::Instant::now() >= next_cleanup {
            next_cleanup = tokio::time::Instant::now() + config.cleanup_interval;
            let before = crate::now_ms() - millis(config.retention);
            match db.cleanup(before, CLEANUP_LIMIT).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(deleted = n, "outbox retention cleanup"),
                Err(e) => tracing::warn!(error = %e, "outbox retention cleanup failed"),
            }
        }
        // Claim while the rounds in flight go on.
        let claim_started = std::time::Instant::now();
        let claim = db.claim(
            crate::now_ms(),
            config.batch_size,
            config.round_rows,
            in_flight.clone(),
        );
        tokio::pin!(claim);
        let claimed = loop {
            tokio::select! {
                c = &mut claim => break c,
                Some(done) = rounds.next(), if !rounds.is_empty() => forget(&mut in_flight, done),
            }
        };
        let batch = match claimed {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay cannot claim rows; retrying");
                idle(&shared, &mut listener, config.poll_interval).await;
                continue;
            }
        };
        tracing::trace!(
            runs = batch.runs.len(),
            rows = batch.runs.iter().map(Vec::len).sum::<usize>(),
            elapsed = ?claim_started.elapsed(),
            "outbox claim"
        );
        exhausted = batch.runs.len() < config.batch_size;
        if batch.runs.is_empty() {
            drop(batch);
            if rounds.is_empty() {
                idle(&shared, &mut listener, config.poll_interval).await;
            } else if let Some(done) = rounds.next().await {
                forget(&mut in_flight, done);
            }
            continue;
        }
        in_flight.extend(
            batch
                .runs
                .iter()
                .filter_map(|run| run.first())
                .map(|r| r.id),
        );
        rounds.push(round(&db, &bus, &config, &shared, batch));
    }
}

fn forget(in_flight: &mut HashSet<i64>, done: Vec<i64>) {
    for id in done {
        in_flight.remove(&id);
    }
}

/// Publishes a claimed batch, the runs concurrently, each run's rows one after another, and
/// marks the outcomes. Returns the heads of its runs.
async fn round<T: Transport>(
    db: &OutboxDb,
    bus: &Bus<T>,
    config: &RelayConfig,
    shared: &Shared,
    mut batch: Batch,
) -> Vec<i64> {
    let heads: Vec<i64> = batch
        .runs
        .iter()
        .filter_map(|run| run.first())
        .map(|r| r.id)
        .collect();
    let started = std::time::Instant::now();
    let deadline = started + ROUND_PUBLISH_LIMIT;
    let runs = batch
        .runs
        .iter_mut()
        .map(|run| publish_run(bus, config, shared, run, deadline));
    let (mut outcomes, mut dead) = (Vec::new(), Vec::new());
    for (o, d) in futures_util::future::join_all(runs).await {
        outcomes.extend(o);
        dead.extend(d);
    }
    let (mut published, mut retried) = (0u64, 0u64);
    for o in &outcomes {
        match o {
            Outcome::Published { .. } => published += 1,
            Outcome::Failed { dead: false, .. } => retried += 1,
            Outcome::Failed { dead: true, .. } => {}
        }
    }
    let published_in = started.elapsed();
    let finished = db.finish(batch, &outcomes, crate::now_ms()).await;
    tracing::trace!(
        rows = outcomes.len(),
        publish = ?published_in,
        mark = ?started.elapsed().saturating_sub(published_in),
        "outbox round"
    );
    match finished {
        Ok(()) => {
            shared.published.fetch_add(published, Ordering::Relaxed);
            shared.retried.fetch_add(retried, Ordering::Relaxed);
            shared.dead.fetch_add(dead.len() as u64, Ordering::Relaxed);
            // Reported once the row is marked dead, so a mark that fails reports nothing.
            for event in &dead {
                tracing::error!(event_id = %event.event_id, topic = %event.topic, error = %event.error,
                    attempts = event.attempts, "outbox row marked dead");
                if let Some(cb) = &config.on_dead {
                    (cb.0)(event);
                }
            }
        }
        Err(e) => {
            shared.mark_failures.fetch_add(1, Ordering::Relaxed);
            // Nothing marked: the rows stay pending and are published again, with the same
            // event ids (NATS drops the copy within its duplicate window; consumers' dedup
            // windows skip it elsewhere).
            tracing::warn!(error = %e, "outbox relay cannot mark its round; it will be published again");
        }
    }
    shared.rounds.fetch_add(1, Ordering::Relaxed);
    shared.progress.send_replace(snapshot(shared));
    heads
}

/// Publishes one aggregate's run in order: each row after the broker acknowledged the one
/// before it. A failure, a stop or the round's `deadline` ends the run; the rows after it are
/// left pending, untouched, and wait for it.
async fn publish_run<T: Transport>(
    bus: &Bus<T>,
    config: &RelayConfig,
    shared: &Shared,
    run: &mut [Claimed],
    deadline: std::time::Instant,
) -> (Vec<Outcome>, Vec<DeadEvent>) {
    let mut outcomes = Vec::with_capacity(run.len());
    let mut dead = Vec::new();
    for (i, row) in run.iter_mut().enumerate() {
        if i > 0
            && (shared.stopping.load(Ordering::Acquire) || std::time::Instant::now() >= deadline)
        {
            break;
        }
        // The row's JSON moves into its publication (the row keeps what reporting needs).
        let json = std::mem::take(&mut row.envelope);
        let outcome = publish(bus, config, row, json).await;
        let failed = match &outcome {
            Outcome::Published { .. } => false,
            Outcome::Failed {
                dead: true, error, ..
            } => {
                dead.push(DeadEvent {
                    event_id: row.event_id.clone(),
                    topic: row.topic.clone(),
                    error: error.clone(),
                    attempts: row.attempts + 1,
                });
                true
            }
            Outcome::Failed { error, .. } => {
                tracing::debug!(event_id = %row.event_id, %error, "outbox publish failed; retrying later");
                true
            }
        };
        outcomes.push(outcome);
        if failed {
            break;
        }
    }
    (outcomes, dead)
}

async fn publish<T: Transport>(
    bus: &Bus<T>,
    config: &RelayConfig,
    row: &Claimed,
    json: String,
) -> Outcome {
    let failed = |error: String, dead: bool| {
        let attempt = u32::try_from(row.attempts).unwrap_or(u32::MAX);
        let dead = dead || attempt.saturating_add(1) >= config.max_attempts;
        let backoff = config
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(config.max_backoff);
        Outcome::Failed {
            id: row.id,
            error,
            next_attempt_at: crate::now_ms() + millis(backoff),
            dead,
        }
    };
    let envelope = match Envelope::from_json(json.as_bytes()) {
        Ok(e) => e,
        Err(e) => return failed(format!("the stored envelope does not decode: {e}"), true),
    };
    // The stored JSON is the payload as it is: decoded for the routing headers only, not
    // encoded again.
    let publication = Publication::encoded_envelope(row.topic.as_str(), &envelope, json);
    match bus.send_and_wait(publication).await {
        Ok(r) => match r.outcome {
            Ok(_) => Outcome::Published { id: row.id },
            Err(e) => failed(e.to_string(), false),
        },
        Err(e) => failed(e.to_string(), false),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Waits for a wake-up, a database notification, the poll interval or a stop.
async fn idle(shared: &Shared, listener: &mut Listener, poll: Duration) {
    if shared.stopping.load(Ordering::Acquire) {
        return;
    }
    tokio::select! {
        _ = shared.wake.notified() => {}
        _ = listener.notified() => {}
        _ = tokio::time::sleep(poll) => {}
    }
}

/// PostgreSQL's LISTEN on the insert trigger's channel; nothing on SQLite.
enum Listener {
    None,
    #[cfg(feature = "postgres")]
    Postgres(sqlx::postgres::PgListener),
}

impl Listener {
    async fn start(db: &OutboxDb) -> Self {
        match db {
            #[cfg(feature = "postgres")]
            OutboxDb::Postgres(pool) => {
                let listening = async {
                    let mut l = sqlx::postgres::PgListener::connect_with(pool).await?;
                    l.listen("eventbus_outbox").await?;
                    Ok::<_, sqlx::Error>(l)
                };
                match listening.await {
                    Ok(l) => Self::Postgres(l),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot LISTEN for outbox inserts; polling only");
                        Self::None
                    }
                }
            }
            #[allow(unreachable_patterns)]
            _ => Self::None,
        }
    }

    async fn notified(&mut self) {
        match self {
            Self::None => std::future::pending().await,
            #[cfg(feature = "postgres")]
            Self::Postgres(l) => {
                if let Err(e) = l.recv().await {
                    // PgListener reconnects by itself on the next recv; until then, poll.
                    tracing::debug!(error = %e, "outbox LISTEN connection lost");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}
