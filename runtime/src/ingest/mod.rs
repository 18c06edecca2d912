//! The core-ingester: turns the pipeline's stream entries into core database rows and hot-cache
//! values, at least once, without ever letting a stale or foreign event win.
//!
//! One loop per process: make sure the consumer group exists, run a reclaim pass when one is due
//! ([`reclaim`]), otherwise block on `XREADGROUP ... >` on a connection of its own
//! ([`consumer`]). Each batch ([`batch`]) is decoded, bad entries go to the dead-letter stream
//! ([`dead_letter`]), the rest are applied with one version-guarded UPSERT, the winners are
//! written to the cache with the version-guarded script, and only then is the batch acknowledged.
//! A store that fails is retried with backoff and jitter while readiness reports it; the batch
//! in hand is kept, nothing is acknowledged, and the loop never exits for an outage.

mod batch;
pub mod consumer;
pub mod consumers;
pub mod dead_letter;
pub mod metrics;
pub mod reclaim;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::admin::Readiness;
use crate::cache::Cache;
use crate::config::Config;
use crate::connect::{self, Conn};
use crate::retry;
use crate::stats::{self, Stats};

pub use batch::is_data_error;
use dead_letter::DeadLetter;
use metrics::IngestMetrics;

/// Entries read or claimed per batch unless overridden.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// Longest XREADGROUP block; the read wakes earlier when a reclaim pass is due.
pub const MAX_BLOCK: Duration = Duration::from_secs(2);

/// How long a page size that timed out is kept before pages may grow again.
const PAGE_GROWTH_PAUSE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingester task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Everything the ingester takes from the pipeline config, plus knobs tests may turn.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub stream: String,
    pub group: String,
    pub dead_stream: String,
    /// Approximate cap of the dead-letter stream (the pipeline's `stream.maxLength`).
    pub dead_max_len: u64,
    pub key_prefix: String,
    pub stats_key: String,
    pub ingest_ttl: Duration,
    pub min_idle: Duration,
    pub reclaim_interval: Duration,
    pub max_deliveries: u32,
    pub idle_consumer_ttl: Duration,
    pub batch_size: usize,
    pub max_block: Duration,
    pub stats_interval: Duration,
    pub epoch_key: String,
    pub warm: crate::warm::WarmSettings,
    /// Client-side deadline of every database statement (`database.statementTimeout`).
    pub db_deadline: Duration,
}

impl IngestSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            stream: config.stream_name(),
            group: config.stream.consumer_group.clone(),
            dead_stream: config.dead_letter_stream(),
            dead_max_len: config.stream.max_length,
            key_prefix: config.key_prefix(),
            stats_key: config.stats_key(),
            ingest_ttl: config.cache.ingest_ttl,
            min_idle: config.reclaim.min_idle,
            reclaim_interval: config.reclaim.interval,
            max_deliveries: config.reclaim.max_deliveries,
            idle_consumer_ttl: config.reclaim.idle_consumer_ttl,
            batch_size: DEFAULT_BATCH_SIZE,
            max_block: MAX_BLOCK,
            stats_interval: stats::FLUSH_INTERVAL,
            epoch_key: config.epoch_key(),
            warm: crate::warm::WarmSettings::from_config(config),
            db_deadline: config.database.statement_timeout,
        }
    }
}

pub struct Ingester {
    settings: IngestSettings,
    consumer: String,
    redis: connect::Redis,
    pool: PgPool,
    metrics: IngestMetrics,
    warm_metrics: crate::warm::WarmMetrics,
    readiness: Readiness,
    stats: Arc<Stats>,
}

impl Ingester {
    pub fn new(
        config: &Config,
        consumer: String,
        redis: impl Into<connect::Redis>,
        pool: PgPool,
        registry: &mut Registry,
        readiness: Readiness,
    ) -> Self {
        let metrics = IngestMetrics::register(registry);
        let warm_metrics = crate::warm::WarmMetrics::register(registry);
        readiness.fail("redis", "not connected yet");
        readiness.fail("database", "not connected yet");
        Self {
            settings: IngestSettings::from_config(config),
            consumer,
            redis: redis.into(),
            pool,
            metrics,
            warm_metrics,
            readiness,
            stats: Arc::new(Stats::new()),
        }
    }

    /// Re-warm knobs (tests use a short check interval).
    pub fn with_warm(mut self, f: impl FnOnce(&mut crate::warm::WarmSettings)) -> Self {
        f(&mut self.settings.warm);
        self
    }

