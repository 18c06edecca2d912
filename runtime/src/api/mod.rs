//! The core API: serves whole screens of pre-computed widgets from the Redis hot cache in one
//! round trip, falls back to Postgres for misses, and degrades instead of failing.
//!
//! ```text
//! GET /v1/screens/{screen}[?user=ID]   the screen's configured widgets, in order
//! GET /v1/widgets?keys=k1,k2,...       an explicit list (at most 100 keys)
//! GET /healthz /readyz /metrics        on the admin port (`--admin-listen`)
//! ```
//!
//! Both answer `{"widgets":[...],"missing":[...]}` (`"screen"` too for screens), with a weak
//! `ETag` (304 on `If-None-Match`) and `x-widget-source: cache|database|mixed`. See
//! `docs/api.md`.

pub mod breaker;
pub mod error;
pub mod fetch;
pub mod identity;
pub mod local_cache;
pub mod metrics;
pub mod response;
pub mod screens;
pub mod widgets;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState, Readiness};
use crate::cache::{Cache, CacheWrite};
use crate::config::{Config, ScreenConfig, USER_PLACEHOLDER};
use crate::connect::{self, Conn};
use crate::stats::{self, Stats};

pub use breaker::{Breaker, State as CircuitState};
pub use error::ApiError;
pub use response::SOURCE_HEADER;

/// Most keys one `/v1/widgets` request may ask for.
pub const MAX_KEYS: usize = 100;

/// The readiness check of the API: passing while at least one store answers.
pub const READY_CHECK: &str = "core-api";

/// Everything the API needs from the pipeline config, plus its timeouts.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub screens: Vec<ScreenConfig>,
    pub key_prefix: String,
    pub stats_key: String,
    /// TTL of back-filled cache entries (`cache.fallbackTtl`).
    pub fallback_ttl: Duration,
    /// A request waits at most this long for Redis before using Postgres (well below the
    /// connection's own 2 s response timeout).
    pub redis_timeout: Duration,
    /// A request waits at most this long for Postgres (pool acquire included).
    pub database_timeout: Duration,
    /// Failed calls in a row that open a store's circuit.
    pub failure_threshold: u32,
    /// How often an open circuit's store is probed.
    pub probe_interval: Duration,
    pub stats_interval: Duration,
    /// Deadlines and limits of the API's port (`http` in the config).
    pub http: crate::config::HttpConfig,
    /// Who a request is (`identity` in the config).
    pub identity: identity::Identity,
    /// The configured sources: keys of any other are refused (400), never looked up.
    pub sources: Vec<String>,
    /// The in-process cache (`localCache` in the config).
    pub local_cache: crate::config::LocalCacheConfig,
    /// How long a key Postgres does not have is remembered in process (never longer than a
    /// cached widget lives, `min(fallbackTtl, ingestTtl)`).
    pub absent_ttl: Duration,
}

impl ApiSettings {
    /// The settings of `config`; a `jwt` identity without `keyFile` reads its keys from
    /// [`identity::KEYS_ENV`].
    pub fn from_config(config: &Config) -> Result<Self, identity::IdentityError> {
        let identity = identity::Identity::from_config(
            config.identity.as_ref(),
            std::env::var(identity::KEYS_ENV).ok(),
        )?;
        Ok(Self {
            screens: config.screens.clone(),
            key_prefix: config.key_prefix(),
            stats_key: config.stats_key(),
            fallback_ttl: config.cache.fallback_ttl,
            redis_timeout: Duration::from_millis(250),
            database_timeout: Duration::from_secs(1),
            failure_threshold: 3,
            probe_interval: Duration::from_millis(500),
            stats_interval: stats::FLUSH_INTERVAL,
            http: config.http.clone(),
            identity,
            sources: config.sources.iter().map(|s| s.name.clone()).collect(),
            local_cache: config.local_cache.clone(),
            absent_ttl: config.cache.fallback_ttl.min(config.cache.ingest_ttl),
        })
    }
}

/// A screen's keys, prepared once: those with `{user}` are filled per request.
#[derive(Debug, Clone)]
pub struct ScreenKeys {
    pub keys: Vec<String>,
    pub needs_user: bool,
}

/// The two stores the API reads, each behind its own circuit breaker.
#[derive(Debug, Clone, Copy)]
enum Store {
    Redis,
    Database,
}

