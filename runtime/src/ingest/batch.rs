//! One batch: decode, dead-letter the bad entries, apply the rest with one version-guarded
//! UPSERT, cache what is now stored, then acknowledge, confirming each entry's outbox row to its
//! worker in the same MULTI as the XACK (after the commit, so a confirmation is always true).
//!
//! Each store step is retried on its own until it succeeds, so a step that already succeeded is
//! never repeated (a dead letter is not written twice, a win is not recounted as stale).
//!
//! Which rows are cached: the rows that won in the database, plus any row whose stored version
//! is exactly the event's version although it did not win now. The second case is a redelivery
//! after a crash between the database commit and the cache write; without it, that cache write
//! would be lost for good. A row whose stored version is newer is never cached from the event.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::consumer::{self, Entry};
use super::dead_letter::DeadLetter;
use super::{Halt, Worker};
use crate::cache::CacheWrite;
use crate::connect::Deadline;
use crate::durability::{self, Confirmations};
use crate::stats;
use crate::store::{self, Change};
use crate::stream::StreamEvent;

/// A decoded entry ready to apply.
#[derive(Debug, Clone)]
pub(super) struct Valid {
    pub id: String,
    pub change: Change,
    pub produced_at_us: i64,
    /// The outbox row it came from, when a worker of its source relayed it.
    pub outbox_row: Option<durability::RowRef>,
}

/// Decodes one entry, or says why it must be dead-lettered.
pub(super) fn decode(entry: &Entry) -> Result<Valid, (&'static str, String)> {
    let ev = StreamEvent::decode(&entry.fields).map_err(|e| (e.reason(), e.to_string()))?;
    let content = match ev.content {
        Some(bytes) => Some(String::from_utf8(bytes).map_err(|_| {
            (
                "undecodable",
                "field `content` is not valid UTF-8".to_string(),
            )
        })?),
        None => None,
    };
    Ok(Valid {
        id: entry.id.clone(),
        produced_at_us: ev.produced_at_us,
        outbox_row: durability::outbox_id(&ev.event_id, &ev.source).map(|id| durability::RowRef {
            id,
            version: ev.data_version,
            produced_at_us: ev.produced_at_us,
        }),
        change: Change {
            widget_key: ev.widget_key,
            widget_type: ev.widget_type,
            source: ev.source,
            data_version: ev.data_version,
            op: ev.op,
            content,
        },
    })
}

/// True for errors caused by the data of a statement (SQLSTATE classes 22 data exception and
/// 23 integrity violation), which retrying the same rows cannot fix. Everything else (lost
/// connections, pool timeouts, shutdowns, deadlocks, a missing table) is about the database,
/// not the entry: the batch is kept and retried.
pub fn is_data_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
        _ => false,
    }
}

/// What the database step decided, by index into the batch's changes.
#[derive(Debug, Default)]
pub(super) struct DbOutcome {
    /// Changes that are now the stored state: write them to the cache.
    pub to_cache: Vec<usize>,
    /// Changes the database refused: left pending, retried via reclaim.
    pub failed: HashSet<usize>,
    pub applied: usize,
    pub stale: usize,
}

