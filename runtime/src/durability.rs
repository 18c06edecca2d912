//! Durability beyond Redis: Redis acknowledges writes before they are on disk or on a replica,
//! so it is the transport, never the only copy of an event.
//!
//! - **Confirmations.** The outbox-worker keeps every relayed row (marked `published_at`) until
//!   the core side confirms it. The ingester confirms an event only *after* its UPSERT committed
//!   in core Postgres (or after it dead-lettered the event), by adding the row's outbox id to the
//!   source's confirmation set in the same MULTI as the XACK. A confirmation is therefore always
//!   a durable fact about one immutable row, whatever Redis loses later: a lost set only means
//!   rows are replayed, a restored older set only names rows already deleted. Rows are confirmed
//!   one by one, so rows committed out of id order (late transactions, several workers) are
//!   never skipped, which a per-source "applied up to id N" watermark cannot promise: the
//!   ingester cannot tell a sequence gap from a row that is still on its way.
//! - **The stream epoch.** `<stream>.epoch` holds `<run_id>:<token>`. One atomic script checks
//!   it and starts a new epoch when the marker is missing (FLUSHALL, a restart without data,
//!   eviction), when Redis' `run_id` is not the one the marker was written under (any restart:
//!   an AOF `everysec` crash, an older RDB restored, a failover to a replica that missed
//!   writes), or when the consumer group is gone (the stream was deleted). Workers stamp each
//!   relayed row with the epoch; rows relayed under any other epoch are unpublished again and
//!   go through the normal relay path. Duplicates are harmless: the version guard keeps the
//!   newest. A restart that kept every write still starts a new epoch: replaying a few
//!   seconds of retained rows is cheaper than trusting a Redis that may have lost some.
//! - **Eviction.** An `allkeys-*` maxmemory policy may evict the stream or the markers: it is
//!   reported (log, metric, stats gauge for the operator's `RedisEvictionUnsafe`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use redis::Script;
use redis::aio::ConnectionLike;
use tokio_util::sync::CancellationToken;

use crate::connect;
use crate::stats::{self, Stats};

/// Why a new epoch was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewEpoch {
    /// Neither the marker nor the stream existed: a first start, or a Redis wiped completely.
    Fresh,
    /// The stream exists but its marker does not (deleted or evicted).
    MarkerMissing,
    /// Redis restarted (or another server answers) since the marker was written.
    Restarted,
    /// The marker is current but the consumer group (or the whole stream) is gone.
    GroupMissing,
}

impl NewEpoch {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "fresh" => Some(Self::Fresh),
            "marker-missing" => Some(Self::MarkerMissing),
            "restarted" => Some(Self::Restarted),
            "group-missing" => Some(Self::GroupMissing),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::MarkerMissing => "marker-missing",
            Self::Restarted => "restarted",
            Self::GroupMissing => "group-missing",
        }
    }
}

/// The current epoch, and whether this call started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    pub id: String,
    pub started: Option<NewEpoch>,
}

/// KEYS[1] epoch marker, KEYS[2] stream. ARGV[1] consumer group, ARGV[2] a fresh random token,
/// ARGV[3] the epoch the caller last saw ('' if none: a missing marker is then a fresh start).
/// Returns {epoch, reason}; reason is empty when the epoch is unchanged. A new epoch also makes
/// sure the group exists (created at 0 so entries added before it are read), so marker, stream
/// and group are only ever established together.
static ENSURE_EPOCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local info = redis.pcall('INFO', 'server')
if type(info) ~= 'string' then info = '' end
local run_id = string.match(info, 'run_id:(%w+)') or 'unknown'
local cur = redis.call('GET', KEYS[1])
local stream_exists = redis.call('EXISTS', KEYS[2]) == 1
local has_group = false
if stream_exists then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
    for j = 1, #g, 2 do
      if g[j] == 'name' and g[j + 1] == ARGV[1] then has_group = true end
    end
  end
end
local reason = ''
if not cur then
  if stream_exists or ARGV[3] ~= '' then reason = 'marker-missing' else reason = 'fresh' end
elseif string.sub(cur, 1, #run_id + 1) ~= run_id .. ':' then
  reason = 'restarted'
elseif not has_group then
  reason = 'group-missing'
end
if reason == '' then return {cur, ''} end
if not has_group then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
end
local new = run_id .. ':' .. ARGV[2]
redis.call('SET', KEYS[1], new)
return {new, reason}
"#,
    )
});