/// State shared by every request.
pub struct Shared {
    pub settings: ApiSettings,
    screens: HashMap<String, ScreenKeys>,
    cache: Cache,
    /// Where cache reads, their invalidations and the probe go: the primary, or the replica
    /// `REDIS_READ_URL` names.
    redis: connect::Redis,
    /// The shared connections requests read through, in turn.
    lanes: Vec<Lane>,
    /// With a read replica: the primary's connection, for back-fills and stats (a replica
    /// refuses writes). Without one, writes take the read lanes.
    writer: Option<Lane>,
    next_lane: std::sync::atomic::AtomicUsize,
    /// The prober's own connection: a PING queued behind a large reply on the shared one
    /// would make a slow reply look like a dead Redis.
    probe_conn: ConnSlot,
    pool: PgPool,
    pub redis_breaker: Breaker,
    pub db_breaker: Breaker,
    pub flights: fetch::Flights,
    pub metrics: metrics::ApiMetrics,
    stats: Arc<Stats>,
    readiness: Readiness,
    /// The screens' personalised key templates, to guard `/v1/widgets`.
    pub personal: identity::PersonalKeys,
    /// What Redis holds, in process, kept coherent by invalidations.
    pub local: Arc<local_cache::LocalCache>,
}

impl Shared {
    /// A connection that takes writes, opened on first use (so the API starts while Redis is
    /// down).
    async fn redis_conn(&self) -> redis::RedisResult<Conn> {
        let lane = self.write_lane();
        lane.conn.get(&lane.endpoint).await
    }

    fn write_lane(&self) -> &Lane {
        self.writer.as_ref().unwrap_or_else(|| self.lane())
    }

    fn lane(&self) -> &Lane {
        let i = self
            .next_lane
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.lanes[i % self.lanes.len()]
    }

