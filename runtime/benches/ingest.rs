//! Ingest throughput and ingress lag next to same-run baselines.
//!
//! `cargo bench -p widget-runtime --bench ingest [-- EVENTS RATE SECONDS PIPELINE_RATE]`
//! (defaults: 20000 events, 2000 events/s offered for 5 s, 5000 events/s through the pipeline)
//!
//! Starts private Postgres and Redis servers (testkit), then measures with the same rows
//! (about 1 KB of JSON each, 1000 distinct keys, increasing versions):
//! - baseline: the raw batched UNNEST upsert (`store::apply_batch`, batches of 500), and the
//!   ingester draining a pre-filled stream of the same rows (decode, upsert, guarded cache
//!   script, XACK with confirmations), alternately, five pairs; medians and per-pair ratios;
//! - baseline: raw pipelined SET of the finished cache values (batches of 500);
//! - the ingester at a fixed offered rate: ingress lag (XADD time to ACK) p50/p99, from the
//!   stats hash the ingester flushes (millisecond resolution);
//! - the whole pipeline at a fixed rate, with retention on: outbox INSERT (producer library) ->
//!   outbox-worker -> ingester ACK, lag from the outbox row's insert, and the most rows retained;
//! - the cache re-warm after Redis comes back empty: widgets written per second, and the
//!   Postgres reads per second of a core-api serving a steady reader meanwhile.

#[path = "../tests/support/mod.rs"]
mod support;

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
/// Pairs of (raw upsert, ingester drain) measured alternately.
const ROUNDS: usize = 5;

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
        widget_runtime::connect::pg_pool(core_url, 8, &Default::default()).expect("pool"),
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
    let pipeline_rate = args.next().unwrap_or(5_000).max(1);

    let (pg, redis) = tokio::join!(PgServer::start(), RedisServer::start());
    let (pg, redis) = (pg.expect("postgres"), redis.expect("redis"));
    let mut conn = redis.connection().await.expect("redis connection");
    let all: Vec<StreamEvent> = (0..events).map(event).collect();

    // The raw batched UNNEST upsert of the same rows, and the ingester draining a pre-filled
    // stream of them, alternately, each on a database of its own: one pair is under a second,
    // and the machine's load moves between pairs, so the ratio is taken per pair.
    let changes: Vec<Change> = all.iter().map(change).collect();
    let mut pairs: Vec<(Duration, Duration)> = Vec::new();
    for round in 0..ROUNDS {
        let (_, base_pool) = migrated(&pg).await;
        let t = Instant::now();
        for chunk in changes.chunks(BATCH) {
            store::apply_batch(&base_pool, chunk).await.expect("upsert");
        }
        let upsert_took = t.elapsed();
        base_pool.close().await;

        let drain = config(&format!("drain{round}"));
        let (drain_url, drain_pool) = migrated(&pg).await;
        drain_pool.close().await;
        xadd_all(&mut conn, &drain.stream_name(), &all).await;
        let t = Instant::now();
        let (cancel, handle) = start(&drain, &redis, &drain_url, stats::FLUSH_INTERVAL);
        wait_drained(&mut conn, &drain).await;
        let drain_took = t.elapsed();
        cancel.cancel();
        handle.await.expect("ingester task");
        let () = redis::cmd("DEL")
            .arg(drain.stream_name())
            .query_async(&mut conn)
            .await
            .expect("del stream");
        pairs.push((upsert_took, drain_took));
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let upsert_took = median(pairs.iter().map(|p| p.0).collect());
    let drain_took = median(pairs.iter().map(|p| p.1).collect());
    let mut ratios: Vec<f64> = pairs
        .iter()
        .map(|(u, d)| u.as_secs_f64() / d.as_secs_f64().max(1e-9))
        .collect();
    ratios.sort_by(f64::total_cmp);

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

    let (pipe_total, pipe_took, pipe_lag, max_retained) =
        pipeline(&pg, &redis, pipeline_rate, seconds).await;
    let warm = rewarm(&pg, &redis, events).await;

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
        "baseline: raw batched UNNEST upsert (median)",
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
        "ingester: drain pre-filled stream (median)",
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
    row(
        &format!("pipeline {pipeline_rate}/s: outbox INSERT -> ACK, retention"),
        pipe_total,
        pipe_took,
        pipe_lag,
    );
    println!("(pipeline row: at most {max_retained} relayed rows retained awaiting confirmation)");
    println!(
        "(drain vs upsert, {ROUNDS} pairs run alternately: {}; median {:.2}x)",
        ratios
            .iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(" "),
        ratios[ratios.len() / 2]
    );
    println!();
    println!(
        "re-warm: {} widgets in Postgres, Redis empty, warmRate {}/s, a reader of 50-key requests on one core-api",
        warm.widgets, warm.rate
    );
    println!(
        "| {:<36} | {:>8} | {:>10} | {:>14} |",
        "phase", "seconds", "widgets/s", "API PG reads/s"
    );
    println!("|{:-<38}|{:-<10}|{:-<12}|{:-<16}|", "", "", "", "");
    println!(
        "| {:<36} | {:>8.2} | {:>10} | {:>14.1} |",
        "cold cache, no re-warm (1 s)", 1.0, "-", warm.cold_reads_per_s
    );
    println!(
        "| {:<36} | {:>8.2} | {:>10.0} | {:>14.1} |",
        "during the re-warm",
        warm.took.as_secs_f64(),
        warm.widgets as f64 / warm.took.as_secs_f64(),
        warm.reads_during as f64 / warm.took.as_secs_f64()
    );
    println!(
        "| {:<36} | {:>8.2} | {:>10} | {:>14.1} |",
        "after the re-warm (2 s)",
        2.0,
        "-",
        warm.reads_after / 2.0
    );
    println!();
}

