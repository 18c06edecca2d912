//! Private Postgres and Redis servers for tests.
//!
//! Each server is started from the installed binaries on a random loopback port with its data in
//! a temp dir, can be stopped and started again (same port, same data) to test failures, and is
//! torn down when dropped, also when the test panics. Servers run with `PR_SET_PDEATHSIG`
//! (through `setpriv --pdeathsig KILL`), so even a test process killed by a timeout leaves none
//! behind. When the harness runs as root, Postgres runs as the `postgres` user (or `nobody`),
//! because `initdb` and `postgres` refuse to run as root.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{binary} not found: install it with `{install}` (Debian)")]
    Missing {
        binary: &'static str,
        install: &'static str,
    },
    #[error("{0}")]
    Io(String),
    #[error("{what} did not become ready within {secs}s; log:\n{log}")]
    NotReady {
        what: &'static str,
        secs: u64,
        log: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io(context: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io(format!("{context}: {e}"))
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind a free port"))?;
    Ok(l.local_addr().map_err(io("local addr"))?.port())
}

fn is_root() -> bool {
    // SAFETY-free check: `id -u` avoids a libc dependency.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg(name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn which(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

/// Builds a command that runs `program` with `PR_SET_PDEATHSIG=KILL`, as `user` if given.
fn guarded(program: &Path, user: Option<&str>) -> Result<Command> {
    let setpriv = which("setpriv").ok_or(Error::Missing {
        binary: "setpriv",
        install: "apt-get install -y util-linux",
    })?;
    let mut cmd = Command::new(setpriv);
    if let Some(u) = user {
        cmd.args([
            format!("--reuid={u}"),
            format!("--regid={u}"),
            "--init-groups".into(),
        ]);
    }
    cmd.arg("--pdeathsig=KILL").arg(program);
    Ok(cmd)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status();
}

/// Waits for a child to exit, up to `limit`; kills it after that.
fn wait_exit(child: &mut Child, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn unique_suffix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------------
// Postgres
// ---------------------------------------------------------------------------------------------

/// Where the Postgres server binaries are: `pg_config --bindir`, else `/usr/lib/postgresql/*/bin`.
pub fn postgres_bindir() -> Result<PathBuf> {
    let missing = Error::Missing {
        binary: "postgres (server)",
        install: "apt-get update && apt-get install -y postgresql",
    };
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("postgres").is_file() && dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| missing)?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("postgres").is_file() && d.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop().ok_or(Error::Missing {
        binary: "postgres (server)",
        install: "apt-get update && apt-get install -y postgresql",
    })
}

fn pg_user() -> Option<String> {
    if !is_root() {
        return None;
    }
    Some(
        if user_exists("postgres") {
            "postgres"
        } else {
            "nobody"
        }
        .to_string(),
    )
}

fn chown(path: &Path, user: &str) -> Result<()> {
    let ok = Command::new("chown")
        .args(["-R", &format!("{user}:"), &path.display().to_string()])
        .status()
        .map_err(io("chown"))?
        .success();
    if ok {
        Ok(())
    } else {
        Err(Error::Io(format!(
            "chown {} to {user} failed",
            path.display()
        )))
    }
}

/// An `initdb`-ed cluster, made once per machine and user and copied for every server: a copy
/// takes a fraction of what `initdb` costs.
fn template_cluster(bindir: &Path, user: Option<&str>) -> Result<PathBuf> {
    let version = bindir
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "pg".into());
    let root = std::env::temp_dir().join(format!(
        "testkit-pg-template-{version}-{}",
        user.unwrap_or("self")
    ));
    if root.join("PG_VERSION").is_file() {
        return Ok(root);
    }
    let staging = std::env::temp_dir().join(format!("testkit-pg-staging-{}", unique_suffix()));
    std::fs::create_dir_all(&staging).map_err(io("create template dir"))?;
    if let Some(u) = user {
        chown(&staging, u)?;
    }
    let log = std::env::temp_dir().join(format!("testkit-initdb-{}.log", unique_suffix()));
    let logf = std::fs::File::create(&log).map_err(io("create initdb log"))?;
    let status = guarded(&bindir.join("initdb"), user)?
        .args(["-D", &staging.display().to_string()])
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ])
        .stdout(logf.try_clone().map_err(io("log"))?)
        .stderr(logf)
        .status()
        .map_err(io("run initdb"))?;
    if !status.success() {
        return Err(Error::Io(format!("initdb failed:\n{}", tail(&log))));
    }
    // Another test process may have won the race; either template is fine.
    if std::fs::rename(&staging, &root).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(root)
}