    /// Runs one Redis call under the request timeout and feeds the outcome to the breaker.
    ///
    /// A large reply can take longer than the request's budget on a Redis that is fine, so a
    /// timeout alone does not count against the breaker: the call goes on in the background,
    /// and its late reply shows the shared connection still works. The prober tells a slow
    /// reply from a dead Redis (its own connection) or a dead shared connection (timed-out
    /// calls and no reply at all for [`SHARED_DEAD_AFTER`]).
    async fn redis_call<T, F, Fut>(self: &Arc<Self>, call: F) -> Result<T, String>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.redis_call_via(self.lane(), true, call).await
    }

    /// Like [`Shared::redis_call`] on `lane`; with `breaker` false its failures do not count
    /// against the circuit (writes to a primary while reads go to a healthy replica).
    async fn redis_call_via<T, F, Fut>(
        self: &Arc<Self>,
        lane: &Lane,
        breaker: bool,
        call: F,
    ) -> Result<T, String>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let failed = |e: String| {
            if breaker {
                self.redis_failed(e)
            } else {
                self.metrics.store_error("redis");
                e
            }
        };
        let connect = lane.conn.get(&lane.endpoint);
        let conn = match tokio::time::timeout(self.settings.redis_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Err(_) => return Err(failed("connecting timed out".into())),
        };
        let mut attempt = Box::pin(call(conn));
        let error = tokio::select! {
            r = &mut attempt => match r {
                Ok(v) => {
                    lane.liveness.replied();
                    if breaker {
                        self.redis_breaker.record_success();
                    }
                    return Ok(v);
                }
                Err(e) => e.to_string(),
            },
            _ = tokio::time::sleep(self.settings.redis_timeout) => {
                self.metrics.store_error("redis");
                lane.liveness.timed_out();
                let lane = lane.liveness.clone();
                tokio::spawn(async move {
                    if attempt.await.is_ok() {
                        lane.replied();
                    }
                });
                return Err(format!("no answer within {:?}", self.settings.redis_timeout));
            }
        };
        Err(failed(error))
    }

    fn redis_failed(&self, error: String) -> String {
        self.metrics.store_error("redis");
        self.redis_breaker.record_failure(&error);
        error
    }

    async fn mget(self: &Arc<Self>, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, String> {
        let cmd = self.cache.mget(keys);
        self.redis_call(|mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    async fn write_cache(self: &Arc<Self>, writes: &[CacheWrite<'_>]) -> Result<Vec<bool>, String> {
        let cache = self.cache.clone();
        let owned: Vec<(String, i64, Option<Vec<u8>>, Duration)> = writes
            .iter()
            .map(|w| {
                (
                    w.widget_key.to_string(),
                    w.version,
                    w.json.map(<[u8]>::to_vec),
                    w.ttl,
                )
            })
            .collect();
        self.redis_call_via(
            self.write_lane(),
            self.writer.is_none(),
            |mut c| async move {
                let writes: Vec<CacheWrite<'_>> = owned
                    .iter()
                    .map(|(k, version, json, ttl)| CacheWrite {
                        widget_key: k,
                        version: *version,
                        json: json.as_deref(),
                        ttl: *ttl,
                    })
                    .collect();
                cache.write_many(&mut c, &writes).await
            },
        )
        .await
    }

    fn breaker(&self, store: Store) -> &Breaker {
        match store {
            Store::Redis => &self.redis_breaker,
            Store::Database => &self.db_breaker,
        }
    }

    async fn ping(&self, store: Store) -> Result<(), String> {
        match store {
            Store::Redis => self.ping_redis().await,
            Store::Database => self.ping_database().await,
        }
    }

    // Probes get the same time budget as requests: a store that answers a probe only with
    // more time than a request gets would close the circuit just to fail the next requests.
    async fn ping_redis(&self) -> Result<(), String> {
        // Connecting (once, then after each reconnect) is not what requests pay for: it gets
        // more time than the PING.
        let connect = self.probe_conn.get(&self.redis);
        let mut conn = match tokio::time::timeout(self.settings.redis_timeout * 4, connect).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("connecting timed out".into()),
        };
        let ping = redis::cmd("PING");
        let answer = tokio::time::timeout(
            self.settings.redis_timeout,
            ping.query_async::<String>(&mut conn),
        )
        .await;
        let outcome = match answer {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("PING timed out".into()),
        };
        if outcome.is_err() {
            // A half-open probe connection would keep the circuit open while Redis is fine.
            self.probe_conn.reset();
            return outcome;
        }
        // Redis answers; a shared connection may still be dead (half-open after a failover):
        // timed-out calls and not a single reply since.
        let mut replaced = 0;
        for lane in self.lanes.iter().chain(&self.writer) {
            if lane.liveness.silent_for() >= SHARED_DEAD_AFTER {
                lane.conn.reset();
                lane.liveness.replied();
                replaced += 1;
            }
        }
        if replaced > 0 {
            let all = self.lanes.len() + usize::from(self.writer.is_some());
            return Err(format!(
                "{replaced} of {all} shared connections stopped answering; replaced"
            ));
        }
        Ok(())
    }

    async fn ping_database(&self) -> Result<(), String> {
        let attempt = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool);
        match connect::within(self.settings.database_timeout, attempt).await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn update_readiness(&self) {
        match (self.redis_breaker.allows(), self.db_breaker.allows()) {
            (false, false) => self
                .readiness
                .fail(READY_CHECK, "neither Redis nor Postgres answers"),
            _ => self.readiness.pass(READY_CHECK),
        }
    }

    /// The screen's keys for this request, `{user}` filled in.
    pub fn screen_keys(&self, screen: &str) -> Option<&ScreenKeys> {
        self.screens.get(screen)
    }
}

/// A shared connection with timed-out calls and no reply for this long is replaced.
const SHARED_DEAD_AFTER: Duration = Duration::from_secs(2);

/// Shared connections per process: one multiplexed connection decodes every reply on one task,
/// which caps a busy API's reads at one core; one per core (at most 4) spreads them.
fn lane_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4))
}

/// A shared connection, where it goes, and whether it still delivers replies (late ones count).
struct Lane {
    endpoint: connect::Redis,
    conn: ConnSlot,
    liveness: Arc<Liveness>,
}

impl Lane {
    fn to(endpoint: &connect::Redis) -> Lane {
        Lane {
            endpoint: endpoint.clone(),
            conn: ConnSlot::default(),
            liveness: Arc::default(),
        }
    }
}

/// Where core-api reaches Redis: the primary, and optionally a replica (`REDIS_READ_URL`)
/// for every cache read and its invalidations, when the pipeline accepts replica lag. Writes
/// (back-fills, stats) always go to the primary.
#[derive(Clone, Debug)]
pub struct RedisEndpoints {
    pub primary: connect::Redis,
    pub read: Option<connect::Redis>,
}

impl From<connect::Redis> for RedisEndpoints {
    fn from(primary: connect::Redis) -> Self {
        RedisEndpoints {
            primary,
            read: None,
        }
    }
}

impl From<redis::Client> for RedisEndpoints {
    fn from(client: redis::Client) -> Self {
        connect::Redis::from(client).into()
    }
}

