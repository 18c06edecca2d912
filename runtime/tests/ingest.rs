//! The core-ingester against real Postgres and Redis servers (see `testkit`).
//!
//! Every test starts its own servers (`support::Stack`) with short reclaim settings
//! (minIdle 300ms, interval 200ms, maxDeliveries 3) unless it says otherwise.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use sqlx::PgPool;
use support::{Stack, field_str, metric_value, read_stream};
use testkit::eventually;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use widget_runtime::admin::Readiness;
use widget_runtime::cache::{self, Cache, CacheWrite, Cached};
use widget_runtime::config::Config;
use widget_runtime::event::Op;
use widget_runtime::ingest::{IngestError, Ingester, consumer, consumers};
use widget_runtime::stats;
use widget_runtime::stream::StreamEvent;

const WAIT: Duration = Duration::from_secs(20);

/// A running ingester with its metrics registry and readiness.
struct Running {
    cancel: CancellationToken,
    handle: JoinHandle<Result<(), IngestError>>,
    registry: Registry,
    readiness: Readiness,
}

impl Running {
    fn start(stack: &Stack, consumer: &str, batch_size: usize) -> Self {
        Self::start_with(stack, consumer, batch_size, |i| i)
    }

    /// Like `start`, with `tune` adjusting the ingester before it runs.
    fn start_with(
        stack: &Stack,
        consumer: &str,
        batch_size: usize,
        tune: impl FnOnce(Ingester) -> Ingester,
    ) -> Self {
        let mut registry = Registry::default();
        let readiness = Readiness::default();
        let ingester = Ingester::new(
            &stack.config,
            consumer.to_string(),
            stack.redis_client(),
            stack.lazy_pool(&stack.core_url),
            &mut registry,
            readiness.clone(),
        )
        .with_stats_interval(Duration::from_millis(100))
        .with_batch_size(batch_size);
        let ingester = tune(ingester);
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(ingester.run(cancel.clone()));
        Running {
            cancel,
            handle,
            registry,
            readiness,
        }
    }

    /// A sample's value from the /metrics text, 0 if absent. `name` includes any labels.
    fn metric(&self, name: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        metric_value(&text, name).unwrap_or(0.0)
    }

    /// The metric's value once it reaches `want` (counters move just after the Redis or
    /// Postgres step a test waits on), or its value after a few seconds if it never does.
    async fn settled_metric(&self, name: &str, want: f64) -> f64 {
        eventually(Duration::from_secs(5), || async {
            (self.metric(name) == want).then_some(())
        })
        .await;
        self.metric(name)
    }

    async fn stop(self) {
        self.cancel.cancel();
        let outcome = tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("ingester stops within 10 s of cancel")
            .expect("ingester task does not panic");
        assert!(outcome.is_ok(), "ingester ended with {outcome:?}");
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn content(key: &str, version: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"key": key, "v": version})).expect("json")
}

fn event(source: &str, key: &str, version: i64, op: Op) -> StreamEvent {
    StreamEvent {
        event_id: format!("{source}:{version}"),
        source: source.into(),
        widget_key: key.into(),
        widget_type: "card".into(),
        data_version: version,
        op,
        content: (op == Op::Upsert).then(|| content(key, version)),
        produced_at_us: now_us(),
    }
}

async fn xadd(conn: &mut MultiplexedConnection, stream: &str, ev: &StreamEvent) -> String {
    conn.xadd(stream, "*", &ev.to_fields()).await.expect("xadd")
}

async fn xadd_raw(
    conn: &mut MultiplexedConnection,
    stream: &str,
    fields: &[(&str, &str)],
) -> String {
    conn.xadd(stream, "*", fields).await.expect("xadd")
}

/// (data_version, deleted, content) of a stored widget.
async fn stored(pool: &PgPool, key: &str) -> Option<(i64, bool, Option<serde_json::Value>)> {
    sqlx::query_as("SELECT data_version, deleted, content FROM widgets WHERE widget_key = $1")
        .bind(key)
        .fetch_optional(pool)
        .await
        .expect("select widget")
}

async fn cached(conn: &mut MultiplexedConnection, cache: &Cache, key: &str) -> Option<Vec<u8>> {
    conn.get(cache.key(key)).await.expect("get cache")
}

