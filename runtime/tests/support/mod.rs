//! A test stack: private Postgres and Redis servers, migrated core and product databases, and a
//! pipeline config. Each test builds its own; see `testkit` for the servers.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use sqlx::PgPool;
use testkit::{PgServer, RedisServer};
use tokio_util::sync::CancellationToken;
use widget_runtime::admin::Readiness;
use widget_runtime::config::Config;
use widget_runtime::ingest::Ingester;
use widget_runtime::outbox::worker::{OutboxWorker, WorkerSettings};
use widget_runtime::store;

pub struct Stack {
    pub pg: PgServer,
    pub redis: RedisServer,
    pub core_url: String,
    pub product_url: String,
    pub config: Config,
}

/// A config for tests: short intervals, one source `deals` unless `yaml` says otherwise.
pub fn test_config(yaml: &str) -> Config {
    Config::from_yaml_str(yaml).expect("test config is valid")
}

pub const DEFAULT_CONFIG: &str = r#"
pipeline: test
stream: {maxLength: 100000}
reclaim: {minIdle: 300ms, interval: 200ms, maxDeliveries: 3}
sources:
  - {name: deals, batchSize: 100, pollInterval: 50ms}
  - {name: loyalty, batchSize: 100, pollInterval: 50ms}
screens:
  - {name: home, widgets: ["deals.top-picks", "loyalty.points:{user}"]}
"#;

impl Stack {
    pub async fn start() -> Self {
        Self::with_config(DEFAULT_CONFIG).await
    }

    pub async fn with_config(yaml: &str) -> Self {
        let (pg, redis) = tokio::join!(PgServer::start(), RedisServer::start());
        let pg = pg.expect("postgres starts");
        let redis = redis.expect("redis starts");
        let core_url = pg.create_database("core").await.expect("core db");
        let product_url = pg.create_database("product").await.expect("product db");
        let core = PgPool::connect(&core_url).await.expect("connect core");
        store::migrate(&store::CORE_MIGRATIONS, &core)
            .await
            .expect("core migrations");
        core.close().await;
        let product = PgPool::connect(&product_url)
            .await
            .expect("connect product");
        store::migrate(&store::PRODUCT_MIGRATIONS, &product)
            .await
            .expect("product migrations");
        product.close().await;
        Stack {
            pg,
            redis,
            core_url,
            product_url,
            config: test_config(yaml),
        }
    }

    pub fn redis_client(&self) -> redis::Client {
        redis::Client::open(self.redis.url()).expect("redis url")
    }

    pub async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        self.redis.connection().await.expect("redis connection")
    }

    /// A small pool that fails fast while the server is down.
    pub async fn pool(&self, url: &str) -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(2))
            .connect(url)
            .await
            .expect("connect")
    }

    pub fn lazy_pool(&self, url: &str) -> PgPool {
        widget_runtime::connect::pg_pool(url, 8, &Default::default()).expect("pool")
    }
}

/// Every entry of a stream as (id, field map).
pub async fn read_stream(
    conn: &mut impl redis::aio::ConnectionLike,
    stream: &str,
) -> Vec<(String, std::collections::HashMap<String, redis::Value>)> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("xrange");
    reply.ids.into_iter().map(|e| (e.id, e.map)).collect()
}

pub fn field_str(map: &std::collections::HashMap<String, redis::Value>, name: &str) -> String {
    match map.get(name) {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(redis::Value::SimpleString(s)) => s.clone(),
        other => panic!("field {name} missing or odd: {other:?}"),
    }
}

/// A response as the tests see it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection, so tests need no HTTP client crate.
/// `None` when the server cannot be reached or answers garbage.
pub async fn http_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Option<HttpResponse> {
    http_request(addr, "GET", path, headers).await
}

/// The value of one sample in a Prometheus text exposition (`name` with its labels).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// One HTTP/1.1 request with an empty body; `None` if the server does not answer.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// A core-api served in-process on a random loopback port.
pub struct RunningApi {
    pub addr: String,
    cancel: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningApi {
    pub async fn get(&self, path: &str) -> HttpResponse {
        self.get_with(path, &[]).await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        http_get(&self.addr, path, headers)
            .await
            .unwrap_or_else(|| panic!("GET {path}: no HTTP answer"))
    }

    /// A sample from the API's own /metrics, 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.get("/metrics").await.body, name).unwrap_or(0.0)
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        self.task
            .await
            .expect("api task")
            .expect("api ends cleanly");
    }
}

/// Starts the core-api of `stack`'s pipeline against the Redis at `redis_url` and waits until
/// it is ready.
pub async fn start_api_on(stack: &Stack, redis_url: &str) -> RunningApi {
    start_api_with(
        stack,
        redis::Client::open(redis_url).expect("redis url").into(),
    )
    .await
}

