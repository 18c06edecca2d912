//! core-api's in-process cache (L1) of what Redis holds for each widget key, kept coherent by
//! Redis server-assisted client-side caching: one RESP3 connection runs `CLIENT TRACKING ON
//! BCAST PREFIX <keyPrefix>w:`, so Redis pushes an invalidation for every write, deletion,
//! expiry or eviction of a cache key, whoever made it. In a Redis Cluster every node sends the
//! invalidations of its own keys, so there is one such connection per node, and a change of the
//! slot map ends them all (flush) to start over on the new map.
//!
//! Why not redis-rs's own `cache-aio`: it bounds its cache by entries, not bytes, and caches
//! whole command replies on the connection that sent them; this cache holds the ready widget
//! JSON per key, bounded by bytes (moka with a weigher), and knows the keys Postgres lacks.
//!
//! The rules:
//! - Entries are served only while tracking is confirmed (`live`). When a tracking connection
//!   drops, fails a health check, or Redis says invalidations may have been lost (a null
//!   invalidation), everything is flushed; serving resumes only after tracking is on again.
//! - A value read from Redis is inserted only if no invalidation for its key (and no flush)
//!   happened since just before the read ([`Ticket`]); it is checked again after the insert,
//!   so an invalidation racing the insert still wins.
//! - An insert never replaces a newer version with an older one.
//! - Keys Postgres does not have are remembered here (bounded, TTL) instead of as Redis
//!   markers; they are consulted only after Redis missed, and dropped by invalidations too.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use moka::sync::Cache as Moka;
use tokio_util::sync::CancellationToken;

use std::collections::HashMap;

use super::metrics::ApiMetrics;
use super::response::Assembled;
use crate::config::{ScreenConfig, USER_PLACEHOLDER};
use crate::connect;

/// What Redis held for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Widget { version: i64, json: Bytes },
    Deleted { version: i64 },
}

impl Entry {
    fn version(&self) -> i64 {
        match self {
            Entry::Widget { version, .. } | Entry::Deleted { version } => *version,
        }
    }
}

/// Invalidations queued but not applied yet beyond which the cache is flushed.
const BACKLOG_LIMIT: usize = 10_000;

/// Invalidation sequence numbers by key hash: a read compares them before and after.
const STRIPES: usize = 1 << 14;

pub struct LocalCache {
    enabled: bool,
    entries: Moka<Arc<str>, Entry>,
    absent: Moka<Arc<str>, ()>,
    stripes: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    seq: AtomicU64,
    /// Bumped by every flush: a read that started before one never inserts.
    generation: AtomicU64,
    /// Tracking is confirmed on a connection that is up.
    live: AtomicBool,
    prefix: String,
    metrics: ApiMetrics,
    /// Whole screens as last answered, by `<screen>\0<user>`.
    screens: Moka<String, Arc<ScreenEntry>>,
    /// Per screen, bumped by an invalidation of any shared key it shows.
    screen_gens: HashMap<String, AtomicU64>,
    /// Shared key -> the screens showing it.
    shared_index: HashMap<String, Vec<String>>,
    /// Personalised keys of screens: (screen, part before `{user}`, part after).
    templates: Vec<(String, String, String)>,
}

struct ScreenEntry {
    assembled: Arc<Assembled>,
    generation: u64,
    screen_gen: u64,
}

fn screen_key(screen: &str, user: Option<&str>) -> String {
    format!("{screen}\0{}", user.unwrap_or_default())
}

/// Taken just before a Redis read; an insert with it succeeds only if nothing changed since.
pub struct Ticket {
    generation: u64,
    live: bool,
    stripes: Vec<u64>,
}

