//! Core API throughput and latency next to same-run baselines.
//!
//! `cargo bench -p widget-runtime --bench api [-- SECONDS CONNECTIONS]` (defaults: 5 s, 32)
//!
//! Starts private Postgres and Redis servers (testkit) and screens of 5, 20 and 100 widgets of
//! about 1 KB each, then drives each target with `wrk` (`apt-get install -y wrk`) at a fixed
//! number of connections and prints one table per screen size. Without `wrk` (or with
//! `API_BENCH_GENERATOR=inproc`) a small in-process HTTP/1.1 keep-alive generator (same
//! connections and duration) is used and the table says so. Rows, per screen size:
//! - core-api with its in-process cache, every widget in it (no Redis call per request; the
//!   screen as assembled before is reused while none of its widgets changes);
//! - the same while one widget of the screen is rewritten in Redis for every 100 requests of
//!   the row above (each write invalidates it; the next request reads it from Redis);
//! - core-api without the in-process cache (`localCache.enabled: false`), every widget in
//!   Redis (one MGET, bytes spliced into the body);
//! - baseline: a static axum handler returning the same body bytes (HTTP stack alone);
//! - baseline: `redis-benchmark` doing the same MGET (Redis alone, no HTTP);
//! - diagnostic: the static handler behind core-api's own HTTP server (limits and deadlines),
//!   and the same MGET through redis-rs as core-api sends it (no HTTP): where the gap to the
//!   baselines goes;
//! - (20 only) core-api, every widget a cache miss: the same 20 widgets as a personalised screen
//!   (`deals.w-N:{user}`), each request for a random one of 2000 users, on a second API whose
//!   `fallbackTtl` is 1 ms, so a back-fill is gone long before the same user comes round again.
//!   Each request does the MGET (all nil), one Postgres query for the 20 keys and the back-fill
//!   script. The caption reports the miss ratio and Postgres queries per request measured from
//!   that API's own metrics, so the row says what it really measured.
//!
//! Everything shares this machine's cores with the load generator, so compare rows of one run.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde_json::json;
use testkit::{PgServer, RedisCluster, RedisServer};
use tokio_util::sync::CancellationToken;
use widget_runtime::admin::Readiness;
use widget_runtime::api;
use widget_runtime::cache::{Cache, CacheWrite};
use widget_runtime::config::{Config, RedisConfig, RedisMode};
use widget_runtime::store::{self, Change};
use widget_runtime::{Op, connect};

/// Widgets of the all-miss screen.
const WIDGETS: usize = 20;
const SIZES: [usize; 3] = [5, 20, 100];
/// Users of the personalised (all-miss) screen: enough that two requests rarely share keys.
const USERS: usize = 2000;