/// Like [`start_api_on`], with the Redis endpoints given (a read replica, say).
pub async fn start_api_with(
    stack: &Stack,
    redis: widget_runtime::api::RedisEndpoints,
) -> RunningApi {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let cancel = tokio_util::sync::CancellationToken::new();
    let config = stack.config.clone();
    let pool = stack.lazy_pool(&stack.core_url);
    let c = cancel.clone();
    let task = tokio::spawn(async move {
        widget_runtime::api::serve(
            &config,
            redis,
            pool,
            widget_runtime::api::Listeners {
                api: listener,
                admin: None,
            },
            prometheus_client::registry::Registry::default(),
            widget_runtime::admin::Readiness::default(),
            c,
        )
        .await
    });
    let api = RunningApi { addr, cancel, task };
    let ready = testkit::eventually(Duration::from_secs(30), || async {
        http_get(&api.addr, "/readyz", &[])
            .await
            .filter(|r| r.status == 200)
    })
    .await;
    assert!(ready.is_some(), "core-api becomes ready");
    api
}

/// A component task with its metrics.
pub struct Running<E> {
    pub cancel: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), E>>,
    pub registry: Arc<Mutex<Registry>>,
}

impl<E: std::fmt::Debug> Running<E> {
    pub fn metric(&self, name: &str) -> f64 {
        let mut text = String::new();
        if let Ok(r) = self.registry.lock() {
            prometheus_client::encoding::text::encode(&mut text, &r).expect("encode");
        }
        metric_value(&text, name).unwrap_or(0.0)
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("stops within 15 s of cancel")
            .expect("task does not panic");
        assert!(ended.is_ok(), "component ended with {ended:?}");
    }
}

/// An outbox-worker of `source` in this process, against the Redis at `redis_url`.
pub fn start_source_worker(
    stack: &Stack,
    redis_url: &str,
    source: &str,
) -> Running<widget_runtime::outbox::worker::WorkerError> {
    let mut settings = WorkerSettings::from_config(&stack.config, source).expect("source");
    settings.stats_interval = Duration::from_millis(100);
    settings.backlog_interval = Duration::from_millis(200);
    let mut registry = Registry::default();
    let worker = OutboxWorker::new(
        settings,
        redis::Client::open(redis_url).expect("redis url"),
        stack.lazy_pool(&stack.product_url),
        &mut registry,
        Readiness::default(),
    );
    let cancel = CancellationToken::new();
    Running {
        task: tokio::spawn(worker.run(cancel.clone())),
        cancel,
        registry: Arc::new(Mutex::new(registry)),
    }
}

/// An ingester named `name` in this process.
pub fn start_ingester_on(
    stack: &Stack,
    redis_url: &str,
    name: &str,
    core_url: &str,
    batch: usize,
) -> Running<widget_runtime::ingest::IngestError> {
    let mut registry = Registry::default();
    let ingester = Ingester::new(
        &stack.config,
        name.to_string(),
        redis::Client::open(redis_url).expect("redis url"),
        stack.lazy_pool(core_url),
        &mut registry,
        Readiness::default(),
    )
    .with_stats_interval(Duration::from_millis(100))
    .with_batch_size(batch)
    .with_warm(|w| w.check_interval = Duration::from_millis(200));
    let cancel = CancellationToken::new();
    Running {
        task: tokio::spawn(ingester.run(cancel.clone())),
        cancel,
        registry: Arc::new(Mutex::new(registry)),
    }
}

/// The `widget-runtime core-api` binary for `stack`'s pipeline (config written to `dir`),
/// serving on `public` with its admin routes on `admin`; killed when dropped.
pub fn core_api_command(
    stack: &Stack,
    dir: &std::path::Path,
    public: &str,
    admin: &str,
    redis_url: &str,
    db_url: &str,
) -> tokio::process::Command {
    let path = dir.join("config.yaml");
    std::fs::write(&path, stack.config.to_yaml()).expect("config");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_widget-runtime"));
    cmd.args([
        "core-api",
        "--listen",
        public,
        "--admin-listen",
        admin,
        "--config",
    ])
    .arg(&path)
    .env("REDIS_URL", redis_url)
    .env("CORE_DATABASE_URL", db_url)
    .env("RUST_LOG", "warn")
    .kill_on_drop(true);
    cmd
}

/// True once `addr` answers `/readyz` with 200, within 30 s.
pub async fn wait_ready(addr: &str) -> bool {
    testkit::eventually(Duration::from_secs(30), || async {
        http_get(addr, "/readyz", &[])
            .await
            .filter(|r| r.status == 200)
    })
    .await
    .is_some()
}

/// Stores `key` (of source `deals`, type `card`) at `version` with `content` in the core
/// database at `pool`, through the ingester's own UPSERT.
pub async fn store_widget(pool: &PgPool, key: &str, version: i64, content: serde_json::Value) {
    let change = store::Change {
        widget_key: key.into(),
        widget_type: "card".into(),
        source: "deals".into(),
        data_version: version,
        op: widget_runtime::Op::Upsert,
        content: Some(content.to_string()),
    };
    store::apply_batch(pool, &[change])
        .await
        .expect("store widget");
}

/// Creates (or resets) the Redis user `name`, password `pw`, with the ACL `rules`
/// (`widget_runtime::acl::rules`).
pub async fn set_acl_user(
    conn: &mut impl redis::aio::ConnectionLike,
    name: &str,
    rules: &[String],
) {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(name)
        .arg("reset")
        .arg("on")
        .arg(">pw");
    for r in rules {
        cmd.arg(r);
    }
    let _: () = cmd.query_async(conn).await.expect("ACL SETUSER");
}