impl LocalCache {
    /// `key_prefix` is the pipeline's cache prefix; `absent_ttl` how long a key Postgres lacks
    /// is remembered.
    pub fn new(
        enabled: bool,
        max_bytes: u64,
        key_prefix: &str,
        absent_ttl: Duration,
        screens: &[ScreenConfig],
        metrics: ApiMetrics,
    ) -> Self {
        let mut shared_index: HashMap<String, Vec<String>> = HashMap::new();
        let mut templates = Vec::new();
        for s in screens {
            for k in &s.widgets {
                match k.split_once(USER_PLACEHOLDER) {
                    Some((before, after)) => {
                        templates.push((s.name.clone(), before.to_string(), after.to_string()))
                    }
                    None => shared_index
                        .entry(k.clone())
                        .or_default()
                        .push(s.name.clone()),
                }
            }
        }
        let entries = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &Arc<str>, v: &Entry| {
                let json = match v {
                    Entry::Widget { json, .. } => json.len(),
                    Entry::Deleted { .. } => 0,
                };
                // Key, value and moka's own bookkeeping (about 100 bytes an entry).
                (k.len() + json + 128).min(u32::MAX as usize) as u32
            })
            // A backstop only: an invalidation normally drops an entry long before.
            .time_to_live(absent_ttl.max(Duration::from_secs(1)))
            .build();
        let absent = Moka::builder()
            .max_capacity((max_bytes / 4).max(1024 * 1024))
            .weigher(|k: &Arc<str>, _: &()| (k.len() + 96) as u32)
            .time_to_live(absent_ttl.max(Duration::from_secs(1)))
            .build();
        LocalCache {
            screens: Moka::builder()
                .max_capacity((max_bytes / 4).max(1024 * 1024))
                .weigher(|k: &String, v: &Arc<ScreenEntry>| {
                    (k.len() + v.assembled.body.len() + 160).min(u32::MAX as usize) as u32
                })
                .time_to_live(absent_ttl.max(Duration::from_secs(1)))
                .build(),
            screen_gens: screens
                .iter()
                .map(|s| (s.name.clone(), AtomicU64::new(0)))
                .collect(),
            shared_index,
            templates,
            enabled,
            entries,
            absent,
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: Default::default(),
            seq: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            live: AtomicBool::new(false),
            prefix: format!("{key_prefix}w:"),
            metrics,
        }
    }

    fn stripe(&self, key: &str) -> &AtomicU64 {
        &self.stripes[(self.hasher.hash_one(key) as usize) % STRIPES]
    }

    /// Whether entries may be served now.
    pub fn serving(&self) -> bool {
        self.enabled && self.live.load(Ordering::SeqCst)
    }

    pub fn get(&self, key: &str) -> Option<Entry> {
        if !self.serving() {
            return None;
        }
        let e = self.entries.get(key)?;
        self.metrics.local_hits.inc();
        Some(e)
    }

    /// Whether Postgres was recently found not to have `key` (and nothing wrote it since).
    pub fn known_absent(&self, key: &str) -> bool {
        // Only while invalidations arrive: nothing else would tell it the key was written.
        self.serving() && self.absent.contains_key(key)
    }

    pub fn ticket(&self, keys: &[String]) -> Ticket {
        Ticket {
            generation: self.generation.load(Ordering::SeqCst),
            live: self.serving(),
            stripes: keys
                .iter()
                .map(|k| self.stripe(k).load(Ordering::SeqCst))
                .collect(),
        }
    }

    fn unchanged(&self, ticket: &Ticket, i: usize, key: &str) -> bool {
        self.generation.load(Ordering::SeqCst) == ticket.generation
            && ticket.stripes.get(i) == Some(&self.stripe(key).load(Ordering::SeqCst))
    }

    /// Remembers what Redis answered for `keys[i]` under `ticket`.
    pub fn insert(&self, ticket: &Ticket, i: usize, key: &str, entry: Entry) {
        if !ticket.live || !self.serving() || !self.unchanged(ticket, i, key) {
            return;
        }
        let key: Arc<str> = Arc::from(key);
        let version = entry.version();
        self.entries
            .entry(key.clone())
            .and_upsert_with(|existing| match existing {
                Some(old) if old.value().version() > version => old.into_value(),
                _ => entry,
            });
        // An invalidation (or flush) that ran between the check and the insert wins.
        if !self.unchanged(ticket, i, &key) {
            self.entries.invalidate(&key);
        }
        self.metrics
            .local_bytes
            .set(self.entries.weighted_size() as i64);
    }

    /// Remembers that Postgres does not have `keys[i]` (read under `ticket`).
    pub fn insert_absent(&self, ticket: &Ticket, i: usize, key: &str) {
        if !ticket.live || !self.serving() || !self.unchanged(ticket, i, key) {
            return;
        }
        let key: Arc<str> = Arc::from(key);
        self.absent.insert(key.clone(), ());
        if !self.unchanged(ticket, i, &key) {
            self.absent.invalidate(&key);
        }
    }

    /// Redis says `key` (a widget key) changed.
    pub fn invalidate(&self, key: &str) {
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.stripe(key).store(n, Ordering::SeqCst);
        self.entries.invalidate(key);
        self.absent.invalidate(key);
        if let Some(screens) = self.shared_index.get(key) {
            for s in screens {
                if let Some(g) = self.screen_gens.get(s) {
                    g.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        for (screen, before, after) in &self.templates {
            if let Some(user) = key
                .strip_prefix(before.as_str())
                .and_then(|rest| rest.strip_suffix(after.as_str()))
            {
                self.screens.invalidate(&screen_key(screen, Some(user)));
            }
        }
        self.metrics.local_invalidations.inc();
    }

    /// The screen's generation now; taken (with the ticket) before its widgets are read.
    pub fn screen_gen(&self, screen: &str) -> u64 {
        self.screen_gens
            .get(screen)
            .map_or(0, |g| g.load(Ordering::SeqCst))
    }

    /// The screen as last answered for `user`, if nothing it shows changed since.
    pub fn screen(&self, screen: &str, user: Option<&str>) -> Option<Arc<Assembled>> {
        if !self.serving() {
            return None;
        }
        let e = self.screens.get(&screen_key(screen, user))?;
        (e.generation == self.generation.load(Ordering::SeqCst)
            && e.screen_gen == self.screen_gen(screen))
        .then(|| {
            self.metrics.local_screens.inc();
            e.assembled.clone()
        })
    }

    /// Keeps an answer assembled entirely from what Redis held (read under `ticket`, with the
    /// screen's generation `stamp` taken before): only if nothing it shows changed since.
    pub fn put_screen(
        &self,
        ticket: &Ticket,
        stamp: u64,
        screen: &str,
        user: Option<&str>,
        keys: &[String],
        assembled: Assembled,
    ) {
        let unchanged = || {
            self.screen_gen(screen) == stamp
                && keys
                    .iter()
                    .enumerate()
                    .all(|(i, k)| self.unchanged(ticket, i, k))
        };
        if !ticket.live || !self.serving() || !unchanged() {
            return;
        }
        let key = screen_key(screen, user);
        self.screens.insert(
            key.clone(),
            Arc::new(ScreenEntry {
                assembled: Arc::new(assembled),
                generation: ticket.generation,
                screen_gen: stamp,
            }),
        );
        if !unchanged() {
            self.screens.invalidate(&key);
        }
    }

    /// Drops everything and stops serving until tracking is confirmed again.
    pub fn flush(&self, why: &str) {
        self.live.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate_all();
        self.absent.invalidate_all();
        self.screens.invalidate_all();
        self.metrics.local_flushes.inc();
        self.metrics.local_bytes.set(0);
        tracing::debug!(why, "local cache flushed");
    }

    /// Serving may start: tracking is on for a connection that is up.
    fn confirm(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.live.store(true, Ordering::SeqCst);
    }

    /// The widget key of a cache key in an invalidation, if it is one of ours.
    fn widget_key<'a>(&self, cache_key: &'a [u8]) -> Option<&'a str> {
        std::str::from_utf8(cache_key)
            .ok()?
            .strip_prefix(self.prefix.as_str())
    }

    /// Keeps a tracking connection to Redis, applying its invalidations, until `cancel`.
    /// Reconnects with backoff; every loss of the connection flushes the cache first.
    pub async fn track(self: Arc<Self>, redis: connect::Redis, cancel: CancellationToken) {
        if !self.enabled {
            return;
        }
        let mut failures = 0u32;
        while !cancel.is_cancelled() {
            let outcome = self.track_once(&redis, &cancel).await;
            self.flush("tracking connection ended");
            if let Err(e) = outcome {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(error = %e, "local cache tracking failed; serving from Redis until it is back");
                }
            } else {
                failures = 0;
            }
            let wait =
                crate::retry::backoff(failures, Duration::from_millis(100), Duration::from_secs(2));
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn track_once(
        &self,
        redis: &connect::Redis,
        cancel: &CancellationToken,
    ) -> redis::RedisResult<()> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // In a cluster each node sends invalidations for the keys it holds (and a replica for
        // what it applies), so every node gets a tracking connection; a change of the nodes,
        // their roles or slots (failover, resharding, a node added) ends tracking, and it
        // starts over on the new map.
        let (servers, mut node_map) = redis.servers().await?;
        let mut conns = Vec::with_capacity(servers.len());
        for server in &servers {
            let mut conn = server.tracking(tx.clone()).await?;
            let _: () = redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .arg("BCAST")
                .arg("PREFIX")
                .arg(&self.prefix)
                .query_async(&mut conn)
                .await?;
            conns.push(conn);
        }
        drop(tx);
        self.confirm();
        // A link that silently stops delivering would let stale entries live on: it is
        // checked every second, and a failed check ends tracking (and flushes).
        let mut health = tokio::time::interval(Duration::from_secs(1));
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                push = rx.recv() => {
                    let Some(push) = push else { return Ok(()) };
                    match push.kind {
                        redis::PushKind::Invalidate => self.apply(&push.data),
                        redis::PushKind::Disconnection => return Ok(()),
                        _ => {}
                    }
                }
                _ = health.tick() => {
                    for conn in &mut conns {
                        let _: String = redis::cmd("PING").query_async(conn).await?;
                    }
                    if let Some(map) = &mut node_map
                        && !map.unchanged().await?
                    {
                        tracing::info!("cluster nodes or slots changed; local cache tracking starts over");
                        return Ok(());
                    }
                    // Pushes sent before the PING's reply are queued by now. A queue this long
                    // means invalidations are applied late (a burst of writes, a replay):
                    // drop everything, catch up, then serve again.
                    if rx.len() > BACKLOG_LIMIT {
                        self.flush("invalidation backlog");
                        while let Ok(push) = rx.try_recv() {
                            match push.kind {
                                redis::PushKind::Invalidate => self.apply(&push.data),
                                redis::PushKind::Disconnection => return Ok(()),
                                _ => {}
                            }
                        }
                        self.confirm();
                    }
                }
            }
        }
    }

    fn apply(&self, data: &[redis::Value]) {
        match data.first() {
            Some(redis::Value::Array(keys)) => {
                for k in keys {
                    if let redis::Value::BulkString(raw) = k
                        && let Some(key) = self.widget_key(raw)
                    {
                        self.invalidate(key);
                    }
                }
            }
            // A null invalidation: Redis may have dropped some (e.g. after FLUSHALL, or
            // tracking state lost): nothing cached can be trusted.
            // The connection itself is fine: serving resumes with what is read from now on.
            _ => {
                self.flush("null invalidation");
                self.confirm();
            }
        }
    }
}