/// The whole pipeline at `rate` events/s for `seconds`: the producer library's INSERT, one
/// outbox-worker, one ingester. Returns (events, seconds until drained, lag p50/p99 from the
/// ingester's stats, most retained rows seen).
async fn pipeline(
    pg: &PgServer,
    redis: &RedisServer,
    rate: u64,
    seconds: u64,
) -> (usize, Duration, Option<(i64, i64)>, i64) {
    let config = config("pipeline");
    let (core_url, _core) = migrated(pg).await;
    let product_url = pg.fresh_database().await.expect("product db");
    let product = PgPool::connect(&product_url).await.expect("product pool");
    store::migrate(&store::PRODUCT_MIGRATIONS, &product)
        .await
        .expect("product migrations");
    let (cancel, handle) = start(&config, redis, &core_url, Duration::from_secs(3600));
    let worker = widget_runtime::outbox::worker::OutboxWorker::new(
        widget_runtime::outbox::worker::WorkerSettings::from_config(&config, "deals")
            .expect("source"),
        redis::Client::open(redis.url()).expect("redis url"),
        widget_runtime::connect::pg_pool(&product_url, 4, &Default::default()).expect("pool"),
        &mut Registry::default(),
        Readiness::default(),
    );
    let worker_task = tokio::spawn(worker.run(cancel.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tick = Duration::from_millis(10);
    let per_tick = ((rate as f64) * tick.as_secs_f64()).max(1.0) as usize;
    let total = (rate * seconds) as usize;
    let (mut sent, mut max_retained) = (0usize, 0i64);
    let t = Instant::now();
    let mut next = Instant::now();
    let mut last_sample = Instant::now();
    while sent < total {
        let n = per_tick.min(total - sent);
        let events: Vec<widget_runtime::WidgetEvent> = (sent..sent + n)
            .map(|i| {
                let e = event(i);
                widget_runtime::WidgetEvent::upsert(
                    e.widget_key,
                    e.widget_type,
                    e.data_version,
                    serde_json::from_slice(&e.content.unwrap_or_default()).unwrap_or_default(),
                )
            })
            .collect();
        let mut tx = product.begin().await.expect("begin");
        widget_runtime::Outbox::enqueue_all(&mut tx, &events)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
        sent += n;
        if last_sample.elapsed() >= Duration::from_millis(250) {
            last_sample = Instant::now();
            let retained: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM widget_outbox WHERE published_at IS NOT NULL",
            )
            .fetch_one(&product)
            .await
            .expect("count");
            max_retained = max_retained.max(retained);
        }
        next += tick;
        tokio::time::sleep_until(next.into()).await;
    }
    let mut conn = redis.connection().await.expect("redis");
    wait_drained(&mut conn, &config).await;
    let took = t.elapsed();
    cancel.cancel();
    handle.await.expect("ingester task");
    let _ = worker_task.await;
    let lag: (Option<i64>, Option<i64>) = redis::pipe()
        .hget(config.stats_key(), stats::field::INGRESS_LAG_P50_MS)
        .hget(config.stats_key(), stats::field::INGRESS_LAG_P99_MS)
        .query_async(&mut conn)
        .await
        .expect("stats");
    (total, took, lag.0.zip(lag.1), max_retained)
}

struct Rewarm {
    widgets: usize,
    rate: u32,
    took: Duration,
    cold_reads_per_s: f64,
    reads_during: f64,
    reads_after: f64,
}

/// `widgets` widgets in Postgres, an empty cache, a core-api with a steady reader: the reader's
/// Postgres reads with a cold cache for one second (back-fills only), then, from a cold cache
/// again, while an ingester re-warms, then after.
async fn rewarm(pg: &PgServer, redis: &RedisServer, widgets: usize) -> Rewarm {
    let config = config("rewarm");
    let (core_url, core) = migrated(pg).await;
    let all: Vec<Change> = (0..widgets)
        .map(|n| {
            let mut e = event(n);
            e.widget_key = format!("deals.w-{n}");
            change(&e)
        })
        .collect();
    for chunk in all.chunks(BATCH) {
        store::apply_batch(&core, chunk).await.expect("seed");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let stop = CancellationToken::new();
    let api = {
        let (config, stop) = (config.clone(), stop.clone());
        let client = redis::Client::open(redis.url()).expect("redis url");
        let pool =
            widget_runtime::connect::pg_pool(&core_url, 8, &Default::default()).expect("pool");
        tokio::spawn(async move {
            widget_runtime::api::serve(
                &config,
                client,
                pool,
                widget_runtime::api::Listeners {
                    api: listener,
                    admin: None,
                },
                Registry::default(),
                Readiness::default(),
                stop,
            )
            .await
        })
    };
    let reads = |addr: String| async move {
        let r = support::http_get(&addr, "/metrics", &[]).await;
        r.and_then(|r| support::metric_value(&r.body, "widget_api_fallback_reads_total"))
            .unwrap_or(0.0)
    };
    while support::http_get(&addr, "/readyz", &[])
        .await
        .map(|r| r.status)
        != Some(200)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reader = {
        let (addr, stop) = (addr.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.is_cancelled() {
                let keys: Vec<String> = (0..50)
                    .map(|j| format!("deals.w-{}", (i * 50 + j * 7919) % widgets))
                    .collect();
                let _ =
                    support::http_get(&addr, &format!("/v1/widgets?keys={}", keys.join(",")), &[])
                        .await;
                i += 1;
            }
        })
    };
    let r0 = reads(addr.clone()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cold = reads(addr.clone()).await - r0;
    // Cold again (the reader's back-fills warmed part of it), then the re-warm begins.
    let mut conn = redis.connection().await.expect("redis");
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("flushall");
    let r1 = reads(addr.clone()).await;
    let t = Instant::now();
    let (cancel, handle) = start(&config, redis, &core_url, Duration::from_millis(100));
    loop {
        let (epoch, done): (Option<String>, Option<String>) = redis::pipe()
            .get(config.epoch_key())
            .get(config.warm_key("done"))
            .query_async(&mut conn)
            .await
            .expect("warm state");
        if epoch.is_some() && epoch == done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t.elapsed();
    let r2 = reads(addr.clone()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r3 = reads(addr.clone()).await;
    stop.cancel();
    cancel.cancel();
    let _ = reader.await;
    let _ = api.await;
    handle.await.expect("ingester task");
    Rewarm {
        widgets,
        rate: config.cache.warm_rate,
        took,
        cold_reads_per_s: cold,
        reads_during: r2 - r1,
        reads_after: r3 - r2,
    }
}