    /// How long a consumer with nothing pending may be idle before it is removed from the group
    /// (`reclaim.idleConsumerTtl`; tests use less than the config's 1 minute minimum).
    pub fn with_idle_consumer_ttl(mut self, ttl: Duration) -> Self {
        self.settings.idle_consumer_ttl = ttl;
        self
    }

    /// How often counters are flushed to the stats hash (default [`stats::FLUSH_INTERVAL`]).
    pub fn with_stats_interval(mut self, interval: Duration) -> Self {
        self.settings.stats_interval = interval;
        self
    }

    /// Entries per read and per XAUTOCLAIM page (default [`DEFAULT_BATCH_SIZE`]).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.settings.batch_size = n.max(1);
        self
    }

    pub fn settings(&self) -> &IngestSettings {
        &self.settings
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Consumes until `cancel` fires. A batch in flight when it fires is finished if its stores
    /// answer, otherwise abandoned unacknowledged (it is reclaimed later). Outages of Redis or
    /// Postgres are waited out; they never end the loop.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), IngestError> {
        tracing::info!(
            consumer = %self.consumer,
            stream = %self.settings.stream,
            group = %self.settings.group,
            "ingester started"
        );
        let flusher = {
            let (stats, client) = (self.stats.clone(), self.redis.clone());
            let (key, interval, cancel) = (
                self.settings.stats_key.clone(),
                self.settings.stats_interval,
                cancel.clone(),
            );
            tokio::spawn(async move {
                stats
                    .flush_until_cancelled(client, key, interval, cancel)
                    .await
            })
        };
        let warmer = tokio::spawn(
            crate::warm::Warmer {
                settings: self.settings.warm.clone(),
                epoch_key: self.settings.epoch_key.clone(),
                stream: self.settings.stream.clone(),
                group: self.settings.group.clone(),
                owner: self.consumer.clone(),
                client: self.redis.clone(),
                pool: self.pool.clone(),
                metrics: self.warm_metrics.clone(),
                stats: self.stats.clone(),
            }
            .run(cancel.clone()),
        );
        let settings_watch = tokio::spawn(crate::durability::watch_settings(
            self.redis.clone(),
            self.settings.stream.clone(),
            self.metrics.eviction_unsafe.clone(),
            self.stats.clone(),
            crate::durability::SETTINGS_INTERVAL,
            cancel.clone(),
        ));
        let page_count = self.settings.batch_size;
        let mut worker = Worker {
            links: Links {
                client: self.redis.clone(),
                manager: None,
                readiness: self.readiness.clone(),
                metrics: self.metrics.clone(),
                failures: 0,
            },
            cache: Cache::new(self.settings.key_prefix.clone()),
            s: self.settings,
            consumer: self.consumer,
            pool: self.pool,
            metrics: self.metrics,
            stats: self.stats,
            redis: self.redis.clone(),
            reader: Reader {
                blocking: None,
                page_count,
                max_count: page_count,
                grow_after: Instant::now(),
            },
            group_ready: false,
            epoch: None,
            ahead: None,
            finisher: None,
            finishing: None,
        };
        worker.drive(&cancel).await;
        worker.wind_down(&cancel).await;
        let consumer = worker.consumer.clone();
        drop(worker);
        flusher.await?;
        warmer.await?;
        settings_watch.await?;
        tracing::info!(consumer = %consumer, "ingester stopped");
        Ok(())
    }
}

/// Why a batch stopped before it was finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    /// Shutdown: the rest stays pending and is reclaimed later.
    Cancelled,
    /// The consumer group (or the whole stream) is gone; so are the entries in hand.
    GroupLost,
}

/// Connections and the bookkeeping of failed attempts.
pub(super) struct Links {
    client: connect::Redis,
    manager: Option<Conn>,
    readiness: Readiness,
    metrics: IngestMetrics,
    failures: u32,
}

impl Links {
    /// Links of their own (a connection and a failure count) to the same stores, for the
    /// finisher, whose retries must not reset or inflate the reader's backoff.
    fn sibling(&self) -> Links {
        Links {
            client: self.client.clone(),
            manager: None,
            readiness: self.readiness.clone(),
            metrics: self.metrics.clone(),
            failures: 0,
        }
    }

    async fn manager(&mut self) -> redis::RedisResult<Conn> {
        if let Some(m) = &self.manager {
            return Ok(m.clone());
        }
        let m = self.client.manager().await?;
        self.manager = Some(m.clone());
        Ok(m)
    }

