//! Looking widgets up: one MGET for all keys, one Postgres query for the misses (shared between
//! concurrent requests by single-flight), and a version-guarded back-fill of what Postgres had.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use super::Shared;
use crate::cache::{CacheWrite, Cached, decode_value, widget_json};
use crate::stats::field;
use crate::store;

/// Where a served widget came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cache,
    Database,
}

/// The answer for one requested key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// The ready widget JSON object (`{"key","type","version","content"}`).
    Widget {
        version: i64,
        json: Bytes,
        origin: Origin,
    },
    /// Deleted at this version (a tombstone): listed as missing, never looked up again.
    Deleted { version: i64 },
    /// Not found, or the store that could have it did not answer.
    Missing,
}

/// The answers for a request's keys, in the order asked.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub slots: Vec<Slot>,
    /// Redis answered the MGET.
    pub cache_answered: bool,
    /// Postgres was asked and at least one read answered.
    pub database_answered: bool,
    /// Postgres was needed but did not answer (down, open circuit, timeout).
    pub database_failed: bool,
}

impl Lookup {
    /// True when no store answered at all: the API must say 503 rather than "all missing".
    pub fn nothing_answered(&self) -> bool {
        !self.cache_answered && !self.database_answered
    }
}

/// A row as Postgres had it: `json` is `None` for a tombstone.
#[derive(Debug, Clone)]
struct DbRow {
    version: i64,
    json: Option<Bytes>,
}

type BatchResult = Result<HashMap<String, DbRow>, String>;
type FlightRx = watch::Receiver<Option<Arc<BatchResult>>>;

/// Postgres reads in flight, by widget key: a request that misses a key someone is already
/// reading waits for that read instead of making its own.
#[derive(Default)]
pub struct Flights {
    inflight: Mutex<HashMap<String, FlightRx>>,
}

