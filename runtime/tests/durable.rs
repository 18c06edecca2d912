//! Nothing lost when Redis loses its data: retained outbox rows, stream epochs and replay, the
//! cache re-warm, unsafe eviction settings. Real Postgres and Redis (testkit); every scenario
//! ends with the invariant: every key holds the producer's last committed version (or its
//! deletion) in Postgres, in the cache and in what the API serves.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use redis::AsyncCommands;
use serde_json::{Value, json};
use sqlx::PgPool;
use support::{
    Running, RunningApi, Stack, http_get, start_api_on, start_ingester_on, start_source_worker,
};
use testkit::eventually;
use tokio_util::sync::CancellationToken;
use widget_runtime::admin::Readiness;
use widget_runtime::cache::{Cache, CacheWrite, Cached, decode_value};
use widget_runtime::event::Op;
use widget_runtime::ingest::Ingester;
use widget_runtime::store::{self, Change};
use widget_runtime::{Outbox, WidgetEvent, api, stats};

const WAIT: Duration = Duration::from_secs(40);

const CONFIG: &str = r#"
pipeline: test
stream: {maxLength: 100000}
cache: {warmRate: 5000}
reclaim: {minIdle: 300ms, interval: 200ms, maxDeliveries: 3}
sources:
  - {name: deals, batchSize: 100, pollInterval: 50ms}
"#;

fn start_worker(stack: &Stack) -> Running<widget_runtime::outbox::worker::WorkerError> {
    start_worker_on(stack, &stack.redis.url())
}

fn start_worker_on(
    stack: &Stack,
    redis_url: &str,
) -> Running<widget_runtime::outbox::worker::WorkerError> {
    start_source_worker(stack, redis_url, "deals")
}

fn start_ingester_at(
    stack: &Stack,
    name: &str,
    core_url: &str,
    batch: usize,
) -> Running<widget_runtime::ingest::IngestError> {
    start_ingester_on(stack, &stack.redis.url(), name, core_url, batch)
}

fn start_ingester(stack: &Stack) -> Running<widget_runtime::ingest::IngestError> {
    start_ingester_at(stack, "ingester-a", &stack.core_url, 100)
}

async fn start_api(stack: &Stack) -> RunningApi {
    start_api_on(stack, &stack.redis.url()).await
}

/// The producer's view: the last committed (version, deleted) per key.
type Expected = BTreeMap<String, (i64, bool)>;

/// Writes `rounds` versions of `keys` keys through the outbox library, one transaction per round;
/// about one write in 20 is a delete. Returns what each key must end as.
async fn produce(
    pool: &PgPool,
    keys: usize,
    rounds: i64,
    from_version: i64,
    expected: &mut Expected,
) {
    for r in 0..rounds {
        let version = from_version + r;
        let events: Vec<WidgetEvent> = (0..keys)
            .map(|k| {
                let key = format!("deals.w-{k}");
                if (k as i64 + version) % 20 == 0 {
                    WidgetEvent::delete(key, "card", version)
                } else {
                    WidgetEvent::upsert(key, "card", version, json!({"k": k, "v": version}))
                }
            })
            .collect();
        let mut tx = pool.begin().await.expect("begin");
        Outbox::enqueue_all(&mut tx, &events)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
        for e in &events {
            expected.insert(e.widget_key.clone(), (version, e.op == Op::Delete));
        }
    }
}

/// (unpublished, retained) outbox rows.
async fn outbox_counts(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE published_at IS NULL),
                count(*) FILTER (WHERE published_at IS NOT NULL) FROM widget_outbox",
    )
    .fetch_one(pool)
    .await
    .expect("count")
}

