//! The faults, one at a time while the load runs. Each injects its fault, undoes it (restarts,
//! resumes, restores) and records what it expects to have seen as checks; the runner then
//! measures recovery, drains and checks the invariant.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use redis::AsyncCommands;
use sqlx::Connection;
use widget_runtime::stream::StreamEvent;

use crate::check::BAD_MARK;
use crate::fleet::Fleet;
use crate::load::Load;

/// What a scenario saw that the invariant alone does not show.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

pub struct Ctx<'a> {
    pub fleet: &'a mut Fleet,
    pub load: &'a Load,
    /// How long each fault lasts.
    pub fault: Duration,
    pub checks: Vec<Check>,
    /// Stream ids of bad entries written straight into the stream (kept for the whole suite:
    /// their dead letters stay in the stream).
    pub injected: &'a mut HashSet<String>,
    /// When the fault began and ended (for availability and latency "during the fault").
    pub fault_window: Option<(Duration, Duration)>,
}

impl Ctx<'_> {
    fn check(&mut self, what: &str, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            what: what.into(),
            ok,
            detail: detail.into(),
        });
    }

    fn begin_fault(&mut self) {
        let now = self.load.recorder.now();
        self.fault_window = Some((now, now));
    }

    fn end_fault(&mut self) {
        let now = self.load.recorder.now();
        if let Some((from, _)) = self.fault_window {
            self.fault_window = Some((from, now));
        }
    }
}

/// Every scenario, in the order the suite runs them (the failover last: afterwards the
/// replica is the primary and there is no replica left).
pub const ALL: [&str; 14] = [
    "product-stop",
    "redis-restart",
    "redis-restart-empty",
    "ingester-kill",
    "ingester-pause",
    "core-db-stop",
    "core-db-slow",
    "core-db-hang",
    "worker-kill-before-commit",
    "bad-events",
    "net-latency",
    "net-drop",
    "net-blackhole",
    "redis-failover",
];

pub fn describe(name: &str) -> &'static str {
    match name {
        "product-stop" => "a product service stops writing",
        "redis-restart" => "Redis stopped, restarted with its data",
        "redis-restart-empty" => "Redis SIGKILLed, restarted empty",
        "ingester-kill" => "an ingester SIGKILLed mid-batch, restarted later",
        "ingester-pause" => "an ingester SIGSTOPped past minIdle",
        "core-db-stop" => "the core DB stopped, then restarted",
        "core-db-slow" => "the core DB slow (widgets table locked)",
        "core-db-hang" => "the core DB hung (SIGSTOP); an ingester SIGTERMed meanwhile",
        "worker-kill-before-commit" => "an outbox-worker SIGKILLed between XADD and commit",
        "bad-events" => "malformed, foreign and oversized events (outbox and stream)",
        "net-latency" => "25 ms added on every store link",
        "net-drop" => "every store connection cut, three times",
        "net-blackhole" => "an ingester's and an API's links blackholed",
        "redis-failover" => "failover to an async replica that missed writes",
        _ => "",
    }
}

pub async fn run(name: &str, ctx: &mut Ctx<'_>) -> Result<()> {
    match name {
        "product-stop" => product_stop(ctx).await,
        "redis-restart" => redis_restart(ctx, false).await,
        "redis-restart-empty" => redis_restart(ctx, true).await,
        "ingester-kill" => ingester_kill(ctx).await,
        "ingester-pause" => ingester_pause(ctx).await,
        "core-db-stop" => core_db_stop(ctx).await,
        "core-db-slow" => core_db_slow(ctx).await,
        "core-db-hang" => core_db_hang(ctx).await,
        "worker-kill-before-commit" => worker_kill(ctx).await,
        "bad-events" => bad_events(ctx).await,
        "net-latency" => net_latency(ctx).await,
        "net-drop" => net_drop(ctx).await,
        "net-blackhole" => net_blackhole(ctx).await,
        "redis-failover" => redis_failover(ctx).await,
        other => Err(anyhow!("no scenario {other}")),
    }
}