struct Row {
    name: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn config(prefix: &str, fallback_ttl: &str, widgets: usize, local: bool) -> Config {
    let keys: Vec<String> = (0..widgets).map(|i| format!("\"deals.w-{i}\"")).collect();
    let personal: Vec<String> = (0..WIDGETS)
        .map(|i| format!("\"deals.w-{i}:{{user}}\""))
        .collect();
    Config::from_yaml_str(&format!(
        "pipeline: bench\ncache: {{keyPrefix: \"{prefix}\", fallbackTtl: {fallback_ttl}}}\n\
         sources: [{{name: deals}}]\nscreens: [{{name: home, widgets: [{}]}}, {{name: me, widgets: [{}]}}]\n\
         identity: {{mode: query}}\nlocalCache: {{enabled: {local}}}\n",
        keys.join(", "),
        personal.join(", ")
    ))
    .expect("bench config")
}

/// Where a request goes: one fixed path, or `?user=` a random one of [`USERS`] per request.
#[derive(Clone)]
enum Target {
    Fixed(String),
    RandomUser(String),
}

impl Target {
    fn url(&self) -> &str {
        match self {
            Target::Fixed(u) | Target::RandomUser(u) => u,
        }
    }
}

fn content(i: usize) -> String {
    // About 1 KB of JSON per widget.
    let items: Vec<_> = (0..6)
        .map(|n| json!({"id": i * 10 + n, "title": format!("Deal {n} of widget {i}"), "subtitle": "Limited offer, while stocks last", "price": "19.99", "badge": "-40%", "image": format!("https://cdn.example.com/img/{i}/{n}.webp")}))
        .collect();
    json!({"title": format!("Widget {i}"), "items": items}).to_string()
}

/// Parses a duration as wrk prints it (`812.00us`, `1.23ms`, `1.01s`) into milliseconds.
fn wrk_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

fn wrk(name: &str, target: &Target, secs: u64, conns: usize) -> Row {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t2",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
    ]);
    // Kept alive until wrk has run.
    let script = match target {
        Target::Fixed(_) => None,
        Target::RandomUser(url) => {
            let path = &url[url.find("://").map_or(0, |i| i + 3)..];
            let path = &path[path.find('/').unwrap_or(path.len())..];
            let file = tempfile::NamedTempFile::new().expect("wrk script");
            std::fs::write(
                file.path(),
                format!(
                    "math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16))\n\
                     request = function()\n  \
                     return wrk.format(nil, \"{path}?user=u\" .. math.random(0, {}))\n\
                     end\n",
                    USERS - 1
                ),
            )
            .expect("wrk script");
            cmd.arg("-s").arg(file.path());
            Some(file)
        }
    };
    let out = cmd
        .arg(target.url())
        .output()
        .unwrap_or_else(|e| panic!("cannot run wrk ({e}); install it: apt-get install -y wrk"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Non-2xx"),
        "{name}: errors during the run:\n{text}"
    );
    let find = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix).map(str::trim).map(str::to_owned))
    };
    let rps = find("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name}: no Requests/sec in wrk output:\n{text}"));
    let p = |q: &str| {
        find(q)
            .and_then(|v| wrk_ms(&v))
            .unwrap_or_else(|| panic!("{name}: no {q} latency in wrk output:\n{text}"))
    };
    drop(script);
    Row {
        name: name.into(),
        rps,
        p50_ms: p("50%"),
        p99_ms: p("99%"),
    }
}

/// Which load generator drives the HTTP rows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Generator {
    Wrk,
    InProcess,
}

impl Generator {
    fn pick() -> Self {
        let forced = std::env::var("API_BENCH_GENERATOR").unwrap_or_default();
        if forced == "inproc" {
            return Generator::InProcess;
        }
        let has_wrk = Command::new("wrk")
            .arg("--version")
            .output()
            .map(|o| !o.stdout.is_empty() || !o.stderr.is_empty())
            .unwrap_or(false);
        if has_wrk {
            Generator::Wrk
        } else {
            eprintln!(
                "wrk not found (apt-get install -y wrk): using the in-process HTTP/1.1 generator"
            );
            Generator::InProcess
        }
    }

    fn label(self) -> &'static str {
        match self {
            Generator::Wrk => "wrk -t2",
            Generator::InProcess => "in-process keep-alive HTTP/1.1 generator, 1 thread",
        }
    }

    fn run(self, name: &str, target: &Target, secs: u64, conns: usize) -> Row {
        match self {
            Generator::Wrk => wrk(name, target, secs, conns),
            Generator::InProcess => in_process(name, target, secs, conns),
        }
    }
}