/// What differs from `expected` in Postgres, the cache (at `redis_url`) and the API; empty
/// when converged.
async fn differences_on(
    stack: &Stack,
    redis_url: &str,
    api: &RunningApi,
    expected: &Expected,
) -> Vec<String> {
    let core = stack.pool(&stack.core_url).await;
    let keys: Vec<&str> = expected.keys().map(String::as_str).collect();
    let stored: HashMap<String, (i64, bool)> = store::fetch_many(&core, &keys)
        .await
        .expect("read widgets")
        .into_iter()
        .map(|w| (w.widget_key, (w.data_version, w.deleted)))
        .collect();
    core.close().await;
    let Ok(mut conn) = redis::Client::open(redis_url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
    else {
        return vec!["Redis did not answer".into()];
    };
    let cache = Cache::new(stack.config.key_prefix());
    let cached = cache.get_many(&mut conn, &keys).await.unwrap_or_default();
    let mut served: HashMap<String, i64> = HashMap::new();
    let mut missing: Vec<String> = Vec::new();
    for chunk in keys.chunks(api::MAX_KEYS) {
        let path = format!("/v1/widgets?keys={}", chunk.join(","));
        let Some(r) = http_get(&api.addr, &path, &[]).await else {
            return vec!["API did not answer".into()];
        };
        let body: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        for w in body["widgets"].as_array().into_iter().flatten() {
            if let (Some(k), Some(v)) = (w["key"].as_str(), w["version"].as_i64()) {
                served.insert(k.to_string(), v);
            }
        }
        for k in body["missing"].as_array().into_iter().flatten() {
            missing.extend(k.as_str().map(String::from));
        }
    }
    let mut diffs = Vec::new();
    for (i, (key, want)) in expected.iter().enumerate() {
        if stored.get(key) != Some(want) {
            diffs.push(format!(
                "{key}: postgres {:?}, want {want:?}",
                stored.get(key)
            ));
        }
        let in_cache = cached.get(i).cloned().flatten().and_then(|raw| {
            decode_value(&raw).map(|c| match c {
                Cached::Widget { version, .. } => (version, false),
                Cached::Deleted { version } => (version, true),
            })
        });
        if in_cache != Some(*want) {
            diffs.push(format!("{key}: cache {in_cache:?}, want {want:?}"));
        }
        let api_ok = if want.1 {
            !served.contains_key(key) && missing.contains(key)
        } else {
            served.get(key) == Some(&want.0)
        };
        if !api_ok {
            diffs.push(format!("{key}: API {:?}, want {want:?}", served.get(key)));
        }
    }
    diffs
}

async fn assert_converged(stack: &Stack, api: &RunningApi, expected: &Expected) {
    assert_converged_on(stack, &stack.redis.url(), api, expected).await
}

async fn assert_converged_on(
    stack: &Stack,
    redis_url: &str,
    api: &RunningApi,
    expected: &Expected,
) {
    let last = Mutex::new(Vec::new());
    let done = eventually(WAIT, || async {
        let diffs = differences_on(stack, redis_url, api, expected).await;
        let ok = diffs.is_empty();
        if let Ok(mut l) = last.lock() {
            *l = diffs;
        }
        ok.then_some(())
    })
    .await;
    let last = last.into_inner().unwrap_or_default();
    assert!(
        done.is_some(),
        "not converged after {WAIT:?}; {} differences, first: {:?}",
        last.len(),
        &last[..last.len().min(10)]
    );
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let ok = eventually(WAIT, || {
        let f = check();
        async move { f.await.then_some(()) }
    })
    .await;
    assert!(ok.is_some(), "timed out waiting for {what}");
}

fn replayed(worker: &Running<widget_runtime::outbox::worker::WorkerError>) -> f64 {
    worker.metric("widget_outbox_replayed_total{source=\"deals\"}")
}

/// Test 1 of the issue: the ingester is down, relayed rows sit unread in the stream, Redis is
/// SIGKILLed and comes back empty. Every unconfirmed row is replayed; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_with_unread_entries_replays_every_unconfirmed_row() {
    let mut stack = Stack::with_config(CONFIG).await;
    let product = stack.pool(&stack.product_url).await;
    let mut expected = Expected::new();
    let worker = start_worker(&stack);
    let api = start_api(&stack).await;

    // Everything runs: applied, confirmed, deleted from the outbox.
    let ingester = start_ingester(&stack);
    produce(&product, 100, 2, 1, &mut expected).await;
    assert_converged(&stack, &api, &expected).await;
    wait_for("confirmed rows deleted", || async {
        outbox_counts(&product).await == (0, 0)
    })
    .await;
    ingester.stop().await;

    // The ingester is down: 600 more events are relayed and wait, unread, in the stream.
    produce(&product, 100, 6, 3, &mut expected).await;
    wait_for("600 rows relayed and retained", || async {
        outbox_counts(&product).await == (0, 600)
    })
    .await;
    let mut conn = stack.redis_conn().await;
    let unread: i64 = conn.xlen(stack.config.stream_name()).await.expect("xlen");
    assert!(
        unread >= 600,
        "the stream holds the unread entries ({unread})"
    );
    let before = replayed(&worker);

    stack.redis.kill().await;
    stack.redis.wipe();
    stack
        .redis
        .start_again()
        .await
        .expect("redis restarts empty");
    let ingester = start_ingester(&stack);

    assert_converged(&stack, &api, &expected).await;
    wait_for("replayed rows confirmed and deleted", || async {
        outbox_counts(&product).await == (0, 0)
    })
    .await;
    assert_eq!(
        replayed(&worker) - before,
        600.0,
        "exactly the unconfirmed rows are replayed"
    );
    assert!(worker.metric("widget_outbox_redis_loss_detected_total{source=\"deals\"}") >= 1.0);
    ingester.stop().await;
    worker.stop().await;
    api.stop().await;
}

/// Test 2: the stream is deleted (`DEL`) while entries are unread or pending and everything
/// runs: the group comes back in a new epoch and the retained rows are replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_deleted_with_unread_entries_while_running_loses_nothing() {
    let stack = Stack::with_config(CONFIG).await;
    let product = stack.pool(&stack.product_url).await;
    let mut expected = Expected::new();
    let worker = start_worker(&stack);
    let api = start_api(&stack).await;
    // Small batches keep entries unread for a while after they are relayed.
    let ingester = start_ingester_at(&stack, "ingester-a", &stack.core_url, 5);
    let stream = stack.config.stream_name();
    let mut conn = stack.redis_conn().await;
    let mut version = 1;
    let mut deleted_unfinished = 0;
    for _ in 0..5 {
        produce(&product, 200, 5, version, &mut expected).await;
        version += 5;
        wait_for("rows relayed", || async {
            outbox_counts(&product).await.0 == 0
        })
        .await;
        // Read what the group has not finished and delete the stream in one MULTI.
        let (groups, _): (redis::streams::StreamInfoGroupsReply, i64) = redis::pipe()
            .atomic()
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .cmd("DEL")
            .arg(&stream)
            .query_async(&mut conn)
            .await
            .expect("xinfo + del");
        deleted_unfinished = groups
            .groups
            .first()
            .map(|g| g.lag.unwrap_or(0) + g.pending)
            .unwrap_or(0);
        if deleted_unfinished > 0 {
            break;
        }
    }
    assert!(
        deleted_unfinished > 0,
        "the stream was deleted with entries the group had not finished"
    );
    produce(&product, 200, 1, version, &mut expected).await;
    assert_converged(&stack, &api, &expected).await;
    wait_for("outbox drained", || async {
        outbox_counts(&product).await == (0, 0)
    })
    .await;
    assert!(replayed(&worker) > 0.0, "retained rows were replayed");
    ingester.stop().await;
    worker.stop().await;
    api.stop().await;
}