/// (pending, lag) of the consumer group; lag `None` when Redis cannot tell.
async fn group_state(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Option<(usize, Option<usize>, usize)> {
    let info: redis::streams::StreamInfoGroupsReply = conn.xinfo_groups(stream).await.ok()?;
    info.groups
        .into_iter()
        .find(|g| g.name == group)
        .map(|g| (g.pending, g.lag, g.entries_read.unwrap_or(0)))
}

/// Waits until the group has read everything and acknowledged it all.
async fn wait_drained(conn: &mut MultiplexedConnection, config: &Config) {
    let (stream, group) = (config.stream_name(), config.stream.consumer_group.clone());
    let drained = eventually(WAIT, || {
        let (mut c, stream, group) = (conn.clone(), stream.clone(), group.clone());
        async move {
            match group_state(&mut c, &stream, &group).await {
                Some((0, Some(0), _)) => Some(()),
                _ => None,
            }
        }
    })
    .await;
    let state = group_state(conn, &stream, &group).await;
    assert!(drained.is_some(), "group never drained: {state:?}");
}

/// Waits until the pipeline's stats hash holds `expected` (field, value) pairs; false on timeout.
async fn stats_reach(
    conn: &MultiplexedConnection,
    config: &Config,
    expected: &[(&str, i64)],
) -> bool {
    eventually(WAIT, || {
        let (mut c, key) = (conn.clone(), config.stats_key());
        async move {
            for (field, want) in expected {
                let v: Option<i64> = c.hget(&key, *field).await.ok()?;
                if v.unwrap_or(0) != *want {
                    return None;
                }
            }
            Some(())
        }
    })
    .await
    .is_some()
}

// 1 -------------------------------------------------------------------------------------------

#[tokio::test]
async fn duplicates_and_reordering_through_two_replicas_end_at_the_newest() {
    let stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    let a = Running::start(&stack, "replica-a", 4);
    let b = Running::start(&stack, "replica-b", 4);
    // Both replicas are ready (connected, first reclaim pass done) and so blocked on
    // XREADGROUP before anything is added. (Redis 7.0 lists a consumer only once it got entries.)
    let both_ready = eventually(WAIT, || {
        let (ra, rb) = (a.readiness.clone(), b.readiness.clone());
        async move { (ra.is_ready() && rb.is_ready()).then_some(()) }
    })
    .await;
    assert!(both_ready.is_some(), "both replicas ready");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let keys: Vec<String> = (0..40).map(|i| format!("deals.dup-{i}")).collect();
    for version in [3, 1, 2, 3] {
        for key in &keys {
            xadd(
                &mut conn,
                &stream,
                &event("deals", key, version, Op::Upsert),
            )
            .await;
        }
    }
    wait_drained(&mut conn, &stack.config).await;

    let pool = stack.pool(&stack.core_url).await;
    let cache = Cache::new(stack.config.key_prefix());
    for key in &keys {
        let (version, deleted, body) = stored(&pool, key).await.expect("row exists");
        assert_eq!((version, deleted), (3, false), "{key}");
        assert_eq!(body, Some(serde_json::json!({"key": key, "v": 3})), "{key}");
        let want = cache::encode_value(
            3,
            Some(&cache::widget_json(key, "card", 3, &content(key, 3))),
        );
        assert_eq!(cached(&mut conn, &cache, key).await, Some(want), "{key}");
    }
    let handled = |r: &Running| {
        r.metric("widget_ingest_applied_total") + r.metric("widget_ingest_stale_total")
    };
    // Counters move just after the writes this test waited on: let them settle.
    let settled = eventually(Duration::from_secs(5), || async {
        (handled(&a) + handled(&b) >= 160.0).then_some(())
    })
    .await;
    assert!(settled.is_some(), "160 entries handled in all");
    assert!(
        handled(&a) > 0.0 && handled(&b) > 0.0,
        "both replicas took part: a={} b={}",
        handled(&a),
        handled(&b)
    );
    assert!(handled(&a) + handled(&b) >= 160.0);
    let applied = a.metric("widget_ingest_applied_total") + b.metric("widget_ingest_applied_total");
    assert!(
        applied >= 40.0,
        "every key was applied at least once: {applied}"
    );
    assert!(
        read_stream(&mut conn, &stack.config.dead_letter_stream())
            .await
            .is_empty()
    );
    a.stop().await;
    b.stop().await;
}

// 2 -------------------------------------------------------------------------------------------

#[tokio::test]
async fn cache_writes_never_leave_an_older_version_whatever_the_interleaving() {
    let stack = Stack::start().await;
    let cache = Cache::new("hw:race:");
    let ttl = Duration::from_secs(600);
    let mut conn = stack.redis_conn().await;

    // Deterministic old-after-new sequences.
    let v5 = cache::widget_json("deals.a", "card", 5, b"{\"n\":5}");
    let v3 = cache::widget_json("deals.a", "card", 3, b"{\"n\":3}");
    let w = |version, json| CacheWrite {
        widget_key: "deals.a",
        version,
        json,
        ttl,
    };
    assert_eq!(
        cache
            .write_many(&mut conn, &[w(5, Some(&v5))])
            .await
            .expect("w"),
        [true]
    );
    assert_eq!(
        cache
            .write_many(&mut conn, &[w(3, Some(&v3))])
            .await
            .expect("w"),
        [false]
    );
    let raw = cached(&mut conn, &cache, "deals.a").await.expect("present");
    assert_eq!(
        cache::decode_value(&raw),
        Some(Cached::Widget {
            version: 5,
            json: &v5
        })
    );
    // A tombstone, then a late older upsert: stays deleted.
    assert_eq!(
        cache.write_many(&mut conn, &[w(7, None)]).await.expect("w"),
        [true]
    );
    assert_eq!(
        cache
            .write_many(&mut conn, &[w(6, Some(&v5))])
            .await
            .expect("w"),
        [false]
    );
    let raw = cached(&mut conn, &cache, "deals.a").await.expect("present");
    assert_eq!(
        cache::decode_value(&raw),
        Some(Cached::Deleted { version: 7 })
    );
    // Larger than 2^53: compared exactly.
    let big = (1i64 << 60) + 1;
    cache
        .write_many(&mut conn, &[w(big, Some(&v5))])
        .await
        .expect("w");
    assert_eq!(
        cache
            .write_many(&mut conn, &[w(big - 1, Some(&v3))])
            .await
            .expect("w"),
        [false]
    );

    // Forced interleaving: 8 writers on their own connections released together by a barrier,
    // every round each writes a different version of the same 20 keys, in its own key order.
    const WRITERS: usize = 8;
    const ROUNDS: i64 = 40;
    let keys: Arc<Vec<String>> = Arc::new((0..20).map(|i| format!("deals.race-{i}")).collect());
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS + 1));
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let mut c = stack.redis_conn().await;
        let (cache, keys, barrier) = (cache.clone(), keys.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                // Writer order differs per round so old and new versions race both ways.
                let version =
                    round * WRITERS as i64 + ((writer as i64 * 3 + round) % WRITERS as i64) + 1;
                let jsons: Vec<Vec<u8>> = keys
                    .iter()
                    .map(|k| cache::widget_json(k, "card", version, b"{}"))
                    .collect();
                let mut writes: Vec<CacheWrite<'_>> = keys
                    .iter()
                    .zip(&jsons)
                    .map(|(k, j)| CacheWrite {
                        widget_key: k,
                        version,
                        json: Some(j),
                        ttl,
                    })
                    .collect();
                if writer % 2 == 1 {
                    writes.reverse();
                }
                barrier.wait().await;
                cache.write_many(&mut c, &writes).await.expect("write");
                barrier.wait().await;
            }
        }));
    }
    for round in 0..ROUNDS {
        barrier.wait().await;
        barrier.wait().await; // every writer of this round is done
        let newest = (round + 1) * WRITERS as i64;
        for key in keys.iter() {
            let raw = cached(&mut conn, &cache, key).await.expect("present");
            match cache::decode_value(&raw) {
                Some(Cached::Widget { version, .. }) => {
                    assert_eq!(
                        version, newest,
                        "round {round}: {key} holds an older version"
                    )
                }
                other => panic!("round {round}: {key} holds {other:?}"),
            }
        }
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

// 3 -------------------------------------------------------------------------------------------

#[tokio::test]
async fn entries_of_a_consumer_that_died_before_ack_are_reclaimed_and_applied() {
    let stack = Stack::start().await;
    let (mut conn, stream, group) = with_group(&stack).await;
    let keys: Vec<String> = (0..20).map(|i| format!("deals.crash-{i}")).collect();
    for key in &keys {
        xadd(&mut conn, &stream, &event("deals", key, 1, Op::Upsert)).await;
    }
    // The "crashed" replica reads the batch and dies before ACK.
    let taken = consumer::read_new(
        &mut conn,
        &stream,
        &group,
        "crashed-pod",
        100,
        Duration::from_millis(100),
    )
    .await
    .expect("read");
    let read_at = Instant::now();
    assert_eq!(taken.len(), 20);

    let survivor = Running::start(&stack, "survivor", 100);
    let pool = stack.pool(&stack.core_url).await;
    let count = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM widgets")
            .fetch_one(&pool)
            .await
            .expect("count")
    };
    tokio::time::sleep(Duration::from_millis(150).saturating_sub(read_at.elapsed())).await;
    if read_at.elapsed() < Duration::from_millis(250) {
        // Still younger than minIdle (300 ms): nobody may take the entries yet.
        assert_eq!(
            count(pool.clone()).await,
            0,
            "applied before minIdle passed"
        );
    }
    let all = eventually(WAIT, || {
        let p = pool.clone();
        async move { (count(p).await == 20).then_some(()) }
    })
    .await;
    assert!(all.is_some(), "reclaimed entries were applied");
    wait_drained(&mut conn, &stack.config).await;
    let cache = Cache::new(stack.config.key_prefix());
    for key in &keys {
        assert!(
            cached(&mut conn, &cache, key).await.is_some(),
            "{key} cached"
        );
    }
    assert_eq!(
        survivor
            .settled_metric("widget_ingest_reclaimed_total", 20.0)
            .await,
        20.0
    );
    assert_eq!(
        survivor
            .settled_metric("widget_ingest_applied_total", 20.0)
            .await,
        20.0
    );
    // The counters reach the pipeline's stats hash for the operator.
    let expected = [(stats::field::RECLAIMED, 20), (stats::field::APPLIED, 20)];
    assert!(
        stats_reach(&conn, &stack.config, &expected).await,
        "reclaimed and applied totals in the stats hash"
    );
    let p50: Option<i64> = conn
        .hget(stack.config.stats_key(), stats::field::INGRESS_LAG_P50_MS)
        .await
        .expect("hget");
    assert!(p50.is_some(), "ingress lag flushed");
    survivor.stop().await;
}

