//! The outbox table on SQLite or PostgreSQL: schema, claiming, marking, cleanup, statistics.

use crate::error::OutboxError;

/// The table's states.
pub(crate) const PENDING: i64 = 0;
pub(crate) const DEAD: i64 = 2;

pub(crate) use sealed::{Insert, NewRow};

mod sealed {
    use std::future::Future;

    /// One row as the writer stores it.
    pub struct NewRow<'a> {
        pub event_id: &'a str,
        pub topic: &'a str,
        pub aggregate_id: &'a str,
        pub envelope: &'a str,
        pub created_at: i64,
    }

    /// Writes a row; implemented for the transactions and connections below only.
    pub trait Insert: Send {
        fn insert_row(
            &mut self,
            row: &NewRow<'_>,
        ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
    }
}

/// A connection or transaction [`crate::enqueue`] can write through: the application's own
/// transaction (or connection) on SQLite or PostgreSQL.
pub trait OutboxExecutor: Insert {}

impl<T: Insert> OutboxExecutor for T {}

#[cfg(feature = "sqlite")]
const SQLITE_INSERT: &str = "INSERT INTO eventbus_outbox \
    (event_id, topic, aggregate_id, envelope, created_at) VALUES (?, ?, ?, ?, ?)";
#[cfg(feature = "postgres")]
const POSTGRES_INSERT: &str = "INSERT INTO eventbus_outbox \
    (event_id, topic, aggregate_id, envelope, created_at) VALUES ($1, $2, $3, $4, $5)";

macro_rules! executor {
    ($feature:literal, $ty:ty, $sql:ident, |$this:ident| $conn:expr) => {
        #[cfg(feature = $feature)]
        impl Insert for $ty {
            async fn insert_row(&mut self, row: &NewRow<'_>) -> Result<(), sqlx::Error> {
                let $this = self;
                sqlx::query($sql)
                    .bind(row.event_id)
                    .bind(row.topic)
                    .bind(row.aggregate_id)
                    .bind(row.envelope)
                    .bind(row.created_at)
                    .execute($conn)
                    .await
                    .map(|_| ())
            }
        }
    };
}

executor!(
    "sqlite",
    sqlx::Transaction<'_, sqlx::Sqlite>,
    SQLITE_INSERT,
    |t| &mut **t
);
executor!("sqlite", sqlx::SqliteConnection, SQLITE_INSERT, |c| c);
executor!(
    "postgres",
    sqlx::Transaction<'_, sqlx::Postgres>,
    POSTGRES_INSERT,
    |t| &mut **t
);
executor!("postgres", sqlx::PgConnection, POSTGRES_INSERT, |c| c);

/// The database holding the outbox table.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum OutboxDb {
    /// SQLite (the embedded default). One relay per database.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
    /// PostgreSQL: several relays may share the table.
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

#[cfg(feature = "sqlite")]
impl From<sqlx::SqlitePool> for OutboxDb {
    fn from(p: sqlx::SqlitePool) -> Self {
        Self::Sqlite(p)
    }
}

#[cfg(feature = "postgres")]
impl From<sqlx::PgPool> for OutboxDb {
    fn from(p: sqlx::PgPool) -> Self {
        Self::Postgres(p)
    }
}

/// One row claimed for publishing.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) topic: String,
    pub(crate) event_id: String,
    pub(crate) envelope: String,
    pub(crate) attempts: i64,
    pub(crate) aggregate_id: String,
    pub(crate) next_attempt_at: i64,
}

/// What publishing a claimed row came to.
pub(crate) enum Outcome {
    Published {
        id: i64,
    },
    Failed {
        id: i64,
        error: String,
        next_attempt_at: i64,
        dead: bool,
    },
}

/// A claimed batch: runs of consecutive pending rows, one run per aggregate, each beginning
/// with the aggregate's oldest pending row (its head). On PostgreSQL the heads stay locked
/// (`FOR UPDATE SKIP LOCKED`) until the batch is finished: a relay publishes an aggregate's
/// rows only while it holds that aggregate's head, so another relay never publishes them at
/// the same time.
pub(crate) struct Batch {
    pub(crate) runs: Vec<Vec<Claimed>>,
    lock: Lock,
}

enum Lock {
    #[cfg(feature = "sqlite")]
    None,
    #[cfg(feature = "postgres")]
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// Counts of the table's rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Rows waiting to be published (including those waiting for a retry).
    pub pending: u64,
    /// Rows published (until the retention cleanup removes them).
    pub published: u64,
    /// Rows given up on after the configured attempts.
    pub dead: u64,
    /// Age of the oldest pending row in milliseconds: the relay's lag (0 when none).
    pub oldest_pending_ms: u64,
}

