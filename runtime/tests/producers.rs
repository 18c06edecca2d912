//! Producers in any language: the SQL functions installed by the product migrations, held to
//! the Rust library's rules; the statement trigger that wakes the worker for a plain `INSERT`;
//! the per-key version counter; and the Python example run for real against the pipeline.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use support::{Stack, http_get, start_api_on, start_ingester_on, start_source_worker};
use testkit::eventually;
use widget_runtime::event::{MAX_CONTENT_BYTES, Op};
use widget_runtime::{Outbox, WidgetEvent};

const CONFIG: &str = r#"
pipeline: test
reclaim: {minIdle: 300ms, interval: 200ms, maxDeliveries: 3}
sources:
  - {name: deals, batchSize: 100, pollInterval: 3s}
screens:
  - {name: deals, widgets: ["deals.top-picks"]}
"#;

/// One event for both producers: the Rust library and the SQL functions.
fn event(key: &str, widget_type: &str, version: i64, content: Option<Value>) -> WidgetEvent {
    WidgetEvent {
        widget_key: key.into(),
        widget_type: widget_type.into(),
        data_version: version,
        op: if content.is_some() {
            Op::Upsert
        } else {
            Op::Delete
        },
        content,
    }
}

/// A string content whose compact JSON is exactly `bytes` long.
fn sized(bytes: usize) -> Value {
    json!("x".repeat(bytes - 2))
}

fn cases() -> Vec<(&'static str, WidgetEvent)> {
    let many = |n: usize| Value::Array((0..n).map(|i| json!(i % 10)).collect());
    vec![
        (
            "plain",
            event("deals.top-picks", "card", 1, Some(json!({"a": 1}))),
        ),
        (
            "param",
            event("loyalty.points:u-42_x", "points", 7, Some(json!([1, 2]))),
        ),
        (
            "dotted name",
            event("deals.a.b-c_d", "card", 1, Some(json!(null))),
        ),
        ("delete", event("deals.gone", "card", 3, None)),
        ("empty key", event("", "card", 1, Some(json!(1)))),
        ("no dot", event("deals", "card", 1, Some(json!(1)))),
        ("upper source", event("Deals.x", "card", 1, Some(json!(1)))),
        (
            "source with dot start",
            event(".x", "card", 1, Some(json!(1))),
        ),
        ("empty name", event("deals.", "card", 1, Some(json!(1)))),
        (
            "name starts with dash",
            event("deals.-x", "card", 1, Some(json!(1))),
        ),
        ("empty param", event("deals.x:", "card", 1, Some(json!(1)))),
        (
            "param with colon",
            event("deals.x:a:b", "card", 1, Some(json!(1))),
        ),
        (
            "param too long",
            event(
                &format!("deals.x:{}", "a".repeat(65)),
                "card",
                1,
                Some(json!(1)),
            ),
        ),
        (
            "param at 64",
            event(
                &format!("deals.x:{}", "a".repeat(64)),
                "card",
                1,
                Some(json!(1)),
            ),
        ),
        (
            "key too long",
            event(
                &format!("deals.{}", "a".repeat(195)),
                "card",
                1,
                Some(json!(1)),
            ),
        ),
        (
            "key at 200",
            event(
                &format!("deals.{}", "a".repeat(194)),
                "card",
                1,
                Some(json!(1)),
            ),
        ),
        (
            "non-ascii key",
            event("deals.café", "card", 1, Some(json!(1))),
        ),
        ("empty type", event("deals.x", "", 1, Some(json!(1)))),
        ("upper type", event("deals.x", "Card", 1, Some(json!(1)))),
        (
            "type at 64",
            event("deals.x", &"t".repeat(64), 1, Some(json!(1))),
        ),
        (
            "type too long",
            event("deals.x", &"t".repeat(65), 1, Some(json!(1))),
        ),
        ("version 0", event("deals.x", "card", 0, Some(json!(1)))),
        (
            "negative version",
            event("deals.x", "card", -5, Some(json!(1))),
        ),
        (
            "content at the limit",
            event("deals.x", "card", 1, Some(sized(MAX_CONTENT_BYTES))),
        ),
        (
            "content over the limit",
            event("deals.x", "card", 1, Some(sized(MAX_CONTENT_BYTES + 1))),
        ),
        // n one-digit numbers are 2n+1 bytes compact and 3n as jsonb text: 32,767 of them are
        // 65,535 bytes compact (98 KB as text), 32,768 are 65,537.
        (
            "many numbers, compact under",
            event("deals.x", "card", 1, Some(many(32_767))),
        ),
        (
            "many numbers, compact over",
            event("deals.x", "card", 1, Some(many(32_768))),
        ),
        (
            "nested strings with separators",
            event(
                "deals.x",
                "card",
                1,
                Some(json!({"a, b": "c: d", "e": ["f, g"]})),
            ),
        ),
    ]
}