/// A connection, the stream and its consumer group, created before any ingester runs.
async fn with_group(stack: &Stack) -> (MultiplexedConnection, String, String) {
    let mut conn = stack.redis_conn().await;
    let (stream, group) = (
        stack.config.stream_name(),
        stack.config.stream.consumer_group.clone(),
    );
    widget_runtime::durability::ensure_epoch(
        &mut conn,
        &stack.config.epoch_key(),
        &stream,
        &group,
        None,
    )
    .await
    .expect("group");
    (conn, stream, group)
}

/// Consumer names and pending counts, from XINFO CONSUMERS.
async fn consumers_of(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Vec<(String, i64)> {
    let infos: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .expect("xinfo consumers");
    let mut out: Vec<(String, i64)> = infos
        .into_iter()
        .map(|info| {
            let name = redis::from_redis_value_ref::<String>(&info["name"]).expect("name");
            let pending = redis::from_redis_value_ref::<i64>(&info["pending"]).expect("pending");
            (name, pending)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn removing_idle_consumers_spares_those_with_pending_entries() {
    let stack = Stack::start().await;
    let (mut conn, stream, group) = with_group(&stack).await;
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.a", 1, Op::Upsert),
    )
    .await;
    for name in ["gone-empty", "me"] {
        let _: i64 = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(&stream)
            .arg(&group)
            .arg(name)
            .query_async(&mut conn)
            .await
            .expect("create consumer");
    }
    let taken = consumer::read_new(
        &mut conn,
        &stream,
        &group,
        "gone-holding",
        10,
        Duration::from_millis(10),
    )
    .await
    .expect("read");
    assert_eq!(taken.len(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Not idle long enough yet: nobody goes.
    let removed = consumers::remove_idle(&mut conn, &stream, &group, "me", 60_000)
        .await
        .expect("remove");
    assert!(removed.is_empty(), "{removed:?}");
    // Idle enough: the empty one goes; the one holding an entry and the caller stay.
    let removed = consumers::remove_idle(&mut conn, &stream, &group, "me", 50)
        .await
        .expect("remove");
    assert_eq!(removed, vec!["gone-empty".to_string()]);
    assert_eq!(
        consumers_of(&mut conn, &stream, &group).await,
        vec![("gone-holding".to_string(), 1), ("me".to_string(), 0)]
    );
}

#[tokio::test]
async fn a_dead_consumer_is_removed_from_the_group_once_its_entries_are_reclaimed() {
    let stack = Stack::start().await;
    let (mut conn, stream, group) = with_group(&stack).await;
    for i in 0..5 {
        xadd(
            &mut conn,
            &stream,
            &event("deals", &format!("deals.d-{i}"), 1, Op::Upsert),
        )
        .await;
    }
    // A pod reads and is gone for good (a rollout replaced it under a new name).
    let taken = consumer::read_new(
        &mut conn,
        &stream,
        &group,
        "old-pod",
        10,
        Duration::from_millis(10),
    )
    .await
    .expect("read");
    assert_eq!(taken.len(), 5);

    let live = Running::start_with(&stack, "new-pod", 100, |i| {
        i.with_idle_consumer_ttl(Duration::from_millis(500))
    });
    let gone = eventually(WAIT, || {
        let (mut c, stream, group) = (conn.clone(), stream.clone(), group.clone());
        async move {
            let names = consumers_of(&mut c, &stream, &group).await;
            (names == vec![("new-pod".to_string(), 0)]).then_some(())
        }
    })
    .await;
    assert!(
        gone.is_some(),
        "only the live consumer is left: {:?}",
        consumers_of(&mut conn, &stream, &group).await
    );
    // Its entries were not lost with it: reclaimed and applied first.
    assert_eq!(
        live.settled_metric("widget_ingest_reclaimed_total", 5.0)
            .await,
        5.0
    );
    assert_eq!(
        live.settled_metric("widget_ingest_applied_total", 5.0)
            .await,
        5.0
    );
    assert_eq!(
        live.settled_metric("widget_ingest_consumers_removed_total", 1.0)
            .await,
        1.0
    );
    live.stop().await;
}

// 4 -------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_entry_with_thousands_of_fields_is_dead_lettered_not_stuck() {
    let stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    // More values than Lua's unpack takes: copying them all would fail the dead-letter script.
    let fields: Vec<(String, String)> = (0..5000).map(|i| (format!("f{i}"), "x".into())).collect();
    let huge: String = conn.xadd(&stream, "*", &fields).await.expect("xadd");
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.after-huge", 1, Op::Upsert),
    )
    .await;
    let ing = Running::start(&stack, "pod-h", 100);
    wait_drained(&mut conn, &stack.config).await;

    let dead = read_stream(&mut conn, &stack.config.dead_letter_stream()).await;
    assert_eq!(
        dead.len(),
        1,
        "{:?}",
        dead.iter().map(|d| &d.0).collect::<Vec<_>>()
    );
    let f = &dead[0].1;
    assert_eq!(field_str(f, "reason"), "undecodable");
    assert_eq!(field_str(f, "original_id"), huge);
    assert_eq!(field_str(f, "f0"), "x");
    assert!(
        field_str(f, "truncated_fields").starts_with("5000 fields"),
        "{}",
        field_str(f, "truncated_fields")
    );
    let pool = stack.pool(&stack.core_url).await;
    assert!(stored(&pool, "deals.after-huge").await.is_some());
    ing.stop().await;
}

#[tokio::test]
async fn undecodable_entries_are_dead_lettered_at_once_and_the_group_moves_on() {
    // minIdle of a minute: whatever happens here happens on first delivery, not via reclaim.
    let stack = Stack::with_config(
        r#"
pipeline: test
reclaim: {minIdle: 60s, interval: 60s, maxDeliveries: 3}
sources: [{name: deals}]
"#,
    )
    .await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.good-1", 1, Op::Upsert),
    )
    .await;
    let garbage = xadd_raw(&mut conn, &stream, &[("hello", "world")]).await;
    let mut bad_json = event("deals", "deals.bad-json", 1, Op::Upsert);
    bad_json.content = Some(b"{not json".to_vec());
    let bad_json_id = xadd(&mut conn, &stream, &bad_json).await;
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.good-2", 1, Op::Upsert),
    )
    .await;

    let started = Instant::now();
    let ing = Running::start(&stack, "pod-x", 100);
    wait_drained(&mut conn, &stack.config).await;
    assert!(started.elapsed() < Duration::from_secs(30));
    let dead = read_stream(&mut conn, &stack.config.dead_letter_stream()).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let by_original: HashMap<String, &HashMap<String, redis::Value>> = dead
        .iter()
        .map(|(_, f)| (field_str(f, "original_id"), f))
        .collect();
    let g = by_original
        .get(&garbage)
        .expect("garbage entry dead-lettered");
    assert_eq!(field_str(g, "reason"), "undecodable");
    assert_eq!(
        field_str(g, "hello"),
        "world",
        "original fields kept verbatim"
    );
    assert_eq!(field_str(g, "consumer"), "pod-x");
    assert!(
        field_str(g, "error").contains("missing"),
        "{}",
        field_str(g, "error")
    );
    assert!(
        field_str(g, "dead_lettered_at_ms")
            .parse::<i64>()
            .expect("ms")
            > 0
    );
    let j = by_original
        .get(&bad_json_id)
        .expect("bad json dead-lettered");
    assert_eq!(field_str(j, "reason"), "undecodable");
    assert_eq!(field_str(j, "content"), "{not json");

    let pool = stack.pool(&stack.core_url).await;
    assert!(stored(&pool, "deals.good-1").await.is_some());
    assert!(stored(&pool, "deals.good-2").await.is_some());
    assert!(stored(&pool, "deals.bad-json").await.is_none());
    assert_eq!(
        ing.settled_metric("widget_ingest_rejected_total", 2.0)
            .await,
        2.0
    );
    assert_eq!(
        ing.settled_metric(
            "widget_ingest_dead_lettered_total{reason=\"undecodable\"}",
            2.0
        )
        .await,
        2.0
    );
    assert_eq!(
        ing.settled_metric("widget_ingest_reclaimed_total", 0.0)
            .await,
        0.0
    );
    let expected = [
        (stats::field::DEAD_LETTERED, 2),
        (stats::field::REJECTED, 2),
    ];
    assert!(
        stats_reach(&conn, &stack.config, &expected).await,
        "dead-lettered and rejected totals in the stats hash"
    );
    ing.stop().await;
}

#[tokio::test]
async fn an_entry_the_database_keeps_refusing_is_dead_lettered_after_max_deliveries() {
    let stack = Stack::start().await; // minIdle 300ms, maxDeliveries 3
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    let ing = Running::start(&stack, "pod-y", 100);
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.before", 1, Op::Upsert),
    )
    .await;
    // Valid JSON that Postgres jsonb refuses (\u0000 cannot be stored as text): decode passes,
    // the database fails it every time.
    let mut poison = event("deals", "deals.poison", 1, Op::Upsert);
    poison.content = Some(br#"{"s":"\u0000"}"#.to_vec());
    let poison_id = xadd(&mut conn, &stream, &poison).await;
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.after", 1, Op::Upsert),
    )
    .await;

    let pool = stack.pool(&stack.core_url).await;
    // The group keeps moving: the entries around the poison are applied right away.
    let moved_on = eventually(Duration::from_secs(5), || {
        let p = pool.clone();
        async move {
            (stored(&p, "deals.before").await.is_some()
                && stored(&p, "deals.after").await.is_some())
            .then_some(())
        }
    })
    .await;
    assert!(moved_on.is_some(), "good entries applied beside the poison");

    let dead_stream = stack.config.dead_letter_stream();
    let dead = eventually(WAIT, || {
        let (mut c, s) = (conn.clone(), dead_stream.clone());
        async move {
            let d = read_stream(&mut c, &s).await;
            (!d.is_empty()).then_some(d)
        }
    })
    .await
    .expect("poison dead-lettered");
    assert_eq!(dead.len(), 1);
    let f = &dead[0].1;
    assert_eq!(field_str(f, "reason"), "max-deliveries");
    assert_eq!(field_str(f, "original_id"), poison_id);
    assert_eq!(field_str(f, "widget_key"), "deals.poison");
    assert!(
        field_str(f, "error").contains("delivered 4 times"),
        "{}",
        field_str(f, "error")
    );
    wait_drained(&mut conn, &stack.config).await;
    // Processed exactly maxDeliveries times (1 read + 2 reclaims), dead-lettered on the 4th.
    assert_eq!(
        ing.settled_metric("widget_ingest_db_rejected_total", 3.0)
            .await,
        3.0
    );
    assert_eq!(
        ing.settled_metric(
            "widget_ingest_dead_lettered_total{reason=\"max-deliveries\"}",
            1.0
        )
        .await,
        1.0
    );
    assert_eq!(
        ing.settled_metric("widget_ingest_rejected_total", 0.0)
            .await,
        0.0
    );
    assert!(stored(&pool, "deals.poison").await.is_none());
    ing.stop().await;
}

