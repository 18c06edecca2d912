//! The status probe against a real Redis: a real stream, consumer group, pending entries and the
//! runtime's stats hash. The figures must equal what Redis itself says.

use k8s_openapi::jiff::Timestamp;
use redis::AsyncCommands;
use redis::streams::{StreamInfoGroupsReply, StreamReadOptions, StreamReadReply};
use testkit::RedisServer;
use widget_crds::{LiveStatus, SourceBacklog, condition};
use widget_operator::probe;
use widget_operator::status::{self, Observed, Problems};
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
        .hset(&stats_key, field::REPLAYED, 30)
        .hset(&stats_key, field::REDIS_LOSS_DETECTED, 1)
        .hset(&stats_key, field::RETENTION_EXPIRED, 4)
        .hset(&stats_key, field::WARM_WRITTEN, 900)
        .hset(&stats_key, field::WARM_ACTIVE, 1)
        .hset(
            &stats_key,
            format!("{}deals", field::OUTBOX_RETAINED_PREFIX),
            25,
        )
        .hset(
            &stats_key,
            format!("{}deals", field::OUTBOX_RETENTION_CAPPED_PREFIX),
            0,
        )
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
    assert_eq!(
        (
            live.replayed,
            live.redis_loss_detected,
            live.retention_expired,
            live.warm_written,
            live.warming
        ),
        (30, 1, 4, 900, true)
    );
    // testkit's Redis runs with the server default.
    assert_eq!(live.maxmemory_policy.as_deref(), Some("noeviction"));
    assert_eq!(live.cache_hit_ratio, Some(0.75));
    // Only the source that reported a backlog is listed.
    assert_eq!(
        live.outbox_backlog,
        [SourceBacklog {
            source: "deals".into(),
            rows: 12,
            retained: Some(25),
            retention_capped: false,
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

/// The status a reconcile would write for these figures (no Deployments expected).
fn status_for(live: LiveStatus) -> widget_crds::WidgetPipelineStatus {
    let mut problems = Problems::default();
    status::live_problems(&live, &mut problems);
    status::build(
        &Observed {
            generation: Some(1),
            paused: false,
            sources: 2,
            expected: &[],
            deployments: &[],
            problems: &problems,
            config_hash: None,
            live: Some(live),
            now: Timestamp::now(),
        },
        None,
    )
}

fn degraded(s: &widget_crds::WidgetPipelineStatus) -> (String, String, String) {
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == condition::DEGRADED)
        .expect("Degraded condition");
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test]
async fn an_allkeys_eviction_policy_degrades_the_pipeline() {
    let redis = RedisServer::start().await.expect("redis starts");
    let mut con = redis.connection().await.expect("connect");
    let config = config();

    // Redis' default is safe.
    let live = probe::probe(&redis.url(), &config).await.expect("probe");
    assert_eq!(live.maxmemory_policy.as_deref(), Some("noeviction"));
    let (status, reason, _) = degraded(&status_for(live));
    assert_eq!((status.as_str(), reason.as_str()), ("False", "AsExpected"));

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut con)
        .await
        .expect("config set");
    let live = probe::probe(&redis.url(), &config).await.expect("probe");
    assert_eq!(live.maxmemory_policy.as_deref(), Some("allkeys-lru"));
    let (status, reason, message) = degraded(&status_for(live));
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "RedisEvictionUnsafe")
    );
    assert!(
        message.contains("allkeys-lru") && message.contains("noeviction"),
        "{message}"
    );

    // A volatile-* policy only evicts keys with a TTL: safe again.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lru")
        .query_async(&mut con)
        .await
        .expect("config set");
    let live = probe::probe(&redis.url(), &config).await.expect("probe");
    let (status, _, _) = degraded(&status_for(live));
    assert_eq!(status, "False");
}

#[tokio::test]
async fn a_refused_config_get_is_an_unknown_policy_not_a_failed_probe() {
    let redis = RedisServer::start().await.expect("redis starts");
    let mut con = redis.connection().await.expect("connect");
    let config = config();
    // A user like a managed service's: everything but CONFIG.
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER", "probe", "on", ">secret", "~*", "&*", "+@all", "-config",
        ])
        .query_async(&mut con)
        .await
        .expect("acl setuser");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut con)
        .await
        .expect("config set");
    let _: () = con
        .hset(config.stats_key(), field::APPLIED, 5)
        .await
        .expect("stats");
    let url = format!("redis://probe:secret@127.0.0.1:{}/", redis.port());

    let live = probe::probe(&url, &config).await.expect("probe succeeds");
    assert_eq!(live.maxmemory_policy, None);
    assert_eq!(live.applied, 5, "the other figures are still read");
    let (status, _, _) = degraded(&status_for(live));
    assert_eq!(status, "False", "unknown is not unsafe");

    // The runtime's own reading (its gauge) stands in for the operator's.
    let _: () = con
        .hset(config.stats_key(), field::REDIS_EVICTION_UNSAFE, 1)
        .await
        .expect("gauge");
    let live = probe::probe(&url, &config).await.expect("probe succeeds");
    assert!(live.redis_eviction_unsafe);
    let (status, reason, _) = degraded(&status_for(live));
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "RedisEvictionUnsafe")
    );
}

