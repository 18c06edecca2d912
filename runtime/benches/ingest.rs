//! Ingest throughput and ingress lag next to same-run baselines.
//!
//! `cargo bench -p widget-runtime --bench ingest [-- EVENTS RATE SECONDS]`
//! (defaults: 20000 events, 2000 events/s offered for 5 s)
//!
//! Starts private Postgres and Redis servers (testkit), then measures with the same rows
//! (about 1 KB of JSON each, 1000 distinct keys, increasing versions):
//! - baseline: the raw batched UNNEST upsert (`store::apply_batch`, batches of 500);
//! - baseline: raw pipelined SET of the finished cache values (batches of 500);
//! - the ingester draining a pre-filled stream (decode, upsert, guarded cache script, XACK);
//! - the ingester at a fixed offered rate: ingress lag (XADD time to ACK) p50/p99, from the
//!   stats hash the ingester flushes (millisecond resolution).

use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use redis::aio::MultiplexedConnection;
use serde_json::json;
use sqlx::PgPool;
use testkit::{PgServer, RedisServer};
use tokio_util::sync::CancellationToken;
use widget_runtime::Op;
use widget_runtime::admin::Readiness;
use widget_runtime::cache::{self, Cache};
use widget_runtime::config::Config;
use widget_runtime::ingest::Ingester;
use widget_runtime::stats;
use widget_runtime::store::{self, Change};
use widget_runtime::stream::StreamEvent;

const BATCH: usize = 500;

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn event(n: usize) -> StreamEvent {
    let items: Vec<_> = (0..8)
        .map(|i| json!({"id": n * 10 + i, "title": format!("Item {i} of widget {n}"), "price": "19.99", "image": format!("https://cdn.example.com/img/{n}/{i}.webp")}))
        .collect();
    StreamEvent {
        event_id: format!("deals:{n}"),
        source: "deals".into(),
        widget_key: format!("deals.w-{}", n % 1000),
        widget_type: "carousel".into(),
        data_version: n as i64 + 1,
        op: Op::Upsert,
        content: Some(serde_json::to_vec(&json!({"items": items})).unwrap_or_default()),
        produced_at_us: now_us(),
    }
}

fn change(e: &StreamEvent) -> Change {
    Change {
        widget_key: e.widget_key.clone(),
        widget_type: e.widget_type.clone(),
        source: e.source.clone(),
        data_version: e.data_version,
        op: e.op,
        content: e
            .content
            .as_ref()
            .map(|c| String::from_utf8_lossy(c).into_owned()),
    }
}

async fn migrated(pg: &PgServer) -> (String, PgPool) {
    let url = pg.fresh_database().await.expect("database");
    let pool = PgPool::connect(&url).await.expect("connect");
    store::migrate(&store::CORE_MIGRATIONS, &pool)
        .await
        .expect("migrate");
    (url, pool)
}

async fn xadd_all(conn: &mut MultiplexedConnection, stream: &str, events: &[StreamEvent]) {
    for chunk in events.chunks(BATCH) {
        let mut pipe = redis::pipe();
        for e in chunk {
            pipe.xadd(stream, "*", &e.to_fields()).ignore();
        }
        pipe.query_async::<()>(conn).await.expect("xadd");
    }
}

/// (pending, lag) of the group; lag `None` if Redis cannot tell.
async fn group(
    conn: &mut MultiplexedConnection,
    config: &Config,
) -> Option<(usize, Option<usize>)> {
    let info: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(config.stream_name())
        .query_async(conn)
        .await
        .ok()?;
    info.groups
        .into_iter()
        .find(|g| g.name == config.stream.consumer_group)
        .map(|g| (g.pending, g.lag))
}

async fn wait_drained(conn: &mut MultiplexedConnection, config: &Config) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Some((0, Some(0))) = group(conn, config).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("the ingester did not drain the stream within 5 minutes");
}

fn config(name: &str) -> Config {
    Config::from_yaml_str(&format!("pipeline: {name}\nsources: [{{name: deals}}]\n"))
        .expect("bench config")
}

fn start(
    config: &Config,
    redis: &RedisServer,
    core_url: &str,
    stats_interval: Duration,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut registry = Registry::default();
    let ingester = Ingester::new(
        config,
        "bench".into(),
        redis::Client::open(redis.url()).expect("redis url"),
        widget_runtime::connect::pg_pool(core_url, 8).expect("pool"),
        &mut registry,
        Readiness::default(),
    )
    .with_stats_interval(stats_interval);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let handle = tokio::spawn(async move {
        ingester.run(c).await.expect("ingester");
    });
    (cancel, handle)
}

