//! The load: product writes through the producer library (many keys, many versions per key,
//! about 5% deletes, personalised keys), screen reads against both core-apis, and a lag probe
//! (a commit timed until an API serves it). Every committed write is recorded in the
//! [`Model`]: what the invariant check compares the stores and the APIs against.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use widget_runtime::event::WidgetEvent;
use widget_runtime::outbox::Outbox;

use crate::http::Http;

/// The key the lag probe writes.
pub const PROBE_KEY: &str = "deals.probe";
/// How many users have a personalised widget (`loyalty.points:u-N`).
pub const USERS: usize = 20;

/// The keys written: `<source>.k-<i>` per source, plus the personalised ones of `loyalty`.
pub fn source_keys(source: &str, per_source: usize) -> Vec<String> {
    let mut keys: Vec<String> = (0..per_source).map(|i| format!("{source}.k-{i}")).collect();
    if source == "loyalty" {
        keys.extend((0..USERS).map(|u| format!("loyalty.points:u-{u}")));
    }
    keys
}

/// The home screen: ten shared widgets of each source and the user's own one.
pub fn screen_keys() -> Vec<String> {
    let mut keys: Vec<String> = (0..10).map(|i| format!("deals.k-{i}")).collect();
    keys.extend((0..5).map(|i| format!("loyalty.k-{i}")));
    keys.push("loyalty.points:{user}".into());
    keys
}

/// What a key must end as: the producer's last committed version, or its deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub version: i64,
    pub deleted: bool,
    /// Set when the last commit's outcome is unknown (the commit call failed): then the state
    /// before it is also acceptable.
    pub before: Option<(i64, bool)>,
}

#[derive(Default)]
pub struct Model {
    last: Mutex<HashMap<String, Expected>>,
}

impl Model {
    fn record(&self, key: &str, version: i64, deleted: bool, certain: bool) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let before = last.get(key).map(|e| (e.version, e.deleted));
        last.insert(
            key.to_string(),
            Expected {
                version,
                deleted,
                before: if certain {
                    None
                } else {
                    before.or(Some((0, true)))
                },
            },
        );
    }

    pub fn snapshot(&self) -> HashMap<String, Expected> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One read of a screen.
#[derive(Debug, Clone, Copy)]
pub struct Read {
    /// Since the recorder's start.
    pub at: Duration,
    /// 0 when nothing answered within the client's deadline.
    pub status: u16,
    pub took: Duration,
}

/// Every read and probe measurement, timestamped, so a scenario can ask for a window.
pub struct Recorder {
    pub t0: Instant,
    reads: Mutex<Vec<Read>>,
    /// (commit time since `t0`, commit to served).
    lags: Mutex<Vec<(Duration, Duration)>>,
    /// Reads where an API served a widget at a lower version than it had served before.
    went_back: Mutex<Vec<Duration>>,
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            t0: Instant::now(),
            reads: Mutex::new(Vec::new()),
            lags: Mutex::new(Vec::new()),
            went_back: Mutex::new(Vec::new()),
        }
    }

    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    pub fn reads(&self, from: Duration, to: Duration) -> Vec<Read> {
        let reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
        reads
            .iter()
            .filter(|r| r.at >= from && r.at < to)
            .copied()
            .collect()
    }

    /// Lags of the probe writes committed within the window.
    pub fn lags(&self, from: Duration, to: Duration) -> Vec<Duration> {
        let lags = self.lags.lock().unwrap_or_else(|e| e.into_inner());
        lags.iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, lag)| *lag)
            .collect()
    }

    pub fn went_back(&self, from: Duration, to: Duration) -> usize {
        let w = self.went_back.lock().unwrap_or_else(|e| e.into_inner());
        w.iter().filter(|at| **at >= from && **at < to).count()
    }
}

/// The load's knobs.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Offered product writes per second, over both sources.
    pub write_rate: u32,
    /// Screen reads per second, over both APIs.
    pub read_rate: u32,
    pub keys_per_source: usize,
    /// Bytes of padding in each widget (content is about this plus 40).
    pub pad: std::ops::Range<usize>,
}

/// The running load; writes can be paused (for a drain) and resumed, reads go on throughout.
pub struct Load {
    pub model: Arc<Model>,
    pub recorder: Arc<Recorder>,
    /// Events committed by the writers (and the probe).
    pub produced: Arc<AtomicU64>,
    /// Transactions whose commit failed or whose outcome is unknown.
    pub write_errors: Arc<AtomicU64>,
    run: Arc<AtomicBool>,
    /// Per writer: true while it is inside a transaction.
    busy: Vec<Arc<AtomicBool>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    /// Writer index per source, for stopping one source's writes.
    source_run: HashMap<String, Arc<AtomicBool>>,
}