/// Returns the stream's current epoch, starting a new one if Redis lost data since the last.
/// `known` is the epoch the caller saw last, if any.
pub async fn ensure_epoch<C: ConnectionLike>(
    conn: &mut C,
    epoch_key: &str,
    stream: &str,
    group: &str,
    known: Option<&str>,
) -> redis::RedisResult<Epoch> {
    let token = format!("{:016x}", rand::random::<u64>());
    let (id, reason): (String, String) = ENSURE_EPOCH
        .key(epoch_key)
        .key(stream)
        .arg(group)
        .arg(token)
        .arg(known.unwrap_or(""))
        .invoke_async(conn)
        .await?;
    if id.starts_with("unknown:") && !WARNED_NO_RUN_ID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "INFO is not allowed for this Redis user: a Redis restart that kept the stream and \
             the marker but lost recent writes cannot be detected; allow INFO (server section)"
        );
    }
    Ok(Epoch {
        id,
        started: NewEpoch::parse(&reason),
    })
}

static WARNED_NO_RUN_ID: AtomicBool = AtomicBool::new(false);

/// The confirmation set of `source`'s outbox rows, beside the stream.
pub fn confirmed_key(stream: &str, source: &str) -> String {
    format!("{stream}.confirmed.{source}")
}

/// The outbox id of an event relayed by `source`'s worker (`event_id` = `<source>:<id>`).
pub fn outbox_id(event_id: &str, source: &str) -> Option<i64> {
    let (s, id) = event_id.split_once(':')?;
    // Any well-formed source, not only the configured ones: an ingester still on a config
    // without a newly added source must confirm its rows too.
    if s != source || !crate::config::is_valid_name(source) {
        return None;
    }
    id.parse().ok().filter(|id: &i64| *id > 0)
}

/// One outbox row as a confirmation names it: its id, its event's version and its insert time
/// (`produced_at_us`, the row's `created_at`). Version and time keep a stale confirmation (left
/// in Redis while a worker was down) from deleting an unrelated row that reuses the id after
/// the outbox table was re-created or restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRef {
    pub id: i64,
    pub version: i64,
    pub produced_at_us: i64,
}

impl RowRef {
    /// The set member: `<id>:<version>:<produced_at_us>`.
    pub fn member(&self) -> String {
        format!("{}:{}:{}", self.id, self.version, self.produced_at_us)
    }

    pub fn parse(member: &str) -> Option<Self> {
        let mut parts = member.splitn(3, ':');
        let mut next = || parts.next()?.parse().ok();
        Some(Self {
            id: next()?,
            version: next()?,
            produced_at_us: next()?,
        })
    }
}

/// Outbox rows to confirm, grouped by their source's confirmation set.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Confirmations(Vec<(String, Vec<String>)>);

impl Confirmations {
    pub fn add(&mut self, key: String, row: RowRef) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(row.member()),
            None => self.0.push((key, vec![row.member()])),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends one SADD per set to `pipe` (an atomic pipeline with the XACK).
    pub fn add_to(&self, pipe: &mut redis::Pipeline) {
        for (key, ids) in &self.0 {
            pipe.cmd("SADD").arg(key).arg(ids).ignore();
        }
    }
}

/// At most `count` members of one confirmation set (any order), as written; members that do
/// not parse are returned too, so they can be removed.
pub async fn read_confirmed<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    count: usize,
) -> redis::RedisResult<Vec<String>> {
    redis::cmd("SRANDMEMBER")
        .arg(key)
        .arg(count.max(1))
        .query_async(conn)
        .await
}

/// Removes confirmations whose rows are gone from the outbox (idempotent: several workers of
/// one source may read and remove the same members).
pub async fn forget_confirmed<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    members: &[String],
) -> redis::RedisResult<()> {
    if members.is_empty() {
        return Ok(());
    }
    redis::cmd("SREM")
        .arg(key)
        .arg(members)
        .query_async(conn)
        .await
}

