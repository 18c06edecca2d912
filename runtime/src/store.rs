//! The core database: the `widgets` table behind the hot cache.

use std::collections::HashMap;
use std::sync::LazyLock;

use sqlx::PgPool;
use sqlx::migrate::Migrator;

use crate::event::Op;

/// The `widgets` table. Core and product migrations may share one database (the `dev`
/// command does), so each set ignores the other's applied versions.
pub static CORE_MIGRATIONS: LazyLock<Migrator> = LazyLock::new(|| {
    let mut m = sqlx::migrate!("../migrations/core");
    m.set_ignore_missing(true);
    m
});

/// The outbox table of a product database.
pub static PRODUCT_MIGRATIONS: LazyLock<Migrator> = LazyLock::new(|| {
    let mut m = sqlx::migrate!("../migrations/product");
    m.set_ignore_missing(true);
    m
});

/// Runs a migration set. Safe with several replicas starting at once: sqlx serializes them
/// with an advisory lock and applied versions are skipped.
pub async fn migrate(
    migrator: &Migrator,
    pool: &PgPool,
) -> Result<(), sqlx::migrate::MigrateError> {
    use sqlx::Connection;
    // A migration (an index build on a large table) may run far longer than the pool's
    // statement deadline: it runs on a connection of its own without one, closed afterwards
    // so the lifted limits never reach ordinary work.
    let mut conn = pool.acquire().await?.detach();
    sqlx::raw_sql("SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0")
        .execute(&mut conn)
        .await?;
    // `run_direct` is what `run` calls; `run(&mut conn)` makes callers' futures not `Send`
    // (sqlx's "`Acquire` is not general enough", which this function exists to avoid).
    let result = migrator.run_direct(None, &mut conn, false).await;
    let _ = conn.close().await;
    result
}

/// One change to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub widget_key: String,
    pub widget_type: String,
    pub source: String,
    pub data_version: i64,
    pub op: Op,
    /// JSON text; `None` for deletes.
    pub content: Option<String>,
}

impl Change {
    /// The widget object the cache holds for this change; `None` for a delete.
    pub fn widget_json(&self) -> Option<Vec<u8>> {
        self.content.as_ref().map(|content| {
            crate::cache::widget_json(
                &self.widget_key,
                &self.widget_type,
                self.data_version,
                content.as_bytes(),
            )
        })
    }
}

/// A change that won the version guard and is now the stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub widget_key: String,
    pub data_version: i64,
}

/// Applies changes with one version-guarded UPSERT. Only a newer version replaces a row; a
/// delete keeps a tombstone with its version. Returns the changes that won; the others were
/// stale (an equal or newer version is already stored, or a newer one is in the same batch).
pub async fn apply_batch(pool: &PgPool, changes: &[Change]) -> Result<Vec<Applied>, sqlx::Error> {
    // ON CONFLICT cannot touch one row twice in a statement: keep the newest change per key.
    let mut newest: HashMap<&str, &Change> = HashMap::with_capacity(changes.len());
    for c in changes {
        match newest.get(c.widget_key.as_str()) {
            Some(prev) if prev.data_version >= c.data_version => {}
            _ => {
                newest.insert(&c.widget_key, c);
            }
        }
    }
    let n = newest.len();
    let (mut keys, mut types, mut sources) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut versions, mut deleted, mut contents) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    // Rows are upserted in key order, so two concurrent batches that share keys lock them in the
    // same order and cannot deadlock each other (ingester replicas on overlapping batches).
    let mut ordered: Vec<&Change> = newest.into_values().collect();
    ordered.sort_unstable_by(|a, b| a.widget_key.cmp(&b.widget_key));
    for c in ordered {
        keys.push(c.widget_key.as_str());
        types.push(c.widget_type.as_str());
        sources.push(c.source.as_str());
        versions.push(c.data_version);
        deleted.push(c.op == Op::Delete);
        contents.push(c.content.as_deref());
    }
    let rows: Vec<(String, i64)> = sqlx::query_as(
        r#"
        INSERT INTO widgets AS w (widget_key, widget_type, source, data_version, deleted, content)
        SELECT k, t, s, v, d, c::jsonb
        FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bool[], $6::text[])
             AS u(k, t, s, v, d, c)
        ON CONFLICT (widget_key) DO UPDATE
           SET widget_type  = EXCLUDED.widget_type,
               source       = EXCLUDED.source,
               data_version = EXCLUDED.data_version,
               deleted      = EXCLUDED.deleted,
               content      = EXCLUDED.content,
               updated_at   = clock_timestamp()
         WHERE w.data_version < EXCLUDED.data_version
        RETURNING widget_key, data_version
        "#,
    )
    .bind(&keys)
    .bind(&types)
    .bind(&sources)
    .bind(&versions)
    .bind(&deleted)
    .bind(&contents)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(widget_key, data_version)| Applied {
            widget_key,
            data_version,
        })
        .collect())
}

