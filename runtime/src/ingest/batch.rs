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
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::consumer::{self, Entry};
use super::dead_letter::DeadLetter;
use super::metrics::IngestMetrics;
use super::{Halt, Links, Worker};
use crate::cache::{Cache, CacheWrite};
use crate::connect::Deadline;
use crate::durability::{self, Confirmations};
use crate::stats::{self, Stats};
use crate::store::{self, Change};
use crate::stream::StreamEvent;

/// What a decoded entry needs beside its change: its id to acknowledge, its timestamp for the
/// lag figures, and the outbox row to confirm.
#[derive(Debug, Clone)]
pub(super) struct Meta {
    pub id: String,
    pub produced_at_us: i64,
    /// The outbox row it came from, when a worker of its source relayed it.
    pub outbox_row: Option<durability::RowRef>,
}

/// Decodes one entry, or says why it must be dead-lettered.
pub(super) fn decode(entry: &Entry) -> Result<(Meta, Change), (&'static str, String)> {
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
    let meta = Meta {
        id: entry.id.clone(),
        produced_at_us: ev.produced_at_us,
        outbox_row: durability::outbox_id(&ev.event_id, &ev.source).map(|id| durability::RowRef {
            id,
            version: ev.data_version,
            produced_at_us: ev.produced_at_us,
        }),
    };
    let change = Change {
        widget_key: ev.widget_key,
        widget_type: ev.widget_type,
        source: ev.source,
        data_version: ev.data_version,
        op: ev.op,
        content,
    };
    Ok((meta, change))
}

/// A batch as read: the changes to apply with their entries' bookkeeping, and the entries to
/// dead-letter.
pub(super) struct Decoded {
    metas: Vec<Meta>,
    changes: Vec<Change>,
    dead: Vec<DeadLetter>,
    entries: usize,
    started: Instant,
}

