//! The produce side against real Postgres and Redis: producer library and outbox-worker.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::process::Stdio;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use serde_json::json;
use support::{Stack, field_str, http_get, read_stream};
use testkit::eventually;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use widget_runtime::admin::Readiness;
use widget_runtime::outbox::worker::{OutboxWorker, WorkerSettings};
use widget_runtime::outbox::{Outbox, OutboxError};
use widget_runtime::stream::field;
use widget_runtime::{WidgetEvent, event::EventError};

const WAIT: Duration = Duration::from_secs(30);

struct RunningWorker {
    cancel: CancellationToken,
    task: JoinHandle<Result<(), widget_runtime::outbox::worker::WorkerError>>,
    readiness: Readiness,
}

impl RunningWorker {
    async fn stop(self) {
        self.cancel.cancel();
        self.task
            .await
            .expect("worker task")
            .expect("worker ends cleanly");
    }
}

fn spawn_worker(stack: &Stack, source: &str) -> RunningWorker {
    spawn_worker_with(stack, source, |_| {})
}

fn spawn_worker_with(
    stack: &Stack,
    source: &str,
    tune: impl FnOnce(&mut WorkerSettings),
) -> RunningWorker {
    let mut settings = WorkerSettings::from_config(&stack.config, source).expect("source");
    tune(&mut settings);
    let mut registry = Registry::default();
    let readiness = Readiness::default();
    let worker = OutboxWorker::new(
        settings,
        stack.redis_client(),
        stack.lazy_pool(&stack.product_url),
        &mut registry,
        readiness.clone(),
    );
    let cancel = CancellationToken::new();
    let task = tokio::spawn(worker.run(cancel.clone()));
    RunningWorker {
        cancel,
        task,
        readiness,
    }
}

fn deal(n: i64) -> WidgetEvent {
    WidgetEvent::upsert(
        format!("deals.item-{n}"),
        "deal-card",
        n,
        json!({"title": format!("Deal {n}"), "price": n}),
    )
}

async fn enqueue(pool: &sqlx::PgPool, events: &[WidgetEvent]) -> Vec<i64> {
    let mut tx = pool.begin().await.expect("begin");
    let ids = Outbox::enqueue_all(&mut tx, events).await.expect("enqueue");
    tx.commit().await.expect("commit");
    ids
}

