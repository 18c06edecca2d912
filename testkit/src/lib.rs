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

mod proxy;
pub use proxy::TcpProxy;

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

/// A loopback port free right now (another process may still take it before it is used).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind a free port"))?;
    Ok(l.local_addr().map_err(io("local addr"))?.port())
}

/// Whether a server failed to start because its port was already in use.
fn port_taken(e: &Error) -> bool {
    e.to_string().contains("Address already in use")
}

/// A server started on a probed free port.
trait OnPort: Sized {
    fn set_port(&mut self, port: u16);
    async fn start_again(&mut self) -> Result<()>;
}

/// Starts `server`; the probed port can be taken by another process between the probe and the
/// server's bind (many tests start servers at once), so on that error pick another and retry.
async fn start_on_free_port<S: OnPort>(mut server: S) -> Result<S> {
    let mut attempts = 0;
    loop {
        match server.start_again().await {
            Err(e) if attempts < 5 && port_taken(&e) => {
                attempts += 1;
                server.set_port(free_port()?);
            }
            other => return other.map(|()| server),
        }
    }
}

impl OnPort for PgServer {
    fn set_port(&mut self, port: u16) {
        self.port = port;
    }
    async fn start_again(&mut self) -> Result<()> {
        PgServer::start_again(self).await
    }
}

impl OnPort for RedisServer {
    fn set_port(&mut self, port: u16) {
        self.port = port;
    }
    async fn start_again(&mut self) -> Result<()> {
        RedisServer::start_again(self).await
    }
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
    signal_pid(child.id(), sig);
}

fn signal_pid(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
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
        start_on_free_port(PgServer {
            bindir,
            user,
            dir,
            port: free_port()?,
            child: None,
        })
        .await
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
            // Each attempt bounded, so the 30 s limit holds even if a connect never answers.
            let attempt = sqlx::PgConnection::connect(&self.url("postgres"));
            if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
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

    /// The postmaster's process id, while the server runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The postmaster and every process it started (backends, checkpointer, WAL writer...).
    pub fn pids(&self) -> Vec<u32> {
        self.pid().map(with_descendants).unwrap_or_default()
    }

    /// Freezes the whole server (SIGSTOP to the postmaster and every backend): open connections
    /// stay open and new ones are accepted by the kernel, but nothing answers, as when a failed
    /// primary stops responding. [`PgServer::resume`] undoes it.
    pub fn pause(&self) {
        for pid in self.pids() {
            signal_pid(pid, "STOP");
        }
    }

    /// Lets a paused server run again (SIGCONT to all its processes).
    pub fn resume(&self) {
        for pid in self.pids() {
            signal_pid(pid, "CONT");
        }
    }
}

