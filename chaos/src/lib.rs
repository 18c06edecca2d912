//! The failure table, proven end to end under load.
//!
//! [`chaos`] starts the real `widget-runtime` processes (two outbox-workers on two sources,
//! each with its own product database, two ingesters, two core-apis) against private Postgres
//! servers and an AOF Redis with an asynchronous replica, drives product writes and screen
//! reads, and injects one fault at a time ([`scenarios::ALL`]). After each it drains and checks
//! the invariant ([`check`]) and records the figures of [`Outcome`]. [`load_bench`] measures
//! fixed offered write rates; [`soak`] watches memory and connections over a long run.

pub mod check;
pub mod fleet;
pub mod http;
pub mod load;
pub mod report;
pub mod scenarios;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use fleet::{Fleet, SOURCES, cpu_and_rss, open_fds, pss};
use load::{Load, LoadSpec, quantile};

/// How the chaos suite runs.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// How long each fault lasts.
    pub fault: Duration,
    /// How long after recovery the ingress lag is measured.
    pub lag_window: Duration,
    pub load: LoadSpec,
    /// Scenario names to run, in the suite's order; all when empty.
    pub only: Vec<String>,
    /// The most a drain (replay, reclaim, re-warm) may take before the invariant must hold.
    pub drain_limit: Duration,
}

impl ChaosOptions {
    /// What `scripts/test.sh` runs: every scenario, short faults, a light load.
    pub fn short() -> Self {
        ChaosOptions {
            fault: Duration::from_secs(3),
            lag_window: Duration::from_secs(2),
            load: LoadSpec {
                write_rate: 300,
                read_rate: 100,
                keys_per_source: 300,
                pad: 100..600,
            },
            only: Vec::new(),
            drain_limit: Duration::from_secs(60),
        }
    }

    /// `scripts/chaos.sh`: longer faults, more keys, a heavier load.
    pub fn full() -> Self {
        ChaosOptions {
            fault: Duration::from_secs(10),
            lag_window: Duration::from_secs(5),
            load: LoadSpec {
                write_rate: 1500,
                read_rate: 300,
                keys_per_source: 2000,
                pad: 200..1000,
            },
            only: Vec::new(),
            drain_limit: Duration::from_secs(120),
        }
    }
}

/// The figures of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub scenario: String,
    pub fault: String,
    /// Events committed by the producers from the scenario's start to the end of its drain.
    pub produced: u64,
    pub applied: u64,
    /// Events the version guard absorbed: duplicates (re-deliveries, re-relays, replays) and
    /// versions superseded by a newer one already stored or in the same batch.
    pub duplicates: u64,
    pub reclaimed: u64,
    pub replayed: u64,
    pub dead_lettered: u64,
    pub lost: usize,
    pub stale: usize,
    /// Share of screen reads answered 2xx while the fault lasted.
    pub availability: f64,
    pub screen_reads: usize,
    pub screen_p99_ms: f64,
    /// Reads during the scenario that showed a widget older than the same API showed before.
    pub went_back: usize,
    /// Commit to served, for probe writes in the window after recovery.
    pub lag_p99_ms: f64,
    /// From the end of the fault until every component reported ready again.
    pub recovered_s: f64,
    /// From the end of writes until the invariant held.
    pub drain_s: f64,
    pub checks: Vec<scenarios::Check>,
    pub problems: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.stale == 0
            && self.problems.is_empty()
            && self.checks.iter().all(|c| c.ok)
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

async fn product_pools(fleet: &Fleet) -> Result<Vec<(&'static str, sqlx::PgPool)>> {
    let mut pools = Vec::new();
    for source in SOURCES {
        pools.push((source, fleet.pool(&fleet.product_urls[source]).await?));
    }
    Ok(pools)
}

