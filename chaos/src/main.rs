//! `widget-chaos`: the chaos suite, the load benchmark and the soak (see `scripts/chaos.sh`).

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;

use widget_chaos::{ChaosOptions, report};

#[derive(Parser)]
#[command(about = "Faults under load against the real widget-runtime processes, with figures")]
struct Args {
    /// The short mode CI runs (3 s faults, light load) instead of the full suite.
    #[arg(long)]
    short: bool,
    /// Only these scenarios (comma-separated names; see --list).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Also write the figures as JSON to this file (`-` for stdout, after the tables).
    #[arg(long)]
    json: Option<String>,
    /// Run the load benchmark instead: fixed offered write rates (events/s, comma-separated).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_missing_value = "1000,5000,10000")]
    load: Option<Vec<u32>>,
    /// Seconds per load-benchmark rate.
    #[arg(long, default_value_t = 60)]
    load_secs: u64,
    /// Run the soak instead, for this long (`30m`).
    #[arg(long, num_args = 0..=1, default_missing_value = "30m", value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// Print the soak table of a `--soak --json` file again (e.g. after changing the rule).
    #[arg(long)]
    soak_report: Option<String>,
    /// Offered write rate of the soak (events/s).
    #[arg(long, default_value_t = 1000)]
    soak_rate: u32,
}

fn write_json(path: &str, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    if path == "-" {
        println!("{text}");
    } else {
        std::fs::write(path, text)?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.list {
        for name in widget_chaos::scenarios::ALL {
            println!("{name:28} {}", widget_chaos::scenarios::describe(name));
        }
        return Ok(());
    }
    if let Some(path) = &args.soak_report {
        let samples: Vec<widget_chaos::SoakSample> =
            serde_json::from_str(&std::fs::read_to_string(path)?)?;
        let growth = report::soak_growth(&samples);
        println!("{}", report::soak_table(&growth));
        if growth.iter().any(|g| !g.steady()) {
            bail!("memory or connections grew during the soak");
        }
        return Ok(());
    }
    if let Some(rates) = &args.load {
        let rows = widget_chaos::load_bench(rates, args.load_secs, |r| {
            eprintln!(
                "{}/s offered: {}/s ingested, lag p99 {} ms",
                r.offered, r.applied_per_s, r.lag_p99_ms
            )
        })
        .await?;
        println!("{}", report::load_table(&rows));
        if let Some(path) = &args.json {
            write_json(path, &rows)?;
        }
        if rows.iter().any(|r| !r.invariant_holds) {
            bail!("the invariant did not hold after a load run");
        }
        return Ok(());
    }
    if let Some(duration) = args.soak {
        let every = (duration / 30).clamp(Duration::from_secs(5), Duration::from_secs(60));
        let (samples, verdict) = widget_chaos::soak(duration, args.soak_rate, every, |s| {
            let each: Vec<String> = s
                .processes
                .iter()
                .map(|(n, mib, _, sockets)| format!("{n} {mib} MiB/{sockets} sockets"))
                .collect();
            eprintln!("{:>5} s: {}", s.at_s, each.join(", "))
        })
        .await?;
        let growth = report::soak_growth(&samples);
        println!("{}", report::soak_table(&growth));
        if let Some(path) = &args.json {
            write_json(path, &samples)?;
        }
        if !verdict.holds() {
            bail!("the invariant did not hold after the soak: {verdict:?}");
        }
        if growth.iter().any(|g| !g.steady()) {
            bail!("memory or connections grew during the soak");
        }
        return Ok(());
    }
    let mut opts = if args.short {
        ChaosOptions::short()
    } else {
        ChaosOptions::full()
    };
    for o in &args.only {
        if !widget_chaos::scenarios::ALL.contains(&o.as_str()) {
            bail!("no scenario {o} (see --list)");
        }
    }
    opts.only = args.only.clone();
    let outcomes = widget_chaos::chaos(&opts, |o| {
        eprintln!(
            "{} {}: {} lost, {} stale, drain {} s",
            if o.passed() { "PASS" } else { "FAIL" },
            o.scenario,
            o.lost,
            o.stale,
            o.drain_s
        )
    })
    .await?;
    println!("{}", report::chaos_table(&outcomes));
    println!("{}", report::chaos_checks(&outcomes));
    if let Some(path) = &args.json {
        write_json(path, &outcomes)?;
    }
    if outcomes.iter().any(|o| !o.passed()) {
        bail!("a scenario failed");
    }
    Ok(())
}