// 5 -------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_source_cannot_write_another_sources_namespace() {
    let stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    let ing = Running::start(&stack, "pod-z", 100);
    let key = "loyalty.points:42";
    xadd(&mut conn, &stream, &event("loyalty", key, 1, Op::Upsert)).await;
    wait_drained(&mut conn, &stack.config).await;
    let cache = Cache::new(stack.config.key_prefix());
    let before = cached(&mut conn, &cache, key)
        .await
        .expect("loyalty widget cached");

    let mut foreign = event("deals", key, 9, Op::Upsert);
    foreign.content = Some(br#"{"points":999999}"#.to_vec());
    let foreign_id = xadd(&mut conn, &stream, &foreign).await;
    let mut foreign_delete = event("deals", key, 10, Op::Delete);
    foreign_delete.content = None;
    xadd(&mut conn, &stream, &foreign_delete).await;
    wait_drained(&mut conn, &stack.config).await;

    let dead = read_stream(&mut conn, &stack.config.dead_letter_stream()).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(field_str(&dead[0].1, "reason"), "foreign-namespace");
    assert_eq!(field_str(&dead[0].1, "original_id"), foreign_id);
    assert_eq!(field_str(&dead[0].1, "source"), "deals");
    assert_eq!(field_str(&dead[1].1, "reason"), "foreign-namespace");
    let pool = stack.pool(&stack.core_url).await;
    let (version, deleted, body) = stored(&pool, key).await.expect("row");
    assert_eq!((version, deleted), (1, false));
    assert_eq!(body, Some(serde_json::json!({"key": key, "v": 1})));
    assert_eq!(
        cached(&mut conn, &cache, key).await,
        Some(before),
        "cache untouched"
    );
    assert_eq!(
        ing.settled_metric(
            "widget_ingest_dead_lettered_total{reason=\"foreign-namespace\"}",
            2.0
        )
        .await,
        2.0
    );
    ing.stop().await;
}

