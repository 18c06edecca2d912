//! The serve side against real Postgres and Redis: core-api and the all-in-one `dev` process.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{RunningApi, Stack, http_get, http_request, metric_value as metric, start_api_on};
use testkit::eventually;
use tokio_util::sync::CancellationToken;
use widget_runtime::cache::{Cache, CacheWrite, decode_value};
use widget_runtime::store::{self, Change};
use widget_runtime::{Op, Outbox, WidgetEvent, dev};

const WAIT: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
pipeline: test
cache: {ingestTtl: 7d, fallbackTtl: 1h}
reclaim: {minIdle: 300ms, interval: 200ms, maxDeliveries: 3}
sources:
  - {name: deals, batchSize: 100, pollInterval: 50ms}
  - {name: loyalty, outboxTable: loyalty_outbox, batchSize: 100, pollInterval: 50ms}
screens:
  - {name: home, widgets: ["deals.top-picks", "deals.hot-deal", "loyalty.points:{user}", "deals.unknown"]}
  - {name: deals, widgets: ["deals.top-picks", "deals.hot-deal"]}
# These tests are about serving, not identity (that is `--test identity`): `?user=` is trusted.
identity: {mode: query}
"#;

async fn start_api(stack: &Stack) -> RunningApi {
    start_api_on(stack, &stack.redis.url()).await
}

fn change(key: &str, version: i64, content: Option<Value>) -> Change {
    Change {
        widget_key: key.into(),
        widget_type: "card".into(),
        source: key.split('.').next().unwrap_or_default().into(),
        data_version: version,
        op: if content.is_some() {
            Op::Upsert
        } else {
            Op::Delete
        },
        content: content.map(|c| c.to_string()),
    }
}

/// Stores widgets in Postgres only (as if the cache had lost them).
async fn store_widgets(stack: &Stack, changes: &[Change]) {
    let pool = stack.pool(&stack.core_url).await;
    store::apply_batch(&pool, changes).await.expect("apply");
    pool.close().await;
}

/// Writes widgets into the cache exactly as the ingester does (long TTL).
async fn cache_widgets(stack: &Stack, changes: &[Change]) -> Vec<bool> {
    let cache = Cache::new(stack.config.key_prefix());
    let jsons: Vec<Option<Vec<u8>>> = changes.iter().map(Change::widget_json).collect();
    let writes: Vec<CacheWrite<'_>> = changes
        .iter()
        .zip(&jsons)
        .map(|(c, j)| CacheWrite {
            widget_key: &c.widget_key,
            version: c.data_version,
            json: j.as_deref(),
            ttl: stack.config.cache.ingest_ttl,
        })
        .collect();
    cache
        .write_many(&mut stack.redis_conn().await, &writes)
        .await
        .expect("cache write")
}

/// (version, TTL in ms) of a widget's cache entry, if any.
async fn cached(stack: &Stack, key: &str) -> Option<(i64, i64)> {
    let full = Cache::new(stack.config.key_prefix()).key(key);
    let mut conn = stack.redis_conn().await;
    let raw: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&full)
        .query_async(&mut conn)
        .await
        .expect("get");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&full)
        .query_async(&mut conn)
        .await
        .expect("pttl");
    let version = match decode_value(&raw?)? {
        widget_runtime::cache::Cached::Widget { version, .. } => version,
        widget_runtime::cache::Cached::Deleted { version } => -version,
    };
    Some((version, ttl))
}

fn keys_of(widgets: &Value) -> Vec<String> {
    widgets
        .as_array()
        .expect("widgets is a list")
        .iter()
        .map(|w| w["key"].as_str().expect("key").to_string())
        .collect()
}