/// A Redis connection opened on first use and replaced when found dead.
#[derive(Default, Clone)]
struct ConnSlot(Arc<std::sync::Mutex<Slot>>);

type Connect = futures::future::Shared<futures::future::BoxFuture<'static, Result<Conn, String>>>;

#[derive(Default)]
struct Slot {
    /// Counts connects and resets: a connect finishes into the slot only if nothing happened
    /// to it since the connect began (a reset, found dead while connecting, or a newer connect
    /// must not be overwritten by an older one).
    generation: u64,
    state: SlotState,
}

#[derive(Default)]
enum SlotState {
    #[default]
    Empty,
    /// One connect runs on its own task, with the configured connect timeout: a request
    /// that stops waiting (its budget is shorter) must not abandon it, or on a slow host no
    /// connect would ever finish within a request's budget and the slot would stay empty.
    Connecting(Connect),
    Ready(Conn),
}

impl ConnSlot {
    async fn get(&self, redis: &connect::Redis) -> redis::RedisResult<Conn> {
        use futures::FutureExt;
        let (generation, pending) = {
            let Ok(mut slot) = self.0.lock() else {
                return redis.manager().await;
            };
            match &slot.state {
                SlotState::Ready(c) => return Ok(c.clone()),
                SlotState::Connecting(f) => (slot.generation, f.clone()),
                SlotState::Empty => {
                    slot.generation += 1;
                    let generation = slot.generation;
                    let (this, redis) = (self.clone(), redis.clone());
                    let task = tokio::spawn(async move {
                        let made = redis.manager().await;
                        this.settle(generation, made.as_ref().ok());
                        made.map_err(|e| e.to_string())
                    });
                    let f = async move { task.await.map_err(|e| e.to_string())? }
                        .boxed()
                        .shared();
                    slot.state = SlotState::Connecting(f.clone());
                    (generation, f)
                }
            }
        };
        let made = pending.await;
        if made.is_err() {
            // Also when the connect task itself ended without settling (it panicked).
            self.settle(generation, None);
        }
        made.map_err(|e| redis::RedisError::from((redis::ErrorKind::Io, "connecting", e)))
    }

    /// The connect of `generation` finished with `made`: the slot takes it, unless the slot
    /// moved on meanwhile.
    fn settle(&self, generation: u64, made: Option<&Conn>) {
        if let Ok(mut slot) = self.0.lock()
            && slot.generation == generation
            && matches!(slot.state, SlotState::Connecting(_))
        {
            slot.state = match made {
                Some(c) => SlotState::Ready(c.clone()),
                None => SlotState::Empty,
            };
        }
    }

    fn reset(&self) {
        if let Ok(mut slot) = self.0.lock() {
            slot.generation += 1;
            slot.state = SlotState::Empty;
        }
    }
}

