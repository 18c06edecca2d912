//! The live signals of a pipeline, read from Redis only: the stream (`XLEN`, `XINFO GROUPS`),
//! the dead-letter stream and the stats hash every runtime component flushes to.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use redis::AsyncCommands;
use redis::streams::StreamInfoGroupsReply;
use widget_crds::{IngressLag, LiveStatus, SourceBacklog};
use widget_runtime::config::Config;
use widget_runtime::stats::field;

/// Connect and response timeout of a probe; a probe never holds up a reconcile for longer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProbeError(String);

impl From<redis::RedisError> for ProbeError {
    fn from(e: redis::RedisError) -> Self {
        ProbeError(e.to_string())
    }
}

fn time_ms(ms: i64) -> Option<Time> {
    Timestamp::from_millisecond(ms).ok().map(Time)
}

/// Reads the figures for `config`'s pipeline from the Redis at `url`.
pub async fn probe(url: &str, config: &Config) -> Result<LiveStatus, ProbeError> {
    let client = redis::Client::open(url)?;
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(PROBE_TIMEOUT))
        .set_response_timeout(Some(PROBE_TIMEOUT));
    let mut con = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await?;

    let stream = config.stream_name();
    let stream_length: i64 = con.xlen(&stream).await?;
    let dead_letter_length: i64 = con.xlen(config.dead_letter_stream()).await?;
    let (lag, pending) = if stream_length > 0 || con.exists::<_, bool>(&stream).await? {
        let groups: StreamInfoGroupsReply = con.xinfo_groups(&stream).await?;
        match groups
            .groups
            .iter()
            .find(|g| g.name == config.stream.consumer_group)
        {
            Some(g) => (g.lag.map(|l| l as i64), g.pending as i64),
            // No group yet: every entry is waiting for it.
            None => (Some(stream_length), 0),
        }
    } else {
        (Some(0), 0)
    };
    let stats: HashMap<String, String> = con.hgetall(config.stats_key()).await?;
    Ok(live_status(
        config,
        stream_length,
        lag,
        pending,
        dead_letter_length,
        &stats,
    ))
}

/// Turns the raw readings into the status block (pure; unparsable fields count as absent).
pub fn live_status(
    config: &Config,
    stream_length: i64,
    lag: Option<i64>,
    pending: i64,
    dead_letter_length: i64,
    stats: &HashMap<String, String>,
) -> LiveStatus {
    let int = |name: &str| stats.get(name).and_then(|v| v.trim().parse::<i64>().ok());
    let counter = |name: &str| int(name).unwrap_or(0);
    let hits = counter(field::CACHE_HITS);
    let misses = counter(field::CACHE_MISSES);
    let cache_hit_ratio = (hits + misses > 0).then(|| {
        let ratio = hits as f64 / (hits + misses) as f64;
        (ratio * 10_000.0).round() / 10_000.0
    });
    let outbox_backlog = config
        .sources
        .iter()
        .filter_map(|s| {
            let rows = int(&format!("{}{}", field::OUTBOX_BACKLOG_PREFIX, s.name))?;
            Some(SourceBacklog {
                source: s.name.clone(),
                rows,
                observed_at: int(&format!("{}{}", field::OUTBOX_BACKLOG_AT_PREFIX, s.name))
                    .and_then(time_ms),
            })
        })
        .collect();
    let ingress_lag = match (
        int(field::INGRESS_LAG_P50_MS),
        int(field::INGRESS_LAG_P99_MS),
    ) {
        (Some(p50_ms), Some(p99_ms)) => Some(IngressLag {
            p50_ms,
            p99_ms,
            observed_at: int(field::INGRESS_LAG_AT).and_then(time_ms),
        }),
        _ => None,
    };
    LiveStatus {
        stream_length,
        lag,
        pending,
        dead_letter_length,
        applied: counter(field::APPLIED),
        stale: counter(field::STALE),
        rejected: counter(field::REJECTED),
        reclaimed: counter(field::RECLAIMED),
        dead_lettered: counter(field::DEAD_LETTERED),
        published: counter(field::PUBLISHED),
        cache_hit_ratio,
        outbox_backlog,
        ingress_lag,
        stats_updated_at: int(field::UPDATED_AT).and_then(time_ms),
    }
}