/// Heads of their aggregate's pending rows only: a later event waits while an earlier one of
/// the same aggregate is pending or failing, so broker order is outbox order.
const HEADS: &str = "SELECT o.id, o.topic, o.event_id, o.envelope, o.attempts, o.aggregate_id, \
    o.next_attempt_at FROM eventbus_outbox o \
    WHERE o.state = 0 AND o.next_attempt_at <= {now} \
    AND NOT EXISTS (SELECT 1 FROM eventbus_outbox e \
        WHERE e.state = 0 AND e.aggregate_id = o.aggregate_id AND e.id < o.id) \
    ORDER BY o.id LIMIT {limit}";

/// The pending rows that follow each head of `h(agg, head)`, at most `{limit}` per aggregate,
/// in id order (each an index range scan: the pending index is `(aggregate_id, id)`). No row
/// locks: the head's lock guards its successors (see [`Batch`]).
#[cfg(feature = "sqlite")]
const SQLITE_SUCCESSORS: &str = "SELECT e.id, e.topic, e.event_id, e.envelope, e.attempts, \
    e.aggregate_id, e.next_attempt_at FROM h JOIN eventbus_outbox e ON e.id IN \
    (SELECT x.id FROM eventbus_outbox x WHERE x.aggregate_id = h.agg AND x.state = 0 \
        AND x.id > h.head ORDER BY x.id LIMIT {limit}) \
    ORDER BY e.id";
#[cfg(feature = "postgres")]
const POSTGRES_SUCCESSORS: &str = "SELECT e.id, e.topic, e.event_id, e.envelope, e.attempts, \
    e.aggregate_id, e.next_attempt_at FROM unnest($1::text[], $2::bigint[]) AS h(agg, head) \
    CROSS JOIN LATERAL (SELECT x.* FROM eventbus_outbox x WHERE x.aggregate_id = h.agg \
        AND x.state = 0 AND x.id > h.head ORDER BY x.id LIMIT $3) e \
    ORDER BY e.id";

/// Ids published per `UPDATE` at most (SQLite binds one parameter per id).
const MARK_CHUNK: usize = 5_000;

type RowTuple = (i64, String, String, String, i64, String, i64);

fn claimed(rows: Vec<RowTuple>) -> Vec<Claimed> {
    rows.into_iter()
        .map(
            |(id, topic, event_id, envelope, attempts, aggregate_id, next_attempt_at)| Claimed {
                id,
                topic,
                event_id,
                envelope,
                attempts,
                aggregate_id,
                next_attempt_at,
            },
        )
        .collect()
}

/// Appends each successor (in id order) to its aggregate's run; a successor that is not due
/// yet ends its run there (the rows after it wait for it).
fn extend_runs(runs: &mut [Vec<Claimed>], successors: Vec<Claimed>, now: i64) {
    let mut open: std::collections::HashMap<String, usize> = runs
        .iter()
        .enumerate()
        .filter_map(|(i, run)| run.first().map(|head| (head.aggregate_id.clone(), i)))
        .collect();
    for row in successors {
        let Some(&i) = open.get(&row.aggregate_id) else {
            continue;
        };
        if row.next_attempt_at > now {
            open.remove(&row.aggregate_id);
            continue;
        }
        runs[i].push(row);
    }
}

impl OutboxDb {
    /// Creates the table, its indexes (and on PostgreSQL the insert trigger that wakes
    /// relays) if they do not exist. Safe to run from several processes at once.
    pub async fn migrate(&self) -> Result<(), OutboxError> {
        let done = match self {
            #[cfg(feature = "sqlite")]
            Self::Sqlite(p) => sqlx::raw_sql(include_str!("../migrations/sqlite.sql"))
                .execute(p)
                .await
                .map(|_| ()),
            #[cfg(feature = "postgres")]
            Self::Postgres(p) => {
                // One migrating process at a time: concurrent CREATE … IF NOT EXISTS can
                // still collide on the catalog.
                let sql = format!(
                    "BEGIN; SELECT pg_advisory_xact_lock(7402011); {} COMMIT;",
                    include_str!("../migrations/postgres.sql")
                );
                sqlx::raw_sql(&sql).execute(p).await.map(|_| ())
            }
        };
        done.map_err(|e| OutboxError::database("creating the outbox table", e))
    }