#[tokio::test]
async fn a_capped_source_is_retention_exceeded() {
    let redis = RedisServer::start().await.expect("redis starts");
    let mut con = redis.connection().await.expect("connect");
    let config = config();
    let _: () = con
        .hset(
            config.stats_key(),
            format!("{}loyalty", field::OUTBOX_RETENTION_CAPPED_PREFIX),
            1,
        )
        .await
        .expect("gauge");
    let live = probe::probe(&redis.url(), &config).await.expect("probe");
    assert_eq!(live.outbox_backlog.len(), 1);
    assert!(live.outbox_backlog[0].retention_capped);
    let (status, reason, message) = degraded(&status_for(live));
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "RetentionExceeded")
    );
    assert!(message.contains("loyalty"), "{message}");
}

#[tokio::test]
async fn the_probe_reads_a_tls_redis_with_its_ca_and_refuses_an_untrusted_one() {
    let redis = RedisServer::start_tls().await.expect("TLS redis starts");
    let url = redis.url();
    let ca = redis.tls_ca_pem().expect("CA").as_bytes().to_vec();
    let mut con = probe::connect(&url, Some(&ca), Default::default())
        .await
        .expect("connects with the CA");
    let live = probe::read(&mut con, &config()).await.expect("reads");
    assert_eq!(live.stream_length, 0, "no stream yet");
    let err = probe::connect(&url, None, Default::default())
        .await
        .expect_err("a private CA is not in the system trust store");
    assert!(
        err.detail.to_lowercase().contains("certificate"),
        "says why: {}",
        err.detail
    );
}

/// In cluster mode the probe reaches the stream's node through the cluster client: the figures
/// of a stream whose slot is on one of three primaries, its dead letters beside it.
#[tokio::test]
async fn the_probe_reads_a_pipeline_on_a_redis_cluster() {
    let cluster = testkit::RedisCluster::start(3, 0).await.expect("cluster");
    let config =
        Config::from_yaml_str("pipeline: home\nredis: {mode: cluster}\nsources: [{name: deals}]\n")
            .expect("config");
    let stream = config.stream_name();
    assert_eq!(stream, "{home}.widget-events");
    let mut con = probe::connect(&cluster.url(), None, config.redis.mode)
        .await
        .expect("cluster connection");
    for i in 0..5 {
        let _: String = con
            .xadd(&stream, "*", &[("widget_key", format!("deals.w{i}"))])
            .await
            .expect("xadd");
    }
    let group = config.stream.consumer_group.clone();
    let _: () = con
        .xgroup_create(&stream, &group, "0")
        .await
        .expect("group");
    let _: StreamReadReply = con
        .xread_options(
            &[&stream],
            &[">"],
            &StreamReadOptions::default()
                .group(&group, "ingester-1")
                .count(2),
        )
        .await
        .expect("xreadgroup");
    let _: String = con
        .xadd(
            config.dead_letter_stream(),
            "*",
            &[("reason", "undecodable")],
        )
        .await
        .expect("dead letter");
    let _: () = con
        .hset(config.stats_key(), field::APPLIED, 9)
        .await
        .expect("stats");

    let live = probe::probe(&cluster.url(), &config).await.expect("probe");
    assert_eq!(
        (
            live.stream_length,
            live.pending,
            live.lag,
            live.dead_letter_length
        ),
        (5, 2, Some(3), 1)
    );
    assert_eq!(live.applied, 9);
    assert_eq!(live.maxmemory_policy.as_deref(), Some("noeviction"));

    // An evicting policy on the stream's primary alone (what eviction would cost lives there)
    // is found every time, not when a random node happens to be asked.
    let primary = cluster
        .primary_for(&stream)
        .await
        .expect("stream's primary");
    let node = cluster
        .nodes()
        .iter()
        .find(|n| n.port() == primary)
        .expect("node");
    let mut direct = node.connection().await.expect("connect");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut direct)
        .await
        .expect("config set");
    for _ in 0..6 {
        let live = probe::probe(&cluster.url(), &config).await.expect("probe");
        assert_eq!(live.maxmemory_policy.as_deref(), Some("allkeys-lru"));
    }
}

/// The operator's claim of a pipeline's names works on a cluster (one slot for both claims),
/// and a second pipeline with another stream but the same cache prefix is refused there too.
#[tokio::test]
async fn names_are_claimed_on_a_redis_cluster_and_a_shared_prefix_is_refused() {
    use widget_operator::tenancy::{Claim, Owner, claim};
    let cluster = testkit::RedisCluster::start(3, 0).await.expect("cluster");
    let cfg = |yaml: &str| Config::from_yaml_str(yaml).expect("config");
    let home = cfg(
        "pipeline: home\nredis: {mode: cluster}\ncache: {keyPrefix: \"hw:shared:\"}\nsources: [{name: deals}]\n",
    );
    let other = cfg(
        "pipeline: other\nredis: {mode: cluster}\ncache: {keyPrefix: \"hw:shared:\"}\nsources: [{name: deals}]\n",
    );
    let owner = |name: &str| Owner {
        namespace: "widgets".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    };
    let mut con = probe::connect(&cluster.url(), None, home.redis.mode)
        .await
        .expect("cluster connection");
    assert_eq!(
        claim(&mut con, &home, &owner("home"), None)
            .await
            .expect("claim"),
        Claim::Ours
    );
    match claim(&mut con, &other, &owner("other"), None)
        .await
        .expect("claim")
    {
        Claim::Taken { key, by } => {
            assert!(key.contains("prefix:hw:shared:"), "{key}");
            assert_eq!(by, owner("home"));
        }
        Claim::Ours => panic!("a prefix another pipeline holds must be refused"),
    }
}