/// Rows not yet relayed (relayed rows stay, marked published, until the ingester confirms them;
/// no ingester runs in these tests).
async fn outbox_rows(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM widget_outbox WHERE published_at IS NULL")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Outbox ids (from `event_id` = `deals:<id>`) in stream order.
fn outbox_ids(entries: &[(String, HashMap<String, redis::Value>)]) -> Vec<i64> {
    entries
        .iter()
        .map(|(_, m)| {
            let id = field_str(m, field::EVENT_ID);
            id.rsplit(':')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("event id ends in the outbox id")
        })
        .collect()
}

async fn wait_for_distinct(
    stack: &Stack,
    stream: &str,
    n: usize,
) -> Vec<(String, HashMap<String, redis::Value>)> {
    let conn = stack.redis_conn().await;
    eventually(WAIT, || {
        let mut conn = conn.clone();
        async move {
            let entries = read_stream(&mut conn, stream).await;
            let distinct: BTreeSet<i64> = outbox_ids(&entries).into_iter().collect();
            (distinct.len() >= n).then_some(entries)
        }
    })
    .await
    .unwrap_or_else(|| panic!("{n} distinct events did not arrive in {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_writes_publish_nothing_and_committed_ones_publish_exactly_the_event() {
    let stack = Stack::start().await;
    let pool = stack.pool(&stack.product_url).await;
    let stream = stack.config.stream_name();

    let mut tx = pool.begin().await.expect("begin");
    Outbox::enqueue(&mut tx, &deal(1)).await.expect("enqueue");
    tx.rollback().await.expect("rollback");
    assert_eq!(
        outbox_rows(&pool).await,
        0,
        "a rolled-back transaction leaves no outbox row"
    );

    let worker = spawn_worker(&stack, "deals");
    let event = WidgetEvent::upsert(
        "deals.top-picks",
        "carousel",
        42,
        json!({"items": ["a", "b"]}),
    );
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("CREATE TABLE deals (id int)")
        .execute(&mut *tx)
        .await
        .expect("product write");
    let id = Outbox::enqueue(&mut tx, &event).await.expect("enqueue");
    tx.commit().await.expect("commit");

    let entries = wait_for_distinct(&stack, &stream, 1).await;
    // Give a wrongly published rolled-back event time to show up too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let entries_later = read_stream(&mut stack.redis_conn().await, &stream).await;
    assert_eq!(
        entries_later.len(),
        1,
        "exactly one entry: {entries_later:?}"
    );
    let m = &entries[0].1;
    assert_eq!(field_str(m, field::VERSION), "1");
    assert_eq!(field_str(m, field::EVENT_ID), format!("deals:{id}"));
    assert_eq!(field_str(m, field::SOURCE), "deals");
    assert_eq!(field_str(m, field::WIDGET_KEY), "deals.top-picks");
    assert_eq!(field_str(m, field::WIDGET_TYPE), "carousel");
    assert_eq!(field_str(m, field::DATA_VERSION), "42");
    assert_eq!(field_str(m, field::OP), "upsert");
    let content: serde_json::Value =
        serde_json::from_str(&field_str(m, field::CONTENT)).expect("content is JSON");
    assert_eq!(content, json!({"items": ["a", "b"]}));
    let produced: i64 = field_str(m, field::PRODUCED_AT_US).parse().expect("micros");
    let now_us = widget_runtime::stats::unix_ms() * 1000;
    assert!(
        (now_us - produced).abs() < 60_000_000,
        "produced_at is the insert time: {produced}"
    );
    assert_eq!(
        outbox_rows(&pool).await,
        0,
        "published rows leave the backlog"
    );
    assert!(worker.readiness.is_ready());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_grows_the_backlog_and_loses_nothing() {
    let mut stack = Stack::start().await;
    let pool = stack.pool(&stack.product_url).await;
    let stream = stack.config.stream_name();
    let worker = spawn_worker(&stack, "deals");

    let first: Vec<WidgetEvent> = (1..=20).map(deal).collect();
    enqueue(&pool, &first).await;
    wait_for_distinct(&stack, &stream, 20).await;

    stack.redis.stop().await;
    let mut written = 20;
    for batch in 0..5 {
        let events: Vec<WidgetEvent> = (0..10).map(|i| deal(21 + batch * 10 + i)).collect();
        enqueue(&pool, &events).await;
        written += 10;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The backlog holds every row written during the outage, and the worker is still running.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(outbox_rows(&pool).await, 50);
    assert!(
        !worker.task.is_finished(),
        "the worker stays up while Redis is down"
    );
    assert!(
        !worker.readiness.is_ready(),
        "not ready while Redis is down"
    );
    assert!(worker.readiness.failing().contains_key("redis"));

    stack.redis.start_again().await.expect("redis restarts");
    let entries = wait_for_distinct(&stack, &stream, written).await;
    let ids = outbox_ids(&entries);
    // Per-worker order: first appearances of outbox ids are increasing.
    let mut seen = BTreeSet::new();
    let firsts: Vec<i64> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
    let mut sorted = firsts.clone();
    sorted.sort();
    assert_eq!(firsts, sorted, "events arrive in outbox order");
    assert_eq!(seen.len(), written);
    assert_eq!(
        eventually(WAIT, || async {
            (outbox_rows(&pool).await == 0).then_some(())
        })
        .await,
        Some(())
    );
    assert!(
        eventually(WAIT, || async { worker.readiness.is_ready().then_some(()) })
            .await
            .is_some()
    );
    let moved: i64 = sqlx::query_scalar("SELECT count(*) FROM widget_outbox_dead")
        .fetch_one(&pool)
        .await
        .expect("dead table");
    assert_eq!(moved, 0, "Redis being down moves nothing aside");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_and_concurrent_producers_publish_every_row() {
    let stack = Stack::start().await;
    let pool = stack.pool(&stack.product_url).await;
    let stream = stack.config.stream_name();
    let a = spawn_worker(&stack, "deals");
    let b = spawn_worker(&stack, "deals");

    let producers: Vec<_> = (0..4)
        .map(|p| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for batch in 0..25 {
                    let events: Vec<WidgetEvent> = (0..10)
                        .map(|i| deal(p * 1000 + batch * 10 + i + 1))
                        .collect();
                    ids.extend(enqueue(&pool, &events).await);
                }
                ids
            })
        })
        .collect();
    let mut all_ids = BTreeSet::new();
    for p in producers {
        all_ids.extend(p.await.expect("producer"));
    }
    assert_eq!(all_ids.len(), 1000);

    let entries = wait_for_distinct(&stack, &stream, 1000).await;
    let published: BTreeSet<i64> = outbox_ids(&entries).into_iter().collect();
    assert_eq!(published, all_ids, "every committed row is published");
    assert_eq!(
        eventually(WAIT, || async {
            (outbox_rows(&pool).await == 0).then_some(())
        })
        .await,
        Some(())
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_xadd_and_commit_publishes_the_rows_again() {
    let stack = Stack::start().await;
    let pool = stack.pool(&stack.product_url).await;
    let stream = stack.config.stream_name();

    // Stall the UPDATE of any row (marking it published), so the worker is stuck right
    // after its XADD; the
    // server notices the killed client within 100 ms and rolls its transaction back.
    for sql in [
        "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(120); RETURN NULL; END $$",
        "CREATE TRIGGER stall BEFORE UPDATE ON widget_outbox FOR EACH ROW EXECUTE FUNCTION stall()",
        "ALTER DATABASE product SET client_connection_check_interval = '100ms'",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    let events: Vec<WidgetEvent> = (1..=5).map(deal).collect();
    let ids: BTreeSet<i64> = enqueue(&pool, &events).await.into_iter().collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, stack.config.to_yaml()).expect("write config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_widget-runtime"))
        .args([
            "outbox-worker",
            "--source",
            "deals",
            "--admin-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&config_path)
        .env("REDIS_URL", stack.redis.url())
        .env("SOURCE_DATABASE_URL", &stack.product_url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn widget-runtime");

    wait_for_distinct(&stack, &stream, 5).await;
    child.kill().await.expect("kill the worker mid-batch");
    // Dropping the trigger waits for the killed worker's transaction to be rolled back.
    sqlx::query("DROP TRIGGER stall ON widget_outbox")
        .execute(&pool)
        .await
        .expect("drop trigger");
    assert_eq!(
        outbox_rows(&pool).await,
        5,
        "the killed worker marked nothing published"
    );

    let worker = spawn_worker(&stack, "deals");
    let conn = stack.redis_conn().await;
    let entries = eventually(WAIT, || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move {
            let e = read_stream(&mut conn, &stream).await;
            (e.len() >= 10).then_some(e)
        }
    })
    .await
    .expect("the rows are published again");
    let published = outbox_ids(&entries);
    assert_eq!(published.iter().copied().collect::<BTreeSet<_>>(), ids);
    for id in &ids {
        assert_eq!(
            published.iter().filter(|p| *p == id).count(),
            2,
            "id {id} published twice"
        );
    }
    assert_eq!(
        eventually(WAIT, || async {
            (outbox_rows(&pool).await == 0).then_some(())
        })
        .await,
        Some(())
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_worker_long_before_the_poll() {
    let stack =
        Stack::with_config("pipeline: test\nsources: [{name: deals, pollInterval: 1h}]\n").await;
    let pool = stack.pool(&stack.product_url).await;
    let worker = spawn_worker(&stack, "deals");
    // Let the worker finish its first (empty) pass and go to sleep for the hour.
    assert!(
        eventually(WAIT, || async { worker.readiness.is_ready().then_some(()) })
            .await
            .is_some()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    enqueue(&pool, &[deal(1)]).await;
    wait_for_distinct(&stack, &stack.config.stream_name(), 1).await;
    worker.stop().await;
}

/// 1500 rows through a stream capped at 1000 (pause at 900) while a consumer works through it:
/// relaying pauses at the limit, resumes as the consumer acknowledges, and trims only what the
/// group has finished.
async fn backpressure_round(ignore_lag: bool) {
    let stack = Stack::with_config(
        "pipeline: test\nstream: {maxLength: 1000}\nsources: [{name: deals, batchSize: 100, pollInterval: 50ms}]\n",
    )
    .await;
    let pool = stack.pool(&stack.product_url).await;
    let stream = stack.config.stream_name();
    let group = &stack.config.stream.consumer_group;
    let mut conn = stack.redis_conn().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .expect("create group");
    for chunk in 0..15 {
        let events: Vec<WidgetEvent> = (1..=100).map(|i| deal(chunk * 100 + i)).collect();
        enqueue(&pool, &events).await;
    }
    let worker = spawn_worker_with(&stack, "deals", |s| s.ignore_lag = ignore_lag);

    // The limit is maxLength - batchSize = 900 unread entries: relaying stops there.
    let len = eventually(WAIT, || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move {
            let len: u64 = redis::cmd("XLEN")
                .arg(&stream)
                .query_async(&mut conn)
                .await
                .ok()?;
            (len >= 900).then_some(len)
        }
    })
    .await
    .expect("the stream fills up to the limit");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let len_later: u64 = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .expect("xlen");
    assert_eq!(len, 900);
    assert_eq!(len_later, 900, "relaying paused at the limit");
    assert_eq!(
        outbox_rows(&pool).await,
        600,
        "the rest waits in the outbox"
    );

    // A consumer works through the stream; relaying resumes and consumed history is trimmed,
    // never an unread entry.
    let mut consumed = BTreeSet::new();
    let give_up = Instant::now() + WAIT;
    while consumed.len() < 1500 {
        assert!(
            Instant::now() < give_up,
            "relaying stalled: {} of 1500 consumed (ignore_lag: {ignore_lag})",
            consumed.len()
        );
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("c1")
            .arg("COUNT")
            .arg(200)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .expect("xreadgroup");
        let mut ack = Vec::new();
        for key in reply.keys {
            for e in key.ids {
                let id: i64 = field_str(&e.map, field::EVENT_ID)
                    .rsplit(':')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("id");
                consumed.insert(id);
                ack.push(e.id);
            }
        }
        if !ack.is_empty() {
            let _: u64 = redis::cmd("XACK")
                .arg(&stream)
                .arg(group)
                .arg(&ack)
                .query_async(&mut conn)
                .await
                .expect("ack");
        }
        assert!(!worker.task.is_finished(), "worker is running");
    }
    assert_eq!(
        consumed.len(),
        1500,
        "every event reached the group, none was trimmed unread"
    );
    assert_eq!(outbox_rows(&pool).await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_stops_relaying_instead_of_trimming_unread_entries() {
    backpressure_round(false).await;
}

// Redis 6.2 reports no lag: the stream length is the only bound, and consumed history is trimmed
// at the pause threshold, so a stream that reached it does not stay paused for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reported_lag_relaying_pauses_and_resumes_and_never_stalls() {
    backpressure_round(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_are_rejected_with_a_typed_error_and_nothing_is_written() {
    let stack = Stack::start().await;
    let pool = stack.pool(&stack.product_url).await;
    let mut tx = pool.begin().await.expect("begin");
    let bad = WidgetEvent::upsert("no-namespace", "card", 1, json!({}));
    let err = Outbox::enqueue_all(&mut tx, &[deal(1), bad])
        .await
        .expect_err("invalid key");
    match &err {
        OutboxError::Invalid {
            index: 1,
            source: EventError::Key { .. },
        } => {}
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("event 1 is invalid"), "{err}");
    let zero = WidgetEvent::upsert("deals.x", "card", 0, json!({}));
    let err = Outbox::enqueue(&mut tx, &zero)
        .await
        .expect_err("version 0");
    assert!(
        err.to_string()
            .contains("data_version must be greater than zero"),
        "{err}"
    );
    tx.commit().await.expect("commit");
    assert_eq!(
        outbox_rows(&pool).await,
        0,
        "a batch with one bad event writes nothing"
    );
    assert!(Outbox::with_table("x; drop table y").is_err());
}

#[tokio::test]
async fn bad_config_fails_start_up_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |yaml: &str, source: &str| {
        let path = dir.path().join(format!("{source}.yaml"));
        std::fs::write(&path, yaml).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_widget-runtime"))
            .args([
                "outbox-worker",
                "--admin-listen",
                "127.0.0.1:0",
                "--source",
                source,
                "--config",
            ])
            .arg(&path)
            .env("REDIS_URL", "redis://127.0.0.1:1/")
            .env("SOURCE_DATABASE_URL", "postgres://127.0.0.1:1/x")
            .output()
            .expect("run");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(
        "pipeline: home\nsources: [{name: deals, batchsize: 5}]\n",
        "deals",
    );
    assert!(e.contains("unknown field `batchsize`"), "{e}");
    let e = run(
        "pipeline: home\nsources: [{name: deals, pollInterval: fast}]\n",
        "a",
    );
    assert!(e.contains("`fast` is not a duration"), "{e}");
    let e = run("pipeline: home\nsources: [{name: deals}]\n", "loyalty");
    assert!(e.contains("source `loyalty` is not in the config"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn product_database_outage_is_waited_out() {
    let mut stack = Stack::start().await;
    let stream = stack.config.stream_name();
    let worker = spawn_worker(&stack, "deals");
    {
        let pool = stack.pool(&stack.product_url).await;
        enqueue(&pool, &[deal(1)]).await;
        pool.close().await;
    }
    wait_for_distinct(&stack, &stream, 1).await;

    stack.pg.stop().await;
    assert!(
        eventually(WAIT, || async {
            worker
                .readiness
                .failing()
                .contains_key("database")
                .then_some(())
        })
        .await
        .is_some(),
        "not ready while the product database is down"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !worker.task.is_finished(),
        "the worker stays up while Postgres is down"
    );

    stack.pg.start_again().await.expect("postgres restarts");
    let pool = stack.pool(&stack.product_url).await;
    enqueue(&pool, &[deal(2), deal(3)]).await;
    wait_for_distinct(&stack, &stream, 3).await;
    assert!(
        eventually(WAIT, || async { worker.readiness.is_ready().then_some(()) })
            .await
            .is_some()
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_binary_serves_health_and_metrics_and_stops_on_sigterm() {
    let mut stack = Stack::start().await;
    // The test servers trust every login, so the password is ignored by Postgres: it is there
    // only to be looked for in everything the process writes.
    const SENTINEL: &str = "leak-sentinel-9f3";
    let secret_url = stack.product_url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{SENTINEL}@"),
        1,
    );
    assert_ne!(
        secret_url, stack.product_url,
        "the URL carries the password"
    );
    let pool = stack.pool(&stack.product_url).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let admin = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, stack.config.to_yaml()).expect("write config");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_widget-runtime"))
        .args([
            "--log-format",
            "json",
            "outbox-worker",
            "--source",
            "deals",
            "--admin-listen",
            &admin,
            "--config",
        ])
        .arg(&config_path)
        .env("REDIS_URL", stack.redis.url())
        .env("SOURCE_DATABASE_URL", &secret_url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn widget-runtime");

    let ready = eventually(WAIT, || async {
        http_get(&admin, "/readyz", &[])
            .await
            .filter(|r| r.status == 200)
    })
    .await;
    assert!(
        ready.is_some(),
        "/readyz turns 200 once Redis and Postgres answer"
    );
    assert_eq!(
        http_get(&admin, "/healthz", &[]).await.map(|r| r.status),
        Some(200)
    );
    enqueue(&pool, &[deal(1), deal(2)]).await;
    wait_for_distinct(&stack, &stack.config.stream_name(), 2).await;
    // The counter moves when the batch's transaction commits, a moment after the XADD.
    let published = eventually(WAIT, || async {
        http_get(&admin, "/metrics", &[]).await.filter(|m| {
            m.status == 200
                && m.body
                    .contains(r#"widget_outbox_published_total{source="deals"} 2"#)
        })
    })
    .await;
    let body = match published {
        Some(m) => m.body,
        None => panic!(
            "published_total reaches 2: {:?}",
            http_get(&admin, "/metrics", &[]).await.map(|m| m.body)
        ),
    };
    assert!(
        body.contains("widget_outbox_backlog{source=\"deals\"}"),
        "{body}"
    );
    assert!(
        body.contains("widget_outbox_batch_duration_seconds_bucket"),
        "{body}"
    );

    // Postgres down for a moment: connection errors are logged and reported on /readyz.
    stack.pg.stop().await;
    let not_ready = eventually(WAIT, || async {
        http_get(&admin, "/readyz", &[])
            .await
            .filter(|r| r.status == 503)
    })
    .await
    .expect("/readyz turns 503 while Postgres is down");
    assert!(!not_ready.body.contains(SENTINEL), "{}", not_ready.body);
    stack.pg.start_again().await.expect("postgres restarts");
    let ready_again = eventually(WAIT, || async {
        http_get(&admin, "/readyz", &[])
            .await
            .filter(|r| r.status == 200)
    })
    .await;
    assert!(ready_again.is_some(), "ready again after Postgres returns");

    let pid = child.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("exits")
        .expect("output");
    assert!(out.status.success(), "graceful exit: {:?}", out.status);
    let logs = String::from_utf8_lossy(&out.stdout);
    assert!(
        logs.lines()
            .any(|l| l.starts_with('{') && l.contains("outbox-worker stopped")),
        "{logs}"
    );
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("database"), "the outage was logged: {logs}");
    assert!(
        !logs.contains(SENTINEL) && !errors.contains(SENTINEL),
        "secrets are never logged:\n{logs}\n{errors}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_table_named_after_a_reserved_word_works() {
    let stack = Stack::with_config(
        "pipeline: test\nsources: [{name: deals, outboxTable: order, pollInterval: 50ms}]\n",
    )
    .await;
    let pool = stack.pool(&stack.product_url).await;
    sqlx::query(r#"CREATE TABLE "order" (LIKE widget_outbox INCLUDING ALL)"#)
        .execute(&pool)
        .await
        .expect("create table order");
    let outbox = Outbox::with_table("order").expect("a valid identifier");
    let mut tx = pool.begin().await.expect("begin");
    outbox
        .push_all(&mut tx, &[deal(1), deal(2), deal(3)])
        .await
        .expect("insert into \"order\"");
    tx.commit().await.expect("commit");

    let worker = spawn_worker(&stack, "deals");
    wait_for_distinct(&stack, &stack.config.stream_name(), 3).await;
    // The rows are marked published when the relay's transaction commits, just after XADD.
    let left = testkit::eventually(Duration::from_secs(10), || async {
        let n: i64 =
            sqlx::query_scalar(r#"SELECT count(*) FROM "order" WHERE published_at IS NULL"#)
                .fetch_one(&pool)
                .await
                .ok()?;
        (n == 0).then_some(n)
    })
    .await;
    assert_eq!(left, Some(0), "relayed rows leave the backlog");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_one_pipeline_arrives_whole_and_in_order() {
    let stack = Stack::start().await;
    let pool = stack.pool(&stack.product_url).await;
    // 80 widgets of ~60 KB: about 4.8 MB in one claimed batch, more than one pipeline (4 MiB).
    let big: Vec<WidgetEvent> = (1..=80)
        .map(|n| {
            WidgetEvent::upsert(
                format!("deals.big-{n}"),
                "deal-card",
                n,
                json!({"blob": "x".repeat(60_000)}),
            )
        })
        .collect();
    let ids = enqueue(&pool, &big).await;
    let worker = spawn_worker(&stack, "deals");
    let entries = wait_for_distinct(&stack, &stack.config.stream_name(), 80).await;
    assert_eq!(outbox_ids(&entries), ids, "every row once, in outbox order");
    assert_eq!(
        eventually(WAIT, || async {
            (outbox_rows(&pool).await == 0).then_some(())
        })
        .await,
        Some(()),
        "all rows relayed"
    );
    worker.stop().await;
}

/// A row Redis refuses (here larger than its `proto-max-bulk-len`, as managed services set it)
/// is moved aside to `widget_outbox_dead` with its reason after a few refusals, counted, and the
/// rows behind it are relayed. Redis being down is not a refusal (see the outage test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_redis_refuses_is_moved_aside_and_the_rest_is_relayed() {
    let stack = Stack::start().await;
    let pool = stack.pool(&stack.product_url).await;
    let mut conn = stack.redis_conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("proto-max-bulk-len")
        .arg("1mb")
        .query_async(&mut conn)
        .await
        .expect("config set");
    // Written around the library (it would refuse content over 64 KiB).
    sqlx::query(
        "INSERT INTO widget_outbox (widget_key, widget_type, data_version, op, content)
         VALUES ('deals.huge', 'card', 1, 'upsert', jsonb_build_object('blob', repeat('x', 1200000)))",
    )
    .execute(&pool)
    .await
    .expect("huge row");
    let behind: Vec<WidgetEvent> = (1..=20).map(deal).collect();
    enqueue(&pool, &behind).await;
    let worker = spawn_worker(&stack, "deals");
    let started = std::time::Instant::now();
    let entries = wait_for_distinct(&stack, &stack.config.stream_name(), 20).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the rows behind it are relayed within seconds ({:?})",
        started.elapsed()
    );
    assert!(
        outbox_ids(&entries).len() >= 20,
        "all 20 rows behind the huge one are in the stream"
    );
    let moved = eventually(WAIT, || async {
        sqlx::query_as::<_, (String, String)>("SELECT widget_key, reason FROM widget_outbox_dead")
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
    })
    .await
    .expect("the refused row is moved aside");
    assert_eq!(moved.0, "deals.huge");
    assert!(moved.1.contains("Redis refused"), "{}", moved.1);
    assert_eq!(outbox_rows(&pool).await, 0, "nothing is left unpublished");
    worker.stop().await;
}
