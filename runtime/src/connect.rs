//! Opening connections with the deadlines this system needs (`database` and `redis` in the
//! config). Every store call a component makes ends within a stated time, whether the store
//! answers, refuses or has stopped answering (a failed host, a partition): see
//! `docs/ingester.md#deadlines`.

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, RedisFuture};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::{DatabaseConfig, RedisConfig, RedisMode};

/// A Redis endpoint with the deadlines of [`RedisConfig`]: every connection made through it
/// has them (the connection manager, blocking reads, one-off connections). A `rediss://` URL
/// connects over TLS, verifying the server against the system trust store, or against the CA
/// bundle given to [`Redis::open_tls`] (`REDIS_CA_FILE`) instead.
#[derive(Clone)]
pub struct Redis {
    /// The URL's server (in cluster mode: the node the others are found from).
    client: Client,
    /// In cluster mode, the client every connection is made through.
    cluster: Option<ClusterClient>,
    /// In cluster mode, the nodes the slot map is first read from (every URL given: a
    /// connection can be made while any one of them is up).
    seeds: Vec<redis::ConnectionInfo>,
    /// For one node of a cluster ([`Redis::servers`]): the same node by its announced
    /// hostname, tried when its IP cannot be reached or verified.
    alternate: Option<redis::ConnectionInfo>,
    settings: RedisConfig,
    /// The CA bundle (PEM) servers are verified against instead of the system's.
    ca: Option<std::sync::Arc<Vec<u8>>>,
}

impl std::fmt::Debug for Redis {
    // The URL may carry a password: only the settings are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Redis {
    pub fn open(url: &str, settings: &RedisConfig) -> redis::RedisResult<Redis> {
        Self::open_tls(url, settings, None)
    }

