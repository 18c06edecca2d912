//! Cache re-warm: after Redis comes back empty (or from an older snapshot), the hot cache is
//! filled again from the core `widgets` table, so the API's misses do not all land on Postgres
//! at once and no key keeps serving an older version than Postgres holds.
//!
//! Every ingester checks the stream epoch (see [`crate::durability`]) every few seconds. When
//! the epoch the cache was last warmed for (`<stream>.warm.done`) is not the current one, the
//! replica that takes the lock (`<stream>.warm.lock`, `SET NX PX`, renewed per batch) walks the
//! table most recently updated first with a keyset cursor, and writes each page through the
//! cache's version-guarded script with the ingest TTL at `cache.warmRate` widgets per second.
//! The guard means a newer value written meanwhile (by the ingester) is never replaced, and a
//! stale value from an older snapshot always is. The cursor is kept in Redis
//! (`<stream>.warm.cursor`), so another replica resumes where a stopped one left off.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use redis::Script;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::cache::{self, Cache, CacheWrite};
use crate::config::Config;
use crate::connect::{self, Conn, Deadline};
use crate::durability;
use crate::stats::{self, Stats};

#[derive(Debug, Clone)]
pub struct WarmSettings {
    /// Widgets written per second; 0 turns the re-warm off.
    pub rate: u32,
    /// Rows read per page.
    pub page: usize,
    pub key_prefix: String,
    pub ttl: Duration,
    pub done_key: String,
    pub lock_key: String,
    pub cursor_key: String,
    /// How often the epoch is checked while no re-warm is due.
    pub check_interval: Duration,
    pub lock_ttl: Duration,
    /// Client-side deadline of every database statement (`database.statementTimeout`).
    pub db_deadline: Duration,
}

impl WarmSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            rate: config.cache.warm_rate,
            // At most about a second's worth per page, so the lock (renewed per page) never
            // lapses during the rate bound's sleep, even at a low rate.
            page: (config.cache.warm_rate as usize).clamp(1, 500),
            key_prefix: config.key_prefix(),
            ttl: config.cache.ingest_ttl,
            done_key: config.warm_key("done"),
            lock_key: config.warm_key("lock"),
            cursor_key: config.warm_key("cursor"),
            check_interval: Duration::from_secs(2),
            lock_ttl: Duration::from_secs(15),
            db_deadline: config.database.statement_timeout,
        }
    }
}

#[derive(Clone)]
pub struct WarmMetrics {
    written: Counter,
    active: Gauge,
    completed: Counter,
}

impl WarmMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            written: Counter::default(),
            active: Gauge::default(),
            completed: Counter::default(),
        };
        registry.register(
            "widget_cache_warm_written",
            "Widgets written to the cache by re-warms from Postgres",
            m.written.clone(),
        );
        registry.register(
            "widget_cache_warm_active",
            "1 while this replica re-warms the cache",
            m.active.clone(),
        );
        registry.register(
            "widget_cache_warms_completed",
            "Re-warms this replica finished",
            m.completed.clone(),
        );
        m
    }
}

#[derive(Debug, thiserror::Error)]
enum WarmError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("core database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Renews the lock only while this replica still holds it. KEYS[1] lock, ARGV[1] owner,
/// ARGV[2] TTL ms; ARGV[3] = '1' deletes it instead (release).
static LOCK_KEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"#,
    )
});

/// A row of the widgets table as the re-warm reads it.
type Row = (String, String, i64, bool, Option<String>, String);

/// What one ingester replica needs to re-warm.
pub struct Warmer {
    pub settings: WarmSettings,
    pub epoch_key: String,
    pub stream: String,
    pub group: String,
    /// This replica's lock value (its consumer name).
    pub owner: String,
    pub client: connect::Redis,
    pub pool: PgPool,
    pub metrics: WarmMetrics,
    pub stats: Arc<Stats>,
}