// 6 -------------------------------------------------------------------------------------------

/// acked = entries delivered to the group minus those still pending.
async fn acked(conn: &mut MultiplexedConnection, config: &Config) -> usize {
    let (pending, _, read) =
        group_state(conn, &config.stream_name(), &config.stream.consumer_group)
            .await
            .expect("group exists");
    read - pending
}

#[tokio::test]
async fn core_database_down_under_load_nothing_acked_all_applied_after() {
    let mut stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    let ing = Running::start(&stack, "pod-db", 50);
    const TOTAL: i64 = 600;
    const KEYS: i64 = 50;
    let producer = {
        let mut c = stack.redis_conn().await;
        let stream = stream.clone();
        tokio::spawn(async move {
            for i in 1..=TOTAL {
                let key = format!("deals.load-{}", i % KEYS);
                xadd(&mut c, &stream, &event("deals", &key, i, Op::Upsert)).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.pg.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let an ACK already on the wire land
    let acked_at_stop = acked(&mut conn, &stack.config).await;
    assert!(
        acked_at_stop > 0,
        "some entries were applied before the outage"
    );
    let not_ready = eventually(Duration::from_secs(10), || {
        let r = ing.readiness.clone();
        async move { r.failing().contains_key("database").then_some(()) }
    })
    .await;
    assert!(not_ready.is_some(), "readiness reports the database");
    let down_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < down_until {
        assert_eq!(
            acked(&mut conn, &stack.config).await,
            acked_at_stop,
            "acked while the DB was down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.pg.start_again().await.expect("postgres back");
    producer.await.expect("producer");
    wait_drained(&mut conn, &stack.config).await;

    let pool = stack.pool(&stack.core_url).await;
    for k in 0..KEYS {
        let key = format!("deals.load-{k}");
        // The newest version written for this key.
        let newest = (1..=TOTAL)
            .rev()
            .find(|i| i % KEYS == k)
            .expect("some version");
        let (version, _, _) = stored(&pool, &key).await.expect("row");
        assert_eq!(version, newest, "{key}");
    }
    assert_eq!(
        acked(&mut conn, &stack.config).await,
        TOTAL as usize,
        "every entry acked once"
    );
    assert!(
        read_stream(&mut conn, &stack.config.dead_letter_stream())
            .await
            .is_empty(),
        "the outage dead-lettered nothing"
    );
    let ready = eventually(WAIT, || {
        let r = ing.readiness.clone();
        async move { r.is_ready().then_some(()) }
    })
    .await;
    assert!(
        ready.is_some(),
        "ready again: {:?}",
        ing.readiness.failing()
    );
    ing.stop().await;
}

// 7 -------------------------------------------------------------------------------------------

#[tokio::test]
async fn redis_restarted_empty_group_is_recreated_and_ingestion_continues() {
    let mut stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    let ing = Running::start(&stack, "pod-r", 100);
    for i in 0..5 {
        xadd(
            &mut conn,
            &stream,
            &event("deals", &format!("deals.old-{i}"), 1, Op::Upsert),
        )
        .await;
    }
    wait_drained(&mut conn, &stack.config).await;

    stack.redis.kill().await;
    stack.redis.wipe();
    stack.redis.start_again().await.expect("redis back, empty");
    let mut conn = stack.redis_conn().await;
    // Added right away, very likely before the ingester re-creates the group: a group
    // re-created at `$` would skip these.
    for i in 0..5 {
        xadd(
            &mut conn,
            &stream,
            &event("deals", &format!("deals.new-{i}"), 1, Op::Upsert),
        )
        .await;
    }
    let pool = stack.pool(&stack.core_url).await;
    let cache = Cache::new(stack.config.key_prefix());
    let all = eventually(WAIT, || {
        let (p, mut c, cache) = (pool.clone(), conn.clone(), cache.clone());
        async move {
            for i in 0..5 {
                let key = format!("deals.new-{i}");
                stored(&p, &key).await?;
                cached(&mut c, &cache, &key).await?;
            }
            Some(())
        }
    })
    .await;
    assert!(
        all.is_some(),
        "entries added after the restart were applied and cached"
    );
    wait_drained(&mut conn, &stack.config).await;
    assert!(ing.metric("widget_ingest_group_recreated_total") >= 1.0);
    // More entries keep flowing.
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.later", 1, Op::Upsert),
    )
    .await;
    wait_drained(&mut conn, &stack.config).await;
    assert!(stored(&pool, "deals.later").await.is_some());
    ing.stop().await;
}

// 8 -------------------------------------------------------------------------------------------

#[tokio::test]
async fn delete_then_late_older_upsert_stays_deleted() {
    let stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    // One key across batches, one key inside a single batch (added before the ingester starts).
    for (v, op) in [(5, Op::Upsert), (7, Op::Delete), (6, Op::Upsert)] {
        xadd(
            &mut conn,
            &stream,
            &event("deals", "deals.same-batch", v, op),
        )
        .await;
    }
    let ing = Running::start(&stack, "pod-d", 100);
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.gone", 5, Op::Upsert),
    )
    .await;
    wait_drained(&mut conn, &stack.config).await;
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.gone", 7, Op::Delete),
    )
    .await;
    wait_drained(&mut conn, &stack.config).await;
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.gone", 6, Op::Upsert),
    )
    .await;
    wait_drained(&mut conn, &stack.config).await;

    let pool = stack.pool(&stack.core_url).await;
    let cache = Cache::new(stack.config.key_prefix());
    for key in ["deals.gone", "deals.same-batch"] {
        let (version, deleted, body) = stored(&pool, key).await.expect("tombstone row");
        assert_eq!((version, deleted, body), (7, true, None), "{key}");
        let raw = cached(&mut conn, &cache, key)
            .await
            .expect("tombstone cached");
        assert_eq!(
            cache::decode_value(&raw),
            Some(Cached::Deleted { version: 7 }),
            "{key}"
        );
        let ttl: i64 = conn.pttl(cache.key(key)).await.expect("pttl");
        assert!(
            ttl > 6 * 24 * 3600 * 1000,
            "tombstone has the ingest TTL: {ttl}"
        );
    }
    assert!(ing.settled_metric("widget_ingest_stale_total", 2.0).await >= 2.0);
    ing.stop().await;
}

// Beyond the eight: the crash window between the database commit and the cache write. --------

#[tokio::test]
async fn redelivery_after_commit_but_before_cache_write_still_fills_the_cache() {
    let stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    let pool = stack.pool(&stack.core_url).await;
    // A previous delivery committed these rows, then the process died before its cache write.
    let committed = event("deals", "deals.committed", 4, Op::Upsert);
    let newer_in_db = event("deals", "deals.newer", 9, Op::Upsert);
    for ev in [&committed, &newer_in_db] {
        let change = widget_runtime::store::Change {
            widget_key: ev.widget_key.clone(),
            widget_type: ev.widget_type.clone(),
            source: ev.source.clone(),
            data_version: ev.data_version,
            op: ev.op,
            content: ev
                .content
                .as_ref()
                .map(|c| String::from_utf8(c.clone()).expect("utf8")),
        };
        widget_runtime::store::apply_batch(&pool, &[change])
            .await
            .expect("pre-apply");
    }
    // The same event again (redelivered), and an older event for a key the DB has newer.
    xadd(&mut conn, &stream, &committed).await;
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.newer", 3, Op::Upsert),
    )
    .await;
    // No re-warm here: it would fill the cache from Postgres, which is not what is tested.
    let ing = Running::start_with(&stack, "pod-c", 100, |i| i.with_warm(|w| w.rate = 0));
    wait_drained(&mut conn, &stack.config).await;

    let cache = Cache::new(stack.config.key_prefix());
    let want = cache::encode_value(
        4,
        Some(&cache::widget_json(
            "deals.committed",
            "card",
            4,
            &content("deals.committed", 4),
        )),
    );
    assert_eq!(
        cached(&mut conn, &cache, "deals.committed").await,
        Some(want),
        "the stored version is cached although the upsert did not win again"
    );
    assert_eq!(
        cached(&mut conn, &cache, "deals.newer").await,
        None,
        "an older event never fills the cache while the DB holds a newer version"
    );
    assert_eq!(
        ing.settled_metric("widget_ingest_stale_total", 2.0).await,
        2.0
    );
    assert_eq!(
        ing.settled_metric("widget_ingest_applied_total", 0.0).await,
        0.0
    );
    ing.stop().await;
}

/// A batch of large widgets (about 3.6 MB of cache values, so several script calls): every
/// widget is cached with its version and the batch is acknowledged. That the calls are cut at
/// `cache::MAX_WRITE_BYTES` is tested by the unit test in `cache`; this test does not observe
/// the number of calls (it also passes with one call on loopback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_large_widgets_is_cached_whole() {
    let stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    let blob = "x".repeat(60_000);
    for n in 1..=60 {
        let mut ev = event("deals", &format!("deals.big-{n}"), n, Op::Upsert);
        ev.content = Some(serde_json::to_vec(&serde_json::json!({"blob": blob})).expect("json"));
        xadd(&mut conn, &stream, &ev).await;
    }
    let ing = Running::start(&stack, "pod-big", 100);
    wait_drained(&mut conn, &stack.config).await;
    let cache = Cache::new(stack.config.key_prefix());
    for n in 1..=60 {
        let raw = cached(&mut conn, &cache, &format!("deals.big-{n}"))
            .await
            .unwrap_or_else(|| panic!("deals.big-{n} cached"));
        assert!(matches!(
            cache::decode_value(&raw),
            Some(Cached::Widget { version, .. }) if version == n
        ));
    }
    ing.stop().await;
}

