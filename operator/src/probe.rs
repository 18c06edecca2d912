//! The live signals of a pipeline, read from Redis only: the stream (`XLEN`, `XINFO GROUPS`),
//! the dead-letter stream, the stats hash every runtime component flushes to, and Redis'
//! `maxmemory-policy` where `CONFIG GET` is allowed.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use redis::AsyncCommands;
use redis::streams::StreamInfoGroupsReply;
use widget_crds::{IngressLag, LiveStatus, SourceBacklog};
use widget_runtime::config::{Config, RedisMode};
use widget_runtime::connect::Conn;
use widget_runtime::stats::field;

/// Connect and response timeout of a probe; a probe never holds up a reconcile for longer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a probe failed: a reason code for the status (which any reader of the pipeline sees),
/// and the driver's own text for the operator's log only. The status never carries the raw
/// error: it names hosts and ports, which would make the probe a port scanner for anyone who
/// can write a pipeline's Redis URL.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct ProbeError {
    pub reason: &'static str,
    pub detail: String,
}

impl From<redis::RedisError> for ProbeError {
    fn from(e: redis::RedisError) -> Self {
        use redis::ErrorKind;
        let reason = if e.is_timeout() {
            "timed out"
        } else if e.is_connection_refusal() {
            "connection refused"
        } else {
            match e.kind() {
                ErrorKind::AuthenticationFailed => "authentication failed",
                ErrorKind::InvalidClientConfig => "invalid Redis URL",
                ErrorKind::Io => "connection failed",
                _ if e.is_unrecoverable_error() => "connection failed",
                _ => "a command was refused",
            }
        };
        ProbeError {
            reason,
            detail: e.to_string(),
        }
    }
}

fn time_ms(ms: i64) -> Option<Time> {
    Timestamp::from_millisecond(ms).ok().map(Time)
}

/// A connection to the Redis at `url` with the probe's deadlines; a `rediss://` server is
/// verified against `ca_pem` when given, else against the system trust store.
pub async fn connect(
    url: &str,
    ca_pem: Option<&[u8]>,
    mode: RedisMode,
) -> Result<Conn, ProbeError> {
    let deadlines = widget_runtime::config::RedisConfig {
        mode,
        connect_timeout: PROBE_TIMEOUT,
        response_timeout: PROBE_TIMEOUT,
        ..Default::default()
    };
    let redis =
        widget_runtime::connect::Redis::open_tls(url, &deadlines, ca_pem.map(<[u8]>::to_vec))?;
    Ok(redis.connection().await?)
}

/// Reads the figures for `config`'s pipeline from the Redis at `url`.
pub async fn probe(url: &str, config: &Config) -> Result<LiveStatus, ProbeError> {
    read(&mut connect(url, None, config.redis.mode).await?, config).await
}

/// Reads the figures for `config`'s pipeline on an open connection.
pub async fn read(con: &mut Conn, config: &Config) -> Result<LiveStatus, ProbeError> {
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
    let maxmemory_policy = maxmemory_policy(con, &config.stream_name()).await;
    Ok(live_status(
        config,
        &Readings {
            stream_length,
            lag,
            pending,
            dead_letter_length,
            maxmemory_policy,
            stats,
        },
    ))
}

/// `CONFIG GET maxmemory-policy`. Managed services often rename or forbid CONFIG (and an ACL
/// may refuse it): any error means "unknown", never a failed probe. In a cluster, asked of
/// the stream's primary, which holds everything eviction would cost.
async fn maxmemory_policy(con: &mut Conn, stream: &str) -> Option<String> {
    // A map in RESP3, a flat [name, value] array in RESP2; both convert to a HashMap.
    let reply: redis::RedisResult<HashMap<String, String>> = con
        .query_at(
            redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"),
            stream,
        )
        .await;
    match reply {
        Ok(mut kv) => kv.remove("maxmemory-policy").filter(|p| !p.is_empty()),
        Err(e) => {
            tracing::debug!(error = %e, "CONFIG GET maxmemory-policy failed; policy unknown");
            None
        }
    }
}

/// What one probe read from Redis, before interpretation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Readings {
    /// `XLEN` of the stream.
    pub stream_length: i64,
    /// The consumer group's lag (`None` when Redis cannot tell).
    pub lag: Option<i64>,
    /// The consumer group's pending entries.
    pub pending: i64,
    /// `XLEN` of the dead-letter stream.
    pub dead_letter_length: i64,
    /// `CONFIG GET maxmemory-policy`, `None` when refused.
    pub maxmemory_policy: Option<String>,
    /// `HGETALL` of the stats hash.
    pub stats: HashMap<String, String>,
}