/// `pid` and its descendants, from `/proc` (empty where there is no `/proc`).
fn with_descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // `pid (comm) state ppid ...`: comm may hold spaces, so parse after the last ')'.
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
            if let Some(ppid) = ppid {
                parents.push((child, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    found
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
    /// Extra `redis-server` arguments from [`RedisServer::start_with`], passed on every start.
    args: Vec<String>,
    /// Port of the master on 127.0.0.1 while this server is a replica.
    master_port: Option<u16>,
    /// The CA that signed the server's certificate, when it speaks only TLS.
    tls_ca: Option<String>,
}

/// A certificate authority made for one test: its certificate as PEM, and leaf certificates
/// signed by it.
pub struct TestCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Result<TestCa> {
        let tls = |e: rcgen::Error| Error::Io(format!("generate certificate: {e}"));
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().map_err(tls)?;
        let pem = params.self_signed(&key).map_err(tls)?.pem();
        Ok(TestCa { params, key, pem })
    }

    /// The CA certificate (PEM), what a client trusts.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `localhost` and 127.0.0.1 and its key, both PEM.
    pub fn server_cert(&self) -> Result<(String, String)> {
        let tls = |e: rcgen::Error| Error::Io(format!("generate certificate: {e}"));
        let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .map_err(tls)?;
        let key = rcgen::KeyPair::generate().map_err(tls)?;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(tls)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

impl RedisServer {
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// A server that speaks only TLS, with a certificate for 127.0.0.1 signed by a CA made for
    /// it ([`RedisServer::tls_ca_pem`]); clients are not asked for certificates. [`url`] is
    /// then a `rediss://` URL.
    pub async fn start_tls() -> Result<Self> {
        Self::start_tls_with(&[], &TestCa::new("testkit Redis CA")?).await
    }

    /// Like [`RedisServer::start_tls`], with a certificate signed by `ca` (servers that talk to
    /// each other over TLS, a cluster's nodes, trust one CA) and `args` appended.
    pub async fn start_tls_with(extra: &[&str], ca: &TestCa) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("testkit-redis-")
            .tempdir()
            .map_err(io("create temp dir"))?;
        let (cert, key) = ca.server_cert()?;
        let write = |name: &str, text: &str| -> Result<String> {
            let path = dir.path().join(name);
            std::fs::write(&path, text).map_err(io("write certificate"))?;
            Ok(path.display().to_string())
        };
        let (ca_file, cert_file, key_file) = (
            write("ca.pem", ca.pem())?,
            write("server.pem", &cert)?,
            write("server.key", &key)?,
        );
        let mut args: Vec<String> = vec![
            "--tls-cert-file".into(),
            cert_file,
            "--tls-key-file".into(),
            key_file,
            "--tls-ca-cert-file".into(),
            ca_file,
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Self::launch_in(dir, args, None, Some(ca.pem().to_string())).await
    }

    /// The PEM of the CA that signed a [`RedisServer::start_tls`] server's certificate.
    pub fn tls_ca_pem(&self) -> Option<&str> {
        self.tls_ca.as_deref()
    }

    /// Like [`RedisServer::start`], with `args` appended to the `redis-server` command line on
    /// this and every later [`RedisServer::start_again`], e.g. `["--maxmemory-policy",
    /// "allkeys-lru"]` or `["--appendonly", "yes", "--appendfsync", "everysec"]`.
    ///
    /// They come after the defaults, and for an option that takes one value the last occurrence
    /// wins, so they override the defaults. `--save` is the exception: every occurrence adds a
    /// save point; `"--save", ""` first clears them.
    pub async fn start_with(args: &[&str]) -> Result<Self> {
        Self::launch(args.iter().map(|a| a.to_string()).collect(), None).await
    }

    /// Starts a replica of `master` (asynchronous replication, like production). Call
    /// [`RedisServer::wait_in_sync`] before relying on it having the master's data.
    pub async fn start_replica_of(master: &RedisServer) -> Result<RedisServer> {
        Self::launch(Vec::new(), Some(master.port)).await
    }

    async fn launch(args: Vec<String>, master_port: Option<u16>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("testkit-redis-")
            .tempdir()
            .map_err(io("create temp dir"))?;
        Self::launch_in(dir, args, master_port, None).await
    }

    async fn launch_in(
        dir: tempfile::TempDir,
        args: Vec<String>,
        master_port: Option<u16>,
        tls_ca: Option<String>,
    ) -> Result<Self> {
        let binary = which("redis-server")
            .or_else(|| Some(PathBuf::from("/usr/bin/redis-server")).filter(|p| p.is_file()))
            .ok_or(Error::Missing {
                binary: "redis-server",
                install: "apt-get update && apt-get install -y redis-server",
            })?;
        start_on_free_port(RedisServer {
            binary,
            dir,
            port: free_port()?,
            child: None,
            args,
            master_port,
            tls_ca,
        })
        .await
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        match self.tls_ca {
            Some(_) => format!("rediss://127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// A plain multiplexed connection for test assertions (over TLS, trusting the server's CA,
    /// for a [`RedisServer::start_tls`] server).
    pub async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        let url_error = |e: redis::RedisError| Error::Io(format!("redis url: {e}"));
        let client = match &self.tls_ca {
            None => redis::Client::open(self.url()).map_err(url_error)?,
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone().into_bytes()),
                },
            )
            .map_err(url_error)?,
        };
        client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| Error::Io(format!("redis connect: {e}")))
    }

    /// The users of the clients connected with client tracking on (`CLIENT LIST`, flag `t`).
    pub async fn tracking_users(&self) -> Result<Vec<String>> {
        let mut conn = self.connection().await?;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::Io(format!("CLIENT LIST: {e}")))?;
        Ok(list
            .lines()
            .filter_map(|line| {
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                };
                field("flags")?
                    .contains('t')
                    .then(|| field("user").map(str::to_string))
                    .flatten()
            })
            .collect())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Starts the server (again) on the same port. Data saved by [`stop`] is loaded back;
    /// after [`kill`] or [`wipe`] it starts empty (unless `--appendonly yes` was passed to
    /// [`RedisServer::start_with`]: then [`kill`] keeps what the AOF has). A replica starts as a
    /// replica of the same master again, until [`RedisServer::promote`].
    pub async fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let mut cmd = guarded(&self.binary, None)?;
        let port = self.port.to_string();
        match self.tls_ca {
            Some(_) => cmd.args(["--port", "0", "--tls-port", &port]),
            None => cmd.args(["--port", &port]),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(["--logfile", &self.log_path().display().to_string()])
            // RDB is written only by a graceful shutdown (SIGTERM saves when a save point is set).
            .args(["--save", "3600 1000000000", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            // A master waits 5 s by default before a full sync, for more replicas to join.
            .args(["--repl-diskless-sync-delay", "0"]);
        if let Some(master) = self.master_port {
            cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        let child = cmd
            .args(&self.args)
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

    /// Hard kill (SIGKILL): nothing is saved; the next start is empty unless a dump (or an AOF,
    /// see [`RedisServer::start_with`]) exists.
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
    ///
    /// The kernel still accepts what peers send until the socket buffers are full, and the
    /// server reads it on resume: a paused replica still gets the master's writes made
    /// meanwhile. To make it miss them, also cut its link with
    /// [`RedisServer::disconnect_replicas`] on the master.
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

    /// Removes saved data (RDB and AOF), so the next [`start_again`] starts empty (a Redis that
    /// lost its data).
    pub fn wipe(&self) {
        let _ = std::fs::remove_file(self.dir.path().join("dump.rdb"));
        let _ = std::fs::remove_dir_all(self.dir.path().join("appendonlydir"));
    }

    /// Waits until this replica's link to its master is up and it has applied everything the
    /// master had written when asked. Replication is asynchronous: without this a test races
    /// the replica.
    pub async fn wait_in_sync(&self, limit: Duration) -> Result<()> {
        let master = self
            .master_port
            .ok_or_else(|| Error::Io(format!("redis on {} is not a replica", self.port)))?;
        let start = Instant::now();
        while start.elapsed() < limit {
            // The master first: its offset also grows by its pings to replicas, so a replica
            // offset at least as large as one read before means nothing is missing.
            if let Ok(m) = info_replication(master, self.tls_ca.as_deref()).await
                && let Ok(r) = info_replication(self.port, self.tls_ca.as_deref()).await
                && info_field(&r, "master_link_status") == Some("up")
                && let (Some(m), Some(r)) = (repl_offset(&m), repl_offset(&r))
                && r >= m
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Error::NotReady {
            what: "redis replica sync",
            secs: limit.as_secs(),
            log: tail(&self.log_path()),
        })
    }

    /// Makes this replica a master (`REPLICAOF NO ONE`), as a failover does; it keeps its data
    /// and takes writes. Later [`RedisServer::start_again`]s start it as a master too.
    pub async fn promote(&mut self) -> Result<()> {
        let mut conn = self.connection().await?;
        let _: () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::Io(format!("REPLICAOF NO ONE: {e}")))?;
        self.master_port = None;
        Ok(())
    }

    /// Closes the connections of this master's replicas (`CLIENT KILL TYPE replica`). They
    /// reconnect and catch up within about a second, unless paused or the master is gone by
    /// then: with [`RedisServer::pause`] on the replica it is how a test makes it miss the
    /// master's last writes, as a replica lagging behind at a failover does.
    pub async fn disconnect_replicas(&self) -> Result<()> {
        let mut conn = self.connection().await?;
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("replica")
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::Io(format!("CLIENT KILL TYPE replica: {e}")))?;
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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

/// A private Redis Cluster on loopback: `primaries` primaries with `replicas` replicas each
/// (`redis-cli --cluster create`), every node a [`RedisServer`] that can be killed, paused and
/// started again. A node missing for more than two seconds is failed over by its replica.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// For a [`RedisCluster::start_tls`] cluster, the CA (PEM) its nodes' certificates are
    /// signed by.
    ca: Option<String>,
}

/// A cluster node's view of itself, from `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub port: u16,
    pub primary: bool,
    /// Slot ranges this primary serves (empty for a replica).
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    pub async fn start(primaries: usize, replicas: usize) -> Result<Self> {
        Self::start_on(primaries, replicas, None).await
    }

    /// A cluster whose nodes speak only TLS, to clients, to each other (the cluster bus) and to
    /// their replicas, with certificates for 127.0.0.1 signed by one CA made for it
    /// ([`RedisCluster::tls_ca_pem`]). [`RedisCluster::url`] is then a `rediss://` URL.
    pub async fn start_tls(primaries: usize, replicas: usize) -> Result<Self> {
        Self::start_on(
            primaries,
            replicas,
            Some(TestCa::new("testkit Redis Cluster CA")?),
        )
        .await
    }

    /// The CA of a [`RedisCluster::start_tls`] cluster.
    pub fn tls_ca_pem(&self) -> Option<&str> {
        self.ca.as_deref()
    }

    fn ca(&self) -> Option<&str> {
        self.ca.as_deref()
    }

    async fn start_on(primaries: usize, replicas: usize, tls: Option<TestCa>) -> Result<Self> {
        let cli = which("redis-cli").ok_or(Error::Missing {
            binary: "redis-cli",
            install: "apt-get update && apt-get install -y redis-tools",
        })?;
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            nodes.push(Self::start_node(tls.as_ref()).await?);
        }
        let mut create = Command::new(cli);
        if let Some(ca) = &tls {
            let path = nodes[0].dir.path().join("cluster-ca.pem");
            std::fs::write(&path, ca.pem()).map_err(io("write CA"))?;
            create.arg("--tls").arg("--cacert").arg(&path);
        }
        create.args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(io("run redis-cli --cluster create"))?;
        if !out.status.success() {
            return Err(Error::Io(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let cluster = RedisCluster {
            nodes,
            ca: tls.map(|ca| ca.pem().to_string()),
        };
        cluster.wait_ok(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// One cluster-enabled node. Its bus port is probed like its data port; the data port's
    /// retry does not cover it, so a start that fails (a bus port taken meanwhile) is tried
    /// again with new ports.
    async fn start_node(tls: Option<&TestCa>) -> Result<RedisServer> {
        let mut attempts = 0;
        loop {
            let bus = free_port()?.to_string();
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                &bus,
                // Failover within about two to four seconds of a primary's loss, and by any replica
                // however long it was cut off (tests make replicas miss writes on purpose).
                // Not shorter: on a busy shared host a node that answers a second late was
                // then failed over while alive.
                "--cluster-node-timeout",
                "2000",
                "--cluster-replica-validity-factor",
                "0",
            ];
            let started = match tls {
                None => RedisServer::start_with(&args).await,
                Some(ca) => {
                    let mut args = args.to_vec();
                    args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"]);
                    RedisServer::start_tls_with(&args, ca).await
                }
            };
            match started {
                Err(_) if attempts < 3 => attempts += 1,
                other => return other,
            }
        }
    }

    /// The URL of one node (a cluster client finds the others from it).
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Every node's URL, for clients that take a list of seeds.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The node on `port`, to kill, pause or start again.
    pub fn node_mut(&mut self, port: u16) -> Option<&mut RedisServer> {
        self.nodes.iter_mut().find(|n| n.port() == port)
    }

    /// Waits until every running node sees the cluster as ok: all slots served, every node
    /// known, no node failed, every primary serving slots (replicas known as replicas).
    pub async fn wait_ok(&self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        let running: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(RedisServer::port)
            .collect();
        while start.elapsed() < limit {
            let mut ok = true;
            for port in &running {
                match cluster_info(*port, self.ca()).await {
                    Ok(info)
                        if info_field(&info, "cluster_state") == Some("ok")
                            && info_field(&info, "cluster_slots_ok") == Some("16384")
                            && info_field(&info, "cluster_slots_fail") == Some("0")
                            && info_field(&info, "cluster_slots_pfail") == Some("0") => {}
                    _ => ok = false,
                }
                if ok && let Ok(nodes) = self.topology_from(*port).await {
                    // Every running node must be known as up by this one, and a replica
                    // synced with its primary (clients leave out replicas still loading).
                    ok = running.iter().all(|p| nodes.iter().any(|n| n.port == *p))
                        // A primary without slots is a replica this node has not yet heard
                        // was made one (`--cluster create` returns before gossip spreads it).
                        && nodes.iter().all(|n| !n.primary || !n.slots.is_empty());
                    if ok && nodes.iter().any(|n| n.port == *port && !n.primary) {
                        ok = info_replication(*port, self.ca()).await.is_ok_and(|i| {
                            info_field(&i, "master_link_status") == Some("up")
                                && info_field(&i, "master_sync_in_progress") == Some("0")
                        });
                    }
                }
            }
            if ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Error::NotReady {
            what: "redis cluster",
            secs: limit.as_secs(),
            log: self
                .nodes
                .iter()
                .map(|n| format!("node {}:\n{}", n.port(), tail(&n.log_path())))
                .collect::<Vec<_>>()
                .join("\n"),
        })
    }

    /// Waits until `CLUSTER SLOTS` lists `replicas` replicas for every slot range, which is
    /// what clients reading from replicas go by. Redis leaves out a replica that has not
    /// replicated anything yet, so on a fresh cluster this needs a write to every primary.
    pub async fn wait_replicas_listed(&self, replicas: usize, limit: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let mut conn = plain_connection(self.running_port()?, self.ca()).await?;
            let slots: redis::RedisResult<Vec<Vec<redis::Value>>> = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut conn)
                .await;
            // Each range: start, end, the primary, then its replicas.
            if let Ok(ranges) = slots
                && !ranges.is_empty()
                && ranges.iter().all(|r| r.len() >= 3 + replicas)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Error::NotReady {
            what: "redis cluster replicas in CLUSTER SLOTS",
            secs: limit.as_secs(),
            log: String::new(),
        })
    }

    /// Moves `slot` to the primary on `to`, the way `redis-cli --cluster reshard` does: the
    /// target imports, the owner migrates, its keys move over one by one (`MIGRATE`), then
    /// every primary is told the new owner. Meanwhile clients meet ASK for keys already moved
    /// (and TRYAGAIN for a multi-key command whose keys are split); afterwards MOVED.
    /// `pause_between` is slept after each key, to keep the slot mid-migration for a while.
    pub async fn move_slot(&self, slot: u16, to: u16, pause_between: Duration) -> Result<()> {
        let nodes = self.topology().await?;
        let from = nodes
            .iter()
            .find(|n| n.primary && n.slots.iter().any(|(a, b)| *a <= slot && slot <= *b))
            .map(|n| n.port)
            .ok_or_else(|| Error::Io(format!("no primary serves slot {slot}")))?;
        if from == to {
            return Ok(());
        }
        let ca = self.ca.clone();
        let cluster_cmd = |port: u16, args: Vec<String>| {
            let ca = ca.clone();
            async move {
                let mut conn = plain_connection(port, ca.as_deref()).await?;
                let mut cmd = redis::cmd("CLUSTER");
                cmd.arg(&args);
                cmd.query_async::<redis::Value>(&mut conn)
                    .await
                    .map_err(|e| Error::Io(format!("CLUSTER {} on {port}: {e}", args.join(" "))))
            }
        };
        let id = |port: u16| async move {
            match cluster_cmd(port, vec!["MYID".into()]).await? {
                redis::Value::BulkString(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
                redis::Value::SimpleString(s) => Ok(s),
                other => Err(Error::Io(format!("CLUSTER MYID on {port}: {other:?}"))),
            }
        };
        let (from_id, to_id) = (id(from).await?, id(to).await?);
        let s = slot.to_string();
        cluster_cmd(
            to,
            vec!["SETSLOT".into(), s.clone(), "IMPORTING".into(), from_id],
        )
        .await?;
        cluster_cmd(
            from,
            vec![
                "SETSLOT".into(),
                s.clone(),
                "MIGRATING".into(),
                to_id.clone(),
            ],
        )
        .await?;
        let mut conn = plain_connection(from, self.ca()).await?;
        loop {
            let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                // One key at a time: the slot stays split between the two nodes longer.
                .arg(1)
                .query_async(&mut conn)
                .await
                .map_err(|e| Error::Io(format!("GETKEYSINSLOT: {e}")))?;
            if keys.is_empty() {
                break;
            }
            let _: redis::Value = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(|e| Error::Io(format!("MIGRATE: {e}")))?;
            tokio::time::sleep(pause_between).await;
        }
        for n in nodes.iter().filter(|n| n.primary) {
            cluster_cmd(
                n.port,
                vec!["SETSLOT".into(), s.clone(), "NODE".into(), to_id.clone()],
            )
            .await?;
        }
        Ok(())
    }

    /// The nodes that are up, as a running node sees them.
    pub async fn topology(&self) -> Result<Vec<ClusterNode>> {
        let mut last = Error::Io("no node is running".into());
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            match self.topology_from(n.port()).await {
                Ok(t) => return Ok(t),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn topology_from(&self, port: u16) -> Result<Vec<ClusterNode>> {
        let mut conn = plain_connection(port, self.ca()).await?;
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::Io(format!("CLUSTER NODES on {port}: {e}")))?;
        Ok(parse_cluster_nodes(&text))
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn slot_of(&self, key: &str) -> Result<u16> {
        let mut conn = plain_connection(self.running_port()?, self.ca()).await?;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::Io(format!("CLUSTER KEYSLOT: {e}")))
    }

    /// The primary serving the slot of `key`.
    pub async fn primary_for(&self, key: &str) -> Result<u16> {
        let slot = i64::from(self.slot_of(key).await?);
        self.topology()
            .await?
            .into_iter()
            .find(|n| {
                n.primary
                    && n.slots
                        .iter()
                        .any(|(a, b)| i64::from(*a) <= slot && slot <= i64::from(*b))
            })
            .map(|n| n.port)
            .ok_or_else(|| Error::Io(format!("no primary serves slot {slot}")))
    }

    /// SIGKILLs the primary on `port` (its data is gone) and waits until one of its replicas
    /// has taken over all of its slots, by the cluster's own failover; returns that replica's
    /// port. The killed node stays down until [`RedisServer::start_again`] on
    /// [`RedisCluster::node_mut`] (it then rejoins as a replica).
    pub async fn kill_primary(&mut self, port: u16, limit: Duration) -> Result<u16> {
        let slots = self
            .topology()
            .await?
            .into_iter()
            .find(|n| n.port == port && n.primary)
            .map(|n| n.slots)
            .ok_or_else(|| Error::Io(format!("{port} is not a primary")))?;
        let node = self
            .node_mut(port)
            .ok_or_else(|| Error::Io(format!("no node on {port}")))?;
        node.kill().await;
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(nodes) = self.topology().await
                && let Some(new) = nodes.iter().find(|n| {
                    n.port != port && n.primary && slots.iter().all(|s| n.slots.contains(s))
                })
            {
                return Ok(new.port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Error::NotReady {
            what: "redis cluster failover",
            secs: limit.as_secs(),
            log: self
                .nodes
                .iter()
                .filter(|n| n.is_running())
                .map(|n| format!("node {}:\n{}", n.port(), tail(&n.log_path())))
                .collect::<Vec<_>>()
                .join("\n"),
        })
    }

    fn running_port(&self) -> Result<u16> {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .map(RedisServer::port)
            .ok_or_else(|| Error::Io("no node is running".into()))
    }
}

/// A connection to the server on `port`, over TLS trusting `ca` when given.
async fn plain_connection(
    port: u16,
    ca: Option<&str>,
) -> Result<redis::aio::MultiplexedConnection> {
    let url_error = |e: redis::RedisError| Error::Io(format!("redis url: {e}"));
    let client = match ca {
        None => redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(url_error)?,
        Some(ca) => redis::Client::build_with_tls(
            format!("rediss://127.0.0.1:{port}/"),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.as_bytes().to_vec()),
            },
        )
        .map_err(url_error)?,
    };
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| Error::Io(format!("redis connect to {port}: {e}")))
}

async fn cluster_info(port: u16, ca: Option<&str>) -> Result<String> {
    let mut conn = plain_connection(port, ca).await?;
    redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut conn)
        .await
        .map_err(|e| Error::Io(format!("CLUSTER INFO on {port}: {e}")))
}

/// The nodes `CLUSTER NODES` lists as connected and not failed.
fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let addr = f.get(1)?;
            let flags = f.get(2)?;
            if flags.contains("fail") || f.get(7) != Some(&"connected") {
                return None;
            }
            let port = addr
                .split(['@', ','])
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(ClusterNode {
                port,
                primary: flags.contains("master"),
                slots,
            })
        })
        .collect()
}