/// The SQL function's verdict: `Ok` or the SQLSTATE it raised. Always rolled back.
async fn sql_verdict(pool: &PgPool, e: &WidgetEvent) -> Result<(), String> {
    let mut tx = pool.begin().await.expect("begin");
    let result = match e.op {
        Op::Upsert => {
            sqlx::query("SELECT widget_enqueue($1, $2, $3, $4)")
                .bind(&e.widget_key)
                .bind(&e.widget_type)
                .bind(e.data_version)
                .bind(&e.content)
                .execute(&mut *tx)
                .await
        }
        Op::Delete => {
            sqlx::query("SELECT widget_delete($1, $2, $3)")
                .bind(&e.widget_key)
                .bind(e.data_version)
                .bind(&e.widget_type)
                .execute(&mut *tx)
                .await
        }
    };
    tx.rollback().await.expect("rollback");
    result.map(|_| ()).map_err(|err| match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()).unwrap_or_default(),
        other => other.to_string(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_functions_and_the_rust_library_give_the_same_verdicts() {
    let stack = Stack::with_config(CONFIG).await;
    let product = stack.pool(&stack.product_url).await;
    for (what, e) in cases() {
        let rust = e.validate().map(|_| ());
        let sql = sql_verdict(&product, &e).await;
        assert_eq!(
            rust.is_ok(),
            sql.is_ok(),
            "{what}: library {rust:?}, SQL {sql:?}"
        );
        if let (Err(r), Err(code)) = (&rust, &sql) {
            let want = match r {
                widget_runtime::event::EventError::Key { .. } => "WK001",
                widget_runtime::event::EventError::Type(_) => "WK002",
                widget_runtime::event::EventError::Version(_) => "WK003",
                widget_runtime::event::EventError::MissingContent => "WK004",
                widget_runtime::event::EventError::ContentTooLarge { .. } => "WK005",
                other => panic!("{what}: unexpected library error {other}"),
            };
            assert_eq!(code, want, "{what}: {r}");
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM widget_outbox")
        .fetch_one(&product)
        .await
        .expect("count");
    assert_eq!(rows, 0, "nothing written by refused or rolled-back calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_insert_wakes_the_worker_and_a_bulk_insert_notifies_once() {
    let stack = Stack::with_config(CONFIG).await;
    let product = stack.pool(&stack.product_url).await;
    let core = stack.pool(&stack.core_url).await;

    // One bulk INSERT of 10k rows: one notification.
    let mut listener = PgListener::connect_with(&product).await.expect("listener");
    listener.listen("widget_outbox").await.expect("listen");
    sqlx::query(
        "INSERT INTO widget_outbox (widget_key, widget_type, data_version, op, content)
         SELECT 'deals.bulk-' || i, 'card', 1, 'upsert', '{}'::jsonb FROM generate_series(1, 10000) i",
    )
    .execute(&product)
    .await
    .expect("bulk insert");
    let mut notifications = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
        notifications += 1;
    }
    assert_eq!(
        notifications, 1,
        "one notification per statement, not per row"
    );
    drop(listener);

    let worker = start_source_worker(&stack, &stack.redis.url(), "deals");
    let ingester = start_ingester_on(&stack, &stack.redis.url(), "i-1", &stack.core_url, 500);
    let drained = eventually(Duration::from_secs(60), || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM widgets WHERE widget_key LIKE 'deals.bulk-%'")
                .fetch_one(&core)
                .await
                .ok()?;
        (n == 10_000).then_some(())
    })
    .await;
    assert!(drained.is_some(), "the bulk rows are applied");

    // Plain SQL, no NOTIFY, a 3 s poll interval: each insert is applied long before the poll.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut lags = Vec::new();
    for version in 1..=9 {
        let started = Instant::now();
        sqlx::query(
            "INSERT INTO widget_outbox (widget_key, widget_type, data_version, op, content)
             VALUES ('deals.plain', 'card', $1, 'upsert', '{\"v\": 1}')",
        )
        .bind(version)
        .execute(&product)
        .await
        .expect("insert");
        let applied = eventually(Duration::from_secs(10), || async {
            let v: Option<i64> = sqlx::query_scalar(
                "SELECT data_version FROM widgets WHERE widget_key = 'deals.plain'",
            )
            .fetch_optional(&core)
            .await
            .ok()?;
            (v == Some(version)).then(|| started.elapsed())
        })
        .await
        .expect("applied");
        lags.push(applied);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    lags.sort();
    let median = lags[lags.len() / 2];
    assert!(
        median < Duration::from_millis(250),
        "median insert-to-applied {median:?} with a 3 s poll: {lags:?}"
    );
    ingester.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_enqueue_is_applied_served_and_rolled_back_with_its_transaction() {
    let stack = Stack::with_config(CONFIG).await;
    let product = stack.pool(&stack.product_url).await;
    let worker = start_source_worker(&stack, &stack.redis.url(), "deals");
    let ingester = start_ingester_on(&stack, &stack.redis.url(), "i-1", &stack.core_url, 100);
    let api = start_api_on(&stack, &stack.redis.url()).await;

    // A rolled-back transaction leaves no event.
    let mut tx = product.begin().await.expect("begin");
    sqlx::query("SELECT widget_enqueue('deals.top-picks', 'card', widget_next_version('deals.top-picks'), '{\"v\": \"never\"}')")
        .execute(&mut *tx)
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    // The counter rolled back too; this transaction commits version 1 then 2.
    for title in ["first", "second"] {
        let mut tx = product.begin().await.expect("begin");
        sqlx::query("SELECT widget_enqueue('deals.top-picks', 'card', widget_next_version('deals.top-picks'), jsonb_build_object('title', $1::text))")
            .bind(title)
            .execute(&mut *tx)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
    }
    let served = eventually(Duration::from_secs(20), || async {
        let r = http_get(&api.addr, "/v1/screens/deals", &[]).await?;
        let w = &r.json()["widgets"][0];
        (w["version"] == 2).then(|| w.clone())
    })
    .await
    .expect("served");
    assert_eq!(served["content"], json!({"title": "second"}));
    // A refused call raises before commit, and the transaction writes nothing.
    let mut tx = product.begin().await.expect("begin");
    let e = sqlx::query("SELECT widget_enqueue('Deals.x', 'card', 1, '{}')")
        .execute(&mut *tx)
        .await
        .expect_err("bad key");
    let sqlx::Error::Database(db) = e else {
        panic!("{e}")
    };
    assert_eq!(db.code().as_deref(), Some("WK001"));
    assert!(
        db.message().contains("source part `Deals`"),
        "{}",
        db.message()
    );
    tx.rollback().await.expect("rollback");
    let versions: Vec<(String, i64)> =
        sqlx::query_as("SELECT widget_key, version FROM widget_versions")
            .fetch_all(&product)
            .await
            .expect("versions");
    assert_eq!(versions, [("deals.top-picks".to_string(), 2)]);

    // The library writes through the same table and counter, and is woken the same way.
    let mut tx = product.begin().await.expect("begin");
    let version = Outbox::next_version(&mut tx, "deals.top-picks")
        .await
        .expect("next version");
    assert_eq!(version, 3);
    Outbox::enqueue(
        &mut tx,
        &WidgetEvent::upsert(
            "deals.top-picks",
            "card",
            version,
            json!({"title": "third"}),
        ),
    )
    .await
    .expect("library enqueue");
    tx.commit().await.expect("commit");
    let third = eventually(Duration::from_secs(20), || async {
        let r = http_get(&api.addr, "/v1/screens/deals", &[]).await?;
        (r.json()["widgets"][0]["version"] == 3).then_some(())
    })
    .await;
    assert!(third.is_some(), "the library's event is served");
    api.stop().await;
    ingester.stop().await;
    worker.stop().await;
}

/// A virtual environment with psycopg, made once per target directory.
fn python_with_psycopg() -> std::path::PathBuf {
    let target = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    let venv = target.join("producer-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(".psycopg-installed");
    if !ready.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(made.success(), "python3 -m venv failed");
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "psycopg[binary]>=3.1,<4"])
            .status()
            .expect("pip");
        assert!(
            installed.success(),
            "pip install psycopg failed (PyPI reachable?)"
        );
        std::fs::write(&ready, "").expect("marker");
    }
    python
}

/// The documented path for product teams, proven by a real client in another language.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_produces_a_widget_core_api_serves() {
    let python = tokio::task::spawn_blocking(python_with_psycopg)
        .await
        .expect("venv");
    let stack = Stack::with_config(CONFIG).await;
    let worker = start_source_worker(&stack, &stack.redis.url(), "deals");
    let ingester = start_ingester_on(&stack, &stack.redis.url(), "i-1", &stack.core_url, 100);
    let api = start_api_on(&stack, &stack.redis.url()).await;
    let example = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/producers/python/produce.py");
    let run = |args: &[&str]| {
        Command::new(&python)
            .arg(&example)
            .args(args)
            .env("SOURCE_DATABASE_URL", &stack.product_url)
            .output()
            .expect("run the example")
    };
    let out = run(&["deal-42", "Espresso machine", "8999"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON line");
    assert_eq!(printed["version"], 1);
    let served = eventually(Duration::from_secs(20), || async {
        let r = http_get(&api.addr, "/v1/screens/deals", &[]).await?;
        let w = r.json()["widgets"][0].clone();
        (w["version"] == 1).then_some(w)
    })
    .await
    .expect("core-api serves the Python producer's widget");
    assert_eq!(served["type"], "deal-card");
    assert_eq!(served["content"]["price"]["cents"], 8999);
    api.stop().await;
    ingester.stop().await;
    worker.stop().await;
}