/// A private Postgres server. Dropping it stops the server and removes its data.
pub struct PgServer {
    bindir: PathBuf,
    user: Option<String>,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl PgServer {
    pub async fn start() -> Result<Self> {
        let bindir = postgres_bindir()?;
        let user = pg_user();
        let template = template_cluster(&bindir, user.as_deref())?;
        let dir = tempfile::Builder::new()
            .prefix("testkit-pg-")
            .tempdir()
            .map_err(io("create temp dir"))?;
        let data = dir.path().join("data");
        let ok = Command::new("cp")
            .args([
                "-a",
                &template.display().to_string(),
                &data.display().to_string(),
            ])
            .status()
            .map_err(io("copy template cluster"))?
            .success();
        if !ok {
            return Err(Error::Io("copying the template cluster failed".into()));
        }
        if let Some(u) = &user {
            chown(dir.path(), u)?;
        }
        let mut server = PgServer {
            bindir,
            user,
            dir,
            port: free_port()?,
            child: None,
        };
        server.start_again().await?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of a database on this server (`postgres` always exists).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a database with a unique name and returns its URL.
    pub async fn fresh_database(&self) -> Result<String> {
        let name = format!("t_{}", unique_suffix());
        self.create_database(&name).await
    }

    pub async fn create_database(&self, name: &str) -> Result<String> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .map_err(|e| Error::Io(format!("connect: {e}")))?;
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', ""));
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .map_err(|e| Error::Io(format!("create database {name}: {e}")))?;
        Ok(self.url(name))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Starts the server (again) on the same port with the same data.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("open postgres log"))?;
        let data = self.dir.path().join("data");
        let child = guarded(&self.bindir.join("postgres"), self.user.as_deref())?
            .args(["-D", &data.display().to_string()])
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                &format!("unix_socket_directories={}", self.dir.path().display()),
            ])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .args(["-c", "shared_buffers=32MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("log"))?)
            .stderr(log)
            .spawn()
            .map_err(io("spawn postgres"))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        use sqlx::Connection;
        let start = Instant::now();
        let limit = Duration::from_secs(30);
        while start.elapsed() < limit {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(Error::Io(format!(
                    "postgres exited at start ({status}):\n{}",
                    tail(&self.log_path())
                )));
            }
            if let Ok(conn) = sqlx::PgConnection::connect(&self.url("postgres")).await {
                let _ = conn.close().await;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Error::NotReady {
            what: "postgres",
            secs: limit.as_secs(),
            log: tail(&self.log_path()),
        })
    }

    /// Fast shutdown (SIGINT): open connections are cut, data is kept for [`start_again`].
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "INT");
            tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(20)))
                .await
                .ok();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Immediate shutdown: the data dir is deleted next anyway.
            signal(&child, "QUIT");
            wait_exit(&mut child, Duration::from_secs(10));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// A private Redis server. Dropping it stops the server and removes its data.
