//! The outbox-worker: relays one product source's outbox rows to the pipeline's Redis Stream.
//!
//! One relay step: check the stream epoch (replaying rows relayed under an epoch Redis lost,
//! see [`crate::durability`]), claim up to `batchSize` unpublished rows (`FOR UPDATE SKIP
//! LOCKED`, id order), XADD them, then mark them published (with the epoch) in the same
//! transaction. Any failure rolls the claim back, so rows are published at least once and never
//! lost; a crash between XADD and commit publishes them again (the ingester's version guard
//! makes that harmless). Several workers may run per source: SKIP LOCKED hands each a
//! different batch. No `id > last_id` cursor is kept, because a sequence value can commit after
//! a larger one.
//!
//! Published rows stay in the outbox until the ingester confirms them (deleted in bulk by
//! [`confirm_loop`]) or pass the source's retention cap ([`sweep_loop`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::admin::Readiness;
use crate::config::{Config, SourceConfig, quote_identifier};
use crate::connect::{self, Conn, Deadline};
use crate::durability::{self, Epoch};
use crate::event::Op;
use crate::retry;
use crate::stats::{self, Stats};
use crate::stream::StreamEvent;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("source `{0}` is not in the config's `sources` (known: {1})")]
    UnknownSource(String, String),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("outbox database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Everything one worker needs from the pipeline config.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub source: SourceConfig,
    pub stream: String,
    pub consumer_group: String,
    pub max_length: u64,
    pub stats_key: String,
    pub stats_interval: Duration,
    /// How often the backlog gauges are refreshed and the retention cap applied.
    pub backlog_interval: Duration,
    pub epoch_key: String,
    /// This source's confirmation set.
    pub confirmed_key: String,
    /// How often confirmations are turned into deletes.
    pub confirm_interval: Duration,
    /// Client-side deadline of every database statement (`database.statementTimeout`).
    pub db_deadline: Duration,
    /// Ignore the lag `XINFO GROUPS` reports, as if Redis were older than 7.0 (tests).
    pub ignore_lag: bool,
}

impl WorkerSettings {
    pub fn from_config(config: &Config, source: &str) -> Result<Self, WorkerError> {
        let src = config.source(source).cloned().ok_or_else(|| {
            let known: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
            WorkerError::UnknownSource(source.into(), known.join(", "))
        })?;
        Ok(Self {
            source: src,
            stream: config.stream_name(),
            consumer_group: config.stream.consumer_group.clone(),
            max_length: config.stream.max_length,
            stats_key: config.stats_key(),
            stats_interval: stats::FLUSH_INTERVAL,
            backlog_interval: Duration::from_secs(2),
            epoch_key: config.epoch_key(),
            confirmed_key: config.confirmed_key(source),
            confirm_interval: Duration::from_millis(250),
            db_deadline: config.database.statement_timeout,
            ignore_lag: false,
        })
    }

    /// Relaying pauses while the group's unread + pending entries are at or above this.
    pub fn backpressure_limit(&self) -> u64 {
        self.max_length
            .saturating_sub(u64::from(self.source.batch_size))
            .max(self.max_length / 2)
    }
}

#[derive(Clone)]
struct WorkerMetrics {
    backlog: Gauge,
    published: Counter,
    errors: Family<Vec<(String, String)>, Counter>,
    batch_seconds: Histogram,
    backpressure: Gauge,
    retained: Gauge,
    confirmed: Counter,
    replayed: Counter,
    loss_detected: Counter,
    retention_expired: Counter,
    retention_capped: Gauge,
    eviction_unsafe: Gauge,
    moved_aside: Counter,
}

impl WorkerMetrics {
    fn register(registry: &mut Registry, source: &str) -> Self {
        let m = Self {
            backlog: Gauge::default(),
            published: Counter::default(),
            errors: Family::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            backpressure: Gauge::default(),
            retained: Gauge::default(),
            confirmed: Counter::default(),
            replayed: Counter::default(),
            loss_detected: Counter::default(),
            retention_expired: Counter::default(),
            retention_capped: Gauge::default(),
            eviction_unsafe: Gauge::default(),
            moved_aside: Counter::default(),
        };
        let r = registry.sub_registry_with_label(("source".into(), source.to_string().into()));
        r.register(
            "widget_outbox_redis_eviction_unsafe",
            "1 when Redis' maxmemory-policy may evict the stream (allkeys-*)",
            m.eviction_unsafe.clone(),
        );
        r.register(
            "widget_outbox_moved_aside",
            "Rows Redis kept refusing (too large, ...), moved to <outboxTable>_dead with the reason",
            m.moved_aside.clone(),
        );
        r.register(
            "widget_outbox_retained",
            "Relayed rows kept until the core side confirms them",
            m.retained.clone(),
        );
        r.register(
            "widget_outbox_confirmed",
            "Relayed rows deleted after the core side confirmed them",
            m.confirmed.clone(),
        );
        r.register(
            "widget_outbox_replayed",
            "Rows published again because Redis lost the epoch they were relayed under",
            m.replayed.clone(),
        );
        r.register(
            "widget_outbox_redis_loss_detected",
            "Times this worker found the stream epoch changed (Redis lost data or restarted)",
            m.loss_detected.clone(),
        );
        r.register(
            "widget_outbox_retention_expired",
            "Relayed rows deleted unconfirmed because they passed retention or maxRetainedRows",
            m.retention_expired.clone(),
        );
        r.register(
            "widget_outbox_retention_capped",
            "1 while the retention cap is deleting unconfirmed rows",
            m.retention_capped.clone(),
        );
        r.register(
            "widget_outbox_backlog",
            "Unpublished rows in the outbox table",
            m.backlog.clone(),
        );
        r.register(
            "widget_outbox_published",
            "Events added to the stream",
            m.published.clone(),
        );
        r.register(
            "widget_outbox_relay_errors",
            "Relay attempts that failed, by store",
            m.errors.clone(),
        );
        r.register(
            "widget_outbox_batch_duration_seconds",
            "Time to claim, publish and delete one batch",
            m.batch_seconds.clone(),
        );
        r.register(
            "widget_outbox_backpressure",
            "1 while relaying is paused because the consumer group is too far behind",
            m.backpressure.clone(),
        );
        m
    }
}

