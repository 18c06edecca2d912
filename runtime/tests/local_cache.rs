//! core-api's in-process cache against a real Redis: invalidations keep it fresh, a lost
//! tracking connection flushes it, it stays within its byte bound; made-up keys add nothing to
//! Redis; a large slow reply does not open the Redis circuit.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::Rng;
use testkit::{TcpProxy, eventually};
use widget_runtime::cache::{Cache, CacheWrite, widget_json};

use support::{Stack, start_api_on};

const CONFIG: &str = r#"
pipeline: l1
sources:
  - {name: deals}
screens:
  - {name: home, widgets: ["deals.w-0", "deals.w-1"]}
"#;

/// Writes `key` at `version` straight into the cache, as any client (the ingester, a
/// re-warm, an operator's script) does: through the version-guarded script.
async fn put(stack: &Stack, key: &str, version: i64, pad: usize) {
    let cache = Cache::new(stack.config.key_prefix());
    let content = serde_json::json!({"v": version, "pad": "x".repeat(pad)}).to_string();
    let json = widget_json(key, "card", version, content.as_bytes());
    let mut conn = stack.redis_conn().await;
    let won = cache
        .write_many(
            &mut conn,
            &[CacheWrite {
                widget_key: key,
                version,
                json: Some(&json),
                ttl: Duration::from_secs(3600),
            }],
        )
        .await
        .expect("cache write");
    assert_eq!(won, vec![true], "{key} v{version} written");
}