/// Runs the chaos suite; one outcome per scenario.
pub async fn chaos(
    opts: &ChaosOptions,
    mut progress: impl FnMut(&Outcome),
) -> Result<Vec<Outcome>> {
    let names: Vec<&str> = scenarios::ALL
        .iter()
        .copied()
        .filter(|n| opts.only.is_empty() || opts.only.iter().any(|o| o == n))
        .collect();
    let with_replica = names.contains(&"redis-failover");
    let mut fleet = Fleet::start(&load::screen_keys(), true, with_replica).await?;
    let load = Load::start(&opts.load, product_pools(&fleet).await?, fleet.apis());
    // Some history before the first fault.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut outcomes = Vec::new();
    let mut injected = HashSet::new();
    for name in names {
        let outcome = run_scenario(name, opts, &mut fleet, &load, &mut injected).await;
        progress(&outcome);
        outcomes.push(outcome);
    }
    load.stop().await;
    Ok(outcomes)
}

async fn run_scenario(
    name: &str,
    opts: &ChaosOptions,
    fleet: &mut Fleet,
    load: &Load,
    injected: &mut HashSet<String>,
) -> Outcome {
    fleet.scrape_all().await;
    let before: Vec<f64> = fleet::COUNTERS.iter().map(|c| fleet.counter(c)).collect();
    let produced_before = load.produced.load(std::sync::atomic::Ordering::Relaxed);
    let started = load.recorder.now();
    let mut problems = Vec::new();
    let mut ctx = scenarios::Ctx {
        fleet,
        load,
        fault: opts.fault,
        checks: Vec::new(),
        injected,
        fault_window: None,
    };
    if let Err(e) = scenarios::run(name, &mut ctx).await {
        problems.push(format!("scenario failed: {e:#}"));
    }
    let scenarios::Ctx {
        fleet,
        mut checks,
        injected,
        fault_window,
        ..
    } = ctx;
    let (fault_from, fault_to) = fault_window.unwrap_or((started, load.recorder.now()));
    // Recovery: every component ready again by itself (nothing here restarts it).
    let since_fault = load.recorder.now() - fault_to;
    let recovery = fleet.recovery(Duration::from_secs(30)).await;
    let slowest = recovery
        .iter()
        .max_by_key(|(_, t)| t.unwrap_or(Duration::MAX))
        .cloned();
    let recovered_in = slowest
        .as_ref()
        .and_then(|(_, t)| *t)
        .map(|t| t + since_fault);
    checks.push(scenarios::Check {
        what: "every component ready again".into(),
        ok: recovery.iter().all(|(_, t)| t.is_some()),
        detail: match (&slowest, recovered_in) {
            (Some((name, _)), Some(t)) => format!(
                "{} ms after the fault (last: {name}; {})",
                ms(t),
                recovery
                    .iter()
                    .map(|(n, t)| format!("{n} {} ms", t.map_or(f64::NAN, ms)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => format!(
                "not ready after 30 s: {}",
                recovery
                    .iter()
                    .filter(|(_, t)| t.is_none())
                    .map(|(n, _)| format!("{n}:\n{}", fleet.get(n).log_tail(10)))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        },
    });
    let lag_from = load.recorder.now();
    tokio::time::sleep(opts.lag_window).await;
    let lag_to = load.recorder.now();
    load.pause_writes().await;
    let drain_started = Instant::now();
    let (verdict, _) =
        check::drain_and_check(fleet, &load.model.snapshot(), injected, opts.drain_limit).await;
    let drain = drain_started.elapsed();
    if !verdict.holds() {
        problems.push(format!(
            "invariant after {:.1} s: {} lost, {} stale, {} unconfirmed rows, {} pending, {} unread, {} unexpected dead letters; {}",
            drain.as_secs_f64(),
            verdict.lost,
            verdict.stale,
            verdict.unconfirmed_rows,
            verdict.pending,
            verdict.unread,
            verdict.unexpected_dead_letters,
            verdict.examples.join("; ")
        ));
    }
    load.resume_writes();
    fleet.scrape_all().await;
    let delta = |i: usize| (fleet.counter(fleet::COUNTERS[i]) - before[i]).max(0.0) as u64;
    let reads = load.recorder.reads(fault_from, fault_to);
    let ok = reads
        .iter()
        .filter(|r| (200..300).contains(&r.status))
        .count();
    let mut took: Vec<Duration> = reads.iter().map(|r| r.took).collect();
    let mut lags = load.recorder.lags(lag_from, lag_to);
    Outcome {
        scenario: name.to_string(),
        fault: scenarios::describe(name).to_string(),
        produced: load.produced.load(std::sync::atomic::Ordering::Relaxed) - produced_before,
        applied: delta(0),
        duplicates: delta(1),
        reclaimed: delta(2),
        replayed: delta(6),
        dead_lettered: delta(3) + delta(7),
        lost: verdict.lost,
        stale: verdict.stale,
        availability: if reads.is_empty() {
            1.0
        } else {
            ok as f64 / reads.len() as f64
        },
        screen_reads: reads.len(),
        screen_p99_ms: ms(quantile(&mut took, 0.99)),
        went_back: load.recorder.went_back(started, load.recorder.now()),
        lag_p99_ms: if lags.is_empty() {
            problems.push("no probe write was served after recovery".into());
            0.0
        } else {
            ms(quantile(&mut lags, 0.99))
        },
        recovered_s: recovered_in.map_or(f64::NAN, |t| (t.as_secs_f64() * 10.0).round() / 10.0),
        drain_s: (drain.as_secs_f64() * 10.0).round() / 10.0,
        checks,
        problems,
    }
}

/// One row of the load benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct LoadRow {
    pub offered: u32,
    pub produced_per_s: f64,
    pub applied_per_s: f64,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub lag_samples: usize,
    pub screen_reads_per_s: f64,
    pub screen_p99_ms: f64,
    pub availability: f64,
    /// Per process: (name, CPU share of one core, memory (PSS) MiB at the end).
    pub processes: Vec<(String, f64, f64)>,
    /// After the run and a drain.
    pub invariant_holds: bool,
    pub lost: usize,
    pub stale: usize,
}

/// The load of the benchmark and the soak: `rate` writes/s over 10,000 keys, 200 reads/s.
fn steady(rate: u32) -> LoadSpec {
    LoadSpec {
        write_rate: rate,
        read_rate: 200,
        keys_per_source: 5000,
        pad: 200..1000,
    }
}

/// Processes to watch: the components and the stores.
fn watched(fleet: &Fleet) -> Vec<(String, Vec<u32>)> {
    let mut out: Vec<(String, Vec<u32>)> = fleet
        .components
        .iter()
        .filter_map(|c| Some((c.name.clone(), vec![c.pid()?])))
        .collect();
    if let Some(p) = fleet.redis.pid() {
        out.push(("redis".into(), vec![p]));
    }
    out.push(("postgres-core".into(), fleet.core_pg.pids()));
    out.push(("postgres-product".into(), fleet.product_pg.pids()));
    out
}

/// CPU seconds and memory (PSS) of a group of processes.
fn usage(pids: &[u32]) -> (f64, u64) {
    pids.iter()
        .filter_map(|p| Some((cpu_and_rss(*p)?.0, pss(*p)?)))
        .fold((0.0, 0), |(c, r), (c2, r2)| (c + c2, r + r2))
}

/// Fixed offered write rates, each for `secs` on a fleet of its own (no proxies), with screen
/// reads alongside; each row ends with a drain and the invariant check.
pub async fn load_bench(
    rates: &[u32],
    secs: u64,
    mut progress: impl FnMut(&LoadRow),
) -> Result<Vec<LoadRow>> {
    let mut rows = Vec::new();
    for &rate in rates {
        let fleet = Fleet::start(&load::screen_keys(), false, false).await?;
        let load = Load::start(&steady(rate), product_pools(&fleet).await?, fleet.apis());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut fleet = fleet;
        fleet.scrape_all().await;
        let applied0 = fleet.counter("widget_ingest_applied_total")
            + fleet.counter("widget_ingest_stale_total");
        let produced0 = load.produced.load(std::sync::atomic::Ordering::Relaxed);
        let procs = watched(&fleet);
        let cpu0: Vec<f64> = procs.iter().map(|(_, p)| usage(p).0).collect();
        let from = load.recorder.now();
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let wall = t.elapsed().as_secs_f64();
        let to = load.recorder.now();
        fleet.scrape_all().await;
        let applied = fleet.counter("widget_ingest_applied_total")
            + fleet.counter("widget_ingest_stale_total")
            - applied0;
        let produced = load.produced.load(std::sync::atomic::Ordering::Relaxed) - produced0;
        let processes = procs
            .iter()
            .zip(cpu0)
            .map(|((name, pids), c0)| {
                let (c1, rss) = usage(pids);
                (
                    name.clone(),
                    ((c1 - c0) / wall * 100.0).round() / 100.0,
                    (rss as f64 / 1048576.0 * 10.0).round() / 10.0,
                )
            })
            .collect();
        let reads = load.recorder.reads(from, to);
        let ok = reads.iter().filter(|r| r.status == 200).count();
        let mut took: Vec<Duration> = reads.iter().map(|r| r.took).collect();
        let mut lags = load.recorder.lags(from, to);
        load.pause_writes().await;
        let (verdict, _) = check::drain_and_check(
            &fleet,
            &load.model.snapshot(),
            &HashSet::new(),
            Duration::from_secs(120),
        )
        .await;
        load.stop().await;
        let row = LoadRow {
            offered: rate,
            produced_per_s: (produced as f64 / wall).round(),
            applied_per_s: (applied / wall).round(),
            lag_p50_ms: ms(quantile(&mut lags, 0.5)),
            lag_p99_ms: ms(quantile(&mut lags, 0.99)),
            lag_max_ms: ms(lags.iter().max().copied().unwrap_or_default()),
            lag_samples: lags.len(),
            screen_reads_per_s: (reads.len() as f64 / wall).round(),
            screen_p99_ms: ms(quantile(&mut took, 0.99)),
            availability: if reads.is_empty() {
                0.0
            } else {
                ok as f64 / reads.len() as f64
            },
            processes,
            invariant_holds: verdict.holds(),
            lost: verdict.lost,
            stale: verdict.stale,
        };
        progress(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// One sample of the soak.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SoakSample {
    pub at_s: u64,
    /// Per process: (name, memory (PSS) MiB, open fds, sockets).
    pub processes: Vec<(String, f64, usize, usize)>,
}

/// A long run at a steady load, sampling memory and connections of every process.
pub async fn soak(
    duration: Duration,
    rate: u32,
    every: Duration,
    mut progress: impl FnMut(&SoakSample),
) -> Result<(Vec<SoakSample>, check::Verdict)> {
    let fleet = Fleet::start(&load::screen_keys(), false, false).await?;
    let load = Load::start(&steady(rate), product_pools(&fleet).await?, fleet.apis());
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < duration {
        tokio::time::sleep(every.min(duration.saturating_sub(start.elapsed()))).await;
        let processes = watched(&fleet)
            .into_iter()
            .map(|(name, pids)| {
                let rss = usage(&pids).1;
                let (fds, sockets) = pids
                    .iter()
                    .filter_map(|p| open_fds(*p))
                    .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
                (
                    name,
                    (rss as f64 / 1048576.0 * 10.0).round() / 10.0,
                    fds,
                    sockets,
                )
            })
            .collect();
        let sample = SoakSample {
            at_s: start.elapsed().as_secs(),
            processes,
        };
        progress(&sample);
        samples.push(sample);
    }
    load.pause_writes().await;
    let verdict = check::drain_and_check(
        &fleet,
        &load.model.snapshot(),
        &HashSet::new(),
        Duration::from_secs(120),
    )
    .await
    .0;
    load.stop().await;
    Ok((samples, verdict))
}
