//! The pipeline configuration: one typed struct loaded from YAML, validated once at start-up.
//!
//! The file format is shared with the operator, which renders this exact struct into the
//! pipeline's ConfigMap; field names mirror the `WidgetPipeline` spec (camelCase). Secrets
//! (database and Redis URLs) never live here: they come from the environment.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config_env::{self, process_env};
use crate::event::{KeyError, WidgetKey};

/// Longest pipeline/source/screen name accepted; names end up in Kubernetes object names.
pub const MAX_NAME_LEN: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid YAML for a pipeline: {0}")]
    Parse(String),
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("config override from the environment: {0}")]
    Env(String),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub pipeline: String,
    #[serde(default)]
    pub stream: StreamConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub reclaim: ReclaimConfig,
    pub sources: Vec<SourceConfig>,
    #[serde(default)]
    pub screens: Vec<ScreenConfig>,
    /// Deadlines of every Postgres connection (the core database and each product database).
    #[serde(default)]
    pub database: DatabaseConfig,
    /// Deadlines of every Redis connection.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Deadlines and limits of core-api's HTTP port.
    #[serde(default)]
    pub http: HttpConfig,
    /// Where core-api takes the user of a personalised screen from. Without it, personalised
    /// widgets are never served (401).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityConfig>,
    /// core-api's in-process cache of widget JSON, kept coherent with Redis by invalidations.
    #[serde(default)]
    pub local_cache: LocalCacheConfig,
}

/// core-api's in-process cache (`localCache`): on by default with a modest bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LocalCacheConfig {
    pub enabled: bool,
    /// Bytes of widget JSON (plus keys and bookkeeping) held at most; a quarter more holds the
    /// keys known to be absent.
    pub max_bytes: u64,
}

impl Default for LocalCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Deadlines and limits of an HTTP port; see [`crate::server`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A request head must arrive whole within this; idle keep-alive connections are closed
    /// after it. Keep a load balancer's idle timeout below it.
    #[serde(with = "human_duration")]
    pub header_timeout: Duration,
    /// A request is answered within this, or gets a 503.
    #[serde(with = "human_duration")]
    pub request_timeout: Duration,
    /// A client that reads nothing of its answer for this long is cut off.
    #[serde(with = "human_duration")]
    pub write_timeout: Duration,
    /// Open connections; past it, new ones get an immediate 503 and are closed.
    pub max_connections: usize,
    /// Requests in flight; past it, requests are shed at once with a 503 (never queued).
    pub max_requests: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_requests: 512,
        }
    }
}

/// How core-api learns who is asking; see `docs/api.md#identity`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityConfig {
    pub mode: IdentityMode,
    /// `header` mode: the request header a trusted gateway sets to the verified user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// `jwt` mode: how tokens are validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IdentityMode {
    /// `Authorization: Bearer <JWT>`, validated by core-api.
    Jwt,
    /// A header set by a trusted gateway in front of core-api.
    Header,
    /// `?user=ID`, unverified: for local use and demos only.
    Query,
}

/// Validation of bearer tokens. The keys are public keys (asymmetric algorithms only, so a
/// key can never be used to forge a token): a PEM key or a JWKS document, from `keyFile` or
/// from the `IDENTITY_JWT_KEYS` environment variable (the operator fills it from a Secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required in `aud`.
    pub audience: String,
    /// The claim that names the user.
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// Accepted `alg` values.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// A PEM public key or a JWKS JSON document, re-read when it changes (a mounted Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "human_duration")]
    pub leeway: Duration,
}

fn default_user_claim() -> String {
    "sub".into()
}
fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

