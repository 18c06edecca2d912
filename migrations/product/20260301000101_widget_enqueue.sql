-- Producing widgets from any language: plain SQL functions with the exact rules of the Rust
-- library's `Outbox::enqueue` (runtime/src/event.rs; a test feeds both the same table of events
-- and expects the same verdicts), a wake-up trigger that makes every INSERT wake the worker,
-- and a per-key version counter.
--
-- Errors have SQLSTATE class WK, so a driver sees a typed failure before commit:
--   WK001 key  WK002 type  WK003 version  WK004 content missing  WK005 content too large

-- The size a widget's content is measured by: its compact JSON, the bytes that are relayed
-- (jsonb renders a space after every ':' and ',' outside strings; the worker drops them).
CREATE OR REPLACE FUNCTION widget_content_size(content jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT octet_length(regexp_replace(content::text, '("(?:[^"\\]|\\.)*")|([:,]) ', '\1\2', 'g'))
$$;

CREATE OR REPLACE FUNCTION widget_check(key text, type text, version bigint, content jsonb, is_delete boolean)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    base   text;
    param  text;
    source text;
    name   text;
    size   integer;
BEGIN
    IF key IS NULL OR key = '' THEN
        RAISE EXCEPTION 'widget key is empty' USING ERRCODE = 'WK001';
    END IF;
    IF octet_length(key) > 200 THEN
        RAISE EXCEPTION 'widget key is longer than 200 bytes' USING ERRCODE = 'WK001';
    END IF;
    IF position(':' IN key) > 0 THEN
        base := split_part(key, ':', 1);
        param := substr(key, position(':' IN key) + 1);
    ELSE
        base := key;
    END IF;
    IF position('.' IN base) = 0 THEN
        RAISE EXCEPTION 'widget key must look like <source>.<name>[:<param>] (missing ''.''), got `%`', key
            USING ERRCODE = 'WK001';
    END IF;
    source := split_part(base, '.', 1);
    name := substr(base, position('.' IN base) + 1);
    IF source !~ '^[a-z0-9][a-z0-9-]*$' THEN
        RAISE EXCEPTION 'widget key source part `%` must be [a-z0-9-], starting with a letter or digit', source
            USING ERRCODE = 'WK001';
    END IF;
    IF name !~ '^[a-z0-9][a-z0-9_.-]*$' THEN
        RAISE EXCEPTION 'widget key name part `%` must be [a-z0-9_.-], starting with a letter or digit', name
            USING ERRCODE = 'WK001';
    END IF;
    IF param IS NOT NULL AND param !~ '^[A-Za-z0-9_-]{1,64}$' THEN
        RAISE EXCEPTION 'widget key parameter `%` must be 1-64 characters of [A-Za-z0-9_-]', param
            USING ERRCODE = 'WK001';
    END IF;
    IF type IS NULL OR type !~ '^[a-z0-9_.-]{1,64}$' THEN
        RAISE EXCEPTION 'widget_type must be 1-64 characters of [a-z0-9_.-], got `%`', type
            USING ERRCODE = 'WK002';
    END IF;
    IF version IS NULL OR version <= 0 THEN
        RAISE EXCEPTION 'data_version must be positive, got %', version USING ERRCODE = 'WK003';
    END IF;
    IF NOT is_delete THEN
        IF content IS NULL THEN
            RAISE EXCEPTION 'an upsert needs content' USING ERRCODE = 'WK004';
        END IF;
        -- jsonb text is never shorter than the compact form: measure exactly only near the limit.
        size := octet_length(content::text);
        IF size > 65536 THEN
            size := widget_content_size(content);
            IF size > 65536 THEN
                RAISE EXCEPTION 'content is % bytes, more than the limit of 65536', size
                    USING ERRCODE = 'WK005';
            END IF;
        END IF;
    END IF;
END
$$;

-- Checks an event and queues it in the caller's transaction; returns the outbox row id.
CREATE OR REPLACE FUNCTION widget_queue(key text, type text, version bigint, content jsonb, op text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    id bigint;
BEGIN
    PERFORM widget_check(key, type, version, content, op = 'delete');
    INSERT INTO widget_outbox (widget_key, widget_type, data_version, op, content)
    VALUES (key, type, version, op, content)
    RETURNING widget_outbox.id INTO id;
    RETURN id;
END
$$;

-- Queues an upsert of a widget in the caller's transaction; returns the outbox row id.
CREATE OR REPLACE FUNCTION widget_enqueue(key text, type text, version bigint, content jsonb)
RETURNS bigint LANGUAGE sql AS $$
    SELECT widget_queue(key, type, version, content, 'upsert')
$$;

-- Queues the deletion of a widget (a tombstone at `version`) in the caller's transaction.
CREATE OR REPLACE FUNCTION widget_delete(key text, version bigint, type text DEFAULT 'deleted')
RETURNS bigint LANGUAGE sql AS $$
    SELECT widget_queue(key, type, version, NULL, 'delete')
$$;

-- Versions that cannot go backwards: a per-key counter bumped in the producer's transaction
-- (under the row lock, so concurrent writers of one key get 1, 2, 3, ... in commit order).
-- A timestamp is not a safe version: clocks of producer replicas differ, and now() is taken at
-- transaction start, so a later commit can carry a smaller one and be dropped as stale.
CREATE TABLE IF NOT EXISTS widget_versions (
    widget_key text   PRIMARY KEY,
    version    bigint NOT NULL
);

CREATE OR REPLACE FUNCTION widget_next_version(key text) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO widget_versions AS v (widget_key, version) VALUES (key, 1)
    ON CONFLICT (widget_key) DO UPDATE SET version = v.version + 1
    RETURNING v.version
$$;

-- The wake-up: one notification per INSERT statement (not per row), whoever inserts, so the
-- worker relays at once instead of at its next poll. The channel is the trigger's argument
-- (the outbox table name the worker listens on).
CREATE OR REPLACE FUNCTION widget_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER widget_outbox_wakeup
    AFTER INSERT ON widget_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION widget_outbox_notify('widget_outbox');
