//! The invariant check itself can fail: planted differences in the cache, the core database
//! and the dead-letter stream are each seen and counted.

use std::collections::HashSet;
use std::time::Duration;

use redis::AsyncCommands;
use widget_chaos::check::{check, drain_and_check};
use widget_chaos::fleet::{Fleet, SOURCES};
use widget_chaos::load::{Load, LoadSpec, screen_keys};
use widget_runtime::cache::{Cache, encode_value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_sees_a_stale_cache_a_lost_row_and_an_unmeant_dead_letter() {
    let fleet = Fleet::start(&screen_keys(), false, false)
        .await
        .expect("fleet starts");
    let mut pools = Vec::new();
    for source in SOURCES {
        pools.push((
            source,
            fleet.pool(&fleet.product_urls[source]).await.expect("pool"),
        ));
    }
    let spec = LoadSpec {
        write_rate: 200,
        read_rate: 20,
        keys_per_source: 50,
        pad: 10..20,
    };
    let load = Load::start(&spec, pools, fleet.apis());
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.pause_writes().await;
    let expected = load.model.snapshot();
    let none = HashSet::new();
    let (verdict, _) = drain_and_check(&fleet, &expected, &none, Duration::from_secs(30)).await;
    assert!(verdict.holds(), "holds after a clean drain: {verdict:?}");

    // Two live keys of `deals`, each at a version of at least 2.
    let mut live: Vec<(&String, i64)> = expected
        .iter()
        .filter(|(k, e)| k.starts_with("deals.k-") && !e.deleted && e.version >= 2)
        .map(|(k, e)| (k, e.version))
        .collect();
    live.sort();
    assert!(live.len() >= 2, "the load wrote enough: {live:?}");
    let (cached, stored) = (live[0], live[1]);

    // The cache goes back one version (bypassing the version guard).
    let mut conn = fleet.redis_conn().await.expect("redis");
    let cache = Cache::new(fleet.config.key_prefix());
    let older = format!(
        "{{\"key\":\"{}\",\"type\":\"card\",\"version\":{},\"content\":{{}}}}",
        cached.0,
        cached.1 - 1
    );
    let _: () = conn
        .set(
            cache.key(cached.0),
            encode_value(cached.1 - 1, Some(older.as_bytes())),
        )
        .await
        .expect("SET");
    // The core database loses the last version of another key.
    let core = fleet.pool(&fleet.core_url).await.expect("core");
    sqlx::query("UPDATE widgets SET data_version = data_version - 1 WHERE widget_key = $1")
        .bind(stored.0)
        .execute(&core)
        .await
        .expect("update");
    // And a dead letter nobody meant.
    let _: String = conn
        .xadd(
            fleet.config.dead_letter_stream(),
            "*",
            &[("widget_key", "deals.k-0"), ("reason", "planted")],
        )
        .await
        .expect("XADD");

    let v = check(&fleet, &expected, &none).await.expect("check runs");
    assert!(!v.holds());
    assert_eq!(v.lost, 1, "the row one version back: {v:?}");
    assert!(v.stale >= 1, "the cache one version back: {v:?}");
    assert_eq!(v.unexpected_dead_letters, 1, "{v:?}");
    load.stop().await;
}