/// A `widget-runtime <command>` tool run against the stack, with the pipeline's config file.
struct Tool {
    command: &'static str,
    _dir: tempfile::TempDir,
    config_path: std::path::PathBuf,
    redis_url: String,
    core_url: String,
}

impl Tool {
    fn new(stack: &Stack, command: &'static str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, stack.config.to_yaml()).expect("write config");
        Tool {
            command,
            _dir: dir,
            config_path,
            redis_url: stack.redis.url(),
            core_url: stack.core_url.clone(),
        }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_widget-runtime"))
            .arg(self.command)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env("REDIS_URL", &self.redis_url)
            .env("CORE_DATABASE_URL", &self.core_url)
            .output()
            .expect("run widget-runtime")
    }
}

/// A widget pinned by a nonsense version (near `i64::MAX`) can be repaired by hand:
/// `widgets show` prints what is stored, `widgets purge` without `--yes` deletes nothing, with
/// it removes the row and the cache entry, and the producer's next version is applied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_widget_is_shown_and_purged_by_hand() {
    let stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    let pool = stack.pool(&stack.core_url).await;
    let ing = Running::start(&stack, "pod-r", 100);
    let pinned = i64::MAX - 1;
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.pinned", pinned, Op::Upsert),
    )
    .await;
    wait_drained(&mut conn, &stack.config).await;
    assert_eq!(
        stored(&pool, "deals.pinned").await.map(|s| s.0),
        Some(pinned)
    );

    let tool = Tool::new(&stack, "widgets");
    let run = |args: &[&str]| tool.run(args);
    let shown = run(&["show", "deals.pinned"]);
    assert!(shown.status.success(), "{shown:?}");
    let report: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("json report");
    assert_eq!(report["database"]["data_version"], pinned);
    assert_eq!(report["cache"]["version"], pinned);

    let dry = run(&["purge", "deals.pinned"]);
    assert_eq!(dry.status.code(), Some(2), "{dry:?}");
    assert!(String::from_utf8_lossy(&dry.stderr).contains("--yes"));
    assert_eq!(
        stored(&pool, "deals.pinned").await.map(|s| s.0),
        Some(pinned)
    );

    let purged = run(&["purge", "deals.pinned", "--yes"]);
    assert!(purged.status.success(), "{purged:?}");
    assert!(String::from_utf8_lossy(&purged.stdout).contains(&pinned.to_string()));
    assert_eq!(stored(&pool, "deals.pinned").await, None);
    let cache = Cache::new(stack.config.key_prefix());
    assert_eq!(cached(&mut conn, &cache, "deals.pinned").await, None);
    let bad = run(&["show", "Not A Key"]);
    assert!(!bad.status.success());

    // The producer's own next version now wins again.
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.pinned", 5, Op::Upsert),
    )
    .await;
    wait_drained(&mut conn, &stack.config).await;
    assert_eq!(stored(&pool, "deals.pinned").await.map(|s| s.0), Some(5));
    ing.stop().await;
}

