//! The tables the suite prints (Markdown, so they paste into the README as they are).

use std::fmt::Write;

use crate::{LoadRow, Outcome, SoakSample};

pub fn chaos_table(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    out.push_str(
        "| scenario | produced | applied | absorbed by the version guard | reclaimed | replayed | dead-lettered | lost | stale | screens 2xx during fault | screen p99 during fault | went back | all ready again after | lag p99 after recovery | drain |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for o in outcomes {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | **{}** | **{}** | {:.1}% | {} ms | {} | {} s | {} ms | {} s |",
            o.scenario,
            o.produced,
            o.applied,
            o.duplicates,
            o.reclaimed,
            o.replayed,
            o.dead_lettered,
            o.lost,
            o.stale,
            o.availability * 100.0,
            o.screen_p99_ms,
            o.went_back,
            o.recovered_s,
            o.lag_p99_ms,
            o.drain_s
        );
    }
    out
}

/// Each scenario's checks, and what went wrong.
pub fn chaos_checks(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    for o in outcomes {
        let _ = writeln!(
            out,
            "{} {} ({})",
            if o.passed() { "PASS" } else { "FAIL" },
            o.scenario,
            o.fault
        );
        for c in &o.checks {
            let _ = writeln!(
                out,
                "    [{}] {}: {}",
                if c.ok { "ok" } else { "FAILED" },
                c.what,
                c.detail
            );
        }
        for p in &o.problems {
            let _ = writeln!(out, "    [FAILED] {p}");
        }
    }
    out
}

pub fn load_table(rows: &[LoadRow]) -> String {
    let mut out = String::new();
    out.push_str(
        "| offered events/s | produced/s | ingested/s | lag p50 | lag p99 | lag max | screen reads/s | screen p99 | screens 2xx | invariant after drain |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} ms | {} ms | {} ms | {} | {} ms | {:.1}% | {} |",
            r.offered,
            r.produced_per_s,
            r.applied_per_s,
            r.lag_p50_ms,
            r.lag_p99_ms,
            r.lag_max_ms,
            r.screen_reads_per_s,
            r.screen_p99_ms,
            r.availability * 100.0,
            if r.invariant_holds {
                "holds".to_string()
            } else {
                format!("{} lost, {} stale", r.lost, r.stale)
            }
        );
    }
    if let Some(first) = rows.first() {
        out.push_str("\nCPU (share of one core) / memory (PSS) MiB per process:\n\n| process |");
        for r in rows {
            let _ = write!(out, " {}/s |", r.offered);
        }
        out.push_str("\n| --- |");
        for _ in rows {
            out.push_str(" ---: |");
        }
        out.push('\n');
        for (i, (name, _, _)) in first.processes.iter().enumerate() {
            let _ = write!(out, "| {name} |");
            for r in rows {
                match r.processes.get(i) {
                    Some((_, cpu, rss)) => {
                        let _ = write!(out, " {cpu:.2} / {rss} |");
                    }
                    None => out.push_str(" - |"),
                }
            }
            out.push('\n');
        }
    }
    out
}

/// Growth over the soak, per process: the median of the third quarter of the run against the
/// median of the last quarter (medians, because a fork for an AOF rewrite briefly halves
/// Redis's PSS, and a sample may land on it).
pub struct Growth {
    pub name: String,
    pub mem_third_quarter: f64,
    pub mem_last_quarter: f64,
    pub mem_max: f64,
    pub sockets_third_quarter: usize,
    pub sockets_last_quarter: usize,
    pub sockets_max: usize,
}

impl Growth {
    /// Memory within 20% (+16 MiB for allocator noise) of its level in the third quarter, and
    /// no more than 4 sockets above it: nothing grows with time.
    pub fn steady(&self) -> bool {
        self.mem_last_quarter <= self.mem_third_quarter * 1.2 + 16.0
            && self.sockets_last_quarter <= self.sockets_third_quarter + 4
    }
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

pub fn soak_growth(samples: &[SoakSample]) -> Vec<Growth> {
    // The first half is warm-up: pools fill, allocator arenas settle, and the stream grows to
    // its maxLength (500,000 entries: about 8 minutes at 1,000 events/s) before history is
    // trimmed.
    let n = samples.len();
    let (third, last) = (&samples[n / 2..n * 3 / 4], &samples[n * 3 / 4..]);
    let Some(first) = third.first() else {
        return Vec::new();
    };
    first
        .processes
        .iter()
        .enumerate()
        .map(|(i, (name, ..))| {
            let of = |part: &[SoakSample]| -> Vec<(f64, usize)> {
                part.iter()
                    .filter_map(|s| s.processes.get(i).map(|p| (p.1, p.3)))
                    .collect()
            };
            let (a, b) = (of(third), of(last));
            let second_half: Vec<(f64, usize)> = a.iter().chain(&b).copied().collect();
            Growth {
                name: name.clone(),
                mem_third_quarter: median(a.iter().map(|p| p.0).collect()).unwrap_or(0.0),
                mem_last_quarter: median(b.iter().map(|p| p.0).collect()).unwrap_or(0.0),
                mem_max: second_half.iter().map(|p| p.0).fold(0.0, f64::max),
                sockets_third_quarter: median(a.iter().map(|p| p.1).collect()).unwrap_or(0),
                sockets_last_quarter: median(b.iter().map(|p| p.1).collect()).unwrap_or(0),
                sockets_max: second_half.iter().map(|p| p.1).max().unwrap_or(0),
            }
        })
        .collect()
}

pub fn soak_table(growth: &[Growth]) -> String {
    let mut out = String::from(
        "| process | memory (PSS) MiB, 3rd quarter | last quarter | max, second half | sockets, 3rd quarter | last quarter | max, second half | steady |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for g in growth {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            g.name,
            g.mem_third_quarter,
            g.mem_last_quarter,
            g.mem_max,
            g.sockets_third_quarter,
            g.sockets_last_quarter,
            g.sockets_max,
            if g.steady() { "yes" } else { "**no**" }
        );
    }
    out
}