impl Warmer {
    pub async fn run(self, cancel: CancellationToken) {
        if self.settings.rate == 0 {
            tracing::info!("cache re-warm is off (cache.warmRate: 0)");
            return;
        }
        let mut conn: Option<Conn> = None;
        let mut epoch: Option<String> = None;
        let mut failures = 0u32;
        while !cancel.is_cancelled() {
            let pause = match self.step(&mut conn, &mut epoch, &cancel).await {
                Ok(()) => {
                    failures = 0;
                    self.settings.check_interval
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(error = %e, failures, "cache re-warm step failed; retrying");
                    }
                    crate::retry::backoff(
                        failures,
                        Duration::from_millis(200),
                        Duration::from_secs(5),
                    )
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        self.set_active(false);
    }

    async fn step(
        &self,
        conn: &mut Option<Conn>,
        epoch: &mut Option<String>,
        cancel: &CancellationToken,
    ) -> Result<(), WarmError> {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(self.client.manager().await?),
        };
        let current = self.epoch(c, epoch.as_deref()).await?;
        *epoch = Some(current.clone());
        let done: Option<String> = redis::cmd("GET")
            .arg(&self.settings.done_key)
            .query_async(c)
            .await?;
        if done.as_deref() == Some(current.as_str()) {
            return Ok(());
        }
        let locked: Option<String> = redis::cmd("SET")
            .arg(&self.settings.lock_key)
            .arg(&self.owner)
            .arg("NX")
            .arg("PX")
            .arg(self.settings.lock_ttl.as_millis() as u64)
            .query_async(c)
            .await?;
        if locked.is_none() {
            return Ok(()); // another replica is warming
        }
        let result = self.warm(c, &current, cancel).await;
        self.set_active(false);
        let _: redis::RedisResult<i64> = LOCK_KEEP
            .key(&self.settings.lock_key)
            .arg(&self.owner)
            .arg(0)
            .arg("1")
            .invoke_async(c)
            .await;
        result
    }

    async fn epoch(&self, c: &mut Conn, known: Option<&str>) -> Result<String, WarmError> {
        let e =
            durability::ensure_epoch(c, &self.epoch_key, &self.stream, &self.group, known).await?;
        Ok(e.id)
    }

    fn set_active(&self, on: bool) {
        self.metrics.active.set(i64::from(on));
        self.stats
            .set_gauge(stats::field::WARM_ACTIVE.into(), i64::from(on));
    }

    /// Warms the cache for `epoch`; stops early (to start over) when the epoch changes, the
    /// lock is lost or `cancel` fires.
    async fn warm(
        &self,
        c: &mut Conn,
        epoch: &str,
        cancel: &CancellationToken,
    ) -> Result<(), WarmError> {
        let s = &self.settings;
        let saved: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&s.cursor_key)
            .query_async(c)
            .await?;
        let mut after: Option<(String, String)> = match (
            saved.get("epoch"),
            saved.get("updated_at"),
            saved.get("key"),
        ) {
            (Some(e), Some(at), Some(key)) if e == epoch => Some((at.clone(), key.clone())),
            _ => None,
        };
        self.set_active(true);
        tracing::info!(
            epoch,
            rate = s.rate,
            resumed = after.is_some(),
            "re-warming the hot cache from Postgres, most recently updated first"
        );
        let cache = Cache::new(s.key_prefix.clone());
        let started = Instant::now();
        let mut last_epoch_check = Instant::now();
        let mut written = 0u64;
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let rows = page(&self.pool, after.as_ref(), s.page)
                .deadline(s.db_deadline)
                .await?;
            let mut rows = rows;
            for row in &mut rows {
                row.4 = row.4.take().map(crate::store::compact_jsonb_text);
            }
            let Some(last) = rows.last() else { break };
            after = Some((last.5.clone(), last.0.clone()));
            let jsons: Vec<Option<Vec<u8>>> = rows
                .iter()
                .map(
                    |(key, kind, version, deleted, content, _)| match (deleted, content) {
                        (false, Some(c)) => {
                            Some(cache::widget_json(key, kind, *version, c.as_bytes()))
                        }
                        _ => None,
                    },
                )
                .collect();
            let writes: Vec<CacheWrite<'_>> = rows
                .iter()
                .zip(&jsons)
                .map(|(row, json)| CacheWrite {
                    widget_key: &row.0,
                    version: row.2,
                    json: json.as_deref(),
                    ttl: s.ttl,
                })
                .collect();
            for chunk in cache::write_chunks(&writes) {
                cache.write_many(c, &writes[chunk]).await?;
            }
            written += rows.len() as u64;
            self.metrics.written.inc_by(rows.len() as u64);
            self.stats
                .add(stats::field::WARM_WRITTEN, rows.len() as u64);
            if let Some((at, key)) = &after {
                let _: () = redis::cmd("HSET")
                    .arg(&s.cursor_key)
                    .arg("epoch")
                    .arg(epoch)
                    .arg("updated_at")
                    .arg(at)
                    .arg("key")
                    .arg(key)
                    .query_async(c)
                    .await?;
            }
            let held: i64 = LOCK_KEEP
                .key(&s.lock_key)
                .arg(&self.owner)
                .arg(s.lock_ttl.as_millis() as u64)
                .arg("0")
                .invoke_async(c)
                .await?;
            if held == 0 {
                tracing::warn!("re-warm lock lost; another replica continues from the cursor");
                return Ok(());
            }
            if last_epoch_check.elapsed() >= Duration::from_secs(1) {
                last_epoch_check = Instant::now();
                if self.epoch(c, Some(epoch)).await? != epoch {
                    tracing::warn!("stream epoch changed during the re-warm; starting over");
                    return Ok(());
                }
            }
            if rows.len() < s.page {
                break;
            }
            // Rate bound: never ahead of `rate` widgets per second since the start.
            let due = Duration::from_secs_f64(written as f64 / f64::from(s.rate));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        let _: () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(&s.done_key)
            .arg(epoch)
            .ignore()
            .cmd("DEL")
            .arg(&s.cursor_key)
            .ignore()
            .query_async(c)
            .await?;
        self.metrics.completed.inc();
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            epoch,
            widgets = written,
            seconds = format!("{secs:.1}"),
            "hot cache re-warmed"
        );
        Ok(())
    }
}

/// One page of the widgets table, most recently updated first, after the keyset cursor.
async fn page(
    pool: &PgPool,
    after: Option<&(String, String)>,
    limit: usize,
) -> Result<Vec<Row>, sqlx::Error> {
    const COLUMNS: &str =
        "widget_key, widget_type, data_version, deleted, content::text, updated_at::text";
    let limit = limit as i64;
    match after {
        None => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM widgets
                 ORDER BY updated_at DESC, widget_key DESC LIMIT $1"
            )))
            .bind(limit)
            .fetch_all(pool)
            .await
        }
        Some((at, key)) => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM widgets
                 WHERE (updated_at, widget_key) < ($1::timestamptz, $2)
                 ORDER BY updated_at DESC, widget_key DESC LIMIT $3"
            )))
            .bind(at)
            .bind(key)
            .bind(limit)
            .fetch_all(pool)
            .await
        }
    }
}
