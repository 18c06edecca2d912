//! The fleet under test: private Postgres and Redis servers, and the real `widget-runtime`
//! processes (two outbox-workers on two sources, two ingesters, two core-apis), each reaching
//! each of its stores through a [`TcpProxy`] of its own, so a scenario can add latency, cut or
//! blackhole one component's link, or move every link to a promoted replica.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sqlx::PgPool;
use testkit::{PgServer, RedisServer, TcpProxy};
use tokio::process::{Child, Command};
use widget_runtime::config::Config;
use widget_runtime::store;

use crate::http::Http;

/// The two product sources; each has its own product database.
pub const SOURCES: [&str; 2] = ["deals", "loyalty"];

/// Small deadlines, so a fault is noticed and recovered from within a few seconds.
pub fn config_yaml(screen_keys: &[String]) -> String {
    let widgets = screen_keys
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"pipeline: chaos
stream: {{maxLength: 500000}}
reclaim: {{minIdle: 2s, interval: 500ms, maxDeliveries: 10}}
sources:
  - {{name: deals, batchSize: 500, pollInterval: 50ms}}
  - {{name: loyalty, batchSize: 500, pollInterval: 50ms}}
screens:
  - {{name: home, widgets: [{widgets}]}}
identity: {{mode: header, header: x-user-id}}
database: {{connectTimeout: 1s, statementTimeout: 2s}}
redis: {{connectTimeout: 500ms, responseTimeout: 1s}}
"#
    )
}

/// Where the `widget-runtime` binary is: `WIDGET_RUNTIME_BIN`, else next to this executable
/// (`target/<profile>/`, also from `target/<profile>/deps/` where test binaries live).
pub fn runtime_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("WIDGET_RUNTIME_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let candidate = dir.join("widget-runtime");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        bail!(
            "widget-runtime not found at {} (build it first: cargo build -p widget-runtime, \
             or set WIDGET_RUNTIME_BIN)",
            candidate.display()
        )
    }
}

/// A component's link to one store: a proxy of its own, or the store's address itself.
pub struct Link {
    pub proxy: Option<TcpProxy>,
}

impl Link {
    async fn to(port: u16, proxied: bool) -> Result<Self> {
        Ok(Link {
            proxy: if proxied {
                Some(TcpProxy::start(port).await?)
            } else {
                None
            },
        })
    }

    /// The port this component connects to for a store listening on `server`.
    fn port(&self, server: u16) -> u16 {
        self.proxy.as_ref().map_or(server, TcpProxy::port)
    }
}

/// Counters of one component, summed over its incarnations (a restarted process counts from
/// zero again; its last scrape before a kill is kept).
#[derive(Default, Clone)]
struct Tally {
    finished: HashMap<String, f64>,
    current: HashMap<String, f64>,
}

/// One `widget-runtime` process, restartable.
pub struct Component {
    pub name: String,
    child: Option<Child>,
    pub admin: String,
    pub public: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub redis_link: Link,
    pub db_link: Link,
    dir: PathBuf,
    starts: u32,
    tally: Tally,
    paused: bool,
}

/// Metrics summed into the scenario figures (counter families; all label sets are added up).
pub const COUNTERS: [&str; 9] = [
    "widget_ingest_applied_total",
    "widget_ingest_stale_total",
    "widget_ingest_reclaimed_total",
    "widget_ingest_dead_lettered_total",
    "widget_ingest_redis_loss_detected_total",
    "widget_outbox_published_total",
    "widget_outbox_replayed_total",
    "widget_outbox_moved_aside_total",
    "widget_outbox_redis_loss_detected_total",
];