/// Postgres renders `jsonb` as text with a space after every `:` and `,` (`{"a": 1, "b": [1, 2]}`).
/// This removes exactly those spaces, outside strings, so what is relayed, cached and served is
/// the compact JSON a producer's size limit was measured on (a 58,881-byte widget is 68,280 bytes
/// as jsonb text). Numbers and strings are kept byte for byte, which a parse and re-serialize
/// (serde_json's `f64` numbers) would not do. Text that is not jsonb output only loses the
/// whitespace between tokens, so it stays the same JSON.
pub fn compact_jsonb_text(text: String) -> String {
    if !text.contains(": ") && !text.contains(", ") {
        return text;
    }
    // Byte by byte: only ASCII whitespace outside strings is dropped, so the rest stays valid
    // UTF-8 (a multi-byte character never contains an ASCII byte).
    let mut out = Vec::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in text.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
            out.push(b);
        } else if !b.is_ascii_whitespace() {
            out.push(b);
        }
    }
    String::from_utf8(out).unwrap_or(text)
}

/// The stored version of each key that has a row (tombstones included).
pub async fn fetch_versions(
    pool: &PgPool,
    keys: &[&str],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT widget_key, data_version FROM widgets WHERE widget_key = ANY($1::text[])",
    )
    .bind(keys)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// A stored widget as the API needs it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredWidget {
    pub widget_key: String,
    pub widget_type: String,
    pub data_version: i64,
    pub deleted: bool,
    /// JSON text; `None` for tombstones.
    pub content: Option<String>,
}

/// Reads many widgets (tombstones included) in one query.
pub async fn fetch_many(pool: &PgPool, keys: &[&str]) -> Result<Vec<StoredWidget>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut rows: Vec<StoredWidget> = sqlx::query_as(
        "SELECT widget_key, widget_type, data_version, deleted, content::text AS content
         FROM widgets WHERE widget_key = ANY($1::text[])",
    )
    .bind(keys)
    .fetch_all(pool)
    .await?;
    for row in &mut rows {
        row.content = row.content.take().map(compact_jsonb_text);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::compact_jsonb_text;

    #[test]
    fn jsonb_text_is_made_compact_without_touching_strings_or_numbers() {
        let c = |s: &str| compact_jsonb_text(s.to_string());
        assert_eq!(
            c(r#"{"a": 1, "b": [1.50, 2e3, -0], "c": {"d": null}}"#),
            r#"{"a":1,"b":[1.50,2e3,-0],"c":{"d":null}}"#
        );
        // Separators inside strings, escaped quotes and backslashes stay as they are.
        assert_eq!(
            c(r#"{"t": "a, b: c", "q": "say \"x: y\", ok", "s": "\\", "u": "é, ü"}"#),
            r#"{"t":"a, b: c","q":"say \"x: y\", ok","s":"\\","u":"é, ü"}"#
        );
        assert_eq!(c(r#"[]"#), "[]");
        assert_eq!(c(r#""x, y""#), r#""x, y""#);
        for text in [
            r#"{"a": [1, {"b": "c: d"}], "e": "\", "}"#,
            r#"{"k": "\\\"", "n": 12345678901234567890.5}"#,
        ] {
            let before: serde_json::Value = serde_json::from_str(text).expect("json");
            let after: serde_json::Value = serde_json::from_str(&c(text)).expect("still json");
            assert_eq!(before, after, "{text}");
        }
    }
}
