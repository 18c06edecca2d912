//! The status probe against a real Redis: a real stream, consumer group, pending entries and the
//! runtime's stats hash. The figures must equal what Redis itself says.

use redis::AsyncCommands;
use redis::streams::{StreamInfoGroupsReply, StreamReadOptions, StreamReadReply};
use testkit::RedisServer;
use widget_crds::SourceBacklog;
use widget_operator::probe;
use widget_runtime::config::Config;
use widget_runtime::stats::field;

fn config() -> Config {
    Config::from_yaml_str("pipeline: home\nsources: [{name: deals}, {name: loyalty}]\n")
        .expect("config")
}

#[tokio::test]
async fn figures_equal_what_redis_says() {
    let redis = RedisServer::start().await.expect("redis starts");
    let mut con = redis.connection().await.expect("connect");
    let config = config();
    let stream = config.stream_name();
    let group = config.stream.consumer_group.clone();

    for i in 0..7 {
        let _: String = con
            .xadd(&stream, "*", &[("widget_key", format!("deals.w{i}"))])
            .await
            .expect("xadd");
    }
    let _: () = con
        .xgroup_create(&stream, &group, "0")
        .await
        .expect("group");
    // ingester-1 reads 4 (pending), acks 1 of them; 3 entries stay undelivered (lag).
    let read: StreamReadReply = con
        .xread_options(
            &[&stream],
            &[">"],
            &StreamReadOptions::default()
                .group(&group, "ingester-1")
                .count(4),
        )
        .await
        .expect("xreadgroup");
    let first = read.keys[0].ids[0].id.clone();
    let _: i64 = con.xack(&stream, &group, &[first]).await.expect("xack");
    let _: String = con
        .xadd(
            config.dead_letter_stream(),
            "*",
            &[("reason", "foreign key")],
        )
        .await
        .expect("dead letter");
    let stats_key = config.stats_key();
    let _: () = redis::pipe()
        .hset(&stats_key, field::APPLIED, 40)
        .hset(&stats_key, field::STALE, 2)
        .hset(&stats_key, field::REJECTED, 1)
        .hset(&stats_key, field::RECLAIMED, 6)
        .hset(&stats_key, field::DEAD_LETTERED, 1)
        .hset(&stats_key, field::PUBLISHED, 47)
        .hset(&stats_key, field::CACHE_HITS, 3)
        .hset(&stats_key, field::CACHE_MISSES, 1)
        .hset(
            &stats_key,
            format!("{}deals", field::OUTBOX_BACKLOG_PREFIX),
            12,
        )
        .hset(
            &stats_key,
            format!("{}deals", field::OUTBOX_BACKLOG_AT_PREFIX),
            1_700_000_000_000i64,
        )
        .hset(&stats_key, field::INGRESS_LAG_P50_MS, 8)
        .hset(&stats_key, field::INGRESS_LAG_P99_MS, 95)
        .hset(&stats_key, field::INGRESS_LAG_AT, 1_700_000_001_000i64)
        .hset(&stats_key, field::UPDATED_AT, 1_700_000_002_000i64)
        .query_async(&mut con)
        .await
        .expect("stats");

    let live = probe::probe(&redis.url(), &config).await.expect("probe");

    // What Redis says, asked directly.
    let xlen: i64 = con.xlen(&stream).await.expect("xlen");
    let groups: StreamInfoGroupsReply = con.xinfo_groups(&stream).await.expect("xinfo");
    let g = groups
        .groups
        .iter()
        .find(|g| g.name == group)
        .expect("group");
    assert_eq!(live.stream_length, xlen);
    assert_eq!(live.stream_length, 7);
    assert_eq!(live.pending, g.pending as i64);
    assert_eq!(live.pending, 3);
    assert_eq!(live.lag, g.lag.map(|l| l as i64));
    assert_eq!(live.lag, Some(3));
    assert_eq!(live.dead_letter_length, 1);
    assert_eq!(
        (
            live.applied,
            live.stale,
            live.rejected,
            live.reclaimed,
            live.dead_lettered,
            live.published
        ),
        (40, 2, 1, 6, 1, 47)
    );
    assert_eq!(live.cache_hit_ratio, Some(0.75));
    // Only the source that reported a backlog is listed.
    assert_eq!(
        live.outbox_backlog,
        [SourceBacklog {
            source: "deals".into(),
            rows: 12,
            observed_at: live.outbox_backlog[0].observed_at.clone(),
        }]
    );
    let at = live.outbox_backlog[0]
        .observed_at
        .as_ref()
        .expect("backlog time");
    assert_eq!(at.0.as_millisecond(), 1_700_000_000_000);
    let lag = live.ingress_lag.as_ref().expect("ingress lag");
    assert_eq!((lag.p50_ms, lag.p99_ms), (8, 95));
    assert_eq!(
        lag.observed_at.as_ref().map(|t| t.0.as_millisecond()),
        Some(1_700_000_001_000)
    );
    assert_eq!(
        live.stats_updated_at.as_ref().map(|t| t.0.as_millisecond()),
        Some(1_700_000_002_000)
    );

    // The stats counters move with HINCRBY as the runtime flushes; the next probe sees it.
    let _: i64 = con
        .hincr(&stats_key, field::RECLAIMED, 4)
        .await
        .expect("hincrby");
    let live = probe::probe(&redis.url(), &config).await.expect("probe");
    assert_eq!(live.reclaimed, 10);
}

#[tokio::test]
async fn an_empty_redis_reports_zeros_and_no_ratio() {
    let redis = RedisServer::start().await.expect("redis starts");
    let live = probe::probe(&redis.url(), &config()).await.expect("probe");
    assert_eq!(
        (live.stream_length, live.lag, live.pending),
        (0, Some(0), 0)
    );
    assert_eq!(live.cache_hit_ratio, None);
    assert!(live.outbox_backlog.is_empty());
    assert_eq!(live.ingress_lag, None);
}

#[tokio::test]
async fn a_stream_without_the_group_counts_every_entry_as_lag() {
    let redis = RedisServer::start().await.expect("redis starts");
    let mut con = redis.connection().await.expect("connect");
    let config = config();
    for _ in 0..3 {
        let _: String = con
            .xadd(config.stream_name(), "*", &[("k", "v")])
            .await
            .expect("xadd");
    }
    let live = probe::probe(&redis.url(), &config).await.expect("probe");
    assert_eq!(
        (live.stream_length, live.lag, live.pending),
        (3, Some(3), 0)
    );
}

#[tokio::test]
async fn a_stopped_redis_is_an_error_quickly() {
    let mut redis = RedisServer::start().await.expect("redis starts");
    let url = redis.url();
    redis.stop().await;
    let started = std::time::Instant::now();
    let err = probe::probe(&url, &config())
        .await
        .expect_err("Redis is down");
    assert!(started.elapsed() < probe::PROBE_TIMEOUT * 2, "{err}");
}
