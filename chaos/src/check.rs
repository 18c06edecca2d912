//! The invariant, after a fault and a drain: for every key, the core database, the cache and
//! what both APIs serve hold exactly the producer's last committed version (or its deletion);
//! the outboxes hold nothing unconfirmed; the group has no pending entries; every dead letter
//! is one that was meant to be rejected.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use redis::AsyncCommands;
use widget_runtime::cache::{Cache, Cached, decode_value};

use crate::fleet::{Fleet, SOURCES};
use crate::load::Expected;

/// Marks every event the suite means to be rejected: in the key, or (for entries written
/// straight into the stream) by stream id.
pub const BAD_MARK: &str = "chaos-bad";

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Verdict {
    /// Keys whose core-database row is not the producer's last committed state.
    pub lost: usize,
    /// Keys whose database row is right but the cache or an API holds something else.
    pub stale: usize,
    pub unconfirmed_rows: i64,
    pub pending: i64,
    pub unread: i64,
    /// Dead letters (stream or `<outbox>_dead`) that were not meant to be rejected.
    pub unexpected_dead_letters: usize,
    pub dead_letters_total: usize,
    /// The first few differences, for the report.
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn holds(&self) -> bool {
        self.lost == 0
            && self.stale == 0
            && self.unconfirmed_rows == 0
            && self.pending == 0
            && self.unread == 0
            && self.unexpected_dead_letters == 0
    }
}