/// Time for a component to notice a store stopped answering: the config's 2 s statement
/// timeout or 1 s Redis response timeout plus a read block, with slack for a loaded machine.
const NOTICE: Duration = Duration::from_secs(2 + 4);

async fn product_stop(ctx: &mut Ctx<'_>) -> Result<()> {
    ctx.begin_fault();
    ctx.load.set_source_writing("deals", false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let expected = ctx.load.model.snapshot();
    let mut wrong = Vec::new();
    for api in ctx.fleet.apis() {
        let answer = ctx
            .fleet
            .http
            .get(&api, "/v1/screens/home", Some("u-0"))
            .await;
        let Some((200, body)) = answer else {
            wrong.push(format!("{api}: no 200"));
            continue;
        };
        let screen: serde_json::Value = serde_json::from_slice(&body)?;
        for w in screen["widgets"].as_array().into_iter().flatten() {
            let (Some(key), Some(v)) = (w["key"].as_str(), w["version"].as_i64()) else {
                continue;
            };
            if key.starts_with("deals.") && expected.get(key).map(|e| e.version) != Some(v) {
                wrong.push(format!("{api} {key} v{v}"));
            }
        }
    }
    tokio::time::sleep(ctx.fault.saturating_sub(Duration::from_secs(1))).await;
    ctx.load.set_source_writing("deals", true);
    ctx.end_fault();
    ctx.check(
        "screens serve the stopped source's last state",
        wrong.is_empty(),
        if wrong.is_empty() {
            "every deals widget at its last version".to_string()
        } else {
            wrong.join(", ")
        },
    );
    Ok(())
}

async fn redis_restart(ctx: &mut Ctx<'_>, empty: bool) -> Result<()> {
    let loss_before = ctx.fleet.counter("widget_ingest_redis_loss_detected_total")
        + ctx.fleet.counter("widget_outbox_redis_loss_detected_total");
    // The loss must catch relayed rows not yet confirmed (the ones a replay must send again):
    // writes have just resumed after the previous scenario's drain, so wait for some.
    let awaiting = if empty {
        relayed_unconfirmed(ctx.fleet, Duration::from_secs(5)).await?
    } else {
        0
    };
    ctx.begin_fault();
    if empty {
        ctx.fleet.redis.kill().await;
        ctx.fleet.redis.wipe();
        ctx.check(
            "killed while relayed rows awaited confirmation",
            awaiting > 0,
            format!("{awaiting} rows relayed, unconfirmed"),
        );
    } else {
        ctx.fleet.redis.stop().await;
    }
    tokio::time::sleep(ctx.fault).await;
    ctx.fleet.redis.start_again().await?;
    ctx.end_fault();
    if empty {
        // Detected as soon as a component reaches Redis again; polled, so the wait overlaps
        // the recovery the runner measures next.
        let start = Instant::now();
        let mut loss = 0.0;
        while loss == 0.0 && start.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            ctx.fleet.scrape_all().await;
            loss = ctx.fleet.counter("widget_ingest_redis_loss_detected_total")
                + ctx.fleet.counter("widget_outbox_redis_loss_detected_total")
                - loss_before;
        }
        ctx.check(
            "the data loss is detected",
            loss > 0.0,
            format!("{loss} detections"),
        );
    }
    Ok(())
}

