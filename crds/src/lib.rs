//! The `WidgetPipeline` custom resource (`homewidgets.io/v1alpha1`).
//!
//! The spec mirrors the runtime's config file (`widget_runtime::config::Config`, same camelCase
//! names and defaults) plus what only Kubernetes needs: the image, Secret references, replicas,
//! resources and `paused`. Validation a user would otherwise only meet at runtime lives in the
//! schema: name and identifier patterns, duration syntax, bounds, required Secret references, and
//! CEL rules for what plain JSON schema cannot say (unique source and screen names).
//!
//! `crds/widgetpipelines.homewidgets.io.yaml` is generated from these types (see [`crd_yaml`]);
//! a test fails when the committed file drifts.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every resource this project defines.
pub const GROUP: &str = "homewidgets.io";
/// The committed CRD file, relative to the workspace root.
pub const CRD_FILE: &str = "crds/widgetpipelines.homewidgets.io.yaml";

/// Longest pipeline, source and screen name (the runtime's `MAX_NAME_LEN`): names end up in
/// Kubernetes object names and label values.
pub const MAX_NAME_LEN: usize = 40;
/// Most product sources in one pipeline (bounds the cost of the CEL uniqueness rule).
pub const MAX_SOURCES: usize = 32;
/// Most screens in one pipeline.
pub const MAX_SCREENS: usize = 64;

/// Condition types written to `status.conditions`.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
}

const NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$";
const DURATION_PATTERN: &str = "^([0-9]+(ns|us|ms|s|m|h|d))+$";

/// A pipeline: product sources relaying their outbox into one Redis stream, the ingester that
/// applies it to the core database and cache, and the core API that serves screens.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "homewidgets.io",
    version = "v1alpha1",
    kind = "WidgetPipeline",
    plural = "widgetpipelines",
    singular = "widgetpipeline",
    shortname = "wp",
    category = "homewidgets",
    namespaced,
    status = "WidgetPipelineStatus",
    derive = "PartialEq",
    cel,
    validation = Rule::new("size(self.metadata.name) <= 40 && self.metadata.name.matches('^[a-z]([a-z0-9-]*[a-z0-9])?$')")
        .message("metadata.name must be 1-40 characters of a-z, 0-9 and '-', starting with a letter"),
    // Worker Deployments are `<pipeline>-outbox-<source>`: a pipeline named `a-outbox...` could
    // render the same name as one of pipeline `a`'s workers (or its ingester or core-api).
    validation = Rule::new("!self.metadata.name.matches('-outbox(-|$)')")
        .message("metadata.name must not contain the segment '-outbox' (reserved for worker Deployments)"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Sources", type_ = "integer", json_path = ".status.sources"),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.live.lag"),
    printcolumn(name = "Pending", type_ = "integer", json_path = ".status.live.pending"),
    printcolumn(name = "Reclaimed", type_ = "integer", json_path = ".status.live.reclaimed"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct WidgetPipelineSpec {
    /// Container image of widget-runtime (all three components run from it).
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Where the Redis URL comes from (`rediss://` for TLS), and the CA its certificate is
    /// verified against when that is not a public one.
    pub redis: RedisConnection,
    /// Where the core Postgres URL comes from.
    pub core_database: Connection,
    #[serde(default)]
    pub stream: StreamSpec,
    #[serde(default)]
    pub cache: CacheSpec,
    #[serde(default)]
    pub reclaim: ReclaimSpec,
    /// Deadlines of every store connection: how long a store that stops answering may hold
    /// a component before it reports not-ready and retries.
    #[serde(default)]
    pub timeouts: TimeoutsSpec,
    /// Product sources; one outbox-worker Deployment each.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(s, self.exists_one(t, t.name == s.name))").message("source names must be unique")
    )]
    pub sources: Vec<SourceSpec>,
    #[serde(default)]
    pub ingester: ComponentSpec,
    #[serde(default)]
    pub core_api: CoreApiSpec,
    /// Screens the core API serves: an ordered list of widget keys each.
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(s, self.exists_one(t, t.name == s.name))").message("screen names must be unique")
    )]
    pub screens: Vec<ScreenSpec>,
    /// Stop changing the children (deletion still works); shown in the Progressing condition.
    #[serde(default)]
    pub paused: bool,
}

/// A connection URL kept in a Secret.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    pub url_secret_ref: SecretKeyRef,
}

/// The pipeline's Redis: its URL, and for a `rediss://` server whose certificate a private CA
/// signed (most managed services), that CA bundle (PEM). Without it the system trust store is
/// used. Every component and the operator's own probe verify the server with it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisConnection {
    pub url_secret_ref: SecretKeyRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// `cluster` for a Redis Cluster (or Valkey cluster): the URL names one node, the others
    /// are found from it; the pipeline's stream and the keys beside it get a hash tag.
    #[serde(default)]
    pub mode: RedisModeSpec,
}