/// Algorithms a `jwt` identity may accept: public-key signatures only.
pub const JWT_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Defaults to `<pipeline>.widget-events`; see [`Config::stream_name`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub consumer_group: String,
    /// The stream is trimmed only below what the group consumed; relaying stops before
    /// `lag + pending` would pass this (back-pressure into the outbox).
    pub max_length: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            name: None,
            consumer_group: "core-ingester".into(),
            max_length: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Defaults to `hw:<pipeline>:`; see [`Config::key_prefix`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    #[serde(with = "human_duration")]
    pub ingest_ttl: Duration,
    #[serde(with = "human_duration")]
    pub fallback_ttl: Duration,
    /// Widgets per second written when the cache is re-warmed from Postgres after Redis lost
    /// its data (see `warm`); 0 turns the re-warm off (misses are then back-filled one by one).
    pub warm_rate: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            key_prefix: None,
            ingest_ttl: Duration::from_secs(7 * 24 * 3600),
            fallback_ttl: Duration::from_secs(3600),
            warm_rate: 5000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ReclaimConfig {
    #[serde(with = "human_duration")]
    pub min_idle: Duration,
    #[serde(with = "human_duration")]
    pub interval: Duration,
    pub max_deliveries: u32,
    /// Consumers of the group with nothing pending that have not read for this long are
    /// removed, so the group does not collect one consumer per ingester pod ever started.
    #[serde(with = "human_duration")]
    pub idle_consumer_ttl: Duration,
}

impl Default for ReclaimConfig {
    fn default() -> Self {
        Self {
            min_idle: Duration::from_secs(30),
            interval: Duration::from_secs(15),
            max_deliveries: 5,
            idle_consumer_ttl: Duration::from_secs(3600),
        }
    }
}

/// How long a Postgres connection may take for each thing it does. A store that stops
/// answering (a failed primary, a partition) must turn into an error within a stated time, so
/// the component reports not-ready, keeps its batch for a retry, and stops on SIGTERM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Opening a connection (TCP, TLS, authentication), and waiting for a free pooled one.
    #[serde(with = "human_duration")]
    pub connect_timeout: Duration,
    /// Every statement: the server's `statement_timeout` and a client-side deadline of the same
    /// length (a server that stops answering cannot cancel anything itself).
    #[serde(with = "human_duration")]
    pub statement_timeout: Duration,
    /// The server ends a session left idle inside a transaction this long, releasing its locks
    /// (`idle_in_transaction_session_timeout`): an outbox claim's row locks do not outlive a
    /// worker that lost its connection mid-relay.
    #[serde(with = "human_duration")]
    pub idle_in_transaction_timeout: Duration,
    /// Pooled connections unused this long are closed.
    #[serde(with = "human_duration")]
    pub idle_timeout: Duration,
    /// TCP keepalive idle time of the server's side of each connection (`tcp_keepalives_idle`,
    /// probes every third of it, three lost probes end the session), so the server frees the
    /// sessions and locks of clients that vanished.
    #[serde(with = "human_duration")]
    pub keepalive: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
            idle_in_transaction_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(300),
            keepalive: Duration::from_secs(30),
        }
    }
}

/// What `REDIS_URL` points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RedisMode {
    #[default]
    Standalone,
    /// Redis Cluster (or a Valkey cluster): commands go to the node owning their keys' slot,
    /// and the keys one script or transaction touches together share a hash tag.
    Cluster,
}

/// The hash tag of a Redis key: what a cluster hashes instead of the whole key (the part
/// between the first `{` and the next `}`, when not empty).
pub fn hash_tag(key: &str) -> Option<&str> {
    let (_, rest) = key.split_once('{')?;
    let (tag, _) = rest.split_once('}')?;
    (!tag.is_empty()).then_some(tag)
}

/// How long a Redis connection may take for each thing it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RedisConfig {
    /// One server (or a primary with replicas behind one address), or a Redis Cluster whose
    /// nodes are found from the URL's node.
    pub mode: RedisMode,
    /// Opening a connection (TCP and the handshake).
    #[serde(with = "human_duration")]
    pub connect_timeout: Duration,
    /// Every command's reply (a blocking read gets its block time on top).
    #[serde(with = "human_duration")]
    pub response_timeout: Duration,
    /// TCP keepalive idle time of every socket (probes every third of it); a connection whose
    /// probes or data go unacknowledged for twice this long is closed by the kernel
    /// (`TCP_USER_TIMEOUT`), so a partition ends in a reconnect instead of a silent hang.
    #[serde(with = "human_duration")]
    pub keepalive: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            keepalive: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    #[serde(default = "default_outbox_table")]
    pub outbox_table: String,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default = "default_poll_interval", with = "human_duration")]
    pub poll_interval: Duration,
    /// Relayed rows are kept until the core side confirms it applied them, so they can be
    /// replayed if Redis loses the stream. A row still unconfirmed after this long is deleted
    /// anyway (counted, logged and reported): the bound on growth while the core side is down.
    #[serde(default = "default_retention", with = "human_duration")]
    pub retention: Duration,
    /// The same bound in rows: beyond it the oldest relayed, unconfirmed rows are deleted.
    #[serde(default = "default_max_retained_rows")]
    pub max_retained_rows: u64,
}

fn default_outbox_table() -> String {
    crate::outbox::DEFAULT_TABLE.into()
}
fn default_batch_size() -> u32 {
    500
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(250)
}
fn default_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_max_retained_rows() -> u64 {
    1_000_000
}