    fn redis_failed(&mut self, e: &redis::RedisError, what: &str) {
        self.failed("redis", e, what);
    }

    fn db_failed(&mut self, e: &sqlx::Error, what: &str) {
        self.failed("database", e, what);
    }

    /// Counts the failure, marks the store not ready and logs the first failure of a run and
    /// every 20th after it, so a long outage does not flood the log.
    fn failed(&mut self, store: &'static str, e: &dyn std::fmt::Display, what: &str) {
        self.failures = self.failures.saturating_add(1);
        self.metrics.error_inc(store);
        self.readiness.fail(store, e.to_string());
        if self.failures == 1 || self.failures.is_multiple_of(20) {
            tracing::warn!(error = %e, failures = self.failures, store, step = what,
                "step failed; nothing acknowledged, retrying");
        }
    }

    fn redis_ok(&mut self) {
        self.failures = 0;
        self.readiness.pass("redis");
    }

    fn db_ok(&mut self) {
        self.failures = 0;
        self.readiness.pass("database");
    }

    /// Waits the backoff for the current failure count; false if cancelled meanwhile.
    async fn pause(&self, cancel: &CancellationToken) -> bool {
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(backoff(self.failures)) => true,
        }
    }

    /// Runs a Redis step until it succeeds. Retries keep the batch in hand.
    async fn redis<T, F, Fut>(
        &mut self,
        cancel: &CancellationToken,
        what: &str,
        mut step: F,
    ) -> Result<T, Halt>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        loop {
            let result = match self.manager().await {
                Ok(conn) => step(conn).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => {
                    self.redis_ok();
                    return Ok(v);
                }
                Err(e) if consumer::is_nogroup(&e) => {
                    tracing::warn!(
                        step = what,
                        "consumer group is gone; abandoning the batch in hand"
                    );
                    return Err(Halt::GroupLost);
                }
                Err(e) => {
                    self.redis_failed(&e, what);
                    if !self.pause(cancel).await {
                        return Err(Halt::Cancelled);
                    }
                }
            }
        }
    }

    /// Runs a database step until it succeeds.
    async fn db<T, F, Fut>(
        &mut self,
        cancel: &CancellationToken,
        what: &str,
        mut step: F,
    ) -> Result<T, Halt>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        loop {
            match step().await {
                Ok(v) => {
                    self.db_ok();
                    return Ok(v);
                }
                Err(e) => {
                    self.db_failed(&e, what);
                    if !self.pause(cancel).await {
                        return Err(Halt::Cancelled);
                    }
                }
            }
        }
    }
}

/// The state of one running ingester.
struct Worker {
    s: IngestSettings,
    consumer: String,
    pool: PgPool,
    cache: Cache,
    metrics: IngestMetrics,
    stats: Arc<Stats>,
    links: Links,
    /// The same client as the links', for the reader.
    redis: connect::Redis,
    reader: Reader,
    group_ready: bool,
    /// The stream epoch seen last.
    epoch: Option<String>,
    /// New entries read (and decoded) while the previous batch was being upserted.
    ahead: Option<batch::Decoded>,
    /// The finisher while no batch is being finished ([`batch::Finisher`]).
    finisher: Option<batch::Finisher>,
    /// The batch being finished meanwhile, on its own task.
    finishing: Option<tokio::task::JoinHandle<(batch::Finisher, Result<(), Halt>)>>,
}

/// The reading side: its own connection (a blocking XREADGROUP must not hold up the other
/// commands) and the page size.
struct Reader {
    blocking: Option<Conn>,
    /// Entries asked for per read or claim page: halved while pages time out (a few huge
    /// entries), so the entry at fault is isolated and the rest flow; grows back after.
    page_count: usize,
    max_count: usize,
    /// No growing before this: right after a timeout, doubling back at once would run into
    /// the same timeout every other page.
    grow_after: Instant,
}

impl Reader {
    /// New entries for this consumer, waiting up to `block` for some (not at all when zero).
    async fn read(
        &mut self,
        client: &connect::Redis,
        s: &IngestSettings,
        consumer: &str,
        block: Duration,
    ) -> redis::RedisResult<Vec<consumer::Entry>> {
        let conn = match &mut self.blocking {
            Some(c) => c,
            None => {
                let c = client.blocking(s.max_block).await?;
                self.blocking.insert(c)
            }
        };
        let entries =
            consumer::read_new(conn, &s.stream, &s.group, consumer, self.page_count, block).await;
        self.adapt_page(entries.as_ref().map(Vec::len));
        if entries.is_err() {
            self.blocking = None;
        }
        entries
    }

