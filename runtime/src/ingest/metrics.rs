//! Prometheus metrics of the ingester, all prefixed `widget_ingest_`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set with one `reason` or `store` label.
pub type Labels = Vec<(String, String)>;

#[derive(Clone)]
pub struct IngestMetrics {
    /// Changes that won the version guard and are now stored.
    pub applied: Counter,
    /// Changes an equal or newer version had already superseded (duplicates, reorders).
    pub stale: Counter,
    /// Entries rejected at decode (undecodable, rule violation, foreign namespace).
    pub rejected: Counter,
    /// Entries taken over from idle consumers by XAUTOCLAIM.
    pub reclaimed: Counter,
    /// Entries moved to the dead-letter stream, by reason.
    pub dead_lettered: Family<Labels, Counter>,
    /// Entries the database refused one by one; left pending for reclaim.
    pub db_rejected: Counter,
    /// Pending entries XAUTOCLAIM found already trimmed from the stream.
    pub reclaim_deleted: Counter,
    /// Consumers removed from the group (gone: nothing pending, idle past `idleConsumerTtl`).
    pub consumers_removed: Counter,
    /// Times the consumer group had to be created again (Redis lost it).
    pub group_recreated: Counter,
    /// New stream epochs this ingester started because Redis lost data or restarted.
    pub loss_detected: Counter,
    /// Dead letters trimmed unread by the dead-letter stream's length cap.
    pub dead_letters_trimmed: Counter,
    /// 1 when Redis' maxmemory-policy may evict the stream.
    pub eviction_unsafe: prometheus_client::metrics::gauge::Gauge,
    /// Failed attempts against a store, by store (`redis`, `database`).
    pub errors: Family<Labels, Counter>,
    /// Outbox insert to ACK, in seconds.
    pub lag_seconds: Histogram,
    pub batch_size: Histogram,
    pub batch_seconds: Histogram,
}

impl IngestMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            applied: Counter::default(),
            stale: Counter::default(),
            rejected: Counter::default(),
            reclaimed: Counter::default(),
            dead_lettered: Family::default(),
            db_rejected: Counter::default(),
            reclaim_deleted: Counter::default(),
            group_recreated: Counter::default(),
            loss_detected: Counter::default(),
            dead_letters_trimmed: Counter::default(),
            eviction_unsafe: Default::default(),
            consumers_removed: Counter::default(),
            errors: Family::default(),
            // 1 ms .. ~65 s
            lag_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            // 0.5 ms .. ~16 s
            batch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        };
        registry.register(
            "widget_ingest_applied",
            "Changes that won the version guard and were stored",
            m.applied.clone(),
        );
        registry.register(
            "widget_ingest_stale",
            "Changes already superseded by an equal or newer version",
            m.stale.clone(),
        );
        registry.register(
            "widget_ingest_rejected",
            "Entries rejected at decode (undecodable, invalid, foreign namespace)",
            m.rejected.clone(),
        );
        registry.register(
            "widget_ingest_reclaimed",
            "Entries taken over from idle consumers with XAUTOCLAIM",
            m.reclaimed.clone(),
        );
        registry.register(
            "widget_ingest_dead_lettered",
            "Entries moved to the dead-letter stream, by reason",
            m.dead_lettered.clone(),
        );
        registry.register(
            "widget_ingest_db_rejected",
            "Entries the database refused; left pending to be retried via reclaim",
            m.db_rejected.clone(),
        );
        registry.register(
            "widget_ingest_reclaim_deleted",
            "Pending entries found already trimmed from the stream during reclaim",
            m.reclaim_deleted.clone(),
        );
        registry.register(
            "widget_ingest_dead_letters_trimmed",
            "Dead letters trimmed unread by the dead-letter stream's length cap (stream.maxLength)",
            m.dead_letters_trimmed.clone(),
        );
        registry.register(
            "widget_ingest_redis_loss_detected",
            "New stream epochs started because Redis lost data or restarted",
            m.loss_detected.clone(),
        );
        registry.register(
            "widget_ingest_redis_eviction_unsafe",
            "1 when Redis' maxmemory-policy may evict the stream (allkeys-*)",
            m.eviction_unsafe.clone(),
        );
        registry.register(
            "widget_ingest_group_recreated",
            "Times the consumer group was re-created after Redis lost it",
            m.group_recreated.clone(),
        );
        registry.register(
            "widget_ingest_consumers_removed",
            "Consumers removed from the group: nothing pending and idle past reclaim.idleConsumerTtl",
            m.consumers_removed.clone(),
        );
        registry.register(
            "widget_ingest_errors",
            "Failed attempts against a store, by store",
            m.errors.clone(),
        );
        registry.register(
            "widget_ingest_lag_seconds",
            "Ingress lag: outbox insert to ACK by the ingester",
            m.lag_seconds.clone(),
        );
        registry.register(
            "widget_ingest_batch_size",
            "Entries per processed batch",
            m.batch_size.clone(),
        );
        registry.register(
            "widget_ingest_batch_duration_seconds",
            "Time to decode, store, cache and acknowledge one batch",
            m.batch_seconds.clone(),
        );
        m
    }

    pub fn dead_lettered_inc(&self, reason: &str) {
        self.dead_lettered
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    pub fn error_inc(&self, store: &'static str) {
        self.errors
            .get_or_create(&vec![("store".into(), store.into())])
            .inc();
    }
}