impl SourceConfig {
    /// A source with every optional field at its default.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            outbox_table: default_outbox_table(),
            batch_size: default_batch_size(),
            poll_interval: default_poll_interval(),
            retention: default_retention(),
            max_retained_rows: default_max_retained_rows(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScreenConfig {
    pub name: String,
    /// Ordered widget keys; a key may contain the placeholder `{user}`.
    pub widgets: Vec<String>,
}

/// The placeholder in a screen's widget key that the request's `user` replaces.
pub const USER_PLACEHOLDER: &str = "{user}";

impl Config {
    /// Reads, parses and validates a config file.
    /// Reads the file, applies `WIDGET__...` overrides from the process environment (see
    /// [`crate::config_env`]) and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml_str_with_env(&text, process_env())
    }

    /// Parses a config document, applies the `WIDGET__...` overrides among `vars`, validates.
    pub fn from_yaml_str_with_env(
        text: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let overrides = config_env::overrides(vars).map_err(ConfigError::Env)?;
        if overrides.is_empty() {
            return Self::from_yaml_str(text);
        }
        let mut doc: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        for o in &overrides {
            config_env::apply(&mut doc, o).map_err(ConfigError::Env)?;
        }
        let names: Vec<&str> = overrides.iter().map(|o| o.var.as_str()).collect();
        let config: Config = serde_yaml::from_value(doc).map_err(|e| {
            ConfigError::Parse(format!(
                "{e} (after environment overrides {})",
                names.join(", ")
            ))
        })?;
        config.validate()?;
        tracing::info!(overrides = ?names, "config fields overridden from the environment");
        Ok(config)
    }

    /// Parses and validates a config document.
    pub fn from_yaml_str(text: &str) -> Result<Self, ConfigError> {
        // serde_yaml's messages name the offending field and its position (e.g. "unknown field
        // `batchsize`, expected one of ... at line 7 column 5").
        let config: Config =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_yaml(&self) -> String {
        // Serializing plain structs of strings, numbers and lists cannot fail.
        serde_yaml::to_string(self).unwrap_or_default()
    }

    /// Every key the pipeline's scripts and transactions touch together is named after the
    /// stream (dead letters, epoch, confirmations, re-warm), so in a cluster the stream's hash
    /// tag puts them all in one slot.
    pub fn stream_name(&self) -> String {
        match (&self.stream.name, self.redis.mode) {
            (Some(name), _) => name.clone(),
            (None, RedisMode::Standalone) => format!("{}.widget-events", self.pipeline),
            (None, RedisMode::Cluster) => format!("{{{}}}.widget-events", self.pipeline),
        }
    }

    /// Where entries that cannot be applied go, with the reason.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}.dead", self.stream_name())
    }

    pub fn key_prefix(&self) -> String {
        self.cache
            .key_prefix
            .clone()
            .unwrap_or_else(|| format!("hw:{}:", self.pipeline))
    }

    /// The stream's epoch marker; see [`crate::durability`].
    pub fn epoch_key(&self) -> String {
        format!("{}.epoch", self.stream_name())
    }

    /// The set of outbox ids of `source` whose events the core side has durably applied.
    pub fn confirmed_key(&self, source: &str) -> String {
        crate::durability::confirmed_key(&self.stream_name(), source)
    }

    /// Re-warm bookkeeping: which epoch the cache was last warmed for, the lock, the cursor.
    pub fn warm_key(&self, part: &str) -> String {
        format!("{}.warm.{part}", self.stream_name())
    }

    /// The Redis hash every component flushes its counters to; see [`crate::stats`].
    pub fn stats_key(&self) -> String {
        format!("{}stats", self.key_prefix())
    }

    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }

    pub fn screen(&self, name: &str) -> Option<&ScreenConfig> {
        self.screens.iter().find(|s| s.name == name)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name("pipeline", &self.pipeline)?;
        if let Some(name) = &self.stream.name {
            check_redis_name("stream.name", name)?;
        }
        check_redis_name("stream.consumerGroup", &self.stream.consumer_group)?;
        if self.local_cache.max_bytes < 1024 * 1024 {
            return Err(invalid(
                "localCache.maxBytes",
                format!(
                    "must be at least 1 MiB (1048576), got {}",
                    self.local_cache.max_bytes
                ),
            ));
        }
        if self.stream.max_length < 1000 {
            return Err(invalid(
                "stream.maxLength",
                format!("must be at least 1000, got {}", self.stream.max_length),
            ));
        }
        if let Some(prefix) = &self.cache.key_prefix {
            check_redis_name("cache.keyPrefix", prefix)?;
        }
        if self.redis.mode == RedisMode::Cluster {
            // A stream without a tag would spread its dead letters and markers over other
            // slots (CROSSSLOT in every script); a tagged cache prefix would put every widget
            // of the pipeline in one slot, on one node.
            if let Some(name) = &self.stream.name
                && hash_tag(name).is_none()
            {
                return Err(invalid(
                    "stream.name",
                    format!(
                        "`{name}` needs a hash tag in cluster mode (e.g. `{{{}}}.widget-events`): \
                         the keys beside the stream must share its slot",
                        self.pipeline
                    ),
                ));
            }
            if let Some(tag) = hash_tag(&self.key_prefix()) {
                return Err(invalid(
                    "cache.keyPrefix",
                    format!(
                        "must not carry a hash tag in cluster mode (`{{{tag}}}` would put every \
                         widget in one slot, on one node)"
                    ),
                ));
            }
        }
        // Floors, not just "non-zero": below them a setting turns into a busy loop (`1ns` polls),
        // a reclaim that steals entries other replicas are still processing (min-idle 0), or
        // cache values that expire as they are written (`PX 1`).
        at_least(
            "cache.ingestTtl",
            self.cache.ingest_ttl,
            Duration::from_secs(60),
        )?;
        at_least(
            "cache.fallbackTtl",
            self.cache.fallback_ttl,
            Duration::from_secs(1),
        )?;
        at_least(
            "reclaim.minIdle",
            self.reclaim.min_idle,
            Duration::from_millis(100),
        )?;
        at_least(
            "reclaim.interval",
            self.reclaim.interval,
            Duration::from_millis(100),
        )?;
        if self.reclaim.max_deliveries == 0 {
            return Err(invalid("reclaim.maxDeliveries", "must be at least 1"));
        }
        // A live ingester reads at least every few seconds; a shorter TTL could remove one
        // between two reads (harmless, it comes back, but noisy).
        if self.reclaim.idle_consumer_ttl < Duration::from_secs(60) {
            return Err(invalid(
                "reclaim.idleConsumerTtl",
                "must be at least 1m (consumers idle this long with nothing pending are removed)",
            ));
        }
        let (db, redis) = (&self.database, &self.redis);
        at_least(
            "database.connectTimeout",
            db.connect_timeout,
            Duration::from_millis(100),
        )?;
        at_least(
            "database.statementTimeout",
            db.statement_timeout,
            Duration::from_millis(100),
        )?;
        at_least(
            "database.idleInTransactionTimeout",
            db.idle_in_transaction_timeout,
            Duration::from_secs(1),
        )?;
        at_least(
            "database.idleTimeout",
            db.idle_timeout,
            Duration::from_secs(1),
        )?;
        at_least("database.keepalive", db.keepalive, Duration::from_secs(1))?;
        at_least(
            "redis.connectTimeout",
            redis.connect_timeout,
            Duration::from_millis(100),
        )?;
        at_least(
            "redis.responseTimeout",
            redis.response_timeout,
            Duration::from_millis(100),
        )?;
        at_least("redis.keepalive", redis.keepalive, Duration::from_secs(1))?;
        if let Some(identity) = &self.identity {
            identity.validate()?;
        }
        let http = &self.http;
        at_least(
            "http.headerTimeout",
            http.header_timeout,
            Duration::from_millis(100),
        )?;
        at_least(
            "http.requestTimeout",
            http.request_timeout,
            Duration::from_millis(100),
        )?;
        at_least(
            "http.writeTimeout",
            http.write_timeout,
            Duration::from_millis(100),
        )?;
        for (field, n) in [
            ("http.maxConnections", http.max_connections),
            ("http.maxRequests", http.max_requests),
        ] {
            if !(1..=1_000_000).contains(&n) {
                return Err(invalid(field, format!("must be 1-1000000, got {n}")));
            }
        }
        if self.sources.is_empty() {
            return Err(invalid("sources", "at least one source is required"));
        }
        let mut seen = HashSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            check_name(&format!("sources[{i}].name"), &source.name)?;
            if !seen.insert(source.name.as_str()) {
                return Err(invalid(
                    format!("sources[{i}].name"),
                    format!("duplicate source name `{}`", source.name),
                ));
            }
            check_identifier(&format!("sources[{i}].outboxTable"), &source.outbox_table)?;
            if source.batch_size == 0 || source.batch_size > 10_000 {
                return Err(invalid(
                    format!("sources[{i}].batchSize"),
                    format!("must be between 1 and 10000, got {}", source.batch_size),
                ));
            }
            at_least(
                &format!("sources[{i}].pollInterval"),
                source.poll_interval,
                Duration::from_millis(10),
            )?;
            at_least(
                &format!("sources[{i}].retention"),
                source.retention,
                Duration::from_secs(1),
            )?;
            if source.max_retained_rows == 0 {
                return Err(invalid(
                    format!("sources[{i}].maxRetainedRows"),
                    "must be at least 1",
                ));
            }
        }
        let mut seen = HashSet::new();
        for (i, screen) in self.screens.iter().enumerate() {
            check_name(&format!("screens[{i}].name"), &screen.name)?;
            if !seen.insert(screen.name.as_str()) {
                return Err(invalid(
                    format!("screens[{i}].name"),
                    format!("duplicate screen name `{}`", screen.name),
                ));
            }
            if screen.widgets.is_empty() {
                return Err(invalid(
                    format!("screens[{i}].widgets"),
                    "a screen needs at least one widget key",
                ));
            }
            for (j, key) in screen.widgets.iter().enumerate() {
                // One user per key: core-api maps a personalised key back to its user (to
                // drop that user's copy of the screen), which two placeholders would make
                // ambiguous.
                if key.matches(USER_PLACEHOLDER).count() > 1 {
                    return Err(invalid(
                        format!("screens[{i}].widgets[{j}]"),
                        format!("`{key}`: at most one {USER_PLACEHOLDER} per key"),
                    ));
                }
                // A placeholder stands for a valid parameter; check the key with one substituted.
                let concrete = key.replace(USER_PLACEHOLDER, "u");
                WidgetKey::parse(&concrete).map_err(|e: KeyError| {
                    invalid(
                        format!("screens[{i}].widgets[{j}]"),
                        format!("`{key}`: {e}"),
                    )
                })?;
            }
        }
        Ok(())
    }
}

