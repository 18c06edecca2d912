//! Inspecting and re-driving the dead-letter stream: `widget-runtime dead-letters list|replay`.
//!
//! A dead letter is the original entry's fields plus the context the ingester added
//! (`ingest::dead_letter::field`). Replaying one moves it back into the main stream, with only
//! its original fields, in one atomic script (`XDEL` from the dead-letter stream, and only if
//! that removed it, `XADD` to the stream), so a replay that runs twice or in two shells moves
//! each entry once. Replaying an old version is harmless: the version guards keep the newest.

use std::sync::LazyLock;

use redis::Script;
use redis::aio::ConnectionLike;
use serde::Serialize;

use crate::ingest::consumer::{Entry, parse_entries};
use crate::ingest::dead_letter::field;
use crate::stream;

/// Which dead letters to list or replay.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<String>,
    /// Only those dead-lettered at or after this unix time (ms).
    pub since_ms: Option<i64>,
}

/// One dead letter as the listing shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterInfo {
    /// Its id in the dead-letter stream.
    pub id: String,
    pub original_id: Option<String>,
    pub widget_key: Option<String>,
    pub source: Option<String>,
    pub reason: Option<String>,
    pub error: Option<String>,
    pub deliveries: Option<u64>,
    pub dead_lettered_at_ms: Option<i64>,
    /// Its original fields were cut to the first 64: it cannot be replayed as it was.
    pub truncated: bool,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Moved back into the stream (or, with `dry_run`, that would be).
    pub replayed: Vec<DeadLetterInfo>,
    /// Matching but not replayable (truncated fields).
    pub skipped: Vec<DeadLetterInfo>,
    pub dry_run: bool,
}

fn text(entry: &Entry, name: &str) -> Option<String> {
    let raw = stream::raw_fields(&entry.fields);
    raw.into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| stream::clip(&String::from_utf8_lossy(&v)))
}

fn info(entry: &Entry) -> DeadLetterInfo {
    DeadLetterInfo {
        id: entry.id.clone(),
        original_id: text(entry, field::ORIGINAL_ID),
        widget_key: text(entry, stream::field::WIDGET_KEY),
        source: text(entry, stream::field::SOURCE),
        reason: text(entry, field::REASON),
        error: text(entry, field::ERROR),
        deliveries: text(entry, field::DELIVERIES).and_then(|d| d.parse().ok()),
        dead_lettered_at_ms: text(entry, field::DEAD_LETTERED_AT_MS).and_then(|t| t.parse().ok()),
        truncated: entry.fields.contains_key(field::TRUNCATED_FIELDS),
    }
}

impl Filter {
    fn matches(&self, info: &DeadLetterInfo) -> bool {
        self.reason
            .as_ref()
            .is_none_or(|r| info.reason.as_deref() == Some(r.as_str()))
    }

    /// The first stream id to read: dead-letter ids are the time they were written.
    fn start(&self) -> String {
        match self.since_ms {
            Some(ms) => format!("{}-0", ms.max(0)),
            None => "-".into(),
        }
    }
}

/// Pages of this many entries are read at a time.
const PAGE: usize = 500;

async fn matching<C: ConnectionLike>(
    conn: &mut C,
    dead_stream: &str,
    filter: &Filter,
) -> redis::RedisResult<Vec<(Entry, DeadLetterInfo)>> {
    let mut out = Vec::new();
    let mut start = filter.start();
    loop {
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(dead_stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await?;
        let page = parse_entries(reply);
        let full = page.len() >= PAGE;
        let last = page.last().map(|e| e.id.clone());
        for entry in page {
            let i = info(&entry);
            if filter.matches(&i) {
                out.push((entry, i));
            }
        }
        match last {
            Some(id) if full => start = format!("({id}"),
            _ => return Ok(out),
        }
    }
}

/// The dead letters matching `filter`, oldest first.
pub async fn list<C: ConnectionLike>(
    conn: &mut C,
    dead_stream: &str,
    filter: &Filter,
) -> redis::RedisResult<Vec<DeadLetterInfo>> {
    Ok(matching(conn, dead_stream, filter)
        .await?
        .into_iter()
        .map(|(_, i)| i)
        .collect())
}

/// KEYS[1] stream, KEYS[2] dead-letter stream; ARGV[1] the dead letter's id, then the original
/// field/value pairs. Returns 1 if this call moved it, 0 if it was already gone.
static REDRIVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('XDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
local args = {KEYS[1], '*'}
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('XADD', unpack(args))
return 1
"#,
    )
});

/// Moves the dead letters matching `filter` back into `stream` with their original fields
/// (or, with `dry_run`, only says which it would move).
pub async fn replay<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    dead_stream: &str,
    filter: &Filter,
    dry_run: bool,
) -> redis::RedisResult<ReplayReport> {
    let mut report = ReplayReport {
        dry_run,
        ..ReplayReport::default()
    };
    for (entry, info) in matching(conn, dead_stream, filter).await? {
        if info.truncated {
            report.skipped.push(info);
            continue;
        }
        if !dry_run {
            let mut inv = REDRIVE.prepare_invoke();
            inv.key(stream).key(dead_stream).arg(&entry.id);
            for (k, v) in stream::raw_fields(&entry.fields) {
                if !field::CONTEXT.contains(&k.as_str()) {
                    inv.arg(k).arg(v);
                }
            }
            let moved: i64 = inv.invoke_async(conn).await?;
            if moved == 0 {
                continue; // replayed meanwhile by someone else
            }
        }
        report.replayed.push(info);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_reason_and_start_time() {
        let f = Filter {
            reason: Some("max-deliveries".into()),
            since_ms: Some(1_700_000_000_000),
        };
        assert_eq!(f.start(), "1700000000000-0");
        let mut i = DeadLetterInfo {
            id: "1-0".into(),
            original_id: None,
            widget_key: None,
            source: None,
            reason: Some("max-deliveries".into()),
            error: None,
            deliveries: Some(4),
            dead_lettered_at_ms: None,
            truncated: false,
        };
        assert!(f.matches(&i));
        i.reason = Some("undecodable".into());
        assert!(!f.matches(&i));
        assert_eq!(Filter::default().start(), "-");
        assert!(Filter::default().matches(&i));
    }
}