    /// Like [`Redis::open`]; a `rediss://` server is verified against `ca_pem` (one or more
    /// PEM certificates) instead of the system trust store.
    pub fn open_tls(
        url: &str,
        settings: &RedisConfig,
        ca_pem: Option<Vec<u8>>,
    ) -> redis::RedisResult<Redis> {
        let ca = ca_pem.map(std::sync::Arc::new);
        let urls = match settings.mode {
            RedisMode::Standalone => vec![url],
            RedisMode::Cluster => seed_urls(url),
        };
        let seeds = urls
            .into_iter()
            .map(|u| {
                u.into_connection_info()
                    .map(|i| i.set_tcp_settings(tcp_settings(settings)))
            })
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let Some(first) = seeds.first().cloned() else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no Redis URL",
            )));
        };
        let cluster = match settings.mode {
            RedisMode::Standalone => None,
            RedisMode::Cluster => Some(cluster_builder(&seeds, settings, ca.as_deref()).build()?),
        };
        Ok(Redis {
            client: client_for(first, ca.as_deref())?,
            cluster,
            seeds,
            alternate: None,
            settings: settings.clone(),
            ca,
        })
    }

    /// True in cluster mode.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The servers behind this endpoint, each as an endpoint of its own (the same credentials,
    /// TLS and deadlines): in cluster mode every node `CLUSTER NODES` lists (primaries,
    /// replicas, nodes that own no slot yet such as one a resharding is filling, failed ones
    /// only while they still own slots), with the [`NodeMap`] they were read from, to notice
    /// when it changes; standalone, this endpoint itself and no map. What needs a connection per server (client tracking, whose
    /// invalidations each node sends for its own keys) goes by it.
    pub async fn servers(&self) -> redis::RedisResult<(Vec<Redis>, Option<NodeMap>)> {
        if self.cluster.is_none() {
            return Ok((vec![self.clone()], None));
        }
        // One seed node's view, read over a connection to that node: every later check asks
        // the same node, so two nodes' views (briefly different) never look like a change, and
        // the node's own entry (whose address it may not know) is the seed's address.
        let mut last = None;
        for seed in &self.seeds {
            let source = self.server_at(seed)?;
            match NodeMap::read(source).await {
                Ok((nodes, map)) => {
                    if nodes.is_empty() {
                        return Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "CLUSTER NODES lists no node to track",
                        )));
                    }
                    let at = |host: &str, port: u16| {
                        let mut info = seed.clone();
                        set_host_port(&mut info, host, port);
                        info
                    };
                    let servers = nodes
                        .iter()
                        .map(|n| {
                            let mut server = self.server_at(&at(&n.host, n.port))?;
                            server.alternate = n.hostname.as_deref().map(|h| at(h, n.port));
                            Ok(server)
                        })
                        .collect::<redis::RedisResult<Vec<_>>>()?;
                    return Ok((servers, Some(map)));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
        }))
    }

    /// A standalone endpoint for the server `info` names (one node of this endpoint's
    /// cluster), with this endpoint's credentials, TLS and deadlines.
    fn server_at(&self, info: &redis::ConnectionInfo) -> redis::RedisResult<Redis> {
        let settings = RedisConfig {
            mode: RedisMode::Standalone,
            ..self.settings.clone()
        };
        Ok(Redis {
            client: client_for(info.clone(), self.ca.as_deref())?,
            cluster: None,
            seeds: vec![info.clone()],
            alternate: None,
            settings,
            ca: self.ca.clone(),
        })
    }

    /// In cluster mode, the same cluster with reads sent to replicas (`READONLY`; a slot
    /// without a reachable replica is read from its primary): what `REDIS_READ_URL` means for
    /// core-api in a cluster. A standalone endpoint is returned as it is: there the read URL
    /// is the replica's own.
    pub fn reading_replicas(self) -> redis::RedisResult<Redis> {
        if self.cluster.is_none() {
            return Ok(self);
        }
        let cluster = cluster_builder(&self.seeds, &self.settings, self.ca.as_deref())
            .read_routing_strategy(redis::cluster_read_routing::RandomReplicaStrategy)
            .build()?;
        Ok(Redis {
            cluster: Some(cluster),
            ..self
        })
    }

    /// True for a `rediss://` endpoint.
    pub fn is_tls(&self) -> bool {
        matches!(
            self.client.get_connection_info().addr(),
            redis::ConnectionAddr::TcpTls { .. }
        )
    }

    /// Connects once and says why it cannot when the reason is the configuration, which no
    /// retry will fix: the server's TLS certificate not trusted, a plain server behind a
    /// `rediss://` URL, or refused credentials. An unreachable server is not an error here:
    /// components start before their Redis and wait for it.
    /// `url_var` names where the URL came from, for the message.
    pub async fn check(&self, url_var: &str) -> Result<(), String> {
        match self.connection().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let text = e.to_string();
                let lower = text.to_ascii_lowercase();
                // Not "peer": "connection reset by peer" is a Redis restarting, not a config.
                let tls = ["certificate", "tls", "handshake"]
                    .iter()
                    .any(|w| lower.contains(w));
                if tls && self.is_tls() {
                    let trust = if self.ca.is_some() {
                        "the CA bundle in REDIS_CA_FILE (or REDIS_CA_PEM)"
                    } else {
                        "the system trust store (set REDIS_CA_FILE to a CA bundle to use instead)"
                    };
                    Err(format!(
                        "Redis TLS handshake failed: the server's certificate is not trusted by {trust}, \
                         or the server does not speak TLS: {text}"
                    ))
                } else if e.kind() == redis::ErrorKind::AuthenticationFailed
                    || lower.contains("wrongpass")
                    || lower.contains("noauth")
                {
                    Err(format!(
                        "Redis refused the credentials in {url_var}: {text}"
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// A reconnecting multiplexed connection for ordinary commands. Each command that meets a
    /// dead connection fails (it is not retried); the next one reconnects.
    pub async fn manager(&self) -> redis::RedisResult<Conn> {
        if let Some(cluster) = &self.cluster {
            // The cluster connection reconnects to each node by itself, and follows MOVED and
            // ASK and a failover by reading the slot map again.
            return self
                .cluster_conn(cluster, self.settings.response_timeout)
                .await;
        }
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(Some(self.settings.response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        ConnectionManager::new_with_config(self.client.clone(), cfg)
            .await
            .map(Conn::Managed)
    }

    /// A connection of its own for blocking reads (`XREADGROUP ... BLOCK`): its response
    /// timeout is the block time plus the ordinary response timeout, or every idle read would
    /// fail as a timeout.
    pub async fn blocking(&self, block: Duration) -> redis::RedisResult<Conn> {
        let response = block + self.settings.response_timeout;
        if self.cluster.is_some() {
            // The cluster client's overall deadline (retries included) is the client's own,
            // not the connection's: a client of its own for blocking reads, or every idle read
            // longer than it would fail.
            let settings = RedisConfig {
                response_timeout: response,
                ..self.settings.clone()
            };
            let cluster = cluster_builder(&self.seeds, &settings, self.ca.as_deref()).build()?;
            return self.cluster_conn(&cluster, response).await;
        }
        self.multiplexed(response).await
    }

    /// A plain multiplexed connection with the configured deadlines (tools, one-off checks).
    pub async fn connection(&self) -> redis::RedisResult<Conn> {
        self.multiplexed(self.settings.response_timeout).await
    }

    /// A RESP3 connection whose push messages (client-side caching invalidations) go to
    /// `pushes`; the library also sends a `Disconnection` push when it is lost. Standalone
    /// only: a cluster sends each node's invalidations on a connection to that node (one
    /// per [`Redis::servers`]).
    pub async fn tracking(
        &self,
        pushes: impl redis::aio::AsyncPushSender,
    ) -> redis::RedisResult<MultiplexedConnection> {
        if self.is_cluster() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "client tracking needs one connection per cluster node",
            )));
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(Some(self.settings.response_timeout))
            .set_push_sender(pushes);
        let resp3 = |info: &redis::ConnectionInfo| {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            client_for(
                info.clone().set_redis_settings(settings),
                self.ca.as_deref(),
            )
        };
        let made = resp3(self.client.get_connection_info())?
            .get_multiplexed_async_connection_with_config(&cfg)
            .await;
        match (made, &self.alternate) {
            (Err(_), Some(alternate)) => {
                resp3(alternate)?
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
            }
            (made, _) => made,
        }
    }

    async fn multiplexed(&self, response: Duration) -> redis::RedisResult<Conn> {
        if let Some(cluster) = &self.cluster {
            return self.cluster_conn(cluster, response).await;
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(Some(response));
        self.client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map(Conn::Plain)
    }

    async fn cluster_conn(
        &self,
        cluster: &ClusterClient,
        response: Duration,
    ) -> redis::RedisResult<Conn> {
        let cfg = ClusterConfig::new()
            .set_connection_timeout(self.settings.connect_timeout)
            .set_response_timeout(response);
        cluster
            .get_async_connection_with_config(cfg)
            .await
            .map(Conn::Cluster)
    }
}

/// The nodes of a cluster as one node sees them ([`Redis::servers`]), to tell when they change:
/// a node added or failed, a failover, a slot moved.
pub struct NodeMap {
    /// The node the map was read from, asked again by [`NodeMap::unchanged`] on `conn`.
    source: Redis,
    conn: Conn,
    /// Each node's address, role and slots, sorted: what a change of the cluster changes, and
    /// not what moves by itself (ping times, link state, a suspected failure).
    fingerprint: String,
}

impl std::fmt::Debug for NodeMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.fingerprint)
    }
}

