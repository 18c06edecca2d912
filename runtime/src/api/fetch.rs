//! Looking widgets up: one MGET for all keys, one Postgres query for the misses (shared between
//! concurrent requests by single-flight), and a version-guarded back-fill of what Postgres had.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use super::Shared;
use super::local_cache::{Entry, Ticket};
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
    /// Every widget came from the cache (in process or Redis) and no store failed: the answer
    /// is exactly what Redis holds, so it stays right until an invalidation says otherwise.
    pub fn is_complete_from_cache(&self) -> bool {
        self.cache_answered
            && !self.database_failed
            && self.slots.iter().all(|s| {
                !matches!(
                    s,
                    Slot::Widget {
                        origin: Origin::Database,
                        ..
                    }
                )
            })
    }

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

/// Looks up `keys` (validated widget keys, no duplicates): the in-process cache first, then
/// one MGET for the rest, then Postgres for what Redis missed (unless known to be absent).
/// `ticket` is [`super::local_cache::LocalCache::ticket`] of `keys`, taken before: what Redis
/// answers is kept only if no invalidation for its key came in meanwhile.
pub async fn lookup(shared: &Arc<Shared>, keys: &[String], ticket: &Ticket) -> Lookup {
    let mut slots = vec![Slot::Missing; keys.len()];
    let local = &shared.local;
    let mut local_hits = 0u64;
    if local.serving() {
        for (slot, key) in slots.iter_mut().zip(keys) {
            match local.get(key) {
                Some(Entry::Widget { version, json }) => {
                    *slot = Slot::Widget {
                        version,
                        json,
                        origin: Origin::Cache,
                    }
                }
                Some(Entry::Deleted { version }) => *slot = Slot::Deleted { version },
                None => continue,
            }
            local_hits += 1;
        }
    }
    let mut cache_answered = local_hits == keys.len() as u64;
    if !cache_answered && shared.redis_breaker.allows() {
        let wanted: Vec<usize> = (0..keys.len())
            .filter(|&i| slots[i] == Slot::Missing)
            .collect();
        let refs: Vec<&str> = wanted.iter().map(|&i| keys[i].as_str()).collect();
        match shared.mget(&refs).await {
            Ok(values) => {
                cache_answered = true;
                for (&i, value) in wanted.iter().zip(values) {
                    let Some(raw) = value else { continue };
                    match decode_value(&raw) {
                        Some(Cached::Widget { version, json }) => {
                            // Zero-copy: the JSON part of the MGET buffer goes into the body.
                            let start = raw.len() - json.len();
                            let json = Bytes::from(raw).slice(start..);
                            local.insert(
                                ticket,
                                i,
                                &keys[i],
                                Entry::Widget {
                                    version,
                                    json: json.clone(),
                                },
                            );
                            slots[i] = Slot::Widget {
                                version,
                                json,
                                origin: Origin::Cache,
                            };
                        }
                        // Version 0: a marker an older core-api wrote for a key Postgres
                        // lacked; it is a miss now (the answer is remembered in process).
                        Some(Cached::Deleted {
                            version: ABSENT_VERSION,
                        }) => {}
                        Some(Cached::Deleted { version }) => {
                            local.insert(ticket, i, &keys[i], Entry::Deleted { version });
                            slots[i] = Slot::Deleted { version };
                        }
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
    // Keys Postgres was just found not to have are not asked again (they were missed by
    // Redis too, so nothing wrote them since).
    let missed: Vec<String> = keys
        .iter()
        .zip(&lookup.slots)
        .filter(|(k, s)| **s == Slot::Missing && !(cache_answered && local.known_absent(k)))
        .map(|(k, _)| k.clone())
        .collect();
    if missed.is_empty() {
        lookup.database_answered = true;
        return lookup;
    }
    if !shared.db_breaker.allows() {
        lookup.database_failed = true;
        return lookup;
    }
    let (rows, answered, failed) = read_through(shared, missed.clone()).await;
    lookup.database_answered = answered;
    lookup.database_failed = failed;
    for (i, (key, slot)) in keys.iter().zip(lookup.slots.iter_mut()).enumerate() {
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
            None if answered && !failed && missed.contains(key) => {
                local.insert_absent(ticket, i, key);
                shared.metrics.absent_cached.inc();
            }
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
        backfill(&shared, rows).await;
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
/// Keys Postgres does not have are not written to Redis: a client can ask for any number of
/// made-up keys, and markers for them would fill the Redis that also holds the stream. They
/// are remembered in process instead (bounded, [`super::local_cache`]).
async fn backfill(shared: &Arc<Shared>, rows: &HashMap<String, DbRow>) {
    if !shared.redis_breaker.allows() {
        return;
    }
    let writes: Vec<CacheWrite<'_>> = rows
        .iter()
        .map(|(key, row)| CacheWrite {
            widget_key: key,
            version: row.version,
            json: row.json.as_deref(),
            ttl: shared.settings.fallback_ttl,
        })
        .collect();
    if writes.is_empty() {
        return;
    }
    match shared.write_cache(&writes).await {
        Ok(won) => {
            let found = won.iter().filter(|w| **w).count() as u64;
            shared.metrics.backfilled.inc_by(found);
        }
        Err(e) => tracing::debug!(error = %e, "back-fill failed"),
    }
}

/// The version of the marker older core-apis cached for a key Postgres did not have.
const ABSENT_VERSION: i64 = 0;
