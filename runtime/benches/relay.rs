//! Outbox relay throughput next to same-run baselines.
//!
//! `cargo bench -p widget-runtime --bench relay [-- EVENTS]`
//!
//! Starts private Postgres and Redis servers (testkit), then measures with the same payloads:
//! - raw batched INSERT of outbox rows (UNNEST, batches of 500): the producer-side ceiling;
//! - raw pipelined XADD (batches of 500): the Redis-side ceiling;
//! - the outbox-worker relaying a pre-filled outbox (claim, XADD pipeline, mark published,
//!   commit), with one worker and with two workers on the same source;
//! - the retained rows deleted once confirmed (the confirmations an ingester would add);
//! - the replay after Redis lost the stream (FLUSHALL): every retained row published again.

use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use serde_json::json;
use sqlx::PgPool;
use testkit::{PgServer, RedisServer};
use tokio_util::sync::CancellationToken;
use widget_runtime::admin::Readiness;
use widget_runtime::config::Config;
use widget_runtime::outbox::worker::{OutboxWorker, WorkerSettings};
use widget_runtime::stream::StreamEvent;
use widget_runtime::{Op, Outbox, WidgetEvent, store};

const BATCH: usize = 500;

fn payload(n: usize) -> WidgetEvent {
    // About 1 KB of content, like a typical server-driven-UI card list.
    let items: Vec<_> = (0..8)
        .map(|i| json!({"id": n * 10 + i, "title": format!("Item {i} of widget {n}"), "price": "19.99", "image": format!("https://cdn.example.com/img/{n}/{i}.webp")}))
        .collect();
    WidgetEvent::upsert(
        format!("deals.w-{}", n % 1000),
        "carousel",
        n as i64 + 1,
        json!({"items": items}),
    )
}

async fn fill_outbox(pool: &PgPool, events: &[WidgetEvent]) -> Duration {
    let start = Instant::now();
    for chunk in events.chunks(BATCH) {
        let mut tx = pool.begin().await.expect("begin");
        Outbox::enqueue_all(&mut tx, chunk).await.expect("insert");
        tx.commit().await.expect("commit");
    }
    start.elapsed()
}

async fn raw_xadd(redis: &RedisServer, events: &[WidgetEvent]) -> Duration {
    let mut conn = redis.connection().await.expect("redis");
    let encoded: Vec<StreamEvent> = events
        .iter()
        .enumerate()
        .map(|(i, e)| StreamEvent {
            event_id: format!("deals:{i}"),
            source: "deals".into(),
            widget_key: e.widget_key.clone(),
            widget_type: e.widget_type.clone(),
            data_version: e.data_version,
            op: Op::Upsert,
            content: e.content.as_ref().map(|c| c.to_string().into_bytes()),
            produced_at_us: 0,
        })
        .collect();
    let start = Instant::now();
    for chunk in encoded.chunks(BATCH) {
        let mut pipe = redis::pipe();
        for e in chunk {
            pipe.xadd("baseline.stream", "*", &e.to_fields()).ignore();
        }
        let () = pipe.query_async(&mut conn).await.expect("xadd");
    }
    start.elapsed()
}

fn start_workers(
    config: &Config,
    redis: &RedisServer,
    pool: &PgPool,
    workers: usize,
) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let settings = WorkerSettings::from_config(config, "deals").expect("source");
        let w = OutboxWorker::new(
            settings,
            redis::Client::open(redis.url()).expect("url"),
            pool.clone(),
            &mut Registry::default(),
            Readiness::default(),
        );
        let c = cancel.clone();
        tasks.push(tokio::spawn(async move {
            let _ = w.run(c).await;
        }));
    }
    (cancel, tasks)
}