    /// Claims up to `heads` due heads of their aggregates, oldest first, leaving out
    /// `in_flight` (heads of rounds still under way; on PostgreSQL their locks skip them too),
    /// each followed by its aggregate's next pending rows: `rows` in all at most, an equal
    /// share per aggregate (at least its head).
    pub(crate) async fn claim(
        &self,
        now: i64,
        heads: usize,
        row_budget: usize,
        in_flight: std::collections::HashSet<i64>,
    ) -> Result<Batch, OutboxError> {
        let limit = i64::try_from(heads.saturating_add(in_flight.len())).unwrap_or(i64::MAX);
        let (mut rows, lock) = self.claim_heads(now, limit).await?;
        rows.retain(|r| !in_flight.contains(&r.id));
        rows.truncate(heads);
        let mut runs: Vec<Vec<Claimed>> = rows.into_iter().map(|r| vec![r]).collect();
        let share = row_budget.checked_div(runs.len()).unwrap_or(0).max(1);
        let successors = i64::try_from(share - 1).unwrap_or(i64::MAX);
        let mut batch = Batch {
            runs: Vec::new(),
            lock,
        };
        if successors > 0 && !runs.is_empty() {
            let found = self.successors(&mut batch.lock, &runs, successors).await?;
            extend_runs(&mut runs, found, now);
        }
        batch.runs = runs;
        Ok(batch)
    }

    async fn claim_heads(&self, now: i64, limit: i64) -> Result<(Vec<Claimed>, Lock), OutboxError> {
        let failed = |e| OutboxError::database("claiming outbox rows", e);
        match self {
            #[cfg(feature = "sqlite")]
            Self::Sqlite(p) => {
                let sql = HEADS.replace("{now}", "?").replace("{limit}", "?");
                let rows: Vec<RowTuple> = sqlx::query_as(&sql)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(p)
                    .await
                    .map_err(failed)?;
                Ok((claimed(rows), Lock::None))
            }
            #[cfg(feature = "postgres")]
            Self::Postgres(p) => {
                let sql = format!(
                    "{} FOR UPDATE OF o SKIP LOCKED",
                    HEADS.replace("{now}", "$1").replace("{limit}", "$2")
                );
                let mut tx = p.begin().await.map_err(failed)?;
                let rows: Vec<RowTuple> = sqlx::query_as(&sql)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(failed)?;
                Ok((claimed(rows), Lock::Postgres(tx)))
            }
        }
    }

    /// Up to `limit` pending rows after each run's head, in id order (on PostgreSQL in the
    /// claim's transaction).
    async fn successors(
        &self,
        lock: &mut Lock,
        runs: &[Vec<Claimed>],
        limit: i64,
    ) -> Result<Vec<Claimed>, OutboxError> {
        let failed = |e| OutboxError::database("claiming outbox rows", e);
        let heads = runs.iter().filter_map(|run| run.first());
        match (self, lock) {
            #[cfg(feature = "sqlite")]
            (Self::Sqlite(p), _) => {
                let mut q =
                    sqlx::QueryBuilder::<sqlx::Sqlite>::new("WITH h(agg, head) AS (VALUES ");
                let mut values = q.separated(", ");
                for head in heads {
                    values.push("(");
                    values.push_bind_unseparated(head.aggregate_id.as_str());
                    values.push_unseparated(", ");
                    values.push_bind_unseparated(head.id);
                    values.push_unseparated(")");
                }
                // The limit is the relay's own number, written in: it sits inside the
                // correlated subquery.
                q.push(") ")
                    .push(SQLITE_SUCCESSORS.replace("{limit}", &limit.to_string()));
                let rows: Vec<RowTuple> = q.build_query_as().fetch_all(p).await.map_err(failed)?;
                Ok(claimed(rows))
            }
            #[cfg(feature = "postgres")]
            (Self::Postgres(_), Lock::Postgres(tx)) => {
                let (aggs, ids): (Vec<&str>, Vec<i64>) =
                    heads.map(|h| (h.aggregate_id.as_str(), h.id)).unzip();
                let rows: Vec<RowTuple> = sqlx::query_as(POSTGRES_SUCCESSORS)
                    .bind(aggs)
                    .bind(ids)
                    .bind(limit)
                    .fetch_all(&mut **tx)
                    .await
                    .map_err(failed)?;
                Ok(claimed(rows))
            }
            #[cfg(all(feature = "postgres", feature = "sqlite"))]
            (Self::Postgres(_), Lock::None) => Err(OutboxError::new(
                crate::OutboxErrorKind::Database,
                "a PostgreSQL batch without its claim transaction",
            )),
        }
    }

