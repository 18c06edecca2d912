//! core-api's fallback reads go to `CORE_DATABASE_READ_URL` when it is set (a read replica of
//! the core database), through the real binary.

mod support;

use support::{Stack, http_get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_reads_go_to_the_read_url() {
    let stack = Stack::start().await;
    // The "replica": another database with the schema and one widget the primary lacks.
    let replica_url = stack.pg.create_database("replica").await.expect("db");
    let replica = stack.pool(&replica_url).await;
    widget_runtime::store::migrate(&widget_runtime::store::CORE_MIGRATIONS, &replica)
        .await
        .expect("migrate");
    support::store_widget(
        &replica,
        "deals.top-picks",
        7,
        serde_json::json!({"from": "replica"}),
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let public = format!("127.0.0.1:{}", testkit::free_port().expect("port"));
    let admin = format!("127.0.0.1:{}", testkit::free_port().expect("port"));
    let redis_url = stack.redis.url();
    let mut child = support::core_api_command(
        &stack,
        dir.path(),
        &public,
        &admin,
        &redis_url,
        &stack.core_url,
    )
    .env("CORE_DATABASE_READ_URL", &replica_url)
    .spawn()
    .expect("start core-api");
    assert!(support::wait_ready(&admin).await, "core-api ready");

    let r = http_get(&public, "/v1/widgets?keys=deals.top-picks", &[])
        .await
        .expect("answer");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-widget-source"), Some("database"));
    let body = r.json();
    assert_eq!(body["widgets"][0]["version"], 7, "{body}");
    assert_eq!(body["widgets"][0]["content"]["from"], "replica", "{body}");
    // The primary was not read: it has no such row, and it got none.
    let primary = stack.pool(&stack.core_url).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM widgets")
        .fetch_one(&primary)
        .await
        .expect("count");
    assert_eq!(rows, 0);
    let _ = child.kill().await;
}