impl NodeMap {
    /// The nodes' addresses, and the map to compare later views with.
    async fn read(source: Redis) -> redis::RedisResult<(Vec<NodeAddr>, NodeMap)> {
        let mut conn = source.connection().await?;
        let (nodes, fingerprint) = Self::read_on(&source, &mut conn).await?;
        let map = NodeMap {
            source,
            conn,
            fingerprint,
        };
        Ok((nodes, map))
    }

    async fn read_on(
        source: &Redis,
        conn: &mut Conn,
    ) -> redis::RedisResult<(Vec<NodeAddr>, String)> {
        let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
        let own_host = match source.client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => {
                host.clone()
            }
            _ => String::new(),
        };
        Ok(parse_cluster_nodes(&text, &own_host))
    }

    /// Whether the cluster still looks as it did when the map was read (an error: the node
    /// could not be asked).
    pub async fn unchanged(&mut self) -> redis::RedisResult<bool> {
        let (_, now) = Self::read_on(&self.source, &mut self.conn).await?;
        Ok(now == self.fingerprint)
    }
}

/// Where one node of a cluster is: the IP (what the cluster client connects to by default)
/// and the hostname it announces, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeAddr {
    host: String,
    hostname: Option<String>,
    port: u16,
}

/// The nodes of `CLUSTER NODES` output that can hold keys a client reads, and the fingerprint
/// of the map. A failed node is left out unless it still owns slots: clients keep routing its
/// slots to it by their slot map until a failover moves them (a primary without a replica
/// that comes back serves them again), so it must be tracked like any other; while it cannot
/// be reached, tracking is not on and nothing is served from the in-process cache. The node
/// answering may list itself without a host: `own_host` then. A line: `<id>
/// <ip:port@cport[,hostname[,aux=value]...]> <flags> <primary> <ping> <pong> <epoch> <link>
/// <slot>...`.
fn parse_cluster_nodes(text: &str, own_host: &str) -> (Vec<NodeAddr>, String) {
    let mut nodes: Vec<NodeAddr> = Vec::new();
    let mut lines = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(flags)) = (f.get(1), f.get(2)) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        // Slots being migrated (`[slot->-id]`, `[slot-<-id]`) are listed by the two nodes
        // concerned only: left out.
        let slots: Vec<&str> = f
            .iter()
            .skip(8)
            .filter(|s| !s.starts_with('['))
            .copied()
            .collect();
        if flags.iter().any(|x| matches!(*x, "noaddr" | "handshake"))
            || (flags.contains(&"fail") && slots.is_empty())
        {
            continue;
        }
        let mut parts = addr.split(',');
        let Some(hostport) = parts.next().and_then(|a| a.split('@').next()) else {
            continue;
        };
        let hostname = parts
            .next()
            .filter(|h| !h.is_empty() && !h.contains('='))
            .map(str::to_string);
        let Some((ip, port)) = hostport.rsplit_once(':') else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        if port == 0 {
            continue;
        }
        let host = match ip.trim_start_matches('[').trim_end_matches(']') {
            "" => own_host,
            ip => ip,
        };
        let role = if flags.contains(&"master") {
            "primary"
        } else {
            "replica"
        };
        lines.push(format!("{host}:{port} {role} {}", slots.join(" ")));
        if !nodes.iter().any(|n| n.host == host && n.port == port) {
            nodes.push(NodeAddr {
                host: host.to_string(),
                hostname,
                port,
            });
        }
    }
    lines.sort();
    (nodes, lines.join("\n"))
}