pub struct RedisServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> Result<Self> {
        let binary = which("redis-server")
            .or_else(|| Some(PathBuf::from("/usr/bin/redis-server")).filter(|p| p.is_file()))
            .ok_or(Error::Missing {
                binary: "redis-server",
                install: "apt-get update && apt-get install -y redis-server",
            })?;
        let dir = tempfile::Builder::new()
            .prefix("testkit-redis-")
            .tempdir()
            .map_err(io("create temp dir"))?;
        let mut server = RedisServer {
            binary,
            dir,
            port: free_port()?,
            child: None,
        };
        server.start_again().await?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A plain multiplexed connection for test assertions.
    pub async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        let client =
            redis::Client::open(self.url()).map_err(|e| Error::Io(format!("redis url: {e}")))?;
        client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| Error::Io(format!("redis connect: {e}")))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Starts the server (again) on the same port. Data saved by [`stop`] is loaded back;
    /// after [`kill`] or [`wipe`] it starts empty.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let child = guarded(&self.binary, None)?
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(["--logfile", &self.log_path().display().to_string()])
            // RDB is written only by a graceful shutdown (SIGTERM saves when a save point is set).
            .args(["--save", "3600 1000000000", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("spawn redis-server"))?;
        self.child = Some(child);
        let start = Instant::now();
        let limit = Duration::from_secs(15);
        while start.elapsed() < limit {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(Error::Io(format!(
                    "redis-server exited at start ({status}):\n{}",
                    tail(&self.log_path())
                )));
            }
            if let Ok(mut conn) = self.connection().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut conn).await;
                if pong.is_ok() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Error::NotReady {
            what: "redis-server",
            secs: limit.as_secs(),
            log: tail(&self.log_path()),
        })
    }

    /// Graceful shutdown (SIGTERM): the dataset is saved and comes back on [`start_again`].
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(20)))
                .await
                .ok();
        }
    }

    /// Hard kill (SIGKILL): nothing is saved; the next start is empty unless a dump exists.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            tokio::task::spawn_blocking(move || {
                let _ = child.wait();
            })
            .await
            .ok();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers, like a Redis
    /// that hangs or a network that drops packets. [`RedisServer::resume`] undoes it.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal(child, "STOP");
        }
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal(child, "CONT");
        }
    }

    /// Removes saved data, so the next [`start_again`] starts empty (a Redis that lost its data).
    pub fn wipe(&self) {
        let _ = std::fs::remove_file(self.dir.path().join("dump.rdb"));
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or gives up after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn postgres_starts_stops_and_keeps_data() {
        let mut pg = PgServer::start().await.expect("start postgres");
        let url = pg.fresh_database().await.expect("db");
        let pool = sqlx::PgPool::connect(&url).await.expect("connect");
        sqlx::query("CREATE TABLE t (x int)")
            .execute(&pool)
            .await
            .expect("create");
        sqlx::query("INSERT INTO t VALUES (7)")
            .execute(&pool)
            .await
            .expect("insert");
        pool.close().await;
        pg.stop().await;
        {
            use sqlx::Connection;
            assert!(
                sqlx::PgConnection::connect(&url).await.is_err(),
                "server is down"
            );
        }
        pg.start_again().await.expect("restart");
        let pool = sqlx::PgPool::connect(&url).await.expect("reconnect");
        let x: i32 = sqlx::query_scalar("SELECT x FROM t")
            .fetch_one(&pool)
            .await
            .expect("select");
        assert_eq!(x, 7);
    }

    #[tokio::test]
    async fn redis_restart_keeps_data_and_wipe_empties_it() {
        let mut r = RedisServer::start().await.expect("start redis");
        let mut c = r.connection().await.expect("conn");
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async(&mut c)
            .await
            .expect("set");
        r.stop().await;
        assert!(r.connection().await.is_err(), "server is down");
        r.start_again().await.expect("restart");
        let mut c = r.connection().await.expect("conn");
        let v: Option<String> = redis::cmd("GET")
            .arg("k")
            .query_async(&mut c)
            .await
            .expect("get");
        assert_eq!(v.as_deref(), Some("v"));
        r.kill().await;
        r.wipe();
        r.start_again().await.expect("restart empty");
        let mut c = r.connection().await.expect("conn");
        let v: Option<String> = redis::cmd("GET")
            .arg("k")
            .query_async(&mut c)
            .await
            .expect("get");
        assert_eq!(v, None);
    }
}
