//! Redis over TLS (`rediss://`), as managed services require: the whole pipeline through the
//! real `widget-runtime dev` process against a TLS-only Redis whose certificate is signed by a
//! CA made for the test (`REDIS_CA_FILE`), and a start-up that fails with a clear message when
//! the CA is the wrong one.

mod support;

use std::time::Duration;

use support::{Stack, http_get};
use testkit::{RedisServer, TestCa, eventually};
use widget_runtime::{Outbox, WidgetEvent};

const CONFIG: &str = r#"
pipeline: tls
sources:
  - {name: deals, batchSize: 100, pollInterval: 50ms}
screens:
  - {name: home, widgets: ["deals.top", "deals.second"]}
"#;

fn write_ca(dir: &tempfile::TempDir, name: &str, pem: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, pem).expect("write CA");
    path
}

fn dev(
    stack: &Stack,
    redis_url: &str,
    ca: &std::path::Path,
    config: &std::path::Path,
    listen: &str,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_widget-runtime"));
    cmd.args(["dev", "--listen", listen, "--config"])
        .arg(config)
        .env("REDIS_URL", redis_url)
        .env("REDIS_CA_FILE", ca)
        .env("CORE_DATABASE_URL", &stack.core_url)
        .env("SOURCE_DATABASE_URL", &stack.product_url)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_tls_and_a_wrong_ca_fails_start_up() {
    let stack = Stack::with_config(CONFIG).await;
    let redis = RedisServer::start_tls().await.expect("TLS redis");
    let url = redis.url();
    assert!(url.starts_with("rediss://"), "{url}");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, stack.config.to_yaml()).expect("config");
    let ca = write_ca(&dir, "ca.pem", redis.tls_ca_pem().expect("CA"));

    // The same server's port without TLS in the URL is refused: it speaks only TLS.
    let plain = url.replacen("rediss://", "redis://", 1);
    let raw = redis::Client::open(plain.as_str()).expect("url");
    assert!(
        tokio::time::timeout(
            Duration::from_secs(3),
            raw.get_multiplexed_async_connection()
        )
        .await
        .map_or(true, |r| r.is_err()),
        "a plain connection is not served"
    );

    let listen = format!("127.0.0.1:{}", testkit::free_port().expect("port"));
    let mut child = dev(&stack, &url, &ca, &config, &listen)
        .spawn()
        .expect("start dev");
    assert!(support::wait_ready(&listen).await, "dev is ready over TLS");

    let product = stack.pool(&stack.product_url).await;
    for version in 1..=3 {
        let mut tx = product.begin().await.expect("begin");
        Outbox::enqueue_all(
            &mut tx,
            &[
                WidgetEvent::upsert(
                    "deals.top",
                    "card",
                    version,
                    serde_json::json!({"v": version}),
                ),
                WidgetEvent::upsert(
                    "deals.second",
                    "card",
                    version,
                    serde_json::json!({"v": version}),
                ),
            ],
        )
        .await
        .expect("enqueue");
        tx.commit().await.expect("commit");
    }
    let served = eventually(Duration::from_secs(20), || async {
        let r = http_get(&listen, "/v1/screens/home", &[]).await?;
        let body = r.json();
        let versions: Vec<i64> = body["widgets"]
            .as_array()?
            .iter()
            .filter_map(|w| w["version"].as_i64())
            .collect();
        (versions == [3, 3] && r.header("x-widget-source") == Some("cache")).then_some(())
    })
    .await;
    assert!(
        served.is_some(),
        "both widgets at v3, from the cache, through TLS"
    );
    // The cache really is in the TLS server.
    let mut conn = redis.connection().await.expect("TLS connection");
    let cached: Option<Vec<u8>> = redis::cmd("GET")
        .arg(format!("{}w:deals.top", stack.config.key_prefix()))
        .query_async(&mut conn)
        .await
        .expect("get");
    assert!(cached.is_some(), "written over TLS");
    let _ = child.kill().await;

    // Another CA: start-up fails at once, saying why, instead of retrying for ever.
    let other = TestCa::new("someone else's CA").expect("CA");
    let wrong = write_ca(&dir, "wrong.pem", other.pem());
    let listen = format!("127.0.0.1:{}", testkit::free_port().expect("port"));
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        dev(&stack, &url, &wrong, &config, &listen).output(),
    )
    .await
    .expect("exits within 20 s")
    .expect("run dev");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "start-up fails");
    assert!(
        stderr.contains("not trusted by the CA bundle in REDIS_CA_FILE"),
        "a clear message: {stderr}"
    );

    // The CA as text (how the operator passes it from a Secret key) works the same.
    let listen_pem = format!("127.0.0.1:{}", testkit::free_port().expect("port"));
    let mut child = dev(&stack, &url, &wrong, &config, &listen_pem)
        .env_remove("REDIS_CA_FILE")
        .env("REDIS_CA_PEM", redis.tls_ca_pem().expect("CA"))
        .spawn()
        .expect("start dev");
    assert!(
        support::wait_ready(&listen_pem).await,
        "ready with REDIS_CA_PEM"
    );
    let _ = child.kill().await;

    // A CA file that cannot be read is named.
    let out = dev(
        &stack,
        &url,
        &dir.path().join("missing.pem"),
        &config,
        &listen,
    )
    .output()
    .await
    .expect("run dev");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot read REDIS_CA_FILE"),
        "names the file: {stderr}"
    );
}