impl Component {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self, binary: &Path, config: &Path) -> Result<()> {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("component log")?;
        // Through `setpriv --pdeathsig KILL` (as testkit starts its servers): if the suite
        // itself is killed, its components go with it instead of running on.
        let mut cmd = Command::new("setpriv");
        cmd.arg("--pdeathsig=KILL")
            .arg(binary)
            .args(&self.args)
            .arg("--config")
            .arg(config)
            .arg("--admin-listen")
            .arg(&self.admin)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().context("log")?)
            .stderr(log)
            .kill_on_drop(true);
        if let Some(public) = &self.public {
            cmd.arg("--listen").arg(public);
        }
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("start {}", self.name))?,
        );
        self.paused = false;
        Ok(())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// The last lines of its log, for a failure report.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Reads its /metrics into the current incarnation's tally (kept if it does not answer).
    pub async fn scrape(&mut self, http: &Http) {
        if self.child.is_none() || self.paused {
            return;
        }
        let Some((200, body)) = http.get(&self.admin, "/metrics", None).await else {
            return;
        };
        let text = String::from_utf8_lossy(&body);
        for name in COUNTERS {
            self.tally
                .current
                .insert(name.into(), sum_family(&text, name));
        }
    }

    /// This component's counter summed over its incarnations.
    pub fn counter(&self, name: &str) -> f64 {
        self.tally.finished.get(name).copied().unwrap_or(0.0)
            + self.tally.current.get(name).copied().unwrap_or(0.0)
    }

    fn end_incarnation(&mut self) {
        for (k, v) in std::mem::take(&mut self.tally.current) {
            *self.tally.finished.entry(k).or_default() += v;
        }
    }

    pub async fn ready(&self, http: &Http) -> bool {
        !self.paused && matches!(http.get(&self.admin, "/readyz", None).await, Some((200, _)))
    }

    /// Waits until /readyz says `ready`; how long it took, `None` past `limit`.
    pub async fn becomes(&self, http: &Http, ready: bool, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let answer = http.get(&self.admin, "/readyz", None).await;
            let is_ready = matches!(answer, Some((200, _)));
            if is_ready == ready {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            signal_pid(pid, sig);
        }
    }

    /// SIGKILL, after a last scrape so its counters so far are kept.
    pub async fn kill(&mut self, http: &Http) {
        self.scrape(http).await;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        self.end_incarnation();
    }

    /// SIGKILL at once, without a last scrape (counters since the last one are lost): for a
    /// kill that must land within milliseconds.
    pub async fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        self.end_incarnation();
    }

    /// SIGSTOP at once, without a last scrape.
    pub fn pause_now(&mut self) {
        self.signal("STOP");
        self.paused = true;
    }

    /// SIGSTOP: the process holds its connections and its pending entries, and does nothing.
    pub async fn pause(&mut self, http: &Http) {
        self.scrape(http).await;
        self.signal("STOP");
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.signal("CONT");
        self.paused = false;
    }

    /// SIGTERM; how long until it exited (0 status), or why not. Killed after `limit`.
    pub async fn terminate(&mut self, http: &Http, limit: Duration) -> Result<Duration> {
        self.scrape(http).await;
        let mut child = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        let start = Instant::now();
        if let Some(pid) = child.id() {
            signal_pid(pid, "TERM");
        }
        let outcome = match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(start.elapsed()),
            Ok(Ok(status)) => Err(anyhow!("exited with {status}")),
            Ok(Err(e)) => Err(anyhow!("wait: {e}")),
            Err(_) => {
                let _ = child.kill().await;
                Err(anyhow!("still running {limit:?} after SIGTERM"))
            }
        };
        self.end_incarnation();
        outcome
    }

    fn links(&self) -> impl Iterator<Item = &TcpProxy> {
        self.redis_link
            .proxy
            .iter()
            .chain(self.db_link.proxy.iter())
    }
}

fn signal_pid(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status();
}