/// What one relay step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    Published(usize),
    Empty,
    BackPressure { unread: u64 },
}

struct OutboxRow {
    id: i64,
    widget_key: String,
    widget_type: String,
    data_version: i64,
    op: String,
    content: Option<String>,
    produced_at_us: i64,
}

pub struct OutboxWorker {
    settings: WorkerSettings,
    redis: connect::Redis,
    pool: PgPool,
    metrics: WorkerMetrics,
    readiness: Readiness,
    stats: Arc<Stats>,
    wake: Arc<Notify>,
    /// The epoch the rows this worker relays are stamped with; `None` until checked.
    epoch: std::sync::Mutex<Option<String>>,
    /// How often Redis refused a row while answering everything else (by outbox id).
    refusals: std::sync::Mutex<std::collections::HashMap<i64, u32>>,
    dead_table: String,
    create_dead_sql: String,
    move_dead_sql: String,
    claim_sql: String,
    publish_sql: String,
    replay_sql: String,
}

impl OutboxWorker {
    pub fn new(
        settings: WorkerSettings,
        redis: impl Into<connect::Redis>,
        pool: PgPool,
        registry: &mut Registry,
        readiness: Readiness,
    ) -> Self {
        let metrics = WorkerMetrics::register(registry, &settings.source.name);
        // A validated identifier (config::check_identifier), quoted for reserved words.
        let table = quote_identifier(&settings.source.outbox_table);
        // Claim ids first, then read the rows: without fresh statistics (a just-filled outbox)
        // the planner may sort every unpublished row instead of walking the partial index, and
        // that must not mean rendering every row's content (measured: 127 ms for a 500-row
        // claim out of 20k rows, 13 ms in this form).
        let claim_sql = format!(
            "WITH claimed AS (
                 SELECT id FROM {table} WHERE published_at IS NULL
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             SELECT o.id, o.widget_key, o.widget_type, o.data_version, o.op,
                    o.content::text AS content,
                    (extract(epoch FROM o.created_at) * 1000000)::bigint AS produced_at_us
             FROM {table} AS o JOIN claimed USING (id) ORDER BY o.id"
        );
        let publish_sql = format!(
            "UPDATE {table} SET published_at = clock_timestamp(), relay_epoch = $2
             WHERE id = ANY($1::bigint[])"
        );
        let replay_sql = replay_sql(&table, "published_at IS NOT NULL");
        // Rows Redis refuses go aside to `<table>_dead` (created by `migrate product` for the
        // default table, here for any other), with the reason and the time.
        let dead_table = format!("{}_dead", settings.source.outbox_table);
        let dead = quote_identifier(&dead_table);
        let create_dead_sql = format!(
            "CREATE TABLE IF NOT EXISTS {dead} (LIKE {table}, reason text NOT NULL,
                 moved_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        );
        let move_dead_sql = format!(
            "WITH gone AS (DELETE FROM {table} WHERE id = $1 RETURNING *)
             INSERT INTO {dead} SELECT gone.*, $2 FROM gone"
        );
        readiness.fail("redis", "not connected yet");
        readiness.fail("database", "not connected yet");
        Self {
            settings,
            redis: redis.into(),
            pool,
            metrics,
            readiness,
            stats: Arc::new(Stats::new()),
            wake: Arc::new(Notify::new()),
            epoch: std::sync::Mutex::new(None),
            refusals: std::sync::Mutex::new(std::collections::HashMap::new()),
            create_dead_sql,
            move_dead_sql,
            dead_table,
            claim_sql,
            publish_sql,
            replay_sql,
        }
    }

    /// Relays until `cancel` fires. The batch in flight when it fires is finished or rolled back.
    /// Store outages are waited out with backoff; only cancellation ends the loop.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), WorkerError> {
        let name = self.settings.source.name.clone();
        tracing::info!(source = %name, stream = %self.settings.stream, "outbox-worker started");
        let tasks = [
            tokio::spawn(listen_for_wakeups(
                self.pool.clone(),
                self.settings.source.outbox_table.clone(),
                self.settings.db_deadline,
                self.wake.clone(),
                cancel.clone(),
            )),
            tokio::spawn(sweep_loop(
                self.pool.clone(),
                self.redis.clone(),
                self.settings.clone(),
                self.metrics.clone(),
                self.stats.clone(),
                cancel.clone(),
            )),
            tokio::spawn(confirm_loop(
                self.pool.clone(),
                self.redis.clone(),
                self.settings.clone(),
                self.metrics.clone(),
                cancel.clone(),
            )),
            tokio::spawn(durability::watch_settings(
                self.redis.clone(),
                self.settings.stream.clone(),
                self.metrics.eviction_unsafe.clone(),
                self.stats.clone(),
                durability::SETTINGS_INTERVAL,
                cancel.clone(),
            )),
            tokio::spawn({
                let (stats, client, cancel) =
                    (self.stats.clone(), self.redis.clone(), cancel.clone());
                let (key, interval) = (
                    self.settings.stats_key.clone(),
                    self.settings.stats_interval,
                );
                async move {
                    stats
                        .flush_until_cancelled(client, key, interval, cancel)
                        .await
                }
            }),
        ];
        let mut conn: Option<Conn> = None;
        let mut failures: u32 = 0;
        while !cancel.is_cancelled() {
            let started = Instant::now();
            let outcome = self.relay_once(&mut conn).await;
            let pause = match outcome {
                Ok(Relayed::Published(n)) => {
                    failures = 0;
                    self.metrics
                        .batch_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.backpressure.set(0);
                    if n >= self.settings.source.batch_size as usize {
                        continue; // a full batch: more rows are likely waiting
                    }
                    Some(self.settings.source.poll_interval)
                }
                Ok(Relayed::Empty) => {
                    failures = 0;
                    self.metrics.backpressure.set(0);
                    Some(self.settings.source.poll_interval)
                }
                Ok(Relayed::BackPressure { unread }) => {
                    failures = 0;
                    if self.metrics.backpressure.set(1) == 0 {
                        tracing::warn!(source = %name, unread, limit = self.settings.backpressure_limit(),
                            "consumer group is behind; relaying paused, rows wait in the outbox");
                    }
                    // New rows do not help here: wait the poll interval, not for a wake-up.
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(self.settings.source.poll_interval.max(Duration::from_millis(200))) => {}
                    }
                    None
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let kind = match &e {
                        WorkerError::Redis(_) => "redis",
                        _ => "database",
                    };
                    self.metrics
                        .errors
                        .get_or_create(&vec![("store".into(), kind.into())])
                        .inc();
                    if failures == 1 || failures.is_multiple_of(20) {
                        if lacks_retention_columns(&e) {
                            tracing::error!(source = %name, table = %self.settings.source.outbox_table, error = %e,
                                "the outbox table lacks the retention columns (published_at, relay_epoch): \
                                 run `widget-runtime migrate product` or apply migrations/product to it");
                        }
                        tracing::warn!(source = %name, error = %e, failures, "relay failed; rows stay in the outbox, retrying");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(backoff(failures)) => {}
                    }
                    None
                }
            };
            if let Some(poll) = pause {
                // NOTIFY wakes us early; the poll is the guarantee (notifications can be lost).
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        tracing::info!(source = %name, "outbox-worker stopped");
        Ok(())
    }