    /// Halves the page size after a timed-out read or claim; doubles it back only after a full
    /// page came back in time, and not within [`PAGE_GROWTH_PAUSE`] of a timeout. (Growing
    /// after any success let an empty read between two claims of the same huge entries undo
    /// each halving, so the pages never got small enough.)
    fn adapt_page(&mut self, outcome: Result<usize, &redis::RedisError>) {
        match outcome {
            Ok(n) if n >= self.page_count && Instant::now() >= self.grow_after => {
                self.page_count = (self.page_count * 2).min(self.max_count)
            }
            Ok(_) => {}
            Err(e) if e.is_timeout() => {
                self.grow_after = Instant::now() + PAGE_GROWTH_PAUSE;
                self.page_count = (self.page_count / 2).max(1);
                tracing::warn!(
                    count = self.page_count,
                    "a read or claim page timed out (very large entries?); asking for fewer"
                );
            }
            Err(_) => {}
        }
    }
}

impl Worker {
    /// After shutdown began: entries already read ahead are processed and the batch being
    /// finished is waited for, while the stores answer, so a rolling restart leaves nothing
    /// pending for a reclaim to find minutes later.
    async fn wind_down(&mut self, cancel: &CancellationToken) {
        if let Some(next) = self.ahead.take() {
            let _ = self.process_decoded(next, cancel).await;
        }
        let _ = self.settle().await;
    }

    async fn drive(&mut self, cancel: &CancellationToken) {
        // The first pass runs at once: it takes over what a previous run left pending.
        let mut next_reclaim = Instant::now();
        while !cancel.is_cancelled() {
            if !self.group_ready
                && let Err(e) = self.ensure_group().await
            {
                self.links.redis_failed(&e, "create consumer group");
                if !self.links.pause(cancel).await {
                    break;
                }
                continue;
            }
            let now = Instant::now();
            if now >= next_reclaim {
                // Our own batch in flight must not look idle to the claim.
                if self.settle().await == Err(Halt::Cancelled) {
                    break;
                }
                if self.reclaim_pass(cancel).await == Err(Halt::Cancelled) {
                    break;
                }
                // Counted from the end of the pass: a pass longer than the interval must not be
                // followed at once by the next one, or new entries would never be read.
                next_reclaim = Instant::now() + self.s.reclaim_interval;
                continue;
            }
            let block = next_reclaim
                .saturating_duration_since(now)
                .clamp(Duration::from_millis(1), self.s.max_block);
            if let Some(next) = self.ahead.take() {
                if self.process_decoded(next, cancel).await == Err(Halt::Cancelled) {
                    break;
                }
                continue;
            }
            let read = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.read(block) => r,
            };
            match read {
                Ok(entries) if entries.is_empty() => {}
                Ok(entries) => {
                    if self.process(entries, Vec::new(), cancel).await == Err(Halt::Cancelled) {
                        break;
                    }
                }
                Err(e) if consumer::is_nogroup(&e) => {
                    tracing::warn!(stream = %self.s.stream, group = %self.s.group,
                        "consumer group is missing (Redis lost it?); creating it again at 0");
                    self.group_ready = false;
                }
                Err(e) => {
                    self.reader.blocking = None;
                    self.links.redis_failed(&e, "read");
                    if !self.links.pause(cancel).await {
                        break;
                    }
                }
            }
        }
    }

    /// Makes sure the group exists, through the epoch check: a group that has to be created
    /// again means Redis lost the stream, so the same atomic step starts a new epoch and the
    /// workers replay what they relayed under the old one.
    async fn ensure_group(&mut self) -> redis::RedisResult<()> {
        let mut conn = self.links.manager().await?;
        let epoch = crate::durability::ensure_epoch(
            &mut conn,
            &self.s.epoch_key,
            &self.s.stream,
            &self.s.group,
            self.epoch.as_deref(),
        )
        .await?;
        match epoch.started {
            Some(crate::durability::NewEpoch::Fresh) => {
                tracing::info!(stream = %self.s.stream, group = %self.s.group, epoch = %epoch.id,
                    "consumer group created");
            }
            Some(reason) => {
                self.metrics.group_recreated.inc();
                self.metrics.loss_detected.inc();
                self.stats.add(stats::field::REDIS_LOSS_DETECTED, 1);
                tracing::warn!(stream = %self.s.stream, group = %self.s.group, epoch = %epoch.id,
                    reason = reason.as_str(),
                    "Redis lost stream data; new stream epoch, group (re-)created at 0");
            }
            None => {}
        }
        self.epoch = Some(epoch.id);
        self.group_ready = true;
        self.links.redis_ok();
        Ok(())
    }

    async fn read(&mut self, block: Duration) -> redis::RedisResult<Vec<consumer::Entry>> {
        let entries = self
            .reader
            .read(&self.redis, &self.s, &self.consumer, block)
            .await?;
        self.links.redis_ok();
        Ok(entries)
    }

    /// Moves entries to the dead-letter stream and counts those this call moved.
    async fn dead_letter(
        &mut self,
        letters: &[DeadLetter],
        cancel: &CancellationToken,
    ) -> Result<(), Halt> {
        if letters.is_empty() {
            return Ok(());
        }
        let target = dead_letter::DeadLetterTarget {
            stream: &self.s.stream,
            group: &self.s.group,
            dead_stream: &self.s.dead_stream,
            max_len: self.s.dead_max_len,
            consumer: &self.consumer,
        };
        let moved = self
            .links
            .redis(cancel, "dead-letter", |mut conn| {
                let target = target.clone();
                async move { dead_letter::move_entries(&mut conn, &target, letters).await }
            })
            .await?;
        if moved.trimmed > 0 {
            self.metrics.dead_letters_trimmed.inc_by(moved.trimmed);
            tracing::warn!(trimmed = moved.trimmed, dead_stream = %self.s.dead_stream,
                max_len = self.s.dead_max_len,
                "the dead-letter stream is full: its oldest entries were trimmed unread");
        }
        for (letter, moved) in letters.iter().zip(moved.moved) {
            if !moved {
                continue; // already acknowledged elsewhere: someone else handled it
            }
            tracing::warn!(id = %letter.id, reason = letter.reason, error = %letter.error,
                dead_stream = %self.s.dead_stream, "entry dead-lettered");
            self.metrics.dead_lettered_inc(letter.reason);
            self.stats.add(stats::field::DEAD_LETTERED, 1);
            if letter.reason != dead_letter::MAX_DELIVERIES {
                self.metrics.rejected.inc();
                self.stats.add(stats::field::REJECTED, 1);
            }
        }
        Ok(())
    }
}

