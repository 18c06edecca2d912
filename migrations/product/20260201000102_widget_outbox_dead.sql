-- Rows Redis keeps refusing (larger than its proto-max-bulk-len, ...) are moved here by the
-- outbox-worker with the reason, so they cannot block the rows behind them.
CREATE TABLE IF NOT EXISTS widget_outbox_dead (
    LIKE widget_outbox,
    reason   text        NOT NULL,
    moved_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