fn set_host_port(info: &mut redis::ConnectionInfo, host: &str, port: u16) {
    let mut addr = info.addr().clone();
    if let redis::ConnectionAddr::Tcp(h, p)
    | redis::ConnectionAddr::TcpTls {
        host: h, port: p, ..
    } = &mut addr
    {
        *h = host.to_string();
        *p = port;
    }
    *info = info.clone().set_addr(addr);
}

/// A connection to Redis in either mode; every component talks through it, so no module
/// needs to know which mode it runs in. Commands go to the node owning their keys' slot in a
/// cluster; a multi-key command (MGET) is split by slot and merged by the client.
#[derive(Clone)]
pub enum Conn {
    /// Reconnects by itself (the components' long-lived connection).
    Managed(ConnectionManager),
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Managed(_) => "Conn::Managed",
            Conn::Plain(_) => "Conn::Plain",
            Conn::Cluster(_) => "Conn::Cluster",
        })
    }
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Runs a command that names no key (CONFIG GET, INFO) on the primary that holds `key`:
    /// in a cluster such a command would go to a random node, whose answer may not hold for
    /// the node that matters.
    pub async fn query_at<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
        key: &str,
    ) -> redis::RedisResult<T> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        match self {
            Conn::Cluster(c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let value = c
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                redis::from_redis_value(value).map_err(Into::into)
            }
            other => cmd.query_async(other).await,
        }
    }
}