/// Test 4: in normal operation retained rows are deleted within a few seconds of being applied,
/// and under a steady load their number levels off instead of growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_rows_level_off_under_steady_load_and_drain_after() {
    let stack = Stack::with_config(CONFIG).await;
    let product = stack.pool(&stack.product_url).await;
    let mut expected = Expected::new();
    let worker = start_worker(&stack);
    let ingester = start_ingester(&stack);
    let api = start_api(&stack).await;
    // About 200 events/s for 8 s.
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut version = 1;
    while started.elapsed() < Duration::from_secs(8) {
        produce(&product, 20, 1, version, &mut expected).await;
        version += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if version % 10 == 0 {
            samples.push((started.elapsed(), outbox_counts(&product).await.1));
        }
    }
    let produced = (version - 1) * 20;
    eprintln!("retained rows while {produced} events were produced: {samples:?}");
    // After the first second, never more than about two seconds' worth (400 rows).
    let late: Vec<i64> = samples
        .iter()
        .filter(|(t, _)| *t > Duration::from_secs(1))
        .map(|(_, n)| *n)
        .collect();
    assert!(!late.is_empty());
    assert!(
        late.iter().all(|n| *n <= 400),
        "retained rows level off: {late:?}"
    );
    let stopped = Instant::now();
    wait_for("retained rows deleted", || async {
        outbox_counts(&product).await == (0, 0)
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "deleted within a few seconds, took {:?}",
        stopped.elapsed()
    );
    assert_converged(&stack, &api, &expected).await;
    assert_eq!(
        worker.metric("widget_outbox_confirmed_total{source=\"deals\"}"),
        produced as f64
    );
    ingester.stop().await;
    worker.stop().await;
    api.stop().await;
}

/// Test 5: the core database is down for longer than the retention cap. No unconfirmed row is
/// deleted before it; then the cap is reported (metric, stats gauge for the operator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_down_past_the_retention_cap_is_reported_and_nothing_goes_before_it() {
    let stack = Stack::with_config(
        &CONFIG.replace("pollInterval: 50ms}", "pollInterval: 50ms, retention: 3s}"),
    )
    .await;
    let product = stack.pool(&stack.product_url).await;
    let worker = start_worker(&stack);
    // The ingester's core database does not answer (nothing listens there).
    let ingester = start_ingester_at(
        &stack,
        "ingester-a",
        "postgres://postgres@127.0.0.1:1/core",
        100,
    );
    let mut expected = Expected::new();
    produce(&product, 50, 1, 1, &mut expected).await;
    wait_for("rows relayed", || async {
        outbox_counts(&product).await == (0, 50)
    })
    .await;
    let relayed = Instant::now();
    while relayed.elapsed() < Duration::from_millis(2500) {
        assert_eq!(
            outbox_counts(&product).await,
            (0, 50),
            "no unconfirmed row is deleted before the cap"
        );
        assert_eq!(
            worker.metric("widget_outbox_retention_capped{source=\"deals\"}"),
            0.0
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for("rows past the cap deleted", || async {
        outbox_counts(&product).await == (0, 0)
    })
    .await;
    // The sweep counts them after its transaction committed: the test may look in between.
    wait_for("the deleted rows counted", || async {
        worker.metric("widget_outbox_retention_expired_total{source=\"deals\"}") == 50.0
    })
    .await;
    wait_for("the cap is reported", || async {
        worker.metric("widget_outbox_retention_capped{source=\"deals\"}") == 1.0
    })
    .await;
    let mut conn = stack.redis_conn().await;
    let key = stack.config.stats_key();
    wait_for("the cap reaches the stats hash", || {
        let mut conn = conn.clone();
        let key = key.clone();
        async move {
            let fields: HashMap<String, String> = conn.hgetall(&key).await.unwrap_or_default();
            fields
                .get("outbox_retention_capped.deals")
                .map(String::as_str)
                == Some("1")
                && fields
                    .get(stats::field::RETENTION_EXPIRED)
                    .map(String::as_str)
                    == Some("50")
        }
    })
    .await;
    let _ = conn.ping::<String>().await;
    ingester.stop().await;
    worker.stop().await;
}

/// The row cap: beyond `maxRetainedRows` the oldest relayed, unconfirmed rows go, loudly;
/// unpublished rows are never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_row_cap_deletes_only_the_oldest_relayed_rows_beyond_it() {
    let stack = Stack::with_config(&CONFIG.replace(
        "pollInterval: 50ms}",
        "pollInterval: 50ms, maxRetainedRows: 30}",
    ))
    .await;
    let product = stack.pool(&stack.product_url).await;
    let worker = start_worker(&stack);
    let mut expected = Expected::new();
    produce(&product, 50, 1, 1, &mut expected).await;
    wait_for("capped at 30 retained rows", || async {
        outbox_counts(&product).await == (0, 30)
    })
    .await;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM widget_outbox ORDER BY id")
        .fetch_all(&product)
        .await
        .expect("ids");
    let max: i64 = sqlx::query_scalar("SELECT max(id) FROM widget_outbox")
        .fetch_one(&product)
        .await
        .expect("max");
    assert_eq!(
        ids,
        ((max - 29)..=max).collect::<Vec<_>>(),
        "the newest 30 are kept"
    );
    assert_eq!(
        worker.metric("widget_outbox_retention_expired_total{source=\"deals\"}"),
        20.0
    );
    worker.stop().await;
}