/// Applies changes with one UPSERT. When the database refuses the batch because of some row's
/// data, the rows are applied one by one so the good ones go through and only the bad ones
/// stay pending.
/// Every statement gets the client-side deadline `d` (see [`crate::connect::within`]).
pub(super) async fn apply(
    pool: &PgPool,
    changes: &[Change],
    d: Duration,
) -> Result<DbOutcome, sqlx::Error> {
    let mut failed = HashSet::new();
    let winners = match store::apply_batch(pool, changes).deadline(d).await {
        Ok(w) => w,
        Err(e) if is_data_error(&e) => {
            tracing::warn!(error = %e, rows = changes.len(),
                "database refused the batch; applying its rows one by one");
            let mut w = Vec::new();
            for (i, c) in changes.iter().enumerate() {
                match store::apply_batch(pool, std::slice::from_ref(c))
                    .deadline(d)
                    .await
                {
                    Ok(won) => w.extend(won),
                    Err(e) if is_data_error(&e) => {
                        tracing::warn!(error = %e, widget_key = %c.widget_key,
                            data_version = c.data_version,
                            "database refused a change; it stays pending for reclaim");
                        failed.insert(i);
                    }
                    Err(e) => return Err(e),
                }
            }
            w
        }
        Err(e) => return Err(e),
    };
    let won: HashSet<(&str, i64)> = winners
        .iter()
        .map(|a| (a.widget_key.as_str(), a.data_version))
        .collect();
    let mut cached: HashSet<(&str, i64)> = HashSet::new();
    let mut to_cache = Vec::new();
    let mut losers = Vec::new();
    for (i, c) in changes.iter().enumerate() {
        if failed.contains(&i) {
            continue;
        }
        let kv = (c.widget_key.as_str(), c.data_version);
        if won.contains(&kv) {
            if cached.insert(kv) {
                to_cache.push(i);
            }
        } else {
            losers.push(i);
        }
    }
    let considered = changes.len() - failed.len();
    let applied = to_cache.len();
    if !losers.is_empty() {
        let mut keys: Vec<&str> = losers
            .iter()
            .map(|&i| changes[i].widget_key.as_str())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        // Versions only: the content of a losing row is never needed here.
        let current = store::fetch_versions(pool, &keys).deadline(d).await?;
        for i in losers {
            let c = &changes[i];
            let kv = (c.widget_key.as_str(), c.data_version);
            if current.get(kv.0) == Some(&kv.1) && cached.insert(kv) {
                to_cache.push(i);
            }
        }
    }
    Ok(DbOutcome {
        to_cache,
        failed,
        applied,
        stale: considered - applied,
    })
}

impl Worker {
    /// Processes one batch of entries, plus entries already known to be dead letters.
    pub(super) async fn process(
        &mut self,
        entries: Vec<Entry>,
        mut dead: Vec<DeadLetter>,
        cancel: &CancellationToken,
    ) -> Result<(), Halt> {
        let started = Instant::now();
        self.metrics
            .batch_size
            .observe((entries.len() + dead.len()) as f64);
        let mut valid: Vec<Valid> = Vec::with_capacity(entries.len());
        for entry in &entries {
            let size = crate::stream::entry_size(&entry.fields);
            if size > crate::stream::MAX_ENTRY_BYTES {
                dead.push(DeadLetter::oversized(entry, size));
                continue;
            }
            match decode(entry) {
                Ok(v) => valid.push(v),
                Err((reason, error)) => dead.push(DeadLetter::new(entry, reason, error)),
            }
        }
        self.dead_letter(&dead, cancel).await?;
        if valid.is_empty() {
            self.metrics
                .batch_seconds
                .observe(started.elapsed().as_secs_f64());
            return Ok(());
        }

        let changes: Vec<Change> = valid.iter().map(|v| v.change.clone()).collect();
        let (pool, d) = (&self.pool, self.s.db_deadline);
        let outcome = self
            .links
            .db(cancel, "apply", || apply(pool, &changes, d))
            .await?;

        let jsons: Vec<Option<Vec<u8>>> = outcome
            .to_cache
            .iter()
            .map(|&i| changes[i].widget_json())
            .collect();
        let ttl = self.s.ingest_ttl;
        let writes: Vec<CacheWrite<'_>> = outcome
            .to_cache
            .iter()
            .zip(&jsons)
            .map(|(&i, json)| CacheWrite {
                widget_key: &changes[i].widget_key,
                version: changes[i].data_version,
                json: json.as_deref(),
                ttl,
            })
            .collect();
        // One script call per MiB of values; each part is retried on its own.
        for chunk in crate::cache::write_chunks(&writes) {
            let cache = &self.cache;
            let part = &writes[chunk];
            self.links
                .redis(cancel, "cache", move |mut conn| async move {
                    cache.write_many(&mut conn, part).await
                })
                .await?;
        }

        let acked: Vec<&Valid> = valid
            .iter()
            .enumerate()
            .filter(|(i, _)| !outcome.failed.contains(i))
            .map(|(_, v)| v)
            .collect();
        if !acked.is_empty() {
            let ids: Vec<&str> = acked.iter().map(|v| v.id.as_str()).collect();
            let mut confirms = Confirmations::default();
            for v in &acked {
                if let Some(row) = v.outbox_row {
                    let key = durability::confirmed_key(&self.s.stream, &v.change.source);
                    confirms.add(key, row);
                }
            }
            let (stream, group, ids) = (self.s.stream.as_str(), self.s.group.as_str(), &ids);
            let confirms = &confirms;
            self.links
                .redis(cancel, "ack", move |mut conn| async move {
                    consumer::ack_and_confirm(&mut conn, stream, group, ids, confirms).await
                })
                .await?;
        }

        let now_us = now_us();
        for v in &acked {
            if let Some(lag_us) = lag_sample_us(now_us, v.produced_at_us) {
                self.metrics.lag_seconds.observe(lag_us as f64 / 1e6);
                self.stats.observe_lag_ms((lag_us / 1000) as u64);
            }
        }
        self.metrics.applied.inc_by(outcome.applied as u64);
        self.metrics.stale.inc_by(outcome.stale as u64);
        self.metrics.db_rejected.inc_by(outcome.failed.len() as u64);
        self.stats
            .add(stats::field::APPLIED, outcome.applied as u64);
        self.stats.add(stats::field::STALE, outcome.stale as u64);
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            entries = entries.len(),
            applied = outcome.applied,
            stale = outcome.stale,
            dead_lettered = dead.len(),
            refused = outcome.failed.len(),
            "batch done"
        );
        Ok(())
    }
}