    /// Records the outcomes of a claimed batch.
    pub(crate) async fn finish(
        &self,
        batch: Batch,
        outcomes: &[Outcome],
        now: i64,
    ) -> Result<(), OutboxError> {
        let failed = |e| OutboxError::database("marking outbox rows", e);
        let published: Vec<i64> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Published { id } => Some(*id),
                Outcome::Failed { .. } => None,
            })
            .collect();
        // One transaction: the claim's on PostgreSQL (its row locks end with it), a new one
        // on SQLite. Published rows in a statement per chunk, failures one by one.
        macro_rules! write_outcomes {
            ($tx:ident, |$chunk:ident| $published:expr, $failed_sql:expr) => {{
                for $chunk in published.chunks(MARK_CHUNK) {
                    $published.execute(&mut *$tx).await.map_err(failed)?;
                }
                for o in outcomes {
                    if let Outcome::Failed {
                        id,
                        error,
                        next_attempt_at,
                        dead,
                    } = o
                    {
                        sqlx::query($failed_sql)
                            .bind(error)
                            .bind(next_attempt_at)
                            .bind(if *dead { DEAD } else { PENDING })
                            .bind(id)
                            .execute(&mut *$tx)
                            .await
                            .map_err(failed)?;
                    }
                }
                $tx.commit().await.map_err(failed)
            }};
        }
        match (self, batch.lock) {
            #[cfg(feature = "sqlite")]
            (Self::Sqlite(p), _) => {
                let mut tx = p.begin().await.map_err(failed)?;
                let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new("");
                write_outcomes!(
                    tx,
                    |chunk| {
                        q.reset();
                        q.push("UPDATE eventbus_outbox SET state = 1, published_at = ");
                        q.push_bind(now).push(" WHERE id IN (");
                        let mut ids = q.separated(", ");
                        for id in chunk {
                            ids.push_bind(*id);
                        }
                        q.push(")");
                        q.build()
                    },
                    "UPDATE eventbus_outbox SET attempts = attempts + 1, last_error = ?, \
                     next_attempt_at = ?, state = ? WHERE id = ?"
                )
            }
            #[cfg(feature = "postgres")]
            (Self::Postgres(_), Lock::Postgres(mut tx)) => write_outcomes!(
                tx,
                |chunk| sqlx::query(
                    "UPDATE eventbus_outbox SET state = 1, published_at = $1 WHERE id = ANY($2)",
                )
                .bind(now)
                .bind(chunk),
                "UPDATE eventbus_outbox SET attempts = attempts + 1, last_error = $1, \
                 next_attempt_at = $2, state = $3 WHERE id = $4"
            ),
            #[cfg(all(feature = "postgres", feature = "sqlite"))]
            (Self::Postgres(_), Lock::None) => Err(OutboxError::new(
                crate::OutboxErrorKind::Database,
                "a PostgreSQL batch without its claim transaction",
            )),
        }
    }

    /// Deletes up to `limit` rows published before `before` (ms since the epoch).
    pub(crate) async fn cleanup(&self, before: i64, limit: i64) -> Result<u64, OutboxError> {
        let failed = |e| OutboxError::database("deleting published outbox rows", e);
        let done = match self {
            #[cfg(feature = "sqlite")]
            Self::Sqlite(p) => sqlx::query(
                "DELETE FROM eventbus_outbox WHERE id IN (SELECT id FROM eventbus_outbox \
                 WHERE state = 1 AND published_at < ? LIMIT ?)",
            )
            .bind(before)
            .bind(limit)
            .execute(p)
            .await
            .map(|r| r.rows_affected()),
            #[cfg(feature = "postgres")]
            Self::Postgres(p) => sqlx::query(
                "DELETE FROM eventbus_outbox WHERE id IN (SELECT id FROM eventbus_outbox \
                 WHERE state = 1 AND published_at < $1 LIMIT $2)",
            )
            .bind(before)
            .bind(limit)
            .execute(p)
            .await
            .map(|r| r.rows_affected()),
        };
        done.map_err(failed)
    }

    /// Row counts and the relay's lag, read from the table.
    pub async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        const SQL: &str = "SELECT \
            COALESCE(SUM(CASE WHEN state = 0 THEN 1 ELSE 0 END), 0), \
            COALESCE(SUM(CASE WHEN state = 1 THEN 1 ELSE 0 END), 0), \
            COALESCE(SUM(CASE WHEN state = 2 THEN 1 ELSE 0 END), 0), \
            COALESCE(MIN(CASE WHEN state = 0 THEN created_at END), 0) \
            FROM eventbus_outbox";
        let failed = |e| OutboxError::database("reading outbox statistics", e);
        let (pending, published, dead, oldest): (i64, i64, i64, i64) = match self {
            #[cfg(feature = "sqlite")]
            Self::Sqlite(p) => sqlx::query_as(SQL).fetch_one(p).await.map_err(failed)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(p) => sqlx::query_as(SQL).fetch_one(p).await.map_err(failed)?,
        };
        let lag = if pending > 0 && oldest > 0 {
            (crate::now_ms() - oldest).max(0)
        } else {
            0
        };
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(OutboxStats {
            pending: n(pending),
            published: n(published),
            dead: n(dead),
            oldest_pending_ms: n(lag),
        })
    }
}