impl IdentityConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match self.mode {
            IdentityMode::Header => {
                let Some(h) = &self.header else {
                    return Err(invalid(
                        "identity.header",
                        "mode `header` needs the header name the gateway sets",
                    ));
                };
                if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(invalid(
                        "identity.header",
                        format!("`{h}` is not a header name"),
                    ));
                }
                if h.eq_ignore_ascii_case("authorization") || h.eq_ignore_ascii_case("cookie") {
                    return Err(invalid(
                        "identity.header",
                        "must be a header the gateway sets, not one the client sends",
                    ));
                }
            }
            IdentityMode::Jwt => {
                let Some(jwt) = &self.jwt else {
                    return Err(invalid(
                        "identity.jwt",
                        "mode `jwt` needs issuer, audience and keys",
                    ));
                };
                if jwt.issuer.is_empty() {
                    return Err(invalid("identity.jwt.issuer", "must not be empty"));
                }
                if jwt.audience.is_empty() {
                    return Err(invalid("identity.jwt.audience", "must not be empty"));
                }
                if jwt.user_claim.is_empty() {
                    return Err(invalid("identity.jwt.userClaim", "must not be empty"));
                }
                if jwt.algorithms.is_empty() {
                    return Err(invalid("identity.jwt.algorithms", "at least one"));
                }
                for (i, alg) in jwt.algorithms.iter().enumerate() {
                    if !JWT_ALGORITHMS.contains(&alg.as_str()) {
                        return Err(invalid(
                            format!("identity.jwt.algorithms[{i}]"),
                            format!(
                                "`{alg}` is not accepted; use one of {}",
                                JWT_ALGORITHMS.join(", ")
                            ),
                        ));
                    }
                }
                if jwt.leeway > Duration::from_secs(300) {
                    return Err(invalid("identity.jwt.leeway", "at most 5m"));
                }
            }
            IdentityMode::Query => {}
        }
        if self.mode != IdentityMode::Header && self.header.is_some() {
            return Err(invalid("identity.header", "only for mode `header`"));
        }
        if self.mode != IdentityMode::Jwt && self.jwt.is_some() {
            return Err(invalid("identity.jwt", "only for mode `jwt`"));
        }
        Ok(())
    }
}

fn at_least(field: &str, d: Duration, floor: Duration) -> Result<(), ConfigError> {
    if d < floor {
        return Err(invalid(
            field,
            format!(
                "must be at least {}, got {}",
                human_duration::format(floor),
                human_duration::format(d)
            ),
        ));
    }
    Ok(())
}

/// Whether `name` is a valid pipeline, source or screen name.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Pipeline, source and screen names: they become Kubernetes names and key prefixes.
fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "`{name}` must be 1-{MAX_NAME_LEN} characters of a-z, 0-9 and '-', not starting or ending with '-'"
            ),
        ))
    }
}

/// Stream, group and key-prefix names: printable, no spaces.
fn check_redis_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty() && name.len() <= 200 && name.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("`{name}` must be 1-200 printable ASCII characters without spaces"),
        ))
    }
}