    /// One relay step: epoch check (and replay), back-pressure check, claim, XADD, mark.
    pub async fn relay_once(&self, conn: &mut Option<Conn>) -> Result<Relayed, WorkerError> {
        let redis = match conn {
            Some(c) => c,
            None => match self.redis.manager().await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    self.readiness.fail("redis", e.to_string());
                    return Err(e.into());
                }
            },
        };
        let known = self.known_epoch();
        let s = &self.settings;
        let epoch = match durability::ensure_epoch(
            redis,
            &s.epoch_key,
            &s.stream,
            &s.consumer_group,
            known.as_deref(),
        )
        .await
        {
            Ok(e) => e,
            Err(e) => {
                self.readiness.fail("redis", e.to_string());
                return Err(e.into());
            }
        };
        if known.as_deref() != Some(epoch.id.as_str()) {
            self.adopt_epoch(&epoch).await?;
        }
        let unread = match self.guard_stream_length(redis).await {
            Ok(u) => u,
            Err(e) => {
                self.readiness.fail("redis", e.to_string());
                return Err(e.into());
            }
        };
        self.readiness.pass("redis");
        if unread >= self.settings.backpressure_limit() {
            return Ok(Relayed::BackPressure { unread });
        }

        let d = self.settings.db_deadline;
        let mut tx = self
            .pool
            .begin()
            .deadline(d)
            .await
            .inspect_err(|e| self.db_down(e))?;
        let rows: Vec<OutboxRow> = sqlx::query_as::<
            _,
            (i64, String, String, i64, String, Option<String>, i64),
        >(sqlx::AssertSqlSafe(self.claim_sql.as_str()))
        .bind(i64::from(self.settings.source.batch_size))
        .fetch_all(&mut *tx)
        .deadline(d)
        .await
        .inspect_err(|e| self.db_down(e))?
        .into_iter()
        .map(
            |(id, widget_key, widget_type, data_version, op, content, produced_at_us)| OutboxRow {
                id,
                widget_key,
                widget_type,
                data_version,
                op,
                content,
                produced_at_us,
            },
        )
        .collect();
        self.readiness.pass("database");
        if rows.is_empty() {
            tx.commit().deadline(d).await?;
            return Ok(Relayed::Empty);
        }

        let entries: Vec<Vec<(&'static str, Vec<u8>)>> =
            rows.iter().map(|row| self.entry_fields(row)).collect();
        // One pipeline per few MiB: a whole batch of large widgets in one pipeline could take
        // longer than the connection's response timeout, fail every time, and never progress.
        let mut ids: Vec<i64> = Vec::with_capacity(rows.len());
        let mut refused: Vec<(usize, String)> = Vec::new();
        let mut failure = None;
        'chunks: for chunk in pipeline_chunks(&entries, MAX_PIPELINE_BYTES) {
            let mut pipe = redis::pipe();
            for fields in &entries[chunk.clone()] {
                pipe.xadd(&self.settings.stream, "*", fields).ignore();
            }
            let Err(e) = pipe.query_async::<()>(redis).await else {
                ids.extend(rows[chunk].iter().map(|r| r.id));
                continue;
            };
            if !redis_answers(redis).await {
                failure = Some(e); // Redis is down: this chunk and the rest wait
                break;
            }
            // Redis answers but refused something here: one entry at a time, to find it and
            // relay the others.
            for i in chunk {
                let one = redis::cmd("XADD")
                    .arg(&self.settings.stream)
                    .arg("*")
                    .arg(&entries[i])
                    .query_async::<String>(&mut *redis)
                    .await;
                match one {
                    Ok(_) => ids.push(rows[i].id),
                    Err(e) if redis_answers(redis).await => refused.push((i, e.to_string())),
                    Err(e) => {
                        failure = Some(e);
                        break 'chunks;
                    }
                }
            }
        }
        if let Some(e) = &failure {
            self.readiness.fail("redis", e.to_string());
        }
        if ids.is_empty()
            && refused.is_empty()
            && let Some(e) = failure
        {
            // Dropping the transaction rolls the claim back: the rows wait for the next attempt.
            return Err(e.into());
        }
        // Rows that went through are published (kept until confirmed); the rest stay
        // unpublished and come first in the next claim.
        sqlx::query(sqlx::AssertSqlSafe(self.publish_sql.as_str()))
            .bind(&ids)
            .bind(&epoch.id)
            .execute(&mut *tx)
            .deadline(d)
            .await
            .inspect_err(|e| self.db_down(e))?;
        let moved = self.refused(&mut tx, &rows, &refused).await?;
        tx.commit()
            .deadline(d)
            .await
            .inspect_err(|e| self.db_down(e))?;
        self.confirm_moved(&moved);
        let sent = ids.len();
        self.metrics.published.inc_by(sent as u64);
        self.stats.add(stats::field::PUBLISHED, sent as u64);
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(Relayed::Published(sent + refused.len())),
        }
    }

    /// Counts each refusal of a row; a row Redis refused [`REFUSALS_BEFORE_MOVE`] times while
    /// it answered everything else is moved to `<table>_dead` with the reason, in the relay's
    /// transaction, so it no longer blocks its source. Returns (id, reason) of the moved rows.
    async fn refused(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        rows: &[OutboxRow],
        refused: &[(usize, String)],
    ) -> Result<Vec<(i64, String)>, WorkerError> {
        let mut moved = Vec::new();
        for (i, error) in refused {
            let row = &rows[*i];
            let times = match self.refusals.lock() {
                Ok(mut counts) => {
                    let n = counts.entry(row.id).or_insert(0);
                    *n += 1;
                    *n
                }
                Err(_) => REFUSALS_BEFORE_MOVE,
            };
            if times < REFUSALS_BEFORE_MOVE {
                continue;
            }
            let reason = format!(
                "Redis refused the entry {times} times while answering other commands: {}",
                crate::stream::clip(error)
            );
            let d = self.settings.db_deadline;
            sqlx::query(sqlx::AssertSqlSafe(self.create_dead_sql.as_str()))
                .execute(&mut **tx)
                .deadline(d)
                .await?;
            sqlx::query(sqlx::AssertSqlSafe(self.move_dead_sql.as_str()))
                .bind(row.id)
                .bind(&reason)
                .execute(&mut **tx)
                .deadline(d)
                .await?;
            moved.push((row.id, reason));
        }
        Ok(moved)
    }

    /// After the commit: count and log the rows moved aside, forget their refusals.
    fn confirm_moved(&self, moved: &[(i64, String)]) {
        for (id, reason) in moved {
            if let Ok(mut counts) = self.refusals.lock() {
                counts.remove(id);
            }
            self.metrics.moved_aside.inc();
            tracing::error!(source = %self.settings.source.name, id, reason = %reason,
                table = %self.dead_table,
                "outbox row moved aside: Redis keeps refusing it; the rows behind it are relayed");
        }
    }

    /// The stream entry for an outbox row.
    fn entry_fields(&self, row: &OutboxRow) -> Vec<(&'static str, Vec<u8>)> {
        let parsed_op = Op::parse(&row.op);
        let event = StreamEvent {
            event_id: format!("{}:{}", self.settings.source.name, row.id),
            source: self.settings.source.name.clone(),
            widget_key: row.widget_key.clone(),
            widget_type: row.widget_type.clone(),
            data_version: row.data_version,
            op: parsed_op.unwrap_or(Op::Upsert),
            // Compact, as the producer library measured it against the size limit.
            content: row
                .content
                .clone()
                .map(|c| crate::store::compact_jsonb_text(c).into_bytes()),
            produced_at_us: row.produced_at_us,
        };
        let mut fields = event.to_fields();
        if parsed_op.is_none() {
            // A row written around the library with an unknown op: relay it as written so
            // the ingester dead-letters it with a reason instead of guessing.
            for f in fields
                .iter_mut()
                .filter(|(name, _)| *name == crate::stream::field::OP)
            {
                f.1 = row.op.clone().into_bytes();
            }
        }
        fields
    }

    fn known_epoch(&self) -> Option<String> {
        self.epoch.lock().ok().and_then(|e| e.clone())
    }

    /// Switches to `epoch`: rows published under any other epoch may be gone from Redis, so
    /// they are unpublished again and relayed by the normal path (id order, back-pressure).
    async fn adopt_epoch(&self, epoch: &Epoch) -> Result<(), WorkerError> {
        let name = &self.settings.source.name;
        let replayed = sqlx::query(sqlx::AssertSqlSafe(self.replay_sql.as_str()))
            .bind(&epoch.id)
            .execute(&self.pool)
            .deadline(self.settings.db_deadline)
            .await
            .inspect_err(|e| self.db_down(e))?
            .rows_affected();
        let previous = self
            .epoch
            .lock()
            .ok()
            .and_then(|mut known| known.replace(epoch.id.clone()));
        // Whoever started the new epoch, this worker relayed under the old one: a loss for it.
        if previous.is_some()
            || epoch
                .started
                .is_some_and(|r| r != durability::NewEpoch::Fresh)
        {
            self.metrics.loss_detected.inc();
            self.stats.add(stats::field::REDIS_LOSS_DETECTED, 1);
            tracing::warn!(source = %name, reason = epoch.started.map(|r| r.as_str()),
                previous = previous.as_deref(), epoch = %epoch.id,
                "Redis may have lost stream entries: the stream epoch changed");
        }
        if replayed > 0 {
            self.metrics.replayed.inc_by(replayed);
            self.stats.add(stats::field::REPLAYED, replayed);
            tracing::warn!(source = %name, rows = replayed, epoch = %epoch.id,
                "rows relayed under an earlier stream epoch are published again");
        } else {
            tracing::info!(source = %name, epoch = %epoch.id, "relaying under stream epoch");
        }
        Ok(())
    }

    fn db_down(&self, e: &sqlx::Error) {
        self.readiness.fail("database", e.to_string());
    }

    /// Returns how many entries the group has not finished (unread + pending), and trims
    /// history the group has already consumed once the stream is longer than `maxLength`.
    /// Nothing unread or pending is ever trimmed.
    async fn guard_stream_length(&self, redis: &mut Conn) -> redis::RedisResult<u64> {
        let s = &self.settings;
        let (len, groups): (u64, redis::Value) = redis::pipe()
            .cmd("XLEN")
            .arg(&s.stream)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(&s.stream)
            .query_async(redis)
            .await
            .or_else(|e| {
                // XINFO on a stream that does not exist yet fails: nothing to guard.
                if e.to_string().contains("no such key") {
                    Ok((0, redis::Value::Nil))
                } else {
                    Err(e)
                }
            })?;
        let Some(group) = find_group(&groups, &s.consumer_group) else {
            // No group yet (the ingester has not started): everything in the stream is unread.
            return Ok(len);
        };
        let lag = group.lag.filter(|_| !s.ignore_lag);
        let (mut unread, trim_above) = match lag {
            Some(lag) => (lag + group.pending, s.max_length),
            // Redis before 7.0 (and Valkey releases built on it) report no lag, nor does 7.x
            // for a while after some deletions. The stream length is then the only bound, so
            // consumed history must go as soon as relaying would pause, not only above
            // maxLength: a stream at the pause threshold would otherwise stay there for ever.
            None => (len, s.backpressure_limit().saturating_sub(1)),
        };
        if len > trim_above {
            let oldest_pending: Option<String> = if group.pending > 0 {
                let reply: redis::Value = redis::cmd("XPENDING")
                    .arg(&s.stream)
                    .arg(&s.consumer_group)
                    .query_async(redis)
                    .await?;
                pending_min_id(&reply)
            } else {
                None
            };
            let keep_from = oldest_pending.unwrap_or(group.last_delivered_id);
            if keep_from != "0-0" {
                let mut trim = redis::cmd("XTRIM");
                trim.arg(&s.stream).arg("MINID");
                // Exact without a lag: what is left is then what the group has not finished
                // (plus the last delivered entry), the figure the pause needs.
                if lag.is_some() {
                    trim.arg("~");
                }
                let trimmed: u64 = trim.arg(&keep_from).query_async(redis).await?;
                tracing::debug!(trimmed, keep_from, "trimmed consumed stream history");
                if lag.is_none() {
                    unread = len.saturating_sub(trimmed);
                }
            }
        }
        Ok(unread)
    }
}