/// Runs the core migrations at start-up, waiting for the database while it cannot be reached
/// (a pod starting before its database). Other migration errors (a modified or missing
/// migration, a failing statement) are returned: retrying cannot fix them. Several replicas may
/// run this at once; sqlx serializes them with an advisory lock. `Ok(false)` if cancelled first.
pub async fn migrate_core(
    pool: &PgPool,
    cancel: &CancellationToken,
) -> Result<bool, sqlx::migrate::MigrateError> {
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return Ok(false),
            r = crate::store::migrate(&crate::store::CORE_MIGRATIONS, pool) => r,
        };
        match attempt {
            Ok(()) => return Ok(true),
            Err(sqlx::migrate::MigrateError::Execute(e)) if is_unreachable(&e) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(error = %e, failures, "core database unreachable; migrations wait for it");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(backoff(failures)) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Errors that mean "the database is not reachable right now", not "the request is wrong".
fn is_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        // 08: connection exception; 57P03: cannot connect now (starting up or shutting down).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c == "57P03" || c == "57P01"),
        _ => false,
    }
}

/// Backoff while a store is down. The cap is low so an ingester resumes within about two
/// seconds of its stores returning.
fn backoff(failures: u32) -> Duration {
    retry::backoff(failures, Duration::from_millis(50), Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_config() {
        let c = Config::from_yaml_str(
            "pipeline: home\nreclaim: {minIdle: 300ms, interval: 200ms, maxDeliveries: 3}\nsources: [{name: deals}]\n",
        )
        .expect("valid");
        let s = IngestSettings::from_config(&c);
        assert_eq!(s.stream, "home.widget-events");
        assert_eq!(s.dead_stream, "home.widget-events.dead");
        assert_eq!(s.group, "core-ingester");
        assert_eq!(s.min_idle, Duration::from_millis(300));
        assert_eq!(s.reclaim_interval, Duration::from_millis(200));
        assert_eq!(s.max_deliveries, 3);
        assert_eq!(s.stats_key, "hw:home:stats");
    }
}