/// Checks until the invariant holds or `limit` passes (a drain: replays, reclaims and the
/// re-warm finish); the last verdict and how long it took.
pub async fn drain_and_check(
    fleet: &Fleet,
    expected: &HashMap<String, Expected>,
    injected: &HashSet<String>,
    limit: Duration,
) -> (Verdict, Duration) {
    let start = Instant::now();
    loop {
        let verdict = match check(fleet, expected, injected).await {
            Ok(v) => v,
            Err(e) => Verdict {
                lost: usize::MAX,
                examples: vec![format!("check failed: {e:#}")],
                ..Verdict::default()
            },
        };
        if verdict.holds() || start.elapsed() >= limit {
            return (verdict, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn matches(exp: &Expected, version: i64, deleted: bool) -> bool {
    (exp.version == version && exp.deleted == deleted) || exp.before == Some((version, deleted))
}

/// A deleted key may also be absent altogether (it never existed before its deletion).
fn matches_absent(exp: &Expected) -> bool {
    exp.deleted || matches!(exp.before, Some((_, true)))
}

pub async fn check(
    fleet: &Fleet,
    expected: &HashMap<String, Expected>,
    injected: &HashSet<String>,
) -> Result<Verdict> {
    let mut v = Verdict::default();
    let keys: Vec<String> = expected.keys().cloned().collect();

    // Outboxes and the group first: nothing may still be on its way.
    for source in SOURCES {
        let pool = fleet.pool(&fleet.product_urls[source]).await?;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM widget_outbox")
            .fetch_one(&pool)
            .await?;
        v.unconfirmed_rows += n;
        let aside: Vec<String> = sqlx::query_scalar("SELECT widget_key FROM widget_outbox_dead")
            .fetch_all(&pool)
            .await?;
        v.dead_letters_total += aside.len();
        for k in aside {
            if !k.contains(BAD_MARK) {
                v.unexpected_dead_letters += 1;
                v.examples
                    .push(format!("moved aside but not meant to be: {k}"));
            }
        }
        pool.close().await;
    }
    let mut conn = fleet.redis_conn().await?;
    let (pending, unread) = group_backlog(
        &mut conn,
        &fleet.config.stream_name(),
        &fleet.config.stream.consumer_group,
    )
    .await?;
    v.pending = pending;
    v.unread = unread;
    let dead: redis::streams::StreamRangeReply = conn
        .xrange_all(fleet.config.dead_letter_stream())
        .await
        .context("XRANGE dead letters")?;
    for entry in &dead.ids {
        v.dead_letters_total += 1;
        let field = |name: &str| -> String {
            match entry.map.get(name) {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            }
        };
        let original = field("original_id");
        let key = field("widget_key");
        if !(key.contains(BAD_MARK) || injected.contains(&original)) {
            v.unexpected_dead_letters += 1;
            if v.examples.len() < 8 {
                v.examples.push(format!(
                    "dead letter not meant: key {key} reason {} ({})",
                    field("reason"),
                    field("error")
                ));
            }
        }
    }

    // The core database.
    let core = fleet.pool(&fleet.core_url).await?;
    let rows: Vec<(String, i64, bool)> = sqlx::query_as(
        "SELECT widget_key, data_version, deleted FROM widgets WHERE widget_key = ANY($1)",
    )
    .bind(&keys)
    .fetch_all(&core)
    .await?;
    core.close().await;
    let db: HashMap<String, (i64, bool)> =
        rows.into_iter().map(|(k, ver, d)| (k, (ver, d))).collect();
    let mut wrong_in_db = HashSet::new();
    for (key, exp) in expected {
        let ok = match db.get(key) {
            Some((ver, d)) => matches(exp, *ver, *d),
            None => matches_absent(exp),
        };
        if !ok {
            v.lost += 1;
            wrong_in_db.insert(key.clone());
            if v.examples.len() < 8 {
                v.examples
                    .push(format!("db {key}: {:?}, expected {exp:?}", db.get(key)));
            }
        }
    }

    // The cache: a value present must be the expected one (an expired or never-warmed value is
    // a miss, served from the database).
    let cache = Cache::new(fleet.config.key_prefix());
    let mut stale = HashSet::new();
    for chunk in keys.chunks(500) {
        let cache_keys: Vec<String> = chunk.iter().map(|k| cache.key(k)).collect();
        let values: Vec<Option<Vec<u8>>> = conn.mget(&cache_keys).await.context("MGET")?;
        for (key, raw) in chunk.iter().zip(values) {
            let exp = &expected[key];
            let ok = match raw.as_deref().and_then(decode_value) {
                None => true,
                Some(Cached::Widget { version, .. }) => matches(exp, version, false),
                // Version 0 is the API's "absent" marker.
                Some(Cached::Deleted { version: 0 }) => matches_absent(exp),
                Some(Cached::Deleted { version }) => matches(exp, version, true),
            };
            if !ok
                && !wrong_in_db.contains(key)
                && stale.insert(key.clone())
                && v.examples.len() < 8
            {
                v.examples.push(format!(
                    "cache {key}: {:?}, expected {exp:?}",
                    raw.as_deref().and_then(decode_value).map(|c| match c {
                        Cached::Widget { version, .. } => (version, false),
                        Cached::Deleted { version } => (version, true),
                    })
                ));
            }
        }
    }

    // What each API serves.
    let (shared, personal): (Vec<&String>, Vec<&String>) =
        keys.iter().partition(|k| !k.contains(':'));
    for api in fleet.apis() {
        let mut asks: Vec<(Vec<&String>, Option<String>)> =
            shared.chunks(100).map(|c| (c.to_vec(), None)).collect();
        for k in &personal {
            let user = k.rsplit_once(':').map(|(_, u)| u.to_string());
            asks.push((vec![*k], user));
        }
        for (chunk, user) in asks {
            let list = chunk
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(",");
            let path = format!("/v1/widgets?keys={list}");
            let Some((200, body)) = fleet.http.get(&api, &path, user.as_deref()).await else {
                v.stale += chunk.len();
                v.examples
                    .push(format!("api {api}: no 200 for {} keys", chunk.len()));
                continue;
            };
            let reply: serde_json::Value = serde_json::from_slice(&body)?;
            let served: HashMap<&str, i64> = reply["widgets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| Some((w["key"].as_str()?, w["version"].as_i64()?)))
                .collect();
            for key in chunk {
                let exp = &expected[key.as_str()];
                let ok = match served.get(key.as_str()) {
                    Some(version) => matches(exp, *version, false),
                    None => matches_absent(exp),
                };
                if !ok
                    && !wrong_in_db.contains(key.as_str())
                    && stale.insert(format!("{api} {key}"))
                    && v.examples.len() < 8
                {
                    v.examples.push(format!(
                        "api {api} {key}: {:?}, expected {exp:?}",
                        served.get(key.as_str())
                    ));
                }
            }
        }
    }
    // A key counts once however many places hold it wrong.
    v.stale += stale
        .iter()
        .map(|s| s.rsplit(' ').next().unwrap_or(s))
        .collect::<HashSet<_>>()
        .len();
    Ok(v)
}

/// The consumer group's pending entries and its unread entries, as the operator's probe reads
/// them (`XINFO GROUPS`, redis-rs's typed reply). When Redis cannot tell the lag (after
/// deletions inside the stream), an entry after the group's last-delivered id counts as unread.
pub async fn group_backlog(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Result<(i64, i64)> {
    let reply: redis::streams::StreamInfoGroupsReply =
        conn.xinfo_groups(stream).await.context("XINFO GROUPS")?;
    let Some(g) = reply.groups.iter().find(|g| g.name == group) else {
        anyhow::bail!("no consumer group {group} on {stream}");
    };
    let unread = match g.lag {
        Some(lag) => lag as i64,
        None => {
            let last: redis::streams::StreamRangeReply =
                conn.xrevrange_count(stream, "+", "-", 1).await?;
            let newest = last.ids.first().map(|e| e.id.as_str()).unwrap_or("0-0");
            i64::from(newest != g.last_delivered_id)
        }
    };
    Ok((g.pending as i64, unread))
}
