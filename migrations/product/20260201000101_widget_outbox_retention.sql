-- Relayed rows are kept until the core side confirms it applied them (published_at is set
-- when a row is relayed; the row is deleted on confirmation), so that they can be relayed
-- again when Redis loses the stream. relay_epoch names the stream epoch a row was relayed
-- under: rows relayed under an epoch that is gone are published again.
ALTER TABLE widget_outbox
    ADD COLUMN IF NOT EXISTS published_at timestamptz,
    ADD COLUMN IF NOT EXISTS relay_epoch  text;

-- The worker claims unpublished rows in id order; retained rows must not slow that down.
CREATE INDEX IF NOT EXISTS widget_outbox_unpublished ON widget_outbox (id) WHERE published_at IS NULL;
