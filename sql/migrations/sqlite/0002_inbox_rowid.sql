-- warren 0002: warren_inbox becomes an ordinary (rowid) table with a
-- unique (consumer, message_id) index, instead of a WITHOUT ROWID table.
-- Its rows carry the message body and are large: a WITHOUT ROWID table
-- keeps them in the key's B-tree, where each insert moves large cells
-- around; a rowid table appends them and indexes the key. Same columns,
-- same constraints, same indexes.

CREATE TABLE warren_inbox_0002 (
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
    UNIQUE (consumer, message_id)
);

INSERT INTO warren_inbox_0002 (consumer, message_id, producer, exchange, routing_key, event_type,
    aggregate_type, aggregate_id, aggregate_version, content_type, headers, properties, body,
    status, attempts, duplicates, last_attempt, last_error, first_received_at, processed_at)
SELECT consumer, message_id, producer, exchange, routing_key, event_type,
    aggregate_type, aggregate_id, aggregate_version, content_type, headers, properties, body,
    status, attempts, duplicates, last_attempt, last_error, first_received_at, processed_at
FROM warren_inbox ORDER BY first_received_at;

DROP TABLE warren_inbox;
ALTER TABLE warren_inbox_0002 RENAME TO warren_inbox;

CREATE INDEX warren_inbox_received ON warren_inbox (consumer, first_received_at);
CREATE INDEX warren_inbox_status ON warren_inbox (consumer, status, first_received_at);
CREATE INDEX warren_inbox_type ON warren_inbox (consumer, event_type, first_received_at);
CREATE INDEX warren_inbox_aggregate ON warren_inbox (consumer, aggregate_type, aggregate_id);
-- Retention prunes processed rows by age (poisoned and retrying rows are kept).
CREATE INDEX warren_inbox_prune ON warren_inbox (processed_at) WHERE status = 'processed';