impl Load {
    /// Starts writers for `sources` (name, product database pool) and readers for `apis`.
    pub fn start(spec: &LoadSpec, sources: Vec<(&'static str, PgPool)>, apis: Vec<String>) -> Load {
        let model = Arc::new(Model::default());
        let recorder = Arc::new(Recorder::new());
        let produced = Arc::new(AtomicU64::new(0));
        let write_errors = Arc::new(AtomicU64::new(0));
        let run = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let mut busy = Vec::new();
        let mut tasks = Vec::new();
        let mut source_run = HashMap::new();
        let per_source_rate = (spec.write_rate / sources.len().max(1) as u32).max(1);
        let mut probe_pool = None;
        for (source, pool) in sources {
            if source == "deals" {
                probe_pool = Some(pool.clone());
            }
            let mine = Arc::new(AtomicBool::new(true));
            source_run.insert(source.to_string(), mine.clone());
            let b = Arc::new(AtomicBool::new(false));
            busy.push(b.clone());
            let w = Writer {
                source,
                keys: source_keys(source, spec.keys_per_source),
                pool,
                rate: per_source_rate,
                pad: spec.pad.clone(),
                model: model.clone(),
                produced: produced.clone(),
                errors: write_errors.clone(),
                run: run.clone(),
                mine,
                busy: b,
                stop: stop.clone(),
            };
            tasks.push(tokio::spawn(w.run()));
        }
        let http = Http::new();
        let readers = 4;
        let per_reader = (spec.read_rate / readers).max(1);
        for r in 0..readers {
            tasks.push(tokio::spawn(read_loop(
                r as usize,
                apis.clone(),
                per_reader,
                http.clone(),
                recorder.clone(),
                stop.clone(),
            )));
        }
        if let (Some(pool), Some(api)) = (probe_pool, apis.first().cloned()) {
            let b = Arc::new(AtomicBool::new(false));
            busy.push(b.clone());
            tasks.push(tokio::spawn(probe_loop(Probe {
                pool,
                api,
                http,
                model: model.clone(),
                recorder: recorder.clone(),
                produced: produced.clone(),
                run: run.clone(),
                busy: b,
                stop: stop.clone(),
            })));
        }
        Load {
            model,
            recorder,
            produced,
            write_errors,
            run,
            busy,
            stop,
            tasks,
            source_run,
        }
    }

    /// Stops every write and waits until no transaction is open.
    pub async fn pause_writes(&self) {
        self.run.store(false, Ordering::SeqCst);
        let start = Instant::now();
        while self.busy.iter().any(|b| b.load(Ordering::SeqCst))
            && start.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn resume_writes(&self) {
        self.run.store(true, Ordering::SeqCst);
    }

    /// Stops (or restarts) the writes of one product service only.
    pub fn set_source_writing(&self, source: &str, on: bool) {
        if let Some(f) = self.source_run.get(source) {
            f.store(on, Ordering::SeqCst);
        }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

struct Writer {
    source: &'static str,
    keys: Vec<String>,
    pool: PgPool,
    rate: u32,
    pad: std::ops::Range<usize>,
    model: Arc<Model>,
    produced: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    run: Arc<AtomicBool>,
    mine: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    async fn run(self) {
        // About 200 transactions a second per source at most; larger rates batch more per
        // transaction, as a busy product service does.
        let per_tx = (self.rate / 200).clamp(1, 100) as usize;
        let period = Duration::from_secs_f64(per_tx as f64 / self.rate as f64);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut next: HashMap<usize, (i64, bool)> = HashMap::new();
        while !self.stop.load(Ordering::SeqCst) {
            tick.tick().await;
            if !self.run.load(Ordering::SeqCst) || !self.mine.load(Ordering::SeqCst) {
                continue;
            }
            self.busy.store(true, Ordering::SeqCst);
            let mut chosen = Vec::with_capacity(per_tx);
            let mut events = Vec::with_capacity(per_tx);
            {
                let mut rng = rand::rng();
                while chosen.len() < per_tx.min(self.keys.len()) {
                    let i = rng.random_range(0..self.keys.len());
                    if chosen.iter().any(|(c, _, _)| *c == i) {
                        continue;
                    }
                    let (last, deleted) = next.get(&i).copied().unwrap_or((0, true));
                    let version = last + 1;
                    let delete = !deleted && rng.random_bool(0.05);
                    let key = &self.keys[i];
                    events.push(if delete {
                        WidgetEvent::delete(key.clone(), "card", version)
                    } else {
                        let pad = "x".repeat(rng.random_range(self.pad.clone()));
                        WidgetEvent::upsert(
                            key.clone(),
                            "card",
                            version,
                            json!({"v": version, "source": self.source, "pad": pad}),
                        )
                    });
                    chosen.push((i, version, delete));
                }
            }
            let outcome = async {
                let mut tx = self.pool.begin().await.map_err(|_| false)?;
                Outbox::enqueue_all(&mut tx, &events)
                    .await
                    .map_err(|_| false)?;
                // Past this point the outcome of a failed call is unknown.
                tx.commit().await.map_err(|_| true)
            }
            .await;
            match outcome {
                Ok(()) => {
                    for (i, version, delete) in &chosen {
                        next.insert(*i, (*version, *delete));
                        self.model.record(&self.keys[*i], *version, *delete, true);
                    }
                    self.produced
                        .fetch_add(chosen.len() as u64, Ordering::Relaxed);
                }
                Err(unknown) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    for (i, version, delete) in &chosen {
                        // A version is never reused, whether or not the commit happened.
                        next.insert(*i, (*version, *delete));
                        if unknown {
                            self.model.record(&self.keys[*i], *version, *delete, false);
                        }
                    }
                }
            }
            self.busy.store(false, Ordering::SeqCst);
        }
    }
}

/// Reads the home screen as random users, alternating between the APIs.
async fn read_loop(
    n: usize,
    apis: Vec<String>,
    rate: u32,
    http: Http,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The highest version each API served per key, to see a cache going back in time.
    let mut seen: Vec<HashMap<String, i64>> = vec![HashMap::new(); apis.len()];
    let mut i = n;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        i += 1;
        let a = i % apis.len();
        let user = format!("u-{}", rand::rng().random_range(0..USERS));
        let start = Instant::now();
        let answer = http.get(&apis[a], "/v1/screens/home", Some(&user)).await;
        let took = start.elapsed();
        let status = answer.as_ref().map_or(0, |(s, _)| *s);
        let mut back = false;
        if let Some((200, body)) = &answer
            && let Ok(screen) = serde_json::from_slice::<serde_json::Value>(body)
        {
            for w in screen["widgets"].as_array().into_iter().flatten() {
                let (Some(key), Some(v)) = (w["key"].as_str(), w["version"].as_i64()) else {
                    continue;
                };
                let max = seen[a].entry(key.to_string()).or_insert(v);
                if v < *max {
                    back = true;
                } else {
                    *max = v;
                }
            }
        }
        let at = start.duration_since(recorder.t0);
        recorder
            .reads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Read { at, status, took });
        if back {
            recorder
                .went_back
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(at);
        }
    }
}

struct Probe {
    pool: PgPool,
    api: String,
    http: Http,
    model: Arc<Model>,
    recorder: Arc<Recorder>,
    produced: Arc<AtomicU64>,
    run: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

/// Every 100 ms commits the next version of [`PROBE_KEY`], then polls the API every 5 ms until
/// it serves it: commit to served, the lag a user sees.
async fn probe_loop(p: Probe) {
    let mut version = 0i64;
    let mut last_write = Instant::now() - Duration::from_secs(1);
    let mut outstanding: Vec<(i64, Instant)> = Vec::new();
    while !p.stop.load(Ordering::SeqCst) {
        if p.run.load(Ordering::SeqCst) && last_write.elapsed() >= Duration::from_millis(100) {
            last_write = Instant::now();
            p.busy.store(true, Ordering::SeqCst);
            let next = version + 1;
            let event = WidgetEvent::upsert(PROBE_KEY, "probe", next, json!({"v": next}));
            let outcome = async {
                let mut tx = p.pool.begin().await.map_err(|_| false)?;
                Outbox::enqueue_all(&mut tx, std::slice::from_ref(&event))
                    .await
                    .map_err(|_| false)?;
                tx.commit().await.map_err(|_| true)
            }
            .await;
            version = next;
            match outcome {
                Ok(()) => {
                    p.model.record(PROBE_KEY, next, false, true);
                    p.produced.fetch_add(1, Ordering::Relaxed);
                    outstanding.push((next, Instant::now()));
                }
                Err(true) => p.model.record(PROBE_KEY, next, false, false),
                Err(false) => {}
            }
            p.busy.store(false, Ordering::SeqCst);
        }
        if !outstanding.is_empty() {
            let path = format!("/v1/widgets?keys={PROBE_KEY}");
            if let Some((200, body)) = p.http.get(&p.api, &path, None).await
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
                && let Some(served) = v["widgets"][0]["version"].as_i64()
            {
                let now = Instant::now();
                let mut lags = p.recorder.lags.lock().unwrap_or_else(|e| e.into_inner());
                outstanding.retain(|(v, at)| {
                    if *v <= served {
                        lags.push((at.duration_since(p.recorder.t0), now.duration_since(*at)));
                        false
                    } else {
                        true
                    }
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `q` quantile (0..=1) of `values`; zero when empty.
pub fn quantile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    let idx = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[idx.min(values.len() - 1)]
}