/// Whether a connection's commands may span slots: a script or transaction over keys of
/// several slots fails with CROSSSLOT in a cluster, so callers split it by slot there.
pub trait Topology: ConnectionLike + Clone + Send + Sync {
    fn is_cluster(&self) -> bool {
        false
    }
}

impl Topology for Conn {
    fn is_cluster(&self) -> bool {
        Conn::is_cluster(self)
    }
}
impl Topology for MultiplexedConnection {}
impl Topology for ConnectionManager {}

impl From<MultiplexedConnection> for Conn {
    fn from(c: MultiplexedConnection) -> Conn {
        Conn::Plain(c)
    }
}

impl From<ConnectionManager> for Conn {
    fn from(c: ConnectionManager) -> Conn {
        Conn::Managed(c)
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => Box::pin(async move {
                match c.req_packed_commands(pipeline, offset, count).await {
                    // A transaction that met MOVED or ASK (a failover, a resharding) is aborted
                    // whole, and the client follows redirects of single commands only: one
                    // single command to the same slot makes it read the slot map again, then
                    // the transaction (which did nothing) runs once more.
                    Err(e) if redirected(&e) => {
                        if let Some(key) = first_key(pipeline) {
                            let _ = c.req_packed_command(redis::cmd("EXISTS").arg(key)).await;
                        }
                        c.req_packed_commands(pipeline, offset, count).await
                    }
                    other => other,
                }
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Managed(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

fn redirected(e: &redis::RedisError) -> bool {
    use redis::ServerErrorKind::{Ask, Moved};
    e.clone().into_server_errors().is_some_and(|errors| {
        errors
            .iter()
            .any(|(_, err)| matches!(err.kind(), Some(Moved | Ask)))
    })
}

/// The key of the pipeline's first command that has one (every command of a pipeline sent to
/// a cluster is in one slot).
fn first_key(pipeline: &redis::Pipeline) -> Option<Vec<u8>> {
    pipeline.cmd_iter().find_map(|cmd| {
        let mut args = cmd.args_iter().filter_map(|a| match a {
            redis::Arg::Simple(a) => Some(a),
            _ => None,
        });
        let name = args.next()?;
        // The commands this system pipelines all take their key first (XADD, XACK, SADD,
        // HINCRBY, HSET); MULTI and EXEC take none.
        (!name.eq_ignore_ascii_case(b"MULTI") && !name.eq_ignore_ascii_case(b"EXEC"))
            .then(|| args.next().map(<[u8]>::to_vec))
            .flatten()
    })
}

/// The URLs of a cluster's seed nodes: `REDIS_URL` may list several, separated by commas
/// (`redis://a:6379,redis://b:6379`). Only a comma followed by a scheme separates, so a
/// password holding a comma stays whole.
fn seed_urls(url: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut from = 0;
    for (at, _) in url.match_indices(',') {
        let next = url[at + 1..].trim_start();
        if next.starts_with("redis://") || next.starts_with("rediss://") {
            out.push(url[from..at].trim());
            from = at + 1;
        }
    }
    out.push(url[from..].trim());
    out
}

/// The cluster client of the seed nodes: the other nodes come from the slot map; the
/// credentials, TLS and TCP settings of the URLs apply to every node.
fn cluster_builder(
    seeds: &[redis::ConnectionInfo],
    settings: &RedisConfig,
    ca: Option<&Vec<u8>>,
) -> ClusterClientBuilder {
    let tcp = tcp_settings(settings);
    let tls = seeds
        .iter()
        .any(|i| matches!(i.addr(), redis::ConnectionAddr::TcpTls { .. }));
    let mut builder = ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(settings.connect_timeout)
        .response_timeout(settings.response_timeout)
        // A redirect after a resharding or a failover is retried within the overall deadline
        // of twice the response timeout, not cut off by the first attempt's.
        .overall_response_timeout(Some(settings.response_timeout * 2))
        .retries(3)
        .tcp_settings(tcp);
    if let (Some(pem), true) = (ca, tls) {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone()),
        });
    }
    builder
}

/// The file whose CA bundle (PEM) `rediss://` servers are verified against, instead of the
/// system trust store (a managed Redis with a private CA).
pub const REDIS_CA_FILE_ENV: &str = "REDIS_CA_FILE";
/// The same CA bundle as text, as the operator passes it from a Secret key.
pub const REDIS_CA_PEM_ENV: &str = "REDIS_CA_PEM";

/// The Redis endpoint of a component: `url` (from the variable `url_var`, `REDIS_URL` or
/// `REDIS_READ_URL`), the CA bundle of `REDIS_CA_PEM` or of the file `REDIS_CA_FILE` names, if
/// set, checked once ([`Redis::check`]) so a configuration that can never connect fails
/// start-up with a clear message instead of retrying for ever.
pub async fn redis_from_env(
    url_var: &str,
    url: &str,
    settings: &RedisConfig,
) -> anyhow::Result<Redis> {
    use anyhow::Context;
    let pem = std::env::var(REDIS_CA_PEM_ENV)
        .ok()
        .filter(|p| !p.is_empty());
    let ca = match (pem, std::env::var_os(REDIS_CA_FILE_ENV)) {
        (Some(pem), _) => Some(pem.into_bytes()),
        (None, Some(path)) if !path.is_empty() => {
            Some(std::fs::read(&path).with_context(|| {
                format!(
                    "cannot read REDIS_CA_FILE {}",
                    std::path::Path::new(&path).display()
                )
            })?)
        }
        _ => None,
    };
    let redis = Redis::open_tls(url, settings, ca).with_context(|| format!("invalid {url_var}"))?;
    redis.check(url_var).await.map_err(anyhow::Error::msg)?;
    Ok(redis)
}

/// A client opened elsewhere (tests, benchmarks) gets the default deadlines.
impl From<Client> for Redis {
    fn from(client: Client) -> Redis {
        let settings = RedisConfig::default();
        let info = client
            .get_connection_info()
            .clone()
            .set_tcp_settings(tcp_settings(&settings));
        Redis {
            client: Client::open(info.clone()).unwrap_or(client),
            cluster: None,
            seeds: vec![info],
            alternate: None,
            settings,
            ca: None,
        }
    }
}

fn client_for(info: redis::ConnectionInfo, ca: Option<&Vec<u8>>) -> redis::RedisResult<Client> {
    match ca {
        Some(pem) if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) => {
            Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )
        }
        _ => Client::open(info),
    }
}