/// `conns` keep-alive connections, each sending GET after GET for `secs` seconds, on a runtime
/// of its own (one thread, like one wrk thread per core would be on this 2-core budget).
fn in_process(name: &str, target: &Target, secs: u64, conns: usize) -> Row {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let random_user = matches!(target, Target::RandomUser(_));
    let rest = target.url().strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, path) = (
        host.to_owned(),
        if path.is_empty() { "/" } else { path }.to_owned(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("generator runtime");
    let (hist, total, elapsed) = rt.block_on(async move {
        let (path, host) = (Arc::new(path), Arc::new(host));
        let start = std::time::Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for conn in 0..conns {
            let (host, path) = (host.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                // A cheap per-connection generator (xorshift) is enough to spread the users.
                let mut seed = 0x9E37_79B9_7F4A_7C15u64
                    ^ (conn as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                let mut next_user = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % USERS as u64
                };
                let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                let mut s = tokio::net::TcpStream::connect(host.as_str())
                    .await
                    .expect("connect");
                s.set_nodelay(true).ok();
                let mut buf = Vec::with_capacity(64 * 1024);
                let mut chunk = vec![0u8; 64 * 1024];
                let mut n = 0u64;
                while std::time::Instant::now() < deadline {
                    let request = if random_user {
                        format!(
                            "GET {path}?user=u{} HTTP/1.1\r\nHost: {host}\r\n\r\n",
                            next_user()
                        )
                    } else {
                        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
                    };
                    let t = std::time::Instant::now();
                    s.write_all(request.as_bytes()).await.expect("write");
                    buf.clear();
                    // Headers, then exactly content-length bytes of body.
                    let (head_end, body_len) = loop {
                        let r = s.read(&mut chunk).await.expect("read");
                        assert!(r > 0, "server closed the connection");
                        buf.extend_from_slice(&chunk[..r]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                            assert!(head.starts_with("http/1.1 2"), "non-2xx: {head}");
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .expect("content-length");
                            break (i + 4, len);
                        }
                    };
                    while buf.len() < head_end + body_len {
                        let r = s.read(&mut chunk).await.expect("read");
                        assert!(r > 0, "server closed the connection");
                        buf.extend_from_slice(&chunk[..r]);
                    }
                    hist.record(t.elapsed().as_micros() as u64).ok();
                    n += 1;
                }
                (hist, n)
            }));
        }
        let mut all = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
        let mut total = 0;
        for t in tasks {
            let (h, n) = t.await.expect("generator task");
            all.add(h).expect("merge");
            total += n;
        }
        (all, total, start.elapsed())
    });
    Row {
        name: name.into(),
        rps: total as f64 / elapsed.as_secs_f64(),
        p50_ms: hist.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
    }
}

/// The API's counters that tell what the miss row really measured.
#[derive(Default, Clone, Copy)]
struct MissStats {
    hits: f64,
    misses: f64,
    fallback_reads: f64,
    requests: f64,
}

fn miss_stats(metrics: &str) -> MissStats {
    let sum = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    MissStats {
        hits: sum("widget_api_cache_hits_total"),
        misses: sum("widget_api_cache_misses_total"),
        fallback_reads: sum("widget_api_fallback_reads_total"),
        requests: sum("widget_api_request_duration_seconds_count"),
    }
}

fn redis_benchmark(port: u16, keys: &[String], requests: u64, conns: usize) -> Row {
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-c",
            &conns.to_string(),
            "-n",
            &requests.to_string(),
            "--csv",
        ])
        .arg("MGET")
        .args(keys);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-benchmark ({e})"));
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = text
        .lines()
        .find(|l| l.starts_with("\"MGET"))
        .unwrap_or_else(|| panic!("no MGET line in redis-benchmark output:\n{text}"));
    let cols: Vec<f64> = line
        .split("\",\"")
        .skip(1)
        .filter_map(|c| c.trim_matches('"').parse().ok())
        .collect();
    assert!(cols.len() >= 6, "odd redis-benchmark line: {line}");
    Row {
        name: format!("baseline: redis-benchmark MGET of the {} keys", keys.len()),
        rps: cols[0],
        p50_ms: cols[3],
        p99_ms: cols[5],
    }
}