/// Decodes every entry; oversized and undecodable ones join `dead`.
pub(super) fn decode_all(entries: Vec<Entry>, mut dead: Vec<DeadLetter>) -> Decoded {
    let started = Instant::now();
    let mut metas: Vec<Meta> = Vec::with_capacity(entries.len());
    let mut changes: Vec<Change> = Vec::with_capacity(entries.len());
    for entry in &entries {
        let size = crate::stream::entry_size(&entry.fields);
        if size > crate::stream::MAX_ENTRY_BYTES {
            dead.push(DeadLetter::oversized(entry, size));
            continue;
        }
        match decode(entry) {
            Ok((meta, change)) => {
                metas.push(meta);
                changes.push(change);
            }
            Err((reason, error)) => dead.push(DeadLetter::new(entry, reason, error)),
        }
    }
    Decoded {
        metas,
        changes,
        dead,
        entries: entries.len(),
        started,
    }
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

/// A batch whose rows are in the database, waiting for its cache write and acknowledgement.
pub(super) struct Applied {
    metas: Vec<Meta>,
    changes: Vec<Change>,
    outcome: DbOutcome,
    started: Instant,
    entries: usize,
    dead: usize,
}

/// The second half of every batch: the cache write, then the XACK with the confirmations. It
/// runs on a task of its own while the next batch is read and upserted, so a batch costs about
/// the longer of the two halves instead of their sum. One batch at a time finishes, in order,
/// and each entry is still acknowledged only after its row is stored and cached.
pub(super) struct Finisher {
    pub links: Links,
    pub cache: Cache,
    pub stream: String,
    pub group: String,
    pub ingest_ttl: Duration,
    pub metrics: IngestMetrics,
    pub stats: Arc<Stats>,
}

impl Finisher {
    pub(super) async fn finish(
        &mut self,
        a: Applied,
        cancel: &CancellationToken,
    ) -> Result<(), Halt> {
        let Applied {
            metas,
            changes,
            outcome,
            started,
            entries,
            dead,
        } = a;
        let jsons: Vec<Option<Vec<u8>>> = outcome
            .to_cache
            .iter()
            .map(|&i| changes[i].widget_json())
            .collect();
        let ttl = self.ingest_ttl;
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

        let acked: Vec<usize> = (0..metas.len())
            .filter(|i| !outcome.failed.contains(i))
            .collect();
        if !acked.is_empty() {
            let ids: Vec<&str> = acked.iter().map(|&i| metas[i].id.as_str()).collect();
            let mut confirms = Confirmations::default();
            for &i in &acked {
                if let Some(row) = metas[i].outbox_row {
                    let key = durability::confirmed_key(&self.stream, &changes[i].source);
                    confirms.add(key, row);
                }
            }
            let (stream, group, ids) = (self.stream.as_str(), self.group.as_str(), &ids);
            let confirms = &confirms;
            self.links
                .redis(cancel, "ack", move |mut conn| async move {
                    consumer::ack_and_confirm(&mut conn, stream, group, ids, confirms).await
                })
                .await?;
        }

        let now_us = now_us();
        for &i in &acked {
            if let Some(lag_us) = lag_sample_us(now_us, metas[i].produced_at_us) {
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
            entries,
            applied = outcome.applied,
            stale = outcome.stale,
            dead_lettered = dead,
            refused = outcome.failed.len(),
            "batch done"
        );
        Ok(())
    }
}

impl Worker {
    /// Processes one batch of entries, plus entries already known to be dead letters: decodes,
    /// dead-letters and upserts it here, then hands it to the finisher once the previous batch
    /// is finished. Returns when this batch is in the database, not when it is acknowledged;
    /// [`Worker::settle`] waits for that.
    pub(super) async fn process(
        &mut self,
        entries: Vec<Entry>,
        dead: Vec<DeadLetter>,
        cancel: &CancellationToken,
    ) -> Result<(), Halt> {
        self.process_decoded(decode_all(entries, dead), cancel)
            .await
    }

    pub(super) async fn process_decoded(
        &mut self,
        batch: Decoded,
        cancel: &CancellationToken,
    ) -> Result<(), Halt> {
        let Decoded {
            metas,
            changes,
            dead,
            entries,
            started,
        } = batch;
        self.metrics
            .batch_size
            .observe((entries + dead.len()) as f64);
        self.dead_letter(&dead, cancel).await?;
        if changes.is_empty() {
            self.metrics
                .batch_seconds
                .observe(started.elapsed().as_secs_f64());
            return Ok(());
        }

        let (pool, d) = (&self.pool, self.s.db_deadline);
        // The next batch is read while this one is upserted (its entries are pending for this
        // consumer from now on, as after any read; a crash leaves them to the reclaim).
        let read_ahead = self.ahead.is_none() && !cancel.is_cancelled();
        let (links, reader) = (&mut self.links, &mut self.reader);
        let (client, s, consumer) = (&self.redis, &self.s, self.consumer.as_str());
        let (outcome, next) = tokio::join!(
            links.db(cancel, "apply", || apply(pool, &changes, d)),
            async {
                if !read_ahead {
                    return None;
                }
                let r = reader.read(client, s, consumer, Duration::ZERO).await;
                match r {
                    Ok(entries) if !entries.is_empty() => Some(decode_all(entries, Vec::new())),
                    Ok(_) => None,
                    // The next blocking read meets the same failure and handles it.
                    Err(e) => {
                        tracing::debug!(error = %e, "read-ahead failed");
                        None
                    }
                }
            }
        );
        self.ahead = next;
        let outcome = outcome?;
        let applied = Applied {
            metas,
            changes,
            outcome,
            started,
            entries,
            dead: dead.len(),
        };
        self.settle().await?;
        let mut finisher = self.finisher.take().unwrap_or_else(|| self.new_finisher());
        let cancel = cancel.clone();
        self.finishing = Some(tokio::spawn(async move {
            let r = finisher.finish(applied, &cancel).await;
            (finisher, r)
        }));
        Ok(())
    }

    /// Waits until the batch handed to the finisher, if any, is acknowledged or abandoned.
    pub(super) async fn settle(&mut self) -> Result<(), Halt> {
        let Some(task) = self.finishing.take() else {
            return Ok(());
        };
        match task.await {
            Ok((finisher, r)) => {
                self.finisher = Some(finisher);
                if r == Err(Halt::GroupLost) {
                    self.group_ready = false;
                }
                r
            }
            // The batch stays pending and is reclaimed; the next batch gets a new finisher.
            Err(e) => {
                tracing::error!(error = %e, "the task finishing a batch failed; its entries stay pending");
                Ok(())
            }
        }
    }

    pub(super) fn new_finisher(&self) -> Finisher {
        Finisher {
            links: self.links.sibling(),
            cache: self.cache.clone(),
            stream: self.s.stream.clone(),
            group: self.s.group.clone(),
            ingest_ttl: self.s.ingest_ttl,
            metrics: self.metrics.clone(),
            stats: self.stats.clone(),
        }
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
        let (meta, change) = decode(&entry(&event())).expect("valid");
        assert_eq!(change.widget_key, "deals.top");
        assert_eq!(change.content.as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(change.source, "deals");
        assert_eq!(meta.produced_at_us, 10);
        assert_eq!(meta.id, "1-0");
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
