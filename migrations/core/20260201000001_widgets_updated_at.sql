-- The cache re-warm walks the table most recently updated first, with a keyset cursor.
CREATE INDEX IF NOT EXISTS widgets_updated_at ON widgets (updated_at, widget_key);
