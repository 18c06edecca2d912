//! Pipeline counters shared through Redis, so the operator can report status from Redis alone.
//!
//! Every component keeps local deltas and flushes them every few seconds into one hash per
//! pipeline ([`crate::config::Config::stats_key`], e.g. `hw:home:stats`): counters with
//! HINCRBY (so replicas add up), gauges with HSET (the latest reading wins).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

/// Field names of the stats hash. Counters are cumulative totals over all replicas.
pub mod field {
    pub const APPLIED: &str = "applied";
    pub const STALE: &str = "stale";
    pub const REJECTED: &str = "rejected";
    pub const RECLAIMED: &str = "reclaimed";
    pub const DEAD_LETTERED: &str = "dead_lettered";
    pub const CACHE_HITS: &str = "cache_hits";
    pub const CACHE_MISSES: &str = "cache_misses";
    pub const PUBLISHED: &str = "published";
    /// Gauge prefix: `outbox_backlog.<source>` is that source's unpublished outbox rows.
    pub const OUTBOX_BACKLOG_PREFIX: &str = "outbox_backlog.";
    /// `outbox_backlog_at.<source>`: unix ms of that reading.
    pub const OUTBOX_BACKLOG_AT_PREFIX: &str = "outbox_backlog_at.";
    /// Ingress lag (outbox insert to ACK) of the most recent flush window of any ingester.
    pub const INGRESS_LAG_P50_MS: &str = "ingress_lag_p50_ms";
    pub const INGRESS_LAG_P99_MS: &str = "ingress_lag_p99_ms";
    pub const INGRESS_LAG_AT: &str = "ingress_lag_at";
    /// Gauge prefix: `outbox_retained.<source>` is that source's relayed rows still waiting for
    /// the core side's confirmation (kept for replay).
    pub const OUTBOX_RETAINED_PREFIX: &str = "outbox_retained.";
    /// Gauge prefix: `outbox_retention_capped.<source>` is 1 from the moment that source deletes
    /// relayed rows still unconfirmed (past `retention` or `maxRetainedRows`) until ten minutes
    /// after it last did.
    pub const OUTBOX_RETENTION_CAPPED_PREFIX: &str = "outbox_retention_capped.";
    /// Relayed, unconfirmed rows deleted by the retention cap (all sources).
    pub const RETENTION_EXPIRED: &str = "retention_expired";
    /// Rows published again after Redis lost data (all sources).
    pub const REPLAYED: &str = "replayed";
    /// Times a component found the stream epoch gone or changed (summed over components).
    pub const REDIS_LOSS_DETECTED: &str = "redis_loss_detected";
    /// Gauge: 1 when Redis' `maxmemory-policy` can evict the stream (`allkeys-*`).
    pub const REDIS_EVICTION_UNSAFE: &str = "redis_eviction_unsafe";
    /// Widgets written to the cache by re-warms, and a gauge that is 1 while one runs.
    pub const WARM_WRITTEN: &str = "warm_written";
    pub const WARM_ACTIVE: &str = "warm_active";
    /// Unix ms of the last flush by any component.
    pub const UPDATED_AT: &str = "updated_at";
}

/// How often components flush their counters.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Local counters and gauges waiting to be flushed. Cheap to bump from hot paths.
#[derive(Default)]
pub struct Stats {
    counters: Mutex<HashMap<&'static str, u64>>,
    gauges: Mutex<HashMap<String, i64>>,
    lag_window_ms: Mutex<Vec<u64>>,
    flushes: AtomicU64,
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&self, counter: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut c) = self.counters.lock() {
            *c.entry(counter).or_default() += n;
        }
    }

    pub fn set_gauge(&self, field: String, value: i64) {
        if let Ok(mut g) = self.gauges.lock() {
            g.insert(field, value);
        }
    }

    /// Records one ingress-lag sample for the current window.
    pub fn observe_lag_ms(&self, ms: u64) {
        if let Ok(mut w) = self.lag_window_ms.lock() {
            // Bound memory under extreme load: a window keeps at most 100k samples.
            if w.len() < 100_000 {
                w.push(ms);
            }
        }
    }

    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Writes pending deltas to the hash in one MULTI/EXEC. On failure the deltas are put back,
    /// so nothing is lost while Redis is away.
    pub async fn flush<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        stats_key: &str,
    ) -> redis::RedisResult<()> {
        let counters = self
            .counters
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        let gauges = self
            .gauges
            .lock()
            .map(|mut g| std::mem::take(&mut *g))
            .unwrap_or_default();
        let lags = self
            .lag_window_ms
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        let now = unix_ms();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (name, n) in &counters {
            pipe.hincr(stats_key, *name, *n).ignore();
        }
        for (name, v) in &gauges {
            pipe.hset(stats_key, name, *v).ignore();
        }
        if !lags.is_empty() {
            let (p50, p99) = percentiles(lags.clone());
            pipe.hset(stats_key, field::INGRESS_LAG_P50_MS, p50)
                .ignore();
            pipe.hset(stats_key, field::INGRESS_LAG_P99_MS, p99)
                .ignore();
            pipe.hset(stats_key, field::INGRESS_LAG_AT, now).ignore();
        }
        pipe.hset(stats_key, field::UPDATED_AT, now).ignore();
        match pipe.query_async::<()>(conn).await {
            Ok(()) => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // Kept for the next flush. If the transaction did run and only its reply was
                // lost, these are counted twice: the hash's totals are operational figures for
                // the status, at-least counts; the Prometheus counters stay exact.
                for (name, n) in counters {
                    self.add(name, n);
                }
                if let Ok(mut g) = self.gauges.lock() {
                    for (k, v) in gauges {
                        g.entry(k).or_insert(v);
                    }
                }
                Err(e)
            }
        }
    }

    /// Connects (retrying while Redis is down), then flushes every `interval` until cancelled.
    pub async fn flush_until_cancelled(
        &self,
        client: crate::connect::Redis,
        stats_key: String,
        interval: Duration,
        cancel: CancellationToken,
    ) {
        let conn = loop {
            match client.manager().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::debug!(error = %e, "stats flusher cannot reach Redis yet");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(interval.min(Duration::from_secs(1))) => {}
                    }
                }
            }
        };
        self.run_flusher(conn, stats_key, interval, cancel).await;
    }

    /// Flushes every `interval` until cancelled, then once more.
    pub async fn run_flusher(
        &self,
        mut conn: crate::connect::Conn,
        stats_key: String,
        interval: Duration,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
            if let Err(e) = self.flush(&mut conn, &stats_key).await {
                tracing::debug!(error = %e, "stats flush failed; will retry");
            }
        }
        let _ = self.flush(&mut conn, &stats_key).await;
    }
}

/// p50 and p99 of a sample (nearest-rank).
pub fn percentiles(mut v: Vec<u64>) -> (u64, u64) {
    if v.is_empty() {
        return (0, 0);
    }
    v.sort_unstable();
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.50), at(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        assert_eq!(percentiles(vec![]), (0, 0));
        assert_eq!(percentiles(vec![5]), (5, 5));
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentiles(v), (50, 99));
    }
}