fn sample() -> Vec<Change> {
    vec![
        change("deals.top-picks", 3, Some(json!({"items": ["a", "b"]}))),
        change("deals.hot-deal", 7, Some(json!({"headline": "50% off"}))),
        change("loyalty.points:42", 2, Some(json!({"points": 1200}))),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_misses_backfill_and_unknown_keys() {
    let stack = Stack::with_config(CONFIG).await;
    let widgets = sample();
    store_widgets(&stack, &widgets).await;
    cache_widgets(&stack, &widgets[..1]).await; // only deals.top-picks is cached
    let api = start_api(&stack).await;

    let r = api.get("/v1/screens/home?user=42").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-widget-source"), Some("mixed"));
    let body = r.json();
    assert_eq!(body["screen"], "home");
    assert_eq!(
        keys_of(&body["widgets"]),
        ["deals.top-picks", "deals.hot-deal", "loyalty.points:42"]
    );
    assert_eq!(body["missing"], json!(["deals.unknown"]));
    assert_eq!(
        body["widgets"][0],
        json!({"key": "deals.top-picks", "type": "card", "version": 3, "content": {"items": ["a", "b"]}})
    );
    assert_eq!(body["widgets"][2]["content"], json!({"points": 1200}));

    // The misses were back-filled with a TTL near fallbackTtl (1h), not ingestTtl (7d).
    for key in ["deals.hot-deal", "loyalty.points:42"] {
        let (version, ttl) = eventually(WAIT, || async { cached(&stack, key).await })
            .await
            .unwrap_or_else(|| panic!("{key} back-filled"));
        assert!(version > 0);
        assert!(ttl > 3_500_000 && ttl <= 3_600_000, "{key}: TTL {ttl} ms");
    }
    let (_, ttl) = cached(&stack, "deals.top-picks").await.expect("cached");
    assert!(
        ttl > 3_600_000,
        "the ingester's entry keeps its long TTL: {ttl}"
    );

    // Now every known widget is a hit; the unknown key is still listed missing.
    let r = api.get("/v1/screens/home?user=42").await;
    assert_eq!(r.header("x-widget-source"), Some("cache"));
    assert_eq!(r.json()["missing"], json!(["deals.unknown"]));

    // The unknown key is remembered as absent in process, never written to Redis (made-up
    // keys must not fill the Redis that holds the stream): asking again costs Postgres nothing
    // ...
    assert_eq!(
        cached(&stack, "deals.unknown").await,
        None,
        "no marker in Redis"
    );
    let reads = |m: &str| metric(m, "widget_api_fallback_reads_total");
    let before = reads(&api.get("/metrics").await.body);
    for _ in 0..3 {
        let r = api.get("/v1/widgets?keys=deals.unknown").await;
        assert_eq!(r.json()["missing"], json!(["deals.unknown"]));
    }
    assert_eq!(reads(&api.get("/metrics").await.body), before);
    // ... and the first real write is served at once.
    let created = [change("deals.unknown", 1, Some(json!({"now": "known"})))];
    store_widgets(&stack, &created).await;
    cache_widgets(&stack, &created).await;
    let r = api.get("/v1/widgets?keys=deals.unknown").await;
    assert_eq!(r.json()["widgets"][0]["content"], json!({"now": "known"}));

    // An explicit list answers in the order asked.
    let r = api
        .get("/v1/widgets?keys=deals.hot-deal,deals.nope,deals.top-picks")
        .await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(
        keys_of(&body["widgets"]),
        ["deals.hot-deal", "deals.top-picks"]
    );
    assert_eq!(body["missing"], json!(["deals.nope"]));
    assert!(body.get("screen").is_none());

    // A deleted widget (tombstone) is missing, not served stale.
    let delete = [change("deals.hot-deal", 8, None)];
    store_widgets(&stack, &delete).await;
    cache_widgets(&stack, &delete).await;
    let r = api.get("/v1/screens/deals").await;
    assert_eq!(keys_of(&r.json()["widgets"]), ["deals.top-picks"]);
    assert_eq!(r.json()["missing"], json!(["deals.hot-deal"]));

    let metrics = api.get("/metrics").await.body;
    assert!(metrics.contains("widget_api_cache_hits_total"), "{metrics}");
    assert_eq!(api.get("/healthz").await.status, 200);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_never_replaces_a_newer_ingester_write() {
    let stack = Stack::with_config(CONFIG).await;
    store_widgets(
        &stack,
        &[change("deals.top-picks", 1, Some(json!({"v": 1})))],
    )
    .await;
    // Make the API's Postgres read slow, so the ingester's write lands between that read and
    // the back-fill: the interleaving that could put an old version over a new one.
    let pool = stack.pool(&stack.core_url).await;
    for sql in [
        "ALTER TABLE widgets RENAME TO widgets_real",
        "CREATE FUNCTION slow() RETURNS boolean LANGUAGE sql AS 'SELECT pg_sleep(0.4) IS NOT NULL OR true'",
        "CREATE VIEW widgets AS SELECT * FROM widgets_real WHERE slow()",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    let api = start_api(&stack).await;
    let addr = api.addr.clone();
    let request = tokio::spawn(async move { http_get(&addr, "/v1/screens/deals", &[]).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The ingester applies version 2 meanwhile (database first, then cache).
    sqlx::query("UPDATE widgets_real SET data_version = 2, content = '{\"v\": 2}'")
        .execute(&pool)
        .await
        .expect("update");
    let won = cache_widgets(
        &stack,
        &[change("deals.top-picks", 2, Some(json!({"v": 2})))],
    )
    .await;
    assert_eq!(won, [true]);

    let r = request.await.expect("request").expect("answer");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["widgets"][0]["version"],
        1,
        "the read began before version 2"
    );
    // Give the back-fill of version 1 time to run, then check it lost.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (version, ttl) = cached(&stack, "deals.top-picks").await.expect("cached");
    assert_eq!(
        version, 2,
        "the newer ingester write survives the back-fill"
    );
    assert!(ttl > 3_600_000, "with its long TTL: {ttl}");
    let r = api.get("/v1/screens/deals").await;
    assert_eq!(r.json()["widgets"][0]["content"], json!({"v": 2}));
    assert_eq!(r.header("x-widget-source"), Some("cache"));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_key_read_postgres_once() {
    let stack = Stack::with_config(CONFIG).await;
    store_widgets(&stack, &sample()).await;
    let pool = stack.pool(&stack.core_url).await;
    // Slow reads widen the window in which the requests overlap.
    for sql in [
        "ALTER TABLE widgets RENAME TO widgets_real",
        "CREATE FUNCTION slow() RETURNS boolean LANGUAGE sql AS 'SELECT pg_sleep(0.3) IS NOT NULL OR true'",
        "CREATE VIEW widgets AS SELECT * FROM widgets_real WHERE slow()",
    ] {
        sqlx::query(sql).execute(&pool).await.expect(sql);
    }
    let api = start_api(&stack).await;
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let addr = api.addr.clone();
            tokio::spawn(
                async move { http_get(&addr, "/v1/widgets?keys=deals.hot-deal", &[]).await },
            )
        })
        .collect();
    for r in requests {
        let r = r.await.expect("task").expect("answer");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["widgets"][0]["version"], 7);
    }
    let metrics = api.get("/metrics").await.body;
    let reads: f64 = metrics
        .lines()
        .find(|l| l.starts_with("widget_api_fallback_reads_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("fallback reads metric: {metrics}"));
    assert!(
        reads <= 2.0,
        "20 concurrent misses of one key made {reads} Postgres reads"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degrades_when_a_store_is_down_and_recovers() {
    // Without the in-process cache, so every request shows which store answered (with it, a
    // hung Redis takes no writes, so what it held is still served: see local_cache.rs).
    let mut stack = Stack::with_config(&format!("{CONFIG}localCache: {{enabled: false}}\n")).await;
    let widgets = sample();
    store_widgets(&stack, &widgets).await;
    cache_widgets(&stack, &widgets[..1]).await;
    let api = start_api(&stack).await;
    assert_eq!(
        api.get("/v1/screens/deals").await.header("x-widget-source"),
        Some("mixed")
    );

    // Redis hangs: the first requests wait out the Redis timeout (250 ms) and the prober's
    // failed PINGs open the circuit; after that no request touches Redis, so none fails on it
    // and none waits for it.
    stack.redis.pause();
    let opened = eventually(WAIT, || async {
        let r = api.get("/v1/screens/home?user=42").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-widget-source"), Some("database"));
        metric(
            &api.get("/metrics").await.body,
            "widget_api_circuit_open{store=\"redis\"}",
        )
        .filter(|v| *v == 1.0)
    })
    .await;
    assert!(opened.is_some(), "the Redis circuit opens");
    let errors = |m: &str| metric(m, "widget_api_store_errors_total{store=\"redis\"}");
    let before = errors(&api.get("/metrics").await.body);
    let start = Instant::now();
    for _ in 0..8 {
        let r = api.get("/v1/screens/home?user=42").await;
        assert_eq!(r.header("x-widget-source"), Some("database"));
    }
    let took = start.elapsed();
    assert_eq!(
        errors(&api.get("/metrics").await.body),
        before,
        "no request tried Redis while the circuit was open"
    );
    // Each of them would take at least the 250 ms Redis timeout if it waited on Redis.
    assert!(
        took < Duration::from_millis(8 * 250),
        "8 requests in {took:?}"
    );
    stack.redis.resume();
    let back = eventually(WAIT, || async {
        let r = api.get("/v1/screens/deals").await;
        // The first request's misses were back-filled, so "cache" (or "mixed" if they expired).
        matches!(r.header("x-widget-source"), Some("cache" | "mixed")).then_some(())
    })
    .await;
    assert!(back.is_some(), "the cache is used again when Redis answers");

    // Redis down: screens come from Postgres; once the circuit is open no request waits on Redis.
    stack.redis.stop().await;
    let mut slowest_after_open = Duration::ZERO;
    for i in 0..12 {
        let start = Instant::now();
        let r = api.get("/v1/screens/home?user=42").await;
        let took = start.elapsed();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-widget-source"), Some("database"));
        assert_eq!(
            keys_of(&r.json()["widgets"]),
            ["deals.top-picks", "deals.hot-deal", "loyalty.points:42"]
        );
        if i >= 4 {
            slowest_after_open = slowest_after_open.max(took);
        }
    }
    assert!(
        slowest_after_open < Duration::from_secs(1),
        "circuit open: requests do not wait on Redis ({slowest_after_open:?})"
    );
    let metrics = api.get("/metrics").await.body;
    assert!(
        metrics.contains("widget_api_circuit_open{store=\"redis\"} 1"),
        "{metrics}"
    );

    stack.redis.start_again().await.expect("redis restarts");
    let back = eventually(WAIT, || async {
        let r = api.get("/v1/screens/deals").await;
        (r.header("x-widget-source") == Some("cache")).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "the cache is used again after Redis returns"
    );

    // Postgres down: hits are served, misses listed.
    stack.pg.stop().await;
    let r = api.get("/v1/screens/home?user=7").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-widget-source"), Some("cache"));
    let body = r.json();
    assert_eq!(
        keys_of(&body["widgets"]),
        ["deals.top-picks", "deals.hot-deal"]
    );
    assert_eq!(
        body["missing"],
        json!(["loyalty.points:7", "deals.unknown"])
    );

    // Both down: 503 with a JSON error.
    stack.redis.stop().await;
    let r = eventually(WAIT, || async {
        let r = api.get("/v1/screens/home?user=7").await;
        (r.status == 503).then_some(r)
    })
    .await
    .expect("503 when neither store answers");
    assert_eq!(r.json()["error"]["code"], "stores_unavailable");
    let unready = eventually(WAIT, || async {
        (api.get("/readyz").await.status == 503).then_some(())
    })
    .await;
    assert!(unready.is_some(), "not ready once both circuits are open");

    stack.pg.start_again().await.expect("postgres restarts");
    stack.redis.start_again().await.expect("redis restarts");
    let healed = eventually(WAIT, || async {
        let r = api.get("/v1/screens/home?user=42").await;
        (r.status == 200 && r.json()["missing"] == json!(["deals.unknown"])).then_some(())
    })
    .await;
    assert!(
        healed.is_some(),
        "serves everything again once both stores are back"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_a_json_error() {
    let stack = Stack::with_config(CONFIG).await;
    let api = start_api(&stack).await;
    let many: Vec<String> = (0..101).map(|i| format!("deals.w{i}")).collect();
    let cases = [
        (
            format!("/v1/widgets?keys={}", many.join(",")),
            400,
            "too_many_keys",
        ),
        ("/v1/widgets?keys=deals.ok,NOT-A-KEY".into(), 400, "bad_key"),
        ("/v1/widgets?keys=deals.x:a%20b".into(), 400, "bad_key"),
        ("/v1/widgets".into(), 400, "missing_keys"),
        ("/v1/screens/home?user=bad%20user".into(), 400, "bad_user"),
        ("/v1/screens/home?user=".into(), 400, "bad_user"),
        ("/v1/screens/home".into(), 400, "user_required"),
        ("/v1/screens/nope".into(), 404, "unknown_screen"),
        ("/v2/whatever".into(), 404, "not_found"),
    ];
    for (path, status, code) in cases {
        let r = api.get(&path).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
        let body = r.json();
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{path}"
        );
    }
    // Other methods: 405, still a JSON error, with Allow.
    for (method, path) in [
        ("POST", "/v1/widgets?keys=deals.a"),
        ("DELETE", "/v1/screens/home"),
    ] {
        let r = http_request(&api.addr, method, path, &[])
            .await
            .unwrap_or_else(|| panic!("{method} {path}: no HTTP answer"));
        assert_eq!(r.status, 405, "{method} {path}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
        assert_eq!(
            r.json()["error"]["code"],
            "method_not_allowed",
            "{method} {path}"
        );
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etag_round_trip_and_change_on_a_new_version() {
    let stack = Stack::with_config(CONFIG).await;
    let widgets = sample();
    store_widgets(&stack, &widgets).await;
    cache_widgets(&stack, &widgets).await;
    let api = start_api(&stack).await;

    let first = api.get("/v1/screens/deals").await;
    assert_eq!(first.status, 200);
    let tag = first.header("etag").expect("ETag on a 200").to_string();
    let again = api
        .get_with("/v1/screens/deals", &[("If-None-Match", &tag)])
        .await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty(), "304 has no body");
    assert_eq!(again.header("etag"), Some(tag.as_str()));

    let newer = [change(
        "deals.hot-deal",
        8,
        Some(json!({"headline": "60% off"})),
    )];
    store_widgets(&stack, &newer).await;
    cache_widgets(&stack, &newer).await;
    let changed = api
        .get_with("/v1/screens/deals", &[("If-None-Match", &tag)])
        .await;
    assert_eq!(changed.status, 200, "a new version invalidates the old tag");
    let new_tag = changed.header("etag").expect("etag");
    assert_ne!(new_tag, tag);
    assert_eq!(changed.json()["widgets"][1]["version"], 8);
    api.stop().await;
}

/// The whole pipeline in one process (`dev::run`), both sources on one product database, each
/// with its own outbox table, as `dev` allows. Returns the product pool, the API address, the
/// cancel token and the task.
async fn start_dev(
    stack: &Stack,
) -> (
    sqlx::PgPool,
    String,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let product = stack.pool(&stack.product_url).await;
    sqlx::query("CREATE TABLE loyalty_outbox (LIKE widget_outbox INCLUDING ALL)")
        .execute(&product)
        .await
        .expect("loyalty outbox");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let cancel = CancellationToken::new();
    let stores = dev::DevStores {
        redis_url: stack.redis.url(),
        core_database_url: stack.core_url.clone(),
        source_database_url: stack.product_url.clone(),
    };
    let running = tokio::spawn(dev::run(
        stack.config.clone(),
        stores,
        listener,
        cancel.clone(),
    ));
    (product, addr, cancel, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_in_one_process_product_write_reaches_the_api() {
    let stack = Stack::with_config(CONFIG).await;
    let (product, addr, cancel, running) = start_dev(&stack).await;

    let publish = |version: i64, title: &'static str| {
        let product = product.clone();
        async move {
            let mut tx = product.begin().await.expect("begin");
            let event = WidgetEvent::upsert(
                "deals.top-picks",
                "carousel",
                version,
                json!({"title": title}),
            );
            Outbox::enqueue(&mut tx, &event).await.expect("enqueue");
            tx.commit().await.expect("commit");
        }
    };
    publish(1, "first").await;
    let loyalty = Outbox::with_table("loyalty_outbox").expect("table");
    let mut tx = product.begin().await.expect("begin");
    loyalty
        .push(
            &mut tx,
            &WidgetEvent::upsert("loyalty.points:42", "points", 5, json!({"points": 10})),
        )
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    let shows = |version: i64| {
        let addr = addr.clone();
        async move {
            eventually(WAIT, || {
                let addr = addr.clone();
                async move {
                    let r = http_get(&addr, "/v1/screens/home?user=42", &[]).await?;
                    let body: Value = serde_json::from_str(&r.body).ok()?;
                    let w = body["widgets"].as_array()?;
                    let top = w.iter().find(|w| w["key"] == "deals.top-picks")?;
                    let points = w.iter().find(|w| w["key"] == "loyalty.points:42")?;
                    (top["version"] == version && points["version"] == 5).then_some(body)
                }
            })
            .await
        }
    };
    let body = shows(1).await.expect("the first version reaches the API");
    assert_eq!(body["widgets"][0]["content"], json!({"title": "first"}));
    publish(2, "second").await;
    let body = shows(2).await.expect("the new version reaches the API");
    assert_eq!(body["widgets"][0]["content"], json!({"title": "second"}));
    assert_eq!(body["missing"], json!(["deals.hot-deal", "deals.unknown"]));

    cancel.cancel();
    running.await.expect("dev task").expect("dev stops cleanly");
}

/// The size a producer is told fits (64 KiB of compact JSON) is what holds end to end: a widget
/// of about 59 KB compact, whose Postgres jsonb text is over 64 KiB, is relayed compact, applied
/// and served; one over the limit is refused by the library, and written around it with plain
/// SQL it is dead-lettered with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_content_limit_a_producer_is_told_holds_end_to_end() {
    let stack = Stack::with_config(CONFIG).await;
    let (product, addr, cancel, running) = start_dev(&stack).await;

    let items: Vec<Value> = (0..4200).map(|i| json!({"a": i % 10, "b": 7})).collect();
    let content = json!({"items": items});
    let compact = serde_json::to_vec(&content).expect("json").len();
    assert!(
        (55_000..65_536).contains(&compact),
        "{compact} bytes compact"
    );
    let mut tx = product.begin().await.expect("begin");
    Outbox::enqueue(
        &mut tx,
        &WidgetEvent::upsert("deals.top-picks", "carousel", 1, content),
    )
    .await
    .expect("fits the limit");
    tx.commit().await.expect("commit");
    let as_text: i32 = sqlx::query_scalar("SELECT octet_length(content::text) FROM widget_outbox")
        .fetch_one(&product)
        .await
        .expect("text size");
    assert!(
        as_text > 65_536,
        "Postgres renders it larger: {as_text} bytes"
    );

    let served = eventually(WAIT, || {
        let addr = addr.clone();
        async move {
            let r = http_get(&addr, "/v1/widgets?keys=deals.top-picks", &[]).await?;
            let body: Value = serde_json::from_str(&r.body).ok()?;
            (body["widgets"][0]["version"] == 1).then_some(body)
        }
    })
    .await
    .expect("the 59 KB widget is applied and served");
    assert_eq!(
        served["widgets"][0]["content"]["items"][4199],
        json!({"a": 9, "b": 7})
    );

    // Over the limit: the library refuses it before anything is written ...
    let big = json!({"blob": "x".repeat(70_000)});
    let mut tx = product.begin().await.expect("begin");
    let refused = Outbox::enqueue(
        &mut tx,
        &WidgetEvent::upsert("deals.hot-deal", "banner", 1, big.clone()),
    )
    .await;
    assert!(
        refused.is_err(),
        "the library refuses content over the limit"
    );
    drop(tx);
    // ... and written around it with plain SQL, it is dead-lettered with its reason.
    sqlx::query(
        "INSERT INTO widget_outbox (widget_key, widget_type, data_version, op, content)
         VALUES ('deals.hot-deal', 'banner', 1, 'upsert', $1)",
    )
    .bind(&big)
    .execute(&product)
    .await
    .expect("plain insert");
    let conn = stack.redis_conn().await;
    let dead_stream = stack.config.dead_letter_stream();
    let reason = eventually(WAIT, || {
        let (mut conn, dead_stream) = (conn.clone(), dead_stream.clone());
        async move {
            let entries = support::read_stream(&mut conn, &dead_stream).await;
            entries
                .iter()
                .find(|(_, m)| support::field_str(m, "widget_key") == "deals.hot-deal")
                .map(|(_, m)| support::field_str(m, "reason"))
        }
    })
    .await
    .expect("dead-lettered");
    assert_eq!(reason, "content-too-large");
    cancel.cancel();
    running.await.expect("dev task").expect("dev stops cleanly");
}