async fn info_replication(port: u16, ca: Option<&str>) -> Result<String> {
    let mut conn = plain_connection(port, ca).await?;
    redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut conn)
        .await
        .map_err(|e| Error::Io(format!("INFO replication on {port}: {e}")))
}

/// The value of `field` in `INFO` output (`field:value` lines).
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

fn repl_offset(info: &str) -> Option<i64> {
    info_field(info, "master_repl_offset")?.parse().ok()
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

    async fn set(r: &RedisServer, k: &str, v: &str) {
        let mut c = r.connection().await.expect("conn");
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut c)
            .await
            .expect("set");
    }

    async fn get(r: &RedisServer, k: &str) -> Option<String> {
        let mut c = r.connection().await.expect("conn");
        redis::cmd("GET")
            .arg(k)
            .query_async(&mut c)
            .await
            .expect("get")
    }

    async fn config_get(r: &RedisServer, name: &str) -> String {
        let mut c = r.connection().await.expect("conn");
        let (_, v): (String, String) = redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query_async(&mut c)
            .await
            .expect("config get");
        v
    }

    #[tokio::test]
    async fn redis_start_with_args_override_defaults_and_survive_restarts() {
        let mut r = RedisServer::start_with(&[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--maxmemory-policy",
            "allkeys-lru",
        ])
        .await
        .expect("start redis");
        assert_eq!(config_get(&r, "appendonly").await, "yes");
        assert_eq!(config_get(&r, "maxmemory-policy").await, "allkeys-lru");
        set(&r, "k", "v").await;
        // With the AOF, even a hard kill keeps the data; the args are passed again.
        r.kill().await;
        r.start_again().await.expect("restart");
        assert_eq!(config_get(&r, "appendonly").await, "yes");
        assert_eq!(get(&r, "k").await.as_deref(), Some("v"));
        r.kill().await;
        r.wipe();
        r.start_again().await.expect("restart empty");
        assert_eq!(get(&r, "k").await, None);

        let r = RedisServer::start_with(&["--save", ""])
            .await
            .expect("start");
        assert_eq!(config_get(&r, "save").await, "");
    }

    #[tokio::test]
    async fn redis_cluster_serves_every_slot_and_a_replica_takes_over_a_killed_primary() {
        let mut cluster = RedisCluster::start(3, 1).await.expect("start cluster");
        let nodes = cluster.topology().await.expect("topology");
        let primaries: Vec<&ClusterNode> = nodes.iter().filter(|n| n.primary).collect();
        assert_eq!((nodes.len(), primaries.len()), (6, 3), "{nodes:?}");
        let served: u32 = primaries
            .iter()
            .flat_map(|n| &n.slots)
            .map(|(a, b)| u32::from(b - a) + 1)
            .sum();
        assert_eq!(served, 16384);

        let key = "testkit-key";
        let owner = cluster.primary_for(key).await.expect("owner");
        let mut conn = plain_connection(owner, None).await.expect("conn");
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg("v")
            .query_async(&mut conn)
            .await
            .expect("set");
        let new = cluster
            .kill_primary(owner, Duration::from_secs(20))
            .await
            .expect("failover");
        assert_ne!(new, owner);
        assert_eq!(cluster.primary_for(key).await.expect("new owner"), new);
        // The replica had the write (replicated before the kill, as the test waited for the
        // failover only).
        cluster
            .node_mut(owner)
            .expect("node")
            .start_again()
            .await
            .expect("restart");
        cluster
            .wait_ok(Duration::from_secs(20))
            .await
            .expect("ok again");
        let back = cluster.topology().await.expect("topology");
        assert!(
            back.iter().any(|n| n.port == owner && !n.primary),
            "the old primary rejoins as a replica: {back:?}"
        );
    }

    #[tokio::test]
    async fn redis_wait_in_sync_needs_a_replica() {
        let r = RedisServer::start().await.expect("start redis");
        assert!(r.wait_in_sync(Duration::from_millis(10)).await.is_err());
    }

    /// A failover where the replica lags behind: the promoted replica has what it had
    /// replicated, not the master's last write.
    #[tokio::test]
    async fn redis_promoted_replica_misses_the_writes_it_did_not_get() {
        let mut master = RedisServer::start().await.expect("master");
        let mut replica = RedisServer::start_replica_of(&master)
            .await
            .expect("replica");
        set(&master, "k1", "v1").await;
        replica
            .wait_in_sync(Duration::from_secs(15))
            .await
            .expect("in sync");
        assert_eq!(get(&replica, "k1").await.as_deref(), Some("v1"));

        replica.pause();
        master.disconnect_replicas().await.expect("cut link");
        set(&master, "k2", "v2").await;
        master.kill().await;
        replica.resume();
        replica.promote().await.expect("promote");

        assert_eq!(get(&replica, "k1").await.as_deref(), Some("v1"));
        assert_eq!(get(&replica, "k2").await, None);
        set(&replica, "k3", "v3").await; // a master now: takes writes
        // And stays one across a restart.
        replica.stop().await;
        replica.start_again().await.expect("restart");
        set(&replica, "k4", "v4").await;
        assert_eq!(get(&replica, "k3").await.as_deref(), Some("v3"));
    }

    /// Why `disconnect_replicas` is needed above: a paused replica still gets what the master
    /// sent meanwhile, from its socket buffer.
    #[tokio::test]
    async fn redis_paused_replica_still_gets_writes_sent_meanwhile() {
        let mut master = RedisServer::start().await.expect("master");
        let mut replica = RedisServer::start_replica_of(&master)
            .await
            .expect("replica");
        set(&master, "k1", "v1").await;
        replica
            .wait_in_sync(Duration::from_secs(15))
            .await
            .expect("in sync");
        replica.pause();
        set(&master, "k2", "v2").await;
        master.kill().await;
        replica.resume();
        replica.promote().await.expect("promote");
        assert_eq!(get(&replica, "k2").await.as_deref(), Some("v2"));
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