/// The same MGET from this process through redis-rs, as core-api sends it (multiplexed
/// connections, one per core up to 4, taken in turn; `conns` tasks each waiting for its reply
/// before the next), with no HTTP: what the client library costs beside `redis-benchmark`.
async fn redis_rs_mget(
    url: &str,
    mode: RedisMode,
    keys: &[String],
    secs: u64,
    conns: usize,
) -> Row {
    let settings = RedisConfig {
        mode,
        ..Default::default()
    };
    let client = connect::Redis::open(url, &settings).expect("redis url");
    let lanes = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4));
    let mut managers = Vec::new();
    for _ in 0..lanes {
        managers.push(client.manager().await.expect("redis"));
    }
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let (mut conn, keys) = (managers[i % lanes].clone(), keys.to_vec());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while std::time::Instant::now() < until {
                    let t = std::time::Instant::now();
                    let v: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                        .arg(&keys)
                        .query_async(&mut conn)
                        .await
                        .expect("mget");
                    assert_eq!(v.len(), keys.len());
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("mget task"));
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let on = match mode {
        RedisMode::Standalone => "",
        RedisMode::Cluster => " (cluster)",
    };
    Row {
        name: format!("diagnostic: redis-rs MGET of the {} keys{on}", keys.len()),
        rps: lat.len() as f64 / secs as f64,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    }
}

async fn start_api(
    config: &Config,
    redis_url: &str,
    db_url: &str,
    cancel: &CancellationToken,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let redis = connect::Redis::open(redis_url, &config.redis).expect("redis url");
    let pool = connect::pg_pool(db_url, 16, &Default::default()).expect("pool");
    let (config, cancel) = (config.clone(), cancel.clone());
    tokio::spawn(async move {
        api::serve(
            &config,
            redis,
            pool,
            api::Listeners {
                api: listener,
                admin: None,
            },
            Registry::default(),
            Readiness::default(),
            cancel,
        )
        .await
    });
    addr
}

async fn fetch(url: &str) -> (String, Vec<u8>) {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-D", "/dev/stderr", url])
        .output()
        .await
        .expect("curl");
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.stdout,
    )
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let secs: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let conns: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(secs, conns));
}