/// Redis comes back from an older snapshot (an RDB restore, a replica that lagged): the stream
/// may look fine and the applied rows are gone from the outbox, but the cache holds older
/// versions. The restart starts a new epoch, whose re-warm repairs every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restored_from_an_older_snapshot_is_repaired_by_the_rewarm() {
    let mut stack = Stack::with_config(CONFIG).await;
    let product = stack.pool(&stack.product_url).await;
    let mut expected = Expected::new();
    let worker = start_worker(&stack);
    let ingester = start_ingester(&stack);
    let api = start_api(&stack).await;
    produce(&product, 100, 1, 1, &mut expected).await;
    assert_converged(&stack, &api, &expected).await;
    let mut conn = stack.redis_conn().await;
    let _: () = redis::cmd("SAVE")
        .query_async(&mut conn)
        .await
        .expect("save");
    produce(&product, 100, 1, 2, &mut expected).await;
    assert_converged(&stack, &api, &expected).await;
    wait_for("outbox drained", || async {
        outbox_counts(&product).await == (0, 0)
    })
    .await;
    // No API while Redis comes back: its Postgres fallback would repair keys it is asked for,
    // and this test is about the keys nobody asks for.
    api.stop().await;
    // SIGKILL: the restart loads the older dump, with version 1 in the cache.
    stack.redis.kill().await;
    stack
        .redis
        .start_again()
        .await
        .expect("redis restarts from the older dump");
    let mut conn = stack.redis_conn().await;
    let cache = Cache::new(stack.config.key_prefix());
    let keys: Vec<&str> = expected.keys().map(String::as_str).collect();
    let cached_versions = |conn: &redis::aio::MultiplexedConnection| {
        let (mut conn, cache, keys) = (conn.clone(), cache.clone(), keys.clone());
        async move {
            let values = cache.get_many(&mut conn, &keys).await.unwrap_or_default();
            values
                .iter()
                .map(|raw| {
                    raw.as_deref().and_then(decode_value).map(|c| match c {
                        Cached::Widget { version, .. } => (version, false),
                        Cached::Deleted { version } => (version, true),
                    })
                })
                .collect::<Vec<_>>()
        }
    };
    let restored = cached_versions(&conn).await;
    assert!(
        restored.iter().all(|v| v.map(|v| v.0) == Some(1)),
        "the restored cache is older than Postgres: {restored:?}"
    );
    let want: Vec<Option<(i64, bool)>> = expected.values().copied().map(Some).collect();
    wait_for("the re-warm repairs every key", || async {
        cached_versions(&conn).await == want
    })
    .await;
    let _ = conn.ping::<String>().await;
    let api = start_api(&stack).await;
    assert_converged(&stack, &api, &expected).await;
    ingester.stop().await;
    worker.stop().await;
    api.stop().await;
}