/// When the shared connection last replied, and the first call that timed out since.
struct Liveness {
    start: Instant,
    /// Milliseconds since `start` of the first timeout without a reply after it; 0 = none.
    timed_out_at: std::sync::atomic::AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            start: Instant::now(),
            timed_out_at: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Liveness {
    fn now_ms(&self) -> u64 {
        (self.start.elapsed().as_millis() as u64).max(1)
    }

    fn replied(&self) {
        self.timed_out_at
            .store(0, std::sync::atomic::Ordering::SeqCst);
    }

    fn timed_out(&self) {
        let _ = self.timed_out_at.compare_exchange(
            0,
            self.now_ms(),
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// How long calls have been timing out with no reply at all (zero when none did).
    fn silent_for(&self) -> Duration {
        match self.timed_out_at.load(std::sync::atomic::Ordering::SeqCst) {
            0 => Duration::ZERO,
            t => Duration::from_millis(self.now_ms().saturating_sub(t)),
        }
    }
}

/// The API's request state (cheap to clone).
#[derive(Clone)]
pub struct ApiState(pub Arc<Shared>);

impl ApiState {
    pub fn new(
        settings: ApiSettings,
        redis: impl Into<RedisEndpoints>,
        pool: PgPool,
        registry: &mut Registry,
        readiness: Readiness,
    ) -> Self {
        let metrics = metrics::ApiMetrics::register(registry);
        let RedisEndpoints { primary, read } = redis.into();
        let writer = read.as_ref().map(|_| Lane::to(&primary));
        let redis = read.unwrap_or(primary);
        let screens = settings
            .screens
            .iter()
            .map(|s| {
                let keys = s.widgets.clone();
                let needs_user = keys.iter().any(|k| k.contains(USER_PLACEHOLDER));
                (s.name.clone(), ScreenKeys { keys, needs_user })
            })
            .collect();
        readiness.fail(READY_CHECK, "starting");
        let personal = identity::PersonalKeys::new(
            settings
                .screens
                .iter()
                .flat_map(|s| s.widgets.iter().map(String::as_str)),
        );
        let local = Arc::new(local_cache::LocalCache::new(
            settings.local_cache.enabled,
            settings.local_cache.max_bytes,
            &settings.key_prefix,
            settings.absent_ttl,
            &settings.screens,
            metrics.clone(),
        ));
        let shared = Shared {
            local,
            cache: Cache::new(settings.key_prefix.clone()),
            redis_breaker: Breaker::new(
                "redis",
                settings.failure_threshold,
                metrics.circuit_gauge("redis"),
            ),
            db_breaker: Breaker::new(
                "database",
                settings.failure_threshold,
                metrics.circuit_gauge("database"),
            ),
            settings,
            personal,
            screens,
            lanes: (0..lane_count()).map(|_| Lane::to(&redis)).collect(),
            writer,
            redis,
            next_lane: Default::default(),
            probe_conn: ConnSlot::default(),
            pool,
            flights: fetch::Flights::default(),
            metrics,
            stats: Arc::new(Stats::new()),
            readiness,
        };
        Self(Arc::new(shared))
    }
}

/// The API routes (without the admin ones).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/screens/{screen}", get(screens::get_screen))
        .route("/v1/widgets", get(widgets::get_widgets))
        // Covers the routes above (axum's own 405 has an empty body).
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn method_not_allowed() -> Response {
    let error = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "only GET (and HEAD) are supported",
    );
    ([(header::ALLOW, "GET, HEAD")], error).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route; see GET /v1/screens/{screen}")
}

/// Records each request's duration by route and status.
async fn track(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let res = next.run(req).await;
    state
        .0
        .metrics
        .request_seconds
        .get_or_create(&metrics::RouteLabels {
            route,
            status: res.status().as_u16(),
        })
        .observe(start.elapsed().as_secs_f64());
    res
}

/// The core-api component: build it, then [`CoreApi::run`] it.
pub struct CoreApi {
    state: ApiState,
}

impl CoreApi {
    pub fn new(
        settings: ApiSettings,
        redis: impl Into<RedisEndpoints>,
        pool: PgPool,
        registry: &mut Registry,
        readiness: Readiness,
    ) -> Self {
        Self {
            state: ApiState::new(settings, redis, pool, registry, readiness),
        }
    }

    pub fn state(&self) -> ApiState {
        self.state.clone()
    }

    /// Serves until `cancel` fires, with the breaker probes and the stats flusher beside it.
    /// The admin routes (/healthz, /readyz, /metrics) are served on `admin` when given, so an
    /// Ingress routing the API's port to the internet does not expose them; without it (`dev`,
    /// tests) they share the API's port.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        admin: Option<tokio::net::TcpListener>,
        admin_state: AdminState,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        let admin_routes = admin::router(admin_state);
        let (app, admin_server) = match admin {
            Some(admin_listener) => (
                router(self.state.clone()),
                Some(tokio::spawn(admin::serve(
                    admin_listener,
                    admin_routes,
                    cancel.clone(),
                ))),
            ),
            None => (router(self.state.clone()).merge(admin_routes), None),
        };
        let shared = self.state.0.clone();
        let background = cancel.child_token();
        let [redis_prober, db_prober] = [Store::Redis, Store::Database].map(|store| {
            let (s, c) = (shared.clone(), background.clone());
            tokio::spawn(async move {
                let b = s.breaker(store);
                let interval = s.settings.probe_interval;
                breaker::run_prober(b, interval, || s.ping(store), || s.update_readiness(), c).await
            })
        });
        if shared.settings.local_cache.enabled {
            tracing::info!(
                max_bytes = shared.settings.local_cache.max_bytes,
                "local cache on, kept coherent by Redis invalidations"
            );
        }
        let tasks = [
            redis_prober,
            db_prober,
            tokio::spawn(flush_stats(shared.clone(), background.clone())),
            tokio::spawn(
                shared
                    .local
                    .clone()
                    .track(shared.redis.clone(), background.clone()),
            ),
        ];
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "core-api listening");
        }
        let limits = self.state.0.settings.http.clone();
        let served = crate::server::serve(listener, app, &limits, cancel.clone()).await;
        background.cancel();
        for t in tasks {
            let _ = t.await;
        }
        if let Some(admin) = admin_server {
            admin.await.map_err(std::io::Error::other)??;
        }
        served
    }
}