async fn run(secs: u64, conns: usize) {
    let (pg, redis, cluster) = tokio::join!(
        PgServer::start(),
        RedisServer::start(),
        RedisCluster::start(3, 0)
    );
    let (pg, redis, cluster) = (
        pg.expect("postgres"),
        redis.expect("redis"),
        cluster.expect("redis cluster"),
    );
    let cluster_settings = RedisConfig {
        mode: RedisMode::Cluster,
        ..Default::default()
    };
    let db_url = pg.fresh_database().await.expect("database");
    let pool = sqlx::PgPool::connect(&db_url).await.expect("connect");
    store::migrate(&store::CORE_MIGRATIONS, &pool)
        .await
        .expect("migrate");
    let generator = Generator::pick();
    let largest = SIZES.iter().copied().max().unwrap_or(WIDGETS);
    let changes: Vec<Change> = (0..largest)
        .map(|i| Change {
            widget_key: format!("deals.w-{i}"),
            widget_type: "carousel".into(),
            source: "deals".into(),
            data_version: 1,
            op: Op::Upsert,
            content: Some(content(i)),
        })
        .collect();
    store::apply_batch(&pool, &changes).await.expect("store");
    let jsons: Vec<Vec<u8>> = changes.iter().filter_map(Change::widget_json).collect();
    let avg = jsons.iter().map(Vec::len).sum::<usize>() / largest;
    let cancel = CancellationToken::new();
    println!();
    println!(
        "core-api screens of widgets of ~{avg} B, {conns} connections, {secs} s per HTTP row ({})",
        generator.label()
    );
    for n in SIZES {
        let prefix = format!("hw:bench{n}:");
        let cache = Cache::new(prefix.clone());
        let writes: Vec<CacheWrite<'_>> = changes[..n]
            .iter()
            .zip(&jsons)
            .map(|(c, j)| CacheWrite {
                widget_key: &c.widget_key,
                version: 1,
                json: Some(j),
                ttl: Duration::from_secs(3600),
            })
            .collect();
        let mut conn = redis.connection().await.expect("redis");
        let mut on_cluster = connect::Redis::open(&cluster.url(), &cluster_settings)
            .expect("cluster url")
            .connection()
            .await
            .expect("cluster");
        for part in widget_runtime::cache::write_chunks(&writes) {
            cache
                .write_many(&mut conn, &writes[part.clone()])
                .await
                .expect("cache");
            cache
                .write_many(&mut on_cluster, &writes[part])
                .await
                .expect("cluster cache");
        }
        let mut cluster_config = config(&prefix, "1h", n, false);
        cluster_config.redis.mode = RedisMode::Cluster;
        let on_cluster_api = start_api(&cluster_config, &cluster.url(), &db_url, &cancel).await;
        let cluster_url = Target::Fixed(format!("http://{on_cluster_api}/v1/screens/home"));
        let mut cluster_l1_config = config(&prefix, "1h", n, true);
        cluster_l1_config.redis.mode = RedisMode::Cluster;
        let cluster_l1_api = start_api(&cluster_l1_config, &cluster.url(), &db_url, &cancel).await;
        let cluster_l1_url = Target::Fixed(format!("http://{cluster_l1_api}/v1/screens/home"));
        let with_l1 = start_api(
            &config(&prefix, "1h", n, true),
            &redis.url(),
            &db_url,
            &cancel,
        )
        .await;
        let without = start_api(
            &config(&prefix, "1h", n, false),
            &redis.url(),
            &db_url,
            &cancel,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (headers, body) = fetch(&format!("http://{without}/v1/screens/home")).await;
        assert!(
            headers
                .to_ascii_lowercase()
                .contains("x-widget-source: cache"),
            "the hit path serves from the cache: {headers}"
        );
        let static_addr = serve_static(body.clone(), false, &cancel).await;
        let hardened_addr = serve_static(body.clone(), true, &cancel).await;
        let keys: Vec<String> = changes[..n]
            .iter()
            .map(|c| cache.key(&c.widget_key))
            .collect();
        let l1_url = Target::Fixed(format!("http://{with_l1}/v1/screens/home"));
        let plain_url = Target::Fixed(format!("http://{without}/v1/screens/home"));
        let static_url = Target::Fixed(format!("http://{static_addr}/v1/screens/home"));
        let hardened_url = Target::Fixed(format!("http://{hardened_addr}/v1/screens/home"));
        let mget_keys = keys.clone();
        let port = redis.port();
        let (secs_c, conns_c) = (secs, conns);
        // Screens the in-process cache served whole, and widgets it served one by one.
        let l1_hits = |addr: String| async move {
            let m = String::from_utf8_lossy(&fetch(&format!("http://{addr}/metrics")).await.1)
                .into_owned();
            let get = |name: &str| {
                m.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            (
                get("widget_api_local_screens_total"),
                get("widget_api_local_hits_total"),
            )
        };
        let (l1_url, plain_url) = tokio::task::spawn_blocking(move || {
            let _ = generator.run("warm-up", &l1_url, 1, conns_c);
            let _ = generator.run("warm-up", &plain_url, 1, conns_c);
            (l1_url, plain_url)
        })
        .await
        .expect("load generator");
        let hits_before = l1_hits(with_l1.clone()).await;
        let (first, g) = tokio::task::spawn_blocking(move || {
            let l1 = generator.run(
                "core-api, in-process cache (all hits)",
                &l1_url,
                secs_c,
                conns_c,
            );
            ((l1, l1_url, plain_url), generator)
        })
        .await
        .expect("load generator");
        let (l1_row, l1_url, plain_url) = first;
        let hits_after = l1_hits(with_l1.clone()).await;
        let (screens_whole, widget_hits) =
            (hits_after.0 - hits_before.0, hits_after.1 - hits_before.1);
        // One write per 100 requests of the all-hit row, to random widgets of the screen.
        let write_rate = (l1_row.rps / 100.0).max(1.0);
        let stop = CancellationToken::new();
        let writer = tokio::spawn(rewrite(
            redis.url(),
            prefix.clone(),
            changes[..n].to_vec(),
            write_rate,
            stop.clone(),
        ));
        let mut rows = vec![l1_row];
        let (more, _) = tokio::task::spawn_blocking(move || {
            let under_writes = g.run(
                "core-api, in-process cache, 1% writes",
                &l1_url,
                secs_c,
                conns_c,
            );
            (under_writes, g)
        })
        .await
        .expect("load generator");
        stop.cancel();
        let written = writer.await.expect("writer");
        rows.push(more);
        let measured = tokio::task::spawn_blocking(move || {
            vec![
                generator.run(
                    "core-api, no in-process cache (one MGET)",
                    &plain_url,
                    secs_c,
                    conns_c,
                ),
                generator.run(
                    "baseline: static axum handler, same bytes",
                    &static_url,
                    secs_c,
                    conns_c,
                ),
                redis_benchmark(port, &keys, 100_000, conns_c),
                generator.run(
                    "diagnostic: static handler, core-api's HTTP server",
                    &hardened_url,
                    secs_c,
                    conns_c,
                ),
                // The same screen from a 3-primary cluster (its MGET split by slot): on one
                // machine a cluster cannot be faster; the row shows what the split costs.
                generator.run(
                    "core-api on a 3-primary cluster, no in-process cache",
                    &cluster_url,
                    secs_c,
                    conns_c,
                ),
                {
                    let _ = generator.run("warm-up", &cluster_l1_url, 1, conns_c);
                    generator.run(
                        "core-api on a 3-primary cluster, in-process cache",
                        &cluster_l1_url,
                        secs_c,
                        conns_c,
                    )
                },
            ]
        })
        .await
        .expect("load generator");
        rows.extend(measured);
        rows.push(
            redis_rs_mget(&redis.url(), RedisMode::Standalone, &mget_keys, secs, conns).await,
        );
        rows.push(redis_rs_mget(&cluster.url(), RedisMode::Cluster, &mget_keys, secs, conns).await);
        print_table(
            &format!("screen of {n} widgets (body {} B)", body.len()),
            &rows,
        );
        println!(
            "  all-hit row: {screens_whole:.0} of {:.0} requests served as a whole screen, \
             {widget_hits:.0} widgets from the in-process cache one by one; \
             1% row: {written} writes at {write_rate:.0}/s",
            rows[0].rps * secs as f64
        );
    }
    miss_row(
        &pool,
        &changes[..WIDGETS],
        &redis,
        &db_url,
        &cancel,
        secs,
        conns,
        generator,
    )
    .await;
    cancel.cancel();
    pool.close().await;
    drop(pg);
    drop(redis);
}

fn print_table(title: &str, rows: &[Row]) {
    let rps_of = |prefix: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(prefix))
            .map_or(f64::NAN, |r| r.rps)
    };
    let (axum_rps, mget_rps) = (rps_of("baseline: static"), rps_of("baseline: redis"));
    println!();
    println!("{title}");
    println!(
        "{:<48} {:>10} {:>9} {:>9} {:>11} {:>11}",
        "target", "req/s", "p50 ms", "p99 ms", "vs axum", "vs MGET"
    );
    for r in rows {
        println!(
            "{:<48} {:>10.0} {:>9.3} {:>9.3} {:>10.2}x {:>10.2}x",
            r.name,
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.rps / axum_rps,
            r.rps / mget_rps
        );
    }
}