/// Nagle's algorithm only delays the small pipelined commands of a multiplexed connection.
/// Keepalive probes an idle connection; the user timeout also ends one a partition left with
/// unacknowledged data, which keepalive alone cannot.
fn tcp_settings(settings: &RedisConfig) -> TcpSettings {
    let idle = settings.keepalive;
    // The kernel takes whole seconds and refuses an interval of 0 (EINVAL, and then no
    // connection at all): at least one second between probes.
    let keepalive = TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / 3).max(Duration::from_secs(1)))
        .with_retries(3);
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(idle * 2)
}

/// When a database deadline last expired (ms since [`process_start`]; 0: never).
static LAST_OVERRUN_MS: AtomicU64 = AtomicU64::new(0);
/// For this long after a deadline expired, connections coming back to a pool must prove they
/// still answer, quickly.
const SUSPECT_WINDOW: Duration = Duration::from_secs(60);

fn process_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn since_start_ms() -> u64 {
    u64::try_from(process_start().elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn overran_recently() -> bool {
    match LAST_OVERRUN_MS.load(Ordering::Relaxed) {
        0 => false,
        at => since_start_ms().saturating_sub(at) < SUSPECT_WINDOW.as_millis() as u64,
    }
}

/// Runs one database call with a client-side deadline. The server's `statement_timeout` only
/// helps while the server answers; a server that stopped answering (SIGSTOPped, partitioned)
/// leaves a call waiting for ever without this.
///
/// A call cut off here leaves its connection mid-protocol. sqlx then checks it with a ping
/// when it goes back to the pool, without a deadline of its own, so on a dead link that check
/// would hold the pool slot for ever; the pool's release hook (see [`pg_pool`]) bounds it for
/// a minute after any overrun. A connection whose link dies right after a call that succeeded
/// is not covered: sqlx's ping then holds its slot until the kernel gives up on the unacked
/// data (`tcp_retries2`, about 15 minutes), one slot, while the rest of the pool works.
pub async fn within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => {
            LAST_OVERRUN_MS.store(since_start_ms(), Ordering::Relaxed);
            Err(timed_out(limit))
        }
    }
}