/// Flushes the cache hit/miss counters to the pipeline's stats hash; waits for Redis first.
async fn flush_stats(shared: Arc<Shared>, cancel: CancellationToken) {
    let conn = loop {
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(3), shared.redis_conn()).await {
            break c;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(shared.settings.probe_interval) => {}
        }
    };
    shared
        .stats
        .run_flusher(
            conn,
            shared.settings.stats_key.clone(),
            shared.settings.stats_interval,
            cancel,
        )
        .await;
}

/// Builds the API from the config and serves it (with /healthz, /readyz, /metrics) on
/// `listener` until `cancel` fires. `registry` may already hold other components' metrics.
/// Where core-api listens: its public port, and the admin routes' own port (`None`: beside
/// the API, for `dev` and tests).
pub struct Listeners {
    pub api: tokio::net::TcpListener,
    pub admin: Option<tokio::net::TcpListener>,
}

pub async fn serve(
    config: &Config,
    redis: impl Into<RedisEndpoints>,
    pool: PgPool,
    listeners: Listeners,
    mut registry: Registry,
    readiness: Readiness,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let settings = ApiSettings::from_config(config)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let api = CoreApi::new(settings, redis, pool, &mut registry, readiness.clone());
    let admin_state = AdminState {
        readiness,
        registry: Arc::new(registry),
    };
    api.run(listeners.api, listeners.admin, admin_state, cancel)
        .await
}

/// Looks the keys up and renders the answer; 503 only when no store answered.
async fn answer(
    shared: &Arc<Shared>,
    screen: Option<(&str, Option<&str>)>,
    keys: &[String],
    headers: &axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let local = &shared.local;
    let ticket = local.ticket(keys);
    let stamp = screen.map(|(s, _)| local.screen_gen(s));
    let lookup = fetch::lookup(shared, keys, &ticket).await;
    if lookup.nothing_answered() {
        return Err(ApiError::unavailable());
    }
    let assembled = response::assemble(screen.map(|(s, _)| s), keys, &lookup);
    let res = response::respond(&assembled, headers);
    // A screen answered wholly from what Redis holds is kept whole: while none of its widgets
    // changes, the next request for it is one lookup and no assembly.
    if let (Some((name, user)), Some(stamp)) = (screen, stamp)
        && lookup.is_complete_from_cache()
    {
        local.put_screen(&ticket, stamp, name, user, keys, assembled);
    }
    Ok(res)
}

#[cfg(test)]
mod conn_slot {
    use super::*;

    async fn client_id(conn: &mut Conn) -> i64 {
        redis::cmd("CLIENT")
            .arg("ID")
            .query_async(conn)
            .await
            .expect("CLIENT ID")
    }

    /// A connect begun before a reset finishes after a newer one: the slot keeps the newer
    /// connection, which the requests after the reset were given.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connect_older_than_a_reset_never_replaces_the_newer_one() {
        let server = testkit::RedisServer::start().await.expect("redis");
        let redis = connect::Redis::open(&server.url(), &Default::default()).expect("url");
        let slot = ConnSlot::default();
        for _ in 0..5 {
            slot.reset();
            server.pause();
            let old = tokio::spawn({
                let (slot, redis) = (slot.clone(), redis.clone());
                async move { slot.get(&redis).await }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            slot.reset();
            let new = tokio::spawn({
                let (slot, redis) = (slot.clone(), redis.clone());
                async move { slot.get(&redis).await }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            server.resume();
            let (Ok(Ok(_old)), Ok(Ok(mut new))) = (old.await, new.await) else {
                panic!("both connects succeed once Redis answers again");
            };
            let mut kept = slot.get(&redis).await.expect("kept");
            assert_eq!(client_id(&mut kept).await, client_id(&mut new).await);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_connect_leaves_the_slot_empty_for_the_next_request() {
        let port = testkit::free_port().expect("port");
        let redis =
            connect::Redis::open(&format!("redis://127.0.0.1:{port}/"), &Default::default())
                .expect("url");
        let slot = ConnSlot::default();
        assert!(slot.get(&redis).await.is_err(), "nothing listens");
        let state = slot.0.lock().map(|s| matches!(s.state, SlotState::Empty));
        assert_eq!(state.ok(), Some(true));
    }
}