/// Turns the raw readings into the status block (pure; unparsable fields count as absent).
pub fn live_status(config: &Config, r: &Readings) -> LiveStatus {
    let stats = &r.stats;
    let int = |name: &str| stats.get(name).and_then(|v| v.trim().parse::<i64>().ok());
    let counter = |name: &str| int(name).unwrap_or(0);
    // Gauges the runtime sets to 1 while the condition holds.
    let flag = |name: &str| int(name).is_some_and(|v| v > 0);
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
            let gauge = |prefix: &str| format!("{prefix}{}", s.name);
            let rows = int(&gauge(field::OUTBOX_BACKLOG_PREFIX));
            let retained = int(&gauge(field::OUTBOX_RETAINED_PREFIX));
            let capped = int(&gauge(field::OUTBOX_RETENTION_CAPPED_PREFIX));
            // Listed once its worker reported any of its gauges.
            if rows.is_none() && retained.is_none() && capped.is_none() {
                return None;
            }
            Some(SourceBacklog {
                source: s.name.clone(),
                rows: rows.unwrap_or(0),
                retained,
                retention_capped: capped.is_some_and(|v| v > 0),
                observed_at: int(&gauge(field::OUTBOX_BACKLOG_AT_PREFIX)).and_then(time_ms),
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
        stream_length: r.stream_length,
        lag: r.lag,
        pending: r.pending,
        dead_letter_length: r.dead_letter_length,
        applied: counter(field::APPLIED),
        stale: counter(field::STALE),
        rejected: counter(field::REJECTED),
        reclaimed: counter(field::RECLAIMED),
        dead_lettered: counter(field::DEAD_LETTERED),
        published: counter(field::PUBLISHED),
        replayed: counter(field::REPLAYED),
        redis_loss_detected: counter(field::REDIS_LOSS_DETECTED),
        retention_expired: counter(field::RETENTION_EXPIRED),
        warm_written: counter(field::WARM_WRITTEN),
        warming: flag(field::WARM_ACTIVE),
        maxmemory_policy: r.maxmemory_policy.clone(),
        redis_eviction_unsafe: flag(field::REDIS_EVICTION_UNSAFE),
        cache_hit_ratio,
        outbox_backlog,
        ingress_lag,
        stats_updated_at: int(field::UPDATED_AT).and_then(time_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_yaml_str("pipeline: home\nsources: [{name: deals}, {name: loyalty}]\n")
            .expect("config")
    }

    fn readings(stats: &[(&str, &str)]) -> Readings {
        Readings {
            stats: stats
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Readings::default()
        }
    }

    #[test]
    fn durability_counters_and_gauges_are_read() {
        let mut r = readings(&[
            ("replayed", "120"),
            ("redis_loss_detected", "2"),
            ("retention_expired", "7"),
            ("warm_written", "5000"),
            ("warm_active", "1"),
            ("redis_eviction_unsafe", "1"),
            ("outbox_backlog.deals", "3"),
            ("outbox_retained.deals", "250"),
            ("outbox_retention_capped.deals", "1"),
            ("outbox_retained.loyalty", "9"),
            ("outbox_retention_capped.loyalty", "0"),
        ]);
        r.maxmemory_policy = Some("allkeys-lru".into());
        let live = live_status(&config(), &r);
        assert_eq!(
            (
                live.replayed,
                live.redis_loss_detected,
                live.retention_expired,
                live.warm_written
            ),
            (120, 2, 7, 5000)
        );
        assert!(live.warming);
        assert!(live.redis_eviction_unsafe);
        assert_eq!(live.maxmemory_policy.as_deref(), Some("allkeys-lru"));
        assert_eq!(
            live.outbox_backlog,
            [
                SourceBacklog {
                    source: "deals".into(),
                    rows: 3,
                    retained: Some(250),
                    retention_capped: true,
                    observed_at: None,
                },
                // Reported retention but no backlog count yet: still listed.
                SourceBacklog {
                    source: "loyalty".into(),
                    rows: 0,
                    retained: Some(9),
                    retention_capped: false,
                    observed_at: None,
                },
            ]
        );
    }

    #[test]
    fn absent_or_unparsable_fields_read_as_zero_false_or_absent() {
        let live = live_status(
            &config(),
            &readings(&[
                ("replayed", "many"),
                ("warm_active", "0"),
                ("redis_eviction_unsafe", "yes"),
                // A source no longer in the spec is ignored.
                ("outbox_retention_capped.legacy", "1"),
            ]),
        );
        assert_eq!(
            (live.replayed, live.retention_expired, live.warm_written),
            (0, 0, 0)
        );
        assert!(!live.warming);
        assert!(!live.redis_eviction_unsafe);
        assert_eq!(live.maxmemory_policy, None);
        assert!(live.outbox_backlog.is_empty());
    }

    #[test]
    fn the_existing_figures_are_unchanged() {
        let r = Readings {
            stream_length: 7,
            lag: Some(3),
            pending: 3,
            dead_letter_length: 1,
            ..readings(&[
                ("cache_hits", "3"),
                ("cache_misses", "1"),
                ("outbox_backlog.deals", "12"),
                ("outbox_backlog_at.deals", "1700000000000"),
            ])
        };
        let live = live_status(&config(), &r);
        assert_eq!(
            (
                live.stream_length,
                live.lag,
                live.pending,
                live.dead_letter_length
            ),
            (7, Some(3), 3, 1)
        );
        assert_eq!(live.cache_hit_ratio, Some(0.75));
        assert_eq!(live.outbox_backlog.len(), 1);
        assert_eq!(live.outbox_backlog[0].retained, None);
        assert!(!live.outbox_backlog[0].retention_capped);
        assert_eq!(
            live.outbox_backlog[0]
                .observed_at
                .as_ref()
                .map(|t| t.0.as_millisecond()),
            Some(1_700_000_000_000)
        );
    }
}