/// `call.deadline(limit)`: [`within`] as a method, so a statement reads top to bottom.
pub trait Deadline<T>: Future<Output = Result<T, sqlx::Error>> + Sized {
    fn deadline(self, limit: Duration) -> impl Future<Output = Result<T, sqlx::Error>> {
        within(limit, self)
    }
}

impl<T, F: Future<Output = Result<T, sqlx::Error>>> Deadline<T> for F {}

/// The error of a database call cut off by its deadline.
pub fn timed_out(limit: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the database did not answer within {}",
            crate::config::human_duration::format(limit)
        ),
    ))
}

/// A pool that connects lazily, so a component starts (and reports not-ready) while its
/// database is down, and recovers by itself when it returns.
///
/// Each session is opened with the server-side deadlines of `timeouts` (statement timeout,
/// idle-in-transaction timeout, TCP keepalive), so a session stuck on the server's side is
/// ended by the server too.
///
/// JIT is off for these sessions: every query here is a short keyed or batched statement, and
/// a cost estimate that crosses `jit_above_cost` on a table without statistics yet (a freshly
/// filled outbox) made a 500-row claim take 100-150 ms of compilation (measured in the relay
/// benchmark).
pub fn pg_pool(
    url: &str,
    max_connections: u32,
    timeouts: &DatabaseConfig,
) -> Result<PgPool, sqlx::Error> {
    let ms = |d: Duration| d.as_millis().to_string();
    let secs = |d: Duration| d.as_secs().max(1).to_string();
    let options = PgConnectOptions::from_str(url)?.options([
        ("jit", "off".to_string()),
        ("statement_timeout", ms(timeouts.statement_timeout)),
        (
            "idle_in_transaction_session_timeout",
            ms(timeouts.idle_in_transaction_timeout),
        ),
        ("tcp_keepalives_idle", secs(timeouts.keepalive)),
        ("tcp_keepalives_interval", secs(timeouts.keepalive / 3)),
        ("tcp_keepalives_count", "3".to_string()),
    ]);
    // A quarter of the connect timeout, so a slot is free again well before a caller waiting
    // for one gives up (the acquire timeout is the connect timeout).
    let check = timeouts.connect_timeout / 4;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeouts.connect_timeout)
        .idle_timeout(Some(timeouts.idle_timeout))
        .after_release(move |conn, _| {
            Box::pin(async move {
                if !overran_recently() {
                    return Ok(true);
                }
                // A deadline expired lately: this connection may be one that was cut off on a
                // dead link. Close it unless it answers at once.
                use sqlx::Connection;
                match tokio::time::timeout(check, conn.ping()).await {
                    Ok(Ok(())) => Ok(true),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(timed_out(check)),
                }
            })
        })
        .connect_lazy_with(options))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_url_may_list_several_seed_nodes() {
        assert_eq!(seed_urls("redis://a:1"), ["redis://a:1"]);
        assert_eq!(
            seed_urls("redis://a:1, rediss://u:p@b:2/,redis://c:3"),
            ["redis://a:1", "rediss://u:p@b:2/", "redis://c:3"]
        );
        // A comma inside the password is not a separator.
        assert_eq!(
            seed_urls("redis://u:p,w@a:1,redis://b:2"),
            ["redis://u:p,w@a:1", "redis://b:2"]
        );
    }

    #[test]
    fn the_node_map_lists_live_nodes_and_changes_only_with_the_cluster() {
        let a = "\
07c3 127.0.0.1:30001@40001 master - 0 0 1 connected 0-5460 [77->-e7d1]
67ed 127.0.0.1:30002@40002 master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003,node-3 master,fail? - 1426238317239 1426238316232 3 connected 10923-16383
6ec2 127.0.0.1:30004@40004 slave 07c3 0 1426238318243 1 connected
824f 127.0.0.1:30005@40005 slave,fail 67ed 1426238317741 1426238316232 2 disconnected
e7d1 :30006@40006 myself,master - 0 0 0 connected
dead :0@0 noaddr - 0 0 0 disconnected
";
        let (nodes, print) = parse_cluster_nodes(a, "10.0.0.9");
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        assert_eq!(
            ports,
            [30001, 30002, 30003, 30004, 30006],
            "failed without slots and unknown left out"
        );
        assert_eq!(
            nodes[4].host, "10.0.0.9",
            "a node without a host is the one answering"
        );
        assert_eq!(
            (nodes[2].host.as_str(), nodes[2].hostname.as_deref()),
            ("127.0.0.1", Some("node-3")),
            "the IP first, the announced hostname to fall back on"
        );
        let aux = "a1 10.1.1.1:7000@17000,,shard-id=ab master - 0 0 1 connected 0-16383\n";
        let (aux, _) = parse_cluster_nodes(aux, "x");
        assert_eq!(
            (
                aux[0].host.as_str(),
                aux[0].hostname.as_deref(),
                aux[0].port
            ),
            ("10.1.1.1", None, 7000)
        );
        // A failed primary that still owns slots is still routed to: tracked.
        let failed = "f1 10.1.1.2:7000@17000 master,fail - 0 0 1 disconnected 0-100\n";
        assert_eq!(parse_cluster_nodes(failed, "x").0.len(), 1);
        assert!(
            print.contains("127.0.0.1:30001 primary 0-5460\n"),
            "{print}"
        );
        // Ping times, link state and a suspected failure are not a change; a failover is.
        let same = a
            .replace("1426238318243", "1526238318243")
            .replace("master,fail?", "master");
        assert_eq!(parse_cluster_nodes(&same, "10.0.0.9").1, print);
        let failover = a
            .replace(
                "master - 0 0 1 connected 0-5460",
                "slave 6ec2 0 0 1 connected",
            )
            .replace(
                "slave 07c3 0 1426238318243 1 connected",
                "master - 0 0 4 connected 0-5460",
            );
        assert_ne!(parse_cluster_nodes(&failover, "10.0.0.9").1, print);
    }

    #[test]
    fn every_seed_must_be_a_valid_url() {
        let settings = RedisConfig {
            mode: RedisMode::Cluster,
            ..Default::default()
        };
        assert!(Redis::open("redis://127.0.0.1:1,redis://127.0.0.1:2", &settings).is_ok());
        assert!(Redis::open("redis://127.0.0.1:1,redis://:bad:port", &settings).is_err());
    }
}
