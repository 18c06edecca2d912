//! Repairing a widget by hand: `widget-runtime widgets show|purge KEY`.
//!
//! A version near `i64::MAX` (a producer that used nanoseconds, or a bug) pins a widget for
//! ever: the version guards let no later write win. `purge` removes the core row and the cache
//! entry, so the producer's next write (any version > 0) is applied again.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::cache::{Cache, Cached, decode_value};

/// What the core database and the cache hold for one key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WidgetReport {
    pub key: String,
    pub database: Option<StoredRow>,
    pub cache: Option<CachedEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct StoredRow {
    pub widget_type: String,
    pub source: String,
    pub data_version: i64,
    pub deleted: bool,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CachedEntry {
    pub version: i64,
    pub tombstone: bool,
    /// Milliseconds until it expires; `None` without an expiry.
    pub ttl_ms: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("core database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

pub async fn show<C: redis::aio::ConnectionLike>(
    pool: &PgPool,
    redis: &mut C,
    cache: &Cache,
    key: &str,
) -> Result<WidgetReport, RepairError> {
    let database: Option<StoredRow> = sqlx::query_as(
        "SELECT widget_type, source, data_version, deleted, updated_at::text AS updated_at
         FROM widgets WHERE widget_key = $1",
    )
    .bind(key)
    .fetch_optional(pool)
    .await?;
    let (raw, ttl): (Option<Vec<u8>>, i64) = redis::pipe()
        .cmd("GET")
        .arg(cache.key(key))
        .cmd("PTTL")
        .arg(cache.key(key))
        .query_async(redis)
        .await?;
    let cache = raw.as_deref().and_then(decode_value).map(|c| {
        let (version, tombstone) = match c {
            Cached::Widget { version, .. } => (version, false),
            Cached::Deleted { version } => (version, true),
        };
        CachedEntry {
            version,
            tombstone,
            ttl_ms: (ttl >= 0).then_some(ttl),
        }
    });
    Ok(WidgetReport {
        key: key.to_string(),
        database,
        cache,
    })
}

/// How long after the first cache delete the second one runs: an API back-fill that read the
/// row just before the database delete (reads are bounded by the API's database timeout) could
/// otherwise write the purged version back for `fallbackTtl`.
pub const SECOND_DELETE_AFTER: Duration = Duration::from_secs(3);

/// Removes the core row and the cache entry of `key`; returns what was there.
pub async fn purge<C: redis::aio::ConnectionLike>(
    pool: &PgPool,
    redis: &mut C,
    cache: &Cache,
    key: &str,
    second_delete_after: Duration,
) -> Result<WidgetReport, RepairError> {
    let before = show(pool, redis, cache, key).await?;
    sqlx::query("DELETE FROM widgets WHERE widget_key = $1")
        .bind(key)
        .execute(pool)
        .await?;
    let () = redis::cmd("DEL")
        .arg(cache.key(key))
        .query_async(redis)
        .await?;
    tokio::time::sleep(second_delete_after).await;
    let () = redis::cmd("DEL")
        .arg(cache.key(key))
        .query_async(redis)
        .await?;
    Ok(before)
}