/// The version the API serves for `key`, `None` when it lists it missing or fails.
async fn served(api: &support::RunningApi, key: &str) -> Option<i64> {
    let r = api.get(&format!("/v1/widgets?keys={key}")).await;
    if r.status != 200 {
        return None;
    }
    r.json()["widgets"][0]["version"].as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_served_within_100_ms_and_never_an_older_version_after_a_newer() {
    let stack = Stack::with_config(CONFIG).await;
    let api = start_api_on(&stack, &stack.redis.url()).await;
    let keys: Vec<String> = (0..20).map(|i| format!("deals.w-{i}")).collect();
    let mut last: HashMap<&str, i64> = HashMap::new();
    for k in &keys {
        put(&stack, k, 1, 200).await;
        last.insert(k, 1);
    }
    // Filled, and served from process memory from now on.
    for k in &keys {
        assert!(
            eventually(Duration::from_secs(10), || async {
                (served(&api, k).await == Some(1)).then_some(())
            })
            .await
            .is_some()
        );
    }
    let hits_before = api.metric("widget_api_local_hits_total").await;
    for k in &keys {
        assert_eq!(served(&api, k).await, Some(1));
    }
    assert!(
        api.metric("widget_api_local_hits_total").await >= hits_before + 20.0,
        "repeated reads are local hits"
    );

    let mut fresh = Vec::new();
    for _ in 0..1000 {
        let k = keys[rand::rng().random_range(0..keys.len())].as_str();
        let v = last[k] + 1;
        put(&stack, k, v, 200).await;
        let written = Instant::now();
        loop {
            let got = served(&api, k).await;
            assert!(
                got.is_some_and(|g| g >= v - 1),
                "{k}: served {got:?} after v{} was seen",
                v - 1
            );
            if got == Some(v) {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(5),
                "{k} v{v} never served"
            );
        }
        fresh.push(written.elapsed());
        last.insert(k, v);
        // A read of another key: never older than what was last seen for it.
        let other = keys[rand::rng().random_range(0..keys.len())].as_str();
        let got = served(&api, other).await;
        assert!(
            got.is_some_and(|g| g >= last[other]),
            "{other}: {got:?} < v{}",
            last[other]
        );
    }
    fresh.sort();
    let p99 = fresh[fresh.len() * 99 / 100];
    println!(
        "write to served: p50 {:?}, p99 {p99:?}, max {:?}",
        fresh[fresh.len() / 2],
        fresh[fresh.len() - 1]
    );
    assert!(p99 <= Duration::from_millis(100), "freshness p99 {p99:?}");
    assert!(api.metric("widget_api_local_invalidations_total").await >= 1000.0);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_with_other_data_nothing_it_no_longer_has_is_served() {
    let mut stack = Stack::with_config(CONFIG).await;
    let api = start_api_on(&stack, &stack.redis.url()).await;
    put(&stack, "deals.w-0", 5, 100).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            (served(&api, "deals.w-0").await == Some(5)).then_some(())
        })
        .await
        .is_some()
    );
    let hits = api.metric("widget_api_local_hits_total").await;
    assert_eq!(served(&api, "deals.w-0").await, Some(5));
    assert!(
        api.metric("widget_api_local_hits_total").await > hits,
        "served from process memory"
    );

    // Redis dies and comes back empty; someone writes an older version than the one cached.
    stack.redis.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(
        served(&api, "deals.w-0").await,
        Some(5),
        "not served while Redis is gone (Postgres has nothing)"
    );
    stack.redis.start_again().await.expect("redis restarts");
    put(&stack, "deals.w-0", 2, 100).await;
    let seen = eventually(Duration::from_secs(15), || async {
        let got = served(&api, "deals.w-0").await;
        assert_ne!(got, Some(5), "the flushed version is never served again");
        (got == Some(2)).then_some(())
    })
    .await;
    assert!(seen.is_some(), "what Redis has now is served");
    assert!(api.metric("widget_api_local_flushes_total").await >= 1.0);
    // And it is cached again, coherently: the next write is seen.
    put(&stack, "deals.w-0", 3, 100).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            (served(&api, "deals.w-0").await == Some(3)).then_some(())
        })
        .await
        .is_some()
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widgets_of_four_times_the_bound_keep_the_cache_within_it_and_are_all_served() {
    let stack = Stack::with_config(&format!("{CONFIG}localCache: {{maxBytes: 1048576}}\n")).await;
    let api = start_api_on(&stack, &stack.redis.url()).await;
    // 70 widgets of about 60 KB: 4 MiB.
    let keys: Vec<String> = (0..70).map(|i| format!("deals.big-{i}")).collect();
    for k in &keys {
        put(&stack, k, 1, 60_000).await;
    }
    for _ in 0..3 {
        for k in &keys {
            assert_eq!(served(&api, k).await, Some(1), "{k} served");
        }
    }
    let bytes = api.metric("widget_api_local_bytes").await;
    println!("local cache holds {bytes} bytes");
    assert!(bytes > 0.0, "something is cached");
    assert!(bytes <= 1048576.0 * 1.1, "{bytes} bytes held, bound 1 MiB");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_keys_add_nothing_to_redis_and_keys_of_unknown_sources_are_refused() {
    let stack = Stack::with_config(CONFIG).await;
    let api = start_api_on(&stack, &stack.redis.url()).await;
    let dbsize = || async {
        let mut conn = stack.redis_conn().await;
        redis::cmd("DBSIZE")
            .query_async::<i64>(&mut conn)
            .await
            .expect("DBSIZE")
    };
    // Let the API's own keys (stats) settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = dbsize().await;
    for _ in 0..50 {
        let keys: Vec<String> = (0..100)
            .map(|_| format!("deals.nosuch-{}", rand::rng().random::<u64>()))
            .collect();
        let r = api
            .get(&format!("/v1/widgets?keys={}", keys.join(",")))
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["missing"].as_array().map(Vec::len), Some(100));
    }
    assert!(
        dbsize().await <= before + 1,
        "5,000 made-up keys left no Redis keys"
    );
    // Asked again, a key just found absent costs Postgres nothing.
    let _ = api.get("/v1/widgets?keys=deals.nosuch-again").await;
    let reads = api.metric("widget_api_fallback_reads_total").await;
    for _ in 0..5 {
        let _ = api.get("/v1/widgets?keys=deals.nosuch-again").await;
    }
    assert_eq!(api.metric("widget_api_fallback_reads_total").await, reads);

    let r = api.get("/v1/widgets?keys=deals.w-0,nosuch.w-0").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "unknown_source");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_reply_slower_than_the_budget_does_not_open_the_redis_circuit() {
    let stack = Stack::with_config(&format!("{CONFIG}localCache: {{enabled: false}}\n")).await;
    let keys: Vec<String> = (0..100).map(|i| format!("deals.big-{i}")).collect();
    for k in &keys {
        put(&stack, k, 1, 60_000).await;
    }
    // Every chunk of bytes waits 5 ms: a PING still answers in about 10 ms, a 6 MB reply
    // takes far longer than the request's 250 ms budget.
    let proxy = TcpProxy::start(stack.redis.port()).await.expect("proxy");
    proxy.set_latency(Duration::from_millis(5));
    let api = start_api_on(&stack, &format!("redis://127.0.0.1:{}/", proxy.port())).await;
    let path = format!("/v1/widgets?keys={}", keys.join(","));
    for _ in 0..10 {
        let r = api.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(
        api.metric("widget_api_store_errors_total{store=\"redis\"}")
            .await
            >= 3.0,
        "the replies did exceed the budget"
    );
    assert_eq!(
        api.metric("widget_api_circuit_open{store=\"redis\"}").await,
        0.0,
        "a slow large reply is not a Redis failure"
    );
    // Small reads come from Redis again once the queued large replies have drained (they
    // share one multiplexed connection).
    let from_cache = eventually(Duration::from_secs(30), || async {
        let r = api.get("/v1/widgets?keys=deals.big-0").await;
        (r.header("x-widget-source") == Some("cache")).then_some(())
    })
    .await;
    assert!(from_cache.is_some(), "Redis still serves");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_screen_is_reused_until_one_of_its_widgets_changes() {
    let stack = Stack::with_config(
        r#"
pipeline: l1s
sources:
  - {name: deals}
screens:
  - {name: home, widgets: ["deals.w-0", "deals.w-1", "deals.points:{user}"]}
identity: {mode: header, header: x-user-id}
"#,
    )
    .await;
    let api = start_api_on(&stack, &stack.redis.url()).await;
    for (k, v) in [
        ("deals.w-0", 1),
        ("deals.w-1", 1),
        ("deals.points:a", 1),
        ("deals.points:b", 1),
    ] {
        put(&stack, k, v, 50).await;
    }
    let screen = |user: &'static str| {
        let api = &api;
        async move {
            let r = api
                .get_with("/v1/screens/home", &[("x-user-id", user)])
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            let versions: Vec<(String, i64)> = r.json()["widgets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| {
                    (
                        w["key"].as_str().unwrap_or_default().to_string(),
                        w["version"].as_i64().unwrap_or(0),
                    )
                })
                .collect();
            (versions, r.header("etag").map(str::to_string))
        }
    };
    let want = |w0: i64, w1: i64, user: &str, p: i64| {
        vec![
            ("deals.w-0".to_string(), w0),
            ("deals.w-1".to_string(), w1),
            (format!("deals.points:{user}"), p),
        ]
    };
    // Filled once, then served whole.
    assert!(
        eventually(Duration::from_secs(10), || async {
            (screen("a").await.0 == want(1, 1, "a", 1)).then_some(())
        })
        .await
        .is_some()
    );
    let whole = api.metric("widget_api_local_screens_total").await;
    let (first, tag) = screen("a").await;
    assert_eq!(first, want(1, 1, "a", 1));
    assert!(
        api.metric("widget_api_local_screens_total").await > whole,
        "served whole"
    );
    assert_eq!(
        screen("b").await.0,
        want(1, 1, "b", 1),
        "each user has their own"
    );

    // A shared widget changes: every user's screen shows it.
    put(&stack, "deals.w-1", 2, 50).await;
    for user in ["a", "b"] {
        let seen = eventually(Duration::from_secs(2), || async {
            (screen(user).await.0 == want(1, 2, user, 1)).then_some(())
        })
        .await;
        assert!(seen.is_some(), "{user} sees deals.w-1 v2");
    }
    let (_, tag2) = screen("a").await;
    assert_ne!(tag, tag2, "a new ETag with the new version");
    // One user's widget changes: theirs shows it, the other's is untouched.
    put(&stack, "deals.points:a", 7, 50).await;
    let seen = eventually(Duration::from_secs(2), || async {
        (screen("a").await.0 == want(1, 2, "a", 7)).then_some(())
    })
    .await;
    assert!(seen.is_some(), "a sees their points v7");
    assert_eq!(screen("b").await.0, want(1, 2, "b", 1));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_shared_connection_is_replaced_within_seconds() {
    let stack = Stack::with_config(&format!("{CONFIG}localCache: {{enabled: false}}\n")).await;
    put(&stack, "deals.w-0", 3, 100).await;
    let proxy = TcpProxy::start(stack.redis.port()).await.expect("proxy");
    let api = start_api_on(&stack, &format!("redis://127.0.0.1:{}/", proxy.port())).await;
    let from_cache = || async {
        let r = api.get("/v1/widgets?keys=deals.w-0").await;
        r.header("x-widget-source") == Some("cache")
    };
    // Requests take the shared connections in turn: every one of them is open.
    for _ in 0..8 {
        assert!(from_cache().await);
    }
    // A failover behind the address: the old connections swallow everything and are never
    // reset, new ones reach a healthy Redis.
    proxy.blackhole_open_connections();
    let start = Instant::now();
    let back = eventually(Duration::from_secs(15), || async {
        for _ in 0..8 {
            if !from_cache().await {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(back.is_some(), "served from Redis again");
    println!("served from Redis again after {:?}", start.elapsed());
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "replaced well before the kernel gives up on the socket: {:?}",
        start.elapsed()
    );
    api.stop().await;
}

/// calls of `cmd` the server at `url` has counted (`INFO commandstats`).
async fn calls(server: &testkit::RedisServer, cmd: &str) -> u64 {
    let mut conn = server.connection().await.expect("redis");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("info");
    info.lines()
        .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

// With a read replica, every cache read and its invalidations come from the replica, and the
// in-process cache stays coherent with it; back-fills go to the primary (a replica refuses
// writes) and reach the replica by replication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_a_replica_stay_coherent_and_back_fills_go_to_the_primary() {
    let stack = Stack::with_config(CONFIG).await;
    let replica = testkit::RedisServer::start_replica_of(&stack.redis)
        .await
        .expect("replica");
    replica
        .wait_in_sync(Duration::from_secs(20))
        .await
        .expect("in sync");
    put(&stack, "deals.w-0", 1, 10).await;
    let endpoints = widget_runtime::api::RedisEndpoints {
        primary: redis::Client::open(stack.redis.url()).expect("url").into(),
        read: Some(redis::Client::open(replica.url()).expect("url").into()),
    };
    let api = support::start_api_with(&stack, endpoints).await;
    let seen = |v: i64| {
        let api = &api;
        async move {
            eventually(Duration::from_secs(5), || async {
                (served(api, "deals.w-0").await == Some(v)).then_some(())
            })
            .await
            .is_some()
        }
    };
    assert!(seen(1).await, "v1 served from the replica");
    for _ in 0..5 {
        assert_eq!(served(&api, "deals.w-0").await, Some(1));
    }
    // Written to the primary: the replica's invalidation drops the in-process copy.
    put(&stack, "deals.w-0", 2, 10).await;
    assert!(seen(2).await, "v2 served after the write replicated");

    // A widget only Postgres has: read there, back-filled into the primary.
    let core = stack.pool(&stack.core_url).await;
    support::store_widget(&core, "deals.w-9", 4, serde_json::json!({})).await;
    assert_eq!(served(&api, "deals.w-9").await, Some(4));
    let key = format!("{}w:deals.w-9", stack.config.key_prefix());
    let primary = stack.redis_conn().await;
    let filled = eventually(Duration::from_secs(5), || {
        let (mut c, key) = (primary.clone(), key.clone());
        async move {
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(&mut c).await.ok()?;
            v.map(|_| ())
        }
    })
    .await;
    assert!(filled.is_some(), "the back-fill is in the primary");
    assert!(
        calls(&replica, "mget").await > 0,
        "reads went to the replica"
    );
    assert_eq!(
        calls(&stack.redis, "mget").await,
        0,
        "no read went to the primary"
    );
    api.stop().await;
}
