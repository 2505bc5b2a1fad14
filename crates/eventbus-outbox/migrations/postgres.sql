-- eventbus outbox, schema version 1 (PostgreSQL).
CREATE TABLE IF NOT EXISTS eventbus_outbox (
    id              BIGSERIAL PRIMARY KEY,
    event_id        TEXT   NOT NULL UNIQUE,
    topic           TEXT   NOT NULL,
    aggregate_id    TEXT   NOT NULL,
    envelope        TEXT   NOT NULL,
    created_at      BIGINT NOT NULL,
    state           BIGINT NOT NULL DEFAULT 0,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    published_at    BIGINT
);
CREATE INDEX IF NOT EXISTS eventbus_outbox_pending
    ON eventbus_outbox (aggregate_id, id) WHERE state = 0;
-- Pending rows in outbox order: a claim walks these, not every row ever published.
CREATE INDEX IF NOT EXISTS eventbus_outbox_queue
    ON eventbus_outbox (id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS eventbus_outbox_published
    ON eventbus_outbox (published_at) WHERE state = 1;
CREATE OR REPLACE FUNCTION eventbus_outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('eventbus_outbox', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS eventbus_outbox_inserted ON eventbus_outbox;
CREATE TRIGGER eventbus_outbox_inserted AFTER INSERT ON eventbus_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION eventbus_outbox_notify();
