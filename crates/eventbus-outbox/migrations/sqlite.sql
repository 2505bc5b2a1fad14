-- eventbus outbox, schema version 1 (SQLite).
CREATE TABLE IF NOT EXISTS eventbus_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT    NOT NULL UNIQUE,
    topic           TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    envelope        TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    state           INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    published_at    INTEGER
);
CREATE INDEX IF NOT EXISTS eventbus_outbox_pending
    ON eventbus_outbox (aggregate_id, id) WHERE state = 0;
-- Pending rows in outbox order: a claim walks these, not every row ever published.
CREATE INDEX IF NOT EXISTS eventbus_outbox_queue
    ON eventbus_outbox (id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS eventbus_outbox_published
    ON eventbus_outbox (published_at) WHERE state = 1;