/// Dead letters can be listed and, once their cause is fixed, re-driven: `dead-letters list`
/// shows each with its reason (and delivery count), `replay --dry-run` moves nothing, `replay
/// --reason max-deliveries` moves exactly those back and the ingester applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_once_fixed() {
    let stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    let pool = stack.pool(&stack.core_url).await;
    sqlx::query("ALTER TABLE widgets ADD CONSTRAINT refuse_r CHECK (widget_key <> 'deals.r')")
        .execute(&pool)
        .await
        .expect("constraint");
    let ing = Running::start(&stack, "pod-d", 100);
    xadd_raw(&mut conn, &stream, &[("garbage", "1")]).await;
    xadd(
        &mut conn,
        &stream,
        &event("deals", "loyalty.points:1", 1, Op::Upsert),
    )
    .await;
    xadd(
        &mut conn,
        &stream,
        &event("deals", "deals.r", 7, Op::Upsert),
    )
    .await;
    let dead_stream = stack.config.dead_letter_stream();
    eventually(WAIT, || {
        let mut c = conn.clone();
        let dead_stream = dead_stream.clone();
        async move { (read_stream(&mut c, &dead_stream).await.len() == 3).then_some(()) }
    })
    .await
    .expect("three dead letters");

    let tool = Tool::new(&stack, "dead-letters");
    let run = |args: &[&str]| tool.run(args);
    let json = |out: &std::process::Output| -> serde_json::Value {
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let all = json(&run(&["list", "--json"]));
    let mut reasons: Vec<&str> = all
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|l| l["reason"].as_str())
        .collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        ["foreign-namespace", "max-deliveries", "undecodable"]
    );
    let text = run(&["list", "--since", "1h"]);
    assert!(text.status.success());
    assert_eq!(String::from_utf8_lossy(&text.stdout).lines().count(), 3);
    let stuck = json(&run(&["list", "--json", "--reason", "max-deliveries"]));
    assert_eq!(stuck[0]["widget_key"], "deals.r");
    assert!(stuck[0]["deliveries"].as_u64().unwrap_or(0) > 3, "{stuck}");

    let dry = json(&run(&["replay", "--reason", "max-deliveries", "--dry-run"]));
    assert_eq!(dry["replayed"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        read_stream(&mut conn, &dead_stream).await.len(),
        3,
        "a dry run moves nothing"
    );

    // The cause fixed, the replay moves it back and it is applied.
    sqlx::query("ALTER TABLE widgets DROP CONSTRAINT refuse_r")
        .execute(&pool)
        .await
        .expect("drop constraint");
    let done = json(&run(&["replay", "--reason", "max-deliveries"]));
    assert_eq!(done["replayed"][0]["widget_key"], "deals.r");
    assert_eq!(read_stream(&mut conn, &dead_stream).await.len(), 2);
    let applied = eventually(WAIT, || async {
        stored(&pool, "deals.r").await.filter(|s| s.0 == 7)
    })
    .await;
    assert!(applied.is_some(), "the replayed entry is applied");
    // A second replay finds nothing left to move.
    let again = json(&run(&["replay", "--reason", "max-deliveries"]));
    assert_eq!(again["replayed"].as_array().map(Vec::len), Some(0));
    ing.stop().await;
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Five 50 MB entries (written straight into the stream) among 1,000 good ones: the good ones
/// are applied within seconds, the big ones are dead-lettered by their length with clipped
/// values and a reason, and the ingester's memory stays bounded (stated: under 1.5 GiB above
/// where it started, for 250 MB of hostile entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_entries_are_dead_lettered_by_length_and_the_rest_flows() {
    let stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    let pool = stack.pool(&stack.core_url).await;
    let huge = "x".repeat(50 << 20);
    for n in 0..1000 {
        xadd(
            &mut conn,
            &stream,
            &event("deals", &format!("deals.ok-{n}"), 1, Op::Upsert),
        )
        .await;
        if n % 200 == 100 {
            xadd_raw(
                &mut conn,
                &stream,
                &[("v", "1"), ("widget_key", "deals.huge"), ("content", &huge)],
            )
            .await;
        }
    }
    drop(huge);
    let before = rss_kib();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = CancellationToken::new();
    let sampler = {
        let (peak, stop) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let ing = Running::start(&stack, "pod-h", 500);
    let applied = eventually(Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM widgets")
            .fetch_one(&pool)
            .await
            .expect("count");
        (n == 1000).then_some(())
    })
    .await;
    assert!(applied.is_some(), "the 1,000 good entries are applied");
    let took = started.elapsed();
    wait_drained(&mut conn, &stack.config).await;
    sampling.cancel();
    sampler.await.expect("sampler");
    let grown_mib = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before)
        / 1024;
    eprintln!("good entries applied in {took:?}; RSS grew by at most {grown_mib} MiB");
    assert!(took < Duration::from_secs(20), "within seconds: {took:?}");
    assert!(grown_mib < 1536, "memory bounded: grew {grown_mib} MiB");

    let dead = read_stream(&mut conn, &stack.config.dead_letter_stream()).await;
    assert_eq!(dead.len(), 5, "the five huge entries are dead-lettered");
    for (_, m) in &dead {
        assert_eq!(field_str(m, "reason"), "entry-too-large");
        assert!(field_str(m, "content").len() <= 256, "values are clipped");
        assert!(field_str(m, "error").contains("bytes"));
    }
    ing.stop().await;
}