/// Sum of every sample of a counter family in a Prometheus text exposition.
pub fn sum_family(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once('}')?.1
            } else if rest.starts_with(' ') {
                rest
            } else {
                return None;
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

pub struct Fleet {
    pub product_pg: PgServer,
    pub core_pg: PgServer,
    pub redis: RedisServer,
    /// An asynchronous replica of `redis`, for the failover scenario.
    pub replica: Option<RedisServer>,
    pub product_urls: HashMap<&'static str, String>,
    pub core_url: String,
    pub config: Config,
    pub components: Vec<Component>,
    binary: PathBuf,
    config_path: PathBuf,
    dir: tempfile::TempDir,
    pub http: Http,
}

impl Fleet {
    /// Starts the stores (Redis with AOF), migrates, and starts every component; returns once
    /// all report ready. With `proxied`, each component reaches each store through its own
    /// proxy (needed by the network and failover scenarios; load runs go direct).
    pub async fn start(screen_keys: &[String], proxied: bool, with_replica: bool) -> Result<Fleet> {
        let binary = runtime_binary()?;
        let (product_pg, core_pg, redis) = tokio::join!(
            PgServer::start(),
            PgServer::start(),
            RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]),
        );
        let (product_pg, core_pg, redis) = (product_pg?, core_pg?, redis?);
        let replica = if with_replica {
            Some(RedisServer::start_replica_of(&redis).await?)
        } else {
            None
        };
        let core_url = core_pg.create_database("core").await?;
        migrate(&store::CORE_MIGRATIONS, &core_url).await?;
        let mut product_urls = HashMap::new();
        for source in SOURCES {
            let url = product_pg
                .create_database(&format!("product_{source}"))
                .await?;
            migrate(&store::PRODUCT_MIGRATIONS, &url).await?;
            product_urls.insert(source, url);
        }
        let yaml = config_yaml(screen_keys);
        let config = Config::from_yaml_str(&yaml).map_err(|e| anyhow!("chaos config: {e}"))?;
        let dir = tempfile::Builder::new().prefix("widget-chaos-").tempdir()?;
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, config.to_yaml())?;

        // Component logs go to the fleet's temporary directory, or to WIDGET_CHAOS_LOGS (kept).
        let logs = match std::env::var_os("WIDGET_CHAOS_LOGS") {
            Some(d) => {
                std::fs::create_dir_all(&d)?;
                PathBuf::from(d)
            }
            None => dir.path().to_path_buf(),
        };
        let mut components = Vec::new();
        for source in SOURCES {
            let redis_link = Link::to(redis.port(), proxied).await?;
            let db_link = Link::to(product_pg.port(), proxied).await?;
            let env = vec![
                ("SOURCE_NAME".into(), source.to_string()),
                ("REDIS_URL".into(), redis_url(redis_link.port(redis.port()))),
                (
                    "SOURCE_DATABASE_URL".into(),
                    via(
                        &product_urls[source],
                        product_pg.port(),
                        db_link.port(product_pg.port()),
                    ),
                ),
            ];
            components.push(component(
                format!("worker-{source}"),
                vec!["outbox-worker".into()],
                env,
                redis_link,
                db_link,
                &logs,
            )?);
        }
        for i in 1..=2 {
            let (redis_link, db_link, env) =
                core_side(&redis, &core_pg, &core_url, proxied).await?;
            components.push(component(
                format!("ingester-{i}"),
                vec![
                    "ingester".into(),
                    "--consumer".into(),
                    format!("ingester-{i}"),
                ],
                env,
                redis_link,
                db_link,
                &logs,
            )?);
        }
        for i in 1..=2 {
            let (redis_link, db_link, env) =
                core_side(&redis, &core_pg, &core_url, proxied).await?;
            let mut c = component(
                format!("api-{i}"),
                vec!["core-api".into()],
                env,
                redis_link,
                db_link,
                &logs,
            )?;
            c.public = Some(format!("127.0.0.1:{}", testkit::free_port()?));
            components.push(c);
        }
        let mut fleet = Fleet {
            product_pg,
            core_pg,
            redis,
            replica,
            product_urls,
            core_url,
            config,
            components,
            binary,
            config_path,
            dir,
            http: Http::new(),
        };
        for i in 0..fleet.components.len() {
            fleet.spawn(i)?;
        }
        fleet.all_ready(Duration::from_secs(60)).await?;
        if let Some(replica) = &fleet.replica {
            replica.wait_in_sync(Duration::from_secs(30)).await?;
        }
        Ok(fleet)
    }

    /// Where the components' logs are (kept while the fleet lives).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let (binary, config) = (self.binary.clone(), self.config_path.clone());
        self.components[i].spawn(&binary, &config)
    }

    pub fn index(&self, name: &str) -> usize {
        self.components
            .iter()
            .position(|c| c.name == name)
            .unwrap_or_else(|| panic!("no component {name}"))
    }

    pub fn get(&self, name: &str) -> &Component {
        &self.components[self.index(name)]
    }

    pub fn get_mut(&mut self, name: &str) -> &mut Component {
        let i = self.index(name);
        &mut self.components[i]
    }

    /// Starts a component that was killed or terminated.
    pub fn restart(&mut self, name: &str) -> Result<()> {
        let i = self.index(name);
        if self.components[i].is_running() {
            return Ok(());
        }
        self.spawn(i)
    }

    pub fn apis(&self) -> Vec<String> {
        self.components
            .iter()
            .filter_map(|c| c.public.clone())
            .collect()
    }

    /// Waits until every component reports ready.
    pub async fn all_ready(&self, limit: Duration) -> Result<()> {
        for c in &self.components {
            if c.becomes(&self.http, true, limit).await.is_none() {
                bail!(
                    "{} not ready within {limit:?}; its log:\n{}",
                    c.name,
                    c.log_tail(20)
                );
            }
        }
        Ok(())
    }

    /// How long until each component reports ready (checked together every 100 ms); `None`
    /// for one still not ready after `limit`.
    pub async fn recovery(&self, limit: Duration) -> Vec<(String, Option<Duration>)> {
        let start = Instant::now();
        let mut times: Vec<(String, Option<Duration>)> = self
            .components
            .iter()
            .map(|c| (c.name.clone(), None))
            .collect();
        while start.elapsed() < limit {
            for (c, (_, t)) in self.components.iter().zip(times.iter_mut()) {
                if t.is_none() && c.ready(&self.http).await {
                    *t = Some(start.elapsed());
                }
            }
            if times.iter().all(|(_, t)| t.is_some()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        times
    }

    pub async fn scrape_all(&mut self) {
        let http = self.http.clone();
        for c in &mut self.components {
            c.scrape(&http).await;
        }
    }

    /// A counter summed over every component.
    pub fn counter(&self, name: &str) -> f64 {
        self.components.iter().map(|c| c.counter(name)).sum()
    }

    pub fn links(&self) -> impl Iterator<Item = &TcpProxy> {
        self.components.iter().flat_map(Component::links)
    }

    pub fn redis_links(&self) -> impl Iterator<Item = &TcpProxy> {
        self.components
            .iter()
            .filter_map(|c| c.redis_link.proxy.as_ref())
    }

    pub async fn redis_conn(&self) -> Result<redis::aio::MultiplexedConnection> {
        Ok(self.redis.connection().await?)
    }

    pub async fn pool(&self, url: &str) -> Result<PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?)
    }
}