/// Longest ingress lag counted; an entry claiming to be older (a producer clock or a writer
/// around the library that sets `produced_at_us` to nonsense) is left out of the figures, so one
/// entry cannot turn the p99 into years. A relayed row waits at most its retention (24 h by
/// default) and a replay after a long outage stays well inside this.
const MAX_LAG_US: i64 = 7 * 24 * 3600 * 1_000_000;

/// The ingress lag of one entry, or `None` when its timestamp makes no sense. A timestamp in
/// the future (producer clock ahead) counts as no lag.
fn lag_sample_us(now_us: i64, produced_at_us: i64) -> Option<i64> {
    let lag = now_us.saturating_sub(produced_at_us).max(0);
    (lag <= MAX_LAG_US).then_some(lag)
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use redis::Value;

    use super::*;
    use crate::event::Op;

    fn entry(ev: &StreamEvent) -> Entry {
        Entry {
            id: "1-0".into(),
            fields: ev
                .to_fields()
                .into_iter()
                .map(|(k, v)| (k.to_string(), Value::BulkString(v)))
                .collect::<HashMap<_, _>>(),
        }
    }

    fn event() -> StreamEvent {
        StreamEvent {
            event_id: "deals:1".into(),
            source: "deals".into(),
            widget_key: "deals.top".into(),
            widget_type: "carousel".into(),
            data_version: 4,
            op: Op::Upsert,
            content: Some(br#"{"a":1}"#.to_vec()),
            produced_at_us: 10,
        }
    }

    #[test]
    fn nonsense_timestamps_stay_out_of_the_lag_figures() {
        let now = 1_800_000_000_000_000;
        assert_eq!(lag_sample_us(now, now - 5_000), Some(5_000));
        assert_eq!(lag_sample_us(now, now + 60_000_000), Some(0));
        assert_eq!(lag_sample_us(now, 0), None);
        assert_eq!(lag_sample_us(now, i64::MIN), None);
        assert_eq!(lag_sample_us(now, now - MAX_LAG_US), Some(MAX_LAG_US));
    }

    #[test]
    fn decode_builds_the_change() {
        let v = decode(&entry(&event())).expect("valid");
        assert_eq!(v.change.widget_key, "deals.top");
        assert_eq!(v.change.content.as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(v.change.source, "deals");
        assert_eq!(v.produced_at_us, 10);
    }

    #[test]
    fn decode_names_the_reason() {
        let mut ev = event();
        ev.widget_key = "loyalty.points".into();
        assert_eq!(
            decode(&entry(&ev)).map(|_| ()).map_err(|e| e.0),
            Err("foreign-namespace")
        );
        let garbage = Entry {
            id: "2-0".into(),
            fields: HashMap::from([("x".to_string(), Value::BulkString(b"y".to_vec()))]),
        };
        assert_eq!(
            decode(&garbage).map(|_| ()).map_err(|e| e.0),
            Err("undecodable")
        );
    }
}