/// Infrastructure trouble must not dead-letter good events: with `minIdle: 2s` and
/// `maxDeliveries: 3`, and two replicas, the core database stopped for 15 s, then read-only (a
/// standby after a failover: SQLSTATE 25006), then Redis refusing writes (OOM) during the cache
/// step after the commit. Events keep arriving; none is dead-lettered and all are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outages_dead_letter_nothing() {
    let mut stack = Stack::with_config(
        "pipeline: test\nreclaim: {minIdle: 2s, interval: 500ms, maxDeliveries: 3}\nsources: [{name: deals}]\n",
    )
    .await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    let a = Running::start(&stack, "pod-a", 50);
    let b = Running::start(&stack, "pod-b", 50);
    let mut version = 0;
    let mut send = |conn: &mut MultiplexedConnection| {
        version += 1;
        let v = version;
        let stream = stream.clone();
        let mut conn = conn.clone();
        async move {
            for k in 0..10 {
                xadd(
                    &mut conn,
                    &stream,
                    &event("deals", &format!("deals.k{k}"), v, Op::Upsert),
                )
                .await;
            }
        }
    };
    let flow = |secs: u64| Duration::from_secs(secs);
    // 1. The core database stopped for 15 s while events flow.
    send(&mut conn).await;
    stack.pg.stop().await;
    let t = Instant::now();
    while t.elapsed() < flow(15) {
        send(&mut conn).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stack.pg.start_again().await.expect("postgres back");
    // 2. Read-only, as a promoted standby's old primary or a standby the URL now points at.
    let admin = stack.pool(&stack.pg.url("postgres")).await;
    let core_db = stack
        .core_url
        .rsplit('/')
        .next()
        .expect("db name")
        .to_string();
    let set_read_only = |on: bool| {
        let (admin, core_db) = (admin.clone(), core_db.clone());
        async move {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE \"{core_db}\" SET default_transaction_read_only = {on}"
            )))
            .execute(&admin)
            .await
            .expect("alter database");
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            )
            .bind(&core_db)
            .execute(&admin)
            .await
            .expect("terminate sessions");
        }
    };
    set_read_only(true).await;
    let t = Instant::now();
    while t.elapsed() < flow(6) {
        send(&mut conn).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    set_read_only(false).await;
    // 3. Redis refuses writes (out of memory) while the ingesters cache what they committed.
    send(&mut conn).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut conn)
        .await
        .expect("maxmemory");
    tokio::time::sleep(flow(6)).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("maxmemory off");
    send(&mut conn).await;

    wait_drained(&mut conn, &stack.config).await;
    let pool = stack.pool(&stack.core_url).await;
    let last = version;
    let done = eventually(WAIT, || async {
        let mut all = true;
        for k in 0..10 {
            all &= stored(&pool, &format!("deals.k{k}")).await.map(|s| s.0) == Some(last);
        }
        all.then_some(())
    })
    .await;
    assert!(done.is_some(), "every key holds the last version {last}");
    let dead = read_stream(&mut conn, &stack.config.dead_letter_stream()).await;
    assert!(dead.is_empty(), "nothing is dead-lettered: {dead:?}");
    a.stop().await;
    b.stop().await;
}

// A batch is read ahead while the one before is upserted, and finished (cached, acknowledged)
// while the one after is: a stop in the middle of a drain must still leave nothing pending (a
// read-ahead batch would otherwise wait minutes for a reclaim) and nothing acknowledged that
// is not stored and cached.
#[tokio::test]
async fn a_stop_mid_drain_leaves_nothing_pending_and_every_ack_stored_and_cached() {
    let stack = Stack::start().await;
    let mut conn = stack.redis_conn().await;
    let stream = stack.config.stream_name();
    const TOTAL: i64 = 15000;
    const KEYS: i64 = 700;
    let mut pipe = redis::pipe();
    for i in 1..=TOTAL {
        let ev = event("deals", &format!("deals.ahead-{}", i % KEYS), i, Op::Upsert);
        pipe.xadd(&stream, "*", &ev.to_fields()).ignore();
    }
    let () = pipe.query_async(&mut conn).await.expect("xadd");
    let ing = Running::start(&stack, "pod-ahead", 200);
    let some = eventually(WAIT, || {
        let (mut c, stream) = (conn.clone(), stream.clone());
        let group = stack.config.stream.consumer_group.clone();
        async move {
            let (pending, _, read) = group_state(&mut c, &stream, &group).await?;
            (read - pending >= 1000).then_some(())
        }
    })
    .await;
    assert!(some.is_some(), "the ingester got going");
    ing.stop().await;

    let (pending, _, read) = group_state(&mut conn, &stream, &stack.config.stream.consumer_group)
        .await
        .expect("group");
    assert_eq!(pending, 0, "nothing left pending by a graceful stop");
    assert!(read < TOTAL as usize, "stopped mid-drain (read {read})");
    // Entries are delivered in stream order, so the acknowledged ones are the first `read`.
    let pool = stack.pool(&stack.core_url).await;
    let cache = Cache::new(stack.config.key_prefix());
    for k in 0..KEYS {
        let key = format!("deals.ahead-{k}");
        let newest_acked = (1..=read as i64).rev().find(|i| i % KEYS == k);
        let row = stored(&pool, &key).await.map(|r| r.0);
        let in_cache =
            cached(&mut conn, &cache, &key)
                .await
                .and_then(|raw| match cache::decode_value(&raw) {
                    Some(Cached::Widget { version, .. }) => Some(version),
                    _ => None,
                });
        let Some(v) = newest_acked else { continue };
        assert!(row >= Some(v), "{key}: acked v{v}, stored {row:?}");
        assert!(
            in_cache >= Some(v),
            "{key}: acked v{v}, cached {in_cache:?}"
        );
    }

    // Started again, it drains the rest.
    let ing = Running::start(&stack, "pod-ahead", 200);
    wait_drained(&mut conn, &stack.config).await;
    for k in 0..KEYS {
        let key = format!("deals.ahead-{k}");
        let newest = (1..=TOTAL).rev().find(|i| i % KEYS == k).expect("some");
        assert_eq!(
            stored(&pool, &key).await.map(|r| r.0),
            Some(newest),
            "{key}"
        );
    }
    ing.stop().await;
}