struct GroupInfo {
    lag: Option<u64>,
    pending: u64,
    last_delivered_id: String,
}

fn find_group(reply: &redis::Value, name: &str) -> Option<GroupInfo> {
    let redis::Value::Array(groups) = reply else {
        return None;
    };
    groups.iter().find_map(|g| {
        let fields = map_of(g);
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        if get("name").and_then(as_string).as_deref() != Some(name) {
            return None;
        }
        Some(GroupInfo {
            lag: get("lag").and_then(as_u64),
            pending: get("pending").and_then(as_u64).unwrap_or(0),
            last_delivered_id: get("last-delivered-id")
                .and_then(as_string)
                .unwrap_or_else(|| "0-0".into()),
        })
    })
}

/// XINFO replies are maps in RESP3 and flat key/value arrays in RESP2.
fn map_of(v: &redis::Value) -> Vec<(String, &redis::Value)> {
    match v {
        redis::Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| as_string(k).map(|k| (k, v)))
            .collect(),
        redis::Value::Array(items) => items
            .chunks(2)
            .filter_map(|c| match c {
                [k, v] => as_string(k).map(|k| (k, v)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn as_string(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn as_u64(v: &redis::Value) -> Option<u64> {
    match v {
        redis::Value::Int(i) => u64::try_from(*i).ok(),
        other => as_string(other).and_then(|s| s.parse().ok()),
    }
}

/// The smallest id of the summary form of XPENDING: `[count, min-id, max-id, consumers]`.
fn pending_min_id(reply: &redis::Value) -> Option<String> {
    match reply {
        redis::Value::Array(items) => items.get(1).and_then(as_string),
        _ => None,
    }
}

/// Refusals of one row (Redis answering everything else) before it is moved aside.
const REFUSALS_BEFORE_MOVE: u32 = 3;

/// Whether Redis answers at all (a PING, once more after a reconnect): tells "this entry is
/// refused" from "Redis is down".
async fn redis_answers(redis: &mut Conn) -> bool {
    for _ in 0..2 {
        if redis::cmd("PING")
            .query_async::<String>(&mut *redis)
            .await
            .is_ok()
        {
            return true;
        }
    }
    false
}

/// An outbox table created before retention (or copied without its migrations).
fn lacks_retention_columns(e: &WorkerError) -> bool {
    matches!(e, WorkerError::Database(sqlx::Error::Database(db))
        if db.code().as_deref() == Some("42703")
            && (db.message().contains("published_at") || db.message().contains("relay_epoch")))
}

/// Capped at 2 s, like the ingester's: a store that comes back is relayed to within 2 s (the
/// chaos suite measured up to 6 s of idle relay after a 3 s Redis outage with a 5 s cap).
fn backoff(failures: u32) -> Duration {
    retry::backoff(failures, Duration::from_millis(100), Duration::from_secs(2))
}

/// How long the wake-up listener may go without a notification before it checks its link.
const LISTENER_CHECK: Duration = Duration::from_secs(30);

/// Makes sure every INSERT into the outbox wakes this worker, whoever writes it (plain SQL in
/// any language): a statement-level trigger sending one notification per statement, created
/// here for an outbox table other than the migrated `widget_outbox`. Returns whether it is in
/// place; a worker not allowed to create it (not the table's owner) says so once and polls.
async fn ensure_wakeup_trigger(pool: &PgPool, table: &str, deadline: Duration) -> bool {
    let quoted = quote_identifier(table);
    let exists: Result<bool, sqlx::Error> = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger
                        WHERE tgrelid = $1::regclass AND tgname = 'widget_outbox_wakeup')",
    )
    .bind(&quoted)
    .fetch_one(pool)
    .deadline(deadline)
    .await;
    match exists {
        Ok(true) => return true,
        Ok(false) => {}
        Err(_) => return false, // the database is down: checked again on the next connect
    }
    // A validated identifier, and a channel name as a string literal.
    let sql = format!(
        "CREATE OR REPLACE TRIGGER widget_outbox_wakeup AFTER INSERT ON {quoted}
         FOR EACH STATEMENT EXECUTE FUNCTION widget_outbox_notify('{}')",
        table.replace('\'', "''")
    );
    match sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .deadline(deadline)
        .await
    {
        Ok(_) => {
            tracing::info!(
                table,
                "wake-up trigger created: every INSERT now wakes the worker"
            );
            true
        }
        Err(e) => {
            tracing::warn!(table, error = %e,
                "cannot create the wake-up trigger (apply migrations/product, or create it as the \
                 table's owner); rows are relayed at the poll interval");
            true // said once; polling covers it
        }
    }
}

async fn listen_for_wakeups(
    pool: PgPool,
    channel: String,
    deadline: Duration,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut trigger_checked = false;
    loop {
        if !trigger_checked {
            trigger_checked = ensure_wakeup_trigger(&pool, &channel, deadline).await;
        }
        let listener = async {
            let mut l = PgListener::connect_with(&pool).deadline(deadline).await?;
            l.listen(&channel).deadline(deadline).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = cancel.cancelled() => return,
            l = listener => match l {
                Ok(l) => l,
                Err(_) => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                // Quiet for a while: a listener on a link that stopped answering would wait
                // for ever, so it must prove it is alive or be replaced.
                _ = tokio::time::sleep(LISTENER_CHECK) => {
                    let alive = sqlx::query("SELECT 1").execute(&mut listener).deadline(deadline).await;
                    if alive.is_err() {
                        wake.notify_one();
                        break;
                    }
                }
                n = listener.recv() => match n {
                    Ok(_) => wake.notify_one(),
                    // The listener reconnects on the next recv; notifications sent meanwhile
                    // are lost, which the poll covers. Wake once in case we missed one.
                    Err(_) => {
                        wake.notify_one();
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                },
            }
        }
    }
}

/// The replay: rows relayed under an epoch other than $1 (and matching `when`) are unpublished
/// again. Every statement here that locks many outbox rows locks them in id order, so two of
/// them (replay, confirmation deletes, the caps) never deadlock each other.
fn replay_sql(table: &str, when: &str) -> String {
    format!(
        "UPDATE {table} SET published_at = NULL, relay_epoch = NULL WHERE id IN (
             SELECT id FROM {table} WHERE {when} AND relay_epoch IS DISTINCT FROM $1
             ORDER BY id FOR UPDATE)"
    )
}

/// Rows stamped with an old epoch after the replay ran (a worker that checked the epoch just
/// before Redis lost data, and committed just after) are replayed by the sweep once they are
/// this old, so they cannot be stranded when that worker stops before its next check.
const STRANDED_AFTER: Duration = Duration::from_secs(5);

/// Refreshes the backlog gauges, replays rows stranded under an old epoch, and applies the
/// retention cap: a relayed row still unconfirmed after `retention`, or beyond the
/// `maxRetainedRows` newest, is deleted, counted and logged. Unpublished rows are never
/// touched: they are the only copy of their event. One worker of a source sweeps at a time
/// (an advisory lock), so several do not each delete the excess.
async fn sweep_loop(
    pool: PgPool,
    client: connect::Redis,
    settings: WorkerSettings,
    metrics: WorkerMetrics,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) {
    let table = quote_identifier(&settings.source.outbox_table);
    // Bounded work however large the outbox grows (a Redis outage can leave millions of rows):
    // counts stop at EXACT_UP_TO, the rest comes from index endpoints and the planner's estimate,
    // and the retention check looks at the first relayed row only.
    let count_sql = format!(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM {table} WHERE published_at IS NULL
                                       LIMIT {limit}) u),
                (SELECT count(*) FROM (SELECT 1 FROM {table} WHERE published_at IS NOT NULL
                                       LIMIT {limit}) r),
                (SELECT max(id) - min(id) + 1 FROM {table} WHERE published_at IS NULL),
                (SELECT reltuples::bigint FROM pg_class WHERE oid = $2::regclass),
                coalesce((SELECT published_at < clock_timestamp() - make_interval(secs => $1::float8)
                          FROM {table} WHERE published_at IS NOT NULL ORDER BY id LIMIT 1), false)",
        limit = EXACT_UP_TO + 1
    );
    let stranded_sql = replay_sql(
        &table,
        &format!(
            "published_at < clock_timestamp() - make_interval(secs => {})",
            STRANDED_AFTER.as_secs()
        ),
    );
    let lock_key = format!("widget-outbox-sweep:{}", settings.source.outbox_table);
    let expire_sql = format!(
        "DELETE FROM {table} WHERE published_at IS NOT NULL AND id IN (
             SELECT id FROM {table}
             WHERE published_at < clock_timestamp() - make_interval(secs => $1::float8)
             ORDER BY id FOR UPDATE)"
    );
    let trim_sql = format!(
        "DELETE FROM {table} WHERE published_at IS NOT NULL AND id IN (
             SELECT id FROM {table} WHERE published_at IS NOT NULL AND id <= (
                 SELECT id FROM {table} WHERE published_at IS NOT NULL
                 ORDER BY id DESC OFFSET $1 LIMIT 1)
             ORDER BY id FOR UPDATE)"
    );
    let source = settings.source.name.clone();
    let (retention, cap) = (settings.source.retention, settings.source.max_retained_rows);
    let d = settings.db_deadline;
    let mut redis: Option<Conn> = None;
    let mut capped_sweeps = 0u64;
    // The cap stays reported for a while after it last deleted rows, so a status read every
    // few minutes still sees it.
    let mut capped_until: Option<std::time::Instant> = None;
    loop {
        // Best effort: without Redis there is no current epoch to compare with.
        let epoch: Option<String> = async {
            let conn = match &mut redis {
                Some(c) => c,
                None => redis.insert(client.manager().await.ok()?),
            };
            redis::cmd("GET")
                .arg(&settings.epoch_key)
                .query_async(conn)
                .await
                .ok()?
        }
        .await;
        let sweep = async {
            let mut stranded = 0;
            if let Some(epoch) = &epoch {
                stranded = sqlx::query(sqlx::AssertSqlSafe(stranded_sql.as_str()))
                    .bind(epoch)
                    .execute(&pool)
                    .deadline(d)
                    .await?
                    .rows_affected();
            }
            let read_counts = || async {
                let row: (i64, i64, Option<i64>, Option<i64>, bool) =
                    sqlx::query_as(sqlx::AssertSqlSafe(count_sql.as_str()))
                        .bind(retention.as_secs_f64())
                        .bind(&table)
                        .fetch_one(&pool)
                        .deadline(d)
                        .await?;
                Ok::<_, sqlx::Error>((backlog_figures(row.0, row.1, row.2, row.3), row.4))
            };
            let ((mut backlog, mut retained), first_expired) = read_counts().await?;
            let mut expired = 0;
            if first_expired || retained > i64::try_from(cap).unwrap_or(i64::MAX) {
                let mut tx = pool.begin().deadline(d).await?;
                let ours: bool =
                    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
                        .bind(&lock_key)
                        .fetch_one(&mut *tx)
                        .deadline(d)
                        .await?;
                if ours {
                    expired += sqlx::query(sqlx::AssertSqlSafe(expire_sql.as_str()))
                        .bind(retention.as_secs_f64())
                        .execute(&mut *tx)
                        .deadline(d)
                        .await?
                        .rows_affected();
                    expired += sqlx::query(sqlx::AssertSqlSafe(trim_sql.as_str()))
                        .bind(i64::try_from(cap).unwrap_or(i64::MAX))
                        .execute(&mut *tx)
                        .deadline(d)
                        .await?
                        .rows_affected();
                }
                tx.commit().deadline(d).await?;
                if expired > 0 {
                    ((backlog, retained), _) = read_counts().await?;
                }
            }
            Ok::<_, sqlx::Error>((backlog, retained, expired, stranded))
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = sweep => r,
        };
        if let Ok((backlog, retained, expired, stranded)) = result {
            if stranded > 0 {
                metrics.replayed.inc_by(stranded);
                stats.add(stats::field::REPLAYED, stranded);
                tracing::warn!(source = %source, rows = stranded,
                    "rows relayed under an earlier stream epoch after its replay are published again");
            }
            if expired > 0 {
                capped_until = Some(std::time::Instant::now() + CAP_REPORTED_FOR);
            }
            let capped = capped_until.is_some_and(|t| std::time::Instant::now() < t);
            metrics.backlog.set(backlog);
            metrics.retained.set(retained);
            metrics.retention_capped.set(i64::from(capped));
            stats.set_gauge(
                format!("{}{source}", stats::field::OUTBOX_BACKLOG_PREFIX),
                backlog,
            );
            stats.set_gauge(
                format!("{}{source}", stats::field::OUTBOX_RETAINED_PREFIX),
                retained,
            );
            stats.set_gauge(
                format!("{}{source}", stats::field::OUTBOX_RETENTION_CAPPED_PREFIX),
                i64::from(capped),
            );
            stats.set_gauge(
                format!("{}{source}", stats::field::OUTBOX_BACKLOG_AT_PREFIX),
                stats::unix_ms(),
            );
            if expired > 0 {
                metrics.retention_expired.inc_by(expired);
                stats.add(stats::field::RETENTION_EXPIRED, expired);
                if capped_sweeps.is_multiple_of(30) {
                    tracing::error!(source = %source, rows = expired, retained,
                        retention = %crate::config::human_duration::format(retention),
                        max_retained_rows = cap,
                        "retention cap reached: relayed rows the core side has not confirmed \
                         were deleted; they are still in the stream, but would not be replayed \
                         if Redis lost it");
                }
                capped_sweeps += 1;
            } else {
                capped_sweeps = 0;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(settings.backlog_interval) => {}
        }
    }
}