impl Flights {
    /// Keys currently being read (for tests and debugging).
    pub fn in_flight(&self) -> usize {
        self.inflight.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// Looks up `keys` (validated widget keys, no duplicates).
pub async fn lookup(shared: &Arc<Shared>, keys: &[String]) -> Lookup {
    let mut slots = vec![Slot::Missing; keys.len()];
    let mut cache_answered = false;
    if shared.redis_breaker.allows() {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        match shared.mget(&refs).await {
            Ok(values) => {
                cache_answered = true;
                for (slot, value) in slots.iter_mut().zip(values) {
                    let Some(raw) = value else { continue };
                    match decode_value(&raw) {
                        Some(Cached::Widget { version, json }) => {
                            // Zero-copy: the JSON part of the MGET buffer goes into the body.
                            let start = raw.len() - json.len();
                            let json = Bytes::from(raw).slice(start..);
                            *slot = Slot::Widget {
                                version,
                                json,
                                origin: Origin::Cache,
                            };
                        }
                        Some(Cached::Deleted { version }) => *slot = Slot::Deleted { version },
                        None => {
                            tracing::warn!("cache value in an unknown format; reading Postgres")
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cache read failed; using Postgres"),
        }
    }
    let hits = slots.iter().filter(|s| **s != Slot::Missing).count() as u64;
    let misses = keys.len() as u64 - hits;
    shared.metrics.cache_hits.inc_by(hits);
    shared.metrics.cache_misses.inc_by(misses);
    shared.stats.add(field::CACHE_HITS, hits);
    shared.stats.add(field::CACHE_MISSES, misses);

    let mut lookup = Lookup {
        slots,
        cache_answered,
        database_answered: false,
        database_failed: false,
    };
    if misses == 0 {
        return lookup;
    }
    let missed: Vec<String> = keys
        .iter()
        .zip(&lookup.slots)
        .filter(|(_, s)| **s == Slot::Missing)
        .map(|(k, _)| k.clone())
        .collect();
    if !shared.db_breaker.allows() {
        lookup.database_failed = true;
        return lookup;
    }
    let (rows, answered, failed) = read_through(shared, missed).await;
    lookup.database_answered = answered;
    lookup.database_failed = failed;
    for (key, slot) in keys.iter().zip(lookup.slots.iter_mut()) {
        if *slot != Slot::Missing {
            continue;
        }
        match rows.get(key.as_str()) {
            Some(DbRow {
                version,
                json: Some(json),
            }) => {
                *slot = Slot::Widget {
                    version: *version,
                    json: json.clone(),
                    origin: Origin::Database,
                }
            }
            Some(DbRow {
                version,
                json: None,
            }) => *slot = Slot::Deleted { version: *version },
            None => {}
        }
    }
    lookup
}

/// Reads missed keys from Postgres, joining reads already in flight. Returns the rows found,
/// whether any read answered and whether any failed.
async fn read_through(
    shared: &Arc<Shared>,
    missed: Vec<String>,
) -> (HashMap<String, DbRow>, bool, bool) {
    let mut waits: Vec<FlightRx> = Vec::new();
    {
        let Ok(mut inflight) = shared.flights.inflight.lock() else {
            return (HashMap::new(), false, true);
        };
        let mut lead = Vec::new();
        for key in missed {
            match inflight.get(&key) {
                Some(rx) => {
                    shared.metrics.coalesced_keys.inc();
                    if !waits.iter().any(|w| w.same_channel(rx)) {
                        waits.push(rx.clone());
                    }
                }
                None => lead.push(key),
            }
        }
        if !lead.is_empty() {
            let (tx, rx) = watch::channel(None);
            for key in &lead {
                inflight.insert(key.clone(), rx.clone());
            }
            waits.push(rx);
            // A task of its own: the read completes (and the waiters are answered) even if
            // the request that started it goes away.
            tokio::spawn(lead_read(shared.clone(), lead, tx));
        }
    }
    let mut rows = HashMap::new();
    let (mut answered, mut failed) = (false, false);
    for mut rx in waits {
        let result = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None, // the reading task ended without an answer
        };
        match result.as_deref() {
            Some(Ok(found)) => {
                answered = true;
                for (k, v) in found {
                    rows.insert(k.clone(), v.clone());
                }
            }
            Some(Err(_)) | None => failed = true,
        }
    }
    (rows, answered, failed)
}

/// One Postgres read for `keys`, shared by every request waiting on them; then the back-fill.
async fn lead_read(
    shared: Arc<Shared>,
    keys: Vec<String>,
    tx: watch::Sender<Option<Arc<BatchResult>>>,
) {
    shared.metrics.fallback_reads.inc();
    shared.metrics.fallback_keys.inc_by(keys.len() as u64);
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let result: BatchResult = match crate::connect::within(
        shared.settings.database_timeout,
        store::fetch_many(&shared.pool, &refs),
    )
    .await
    {
        Ok(found) => {
            shared.db_breaker.record_success();
            Ok(found
                .into_iter()
                .map(|w| {
                    let json = match (&w.content, w.deleted) {
                        (Some(content), false) => Some(Bytes::from(widget_json(
                            &w.widget_key,
                            &w.widget_type,
                            w.data_version,
                            content.as_bytes(),
                        ))),
                        _ => None,
                    };
                    (
                        w.widget_key,
                        DbRow {
                            version: w.data_version,
                            json,
                        },
                    )
                })
                .collect())
        }
        Err(e) => {
            shared.metrics.store_error("database");
            shared.db_breaker.record_failure(&e);
            Err(e.to_string())
        }
    };
    let result = Arc::new(result);
    let _ = tx.send(Some(result.clone()));
    if let Ok(rows) = result.as_ref() {
        backfill(&shared, &keys, rows).await;
    }
    // Only now: a request that missed the cache before the back-fill landed joins this answer
    // instead of reading Postgres again (it would otherwise fall between the two).
    if let Ok(mut inflight) = shared.flights.inflight.lock() {
        for k in &keys {
            inflight.remove(k);
        }
    }
}

/// Writes what Postgres had back to the cache with the short fallback TTL, through the same
/// version-guarded script as the ingester: a newer cached value is never replaced.
///
/// Keys Postgres does not have are cached too, as a version-0 tombstone: otherwise every
/// request for them (a personalised key of a user without that widget, or made-up keys a
/// client sends) would be a Postgres query. Any real write has version >= 1 and replaces it.
async fn backfill(shared: &Shared, keys: &[String], rows: &HashMap<String, DbRow>) {
    if !shared.redis_breaker.allows() {
        return;
    }
    let absent = keys.iter().filter(|k| !rows.contains_key(k.as_str()));
    let writes: Vec<CacheWrite<'_>> = rows
        .iter()
        .map(|(key, row)| CacheWrite {
            widget_key: key,
            version: row.version,
            json: row.json.as_deref(),
            ttl: shared.settings.fallback_ttl,
        })
        .chain(absent.map(|key| CacheWrite {
            widget_key: key,
            version: ABSENT_VERSION,
            json: None,
            ttl: shared.settings.fallback_ttl,
        }))
        .collect();
    if writes.is_empty() {
        return;
    }
    match shared.write_cache(&writes).await {
        Ok(won) => {
            let (mut found, mut absent) = (0, 0);
            for (w, won) in writes.iter().zip(won) {
                match (won, w.version == ABSENT_VERSION) {
                    (true, false) => found += 1,
                    (true, true) => absent += 1,
                    (false, _) => {}
                }
            }
            shared.metrics.backfilled.inc_by(found);
            shared.metrics.absent_cached.inc_by(absent);
        }
        Err(e) => tracing::debug!(error = %e, "back-fill failed"),
    }
}

/// The version of the marker cached for a key Postgres does not have (below every real one).
const ABSENT_VERSION: i64 = 0;
