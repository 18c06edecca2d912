-- The core platform's copy of every widget: the source of truth behind the Redis hot cache.
CREATE TABLE IF NOT EXISTS widgets (
    widget_key   text        PRIMARY KEY,
    widget_type  text        NOT NULL,
    source       text        NOT NULL,
    data_version bigint      NOT NULL,
    content      jsonb,
    -- A delete keeps the row and its version, so a late older upsert cannot bring it back.
    deleted      boolean     NOT NULL DEFAULT false,
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
