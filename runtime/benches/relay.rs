//! Outbox relay throughput next to same-run baselines.
//!
//! `cargo bench -p widget-runtime --bench relay [-- EVENTS]`
//!
//! Starts private Postgres and Redis servers (testkit), then measures with the same payloads:
//! - raw batched INSERT of outbox rows (UNNEST, batches of 500): the producer-side ceiling;
//! - raw pipelined XADD (batches of 500): the Redis-side ceiling;
//! - the outbox-worker relaying a pre-filled outbox (claim, XADD pipeline, delete, commit),
//!   with one worker and with two workers on the same source.

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

async fn relay(config: &Config, redis: &RedisServer, pool: &PgPool, workers: usize) -> Duration {
    let cancel = CancellationToken::new();
    let start = Instant::now();
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
        tasks.push(tokio::spawn(w.run(cancel.clone())));
    }
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM widget_outbox")
            .fetch_one(pool)
            .await
            .expect("count");
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = start.elapsed();
    cancel.cancel();
    for t in tasks {
        let _ = t.await;
    }
    took
}

fn row(name: &str, events: usize, took: Duration, baseline: Option<Duration>) {
    let rate = events as f64 / took.as_secs_f64();
    let vs = baseline
        .map(|b| format!("{:>6.2}x", took.as_secs_f64() / b.as_secs_f64()))
        .unwrap_or_else(|| "      -".into());
    println!(
        "| {name:<44} | {events:>8} | {:>9.1} | {rate:>12.0} | {vs} |",
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
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .expect("pool");
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
    fill_outbox(&pool, &data).await;
    let two = relay(&config, &redis, &pool, 2).await;

    println!(
        "\nOutbox relay, {events} events of ~1 KB, batches of {BATCH} (Postgres and Redis on this machine)\n"
    );
    println!(
        "| {:<44} | {:>8} | {:>9} | {:>12} | {:>7} |",
        "what", "events", "ms", "events/s", "vs XADD"
    );
    println!(
        "|{}|{}|{}|{}|{}|",
        "-".repeat(46),
        "-".repeat(10),
        "-".repeat(11),
        "-".repeat(14),
        "-".repeat(9)
    );
    row(
        "baseline: raw batched INSERT into the outbox",
        events,
        insert,
        None,
    );
    row("baseline: raw pipelined XADD", events, xadd, Some(xadd));
    row("outbox-worker relay, 1 worker", events, one, Some(xadd));
    row("outbox-worker relay, 2 workers", events, two, Some(xadd));
    println!();
}