/// Relayed rows still kept for confirmation in the product outboxes, polled for up to `limit`
/// until there are some.
async fn relayed_unconfirmed(fleet: &Fleet, limit: Duration) -> Result<i64> {
    let start = Instant::now();
    loop {
        let mut n = 0;
        for url in fleet.product_urls.values() {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            let count: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM widget_outbox WHERE published_at IS NOT NULL",
            )
            .fetch_one(&mut conn)
            .await?;
            conn.close().await?;
            n += count;
        }
        if n > 0 || start.elapsed() >= limit {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many entries `consumer` holds pending.
async fn pending_of(fleet: &Fleet, consumer: &str) -> Result<i64> {
    let mut conn = fleet.redis_conn().await?;
    let reply: redis::streams::StreamPendingCountReply = conn
        .xpending_consumer_count(
            fleet.config.stream_name(),
            &fleet.config.stream.consumer_group,
            "-",
            "+",
            10000,
            consumer,
        )
        .await
        .context("XPENDING")?;
    Ok(reply.ids.len() as i64)
}

/// Holds writes to `widgets` back (`LOCK TABLE ... IN SHARE MODE`: reads go on) until
/// `consumer` has read entries it cannot apply yet, runs `act` on it, and releases the lock: a
/// kill or pause then lands mid-batch for certain, with its entries pending.
async fn mid_batch(ctx: &mut Ctx<'_>, consumer: &str, kill: bool) -> Result<i64> {
    let mut conn = sqlx::PgConnection::connect(&ctx.fleet.core_url).await?;
    let mut tx = conn.begin().await?;
    sqlx::query("LOCK TABLE widgets IN SHARE MODE")
        .execute(&mut *tx)
        .await?;
    let start = Instant::now();
    while pending_of(ctx.fleet, consumer).await? == 0 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ctx.begin_fault();
    let c = ctx.fleet.get_mut(consumer);
    if kill {
        c.kill_now().await;
    } else {
        c.pause_now();
    }
    let held = pending_of(ctx.fleet, consumer).await?;
    tx.commit().await?;
    conn.close().await?;
    Ok(held)
}

async fn ingester_kill(ctx: &mut Ctx<'_>) -> Result<()> {
    ctx.fleet.scrape_all().await;
    let reclaimed_before = ctx.fleet.counter("widget_ingest_reclaimed_total");
    let held = mid_batch(ctx, "ingester-1", true).await?;
    ctx.check(
        "killed holding pending entries",
        held > 0,
        format!("{held} pending"),
    );
    // Longer than minIdle (2 s) plus a reclaim interval: the other replica takes them.
    tokio::time::sleep(ctx.fault.max(Duration::from_secs(4))).await;
    ctx.fleet.scrape_all().await;
    let reclaimed = ctx.fleet.counter("widget_ingest_reclaimed_total") - reclaimed_before;
    ctx.check(
        "the other ingester reclaims them",
        reclaimed > 0.0,
        format!("{reclaimed} reclaimed"),
    );
    ctx.fleet.restart("ingester-1")?;
    ctx.end_fault();
    Ok(())
}

async fn ingester_pause(ctx: &mut Ctx<'_>) -> Result<()> {
    ctx.fleet.scrape_all().await;
    let reclaimed_before = ctx.fleet.counter("widget_ingest_reclaimed_total");
    let held = mid_batch(ctx, "ingester-2", false).await?;
    tokio::time::sleep(ctx.fault.max(Duration::from_secs(4))).await;
    ctx.fleet.scrape_all().await;
    let reclaimed = ctx.fleet.counter("widget_ingest_reclaimed_total") - reclaimed_before;
    ctx.fleet.get_mut("ingester-2").resume();
    ctx.end_fault();
    ctx.check(
        "paused past minIdle, the other replica reclaims its entries",
        held > 0 && reclaimed > 0.0,
        format!("{held} pending when paused, {reclaimed} reclaimed"),
    );
    Ok(())
}

/// Both ingesters report not-ready within [`NOTICE`].
async fn ingesters_not_ready(ctx: &mut Ctx<'_>, why: &str) {
    let mut detail = Vec::new();
    let mut ok = true;
    for name in ["ingester-1", "ingester-2"] {
        let c = ctx.fleet.get(name);
        if !c.is_running() {
            continue;
        }
        match c.becomes(&ctx.fleet.http, false, NOTICE).await {
            Some(t) => detail.push(format!("{name} {} ms", t.as_millis())),
            None => {
                ok = false;
                detail.push(format!("{name} still ready after {NOTICE:?}"));
            }
        }
    }
    ctx.check(why, ok, detail.join(", "));
}

async fn core_db_stop(ctx: &mut Ctx<'_>) -> Result<()> {
    ctx.begin_fault();
    ctx.fleet.core_pg.stop().await;
    ingesters_not_ready(ctx, "ingesters report not-ready").await;
    tokio::time::sleep(ctx.fault.saturating_sub(NOTICE)).await;
    ctx.fleet.core_pg.start_again().await?;
    ctx.end_fault();
    Ok(())
}

async fn core_db_slow(ctx: &mut Ctx<'_>) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(&ctx.fleet.core_url).await?;
    ctx.begin_fault();
    let mut tx = conn.begin().await?;
    sqlx::query("LOCK TABLE widgets IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    tokio::time::sleep(ctx.fault).await;
    tx.commit().await?;
    ctx.end_fault();
    conn.close().await?;
    Ok(())
}

async fn core_db_hang(ctx: &mut Ctx<'_>) -> Result<()> {
    ctx.begin_fault();
    ctx.fleet.core_pg.pause();
    let started = Instant::now();
    ingesters_not_ready(ctx, "ingesters report not-ready while the DB hangs").await;
    let api_ready = ctx.fleet.get("api-1").ready(&ctx.fleet.http).await;
    ctx.check(
        "core-api stays ready on the cache",
        api_ready,
        if api_ready { "ready" } else { "not ready" },
    );
    let http = ctx.fleet.http.clone();
    let stop = ctx
        .fleet
        .get_mut("ingester-2")
        .terminate(&http, Duration::from_secs(10))
        .await;
    ctx.check(
        "an ingester stops on SIGTERM while the DB hangs",
        stop.is_ok(),
        match &stop {
            Ok(t) => format!("exited in {} ms", t.as_millis()),
            Err(e) => e.to_string(),
        },
    );
    tokio::time::sleep(ctx.fault.saturating_sub(started.elapsed())).await;
    ctx.fleet.core_pg.resume();
    ctx.fleet.restart("ingester-2")?;
    ctx.end_fault();
    Ok(())
}

/// The worker's publish UPDATE (after its XADD, before its commit) waits on an advisory lock
/// the suite holds, through a statement trigger added for this scenario only; the worker is
/// killed while it waits.
async fn worker_kill(ctx: &mut Ctx<'_>) -> Result<()> {
    let url = ctx.fleet.product_urls["deals"].clone();
    let mut holder = sqlx::PgConnection::connect(&url).await?;
    sqlx::query("SELECT pg_advisory_lock(424242)")
        .execute(&mut holder)
        .await?;
    sqlx::raw_sql(
        "CREATE OR REPLACE FUNCTION chaos_hold_publish() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_advisory_xact_lock_shared(424242); RETURN NULL; END $$;
         CREATE TRIGGER chaos_hold_publish BEFORE UPDATE ON widget_outbox
           FOR EACH STATEMENT EXECUTE FUNCTION chaos_hold_publish();",
    )
    .execute(&mut holder)
    .await?;
    ctx.begin_fault();
    let start = Instant::now();
    let mut caught = false;
    while start.elapsed() < Duration::from_secs(10) {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE wait_event = 'advisory' AND query LIKE '%SET published_at = clock_timestamp()%'",
        )
        .fetch_one(&mut holder)
        .await?;
        if n > 0 {
            caught = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let http = ctx.fleet.http.clone();
    ctx.fleet.get_mut("worker-deals").kill(&http).await;
    sqlx::raw_sql(
        "DROP TRIGGER chaos_hold_publish ON widget_outbox; SELECT pg_advisory_unlock(424242)",
    )
    .execute(&mut holder)
    .await?;
    holder.close().await?;
    ctx.check(
        "killed after its XADD, before its commit",
        caught,
        if caught {
            "the publish UPDATE was waiting when killed"
        } else {
            "the publish UPDATE was never seen waiting"
        },
    );
    tokio::time::sleep(ctx.fault / 2).await;
    ctx.fleet.restart("worker-deals")?;
    ctx.end_fault();
    Ok(())
}

async fn bad_events(ctx: &mut Ctx<'_>) -> Result<()> {
    const EACH: usize = 20;
    ctx.begin_fault();
    let dead_before = dead_letter_count(ctx.fleet).await?;
    // Through the outbox, as a producer in another language that skipped the checks would.
    let pool = ctx.fleet.pool(&ctx.fleet.product_urls["deals"]).await?;
    let big =
        serde_json::json!({"pad": "x".repeat(widget_runtime::event::MAX_CONTENT_BYTES + 100)});
    for n in 0..EACH {
        sqlx::query(
            "INSERT INTO widget_outbox (widget_key, widget_type, data_version, op, content)
             VALUES ($1, 'card', 1, 'upsert', '{\"x\": 1}'),
                    ($2, 'card', 1, 'upsert', $3),
                    ($4, 'card', 1, 'upsert', '{\"x\": 1}')",
        )
        .bind(format!("loyalty.{BAD_MARK}-foreign-{n}"))
        .bind(format!("deals.{BAD_MARK}-big-{n}"))
        .bind(&big)
        .bind(format!("deals.{BAD_MARK} not a key!-{n}"))
        .execute(&pool)
        .await?;
    }
    pool.close().await;
    // Straight into the stream, around the worker.
    let mut conn = ctx.fleet.redis_conn().await?;
    let stream = ctx.fleet.config.stream_name();
    for n in 0..EACH {
        let good = StreamEvent {
            event_id: format!("deals:{n}:1"),
            source: "deals".into(),
            widget_key: format!("deals.{BAD_MARK}-stream-{n}"),
            widget_type: "card".into(),
            data_version: 1,
            op: widget_runtime::event::Op::Upsert,
            content: Some(b"{\"x\":1}".to_vec()),
            produced_at_us: 0,
        };
        let mut entries: Vec<Vec<(String, Vec<u8>)>> = Vec::new();
        entries.push(vec![("garbage".into(), b"1".to_vec())]);
        let fields = |e: &StreamEvent| -> Vec<(String, Vec<u8>)> {
            e.to_fields()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect()
        };
        let mut bad_version = fields(&good);
        for (k, v) in &mut bad_version {
            if k == "data_version" {
                *v = b"not-a-number".to_vec();
            }
        }
        entries.push(bad_version);
        let mut not_json = fields(&good);
        for (k, v) in &mut not_json {
            if k == "content" {
                *v = b"{not json".to_vec();
            }
        }
        entries.push(not_json);
        let mut foreign = good.clone();
        foreign.widget_key = format!("loyalty.{BAD_MARK}-stream-foreign-{n}");
        entries.push(fields(&foreign));
        for e in entries {
            let id: String = conn.xadd(&stream, "*", &e).await.context("XADD")?;
            ctx.injected.insert(id);
        }
    }
    let expected = (3 + 4) * EACH;
    // Dead-lettering is immediate for these reasons; wait for all of them.
    let start = Instant::now();
    let mut dead = 0;
    while start.elapsed() < Duration::from_secs(20) {
        dead = dead_letter_count(ctx.fleet).await? - dead_before;
        if dead >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctx.end_fault();
    ctx.check(
        "every bad event is dead-lettered",
        dead == expected,
        format!("{dead} of {expected}"),
    );
    Ok(())
}

/// Dead letters in the stream plus rows moved aside by the workers.
async fn dead_letter_count(fleet: &Fleet) -> Result<usize> {
    let mut conn = fleet.redis_conn().await?;
    let n: usize = conn.xlen(fleet.config.dead_letter_stream()).await?;
    let mut aside = 0;
    for source in crate::fleet::SOURCES {
        let pool = fleet.pool(&fleet.product_urls[source]).await?;
        let m: i64 = sqlx::query_scalar("SELECT count(*) FROM widget_outbox_dead")
            .fetch_one(&pool)
            .await?;
        aside += m as usize;
        pool.close().await;
    }
    Ok(n + aside)
}

fn need_proxies(ctx: &Ctx<'_>) -> Result<()> {
    if ctx.fleet.links().next().is_none() {
        return Err(anyhow!(
            "this scenario needs the fleet started with proxies"
        ));
    }
    Ok(())
}

async fn net_latency(ctx: &mut Ctx<'_>) -> Result<()> {
    need_proxies(ctx)?;
    ctx.begin_fault();
    for l in ctx.fleet.links() {
        l.set_latency(Duration::from_millis(25));
    }
    tokio::time::sleep(ctx.fault).await;
    for l in ctx.fleet.links() {
        l.set_latency(Duration::ZERO);
    }
    ctx.end_fault();
    Ok(())
}

async fn net_drop(ctx: &mut Ctx<'_>) -> Result<()> {
    need_proxies(ctx)?;
    ctx.begin_fault();
    for _ in 0..3 {
        for l in ctx.fleet.links() {
            l.close_connections();
        }
        tokio::time::sleep(ctx.fault / 3).await;
    }
    ctx.end_fault();
    Ok(())
}

async fn net_blackhole(ctx: &mut Ctx<'_>) -> Result<()> {
    need_proxies(ctx)?;
    ctx.begin_fault();
    let ingester = ctx.fleet.get("ingester-1");
    let api = ctx.fleet.get("api-1");
    for l in ingester
        .redis_link
        .proxy
        .iter()
        .chain(ingester.db_link.proxy.iter())
    {
        l.blackhole();
    }
    if let Some(l) = &api.redis_link.proxy {
        l.blackhole();
    }
    let started = Instant::now();
    let noticed = ctx
        .fleet
        .get("ingester-1")
        .becomes(&ctx.fleet.http, false, NOTICE)
        .await;
    ctx.check(
        "the cut-off ingester reports not-ready",
        noticed.is_some(),
        noticed.map_or("still ready".to_string(), |t| {
            format!("{} ms", t.as_millis())
        }),
    );
    tokio::time::sleep(
        ctx.fault
            .max(Duration::from_secs(4))
            .saturating_sub(started.elapsed()),
    )
    .await;
    for l in ctx.fleet.links() {
        l.restore();
    }
    ctx.end_fault();
    Ok(())
}

async fn redis_failover(ctx: &mut Ctx<'_>) -> Result<()> {
    need_proxies(ctx)?;
    let Some(mut replica) = ctx.fleet.replica.take() else {
        return Err(anyhow!(
            "the failover scenario needs the fleet started with a replica"
        ));
    };
    replica.wait_in_sync(Duration::from_secs(30)).await?;
    let stream = ctx.fleet.config.stream_name();
    ctx.begin_fault();
    // The replica stops taking the primary's writes while the load goes on.
    replica.pause();
    ctx.fleet.redis.disconnect_replicas().await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let primary_last = last_id(&mut ctx.fleet.redis_conn().await?, &stream).await?;
    ctx.fleet.redis.kill().await;
    replica.resume();
    replica.promote().await?;
    let replica_last = last_id(&mut replica.connection().await?, &stream).await?;
    for l in ctx.fleet.redis_links() {
        l.set_target(replica.port());
    }
    let _old = std::mem::replace(&mut ctx.fleet.redis, replica);
    ctx.check(
        "the promoted replica had missed the last writes",
        replica_last < primary_last,
        format!("primary's last entry {primary_last:?}, replica's {replica_last:?}"),
    );
    tokio::time::sleep(ctx.fault).await;
    ctx.end_fault();
    Ok(())
}

/// The stream's last entry id as (ms, seq).
async fn last_id(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Result<(u64, u64)> {
    let reply: redis::streams::StreamRangeReply = conn.xrevrange_count(stream, "+", "-", 1).await?;
    let id = reply.ids.first().map(|e| e.id.clone()).unwrap_or_default();
    let (ms, seq) = id.split_once('-').unwrap_or(("0", "0"));
    Ok((ms.parse().unwrap_or(0), seq.parse().unwrap_or(0)))
}