/// Test 6: Redis comes back empty with 10k widgets in Postgres. The API's Postgres reads fall to
/// zero once the re-warm is done (in about `widgets / warmRate` seconds), and values newer than
/// what the re-warm read are never overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewarm_fills_the_cache_at_a_bounded_rate_without_overwriting_newer_values() {
    const N: usize = 10_000;
    let stack = Stack::with_config(CONFIG).await;
    let core = stack.pool(&stack.core_url).await;
    let changes: Vec<Change> = (0..N)
        .map(|k| Change {
            widget_key: format!("deals.w-{k}"),
            widget_type: "card".into(),
            source: "deals".into(),
            data_version: 1,
            op: if k % 50 == 7 { Op::Delete } else { Op::Upsert },
            content: (k % 50 != 7).then(|| json!({"k": k}).to_string()),
        })
        .collect();
    for chunk in changes.chunks(1000) {
        store::apply_batch(&core, chunk)
            .await
            .expect("seed widgets");
    }
    // Newer values already in the cache (as an ingester would have written them meanwhile).
    let mut conn = stack.redis_conn().await;
    let cache = Cache::new(stack.config.key_prefix());
    let newer: Vec<(String, Vec<u8>)> = (0..100)
        .map(|k| {
            (
                format!("deals.w-{k}"),
                json!({"newer": k}).to_string().into_bytes(),
            )
        })
        .collect();
    let writes: Vec<CacheWrite<'_>> = newer
        .iter()
        .map(|(key, json)| CacheWrite {
            widget_key: key,
            version: 5,
            json: Some(json),
            ttl: Duration::from_secs(3600),
        })
        .collect();
    cache
        .write_many(&mut conn, &writes)
        .await
        .expect("newer values");

    let api = start_api(&stack).await;
    // A steady reader over all keys, 50 keys a request.
    let reading = CancellationToken::new();
    let reader = {
        let (addr, stop) = (api.addr.clone(), reading.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.is_cancelled() {
                let keys: Vec<String> = (0..50)
                    .map(|j| format!("deals.w-{}", (i * 50 + j * 197) % N))
                    .collect();
                let _ = http_get(&addr, &format!("/v1/widgets?keys={}", keys.join(",")), &[]).await;
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reads_before = api.metric("widget_api_fallback_reads_total").await;
    assert!(reads_before > 0.0, "a cold cache sends reads to Postgres");

    let started = Instant::now();
    let ingester = start_ingester(&stack);
    // A write through the pipeline during the re-warm.
    let worker = start_worker(&stack);
    let product = stack.pool(&stack.product_url).await;
    let mut expected = Expected::new();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tx = product.begin().await.expect("begin");
    let updates: Vec<WidgetEvent> = (5000..5050)
        .map(|k| WidgetEvent::upsert(format!("deals.w-{k}"), "card", 2, json!({"k": k, "v": 2})))
        .collect();
    Outbox::enqueue_all(&mut tx, &updates)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    for e in &updates {
        expected.insert(e.widget_key.clone(), (2, false));
    }
    wait_for("the re-warm completes", || async {
        ingester.metric("widget_cache_warms_completed_total") >= 1.0
    })
    .await;
    let took = started.elapsed();
    let written = ingester.metric("widget_cache_warm_written_total");
    let reads_during = api.metric("widget_api_fallback_reads_total").await - reads_before;
    eprintln!(
        "re-warm: {written} widgets in {took:?} ({:.0}/s, rate 5000/s); API Postgres reads during it: {reads_during} ({:.1}/s)",
        written / took.as_secs_f64(),
        reads_during / took.as_secs_f64()
    );
    // Keys written through the pipeline after the re-warm started are ahead of its cursor.
    assert!(
        (N as f64 - 50.0..=N as f64).contains(&written),
        "{written} written"
    );
    // Promised in the docs: about widgets / warmRate (2 s here) plus the epoch check.
    assert!(took < Duration::from_secs(15), "re-warm took {took:?}");
    assert!(
        took >= Duration::from_millis(1800),
        "the rate bound holds ({took:?})"
    );

    let settled = api.metric("widget_api_fallback_reads_total").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = api.metric("widget_api_fallback_reads_total").await - settled;
    assert!(
        after <= 1.0,
        "Postgres reads fall to near zero after the re-warm: {after} in 2 s"
    );
    reading.cancel();
    reader.await.expect("reader");

    // Newer values were kept; everything else holds Postgres' version.
    let keys: Vec<String> = (0..N).map(|k| format!("deals.w-{k}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let values = cache.get_many(&mut conn, &refs).await.expect("mget");
    for (k, raw) in values.iter().enumerate() {
        let got = raw.as_deref().and_then(decode_value).map(|c| match c {
            Cached::Widget { version, .. } => (version, false),
            Cached::Deleted { version } => (version, true),
        });
        let want = if k < 100 {
            (5, false)
        } else if (5000..5050).contains(&k) {
            (2, false)
        } else {
            (1, k % 50 == 7)
        };
        assert_eq!(got, Some(want), "deals.w-{k}");
    }
    assert_converged(&stack, &api, &expected).await;
    ingester.stop().await;
    worker.stop().await;
    api.stop().await;
}

/// Test 3: a real asynchronous replica that missed the master's last writes is promoted after
/// the master is killed; the components follow it (behind one address, as a DNS name or a
/// Sentinel-managed endpoint would give them). Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_replica_that_missed_writes_loses_nothing() {
    let mut stack = Stack::with_config(CONFIG).await;
    let mut replica = testkit::RedisServer::start_replica_of(&stack.redis)
        .await
        .expect("replica");
    let proxy = testkit::TcpProxy::start(stack.redis.port())
        .await
        .expect("proxy");
    let url = format!("redis://127.0.0.1:{}/", proxy.port());
    let product = stack.pool(&stack.product_url).await;
    let mut expected = Expected::new();
    let worker = start_worker_on(&stack, &url);
    let api = start_api_on(&stack, &url).await;
    let ingester = start_ingester_on(&stack, &url, "ingester-a", &stack.core_url, 100);
    produce(&product, 100, 1, 1, &mut expected).await;
    assert_converged_on(&stack, &url, &api, &expected).await;
    replica.wait_in_sync(WAIT).await.expect("replica in sync");

    // From here on the replica receives nothing.
    replica.pause();
    stack
        .redis
        .disconnect_replicas()
        .await
        .expect("cut the replication link");
    // Applied and confirmed on the master only: the replica's cache keeps version 1.
    produce(&product, 100, 1, 2, &mut expected).await;
    assert_converged_on(&stack, &url, &api, &expected).await;
    wait_for("outbox drained", || async {
        outbox_counts(&product).await == (0, 0)
    })
    .await;
    // Relayed to the master while no ingester runs: only the outbox and the master have them.
    ingester.stop().await;
    produce(&product, 100, 1, 3, &mut expected).await;
    wait_for("relayed", || async {
        outbox_counts(&product).await == (0, 100)
    })
    .await;
    let before = replayed(&worker);

    stack.redis.kill().await;
    replica.resume();
    replica.promote().await.expect("promote");
    proxy.set_target(replica.port());
    let ingester = start_ingester_on(&stack, &url, "ingester-b", &stack.core_url, 100);

    assert_converged_on(&stack, &url, &api, &expected).await;
    wait_for("outbox drained after the failover", || async {
        outbox_counts(&product).await == (0, 0)
    })
    .await;
    assert_eq!(
        replayed(&worker) - before,
        100.0,
        "the rows the replica missed are replayed"
    );
    ingester.stop().await;
    worker.stop().await;
    api.stop().await;
}

/// A `tracing` writer into a shared buffer, to read what a component logged.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

/// Test 7: an eviction policy that can evict the stream is an error in the log, a metric and the
/// stats gauge the operator turns into `RedisEvictionUnsafe`; `noeviction` is none of these.
/// A current-thread runtime, so the components' tasks log to this test's subscriber.
#[test]
fn an_eviction_policy_that_can_drop_the_stream_is_reported() {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let stack = Stack::with_config(CONFIG).await;
        let mut conn = stack.redis_conn().await;
        let key = stack.config.stats_key();
        let gauge = |conn: &redis::aio::MultiplexedConnection| {
            let (mut conn, key) = (conn.clone(), key.clone());
            async move {
                let fields: HashMap<String, String> = conn.hgetall(&key).await.unwrap_or_default();
                fields.get(stats::field::REDIS_EVICTION_UNSAFE).cloned()
            }
        };

        // The safe default first.
        let ingester = start_ingester(&stack);
        let worker = start_worker(&stack);
        wait_for("the safe policy is read", || async {
            gauge(&conn).await.as_deref() == Some("0")
        })
        .await;
        assert_eq!(ingester.metric("widget_ingest_redis_eviction_unsafe"), 0.0);
        ingester.stop().await;
        worker.stop().await;
        assert!(!logs.text().contains("may evict the stream"));

        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("allkeys-lru")
            .query_async(&mut conn)
            .await
            .expect("config set");
        let ingester = start_ingester(&stack);
        let worker = start_worker(&stack);
        wait_for("the unsafe policy is reported", || async {
            gauge(&conn).await.as_deref() == Some("1")
                && ingester.metric("widget_ingest_redis_eviction_unsafe") == 1.0
                && worker.metric("widget_outbox_redis_eviction_unsafe{source=\"deals\"}") == 1.0
        })
        .await;
        let text = logs.text();
        let line = text
            .lines()
            .find(|l| l.contains("may evict the stream"))
            .unwrap_or_else(|| panic!("no warning in the log:\n{text}"));
        assert!(
            line.contains("ERROR") && line.contains("allkeys-lru"),
            "{line}"
        );
        ingester.stop().await;
        worker.stop().await;
    });
}

/// A worker that checked the epoch just before Redis lost data can commit rows stamped with the
/// old epoch after the replay ran. The sweep replays such rows once they are a few seconds old,
/// so they cannot be stranded if that worker stops before its next check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_stamped_with_an_old_epoch_after_the_replay_are_replayed_by_the_sweep() {
    let stack = Stack::with_config(CONFIG).await;
    let product = stack.pool(&stack.product_url).await;
    let worker = start_worker(&stack);
    let mut expected = Expected::new();
    produce(&product, 10, 1, 1, &mut expected).await;
    wait_for("relayed", || async {
        outbox_counts(&product).await == (0, 10)
    })
    .await;
    // As if committed by a worker that still had an epoch Redis has since lost.
    sqlx::query(
        "UPDATE widget_outbox SET relay_epoch = 'gone:0', published_at = clock_timestamp() - interval '10 seconds'",
    )
    .execute(&product)
    .await
    .expect("stamp old epoch");
    let before = replayed(&worker);
    let mut conn = stack.redis_conn().await;
    let epoch: String = conn.get(stack.config.epoch_key()).await.expect("epoch");
    wait_for("replayed under the current epoch", || async {
        let epochs: Vec<Option<String>> =
            sqlx::query_scalar("SELECT DISTINCT relay_epoch FROM widget_outbox")
                .fetch_all(&product)
                .await
                .expect("epochs");
        epochs == vec![Some(epoch.clone())]
    })
    .await;
    assert_eq!(replayed(&worker) - before, 10.0);
    worker.stop().await;
}