/// A static handler returning `body`, served by `axum::serve` (the HTTP stack alone), or with
/// `hardened` by core-api's own HTTP server (its connection and request limits, header, request
/// and write deadlines): what the hardening costs per request.
async fn serve_static(body: Vec<u8>, hardened: bool, cancel: &CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let body = bytes::Bytes::from(body);
    let app = Router::new().route(
        "/v1/screens/home",
        get(move || {
            let b = body.clone();
            async move { ([("content-type", "application/json")], b) }
        }),
    );
    let c = cancel.clone();
    tokio::spawn(async move {
        if hardened {
            widget_runtime::server::serve(listener, app, &Default::default(), c).await
        } else {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { c.cancelled().await })
                .await
        }
    });
    addr
}

/// Rewrites random widgets of `changes` in the cache at `rate` per second (each a new
/// version, through the version-guarded script, as the ingester does) until `stop`.
async fn rewrite(
    redis_url: String,
    prefix: String,
    changes: Vec<Change>,
    rate: f64,
    stop: CancellationToken,
) -> u64 {
    let cache = Cache::new(prefix);
    let client = redis::Client::open(redis_url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut version = 1;
    let mut written = 0;
    while !stop.is_cancelled() {
        tick.tick().await;
        version += 1;
        let c = &changes[written as usize % changes.len()];
        let json = Change {
            data_version: version,
            ..c.clone()
        }
        .widget_json()
        .expect("json");
        let w = CacheWrite {
            widget_key: &c.widget_key,
            version,
            json: Some(&json),
            ttl: Duration::from_secs(3600),
        };
        if cache.write_many(&mut conn, &[w]).await.is_ok() {
            written += 1;
        }
    }
    written
}

/// The all-miss row: 20 personalised widgets of a random one of 2000 users per request.
#[allow(clippy::too_many_arguments)]
async fn miss_row(
    pool: &sqlx::PgPool,
    changes: &[Change],
    redis: &RedisServer,
    db_url: &str,
    cancel: &CancellationToken,
    secs: u64,
    conns: usize,
    generator: Generator,
) {
    for users in (0..USERS).collect::<Vec<_>>().chunks(100) {
        let personal: Vec<Change> = users
            .iter()
            .flat_map(|u| {
                changes.iter().map(move |c| Change {
                    widget_key: format!("{}:u{u}", c.widget_key),
                    ..c.clone()
                })
            })
            .collect();
        store::apply_batch(pool, &personal)
            .await
            .expect("store personalised");
    }
    // No in-process cache, and a back-fill that expires after 1 s (the floor): a user comes
    // round again about once a second, so most lookups miss; the caption says how many.
    let miss = config("hw:bench-miss:", "1s", WIDGETS, false);
    let miss_addr = start_api(&miss, &redis.url(), db_url, cancel).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (headers, _) = fetch(&format!("http://{miss_addr}/v1/screens/me?user=u0")).await;
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("x-widget-source: database"),
        "the miss path serves from Postgres: {headers}"
    );
    let miss_url = Target::RandomUser(format!("http://{miss_addr}/v1/screens/me"));
    let miss_metrics = format!("http://{miss_addr}/metrics");
    let before = miss_stats(&String::from_utf8_lossy(&fetch(&miss_metrics).await.1));
    let row = tokio::task::spawn_blocking(move || {
        generator.run(
            "core-api, all 20 missed (Postgres + back-fill)",
            &miss_url,
            secs,
            conns,
        )
    })
    .await
    .expect("load generator");
    let after = miss_stats(&String::from_utf8_lossy(&fetch(&miss_metrics).await.1));
    println!();
    println!(
        "{:<48} {:>10.0} {:>9.3} {:>9.3}",
        row.name, row.rps, row.p50_ms, row.p99_ms
    );
    let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
    let requests = (after.requests - before.requests).max(1.0);
    let reads = after.fallback_reads - before.fallback_reads;
    println!(
        "vs axum / vs MGET: req/s as a multiple of the static axum handler (the HTTP stack alone) \
         and of redis-benchmark's MGET of the same keys (Redis alone), same machine, same run."
    );
    println!(
        "miss row, from the miss API's metrics: {:.1}% of {:.0} key lookups missed the cache; \
         {:.0} Postgres queries for {:.0} requests ({:.2} per request; concurrent misses of the \
         same keys share one query, by design)",
        100.0 * misses / (hits + misses).max(1.0),
        hits + misses,
        reads,
        requests,
        reads / requests
    );
}