fn component(
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    redis_link: Link,
    db_link: Link,
    dir: &Path,
) -> Result<Component> {
    Ok(Component {
        name,
        child: None,
        admin: format!("127.0.0.1:{}", testkit::free_port()?),
        public: None,
        args,
        env,
        redis_link,
        db_link,
        dir: dir.to_path_buf(),
        starts: 0,
        tally: Tally::default(),
        paused: false,
    })
}

/// The links and environment of a component of the core side (ingester, core-api).
async fn core_side(
    redis: &RedisServer,
    core_pg: &PgServer,
    core_url: &str,
    proxied: bool,
) -> Result<(Link, Link, Vec<(String, String)>)> {
    let redis_link = Link::to(redis.port(), proxied).await?;
    let db_link = Link::to(core_pg.port(), proxied).await?;
    let env = vec![
        ("REDIS_URL".into(), redis_url(redis_link.port(redis.port()))),
        (
            "CORE_DATABASE_URL".into(),
            via(core_url, core_pg.port(), db_link.port(core_pg.port())),
        ),
    ];
    Ok((redis_link, db_link, env))
}

fn redis_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}/")
}

/// `url` (a database on the server at `server`) reached through `port` instead.
fn via(url: &str, server: u16, port: u16) -> String {
    url.replace(&format!(":{server}/"), &format!(":{port}/"))
}

async fn migrate(migrator: &sqlx::migrate::Migrator, url: &str) -> Result<()> {
    let pool = PgPool::connect(url).await?;
    store::migrate(migrator, &pool)
        .await
        .map_err(|e| anyhow!("migrate: {e}"))?;
    pool.close().await;
    Ok(())
}

/// CPU seconds (user + system) and resident bytes of a process, from /proc.
pub fn cpu_and_rss(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state(0) ppid(1) ... utime(11) stime(12) ... rss(21) in pages.
    let ticks = 100.0; // USER_HZ on Linux
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    Some(((utime + stime) / ticks, rss_pages * 4096))
}

/// Proportional set size in bytes (`/proc/<pid>/smaps_rollup`): resident memory with shared
/// pages divided among the processes sharing them, so summing Postgres backends (which all map
/// its shared buffers) does not count those buffers once per backend. Falls back to RSS.
pub fn pss(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok();
    let kib = text.as_deref().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    match kib {
        Some(k) => Some(k * 1024),
        None => cpu_and_rss(pid).map(|(_, rss)| rss),
    }
}

/// Open file descriptors, and how many of them are sockets.
pub fn open_fds(pid: u32) -> Option<(usize, usize)> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let mut all = 0;
    let mut sockets = 0;
    for e in entries.flatten() {
        all += 1;
        if std::fs::read_link(e.path())
            .map(|t| t.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false)
        {
            sockets += 1;
        }
    }
    Some((all, sockets))
}