/// What the Redis URL points at.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum RedisModeSpec {
    #[default]
    Standalone,
    Cluster,
}

/// One key of a Secret in the pipeline's namespace.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub struct SecretKeyRef {
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct StreamSpec {
    /// Defaults to `<pipeline>.widget-events`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[!-~]+$"))]
    pub name: Option<String>,
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[!-~]+$"))]
    pub consumer_group: String,
    /// Relaying stops before `lag + pending` passes this; the stream is never trimmed unread.
    #[schemars(range(min = 1000))]
    pub max_length: u64,
}

impl Default for StreamSpec {
    fn default() -> Self {
        Self {
            name: None,
            consumer_group: "core-ingester".into(),
            max_length: 1_000_000,
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct CacheSpec {
    /// Defaults to `hw:<pipeline>:`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[!-~]+$"))]
    pub key_prefix: Option<String>,
    /// TTL of values the ingester writes.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub ingest_ttl: String,
    /// TTL of values the core API back-fills from Postgres.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub fallback_ttl: String,
    /// Widgets per second written when the cache is re-warmed from Postgres after Redis lost
    /// its data; 0 turns the re-warm off.
    pub warm_rate: u32,
}

impl Default for CacheSpec {
    fn default() -> Self {
        Self {
            key_prefix: None,
            ingest_ttl: "7d".into(),
            fallback_ttl: "1h".into(),
            warm_rate: 5000,
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ReclaimSpec {
    /// Pending entries idle longer than this are taken over (XAUTOCLAIM).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub min_idle: String,
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: String,
    /// Deliveries after which an entry is dead-lettered.
    #[schemars(range(min = 1, max = 1000))]
    pub max_deliveries: u32,
    /// Group consumers (ingester pods) with nothing pending and idle this long are removed
    /// from the consumer group; at least 1m.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub idle_consumer_ttl: String,
}

impl Default for ReclaimSpec {
    fn default() -> Self {
        Self {
            min_idle: "30s".into(),
            interval: "15s".into(),
            max_deliveries: 5,
            idle_consumer_ttl: "1h".into(),
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct TimeoutsSpec {
    /// Every Postgres connection (the core database and each product database).
    pub database: DatabaseTimeoutsSpec,
    pub redis: RedisTimeoutsSpec,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct DatabaseTimeoutsSpec {
    /// Opening a connection, and waiting for a free pooled one.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub connect_timeout: String,
    /// Every statement: the server's statement_timeout and a client-side deadline.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub statement_timeout: String,
    /// The server ends a session idle inside a transaction this long (releasing its locks).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub idle_in_transaction_timeout: String,
    /// Pooled connections unused this long are closed.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub idle_timeout: String,
    /// TCP keepalive idle time of the server's side of each connection.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub keepalive: String,
}

impl Default for DatabaseTimeoutsSpec {
    fn default() -> Self {
        Self {
            connect_timeout: "5s".into(),
            statement_timeout: "10s".into(),
            idle_in_transaction_timeout: "60s".into(),
            idle_timeout: "5m".into(),
            keepalive: "30s".into(),
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct RedisTimeoutsSpec {
    /// Opening a connection (TCP and the handshake).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub connect_timeout: String,
    /// Every command's reply (a blocking read gets its block time on top).
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub response_timeout: String,
    /// TCP keepalive idle time of every socket; unacknowledged for twice this long, the
    /// connection is closed and made again.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub keepalive: String,
}

impl Default for RedisTimeoutsSpec {
    fn default() -> Self {
        Self {
            connect_timeout: "1s".into(),
            response_timeout: "2s".into(),
            keepalive: "30s".into(),
        }
    }
}

/// A product service's database whose outbox an outbox-worker relays.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// Also the key namespace this source may write (`<name>.`).
    #[schemars(length(min = 1, max = 40), regex(pattern = NAME_PATTERN))]
    pub name: String,
    pub database: Connection,
    #[serde(default = "default_outbox_table")]
    #[schemars(
        length(min = 1, max = 127),
        regex(pattern = r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")
    )]
    pub outbox_table: String,
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: u32,
    #[serde(default = "default_poll_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub poll_interval: String,
    /// Relayed rows stay in the outbox until the core side confirms them, so they can be
    /// replayed if Redis loses the stream; a row still unconfirmed after this long is deleted
    /// anyway (reported as `RetentionExceeded`). At least 1m.
    #[serde(default = "default_retention")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub retention: String,
    /// The same bound in rows: beyond it the oldest relayed, unconfirmed rows are deleted.
    #[serde(default = "default_max_retained_rows")]
    #[schemars(range(min = 1000))]
    pub max_retained_rows: u64,
    /// Unset: the operator does not manage the Deployment's replicas (leave them to an HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// This worker's own Redis user (see `widget-runtime acl worker --source <name>`), so a
    /// compromised product-side worker cannot touch the cache; defaults to `spec.redis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<Connection>,
}

fn default_outbox_table() -> String {
    "widget_outbox".into()
}
fn default_batch_size() -> u32 {
    500
}
fn default_poll_interval() -> String {
    "250ms".into()
}
fn default_retention() -> String {
    "24h".into()
}
fn default_max_retained_rows() -> u64 {
    1_000_000
}

/// Replicas and resources of the ingester or the core API.
/// core-api: its Deployment, its HTTP limits and where a request's user comes from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CoreApiSpec {
    /// Unset: the operator does not manage the Deployment's replicas (leave them to an HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// core-api's own Redis user (see `widget-runtime acl core-api`); defaults to `spec.redis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<Connection>,
    /// A read replica of the core database for the API's fallback reads
    /// (`CORE_DATABASE_READ_URL`); the ingester always writes to `spec.coreDatabase`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_read: Option<Connection>,
    /// A Redis replica for every cache read and its invalidations (`REDIS_READ_URL`), when
    /// serving up to the replica's lag behind is acceptable; back-fills and stats still go to
    /// the primary, and the stream is never read from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_read: Option<Connection>,
    #[serde(default)]
    pub http: HttpSpec,
    /// Without it, personalised widgets are answered with 401.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentitySpec>,
    #[serde(default)]
    pub local_cache: LocalCacheSpec,
}

/// core-api's in-process cache of widgets, kept coherent with Redis by its invalidations
/// (client-side caching). Counts against the pod's memory: size `resources` for it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct LocalCacheSpec {
    pub enabled: bool,
    /// Bytes of widgets held per pod at most (at least 1 MiB); a quarter more holds keys
    /// known to be absent.
    #[schemars(range(min = 1048576))]
    pub max_bytes: u64,
}

impl Default for LocalCacheSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Deadlines and limits of core-api's public port.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpSpec {
    /// A request head must arrive within this; idle keep-alive connections close after it.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub header_timeout: String,
    /// A request is answered within this, or gets a 503.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub request_timeout: String,
    /// A client that reads nothing of its answer for this long is cut off.
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub write_timeout: String,
    /// Open connections per pod; past it, new ones get an immediate 503.
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections: u32,
    /// Requests in flight per pod; past it, requests are shed with a 503.
    #[schemars(range(min = 1, max = 1000000))]
    pub max_requests: u32,
}

impl Default for HttpSpec {
    fn default() -> Self {
        Self {
            header_timeout: "10s".into(),
            request_timeout: "5s".into(),
            write_timeout: "10s".into(),
            max_connections: 4096,
            max_requests: 512,
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum IdentityModeSpec {
    /// `Authorization: Bearer <JWT>`, validated by core-api.
    Jwt,
    /// A header a trusted gateway in front of core-api sets.
    Header,
    /// `?user=ID`, unverified: local use only.
    Query,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode != 'jwt' || has(self.jwt)").message("mode jwt needs jwt"),
    validation = Rule::new("self.mode != 'header' || has(self.header)").message("mode header needs header")
)]
pub struct IdentitySpec {
    pub mode: IdentityModeSpec,
    /// `header` mode: the header the gateway sets to the verified user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSpec>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JwtSpec {
    #[schemars(length(min = 1, max = 512))]
    pub issuer: String,
    #[schemars(length(min = 1, max = 512))]
    pub audience: String,
    /// The claim that names the user (default `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_claim: Option<String>,
    /// Accepted `alg` values (default RS256, ES256); public-key algorithms only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub algorithms: Vec<String>,
    /// The verification keys: a JWKS document or a PEM public key. Rotating the Secret
    /// restarts core-api's pods.
    pub keys_secret_ref: SecretKeyRef,
    /// Clock skew allowed on `exp` and `nbf` (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub leeway: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ComponentSpec {
    /// Unset: the operator does not manage the Deployment's replicas (leave them to an HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The ingester's own Redis user (see `widget-runtime acl ingester`); defaults to
    /// `spec.redis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<Connection>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ScreenSpec {
    #[schemars(length(min = 1, max = 40), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Ordered widget keys (`<source>.<name>[:<param>]`, `{user}` stands for the caller).
    #[schemars(length(min = 1, max = 200), inner(length(min = 3, max = 256)))]
    pub widgets: Vec<String>,
}

/// What the operator observed; written only by the operator (status subresource).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WidgetPipelineStatus {
    /// The `metadata.generation` the rest of this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`; keyed by type.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Number of product sources (one outbox-worker each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<i32>,
    /// One entry per Deployment the operator runs.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub components: Vec<ComponentStatus>,
    /// Hash of the rendered runtime config (also on the pod templates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Live signals read from Redis; absent until the first successful probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveStatus>,
    /// When the figures in `live` were read (refreshed at least every few minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
}

/// Readiness of one Deployment.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// The Deployment's name.
    pub name: String,
    /// `outbox-worker`, `ingester` or `core-api`.
    pub component: String,
    /// The source an outbox-worker relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub desired_replicas: i32,
    pub ready_replicas: i32,
    pub updated_replicas: i32,
}

/// The pipeline's health as the runtime reports it in Redis.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LiveStatus {
    /// `XLEN` of the stream.
    pub stream_length: i64,
    /// Entries not yet delivered to the consumer group; absent when Redis cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// Entries delivered but not acknowledged.
    pub pending: i64,
    /// `XLEN` of the dead-letter stream.
    pub dead_letter_length: i64,
    /// Totals since the stats hash was created.
    pub applied: i64,
    pub stale: i64,
    pub rejected: i64,
    pub reclaimed: i64,
    pub dead_lettered: i64,
    pub published: i64,
    /// Outbox rows published again after Redis lost data (all sources).
    #[serde(default)]
    pub replayed: i64,
    /// Times a component found that Redis lost the stream (or restarted) and started a new
    /// epoch.
    #[serde(default)]
    pub redis_loss_detected: i64,
    /// Relayed rows deleted unconfirmed by a source's `retention` or `maxRetainedRows` cap.
    #[serde(default)]
    pub retention_expired: i64,
    /// Widgets written to the cache by re-warms.
    #[serde(default)]
    pub warm_written: i64,
    /// A cache re-warm from Postgres is running.
    #[serde(default)]
    pub warming: bool,
    /// Redis' `maxmemory-policy`; absent when the operator may not run `CONFIG GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxmemory_policy: Option<String>,
    /// The runtime found an `allkeys-*` eviction policy (its own `CONFIG GET` reading).
    #[serde(default)]
    pub redis_eviction_unsafe: bool,
    /// cache hits / (hits + misses), absent before the first lookup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hit_ratio: Option<f64>,
    /// Outbox rows waiting per source.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["source".into()]))]
    pub outbox_backlog: Vec<SourceBacklog>,
    /// Outbox insert to ingester ack over the ingesters' most recent flush window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_lag: Option<IngressLag>,
    /// Last time any component flushed its stats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_updated_at: Option<Time>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SourceBacklog {
    pub source: String,
    /// Unpublished outbox rows (0 until the worker's first count).
    pub rows: i64,
    /// Relayed rows kept for replay until the core side confirms them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained: Option<i64>,
    /// The source is deleting relayed, unconfirmed rows past its `retention` or
    /// `maxRetainedRows`.
    #[serde(default)]
    pub retention_capped: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IngressLag {
    pub p50_ms: i64,
    pub p99_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
}

impl WidgetPipeline {
    /// The condition of the given type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
    }

    /// Every Secret key the pipeline's pods read.
    pub fn secret_refs(&self) -> Vec<&SecretKeyRef> {
        let mut refs = vec![
            &self.spec.redis.url_secret_ref,
            &self.spec.core_database.url_secret_ref,
        ];
        refs.extend(&self.spec.redis.ca_secret_ref);
        refs.extend(self.spec.sources.iter().map(|s| &s.database.url_secret_ref));
        refs.extend(
            self.spec
                .sources
                .iter()
                .filter_map(|s| s.redis.as_ref())
                .chain(&self.spec.ingester.redis)
                .chain(&self.spec.core_api.redis)
                .chain(&self.spec.core_api.database_read)
                .chain(&self.spec.core_api.redis_read)
                .map(|c| &c.url_secret_ref),
        );
        refs.extend(
            self.spec
                .core_api
                .identity
                .iter()
                .filter_map(|i| i.jwt.as_ref())
                .map(|j| &j.keys_secret_ref),
        );
        refs
    }
}

/// The CRD as YAML, exactly as committed in [`CRD_FILE`].
pub fn crd_yaml() -> String {
    let crd = WidgetPipeline::crd();
    // A CRD built from derived types always serializes.
    let body = serde_yaml::to_string(&crd).unwrap_or_default();
    format!(
        "# Generated by `widget-operator crd` from the widget-crds types; do not edit.\n---\n{body}"
    )
}