/// Table names go into SQL text, so they must be plain identifiers (optionally schema-qualified).
/// A name that passed [`check_identifier`], quoted for SQL (`"schema"."table"`), so reserved
/// words such as `order` or `user` work as table names.
pub fn quote_identifier(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

pub fn check_identifier(field: &str, name: &str) -> Result<(), ConfigError> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !p.as_bytes()[0].is_ascii_digit()
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() <= 2 && parts.iter().all(|p| part_ok(p)) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "`{name}` must be a lowercase SQL identifier ([a-z_][a-z0-9_]*, optionally schema.table)"
            ),
        ))
    }
}

/// Durations as human strings (`250ms`, `30s`, `1h`, `7d`) in both directions.
pub mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// The shortest exact form in one unit, e.g. `7d`, `90s`, `250ms`, `1500us`. Exact, so a
    /// config rendered by the operator parses back to the same values.
    pub fn format(d: Duration) -> String {
        let ns = d.as_nanos();
        if !ns.is_multiple_of(1_000_000) {
            return if ns.is_multiple_of(1000) {
                format!("{}us", ns / 1000)
            } else {
                format!("{ns}ns")
            };
        }
        let ms = d.as_millis();
        for (unit, size) in [
            ("d", 86_400_000u128),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms >= size && ms.is_multiple_of(size) {
                return format!("{}{unit}", ms / size);
            }
        }
        format!("{ms}ms")
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim()).map_err(|e| {
            format!("`{text}` is not a duration ({e}); use e.g. 250ms, 30s, 5m, 1h, 7d")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
pipeline: home
stream: {name: home.widget-events, consumerGroup: core-ingester, maxLength: 1000000}
cache: {keyPrefix: "hw:home:", ingestTtl: 7d, fallbackTtl: 1h}
reclaim: {minIdle: 30s, interval: 15s, maxDeliveries: 5, idleConsumerTtl: 1h}
sources:
  - {name: deals, outboxTable: widget_outbox, batchSize: 500, pollInterval: 250ms}
screens:
  - {name: home, widgets: ["deals.top-picks", "loyalty.points:{user}"]}
"#;

    #[test]
    fn full_example_parses_with_the_documented_values() {
        let c = Config::from_yaml_str(FULL).expect("valid");
        assert_eq!(c.stream_name(), "home.widget-events");
        assert_eq!(c.key_prefix(), "hw:home:");
        assert_eq!(c.cache.ingest_ttl, Duration::from_secs(604_800));
        assert_eq!(c.sources[0].poll_interval, Duration::from_millis(250));
        assert_eq!(c.screen("home").map(|s| s.widgets.len()), Some(2));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_yaml_str("pipeline: shop\nsources: [{name: deals}]\n").expect("valid");
        assert_eq!(c.stream_name(), "shop.widget-events");
        assert_eq!(c.stream.consumer_group, "core-ingester");
        assert_eq!(c.stream.max_length, 1_000_000);
        assert_eq!(c.key_prefix(), "hw:shop:");
        assert_eq!(c.stats_key(), "hw:shop:stats");
        assert_eq!(c.cache.fallback_ttl, Duration::from_secs(3600));
        assert_eq!(c.reclaim, ReclaimConfig::default());
        assert_eq!(c.sources[0], SourceConfig::named("deals"));
        // The deadlines the docs state (docs/ingester.md#deadlines).
        assert_eq!(c.database.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.database.statement_timeout, Duration::from_secs(10));
        assert_eq!(
            c.database.idle_in_transaction_timeout,
            Duration::from_secs(60)
        );
        assert_eq!(c.database.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.database.keepalive, Duration::from_secs(30));
        assert_eq!(c.redis.connect_timeout, Duration::from_secs(1));
        assert_eq!(c.redis.response_timeout, Duration::from_secs(2));
        assert_eq!(c.redis.keepalive, Duration::from_secs(30));
        assert!(
            c.local_cache.enabled,
            "the in-process cache is on by default"
        );
        assert_eq!(c.local_cache.max_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn cluster_mode_tags_the_stream_and_refuses_untagged_streams_and_tagged_caches() {
        let c = Config::from_yaml_str(
            "pipeline: shop\nredis: {mode: cluster}\nsources: [{name: deals}]\n",
        )
        .expect("valid");
        assert_eq!(c.redis.mode, RedisMode::Cluster);
        assert_eq!(c.stream_name(), "{shop}.widget-events");
        for key in [
            c.dead_letter_stream(),
            c.epoch_key(),
            c.confirmed_key("deals"),
            c.warm_key("lock"),
        ] {
            assert_eq!(hash_tag(&key), Some("shop"), "{key}");
        }
        assert_eq!(
            hash_tag(&c.key_prefix()),
            None,
            "cache keys spread over the cluster"
        );
        assert_eq!(
            hash_tag("a{}b{c}"),
            None,
            "an empty tag is no tag: the whole key is hashed"
        );

        let untagged = "pipeline: shop\nredis: {mode: cluster}\nstream: {name: shop.events}\n\
                        sources: [{name: deals}]\n";
        let err = Config::from_yaml_str(untagged).expect_err("untagged stream");
        assert!(err.to_string().contains("needs a hash tag"), "{err}");
        let tagged_cache = "pipeline: shop\nredis: {mode: cluster}\ncache: {keyPrefix: \"{hw}:\"}\n\
                            sources: [{name: deals}]\n";
        let err = Config::from_yaml_str(tagged_cache).expect_err("tagged cache prefix");
        assert!(
            err.to_string().contains("must not carry a hash tag"),
            "{err}"
        );
        // Standalone keeps today's names (no migration for existing pipelines).
        let plain = Config::from_yaml_str(
            untagged
                .replace("{mode: cluster}", "{mode: standalone}")
                .as_str(),
        )
        .expect("standalone takes any name");
        assert_eq!(plain.stream_name(), "shop.events");
    }

    #[test]
    fn a_key_with_two_user_placeholders_and_a_tiny_local_cache_are_refused() {
        let two = "pipeline: p\nsources: [{name: deals}]\n\
                   screens: [{name: s, widgets: [\"deals.x:{user}-{user}\"]}]\n";
        let e = Config::from_yaml_str(two).expect_err("two placeholders");
        assert!(e.to_string().contains("screens[0].widgets[0]"), "{e}");
        let tiny = "pipeline: p\nsources: [{name: deals}]\nlocalCache: {maxBytes: 1000}\n";
        let e = Config::from_yaml_str(tiny).expect_err("too small");
        assert!(e.to_string().contains("localCache.maxBytes"), "{e}");
    }

    #[test]
    fn serialized_config_parses_back_to_the_same_value() {
        let c = Config::from_yaml_str(FULL).expect("valid");
        let again = Config::from_yaml_str(&c.to_yaml()).expect("round trip");
        assert_eq!(c, again);
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_are_applied_then_validated() {
        let base = "pipeline: home\nsources: [{name: deals}]\n";
        let c = Config::from_yaml_str_with_env(
            base,
            env(&[
                ("WIDGET__CACHE__FALLBACK_TTL", "30m"),
                ("WIDGET__SOURCES__DEALS__BATCH_SIZE", "50"),
                ("HOME", "/root"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.cache.fallback_ttl, Duration::from_secs(1800));
        assert_eq!(c.sources[0].batch_size, 50);
        assert_eq!(c.cache.ingest_ttl, CacheConfig::default().ingest_ttl);

        // A misspelt field fails like in the file, and the message names the variable.
        let e = Config::from_yaml_str_with_env(base, env(&[("WIDGET__CACHE__FALLBACK_TL", "30m")]))
            .expect_err("unknown field")
            .to_string();
        assert!(
            e.contains("fallbackTl") && e.contains("WIDGET__CACHE__FALLBACK_TL"),
            "{e}"
        );
        // Values are validated like the file's.
        let e = Config::from_yaml_str_with_env(base, env(&[("WIDGET__RECLAIM__MIN_IDLE", "0s")]))
            .expect_err("invalid value")
            .to_string();
        assert!(e.contains("reclaim.minIdle"), "{e}");
        let e = Config::from_yaml_str_with_env(base, env(&[("WIDGET__CACHE__INGEST_TTL", "soon")]))
            .expect_err("bad duration")
            .to_string();
        assert!(
            e.contains("soon") && e.contains("WIDGET__CACHE__INGEST_TTL"),
            "{e}"
        );
    }

    fn err(text: &str) -> String {
        Config::from_yaml_str(text)
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn bad_configs_name_the_field() {
        let e = err("pipeline: home\nsources: [{name: deals, batchsize: 5}]\n");
        assert!(e.contains("unknown field `batchsize`"), "{e}");
        let e = err("sources: [{name: deals}]\n");
        assert!(e.contains("missing field `pipeline`"), "{e}");
        let e = err("pipeline: home\nsources: []\n");
        assert!(e.contains("`sources`") && e.contains("at least one"), "{e}");
        let e = err("pipeline: home\nsources: [{name: deals}, {name: deals}]\n");
        assert!(
            e.contains("sources[1].name") && e.contains("duplicate"),
            "{e}"
        );
        let e = err("pipeline: home\nsources: [{name: Deals}]\n");
        assert!(e.contains("sources[0].name"), "{e}");
        let e = err("pipeline: home\nsources: [{name: deals, pollInterval: soon}]\n");
        assert!(e.contains("`soon` is not a duration"), "{e}");
        let e = err("pipeline: home\nsources: [{name: deals, outboxTable: \"x; drop table y\"}]\n");
        assert!(e.contains("sources[0].outboxTable"), "{e}");
        let e = err("pipeline: home\nsources: [{name: deals, batchSize: 0}]\n");
        assert!(e.contains("sources[0].batchSize"), "{e}");
        let e = err("pipeline: home\nreclaim: {minIdle: 0s}\nsources: [{name: deals}]\n");
        assert!(e.contains("reclaim.minIdle"), "{e}");
        // Durations that would turn into busy loops or instant expiry are refused by name.
        for (yaml, field) in [
            ("reclaim: {minIdle: 500us}", "reclaim.minIdle"),
            ("reclaim: {interval: 1ns}", "reclaim.interval"),
            ("cache: {ingestTtl: 10s}", "cache.ingestTtl"),
            ("cache: {fallbackTtl: 1ms}", "cache.fallbackTtl"),
            ("database: {connectTimeout: 1ms}", "database.connectTimeout"),
            (
                "database: {statementTimeout: 1ns}",
                "database.statementTimeout",
            ),
            (
                "database: {idleInTransactionTimeout: 10ms}",
                "database.idleInTransactionTimeout",
            ),
            ("database: {idleTimeout: 1ms}", "database.idleTimeout"),
            ("database: {keepalive: 100ms}", "database.keepalive"),
            ("redis: {connectTimeout: 1ms}", "redis.connectTimeout"),
            ("redis: {responseTimeout: 1us}", "redis.responseTimeout"),
            ("redis: {keepalive: 1ms}", "redis.keepalive"),
        ] {
            let e = err(&format!(
                "pipeline: home\n{yaml}\nsources: [{{name: deals}}]\n"
            ));
            assert!(e.contains(field) && e.contains("at least"), "{e}");
        }
        let e = err("pipeline: home\nsources: [{name: deals, pollInterval: 1ns}]\n");
        assert!(
            e.contains("sources[0].pollInterval") && e.contains("at least 10ms"),
            "{e}"
        );
        let e = err("pipeline: home\nreclaim: {idleConsumerTtl: 10s}\nsources: [{name: deals}]\n");
        assert!(
            e.contains("reclaim.idleConsumerTtl") && e.contains("at least 1m"),
            "{e}"
        );
        let e = err(
            "pipeline: home\nsources: [{name: deals}]\nscreens: [{name: home, widgets: [\"nodot\"]}]\n",
        );
        assert!(e.contains("screens[0].widgets[0]"), "{e}");
        for (yaml, field) in [
            ("identity: {mode: header}", "identity.header"),
            (
                "identity: {mode: header, header: authorization}",
                "identity.header",
            ),
            (
                "identity: {mode: header, header: \"bad header\"}",
                "identity.header",
            ),
            ("identity: {mode: jwt}", "identity.jwt"),
            (
                "identity: {mode: jwt, jwt: {issuer: i, audience: a, algorithms: [HS256]}}",
                "identity.jwt.algorithms[0]",
            ),
            (
                "identity: {mode: jwt, jwt: {issuer: \"\", audience: a}}",
                "identity.jwt.issuer",
            ),
            ("identity: {mode: query, header: x-user}", "identity.header"),
        ] {
            let e = err(&format!(
                "pipeline: home\n{yaml}\nsources: [{{name: deals}}]\n"
            ));
            assert!(e.contains(field), "{yaml}: {e}");
        }
        let e = err("pipeline: home\nidentity: {mode: cookie}\nsources: [{name: deals}]\n");
        assert!(e.contains("unknown variant `cookie`"), "{e}");
    }

    #[test]
    fn durations_format_in_one_unit() {
        use human_duration::{format, parse};
        assert_eq!(format(Duration::from_secs(604_800)), "7d");
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::from_secs(90)), "90s");
        assert_eq!(format(Duration::from_secs(3600)), "1h");
        assert_eq!(format(Duration::from_micros(500)), "500us");
        assert_eq!(format(Duration::from_micros(1500)), "1500us");
        assert_eq!(format(Duration::from_nanos(1_000_001)), "1000001ns");
        for d in [
            Duration::from_micros(1500),
            Duration::from_nanos(7),
            Duration::from_millis(1),
        ] {
            assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