/// An entry dead-lettered because it kept failing (`max-deliveries`) is not confirmed: its row
/// stays in the outbox, the only copy outside Redis, while every other row is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_dead_lettered_for_max_deliveries_stays_in_the_outbox() {
    let stack = Stack::with_config(CONFIG).await;
    let core = stack.pool(&stack.core_url).await;
    // The core database refuses one key (a data error, so the ingester keeps it pending).
    sqlx::query("ALTER TABLE widgets ADD CONSTRAINT refuse_w3 CHECK (widget_key <> 'deals.w-3')")
        .execute(&core)
        .await
        .expect("constraint");
    let product = stack.pool(&stack.product_url).await;
    let worker = start_worker(&stack);
    let ingester = start_ingester(&stack);
    let mut expected = Expected::new();
    produce(&product, 10, 1, 1, &mut expected).await;
    wait_for("the refused entry is dead-lettered", || async {
        ingester.metric("widget_ingest_dead_lettered_total{reason=\"max-deliveries\"}") >= 1.0
    })
    .await;
    wait_for("the others are confirmed and deleted", || async {
        outbox_counts(&product).await == (0, 1)
    })
    .await;
    let left: String = sqlx::query_scalar("SELECT widget_key FROM widget_outbox")
        .fetch_one(&product)
        .await
        .expect("row");
    assert_eq!(left, "deals.w-3");
    // It stays: nothing confirms it later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(outbox_counts(&product).await, (0, 1));
    ingester.stop().await;
    worker.stop().await;
}