/// The `maxmemory-policy` of the Redis holding `stream` (in a cluster: the stream's primary,
/// where its markers and confirmations live too), or `None` when CONFIG is not allowed
/// (managed services).
pub async fn eviction_policy(
    conn: &mut connect::Conn,
    stream: &str,
) -> redis::RedisResult<Option<String>> {
    let reply: redis::RedisResult<Vec<String>> = conn
        .query_at(
            redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"),
            stream,
        )
        .await;
    match reply {
        Ok(kv) => Ok(kv.into_iter().nth(1)),
        // The server answered with an error (CONFIG renamed, refused by ACL, unknown): a
        // managed service's choice, not an outage.
        Err(e) if e.code().is_some() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Policies that may evict keys without a TTL: the stream, its markers, confirmations.
pub fn eviction_unsafe(policy: &str) -> bool {
    policy.starts_with("allkeys-")
}

/// Persistence settings worth a line in the log, where CONFIG is allowed.
async fn persistence(conn: &mut connect::Conn, stream: &str) -> Option<(String, String)> {
    let kv: Vec<String> = conn
        .query_at(redis::cmd("CONFIG").arg("GET").arg("appendonly"), stream)
        .await
        .ok()?;
    let save: Vec<String> = conn
        .query_at(redis::cmd("CONFIG").arg("GET").arg("save"), stream)
        .await
        .ok()?;
    Some((kv.into_iter().nth(1)?, save.into_iter().nth(1)?))
}

/// How often the Redis settings are read again.
pub const SETTINGS_INTERVAL: Duration = Duration::from_secs(60);

/// Reads Redis' eviction policy at start and every `interval` until cancelled; an unsafe one is
/// an error in the log (once per change), `gauge` = 1 and the stats gauge the operator turns
/// into `RedisEvictionUnsafe`.
pub async fn watch_settings(
    client: connect::Redis,
    stream: String,
    gauge: Gauge,
    stats: Arc<Stats>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut last: Option<Option<String>> = None;
    loop {
        let reading = async {
            let mut conn = client.manager().await?;
            let policy = eviction_policy(&mut conn, &stream).await?;
            let persist = if last.is_none() {
                persistence(&mut conn, &stream).await
            } else {
                None
            };
            Ok::<_, redis::RedisError>((policy, persist))
        };
        let reading = tokio::select! {
            _ = cancel.cancelled() => return,
            r = reading => r,
        };
        if let Ok((policy, persist)) = reading {
            if let Some((aof, save)) = persist {
                tracing::info!(appendonly = %aof, save = %save, "Redis persistence settings");
            }
            let unsafe_ = policy.as_deref().is_some_and(eviction_unsafe);
            if last.as_ref() != Some(&policy) {
                match &policy {
                    Some(p) if unsafe_ => tracing::error!(maxmemory_policy = %p,
                        "Redis may evict the stream and its markers under memory pressure \
                         (events would wait for a replay); use noeviction or a volatile-* policy"),
                    Some(p) => tracing::info!(maxmemory_policy = %p, "Redis eviction policy"),
                    None => tracing::debug!("CONFIG GET is not allowed; eviction policy unknown"),
                }
            }
            gauge.set(i64::from(unsafe_));
            stats.set_gauge(
                stats::field::REDIS_EVICTION_UNSAFE.into(),
                i64::from(unsafe_),
            );
            last = Some(policy);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_ids_come_from_the_sources_own_event_ids() {
        assert_eq!(outbox_id("deals:42", "deals"), Some(42));
        assert_eq!(outbox_id("deals:42", "loyalty"), None);
        assert_eq!(outbox_id("deals:x", "deals"), None);
        assert_eq!(outbox_id("deals:0", "deals"), None);
        assert_eq!(outbox_id("deals", "deals"), None);
    }

    #[test]
    fn confirmations_group_by_set_and_name_the_row_exactly() {
        let row = |id, version| RowRef {
            id,
            version,
            produced_at_us: 5,
        };
        let mut c = Confirmations::default();
        c.add("a".into(), row(1, 7));
        c.add("b".into(), row(2, 1));
        c.add("a".into(), row(3, 9));
        assert_eq!(
            c,
            Confirmations(vec![
                ("a".into(), vec!["1:7:5".into(), "3:9:5".into()]),
                ("b".into(), vec!["2:1:5".into()])
            ])
        );
        assert_eq!(RowRef::parse("12:34:5"), Some(row(12, 34)));
        assert_eq!(RowRef::parse("12:34"), None);
        assert_eq!(RowRef::parse("x:1:5"), None);
    }

    #[test]
    fn only_allkeys_policies_are_unsafe() {
        assert!(eviction_unsafe("allkeys-lru"));
        assert!(eviction_unsafe("allkeys-random"));
        assert!(!eviction_unsafe("noeviction"));
        assert!(!eviction_unsafe("volatile-lru"));
    }
}