async fn stop(cancel: CancellationToken, tasks: Vec<tokio::task::JoinHandle<()>>) {
    cancel.cancel();
    for t in tasks {
        let _ = t.await;
    }
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn wait_until_zero(pool: &PgPool, sql: &'static str) {
    while count(pool, sql).await > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const UNPUBLISHED: &str = "SELECT count(*) FROM widget_outbox WHERE published_at IS NULL";
const ROWS: &str = "SELECT count(*) FROM widget_outbox";

/// Until every row is relayed (marked published; retained until confirmed).
async fn relay(config: &Config, redis: &RedisServer, pool: &PgPool, workers: usize) -> Duration {
    let start = Instant::now();
    let (cancel, tasks) = start_workers(config, redis, pool, workers);
    wait_until_zero(pool, UNPUBLISHED).await;
    let took = start.elapsed();
    stop(cancel, tasks).await;
    took
}

/// Retained rows deleted once the ingester's confirmations (added here at once) come in.
async fn confirm(config: &Config, redis: &RedisServer, pool: &PgPool) -> Duration {
    // What the ingester confirms: `durability::RowRef` of each row.
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT id, data_version, (extract(epoch FROM created_at) * 1000000)::bigint
         FROM widget_outbox",
    )
    .fetch_all(pool)
    .await
    .expect("ids");
    let members: Vec<String> = rows
        .iter()
        .map(|&(id, version, produced_at_us)| {
            widget_runtime::durability::RowRef {
                id,
                version,
                produced_at_us,
            }
            .member()
        })
        .collect();
    let mut conn = redis.connection().await.expect("redis");
    for chunk in members.chunks(BATCH) {
        let () = redis::cmd("SADD")
            .arg(config.confirmed_key("deals"))
            .arg(chunk)
            .query_async(&mut conn)
            .await
            .expect("sadd");
    }
    let start = Instant::now();
    let (cancel, tasks) = start_workers(config, redis, pool, 1);
    wait_until_zero(pool, ROWS).await;
    let took = start.elapsed();
    stop(cancel, tasks).await;
    took
}

/// Redis loses everything while a worker runs with every row retained: time until each row is
/// published again.
async fn replay(config: &Config, redis: &RedisServer, pool: &PgPool, events: usize) -> Duration {
    let (cancel, tasks) = start_workers(config, redis, pool, 1);
    wait_until_zero(pool, UNPUBLISHED).await;
    let mut conn = redis.connection().await.expect("redis");
    let start = Instant::now();
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("flushall");
    // The replay unpublishes every row first, then relays them all again.
    loop {
        let len: usize = redis::cmd("XLEN")
            .arg(config.stream_name())
            .query_async(&mut conn)
            .await
            .expect("xlen");
        if len >= events && count(pool, UNPUBLISHED).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = start.elapsed();
    stop(cancel, tasks).await;
    took
}

/// "vs XADD" is time over the XADD baseline's time; "vs INSERT" is throughput over the raw
/// INSERT's throughput (the producer-side ceiling the relay should stay close to).
fn row(name: &str, events: usize, took: Duration, xadd: Option<Duration>, insert: Duration) {
    let rate = events as f64 / took.as_secs_f64();
    let vs = xadd
        .map(|b| format!("{:>6.2}x", took.as_secs_f64() / b.as_secs_f64()))
        .unwrap_or_else(|| "      -".into());
    let vs_insert = insert.as_secs_f64() / took.as_secs_f64();
    println!(
        "| {name:<44} | {events:>8} | {:>9.1} | {rate:>12.0} | {vs} | {vs_insert:>8.2}x |",
        took.as_secs_f64() * 1000.0
    );
}

#[tokio::main]
async fn main() {
    let events: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let (pg, redis) = tokio::join!(PgServer::start(), RedisServer::start());
    let (pg, redis) = (pg.expect("postgres"), redis.expect("redis"));
    let url = pg.create_database("product").await.expect("db");
    // The pool the outbox-worker command uses (connect::pg_pool), so the relay rows measure
    // what production runs.
    let pool = widget_runtime::connect::pg_pool(&url, 8, &Default::default()).expect("pool");
    store::migrate(&store::PRODUCT_MIGRATIONS, &pool)
        .await
        .expect("migrate");
    let config = Config::from_yaml_str(&format!(
        "pipeline: bench\nstream: {{maxLength: 10000000}}\nsources: [{{name: deals, batchSize: {BATCH}, pollInterval: 250ms}}]\n"
    ))
    .expect("config");
    let data: Vec<WidgetEvent> = (0..events).map(payload).collect();

    let insert = fill_outbox(&pool, &data).await;
    let xadd = raw_xadd(&redis, &data).await;
    let one = relay(&config, &redis, &pool, 1).await;
    let confirmed = confirm(&config, &redis, &pool).await;
    fill_outbox(&pool, &data).await;
    let two = relay(&config, &redis, &pool, 2).await;
    let replayed = replay(&config, &redis, &pool, events).await;
    // The wake-up trigger's cost on the producer side: the same batched INSERTs into an empty
    // outbox, without and with it, back to back.
    let sql = |q: &'static str| sqlx::query(q).execute(&pool);
    sql("TRUNCATE widget_outbox").await.expect("truncate");
    sql("ALTER TABLE widget_outbox DISABLE TRIGGER widget_outbox_wakeup")
        .await
        .expect("disable");
    let untriggered = fill_outbox(&pool, &data).await;
    sql("ALTER TABLE widget_outbox ENABLE TRIGGER widget_outbox_wakeup")
        .await
        .expect("enable");
    sql("TRUNCATE widget_outbox").await.expect("truncate");
    let triggered = fill_outbox(&pool, &data).await;

    println!(
        "\nOutbox relay, {events} events of ~1 KB, batches of {BATCH} (Postgres and Redis on this machine)\n"
    );
    println!(
        "| {:<44} | {:>8} | {:>9} | {:>12} | {:>7} | {:>9} |",
        "what", "events", "ms", "events/s", "vs XADD", "vs INSERT"
    );
    println!(
        "|{}|{}|{}|{}|{}|{}|",
        "-".repeat(46),
        "-".repeat(10),
        "-".repeat(11),
        "-".repeat(14),
        "-".repeat(9),
        "-".repeat(11)
    );
    let row = |name: &str, took: Duration, xadd_base: Option<Duration>| {
        row(name, events, took, xadd_base, insert)
    };
    row("baseline: raw batched INSERT into the outbox", insert, None);
    row("baseline: raw pipelined XADD", xadd, Some(xadd));
    row("outbox-worker relay, 1 worker", one, Some(xadd));
    row("outbox-worker relay, 2 workers", two, Some(xadd));
    row("retained rows deleted on confirmation", confirmed, None);
    row("replay after Redis lost the stream", replayed, Some(xadd));
    println!();
    println!("The wake-up trigger (one NOTIFY per INSERT statement), batched INSERTs of {BATCH}:");
    println!();
    row("INSERT, trigger disabled", untriggered, None);
    row("INSERT, trigger enabled", triggered, None);
    let ratio = untriggered.as_secs_f64() / triggered.as_secs_f64();
    println!("\nwith the trigger: {ratio:.2}x the rows/s without it");
    println!();
}