/// The epoch check works for a Redis user that may not run INFO (some managed services): it
/// then cannot see restarts, but still sees a missing marker or group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_check_works_without_info() {
    let stack = Stack::with_config(CONFIG).await;
    let mut admin = stack.redis_conn().await;
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER", "noinfo", "on", ">secret", "~*", "&*", "+@all", "-info",
            ][..],
        )
        .query_async(&mut admin)
        .await
        .expect("acl");
    let url = format!("redis://noinfo:secret@127.0.0.1:{}/", stack.redis.port());
    let mut conn = redis::Client::open(url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect as noinfo");
    let info: redis::RedisResult<String> = redis::cmd("INFO").query_async(&mut conn).await;
    assert!(info.is_err(), "the user may not run INFO");
    let (key, stream, group) = (stack.config.epoch_key(), stack.config.stream_name(), "g");
    let first = widget_runtime::durability::ensure_epoch(&mut conn, &key, &stream, group, None)
        .await
        .expect("epoch without INFO");
    assert!(first.id.starts_with("unknown:"), "{first:?}");
    let same =
        widget_runtime::durability::ensure_epoch(&mut conn, &key, &stream, group, Some(&first.id))
            .await
            .expect("again");
    assert_eq!((same.id.as_str(), same.started), (first.id.as_str(), None));
    let _: () = admin.del(&stream).await.expect("del stream");
    let after =
        widget_runtime::durability::ensure_epoch(&mut conn, &key, &stream, group, Some(&first.id))
            .await
            .expect("after del");
    assert_ne!(
        after.id, first.id,
        "a deleted stream still starts a new epoch"
    );
}

/// During a rollout the ingesters may still run a config without a source just added: they
/// apply its events (ownership holds) and must confirm its rows too, or those rows would sit in
/// the outbox until the retention cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingester_without_a_new_source_in_its_config_confirms_its_rows() {
    let stack = Stack::with_config(&format!(
        "{CONFIG}  - {{name: loyalty, outboxTable: loyalty_outbox, pollInterval: 50ms}}\n"
    ))
    .await;
    let product = stack.pool(&stack.product_url).await;
    sqlx::query("CREATE TABLE loyalty_outbox (LIKE widget_outbox INCLUDING ALL)")
        .execute(&product)
        .await
        .expect("loyalty outbox");
    let worker = start_source_worker(&stack, &stack.redis.url(), "loyalty");
    let mut old = stack.config.clone();
    old.sources.retain(|s| s.name == "deals");
    let mut registry = Registry::default();
    let ingester = Ingester::new(
        &old,
        "old-config".into(),
        stack.redis_client(),
        stack.lazy_pool(&stack.core_url),
        &mut registry,
        Readiness::default(),
    );
    let cancel = CancellationToken::new();
    let task = tokio::spawn(ingester.run(cancel.clone()));
    let outbox = Outbox::with_table("loyalty_outbox").expect("table");
    let mut tx = product.begin().await.expect("begin");
    outbox
        .push(
            &mut tx,
            &WidgetEvent::upsert("loyalty.points:7", "points", 3, json!({"points": 70})),
        )
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    wait_for(
        "the loyalty row is applied, confirmed and deleted",
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM loyalty_outbox")
                .fetch_one(&product)
                .await
                .expect("count")
                == 0
        },
    )
    .await;
    let core = stack.pool(&stack.core_url).await;
    let stored = store::fetch_many(&core, &["loyalty.points:7"])
        .await
        .expect("read");
    assert_eq!(stored.first().map(|w| w.data_version), Some(3));
    cancel.cancel();
    task.await
        .expect("ingester task")
        .expect("ingester ends cleanly");
    worker.stop().await;
}

/// Creates a Redis user with `rules` and returns its URL.
async fn acl_user(stack: &Stack, name: &str, rules: &[String]) -> String {
    let mut conn = stack.redis_conn().await;
    support::set_acl_user(&mut conn, name, rules).await;
    format!("redis://{name}:pw@127.0.0.1:{}/", stack.redis.port())
}

