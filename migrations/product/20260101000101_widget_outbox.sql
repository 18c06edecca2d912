-- The transactional outbox of one product service. A producer inserts a row in the same
-- transaction as its own write; the outbox-worker relays rows to the Redis Stream and deletes them.
CREATE TABLE IF NOT EXISTS widget_outbox (
    id           bigserial   PRIMARY KEY,
    widget_key   text        NOT NULL,
    widget_type  text        NOT NULL,
    data_version bigint      NOT NULL CHECK (data_version > 0),
    op           text        NOT NULL CHECK (op IN ('upsert', 'delete')),
    content      jsonb,
    -- clock_timestamp, not now(): ingress lag counts from the insert, not the transaction start.
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK ((op = 'upsert') = (content IS NOT NULL))
);
