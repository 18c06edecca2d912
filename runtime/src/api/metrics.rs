//! Prometheus metrics of the core API, all prefixed `widget_api_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub store: &'static str,
}

#[derive(Clone)]
pub struct ApiMetrics {
    pub request_seconds: Family<RouteLabels, Histogram>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    /// Postgres queries made for cache misses (one per single-flight batch).
    pub fallback_reads: Counter,
    /// Keys asked of Postgres.
    pub fallback_keys: Counter,
    /// Requests that joined another request's Postgres read instead of making their own.
    pub coalesced_keys: Counter,
    pub backfilled: Counter,
    pub absent_cached: Counter,
    pub store_errors: Family<StoreLabels, Counter>,
    /// 1 while a store's circuit breaker is open, else 0.
    pub circuit_open: Family<StoreLabels, Gauge>,
    /// Keys served from the in-process cache.
    pub local_hits: Counter,
    /// Whole screens served as assembled before (nothing they show changed).
    pub local_screens: Counter,
    pub local_invalidations: Counter,
    pub local_flushes: Counter,
    /// Bytes the in-process cache holds (by its weigher).
    pub local_bytes: Gauge,
}

impl ApiMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            request_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 18))
            }),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            fallback_reads: Counter::default(),
            fallback_keys: Counter::default(),
            coalesced_keys: Counter::default(),
            backfilled: Counter::default(),
            absent_cached: Counter::default(),
            store_errors: Family::default(),
            circuit_open: Family::default(),
            local_hits: Counter::default(),
            local_screens: Counter::default(),
            local_invalidations: Counter::default(),
            local_flushes: Counter::default(),
            local_bytes: Gauge::default(),
        };
        registry.register(
            "widget_api_local_hits",
            "Keys served from the in-process cache (kept coherent by Redis invalidations)",
            m.local_hits.clone(),
        );
        registry.register(
            "widget_api_local_screens",
            "Screens served whole as assembled before, none of their widgets having changed",
            m.local_screens.clone(),
        );
        registry.register(
            "widget_api_local_invalidations",
            "Invalidations Redis pushed for cache keys",
            m.local_invalidations.clone(),
        );
        registry.register(
            "widget_api_local_flushes",
            "Times the whole in-process cache was dropped (tracking lost, null invalidation)",
            m.local_flushes.clone(),
        );
        registry.register(
            "widget_api_local_bytes",
            "Bytes held by the in-process cache",
            m.local_bytes.clone(),
        );
        registry.register(
            "widget_api_request_duration_seconds",
            "Time to answer an API request, by route and status",
            m.request_seconds.clone(),
        );
        registry.register(
            "widget_api_cache_hits",
            "Widget keys answered from the Redis cache (a tombstone counts as a hit)",
            m.cache_hits.clone(),
        );
        registry.register(
            "widget_api_cache_misses",
            "Widget keys not answered from the Redis cache (absent, or Redis unavailable)",
            m.cache_misses.clone(),
        );
        registry.register(
            "widget_api_fallback_reads",
            "Postgres reads made for cache misses (one query per batch of keys)",
            m.fallback_reads.clone(),
        );
        registry.register(
            "widget_api_fallback_keys",
            "Widget keys looked up in Postgres",
            m.fallback_keys.clone(),
        );
        registry.register(
            "widget_api_coalesced_keys",
            "Missed keys that waited for a Postgres read already in flight (single-flight)",
            m.coalesced_keys.clone(),
        );
        registry.register(
            "widget_api_backfilled",
            "Widgets written back to the cache with the fallback TTL (version-guarded)",
            m.backfilled.clone(),
        );
        registry.register(
            "widget_api_absent_cached",
            "Keys Postgres does not have, remembered in process (never written to Redis)",
            m.absent_cached.clone(),
        );
        registry.register(
            "widget_api_store_errors",
            "Failed or timed-out calls to a store",
            m.store_errors.clone(),
        );
        registry.register(
            "widget_api_circuit_open",
            "1 while the store's circuit breaker is open (requests skip the store), else 0",
            m.circuit_open.clone(),
        );
        m
    }

    /// The circuit gauge of one store (shared with the family, so it shows in /metrics).
    pub fn circuit_gauge(&self, store: &'static str) -> Gauge {
        self.circuit_open
            .get_or_create(&StoreLabels { store })
            .clone()
    }
}

impl ApiMetrics {
    pub fn store_error(&self, store: &'static str) {
        self.store_errors
            .get_or_create(&StoreLabels { store })
            .inc();
    }
}