fn row(path: &str, events: usize, took: Duration, lag: Option<(i64, i64)>) {
    let (p50, p99) = match lag {
        Some((a, b)) => (format!("{a} ms"), format!("{b} ms")),
        None => ("-".into(), "-".into()),
    };
    println!(
        "| {path:<52} | {events:>7} | {:>8.3} | {:>10.0} | {p50:>8} | {p99:>8} |",
        took.as_secs_f64(),
        events as f64 / took.as_secs_f64().max(1e-9)
    );
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .filter_map(|a| a.parse::<u64>().ok());
    let events = args.next().unwrap_or(20_000) as usize;
    let rate = args.next().unwrap_or(2_000).max(1);
    let seconds = args.next().unwrap_or(5).max(1);

    let (pg, redis) = tokio::join!(PgServer::start(), RedisServer::start());
    let (pg, redis) = (pg.expect("postgres"), redis.expect("redis"));
    let mut conn = redis.connection().await.expect("redis connection");
    let all: Vec<StreamEvent> = (0..events).map(event).collect();

    // Baseline 1: the raw batched UNNEST upsert of the same rows.
    let (_, base_pool) = migrated(&pg).await;
    let changes: Vec<Change> = all.iter().map(change).collect();
    let t = Instant::now();
    for chunk in changes.chunks(BATCH) {
        store::apply_batch(&base_pool, chunk).await.expect("upsert");
    }
    let upsert_took = t.elapsed();

    // Baseline 2: raw pipelined SET of the same cache values.
    let cache = Cache::new("hw:baseline:");
    let values: Vec<(String, Vec<u8>)> = all
        .iter()
        .map(|e| {
            let json = cache::widget_json(
                &e.widget_key,
                &e.widget_type,
                e.data_version,
                e.content.as_deref().unwrap_or(b"{}"),
            );
            (
                cache.key(&e.widget_key),
                cache::encode_value(e.data_version, Some(&json)),
            )
        })
        .collect();
    let t = Instant::now();
    for chunk in values.chunks(BATCH) {
        let mut pipe = redis::pipe();
        for (k, v) in chunk {
            pipe.cmd("SET")
                .arg(k)
                .arg(v)
                .arg("PX")
                .arg(604_800_000u64)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.expect("set");
    }
    let set_took = t.elapsed();

    // The ingester draining a pre-filled stream.
    let drain = config("drain");
    let (drain_url, _drain_pool) = migrated(&pg).await;
    xadd_all(&mut conn, &drain.stream_name(), &all).await;
    let t = Instant::now();
    let (cancel, handle) = start(&drain, &redis, &drain_url, stats::FLUSH_INTERVAL);
    wait_drained(&mut conn, &drain).await;
    let drain_took = t.elapsed();
    cancel.cancel();
    handle.await.expect("ingester task");

    // The ingester at a fixed offered rate; the stats hash is flushed only at the end, so its
    // lag percentiles cover the whole run.
    let steady = config("steady");
    let (steady_url, _steady_pool) = migrated(&pg).await;
    let (cancel, handle) = start(&steady, &redis, &steady_url, Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(300)).await; // group created, reader blocked
    let tick = Duration::from_millis(10);
    let per_tick = ((rate as f64) * tick.as_secs_f64()).max(1.0) as usize;
    let total = (rate * seconds) as usize;
    let stream = steady.stream_name();
    let t = Instant::now();
    let mut sent = 0usize;
    let mut next = Instant::now();
    while sent < total {
        let n = per_tick.min(total - sent);
        let chunk: Vec<StreamEvent> = (sent..sent + n).map(event).collect();
        xadd_all(&mut conn, &stream, &chunk).await;
        sent += n;
        next += tick;
        tokio::time::sleep_until(next.into()).await;
    }
    wait_drained(&mut conn, &steady).await;
    let steady_took = t.elapsed();
    cancel.cancel();
    handle.await.expect("ingester task");
    let lag: (Option<i64>, Option<i64>) = redis::pipe()
        .hget(steady.stats_key(), stats::field::INGRESS_LAG_P50_MS)
        .hget(steady.stats_key(), stats::field::INGRESS_LAG_P99_MS)
        .query_async(&mut conn)
        .await
        .expect("stats");

    println!();
    println!(
        "ingest: {events} events of ~{} bytes over 1000 keys; batches of {BATCH}; fixed rate {rate}/s for {seconds}s",
        all.first()
            .and_then(|e| e.content.as_ref())
            .map_or(0, |c| c.len())
    );
    println!(
        "| {:<52} | {:>7} | {:>8} | {:>10} | {:>8} | {:>8} |",
        "path", "events", "seconds", "events/s", "lag p50", "lag p99"
    );
    println!(
        "|{:-<54}|{:-<9}|{:-<10}|{:-<12}|{:-<10}|{:-<10}|",
        "", "", "", "", "", ""
    );
    row(
        "baseline: raw batched UNNEST upsert (apply_batch)",
        events,
        upsert_took,
        None,
    );
    row(
        "baseline: raw pipelined SET of the cache values",
        events,
        set_took,
        None,
    );
    row(
        "ingester: drain pre-filled stream (upsert+cache+ack)",
        events,
        drain_took,
        None,
    );
    row(
        &format!("ingester: fixed offered rate {rate}/s"),
        total,
        steady_took,
        lag.0.zip(lag.1),
    );
    println!();
}
