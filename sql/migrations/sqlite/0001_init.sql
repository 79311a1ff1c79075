-- warren 0001: the outbox and the inbox.
-- Times are UTC text in RFC 3339 with milliseconds, e.g. 2026-11-22T10:00:00.000Z.

CREATE TABLE warren_outbox (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id          TEXT    NOT NULL UNIQUE,
    producer          TEXT    NOT NULL,
    event_type        TEXT    NOT NULL,
    aggregate_type    TEXT,
    aggregate_id      TEXT,
    aggregate_version INTEGER,
    content_type      TEXT    NOT NULL DEFAULT 'application/json',
    headers           TEXT    NOT NULL DEFAULT '{}',
    payload           BLOB    NOT NULL,
    correlation_id    TEXT,
    expiration        TEXT,
    traceparent       TEXT,
    created_at        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    published_at      TEXT
);

-- The relay's work list and the backlog gauges read this small index only.
CREATE INDEX warren_outbox_unpublished ON warren_outbox (seq) WHERE published_at IS NULL;
-- Retention prunes published rows by age.
CREATE INDEX warren_outbox_published_at ON warren_outbox (published_at) WHERE published_at IS NOT NULL;

CREATE TABLE warren_inbox (
    consumer          TEXT    NOT NULL,
    message_id        TEXT    NOT NULL,
    producer          TEXT    NOT NULL DEFAULT '',
    exchange          TEXT    NOT NULL DEFAULT '',
    routing_key       TEXT    NOT NULL DEFAULT '',
    event_type        TEXT    NOT NULL DEFAULT '',
    aggregate_type    TEXT,
    aggregate_id      TEXT,
    aggregate_version INTEGER,
    content_type      TEXT    NOT NULL DEFAULT '',
    headers           TEXT    NOT NULL DEFAULT '{}',
    -- the AMQP properties without a column of their own, as received: a
    -- JSON object with the contract's "delivery as JSON" names
    -- (correlationId, timestamp, ...; empty ones left out), so that
    -- `warren inbox show` prints the delivery whole
    properties        TEXT    NOT NULL DEFAULT '{}',
    body              BLOB,
    status            TEXT    NOT NULL CHECK (status IN ('processed', 'retrying', 'poisoned')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    duplicates        INTEGER NOT NULL DEFAULT 0,
    -- the attempt number of the latest handler run started on a redelivery
    -- or failed, as the delivery counts attempts; 0 again once poisoned (a
    -- redriven message starts over). A redelivery counts from it, so runs
    -- the process died in, or whose retry could not be published, count.
    last_attempt      INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT,
    first_received_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    processed_at      TEXT,
    PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;

CREATE INDEX warren_inbox_received ON warren_inbox (consumer, first_received_at);
CREATE INDEX warren_inbox_status ON warren_inbox (consumer, status, first_received_at);
CREATE INDEX warren_inbox_type ON warren_inbox (consumer, event_type, first_received_at);
CREATE INDEX warren_inbox_aggregate ON warren_inbox (consumer, aggregate_type, aggregate_id);
-- Retention prunes processed rows by age (poisoned and retrying rows are kept).
CREATE INDEX warren_inbox_prune ON warren_inbox (processed_at) WHERE status = 'processed';