/// Outbox rows counted exactly by the sweep; beyond this the gauges are estimates.
const EXACT_UP_TO: i64 = 100_000;

/// (unpublished, retained) for the gauges from the sweep's bounded readings: exact counts up to
/// [`EXACT_UP_TO`]; above it, unpublished rows are estimated by their id range (an upper bound:
/// rolled-back ids count too) and retained rows by the planner's row estimate minus that.
fn backlog_figures(
    unpublished: i64,
    retained: i64,
    unpublished_id_range: Option<i64>,
    reltuples: Option<i64>,
) -> (i64, i64) {
    let backlog = if unpublished > EXACT_UP_TO {
        unpublished_id_range.unwrap_or(unpublished).max(unpublished)
    } else {
        unpublished
    };
    let retained = if retained > EXACT_UP_TO {
        reltuples
            .map(|all| all.saturating_sub(backlog))
            .unwrap_or(retained)
            .max(retained)
    } else {
        retained
    };
    (backlog, retained)
}

/// How long the retention cap stays reported after it last deleted unconfirmed rows.
const CAP_REPORTED_FOR: Duration = Duration::from_secs(600);

/// Most confirmations turned into deletes per pass.
const CONFIRM_BATCH: usize = 5000;

/// Deletes the rows the ingester confirmed (their events are durably applied in core
/// Postgres), then forgets those confirmations.
async fn confirm_loop(
    pool: PgPool,
    client: connect::Redis,
    settings: WorkerSettings,
    metrics: WorkerMetrics,
    cancel: CancellationToken,
) {
    let table = quote_identifier(&settings.source.outbox_table);
    let delete_sql = format!(
        "DELETE FROM {table} WHERE id IN (
             SELECT o.id FROM {table} AS o
             JOIN UNNEST($1::bigint[], $2::bigint[], $3::bigint[]) AS c(id, version, produced)
               ON o.id = c.id AND o.data_version = c.version
              AND (extract(epoch FROM o.created_at) * 1000000)::bigint = c.produced
             ORDER BY o.id FOR UPDATE OF o)"
    );
    let key = settings.confirmed_key.clone();
    let mut conn: Option<Conn> = None;
    let mut failures = 0u32;
    loop {
        let pass = async {
            let redis = match &mut conn {
                Some(c) => c,
                None => conn.insert(client.manager().await?),
            };
            let members = durability::read_confirmed(redis, &key, CONFIRM_BATCH).await?;
            if members.is_empty() {
                return Ok(0);
            }
            let rows: Vec<durability::RowRef> = members
                .iter()
                .filter_map(|m| durability::RowRef::parse(m))
                .collect();
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            let versions: Vec<i64> = rows.iter().map(|r| r.version).collect();
            let produced: Vec<i64> = rows.iter().map(|r| r.produced_at_us).collect();
            let deleted = sqlx::query(sqlx::AssertSqlSafe(delete_sql.as_str()))
                .bind(&ids)
                .bind(&versions)
                .bind(&produced)
                .execute(&pool)
                .deadline(settings.db_deadline)
                .await?
                .rows_affected();
            durability::forget_confirmed(redis, &key, &members).await?;
            metrics.confirmed.inc_by(deleted);
            Ok::<_, WorkerError>(members.len())
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = pass => r,
        };
        let pause = match result {
            // A full page: more are waiting.
            Ok(n) => {
                failures = 0;
                if n >= CONFIRM_BATCH {
                    Duration::ZERO
                } else {
                    settings.confirm_interval
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(source = %settings.source.name, error = %e, failures,
                        "confirmation pass failed; confirmed rows stay in the outbox until one succeeds");
                }
                backoff(failures).max(settings.confirm_interval)
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Most bytes of stream entries sent in one pipeline.
const MAX_PIPELINE_BYTES: usize = 4 << 20;

/// Pipelines of at most `max_bytes` of entries each (field names and values counted).
fn pipeline_chunks(
    entries: &[Vec<(&'static str, Vec<u8>)>],
    max_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    crate::chunk::by_size(
        entries,
        |fields| fields.iter().map(|(k, v)| k.len() + v.len()).sum(),
        max_bytes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelines_are_cut_by_size_and_keep_the_order() {
        let entry = |n: usize| vec![("content", vec![b'x'; n])];
        let entries: Vec<_> = [400, 400, 300, 2000, 10, 10].map(entry).to_vec();
        // "content" is 7 bytes: 407 + 407 fits 1000, + 307 does not; the 2007 one is alone.
        assert_eq!(
            pipeline_chunks(&entries, 1000),
            vec![0..2, 2..3, 3..4, 4..6]
        );
        assert_eq!(pipeline_chunks(&entries, 1 << 20), vec![0..6]);
        assert!(pipeline_chunks(&[], 1000).is_empty());
    }

    #[test]
    fn backlog_figures_are_exact_when_small_and_estimated_when_large() {
        assert_eq!(backlog_figures(10, 20, Some(15), Some(30)), (10, 20));
        let over = EXACT_UP_TO + 1;
        // Many unpublished rows: the id range (never below the bounded count).
        assert_eq!(
            backlog_figures(over, 5, Some(2_000_000), Some(0)),
            (2_000_000, 5)
        );
        assert_eq!(backlog_figures(over, 5, Some(3), None), (over, 5));
        // Many retained rows: the planner's estimate minus the backlog.
        assert_eq!(
            backlog_figures(7, over, Some(7), Some(900_007)),
            (7, 900_000)
        );
        assert_eq!(backlog_figures(7, over, Some(7), None), (7, over));
        assert_eq!(backlog_figures(7, over, Some(7), Some(-1)), (7, over));
    }

    #[test]
    fn backpressure_limit_leaves_room_for_a_batch() {
        let config = Config::from_yaml_str(
            "pipeline: p\nstream: {maxLength: 10000}\nsources: [{name: deals, batchSize: 500}]\n",
        )
        .expect("valid");
        let s = WorkerSettings::from_config(&config, "deals").expect("source");
        assert_eq!(s.backpressure_limit(), 9500);
        let e = WorkerSettings::from_config(&config, "nope").expect_err("unknown");
        assert!(e.to_string().contains("known: deals"), "{e}");
    }

    #[test]
    fn group_info_is_read_from_resp2_and_resp3() {
        use redis::Value::*;
        let resp2 = Array(vec![Array(vec![
            BulkString(b"name".to_vec()),
            BulkString(b"g".to_vec()),
            BulkString(b"pending".to_vec()),
            Int(3),
            BulkString(b"last-delivered-id".to_vec()),
            BulkString(b"5-0".to_vec()),
            BulkString(b"lag".to_vec()),
            Nil,
        ])]);
        let g = find_group(&resp2, "g").expect("found");
        assert_eq!(
            (g.lag, g.pending, g.last_delivered_id.as_str()),
            (None, 3, "5-0")
        );
        assert!(find_group(&resp2, "other").is_none());
        // Redis 6.2 has no `lag` (nor `entries-read`) at all.
        let redis62 = Array(vec![Array(vec![
            BulkString(b"name".to_vec()),
            BulkString(b"g".to_vec()),
            BulkString(b"consumers".to_vec()),
            Int(1),
            BulkString(b"pending".to_vec()),
            Int(0),
            BulkString(b"last-delivered-id".to_vec()),
            BulkString(b"9-1".to_vec()),
        ])]);
        let g = find_group(&redis62, "g").expect("found");
        assert_eq!(
            (g.lag, g.pending, g.last_delivered_id.as_str()),
            (None, 0, "9-1")
        );
        let resp3 = Array(vec![Map(vec![
            (SimpleString("name".into()), BulkString(b"g".to_vec())),
            (SimpleString("lag".into()), Int(7)),
        ])]);
        assert_eq!(find_group(&resp3, "g").and_then(|g| g.lag), Some(7));
    }
}