/// A worker as its least-privilege user keeps relaying when the stream is over `maxLength` with
/// entries still pending: trimming the consumed history then asks XPENDING for the oldest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_worker_trims_a_full_stream_with_pending_entries() {
    use widget_runtime::acl::{Component, rules};
    let stack = Stack::with_config(&CONFIG.replace("maxLength: 100000", "maxLength: 1000")).await;
    let config = stack.config.clone();
    let (stream, group) = (config.stream_name(), config.stream.consumer_group.clone());
    let mut admin = stack.redis_conn().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(&group)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await
        .expect("group");
    let mut fill = redis::pipe();
    for i in 0..1200 {
        fill.cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("filler")
            .arg(i)
            .ignore();
    }
    let _: () = fill.query_async(&mut admin).await.expect("fill");
    // Everything delivered, all but the last 10 acknowledged: 10 pending, nothing unread.
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg("elsewhere")
        .arg("COUNT")
        .arg(1200)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut admin)
        .await
        .expect("read");
    let ids: Vec<String> = read.keys[0].ids.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), 1200);
    let _: () = redis::cmd("XACK")
        .arg(&stream)
        .arg(&group)
        .arg(&ids[..1190])
        .query_async(&mut admin)
        .await
        .expect("ack");

    let url = acl_user(
        &stack,
        "worker-deals",
        &rules(&config, Component::Worker { source: "deals" }),
    )
    .await;
    let worker = start_worker_on(&stack, &url);
    let product = stack.pool(&stack.product_url).await;
    let mut expected = Expected::new();
    produce(&product, 20, 1, 1, &mut expected).await;
    wait_for("the worker relays past a full stream", || async {
        outbox_counts(&product).await.0 == 0
    })
    .await;
    worker.stop().await;
}

/// Every component runs as its own least-privilege Redis user (`widget_runtime::acl`), through
/// normal traffic, a Redis that loses its data (epoch, replay, re-warm) and back-fills: the
/// pipeline converges, and each user is refused what it has no business doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_under_least_privilege_redis_users() {
    use widget_runtime::acl::{Component, rules};
    let stack = Stack::with_config(CONFIG).await;
    let config = stack.config.clone();
    let worker_url = acl_user(
        &stack,
        "worker-deals",
        &rules(&config, Component::Worker { source: "deals" }),
    )
    .await;
    let ingester_url = acl_user(&stack, "ingester", &rules(&config, Component::Ingester)).await;
    let api_url = acl_user(&stack, "core-api", &rules(&config, Component::CoreApi)).await;

    let product = stack.pool(&stack.product_url).await;
    let mut expected = Expected::new();
    let worker = start_worker_on(&stack, &worker_url);
    let ingester = start_ingester_on(&stack, &ingester_url, "ingester-a", &stack.core_url, 100);
    let api = start_api_on(&stack, &api_url).await;
    produce(&product, 60, 3, 1, &mut expected).await;
    assert_converged(&stack, &api, &expected).await;
    // core-api's in-process cache is on by default: its user may track keys. (Refused, the
    // cache switches itself off and the screens above still come from Redis.)
    wait_for("core-api's user tracks the cache", || async {
        let users = stack.redis.tracking_users().await.unwrap_or_default();
        users.iter().any(|u| u == "core-api")
    })
    .await;
    wait_for("confirmed rows deleted", || async {
        outbox_counts(&product).await == (0, 0)
    })
    .await;

    // Redis loses everything (ACL users are configuration, not data): a new epoch, the replay
    // of nothing unconfirmed, the re-warm, and new traffic, all as the same users.
    let mut admin = stack.redis_conn().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut admin)
        .await
        .expect("flush");
    produce(&product, 60, 2, 10, &mut expected).await;
    assert_converged(&stack, &api, &expected).await;
    wait_for("re-warm completed", || {
        let (mut admin, key) = (admin.clone(), config.warm_key("done"));
        async move {
            let done: Option<String> = admin.get(key).await.unwrap_or(None);
            done.is_some()
        }
    })
    .await;

    // What each user may not do.
    let refused = |url: String, cmd: redis::Cmd| async move {
        let mut c = redis::Client::open(url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        match cmd.query_async::<redis::Value>(&mut c).await {
            Err(e) => e.code() == Some("NOPERM"),
            Ok(_) => false,
        }
    };
    let cache_key = format!("{}w:deals.w-1", config.key_prefix());
    let mut set = redis::cmd("SET");
    set.arg(&cache_key).arg("forged");
    assert!(
        refused(worker_url.clone(), set.clone()).await,
        "a worker cannot write the cache"
    );
    let mut get = redis::cmd("GET");
    get.arg(&cache_key);
    assert!(refused(worker_url.clone(), get).await, "nor read it");
    let mut other = redis::cmd("SMEMBERS");
    other.arg(config.confirmed_key("loyalty"));
    assert!(
        refused(worker_url.clone(), other).await,
        "nor another source's confirmations"
    );
    let mut xadd = redis::cmd("XADD");
    xadd.arg(config.stream_name()).arg("*").arg("f").arg("v");
    assert!(
        refused(api_url.clone(), xadd).await,
        "core-api cannot inject events"
    );
    let mut flush = redis::cmd("FLUSHALL");
    flush.arg("SYNC");
    assert!(
        refused(ingester_url.clone(), flush).await,
        "the ingester cannot flush Redis"
    );
    let mut foreign = redis::cmd("SET");
    foreign.arg("hw:other-pipeline:w:deals.x").arg("v");
    assert!(
        refused(ingester_url, foreign).await,
        "nor write another pipeline's cache"
    );

    ingester.stop().await;
    worker.stop().await;
    api.stop().await;
}
